//! What the API benchmarks share: a runtime like wicketd's, and logging a
//! user in so calls carry a client certificate.
#![allow(dead_code)]

use wicket::client::{Client, ClientIdentity, Trust};
use wicket_api::{Certificates, LoginRequest, Secret};

/// The number in environment variable `name`, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The benchmark's length, from `BENCH_SECONDS` (default 5).
pub fn seconds() -> u64 {
    env_or("BENCH_SECONDS", 5) as u64
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Adds `user` with `roles` and the password "bench password".
pub async fn add_user(running: &wicketd::server::Running, user: &str, roles: &[&str]) {
    wicketd::service::add_user(
        &running.wicket.config,
        &running.wicket.store,
        user,
        roles.iter().map(|r| r.to_string()).collect(),
        None,
        Some("bench password"),
        false,
        wicketd::clock::now(),
    )
    .await
    .unwrap();
}

/// A logged-in user: an API client with their certificate, and what the
/// login returned.
pub struct LoggedIn {
    pub client: Client,
    pub keys: wicket::keys::NewKeys,
    pub certs: Certificates,
}

pub async fn login(running: &wicketd::server::Running, user: &str) -> LoggedIn {
    let proxy = running.api_addr.to_string();
    let keys = wicket::keys::generate(&format!("{user}@wicket")).unwrap();
    let anon = Client::new(&proxy, Trust::Pin(running.tls_ca_pin.clone()), None).unwrap();
    let certs: Certificates = anon
        .post(
            "/v1/login",
            &LoginRequest {
                user: user.into(),
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
    let client = Client::new(&proxy, Trust::Bundle(certs.tls_ca_pem.clone()), Some(&id)).unwrap();
    LoggedIn {
        client,
        keys,
        certs,
    }
}

/// `q` quantile of sorted `lat`, in the unit the caller chose.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// CPU time (user + system) this process has used, in seconds.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based) of the whole line.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}
