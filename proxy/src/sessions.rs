//! Live sessions (SSH, PostgreSQL, ...) and ending them when their grant ends.
//!
//! Every proxied connection registers here and gets a [`SessionHandle`]: its
//! ID and a watch channel on which it learns to warn its user or to end. The
//! registry does not decide anything itself: [`Wicket::refresh_sessions`]
//! re-reads, every 250 ms, the grant state of every request behind a live
//! session from the store — so a revoke, drop or expiry applied by any proxy
//! sharing the store ends the session here — and a local state change ends
//! them at once (`Wicket::signal_sessions`). [`Wicket::enforce_sessions`]
//! applies the last state read every 250 ms without the store, so expiry is
//! on time even when the store is slow or down, and fails closed: sessions
//! whose grant or user could not be read for `session.unverified_grace` end.
//! When a grant ends a session, and with what words, is the policy's
//! (`AccessRequest::session_end` / `session_warning`). A session also ends
//! when its user is disabled or removed (`wicketd users disable`), whatever
//! roles it runs under.

use crate::service::Wicket;
use crate::store::UserRecord;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;
use wicket_policy::AccessRequest;

/// Resolves `grace` after `rx` first holds a value that `ended` picks
/// something from (at once if it holds one already), with what it picked;
/// never if the sender goes away first. A session told to end gets this
/// long to close before its connection is dropped, whatever its client does.
pub async fn after_grace<T, R>(
    mut rx: watch::Receiver<T>,
    ended: impl Fn(&T) -> Option<R>,
    grace: std::time::Duration,
) -> R {
    let picked = loop {
        if let Some(picked) = ended(&rx.borrow_and_update()) {
            break picked;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::time::sleep(grace).await;
    picked
}

/// What a live session is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Run,
    /// Tell the user (once) that the grant ends soon.
    Warn(String),
    /// The grant (or, under standing roles, the login) ended but sessions
    /// may finish (`disconnect_on_expiry: false`): what runs goes on,
    /// nothing new starts (no new SSH channels). The text names the request
    /// or the login, and why.
    Drain(String),
    /// End now; the text names the request and why.
    End(String),
}

/// What the registry knows about one live session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub protocol: &'static str,
    pub user: String,
    pub resource: String,
    /// SSH login or database user.
    pub login: String,
    pub request_ids: Vec<String>,
    pub started: DateTime<Utc>,
    /// When the session ends under standing roles (Unix seconds): the
    /// certificate's end, or the login's if that comes first.
    pub valid_until: i64,
    /// What the session stands on besides its grants: `None` when the
    /// grants behind it allow it alone (it follows them), else its
    /// decision again, for the user's standing roles as they change.
    pub basis: Option<Arc<StandingBasis>>,
    /// Standing roles the session's later decisions rest on (an SSH
    /// session's forwardings): it ends when one of them is taken away.
    /// Empty for a session decided once, at its start.
    pub held_standing: Vec<String>,
}

/// A session the user's standing roles allow (alone, or with grants that
/// would not): how to ask the policy again whether they still do.
pub struct StandingBasis {
    /// The grants in force when it opened, each with where its roles
    /// hold; their own ends are followed apart.
    pub grants: Vec<wicket_policy::GrantScope>,
    /// The policy decision it was opened on.
    pub decide: Arc<Decide>,
}

/// One policy decision for a session: may a subject with these roles open
/// it?
pub type Decide = dyn Fn(&wicket_policy::RoleSet, &wicket_policy::Subject<'_>) -> wicket_policy::Decision
    + Send
    + Sync;

impl std::fmt::Debug for StandingBasis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandingBasis")
            .field("grants", &self.grants)
            .finish_non_exhaustive()
    }
}

struct Entry {
    info: SessionInfo,
    tx: watch::Sender<Signal>,
    warned: bool,
}

/// The live sessions of this wicketd.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<BTreeMap<String, Entry>>,
    /// Set (under `map`'s lock) once wicketd is stopping: no session
    /// registers after, so every one that started is waited for and ends
    /// on the record.
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("live", &self.len())
            .finish()
    }
}

/// A registered session; dropping it unregisters the session.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: String,
    pub signal: watch::Receiver<Signal>,
    sessions: Arc<Sessions>,
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.id);
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session under a fresh ID; none once wicketd is stopping
    /// ([`Self::stop_all`]).
    pub fn register(self: &Arc<Self>, info: SessionInfo) -> Option<SessionHandle> {
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = watch::channel(Signal::Run);
        let mut map = self.lock();
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        map.insert(
            id.clone(),
            Entry {
                info,
                tx,
                warned: false,
            },
        );
        drop(map);
        Some(SessionHandle {
            id,
            signal: rx,
            sessions: self.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether session `id` is live here.
    pub fn is_live(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The live sessions, by ID.
    pub fn list(&self) -> Vec<(String, SessionInfo)> {
        self.lock()
            .iter()
            .map(|(id, e)| (id.clone(), e.info.clone()))
            .collect()
    }

    /// Every request ID some live session runs under.
    pub fn request_ids(&self) -> BTreeSet<String> {
        self.lock()
            .values()
            .flat_map(|e| e.info.request_ids.iter().cloned())
            .collect()
    }

    /// Ends every live session running under `request_id`. Returns how many.
    pub fn end_for_request(&self, request_id: &str, why: &str) -> usize {
        self.end_where(|i| i.request_ids.iter().any(|r| r == request_id), why)
    }

    /// Every user with a live session.
    pub fn users(&self) -> BTreeSet<String> {
        self.lock().values().map(|e| e.info.user.clone()).collect()
    }

    /// Ends every live session of `user`. Returns how many.
    pub fn end_for_user(&self, user: &str, why: &str) -> usize {
        self.end_where(|i| i.user == user, why)
    }

    /// Ends every live session (wicketd is stopping). Returns how many.
    pub fn end_all(&self, why: &str) -> usize {
        self.end_where(|_| true, why)
    }

    /// wicketd is stopping: no session registers from now on, and every
    /// live one is ended. Returns how many.
    pub fn stop_all(&self, why: &str) -> usize {
        {
            let _map = self.lock();
            self.stopping
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.end_all(why)
    }

    /// `user`'s live sessions that stand on their standing roles, by ID.
    fn standing_of(&self, user: &str) -> Vec<(String, Arc<StandingBasis>)> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.info.user == user)
            .filter_map(|(id, e)| Some((id.clone(), e.info.basis.clone()?)))
            .collect()
    }

    /// Ends `user`'s live sessions that hold a standing role not in
    /// `current` ([`SessionInfo::held_standing`]). Returns how many.
    fn end_without_held_roles(&self, user: &str, current: &[String]) -> usize {
        let map = self.lock();
        let mut n = 0;
        for e in map.values().filter(|e| e.info.user == user) {
            let Some(gone) = e.info.held_standing.iter().find(|r| !current.contains(r)) else {
                continue;
            };
            if matches!(*e.tx.borrow(), Signal::End(_)) {
                continue;
            }
            e.tx.send_replace(Signal::End(format!(
                "the standing roles of user {user:?} changed: role {gone:?} was taken away, and this session's forwardings rest on it; connect again"
            )));
            n += 1;
        }
        n
    }

    /// Ends session `id`, unless it is already ending. Returns how many
    /// were told (0 or 1).
    fn end_one(&self, id: &str, why: &str) -> usize {
        let map = self.lock();
        match map.get(id) {
            Some(e) if !matches!(*e.tx.borrow(), Signal::End(_)) => {
                e.tx.send_replace(Signal::End(why.to_owned()));
                1
            }
            _ => 0,
        }
    }

    fn end_where(&self, which: impl Fn(&SessionInfo) -> bool, why: &str) -> usize {
        let map = self.lock();
        let mut n = 0;
        for e in map.values().filter(|e| which(&e.info)) {
            e.tx.send_replace(Signal::End(why.to_owned()));
            n += 1;
        }
        n
    }

    /// Tells the sessions running under `request_id` that their grant ended
    /// but they may finish (once; an ending session stays ending).
    fn drain_for_request(&self, request_id: &str, why: &str) {
        let map = self.lock();
        for e in map.values() {
            if e.info.request_ids.iter().any(|r| r == request_id)
                && matches!(*e.tx.borrow(), Signal::Run | Signal::Warn(_))
            {
                e.tx.send_replace(Signal::Drain(why.to_owned()));
            }
        }
    }

    /// Tells sessions what the end of the certificate they were opened
    /// with means for them at `now`, as the policy says
    /// ([`wicket_policy::certificate_session_signal`]). A session already
    /// told to end keeps its reason. Returns how many were told to end.
    fn end_with_certificates(
        &self,
        now: DateTime<Utc>,
        warn_before: chrono::Duration,
        disconnect_on_expiry: bool,
    ) -> usize {
        use wicket_policy::{CertifiedSession, SessionSignal};
        let mut map = self.lock();
        let mut n = 0;
        for e in map.values_mut() {
            if matches!(*e.tx.borrow(), Signal::End(_)) {
                continue;
            }
            let session = CertifiedSession {
                valid_until: e.info.valid_until,
                under_grants: e.info.basis.is_none(),
                warned: e.warned,
            };
            match wicket_policy::certificate_session_signal(
                session,
                now,
                warn_before,
                disconnect_on_expiry,
            ) {
                Some(SessionSignal::End(why)) => {
                    e.tx.send_replace(Signal::End(why));
                    n += 1;
                }
                Some(SessionSignal::Warn(text)) if *e.tx.borrow() == Signal::Run => {
                    e.warned = true;
                    e.tx.send_replace(Signal::Warn(text));
                }
                // Once: a draining session stays draining.
                Some(SessionSignal::Drain(why))
                    if matches!(*e.tx.borrow(), Signal::Run | Signal::Warn(_)) =>
                {
                    e.tx.send_replace(Signal::Drain(why));
                }
                _ => {}
            }
        }
        n
    }

    /// Warns (once per session) the sessions running under `request_id`.
    fn warn_for_request(&self, request_id: &str, text: &str) {
        let mut map = self.lock();
        for e in map.values_mut() {
            if !e.warned && e.info.request_ids.iter().any(|r| r == request_id) {
                e.warned = true;
                if *e.tx.borrow() == Signal::Run {
                    e.tx.send_replace(Signal::Warn(text.to_owned()));
                }
            }
        }
    }
}

/// How long one store read of the session watcher may take before it
/// counts as failed (the store's own timeouts are much longer).
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the watcher last learned about one grant or user.
#[derive(Debug, Default)]
struct Check {
    /// Since when every read has failed.
    failing_since: Option<DateTime<Utc>>,
    /// The grant's newest known state: as last read, or as ended on this
    /// wicketd (newer than any read then), or as read for the decision a
    /// session opened on, until the watcher reads it. See [`learned`].
    last: Option<Arc<AccessRequest>>,
    /// When the grant was ended on this wicketd: kept that long
    /// ([`ENDED_HERE_KEPT`]) though no live session names it yet.
    ended_here: Option<DateTime<Utc>>,
}

/// How long a grant ended on this wicketd is remembered with no live
/// session on it: past the time between any session's decision and its
/// registration, which a late registration then still meets.
const ENDED_HERE_KEPT: chrono::Duration = chrono::Duration::seconds(30);

/// The watcher's memory of each live grant and user between store reads.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    requests: Mutex<BTreeMap<String, Check>>,
    users: Mutex<BTreeMap<String, Check>>,
    /// The rounds of re-reads, on the monotonic clock (a step of the wall
    /// clock is no stall).
    rounds: Mutex<Rounds>,
}

#[derive(Debug, Default)]
struct Rounds {
    /// When the round under way began.
    started: Option<tokio::time::Instant>,
    /// When the last round finished (or the first look, before any).
    finished: Option<tokio::time::Instant>,
}

/// The least time without a finished round of re-reads that counts as a
/// stalled watcher: past what a slow round takes ([`ROUND_TIMEOUT`], the
/// index's lock, a tick), whatever `session.unverified_grace` says.
const STALL_FLOOR: std::time::Duration = std::time::Duration::from_secs(6);

impl Checks {
    /// A round of re-reads begins at `at`.
    fn round_started(&self, at: tokio::time::Instant) {
        locked(&self.rounds).started = Some(at);
    }

    /// The round under way finished at `at`.
    fn round_done(&self, at: tokio::time::Instant) {
        let mut r = locked(&self.rounds);
        r.started = None;
        r.finished = Some(at);
    }

    /// How long the watcher has been stuck at `at`, when that is `grace`
    /// (at least [`STALL_FLOOR`]) or longer: a round under way that long
    /// (a store read that never ends, a lock never given back), or no
    /// round begun since the last one finished (the watcher is gone). Its
    /// reads did not fail, so no check marks them; no live session is
    /// verified. The first call starts the clock.
    fn stalled_for(
        &self,
        at: tokio::time::Instant,
        grace: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let mut r = locked(&self.rounds);
        let since = match r.started {
            Some(started) => started,
            None => *r.finished.get_or_insert(at),
        };
        let stuck = at.saturating_duration_since(since);
        (stuck >= grace.max(STALL_FLOOR)).then_some(stuck)
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_ok(map: &Mutex<BTreeMap<String, Check>>, key: &str) {
    locked(map).insert(key.to_owned(), Check::default());
}

/// Remembers `req` as the newest state of its grant, unless the one known
/// is newer ([`AccessRequest::supersedes`]): a watcher's read made before
/// a revoke here, say, that it stores after.
fn learned(check: &mut Check, req: Arc<AccessRequest>) {
    if check
        .last
        .as_deref()
        .is_none_or(|last| req.supersedes(last))
    {
        check.last = Some(req);
    }
}

fn read_failed(map: &Mutex<BTreeMap<String, Check>>, key: &str, now: DateTime<Utc>) {
    locked(map)
        .entry(key.to_owned())
        .or_default()
        .failing_since
        .get_or_insert(now);
}

/// Most time one round of re-reads may take: a store that answers each read
/// just under [`CHECK_TIMEOUT`] must not stretch a round over many grants
/// (a revocation elsewhere would go unseen that long); what the round did
/// not reach counts as unread.
const ROUND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// One round of re-reads: whether the store answered so far, and until when
/// it may be waited on.
struct Round {
    ok: bool,
    deadline: tokio::time::Instant,
}

impl Round {
    fn start() -> Self {
        Self {
            ok: true,
            deadline: tokio::time::Instant::now() + ROUND_TIMEOUT,
        }
    }
}

/// A store read bounded by [`CHECK_TIMEOUT`] and the round's deadline;
/// `None` when it failed, or when the store already failed this round (then
/// it is not waited on again).
async fn bounded<T, E: std::fmt::Display>(
    round: &mut Round,
    what: &str,
    read: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    if !round.ok {
        return None;
    }
    let limit = (tokio::time::Instant::now() + CHECK_TIMEOUT).min(round.deadline);
    let why = match tokio::time::timeout_at(limit, read).await {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => e.to_string(),
        Err(_) if limit == round.deadline => format!(
            "the round of re-reads took over {}s",
            ROUND_TIMEOUT.as_secs()
        ),
        Err(_) => format!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
    };
    tracing::warn!(what, error = %why, "cannot re-check live sessions");
    round.ok = false;
    None
}

impl Wicket {
    /// Registers a session ([`Sessions::register`]) opened on a decision
    /// that read `requests`, its grants. Until the watcher reads them (its
    /// next round), what the decision read is their last known state
    /// (unless a newer one is known: an end on this wicketd meanwhile), so
    /// a store that fails before then still ends the session at its
    /// grant's end, not only after `session.unverified_grace`.
    pub fn open_session(
        &self,
        info: SessionInfo,
        requests: &[Arc<AccessRequest>],
    ) -> Option<SessionHandle> {
        let handle = self.sessions.register(info)?;
        let mut known = locked(&self.checks.requests);
        for req in requests {
            let check = known.entry(req.id.clone()).or_default();
            if check.last.is_none() {
                check.last = Some(req.clone());
            }
        }
        Some(handle)
    }

    /// Delivers a grant's end made on this wicketd (a revoke, a drop, its
    /// expiry) to its live sessions, and remembers it: a session whose
    /// decision read the grant just before, and that registers just after,
    /// is ended by [`Wicket::enforce_sessions`] with it, though the store
    /// fails before the watcher reads the grant again. (What is remembered
    /// is kept [`ENDED_HERE_KEPT`], and then for as long as a live session
    /// names the grant.) Returns how many sessions were told to end.
    pub(crate) fn grant_ended_here(&self, req: &AccessRequest, now: DateTime<Utc>) -> usize {
        {
            let mut known = locked(&self.checks.requests);
            let check = known.entry(req.id.clone()).or_default();
            learned(check, Arc::new(req.clone()));
            check.ended_here = Some(now);
        }
        self.signal_sessions(req, now)
    }

    /// Re-reads from the store the grant and the user behind every live
    /// session, remembers them, and acts on what changed: a disabled or
    /// removed user's sessions end, a grant's state is delivered
    /// ([`Wicket::signal_sessions`]). The users are one read and the grants
    /// another, a few queries each however many sessions run (one query per
    /// session made a round outgrow its deadline at a few thousand). Each
    /// read is bounded; a failed one is remembered for
    /// [`Wicket::enforce_sessions`]. Returns how many sessions
    /// were told to end.
    pub async fn refresh_sessions(&self, now: DateTime<Utc>) -> usize {
        let mut ended = 0;
        let mut round = Round::start();
        self.checks.round_started(tokio::time::Instant::now());
        // What ended is taken out of the grant index too (new connections
        // are refused from now on), once the sessions have been told.
        let (mut gone_users, mut gone_requests) = (Vec::new(), Vec::new());
        // Sessions end with their user too (standing-role sessions have no
        // grant to end them).
        let users = self.sessions.users();
        let names: Vec<String> = users.iter().cloned().collect();
        match bounded(&mut round, "users", self.store.get_users(&names)).await {
            Some(found) => {
                let found: HashMap<&str, &crate::error::Result<UserRecord>> =
                    found.iter().map(|(name, u)| (name.as_str(), u)).collect();
                for user in &users {
                    let why = match found.get(user.as_str()) {
                        // A row that does not decode is unverified, like
                        // an unread one: `unverified_grace` applies to its
                        // sessions only.
                        Some(Err(e)) => {
                            tracing::warn!(user = %user, error = %e, "cannot re-check live sessions");
                            read_failed(&self.checks.users, user, now);
                            continue;
                        }
                        Some(Ok(u)) if !u.disabled => {
                            read_ok(&self.checks.users, user);
                            ended += self.recheck_standing(u);
                            continue;
                        }
                        Some(Ok(_)) => Some(format!("user {user:?} was disabled")),
                        None => Some(format!("user {user:?} no longer exists")),
                    };
                    read_ok(&self.checks.users, user);
                    let Some(why) = why else { continue };
                    ended += self.sessions.end_for_user(user, &why);
                    gone_users.push(user.clone());
                }
            }
            None => {
                for user in &users {
                    read_failed(&self.checks.users, user, now);
                }
            }
        }
        let ids = self.sessions.request_ids();
        let wanted: Vec<String> = ids.iter().cloned().collect();
        let mut found = bounded(&mut round, "grants", self.load_requests(&wanted))
            .await
            .unwrap_or_default();
        for id in &ids {
            match found.remove(id) {
                Some(Ok(req)) => {
                    ended += self.signal_sessions(&req, now);
                    if !req.grants_at(now) {
                        gone_requests.push(id.clone());
                    }
                    let mut known = locked(&self.checks.requests);
                    let check = known.entry(id.clone()).or_default();
                    check.failing_since = None;
                    learned(check, Arc::new(req));
                }
                // Unread, corrupt or gone (requests are never deleted):
                // unverified, so `unverified_grace` applies.
                Some(Err(e)) => {
                    tracing::warn!(request = %id, error = %e, "cannot re-check live sessions");
                    read_failed(&self.checks.requests, id, now);
                }
                None => read_failed(&self.checks.requests, id, now),
            }
        }
        // Kept for the sessions live now: one that opened during this round
        // keeps what its decision read (read under the lock its seed takes,
        // so a seed is never made between the read and the pruning).
        let users = self.sessions.users();
        locked(&self.checks.users).retain(|k, _| users.contains(k));
        {
            let mut requests = locked(&self.checks.requests);
            let ids = self.sessions.request_ids();
            requests.retain(|k, c| {
                ids.contains(k) || c.ended_here.is_some_and(|t| now - t < ENDED_HERE_KEPT)
            });
        }
        // Bounded: the index's refresh holds this lock across store reads,
        // and a watcher waiting on it checks nothing. The index drops what
        // ended at its next refresh anyway.
        let forget = self.index.forget_ended(&gone_users, &gone_requests);
        if tokio::time::timeout(CHECK_TIMEOUT, forget).await.is_err() {
            tracing::warn!(
                "the grant index stayed busy; it drops the ended grants when it refreshes"
            );
        }
        self.checks.round_done(tokio::time::Instant::now());
        ended
    }

    /// Asks the policy again, for `user`'s standing roles as just read,
    /// about each of their live sessions that stands on them, and ends
    /// those it no longer allows (an administrator took a role away).
    /// Returns how many were told to end.
    fn recheck_standing(&self, user: &UserRecord) -> usize {
        let current = self.standing_roles(user);
        let mut ended = self.sessions.end_without_held_roles(&user.name, &current);
        for (id, basis) in self.sessions.standing_of(&user.name) {
            let (roles, scoped) = wicket_policy::roles_of_grants(current.clone(), &basis.grants);
            let subject = wicket_policy::Subject {
                user: &user.name,
                roles: &roles,
                scoped: &scoped,
            };
            let d = (basis.decide)(&self.config.policy.roles, &subject);
            if !d.allowed {
                let why = format!(
                    "the standing roles of user {:?} changed and no longer allow this session: {}",
                    user.name, d.reason
                );
                ended += self.sessions.end_one(&id, &why);
            }
        }
        ended
    }

    /// Acts on what was last read, without the store (so a slow or failed
    /// store delays nothing): a grant's last known state still ends its
    /// sessions at expiry, and sessions whose grant or user could not be read
    /// for `session.unverified_grace` end — fail closed. Returns how many
    /// sessions were told to end.
    pub fn enforce_sessions(&self, now: DateTime<Utc>) -> usize {
        let grace = self.config.session.unverified_grace;
        let unchecked = |what: String, since: DateTime<Utc>| {
            format!(
                "wicket cannot check {what}: its store has not answered for {}s (session.unverified_grace is {}s)",
                (now - since).num_seconds(),
                grace.num_seconds()
            )
        };
        let mut ended = 0;
        let stall = grace.to_std().unwrap_or(STALL_FLOOR);
        if let Some(stuck) = self.checks.stalled_for(tokio::time::Instant::now(), stall) {
            ended += self.sessions.end_all(&format!(
                "wicket cannot check its sessions: its re-reads of the store have been stuck for {}s (session.unverified_grace is {}s)",
                stuck.as_secs(),
                grace.num_seconds()
            ));
        }
        let users: Vec<(String, Option<DateTime<Utc>>)> = locked(&self.checks.users)
            .iter()
            .map(|(k, c)| (k.clone(), c.failing_since))
            .collect();
        for (user, failing_since) in users {
            if let Some(since) = failing_since.filter(|s| now - *s >= grace) {
                ended += self
                    .sessions
                    .end_for_user(&user, &unchecked(format!("user {user:?}"), since));
            }
        }
        let requests: Vec<_> = locked(&self.checks.requests)
            .iter()
            .map(|(k, c)| (k.clone(), c.failing_since, c.last.clone()))
            .collect();
        for (id, failing_since, last) in requests {
            if let Some(req) = last {
                ended += self.signal_sessions(&req, now);
            }
            if let Some(since) = failing_since.filter(|s| now - *s >= grace) {
                ended += self
                    .sessions
                    .end_for_request(&id, &unchecked(format!("access request {id}"), since));
            }
        }
        // After the grants: a grant's end names its request.
        let settings = self.config.session;
        ended += self.sessions.end_with_certificates(
            now,
            settings.expiry_warning,
            settings.disconnect_on_expiry,
        );
        ended
    }

    /// [`Wicket::refresh_sessions`] then [`Wicket::enforce_sessions`].
    pub async fn watch_sessions(&self, now: DateTime<Utc>) -> usize {
        self.refresh_sessions(now).await + self.enforce_sessions(now)
    }

    /// Tells the live sessions under `req` what its state at `now` means for
    /// them: end, drain (ended, but `disconnect_on_expiry: false`), or warn.
    /// Returns how many were told to end.
    pub(crate) fn signal_sessions(&self, req: &AccessRequest, now: DateTime<Utc>) -> usize {
        let settings = self.config.session;
        if let Some(why) = req.session_end(now, settings.disconnect_on_expiry) {
            return self.sessions.end_for_request(&req.id, &why);
        }
        if let Some(why) = req.session_end(now, true) {
            self.sessions.drain_for_request(&req.id, &why);
        } else if let Some(text) =
            req.session_warning(now, settings.expiry_warning, settings.disconnect_on_expiry)
        {
            self.sessions.warn_for_request(&req.id, &text);
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A watcher whose rounds stop finishing (a read that never ends, a
    /// lock never given back, a task gone) fails closed after the grace,
    /// though none of its reads failed.
    #[test]
    fn a_stalled_watcher_counts_as_unverified_after_the_grace() {
        let t0 = tokio::time::Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let grace = Duration::from_secs(30);
        let checks = Checks::default();
        // The first look starts the clock (wicketd just started).
        assert_eq!(checks.stalled_for(s(0), grace), None);
        assert_eq!(checks.stalled_for(s(29), grace), None);
        assert_eq!(
            checks.stalled_for(s(30), grace),
            Some(Duration::from_secs(30))
        );
        // Rounds begin and finish: no stall, however long ago wicketd began.
        checks.round_started(s(31));
        checks.round_done(s(33));
        assert_eq!(checks.stalled_for(s(62), grace), None);
        // A round under way for the grace is one.
        checks.round_started(s(40));
        assert_eq!(checks.stalled_for(s(69), grace), None);
        assert_eq!(
            checks.stalled_for(s(70), grace),
            Some(Duration::from_secs(30))
        );
        // A grace shorter than a slow round is not a stall yet.
        let short = Duration::from_secs(1);
        checks.round_done(s(100));
        checks.round_started(s(100));
        assert_eq!(checks.stalled_for(s(104), short), None);
        assert_eq!(
            checks.stalled_for(s(106), short),
            Some(Duration::from_secs(6))
        );
        // No round begun since the last finished: the watcher is gone.
        checks.round_done(s(110));
        assert_eq!(checks.stalled_for(s(115), short), None);
        assert_eq!(
            checks.stalled_for(s(116), short),
            Some(Duration::from_secs(6))
        );
    }

    #[test]
    fn an_ended_grant_is_not_replaced_by_an_older_read_that_still_granted() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(20_000);
        let active = crate::index::tests::grant("ann", now);
        let mut revoked = active.clone();
        revoked.state = wicket_policy::State::Revoked;
        let mut check = Check::default();
        let state = |c: &Check| c.last.as_ref().map(|r| r.state);
        learned(&mut check, Arc::new(active.clone()));
        assert_eq!(state(&check), Some(active.state));
        learned(&mut check, Arc::new(revoked.clone()));
        assert_eq!(state(&check), Some(wicket_policy::State::Revoked));
        // A read made before the revoke, stored after it.
        learned(&mut check, Arc::new(active));
        assert_eq!(state(&check), Some(wicket_policy::State::Revoked));
        // An end changed before the one known (an expiry read before a
        // revoke of it here) does not replace it; one changed later does.
        let mut expired = revoked.clone();
        expired.state = wicket_policy::State::Expired;
        expired.updated_at = revoked.updated_at - chrono::Duration::seconds(1);
        learned(&mut check, Arc::new(expired.clone()));
        assert_eq!(state(&check), Some(wicket_policy::State::Revoked));
        expired.updated_at = revoked.updated_at + chrono::Duration::seconds(1);
        learned(&mut check, Arc::new(expired));
        assert_eq!(state(&check), Some(wicket_policy::State::Expired));
    }

    #[test]
    fn sessions_end_with_their_certificate_warned_before() {
        let sessions = Arc::new(Sessions::default());
        let info = |valid_until: i64, request_ids: &[&str]| SessionInfo {
            protocol: "ssh",
            user: "ann".into(),
            resource: "node-1".into(),
            login: "ann".into(),
            request_ids: request_ids.iter().map(|r| r.to_string()).collect(),
            started: DateTime::<Utc>::UNIX_EPOCH,
            valid_until,
            held_standing: Vec::new(),
            // Without grants, it stands on standing roles.
            basis: request_ids.is_empty().then(|| {
                Arc::new(StandingBasis {
                    grants: Vec::new(),
                    decide: Arc::new(
                        |_: &wicket_policy::RoleSet, _: &wicket_policy::Subject<'_>| {
                            wicket_policy::Decision::allow("ok")
                        },
                    ),
                })
            }),
        };
        let standing = sessions.register(info(1_000, &[])).unwrap();
        let later = sessions.register(info(2_000, &[])).unwrap();
        let granted = sessions.register(info(1_000, &["r1"])).unwrap();
        let at = |t: i64| DateTime::<Utc>::from_timestamp(t, 0).unwrap();
        let warn = chrono::Duration::seconds(200);
        assert_eq!(sessions.end_with_certificates(at(700), warn, true), 0);
        assert_eq!(*standing.signal.borrow(), Signal::Run);
        assert_eq!(sessions.end_with_certificates(at(800), warn, true), 0);
        assert!(
            matches!(&*standing.signal.borrow(), Signal::Warn(w) if w.contains("1970-01-01T00:16:40+00:00")),
            "{:?}",
            *standing.signal.borrow()
        );
        assert_eq!(*later.signal.borrow(), Signal::Run);
        // The grant's end came first and keeps its reason.
        sessions.end_for_request("r1", "request r1 expired");
        assert_eq!(sessions.end_with_certificates(at(1_000), warn, true), 1);
        assert!(
            matches!(&*standing.signal.borrow(), Signal::End(w) if w.contains("the login behind this session ended")),
            "{:?}",
            *standing.signal.borrow()
        );
        assert_eq!(
            *granted.signal.borrow(),
            Signal::End("request r1 expired".into())
        );
        assert_eq!(*later.signal.borrow(), Signal::Run);
        // A session under a grant follows the grant (which may have been
        // extended past the certificate), not the certificate.
        let extended = sessions.register(info(1_000, &["r2"])).unwrap();
        sessions.end_with_certificates(at(1_500), warn, true);
        assert_eq!(*extended.signal.borrow(), Signal::Run);
        assert_eq!(sessions.end_with_certificates(at(2_000), warn, true), 1);
        // Sessions may finish: one under standing roles drains at its
        // login's end (nothing new starts), and stays drained.
        let finishing = sessions.register(info(3_000, &[])).unwrap();
        assert_eq!(sessions.end_with_certificates(at(2_999), warn, false), 0);
        assert_eq!(*finishing.signal.borrow(), Signal::Run);
        for t in [3_000, 3_500] {
            assert_eq!(sessions.end_with_certificates(at(t), warn, false), 0);
            assert!(
                matches!(&*finishing.signal.borrow(), Signal::Drain(w) if w.contains("the login behind this session ended")),
                "{:?}",
                *finishing.signal.borrow()
            );
        }
    }

    /// Once wicketd is stopping, every live session is told to end and
    /// none starts: each that started is waited for, and ends on the
    /// record.
    #[test]
    fn a_stopping_wicketd_ends_its_sessions_and_starts_none() {
        let sessions = Arc::new(Sessions::default());
        let info = || SessionInfo {
            protocol: "ssh",
            user: "alice".into(),
            resource: "node-1".into(),
            login: "alice".into(),
            request_ids: vec![],
            started: DateTime::<Utc>::from_timestamp(0, 0).unwrap(),
            valid_until: 10_000,
            basis: None,
            held_standing: Vec::new(),
        };
        let live = sessions.register(info()).unwrap();
        assert_eq!(sessions.stop_all("wicketd is stopping"), 1);
        assert_eq!(
            *live.signal.borrow(),
            Signal::End("wicketd is stopping".into())
        );
        assert!(sessions.register(info()).is_none());
        assert_eq!(sessions.len(), 1);
        drop(live);
        assert!(sessions.is_empty());
    }

    #[tokio::test]
    async fn the_grace_runs_from_the_end_signal_with_its_reason() {
        let grace = Duration::from_millis(100);
        let end = |s: &Signal| match s {
            Signal::End(why) => Some(why.clone()),
            _ => None,
        };
        let (tx, rx) = watch::channel(Signal::Run);
        let waiting = tokio::spawn(after_grace(rx, end, grace));
        tx.send_replace(Signal::Warn("soon".into()));
        tokio::time::sleep(grace * 2).await;
        assert!(!waiting.is_finished(), "a warning started the grace");
        let told = tokio::time::Instant::now();
        tx.send_replace(Signal::End("revoked".into()));
        assert_eq!(waiting.await.unwrap(), "revoked");
        assert!(told.elapsed() >= grace);
        // Told before it was awaited: the grace runs from now.
        let (tx, rx) = watch::channel(Signal::End("expired".into()));
        let started = tokio::time::Instant::now();
        assert_eq!(after_grace(rx, end, grace).await, "expired");
        assert!(started.elapsed() >= grace);
        // The sender gone without an end: never.
        let (tx2, rx) = watch::channel(Signal::Run);
        drop(tx2);
        let never = tokio::time::timeout(grace * 3, after_grace(rx, end, grace)).await;
        assert!(never.is_err());
        drop(tx);
    }

    #[tokio::test]
    async fn a_slow_store_cannot_stretch_a_round_past_its_deadline() {
        let mut round = Round {
            ok: true,
            deadline: tokio::time::Instant::now() + Duration::from_millis(500),
        };
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, String>(())
        };
        // Each read is within the per-read bound; the third one would end
        // after the round's deadline.
        assert_eq!(bounded(&mut round, "grant", slow()).await, Some(()));
        assert_eq!(bounded(&mut round, "grant", slow()).await, Some(()));
        assert_eq!(bounded(&mut round, "grant", slow()).await, None);
        assert!(!round.ok);
        // The rest of the round is not waited on.
        let started = tokio::time::Instant::now();
        assert_eq!(bounded(&mut round, "grant", slow()).await, None);
        assert!(started.elapsed() < Duration::from_millis(100));
        // A failing read ends a round too.
        let mut round = Round::start();
        let failing = async { Err::<(), _>("store down".to_owned()) };
        assert_eq!(bounded(&mut round, "user", failing).await, None);
        assert!(!round.ok);
    }
}
