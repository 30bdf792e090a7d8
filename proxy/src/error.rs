//! The daemon library's one error type. HTTP status mapping lives in
//! `impl IntoResponse for Error` (`api.rs`) and nowhere else.

/// Everything the daemon's library code can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("too many failed attempts; try again in {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    /// Busy for a moment (a bounded resource is taken): try again soon.
    #[error("{0}")]
    Busy(String),
    #[error("certificate authority: {0}")]
    Ca(#[from] wicket_ca::Error),
    #[error("storage: {0}")]
    Store(String),
    #[error("{0}")]
    Io(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
