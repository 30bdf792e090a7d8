use super::file::FileConfig;
use super::*;
use proptest::prelude::*;
use wicket_policy::{Requirement, ResourceKind, ReviewerSet};

const EXAMPLE: &str = include_str!("../../../deploy/wicket.yaml");

fn base() -> PathBuf {
    PathBuf::from("/srv/wicket")
}

fn ok(text: &str) -> Config {
    match parse(text, &base()) {
        Ok(c) => c,
        Err(e) => panic!("expected no problems, got:\n{e}"),
    }
}

fn problems(text: &str) -> ConfigErrors {
    match parse(text, &base()) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts that a problem is reported at `path` whose message contains `needle`.
fn has(e: &ConfigErrors, path: &str, needle: &str) {
    assert!(
        e.problems
            .iter()
            .any(|p| p.path == path && p.message.contains(needle)),
        "no problem at {path:?} mentioning {needle:?}; got:\n{e}"
    );
}

const MINIMAL_ROLES: &str = "
version: 1
roles:
  sre: {}
  dba:
    databases: { labels: { env: prod }, names: ['*'], users: [postgres] }
";

#[test]
fn the_example_parses_without_problems() {
    let c = ok(EXAMPLE);
    assert_eq!(c.cluster_name, "wicket");
    assert_eq!(c.data_dir, PathBuf::from("/srv/wicket/wicket-data"));
    assert_eq!(c.storage, Storage::Sqlite);
    assert_eq!(c.listen.api, "127.0.0.1:3080".parse().unwrap());
    assert_eq!(c.listen.ssh, Some("127.0.0.1:3022".parse().unwrap()));
    assert_eq!(c.listen.postgres, Some("127.0.0.1:3032".parse().unwrap()));
    assert_eq!(c.listen.kube, Some("127.0.0.1:3026".parse().unwrap()));
    assert_eq!(c.login_ttl, Duration::hours(8));
    assert!(c.session.disconnect_on_expiry);
    assert_eq!(c.session.expiry_warning, Duration::minutes(15));
    assert_eq!(c.session.unverified_grace, Duration::seconds(30));
    assert_eq!(c.auth, AuthSettings::default());

    let p = &c.policy;
    assert_eq!(p.requests.min_duration, Duration::minutes(1));
    assert_eq!(p.requests.default_duration, Duration::hours(4));
    assert_eq!(p.requests.max_duration, Duration::hours(8));
    assert_eq!(p.requests.pending_ttl, Duration::hours(1));
    assert_eq!(p.requests.escalate_after, Duration::minutes(30));
    assert!(p.requests.require_reason && !p.requests.require_ticket_url);
    assert_eq!(p.requests.max_extensions, 1);
    assert!(p.requests.allow_scheduled_start);
    assert_eq!(p.requests.max_pending_per_user, 10);
    assert!(p.break_glass.enabled && p.break_glass.require_mfa);
    assert_eq!(p.break_glass.max_duration, Duration::hours(1));
    assert_eq!(
        p.break_glass.notify,
        vec![ReviewerSet::Role("security-admin".into())]
    );

    let team = &p.directory.teams["payments"];
    assert_eq!(team.lead, "bob");
    assert_eq!(team.members, vec!["alice", "carol"]);
    assert_eq!(p.directory.team_lead_of("alice", None), Some("bob"));
    let sre = &p.directory.oncall["sre"];
    assert_eq!(sre.rotation, vec!["dave", "erin"]);
    assert_eq!(sre.shift, Duration::hours(168));
    assert_eq!(
        sre.starts,
        "2026-01-05T09:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );

    let names: Vec<&str> = p.roles.names().collect();
    assert_eq!(
        names,
        [
            "dba",
            "dev",
            "dev-admin",
            "kube-admin",
            "prod-ssh",
            "security-admin",
            "sre"
        ]
    );
    let dba = p.roles.get("dba").unwrap();
    assert_eq!(dba.max_duration, Some(Duration::hours(2)));
    let db = dba.databases.as_ref().unwrap();
    assert_eq!(db.names, vec!["*"]);
    assert_eq!(db.users, vec!["postgres", "app"]);
    let dev = p.roles.get("dev").unwrap();
    assert_eq!(dev.ssh.logins, vec!["{{user}}"]);
    assert_eq!(dev.request_roles, vec!["prod-ssh", "dba", "dev-admin"]);
    assert!(dev.port_forwarding && !dev.agent_forwarding && !dev.x11_forwarding);
    assert!(!p.roles.get("prod-ssh").unwrap().port_forwarding);
    let kube = p
        .roles
        .get("kube-admin")
        .unwrap()
        .kubernetes
        .as_ref()
        .unwrap();
    assert_eq!(kube.groups, vec!["system:masters"]);
    let sec = p.roles.get("security-admin").unwrap();
    assert!(sec.revoke && sec.audit);
    assert_eq!(sec.review_roles, vec!["*"]);

    assert_eq!(p.approval.len(), 3);
    assert_eq!(p.approval[0].require, Requirement::SelfApprove);
    assert_eq!(
        p.approval[1].require,
        Requirement::AllOf(vec![
            ReviewerSet::Oncall("sre".into()),
            ReviewerSet::TeamLead
        ])
    );
    assert_eq!(p.approval[1].roles, vec!["prod-ssh", "kube-admin"]);
    assert_eq!(
        p.approval[2].require,
        Requirement::AnyOf(vec![
            ReviewerSet::Role("sre".into()),
            ReviewerSet::Role("security-admin".into())
        ])
    );
    assert_eq!(
        p.approval[2].secondary,
        vec![ReviewerSet::Role("security-admin".into())]
    );

    assert_eq!(p.resources.len(), 4);
    let node = p.resource(ResourceKind::Node, "db-1").unwrap();
    assert_eq!(node.address, "127.0.0.1:2222");
    assert_eq!(node.labels["env"], "prod");
    assert!(p.resource(ResourceKind::Database, "prod-pg").is_some());
    assert_eq!(
        p.resource(ResourceKind::KubeCluster, "prod-k8s")
            .unwrap()
            .address,
        "https://127.0.0.1:6443"
    );
    assert!(c.database_tls.is_empty() && c.kube_tls.is_empty());
}

#[test]
fn the_file_types_read_the_example_in_one_go() {
    let f: FileConfig = serde_norway::from_str(EXAMPLE).unwrap();
    assert_eq!(f.version, 1);
    assert_eq!(f.roles.len(), 7);
    assert_eq!(f.approval.len(), 3);
}

#[test]
fn optional_fields_and_defaults() {
    let c = ok("
version: 1
cluster_name: prod.example
data_dir: /var/lib/wicket
storage: postgresql://wicket:hunter2@db.internal:5432/wicket
listen: { api: '0.0.0.0:443' }
certificates: { login_ttl: 1h30m, public_names: [wicket.example.com, '*.wicket.example.com', 10.0.0.1] }
session: { disconnect_on_expiry: false, expiry_warning: 0s, unverified_grace: 5s }
requests: { allow_scheduled_start: false, max_duration: 12h }
auth: { max_failures_per_user: 3, failure_window: 1h }
roles:
  ops: { logins: [root], nodes: { '*': '*' }, agent_forwarding: true, max_duration: 12h }
approval:
  - roles: [ops]
    environment: { env: prod }
    require: { count: 2, from: ['role:ops'] }
  - roles: [ops]
    require: { any_of: ['user:alice'] }
resources:
  nodes: [{ name: n1, address: 'node1.internal:22', labels: { tier: 1, gpu: true, env: prod } }]
  databases:
    - { name: pg, address: '[::1]:5432', ca_file: certs/pg-ca.pem, server_name: pg.internal }
  kube_clusters:
    - { name: k, address: 'https://k8s.internal', ca_file: /etc/k8s/ca.pem }
");
    assert_eq!(c.cluster_name, "prod.example");
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/wicket"));
    assert_eq!(
        c.storage,
        Storage::Postgres("postgresql://wicket:hunter2@db.internal:5432/wicket".into())
    );
    assert!(!format!("{:?}", c.storage).contains("hunter2"));
    assert_eq!(c.listen.api, "0.0.0.0:443".parse().unwrap());
    assert_eq!(c.listen.ssh, None);
    assert_eq!(c.login_ttl, Duration::minutes(90));
    assert_eq!(c.public_names.len(), 3);
    assert!(!c.session.disconnect_on_expiry);
    assert_eq!(c.session.expiry_warning, Duration::zero());
    assert_eq!(c.session.unverified_grace, Duration::seconds(5));
    assert!(!c.policy.requests.allow_scheduled_start);
    assert_eq!(c.policy.requests.default_duration, Duration::hours(4));
    assert_eq!(c.auth.max_failures_per_user, 3);
    assert_eq!(c.auth.max_failures_per_source, 20);
    assert_eq!(c.auth.failure_window, Duration::hours(1));
    assert!(c.policy.roles.get("ops").unwrap().agent_forwarding);
    assert_eq!(
        c.policy.approval[0].require,
        Requirement::Count {
            count: 2,
            from: vec![ReviewerSet::Role("ops".into())]
        }
    );
    assert!(c.policy.approval[0].environment.is_some());
    let n1 = c.policy.resource(ResourceKind::Node, "n1").unwrap();
    assert_eq!(n1.labels["tier"], "1");
    assert_eq!(n1.labels["gpu"], "true");
    let tls = c.resource_tls(ResourceKind::Database, "pg").unwrap();
    assert_eq!(
        tls.ca_file.as_deref(),
        Some(Path::new("/srv/wicket/certs/pg-ca.pem"))
    );
    assert_eq!(tls.server_name.as_deref(), Some("pg.internal"));
    let tls = c.resource_tls(ResourceKind::KubeCluster, "k").unwrap();
    assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/etc/k8s/ca.pem")));
}

#[test]
fn version_only_file_matches_the_embedded_defaults_but_roles() {
    let c = ok("version: 1");
    let d = Config::embedded_default(&base());
    assert_eq!(c.cluster_name, d.cluster_name);
    assert_eq!(c.data_dir, d.data_dir);
    assert_eq!(c.storage, d.storage);
    assert_eq!(c.listen, d.listen);
    assert_eq!(c.login_ttl, d.login_ttl);
    assert_eq!(c.session, d.session);
    assert_eq!(c.auth, d.auth);
    assert_eq!(c.policy.requests, d.policy.requests);
    assert_eq!(c.policy.break_glass, d.policy.break_glass);
    assert_eq!(c.policy.roles.names().count(), 0);
}

#[test]
fn embedded_default_roles() {
    let d = Config::embedded_default(&base());
    assert_eq!(d.data_dir, PathBuf::from("/srv/wicket/wicket-data"));
    assert_eq!(d.listen.api, "127.0.0.1:3080".parse().unwrap());
    assert!(d.listen.ssh.is_none() && d.listen.postgres.is_none() && d.listen.kube.is_none());
    let held = vec!["access".to_string()];
    let subject = wicket_policy::Subject::new("alice", &held);
    let node = wicket_policy::Resource {
        kind: ResourceKind::Node,
        name: "n".into(),
        address: "127.0.0.1:22".into(),
        labels: [("env".to_string(), "prod".to_string())].into(),
    };
    assert!(
        d.policy
            .roles
            .decide_ssh_login(&subject, &node, "alice")
            .allowed
    );
    assert!(
        !d.policy
            .roles
            .decide_ssh_login(&subject, &node, "root")
            .allowed
    );
    let admin = ["admin".to_string()];
    assert!(d.policy.roles.may_review(&admin, "access"));
    assert!(d.policy.roles.may_request(&admin, "access"));
    assert!(d.policy.roles.may_revoke(&admin) && d.policy.roles.may_audit(&admin));
}

#[test]
fn many_problems_are_all_reported_with_paths() {
    let e = problems(
        "
version: 1
colour: blue
storage: mysql://x
listen: { api: 'nope', ssh: '127.0.0.1:99999' }
requests: { min_duration: 5h, default_duration: 4h }
teams:
  payments: { lead: '', members: [alice] }
oncall:
  sre: { rotation: [], shift: 0s, starts: yesterday }
roles:
  dev: { logins: [me], nodes: { env: dev }, colour: red }
  dba: { databases: { labels: { env: prod } }, max_duration: 9h }
  ops: { logins: [root], nodes: { env: prod }, max_duration: 2x, request: { roles: [ghost] } }
approval:
  - roles: [dba]
    require: self
  - roles: [ops]
    require: { all_of: ['group:x', 'oncall:sre'] }
  - roles: [nobody]
    require: { count: 0, from: ['role:dba'] }
resources:
  nodes:
    - { name: n1, address: '10.0.0.1:22' }
    - { name: n2, address: '10.0.0.2:22' }
    - { name: n1, address: 'no-port' }
  kube_clusters:
    - { name: k, address: 'http://k8s:6443' }
",
    );
    let paths = e.paths();
    for expected in [
        "colour",
        "storage",
        "listen.api",
        "listen.ssh",
        "requests.default_duration",
        "teams.payments.lead",
        "oncall.sre.rotation",
        "oncall.sre.shift",
        "oncall.sre.starts",
        "roles.dev.colour",
        "roles.ops.max_duration",
        "roles.ops.request.roles[0]",
        "approval[1].require.all_of[0]",
        "approval[2].roles[0]",
        "approval[2].require.count",
        "resources.nodes[2].name",
        "resources.nodes[2].address",
        "resources.kube_clusters[0].address",
    ] {
        assert!(paths.contains(&expected), "missing {expected:?} in:\n{e}");
    }
    // `requests` has a problem, so role limits are not compared with it.
    assert!(!paths.contains(&"roles.dba.max_duration"), "{e}");
    // The broken role `dev` is still a known role name, so nothing refers to it wrongly.
    assert!(!e.to_string().contains("unknown role \"dev\""));
    // Display: one problem per line, `path: message`.
    assert_eq!(e.to_string().lines().count(), e.problems.len());
    assert!(e.to_string().lines().all(|l| l.contains(": ")));
}

#[test]
fn role_max_duration_is_capped_by_requests_max_duration() {
    let e = problems(
        "
version: 1
roles:
  dba: { databases: { labels: { env: prod } }, max_duration: 9h }
  ops: { max_duration: 0s }
",
    );
    has(
        &e,
        "roles.dba.max_duration",
        "9h is longer than requests.max_duration 8h",
    );
    has(&e, "roles.ops.max_duration", "longer than 0s");
    let e = problems(
        "
version: 1
requests: { max_duration: 2d }
roles:
  dba: { max_duration: 3d }
  ops: { max_duration: 36h }
",
    );
    assert_eq!(e.paths(), ["roles.dba.max_duration"], "{e}");
}

#[test]
fn unknown_field_in_a_role_is_reported_with_its_path() {
    let e = problems(
        "
version: 1
roles:
  dba:
    max_duration: 2h
    databases: { labels: { env: prod }, names: ['*'], userz: [app] }
  ops: { logins: [root], nodes: { env: prod }, port_fowarding: false }
",
    );
    has(&e, "roles.dba.databases.userz", "unknown field `userz`");
    has(
        &e,
        "roles.ops.port_fowarding",
        "unknown field `port_fowarding`",
    );
    assert_eq!(e.problems.len(), 2, "{e}");
}

#[test]
fn type_errors_point_inside_entries() {
    let e = problems(
        "
version: 1
roles:
  a: { logins: root, nodes: { env: prod } }
  b: { revoke: maybe }
approval:
  - roles: [a]
    require: { count: -1, from: [] }
  - roles: a
    require: self
",
    );
    has(&e, "roles.a.logins", "invalid type");
    has(&e, "roles.b.revoke", "invalid type");
    has(&e, "approval[0].require.count", "invalid value");
    has(&e, "approval[1].roles", "invalid type");
}

#[test]
fn bad_version() {
    has(&problems("version: 2"), "version", "unsupported version");
    has(&problems("version: '1'"), "version", "unsupported version");
    has(&problems("roles: {}"), "version", "missing");
    has(&problems(""), "version", "missing");
}

#[test]
fn bad_durations() {
    let e = problems(
        "
version: 1
certificates: { login_ttl: 8 }
session: { expiry_warning: -5m, unverified_grace: -1s }
requests: { pending_ttl: '', escalate_after: 1w, max_duration: 99999999999999999999d, max_pending_per_user: 0 }
break_glass: { max_duration: 0s }
auth: { failure_window: 1.5h }
",
    );
    has(&e, "certificates.login_ttl", "missing unit");
    has(&e, "session.expiry_warning", "negative");
    has(&e, "session.unverified_grace", "negative");
    has(&e, "requests.pending_ttl", "empty");
    has(&e, "requests.escalate_after", "unknown unit");
    has(&e, "requests.max_duration", "too long");
    has(&e, "requests.max_pending_per_user", "at least 1");
    has(&e, "break_glass.max_duration", "longer than 0s");
    has(&e, "auth.failure_window", "1.5h");
}

#[test]
fn duration_ordering_is_checked() {
    let e = problems("
version: 1
requests: { min_duration: 2h, default_duration: 1h, max_duration: 30m, pending_ttl: 10m, escalate_after: 20m }
");
    has(
        &e,
        "requests.default_duration",
        "shorter than min_duration 2h",
    );
    has(
        &e,
        "requests.default_duration",
        "longer than max_duration 30m",
    );
    has(&e, "requests.min_duration", "longer than max_duration");
    has(&e, "requests.escalate_after", "pending_ttl");
}

#[test]
fn unknown_roles_in_references() {
    let e = problems(&format!(
        "{MINIMAL_ROLES}    request: {{ roles: [sre, ghost] }}
    review: {{ roles: ['*', phantom] }}
approval:
  - roles: [dba, '*', nope]
    require: {{ any_of: ['role:sre'] }}
"
    ));
    has(&e, "roles.dba.request.roles[1]", "unknown role \"ghost\"");
    has(&e, "roles.dba.review.roles[1]", "unknown role \"phantom\"");
    has(&e, "approval[0].roles[2]", "unknown role \"nope\"");
    assert_eq!(e.problems.len(), 3, "{e}");
}

#[test]
fn bad_reviewer_sets() {
    let e = problems(&format!(
        "{MINIMAL_ROLES}oncall:
  sre: {{ rotation: [dave], shift: 24h, starts: '2026-01-05T09:00:00+01:00' }}
break_glass: {{ enabled: true, notify: ['role:ghost'] }}
approval:
  - roles: [dba]
    require: {{ any_of: ['role:sre', 'oncall:nights', 'user:', 'user:bad name', 'team_lead', sre, 'group:x'] }}
    secondary: ['oncall:sre', 'role:']
  - roles: [sre]
    require: {{ all_of: [] }}
"
    ));
    has(&e, "break_glass.notify[0]", "unknown role");
    has(
        &e,
        "approval[0].require.any_of[1]",
        "unknown on-call schedule",
    );
    has(&e, "approval[0].require.any_of[2]", "names nobody");
    has(&e, "approval[0].require.any_of[3]", "not a valid user name");
    has(&e, "approval[0].require.any_of[4]", "no teams are defined");
    has(&e, "approval[0].require.any_of[5]", "not a reviewer set");
    has(&e, "approval[0].require.any_of[6]", "unknown reviewer kind");
    has(&e, "approval[0].secondary[1]", "names nobody");
    has(&e, "approval[1].require.all_of", "lists no reviewer sets");
    assert!(!e.paths().contains(&"approval[0].require.any_of[0]"));
    assert!(!e.paths().contains(&"approval[0].secondary[0]"));
}

#[test]
fn requirement_forms() {
    let rule =
        |req: &str| format!("{MINIMAL_ROLES}approval:\n  - roles: [dba]\n    require: {req}\n");
    has(
        &problems(&rule("other")),
        "approval[0].require",
        "not a requirement",
    );
    has(
        &problems(&rule("{ any_of: ['role:sre'], all_of: ['role:sre'] }")),
        "approval[0].require",
        "exactly one",
    );
    has(
        &problems(&rule("{ count: 2 }")),
        "approval[0].require",
        "needs `from`",
    );
    has(
        &problems(&rule("{ from: ['role:sre'] }")),
        "approval[0].require",
        "needs `count`",
    );
    has(
        &problems(&rule("{}")),
        "approval[0].require",
        "empty requirement",
    );
    has(
        &problems(&rule("{ anyof: ['role:sre'] }")),
        "approval[0].require.anyof",
        "unknown field",
    );
    has(
        &problems(&rule("[self]")),
        "approval[0].require",
        "invalid type",
    );
    has(
        &problems(&rule("{ count: 3, from: ['user:a', 'user:b', 'user:a'] }")),
        "approval[0].require.count",
        "never be met",
    );
    ok(&rule("{ count: 2, from: ['user:a', 'user:b'] }"));
    ok(&rule("{ count: 5, from: ['role:sre'] }"));
    // A self-approved rule has nobody to escalate to.
    has(
        &problems(&rule("self\n    secondary: ['role:sre']")),
        "approval[0].secondary",
        "self-approved",
    );
}

#[test]
fn overlapping_approval_rules() {
    let e = problems(&format!(
        "{MINIMAL_ROLES}approval:
  - {{ roles: [dba], require: self }}
  - {{ roles: [dba], environment: {{ env: prod }}, require: self }}
  - {{ roles: [sre, dba], require: {{ any_of: ['role:sre'] }} }}
"
    ));
    has(&e, "approval[2].roles[1]", "approval[0]");
    assert_eq!(e.problems.len(), 1, "{e}");
}

/// An approval rule's environment that matches no configured resource (a
/// typo in a label) would never apply: requests would fall back to the
/// rules without one. Reported, naming the labels there are.
#[test]
fn an_approval_environment_must_match_a_resource() {
    let config = |env: &str| {
        format!(
            "{MINIMAL_ROLES}approval:
  - {{ roles: [dba], require: self }}
  - {{ roles: [dba], environment: {{ {env} }}, require: {{ any_of: ['role:sre'] }} }}
resources:
  databases: [{{ name: pg, address: '10.0.0.3:5432', labels: {{ env: prod }} }}]
"
        )
    };
    let e = problems(&config("env: production"));
    has(
        &e,
        "approval[1].environment",
        "matches no resource (their labels: env: prod)",
    );
    assert_eq!(e.problems.len(), 1, "{e}");
    ok(&config("env: prod"));
    ok(&config("env: '*'"));
}

/// Database and Kubernetes names that clients are told and print hold no
/// control characters (an escape sequence would reach the user's terminal).
#[test]
fn names_clients_print_hold_no_control_characters() {
    let e = problems(
        "
version: 1
roles:
  dba:
    databases: { labels: { env: prod }, names: ['*'], users: [app, \"\\e]52;c;aGk=\\a\"] }
  kube:
    kubernetes: { labels: { env: prod }, groups: [\"ops\\u202e\"], users: [' '] }
",
    );
    has(
        &e,
        "roles.dba.databases.users[1]",
        "holds a control character",
    );
    has(
        &e,
        "roles.kube.kubernetes.groups[0]",
        "holds a control character",
    );
    has(&e, "roles.kube.kubernetes.users[0]", "cannot be empty");
    assert_eq!(e.problems.len(), 3, "{e}");
}

/// A role whose `max_duration` is below `requests.min_duration`, or a
/// break-glass maximum below it, could never be requested.
#[test]
fn maximum_durations_are_at_least_the_minimum() {
    let e = problems(
        "
version: 1
requests: { min_duration: 2h }
break_glass: { enabled: true, max_duration: 1h, notify: ['role:sre'] }
roles:
  sre: { max_duration: 90m, request: { roles: [dba, sre] } }
  dba: { max_duration: 2h }
  standing-only: { max_duration: 1h }
",
    );
    has(
        &e,
        "roles.sre.max_duration",
        "1h30m is shorter than requests.min_duration 2h: the role could never be requested",
    );
    has(
        &e,
        "break_glass.max_duration",
        "1h is shorter than requests.min_duration 2h: no break-glass request could be made",
    );
    assert_eq!(e.problems.len(), 2, "{e}");
    // Break-glass turned off: its maximum does not matter.
    ok("
version: 1
requests: { min_duration: 2h }
break_glass: { enabled: false, max_duration: 1h }
roles:
  sre: {}
");
}

#[test]
fn duplicate_resource_names() {
    let e = problems(
        "
version: 1
resources:
  nodes:
    - { name: web, address: '10.0.0.1:22' }
    - { name: web, address: '10.0.0.2:22' }
  databases:
    - { name: web, address: '10.0.0.3:5432' }
    - { name: 'bad name', address: '10.0.0.4:5432' }
    - { name: web, address: '10.0.0.5:5432' }
  kube_clusters:
    - { name: web, address: 'https://10.0.0.6:6443' }
",
    );
    has(
        &e,
        "resources.nodes[1].name",
        "duplicate name \"web\", also used by resources.nodes[0]",
    );
    has(
        &e,
        "resources.databases[1].name",
        "not a valid resource name",
    );
    // One namespace across kinds: requests name resources by name alone.
    has(
        &e,
        "resources.databases[0].name",
        "duplicate name \"web\", also used by resources.nodes[0] (nodes, databases and kube_clusters share one namespace",
    );
    has(
        &e,
        "resources.databases[2].name",
        "also used by resources.nodes[0]",
    );
    has(
        &e,
        "resources.kube_clusters[0].name",
        "also used by resources.nodes[0]",
    );
    assert_eq!(e.problems.len(), 5, "{e}");
}

#[test]
fn addresses() {
    let node =
        |a: &str| format!("version: 1\nresources:\n  nodes: [{{ name: n, address: '{a}' }}]\n");
    for good in [
        "10.0.0.1:22",
        "host.internal:2222",
        "[::1]:22",
        "localhost:22",
    ] {
        ok(&node(good));
    }
    for bad in [
        "10.0.0.1",
        "host:0",
        "host:70000",
        "::1:22",
        "ho st:22",
        ":22",
        "[::1]",
        "[nope]:22",
    ] {
        has(&problems(&node(bad)), "resources.nodes[0].address", "");
    }
    let kube = |a: &str| {
        format!("version: 1\nresources:\n  kube_clusters: [{{ name: k, address: '{a}' }}]\n")
    };
    for good in [
        "https://10.0.0.7:6443",
        "https://k8s.internal",
        "https://[::1]:6443/prefix",
    ] {
        ok(&kube(good));
    }
    for bad in [
        "http://k8s:6443",
        "10.0.0.7:6443",
        "https://",
        "https://u:p@k8s",
        "https://k8s:x",
    ] {
        has(
            &problems(&kube(bad)),
            "resources.kube_clusters[0].address",
            "",
        );
    }
}

#[test]
fn listen_and_storage() {
    let e = problems(
        "
version: 1
storage: 'postgres://'
listen: { api: '127.0.0.1:3080', ssh: '127.0.0.1:3080', kube: 'example.com:443' }
",
    );
    has(&e, "storage", "names no server");
    has(&e, "listen.ssh", "already used by listen.api");
    has(&e, "listen.kube", "not a socket address");
    let c =
        ok("version: 1\nlisten: { api: 'localhost:0', ssh: '[::]:0' }\nstorage: postgres://h/db");
    assert_eq!(c.listen.api.port(), 0);
    assert_eq!(c.storage, Storage::Postgres("postgres://h/db".into()));
    has(
        &problems("version: 1\nstorage: Sqlite"),
        "storage",
        "expected \"sqlite\"",
    );
}

#[test]
fn names_and_labels() {
    let e = problems(
        "
version: 1
cluster_name: 'my cluster'
teams:
  'the team': { lead: 'bob smith', members: ['al:ice'] }
roles:
  'bad role': {}
  a: { logins: ['', 'two words'], nodes: {} }
  b: { logins: [root] }
  c: { nodes: { '*': prod }, kubernetes: { groups: [x] } }
",
    );
    has(&e, "cluster_name", "not a valid cluster name");
    has(&e, "teams.the team", "not a valid team name");
    has(&e, "teams.the team.lead", "not a valid user name");
    has(&e, "teams.the team.members[0]", "not a valid user name");
    has(&e, "roles.bad role", "not a valid role name");
    has(&e, "roles.a.logins[0]", "not a login");
    has(&e, "roles.a.logins[1]", "not a login");
    has(&e, "roles.a.nodes", "matches nothing");
    has(&e, "roles.b.nodes", "missing");
    has(&e, "roles.c.nodes.*", "wildcard");
    has(&e, "roles.c.kubernetes.labels", "matches nothing");
}

#[test]
fn unknown_top_level_and_section_keys_are_all_reported() {
    let e = problems(
        "
version: 1
rolez: {}
approvals: []
listen: { api: '127.0.0.1:3080', http: '127.0.0.1:80' }
resources: { nodes: [], hosts: [], dbs: [] }
",
    );
    for p in [
        "rolez",
        "approvals",
        "listen.http",
        "resources.hosts",
        "resources.dbs",
    ] {
        has(&e, p, "unknown field");
    }
    assert_eq!(e.problems.len(), 5, "{e}");
}

#[test]
fn every_wrong_field_of_one_entry_is_reported() {
    let e = problems(
        "
version: 1
listen: { api: '127.0.0.1:3080', http: '127.0.0.1:80', sshd: ':22', postgres: 5 }
roles:
  dba:
    logins: root
    revoke: maybe
    port_fowarding: false
    databases: { labels: { env: prod }, names: ['*'], userz: [app], dbs: [x] }
teams:
  core: { lead: [alice], membrs: [bob] }
",
    );
    for (p, m) in [
        ("listen.http", "unknown field `http`"),
        ("listen.sshd", "unknown field `sshd`"),
        ("listen.postgres", "invalid type"),
        ("roles.dba.logins", "invalid type"),
        ("roles.dba.revoke", "invalid type"),
        ("roles.dba.port_fowarding", "unknown field"),
        ("roles.dba.databases.userz", "unknown field"),
        ("roles.dba.databases.dbs", "unknown field"),
        ("teams.core.lead", "invalid type"),
        ("teams.core.membrs", "unknown field"),
    ] {
        has(&e, p, m);
    }
    // Taking `lead` out to read on does not add "missing field `lead`".
    assert_eq!(e.problems.len(), 10, "{e}");
    // Nor does taking `count` out add the check of what is left.
    let e = problems(
        "
version: 1
roles:
  dba: { max_duration: 2h }
approval:
  - roles: [dba]
    require: { count: two, from: ['role:dba'] }
",
    );
    assert_eq!(e.problems.len(), 1, "{e}");
    has(&e, "approval[0].require.count", "invalid type");
}

#[test]
fn wrong_shapes_do_not_stop_the_rest() {
    let e = problems(
        "
version: 1
roles: [a, b]
teams: 3
approval: { roles: [a] }
resources: [x]
listen: 127.0.0.1:3080
",
    );
    has(&e, "roles", "expected a mapping");
    has(&e, "teams", "expected a mapping");
    has(&e, "approval", "expected a list");
    has(&e, "resources", "expected a mapping");
    has(&e, "listen", "invalid type");
}

#[test]
fn non_mapping_documents() {
    has(&problems("- a\n- b\n"), ".", "expected a mapping");
    has(&problems("just text"), ".", "expected a mapping");
}

#[test]
fn yaml_syntax_errors_are_one_problem_with_a_position() {
    let e = problems("version: 1\nroles:\n  dev: { logins: [root\n");
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].path, ".");
    assert!(e.problems[0].message.contains("line"), "{e}");
    let e = problems("version: 1\nversion: 1\n");
    assert_eq!(e.problems.len(), 1, "{e}");
    let e = problems("a: &a [*a]\n");
    assert_eq!(e.problems.len(), 1, "{e}");
    let _ = parse("---\nversion: 1\n---\nversion: 1\n", &base());
    let _ = parse("\t\0\u{feff}", &base());
}

#[test]
fn yaml_merge_keys_work() {
    let c = ok("
version: 1
roles:
  base: &base { logins: [ubuntu], nodes: { env: dev } }
  more:
    <<: *base
    max_duration: 1h
");
    assert_eq!(
        c.policy.roles.get("more").unwrap().ssh.logins,
        vec!["ubuntu"]
    );
}

#[test]
fn null_sections_and_entries_are_empty() {
    let c = ok("version: 1\nroles:\n  viewer:\nteams:\napproval:\nresources:\n");
    assert!(c.policy.roles.contains("viewer"));
    let e = problems("version: 1\nteams:\n  t:\n");
    has(&e, "teams.t", "missing field `lead`");
}

#[test]
fn load_reports_read_errors() {
    let e = load(Path::new("/nonexistent/wicket.yaml")).unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].path, "/nonexistent/wicket.yaml");
    assert!(e.problems[0].message.contains("cannot read"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wicket.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let c = load(&path).unwrap();
    assert!(c.data_dir.is_absolute());
    assert!(c.data_dir.ends_with("wicket-data"));
}

/// A secret the driver would not read, only log, is refused.
#[test]
fn a_storage_url_with_a_secret_the_driver_ignores_is_refused() {
    let e = problems("version: 1\nstorage: 'postgres://u@h/db?sslmode=require&sslpassword=k3y'\n");
    has(
        &e,
        "storage",
        "sslpassword: the PostgreSQL driver does not read it",
    );
    assert!(!e.to_string().contains("k3y"), "{e}");
    let c = ok("version: 1\nstorage: 'postgres://u@h/db?sslmode=require&password=p'\n");
    assert_eq!(
        c.storage.redacted(),
        "postgres://u@h/db?sslmode=require&password=***"
    );
}

#[test]
fn redacts_passwords() {
    let s = Storage::Postgres("postgres://u:secret@h:5432/db?sslmode=require".into());
    assert_eq!(s.redacted(), "postgres://u:***@h:5432/db?sslmode=require");
    assert_eq!(
        Storage::Postgres("postgres://u@h/db".into()).redacted(),
        "postgres://u@h/db"
    );
    // Passwords given as query parameters (sqlx and libpq read them).
    let s = Storage::Postgres(
        "postgres://u@h/db?sslmode=verify-full&password=s3cret&PassWord=two&sslpassword=k3y#f"
            .into(),
    );
    assert_eq!(
        s.redacted(),
        "postgres://u@h/db?sslmode=verify-full&password=***&PassWord=***&sslpassword=***#f"
    );
    assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");
    let both = Storage::Postgres("postgres://u:one@h?password=two".into()).redacted();
    assert_eq!(both, "postgres://u:***@h?password=***");
    // A password with '/', '?' or '#' not percent-encoded: the URL does
    // not parse, so none of it is shown, and the configuration is refused
    // without showing it.
    for url in [
        "postgres://wicket:s3cr#t@db/wicket",
        "postgres://wicket:s3/cr?t@db:5432/wicket?password=two",
        "postgresql://wicket:s3cr?t@db",
    ] {
        let shown = Storage::Postgres(url.into()).redacted();
        assert!(shown.ends_with("://(not a valid URL: hidden)"), "{shown}");
        let e = problems(&format!("version: 1\nstorage: '{url}'\n"));
        has(
            &e,
            "storage",
            "the URL does not parse (invalid port number)",
        );
        assert!(
            e.problems.iter().all(|p| !p.message.contains("s3cr")),
            "{:?}",
            e.problems
        );
    }
    // An '@' in the query (a user name with a server, a path), or an
    // unencoded one in the password, is fine.
    for url in [
        "postgres://db/wicket?user=wicket@myserver&password=s3cret",
        "postgres://u:p@ss@db/wicket?sslrootcert=/etc/wicket@prod/ca.pem",
    ] {
        let c = ok(&format!("version: 1\nstorage: '{url}'\n"));
        let shown = c.storage.redacted();
        assert!(
            !shown.contains("s3cret") && !shown.contains("p@ss"),
            "{shown}"
        );
    }
    assert_eq!(
        Storage::Postgres("postgres://db/w?user=a@b&password=s3cret".into()).redacted(),
        "postgres://db/w?user=a@b&password=***"
    );
    // sqlx decodes the name: so does the redaction.
    let encoded = Storage::Postgres("postgres://u@h?pass%77ord=s3cret&pass%2".into()).redacted();
    assert_eq!(encoded, "postgres://u@h?pass%77ord=***&pass%2");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
        let _ = parse(&s, &base());
    }

    #[test]
    fn parse_never_panics_on_yamlish_text(s in "[a-z_:{}\\[\\], '\"*&!<>|#\\n0-9.-]{0,200}") {
        let _ = parse(&s, &base());
    }

    #[test]
    fn parse_never_panics_on_mutated_example(cut in 0usize..2000, junk in "\\PC{0,8}") {
        let mut text = EXAMPLE.to_owned();
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.insert_str(at, &junk);
        let _ = parse(&text, &base());
    }
}

#[test]
fn ssh_node_host_key_pin_and_record_input() {
    let c = ok("
version: 1
session: { record_input: true }
resources:
  nodes:
    - name: n1
      address: 127.0.0.1:22
      host_key: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGeTXCYK9anSIQWZV/MY6mqBUdWjrSIpMlJDFiONRdPR host
    - { name: n2, address: 127.0.0.1:23 }
");
    assert!(c.session.record_input);
    assert_eq!(
        c.node_host_keys.get("n1").map(String::as_str),
        Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGeTXCYK9anSIQWZV/MY6mqBUdWjrSIpMlJDFiONRdPR")
    );
    assert!(!c.node_host_keys.contains_key("n2"));
    assert!(!ok(EXAMPLE).session.record_input);
    let e = problems(
        "
version: 1
resources:
  nodes:
    - { name: n1, address: 127.0.0.1:22, host_key: not-a-key }
",
    );
    has(&e, "resources.nodes[0].host_key", "OpenSSH public key");
}

#[test]
fn audit_and_postgres_sections() {
    let c = ok("
version: 1
audit: { queue_size: 50, on_overflow: drop-and-count, db_parameter_values: true }
postgres: { max_message_bytes: 4096, login_timeout: 5s }
");
    assert_eq!(c.audit.queue_size, 50);
    assert_eq!(c.audit.on_overflow, AuditOverflow::DropAndCount);
    assert!(c.audit.db_parameter_values);
    assert_eq!(c.postgres.max_message_bytes, 4096);
    assert_eq!(c.postgres.login_timeout, chrono::Duration::seconds(5));
    let d = ok("version: 1\n");
    assert_eq!(d.postgres, PostgresSettings::default());
    assert_eq!(d.audit, AuditSettings::default());
    assert_eq!(d.audit.on_overflow, AuditOverflow::Block);

    let e = problems(
        "
version: 1
audit: { queue_size: 0, on_overflow: maybe }
postgres: { max_message_bytes: 10, login_timeout: 0s }
",
    );
    has(&e, "audit.queue_size", "at least 1");
    has(&e, "audit.on_overflow", "block, drop-and-count");
    has(&e, "postgres.max_message_bytes", "outside");
    has(&e, "postgres.login_timeout", "must be longer than 0s");
    let e = problems("version: 1\npostgres: { login_timeout: 11m }\n");
    has(&e, "postgres.login_timeout", "must be at most 10m");
    let e = problems("version: 1\npostgres: { login_timeout: soon }\n");
    has(&e, "postgres.login_timeout", "soon");
    let e = problems("version: 1\npostgres: { max_msg: 1 }\n");
    assert!(e.to_string().contains("max_msg"), "{e}");
}

#[test]
fn connection_limits() {
    let d = ok("version: 1\n");
    assert_eq!(d.limits, Limits::default());
    assert_eq!(d.limits.login_grace, Duration::seconds(60));
    let c = ok("
version: 1
limits: { max_connections: 50, max_unauthenticated: 5, max_connections_per_user: 3, login_grace: 10s, send_timeout: 5m }
");
    assert_eq!(
        c.limits,
        Limits {
            max_connections: 50,
            max_unauthenticated: 5,
            // Capped by the whole share.
            max_unauthenticated_per_source: 5,
            max_connections_per_user: 3,
            login_grace: Duration::seconds(10),
            send_timeout: Duration::minutes(5),
            ..Limits::default()
        }
    );
    assert_eq!(d.limits.max_connections_per_user, 100);
    assert_eq!(d.limits.send_timeout, Duration::seconds(60));
    let e = problems("version: 1\nlimits: { max_connections_per_user: 0 }\n");
    has(&e, "limits.max_connections_per_user", "at least 1");
    // A small max_connections caps the default unauthenticated share.
    assert_eq!(
        ok("version: 1\nlimits: { max_connections: 8 }\n")
            .limits
            .max_unauthenticated,
        8
    );

    let e =
        problems("version: 1\nlimits: { max_connections: 0, login_grace: 0s, send_timeout: 0s }\n");
    has(&e, "limits.max_connections", "at least 1");
    has(&e, "limits.login_grace", "longer than 0s");
    has(&e, "limits.send_timeout", "longer than 0s");
    let e = problems("version: 1\nlimits: { send_timeout: 2h }\n");
    has(&e, "limits.send_timeout", "at most 1h");
    let e = problems("version: 1\nlimits: { login_grace: 11m }\n");
    has(&e, "limits.login_grace", "at most 10m");
    let e = problems(
        "version: 1\nlimits: { max_connections: 5, max_unauthenticated: 6, login_grace: 11m }\n",
    );
    has(
        &e,
        "limits.max_unauthenticated",
        "more than limits.max_connections (5)",
    );
    has(&e, "limits.login_grace", "at most 10m");
    let e = problems("version: 1\nlimits: { max_unauthenticated: 0 }\n");
    has(&e, "limits.max_unauthenticated", "at least 1");
    // One source's share: 50 by default, at most the whole share.
    assert_eq!(d.limits.max_unauthenticated_per_source, 50);
    assert_eq!(
        ok("version: 1\nlimits: { max_unauthenticated: 8 }\n")
            .limits
            .max_unauthenticated_per_source,
        8
    );
    assert_eq!(
        ok("version: 1\nlimits: { max_unauthenticated_per_source: 3 }\n")
            .limits
            .max_unauthenticated_per_source,
        3
    );
    let e = problems(
        "version: 1\nlimits: { max_unauthenticated: 4, max_unauthenticated_per_source: 5 }\n",
    );
    has(
        &e,
        "limits.max_unauthenticated_per_source",
        "more than limits.max_unauthenticated (4)",
    );
    let e = problems("version: 1\nlimits: { max_unauthenticated_per_source: 0 }\n");
    has(&e, "limits.max_unauthenticated_per_source", "at least 1");
    assert_eq!(
        (d.limits.ssh_channel_burst, d.limits.ssh_channels_per_second),
        (300, 30)
    );
    let c = ok("version: 1\nlimits: { ssh_channel_burst: 40, ssh_channels_per_second: 2 }\n");
    assert_eq!(
        (c.limits.ssh_channel_burst, c.limits.ssh_channels_per_second),
        (40, 2)
    );
    let e = problems(
        "version: 1\nlimits: { ssh_channel_burst: 0, ssh_channels_per_second: 1000001 }\n",
    );
    has(&e, "limits.ssh_channel_burst", "0 is outside 1..=1000000");
    has(
        &e,
        "limits.ssh_channels_per_second",
        "1000001 is outside 1..=1000000",
    );
    let e = problems("version: 1\nlimits: { max_startups: 1 }\n");
    assert!(e.to_string().contains("max_startups"), "{e}");
}

#[test]
fn recording_retention() {
    assert_eq!(ok(EXAMPLE).session.recording_retention, None);
    let c = ok("version: 1\nsession: { recording_retention: 90d }\n");
    assert_eq!(c.session.recording_retention, Some(Duration::days(90)));
    let e = problems("version: 1\nsession: { recording_retention: 30m }\n");
    has(
        &e,
        "session.recording_retention",
        "shorter than the least, 1h",
    );
    let e = problems("version: 1\nsession: { recording_retention: forever }\n");
    assert!(e.to_string().contains("session.recording_retention"), "{e}");
}

/// Two listeners on one port are refused before `start` fails to bind,
/// also across a wildcard; with the API's default address (or one given to
/// `start`) when wicketd starts and by `check-config` (`Listen::collision`).
#[test]
fn listeners_that_would_collide_are_refused() {
    let c = ok("version: 1\nlisten: { ssh: '127.0.0.1:3080' }\n");
    let clash = c.listen.collision().unwrap();
    assert!(
        clash.contains("listen.ssh 127.0.0.1:3080 and listen.api 127.0.0.1:3080"),
        "{clash}"
    );
    let mut moved = c.listen;
    moved.api = "127.0.0.1:4000".parse().unwrap();
    assert_eq!(moved.collision(), None);
    // An IPv4 wildcard and an IPv6 address are two sockets; `[::]` is not.
    moved.ssh = Some("0.0.0.0:5000".parse().unwrap());
    moved.postgres = Some("[::1]:5000".parse().unwrap());
    assert_eq!(moved.collision(), None);
    moved.postgres = Some("[::]:5000".parse().unwrap());
    assert!(moved.collision().is_some());
    let e = problems("version: 1\nlisten: { api: '0.0.0.0:4000', postgres: '127.0.0.1:4000' }\n");
    has(&e, "listen.postgres", "already used by listen.api");
    let e = problems("version: 1\nlisten: { api: '127.0.0.1:4000', ssh: '[::]:4000' }\n");
    has(&e, "listen.ssh", "already used by listen.api");
    ok("version: 1\nlisten: { api: '127.0.0.1:4000', ssh: '127.0.0.2:4000', postgres: '127.0.0.1:0' }\n");
}

/// Durations that would overflow the times worked out from them (now +
/// ttl, a window times four), or outlive any use, are refused by
/// `check-config`, not met as a panic at the first login.
#[test]
fn durations_have_a_most() {
    let e = problems(
        "
version: 1
certificates: { login_ttl: 100000000d }
auth: { failure_window: 36501d }
session: { recording_retention: 40000d }
",
    );
    has(&e, "certificates.login_ttl", "longer than the most, 36500d");
    has(&e, "auth.failure_window", "longer than the most, 36500d");
    has(
        &e,
        "session.recording_retention",
        "longer than the most, 36500d",
    );
    let e = problems("version: 1\ncertificates: { login_ttl: 31d }\n");
    has(
        &e,
        "certificates.login_ttl",
        "31d is longer than the most, 30d",
    );
    let c = ok("version: 1\ncertificates: { login_ttl: 30d }\nauth: { failure_window: 36500d }\n");
    assert_eq!(c.login_ttl, Duration::days(30));
}

#[test]
fn recording_limit_and_failure_mode() {
    let d = ok(EXAMPLE);
    assert_eq!(d.session.max_recording_bytes, 1 << 30);
    assert!(d.session.end_on_recording_failure);
    let c = ok("
version: 1
session: { max_recording_bytes: 100000, on_recording_failure: continue }
");
    assert_eq!(c.session.max_recording_bytes, 100_000);
    assert!(!c.session.end_on_recording_failure);
    let e = problems(
        "
version: 1
session: { max_recording_bytes: 10, on_recording_failure: stop }
",
    );
    has(&e, "session.max_recording_bytes", "65536");
    has(&e, "session.on_recording_failure", "end, continue");
}
