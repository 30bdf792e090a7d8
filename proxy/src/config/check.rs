//! From a YAML value to a validated [`Config`], collecting every problem.

use super::duration::{format_duration, parse_duration};
use super::file::{
    ApprovalFile, AuditFile, AuthFile, BreakGlassFile, CertificatesFile, DatabaseFile,
    DurationText, KubeClusterFile, LabelMap, LimitsFile, ListenFile, NodeFile, OncallFile,
    PostgresFile, RequestsFile, RequireFile, RoleFile, SessionFile, TeamFile, TOP_LEVEL_KEYS,
};
use super::{
    AuditOverflow, AuditSettings, AuthSettings, Config, Limits, Listen, PostgresSettings, Problem,
    ResourceTls, SessionSettings, Storage, DEFAULT_API_ADDR, DEFAULT_CLUSTER_NAME,
    DEFAULT_DATA_DIR, VERSION,
};
use chrono::{DateTime, Duration, Utc};
use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};
use serde_path_to_error::Segment;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use wicket_policy::{
    ApprovalRule, BreakGlassSettings, DatabaseGrant, Directory, KubernetesGrant, LabelSelector,
    Labels, OncallSchedule, Policy, RequestSettings, Requirement, Resource, ResourceKind,
    ReviewerSet, Role, RoleSet, SshLoginGrant, Team,
};

/// The longest duration any setting takes, in days.
const MOST_DAYS: i64 = 36_500;

/// The most `limits.ssh_channel_burst` and `ssh_channels_per_second` may
/// say: past it the rate holds back nothing.
const MAX_CHANNEL_RATE: u32 = 1_000_000;

const RESOURCE_KEYS: &[&str] = &["nodes", "databases", "kube_clusters"];

/// Resolves `path` against `base` and drops `.` components.
pub(super) fn resolve(base: &Path, path: &str) -> PathBuf {
    base.join(path)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Builds the config or returns every problem found.
pub(super) fn build(root: Value, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    let mut cx = Cx::default();
    let config = cx.config(root, base_dir);
    match config {
        Some(c) if cx.problems.is_empty() => Ok(c),
        _ => {
            if cx.problems.is_empty() {
                cx.push(".", "invalid configuration");
            }
            Err(cx.problems)
        }
    }
}

#[derive(Default)]
struct Cx {
    problems: Vec<Problem>,
    node_host_keys: BTreeMap<String, String>,
}

/// Names declared in the file, whether or not their entries are valid, so
/// that a broken role does not also make every reference to it an error.
#[derive(Default)]
struct Names {
    roles: BTreeSet<String>,
    oncall: BTreeSet<String>,
    /// `None` when the `teams` section itself is unreadable.
    teams: Option<usize>,
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() || base == "." {
        key.to_owned()
    } else {
        format!("{base}.{key}")
    }
}

fn at(base: &str, index: usize) -> String {
    format!("{base}[{index}]")
}

/// How many times [`Cx::de`] reads one section again after taking a wrong
/// field out.
const MAX_PASSES: usize = 64;

/// The text of a path inside a section, as [`Cx::de`] reports it.
fn segment_path(base: &str, segments: &[Segment]) -> String {
    let mut p = base.to_owned();
    for seg in segments {
        match seg {
            Segment::Seq { index } => p = at(&p, *index),
            Segment::Map { key } | Segment::Enum { variant: key } => p = join(&p, key),
            Segment::Unknown => {}
        }
    }
    p
}

/// Takes the mapping entry `segments` leads to out of `value`; returns the
/// path of the mapping it was in, or `None` when the path does not end at a
/// mapping key or leads nowhere.
fn take_field<'s>(value: &mut Value, segments: &'s [Segment]) -> Option<&'s [Segment]> {
    let (last, parents) = segments.split_last()?;
    let Segment::Map { key } = last else {
        return None;
    };
    let mut at = value;
    for seg in parents {
        at = match seg {
            Segment::Seq { index } => at.get_mut(*index)?,
            Segment::Map { key } => at.get_mut(key.as_str())?,
            Segment::Enum { .. } | Segment::Unknown => return None,
        };
    }
    match at {
        Value::Mapping(m) => m.shift_remove(key.as_str()).map(|_| parents),
        _ => None,
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "~".into(),
        _ => "?".into(),
    }
}

fn is_name(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// Role and user names: `[A-Za-z0-9._@-]+`.
fn is_principal_name(s: &str) -> bool {
    is_name(s, &['.', '_', '@', '-'])
}

/// Resource, team, schedule and cluster names: `[A-Za-z0-9._-]+`.
fn is_object_name(s: &str) -> bool {
    is_name(s, &['.', '_', '-'])
}

const PRINCIPAL_CHARS: &str = "letters, digits and . _ @ -";
const OBJECT_CHARS: &str = "letters, digits and . _ -";

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port to connect to".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
    }
}

/// `host:port` with a DNS name, IPv4 address or bracketed IPv6 address.
fn check_host_port(s: &str) -> Result<(), String> {
    let hint = "expected host:port, e.g. 10.0.0.5:22, db.internal:5432 or [::1]:22";
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?}: {hint}"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        parse_port(port)?;
        return Ok(());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: {hint}"))?;
    if host.contains(':') {
        return Err(format!(
            "{s:?}: put IPv6 addresses in brackets, e.g. [::1]:22"
        ));
    }
    if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
        return Err(format!(
            "{host:?} is not a host name or IP address ({hint})"
        ));
    }
    parse_port(port)?;
    Ok(())
}

/// An `https://host[:port][/path]` URL.
fn check_https_url(s: &str) -> Result<(), String> {
    let hint = "expected the API server's https:// URL, e.g. https://10.0.0.7:6443";
    let rest = s
        .strip_prefix("https://")
        .ok_or_else(|| format!("{s:?}: {hint}"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err("the URL must not carry credentials".into());
    }
    if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or_else(|| format!("{s:?}: unclosed [ in the host"))?;
        let ip = &authority[1..close];
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        return match &authority[close + 1..] {
            "" => Ok(()),
            p => match p.strip_prefix(':') {
                Some(port) => parse_port(port).map(|_| ()),
                None => Err(format!("{s:?}: {hint}")),
            },
        };
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) => {
            parse_port(port)?;
            host
        }
        None => authority,
    };
    if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
        return Err(format!(
            "{host:?} is not a host name or IP address ({hint})"
        ));
    }
    Ok(())
}

/// A listen address: `IP:port`, or `localhost:port` for 127.0.0.1.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(p) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p));
        }
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!(
            "{s:?} is not a socket address; expected IP:port such as 127.0.0.1:3080 or [::]:3080"
        )
    })
}

impl Cx {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let p = Problem {
            path: path.into(),
            message: message.into(),
        };
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    /// Deserializes `value`, reporting a failure at `path` + the path inside.
    ///
    /// serde stops at the first error, so a field that fails is taken out of
    /// `value` and the rest read again: a section with several wrong fields
    /// reports each (up to [`MAX_PASSES`]). Only a field named by a mapping
    /// key is taken out (taking a list item out would renumber the rest),
    /// and an error at or above a field taken out ("missing field", a check
    /// of what is left) is not reported: the reading stops there.
    /// Once anything failed the section counts as unreadable (`None`).
    fn de<T: DeserializeOwned>(&mut self, mut value: Value, path: &str) -> Option<T> {
        // The paths of the mappings fields were taken out of.
        let mut taken: Vec<String> = Vec::new();
        for _ in 0..MAX_PASSES {
            let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) if taken.is_empty() => return Some(v),
                Ok(_) => return None,
                Err(e) => e,
            };
            let segments: Vec<Segment> = e.path().iter().cloned().collect();
            let p = segment_path(path, &segments);
            let message = e.into_inner().to_string();
            // What a parent says once a field under it is gone ("missing
            // field", or its own check on what is left) is not the file's
            // problem.
            let after_taking = taken.iter().any(|parent| {
                *parent == p
                    || parent.starts_with(&format!("{p}."))
                    || parent.starts_with(&format!("{p}["))
            });
            if after_taking {
                return None;
            }
            self.push(p, message);
            // Nothing to take out: the reading stops at this problem.
            let parents = take_field(&mut value, &segments)?;
            taken.push(segment_path(path, parents));
        }
        None
    }

    /// A section: absent or empty gives the default; `None` if unreadable.
    fn section<T: DeserializeOwned + Default>(
        &mut self,
        v: Option<Value>,
        path: &str,
    ) -> Option<T> {
        match v {
            None | Some(Value::Null) => Some(T::default()),
            Some(v) => self.de(v, path),
        }
    }

    /// Splits a mapping by known keys, reporting unknown ones.
    fn split(
        &mut self,
        map: Mapping,
        path: &str,
        known: &'static [&'static str],
    ) -> BTreeMap<&'static str, Value> {
        let mut out = BTreeMap::new();
        for (k, v) in map {
            match k.as_str().and_then(|k| known.iter().find(|t| **t == k)) {
                Some(t) => {
                    out.insert(*t, v);
                }
                None => {
                    let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                    self.push(
                        join(path, &key_text(&k)),
                        format!("unknown field, expected one of {}", expected.join(", ")),
                    );
                }
            }
        }
        out
    }

    /// The names of a `name: settings` section (for references), without
    /// reporting anything.
    fn names_of(v: Option<&Value>) -> BTreeSet<String> {
        match v {
            Some(Value::Mapping(m)) => m
                .keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Entries of a `name: settings` section, each read on its own.
    fn entries<T: DeserializeOwned>(
        &mut self,
        v: Option<Value>,
        path: &str,
    ) -> Option<Vec<(String, T)>> {
        let map = match v {
            None | Some(Value::Null) => return Some(Vec::new()),
            Some(Value::Mapping(m)) => m,
            Some(other) => {
                self.push(
                    path,
                    format!(
                        "expected a mapping of name: settings, found {}",
                        describe(&other)
                    ),
                );
                return None;
            }
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let Some(name) = k.as_str().map(str::to_owned) else {
                self.push(
                    join(path, &key_text(&k)),
                    format!("names must be strings, found {}", describe(&k)),
                );
                continue;
            };
            let v = if v.is_null() {
                Value::Mapping(Mapping::new())
            } else {
                v
            };
            if let Some(t) = self.de(v, &join(path, &name)) {
                out.push((name, t));
            }
        }
        Some(out)
    }

    /// Items of a list section, each read on its own, with their indexes.
    fn items<T: DeserializeOwned>(&mut self, v: Option<Value>, path: &str) -> Vec<(usize, T)> {
        let seq = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Sequence(s)) => s,
            Some(other) => {
                self.push(path, format!("expected a list, found {}", describe(&other)));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, v) in seq.into_iter().enumerate() {
            if let Some(t) = self.de(v, &at(path, i)) {
                out.push((i, t));
            }
        }
        out
    }

    fn duration(
        &mut self,
        text: Option<&DurationText>,
        path: &str,
        default: Duration,
    ) -> Option<Duration> {
        match text {
            None => Some(default),
            Some(t) => match parse_duration(&t.0) {
                // Times are worked out from these (now + ttl, a window
                // times four): a century is past any use, and far from
                // where that arithmetic would overflow.
                Ok(d) if d > Duration::days(MOST_DAYS) => {
                    self.push(
                        path,
                        format!("{} is longer than the most, {MOST_DAYS}d", t.0),
                    );
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    self.push(path, e);
                    None
                }
            },
        }
    }

    fn positive_duration(
        &mut self,
        text: Option<&DurationText>,
        path: &str,
        default: Duration,
    ) -> Option<Duration> {
        let d = self.duration(text, path, default)?;
        if d <= Duration::zero() {
            self.push(path, "must be longer than 0s");
            return None;
        }
        Some(d)
    }

    /// [`Self::positive_duration`] of at most `most` (as written in the
    /// problem reported past it).
    fn duration_up_to(
        &mut self,
        text: Option<&DurationText>,
        path: &str,
        default: Duration,
        (most, most_text): (Duration, &str),
    ) -> Option<Duration> {
        let d = self.positive_duration(text, path, default)?;
        if d > most {
            self.push(path, format!("must be at most {most_text}"));
            return None;
        }
        Some(d)
    }

    /// `n` when it is in `range`; `None` (reported, with the range)
    /// otherwise.
    fn within<T: PartialOrd + std::fmt::Display>(
        &mut self,
        n: T,
        range: std::ops::RangeInclusive<T>,
        path: &str,
    ) -> Option<T> {
        if !range.contains(&n) {
            self.push(
                path,
                format!("{n} is outside {}..={}", range.start(), range.end()),
            );
            return None;
        }
        Some(n)
    }

    /// A count that must be at least 1; `None` (reported) when it is 0.
    fn count(&mut self, n: usize, path: &str) -> Option<usize> {
        if n == 0 {
            self.push(path, "must be at least 1");
            return None;
        }
        Some(n)
    }

    /// The value of the choice named `v`, `default` when absent; `None`
    /// (reported, with the choices) for another name.
    fn one_of<T: Copy>(
        &mut self,
        v: Option<&str>,
        path: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> Option<T> {
        let Some(v) = v else {
            return Some(default);
        };
        let found = choices.iter().find(|(name, _)| *name == v).map(|c| c.1);
        if found.is_none() {
            let names: Vec<&str> = choices.iter().map(|c| c.0).collect();
            self.push(path, format!("{v:?} is not one of: {}", names.join(", ")));
        }
        found
    }

    /// A role's label selector; an empty one would match nothing.
    fn selector(&mut self, m: &LabelMap, path: &str) -> LabelSelector {
        if m.0.is_empty() {
            self.push(
                path,
                "an empty selector matches nothing; use { \"*\": \"*\" } to match everything",
            );
        }
        for (k, v) in &m.0 {
            if k.is_empty() {
                self.push(path, "label names cannot be empty");
            } else if k == "*" && v != "*" {
                self.push(
                    join(path, k),
                    "the wildcard label \"*\" only takes the value \"*\"",
                );
            }
        }
        LabelSelector(m.0.clone())
    }

    /// A resource's labels.
    fn labels(&mut self, m: &LabelMap, path: &str) -> Labels {
        for k in m.0.keys() {
            if k.is_empty() {
                self.push(path, "label names cannot be empty");
            } else if k == "*" || k.contains('*') {
                self.push(
                    join(path, k),
                    "\"*\" is a wildcard for roles, not a label name",
                );
            }
        }
        m.0.clone()
    }

    fn principal(&mut self, name: &str, path: &str, what: &str) {
        if !is_principal_name(name) {
            self.push(
                path,
                format!("{name:?} is not a valid {what} name ({PRINCIPAL_CHARS})"),
            );
        }
    }

    fn role_ref(&mut self, name: &str, path: &str, names: &Names) {
        if name != "*" && !names.roles.contains(name) {
            self.push(path, format!("unknown role {name:?}"));
        }
    }

    fn reviewer(&mut self, text: &str, path: &str, names: &Names) -> Option<ReviewerSet> {
        let set = match ReviewerSet::parse(text) {
            Ok(s) => s,
            Err(e) => {
                self.push(path, e);
                return None;
            }
        };
        match &set {
            ReviewerSet::Role(r) => {
                if !names.roles.contains(r) {
                    self.push(path, format!("unknown role {r:?}"));
                    return None;
                }
            }
            ReviewerSet::Oncall(s) => {
                if !names.oncall.contains(s) {
                    self.push(path, format!("unknown on-call schedule {s:?}"));
                    return None;
                }
            }
            ReviewerSet::User(u) => {
                if !is_principal_name(u) {
                    self.push(
                        path,
                        format!("{u:?} is not a valid user name ({PRINCIPAL_CHARS})"),
                    );
                    return None;
                }
            }
            ReviewerSet::TeamLead => {
                if names.teams == Some(0) {
                    self.push(path, "no teams are defined, so nobody is a team lead");
                    return None;
                }
            }
        }
        Some(set)
    }

    fn reviewers(&mut self, list: &[String], path: &str, names: &Names) -> Vec<ReviewerSet> {
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| self.reviewer(s, &at(path, i), names))
            .collect()
    }

    fn config(&mut self, root: Value, base_dir: &Path) -> Option<Config> {
        let root = match root {
            Value::Null => Mapping::new(),
            Value::Mapping(m) => m,
            other => {
                self.push(
                    ".",
                    format!(
                        "expected a mapping of settings (version, listen, roles, ...), found {}",
                        describe(&other)
                    ),
                );
                return None;
            }
        };
        let mut s = self.split(root, ".", TOP_LEVEL_KEYS);
        let names = Names {
            roles: Self::names_of(s.get("roles")),
            oncall: Self::names_of(s.get("oncall")),
            teams: match s.get("teams") {
                None | Some(Value::Null) => Some(0),
                Some(Value::Mapping(m)) => Some(m.len()),
                Some(_) => None,
            },
        };

        match s.remove("version") {
            None => self.push(
                "version",
                format!("missing; this file format needs `version: {VERSION}`"),
            ),
            Some(v) if v.as_u64() == Some(VERSION) => {}
            Some(v) => self.push(
                "version",
                format!(
                    "unsupported version ({}); this wicketd reads version {VERSION}",
                    describe(&v)
                ),
            ),
        }

        let cluster_name = self
            .section::<Option<String>>(s.remove("cluster_name"), "cluster_name")
            .map(|n| n.unwrap_or_else(|| DEFAULT_CLUSTER_NAME.into()));
        if let Some(n) = &cluster_name {
            if !is_object_name(n) {
                self.push(
                    "cluster_name",
                    format!("{n:?} is not a valid cluster name ({OBJECT_CHARS})"),
                );
            }
        }

        let data_dir = self
            .section::<Option<String>>(s.remove("data_dir"), "data_dir")
            .and_then(|d| {
                let d = d.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
                if d.trim().is_empty() {
                    self.push("data_dir", "cannot be empty");
                    return None;
                }
                Some(resolve(base_dir, &d))
            });

        let storage = self
            .section::<Option<String>>(s.remove("storage"), "storage")
            .and_then(|st| self.storage(st));
        let listen = self
            .section::<ListenFile>(s.remove("listen"), "listen")
            .and_then(|l| self.listen(&l));
        let certificates = self
            .section::<CertificatesFile>(s.remove("certificates"), "certificates")
            .and_then(|c| self.certificates(&c));
        let session = self
            .section::<SessionFile>(s.remove("session"), "session")
            .and_then(|f| self.session(&f));
        let audit = self
            .section::<AuditFile>(s.remove("audit"), "audit")
            .and_then(|f| self.audit(&f));
        let postgres = self
            .section::<PostgresFile>(s.remove("postgres"), "postgres")
            .and_then(|f| self.postgres(&f));
        let requests = self
            .section::<RequestsFile>(s.remove("requests"), "requests")
            .and_then(|f| self.requests(&f));
        let break_glass = self
            .section::<BreakGlassFile>(s.remove("break_glass"), "break_glass")
            .and_then(|f| self.break_glass(&f, &names));
        let auth = self
            .section::<AuthFile>(s.remove("auth"), "auth")
            .and_then(|f| self.auth(&f));
        let limits = self
            .section::<LimitsFile>(s.remove("limits"), "limits")
            .and_then(|f| self.limits(&f));
        let teams = self
            .entries::<TeamFile>(s.remove("teams"), "teams")
            .map(|t| self.teams(t));
        let oncall = self
            .entries::<OncallFile>(s.remove("oncall"), "oncall")
            .map(|o| self.oncall(o));
        let roles = self
            .entries::<RoleFile>(s.remove("roles"), "roles")
            .map(|r| self.roles(r, requests.as_ref(), &names));
        let approval: Vec<(usize, ApprovalFile)> = self.items(s.remove("approval"), "approval");
        let approval = self.approval(approval, &names);
        let before = self.problems.len();
        let (resources, database_tls, kube_tls) = self.resources(s.remove("resources"), base_dir);
        if self.problems.len() == before {
            self.environments_reach_resources(&approval, &resources);
        }
        let approval = approval.into_iter().map(|(_, r)| r).collect();
        let roles = roles.map(RoleSet::new);
        if let (Some(roles), Some(req)) = (&roles, &requests) {
            // A standing-only role's maximum does not matter.
            for r in roles.iter() {
                match r.max_duration {
                    Some(max) if max < req.min_duration && roles.requestable(&r.name) => self.push(
                        join(&join("roles", &r.name), "max_duration"),
                        format!(
                            "{} is shorter than requests.min_duration {}: the role could never be requested",
                            format_duration(max),
                            format_duration(req.min_duration)
                        ),
                    ),
                    _ => {}
                }
            }
        }
        if let (Some(req), Some(bg)) = (&requests, &break_glass) {
            if bg.enabled && bg.max_duration < req.min_duration {
                self.push(
                    "break_glass.max_duration",
                    format!(
                        "{} is shorter than requests.min_duration {}: no break-glass request could be made",
                        format_duration(bg.max_duration),
                        format_duration(req.min_duration)
                    ),
                );
            }
        }

        if !self.problems.is_empty() {
            return None;
        }
        let (login_ttl, public_names) = certificates?;
        Some(Config {
            cluster_name: cluster_name?,
            data_dir: data_dir?,
            storage: storage?,
            listen: listen?,
            login_ttl,
            public_names,
            session: session?,
            audit: audit?,
            postgres: postgres?,
            auth: auth?,
            limits: limits?,
            policy: Policy {
                roles: roles?,
                approval,
                directory: Directory {
                    teams: teams?,
                    oncall: oncall?,
                },
                requests: requests?,
                break_glass: break_glass?,
                resources,
            },
            database_tls,
            kube_tls,
            node_host_keys: std::mem::take(&mut self.node_host_keys),
        })
    }

    fn storage(&mut self, st: Option<String>) -> Option<Storage> {
        let Some(st) = st else {
            return Some(Storage::Sqlite);
        };
        if st == "sqlite" {
            return Some(Storage::Sqlite);
        }
        let rest = st
            .strip_prefix("postgres://")
            .or_else(|| st.strip_prefix("postgresql://"));
        match rest {
            Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) => {
                if let Err(e) = url::Url::parse(&st) {
                    // Not shown: a password in it may not end where it seems.
                    self.push(
                        "storage",
                        format!(
                            "the URL does not parse ({e}): a password holding '/', '?', '#' or \
                             '@' must be percent-encoded (%2F, %3F, %23, %40)"
                        ),
                    );
                    return None;
                }
                // The driver logs the parameters it does not know, values
                // and all: a secret among them must not get that far.
                for name in super::secret_params(r) {
                    if name != "password" {
                        self.push(
                            "storage",
                            format!("{name}: the PostgreSQL driver does not read it (and would log its value); remove it"),
                        );
                        return None;
                    }
                }
                Some(Storage::Postgres(st))
            }
            Some(_) => {
                self.push("storage", "the postgres:// URL names no server");
                None
            }
            None => {
                self.push(
                    "storage",
                    "expected \"sqlite\" or a PostgreSQL URL such as postgres://wicket@127.0.0.1:5432/wicket",
                );
                None
            }
        }
    }

    fn listen(&mut self, l: &ListenFile) -> Option<Listen> {
        let mut ok = true;
        // (The API's default address, or one given to `start`, is checked
        // with the rest when wicketd starts, and by `check-config`:
        // `Listen::collision`.)
        let mut seen: Vec<(SocketAddr, &str)> = Vec::new();
        let mut one = |cx: &mut Self,
                       v: &Option<String>,
                       key: &'static str|
         -> Option<SocketAddr> {
            let s = v.as_ref()?;
            match parse_listen(s) {
                Ok(a) => {
                    if a.port() != 0 {
                        if let Some((_, other)) = seen.iter().find(|(b, _)| super::overlap(*b, a)) {
                            cx.push(
                                join("listen", key),
                                format!("{a} is already used by listen.{other}"),
                            );
                            ok = false;
                        }
                    }
                    seen.push((a, key));
                    Some(a)
                }
                Err(e) => {
                    cx.push(join("listen", key), e);
                    ok = false;
                    None
                }
            }
        };
        let api = match &l.api {
            None => Some(DEFAULT_API_ADDR),
            Some(_) => one(self, &l.api, "api"),
        };
        let ssh = one(self, &l.ssh, "ssh");
        let postgres = one(self, &l.postgres, "postgres");
        let kube = one(self, &l.kube, "kube");
        if !ok {
            return None;
        }
        Some(Listen {
            api: api?,
            ssh,
            postgres,
            kube,
        })
    }

    fn certificates(&mut self, c: &CertificatesFile) -> Option<(Duration, Vec<String>)> {
        let ttl = self
            .positive_duration(
                c.login_ttl.as_ref(),
                "certificates.login_ttl",
                Duration::hours(8),
            )
            .and_then(|ttl| {
                // Standing roles last as long as a login: not for months.
                if ttl > Duration::days(30) {
                    self.push(
                        "certificates.login_ttl",
                        format!("{} is longer than the most, 30d", format_duration(ttl)),
                    );
                    return None;
                }
                Some(ttl)
            });
        let names = c.public_names.clone().unwrap_or_default();
        let mut ok = true;
        for (i, n) in names.iter().enumerate() {
            let dns = n.strip_prefix("*.").unwrap_or(n);
            if n.parse::<IpAddr>().is_err() && !is_dns_name(dns) {
                self.push(
                    at("certificates.public_names", i),
                    format!("{n:?} is not a DNS name or IP address"),
                );
                ok = false;
            }
        }
        ok.then_some((ttl?, names))
    }

    fn session(&mut self, f: &SessionFile) -> Option<SessionSettings> {
        let d = SessionSettings::default();
        let warning = self.duration(
            f.expiry_warning.as_ref(),
            "session.expiry_warning",
            d.expiry_warning,
        );
        let grace = self.duration(
            f.unverified_grace.as_ref(),
            "session.unverified_grace",
            d.unverified_grace,
        );
        let max_recording_bytes = match f.max_recording_bytes {
            None => Some(d.max_recording_bytes),
            Some(n) if n >= 1 << 16 => Some(n),
            Some(n) => {
                self.push(
                    "session.max_recording_bytes",
                    format!("{n} is below the least, 65536"),
                );
                None
            }
        };
        let end_on_recording_failure = self.one_of(
            f.on_recording_failure.as_deref(),
            "session.on_recording_failure",
            &[("end", true), ("continue", false)],
            d.end_on_recording_failure,
        );
        let retention = match &f.recording_retention {
            None => Some(None),
            Some(t) => self
                .duration(Some(t), "session.recording_retention", Duration::zero())
                .and_then(|r| {
                    if r < Duration::hours(1) {
                        self.push(
                            "session.recording_retention",
                            format!("{} is shorter than the least, 1h", t.0),
                        );
                        return None;
                    }
                    Some(Some(r))
                }),
        };
        Some(SessionSettings {
            recording_retention: retention?,
            disconnect_on_expiry: f.disconnect_on_expiry.unwrap_or(d.disconnect_on_expiry),
            expiry_warning: warning?,
            record_input: f.record_input.unwrap_or(d.record_input),
            max_recording_bytes: max_recording_bytes?,
            end_on_recording_failure: end_on_recording_failure?,
            unverified_grace: grace?,
        })
    }

    fn audit(&mut self, f: &AuditFile) -> Option<AuditSettings> {
        let d = AuditSettings::default();
        let queue_size = match f.queue_size {
            Some(n) => self.count(n as usize, "audit.queue_size"),
            None => Some(d.queue_size),
        };
        let on_overflow = self.one_of(
            f.on_overflow.as_deref(),
            "audit.on_overflow",
            &[
                ("block", AuditOverflow::Block),
                ("drop-and-count", AuditOverflow::DropAndCount),
            ],
            d.on_overflow,
        );
        Some(AuditSettings {
            queue_size: queue_size?,
            on_overflow: on_overflow?,
            db_parameter_values: f.db_parameter_values.unwrap_or(d.db_parameter_values),
        })
    }

    fn postgres(&mut self, f: &PostgresFile) -> Option<PostgresSettings> {
        let d = PostgresSettings::default();
        let max_message_bytes = match f.max_message_bytes {
            None => Some(d.max_message_bytes),
            Some(n) => self
                .within(n, 1024..=(1 << 30), "postgres.max_message_bytes")
                .map(|n| n as usize),
        };
        let login_timeout = self.duration_up_to(
            f.login_timeout.as_ref(),
            "postgres.login_timeout",
            d.login_timeout,
            (Duration::minutes(10), "10m"),
        );
        Some(PostgresSettings {
            max_message_bytes: max_message_bytes?,
            login_timeout: login_timeout?,
        })
    }

    fn limits(&mut self, f: &LimitsFile) -> Option<Limits> {
        let d = Limits::default();
        let grace = self.duration_up_to(
            f.login_grace.as_ref(),
            "limits.login_grace",
            d.login_grace,
            (Duration::minutes(10), "10m"),
        );
        let send = self.duration_up_to(
            f.send_timeout.as_ref(),
            "limits.send_timeout",
            d.send_timeout,
            (Duration::hours(1), "1h"),
        );
        let mut ok = true;
        let given = f.max_connections.map_or(d.max_connections, |n| n as usize);
        let open = self.count(given, "limits.max_connections");
        let unauthenticated = self.count(
            f.max_unauthenticated
                .map_or(d.max_unauthenticated.min(given), |n| n as usize),
            "limits.max_unauthenticated",
        );
        let per_source = self.count(
            f.max_unauthenticated_per_source.map_or(
                d.max_unauthenticated_per_source
                    .min(unauthenticated.unwrap_or(usize::MAX)),
                |n| n as usize,
            ),
            "limits.max_unauthenticated_per_source",
        );
        let per_user = self.count(
            f.max_connections_per_user
                .map_or(d.max_connections_per_user.min(given), |n| n as usize),
            "limits.max_connections_per_user",
        );
        // Each share within the one it is part of.
        for (part, part_path, whole, whole_path) in [
            (
                unauthenticated,
                "limits.max_unauthenticated",
                open,
                "limits.max_connections",
            ),
            (
                per_source,
                "limits.max_unauthenticated_per_source",
                unauthenticated,
                "limits.max_unauthenticated",
            ),
        ] {
            if let (Some(p), Some(w)) = (part, whole) {
                if p > w {
                    self.push(part_path, format!("{p} is more than {whole_path} ({w})"));
                    ok = false;
                }
            }
        }
        let burst = self.within(
            f.ssh_channel_burst.unwrap_or(d.ssh_channel_burst),
            1..=MAX_CHANNEL_RATE,
            "limits.ssh_channel_burst",
        );
        let per_sec = self.within(
            f.ssh_channels_per_second
                .unwrap_or(d.ssh_channels_per_second),
            1..=MAX_CHANNEL_RATE,
            "limits.ssh_channels_per_second",
        );
        ok.then_some(Limits {
            max_connections: open?,
            max_unauthenticated: unauthenticated?,
            max_unauthenticated_per_source: per_source?,
            max_connections_per_user: per_user?,
            login_grace: grace?,
            send_timeout: send?,
            ssh_channel_burst: burst?,
            ssh_channels_per_second: per_sec?,
        })
    }

    fn auth(&mut self, f: &AuthFile) -> Option<AuthSettings> {
        let d = AuthSettings::default();
        let window = self.positive_duration(
            f.failure_window.as_ref(),
            "auth.failure_window",
            d.failure_window,
        );
        let user = f.max_failures_per_user.unwrap_or(d.max_failures_per_user);
        let source = f
            .max_failures_per_source
            .unwrap_or(d.max_failures_per_source);
        let user = self.count(user as usize, "auth.max_failures_per_user");
        let source = self.count(source as usize, "auth.max_failures_per_source");
        let (user, source) = (user? as u32, source? as u32);
        Some(AuthSettings {
            max_failures_per_user: user,
            max_failures_per_source: source,
            failure_window: window?,
        })
    }

    fn requests(&mut self, f: &RequestsFile) -> Option<RequestSettings> {
        let d = RequestSettings::default();
        let min = self.positive_duration(
            f.min_duration.as_ref(),
            "requests.min_duration",
            d.min_duration,
        );
        let default = self.positive_duration(
            f.default_duration.as_ref(),
            "requests.default_duration",
            d.default_duration,
        );
        let max = self.positive_duration(
            f.max_duration.as_ref(),
            "requests.max_duration",
            d.max_duration,
        );
        let pending = self.positive_duration(
            f.pending_ttl.as_ref(),
            "requests.pending_ttl",
            d.pending_ttl,
        );
        let escalate = self.positive_duration(
            f.escalate_after.as_ref(),
            "requests.escalate_after",
            d.escalate_after,
        );
        let most_pending = f
            .max_pending_per_user
            .map(|n| self.count(n as usize, "requests.max_pending_per_user"));
        let (min, default, max, pending, escalate) = (min?, default?, max?, pending?, escalate?);
        let mut ok = most_pending != Some(None);
        if min > default {
            self.push(
                "requests.default_duration",
                format!(
                    "{} is shorter than min_duration {}",
                    format_duration(default),
                    format_duration(min)
                ),
            );
            ok = false;
        }
        if default > max {
            self.push(
                "requests.default_duration",
                format!(
                    "{} is longer than max_duration {}",
                    format_duration(default),
                    format_duration(max)
                ),
            );
            ok = false;
        }
        if min > max {
            self.push(
                "requests.min_duration",
                format!(
                    "{} is longer than max_duration {}",
                    format_duration(min),
                    format_duration(max)
                ),
            );
            ok = false;
        }
        if escalate > pending {
            self.push(
                "requests.escalate_after",
                format!(
                    "{} is longer than pending_ttl {}: requests would expire before escalating",
                    format_duration(escalate),
                    format_duration(pending)
                ),
            );
            ok = false;
        }
        ok.then_some(RequestSettings {
            min_duration: min,
            default_duration: default,
            max_duration: max,
            pending_ttl: pending,
            escalate_after: escalate,
            require_reason: f.require_reason.unwrap_or(d.require_reason),
            require_ticket_url: f.require_ticket_url.unwrap_or(d.require_ticket_url),
            max_extensions: f.max_extensions.unwrap_or(d.max_extensions),
            allow_scheduled_start: f.allow_scheduled_start.unwrap_or(d.allow_scheduled_start),
            max_pending_per_user: f.max_pending_per_user.unwrap_or(d.max_pending_per_user),
        })
    }

    fn break_glass(&mut self, f: &BreakGlassFile, names: &Names) -> Option<BreakGlassSettings> {
        let d = BreakGlassSettings::default();
        let max = self.positive_duration(
            f.max_duration.as_ref(),
            "break_glass.max_duration",
            d.max_duration,
        );
        let before = self.problems.len();
        let notify = self.reviewers(&f.notify, "break_glass.notify", names);
        let enabled = f.enabled.unwrap_or(d.enabled);
        if enabled && f.notify.is_empty() {
            self.push(
                "break_glass.notify",
                "break-glass is enabled but notifies nobody",
            );
        }
        if self.problems.len() != before {
            return None;
        }
        Some(BreakGlassSettings {
            enabled,
            require_mfa: f.require_mfa.unwrap_or(d.require_mfa),
            max_duration: max?,
            notify,
        })
    }

    fn teams(&mut self, teams: Vec<(String, TeamFile)>) -> BTreeMap<String, Team> {
        let mut out = BTreeMap::new();
        for (name, t) in teams {
            let p = join("teams", &name);
            if !is_object_name(&name) {
                self.push(
                    &p,
                    format!("{name:?} is not a valid team name ({OBJECT_CHARS})"),
                );
            }
            if t.lead.trim().is_empty() {
                self.push(join(&p, "lead"), "a team needs a lead");
            } else {
                self.principal(&t.lead, &join(&p, "lead"), "user");
            }
            for (i, m) in t.members.iter().enumerate() {
                self.principal(m, &at(&join(&p, "members"), i), "user");
            }
            out.insert(
                name.clone(),
                Team {
                    name,
                    lead: t.lead,
                    members: t.members,
                },
            );
        }
        out
    }

    fn oncall(&mut self, schedules: Vec<(String, OncallFile)>) -> BTreeMap<String, OncallSchedule> {
        let mut out = BTreeMap::new();
        for (name, o) in schedules {
            let p = join("oncall", &name);
            if !is_object_name(&name) {
                self.push(
                    &p,
                    format!("{name:?} is not a valid schedule name ({OBJECT_CHARS})"),
                );
            }
            if o.rotation.is_empty() {
                self.push(
                    join(&p, "rotation"),
                    "is empty; list the users who take turns",
                );
            }
            for (i, u) in o.rotation.iter().enumerate() {
                self.principal(u, &at(&join(&p, "rotation"), i), "user");
            }
            let shift =
                self.positive_duration(Some(&o.shift), &join(&p, "shift"), Duration::zero());
            let starts = match DateTime::parse_from_rfc3339(o.starts.trim()) {
                Ok(t) => Some(t.with_timezone(&Utc)),
                Err(e) => {
                    self.push(
                        join(&p, "starts"),
                        format!(
                            "{:?} is not an RFC 3339 time such as 2026-01-05T09:00:00Z: {e}",
                            o.starts
                        ),
                    );
                    None
                }
            };
            if let (Some(shift), Some(starts)) = (shift, starts) {
                out.insert(
                    name.clone(),
                    OncallSchedule {
                        name,
                        rotation: o.rotation,
                        shift,
                        starts,
                    },
                );
            }
        }
        out
    }

    fn roles(
        &mut self,
        roles: Vec<(String, RoleFile)>,
        requests: Option<&RequestSettings>,
        names: &Names,
    ) -> Vec<Role> {
        let mut out = Vec::new();
        for (name, r) in roles {
            let p = join("roles", &name);
            if !is_principal_name(&name) {
                self.push(
                    &p,
                    format!("{name:?} is not a valid role name ({PRINCIPAL_CHARS})"),
                );
            }
            for (i, l) in r.logins.iter().enumerate() {
                if l.is_empty()
                    || l.chars()
                        .any(|c| c.is_whitespace() || c.is_control() || c == ',')
                {
                    self.push(
                        at(&join(&p, "logins"), i),
                        format!("{l:?} is not a login (no spaces, commas or empty names)"),
                    );
                }
            }
            let nodes = match &r.nodes {
                Some(n) => self.selector(n, &join(&p, "nodes")),
                None => {
                    if !r.logins.is_empty() {
                        self.push(
                            join(&p, "nodes"),
                            "missing: the role lists logins but no nodes to use them on (e.g. nodes: { env: dev })",
                        );
                    }
                    LabelSelector::default()
                }
            };
            let databases = r.databases.as_ref().map(|d| {
                let dp = join(&p, "databases");
                let labels = self.selector(&d.labels, &join(&dp, "labels"));
                self.non_empty_items(&d.names, &join(&dp, "names"));
                self.non_empty_items(&d.users, &join(&dp, "users"));
                DatabaseGrant {
                    labels,
                    names: d.names.clone(),
                    users: d.users.clone(),
                }
            });
            let kubernetes = r.kubernetes.as_ref().map(|k| {
                let kp = join(&p, "kubernetes");
                let labels = self.selector(&k.labels, &join(&kp, "labels"));
                self.non_empty_items(&k.groups, &join(&kp, "groups"));
                self.non_empty_items(&k.users, &join(&kp, "users"));
                KubernetesGrant {
                    labels,
                    groups: k.groups.clone(),
                    users: k.users.clone(),
                }
            });
            let max_path = join(&p, "max_duration");
            let max_duration = match &r.max_duration {
                None => None,
                Some(t) => self.positive_duration(Some(t), &max_path, Duration::zero()),
            };
            if let (Some(max), Some(req)) = (max_duration, requests) {
                if max > req.max_duration {
                    self.push(
                        &max_path,
                        format!(
                            "{} is longer than requests.max_duration {}",
                            format_duration(max),
                            format_duration(req.max_duration)
                        ),
                    );
                }
            }
            let request_roles = r
                .request
                .as_ref()
                .map(|x| x.roles.clone())
                .unwrap_or_default();
            for (i, n) in request_roles.iter().enumerate() {
                self.role_ref(n, &at(&join(&p, "request.roles"), i), names);
            }
            let review_roles = r
                .review
                .as_ref()
                .map(|x| x.roles.clone())
                .unwrap_or_default();
            for (i, n) in review_roles.iter().enumerate() {
                self.role_ref(n, &at(&join(&p, "review.roles"), i), names);
            }
            out.push(Role {
                name,
                ssh: SshLoginGrant {
                    logins: r.logins,
                    nodes,
                },
                databases,
                kubernetes,
                port_forwarding: r.port_forwarding.unwrap_or(true),
                agent_forwarding: r.agent_forwarding,
                x11_forwarding: r.x11_forwarding,
                max_duration,
                request_roles,
                review_roles,
                revoke: r.revoke,
                audit: r.audit,
            });
        }
        out
    }

    /// Names a client is told and prints (database users and names,
    /// Kubernetes users and groups): none empty, none with a control
    /// character (which could drive the user's terminal) or one of
    /// Unicode's bidirectional controls.
    fn non_empty_items(&mut self, list: &[String], path: &str) {
        for (i, s) in list.iter().enumerate() {
            if s.trim().is_empty() {
                self.push(at(path, i), "cannot be empty");
            } else if s
                .chars()
                .any(|c| c.is_control() || wicket_api::is_bidi_control(c))
            {
                self.push(at(path, i), format!("{s:?} holds a control character"));
            }
        }
    }

    fn approval(
        &mut self,
        rules: Vec<(usize, ApprovalFile)>,
        names: &Names,
    ) -> Vec<(usize, ApprovalRule)> {
        let mut out: Vec<(usize, ApprovalRule)> = Vec::new();
        for (i, a) in rules {
            let p = at("approval", i);
            let roles_path = join(&p, "roles");
            if a.roles.is_empty() {
                self.push(&roles_path, "lists no roles");
            }
            for (j, r) in a.roles.iter().enumerate() {
                self.role_ref(r, &at(&roles_path, j), names);
            }
            let environment = a
                .environment
                .as_ref()
                .map(|e| self.selector(e, &join(&p, "environment")));
            let rp = join(&p, "require");
            let require = match a.require {
                RequireFile::SelfApprove => {
                    if !a.secondary.is_empty() {
                        self.push(
                            join(&p, "secondary"),
                            "a self-approved rule never escalates, so secondary reviewers would never be notified",
                        );
                    }
                    Requirement::SelfApprove
                }
                RequireFile::AnyOf(sets) => {
                    Requirement::AnyOf(self.reviewer_list(&sets, &join(&rp, "any_of"), names))
                }
                RequireFile::AllOf(sets) => {
                    Requirement::AllOf(self.reviewer_list(&sets, &join(&rp, "all_of"), names))
                }
                RequireFile::Count { count, from } => {
                    let from_sets = self.reviewer_list(&from, &join(&rp, "from"), names);
                    if count == 0 {
                        self.push(join(&rp, "count"), "must be at least 1");
                    } else if from_sets.len() == from.len() {
                        // Without a role among them, the sets name a fixed number of people.
                        if !from_sets.iter().any(|s| matches!(s, ReviewerSet::Role(_))) {
                            let users: BTreeSet<&ReviewerSet> = from_sets
                                .iter()
                                .filter(|s| matches!(s, ReviewerSet::User(_)))
                                .collect();
                            let others = from_sets
                                .iter()
                                .filter(|s| !matches!(s, ReviewerSet::User(_)))
                                .collect::<BTreeSet<_>>()
                                .len();
                            let most = users.len() + others;
                            if count as usize > most {
                                self.push(
                                    join(&rp, "count"),
                                    format!("{count} approvals can never be met: `from` names at most {most} reviewers"),
                                );
                            }
                        }
                    }
                    Requirement::Count {
                        count,
                        from: from_sets,
                    }
                }
            };
            let secondary = self.reviewers(&a.secondary, &join(&p, "secondary"), names);
            for (j, r) in a.roles.iter().enumerate() {
                if let Some((k, _)) = out
                    .iter()
                    .find(|(_, prev)| prev.environment == environment && prev.roles.contains(r))
                {
                    self.push(
                        at(&roles_path, j),
                        format!("role {r:?} already has an approval rule for this environment at approval[{k}]"),
                    );
                }
            }
            out.push((
                i,
                ApprovalRule {
                    roles: a.roles,
                    environment,
                    require,
                    secondary,
                },
            ));
        }
        out
    }

    /// Each approval rule's `environment` must match a configured resource
    /// (when any are): one that matches none, by a typo in a label, never
    /// applies, and requests for its roles fall back to the rules without
    /// an environment, perhaps a weaker one.
    fn environments_reach_resources(
        &mut self,
        approval: &[(usize, ApprovalRule)],
        resources: &[Resource],
    ) {
        if resources.is_empty() {
            return;
        }
        for (i, rule) in approval {
            let Some(env) = &rule.environment else {
                continue;
            };
            if !resources.iter().any(|r| env.matches(&r.labels)) {
                let labels: BTreeSet<String> = resources
                    .iter()
                    .flat_map(|r| r.labels.iter().map(|(k, v)| format!("{k}: {v}")))
                    .collect();
                self.push(
                    join(&at("approval", *i), "environment"),
                    format!(
                        "matches no resource (their labels: {}): requests for these roles would \
                         fall back to the rules without an environment",
                        if labels.is_empty() {
                            "none".to_owned()
                        } else {
                            labels.into_iter().collect::<Vec<_>>().join(", ")
                        }
                    ),
                );
            }
        }
    }

    fn reviewer_list(&mut self, sets: &[String], path: &str, names: &Names) -> Vec<ReviewerSet> {
        if sets.is_empty() {
            self.push(path, "lists no reviewer sets");
        }
        self.reviewers(sets, path, names)
    }

    #[allow(clippy::type_complexity)]
    fn resources(
        &mut self,
        v: Option<Value>,
        base_dir: &Path,
    ) -> (
        Vec<Resource>,
        BTreeMap<String, ResourceTls>,
        BTreeMap<String, ResourceTls>,
    ) {
        let mut resources = Vec::new();
        let mut database_tls = BTreeMap::new();
        let mut kube_tls = BTreeMap::new();
        let mut s = match v {
            None | Some(Value::Null) => return (resources, database_tls, kube_tls),
            Some(Value::Mapping(m)) => self.split(m, "resources", RESOURCE_KEYS),
            Some(other) => {
                self.push(
                    "resources",
                    format!(
                        "expected a mapping with nodes, databases and kube_clusters, found {}",
                        describe(&other)
                    ),
                );
                return (resources, database_tls, kube_tls);
            }
        };

        let nodes: Vec<(usize, NodeFile)> = self.items(s.remove("nodes"), "resources.nodes");
        let mut seen = BTreeMap::new();
        for (i, n) in nodes {
            let p = at("resources.nodes", i);
            self.resource_name(&n.name, &p, &mut seen);
            if let Err(e) = check_host_port(&n.address) {
                self.push(join(&p, "address"), e);
            }
            let labels = self.labels(&n.labels, &join(&p, "labels"));
            if let Some(k) = &n.host_key {
                match wicket_ca::SshPublicKey::parse_openssh(k) {
                    Ok(key) => {
                        self.node_host_keys.insert(n.name.clone(), key.to_openssh());
                    }
                    Err(e) => self.push(
                        join(&p, "host_key"),
                        format!("not an OpenSSH public key (ssh-ed25519 AAAA...): {e}"),
                    ),
                }
            }
            resources.push(Resource {
                kind: ResourceKind::Node,
                name: n.name,
                address: n.address,
                labels,
            });
        }

        let dbs: Vec<(usize, DatabaseFile)> =
            self.items(s.remove("databases"), "resources.databases");
        for (i, d) in dbs {
            let p = at("resources.databases", i);
            self.resource_name(&d.name, &p, &mut seen);
            if let Err(e) = check_host_port(&d.address) {
                self.push(join(&p, "address"), e);
            }
            let labels = self.labels(&d.labels, &join(&p, "labels"));
            if let Some(tls) =
                self.tls(d.ca_file.as_deref(), d.server_name.as_deref(), &p, base_dir)
            {
                database_tls.insert(d.name.clone(), tls);
            }
            resources.push(Resource {
                kind: ResourceKind::Database,
                name: d.name,
                address: d.address,
                labels,
            });
        }

        let kubes: Vec<(usize, KubeClusterFile)> =
            self.items(s.remove("kube_clusters"), "resources.kube_clusters");
        for (i, k) in kubes {
            let p = at("resources.kube_clusters", i);
            self.resource_name(&k.name, &p, &mut seen);
            if let Err(e) = check_https_url(&k.address) {
                self.push(join(&p, "address"), e);
            }
            let labels = self.labels(&k.labels, &join(&p, "labels"));
            if let Some(tls) =
                self.tls(k.ca_file.as_deref(), k.server_name.as_deref(), &p, base_dir)
            {
                kube_tls.insert(k.name.clone(), tls);
            }
            resources.push(Resource {
                kind: ResourceKind::KubeCluster,
                name: k.name,
                address: k.address,
                labels,
            });
        }
        (resources, database_tls, kube_tls)
    }

    /// Resource names are one namespace across nodes, databases and
    /// Kubernetes clusters: requests and grants name resources by name alone.
    fn resource_name(&mut self, name: &str, p: &str, seen: &mut BTreeMap<String, String>) {
        let np = join(p, "name");
        if !is_object_name(name) {
            self.push(
                &np,
                format!("{name:?} is not a valid resource name ({OBJECT_CHARS})"),
            );
        }
        if let Some(first) = seen.get(name) {
            self.push(
                np,
                format!(
                    "duplicate name {name:?}, also used by {first} (nodes, databases and \
                     kube_clusters share one namespace: requests name resources by name)"
                ),
            );
        } else {
            seen.insert(name.to_owned(), p.to_owned());
        }
    }

    fn tls(
        &mut self,
        ca_file: Option<&str>,
        server_name: Option<&str>,
        p: &str,
        base_dir: &Path,
    ) -> Option<ResourceTls> {
        if ca_file.is_none() && server_name.is_none() {
            return None;
        }
        if let Some(f) = ca_file {
            if f.trim().is_empty() {
                self.push(join(p, "ca_file"), "cannot be empty");
            }
        }
        if let Some(n) = server_name {
            if n.parse::<IpAddr>().is_err() && !is_dns_name(n) {
                self.push(
                    join(p, "server_name"),
                    format!("{n:?} is not a DNS name or IP address"),
                );
            }
        }
        Some(ResourceTls {
            ca_file: ca_file.map(|f| resolve(base_dir, f)),
            server_name: server_name.map(str::to_owned),
        })
    }
}
