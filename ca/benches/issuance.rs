//! Certificate issuance throughput against the raw signature floor, on one core.
//!
//! Prints SSH user certificates/s vs raw Ed25519 signatures/s and X.509 client
//! certificates/s vs raw ECDSA P-256 signatures/s, measured in the same run.
//! Targets: both ratios >= 0.8. `cargo bench -p wicket-ca`.
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use std::hint::black_box;
use std::time::{Duration, Instant};
use wicket_ca::{
    AuthorityKeys, Identity, SshCertKind, SshCertificateRequest, SshPermissions, SshPublicKey,
    Validity,
};

/// Runs `f` repeatedly for about `dur` and returns operations per second.
fn rate(dur: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..200 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let rng = SystemRandom::new();
    let (keys, _) = AuthorityKeys::generate("bench", 1_700_000_000, &rng).unwrap();

    let user_pk8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let user = Ed25519KeyPair::from_pkcs8(user_pk8.as_ref()).unwrap();
    let mut blob = Vec::new();
    for part in [&b"ssh-ed25519"[..], user.public_key().as_ref()] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    let user_key = SshPublicKey::from_blob(blob).unwrap();
    let id = Identity {
        user: "alice".into(),
        roles: vec!["dev".into(), "dba".into()],
        request_ids: vec!["4f1c2b9e-1d2f-4e3a-9b8c-7d6e5f4a3b2c".into()],
        login_until: Some(1_700_028_800),
    };
    let principals = vec!["alice".to_string(), "root".to_string()];
    let validity = Validity::new(1_700_000_000, 1_700_028_800).unwrap();

    // The floor: one raw signature over a certificate-sized message.
    let raw_signer =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    let msg = vec![0x5au8; 400];
    let raw_ed = rate(dur, || {
        black_box(raw_signer.sign(black_box(&msg)));
    });
    let ssh = rate(dur, || {
        let req = SshCertificateRequest {
            public_key: &user_key,
            kind: SshCertKind::User,
            key_id: "user=alice requests=4f1c2b9e-1d2f-4e3a-9b8c-7d6e5f4a3b2c",
            principals: &principals,
            serial: 1,
            validity,
            permissions: SshPermissions {
                pty: true,
                ..Default::default()
            },
            identity: Some(&id),
        };
        black_box(keys.ssh_user.issue_openssh(&req, &rng).unwrap());
    });

    let ec_pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ec =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, ec_pk8.as_ref(), &rng).unwrap();
    let raw_ec = rate(dur, || {
        black_box(ec.sign(&rng, black_box(&msg)).unwrap());
    });
    let client_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&client_key)
        .unwrap();
    let spki = wicket_ca::X509Ca::spki_from_csr(csr.der()).unwrap();
    let x509 = rate(dur, || {
        black_box(
            keys.tls
                .issue_client(&spki, "alice", Some(&id), validity, &rng)
                .unwrap()
                .pem(),
        );
    });

    println!("raw Ed25519 signatures/s (ring):     {raw_ed:>10.0}");
    println!("SSH user certificates/s:             {ssh:>10.0}");
    println!("raw ECDSA P-256 signatures/s (ring): {raw_ec:>10.0}");
    println!("X.509 client certificates/s:         {x509:>10.0}");
    println!(
        "ratio ssh_cert/raw_ed25519 = {:.3} (target >= 0.8)",
        ssh / raw_ed
    );
    println!(
        "ratio x509_cert/raw_p256   = {:.3} (target >= 0.8)",
        x509 / raw_ec
    );
}
