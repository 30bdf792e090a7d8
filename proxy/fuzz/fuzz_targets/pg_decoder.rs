//! Fuzzes the PostgreSQL message decoder the proxy and the tunnel run on
//! untrusted bytes: startup-phase messages, typed message framing, frontend
//! message parsing and backend ErrorResponse parsing. Any panic is a bug.
//!
//! Run: `cd proxy/fuzz && cargo +nightly fuzz run pg_decoder -- -max_total_time=60`
#![no_main]

use libfuzzer_sys::fuzz_target;
use wicket_api::pg;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the limit, so size checks are exercised too.
    let (limit, bytes) = match data.split_first() {
        Some((l, rest)) => (64 + (*l as usize) * 64, rest),
        None => return,
    };
    if let Ok(Some((pg::Startup::Startup { mut params, minor }, _))) = pg::read_startup(bytes, limit) {
        let _ = pg::negotiate(minor, &mut params);
    }
    let mut at = 0;
    while at < bytes.len() {
        match pg::read_message(&bytes[at..], limit) {
            Ok(Some((_, len))) => {
                let msg = &bytes[at..at + len];
                let _ = pg::parse_frontend(msg);
                let _ = pg::parse_error_response(msg);
                at += len;
            }
            _ => break,
        }
    }
});
