//! Roles: what they grant, and the access decisions made from them.

use crate::labels::{LabelSelector, Labels};
use crate::{Decision, Error, Subject};
use chrono::Duration;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// SSH access a role grants: logins on nodes matching a selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshLoginGrant {
    /// Logins; `{{user}}` expands to the Wicket user name.
    pub logins: Vec<String>,
    pub nodes: LabelSelector,
}

/// Database access a role grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseGrant {
    pub labels: LabelSelector,
    /// Database names (`*` for any).
    pub names: Vec<String>,
    /// Database users (`{{user}}` expands).
    pub users: Vec<String>,
}

/// Kubernetes access a role grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubernetesGrant {
    pub labels: LabelSelector,
    pub groups: Vec<String>,
    pub users: Vec<String>,
}

/// A role: what it grants, what its holders may request and review.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub ssh: SshLoginGrant,
    pub databases: Option<DatabaseGrant>,
    pub kubernetes: Option<KubernetesGrant>,
    pub port_forwarding: bool,
    pub agent_forwarding: bool,
    pub x11_forwarding: bool,
    /// Longest grant of this role; `None` means the global maximum applies.
    pub max_duration: Option<Duration>,
    /// Roles its holders may request (`*` for any).
    pub request_roles: Vec<String>,
    /// Roles whose requests its holders may review (`*` for any).
    pub review_roles: Vec<String>,
    /// Holders may revoke any grant.
    pub revoke: bool,
    /// Holders may search and read the audit log and recordings.
    pub audit: bool,
}

/// What kind of resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Node,
    Database,
    KubeCluster,
}

/// An SSH node, database or Kubernetes cluster that Wicket fronts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    pub name: String,
    pub address: String,
    pub labels: Labels,
}

/// A kind of SSH forwarding a role may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshForwarding {
    /// Local port forwarding (`direct-tcpip` channels).
    Port,
    Agent,
    X11,
}

impl SshForwarding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Port => "port",
            Self::Agent => "agent",
            Self::X11 => "X11",
        }
    }
}

/// The validated set of roles.
#[derive(Debug, Clone, Default)]
pub struct RoleSet {
    roles: BTreeMap<String, Role>,
}

fn expand(template: &str, user: &str) -> String {
    template.replace("{{user}}", user)
}

/// Whether role `r` grants `user` the SSH login `login` on `node`.
fn grants_login(r: &Role, node: &Resource, user: &str, login: &str) -> bool {
    r.ssh.nodes.matches(&node.labels) && r.ssh.logins.iter().any(|l| expand(l, user) == login)
}

fn covers(list: &[String], item: &str) -> bool {
    list.iter().any(|x| x == "*" || x == item)
}

impl RoleSet {
    pub fn new(roles: impl IntoIterator<Item = Role>) -> Self {
        Self {
            roles: roles.into_iter().map(|r| (r.name.clone(), r)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.roles.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    /// Checks that every named role exists.
    pub fn check_known<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), Error> {
        for n in names {
            if !self.contains(n) {
                return Err(Error::UnknownRole(n.clone()));
            }
        }
        Ok(())
    }

    /// The roles that hold everywhere (not resource-scoped grants).
    fn held<'a>(&'a self, subject: &'a Subject<'_>) -> impl Iterator<Item = &'a Role> + 'a {
        subject.roles.iter().filter_map(|r| self.roles.get(r))
    }

    /// The roles that hold on `resource`: those held everywhere, and the
    /// scoped ones whose request named it.
    fn held_on<'a>(
        &'a self,
        subject: &'a Subject<'_>,
        resource: &'a Resource,
    ) -> impl Iterator<Item = &'a Role> + 'a {
        let scoped = subject
            .scoped
            .iter()
            .filter(move |s| s.resources.iter().any(|n| n == &resource.name))
            .filter_map(|s| self.roles.get(&s.role));
        self.held(subject).chain(scoped)
    }

    /// Every role held somewhere (for what a certificate carries; the proxy
    /// decides per resource).
    fn held_anywhere<'a>(
        &'a self,
        subject: &'a Subject<'_>,
    ) -> impl Iterator<Item = &'a Role> + 'a {
        let scoped = subject
            .scoped
            .iter()
            .filter_map(|s| self.roles.get(&s.role));
        self.held(subject).chain(scoped)
    }

    /// The SSH principals a certificate for `subject` carries: every login of
    /// every role held, `{{user}}` expanded, sorted and de-duplicated. The user
    /// name itself is always included so a certificate is never principal-less.
    pub fn principals(&self, subject: &Subject<'_>) -> Vec<String> {
        let mut set = BTreeSet::new();
        set.insert(subject.user.to_owned());
        for role in self.held_anywhere(subject) {
            for l in &role.ssh.logins {
                set.insert(expand(l, subject.user));
            }
        }
        set.into_iter().collect()
    }

    /// Whether any held role permits port / agent / X11 forwarding (the
    /// certificate's `permit-*` extensions; the proxy still decides per node).
    pub fn forwarding(&self, subject: &Subject<'_>) -> (bool, bool, bool) {
        let granting: Vec<&Role> = self
            .held_anywhere(subject)
            .filter(|r| !r.ssh.logins.is_empty())
            .collect();
        (
            granting.iter().any(|r| r.port_forwarding),
            granting.iter().any(|r| r.agent_forwarding),
            granting.iter().any(|r| r.x11_forwarding),
        )
    }

    /// The logins `subject` may use on `node`.
    pub fn node_logins(&self, subject: &Subject<'_>, node: &Resource) -> Vec<String> {
        let mut set = BTreeSet::new();
        for role in self.held_on(subject, node) {
            if role.ssh.nodes.matches(&node.labels) {
                for l in &role.ssh.logins {
                    set.insert(expand(l, subject.user));
                }
            }
        }
        set.into_iter().collect()
    }

    /// May `subject` log into `node` as `login`?
    pub fn decide_ssh_login(
        &self,
        subject: &Subject<'_>,
        node: &Resource,
        login: &str,
    ) -> Decision {
        let granting: Vec<&str> = self
            .held_on(subject, node)
            .filter(|r| grants_login(r, node, subject.user, login))
            .map(|r| r.name.as_str())
            .collect();
        if granting.is_empty() {
            Decision::deny(format!(
                "login {login:?} is not allowed on node {:?} for roles [{}]",
                node.name,
                subject.describe()
            ))
        } else {
            Decision::allow(format!(
                "login {login:?} on node {:?} granted by role {}",
                node.name,
                granting.join(", ")
            ))
        }
    }

    /// May `subject`, logged into `node` as `login`, use `kind` forwarding
    /// there? Only roles that grant that login on the node count: a role
    /// that allows forwarding for another login does not lend it to this
    /// one.
    pub fn decide_ssh_forwarding(
        &self,
        subject: &Subject<'_>,
        node: &Resource,
        login: &str,
        kind: SshForwarding,
    ) -> Decision {
        let what = kind.as_str();
        let granting: Vec<&str> = self
            .held_on(subject, node)
            .filter(|r| grants_login(r, node, subject.user, login))
            .filter(|r| match kind {
                SshForwarding::Port => r.port_forwarding,
                SshForwarding::Agent => r.agent_forwarding,
                SshForwarding::X11 => r.x11_forwarding,
            })
            .map(|r| r.name.as_str())
            .collect();
        if granting.is_empty() {
            Decision::deny(format!(
                "{what} forwarding as {login:?} on node {:?} is not allowed for roles [{}]",
                node.name,
                subject.describe()
            ))
        } else {
            Decision::allow(format!(
                "{what} forwarding as {login:?} on node {:?} allowed by role {}",
                node.name,
                granting.join(", ")
            ))
        }
    }

    /// May `subject` list and replay the session recordings of `owner`?
    pub fn decide_recording_read(&self, subject: &Subject<'_>, owner: Option<&str>) -> Decision {
        if let Some(r) = self.held(subject).find(|r| r.audit) {
            return Decision::allow(format!("role {} may read session recordings", r.name));
        }
        if owner == Some(subject.user) {
            return Decision::allow("users may replay their own sessions");
        }
        Decision::deny("replaying other users' sessions needs a role with `audit: true`")
    }

    /// The database names and users `subject` may use on `db`.
    pub fn database_access(
        &self,
        subject: &Subject<'_>,
        db: &Resource,
    ) -> (Vec<String>, Vec<String>) {
        let mut names = BTreeSet::new();
        let mut users = BTreeSet::new();
        for role in self.held_on(subject, db) {
            if let Some(g) = &role.databases {
                if g.labels.matches(&db.labels) {
                    names.extend(g.names.iter().cloned());
                    users.extend(g.users.iter().map(|u| expand(u, subject.user)));
                }
            }
        }
        (names.into_iter().collect(), users.into_iter().collect())
    }

    /// May `subject` connect to database resource `db` as database user
    /// `db_user` to database `db_name`? One role must grant both the user and
    /// the name on a database its labels select.
    pub fn decide_database(
        &self,
        subject: &Subject<'_>,
        db: &Resource,
        db_user: &str,
        db_name: &str,
    ) -> Decision {
        let granting: Vec<&str> = self
            .held_on(subject, db)
            .filter(|r| {
                r.databases.as_ref().is_some_and(|g| {
                    g.labels.matches(&db.labels)
                        && g.users.iter().any(|u| {
                            let u = expand(u, subject.user);
                            u == "*" || u == db_user
                        })
                        && covers(&g.names, db_name)
                })
            })
            .map(|r| r.name.as_str())
            .collect();
        if granting.is_empty() {
            let (names, users) = self.database_access(subject, db);
            let what = if users.is_empty() {
                format!("no role grants access to database {:?}", db.name)
            } else if !users.iter().any(|u| u == "*" || u == db_user) {
                format!(
                    "database user {db_user:?} is not allowed on {:?} (allowed: {})",
                    db.name,
                    users.join(", ")
                )
            } else if !covers(&names, db_name) {
                format!(
                    "database name {db_name:?} is not allowed on {:?} (allowed: {})",
                    db.name,
                    names.join(", ")
                )
            } else {
                format!(
                    "no single role grants database user {db_user:?} with database name {db_name:?} on {:?}",
                    db.name
                )
            };
            Decision::deny(format!("{what} for roles [{}]", subject.describe()))
        } else {
            Decision::allow(format!(
                "database {:?} as {db_user:?} to {db_name:?} granted by role {}",
                db.name,
                granting.join(", ")
            ))
        }
    }

    /// The Kubernetes groups and users `subject` gets on `cluster`.
    pub fn kube_access(
        &self,
        subject: &Subject<'_>,
        cluster: &Resource,
    ) -> (Vec<String>, Vec<String>) {
        let mut groups = BTreeSet::new();
        let mut users = BTreeSet::new();
        for role in self.held_on(subject, cluster) {
            if let Some(g) = &role.kubernetes {
                if g.labels.matches(&cluster.labels) {
                    groups.extend(g.groups.iter().cloned());
                    users.extend(g.users.iter().map(|u| expand(u, subject.user)));
                }
            }
        }
        (groups.into_iter().collect(), users.into_iter().collect())
    }

    /// The resources `subject` can reach now, each with what it may use there.
    pub fn reachable<'r>(
        &self,
        subject: &Subject<'_>,
        resources: &'r [Resource],
    ) -> Vec<(&'r Resource, Vec<String>, Vec<String>)> {
        resources
            .iter()
            .filter_map(|r| {
                let (a, b) = match r.kind {
                    ResourceKind::Node => (self.node_logins(subject, r), Vec::new()),
                    ResourceKind::Database => self.database_access(subject, r),
                    ResourceKind::KubeCluster => self.kube_access(subject, r),
                };
                (!a.is_empty() || !b.is_empty()).then_some((r, a, b))
            })
            .collect()
    }

    /// May any role's holders request `role` (or is it standing-only)?
    pub fn requestable(&self, role: &str) -> bool {
        self.roles.values().any(|r| covers(&r.request_roles, role))
    }

    /// May a holder of `held` request `role`?
    pub fn may_request(&self, held: &[String], role: &str) -> bool {
        held.iter()
            .filter_map(|h| self.roles.get(h))
            .any(|r| covers(&r.request_roles, role))
    }

    /// May a holder of `held` review requests for `role` (by role, absent rules)?
    pub fn may_review(&self, held: &[String], role: &str) -> bool {
        held.iter()
            .filter_map(|h| self.roles.get(h))
            .any(|r| covers(&r.review_roles, role))
    }

    pub fn may_revoke(&self, held: &[String]) -> bool {
        held.iter()
            .filter_map(|h| self.roles.get(h))
            .any(|r| r.revoke)
    }

    pub fn may_audit(&self, held: &[String]) -> bool {
        held.iter()
            .filter_map(|h| self.roles.get(h))
            .any(|r| r.audit)
    }

    /// May `subject` read audit events of `actor` (`None`: everyone's)?
    pub fn decide_audit_read(&self, subject: &Subject<'_>, actor: Option<&str>) -> Decision {
        if let Some(r) = self.held(subject).find(|r| r.audit) {
            return Decision::allow(format!("role {} may read the audit log", r.name));
        }
        if actor == Some(subject.user) {
            return Decision::allow("users may read their own audit events");
        }
        Decision::deny("reading other users' audit events needs a role with `audit: true`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_is_requestable_when_some_role_may_request_it() {
        let role = |name: &str, request: &[&str]| Role {
            name: name.into(),
            request_roles: request.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        let set = RoleSet::new([role("dev", &["dba"]), role("dba", &[]), role("ops", &[])]);
        assert!(set.requestable("dba"));
        assert!(!set.requestable("ops"));
        let set = RoleSet::new([role("dev", &["*"]), role("ops", &[])]);
        assert!(set.requestable("ops"));
    }
    use crate::ScopedRole;

    fn sel(k: &str, v: &str) -> LabelSelector {
        LabelSelector([(k.to_string(), v.to_string())].into())
    }

    fn roles() -> RoleSet {
        RoleSet::new([
            Role {
                name: "dev".into(),
                ssh: SshLoginGrant {
                    logins: vec!["{{user}}".into()],
                    nodes: sel("env", "dev"),
                },
                port_forwarding: true,
                request_roles: vec!["prod-ssh".into()],
                ..Default::default()
            },
            Role {
                name: "prod-ssh".into(),
                ssh: SshLoginGrant {
                    logins: vec!["root".into(), "ubuntu".into()],
                    nodes: sel("env", "prod"),
                },
                ..Default::default()
            },
            Role {
                name: "dba".into(),
                databases: Some(DatabaseGrant {
                    labels: sel("env", "prod"),
                    names: vec!["*".into()],
                    users: vec!["postgres".into()],
                }),
                ..Default::default()
            },
        ])
    }

    fn node(name: &str, env: &str) -> Resource {
        Resource {
            kind: ResourceKind::Node,
            name: name.into(),
            address: "127.0.0.1:22".into(),
            labels: [("env".to_string(), env.to_string())].into(),
        }
    }

    #[test]
    fn principals_expand_user_and_union_roles() {
        let held = vec!["dev".to_string(), "prod-ssh".to_string()];
        let s = Subject::new("alice", &held);
        assert_eq!(roles().principals(&s), vec!["alice", "root", "ubuntu"]);
        let held = vec!["dba".to_string()];
        let s = Subject::new("alice", &held);
        assert_eq!(roles().principals(&s), vec!["alice"]);
    }

    #[test]
    fn ssh_login_decisions_carry_reasons() {
        let rs = roles();
        let held = vec!["dev".to_string()];
        let s = Subject::new("alice", &held);
        let d = rs.decide_ssh_login(&s, &node("dev-1", "dev"), "alice");
        assert!(d.allowed && d.reason.contains("dev"), "{d:?}");
        let d = rs.decide_ssh_login(&s, &node("db-1", "prod"), "root");
        assert!(!d.allowed && d.reason.contains("not allowed"), "{d:?}");
        let held = vec!["dev".to_string(), "prod-ssh".to_string()];
        let s = Subject::new("alice", &held);
        assert!(
            rs.decide_ssh_login(&s, &node("db-1", "prod"), "root")
                .allowed
        );
        assert!(
            !rs.decide_ssh_login(&s, &node("db-1", "prod"), "alice")
                .allowed
        );
    }

    /// Asserts that `s` may log in as root on prod node db-1 and not on
    /// db-2, which it was not scoped to; the two nodes.
    fn only_on_db1(rs: &RoleSet, s: &Subject<'_>) -> (Resource, Resource) {
        let (db1, db2) = (node("db-1", "prod"), node("db-2", "prod"));
        assert!(rs.decide_ssh_login(s, &db1, "root").allowed);
        let d = rs.decide_ssh_login(s, &db2, "root");
        assert!(!d.allowed, "{d:?}");
        assert!(d.reason.contains("prod-ssh (only on db-1)"), "{d:?}");
        (db1, db2)
    }

    #[test]
    fn scoped_roles_hold_only_on_the_named_resources() {
        let rs = roles();
        let standing = vec!["dev".to_string()];
        let scoped = vec![ScopedRole {
            role: "prod-ssh".into(),
            resources: vec!["db-1".into()],
        }];
        let s = Subject {
            user: "alice",
            roles: &standing,
            scoped: &scoped,
        };
        let (db1, db2) = only_on_db1(&rs, &s);
        assert_eq!(rs.node_logins(&s, &db2), Vec::<String>::new());
        assert_eq!(rs.node_logins(&s, &db1), vec!["root", "ubuntu"]);
        // The certificate still carries the login; the proxy decides per node.
        assert!(rs.principals(&s).contains(&"root".to_string()));
        let both = [db1.clone(), db2.clone()];
        let reach: Vec<&str> = rs
            .reachable(&s, &both)
            .into_iter()
            .map(|(r, _, _)| r.name.as_str())
            .collect();
        assert_eq!(reach, ["db-1"]);
        // Grants to roles: a role also held everywhere is not narrowed, and
        // grants of one role on several resources merge.
        let grant = |resources: &[&str], judged: Option<&[&str]>| crate::GrantScope {
            roles: vec!["prod-ssh".to_string()],
            resources: resources.iter().map(|r| r.to_string()).collect(),
            judged_on: judged.map(|j| {
                vec![ScopedRole {
                    role: "prod-ssh".into(),
                    resources: j.iter().map(|r| r.to_string()).collect(),
                }]
            }),
        };
        let (roles, merged) = crate::roles_of_grants(
            standing.clone(),
            &[grant(&["db-1"], None), grant(&[], None)],
        );
        assert_eq!(roles, ["dev", "prod-ssh"]);
        assert!(merged.is_empty());
        let (roles, merged) = crate::roles_of_grants(
            standing.clone(),
            &[grant(&["db-1"], None), grant(&["db-2", "db-1"], None)],
        );
        assert_eq!(roles, standing);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].resources, ["db-1", "db-2"]);
        assert_eq!(merged[0].to_string(), "prod-ssh (only on db-1, db-2)");
    }

    #[test]
    fn a_grant_that_named_no_resources_holds_only_where_it_was_judged() {
        let rs = roles();
        let standing = vec!["dev".to_string()];
        let judged = |on: &[&str]| crate::GrantScope {
            roles: vec!["prod-ssh".to_string(), "dba".to_string()],
            resources: Vec::new(),
            judged_on: Some(vec![ScopedRole {
                role: "prod-ssh".into(),
                resources: on.iter().map(|r| r.to_string()).collect(),
            }]),
        };
        // Approved when only db-1 was configured; db-2 came later with the
        // same labels.
        let (roles, scoped) = crate::roles_of_grants(standing.clone(), &[judged(&["db-1"])]);
        assert_eq!(roles, standing, "not held everywhere");
        let s = Subject {
            user: "alice",
            roles: &roles,
            scoped: &scoped,
        };
        let (_, db2) = only_on_db1(&rs, &s);
        // A granted role with no record reached nothing then: it holds on
        // nothing now.
        let prod_pg = Resource {
            kind: ResourceKind::Database,
            name: "prod-pg".into(),
            address: "127.0.0.1:5432".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
        };
        assert!(!rs.decide_database(&s, &prod_pg, "postgres", "app").allowed);
        assert!(
            s.describe().contains("dba (on no resource)"),
            "{}",
            s.describe()
        );
        // One approved before the record was kept holds everywhere, as then.
        let legacy = crate::GrantScope {
            judged_on: None,
            ..judged(&[])
        };
        let (roles, scoped) = crate::roles_of_grants(standing.clone(), &[legacy]);
        let s = Subject {
            user: "alice",
            roles: &roles,
            scoped: &scoped,
        };
        assert!(rs.decide_ssh_login(&s, &db2, "root").allowed);
        assert!(rs.decide_database(&s, &prod_pg, "postgres", "app").allowed);
    }

    #[test]
    fn database_decisions_need_user_and_name_from_one_role() {
        let rs = roles();
        let db = Resource {
            kind: ResourceKind::Database,
            name: "prod-pg".into(),
            address: "127.0.0.1:5432".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
        };
        let held = vec!["dba".to_string()];
        let s = Subject::new("alice", &held);
        let d = rs.decide_database(&s, &db, "postgres", "app");
        assert!(d.allowed && d.reason.contains("dba"), "{d:?}");
        let d = rs.decide_database(&s, &db, "app", "app");
        assert!(
            !d.allowed && d.reason.contains("\"app\" is not allowed"),
            "{d:?}"
        );
        let dev_db = Resource {
            labels: [("env".to_string(), "dev".to_string())].into(),
            ..db.clone()
        };
        let d = rs.decide_database(&s, &dev_db, "postgres", "app");
        assert!(!d.allowed && d.reason.contains("no role grants"), "{d:?}");
        let held = vec!["dev".to_string()];
        let s = Subject::new("alice", &held);
        assert!(!rs.decide_database(&s, &db, "postgres", "app").allowed);
    }

    #[test]
    fn forwarding_decisions_count_only_roles_with_logins_on_the_node() {
        let rs = roles();
        let held = vec!["dev".to_string(), "prod-ssh".to_string()];
        let s = Subject::new("alice", &held);
        let dev = node("dev-1", "dev");
        let d = rs.decide_ssh_forwarding(&s, &dev, "alice", SshForwarding::Port);
        assert!(d.allowed && d.reason.contains("dev"), "{d:?}");
        let d = rs.decide_ssh_forwarding(&s, &node("db-1", "prod"), "root", SshForwarding::Port);
        assert!(!d.allowed && d.reason.contains("port forwarding"), "{d:?}");
        let d = rs.decide_ssh_forwarding(&s, &dev, "alice", SshForwarding::Agent);
        assert!(!d.allowed && d.reason.contains("agent"), "{d:?}");
        // Tied to the session's login: dev allows forwarding for alice's
        // own login, not for another one a role granted elsewhere.
        let rooted = Role {
            name: "dev-root".into(),
            ssh: SshLoginGrant {
                logins: vec!["root".into()],
                nodes: sel("env", "dev"),
            },
            ..Default::default()
        };
        let rs2 = RoleSet::new(rs.roles.values().cloned().chain([rooted]));
        let held2 = vec!["dev".to_string(), "dev-root".to_string()];
        let s2 = Subject::new("alice", &held2);
        assert!(rs2.decide_ssh_login(&s2, &dev, "root").allowed);
        let d = rs2.decide_ssh_forwarding(&s2, &dev, "root", SshForwarding::Port);
        assert!(!d.allowed && d.reason.contains("as \"root\""), "{d:?}");
        assert!(
            rs2.decide_ssh_forwarding(&s2, &dev, "alice", SshForwarding::Port)
                .allowed
        );
        assert!(rs.decide_recording_read(&s, Some("alice")).allowed);
        assert!(!rs.decide_recording_read(&s, Some("bob")).allowed);
        assert!(!rs.decide_recording_read(&s, None).allowed);
    }

    #[test]
    fn reachable_lists_only_what_roles_grant() {
        let rs = roles();
        let res = vec![node("dev-1", "dev"), node("db-1", "prod")];
        let held = vec!["dev".to_string()];
        let s = Subject::new("bob", &held);
        let r = rs.reachable(&s, &res);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0.name, "dev-1");
        assert_eq!(r[0].1, vec!["bob"]);
    }

    #[test]
    fn request_and_review_permissions() {
        let rs = roles();
        assert!(rs.may_request(&["dev".into()], "prod-ssh"));
        assert!(!rs.may_request(&["dev".into()], "dba"));
        assert!(!rs.may_request(&["unknown".into()], "prod-ssh"));
        assert!(!rs.may_review(&["dev".into()], "prod-ssh"));
    }
}
