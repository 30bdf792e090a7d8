//! The access decision a proxied connection pays: `Wicket::decide_session`
//! (the caller's user and the grants behind their certificate, then the
//! policy's database decision) with 100 roles in the policy and 10,000
//! active grants in the index (2,000 users with 5 grants each). Prints the
//! latency of one decision from the index (target p50 <= 5 µs) and, for
//! comparison, from the SQLite store (what each decision cost before the
//! index, and what it costs while the index is stale).
//! `cargo bench -p wicketd --bench decision` (`BENCH_DECISIONS`, default
//! 200000).
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;
use wicket_api::CreateRequest;
use wicket_policy::{Resource, ResourceKind};
use wicketd::service::{Caller, Wicket};

const ROLES: usize = 100;
const USERS: usize = 2_000;
const GRANTS_PER_USER: usize = 5;

/// The example configuration's shape with 100 requestable, self-approved
/// roles, each granting one database as one database user.
fn config_text() -> String {
    let names: Vec<String> = (0..ROLES).map(|i| format!("role-{i:03}")).collect();
    let mut y = String::from(
        "version: 1\ndata_dir: ./data\nstorage: sqlite\nlisten:\n  api: 127.0.0.1:0\nroles:\n",
    );
    writeln!(y, "  dev:\n    logins: [ \"{{{{user}}}}\" ]\n    nodes: {{ env: dev }}\n    request: {{ roles: [ {} ] }}", names.join(", ")).unwrap();
    for (i, n) in names.iter().enumerate() {
        writeln!(y, "  {n}:\n    databases: {{ labels: {{ team: t{i:03} }}, names: [ \"*\" ], users: [ u{i:03} ] }}\n    max_duration: 8h").unwrap();
    }
    writeln!(
        y,
        "approval:\n  - roles: [ {} ]\n    require: self",
        names.join(", ")
    )
    .unwrap();
    y.push_str("resources:\n  databases:\n");
    for i in 0..ROLES {
        writeln!(
            y,
            "    - {{ name: db-{i:03}, address: 127.0.0.1:5432, labels: {{ team: t{i:03} }} }}"
        )
        .unwrap();
    }
    y
}

/// One decision as the PostgreSQL proxy makes it (after finding the
/// database it names): may `caller` connect to database `db` as `db_user`?
async fn decide(w: &Wicket, caller: &Caller, db: &Resource, db_user: &str) -> bool {
    let d = w
        .decide_session(caller, wicketd::clock::now(), {
            let (db, db_user) = (db.clone(), db_user.to_owned());
            move |roles, subject| roles.decide_database(subject, &db, &db_user, "app")
        })
        .await
        .unwrap();
    d.decision.allowed
}

fn quantiles(name: &str, mut ns: Vec<f64>) -> f64 {
    ns.sort_by(f64::total_cmp);
    let mean = ns.iter().sum::<f64>() / ns.len() as f64;
    let p50 = common::quantile(&ns, 0.5) / 1000.0;
    println!(
        "{name}: {} decisions, µs p50 {p50:.2}  p90 {:.2}  p99 {:.2}  mean {:.2}",
        ns.len(),
        common::quantile(&ns, 0.9) / 1000.0,
        common::quantile(&ns, 0.99) / 1000.0,
        mean / 1000.0
    );
    p50
}

fn main() {
    let decisions = common::env_or("BENCH_DECISIONS", 200_000);
    common::runtime().block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = wicketd::config::parse(&config_text(), dir.path()).unwrap();
        cfg.data_dir = dir.path().join("data");
        let (keys, _, store) = wicketd::server::open_keys_and_store(&cfg).await.unwrap();
        let now = wicketd::clock::now();
        let w = Wicket::new(cfg, store, keys, Default::default()).unwrap();
        let t0 = Instant::now();
        let mut callers = Vec::new();
        for u in 0..USERS {
            let name = format!("user{u:04}");
            wicketd::service::add_user(&w.config, &w.store, &name, vec!["dev".into()], None, None, false, now)
                .await
                .unwrap();
            let mut caller = Caller {
                user: name,
                request_ids: Vec::new(),
                source: IpAddr::V4(Ipv4Addr::LOCALHOST),
                login_until: i64::MAX,
                valid_until: i64::MAX,
            };
            let mut roles = Vec::new();
            for g in 0..GRANTS_PER_USER {
                let role = (u * 7 + g * 13) % ROLES;
                let grant = w
                    .create_request(
                        &caller,
                        CreateRequest {
                            roles: vec![format!("role-{role:03}")],
                            reason: "benchmark".into(),
                            duration: Some("8h".into()),
                            ..CreateRequest::default()
                        },
                        now,
                    )
                    .await
                    .unwrap();
                assert_eq!(grant.status, "active");
                caller.request_ids.push(grant.id);
                roles.push(role);
            }
            callers.push((caller, roles));
        }
        println!(
            "set-up: {USERS} users, {} active grants, {ROLES} roles in {:.1} s",
            USERS * GRANTS_PER_USER,
            t0.elapsed().as_secs_f64()
        );
        let dbs: Vec<(Resource, String)> = (0..ROLES)
            .map(|i| {
                let db = w.config.policy.resource(ResourceKind::Database, &format!("db-{i:03}"));
                (db.unwrap().clone(), format!("u{i:03}"))
            })
            .collect();
        // From the store: the index has never been read.
        let mut store_ns = Vec::new();
        for n in 0..(decisions / 50).max(1000) {
            let (caller, roles) = &callers[(n * 7919) % USERS];
            let t = Instant::now();
            let (db, db_user) = &dbs[roles[n % GRANTS_PER_USER]];
            let ok = decide(&w, caller, db, db_user).await;
            store_ns.push(t.elapsed().as_nanos() as f64);
            assert!(ok);
        }
        w.refresh_index(wicketd::clock::now()).await.unwrap();
        assert_eq!(w.index.read().grants(), USERS * GRANTS_PER_USER);
        let mut index_ns = Vec::with_capacity(decisions);
        let mut refreshed = Instant::now();
        for n in 0..decisions {
            // Keep the index fresh, as the refresher does every 250 ms.
            if refreshed.elapsed().as_millis() >= 250 {
                w.refresh_index(wicketd::clock::now()).await.unwrap();
                refreshed = Instant::now();
            }
            let (caller, roles) = &callers[(n * 7919) % USERS];
            let (db, db_user) = &dbs[roles[n % GRANTS_PER_USER]];
            // A connection's caller was just read from its certificate.
            let caller = &caller.clone();
            let t = Instant::now();
            let ok = decide(&w, caller, db, db_user).await;
            index_ns.push(t.elapsed().as_nanos() as f64);
            assert!(ok);
            // A role the caller holds no grant for is refused (the denial
            // reads the store for its reason, so it is not timed).
            if n % 1000 == 0 {
                let other = (0..ROLES).find(|r| !roles.contains(r)).unwrap();
                let (db, db_user) = &dbs[other];
                assert!(!decide(&w, caller, db, db_user).await);
            }
        }
        let store_p50 = quantiles("from the SQLite store (index not read)", store_ns);
        let p50 = quantiles("from the index", index_ns);
        println!(
            "access decision p50 from the index: {p50:.2} µs (target <= 5 µs: ratio {:.2}); from the store {store_p50:.1} µs",
            p50 / 5.0
        );
    });
}
