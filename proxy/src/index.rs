//! The in-memory index of users and grants that access decisions read, so a
//! new connection costs no store round trip (see `cargo bench -p wicketd
//! --bench decision`).
//!
//! It follows the store's change feed (migration 5): every change to a
//! user or a request takes the next number of one counter, in commit order,
//! and stamps the row. Every tick the index reads what changed since the
//! last number it saw, on every wicketd sharing the store. If the counter
//! is ever behind what the index saw (a database restored from a backup),
//! the index starts over from the whole store.
//!
//! The index only ever answers "yes, this grant holds" or "this user is
//! enabled"; anything it does not hold, or cannot vouch for, goes to the
//! store as before:
//! - it keeps only active grants, so a pending, scheduled, revoked, dropped,
//!   expired or unknown request is a miss;
//! - a transition this wicketd makes takes its request out at once and
//!   leaves a mark with its change number, so a refresh already in flight
//!   cannot put an older state back;
//! - what the session watcher finds ended (a grant no longer in force, a
//!   user disabled or gone) it takes out too, so a live session is never
//!   cut while a new one for the same grant or user is let in;
//! - it answers only while its last refresh began under [`FRESH`] ago: if
//!   the store cannot be read, decisions go to the store (and fail closed).
//!
//! So a revoke made through this wicketd refuses new connections at once;
//! one made through another wicketd sharing the store, or by `wicketd users
//! disable`, does at the next refresh (250 ms, at most [`FRESH`] when the
//! store is slow), and live sessions end within a second either way (the
//! session watcher reads the store itself).

use crate::error::Result;
use crate::service::Wicket;
use crate::store::{Changed, UserRecord};
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use wicket_policy::{AccessRequest, State};

/// How long after its last refresh began the index may answer.
pub const FRESH: Duration = Duration::seconds(1);

/// What a decision needs of a grant, kept next to its holder's other
/// grants (one lookup per decision, few cache misses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The request ID (request IDs are UUIDs).
    pub id: uuid::Uuid,
    /// The change that left it in this state.
    pub seq: i64,
    /// The request as read: its roles and resources for decisions, and a
    /// start for the session watcher when a session opens on it.
    pub request: Arc<AccessRequest>,
}

impl Held {
    /// What the index keeps of `req` (changed at `seq`), if it is active.
    fn of(req: &AccessRequest, seq: i64) -> Option<Self> {
        if req.state != State::Active {
            return None;
        }
        Some(Self {
            id: uuid::Uuid::parse_str(&req.id).ok()?,
            seq,
            request: Arc::new(req.clone()),
        })
    }
}

/// A user and the grants they hold.
#[derive(Debug, Default)]
struct Entry {
    /// `None` when the user's row is not (or no longer) readable.
    user: Option<Arc<UserRecord>>,
    grants: Vec<Held>,
}

/// Users and their active grants, as of change `seen`.
#[derive(Debug, Default)]
pub struct Index {
    users: HashMap<String, Entry>,
    /// Each indexed grant's holder, to find it when it changes.
    holders: HashMap<String, String>,
    /// Requests changed here at a number the index has not read yet: rows
    /// older than that are not applied.
    marks: HashMap<String, i64>,
    /// The last change applied (`None`: never read).
    seen: Option<i64>,
    refreshed: Option<DateTime<Utc>>,
    /// A change made here was numbered at or below `seen` and is not the
    /// one the index holds: the feed may have gone back (a restored
    /// database), so the next refresh reads the whole index again.
    reread: bool,
}

impl Index {
    /// Applies what changed up to `head`, read by a refresh that began at
    /// `began`. A row that does not decode is dropped from the index (its
    /// decisions go to the store).
    pub fn apply(
        &mut self,
        head: i64,
        users: Vec<(String, Result<UserRecord>)>,
        requests: Vec<Changed<AccessRequest>>,
        began: DateTime<Utc>,
    ) {
        for (name, user) in users {
            let user = match user {
                Ok(u) => Some(Arc::new(u)),
                Err(e) => {
                    tracing::warn!(user = %name, error = %e, "user row does not decode; left out of the index");
                    None
                }
            };
            self.users.entry(name).or_default().user = user;
        }
        for Changed { key: id, seq, row } in requests {
            if self.marks.get(&id).is_some_and(|m| seq < *m) {
                continue;
            }
            self.forget(&id);
            match row {
                Ok(r) => {
                    if let Some(held) = Held::of(&r, seq) {
                        self.holders.insert(id, r.requester.clone());
                        self.users.entry(r.requester).or_default().grants.push(held);
                    }
                }
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "request row does not decode; left out of the index");
                }
            }
        }
        // Every later read starts after `head`: marks up to it are done.
        self.marks.retain(|_, m| *m > head);
        self.seen = Some(head);
        self.refreshed = Some(began);
    }

    /// Whether the last refresh began recently enough before `now` to answer.
    pub fn fresh(&self, now: DateTime<Utc>) -> bool {
        self.refreshed.is_some_and(|r| (now - r).abs() < FRESH)
    }

    /// The last change applied.
    pub fn seen(&self) -> Option<i64> {
        self.seen
    }

    /// Whether the next refresh must read the whole index again.
    pub fn must_reread(&self) -> bool {
        self.reread
    }

    /// `name`, if the index is fresh, holds the user and the user is enabled.
    pub fn user(&self, name: &str, now: DateTime<Utc>) -> Option<Arc<UserRecord>> {
        if !self.fresh(now) {
            return None;
        }
        self.users
            .get(name)?
            .user
            .as_ref()
            .filter(|u| !u.disabled)
            .cloned()
    }

    /// Request `id` as read, if the index is fresh and holds it as
    /// `user`'s grant in force at `now`.
    pub fn grant(&self, user: &str, id: &str, now: DateTime<Utc>) -> Option<Arc<AccessRequest>> {
        if !self.fresh(now) {
            return None;
        }
        let id = uuid::Uuid::parse_str(id).ok()?;
        self.users
            .get(user)?
            .grants
            .iter()
            .find(|g| g.id == id && g.request.grants_at(now))
            .map(|g| g.request.clone())
    }

    /// Takes request `id` out (the session watcher found it ended); the feed
    /// brings it back if it changes again.
    pub fn forget(&mut self, id: &str) {
        let Some(holder) = self.holders.remove(id) else {
            return;
        };
        if let (Some(e), Ok(id)) = (self.users.get_mut(&holder), uuid::Uuid::parse_str(id)) {
            e.grants.retain(|g| g.id != id);
        }
    }

    /// Request `id` changed here at change `seq`: out until the feed brings
    /// that change (or a later one).
    pub fn forget_at(&mut self, id: &str, seq: i64) {
        let held = self.holders.get(id).and_then(|h| {
            let id = uuid::Uuid::parse_str(id).ok()?;
            let e = self.users.get(h)?;
            e.grants.iter().find(|g| g.id == id).map(|g| g.seq)
        });
        if self.seen.is_none_or(|s| s < seq) {
            // Past what the index has read: out, and a refresh that read
            // before the change must not put the older state back.
            self.forget(id);
            self.marks.insert(id.to_owned(), seq);
            return;
        }
        if held.is_none_or(|h| h == seq) {
            // The index already read this change: the entry is its state
            // (none, when the request no longer grants).
            return;
        }
        // At or below what was read, and the index holds another state:
        // the request changed again since, or the feed went back (a
        // restored database), where numbers say nothing. Out at once; the
        // next refresh reads the whole index again.
        self.forget(id);
        self.reread = true;
    }

    /// Takes user `name`'s record out (the session watcher found it
    /// disabled or gone); the feed brings it back if it changes again.
    pub fn forget_user(&mut self, name: &str) {
        if let Some(e) = self.users.get_mut(name) {
            e.user = None;
        }
    }

    /// How many grants it holds.
    pub fn grants(&self) -> usize {
        self.holders.len()
    }
}

/// The index a wicketd shares between its tasks. Refreshes take turns;
/// the session watcher's removals wait for a refresh in flight.
#[derive(Debug, Default)]
pub struct Shared {
    index: RwLock<Index>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Reads the index.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`Index::forget_at`] (at once: the mark keeps a refresh in
    /// flight from putting an older state back).
    pub fn forget_at(&self, id: &str, seq: i64) {
        self.write().forget_at(id, seq);
    }

    /// Takes out what the session watcher found ended (users disabled or
    /// gone, requests no longer in force), after any refresh in flight has
    /// applied (so it cannot put an older state back).
    pub async fn forget_ended(&self, users: &[String], requests: &[String]) {
        if users.is_empty() && requests.is_empty() {
            return;
        }
        let _turn = self.refreshing.lock().await;
        let mut index = self.write();
        users.iter().for_each(|u| index.forget_user(u));
        requests.iter().for_each(|r| index.forget(r));
    }
}

impl Wicket {
    /// Brings the index up to the store's change feed. Returns how many
    /// rows it read. `now` is when it began.
    pub async fn refresh_index(&self, now: DateTime<Utc>) -> Result<usize> {
        let _turn = self.index.refreshing.lock().await;
        let (after, reread) = {
            let index = self.index.read();
            (index.seen(), index.must_reread())
        };
        let mut changes = self
            .store
            .changes(if reread { None } else { after })
            .await?;
        if reread {
            tracing::info!("a change made here was numbered below what the index had read; reading the whole index again");
            *self.index.write() = Index::default();
        } else if after.is_some_and(|seen| changes.head < seen) {
            // The feed went back (a restored database): start over.
            tracing::warn!(
                seen = after,
                head = changes.head,
                "the store's change feed is behind the index; reading the whole index again"
            );
            changes = self.store.changes(None).await?;
            *self.index.write() = Index::default();
        }
        let n = changes.users.len() + changes.requests.len();
        let requests = changes
            .requests
            .into_iter()
            .map(|c| Changed {
                row: c.row.and_then(|s| crate::requests::decode(&s)),
                key: c.key,
                seq: c.seq,
            })
            .collect();
        self.index
            .write()
            .apply(changes.head, changes.users, requests, now);
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::Error;
    use wicket_policy::{Engine, NewRequest, Requester};

    fn user(name: &str, disabled: bool) -> UserRecord {
        UserRecord {
            name: name.into(),
            roles: vec!["dev".into()],
            team: None,
            password_hash: None,
            totp_secret: None,
            created_at: 0,
            disabled,
        }
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    /// A request by `who` for `dev-admin` (self-approved in the example
    /// configuration, so active at once).
    pub(crate) fn grant(who: &str, now: DateTime<Utc>) -> AccessRequest {
        let text = include_str!("../../deploy/wicket.yaml");
        let cfg = crate::config::parse(text, std::path::Path::new("/tmp")).unwrap();
        let engine = Engine::new(&cfg.policy);
        let (req, _) = engine
            .create(
                NewRequest {
                    id: uuid::Uuid::new_v4().to_string(),
                    roles: vec!["dev-admin".into()],
                    reason: "test".into(),
                    ..NewRequest::default()
                },
                &Requester {
                    name: who,
                    roles: &["dev".to_string()],
                    team: None,
                    awaiting_review: 0,
                },
                now,
            )
            .unwrap();
        assert_eq!(req.state, State::Active);
        req
    }

    /// `g` as the feed brings it, changed at `seq`.
    fn changed(g: &AccessRequest, seq: i64) -> Changed<AccessRequest> {
        Changed {
            key: g.id.clone(),
            seq,
            row: Ok(g.clone()),
        }
    }

    #[test]
    fn answers_only_for_enabled_users_and_grants_in_force_while_fresh() {
        let mut index = Index::default();
        let g = grant("alice", at(0));
        assert!(index.user("alice", at(0)).is_none(), "never refreshed");
        index.apply(
            3,
            vec![
                ("alice".into(), Ok(user("alice", false))),
                ("bob".into(), Ok(user("bob", true))),
            ],
            vec![changed(&g, 2)],
            at(0),
        );
        assert_eq!(index.seen(), Some(3));
        assert!(index.user("alice", at(0)).is_some());
        assert!(index.user("bob", at(0)).is_none(), "disabled");
        assert!(index.user("carol", at(0)).is_none(), "unknown");
        let soon = at(0) + Duration::milliseconds(500);
        assert!(index.grant("alice", &g.id, soon).is_some());
        assert!(index.grant("bob", &g.id, soon).is_none(), "not bob's");
        // Stale: a second without a refresh, and nothing is answered.
        assert!(index.grant("alice", &g.id, at(0) + FRESH).is_none());
        assert!(index.user("alice", at(0) + FRESH).is_none());
        // Refreshed just before the grant's end: it holds until then.
        let end = g.expires_at.unwrap();
        index.apply(3, vec![], vec![], end - Duration::milliseconds(100));
        assert!(index
            .grant("alice", &g.id, end - Duration::milliseconds(1))
            .is_some());
        assert!(
            index.grant("alice", &g.id, end).is_none(),
            "expired by time"
        );
        index.apply(3, vec![], vec![], at(5));
        assert!(index.grant("alice", &g.id, at(5)).is_some());
        index.forget(&g.id);
        assert!(index.grant("alice", &g.id, at(5)).is_none());
        assert!(index.user("alice", at(5)).is_some());
        index.forget_user("alice");
        assert!(index.user("alice", at(5)).is_none());
    }

    #[test]
    fn an_ended_or_undecodable_row_takes_its_entry_out() {
        let mut index = Index::default();
        let g = grant("alice", at(0));
        let alice = vec![("alice".into(), Ok(user("alice", false)))];
        index.apply(1, alice, vec![changed(&g, 1)], at(0));
        let mut revoked = g.clone();
        revoked.state = State::Revoked;
        index.apply(2, vec![], vec![changed(&revoked, 2)], at(0));
        assert!(index.grant("alice", &g.id, at(0)).is_none());
        assert_eq!(index.grants(), 0);
        // Scheduled (approved, not yet active): not vouched for.
        let mut scheduled = g.clone();
        scheduled.state = State::Approved;
        index.apply(3, vec![], vec![changed(&scheduled, 3)], at(0));
        assert_eq!(index.grants(), 0);
        index.apply(4, vec![], vec![changed(&g, 4)], at(0));
        assert_eq!(index.grants(), 1);
        index.apply(
            5,
            vec![("alice".into(), Err(Error::Store("bad roles".into())))],
            vec![Changed {
                key: g.id.clone(),
                seq: 5,
                row: Err(Error::Store("bad doc".into())),
            }],
            at(0),
        );
        assert!(index.grant("alice", &g.id, at(0)).is_none());
        assert!(index.user("alice", at(0)).is_none());
    }

    #[test]
    fn a_local_change_is_not_undone_by_a_refresh_that_read_before_it() {
        let mut index = Index::default();
        let g = grant("alice", at(0));
        index.apply(
            1,
            vec![("alice".into(), Ok(user("alice", false)))],
            vec![changed(&g, 1)],
            at(0),
        );
        // Revoked here at change 7; a refresh that read up to 6 still has
        // the grant active at change 1.
        index.forget_at(&g.id, 7);
        assert!(index.grant("alice", &g.id, at(0)).is_none());
        index.apply(6, vec![], vec![changed(&g, 1)], at(0));
        assert!(
            index.grant("alice", &g.id, at(0)).is_none(),
            "older row skipped"
        );
        // The feed reaches change 7: the mark is done, its row applies.
        let mut revoked = g.clone();
        revoked.state = State::Revoked;
        index.apply(7, vec![], vec![changed(&revoked, 7)], at(0));
        assert!(index.marks.is_empty());
        assert!(index.grant("alice", &g.id, at(0)).is_none());
        // A change the index has already read is not forgotten again.
        index.apply(9, vec![], vec![changed(&g, 9)], at(0));
        index.forget_at(&g.id, 9);
        assert!(index.grant("alice", &g.id, at(0)).is_some());
        assert!(index.marks.is_empty());
    }

    /// After a restored database the feed numbers changes below what the
    /// index has read: a grant revoked here is still taken out at once,
    /// not left vouched for until the next refresh.
    #[test]
    fn a_local_revoke_is_not_undone_by_a_feed_that_went_back() {
        let g = grant("alice", at(0));
        // The restored feed numbers the change above or below the entry's
        // own (older) number.
        for seq in [95, 81] {
            let mut index = Index::default();
            index.apply(
                100,
                vec![("alice".into(), Ok(user("alice", false)))],
                vec![changed(&g, 90)],
                at(0),
            );
            index.forget_at(&g.id, seq);
            assert!(index.grant("alice", &g.id, at(0)).is_none(), "{seq}");
            assert!(index.marks.is_empty(), "{seq}");
            assert!(index.must_reread(), "{seq}");
        }
    }
}
