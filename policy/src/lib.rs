//! Wicket's policy decision point.
//!
//! Roles and what they grant, the resources they match, request and approval
//! rules, and the access decisions the daemon asks for: which SSH principals a
//! certificate carries, which nodes, databases and clusters a user may reach.
//! Every authorization decision is one call into this crate and returns a
//! [`Decision`] with its reason, which the caller audits.
//!
//! It is pure: no sockets, no database, no clock. Time is always a parameter.
//! It does not parse configuration files (the daemon turns its versioned file
//! format into these validated types) and does not persist anything.

mod labels;
pub mod request;
#[cfg(test)]
mod request_tests;
mod roles;
mod rules;

pub use labels::{LabelSelector, Labels};
pub use request::{
    certificate_session_signal, AccessRequest, Actor, CertifiedSession, Effect, Engine, Event,
    NewRequest, Recipients, RequestError, Requester, Review, Risk, SessionSignal, State, Urgency,
    Verdict,
};
pub use roles::{
    DatabaseGrant, KubernetesGrant, Resource, ResourceKind, Role, RoleSet, SshForwarding,
    SshLoginGrant,
};
pub use rules::{
    ApprovalRule, BreakGlassSettings, Directory, OncallSchedule, RequestSettings, Requirement,
    ReviewerSet, Team,
};

use serde::Serialize;

/// Everything policy can refuse, with the reason a user or operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    #[error("invalid policy: {0}")]
    Invalid(String),
}

/// The answer to an authorization question, always with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

impl Decision {
    pub fn allow(reason: impl Into<String>) -> Self {
        Self {
            allowed: true,
            reason: reason.into(),
        }
    }

    pub fn deny(reason: impl Into<String>) -> Self {
        Self {
            allowed: false,
            reason: reason.into(),
        }
    }
}

/// Who is asking: a user and the roles in force for them right now:
/// `roles` hold everywhere their labels reach (standing roles, and the roles
/// of grants approved before Wicket recorded where they were judged);
/// `scoped` roles hold only on the resources listed with them (those their
/// request named, or reached when it was approved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject<'a> {
    pub user: &'a str,
    pub roles: &'a [String],
    pub scoped: &'a [ScopedRole],
}

impl<'a> Subject<'a> {
    /// A subject whose roles all hold everywhere.
    pub fn new(user: &'a str, roles: &'a [String]) -> Self {
        Self {
            user,
            roles,
            scoped: &[],
        }
    }

    /// The roles for messages: `a, b, c (only on db-1)`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.roles.to_vec();
        parts.extend(self.scoped.iter().map(ToString::to_string));
        parts.join(", ")
    }
}

/// Whether the password login behind a certificate (ending at
/// `login_until`, Unix seconds) lasts at `now`: what asks for more access
/// needs it, and standing roles count only while it lasts. A grant
/// certificate may outlive it; then only its grants count.
pub fn login_lasts(login_until: i64, now: i64) -> bool {
    now < login_until
}

/// When a session opened with a certificate ending at `cert_end` ends
/// (with `session.disconnect_on_expiry`): then, or, with no grant in force
/// behind it (standing roles only), at the login's end if that is earlier.
pub fn session_end(cert_end: i64, login_until: i64, under_grants: bool) -> i64 {
    if under_grants {
        cert_end
    } else {
        cert_end.min(login_until)
    }
}

/// Where the roles of one grant hold (see [`roles_of_grants`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantScope {
    /// Its granted roles.
    pub roles: Vec<String>,
    /// The resources its request named (none: see `judged_on`).
    pub resources: Vec<String>,
    /// For a request that named no resources: each granted role with the
    /// resources it reached when the grant was approved, whose approval
    /// rules it was judged by ([`AccessRequest::judged_on`]). `None` for a
    /// grant approved before Wicket recorded them: its roles hold
    /// everywhere their labels reach.
    pub judged_on: Option<Vec<ScopedRole>>,
}

/// The roles grants put in force on top of `standing`. A grant's roles
/// hold only on the resources its request named; for a request that named
/// none, only on those each role reached when it was approved (its rules
/// were chosen by them: a resource configured or reached later was never
/// judged for it). Grants approved before that was recorded hold their
/// roles everywhere their labels reach.
pub fn roles_of_grants<'g>(
    standing: Vec<String>,
    grants: impl IntoIterator<Item = &'g GrantScope>,
) -> (Vec<String>, Vec<ScopedRole>) {
    let (everywhere, confined): (Vec<_>, Vec<_>) = grants
        .into_iter()
        .partition(|g| g.resources.is_empty() && g.judged_on.is_none());
    let mut roles = standing;
    for r in everywhere.into_iter().flat_map(|g| &g.roles) {
        if !roles.contains(r) {
            roles.push(r.clone());
        }
    }
    let mut scoped = Vec::new();
    for g in confined {
        match &g.judged_on {
            Some(judged) if g.resources.is_empty() => {
                // A granted role with no record reached nothing.
                for r in &g.roles {
                    let on = judged
                        .iter()
                        .find(|j| &j.role == r)
                        .map_or(&[][..], |j| &j.resources[..]);
                    ScopedRole::add(&mut scoped, &roles, r, on);
                }
            }
            _ => {
                for r in &g.roles {
                    ScopedRole::add(&mut scoped, &roles, r, &g.resources);
                }
            }
        }
    }
    (roles, scoped)
}

/// A granted role that holds only on the resources its request named.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScopedRole {
    pub role: String,
    pub resources: Vec<String>,
}

impl std::fmt::Display for ScopedRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.resources.is_empty() {
            write!(f, "{} (on no resource)", self.role)
        } else {
            write!(f, "{} (only on {})", self.role, self.resources.join(", "))
        }
    }
}

impl ScopedRole {
    /// Adds `role` on `resources` to `scoped`, unless `unscoped` already
    /// holds it everywhere (merging the resources of the same role).
    pub fn add(
        scoped: &mut Vec<ScopedRole>,
        unscoped: &[String],
        role: &str,
        resources: &[String],
    ) {
        if unscoped.iter().any(|r| r == role) {
            return;
        }
        match scoped.iter_mut().find(|s| s.role == role) {
            Some(s) => {
                for r in resources {
                    if !s.resources.contains(r) {
                        s.resources.push(r.clone());
                    }
                }
            }
            None => scoped.push(ScopedRole {
                role: role.to_owned(),
                resources: resources.to_vec(),
            }),
        }
    }
}

/// The whole validated policy: roles, rules, directory, resources, limits.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub roles: RoleSet,
    pub approval: Vec<ApprovalRule>,
    pub directory: Directory,
    pub requests: RequestSettings,
    pub break_glass: BreakGlassSettings,
    pub resources: Vec<Resource>,
}

impl Policy {
    pub fn resource(&self, kind: ResourceKind, name: &str) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| r.kind == kind && r.name == name)
    }
}
