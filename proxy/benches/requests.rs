//! Access-request throughput through the HTTPS API on the embedded SQLite
//! store: each operation is `POST /v1/requests` by a requester, then
//! `POST /v1/requests/{id}/review` (approve) by a reviewer, and the grant
//! must come back active. Each call is what the CLI does: a fresh TCP +
//! mutual-TLS connection, the policy decision, one store transaction with
//! its chained audit events and queued notifications. Run with the example
//! configuration (`deploy/wicket.yaml`: `dba` needs one approval from
//! `role:sre`). Prints pairs per second (target: at least 500) and latency.
//! `cargo bench -p wicketd --bench requests` (`BENCH_SECONDS`, default 5;
//! `BENCH_WORKERS`, default 8 pairs in flight).
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};
use wicket::client::{Client, Connection};
use wicket_api::{CreateRequest, Grant, ReviewBody};

fn main() {
    let secs = common::seconds();
    let workers = common::env_or("BENCH_WORKERS", 8);
    common::runtime().block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/wicket.yaml");
        let mut cfg = wicketd::config::load(&example).unwrap();
        cfg.data_dir = dir.path().join("data");
        cfg.listen.api = "127.0.0.1:0".parse().unwrap();
        cfg.listen.ssh = None;
        cfg.listen.postgres = None;
        cfg.listen.kube = None;
        let running = wicketd::server::start(cfg).await.unwrap();
        let mut pairs = Vec::new();
        for i in 0..workers {
            let (dev, sre) = (format!("dev{i}"), format!("sre{i}"));
            common::add_user(&running, &dev, &["dev"]).await;
            common::add_user(&running, &sre, &["sre"]).await;
            pairs.push((
                common::login(&running, &dev).await.client,
                common::login(&running, &sre).await.client,
            ));
        }
        let body = CreateRequest {
            roles: vec!["dba".into()],
            reason: "benchmark: rotate the replication slot".into(),
            duration: Some("1h".into()),
            ..CreateRequest::default()
        };
        let approve = ReviewBody {
            verdict: "approve".into(),
            reason: "looks right".into(),
            ..ReviewBody::default()
        };
        let (body, approve) = (Arc::new(body), Arc::new(approve));
        for (a, b) in &pairs {
            let (mut a, mut b) = (Caller::Fresh(a.clone()), Caller::Fresh(b.clone()));
            one(&mut a, &mut b, &body, &approve).await;
        }
        let mut rates = Vec::new();
        for kept in [false, true] {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let (t0, c0) = (Instant::now(), common::cpu_seconds());
            let tasks: Vec<_> = pairs
                .iter()
                .map(|(a, b)| {
                    let (a, b) = (a.clone(), b.clone());
                    let (body, approve) = (body.clone(), approve.clone());
                    tokio::spawn(async move {
                        let (mut a, mut b) = (Caller::new(a, kept).await, Caller::new(b, kept).await);
                        let mut lat = Vec::new();
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            one(&mut a, &mut b, &body, &approve).await;
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        lat
                    })
                })
                .collect();
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.unwrap());
            }
            let (total, cpu) = (t0.elapsed().as_secs_f64(), common::cpu_seconds() - c0);
            lat.sort_by(f64::total_cmp);
            let how = if kept {
                "each client keeps its HTTPS connection (an API client)"
            } else {
                "a new TCP + mutual-TLS connection per call (what each CLI command pays)"
            };
            println!("create + approve, {workers} in flight, {how}: {} pairs in {total:.1} s", lat.len());
            println!(
                "  latency of a pair ms: p50 {:.2}  p90 {:.2}  p99 {:.2}; CPU per pair (wicketd and clients, one process): {:.0} µs",
                common::quantile(&lat, 0.5),
                common::quantile(&lat, 0.9),
                common::quantile(&lat, 0.99),
                cpu / lat.len() as f64 * 1e6
            );
            rates.push(lat.len() as f64 / total);
        }
        println!(
            "create+approve pairs/s: new connection per call {:.0} (ratio to 500: {:.2}); kept connections {:.0} (ratio to 500: {:.2})",
            rates[0],
            rates[0] / 500.0,
            rates[1],
            rates[1] / 500.0
        );
        running.shutdown().await;
    });
}

/// A user's API client: a new connection per call, or one kept.
enum Caller {
    Fresh(Client),
    Kept(Connection),
}

impl Caller {
    async fn new(client: Client, kept: bool) -> Self {
        match kept {
            true => Caller::Kept(client.connect().await.unwrap()),
            false => Caller::Fresh(client),
        }
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> T {
        match self {
            Caller::Fresh(c) => c.post(path, body).await.unwrap(),
            Caller::Kept(c) => c.post(path, body).await.unwrap(),
        }
    }
}

/// One request created by `requester` and approved by `reviewer`.
async fn one(
    requester: &mut Caller,
    reviewer: &mut Caller,
    body: &CreateRequest,
    approve: &ReviewBody,
) {
    let created: Grant = requester.post("/v1/requests", body).await;
    assert_eq!(created.status, "pending", "{created:?}");
    let path = format!("/v1/requests/{}/review", created.id);
    let done: Grant = reviewer.post(&path, approve).await;
    assert_eq!(done.status, "active", "{done:?}");
}
