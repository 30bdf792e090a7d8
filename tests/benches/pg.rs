//! `bench/pg`: pgbench select-only, 8 clients, side by side in one run on one
//! machine: (a) directly to PostgreSQL over TLS, (b) through pgbouncer in
//! session mode (TLS to the server), (c) through `wicket proxy db --tunnel`
//! and wicketd with statement audit on; then connection rate (`pgbench -C`)
//! for (a) and (c). Also (d), a reference: two pgbouncers in a row with TLS
//! between them, the two-process shape of (c) without audit; and (e), the
//! floor for any two-hop path: (a) through two no-op byte relays (a blocking
//! thread per direction, nothing parsed, TLS end to end). Prints the figures,
//! then the ratios last.
//!
//! The legs take turns for `BENCH_ROUNDS` rounds (default 3) and each leg's
//! median counts. `BENCH_SECS` sets each run's length (default 20).
//! `BENCH_ONLY=c` (any of `a` to `e`) runs only those TPS measurements once,
//! for profiling one leg; ratios are printed only for a full run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[allow(dead_code)]
#[path = "../e2e/pg_setup.rs"]
mod pg_setup;

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
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

/// A no-op byte relay from a free 127.0.0.1 port to `to`: a blocking thread
/// per direction copying bytes, nothing parsed, no TLS of its own. The least
/// any hop can cost; its threads live until the bench exits.
fn relay(to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let (Ok(client), Ok(server)) = (client, TcpStream::connect(to)) else {
                continue;
            };
            for (from, to) in [(&client, &server), (&server, &client)] {
                let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                to.set_nodelay(true).unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    addr
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

/// The middle value (the mean of the middle two for an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
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
    // (e): (a) through two no-op relays, the floor for a two-hop path.
    let relays = relay(relay(s.pg.addr())).port();
    let select = ["-S", "-c", "8", "-j", "2", "-n", "-T", &t_arg];
    let connect = ["-S", "-C", "-c", "8", "-j", "2", "-n", "-T", &t_arg];
    let legs = [
        ('a', pg_port, "postgres", "require", "direct, TLS"),
        (
            'b',
            bouncer.port,
            "postgres",
            "disable",
            "pgbouncer (session mode)",
        ),
        (
            'c',
            wicket_port,
            "app",
            "disable",
            "wicket tunnel + wicketd (audit)",
        ),
        (
            'd',
            outer.port,
            "postgres",
            "disable",
            "reference: 2 pgbouncers, TLS between",
        ),
        (
            'e',
            relays,
            "postgres",
            "require",
            "reference: (a) via 2 no-op relays",
        ),
    ];
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        for (leg, port, user, ssl, _) in legs {
            if only.contains(leg) {
                println!("  ({leg}) {:>10.1} tps", pgbench(port, user, ssl, &select));
            }
        }
        return;
    }
    // The legs take turns, round after round, and each leg's median is
    // used: a machine that speeds up or slows down during the run (a shared
    // host) moves every leg alike instead of whichever ran at the time.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!("pgbench -S -c 8 -j 2 -T {secs} (scale 5), one machine, {rounds} rounds:");
    let mut tps = vec![Vec::new(); legs.len()];
    for round in 1..=rounds {
        for (i, (leg, port, user, ssl, what)) in legs.iter().enumerate() {
            let t = pgbench(*port, user, ssl, &select);
            println!("  round {round} ({leg}) {what:<40} {t:>10.1} tps");
            tps[i].push(t);
        }
    }
    println!("pgbench -S -C (a new connection per transaction), {rounds} rounds:");
    let (mut conn_a, mut conn_c) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let ca = pgbench(pg_port, "postgres", "require", &connect);
        println!("  round {round} (a) direct, TLS:                     {ca:>10.1} connections/s");
        let cc = pgbench(wicket_port, "app", "disable", &connect);
        println!("  round {round} (c) wicket tunnel + wicketd (audit): {cc:>10.1} connections/s");
        conn_a.push(ca);
        conn_c.push(cc);
    }
    println!("medians:");
    for (i, (leg, .., what)) in legs.iter().enumerate() {
        println!("  ({leg}) {what:<40} {:>10.1} tps", median(&mut tps[i]));
    }
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|i| median(&mut tps[i]));
    let (ca, cc) = (median(&mut conn_a), median(&mut conn_c));
    println!("  (a) connections/s {ca:>10.1}, (c) connections/s {cc:>10.1}");

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
    println!("  (e) two no-op relay hops:     {:>6.1} us", us(e) - us(a));
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
        "  (reference, no target: TPS c/d = {:.3}, d/b = {:.3}, b/a = {:.3}, e/a = {:.3}, e/b = {:.3})",
        c / d,
        d / b,
        b / a,
        e / a,
        e / b
    );
}
