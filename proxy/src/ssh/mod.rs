//! The SSH proxy: terminates users' SSH connections (russh server), checks
//! the certificate and the live grant, and relays every channel to the node's
//! stock OpenSSH `sshd` (russh client), recording the session.
//!
//! **Routing.** Plain OpenSSH reaches a node through
//! `ProxyCommand wicket proxy ssh %r@%h:%p` (printed by `wicket config`).
//! `wicket proxy ssh` opens TCP to `listen.ssh`, sends one line
//! `WICKET-ROUTE 1 <host> <port>\n` naming the target, then becomes a byte
//! pipe. wicketd reads that line before the SSH version exchange, strips the
//! cluster suffix (`db-1.CLUSTER` → node `db-1`), and presents a host
//! certificate for `db-1.CLUSTER` and `db-1` signed by Wicket's proxy host
//! CA (not the nodes' host CA), so
//! the client's `@cert-authority` line verifies it with no prompt. A client
//! that connects without the line (`ssh -p 3022 root@db-1@proxy`) gets the
//! proxy's own host certificate and is routed by the `LOGIN@NODE` user name.
//!
//! **Upstream.** Per session wicketd makes a fresh Ed25519 key and issues a
//! user certificate for exactly the login, valid about one minute, whose key
//! ID names user, session and request IDs (so the node's auth log shows
//! which request let someone in). It verifies the node's host certificate
//! against Wicket's node host CA, or the host key pinned in the config.

mod api;
pub use api::RecordingData;
mod handler;
pub mod recording;
pub mod sftp;
mod upstream;

use crate::admission::{Admission, Grace};
use crate::error::{Error, Result};
use crate::service::Wicket;
use russh::keys::{Certificate, PrivateKey};
use russh::server;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use wicket_ca::{
    AuthorityKeys, SshCertKind, SshCertificateRequest, SshPermissions, SshPublicKey, TrustedSshCas,
    Validity,
};
use wicket_policy::{Resource, ResourceKind};

/// The line `wicket proxy ssh` sends before the SSH version exchange.
pub const ROUTE_PREFIX: &str = "WICKET-ROUTE 1 ";
const MAX_ROUTE_LINE: usize = 512;
const ROUTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Host certificates the proxy presents live a day and are renewed at half-life.
const PROXY_HOST_CERT_TTL: i64 = 24 * 3600;
/// Node host certificates issued by `wicketd nodes add` live a year.
pub const NODE_HOST_CERT_TTL: i64 = 365 * 24 * 3600;
/// Upstream user certificates live about a minute.
const UPSTREAM_CERT_TTL: i64 = 60;

/// A fresh Ed25519 key: the russh private key and its public key as the CA sees it.
pub(crate) fn new_ed25519(
    rng: &dyn ring::rand::SecureRandom,
) -> Result<(PrivateKey, SshPublicKey)> {
    let mut seed = [0u8; 32];
    rng.fill(&mut seed)
        .map_err(|_| Error::Internal("no randomness for a key".into()))?;
    let kp = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(kp);
    let blob = key
        .public_key()
        .to_bytes()
        .map_err(|e| Error::Internal(format!("encoding a public key: {e}")))?;
    Ok((key, SshPublicKey::from_blob(blob)?))
}

fn parse_cert(blob: &[u8]) -> Result<Certificate> {
    Certificate::from_bytes(blob)
        .map_err(|e| Error::Internal(format!("reading an issued certificate: {e}")))
}

/// What `wicketd nodes add` prints and writes for a node.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    /// `ssh-ed25519 AAAA... wicket-node-ca`: the node's `TrustedUserCAKeys`
    /// file (the node-login CA: only the proxy's upstream certificates).
    pub node_ca: String,
    /// The node's host certificate (`*-cert.pub`, one line).
    pub host_certificate: String,
    /// The host certificate's principals.
    pub principals: Vec<String>,
    pub valid_before: i64,
}

/// Issues a node's host certificate (principals: the node name and
/// `NAME.CLUSTER`) for its host public key, with Wicket's node-login CA line.
pub fn node_setup(
    keys: &AuthorityKeys,
    cluster: &str,
    name: &str,
    host_public_key: &str,
    now: i64,
) -> Result<NodeSetup> {
    let key = SshPublicKey::parse_openssh(host_public_key)
        .map_err(|e| Error::BadRequest(format!("host key: {e}")))?;
    let principals = vec![name.to_owned(), format!("{name}.{cluster}")];
    let rng = ring::rand::SystemRandom::new();
    let validity = Validity::new(now - 300, now + NODE_HOST_CERT_TTL)?;
    let cert = keys.ssh_host.issue_openssh(
        &SshCertificateRequest {
            public_key: &key,
            kind: SshCertKind::Host,
            key_id: &format!("node={name}"),
            principals: &principals,
            serial: wicket_ca::random_serial(&rng)?,
            validity,
            permissions: SshPermissions::default(),
            identity: None,
        },
        &rng,
    )?;
    Ok(NodeSetup {
        node_ca: keys.ssh_node.public_key_openssh("wicket-node-ca"),
        host_certificate: cert,
        principals,
        valid_before: validity.not_after,
    })
}

/// The SSH proxy's shared state.
pub struct SshProxy {
    pub(crate) wicket: Arc<Wicket>,
    host_key: PrivateKey,
    host_pub: SshPublicKey,
    pub(crate) trusted_users: TrustedSshCas,
    pub(crate) trusted_hosts: TrustedSshCas,
    configs: Mutex<HashMap<String, (i64, Arc<server::Config>)>>,
    pub(crate) client_config: Arc<russh::client::Config>,
    pub(crate) rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for SshProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshProxy")
            .field("host_key", &self.host_pub.fingerprint())
            .finish_non_exhaustive()
    }
}

/// Where a connection goes, from its route line.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The node, when one of that name exists.
    pub node: Option<Resource>,
    /// The node name asked for.
    pub node_name: String,
}

impl SshProxy {
    pub fn new(wicket: Arc<Wicket>) -> Result<Arc<Self>> {
        let rng = ring::rand::SystemRandom::new();
        let (host_key, host_pub) = new_ed25519(&rng)?;
        let keys = &wicket.keys;
        let trusted_users = TrustedSshCas::new([keys.ssh_user.public_key_raw()]);
        let trusted_hosts = TrustedSshCas::new([keys.ssh_host.public_key_raw()]);
        let mut cc = russh::client::Config {
            // Ask nodes for their host certificate.
            preferred: russh::Preferred {
                host_key_certificates: std::borrow::Cow::Owned(vec![
                    russh::keys::Algorithm::Ed25519,
                ]),
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_128_GCM,
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                    russh::cipher::AES_256_CTR,
                ]),
                ..Default::default()
            },
            nodelay: true,
            window_size: 4 * 1024 * 1024,
            channel_buffer_size: handler::CHANNEL_QUEUE,
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        cc.maximum_packet_size = 32768;
        Ok(Arc::new(Self {
            wicket,
            host_key,
            host_pub,
            trusted_users,
            trusted_hosts,
            configs: Mutex::new(HashMap::new()),
            client_config: Arc::new(cc),
            rng,
        }))
    }

    pub(crate) fn cluster(&self) -> &str {
        &self.wicket.config.cluster_name
    }

    /// Resolves a route line's host to a node.
    pub(crate) fn route(&self, host: &str) -> Route {
        let suffix = format!(".{}", self.cluster());
        let name = host
            .strip_suffix(suffix.as_str())
            .unwrap_or(host)
            .to_owned();
        let node = self
            .wicket
            .config
            .policy
            .resource(ResourceKind::Node, &name)
            .cloned();
        Route {
            node,
            node_name: name,
        }
    }

    /// The server config presenting a host certificate for `principals`
    /// (cached per name, renewed at half-life; `cache_key` `None`: made
    /// for this connection only, as for a name no node has, so that
    /// unauthenticated clients naming made-up hosts cannot churn the
    /// cache of real ones).
    fn server_config(
        &self,
        cache_key: Option<&str>,
        principals: &[String],
    ) -> Result<Arc<server::Config>> {
        let Some(cache_key) = cache_key else {
            return self.make_server_config("an unknown node", principals);
        };
        let now = crate::clock::now().timestamp();
        {
            let cache = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((renew_at, cfg)) = cache.get(cache_key) {
                if now < *renew_at {
                    return Ok(cfg.clone());
                }
            }
        }
        let cfg = self.make_server_config(cache_key, principals)?;
        let mut cache = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(
            cache_key.to_owned(),
            (now + PROXY_HOST_CERT_TTL / 2, cfg.clone()),
        );
        Ok(cfg)
    }

    /// A server config with a fresh host certificate for `principals`
    /// (`what`: for its key ID).
    fn make_server_config(&self, what: &str, principals: &[String]) -> Result<Arc<server::Config>> {
        let now = crate::clock::now().timestamp();
        let validity = Validity::new(now - 300, now + PROXY_HOST_CERT_TTL)?;
        let blob = self.wicket.keys.ssh_proxy.issue(
            &SshCertificateRequest {
                public_key: &self.host_pub,
                kind: SshCertKind::Host,
                key_id: &format!("wicket-proxy for {what}"),
                principals,
                serial: wicket_ca::random_serial(&self.rng)?,
                validity,
                permissions: SshPermissions::default(),
                identity: None,
            },
            &self.rng,
        )?;
        let cert = parse_cert(&blob)?;
        let mut methods = russh::MethodSet::empty();
        methods.push(russh::MethodKind::PublicKey);
        let cfg = Arc::new(server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-Wicket".into()),
            methods,
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![self.host_key.clone()],
            certificates: vec![cert],
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_max: 3,
            nodelay: true,
            // Writes to the user wait for the user's window first, so a
            // deep queue here is bounded by it and never blocks the relay.
            event_buffer_size: 256,
            channel_buffer_size: handler::CHANNEL_QUEUE,
            window_size: 4 * 1024 * 1024,
            max_auth_attempts: 6,
            preferred: russh::Preferred {
                // AES-GCM first: ring's, with AES-NI.
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_128_GCM,
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                    russh::cipher::AES_256_CTR,
                    russh::cipher::AES_192_CTR,
                    russh::cipher::AES_128_CTR,
                ]),
                ..Default::default()
            },
            ..Default::default()
        });
        Ok(cfg)
    }

    /// The host names the proxy answers to without a route line.
    fn own_names(&self) -> Vec<String> {
        let mut names = vec![self.cluster().to_owned(), "localhost".into()];
        if let Some(a) = self.wicket.config.listen.ssh {
            names.push(a.ip().to_string());
        }
        names.push(self.wicket.config.listen.api.ip().to_string());
        names.extend(self.wicket.config.public_names.iter().cloned());
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| !n.is_empty() && !n.contains([' ', ',', '\n']))
            .collect()
    }

    /// Issues the short-lived upstream certificate for one session.
    pub(crate) fn upstream_identity(
        &self,
        user: &str,
        login: &str,
        session_id: &str,
        request_ids: &[String],
        now: i64,
    ) -> Result<(PrivateKey, Certificate)> {
        let (key, public) = new_ed25519(&self.rng)?;
        let mut key_id = format!("user={user} session={session_id}");
        if !request_ids.is_empty() {
            key_id.push_str(&format!(" requests={}", request_ids.join(",")));
        }
        let blob = self.wicket.keys.ssh_node.issue(
            &SshCertificateRequest {
                public_key: &public,
                kind: SshCertKind::User,
                key_id: &key_id,
                principals: &[login.to_owned()],
                serial: wicket_ca::random_serial(&self.rng)?,
                validity: Validity::new(now - 30, now + UPSTREAM_CERT_TTL)?,
                permissions: SshPermissions {
                    pty: true,
                    port_forwarding: true,
                    agent_forwarding: true,
                    x11_forwarding: true,
                    user_rc: false,
                },
                identity: None,
            },
            &self.rng,
        )?;
        Ok((key, parse_cert(&blob)?))
    }
}

/// Reads the optional route line. Returns the route host (if any) and the
/// bytes read that belong to the SSH stream.
async fn read_route<R: tokio::io::AsyncRead + Unpin>(
    tcp: &mut R,
) -> std::io::Result<(Option<(String, u16)>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        let n = tcp.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the route line",
            ));
        }
        buf.push(byte[0]);
        // An SSH client speaks first with "SSH-": no route line.
        if buf.len() == 4 && buf == b"SSH-" {
            return Ok((None, buf));
        }
        if buf.len() <= 4
            && !ROUTE_PREFIX.as_bytes().starts_with(&buf)
            && !b"SSH-".starts_with(&buf)
        {
            return Err(std::io::Error::other("not an SSH client or a route line"));
        }
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&buf);
            let rest = line
                .trim_end()
                .strip_prefix(ROUTE_PREFIX)
                .ok_or_else(|| std::io::Error::other("malformed route line"))?;
            let mut parts = rest.split(' ');
            let host = parts.next().unwrap_or_default();
            let port = parts
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or(22);
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !valid || parts.next().is_some() {
                return Err(std::io::Error::other("malformed route line"));
            }
            return Ok((Some((host.to_owned(), port)), Vec::new()));
        }
        if buf.len() >= MAX_ROUTE_LINE {
            return Err(std::io::Error::other("route line too long"));
        }
    }
}

/// A TCP stream with a few bytes already read in front of it. Until the
/// connection has authenticated, reading fails once its login grace is
/// over: that ends the SSH session wherever it waits (version line, key
/// exchange, authentication).
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: TcpStream,
    grace: Grace,
    /// Resolves once the session was ended and the connection had its
    /// moment to close ([`handler::Cut::after_grace`]).
    cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Prefixed {
    /// The error every read and write gets once the login grace is over
    /// before authentication, or once the session was ended and the
    /// connection did not close in time (a client that stops reading stalls
    /// the session's writes, not its reads). Either way the russh session
    /// task fails and drops the socket.
    fn grace_over(&mut self, cx: &mut std::task::Context<'_>) -> Option<std::io::Error> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the session was ended and its client did not take the disconnect",
            ));
        }
        self.grace.expired(cx).then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no authentication within limits.login_grace",
            )
        })
    }
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(over) = this.grace_over(cx) {
            return std::task::Poll::Ready(Err(over));
        }
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(over) = self.grace_over(cx) {
            return std::task::Poll::Ready(Err(over));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(over) = self.grace_over(cx) {
            return std::task::Poll::Ready(Err(over));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Binds `listen.ssh`, if set.
pub async fn bind(config: &crate::config::Config) -> Result<Option<TcpListener>> {
    let Some(addr) = config.listen.ssh else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io(format!("cannot listen on {addr} (listen.ssh): {e}")))?;
    Ok(Some(listener))
}

/// Accepts SSH connections until shutdown.
pub async fn serve(listener: TcpListener, proxy: Arc<SshProxy>, shutdown: watch::Receiver<bool>) {
    let gate = crate::admission::Gate::new("ssh", proxy.wicket.config.limits);
    // Lines before the version are allowed (RFC 4253 4.2); OpenSSH shows
    // them with -v.
    let refusal = |why: &str| format!("wicket: {why}\r\n").into_bytes();
    crate::server::accept_until_shutdown(
        listener,
        shutdown,
        gate,
        refusal,
        move |tcp, peer, admitted| {
            let proxy = proxy.clone();
            async move {
                if let Err(e) = connection(proxy, tcp, peer, admitted).await {
                    tracing::debug!(%peer, error = %e, "SSH connection ended with an error");
                }
            }
        },
    )
    .await;
}

async fn connection(
    proxy: Arc<SshProxy>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admission,
) -> Result<()> {
    let deadline = admitted.deadline();
    let route_by = deadline.min(tokio::time::Instant::now() + ROUTE_TIMEOUT);
    let (route, prefix) = tokio::time::timeout_at(route_by, read_route(&mut tcp))
        .await
        .map_err(|_| Error::Io("no route line or SSH version in time".into()))??;
    let (config, route) = match route {
        Some((host, _port)) => {
            let route = proxy.route(&host);
            let cluster = proxy.cluster().to_owned();
            let principals = vec![
                format!("{}.{cluster}", route.node_name),
                route.node_name.clone(),
            ];
            // Cached for nodes the config names only.
            let key = format!("node:{}", route.node_name);
            let cache_key = route.node.is_some().then_some(key.as_str());
            (proxy.server_config(cache_key, &principals)?, Some(route))
        }
        None => {
            let names = proxy.own_names();
            (proxy.server_config(Some("proxy"), &names)?, None)
        }
    };
    let grace = admitted.grace();
    let conn = handler::Conn::new(proxy.clone(), peer, route, admitted);
    let finish = conn.finisher();
    let stream = Prefixed {
        prefix,
        at: 0,
        inner: tcp,
        grace,
        cut: Box::pin(finish.cut()),
    };
    let cut = finish.cut();
    let session = server::run_stream(config, stream, conn).await;
    let result = match session {
        Ok(running) => {
            finish.set_server(running.handle());
            // A session that was ended but whose client does not let the
            // connection close (it stopped reading) fails its socket (see
            // `Prefixed`); this finishes it even if russh is stuck elsewhere.
            tokio::select! {
                r = running => r,
                () = cut => Err(russh::Error::Disconnect),
            }
        }
        Err(e) => Err(e),
    };
    // A client that closes its socket without a goodbye (OpenSSH, at the
    // end of a command, often does) closed the connection.
    let error = match result {
        Ok(()) | Err(russh::Error::HUP) => None,
        Err(russh::Error::IO(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
        Err(e) => Some(e.to_string()),
    };
    finish.finish(error).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn route(input: &[u8]) -> std::io::Result<(Option<(String, u16)>, Vec<u8>)> {
        let mut r = input;
        read_route(&mut r).await
    }

    #[tokio::test]
    async fn route_lines_and_plain_ssh_clients() {
        let (r, rest) = route(b"WICKET-ROUTE 1 db-1.wicket 22\nSSH-2.0-x")
            .await
            .unwrap();
        assert_eq!(r, Some(("db-1.wicket".into(), 22)));
        assert!(rest.is_empty());
        let (r, rest) = route(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
        assert_eq!(r, None);
        assert_eq!(rest, b"SSH-");
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"WICKET-ROUTE 1 a b c\n",
            b"WICKET-ROUTE 1 ../x 22\n",
            b"WICKET-ROUTE 1 \n",
            b"WICKET-ROUTE 1 db-1",
        ] {
            assert!(
                route(bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("WICKET-ROUTE 1 {}\n", "a".repeat(600));
        assert!(route(long.as_bytes()).await.is_err());
    }
}
