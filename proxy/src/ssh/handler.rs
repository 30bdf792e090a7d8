//! One user connection: certificate checks, the policy decision, and the
//! relay of every channel to the node.
//!
//! Authentication accepts only a Wicket user certificate and checks what
//! russh leaves to the handler (trusted Wicket user CA and signature,
//! certificate type, validity window, critical options — all in
//! `wicket_ca::TrustedSshCas::verify`). A trusted certificate whose holder
//! may not log in is still authenticated, so that the user reads *why*:
//! every session channel then gets `wicket: access denied: <reason>` on
//! stderr and exit status 1, and nothing reaches the node. Authorization is
//! one policy decision over the roles in force now: standing roles plus the
//! roles of the certificate's requests that the store says are active (a
//! revoked, dropped or expired grant does not count even while the
//! certificate is within its window).
//!
//! Session channels are relayed request by request: each request goes to the
//! node with `want_reply` and the node's answer is returned to the user
//! before the next request is read, so what the user sees is what the node
//! said. Data flows in two tasks per channel (user → node, node → user), each
//! waiting for the receiver's SSH window, so a slow side slows the sender
//! instead of filling memory.

use super::recording::{Recorder, RecordingMeta};
use super::upstream::{self, Upstream};
use super::{Route, SshProxy};
use crate::admission::Admission;
use crate::audit::{AuditEvent, SessionRef};
use crate::sessions::{SessionHandle, SessionInfo, Signal};
use bytes::Bytes;
use russh::keys::Certificate;
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, Disconnect, Pty, Sig};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use wicket_ca::{SshCertKind, VerifiedSshCert};
use wicket_policy::{Resource, SshForwarding, Subject};

/// How long a request may wait for the node's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Output of an exec without a terminal is recorded up to this many bytes
/// per channel (file transfers would otherwise fill the disk twice).
const EXEC_RECORD_LIMIT: u64 = 1024 * 1024;
/// Recordings are flushed at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// How long a message to the user may wait for a client that is not
/// reading (its SSH window is full) before it is given up.
const TELL_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a connection whose session was ended may take to close before
/// it is dropped, whatever the client does.
pub(crate) const CUT_GRACE: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the connection's handler, its upstream handler and the
/// task that finishes it.
#[derive(Default)]
pub(crate) struct ConnShared {
    live: Mutex<Option<Arc<Live>>>,
    server: Mutex<Option<server::Handle>>,
    pub(crate) agent_allowed: AtomicBool,
    pub(crate) x11_allowed: AtomicBool,
    /// Set when the session must end: the connection's socket fails every
    /// read and write [`CUT_GRACE`] later if it has not closed by then (a
    /// client that stops reading cannot hold a revoked session open).
    pub(crate) cut: Arc<Cut>,
    /// The user's remote forwards (`ssh -R`) on this connection: what the
    /// node may open `forwarded-tcpip` channels for.
    remote_forwards: Mutex<Vec<RemoteForward>>,
    next_forward: AtomicU64,
    /// Woken when a remote forward's bound port becomes known.
    forwards_changed: tokio::sync::Notify,
    slots: ChannelSlots,
}

/// One remote forward the node listens for.
struct RemoteForward {
    id: u64,
    address: String,
    /// The port it listens on; not known yet for port 0 until the node
    /// answers.
    bound: Option<u32>,
}

/// How long a connection on a remote forward to port 0 may wait for the
/// node's answer (which it sent just before) to be seen here.
const FORWARD_SETTLE: Duration = Duration::from_secs(2);

/// Channels open at once on one connection, whichever side opened them
/// (sessions, forwards, X11, agent): past this a new one is refused for
/// resource shortage, so a client or node that opens channels without end
/// cannot exhaust the proxy's memory.
const MAX_CHANNELS: usize = 256;

/// Bytes from the user waiting, on one connection, for session channels'
/// nodes to take them: past this, the connection's reads wait (the node's
/// window already holds what it will take), so a client whose commands do
/// not read their input cannot make the proxy hold data without bound.
const QUEUED_TO_NODES: u32 = 8 << 20;

/// Messages one channel holds in each direction inside the SSH sessions
/// (user side and node side) and in its queue to the node, before that
/// channel's reads wait: 16 packets of at most 32 KiB. With
/// [`MAX_CHANNELS`], this bounds what one connection holds.
///
/// russh opens a channel's window again as data arrives, not as it is
/// read, so these queues are the only flow control: a channel whose far
/// reader stops (a forward whose local client does not read) fills its
/// queue, and the connection's other channels wait with it until it reads
/// again or closes (russh's head-of-line blocking, Eugeny/russh#730).
pub(crate) const CHANNEL_QUEUE: usize = 16;

/// Lines a session channel holds for its user ([`Note`]) before more are
/// not written (each is in the audit or on the recording already).
const NOTES_QUEUE: usize = 4;

/// Markers kept for a recording not made yet (a session that only
/// forwards); past this, later ones before it are not kept.
const EARLY_MARKERS: usize = 256;

/// Refusals for the rate are marked in the recording at most this often.
const RATE_MARK_EVERY: Duration = Duration::from_secs(10);

/// Refusals inside one SSH session that are each audited and marked at
/// once, and how many more each second after ([`Live::refusal_on_record`]).
const REFUSALS_BURST: f64 = 100.0;
const REFUSALS_PER_SEC: f64 = 2.0;

/// A connection's places for open channels; each channel holds one
/// ([`ChannelSlot`]) in the task that lives as long as it does.
///
/// Each channel open is audited, so a client or node that opens them in a
/// loop would fill the audit store (and in `drop-and-count` crowd out other
/// sessions' events): each side of a connection may open
/// `limits.ssh_channel_burst` at once (the user's remote forward requests
/// count with the user's channels), then `limits.ssh_channels_per_second`;
/// opens past that are refused for resource shortage. Each side has its
/// own rate, so a node's loop does not use up the user's.
pub(crate) struct ChannelSlots {
    open: Arc<tokio::sync::Semaphore>,
    /// The user's rate, then the node's.
    rate: Mutex<[OpenRate; 2]>,
    /// Channel opens refused for the rate, for the session's end.
    refused: Arc<AtomicU64>,
    /// The rate, for the recording's mark.
    burst: u32,
    per_sec: u32,
}

/// One open channel's place, given back when dropped.
type ChannelSlot = tokio::sync::OwnedSemaphorePermit;

/// Which side asks for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    User = 0,
    Node = 1,
}

/// Why a channel got no place.
enum NoSlot {
    /// [`MAX_CHANNELS`] are open.
    Full,
    /// Opened faster than the rate; `mark` when the recording should say so
    /// (with the refusals so far).
    TooFast { mark: Option<u64> },
}

impl Default for ChannelSlots {
    fn default() -> Self {
        let d = crate::config::Limits::default();
        Self::new(d.ssh_channel_burst, d.ssh_channels_per_second)
    }
}

impl ChannelSlots {
    /// `burst` opens at once on each side, then `per_sec`.
    fn new(burst: u32, per_sec: u32) -> Self {
        Self {
            open: Arc::new(tokio::sync::Semaphore::new(MAX_CHANNELS)),
            rate: Mutex::new([(); 2].map(|_| OpenRate::new(burst.into(), per_sec.into()))),
            refused: Arc::default(),
            burst,
            per_sec,
        }
    }

    fn take(&self, now: Instant, side: Side) -> Result<ChannelSlot, NoSlot> {
        self.allow(now, side)?;
        self.open
            .clone()
            .try_acquire_owned()
            .map_err(|_| NoSlot::Full)
    }

    /// Takes from `side`'s rate only: for a request audited like a channel
    /// that opens none (a remote forward).
    fn allow(&self, now: Instant, side: Side) -> Result<(), NoSlot> {
        let mut rates = lock(&self.rate);
        let rate = &mut rates[side as usize];
        if !rate.allow(now) {
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            let mark = rate.mark(now, RATE_MARK_EVERY).then_some(refused);
            return Err(NoSlot::TooFast { mark });
        }
        Ok(())
    }

    /// Refuses a channel that got no place, telling the recording (when
    /// the session is live) why.
    async fn refuse<R: Reject>(&self, why: NoSlot, reply: R, live: Option<&Live>) {
        self.mark_too_fast(&why, live);
        reply.reject(ChannelOpenFailure::ResourceShortage).await;
    }

    /// Marks in the recording, when it is time to, that opens are refused
    /// for the rate.
    fn mark_too_fast(&self, why: &NoSlot, live: Option<&Live>) {
        if let (NoSlot::TooFast { mark: Some(n) }, Some(live)) = (why, live) {
            live.marker(&format!(
                "channels opened faster than {}/s (after {}) are refused: {n} so far",
                self.per_sec, self.burst
            ));
        }
    }
}

/// Either side's answer to a channel open.
trait Reject {
    async fn reject(self, why: ChannelOpenFailure);
}

impl Reject for server::ChannelOpenHandle {
    async fn reject(self, why: ChannelOpenFailure) {
        server::ChannelOpenHandle::reject(self, why).await
    }
}

impl Reject for russh::client::ChannelOpenHandle {
    async fn reject(self, why: ChannelOpenFailure) {
        russh::client::ChannelOpenHandle::reject(self, why).await
    }
}

/// A token bucket: `burst` at once, then `per_sec`.
struct OpenRate {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    at: Option<Instant>,
    marked: Option<Instant>,
}

impl OpenRate {
    fn new(burst: f64, per_sec: f64) -> Self {
        Self {
            burst,
            per_sec,
            tokens: burst,
            at: None,
            marked: None,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let gained = now.saturating_duration_since(at).as_secs_f64() * self.per_sec;
            self.tokens = (self.tokens + gained).min(self.burst);
        }
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a refusal now should be marked: the first, then at most one
    /// each `every`.
    fn mark(&mut self, now: Instant, every: Duration) -> bool {
        let due = self
            .marked
            .is_none_or(|m| now.saturating_duration_since(m) >= every);
        if due {
            self.marked = Some(now);
        }
        due
    }
}

/// Whether a connection's session was ended (see [`ConnShared::cut`]).
pub(crate) struct Cut(watch::Sender<bool>);

impl Default for Cut {
    fn default() -> Self {
        Cut(watch::channel(false).0)
    }
}

impl Cut {
    fn set(&self) {
        self.0.send_replace(true);
    }

    /// Resolves [`CUT_GRACE`] after the session was ended (also when that
    /// happened before this was called).
    pub(crate) fn after_grace(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::sessions::after_grace(self.0.subscribe(), |ended| ended.then_some(()), CUT_GRACE)
    }
}

impl ConnShared {
    /// With the channel-open rate of `limits`.
    fn with_rate(limits: &crate::config::Limits) -> Self {
        Self {
            slots: ChannelSlots::new(limits.ssh_channel_burst, limits.ssh_channels_per_second),
            ..Self::default()
        }
    }

    pub(crate) fn server_handle(&self) -> Option<server::Handle> {
        lock(&self.server).clone()
    }

    /// A connection the node took on one of the user's remote forwards:
    /// passed to the user's client when the forward is one they asked for
    /// on this connection and the session still takes new channels.
    pub(crate) async fn forwarded_tcpip(
        &self,
        up: Channel<russh::client::Msg>,
        reply: russh::client::ChannelOpenHandle,
        (address, port): (&str, u32),
        (from_address, from_port): (&str, u32),
    ) {
        let ours = self.asked_for(address, port).await;
        let what = format!(
            "connection from {from_address}:{from_port} to the node's {address}:{port} (remote forward)"
        );
        let Some((live, handle, slot)) = self
            .accept_from_node((ours, SshForwarding::Port), reply, &what)
            .await
        else {
            return;
        };
        live.audit(AuditEvent::SshRemoteForward {
            session: live.sref.clone(),
            address: address.to_owned(),
            port,
            from: Some(format!("{from_address}:{from_port}")),
        })
        .await;
        let (address, from_address) = (address.to_owned(), from_address.to_owned());
        let down = async move {
            handle
                .channel_open_forwarded_tcpip(address, port, from_address, from_port)
                .await
        };
        live.relay_from_node(up, down, "remote-forward", slot);
    }

    /// A connection to the X11 display the node's sshd made for a session
    /// (a program there opened a window): passed to the user's client,
    /// which connects it to their display, when this connection's X11
    /// request was allowed and the session still takes new channels.
    pub(crate) async fn x11(
        &self,
        up: Channel<russh::client::Msg>,
        reply: russh::client::ChannelOpenHandle,
        (from_address, from_port): (&str, u32),
    ) {
        let allowed = self.x11_allowed.load(Ordering::Relaxed);
        let what = format!("X11 connection from {from_address}:{from_port} on the node");
        let Some((live, handle, slot)) = self
            .accept_from_node((allowed, SshForwarding::X11), reply, &what)
            .await
        else {
            return;
        };
        live.audit(AuditEvent::SshX11 {
            session: live.sref.clone(),
            from: format!("{from_address}:{from_port}"),
        })
        .await;
        let from_address = from_address.to_owned();
        let down = async move { handle.channel_open_x11(from_address, from_port).await };
        live.relay_from_node(up, down, "X11", slot);
    }

    /// A program on the node using the forwarded agent: passed to the
    /// user's agent when this connection's agent request was allowed and
    /// the session still takes new channels.
    pub(crate) async fn agent(
        &self,
        up: Channel<russh::client::Msg>,
        reply: russh::client::ChannelOpenHandle,
    ) {
        let allowed = self.agent_allowed.load(Ordering::Relaxed);
        let what = "agent connection on the node";
        let Some((live, handle, slot)) = self
            .accept_from_node((allowed, SshForwarding::Agent), reply, what)
            .await
        else {
            return;
        };
        live.audit(AuditEvent::SshAgent {
            session: live.sref.clone(),
        })
        .await;
        let down = async move { handle.channel_open_agent().await };
        live.relay_from_node(up, down, "agent", slot);
    }

    /// Accepts a channel the node opens (`what` it is) when `allowed` and
    /// the session is live and takes new channels; else refuses it, with a
    /// marker in the recording when the session is what refuses.
    async fn accept_from_node(
        &self,
        (allowed, kind): (bool, SshForwarding),
        reply: russh::client::ChannelOpenHandle,
        what: &str,
    ) -> Option<(Arc<Live>, server::Handle, ChannelSlot)> {
        let live = lock(&self.live).clone();
        let (Some(live), Some(handle)) = (live, self.server_handle()) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return None;
        };
        // The place first: opens past the rate leave no marker each.
        let slot = match self.slots.take(crate::clock::instant(), Side::Node) {
            Ok(slot) => slot,
            Err(why) => {
                self.slots.refuse(why, reply, Some(&live)).await;
                return None;
            }
        };
        // Each refusal is on the recording and in the audit, with why.
        let action = match kind {
            SshForwarding::Port => "remote_forward",
            SshForwarding::X11 => "x11",
            SshForwarding::Agent => "agent",
        };
        // Asked for and allowed earlier; the policy is asked again for
        // each channel, as the roles it rested on may have ended.
        let why = if !allowed {
            Some("the user's connection did not ask for it, or was refused it".to_owned())
        } else {
            let d = live.may_forward(kind);
            if d.allowed {
                live.refusing()
            } else {
                Some(format!(
                    "the roles that allowed it no longer hold: {}",
                    d.reason
                ))
            }
        };
        if let Some(why) = why {
            live.refused_as(action, what, &why).await;
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return None;
        }
        reply.accept().await;
        live.marker(what);
        Some((live, handle, slot))
    }

    /// Whether the user asked this connection for a remote forward that
    /// the node listens for at `address`:`port` (as the node names it: the
    /// address as asked). Waits, briefly, while a forward to port 0 at that
    /// address has no known port yet.
    async fn asked_for(&self, address: &str, port: u32) -> bool {
        let deadline = tokio::time::Instant::now() + FORWARD_SETTLE;
        loop {
            let changed = self.forwards_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let forwards = lock(&self.remote_forwards);
                let mut at = forwards.iter().filter(|f| f.address == address);
                if port != 0 && at.clone().any(|f| f.bound == Some(port)) {
                    return true;
                }
                if !at.any(|f| f.bound.is_none()) {
                    return false;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Records what the node answered to remote forward `id`: its port,
    /// or (on `None`) that it does not listen.
    fn settle_forward(&self, id: u64, bound: Option<u32>) {
        {
            let mut forwards = lock(&self.remote_forwards);
            match bound {
                Some(p) => {
                    if let Some(f) = forwards.iter_mut().find(|f| f.id == id) {
                        f.bound = Some(p);
                    }
                }
                None => forwards.retain(|f| f.id != id),
            }
        }
        self.forwards_changed.notify_waiters();
    }
}

/// Ends a connection's session once russh is done with it.
pub(crate) struct Finisher(Arc<ConnShared>);

impl Finisher {
    pub(crate) fn set_server(&self, h: server::Handle) {
        *lock(&self.0.server) = Some(h);
    }

    /// Resolves [`CUT_GRACE`] after the session was told to end.
    pub(crate) fn cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.0.cut.after_grace()
    }

    pub(crate) async fn finish(self, error: Option<String>) {
        lock(&self.0.server).take();
        let live = lock(&self.0.live).take();
        if let Some(live) = live {
            live.finish(error).await;
        }
    }
}

/// How a channel's output is recorded.
const REC_ALL: u8 = 0;
const REC_EXEC: u8 = 1;
const REC_OFF: u8 = 2;

struct ChanRec {
    /// On an `sftp` subsystem channel: the node's answers, followed.
    sftp: std::sync::OnceLock<Mutex<super::sftp::Outcomes>>,
    mode: AtomicU8,
    recorded: AtomicU64,
    /// Input bytes of a command without a terminal offered to the recording.
    input_recorded: AtomicU64,
}

/// One authorized, live session.
pub(crate) struct Live {
    proxy: Arc<SshProxy>,
    pub(crate) sref: Arc<SessionRef>,
    node: Resource,
    roles: Vec<String>,
    scoped: Vec<wicket_policy::ScopedRole>,
    /// The roles of the grants alone: what holds once the login ends.
    granted: (Vec<String>, Vec<wicket_policy::ScopedRole>),
    /// When the password login behind the certificate ends (Unix seconds).
    login_until: i64,
    upstream: russh::client::Handle<Upstream>,
    registration: Mutex<Option<SessionHandle>>,
    signal: watch::Receiver<Signal>,
    recorder: Mutex<Option<Arc<Recorder>>>,
    /// Markers from before the recorder was made, with their times.
    early_markers: Mutex<Vec<(std::time::Instant, String)>>,
    record_input: bool,
    /// `session.on_recording_failure: end`.
    end_on_recording_failure: bool,
    /// Woken when the recording fails and the session must end for it.
    recording_failed: tokio::sync::Notify,
    started: std::time::Instant,
    started_unix: i64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    execs: AtomicU64,
    /// Commands' output and input past [`EXEC_RECORD_LIMIT`] each, not
    /// recorded.
    unrecorded_bytes: AtomicU64,
    audit_dropped: AtomicU64,
    /// Channel opens on this connection refused for the rate.
    channels_refused: Arc<AtomicU64>,
    /// How fast refusals inside the session are audited and marked, for
    /// each kind of request ([`Live::refusal_on_record`]), and those past it.
    refusal_rates: Mutex<BTreeMap<String, OpenRate>>,
    refusals_unrecorded: AtomicU64,
    /// The exit status of the connection's first session channel (the
    /// master's command of a multiplexed `ssh`), for `session_ended`.
    exit_status: Mutex<Option<u32>>,
    /// That channel.
    first_session_channel: std::sync::OnceLock<ChannelId>,
    end_reason: Mutex<Option<String>>,
    /// Set when the grant ended but sessions may finish
    /// (`disconnect_on_expiry: false`): why new channels are refused.
    refusing: Mutex<Option<String>>,
    /// The open session channels, and where to leave lines for their
    /// users.
    session_channels: Mutex<Vec<(ChannelId, mpsc::Sender<Note>)>>,
    done: watch::Sender<bool>,
    cut: Arc<Cut>,
    /// The tasks that relay its channels, stopped when it finishes (one
    /// waiting on a client that stopped reading would keep the node's
    /// channel open).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Live {
    /// Why new channels are refused, once the grant ended but sessions may
    /// finish.
    fn refusing(&self) -> Option<String> {
        lock(&self.refusing).clone()
    }

    /// Who decides what the session does next: with its standing roles
    /// while the login lasts, with its grants' alone after.
    fn subject(&self) -> Subject<'_> {
        let (roles, scoped) =
            if wicket_policy::login_lasts(self.login_until, crate::clock::now().timestamp()) {
                (&self.roles, &self.scoped)
            } else {
                (&self.granted.0, &self.granted.1)
            };
        Subject {
            user: &self.sref.user,
            roles,
            scoped,
        }
    }

    /// Whether the policy still allows forwarding `kind` (a role or the
    /// login it rests on may have ended since it was asked for).
    fn may_forward(&self, kind: SshForwarding) -> wicket_policy::Decision {
        self.proxy.wicket.config.policy.roles.decide_ssh_forwarding(
            &self.subject(),
            &self.node,
            &self.sref.login,
            kind,
        )
    }

    /// The session's recorder, created on first use with this terminal size.
    fn recorder(&self, cols: u32, rows: u32, term: Option<&str>) -> Option<Arc<Recorder>> {
        let mut g = lock(&self.recorder);
        if g.is_none() {
            let meta = RecordingMeta {
                session_id: self.sref.session_id.clone(),
                user: self.sref.user.clone(),
                node: self.sref.resource.clone(),
                login: self.sref.login.clone(),
                request_ids: self.sref.request_ids.clone(),
                started: self.started_unix,
            };
            let cols = if cols == 0 { 80 } else { cols };
            let rows = if rows == 0 { 24 } else { rows };
            match Recorder::create(
                &self.proxy.wicket.config.data_dir,
                &meta,
                cols,
                rows,
                term,
                self.record_input,
                self.started,
                self.proxy.wicket.config.session.max_recording_bytes,
            ) {
                Ok(r) => {
                    for (at, text) in lock(&self.early_markers).drain(..) {
                        r.marker(at, &text);
                    }
                    *g = Some(Arc::new(r));
                }
                Err(e) => {
                    tracing::error!(session = %self.sref.session_id, error = %e, "cannot create the session recording");
                    return None;
                }
            }
        }
        g.clone()
    }

    fn existing_recorder(&self) -> Option<Arc<Recorder>> {
        lock(&self.recorder).clone()
    }

    /// Records a channel's output; false when it must not reach the user
    /// because it could not go on the record and the session ends for it.
    fn record_output(&self, rec: &ChanRec, data: &[u8]) -> bool {
        let Some(r) = self.existing_recorder() else {
            return true;
        };
        // Once the recording failed, nothing more goes on in `end` mode,
        // whatever the channel runs.
        if r.failed() {
            return !self.recording_lost(&r);
        }
        let recorded = match rec.mode.load(Ordering::Relaxed) {
            REC_OFF => true,
            REC_EXEC => self.record_capped(&r, &rec.recorded, data, "output", Recorder::output),
            _ => r.output(crate::clock::instant(), data),
        };
        recorded || !self.recording_lost(&r)
    }

    /// Records up to [`EXEC_RECORD_LIMIT`] bytes of a command's output or
    /// input (`counted` so far), with a marker where it stops; false when
    /// the recording failed.
    fn record_capped(
        &self,
        r: &Recorder,
        counted: &AtomicU64,
        data: &[u8],
        what: &str,
        write: fn(&Recorder, std::time::Instant, &[u8]) -> bool,
    ) -> bool {
        let before = counted.fetch_add(data.len() as u64, Ordering::Relaxed);
        let room = EXEC_RECORD_LIMIT.saturating_sub(before);
        let part = &data[..data.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
        let cut = data.len() - part.len();
        self.unrecorded_bytes
            .fetch_add(cut as u64, Ordering::Relaxed);
        let recorded = part.is_empty() || write(r, crate::clock::instant(), part);
        // Marked once: at the first chunk not wholly recorded, also when
        // the one before it ended exactly at the cap.
        if cut > 0 && before <= EXEC_RECORD_LIMIT {
            r.marker(
                crate::clock::instant(),
                &format!("{what} beyond {EXEC_RECORD_LIMIT} bytes of this command is not recorded"),
            );
        }
        recorded
    }

    /// The recording failed: with `on_recording_failure: end` the session
    /// ends for it (true), else it goes on unrecorded (false). Logged
    /// once, by the recorder.
    fn recording_lost(&self, r: &Recorder) -> bool {
        // Checked first: with `continue` this runs for every chunk once
        // the recording failed.
        if !self.end_on_recording_failure {
            return false;
        }
        let Some(why) = r.failure() else {
            return false;
        };
        let mut reason = lock(&self.end_reason);
        if reason.is_none() {
            *reason = Some(why);
        }
        self.recording_failed.notify_one();
        true
    }

    /// Marks `text` in the recording; before it exists (a session that
    /// has only forwarded so far), kept for it, up to [`EARLY_MARKERS`].
    fn marker(&self, text: &str) {
        let now = crate::clock::instant();
        let g = lock(&self.recorder);
        match &*g {
            Some(r) => r.marker(now, text),
            None => {
                let mut early = lock(&self.early_markers);
                if early.len() < EARLY_MARKERS {
                    early.push((now, text.to_owned()));
                }
            }
        }
    }

    /// Session events go through the audit sink (bounded; `audit.on_overflow`).
    async fn audit(&self, event: AuditEvent) {
        self.proxy
            .wicket
            .audit_sink
            .send(event, crate::clock::now_ms(), &self.audit_dropped)
            .await;
    }

    /// Start and end are always written.
    async fn audit_always(&self, event: AuditEvent) {
        self.proxy
            .wicket
            .audit_sink
            .send_always(event, crate::clock::now_ms())
            .await;
    }

    /// Writes a line to the stderr of every open session channel, giving
    /// up on a client that does not take it within [`TELL_TIMEOUT`].
    async fn tell(&self, text: &str) {
        self.say(text, false).await;
    }

    /// Writes a line to the stderr of every open session channel (`last`:
    /// and closes it), waiting at most [`TELL_TIMEOUT`] for them; the
    /// channels that did not take a last line in that time.
    async fn say(&self, text: &str, last: bool) -> Vec<ChannelId> {
        let line = format!("\r\nwicket: {text}\r\n");
        // What the user is told is part of the recording, when it is said
        // (a client that does not read still has it on the record).
        if let Some(r) = self.existing_recorder() {
            r.output(crate::clock::instant(), line.as_bytes());
        }
        let line = Bytes::from(line.into_bytes());
        let channels = lock(&self.session_channels).clone();
        // Each channel's task writes its own, after the output before it;
        // they are waited for together.
        let mut said = Vec::new();
        let mut late = Vec::new();
        for (id, n) in channels {
            let (tx, rx) = oneshot::channel();
            let note = if last {
                Note::Last {
                    line: line.clone(),
                    exit_status: None,
                    said: Some(tx),
                }
            } else {
                Note::Say(line.clone(), Some(tx))
            };
            match n.try_send(note) {
                Ok(()) => said.push((id, rx)),
                // (A channel whose task ended is closed.)
                Err(mpsc::error::TrySendError::Full(_)) => late.push(id),
                Err(_) => {}
            }
        }
        let by = tokio::time::Instant::now() + TELL_TIMEOUT;
        for (id, rx) in said {
            if tokio::time::timeout_at(by, rx).await.is_err() {
                late.push(id);
            }
        }
        // Only a last line's channels are closed for being late.
        if !last {
            late.clear();
        }
        late
    }

    /// Ends the session now with `why` (the grant ended).
    async fn end(&self, handle: &server::Handle, why: &str) {
        *lock(&self.end_reason) = Some(why.to_owned());
        self.cut.set();
        // Each channel's task says why and closes it, in that order; those
        // that cannot in time (a client that does not read) are closed
        // from here.
        let late = self
            .say(&format!("{why}; closing this session"), true)
            .await;
        // Each of these waits for room in the connection's queue, which a
        // client that stopped reading keeps full: the node is let go of
        // either way.
        let goodbye = async {
            for id in late {
                let _ = handle.close(id).await;
            }
            let _ = handle
                .disconnect(Disconnect::ByApplication, why.to_owned(), "en".into())
                .await;
        };
        let _ = tokio::time::timeout(TELL_TIMEOUT, goodbye).await;
        self.leave_node("session ended by wicket").await;
    }

    /// Tells the node's side the session is over, waiting at most
    /// [`TELL_TIMEOUT`]: a node that stopped reading (a hung host, a
    /// stopped sshd) holds up russh's client loop, and its queue with it.
    async fn leave_node(&self, why: &str) {
        let bye = self
            .upstream
            .disconnect(Disconnect::ByApplication, why, "en");
        if tokio::time::timeout(TELL_TIMEOUT, bye).await.is_err() {
            tracing::warn!(session = %self.sref.session_id, "the node did not take the disconnect in time");
        }
    }

    /// Puts a refused `what` (`ssh.<what>` in the audit) and why on the
    /// recording and in the audit.
    async fn refused_on_record(&self, what: &str, why: &str) {
        self.refused_as(what, what, why).await;
    }

    /// Puts a refused `what` on the recording, and in the audit as action
    /// `ssh.<action>`, with why (within [`Live::refusal_on_record`]).
    async fn refused_as(&self, action: &str, what: &str, why: &str) {
        if !self.refusal_on_record(action) {
            return;
        }
        self.marker(&format!("{what} refused: {why}"));
        self.audit_refusal(action, why).await;
    }

    /// The audit event of a refusal inside this session, stored under it.
    async fn audit_refusal(&self, action: &str, why: &str) {
        self.audit(AuditEvent::AccessDenied {
            user: self.sref.user.clone(),
            action: format!("ssh.{action}"),
            reason: why.to_owned(),
            unrecorded_before: 0,
            session: Some(self.sref.clone()),
        })
        .await;
    }

    /// Whether a refusal of `action` inside the session gets its audit
    /// event and marker: [`REFUSALS_BURST`] at once, then
    /// [`REFUSALS_PER_SEC`], for each kind of request on its own (one
    /// repeated cheaply does not hide another). A client that repeats a
    /// refused request (a second exec on a channel, an agent request the
    /// policy refuses), which costs it nothing, would otherwise fill the
    /// audit queue that every session shares. Those past the rate are
    /// counted for `session_ended`, and the recording says so every
    /// [`RATE_MARK_EVERY`].
    fn refusal_on_record(&self, action: &str) -> bool {
        let now = crate::clock::instant();
        let mark = {
            let mut rates = lock(&self.refusal_rates);
            let rate = rates
                .entry(action.to_owned())
                .or_insert_with(|| OpenRate::new(REFUSALS_BURST, REFUSALS_PER_SEC));
            if rate.allow(now) {
                return true;
            }
            rate.mark(now, RATE_MARK_EVERY)
        };
        let n = self.refusals_unrecorded.fetch_add(1, Ordering::Relaxed) + 1;
        if mark {
            self.marker(&format!(
                "ssh.{action} refusals past {REFUSALS_PER_SEC}/s (after {REFUSALS_BURST}) are \
                 counted, not each recorded: {n} so far in this session"
            ));
        }
        false
    }

    fn track<T>(&self, task: &tokio::task::JoinHandle<T>) {
        let mut tasks = lock(&self.tasks);
        // `finish` took the list already: nothing would stop this one.
        if *self.done.borrow() {
            task.abort();
            return;
        }
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }

    /// Relays a channel the node opened (`what` kind) to the one `down`
    /// opens to the user, as one of the session's tasks.
    fn relay_from_node<F>(
        &self,
        up: Channel<russh::client::Msg>,
        down: F,
        what: &'static str,
        slot: ChannelSlot,
    ) where
        F: std::future::Future<Output = Result<Channel<Msg>, russh::Error>> + Send + 'static,
    {
        let relay = tokio::spawn(async move {
            let _slot = slot;
            match down.await {
                Ok(down) => pipe(down, up).await,
                Err(e) => {
                    tracing::debug!(error = %e, channel = what, "the user refused a channel from the node");
                    let _ = up.close().await;
                }
            }
        });
        self.track(&relay);
    }

    async fn finish(&self, error: Option<String>) {
        self.done.send_replace(true);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let reason = lock(&self.end_reason)
            .clone()
            .or(error.map(|e| format!("connection error: {e}")))
            .unwrap_or_else(|| "connection closed".into());
        let exit_status = *lock(&self.exit_status);
        let recording_stopped = self.existing_recorder().and_then(|r| r.failure());
        self.audit_always(AuditEvent::SessionEnded {
            session: self.sref.clone(),
            bytes_from_client: self.bytes_in.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_out.load(Ordering::Relaxed),
            statements: self.execs.load(Ordering::Relaxed),
            exit_status,
            audit_dropped: self.audit_dropped.load(Ordering::Relaxed),
            channels_refused: self.channels_refused.load(Ordering::Relaxed),
            refusals_unrecorded: self.refusals_unrecorded.load(Ordering::Relaxed),
            unrecorded_bytes: self.unrecorded_bytes.load(Ordering::Relaxed),
            recording_stopped,
            reason: reason.clone(),
        })
        .await;
        // Every session has a recording, even one that only forwarded ports.
        if let Some(r) = self.recorder(80, 24, None) {
            r.marker(crate::clock::instant(), &format!("session ended: {reason}"));
            r.close();
            let wicket = self.proxy.wicket.clone();
            let session = self.sref.session_id.clone();
            tokio::spawn(async move { wicket.share_recording(&session).await });
        }
        // Ended for the registry first: the node's side may take its time.
        lock(&self.registration).take();
        self.leave_node("").await;
    }

    /// Watches the grant (through the session registry) and flushes the
    /// recording, until the connection ends.
    async fn watch(self: Arc<Self>, handle: server::Handle) {
        let mut rx = self.signal.clone();
        rx.mark_changed();
        let mut done = self.done.subscribe();
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let sig = rx.borrow_and_update().clone();
                    match sig {
                        Signal::Run => {}
                        Signal::Warn(text) => self.tell(&text).await,
                        Signal::Drain(why) => {
                            *lock(&self.refusing) = Some(why.clone());
                            self.marker(&format!("access ended, new channels refused: {why}"));
                            self.tell(
                                &format!("{why}; what runs may finish, new sessions on this connection are refused"),
                            )
                            .await;
                        }
                        Signal::End(why) => {
                            // Nothing new while the session closes (the
                            // node may still open a channel before it is
                            // disconnected).
                            *lock(&self.refusing) = Some(why.clone());
                            self.end(&handle, &why).await;
                            break;
                        }
                    }
                }
                _ = flush.tick() => {
                    if let Some(r) = self.existing_recorder() {
                        r.flush_if_dirty();
                        self.recording_lost(&r);
                    }
                }
                _ = self.recording_failed.notified() => {
                    let why = lock(&self.end_reason).clone().unwrap_or_default();
                    self.end(&handle, &why).await;
                    break;
                }
                _ = done.changed() => break,
            }
        }
    }
}

/// What the user → node task sends.
enum Up {
    /// With its share of [`QUEUED_TO_NODES`], given back once written.
    Data(Bytes, tokio::sync::OwnedSemaphorePermit),
    Ext(u32, Bytes, tokio::sync::OwnedSemaphorePermit),
    Eof,
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        modes: Vec<(Pty, u32)>,
    },
    Env(String, String),
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
    WindowChange(u32, u32, u32, u32),
    Signal(Sig),
    Agent,
    X11 {
        single: bool,
        protocol: String,
        cookie: String,
        screen: u32,
    },
}

type Replies = Arc<Mutex<VecDeque<oneshot::Sender<bool>>>>;

/// A line for the user of a session channel, written on its stderr by the
/// channel's node → user task ([`run_to_user`]) after the output before
/// it, through the channel's writer, which keeps to the channel's window.
///
/// Never through the connection's handle or session: russh queues what
/// they write past the window, and while anything is queued so, it sends
/// nothing more on the connection (every channel waits for this one's
/// client to read), and for ever once the user closed the channel.
///
/// Nothing is written after the channel's EOF: OpenSSH ends the whole
/// connection at extended data after EOF.
enum Note {
    /// A line; the sender is dropped once it is written or given up.
    Say(Bytes, Option<oneshot::Sender<()>>),
    /// A line, then the exit status if any (a refused start), EOF and the
    /// channel closed (the session's end); `said` is dropped once the close
    /// is sent or given up.
    Last {
        line: Bytes,
        exit_status: Option<u32>,
        said: Option<oneshot::Sender<()>>,
    },
}

struct Chan {
    to_up: mpsc::Sender<Up>,
    replies: Replies,
    rec: Arc<ChanRec>,
    pty: Option<(u32, u32, String)>,
    /// Whether a shell, exec or subsystem was asked for: a channel runs one
    /// (RFC 4254 6.5), and how it is recorded follows that one.
    started: bool,
    /// On an `sftp` subsystem channel: what the client asks of the node's
    /// files, read from its packets.
    sftp: Option<super::sftp::Reader>,
    /// On a command channel without a terminal: the client's first bytes,
    /// until they show whether it speaks SFTP (`sftp -s
    /// /usr/lib/openssh/sftp-server`, `ForceCommand internal-sftp`): then
    /// its file operations are audited as the `sftp` subsystem's are
    /// ([`super::sftp::opens_like_sftp`]). It is still recorded as a
    /// command: what the client sends cannot turn its recording off.
    sniff: Option<Vec<u8>>,
    /// The SFTP reader was started by that sniff: a stream that then stops
    /// being SFTP ends the reading, not the channel.
    sniffed_sftp: bool,
    /// Set when the node's side ended and the user's was closed with it
    /// (russh then no longer reports the user's close), or when the node
    /// refused the channel: the entry is dropped at the next channel open
    /// ([`Conn::forget_ended_channels`]).
    ended: Arc<AtomicBool>,
    /// Dropped with this entry, when the user's side closes: the node →
    /// user task stops then ([`run_to_user`]).
    _open: watch::Sender<()>,
    /// Lines for the user, written by the node → user task.
    notes: mpsc::Sender<Note>,
}

enum Access {
    Pending,
    Denied(String),
    Live(Arc<Live>),
}

/// The russh handler of one user connection.
pub(crate) struct Conn {
    proxy: Arc<SshProxy>,
    peer: SocketAddr,
    route: Option<Route>,
    shared: Arc<ConnShared>,
    access: Access,
    channels: HashMap<ChannelId, Chan>,
    /// Refused session channels (of a denied connection, or opened after
    /// the grant ended), until their shell/exec request: then they get this
    /// line on stderr and exit status 1.
    denied: HashMap<ChannelId, (russh::ChannelWriteHalf<Msg>, String, ChannelSlot)>,
    /// Its places at the listener, for as long as the connection lasts.
    admitted: Admission,
    /// What is left of [`QUEUED_TO_NODES`].
    queued: QueueBudget,
}

/// A connection's bytes from the user waiting for their nodes: at most
/// `limit` at once.
#[derive(Clone)]
struct QueueBudget {
    left: Arc<tokio::sync::Semaphore>,
    limit: u32,
}

impl QueueBudget {
    fn new(limit: u32) -> Self {
        Self {
            left: Arc::new(tokio::sync::Semaphore::new(limit as usize)),
            limit,
        }
    }

    /// A share for `len` bytes, once there is room (a message larger than
    /// the whole budget takes all of it).
    async fn share(&self, len: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(len).unwrap_or(self.limit).min(self.limit);
        self.left.clone().acquire_many_owned(n).await.ok()
    }
}

impl Conn {
    pub(crate) fn new(
        proxy: Arc<SshProxy>,
        peer: SocketAddr,
        route: Option<Route>,
        admitted: Admission,
    ) -> Self {
        let shared = Arc::new(ConnShared::with_rate(&proxy.wicket.config.limits));
        Self {
            proxy,
            peer,
            route,
            shared,
            access: Access::Pending,
            channels: HashMap::new(),
            denied: HashMap::new(),
            queued: QueueBudget::new(QUEUED_TO_NODES),
            admitted,
        }
    }

    pub(crate) fn finisher(&self) -> Finisher {
        Finisher(self.shared.clone())
    }

    /// Audits the file operations an `sftp` channel's reader found in what
    /// the user sent, and marks them in the recording. Data that does not
    /// read as SFTP is not passed on: the channel is closed (false).
    async fn sftp_audited(
        &mut self,
        channel: ChannelId,
        read: Result<Vec<super::sftp::FileOp>, super::sftp::Malformed>,
        session: &mut Session,
    ) -> Result<bool, russh::Error> {
        let ops = match read {
            Ok(ops) => ops,
            Err(e) => {
                if let Some(c) = self.channels.get_mut(&channel).filter(|c| c.sniffed_sftp) {
                    // A command's input that looked like SFTP and is not:
                    // no longer read as SFTP (either way), still recorded.
                    c.sftp = None;
                    if let Some(outcomes) = c.rec.sftp.get() {
                        lock(outcomes).stop();
                    }
                    if let Access::Live(live) = &self.access {
                        live.marker(&format!("the command's input is not SFTP after all: {e}"));
                    }
                    return Ok(true);
                }
                self.close_unsent(channel, &format!("sftp channel closed: {e}"), session)?;
                return Ok(false);
            }
        };
        if let Some(live) = self.live() {
            for op in ops {
                live.marker(&format!("sftp: {}", op.describe()));
                live.audit(sftp_event(live, op, None)).await;
            }
        }
        Ok(true)
    }

    /// Closes a session channel whose data is not passed on, marking why
    /// (as `channel_close`: the node's channel closes with it).
    fn close_unsent(
        &mut self,
        channel: ChannelId,
        why: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if let Some(live) = self.live() {
            live.marker(why);
            tracing::info!(session = %live.sref.session_id, reason = why, "closing a channel");
        }
        self.channels.remove(&channel);
        session.close(channel)
    }

    /// Drops the entries of session channels that ended on the node's side
    /// (their tasks end with them).
    fn forget_ended_channels(&mut self) {
        self.channels
            .retain(|_, c| !c.ended.load(Ordering::Relaxed));
    }

    fn live(&self) -> Option<&Arc<Live>> {
        match &self.access {
            Access::Live(l) => Some(l),
            _ => None,
        }
    }

    async fn deny(
        &self,
        user: &str,
        node: &str,
        login: &str,
        request_ids: &[String],
        reason: String,
    ) -> String {
        let event = AuditEvent::SessionDenied {
            user: user.to_owned(),
            protocol: "ssh".into(),
            resource: node.to_owned(),
            login: login.to_owned(),
            source: self.peer.ip().to_string(),
            request_ids: request_ids.to_vec(),
            reason: reason.clone(),
        };
        if let Err(e) = self.proxy.wicket.audit(event, crate::clock::now()).await {
            tracing::error!(error = %e, "cannot audit a denied SSH connection");
        }
        reason
    }

    /// The one authorization decision, with everything needed to explain a no.
    async fn authorize(
        &self,
        cert: &VerifiedSshCert,
        login: &str,
        route: &Route,
    ) -> Result<Arc<Live>, String> {
        let now = crate::clock::now();
        let wicket = &self.proxy.wicket;
        let Some(id) = cert.identity.as_ref() else {
            return Err("the certificate carries no Wicket identity".into());
        };
        let user = id.user.as_str();
        let deny =
            |reason: String| self.deny(user, &route.node_name, login, &id.request_ids, reason);
        let Some(node) = route.node.clone() else {
            return Err(deny(format!("unknown node {:?}", route.node_name)).await);
        };
        let caller =
            crate::service::Caller::of_certificate(id, cert.validity.not_after, self.peer.ip());
        let decided = match wicket
            .decide_session(&caller, now, {
                let (node, login) = (node.clone(), login.to_owned());
                move |roles, subject| roles.decide_ssh_login(subject, &node, &login)
            })
            .await
        {
            Ok(d) => d,
            Err(e) => return Err(deny(e.to_string()).await),
        };
        let decision = decided.decision;
        if !decision.allowed {
            return Err(deny(decision.reason).await);
        }
        let roles = decided.roles;
        let scoped = decided.scoped;
        let active = decided.request_ids;
        if !cert.principals.iter().any(|p| p == login) {
            return Err(deny(format!(
                "{}, but your certificate does not carry login {login:?} (it carries {}); run `wicket login --request-id ...` for new certificates",
                decision.reason,
                cert.principals.join(", ")
            ))
            .await);
        }
        let registration = wicket.open_session(
            SessionInfo {
                protocol: "ssh",
                user: user.to_owned(),
                resource: node.name.clone(),
                login: login.to_owned(),
                request_ids: active.clone(),
                started: now,
                valid_until: decided.valid_until,
                basis: decided.basis,
                // Forwardings are decided later, on these.
                held_standing: decided.standing_roles,
            },
            &decided.requests,
        );
        let Some(registration) = registration else {
            return Err(deny("wicketd is stopping".into()).await);
        };
        let session_id = registration.id.clone();
        let upstream = match upstream::connect(
            &self.proxy,
            self.shared.clone(),
            &node,
            login,
            user,
            &session_id,
            &active,
            now.timestamp(),
        )
        .await
        {
            Ok(u) => u,
            Err(e) => {
                return Err(deny(format!("cannot log into node {:?}: {e}", node.name)).await);
            }
        };
        let sref = Arc::new(SessionRef {
            session_id,
            user: user.to_owned(),
            protocol: "ssh".into(),
            resource: node.name.clone(),
            login: login.to_owned(),
            request_ids: active,
        });
        let started = AuditEvent::SessionStarted {
            session: sref.clone(),
            source: self.peer.ip().to_string(),
            database: None,
            parameters: Default::default(),
            reason: decision.reason.clone(),
        };
        if let Err(e) = wicket.audit(started, now).await {
            tracing::error!(error = %e, "cannot audit an SSH session start; refusing it");
            return Err("the audit log is unavailable; try again later".into());
        }
        let signal = registration.signal.clone();
        let (done, _) = watch::channel(false);
        Ok(Arc::new(Live {
            proxy: self.proxy.clone(),
            sref,
            node,
            roles,
            scoped,
            granted: decided.granted,
            login_until: caller.login_until,
            upstream,
            registration: Mutex::new(Some(registration)),
            signal,
            recorder: Mutex::new(None),
            early_markers: Mutex::new(Vec::new()),
            record_input: wicket.config.session.record_input,
            end_on_recording_failure: wicket.config.session.end_on_recording_failure,
            recording_failed: tokio::sync::Notify::new(),
            started: crate::clock::instant(),
            started_unix: now.timestamp(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            execs: AtomicU64::new(0),
            unrecorded_bytes: AtomicU64::new(0),
            audit_dropped: AtomicU64::new(0),
            channels_refused: self.shared.slots.refused.clone(),
            refusal_rates: Mutex::new(BTreeMap::new()),
            refusals_unrecorded: AtomicU64::new(0),
            exit_status: Mutex::new(None),
            first_session_channel: std::sync::OnceLock::new(),
            end_reason: Mutex::new(None),
            refusing: Mutex::new(None),
            session_channels: Mutex::new(Vec::new()),
            done,
            cut: self.shared.cut.clone(),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Sends a request to the node and answers the user with the node's reply.
    async fn forward(
        &mut self,
        channel: ChannelId,
        req: Up,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if matches!(self.access, Access::Denied(_)) || self.denied.contains_key(&channel) {
            // Accept the request so that the client waits for the reason.
            session.channel_success(channel)?;
            if matches!(req, Up::Shell | Up::Exec(_) | Up::Subsystem(_)) {
                if let Some((w, msg, slot)) = self.denied.remove(&channel) {
                    let handle = session.handle();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let id = w.id();
                        let _ = w
                            .extended_data_bytes(1, Bytes::from(msg.into_bytes()))
                            .await;
                        let _ = handle.exit_status_request(id, 1).await;
                        let _ = handle.eof(id).await;
                        let _ = handle.close(id).await;
                    });
                }
            }
            return Ok(());
        }
        let Some(c) = self.channels.get(&channel) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let ok = forward_to(c, req).await;
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    /// While a grant drains (`disconnect_on_expiry: false`), a channel opened
    /// before it ended may finish what it runs but start nothing new: a
    /// shell, command, subsystem, X11 or agent request on it is refused with
    /// the reason on stderr, and (with `close`) the request fails and the
    /// channel closes; without it the caller answers (russh does, from an
    /// agent request's result) and the channel's running command goes on.
    /// True when refused.
    async fn refused_while_draining(
        &self,
        channel: ChannelId,
        what: &str,
        close: bool,
        session: &mut Session,
    ) -> Result<bool, russh::Error> {
        let Some((live, notes)) = self.live_channel(channel) else {
            return Ok(false);
        };
        let Some(why) = live.refusing() else {
            return Ok(false);
        };
        refuse(live, (channel, notes), what, &why, close, session).await?;
        Ok(true)
    }

    /// The live session, for a request on one of its open session channels
    /// (channels refused at their opening answer through `forward`), and
    /// where to leave lines for that channel's user.
    fn live_channel(&self, channel: ChannelId) -> Option<(&Arc<Live>, &mpsc::Sender<Note>)> {
        let c = self.channels.get(&channel)?;
        Some((self.live()?, &c.notes))
    }

    /// With `on_recording_failure: end`, refuses a shell, exec or subsystem
    /// whose recording could not be made (or has failed).
    async fn refused_unrecorded(
        &self,
        channel: ChannelId,
        what: &str,
        session: &mut Session,
    ) -> Result<bool, russh::Error> {
        let Some((live, notes)) = self.live_channel(channel) else {
            return Ok(false);
        };
        if !live.end_on_recording_failure {
            return Ok(false);
        }
        let why = match live.existing_recorder() {
            None => "the session recording cannot be made".to_owned(),
            Some(r) => match r.failure() {
                None => return Ok(false),
                Some(why) => why,
            },
        };
        refuse(live, (channel, notes), what, &why, true, session).await?;
        Ok(true)
    }

    /// Refuses a second shell, exec or subsystem on a channel (whether the
    /// node accepted the first or not), and marks the first. A channel's
    /// recording mode is set by its first request: a later one, even one the
    /// node refuses, must not switch the recording of what runs (a refused
    /// `subsystem` once turned off the recording of the shell after it).
    async fn refused_second_start(
        &mut self,
        channel: ChannelId,
        what: &str,
        session: &mut Session,
    ) -> Result<bool, russh::Error> {
        let Some(c) = self.channels.get_mut(&channel) else {
            return Ok(false);
        };
        if !std::mem::replace(&mut c.started, true) {
            return Ok(false);
        }
        if let Some(live) = self.live() {
            live.refused_on_record(
                what,
                "this channel already asked for a shell, command or subsystem",
            )
            .await;
        }
        session.channel_failure(channel)?;
        Ok(true)
    }

    /// A forwarding the policy may refuse: refused ones get a line on stderr.
    async fn decide_forwarding(&self, kind: SshForwarding, channel: Option<ChannelId>) -> bool {
        let Some(live) = self.live() else {
            return false;
        };
        let d = live.may_forward(kind);
        if !d.allowed {
            let action = format!("{}_forwarding", kind.as_str().to_lowercase());
            if live.refusal_on_record(&action) {
                live.audit_refusal(&action, &d.reason).await;
            }
            let line = Bytes::from(format!("wicket: refused: {}\r\n", d.reason).into_bytes());
            let notes: Vec<_> = match channel {
                Some(c) => self
                    .channels
                    .get(&c)
                    .map(|c| c.notes.clone())
                    .into_iter()
                    .collect(),
                None => lock(&live.session_channels)
                    .iter()
                    .map(|(_, n)| n.clone())
                    .collect(),
            };
            for n in notes {
                let _ = n.try_send(Note::Say(line.clone(), None));
            }
        }
        d.allowed
    }
}

/// Sends `req` (with `want_reply`) to the node and waits for its answer.
/// The node answers a channel's requests in the order it got them
/// (RFC 4254 section 5.4), so answers are matched to a queue of slots. A
/// slot whose wait timed out stays queued: the node's late answer takes
/// it, and later answers still meet their own requests.
async fn forward_to(c: &Chan, req: Up) -> bool {
    let (tx, rx) = oneshot::channel();
    lock(&c.replies).push_back(tx);
    if c.to_up.send(req).await.is_err() {
        // Never sent: no answer will come for this slot (the handler
        // pushes slots one at a time, so it is the last).
        lock(&c.replies).pop_back();
        return false;
    }
    matches!(tokio::time::timeout(REPLY_TIMEOUT, rx).await, Ok(Ok(true)))
}

/// Relays a pair of channels both ways (data and EOF) until either side
/// closes, then closes both.
///
/// A write that waits on one side's window is given up when the other
/// side closes. Waiting on would wait for ever: a user who closes a
/// forward while its far end still sends (a download given up) stops
/// opening that channel's window, and the node's data, still coming,
/// would fill the channel's queue and stop the whole connection's reads.
/// Nor is the side closed here waited for: russh does not report the
/// peer's answer to a close it sent.
pub(crate) async fn pipe<A, B>(a: Channel<A>, b: Channel<B>)
where
    A: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    B: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    let over = watch::Sender::new(false);
    tokio::join!(
        carry(a_read, &b_write, &over),
        carry(b_read, &a_write, &over)
    );
    // Both at once: one side's close waiting cannot keep the other open.
    let _ = tokio::join!(a_write.close(), b_write.close());
}

/// One way of [`pipe`]: `from`'s data and EOF to `to`, until `from`
/// closes or a write fails (which ends both ways, through `over`), or the
/// other way ended them.
async fn carry<S>(
    mut from: russh::ChannelReadHalf,
    to: &russh::ChannelWriteHalf<S>,
    over: &watch::Sender<bool>,
) where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let mut ended = over.subscribe();
    loop {
        let step = async {
            match from.wait().await {
                Some(ChannelMsg::Data { data }) => to.data_bytes(data).await.is_ok(),
                Some(ChannelMsg::Eof) => to.eof().await.is_ok(),
                Some(ChannelMsg::Close) | None => false,
                // Extended data and requests mean nothing on these channels.
                Some(_) => true,
            }
        };
        let go_on = tokio::select! {
            go_on = step => go_on,
            _ = ended.wait_for(|o| *o) => return,
        };
        if !go_on {
            over.send_replace(true);
            return;
        }
    }
}

/// User → node: data and requests, in order, until the user's side ends
/// (`rx` closes) or the node's does (`node_gone`: the node → user task
/// ended). A write waiting on the window of a channel the node closed
/// would wait for ever, and the user's data behind it would fill `rx` and
/// stop the connection's reads; dropping `rx` makes those sends fail at
/// once.
async fn run_to_node(
    mut rx: mpsc::Receiver<Up>,
    up: russh::ChannelWriteHalf<russh::client::Msg>,
    mut node_gone: watch::Receiver<()>,
) {
    loop {
        let m = tokio::select! {
            m = rx.recv() => m,
            _ = node_gone.changed() => None,
        };
        let Some(m) = m else { break };
        let step = async {
            match m {
                Up::Data(d, _queued) => up.data_bytes(d).await,
                Up::Ext(ext, d, _queued) => up.extended_data_bytes(ext, d).await,
                Up::Eof => up.eof().await,
                Up::Pty {
                    term,
                    cols,
                    rows,
                    pw,
                    ph,
                    modes,
                } => {
                    up.request_pty(true, &term, cols, rows, pw, ph, &modes)
                        .await
                }
                Up::Env(k, v) => up.set_env(true, k, v).await,
                Up::Shell => up.request_shell(true).await,
                Up::Exec(cmd) => up.exec(true, cmd).await,
                Up::Subsystem(name) => up.request_subsystem(true, name).await,
                Up::WindowChange(c, r, pw, ph) => up.window_change(c, r, pw, ph).await,
                Up::Signal(s) => up.signal(s).await,
                Up::Agent => up.agent_forward(true).await,
                Up::X11 {
                    single,
                    protocol,
                    cookie,
                    screen,
                } => up.request_x11(true, single, protocol, cookie, screen).await,
            }
        };
        if !written(step, &mut node_gone).await {
            break;
        }
    }
    drop(rx);
    let _ = up.close().await;
}

/// Refuses a request on a session channel: on the recording, in the audit
/// log, and on the user's stderr; `close` closes the channel too.
async fn refuse(
    live: &Live,
    (channel, notes): (ChannelId, &mpsc::Sender<Note>),
    what: &str,
    why: &str,
    close: bool,
    session: &mut Session,
) -> Result<(), russh::Error> {
    live.refused_on_record(what, why).await;
    let line = format!("wicket: refused: {why}; nothing new starts on this connection\r\n");
    let line = Bytes::from(line.into_bytes());
    if !close {
        let _ = notes.try_send(Note::Say(line, None));
        return Ok(());
    }
    session.channel_failure(channel)?;
    // The channel's task writes the line and closes it, which also ends
    // the node's side and gives its place back. Should its queue of lines
    // be full, it is closed here, without the line.
    let last = Note::Last {
        line,
        exit_status: Some(1),
        said: None,
    };
    if notes.try_send(last).is_err() {
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
    }
    Ok(())
}

fn sftp_event(live: &Live, op: super::sftp::FileOp, error: Option<String>) -> AuditEvent {
    AuditEvent::SshSftp {
        session: live.sref.clone(),
        op: op.op.to_owned(),
        path: op.path,
        to: op.to,
        flags: op.flags,
        error,
    }
}

/// The node's channel that `open` opens for a channel the user opened
/// (`what` kind), with the user's open answered: accepted, or refused when
/// the node refuses or does not answer within [`REPLY_TIMEOUT`].
///
/// Called in the channel's own task, never in the handler's callback: a
/// callback holds up every read on the user's connection while it runs,
/// and the node's side may be waiting for one of them (a forward's output
/// blocked until the user's close of it is read).
async fn opened_on_node(
    open: impl std::future::Future<Output = Result<Channel<russh::client::Msg>, russh::Error>>,
    reply: server::ChannelOpenHandle,
    what: &str,
) -> Option<Channel<russh::client::Msg>> {
    match tokio::time::timeout(REPLY_TIMEOUT, open).await {
        Ok(Ok(c)) => {
            reply.accept().await;
            Some(c)
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer".to_owned(),
            };
            tracing::warn!(error = %why, channel = what, "the node refused a channel");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            None
        }
    }
}

/// Whether `write` succeeded before the side it writes to closed (`gone`:
/// its sender dropped, see [`Chan`] and [`run_to_node`]). A write waiting
/// on the window of a closed channel would wait for ever, while what comes
/// behind it filled a queue and stopped the connection's reads.
async fn written<E>(
    write: impl std::future::Future<Output = Result<(), E>>,
    gone: &mut watch::Receiver<()>,
) -> bool {
    tokio::select! {
        r = write => r.is_ok(),
        _ = gone.changed() => false,
    }
}

/// Node → user: output, exit status, replies to requests, until the node
/// or the user (`down`'s second half, see [`Chan`]) closes the channel.
/// The user's close is watched for, not the node's answer to the close
/// that follows it: russh does not report that answer.
async fn run_to_user(
    mut up: russh::ChannelReadHalf,
    (down, mut user_gone): (russh::ChannelWriteHalf<Msg>, watch::Receiver<()>),
    (handle, mut notes): (server::Handle, mpsc::Receiver<Note>),
    replies: Replies,
    rec: Arc<ChanRec>,
    live: Arc<Live>,
) {
    let id = down.id();
    // The node's EOF is passed on with its exit status: a client that has
    // sent its own EOF closes the channel on ours, and would then miss an
    // exit status that the node sends a moment later.
    let mut eof_pending = false;
    // Whether the user was sent EOF (nothing is written after it), and
    // whether this task closed the user's side ([`Note::Last`]).
    let mut eof_sent = false;
    let mut closed = false;
    // Set when the session's recording cannot take more: it ends for
    // that, and the node's output is no longer passed on meanwhile.
    let mut muted = false;
    // Set when a muted channel's node side ended: the session's end, not
    // the node's, closes it (with the reason).
    let mut node_done = false;
    loop {
        let m = tokio::select! {
            biased;
            _ = user_gone.changed() => break,
            Some(note) = notes.recv() => {
                let (line, said, last) = match note {
                    Note::Say(line, said) => (line, said, None),
                    Note::Last { line, exit_status, said } => (line, said, Some(exit_status)),
                };
                if !eof_sent && !written(down.extended_data_bytes(1, line), &mut user_gone).await {
                    break;
                }
                let Some(exit_status) = last else {
                    // Written: what the teller sends next goes after it.
                    drop(said);
                    continue;
                };
                // A refused start ends as a command would (status, EOF);
                // the session's end only closes, as it always did.
                if let Some(status) = exit_status {
                    let _ = written(handle.exit_status_request(id, status), &mut user_gone).await;
                    if !eof_sent {
                        let _ = written(handle.eof(id), &mut user_gone).await;
                    }
                }
                let _ = written(handle.close(id), &mut user_gone).await;
                closed = true;
                break;
            }
            m = up.wait(), if !node_done => m,
        };
        let m = match m {
            Some(ChannelMsg::Close) | None if muted => {
                node_done = true;
                continue;
            }
            Some(m) => m,
            None => break,
        };
        // A muted channel passes nothing more on (its exit status least of
        // all: the session is ending, not done), but still takes the
        // answers to requests.
        if muted && !matches!(m, ChannelMsg::Success | ChannelMsg::Failure) {
            continue;
        }
        match m {
            ChannelMsg::Data { data } => {
                // Read before the user sees it: a handle is known before
                // the user can name it.
                let refused = rec.sftp.get().map(|o| lock(o).feed(&data));
                for r in refused.into_iter().flatten() {
                    live.marker(&format!(
                        "sftp: refused by the node: {}: {}",
                        r.op.describe(),
                        r.error
                    ));
                    live.audit(sftp_event(&live, r.op, Some(r.error))).await;
                }
                // The session ends for a recording that cannot take it:
                // its end tells the user why and closes this channel.
                muted = muted || !live.record_output(&rec, &data);
                if muted {
                    continue;
                }
                live.bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if !written(down.data_bytes(data), &mut user_gone).await {
                    break;
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                muted = muted || !live.record_output(&rec, &data);
                if muted {
                    continue;
                }
                live.bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if !written(down.extended_data_bytes(ext, data), &mut user_gone).await {
                    break;
                }
            }
            ChannelMsg::Eof => eof_pending = true,
            ChannelMsg::Close => break,
            ChannelMsg::ExitStatus { exit_status } => {
                if live.first_session_channel.get() == Some(&id) {
                    *lock(&live.exit_status) = Some(exit_status);
                }
                let _ = written(handle.exit_status_request(id, exit_status), &mut user_gone).await;
                if std::mem::take(&mut eof_pending) {
                    eof_sent = true;
                    let _ = written(handle.eof(id), &mut user_gone).await;
                }
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                let signal = handle.exit_signal_request(
                    id,
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                );
                let _ = written(signal, &mut user_gone).await;
                if std::mem::take(&mut eof_pending) {
                    eof_sent = true;
                    let _ = written(handle.eof(id), &mut user_gone).await;
                }
            }
            ChannelMsg::Success | ChannelMsg::Failure => {
                let ok = matches!(m, ChannelMsg::Success);
                if let Some(tx) = lock(&replies).pop_front() {
                    let _ = tx.send(ok);
                }
            }
            ChannelMsg::XonXoff { client_can_do } => {
                let _ = written(handle.xon_xoff_request(id, client_can_do), &mut user_gone).await;
            }
            _ => {}
        }
    }
    // The node's queue is not read any more: let its sends fail at once.
    drop(up);
    // Requests still waiting will not be answered by this channel.
    lock(&replies).clear();
    // A user who closed the channel is told nothing more.
    if !closed && user_gone.has_changed().is_ok() {
        if eof_pending {
            let _ = written(handle.eof(id), &mut user_gone).await;
        }
        let _ = written(handle.close(id), &mut user_gone).await;
    }
    lock(&live.session_channels).retain(|(c, _)| *c != id);
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        if !matches!(self.access, Access::Pending) {
            return Ok(Auth::reject());
        }
        let now = crate::clock::now().timestamp();
        let blob = certificate.to_bytes().map_err(russh::Error::from)?;
        let verified = match self
            .proxy
            .trusted_users
            .verify(&blob, SshCertKind::User, now, None)
        {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(peer = %self.peer, error = %e, "SSH certificate rejected");
                return Ok(Auth::reject());
            }
        };
        let Some(identity) = &verified.identity else {
            tracing::info!(peer = %self.peer, "SSH certificate without a Wicket identity");
            return Ok(Auth::reject());
        };
        // The user is known: the connection counts against their share
        // from here, whatever the policy then says.
        if let Err(why) = self.admitted.authenticated_as(&identity.user) {
            tracing::info!(peer = %self.peer, reason = %why, "SSH connection refused");
            return Ok(Auth::reject());
        }
        let (login, route) = match &self.route {
            Some(r) => (user.to_owned(), r.clone()),
            None => match user.rsplit_once('@') {
                Some((login, node)) if !login.is_empty() => {
                    (login.to_owned(), self.proxy.route(node))
                }
                _ => {
                    let why = "no node named: connect with `wicket ssh`, through `wicket config`'s ssh_config, or as LOGIN@NODE";
                    let why = self
                        .deny(&identity.user, "", user, &identity.request_ids, why.into())
                        .await;
                    self.access = Access::Denied(why);
                    return Ok(Auth::Accept);
                }
            },
        };
        self.access = match self.authorize(&verified, &login, &route).await {
            Ok(live) => {
                *lock(&self.shared.live) = Some(live.clone());
                Access::Live(live)
            }
            Err(reason) => Access::Denied(reason),
        };
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Only Wicket certificates.
        Ok(Auth::reject())
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        // A Wicket certificate was accepted (the access decision may still
        // be a denial, shown on the channel); its user took a place in
        // `auth_openssh_certificate`.
        if let Some(live) = self.live() {
            *lock(&self.shared.server) = Some(session.handle());
            tokio::spawn(live.clone().watch(session.handle()));
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if matches!(self.access, Access::Pending) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        self.forget_ended_channels();
        let slot = match self.shared.slots.take(crate::clock::instant(), Side::User) {
            Ok(slot) => slot,
            Err(why) => {
                let live = self.live().cloned();
                self.shared.slots.refuse(why, reply, live.as_deref()).await;
                return Ok(());
            }
        };
        match &self.access {
            Access::Pending => {}
            Access::Denied(reason) => {
                let line = format!("wicket: access denied: {reason}\r\n");
                reply.accept().await;
                let (_, w) = channel.split();
                self.denied.insert(w.id(), (w, line, slot));
            }
            Access::Live(live) => {
                let live = live.clone();
                if let Some(why) = live.refusing() {
                    live.refused_as("session", "new session channel", &why)
                        .await;
                    let line = format!(
                        "wicket: refused: {why}; no new sessions on this connection (request access again)\r\n"
                    );
                    reply.accept().await;
                    let (_, w) = channel.split();
                    self.denied.insert(w.id(), (w, line, slot));
                    return Ok(());
                }
                let (_down_read, down_write) = channel.split();
                let id = down_write.id();
                let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
                let replies: Replies = Arc::default();
                let rec = Arc::new(ChanRec {
                    sftp: std::sync::OnceLock::new(),
                    mode: AtomicU8::new(REC_ALL),
                    recorded: AtomicU64::new(0),
                    input_recorded: AtomicU64::new(0),
                });
                let ended = Arc::new(AtomicBool::new(false));
                let (open, user_gone) = watch::channel(());
                let (notes, notes_rx) = mpsc::channel(NOTES_QUEUE);
                // The first session is the first the user opened, whichever
                // the node answers first.
                let _ = live.first_session_channel.set(id);
                self.channels.insert(
                    id,
                    Chan {
                        to_up: tx,
                        replies: replies.clone(),
                        rec: rec.clone(),
                        pty: None,
                        started: false,
                        sftp: None,
                        sniff: None,
                        sniffed_sftp: false,
                        ended: ended.clone(),
                        _open: open,
                        notes: notes.clone(),
                    },
                );
                // Opened in the channel's own task ([`opened_on_node`]),
                // which holds the channel's place for its life (while the
                // node's side is open).
                let handle = session.handle();
                let task = tokio::spawn({
                    let live = live.clone();
                    async move {
                        let _slot = slot;
                        let open = live.upstream.channel_open_session();
                        let Some(up) = opened_on_node(open, reply, "session").await else {
                            ended.store(true, Ordering::Relaxed);
                            return;
                        };
                        lock(&live.session_channels).push((id, notes));
                        let (up_read, up_write) = up.split();
                        // Dropped when the node → user task ends.
                        let (node_open, node_gone) = watch::channel(());
                        let to_node = tokio::spawn(run_to_node(rx, up_write, node_gone));
                        live.track(&to_node);
                        run_to_user(
                            up_read,
                            (down_write, user_gone),
                            (handle, notes_rx),
                            replies,
                            rec,
                            live.clone(),
                        )
                        .await;
                        drop(node_open);
                        ended.store(true, Ordering::Relaxed);
                    }
                });
                live.track(&task);
            }
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        // The place first: opens past the rate are not even decided (each
        // decision is audited) nor marked each.
        let slot = match self.shared.slots.take(crate::clock::instant(), Side::User) {
            Ok(slot) => slot,
            Err(why) => {
                self.shared.slots.refuse(why, reply, Some(&live)).await;
                return Ok(());
            }
        };
        if let Some(why) = live.refusing() {
            let what = format!("port forward to {host_to_connect}:{port_to_connect}");
            live.refused_as("port_forward", &what, &why).await;
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        if !self.decide_forwarding(SshForwarding::Port, None).await {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        // Opened in the forward's own task ([`opened_on_node`]).
        let (host, origin) = (host_to_connect.to_owned(), originator_address.to_owned());
        let forward = tokio::spawn({
            let live = live.clone();
            async move {
                let _slot = slot;
                let open = live.upstream.channel_open_direct_tcpip(
                    &host,
                    port_to_connect,
                    &origin,
                    originator_port,
                );
                let Some(up) = opened_on_node(open, reply, "port forward").await else {
                    return;
                };
                live.audit(AuditEvent::SshPortForward {
                    session: live.sref.clone(),
                    host: host.clone(),
                    port: port_to_connect,
                })
                .await;
                live.marker(&format!("port forward to {host}:{port_to_connect}"));
                pipe(channel, up).await
            }
        });
        live.track(&forward);
        Ok(())
    }

    /// `ssh -R`: the node listens (as its sshd allows) and each connection
    /// it takes comes back through [`ConnShared::forwarded_tcpip`]. The
    /// role's `port_forwarding` covers it, as it does `-L`.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(false);
        };
        let asked = *port;
        // Each is audited like a channel, and counts with the user's.
        if let Err(why) = self.shared.slots.allow(crate::clock::instant(), Side::User) {
            self.shared.slots.mark_too_fast(&why, Some(&live));
            return Ok(false);
        }
        if let Some(why) = live.refusing() {
            let what = format!("remote forward from the node's {address}:{asked}");
            live.refused_as("remote_forward", &what, &why).await;
            return Ok(false);
        }
        if !self.decide_forwarding(SshForwarding::Port, None).await {
            return Ok(false);
        }
        // Known before the node is asked: it may take a connection before
        // its answer is seen here.
        let id = self.shared.next_forward.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.remote_forwards).push(RemoteForward {
            id,
            address: address.to_owned(),
            bound: (asked != 0).then_some(asked),
        });
        let answer =
            tokio::time::timeout(REPLY_TIMEOUT, live.upstream.tcpip_forward(address, asked)).await;
        let bound = match answer {
            Ok(Ok(_)) if asked != 0 => Ok(asked),
            Ok(Ok(p)) if p != 0 => Ok(p),
            Ok(Ok(_)) => Err("the node did not say which port it listens on".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the node did not answer".to_owned()),
        };
        self.shared.settle_forward(id, bound.as_ref().ok().copied());
        let bound = match bound {
            Ok(p) => p,
            Err(e) => {
                live.marker(&format!(
                    "remote forward from the node's {address}:{asked} failed at the node: {e}"
                ));
                return Ok(false);
            }
        };
        *port = bound;
        live.audit(AuditEvent::SshRemoteForward {
            session: live.sref.clone(),
            address: address.to_owned(),
            port: bound,
            from: None,
        })
        .await;
        live.marker(&format!("remote forward from the node's {address}:{bound}"));
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(false);
        };
        // By the port the node listens on (for a forward to port 0, the
        // one it chose), as the node looks it up.
        let found = lock(&self.shared.remote_forwards)
            .iter()
            .find(|f| f.address == address && f.bound == Some(port))
            .map(|f| f.id);
        let Some(id) = found else {
            return Ok(false);
        };
        let cancelled = tokio::time::timeout(
            REPLY_TIMEOUT,
            live.upstream.cancel_tcpip_forward(address, port),
        )
        .await;
        if !matches!(cancelled, Ok(Ok(()))) {
            return Ok(false);
        }
        self.shared.settle_forward(id, None);
        live.marker(&format!(
            "remote forward from the node's {address}:{port} cancelled"
        ));
        Ok(true)
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(c) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        if !c.started {
            // The node would keep it for whatever starts later (an sftp
            // server, unaudited; a command, unrecorded): not passed on.
            let why = "data before a shell, command or subsystem: channel closed";
            return self.close_unsent(channel, why, session);
        }
        // A command that turns out to speak SFTP: read from its start.
        let mut from_start = None;
        if let Some(mut seen) = c.sniff.take() {
            seen.extend_from_slice(data);
            match super::sftp::opens_like_sftp(&seen) {
                None => c.sniff = Some(seen),
                Some(false) => {}
                Some(true) => {
                    c.sftp = Some(super::sftp::Reader::default());
                    c.sniffed_sftp = true;
                    c.rec.sftp.get_or_init(Default::default);
                    if let Access::Live(live) = &self.access {
                        live.marker("the command speaks SFTP: its file operations are audited too");
                    }
                    from_start = Some(seen);
                }
            }
        }
        let read = match (c.sftp.as_mut(), c.rec.sftp.get()) {
            (Some(r), Some(outcomes)) => {
                Some(r.feed(from_start.as_deref().unwrap_or(data), &mut lock(outcomes)))
            }
            _ => None,
        };
        if let Some(read) = read {
            if !self.sftp_audited(channel, read, session).await? {
                return Ok(());
            }
        }
        let Some(c) = self.channels.get(&channel) else {
            return Ok(());
        };
        if let Some(live) = self.live() {
            live.bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            // What is typed: at a terminal, into a shell without one, or
            // into a command without one (`ssh -T node bash`: up to the
            // command's cap, as its output). Subsystem data (sftp) is not.
            if let Some(r) = live.existing_recorder() {
                if r.failed() && live.recording_lost(&r) {
                    return Ok(());
                }
                let recorded = match (c.pty.is_some(), c.rec.mode.load(Ordering::Relaxed)) {
                    (true, _) | (false, REC_ALL) => r.input(crate::clock::instant(), data),
                    (false, REC_EXEC) if live.record_input => live.record_capped(
                        &r,
                        &c.rec.input_recorded,
                        data,
                        "input",
                        Recorder::input,
                    ),
                    _ => true,
                };
                if !recorded && live.recording_lost(&r) {
                    return Ok(());
                }
            }
        }
        let Some(queued) = self.queued.share(data.len()).await else {
            return Ok(());
        };
        let _ = c
            .to_up
            .send(Up::Data(Bytes::copy_from_slice(data), queued))
            .await;
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        code: u32,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get(&channel) {
            if let Some(live) = self.live() {
                live.bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            let Some(queued) = self.queued.share(data.len()).await else {
                return Ok(());
            };
            let _ = c
                .to_up
                .send(Up::Ext(code, Bytes::copy_from_slice(data), queued))
                .await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get(&channel) {
            let _ = c.to_up.send(Up::Eof).await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the sender ends the user → node task, which closes the node's channel.
        self.channels.remove(&channel);
        self.denied.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get_mut(&channel) {
            c.pty = Some((col_width, row_height, term.to_owned()));
        }
        let req = Up::Pty {
            term: term.to_owned(),
            cols: col_width,
            rows: row_height,
            pw: pix_width,
            ph: pix_height,
            modes: modes.to_vec(),
        };
        self.forward(channel, req, session).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let req = Up::Env(variable_name.to_owned(), variable_value.to_owned());
        self.forward(channel, req, session).await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self
            .refused_while_draining(channel, "shell", true, session)
            .await?
        {
            return Ok(());
        }
        if self.refused_second_start(channel, "shell", session).await? {
            return Ok(());
        }
        if let (Some(live), Some(c)) = (self.live(), self.channels.get(&channel)) {
            let (cols, rows, term) = c.pty.clone().unwrap_or((80, 24, String::new()));
            if let Some(r) = live.recorder(cols, rows, (!term.is_empty()).then_some(term.as_str()))
            {
                r.marker(crate::clock::instant(), "shell");
            }
        }
        if self.refused_unrecorded(channel, "shell", session).await? {
            return Ok(());
        }
        self.forward(channel, Up::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self
            .refused_while_draining(channel, "exec", true, session)
            .await?
        {
            return Ok(());
        }
        if self.refused_second_start(channel, "exec", session).await? {
            return Ok(());
        }
        let command = String::from_utf8_lossy(data).into_owned();
        if let (Some(live), Some(c)) = (self.live().cloned(), self.channels.get_mut(&channel)) {
            let (cols, rows, term) = c.pty.clone().unwrap_or((80, 24, String::new()));
            if c.pty.is_none() {
                c.rec.mode.store(REC_EXEC, Ordering::Relaxed);
                c.sniff = Some(Vec::new());
            }
            if let Some(r) = live.recorder(cols, rows, (!term.is_empty()).then_some(term.as_str()))
            {
                r.marker(crate::clock::instant(), &format!("exec: {command}"));
            }
        }
        if self.refused_unrecorded(channel, "exec", session).await? {
            return Ok(());
        }
        // Only on a channel that takes it: one refused at its opening gets
        // the refusal from `forward`, and nothing ran to audit.
        if let Some((live, _)) = self.live_channel(channel) {
            live.execs.fetch_add(1, Ordering::Relaxed);
            live.audit(AuditEvent::SshExec {
                session: live.sref.clone(),
                command,
            })
            .await;
        }
        self.forward(channel, Up::Exec(data.to_vec()), session)
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self
            .refused_while_draining(channel, "subsystem", true, session)
            .await?
        {
            return Ok(());
        }
        if self
            .refused_second_start(channel, "subsystem", session)
            .await?
        {
            return Ok(());
        }
        if let (Some(live), Some(c)) = (self.live().cloned(), self.channels.get(&channel)) {
            // Binary protocols (sftp) are audited, not recorded byte by byte.
            c.rec.mode.store(REC_OFF, Ordering::Relaxed);
            if let Some(r) = live.recorder(80, 24, None) {
                r.marker(crate::clock::instant(), &format!("subsystem: {name}"));
            }
        }
        if self
            .refused_unrecorded(channel, "subsystem", session)
            .await?
        {
            return Ok(());
        }
        if let Some((live, _)) = self.live_channel(channel) {
            live.execs.fetch_add(1, Ordering::Relaxed);
            live.audit(AuditEvent::SshExec {
                session: live.sref.clone(),
                command: format!("[subsystem {name}]"),
            })
            .await;
        }
        if name == "sftp" {
            if let Some(c) = self.channels.get_mut(&channel) {
                c.sftp = Some(super::sftp::Reader::default());
                c.rec.sftp.get_or_init(Default::default);
            }
        }
        self.forward(channel, Up::Subsystem(name.to_owned()), session)
            .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let recorder = self.live().and_then(|l| l.existing_recorder());
        if let Some(c) = self.channels.get_mut(&channel) {
            if let Some(p) = c.pty.as_mut() {
                p.0 = col_width;
                p.1 = row_height;
            }
            if let Some(r) = recorder {
                r.resize(crate::clock::instant(), col_width, row_height);
            }
            let _ = c
                .to_up
                .send(Up::WindowChange(
                    col_width, row_height, pix_width, pix_height,
                ))
                .await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get(&channel) {
            let _ = c.to_up.send(Up::Signal(signal)).await;
        }
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self
            .refused_while_draining(channel, "agent_forwarding", false, session)
            .await?
        {
            return Ok(false);
        }
        if !self
            .decide_forwarding(SshForwarding::Agent, Some(channel))
            .await
        {
            return Ok(false);
        }
        self.shared.agent_allowed.store(true, Ordering::Relaxed);
        let Some(c) = self.channels.get(&channel) else {
            return Ok(false);
        };
        Ok(forward_to(c, Up::Agent).await)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        single_connection: bool,
        x11_auth_protocol: &str,
        x11_auth_cookie: &str,
        x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self
            .refused_while_draining(channel, "x11_forwarding", true, session)
            .await?
        {
            return Ok(());
        }
        if !self
            .decide_forwarding(SshForwarding::X11, Some(channel))
            .await
        {
            session.channel_failure(channel)?;
            return Ok(());
        }
        self.shared.x11_allowed.store(true, Ordering::Relaxed);
        let req = Up::X11 {
            single: single_connection,
            protocol: x11_auth_protocol.to_owned(),
            cookie: x11_auth_cookie.to_owned(),
            screen: x11_screen_number,
        };
        self.forward(channel, req, session).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_opens_past_the_burst_come_at_the_rate() {
        let t0 = crate::clock::instant();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut rate = OpenRate::new(3.0, 10.0);
        assert!((0..3).all(|_| rate.allow(t0)));
        assert!(!rate.allow(t0));
        assert!(!rate.allow(ms(50)));
        // One each 100 ms, refusals or not.
        assert!(rate.allow(ms(100)));
        assert!(!rate.allow(ms(150)));
        assert!(rate.allow(ms(200)));
        // A pause fills the burst again, no more.
        let later = ms(60_000);
        assert!((0..3).all(|_| rate.allow(later)));
        assert!(!rate.allow(later));
        // A clock that seems to step back gives nothing.
        assert!(!rate.allow(ms(59_000)));

        // Refusals are marked at first, then once per period.
        let every = Duration::from_secs(10);
        assert!(rate.mark(t0, every));
        assert!(!rate.mark(ms(9_999), every));
        assert!(rate.mark(ms(10_000), every));
    }

    #[tokio::test]
    async fn a_connection_opening_channels_in_a_loop_is_refused_past_the_rate() {
        let slots = ChannelSlots::default();
        const DEFAULT_BURST: usize = 300;
        assert_eq!(
            crate::config::Limits::default().ssh_channel_burst as usize,
            DEFAULT_BURST
        );
        let t0 = crate::clock::instant();
        let (mut opened, mut marks) = (0, Vec::new());
        for i in 0..(DEFAULT_BURST + 50) {
            // Each closes at once: only the rate holds them back.
            match slots.take(t0 + Duration::from_micros(i as u64), Side::Node) {
                Ok(_) => opened += 1,
                Err(NoSlot::TooFast { mark }) => marks.extend(mark),
                Err(NoSlot::Full) => panic!("full"),
            }
        }
        assert_eq!(opened, DEFAULT_BURST);
        assert_eq!(slots.refused.load(Ordering::Relaxed), 50);
        assert_eq!(marks, [1]);
        assert!(matches!(
            slots.take(t0 + Duration::from_millis(1), Side::Node),
            Err(NoSlot::TooFast { mark: None })
        ));
        assert!(slots
            .take(t0 + Duration::from_millis(100), Side::Node)
            .is_ok());
        // The user's rate is their own: a node's loop does not use it up.
        assert!(slots
            .take(t0 + Duration::from_millis(100), Side::User)
            .is_ok());
        assert!(slots
            .allow(t0 + Duration::from_millis(100), Side::User)
            .is_ok());

        // Within the burst, every place can be taken at once; past them,
        // the refusal is for want of a place.
        const { assert!(DEFAULT_BURST > MAX_CHANNELS) };
        let slots = ChannelSlots::default();
        let held: Vec<_> = (0..MAX_CHANNELS)
            .map(|_| slots.take(t0, Side::User).ok())
            .collect();
        assert!(held.iter().all(Option::is_some));
        assert!(matches!(slots.take(t0, Side::Node), Err(NoSlot::Full)));
    }

    /// What waits for the nodes, over all of a connection's channels, is
    /// bounded: past the budget a share waits until one is given back.
    #[tokio::test]
    async fn bytes_queued_for_the_nodes_are_bounded_per_connection() {
        let budget = QueueBudget::new(64 << 10);
        let mut held = vec![
            budget.share(32 << 10).await.unwrap(),
            budget.share(32 << 10).await.unwrap(),
        ];
        assert_eq!(budget.left.available_permits(), 0);
        let take = |len: usize| {
            let b = budget.clone();
            tokio::spawn(async move { b.share(len).await.map(|p| p.num_permits()) })
        };
        let small = take(1);
        // Larger than the whole budget: it waits for all of it, and then
        // goes through (it is not stuck for ever).
        let big = take(1 << 20);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!small.is_finished() && !big.is_finished());
        held.pop();
        assert_eq!(small.await.unwrap(), Some(1));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!big.is_finished());
        held.clear();
        assert_eq!(big.await.unwrap(), Some(64 << 10));
        assert_eq!(budget.left.available_permits(), 64 << 10);
    }

    #[tokio::test]
    async fn the_channel_rate_is_the_configured_one() {
        let slots = ChannelSlots::new(5, 2);
        let t0 = crate::clock::instant();
        let opened = (0..20)
            .filter(|_| slots.take(t0, Side::User).is_ok())
            .count();
        assert_eq!(opened, 5);
        // Two a second after the burst: one more after half a second.
        let half = t0 + Duration::from_millis(500);
        assert!(slots.take(half, Side::User).is_ok());
        assert!(slots.take(half, Side::User).is_err());
        assert_eq!(slots.refused.load(Ordering::Relaxed), 16);
    }
}
