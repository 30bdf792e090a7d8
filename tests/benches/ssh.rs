//! `bench/ssh`: one stock sshd node, reached side by side in one run on one
//! machine (a) directly, (b) through an OpenSSH jump host (`ssh -J` through a
//! second stock sshd), (c) through wicketd with recording on. Figures: bulk
//! throughput (`head -c N /dev/zero` on the node, counted by the client),
//! connection setup (`ssh NODE true`, mean), and wicketd's resident memory
//! per idle session with `BENCH_IDLE` sessions open. Prints the ratios last.
//!
//! `BENCH_BYTES` (default 1 GiB), `BENCH_CONNS` (default 20), `BENCH_IDLE`
//! (default 200). All clients use the same cipher (aes128-gcm).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wicket_e2e::harness_sshd::{test_login, Sshd};
use wicket_e2e::harness_util::free_port;
use wicket_e2e::harness_wicket::{WicketCli, Wicketd};

const CIPHER: &str = "aes128-gcm@openssh.com";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ssh(cfg: &Path, host: &str) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(cfg)
        .args([
            "-o",
            "BatchMode=yes",
            "-c",
            CIPHER,
            "-o",
            "ControlMaster=no",
        ])
        .arg(host);
    c
}

/// Bytes per second reading `bytes` zeros from the node.
fn throughput(cfg: &Path, host: &str, bytes: u64) -> f64 {
    let start = Instant::now();
    let mut child = ssh(cfg, host)
        .arg(format!("head -c {bytes} /dev/zero"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let r = out.read(&mut buf).unwrap();
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    assert!(child.wait().unwrap().success(), "{host}");
    assert_eq!(n, bytes, "{host}: short read");
    n as f64 / start.elapsed().as_secs_f64()
}

/// Mean seconds for `ssh HOST true`.
fn setup(cfg: &Path, host: &str, n: u64) -> f64 {
    // One warm-up connection.
    assert!(ssh(cfg, host).arg("true").status().unwrap().success());
    let start = Instant::now();
    for _ in 0..n {
        let st = ssh(cfg, host)
            .arg("true")
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{host}");
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Opens `n` idle sessions through wicketd; returns the clients.
fn idle_sessions(cfg: &Path, host: &str, n: u64) -> Vec<Child> {
    let mut children = Vec::new();
    for batch in 0..n.div_ceil(20) {
        let mut waiting = Vec::new();
        for _ in 0..20.min(n - batch * 20) {
            let mut c = ssh(cfg, host)
                .arg("echo ready; exec sleep 3600")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let out = c.stdout.take().unwrap();
            waiting.push((c, out));
        }
        for (c, out) in waiting {
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready");
            children.push(c);
        }
    }
    children
}

fn main() {
    let bytes = env_num("BENCH_BYTES", 1 << 30);
    let conns = env_num("BENCH_CONNS", 20);
    let idle = env_num("BENCH_IDLE", 200);
    let login = test_login();
    let node_port = free_port().unwrap();
    let yaml = format!(
        r#"
version: 1
listen: {{ ssh: "127.0.0.1:0" }}
# {idle} idle sessions of one user, more than the default 100 connections.
limits: {{ max_connections_per_user: 1000 }}
roles:
  bench:
    logins: [ {login} ]
    nodes: {{ env: bench }}
resources:
  nodes:
    - {{ name: node-1, address: "127.0.0.1:{node_port}", labels: {{ env: bench }} }}
"#
    );
    let d = Wicketd::builder().config(yaml).start().unwrap();
    let node = Sshd::builder()
        .port(node_port)
        .node("node-1")
        .start(&d)
        .unwrap();
    d.add_user("bench", "bench", "bench password 1", false)
        .unwrap();
    let cli = WicketCli::new().unwrap();
    assert!(cli.login(&d, "bench", "bench password 1", &[]).unwrap().ok);
    let st = cli.status().unwrap();
    let file = |k: &str| PathBuf::from(st["files"][k].as_str().unwrap());
    // (a) and (b) log in with the user's own certificate, which nodes do not
    // trust in production (only the proxy's node-login CA): for the
    // benchmark the node and the jump host also trust the user CA.
    let user_ca = std::fs::read_to_string(d.data_dir().join("ca/ssh_user_ca.pub")).unwrap();
    let node_ca_file = node.dir.path().join("wicket_node_ca.pub");
    let node_ca = std::fs::read_to_string(&node_ca_file).unwrap();
    std::fs::write(
        &node_ca_file,
        format!("{}\n{}\n", node_ca.trim(), user_ca.trim()),
    )
    .unwrap();
    let jump = Sshd::builder()
        .trust_user_ca(user_ca.trim())
        .start_plain()
        .unwrap();

    // (a) and (b) in one ssh_config; (c) is `wicket config`'s block. (a)
    // and (b) know the node by the nodes' host CA, which users' profiles do
    // not trust (only the proxy's).
    let dir = tempfile::tempdir().unwrap();
    let node_hosts = dir.path().join("node_known_hosts");
    let host_ca = std::fs::read_to_string(d.data_dir().join("ca/ssh_host_ca.pub")).unwrap();
    std::fs::write(
        &node_hosts,
        format!("@cert-authority * {}\n", host_ca.trim()),
    )
    .unwrap();
    let common = format!(
        "    User {login}\n    IdentityFile {}\n    CertificateFile {}\n    IdentitiesOnly yes\n",
        file("ssh_key").display(),
        file("ssh_certificate").display()
    );
    let cfg = dir.path().join("ssh_config");
    let wicket_block = cli.ok(&["config"]).unwrap().stdout;
    std::fs::write(
        &cfg,
        format!(
            "Host node-direct node-via-jump\n    HostName 127.0.0.1\n    Port {node_port}\n{common}\
             \x20   HostKeyAlias node-1\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n\
             Host node-via-jump\n    ProxyJump jump\n\
             Host jump\n    HostName 127.0.0.1\n    Port {}\n{common}\
             \x20   UserKnownHostsFile /dev/null\n    StrictHostKeyChecking no\n    LogLevel ERROR\n\
             {wicket_block}",
            node_hosts.display(),
            jump.port()
        ),
    )
    .unwrap();
    let wicket_host = format!("{login}@node-1.wicket");
    let hosts = [
        ("(a) direct", "node-direct".to_owned()),
        ("(b) ssh -J jump host", "node-via-jump".to_owned()),
        ("(c) wicketd (recording on)", wicket_host.clone()),
    ];

    println!(
        "bench/ssh: {} MiB of zeros, {conns} connections, {idle} idle sessions; cipher {CIPHER}",
        bytes >> 20
    );
    let mut tput = Vec::new();
    let mut setups = Vec::new();
    for (label, host) in &hosts {
        // Best of two, so one cold run does not decide.
        let t = throughput(&cfg, host, bytes).max(throughput(&cfg, host, bytes));
        println!("{label:<28} throughput {:>8.1} MiB/s", t / (1 << 20) as f64);
        tput.push(t);
    }
    for (label, host) in &hosts {
        let s = setup(&cfg, host, conns);
        println!("{label:<28} setup      {:>8.1} ms", s * 1000.0);
        setups.push(s);
    }

    let pid = d.pid().unwrap();
    let before = rss_kib(pid);
    let start = Instant::now();
    let mut children = idle_sessions(&cfg, &wicket_host, idle);
    // Let allocations settle.
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    let per = (after.saturating_sub(before)) as f64 / idle as f64;
    println!(
        "(c) wicketd RSS: {} KiB before, {} KiB with {idle} idle sessions (opened in {:.1} s): {:.0} KiB per session",
        before,
        after,
        start.elapsed().as_secs_f64(),
        per
    );
    for c in &mut children {
        let _ = c.kill();
    }
    for c in &mut children {
        let _ = c.wait();
    }
    let recordings = d.data_dir().join("recordings");
    let count = std::fs::read_dir(&recordings)
        .map(|r| r.count())
        .unwrap_or(0);
    println!("recordings written: {count}");

    println!("--- ratios ---");
    println!(
        "throughput (c)/(b) = {:.2}  (target >= 1.0)",
        tput[2] / tput[1]
    );
    println!(
        "setup      (c)/(b) = {:.2}  (target <= 1.0)",
        setups[2] / setups[1]
    );
    println!(
        "memory per idle session = {:.2} MiB  (target <= 1 MiB)",
        per / 1024.0
    );
}
