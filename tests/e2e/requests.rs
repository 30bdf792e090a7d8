//! Access requests end to end through the real `wicket` CLI: create, review by
//! the right people, certificates bound to the grant's exact window (checked
//! with `ssh-keygen` and `openssl`), drop, revoke, timers and restarts.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use wicket_e2e::harness_util::{run, wait_until};
use wicket_e2e::harness_wicket::{totp_code, WicketCli, Wicketd};

const PW: &str = "correct horse battery staple";

/// The example configuration with dave always on call and fast timers.
fn config(pending_ttl: &str, escalate_after: &str) -> String {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/wicket.yaml"
    ))
    .unwrap();
    example
        .replace("rotation: [ dave, erin ]", "rotation: [ dave ]")
        .replace("min_duration: 1m", "min_duration: 1s")
        .replace("pending_ttl: 1h", &format!("pending_ttl: {pending_ttl}"))
        .replace(
            "escalate_after: 30m",
            &format!("escalate_after: {escalate_after}"),
        )
}

struct Team {
    d: Wicketd,
    users: Vec<(&'static str, WicketCli)>,
}

impl Team {
    fn start(yaml: String) -> Team {
        let d = Wicketd::builder().config(yaml).start().unwrap();
        let mut users = Vec::new();
        for (name, roles) in [
            ("alice", "dev"),
            ("bob", "dev"),
            ("carol", "dev"),
            ("dave", "sre"),
            ("erin", "sre"),
            ("frank", "security-admin"),
        ] {
            d.add_user(name, roles, PW, false).unwrap();
            let cli = WicketCli::new().unwrap();
            let out = cli.login(&d, name, PW, &[]).unwrap();
            assert!(out.ok, "{name}: {}", out.stderr);
            users.push((name, cli));
        }
        Team { d, users }
    }

    fn cli(&self, name: &str) -> &WicketCli {
        &self.users.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn json(&self, who: &str, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        self.cli(who).ok(&a).unwrap().json().unwrap()
    }

    fn create(&self, who: &str, args: &[&str]) -> Value {
        let mut a = vec!["request", "create"];
        a.extend_from_slice(args);
        self.json(who, &a)
    }

    fn show(&self, who: &str, id: &str) -> Value {
        self.json(who, &["request", "show", id])
    }

    fn fails(&self, who: &str, args: &[&str]) -> String {
        let out = self.cli(who).run(args, "").unwrap();
        assert!(!out.ok, "expected wicket {args:?} to fail: {}", out.stdout);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
        out.stderr
    }
}

fn ts(v: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap()
}

fn file(status: &Value, k: &str) -> PathBuf {
    PathBuf::from(status["files"][k].as_str().unwrap())
}

#[test]
fn prod_ssh_needs_oncall_and_team_lead_then_certificates_match_the_grant() {
    let t = Team::start(config("1h", "30m"));
    let req = t.create(
        "alice",
        &[
            "--roles",
            "prod-ssh",
            "--reason",
            "INC-1234: disk full on db-1",
            "--duration",
            "2h",
        ],
    );
    let id = req["id"].as_str().unwrap().to_owned();
    assert_eq!(req["status"], "pending");
    assert_eq!(req["requester_normal_roles"], serde_json::json!(["dev"]));
    assert!(
        req["granted_permissions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "ssh:root@db-1"),
        "{req}"
    );
    // Who sees it as reviewable: dave (on call) and bob (alice's team lead), not carol or erin.
    for (who, expect) in [
        ("dave", true),
        ("bob", true),
        ("carol", false),
        ("erin", false),
    ] {
        let list = t.json(who, &["request", "ls", "--reviewable"]);
        let found = list
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["id"] == id.as_str());
        assert_eq!(found, expect, "{who}");
    }
    // The requester cannot approve; a non-reviewer cannot either (and it is audited).
    let e = t.fails(
        "alice",
        &["request", "review", &id, "--approve", "--reason", "me"],
    );
    assert!(e.contains("own requests"), "{e}");
    // What one person writes for another to read is text: an escape
    // sequence that would redraw the reviewer's terminal is refused, and
    // the refusal itself reaches the terminal escaped.
    let e = t.fails(
        "alice",
        &[
            "request",
            "create",
            "--roles",
            "prod-ssh",
            "--reason",
            "INC-1\u{1b}[2A\rRoles: readonly",
        ],
    );
    assert!(e.contains("control character U+001B"), "{e}");
    assert!(!e.contains('\u{1b}'), "{e:?}");
    let e = t.fails(
        "dave",
        &[
            "request",
            "review",
            &id,
            "--approve",
            "--reason",
            "ok\u{9b}2J",
        ],
    );
    assert!(e.contains("U+009B") && !e.contains('\u{9b}'), "{e:?}");
    // A request carol may not review is not hers to see either: she
    // learns nothing of it (not its roles, nor its state), whatever she
    // tries with its ID.
    let e = t.fails(
        "carol",
        &["request", "review", &id, "--approve", "--reason", "sure"],
    );
    assert!(e.contains("not found") && !e.contains("prod"), "{e}");
    let e = t.fails("carol", &["request", "cancel", &id]);
    assert!(e.contains("not found"), "{e}");
    // Step one: the on-call SRE.
    t.cli("dave")
        .ok(&[
            "request",
            "review",
            &id,
            "--approve",
            "--reason",
            "on call, ok",
        ])
        .unwrap();
    let g = t.show("alice", &id);
    assert_eq!(g["status"], "pending");
    assert!(g["still_needed"].to_string().contains("team_lead"), "{g}");
    let e = t.fails("alice", &["login", "--request-id", &id]);
    assert!(e.contains("is pending"), "{e}");
    // Step two: the team lead; the grant starts now and lasts 2h.
    t.cli("bob")
        .ok(&["request", "review", &id, "--approve", "--reason", "lead ok"])
        .unwrap();
    let g = t.show("alice", &id);
    assert_eq!(g["status"], "active");
    assert_eq!(g["approved_by"], "dave,bob");
    let (starts, expires) = (ts(&g["starts_at"]), ts(&g["expires_at"]));
    assert_eq!((expires - starts).num_seconds(), 7200);

    // Certificates for the grant: exact window, standing + granted roles.
    let login_until = ts(&t.cli("alice").status().unwrap()["valid_before"]);
    t.cli("alice").ok(&["login", "--request-id", &id]).unwrap();
    let st = t.cli("alice").status().unwrap();
    assert_eq!(st["request_ids"], serde_json::json!([id]));
    assert_eq!(
        ts(&st["login_until"]),
        login_until,
        "a grant's certificates carry the login's end on"
    );
    assert_eq!(st["roles"], serde_json::json!(["dev", "prod-ssh"]));
    assert_eq!(
        st["principals"],
        serde_json::json!(["alice", "root", "ubuntu"])
    );
    assert_eq!(ts(&st["valid_after"]), starts);
    assert_eq!(ts(&st["valid_before"]), expires);
    let listing = run(Command::new("ssh-keygen")
        .env("TZ", "UTC")
        .arg("-L")
        .arg("-f")
        .arg(file(&st, "ssh_certificate")))
    .unwrap();
    let fmt = |t: chrono::DateTime<chrono::FixedOffset>| t.format("%Y-%m-%dT%H:%M:%S").to_string();
    assert!(
        listing.contains(&format!("Valid: from {} to {}", fmt(starts), fmt(expires))),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("requests={id}")),
        "key ID names the request: {listing}"
    );
    let dates = run(Command::new("openssl")
        .args(["x509", "-noout", "-dates", "-in"])
        .arg(file(&st, "tls_certificate")))
    .unwrap();
    assert!(
        dates.contains(&starts.format("notBefore=%b %e %H:%M:%S %Y GMT").to_string()),
        "{dates}"
    );
    assert!(
        dates.contains(&expires.format("notAfter=%b %e %H:%M:%S %Y GMT").to_string()),
        "{dates}"
    );
    let ls = t.json("alice", &["ls"]);
    assert!(ls["nodes"].to_string().contains("db-1"), "{ls}");

    // Drop: the grant ends for everyone at once; the CLI logs back in without it.
    let out = t.cli("alice").ok(&["request", "drop"]).unwrap();
    assert!(out.stdout.contains("dropped request"), "{}", out.stdout);
    let st = t.cli("alice").status().unwrap();
    assert_eq!(st["request_ids"], serde_json::json!([]));
    assert_eq!(st["principals"], serde_json::json!(["alice"]));
    assert_eq!(
        ts(&st["valid_before"]),
        login_until,
        "reissued certificates end with the password login, however often renewed"
    );
    let g = t.show("alice", &id);
    assert_eq!(g["status"], "expired");
    assert!(g["end_reason"].as_str().unwrap().contains("dropped"));
    let e = t.fails("alice", &["login", "--request-id", &id]);
    assert!(e.contains("is expired (dropped by its holder)"), "{e}");
    // The audit trail has every step, linked to the request.
    let trail = t.json("frank", &["audit", "search", "--request", &id]);
    let kinds: Vec<&str> = trail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "request_created",
        "request_reviewed",
        "request_approved",
        "grant_activated",
        "login_succeeded",
        "grant_dropped",
        "grant_ended",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let denied = t.json("frank", &["audit", "search", "--kind", "access_denied"]);
    assert!(
        denied
            .to_string()
            .contains("carol is not the requester, a reviewer, an auditor or a revoker"),
        "{denied}"
    );
}

#[test]
fn scope_reduction_revoke_deny_ask_and_self_approve() {
    let t = Team::start(config("1h", "30m"));
    // dba: any of role:sre; erin approves with a shorter duration.
    let id = t.create(
        "alice",
        &[
            "--roles",
            "dba",
            "--reason",
            "slow queries",
            "--duration",
            "2h",
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    t.cli("erin")
        .ok(&[
            "request",
            "review",
            &id,
            "--approve",
            "--reason",
            "30m is enough",
            "--duration",
            "30m",
        ])
        .unwrap();
    let g = t.show("alice", &id);
    assert_eq!(g["status"], "active");
    assert_eq!(
        (ts(&g["expires_at"]) - ts(&g["starts_at"])).num_seconds(),
        1800
    );
    t.cli("alice").ok(&["login", "--request-id", &id]).unwrap();
    // Only roles with `revoke` may revoke; frank does, and it takes at once.
    let e = t.fails("erin", &["request", "revoke", &id, "--reason", "x"]);
    assert!(e.contains("may not revoke"), "{e}");
    t.cli("frank")
        .ok(&["request", "revoke", &id, "--reason", "suspicious activity"])
        .unwrap();
    let g = t.show("alice", &id);
    assert_eq!(g["status"], "revoked");
    assert_eq!(g["revoked_by"], "frank");
    assert_eq!(g["revoke_reason"], "suspicious activity");
    let e = t.fails("alice", &["login", "--request-id", &id]);
    assert!(e.contains("revoked by frank: suspicious activity"), "{e}");
    // The requester is notified.
    let notes = t.json("frank", &["audit", "search", "--request", &id]);
    assert!(notes.to_string().contains("grant_revoked"));
    // The end of its sessions is on the revoker's record, not the holder's.
    let ended: Vec<&Value> = notes
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "grant_ended")
        .collect();
    assert_eq!(ended.len(), 1, "{notes}");
    assert_eq!(ended[0]["actor"], "frank", "{notes}");

    // Deny.
    let id = t.create("carol", &["--roles", "dba", "--reason", "curious"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    t.cli("dave")
        .ok(&["request", "review", &id, "--deny", "--reason", "no ticket"])
        .unwrap();
    assert_eq!(t.show("carol", &id)["status"], "denied");
    let e = t.fails(
        "erin",
        &["request", "review", &id, "--approve", "--reason", "late"],
    );
    assert!(e.contains("denied"), "{e}");

    // Ask for more information, answer, approve.
    let id = t.create("carol", &["--roles", "dba", "--reason", "need it"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    t.cli("dave")
        .ok(&["request", "ask", &id, "--reason", "which ticket?"])
        .unwrap();
    assert_eq!(t.show("carol", &id)["status"], "needs-info");
    let e = t.fails(
        "erin",
        &["request", "review", &id, "--approve", "--reason", "ok"],
    );
    assert!(e.contains("needs-info"), "{e}");
    t.cli("carol")
        .ok(&["request", "update", &id, "--reason", "INC-77"])
        .unwrap();
    assert_eq!(t.show("carol", &id)["status"], "pending");
    t.cli("erin")
        .ok(&["request", "review", &id, "--approve", "--reason", "ok now"])
        .unwrap();
    let g = t.show("carol", &id);
    assert_eq!(g["status"], "active");
    assert!(g["justification"].as_str().unwrap().contains("INC-77"));

    // Self-approved role: active at once. Too long for the role: refused.
    let g = t.create(
        "bob",
        &[
            "--roles",
            "dev-admin",
            "--reason",
            "fix dev box",
            "--duration",
            "1h",
        ],
    );
    assert_eq!(g["status"], "active");
    assert_eq!(g["approved_by"], "self-approved");
    let e = t.fails(
        "bob",
        &[
            "request",
            "create",
            "--roles",
            "dba",
            "--reason",
            "x",
            "--duration",
            "3h",
        ],
    );
    assert!(e.contains("longer than"), "{e}");
    let e = t.fails(
        "bob",
        &[
            "request",
            "create",
            "--roles",
            "kube-admin",
            "--reason",
            "x",
        ],
    );
    assert!(e.contains("may not request"), "{e}");
    let e = t.fails("bob", &["request", "create", "--roles", "dba"]);
    assert!(e.contains("reason is required"), "{e}");
    // Cancel a pending request; extend an active one once.
    let id = t.create("bob", &["--roles", "dba", "--reason", "later"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        t.json("bob", &["request", "cancel", &id])["status"],
        "cancelled"
    );
    assert_eq!(t.show("bob", &id)["status"], "cancelled");
    let id = t.create(
        "bob",
        &["--roles", "dev-admin", "--reason", "x", "--duration", "1h"],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    t.cli("bob")
        .ok(&["request", "extend", &id, "--duration", "1h"])
        .unwrap();
    let g = t.show("bob", &id);
    assert_eq!(
        (ts(&g["expires_at"]) - ts(&g["starts_at"])).num_seconds(),
        7200
    );
    let e = t.fails("bob", &["request", "extend", &id, "--duration", "1h"]);
    assert!(e.contains("extension"), "{e}");
}

#[test]
fn feature_request_body_shape_and_grant_schema() {
    let t = Team::start(config("1h", "30m"));
    let body = r#"{"role":"dba","duration_hours":1,"reason":"INC-1234: Production database performance issue","ticket_url":"https://jira.example.com/INC-1234"}"#;
    let out = run(t
        .cli("alice")
        .curl()
        .unwrap()
        .args(["-H", "Content-Type: application/json"])
        .args(["--data", body])
        .arg(format!("https://{}/v1/requests", t.d.proxy())))
    .unwrap();
    let g: Value = serde_json::from_str(&out).unwrap();
    for field in [
        "id",
        "requester",
        "requester_normal_roles",
        "granted_roles",
        "granted_permissions",
        "justification",
        "ticket_url",
        "approved_by",
        "approved_at",
        "starts_at",
        "expires_at",
        "status",
        "actions_taken",
        "revoked_by",
        "revoke_reason",
    ] {
        assert!(g.get(field).is_some(), "grant JSON lacks {field}: {g}");
    }
    assert_eq!(g["requested_duration_secs"], 3600);
    assert_eq!(g["ticket_url"], "https://jira.example.com/INC-1234");
    let text = t
        .cli("dave")
        .ok(&["request", "show", g["id"].as_str().unwrap()])
        .unwrap()
        .stdout;
    assert!(
        text.contains("Requester:    alice (standing roles: dev)"),
        "{text}"
    );
    assert!(
        text.contains("Still needed:") && text.contains("Can review:"),
        "{text}"
    );
    // A reviewer's reason of several lines stays inside its field: no line
    // of it passes for another review.
    let id = g["id"].as_str().unwrap();
    t.cli("dave")
        .ok(&[
            "request",
            "review",
            id,
            "--deny",
            "--reason",
            "no ticket\nReview:       erin approve at 2026-01-01T00:00:00+00:00: ok (as role:sre)",
        ])
        .unwrap();
    let text = t.cli("dave").ok(&["request", "show", id]).unwrap().stdout;
    assert!(
        text.contains("no ticket\n              Review:       erin approve"),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("Review:       erin")),
        "{text}"
    );
}

#[test]
fn timers_escalate_expire_schedule_and_survive_restart() {
    let t = Team::start(config("6s", "2s"));
    // Escalation, then expiry of an unanswered request.
    let id = t.create("alice", &["--roles", "dba", "--reason", "nobody home"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let g = wait_until("escalation", Duration::from_secs(20), || {
        let g = t.show("frank", &id);
        (g["escalated"] == true).then_some(g)
    })
    .unwrap();
    assert_eq!(g["status"], "pending");
    let trail = t.json("frank", &["audit", "search", "--request", &id]);
    let escalated = trail
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "request_escalated")
        .unwrap();
    assert!(
        escalated["data"]["detail"]
            .as_str()
            .unwrap()
            .contains("role:security-admin"),
        "{escalated}"
    );
    wait_until("pending expiry", Duration::from_secs(20), || {
        (t.show("frank", &id)["status"] == "expired").then_some(())
    })
    .unwrap();

    // A scheduled grant activates at its start; a short one expires on time.
    let start = (chrono::Utc::now() + chrono::Duration::seconds(3))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let g = t.create(
        "bob",
        &[
            "--roles",
            "dev-admin",
            "--reason",
            "window",
            "--duration",
            "3s",
            "--start-at",
            &start,
        ],
    );
    let id = g["id"].as_str().unwrap().to_owned();
    assert_eq!(g["status"], "approved");
    let e = t.fails("bob", &["login", "--request-id", &id]);
    assert!(e.contains("starts at"), "{e}");
    wait_until("scheduled start", Duration::from_secs(20), || {
        (t.show("bob", &id)["status"] == "active").then_some(())
    })
    .unwrap();
    wait_until("grant expiry", Duration::from_secs(20), || {
        (t.show("bob", &id)["status"] == "expired").then_some(())
    })
    .unwrap();
    let trail = t.json("frank", &["audit", "search", "--request", &id]);
    assert!(trail.to_string().contains("grant_expired"), "{trail}");

    // Timers come from the store: a grant that ends while wicketd is down is
    // expired as soon as it is back.
    let g = t.create(
        "bob",
        &[
            "--roles",
            "dev-admin",
            "--reason",
            "short",
            "--duration",
            "4s",
        ],
    );
    let id = g["id"].as_str().unwrap().to_owned();
    let Team { d, users } = t;
    let d = d.restart_after(Duration::from_secs(5)).unwrap();
    let t = Team { d, users };
    let bob = &t.users.iter().find(|(n, _)| *n == "bob").unwrap().1;
    // Log in again (new port); then the grant is already expired.
    let out = bob.login(&t.d, "bob", PW, &[]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let g = wait_until("expiry after restart", Duration::from_secs(5), || {
        let g = t.show("bob", &id);
        (g["status"] == "expired").then_some(g)
    })
    .unwrap();
    assert!(
        g["end_reason"].as_str().unwrap().contains("window ended"),
        "{g}"
    );
}

/// Break-glass codes cannot be guessed one by one: wrong codes are counted
/// (per user and per source), and after `auth.max_failures_per_user` of
/// them even the right code is refused unchecked until the window passes.
/// They count apart from failed logins, which anyone can make in a user's
/// name: those do not lock the user out of break-glass.
#[test]
fn wrong_break_glass_codes_are_rate_limited_apart_from_logins() {
    let d = Wicketd::builder()
        .config(config("1h", "30m"))
        .start()
        .unwrap();
    let uri = d.add_user("gail", "sre", PW, true).unwrap().unwrap();
    let code_at = |offset: i64| totp_code(&uri, offset).unwrap();
    let gail = WicketCli::new().unwrap();
    assert!(
        gail.login(&d, "gail", PW, &["--otp", &code_at(0)])
            .unwrap()
            .ok
    );
    let try_code = |code: &str| {
        gail.run(
            &[
                "break-glass",
                "--roles",
                "kube-admin",
                "--reason",
                "SEV1",
                "--otp",
                code,
            ],
            "",
        )
        .unwrap()
    };
    // A stranger fails five logins in gail's name: her password login is
    // refused for the window, her break-glass is not.
    let stranger = WicketCli::new().unwrap();
    for _ in 0..5 {
        assert!(!stranger.login(&d, "gail", "guessing...", &[]).unwrap().ok);
    }
    let out = stranger
        .login(&d, "gail", PW, &["--otp", &code_at(60)])
        .unwrap();
    assert!(
        !out.ok && out.stderr.contains("too many failed attempts"),
        "{}",
        out.stderr
    );
    // Codes of an hour ago: wrong now, each checked.
    for i in 0..5 {
        let out = try_code(&code_at(-3600 - 30 * i));
        assert!(
            !out.ok && out.stderr.contains("invalid or already used OTP code"),
            "try {i}: {}",
            out.stderr
        );
    }
    let out = try_code(&code_at(30));
    assert!(
        !out.ok && out.stderr.contains("too many failed attempts"),
        "the right code after five wrong ones: {}",
        out.stderr
    );
    // Each wrong code is on the record.
    let frank = {
        d.add_user("frank", "security-admin", PW, false).unwrap();
        WicketCli::logged_in(&d, "frank", PW).unwrap()
    };
    let denied = frank
        .ok(&[
            "audit",
            "search",
            "--user",
            "gail",
            "--kind",
            "access_denied",
            "--format",
            "json",
        ])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(denied.as_array().unwrap().len(), 5, "{denied}");
}

#[test]
fn break_glass_needs_fresh_totp_and_notifies_security() {
    let d = Wicketd::builder()
        .config(config("1h", "30m"))
        .start()
        .unwrap();
    let uri = d.add_user("gail", "sre", PW, true).unwrap().unwrap();
    d.add_user("frank", "security-admin", PW, false).unwrap();
    let code_at = |offset: i64| totp_code(&uri, offset).unwrap();
    let gail = WicketCli::new().unwrap();
    let out = gail.login(&d, "gail", PW, &["--otp", &code_at(0)]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    // The code used for login is spent: break-glass needs a fresh one.
    let out = gail
        .run(
            &[
                "break-glass",
                "--roles",
                "kube-admin",
                "--reason",
                "outage",
                "--otp",
                &code_at(0),
            ],
            "",
        )
        .unwrap();
    assert!(!out.ok && out.stderr.contains("OTP"), "{}", out.stderr);
    let out = gail
        .run(
            &[
                "break-glass",
                "--roles",
                "kube-admin",
                "--reason",
                "SEV1 outage",
                "--otp",
                &code_at(30),
                "--duration",
                "2h",
            ],
            "",
        )
        .unwrap();
    assert!(
        !out.ok && out.stderr.contains("longer than"),
        "capped at 1h: {}",
        out.stderr
    );
    let out = gail
        .run(
            &[
                "break-glass",
                "--roles",
                "kube-admin",
                "--reason",
                "SEV1 outage",
                "--otp",
                &code_at(30),
                "--format",
                "json",
            ],
            "",
        )
        .unwrap();
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.contains("BREAK-GLASS"), "{}", out.stderr);
    let st = gail.status().unwrap();
    let id = st["request_ids"][0].as_str().unwrap().to_owned();
    assert!(st["roles"].to_string().contains("kube-admin"));
    assert_eq!(
        (ts(&st["valid_before"]) - ts(&st["valid_after"])).num_seconds(),
        3600
    );
    let frank = WicketCli::new().unwrap();
    assert!(frank.login(&d, "frank", PW, &[]).unwrap().ok);
    let g = frank
        .ok(&["request", "show", &id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(g["break_glass"], true);
    assert_eq!(g["approved_by"], "break-glass");
    assert_eq!(g["status"], "active");
    let notes = frank
        .ok(&["audit", "search", "--request", &id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert!(notes.to_string().contains("break_glass_used"), "{notes}");
    let listed = |cli: &WicketCli| {
        let v = cli
            .ok(&["request", "ls", "--reviewable", "--format", "json"])
            .unwrap()
            .json()
            .unwrap();
        v.as_array().unwrap().iter().any(|g| g["id"] == id.as_str())
    };
    assert!(
        listed(&frank),
        "break-glass grants are listed for after-the-fact review"
    );
    frank
        .ok(&[
            "request",
            "review",
            &id,
            "--acknowledge",
            "--reason",
            "reviewed the session",
        ])
        .unwrap();
    let g = frank
        .ok(&["request", "show", &id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(g["acknowledged_by"], "frank");
    assert!(!listed(&frank), "acknowledged grants leave the review list");
}

#[test]
fn wait_shows_progress_and_logs_in_on_approval() {
    let t = Team::start(config("1h", "30m"));
    let mut child = t
        .cli("alice")
        .cmd()
        .unwrap()
        .args([
            "request",
            "create",
            "--roles",
            "dba",
            "--reason",
            "INC-9",
            "--resource",
            "prod-pg",
            "--wait",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_until("the request to appear", Duration::from_secs(20), || {
        let list = t.json("dave", &["request", "ls", "--reviewable"]);
        list.as_array()
            .unwrap()
            .first()
            .map(|g| g["id"].as_str().unwrap().to_owned())
    })
    .unwrap();
    assert_eq!(
        t.show("dave", &id)["resources"],
        serde_json::json!(["prod-pg"])
    );
    t.cli("dave")
        .ok(&["request", "review", &id, "--approve", "--reason", "go"])
        .unwrap();
    let status = wait_until("wicket --wait to finish", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    })
    .unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("waiting for a decision") && err.contains("logging in with request"),
        "{err}"
    );
    let st = t.cli("alice").status().unwrap();
    assert_eq!(st["request_ids"], serde_json::json!([id]));
    assert!(st["roles"].to_string().contains("dba"));
    // The queued notifications: reviewers on creation, the requester on approval.
    let out = run(t.cli("frank").curl().unwrap().arg(format!(
        "https://{}/v1/notifications?request={id}",
        t.d.proxy()
    )))
    .unwrap();
    let notes: Value = serde_json::from_str(&out).unwrap();
    let notes = notes.as_array().unwrap();
    let reviewers = &notes[0]["recipients"];
    for who in ["dave", "erin", "frank"] {
        assert!(
            reviewers.to_string().contains(who),
            "{who} not notified: {reviewers}"
        );
    }
    assert!(!reviewers.to_string().contains("alice"));
    assert!(notes
        .iter()
        .any(|n| n["recipients"] == serde_json::json!(["alice"])
            && n["subject"].as_str().unwrap().contains("approved")));
    // A listing is bounded: the newest `limit`, oldest first.
    let newest = |limit: &str| {
        let out = run(t.cli("frank").curl().unwrap().arg(format!(
            "https://{}/v1/notifications?request={id}&limit={limit}",
            t.d.proxy()
        )))
        .unwrap();
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let last = newest("1");
    assert_eq!(last.as_array().unwrap().len(), 1, "{last}");
    assert_eq!(&last[0], notes.last().unwrap());
    assert_eq!(
        newest("2").as_array().unwrap()[..],
        notes[notes.len() - 2..]
    );
    let zero = t
        .cli("frank")
        .curl()
        .unwrap()
        .arg(format!(
            "https://{}/v1/notifications?request={id}&limit=0",
            t.d.proxy()
        ))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&zero.stdout);
    assert!(
        !zero.status.success() && body.contains("limit 0: give 1 to 10000"),
        "{body}"
    );
}

/// `wicket audit search --type/--since`, and `wicket audit verify`: the log
/// is a hash chain, and a row changed in the store is found and placed.
#[test]
fn audit_search_by_type_and_time_and_verify_finds_a_changed_event() {
    let t = Team::start(config("1h", "30m"));
    let logins = t.json("frank", &["audit", "search", "--type", "login_succeeded"]);
    let logins = logins.as_array().unwrap();
    assert_eq!(logins.len(), 6, "{logins:?}");
    assert!(logins.iter().all(|e| e["kind"] == "login_succeeded"));
    let cut = logins[3]["time"].as_str().unwrap();
    let cut_at = chrono::DateTime::parse_from_rfc3339(cut).unwrap();
    let later = t.json("frank", &["audit", "search", "--since", cut]);
    let later = later.as_array().unwrap();
    assert!(!later.is_empty());
    assert!(later.iter().all(|e| ts(&e["time"]) >= cut_at), "{later:?}");
    let everything = t.json("frank", &["audit", "search"]);
    let expected = everything
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| ts(&e["time"]) >= cut_at)
        .count();
    assert_eq!(later.len(), expected);
    // A limit gives the oldest that match, and says when there are more.
    let search = |limit: &str| {
        let args = [
            "audit",
            "search",
            "--type",
            "login_succeeded",
            "--limit",
            limit,
        ];
        let out = t
            .cli("frank")
            .ok(&[&args[..], &["--format", "json"]].concat())
            .unwrap();
        let ids: Vec<Value> = out
            .json()
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].clone())
            .collect();
        (ids, out.stderr)
    };
    let (ids, said) = search("2");
    assert_eq!(ids, [logins[0]["id"].clone(), logins[1]["id"].clone()]);
    assert!(
        said.contains("2 events shown") && said.contains("there may be more"),
        "{said}"
    );
    let (ids, said) = search("6");
    assert_eq!(ids.len(), 6);
    assert!(!said.contains("there may be more"), "{said}");
    let out = t
        .cli("frank")
        .run(&["audit", "search", "--limit", "0"], "")
        .unwrap();
    assert!(!out.ok && out.stderr.contains("--limit"), "{}", out.stderr);

    let v = t.json("frank", &["audit", "verify"]);
    assert_eq!(v["intact"], true, "{v}");
    assert!(v["events"].as_u64().unwrap() >= 12, "{v}");
    // Checking the whole log needs a role that reads everyone's events.
    let e = t.fails("alice", &["audit", "verify"]);
    assert!(e.contains("audit"), "{e}");
    // wicketd records the head it saw (so a tail cut later is found).
    let head = v["head_seq"].as_i64().unwrap();
    let seen = t.d.data_dir().join("ca").join("audit_chain_seen");
    wait_until("the head on record", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&seen).ok()?;
        let seq: i64 = text.split(' ').next()?.parse().ok()?;
        (seq >= head).then_some(())
    })
    .unwrap();

    // Someone with write access to the store rewrites who logged in.
    let victim = logins[1]["id"].as_str().unwrap().to_owned();
    let db = t.d.data_dir().join("wicket.db");
    write_behind_wicket(
        &db,
        "UPDATE audit_events SET actor = 'mallory' WHERE id = ?",
        &victim,
    );
    let out = t.cli("frank").run(&["audit", "verify"], "").unwrap();
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("({victim}) was changed or put in")),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("tampered with"), "{}", out.stderr);

    // What the store holds reaches the auditor's terminal only as text: an
    // event ID made to clear the line, or to start one, and print "intact"
    // is shown escaped, on its problem's line, not obeyed.
    let forged = logins[0]["id"].as_str().unwrap().to_owned();
    write_behind_wicket(
        &db,
        "UPDATE audit_events SET id = id || char(13, 27) || '[2Kaudit log intact' \
         || char(10) || 'audit log intact' WHERE id = ?",
        &forged,
    );
    let out = t.cli("frank").run(&["audit", "verify"], "").unwrap();
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        !out.stdout.contains('\x1b')
            && !out.stdout.contains('\r')
            && !out
                .stdout
                .lines()
                .any(|l| l.starts_with("audit log intact")),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "{forged}\\u{{d}}\\u{{1b}}[2Kaudit log intact\\naudit log intact"
        )),
        "{}",
        out.stdout
    );
}

/// Runs `sql` with `id` bound on the SQLite store at `db`, as someone with
/// write access to it would, behind wicketd's back; one row must change.
fn write_behind_wicket(db: &std::path::Path, sql: &str, id: &str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                .await
                .unwrap();
            let changed = sqlx::query(sql).bind(id).execute(&mut c).await.unwrap();
            assert_eq!(changed.rows_affected(), 1);
            c.close().await.unwrap();
        });
}

/// A grant in the certificates that has ended meanwhile (revoked, say)
/// neither blocks dropping the others nor is carried into new
/// certificates: `wicket request drop` with no ID drops the live ones and
/// logs back in without any.
#[test]
fn dropping_grants_passes_over_one_revoked_meanwhile() {
    let t = Team::start(config("1h", "30m"));
    let revoked = t.create(
        "alice",
        &[
            "--roles",
            "dev-admin",
            "--reason",
            "fix dev box",
            "--duration",
            "1h",
        ],
    );
    let revoked = revoked["id"].as_str().unwrap().to_owned();
    let live = t.create(
        "alice",
        &["--roles", "dba", "--reason", "INC-9", "--duration", "1h"],
    );
    let live = live["id"].as_str().unwrap().to_owned();
    t.cli("dave")
        .ok(&["request", "review", &live, "--approve", "--reason", "ok"])
        .unwrap();
    t.cli("alice")
        .ok(&["login", "--request-id", &revoked, "--request-id", &live])
        .unwrap();
    let st = t.cli("alice").status().unwrap();
    assert_eq!(st["request_ids"].as_array().unwrap().len(), 2, "{st}");
    // The login that carried both is on the record of each.
    for id in [&revoked, &live] {
        let logins = t.json(
            "frank",
            &[
                "audit",
                "search",
                "--request",
                id,
                "--kind",
                "login_succeeded",
            ],
        );
        let carried = |e: &Value| {
            let ids = e["data"]["request_ids"].as_array().unwrap();
            ids.len() == 2
                && ids.contains(&Value::from(&revoked[..]))
                && ids.contains(&Value::from(&live[..]))
        };
        assert!(
            logins.as_array().unwrap().iter().any(carried),
            "{id}: {logins}"
        );
    }
    t.cli("frank")
        .ok(&["request", "revoke", &revoked, "--reason", "not needed"])
        .unwrap();
    // On a new machine, one step (as `tsh login --request-id`): the
    // password login, then the grant.
    let laptop = WicketCli::new().unwrap();
    let out = laptop
        .login(
            &t.d,
            "alice",
            PW,
            &["--request-id", &live, "--format", "json"],
        )
        .unwrap();
    assert!(out.ok, "{}", out.stderr);
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        printed["request_ids"],
        serde_json::json!([live]),
        "{printed}"
    );
    assert_eq!(
        laptop.status().unwrap()["request_ids"],
        serde_json::json!([live])
    );

    let out = t.cli("alice").ok(&["request", "drop"]).unwrap();
    assert!(
        out.stdout.contains(&format!("dropped request {live}")) && !out.stdout.contains(&revoked),
        "{}",
        out.stdout
    );
    let st = t.cli("alice").status().unwrap();
    assert_eq!(st["request_ids"], serde_json::json!([]), "{st}");
    assert_eq!(t.show("alice", &live)["status"], "expired");
    assert_eq!(t.show("alice", &revoked)["status"], "revoked");
    // Nothing held: said so.
    let e = t.fails("alice", &["request", "drop"]);
    assert!(e.contains("no active access requests"), "{e}");

    // A reader that goes away (`wicket request ls | head -1`) ends the
    // listing quietly, as for other Unix tools.
    let mut ls = t
        .cli("alice")
        .cmd()
        .unwrap()
        .args(["request", "ls", "--mine"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(ls.stdout.take());
    let out = ls.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "{:?}: {err}",
        out.status
    );

    // A relative WICKET_HOME still gives absolute paths (they go into the
    // ssh configuration, read from any directory).
    let home = t.cli("alice").home.path().to_owned();
    let out = t
        .cli("alice")
        .cmd()
        .unwrap()
        .args(["status", "--format", "json"])
        .env("WICKET_HOME", home.file_name().unwrap())
        .current_dir(home.parent().unwrap())
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cert = file(&st, "tls_certificate");
    assert!(cert.is_absolute() && cert.starts_with(&home), "{cert:?}");
}

#[test]
fn a_user_may_have_only_so_many_requests_awaiting_review() {
    let yaml = config("1h", "30m").replace(
        "  max_extensions: 1\n",
        "  max_extensions: 1\n  max_pending_per_user: 2\n",
    );
    assert!(yaml.contains("max_pending_per_user: 2"));
    let t = Team::start(yaml);
    let ask = |who: &str| t.create(who, &["--roles", "dba", "--reason", "INC-7"]);
    let first = ask("alice")["id"].as_str().unwrap().to_owned();
    ask("alice");
    let e = t.fails(
        "alice",
        &["request", "create", "--roles", "dba", "--reason", "INC-7"],
    );
    assert!(
        e.contains("you have 2 requests awaiting review")
            && e.contains("requests.max_pending_per_user: 2")
            && e.contains("wicket request cancel"),
        "{e}"
    );
    // Others are not held back by alice's requests.
    ask("bob");
    // Reviewed, cancelled or self-approved ones do not count.
    t.cli("dave")
        .ok(&["request", "review", &first, "--approve", "--reason", "ok"])
        .unwrap();
    assert_eq!(t.show("alice", &first)["status"], "active");
    let third = ask("alice")["id"].as_str().unwrap().to_owned();
    t.fails(
        "alice",
        &["request", "create", "--roles", "dba", "--reason", "INC-7"],
    );
    t.cli("alice").ok(&["request", "cancel", &third]).unwrap();
    let own = t.create(
        "alice",
        &["--roles", "dev-admin", "--reason", "fix dev box"],
    );
    assert_eq!(own["status"], "active", "{own}");
    ask("alice");
    // The reviewer's queue: alice's and bob's open requests, not alice's
    // active, cancelled or self-approved ones.
    let queue = t.json("dave", &["request", "ls", "--reviewable"]);
    let mut who: Vec<&str> = queue
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["requester"].as_str().unwrap())
        .collect();
    who.sort_unstable();
    assert_eq!(who, ["alice", "alice", "bob"], "{queue}");
}
