//! The access-request lifecycle as a state machine.
//!
//! [`Engine::create`] validates a new request; [`Engine::apply`] takes the
//! current request, an [`Event`] and the current time, and returns the new
//! request plus the [`Effect`]s the daemon must persist and deliver (audit
//! events, notifications, sessions to end). Nothing here performs I/O or reads
//! the clock; illegal transitions are errors with a reason.
//!
//! ```text
//! pending ──approve(rule met)──▶ active ──expires_at──▶ expired
//!    │  │                 └─(start in future)─▶ approved ──starts_at──▶ active
//!    │  ├─deny──▶ denied        active/approved ──revoke──▶ revoked
//!    │  ├─ask──▶ needs-info ──update──▶ pending     active ──drop──▶ expired
//!    │  ├─cancel──▶ cancelled
//!    └──pending_ttl──▶ expired
//! ```

use crate::labels::Labels;
use crate::rules::{ApprovalRule, Requirement, ReviewerSet};
use crate::{Decision, GrantScope, Policy, ResourceKind, ScopedRole, Subject};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Pending,
    NeedsInfo,
    /// Approved, with a scheduled start in the future.
    Approved,
    Active,
    Denied,
    Expired,
    Cancelled,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::NeedsInfo => "needs-info",
            State::Approved => "approved",
            State::Active => "active",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
            State::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            State::Pending,
            State::NeedsInfo,
            State::Approved,
            State::Active,
            State::Denied,
            State::Expired,
            State::Cancelled,
            State::Revoked,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Denied | State::Expired | State::Cancelled | State::Revoked
        )
    }

    /// Awaiting a review.
    pub fn is_open(self) -> bool {
        matches!(self, State::Pending | State::NeedsInfo)
    }
}

/// How urgent the requester says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Urgency {
    Low,
    #[default]
    Normal,
    High,
}

/// What a reviewer decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Approve,
    Deny,
    AskInfo,
    /// After-the-fact review of a break-glass grant.
    Acknowledge,
}

/// One review on the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub reviewer: String,
    pub verdict: Verdict,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// The reviewer sets the reviewer belonged to at review time (`role:sre`,
    /// `oncall:sre`, `team_lead`, `user:bob`), which is what counts.
    pub matched: Vec<String>,
    /// Approve with a smaller scope.
    pub roles: Option<Vec<String>>,
    pub duration_secs: Option<i64>,
    pub start_at: Option<DateTime<Utc>>,
}

/// An access request and, once approved, its grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: String,
    pub requester: String,
    /// The requester's standing roles when the request was made.
    pub requester_roles: Vec<String>,
    pub requester_team_lead: Option<String>,
    pub roles: Vec<String>,
    pub resources: Vec<String>,
    pub reason: String,
    pub ticket_url: Option<String>,
    pub urgency: Urgency,
    pub requested_duration_secs: i64,
    pub requested_start: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub state: State,
    pub reviews: Vec<Review>,
    pub escalated: bool,
    pub break_glass: bool,
    /// The grant (set on approval).
    pub granted_roles: Vec<String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub approved_at: Option<DateTime<Utc>>,
    pub extensions: u32,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<String>,
    pub revoked_by: Option<String>,
    pub revoke_reason: Option<String>,
    /// For a request that named no resources, set when it is approved:
    /// each granted role with the resources it reached then, whose
    /// approval rules it was judged by, and the only ones it holds on.
    /// `None` before approval, for a request that named resources, and for
    /// a grant approved before Wicket recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_on: Option<Vec<ScopedRole>>,
}

impl AccessRequest {
    /// Where its granted roles hold (see [`crate::roles_of_grants`]).
    pub fn scope(&self) -> GrantScope {
        GrantScope {
            roles: self.granted_roles.clone(),
            resources: self.resources.clone(),
            judged_on: self.judged_on.clone(),
        }
    }

    /// Whether it waits on a review: open (pending or needs-info), or a
    /// break-glass grant, in any state, that nobody has acknowledged yet
    /// (it is listed for after-the-fact review until then). What
    /// [`Engine::is_reviewable_by`] lists is among these.
    pub fn awaits_review(&self) -> bool {
        if self.break_glass {
            !self
                .reviews
                .iter()
                .any(|r| r.verdict == Verdict::Acknowledge)
        } else {
            self.state.is_open()
        }
    }

    /// Whether this state of the request may replace `known`, another
    /// state of it, as its newest (for a proxy that learns states from
    /// reads and from its own transitions, in either order). Nothing comes
    /// after an end: an ended request is replaced only by an end changed no
    /// earlier (a late revoke of an expired grant). Times are compared only
    /// between ends, so proxies whose clocks disagree cannot undo an end.
    pub fn supersedes(&self, known: &AccessRequest) -> bool {
        !known.state.is_terminal()
            || (self.state.is_terminal() && self.updated_at >= known.updated_at)
    }

    /// Whether the grant counts for access at `now`: active and inside its window.
    pub fn grants_at(&self, now: DateTime<Utc>) -> bool {
        self.state == State::Active
            && self.starts_at.is_some_and(|s| s <= now)
            && self.expires_at.is_some_and(|e| now < e)
    }

    /// Why a live session under this grant must end at `now`, if it must.
    /// With `disconnect_on_expiry: false`, sessions outlive an expiry or a
    /// drop by the holder (which expires the grant), never a revoke: not
    /// even one made after the end, to stop what is still draining.
    pub fn session_end(&self, now: DateTime<Utc>, disconnect_on_expiry: bool) -> Option<String> {
        if self.grants_at(now) {
            return None;
        }
        let id = &self.id;
        let (why, always) = match self.state {
            // Revoked after it expired: its draining sessions end too.
            State::Expired if self.revoked_by.is_some() => (self.revoked_words(), true),
            // Past its end, or dropped by its holder (which expires it).
            State::Active | State::Expired => (
                format!(
                    "access request {id} expired{}",
                    self.end_reason
                        .as_deref()
                        .filter(|_| self.state == State::Expired)
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                false,
            ),
            State::Revoked => (self.revoked_words(), true),
            s => (
                format!("access request {id} is {} and grants nothing", s.as_str()),
                true,
            ),
        };
        (always || disconnect_on_expiry).then_some(why)
    }

    fn revoked_words(&self) -> String {
        let by = self.revoked_by.as_deref().unwrap_or("an administrator");
        let why = self
            .revoke_reason
            .as_deref()
            .or(self.end_reason.as_deref())
            .unwrap_or("no reason given");
        format!("access request {} was revoked by {by}: {why}", self.id)
    }

    /// The line to warn live sessions with when the grant ends within
    /// `warn_before` of `now` (and sessions are cut at its end).
    pub fn session_warning(
        &self,
        now: DateTime<Utc>,
        warn_before: Duration,
        disconnect_on_expiry: bool,
    ) -> Option<String> {
        let end = self.expires_at?;
        if !disconnect_on_expiry
            || warn_before <= Duration::zero()
            || !self.grants_at(now)
            || end - now > warn_before
        {
            return None;
        }
        let secs = (end - now).num_seconds().max(0);
        Some(format!(
            "access request {} ends at {} (in {}m{:02}s); this session will be closed then",
            self.id,
            end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            secs / 60,
            secs % 60
        ))
    }

    pub fn approvers(&self) -> Vec<String> {
        self.reviews
            .iter()
            .filter(|r| r.verdict == Verdict::Approve)
            .map(|r| r.reviewer.clone())
            .collect()
    }
}

/// The requester as the daemon knows them.
#[derive(Debug, Clone)]
pub struct Requester<'a> {
    pub name: &'a str,
    pub roles: &'a [String],
    /// The team the user record names, if any (see
    /// [`crate::Directory::team_lead_of`]).
    pub team: Option<&'a str>,
    /// How many of their requests await review now (pending or
    /// needs-info), as the store counted them just before.
    pub awaiting_review: usize,
}

/// What a user asks for.
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    pub id: String,
    pub roles: Vec<String>,
    pub resources: Vec<String>,
    pub reason: String,
    pub ticket_url: Option<String>,
    pub urgency: Urgency,
    pub duration: Option<Duration>,
    pub start_at: Option<DateTime<Utc>>,
    /// Break-glass: active at once, no approval; the caller has checked a
    /// fresh second factor and says so here.
    pub break_glass: bool,
    pub mfa_verified: bool,
}

/// The actor of an event: a user and their standing roles.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub roles: Vec<String>,
}

/// Longest reason a request, review, update or revoke may give (bytes).
pub const MAX_REASON_LEN: usize = 2000;

/// Why `text`, written by one person for others to read (a reason, a
/// ticket URL), is refused: control characters other than newline and tab
/// (they start terminal escape sequences, which could redraw a reviewer's
/// screen) and the Unicode bidirectional controls (which reorder what a
/// line shows).
pub fn unprintable(what: &str, text: &str) -> Option<String> {
    let bad = text.chars().find(|&c| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })?;
    Some(format!(
        "the {what} contains the control character U+{:04X}; only printable text, newlines and tabs are allowed",
        u32::from(bad)
    ))
}
/// The most resources one request may name. Each is looked at for every
/// reviewer each time the request is shown, so they are bounded (and named
/// once each).
pub const MAX_RESOURCES: usize = 64;

/// Longest a request's reason may grow with its updates (bytes): the
/// request is read and written whole at each step.
pub const MAX_REQUEST_REASON_LEN: usize = 8 * MAX_REASON_LEN;

/// Something that happens to a request.
#[derive(Debug, Clone)]
pub enum Event {
    Review {
        by: Actor,
        verdict: Verdict,
        reason: String,
        roles: Option<Vec<String>>,
        duration: Option<Duration>,
        start_at: Option<DateTime<Utc>>,
    },
    /// The requester answers a needs-info question.
    Update {
        by: String,
        reason: String,
    },
    Cancel {
        by: String,
    },
    /// A timer fired: expiry, escalation, scheduled start.
    Tick,
    /// The holder ends the grant early.
    Drop {
        by: String,
    },
    Revoke {
        by: Actor,
        reason: String,
    },
    Extend {
        by: String,
        duration: Duration,
    },
}

/// Who to notify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "to", content = "who")]
pub enum Recipients {
    User(String),
    Sets(Vec<String>),
}

/// What the daemon must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "effect")]
pub enum Effect {
    /// Record an audit event of `kind` by `actor` with a human `detail`.
    Audit {
        kind: String,
        actor: String,
        detail: String,
    },
    Notify {
        recipients: Recipients,
        subject: String,
        urgent: bool,
    },
    /// The grant is over: certificates carrying it stop counting, and live
    /// sessions using it end (unless configured to finish). `by` ended it:
    /// the revoker, the holder who dropped it, or (at expiry) the holder, as
    /// `grant_expired` names them.
    EndSessions { reason: String, by: String },
}

/// Why a request or event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    /// Over a limit that ends by itself (reviews, cancels): try later.
    #[error("{0}")]
    Limited(String),
    #[error("request is {state}: {what}")]
    IllegalTransition { state: &'static str, what: String },
}

/// Risk assessment: what the requested roles grant beyond the standing ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Risk {
    pub new_roles: Vec<String>,
    pub ssh: Vec<String>,
    pub databases: Vec<String>,
    pub kubernetes: Vec<String>,
    pub permissions: Vec<String>,
    pub max_duration_secs: i64,
}

fn illegal(state: State, what: impl Into<String>) -> RequestError {
    RequestError::IllegalTransition {
        state: state.as_str(),
        what: what.into(),
    }
}

fn audit(kind: &str, actor: &str, detail: impl Into<String>) -> Effect {
    Effect::Audit {
        kind: kind.into(),
        actor: actor.into(),
        detail: detail.into(),
    }
}

/// What a request for one role must meet ([`Engine::rules_for`]).
#[derive(Debug)]
struct Applicable<'a> {
    /// Every rule of every resource named (or reached), once each.
    rules: Vec<&'a ApprovalRule>,
    /// Some resource has no rule: it needs one approval from a holder of a
    /// role whose `review` covers the role, as a role without rules does.
    fallback: bool,
}

/// The policy engine for access requests.
#[derive(Debug, Clone, Copy)]
pub struct Engine<'a> {
    pub policy: &'a Policy,
}

/// `t` plus `d`, or the last time there is when that is past the
/// calendar (a configured "unlimited" duration): never a panic.
fn later(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl<'a> Engine<'a> {
    pub fn new(policy: &'a Policy) -> Self {
        Self { policy }
    }

    /// The longest grant allowed for `roles`: the global maximum capped by
    /// every role's own maximum.
    pub fn max_duration(&self, roles: &[String]) -> Duration {
        roles
            .iter()
            .filter_map(|r| self.policy.roles.get(r).and_then(|r| r.max_duration))
            .fold(self.policy.requests.max_duration, |acc, d| acc.min(d))
    }

    /// The resources configured now that `role` reaches by its labels.
    fn reached(&self, role: &str) -> Vec<String> {
        let roles = [role.to_owned()];
        self.policy
            .roles
            .reachable(&Subject::new("", &roles), &self.policy.resources)
            .into_iter()
            .map(|(r, _, _)| r.name.clone())
            .collect()
    }

    /// The resources `role` of `req` is judged on: those the request names;
    /// for one that names none, those recorded when it was approved, else
    /// those the role reaches now (it would be granted on them).
    fn judged_on(&self, req: &AccessRequest, role: &str) -> Vec<String> {
        self.judged_on_of(role, &req.resources, req.judged_on.as_deref())
    }

    fn judged_on_of(
        &self,
        role: &str,
        resources: &[String],
        judged: Option<&[ScopedRole]>,
    ) -> Vec<String> {
        if !resources.is_empty() {
            return resources.to_vec();
        }
        match judged {
            Some(j) => j
                .iter()
                .find(|s| s.role == role)
                .map(|s| s.resources.clone())
                .unwrap_or_default(),
            None => self.reached(role),
        }
    }

    /// The approval rules that apply to `role` judged on `resources`
    /// ([`Engine::judged_on`]), resource by resource: a resource's rules are
    /// those whose environment matches its labels, or the rules without an
    /// environment when none does; the request needs every rule of every
    /// resource. A request that names no resources is granted everywhere the
    /// role reaches, so it is judged on all of those (a role that reaches
    /// production needs production's rule unless the request is scoped away
    /// from it, and a rule for development cannot waive the general rule
    /// for the rest), and once approved holds only there. A role that
    /// reaches nothing, or a name no longer configured, gets the rules
    /// without an environment. A resource to which no rule applies does not
    /// drop out: it needs what a role without rules needs
    /// ([`Applicable::fallback`]), whatever the rules of the others waive.
    fn rules_for(&self, role: &str, resources: &[String]) -> Applicable<'a> {
        let for_role: Vec<&'a ApprovalRule> = self
            .policy
            .approval
            .iter()
            .filter(|r| r.roles.iter().any(|x| x == role || x == "*"))
            .collect();
        // One resource's rules (`None`: a name no longer configured).
        let rules_of = |labels: Option<&Labels>| -> Vec<&'a ApprovalRule> {
            let env: Vec<&'a ApprovalRule> = for_role
                .iter()
                .copied()
                .filter(|r| {
                    r.environment
                        .as_ref()
                        .zip(labels)
                        .is_some_and(|(sel, labels)| sel.matches(labels))
                })
                .collect();
            if !env.is_empty() {
                return env;
            }
            for_role
                .iter()
                .copied()
                .filter(|r| r.environment.is_none())
                .collect()
        };
        let mut rules: Vec<&'a ApprovalRule> = Vec::new();
        let mut fallback = false;
        let mut add = |found: Vec<&'a ApprovalRule>| {
            fallback |= found.is_empty();
            for rule in found {
                if !rules.iter().any(|r| std::ptr::eq(*r, rule)) {
                    rules.push(rule);
                }
            }
        };
        if resources.is_empty() {
            add(rules_of(None));
        }
        for name in resources {
            let mut configured = self
                .policy
                .resources
                .iter()
                .filter(|res| &res.name == name)
                .peekable();
            if configured.peek().is_none() {
                add(rules_of(None));
            }
            for res in configured {
                add(rules_of(Some(&res.labels)));
            }
        }
        Applicable { rules, fallback }
    }

    /// The reviewer sets `actor` belongs to at `now`, for `req`.
    fn membership(
        &self,
        req: &AccessRequest,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Vec<ReviewerSet> {
        let mut sets = Vec::new();
        for r in &actor.roles {
            sets.push(ReviewerSet::Role(r.clone()));
        }
        sets.push(ReviewerSet::User(actor.name.clone()));
        if req.requester_team_lead.as_deref() == Some(actor.name.as_str()) {
            sets.push(ReviewerSet::TeamLead);
        }
        for (name, sched) in &self.policy.directory.oncall {
            if sched.on_call(now) == Some(actor.name.as_str()) {
                sets.push(ReviewerSet::Oncall(name.clone()));
            }
        }
        sets
    }

    /// May `actor` review `req` now? One policy decision with its reason.
    pub fn decide_review(
        &self,
        req: &AccessRequest,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Decision {
        if actor.name == req.requester {
            return Decision::deny("requesters cannot review their own requests");
        }
        let member = self.membership(req, actor, now);
        for role in &req.roles {
            let applicable = self.rules_for(role, &self.judged_on(req, role));
            // Secondary reviewers are asked once the request escalated.
            let named: Vec<&ReviewerSet> = applicable
                .rules
                .iter()
                .flat_map(|r| {
                    r.require
                        .reviewer_sets()
                        .iter()
                        .chain(r.secondary_if(req.escalated))
                })
                .collect();
            if let Some(set) = named.iter().find(|s| member.contains(s)) {
                return Decision::allow(format!("{} is {set} for role {role}", actor.name));
            }
            if (named.is_empty() || applicable.fallback)
                && self.policy.roles.may_review(&actor.roles, role)
            {
                return Decision::allow(format!(
                    "{}'s roles may review requests for {role}",
                    actor.name
                ));
            }
        }
        Decision::deny(format!(
            "{} is not an eligible reviewer for roles [{}]",
            actor.name,
            req.roles.join(", ")
        ))
    }

    /// May `actor` see `req` at all? Its requester and reviewers, whoever
    /// may review it now, auditors and revokers. One decision with its
    /// reason; a refusal is what the daemon audits.
    pub fn decide_request_read(
        &self,
        req: &AccessRequest,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Decision {
        let who = &actor.name;
        if req.requester == *who {
            return Decision::allow(format!("{who} made the request"));
        }
        if req.reviews.iter().any(|r| r.reviewer == *who) {
            return Decision::allow(format!("{who} reviewed the request"));
        }
        if self.policy.roles.may_audit(&actor.roles) {
            return Decision::allow(format!("{who}'s roles may read the audit log"));
        }
        if self.policy.roles.may_revoke(&actor.roles) {
            return Decision::allow(format!("{who}'s roles may revoke grants"));
        }
        let review = self.decide_review(req, actor, now);
        if review.allowed {
            return Decision::allow(review.reason);
        }
        Decision::deny(format!(
            "{who} is not the requester, a reviewer, an auditor or a revoker of access request {}",
            req.id
        ))
    }

    /// May `actor` see `req` in `--reviewable`?
    pub fn is_reviewable_by(&self, req: &AccessRequest, actor: &Actor, now: DateTime<Utc>) -> bool {
        if !req.awaits_review() {
            return false;
        }
        if req.break_glass {
            return actor.name != req.requester
                && (self.decide_review(req, actor, now).allowed
                    || self.policy.roles.may_revoke(&actor.roles));
        }
        !req.reviews
            .iter()
            .any(|r| r.reviewer == actor.name && r.verdict != Verdict::AskInfo)
            && self.decide_review(req, actor, now).allowed
    }

    /// Whether the approvals so far meet every granted role's rule; if not,
    /// what is still missing (human-readable, one entry per role).
    pub fn requirement_status(
        &self,
        req: &AccessRequest,
        roles: &[String],
    ) -> Result<(), Vec<String>> {
        let approvals: Vec<(&str, Vec<ReviewerSet>)> = req
            .reviews
            .iter()
            .filter(|r| r.verdict == Verdict::Approve && r.reviewer != req.requester)
            .map(|r| {
                (
                    r.reviewer.as_str(),
                    r.matched
                        .iter()
                        .filter_map(|m| ReviewerSet::parse(m).ok())
                        .collect(),
                )
            })
            .collect();
        let mut missing = Vec::new();
        for role in roles {
            let Applicable { rules, fallback } = self.rules_for(role, &self.judged_on(req, role));
            if fallback {
                // Some resource has no rule: one approval from a holder of
                // a role whose `review` covers it.
                let ok = approvals.iter().any(|(_, sets)| {
                    sets.iter().any(|s| match s {
                        ReviewerSet::Role(r) => {
                            self.policy.roles.may_review(std::slice::from_ref(r), role)
                        }
                        _ => false,
                    })
                });
                if !ok {
                    missing.push(format!("{role}: one approval from a reviewer of {role}"));
                }
            }
            for rule in rules {
                if let Some(m) = unmet(&rule.require, rule.secondary_if(req.escalated), &approvals)
                {
                    missing.push(format!("{role}: {m}"));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }

    fn is_self_approved(&self, roles: &[String], resources: &[String]) -> bool {
        roles.iter().all(|role| {
            let Applicable { rules, fallback } =
                self.rules_for(role, &self.judged_on_of(role, resources, None));
            !fallback && rules.iter().all(|r| r.require == Requirement::SelfApprove)
        })
    }

    /// Validates and creates a request (or a break-glass grant).
    pub fn create(
        &self,
        new: NewRequest,
        requester: &Requester<'_>,
        now: DateTime<Utc>,
    ) -> Result<(AccessRequest, Vec<Effect>), RequestError> {
        let settings = &self.policy.requests;
        let invalid = |m: String| Err(RequestError::Invalid(m));
        if new.roles.is_empty() {
            return invalid("name at least one role (--roles)".into());
        }
        let mut seen = BTreeSet::new();
        for role in &new.roles {
            if !seen.insert(role) {
                return invalid(format!("role {role} is listed twice"));
            }
            if !self.policy.roles.contains(role) {
                return invalid(format!("unknown role {role:?}"));
            }
            if requester.roles.contains(role) {
                return invalid(format!("you already hold role {role}"));
            }
            if !self.policy.roles.may_request(requester.roles, role) {
                return Err(RequestError::Forbidden(format!(
                    "your roles [{}] may not request role {role}",
                    requester.roles.join(", ")
                )));
            }
        }
        let most = settings.max_pending_per_user;
        if !new.break_glass && requester.awaiting_review >= most as usize {
            return Err(RequestError::Limited(format!(
                "you have {} awaiting review, the most allowed (requests.max_pending_per_user: {most}); cancel one (`wicket request cancel ID`) or wait for a review",
                match requester.awaiting_review {
                    1 => "1 request".to_owned(),
                    n => format!("{n} requests"),
                }
            )));
        }
        if new.resources.len() > MAX_RESOURCES {
            return invalid(format!(
                "name at most {MAX_RESOURCES} resources (a role without resources reaches all it may)"
            ));
        }
        let mut seen = BTreeSet::new();
        for name in &new.resources {
            if !seen.insert(name) {
                return invalid(format!("resource {name} is listed twice"));
            }
            if !self.policy.resources.iter().any(|r| &r.name == name) {
                return invalid(format!("unknown resource {name:?}"));
            }
        }
        let reason = new.reason.trim().to_owned();
        if settings.require_reason && reason.is_empty() {
            return invalid("a reason is required (--reason)".into());
        }
        if reason.len() > MAX_REASON_LEN {
            return invalid(format!(
                "the reason is longer than {MAX_REASON_LEN} characters"
            ));
        }
        if let Some(why) = unprintable("reason", &reason) {
            return invalid(why);
        }
        match &new.ticket_url {
            Some(u)
                if !(u.starts_with("https://") || u.starts_with("http://"))
                    || u.len() > 2000
                    || u.chars().any(char::is_whitespace)
                    || unprintable("ticket URL", u).is_some() =>
            {
                return invalid(format!(
                    "ticket URL {u:?} must be an http(s) URL, without spaces or control characters"
                ));
            }
            None if settings.require_ticket_url => {
                return invalid("a ticket URL is required (--ticket)".into());
            }
            _ => {}
        }
        let max = if new.break_glass {
            self.max_duration(&new.roles)
                .min(self.policy.break_glass.max_duration)
        } else {
            self.max_duration(&new.roles)
        };
        let duration = new
            .duration
            .unwrap_or_else(|| settings.default_duration.min(max));
        if duration < settings.min_duration {
            return invalid(format!(
                "duration must be at least {}s",
                settings.min_duration.num_seconds()
            ));
        }
        if duration > max {
            return invalid(format!(
                "duration {}s is longer than the {}s allowed for [{}]",
                duration.num_seconds(),
                max.num_seconds(),
                new.roles.join(", ")
            ));
        }
        if let Some(s) = new.start_at {
            if !settings.allow_scheduled_start || new.break_glass {
                return invalid("a scheduled start is not allowed here".into());
            }
            if s <= now {
                return invalid("--start-at must be in the future".into());
            }
            if s > now + Duration::days(30) {
                return invalid("--start-at must be within 30 days".into());
            }
        }
        let mut req = AccessRequest {
            id: new.id,
            requester: requester.name.to_owned(),
            requester_roles: requester.roles.to_vec(),
            requester_team_lead: self
                .policy
                .directory
                .team_lead_of(requester.name, requester.team)
                .map(str::to_owned),
            roles: new.roles,
            resources: new.resources,
            reason,
            ticket_url: new.ticket_url,
            urgency: new.urgency,
            requested_duration_secs: duration.num_seconds(),
            requested_start: new.start_at,
            created_at: now,
            updated_at: now,
            state: State::Pending,
            reviews: Vec::new(),
            escalated: false,
            break_glass: new.break_glass,
            granted_roles: Vec::new(),
            starts_at: None,
            expires_at: None,
            approved_at: None,
            extensions: 0,
            ended_at: None,
            end_reason: None,
            revoked_by: None,
            revoke_reason: None,
            judged_on: None,
        };
        let mut effects = vec![audit(
            "request_created",
            requester.name,
            format!(
                "roles [{}] for {}s: {}",
                req.roles.join(", "),
                duration.num_seconds(),
                req.reason
            ),
        )];
        if new.break_glass {
            let bg = &self.policy.break_glass;
            if !bg.enabled {
                return Err(RequestError::Forbidden("break-glass is disabled".into()));
            }
            if bg.require_mfa && !new.mfa_verified {
                return Err(RequestError::Forbidden(
                    "break-glass needs a fresh second factor (--otp)".into(),
                ));
            }
            req.granted_roles = req.roles.clone();
            self.activate(&mut req, now, &mut effects);
            effects.push(audit(
                "break_glass_used",
                requester.name,
                format!(
                    "emergency grant of [{}]: {}",
                    req.roles.join(", "),
                    req.reason
                ),
            ));
            effects.push(Effect::Notify {
                recipients: Recipients::Sets(bg.notify.iter().map(ToString::to_string).collect()),
                subject: format!(
                    "BREAK-GLASS: {} took [{}] without approval: {}",
                    req.requester,
                    req.roles.join(", "),
                    req.reason
                ),
                urgent: true,
            });
            return Ok((req, effects));
        }
        if self.is_self_approved(&req.roles, &req.resources) {
            req.granted_roles = req.roles.clone();
            effects.push(audit(
                "request_approved",
                requester.name,
                "self-approved by rule",
            ));
            self.activate(&mut req, now, &mut effects);
            return Ok((req, effects));
        }
        effects.push(Effect::Notify {
            recipients: Recipients::Sets(self.reviewer_sets(&req).into_iter().collect()),
            subject: format!(
                "{} requests [{}] for {}: {}",
                req.requester,
                req.roles.join(", "),
                human(duration),
                req.reason
            ),
            urgent: req.urgency == Urgency::High,
        });
        Ok((req, effects))
    }

    /// Every reviewer set named by the rules for `req` (or the roles whose
    /// holders may review it when no rule names any).
    pub fn reviewer_sets(&self, req: &AccessRequest) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for role in &req.roles {
            let Applicable { rules, fallback } = self.rules_for(role, &self.judged_on(req, role));
            for r in &rules {
                out.extend(r.require.reviewer_sets().iter().map(ToString::to_string));
            }
            if fallback {
                out.extend(
                    self.policy
                        .roles
                        .names()
                        .filter(|n| self.policy.roles.may_review(&[n.to_string()], role))
                        .map(|n| format!("role:{n}")),
                );
            }
        }
        out
    }

    fn secondary_sets(&self, req: &AccessRequest) -> BTreeSet<String> {
        req.roles
            .iter()
            .flat_map(|role| self.rules_for(role, &self.judged_on(req, role)).rules)
            .flat_map(|r| r.secondary.iter().map(ToString::to_string))
            .collect()
    }

    /// Sets the grant window and moves to approved or active.
    fn activate(&self, req: &mut AccessRequest, now: DateTime<Utc>, effects: &mut Vec<Effect>) {
        let mut duration = Duration::seconds(req.requested_duration_secs);
        let mut start = req.requested_start.unwrap_or(now);
        for r in req.reviews.iter().filter(|r| r.verdict == Verdict::Approve) {
            if let Some(d) = r.duration_secs {
                duration = duration.min(Duration::seconds(d));
            }
            if let Some(s) = r.start_at {
                start = start.max(s);
            }
        }
        duration = duration.min(self.max_duration(&req.granted_roles));
        let start = start.max(now);
        // Whole seconds: certificates carry seconds.
        let start = DateTime::<Utc>::from_timestamp(start.timestamp(), 0).unwrap_or(start);
        let end = later(start, duration);
        if req.resources.is_empty() {
            req.judged_on = Some(
                req.granted_roles
                    .iter()
                    .map(|role| ScopedRole {
                        role: role.clone(),
                        resources: self.reached(role),
                    })
                    .collect(),
            );
        }
        req.starts_at = Some(start);
        req.expires_at = Some(end);
        req.approved_at = Some(now);
        req.updated_at = now;
        if start > now {
            req.state = State::Approved;
            effects.push(audit(
                "grant_scheduled",
                &req.requester,
                format!(
                    "[{}] from {} to {}",
                    req.granted_roles.join(", "),
                    start.to_rfc3339(),
                    end.to_rfc3339()
                ),
            ));
        } else {
            req.state = State::Active;
            effects.push(audit(
                "grant_activated",
                &req.requester,
                format!(
                    "[{}] until {}",
                    req.granted_roles.join(", "),
                    end.to_rfc3339()
                ),
            ));
        }
        effects.push(Effect::Notify {
            recipients: Recipients::User(req.requester.clone()),
            subject: format!(
                "request {} approved: [{}] from {} to {}",
                req.id,
                req.granted_roles.join(", "),
                start.to_rfc3339(),
                end.to_rfc3339()
            ),
            urgent: false,
        });
    }

    /// Ends `req`'s grant at the end of its window (on the holder's record,
    /// as `grant_expired` is).
    fn expire(&self, req: &mut AccessRequest, now: DateTime<Utc>, effects: &mut Vec<Effect>) {
        let holder = req.requester.clone();
        self.end(
            req,
            State::Expired,
            "grant window ended",
            &holder,
            now,
            effects,
        );
        effects.push(audit("grant_expired", &holder, ""));
    }

    /// Ends `req`'s grant in `state`, ended `by` (see [`Effect::EndSessions`]).
    fn end(
        &self,
        req: &mut AccessRequest,
        state: State,
        reason: &str,
        by: &str,
        now: DateTime<Utc>,
        effects: &mut Vec<Effect>,
    ) {
        req.state = state;
        req.ended_at = Some(now);
        req.end_reason = Some(reason.to_owned());
        req.updated_at = now;
        effects.push(Effect::EndSessions {
            reason: format!("access request {} {}: {reason}", req.id, state.as_str()),
            by: by.to_owned(),
        });
    }

    /// Applies `event` at `now`.
    pub fn apply(
        &self,
        current: &AccessRequest,
        event: Event,
        now: DateTime<Utc>,
    ) -> Result<(AccessRequest, Vec<Effect>), RequestError> {
        let mut req = current.clone();
        let mut effects = Vec::new();
        // Timers first: an event never acts on a request whose deadline has
        // passed but whose tick has not been delivered yet.
        if !matches!(event, Event::Tick) {
            self.tick(&mut req, now, &mut effects);
        }
        let state = req.state;
        if let Event::Review { reason, .. }
        | Event::Update { reason, .. }
        | Event::Revoke { reason, .. } = &event
        {
            if reason.len() > MAX_REASON_LEN {
                return Err(RequestError::Invalid(format!(
                    "the reason is longer than {MAX_REASON_LEN} characters"
                )));
            }
            if let Some(why) = unprintable("reason", reason) {
                return Err(RequestError::Invalid(why));
            }
        }
        match event {
            Event::Tick => self.tick(&mut req, now, &mut effects),
            Event::Review {
                by,
                verdict,
                reason,
                roles,
                duration,
                start_at,
            } => {
                if verdict == Verdict::Acknowledge {
                    if !req.break_glass {
                        return Err(RequestError::Invalid(
                            "only break-glass grants are acknowledged".into(),
                        ));
                    }
                    if by.name == req.requester {
                        return Err(RequestError::Forbidden(
                            "you cannot acknowledge your own break-glass grant".into(),
                        ));
                    }
                    let d = self.decide_review(&req, &by, now);
                    if !d.allowed && !self.policy.roles.may_revoke(&by.roles) {
                        return Err(RequestError::Forbidden(d.reason));
                    }
                    if req
                        .reviews
                        .iter()
                        .any(|r| r.verdict == Verdict::Acknowledge)
                    {
                        return Err(RequestError::Invalid("already acknowledged".into()));
                    }
                    req.reviews.push(Review {
                        reviewer: by.name.clone(),
                        verdict,
                        reason: reason.clone(),
                        at: now,
                        matched: Vec::new(),
                        roles: None,
                        duration_secs: None,
                        start_at: None,
                    });
                    req.updated_at = now;
                    effects.push(audit("break_glass_acknowledged", &by.name, reason));
                    return Ok((req, effects));
                }
                if !state.is_open() {
                    return Err(illegal(state, "only pending requests can be reviewed"));
                }
                if verdict == Verdict::Approve && state == State::NeedsInfo {
                    return Err(illegal(state, "waiting for the requester to answer; approve after `wicket request update`"));
                }
                // One question at a time: the requester's answers are
                // bounded (`MAX_REQUEST_REASON_LEN`), and so, with this, are
                // the reviews a request holds.
                if verdict == Verdict::AskInfo && state == State::NeedsInfo {
                    return Err(illegal(state, "already waiting for the requester to answer a question; ask again after `wicket request update`"));
                }
                if reason.trim().is_empty() {
                    return Err(RequestError::Invalid(
                        "a review needs a reason (--reason)".into(),
                    ));
                }
                let decision = self.decide_review(&req, &by, now);
                if !decision.allowed {
                    return Err(RequestError::Forbidden(decision.reason));
                }
                if req
                    .reviews
                    .iter()
                    .any(|r| r.reviewer == by.name && r.verdict != Verdict::AskInfo)
                {
                    return Err(RequestError::Invalid(format!(
                        "{} has already reviewed this request",
                        by.name
                    )));
                }
                if let Some(subset) = &roles {
                    if subset.is_empty() || subset.iter().any(|r| !req.roles.contains(r)) {
                        return Err(RequestError::Invalid(
                            "--roles must be a non-empty subset of the requested roles".into(),
                        ));
                    }
                }
                if let Some(d) = duration {
                    let min = self.policy.requests.min_duration.max(Duration::seconds(1));
                    if d < min || d.num_seconds() > req.requested_duration_secs {
                        return Err(RequestError::Invalid(format!(
                            "--duration may only shorten the grant, to at least {}",
                            human(min)
                        )));
                    }
                }
                if let Some(s) = start_at {
                    // As at creation: where starts are not scheduled, a
                    // reviewer cannot schedule one either.
                    if !self.policy.requests.allow_scheduled_start {
                        return Err(RequestError::Invalid(
                            "a scheduled start is not allowed here (--start-at)".into(),
                        ));
                    }
                    if s <= now || s > now + Duration::days(30) {
                        return Err(RequestError::Invalid(
                            "--start-at must be in the future (within 30 days)".into(),
                        ));
                    }
                }
                let matched: Vec<String> = self
                    .membership(&req, &by, now)
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                req.reviews.push(Review {
                    reviewer: by.name.clone(),
                    verdict,
                    reason: reason.clone(),
                    at: now,
                    matched,
                    roles: roles.clone(),
                    duration_secs: duration.map(|d| d.num_seconds()),
                    start_at,
                });
                req.updated_at = now;
                match verdict {
                    Verdict::Deny => {
                        req.state = State::Denied;
                        req.ended_at = Some(now);
                        req.end_reason = Some(format!("denied by {}: {reason}", by.name));
                        effects.push(audit(
                            "request_denied",
                            &by.name,
                            format!("{} ({})", reason, decision.reason),
                        ));
                        effects.push(Effect::Notify {
                            recipients: Recipients::User(req.requester.clone()),
                            subject: format!("request {} denied by {}: {reason}", req.id, by.name),
                            urgent: false,
                        });
                    }
                    Verdict::AskInfo => {
                        req.state = State::NeedsInfo;
                        effects.push(audit("request_needs_info", &by.name, reason.clone()));
                        effects.push(Effect::Notify {
                            recipients: Recipients::User(req.requester.clone()),
                            subject: format!("{} asks about request {}: {reason}", by.name, req.id),
                            urgent: false,
                        });
                    }
                    Verdict::Approve => {
                        effects.push(audit(
                            "request_reviewed",
                            &by.name,
                            format!("approve: {} ({})", reason, decision.reason),
                        ));
                        // The scope is the intersection of every approval's scope.
                        let granted: Vec<String> = req
                            .roles
                            .iter()
                            .filter(|r| {
                                req.reviews
                                    .iter()
                                    .filter(|v| v.verdict == Verdict::Approve)
                                    .all(|v| v.roles.as_ref().is_none_or(|s| s.contains(r)))
                            })
                            .cloned()
                            .collect();
                        if granted.is_empty() {
                            return Err(RequestError::Invalid(
                                "the approvals' role subsets do not overlap".into(),
                            ));
                        }
                        if self.requirement_status(&req, &granted).is_ok() {
                            req.granted_roles = granted;
                            effects.push(audit(
                                "request_approved",
                                &by.name,
                                format!("granted [{}]", req.granted_roles.join(", ")),
                            ));
                            self.activate(&mut req, now, &mut effects);
                        }
                    }
                    Verdict::Acknowledge => {}
                }
            }
            Event::Update { by, reason } => {
                if by != req.requester {
                    return Err(RequestError::Forbidden(
                        "only the requester can update a request".into(),
                    ));
                }
                if state != State::NeedsInfo {
                    return Err(illegal(
                        state,
                        "only a request that needs info can be updated",
                    ));
                }
                if reason.trim().is_empty() {
                    return Err(RequestError::Invalid(
                        "an update needs a reason (--reason)".into(),
                    ));
                }
                let reason_now = format!("{}\n[update] {}", req.reason, reason.trim());
                if reason_now.len() > MAX_REQUEST_REASON_LEN {
                    return Err(RequestError::Invalid(format!(
                        "the request's reason with its updates would pass {MAX_REQUEST_REASON_LEN} \
                         characters; create a new request"
                    )));
                }
                req.reason = reason_now;
                req.state = State::Pending;
                req.updated_at = now;
                effects.push(audit("request_updated", &by, reason));
                effects.push(Effect::Notify {
                    recipients: Recipients::Sets(self.reviewer_sets(&req).into_iter().collect()),
                    subject: format!("{} answered on request {}", req.requester, req.id),
                    urgent: false,
                });
            }
            Event::Cancel { by } => {
                if by != req.requester {
                    return Err(RequestError::Forbidden(
                        "only the requester can cancel a request".into(),
                    ));
                }
                if !(state.is_open() || state == State::Approved) {
                    return Err(illegal(
                        state,
                        "only a pending or scheduled request can be cancelled",
                    ));
                }
                req.state = State::Cancelled;
                req.ended_at = Some(now);
                req.end_reason = Some("cancelled by the requester".into());
                req.updated_at = now;
                effects.push(audit("request_cancelled", &by, ""));
            }
            Event::Drop { by } => {
                if by != req.requester {
                    return Err(RequestError::Forbidden(
                        "only the holder can drop a grant".into(),
                    ));
                }
                if !matches!(state, State::Active | State::Approved) {
                    return Err(illegal(
                        state,
                        "only an active or scheduled grant can be dropped",
                    ));
                }
                self.end(
                    &mut req,
                    State::Expired,
                    "dropped by its holder",
                    &by,
                    now,
                    &mut effects,
                );
                effects.push(audit("grant_dropped", &by, ""));
            }
            Event::Revoke { by, reason } => {
                if !self.policy.roles.may_revoke(&by.roles) {
                    return Err(RequestError::Forbidden(format!(
                        "{}'s roles [{}] may not revoke grants",
                        by.name,
                        by.roles.join(", ")
                    )));
                }
                // A grant that expired (or was dropped) may still have
                // sessions draining under `disconnect_on_expiry: false`; a
                // revoke ends them. It stays expired, with the revoke on it.
                let drained = state == State::Expired
                    && req.approved_at.is_some()
                    && req
                        .starts_at
                        .is_some_and(|s| req.ended_at.is_some_and(|e| s <= e));
                if drained && req.revoked_by.is_some() {
                    return Err(illegal(state, "this grant was already revoked"));
                }
                if !(drained || matches!(state, State::Active | State::Approved)) {
                    return Err(illegal(
                        state,
                        "only a grant (active, scheduled or ended) can be revoked",
                    ));
                }
                if reason.trim().is_empty() {
                    return Err(RequestError::Invalid(
                        "a revoke needs a reason (--reason)".into(),
                    ));
                }
                // An ended grant keeps its end; only its sessions end now.
                let (ended, still_open) = if drained {
                    req.updated_at = now;
                    effects.push(Effect::EndSessions {
                        reason: format!(
                            "access request {} revoked after it ended, by {}: {reason}",
                            req.id, by.name
                        ),
                        by: by.name.clone(),
                    });
                    ("ended ", "; sessions still open under it end now")
                } else {
                    self.end(
                        &mut req,
                        State::Revoked,
                        &format!("revoked by {}: {reason}", by.name),
                        &by.name,
                        now,
                        &mut effects,
                    );
                    ("", "")
                };
                req.revoked_by = Some(by.name.clone());
                req.revoke_reason = Some(reason.clone());
                effects.push(audit("grant_revoked", &by.name, reason.clone()));
                effects.push(Effect::Notify {
                    recipients: Recipients::User(req.requester.clone()),
                    subject: format!(
                        "your {ended}grant {} was revoked by {}: {reason}{still_open}",
                        req.id, by.name
                    ),
                    urgent: true,
                });
            }
            Event::Extend { by, duration } => {
                if by != req.requester {
                    return Err(RequestError::Forbidden(
                        "only the holder can extend a grant".into(),
                    ));
                }
                if state != State::Active {
                    return Err(illegal(state, "only an active grant can be extended"));
                }
                if req.break_glass {
                    return Err(RequestError::Forbidden(
                        "break-glass grants cannot be extended".into(),
                    ));
                }
                if req.extensions >= self.policy.requests.max_extensions {
                    return Err(RequestError::Forbidden(format!(
                        "this grant has used its {} extension(s)",
                        self.policy.requests.max_extensions
                    )));
                }
                let (Some(start), Some(end)) = (req.starts_at, req.expires_at) else {
                    return Err(illegal(state, "grant has no window"));
                };
                // A reviewer who approved a shorter grant set its ceiling:
                // the holder cannot extend past what any approver allowed.
                let max = req
                    .reviews
                    .iter()
                    .filter(|r| r.verdict == Verdict::Approve)
                    .filter_map(|r| r.duration_secs)
                    .map(Duration::seconds)
                    .fold(self.max_duration(&req.granted_roles), Duration::min);
                let new_end = match end.checked_add_signed(duration) {
                    Some(e) if duration > Duration::zero() && e - start <= max => e,
                    _ => {
                        return Err(RequestError::Invalid(format!(
                            "an extension may bring the grant to at most {} in total",
                            human(max)
                        )))
                    }
                };
                req.expires_at = Some(new_end);
                req.extensions += 1;
                req.updated_at = now;
                effects.push(audit(
                    "grant_extended",
                    &by,
                    format!("until {}", new_end.to_rfc3339()),
                ));
                // No reviewer is asked: those who approved it are told.
                let approvers = req.approvers();
                if !approvers.is_empty() {
                    effects.push(Effect::Notify {
                        recipients: Recipients::Sets(
                            approvers
                                .iter()
                                .map(|a| ReviewerSet::User(a.clone()).to_string())
                                .collect(),
                        ),
                        subject: format!(
                            "{by} extended grant {} [{}] by {} (until {})",
                            req.id,
                            req.granted_roles.join(", "),
                            human(duration),
                            new_end.to_rfc3339()
                        ),
                        urgent: false,
                    });
                }
            }
        }
        Ok((req, effects))
    }

    fn tick(&self, req: &mut AccessRequest, now: DateTime<Utc>, effects: &mut Vec<Effect>) {
        let settings = &self.policy.requests;
        match req.state {
            State::Pending | State::NeedsInfo => {
                if now >= later(req.created_at, settings.pending_ttl) {
                    req.state = State::Expired;
                    req.ended_at = Some(now);
                    req.end_reason = Some("nobody answered in time".into());
                    req.updated_at = now;
                    effects.push(audit(
                        "request_expired",
                        &req.requester.clone(),
                        "pending too long",
                    ));
                    effects.push(Effect::Notify {
                        recipients: Recipients::User(req.requester.clone()),
                        subject: format!("request {} expired unanswered", req.id),
                        urgent: false,
                    });
                } else if !req.escalated && now >= later(req.created_at, settings.escalate_after) {
                    req.escalated = true;
                    req.updated_at = now;
                    let secondary: Vec<String> = self.secondary_sets(req).into_iter().collect();
                    effects.push(audit(
                        "request_escalated",
                        &req.requester.clone(),
                        format!("notifying [{}]", secondary.join(", ")),
                    ));
                    if !secondary.is_empty() {
                        effects.push(Effect::Notify {
                            recipients: Recipients::Sets(secondary),
                            subject: format!(
                                "escalated: {} waits for [{}]",
                                req.requester,
                                req.roles.join(", ")
                            ),
                            urgent: req.urgency == Urgency::High,
                        });
                    }
                }
            }
            State::Approved if req.starts_at.is_some_and(|s| now >= s) => {
                req.state = State::Active;
                req.updated_at = now;
                effects.push(audit(
                    "grant_activated",
                    &req.requester.clone(),
                    "scheduled start",
                ));
                if req.expires_at.is_some_and(|e| now >= e) {
                    self.expire(req, now, effects);
                }
            }
            State::Active if req.expires_at.is_some_and(|e| now >= e) => {
                self.expire(req, now, effects);
            }
            _ => {}
        }
    }

    /// When this request next needs a [`Event::Tick`], if ever.
    pub fn next_deadline(&self, req: &AccessRequest) -> Option<DateTime<Utc>> {
        let s = &self.policy.requests;
        match req.state {
            State::Pending | State::NeedsInfo => Some(if req.escalated {
                later(req.created_at, s.pending_ttl)
            } else {
                later(req.created_at, s.escalate_after).min(later(req.created_at, s.pending_ttl))
            }),
            State::Approved => req.starts_at,
            State::Active => req.expires_at,
            _ => None,
        }
    }

    /// What the requested roles grant beyond the requester's standing roles.
    pub fn risk(&self, req: &AccessRequest) -> Risk {
        let roles = &self.policy.roles;
        let standing = Subject::new(&req.requester, &req.requester_roles);
        // As if granted: only on the resources it names, or is (or was,
        // once approved) judged on.
        let scope = GrantScope {
            roles: req.roles.clone(),
            ..req.scope()
        };
        let (all, scoped) = crate::roles_of_grants(req.requester_roles.clone(), [&scope]);
        let elevated = Subject {
            user: &req.requester,
            roles: &all,
            scoped: &scoped,
        };
        let mut risk = Risk {
            new_roles: req.roles.clone(),
            max_duration_secs: self.max_duration(&req.roles).num_seconds(),
            ..Default::default()
        };
        for res in &self.policy.resources {
            match res.kind {
                ResourceKind::Node => {
                    let before: BTreeSet<String> =
                        roles.node_logins(&standing, res).into_iter().collect();
                    for l in roles.node_logins(&elevated, res) {
                        if !before.contains(&l) {
                            risk.ssh.push(format!("{l}@{}", res.name));
                        }
                    }
                }
                ResourceKind::Database => {
                    let (_, before) = roles.database_access(&standing, res);
                    let (names, users) = roles.database_access(&elevated, res);
                    for u in users.iter().filter(|u| !before.contains(u)) {
                        risk.databases.push(format!(
                            "{u}@{} (databases: {})",
                            res.name,
                            names.join(",")
                        ));
                    }
                }
                ResourceKind::KubeCluster => {
                    let (before, _) = roles.kube_access(&standing, res);
                    let (groups, _) = roles.kube_access(&elevated, res);
                    for g in groups.iter().filter(|g| !before.contains(g)) {
                        risk.kubernetes.push(format!("{g}@{}", res.name));
                    }
                }
            }
        }
        // The API's powers count from standing roles only: a grant of a
        // role that has them does not give them, and its reviewers are told
        // so rather than shown them as granted.
        const STANDING_ONLY: &str = "(standing roles only: not given by a grant)";
        for r in req.roles.iter().filter_map(|r| roles.get(r)) {
            if r.revoke {
                risk.permissions
                    .push(format!("{}: revoke grants {STANDING_ONLY}", r.name));
            }
            if r.audit {
                risk.permissions
                    .push(format!("{}: read the audit log {STANDING_ONLY}", r.name));
            }
            if !r.review_roles.is_empty() {
                risk.permissions.push(format!(
                    "{}: review requests for [{}] {STANDING_ONLY}",
                    r.name,
                    r.review_roles.join(", ")
                ));
            }
            if !r.request_roles.is_empty() {
                risk.permissions.push(format!(
                    "{}: request [{}] {STANDING_ONLY}",
                    r.name,
                    r.request_roles.join(", ")
                ));
            }
            if r.port_forwarding && !r.ssh.logins.is_empty() {
                risk.permissions
                    .push(format!("{}: SSH port forwarding", r.name));
            }
        }
        risk
    }
}

/// `None` if `req` is met by `approvals` (reviewer, sets matched), else what is missing.
/// What `req` still lacks given `approvals` (who, and the reviewer sets
/// they matched). One approver in one of `extra` (a rule's secondary
/// reviewers, once the request escalated) may stand in for any one
/// approver the rule names: escalation widens who may approve, never how
/// many approvals, or how many distinct people, a rule needs, and never
/// replaces more than one of them.
fn unmet(
    req: &Requirement,
    extra: &[ReviewerSet],
    approvals: &[(&str, Vec<ReviewerSet>)],
) -> Option<String> {
    let in_set = |set: &ReviewerSet| -> Vec<&str> {
        approvals
            .iter()
            .filter(|(_, sets)| sets.contains(set))
            .map(|(who, _)| *who)
            .collect()
    };
    let stand_ins: Vec<&str> = approvals
        .iter()
        .filter(|(_, sets)| sets.iter().any(|s| extra.contains(s)))
        .map(|(who, _)| *who)
        .collect();
    match req {
        Requirement::SelfApprove => None,
        Requirement::AnyOf(sets) => {
            if sets.iter().any(|s| !in_set(s).is_empty()) || !stand_ins.is_empty() {
                None
            } else {
                Some(format!("one approval from any of [{}]", join_sets(sets)))
            }
        }
        Requirement::AllOf(sets) => {
            // Each set needs its own approver: distinct people (two-person
            // rule); a stand-in may fill one slot, any one.
            let candidates: Vec<Vec<&str>> = sets.iter().map(in_set).collect();
            let met = distinct_assignment(&candidates, &mut Vec::new())
                || (0..candidates.len()).any(|i| {
                    let mut widened = candidates.clone();
                    widened[i].extend(stand_ins.iter().copied());
                    distinct_assignment(&widened, &mut Vec::new())
                });
            if met {
                None
            } else {
                let missing: Vec<String> = sets
                    .iter()
                    .zip(&candidates)
                    .filter(|(_, c)| c.is_empty())
                    .map(|(s, _)| s.to_string())
                    .collect();
                Some(if missing.is_empty() {
                    format!(
                        "approvals from distinct people for each of [{}]",
                        join_sets(sets)
                    )
                } else {
                    format!("an approval from each of [{}]", missing.join(", "))
                })
            }
        }
        Requirement::Count { count, from } => {
            let mut people: BTreeSet<&str> = from.iter().flat_map(in_set).collect();
            // One stand-in, who is not already counted.
            if let Some(who) = stand_ins.iter().find(|w| !people.contains(*w)) {
                people.insert(who);
            }
            if people.len() >= *count as usize {
                None
            } else {
                Some(format!(
                    "{} more approval(s) from [{}]",
                    *count as usize - people.len(),
                    join_sets(from)
                ))
            }
        }
    }
}

fn join_sets(sets: &[ReviewerSet]) -> String {
    sets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Can each slot be filled by a distinct person from its candidates?
fn distinct_assignment<'a>(slots: &[Vec<&'a str>], used: &mut Vec<&'a str>) -> bool {
    let Some((first, rest)) = slots.split_first() else {
        return true;
    };
    for who in first {
        if !used.contains(who) {
            used.push(who);
            if distinct_assignment(rest, used) {
                return true;
            }
            used.pop();
        }
    }
    false
}

/// `2h`, `30m`, `1h30m`.
pub fn human(d: Duration) -> String {
    let s = d.num_seconds();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

/// A live session, as [`certificate_session_signal`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct CertifiedSession {
    /// When the certificate it was opened with ends, or the login behind
    /// it if that comes first (Unix seconds).
    pub valid_until: i64,
    /// Whether grants stand behind it (it then follows them instead).
    pub under_grants: bool,
    /// Whether it was warned already.
    pub warned: bool,
}

/// What a session is told at `now` about the end of the certificate it was
/// opened with. A session under standing roles ends at or after it with
/// `disconnect_on_expiry`, and is warned (once) within `warn_before` of it;
/// without, it drains then: what runs may finish, nothing new starts, as
/// for a grant that ended. Sessions under grants follow the grants instead
/// ([`AccessRequest::session_end`]), which may be extended past it.
pub fn certificate_session_signal(
    s: CertifiedSession,
    now: DateTime<Utc>,
    warn_before: Duration,
    disconnect_on_expiry: bool,
) -> Option<SessionSignal> {
    if s.under_grants {
        return None;
    }
    let at = || {
        DateTime::<Utc>::from_timestamp(s.valid_until, 0)
            .unwrap_or_default()
            .to_rfc3339()
    };
    let t = now.timestamp();
    if t >= s.valid_until && !disconnect_on_expiry {
        Some(SessionSignal::Drain(format!(
            "the login behind this session ended at {}; run `wicket login` to start anything new",
            at()
        )))
    } else if !disconnect_on_expiry {
        None
    } else if t >= s.valid_until {
        Some(SessionSignal::End(format!(
            "the login behind this session ended at {} (session.disconnect_on_expiry); run `wicket login` and connect again",
            at()
        )))
    } else if !s.warned && t >= s.valid_until.saturating_sub(warn_before.num_seconds()) {
        Some(SessionSignal::Warn(format!(
            "the login behind this session ends at {}; the session will be closed then",
            at()
        )))
    } else {
        None
    }
}

/// What [`certificate_session_signal`] tells a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSignal {
    Warn(String),
    /// What runs may finish; nothing new starts.
    Drain(String),
    End(String),
}
