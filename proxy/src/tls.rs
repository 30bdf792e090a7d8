//! TLS for wicketd's listeners: a server certificate from Wicket's TLS CA,
//! client certificates optional at the handshake (login needs none) and
//! verified again, with identity extraction, by `wicket_ca`.

use crate::error::{Error, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::sync::Arc;
use wicket_ca::{AuthorityKeys, ServerCertRequest, Validity};

/// Server certificates live a year; wicketd makes a new one at every start.
const SERVER_CERT_LIFETIME: i64 = 365 * 24 * 3600;

/// The rustls server config for the API (and later the DB/Kube listeners).
pub fn server_config(
    keys: &AuthorityKeys,
    names: &[String],
    now: i64,
) -> Result<Arc<rustls::ServerConfig>> {
    let rng = ring::rand::SystemRandom::new();
    let (pkcs8, spki) = wicket_ca::x509::new_p256_key(&rng)?;
    let leaf = keys.tls.issue_server(
        &ServerCertRequest {
            spki_der: &spki,
            names,
            validity: Validity::new(now - 300, now + SERVER_CERT_LIFETIME)?,
        },
        &rng,
    )?;
    let chain = vec![
        CertificateDer::from(leaf.der),
        CertificateDer::from(keys.tls.cert_der().to_vec()),
    ];
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(keys.tls.cert_der().to_vec()))
        .map_err(|e| Error::Internal(format!("TLS CA: {e}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Internal(format!("client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
        .map_err(|e| Error::Internal(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The names the server certificate covers: the listen IP, loopback, and
/// configured public names.
pub fn server_names(listen: std::net::SocketAddr, public_names: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ip = listen.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names.extend(public_names.iter().cloned());
    names.sort();
    names.dedup();
    names
}
