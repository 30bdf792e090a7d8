//! The foundation end to end: `wicketd check-config`, `wicketd start` on the
//! embedded default and on the example config, `wicketd users add`, and the
//! real `wicket` CLI logging in, checked with `ssh-keygen`, `openssl` and `curl`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use wicket_e2e::harness_util::{run, wait_until};
use wicket_e2e::harness_wicket::{totp_code, wicketd_cmd, CliOutput, WicketCli, Wicketd};

const PASSWORD: &str = "correct horse battery staple";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The configuration shape that must keep working: the shared example when it
/// sits beside the repository (as in CI), and our copy in `deploy/`.
fn example_configs() -> Vec<PathBuf> {
    let mut v = vec![repo_file("deploy/wicket.yaml")];
    let shared = repo_file("../shared/examples/wicket.yaml");
    if shared.exists() {
        assert_eq!(
            std::fs::read_to_string(&shared).unwrap(),
            std::fs::read_to_string(&v[0]).unwrap(),
            "deploy/wicket.yaml must stay a copy of shared/examples/wicket.yaml"
        );
        v.push(shared);
    }
    v
}

#[test]
fn check_config_accepts_the_example() {
    for path in example_configs() {
        let out = run(wicketd_cmd().unwrap().arg("check-config").arg(&path)).unwrap();
        assert!(out.contains(": ok ("), "{out}");
        assert!(out.contains("7 roles"), "{out}");
    }
}

#[test]
fn check_config_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        r#"version: 1
listen: { api: "not an address" }
requests: { max_duration: 8x }
roles:
  dba:
    databases: { labels: { env: prod }, names: ["*"], users: [postgres] }
    max_durration: 2h
  ops:
    request: { roles: [ nosuchrole ] }
approval:
  - roles: [ dba ]
    require: { any_of: [ "group:x" ] }
bogus_top_level: true
"#,
    )
    .unwrap();
    let out = wicketd_cmd()
        .unwrap()
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "listen.api",
        "requests.max_duration",
        "roles.dba",
        "max_durration",
        "roles.ops.request.roles[0]",
        "approval[0].require.any_of[0]",
        "bogus_top_level",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains("panicked"), "{text}");
    // A file that is not YAML at all, and one that does not exist.
    std::fs::write(&path, "version: [1\n  : :").unwrap();
    let out = wicketd_cmd()
        .unwrap()
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = wicketd_cmd()
        .unwrap()
        .arg("check-config")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// What `wicketd start` prints a newcomer works as printed: the command
/// that adds a user reaches this wicketd's store and roles (its config),
/// and the login command logs in. A `listen.kube`, which nothing serves,
/// is said to be so, by `start` and by `check-config`.
#[test]
fn the_commands_wicketd_start_prints_work_as_printed() {
    let d = Wicketd::builder()
        .config(
            "version: 1\nlisten: { kube: '127.0.0.1:1' }\nroles:\n  dev:\n    logins: [\"{{user}}\"]\n    nodes: { env: dev }\n",
        )
        .start()
        .unwrap();
    let start = d.startup_output().join("\n");
    assert!(
        start
            .contains("listen.kube (127.0.0.1:1) is set, but this wicketd has no Kubernetes proxy"),
        "{start}"
    );
    let line = |prefix: &str| -> Vec<String> {
        let l = start
            .lines()
            .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_owned()))
            .unwrap_or_else(|| panic!("no {prefix:?} in {start}"));
        l.trim_end_matches(')')
            .split_whitespace()
            .map(|w| w.replace("NAME", "dana").replace("ROLE", "dev"))
            .collect()
    };
    let add = line("add a user first: wicketd ");
    assert!(add.contains(&"--config".to_owned()), "{add:?}");
    let out = wicket_e2e::harness_wicket::pipe_stdin(
        wicketd_cmd().unwrap().args(&add).arg("--password-stdin"),
        &format!("{PASSWORD}\n"),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let login = line("log in with: wicket ");
    let cli = WicketCli::new().unwrap();
    let args: Vec<&str> = login.iter().map(String::as_str).collect();
    let out = cli
        .run(
            &[&args[..], &["--password-stdin"]].concat(),
            &format!("{PASSWORD}\n"),
        )
        .unwrap();
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(cli.status().unwrap()["roles"], serde_json::json!(["dev"]));
    let yaml = d.data_dir().parent().unwrap().join("wicket.yaml");
    let checked = run(wicketd_cmd().unwrap().arg("check-config").arg(&yaml)).unwrap();
    assert!(checked.contains("no Kubernetes proxy"), "{checked}");
}

fn login_ok(cli: &WicketCli, d: &Wicketd, user: &str) {
    let out = cli.login(d, user, PASSWORD, &[]).unwrap();
    assert!(out.ok, "login failed: {}{}", out.stdout, out.stderr);
}

#[test]
fn login_on_the_embedded_default_issues_certificates_real_tools_accept() {
    let d = Wicketd::builder().start().unwrap();
    let start = d.startup_output().join("\n");
    assert!(start.contains("CA pin: sha256:"), "{start}");
    assert!(start.contains("wicket login --proxy"), "{start}");
    d.add_user("alice", "access", PASSWORD, false).unwrap();
    // CA keys are 0600.
    for entry in std::fs::read_dir(d.data_dir().join("ca")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "key") {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                p.display()
            );
        }
    }

    let cli = WicketCli::new().unwrap();
    login_ok(&cli, &d, "alice");
    let st = cli.status().unwrap();
    assert_eq!(st["user"], "alice");
    assert_eq!(st["roles"], serde_json::json!(["access"]));
    assert_eq!(st["principals"], serde_json::json!(["alice"]));
    assert_eq!(st["request_ids"], serde_json::json!([]));
    let after = chrono::DateTime::parse_from_rfc3339(st["valid_after"].as_str().unwrap()).unwrap();
    let before =
        chrono::DateTime::parse_from_rfc3339(st["valid_before"].as_str().unwrap()).unwrap();
    assert_eq!(
        (before - after).num_seconds(),
        8 * 3600 + 60,
        "login_ttl is 8h by default, and the certificate starts a minute early for clock skew"
    );

    // Private keys are 0600 and in the formats the real clients read.
    let files = &st["files"];
    let f = |k: &str| PathBuf::from(files[k].as_str().unwrap());
    for k in ["ssh_key", "tls_key"] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(f(k)).unwrap().permissions().mode() & 0o777,
            0o600,
            "{k}"
        );
    }
    let listing = run(Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(f("ssh_certificate")))
    .unwrap();
    assert!(listing.contains("user certificate"), "{listing}");
    assert!(listing.contains("Key ID: \"user=alice\""), "{listing}");
    let fmt = |t: chrono::DateTime<chrono::FixedOffset>| t.format("%Y-%m-%dT%H:%M:%S").to_string();
    // ssh-keygen prints local time; the tests run with TZ unset (UTC) in CI.
    let listing_utc = run(Command::new("ssh-keygen")
        .env("TZ", "UTC")
        .arg("-L")
        .arg("-f")
        .arg(f("ssh_certificate")))
    .unwrap();
    assert!(
        listing_utc.contains(&format!("Valid: from {} to {}", fmt(after), fmt(before))),
        "{listing_utc}"
    );
    // ssh-keygen accepts the private key (derives the public key from it).
    let derived = run(Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(f("ssh_key")))
    .unwrap();
    let pubkey = std::fs::read_to_string(f("ssh_key").with_extension("pub")).unwrap();
    assert_eq!(
        derived.split_whitespace().nth(1),
        pubkey.split_whitespace().nth(1)
    );
    let verified = run(Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(f("ca_bundle"))
        .arg(f("tls_certificate")))
    .unwrap();
    assert!(verified.trim().ends_with(": OK"), "{verified}");
    let dates = run(Command::new("openssl")
        .args(["x509", "-noout", "-dates", "-in"])
        .arg(f("tls_certificate")))
    .unwrap();
    assert!(
        dates.contains(&after.format("notBefore=%b %e %H:%M:%S %Y GMT").to_string()),
        "{dates}"
    );
    assert!(
        dates.contains(&before.format("notAfter=%b %e %H:%M:%S %Y GMT").to_string()),
        "{dates}"
    );

    // Mutual TLS with the issued certificate, through curl.
    let url = format!("https://{}/v1/me", d.proxy());
    let me = run(cli.curl().unwrap().arg(&url)).unwrap();
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    assert_eq!(me["user"], "alice");
    // Without a client certificate: 401 with a reason, never the password again.
    let anon = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(f("ca_bundle"))
        .arg(&url)
        .output()
        .unwrap();
    let anon = String::from_utf8_lossy(&anon.stdout);
    assert!(
        anon.ends_with("401") && anon.contains("client certificate"),
        "{anon}"
    );
    // The OpenAPI document is served.
    let doc = run(Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(f("ca_bundle"))
        .arg(format!("https://{}/v1/openapi.json", d.proxy())))
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"]["/v1/login"].is_object());

    // Audit: the login is on the record, visible to the user.
    let events = cli
        .ok(&["audit", "search", "--user", "alice", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"user_created") && kinds.contains(&"login_succeeded"),
        "{kinds:?}"
    );
    // ...but other users' events need an audit role.
    let denied = cli.run(&["audit", "search"], "").unwrap();
    assert!(
        !denied.ok && denied.stderr.contains("audit: true"),
        "{}",
        denied.stderr
    );

    // Logout removes the credentials.
    let out = cli
        .ok(&["logout", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(out["logged_out"], "alice");
    assert!(!f("ssh_key").exists() && !f("tls_key").exists());
    let st = cli.run(&["status"], "").unwrap();
    assert!(
        !st.ok && st.stderr.contains("not logged in"),
        "{}",
        st.stderr
    );
}

#[test]
fn wrong_credentials_are_rejected_rate_limited_and_audited() {
    let d = Wicketd::builder().start().unwrap();
    d.add_user("bob", "access,admin", PASSWORD, false).unwrap();
    let cli = WicketCli::new().unwrap();
    let bad = cli.login(&d, "bob", "wrong password!", &[]).unwrap();
    assert!(!bad.ok);
    assert_eq!(
        bad.stderr.trim(),
        "wicket: error: invalid user name or password (a user with an OTP device also needs \
         --otp CODE)"
    );
    let unknown = cli.login(&d, "mallory", PASSWORD, &[]).unwrap();
    assert_eq!(
        unknown.stderr.trim(),
        "wicket: error: invalid user name or password (a user with an OTP device also needs \
         --otp CODE)"
    );
    // The default limit is 5 failures per user in 15 minutes.
    for _ in 0..4 {
        assert!(!cli.login(&d, "bob", "wrong password!", &[]).unwrap().ok);
    }
    let limited = cli.login(&d, "bob", PASSWORD, &[]).unwrap();
    assert!(
        !limited.ok && limited.stderr.contains("too many failed attempts"),
        "{}",
        limited.stderr
    );
    assert_eq!(
        limited.stderr.lines().count(),
        1,
        "one clear line: {}",
        limited.stderr
    );
    // Refused again and again: one event for them all, so a guesser
    // cannot fill the audit log.
    for _ in 0..3 {
        let again = cli.login(&d, "bob", "wrong password!", &[]).unwrap();
        assert!(
            again.stderr.contains("too many failed attempts"),
            "{}",
            again.stderr
        );
    }

    // A second user with the audit role sees every failure on the record.
    d.add_user("carol", "admin", PASSWORD, false).unwrap();
    let auditor = WicketCli::new().unwrap();
    login_ok(&auditor, &d, "carol");
    let events = auditor
        .ok(&[
            "audit",
            "search",
            "--kind",
            "login_failed",
            "--format",
            "json",
        ])
        .unwrap()
        .json()
        .unwrap();
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["actor"] == "mallory" && e["data"]["reason"] == "unknown user"));
    assert!(
        events
            .iter()
            .all(|e| !e["data"].to_string().contains("wrong password!")),
        "passwords never reach the log"
    );
    let limited = auditor
        .ok(&[
            "audit",
            "search",
            "--kind",
            "login_rate_limited",
            "--format",
            "json",
        ])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(limited.as_array().unwrap().len(), 1, "{limited:?}");
    assert!(
        !d.stderr().contains("wrong password!"),
        "secrets are never logged"
    );
}

/// Failed logins in a user's name, from anywhere, reach the user's limit
/// (5), but cannot lock out a user with a second factor: their password
/// with a fresh code logs in past it. Past it, every other attempt is the
/// limit's refusal, which says nothing of which part was wrong. A user
/// without a second factor is let in again by `wicketd users unlock`.
#[test]
fn failed_logins_in_a_users_name_do_not_lock_out_their_second_factor() {
    let d = Wicketd::builder().start().unwrap();
    let uri = d
        .add_user("tina", "access", PASSWORD, true)
        .unwrap()
        .expect("provisioning URI");
    d.add_user("bob", "access", PASSWORD, false).unwrap();
    let cli = WicketCli::new().unwrap();
    for user in ["tina", "bob"] {
        for _ in 0..5 {
            assert!(!cli.login(&d, user, "wrong password!", &[]).unwrap().ok);
        }
    }
    let limited = |r: CliOutput| {
        assert!(
            !r.ok && r.stderr.contains("too many failed attempts"),
            "{}",
            r.stderr
        );
    };
    let code = totp_code(&uri, 0).unwrap();
    let wrong_code = totp_code(&uri, 3600).unwrap();
    limited(cli.login(&d, "tina", PASSWORD, &[]).unwrap());
    limited(
        cli.login(&d, "tina", PASSWORD, &["--otp", &wrong_code])
            .unwrap(),
    );
    limited(
        cli.login(&d, "tina", "wrong password!", &["--otp", &code])
            .unwrap(),
    );
    let ok = cli.login(&d, "tina", PASSWORD, &["--otp", &code]).unwrap();
    assert!(ok.ok, "{}", ok.stderr);
    // A code does not let in a user who has no second factor.
    limited(cli.login(&d, "bob", PASSWORD, &["--otp", &code]).unwrap());
    limited(cli.login(&d, "bob", PASSWORD, &[]).unwrap());
    let unlock = run(&mut d.admin(&["users", "unlock", "bob"]).unwrap()).unwrap();
    // Its five, and the code it sent past the limit.
    assert!(unlock.contains("unlocked (6 failed login(s)"), "{unlock}");
    let ok = cli.login(&d, "bob", PASSWORD, &[]).unwrap();
    assert!(ok.ok, "{}", ok.stderr);
    let nobody = d
        .admin(&["users", "unlock", "nobody"])
        .unwrap()
        .output()
        .unwrap();
    assert!(!nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no user \"nobody\""));
    // The record says what each refusal past the limit was.
    d.add_user("carol", "admin", PASSWORD, false).unwrap();
    let auditor = WicketCli::new().unwrap();
    login_ok(&auditor, &d, "carol");
    let past: Vec<(String, String)> = auditor
        .audit(&["--kind", "login_failed"])
        .unwrap()
        .iter()
        .filter_map(|e| {
            let reason = e["data"]["reason"].as_str()?;
            reason
                .contains("past the user's failure limit")
                .then(|| (e["actor"].as_str().unwrap().to_owned(), reason.to_owned()))
        })
        .collect();
    let mut said: Vec<(&str, &str)> = past
        .iter()
        .map(|(u, r)| (u.as_str(), r.split(" (").next().unwrap()))
        .collect();
    said.sort_unstable();
    assert_eq!(
        said,
        [
            ("bob", "no second factor"),
            ("tina", "wrong OTP code"),
            ("tina", "wrong password")
        ],
        "{past:?}"
    );
    let unlocked = auditor.audit(&["--kind", "user_unlocked"]).unwrap();
    assert_eq!(unlocked.len(), 1, "{unlocked:?}");
    assert_eq!(unlocked[0]["data"]["cleared"], 6);
}

/// Past the user's limit, codes have a budget of their own (as many as
/// the user's limit) that only the right password spends: someone without
/// it cannot lock the user out, and someone with it gets no more code
/// guesses from many sources than before.
#[test]
fn code_guesses_past_the_limit_have_a_budget_only_the_password_spends() {
    let d = Wicketd::builder()
        .config("version: 1\nauth: { max_failures_per_source: 100 }\nroles:\n  access: {}\n")
        .start()
        .unwrap();
    let uri = d
        .add_user("uma", "access", PASSWORD, true)
        .unwrap()
        .expect("provisioning URI");
    let cli = WicketCli::new().unwrap();
    let limited = |r: CliOutput| {
        assert!(
            !r.ok && r.stderr.contains("too many failed attempts"),
            "{}",
            r.stderr
        );
    };
    let lock = || {
        for _ in 0..5 {
            assert!(!cli.login(&d, "uma", "wrong password!", &[]).unwrap().ok);
        }
    };
    let wrong_code = totp_code(&uri, 3600).unwrap();
    lock();
    // Wrong passwords with codes do not spend it...
    for _ in 0..6 {
        limited(
            cli.login(&d, "uma", "wrong password!", &["--otp", &wrong_code])
                .unwrap(),
        );
    }
    // ...wrong codes with the right password do (four of five here).
    for _ in 0..4 {
        limited(
            cli.login(&d, "uma", PASSWORD, &["--otp", &wrong_code])
                .unwrap(),
        );
    }
    let code = totp_code(&uri, 0).unwrap();
    let ok = cli.login(&d, "uma", PASSWORD, &["--otp", &code]).unwrap();
    assert!(ok.ok, "{}", ok.stderr);
    // Locked again, the fifth spends the rest: the right code is refused.
    lock();
    limited(
        cli.login(&d, "uma", PASSWORD, &["--otp", &wrong_code])
            .unwrap(),
    );
    let next = totp_code(&uri, 30).unwrap();
    limited(cli.login(&d, "uma", PASSWORD, &["--otp", &next]).unwrap());
}

#[test]
fn totp_is_required_checked_and_single_use() {
    let d = Wicketd::builder().start().unwrap();
    let uri = d
        .add_user("dave", "access", PASSWORD, true)
        .unwrap()
        .expect("provisioning URI");
    assert!(
        uri.starts_with("otpauth://totp/wicket:dave?secret="),
        "{uri}"
    );
    let code = totp_code(&uri, 0).unwrap();
    let cli = WicketCli::new().unwrap();
    // Without a code: refused, with a hint, and the same answer whether the
    // password was right or not (no password oracle).
    let missing = cli.login(&d, "dave", PASSWORD, &[]).unwrap();
    assert!(
        !missing.ok && missing.stderr.contains("also needs --otp CODE"),
        "{}",
        missing.stderr
    );
    let missing_wrong = cli.login(&d, "dave", "wrong password!", &[]).unwrap();
    assert_eq!(missing_wrong.stderr, missing.stderr);
    // A wrong code with the right password reads as a right code with a
    // wrong password.
    let wrong_code = if code == "000000" { "111111" } else { "000000" };
    let wrong = cli
        .login(&d, "dave", PASSWORD, &["--otp", wrong_code])
        .unwrap();
    assert!(
        !wrong.ok
            && wrong
                .stderr
                .contains("invalid user name, password or OTP code"),
        "{}",
        wrong.stderr
    );
    let wrong_password = cli
        .login(&d, "dave", "wrong password!", &["--otp", &code])
        .unwrap();
    assert_eq!(wrong_password.stderr, wrong.stderr);
    let ok = cli.login(&d, "dave", PASSWORD, &["--otp", &code]).unwrap();
    assert!(ok.ok, "{}", ok.stderr);
    let replay = cli.login(&d, "dave", PASSWORD, &["--otp", &code]).unwrap();
    assert_eq!(replay.stderr, wrong.stderr);
    // The audit says what was wrong each time.
    d.add_user("carol", "admin", PASSWORD, false).unwrap();
    let auditor = WicketCli::new().unwrap();
    login_ok(&auditor, &d, "carol");
    let reasons: Vec<String> = auditor
        .audit(&["--kind", "login_failed"])
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "dave")
        .map(|e| e["data"]["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    for r in [
        "OTP code required",
        "wrong password",
        "wrong OTP code",
        "OTP code already used",
    ] {
        assert!(reasons.iter().any(|x| x == r), "{r} in {reasons:?}");
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let d = Wicketd::builder().start().unwrap();
    d.add_user("erin", "access", PASSWORD, false).unwrap();
    let pin_dir = tempfile::tempdir().unwrap();
    let cli = WicketCli::new().unwrap();
    login_ok(&cli, &d, "erin");
    let ca = PathBuf::from(
        cli.status().unwrap()["files"]["ca_bundle"]
            .as_str()
            .unwrap(),
    );
    let post = |body: &[u8], ctype: &str| -> (String, String) {
        let body_path = pin_dir.path().join("body");
        std::fs::write(&body_path, body).unwrap();
        let out = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Content-Type: {ctype}"))
            .arg("--cacert")
            .arg(&ca)
            .arg("--data-binary")
            .arg(format!("@{}", body_path.display()))
            .arg(format!("https://{}/v1/login", d.proxy()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (body.to_owned(), code.to_owned())
    };
    let (b, c) = post(b"{not json", "application/json");
    assert_eq!(c, "400", "{b}");
    assert!(b.contains("\"code\":\"bad_request\""), "{b}");
    let (b, c) = post(&vec![b'x'; 200_000], "application/json");
    assert_eq!(c, "413", "{b}");
    let (b, c) = post(br#"{"user":"erin","password":"x","ssh_public_key":"ssh-ed25519 AAAA","tls_csr_pem":"nope"}"#, "application/json");
    assert_eq!(c, "400", "{b}");
    assert!(b.contains("ssh_public_key"), "{b}");
    let (b, c) = post(
        br#"{"user":"erin","password":"x","ssh_public_key":"k","tls_csr_pem":"c","is_admin":true}"#,
        "application/json",
    );
    assert_eq!(c, "400", "{b}");
    assert!(b.contains("is_admin"), "{b}");
    let (_, c) = post(b"{}", "text/plain");
    assert_eq!(c, "400");
    // None of that created anything or counted as a login attempt.
    let users = run(&mut d.admin(&["users", "ls", "--format", "json"]).unwrap()).unwrap();
    let users: serde_json::Value = serde_json::from_str(&users).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 1);
    // Adding a user with an unknown role or a duplicate name fails cleanly.
    let e = d
        .add_user("frank", "no-such-role", PASSWORD, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown role"), "{e}");
    let e = d
        .add_user("erin", "access", PASSWORD, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    // The daemon's own name in the audit log is no user's.
    let e = d
        .add_user("wicketd", "access", PASSWORD, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the daemon's own in the audit log"), "{e}");
    // A pin that does not match refuses to talk to the proxy.
    let other = WicketCli::new().unwrap();
    let bad_pin = format!("sha256:{}", "0".repeat(64));
    let proxy = d.proxy();
    let out = other
        .run(
            &[
                "login",
                "--proxy",
                &proxy,
                "--user",
                "erin",
                "--ca-pin",
                &bad_pin,
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        )
        .unwrap();
    assert!(
        !out.ok && out.stderr.contains("does not match --ca-pin"),
        "{}",
        out.stderr
    );
}

#[test]
fn example_config_starts_and_several_users_log_in_side_by_side() {
    let example = std::fs::read_to_string(repo_file("deploy/wicket.yaml")).unwrap();
    let d = Wicketd::builder().config(example).start().unwrap();
    d.add_user("alice", "dev", PASSWORD, false).unwrap();
    d.add_user("bob", "sre", PASSWORD, false).unwrap();
    let (a, b) = (WicketCli::new().unwrap(), WicketCli::new().unwrap());
    login_ok(&a, &d, "alice");
    login_ok(&b, &d, "bob");
    assert_eq!(a.status().unwrap()["user"], "alice");
    assert_eq!(b.status().unwrap()["user"], "bob");
    // alice (dev) reaches dev-1 as herself; nothing in prod.
    assert_eq!(a.node_names().unwrap(), ["dev-1"]);
    let ls = a.ok(&["ls", "--format", "json"]).unwrap().json().unwrap();
    assert_eq!(ls["nodes"][0]["logins"], serde_json::json!(["alice"]));
    assert!(ls["databases"].as_array().unwrap().is_empty());
    let text = a.ok(&["ls"]).unwrap().stdout;
    assert!(text.contains("dev-1") && !text.contains("db-1"), "{text}");
    // A second login with the saved CA needs no pin.
    let proxy = d.proxy();
    let again = a
        .run(
            &[
                "login",
                "--proxy",
                &proxy,
                "--user",
                "alice",
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        )
        .unwrap();
    assert!(again.ok, "{}", again.stderr);
}

#[test]
fn password_from_environment_insecure_first_contact_and_per_source_limit() {
    let d = Wicketd::builder().start().unwrap();
    d.add_user("gina", "access", PASSWORD, false).unwrap();
    let cli = WicketCli::new().unwrap();
    let proxy = d.proxy();
    // WICKET_PASSWORD and --insecure (no pin): works, warns, and saves the CA.
    let mut cmd = cli.cmd().unwrap();
    let out = cmd
        .args(["login", "--proxy", &proxy, "--user", "gina", "--insecure"])
        .env("WICKET_PASSWORD", PASSWORD)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: --insecure"));
    assert_eq!(cli.status().unwrap()["user"], "gina");
    // Without a terminal or a password source the CLI says so.
    let out = cli
        .cmd()
        .unwrap()
        .args(["login", "--proxy", &proxy, "--user", "gina"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin or WICKET_PASSWORD"));
    // 20 failures from one source (different users) lock that source out,
    // even for a correct password.
    for i in 0..20 {
        let r = cli
            .login(&d, &format!("nobody{i}"), "wrong password!", &[])
            .unwrap();
        assert!(!r.ok);
    }
    let r = cli.login(&d, "gina", PASSWORD, &[]).unwrap();
    assert!(
        !r.ok && r.stderr.contains("too many failed attempts"),
        "{}",
        r.stderr
    );
}

/// On a real terminal, `wicket login` prompts for the password without
/// echo. Ctrl-C there ends it as interrupted (130) and gives the terminal
/// back as it was (echo and signals on); a password typed there logs in.
#[test]
fn ctrl_c_at_the_password_prompt_gives_the_terminal_back() {
    let d = Wicketd::builder().start().unwrap();
    d.add_user("hana", "access", PASSWORD, false).unwrap();
    let cli = WicketCli::new().unwrap();
    let login = format!(
        "'{}' login --proxy {} --user hana --insecure",
        wicket_e2e::harness_wicket::bin_dir()
            .unwrap()
            .join("wicket")
            .display(),
        d.proxy()
    );
    let mut t = crate::ssh::Pty::run(
        &format!(
            "{login}; echo rc=$?; stty -a; echo stty-done; {login} && echo logged-in-$((1+1))"
        ),
        &[("WICKET_HOME", cli.home.path())],
    );
    let wait = Duration::from_secs(20);
    t.expect("Password:", wait);
    t.send("\x03");
    t.expect("stty-done", wait);
    let said = t.text();
    let after = &said[said.find("rc=130").unwrap()..said.find("stty-done").unwrap()];
    let flags: Vec<&str> = after.split([' ', ';', '\r', '\n']).collect();
    for on in ["echo", "icanon", "isig"] {
        assert!(flags.contains(&on), "{on} is off after Ctrl-C: {after}");
    }
    assert!(said.contains("wicket: interrupted\r\nrc=130"), "{said}");
    // The second prompt (the first is still on the terminal): only once
    // it shows is echo off.
    wait_until("the second prompt", wait, || {
        (t.times_seen("Password:") == 2).then_some(())
    })
    .unwrap();
    t.send(&format!("{PASSWORD}\r"));
    t.expect("logged-in-2", wait);
    assert!(!t.text().contains(PASSWORD), "the password was echoed");
    assert_eq!(cli.status().unwrap()["user"], "hana");

    // Ctrl-C still ends a login that waits on the proxy after the prompt
    // (here one that never answers): the prompt caught no signal.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = login.replace(&d.proxy(), &silent.local_addr().unwrap().to_string());
    let mut t = crate::ssh::Pty::run(&hung, &[("WICKET_HOME", cli.home.path())]);
    t.expect("Password:", wait);
    t.send(&format!("{PASSWORD}\r"));
    silent.set_nonblocking(true).unwrap();
    let _held = wait_until("the login to connect", wait, || silent.accept().ok()).unwrap();
    t.send("\x03");
    wait_until("the login to exit", wait, || t.exited().then_some(())).unwrap();
}

/// SIGTERM at the password prompt (a `kill`, a `timeout`) also gives the
/// terminal back: the prompt restores it, then the signal ends `wicket` as
/// it would have (143). Once the prompt is over, SIGTERM ends a login at
/// once, as before. A SIGTERM the login inherited as ignored stays ignored.
#[test]
fn sigterm_at_the_password_prompt_gives_the_terminal_back() {
    let d = Wicketd::builder().start().unwrap();
    let cli = WicketCli::new().unwrap();
    let wicket = wicket_e2e::harness_wicket::bin_dir()
        .unwrap()
        .join("wicket");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let login = |proxy: &str| {
        format!(
            "'{}' login --proxy {proxy} --user hana --insecure < /dev/tty & echo pid=$!.; wait $!; echo rc=$?",
            wicket.display()
        )
    };
    // The first login is stopped at its prompt; the second, at a proxy
    // that never answers once its password is typed; the third ignores
    // SIGTERM, and is ended by Ctrl-C.
    let mut t = crate::ssh::Pty::run(
        &format!(
            "{}; stty -a; echo stty-done; {}; echo second-done; (trap '' TERM; {}); echo third-done",
            login(&d.proxy()),
            login(&silent.local_addr().unwrap().to_string()),
            login(&d.proxy()),
        ),
        &[("WICKET_HOME", cli.home.path())],
    );
    let wait = Duration::from_secs(20);
    let pid = |t: &crate::ssh::Pty, nth: usize| -> String {
        let said = t.text();
        let at = said.match_indices("pid=").nth(nth).unwrap().0 + 4;
        said[at..].split('.').next().unwrap().to_owned()
    };
    let kill = |pid: &str| {
        let out = std::process::Command::new("kill")
            .args(["-TERM", pid])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    t.expect("Password:", wait);
    kill(&pid(&t, 0));
    t.expect("stty-done", wait);
    let said = t.text();
    let after = &said[said.find("rc=").unwrap()..said.find("stty-done").unwrap()];
    assert!(after.starts_with("rc=143"), "{said}");
    let flags: Vec<&str> = after.split([' ', ';', '\r', '\n']).collect();
    for on in ["echo", "icanon", "isig"] {
        assert!(flags.contains(&on), "{on} is off after SIGTERM: {after}");
    }

    wait_until("the second prompt", wait, || {
        (t.times_seen("Password:") == 2).then_some(())
    })
    .unwrap();
    t.send(&format!("{PASSWORD}\r"));
    silent.set_nonblocking(true).unwrap();
    let _held = wait_until("the login to connect", wait, || silent.accept().ok()).unwrap();
    kill(&pid(&t, 1));
    t.expect("second-done", wait);
    let said = t.text();
    assert!(said.contains("rc=143\r\nsecond-done"), "{said}");

    wait_until("the third prompt", wait, || {
        (t.times_seen("Password:") == 3).then_some(())
    })
    .unwrap();
    kill(&pid(&t, 2));
    t.send("\x03");
    t.expect("third-done", wait);
    let said = t.text();
    assert!(said.contains("rc=130\r\nthird-done"), "{said}");
}

/// An admin command never makes a CA key set (a second one would split the
/// cluster, and the audit chain's key comes from it): on a data directory
/// no wicketd has started in, it refuses, saying what to do, and makes
/// nothing.
#[test]
fn admin_commands_use_the_ca_key_set_a_wicketd_made() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = wicketd_cmd()
        .unwrap()
        .args(["users", "ls", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("no CA key set")
            && stderr.contains("start wicketd once"),
        "{stderr}"
    );
    assert!(!data.join("ca").join("ssh_user_ca.key").exists());
    assert!(!data.join("wicket.db").exists());
}

/// Wicket's TLS CA also signs databases' server certificates, perhaps for
/// the very name wicketd is reached at. Such a certificate does not pass for
/// wicketd's: a server holding one (here `openssl s_server`, with a
/// database certificate for 127.0.0.1) gets no password, whether the CLI
/// trusts the CA by pin or by its saved bundle.
#[test]
fn a_database_certificate_does_not_pass_for_wicketd() {
    use std::io::{BufRead, BufReader};
    let d = Wicketd::builder().start().unwrap();
    d.add_user("alice", "access", "correct horse battery", false)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(wicketd_cmd()
        .unwrap()
        .args(["databases", "server-cert", "--data-dir"])
        .arg(d.data_dir())
        .args(["--database", "prod-pg", "--name", "127.0.0.1", "--out"])
        .arg(dir.path()))
    .unwrap();
    let bundle = std::fs::read_to_string(dir.path().join("server.crt")).unwrap();
    let [leaf, ca] =
        <[Vec<u8>; 2]>::try_from(wicket_ca::pem_decode_all("CERTIFICATE", &bundle).unwrap())
            .unwrap();
    for (name, der) in [("leaf.crt", leaf), ("ca.crt", ca)] {
        std::fs::write(
            dir.path().join(name),
            wicket_ca::pem_encode("CERTIFICATE", &der),
        )
        .unwrap();
    }

    // Port 0: the server picks a free port and names it on its first line.
    let mut impostor = Command::new("openssl")
        .args(["s_server", "-accept", "127.0.0.1:0"])
        .arg("-cert")
        .arg(dir.path().join("leaf.crt"))
        .arg("-key")
        .arg(dir.path().join("server.key"))
        .arg("-cert_chain")
        .arg(dir.path().join("ca.crt"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(impostor.stdout.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        // The line comes once the server listens; EOF if it exits.
        assert_ne!(said.read_line(&mut line).unwrap(), 0, "s_server exited");
        if let Some(a) = line.trim().strip_prefix("ACCEPT 127.0.0.1:") {
            break a.parse::<u16>().unwrap();
        }
    };
    let addr = format!("127.0.0.1:{port}");

    let cli = WicketCli::new().unwrap();
    // A login to the impostor, trusting it by `trust`.
    let login_there = |trust: &[&str]| {
        let mut args = vec!["login", "--proxy", &addr, "--user", "alice"];
        args.extend(trust);
        args.push("--password-stdin");
        cli.run(&args, "correct horse battery\n").unwrap()
    };
    let refused = |out: &wicket_e2e::harness_wicket::CliOutput, why: &str| {
        assert!(!out.ok, "{}", out.stdout);
        assert!(out.stderr.contains(why), "{}", out.stderr);
    };
    refused(&login_there(&["--ca-pin", &d.pin]), "not wicketd's own");
    // With the CA bundle saved by a login to the real wicketd: the same
    // profile, pointed at the impostor, sends it nothing.
    assert!(
        cli.login(&d, "alice", "correct horse battery", &[])
            .unwrap()
            .ok
    );
    let home = cli.home.path();
    let current = std::fs::read_to_string(home.join("current")).unwrap();
    let (real, user) = current.trim().split_once('/').unwrap();
    let real_port = d.proxy().rsplit(':').next().unwrap().to_owned();
    let fake = real.replace(&real_port, &port.to_string());
    assert_ne!(fake, real);
    let (from, to) = (
        home.join("profiles").join(real),
        home.join("profiles").join(&fake),
    );
    std::fs::create_dir_all(to.join(user)).unwrap();
    for f in std::fs::read_dir(from.join(user)).unwrap() {
        let f = f.unwrap();
        let bytes = std::fs::read(f.path()).unwrap();
        let bytes = String::from_utf8(bytes)
            .map(|t| t.replace(&d.proxy(), &addr).into_bytes())
            .unwrap_or_else(|e| e.into_bytes());
        std::fs::write(to.join(user).join(f.file_name()), bytes).unwrap();
    }
    std::fs::write(home.join("current"), format!("{fake}/{user}\n")).unwrap();
    refused(
        &cli.run(&["request", "ls"], "").unwrap(),
        "not wicketd's own",
    );
    // Nor does a new login there with --insecure: with a CA saved for it,
    // that CA is checked (--insecure is for a first contact).
    let insecure = login_there(&["--insecure"]);
    refused(&insecure, "not wicketd's own");
    refused(&insecure, "saved at your last login");
    let _ = impostor.kill();
    let mut heard = String::new();
    std::io::Read::read_to_string(&mut said, &mut heard).unwrap();
    let _ = impostor.wait();
    assert!(
        !heard.contains("correct horse"),
        "the impostor heard: {heard}"
    );
}
