//! Login API round trip, excluding password hashing: `POST /v1/certs` over a
//! fresh TCP + mutual-TLS connection each time (what `wicket login
//! --request-id` and every CLI call pay), with SSH + X.509 issuance and the
//! audit write to SQLite. `cargo bench -p wicketd --bench login`.
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use wicket::client::{Client, ClientIdentity, Trust};
use wicket_api::{Certificates, LoginRequest, ReissueRequest, Secret};

fn main() {
    let secs: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = wicketd::config::Config::embedded_default(dir.path());
        cfg.data_dir = dir.path().join("data");
        cfg.listen.api = "127.0.0.1:0".parse().unwrap();
        let running = wicketd::server::start(cfg).await.unwrap();
        let now = wicketd::clock::now();
        wicketd::service::add_user(
            &running.wicket.config,
            &running.wicket.store,
            "bench",
            vec!["access".into()],
            None,
            Some("bench password"),
            false,
            now,
        )
        .await
        .unwrap();
        let proxy = running.api_addr.to_string();
        let keys = wicket::keys::generate("bench@wicket").unwrap();
        let anon = Client::new(&proxy, Trust::Pin(running.tls_ca_pin.clone()), None).unwrap();
        let certs: Certificates = anon
            .post(
                "/v1/login",
                &LoginRequest {
                    user: "bench".into(),
                    password: Secret::new("bench password"),
                    otp: None,
                    ssh_public_key: keys.ssh_public_openssh.clone(),
                    tls_csr_pem: keys.tls_csr_pem.clone(),
                },
            )
            .await
            .unwrap();
        let id = ClientIdentity {
            cert_pem: certs.tls_certificate_pem.clone(),
            key_pem: keys.tls_key_pem.clone(),
        };
        let client =
            Client::new(&proxy, Trust::Bundle(certs.tls_ca_pem.clone()), Some(&id)).unwrap();
        let req = ReissueRequest {
            ssh_public_key: keys.ssh_public_openssh.clone(),
            tls_csr_pem: keys.tls_csr_pem.clone(),
            request_ids: vec![],
        };
        for _ in 0..20 {
            let _: Certificates = client.post("/v1/certs", &req).await.unwrap();
        }
        let start = Instant::now();
        let mut lat = Vec::new();
        while start.elapsed() < Duration::from_secs(secs) {
            let t = Instant::now();
            let _: Certificates = client.post("/v1/certs", &req).await.unwrap();
            lat.push(t.elapsed());
        }
        let total = start.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| {
            lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0
        };
        println!(
            "login round trips (sequential, new TLS connection each): {}",
            lat.len()
        );
        println!("round trips/s: {:.0}", lat.len() as f64 / total);
        println!(
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}",
            p(0.5),
            p(0.9),
            p(0.99)
        );
        running.shutdown().await;
    });
}
