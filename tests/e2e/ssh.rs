//! The SSH proxy end to end with real OpenSSH: a stock `sshd` node that
//! trusts Wicket's node-login CA, `wicketd` in front of it, and the real `ssh`,
//! `scp` and `sftp` clients going through `wicket config`'s ssh_config and
//! through `wicket ssh`.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use wicket_e2e::harness_postgres::Postgres;
use wicket_e2e::harness_sshd::{test_login, PortInUse, Sshd};
use wicket_e2e::harness_util::{closed_between, free_port, read_uninterrupted, run, wait_until};
use wicket_e2e::harness_wicket::{pipe_stdin, WicketCli, Wicketd};

const PW: &str = "correct horse battery staple";

/// Roles: `access` logs in as yourself nowhere useful; `node-admin` (self-
/// approved, port forwarding) grants LOGIN on `env: test` nodes; `direct`
/// grants LOGIN as a standing role; `auditor` revokes and reads recordings.
fn config(node_port: u16, login: &str, session: &str, top_extra: &str, node_extra: &str) -> String {
    format!(
        r#"
version: 1
{top_extra}
listen: {{ ssh: "127.0.0.1:0" }}
session: {{ {session} }}
requests: {{ min_duration: 1s }}
roles:
  access:
    logins: [ "{{{{user}}}}" ]
    nodes: {{ env: nowhere }}
    request: {{ roles: [ node-admin, no-forward, agent-ok, x11-ok ] }}
  node-admin:
    logins: [ {login} ]
    nodes: {{ env: test }}
    port_forwarding: true
    max_duration: 1h
  no-forward:
    logins: [ {login} ]
    nodes: {{ env: test }}
    port_forwarding: false
  direct:
    logins: [ {login} ]
    nodes: {{ env: test }}
  agent-ok:
    logins: [ {login} ]
    nodes: {{ env: test }}
    agent_forwarding: true
  x11-ok:
    logins: [ {login} ]
    nodes: {{ env: test }}
    x11_forwarding: true
  auditor:
    review: {{ roles: [ "*" ] }}
    revoke: true
    audit: true
approval:
  - roles: [ node-admin, no-forward, agent-ok, x11-ok ]
    require: self
resources:
  nodes:
    - {{ name: node-1, address: "127.0.0.1:{node_port}", labels: {{ env: test }}{node_extra} }}
"#
    )
}

pub struct Lab {
    pub d: Wicketd,
    pub node: Sshd,
    pub ssh_addr: SocketAddr,
    pub login: String,
}

impl Lab {
    pub fn start() -> Lab {
        Self::start_with("")
    }

    /// With extra `session:` settings, e.g. `", record_input: true"`.
    pub fn start_with(session_extra: &str) -> Lab {
        Self::start_full(session_extra, "")
    }

    /// With extra `session:` settings and extra top-level lines (`storage:`).
    pub fn start_full(session_extra: &str, top_extra: &str) -> Lab {
        Self::start_node(session_extra, top_extra, "")
    }

    /// With extra settings for the node too (`, host_key: ...`).
    /// The node's port is in wicketd's config before the node listens on
    /// it: when another server takes it in between, both start again on
    /// another port.
    pub fn start_node(session_extra: &str, top_extra: &str, node_extra: &str) -> Lab {
        Self::start_session(
            &format!("expiry_warning: 2s{session_extra}"),
            top_extra,
            node_extra,
        )
    }

    /// With these `session:` settings (no warning 2 s before expiry).
    pub fn start_session(session: &str, top_extra: &str, node_extra: &str) -> Lab {
        Self::start_yaml(|port, login| config(port, login, session, top_extra, node_extra))
    }

    /// With the configuration `yaml(node port, login)` makes.
    pub fn start_yaml(yaml: impl Fn(u16, &str) -> String) -> Lab {
        let login = test_login();
        let mut attempts = 0;
        loop {
            let port = free_port().unwrap();
            let d = Wicketd::builder()
                .config(yaml(port, &login))
                .start()
                .unwrap();
            let ssh_addr = d
                .startup_output()
                .iter()
                .find_map(|l| l.strip_prefix("SSH listening on "))
                .expect("wicketd prints its SSH address")
                .trim()
                .parse()
                .unwrap();
            match Sshd::builder().port(port).node("node-1").start(&d) {
                Ok(node) => {
                    return Lab {
                        d,
                        node,
                        ssh_addr,
                        login,
                    }
                }
                Err(e) if e.is::<PortInUse>() && attempts < 3 => {
                    eprintln!("{e}; starting again on another port");
                    attempts += 1;
                }
                Err(e) => panic!("{e:#}"),
            }
        }
    }

    /// A user with these standing roles, logged in.
    pub fn user(&self, name: &str, roles: &str) -> WicketCli {
        self.d.add_user(name, roles, PW, false).unwrap();
        WicketCli::logged_in(&self.d, name, PW).unwrap()
    }

    /// A self-approved `role` grant for `cli`, logged in with it; its ID.
    pub fn grant(&self, cli: &WicketCli, role: &str, duration: &str) -> String {
        let g = cli
            .ok(&[
                "request",
                "create",
                "--roles",
                role,
                "--reason",
                "INC-7: node work",
                "--duration",
                duration,
                "--format",
                "json",
            ])
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(g["status"], "active", "{g}");
        let id = g["id"].as_str().unwrap().to_owned();
        cli.ok(&["login", "--request-id", &id]).unwrap();
        id
    }

    pub fn dest(&self) -> String {
        format!("{}@node-1.wicket", self.login)
    }
}

/// `wicket recordings ls --request ID` as `cli` sees it, once it lists one
/// (a recording is listed when its session has ended).
fn recordings_of(cli: &WicketCli, id: &str) -> Value {
    wait_until("the recording", Duration::from_secs(20), || {
        let v = cli
            .ok(&["recordings", "ls", "--request", id, "--format", "json"])
            .ok()?
            .json()
            .ok()?;
        (!v.as_array()?.is_empty()).then_some(v)
    })
    .unwrap()
}

/// Waits until `margin_ms` after the grant of request `id` ended.
fn past_expiry(cli: &WicketCli, id: &str, margin_ms: i64) {
    let expires = expires_at(cli, id);
    wait_until("the grant to expire", Duration::from_secs(20), || {
        (chrono::Utc::now() > expires + chrono::Duration::milliseconds(margin_ms)).then_some(())
    })
    .unwrap();
}

/// A shell loop that waits for `path` to exist (bounded: a failed run
/// leaves nothing waiting on the node).
fn wait_for_file(path: &Path) -> String {
    format!(
        "t=0; while [ ! -e {} ] && [ $t -lt 600 ]; do sleep 0.1; t=$((t+1)); done",
        path.display()
    )
}

/// When the grant of request `id` ends, as `wicket request show` says.
fn expires_at(cli: &WicketCli, id: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let g = cli
        .ok(&["request", "show", id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    chrono::DateTime::parse_from_rfc3339(g["expires_at"].as_str().unwrap()).unwrap()
}

/// `wicket config` written to a file in the user's home.
/// alice (standing role `access`), logged in with a ten-minute grant of
/// `node-admin`: her client, the grant's request ID and her ssh config.
fn alice_as_node_admin(lab: &Lab) -> (WicketCli, String, PathBuf) {
    let alice = lab.user("alice", "access");
    let id = lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    (alice, id, cfg)
}

pub fn ssh_config(cli: &WicketCli) -> PathBuf {
    let text = cli.ok(&["config"]).unwrap().stdout;
    assert!(text.contains("Host *.wicket"), "{text}");
    assert!(text.contains("proxy ssh"), "{text}");
    let p = cli.home.path().join("ssh_config_test");
    std::fs::write(&p, text).unwrap();
    p
}

/// `ssh -F cfg <args>` (batch mode: never prompts).
/// `ssh` on the control socket `ctl`: its master, or a client of it.
fn mux_ssh(cfg: &Path, ctl: &Path, master: bool) -> Command {
    let mut c = ssh(cfg);
    c.args(["-o", &format!("ControlPath={}", ctl.display())])
        .args([
            "-o",
            if master {
                "ControlMaster=yes"
            } else {
                "ControlMaster=no"
            },
        ]);
    c
}

/// Waits for a master's control socket at `ctl`.
fn wait_for_control_socket(ctl: &Path) {
    wait_until("the control socket", Duration::from_secs(20), || {
        ctl.exists().then_some(())
    })
    .unwrap();
}

/// A multiplexed connection kept open by its master, whose command runs
/// until [`KeptConnection::finish`]; commands run as clients of it.
struct KeptConnection {
    master: std::process::Child,
    ctl: PathBuf,
    stop: PathBuf,
    cfg: PathBuf,
    dest: String,
    _dir: tempfile::TempDir,
}

impl KeptConnection {
    /// Opens it, and checks that a new channel works on it (`while`: what
    /// holds now, for the message).
    fn open(lab: &Lab, cfg: &Path, while_: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, stop) = (dir.path().join("cm"), dir.path().join("stop"));
        let master = mux_ssh(cfg, &ctl, true)
            .arg(lab.dest())
            .arg(format!("{}; echo finished", wait_for_file(&stop)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_control_socket(&ctl);
        let kept = Self {
            master,
            ctl,
            stop,
            cfg: cfg.to_owned(),
            dest: lab.dest(),
            _dir: dir,
        };
        let out = output(kept.client().arg(&kept.dest).arg("echo before"));
        assert!(
            out.status.success() && text(&out.stdout).trim() == "before",
            "a new channel works while {while_}: {}",
            text(&out.stderr)
        );
        kept
    }

    /// `ssh` as a client of the master (add the destination).
    fn client(&self) -> Command {
        mux_ssh(&self.cfg, &self.ctl, false)
    }

    /// Runs `echo after` on it, which must be refused, with no new
    /// sessions on the connection and each of `why` said; stderr.
    fn refused_after(&self, why: &[&str]) -> String {
        let out = output(self.client().arg(&self.dest).arg("echo after"));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "refused: {err}");
        assert!(
            !text(&out.stdout).contains("after"),
            "nothing ran on the node"
        );
        assert!(err.contains("no new sessions on this connection"), "{err}");
        for w in why {
            assert!(err.contains(w), "{w:?} in {err}");
        }
        err
    }

    /// Lets the master's command end, and waits for the master (within
    /// 30 s: a channel left open would keep it waiting).
    fn finish(mut self) -> Output {
        std::fs::write(&self.stop, b"").unwrap();
        let ended = wait_until("the master to end", Duration::from_secs(30), || {
            self.master.try_wait().unwrap()
        });
        if ended.is_err() {
            let _ = self.master.kill();
        }
        let out = self.master.wait_with_output().unwrap();
        ended.unwrap();
        out
    }
}

pub fn ssh(cfg: &Path) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(cfg)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]);
    c
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Asserts that an `ssh` run failed with `why` on stderr, and that its
/// stdout has nothing of `ran` (what the command would have printed; ""
/// for none).
fn failed_with(out: &Output, why: &str, ran: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let said = text(&out.stdout);
    assert!(ran.is_empty() || !said.contains(ran), "{said}");
    assert!(err.contains(why), "{err}");
}

/// Asserts that alice's `access_denied` events, as `auditor` reads them,
/// hold each of `actions` with a reason naming `why`.
fn refusals_audited(auditor: &WicketCli, actions: &[&str], why: &str) {
    let denied = auditor
        .audit(&["--user", "alice", "--kind", "access_denied"])
        .unwrap();
    for action in actions {
        assert!(
            denied.iter().any(|e| e["data"]["action"] == *action
                && e["data"]["reason"].as_str().unwrap().contains(why)),
            "{action}: {denied:?}"
        );
    }
}

/// `ssh` straight to `port` on 127.0.0.1 (no `wicket proxy ssh`, no route
/// line) with `cli`'s key and certificate, checking the host key against
/// `known_hosts` (`None`: not checked). The destination and command are
/// added by the caller.
fn straight_to(port: u16, cli: &WicketCli, known_hosts: Option<&Path>) -> Command {
    let st = cli.status().unwrap();
    let f = |k: &str| PathBuf::from(st["files"][k].as_str().unwrap());
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .arg("-i")
    .arg(f("ssh_key"))
    .arg("-o")
    .arg(format!(
        "CertificateFile={}",
        f("ssh_certificate").display()
    ));
    match known_hosts {
        Some(k) => cmd
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", k.display()))
            .args(["-o", "StrictHostKeyChecking=yes"]),
        None => cmd.args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ]),
    };
    cmd.args(["-p", &port.to_string()]);
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Users trust only the proxy's host CA, not the nodes': whoever holds a
/// node's host key (its admins, or someone who took the node) cannot pass
/// for the proxy to users, though the node's certificate names it by the
/// name users reach it at (`node-1.wicket`). Here the node's own sshd
/// answers, as a man in the middle would: the user's `ssh` refuses it
/// before it authenticates (and so before it would forward an agent).
#[test]
fn a_nodes_host_certificate_does_not_pass_for_the_proxy() {
    let lab = Lab::start();
    let alice = lab.user("alice", "direct");
    let cfg = ssh_config(&alice);
    // Straight to the node's port, checked as `ssh` checks the proxy's
    // answer through `wicket proxy ssh`: by the name, not the address.
    let out = output(
        ssh(&cfg)
            .args(["-o", "ProxyCommand=none", "-o", "HostName=127.0.0.1"])
            .args(["-o", "HostKeyAlias=node-1.wicket"])
            .args(["-p", &lab.node.port().to_string()])
            .arg(lab.dest())
            .arg("echo via-node-ok"),
    );
    failed_with(&out, "Host key verification failed", "via-node-ok");
    assert!(
        !text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    // Through the proxy, with the proxy's certificate, alice gets in.
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo via-proxy-ok"));
    assert!(
        text(&out.stdout).contains("via-proxy-ok"),
        "{}",
        text(&out.stderr)
    );
}

/// Nodes trust only the node-login CA, which signs nothing but the proxy's
/// one-minute upstream certificates: a user's own certificate (standing
/// role with the login) does not open the node directly, so policy,
/// recording and revoke cannot be bypassed by reaching port 22.
#[test]
fn users_own_certificates_do_not_open_nodes_directly() {
    let lab = Lab::start();
    let alice = lab.user("alice", "direct");
    // The node is known by its host CA (which users do not trust: below),
    // so what is refused is the login.
    let node_hosts = alice.home.path().join("node_known_hosts");
    let node_ca = std::fs::read_to_string(lab.d.data_dir().join("ca/ssh_host_ca.pub")).unwrap();
    std::fs::write(&node_hosts, format!("@cert-authority * {node_ca}")).unwrap();
    let out = output(
        straight_to(lab.node.port(), &alice, Some(&node_hosts))
            .args(["-o", "HostKeyAlias=node-1"])
            .arg(format!("{}@127.0.0.1", lab.login))
            .arg("echo direct-ok"),
    );
    assert!(
        !out.status.success(),
        "a user's certificate must not open the node: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("direct-ok"));
    // Through the proxy the same user gets in (with the proxy's certificate).
    let cfg = ssh_config(&alice);
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo via-proxy-ok"));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        lab.node.log()
    );
    assert_eq!(text(&out.stdout).trim(), "via-proxy-ok");
    assert!(
        lab.node.log().contains("user=alice session="),
        "{}",
        lab.node.log()
    );
}

#[test]
fn commands_through_the_proxy_match_direct_and_the_node_log_names_the_request() {
    let lab = Lab::start();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    // Output, stderr and exit status come through unchanged.
    let out = output(
        ssh(&cfg)
            .args(["-o", "SendEnv=LANG"])
            .arg(lab.dest())
            .arg("echo out-$LANG; echo err >&2; exit 3")
            .env("LANG", "C.UTF-8"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out-C.UTF-8\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    // The node's own log names user, session and request.
    let log = lab.node.log();
    assert!(log.contains(&format!("requests={id}")), "{log}");
    assert!(log.contains("user=alice session="), "{log}");
    // `wicket ssh` does the same in one step.
    let out = alice
        .run(
            &["ssh", &format!("{}@node-1", lab.login), "echo", "one-step"],
            "",
        )
        .unwrap();
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "one-step");
    // A command whose words look like ssh's options is the command; a
    // destination that does is refused, not passed to ssh as one.
    let out = alice
        .run(
            &[
                "ssh",
                &format!("{}@node-1", lab.login),
                "echo",
                "-oProxyCommand=x",
                "-v",
            ],
            "",
        )
        .unwrap();
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "-oProxyCommand=x -v");
    let marker = alice.home.path().join("ran");
    let out = alice
        .run(
            &[
                "ssh",
                &format!("{}@-oProxyCommand=touch {}", lab.login, marker.display()),
                "true",
            ],
            "",
        )
        .unwrap();
    assert!(
        !out.ok && out.stderr.contains("not an option"),
        "{}",
        out.stderr
    );
    // (ssh would have run `touch .../ran.wicket`.)
    assert!(!alice.home.path().join("ran.wicket").exists() && !marker.exists());
    // Without `wicket proxy ssh`: straight to the proxy as LOGIN@NODE; it
    // presents its own host certificate (for its address).
    let known_hosts = PathBuf::from(
        alice.status().unwrap()["files"]["known_hosts"]
            .as_str()
            .unwrap(),
    );
    let out = output(
        straight_to(lab.ssh_addr.port(), &alice, Some(&known_hosts))
            .arg(format!("{}@node-1@{}", lab.login, lab.ssh_addr.ip()))
            .arg("echo login-at-node"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "login-at-node");
    // Audit: start, exec and end, all under the request.
    let events = Value::from(alice.audit(&["--user", "alice", "--request", &id]).unwrap());
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in ["session_started", "ssh_exec", "session_ended"] {
        assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
    }
    let g = alice
        .ok(&["request", "show", &id, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert!(g["actions_taken"].as_i64().unwrap() >= 4, "{g}");
}

/// On a multiplexed connection, `session_ended` carries the exit status
/// of its first session's command, not of whichever ended last.
#[test]
fn a_multiplexed_connection_ends_with_its_first_sessions_status() {
    let lab = Lab::start();
    let alice = lab.user("alice", "direct");
    let cfg = ssh_config(&alice);
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("cm");
    let mut master = mux_ssh(&cfg, &ctl, true)
        .arg("-N")
        .arg(lab.dest())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_control_socket(&ctl);
    for code in [3, 5] {
        let out = output(
            mux_ssh(&cfg, &ctl, false)
                .arg(lab.dest())
                .arg(format!("exit {code}")),
        );
        assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
    }
    let out = output(
        mux_ssh(&cfg, &ctl, false)
            .args(["-O", "exit"])
            .arg(lab.dest()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the master to exit", Duration::from_secs(10), || {
        master.try_wait().unwrap()
    })
    .unwrap();
    let ended = wait_until("the session's end", Duration::from_secs(10), || {
        let events = alice
            .audit(&["--user", "alice", "--kind", "session_ended"])
            .ok()?;
        events.into_iter().next()
    })
    .unwrap();
    assert_eq!(ended["data"]["exit_status"], 3, "{ended}");
}

/// A session that only forwards (`ssh -W`) has its forward on its
/// recording too: what is marked before the recording is made is kept for
/// it.
#[test]
fn a_session_that_only_forwards_has_its_forward_on_its_recording() {
    let lab = Lab::start();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    let target = format!("127.0.0.1:{}", lab.node.port());
    let out = output(ssh(&cfg).args(["-W", &target]).arg(lab.dest()));
    assert!(
        text(&out.stdout).starts_with("SSH-2.0-"),
        "{}",
        text(&out.stderr)
    );
    let list = recordings_of(&alice, &id);
    let sid = list[0]["session_id"].as_str().unwrap().to_owned();
    let cast = alice
        .ok(&["play", &sid, "--format", "cast"])
        .unwrap()
        .stdout;
    let (_, events) = wicket::ssh::parse_cast(&cast).unwrap();
    let markers: Vec<&str> = events
        .iter()
        .filter(|e| e.code == "m")
        .map(|e| e.data.as_str())
        .collect();
    assert!(
        markers
            .first()
            .is_some_and(|m| m.contains(&format!("port forward to {target}"))),
        "{markers:?}"
    );
    assert!(
        markers
            .last()
            .is_some_and(|m| m.starts_with("session ended")),
        "{markers:?}"
    );
}

/// A session that stands on two grants is on the record under each: the
/// audit search by either request finds its events, and each request
/// counts its actions.
#[test]
fn a_session_under_two_grants_is_found_under_each() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    let first = lab.grant(&alice, "node-admin", "10m");
    let second = lab.grant(&alice, "agent-ok", "10m");
    alice
        .ok(&["login", "--request-id", &first, "--request-id", &second])
        .unwrap();
    let cfg = ssh_config(&alice);
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo two-grants"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for id in [&first, &second] {
        let kinds = wait_until(
            "the session under the request",
            Duration::from_secs(10),
            || {
                let events = alice.audit(&["--user", "alice", "--request", id]).ok()?;
                let kinds: Vec<String> = events
                    .iter()
                    .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
                    .collect();
                kinds.iter().any(|k| k == "session_ended").then_some(kinds)
            },
        )
        .unwrap();
        for k in ["session_started", "ssh_exec"] {
            assert!(kinds.iter().any(|x| x == k), "{id}: {k} missing: {kinds:?}");
        }
        let g = alice
            .ok(&["request", "show", id, "--format", "json"])
            .unwrap()
            .json()
            .unwrap();
        assert!(g["actions_taken"].as_i64().unwrap() >= 2, "{g}");
    }
}

#[test]
fn denials_are_specific() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    let cfg = ssh_config(&alice);
    let denied = |dest: &str| {
        let out = output(ssh(&cfg).arg(dest).arg("true"));
        assert!(!out.status.success());
        text(&out.stderr)
    };
    let e = denied(&lab.dest());
    assert!(
        e.contains("access denied") && e.contains("no access request grant"),
        "{e}"
    );
    let e = denied(&format!("{}@nope.wicket", lab.login));
    assert!(e.contains("unknown node \"nope\""), "{e}");
    // Straight to the proxy's port, naming no node (no route line, a user
    // name without @NODE): refused, and on the record like any refusal.
    let out = output(
        straight_to(lab.ssh_addr.port(), &alice, None)
            .arg(format!("{}@127.0.0.1", lab.login))
            .arg("true"),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no node named"),
        "{}",
        text(&out.stderr)
    );
    // A revoked grant does not count though the certificate is still valid.
    let admin = lab.user("root-admin", "auditor");
    let id = lab.grant(&alice, "node-admin", "10m");
    let out = output(ssh(&cfg).arg(lab.dest()).arg("true"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    admin
        .ok(&["request", "revoke", &id, "--reason", "done"])
        .unwrap();
    let e = denied(&lab.dest());
    assert!(e.contains(&id) && e.contains("revoked"), "{e}");
    // A login the grant does not give on this node.
    let id = lab.grant(&alice, "node-admin", "3s");
    let e = denied("nobody-else@node-1.wicket");
    assert!(
        e.contains("login \"nobody-else\" is not allowed on node \"node-1\""),
        "{e}"
    );
    // An expired grant.
    past_expiry(&alice, &id, 300);
    let e = denied(&lab.dest());
    assert!(e.contains(&id) && e.contains("expired"), "{e}");
    let denied_events = Value::from(admin.audit(&["--kind", "session_denied"]).unwrap());
    assert!(
        denied_events.as_array().unwrap().len() >= 3,
        "{denied_events}"
    );
    assert!(
        denied_events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "alice"
                && e["data"]["reason"]
                    .as_str()
                    .unwrap()
                    .starts_with("no node named")),
        "{denied_events}"
    );
}

/// An interactive session driven through a pseudo-terminal (`script`).
pub(crate) struct Pty {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    rx: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Pty {
    fn spawn(cfg: &Path, dest: &str) -> Pty {
        let cmd = format!("ssh -tt -F '{}' -o BatchMode=yes {dest}", cfg.display());
        Pty::run(&cmd, &[])
    }

    /// `cmd` run by `sh` on a terminal of its own, with `env` added.
    pub(crate) fn run(cmd: &str, env: &[(&str, &Path)]) -> Pty {
        let mut child = Command::new("script")
            .args(["-q", "-f", "-e", "-c", cmd, "/dev/null"])
            .env("TERM", "xterm")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, rx) = mpsc::channel();
        for mut r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        Pty {
            child,
            stdin,
            rx,
            seen: Vec::new(),
        }
    }

    /// A shell on `dest` that has run a command (so the session is up).
    fn ready(cfg: &Path, dest: &str) -> Pty {
        let mut t = Pty::spawn(cfg, dest);
        t.send("echo ready-$((1+1))\n");
        t.expect("ready-2", Duration::from_secs(10));
        t
    }

    pub(crate) fn send(&mut self, s: &str) {
        self.stdin.write_all(s.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    pub(crate) fn text(&self) -> String {
        text(&self.seen)
    }

    pub(crate) fn expect(&mut self, needle: &str, timeout: Duration) {
        let r = wait_until(&format!("{needle:?} on the terminal"), timeout, || {
            self.take_output();
            self.text().contains(needle).then_some(())
        });
        if let Err(e) = r {
            panic!("{e}\n--- terminal ---\n{}", self.text());
        }
    }

    pub(crate) fn exited(&mut self) -> bool {
        self.take_output();
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// How often `needle` has been on the terminal so far.
    pub(crate) fn times_seen(&mut self, needle: &str) -> usize {
        self.take_output();
        self.text().matches(needle).count()
    }

    fn take_output(&mut self) {
        while let Ok(b) = self.rx.try_recv() {
            self.seen.extend(b);
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn interactive_session_is_cut_within_a_second_of_revoke_and_recorded() {
    let lab = Lab::start_with(", record_input: true");
    let alice = lab.user("alice", "access");
    let admin = lab.user("sec", "auditor");
    let id = lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    let mut t = Pty::spawn(&cfg, &lab.dest());
    t.send("echo hello-$((40+2))\n");
    t.expect("hello-42", Duration::from_secs(20));
    // Output that would drive an auditor's terminal on replay: a clipboard
    // write and a cursor report request.
    t.send("printf '\\033]52;c;cHduZWQ=\\007\\033[6n%s-%s\\n' played safely\n");
    t.expect("played-safely", Duration::from_secs(20));
    admin
        .ok(&["request", "revoke", &id, "--reason", "incident over"])
        .unwrap();
    let revoked = Instant::now();
    t.expect("revoked", Duration::from_secs(5));
    let took = revoked.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "the cut line came {took:?} after the revoke"
    );
    wait_until("the ssh client to exit", Duration::from_secs(1), || {
        t.exited().then_some(())
    })
    .unwrap();
    assert!(t.text().contains(&id), "{}", t.text());
    // The recording replays what was typed and printed.
    let list = recordings_of(&admin, &id);
    let sid = list[0]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["user"], "alice");
    let played = admin
        .ok(&["play", &sid, "--format", "text"])
        .unwrap()
        .stdout;
    assert!(played.contains("echo hello-$((40+2))"), "{played}");
    assert!(played.contains("hello-42"), "{played}");
    assert!(played.contains("revoked"), "{played}");
    // An equivalent of `asciinema cat`: the file is asciicast v2.
    let cast = admin
        .ok(&["play", &sid, "--format", "cast"])
        .unwrap()
        .stdout;
    let (header, events) = wicket::ssh::parse_cast(&cast).unwrap();
    assert_eq!(header["wicket"]["session_id"], sid.as_str());
    assert_eq!(header["wicket"]["request_ids"][0], id.as_str());
    assert!(events.iter().any(|e| e.code == "o"));
    // With `session.record_input`, what was typed is there as input events.
    let typed: String = events
        .iter()
        .filter(|e| e.code == "i")
        .map(|e| e.data.as_str())
        .collect();
    assert!(typed.contains("echo hello-$((40+2))"), "{typed:?}");
    assert!(events.iter().any(|e| e.code == "m" && e.data == "shell"));
    // For tools: the same header and events, as JSON.
    let json = admin
        .ok(&["play", &sid, "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(json["header"], header);
    let as_json: Vec<Value> = events
        .iter()
        .map(|e| serde_json::json!([e.time, e.code, e.data]))
        .collect();
    assert_eq!(json["events"].as_array().unwrap(), &as_json);
    // Real `asciinema cat` when installed (it wants a terminal: run it under `script`).
    if Command::new("asciinema").arg("--version").output().is_ok() {
        let p = admin.home.path().join("s.cast");
        std::fs::write(&p, &cast).unwrap();
        let out = Command::new("script")
            .args(["-q", "-e", "-c"])
            .arg(format!("asciinema cat '{}'", p.display()))
            .arg("/dev/null")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("hello-42"),
            "{}",
            text(&out.stdout)
        );
    }
    // Timed replay works too (fast), without what would talk to the
    // auditor's terminal (the recording has it, the replay does not).
    assert!(
        cast.contains(r"\u001b]52;c;cHduZWQ=") && cast.contains(r"\u001b[6n"),
        "{cast}"
    );
    let replay = admin.ok(&["play", &sid, "--speed", "50"]).unwrap().stdout;
    assert!(replay.contains("hello-42"));
    assert!(replay.contains("played-safely"), "{replay:?}");
    assert!(
        !replay.contains("\x1b]52") && !replay.contains("\x1b[6n"),
        "{replay:?}"
    );
    // alice may list her own sessions but not play bob's (none here): her list is hers.
    let mine = alice
        .ok(&["recordings", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert!(mine
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["user"] == "alice"));
    let _: &Value = &mine;
    // Listing one's own is not a refusal: nothing denied is on the record.
    let denied = admin
        .audit(&["--user", "alice", "--kind", "access_denied"])
        .unwrap();
    assert!(
        denied
            .iter()
            .all(|e| e["data"]["action"] != "recordings.read"),
        "{denied:?}"
    );
    // A disabled user lists nothing, not even their own (once the grant
    // index has the change: within a second).
    run(&mut lab.d.admin(&["users", "disable", "alice"]).unwrap()).unwrap();
    let out = wait_until("alice's listing refused", Duration::from_secs(5), || {
        let out = alice
            .run(&["recordings", "ls", "--format", "json"], "")
            .unwrap();
        (!out.ok).then_some(out)
    })
    .unwrap();
    assert!(out.stderr.contains("disabled"), "{}", out.stderr);
}

/// `wicketd users set-roles` reaches a live SSH session: adding a role
/// changes nothing, and taking away a standing role its forwardings rest
/// on ends it within a second, with the reason on its terminal.
/// The test config with `node-admin` self-approved on `env: test` nodes
/// and needing an auditor's approval on `tier: prod` resources (a prod
/// database nobody's role reaches makes that rule's environment reach
/// something), plus `more_nodes` lines.
fn judged_config(port: u16, login: &str, more_nodes: &str) -> String {
    let base = config(port, login, "expiry_warning: 2s", "", "");
    let self_rule =
        "approval:\n  - roles: [ node-admin, no-forward, agent-ok, x11-ok ]\n    require: self\n";
    assert!(base.contains(self_rule), "{base}");
    let yaml = base.replace(
        self_rule,
        "approval:\n  - roles: [ node-admin ]\n    environment: { env: test }\n    require: self\n  - roles: [ node-admin ]\n    environment: { tier: prod }\n    require: { any_of: [ \"role:auditor\" ] }\n",
    );
    format!(
        "{yaml}{more_nodes}  databases:\n    - {{ name: prod-pg, address: \"127.0.0.1:9\", labels: {{ tier: prod }} }}\n"
    )
}

/// A grant whose request named no resources holds only where its role
/// reached when it was approved, as the rules that approved it were chosen
/// by those: a production node configured afterwards is out of its reach
/// (it once reached it, self-approved under the test nodes' rule), and a
/// new request for the role is judged by production's rule.
#[test]
fn a_grant_does_not_reach_a_node_configured_after_it_was_approved() {
    let lab = Lab::start_yaml(|port, login| judged_config(port, login, ""));
    let alice = lab.user("alice", "access");
    lab.d.add_user("sec", "auditor", PW, false).unwrap();
    let first = lab.grant(&alice, "node-admin", "10m");
    let Lab { d, node, login, .. } = lab;
    let node_port = node.port();
    // An administrator adds node-2, a production test node (with its own
    // sshd): node-admin's labels reach it.
    let (d, _node2) = {
        let mut d = d;
        let mut attempts = 0;
        loop {
            let port2 = free_port().unwrap();
            let more = format!(
                "    - {{ name: node-2, address: \"127.0.0.1:{port2}\", labels: {{ env: test, tier: prod }} }}\n"
            );
            d = d
                .restart_with(judged_config(node_port, &login, &more))
                .unwrap();
            match Sshd::builder().port(port2).node("node-2").start(&d) {
                Ok(n) => break (d, n),
                Err(e) if e.is::<PortInUse>() && attempts < 3 => attempts += 1,
                Err(e) => panic!("{e:#}"),
            }
        }
    };
    // The restarted wicketd listens elsewhere: a new login, with the grant.
    let alice = WicketCli::logged_in(&d, "alice", PW).unwrap();
    alice.ok(&["login", "--request-id", &first]).unwrap();
    assert_eq!(alice.node_names().unwrap(), ["node-1"]);
    let cfg = ssh_config(&alice);
    let out = output(
        ssh(&cfg)
            .arg(format!("{login}@node-1.wicket"))
            .arg("echo one"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(
        ssh(&cfg)
            .arg(format!("{login}@node-2.wicket"))
            .arg("echo two"),
    );
    failed_with(&out, "node-admin (only on node-1)", "two");
    // A new request reaches node-2, so production's rule judges it.
    let g = alice
        .ok(&[
            "request",
            "create",
            "--roles",
            "node-admin",
            "--reason",
            "INC-8: prod node",
            "--duration",
            "10m",
            "--format",
            "json",
        ])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(g["status"], "pending", "{g}");
    let second = g["id"].as_str().unwrap().to_owned();
    let sec = WicketCli::logged_in(&d, "sec", PW).unwrap();
    sec.ok(&["request", "review", &second, "--approve", "--reason", "ok"])
        .unwrap();
    alice.ok(&["login", "--request-id", &second]).unwrap();
    let cfg = ssh_config(&alice);
    let out = output(
        ssh(&cfg)
            .arg(format!("{login}@node-2.wicket"))
            .arg("echo two"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "two");
}

#[test]
fn taking_away_a_standing_role_ends_an_ssh_session_that_rests_on_it() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access,direct,agent-ok");
    let cfg = ssh_config(&alice);
    let set_roles = |roles: &str| {
        run(&mut lab
            .d
            .admin(&["users", "set-roles", "alice", "--roles", roles])
            .unwrap())
        .unwrap();
    };
    let mut t = Pty::ready(&cfg, &lab.dest());
    set_roles("access,direct,agent-ok,x11-ok");
    // Past the watcher's next round (250 ms): still running.
    t.send("sleep 1; echo still-$((40+2))\n");
    t.expect("still-42", Duration::from_secs(10));
    set_roles("access,direct");
    let removed = Instant::now();
    t.expect("role \"agent-ok\" was taken away", Duration::from_secs(5));
    assert!(
        removed.elapsed() <= Duration::from_millis(1500),
        "cut {:?} after the change",
        removed.elapsed()
    );
    wait_until("the ssh client to exit", Duration::from_secs(2), || {
        t.exited().then_some(())
    })
    .unwrap();
    // Its standing role `direct` still lets a new one in.
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo back"));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn interactive_session_is_warned_then_cut_at_expiry() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    let id = lab.grant(&alice, "node-admin", "6s");
    let expires = expires_at(&alice, &id);
    let cfg = ssh_config(&alice);
    let mut t = Pty::ready(&cfg, &lab.dest());
    t.expect("this session will be closed", Duration::from_secs(10));
    t.expect("expired", Duration::from_secs(10));
    let late = chrono::Utc::now().signed_duration_since(expires);
    assert!(
        late <= chrono::Duration::milliseconds(1000),
        "cut {late:?} after expiry"
    );
    wait_until("the ssh client to exit", Duration::from_secs(1), || {
        t.exited().then_some(())
    })
    .unwrap();
}

/// A session under standing roles ends with the certificate it was opened
/// with (here the login's, `login_ttl: 8s`), warned before, as a grant's
/// session ends with the grant.
#[test]
fn a_standing_session_is_warned_then_cut_when_its_certificate_ends() {
    let lab = Lab::start_full("", "certificates: { login_ttl: 8s }");
    let alice = lab.user("alice", "direct");
    let ends = chrono::DateTime::parse_from_rfc3339(
        alice.status().unwrap()["valid_before"].as_str().unwrap(),
    )
    .unwrap();
    let cfg = ssh_config(&alice);
    let mut t = Pty::ready(&cfg, &lab.dest());
    t.expect("the session will be closed then", Duration::from_secs(10));
    t.expect(
        "the login behind this session ended",
        Duration::from_secs(10),
    );
    let late = chrono::Utc::now().signed_duration_since(ends);
    assert!(
        late >= chrono::Duration::zero() && late <= chrono::Duration::milliseconds(1000),
        "cut {late:?} after the certificate ended"
    );
    wait_until("the ssh client to exit", Duration::from_secs(1), || {
        t.exited().then_some(())
    })
    .unwrap();
}

/// A grant certificate may outlive the password login behind it, but then
/// only its grants count. With the grant revoked, a session under standing
/// roles ends with the login (warned before), not with the certificate;
/// once the login has ended, the certificate opens nothing, though it is
/// valid until the grant's end.
#[test]
fn a_grant_certificate_keeps_standing_roles_only_while_its_login_lasts() {
    let lab = Lab::start_full("", "certificates: { login_ttl: 8s }");
    let alice = lab.user("alice", "access,direct");
    let valid_before = |cli: &WicketCli| {
        chrono::DateTime::parse_from_rfc3339(
            cli.status().unwrap()["valid_before"].as_str().unwrap(),
        )
        .unwrap()
    };
    let login_ends = valid_before(&alice);
    let id = lab.grant(&alice, "node-admin", "10m");
    assert!(
        valid_before(&alice) > login_ends + chrono::Duration::minutes(5),
        "the grant certificate runs to the grant's end"
    );
    // Revoked by someone else: alice's certificate stays what it was.
    let admin = lab.user("root-admin", "auditor");
    admin
        .ok(&["request", "revoke", &id, "--reason", "done"])
        .unwrap();
    let cfg = ssh_config(&alice);
    // Standing role `direct` lets this one in, until the login ends.
    let mut t = Pty::ready(&cfg, &lab.dest());
    t.expect("the session will be closed then", Duration::from_secs(10));
    t.expect(
        "the login behind this session ended",
        Duration::from_secs(10),
    );
    let late = chrono::Utc::now().signed_duration_since(login_ends);
    assert!(
        late >= chrono::Duration::zero() && late <= chrono::Duration::milliseconds(1000),
        "cut {late:?} after the login ended"
    );
    wait_until("the ssh client to exit", Duration::from_secs(1), || {
        t.exited().then_some(())
    })
    .unwrap();
    let out = output(ssh(&cfg).arg(lab.dest()).arg("true"));
    failed_with(&out, "standing roles ended with the login", "");
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn scp_and_sftp_round_trip_ten_megabytes() {
    let lab = Lab::start();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    run(Command::new("head")
        .args(["-c", "10485760", "/dev/urandom"])
        .stdout(std::fs::File::create(&src).unwrap()))
    .unwrap();
    let remote = format!("/tmp/wicket-e2e-{}.bin", free_port().unwrap());
    let back = dir.path().join("back.bin");
    let scp = |a: &str, b: &str| {
        let out = output(Command::new("scp").args(["-q", "-F"]).arg(&cfg).args([
            "-o",
            "BatchMode=yes",
            a,
            b,
        ]));
        assert!(out.status.success(), "scp {a} {b}: {}", text(&out.stderr));
    };
    scp(src.to_str().unwrap(), &format!("{}:{remote}", lab.dest()));
    scp(&format!("{}:{remote}", lab.dest()), back.to_str().unwrap());
    assert_eq!(sha256(&src), sha256(&back));
    // sftp: get it again in batch mode.
    let back2 = dir.path().join("back2.bin");
    let batch = dir.path().join("batch");
    // With a removal the node refuses (`-`: the batch goes on), and an
    // upload that keeps the file's mode through its handle (`put -p`).
    let missing = format!("/nonexistent-wicket-e2e-{}/gone", free_port().unwrap());
    std::fs::write(
        &batch,
        format!(
            "get {remote} {}\n-rm {missing}\nput -p {} {remote}.p\nchmod 600 {remote}\nrm {remote}\nrm {remote}.p\n",
            back2.display(),
            src.display(),
        ),
    )
    .unwrap();
    let out = output(
        Command::new("sftp")
            .arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", "-b"])
            .arg(&batch)
            .arg(lab.dest()),
    );
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    assert_eq!(sha256(&src), sha256(&back2));

    // Each file operation is on the record with its path: the upload
    // (scp speaks SFTP), the two downloads and the removal.
    let ops = wait_until("the ssh_sftp events", Duration::from_secs(10), || {
        let events = Value::from(alice.audit(&["--user", "alice"]).unwrap());
        let ops: Vec<(String, String, String)> = events
            .as_array()?
            .iter()
            .filter(|e| e["kind"] == "ssh_sftp")
            .map(|e| {
                let d = &e["data"];
                let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
                (s("op"), s("path"), s("flags"))
            })
            .collect();
        ops.iter()
            .any(|(op, path, _)| op == "remove" && *path == remote)
            .then_some(ops)
    })
    .unwrap();
    let opened = |flags: &dyn Fn(&str) -> bool| {
        ops.iter()
            .filter(|(op, path, f)| op == "open" && *path == remote && flags(f))
            .count()
    };
    assert_eq!(opened(&|f| f.contains("write")), 1, "{ops:?}");
    assert_eq!(opened(&|f| f == "read"), 2, "{ops:?}");
    assert!(
        ops.iter()
            .any(|(op, path, f)| op == "setstat" && *path == remote && f == "mode=600"),
        "{ops:?}"
    );
    // The mode set through the upload's handle names the file.
    let p = format!("{remote}.p");
    assert!(
        ops.iter()
            .any(|(op, path, f)| op == "fsetstat" && *path == p && f.contains("mode=")),
        "{ops:?}"
    );
    // What the node refused is on the record as refused, with its reason;
    // nothing else is.
    let events = Value::from(
        alice
            .audit(&["--user", "alice", "--kind", "ssh_sftp"])
            .unwrap(),
    );
    let refused: Vec<(String, String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let d = &e["data"];
            Some((
                d["op"].as_str()?.to_owned(),
                d["path"].as_str()?.to_owned(),
                d["error"].as_str()?.to_owned(),
            ))
        })
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].0.as_str(), refused[0].1.as_str()),
        ("remove", missing.as_str())
    );
    assert!(refused[0].2.starts_with("no such file"), "{refused:?}");
    // The sftp session's recording lists them too.
    let auditor = lab.user("root-admin", "auditor");
    wait_until(
        "the sftp session's recording",
        Duration::from_secs(20),
        || {
            let list = recordings_of(&auditor, &id);
            list.as_array()?.iter().find_map(|r| {
                let sid = r["session_id"].as_str()?;
                let p = auditor.ok(&["play", sid, "--format", "text"]).ok()?.stdout;
                (p.contains(&format!("sftp: remove {remote}"))
                    && p.contains(&format!("sftp: open {remote} (read)")))
                .then_some(())
            })
        },
    )
    .unwrap();

    // Bytes that are not SFTP (a 4 GiB packet) are not passed to the node:
    // the channel is closed, while ssh still holds its stdin open.
    let mut raw = ssh(&cfg)
        .args(["-s", &lab.dest(), "sftp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = raw.stdin.take().unwrap();
    stdin.write_all(&[0xff, 0xff, 0xff, 0xff, 3]).unwrap();
    stdin.flush().unwrap();
    let closed = wait_until("the sftp channel to close", Duration::from_secs(20), || {
        raw.try_wait().unwrap()
    });
    if closed.is_err() {
        let _ = raw.kill();
    }
    drop(stdin);
    let _ = raw.wait();
    closed.unwrap();
    let marked = wait_until("the closing marker", Duration::from_secs(20), || {
        let list = recordings_of(&auditor, &id);
        list.as_array()?.iter().find_map(|r| {
            let sid = r["session_id"].as_str()?;
            let p = auditor.ok(&["play", sid, "--format", "text"]).ok()?.stdout;
            p.contains("sftp channel closed: not an SFTP packet stream")
                .then_some(p)
        })
    })
    .unwrap();
    assert!(marked.contains("at most 262144"), "{marked}");
}

/// SFTP run as a command (`sftp -s /usr/lib/openssh/sftp-server`: any `-s`
/// with a `/` makes OpenSSH send an exec, not a subsystem request) is
/// audited as the subsystem is: each file operation, with its path. It
/// once passed as one unrecorded command.
#[test]
fn sftp_run_as_a_command_is_audited_as_sftp() {
    let server = wicket_e2e::harness_sshd::sftp_server();
    if !server.contains('/') {
        eprintln!("no sftp-server program here (internal-sftp only): nothing to run as a command");
        return;
    }
    let lab = Lab::start();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    let dir = tempfile::tempdir().unwrap();
    let remote = format!("/tmp/wicket-e2e-exec-sftp-{}", free_port().unwrap());
    let batch = dir.path().join("batch");
    std::fs::write(&batch, format!("mkdir {remote}\nrmdir {remote}\n")).unwrap();
    let out = output(
        Command::new("sftp")
            .arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", "-s", &server, "-b"])
            .arg(&batch)
            .arg(lab.dest()),
    );
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    let ops = wait_until("the ssh_sftp events", Duration::from_secs(10), || {
        let events = alice
            .audit(&["--user", "alice", "--kind", "ssh_sftp"])
            .unwrap();
        let ops: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                let d = &e["data"];
                let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
                (s("op"), s("path"))
            })
            .collect();
        (ops.len() >= 2).then_some(ops)
    })
    .unwrap();
    assert_eq!(
        ops,
        [
            ("mkdir".to_owned(), remote.clone()),
            ("rmdir".to_owned(), remote)
        ]
    );
    // The command itself is on the record too, as every exec is.
    let execs = alice
        .audit(&["--user", "alice", "--kind", "ssh_exec"])
        .unwrap();
    assert!(
        execs
            .iter()
            .any(|e| e["data"]["command"] == server.as_str()),
        "{execs:?}"
    );
    // What the client sends cannot turn a command's recording off: input
    // that opens like SFTP and then is not runs on, and what the command
    // prints is recorded.
    let mut child = ssh(&cfg)
        .arg(lab.dest())
        .arg("head -c9 >/dev/null; cat; echo printed-$((6*7))")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).unwrap();
        stdin.write_all(b"not sftp at all\n").unwrap();
    }
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert_eq!(text(&done.stdout), "not sftp at all\nprinted-42\n");
    let auditor = lab.user("root-admin", "auditor");
    wait_until("the command's recording", Duration::from_secs(20), || {
        let list = recordings_of(&auditor, &id);
        list.as_array()?.iter().find_map(|r| {
            let sid = r["session_id"].as_str()?;
            let p = auditor.ok(&["play", sid, "--format", "text"]).ok()?.stdout;
            (p.contains("printed-42") && p.contains("not SFTP after all")).then_some(())
        })
    })
    .unwrap();
}

/// A listener on 127.0.0.1 for forwards to reach, serving each connection
/// with `serve` on a thread of its own; its port.
fn forward_target(serve: impl Fn(std::net::TcpStream) + Clone + Send + 'static) -> u16 {
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in target.incoming() {
            let Ok(c) = c else { break };
            let serve = serve.clone();
            std::thread::spawn(move || serve(c));
        }
    });
    port
}

/// A connection holds at most 256 channels at once (sessions, forwards,
/// X11, agent): past that a new one is refused for resource shortage, so
/// that a client opening channels without end cannot exhaust the proxy's
/// memory. A place comes back when its channel closes.
#[test]
fn a_connection_holds_a_bounded_number_of_channels() {
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let lab = Lab::start();
    let bob = lab.user("bob", "access");
    lab.grant(&bob, "node-admin", "10m");
    let cfg = ssh_config(&bob);
    // What the forwards reach: a listener that holds each connection
    // until its client closes it, counting them.
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let target_port = forward_target(move |mut c| {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    });
    let count = || accepted.load(Ordering::SeqCst);
    let local = free_port().unwrap();
    let mut forward = ssh(&cfg)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{local}:127.0.0.1:{target_port}"))
        .arg(lab.dest())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let local_addr: SocketAddr = ([127, 0, 0, 1], local).into();
    // The first connection that ssh takes is the first held one.
    let first = wait_until("ssh to listen", Duration::from_secs(20), || {
        TcpStream::connect(local_addr).ok()
    })
    .unwrap();
    let mut held = vec![first];
    for _ in 1..256 {
        held.push(TcpStream::connect(local_addr).unwrap());
    }
    wait_until("256 forwarded connections", Duration::from_secs(30), || {
        (count() >= 256).then_some(())
    })
    .unwrap();
    // One more is refused: the client closes it.
    let mut extra = TcpStream::connect(local_addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        read_uninterrupted(&mut extra, &mut buf).unwrap(),
        0,
        "closed for want of a place"
    );
    let before = count();
    assert_eq!(before, 256, "none more reached the target");
    // A place comes back when its channel closes.
    drop(held.pop());
    let again = wait_until("a place to come back", Duration::from_secs(10), || {
        let mut c = TcpStream::connect(local_addr).ok()?;
        c.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
        // Refused ones are closed at once; a forwarded one stays open.
        match read_uninterrupted(&mut c, &mut buf) {
            Ok(0) => None,
            _ => Some(c),
        }
    })
    .unwrap();
    wait_until("the new forward to arrive", Duration::from_secs(10), || {
        (count() > before).then_some(())
    })
    .unwrap();
    drop(again);
    let _ = forward.kill();
    let _ = forward.wait();
    let mut err = String::new();
    forward
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("resource shortage"), "{err}");
}

#[test]
fn port_forwarding_only_when_the_role_allows_it() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "no-forward", "10m");
    let cfg = ssh_config(&alice);
    // -W is a direct-tcpip channel to the node's own sshd.
    let out = output(
        ssh(&cfg)
            .args(["-W", &format!("127.0.0.1:{}", lab.node.port())])
            .arg(lab.dest()),
    );
    failed_with(&out, "prohibited", "");
    // -R too is port forwarding: the node is not asked to listen.
    let remote = free_port().unwrap();
    let out = output(
        ssh(&cfg)
            .args(["-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("127.0.0.1:{remote}:127.0.0.1:9"))
            .arg(lab.dest())
            .arg("true"),
    );
    failed_with(&out, "remote port forwarding failed", "");
    assert!(std::net::TcpStream::connect(("127.0.0.1", remote)).is_err());
    let bob = lab.user("bob", "access");
    let bob_grant = lab.grant(&bob, "node-admin", "10m");
    let cfg = ssh_config(&bob);
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-W"])
        .arg(format!("127.0.0.1:{}", lab.node.port()))
        .arg(lab.dest())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = out;
    let mut banner = [0u8; 8];
    out.stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut banner)
        .unwrap();
    assert_eq!(
        &banner, b"SSH-2.0-",
        "the forwarded port is the node's sshd"
    );
    let _ = out.kill();
    let _ = out.wait();

    // -R: the node listens on `remote`, and a connection to it reaches a
    // listener on the user's side, through wicketd. The forwards go
    // through a control master, which can add and cancel them.
    let user_side = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let user_port = user_side.local_addr().unwrap().port();
    let answering = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut c, _) = user_side.accept().unwrap();
            c.write_all(b"from-the-user-side\n").unwrap();
        }
    });
    let mux = tempfile::tempdir().unwrap();
    let control = format!("ControlPath={}", mux.path().join("cm").display());
    let spec = |node_port: u16| format!("127.0.0.1:{node_port}:127.0.0.1:{user_port}");
    let mut forward = ssh(&cfg)
        .args(["-N", "-o", "ControlMaster=yes", "-o", &control])
        .args(["-o", "ExitOnForwardFailure=yes", "-R", &spec(remote)])
        .arg(lab.dest())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut through = |port: u16, what: &str| {
        wait_until(what, Duration::from_secs(20), || {
            if let Ok(Some(status)) = forward.try_wait() {
                let mut e = String::new();
                let _ = forward.stderr.take().unwrap().read_to_string(&mut e);
                panic!("ssh -R exited ({status}): {e}");
            }
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = String::new();
            let _ = c.read_to_string(&mut got);
            Some(got)
        })
        .unwrap()
    };
    let got = through(remote, "the node's end of the -R forward");
    assert_eq!(got, "from-the-user-side\n", "{}", lab.d.stderr());
    let stops_listening = |port: u16| {
        wait_until(
            "the node to stop listening",
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .is_err()
                    .then_some(())
            },
        )
        .unwrap()
    };
    let mux_ctl = |op: &str, port: u16| {
        output(
            ssh(&cfg)
                .args(["-o", &control, "-O", op, "-R", &spec(port)])
                .arg(lab.dest()),
        )
    };
    // Cancelled, the node stops listening.
    let out = mux_ctl("cancel", remote);
    assert!(out.status.success(), "{}", text(&out.stderr));
    stops_listening(remote);
    // To port 0: the node picks one, and the user is told which.
    let out = mux_ctl("forward", 0);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let picked: u16 = text(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {:?} {:?}", text(&out.stdout), text(&out.stderr)));
    assert_ne!(picked, 0);
    let got = through(picked, "the node's end of the -R forward to port 0");
    assert_eq!(got, "from-the-user-side\n", "{}", lab.d.stderr());
    answering.join().unwrap();
    // Cancelled as it was asked for, the node stops listening on the port
    // it picked.
    let out = mux_ctl("cancel", 0);
    assert!(out.status.success(), "{}", text(&out.stderr));
    stops_listening(picked);
    // A revoke ends the connection.
    lab.user("root-admin", "auditor")
        .ok(&["request", "revoke", &bob_grant, "--reason", "done"])
        .unwrap();
    let ended = wait_until("ssh -R to end at revoke", Duration::from_secs(10), || {
        forward.try_wait().unwrap()
    });
    if ended.is_err() {
        let _ = forward.kill();
    }
    let _ = forward.wait();
    ended.unwrap();
    // Each listen and each connection is audited (asynchronously; a probe
    // above may have connected once more before a cancel took hold).
    let (remote, picked) = (u64::from(remote), u64::from(picked));
    let want = [
        (remote, false),
        (remote, true),
        (picked, false),
        (picked, true),
    ];
    let forwards = wait_until(
        "the ssh_remote_forward events",
        Duration::from_secs(10),
        || {
            let events = Value::from(bob.audit(&["--user", "bob"]).unwrap());
            let seen: std::collections::BTreeSet<(u64, bool)> = events
                .as_array()?
                .iter()
                .filter(|e| e["kind"] == "ssh_remote_forward")
                .map(|e| {
                    let d = &e["data"];
                    (d["port"].as_u64().unwrap(), d["from"].is_string())
                })
                .collect();
            want.iter().all(|w| seen.contains(w)).then_some(seen)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            Value::from(bob.audit(&["--user", "bob"]).unwrap())
        )
    });
    assert!(
        forwards
            .iter()
            .all(|(port, _)| *port == remote || *port == picked),
        "{forwards:?}"
    );
}

/// The first of `user`'s audit events of `kind` (as `cli`, `user`'s own
/// CLI, sees them), once there is one.
fn first_event_of(cli: &WicketCli, user: &str, kind: &str) -> Value {
    wait_until(
        &format!("the {kind} event"),
        Duration::from_secs(10),
        || {
            let events = Value::from(cli.audit(&["--user", user]).unwrap());
            events
                .as_array()?
                .iter()
                .find(|e| e["kind"] == kind)
                .cloned()
        },
    )
    .unwrap()
}

#[test]
fn agent_forwarding_is_refused_with_a_message_unless_allowed() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    let agent = TestAgent::start();
    let sock = agent.sock.clone();
    let out = output(
        ssh(&cfg)
            .arg("-A")
            .env("SSH_AUTH_SOCK", &sock)
            .arg(lab.dest())
            .arg("echo agent=${SSH_AUTH_SOCK:-none}"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "agent=none");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "wicket: refused: agent forwarding as {:?} on node \"node-1\" is not allowed",
            lab.login
        )),
        "{err}"
    );
    // With a role that allows it, the node reaches the user's agent.
    lab.grant(&alice, "agent-ok", "10m");
    let out = output(
        ssh(&cfg)
            .arg("-A")
            .env("SSH_AUTH_SOCK", &sock)
            .arg(lab.dest())
            .arg("ssh-add -l"),
    );
    drop(agent);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("forwarded-key"),
        "{}",
        text(&out.stdout)
    );
    // The node's use of the agent is on the record, with the session.
    let used = first_event_of(&alice, "alice", "ssh_agent");
    assert_eq!(used["data"]["resource"], "node-1", "{used}");
    assert!(used["session_id"].is_string(), "{used}");

    // Many channels on one connection: an OpenSSH control master and
    // several sessions multiplexed over it at once.
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let master_log = dir.path().join("master.log");
    let mut master = ssh(&cfg)
        .args(["-M", "-N", "-S"])
        .arg(&ctl)
        .arg(lab.dest())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&master_log).unwrap())
        .spawn()
        .unwrap();
    wait_for_control_socket(&ctl);
    let children: Vec<_> = (0..4)
        .map(|i| {
            ssh(&cfg)
                .arg("-S")
                .arg(&ctl)
                .arg(lab.dest())
                .arg(format!("echo channel-{i}; exit {i}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(i as i32),
            "stdout {:?} stderr {:?} master {}",
            text(&out.stdout),
            text(&out.stderr),
            std::fs::read_to_string(&master_log).unwrap_or_default()
        );
        assert_eq!(text(&out.stdout).trim(), format!("channel-{i}"));
    }
    let _ = master.kill();
    let _ = master.wait();
    let _ = master_log;
}

/// An `ssh-agent` holding one key (comment `forwarded-key`), stopped on drop.
struct TestAgent {
    sock: PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    fn start() -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = TestAgent {
            sock,
            child,
            _dir: dir,
        };
        wait_until("ssh-agent's socket", Duration::from_secs(10), || {
            agent.sock.exists().then_some(())
        })
        .unwrap();
        let key = agent._dir.path().join("k");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key", "-f"])
            .arg(&key))
        .unwrap();
        run(Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &agent.sock))
        .unwrap();
        agent
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A terminal in tmux (so its size can change), running ssh through the proxy.
#[test]
fn window_resize_reaches_the_node_and_the_recording() {
    let lab = Lab::start();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    let sock = alice.home.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let cmd = format!(
        "ssh -tt -F '{}' -o BatchMode=yes {}",
        cfg.display(),
        lab.dest()
    );
    tmux(&["new-session", "-d", "-s", "w", "-x", "80", "-y", "24", &cmd]);
    struct Kill(PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .arg("-S")
                .arg(&self.0)
                .arg("kill-server")
                .output();
        }
    }
    let _kill = Kill(sock.clone());
    let size_is = |rows: u32, cols: u32| {
        tmux(&["send-keys", "-t", "w", "stty size", "Enter"]);
        let want = format!("{rows} {cols}");
        wait_until(
            &format!("`stty size` to print {want}"),
            Duration::from_secs(20),
            || {
                tmux(&["capture-pane", "-p", "-t", "w"])
                    .lines()
                    .any(|l| l.trim() == want)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", tmux(&["capture-pane", "-p", "-t", "w"])));
    };
    size_is(24, 80);
    tmux(&["resize-window", "-t", "w", "-x", "100", "-y", "30"]);
    size_is(30, 100);
    tmux(&["send-keys", "-t", "w", "exit", "Enter"]);
    // The recording has the resize.
    let list = recordings_of(&alice, &id);
    let sid = list[0]["session_id"].as_str().unwrap().to_owned();
    let cast = wait_until(
        "the resize in the recording",
        Duration::from_secs(10),
        || {
            let cast = alice
                .ok(&["play", &sid, "--format", "cast"])
                .unwrap()
                .stdout;
            let (_, events) = wicket::ssh::parse_cast(&cast).unwrap();
            events
                .iter()
                .any(|e| e.code == "r" && e.data == "100x30")
                .then_some(cast)
        },
    )
    .unwrap();
    assert!(cast.contains("\"r\""), "{cast}");
}

#[test]
fn x11_forwarding_only_when_the_role_allows_it() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    // A display on the user's side (a stand-in X server on a free port:
    // display N is TCP port 6000 + N): ssh asks for X11 forwarding.
    let mut x = FakeXServer::start();
    let out = output(
        x.ssh(&cfg)
            .arg(lab.dest())
            .arg("echo display=${DISPLAY:-none}"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "display=none");
    let err = text(&out.stderr);
    assert!(
        err.contains("wicket: refused: X11 forwarding") && err.contains("not allowed"),
        "{err}"
    );

    // With a role that allows it, a program on the node reaches the
    // user's display: it connects to the display sshd made for the session
    // with the cookie sshd stored there (ssh swaps it for the display's
    // own), and reads what the X server says.
    lab.grant(&alice, "x11-ok", "10m");
    let out = x
        .ssh(&cfg)
        .arg(lab.dest())
        .arg("bash -s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            let script = format!("{X11_CLIENT}x11\necho \"display=$DISPLAY\"\n");
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let (said, err) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{said}\n{err}\nnode: {}",
        lab.node.log()
    );
    assert!(said.contains(FakeXServer::REPLY), "{said}\n{err}");
    assert!(said.contains("display=localhost:"), "{said}");
    let setup = x.setup.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(setup.protocol, "MIT-MAGIC-COOKIE-1");
    assert_eq!(setup.cookie_len, 16);
    // On the record, linked to the grant.
    let events = first_event_of(&alice, "alice", "ssh_x11");
    assert!(events["data"]["from"].is_string(), "{events}");
    assert_eq!(events["data"]["resource"], "node-1", "{events}");
}

/// `x11`: what a program on the node sends to its X11 display: the setup
/// request with the cookie sshd stored for the session (`xauth`); then it
/// prints what the server answered (nothing when the connection closes).
const X11_CLIENT: &str = r#"trap '' PIPE
x11() {
  cookie=$(xauth list | awk 'NR == 1 { print $3 }')
  [ ${#cookie} = 32 ] || { echo "no X11 cookie on the node: $(xauth list 2>&1)" >&2; exit 3; }
  display=${DISPLAY#*:}
  exec 3<>/dev/tcp/127.0.0.1/$((6000 + ${display%%.*})) || return 0
  {
    printf 'l\000\013\000\000\000\022\000\020\000\000\000MIT-MAGIC-COOKIE-1\000\000'
    printf "$(printf %s "$cookie" | sed 's/../\\x&/g')"
  } >&3 2>/dev/null
  head -c 13 <&3
  exec 3<&-
}
"#;

/// A stand-in for the user's X server: reads each connection's setup
/// request, answers [`FakeXServer::REPLY`] and closes it.
struct FakeXServer {
    display: String,
    xauthority: tempfile::TempDir,
    setup: mpsc::Receiver<X11Setup>,
}

struct X11Setup {
    protocol: String,
    cookie_len: usize,
}

impl FakeXServer {
    const REPLY: &'static str = "x11-reply-ok\n";

    fn start() -> FakeXServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, setup) = mpsc::channel();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { return };
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut head = [0u8; 12];
                c.read_exact(&mut head).unwrap();
                assert_eq!(head[0], b'l', "little-endian, as the node's client sent it");
                let n = usize::from(u16::from_le_bytes([head[6], head[7]]));
                let d = usize::from(u16::from_le_bytes([head[8], head[9]]));
                let pad = |len: usize| len.div_ceil(4) * 4;
                let mut rest = vec![0u8; pad(n) + pad(d)];
                c.read_exact(&mut rest).unwrap();
                c.write_all(Self::REPLY.as_bytes()).unwrap();
                let sent = tx.send(X11Setup {
                    protocol: String::from_utf8_lossy(&rest[..n]).into_owned(),
                    cookie_len: d,
                });
                if sent.is_err() {
                    return;
                }
            }
        });
        assert!(port > 6000, "display N is port 6000 + N: {port}");
        FakeXServer {
            display: format!("127.0.0.1:{}", port - 6000),
            xauthority: tempfile::tempdir().unwrap(),
            setup,
        }
    }

    /// `ssh -Y` with this display (no cookie for it on the user's side:
    /// ssh makes one up).
    fn ssh(&mut self, cfg: &Path) -> Command {
        let mut c = ssh(cfg);
        c.arg("-Y")
            .env("DISPLAY", &self.display)
            .env("XAUTHORITY", self.xauthority.path().join("Xauthority"));
        c
    }
}

/// With `session.disconnect_on_expiry: false` a running session outlives its
/// grant, but the connection it runs on opens nothing new: a session or a
/// port forward multiplexed over the same connection (OpenSSH
/// ControlMaster) after the grant ended is refused with the reason.
#[test]
fn after_the_grant_ends_a_kept_connection_opens_no_new_channels() {
    let lab = Lab::start_with(", disconnect_on_expiry: false");
    let alice = lab.user("alice", "access");
    let id = lab.grant(&alice, "node-admin", "4s");
    let cfg = ssh_config(&alice);
    // The master runs until the test says stop.
    let kept = KeptConnection::open(&lab, &cfg, "the grant holds");
    let forward = || {
        output(
            kept.client()
                .args(["-W", &format!("127.0.0.1:{}", lab.node.port())])
                .arg(lab.dest()),
        )
    };
    let out = forward();
    assert!(
        text(&out.stdout).starts_with("SSH-2.0-"),
        "a port forward works while the grant holds: {}",
        text(&out.stderr)
    );

    past_expiry(&alice, &id, 600);

    kept.refused_after(&[&id, "expired"]);
    let out = forward();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "port forward refused after expiry");
    assert!(!text(&out.stdout).contains("SSH-2.0-"), "{err}");
    // Through the mux, OpenSSH words the channel refusal itself.
    assert!(
        err.contains("refused by peer") || err.contains("prohibited"),
        "{err}"
    );

    // The running session was told, and finishes normally.
    let done = kept.finish();
    let (out, err) = (text(&done.stdout), text(&done.stderr));
    assert!(done.status.success(), "{out} {err}");
    assert_eq!(out.trim(), "finished");
    assert!(
        err.contains("new sessions on this connection are refused"),
        "{err}"
    );
    // The refused command did not run, and is not on the record as run
    // (alice's certificate ended with her grant: an auditor reads it).
    let auditor = lab.user("root-admin", "auditor");
    let commands = wait_until("the commands on record", Duration::from_secs(10), || {
        let execs = Value::from(
            auditor
                .audit(&["--user", "alice", "--kind", "ssh_exec"])
                .ok()?,
        );
        let commands: Vec<String> = execs
            .as_array()?
            .iter()
            .filter_map(|e| e["data"]["command"].as_str().map(str::to_owned))
            .collect();
        commands
            .iter()
            .any(|c| c == "echo before")
            .then_some(commands)
    })
    .unwrap();
    assert!(
        !commands.iter().any(|c| c.contains("echo after")),
        "{commands:?}"
    );
    // Each refusal is in the audit, with its reason.
    refusals_audited(&auditor, &["ssh.session", "ssh.port_forward"], &id);
}

/// A kept connection under standing roles, with sessions allowed to finish
/// (`disconnect_on_expiry: false`), drains when its login ends, as one
/// under a grant does when the grant ends: what runs finishes, and no new
/// shell or command starts on it (a multiplexed `ssh` would otherwise go on
/// past the login without a password).
#[test]
fn after_the_login_ends_a_kept_standing_connection_starts_nothing_new() {
    let lab = Lab::start_full(
        ", disconnect_on_expiry: false",
        "certificates: { login_ttl: 8s }",
    );
    let alice = lab.user("alice", "direct");
    let cfg = ssh_config(&alice);
    let mut kept = KeptConnection::open(&lab, &cfg, "the login lasts");
    // What the master's session is told, as it comes.
    let told = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let told = told.clone();
        let mut err = kept.master.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
                if n == 0 {
                    break;
                }
                told.lock().unwrap().push_str(&text(&buf[..n]));
            }
        })
    };

    wait_until(
        "the drain at the login's end",
        Duration::from_secs(20),
        || {
            told.lock()
                .unwrap()
                .contains("new sessions on this connection are refused")
                .then_some(())
        },
    )
    .unwrap();
    assert!(
        told.lock()
            .unwrap()
            .contains("the login behind this session ended"),
        "{}",
        told.lock().unwrap()
    );
    kept.refused_after(&["the login behind this session ended"]);

    // The running command finishes normally.
    let done = kept.finish();
    reader.join().unwrap();
    assert!(done.status.success(), "{}", told.lock().unwrap());
    assert_eq!(text(&done.stdout).trim(), "finished");
}

/// Stopping wicketd (SIGTERM) ends its live sessions on the record: each
/// writes its `session_ended`, and the events still queued (the command
/// it just ran) are stored before the process exits.
#[test]
fn a_stopping_wicketd_puts_its_sessions_ends_on_the_record() {
    let lab = Lab::start();
    let alice = lab.user("alice", "direct");
    lab.d.add_user("sec", "auditor", PW, false).unwrap();
    let cfg = ssh_config(&alice);
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("never");
    let mut session = ssh(&cfg)
        .arg(lab.dest())
        .arg(format!("echo started; {}", wait_for_file(&never)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(session.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let Lab { d, node, .. } = lab;
    let d = d.restart().unwrap();
    let out = wait_until("the ssh client to end", Duration::from_secs(10), || {
        session.try_wait().unwrap()
    })
    .unwrap();
    assert!(!out.success());
    // The restarted wicketd listens elsewhere: a new login.
    let auditor = WicketCli::logged_in(&d, "sec", PW).unwrap();
    let events = wait_until(
        "the session's end on record",
        Duration::from_secs(10),
        || {
            let events = auditor.audit(&["--user", "alice"]).ok()?;
            events
                .iter()
                .any(|e| e["kind"] == "session_ended")
                .then_some(events)
        },
    )
    .unwrap();
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["kind"] == kind).collect() };
    let ended = of("session_ended");
    assert_eq!(ended.len(), 1, "{events:?}");
    assert!(
        ended[0]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("wicketd is stopping"),
        "{events:?}"
    );
    let execs = of("ssh_exec");
    assert!(
        execs.len() == 1
            && execs[0]["data"]["command"]
                .as_str()
                .unwrap()
                .starts_with("echo started;"),
        "{events:?}"
    );
    drop((d, node));
}

/// Channels the node opens follow the same rule: after the grant ended, a
/// program on the node of a kept session no longer reaches the user's X11
/// display or agent.
#[test]
fn after_the_grant_ends_a_kept_connection_takes_no_channels_from_the_node() {
    let lab = Lab::start_with(", disconnect_on_expiry: false");
    let alice = lab.user("alice", "access");
    let id = lab.grant(&alice, "x11-ok,agent-ok", "6s");
    let cfg = ssh_config(&alice);
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let mut x = FakeXServer::start();
    let agent = TestAgent::start();
    let mut session = x
        .ssh(&cfg)
        .arg("-A")
        .env("SSH_AUTH_SOCK", &agent.sock)
        .arg(lab.dest())
        .arg("bash -s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "{X11_CLIENT}x11\nssh-add -l | grep -o forwarded-key\necho before\n{}\n\
         x11\nssh-add -l | grep -o forwarded-key\necho after\n",
        wait_for_file(&stop)
    );
    session
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let first = x.setup.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(first.protocol, "MIT-MAGIC-COOKIE-1");
    past_expiry(&alice, &id, 600);
    std::fs::write(&stop, b"").unwrap();
    let done = session.wait_with_output().unwrap();
    let (out, err) = (text(&done.stdout), text(&done.stderr));
    assert!(done.status.success(), "{out} {err}");
    assert_eq!(
        out,
        format!("{}forwarded-key\nbefore\nafter\n", FakeXServer::REPLY),
        "{err}"
    );
    assert!(
        x.setup.try_recv().is_err(),
        "the display was reached after expiry"
    );
    // The recording says what was let through, and what was refused and why.
    let auditor = lab.user("root-admin", "auditor");
    let list = recordings_of(&auditor, &id);
    let sid = list[0]["session_id"].as_str().unwrap().to_owned();
    let cast = auditor
        .ok(&["play", &sid, "--format", "cast"])
        .unwrap()
        .stdout;
    let (_, events) = wicket::ssh::parse_cast(&cast).unwrap();
    for what in ["X11 connection from", "agent connection on the node"] {
        let markers: Vec<&str> = events
            .iter()
            .filter(|e| e.code == "m" && e.data.starts_with(what))
            .map(|e| e.data.as_str())
            .collect();
        assert_eq!(markers.len(), 2, "{markers:?}");
        assert!(!markers[0].contains("refused"), "{markers:?}");
        assert!(
            markers[1].contains("refused") && markers[1].contains(&id),
            "{markers:?}"
        );
    }
    // And the audit, with the reason.
    refusals_audited(&auditor, &["ssh.x11", "ssh.agent"], &id);
}

/// A node that opens channels in a loop (here: a program using the
/// forwarded agent until it has been refused 20 times) gets those past the
/// configured rate (`limits.ssh_channel_burst`, `ssh_channels_per_second`)
/// refused: not one audit row each without end. The refusals are counted
/// at the session's end and marked in the recording.
#[test]
fn a_node_opening_channels_in_a_loop_is_held_to_a_rate() {
    let lab = Lab::start_full(
        "",
        "limits: { ssh_channel_burst: 40, ssh_channels_per_second: 1 }",
    );
    let alice = lab.user("alice", "access");
    let id = lab.grant(&alice, "node-admin,agent-ok", "10m");
    let cfg = ssh_config(&alice);
    let agent = TestAgent::start();
    let out = output(
        ssh(&cfg)
            .arg("-A")
            .env("SSH_AUTH_SOCK", &agent.sock)
            .arg(lab.dest())
            .arg(
                "ok=0; no=0; for i in $(seq 5000); do \
                 if ssh-add -l >/dev/null 2>&1; then ok=$((ok+1)); \
                 else no=$((no+1)); [ $no -ge 20 ] && break; fi; done; \
                 echo ok=$ok no=$no",
            ),
    );
    drop(agent);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    let count = |k: &str| -> u64 {
        said.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {said:?}"))
    };
    let (ok, no) = (count("ok"), count("no"));
    // The configured burst, then about one a second while the loop ran.
    assert!((40..100).contains(&ok) && no > 0, "{said}");
    let ended = first_event_of(&alice, "alice", "session_ended");
    assert_eq!(
        ended["data"]["channels_refused"].as_u64(),
        Some(no),
        "{ended}"
    );
    let sid = ended["session_id"].as_str().unwrap();
    let used = alice
        .audit(&["--session", sid, "--kind", "ssh_agent", "--limit", "1000"])
        .unwrap();
    assert_eq!(used.len() as u64, ok);
    let auditor = lab.user("root-admin", "auditor");
    recordings_of(&auditor, &id);
    let cast = auditor
        .ok(&["play", sid, "--format", "cast"])
        .unwrap()
        .stdout;
    let (_, events) = wicket::ssh::parse_cast(&cast).unwrap();
    let marks: Vec<&str> = events
        .iter()
        .filter(|e| {
            e.code == "m"
                && e.data
                    .starts_with("channels opened faster than 1/s (after 40)")
        })
        .map(|e| e.data.as_str())
        .collect();
    assert!(!marks.is_empty() && marks.len() < 5, "{marks:?}");
    assert!(marks[0].ends_with(": 1 so far"), "{marks:?}");
}

/// A live session whose grant and user cannot be re-read from the store
/// (here: the PostgreSQL store is stopped) ends after
/// `session.unverified_grace`: the proxy fails closed.
#[test]
fn sessions_end_when_the_store_cannot_confirm_their_grant() {
    let mut pg = Postgres::builder().start().unwrap();
    pg.create_database("wicket").unwrap();
    let lab = Lab::start_full(
        ", unverified_grace: 2s",
        &format!("storage: {}", pg.url("wicket")),
    );
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    let mut t = Pty::ready(&cfg, &lab.dest());
    let stopped = Instant::now();
    pg.stop();
    t.expect("its store has not answered", Duration::from_secs(15));
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_secs(5),
        "cut {took:?} after the store stopped (grace 2s)"
    );
    assert!(t.text().contains("wicket cannot check"), "{}", t.text());
    wait_until("the ssh client to exit", Duration::from_secs(5), || {
        t.exited().then_some(())
    })
    .unwrap();
}

/// While the store is unreachable, the grant's last known state still ends
/// its sessions at expiry (the grace is longer than the grant here).
#[test]
fn a_grant_read_before_the_store_failed_still_expires_on_time() {
    let mut pg = Postgres::builder().start().unwrap();
    pg.create_database("wicket").unwrap();
    let lab = Lab::start_full(
        ", unverified_grace: 1h",
        &format!("storage: {}", pg.url("wicket")),
    );
    let alice = lab.user("alice", "access");
    let id = lab.grant(&alice, "node-admin", "6s");
    let expires = expires_at(&alice, &id);
    let cfg = ssh_config(&alice);
    let mut t = Pty::ready(&cfg, &lab.dest());
    pg.stop();
    t.expect("expired", Duration::from_secs(15));
    let late = chrono::Utc::now().signed_duration_since(expires);
    assert!(
        late <= chrono::Duration::milliseconds(1500),
        "cut {late:?} after expiry with the store down"
    );
    assert!(!t.text().contains("wicket cannot check"), "{}", t.text());
}

/// SSH connections still authenticating have a share of their own
/// (`limits.max_unauthenticated`, like sshd's MaxStartups) and a deadline
/// (`limits.login_grace`, like LoginGraceTime), wherever they stall.
#[test]
fn unauthenticated_connections_have_a_limited_share_and_a_deadline() {
    use std::net::TcpStream;
    let lab = Lab::start_full("", "limits: { max_unauthenticated: 2, login_grace: 3s }");
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    // One client stops after its version line (in the key exchange), one
    // after the first bytes; the server's version shows each was let in.
    let idle: Vec<(TcpStream, Instant)> = [&b"SSH-2.0-idle\r\n"[..], b"SSH-"]
        .iter()
        .map(|hello| {
            let mut c = TcpStream::connect(lab.ssh_addr).unwrap();
            let admitted = Instant::now();
            c.write_all(hello).unwrap();
            let mut version = [0u8; 14];
            c.read_exact(&mut version).unwrap();
            assert_eq!(&version, b"SSH-2.0-Wicket");
            (c, admitted)
        })
        .collect();
    let out = output(ssh(&cfg).arg("-v").arg(lab.dest()).arg("true"));
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("still authenticating (limits.max_unauthenticated is 2)"),
        "{e}"
    );
    // The login grace closes them.
    // (Past the server's key exchange offer.)
    closed_between(idle, Duration::from_secs(2), Duration::from_secs(10)).unwrap();
    // The API listener too: two connections that never start TLS hold its
    // share (a CLI call is refused meanwhile), and the grace closes them.
    let mut idle: Vec<(TcpStream, Instant)> = (0..2)
        .map(|_| (TcpStream::connect(lab.d.api).unwrap(), Instant::now()))
        .collect();
    let refused = wait_until("the API share to fill", Duration::from_secs(5), || {
        // One refused at once (a CLI connection that had just closed still
        // held its place) is opened again.
        for (c, at) in idle.iter_mut() {
            c.set_nonblocking(true).unwrap();
            let closed = match c.peek(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            c.set_nonblocking(false).unwrap();
            if closed {
                *c = TcpStream::connect(lab.d.api).unwrap();
                *at = Instant::now();
            }
        }
        let out = alice.run(&["ls"], "").unwrap();
        (!out.ok).then_some(out.stderr)
    })
    .unwrap();
    assert!(
        refused.contains("wicketd closed the connection: it may be at its connection limits"),
        "{refused}"
    );
    closed_between(idle, Duration::from_secs(2), Duration::from_secs(10)).unwrap();
    let out = alice.run(&["ls"], "").unwrap();
    assert!(out.ok, "{}", out.stderr);
    // Authenticated connections leave the share: three sessions at once
    // (each echoes a line, so it is up, and is held until its stdin
    // closes), then a fourth still runs.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let mut c = ssh(&cfg)
                .arg(lab.dest())
                .arg("cat")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.as_mut().unwrap().write_all(b"up\n").unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(c.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line, "up\n");
            c
        })
        .collect();
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo fourth"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "fourth");
    for mut c in held {
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success());
    }
}

/// With wicketds sharing a PostgreSQL store (deploy/README.md), a session
/// recorded by one is listed and played through another once it ended,
/// with the same access rules.
#[test]
fn a_recording_made_through_one_wicketd_plays_through_another() {
    let pg = Postgres::builder().start().unwrap();
    pg.create_database("wicket").unwrap();
    let lab = Lab::start_full("", &format!("storage: {}", pg.url("wicket")));
    let d2 = lab.d.twin().unwrap();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo shared-$((40+2))"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "shared-42");

    // An auditor and bob (no audit role) who know only the second wicketd.
    let on_d2 = |name: &str, roles: &str| {
        lab.d.add_user(name, roles, PW, false).unwrap();
        WicketCli::logged_in(&d2, name, PW).unwrap()
    };
    let sec = on_d2("sec", "auditor");
    let bob = on_d2("bob", "access");
    let listed = |cli: &WicketCli| {
        cli.ok(&["recordings", "ls", "--request", &id, "--format", "json"])
            .unwrap()
            .json()
            .unwrap()
    };
    let list = wait_until(
        "the recording to reach the shared store",
        Duration::from_secs(15),
        || {
            let l = listed(&sec);
            (l.as_array().unwrap().len() == 1).then_some(l)
        },
    )
    .unwrap();
    assert_eq!(list[0]["user"], "alice");
    assert!(list[0]["size"].as_u64().unwrap() > 0, "{list}");
    let sid = list[0]["session_id"].as_str().unwrap().to_owned();
    let played = sec.ok(&["play", &sid, "--format", "text"]).unwrap().stdout;
    assert!(played.contains("shared-42"), "{played}");
    // Through the wicketd that recorded it, listed once (file and store).
    assert_eq!(listed(&alice).as_array().unwrap().len(), 1);
    // bob may not see or play alice's session through the second wicketd.
    assert_eq!(listed(&bob).as_array().unwrap().len(), 0);
    let out = bob.run(&["play", &sid, "--format", "text"], "").unwrap();
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("needs a role with `audit: true`"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("shared-42"), "{}", out.stdout);

    // A recording over 64 MiB (a terminal's output is recorded whole),
    // stored in parts of 8 MiB: sent from the store byte for byte as from
    // the recording wicketd's file. (Once, only the recording wicketd
    // played one this large.)
    let out = output(
        ssh(&cfg)
            .arg("-tt")
            .arg(lab.dest())
            .arg("head -c 70000000 /dev/zero | tr '\\0' y; echo; echo big-$((40+2))"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let big = wait_until("the large recording", Duration::from_secs(30), || {
        let l = listed(&sec);
        l.as_array()?
            .iter()
            .find(|r| r["session_id"] != sid.as_str())
            .cloned()
    })
    .unwrap();
    assert!(big["size"].as_u64().unwrap() > 70_000_000, "{big}");
    let big_sid = big["session_id"].as_str().unwrap();
    let from_store = sec
        .ok(&["play", big_sid, "--format", "cast"])
        .unwrap()
        .stdout;
    let from_file = alice
        .ok(&["play", big_sid, "--format", "cast"])
        .unwrap()
        .stdout;
    assert!(from_file.contains("big-42"));
    assert_eq!(from_store.len() as u64, big["size"].as_u64().unwrap());
    assert!(from_store == from_file, "the store's copy differs");

    // A copy the store lost (wicketd stopped right after the session, or
    // the store was down through every try) is made at the next start.
    pg.psql(
        "wicket",
        &format!("DELETE FROM session_recordings WHERE session_id = '{sid}'"),
    )
    .unwrap();
    assert_eq!(listed(&sec).as_array().unwrap().len(), 1);
    let Lab { d, .. } = lab;
    let _d = d.restart().unwrap();
    wait_until(
        "the restarted wicketd to copy the recording again",
        Duration::from_secs(15),
        || (listed(&sec).as_array().unwrap().len() == 2).then_some(()),
    )
    .unwrap();
    let played = sec.ok(&["play", &sid, "--format", "text"]).unwrap().stdout;
    assert!(played.contains("shared-42"), "{played}");
}

/// With `session.recording_retention`, a wicketd deletes the recordings
/// of sessions that ended longer ago than that: its own files and the
/// shared store's copies (here at its start; then every hour). Each
/// deletion is audited, `wicket play` says why it is gone, and newer ones
/// stay.
#[test]
fn recordings_past_their_retention_are_deleted_here_and_from_the_shared_store() {
    let pg = Postgres::builder().start().unwrap();
    pg.create_database("wicket").unwrap();
    let lab = Lab::start_full(
        ", recording_retention: 1h",
        &format!("storage: {}", pg.url("wicket")),
    );
    let d2 = lab.d.twin().unwrap();
    let (_alice, id, cfg) = alice_as_node_admin(&lab);
    for word in ["old", "new"] {
        let out = output(
            ssh(&cfg)
                .arg(lab.dest())
                .arg(format!("echo {word}-$((1+1))")),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    lab.d.add_user("sec", "auditor", PW, false).unwrap();
    let sec = WicketCli::logged_in(&d2, "sec", PW).unwrap();
    let listed = || -> Vec<Value> {
        let v: Value = sec
            .ok(&["recordings", "ls", "--request", &id, "--format", "json"])
            .unwrap()
            .json()
            .unwrap();
        v.as_array().unwrap().clone()
    };
    // Both reach the store (the second wicketd lists them from there).
    let both = wait_until(
        "both recordings in the store",
        Duration::from_secs(15),
        || {
            let l = listed();
            (l.len() == 2).then_some(l)
        },
    )
    .unwrap();
    let play = |sid: &str| sec.run(&["play", sid, "--format", "text"], "").unwrap();
    let sid_of = |word: &str| -> String {
        both.iter()
            .map(|r| r["session_id"].as_str().unwrap().to_owned())
            .find(|sid| play(sid).stdout.contains(&format!("{word}-2")))
            .unwrap()
    };
    let (old, new) = (sid_of("old"), sid_of("new"));

    // The old session started and ended two hours ago, as the file (its
    // header and its last write) and the store say.
    let Lab { mut d, .. } = lab;
    d.stop().unwrap();
    let file = d.data_dir().join("recordings").join(format!("{old}.cast"));
    let cast = std::fs::read_to_string(&file).unwrap();
    let (head, rest) = cast.split_once('\n').unwrap();
    let mut head: Value = serde_json::from_str(head).unwrap();
    let started = head["wicket"]["started"].as_i64().unwrap() - 7200;
    head["wicket"]["started"] = started.into();
    head["timestamp"] = started.into();
    std::fs::write(&file, format!("{head}\n{rest}")).unwrap();
    run(Command::new("touch")
        .arg("-d")
        .arg(format!("@{}", started + 60))
        .arg(&file))
    .unwrap();
    pg.psql(
        "wicket",
        &format!(
            "UPDATE session_recordings SET started = {started}, stored = {} \
             WHERE session_id = '{old}'",
            started + 60
        ),
    )
    .unwrap();
    let d = d.restart().unwrap();

    // The store's copy goes first, then the file here.
    let old_file = d.data_dir().join("recordings").join(format!("{old}.cast"));
    let left = wait_until("the old recording to go", Duration::from_secs(15), || {
        let l = listed();
        (l.len() == 1 && !old_file.exists()).then_some(l)
    })
    .unwrap();
    assert_eq!(left[0]["session_id"].as_str(), Some(new.as_str()));
    assert!(d
        .data_dir()
        .join("recordings")
        .join(format!("{new}.cast"))
        .exists());
    assert!(play(&new).stdout.contains("new-2"));
    let gone = play(&old);
    assert!(!gone.ok);
    assert!(
        gone.stderr
            .contains(&format!("the recording of session {old} was deleted at"))
            && gone.stderr.contains("kept 1h after"),
        "{}",
        gone.stderr
    );
    let events = sec
        .audit(&["--session", &old, "--kind", "recording_deleted"])
        .unwrap();
    let mut from: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["from"].as_str().unwrap())
        .collect();
    from.sort_unstable();
    assert_eq!(from, ["data_dir", "store"], "{events:?}");
    for e in &events {
        assert_eq!(e["actor"], "wicketd", "{e}");
        let e = &e["data"];
        assert_eq!(e["kept_for"], "1h", "{e}");
        assert_eq!(e["user"], "alice", "{e}");
        assert_eq!(e["request_ids"], serde_json::json!([id]), "{e}");
    }
}

/// An SSH client that sends what `ssh` never does: requests on one session
/// channel in an order of its choosing.
struct RawClient;

impl russh::client::Handler for RawClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Only wicketd's host certificate could answer on this loopback port;
        // `ssh` checks it in the other tests.
        Ok(true)
    }
}

/// A [`RawClient`] logged in with `cli`'s key and certificate to the node
/// through the ProxyCommand that `wicket config` writes; and that command's
/// process.
async fn raw_client(
    lab: &Lab,
    cli: &WicketCli,
    config: russh::client::Config,
) -> (tokio::process::Child, russh::client::Handle<RawClient>) {
    let cfg = cli.ok(&["config"]).unwrap().stdout;
    let field = |k: &str| {
        cfg.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {cfg}"))
            .trim()
            .to_owned()
    };
    let proxy = field("ProxyCommand ").replace("%h:%p", "node-1.wicket:22");
    let key = field("IdentityFile ").trim_matches('"').to_owned();
    let cert = field("CertificateFile ").trim_matches('"').to_owned();
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &format!("exec {proxy}")])
        .env("WICKET_HOME", cli.home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stream = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let mut h = russh::client::connect_stream(std::sync::Arc::new(config), stream, RawClient)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(&key, None).unwrap();
    let cert = russh::keys::load_openssh_certificate(&cert).unwrap();
    let auth = h
        .authenticate_openssh_cert(lab.login.clone(), std::sync::Arc::new(key), cert)
        .await
        .unwrap();
    assert!(auth.success(), "certificate login: {auth:?}");
    (child, h)
}

/// Whether the server answered the last request with success (`None`: the
/// channel closed first).
async fn reply(ch: &mut russh::Channel<russh::client::Msg>) -> Option<bool> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ch.wait()).await {
            Ok(Some(russh::ChannelMsg::Success)) => return Some(true),
            Ok(Some(russh::ChannelMsg::Failure)) => return Some(false),
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(_) => panic!("no answer to a channel request within 20s"),
        }
    }
}

/// A channel runs one shell, command or subsystem. A second request on it is
/// refused by wicketd, even after the node refused the first: a refused
/// `subsystem` (recorded as a marker only, like sftp) followed by `shell`
/// once ran a shell whose output nobody recorded.
#[test]
fn a_channel_runs_one_thing_and_its_recording_follows_it() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    let admin = lab.user("sec", "auditor");
    let id = lab.grant(&alice, "node-admin", "10m");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (first, second, output) = rt.block_on(async {
        let (mut child, h) = raw_client(&lab, &alice, russh::client::Config::default()).await;
        // The node has no such subsystem; the shell after it is refused.
        let mut ch = h.channel_open_session().await.unwrap();
        ch.request_subsystem(true, "no-such-subsystem")
            .await
            .unwrap();
        let first = reply(&mut ch).await;
        if first == Some(true) {
            // Accepted: wicketd may have denied the connection and be
            // about to say why on this channel; show it.
            let mut said = Vec::new();
            while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), ch.wait()).await
            {
                if let russh::ChannelMsg::ExtendedData { data, .. }
                | russh::ChannelMsg::Data { data } = msg
                {
                    said.extend_from_slice(&data);
                }
            }
            panic!(
                "the subsystem was accepted; the channel said: {:?}",
                String::from_utf8_lossy(&said)
            );
        }
        ch.request_shell(true).await.unwrap();
        let second = reply(&mut ch).await;
        // Asked again and again, as a client flooding the audit would: each
        // is refused, but only so many are audited.
        for _ in 0..AGAIN {
            ch.request_shell(true).await.unwrap();
            assert_eq!(reply(&mut ch).await, Some(false));
        }
        drop(ch);
        // A new channel runs its command as usual, and it is recorded. An
        // agent request the role refuses first: audited, though shells
        // were refused past the rate (each kind has its own).
        let mut ch = h.channel_open_session().await.unwrap();
        ch.agent_forward(true).await.unwrap();
        assert_eq!(reply(&mut ch).await, Some(false));
        ch.exec(true, "echo recorded-$((6*7))").await.unwrap();
        let mut output = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), ch.wait()).await {
            match msg {
                russh::ChannelMsg::Data { data } => output.extend_from_slice(&data),
                russh::ChannelMsg::Eof | russh::ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = h
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        let _ = child.wait().await;
        (first, second, String::from_utf8_lossy(&output).into_owned())
    });
    assert_eq!(first, Some(false), "the node has no such subsystem");
    assert_eq!(
        second,
        Some(false),
        "a second request on the channel is refused"
    );
    assert!(output.contains("recorded-42"), "{output:?}");
    let sid = recordings_of(&admin, &id)[0]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let played = admin
        .ok(&["play", &sid, "--format", "text"])
        .unwrap()
        .stdout;
    assert!(played.contains("recorded-42"), "{played}");
    let cast = admin
        .ok(&["play", &sid, "--format", "cast"])
        .unwrap()
        .stdout;
    let (_, events) = wicket::ssh::parse_cast(&cast).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.code == "m" && e.data.starts_with("shell refused")),
        "{cast}"
    );
    // Each refusal audited is stored under the session (so a search by
    // session or request finds it); past the first hundred, they are
    // counted at its end.
    let ended = first_event_of(&alice, "alice", "session_ended");
    let unrecorded = ended["data"]["refusals_unrecorded"].as_u64().unwrap_or(0);
    let denied = admin
        .audit(&[
            "--session",
            &sid,
            "--kind",
            "access_denied",
            "--limit",
            "1000",
        ])
        .unwrap();
    assert!(
        denied.iter().all(|e| e["request_id"] == id.as_str()),
        "{denied:?}"
    );
    let (shells, others): (Vec<_>, Vec<_>) = denied
        .iter()
        .partition(|e| e["data"]["action"] == "ssh.shell");
    assert!(
        shells.iter().all(|e| e["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("already asked for a shell")),
        "{shells:?}"
    );
    assert!(
        others.len() == 1 && others[0]["data"]["action"] == "ssh.agent_forwarding",
        "{others:?}"
    );
    assert_eq!(shells.len() as u64 + unrecorded, AGAIN + 1, "{ended}");
    // 100 at once, then 2 a second while the client asked.
    assert!(
        (100..=130).contains(&shells.len()) && unrecorded >= 20,
        "{} audited, {unrecorded} counted",
        shells.len()
    );
    assert!(
        cast.contains("ssh.shell refusals past 2/s (after 100) are counted"),
        "{cast}"
    );
}

/// How many more times [`a_channel_runs_one_thing_and_its_recording_follows_it`]
/// asks for a shell on a channel that ran one.
const AGAIN: u64 = 150;

/// Bytes wicketd has written to the sockets of its listener on `port` that
/// their peers have not yet read (`/proc/net/tcp*`), counting only sockets
/// a process still holds open (a closed one keeps its unsent bytes queued
/// in the kernel for a while, with inode 0).
fn unread_bytes_from(port: u16) -> u64 {
    let mut total = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            if u16::from_str_radix(local_port, 16).unwrap() == port && f[9] != "0" {
                let tx = f[4].split(':').next().unwrap();
                total += u64::from_str_radix(tx, 16).unwrap();
            }
        }
    }
    total
}

/// Whether a `cat /dev/zero` runs on this machine (the node's command).
fn running_cat_dev_zero() -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"cat\0/dev/zero\0"))
}

/// A client that stops reading (a hung terminal, a stopped process) cannot
/// hold a session open past its grant: once the session is ended, a
/// connection that has not closed within moments is dropped.
#[test]
fn a_client_that_stops_reading_is_still_cut_at_revoke() {
    let lab = Lab::start();
    let alice = lab.user("alice", "access");
    let admin = lab.user("sec", "auditor");
    let id = lab.grant(&alice, "node-admin", "10m");
    let ended = || {
        admin
            .audit(&["--request", &id, "--kind", "session_ended"])
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (took, reason) = rt.block_on(async {
        // A window this large lets the node's output fill every buffer on
        // the way to the client.
        let config = russh::client::Config {
            window_size: 64 << 20,
            ..Default::default()
        };
        let (mut child, h) = raw_client(&lab, &alice, config).await;
        let mut ch = h.channel_open_session().await.unwrap();
        ch.exec(true, "cat /dev/zero").await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), ch.wait()).await {
                Ok(Some(russh::ChannelMsg::Data { .. })) => break,
                Ok(Some(_)) => continue,
                other => panic!("no output from the node: {other:?}"),
            }
        }
        // The ProxyCommand stops: nothing reads wicketd's socket any more.
        let pid = child.id().unwrap().to_string();
        run(Command::new("kill").args(["-STOP", &pid])).unwrap();
        wait_until(
            "wicketd's writes to the client to back up",
            Duration::from_secs(20),
            || (unread_bytes_from(lab.ssh_addr.port()) > 256 * 1024).then_some(()),
        )
        .unwrap();
        admin
            .ok(&["request", "revoke", &id, "--reason", "incident over"])
            .unwrap();
        let revoked = Instant::now();
        let events = wait_until("the session to end", Duration::from_secs(10), || {
            let e = ended();
            (!e.is_empty()).then_some(e)
        })
        .unwrap();
        let took = revoked.elapsed();
        // Not just on the record: wicketd let go of the socket, and the
        // command on the node is gone (while the client is still stopped).
        wait_until("wicketd to drop the socket", Duration::from_secs(5), || {
            (unread_bytes_from(lab.ssh_addr.port()) == 0).then_some(())
        })
        .unwrap();
        wait_until("the node's command to end", Duration::from_secs(5), || {
            (!running_cat_dev_zero()).then_some(())
        })
        .unwrap();
        run(Command::new("kill").args(["-CONT", &pid])).unwrap();
        let _ = child.kill().await;
        drop(h);
        (took, events[0]["data"]["reason"].to_string())
    });
    assert!(
        took <= Duration::from_secs(2),
        "the session ended {took:?} after the revoke"
    );
    assert!(reason.contains("revoked"), "{reason}");
}

/// A command's output without a terminal is recorded up to 1 MiB: the
/// recording marks where it stops, and the session's end says how much
/// was not recorded.
#[test]
fn a_commands_output_past_its_cap_is_counted_at_the_sessions_end() {
    let lab = Lab::start();
    let (alice, id, cfg) = alice_as_node_admin(&lab);
    let out = output(
        ssh(&cfg)
            .arg(lab.dest())
            .arg("head -c 1500000 /dev/zero | tr '\\0' y"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 1_500_000);
    let ended = first_event_of(&alice, "alice", "session_ended");
    assert_eq!(
        ended["data"]["unrecorded_bytes"].as_u64(),
        Some(1_500_000 - (1 << 20)),
        "{ended}"
    );
    assert!(ended["data"].get("recording_stopped").is_none(), "{ended}");
    // The client closed its socket at the end without a goodbye: that is
    // a close, not an error.
    assert_eq!(ended["data"]["reason"], "connection closed", "{ended}");
    let sid = ended["session_id"].as_str().unwrap();
    let auditor = lab.user("sec", "auditor");
    recordings_of(&auditor, &id);
    let cast = auditor
        .ok(&["play", sid, "--format", "cast"])
        .unwrap()
        .stdout;
    assert!(
        cast.contains("output beyond 1048576 bytes of this command is not recorded"),
        "{:?}",
        cast.lines()
            .filter(|l| l.contains("\"m\""))
            .collect::<Vec<_>>()
    );
}

/// A recording that cannot go on (here: past `max_recording_bytes`) ends
/// its session, and output past that point never reaches the user; with
/// `on_recording_failure: continue` the session goes on unrecorded from
/// there. A session whose recording cannot even be made is refused. Input
/// typed into a shell without a terminal is recorded too.
#[test]
fn a_recording_that_cannot_go_on_ends_its_session_unless_configured_otherwise() {
    let command = "head -c 300000 /dev/zero | tr '\\0' x; echo; echo after-$((6*7))";
    for strict in [true, false] {
        let lab = Lab::start_with(if strict {
            ", max_recording_bytes: 65536, record_input: true"
        } else {
            ", max_recording_bytes: 65536, on_recording_failure: continue"
        });
        let alice = lab.user("alice", "access");
        let admin = lab.user("sec", "auditor");
        let id = lab.grant(&alice, "node-admin", "10m");
        let cfg = ssh_config(&alice);
        if strict {
            // A shell, and a command, without a terminal: what is typed
            // goes on the record.
            let dest = lab.dest();
            for (args, typed, shown) in [
                (
                    vec!["-T", dest.as_str()],
                    "echo typed-$((2*3))\n",
                    "typed-6",
                ),
                (
                    vec![dest.as_str(), "bash"],
                    "echo exec-typed-$((3*3))\n",
                    "exec-typed-9",
                ),
            ] {
                let out = pipe_stdin(ssh(&cfg).args(args), typed).unwrap();
                assert!(text(&out.stdout).contains(shown), "{}", text(&out.stderr));
            }
        }
        let out = output(ssh(&cfg).arg(lab.dest()).arg(command));
        let stdout = text(&out.stdout);
        // Both sessions' ends are on record (the second's names the limit).
        let ended = wait_until("the sessions' ends", Duration::from_secs(20), || {
            let v = admin
                .audit(&["--request", &id, "--kind", "session_ended"])
                .unwrap();
            (v.len() == 1 + 2 * usize::from(strict)).then(|| Value::from(v).to_string())
        })
        .unwrap();
        if strict {
            assert!(!out.status.success());
            assert!(!stdout.contains("after-42"), "{}", stdout.len());
            assert!(stdout.len() < 100_000, "{}", stdout.len());
            assert!(
                text(&out.stderr).contains("reached its limit of 65536 bytes"),
                "{}",
                text(&out.stderr)
            );
            assert!(
                ended.contains("reached its limit of 65536 bytes"),
                "{ended}"
            );
        } else {
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(stdout.contains("after-42") && stdout.len() > 300_000);
            // It ended as it would have; its end says the recording stopped.
            let ended: Value = serde_json::from_str(&ended).unwrap();
            let data = &ended[0]["data"];
            assert_eq!(data["reason"], "connection closed", "{ended}");
            assert!(
                data["recording_stopped"]
                    .as_str()
                    .is_some_and(|s| s.contains("reached its limit of 65536 bytes")),
                "{ended}"
            );
        }
        // The recording ends with a marker saying why it stopped.
        let cast: Vec<String> =
            wait_until("the recording's marker", Duration::from_secs(20), || {
                let list = recordings_of(&admin, &id);
                let cast: Vec<String> = list
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let sid = r["session_id"].as_str().unwrap();
                        admin.ok(&["play", sid, "--format", "cast"]).unwrap().stdout
                    })
                    .collect();
                cast.concat()
                    .contains("nothing more is recorded")
                    .then_some(cast)
            })
            .unwrap();
        assert!(cast.iter().all(|c| c.len() < 65536 + 4096));
        if strict {
            let typed = cast
                .iter()
                .flat_map(|c| wicket::ssh::parse_cast(c).unwrap().1)
                .filter(|e| e.code == "i")
                .map(|e| e.data)
                .collect::<String>();
            assert!(typed.contains("echo typed-$((2*3))"), "{typed:?}");
            assert!(typed.contains("echo exec-typed-$((3*3))"), "{typed:?}");
            // A recording that cannot be made: the session is refused.
            let dir = lab.d.data_dir().join("recordings");
            std::fs::remove_dir_all(&dir).unwrap();
            std::fs::write(&dir, "not a directory").unwrap();
            let out = output(ssh(&cfg).arg(lab.dest()).arg("echo ran"));
            assert!(!out.status.success() && !text(&out.stdout).contains("ran"));
            // (OpenSSH exits at the refusal, before printing the line
            // wicketd sends with it: the audit has the reason.)
            wait_until("the refusal's audit", Duration::from_secs(20), || {
                Value::from(admin.audit(&["--kind", "access_denied"]).unwrap())
                    .to_string()
                    .contains("the session recording cannot be made")
                    .then_some(())
            })
            .unwrap();
        }
    }
}

/// A pinned host key is the node's only key: the node's valid host
/// certificate from Wicket's CA does not stand in for it.
#[test]
fn a_pinned_host_key_is_the_only_one_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other))
    .unwrap();
    let pin = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let pin: Vec<&str> = pin.split_whitespace().take(2).collect();
    let lab = Lab::start_node("", "", &format!(", host_key: \"{}\"", pin.join(" ")));
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo reached"));
    failed_with(&out, "does not match the pinned host_key", "reached");
}

/// With `limits.max_connections_per_user: 1`, a user's second connection
/// is not let in while the first is open; the first closing frees it.
#[test]
fn a_user_holds_at_most_their_share_of_connections() {
    let lab = Lab::start_full(
        "",
        "limits: { max_connections_per_user: 1, login_grace: 5s }",
    );
    let alice = lab.user("alice", "access");
    lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    let mut first = ssh(&cfg)
        .arg(lab.dest())
        .arg("echo started; sleep 30")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = [0u8; 8];
    first
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"started\n");
    let out = output(ssh(&cfg).arg(lab.dest()).arg("echo second"));
    failed_with(&out, "Permission denied", "second");
    first.kill().unwrap();
    first.wait().unwrap();
    wait_until("the place to free up", Duration::from_secs(10), || {
        let out = output(ssh(&cfg).arg(lab.dest()).arg("echo second"));
        text(&out.stdout).contains("second").then_some(())
    })
    .unwrap();
}

/// A node port another server took first is reported as such (the harness
/// then starts again elsewhere), not mistaken for the node listening.
#[test]
fn a_node_port_taken_first_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ca");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key))
    .unwrap();
    let ca = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let e = Sshd::builder()
        .port(port)
        .trust_user_ca(ca.trim())
        .start_plain()
        .unwrap_err();
    assert!(e.is::<PortInUse>(), "{e:#}");
    drop(taken);
}

/// A client that stops taking a response (`limits.send_timeout`, like
/// nginx's `send_timeout`) is let go: its download ends. `wicket play`
/// takes the whole recording before it shows it, so a reader that pauses
/// (a pager, a slow pipe) still gets all of it.
#[test]
fn a_download_its_client_stops_taking_ends_but_wicket_play_keeps_all() {
    let lab = Lab::start_full("", "limits: { send_timeout: 1s }");
    let alice = lab.user("alice", "access");
    let sec = lab.user("sec", "auditor");
    let id = lab.grant(&alice, "node-admin", "10m");
    let cfg = ssh_config(&alice);
    // More than the sockets between them hold.
    let out = output(
        ssh(&cfg)
            .arg("-tt")
            .arg(lab.dest())
            .arg("head -c 24000000 /dev/zero | tr '\\0' y; echo; echo big-$((40+2))"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = recordings_of(&sec, &id);
    let sid = list[0]["session_id"].as_str().unwrap().to_owned();
    let size = list[0]["size"].as_u64().unwrap();
    assert!(size > 24_000_000, "{list}");
    // Both start and neither is read from until the server has let one
    // client go.
    let held = |mut c: Command| {
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut curl = sec.curl().unwrap();
    curl.arg(format!("https://{}/v1/recordings/{sid}", lab.d.proxy()));
    let curl = held(curl);
    let mut play = sec.cmd().unwrap();
    play.args(["play", &sid, "--format", "cast"]);
    let play = held(play);
    let line = "API connection ended: the client took nothing for 1s (limits.send_timeout)";
    wait_until(
        "wicketd to let the stalled client go",
        Duration::from_secs(30),
        || lab.d.stderr().contains(line).then_some(()),
    )
    .unwrap();
    let curl = curl.wait_with_output().unwrap();
    assert!(!curl.status.success(), "curl got all of it");
    assert!(
        (curl.stdout.len() as u64) < size,
        "{} of {size} bytes",
        curl.stdout.len()
    );
    let play = play.wait_with_output().unwrap();
    assert!(play.status.success(), "{}", text(&play.stderr));
    assert_eq!(play.stdout.len() as u64, size);
    assert!(text(&play.stdout).contains("big-42"));
}

/// The first MiB a command writes, read within 20 s (a stalled connection
/// hangs its clients); the command is killed then.
fn first_mib_within(what: &str, cmd: &mut Command) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut got = vec![0u8; 1 << 20];
        let _ = tx.send(stdout.read_exact(&mut got).map(|_| got));
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    match got {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what} within 20 s"),
    }
}

/// A lab and a kept connection of bob's (whose profile it uses), granted
/// node-admin.
fn kept_connection_of_an_admin() -> (Lab, WicketCli, KeptConnection) {
    let lab = Lab::start();
    let bob = lab.user("bob", "access");
    lab.grant(&bob, "node-admin", "10m");
    let cfg = ssh_config(&bob);
    let kept = KeptConnection::open(&lab, &cfg, "nothing else runs");
    (lab, bob, kept)
}

/// A new session on `kept` runs, and its first MiB of output comes.
fn a_new_session_prints_a_mib(kept: &KeptConnection) {
    let got = first_mib_within(
        "a new session's output",
        kept.client()
            .arg(&kept.dest)
            .arg("yes after | head -c 1048576"),
    );
    assert!(got.starts_with(b"after\nafter\n"));
}

/// A warning said while one session's client takes nothing (its channel's
/// window used up) reaches the other sessions, and that client given up
/// leaves the connection working. Before, the line written past the
/// window stayed queued in russh, which then sent nothing more on the
/// connection, and kept it queued after the channel closed.
#[test]
fn a_warning_while_a_session_takes_nothing_leaves_the_connection_working() {
    // Warned 40 s into a 10 minute grant.
    let lab = Lab::start_session("expiry_warning: 560s", "", "");
    let bob = lab.user("bob", "access");
    let granted = Instant::now();
    lab.grant(&bob, "node-admin", "10m");
    let cfg = ssh_config(&bob);
    let kept = KeptConnection::open(&lab, &cfg, "nothing else runs");
    // Its output is never read.
    let mut stuck = kept
        .client()
        .arg(&kept.dest)
        .arg("cat /dev/zero")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut idle = kept
        .client()
        .arg(&kept.dest)
        .arg("sleep 120")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let set_up = granted.elapsed();
    assert!(
        set_up < Duration::from_secs(30),
        "set up in {set_up:?}: too late for the warning"
    );
    let mut err = idle.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if text(&seen).contains("wicket: ") {
                let _ = tx.send(text(&seen));
                break;
            }
        }
    });
    let warned = rx.recv_timeout(Duration::from_secs(60));
    let _ = stuck.kill();
    let _ = stuck.wait();
    let warned = warned.expect("the warning reaches a session that reads");
    assert!(warned.contains("will be closed then"), "{warned}");
    a_new_session_prints_a_mib(&kept);
    let _ = idle.kill();
    let _ = idle.wait();
    let _ = kept.finish();
}

/// A user who closes a forwarded connection while its far end still sends
/// (a download given up) leaves the SSH connection working: a new session
/// and new forwards on it carry data. Before, the proxy kept waiting to
/// write to the closed channel while the node's data for it filled its
/// queue, which stopped every read on the connection.
#[test]
fn a_forward_closed_while_its_far_end_sends_leaves_the_connection_working() {
    use std::net::TcpStream;
    let (_lab, _bob, kept) = kept_connection_of_an_admin();
    // What the forwards reach: a listener that sends to each connection
    // until its client goes away.
    let target_port = forward_target(|mut c| {
        let chunk = vec![b'x'; 64 << 10];
        while c.write_all(&chunk).is_ok() {}
    });
    let local = free_port().unwrap();
    run(kept
        .client()
        .args(["-O", "forward", "-L"])
        .arg(format!("127.0.0.1:{local}:127.0.0.1:{target_port}"))
        .arg(&kept.dest)
        .stdin(Stdio::null()))
    .unwrap();
    let local_addr: SocketAddr = ([127, 0, 0, 1], local).into();
    let read_some = |c: &mut TcpStream, n: usize| {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = vec![0u8; n];
        c.read_exact(&mut got).map(|_| got)
    };
    let mut first = wait_until("the forward", Duration::from_secs(20), || {
        TcpStream::connect(local_addr).ok()
    })
    .unwrap();
    read_some(&mut first, 1 << 20).unwrap();
    // Given up mid-stream; a new session at once.
    drop(first);
    a_new_session_prints_a_mib(&kept);
    // Forwards given up one after another, while data flows.
    for _ in 0..8 {
        let mut c = TcpStream::connect(local_addr).unwrap();
        read_some(&mut c, 256 << 10).unwrap();
    }
    let mut last = TcpStream::connect(local_addr).unwrap();
    let got = read_some(&mut last, 8 << 20).expect("a new forward carries its data");
    assert!(got.iter().all(|&b| b == b'x'));
    drop(last);
    let _ = kept.finish();
}

/// A multiplexed session given up while its command still writes (its
/// client killed) leaves the connection working: a new session on it runs.
#[test]
fn a_session_given_up_while_its_command_writes_leaves_the_connection_working() {
    let (_lab, _bob, kept) = kept_connection_of_an_admin();
    for _ in 0..4 {
        let got = first_mib_within(
            "a MiB of output",
            kept.client().arg(&kept.dest).arg("cat /dev/zero"),
        );
        assert!(got.iter().all(|&b| b == 0));
    }
    a_new_session_prints_a_mib(&kept);
    let _ = kept.finish();
}

/// A user still sending to a command that has ended (the node closed its
/// channel) leaves the connection working: a new session on it runs.
/// Before, the proxy kept waiting to write to the closed channel, and the
/// user's data behind that write stopped every read on the connection.
#[test]
fn input_to_a_command_that_ended_leaves_the_connection_working() {
    let (_lab, _bob, kept) = kept_connection_of_an_admin();
    for _ in 0..4 {
        let mut c = kept
            .client()
            .arg(&kept.dest)
            .arg("head -c 1000000 >/dev/null")
            .stdin(std::fs::File::open("/dev/zero").unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let ended = wait_until("the client to end", Duration::from_secs(20), || {
            c.try_wait().unwrap()
        });
        let _ = c.kill();
        let _ = c.wait();
        ended.unwrap();
    }
    a_new_session_prints_a_mib(&kept);
    let _ = kept.finish();
}
