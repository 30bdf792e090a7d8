//! Databases: `wicket db ls|connect`, `wicket proxy db NAME --tunnel`, and
//! `wicket play` for database sessions.
//!
//! The tunnel listens in plaintext and wraps every connection in TLS to
//! wicketd's PostgreSQL listener with the user's client certificate, adding
//! the database resource's name to the startup message. It serves only the
//! OS user who started it: `wicket db connect` listens on a Unix socket in a
//! directory only that user can enter (and checks each client's UID), and
//! `wicket proxy db --tunnel` on 127.0.0.1, where Linux names each client's
//! owner (see [`crate::peer`]), or with `--socket` as `db connect` does.
//! The certificate is read from the profile for each new connection (and the
//! TLS setup rebuilt when it changed), so after a new `wicket login` new
//! connections use the new certificate. Any PostgreSQL client works through
//! it unchanged.

use crate::cli::{authenticated_client, Format};
use crate::client::split_proxy;
use crate::profile::Profile;
use crate::term::printable;
use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use wicket_api::pg::{self, Startup, RESOURCE_PARAM};
use wicket_api::{DatabaseInfo, Resources};

const MAX_STARTUP: usize = 10_000;
/// How long reaching wicketd (TCP, SSLRequest, TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection waits for a login that is writing the
/// profile, and how often it looks.
const PROFILE_WAIT: (Duration, Duration) = (Duration::from_secs(10), Duration::from_millis(50));
/// How long a local client may take to send its startup message (as
/// PostgreSQL's `authentication_timeout` bounds its login).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a tunnel listens.
pub enum Listener {
    /// 127.0.0.1:PORT, and [::1]:PORT when it could be had (so that another
    /// local user cannot take it for clients that try `localhost` there
    /// first). Linux names each client's OS user; elsewhere every local
    /// user can connect.
    Tcp(TcpListener, Option<TcpListener>),
    /// A socket in a [`PrivateDir`]; each client's UID is checked too.
    #[cfg(unix)]
    Unix(tokio::net::UnixListener),
}

/// A new directory under the temporary directory that only this OS user
/// can enter, for the tunnel's Unix socket. Removed when dropped.
#[cfg(unix)]
pub struct PrivateDir {
    path: std::path::PathBuf,
}

#[cfg(unix)]
impl PrivateDir {
    /// The port in the socket's name (`.s.PGSQL.PORT`, as libpq looks for).
    pub const PORT: u16 = 5432;

    pub fn create() -> Result<Self> {
        use ring::rand::SecureRandom;
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let base = std::env::temp_dir();
        // Another user who may rename entries in `base` could swap the
        // directory for one of their own after the checks below: it must
        // be this user's or root's, and sticky if others may write in it.
        let parent = std::fs::metadata(&base)
            .with_context(|| format!("the temporary directory {}", base.display()))?;
        let owner = parent.uid();
        let sticky = parent.mode() & 0o1000 != 0;
        if (owner != 0 && owner != crate::peer::os_uid()) || (parent.mode() & 0o022 != 0 && !sticky)
        {
            bail!(
                "the temporary directory {} is writable by others and not sticky, or \
                 another user's: set TMPDIR to a directory of your own",
                base.display()
            );
        }
        let rng = ring::rand::SystemRandom::new();
        for _ in 0..8 {
            let mut tag = [0u8; 6];
            rng.fill(&mut tag)
                .map_err(|_| anyhow!("no randomness for a directory name"))?;
            let path = base.join(format!("wicket-db-{}", wicket_ca::hex(&tag)));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = Self { path };
                    let meta = std::fs::symlink_metadata(&dir.path)?;
                    if meta.uid() != crate::peer::os_uid() || meta.mode() & 0o077 != 0 {
                        bail!("{} is not private to you", dir.path.display());
                    }
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        bail!("cannot create a private directory in {}", base.display())
    }

    /// The directory (libpq's `host`).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A listener on the directory's socket.
    pub fn listen(&self) -> Result<Listener> {
        let socket = self.path.join(format!(".s.PGSQL.{}", Self::PORT));
        let listener = tokio::net::UnixListener::bind(&socket).with_context(|| {
            format!(
                "cannot listen on {} (a shorter TMPDIR may help)",
                socket.display()
            )
        })?;
        Ok(Listener::Unix(listener))
    }
}

#[cfg(unix)]
impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where a tunnel sends its connections.
pub struct Tunnel {
    resource: String,
    proxy_host: String,
    proxy_addr: String,
    profile: Profile,
    /// The TLS setup of the certificate file last seen (by mtime), with
    /// that certificate's profile (for its end).
    tls: Mutex<
        Option<(
            SystemTime,
            Arc<rustls::ClientConfig>,
            crate::profile::ProfileInfo,
        )>,
    >,
}

impl Tunnel {
    /// A tunnel to `resource` for the active profile.
    pub async fn for_resource(resource: &str) -> Result<(Arc<Self>, DatabaseInfo)> {
        let (p, info, client) = authenticated_client()?;
        let r: Resources = client.get("/v1/resources").await?;
        // The proxy decides; a database the roles do not reach yet is only
        // warned about, so the refusal (and its reason) comes from wicketd.
        let db = match r.databases.iter().find(|d| d.name == resource) {
            Some(d) => d.clone(),
            None => {
                eprintln!(
                    "wicket: warning: database {resource:?} is not reachable with your current roles; \
                     wicketd will refuse connections (request access with `wicket request create`)"
                );
                DatabaseInfo {
                    name: resource.to_owned(),
                    labels: Default::default(),
                    names: Vec::new(),
                    users: Vec::new(),
                }
            }
        };
        let port = r.proxies.postgres.ok_or_else(|| {
            anyhow!(
                "wicketd at {} has no PostgreSQL listener (listen.postgres)",
                info.proxy
            )
        })?;
        let host = split_proxy(&info.proxy)?;
        let proxy_addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok((
            Arc::new(Self {
                resource: resource.to_owned(),
                proxy_host: host,
                proxy_addr,
                profile: p,
                tls: Mutex::new(None),
            }),
            db,
        ))
    }

    /// The TLS client config from the profile's current certificate.
    async fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let cert_path = self.profile.tls_cert();
        let modified = std::fs::metadata(&cert_path)
            .and_then(|m| m.modified())
            .context("your TLS certificate is gone; run `wicket login`")?;
        {
            let cache = self.tls.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, cfg, info)) = cache.as_ref() {
                if *at == modified {
                    crate::profile::check_not_expired(info, crate::now())?;
                    return Ok(cfg.clone());
                }
            }
        }
        // The set read whole, under the profile's lock (a login may be
        // replacing it; not while holding the cache), and cached by the
        // certificate's time from then.
        let _lock = self.profile_read_lock().await?;
        let modified = std::fs::metadata(&cert_path)
            .and_then(|m| m.modified())
            .context("your TLS certificate is gone; run `wicket login`")?;
        let info = self.profile.read_info()?;
        crate::profile::check_not_expired(&info, crate::now())?;
        let pem = |path: std::path::PathBuf| {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let identity = crate::client::ClientIdentity {
            cert_pem: pem(cert_path.clone())?,
            key_pem: pem(self.profile.tls_key())?,
        };
        let verifier = crate::client::proxy_verifier(&pem(self.profile.ca_bundle())?)?;
        let cfg = Arc::new(crate::client::tls_config(verifier, Some(&identity))?);
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = Some((modified, cfg.clone(), info));
        Ok(cfg)
    }

    /// The profile's lock for reading, waited for in steps: never on the
    /// runtime's only thread, which relays every other connection, nor
    /// for good (a login stopped midway holds it).
    async fn profile_read_lock(&self) -> Result<Option<std::fs::File>> {
        let (wait, step) = PROFILE_WAIT;
        let by = tokio::time::Instant::now() + wait;
        loop {
            match self.profile.try_lock_for_reading() {
                Ok(lock) => return Ok(lock),
                Err(crate::profile::Busy) if tokio::time::Instant::now() < by => {
                    tokio::time::sleep(step).await;
                }
                Err(crate::profile::Busy) => bail!(
                    "a `wicket login` has been writing your profile for over {}s; \
                     try again once it is done",
                    wait.as_secs()
                ),
            }
        }
    }

    /// Serves connections from `listener` until the process ends (or the
    /// future is dropped). Only the OS user who started the tunnel may use
    /// it, where the OS says who connected.
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        match listener {
            Listener::Tcp(v4, v6) => {
                let v6 = async {
                    match v6 {
                        Some(v6) => self.clone().serve_tcp(v6).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::join!(self.clone().serve_tcp(v4), v6);
            }
            #[cfg(unix)]
            Listener::Unix(listener) => {
                let me = crate::peer::os_uid();
                loop {
                    let conn = match listener.accept().await {
                        Ok((conn, _)) => conn,
                        Err(e) => {
                            eprintln!("wicket: tunnel accept failed: {e}");
                            continue;
                        }
                    };
                    let owner = match conn.peer_cred() {
                        Ok(cred) => crate::peer::Peer::Uid(cred.uid()),
                        Err(_) => crate::peer::Peer::Unknown,
                    };
                    let why = refusal_of(me, owner, "the tunnel's socket");
                    self.admit(conn, why);
                }
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let me = crate::peer::my_uid();
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("wicket: tunnel accept failed: {e}");
                    continue;
                }
            };
            let why = refusal(me, &conn, peer);
            let _ = conn.set_nodelay(true);
            self.admit(conn, why);
        }
    }

    /// Refuses `conn` with a FATAL naming `why`, or serves it.
    fn admit<S>(self: &Arc<Self>, mut conn: S, why: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(why) = why {
            eprintln!("wicket: tunnel: {why}");
            let msg = pg::error_response("FATAL", "28000", &format!("wicket: {why}"));
            tokio::spawn(async move {
                let _ = conn.write_all(&msg).await;
                let _ = conn.shutdown().await;
            });
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.handle(conn).await {
                eprintln!("wicket: tunnel connection: {e:#}");
            }
        });
    }

    async fn handle<S>(&self, mut local: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = Vec::new();
        let Some(startup) =
            local_startup(&mut local, &mut buf, &self.resource, STARTUP_TIMEOUT).await?
        else {
            return Ok(());
        };
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "wicketd at {} did not answer within {}s",
                    self.proxy_addr,
                    CONNECT_TIMEOUT.as_secs()
                ))
            });
        let mut remote = match connected {
            Ok(r) => r,
            Err(e) => {
                let msg = pg::error_response("FATAL", "08006", &format!("wicket: {e:#}"));
                let _ = local.write_all(&msg).await;
                return Err(e);
            }
        };
        remote.write_all(&startup).await?;
        if !buf.is_empty() {
            remote.write_all(&buf).await?;
        }
        remote.flush().await?;
        let _ =
            tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, 64 * 1024, 64 * 1024)
                .await;
        Ok(())
    }

    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let cfg = self.tls_config().await?;
        let mut tcp = TcpStream::connect(&self.proxy_addr)
            .await
            .with_context(|| format!("cannot reach wicketd at {}", self.proxy_addr))?;
        let _ = tcp.set_nodelay(true);
        keep_alive(&tcp);
        tcp.write_all(&pg::ssl_request()).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            // An ErrorResponse (too many connections, say). It comes before
            // TLS, so anyone on the path could have written it: shown as
            // such, on one line, escaped and cut short.
            b'E' => {
                let why = read_refusal(&mut tcp).await.unwrap_or_default();
                let why =
                    printable(why.strip_prefix("wicket: ").unwrap_or(&why)).replace('\n', " ");
                let why: String = why.chars().take(300).collect();
                bail!(
                    "wicketd at {} refused the connection (before TLS, unverified): {why}",
                    self.proxy_addr,
                );
            }
            _ => bail!("wicketd at {} refused TLS", self.proxy_addr),
        }
        let name = ServerName::try_from(self.proxy_host.clone())
            .map_err(|_| anyhow!("{:?} is not a valid TLS server name", self.proxy_host))?;
        TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with wicketd at {}", self.proxy_addr))
    }
}

/// The message of the ErrorResponse whose tag was just read (`None` when
/// it is malformed or over 8 KiB).
async fn read_refusal(tcp: &mut TcpStream) -> Option<String> {
    let mut len = [0u8; 4];
    tcp.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if !(4..=8192).contains(&len) {
        return None;
    }
    let mut msg = vec![0u8; 1 + len];
    msg[0] = b'E';
    msg[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    tcp.read_exact(&mut msg[5..]).await.ok()?;
    pg::parse_error_response(&msg).map(|(_, message)| message)
}

/// Why a local connection may not use the tunnel of the OS user `me`
/// (`None` where the OS cannot be asked: not Linux). Fails closed: a
/// connection whose owner the kernel does not tell is refused, and so is the
/// overflow UID (65534), which stands for every user a user namespace does
/// not map.
fn refusal(me: Option<u32>, conn: &TcpStream, peer: std::net::SocketAddr) -> Option<String> {
    let me = me?;
    let owner = match conn.local_addr() {
        Ok(local) => crate::peer::peer_of(peer, local),
        Err(_) => crate::peer::Peer::Unlisted,
    };
    refusal_of(me, owner, &peer.to_string())
}

/// [`refusal`] once the kernel answered who owns the client socket.
fn refusal_of(me: u32, owner: crate::peer::Peer, peer: &str) -> Option<String> {
    use crate::peer::Peer;
    const OVERFLOW_UID: u32 = 65534;
    match owner {
        Peer::Uid(OVERFLOW_UID) => Some(format!(
            "refused a connection from uid {OVERFLOW_UID}, which also stands for users \
             unmapped in a user namespace"
        )),
        Peer::Uid(uid) if uid == me => None,
        Peer::Uid(uid) => Some(format!(
            "this tunnel serves only the OS user who started it (uid {me}); \
             refused a connection from uid {uid}"
        )),
        Peer::Unlisted => Some(format!(
            "cannot tell which OS user connected from {peer}; refused"
        )),
        Peer::Unknown => Some(format!(
            "the kernel did not say which OS user connected from {peer} \
             (sock_diag netlink unavailable?); refused"
        )),
    }
}

/// What to send wicketd for a local client: its startup message naming
/// `resource`, or its cancel request (SSL and GSSENC requests answered "N"
/// on the way: the local leg is plaintext on loopback, TLS starts at the
/// tunnel); `None` when it closed first. A client that sends none of that
/// within `within` gets a FATAL saying so: it holds nothing for good.
async fn local_startup<S: AsyncRead + AsyncWrite + Unpin>(
    local: &mut S,
    buf: &mut Vec<u8>,
    resource: &str,
    within: Duration,
) -> Result<Option<Vec<u8>>> {
    let read = async {
        loop {
            let Some(msg) = read_startup(local, buf).await? else {
                return Ok(None);
            };
            match msg {
                Startup::SslRequest | Startup::GssEncRequest => local.write_all(b"N").await?,
                Startup::Startup { mut params, minor } => {
                    // A newer protocol (3.2, options) is negotiated down to
                    // 3.0 here, as wicketd and PostgreSQL would.
                    if let Some(v) = pg::negotiate(minor, &mut params) {
                        local.write_all(&v).await?;
                    }
                    params.retain(|(k, _)| k != RESOURCE_PARAM);
                    params.push((RESOURCE_PARAM.to_owned(), resource.to_owned()));
                    let p: Vec<(&str, &str)> = params
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    return Ok(Some(pg::startup_message(&p)));
                }
                Startup::Cancel { pid, secret } => {
                    return Ok(Some(pg::cancel_request(pid, secret).to_vec()));
                }
            }
        }
    };
    match tokio::time::timeout(within, read).await {
        Ok(r) => r,
        Err(_) => {
            let why = format!("no startup message within {}s", within.as_secs_f32());
            let msg = pg::error_response("FATAL", "08P01", &format!("wicket: {why}"));
            let _ = tokio::time::timeout(Duration::from_secs(1), local.write_all(&msg)).await;
            bail!("{why}")
        }
    }
}

async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Startup>> {
    let mut tmp = [0u8; 1024];
    loop {
        if let Some((msg, len)) = pg::read_startup(buf, MAX_STARTUP).map_err(|e| anyhow!("{e}"))? {
            buf.drain(..len);
            return Ok(Some(msg));
        }
        let n = r.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// `wicket db ls`.
pub async fn ls(format: Format) -> Result<()> {
    let (_, _, client) = authenticated_client()?;
    let r: Resources = client.get("/v1/resources").await?;
    match format {
        Format::Json => crate::out::json(&r.databases)?,
        Format::Text => {
            outln!("{:<20} {:<24} {:<24} DATABASES", "NAME", "LABELS", "USERS");
            for d in &r.databases {
                let labels: Vec<String> =
                    d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                outln!(
                    "{:<20} {:<24} {:<24} {}",
                    d.name,
                    labels.join(","),
                    d.users.join(","),
                    d.names.join(",")
                );
            }
            if r.databases.is_empty() {
                outln!("(no database reachable with your current roles)");
            }
        }
    }
    Ok(())
}

/// The database user to use: the one given, or the only one allowed.
fn pick_user(db: &DatabaseInfo, given: Option<String>) -> Result<String> {
    if let Some(u) = given {
        return Ok(u);
    }
    let concrete: Vec<&String> = db.users.iter().filter(|u| *u != "*").collect();
    match concrete.as_slice() {
        [one] => Ok((*one).clone()),
        _ => bail!(
            "choose a database user with --db-user (allowed on {}: {})",
            db.name,
            db.users.join(", ")
        ),
    }
}

/// `wicket db connect NAME`: psql through a tunnel on an ephemeral port.
pub async fn connect(
    resource: &str,
    db_user: Option<String>,
    db_name: Option<String>,
    psql_args: Vec<String>,
) -> Result<()> {
    let (tunnel, db) = Tunnel::for_resource(resource).await?;
    let user = pick_user(&db, db_user)?;
    let name = db_name.unwrap_or_else(|| {
        let concrete: Vec<&String> = db.names.iter().filter(|n| *n != "*").collect();
        match concrete.as_slice() {
            [one] => (*one).clone(),
            _ => user.clone(),
        }
    });
    // psql handles Ctrl-C itself (it cancels the running statement through
    // the tunnel), and the terminal sends it to this process too: it must
    // not end the tunnel. SIGTERM and SIGHUP end both.
    #[cfg(unix)]
    let mut signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupts = signal(SignalKind::interrupt())?;
        tokio::spawn(async move { while interrupts.recv().await.is_some() {} });
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        )
    };
    #[cfg(unix)]
    let (dir, listener) = {
        let dir = PrivateDir::create()?;
        let listener = dir.listen()?;
        (dir, listener)
    };
    #[cfg(unix)]
    let (host, port) = (dir.path().display().to_string(), PrivateDir::PORT);
    #[cfg(not(unix))]
    let (listener, host, port) = {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        (Listener::Tcp(listener, None), "127.0.0.1".to_owned(), port)
    };
    tokio::spawn(tunnel.serve(listener));
    let conninfo = format!(
        "host={} port={port} user={} dbname={} sslmode=disable application_name=wicket",
        conninfo_value(&host),
        conninfo_value(&user),
        conninfo_value(&name)
    );
    let mut cmd = tokio::process::Command::new(
        std::env::var("WICKET_PSQL").unwrap_or_else(|_| "psql".into()),
    );
    cmd.arg(conninfo).args(psql_args).kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .context("starting psql (is the PostgreSQL client installed?)")?;
    #[cfg(unix)]
    let status = {
        use rustix::process::Signal;
        let stop = tokio::select! {
            status = child.wait() => Ok(status?),
            _ = signals.0.recv() => Err((Signal::TERM, 15)),
            _ = signals.1.recv() => Err((Signal::HUP, 1)),
        };
        match stop {
            Ok(status) => status,
            Err((signal, number)) => {
                // Passed on to psql, which puts the terminal back; killed
                // if it has not ended in a moment.
                let pid = child.id().and_then(|p| i32::try_from(p).ok());
                if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process(pid, signal);
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                drop(child);
                drop(dir);
                std::process::exit(128 + number);
            }
        }
    };
    #[cfg(not(unix))]
    let status = child.wait().await?;
    #[cfg(unix)]
    drop(dir);
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// [::1]:`port` too, where IPv6 is on: clients told `localhost` often try
/// it first, and another local user listening there would get their
/// connections (and whatever they send). Taken by someone else: a warning.
async fn loopback_v6(port: u16) -> Option<TcpListener> {
    match TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).await {
        Ok(l) => Some(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!(
                "wicket: warning: another process listens on [::1]:{port}: a client told \
                 `localhost` may reach it instead of this tunnel; connect to 127.0.0.1"
            );
            None
        }
        // No IPv6 loopback here: nobody can listen there either.
        Err(_) => None,
    }
}

/// Quotes a libpq conninfo value.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The database user for the tunnel's `psql "..."` hint, which is pasted
/// into a shell: a name from the server as it is when nothing in it means
/// anything to the shell or libpq, else `USER` to fill in.
fn hint_user(name: Option<&str>) -> &str {
    let plain = |n: &&str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
    };
    name.filter(plain).unwrap_or("USER")
}

/// `wicket proxy db NAME --tunnel [--port P]`.
pub async fn proxy(resource: &str, port: u16, socket: bool, format: Format) -> Result<()> {
    let (tunnel, db) = Tunnel::for_resource(resource).await?;
    let user = hint_user(db.users.first().map(String::as_str));
    #[cfg(unix)]
    let mut dir = None;
    let listener = if socket {
        #[cfg(unix)]
        {
            let made = PrivateDir::create()?;
            let listener = made.listen()?;
            let host = made.path().display().to_string();
            dir = Some(made);
            let port = PrivateDir::PORT;
            let shown = match format {
                Format::Json => format!(
                    "{}\n",
                    serde_json::json!({ "database": resource, "socket_dir": host, "port": port })
                ),
                Format::Text => format!(
                    "Tunnel for database {resource} listening in {host} (port {port})\n  \
                     psql \"host={} port={port} user={user} dbname=NAME sslmode=disable\"\n",
                    conninfo_value(&host)
                ),
            };
            // Written here, not with `outln!` (which ends the process on a
            // closed pipe): the directory must be removed on the way out.
            {
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                if let Err(e) = stdout
                    .write_all(shown.as_bytes())
                    .and_then(|()| stdout.flush())
                {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(e.into());
                }
            }
            listener
        }
        #[cfg(not(unix))]
        bail!("--socket needs a Unix system")
    } else {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        let addr = listener.local_addr()?;
        let v6 = loopback_v6(addr.port()).await;
        match format {
            Format::Json => crate::out::json_line(&serde_json::json!({
                "database": resource,
                "listen": addr.to_string(),
                "listen_v6": v6.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()),
            })),
            Format::Text => {
                outln!("Tunnel for database {resource} listening on {addr}");
                outln!(
                    "  psql \"host=127.0.0.1 port={} user={user} dbname=NAME sslmode=disable\"",
                    addr.port(),
                );
            }
        }
        if crate::peer::my_uid().is_none() {
            eprintln!(
                "wicket: warning: on this system the tunnel cannot tell which OS user \
                 connects to 127.0.0.1:{}, so every local user can use your access; \
                 --socket listens where only you can connect",
                addr.port()
            );
        }
        Listener::Tcp(listener, v6)
    };
    crate::out::flush();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::select! {
            _ = tunnel.serve(listener) => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            _ = hup.recv() => {},
        }
        drop(dir);
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tunnel.serve(listener) => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    Ok(())
}

/// The values an execute or function call event carries, as shown after
/// its count (`: ["41",null]`), and how many were over what one event
/// records.
fn values_shown(d: &serde_json::Value) -> String {
    let Some(values) = d.get("values") else {
        return String::new();
    };
    match d["values_not_recorded"].as_u64() {
        Some(n) if n > 0 => format!(": {values} and {n} more, not recorded"),
        _ => format!(": {values}"),
    }
}

/// The line shown for a database session's event (`None`: a kind not
/// shown).
fn event_text(e: &wicket_api::AuditEventView) -> Option<String> {
    let d = &e.data;
    let text = match e.kind.as_str() {
        "session_started" => format!(
            "-- session {} by {} on {} as {} (database {}), requests [{}]{}",
            d["session_id"].as_str().unwrap_or(""),
            d["user"].as_str().unwrap_or(""),
            d["resource"].as_str().unwrap_or(""),
            d["login"].as_str().unwrap_or(""),
            d["database"].as_str().unwrap_or(""),
            d["request_ids"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            d["parameters"]
                .as_object()
                .map(|p| format!(", parameters {}", serde_json::Value::Object(p.clone())))
                .unwrap_or_default()
        ),
        "db_query" => d["statement"].as_str().unwrap_or("").to_owned(),
        "db_parse" => format!(
            "-- parse {}: {}",
            d["name"].as_str().unwrap_or(""),
            d["statement"].as_str().unwrap_or("")
        ),
        "db_execute" => format!(
            "{} -- execute ({} parameters{}){}{}{}",
            d["statement"].as_str().unwrap_or(""),
            d["params"],
            values_shown(d),
            if d["continued"] == true {
                " -- continued: more rows of the portal executed before"
            } else {
                ""
            },
            d.get("completed")
                .and_then(|v| v.as_str())
                .map(|t| format!(": {t}"))
                .unwrap_or_default(),
            if d["not_as_bound"] == true {
                " -- NOT the statement bound: dynamic SQL changed the portal; \
                 see the queries before"
            } else if d["unanswered"] == true {
                " -- unanswered: the connection ended first; it may have run"
            } else {
                ""
            }
        ),
        "db_function_call" => format!(
            "-- function call: OID {} ({} arguments{})",
            d["function_oid"],
            d["args"],
            values_shown(d)
        ),
        "db_copy" => format!(
            "-- copy {}: {}",
            d["direction"].as_str().unwrap_or(""),
            d["statement"].as_str().unwrap_or("")
        ),
        "db_skipped" => format!(
            "-- skipped by the server (an earlier error, until Sync): {}",
            d["statement"].as_str().unwrap_or("")
        ),
        "db_error" => format!(
            "-- error {}: {}",
            d["code"].as_str().unwrap_or(""),
            d["message"].as_str().unwrap_or("")
        ),
        "session_ended" => format!(
            "-- session ended: {} ({} statements, {} bytes in, {} bytes out)",
            d["reason"].as_str().unwrap_or(""),
            d["statements"],
            d["bytes_from_client"],
            d["bytes_to_client"]
        ),
        _ => return None,
    };
    Some(text)
}

/// Prints a database session's statements with their timing as its events
/// come (oldest first, a page at a time): a page of events is held, not
/// the session. `--format json` writes one array, printed once the last
/// page is read ([`crate::out::JsonArray`]): a read that fails midway
/// prints none of it, where text shows what came before the error.
pub struct DbPrinter {
    format: Format,
    speed: f64,
    realtime: bool,
    /// The first event's time: offsets count from it.
    start: Option<chrono::DateTime<chrono::Utc>>,
    /// The offset of the last line shown (for real-time pauses).
    last: f64,
    json: crate::out::JsonArray,
}

impl DbPrinter {
    pub fn new(format: Format, speed: f64, realtime: bool) -> Self {
        Self {
            format,
            speed,
            realtime,
            start: None,
            last: 0.0,
            json: Default::default(),
        }
    }

    /// Whether no event came yet.
    pub fn is_empty(&self) -> bool {
        self.start.is_none()
    }

    /// Shows `e`, the next event of the session.
    pub fn take(&mut self, e: &wicket_api::AuditEventView) -> Result<()> {
        let start = *self.start.get_or_insert(e.time);
        let Some(text) = event_text(e) else {
            return Ok(());
        };
        let offset = (e.time - start).num_milliseconds() as f64 / 1000.0;
        match self.format {
            Format::Json => {
                let row = serde_json::json!({
                    "offset_secs": offset,
                    "time": e.time,
                    "kind": e.kind,
                    "text": text,
                    "data": e.data,
                });
                self.json.push(&row)?;
            }
            Format::Text => {
                if self.realtime && offset > self.last {
                    std::thread::sleep(std::time::Duration::from_secs_f64(
                        ((offset - self.last) / self.speed).min(60.0),
                    ));
                }
                self.last = offset;
                outln!("{}", statement_line(offset, &printable(&text)));
            }
        }
        Ok(())
    }

    /// Ends what was printed (prints the JSON array).
    pub fn finish(self) -> Result<()> {
        match self.format {
            Format::Json => self.json.finish(),
            Format::Text => Ok(()),
        }
    }
}

/// TCP keepalive on a connection to wicketd (a minute of quiet, then a
/// probe every 10 s, 6 unanswered): a wicketd gone without a word (its
/// host down, a NAT that forgot the flow) ends the tunnelled connection,
/// and the client sees it, where it would otherwise wait for good.
fn keep_alive(tcp: &TcpStream) {
    let params = socket2::TcpKeepalive::new().with_time(std::time::Duration::from_secs(60));
    #[cfg(target_os = "linux")]
    let params = params
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&params);
}

/// One event of a database session's replay: its offset, then its text,
/// whose later lines are indented past the offset, so that a statement
/// holding a line such as `[    9.000s] -- session ended` cannot pass for
/// an event of its own.
fn statement_line(offset: f64, text: &str) -> String {
    const INDENT: &str = "             ";
    format!(
        "[{offset:>9.3}s] {}",
        text.replace('\n', &format!("\n{INDENT}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_hint_names_a_user_only_when_it_is_plain() {
        assert_eq!(hint_user(Some("app")), "app");
        assert_eq!(hint_user(Some("svc.reader@corp")), "svc.reader@corp");
        for odd in [
            "app$ro",
            "a\\b",
            "$(id)",
            "a b",
            "x\"",
            "\u{1b}]52;c;x\u{7}",
            "",
        ] {
            assert_eq!(hint_user(Some(odd)), "USER", "{odd:?}");
        }
        assert_eq!(hint_user(None), "USER");
    }

    #[test]
    fn a_statement_line_cannot_pass_for_another_event() {
        assert_eq!(statement_line(1.5, "SELECT 1"), "[    1.500s] SELECT 1");
        let forged = "DROP TABLE t; --\n[    9.000s] -- session ended: client closed\nSELECT 2";
        let shown = statement_line(2.0, forged);
        assert_eq!(
            shown,
            "[    2.000s] DROP TABLE t; --\n             [    9.000s] -- session ended: client closed\n             SELECT 2"
        );
        // Only the first line starts with an offset.
        assert_eq!(shown.lines().filter(|l| l.starts_with('[')).count(), 1);
    }

    #[test]
    fn the_tunnel_serves_its_owner_and_refuses_what_it_cannot_tell() {
        use crate::peer::Peer;
        let from = "127.0.0.1:40000";
        assert_eq!(refusal_of(1000, Peer::Uid(1000), from), None);
        for (owner, says) in [
            (Peer::Uid(1001), "refused a connection from uid 1001"),
            (Peer::Uid(65534), "unmapped in a user namespace"),
            (Peer::Unlisted, "cannot tell which OS user"),
            (Peer::Unknown, "the kernel did not say"),
        ] {
            let why = refusal_of(1000, owner, from).unwrap();
            assert!(why.contains(says), "{why}");
        }
        // The overflow UID is refused even to a tunnel running as it.
        assert!(refusal_of(65534, Peer::Uid(65534), from).is_some());
    }

    #[tokio::test]
    async fn a_local_client_that_sends_no_startup_message_is_let_go() {
        let within = Duration::from_millis(200);
        // Nothing at all, then half a startup message: each is told, and
        // let go.
        for sent in [&b""[..], &pg::startup_message(&[("user", "app")])[..6]] {
            let (mut client, mut local) = tokio::io::duplex(4096);
            client.write_all(sent).await.unwrap();
            let mut buf = Vec::new();
            let got = local_startup(&mut local, &mut buf, "prod-pg", within);
            let got = tokio::time::timeout(Duration::from_secs(10), got).await;
            let e = got.expect("let go").unwrap_err().to_string();
            assert!(e.contains("no startup message within 0.2s"), "{e}");
            drop(local);
            let mut told = Vec::new();
            client.read_to_end(&mut told).await.unwrap();
            let (code, message) = pg::parse_error_response(&told).unwrap();
            assert_eq!(code, "08P01");
            assert!(message.contains("no startup message"), "{message}");
        }
        // An SSL request, then the startup message: answered "N", and the
        // startup message goes on naming the resource.
        let (mut client, mut local) = tokio::io::duplex(4096);
        client.write_all(&pg::ssl_request()).await.unwrap();
        client
            .write_all(&pg::startup_message(&[("user", "app")]))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let got = local_startup(&mut local, &mut buf, "prod-pg", within)
            .await
            .unwrap()
            .unwrap();
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        let expected = pg::startup_message(&[("user", "app"), (RESOURCE_PARAM, "prod-pg")]);
        assert_eq!(got, expected);
    }

    #[test]
    fn replayed_text_cannot_carry_terminal_escapes() {
        assert_eq!(printable("select 1;\n\tselect 2"), "select 1;\n\tselect 2");
        let p = printable("select '\u{1b}[2Jcleared'");
        assert!(!p.contains('\u{1b}'), "{p}");
        assert!(p.contains("\\u{1b}[2J"), "{p}");
    }
}
