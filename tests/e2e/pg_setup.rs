//! The PostgreSQL-behind-Wicket fixture shared by the e2e tests and
//! `bench/pg`: a real PostgreSQL 15 trusting Wicket's database-client CA, a
//! wicketd with the example config pointed at it, users alice (dev), bob
//! (sre) and frank (security-admin), and `wicket proxy db --tunnel`.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wicket_e2e::harness_postgres::Postgres;
use wicket_e2e::harness_util::{run, wait_until};
use wicket_e2e::harness_wicket::{pipe_stdin, wicketd_cmd, WicketCli, Wicketd};

pub const PW: &str = "correct horse battery staple";

/// wicketd (with the example config pointed at a real PostgreSQL that trusts
/// Wicket's database CA), and logged-in users alice (dev), bob (sre) and
/// frank (security-admin).
pub struct Setup {
    pub pg: Postgres,
    pub d: Wicketd,
    pub alice: WicketCli,
    pub bob: WicketCli,
    pub frank: WicketCli,
}

fn wicketd_out(args: &[&str]) -> String {
    run(wicketd_cmd().unwrap().args(args)).unwrap()
}

impl Setup {
    pub fn start(extra_yaml: &str) -> Setup {
        Self::start_edited(|yaml| yaml + extra_yaml)
    }

    /// Like [`Self::start`], with the example config passed through `edit`.
    pub fn start_edited(edit: impl Fn(String) -> String) -> Setup {
        Self::start_with(|yaml, _| edit(yaml))
    }

    /// Like [`Self::start`], with Wicket's own store in a database
    /// (`wicket`) of the same PostgreSQL, as several wicketds share it.
    pub fn start_on_postgres_store() -> Setup {
        Self::start_with(|yaml, pg| {
            pg.create_database("wicket").unwrap();
            assert!(yaml.contains("\nstorage: sqlite "), "{yaml}");
            yaml.replace(
                "\nstorage: sqlite ",
                &format!("\nstorage: {} ", pg.url("wicket")),
            )
        })
    }

    /// A second wicketd sharing this one's store and CA
    /// ([`Self::start_on_postgres_store`]).
    pub fn second_wicketd(&self) -> Wicketd {
        self.d.twin().unwrap()
    }

    /// Like [`Self::start_edited`], where `edit` also sees the PostgreSQL.
    pub fn start_with(edit: impl Fn(String, &Postgres) -> String) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("wicketd-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let data = data.to_str().unwrap();
        // The database side: Wicket's DB-client CA, and a server certificate
        // from Wicket's TLS CA (which the proxy trusts without `ca_file`).
        let client_ca = wicketd_out(&["databases", "ca", "--data-dir", data]);
        assert!(client_ca.contains("BEGIN CERTIFICATE"), "{client_ca}");
        let tls_dir = dir.path().join("pg-tls");
        wicketd_out(&[
            "databases",
            "server-cert",
            "--data-dir",
            data,
            "--database",
            "prod-pg",
            "--name",
            "127.0.0.1",
            "--out",
            tls_dir.to_str().unwrap(),
        ]);
        let pg = Postgres::builder()
            .tls(
                std::fs::read_to_string(tls_dir.join("server.crt")).unwrap(),
                std::fs::read_to_string(tls_dir.join("server.key")).unwrap(),
                Some(client_ca),
            )
            .cert_users(vec!["app".into(), "readonly".into()])
            .start()
            .unwrap();
        pg.psql(
            "postgres",
            "CREATE ROLE app LOGIN; CREATE ROLE readonly LOGIN",
        )
        .unwrap();
        pg.psql("postgres", "CREATE DATABASE app OWNER app")
            .unwrap();

        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/wicket.yaml"
        ))
        .unwrap();
        let yaml = edit(
            example
                .replace("min_duration: 1m", "min_duration: 1s")
                .replace(
                    "{ name: prod-pg, address: 127.0.0.1:5433,",
                    &format!("{{ name: prod-pg, address: 127.0.0.1:{},", pg.port()),
                ),
            &pg,
        );
        let d = Wicketd::builder().config(yaml).start_in(dir).unwrap();
        assert!(d.postgres_addr().is_some(), "{:?}", d.startup_output());
        let login = |name: &str, roles: &str| {
            d.add_user(name, roles, PW, false).unwrap();
            WicketCli::logged_in(&d, name, PW).unwrap()
        };
        let alice = login("alice", "dev");
        let bob = login("bob", "sre");
        let frank = login("frank", "security-admin");
        Setup {
            pg,
            d,
            alice,
            bob,
            frank,
        }
    }

    /// alice asks for `dba`, bob approves, alice logs in with the grant.
    pub fn grant_dba(&self, duration: &str) -> Value {
        self.grant_dba_on(duration, &[])
    }

    /// Like [`Self::grant_dba`], for a request naming `resources`.
    pub fn grant_dba_on(&self, duration: &str, resources: &[&str]) -> Value {
        let mut args = vec![
            "request",
            "create",
            "--roles",
            "dba",
            "--reason",
            "INC-7: fix the invoices table",
            "--duration",
            duration,
            "--format",
            "json",
        ];
        for r in resources {
            args.extend(["--resource", r]);
        }
        let req = self.alice.ok(&args).unwrap().json().unwrap();
        let id = req["id"].as_str().unwrap().to_owned();
        self.bob
            .ok(&["request", "review", &id, "--approve", "--reason", "ok"])
            .unwrap();
        self.alice.ok(&["login", "--request-id", &id]).unwrap();
        self.alice
            .ok(&["request", "show", &id, "--format", "json"])
            .unwrap()
            .json()
            .unwrap()
    }

    /// `wicket proxy db prod-pg --tunnel` as alice, running until dropped.
    pub fn tunnel(&self) -> Tunnel {
        self.tunnel_to("prod-pg")
    }

    /// `wicket proxy db RESOURCE --tunnel` as alice, running until dropped.
    pub fn tunnel_to(&self, resource: &str) -> Tunnel {
        tunnel_of(&self.alice, resource)
    }

    /// alice's audit events of `kind`.
    pub fn events(&self, who: &WicketCli, args: &[&str]) -> Vec<Value> {
        who.audit(args).unwrap()
    }

    /// alice's audit events of `kind`, once there is at least one (the
    /// writer stores them after a short linger).
    pub fn alice_events(&self, kind: &str) -> Vec<Value> {
        wait_until(
            &format!("{kind} audit events"),
            Duration::from_secs(10),
            || {
                let e = self.events(&self.alice, &["--user", "alice", "--kind", kind]);
                (!e.is_empty()).then_some(e)
            },
        )
        .unwrap()
    }

    /// alice's audit events of `kind`, once there are exactly `n`.
    pub fn alice_events_exactly(&self, kind: &str, n: usize) -> Vec<Value> {
        wait_until(
            &format!("{n} {kind} audit events"),
            Duration::from_secs(10),
            || {
                let e = self.events(&self.alice, &["--user", "alice", "--kind", kind]);
                (e.len() == n).then_some(e)
            },
        )
        .unwrap()
    }
}

/// `wicket proxy db RESOURCE --tunnel` as `cli`'s user, running until
/// dropped.
pub fn tunnel_of(cli: &WicketCli, resource: &str) -> Tunnel {
    let mut child = cli
        .cmd()
        .unwrap()
        .args(["proxy", "db", resource, "--tunnel", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let addr: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    // [::1] on the same port too, where the machine has IPv6 and nobody
    // else listens there.
    if let Some(v6) = v["listen_v6"].as_str() {
        let v6: SocketAddr = v6.parse().unwrap();
        assert!(v6.ip().is_loopback() && v6.port() == addr.port(), "{v}");
    }
    Tunnel { child, addr }
}

pub struct Tunnel {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tunnel {
    pub fn conninfo(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=app sslmode=disable",
            self.addr.port()
        )
    }

    pub fn psql(&self, user: &str) -> Command {
        let mut c = Command::new("psql");
        c.arg(self.conninfo(user))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .env_remove("PGPASSWORD");
        c
    }

    /// `psql -c sql` as `app`; (success, stdout, stderr).
    pub fn sql(&self, sql: &str) -> (bool, String, String) {
        self.sql_as("app", sql, "")
    }

    pub fn sql_as(&self, user: &str, sql: &str, stdin: &str) -> (bool, String, String) {
        let out = pipe_stdin(self.psql(user).args(["-c", sql]), stdin).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim_end().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// `pgbench ARGS app` on 127.0.0.1:`port` as `user` with `PGSSLMODE`
/// `sslmode`; its output (it must succeed).
pub fn pgbench(port: u16, user: &str, sslmode: &str, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user])
        .args(args)
        .arg("app")
        .env("PGSSLMODE", sslmode)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "pgbench {args:?} on port {port}: {text}"
    );
    text
}
