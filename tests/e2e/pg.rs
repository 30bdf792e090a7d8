//! PostgreSQL through Wicket, end to end with real PostgreSQL 15, `psql`,
//! `pgbench` and a driver (sqlx): the tunnel, the per-connection decision,
//! statement audit, cancel routing, and sessions cut when the grant ends.

use crate::pg_setup::{tunnel_of, Setup, Tunnel, PW};
use serde_json::Value;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wicket_e2e::harness_postgres::Postgres;
use wicket_e2e::harness_util::{closed_between, read_uninterrupted, run, wait_until};
use wicket_e2e::harness_wicket::WicketCli;

fn pgbench(t: &Tunnel, args: &[&str]) -> String {
    crate::pg_setup::pgbench(t.addr.port(), "app", "disable", args)
}

#[test]
fn psql_pgbench_driver_and_copy_through_the_tunnel_with_every_statement_audited() {
    let s = Setup::start("postgres: { max_message_bytes: 65536 }\n");

    // Without a grant the proxy refuses, and says why.
    let out = s
        .alice
        .run(
            &[
                "db",
                "connect",
                "prod-pg",
                "--db-user",
                "app",
                "--",
                "-X",
                "-At",
                "-c",
                "select 1",
            ],
            "",
        )
        .unwrap();
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("access denied") && out.stderr.contains("no access request grant"),
        "{}",
        out.stderr
    );

    let grant = s.grant_dba("1h");
    let request_id = grant["id"].as_str().unwrap().to_owned();
    let ls = s
        .alice
        .ok(&["db", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ls[0]["name"], "prod-pg", "{ls}");
    assert_eq!(ls[0]["users"], serde_json::json!(["app", "postgres"]));

    // `wicket db connect` runs psql through its own tunnel.
    let out = s
        .alice
        .ok(&[
            "db",
            "connect",
            "prod-pg",
            "--db-user",
            "app",
            "--db-name",
            "app",
            "--",
            "-X",
            "-At",
            "-c",
            "select current_user, 40 + 2",
        ])
        .unwrap();
    assert_eq!(out.stdout.trim(), "app|42", "{}", out.stderr);

    let t = s.tunnel();
    let (ok, _, err) = t.sql(
        "create table invoices(id int primary key, note text); \
         insert into invoices values (1, 'one'), (2, 'two'), (3, 'three')",
    );
    assert!(ok, "{err}");
    let (ok, rows, err) = t.sql("select id, note from invoices where id >= 2 order by id");
    assert!(ok, "{err}");
    assert_eq!(rows, "2|two\n3|three");
    // A client told `localhost` that tries [::1] first reaches the
    // tunnel there too (where the machine has IPv6), not another user's
    // listener.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let out = Command::new("psql")
            .arg(format!(
                "host=::1 port={} user=app dbname=app sslmode=disable",
                t.addr.port()
            ))
            .args(["-X", "-At", "-c", "select count(*) from invoices"])
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "3",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let marker = "select 'audit-marker-7' as m, count(*) from invoices";
    let (ok, rows, err) = t.sql(marker);
    assert!(ok, "{err}");
    assert_eq!(rows, "audit-marker-7|3");

    // COPY in both directions.
    let (ok, _, err) = t.sql_as(
        "app",
        "COPY invoices FROM STDIN",
        "10\tten\n11\televen\n\\.\n",
    );
    assert!(ok, "{err}");
    let (ok, out, err) =
        t.sql("COPY (select id, note from invoices where id >= 10 order by id) TO STDOUT");
    assert!(ok, "{err}");
    assert_eq!(out, "10\tten\n11\televen");

    // pgbench: initialise, then the extended and prepared protocols.
    pgbench(&t, &["-i", "-s", "1", "-q"]);
    for mode in ["extended", "prepared"] {
        let text = pgbench(&t, &["-M", mode, "-c", "2", "-t", "25", "-n"]);
        assert!(
            text.contains("number of transactions actually processed: 50/50"),
            "{text}"
        );
    }

    // A driver with the extended protocol and parameters.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let driver_statement = "select $1::int4 + $2::int4, $3::text";
    let (sum, text): (i32, String) = rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&format!(
            "postgres://app@127.0.0.1:{}/app?sslmode=disable",
            t.addr.port()
        ))
        .await
        .unwrap();
        let row: (i32, String) = sqlx::query_as(driver_statement)
            .bind(40i32)
            .bind(2i32)
            .bind("through wicket")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        row
    });
    assert_eq!((sum, text.as_str()), (42, "through wicket"));

    // A database user the grant does not allow, and a client without TLS.
    let (ok, _, err) = t.sql_as("readonly", "select 1", "");
    assert!(!ok);
    assert!(
        err.contains("database user \"readonly\" is not allowed"),
        "{err}"
    );
    let pg_proxy = s.d.postgres_addr().unwrap();
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
            pg_proxy.port()
        ))
        .args(["-X", "-c", "select 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("must use TLS with a Wicket client certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Bad input: an oversized message, an unsupported protocol version and
    // garbage get an ErrorResponse with the reason; the proxy keeps serving.
    let (ok, _, err) = t.sql(&format!("select '{}'", "x".repeat(70_000)));
    assert!(!ok);
    assert!(err.contains("exceeds the 65536-byte limit"), "{err}");
    for (bytes, reason) in [
        (
            {
                let mut m = 9u32.to_be_bytes().to_vec();
                m.extend_from_slice(&0x0002_0000u32.to_be_bytes());
                m.push(0);
                m
            },
            "unsupported frontend protocol 2.0",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "startup message",
        ),
    ] {
        let mut raw = std::net::TcpStream::connect(pg_proxy).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        raw.write_all(&bytes).unwrap();
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut raw, &mut answer);
        assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains(reason), "{text}");
    }
    let (ok, rows, err) = t.sql("select 1");
    assert!(ok && rows == "1", "{err}");

    // Audit: the marker's session holds exactly what psql sent.
    let find = |kind: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        wait_until(
            &format!("a {kind} audit event"),
            Duration::from_secs(10),
            || {
                s.events(&s.alice, &["--user", "alice", "--kind", kind])
                    .into_iter()
                    .find(|e| pred(e))
            },
        )
        .unwrap()
    };
    let q = find("db_query", &|e| e["data"]["statement"] == marker);
    assert_eq!(q["request_id"], request_id.as_str());
    let session = q["session_id"].as_str().unwrap().to_owned();
    let ended = find("session_ended", &|e| e["session_id"] == session.as_str());
    assert_eq!(ended["data"]["statements"], 1, "{ended}");
    let events = s.events(&s.alice, &["--session", &session]);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["session_started", "db_query", "session_ended"],
        "{events:?}"
    );
    assert_eq!(events[0]["data"]["database"], "app");
    assert_eq!(events[0]["data"]["login"], "app");
    // The other startup parameters, as sent on (user, database and the
    // resource are fields of their own).
    let parameters = events[0]["data"]["parameters"].as_object().unwrap();
    assert_eq!(parameters["application_name"], "psql", "{parameters:?}");
    for own in ["user", "database", "wicket_database"] {
        assert!(!parameters.contains_key(own), "{parameters:?}");
    }
    assert_eq!(
        events[0]["data"]["request_ids"],
        serde_json::json!([request_id])
    );
    assert_eq!(events[1]["data"]["statement"], marker);

    // The extended protocol: Parse with the text, Execute with the count.
    let parse = find("db_parse", &|e| e["data"]["statement"] == driver_statement);
    let exec = find("db_execute", &|e| {
        e["data"]["statement"] == driver_statement && e["session_id"] == parse["session_id"]
    });
    assert_eq!(exec["data"]["params"], 3);
    assert!(
        exec["data"].get("values").is_none(),
        "values only when configured: {exec}"
    );
    find("db_copy", &|e| {
        e["data"]["direction"] == "in" && e["data"]["statement"] == "COPY invoices FROM STDIN"
    });
    find("db_copy", &|e| e["data"]["direction"] == "out");
    find("db_execute", &|e| {
        e["data"]["statement"]
            .as_str()
            .unwrap_or("")
            .contains("UPDATE pgbench_accounts")
    });
    let denied = find("session_denied", &|e| e["data"]["login"] == "readonly");
    assert!(denied["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("readonly"));

    // Replay: the statements with their timing, as text and JSON.
    let play = s.alice.ok(&["play", &session, "--no-wait"]).unwrap().stdout;
    assert!(play.contains(marker), "{play}");
    assert!(play.contains("session ended"), "{play}");
    assert!(play.contains(", parameters {"), "{play}");
    assert!(play.contains("\"application_name\":\"psql\""), "{play}");
    let pj = s
        .alice
        .ok(&["play", &session, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(pj[1]["text"], marker, "{pj}");

    // Sessions count as actions taken under the grant.
    let g = s
        .alice
        .ok(&["request", "show", &request_id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert!(g["actions_taken"].as_i64().unwrap() > 10, "{g}");
    // pgbench's busy sessions had their statements stored several to a row:
    // each session still shows every statement it counted, and the actions
    // taken are exactly the request's action events.
    let ended = s.events(
        &s.alice,
        &[
            "--user",
            "alice",
            "--request",
            &request_id,
            "--kind",
            "session_ended",
        ],
    );
    let mut busiest = 0;
    for e in &ended {
        let events = s.events(
            &s.alice,
            &[
                "--session",
                e["session_id"].as_str().unwrap(),
                "--limit",
                "10000",
            ],
        );
        let statements = events
            .iter()
            .filter(|e| {
                ["db_query", "db_execute", "db_function_call"]
                    .contains(&e["kind"].as_str().unwrap())
            })
            .count();
        assert_eq!(
            Some(statements as u64),
            e["data"]["statements"].as_u64(),
            "{e}"
        );
        assert_eq!(events.last().unwrap()["kind"], "session_ended");
        busiest = busiest.max(statements);
    }
    assert!(
        busiest >= 25 * 7,
        "pgbench's 25 transactions of 7 statements: {busiest}"
    );
    let actions = s
        .events(
            &s.alice,
            &[
                "--user",
                "alice",
                "--request",
                &request_id,
                "--limit",
                "10000",
            ],
        )
        .iter()
        .filter(|e| wicketd::audit::SESSION_ACTION_KINDS.contains(&e["kind"].as_str().unwrap()))
        .count();
    assert_eq!(g["actions_taken"].as_u64(), Some(actions as u64), "{g}");
    drop(s.frank);
    drop(s.pg);
}

fn spawn_sleep(t: &Tunnel, secs: u32) -> Child {
    t.psql("app")
        .args(["-c", &format!("select pg_sleep({secs})")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sleeping_backends(pg: &Postgres) -> Vec<i64> {
    pg.psql(
        "postgres",
        "select pid from pg_stat_activity where query like 'select pg_sleep(%' and state = 'active'",
    )
    .unwrap()
    .lines()
    .filter_map(|l| l.trim().parse().ok())
    .collect()
}

/// A plaintext PostgreSQL connection to a tunnel, spoken by hand, so the
/// test holds the cancel key the proxy handed out.
struct RawPg {
    tcp: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RawPg {
    /// Connects as `app` and reads to the first ReadyForQuery; returns the
    /// connection and its cancel key.
    fn connect(t: &Tunnel) -> (RawPg, (u32, u32)) {
        let tcp = std::net::TcpStream::connect(t.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = RawPg {
            tcp,
            buf: Vec::new(),
        };
        c.tcp
            .write_all(&wicket_api::pg::startup_message(&[
                ("user", "app"),
                ("database", "app"),
            ]))
            .unwrap();
        let mut key = None;
        loop {
            let (tag, msg) = c.next();
            match tag {
                b'K' => {
                    let word = |i: usize| u32::from_be_bytes(msg[i..i + 4].try_into().unwrap());
                    key = Some((word(5), word(9)));
                }
                b'E' => panic!("{:?}", wicket_api::pg::parse_error_response(&msg)),
                b'Z' => return (c, key.expect("BackendKeyData before ReadyForQuery")),
                _ => {}
            }
        }
    }

    fn send(&mut self, tag: u8, body: &[u8]) {
        self.tcp
            .write_all(&wicket_api::pg::message(tag, body))
            .unwrap();
    }

    /// The next whole message: (tag, the message with its header).
    fn next(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some((tag, len)) = wicket_api::pg::read_message(&self.buf, 1 << 20).unwrap() {
                let msg = self.buf.drain(..len).collect();
                return (tag, msg);
            }
            let mut chunk = [0u8; 4096];
            let n = read_uninterrupted(&mut self.tcp, &mut chunk)
                .unwrap_or_else(|e| panic!("no message within 20 s: {e}"));
            assert!(n > 0, "the connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads to the next ErrorResponse: (SQLSTATE, message).
    fn error(&mut self) -> (String, String) {
        loop {
            let (tag, msg) = self.next();
            if tag == b'E' {
                return wicket_api::pg::parse_error_response(&msg).unwrap();
            }
        }
    }
}

/// Sends a CancelRequest with `key` through tunnel `t` and waits for the
/// proxy to close that connection (it has acted then).
fn send_cancel(t: &Tunnel, key: (u32, u32)) {
    let mut raw = std::net::TcpStream::connect(t.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    raw.write_all(&wicket_api::pg::cancel_request(key.0, key.1))
        .unwrap();
    let mut b = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut b);
}

/// Waits for `child` to exit; returns (stderr, when it exited).
fn wait_exit(mut child: Child, within: Duration) -> (String, Instant) {
    let status = wait_until("psql to exit", within, || child.try_wait().unwrap()).unwrap();
    let at = Instant::now();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "psql should fail: {err}");
    (err, at)
}

/// Waits for a `select pg_sleep(..)` to run; its backend's PID.
fn running_sleep(pg: &Postgres) -> i64 {
    wait_until("the query to run", Duration::from_secs(10), || {
        sleeping_backends(pg).first().copied()
    })
    .unwrap()
}

/// Runs `select pg_sleep(60)` through `t`, calls `end` once it runs, and
/// checks psql was cut within a second after it with a FATAL; psql's
/// stderr.
fn psql_cut_within_a_second(s: &Setup, t: &Tunnel, end: impl FnOnce()) -> String {
    let child = spawn_sleep(t, 60);
    running_sleep(&s.pg);
    cut_within_a_second(child, end)
}

/// Calls `end` and checks that `child`, a psql at work, was cut within a
/// second after it with a FATAL; psql's stderr.
fn cut_within_a_second(child: Child, end: impl FnOnce()) -> String {
    end();
    let ended_at = Instant::now();
    let (err, exited) = wait_exit(child, Duration::from_secs(5));
    assert!(
        exited.duration_since(ended_at) <= Duration::from_secs(1),
        "cut after {:?}",
        exited.duration_since(ended_at)
    );
    assert!(err.contains("FATAL"), "{err}");
    err
}

/// A psql running a statement through `t`, cut within a second by frank
/// revoking `id` ([`revoke_cuts`]).
fn revoke_cuts_a_running_psql(s: &Setup, t: &Tunnel, id: &str) {
    let child = spawn_sleep(t, 60);
    running_sleep(&s.pg);
    revoke_cuts(s, child, id, "INC-7 closed");
}

/// [`cut_within_a_second`] by frank revoking `id` for `reason`: FATAL
/// names the request and why.
fn revoke_cuts(s: &Setup, child: Child, id: &str, reason: &str) {
    let err = cut_within_a_second(child, || {
        s.frank
            .ok(&["request", "revoke", id, "--reason", reason])
            .unwrap();
    });
    assert!(
        err.contains(id) && err.contains(&format!("revoked by frank: {reason}")),
        "{err}"
    );
}

/// A revoke ends a session in the middle of streaming results (COPY TO
/// STDOUT, 200 kB messages) at a message boundary, with the FATAL naming
/// the request, as it ends an idle one.
#[test]
fn a_revoke_ends_a_streaming_copy_with_the_reason() {
    let (s, t, id) = granted();
    let copy = "COPY (select repeat('x', 200000) from generate_series(1, 2000000000)) TO STDOUT";
    let child = t
        .psql("app")
        .args(["-c", copy])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the COPY to stream", Duration::from_secs(10), || {
        let active =
            s.pg.psql(
                "postgres",
                "select count(*) from pg_stat_activity where query like 'COPY (select repeat%' \
                 and state = 'active'",
            )
            .unwrap();
        (active.trim() == "1").then_some(())
    })
    .unwrap();
    revoke_cuts(&s, child, &id, "INC-8 closed");
}

/// A session under standing roles ends with the certificate it was opened
/// with (here the login's, `login_ttl: 10s`), as a grant's session ends
/// with the grant: psql gets a FATAL saying so.
#[test]
fn a_standing_database_session_ends_with_its_certificate() {
    let s = standing_database_access(|y| y.replace("login_ttl: 8h", "login_ttl: 10s"));
    let ends = chrono::DateTime::parse_from_rfc3339(
        s.alice.status().unwrap()["valid_before"].as_str().unwrap(),
    )
    .unwrap();
    psql_cut_at_login_end(&s, ends);
}

/// Runs a long `select pg_sleep(..)` through alice's tunnel and checks psql
/// is cut within 1.5 s after `ends`, the login's end, saying so.
fn psql_cut_at_login_end(s: &Setup, ends: chrono::DateTime<chrono::FixedOffset>) {
    let t = s.tunnel();
    let child = spawn_sleep(&t, 60);
    running_sleep(&s.pg);
    let (err, _) = wait_exit(child, Duration::from_secs(20));
    let late = chrono::Utc::now().signed_duration_since(ends);
    assert!(
        err.contains("FATAL") && err.contains("the login behind this session ended"),
        "{err}"
    );
    assert!(
        late <= chrono::Duration::milliseconds(1500),
        "cut {late:?} after the login ended"
    );
}

/// The example config, with role `dev` (alice's) reaching the prod
/// databases as `app` without a grant, and `edit` applied.
fn standing_database_access(edit: impl Fn(String) -> String) -> Setup {
    Setup::start_edited(|y| {
        edit(y.replace(
            "    request: { roles: [ prod-ssh, dba, dev-admin ] }\n",
            "    request: { roles: [ prod-ssh, dba, dev-admin ] }\n    databases: { labels: { env: prod }, names: [ \"*\" ], users: [ app ] }\n",
        ))
    })
}

/// A session the standing roles allow, opened with a grant certificate
/// whose grant is for something else (`dev-admin`: nodes only), ends with
/// the login, not with the certificate: no grant stands behind it.
#[test]
fn a_standing_session_beside_an_unrelated_grant_ends_with_the_login() {
    let s = standing_database_access(|y| y.replace("login_ttl: 8h", "login_ttl: 12s"));
    let req = s
        .alice
        .ok(&[
            "request",
            "create",
            "--roles",
            "dev-admin",
            "--reason",
            "x",
            "--duration",
            "30m",
            "--format",
            "json",
        ])
        .unwrap()
        .json()
        .unwrap();
    let id = req["id"].as_str().unwrap();
    s.alice.ok(&["login", "--request-id", id]).unwrap();
    let status = s.alice.status().unwrap();
    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(status[k].as_str().unwrap()).unwrap();
    let login_ends = at("login_until");
    assert!(
        at("valid_before") > login_ends + chrono::Duration::minutes(10),
        "the certificate runs to the grant's end: {status}"
    );
    psql_cut_at_login_end(&s, login_ends);
}

/// `wicketd users set-roles` reaches live sessions: one that the old
/// standing roles allowed and the new ones do not ends within a second,
/// new connections get the new roles at once, and a session a grant
/// allows goes on.
#[test]
fn taking_a_standing_role_away_ends_the_sessions_it_allowed() {
    let s = standing_database_access(|y| y);
    let set_roles = |roles: &str| {
        let out = run(&mut s
            .d
            .admin(&["users", "set-roles", "alice", "--roles", roles])
            .unwrap())
        .unwrap();
        assert!(out.contains(roles), "{out}");
    };
    let t = s.tunnel();
    let err = psql_cut_within_a_second(&s, &t, || set_roles("dev-admin"));
    assert!(
        err.contains("standing roles of user \"alice\" changed"),
        "{err}"
    );
    // New connections get the new roles from the next refresh of the
    // grant index (250 ms).
    let err = wait_until(
        "the old roles to be refused",
        Duration::from_secs(2),
        || {
            let (ok, _, err) = t.sql("select 1");
            (!ok).then_some(err)
        },
    )
    .unwrap();
    assert!(err.contains("for roles [dev-admin]"), "{err}");
    set_roles("dev");
    wait_until("the new roles to be let in", Duration::from_secs(2), || {
        let (ok, out, _) = t.sql("select 7");
        (ok && out == "7").then_some(())
    })
    .unwrap();
    // An unknown role is refused, and nothing changes.
    let bad =
        s.d.admin(&["users", "set-roles", "alice", "--roles", "no-such-role"])
            .unwrap()
            .output()
            .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role \"no-such-role\""));
    // Under a grant that allows it alone, a session goes on.
    s.grant_dba("30m");
    let child = spawn_sleep(&t, 3);
    running_sleep(&s.pg);
    set_roles("dev-admin");
    let mut child = child;
    let status = wait_until("psql to finish", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    })
    .unwrap();
    assert!(status.success(), "the granted session was cut");
    let events = s.events(&s.frank, &["--kind", "user_roles_set"]);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|e| e["data"]["previous"] == serde_json::json!(["dev"]))
            .count(),
        2,
        "{events:?}"
    );
}

#[test]
fn cancel_requests_reach_the_right_backend_and_revoke_or_expiry_cut_sessions() {
    let s = Setup::start("");
    let grant = s.grant_dba("1h");
    let id = grant["id"].as_str().unwrap().to_owned();
    let t = s.tunnel();

    // A client cancel (psql on SIGINT sends a CancelRequest with the key the
    // proxy gave it); the proxy maps it to the backend's real key.
    let child = spawn_sleep(&t, 30);
    running_sleep(&s.pg);
    // A forged key changes nothing.
    send_cancel(&t, (12345, 67890));
    assert_eq!(
        sleeping_backends(&s.pg).len(),
        1,
        "a forged cancel must not cancel"
    );
    run(Command::new("kill").args(["-INT", &child.id().to_string()])).unwrap();
    let (err, _) = wait_exit(child, Duration::from_secs(10));
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );

    // pg_cancel_backend from another session.
    let child = spawn_sleep(&t, 30);
    let pid = running_sleep(&s.pg);
    let (ok, out, err) = t.sql(&format!("select pg_cancel_backend({pid})"));
    assert!(ok && out == "t", "{out} {err}");
    let (err, _) = wait_exit(child, Duration::from_secs(10));
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );

    // Revoke ends the running session within a second, naming the request.
    revoke_cuts_a_running_psql(&s, &t, &id);
    // New connections are refused with the same reason, though the
    // certificate is still inside its window.
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(err.contains(&id) && err.contains("revoked"), "{err}");

    // Expiry: a short grant ends its live session at its end.
    let grant = s.grant_dba("6s");
    let id = grant["id"].as_str().unwrap().to_owned();
    let expires =
        chrono::DateTime::parse_from_rfc3339(grant["expires_at"].as_str().unwrap()).unwrap();
    let child = spawn_sleep(&t, 60);
    let (err, _) = wait_exit(child, Duration::from_secs(20));
    let late = chrono::Utc::now().signed_duration_since(expires);
    assert!(
        late <= chrono::Duration::milliseconds(1000),
        "cut {late:?} after the grant's end"
    );
    assert!(err.contains(&id) && err.contains("expired"), "{err}");
    // The warning (session.expiry_warning, 15m here) came first.
    assert!(
        err.contains("WARNING") && err.contains("this session will be closed then"),
        "{err}"
    );
    drop(s.bob);
}

/// Two wicketds sharing one PostgreSQL store and one CA, as
/// deploy/README.md runs several: a grant approved through the first is
/// used through the second, and a revoke through the first ends the running
/// psql on the second within a second and refuses its new connections.
#[test]
fn a_revoke_through_one_wicketd_cuts_and_refuses_sessions_on_another() {
    let s = Setup::start_on_postgres_store();
    let d2 = s.second_wicketd();
    assert_ne!(d2.postgres_addr(), s.d.postgres_addr());
    // alice's second profile knows only the second wicketd.
    let alice2 = WicketCli::logged_in(&d2, "alice", PW).unwrap();
    let grant = s.grant_dba("1h");
    let id = grant["id"].as_str().unwrap().to_owned();
    alice2.ok(&["login", "--request-id", &id]).unwrap();
    let t = tunnel_of(&alice2, "prod-pg");
    let (ok, out, err) = t.sql("select 41 + 1");
    assert!(ok && out == "42", "{out} {err}");

    // A query running through the first wicketd is cancelled by a
    // CancelRequest that reaches the second (as behind a load balancer):
    // the key is in the shared store.
    let t1 = s.tunnel();
    let (mut conn, key) = RawPg::connect(&t1);
    conn.send(b'Q', b"select pg_sleep(30)\0");
    running_sleep(&s.pg);
    // One key on record: this session's (the `select 41 + 1` one's is
    // removed as its session ends).
    let keys = "select count(*) from pg_cancel_keys";
    wait_until("one cancel key on record", Duration::from_secs(10), || {
        (s.pg.psql("wicket", keys).unwrap() == "1").then_some(())
    })
    .unwrap();
    // Through the second wicketd, a forged key, and alice's real key sent
    // by bob, are both ignored (as its log says once it has decided).
    let ignored = |d: &wicket_e2e::harness_wicket::Wicketd| {
        d.stderr()
            .matches("cancel request with an unknown key ignored")
            .count()
    };
    send_cancel(&t, (key.0, key.1 ^ 1));
    let bob2 = WicketCli::logged_in(&d2, "bob", PW).unwrap();
    send_cancel(&tunnel_of(&bob2, "prod-pg"), key);
    wait_until(
        "both cancels to be ignored",
        Duration::from_secs(10),
        || (ignored(&d2) == 2).then_some(()),
    )
    .unwrap();
    assert_eq!(
        sleeping_backends(&s.pg).len(),
        1,
        "only alice may cancel her query"
    );
    // alice's key through the second wicketd cancels it.
    send_cancel(&t, key);
    let (code, message) = conn.error();
    assert_eq!(code, "57014", "{message}");
    assert!(
        message.contains("canceling statement due to user request"),
        "{message}"
    );
    conn.send(b'X', b"");
    drop(conn);
    // The key is forgotten when its session ends.
    wait_until("the cancel key to go", Duration::from_secs(10), || {
        (s.pg.psql("wicket", keys).unwrap() == "0").then_some(())
    })
    .unwrap();

    revoke_cuts_a_running_psql(&s, &t, &id);
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(err.contains(&id) && err.contains("revoked"), "{err}");
    // The three sessions (`select 41 + 1`, the cancelled one and the cut
    // one) are on the shared record under the request, the cut one with
    // its reason.
    let ended = wait_until(
        "the sessions' ends on record",
        Duration::from_secs(10),
        || {
            let e = s.events(&s.frank, &["--request", &id, "--kind", "session_ended"]);
            (e.len() == 3).then_some(e)
        },
    )
    .unwrap();
    let reasons: Vec<&str> = ended
        .iter()
        .filter_map(|e| e["data"]["reason"].as_str())
        .collect();
    let cut = format!("access request {id} was revoked by frank: INC-7 closed");
    assert!(
        reasons.contains(&"client closed the connection") && reasons.contains(&cut.as_str()),
        "{reasons:?}"
    );
}

#[test]
fn with_disconnect_on_expiry_off_a_running_session_finishes_but_new_ones_are_refused() {
    let s = Setup::start_edited(|y| {
        y.replace("disconnect_on_expiry: true", "disconnect_on_expiry: false")
    });
    // The tunnel first: it picks up the grant's certificate per connection.
    let t = s.tunnel();
    // A session left running by a drop is still ended by a revoke.
    let grant = s.grant_dba("30m");
    let id = grant["id"].as_str().unwrap().to_owned();
    let mut child = spawn_sleep(&t, 60);
    running_sleep(&s.pg);
    s.alice.ok(&["request", "drop", &id]).unwrap();
    wait_until("the drop on the record", Duration::from_secs(10), || {
        s.events(&s.frank, &["--user", "alice", "--kind", "grant_ended"])
            .iter()
            .any(|e| e["request_id"] == id.as_str())
            .then_some(())
    })
    .unwrap();
    // Two session checks (every 250 ms) later, it still runs.
    let checked = Instant::now() + Duration::from_millis(600);
    wait_until("two session checks", Duration::from_secs(2), || {
        (Instant::now() >= checked).then_some(())
    })
    .unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "psql ended at the drop"
    );
    assert_eq!(sleeping_backends(&s.pg).len(), 1);
    let mut revoke = String::new();
    let err = cut_within_a_second(child, || {
        revoke = s
            .frank
            .ok(&["request", "revoke", &id, "--reason", "INC-9 laptop lost"])
            .unwrap()
            .stdout;
    });
    assert!(
        err.contains(&id) && err.contains("revoked by frank: INC-9 laptop lost"),
        "{err}"
    );
    assert!(
        revoke.contains("had already ended (expired)")
            && revoke.contains("sessions still draining"),
        "{revoke}"
    );
    let shown = s.frank.ok(&["request", "show", &id]).unwrap().stdout;
    assert!(
        shown.contains("Status:       expired")
            && shown.contains("Revoked:      by frank after it ended: INC-9 laptop lost"),
        "{shown}"
    );
    let shown = s
        .frank
        .ok(&["request", "show", &id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(shown["status"], "expired", "{shown}");
    assert_eq!(shown["revoked_by"], "frank", "{shown}");

    // A grant that expires lets its running query finish.
    let grant = s.grant_dba("10s");
    let id = grant["id"].as_str().unwrap().to_owned();
    let expires =
        chrono::DateTime::parse_from_rfc3339(grant["expires_at"].as_str().unwrap()).unwrap();
    let secs = (expires
        .signed_duration_since(chrono::Utc::now())
        .num_seconds()
        + 3)
    .max(3);
    let out = t
        .psql("app")
        .args(["-c", &format!("select pg_sleep({secs}), 'finished'")])
        .output()
        .unwrap();
    assert!(
        chrono::Utc::now().signed_duration_since(expires) > chrono::Duration::zero(),
        "the query must outlive the grant"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("finished"));
    // New connections are refused: the grant, and with it the certificate,
    // has expired.
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(err.contains(&id) && err.contains("expired"), "{err}");
    let ended = s.events(&s.frank, &["--user", "alice", "--kind", "grant_ended"]);
    assert!(
        ended.iter().any(|e| e["request_id"] == id.as_str()),
        "{ended:?}"
    );
}

/// The example config with more databases at prod-pg's address, each
/// prod-pg's line with `name: prod-pg,` replaced by one of `names`.
fn beside_prod_pg(yaml: String, names: &[String]) -> String {
    let line = yaml
        .lines()
        .find(|l| l.contains("{ name: prod-pg,"))
        .expect("the example's prod-pg line")
        .to_owned();
    let mut lines = vec![line.clone()];
    lines.extend(names.iter().map(|n| line.replace("name: prod-pg,", n)));
    yaml.replace(&line, &lines.join("\n"))
}

/// A request that names resources is granted only there: the role's labels
/// also select prod-pg-2, but the grant does not reach it (and `db ls`
/// does not list it).
#[test]
fn a_grant_for_named_resources_holds_only_on_them() {
    let s = Setup::start_edited(|yaml| beside_prod_pg(yaml, &["name: prod-pg-2,".into()]));
    let req = s.grant_dba_on("30m", &["prod-pg"]);
    assert_eq!(req["resources"], serde_json::json!(["prod-pg"]), "{req}");
    let (ok, out, err) = s.tunnel_to("prod-pg").sql("select 40 + 2");
    assert!(ok, "{err}");
    assert_eq!(out, "42");
    let (ok, _, err) = s.tunnel_to("prod-pg-2").sql("select 1");
    assert!(!ok);
    assert!(
        err.contains("no role grants access to database \"prod-pg-2\"")
            && err.contains("dba (only on prod-pg)"),
        "{err}"
    );
    let ls = s
        .alice
        .ok(&["db", "ls", "--format", "json"])
        .unwrap()
        .stdout;
    assert!(
        ls.contains("\"prod-pg\"") && !ls.contains("prod-pg-2"),
        "{ls}"
    );
}

/// wicketd trusts a database's certificate from Wicket's TLS CA only for
/// the database it names: prod-pg's certificate does not pass for
/// prod-pg-2, though both are at the same address, nor for prod-pg-3,
/// whose `ca_file` holds Wicket's TLS CA. And `databases server-cert`
/// names only databases the config has.
#[test]
fn a_database_certificate_stands_only_for_its_own_database() {
    let s = Setup::start_with(|yaml, pg| {
        // The server's chain file: its certificate, then Wicket's TLS CA.
        let chain = pg.data_dir().parent().unwrap().join("server.crt");
        beside_prod_pg(
            yaml,
            &[
                "name: prod-pg-2,".into(),
                format!("name: prod-pg-3, ca_file: '{}',", chain.display()),
            ],
        )
    });
    s.grant_dba("30m");
    let (ok, out, err) = s.tunnel_to("prod-pg").sql("select 40 + 2");
    assert!(ok && out == "42", "{out} {err}");
    for other in ["prod-pg-2", "prod-pg-3"] {
        let (ok, _, err) = s.tunnel_to(other).sql("select 1");
        assert!(!ok);
        assert!(
            err.contains(&format!(
                "the server's certificate is for database \"prod-pg\", not \"{other}\""
            )),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out =
        s.d.admin(&[
            "databases",
            "server-cert",
            "--database",
            "prod-pg-4",
            "--name",
            "db4",
        ])
        .unwrap()
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "\"prod-pg-4\" is not a database in the config (it has: prod-pg, prod-pg-2, prod-pg-3)"
        ),
        "{err}"
    );
    assert!(!dir.path().join("server.key").exists());
}

/// libpq's large-object calls use the fast-path FunctionCall message
/// (`F`), which carries no SQL text: each is audited with its function OID,
/// and any other function's call with its arguments too, whatever
/// `audit.db_parameter_values` says (they are all that says what it did).
#[test]
fn fast_path_function_calls_are_audited() {
    let (s, t, _) = granted();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, b"wicket large object").unwrap();
    let (ok, out, err) = t.sql(&format!("\\lo_import {}", file.display()));
    assert!(ok, "{out} {err}");
    let (ok, out, err) = t.sql("select count(*) from pg_largeobject_metadata");
    assert!(
        ok && out == "1",
        "the large object was written: {out} {err}"
    );
    let calls = s.alice_events("db_function_call");
    for c in &calls {
        let d = &c["data"];
        assert!(d["function_oid"].as_u64().is_some_and(|o| o > 0), "{c}");
        assert!(d["args"].as_u64().is_some(), "{c}");
        assert!(d["session_id"].as_str().is_some(), "{c}");
        // The object's data is like a bound value: off by default.
        assert!(d.get("values").is_none(), "{c}");
    }
    assert!(!calls.is_empty());
    // set_config (OID 2078) called by hand: no text, but its arguments
    // say what it did.
    let mut f = RawFrontend::connect(&t);
    let mut call = Vec::new();
    call.extend_from_slice(&2078u32.to_be_bytes());
    call.extend_from_slice(&0u16.to_be_bytes()); // all text
    call.extend_from_slice(&3u16.to_be_bytes());
    for arg in ["application_name", "set-by-fast-path", "false"] {
        call.extend_from_slice(&(arg.len() as u32).to_be_bytes());
        call.extend_from_slice(arg.as_bytes());
    }
    call.extend_from_slice(&0u16.to_be_bytes()); // text result
    f.tcp.write_all(&RawFrontend::msg(b'F', &[&call])).unwrap();
    let tags = f.until_ready(1);
    assert!(tags.contains(&b'V'), "{:?}", String::from_utf8_lossy(&tags));
    let call = wait_until("the call on the record", Duration::from_secs(10), || {
        s.alice_events("db_function_call")
            .into_iter()
            .find(|c| c["data"]["function_oid"] == 2078)
    })
    .unwrap();
    assert!(
        call["data"]["values"]
            .to_string()
            .contains("set-by-fast-path"),
        "{call}"
    );
}

/// Errors the server returns are audited with their SQLSTATE and message,
/// also one too large to read whole (its code and the start of it).
#[test]
fn errors_returned_by_the_server_are_audited() {
    let (s, t, _) = granted();
    let (ok, _, err) = t.sql("select 1/0");
    assert!(!ok && err.contains("division by zero"), "{err}");
    let (ok, _, err) = t.sql("select repeat('x', 1100000)::int");
    assert!(
        !ok && err.contains("invalid input syntax"),
        "{}",
        &err[..err.len().min(300)]
    );
    let errors = wait_until("both db_error events", Duration::from_secs(10), || {
        let e = s.events(&s.alice, &["--user", "alice", "--kind", "db_error"]);
        (e.len() >= 2).then_some(e)
    })
    .unwrap();
    let data = |code: &str| {
        errors
            .iter()
            .map(|e| &e["data"])
            .find(|d| d["code"] == code)
            .unwrap_or_else(|| panic!("no {code} in {errors:?}"))
            .clone()
    };
    assert_eq!(data("22012")["message"], "division by zero");
    let big = data("22P02");
    let message = big["message"].as_str().unwrap();
    assert!(
        message.starts_with("invalid input syntax for type integer: \"xxx")
            && message.contains("(cut: the whole error is")
            && message.len() < 5000,
        "{}",
        &message[..message.len().min(300)]
    );
}

/// Disabling a user ends their live sessions within a second (whatever
/// grants they run under) and refuses new ones; `users enable` undoes it.
#[test]
fn disabling_a_user_ends_their_sessions() {
    let (s, t, _) = granted();
    let err = psql_cut_within_a_second(&s, &t, || {
        let out = run(&mut s.d.admin(&["users", "disable", "alice"]).unwrap()).unwrap();
        assert!(out.contains("disabled"), "{out}");
    });
    assert!(err.contains("user \"alice\" was disabled"), "{err}");
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(err.contains("no longer exists or is disabled"), "{err}");
    let ls = run(&mut s.d.admin(&["users", "ls"]).unwrap()).unwrap();
    assert!(
        ls.lines()
            .any(|l| l.starts_with("alice") && l.ends_with(" disabled")),
        "{ls}"
    );
    // An unknown user is an error, not a silent success.
    let unknown =
        s.d.admin(&["users", "disable", "nobody"])
            .unwrap()
            .output()
            .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no user \"nobody\""));
    run(&mut s.d.admin(&["users", "enable", "alice"]).unwrap()).unwrap();
    let (ok, out, err) = t.sql("select 7");
    assert!(ok && out == "7", "{err}");
    let events = s.events(&s.frank, &["--kind", "user_disabled"]);
    assert_eq!(events.len(), 2, "{events:?}");
}

/// A byte stream a raw client speaks over: TCP to a tunnel, or TLS to
/// wicketd's listener.
trait Wire: std::io::Read + Write {}
impl<T: std::io::Read + Write> Wire for T {}

/// A raw frontend: PostgreSQL messages written by hand, for what no client
/// library will send.
struct RawFrontend {
    tcp: Box<dyn Wire>,
    buf: Vec<u8>,
}

impl RawFrontend {
    fn connect(t: &Tunnel) -> RawFrontend {
        let startup = wicket_api::pg::startup_message(&[("user", "app"), ("database", "app")]);
        Self::connect_with(t, &startup).0
    }

    /// Connected with the `startup` message given; the tags of what came
    /// before the first ReadyForQuery.
    fn connect_with(t: &Tunnel, startup: &[u8]) -> (RawFrontend, Vec<u8>) {
        Self::start(Box::new(Self::tcp_to(t)), startup)
    }

    /// TCP to the tunnel `t`, with a read timeout.
    fn tcp_to(t: &Tunnel) -> std::net::TcpStream {
        let tcp = std::net::TcpStream::connect(t.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp
    }

    /// Straight to wicketd's listener, as a client that speaks TLS itself
    /// does (SSLRequest, then TLS with `cli`'s certificate), with
    /// `startup`; the tags of what came before the first ReadyForQuery.
    fn direct_with(s: &Setup, cli: &WicketCli, startup: &[u8]) -> (RawFrontend, Vec<u8>) {
        use std::io::Read;
        let status = cli
            .ok(&["status", "--format", "json"])
            .unwrap()
            .json()
            .unwrap();
        let read = |k: &str| std::fs::read_to_string(status["files"][k].as_str().unwrap()).unwrap();
        let identity = wicket::client::ClientIdentity {
            cert_pem: read("tls_certificate"),
            key_pem: read("tls_key"),
        };
        let verifier = wicket::client::proxy_verifier(&read("ca_bundle")).unwrap();
        let cfg = wicket::client::tls_config(verifier, Some(&identity)).unwrap();
        let mut tcp = std::net::TcpStream::connect(s.d.postgres_addr().unwrap()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"S");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        Self::start(Box::new(rustls::StreamOwned::new(conn, tcp)), startup)
    }

    fn start(mut tcp: Box<dyn Wire>, startup: &[u8]) -> (RawFrontend, Vec<u8>) {
        tcp.write_all(startup).unwrap();
        let mut f = RawFrontend {
            tcp,
            buf: Vec::new(),
        };
        let tags = f.until_ready(1);
        (f, tags)
    }

    fn msg(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        wicket_api::pg::message(tag, &parts.concat())
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        Self::msg(
            b'P',
            &[&Self::cstr(name), &Self::cstr(sql), &0u16.to_be_bytes()],
        )
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        let zero = 0u16.to_be_bytes();
        Self::msg(
            b'B',
            &[
                &Self::cstr(portal),
                &Self::cstr(statement),
                &zero,
                &zero,
                &zero,
            ],
        )
    }

    fn execute(portal: &str) -> Vec<u8> {
        Self::msg(b'E', &[&Self::cstr(portal), &0u32.to_be_bytes()])
    }

    fn close_statement(name: &str) -> Vec<u8> {
        Self::msg(b'C', &[b"S", &Self::cstr(name)])
    }

    fn sync() -> Vec<u8> {
        Self::msg(b'S', &[])
    }

    fn query(sql: &str) -> Vec<u8> {
        Self::msg(b'Q', &[&Self::cstr(sql)])
    }

    fn terminate() -> Vec<u8> {
        Self::msg(b'X', &[])
    }

    /// Reads messages until `stop` says so or the connection closes; returns
    /// the tags seen and the texts of the ErrorResponses among them.
    fn read_until(&mut self, stop: impl Fn(u8) -> bool) -> (Vec<u8>, Vec<String>) {
        let (mut tags, mut errors) = (Vec::new(), Vec::new());
        loop {
            if let Some((tag, len)) = wicket_api::pg::read_message(&self.buf, 1 << 20).unwrap() {
                tags.push(tag);
                if tag == b'E' {
                    let (code, message) =
                        wicket_api::pg::parse_error_response(&self.buf[..len]).unwrap();
                    errors.push(format!("{code} {message}"));
                }
                self.buf.drain(..len);
                if stop(tag) {
                    return (tags, errors);
                }
                continue;
            }
            let mut tmp = [0u8; 4096];
            match read_uninterrupted(&mut self.tcp, &mut tmp) {
                Ok(0) | Err(_) => return (tags, errors),
                Ok(k) => self.buf.extend_from_slice(&tmp[..k]),
            }
        }
    }

    /// Reads until `n` ReadyForQuery; returns the tags seen.
    fn until_ready(&mut self, n: usize) -> Vec<u8> {
        let mut tags = Vec::new();
        let mut ready = 0;
        while ready < n {
            if let Some((tag, len)) = wicket_api::pg::read_message(&self.buf, 1 << 20).unwrap() {
                tags.push(tag);
                ready += usize::from(tag == b'Z');
                self.buf.drain(..len);
                continue;
            }
            let mut tmp = [0u8; 4096];
            let k = read_uninterrupted(&mut self.tcp, &mut tmp).unwrap();
            assert!(
                k > 0,
                "connection closed after {:?}",
                String::from_utf8_lossy(&tags)
            );
            self.buf.extend_from_slice(&tmp[..k]);
        }
        tags
    }
}

/// The session of alice's query `statement` (one of her first thousand),
/// once it is on the record.
fn session_of_query(s: &Setup, statement: &str) -> String {
    wait_until(
        &format!("{statement:?} on the record"),
        Duration::from_secs(10),
        || {
            s.events(&s.alice, &["--user", "alice", "--kind", "db_query"])
                .iter()
                .find(|e| e["data"]["statement"] == statement)
                .map(|e| e["session_id"].as_str().unwrap().to_owned())
        },
    )
    .unwrap()
}

/// alice's `kind` events of `session`, once its end is on the record (and
/// with it all it audited).
fn events_of_ended_session(s: &Setup, session: &str, kind: &str) -> Vec<Value> {
    wait_until("the session's end", Duration::from_secs(10), || {
        let ended = s.events(&s.alice, &["--session", session, "--kind", "session_ended"]);
        (!ended.is_empty()).then_some(())
    })
    .unwrap();
    s.events(&s.alice, &["--session", session, "--kind", kind])
}

/// alice with a dba grant, her tunnel, and a two-row table `ledger`.
fn with_ledger() -> (Setup, Tunnel) {
    let (s, t, _) = granted();
    let (ok, out, err) = t.sql("create table ledger(x int); insert into ledger values (1), (2)");
    assert!(ok, "{out} {err}");
    (s, t)
}

/// A client may pipeline more statement text than the proxy holds
/// unanswered (32 MiB) before its Sync. The server keeps its few short
/// answers until that Sync, which the proxy has not read yet: the proxy
/// asks for them with a Flush of its own instead of waiting forever.
#[test]
fn a_pipeline_past_what_the_proxy_holds_still_gets_its_answers() {
    let (s, t) = with_ledger();
    // A second handle on the connection writes while this one reads.
    let tcp = RawFrontend::tcp_to(&t);
    let mut writer = tcp.try_clone().unwrap();
    let startup = wicket_api::pg::startup_message(&[("user", "app"), ("database", "app")]);
    let (mut f, _) = RawFrontend::start(Box::new(tcp), &startup);
    let text = format!("SELECT 1 -- {}", "x".repeat(60 * 1024));
    let parses = 600;
    let mut batch = Vec::new();
    for _ in 0..parses {
        batch.extend_from_slice(&RawFrontend::parse("", &text));
    }
    batch.extend_from_slice(&RawFrontend::sync());
    let sender = std::thread::spawn(move || writer.write_all(&batch));
    let tags = f.until_ready(1);
    sender.join().unwrap().unwrap();
    assert_eq!(tags.len(), parses + 1);
    assert!(tags[..parses].iter().all(|&t| t == b'1'), "{tags:?}");
    // The session goes on.
    f.tcp.write_all(&RawFrontend::query("SELECT 2")).unwrap();
    assert_eq!(String::from_utf8_lossy(&f.until_ready(1)), "TDCZ");
    // Nothing after a Terminate reaches the server, nor the record.
    f.tcp
        .write_all(
            &[
                RawFrontend::query("SELECT 3"),
                RawFrontend::terminate(),
                RawFrontend::query("INSERT INTO ledger VALUES (77)"),
            ]
            .concat(),
        )
        .unwrap();
    f.read_until(|_| false);
    let session = session_of_query(&s, "SELECT 2");
    let queries: Vec<Value> = events_of_ended_session(&s, &session, "db_query")
        .iter()
        .map(|e| e["data"]["statement"].clone())
        .collect();
    assert_eq!(queries, ["SELECT 2", "SELECT 3"]);
}

/// alice with a dba grant (its ID), her tunnel, and an empty table
/// `ledger`.
fn with_empty_ledger() -> (Setup, Tunnel, String) {
    let (s, t, id) = granted();
    let (ok, out, err) = t.sql("create table ledger(x int)");
    assert!(ok, "{out} {err}");
    (s, t, id)
}

/// A lab (no extra settings) where alice holds a 30 minute dba grant: the
/// lab, her tunnel, and the grant's ID.
fn granted() -> (Setup, Tunnel, String) {
    let s = Setup::start("");
    let id = s.grant_dba("30m")["id"].as_str().unwrap().to_owned();
    let t = s.tunnel();
    (s, t, id)
}

/// A psql session outside Wicket holding advisory lock `key`, until its
/// stdin is dropped and it is waited for.
fn hold_advisory_lock(s: &Setup, key: u32) -> HeldLock {
    hold_lock(s, &format!("select pg_advisory_lock({key});"))
}

/// A psql session outside Wicket that ran `sql` (taking a lock), once it
/// has: held until released.
fn hold_lock(s: &Setup, sql: &str) -> HeldLock {
    let mut holder =
        s.pg.psql_session("app")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    let mut holder_in = holder.stdin.take().unwrap();
    holder_in
        .write_all(format!("{sql}\nselect 'held';\n").as_bytes())
        .unwrap();
    // Told on its own session: another one may wait on the lock.
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut out, &mut line).is_ok_and(|n| n > 0) {
            if line.trim() == "held" {
                let _ = tx.send(());
                return;
            }
            line.clear();
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the lock held within 20 s");
    HeldLock { holder, holder_in }
}

/// An advisory lock held by a psql outside Wicket.
struct HeldLock {
    holder: Child,
    holder_in: std::process::ChildStdin,
}

impl HeldLock {
    /// Ends the holder's session, and with it the lock.
    fn release(mut self) {
        drop(self.holder_in);
        self.holder.wait().unwrap();
    }
}

/// Waits until none of `queries` is running on the server, or waiting.
fn wait_none_running(s: &Setup, what: &str, queries: &[&str]) {
    let list: Vec<String> = queries.iter().map(|q| format!("'{q}'")).collect();
    let running = format!(
        "select count(*) from pg_stat_activity where query in ({})",
        list.join(", ")
    );
    wait_until(what, Duration::from_secs(10), || {
        (s.pg.psql("app", &running).unwrap() == "0").then_some(())
    })
    .unwrap();
}

/// Waits until `query` waits for a lock on the server.
fn wait_for_lock_wait(s: &Setup, query: &str) {
    let waiting = format!(
        "select count(*) from pg_stat_activity where query = '{query}' and wait_event_type = 'Lock'"
    );
    wait_until("the query waiting", Duration::from_secs(10), || {
        (s.pg.psql("app", &waiting).unwrap() == "1").then_some(())
    })
    .unwrap();
}

/// Revokes request `id` with `reason` as frank; `f` then reads the FATAL
/// naming it, and the close.
fn revoke_and_read_the_cut(s: &Setup, f: &mut RawFrontend, id: &str, reason: &str) {
    s.frank
        .ok(&["request", "revoke", id, "--reason", reason])
        .unwrap();
    let (tags, errors) = f.read_until(|_| false);
    assert_eq!(tags, b"E", "{errors:?}");
    assert!(
        errors[0].starts_with("57P01") && errors[0].contains(reason),
        "{errors:?}"
    );
}

/// A revoke cuts a session whose pipeline waits on a lock: the waiting
/// statement is cancelled, so neither it nor what the client pipelined
/// behind it runs once the lock is free, and the record says they were
/// sent but never answered.
#[test]
fn a_cut_pipeline_does_not_run_on() {
    let (s, t, id) = with_empty_ledger();
    // A lock held outside Wicket keeps the pipeline's first statement
    // waiting, and with it every answer (the server sends them at the Sync).
    let lock = hold_advisory_lock(&s, 4242);
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(&RawFrontend::query("SELECT 'cut-marker'"))
        .unwrap();
    f.until_ready(1);
    let statements = [
        "SELECT pg_advisory_lock(4242)",
        "INSERT INTO ledger VALUES (41)",
        "INSERT INTO ledger VALUES (42)",
    ];
    let mut pipeline = Vec::new();
    for sql in statements {
        pipeline.extend([
            RawFrontend::parse("", sql),
            RawFrontend::bind("", ""),
            RawFrontend::execute(""),
        ]);
    }
    pipeline.push(RawFrontend::sync());
    f.tcp.write_all(&pipeline.concat()).unwrap();
    wait_for_lock_wait(&s, "SELECT pg_advisory_lock(4242)");
    revoke_and_read_the_cut(&s, &mut f, &id, "INC-9 closed");
    // Ended (and its connection closed): no longer waiting, with the lock
    // still held. Without that it would wait for the lock.
    wait_none_running(
        &s,
        "the statement cancelled",
        &["SELECT pg_advisory_lock(4242)"],
    );
    lock.release();
    assert_eq!(
        s.pg.psql("app", "select count(*) from ledger").unwrap(),
        "0"
    );
    let session = session_of_query(&s, "SELECT 'cut-marker'");
    let executed: Vec<(String, bool)> = events_of_ended_session(&s, &session, "db_execute")
        .iter()
        .map(|e| {
            (
                e["data"]["statement"].as_str().unwrap().to_owned(),
                e["data"]["unanswered"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let want: Vec<(String, bool)> = statements.iter().map(|s| (s.to_string(), true)).collect();
    assert_eq!(executed, want);
}

/// `wicket play` replays a whole database session, past the 10,000 events
/// one audit search returns (it reads them in pages and prints each page as
/// it comes), every statement once and in order, as JSON and as text.
#[test]
fn a_session_of_more_events_than_one_search_returns_replays_whole() {
    let (s, t) = with_ledger();
    let n = 10_050;
    let mut script = String::from("select 'paging-marker';\n");
    for i in 0..n {
        script.push_str(&format!("select {i};\n"));
    }
    let out = wicket_e2e::harness_wicket::pipe_stdin(&mut t.psql("app"), &script).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session = session_of_query(&s, "select 'paging-marker';");
    let replay = wait_until("the whole session", Duration::from_secs(20), || {
        let pj = s
            .alice
            .ok(&["play", &session, "--format", "json"])
            .unwrap()
            .json()
            .unwrap();
        let ended = pj
            .as_array()
            .unwrap()
            .last()
            .is_some_and(|e| e.to_string().contains("session ended"));
        ended.then_some(pj)
    })
    .unwrap();
    let texts: Vec<&str> = replay
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .filter(|t| t.starts_with("select "))
        .collect();
    let want: Vec<String> = std::iter::once("select 'paging-marker';".to_owned())
        .chain((0..n).map(|i| format!("select {i};")))
        .collect();
    assert_eq!(texts, want);
    let text = s.alice.ok(&["play", &session, "--no-wait"]).unwrap().stdout;
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("s] select ").map(|(_, t)| t))
        .collect();
    assert_eq!(
        lines.len(),
        n + 1,
        "{}",
        &text[text.len().saturating_sub(500)..]
    );
    assert_eq!(lines[n], format!("{};", n - 1));
    assert!(text
        .trim_end()
        .lines()
        .last()
        .unwrap()
        .contains("-- session ended"));
    // A database session has no terminal recording; an unknown one has no
    // events: each says so, before anything is printed.
    let cast = s
        .alice
        .run(&["play", &session, "--format", "cast"], "")
        .unwrap();
    assert!(!cast.ok && cast.stdout.is_empty(), "{cast:?}");
    assert!(
        cast.stderr.contains("has no recording here"),
        "{}",
        cast.stderr
    );
    let none = s
        .alice
        .run(
            &[
                "play",
                "00000000-0000-4000-8000-000000000000",
                "--format",
                "json",
            ],
            "",
        )
        .unwrap();
    assert!(!none.ok && none.stdout.is_empty(), "{none:?}");
    assert!(none.stderr.contains("no session"), "{}", none.stderr);
}

/// PostgreSQL tells statements and portals apart by their first 63 bytes.
/// Two longer names that begin alike would be one object to the server and
/// two to the audit, which could then log one's text for the other's run:
/// such names are refused unsent, with the reason.
#[test]
fn names_longer_than_postgresql_tells_apart_are_refused() {
    let (s, t) = with_ledger();
    let mut f = RawFrontend::connect(&t);
    // (And a COPY is audited with its own statement, not with the last one
    // sent: here, a query pipelined after it.)
    f.tcp
        .write_all(
            &[
                RawFrontend::query("COPY (SELECT x FROM ledger) TO STDOUT"),
                RawFrontend::query("SELECT 'after the copy'"),
            ]
            .concat(),
        )
        .unwrap();
    f.until_ready(2);
    let copy = s.alice_events("db_copy");
    assert_eq!(
        copy[0]["data"]["statement"], "COPY (SELECT x FROM ledger) TO STDOUT",
        "{copy:?}"
    );
    let longest = "s".repeat(63);
    f.tcp
        .write_all(
            &[
                RawFrontend::parse(&longest, "SELECT 1"),
                RawFrontend::bind(&longest, &longest),
                RawFrontend::execute(&longest),
                RawFrontend::sync(),
            ]
            .concat(),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&f.until_ready(1)), "12DCZ");
    let too_long = format!("{longest}2");
    f.tcp
        .write_all(
            &[
                RawFrontend::parse(&too_long, "DELETE FROM ledger"),
                RawFrontend::sync(),
            ]
            .concat(),
        )
        .unwrap();
    let (tags, errors) = f.read_until(|_| false);
    assert_eq!(tags, b"E", "{errors:?}");
    assert!(
        errors[0].contains("name of 64 bytes is longer than the 63 bytes"),
        "{errors:?}"
    );
    let (ok, out, err) = t.sql("select count(*) from ledger");
    assert!(ok && out == "2", "nothing was deleted: {out} {err}");
    let parses = s.alice_events("db_parse");
    assert!(
        parses
            .iter()
            .all(|e| e["data"]["statement"] != "DELETE FROM ledger"),
        "{parses:?}"
    );
}

/// The audit names the statement an Execute really ran, as the server
/// answered, not as the client claimed: a refused redefinition of a
/// prepared statement (and a Close the server skipped after an error) must
/// not let a client log `SELECT 1` while it deletes rows.
#[test]
fn executes_are_audited_with_the_statement_the_server_ran() {
    let (s, t) = with_ledger();

    let mut f = RawFrontend::connect(&t);
    // One pipelined write, as an attacker would send it: s1 is a DELETE;
    // a failing Parse makes the server skip the Close of s1; the second
    // Parse of s1 is refused (it exists); then s1 runs.
    let batch = [
        RawFrontend::parse("s1", "DELETE FROM ledger"),
        RawFrontend::sync(),
        RawFrontend::parse("bad", "SELEKT"),
        RawFrontend::close_statement("s1"),
        RawFrontend::sync(),
        RawFrontend::parse("s1", "SELECT 1"),
        RawFrontend::sync(),
        RawFrontend::bind("", "s1"),
        RawFrontend::execute(""),
        RawFrontend::sync(),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(4);
    assert_eq!(
        String::from_utf8_lossy(&tags),
        "1ZEZEZ2CZ",
        "the server refused the bad Parse and the redefinition"
    );
    let (ok, out, err) = t.sql("select count(*) from ledger");
    assert!(ok && out == "0", "the DELETE ran: {out} {err}");

    let executes = s.alice_events("db_execute");
    let statements: Vec<&str> = executes
        .iter()
        .filter_map(|e| e["data"]["statement"].as_str())
        .collect();
    assert_eq!(statements, ["DELETE FROM ledger"], "{executes:?}");
    // Both Parse attempts are on record as sent.
    wait_until("the three db_parse events", Duration::from_secs(10), || {
        let parses = s.events(&s.alice, &["--user", "alice", "--kind", "db_parse"]);
        ["DELETE FROM ledger", "SELEKT", "SELECT 1"]
            .iter()
            .all(|text| parses.iter().any(|e| e["data"]["statement"] == *text))
            .then_some(())
    })
    .unwrap();

    // A simple Query after an extended-protocol error, before the Sync, is
    // skipped by the server: on the record as sent, then as skipped —
    // pipelined with the failing Parse, and sent after its error came.
    f.tcp
        .write_all(
            &[
                RawFrontend::parse("bad", "SELEKT 2"),
                RawFrontend::query("INSERT INTO ledger VALUES (98)"),
                RawFrontend::sync(),
            ]
            .concat(),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&f.until_ready(1)), "EZ");
    let flush = RawFrontend::msg(b'H', &[]);
    f.tcp
        .write_all(&[RawFrontend::parse("bad", "SELEKT 3"), flush].concat())
        .unwrap();
    let (tags, _) = f.read_until(|tag| tag == b'E');
    assert_eq!(tags, b"E");
    f.tcp
        .write_all(
            &[
                RawFrontend::query("INSERT INTO ledger VALUES (99)"),
                RawFrontend::sync(),
            ]
            .concat(),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&f.until_ready(1)), "Z");
    let (ok, out, err) = t.sql("select count(*) from ledger");
    assert!(ok && out == "0", "a skipped INSERT ran: {out} {err}");
    let inserts = [
        "INSERT INTO ledger VALUES (98)",
        "INSERT INTO ledger VALUES (99)",
    ];
    for kind in ["db_query", "db_skipped"] {
        wait_until(
            &format!("the {kind} events"),
            Duration::from_secs(10),
            || {
                let events = s.events(&s.alice, &["--user", "alice", "--kind", kind]);
                inserts
                    .iter()
                    .all(|text| events.iter().any(|e| e["data"]["statement"] == *text))
                    .then_some(())
            },
        )
        .unwrap();
    }
}

/// SQL cursors are portals: `CLOSE p; DECLARE p CURSOR FOR ...` in a simple
/// Query gives a portal the client bound through the protocol other text.
/// An Execute of it must not be audited with the text bound before.
#[test]
fn an_execute_of_a_portal_redefined_by_sql_is_not_audited_with_its_old_text() {
    let (s, t) = with_ledger();
    let mut f = RawFrontend::connect(&t);
    let batch = [
        RawFrontend::query("BEGIN"),
        RawFrontend::parse("s1", "SELECT 'harmless'"),
        RawFrontend::bind("p", "s1"),
        RawFrontend::sync(),
        RawFrontend::query("CLOSE p; DECLARE p CURSOR FOR SELECT x FROM ledger"),
        RawFrontend::execute("p"),
        RawFrontend::sync(),
        RawFrontend::query("COMMIT"),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(5);
    // BEGIN; ParseComplete, BindComplete; CLOSE, DECLARE; the cursor's two
    // rows and its completion; COMMIT.
    assert_eq!(String::from_utf8_lossy(&tags), "CZ12ZCCZDDCZCZ");
    // A rollback to a savepoint drops the portals bound since, in a
    // transaction that goes on: the name is free for a cursor again.
    let batch = [
        RawFrontend::query("BEGIN"),
        RawFrontend::query("SAVEPOINT a"),
        RawFrontend::bind("p", "s1"),
        RawFrontend::sync(),
        RawFrontend::query("ROLLBACK TO a; DECLARE p CURSOR FOR SELECT x FROM ledger"),
        RawFrontend::execute("p"),
        RawFrontend::sync(),
        RawFrontend::query("COMMIT"),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(6);
    assert_eq!(String::from_utf8_lossy(&tags), "CZCZ2ZCCZDDCZCZ");
    let executes = s.alice_events_exactly("db_execute", 2);
    for e in &executes {
        let statement = e["data"]["statement"].as_str().unwrap();
        assert!(
            statement.contains(r#"portal "p" not known to wicket"#),
            "{executes:?}"
        );
    }
}

/// Dynamic SQL in a function called between a Bind and its Execute closes
/// the portal and opens a cursor of that name that deletes. The proxy does
/// not see it happen, but the server's completion names the command it
/// ran: the Execute is on the record with that tag, marked `not_as_bound`,
/// and the named statement it was bound from is no longer vouched for.
#[test]
fn a_portal_changed_by_a_function_is_marked_as_not_what_was_bound() {
    let (s, t) = with_ledger();
    let mut f = RawFrontend::connect(&t);
    let batch = [
        RawFrontend::query(
            "CREATE FUNCTION pg_temp.swap() RETURNS int LANGUAGE plpgsql AS $$ \
             DECLARE c refcursor := 'p'; BEGIN CLOSE c; \
             OPEN c FOR EXECUTE 'DELETE FROM ledger RETURNING x'; RETURN 1; END $$",
        ),
        RawFrontend::query("BEGIN"),
        RawFrontend::parse("s1", "/* read */ (SELECT x FROM ledger)"),
        RawFrontend::bind("p", "s1"),
        RawFrontend::sync(),
        RawFrontend::query("SELECT pg_temp.swap()"),
        RawFrontend::execute("p"),
        RawFrontend::sync(),
        RawFrontend::query("ROLLBACK"),
        // The statement as prepared is no longer taken at its word.
        RawFrontend::bind("q", "s1"),
        RawFrontend::execute("q"),
        RawFrontend::sync(),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(7);
    assert!(!tags.contains(&b'E'), "{}", String::from_utf8_lossy(&tags));
    let executes = s.alice_events_exactly("db_execute", 2);
    let changed = &executes[0]["data"];
    assert_eq!(changed["portal"], "p", "{executes:?}");
    assert_eq!(changed["statement"], "/* read */ (SELECT x FROM ledger)");
    assert_eq!(changed["completed"], "DELETE 2", "{changed}");
    assert_eq!(changed["not_as_bound"], true, "{changed}");
    let after = &executes[1]["data"];
    assert_eq!(after["completed"], "SELECT 2", "{after}");
    assert!(after.get("not_as_bound").is_none(), "{after}");
    assert!(
        after["statement"]
            .as_str()
            .unwrap()
            .contains(r#"prepared statement "s1" not known to wicket"#),
        "{after}"
    );
    // `wicket play` says so.
    let session = executes[0]["session_id"].as_str().unwrap();
    let text = s
        .alice
        .ok(&["play", session, "--format", "text"])
        .unwrap()
        .stdout;
    assert!(
        text.contains(
            "(SELECT x FROM ledger) -- execute (0 parameters): DELETE 2 -- NOT the statement bound"
        ),
        "{text}"
    );
}

/// A client asking for protocol 3.2 with a protocol option (libpq 18 with
/// `max_protocol_version=latest`; libpq 19 betas ask for 3.9999 and
/// made-up options) is told it gets 3.0 without the option, as PostgreSQL
/// tells it, and goes on: through the tunnel, and straight to wicketd over
/// TLS with the user's certificate.
#[test]
fn a_newer_protocol_version_is_negotiated_down_to_3_0() {
    let (s, t) = with_ledger();
    let mut startup = wicket_api::pg::startup_message(&[
        ("user", "app"),
        ("database", "app"),
        ("_pq_.grease", "1"),
        ("application_name", "negotiating"),
        // The tunnel sets it; a direct client names the resource itself.
        (wicket_api::pg::RESOURCE_PARAM, "prod-pg"),
    ]);
    startup[4..8].copy_from_slice(&0x0003_0002u32.to_be_bytes());
    // Through the tunnel (which answers itself), and straight to wicketd
    // over TLS (which answers then).
    for (f, tags) in [
        RawFrontend::connect_with(&t, &startup),
        RawFrontend::direct_with(&s, &s.alice, &startup),
    ] {
        let mut f = f;
        assert_eq!(
            tags.first(),
            Some(&b'v'),
            "{:?}",
            String::from_utf8_lossy(&tags)
        );
        assert!(tags.contains(&b'R'), "{:?}", String::from_utf8_lossy(&tags));
        f.tcp
            .write_all(&RawFrontend::query("select count(*) from ledger"))
            .unwrap();
        let tags = f.until_ready(1);
        assert!(tags.contains(&b'D'), "{:?}", String::from_utf8_lossy(&tags));
    }
    // Each answered itself: the option went neither upstream (where
    // PostgreSQL would answer the same) nor on the record.
    let started = wait_until(
        "both sessions on the record",
        Duration::from_secs(10),
        || {
            let e: Vec<Value> = s
                .alice_events("session_started")
                .into_iter()
                .filter(|e| e.to_string().contains("negotiating"))
                .collect();
            (e.len() == 2).then_some(e)
        },
    )
    .unwrap();
    for e in started {
        assert!(!e.to_string().contains("_pq_"), "{e}");
    }
}

/// A client that leaves with its work running (closed after sending it, or
/// killed) does not leave it to run on unwatched by its grant, which could
/// no longer end it: after the drain's moment its backend is ended.
#[test]
fn work_a_client_leaves_running_is_ended_with_its_backend() {
    let (s, t) = with_ledger();
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(
            &[
                RawFrontend::query("select pg_sleep(30); DELETE FROM ledger"),
                RawFrontend::terminate(),
            ]
            .concat(),
        )
        .unwrap();
    let pid = running_sleep(&s.pg);
    drop(f);
    let gone = |pid: i64| {
        wait_until("its backend to end", Duration::from_secs(10), || {
            (!sleeping_backends(&s.pg).contains(&pid)).then_some(())
        })
        .unwrap()
    };
    gone(pid);
    let (ok, out, err) = t.sql("select count(*) from ledger");
    assert!(
        ok && out == "2",
        "the DELETE behind it never ran: {out} {err}"
    );
    // psql killed mid-statement.
    let mut child = spawn_sleep(&t, 30);
    let pid = running_sleep(&s.pg);
    child.kill().unwrap();
    child.wait().unwrap();
    gone(pid);
}

/// Sends `batch` (ending with a Terminate) without reading the answers,
/// closes, and waits until the server ran its DELETE of the ledger.
fn send_and_leave(mut f: RawFrontend, batch: &[u8], t: &Tunnel) {
    f.tcp.write_all(batch).unwrap();
    drop(f);
    wait_until("the DELETE to run", Duration::from_secs(10), || {
        (t.sql("select count(*) from ledger").1 == "0").then_some(())
    })
    .unwrap();
}

/// An Execute pipelined with the client's Terminate runs on the server even
/// though the client never reads its answer: it is on the record too.
#[test]
fn an_execute_sent_with_terminate_is_audited() {
    let (s, t) = with_ledger();
    let f = RawFrontend::connect(&t);
    let batch = [
        RawFrontend::parse("", "DELETE FROM ledger"),
        RawFrontend::bind("", ""),
        RawFrontend::execute(""),
        RawFrontend::sync(),
        RawFrontend::terminate(),
    ]
    .concat();
    send_and_leave(f, &batch, &t);
    let executes = s.alice_events("db_execute");
    assert_eq!(
        executes[0]["data"]["statement"], "DELETE FROM ledger",
        "{executes:?}"
    );
    assert!(
        executes[0]["data"].get("unanswered").is_none(),
        "the server's answer was read after the client left: {executes:?}"
    );
    // SQL pipelined before such an Execute can redefine its statement:
    // the record follows the server's answers (read after the client
    // left), not the statement as it was before the SQL.
    let (ok, out, err) = t.sql("insert into ledger values (3)");
    assert!(ok, "{out} {err}");
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(&[RawFrontend::parse("s1", "SELECT 1"), RawFrontend::sync()].concat())
        .unwrap();
    assert_eq!(f.until_ready(1), b"1Z");
    let batch = [
        RawFrontend::query("DEALLOCATE s1; PREPARE s1 AS DELETE FROM ledger"),
        RawFrontend::bind("", "s1"),
        RawFrontend::execute(""),
        RawFrontend::sync(),
        RawFrontend::terminate(),
    ]
    .concat();
    send_and_leave(f, &batch, &t);
    let executes = s.alice_events_exactly("db_execute", 2);
    let redefined = executes
        .iter()
        .find(|e| e["data"]["statement"] != "DELETE FROM ledger")
        .unwrap_or_else(|| panic!("{executes:?}"));
    assert!(
        redefined["data"]["statement"]
            .as_str()
            .is_some_and(|t| t.contains(r#"prepared statement "s1" not known to wicket"#)),
        "{executes:?}"
    );
    assert!(
        redefined["data"].get("unanswered").is_none(),
        "the server's answer was read: {executes:?}"
    );
    // A client that does not read a large result before its Terminate
    // leaves the relay mid-way through the server's answers: the drain
    // goes on from there, and each Execute is on the record once.
    let (ok, out, err) = t.sql("insert into ledger values (4)");
    assert!(ok, "{out} {err}");
    let f = RawFrontend::connect(&t);
    let batch = [
        RawFrontend::query("SELECT repeat('x', 100000) FROM generate_series(1, 100)"),
        RawFrontend::parse("", "DELETE FROM ledger"),
        RawFrontend::bind("pz", ""),
        RawFrontend::execute("pz"),
        RawFrontend::sync(),
        RawFrontend::terminate(),
    ]
    .concat();
    send_and_leave(f, &batch, &t);
    let last = wait_until("its execute", Duration::from_secs(10), || {
        let e = s.alice_events("db_execute");
        let last: Vec<Value> = e
            .into_iter()
            .filter(|e| e["data"]["portal"] == "pz")
            .collect();
        (!last.is_empty()).then_some(last)
    })
    .unwrap();
    // Once the session's end is on the record, so is all it audited.
    let session = last[0]["session_id"].clone();
    wait_until("the session's end", Duration::from_secs(10), || {
        s.alice_events("session_ended")
            .iter()
            .any(|e| e["session_id"] == session)
            .then_some(())
    })
    .unwrap();
    let last: Vec<Value> = s
        .alice_events("db_execute")
        .into_iter()
        .filter(|e| e["data"]["portal"] == "pz")
        .collect();
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(
        last[0]["data"]["statement"], "DELETE FROM ledger",
        "{last:?}"
    );
}

/// During COPY FROM STDIN the server swallows any other message as an error
/// without answering it, which would put the Execute tracker one answer out
/// of step (and let a later Execute be audited with the wrong statement):
/// the proxy ends such a session instead, and normal COPY keeps working.
#[test]
fn a_message_sent_during_copy_from_stdin_ends_the_session() {
    let (_s, t, _) = granted();
    let (ok, out, err) = t.sql("create table tmp(x int)");
    assert!(ok, "{out} {err}");
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(&RawFrontend::query("COPY tmp FROM STDIN"))
        .unwrap();
    let (tags, _) = f.read_until(|tag| tag == b'G');
    assert_eq!(
        tags.last(),
        Some(&b'G'),
        "{:?}",
        String::from_utf8_lossy(&tags)
    );
    f.tcp
        .write_all(&RawFrontend::parse("s1", "SELECT 1"))
        .unwrap();
    let (_, errors) = f.read_until(|_| false);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("08P01") && e.contains("lost track") && e.contains("COPY")),
        "{errors:?}"
    );
    // A COPY done right still works, through psql.
    let (ok, out, err) = t.sql_as("app", "COPY tmp FROM STDIN", "1\n2\n");
    assert!(ok, "{out} {err}");
    let (ok, out, err) = t.sql("select count(*) from tmp");
    assert!(ok && out == "2", "{out} {err}");
}

/// A Sync sent during COPY FROM STDIN is ignored by the server unless an
/// error (here bad data, before the server reads the Sync) ends the COPY
/// first: then it gets a ReadyForQuery of its own. Taken for ignored, that
/// extra answer once let the batch after it pass unaudited and the next
/// batch's answers be matched to it (a DELETE audited as the sleep). The
/// session now ends when the answers stop fitting, and each Execute is on
/// the record with its own text.
#[test]
fn a_sync_inside_a_failed_copy_does_not_shift_the_audit() {
    let (s, t) = with_ledger();
    let mut f = RawFrontend::connect(&t);
    let batch = [
        RawFrontend::query("COPY ledger FROM STDIN"),
        RawFrontend::msg(b'd', &[b"not a number\n"]),
        RawFrontend::sync(),
        RawFrontend::msg(b'c', &[]),
        RawFrontend::parse("a", "DELETE FROM ledger"),
        RawFrontend::bind("pa", "a"),
        RawFrontend::execute("pa"),
        RawFrontend::sync(),
        RawFrontend::parse("b", "SELECT pg_sleep(0.1)"),
        RawFrontend::bind("pb", "b"),
        RawFrontend::execute("pb"),
        RawFrontend::sync(),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    // (The bad row's error reaches the client only if it came in an
    // earlier read than the answer that did not fit.)
    let (_, errors) = f.read_until(|_| false);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("08P01") && e.contains("lost track")),
        "{errors:?}"
    );
    let executes = s.alice_events("db_execute");
    // Each Execute with its own portal's text (unanswered: the session
    // ended before their answers came).
    for e in &executes {
        let text = match e["data"]["portal"].as_str() {
            Some("pa") => "DELETE FROM ledger",
            Some("pb") => "SELECT pg_sleep(0.1)",
            _ => panic!("{executes:?}"),
        };
        assert_eq!(e["data"]["statement"], text, "{executes:?}");
    }
    assert!(
        executes.iter().any(|e| e["data"]["portal"] == "pa"),
        "{executes:?}"
    );
}

/// A statement is audited whole or not sent: text longer than wicket audits
/// (64 KiB) is refused before it reaches PostgreSQL, so nothing can hide
/// past a cut (`select '<70 KB>'; create table ...` once ran the create with
/// only the head of the text in the log).
#[test]
fn a_statement_too_long_to_audit_whole_is_not_sent() {
    let (s, t, _) = granted();
    let (ok, _, err) = t.sql(&format!(
        "select '{}'; create table hidden(x int)",
        "x".repeat(70_000)
    ));
    assert!(!ok);
    assert!(
        err.contains("longer than the 65536 bytes wicket audits whole") && err.contains("not sent"),
        "{err}"
    );
    let (ok, out, err) = t.sql("select to_regclass('hidden') is null");
    assert!(ok && out == "t", "the create never ran: {out} {err}");
    // The extended protocol too.
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(&RawFrontend::parse(
            "s1",
            &format!("SELECT '{}'", "y".repeat(70_000)),
        ))
        .unwrap();
    let (_, errors) = f.read_until(|_| false);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("08P01") && e.contains("a statement to prepare of 70009 bytes")),
        "{errors:?}"
    );
    // Up to the limit, the whole text is audited.
    let text = format!("select length('{}')", "z".repeat(60_000));
    let (ok, out, err) = t.sql(&text);
    assert!(ok && out == "60000", "{out} {err}");
    wait_until(
        "the 60 KB query, audited whole",
        Duration::from_secs(10),
        || {
            s.alice_events("db_query")
                .iter()
                .any(|q| q["data"]["statement"] == text.as_str())
                .then_some(())
        },
    )
    .unwrap();
}

/// The local tunnel serves only the OS user who started it: another user on
/// the same machine cannot ride the owner's grant through 127.0.0.1.
#[test]
fn the_tunnel_refuses_other_os_users() {
    let (s, t, _) = granted();
    let (ok, out, err) = t.sql("select 1");
    assert!(ok && out == "1", "the owner gets through: {out} {err}");
    let Some(other) = s.pg.os_user() else {
        eprintln!("not root: no second OS user to try the tunnel as");
        return;
    };
    let out = Command::new("runuser")
        .args(["-u", other, "--", "psql", &t.conninfo("app")])
        .args(["-X", "-At", "-c", "select 1"])
        .current_dir("/")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("this tunnel serves only the OS user who started it")
            && err.contains("refused a connection from uid"),
        "{err}"
    );
    // The owner still gets through.
    let (ok, out, err) = t.sql("select 2");
    assert!(ok && out == "2", "{out} {err}");

    // With --socket the tunnel listens in a directory only its OS user can
    // enter, and removes it when told to end.
    let tmp = shared_tmp();
    let mut child = s
        .alice
        .cmd()
        .unwrap()
        .args(["proxy", "db", "prod-pg", "--tunnel", "--socket"])
        .args(["--format", "json"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let dir = std::path::PathBuf::from(v["socket_dir"].as_str().unwrap());
    assert_eq!(only_private_dir(tmp.path()), dir);
    let conninfo = format!(
        "host={} port={} user=app dbname=app sslmode=disable",
        dir.display(),
        v["port"]
    );
    let out = psql_at(None, &conninfo, "select 3");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3", "{out:?}");
    let out = psql_at(Some(other), &conninfo, "select 4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "{err}"
    );
    run(Command::new("kill").args(["-TERM", &child.id().to_string()])).unwrap();
    wait_until("the tunnel to end", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    })
    .unwrap();
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

/// A temporary directory every OS user may pass through (so that what
/// keeps another user out is the tunnel's own directory).
fn shared_tmp() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// The one `wicket-db-*` directory in `tmp`, once it is there, after
/// checking that only its owner may enter it and that it holds the socket.
fn only_private_dir(tmp: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dirs: Vec<std::path::PathBuf> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = dirs[0].clone();
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("wicket-db-"), "{name}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{name}: {mode:o}");
    assert!(dir.join(".s.PGSQL.5432").exists());
    dir
}

/// `psql CONNINFO -c SQL`, as OS user `user` (`runuser`) or as this one.
fn psql_at(user: Option<&str>, conninfo: &str, sql: &str) -> std::process::Output {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "psql"]);
            c
        }
        None => Command::new("psql"),
    };
    cmd.arg(conninfo)
        .args(["-X", "-At", "-c", sql])
        .current_dir("/")
        .env_remove("PGPASSWORD")
        .output()
        .unwrap()
}

/// `wicket db connect` runs psql through a Unix socket in a directory only
/// its OS user can enter. Ctrl-C at the terminal reaches psql and wicket
/// alike: psql cancels the running statement through the tunnel, which
/// must outlive it. The directory goes when psql ends.
#[test]
fn db_connect_listens_privately_and_outlives_ctrl_c() {
    use std::os::unix::process::CommandExt;
    let s = Setup::start("");
    s.grant_dba("30m");
    let tmp = shared_tmp();
    let child = s
        .alice
        .cmd()
        .unwrap()
        .args(["db", "connect", "prod-pg", "--db-user", "app", "--db-name"])
        .args(["app", "--", "-X", "-At", "-c", "select pg_sleep(60)"])
        .env("TMPDIR", tmp.path())
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    running_sleep(&s.pg);
    let dir = only_private_dir(tmp.path());
    if let Some(other) = s.pg.os_user() {
        let conninfo = format!(
            "host={} port=5432 user=app dbname=app sslmode=disable",
            dir.display()
        );
        let out = psql_at(Some(other), &conninfo, "select 1");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Permission denied"),
            "{err}"
        );
    }
    // What the terminal does on Ctrl-C: SIGINT to the foreground group.
    run(Command::new("kill").args(["-INT", "--", &format!("-{}", child.id())])).unwrap();
    let (err, _) = wait_exit(child, Duration::from_secs(20));
    assert!(
        err.contains("canceling statement due to user request"),
        "psql's statement was cancelled, not its connection cut: {err}"
    );
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(sleeping_backends(&s.pg).is_empty());

    // A temporary directory where others could swap the private one for
    // theirs (writable by all, not sticky) is refused.
    use std::os::unix::fs::PermissionsExt;
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = s
        .alice
        .cmd()
        .unwrap()
        .args(["db", "connect", "prod-pg", "--db-user", "app", "--db-name"])
        .args(["app", "--", "-X", "-At", "-c", "select 1"])
        .env("TMPDIR", &open)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("writable by others and not sticky"),
        "{err}"
    );
}

/// Connections still authenticating have a share of their own
/// (`limits.max_unauthenticated`, like sshd's MaxStartups) and a deadline
/// (`limits.login_grace`); authenticated ones leave the share, and all
/// count against `limits.max_connections`.
#[test]
fn unauthenticated_connections_have_a_limited_share_and_a_deadline() {
    use std::io::Read;
    use std::net::TcpStream;
    let s =
        Setup::start("limits: { max_connections: 5, max_unauthenticated: 2, login_grace: 3s }\n");
    s.grant_dba("1h");
    let t = s.tunnel();
    let proxy = s.d.postgres_addr().unwrap();
    // Two clients that ask for TLS and then say nothing hold both places
    // (the 'S' answer shows each was let in).
    let idle: Vec<(TcpStream, Instant)> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(proxy).unwrap();
            let admitted = Instant::now();
            c.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).unwrap();
            let mut answer = [0u8; 1];
            c.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"S");
            (c, admitted)
        })
        .collect();
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(
        err.contains("refused the connection")
            && err.contains("still authenticating (limits.max_unauthenticated is 2)"),
        "{err}"
    );
    // The login grace closes them.
    closed_between(idle, Duration::from_secs(2), Duration::from_secs(10)).unwrap();
    // One GSSENCRequest is refused with 'N', as PostgreSQL does; a second
    // one ends the connection (a client cannot loop in negotiation).
    let mut c = TcpStream::connect(proxy).unwrap();
    let gss = [0, 0, 0, 8, 4, 210, 22, 48];
    c.write_all(&gss).unwrap();
    let mut answer = [0u8; 1];
    c.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    c.write_all(&gss).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(
        String::from_utf8_lossy(&rest).contains("GSSENCRequest sent twice"),
        "{rest:?}"
    );
    drop(c);
    // Authenticated connections leave the share: three held open at once,
    // and a fourth still gets in.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!(
        "postgres://app@127.0.0.1:{}/app?sslmode=disable",
        t.addr.port()
    );
    let held = rt.block_on(async {
        use sqlx::Connection;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(sqlx::PgConnection::connect(&url).await.unwrap());
        }
        held
    });
    let (ok, out, err) = t.sql("select 40 + 2");
    assert!(ok, "{err}");
    assert_eq!(out, "42");
    // `limits.max_connections` (5) counts every connection: with five held
    // a sixth is refused with the reason, and gets in once one closes.
    let mut held = held;
    for _ in 0..2 {
        use sqlx::Connection;
        let c = wait_until("a connection", Duration::from_secs(10), || {
            rt.block_on(sqlx::PgConnection::connect(&url)).ok()
        })
        .unwrap();
        held.push(c);
    }
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(
        err.contains("refused the connection")
            && err.contains("too many connections to wicketd's postgres listener")
            && err.contains("limits.max_connections is 5"),
        "{err}"
    );
    rt.block_on(async {
        use sqlx::Connection;
        held.pop().unwrap().close().await.unwrap();
    });
    wait_until("a place to free up", Duration::from_secs(10), || {
        let (ok, out, _) = t.sql("select 40 + 2");
        (ok && out == "42").then_some(())
    })
    .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        for c in held {
            c.close().await.unwrap();
        }
    });
}

/// One user holds at most `limits.max_connections_per_user` connections
/// on a listener; a closed one gives its place back.
#[test]
fn a_user_holds_at_most_their_share_of_connections() {
    let s = Setup::start("limits: { max_connections_per_user: 2 }\n");
    s.grant_dba("1h");
    let t = s.tunnel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!(
        "postgres://app@127.0.0.1:{}/app?sslmode=disable",
        t.addr.port()
    );
    let mut held = rt.block_on(async {
        use sqlx::Connection;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(sqlx::PgConnection::connect(&url).await.unwrap());
        }
        held
    });
    let (ok, _, err) = t.sql("select 1");
    assert!(!ok);
    assert!(
        err.contains(r#""alice" already holds 2 connections to wicketd's postgres listener"#)
            && err.contains("limits.max_connections_per_user"),
        "{err}"
    );
    rt.block_on(async {
        use sqlx::Connection;
        held.pop().unwrap().close().await.unwrap();
    });
    wait_until("a place to free up", Duration::from_secs(10), || {
        let (ok, out, _) = t.sql("select 40 + 2");
        (ok && out == "42").then_some(())
    })
    .unwrap();
}

/// A client that stops reading cannot hold its session past the grant: the
/// relay, stuck writing to it, is dropped a moment after the session ended
/// (and the query it was serving is cancelled).
#[test]
fn a_client_that_stops_reading_is_still_cut_at_revoke() {
    let (s, t, id) = granted();
    let mut f = RawFrontend::connect(&t);
    // About a gigabyte of rows, which this client never reads.
    let sql = "select repeat('x', 1000000) from generate_series(1, 1000) as stalled";
    f.tcp
        .write_all(&RawFrontend::msg(b'Q', &[&RawFrontend::cstr(sql)]))
        .unwrap();
    // Every buffer on the way is full: the server waits to write.
    wait_until(
        "the backend to wait on writing to wicketd",
        Duration::from_secs(20),
        || {
            let waiting =
                s.pg.psql(
                    "postgres",
                    "select count(*) from pg_stat_activity \
                     where query like '%as stalled' and wait_event = 'ClientWrite'",
                )
                .unwrap();
            (waiting.trim() == "1").then_some(())
        },
    )
    .unwrap();
    s.frank
        .ok(&["request", "revoke", &id, "--reason", "INC-7 closed"])
        .unwrap();
    let revoked = Instant::now();
    let ended = wait_until("the session to end", Duration::from_secs(10), || {
        let e = s.events(&s.frank, &["--request", &id, "--kind", "session_ended"]);
        (!e.is_empty()).then_some(e)
    })
    .unwrap();
    let took = revoked.elapsed();
    assert!(
        took <= Duration::from_secs(2),
        "the session ended {took:?} after the revoke"
    );
    assert!(
        ended[0]["data"]["reason"].to_string().contains("revoked"),
        "{ended:?}"
    );
    // The query it was serving does not run on.
    wait_until("the query to stop", Duration::from_secs(10), || {
        let left = s
            .pg
            .psql(
                "postgres",
                "select count(*) from pg_stat_activity where query like '%as stalled' and pid <> pg_backend_pid()",
            )
            .unwrap();
        (left.trim() == "0").then_some(())
    })
    .unwrap();
    drop(f);
}

/// A client encoding whose characters can contain ASCII bytes (SJIS, BIG5,
/// GBK, ...) would let the audited text (read as UTF-8) and the statement
/// the server runs differ: `'Ă\'` in UTF-8 is a quote escaped, in SJIS a
/// character and then a closing quote. Such an encoding is refused at
/// startup, and a session that sets it ends at the server's report of it,
/// the end naming the encoding.
#[test]
fn client_encodings_that_could_hide_statements_are_refused() {
    let (s, t, id) = granted();
    let out = t
        .psql("app")
        .args(["-c", "select 1"])
        .env("PGCLIENTENCODING", "SJIS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("client_encoding SJIS is not allowed through wicket"),
        "{err}"
    );
    // A session can switch encodings and use the new one within a single
    // exchange, before the server reports the switch; so the byte pattern
    // such a trick needs (a backslash right after a non-ASCII byte: in SJIS
    // `Ă\` ends in a character, and `\'` no longer escapes the quote) is
    // refused whatever the encoding.
    let (ok, _, err) = t
        .sql("set client_encoding to 'SJIS'; select E'\u{102}\\'; create table sneaky(x int); --'");
    assert!(!ok);
    assert!(
        err.contains("backslash right after a non-ASCII character was not sent"),
        "{err}"
    );
    let (ok, out, err) = t.sql("select to_regclass('sneaky') is null, 'é \\ ü'");
    assert!(ok && out == "t|é \\ ü", "{out} {err}");
    // Encodings whose multibyte characters are all non-ASCII bytes are fine.
    let (ok, out, err) = t.sql("set client_encoding to 'LATIN1'; select 41 + 1");
    assert!(ok && out == "42", "{out} {err}");
    let (ok, out, err) = t.sql("set client_encoding to 'GBK'; select 'not reached'");
    assert!(!ok, "{out}");
    assert!(
        err.contains("client_encoding GBK is not allowed through wicket"),
        "{err}"
    );
    wait_until(
        "the session's end, naming GBK",
        Duration::from_secs(10),
        || {
            s.events(&s.frank, &["--request", &id, "--kind", "session_ended"])
                .iter()
                .any(|e| {
                    e["data"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("client_encoding GBK"))
                })
                .then_some(())
        },
    )
    .unwrap();
}

/// A Flush with bytes past its end is refused by PostgreSQL, which then
/// skips the rest of the batch to the next Sync as it does after any error
/// in one. Passed on unread, it once set the proxy's idea of which answer
/// is whose apart from the server's, so a later DELETE could be audited
/// with another DELETE's text. Now the proxy refuses it first: the session
/// ends with the reason, and nothing after it reaches the server.
#[test]
fn a_malformed_flush_ends_the_session_before_it_reaches_the_server() {
    let (s, t) = with_ledger();
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(&RawFrontend::query("SELECT 'flush-marker'"))
        .unwrap();
    f.until_ready(1);
    // PostgreSQL, refusing the Flush, would skip to the Sync and then run
    // the DELETE.
    let batch = [
        RawFrontend::msg(b'H', &[b"x"]),
        RawFrontend::sync(),
        RawFrontend::query("DELETE FROM ledger"),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let (tags, errors) = f.read_until(|_| false);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("08P01") && e.contains("malformed Flush message")),
        "{:?} {errors:?}",
        String::from_utf8_lossy(&tags)
    );
    // The DELETE after it never ran.
    let (ok, out, err) = t.sql("select count(*) from ledger");
    assert!(ok && out == "2", "{out} {err}");
    let session = session_of_query(&s, "SELECT 'flush-marker'");
    let ended = events_of_ended_session(&s, &session, "session_ended");
    assert!(
        ended[0]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("protocol violation: malformed Flush message"),
        "{ended:?}"
    );
}

/// A Bind of text values, `None` for NULL (unnamed portal and statement).
fn bind_texts(values: &[Option<&[u8]>]) -> Vec<u8> {
    let n = u16::try_from(values.len()).unwrap();
    let mut body = b"\0\0".to_vec();
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&n.to_be_bytes());
    for v in values {
        match v {
            Some(v) => {
                body.extend_from_slice(&i32::try_from(v.len()).unwrap().to_be_bytes());
                body.extend_from_slice(v);
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    RawFrontend::msg(b'B', &[&body])
}

/// With `audit.db_parameter_values: true`, an Execute's event carries the
/// values its Bind sent, NULLs as null, in order (by default it carries
/// none: see the first test). They are on the record once per Bind: later
/// Executes of the portal (fetching more rows) say they continue it. Values
/// over what one event records are left out and counted.
#[test]
fn bound_values_are_audited_when_the_config_says_so() {
    let s = Setup::start("\naudit: { db_parameter_values: true }\n");
    s.grant_dba("30m");
    let t = s.tunnel();
    let mut f = RawFrontend::connect(&t);
    f.tcp
        .write_all(&RawFrontend::query("SELECT 'values-marker'"))
        .unwrap();
    f.until_ready(1);
    let batch = [
        RawFrontend::parse("", "SELECT $1::int + 1, $2::text IS NULL"),
        bind_texts(&[Some(b"41"), None]),
        RawFrontend::execute(""),
        RawFrontend::sync(),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(1);
    assert!(tags.contains(&b'D'), "{:?}", String::from_utf8_lossy(&tags));
    // One row at a time, twice, from one Bind.
    let one_row = RawFrontend::msg(b'E', &[b"\0", &1u32.to_be_bytes()]);
    let batch = [
        RawFrontend::parse("", "SELECT generate_series(1, 3), $1::text"),
        bind_texts(&[Some(b"fetched")]),
        one_row.clone(),
        one_row,
        RawFrontend::sync(),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(1);
    assert_eq!(
        tags.iter().filter(|&&t| t == b's').count(),
        2,
        "{:?}",
        String::from_utf8_lossy(&tags)
    );
    // Six values of which five reach the cap (256 KiB).
    let big = vec![b'v'; 60 * 1024];
    let batch = [
        RawFrontend::parse("", "SELECT length($1||$2||$3||$4||$5||$6)"),
        bind_texts(&[
            Some(&big),
            Some(&big),
            Some(&big),
            Some(&big),
            Some(&big),
            Some(b"last"),
        ]),
        RawFrontend::execute(""),
        RawFrontend::sync(),
    ]
    .concat();
    f.tcp.write_all(&batch).unwrap();
    let tags = f.until_ready(1);
    assert!(tags.contains(&b'D'), "{:?}", String::from_utf8_lossy(&tags));
    drop(f);
    let session = session_of_query(&s, "SELECT 'values-marker'");
    let executed = events_of_ended_session(&s, &session, "db_execute");
    assert_eq!(executed.len(), 4, "{executed:?}");
    let data: Vec<&Value> = executed.iter().map(|e| &e["data"]).collect();
    assert_eq!(data[0]["statement"], "SELECT $1::int + 1, $2::text IS NULL");
    assert_eq!(data[0]["values"], serde_json::json!(["41", null]));
    assert!(data[0].get("continued").is_none(), "{}", data[0]);
    assert_eq!(data[1]["values"], serde_json::json!(["fetched"]));
    assert!(data[1].get("continued").is_none(), "{}", data[1]);
    assert_eq!(data[2]["statement"], data[1]["statement"]);
    assert_eq!(data[2]["continued"], true, "{}", data[2]);
    assert!(data[2].get("values").is_none(), "{}", data[2]);
    let values = data[3]["values"].as_array().unwrap();
    assert_eq!(values.len(), 5);
    assert!(values
        .iter()
        .all(|v| v.as_str().unwrap().len() == big.len()));
    assert_eq!(data[3]["values_not_recorded"], 1, "{}", data[3]["params"]);
    assert_eq!(data[3]["params"], 6);
    let play = s.alice.ok(&["play", &session, "--no-wait"]).unwrap().stdout;
    assert!(
        play.contains("(1 parameters: [\"fetched\"])"),
        "{}",
        &play[..play.len().min(2000)]
    );
    assert!(play.contains("-- continued: more rows of the portal executed before"));
    assert!(play.contains("and 1 more, not recorded"));
}

/// A startup message that sets the role (psql's `PGOPTIONS='-c role=...'`,
/// or a `role` parameter) is refused with the reason, on the record: every
/// statement would run as a role other than the database user decided on.
/// Other options pass.
#[test]
fn a_startup_role_setting_is_refused() {
    let (s, t, _) = granted();
    for options in ["-c role=pg_read_all_data", "--ROLE=pg_read_all_data"] {
        let out = t
            .psql("app")
            .env("PGOPTIONS", options)
            .args(["-c", "select current_user"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{options}");
        assert!(
            err.contains("sets the role") && err.contains(&format!("{options:?}")),
            "{options}: {err}"
        );
    }
    let shown = run(t
        .psql("app")
        .env("PGOPTIONS", "-c search_path=public")
        .args(["-c", "show search_path"]))
    .unwrap();
    assert_eq!(shown.trim(), "public");
    let denied = s.alice_events("session_denied");
    assert!(
        denied.iter().any(|e| e["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("sets the role (options \"-c role=pg_read_all_data\")")),
        "{denied:?}"
    );
}

/// Simple-protocol queries pipelined behind a waiting one: a cancel would
/// stop only the first, and the server would then read and run the next
/// (it has it already). A cut ends the backend itself, so none runs on.
#[test]
fn a_cut_ends_the_backend_so_pipelined_queries_do_not_run_on() {
    let (s, t, id) = with_empty_ledger();
    pipelined_queries_do_not_outlive_a_cut(&s, &t, &id, 4343);
}

/// The connection that ends a cut session's backend runs as the session's
/// database user too, whatever role the database keeps for it: as that
/// role, `pg_terminate_backend` was refused (a role may end only its own
/// backends), and only the running query was cancelled.
#[test]
fn a_cut_ends_the_backend_whatever_role_the_database_keeps_for_its_user() {
    let (s, t, id) = with_empty_ledger();
    keep_a_role_for_app(&s);
    pipelined_queries_do_not_outlive_a_cut(&s, &t, &id, 4344);
}

/// A query waiting on advisory lock `key` with an INSERT pipelined behind
/// it, on one connection through `t`; `id` is revoked: the cut ends the
/// backend, so the INSERT never runs, even once the lock is free.
fn pipelined_queries_do_not_outlive_a_cut(s: &Setup, t: &Tunnel, id: &str, key: u32) {
    let lock = hold_advisory_lock(s, key);
    let mut f = RawFrontend::connect(t);
    let (waits, insert) = (
        format!("SELECT pg_advisory_lock({key})"),
        format!("INSERT INTO ledger VALUES ({key})"),
    );
    f.tcp
        .write_all(&[RawFrontend::query(&waits), RawFrontend::query(&insert)].concat())
        .unwrap();
    wait_for_lock_wait(s, &waits);
    revoke_and_read_the_cut(s, &mut f, id, "INC-10 closed");
    // The backend is gone (terminated: no longer there at all), ended by
    // pg_terminate_backend, not only cancelled (whose end is a race with
    // the connection's close).
    wait_none_running(s, "the backend ended", &[&waits, &insert]);
    let ended = wait_until(
        "wicketd to end the backend",
        Duration::from_secs(10),
        || {
            s.d.stderr()
                .contains("cut session's backend ended")
                .then_some(())
        },
    );
    if let Err(e) = ended {
        let stderr = s.d.stderr();
        let said: Vec<&str> = stderr.lines().filter(|l| l.contains("backend")).collect();
        panic!("{e}: {said:?}");
    }
    lock.release();
    assert_eq!(
        s.pg.psql(
            "app",
            &format!("select count(*) from ledger where x = {key}")
        )
        .unwrap(),
        "0"
    );
}

/// The database keeps a role for `app`, which its sessions would take on
/// at login: `wicket_owner`, which `app` is a member of.
fn keep_a_role_for_app(s: &Setup) {
    s.pg.psql(
        "postgres",
        "create role wicket_owner nologin; grant wicket_owner to app; \
         alter role app set role = 'wicket_owner'",
    )
    .unwrap();
    let kept = s.pg.psql(
        "postgres",
        "select rolconfig from pg_roles where rolname = 'app'",
    );
    assert_eq!(kept.unwrap(), "{role=wicket_owner}");
}

/// [`select_1`], whose login the database does not finish while the lock
/// held here is: every login waits while pg_authid is locked.
fn a_login_held(s: &Setup, t: &Tunnel) -> (HeldLock, Child) {
    let lock = hold_lock(s, "begin;\nlock table pg_authid in access exclusive mode;");
    (lock, select_1(t))
}

/// `psql -c 'select 1'` through `t`, running, its stderr piped.
fn select_1(t: &Tunnel) -> Child {
    t.psql("app")
        .args(["-c", "select 1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A session the database has not finished logging in (here: logins wait
/// on a catalog lock held outside Wicket) is still cut when its grant is
/// revoked, with the reason. Before, the proxy waited for the database's
/// first ReadyForQuery without end, and without looking at the grant.
#[test]
fn a_session_the_database_has_not_logged_in_yet_is_cut_at_revoke() {
    let (s, t, id) = granted();
    let (lock, child) = a_login_held(&s, &t);
    // Wicket has let it in; the database has not.
    wait_until("the session started", Duration::from_secs(20), || {
        let started = s.events(&s.frank, &["--user", "alice", "--kind", "session_started"]);
        (!started.is_empty()).then_some(())
    })
    .unwrap();
    revoke_cuts(&s, child, &id, "INC-7 closed");
    lock.release();
}

/// A role the database keeps for the database user (`ALTER ROLE app SET
/// role = ...`) does not change who a session runs as through Wicket: it
/// starts as the database user the policy decided on and the audit names.
/// `SET ROLE` still works, as a statement on the record.
#[test]
fn a_role_kept_in_the_database_does_not_change_who_a_session_runs_as() {
    let (s, t, _) = granted();
    keep_a_role_for_app(&s);
    let who = |sql: &str| {
        let out = t.psql("app").args(["-c", sql]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(who("select current_user, session_user"), "app|app");
    assert_eq!(
        who("set role wicket_owner; select current_user"),
        "wicket_owner"
    );
    let set_role = "set role wicket_owner; select current_user";
    wait_until("SET ROLE on the record", Duration::from_secs(10), || {
        let queries = s.events(&s.alice, &["--user", "alice", "--kind", "db_query"]);
        queries
            .iter()
            .any(|e| e["data"]["statement"] == set_role)
            .then_some(())
    })
    .unwrap();
}

/// A login the database does not finish within `postgres.login_timeout`
/// (here: waiting on a lock) is refused with FATAL 08006 saying so, not
/// held for as long as the database takes; the session's end says why.
#[test]
fn a_login_the_database_does_not_finish_in_time_is_refused() {
    let s = Setup::start("postgres: { login_timeout: 2s }\n");
    s.grant_dba("30m");
    let t = s.tunnel();
    let asked = Instant::now();
    let (lock, child) = a_login_held(&s, &t);
    let (err, exited) = wait_exit(child, Duration::from_secs(20));
    let why = "database \"prod-pg\" did not log the session in within 2s";
    assert!(err.contains("FATAL") && err.contains(why), "{err}");
    let took = exited.duration_since(asked);
    assert!(took >= Duration::from_secs(2), "refused after {took:?}");
    let ended = s.alice_events("session_ended");
    let reason = ended[0]["data"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "{ended:?}");
    lock.release();
}

/// The loopback TCP connections in `/proc/net/tcp` that are established:
/// (local port, remote port, whether the keepalive timer runs).
fn established_tcp() -> Vec<(u16, u16, bool)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // st 01: established; the timer kind "2" is keepalive's when
            // nothing is in flight.
            (f[3] == "01").then(|| (port(f[1]), port(f[2]), f[5].starts_with("02:")))
        })
        .collect()
}

/// Every TCP leg of a database session has keepalive on: the tunnel to
/// wicketd, wicketd's side of it, and wicketd to PostgreSQL. Without it, a
/// peer gone without a word (a laptop asleep, a NAT that dropped the flow)
/// left an idle session, and its backend, waiting for good.
#[test]
fn every_leg_of_a_database_session_has_tcp_keepalive() {
    let (s, t, _) = granted();
    let wicketd = s.d.postgres_addr().unwrap().port();
    let pg = s.pg.port();
    let (_raw, _) = RawPg::connect(&t);
    // Idle now: each leg's timer is keepalive's, if it is on.
    let legs = wait_until("the session's legs idle", Duration::from_secs(10), || {
        let tcp = established_tcp();
        let leg = |pick: &dyn Fn(&(u16, u16, bool)) -> bool| {
            tcp.iter()
                .filter(|c| pick(c))
                .map(|c| c.2)
                .collect::<Vec<_>>()
        };
        let legs = [
            ("the tunnel to wicketd", leg(&|c| c.1 == wicketd)),
            ("wicketd from the tunnel", leg(&|c| c.0 == wicketd)),
            ("wicketd to PostgreSQL", leg(&|c| c.1 == pg)),
        ];
        legs.iter()
            .all(|(_, l)| !l.is_empty() && l.iter().all(|k| *k))
            .then_some(legs)
    });
    assert!(legs.is_ok(), "{legs:?} {:?}", established_tcp());
}

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let path = e.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if e.file_name() == name {
            return Some(path);
        }
    }
    None
}

/// A tunnel that must read the profile again while a login holds it (its
/// lock held here) goes on relaying its other connections, and gives up
/// on the new one after a while, saying why. Before, that read waited on
/// the tunnel's only thread, and every connection through the tunnel
/// stopped with it, for as long as the login held the lock.
#[test]
fn a_login_holding_the_profile_does_not_stop_the_tunnels_connections() {
    let (s, t, _) = granted();
    let (mut open, _) = RawPg::connect(&t);
    // The certificate looks renewed: a new connection reads the profile.
    let cert = find_file(s.alice.home.path(), "tls.crt").unwrap();
    run(Command::new("touch").arg(&cert)).unwrap();
    let lock = std::fs::File::open(cert.with_file_name(".lock")).unwrap();
    lock.lock().unwrap();
    let mut waiting = select_1(&t);
    // While it waits, the connection already open goes on.
    let mut answered = 0;
    let status = loop {
        if let Some(status) = waiting.try_wait().unwrap() {
            break status;
        }
        open.send(b'Q', b"select 6 * 7 as answer\0");
        let mut rows = Vec::new();
        loop {
            let (tag, msg) = open.next();
            match tag {
                b'D' => rows.push(msg),
                b'Z' => break,
                b'E' => panic!("{:?}", wicket_api::pg::parse_error_response(&msg)),
                _ => {}
            }
        }
        assert!(rows.len() == 1 && rows[0].ends_with(b"42"), "{rows:?}");
        answered += 1;
        assert!(answered < 1_000_000, "the new connection never ended");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut waiting.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("has been writing your profile"), "{err}");
    assert!(answered > 10, "{answered} answered meanwhile");
    // Once the login is done, new connections go through.
    drop(lock);
    let (ok, out, err) = t.sql("select 1");
    assert!(ok && out == "1", "{out} {err}");
}
