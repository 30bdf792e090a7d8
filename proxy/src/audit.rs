//! Typed audit events. Every event is one variant; it is stored as its kind
//! (the variant name), actor, optional request/session IDs, and its fields as
//! JSON. Secrets never appear in an event.

use crate::store::AuditRow;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Something that happened and must be on the record.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    UserCreated {
        user: String,
        roles: Vec<String>,
        team: Option<String>,
        totp: bool,
    },
    LoginSucceeded {
        user: String,
        source: String,
        /// `password`, `password+totp`, or `certificate` (reissue over mTLS).
        method: String,
        roles: Vec<String>,
        principals: Vec<String>,
        request_ids: Vec<String>,
        valid_after: DateTime<Utc>,
        valid_before: DateTime<Utc>,
        ssh_serial: u64,
        ssh_key_fingerprint: String,
        tls_serial: String,
    },
    LoginFailed {
        user: String,
        source: String,
        reason: String,
    },
    LoginRateLimited {
        user: String,
        source: String,
        retry_after_secs: u64,
    },
    AccessDenied {
        user: String,
        action: String,
        reason: String,
    },
    /// A step in an access request's life (`request_created`,
    /// `request_approved`, `grant_activated`, `grant_revoked`, ...): the kind
    /// comes from the policy state machine's audit effect.
    AccessRequest {
        action: String,
        actor: String,
        request_id: String,
        state: String,
        detail: String,
    },
}

impl AuditEvent {
    /// The stored kind: the variant's snake_case name.
    pub fn kind(&self) -> &str {
        match self {
            Self::AccessRequest { action, .. } => action,
            Self::UserCreated { .. } => "user_created",
            Self::LoginSucceeded { .. } => "login_succeeded",
            Self::LoginFailed { .. } => "login_failed",
            Self::LoginRateLimited { .. } => "login_rate_limited",
            Self::AccessDenied { .. } => "access_denied",
        }
    }

    pub fn actor(&self) -> &str {
        match self {
            Self::UserCreated { user, .. }
            | Self::LoginSucceeded { user, .. }
            | Self::LoginFailed { user, .. }
            | Self::LoginRateLimited { user, .. }
            | Self::AccessDenied { user, .. } => user,
            Self::AccessRequest { actor, .. } => actor,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::LoginSucceeded { request_ids, .. } => request_ids.first().map(String::as_str),
            Self::AccessRequest { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    /// The row to store at `time_ms`.
    pub fn to_row(&self, time_ms: i64) -> AuditRow {
        AuditRow {
            id: uuid::Uuid::new_v4().to_string(),
            time_ms,
            kind: self.kind().to_owned(),
            actor: Some(self.actor().to_owned()),
            request_id: self.request_id().map(str::to_owned),
            session_id: None,
            data: serde_json::to_string(self).unwrap_or_else(|_| "{}".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_matches_serialized_tag() {
        let e = AuditEvent::LoginFailed {
            user: "alice".into(),
            source: "127.0.0.1".into(),
            reason: "wrong password".into(),
        };
        let row = e.to_row(5);
        let v: serde_json::Value = serde_json::from_str(&row.data).unwrap();
        assert_eq!(v["event"], row.kind);
        assert_eq!(row.actor.as_deref(), Some("alice"));
    }
}
