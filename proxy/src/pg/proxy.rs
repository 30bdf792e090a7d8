//! The PostgreSQL proxy: one task per client connection.
//!
//! ```text
//! client --SSLRequest--> 'S' --TLS (Wicket client cert required)--> StartupMessage
//!   -> decide (policy, grants in force from the index or the store) -> register session
//!   -> upstream: SSLRequest, TLS with a one-minute DB-client certificate for
//!      the database user, StartupMessage (cert auth) ... ReadyForQuery
//!   -> relay both ways, auditing statements, until either side ends or the
//!      grant ends (FATAL ErrorResponse naming the request, then close)
//! ```
//!
//! The client sees proxy-made cancel keys; a CancelRequest (over TLS, with a
//! certificate of the same Wicket user) is forwarded to the backend it
//! belongs to, so nobody can cancel another session's queries.

use super::protocol::{self, Frontend, ProtocolError, Startup};
use super::track::{Executed, Sent, Tracker};
use crate::admission::Admission;
use crate::audit::{AuditEvent, SessionRef};
use crate::clock;
use crate::service::{Caller, Wicket};
use crate::sessions::{SessionInfo, Signal};
use crate::store::CancelKeyRow;
use crate::tls;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::ServerName;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use wicket_ca::{Identity, Validity};
use wicket_policy::{Resource, ResourceKind};

use wicket_api::pg::RESOURCE_PARAM;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long ending a cut session's backend may take before its statement
/// is cancelled instead (a busy database, or its connection limit).
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest startup-phase message (PostgreSQL allows 10000 bytes).
const MAX_STARTUP: usize = 10_000;
/// Backend messages the proxy reads whole (errors, COPY starts) larger than
/// this are passed through uninspected.
const MAX_INSPECTED_BACKEND: usize = 1 << 20;
/// How long a grant-end waits for the relay to reach a message boundary
/// (the backend message in flight finished, or a client that stopped
/// reading caught up) before the connection is dropped without the FATAL
/// message. With the session check's tick (250 ms) and [`STOPPED_GOODBYE`]
/// it keeps a client that stopped reading from holding a session much past
/// a second after its grant's end (the relay may still reach a boundary at
/// the last moment and give the client [`GOODBYE_TIMEOUT`] for the FATAL).
const HARD_STOP: Duration = Duration::from_millis(500);
/// How long the last message and shutdown may wait for the client.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long the shutdown may wait for a client after a hard stop (nothing
/// is left to tell it, and it was not reading).
const STOPPED_GOODBYE: Duration = Duration::from_millis(100);
/// How long the server may take to answer what a departed client had
/// sent (those answers are read, not passed on, to audit what ran).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Statements/portals remembered per session for auditing Execute.
const MAX_TRACKED: usize = 10_000;
const READ_CHUNK: usize = 64 * 1024;

/// The upstream certificate lives about a minute (and starts a little
/// before now, for clock skew).
const UPSTREAM_CERT_BEFORE: i64 = 30;
const UPSTREAM_CERT_AFTER: i64 = 60;

/// Shared state of the PostgreSQL listener.
pub struct PgProxy {
    wicket: Arc<Wicket>,
    acceptor: TlsAcceptor,
    /// The key the proxy's short-lived upstream certificates certify; made at
    /// start, never written anywhere.
    upstream_pkcs8: Vec<u8>,
    upstream_spki: Vec<u8>,
    verifiers: BTreeMap<String, Arc<dyn rustls::client::danger::ServerCertVerifier>>,
    cancels: Mutex<HashMap<(u32, u32), CancelTarget>>,
    /// When cancel keys left in a shared store were last pruned (ms).
    cancels_pruned: AtomicI64,
    rng: SystemRandom,
}

impl std::fmt::Debug for PgProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProxy").finish_non_exhaustive()
    }
}

/// The backend a cancel key stands for, and whose session it is.
#[derive(Clone)]
struct CancelTarget {
    user: String,
    resource: String,
    db_user: String,
    pid: u32,
    secret: u32,
}

impl CancelTarget {
    /// Who the proxy's own connections for this backend (its cancel, its
    /// ending) are made for: the user, with no roles or grants.
    fn identity(&self) -> Identity {
        Identity {
            user: self.user.clone(),
            roles: Vec::new(),
            request_ids: Vec::new(),
            login_until: None,
        }
    }
}

/// Cancel keys in a shared store older than this are pruned (a wicketd that
/// stopped without ending its sessions leaves its keys). A session older
/// than this is still cancelled through the wicketd that holds it.
const SHARED_CANCEL_KEY_LIFE: chrono::Duration = chrono::Duration::days(7);
const CANCEL_PRUNE_EVERY_MS: i64 = 3_600_000;

/// Why a relayed session ended.
enum End {
    ClientClosed,
    ServerClosed,
    /// The grant ended; the text names the request and why.
    Cut(String),
    /// The client sent something unacceptable.
    Protocol(String),
    /// Reading from the client failed (a reset, a TLS stream cut short):
    /// it went, as with [`End::ClientClosed`].
    ClientBroke(String),
    Io(String),
}

impl End {
    fn reason(&self) -> String {
        match self {
            End::ClientClosed => "client closed the connection".into(),
            End::ServerClosed => "server closed the connection".into(),
            End::Cut(w) => w.clone(),
            End::Protocol(w) => format!("protocol violation: {w}"),
            End::ClientBroke(w) => format!("client connection error: {w}"),
            End::Io(w) => format!("connection error: {w}"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PgProxy {
    /// Prepares the listener's TLS and the upstream trust of every database
    /// resource. Fails on an unreadable or empty `ca_file`.
    pub fn new(wicket: Arc<Wicket>, server_names: &[String]) -> crate::error::Result<Self> {
        let now = clock::now().timestamp();
        let server = tls::server_config(
            wicket.keys.clone(),
            server_names,
            now,
            tls::ClientCerts::Required,
        )?;
        let rng = SystemRandom::new();
        let (upstream_pkcs8, upstream_spki) = wicket_ca::x509::new_p256_key(&rng)?;
        let mut verifiers = BTreeMap::new();
        for r in &wicket.config.policy.resources {
            if r.kind == ResourceKind::Database {
                let ca_file = wicket
                    .config
                    .database_tls
                    .get(&r.name)
                    .and_then(|t| t.ca_file.as_deref());
                verifiers.insert(
                    r.name.clone(),
                    tls::upstream_verifier(&wicket.keys, ca_file, &r.name)?,
                );
            }
        }
        Ok(Self {
            wicket,
            acceptor: TlsAcceptor::from(server),
            upstream_pkcs8,
            upstream_spki,
            verifiers,
            cancels: Mutex::default(),
            cancels_pruned: AtomicI64::new(0),
            rng,
        })
    }

    /// Accepts connections until `shutdown` fires.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        let gate = crate::admission::Gate::new("postgres", self.wicket.config.limits);
        // An ErrorResponse answers an SSLRequest as well as a StartupMessage
        // (`wicket`'s tunnel shows it as unverified; libpq from 17.2 does
        // not show one sent before TLS, CVE-2024-10977).
        let refusal =
            |why: &str| protocol::error_response("FATAL", "53300", &format!("wicket: {why}"));
        crate::server::accept_until_shutdown(
            listener,
            shutdown,
            gate,
            refusal,
            move |tcp, peer, admitted| {
                let this = self.clone();
                async move { this.handle(tcp, peer, admitted).await }
            },
        )
        .await;
    }

    async fn handle(&self, tcp: TcpStream, peer: SocketAddr, mut admitted: Admission) {
        // Everything before authentication (reads and writes) within
        // limits.login_grace: a client that stops reading cannot hold its
        // place either.
        let negotiated =
            tokio::time::timeout_at(admitted.deadline(), self.negotiate(tcp, peer)).await;
        let Ok(Some((mut client, buf, caller, msg))) = negotiated else {
            return;
        };
        // A verified certificate and a startup message: who it is is known,
        // and on the record from here. A cancel request takes none of the
        // user's places (one at their limit can still stop a query), and
        // ends at once.
        match msg {
            Startup::Startup { mut params, minor } => {
                if let Some(v) = protocol::negotiate(minor, &mut params) {
                    if client.write_all(&v).await.is_err() {
                        return;
                    }
                }
                if let Err(why) = admitted.authenticated_as(&caller.user) {
                    fatal(&mut client, "53300", &format!("wicket: {why}")).await;
                    return;
                }
                self.session(client, buf, params, caller).await
            }
            Startup::Cancel { pid, secret } => self.cancel(&caller, pid, secret).await,
            Startup::SslRequest | Startup::GssEncRequest => {
                fatal(
                    &mut client,
                    "08P01",
                    "wicket: encryption request inside TLS",
                )
                .await;
            }
        }
    }

    /// SSLRequest, TLS with a verified Wicket client certificate, then the
    /// startup (or cancel) message. `None` when the connection ends on the
    /// way (the client was told why where it can be).
    async fn negotiate(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<(
        tokio_rustls::server::TlsStream<TcpStream>,
        Vec<u8>,
        Caller,
        Startup,
    )> {
        // Plaintext negotiation: only SSLRequest leads anywhere, after at
        // most one GSSENCRequest (as the postmaster allows).
        let mut buf = Vec::new();
        let mut gss_refused = false;
        loop {
            let msg = match read_startup(&mut tcp, &mut buf).await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => {
                    fatal(&mut tcp, "08P01", &format!("wicket: {e}")).await;
                    return None;
                }
            };
            match msg {
                Startup::SslRequest => break,
                Startup::GssEncRequest if !gss_refused => {
                    gss_refused = true;
                    tcp.write_all(b"N").await.ok()?;
                }
                Startup::GssEncRequest => {
                    fatal(&mut tcp, "08P01", "wicket: GSSENCRequest sent twice").await;
                    return None;
                }
                Startup::Startup { .. } => {
                    fatal(
                        &mut tcp,
                        "28000",
                        "wicket: connections must use TLS with a Wicket client certificate; \
                         use `wicket db connect NAME` or `wicket proxy db NAME --tunnel`",
                    )
                    .await;
                    return None;
                }
                Startup::Cancel { .. } => return None,
            }
        }
        if !buf.is_empty() {
            // Bytes sent before the TLS handshake could be injected by a
            // man in the middle (CVE-2021-23214): refuse.
            fatal(
                &mut tcp,
                "08P01",
                "wicket: unexpected data after SSLRequest",
            )
            .await;
            return None;
        }
        tcp.write_all(b"S").await.ok()?;
        let mut client = match self.acceptor.accept(tcp).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "postgres TLS handshake failed");
                return None;
            }
        };
        let now = clock::now();
        let verified = client
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| {
                self.wicket
                    .trusted_tls
                    .verify_client(leaf.as_ref(), now.timestamp())
            });
        let caller = match verified {
            Some(Ok(cert)) => match &cert.identity {
                Some(id) => Caller::of_certificate(id, cert.validity.not_after, peer.ip()),
                None => {
                    fatal(
                        &mut client,
                        "28000",
                        "wicket: the client certificate carries no Wicket identity",
                    )
                    .await;
                    return None;
                }
            },
            Some(Err(e)) => {
                fatal(
                    &mut client,
                    "28000",
                    &format!("wicket: client certificate: {e}"),
                )
                .await;
                return None;
            }
            None => {
                fatal(
                    &mut client,
                    "28000",
                    "wicket: a client certificate is required",
                )
                .await;
                return None;
            }
        };
        let msg = match read_startup(&mut client, &mut buf).await {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(e) => {
                fatal(&mut client, "08P01", &format!("wicket: {e}")).await;
                return None;
            }
        };
        Some((client, buf, caller, msg))
    }

    /// Forwards a CancelRequest carrying one of our keys to its backend:
    /// a key this wicketd handed out, or (when the store is shared) one
    /// another wicketd did. Only the session's own user may use it.
    async fn cancel(&self, caller: &Caller, pid: u32, secret: u32) {
        let mut target = lock(&self.cancels).get(&(pid, secret)).cloned();
        if target.is_none() && self.shared_cancels() {
            let read = self.wicket.store.cancel_key(pid, secret);
            target = match shared_key_call(read).await {
                Ok(row) => row.map(|k| CancelTarget {
                    user: k.user,
                    resource: k.resource,
                    db_user: k.db_user,
                    pid: k.backend_pid,
                    secret: k.backend_secret,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cancel request: cannot read the shared cancel keys");
                    None
                }
            };
        }
        match target.filter(|t| t.user == caller.user) {
            Some(t) => self.forward_cancel(&t).await,
            None => {
                tracing::info!(user = %caller.user, "cancel request with an unknown key ignored")
            }
        }
    }

    /// Sends the backend's own CancelRequest to its database.
    async fn forward_cancel(&self, t: &CancelTarget) {
        let Some(resource) = self.database(&t.resource) else {
            return;
        };
        match self
            .connect_upstream(&resource, &t.db_user, &t.identity())
            .await
        {
            Ok(mut up) => {
                if up
                    .write_all(&protocol::cancel_request(t.pid, t.secret))
                    .await
                    .is_ok()
                {
                    let _ = up.flush().await;
                    // The server closes the connection once it has acted.
                    let mut b = [0u8; 1];
                    let _ = tokio::time::timeout(CONNECT_TIMEOUT, up.read(&mut b)).await;
                }
                tracing::info!(user = %t.user, database = %t.resource, "cancel request forwarded");
            }
            Err(e) => {
                tracing::warn!(database = %t.resource, error = %e, "cancel request not delivered")
            }
        }
    }

    /// Ends the backend behind the session's cancel key `key` (see
    /// [`Self::terminate_backend`]), and cancels its statement as well,
    /// whatever the answer: it costs little, and what stops the statement
    /// then depends on no answer.
    async fn stop_backend(&self, key: Option<(u32, u32)>, session: &[u8]) {
        let target = key.and_then(|k| lock(&self.cancels).get(&k).cloned());
        if let Some(t) = target {
            self.terminate_backend(&t, session).await;
            self.forward_cancel(&t).await;
        }
    }

    /// Ends the backend of a session cut (or left with work running) with
    /// `pg_terminate_backend`, over
    /// a connection of its own as the same database user to the same
    /// database (PostgreSQL lets a role end its own backends). Unlike a
    /// cancel, which stops only the statement running, this also ends what
    /// the client pipelined behind it (the server would read and run it
    /// next) and a statement that would run on to its commit with its
    /// client gone. Only `user` and `database` are taken from the session's
    /// startup message (`session`), none of its client's settings, and the
    /// function is named in `pg_catalog`: a function of the user's own
    /// earlier in their `search_path` cannot answer in its place. What
    /// came of it is logged (the cancel follows either way).
    async fn terminate_backend(&self, t: &CancelTarget, session: &[u8]) {
        let Some(resource) = self.database(&t.resource) else {
            return;
        };
        let database = match protocol::read_startup(session, session.len()) {
            Ok(Some((m, _))) => m.param("database").map(str::to_owned),
            _ => None,
        };
        let mut params = vec![
            ("user", t.db_user.as_str()),
            ("application_name", "wicket: ending a cut session"),
            AS_DATABASE_USER,
        ];
        if let Some(d) = database.as_deref().filter(|d| !d.is_empty()) {
            params.push(("database", d));
        }
        let startup = protocol::startup_message(&params);
        let ended = async {
            let mut up = self
                .connect_upstream(&resource, &t.db_user, &t.identity())
                .await
                .map_err(std::io::Error::other)?;
            up.write_all(&startup).await?;
            up.flush().await?;
            let mut buf = Vec::new();
            read_to_ready(&mut up, &mut buf).await?;
            let sql = format!("SELECT pg_catalog.pg_terminate_backend({})", t.pid);
            up.write_all(&protocol::query_message(&sql)).await?;
            up.flush().await?;
            let said = read_to_ready(&mut up, &mut buf).await?;
            let _ = up.write_all(&protocol::terminate_message()).await;
            let _ = up.shutdown().await;
            Ok::<_, std::io::Error>(said == Some(true))
        };
        match tokio::time::timeout(TERMINATE_TIMEOUT, ended).await {
            Ok(Ok(true)) => {
                tracing::info!(user = %t.user, database = %t.resource, pid = t.pid, "cut session's backend ended")
            }
            Ok(Ok(false)) => {
                tracing::warn!(database = %t.resource, pid = t.pid, "a cut session's backend was not ended; cancelling its statement")
            }
            Ok(Err(e)) => {
                tracing::warn!(database = %t.resource, error = %e, "cannot end a cut session's backend; cancelling its statement")
            }
            Err(_) => {
                tracing::warn!(database = %t.resource, "ending a cut session's backend timed out; cancelling its statement")
            }
        }
    }

    fn database(&self, name: &str) -> Option<Resource> {
        self.wicket
            .config
            .policy
            .resources
            .iter()
            .find(|r| r.kind == ResourceKind::Database && r.name == name)
            .cloned()
    }

    /// TCP, SSLRequest, TLS with a fresh certificate for `db_user`.
    async fn connect_upstream(
        &self,
        db: &Resource,
        db_user: &str,
        identity: &Identity,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let verifier = self
            .verifiers
            .get(&db.name)
            .cloned()
            .ok_or_else(|| format!("no TLS trust configured for database {:?}", db.name))?;
        let mut tcp =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(db.address.as_str()))
                .await
                .map_err(|_| format!("connecting to {} timed out", db.address))?
                .map_err(|e| format!("cannot connect to {}: {e}", db.address))?;
        let _ = tcp.set_nodelay(true);
        crate::server::keep_alive(&tcp);
        tcp.write_all(&protocol::ssl_request())
            .await
            .map_err(|e| format!("{}: {e}", db.address))?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(CONNECT_TIMEOUT, tcp.read_exact(&mut answer))
            .await
            .map_err(|_| format!("{} did not answer the SSLRequest", db.address))?
            .map_err(|e| format!("{}: {e}", db.address))?;
        if answer[0] != b'S' {
            return Err(format!(
                "database {:?} at {} does not accept TLS connections (ssl = off?)",
                db.name, db.address
            ));
        }
        let now = clock::now().timestamp();
        let validity = Validity::new(now - UPSTREAM_CERT_BEFORE, now + UPSTREAM_CERT_AFTER)
            .map_err(|e| e.to_string())?;
        let issued = self
            .wicket
            .keys
            .db_client
            .issue_client(
                &self.upstream_spki,
                db_user,
                Some(identity),
                validity,
                &self.rng,
            )
            .map_err(|e| format!("minting the database certificate: {e}"))?;
        let chain = vec![issued.der, self.wicket.keys.db_client.cert_der().to_vec()];
        let config = tls::upstream_client_config(verifier, chain, &self.upstream_pkcs8)
            .map_err(|e| e.to_string())?;
        let name = self
            .wicket
            .config
            .database_tls
            .get(&db.name)
            .and_then(|t| t.server_name.clone())
            .unwrap_or_else(|| host_of(&db.address));
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| format!("{name:?} is not a valid TLS server name"))?;
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            TlsConnector::from(config).connect(server_name, tcp),
        )
        .await
        .map_err(|_| format!("TLS handshake with {} timed out", db.address))?
        .map_err(|e| format!("TLS handshake with database {:?}: {e}", db.name))
    }

    async fn session(
        &self,
        mut client: tokio_rustls::server::TlsStream<TcpStream>,
        pending: Vec<u8>,
        params: Vec<(String, String)>,
        caller: Caller,
    ) {
        let now = clock::now();
        let param = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let db_user = param("user").unwrap_or_default();
        let db_name = param("database")
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| db_user.clone());
        let resource_name = param(RESOURCE_PARAM).unwrap_or_default();
        let denied = |reason: String| AuditEvent::SessionDenied {
            user: caller.user.clone(),
            protocol: "postgres".into(),
            resource: resource_name.clone(),
            login: db_user.clone(),
            source: caller.source.to_string(),
            request_ids: caller.request_ids.clone(),
            reason,
        };
        let refuse_reason = if let Some(k) = duplicate_param(&params) {
            // PostgreSQL takes the last value; the decision must see the one
            // that counts, so a repeated key is refused outright.
            Some(format!("startup parameter {k:?} is given more than once"))
        } else if db_user.is_empty() {
            Some("the startup message names no database user".to_owned())
        } else if resource_name.is_empty() {
            Some(format!(
                "the startup message names no database resource (parameter {RESOURCE_PARAM}); \
                 connect through `wicket proxy db NAME --tunnel` or `wicket db connect NAME`"
            ))
        } else if let Some(how) = sets_identity(&params) {
            Some(format!(
                "the startup message sets the role ({how}), which would run every statement as \
                 another role than the database user decided on and audited; connect as the \
                 database user you need, or run SET ROLE (it is audited)"
            ))
        } else if param("replication")
            .is_some_and(|v| !matches!(v.as_str(), "false" | "off" | "0" | "no"))
        {
            Some("replication connections are not allowed through wicket".to_owned())
        } else {
            None
        };
        if let Some(reason) = refuse_reason {
            let _ = self.wicket.audit(denied(reason.clone()), now).await;
            fatal(&mut client, "28000", &format!("wicket: {reason}")).await;
            return;
        }
        let Some(resource) = self.database(&resource_name) else {
            let reason = format!("unknown database {resource_name:?}");
            let _ = self.wicket.audit(denied(reason.clone()), now).await;
            fatal(&mut client, "3D000", &format!("wicket: {reason}")).await;
            return;
        };
        let decided = self
            .wicket
            .decide_session(&caller, now, {
                let (resource, db_user, db_name) =
                    (resource.clone(), db_user.clone(), db_name.clone());
                move |roles, subject| roles.decide_database(subject, &resource, &db_user, &db_name)
            })
            .await;
        let decided = match decided {
            Ok(d) if d.decision.allowed => d,
            other => {
                let reason = match other {
                    Ok(d) => d.decision.reason,
                    Err(e) => e.to_string(),
                };
                let _ = self.wicket.audit(denied(reason.clone()), now).await;
                fatal(
                    &mut client,
                    "28000",
                    &format!("wicket: access denied: {reason}"),
                )
                .await;
                return;
            }
        };
        let handle = self.wicket.open_session(
            SessionInfo {
                protocol: "postgres",
                user: decided.user.clone(),
                resource: resource.name.clone(),
                login: db_user.clone(),
                request_ids: decided.request_ids.clone(),
                started: now,
                valid_until: decided.valid_until,
                basis: decided.basis.clone(),
                // Decided once, at the start.
                held_standing: Vec::new(),
            },
            &decided.requests,
        );
        let Some(handle) = handle else {
            let reason = "wicketd is stopping".to_owned();
            let _ = self.wicket.audit(denied(reason.clone()), now).await;
            fatal(&mut client, "57P01", &format!("wicket: {reason}")).await;
            return;
        };
        let sref = Arc::new(SessionRef {
            session_id: handle.id.clone(),
            user: decided.user.clone(),
            protocol: "postgres".into(),
            resource: resource.name.clone(),
            login: db_user.clone(),
            request_ids: decided.request_ids.clone(),
        });
        let sink = &self.wicket.audit_sink;
        sink.send_always(
            AuditEvent::SessionStarted {
                session: sref.clone(),
                source: caller.source.to_string(),
                database: Some(db_name.clone()),
                // The startup message is at most MAX_STARTUP bytes.
                parameters: params
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | RESOURCE_PARAM))
                    .cloned()
                    .collect(),
                reason: decided.decision.reason.clone(),
            },
            now.timestamp_millis(),
        )
        .await;
        tracing::info!(session = %handle.id, user = %decided.user, database = %resource.name, db_user = %db_user, "postgres session started");

        let state = SessionState::new(sref.clone(), self.wicket.config.audit.db_parameter_values);
        let identity = Identity {
            user: decided.user.clone(),
            roles: crate::service::role_names(&decided.roles, &decided.scoped),
            request_ids: decided.request_ids.clone(),
            login_until: None,
        };
        let mut cancel_key = None;
        // Connecting takes up to CONNECT_TIMEOUT a step: the grant's end is
        // not kept waiting for it.
        let connected = tokio::select! {
            c = self.connect_upstream(&resource, &db_user, &identity) => Ok(c),
            why = told_to_end(handle.signal.clone()) => Err(why),
        };
        let end = match connected {
            Err(why) => {
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, fatal_cut(&mut client, &why)).await;
                End::Cut(why)
            }
            Ok(Err(e)) => {
                fatal(
                    &mut client,
                    "08006",
                    &format!("wicket: cannot reach database {:?}: {e}", resource.name),
                )
                .await;
                End::Io(e)
            }
            Ok(Ok(upstream)) => {
                let forwarded: Vec<(&str, &str)> = params
                    .iter()
                    .filter(|(k, _)| k != RESOURCE_PARAM)
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .chain([AS_DATABASE_USER])
                    .collect();
                let startup = protocol::startup_message(&forwarded);
                self.relay(
                    client,
                    upstream,
                    pending,
                    &startup,
                    &state,
                    handle.signal.clone(),
                    &mut cancel_key,
                    &decided.user,
                    &resource.name,
                    &db_user,
                )
                .await
            }
        };
        if let Some(k) = cancel_key {
            let target = lock(&self.cancels).remove(&k);
            if let Some(t) = target {
                // (Cancelled in `relay` if it was cut.)
                self.forget_shared_cancel_key(k, &t).await;
            }
        }
        let reason = end.reason();
        sink.send_always(
            AuditEvent::SessionEnded {
                session: sref,
                bytes_from_client: state.bytes_in.load(Ordering::Relaxed),
                bytes_to_client: state.bytes_out.load(Ordering::Relaxed),
                statements: state.statements.load(Ordering::Relaxed),
                exit_status: None,
                audit_dropped: state.dropped.load(Ordering::Relaxed),
                channels_refused: 0,
                refusals_unrecorded: 0,
                unrecorded_bytes: 0,
                recording_stopped: None,
                reason: reason.clone(),
            },
            clock::now().timestamp_millis(),
        )
        .await;
        tracing::info!(session = %handle.id, reason = %reason, "postgres session ended");
        drop(handle);
    }

    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        client: tokio_rustls::server::TlsStream<TcpStream>,
        mut upstream: tokio_rustls::client::TlsStream<TcpStream>,
        mut pending: Vec<u8>,
        startup: &[u8],
        state: &SessionState,
        mut signal: watch::Receiver<Signal>,
        cancel_key: &mut Option<(u32, u32)>,
        user: &str,
        resource: &str,
        db_user: &str,
    ) -> End {
        let (mut crd, mut cwr) = tokio::io::split(client);
        if let Err(e) = upstream.write_all(startup).await {
            return End::Io(e.to_string());
        }
        let _ = upstream.flush().await;

        // Startup phase: authentication result, parameters, our cancel key,
        // until the first ReadyForQuery. The database's login may wait (on
        // a lock, say), and so may a client that does not read or a full
        // audit queue: the grant's end is not, nor is the login timeout.
        // The client has whole messages only here.
        let mut sbuf = Vec::with_capacity(READ_CHUNK);
        // Positive, checked with the config.
        let login_timeout = self
            .wicket
            .config
            .postgres
            .login_timeout
            .to_std()
            .unwrap_or_default();
        // Whether the client was sent part of what it was being sent.
        let mut half_sent = false;
        // What is done once the login is done waiting, cut or not, so that
        // none of it is lost if it is: the errors the database sent, to
        // audit (as a blocking audit queue may keep them waiting), and
        // whether to prune the store's cancel keys.
        let mut errors = VecDeque::new();
        let mut prune = false;
        let login = async {
            let mut tmp = vec![0u8; READ_CHUNK];
            loop {
                let n = match upstream.read(&mut tmp).await {
                    Ok(0) => return Err(End::ServerClosed),
                    Ok(n) => n,
                    Err(e) => return Err(End::Io(e.to_string())),
                };
                sbuf.extend_from_slice(&tmp[..n]);
                let mut out = Vec::new();
                let mut at = 0;
                let mut ready = false;
                while let Some((tag, len)) = match protocol::read_message(&sbuf[at..], MAX_STARTUP)
                {
                    Ok(x) => x,
                    Err(e) => return Err(End::Io(format!("server: {e}"))),
                } {
                    let msg = &sbuf[at..at + len];
                    match tag {
                        b'R' => {
                            let code = msg
                                .get(5..9)
                                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                            if code != Some(0) {
                                let why = format!(
                                    "database {resource:?} asked database user {db_user:?} for a password \
                                     (authentication request {}); its pg_hba.conf must use `hostssl ... cert` \
                                     for Wicket's connections",
                                    code.unwrap_or(u32::MAX)
                                );
                                half_sent = true;
                                fatal(&mut cwr, "28000", &format!("wicket: {why}")).await;
                                return Err(End::Io(why));
                            }
                            out.extend_from_slice(msg);
                        }
                        b'K' if len == 13 => {
                            let pid = u32::from_be_bytes([msg[5], msg[6], msg[7], msg[8]]);
                            let secret = u32::from_be_bytes([msg[9], msg[10], msg[11], msg[12]]);
                            // PostgreSQL sends one; each more would be
                            // one more store call.
                            if cancel_key.is_some() {
                                return Err(End::Io("server: a second BackendKeyData".into()));
                            }
                            let target = CancelTarget {
                                user: user.to_owned(),
                                resource: resource.to_owned(),
                                db_user: db_user.to_owned(),
                                pid,
                                secret,
                            };
                            let (key, stored) = self.new_cancel_key(target, cancel_key).await;
                            prune |= stored;
                            out.push(b'K');
                            out.extend_from_slice(&12u32.to_be_bytes());
                            out.extend_from_slice(&key.0.to_be_bytes());
                            out.extend_from_slice(&key.1.to_be_bytes());
                        }
                        b'E' => {
                            // Lossy: a field in the client's encoding still
                            // leaves the error on the record.
                            let (code, message) = protocol::error_response_prefix(msg);
                            let session = state.sref.clone();
                            let error = AuditEvent::DbError {
                                session,
                                code,
                                message,
                            };
                            errors.push_back((error, clock::now().timestamp_millis()));
                            out.extend_from_slice(msg);
                        }
                        b'Z' => {
                            out.extend_from_slice(msg);
                            ready = true;
                        }
                        b'S' => {
                            if let Some(why) = encoding_refused(msg) {
                                half_sent = true;
                                fatal(&mut cwr, "22023", &format!("wicket: {why}")).await;
                                return Err(End::Protocol(why));
                            }
                            if let Some(why) = runs_as_another(msg, db_user) {
                                half_sent = true;
                                fatal(&mut cwr, "28000", &format!("wicket: {why}")).await;
                                return Err(End::Io(why));
                            }
                            out.extend_from_slice(msg);
                        }
                        _ => out.extend_from_slice(msg),
                    }
                    at += len;
                    if ready {
                        break;
                    }
                }
                sbuf.drain(..at);
                state
                    .bytes_out
                    .fetch_add(out.len() as u64, Ordering::Relaxed);
                half_sent = !out.is_empty();
                if cwr.write_all(&out).await.is_err() || cwr.flush().await.is_err() {
                    return Err(End::ClientClosed);
                }
                half_sent = false;
                if ready {
                    return Ok(());
                }
            }
        };
        let logged_in = tokio::select! {
            r = login => r,
            why = told_to_end(signal.clone()) => {
                if !half_sent {
                    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, fatal_cut(&mut cwr, &why)).await;
                }
                Err(End::Cut(why))
            }
            _ = tokio::time::sleep(login_timeout) => {
                let within = format!("{login_timeout:?}");
                // Stopped while writing to the client, or else waiting on
                // the database (or, a moment at most, the store).
                let why = if half_sent {
                    format!("the client did not take the answers to its login within {within}")
                } else {
                    format!("database {resource:?} did not log the session in within {within}")
                };
                if !half_sent {
                    let bye = format!("wicket: {why}");
                    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, fatal(&mut cwr, "08006", &bye)).await;
                }
                Err(End::Io(why))
            }
        };
        if let Err(end) = logged_in {
            // Let go of the client and the database first: the audit may
            // wait for room in its queue (`block`), which must not hold a
            // session that has ended open.
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, cwr.shutdown()).await;
            drop((crd, cwr, upstream));
            self.after_login(&mut errors, prune, state).await;
            return end;
        }
        self.after_login(&mut errors, prune, state).await;

        let (mut srd, mut swr) = tokio::io::split(upstream);
        let max = self.wicket.config.postgres.max_message_bytes;
        let mut s_framer = Framer::default();
        let tracking = Tracking::new();
        let hard_stop = crate::sessions::after_grace(
            signal.clone(),
            |s| match s {
                Signal::End(why) => Some(why.clone()),
                _ => None,
            },
            HARD_STOP,
        );
        let mut stopped_hard = false;
        // What the server's answers showed, until audited, and how much of
        // `sbuf` the tracker has read: kept here, so that a server side
        // dropped mid-way (when the other side ends first) loses nothing
        // and feeds nothing to the tracker twice when the drain goes on.
        let mut answers = Answers::new();
        let mut fed = 0;
        // Whether what the client has been sent ends at a message boundary
        // (not so inside a write, or after part of a message).
        let mut client_whole = true;
        // The client side's events not queued yet, likewise.
        let mut unaudited = VecDeque::new();
        let end = {
            let c2s = client_to_server(
                ClientSide {
                    rd: &mut crd,
                    buf: &mut pending,
                    unaudited: &mut unaudited,
                },
                &mut swr,
                max,
                state,
                &self.wicket,
                &tracking,
            );
            let s2c = server_to_client(
                ServerSide {
                    rd: &mut srd,
                    buf: &mut sbuf,
                    fed: &mut fed,
                    framer: &mut s_framer,
                    answers: &mut answers,
                    client_whole: &mut client_whole,
                },
                &mut cwr,
                state,
                &self.wicket,
                &mut signal,
                &tracking,
            );
            // The relay ends a session at the next message boundary; a
            // client that stopped reading keeps the relay from getting
            // there, so it is cut regardless a moment after that.
            tokio::select! {
                e = c2s => e,
                e = s2c => e,
                why = hard_stop => {
                    // Stopped wherever the relay was, perhaps inside a
                    // message to the client: no goodbye message after it.
                    stopped_hard = true;
                    End::Cut(why)
                }
            }
        };
        // The client is told first, and let go: the audits below may wait
        // for room in the queue (`block`), which must not hold a revoked
        // session open. It is at a message boundary unless a backend
        // message was half forwarded (or half written); only then can it
        // be told why the connection ends. A client that is not reading
        // gets a moment for it, not more.
        let goodbye = async {
            if client_whole && !stopped_hard {
                match &end {
                    End::Cut(why) => fatal_cut(&mut cwr, why).await,
                    End::Protocol(why) => {
                        fatal(&mut cwr, "08P01", &format!("wicket: {why}")).await;
                    }
                    _ => {}
                }
            }
            let _ = cwr.shutdown().await;
        };
        let patience = match stopped_hard {
            true => STOPPED_GOODBYE,
            false => GOODBYE_TIMEOUT,
        };
        let _ = tokio::time::timeout(patience, goodbye).await;
        // Let go of the client now (both halves: they share the stream),
        // not once what follows is done, which may wait on the database
        // and the store.
        drop(crd);
        drop(cwr);
        // A cut session's statement, or one pipelined behind a refused
        // message, must not run on: its backend is ended (or, failing
        // that, its statement cancelled) before anything that may wait on
        // the store.
        if let End::Cut(_) | End::Protocol(_) = &end {
            self.stop_backend(*cancel_key, startup).await;
        }
        // Answers read from the server past where a cut stopped relaying
        // were never sent on, but they show what ran: read for the record.
        if let End::Cut(_) = &end {
            let Fed { at, .. } =
                feed_answers(&mut s_framer, &sbuf, fed, &tracking, &mut answers, false);
            fed = at;
        }
        // A client can pipeline work with its Terminate, or close with
        // work unanswered: the server still runs it. Its answers are read
        // (and dropped) so that the record says what ran, not what would
        // have if everything succeeded; the server closes once it has read
        // the end of the client's stream.
        self.wicket
            .audit_sink
            .send_pending(&mut unaudited, &state.dropped)
            .await;
        audit_answers(&mut answers, state, &self.wicket).await;
        // Work a client left running when it went (closed, or broke its
        // connection) would run on unwatched by the grant: once this
        // session is over no revoke or expiry reaches it. It gets the
        // drain's moment to finish, then its backend is ended (not when
        // the server went: there is nothing left to end).
        let client_went = matches!(end, End::ClientClosed | End::ClientBroke(_));
        if client_went && tracking.lock().awaiting() {
            let sent = state.bytes_out.load(Ordering::Relaxed);
            let mut dropped = tokio::io::sink();
            let drain = server_to_client(
                ServerSide {
                    rd: &mut srd,
                    buf: &mut sbuf,
                    fed: &mut fed,
                    framer: &mut s_framer,
                    answers: &mut answers,
                    client_whole: &mut client_whole,
                },
                &mut dropped,
                state,
                &self.wicket,
                &mut signal,
                &tracking,
            );
            // Both bounded: a server that does not read cannot hold the
            // shutdown, nor one that does not answer the drain.
            let drained =
                tokio::time::timeout(DRAIN_TIMEOUT, async { tokio::join!(swr.shutdown(), drain) })
                    .await;
            audit_answers(&mut answers, state, &self.wicket).await;
            // The client was sent none of it.
            state.bytes_out.store(sent, Ordering::Relaxed);
            // The grant ended while it drained, or the work outlasted it.
            let left_running = match drained {
                Ok((_, End::Cut(_))) => true,
                Ok((_, End::ServerClosed | End::Io(_))) => false,
                _ => tracking.lock().awaiting(),
            };
            if left_running {
                tracing::info!(session = %state.sref.session_id, "the client left with work running; ending its backend");
                self.stop_backend(*cancel_key, startup).await;
            }
        }
        // Executes sent and never answered: on the record, as such.
        let unanswered = tracking.lock().unanswered();
        for e in unanswered {
            audit_executed(e, state, &self.wicket).await;
        }
        end
    }

    /// What a login leaves to do once it is done waiting: audit the errors
    /// the database sent, and prune the store's cancel keys if it is time.
    async fn after_login(
        &self,
        errors: &mut VecDeque<(AuditEvent, i64)>,
        prune: bool,
        state: &SessionState,
    ) {
        self.wicket
            .audit_sink
            .send_pending(errors, &state.dropped)
            .await;
        if prune {
            self.prune_shared_cancel_keys(clock::now().timestamp_millis())
                .await;
        }
    }

    /// Whether cancel keys go to the store: it is shared by every wicketd
    /// (PostgreSQL), so a CancelRequest may reach any of them.
    fn shared_cancels(&self) -> bool {
        self.wicket.store.is_shared()
    }

    /// A new cancel key for `target`, unique here and (when the store is
    /// shared) among every wicketd's sessions. It is in `slot` from the
    /// moment it is taken here, so a caller that stops waiting (the session
    /// cut meanwhile) still has it to forget. With the key, whether it went
    /// to the store (which is then pruned, once the caller is done waiting).
    async fn new_cancel_key(
        &self,
        target: CancelTarget,
        slot: &mut Option<(u32, u32)>,
    ) -> ((u32, u32), bool) {
        loop {
            let key = self.local_cancel_key(target.clone());
            *slot = Some(key);
            if !self.shared_cancels() {
                return (key, false);
            }
            let now = clock::now().timestamp_millis();
            let row = CancelKeyRow {
                pid: key.0,
                secret: key.1,
                user: target.user.clone(),
                resource: target.resource.clone(),
                db_user: target.db_user.clone(),
                backend_pid: target.pid,
                backend_secret: target.secret,
                created_ms: now,
            };
            match shared_key_call(self.wicket.store.put_cancel_key(&row)).await {
                Ok(true) => return (key, true),
                // Another wicketd's session holds it: draw again.
                Ok(false) => {
                    lock(&self.cancels).remove(&key);
                    *slot = None;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cancel key not stored: this session's cancel requests work only through this wicketd"
                    );
                    return (key, false);
                }
            }
        }
    }

    /// A random cancel key not in use here, taken for `target`.
    fn local_cancel_key(&self, target: CancelTarget) -> (u32, u32) {
        let mut map = lock(&self.cancels);
        loop {
            let mut b = [0u8; 8];
            if self.rng.fill(&mut b).is_err() {
                continue;
            }
            let key = (
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff,
                u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            );
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                e.insert(target);
                return key;
            }
        }
    }

    /// Forgets a session's cancel key (already out of the local map) in a
    /// shared store: only the row for this session's backend.
    async fn forget_shared_cancel_key(&self, key: (u32, u32), t: &CancelTarget) {
        if self.shared_cancels() {
            let delete = self
                .wicket
                .store
                .delete_cancel_key(key.0, key.1, t.pid, t.secret);
            if let Err(e) = shared_key_call(delete).await {
                tracing::warn!(error = %e, "cancel key left in the store (pruned later)");
            }
        }
    }

    /// At most once an hour: forgets shared cancel keys older than
    /// [`SHARED_CANCEL_KEY_LIFE`].
    async fn prune_shared_cancel_keys(&self, now_ms: i64) {
        let last = self.cancels_pruned.load(Ordering::Relaxed);
        if now_ms - last < CANCEL_PRUNE_EVERY_MS
            || self
                .cancels_pruned
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let before = now_ms - SHARED_CANCEL_KEY_LIFE.num_milliseconds();
        match shared_key_call(self.wicket.store.prune_cancel_keys(before)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "pruned cancel keys left by stopped sessions"),
            Err(e) => tracing::warn!(error = %e, "pruning cancel keys failed"),
        }
    }
}

/// A store call for shared cancel keys, within a bound: a slow store must
/// not hold up a session's start or end (the key then works only through
/// this wicketd, or is pruned later).
async fn shared_key_call<T>(
    call: impl std::future::Future<Output = crate::error::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the store did not answer within 2 s".into()),
    }
}

/// A startup parameter given more than once, if any.
fn duplicate_param(params: &[(String, String)]) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    params
        .iter()
        .find(|(k, _)| !seen.insert(k.as_str()))
        .map(|(k, _)| k.clone())
}

/// Reads server messages to the next ReadyForQuery. Returns whether the
/// one DataRow before it (if any) holds a single `t`: the answer of a
/// `SELECT` of one boolean. An ErrorResponse is an error.
async fn read_to_ready<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    let mut said = None;
    loop {
        while let Some((tag, len)) = protocol::read_message(buf, MAX_INSPECTED_BACKEND)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
        {
            match tag {
                b'E' => {
                    let (code, message) =
                        protocol::parse_error_response(&buf[..len]).unwrap_or_default();
                    return Err(std::io::Error::other(format!("{code} {message}")));
                }
                // One column: its length 1, then its byte.
                b'D' => said = Some(buf.get(5..len) == Some(&[0, 1, 0, 0, 0, 1, b't'][..])),
                _ => {}
            }
            buf.drain(..len);
            if tag == b'Z' {
                return Ok(said);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Settings PostgreSQL takes at startup that change the role statements
/// run as, while the session stays the database user's.
const IDENTITY_SETTINGS: [&str; 2] = ["role", "session_authorization"];

/// Sent upstream in every startup message: each session starts as its
/// database user, whatever role the database keeps for that user
/// (`ALTER ROLE app SET role = admin`, or per database). A setting from the
/// startup message outranks those, as it outranks postgresql.conf; the
/// client's own are refused ([`sets_identity`]). `SET ROLE` in a session is
/// a statement like any other, audited.
const AS_DATABASE_USER: (&str, &str) = ("role", "none");

/// Whether the startup parameters set a role: as a parameter of its own
/// (`role=admin`), or in `options` (`-c role=admin`, `--role=admin`,
/// `-crole=admin`), read as PostgreSQL reads them (`pg_split_opts`, then
/// its switches; setting names without regard to case, `-` for `_`).
/// Returns how, for the refusal.
fn sets_identity(params: &[(String, String)]) -> Option<String> {
    let identity = |name: &str| {
        let name = name.to_ascii_lowercase().replace('-', "_");
        IDENTITY_SETTINGS.contains(&name.as_str())
    };
    if let Some((k, _)) = params.iter().find(|(k, _)| identity(k)) {
        return Some(format!("parameter {k:?}"));
    }
    let options = params.iter().filter(|(k, _)| k == "options");
    for (_, given) in options {
        let args = split_options(given);
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let Some(switches) = arg.strip_prefix('-') else {
                continue;
            };
            // Grouped switches, as getopt reads them: those that take a
            // value take the rest of the argument, or the next one.
            for (i, c) in switches.char_indices() {
                if !"BcCDdfhkNprStvW-".contains(c) {
                    continue;
                }
                let rest = &switches[i + c.len_utf8()..];
                let value = if rest.is_empty() {
                    args.next().map(String::as_str).unwrap_or_default()
                } else {
                    rest
                };
                let setting = value.split('=').next().unwrap_or_default();
                if matches!(c, 'c' | '-') && identity(setting) {
                    return Some(format!("options {given:?}"));
                }
                break;
            }
        }
    }
    None
}

/// The `options` startup parameter split as PostgreSQL splits it: at
/// whitespace, a backslash keeping the next character.
fn split_options(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        // C's isspace, as PostgreSQL's pg_split_opts: with vertical tab,
        // which Rust's is_ascii_whitespace leaves out.
        if matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r') {
            args.extend(cur.take());
            continue;
        }
        let c = if c == '\\' {
            match chars.next() {
                Some(n) => n,
                None => break,
            }
        } else {
            c
        };
        cur.get_or_insert_with(String::new).push(c);
    }
    args.extend(cur);
    args
}

/// The host part of `host:port` / `[v6]:port`.
fn host_of(address: &str) -> String {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return sa.ip().to_string();
    }
    address
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(address)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Once the session is told to end: why.
fn told_to_end(signal: watch::Receiver<Signal>) -> impl std::future::Future<Output = String> {
    crate::sessions::after_grace(
        signal,
        |s| match s {
            Signal::End(why) => Some(why.clone()),
            _ => None,
        },
        Duration::ZERO,
    )
}

/// Tells the client its session was cut (the grant ended), and why.
async fn fatal_cut<W: AsyncWrite + Unpin>(w: &mut W, why: &str) {
    fatal(
        w,
        "57P01",
        &format!("wicket: {why}; this connection is closed"),
    )
    .await;
}

/// Sends a FATAL ErrorResponse and flushes (errors ignored: the connection
/// is being closed anyway).
async fn fatal<W: AsyncWrite + Unpin>(w: &mut W, code: &str, message: &str) {
    let _ = w
        .write_all(&protocol::error_response("FATAL", code, message))
        .await;
    let _ = w.flush().await;
}

/// Reads one startup-phase message; `Ok(None)` on a clean EOF.
async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Startup>, ProtocolError> {
    let mut tmp = [0u8; 1024];
    loop {
        if let Some((msg, len)) = protocol::read_startup(buf, MAX_STARTUP)? {
            buf.drain(..len);
            return Ok(Some(msg));
        }
        match r.read(&mut tmp).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// What one session has done, shared by its two relay directions.
struct SessionState {
    sref: Arc<SessionRef>,
    values: bool,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    statements: AtomicU64,
    dropped: AtomicU64,
}

impl SessionState {
    fn new(sref: Arc<SessionRef>, values: bool) -> Self {
        Self {
            sref,
            values,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            statements: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    async fn audit(&self, wicket: &Wicket, event: AuditEvent) {
        wicket
            .audit_sink
            .send(event, clock::now().timestamp_millis(), &self.dropped)
            .await;
    }

    async fn audit_error(&self, wicket: &Wicket, code: String, message: String) {
        self.audit(
            wicket,
            AuditEvent::DbError {
                session: self.sref.clone(),
                code,
                message,
            },
        )
        .await;
    }
}

/// Splits a byte stream into protocol messages without holding large
/// messages whole: messages the caller wants to read are returned whole,
/// the rest are passed through as they arrive.
#[derive(Debug, Default)]
struct Framer {
    /// Bytes of a passed-through message still to come.
    pass: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Forward this many bytes unread.
    Pass(usize),
    /// A whole message of this tag and total length is at the front.
    Whole(u8, usize),
    /// Need more bytes.
    More,
    /// The first bytes of a message of this tag that the caller reads whole
    /// but that is over the limit: forwarded unread.
    Oversized(u8, usize),
}

impl Framer {
    fn at_boundary(&self) -> bool {
        self.pass == 0
    }

    /// The next step over `buf`. Messages longer than `limit` are an error
    /// when `strict`, else passed through uninspected.
    fn next(
        &mut self,
        buf: &[u8],
        whole: impl Fn(u8) -> bool,
        limit: usize,
        strict: bool,
    ) -> Result<Next, ProtocolError> {
        if self.pass > 0 {
            let n = self.pass.min(buf.len());
            if n == 0 {
                return Ok(Next::More);
            }
            self.pass -= n;
            return Ok(Next::Pass(n));
        }
        if buf.len() < 5 {
            return Ok(Next::More);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len < 4 {
            return Err(ProtocolError(format!("invalid message length {len}")));
        }
        let total = len + 1;
        if strict && total > limit {
            return Err(ProtocolError(format!(
                "message of {total} bytes exceeds the {limit}-byte limit (postgres.max_message_bytes)"
            )));
        }
        if whole(tag) && total <= limit {
            return Ok(if buf.len() >= total {
                Next::Whole(tag, total)
            } else {
                Next::More
            });
        }
        let n = total.min(buf.len());
        self.pass = total - n;
        Ok(if whole(tag) {
            Next::Oversized(tag, n)
        } else {
            Next::Pass(n)
        })
    }
}

/// The longest part of an error's message audited from an ErrorResponse
/// too large to read whole.
const OVERSIZED_ERROR_KEPT: usize = 4096;

/// The SQLSTATE and the start of the message of an ErrorResponse over
/// [`MAX_INSPECTED_BACKEND`], from its first bytes (`prefix`, the tag and
/// length included; the rest is passed on unread). The code comes early
/// (PostgreSQL sends severity, code, then message), so it is nearly always
/// there; what is not is left empty.
fn oversized_error(prefix: &[u8]) -> (String, String) {
    let total = prefix.get(1..5).map_or(0, |l| {
        u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize + 1
    });
    let (code, message) = protocol::error_response_prefix(prefix);
    let kept: String = message.chars().take(OVERSIZED_ERROR_KEPT).collect();
    (
        code,
        format!("{kept}... (cut: the whole error is {total} bytes, over the {MAX_INSPECTED_BACKEND} the proxy reads)"),
    )
}

/// Frontend messages the proxy reads whole: all but COPY data, which is
/// passed on as it comes. So every message is checked
/// ([`protocol::parse_frontend`]), and none the tracker does not know of
/// reaches the server (a malformed Flush, refused by the server, once
/// set the tracker's idea of which answer is whose apart from it).
fn frontend_inspected(tag: u8) -> bool {
    tag != b'd'
}

/// Backend messages the proxy reads: errors, COPY starts, and the answers
/// that tell which statement each Execute ran (see [`super::track`]).
fn backend_inspected(tag: u8) -> bool {
    matches!(
        tag,
        b'E' | b'G'
            | b'H'
            | b'W'
            | b'1'
            | b'2'
            | b'3'
            | b'T'
            | b'n'
            | b'C'
            | b'I'
            | b's'
            | b'Z'
            | b'S'
            | b'V'
    )
}

/// Why a session cannot go on once the server reports this ParameterStatus:
/// a `client_encoding` in which the audited text could differ from what
/// runs ([`protocol::ascii_unsafe_encoding`]). At startup it is refused
/// before any statement; set during a session, the session ends at the
/// report, and its end names the encoding so that the record says which of
/// its statements (those of that exchange and any pipelined after it) were
/// read by the server in it.
fn encoding_refused(msg: &[u8]) -> Option<String> {
    match protocol::parse_parameter_status(msg) {
        Some(("client_encoding", enc)) if protocol::ascii_unsafe_encoding(enc) => Some(format!(
            "client_encoding {enc} is not allowed through wicket: its characters can contain \
             ASCII bytes, so the audited text could differ from what the server runs; use UTF8"
        )),
        _ => None,
    }
}

/// Why a session whose login ended as another user than `db_user` is
/// refused: it would run as that user, where the policy decided on, and
/// the audit names, `db_user`. PostgreSQL sets `session_authorization` at
/// login above what the database keeps (`ALTER ROLE x SET
/// session_authorization = y` does not apply: checked on PostgreSQL 15),
/// but what runs at login (a PostgreSQL 17 login event trigger) can change
/// it, and the startup message cannot set it (only superusers may). Bytes
/// are compared: a value not in UTF-8 is still checked.
fn runs_as_another(msg: &[u8], db_user: &str) -> Option<String> {
    let mut fields = msg.get(5..)?.split(|&b| b == 0);
    if fields.next()? != b"session_authorization" {
        return None;
    }
    let who = fields.next().unwrap_or_default();
    (who != db_user.as_bytes()).then(|| {
        format!(
            "the database reports the session's user as {:?}, not database user {db_user:?}; \
             sessions through wicket run only as the database user decided on",
            String::from_utf8_lossy(who)
        )
    })
}

/// Longest statement text a Query or Parse may carry: what is audited is
/// the whole text, so longer ones are refused (never sent), not cut — a cut
/// text could hide the statements after it. It also bounds what one
/// session's prepared statements and queued events hold.
const MAX_AUDIT_TEXT: usize = 64 * 1024;

/// The longest statement or portal name PostgreSQL tells apart from others
/// (`NAMEDATALEN - 1`).
const MAX_NAME: usize = 63;

/// Why a client message cannot be audited whole, if it cannot.
fn unauditable(f: &Frontend) -> Option<String> {
    let names: &[&String] = match f {
        Frontend::Parse { name, .. } | Frontend::Close { name, .. } => &[name],
        Frontend::Bind {
            portal, statement, ..
        } => &[portal, statement],
        Frontend::Execute { portal, .. } => &[portal],
        _ => &[],
    };
    // PostgreSQL tells statements and portals apart by their first 63
    // bytes (NAMEDATALEN - 1): two longer names that begin alike are one
    // object to it and two to the tracker, which would then audit one's
    // text for the other's execution.
    if let Some(long) = names.iter().find(|n| n.len() > MAX_NAME) {
        return Some(format!(
            "a prepared statement or portal name of {} bytes is longer than the {MAX_NAME} \
             bytes PostgreSQL tells names apart by; it was not sent",
            long.len()
        ));
    }
    let (what, text) = match f {
        Frontend::Query(q) => ("query", q),
        Frontend::Parse { query, .. } => ("statement to prepare", query),
        _ => return None,
    };
    if text.len() > MAX_AUDIT_TEXT {
        return Some(format!(
            "a {what} of {} bytes is longer than the {MAX_AUDIT_TEXT} bytes wicket audits whole; \
             it was not sent (split it, or send large data with COPY or as bound parameters)",
            text.len()
        ));
    }
    // In SJIS, BIG5, GBK and JOHAB a byte above 0x7f can start a character
    // whose second byte is `\`: the server would not see the backslash that
    // the audited (UTF-8) text shows, and an escaped quote could close a
    // string. A session can switch to such an encoding within one exchange,
    // before the server reports it, so this is refused in any encoding.
    let swallowed = text
        .as_bytes()
        .windows(2)
        .any(|w| w[0] > 0x7f && w[1] == b'\\');
    swallowed.then(|| {
        format!(
            "a {what} with a backslash right after a non-ASCII character was not sent: in some \
             client encodings the backslash is part of that character, so what runs could \
             differ from what wicket audits (put a space between them, or use a bound parameter)"
        )
    })
}

/// A parameter value's audited text, cut at [`MAX_AUDIT_TEXT`] with a
/// marker (statement text is never cut: longer statements are refused by
/// [`unauditable`] before they are sent or audited).
fn clip(mut s: String) -> String {
    if s.len() > MAX_AUDIT_TEXT {
        let mut end = MAX_AUDIT_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let total = s.len();
        s.truncate(end);
        s.push_str(&format!("... [{total} bytes, cut]"));
    }
    s
}

/// Most text of parameter values kept for one audit event (all values
/// together, each also counted at [`super::track::VALUE_COST`]); the values
/// past it are left out (the event counts them: [`not_recorded`]).
const MAX_AUDIT_VALUES: usize = 256 * 1024;

/// How many of `count` values recorded as `values` were left out.
fn not_recorded(count: usize, values: &Option<super::track::Values>) -> usize {
    values.as_ref().map_or(0, |v| count.saturating_sub(v.len()))
}

/// The audited texts of a Bind's or a function call's values: each clipped,
/// and together at most about [`MAX_AUDIT_VALUES`], so one event stays small
/// enough for the store, and the tracker holds little, whatever the client
/// sends (65,535 NULLs, say).
fn param_texts(values: &[Option<Vec<u8>>]) -> super::track::Values {
    let mut total = 0;
    let mut texts = Vec::with_capacity(values.len().min(1024));
    for v in values {
        if total >= MAX_AUDIT_VALUES {
            break;
        }
        let text = param_text(v);
        total += super::track::VALUE_COST + text.as_ref().map_or(0, String::len);
        texts.push(text);
    }
    texts.into()
}

fn param_text(v: &Option<Vec<u8>>) -> Option<String> {
    v.as_ref().map(|b| {
        clip(match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(_) => format!(
                "\\x{}",
                wicket_ca::hex(&b[..b.len().min(MAX_AUDIT_TEXT / 2)])
            ),
        })
    })
}

/// The statements of one session, shared by its two relay directions: the
/// client side records what it sends, the server side what was answered.
struct Tracking {
    tracker: Mutex<Tracker>,
    /// Wakes the client side when the server side drained a full tracker.
    drained: tokio::sync::Notify,
}

impl Tracking {
    fn new() -> Self {
        Self {
            tracker: Mutex::new(Tracker::new(MAX_TRACKED)),
            drained: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        lock(&self.tracker)
    }

    /// A server message `tag` (`msg`: the whole message, or empty when it
    /// is too large to inspect): the Execute it shows ran, if any, or why
    /// the session must end.
    fn answered(&self, tag: u8, msg: &[u8]) -> Result<Answered, String> {
        let status = if tag == b'Z' {
            msg.get(5).copied()
        } else {
            None
        };
        let mut t = self.lock();
        let mut ran = t
            .received(tag, status.unwrap_or(0))
            .map_err(|e| lost_track(&e))?;
        if tag == b'C' {
            t.completed(protocol::command_tag(msg), ran.as_mut());
        }
        // The statement a COPY that starts here runs: the Execute's, or
        // the Query's (not the last one sent: a client may pipeline more).
        let copy = match tag {
            b'G' | b'H' => Some(
                ran.as_ref()
                    .map(|e| e.statement.clone())
                    .or_else(|| t.answering_query())
                    .unwrap_or_else(|| "(a COPY wicket did not see begin)".into()),
            ),
            _ => None,
        };
        Ok(Answered {
            ran,
            skipped: t.take_skipped(),
            copy,
        })
    }
}

/// What a server message shows: the Execute it answered, if any, the
/// queries and function calls the server skipped (after an error), and
/// the statement of a COPY it starts.
struct Answered {
    ran: Option<Executed>,
    skipped: Vec<Arc<str>>,
    copy: Option<Arc<str>>,
}

/// The client side of a relay: what it reads from, what it has read and
/// not forwarded, and the audit events of what it forwarded, not queued
/// yet. Kept outside [`client_to_server`], which may be dropped mid-way.
struct ClientSide<'a, R> {
    rd: &'a mut R,
    buf: &'a mut Vec<u8>,
    unaudited: &'a mut VecDeque<(AuditEvent, i64)>,
}

async fn client_to_server<R, W>(
    side: ClientSide<'_, R>,
    wr: &mut W,
    max: usize,
    state: &SessionState,
    wicket: &Wicket,
    tracking: &Tracking,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ClientSide { rd, buf, unaudited } = side;
    let mut framer = Framer::default();
    let mut tmp = vec![0u8; READ_CHUNK];
    let mut terminated = false;
    let mut parsed = Vec::new();
    loop {
        let mut at = 0;
        let mut violation = None;
        // Full, yet read on because the last read ended inside a message
        // (see below): no further than that message's end.
        let full = tracking.lock().is_full();
        loop {
            if full && framer.at_boundary() && at > 0 {
                break;
            }
            match framer.next(&buf[at..], frontend_inspected, max, true) {
                Ok(Next::Pass(n)) => at += n,
                Ok(Next::Whole(_, len)) => {
                    match protocol::parse_frontend(&buf[at..at + len]) {
                        Ok(f) => {
                            if let Some(why) = unauditable(&f) {
                                violation = Some(why);
                                break;
                            }
                            terminated |= matches!(f, Frontend::Terminate);
                            parsed.push((f, None));
                        }
                        Err(e) => {
                            violation = Some(e.to_string());
                            break;
                        }
                    }
                    at += len;
                    // The server reads nothing after a Terminate: neither
                    // is anything after it forwarded or audited.
                    if terminated {
                        break;
                    }
                }
                Ok(Next::More) => break,
                Ok(Next::Oversized(..)) => {
                    violation = Some("oversized message".to_owned());
                    break;
                }
                Err(e) => {
                    violation = Some(e.to_string());
                    break;
                }
            }
        }
        // The tracker learns what is sent before the server can answer it.
        let skipped = {
            let mut t = tracking.lock();
            for (f, text) in parsed.iter_mut() {
                if let Some(sent) = tracked(f, state.values) {
                    // A query's text, kept by the tracker, is its audit
                    // record's too (one copy).
                    if let Sent::Query(q) = &sent {
                        *text = Some(q.clone());
                    }
                    if let Err(e) = t.sent(sent) {
                        return End::Protocol(lost_track(&e));
                    }
                }
            }
            t.take_skipped()
        };
        // The events of what is about to be sent, kept by the relay until
        // queued: should this side be dropped before that (the session
        // ended meanwhile), the relay queues the rest.
        let now_ms = clock::now().timestamp_millis();
        for (f, text) in parsed.drain(..) {
            if let Some(event) = frontend_event(f, text, state) {
                unaudited.push_back((event, now_ms));
            }
        }
        for statement in skipped {
            let event = AuditEvent::DbSkipped {
                session: state.sref.clone(),
                statement,
            };
            unaudited.push_back((event, now_ms));
        }
        // Forward first: auditing is off the query's path.
        if at > 0 {
            if let Err(e) = wr.write_all(&buf[..at]).await {
                return End::Io(e.to_string());
            }
            if let Err(e) = wr.flush().await {
                return End::Io(e.to_string());
            }
            buf.drain(..at);
        }
        wicket
            .audit_sink
            .send_pending(unaudited, &state.dropped)
            .await;
        if let Some(v) = violation {
            return End::Protocol(v);
        }
        if terminated {
            let _ = wr.shutdown().await;
            return End::ClientClosed;
        }
        // Too much unanswered: wait for the server before reading more. It
        // may hold its answers back until a Sync or Flush that the client
        // has sent but this side has not read: a Flush of our own (between
        // two messages; it has no answer, and COPY ignores it) makes the
        // server send them. Mid-message, the rest of it is read first.
        if tracking.lock().is_full() && framer.at_boundary() {
            if let Err(e) = wr.write_all(&FLUSH).await {
                return End::Io(e.to_string());
            }
            if let Err(e) = wr.flush().await {
                return End::Io(e.to_string());
            }
            while tracking.lock().is_full() {
                tracking.drained.notified().await;
            }
        }
        match rd.read(&mut tmp).await {
            Ok(0) => {
                let _ = wr.shutdown().await;
                return End::ClientClosed;
            }
            Ok(n) => {
                state.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                buf.extend_from_slice(&tmp[..n]);
            }
            Err(e) => return End::ClientBroke(e.to_string()),
        }
    }
}

/// A Flush message: the server sends what it holds; no answer of its own.
const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];

/// Why a session whose answers the tracker lost ends.
fn lost_track(e: &super::track::Desync) -> String {
    format!(
        "lost track of which statements the server runs ({e}); the connection is closed \
         so that none goes unaudited"
    )
}

/// What the tracker must know of a client message, if anything.
fn tracked(f: &Frontend, with_values: bool) -> Option<Sent> {
    Some(match f {
        Frontend::Query(q) => Sent::Query(q.as_str().into()),
        Frontend::Parse { name, query, .. } => Sent::Parse {
            name: name.clone(),
            text: query.clone(),
        },
        Frontend::Bind {
            portal,
            statement,
            params,
        } => Sent::Bind {
            portal: portal.clone(),
            statement: statement.clone(),
            params: params.len(),
            values: with_values.then(|| param_texts(params)),
        },
        Frontend::Execute { portal, .. } => Sent::Execute {
            portal: portal.clone(),
        },
        Frontend::Close { kind, name } => Sent::Close {
            statement: *kind == b'S',
            name: name.clone(),
        },
        Frontend::FunctionCall { oid, .. } => Sent::FunctionCall(function_call(*oid).into()),
        Frontend::CopyDone | Frontend::CopyFail(_) => Sent::CopyEnd,
        Frontend::Other(b'S') => Sent::Sync,
        Frontend::Other(b'D') => Sent::Describe,
        _ => return None,
    })
}

/// The audit event of what the client sent, if it has one: queries, Parse
/// and function calls, as sent (`text`: a query's text, as the tracker
/// holds it). (An Execute is audited when the server answers
/// it; see [`super::track`].)
fn frontend_event(f: Frontend, text: Option<Arc<str>>, state: &SessionState) -> Option<AuditEvent> {
    let session = state.sref.clone();
    Some(match f {
        Frontend::Query(q) => {
            let q: Arc<str> = text.unwrap_or_else(|| q.into());
            state.statements.fetch_add(1, Ordering::Relaxed);
            AuditEvent::DbQuery {
                session,
                statement: q,
            }
        }
        Frontend::Parse { name, query, .. } => AuditEvent::DbParse {
            session,
            name,
            statement: query,
        },
        Frontend::FunctionCall { oid, args } => {
            state.statements.fetch_add(1, Ordering::Relaxed);
            // A call carries no statement text: outside the large-object
            // calls libpq makes (their data is like bound values), what it
            // did is in its arguments (`set_config('role', ...)`, SQL for a
            // function that runs it), so those are always recorded.
            let values = (state.values || !LARGE_OBJECT_FUNCTIONS.contains(&oid))
                .then(|| param_texts(&args));
            AuditEvent::DbFunctionCall {
                session,
                function_oid: oid,
                args: args.len(),
                values_not_recorded: not_recorded(args.len(), &values),
                values,
            }
        }
        _ => return None,
    })
}

/// The OIDs of the large-object functions libpq calls with FunctionCall
/// (fixed in PostgreSQL's catalog): lo_create, lo_open, lo_close, loread,
/// lowrite, lo_lseek, lo_creat, lo_tell, lo_unlink, lo_truncate,
/// lo_lseek64, lo_tell64, lo_truncate64.
const LARGE_OBJECT_FUNCTIONS: [u32; 13] = [
    715, 952, 953, 954, 955, 956, 957, 958, 964, 1004, 3170, 3171, 3172,
];

/// How a FunctionCall is named where a statement's text would be.
fn function_call(oid: u32) -> String {
    format!("function call (OID {oid})")
}

async fn audit_skipped_one(statement: Arc<str>, state: &SessionState, wicket: &Wicket) {
    state
        .audit(
            wicket,
            AuditEvent::DbSkipped {
                session: state.sref.clone(),
                statement,
            },
        )
        .await;
}

/// Audits an Execute the server answered, with the statement it ran.
async fn audit_executed(e: Executed, state: &SessionState, wicket: &Wicket) {
    state.statements.fetch_add(1, Ordering::Relaxed);
    if e.not_as_bound {
        tracing::warn!(
            session = %state.sref.session_id,
            portal = %e.portal,
            completed = e.completed.as_deref().unwrap_or(""),
            "a portal ran another command than it was bound to (dynamic SQL in a function)"
        );
    }
    state
        .audit(
            wicket,
            AuditEvent::DbExecute {
                session: state.sref.clone(),
                portal: e.portal,
                statement: e.statement,
                params: e.params,
                values_not_recorded: not_recorded(e.params, &e.values),
                values: e.values,
                continued: e.continued,
                unanswered: !e.answered,
                completed: e.completed,
                not_as_bound: e.not_as_bound,
            },
        )
        .await;
}

/// The server side of a relay: its stream, what was read and not yet
/// passed on (`fed` bytes of it already given to the tracker), and the
/// answers not yet audited.
struct ServerSide<'a, R> {
    rd: &'a mut R,
    buf: &'a mut Vec<u8>,
    fed: &'a mut usize,
    framer: &'a mut Framer,
    answers: &'a mut Answers,
    /// Whether what the client has been sent ends at a message boundary:
    /// not while a write is under way, nor after part of a message.
    client_whole: &'a mut bool,
}

/// What a server message showed, to be audited, in order.
enum Answer {
    Executed(Executed),
    Skipped(Arc<str>),
    Error(String, String),
    /// A COPY began: its direction and statement.
    Copy(&'static str, Arc<str>),
}

type Answers = VecDeque<Answer>;

/// Audits `answers` in order, each taken off once it is queued for the
/// store: cancelled at any point, none is lost or audited twice.
async fn audit_answers(answers: &mut Answers, state: &SessionState, wicket: &Wicket) {
    while let Some(a) = answers.front() {
        match a {
            Answer::Executed(e) => audit_executed(e.clone(), state, wicket).await,
            Answer::Skipped(statement) => audit_skipped_one(statement.clone(), state, wicket).await,
            Answer::Error(code, message) => {
                state
                    .audit_error(wicket, code.clone(), message.clone())
                    .await
            }
            Answer::Copy(direction, statement) => {
                let statement = statement.clone();
                state
                    .audit(
                        wicket,
                        AuditEvent::DbCopy {
                            session: state.sref.clone(),
                            direction: (*direction).into(),
                            statement,
                        },
                    )
                    .await;
            }
        }
        answers.pop_front();
    }
}

/// How far [`feed_answers`] read, whether anything answered a client
/// message, and why the relay must stop, if it must.
struct Fed {
    at: usize,
    answered: bool,
    stop: Option<End>,
}

/// Feeds the whole server messages in `buf[start..]` to the tracker, and
/// what they show to `answers`; with `ending`, no further than the first
/// message boundary (where the goodbye can follow).
fn feed_answers(
    framer: &mut Framer,
    buf: &[u8],
    start: usize,
    tracking: &Tracking,
    answers: &mut Answers,
    ending: bool,
) -> Fed {
    let mut at = start;
    let mut answered = false;
    let stop = |at, answered, end| Fed {
        at,
        answered,
        stop: Some(end),
    };
    loop {
        match framer.next(&buf[at..], backend_inspected, MAX_INSPECTED_BACKEND, false) {
            Ok(Next::Pass(n)) => at += n,
            Ok(Next::Oversized(tag, n)) => {
                let Answered { ran, skipped, .. } = match tracking.answered(tag, &[]) {
                    Ok(a) => a,
                    Err(why) => return stop(at, answered, End::Protocol(why)),
                };
                answered = true;
                answers.extend(ran.map(Answer::Executed));
                if tag == b'E' {
                    let (code, message) = oversized_error(&buf[at..at + n]);
                    answers.push_back(Answer::Error(code, message));
                }
                answers.extend(skipped.into_iter().map(Answer::Skipped));
                at += n;
            }
            Ok(Next::Whole(tag, len)) => {
                let msg = &buf[at..at + len];
                let Answered { ran, skipped, copy } = match tracking.answered(tag, msg) {
                    Ok(a) => a,
                    Err(why) => return stop(at, answered, End::Protocol(why)),
                };
                answered = true;
                answers.extend(ran.map(Answer::Executed));
                match tag {
                    b'E' => {
                        // Lossy: a field in the client's encoding still
                        // leaves the error on the record.
                        let (code, message) = protocol::error_response_prefix(msg);
                        answers.push_back(Answer::Error(code, message));
                    }
                    b'S' => {
                        if let Some(why) = encoding_refused(msg) {
                            return stop(at + len, answered, End::Protocol(why));
                        }
                    }
                    b'G' | b'H' => {
                        let direction = if tag == b'G' { "in" } else { "out" };
                        if let Some(statement) = copy {
                            answers.push_back(Answer::Copy(direction, statement));
                        }
                    }
                    _ => {}
                }
                answers.extend(skipped.into_iter().map(Answer::Skipped));
                at += len;
            }
            Ok(Next::More) => break,
            Err(e) => return stop(at, answered, End::Io(format!("server: {e}"))),
        }
        if ending && framer.at_boundary() {
            break;
        }
    }
    Fed {
        at,
        answered,
        stop: None,
    }
}

async fn server_to_client<R, W>(
    side: ServerSide<'_, R>,
    wr: &mut W,
    state: &SessionState,
    wicket: &Wicket,
    signal: &mut watch::Receiver<Signal>,
    tracking: &Tracking,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ServerSide {
        rd,
        buf,
        fed,
        framer,
        answers,
        client_whole,
    } = side;
    let mut tmp = vec![0u8; READ_CHUNK];
    let mut ending: Option<String> = None;
    let mut warning: Option<String> = None;
    let mut signals = true;
    loop {
        // What the tracker reads is counted in `fed` at once (no await in
        // `feed_answers`), so a call after a dropped one goes on from there.
        let start = *fed;
        let Fed { at, answered, stop } =
            feed_answers(framer, buf, start, tracking, answers, ending.is_some());
        *fed = at;
        if let Some(end) = stop {
            return end;
        }
        state
            .bytes_out
            .fetch_add((at - start) as u64, Ordering::Relaxed);
        if answered && !tracking.lock().is_full() {
            tracking.drained.notify_one();
        }
        audit_answers(answers, state, wicket).await;
        if at > 0 {
            *client_whole = false;
            if wr.write_all(&buf[..at]).await.is_err() {
                return End::ClientClosed;
            }
            *client_whole = framer.at_boundary();
            buf.drain(..at);
            *fed = 0;
        }
        if framer.at_boundary() {
            if let Some(why) = ending.take() {
                return End::Cut(why);
            }
            if let Some(w) = warning.take() {
                *client_whole = false;
                let _ = wr
                    .write_all(&protocol::notice_response(
                        "WARNING",
                        "01000",
                        &format!("wicket: {w}"),
                    ))
                    .await;
                *client_whole = true;
            }
        }
        if wr.flush().await.is_err() {
            return End::ClientClosed;
        }
        tokio::select! {
            r = rd.read(&mut tmp) => match r {
                Ok(0) => return End::ServerClosed,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => return End::Io(e.to_string()),
            },
            changed = signal.changed(), if ending.is_none() && signals => {
                if changed.is_err() {
                    // The session's registry entry is gone: no more
                    // signals (and no spinning on a closed channel).
                    signals = false;
                    continue;
                }
                match signal.borrow_and_update().clone() {
                    // Ended at the next boundary; `hard_stop` drops the
                    // relay if it does not get there in time.
                    Signal::End(why) => ending = Some(why),
                    Signal::Warn(w) => warning = Some(w),
                    // A running connection may finish; new ones are refused
                    // by their own decision.
                    Signal::Run | Signal::Drain(_) => {}
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::protocol::message as msg;
    use super::*;

    #[test]
    fn framer_passes_large_messages_and_returns_wanted_ones_whole() {
        let mut stream = msg(b'D', &[7u8; 100]);
        stream.extend(msg(b'E', b"SERROR\0\0"));
        let mut f = Framer::default();
        let want = |t: u8| t == b'E';
        // The first 30 bytes: the DataRow starts passing through.
        assert_eq!(f.next(&stream[..30], want, 64, false), Ok(Next::Pass(30)));
        assert!(!f.at_boundary());
        assert_eq!(f.next(&stream[30..40], want, 64, false), Ok(Next::Pass(10)));
        assert_eq!(
            f.next(&stream[40..105], want, 64, false),
            Ok(Next::Pass(65))
        );
        assert!(f.at_boundary());
        assert_eq!(f.next(&stream[105..108], want, 64, false), Ok(Next::More));
        assert_eq!(
            f.next(&stream[105..], want, 64, false),
            Ok(Next::Whole(b'E', stream.len() - 105))
        );
    }

    #[test]
    fn answers_past_a_cut_are_still_read_for_the_record() {
        let tracking = Tracking::new();
        {
            let mut t = tracking.lock();
            for (portal, text) in [("p1", "DELETE FROM a"), ("p2", "DELETE FROM b")] {
                t.sent(Sent::Parse {
                    name: String::new(),
                    text: text.into(),
                })
                .unwrap();
                t.sent(Sent::Bind {
                    portal: portal.into(),
                    statement: String::new(),
                    params: 0,
                    values: None,
                })
                .unwrap();
                t.sent(Sent::Execute {
                    portal: portal.into(),
                })
                .unwrap();
            }
            t.sent(Sent::Sync).unwrap();
        }
        // One read holds both answers, and an error.
        let mut stream = Vec::new();
        for tag in ["DELETE 1", "DELETE 2"] {
            stream.extend(msg(b'1', b""));
            stream.extend(msg(b'2', b""));
            stream.extend(msg(b'C', format!("{tag}\0").as_bytes()));
        }
        stream.extend(msg(b'E', b"SERROR\0C57014\0Mcanceling statement\0\0"));
        stream.extend(msg(b'Z', b"I"));
        let mut framer = Framer::default();
        let mut answers = Answers::new();
        // Ending: the relay stops at the first boundary.
        let first = feed_answers(&mut framer, &stream, 0, &tracking, &mut answers, true);
        assert!(first.stop.is_none());
        assert_eq!(first.at, msg(b'1', b"").len());
        assert!(answers.is_empty());
        // What follows, read after the cut, still says what ran.
        let rest = feed_answers(
            &mut framer,
            &stream,
            first.at,
            &tracking,
            &mut answers,
            false,
        );
        assert!(rest.stop.is_none());
        assert_eq!(rest.at, stream.len());
        let ran: Vec<String> = answers
            .iter()
            .map(|a| match a {
                Answer::Executed(e) => format!("{} {}", e.statement, e.answered),
                Answer::Error(code, _) => code.clone(),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(ran, ["DELETE FROM a true", "DELETE FROM b true", "57014"]);
        assert!(tracking.lock().unanswered().is_empty());
    }

    #[test]
    fn an_oversized_error_keeps_its_code_and_the_start_of_its_message() {
        let mut body = b"SERROR\0VERROR\0C22P02\0Minvalid input: ".to_vec();
        body.extend(std::iter::repeat_n(b'x', 9000));
        let len = (body.len() + 4 + 2_000_000) as u32;
        let mut m = vec![b'E'];
        m.extend(len.to_be_bytes());
        m.extend(&body);
        let (code, message) = oversized_error(&m);
        assert_eq!(code, "22P02");
        assert!(message.starts_with("invalid input: xxx"), "{message}");
        assert!(message.contains(&format!("{} bytes", len + 1)), "{message}");
        assert!(message.len() < OVERSIZED_ERROR_KEPT + 200);
        // Cut inside the code: no code, no panic; any prefix is fine.
        for cut in 0..40 {
            let _ = oversized_error(&m[..cut]);
        }
        assert_eq!(oversized_error(&m[..20]).0, "");
    }

    #[test]
    fn framer_strict_limit_and_bad_lengths() {
        let mut f = Framer::default();
        let big = msg(b'Q', &[b'x'; 2000]);
        let e = f.next(&big, frontend_inspected, 1024, true).unwrap_err();
        assert!(e.0.contains("exceeds the 1024-byte limit"), "{e}");
        let e = f
            .next(&[b'Q', 0, 0, 0, 2, 0], frontend_inspected, 1024, true)
            .unwrap_err();
        assert!(e.0.contains("invalid message length"), "{e}");
    }

    #[test]
    fn repeated_startup_parameters_are_found() {
        let p = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            duplicate_param(&p(&[
                ("user", "app"),
                ("database", "ok"),
                ("database", "secret")
            ])),
            Some("database".into())
        );
        assert_eq!(
            duplicate_param(&p(&[("user", "app"), ("database", "ok")])),
            None
        );
    }

    #[test]
    fn audited_text_is_clipped_on_a_char_boundary() {
        let long = "é".repeat(MAX_AUDIT_TEXT);
        let c = clip(long.clone());
        assert!(c.len() < MAX_AUDIT_TEXT + 64, "{}", c.len());
        assert!(c.ends_with(&format!("[{} bytes, cut]", long.len())));
        assert_eq!(clip("select 1".into()), "select 1");
        let v = param_text(&Some(vec![0xff; 200_000])).unwrap();
        assert!(v.len() < MAX_AUDIT_TEXT + 64);
    }

    #[test]
    fn an_events_values_are_bounded_together() {
        // 300 values of 60 KiB: each under the per-value clip, 18 MB in all.
        let values: Vec<Option<Vec<u8>>> = (0..300)
            .map(|i| (i % 7 != 0).then(|| vec![b'a'; 60 * 1024]))
            .collect();
        let texts = param_texts(&values);
        // $1 (NULL) and five of 60 KiB reach the limit; the rest are left
        // out, and counted.
        assert_eq!(texts.len(), 6);
        assert_eq!(not_recorded(values.len(), &Some(texts.clone())), 294);
        let total: usize = texts.iter().flatten().map(String::len).sum();
        assert!(total < MAX_AUDIT_VALUES + 64 * 1024 + 100, "{total}");
        assert_eq!(texts[1].as_deref().map(str::len), Some(60 * 1024));
        // NULLs stay NULL.
        assert_eq!(texts[0], None);
        // 65,535 NULLs (what one Bind may carry) are not 65,535 entries:
        // each counts, as holding it costs.
        let texts = param_texts(&vec![None; 65_535]);
        assert!(texts.len() <= MAX_AUDIT_VALUES / super::super::track::VALUE_COST + 1);
        assert!(texts.iter().all(Option::is_none));
        assert_eq!(
            not_recorded(65_535, &Some(texts.clone())),
            65_535 - texts.len()
        );
        assert_eq!(not_recorded(3, &None), 0);
    }

    /// Every way the startup message can set the role is refused; other
    /// options, and names that only look alike, are not.
    #[test]
    fn startup_settings_of_the_role_are_found() {
        let p = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (k, v) in [
            ("role", "admin"),
            ("ROLE", "admin"),
            ("session_authorization", "postgres"),
            ("session-authorization", "postgres"),
            ("options", "-c role=admin"),
            ("options", "-crole=admin"),
            ("options", "--role=admin"),
            ("options", "-c ROLE=admin"),
            ("options", "-c search_path=x -c role=admin"),
            ("options", "-c\tsession-authorization=postgres"),
            ("options", "-c\x0brole=admin"),
            ("options", "-c\x0crole=admin"),
            ("options", "-c  ro\\le=admin"),
            ("options", "-Ec role=admin"),
            ("options", "-c session_authorization"),
        ] {
            let params = p(&[("user", "app"), (k, v)]);
            assert!(sets_identity(&params).is_some(), "{k}={v}");
        }
        for (k, v) in [
            ("application_name", "role"),
            ("options", "-c search_path=role"),
            ("options", "-c application_name=role=x"),
            ("options", "-c roles=x"),
            ("options", "-c\\ role=admin"),
            ("options", "-d 2 role=admin"),
            ("options", ""),
        ] {
            let params = p(&[("user", "app"), (k, v)]);
            assert_eq!(sets_identity(&params), None, "{k}={v}");
        }
        assert_eq!(
            split_options("-c a\\ b  --x=y\\"),
            vec!["-c", "a b", "--x=y"]
        );
    }

    #[test]
    fn a_login_as_another_user_is_found() {
        let status = |name: &str, value: &str| {
            let body = [name.as_bytes(), b"\0", value.as_bytes(), b"\0"].concat();
            [&[b'S'][..], &(body.len() as u32 + 4).to_be_bytes(), &body].concat()
        };
        let s = status("session_authorization", "readonly");
        let why = runs_as_another(&s, "app").unwrap();
        assert!(
            why.contains("user as \"readonly\", not database user \"app\""),
            "{why}"
        );
        // Not UTF-8 (a LATIN1 client_encoding): still told apart.
        let latin1 = [&b"S\0\0\0\x1fsession_authorization\0"[..], b"app\xe9\0"].concat();
        assert!(runs_as_another(&latin1, "app").is_some());
        assert_eq!(
            runs_as_another(&status("session_authorization", "app"), "app"),
            None
        );
        // Names are told apart by case, as PostgreSQL's are.
        assert!(runs_as_another(&status("session_authorization", "App"), "app").is_some());
        assert_eq!(
            runs_as_another(&status("application_name", "x"), "app"),
            None
        );
    }

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("127.0.0.1:5432"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5432"), "::1");
        assert_eq!(host_of("db.internal:5432"), "db.internal");
    }
}
