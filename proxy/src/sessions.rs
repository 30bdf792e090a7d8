//! Live sessions (SSH, PostgreSQL, ...) and ending them when their grant ends.
//!
//! Every proxied connection registers here and gets a [`SessionHandle`]: its
//! ID and a watch channel on which it learns to warn its user or to end. The
//! registry does not decide anything itself: [`Wicket::watch_sessions`]
//! re-reads, on every scheduler tick (250 ms), the grant state of every
//! request behind a live session from the store — so a revoke, drop or expiry
//! applied by any proxy sharing the store ends the session here — and a local
//! state change ends them at once through [`Sessions::end_for_request`].
//! When a grant ends a session, and with what words, is the policy's
//! (`AccessRequest::session_end` / `session_warning`). A session also ends
//! when its user is disabled or removed (`wicketd users disable`), whatever
//! roles it runs under.

use crate::service::Wicket;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;
use wicket_policy::AccessRequest;

/// What a live session is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Run,
    /// Tell the user (once) that the grant ends soon.
    Warn(String),
    /// The grant ended but sessions may finish (`disconnect_on_expiry:
    /// false`): what runs goes on, nothing new starts (no new SSH channels).
    /// The text names the request and why.
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

    /// Registers a session under a fresh ID.
    pub fn register(self: &Arc<Self>, info: SessionInfo) -> SessionHandle {
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = watch::channel(Signal::Run);
        self.lock().insert(
            id.clone(),
            Entry {
                info,
                tx,
                warned: false,
            },
        );
        SessionHandle {
            id,
            signal: rx,
            sessions: self.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

impl Wicket {
    /// Checks the grant behind every live session against the store and
    /// ends or warns sessions accordingly. Returns how many sessions were told
    /// to end.
    pub async fn watch_sessions(&self, now: DateTime<Utc>) -> usize {
        let mut ended = 0;
        // Sessions end with their user too (standing-role sessions have no
        // grant to end them).
        for user in self.sessions.users() {
            let why = match self.store.get_user(&user).await {
                Ok(Some(u)) if !u.disabled => continue,
                Ok(Some(_)) => format!("user {user:?} was disabled"),
                Ok(None) => format!("user {user:?} no longer exists"),
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "cannot re-read the user of a live session");
                    continue;
                }
            };
            ended += self.sessions.end_for_user(&user, &why);
        }
        for id in self.sessions.request_ids() {
            let req = match self.load_request(&id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "cannot re-read grant of a live session");
                    continue;
                }
            };
            ended += self.signal_sessions(&req, now);
        }
        ended
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
