//! `wicketd`'s configuration: the versioned YAML file, its validation, and the
//! validated runtime [`Config`].
//!
//! [`parse`] reads the text into a YAML value, deserializes each top-level
//! section (and each role, team, schedule, approval rule and resource) on its
//! own, then checks what it read as a whole — so one run reports every
//! problem, each with the path of the field it is about
//! (`roles.dba.max_duration: ...`, `approval[1].require.all_of[0]: ...`).
//! The file format is in [`file`]; an annotated example is
//! `deploy/wicket.yaml` (a copy of the product's shared example).
//!
//! Parsing is pure: relative paths in the file are resolved against a base
//! directory given by the caller ([`load`] uses the current directory).

mod check;
pub mod duration;
pub mod file;
#[cfg(test)]
mod tests;

pub use duration::{format_duration, parse_duration};

use chrono::Duration;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use wicket_policy::{
    BreakGlassSettings, Directory, LabelSelector, Policy, RequestSettings, Role, RoleSet,
    SshLoginGrant,
};

/// The only file format version this build reads.
pub const VERSION: u64 = 1;
/// `cluster_name` when the file does not set it.
pub const DEFAULT_CLUSTER_NAME: &str = "wicket";
/// `data_dir` when the file does not set it (relative to the base directory).
pub const DEFAULT_DATA_DIR: &str = "./wicket-data";
/// `listen.api` when the file does not set it.
pub const DEFAULT_API_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 3080));

/// The validated configuration `wicketd` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_name: String,
    /// Absolute when the base directory given to [`parse`] is.
    pub data_dir: PathBuf,
    pub storage: Storage,
    pub listen: Listen,
    /// Lifetime of the base (standing-roles) certificate issued at login.
    pub login_ttl: Duration,
    /// Extra DNS names / IP addresses for the API's TLS server certificate.
    pub public_names: Vec<String>,
    pub session: SessionSettings,
    pub audit: AuditSettings,
    pub postgres: PostgresSettings,
    pub auth: AuthSettings,
    pub limits: Limits,
    /// Roles, approval rules, teams and on-call, request limits, break-glass,
    /// resources.
    pub policy: Policy,
    /// TLS settings of databases that set `ca_file` / `server_name`, by name.
    pub database_tls: BTreeMap<String, ResourceTls>,
    /// TLS settings of Kubernetes clusters that set `ca_file` / `server_name`, by name.
    pub kube_tls: BTreeMap<String, ResourceTls>,
    /// Pinned host keys (`resources.nodes[i].host_key`, OpenSSH format), by node name.
    pub node_host_keys: BTreeMap<String, String>,
}

/// Where state is kept.
#[derive(Clone, PartialEq, Eq)]
pub enum Storage {
    /// SQLite in `data_dir`.
    Sqlite,
    /// PostgreSQL at this `postgres://` / `postgresql://` URL.
    Postgres(String),
}

impl Storage {
    /// The setting with any password in the URL replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite => "sqlite".into(),
            Self::Postgres(url) => redact_url(url),
        }
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Postgres(_) => f.debug_tuple("Postgres").field(&self.redacted()).finish(),
        }
    }
}

/// `url` with its secrets replaced by `***`: the password in its user
/// information, and the values of query parameters named for one
/// (`password`, as sqlx reads it, percent-encoded or not).
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    if url::Url::parse(url).is_err() {
        // A password with a '/', '?' or '#' not percent-encoded, say:
        // where its user information ends is anyone's guess, and the
        // driver's error would be no better. None of it is shown.
        return format!("{scheme}://(not a valid URL: hidden)");
    }
    // As the URL parser reads it: the authority ends at the first of these.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((t, f)) => (t, Some(f)),
        None => (tail, None),
    };
    let tail = match before_fragment.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if secret_param(k).is_some() => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => before_fragment.to_owned(),
    };
    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
    format!("{scheme}://{authority}{tail}{fragment}")
}

/// Whether a URL query parameter named `key` (as written, perhaps
/// percent-encoded) carries a secret: its name, decoded and lower-cased,
/// when it does.
fn secret_param(key: &str) -> Option<String> {
    let name = percent_decoded(key).to_ascii_lowercase();
    name.contains("password").then_some(name)
}

/// The (decoded, lower-cased) names of `url`'s query parameters that
/// carry a secret.
pub(crate) fn secret_params(url: &str) -> Vec<String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query
        .split('&')
        .filter_map(|p| secret_param(p.split_once('=')?.0))
        .collect()
}

/// `s` with `%XX` escapes decoded (and `+` as a space), as a URL's query
/// is read; bytes that are not UTF-8 are replaced.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether listening on `a` and on `b` would collide: the same port on the
/// same address, or where one is a wildcard of its family (`0.0.0.0`), or
/// `[::]`, which on Linux takes IPv4 too. Port 0 never collides.
pub(crate) fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, x: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// The sockets `wicketd` listens on. Only the API is always on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// HTTPS: JSON API and web UI.
    pub api: SocketAddr,
    /// SSH proxy.
    pub ssh: Option<SocketAddr>,
    /// PostgreSQL proxy.
    pub postgres: Option<SocketAddr>,
    /// Kubernetes API proxy.
    pub kube: Option<SocketAddr>,
}

impl Listen {
    /// Two listeners that would collide, as they stand (with the API's
    /// default address and what `start` was given), said as a problem.
    pub fn collision(&self) -> Option<String> {
        let all = [
            ("listen.api", Some(self.api)),
            ("listen.ssh", self.ssh),
            ("listen.postgres", self.postgres),
            ("listen.kube", self.kube),
        ];
        let set: Vec<(&str, SocketAddr)> =
            all.iter().filter_map(|(k, a)| Some((*k, (*a)?))).collect();
        for (i, (k, a)) in set.iter().enumerate() {
            if let Some((other, b)) = set[..i].iter().find(|(_, b)| overlap(*b, *a)) {
                return Some(format!("{k} {a} and {other} {b} would take the same port"));
            }
        }
        None
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            api: DEFAULT_API_ADDR,
            ssh: None,
            postgres: None,
            kube: None,
        }
    }
}

/// `session:` — live sessions and grant expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    /// End live sessions when the grant they run under ends (default true).
    pub disconnect_on_expiry: bool,
    /// Warn the session this long before its grant ends (default 15m; 0 = never).
    pub expiry_warning: Duration,
    /// Record what users type in SSH sessions as well as the output (default false).
    pub record_input: bool,
    /// Most bytes one SSH session's recording may take (default 1 GiB).
    pub max_recording_bytes: u64,
    /// A session whose recording cannot be written (disk full, past
    /// `max_recording_bytes`) ends, and one whose recording cannot be made is
    /// refused (default true; Teleport's `record_session: strict`). When
    /// false it goes on unrecorded from there, with a marker and a log line.
    pub end_on_recording_failure: bool,
    /// How long live sessions go on while wicketd cannot re-read their grant
    /// or their user from the store (default 30s; 0 = end at the first
    /// failure). Fail closed: after it, they end.
    pub unverified_grace: Duration,
    /// SSH recordings whose session ended longer ago than this are
    /// deleted: from this wicketd's data directory and from a shared store
    /// (default `None`: kept for ever, as Teleport does; 1h to 36500d).
    pub recording_retention: Option<Duration>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            disconnect_on_expiry: true,
            expiry_warning: Duration::minutes(15),
            record_input: false,
            max_recording_bytes: 1 << 30,
            end_on_recording_failure: true,
            unverified_grace: Duration::seconds(30),
            recording_retention: None,
        }
    }
}

/// What a session does when the audit store cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOverflow {
    /// Sessions wait until their events are queued (no event is lost).
    Block,
    /// Events that do not fit are dropped, counted, and the count recorded
    /// in the session's end event and the log.
    DropAndCount,
}

/// `audit:` — session events on their way to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Events buffered between the proxies and the store (default 10000).
    pub queue_size: usize,
    pub on_overflow: AuditOverflow,
    /// Record extended-protocol parameter values (default false: only the
    /// count). A fast-path call of a function other than the large-object
    /// ones always has its arguments recorded: they are all that says what
    /// it did.
    pub db_parameter_values: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            queue_size: 10_000,
            on_overflow: AuditOverflow::Block,
            db_parameter_values: false,
        }
    }
}

/// `limits:` — what each listener (API, SSH, PostgreSQL) takes from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections per listener (default 10000); more are refused.
    pub max_connections: usize,
    /// Connections per listener still in their TLS or SSH handshake or
    /// login (default 100); more are refused, like sshd's MaxStartups.
    pub max_unauthenticated: usize,
    /// Of those, how many one source address (an IPv6 /64) may hold
    /// (default 50, half the default pool), like sshd's
    /// PerSourceMaxStartups: one host cannot take every place and keep
    /// everyone else out. Clients behind one NAT, or a load balancer that
    /// does not keep the client's address, count as one source.
    pub max_unauthenticated_per_source: usize,
    /// Authenticated connections one user may hold per listener (default
    /// 100), whether or not the policy lets them anywhere; more stay
    /// unauthenticated until their login grace ends (SSH), or are refused.
    pub max_connections_per_user: usize,
    /// How long a connection may take to authenticate before it is closed
    /// (default 60s), like sshd's LoginGraceTime.
    pub login_grace: Duration,
    /// How long an API response may wait for its client to take a byte
    /// (default 60s), like nginx's `send_timeout`; then the connection
    /// ends. A client that stops reading a download (a recording sent from
    /// the store) lets go of its place and what was read for it; one that
    /// keeps taking a little, however slowly, is not cut (as with nginx).
    pub send_timeout: Duration,
    /// SSH channels each side of a connection (the user, the node) may open
    /// at once (default 300, more than the 256 that may be open at once);
    /// the user's remote forward requests count with the user's channels.
    /// Each open is audited, so past this burst and the rate below opens
    /// are refused for resource shortage and counted.
    pub ssh_channel_burst: u32,
    /// SSH channel opens each side may make per second after its burst
    /// (default 30).
    pub ssh_channels_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_unauthenticated: 100,
            max_unauthenticated_per_source: 50,
            max_connections_per_user: 100,
            login_grace: Duration::seconds(60),
            send_timeout: Duration::seconds(60),
            ssh_channel_burst: 300,
            ssh_channels_per_second: 30,
        }
    }
}

/// `postgres:` — the PostgreSQL proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresSettings {
    /// Largest frontend message accepted (default 16 MiB).
    pub max_message_bytes: usize,
    /// How long the database may take to log a session in (default 30s):
    /// the session is then refused with FATAL 08006, as PostgreSQL's own
    /// `authentication_timeout` does for its part of a login.
    pub login_timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            login_timeout: Duration::seconds(30),
        }
    }
}

/// `auth:` — login throttling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthSettings {
    /// Failed logins for one user within `failure_window` before it is locked (default 5).
    pub max_failures_per_user: u32,
    /// Failed logins from one source address within `failure_window` (default 20).
    pub max_failures_per_source: u32,
    /// Default 15m.
    pub failure_window: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            max_failures_per_user: 5,
            max_failures_per_source: 20,
            failure_window: Duration::minutes(15),
        }
    }
}

/// How the proxy reaches a database or Kubernetes API server over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceTls {
    /// PEM CA bundle verifying the server (resolved against the base directory).
    pub ca_file: Option<PathBuf>,
    /// Name the server certificate must carry (default: the address's host).
    pub server_name: Option<String>,
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a field path such as `roles.dba.max_duration` or
    /// `approval[1].require.all_of[0]`; `.` for the file as a whole, or the
    /// file's path when it could not be read.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a config file (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    /// The paths of the problems, in order.
    pub fn paths(&self) -> Vec<&str> {
        self.problems.iter().map(|p| p.path.as_str()).collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses and validates a config file's text. Relative paths (`data_dir`,
/// `ca_file`) are resolved against `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
    let mut value: serde_norway::Value = serde_norway::from_str(text)
        .map_err(|e| ConfigErrors::one(".", format!("invalid YAML: {e}")))?;
    value
        .apply_merge()
        .map_err(|e| ConfigErrors::one(".", format!("invalid YAML merge (<<): {e}")))?;
    check::build(value, base_dir).map_err(|problems| ConfigErrors { problems })
}

/// Reads and validates the config file at `path`; relative paths in it are
/// resolved against the current directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one(path.display().to_string(), format!("cannot read: {e}")))?;
    let cwd = std::env::current_dir().map_err(|e| {
        ConfigErrors::one(
            path.display().to_string(),
            format!("cannot resolve relative paths: no current directory: {e}"),
        )
    })?;
    parse(&text, &cwd)
}

impl Config {
    /// The configuration used when `wicketd` runs without a file: the same as
    /// a file holding only `version: 1`, plus two roles.
    ///
    /// - cluster `wicket`, data in `<base_dir>/wicket-data`, SQLite storage;
    /// - the API on 127.0.0.1:3080, no SSH / Postgres / Kubernetes listeners;
    /// - login certificates for 8h, default session, auth and request limits,
    ///   break-glass disabled, no teams, on-call, approval rules or resources;
    /// - role `access`: log in as your own user name (`{{user}}`) on every
    ///   node (`{"*": "*"}`), port forwarding allowed;
    /// - role `admin`: may request any role, review any request, revoke
    ///   grants and read the audit log. It grants no logins of its own.
    pub fn embedded_default(base_dir: &Path) -> Config {
        let access = Role {
            name: "access".into(),
            ssh: SshLoginGrant {
                logins: vec!["{{user}}".into()],
                nodes: LabelSelector([("*".to_string(), "*".to_string())].into()),
            },
            port_forwarding: true,
            ..Role::default()
        };
        let admin = Role {
            name: "admin".into(),
            port_forwarding: true,
            request_roles: vec!["*".into()],
            review_roles: vec!["*".into()],
            revoke: true,
            audit: true,
            ..Role::default()
        };
        Config {
            cluster_name: DEFAULT_CLUSTER_NAME.into(),
            data_dir: check::resolve(base_dir, DEFAULT_DATA_DIR),
            storage: Storage::Sqlite,
            listen: Listen::default(),
            login_ttl: Duration::hours(8),
            public_names: Vec::new(),
            session: SessionSettings::default(),
            audit: AuditSettings::default(),
            postgres: PostgresSettings::default(),
            auth: AuthSettings::default(),
            limits: Limits::default(),
            policy: Policy {
                roles: RoleSet::new([access, admin]),
                approval: Vec::new(),
                directory: Directory::default(),
                requests: RequestSettings::default(),
                break_glass: BreakGlassSettings::default(),
                resources: Vec::new(),
            },
            database_tls: BTreeMap::new(),
            kube_tls: BTreeMap::new(),
            node_host_keys: BTreeMap::new(),
        }
    }

    /// TLS settings for the database or Kubernetes cluster `name`, if it set any.
    pub fn resource_tls(
        &self,
        kind: wicket_policy::ResourceKind,
        name: &str,
    ) -> Option<&ResourceTls> {
        match kind {
            wicket_policy::ResourceKind::Database => self.database_tls.get(name),
            wicket_policy::ResourceKind::KubeCluster => self.kube_tls.get(name),
            wicket_policy::ResourceKind::Node => None,
        }
    }
}
