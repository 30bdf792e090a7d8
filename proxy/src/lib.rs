//! The Wicket daemon, `wicketd`, as a library.
//!
//! It owns everything with I/O: the versioned configuration file (`config`),
//! storage on SQLite or PostgreSQL (`store`), CA key files (`keystore`), the
//! HTTPS JSON API with mutual TLS (`api`, `server`, `tls`), login and
//! certificate issuance (`service`, `auth`), access requests (`requests`),
//! the SSH and PostgreSQL proxies (`ssh`, `pg`), live sessions and their
//! ends (`sessions`), the grant index (`index`), and the typed audit log
//! (`audit`). Decisions are delegated to `wicket-policy` and certificate bytes
//! to `wicket-ca`; this crate persists and delivers. The `wicketd` binary is a
//! thin wrapper around [`cli::main`].

pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod index;
pub mod keystore;
pub mod pg;
pub mod requests;
pub mod server;
pub mod service;
pub mod sessions;
pub mod ssh;
pub mod store;
pub mod tls;

pub use error::{Error, Result};
