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
    /// A proxied connection was refused (by policy or for bad input).
    SessionDenied {
        user: String,
        protocol: String,
        resource: String,
        login: String,
        source: String,
        request_ids: Vec<String>,
        reason: String,
    },
    /// A proxied session began; `reason` is the policy's.
    SessionStarted {
        #[serde(flatten)]
        session: SessionRef,
        source: String,
        /// Database name (PostgreSQL sessions).
        #[serde(skip_serializing_if = "Option::is_none")]
        database: Option<String>,
        reason: String,
    },
    SessionEnded {
        #[serde(flatten)]
        session: SessionRef,
        bytes_from_client: u64,
        bytes_to_client: u64,
        /// Statements (PostgreSQL) or exec commands (SSH).
        statements: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_status: Option<u32>,
        /// Audit events of this session dropped because the audit store
        /// could not keep up (`drop-and-count`).
        audit_dropped: u64,
        reason: String,
    },
    /// A simple-protocol Query.
    DbQuery {
        #[serde(flatten)]
        session: SessionRef,
        statement: String,
    },
    /// An extended-protocol Parse.
    DbParse {
        #[serde(flatten)]
        session: SessionRef,
        name: String,
        statement: String,
    },
    /// An extended-protocol Execute, with what the Bind before it carried.
    DbExecute {
        #[serde(flatten)]
        session: SessionRef,
        portal: String,
        statement: String,
        params: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        values: Option<Vec<Option<String>>>,
    },
    /// COPY began (`in`: client to server, `out`: server to client).
    DbCopy {
        #[serde(flatten)]
        session: SessionRef,
        direction: String,
        statement: String,
    },
    /// An ErrorResponse from the server.
    DbError {
        #[serde(flatten)]
        session: SessionRef,
        code: String,
        message: String,
    },
    /// An SSH exec request.
    SshExec {
        #[serde(flatten)]
        session: SessionRef,
        command: String,
    },
    /// An SSH port forward was opened.
    SshPortForward {
        #[serde(flatten)]
        session: SessionRef,
        host: String,
        port: u32,
    },
}

/// Who, where and under which grants: carried by every session event.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRef {
    pub session_id: String,
    pub user: String,
    pub protocol: String,
    pub resource: String,
    /// SSH login or database user.
    pub login: String,
    pub request_ids: Vec<String>,
}

/// Kinds that count as actions taken under a grant.
pub const SESSION_ACTION_KINDS: &[&str] = &[
    "session_started",
    "db_query",
    "db_execute",
    "db_copy",
    "kube_request",
    "ssh_exec",
    "ssh_port_forward",
];

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
            Self::SessionDenied { .. } => "session_denied",
            Self::SessionStarted { .. } => "session_started",
            Self::SessionEnded { .. } => "session_ended",
            Self::DbQuery { .. } => "db_query",
            Self::DbParse { .. } => "db_parse",
            Self::DbExecute { .. } => "db_execute",
            Self::DbCopy { .. } => "db_copy",
            Self::DbError { .. } => "db_error",
            Self::SshExec { .. } => "ssh_exec",
            Self::SshPortForward { .. } => "ssh_port_forward",
        }
    }

    pub fn actor(&self) -> &str {
        match self {
            Self::UserCreated { user, .. }
            | Self::LoginSucceeded { user, .. }
            | Self::LoginFailed { user, .. }
            | Self::LoginRateLimited { user, .. }
            | Self::AccessDenied { user, .. }
            | Self::SessionDenied { user, .. } => user,
            Self::AccessRequest { actor, .. } => actor,
            _ => self.session().map(|s| s.user.as_str()).unwrap_or_default(),
        }
    }

    /// The session this event belongs to, if any.
    pub fn session(&self) -> Option<&SessionRef> {
        match self {
            Self::SessionStarted { session, .. }
            | Self::SessionEnded { session, .. }
            | Self::DbQuery { session, .. }
            | Self::DbParse { session, .. }
            | Self::DbExecute { session, .. }
            | Self::DbCopy { session, .. }
            | Self::DbError { session, .. }
            | Self::SshExec { session, .. }
            | Self::SshPortForward { session, .. } => Some(session),
            _ => None,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::LoginSucceeded { request_ids, .. } => request_ids.first().map(String::as_str),
            Self::AccessRequest { request_id, .. } => Some(request_id),
            Self::SessionDenied { request_ids, .. } => request_ids.first().map(String::as_str),
            _ => self
                .session()
                .and_then(|s| s.request_ids.first())
                .map(String::as_str),
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
            session_id: self.session().map(|s| s.session_id.clone()),
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
