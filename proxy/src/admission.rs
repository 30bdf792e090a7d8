//! Admission of client connections to a listener: how many it holds open;
//! how many of those may still be unauthenticated (like sshd's
//! MaxStartups), and how many from one source (PerSourceMaxStartups); the
//! deadline by which a connection must authenticate (LoginGraceTime); and
//! how many connections one user may hold on it.
//! Unauthenticated clients cannot hold more than a fixed share of the proxy;
//! authenticated ones are named in the audit and counted against their
//! user's share, whether or not the policy then lets them anywhere.
//!
//! Does not limit per resource, and does no I/O: the accept loop writes the
//! refusal ([`crate::server::accept_until_shutdown`]), the proxies theirs.

use crate::config::Limits;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// One listener's limits.
#[derive(Debug)]
pub struct Gate {
    what: &'static str,
    limits: Limits,
    open: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    /// Unauthenticated connections per source (see [`crate::auth::source_key`]).
    sources: Arc<Mutex<HashMap<String, usize>>>,
    users: Arc<Users>,
    refused: AtomicU64,
}

/// A place among one source's unauthenticated connections: given back
/// when dropped.
#[derive(Debug)]
struct SourcePlace {
    sources: Arc<Mutex<HashMap<String, usize>>>,
    source: String,
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut held = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

/// Authenticated connections per user on one listener.
#[derive(Debug)]
struct Users {
    /// The listener, for messages.
    what: &'static str,
    max_per_user: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// A user's place among their connections: given back when dropped.
#[derive(Debug)]
struct UserPlace {
    users: Arc<Users>,
    user: String,
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut held = self
            .users
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.user);
            }
        }
    }
}

/// A connection let in: holds its places until dropped.
#[derive(Debug)]
pub struct Admission {
    _open: OwnedSemaphorePermit,
    unauthenticated: Option<(OwnedSemaphorePermit, SourcePlace)>,
    deadline: Instant,
    authenticated: Arc<AtomicBool>,
    users: Arc<Users>,
    user: Option<UserPlace>,
}

impl Admission {
    /// The connection authenticated as `user`: it takes one of the user's
    /// places, leaves the unauthenticated share, and its [`Grace`] no
    /// longer runs. When the user holds `limits.max_connections_per_user`
    /// already, it stays unauthenticated (its deadline still runs) and the
    /// error says why.
    pub fn authenticated_as(&mut self, user: &str) -> Result<(), String> {
        if self.user.is_none() {
            let mut held = self
                .users
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = held.entry(user.to_owned()).or_default();
            if *n >= self.users.max_per_user {
                return Err(format!(
                    "{user:?} already holds {n} connections to wicketd's {} listener \
                     (limits.max_connections_per_user); close some and try again",
                    self.users.what
                ));
            }
            *n += 1;
            drop(held);
            self.user = Some(UserPlace {
                users: self.users.clone(),
                user: user.to_owned(),
            });
        }
        self.unauthenticated = None;
        self.authenticated.store(true, Ordering::Release);
        Ok(())
    }

    /// When the connection must have authenticated by.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The login grace, for I/O that runs where the admission is not (an
    /// SSH session's stream).
    pub fn grace(&self) -> Grace {
        Grace {
            timer: Some(Box::pin(tokio::time::sleep_until(self.deadline))),
            authenticated: self.authenticated.clone(),
        }
    }
}

/// A connection's login grace as seen from its I/O.
#[derive(Debug)]
pub struct Grace {
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    authenticated: Arc<AtomicBool>,
}

impl Grace {
    /// Whether the grace is over without the connection having
    /// authenticated; wakes `cx` when it runs out.
    pub fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(timer) = self.timer.as_mut() else {
            return false;
        };
        if self.authenticated.load(Ordering::Acquire) {
            self.timer = None;
            return false;
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Gate {
    pub fn new(what: &'static str, limits: Limits) -> Self {
        Self {
            what,
            limits,
            open: Arc::new(Semaphore::new(limits.max_connections)),
            unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            sources: Arc::default(),
            users: Arc::new(Users {
                what,
                max_per_user: limits.max_connections_per_user,
                held: Mutex::default(),
            }),
            refused: AtomicU64::new(0),
        }
    }

    /// A place among `source`'s unauthenticated connections, if it has
    /// one left.
    fn source_place(&self, source: std::net::IpAddr) -> Option<SourcePlace> {
        let key = crate::auth::source_key(source);
        let mut held = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(key.clone()).or_default();
        if *n >= self.limits.max_unauthenticated_per_source {
            return None;
        }
        *n += 1;
        Some(SourcePlace {
            sources: self.sources.clone(),
            source: key,
        })
    }

    /// Lets a new connection from `source` in, or says why not.
    pub fn admit(&self, now: Instant, source: std::net::IpAddr) -> Result<Admission, String> {
        let admitted = match self.unauthenticated.clone().try_acquire_owned() {
            Err(_) => Err(format!(
                "too many connections to wicketd's {} listener are still authenticating \
                 (limits.max_unauthenticated is {}); try again",
                self.what, self.limits.max_unauthenticated
            )),
            Ok(unauthenticated) => match (
                self.source_place(source),
                self.open.clone().try_acquire_owned(),
            ) {
                (None, _) => Err(format!(
                    "too many connections from {} to wicketd's {} listener are still \
                     authenticating (limits.max_unauthenticated_per_source is {}); try again",
                    crate::auth::source_key(source),
                    self.what,
                    self.limits.max_unauthenticated_per_source
                )),
                (_, Err(_)) => Err(format!(
                    "too many connections to wicketd's {} listener (limits.max_connections is {}); try again later",
                    self.what, self.limits.max_connections
                )),
                (Some(place), Ok(open)) => Ok(Admission {
                    _open: open,
                    unauthenticated: Some((unauthenticated, place)),
                    deadline: now + self.limits.login_grace.to_std().unwrap_or_default(),
                    authenticated: Arc::default(),
                    users: self.users.clone(),
                    user: None,
                }),
            },
        };
        if let Err(why) = &admitted {
            let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if total.is_power_of_two() {
                tracing::warn!(listener = self.what, refused_total = total, reason = %why, "connection refused");
            }
        }
        admitted
    }

    /// Connections refused since start.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn gate(open: usize, unauthenticated: usize) -> Gate {
        Gate::new(
            "test",
            Limits {
                max_connections: open,
                max_unauthenticated: unauthenticated,
                max_unauthenticated_per_source: unauthenticated,
                max_connections_per_user: 2,
                login_grace: chrono::Duration::seconds(5),
                ..Limits::default()
            },
        )
    }

    #[test]
    fn unauthenticated_connections_have_a_share_of_their_own() {
        let now = Instant::now();
        let g = gate(3, 2);
        let mut a = g.admit(now, HOME).unwrap();
        let b = g.admit(now, HOME).unwrap();
        assert_eq!(a.deadline(), now + std::time::Duration::from_secs(5));
        let why = g.admit(now, HOME).unwrap_err();
        assert!(why.contains("limits.max_unauthenticated is 2"), "{why}");
        // Authenticating frees a place among the unauthenticated only.
        a.authenticated_as("a").unwrap();
        let mut c = g.admit(now, HOME).unwrap();
        c.authenticated_as("c").unwrap();
        let why = g.admit(now, HOME).unwrap_err();
        assert!(why.contains("limits.max_connections is 3"), "{why}");
        // The refused attempt took no place: closing one lets one in.
        drop(b);
        let _d = g.admit(now, HOME).unwrap();
        assert_eq!(g.refused_total(), 2);
        drop(a);
        drop(c);
        let _e = g.admit(now, HOME).unwrap();
        let why = g.admit(now, HOME).unwrap_err();
        assert!(why.contains("still authenticating"), "{why}");
    }

    #[test]
    fn a_user_holds_a_limited_share_and_gets_it_back() {
        let now = Instant::now();
        let g = gate(10, 10);
        let mut conns: Vec<Admission> = (0..3).map(|_| g.admit(now, HOME).unwrap()).collect();
        conns[0].authenticated_as("alice").unwrap();
        conns[1].authenticated_as("alice").unwrap();
        // Authenticating twice takes one place.
        conns[1].authenticated_as("alice").unwrap();
        let why = conns[2].authenticated_as("alice").unwrap_err();
        assert!(why.contains("limits.max_connections_per_user"), "{why}");
        assert!(
            conns[2].unauthenticated.is_some(),
            "still in the unauthenticated share"
        );
        // Others are not affected; a closed connection gives its place back.
        let mut bob = g.admit(now, HOME).unwrap();
        bob.authenticated_as("bob").unwrap();
        conns.remove(0);
        conns[1].authenticated_as("alice").unwrap();
        drop(conns);
        assert!(g.users.held.lock().unwrap().get("alice").is_none());
    }

    /// One source (an address, an IPv6 /64) holds at most its share of
    /// the unauthenticated places; others still get in, and authenticating
    /// or closing gives the place back.
    #[test]
    fn one_source_cannot_take_every_unauthenticated_place() {
        let now = Instant::now();
        let g = Gate::new(
            "test",
            Limits {
                max_connections: 10,
                max_unauthenticated: 5,
                max_unauthenticated_per_source: 2,
                ..Limits::default()
            },
        );
        let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        let mut a = g.admit(now, v6(1)).unwrap();
        let b = g.admit(now, v6(2)).unwrap();
        let why = g.admit(now, v6(3)).unwrap_err();
        assert!(
            why.contains("from 2001:db8:0:1::/64")
                && why.contains("limits.max_unauthenticated_per_source is 2"),
            "{why}"
        );
        // Another source still gets in.
        let _c = g.admit(now, HOME).unwrap();
        // Authenticated, a connection leaves its source's share; closed,
        // one gives its place back.
        a.authenticated_as("alice").unwrap();
        let d = g.admit(now, v6(4)).unwrap();
        assert!(g.admit(now, v6(5)).is_err());
        drop(b);
        let _e = g.admit(now, v6(6)).unwrap();
        drop(d);
        drop(a);
        assert_eq!(g.sources.lock().unwrap().get("2001:db8:0:1::/64"), Some(&1));
    }
}
