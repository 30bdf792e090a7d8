//! Starting wicketd: load or generate the CAs, open the store, bind the API,
//! PostgreSQL and SSH listeners, start the background tasks, and serve until
//! shutdown.

use crate::admission::{Admission, Gate};
use crate::api::{self, ConnInfo};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::service::Wicket;
use crate::store::Store;
use crate::{clock, keystore, tls};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use wicket_ca::AuthorityKeys;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A running wicketd.
#[derive(Debug)]
pub struct Running {
    pub api_addr: SocketAddr,
    pub postgres_addr: Option<SocketAddr>,
    /// The SSH proxy's address, when `listen.ssh` is set.
    pub ssh_addr: Option<SocketAddr>,
    pub tls_ca_pin: String,
    pub ca_generated: bool,
    pub wicket: Arc<Wicket>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, then ends the live sessions and stores what they
    /// and the audit queue still hold ([`Running::wait`]).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.wait().await;
    }

    /// Runs until the accept loop ends (it ends on shutdown only), then
    /// ends the live sessions, each writing its `session_ended` and its
    /// recording's end, and stores the audit events still queued: what a
    /// restart would otherwise lose. Each wait is bounded ([`STOP_GRACE`]).
    pub async fn wait(self) {
        let _ = self.task.await;
        let wicket = &self.wicket;
        const WHY: &str = "wicketd is stopping";
        let live = wicket.sessions.stop_all(WHY);
        let ended = tokio::time::timeout(STOP_GRACE, async {
            while !wicket.sessions.is_empty() {
                // Also those that were still logging in at the first call.
                wicket.sessions.end_all(WHY);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if ended.is_err() {
            tracing::warn!(
                live,
                left = wicket.sessions.len(),
                "sessions did not end in time; their end is not on the record"
            );
        }
        // Refusals folded into counts no event carried yet.
        let _ =
            tokio::time::timeout(STOP_GRACE, wicket.write_folded_denials(clock::now(), true)).await;
        if tokio::time::timeout(STOP_GRACE, wicket.audit_sink.flush())
            .await
            .is_err()
        {
            tracing::error!("the audit store did not take the last events in time; they are lost");
        }
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// The CA key set (made on first use: then `true`) and the store, whose
/// audit chain is keyed from it. What the daemon opens first (admin
/// commands only read a key set: `keystore::load`).
pub async fn open_keys_and_store(config: &Config) -> Result<(AuthorityKeys, bool, Store)> {
    let now = clock::now().timestamp();
    // Blocking file I/O, and a flock that waits for another process making
    // a key set in the same directory: off the async workers.
    let (data_dir, cluster) = (config.data_dir.clone(), config.cluster_name.clone());
    let (keys, generated) =
        tokio::task::spawn_blocking(move || keystore::load_or_generate(&data_dir, &cluster, now))
            .await
            .map_err(|e| Error::Internal(format!("loading the CA key set: {e}")))??;
    let store = open_store(config, &keys).await?;
    Ok((keys, generated, store))
}

/// The store, its audit events chained with the key of `keys`, and only
/// if its other wicketds use the same CA key set.
pub async fn open_store(config: &Config, keys: &AuthorityKeys) -> Result<Store> {
    let chain = crate::store::ChainKey::from_authority(keys);
    let store = Store::open(&config.storage, &config.data_dir, chain).await?;
    store.check_key_set(&keys.fingerprints()).await?;
    Ok(store)
}

/// Opens everything and starts serving. Returns once the listener is bound.
pub async fn start(config: Config) -> Result<Running> {
    let now = clock::now();
    let (keys, ca_generated, store) = open_keys_and_store(&config).await?;
    let listener = TcpListener::bind(config.listen.api).await.map_err(|e| {
        Error::Io(format!(
            "cannot listen on {} (listen.api): {e}",
            config.listen.api
        ))
    })?;
    let api_addr = listener.local_addr()?;
    let pg_listener =
        match config.listen.postgres {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::Io(format!("cannot listen on {addr} (listen.postgres): {e}"))
            })?),
            None => None,
        };
    let postgres_addr = pg_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let ssh_listener = crate::ssh::bind(&config).await?;
    let ssh_addr = ssh_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let names = tls::server_names(api_addr, &config.public_names);
    let ports = wicket_api::ProxyPorts {
        postgres: postgres_addr.map(|a| a.port()),
        ssh: ssh_addr.map(|a| a.port()),
        ..Default::default()
    };
    let wicket = Arc::new(Wicket::new(config, store, keys, ports)?);
    let tls_config = tls::server_config(
        wicket.keys.clone(),
        &names,
        now.timestamp(),
        tls::ClientCerts::Optional,
    )?;
    let (shutdown, rx) = watch::channel(false);
    if let Some(l) = pg_listener {
        let pg = Arc::new(crate::pg::proxy::PgProxy::new(wicket.clone(), &names)?);
        tokio::spawn(pg.serve(l, rx.clone()));
    }
    if let Some(l) = ssh_listener {
        let ssh = crate::ssh::SshProxy::new(wicket.clone())?;
        tokio::spawn(crate::ssh::serve(l, ssh, rx.clone()));
    }
    tokio::spawn(recording_keeper(wicket.clone(), rx.clone()));
    tokio::spawn(scheduler(wicket.clone(), rx.clone()));
    tokio::spawn(session_refresher(wicket.clone(), rx.clone()));
    tokio::spawn(index_refresher(wicket.clone(), rx.clone()));
    tokio::spawn(session_enforcer(wicket.clone(), rx.clone()));
    tokio::spawn(chain_watcher(wicket.clone(), rx.clone()));
    let task = tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(tls_config),
        wicket.clone(),
        rx,
    ));
    Ok(Running {
        api_addr,
        postgres_addr,
        ssh_addr,
        tls_ca_pin: wicket.keys.tls.pin(),
        ca_generated,
        wicket,
        shutdown,
        task,
    })
}

/// How often due request timers are checked.
const TICK: Duration = Duration::from_millis(250);
/// How long a stopping wicketd waits for its sessions to end, and then
/// for the audit store to take the last events (each).
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often the audit chain's head is checked and recorded as seen.
const CHAIN_WATCH: Duration = Duration::from_secs(2);

/// Drives request timers from the store: on start (so every transition that
/// became due while wicketd was down happens at once) and then every tick.
async fn scheduler(wicket: Arc<Wicket>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let now = clock::now();
        if let Err(e) = wicket.tick_due(now).await {
            tracing::warn!(error = %e, "request timers failed");
        }
        wicket.write_folded_denials(now, false).await;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {},
            _ = shutdown.changed() => break,
        }
    }
}

/// Every few seconds, checks that the audit chain still holds the head
/// this host saw last, and records the new head (`store::SEEN_FILE`): the
/// newest events removed with the head moved back are found from then on.
async fn chain_watcher(wicket: Arc<Wicket>, mut shutdown: watch::Receiver<bool>) {
    // Each problem is logged once, until it changes or goes away.
    let mut reported = None::<String>;
    loop {
        match wicket.store.note_chain_head().await {
            Ok(None) => reported = None,
            Ok(Some(problem)) => {
                if reported.as_ref() != Some(&problem) {
                    tracing::error!(%problem, "the audit chain lost events; `wicket audit verify` reports it");
                    reported = Some(problem);
                }
            }
            Err(e) => {
                let e = e.to_string();
                if reported.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "cannot check the audit chain's head");
                    reported = Some(e);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHAIN_WATCH) => {},
            _ = shutdown.changed() => break,
        }
    }
}

/// Re-reads the grants and users of live sessions from the store every
/// tick (apart from the request timers, so a slow store holds up neither).
async fn session_refresher(wicket: Arc<Wicket>, mut shutdown: watch::Receiver<bool>) {
    loop {
        wicket.refresh_sessions(clock::now()).await;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {},
            _ = shutdown.changed() => break,
        }
    }
}

/// Follows the store's change feed into the in-memory index every tick
/// (see [`crate::index`]). While it fails, the index goes stale and
/// decisions read the store.
async fn index_refresher(wicket: Arc<Wicket>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let read = tokio::time::timeout(Duration::from_secs(1), wicket.refresh_index(clock::now()));
        match read.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh the grant index"),
            Err(_) => tracing::warn!("refreshing the grant index took over 1s"),
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {},
            _ = shutdown.changed() => break,
        }
    }
}

/// How often recordings past `session.recording_retention` are deleted
/// (and once at start).
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

/// At start, deletes expired recordings and then copies to a shared store
/// the ones here it lacks; then deletes expired ones every
/// [`RETENTION_SWEEP`].
async fn recording_keeper(wicket: Arc<Wicket>, mut shutdown: watch::Receiver<bool>) {
    wicket.expire_recordings(clock::now()).await;
    wicket.share_missing_recordings().await;
    // Without a retention there is nothing to sweep: no hourly wake-up.
    if wicket.config.session.recording_retention.is_none() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_SWEEP) => {},
            _ = shutdown.changed() => break,
        }
        wicket.expire_recordings(clock::now()).await;
    }
}

/// Applies what was last read to live sessions every tick, without the
/// store: expiry on time and the fail-closed grace even while it is down.
async fn session_enforcer(wicket: Arc<Wicket>, mut shutdown: watch::Receiver<bool>) {
    loop {
        wicket.enforce_sessions(clock::now());
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {},
            _ = shutdown.changed() => break,
        }
    }
}

/// Idle time before a connection's peer is probed, then the time between
/// probes and how many go unanswered before it counts as gone.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(60), Duration::from_secs(10), 6);

/// Turns on TCP keepalive for `tcp` ([`KEEPALIVE`]; elsewhere than Linux,
/// the idle time only): a peer that vanished without a word (a laptop
/// asleep, a NAT that forgot the flow) ends its connection within about
/// two minutes of quiet on Linux, where a read would
/// otherwise wait on it for good (an idle database session, say, holding
/// its backend and a connection place).
pub(crate) fn keep_alive(tcp: &tokio::net::TcpStream) {
    let (idle, every, probes) = KEEPALIVE;
    let params = socket2::TcpKeepalive::new().with_time(idle);
    #[cfg(target_os = "linux")]
    let params = params.with_interval(every).with_retries(probes);
    #[cfg(not(target_os = "linux"))]
    let _ = (every, probes);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Accepts on `listener` until `shutdown` fires and runs `handle` on each
/// connection in its own task (TCP_NODELAY set), with its [`Admission`].
/// A connection the `gate` refuses gets `refusal(why)` written (bounded by
/// a second) and is closed. Accept errors (out of file descriptors, say)
/// are logged and retried after a short pause. Every listener (API,
/// PostgreSQL, SSH) runs on this.
pub(crate) async fn accept_until_shutdown<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    gate: Gate,
    refusal: fn(&str) -> Vec<u8>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Admission) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (mut tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        keep_alive(&tcp);
        match gate.admit(tokio::time::Instant::now(), peer.ip()) {
            Ok(admitted) => {
                tokio::spawn(handle(tcp, peer, admitted));
            }
            Err(why) => {
                let bytes = refusal(&why);
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        tcp.write_all(&bytes).await?;
                        tcp.shutdown().await
                    })
                    .await;
                });
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    wicket: Arc<Wicket>,
    shutdown: watch::Receiver<bool>,
) {
    let router = api::router(wicket.clone());
    let gate = Gate::new("api", wicket.config.limits);
    // Positive, by the config's checks.
    let send_timeout = wicket
        .config
        .limits
        .send_timeout
        .to_std()
        .unwrap_or(Duration::from_secs(60));
    // Nothing can be said before TLS: a refused client sees the close.
    accept_until_shutdown(
        listener,
        shutdown,
        gate,
        |_| Vec::new(),
        move |tcp, peer, mut admitted| {
            let acceptor = acceptor.clone();
            let router = router.clone();
            let wicket = wicket.clone();
            async move {
                let deadline = admitted
                    .deadline()
                    .min(tokio::time::Instant::now() + HANDSHAKE_TIMEOUT);
                // Under TLS, so every write that reaches the socket counts
                // (TLS may take bytes and still wait on a flush).
                let tcp = StallLimited::new(tcp, send_timeout, peer);
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|leaf| {
                        wicket
                            .trusted_tls
                            .verify_client(leaf.as_ref(), clock::now().timestamp())
                            .map_err(|e| e.to_string())
                    });
                // A verified Wicket certificate authenticates the connection.
                // Without one (a password login, a browser), or when its
                // user holds their share of connections already, it stays in
                // the unauthenticated share and ends at the login grace.
                // One without a Wicket identity is refused by every call: it
                // authenticates nobody.
                let user = match &client {
                    Some(Ok(v)) => v.identity.as_ref().map(|i| i.user.as_str()),
                    _ => None,
                };
                let certified = match user.map(|u| admitted.authenticated_as(u)) {
                    Some(Ok(())) => true,
                    Some(Err(why)) => {
                        tracing::info!(%peer, reason = %why, "API connection kept unauthenticated");
                        false
                    }
                    None => false,
                };
                let conn = ConnInfo { peer, client };
                let service =
                    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                        req.extensions_mut().insert(conn.clone());
                        router.clone().oneshot(req.map(axum::body::Body::new))
                    });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(served);
                let served = if certified {
                    served.await
                } else {
                    tokio::select! {
                        r = served.as_mut() => r,
                        () = tokio::time::sleep_until(admitted.deadline()) => {
                            // The call in progress may finish; then it closes.
                            served.as_mut().graceful_shutdown();
                            tokio::time::timeout(HEADER_TIMEOUT, served.as_mut())
                                .await
                                .unwrap_or(Ok(()))
                        }
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
        },
    )
    .await;
}

/// A stream whose writes fail once one has waited `limit` without the
/// peer taking a byte; reads are passed through. Any write, flush or
/// shutdown that goes through ends the wait.
struct StallLimited<S> {
    inner: S,
    limit: Duration,
    /// Who the connection is with, for the log.
    peer: SocketAddr,
    /// Set at the first write of a stall that had to wait.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallLimited<S> {
    fn new(inner: S, limit: Duration, peer: SocketAddr) -> Self {
        Self {
            inner,
            limit,
            peer,
            stalled: None,
        }
    }

    fn limited<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let why = format!(
                    "the client took nothing for {}s (limits.send_timeout)",
                    limit.as_secs_f64()
                );
                tracing::info!(peer = %self.peer, "API connection ended: {why}");
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallLimited<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallLimited<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.limited(cx, r)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.limited(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.limited(cx, r)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.limited(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that takes nothing fails the write after the limit; one that
    /// reads slowly, never waiting the limit between reads, does not.
    #[tokio::test]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_limit() {
        let limit = Duration::from_millis(300);
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut s = StallLimited::new(ours, limit, SocketAddr::from(([127, 0, 0, 1], 1)));
        let data = vec![7u8; 4096];
        let started = tokio::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(10), s.write_all(&data))
            .await
            .expect("the write ends by itself")
            .expect_err("a peer that reads nothing fails the write");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("took nothing"), "{e}");
        assert!(started.elapsed() >= limit);
        // What was taken before the stall is there.
        let mut got = [0u8; 16];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [7u8; 16]);

        // A slow reader: 16 bytes every 50 ms, well past the limit in all.
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut s = StallLimited::new(ours, limit, SocketAddr::from(([127, 0, 0, 1], 1)));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut chunk = [0u8; 16];
            while all.len() < 512 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let n = theirs.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                all.extend_from_slice(&chunk[..n]);
            }
            all
        });
        let started = tokio::time::Instant::now();
        s.write_all(&vec![9u8; 512]).await.unwrap();
        s.flush().await.unwrap();
        assert!(
            started.elapsed() > limit * 2,
            "the slow reader took longer than the limit in all"
        );
        assert_eq!(reader.await.unwrap(), vec![9u8; 512]);
    }

    /// Under TLS (as the API has it), a client that reads steadily, if
    /// slowly, is never cut, however long TLS holds bytes for it: every
    /// write that reaches it counts. (Above TLS, a flush that moved bytes
    /// but still waited did not, and this client was cut.)
    #[tokio::test]
    async fn a_steady_reader_under_tls_is_not_cut() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rng = ring::rand::SystemRandom::new();
        let now = clock::now().timestamp();
        let (keys, _) = AuthorityKeys::generate("t", now - 60, &rng).unwrap();
        let keys = Arc::new(keys);
        let server = tls::server_config(
            keys.clone(),
            &["localhost".to_owned()],
            now,
            tls::ClientCerts::Optional,
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                keys.tls.cert_der().to_vec(),
            ))
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let limit = Duration::from_millis(300);
        let (ours, theirs) = tokio::io::duplex(1024);
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let sent = 160 * 1024;
        let serving = tokio::spawn(async move {
            let mut tls = TlsAcceptor::from(server)
                .accept(StallLimited::new(ours, limit, peer))
                .await?;
            tls.write_all(&vec![5u8; sent]).await?;
            tls.flush().await?;
            tls.shutdown().await
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, theirs)
            .await
            .unwrap();
        // 2 KiB every 20 ms: about 100 KiB/s, so what TLS holds (up to
        // 64 KiB) takes longer than the limit to go.
        let mut got = 0;
        let mut chunk = [0u8; 2048];
        let started = tokio::time::Instant::now();
        while got < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
            match tls.read(&mut chunk).await.unwrap() {
                0 => break,
                n => got += n,
            }
        }
        assert_eq!(got, sent);
        assert!(started.elapsed() > limit * 3, "{:?}", started.elapsed());
        serving.await.unwrap().unwrap();
    }
}
