//! Certificates from `wicket-ca`, checked by the real tools: `ssh-keygen -L`
//! and `openssl verify` / `openssl x509`.

use ring::rand::SystemRandom;
use std::process::Command;
use wicket_ca::{
    AuthorityKeys, Identity, SshCertKind, SshCertificateRequest, SshPermissions, SshPublicKey,
    Validity,
};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keys() -> AuthorityKeys {
    AuthorityKeys::generate("e2e", 1_700_000_000, &SystemRandom::new())
        .unwrap()
        .0
}

#[test]
fn ssh_keygen_shows_principals_window_and_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
        .arg(&key_path));
    let public = std::fs::read_to_string(key_path.with_extension("pub")).unwrap();
    let public = SshPublicKey::parse_openssh(&public).unwrap();
    let ca = keys().ssh_user;
    let id = Identity {
        user: "alice".into(),
        roles: vec!["dev".into(), "dba".into()],
        request_ids: vec!["0b6c1f4e-req".into()],
        login_until: Some(1_795_262_400),
    };
    // 2026-11-21T10:00:00Z .. 2026-11-21T12:00:00Z
    let validity = Validity::new(1_795_255_200, 1_795_262_400).unwrap();
    let cert = ca
        .issue_openssh(
            &SshCertificateRequest {
                public_key: &public,
                kind: SshCertKind::User,
                key_id: "user=alice requests=0b6c1f4e-req",
                principals: &["alice".into(), "root".into()],
                serial: 7,
                validity,
                permissions: SshPermissions {
                    pty: true,
                    port_forwarding: true,
                    ..Default::default()
                },
                identity: Some(&id),
            },
            &SystemRandom::new(),
        )
        .unwrap();
    let cert_path = dir.path().join("id_ed25519-cert.pub");
    std::fs::write(&cert_path, format!("{cert}\n")).unwrap();
    let listing = run(Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&cert_path));
    assert!(
        listing.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"),
        "{listing}"
    );
    assert!(
        listing.contains("Key ID: \"user=alice requests=0b6c1f4e-req\""),
        "{listing}"
    );
    assert!(listing.contains("Serial: 7"), "{listing}");
    assert!(
        listing.contains("Valid: from 2026-11-21T10:00:00 to 2026-11-21T12:00:00"),
        "{listing}"
    );
    let principals: Vec<&str> = listing
        .lines()
        .skip_while(|l| !l.contains("Principals:"))
        .skip(1)
        .take_while(|l| !l.contains("Critical Options:"))
        .map(str::trim)
        .collect();
    assert_eq!(principals, ["alice", "root"], "{listing}");
    assert!(
        listing.contains("permit-pty") && listing.contains("permit-port-forwarding"),
        "{listing}"
    );
    assert!(!listing.contains("permit-agent-forwarding"), "{listing}");
    assert!(listing.contains("wicket-user@wicket.dev"), "{listing}");
    assert!(
        listing.contains("wicket-login-until@wicket.dev"),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("Signing CA: ED25519 {}", ca.fingerprint())),
        "{listing}"
    );
}

#[test]
fn openssl_accepts_client_certificate_with_exact_window() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys();
    let key_path = dir.path().join("client.key");
    let csr_path = dir.path().join("client.csr");
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=ignored",
        ])
        .arg("-keyout")
        .arg(&key_path)
        .arg("-out")
        .arg(&csr_path));
    let spki = wicket_ca::X509Ca::spki_from_csr(&std::fs::read(&csr_path).unwrap()).unwrap();
    let id = Identity {
        user: "alice".into(),
        roles: vec!["dev".into()],
        request_ids: vec!["r1".into()],
        login_until: Some(1_795_262_400),
    };
    let validity = Validity::new(1_795_255_200, 1_795_262_400).unwrap();
    let cert = keys
        .tls
        .issue_client(&spki, "alice", Some(&id), validity, &SystemRandom::new())
        .unwrap();
    let cert_path = dir.path().join("client.crt");
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&ca_path, keys.tls.cert_pem()).unwrap();
    let verified = run(Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslclient",
            "-attime",
            "1795258800",
            "-CAfile",
        ])
        .arg(&ca_path)
        .arg(&cert_path));
    assert!(verified.trim().ends_with(": OK"), "{verified}");
    let dates = run(Command::new("openssl")
        .args(["x509", "-noout", "-dates", "-subject", "-in"])
        .arg(&cert_path));
    assert!(
        dates.contains("notBefore=Nov 21 10:00:00 2026 GMT"),
        "{dates}"
    );
    assert!(
        dates.contains("notAfter=Nov 21 12:00:00 2026 GMT"),
        "{dates}"
    );
    assert!(
        dates.contains("CN = alice") || dates.contains("CN=alice"),
        "{dates}"
    );
    let text = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert_path));
    assert!(text.contains(wicket_ca::IDENTITY_OID), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // Outside the window openssl refuses it too.
    let late = Command::new("openssl")
        .args(["verify", "-attime", "1795262500", "-CAfile"])
        .arg(&ca_path)
        .arg(&cert_path)
        .output()
        .unwrap();
    assert!(!late.status.success());
}
