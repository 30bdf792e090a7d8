//! The daemon's one place that reads the wall clock. Everything below it
//! (`ca`, `policy`, the services) takes time as a parameter.

use chrono::{DateTime, Utc};

/// Now, in UTC.
#[allow(clippy::disallowed_methods)]
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    now().timestamp_millis()
}

/// A monotonic instant, for timing within a session (recording offsets).
#[allow(clippy::disallowed_methods)]
pub fn instant() -> std::time::Instant {
    std::time::Instant::now()
}
