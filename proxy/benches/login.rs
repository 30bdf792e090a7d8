//! Login API round trip, excluding password hashing: `POST /v1/certs` over a
//! fresh TCP + mutual-TLS connection each time (what `wicket login
//! --request-id` and every CLI call pay), with SSH + X.509 issuance and the
//! audit write to SQLite. `cargo bench -p wicketd --bench login`.
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};
use wicket_api::{Certificates, ReissueRequest};

fn main() {
    let secs = common::seconds();
    common::runtime().block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = wicketd::config::Config::embedded_default(dir.path());
        cfg.data_dir = dir.path().join("data");
        cfg.listen.api = "127.0.0.1:0".parse().unwrap();
        let running = wicketd::server::start(cfg).await.unwrap();
        common::add_user(&running, "bench", &["access"]).await;
        let me = common::login(&running, "bench").await;
        let req = ReissueRequest {
            ssh_public_key: me.keys.ssh_public_openssh.clone(),
            tls_csr_pem: me.keys.tls_csr_pem.clone(),
            request_ids: vec![],
        };
        for _ in 0..20 {
            let _: Certificates = me.client.post("/v1/certs", &req).await.unwrap();
        }
        let start = Instant::now();
        let mut lat = Vec::new();
        while start.elapsed() < Duration::from_secs(secs) {
            let t = Instant::now();
            let _: Certificates = me.client.post("/v1/certs", &req).await.unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let total = start.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        println!(
            "login round trips (sequential, new TLS connection each): {}",
            lat.len()
        );
        println!("round trips/s: {:.0}", lat.len() as f64 / total);
        println!(
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}",
            common::quantile(&lat, 0.5),
            common::quantile(&lat, 0.9),
            common::quantile(&lat, 0.99)
        );
        running.shutdown().await;
    });
}
