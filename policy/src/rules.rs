//! Request settings, approval rules, reviewer sets, teams and on-call rotations.

use crate::labels::LabelSelector;
use chrono::{DateTime, Duration, Utc};
use std::collections::BTreeMap;
use std::fmt;

/// Global limits on access requests (`requests:` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSettings {
    pub min_duration: Duration,
    pub default_duration: Duration,
    pub max_duration: Duration,
    pub pending_ttl: Duration,
    pub escalate_after: Duration,
    pub require_reason: bool,
    pub require_ticket_url: bool,
    pub max_extensions: u32,
    pub allow_scheduled_start: bool,
    /// How many of one user's requests may await review (pending or
    /// needs-info) at once: a flood of requests would push real ones out of
    /// reviewers' view. Break-glass grants are not counted or limited.
    pub max_pending_per_user: u32,
}

impl Default for RequestSettings {
    fn default() -> Self {
        Self {
            min_duration: Duration::minutes(1),
            default_duration: Duration::hours(4),
            max_duration: Duration::hours(8),
            pending_ttl: Duration::hours(1),
            escalate_after: Duration::minutes(30),
            require_reason: true,
            require_ticket_url: false,
            max_extensions: 1,
            allow_scheduled_start: true,
            max_pending_per_user: 10,
        }
    }
}

/// Break-glass settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassSettings {
    pub enabled: bool,
    pub require_mfa: bool,
    pub max_duration: Duration,
    pub notify: Vec<ReviewerSet>,
}

impl Default for BreakGlassSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            require_mfa: true,
            max_duration: Duration::hours(1),
            notify: Vec::new(),
        }
    }
}

/// A set of people who may review: `role:R`, `team_lead`, `oncall:S`, `user:N`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReviewerSet {
    Role(String),
    TeamLead,
    Oncall(String),
    User(String),
}

impl ReviewerSet {
    /// Parses the config spelling.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "team_lead" {
            return Ok(Self::TeamLead);
        }
        let (kind, name) = s.split_once(':').ok_or_else(|| {
            format!("{s:?} is not a reviewer set (role:R, team_lead, oncall:S, user:N)")
        })?;
        if name.is_empty() {
            return Err(format!("{s:?} names nobody"));
        }
        match kind {
            "role" => Ok(Self::Role(name.into())),
            "oncall" => Ok(Self::Oncall(name.into())),
            "user" => Ok(Self::User(name.into())),
            _ => Err(format!(
                "{s:?}: unknown reviewer kind {kind:?} (role, team_lead, oncall, user)"
            )),
        }
    }
}

impl fmt::Display for ReviewerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Role(r) => write!(f, "role:{r}"),
            Self::TeamLead => f.write_str("team_lead"),
            Self::Oncall(s) => write!(f, "oncall:{s}"),
            Self::User(u) => write!(f, "user:{u}"),
        }
    }
}

/// What an approval rule requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Granted at once, no reviewer.
    SelfApprove,
    /// One approval from any listed set.
    AnyOf(Vec<ReviewerSet>),
    /// One approval from each listed set.
    AllOf(Vec<ReviewerSet>),
    /// `count` approvals from distinct members of the union of `from`.
    Count { count: u32, from: Vec<ReviewerSet> },
}

impl Requirement {
    pub fn reviewer_sets(&self) -> &[ReviewerSet] {
        match self {
            Self::SelfApprove => &[],
            Self::AnyOf(v) | Self::AllOf(v) | Self::Count { from: v, .. } => v,
        }
    }
}

/// An approval rule: for these roles (optionally only on resources matching
/// `environment`), this requirement; `secondary` are notified on escalation,
/// and may then review, one of them standing in for any one approver the
/// requirement names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRule {
    pub roles: Vec<String>,
    pub environment: Option<LabelSelector>,
    pub require: Requirement,
    pub secondary: Vec<ReviewerSet>,
}

impl ApprovalRule {
    /// The secondary reviewers, who stand in once the request `escalated`.
    pub fn secondary_if(&self, escalated: bool) -> &[ReviewerSet] {
        if escalated {
            &self.secondary
        } else {
            &[]
        }
    }
}

/// A team: its lead and members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub name: String,
    pub lead: String,
    pub members: Vec<String>,
}

/// An on-call rotation: `rotation[k]` is on call during shift k after `starts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OncallSchedule {
    pub name: String,
    pub rotation: Vec<String>,
    pub shift: Duration,
    pub starts: DateTime<Utc>,
}

impl OncallSchedule {
    /// Who is on call at `at` (nobody before the rotation starts).
    pub fn on_call(&self, at: DateTime<Utc>) -> Option<&str> {
        if at < self.starts || self.rotation.is_empty() || self.shift <= Duration::zero() {
            return None;
        }
        let shifts = (at - self.starts).num_seconds() / self.shift.num_seconds();
        let idx = (shifts as u64 % self.rotation.len() as u64) as usize;
        self.rotation.get(idx).map(String::as_str)
    }
}

/// Teams and on-call schedules, by name.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pub teams: BTreeMap<String, Team>,
    pub oncall: BTreeMap<String, OncallSchedule>,
}

impl Directory {
    /// The lead of `user`'s team: the team their user record names
    /// (`team`, set by an admin) when it is configured, else the one team
    /// listing them as a member; `None` without either, and when several
    /// teams list them (which lead would be arbitrary: no team lead
    /// approves for them until their record names a team).
    pub fn team_lead_of<'a>(&'a self, user: &str, team: Option<&str>) -> Option<&'a str> {
        if let Some(t) = team.and_then(|name| self.teams.get(name)) {
            return Some(t.lead.as_str());
        }
        let mut listing = self
            .teams
            .values()
            .filter(|t| t.members.iter().any(|m| m == user));
        match (listing.next(), listing.next()) {
            (Some(t), None) => Some(t.lead.as_str()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_team_lead_comes_from_the_user_records_team_first() {
        let team = |name: &str, lead: &str, members: &[&str]| Team {
            name: name.into(),
            lead: lead.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let mut d = Directory::default();
        d.teams
            .insert("payments".into(), team("payments", "bob", &["alice"]));
        d.teams.insert("search".into(), team("search", "sam", &[]));
        // The record moved alice to search: search's lead, not payments'.
        assert_eq!(d.team_lead_of("alice", Some("search")), Some("sam"));
        assert_eq!(d.team_lead_of("zed", Some("search")), Some("sam"));
        // No record team, or one no longer configured: membership.
        assert_eq!(d.team_lead_of("alice", None), Some("bob"));
        assert_eq!(d.team_lead_of("alice", Some("gone")), Some("bob"));
        assert_eq!(d.team_lead_of("zed", None), None);
        // Listed by two teams: no lead, unless the record names one.
        d.teams
            .insert("search".into(), team("search", "sam", &["alice"]));
        assert_eq!(d.team_lead_of("alice", None), None);
        assert_eq!(d.team_lead_of("alice", Some("gone")), None);
        assert_eq!(d.team_lead_of("alice", Some("payments")), Some("bob"));
    }

    #[test]
    fn reviewer_sets_parse_and_print() {
        for s in ["role:sre", "team_lead", "oncall:sre", "user:bob"] {
            assert_eq!(ReviewerSet::parse(s).unwrap().to_string(), s);
        }
        assert!(ReviewerSet::parse("group:x").is_err());
        assert!(ReviewerSet::parse("role:").is_err());
        assert!(ReviewerSet::parse("sre").is_err());
    }

    #[test]
    fn oncall_rotates_by_shift() {
        let s = OncallSchedule {
            name: "sre".into(),
            rotation: vec!["dave".into(), "erin".into()],
            shift: Duration::hours(168),
            starts: "2026-01-05T09:00:00Z".parse().unwrap(),
        };
        let at = |t: &str| s.on_call(t.parse().unwrap()).map(str::to_owned);
        assert_eq!(at("2026-01-04T09:00:00Z"), None);
        assert_eq!(at("2026-01-05T09:00:00Z").as_deref(), Some("dave"));
        assert_eq!(at("2026-01-12T08:59:59Z").as_deref(), Some("dave"));
        assert_eq!(at("2026-01-12T09:00:00Z").as_deref(), Some("erin"));
        assert_eq!(at("2026-01-19T09:00:00Z").as_deref(), Some("dave"));
    }
}
