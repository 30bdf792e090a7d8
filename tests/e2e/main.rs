//! Wicket's end-to-end tests: one binary, real processes on 127.0.0.1.
//!
//! The harness (`wicket_e2e`, in `tests/lib.rs`) builds the `wicketd` and
//! `wicket` binaries once, starts servers through builders on ephemeral
//! loopback ports, waits for them by polling with deadlines, and tears them
//! down when the handles drop.

// Everything in this binary is test code: helpers may unwrap like tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests may read the clock (to compute TOTP codes and schedule starts).
#![allow(clippy::disallowed_methods)]

mod ca_tools;
mod foundation;
mod pg;
pub mod pg_setup;
mod postgres_harness;
mod requests;
mod ssh;
mod store;
