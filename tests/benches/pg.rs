//! `bench/pg`: pgbench select-only, 8 clients, side by side in one run on one
//! machine: (a) directly to PostgreSQL over TLS, (b) through pgbouncer in
//! session mode (TLS to the server), (c) through `wicket proxy db --tunnel`
//! and wicketd with statement audit on; then connection rate (`pgbench -C`)
//! for (a) and (c). Also (d), a reference: two pgbouncers in a row with TLS
//! between them, the two-process shape of (c) without audit. Prints the
//! figures, then the ratios last.
//!
//! `BENCH_SECS` sets each run's length (default 20). `BENCH_ONLY=c` (any of
//! `a`, `b`, `c`, `d`) runs only those TPS measurements, for profiling one leg;
//! ratios are printed only for a full run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[allow(dead_code)]
#[path = "../e2e/pg_setup.rs"]
mod pg_setup;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;
use wicket_e2e::harness_util::{free_port, wait_for_port};

/// A pgbench run's transactions (or connections) per second.
fn pgbench(port: u16, user: &str, sslmode: &str, args: &[&str]) -> f64 {
    let text = pg_setup::pgbench(port, user, sslmode, args);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tps in: {text}"))
}

struct Pgbouncer {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pgbouncer in session mode in front of `pg`, as an unprivileged OS user
/// when running as root (it refuses root).
/// With `client_tls`, clients must use TLS (a throwaway self-signed
/// certificate).
fn pgbouncer(pg: SocketAddr, server_tls: bool, client_tls: bool) -> Pgbouncer {
    let dir = tempfile::Builder::new()
        .prefix("wicket-pgbouncer-")
        .tempdir_in("/tmp")
        .unwrap();
    let port = free_port().unwrap();
    let ini = dir.path().join("pgbouncer.ini");
    let client_tls = if client_tls {
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(made.status.success(), "openssl req: {made:?}");
        format!(
            "client_tls_sslmode = require\nclient_tls_key_file = {}\nclient_tls_cert_file = {}\n",
            key.display(),
            cert.display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &ini,
        format!(
            "[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\n\
             pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 40\n\
             server_tls_sslmode = {tls}\nunix_socket_dir =\n\
             {client_tls}logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
            pg_port = pg.port(),
            tls = if server_tls { "require" } else { "disable" },
            d = dir.path().display()
        ),
    )
    .unwrap();
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let mut cmd = if root {
        let user = ["postgres", "wicket-test"]
            .into_iter()
            .find(|u| {
                Command::new("id")
                    .arg(u)
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("an unprivileged OS user for pgbouncer");
        Command::new("chown")
            .args(["-R", &format!("{user}:"), dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        // `-u` switches user itself, so the child we kill is pgbouncer.
        let mut c = Command::new("pgbouncer");
        c.args(["-q", "-u", user]);
        c
    } else {
        let mut c = Command::new("pgbouncer");
        c.arg("-q");
        c
    };
    let child = cmd
        .arg(&ini)
        .spawn()
        .expect("pgbouncer (apt-get install -y pgbouncer)");
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(20),
    )
    .unwrap();
    Pgbouncer {
        child,
        _dir: dir,
        port,
    }
}

fn main() {
    let secs: u32 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let t_arg = secs.to_string();
    // BENCH_EXTRA_YAML: extra top-level config, to compare settings.
    let s = pg_setup::Setup::start(&std::env::var("BENCH_EXTRA_YAML").unwrap_or_default());
    s.grant_dba("2h");
    let tunnel = s.tunnel();
    let pg_port = s.pg.port();
    let wicket_port = tunnel.addr.port();
    // Initialise through Wicket (as the granted database user).
    pg_setup::pgbench(wicket_port, "app", "disable", &["-i", "-s", "5", "-q"]);
    let bouncer = pgbouncer(s.pg.addr(), true, false);
    // (d): two pgbouncers in a row with TLS between them: the shape of (c)
    // without its audit, in C. What a two-process path costs on this
    // machine; a reference for reading (c), not a target.
    let inner = pgbouncer(s.pg.addr(), true, true);
    let outer = pgbouncer(SocketAddr::from(([127, 0, 0, 1], inner.port)), true, false);
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        let select = ["-S", "-c", "8", "-j", "2", "-n", "-T", &t_arg];
        for (leg, port, user, ssl) in [
            ('a', pg_port, "postgres", "require"),
            ('b', bouncer.port, "postgres", "disable"),
            ('c', wicket_port, "app", "disable"),
            ('d', outer.port, "postgres", "disable"),
        ] {
            if only.contains(leg) {
                println!("  ({leg}) {:>10.1} tps", pgbench(port, user, ssl, &select));
            }
        }
        return;
    }
    let select = ["-S", "-c", "8", "-j", "2", "-n", "-T", &t_arg];
    println!("pgbench -S -c 8 -j 2 -T {secs} (scale 5), one machine, one run:");
    let a = pgbench(pg_port, "postgres", "require", &select);
    println!("  (a) direct, TLS:                      {a:>10.1} tps");
    let b = pgbench(bouncer.port, "postgres", "disable", &select);
    println!("  (b) pgbouncer (session mode):         {b:>10.1} tps");
    let c = pgbench(wicket_port, "app", "disable", &select);
    println!("  (c) wicket tunnel + wicketd (audit):  {c:>10.1} tps");
    let d = pgbench(outer.port, "postgres", "disable", &select);
    println!("  (d) reference: 2 pgbouncers, TLS between: {d:>6.1} tps");

    let connect = ["-S", "-C", "-c", "8", "-j", "2", "-n", "-T", &t_arg];
    println!("pgbench -S -C (a new connection per transaction):");
    let ca = pgbench(pg_port, "postgres", "require", &connect);
    println!("  (a) direct, TLS:                      {ca:>10.1} connections/s");
    let cc = pgbench(wicket_port, "app", "disable", &connect);
    println!("  (c) wicket tunnel + wicketd (audit):  {cc:>10.1} connections/s");

    let audited = s
        .alice
        .ok(&[
            "audit",
            "search",
            "--user",
            "alice",
            "--kind",
            "session_ended",
            "--limit",
            "1",
            "--format",
            "json",
        ])
        .unwrap();
    assert!(
        audited.stdout.contains("session_ended"),
        "sessions were audited"
    );
    drop((bouncer, outer, inner));
    // What each leg's proxies add to a transaction, in CPU time of the whole
    // machine (all cores busy in every leg): how far the targets are from
    // what one proxy process costs here.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let us = |tps: f64| cores * 1e6 / tps;
    println!("machine time per transaction over (a), {cores} cores:");
    println!("  (b) one pgbouncer hop:        {:>6.1} us", us(b) - us(a));
    println!("  (c) tunnel + wicketd + audit: {:>6.1} us", us(c) - us(a));
    println!("  (d) two pgbouncer hops:       {:>6.1} us", us(d) - us(a));
    println!(
        "  the targets leave (c) {:.1} us (c/b >= 0.75) and {:.1} us (c/a >= 0.6)",
        us(0.75 * b) - us(a),
        us(0.6 * a) - us(a)
    );
    println!("ratios (targets: TPS c/b >= 0.75, c/a >= 0.6; connections c/a >= 0.5):");
    println!("  TPS c/b = {:.3}", c / b);
    println!("  TPS c/a = {:.3}", c / a);
    println!("  connections/s c/a = {:.3}", cc / ca);
    println!(
        "  (reference, no target: TPS c/d = {:.3}, d/b = {:.3}, b/a = {:.3})",
        c / d,
        d / b,
        b / a
    );
}
