//! The versioned config file format (`version: 1`), as serde types.
//!
//! These mirror the YAML one to one, with `deny_unknown_fields` everywhere.
//! They hold text as written: durations, addresses, reviewer sets and names
//! are checked and converted by the validation in [`super`], which turns a
//! [`FileConfig`] into a [`super::Config`]. [`super::parse`] deserializes the
//! sections and entries of a file one by one (so every problem is reported);
//! deserializing a whole [`FileConfig`] at once accepts the same files.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of settings (version, listen, roles, ...)"
)]
pub struct FileConfig {
    /// Must be 1.
    pub version: u64,
    pub cluster_name: Option<String>,
    pub data_dir: Option<String>,
    pub storage: Option<String>,
    #[serde(default)]
    pub listen: ListenFile,
    #[serde(default)]
    pub certificates: CertificatesFile,
    #[serde(default)]
    pub session: SessionFile,
    #[serde(default)]
    pub audit: AuditFile,
    #[serde(default)]
    pub postgres: PostgresFile,
    #[serde(default)]
    pub requests: RequestsFile,
    #[serde(default)]
    pub break_glass: BreakGlassFile,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub teams: BTreeMap<String, TeamFile>,
    #[serde(default)]
    pub oncall: BTreeMap<String, OncallFile>,
    #[serde(default)]
    pub roles: BTreeMap<String, RoleFile>,
    #[serde(default)]
    pub approval: Vec<ApprovalFile>,
    #[serde(default)]
    pub resources: ResourcesFile,
}

/// The top-level keys of [`FileConfig`], in file order.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "version",
    "cluster_name",
    "data_dir",
    "storage",
    "listen",
    "certificates",
    "session",
    "audit",
    "postgres",
    "requests",
    "break_glass",
    "auth",
    "limits",
    "teams",
    "oncall",
    "roles",
    "approval",
    "resources",
];

/// `listen:` socket addresses (`IP:port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with api, ssh, postgres and kube addresses"
)]
pub struct ListenFile {
    pub api: Option<String>,
    pub ssh: Option<String>,
    pub postgres: Option<String>,
    pub kube: Option<String>,
}

/// `certificates:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with login_ttl and public_names"
)]
pub struct CertificatesFile {
    pub login_ttl: Option<DurationText>,
    /// Extra DNS names / IP addresses for the TLS server certificate.
    pub public_names: Option<Vec<String>>,
}

/// `session:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with disconnect_on_expiry, expiry_warning, record_input, \
                 max_recording_bytes, on_recording_failure, unverified_grace and \
                 recording_retention"
)]
pub struct SessionFile {
    pub disconnect_on_expiry: Option<bool>,
    pub expiry_warning: Option<DurationText>,
    /// Record what users type in SSH sessions too (default false: output only).
    pub record_input: Option<bool>,
    /// Most bytes one SSH session's recording may take (default 1 GiB).
    pub max_recording_bytes: Option<u64>,
    /// `end` (default: a session whose recording cannot go on ends, and one
    /// that cannot start one is refused) or `continue` (it goes on,
    /// unrecorded from there, with a marker and a log line).
    pub on_recording_failure: Option<String>,
    /// How long live sessions go on while their grant or user cannot be
    /// re-read from the store (default 30s; 0s = end at the first failure).
    pub unverified_grace: Option<DurationText>,
    /// How long SSH recordings are kept after their session ended
    /// (default: for ever; 1h to 36500d).
    pub recording_retention: Option<DurationText>,
}

/// `audit:` — how session events (statements, commands) reach the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with queue_size, on_overflow and db_parameter_values"
)]
pub struct AuditFile {
    /// Events buffered between the proxies and the store.
    pub queue_size: Option<u32>,
    /// `block` (sessions wait for the store) or `drop-and-count`.
    pub on_overflow: Option<String>,
    /// Record the values of extended-protocol Bind parameters.
    pub db_parameter_values: Option<bool>,
}

/// `limits:` — client connections each listener (API, SSH, PostgreSQL) takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with max_connections, max_unauthenticated, \
                 max_unauthenticated_per_source, max_connections_per_user, login_grace, \
                 send_timeout, ssh_channel_burst and ssh_channels_per_second"
)]
pub struct LimitsFile {
    /// Open client connections per listener (default 10000).
    pub max_connections: Option<u32>,
    /// Connections per listener not yet authenticated (default 100; sshd's
    /// MaxStartups).
    pub max_unauthenticated: Option<u32>,
    /// Of those, from one source address (an IPv6 /64) (default 50; sshd's
    /// PerSourceMaxStartups).
    pub max_unauthenticated_per_source: Option<u32>,
    /// Authenticated connections one user may hold per listener (default 100).
    pub max_connections_per_user: Option<u32>,
    /// Time a connection has to authenticate (default 60s; sshd's
    /// LoginGraceTime).
    pub login_grace: Option<DurationText>,
    /// Time an API response may wait for its client to take a byte
    /// (default 60s; nginx's send_timeout).
    pub send_timeout: Option<DurationText>,
    /// SSH channels (and remote forward requests) each side of a connection
    /// may open at once (default 300).
    pub ssh_channel_burst: Option<u32>,
    /// And how many more each second after that burst (default 30).
    pub ssh_channels_per_second: Option<u32>,
}

/// `postgres:` — the PostgreSQL proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with max_message_bytes, login_timeout"
)]
pub struct PostgresFile {
    /// Largest frontend message accepted (bytes; default 16 MiB).
    pub max_message_bytes: Option<u64>,
    /// How long the database may take to log a session in, from the
    /// startup message to its first ReadyForQuery (default 30s).
    pub login_timeout: Option<DurationText>,
}

/// `requests:`; every field defaults to [`wicket_policy::RequestSettings::default`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of request settings (min_duration, max_duration, ...)"
)]
pub struct RequestsFile {
    pub min_duration: Option<DurationText>,
    pub default_duration: Option<DurationText>,
    pub max_duration: Option<DurationText>,
    pub pending_ttl: Option<DurationText>,
    pub escalate_after: Option<DurationText>,
    pub require_reason: Option<bool>,
    pub require_ticket_url: Option<bool>,
    pub max_extensions: Option<u32>,
    pub allow_scheduled_start: Option<bool>,
    /// How many of one user's requests may await review at once.
    pub max_pending_per_user: Option<u32>,
}

/// `break_glass:`; defaults to [`wicket_policy::BreakGlassSettings::default`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with enabled, require_mfa, max_duration and notify"
)]
pub struct BreakGlassFile {
    pub enabled: Option<bool>,
    pub require_mfa: Option<bool>,
    pub max_duration: Option<DurationText>,
    /// Reviewer sets notified at once.
    #[serde(default)]
    pub notify: Vec<String>,
}

/// `auth:` login throttling.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with max_failures_per_user, max_failures_per_source and failure_window"
)]
pub struct AuthFile {
    pub max_failures_per_user: Option<u32>,
    pub max_failures_per_source: Option<u32>,
    pub failure_window: Option<DurationText>,
}

/// `teams.<name>:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a team: { lead, members }")]
pub struct TeamFile {
    pub lead: String,
    #[serde(default)]
    pub members: Vec<String>,
}

/// `oncall.<name>:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an on-call schedule: { rotation, shift, starts }"
)]
pub struct OncallFile {
    pub rotation: Vec<String>,
    pub shift: DurationText,
    /// RFC 3339 timestamp of the first shift's start.
    pub starts: String,
}

/// `roles.<name>:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a role: a mapping with logins, nodes, databases, kubernetes, request, review, ..."
)]
pub struct RoleFile {
    #[serde(default)]
    pub logins: Vec<String>,
    pub nodes: Option<LabelMap>,
    /// Default true.
    pub port_forwarding: Option<bool>,
    #[serde(default)]
    pub agent_forwarding: bool,
    #[serde(default)]
    pub x11_forwarding: bool,
    pub databases: Option<DatabasesFile>,
    pub kubernetes: Option<KubernetesFile>,
    pub max_duration: Option<DurationText>,
    pub request: Option<RoleListFile>,
    pub review: Option<RoleListFile>,
    #[serde(default)]
    pub revoke: bool,
    #[serde(default)]
    pub audit: bool,
}

/// `roles.<name>.databases:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with labels, names and users"
)]
pub struct DatabasesFile {
    #[serde(default)]
    pub labels: LabelMap,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
}

/// `roles.<name>.kubernetes:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with labels, groups and users"
)]
pub struct KubernetesFile {
    #[serde(default)]
    pub labels: LabelMap,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
}

/// `roles.<name>.request:` / `roles.<name>.review:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with roles: [..]")]
pub struct RoleListFile {
    #[serde(default)]
    pub roles: Vec<String>,
}

/// `approval[i]:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an approval rule: { roles, environment, require, secondary }"
)]
pub struct ApprovalFile {
    pub roles: Vec<String>,
    pub environment: Option<LabelMap>,
    pub require: RequireFile,
    #[serde(default)]
    pub secondary: Vec<String>,
}

/// `approval[i].require:` — `self`, `{any_of: [..]}`, `{all_of: [..]}` or
/// `{count: N, from: [..]}`; the lists hold reviewer sets as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequireFile {
    SelfApprove,
    AnyOf(Vec<String>),
    AllOf(Vec<String>),
    Count { count: u32, from: Vec<String> },
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a requirement: { any_of }, { all_of } or { count, from }"
)]
struct RequireMap {
    any_of: Option<Vec<String>>,
    all_of: Option<Vec<String>>,
    count: Option<u32>,
    from: Option<Vec<String>>,
}

const REQUIRE_FORMS: &str =
    "`self`, `{ any_of: [sets] }`, `{ all_of: [sets] }` or `{ count: N, from: [sets] }`";

impl<'de> Deserialize<'de> for RequireFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RequireFile;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{REQUIRE_FORMS}")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<RequireFile, E> {
                if s == "self" {
                    Ok(RequireFile::SelfApprove)
                } else {
                    Err(E::custom(format!(
                        "{s:?} is not a requirement; expected {REQUIRE_FORMS}"
                    )))
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RequireFile, A::Error> {
                let m = RequireMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (m.any_of, m.all_of, m.count, m.from) {
                    (Some(sets), None, None, None) => Ok(RequireFile::AnyOf(sets)),
                    (None, Some(sets), None, None) => Ok(RequireFile::AllOf(sets)),
                    (None, None, Some(count), Some(from)) => Ok(RequireFile::Count { count, from }),
                    (None, None, Some(_), None) => Err(de::Error::custom(
                        "`count` needs `from`: the reviewer sets to count approvals from",
                    )),
                    (None, None, None, Some(_)) => Err(de::Error::custom(
                        "`from` needs `count`: how many approvals are required",
                    )),
                    (None, None, None, None) => Err(de::Error::custom(format!(
                        "empty requirement; expected {REQUIRE_FORMS}"
                    ))),
                    _ => Err(de::Error::custom(format!(
                        "use exactly one of {REQUIRE_FORMS}"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `resources:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with nodes, databases and kube_clusters"
)]
pub struct ResourcesFile {
    #[serde(default)]
    pub nodes: Vec<NodeFile>,
    #[serde(default)]
    pub databases: Vec<DatabaseFile>,
    #[serde(default)]
    pub kube_clusters: Vec<KubeClusterFile>,
}

/// `resources.nodes[i]:`; `address` is `host:port` of the node's sshd.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a node: { name, address, labels, host_key }"
)]
pub struct NodeFile {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub labels: LabelMap,
    /// The node's host public key (`ssh-ed25519 AAAA...`), pinned: the proxy
    /// accepts it instead of a host certificate from Wicket's host CA.
    pub host_key: Option<String>,
}

/// `resources.databases[i]:`; `address` is `host:port` of the PostgreSQL server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a database: { name, address, labels, ca_file, server_name }"
)]
pub struct DatabaseFile {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub labels: LabelMap,
    /// CA bundle (PEM) that verifies the server's certificate.
    pub ca_file: Option<String>,
    /// Name to verify the server certificate against (default: the host).
    pub server_name: Option<String>,
}

/// `resources.kube_clusters[i]:`; `address` is the API server's `https://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a Kubernetes cluster: { name, address, labels, ca_file, server_name }"
)]
pub struct KubeClusterFile {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub labels: LabelMap,
    /// CA bundle (PEM) that verifies the API server's certificate.
    pub ca_file: Option<String>,
    /// Name to verify the server certificate against (default: the host).
    pub server_name: Option<String>,
}

/// A label map as written; keys and values may be YAML strings, numbers or
/// booleans (`{ tier: 1 }` reads as `"1"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelMap(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for LabelMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = BTreeMap::<ScalarText, ScalarText>::deserialize(d)?;
        Ok(LabelMap(m.into_iter().map(|(k, v)| (k.0, v.0)).collect()))
    }
}

/// A scalar read as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ScalarText(String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ScalarText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ScalarText, E> {
                Ok(ScalarText(s.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<ScalarText, E> {
                Ok(ScalarText(b.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ScalarText, E> {
                Ok(ScalarText(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ScalarText, E> {
                Ok(ScalarText(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<ScalarText, E> {
                Ok(ScalarText(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as written (`"15m"`); a bare YAML number is kept as its text so
/// that validation can say it lacks a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"15m\", \"4h\", \"1h30m\" or \"2d\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DurationText, E> {
                Ok(DurationText(s.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<DurationText, E> {
                Ok(DurationText(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<DurationText, E> {
                Ok(DurationText(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
