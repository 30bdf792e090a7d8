//! The Wicket user CLI, `wicket`, as a library.
//!
//! It makes the user's keys locally (they never leave the machine), logs in
//! to wicketd over HTTPS (pinned CA, then mutual TLS with the issued client
//! certificate), keeps one credential profile per proxy and user under
//! `$WICKET_HOME` in the formats OpenSSH and psql read, and prints
//! what it knows as text or JSON. It holds no policy: every decision is the
//! daemon's. It does not link the daemon or its database driver; the wire
//! types come from `wicket-api`.

#[macro_use]
pub mod out;

pub mod cli;
pub mod client;
pub mod db;
pub mod keys;
pub mod peer;
pub mod profile;
#[cfg(unix)]
pub mod prompt;
pub mod requests;
pub mod ssh;
pub mod term;

/// The CLI's one clock read.
#[allow(clippy::disallowed_methods)]
pub fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}
