//! The in-memory index of users and grants that access decisions read, so a
//! new connection costs no store round trip (see `cargo bench -p wicketd
//! --bench decision`).
//!
//! It follows the store's change feed (migration 5): every change to a
//! user or a request takes the next number of one counter, in commit order,
//! and stamps the row. Every tick the index reads what changed since the
//! last number it saw, on every wicketd sharing the store.
//!
//! The index only ever answers "yes, this grant holds" or "this user is
//! enabled"; anything it does not hold, or cannot vouch for, goes to the
//! store as before:
//! - it keeps only requests that grant or will (approved, active), so a
//!   revoked, dropped, expired or unknown request is a miss;
//! - a transition this wicketd makes takes its request out at once, under
//!   the refresh lock, so no refresh in flight puts an old state back;
//! - what the session watcher finds ended (a grant no longer in force, a
//!   user disabled or gone) it takes out too, so a live session is never
//!   cut while a new one for the same grant or user is let in;
//! - it answers only while its last refresh is under [`FRESH`] old: if the
//!   store cannot be read, decisions go to the store (and fail closed).
//!
//! So a revoke made on this wicketd refuses new connections at once; one
//! made on another wicketd sharing the store does within a tick
//! ([`crate::server`] refreshes every 250 ms), and live sessions end within
//! a second either way (the session watcher reads the store itself).

use crate::error::Result;
use crate::service::Wicket;
use crate::store::UserRecord;
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use wicket_policy::{AccessRequest, State};

/// How old the last refresh may be for the index to answer.
pub const FRESH: Duration = Duration::seconds(1);

/// What a decision needs of a grant, kept next to its holder's other
/// grants (one lookup per decision, few cache misses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The request ID (request IDs are UUIDs).
    pub id: uuid::Uuid,
    pub starts_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub roles: Vec<String>,
    /// The resources the request named (empty: everywhere).
    pub resources: Vec<String>,
}

impl Held {
    /// What the index keeps of `req`, if it grants or will.
    fn of(req: &AccessRequest) -> Option<Self> {
        if !matches!(req.state, State::Approved | State::Active) {
            return None;
        }
        Some(Self {
            id: uuid::Uuid::parse_str(&req.id).ok()?,
            starts_at: req.starts_at?,
            expires_at: req.expires_at?,
            roles: req.granted_roles.clone(),
            resources: req.resources.clone(),
        })
    }
}

/// A user and the grants they hold or will.
#[derive(Debug, Default)]
struct Entry {
    /// `None` when the user's row is not (or no longer) readable.
    user: Option<Arc<UserRecord>>,
    grants: Vec<Held>,
}

/// Users and the grants that hold or will, as of change `seen`.
#[derive(Debug, Default)]
pub struct Index {
    users: HashMap<String, Entry>,
    /// Each indexed grant's holder, to find it when it changes.
    holders: HashMap<String, String>,
    /// The last change applied (`None`: never read).
    seen: Option<i64>,
    refreshed: Option<DateTime<Utc>>,
}

impl Index {
    /// Applies what changed up to `head`, read at `now`. A row that does not
    /// decode is dropped from the index (its decisions go to the store).
    pub fn apply(
        &mut self,
        head: i64,
        users: Vec<(String, Result<UserRecord>)>,
        requests: Vec<(String, Result<AccessRequest>)>,
        now: DateTime<Utc>,
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
        for (id, req) in requests {
            self.forget(&id);
            match req {
                Ok(r) => {
                    if let Some(held) = Held::of(&r) {
                        self.holders.insert(id, r.requester.clone());
                        self.users.entry(r.requester).or_default().grants.push(held);
                    }
                }
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "request row does not decode; left out of the index");
                }
            }
        }
        self.seen = Some(head);
        self.refreshed = Some(now);
    }

    /// Whether the last refresh is recent enough at `now` to answer.
    pub fn fresh(&self, now: DateTime<Utc>) -> bool {
        self.refreshed.is_some_and(|r| (now - r).abs() < FRESH)
    }

    /// The last change applied.
    pub fn seen(&self) -> Option<i64> {
        self.seen
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

    /// Request `id`'s roles and resources, if the index is fresh and holds
    /// it as `user`'s grant in force at `now`.
    pub fn grant(
        &self,
        user: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Option<(Vec<String>, Vec<String>)> {
        if !self.fresh(now) {
            return None;
        }
        let id = uuid::Uuid::parse_str(id).ok()?;
        self.users
            .get(user)?
            .grants
            .iter()
            .find(|g| g.id == id && g.starts_at <= now && now < g.expires_at)
            .map(|g| (g.roles.clone(), g.resources.clone()))
    }

    /// Takes request `id` out (it changed here; the feed brings it back).
    pub fn forget(&mut self, id: &str) {
        let Some(holder) = self.holders.remove(id) else {
            return;
        };
        if let (Some(e), Ok(id)) = (self.users.get_mut(&holder), uuid::Uuid::parse_str(id)) {
            e.grants.retain(|g| g.id != id);
        }
    }

    /// Takes user `name`'s record out (the session watcher found it
    /// disabled or gone); the feed brings it back.
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

/// The index a wicketd shares between its tasks. Refreshes and
/// [`Shared::forget`] take turns, so they apply in order.
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

    /// Takes request `id` out, after any refresh in flight has applied.
    pub async fn forget(&self, id: &str) {
        let _turn = self.refreshing.lock().await;
        self.write().forget(id);
    }

    /// Takes user `name` out, after any refresh in flight has applied.
    pub async fn forget_user(&self, name: &str) {
        let _turn = self.refreshing.lock().await;
        self.write().forget_user(name);
    }
}

impl Wicket {
    /// Brings the index up to the store's change feed. Returns how many
    /// rows it read.
    pub async fn refresh_index(&self, now: DateTime<Utc>) -> Result<usize> {
        let _turn = self.index.refreshing.lock().await;
        let after = self.index.read().seen();
        let changes = self.store.changes(after).await?;
        let n = changes.users.len() + changes.requests.len();
        let requests = changes
            .requests
            .into_iter()
            .map(|(id, stored)| (id, stored.and_then(|s| crate::requests::decode(&s))))
            .collect();
        self.index
            .write()
            .apply(changes.head, changes.users, requests, now);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
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
    fn grant(who: &str, now: DateTime<Utc>) -> AccessRequest {
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
                },
                now,
            )
            .unwrap();
        assert_eq!(req.state, State::Active);
        req
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
            vec![(g.id.clone(), Ok(g.clone()))],
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
        index.apply(
            1,
            vec![("alice".into(), Ok(user("alice", false)))],
            vec![(g.id.clone(), Ok(g.clone()))],
            at(0),
        );
        let mut revoked = g.clone();
        revoked.state = State::Revoked;
        index.apply(2, vec![], vec![(g.id.clone(), Ok(revoked))], at(0));
        assert!(index.grant("alice", &g.id, at(0)).is_none());
        assert_eq!(index.grants(), 0);
        index.apply(3, vec![], vec![(g.id.clone(), Ok(g.clone()))], at(0));
        index.apply(
            4,
            vec![("alice".into(), Err(Error::Store("bad roles".into())))],
            vec![(g.id.clone(), Err(Error::Store("bad doc".into())))],
            at(0),
        );
        assert!(index.grant("alice", &g.id, at(0)).is_none());
        assert!(index.user("alice", at(0)).is_none());
    }
}
