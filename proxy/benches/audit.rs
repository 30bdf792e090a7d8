//! Audit writer throughput: database statement events (the shape `bench/pg`
//! produces, one per query) queued through `AuditSink` into the embedded
//! SQLite store, as fast as the writer stores them. Prints events per
//! second and the writer's CPU time per event. `cargo bench -p wicketd
//! --bench audit` (`BENCH_EVENTS`, default 400000).
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;
use wicketd::audit::{AuditEvent, AuditSink, SessionRef};
use wicketd::config::AuditSettings;

fn main() {
    let events = common::env_or("BENCH_EVENTS", 400_000);
    common::runtime().block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let cfg = wicketd::config::Config::embedded_default(dir.path());
        let (_, _, store) = wicketd::server::open_keys_and_store(&cfg).await.unwrap();
        let sink = AuditSink::start(store.clone(), &AuditSettings::default());
        let sessions: Vec<Arc<SessionRef>> = (0..8)
            .map(|i| {
                Arc::new(SessionRef {
                session_id: format!("0195b3c4-1d2e-7f00-8000-00000000000{i}"),
                user: "alice".into(),
                protocol: "postgres".into(),
                resource: "prod-pg".into(),
                login: "app".into(),
                request_ids: vec!["0195b3c4-0000-7000-8000-0000000000aa".into()],
            })
            })
            .collect();
        let dropped = AtomicU64::new(0);
        let (t0, c0) = (Instant::now(), common::cpu_seconds());
        let base_ms = 1_790_000_000_000i64;
        for n in 0..events {
            let event = AuditEvent::DbQuery {
                session: sessions[n % sessions.len()].clone(),
                statement: format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", n * 7 % 500_000).into(),
            };
            sink.send(event, base_ms + (n / 20) as i64, &dropped).await;
        }
        sink.flush().await;
        let (secs, cpu) = (t0.elapsed().as_secs_f64(), common::cpu_seconds() - c0);
        println!(
            "audit: {events} statement events stored in {secs:.2} s: {:.0} events/s, {:.2} µs CPU per event",
            events as f64 / secs,
            cpu * 1e6 / events as f64
        );
    });
}
