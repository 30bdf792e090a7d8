//! Typed audit events. Every event is one variant; it is stored as its kind
//! (the variant name), actor, optional request/session IDs, and its fields as
//! JSON. Secrets never appear in an event.

use crate::config::{AuditOverflow, AuditSettings};
use crate::store::{AuditRow, Store};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Something that happened and must be on the record.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    UserCreated {
        user: String,
        roles: Vec<String>,
        team: Option<String>,
        totp: bool,
    },
    /// An administrator disabled (or re-enabled) a user: a disabled user
    /// cannot log in, and their live sessions end.
    UserDisabled { user: String, disabled: bool },
    /// An administrator set a user's standing roles (`roles`, replacing
    /// `previous`): their live sessions that the old ones alone allowed
    /// end.
    UserRolesSet {
        user: String,
        roles: Vec<String>,
        previous: Vec<String>,
    },
    /// An administrator let a user log in again past the failed logins in
    /// their name (`cleared` of them no longer count against the user;
    /// they still count against their sources).
    UserUnlocked { user: String, cleared: u64 },
    LoginSucceeded {
        user: String,
        source: String,
        /// `password`, `password+totp`, or `certificate` (reissue over mTLS).
        method: String,
        roles: Vec<String>,
        principals: Vec<String>,
        request_ids: Vec<String>,
        valid_after: DateTime<Utc>,
        valid_before: DateTime<Utc>,
        ssh_serial: u64,
        ssh_key_fingerprint: String,
        tls_serial: String,
    },
    LoginFailed {
        user: String,
        source: String,
        reason: String,
    },
    LoginRateLimited {
        user: String,
        source: String,
        retry_after_secs: u64,
        /// Refusals on this wicketd for this user, and from this source,
        /// since the last such event for them, that have no event of their
        /// own (see [`crate::auth::RefusalLog`]).
        unrecorded_for_user: u64,
        unrecorded_from_source: u64,
    },
    AccessDenied {
        user: String,
        action: String,
        reason: String,
        /// Refusals of this user's calls on this wicketd since their last
        /// such event, folded into this one with no event of their own
        /// (see [`crate::auth::DenialLog`]; always 0 for refusals inside
        /// an SSH session, which are session events).
        unrecorded_before: u64,
        /// The SSH session a refusal inside one belongs to: the row is
        /// stored under it and its requests (not in the data).
        #[serde(skip)]
        session: Option<Arc<SessionRef>>,
    },
    /// A step in an access request's life (`request_created`,
    /// `request_approved`, `grant_activated`, `grant_revoked`, ...): the kind
    /// comes from the policy state machine's audit effect.
    AccessRequest {
        action: String,
        actor: String,
        request_id: String,
        state: String,
        detail: String,
    },
    /// A proxied connection was refused (by policy or for bad input).
    SessionDenied {
        user: String,
        protocol: String,
        resource: String,
        login: String,
        source: String,
        request_ids: Vec<String>,
        reason: String,
    },
    /// A proxied session began; `reason` is the policy's.
    SessionStarted {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        source: String,
        /// Database name (PostgreSQL sessions).
        #[serde(skip_serializing_if = "Option::is_none")]
        database: Option<String>,
        /// The other startup parameters a PostgreSQL session began with
        /// (`options`, `application_name`, `search_path`, ...), as sent on.
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        parameters: std::collections::BTreeMap<String, String>,
        reason: String,
    },
    SessionEnded {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        bytes_from_client: u64,
        bytes_to_client: u64,
        /// Statements (PostgreSQL) or exec commands (SSH).
        statements: u64,
        /// The exit status of the connection's first session channel (of
        /// a multiplexed `ssh`, the master's command).
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_status: Option<u32>,
        /// Audit events of this session dropped because the audit store
        /// could not keep up (`drop-and-count`).
        audit_dropped: u64,
        /// Channels refused because the connection opened them faster than
        /// wicketd takes them (SSH).
        #[serde(skip_serializing_if = "is_zero")]
        channels_refused: u64,
        /// Refused requests inside the session past the rate at which
        /// each is audited (SSH): counted here only.
        #[serde(skip_serializing_if = "is_zero")]
        refusals_unrecorded: u64,
        /// Bytes of commands' output and input (SSH, without a terminal)
        /// past the recording's cap per command, not recorded (the
        /// recording marks where each stops).
        #[serde(skip_serializing_if = "is_zero")]
        unrecorded_bytes: u64,
        /// Why the session's recording stopped before the session ended
        /// (its size limit, or a file that could not be written).
        #[serde(skip_serializing_if = "Option::is_none")]
        recording_stopped: Option<String>,
        reason: String,
    },
    /// A simple-protocol Query.
    DbQuery {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        statement: Arc<str>,
    },
    /// An extended-protocol Parse.
    DbParse {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        name: String,
        statement: String,
    },
    /// An extended-protocol Execute, with what the Bind before it carried.
    DbExecute {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        portal: String,
        statement: Arc<str>,
        params: usize,
        /// The Bind's values (`audit.db_parameter_values`), on the first
        /// Execute of the portal only.
        #[serde(skip_serializing_if = "Option::is_none")]
        values: Option<crate::pg::track::Values>,
        /// How many of the last values are not in `values`: they were over
        /// what one event records.
        #[serde(skip_serializing_if = "is_zero")]
        values_not_recorded: usize,
        /// An Execute of a portal executed before (fetching more of its
        /// rows): its values are on the first.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        continued: bool,
        /// Sent to the server, which had not answered it when the connection
        /// ended: it may have run.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        unanswered: bool,
        /// The server's command tag when it completed (`SELECT 5`).
        #[serde(skip_serializing_if = "Option::is_none")]
        completed: Option<String>,
        /// The tag names another command than `statement`: dynamic SQL in
        /// a function changed the portal or its statement after the Bind,
        /// and what ran is not `statement` (see the session's queries).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        not_as_bound: bool,
    },
    /// A fast-path FunctionCall by OID, with its argument count (values of
    /// large-object calls only with `audit.db_parameter_values`; of any
    /// other function's call always, as they are all it says).
    DbFunctionCall {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        function_oid: u32,
        args: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        values: Option<crate::pg::track::Values>,
        /// How many of the last arguments are not in `values` (over what
        /// one event records).
        #[serde(skip_serializing_if = "is_zero")]
        values_not_recorded: usize,
    },
    /// COPY began (`in`: client to server, `out`: server to client).
    DbCopy {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        direction: String,
        statement: Arc<str>,
    },
    /// A query or function call audited as sent that the server skipped:
    /// an error in the extended protocol before it makes the server skip
    /// every message up to the next Sync.
    DbSkipped {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        statement: Arc<str>,
    },
    /// An ErrorResponse from the server.
    DbError {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        code: String,
        message: String,
    },
    /// An SSH exec request.
    SshExec {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        command: String,
    },
    /// An SSH port forward was opened.
    SshPortForward {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        host: String,
        port: u32,
    },
    /// The node listens for the user's remote forward (`ssh -R`), or (with
    /// `from`: who connected) took a connection on it.
    SshRemoteForward {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        address: String,
        port: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// A file operation an SFTP (or scp) client asked the node for: `op`
    /// is open, remove, rename, link, symlink, mkdir, rmdir, setstat,
    /// opendir or extended (see `ssh::sftp`).
    SshSftp {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        op: String,
        path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        flags: Option<String>,
        /// The node refused the operation (an event of its own, after the
        /// one that asked): its status and message.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A program on the node connected to the session's X11 display
    /// (`from`: its address there), passed to the user's display.
    SshX11 {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        from: String,
    },
    /// A program on the node opened a connection to the user's forwarded
    /// agent (what it asked the agent is not seen: that is between the
    /// node and the user's agent).
    SshAgent {
        #[serde(flatten)]
        session: Arc<SessionRef>,
    },
    /// A session's recording was deleted for `session.recording_retention`
    /// (`kept_for`), by wicketd: from its data directory (`from`:
    /// `data_dir`) or from the shared store (`store`). A recording copied
    /// to the store has one event for each.
    RecordingDeleted {
        #[serde(flatten)]
        session: Arc<SessionRef>,
        started: DateTime<Utc>,
        kept_for: String,
        from: &'static str,
    },
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// Who, where and under which grants: carried by every session event.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRef {
    pub session_id: String,
    pub user: String,
    pub protocol: String,
    pub resource: String,
    /// SSH login or database user.
    pub login: String,
    pub request_ids: Vec<String>,
}

/// The actor of what wicketd does by itself (timers, retention); no user
/// may take the name.
pub const SYSTEM_ACTOR: &str = "wicketd";

/// Kinds that count as actions taken under a grant.
pub const SESSION_ACTION_KINDS: &[&str] = &[
    "session_started",
    "db_query",
    "db_execute",
    "db_copy",
    "kube_request",
    "ssh_exec",
    "ssh_port_forward",
    "ssh_remote_forward",
    "ssh_x11",
    "ssh_agent",
    "ssh_sftp",
];

/// Kinds a database session produces at the rate of its statements: the
/// store keeps a session's run of them in one row (see `store::groups`).
pub const STATEMENT_KINDS: &[&str] = &[
    "db_query",
    "db_parse",
    "db_execute",
    "db_function_call",
    "db_copy",
    "db_error",
    "db_skipped",
];

impl AuditEvent {
    /// The stored kind: the variant's snake_case name.
    pub fn kind(&self) -> &str {
        match self {
            Self::AccessRequest { action, .. } => action,
            Self::UserCreated { .. } => "user_created",
            Self::UserDisabled { .. } => "user_disabled",
            Self::UserRolesSet { .. } => "user_roles_set",
            Self::UserUnlocked { .. } => "user_unlocked",
            Self::LoginSucceeded { .. } => "login_succeeded",
            Self::LoginFailed { .. } => "login_failed",
            Self::LoginRateLimited { .. } => "login_rate_limited",
            Self::AccessDenied { .. } => "access_denied",
            Self::SessionDenied { .. } => "session_denied",
            Self::SessionStarted { .. } => "session_started",
            Self::SessionEnded { .. } => "session_ended",
            Self::DbQuery { .. } => "db_query",
            Self::DbParse { .. } => "db_parse",
            Self::DbExecute { .. } => "db_execute",
            Self::DbFunctionCall { .. } => "db_function_call",
            Self::DbCopy { .. } => "db_copy",
            Self::DbError { .. } => "db_error",
            Self::DbSkipped { .. } => "db_skipped",
            Self::SshExec { .. } => "ssh_exec",
            Self::SshPortForward { .. } => "ssh_port_forward",
            Self::SshRemoteForward { .. } => "ssh_remote_forward",
            Self::SshX11 { .. } => "ssh_x11",
            Self::SshAgent { .. } => "ssh_agent",
            Self::SshSftp { .. } => "ssh_sftp",
            Self::RecordingDeleted { .. } => "recording_deleted",
        }
    }

    pub fn actor(&self) -> &str {
        match self {
            Self::UserCreated { user, .. }
            | Self::UserDisabled { user, .. }
            | Self::UserRolesSet { user, .. }
            | Self::UserUnlocked { user, .. }
            | Self::LoginSucceeded { user, .. }
            | Self::LoginFailed { user, .. }
            | Self::LoginRateLimited { user, .. }
            | Self::AccessDenied { user, .. }
            | Self::SessionDenied { user, .. } => user,
            Self::AccessRequest { actor, .. } => actor,
            // The session's user did not do it.
            Self::RecordingDeleted { .. } => SYSTEM_ACTOR,
            _ => self.session().map(|s| s.user.as_str()).unwrap_or_default(),
        }
    }

    /// The session this event belongs to, if any.
    pub fn session(&self) -> Option<&SessionRef> {
        match self {
            Self::SessionStarted { session, .. }
            | Self::SessionEnded { session, .. }
            | Self::DbQuery { session, .. }
            | Self::DbParse { session, .. }
            | Self::DbExecute { session, .. }
            | Self::DbFunctionCall { session, .. }
            | Self::DbCopy { session, .. }
            | Self::DbError { session, .. }
            | Self::DbSkipped { session, .. }
            | Self::SshExec { session, .. }
            | Self::SshPortForward { session, .. }
            | Self::SshRemoteForward { session, .. }
            | Self::SshX11 { session, .. }
            | Self::SshAgent { session }
            | Self::SshSftp { session, .. }
            | Self::RecordingDeleted { session, .. } => Some(&**session),
            Self::AccessDenied {
                session: Some(session),
                ..
            } => Some(&**session),
            _ => None,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::LoginSucceeded { request_ids, .. } => request_ids.first().map(String::as_str),
            Self::AccessRequest { request_id, .. } => Some(request_id),
            Self::SessionDenied { request_ids, .. } => request_ids.first().map(String::as_str),
            _ => self
                .session()
                .and_then(|s| s.request_ids.first())
                .map(String::as_str),
        }
    }

    /// The row to store at `time_ms`.
    pub fn to_row(&self, time_ms: i64) -> AuditRow {
        AuditRow {
            // Time-ordered, so events of one session keep their order within
            // a millisecond.
            id: event_id(time_ms),
            time_ms,
            kind: self.kind().to_owned(),
            actor: Some(self.actor().to_owned()),
            request_id: self.request_id().map(str::to_owned),
            session_id: self.session().map(|s| s.session_id.clone()),
            data: serde_json::to_string(self).unwrap_or_else(|_| "{}".into()),
        }
    }
}

/// A time-ordered (UUIDv7 layout) event ID without a system call: the
/// random part is a per-process random seed plus a counter, so IDs stay
/// unique across wicketds sharing a store (`Uuid::now_v7` asks the kernel
/// for randomness on every event).
fn event_id(time_ms: i64) -> String {
    use std::sync::OnceLock;
    static SEED: OnceLock<u128> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u128());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tail = seed.wrapping_add(u128::from(n)).to_be_bytes();
    let mut random = [0u8; 10];
    random.copy_from_slice(&tail[6..]);
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(time_ms).unwrap_or(0), &random)
        .into_uuid()
        .to_string()
}

/// The bounded, asynchronous path from sessions to the store: session
/// events are queued and a writer task stores them in batches (one
/// transaction each), so statements are never slowed by a store round trip.
/// When the queue is full, `block` makes the session wait; `drop-and-count`
/// drops the event and counts it (per session and in total) — the count is
/// logged and recorded in the session's end event.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Queued>,
    overflow: AuditOverflow,
    dropped: Arc<AtomicU64>,
}

enum Queued {
    /// Serialized by the writer, off the session's path.
    Event(Box<AuditEvent>, i64),
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("overflow", &self.overflow)
            .field("dropped", &self.dropped_total())
            .finish()
    }
}

/// Most events stored in one transaction.
const BATCH: usize = 4096;

impl AuditSink {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Store, settings: &AuditSettings) -> Self {
        let (tx, rx) = mpsc::channel(settings.queue_size.max(1));
        tokio::spawn(writer(store, rx));
        Self {
            tx,
            overflow: settings.on_overflow,
            dropped: Arc::default(),
        }
    }

    /// Queues `event`. Returns false when it was dropped (`drop-and-count`
    /// with a full queue); `session_dropped` is then incremented.
    pub async fn send(&self, event: AuditEvent, now_ms: i64, session_dropped: &AtomicU64) -> bool {
        let row = Queued::Event(Box::new(event), now_ms);
        match self.overflow {
            AuditOverflow::Block => self.tx.send(row).await.is_ok(),
            AuditOverflow::DropAndCount => self.offer(row, session_dropped),
        }
    }

    /// Queues the events of `pending` (each with its time), oldest first.
    /// Cancel-safe: an event leaves `pending` only once it is queued (or
    /// dropped and counted), so a caller that stops waiting (its session
    /// ended meanwhile) still holds the rest, to queue them later.
    pub async fn send_pending(
        &self,
        pending: &mut std::collections::VecDeque<(AuditEvent, i64)>,
        session_dropped: &AtomicU64,
    ) {
        while !pending.is_empty() {
            match self.overflow {
                AuditOverflow::Block => {
                    let Ok(permit) = self.tx.reserve().await else {
                        tracing::error!(lost = pending.len(), "audit writer is gone; events lost");
                        pending.clear();
                        return;
                    };
                    if let Some((event, at)) = pending.pop_front() {
                        permit.send(Queued::Event(Box::new(event), at));
                    }
                }
                AuditOverflow::DropAndCount => {
                    if let Some((event, at)) = pending.pop_front() {
                        self.offer(Queued::Event(Box::new(event), at), session_dropped);
                    }
                }
            }
        }
    }

    /// `drop-and-count`: queues `row` if there is room, else counts it.
    fn offer(&self, row: Queued, session_dropped: &AtomicU64) -> bool {
        match self.tx.try_send(row) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                session_dropped.fetch_add(1, Ordering::Relaxed);
                let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if total.is_power_of_two() {
                    tracing::warn!(
                            dropped_total = total,
                            "audit queue full: session events dropped (audit.on_overflow: drop-and-count)"
                        );
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues `event`, waiting for room whatever the overflow setting
    /// (session start and end are always on the record).
    pub async fn send_always(&self, event: AuditEvent, now_ms: i64) {
        let kind = event.kind().to_owned();
        if self
            .tx
            .send(Queued::Event(Box::new(event), now_ms))
            .await
            .is_err()
        {
            tracing::error!(kind = %kind, "audit writer is gone; event lost");
        }
    }

    /// Events dropped since start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every event queued before this call is stored.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Queued::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// How long the writer lets events collect before storing a batch that is
/// not full: few, larger transactions. The writer sleeps through it instead
/// of being woken by every event (a cross-thread wake-up per statement).
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

async fn writer(store: Store, mut rx: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut waiters = Vec::new();
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut next = Some(first);
        let mut slept = false;
        loop {
            match next.take() {
                Some(Queued::Event(e, at)) => batch.push(e.to_row(at)),
                Some(Queued::Flush(w)) => waiters.push(w),
                None => {}
            }
            if batch.len() >= BATCH || !waiters.is_empty() {
                break;
            }
            next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
                // Sleep once for the rest of the linger, then take what came.
                Err(mpsc::error::TryRecvError::Empty) if !slept => {
                    slept = true;
                    tokio::time::sleep_until(deadline).await;
                    None
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            };
        }
        if !batch.is_empty() {
            store_batch(&store, &batch).await;
            batch.clear();
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Stores `batch`, retrying while the store fails (the queue then fills up
/// and the overflow setting decides): events are never silently lost. A
/// failure after which the batch is found stored (the commit went through
/// but its answer was lost) counts as stored, or the retries would fail on
/// its IDs for ever.
async fn store_batch(store: &Store, batch: &[AuditRow]) {
    let mut delay = std::time::Duration::from_millis(50);
    while let Err(e) = store.append_audit_batch(batch).await {
        if let Ok(true) = store.audit_batch_stored(batch).await {
            tracing::warn!(error = %e, events = batch.len(), "storing audit events reported a failure, but they are stored");
            return;
        }
        tracing::error!(error = %e, events = batch.len(), "storing audit events failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch whose commit went through but whose answer was lost is not
    /// retried for ever (its IDs are taken): the writer finds it stored.
    #[tokio::test]
    async fn a_batch_stored_by_a_lost_commit_is_not_retried_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let batch: Vec<AuditRow> = (0..3).map(|n| query(n).to_row(n as i64)).collect();
        assert!(!store.audit_batch_stored(&batch).await.unwrap());
        store.append_audit_batch(&batch).await.unwrap();
        assert!(store.audit_batch_stored(&batch).await.unwrap());
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store_batch(&store, &batch),
        )
        .await
        .expect("the stored batch is not stored again");
        let rows = stored(&store).await;
        assert_eq!(rows.len(), 3, "stored once");
    }

    #[test]
    fn event_ids_are_unique_time_ordered_uuids() {
        let ids: Vec<String> = (0..1000)
            .map(|i| event_id(1_700_000_000_000 + i / 100))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "ordered by time, then by creation");
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        let u = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(u.get_version_num(), 7);
        let (secs, _) = u.get_timestamp().unwrap().to_unix();
        assert_eq!(secs, 1_700_000_000);
    }

    #[test]
    fn kind_matches_serialized_tag() {
        let e = AuditEvent::LoginFailed {
            user: "alice".into(),
            source: "127.0.0.1".into(),
            reason: "wrong password".into(),
        };
        let row = e.to_row(5);
        let v: serde_json::Value = serde_json::from_str(&row.data).unwrap();
        assert_eq!(v["event"], row.kind);
        assert_eq!(row.actor.as_deref(), Some("alice"));
    }

    fn query(n: usize) -> AuditEvent {
        AuditEvent::DbQuery {
            session: Arc::new(SessionRef {
                session_id: "s1".into(),
                user: "alice".into(),
                protocol: "postgres".into(),
                resource: "prod-pg".into(),
                login: "app".into(),
                request_ids: vec!["r1".into()],
            }),
            statement: format!("select {n}").into(),
        }
    }

    async fn stored(store: &Store) -> Vec<AuditRow> {
        store
            .search_audit(&crate::store::AuditFilter {
                session_id: Some("s1".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
    }

    async fn sqlite_store(dir: &std::path::Path) -> Store {
        let key = crate::store::ChainKey::for_tests();
        Store::open(&crate::config::Storage::Sqlite, dir, key)
            .await
            .unwrap()
    }

    /// On a current-thread runtime the writer cannot run until the test
    /// yields, so a queue of one fills up deterministically.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_or_blocks_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let settings = AuditSettings {
            queue_size: 1,
            on_overflow: AuditOverflow::DropAndCount,
            db_parameter_values: false,
        };
        let sink = AuditSink::start(store.clone(), &settings);
        let session_dropped = AtomicU64::new(0);
        let mut kept = 0;
        for n in 0..5 {
            if sink.send(query(n), n as i64, &session_dropped).await {
                kept += 1;
            }
        }
        assert_eq!(kept, 1);
        assert_eq!(session_dropped.load(Ordering::Relaxed), 4);
        assert_eq!(sink.dropped_total(), 4);
        sink.flush().await;
        let rows = stored(&store).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].session_id.as_deref(), Some("s1"));
        assert_eq!(rows[0].request_id.as_deref(), Some("r1"));

        // `block`: every event arrives, in order, whatever the queue size.
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let sink = AuditSink::start(
            store.clone(),
            &AuditSettings {
                on_overflow: AuditOverflow::Block,
                ..settings
            },
        );
        let none = AtomicU64::new(0);
        for n in 0..50 {
            assert!(sink.send(query(n), 7, &none).await);
        }
        sink.flush().await;
        let rows = stored(&store).await;
        assert_eq!(rows.len(), 50);
        assert_eq!(none.load(Ordering::Relaxed), 0);
        let statements: Vec<String> = rows
            .iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.data).unwrap()["statement"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let expected: Vec<String> = (0..50).map(|n| format!("select {n}")).collect();
        assert_eq!(
            statements, expected,
            "same-millisecond events keep their order"
        );
    }

    fn statement(q: Option<Queued>) -> String {
        match q {
            Some(Queued::Event(e, _)) => match *e {
                AuditEvent::DbQuery { statement, .. } => statement.to_string(),
                _ => "other".into(),
            },
            _ => "none".into(),
        }
    }

    /// A session side that stops waiting for room in a full queue (`block`)
    /// keeps every event not queued yet, in order, for the relay to queue
    /// later: none is lost by the cancellation.
    #[tokio::test]
    async fn pending_events_survive_a_cancelled_wait() {
        let (tx, mut rx) = mpsc::channel(1);
        let sink = AuditSink {
            tx,
            overflow: AuditOverflow::Block,
            dropped: Arc::default(),
        };
        let dropped = AtomicU64::new(0);
        let mut pending: std::collections::VecDeque<(AuditEvent, i64)> =
            (0..3).map(|n| (query(n), 0)).collect();
        let wait = std::time::Duration::from_millis(50);
        // Room for one: it is queued, then the wait for more is cancelled.
        let _ = tokio::time::timeout(wait, sink.send_pending(&mut pending, &dropped)).await;
        assert_eq!(pending.len(), 2);
        let _ = tokio::time::timeout(wait, sink.send_pending(&mut pending, &dropped)).await;
        assert_eq!(pending.len(), 2, "nothing taken while the queue is full");
        assert_eq!(statement(rx.recv().await), "select 0");
        let _ = tokio::time::timeout(wait, sink.send_pending(&mut pending, &dropped)).await;
        assert_eq!(pending.len(), 1);
        assert_eq!(statement(rx.recv().await), "select 1");
        sink.send_pending(&mut pending, &dropped).await;
        assert!(pending.is_empty());
        assert_eq!(statement(rx.recv().await), "select 2");
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }
}
