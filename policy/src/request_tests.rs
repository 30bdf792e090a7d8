//! Unit and property tests for the access-request state machine
//! ([`crate::request`]), against a hand-built policy mirroring the project's
//! example configuration.

use crate::request::{human, MAX_REASON_LEN, MAX_REQUEST_REASON_LEN};
use crate::{certificate_session_signal, CertifiedSession, SessionSignal};
use crate::{
    AccessRequest, Actor, ApprovalRule, BreakGlassSettings, DatabaseGrant, Decision, Directory,
    Effect, Engine, Event, KubernetesGrant, LabelSelector, NewRequest, OncallSchedule, Policy,
    Recipients, RequestError, RequestSettings, Requester, Requirement, Resource, ResourceKind,
    Review, ReviewerSet, Role, RoleSet, SshLoginGrant, State, Team, Urgency, Verdict,
};
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn sv(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// Week 1 of the on-call rotation: dave is on call.
fn t0() -> DateTime<Utc> {
    t("2026-01-06T10:00:00Z")
}

fn mins(m: i64) -> Duration {
    Duration::minutes(m)
}

fn hours(h: i64) -> Duration {
    Duration::hours(h)
}

fn sel(k: &str, v: &str) -> LabelSelector {
    LabelSelector([(k.to_string(), v.to_string())].into())
}

fn resource(kind: ResourceKind, name: &str, env: &str) -> Resource {
    Resource {
        kind,
        name: name.into(),
        address: "127.0.0.1:22".into(),
        labels: [("env".to_string(), env.to_string())].into(),
    }
}

fn policy() -> Policy {
    let roles = RoleSet::new([
        Role {
            name: "dev".into(),
            ssh: SshLoginGrant {
                logins: sv(&["{{user}}"]),
                nodes: sel("env", "dev"),
            },
            request_roles: sv(&["prod-ssh", "dba", "dev-admin"]),
            ..Default::default()
        },
        Role {
            name: "dev-admin".into(),
            ssh: SshLoginGrant {
                logins: sv(&["root"]),
                nodes: sel("env", "dev"),
            },
            max_duration: Some(hours(8)),
            ..Default::default()
        },
        Role {
            name: "prod-ssh".into(),
            ssh: SshLoginGrant {
                logins: sv(&["root", "ubuntu"]),
                nodes: sel("env", "prod"),
            },
            port_forwarding: false,
            max_duration: Some(hours(4)),
            ..Default::default()
        },
        Role {
            name: "dba".into(),
            databases: Some(DatabaseGrant {
                labels: sel("env", "prod"),
                names: sv(&["*"]),
                users: sv(&["postgres", "app"]),
            }),
            max_duration: Some(hours(2)),
            ..Default::default()
        },
        Role {
            name: "kube-admin".into(),
            kubernetes: Some(KubernetesGrant {
                labels: sel("env", "prod"),
                groups: sv(&["system:masters"]),
                users: Vec::new(),
            }),
            max_duration: Some(hours(1)),
            ..Default::default()
        },
        Role {
            name: "sre".into(),
            review_roles: sv(&["prod-ssh", "dba", "kube-admin"]),
            request_roles: sv(&["kube-admin"]),
            ..Default::default()
        },
        Role {
            name: "security-admin".into(),
            review_roles: sv(&["*"]),
            revoke: true,
            audit: true,
            ..Default::default()
        },
        // Revokes, but neither audits nor reviews.
        Role {
            name: "incident-commander".into(),
            revoke: true,
            ..Default::default()
        },
    ]);
    let approval = vec![
        ApprovalRule {
            roles: sv(&["dev-admin"]),
            environment: None,
            require: Requirement::SelfApprove,
            secondary: Vec::new(),
        },
        ApprovalRule {
            roles: sv(&["prod-ssh", "kube-admin"]),
            environment: None,
            require: Requirement::AllOf(vec![
                ReviewerSet::Oncall("sre".into()),
                ReviewerSet::TeamLead,
            ]),
            secondary: Vec::new(),
        },
        ApprovalRule {
            roles: sv(&["dba"]),
            environment: None,
            require: Requirement::AnyOf(vec![
                ReviewerSet::Role("sre".into()),
                ReviewerSet::Role("security-admin".into()),
            ]),
            secondary: vec![ReviewerSet::Role("security-admin".into())],
        },
    ];
    let mut directory = Directory::default();
    directory.teams.insert(
        "payments".into(),
        Team {
            name: "payments".into(),
            lead: "bob".into(),
            members: sv(&["alice", "carol"]),
        },
    );
    directory.oncall.insert(
        "sre".into(),
        OncallSchedule {
            name: "sre".into(),
            rotation: sv(&["dave", "erin"]),
            shift: hours(168),
            starts: t("2026-01-05T09:00:00Z"),
        },
    );
    Policy {
        roles,
        approval,
        directory,
        requests: RequestSettings {
            min_duration: mins(1),
            default_duration: hours(4),
            max_duration: hours(8),
            pending_ttl: hours(1),
            escalate_after: mins(30),
            require_reason: true,
            require_ticket_url: false,
            max_extensions: 1,
            allow_scheduled_start: true,
            max_pending_per_user: 10,
        },
        break_glass: BreakGlassSettings {
            enabled: true,
            require_mfa: true,
            max_duration: hours(1),
            notify: vec![ReviewerSet::Role("security-admin".into())],
        },
        resources: vec![
            resource(ResourceKind::Node, "db-1", "prod"),
            resource(ResourceKind::Node, "dev-1", "dev"),
            resource(ResourceKind::Database, "prod-pg", "prod"),
        ],
    }
}

fn roles_of(user: &str) -> Vec<String> {
    match user {
        "alice" | "bob" | "carol" => sv(&["dev"]),
        "dave" | "erin" => sv(&["sre"]),
        "frank" => sv(&["security-admin"]),
        "gina" => sv(&["incident-commander"]),
        _ => Vec::new(),
    }
}

fn actor(name: &str) -> Actor {
    Actor {
        name: name.into(),
        roles: roles_of(name),
    }
}

fn nr(roles: &[&str]) -> NewRequest {
    NewRequest {
        id: "r1".into(),
        roles: sv(roles),
        reason: "INC-42: fix replication lag".into(),
        ..Default::default()
    }
}

fn nr_for(roles: &[&str], duration: Duration) -> NewRequest {
    NewRequest {
        duration: Some(duration),
        ..nr(roles)
    }
}

type Outcome = Result<(AccessRequest, Vec<Effect>), RequestError>;

fn create_as(p: &Policy, user: &str, new: NewRequest, now: DateTime<Utc>) -> Outcome {
    let roles = roles_of(user);
    Engine::new(p).create(
        new,
        &Requester {
            name: user,
            roles: &roles,
            team: None,
            awaiting_review: 0,
        },
        now,
    )
}

/// Creates a request by alice that must succeed.
fn alice_requests(p: &Policy, new: NewRequest, now: DateTime<Utc>) -> AccessRequest {
    create_as(p, "alice", new, now).unwrap().0
}

fn apply(p: &Policy, req: &AccessRequest, ev: Event, now: DateTime<Utc>) -> Outcome {
    Engine::new(p).apply(req, ev, now)
}

fn review(by: &str, verdict: Verdict) -> Event {
    Event::Review {
        by: actor(by),
        verdict,
        reason: "looks right".into(),
        roles: None,
        duration: None,
        start_at: None,
    }
}

fn approve(by: &str) -> Event {
    review(by, Verdict::Approve)
}

fn scoped_approve(
    by: &str,
    roles: Option<&[&str]>,
    duration: Option<Duration>,
    start_at: Option<DateTime<Utc>>,
) -> Event {
    Event::Review {
        by: actor(by),
        verdict: Verdict::Approve,
        reason: "ok, narrower".into(),
        roles: roles.map(sv),
        duration,
        start_at,
    }
}

fn revoke(by: &str, reason: &str) -> Event {
    Event::Revoke {
        by: actor(by),
        reason: reason.into(),
    }
}

fn extend(by: &str, duration: Duration) -> Event {
    Event::Extend {
        by: by.into(),
        duration,
    }
}

fn audits(fx: &[Effect]) -> Vec<&str> {
    fx.iter()
        .filter_map(|f| match f {
            Effect::Audit { kind, .. } => Some(kind.as_str()),
            _ => None,
        })
        .collect()
}

fn audit_actor<'a>(fx: &'a [Effect], wanted: &str) -> &'a str {
    fx.iter()
        .find_map(|f| match f {
            Effect::Audit { kind, actor, .. } if kind == wanted => Some(actor.as_str()),
            _ => None,
        })
        .unwrap()
}

fn notifications(fx: &[Effect]) -> Vec<(&Recipients, bool)> {
    fx.iter()
        .filter_map(|f| match f {
            Effect::Notify {
                recipients, urgent, ..
            } => Some((recipients, *urgent)),
            _ => None,
        })
        .collect()
}

fn end_sessions(fx: &[Effect]) -> Vec<&str> {
    fx.iter()
        .filter_map(|f| match f {
            Effect::EndSessions { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect()
}

/// Who ended the grant, per [`Effect::EndSessions`].
fn ended_by(fx: &[Effect]) -> Vec<&str> {
    fx.iter()
        .filter_map(|f| match f {
            Effect::EndSessions { by, .. } => Some(by.as_str()),
            _ => None,
        })
        .collect()
}

fn to_user(u: &str) -> Recipients {
    Recipients::User(u.into())
}

fn to_sets(s: &[&str]) -> Recipients {
    Recipients::Sets(sv(s))
}

fn invalid<T: std::fmt::Debug>(r: Result<T, RequestError>) -> String {
    match r {
        Err(RequestError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, RequestError>) -> String {
    match r {
        Err(RequestError::Forbidden(m)) => m,
        other => panic!("expected Forbidden, got {other:?}"),
    }
}

fn illegal<T: std::fmt::Debug>(r: Result<T, RequestError>) -> &'static str {
    match r {
        Err(RequestError::IllegalTransition { state, .. }) => state,
        other => panic!("expected IllegalTransition, got {other:?}"),
    }
}

/// `pending` approved by erin at `t0()` to start an hour later.
fn scheduled(p: &Policy, pending: &AccessRequest) -> AccessRequest {
    apply(
        p,
        pending,
        scoped_approve("erin", None, None, Some(t0() + hours(1))),
        t0(),
    )
    .unwrap()
    .0
}

/// A prod-ssh request by alice at `t0()` for 2h, approved by dave (on call)
/// and bob (team lead) at `t0()`: active from t0 to t0+2h.
fn active_prod_ssh(p: &Policy, duration: Duration) -> AccessRequest {
    let req = alice_requests(p, nr_for(&["prod-ssh"], duration), t0());
    let (req, _) = apply(p, &req, approve("dave"), t0()).unwrap();
    let (req, _) = apply(p, &req, approve("bob"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
    req
}

/// A dba request by alice at `t0()` (default duration: 2h), approved by erin.
fn active_dba(p: &Policy) -> AccessRequest {
    let req = alice_requests(p, nr(&["dba"]), t0());
    let (req, _) = apply(p, &req, approve("erin"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
    req
}

// ---------------------------------------------------------------------------
// Small pieces
// ---------------------------------------------------------------------------

#[test]
fn state_names_round_trip_and_classify() {
    let all = [
        State::Pending,
        State::NeedsInfo,
        State::Approved,
        State::Active,
        State::Denied,
        State::Expired,
        State::Cancelled,
        State::Revoked,
    ];
    for s in all {
        assert_eq!(State::parse(s.as_str()), Some(s));
    }
    assert_eq!(State::parse("needs-info"), Some(State::NeedsInfo));
    assert_eq!(State::parse("bogus"), None);
    let terminal: Vec<State> = all.into_iter().filter(|s| s.is_terminal()).collect();
    assert_eq!(
        terminal,
        [
            State::Denied,
            State::Expired,
            State::Cancelled,
            State::Revoked
        ]
    );
    let open: Vec<State> = all.into_iter().filter(|s| s.is_open()).collect();
    assert_eq!(open, [State::Pending, State::NeedsInfo]);
}

#[test]
fn human_durations() {
    assert_eq!(human(Duration::zero()), "0s");
    assert_eq!(human(Duration::seconds(45)), "45s");
    assert_eq!(human(mins(30)), "30m");
    assert_eq!(human(hours(2)), "2h");
    assert_eq!(human(mins(90)), "1h30m");
    assert_eq!(human(Duration::seconds(3661)), "1h1m1s");
}

#[test]
fn max_duration_is_global_capped_by_each_role() {
    let p = policy();
    let e = Engine::new(&p);
    assert_eq!(e.max_duration(&[]), hours(8));
    assert_eq!(e.max_duration(&sv(&["dev-admin"])), hours(8));
    assert_eq!(e.max_duration(&sv(&["prod-ssh"])), hours(4));
    assert_eq!(e.max_duration(&sv(&["prod-ssh", "dba"])), hours(2));
    assert_eq!(e.max_duration(&sv(&["dba", "kube-admin"])), hours(1));
    // Roles without their own maximum fall back to the global one.
    assert_eq!(e.max_duration(&sv(&["sre", "unknown"])), hours(8));
}

// ---------------------------------------------------------------------------
// Create: validation
// ---------------------------------------------------------------------------

#[test]
fn create_rejects_missing_duplicate_and_unknown_roles() {
    let p = policy();
    let m = invalid(create_as(&p, "alice", nr(&[]), t0()));
    assert!(m.contains("at least one role"), "{m}");
    let m = invalid(create_as(&p, "alice", nr(&["dba", "dba"]), t0()));
    assert!(m.contains("listed twice"), "{m}");
    let m = invalid(create_as(&p, "alice", nr(&["root-of-all"]), t0()));
    assert!(m.contains("unknown role \"root-of-all\""), "{m}");
}

#[test]
fn create_rejects_roles_the_requester_may_not_request() {
    let p = policy();
    // dev may request prod-ssh, dba and dev-admin, not kube-admin or sre.
    let m = forbidden(create_as(&p, "alice", nr(&["kube-admin"]), t0()));
    assert!(m.contains("may not request role kube-admin"), "{m}");
    forbidden(create_as(
        &p,
        "alice",
        nr(&["prod-ssh", "security-admin"]),
        t0(),
    ));
    // frank (security-admin) may not request anything.
    forbidden(create_as(&p, "frank", nr(&["dba"]), t0()));
    // sre may request kube-admin.
    let (req, _) = create_as(&p, "dave", nr(&["kube-admin"]), t0()).unwrap();
    assert_eq!(req.state, State::Pending);
    assert_eq!(req.requester_roles, sv(&["sre"]));
    assert_eq!(req.requester_team_lead, None);
}

#[test]
fn create_rejects_roles_already_held() {
    let p = policy();
    let held = sv(&["dev", "prod-ssh"]);
    let r = Engine::new(&p).create(
        nr(&["prod-ssh"]),
        &Requester {
            name: "alice",
            roles: &held,
            team: None,
            awaiting_review: 0,
        },
        t0(),
    );
    let m = invalid(r);
    assert!(m.contains("already hold role prod-ssh"), "{m}");
    // Held is checked before requestable: dev is held (and not requestable).
    let m = invalid(create_as(&p, "alice", nr(&["dev"]), t0()));
    assert!(m.contains("already hold role dev"), "{m}");
}

#[test]
fn create_requires_a_reason() {
    let p = policy();
    for reason in ["", "   ", "\n\t"] {
        let new = NewRequest {
            reason: reason.into(),
            ..nr(&["dba"])
        };
        let m = invalid(create_as(&p, "alice", new, t0()));
        assert!(m.contains("reason is required"), "{m}");
    }
    let long = NewRequest {
        reason: "x".repeat(2001),
        ..nr(&["dba"])
    };
    assert!(invalid(create_as(&p, "alice", long, t0())).contains("longer than 2000"));
    // The reason is stored trimmed.
    let new = NewRequest {
        reason: "  INC-1  ".into(),
        ..nr(&["dba"])
    };
    assert_eq!(alice_requests(&p, new, t0()).reason, "INC-1");
    // Without require_reason an empty reason is fine.
    let mut lax = policy();
    lax.requests.require_reason = false;
    let new = NewRequest {
        reason: String::new(),
        ..nr(&["dba"])
    };
    assert_eq!(alice_requests(&lax, new, t0()).state, State::Pending);
}

#[test]
fn create_enforces_role_and_global_duration_limits() {
    let p = policy();
    // dba allows at most 2h.
    let m = invalid(create_as(&p, "alice", nr_for(&["dba"], hours(3)), t0()));
    assert!(m.contains("longer than the 7200s allowed for [dba]"), "{m}");
    assert_eq!(
        alice_requests(&p, nr_for(&["dba"], hours(2)), t0()).requested_duration_secs,
        7200
    );
    // The smallest role maximum wins for several roles.
    invalid(create_as(
        &p,
        "alice",
        nr_for(&["prod-ssh", "dba"], hours(3)),
        t0(),
    ));
    // prod-ssh 4h.
    invalid(create_as(
        &p,
        "alice",
        nr_for(&["prod-ssh"], hours(4) + Duration::seconds(1)),
        t0(),
    ));
    // dev-admin 8h = global; beyond the global maximum is refused.
    assert_eq!(
        create_as(&p, "alice", nr_for(&["dev-admin"], hours(8)), t0())
            .unwrap()
            .0
            .requested_duration_secs,
        8 * 3600
    );
    invalid(create_as(
        &p,
        "alice",
        nr_for(&["dev-admin"], hours(9)),
        t0(),
    ));
    let mut tight = policy();
    tight.requests.max_duration = hours(3);
    invalid(create_as(
        &tight,
        "alice",
        nr_for(&["dev-admin"], hours(4)),
        t0(),
    ));
}

#[test]
fn create_enforces_minimum_duration() {
    let p = policy();
    for d in [
        Duration::seconds(59),
        Duration::zero(),
        Duration::seconds(-3600),
        Duration::milliseconds(59_999),
    ] {
        let m = invalid(create_as(&p, "alice", nr_for(&["dba"], d), t0()));
        assert!(m.contains("at least 60s"), "{d:?}: {m}");
    }
    assert_eq!(
        alice_requests(&p, nr_for(&["dba"], mins(1)), t0()).requested_duration_secs,
        60
    );
}

#[test]
fn create_defaults_duration_to_default_capped_by_roles() {
    let p = policy();
    let secs = |roles: &[&str]| alice_requests(&p, nr(roles), t0()).requested_duration_secs;
    assert_eq!(secs(&["prod-ssh"]), 4 * 3600);
    assert_eq!(secs(&["dba"]), 2 * 3600);
    assert_eq!(secs(&["prod-ssh", "dba"]), 2 * 3600);
}

#[test]
fn create_validates_scheduled_start() {
    let p = policy();
    let at = |s: DateTime<Utc>| NewRequest {
        start_at: Some(s),
        ..nr(&["dba"])
    };
    let m = invalid(create_as(&p, "alice", at(t0() - mins(1)), t0()));
    assert!(m.contains("in the future"), "{m}");
    invalid(create_as(&p, "alice", at(t0()), t0()));
    let m = invalid(create_as(&p, "alice", at(t0() + Duration::days(31)), t0()));
    assert!(m.contains("within 30 days"), "{m}");
    let req = alice_requests(&p, at(t0() + hours(1)), t0());
    assert_eq!(req.requested_start, Some(t0() + hours(1)));
    assert_eq!(req.state, State::Pending);
    let mut no_sched = policy();
    no_sched.requests.allow_scheduled_start = false;
    let m = invalid(create_as(&no_sched, "alice", at(t0() + hours(1)), t0()));
    assert!(m.contains("scheduled start is not allowed"), "{m}");
}

#[test]
fn create_validates_ticket_url() {
    let p = policy();
    let ticket = |u: &str| NewRequest {
        ticket_url: Some(u.into()),
        ..nr(&["dba"])
    };
    for bad in [
        "ftp://tickets/1",
        "javascript:alert(1)",
        "tickets.example.com/1",
        "",
    ] {
        let m = invalid(create_as(&p, "alice", ticket(bad), t0()));
        assert!(m.contains("must be an http(s) URL"), "{bad}: {m}");
    }
    let long = format!("https://t/{}", "a".repeat(2000));
    invalid(create_as(&p, "alice", ticket(&long), t0()));
    for good in ["https://tickets.example.com/INC-42", "http://jira/X-1"] {
        let req = alice_requests(&p, ticket(good), t0());
        assert_eq!(req.ticket_url.as_deref(), Some(good));
    }
    let mut strict = policy();
    strict.requests.require_ticket_url = true;
    let m = invalid(create_as(&strict, "alice", nr(&["dba"]), t0()));
    assert!(m.contains("ticket URL is required"), "{m}");
    assert_eq!(
        alice_requests(&strict, ticket("https://t/1"), t0()).state,
        State::Pending
    );
}

#[test]
fn create_rejects_unknown_resources() {
    let p = policy();
    let new = NewRequest {
        resources: sv(&["db-1", "nope"]),
        ..nr(&["prod-ssh"])
    };
    let m = invalid(create_as(&p, "alice", new, t0()));
    assert!(m.contains("unknown resource \"nope\""), "{m}");
}

/// A request names each resource once, and at most `MAX_RESOURCES`: each
/// is looked at for every reviewer whenever the request is shown.
#[test]
fn create_rejects_a_resource_named_twice_or_too_many() {
    let p = policy();
    let twice = NewRequest {
        resources: sv(&["db-1", "db-1"]),
        ..nr(&["prod-ssh"])
    };
    let m = invalid(create_as(&p, "alice", twice, t0()));
    assert!(m.contains("resource db-1 is listed twice"), "{m}");
    let many = NewRequest {
        resources: (0..=crate::request::MAX_RESOURCES)
            .map(|i| format!("db-{i}"))
            .collect(),
        ..nr(&["prod-ssh"])
    };
    let m = invalid(create_as(&p, "alice", many, t0()));
    assert!(m.contains("at most 64 resources"), "{m}");
    let once = NewRequest {
        resources: sv(&["db-1"]),
        ..nr(&["prod-ssh"])
    };
    create_as(&p, "alice", once, t0()).unwrap();
}

#[test]
fn create_is_refused_when_too_many_await_review_but_break_glass_is_not() {
    let p = policy();
    let most = p.requests.max_pending_per_user as usize;
    let roles = roles_of("alice");
    let as_alice = |awaiting_review: usize, new: NewRequest| {
        Engine::new(&p).create(
            new,
            &Requester {
                name: "alice",
                roles: &roles,
                team: None,
                awaiting_review,
            },
            t0(),
        )
    };
    as_alice(most - 1, nr(&["prod-ssh"])).unwrap();
    match as_alice(most, nr(&["prod-ssh"])) {
        Err(RequestError::Limited(m)) => {
            assert!(m.contains("you have 10 requests awaiting review"), "{m}");
            assert!(m.contains("max_pending_per_user: 10"), "{m}");
        }
        other => panic!("expected Limited, got {other:?}"),
    }
    // Still refused when the store counted more (another wicketd's).
    assert!(matches!(
        as_alice(most + 3, nr(&["prod-ssh"])),
        Err(RequestError::Limited(_))
    ));
    // Break-glass awaits no review: never counted against the limit.
    let (bg, _) = as_alice(most, break_glass(&["prod-ssh"], true)).unwrap();
    assert_eq!(bg.state, State::Active);
}

#[test]
fn create_pending_records_request_and_notifies_reviewers() {
    let p = policy();
    let now = t0() + Duration::milliseconds(250);
    let (req, fx) = create_as(&p, "alice", nr_for(&["prod-ssh"], hours(2)), now).unwrap();
    assert_eq!(req.id, "r1");
    assert_eq!(req.requester, "alice");
    assert_eq!(req.requester_roles, sv(&["dev"]));
    assert_eq!(req.requester_team_lead.as_deref(), Some("bob"));
    assert_eq!(req.roles, sv(&["prod-ssh"]));
    assert_eq!(req.state, State::Pending);
    assert_eq!(req.created_at, now);
    assert_eq!(req.updated_at, now);
    assert_eq!(req.requested_duration_secs, 7200);
    assert!(req.reviews.is_empty());
    assert!(req.granted_roles.is_empty());
    assert_eq!(
        (req.starts_at, req.expires_at, req.approved_at),
        (None, None, None)
    );
    assert!(!req.escalated && !req.break_glass);
    assert_eq!(req.urgency, Urgency::Normal);
    assert_eq!(audits(&fx), ["request_created"]);
    assert_eq!(audit_actor(&fx, "request_created"), "alice");
    assert_eq!(
        notifications(&fx),
        [(&to_sets(&["oncall:sre", "team_lead"]), false)]
    );
    assert!(end_sessions(&fx).is_empty());

    // dba: reviewer sets from its rule, sorted; urgent when urgency is high.
    let new = NewRequest {
        urgency: Urgency::High,
        ..nr(&["dba"])
    };
    let (_, fx) = create_as(&p, "alice", new, t0()).unwrap();
    assert_eq!(
        notifications(&fx),
        [(&to_sets(&["role:security-admin", "role:sre"]), true)]
    );
}

// ---------------------------------------------------------------------------
// Self-approval
// ---------------------------------------------------------------------------

/// An operator who writes a duration past the calendar ("unlimited") gets
/// grants and deadlines at the last time there is, never a panic.
#[test]
fn durations_past_the_calendar_end_at_the_last_time_there_is() {
    let mut p = policy();
    let forever = Duration::days(100_000_000);
    p.requests.max_duration = forever;
    p.requests.pending_ttl = forever;
    p.requests.escalate_after = forever;
    p.roles = RoleSet::new(p.roles.iter().cloned().map(|r| Role {
        max_duration: None,
        ..r
    }));
    let now = t0();
    let (req, _) = create_as(&p, "alice", nr_for(&["dev-admin"], forever), now).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.expires_at, Some(DateTime::<Utc>::MAX_UTC));
    assert!(req.grants_at(now + hours(1)));
    let e = Engine::new(&p);
    assert_eq!(e.next_deadline(&req), Some(DateTime::<Utc>::MAX_UTC));
    // A request awaiting review: its timers too.
    let pending = alice_requests(&p, nr(&["dba"]), now);
    assert_eq!(pending.state, State::Pending);
    assert_eq!(e.next_deadline(&pending), Some(DateTime::<Utc>::MAX_UTC));
    let (same, _) = apply(&p, &pending, Event::Tick, now + hours(1)).unwrap();
    assert_eq!(same.state, State::Pending);
}

#[test]
fn dev_admin_is_self_approved_and_active_at_once() {
    let p = policy();
    let now = t("2026-01-06T10:00:00.750Z");
    let (req, fx) = create_as(&p, "alice", nr_for(&["dev-admin"], hours(2)), now).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.granted_roles, sv(&["dev-admin"]));
    // Whole seconds: the sub-second part of `now` is dropped.
    assert_eq!(req.starts_at, Some(t("2026-01-06T10:00:00Z")));
    assert_eq!(req.expires_at, Some(t("2026-01-06T12:00:00Z")));
    assert_eq!(req.approved_at, Some(now));
    assert!(req.reviews.is_empty());
    assert!(req.approvers().is_empty());
    assert_eq!(
        audits(&fx),
        ["request_created", "request_approved", "grant_activated"]
    );
    assert_eq!(notifications(&fx), [(&to_user("alice"), false)]);
    assert!(end_sessions(&fx).is_empty());
    assert!(req.grants_at(now));
    assert!(req.grants_at(t("2026-01-06T11:59:59Z")));
    assert!(!req.grants_at(t("2026-01-06T12:00:00Z")));
    assert!(!req.grants_at(t("2026-01-06T09:59:59Z")));
    let e = Engine::new(&p);
    assert_eq!(e.requirement_status(&req, &req.granted_roles), Ok(()));
    assert_eq!(e.next_deadline(&req), Some(t("2026-01-06T12:00:00Z")));

    // Default duration: 4h.
    let req = alice_requests(&p, nr(&["dev-admin"]), t0());
    assert_eq!(req.expires_at, Some(t0() + hours(4)));
}

#[test]
fn self_approved_with_scheduled_start_waits_for_tick() {
    let p = policy();
    let start = t0() + hours(3);
    let new = NewRequest {
        start_at: Some(start),
        ..nr_for(&["dev-admin"], hours(1))
    };
    let (req, fx) = create_as(&p, "alice", new, t0()).unwrap();
    assert_eq!(req.state, State::Approved);
    assert_eq!(req.starts_at, Some(start));
    assert_eq!(req.expires_at, Some(start + hours(1)));
    assert_eq!(
        audits(&fx),
        ["request_created", "request_approved", "grant_scheduled"]
    );
    assert!(!req.grants_at(start));
    assert_eq!(Engine::new(&p).next_deadline(&req), Some(start));
    let (same, fx) = apply(&p, &req, Event::Tick, start - Duration::seconds(1)).unwrap();
    assert_eq!(same, req);
    assert!(fx.is_empty());
    let (req, fx) = apply(&p, &req, Event::Tick, start).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(audits(&fx), ["grant_activated"]);
    assert!(req.grants_at(start));
}

#[test]
fn mixed_self_approve_and_reviewed_roles_need_the_reviewed_rule() {
    let p = policy();
    let e = Engine::new(&p);
    let (req, fx) = create_as(&p, "alice", nr(&["dev-admin", "prod-ssh"]), t0()).unwrap();
    assert_eq!(req.state, State::Pending);
    assert_eq!(
        notifications(&fx),
        [(&to_sets(&["oncall:sre", "team_lead"]), false)]
    );
    // dev-admin alone is met by its self-approve rule; prod-ssh is not.
    assert_eq!(e.requirement_status(&req, &sv(&["dev-admin"])), Ok(()));
    assert!(e.requirement_status(&req, &req.roles).is_err());
    // frank may review (security-admin reviews "*", dev-admin's rule names nobody).
    assert!(e.decide_review(&req, &actor("frank"), t0()).allowed);
    let (req, _) = apply(&p, &req, approve("frank"), t0()).unwrap();
    assert_eq!(req.state, State::Pending);
    let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
    let (req, _) = apply(&p, &req, approve("bob"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.granted_roles, sv(&["dev-admin", "prod-ssh"]));
    // Default 4h, capped by prod-ssh's 4h.
    assert_eq!(req.expires_at, Some(t0() + hours(4)));
}

// ---------------------------------------------------------------------------
// Reviews: AllOf (prod-ssh), AnyOf (dba)
// ---------------------------------------------------------------------------

#[test]
fn prod_ssh_needs_oncall_and_team_lead() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr_for(&["prod-ssh"], hours(2)), t0());

    let (req, fx) = apply(&p, &req, approve("dave"), t0() + mins(5)).unwrap();
    assert_eq!(req.state, State::Pending);
    assert_eq!(audits(&fx), ["request_reviewed"]);
    assert_eq!(audit_actor(&fx, "request_reviewed"), "dave");
    assert!(notifications(&fx).is_empty());
    assert_eq!(req.reviews.len(), 1);
    let r = &req.reviews[0];
    assert_eq!(r.reviewer, "dave");
    assert_eq!(r.verdict, Verdict::Approve);
    assert_eq!(r.at, t0() + mins(5));
    assert_eq!(r.matched, sv(&["role:sre", "user:dave", "oncall:sre"]));
    assert!(req.granted_roles.is_empty());
    assert_eq!(req.starts_at, None);
    assert_eq!(req.updated_at, t0() + mins(5));
    assert_eq!(
        e.requirement_status(&req, &req.roles),
        Err(sv(&["prod-ssh: an approval from each of [team_lead]"]))
    );

    let (req, fx) = apply(&p, &req, approve("bob"), t0() + mins(10)).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(
        req.reviews[1].matched,
        sv(&["role:dev", "user:bob", "team_lead"])
    );
    assert_eq!(req.granted_roles, sv(&["prod-ssh"]));
    assert_eq!(req.approvers(), sv(&["dave", "bob"]));
    assert_eq!(req.starts_at, Some(t0() + mins(10)));
    assert_eq!(req.expires_at, Some(t0() + mins(130)));
    assert_eq!(req.approved_at, Some(t0() + mins(10)));
    assert_eq!(
        audits(&fx),
        ["request_reviewed", "request_approved", "grant_activated"]
    );
    assert_eq!(audit_actor(&fx, "request_approved"), "bob");
    assert_eq!(notifications(&fx), [(&to_user("alice"), false)]);
    assert_eq!(e.requirement_status(&req, &req.granted_roles), Ok(()));
}

#[test]
fn prod_ssh_team_lead_first_then_oncall() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr_for(&["prod-ssh"], hours(1)), t0());
    let (req, _) = apply(&p, &req, approve("bob"), t0()).unwrap();
    assert_eq!(req.state, State::Pending);
    assert_eq!(
        e.requirement_status(&req, &req.roles),
        Err(sv(&["prod-ssh: an approval from each of [oncall:sre]"]))
    );
    let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
}

#[test]
fn one_person_cannot_fill_both_sets_of_an_all_of_rule() {
    // Variant: dave leads alice's team and is on call.
    let mut p = policy();
    p.directory.teams.get_mut("payments").unwrap().lead = "dave".into();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr_for(&["prod-ssh"], hours(1)), t0());
    assert_eq!(req.requester_team_lead.as_deref(), Some("dave"));
    let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
    assert!(req.reviews[0].matched.contains(&"team_lead".to_string()));
    assert!(req.reviews[0].matched.contains(&"oncall:sre".to_string()));
    assert_eq!(req.state, State::Pending);
    assert_eq!(
        e.requirement_status(&req, &req.roles),
        Err(sv(&[
            "prod-ssh: approvals from distinct people for each of [oncall:sre, team_lead]"
        ]))
    );
    // Dave cannot approve a second time, and nobody else qualifies.
    let m = invalid(apply(&p, &req, approve("dave"), t0() + mins(1)));
    assert!(m.contains("already reviewed"), "{m}");
    forbidden(apply(&p, &req, approve("bob"), t0()));
    forbidden(apply(&p, &req, approve("erin"), t0()));
    forbidden(apply(&p, &req, approve("frank"), t0()));
}

#[test]
fn oncall_membership_is_evaluated_at_review_time() {
    let p = policy();
    // Week 1: erin is not on call and prod-ssh names no role:sre set.
    let req = alice_requests(&p, nr_for(&["prod-ssh"], hours(1)), t0());
    let m = forbidden(apply(&p, &req, approve("erin"), t0()));
    assert!(m.contains("erin is not an eligible reviewer"), "{m}");
    // carol and frank are not eligible either.
    forbidden(apply(&p, &req, approve("carol"), t0()));
    forbidden(apply(&p, &req, review("frank", Verdict::Deny), t0()));

    // Across the shift change at 2026-01-12T09:00Z.
    let created = t("2026-01-12T08:30:00Z");
    let req = alice_requests(&p, nr_for(&["prod-ssh"], hours(1)), created);
    let handover = t("2026-01-12T09:00:00Z");
    assert!(
        Engine::new(&p)
            .decide_review(&req, &actor("dave"), handover - Duration::seconds(1))
            .allowed
    );
    forbidden(apply(&p, &req, approve("dave"), handover));
    let (req, _) = apply(&p, &req, approve("erin"), handover).unwrap();
    assert_eq!(
        req.reviews[0].matched,
        sv(&["role:sre", "user:erin", "oncall:sre"])
    );
    let (req, _) = apply(&p, &req, approve("bob"), handover + mins(1)).unwrap();
    assert_eq!(req.state, State::Active);
}

#[test]
fn dba_needs_any_one_of_sre_or_security_admin() {
    let p = policy();
    for reviewer in ["dave", "erin", "frank"] {
        let req = alice_requests(&p, nr(&["dba"]), t0());
        let (req, fx) = apply(&p, &req, approve(reviewer), t0() + mins(3)).unwrap();
        assert_eq!(req.state, State::Active, "{reviewer}");
        assert_eq!(req.granted_roles, sv(&["dba"]));
        assert_eq!(req.approvers(), sv(&[reviewer]));
        assert_eq!(req.starts_at, Some(t0() + mins(3)));
        assert_eq!(req.expires_at, Some(t0() + mins(3) + hours(2)));
        assert_eq!(
            audits(&fx),
            ["request_reviewed", "request_approved", "grant_activated"]
        );
    }
    // erin in week 1 matches role:sre only.
    let req = active_dba(&p);
    assert_eq!(req.reviews[0].matched, sv(&["role:sre", "user:erin"]));
    // bob and carol are not eligible for dba.
    let req = alice_requests(&p, nr(&["dba"]), t0());
    forbidden(apply(&p, &req, approve("bob"), t0()));
    forbidden(apply(&p, &req, review("carol", Verdict::Deny), t0()));
}

#[test]
fn count_requirement_needs_distinct_approvers() {
    let mut p = policy();
    p.approval[2].require = Requirement::Count {
        count: 2,
        from: vec![
            ReviewerSet::Role("sre".into()),
            ReviewerSet::Role("security-admin".into()),
        ],
    };
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let (req, _) = apply(&p, &req, approve("erin"), t0()).unwrap();
    assert_eq!(req.state, State::Pending);
    assert_eq!(
        e.requirement_status(&req, &req.roles),
        Err(sv(&[
            "dba: 1 more approval(s) from [role:sre, role:security-admin]"
        ]))
    );
    let (req, _) = apply(&p, &req, approve("frank"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
}

#[test]
fn environment_scoped_rules_apply_to_matching_resources() {
    let mut p = policy();
    p.approval.push(ApprovalRule {
        roles: sv(&["prod-ssh"]),
        environment: Some(sel("env", "prod")),
        require: Requirement::AnyOf(vec![ReviewerSet::User("frank".into())]),
        secondary: Vec::new(),
    });
    let e = Engine::new(&p);
    // On db-1 (env=prod) only the environment rule applies: frank alone suffices.
    let new = NewRequest {
        resources: sv(&["db-1"]),
        ..nr(&["prod-ssh"])
    };
    let (req, fx) = create_as(&p, "alice", new, t0()).unwrap();
    assert_eq!(notifications(&fx), [(&to_sets(&["user:frank"]), false)]);
    forbidden(apply(&p, &req, approve("dave"), t0()));
    let (req, _) = apply(&p, &req, approve("frank"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
    // On dev-1 (env=dev) the general rule applies: the grant holds only there.
    let new = NewRequest {
        resources: sv(&["dev-1"]),
        ..nr(&["prod-ssh"])
    };
    let req = alice_requests(&p, new, t0());
    assert_eq!(
        e.reviewer_sets(&req).into_iter().collect::<Vec<_>>(),
        sv(&["oncall:sre", "team_lead"])
    );
    forbidden(apply(&p, &req, approve("frank"), t0()));
    // Naming no resources grants the role everywhere it reaches, db-1 (prod)
    // included, so the production rule applies: the general rule's
    // reviewers cannot let it through.
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    assert_eq!(
        e.reviewer_sets(&req).into_iter().collect::<Vec<_>>(),
        sv(&["user:frank"])
    );
    forbidden(apply(&p, &req, approve("dave"), t0()));
    let (req, _) = apply(&p, &req, approve("frank"), t0()).unwrap();
    assert_eq!(req.state, State::Active);
}

/// A request that named no resources is judged on those its roles reach
/// when it is approved, and holds only there: a resource configured later
/// with the same labels was never judged for it (it once held there too, so
/// a grant self-approved for a canary reached production nodes added
/// afterwards without production's rule).
#[test]
fn a_grant_that_named_no_resources_holds_only_where_it_was_judged() {
    let mut p = policy();
    add_canary(&mut p, Requirement::SelfApprove);
    // Before db-1 was configured, prod-ssh reached the canary alone.
    let mut before = p.clone();
    before.resources.retain(|r| r.name != "db-1");
    let req = alice_requests(&before, nr(&["prod-ssh"]), t0());
    assert_eq!(req.state, State::Active);
    assert_eq!(
        req.judged_on,
        Some(vec![crate::ScopedRole {
            role: "prod-ssh".into(),
            resources: sv(&["canary-1"]),
        }])
    );
    // The record survives the store (and one without it reads as before).
    let doc = serde_json::to_string(&req).unwrap();
    assert_eq!(serde_json::from_str::<AccessRequest>(&doc).unwrap(), req);
    let mut legacy: serde_json::Value = serde_json::from_str(&doc).unwrap();
    legacy.as_object_mut().unwrap().remove("judged_on");
    let legacy: AccessRequest = serde_json::from_value(legacy).unwrap();
    assert_eq!(legacy.judged_on, None);
    // Now db-1 is configured: the grant does not reach it.
    let e = Engine::new(&p);
    let (roles, scoped) = crate::roles_of_grants(sv(&["dev"]), &[req.scope()]);
    let alice = crate::Subject {
        user: "alice",
        roles: &roles,
        scoped: &scoped,
    };
    let node = |n: &str| p.resources.iter().find(|r| r.name == n).unwrap();
    assert!(
        p.roles
            .decide_ssh_login(&alice, node("canary-1"), "root")
            .allowed
    );
    let d = p.roles.decide_ssh_login(&alice, node("db-1"), "root");
    assert!(!d.allowed && d.reason.contains("only on canary-1"), "{d:?}");
    let r = e.risk(&req);
    assert!(
        r.ssh.iter().all(|s| s.ends_with("@canary-1")),
        "{:?}",
        r.ssh
    );
    // It is judged on the canary still (who may acknowledge or review it),
    // not on what prod-ssh reaches now.
    assert_eq!(e.reviewer_sets(&req), std::collections::BTreeSet::new());
    let fresh = alice_requests(&p, nr(&["prod-ssh"]), t0());
    assert_eq!(
        fresh.state,
        State::Pending,
        "a new one is judged on db-1 too"
    );
    // Granted on fewer roles than asked: only the granted ones are recorded.
    let both = alice_requests(&before, nr(&["prod-ssh", "dba"]), t0());
    let (both, _) = apply(
        &before,
        &both,
        scoped_approve("dave", Some(&["prod-ssh"]), None, None),
        t0(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let judged: Vec<&str> = both
        .judged_on
        .iter()
        .flatten()
        .map(|j| j.role.as_str())
        .collect();
    assert_eq!(judged, ["prod-ssh"], "{both:?}");
}

/// A prod node `canary-1` (`tier: canary`), and a rule for prod-ssh on
/// canaries requiring `require`.
fn add_canary(p: &mut Policy, require: Requirement) {
    p.resources.push(Resource {
        kind: ResourceKind::Node,
        name: "canary-1".into(),
        address: "127.0.0.1:22".into(),
        labels: [
            ("env".to_string(), "prod".to_string()),
            ("tier".to_string(), "canary".to_string()),
        ]
        .into(),
    });
    p.approval.push(ApprovalRule {
        roles: sv(&["prod-ssh"]),
        environment: Some(sel("tier", "canary")),
        require,
        secondary: Vec::new(),
    });
}

/// A rule for one environment settles only the resources in it: where a
/// role also reaches others, their own rules still apply. (It once replaced
/// the general rule for the whole request, so a self-approve rule for a
/// canary node let a request naming nothing through, production included.)
#[test]
fn an_environment_rule_does_not_waive_the_rules_of_other_resources() {
    let mut p = policy();
    add_canary(&mut p, Requirement::SelfApprove);
    let e = Engine::new(&p);
    // Scoped to the canary alone: its rule, self-approval.
    let new = NewRequest {
        resources: sv(&["canary-1"]),
        ..nr(&["prod-ssh"])
    };
    assert_eq!(alice_requests(&p, new, t0()).state, State::Active);
    // Naming nothing reaches db-1 too, and naming both names it: db-1's
    // general rule still needs on-call and the team lead.
    for resources in [
        sv(&[]),
        sv(&["canary-1", "db-1"]),
        sv(&["db-1", "canary-1"]),
    ] {
        let new = NewRequest {
            resources: resources.clone(),
            ..nr(&["prod-ssh"])
        };
        let req = alice_requests(&p, new, t0());
        assert_eq!(req.state, State::Pending, "{resources:?}");
        assert_eq!(
            e.reviewer_sets(&req).into_iter().collect::<Vec<_>>(),
            sv(&["oncall:sre", "team_lead"]),
            "{resources:?}"
        );
        forbidden(apply(&p, &req, approve("alice"), t0()));
        let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
        assert_eq!(req.state, State::Pending, "{resources:?}");
        let (req, _) = apply(&p, &req, approve("bob"), t0()).unwrap();
        assert_eq!(req.state, State::Active, "{resources:?}");
    }
}

/// A resource no rule applies to (here db-1, once prod-ssh has no general
/// rule) needs one approval from a reviewer of the role, as a role without
/// rules does: another resource's environment rule, self-approval or a
/// named reviewer, does not waive it.
#[test]
fn a_resource_without_a_rule_is_not_waived_by_another_resources_rule() {
    for canary_rule in [
        Requirement::SelfApprove,
        Requirement::AnyOf(vec![ReviewerSet::User("carol".into())]),
    ] {
        let mut p = policy();
        p.approval[1].roles = sv(&["kube-admin"]);
        add_canary(&mut p, canary_rule.clone());
        let e = Engine::new(&p);
        // The canary alone: its rule.
        let canary = alice_requests(
            &p,
            NewRequest {
                resources: sv(&["canary-1"]),
                ..nr(&["prod-ssh"])
            },
            t0(),
        );
        if canary_rule == Requirement::SelfApprove {
            assert_eq!(canary.state, State::Active);
        } else {
            let (req, _) = apply(&p, &canary, approve("carol"), t0()).unwrap();
            assert_eq!(req.state, State::Active);
        }
        for resources in [sv(&[]), sv(&["canary-1", "db-1"]), sv(&["db-1"])] {
            let new = NewRequest {
                resources: resources.clone(),
                ..nr(&["prod-ssh"])
            };
            let req = alice_requests(&p, new, t0());
            assert_eq!(req.state, State::Pending, "{canary_rule:?} {resources:?}");
            let sets = e.reviewer_sets(&req);
            assert!(
                sets.contains("role:sre") && sets.contains("role:security-admin"),
                "{sets:?}"
            );
            forbidden(apply(&p, &req, approve("alice"), t0()));
            let mut req = req;
            if canary_rule != Requirement::SelfApprove && resources != sv(&["db-1"]) {
                // The canary's reviewer alone does not open db-1.
                req = apply(&p, &req, approve("carol"), t0()).unwrap().0;
                assert_eq!(req.state, State::Pending, "{resources:?}");
            }
            let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
            assert_eq!(req.state, State::Active, "{canary_rule:?} {resources:?}");
        }
    }
}

#[test]
fn risk_of_a_scoped_request_covers_only_its_resources() {
    let p = policy();
    let e = Engine::new(&p);
    let scoped = NewRequest {
        resources: sv(&["dev-1"]),
        ..nr(&["prod-ssh"])
    };
    // prod-ssh's labels select prod nodes only: scoped to dev-1 it grants nothing new.
    let r = e.risk(&alice_requests(&p, scoped, t0()));
    assert!(r.ssh.is_empty(), "{:?}", r.ssh);
    let r = e.risk(&alice_requests(&p, nr(&["prod-ssh"]), t0()));
    assert!(r.ssh.iter().any(|s| s.ends_with("@db-1")), "{:?}", r.ssh);
}

#[test]
fn eligible_denial_ends_the_request_without_ending_sessions() {
    let p = policy();
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let ev = Event::Review {
        by: actor("frank"),
        verdict: Verdict::Deny,
        reason: "use the read replica".into(),
        roles: None,
        duration: None,
        start_at: None,
    };
    let (req, fx) = apply(&p, &req, ev, t0() + mins(2)).unwrap();
    assert_eq!(req.state, State::Denied);
    assert_eq!(req.ended_at, Some(t0() + mins(2)));
    assert_eq!(
        req.end_reason.as_deref(),
        Some("denied by frank: use the read replica")
    );
    assert!(req.granted_roles.is_empty());
    assert_eq!((req.starts_at, req.expires_at), (None, None));
    assert_eq!(req.reviews[0].verdict, Verdict::Deny);
    assert_eq!(audits(&fx), ["request_denied"]);
    assert_eq!(audit_actor(&fx, "request_denied"), "frank");
    assert_eq!(notifications(&fx), [(&to_user("alice"), false)]);
    assert!(end_sessions(&fx).is_empty());
    assert_eq!(Engine::new(&p).next_deadline(&req), None);
    // A single eligible denial is enough even on a two-person rule.
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    let (req, _) = apply(&p, &req, review("bob", Verdict::Deny), t0()).unwrap();
    assert_eq!(req.state, State::Denied);
}

#[test]
fn reviews_need_a_reason() {
    let p = policy();
    let req = alice_requests(&p, nr(&["dba"]), t0());
    for reason in ["", "  "] {
        let ev = Event::Review {
            by: actor("erin"),
            verdict: Verdict::Approve,
            reason: reason.into(),
            roles: None,
            duration: None,
            start_at: None,
        };
        assert!(invalid(apply(&p, &req, ev, t0())).contains("needs a reason"));
    }
}

/// What one person writes for others to read cannot carry terminal escape
/// sequences or bidirectional controls, wherever it is given.
#[test]
fn reasons_and_tickets_are_printable_text() {
    let p = policy();
    let with = |reason: &str, ticket: Option<&str>| NewRequest {
        reason: reason.into(),
        ticket_url: ticket.map(Into::into),
        ..nr(&["dba"])
    };
    let m = invalid(create_as(
        &p,
        "alice",
        with("INC-1\u{1b}[2A\rRoles: readonly", None),
        t0(),
    ));
    assert!(m.contains("U+001B"), "{m}");
    let m = invalid(create_as(
        &p,
        "alice",
        with("INC-1 \u{202e}evil", None),
        t0(),
    ));
    assert!(m.contains("U+202E"), "{m}");
    let m = invalid(create_as(
        &p,
        "alice",
        with("INC-1", Some("https://t.example/1\u{9b}2J")),
        t0(),
    ));
    assert!(m.contains("ticket URL"), "{m}");
    let m = invalid(create_as(
        &p,
        "alice",
        with("INC-1", Some("https://t.example/1 x")),
        t0(),
    ));
    assert!(m.contains("without spaces"), "{m}");
    // Newlines and tabs are text.
    let req = alice_requests(
        &p,
        with("INC-1\n\tsee the ticket", Some("https://t.example/1")),
        t0(),
    );
    let ev = Event::Review {
        by: actor("erin"),
        verdict: Verdict::Approve,
        reason: "ok\u{7}".into(),
        roles: None,
        duration: None,
        start_at: None,
    };
    assert!(invalid(apply(&p, &req, ev, t0())).contains("U+0007"));
    let (active, _) = apply(&p, &req, approve("erin"), t0()).unwrap();
    let m = invalid(apply(&p, &active, revoke("frank", "done\u{85}"), t0()));
    assert!(m.contains("U+0085"), "{m}");
}

/// A reason is bounded wherever it is given, and a request's reason with
/// its updates too (the request is read and written whole at each step).
#[test]
fn reasons_are_bounded() {
    let p = policy();
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let long = "x".repeat(MAX_REASON_LEN + 1);
    let ev = Event::Review {
        by: actor("erin"),
        verdict: Verdict::Approve,
        reason: long.clone(),
        roles: None,
        duration: None,
        start_at: None,
    };
    assert!(invalid(apply(&p, &req, ev, t0())).contains("longer than"));
    let (active, _) = apply(&p, &req, approve("erin"), t0()).unwrap();
    assert!(invalid(apply(&p, &active, revoke("frank", &long), t0())).contains("longer than"));
    // Ask, answer, ask again: the answers add up to a bound.
    let ask = review("dave", Verdict::AskInfo);
    let answer = Event::Update {
        by: "alice".into(),
        reason: "y".repeat(MAX_REASON_LEN),
    };
    let mut req = req;
    let mut answered = 0;
    loop {
        let (asked, _) = apply(&p, &req, ask.clone(), t0()).unwrap();
        match apply(&p, &asked, answer.clone(), t0()) {
            Ok((next, _)) => {
                assert!(next.reason.len() <= MAX_REQUEST_REASON_LEN);
                req = next;
                answered += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("create a new request"), "{e}");
                break;
            }
        }
        assert!(answered < 20, "the updates never stopped");
    }
    assert!(answered >= 5, "{answered}");
}

#[test]
fn requesters_never_review_their_own_request() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["dba"]), t0());
    for verdict in [Verdict::Approve, Verdict::Deny, Verdict::AskInfo] {
        let m = forbidden(apply(&p, &req, review("alice", verdict), t0()));
        assert!(m.contains("cannot review their own"), "{m}");
    }
    // Not even if the requester's actor carries reviewer roles.
    let mighty = Actor {
        name: "alice".into(),
        roles: sv(&["sre", "security-admin"]),
    };
    assert!(!e.decide_review(&req, &mighty, t0()).allowed);
    assert!(!e.is_reviewable_by(&req, &mighty, t0()));
    let ev = Event::Review {
        by: mighty,
        verdict: Verdict::Approve,
        reason: "me".into(),
        roles: None,
        duration: None,
        start_at: None,
    };
    forbidden(apply(&p, &req, ev, t0()));
    // requirement_status ignores approvals recorded under the requester's name.
    let mut forged = req.clone();
    forged.reviews.push(crate::Review {
        reviewer: "alice".into(),
        verdict: Verdict::Approve,
        reason: "forged".into(),
        at: t0(),
        matched: sv(&["role:sre", "role:security-admin"]),
        roles: None,
        duration_secs: None,
        start_at: None,
    });
    assert!(e.requirement_status(&forged, &forged.roles).is_err());
}

#[test]
fn a_reviewer_reviews_once() {
    let p = policy();
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
    for verdict in [Verdict::Approve, Verdict::Deny, Verdict::AskInfo] {
        let m = invalid(apply(&p, &req, review("dave", verdict), t0() + mins(1)));
        assert!(m.contains("dave has already reviewed"), "{m}");
    }
}

#[test]
fn ask_info_then_update_reopens_the_request() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    let (req, fx) = apply(&p, &req, review("dave", Verdict::AskInfo), t0() + mins(1)).unwrap();
    assert_eq!(req.state, State::NeedsInfo);
    assert_eq!(audits(&fx), ["request_needs_info"]);
    assert_eq!(notifications(&fx), [(&to_user("alice"), false)]);
    assert!(req.granted_roles.is_empty());

    // No approval while waiting for the requester, and no second
    // question (each would grow the request without bound).
    assert_eq!(
        illegal(apply(&p, &req, approve("bob"), t0() + mins(2))),
        "needs-info"
    );
    for asker in ["dave", "bob"] {
        assert_eq!(
            illegal(apply(
                &p,
                &req,
                review(asker, Verdict::AskInfo),
                t0() + mins(2)
            )),
            "needs-info"
        );
    }
    // Only the requester updates, with a reason.
    let upd = |by: &str, reason: &str| Event::Update {
        by: by.into(),
        reason: reason.into(),
    };
    forbidden(apply(&p, &req, upd("bob", "x"), t0()));
    invalid(apply(&p, &req, upd("alice", "  "), t0()));

    let (req, fx) = apply(&p, &req, upd("alice", " it is INC-42 "), t0() + mins(3)).unwrap();
    assert_eq!(req.state, State::Pending);
    assert_eq!(
        req.reason,
        "INC-42: fix replication lag\n[update] it is INC-42"
    );
    assert_eq!(req.updated_at, t0() + mins(3));
    assert_eq!(audits(&fx), ["request_updated"]);
    assert_eq!(
        notifications(&fx),
        [(&to_sets(&["oncall:sre", "team_lead"]), false)]
    );
    // Updating a pending request is illegal.
    assert_eq!(
        illegal(apply(&p, &req, upd("alice", "again"), t0())),
        "pending"
    );

    // The reviewer who asked may now approve (and still sees it as reviewable).
    assert!(e.is_reviewable_by(&req, &actor("dave"), t0() + mins(4)));
    let (req, _) = apply(&p, &req, approve("dave"), t0() + mins(4)).unwrap();
    assert!(!e.is_reviewable_by(&req, &actor("dave"), t0() + mins(4)));
    let (req, _) = apply(&p, &req, approve("bob"), t0() + mins(5)).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.approvers(), sv(&["dave", "bob"]));
}

#[test]
fn needs_info_can_still_be_denied() {
    let p = policy();
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let (req, _) = apply(&p, &req, review("erin", Verdict::AskInfo), t0()).unwrap();
    let (req, _) = apply(&p, &req, review("frank", Verdict::Deny), t0()).unwrap();
    assert_eq!(req.state, State::Denied);
}

#[test]
fn reviewable_listing() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    let visible = |req: &AccessRequest| -> Vec<&str> {
        ["alice", "bob", "carol", "dave", "erin", "frank"]
            .into_iter()
            .filter(|u| e.is_reviewable_by(req, &actor(u), t0()))
            .collect()
    };
    assert_eq!(visible(&req), ["bob", "dave"]);
    let (req, _) = apply(&p, &req, approve("dave"), t0()).unwrap();
    assert_eq!(visible(&req), ["bob"]);
    let (req, _) = apply(&p, &req, approve("bob"), t0()).unwrap();
    assert!(visible(&req).is_empty());
    let req = alice_requests(&p, nr(&["dba"]), t0());
    assert_eq!(visible(&req), ["dave", "erin", "frank"]);
}

// ---------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------

#[test]
fn cancel_by_the_requester() {
    let p = policy();
    let cancel = |by: &str| Event::Cancel { by: by.into() };
    let req = alice_requests(&p, nr(&["dba"]), t0());
    forbidden(apply(&p, &req, cancel("bob"), t0()));
    let (done, fx) = apply(&p, &req, cancel("alice"), t0() + mins(1)).unwrap();
    assert_eq!(done.state, State::Cancelled);
    assert_eq!(done.ended_at, Some(t0() + mins(1)));
    assert_eq!(
        done.end_reason.as_deref(),
        Some("cancelled by the requester")
    );
    assert_eq!(audits(&fx), ["request_cancelled"]);
    assert!(end_sessions(&fx).is_empty());
    assert_eq!(
        illegal(apply(&p, &done, cancel("alice"), t0())),
        "cancelled"
    );

    // From needs-info.
    let (ni, _) = apply(&p, &req, review("erin", Verdict::AskInfo), t0()).unwrap();
    assert_eq!(
        apply(&p, &ni, cancel("alice"), t0()).unwrap().0.state,
        State::Cancelled
    );
    // From approved (scheduled).
    let ev = scoped_approve("erin", None, None, Some(t0() + hours(1)));
    let (sched, _) = apply(&p, &req, ev, t0()).unwrap();
    assert_eq!(sched.state, State::Approved);
    assert_eq!(
        apply(&p, &sched, cancel("alice"), t0()).unwrap().0.state,
        State::Cancelled
    );
    // Not once active.
    let active = active_dba(&p);
    assert_eq!(illegal(apply(&p, &active, cancel("alice"), t0())), "active");
}

// ---------------------------------------------------------------------------
// Scope reduction
// ---------------------------------------------------------------------------

#[test]
fn approval_with_smaller_scope_later_start_and_shorter_duration() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr_for(&["prod-ssh", "dba"], hours(2)), t0());
    let start = t0() + hours(2);
    let ev = scoped_approve("dave", Some(&["prod-ssh"]), Some(hours(1)), Some(start));
    let (req, _) = apply(&p, &req, ev, t0() + mins(1)).unwrap();
    assert_eq!(req.state, State::Pending);
    let r = &req.reviews[0];
    assert_eq!(r.roles, Some(sv(&["prod-ssh"])));
    assert_eq!(r.duration_secs, Some(3600));
    assert_eq!(r.start_at, Some(start));

    let (req, fx) = apply(&p, &req, approve("bob"), t0() + mins(2)).unwrap();
    assert_eq!(req.state, State::Approved);
    assert_eq!(req.granted_roles, sv(&["prod-ssh"]));
    assert_eq!(req.starts_at, Some(start));
    assert_eq!(req.expires_at, Some(start + hours(1)));
    assert_eq!(req.approved_at, Some(t0() + mins(2)));
    assert_eq!(
        audits(&fx),
        ["request_reviewed", "request_approved", "grant_scheduled"]
    );
    assert_eq!(notifications(&fx), [(&to_user("alice"), false)]);
    assert!(!req.grants_at(t0() + mins(2)));
    assert!(!req.grants_at(start));
    assert_eq!(e.next_deadline(&req), Some(start));

    // Before the start nothing happens.
    let (same, fx) = apply(&p, &req, Event::Tick, t0() + hours(1)).unwrap();
    assert_eq!(same, req);
    assert!(fx.is_empty());
    // At the start it activates.
    let (req, fx) = apply(&p, &req, Event::Tick, start).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(audits(&fx), ["grant_activated"]);
    assert!(end_sessions(&fx).is_empty());
    assert_eq!(req.updated_at, start);
    assert!(req.grants_at(start));
    assert_eq!(e.next_deadline(&req), Some(start + hours(1)));
    // At its end it expires.
    let (req, fx) = apply(&p, &req, Event::Tick, start + hours(1)).unwrap();
    assert_eq!(req.state, State::Expired);
    assert_eq!(end_sessions(&fx).len(), 1);
    assert_eq!(
        ended_by(&fx),
        ["alice"],
        "as grant_expired names the holder"
    );
    assert_eq!(audits(&fx), ["grant_expired"]);
}

#[test]
fn a_late_tick_on_a_scheduled_grant_activates_and_expires_it() {
    let p = policy();
    let req = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    let start = t0() + hours(1);
    let (req, _) = apply(
        &p,
        &req,
        scoped_approve("erin", None, None, Some(start)),
        t0(),
    )
    .unwrap();
    assert_eq!(req.state, State::Approved);
    let (req, fx) = apply(&p, &req, Event::Tick, start + hours(5)).unwrap();
    assert_eq!(req.state, State::Expired);
    assert_eq!(audits(&fx), ["grant_activated", "grant_expired"]);
    assert_eq!(end_sessions(&fx).len(), 1);
    assert_eq!(req.end_reason.as_deref(), Some("grant window ended"));
}

#[test]
fn a_subset_approval_meeting_its_own_rule_activates_only_that_role() {
    let p = policy();
    let req = alice_requests(&p, nr_for(&["prod-ssh", "dba"], hours(2)), t0());
    // erin is eligible through dba (role:sre) and approves only dba.
    let (req, _) = apply(
        &p,
        &req,
        scoped_approve("erin", Some(&["dba"]), None, None),
        t0(),
    )
    .unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.granted_roles, sv(&["dba"]));
    assert_eq!(req.expires_at, Some(t0() + hours(2)));
    // Without a subset, erin's approval does not cover prod-ssh.
    let req = alice_requests(&p, nr_for(&["prod-ssh", "dba"], hours(2)), t0());
    let (req, _) = apply(&p, &req, approve("erin"), t0()).unwrap();
    assert_eq!(req.state, State::Pending);
    let missing = Engine::new(&p)
        .requirement_status(&req, &req.roles)
        .unwrap_err();
    assert_eq!(
        missing,
        sv(&["prod-ssh: an approval from each of [oncall:sre, team_lead]"])
    );
}

#[test]
fn scope_is_the_intersection_of_all_approvals() {
    let p = policy();
    let req = alice_requests(&p, nr_for(&["prod-ssh", "dba"], hours(2)), t0());
    let (req, _) = apply(
        &p,
        &req,
        scoped_approve("dave", Some(&["prod-ssh"]), None, None),
        t0(),
    )
    .unwrap();
    // frank narrows to dba only: no overlap with dave's scope.
    let m = invalid(apply(
        &p,
        &req,
        scoped_approve("frank", Some(&["dba"]), None, None),
        t0(),
    ));
    assert!(m.contains("do not overlap"), "{m}");
    // The shortest duration and latest start win.
    let (req, _) = apply(
        &p,
        &req,
        scoped_approve("bob", None, Some(mins(30)), Some(t0() + mins(10))),
        t0(),
    )
    .unwrap();
    assert_eq!(req.state, State::Approved);
    assert_eq!(req.granted_roles, sv(&["prod-ssh"]));
    assert_eq!(req.starts_at, Some(t0() + mins(10)));
    assert_eq!(req.expires_at, Some(t0() + mins(40)));
}

#[test]
fn scope_reduction_is_validated() {
    let p = policy();
    let req = alice_requests(&p, nr_for(&["prod-ssh", "dba"], hours(2)), t0());
    let bad: Vec<(Event, &str)> = vec![
        (
            scoped_approve("dave", Some(&[]), None, None),
            "non-empty subset",
        ),
        (
            scoped_approve("dave", Some(&["kube-admin"]), None, None),
            "non-empty subset",
        ),
        (
            scoped_approve("dave", Some(&["dba", "dev-admin"]), None, None),
            "non-empty subset",
        ),
        (
            scoped_approve("dave", None, Some(hours(3)), None),
            "only shorten",
        ),
        (
            scoped_approve("dave", None, Some(Duration::zero()), None),
            "only shorten",
        ),
        (
            scoped_approve("dave", None, Some(-hours(1)), None),
            "only shorten",
        ),
        (
            scoped_approve("dave", None, None, Some(t0())),
            "in the future",
        ),
        (
            scoped_approve("dave", None, None, Some(t0() - mins(1))),
            "in the future",
        ),
        (
            scoped_approve("dave", None, None, Some(t0() + Duration::days(31))),
            "in the future",
        ),
    ];
    for (ev, needle) in bad {
        let m = invalid(apply(&p, &req, ev.clone(), t0()));
        assert!(m.contains(needle), "{ev:?}: {m}");
    }
    // Where starts are not scheduled, a reviewer cannot schedule one.
    let mut no_sched = policy();
    no_sched.requests.allow_scheduled_start = false;
    let later = scoped_approve("dave", None, None, Some(t0() + hours(1)));
    let m = invalid(apply(&no_sched, &req, later, t0()));
    assert!(m.contains("scheduled start is not allowed"), "{m}");
    // Exactly the requested duration is fine.
    let ok = apply(
        &p,
        &req,
        scoped_approve("dave", None, Some(hours(2)), None),
        t0(),
    );
    assert_eq!(ok.unwrap().0.state, State::Pending);
}

#[test]
fn reviewers_cannot_shorten_below_the_minimum_duration() {
    // A sub-second --duration used to be stored as 0s and produce a grant
    // whose window is empty; anything below min_duration is now refused.
    let p = policy();
    let req = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    for d in [
        Duration::milliseconds(500),
        Duration::seconds(1),
        Duration::seconds(59),
    ] {
        let m = invalid(apply(
            &p,
            &req,
            scoped_approve("erin", None, Some(d), None),
            t0(),
        ));
        assert!(m.contains("only shorten"), "{d:?}: {m}");
    }
    let (req, _) = apply(
        &p,
        &req,
        scoped_approve("erin", None, Some(mins(1)), None),
        t0(),
    )
    .unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.expires_at, Some(t0() + mins(1)));
}

// ---------------------------------------------------------------------------
// Tick
// ---------------------------------------------------------------------------

#[test]
fn pending_escalates_to_secondary_then_expires() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["dba"]), t0());
    assert_eq!(e.next_deadline(&req), Some(t0() + mins(30)));

    let (same, fx) = apply(
        &p,
        &req,
        Event::Tick,
        t0() + mins(30) - Duration::seconds(1),
    )
    .unwrap();
    assert_eq!(same, req);
    assert!(fx.is_empty());

    let (req, fx) = apply(&p, &req, Event::Tick, t0() + mins(30)).unwrap();
    assert_eq!(req.state, State::Pending);
    assert!(req.escalated);
    assert_eq!(req.updated_at, t0() + mins(30));
    assert_eq!(audits(&fx), ["request_escalated"]);
    assert!(fx.contains(&Effect::Audit {
        kind: "request_escalated".into(),
        actor: "alice".into(),
        detail: "notifying [role:security-admin]".into(),
    }));
    assert_eq!(
        notifications(&fx),
        [(&to_sets(&["role:security-admin"]), false)]
    );
    assert_eq!(e.next_deadline(&req), Some(t0() + hours(1)));

    // Escalation happens once.
    let (same, fx) = apply(&p, &req, Event::Tick, t0() + mins(45)).unwrap();
    assert_eq!(same, req);
    assert!(fx.is_empty());

    let (req, fx) = apply(&p, &req, Event::Tick, t0() + hours(1)).unwrap();
    assert_eq!(req.state, State::Expired);
    assert_eq!(req.ended_at, Some(t0() + hours(1)));
    assert_eq!(req.end_reason.as_deref(), Some("nobody answered in time"));
    assert_eq!(audits(&fx), ["request_expired"]);
    assert_eq!(notifications(&fx), [(&to_user("alice"), false)]);
    assert!(end_sessions(&fx).is_empty());
    assert_eq!(e.next_deadline(&req), None);
}

/// Secondary reviewers are asked once a request escalates, and then their
/// approval counts: in place of any one approver the rule names, never
/// fewer approvals or fewer distinct people than it needs.
#[test]
fn secondary_reviewers_approve_once_escalated() {
    let mut p = policy();
    // prod-ssh: on-call and team lead (two people); dba: sre or security.
    p.approval[1].secondary = vec![ReviewerSet::User("carol".into())];
    p.approval[2].secondary = vec![ReviewerSet::User("carol".into())];
    for (role, approvers) in [
        ("prod-ssh", &["carol", "dave"][..]),
        ("dba", &["carol"][..]),
    ] {
        let req = alice_requests(&p, nr(&[role]), t0());
        // Not yet asked: carol may not review.
        forbidden(apply(&p, &req, approve("carol"), t0() + mins(1)));
        let (mut req, _) = apply(&p, &req, Event::Tick, t0() + mins(30)).unwrap();
        assert!(req.escalated);
        for (i, who) in approvers.iter().enumerate() {
            req = apply(&p, &req, approve(who), t0() + mins(31)).unwrap().0;
            let last = i + 1 == approvers.len();
            assert_eq!(
                req.state,
                if last { State::Active } else { State::Pending },
                "{role} after {who}"
            );
        }
    }
    // Two stand-ins never fill two slots: with frank secondary too, carol
    // and frank together do not meet on-call + team lead; dave does.
    let mut p2 = p.clone();
    p2.approval[1]
        .secondary
        .push(ReviewerSet::User("frank".into()));
    let req = alice_requests(&p2, nr(&["prod-ssh"]), t0());
    let (mut req, _) = apply(&p2, &req, Event::Tick, t0() + mins(30)).unwrap();
    for who in ["carol", "frank"] {
        req = apply(&p2, &req, approve(who), t0() + mins(31)).unwrap().0;
        assert_eq!(req.state, State::Pending, "after {who}");
    }
    let (req, _) = apply(&p2, &req, approve("dave"), t0() + mins(32)).unwrap();
    assert_eq!(req.state, State::Active);
    // Escalated, carol can deny too.
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let (req, _) = apply(&p, &req, Event::Tick, t0() + mins(30)).unwrap();
    let (req, _) = apply(&p, &req, review("carol", Verdict::Deny), t0() + mins(31)).unwrap();
    assert_eq!(req.state, State::Denied);
}

#[test]
fn escalation_without_secondary_only_audits_and_high_urgency_is_urgent() {
    let p = policy();
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    let (req, fx) = apply(&p, &req, Event::Tick, t0() + mins(31)).unwrap();
    assert!(req.escalated);
    assert_eq!(audits(&fx), ["request_escalated"]);
    assert!(notifications(&fx).is_empty());

    let new = NewRequest {
        urgency: Urgency::High,
        ..nr(&["dba"])
    };
    let req = alice_requests(&p, new, t0());
    let (_, fx) = apply(&p, &req, Event::Tick, t0() + mins(31)).unwrap();
    assert_eq!(
        notifications(&fx),
        [(&to_sets(&["role:security-admin"]), true)]
    );
}

#[test]
fn a_late_first_tick_expires_without_escalating_and_needs_info_expires_too() {
    let p = policy();
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let (done, fx) = apply(&p, &req, Event::Tick, t0() + hours(3)).unwrap();
    assert_eq!(done.state, State::Expired);
    assert!(!done.escalated);
    assert_eq!(audits(&fx), ["request_expired"]);

    let (ni, _) = apply(&p, &req, review("erin", Verdict::AskInfo), t0()).unwrap();
    assert_eq!(Engine::new(&p).next_deadline(&ni), Some(t0() + mins(30)));
    let (done, _) = apply(&p, &ni, Event::Tick, t0() + hours(1)).unwrap();
    assert_eq!(done.state, State::Expired);
}

#[test]
fn active_grant_expires_at_its_end_with_end_sessions() {
    let p = policy();
    let req = active_dba(&p);
    let end = t0() + hours(2);
    assert_eq!(req.expires_at, Some(end));
    let (same, fx) = apply(&p, &req, Event::Tick, end - Duration::seconds(1)).unwrap();
    assert_eq!(same, req);
    assert!(fx.is_empty());
    let (req, fx) = apply(&p, &req, Event::Tick, end).unwrap();
    assert_eq!(req.state, State::Expired);
    assert_eq!(req.ended_at, Some(end));
    assert_eq!(req.end_reason.as_deref(), Some("grant window ended"));
    assert_eq!(
        end_sessions(&fx),
        ["access request r1 expired: grant window ended"]
    );
    assert_eq!(audits(&fx), ["grant_expired"]);
    assert!(!req.grants_at(end - Duration::seconds(1)));
}

#[test]
fn ticks_on_terminal_requests_do_nothing() {
    let p = policy();
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let (denied, _) = apply(&p, &req, review("frank", Verdict::Deny), t0()).unwrap();
    let (same, fx) = apply(&p, &denied, Event::Tick, t0() + Duration::days(3)).unwrap();
    assert_eq!(same, denied);
    assert!(fx.is_empty());
}

// ---------------------------------------------------------------------------
// Drop, revoke, extend
// ---------------------------------------------------------------------------

#[test]
fn drop_by_the_holder() {
    let p = policy();
    let drop = |by: &str| Event::Drop { by: by.into() };
    let req = active_dba(&p);
    forbidden(apply(&p, &req, drop("bob"), t0()));
    forbidden(apply(&p, &req, drop("frank"), t0()));
    let (done, fx) = apply(&p, &req, drop("alice"), t0() + mins(20)).unwrap();
    assert_eq!(done.state, State::Expired);
    assert_eq!(done.ended_at, Some(t0() + mins(20)));
    assert_eq!(done.end_reason.as_deref(), Some("dropped by its holder"));
    assert_eq!(
        end_sessions(&fx),
        ["access request r1 expired: dropped by its holder"]
    );
    assert_eq!(ended_by(&fx), ["alice"]);
    assert_eq!(audits(&fx), ["grant_dropped"]);
    assert!(!done.grants_at(t0() + mins(21)));
    // A pending request cannot be dropped.
    let pending = alice_requests(&p, nr(&["dba"]), t0());
    assert_eq!(illegal(apply(&p, &pending, drop("alice"), t0())), "pending");
    // A scheduled grant can.
    let sched = scheduled(&p, &pending);
    assert_eq!(
        apply(&p, &sched, drop("alice"), t0()).unwrap().0.state,
        State::Expired
    );
}

#[test]
fn revoke_by_a_revoker() {
    let p = policy();
    let req = active_dba(&p);
    let m = forbidden(apply(&p, &req, revoke("alice", "mine"), t0()));
    assert!(m.contains("may not revoke"), "{m}");
    forbidden(apply(&p, &req, revoke("dave", "x"), t0()));
    invalid(apply(&p, &req, revoke("frank", "  "), t0()));

    let (done, fx) = apply(
        &p,
        &req,
        revoke("frank", "suspicious queries"),
        t0() + mins(7),
    )
    .unwrap();
    assert_eq!(done.state, State::Revoked);
    assert_eq!(done.revoked_by.as_deref(), Some("frank"));
    assert_eq!(done.revoke_reason.as_deref(), Some("suspicious queries"));
    assert_eq!(done.ended_at, Some(t0() + mins(7)));
    assert_eq!(
        done.end_reason.as_deref(),
        Some("revoked by frank: suspicious queries")
    );
    assert_eq!(end_sessions(&fx).len(), 1);
    assert!(end_sessions(&fx)[0].contains("revoked"));
    assert_eq!(ended_by(&fx), ["frank"], "the revoker ended it");
    assert_eq!(audits(&fx), ["grant_revoked"]);
    assert_eq!(audit_actor(&fx, "grant_revoked"), "frank");
    assert_eq!(notifications(&fx), [(&to_user("alice"), true)]);
    assert!(!done.grants_at(t0() + mins(8)));
    assert_eq!(
        illegal(apply(&p, &done, revoke("frank", "again"), t0())),
        "revoked"
    );

    // Pending requests are denied, not revoked; scheduled grants can be revoked.
    let pending = alice_requests(&p, nr(&["dba"]), t0());
    assert_eq!(
        illegal(apply(&p, &pending, revoke("frank", "x"), t0())),
        "pending"
    );
    let sched = scheduled(&p, &pending);
    let (done, fx) = apply(&p, &sched, revoke("frank", "not today"), t0()).unwrap();
    assert_eq!(done.state, State::Revoked);
    assert_eq!(end_sessions(&fx).len(), 1);
}

#[test]
fn a_revoke_after_the_end_ends_draining_sessions() {
    let p = policy();
    let req = active_dba(&p);
    let end = req.expires_at.unwrap();
    // Expired (the tick runs first) or dropped: sessions may be draining
    // under `disconnect_on_expiry: false`, and a revoke ends them.
    let dropped = apply(&p, &req, Event::Drop { by: "alice".into() }, t0())
        .unwrap()
        .0;
    for (ended, at) in [(&req, end + mins(3)), (&dropped, t0() + mins(3))] {
        assert_eq!(ended.session_end(at, false), None);
        forbidden(apply(&p, ended, revoke("alice", "mine"), at));
        invalid(apply(&p, ended, revoke("frank", " "), at));
        let (done, fx) = apply(&p, ended, revoke("frank", "leaked laptop"), at).unwrap();
        // It stays as it ended, with the revoke on it.
        assert_eq!(done.state, State::Expired);
        assert!(
            done.ended_at.is_some_and(|t| t <= at),
            "{:?}",
            done.ended_at
        );
        assert_ne!(done.end_reason, None);
        assert_eq!(done.revoked_by.as_deref(), Some("frank"));
        assert_eq!(done.revoke_reason.as_deref(), Some("leaked laptop"));
        assert_eq!(done.updated_at, at);
        // (After the expiry's own, when the tick ends it first.)
        let ends = end_sessions(&fx);
        assert!(ends.last().is_some_and(|e| e.contains("revoked")), "{fx:?}");
        assert_eq!(ended_by(&fx).last(), Some(&"frank"));
        assert_eq!(audit_actor(&fx, "grant_revoked"), "frank");
        assert_eq!(notifications(&fx).last(), Some(&(&to_user("alice"), true)));
        assert!(!done.grants_at(at));
        for finish in [false, true] {
            assert_eq!(
                done.session_end(at, finish).unwrap(),
                "access request r1 was revoked by frank: leaked laptop"
            );
        }
        match apply(&p, &done, revoke("frank", "again"), at) {
            Err(RequestError::IllegalTransition { what, .. }) => {
                assert!(what.contains("already revoked"), "{what}")
            }
            other => panic!("a second revoke: {other:?}"),
        }
    }
    // A scheduled grant dropped before it started never held a session.
    let pending = alice_requests(&p, nr(&["dba"]), t0());
    let sched = scheduled(&p, &pending);
    let (unstarted, _) = apply(&p, &sched, Event::Drop { by: "alice".into() }, t0()).unwrap();
    assert_eq!(
        illegal(apply(&p, &unstarted, revoke("frank", "x"), t0() + mins(1))),
        "expired"
    );
    // A request that expired unanswered granted nothing: nothing to revoke.
    let pending = alice_requests(&p, nr(&["dba"]), t0());
    let (unanswered, _) = apply(&p, &pending, Event::Tick, t0() + Duration::days(30)).unwrap();
    assert_eq!(unanswered.state, State::Expired);
    assert_eq!(
        illegal(apply(
            &p,
            &unanswered,
            revoke("frank", "x"),
            t0() + Duration::days(30)
        )),
        "expired"
    );
}

#[test]
fn extend_within_limits_once() {
    let p = policy();
    let req = active_prod_ssh(&p, hours(2));
    assert_eq!(req.expires_at, Some(t0() + hours(2)));
    forbidden(apply(&p, &req, extend("bob", hours(1)), t0()));
    invalid(apply(&p, &req, extend("alice", Duration::zero()), t0()));
    invalid(apply(&p, &req, extend("alice", -mins(5)), t0()));

    let (req, fx) = apply(&p, &req, extend("alice", hours(1)), t0() + hours(1)).unwrap();
    assert_eq!(req.state, State::Active);
    assert_eq!(req.expires_at, Some(t0() + hours(3)));
    assert_eq!(req.starts_at, Some(t0()));
    assert_eq!(req.extensions, 1);
    assert_eq!(req.updated_at, t0() + hours(1));
    assert_eq!(audits(&fx), ["grant_extended"]);
    assert!(fx.contains(&Effect::Audit {
        kind: "grant_extended".into(),
        actor: "alice".into(),
        detail: "until 2026-01-06T13:00:00+00:00".into(),
    }));
    // Nobody reviews an extension: those who approved the grant are told.
    assert!(fx.contains(&Effect::Notify {
        recipients: Recipients::Sets(sv(&["user:dave", "user:bob"])),
        subject: format!(
            "alice extended grant {} [prod-ssh] by 1h (until 2026-01-06T13:00:00+00:00)",
            req.id
        ),
        urgent: false,
    }));
    assert_eq!(Engine::new(&p).next_deadline(&req), Some(t0() + hours(3)));

    let m = forbidden(apply(&p, &req, extend("alice", mins(30)), t0() + hours(2)));
    assert!(m.contains("used its 1 extension"), "{m}");
}

#[test]
fn extend_cannot_exceed_the_role_maximum() {
    let p = policy();
    // prod-ssh: 4h. From 3h, +2h is too much, +1h reaches exactly 4h.
    let req = active_prod_ssh(&p, hours(3));
    let m = invalid(apply(&p, &req, extend("alice", hours(2)), t0()));
    assert!(m.contains("at most 4h in total"), "{m}");
    let m = invalid(apply(
        &p,
        &req,
        extend("alice", hours(1) + Duration::seconds(1)),
        t0(),
    ));
    assert!(m.contains("at most 4h"), "{m}");
    let (ok, _) = apply(&p, &req, extend("alice", hours(1)), t0()).unwrap();
    assert_eq!(ok.expires_at, Some(t0() + hours(4)));
    // dba at its 2h maximum cannot be extended at all.
    let dba = active_dba(&p);
    let m = invalid(apply(&p, &dba, extend("alice", mins(1)), t0()));
    assert!(m.contains("at most 2h"), "{m}");
    assert_eq!(dba.extensions, 0);
}

/// A reviewer who approved a shorter grant than asked set its ceiling: the
/// holder's extension cannot undo it.
#[test]
fn extend_cannot_undo_a_reviewers_shorter_duration() {
    let p = policy();
    let pending = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    let (req, _) = apply(
        &p,
        &pending,
        scoped_approve("erin", None, Some(mins(30)), None),
        t0(),
    )
    .unwrap();
    assert_eq!(req.expires_at, Some(t0() + mins(30)));
    let m = invalid(apply(&p, &req, extend("alice", mins(30)), t0()));
    assert!(m.contains("at most 30m in total"), "{m}");
    assert_eq!(req.extensions, 0);
    // Approved as asked, the grant extends up to the role's maximum.
    let pending = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    let (req, _) = apply(&p, &pending, approve("erin"), t0()).unwrap();
    let (req, _) = apply(&p, &req, extend("alice", hours(1)), t0()).unwrap();
    assert_eq!(req.expires_at, Some(t0() + hours(2)));
}

#[test]
fn extend_with_an_absurd_duration_is_refused_not_a_panic() {
    let p = policy();
    let req = active_dba(&p);
    for d in [Duration::MAX, Duration::days(365 * 300_000), Duration::MIN] {
        invalid(apply(&p, &req, extend("alice", d), t0()));
    }
}

#[test]
fn extend_needs_an_active_non_break_glass_grant() {
    let p = policy();
    let pending = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    assert_eq!(
        illegal(apply(&p, &pending, extend("alice", mins(5)), t0())),
        "pending"
    );
    let sched = scheduled(&p, &pending);
    assert_eq!(
        illegal(apply(&p, &sched, extend("alice", mins(5)), t0())),
        "approved"
    );
    let bg = NewRequest {
        break_glass: true,
        mfa_verified: true,
        ..nr_for(&["prod-ssh"], mins(30))
    };
    let bg = alice_requests(&p, bg, t0());
    let m = forbidden(apply(&p, &bg, extend("alice", mins(5)), t0()));
    assert!(m.contains("break-glass"), "{m}");
}

// ---------------------------------------------------------------------------
// Break-glass
// ---------------------------------------------------------------------------

fn break_glass(roles: &[&str], mfa: bool) -> NewRequest {
    NewRequest {
        break_glass: true,
        mfa_verified: mfa,
        urgency: Urgency::High,
        ..nr(roles)
    }
}

#[test]
fn break_glass_needs_mfa_and_is_capped() {
    let p = policy();
    let m = forbidden(create_as(
        &p,
        "alice",
        break_glass(&["prod-ssh"], false),
        t0(),
    ));
    assert!(m.contains("second factor"), "{m}");

    let now = t0() + Duration::milliseconds(400);
    let (req, fx) = create_as(&p, "alice", break_glass(&["prod-ssh"], true), now).unwrap();
    assert_eq!(req.state, State::Active);
    assert!(req.break_glass);
    assert_eq!(req.granted_roles, sv(&["prod-ssh"]));
    assert_eq!(req.starts_at, Some(t0()));
    // Default 4h capped by break-glass's 1h.
    assert_eq!(req.expires_at, Some(t0() + hours(1)));
    assert_eq!(req.requested_duration_secs, 3600);
    assert!(req.reviews.is_empty());
    assert_eq!(
        audits(&fx),
        ["request_created", "grant_activated", "break_glass_used"]
    );
    let n = notifications(&fx);
    assert!(
        n.contains(&(&to_sets(&["role:security-admin"]), true)),
        "{n:?}"
    );
    assert!(n.contains(&(&to_user("alice"), false)), "{n:?}");
    assert!(req.grants_at(now));

    // Longer than the break-glass maximum is refused, shorter is fine.
    let long = NewRequest {
        duration: Some(hours(2)),
        ..break_glass(&["prod-ssh"], true)
    };
    let m = invalid(create_as(&p, "alice", long, t0()));
    assert!(m.contains("3600s allowed"), "{m}");
    let short = NewRequest {
        duration: Some(mins(20)),
        ..break_glass(&["dba"], true)
    };
    let (req, _) = create_as(&p, "alice", short, t0()).unwrap();
    assert_eq!(req.expires_at, Some(t0() + mins(20)));
}

#[test]
fn break_glass_restrictions() {
    let p = policy();
    // No scheduled start.
    let sched = NewRequest {
        start_at: Some(t0() + hours(1)),
        ..break_glass(&["prod-ssh"], true)
    };
    invalid(create_as(&p, "alice", sched, t0()));
    // Still only requestable roles.
    forbidden(create_as(
        &p,
        "alice",
        break_glass(&["kube-admin"], true),
        t0(),
    ));
    // Disabled.
    let mut off = policy();
    off.break_glass.enabled = false;
    let m = forbidden(create_as(
        &off,
        "alice",
        break_glass(&["prod-ssh"], true),
        t0(),
    ));
    assert!(m.contains("disabled"), "{m}");
    // Without require_mfa, no factor needed.
    let mut no_mfa = policy();
    no_mfa.break_glass.require_mfa = false;
    let (req, _) = create_as(&no_mfa, "alice", break_glass(&["prod-ssh"], false), t0()).unwrap();
    assert_eq!(req.state, State::Active);
}

#[test]
fn break_glass_is_acknowledged_once_after_the_fact() {
    let p = policy();
    let req = alice_requests(&p, break_glass(&["prod-ssh"], true), t0());
    let ack = |by: &str| review(by, Verdict::Acknowledge);
    let m = forbidden(apply(&p, &req, ack("alice"), t0()));
    assert!(m.contains("your own"), "{m}");
    // carol is neither an eligible reviewer nor a revoker.
    forbidden(apply(&p, &req, ack("carol"), t0()));

    // frank is not a named reviewer of prod-ssh but may revoke.
    let (acked, fx) = apply(&p, &req, ack("frank"), t0() + mins(5)).unwrap();
    assert_eq!(acked.state, State::Active);
    assert_eq!(acked.reviews.len(), 1);
    let r = &acked.reviews[0];
    assert_eq!(
        (r.reviewer.as_str(), r.verdict),
        ("frank", Verdict::Acknowledge)
    );
    assert_eq!(r.at, t0() + mins(5));
    assert!(r.matched.is_empty());
    assert_eq!(acked.updated_at, t0() + mins(5));
    assert_eq!(audits(&fx), ["break_glass_acknowledged"]);
    assert!(notifications(&fx).is_empty() && end_sessions(&fx).is_empty());
    assert!(acked.approvers().is_empty());
    // Awaits a review until acknowledged, in any state; the stored
    // documents carry what wicketd's migration 15 looks for in rows from
    // before it (`"break_glass":true`, `"verdict":"acknowledge"`).
    assert!(req.awaits_review() && !acked.awaits_review());
    let doc = |r: &AccessRequest| serde_json::to_string(r).unwrap();
    assert!(doc(&req).contains(r#""break_glass":true"#));
    assert!(!doc(&req).contains(r#""verdict":"acknowledge""#));
    assert!(doc(&acked).contains(r#""verdict":"acknowledge""#));
    let revoked = AccessRequest {
        state: State::Revoked,
        ..req.clone()
    };
    assert!(revoked.awaits_review());

    for who in ["frank", "dave"] {
        let m = invalid(apply(&p, &acked, ack(who), t0() + mins(6)));
        assert!(m.contains("already acknowledged"), "{m}");
    }
    // dave, on call, may acknowledge as an eligible reviewer.
    let (acked, _) = apply(&p, &req, ack("dave"), t0()).unwrap();
    assert_eq!(acked.reviews[0].reviewer, "dave");

    // Normal requests are not acknowledged.
    let normal = active_dba(&p);
    let m = invalid(apply(&p, &normal, ack("frank"), t0()));
    assert!(m.contains("only break-glass"), "{m}");
    // Break-glass grants are not reviewed.
    assert_eq!(illegal(apply(&p, &req, approve("frank"), t0())), "active");
}

// ---------------------------------------------------------------------------
// Deadlines, grants_at, risk
// ---------------------------------------------------------------------------

#[test]
fn next_deadline_by_state() {
    let p = policy();
    let e = Engine::new(&p);
    let pending = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    assert_eq!(e.next_deadline(&pending), Some(t0() + mins(30)));
    let (esc, _) = apply(&p, &pending, Event::Tick, t0() + mins(30)).unwrap();
    assert_eq!(e.next_deadline(&esc), Some(t0() + hours(1)));
    let (ni, _) = apply(&p, &pending, review("erin", Verdict::AskInfo), t0()).unwrap();
    assert_eq!(e.next_deadline(&ni), Some(t0() + mins(30)));
    let start = t0() + hours(5);
    let (sched, _) = apply(
        &p,
        &pending,
        scoped_approve("erin", None, None, Some(start)),
        t0(),
    )
    .unwrap();
    assert_eq!(e.next_deadline(&sched), Some(start));
    let (active, _) = apply(&p, &pending, approve("erin"), t0() + mins(1)).unwrap();
    assert_eq!(e.next_deadline(&active), Some(t0() + mins(61)));
    for (ev, who) in [
        (review("frank", Verdict::Deny), &pending),
        (Event::Cancel { by: "alice".into() }, &pending),
        (Event::Drop { by: "alice".into() }, &active),
        (revoke("frank", "x"), &active),
    ] {
        let (done, _) = apply(&p, who, ev, t0() + mins(2)).unwrap();
        assert!(done.state.is_terminal());
        assert_eq!(e.next_deadline(&done), None, "{:?}", done.state);
    }
    // If the pending TTL comes before escalation, the TTL is the deadline.
    let mut quick = policy();
    quick.requests.pending_ttl = mins(10);
    let req = alice_requests(&quick, nr(&["dba"]), t0());
    assert_eq!(
        Engine::new(&quick).next_deadline(&req),
        Some(t0() + mins(10))
    );
}

#[test]
fn grants_at_only_inside_an_active_window() {
    let p = policy();
    let pending = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    assert!(!pending.grants_at(t0()));
    let (active, _) = apply(&p, &pending, approve("erin"), t0()).unwrap();
    assert!(active.grants_at(t0()));
    assert!(active.grants_at(t0() + mins(59)));
    assert!(!active.grants_at(t0() + hours(1)));
    assert!(!active.grants_at(t0() - Duration::seconds(1)));
    let (dropped, _) = apply(
        &p,
        &active,
        Event::Drop { by: "alice".into() },
        t0() + mins(1),
    )
    .unwrap();
    assert!(!dropped.grants_at(t0() + mins(2)));
}

#[test]
fn risk_lists_what_the_roles_add() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["prod-ssh"]), t0());
    let risk = e.risk(&req);
    assert_eq!(risk.new_roles, sv(&["prod-ssh"]));
    assert_eq!(risk.ssh, sv(&["root@db-1", "ubuntu@db-1"]));
    assert!(risk.databases.is_empty() && risk.kubernetes.is_empty());
    assert!(risk.permissions.is_empty());
    assert_eq!(risk.max_duration_secs, 4 * 3600);

    let req = alice_requests(&p, nr(&["prod-ssh", "dba"]), t0());
    let risk = e.risk(&req);
    assert_eq!(risk.ssh, sv(&["root@db-1", "ubuntu@db-1"]));
    assert_eq!(
        risk.databases,
        sv(&[
            "app@prod-pg (databases: *)",
            "postgres@prod-pg (databases: *)"
        ])
    );
    assert_eq!(risk.max_duration_secs, 2 * 3600);

    // dev-admin adds root on dev nodes; alice@dev-1 she already has.
    let req = alice_requests(&p, nr(&["dev-admin"]), t0());
    assert_eq!(e.risk(&req).ssh, sv(&["root@dev-1"]));

    // Kubernetes groups, on a policy with a cluster.
    let mut k = policy();
    k.resources
        .push(resource(ResourceKind::KubeCluster, "prod-k8s", "prod"));
    let (req, _) = create_as(&k, "dave", nr(&["kube-admin"]), t0()).unwrap();
    let risk = Engine::new(&k).risk(&req);
    assert_eq!(risk.kubernetes, sv(&["system:masters@prod-k8s"]));
    assert_eq!(risk.max_duration_secs, 3600);

    // Permissions of powerful roles (risk does not re-validate the
    // request): the API's count from standing roles only, and say so.
    let mut sec = req.clone();
    sec.roles = sv(&["security-admin", "sre"]);
    let risk = Engine::new(&k).risk(&sec);
    let only = "(standing roles only: not given by a grant)";
    assert_eq!(
        risk.permissions,
        [
            format!("security-admin: revoke grants {only}"),
            format!("security-admin: read the audit log {only}"),
            format!("security-admin: review requests for [*] {only}"),
            format!("sre: review requests for [prod-ssh, dba, kube-admin] {only}"),
            format!("sre: request [kube-admin] {only}"),
        ]
    );
}

// ---------------------------------------------------------------------------
// Illegal transitions
// ---------------------------------------------------------------------------

#[test]
fn illegal_transitions_are_reported_with_the_state() {
    let p = policy();
    let pending = alice_requests(&p, nr_for(&["dba"], hours(1)), t0());
    let (denied, _) = apply(&p, &pending, review("frank", Verdict::Deny), t0()).unwrap();
    let (active, _) = apply(&p, &pending, approve("erin"), t0()).unwrap();
    let (expired, _) = apply(&p, &active, Event::Tick, t0() + hours(1)).unwrap();
    let (cancelled, _) = apply(&p, &pending, Event::Cancel { by: "alice".into() }, t0()).unwrap();
    let (revoked, _) = apply(&p, &active, revoke("frank", "x"), t0()).unwrap();
    let drop = || Event::Drop { by: "alice".into() };
    let update = || Event::Update {
        by: "alice".into(),
        reason: "more".into(),
    };
    let cancel = || Event::Cancel { by: "alice".into() };
    let cases: Vec<(&AccessRequest, Event, &str)> = vec![
        (&denied, approve("dave"), "denied"),
        (&denied, review("frank", Verdict::Deny), "denied"),
        (&denied, update(), "denied"),
        (&denied, cancel(), "denied"),
        (&pending, drop(), "pending"),
        (&pending, revoke("frank", "r"), "pending"),
        (&pending, extend("alice", mins(5)), "pending"),
        (&pending, update(), "pending"),
        (&active, approve("dave"), "active"),
        (&active, update(), "active"),
        (&active, cancel(), "active"),
        (&expired, drop(), "expired"),
        (&expired, extend("alice", mins(5)), "expired"),
        (&expired, review("erin", Verdict::AskInfo), "expired"),
        (&cancelled, approve("erin"), "cancelled"),
        (&cancelled, cancel(), "cancelled"),
        (&revoked, drop(), "revoked"),
        (&revoked, extend("alice", mins(1)), "revoked"),
    ];
    for (req, ev, state) in cases {
        let what = format!("{ev:?} on {state}");
        let r = apply(&p, req, ev, t0() + mins(1));
        assert_eq!(illegal(r), state, "{what}");
    }
    let e = RequestError::IllegalTransition {
        state: "denied",
        what: "only pending requests can be reviewed".into(),
    };
    assert_eq!(
        e.to_string(),
        "request is denied: only pending requests can be reviewed"
    );
}

// ---------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------

const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

#[derive(Debug, Clone)]
enum Op {
    Review {
        who: usize,
        verdict: Verdict,
        /// Bit i keeps the request's i-th role.
        roles_mask: Option<u8>,
        duration_secs: Option<i64>,
        start_in_secs: Option<i64>,
        empty_reason: bool,
    },
    Update {
        who: usize,
    },
    Cancel {
        who: usize,
    },
    Drop {
        who: usize,
    },
    Revoke {
        who: usize,
        empty_reason: bool,
    },
    Extend {
        who: usize,
        secs: i64,
    },
    Tick,
}

/// Who acts: alice (the requester) more often than the others.
fn who() -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(0usize), 3 => 0usize..6]
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        5 => Just(Verdict::Approve),
        1 => Just(Verdict::Deny),
        1 => Just(Verdict::AskInfo),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            0usize..7,
            verdict(),
            proptest::option::weighted(0.25, 0u8..16),
            proptest::option::weighted(
                0.25,
                prop_oneof![1 => -60i64..120, 3 => 120i64..3 * 3600],
            ),
            proptest::option::weighted(0.2, -600i64..2 * 86400),
            proptest::bool::weighted(0.05),
        )
            .prop_map(|(who, verdict, roles_mask, duration_secs, start_in_secs, empty_reason)| {
                Op::Review {
                    who,
                    verdict,
                    roles_mask,
                    duration_secs,
                    start_in_secs,
                    empty_reason,
                }
            }),
        1 => who().prop_map(|who| Op::Update { who }),
        1 => who().prop_map(|who| Op::Cancel { who }),
        1 => who().prop_map(|who| Op::Drop { who }),
        1 => (0usize..7, proptest::bool::weighted(0.1))
            .prop_map(|(who, empty_reason)| Op::Revoke { who, empty_reason }),
        3 => (
            prop_oneof![4 => Just(0usize), 1 => 0usize..6],
            prop_oneof![1 => -600i64..=0, 4 => 1i64..3600, 1 => 3600i64..6 * 3600],
        )
            .prop_map(|(who, secs)| Op::Extend { who, secs }),
        4 => Just(Op::Tick),
    ]
}

/// Time between events: seconds, minutes or hours.
fn step() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => 1i64..60,
        4 => 60i64..900,
        2 => 900i64..3600,
        1 => 3600i64..6 * 3600,
    ]
}

#[derive(Debug, Clone)]
struct Init {
    roles: Vec<String>,
    duration_secs: Option<i64>,
    start_in_secs: Option<i64>,
    /// Seconds after the rotation starts (two weeks: dave's and erin's).
    offset_secs: i64,
    millis: i64,
    urgency: Urgency,
}

fn init() -> impl Strategy<Value = Init> {
    (
        (
            any::<bool>(),
            any::<bool>(),
            proptest::bool::weighted(0.15),
            proptest::bool::weighted(0.3),
        ),
        prop_oneof![
            2 => Just(None),
            3 => (60i64..=2 * 3600).prop_map(Some),
            1 => (30i64..=9 * 3600).prop_map(Some),
        ],
        proptest::option::weighted(0.2, 1i64..6 * 3600),
        0i64..14 * 86400,
        0i64..1000,
        prop_oneof![
            Just(Urgency::Low),
            Just(Urgency::Normal),
            Just(Urgency::High)
        ],
    )
        .prop_map(
            |(
                (ssh, dba, kube, admin),
                duration_secs,
                start_in_secs,
                offset_secs,
                millis,
                urgency,
            )| {
                let mut roles = Vec::new();
                for (on, name) in [
                    (ssh, "prod-ssh"),
                    (dba, "dba"),
                    (kube, "kube-admin"),
                    (admin, "dev-admin"),
                ] {
                    if on {
                        roles.push(name.to_string());
                    }
                }
                if roles.is_empty() {
                    roles.push("prod-ssh".to_string());
                }
                Init {
                    roles,
                    duration_secs,
                    start_in_secs,
                    offset_secs,
                    millis,
                    urgency,
                }
            },
        )
}

/// `USERS[who]`, or for `who == 6` the requester alice holding every
/// reviewer role as well (she must still never review her own request).
fn reviewer(who: usize) -> Actor {
    match USERS.get(who) {
        Some(name) => actor(name),
        None => Actor {
            name: "alice".into(),
            roles: sv(&["dev", "sre", "security-admin"]),
        },
    }
}

fn event_for(op: &Op, req: &AccessRequest, now: DateTime<Utc>) -> Event {
    let reason = |empty: bool| {
        if empty {
            String::new()
        } else {
            "because".to_string()
        }
    };
    match op {
        Op::Review {
            who,
            verdict,
            roles_mask,
            duration_secs,
            start_in_secs,
            empty_reason,
        } => Event::Review {
            by: reviewer(*who),
            verdict: *verdict,
            reason: reason(*empty_reason),
            roles: roles_mask.map(|m| {
                req.roles
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| m & (1 << i) != 0)
                    .map(|(_, r)| r.clone())
                    .collect()
            }),
            duration: duration_secs.map(Duration::seconds),
            start_at: start_in_secs.map(|s| now + Duration::seconds(s)),
        },
        Op::Update { who } => Event::Update {
            by: USERS[*who].into(),
            reason: "more detail".into(),
        },
        Op::Cancel { who } => Event::Cancel {
            by: USERS[*who].into(),
        },
        Op::Drop { who } => Event::Drop {
            by: USERS[*who].into(),
        },
        Op::Revoke { who, empty_reason } => Event::Revoke {
            by: reviewer(*who),
            reason: reason(*empty_reason),
        },
        Op::Extend { who, secs } => Event::Extend {
            by: USERS[*who].into(),
            duration: Duration::seconds(*secs),
        },
        Op::Tick => Event::Tick,
    }
}

/// The invariants that hold for the request after every step.
fn check_invariants(
    p: &Policy,
    req: &AccessRequest,
    requested: &[String],
    self_approved: bool,
) -> Result<(), TestCaseError> {
    let e = Engine::new(p);
    prop_assert_eq!(&req.roles, &requested.to_vec());
    // (2) the grant is within what was asked.
    for g in &req.granted_roles {
        prop_assert!(requested.contains(g), "granted {} not requested", g);
    }
    if matches!(req.state, State::Active | State::Approved) {
        let (Some(start), Some(end)) = (req.starts_at, req.expires_at) else {
            return Err(TestCaseError::fail("active/approved without a window"));
        };
        prop_assert!(!req.granted_roles.is_empty());
        prop_assert_eq!(start.timestamp_subsec_nanos(), 0, "start not whole seconds");
        // (1) window no longer than every granted role's maximum and the global one.
        let window = end - start;
        prop_assert!(window <= p.requests.max_duration, "window {:?}", window);
        let role_min = req
            .granted_roles
            .iter()
            .filter_map(|r| p.roles.get(r).and_then(|r| r.max_duration))
            .min();
        if let Some(m) = role_min {
            prop_assert!(window <= m, "window {:?} > role max {:?}", window, m);
        }
        prop_assert!(window >= p.requests.min_duration, "window {:?}", window);
        prop_assert!(req.approved_at.is_some());
        // (3) only with the rule met, and never on the requester's say-so alone.
        if !self_approved {
            prop_assert_eq!(e.requirement_status(req, &req.granted_roles), Ok(()));
            prop_assert!(
                req.approvers().iter().any(|a| a != "alice"),
                "approvers {:?}",
                req.approvers()
            );
            // The same, from the example's rules directly (an oracle that does
            // not go through requirement_status or the recorded `matched`).
            let approvals: Vec<&crate::Review> = req
                .reviews
                .iter()
                .filter(|r| r.verdict == Verdict::Approve)
                .collect();
            let sre = &p.directory.oncall["sre"];
            for g in &req.granted_roles {
                // Every approval's scope covers every granted role.
                for a in &approvals {
                    prop_assert!(a.roles.as_ref().is_none_or(|s| s.contains(g)));
                }
                match g.as_str() {
                    "prod-ssh" | "kube-admin" => {
                        let lead = approvals.iter().any(|a| a.reviewer == "bob");
                        let oncall = approvals.iter().any(|a| {
                            a.reviewer != "bob" && sre.on_call(a.at) == Some(a.reviewer.as_str())
                        });
                        prop_assert!(lead && oncall, "{} granted by {:?}", g, req.approvers());
                    }
                    "dba" => prop_assert!(
                        approvals
                            .iter()
                            .any(|a| ["dave", "erin", "frank"].contains(&a.reviewer.as_str())),
                        "dba granted by {:?}",
                        req.approvers()
                    ),
                    _ => {}
                }
            }
        }
    }
    // (4) the requester never reviews.
    prop_assert!(!req
        .reviews
        .iter()
        .any(|r| r.reviewer == "alice" && r.verdict == Verdict::Approve));
    prop_assert!(!req.reviews.iter().any(|r| r.reviewer == "alice"));
    // Each reviewer decides (approve/deny) at most once.
    let deciders: Vec<&str> = req
        .reviews
        .iter()
        .filter(|r| r.verdict != Verdict::AskInfo)
        .map(|r| r.reviewer.as_str())
        .collect();
    let distinct: std::collections::BTreeSet<&str> = deciders.iter().copied().collect();
    prop_assert_eq!(distinct.len(), deciders.len());
    prop_assert_eq!(req.state.is_terminal(), req.ended_at.is_some());
    prop_assert!(req.extensions <= p.requests.max_extensions);
    // Revoked, or revoked after it ended (to end draining sessions).
    if req.state == State::Revoked {
        prop_assert!(req.revoked_by.is_some());
    }
    if req.revoked_by.is_some() {
        prop_assert!(matches!(req.state, State::Revoked | State::Expired));
        prop_assert!(req.approved_at.is_some());
    }
    Ok(())
}

fn run_lifecycle(init: Init, ops: Vec<(i64, Op)>) -> Result<(), TestCaseError> {
    let p = policy();
    let e = Engine::new(&p);
    let created = t("2026-01-05T09:00:00Z")
        + Duration::seconds(init.offset_secs)
        + Duration::milliseconds(init.millis);
    let new = NewRequest {
        id: "prop".into(),
        roles: init.roles.clone(),
        reason: "property".into(),
        urgency: init.urgency,
        duration: init.duration_secs.map(Duration::seconds),
        start_at: init.start_in_secs.map(|s| created + Duration::seconds(s)),
        ..Default::default()
    };
    let (mut req, fx) = match create_as(&p, "alice", new, created) {
        Ok(ok) => ok,
        Err(err) => {
            // Only for the reasons we know about.
            let kube = init.roles.iter().any(|r| r == "kube-admin");
            let bad_duration = init.duration_secs.is_some_and(|d| {
                Duration::seconds(d) < p.requests.min_duration
                    || Duration::seconds(d) > e.max_duration(&init.roles)
            });
            prop_assert!(kube || bad_duration, "unexpected refusal {:?}", err);
            return Ok(());
        }
    };
    let self_approved = init.roles == ["dev-admin"];
    prop_assert!(audits(&fx).contains(&"request_created"));
    prop_assert_eq!(
        req.state,
        if !self_approved {
            State::Pending
        } else if init.start_in_secs.is_some() {
            State::Approved
        } else {
            State::Active
        }
    );
    check_invariants(&p, &req, &init.roles, self_approved)?;
    let mut now = created;
    let mut terminal: Option<AccessRequest> = None;
    for (dt, op) in ops {
        now += Duration::seconds(dt);
        let ev = event_for(&op, &req, now);
        if let Ok((next, fx)) = e.apply(&req, ev, now) {
            // (5) terminal requests never change, except that an ended
            // grant takes one revoke (for its draining sessions).
            let late_revoke = req.state == State::Expired
                && req.revoked_by.is_none()
                && next.revoked_by.is_some();
            if let Some(done) = &terminal {
                let mut seen = next.clone();
                if late_revoke {
                    seen.revoked_by = None;
                    seen.revoke_reason = None;
                    seen.updated_at = done.updated_at;
                }
                prop_assert_eq!(&seen, done, "terminal request changed by {:?}", op);
            }
            if late_revoke {
                terminal = Some(next.clone());
            }
            // (5b) a proxy that knows both keeps the newer: the next state
            // supersedes this one, and once it ended, no earlier state
            // that still granted supersedes it.
            prop_assert!(next.supersedes(&req), "{:?} -> {:?}", req.state, next.state);
            if next.state.is_terminal() && !req.state.is_terminal() {
                prop_assert!(
                    !req.supersedes(&next),
                    "{:?} -> {:?}",
                    req.state,
                    next.state
                );
            }
            // (6) every state change is audited.
            if next.state != req.state {
                prop_assert!(
                    fx.iter().any(|f| matches!(f, Effect::Audit { .. })),
                    "{:?} -> {:?} without audit",
                    req.state,
                    next.state
                );
            }
            // Sessions end exactly when a (possibly scheduled) grant ends.
            let ended_grant = matches!(req.state, State::Active | State::Approved)
                && matches!(next.state, State::Expired | State::Revoked)
                || late_revoke;
            prop_assert_eq!(
                !end_sessions(&fx).is_empty(),
                ended_grant,
                "{:?} -> {:?}: {:?}",
                req.state,
                next.state,
                fx
            );
            req = next;
        }
        check_invariants(&p, &req, &init.roles, self_approved)?;
        if req.state.is_terminal() && terminal.is_none() {
            terminal = Some(req.clone());
        }
    }
    Ok(())
}

fn arbitrary_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (i64::MIN + 1..=i64::MAX).prop_map(Duration::milliseconds),
        (-86_400i64..10 * 3600).prop_map(Duration::seconds),
        Just(Duration::MAX),
        Just(Duration::MIN),
    ]
}

proptest! {
    // No regression files: the cases are cheap to regenerate.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    })]

    #[test]
    fn prop_lifecycle_invariants(
        init in init(),
        ops in proptest::collection::vec((step(), op()), 1..=12),
    ) {
        run_lifecycle(init, ops)?;
    }

    #[test]
    fn prop_create_never_panics(
        reason in prop_oneof![any::<String>(), "\\PC{0,40}", Just(String::new())],
        ticket in proptest::option::of(prop_oneof![
            any::<String>(),
            "https?://\\PC{0,30}",
        ]),
        roles in proptest::collection::vec(
            prop_oneof![
                Just("prod-ssh".to_string()),
                Just("dba".to_string()),
                Just("dev-admin".to_string()),
                Just("kube-admin".to_string()),
                any::<String>(),
            ],
            0..4,
        ),
        duration in proptest::option::of(arbitrary_duration()),
        start_in in proptest::option::of(arbitrary_duration()),
        break_glass in any::<bool>(),
        mfa in any::<bool>(),
    ) {
        let p = policy();
        let e = Engine::new(&p);
        let now = t0();
        let new = NewRequest {
            id: "fuzz".into(),
            roles: roles.clone(),
            resources: Vec::new(),
            reason: reason.clone(),
            ticket_url: ticket.clone(),
            urgency: Urgency::Normal,
            duration,
            start_at: start_in.and_then(|d| now.checked_add_signed(d)),
            break_glass,
            mfa_verified: mfa,
        };
        match create_as(&p, "alice", new, now) {
            Ok((req, fx)) => {
                prop_assert!(!req.reason.is_empty() && req.reason.len() <= 2000);
                prop_assert_eq!(req.reason.as_str(), reason.trim());
                if let Some(u) = &req.ticket_url {
                    prop_assert!(u.starts_with("https://") || u.starts_with("http://"));
                }
                let d = Duration::seconds(req.requested_duration_secs);
                prop_assert!(d >= p.requests.min_duration);
                prop_assert!(d <= e.max_duration(&req.roles));
                prop_assert!(!req.state.is_terminal());
                prop_assert!(audits(&fx).contains(&"request_created"));
                if break_glass {
                    prop_assert!(mfa && req.state == State::Active);
                    prop_assert!(d <= p.break_glass.max_duration);
                }
                if let (Some(s), Some(x)) = (req.starts_at, req.expires_at) {
                    prop_assert!(x - s <= e.max_duration(&req.granted_roles));
                }
            }
            Err(_) => {
                // Refusals are fine; panics are not.
            }
        }
    }

    #[test]
    fn prop_apply_never_panics_on_arbitrary_parameters(
        state_pick in 0usize..4,
        who in 0usize..6,
        verdict in prop_oneof![
            Just(Verdict::Approve),
            Just(Verdict::Deny),
            Just(Verdict::AskInfo),
            Just(Verdict::Acknowledge),
        ],
        reason in any::<String>(),
        duration in proptest::option::of(arbitrary_duration()),
        start_in in proptest::option::of(arbitrary_duration()),
        extension in arbitrary_duration(),
        kind in 0usize..4,
    ) {
        let p = policy();
        let e = Engine::new(&p);
        let req = match state_pick {
            0 => alice_requests(&p, nr(&["prod-ssh", "dba"]), t0()),
            1 => active_dba(&p),
            2 => active_prod_ssh(&p, hours(1)),
            _ => alice_requests(&p, break_glass(&["prod-ssh"], true), t0()),
        };
        let now = t0() + mins(1);
        let ev = match kind {
            0 => Event::Review {
                by: actor(USERS[who]),
                verdict,
                reason: reason.clone(),
                roles: None,
                duration,
                start_at: start_in.and_then(|d| now.checked_add_signed(d)),
            },
            1 => Event::Extend { by: "alice".into(), duration: extension },
            2 => Event::Revoke { by: actor(USERS[who]), reason: reason.clone() },
            _ => Event::Update { by: USERS[who].into(), reason: reason.clone() },
        };
        if let Ok((next, _)) = e.apply(&req, ev, now) {
            if let (Some(s), Some(x)) = (next.starts_at, next.expires_at) {
                prop_assert!(x - s <= e.max_duration(&next.granted_roles));
                prop_assert!(x - s >= p.requests.min_duration);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Live sessions under a grant
// ---------------------------------------------------------------------------

#[test]
fn sessions_end_with_the_grant_and_revoke_ends_them_whatever_the_setting() {
    let p = policy();
    let req = active_dba(&p);
    let end = req.expires_at.unwrap();
    // In force: no end; a warning only inside the window before the end.
    assert_eq!(req.session_end(t0() + mins(5), true), None);
    assert_eq!(req.session_warning(t0() + mins(5), mins(15), true), None);
    let w = req.session_warning(end - mins(10), mins(15), true).unwrap();
    assert!(w.contains("r1 ends at") && w.contains("in 10m00s"), "{w}");
    assert_eq!(req.session_warning(end - mins(10), mins(15), false), None);
    assert_eq!(
        req.session_warning(end - mins(10), Duration::zero(), true),
        None
    );
    // Past the end: ends, unless sessions may finish.
    let why = req.session_end(end, true).unwrap();
    assert_eq!(why, "access request r1 expired");
    assert_eq!(req.session_end(end, false), None);
    // Dropped by its holder: the same, with the reason.
    let (dropped, _) = apply(&p, &req, Event::Drop { by: "alice".into() }, t0() + mins(1)).unwrap();
    assert_eq!(
        dropped.session_end(t0() + mins(2), true).unwrap(),
        "access request r1 expired: dropped by its holder"
    );
    assert_eq!(dropped.session_end(t0() + mins(2), false), None);
    // Revoked: always, naming who and why.
    let (revoked, _) = apply(&p, &req, revoke("frank", "INC-7 closed"), t0() + mins(1)).unwrap();
    for finish in [true, false] {
        assert_eq!(
            revoked.session_end(t0() + mins(2), finish).unwrap(),
            "access request r1 was revoked by frank: INC-7 closed"
        );
    }
}

#[test]
fn a_session_under_standing_roles_ends_with_its_certificate() {
    let end = t0().timestamp() + 600;
    let standing = CertifiedSession {
        valid_until: end,
        under_grants: false,
        warned: false,
    };
    let signal = |at: DateTime<Utc>| certificate_session_signal(standing, at, mins(2), true);
    assert_eq!(signal(t0() + mins(7)), None);
    assert!(
        matches!(signal(t0() + mins(8)), Some(SessionSignal::Warn(w)) if w.contains("will be closed then"))
    );
    assert!(matches!(
        signal(t0() + mins(10) - Duration::seconds(1)),
        Some(SessionSignal::Warn(_))
    ));
    assert!(
        matches!(signal(t0() + mins(10)), Some(SessionSignal::End(w)) if w.contains("ended at") && w.contains("wicket login"))
    );
    assert_eq!(
        certificate_session_signal(standing, t0() + mins(9), Duration::zero(), true),
        None
    );
    // Warned once; under grants or with disconnect_on_expiry off, never.
    let warned = CertifiedSession {
        warned: true,
        ..standing
    };
    assert_eq!(
        certificate_session_signal(warned, t0() + mins(9), mins(2), true),
        None
    );
    assert!(matches!(
        certificate_session_signal(warned, t0() + mins(10), mins(2), true),
        Some(SessionSignal::End(_))
    ));
    let granted = CertifiedSession {
        under_grants: true,
        ..standing
    };
    for finish in [true, false] {
        assert_eq!(
            certificate_session_signal(granted, t0() + mins(11), mins(2), finish),
            None
        );
    }
    // Sessions may finish: not warned, then drained (nothing new starts).
    let finishing = |at| certificate_session_signal(standing, at, mins(2), false);
    assert_eq!(finishing(t0() + mins(9)), None);
    assert!(
        matches!(finishing(t0() + mins(10)), Some(SessionSignal::Drain(w)) if w.contains("ended at") && w.contains("wicket login"))
    );
    assert!(matches!(
        finishing(t0() + mins(11)),
        Some(SessionSignal::Drain(_))
    ));
}

proptest! {
    /// A session under standing roles alone never outlasts the login or the
    /// certificate; one under grants runs to the certificate's end.
    #[test]
    fn a_session_ends_with_its_certificate_or_its_login(
        cert_end in -1_000i64..1_000,
        login_until in -1_000i64..1_000,
        now in -1_000i64..1_000,
    ) {
        let standing = crate::session_end(cert_end, login_until, false);
        prop_assert!(standing <= cert_end && standing <= login_until);
        prop_assert!(standing == cert_end || standing == login_until);
        prop_assert_eq!(crate::session_end(cert_end, login_until, true), cert_end);
        prop_assert_eq!(crate::login_lasts(login_until, now), now < login_until);
    }
}

#[test]
fn who_may_read_a_request() {
    let p = policy();
    let e = Engine::new(&p);
    let req = alice_requests(&p, nr(&["dba"]), t0());
    let read = |who: &str| e.decide_request_read(&req, &actor(who), t0());
    assert_eq!(read("alice"), Decision::allow("alice made the request"));
    // An eligible reviewer, with the review decision's reason.
    let review = e.decide_review(&req, &actor("dave"), t0());
    assert!(review.allowed, "{review:?}");
    assert_eq!(read("dave"), review);
    // Auditors and revokers.
    assert_eq!(
        read("frank"),
        Decision::allow("frank's roles may read the audit log")
    );
    // A revoker who neither audits nor may review it.
    assert!(!e.decide_review(&req, &actor("gina"), t0()).allowed);
    assert_eq!(
        read("gina"),
        Decision::allow("gina's roles may revoke grants")
    );
    // Anyone else: refused, and told why.
    let bob = read("bob");
    assert!(!bob.allowed);
    assert_eq!(
        bob.reason,
        "bob is not the requester, a reviewer, an auditor or a revoker of access request r1"
    );
    // Once someone reviewed it, they may still read it, eligible or not.
    let mut reviewed = req.clone();
    reviewed.reviews.push(Review {
        reviewer: "bob".into(),
        verdict: Verdict::AskInfo,
        reason: "which table?".into(),
        at: t0(),
        matched: Vec::new(),
        roles: None,
        duration_secs: None,
        start_at: None,
    });
    assert_eq!(
        e.decide_request_read(&reviewed, &actor("bob"), t0()),
        Decision::allow("bob reviewed the request")
    );
}
