//! Wire types shared by `wicketd` and the `wicket` CLI: the JSON bodies of the
//! HTTPS API under `/v1`, and ([`pg`]) the PostgreSQL wire-protocol codec the
//! database proxy and the CLI's tunnel both speak. No I/O here, so the CLI
//! links neither the daemon nor its database driver.

pub mod pg;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The API version prefix.
pub const API_PREFIX: &str = "/v1";

/// A Unicode bidirectional control: it can reorder what a line shows. Names
/// the daemon hands out are refused with one (`wicketd check-config`), and
/// the CLI escapes them in what others wrote.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A secret string (password, OTP code): serialized as-is, never printed by
/// `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; call sites are the places that use it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `GET /v1/ping` (no authentication): who this is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ping {
    pub cluster_name: String,
    pub version: String,
    /// `sha256:<hex>` of the TLS CA's public key.
    pub tls_ca_pin: String,
}

/// `POST /v1/login`: password (+ OTP) for certificates. Only public keys travel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: Secret,
    #[serde(default)]
    pub otp: Option<Secret>,
    /// The user's SSH public key, OpenSSH one-line format.
    pub ssh_public_key: String,
    /// A PKCS#10 request (PEM) for the user's TLS key.
    pub tls_csr_pem: String,
}

/// `POST /v1/certs` (mutual TLS): new certificates for new keys, optionally
/// carrying active access requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReissueRequest {
    pub ssh_public_key: String,
    pub tls_csr_pem: String,
    #[serde(default)]
    pub request_ids: Vec<String>,
}

/// Certificates for a session of the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Certificates {
    pub cluster_name: String,
    pub user: String,
    /// Roles in force: standing plus granted.
    pub roles: Vec<String>,
    pub principals: Vec<String>,
    pub request_ids: Vec<String>,
    pub valid_after: DateTime<Utc>,
    pub valid_before: DateTime<Utc>,
    /// `ssh-ed25519-cert-v01@openssh.com AAAA...`
    pub ssh_certificate: String,
    pub tls_certificate_pem: String,
    /// The TLS CA bundle (PEM), trusted for the API and proxies.
    pub tls_ca_pem: String,
    /// SSH user CA public key (OpenSSH format).
    pub ssh_user_ca: String,
    /// The proxy's SSH host CA public key (OpenSSH format): the one host CA
    /// users trust (nodes' host certificates come from another).
    pub ssh_host_ca: String,
}

/// `GET /v1/me` (mutual TLS): what the server sees.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Me {
    pub user: String,
    /// Standing roles in force (none once the login behind the certificate
    /// has ended).
    pub standing_roles: Vec<String>,
    pub roles: Vec<String>,
    pub request_ids: Vec<String>,
    pub team: Option<String>,
}

/// One SSH node the user can reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub logins: Vec<String>,
}

/// One database the user can reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatabaseInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub names: Vec<String>,
    pub users: Vec<String>,
}

/// One Kubernetes cluster the user can reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubeClusterInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub groups: Vec<String>,
    pub users: Vec<String>,
}

/// `GET /v1/resources` (mutual TLS): what the user can reach now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resources {
    pub nodes: Vec<NodeInfo>,
    pub databases: Vec<DatabaseInfo>,
    pub kube_clusters: Vec<KubeClusterInfo>,
    /// Where the proxies listen (ports on the API's host).
    #[serde(default)]
    pub proxies: ProxyPorts,
}

/// The ports of wicketd's proxy listeners (absent when not listening).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProxyPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<u16>,
}

/// One audit event, as `GET /v1/audit` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEventView {
    pub id: String,
    pub time: DateTime<Utc>,
    pub kind: String,
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub session_id: Option<String>,
    pub data: serde_json::Value,
}

/// `GET /v1/audit/verify`: the audit hash chain checked from its first
/// event to its head.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditVerifyView {
    /// True when every event follows the chain and the head matches.
    pub intact: bool,
    /// Events checked.
    pub events: u64,
    /// The head: the last event's place and hash.
    pub head_seq: i64,
    pub head_hash: String,
    /// Where the chain does not hold (the first ones), and how many places.
    pub problems: Vec<String>,
    pub problem_count: u64,
}

/// `POST /v1/requests`: ask for roles. Accepts Wicket's shape (`roles`,
/// `duration: "2h"`) and the feature request's (`role`, `duration_hours`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_url: Option<String>,
    /// `90m`, `2h`, `1h30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_hours: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    /// `low`, `normal` (default), `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urgency: Option<String>,
    #[serde(default)]
    pub resources: Vec<String>,
}

/// `POST /v1/requests/{id}/review`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewBody {
    /// `approve`, `deny`, `ask-info`, `acknowledge`.
    pub verdict: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
}

/// Body of update / revoke / extend calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// `POST /v1/break-glass`: an emergency grant with a fresh TOTP code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassBody {
    pub roles: Vec<String>,
    pub reason: String,
    pub otp: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// One review as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReviewView {
    pub reviewer: String,
    pub verdict: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    pub as_member_of: Vec<String>,
}

/// An access request and its grant, in the feature request's grant schema
/// (id, requester, normal roles, granted roles, granted permissions,
/// justification, ticket URL, approved_by/approved_at, starts_at/expires_at,
/// status, actions_taken, revoked_by/revoke_reason) plus Wicket's details.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Grant {
    pub id: String,
    pub requester: String,
    pub requester_normal_roles: Vec<String>,
    pub requested_roles: Vec<String>,
    pub granted_roles: Vec<String>,
    pub granted_permissions: Vec<String>,
    pub justification: String,
    pub ticket_url: Option<String>,
    pub approved_by: Option<String>,
    pub approved_at: Option<DateTime<Utc>>,
    pub starts_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub status: String,
    pub actions_taken: i64,
    pub revoked_by: Option<String>,
    pub revoke_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub urgency: String,
    pub requested_duration_secs: i64,
    pub requested_start: Option<DateTime<Utc>>,
    pub resources: Vec<String>,
    pub break_glass: bool,
    pub acknowledged_by: Option<String>,
    pub escalated: bool,
    pub extensions: u32,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<String>,
    pub reviews: Vec<ReviewView>,
    /// What is still needed before the grant activates (empty once decided).
    pub still_needed: Vec<String>,
    /// Users who may still review it.
    pub can_review: Vec<String>,
    /// What the requested roles add to the requester's standing roles.
    pub risk: serde_json::Value,
}

/// A queued notification.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Notification {
    pub time: DateTime<Utc>,
    pub request_id: Option<String>,
    pub recipients: Vec<String>,
    pub subject: String,
    pub urgent: bool,
}

/// Every error body: a machine-readable code and one human line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_debug_print() {
        let req = LoginRequest {
            user: "alice".into(),
            password: Secret::new("hunter2"),
            otp: Some(Secret::new("123456")),
            ssh_public_key: String::new(),
            tls_csr_pem: String::new(),
        };
        let dbg = format!("{req:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("123456"), "{dbg}");
        let json = serde_json::to_string(&req).unwrap();
        assert!(json.contains("hunter2"));
    }

    #[test]
    fn login_request_rejects_unknown_fields() {
        let r: Result<LoginRequest, _> = serde_json::from_str(
            r#"{"user":"a","password":"p","ssh_public_key":"k","tls_csr_pem":"c","admin":true}"#,
        );
        assert!(r.is_err());
    }
}

/// `GET /v1/recordings`: one recorded session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingInfo {
    pub session_id: String,
    pub user: String,
    pub node: String,
    pub login: String,
    pub request_ids: Vec<String>,
    pub started: DateTime<Utc>,
    /// Size of the asciicast file in bytes.
    pub size: u64,
}
