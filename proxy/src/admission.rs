//! Admission of client connections to a listener: how many it holds open,
//! how many of those may still be unauthenticated (like sshd's
//! MaxStartups), and the deadline by which a connection must authenticate
//! (LoginGraceTime). Unauthenticated clients cannot hold more than a fixed
//! share of the proxy; authenticated ones are named in the audit.
//!
//! Does not limit per user or per resource, and does no I/O: the accept
//! loop writes the refusal ([`crate::server::accept_until_shutdown`]).

use crate::config::Limits;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// One listener's limits.
#[derive(Debug)]
pub struct Gate {
    what: &'static str,
    limits: Limits,
    open: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    refused: AtomicU64,
}

/// A connection let in: holds its places until dropped.
#[derive(Debug)]
pub struct Admission {
    _open: OwnedSemaphorePermit,
    unauthenticated: Option<OwnedSemaphorePermit>,
    deadline: Instant,
    authenticated: Arc<AtomicBool>,
}

impl Admission {
    /// The connection authenticated: it leaves the unauthenticated share
    /// and its [`Grace`] no longer runs.
    pub fn authenticated(&mut self) {
        self.unauthenticated = None;
        self.authenticated.store(true, Ordering::Release);
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
            refused: AtomicU64::new(0),
        }
    }

    /// Lets a new connection in, or says why not.
    pub fn admit(&self, now: Instant) -> Result<Admission, String> {
        let admitted = match self.unauthenticated.clone().try_acquire_owned() {
            Err(_) => Err(format!(
                "too many connections to wicketd's {} listener are still authenticating \
                 (limits.max_unauthenticated is {}); try again",
                self.what, self.limits.max_unauthenticated
            )),
            Ok(unauthenticated) => match self.open.clone().try_acquire_owned() {
                Err(_) => Err(format!(
                    "too many connections to wicketd's {} listener (limits.max_connections is {}); try again later",
                    self.what, self.limits.max_connections
                )),
                Ok(open) => Ok(Admission {
                    _open: open,
                    unauthenticated: Some(unauthenticated),
                    deadline: now + self.limits.login_grace.to_std().unwrap_or_default(),
                    authenticated: Arc::default(),
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

    fn gate(open: usize, unauthenticated: usize) -> Gate {
        Gate::new(
            "test",
            Limits {
                max_connections: open,
                max_unauthenticated: unauthenticated,
                login_grace: chrono::Duration::seconds(5),
            },
        )
    }

    #[test]
    fn unauthenticated_connections_have_a_share_of_their_own() {
        let now = Instant::now();
        let g = gate(3, 2);
        let mut a = g.admit(now).unwrap();
        let b = g.admit(now).unwrap();
        assert_eq!(a.deadline(), now + std::time::Duration::from_secs(5));
        let why = g.admit(now).unwrap_err();
        assert!(why.contains("limits.max_unauthenticated is 2"), "{why}");
        // Authenticating frees a place among the unauthenticated only.
        a.authenticated();
        let mut c = g.admit(now).unwrap();
        c.authenticated();
        let why = g.admit(now).unwrap_err();
        assert!(why.contains("limits.max_connections is 3"), "{why}");
        // The refused attempt took no place: closing one lets one in.
        drop(b);
        let _d = g.admit(now).unwrap();
        assert_eq!(g.refused_total(), 2);
        drop(a);
        drop(c);
        let _e = g.admit(now).unwrap();
        let why = g.admit(now).unwrap_err();
        assert!(why.contains("still authenticating"), "{why}");
    }
}
