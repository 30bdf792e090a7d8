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

/// Whether a listener demands a client certificate at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// The API: login needs none; handlers require one where it matters.
    Optional,
    /// The database listener: no certificate, no connection.
    Required,
}

/// The rustls server config for the API (`Optional`, ALPN http/1.1) and the
/// database listener (`Required`, no ALPN).
pub fn server_config(
    keys: &AuthorityKeys,
    names: &[String],
    now: i64,
    client_certs: ClientCerts,
) -> Result<Arc<rustls::ServerConfig>> {
    let rng = ring::rand::SystemRandom::new();
    let (pkcs8, spki) = wicket_ca::x509::new_p256_key(&rng)?;
    let leaf = keys.tls.issue_server(
        &ServerCertRequest {
            spki_der: &spki,
            names,
            validity: Validity::new(now - 300, now + SERVER_CERT_LIFETIME)?,
            role: wicket_ca::ServerRole::Proxy,
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
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = match client_certs {
        ClientCerts::Optional => builder.allow_unauthenticated(),
        ClientCerts::Required => builder,
    };
    let verifier = builder
        .build()
        .map_err(|e| Error::Internal(format!("client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
        .map_err(|e| Error::Internal(format!("server certificate: {e}")))?;
    if client_certs == ClientCerts::Optional {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(cfg))
}

/// Roots for verifying an upstream server: the PEM bundle at `ca_file`, or
/// Wicket's own TLS CA when none is configured.
pub fn upstream_roots(
    keys: &AuthorityKeys,
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    let ders = match ca_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
            let ders = wicket_ca::x509::pem_decode_all("CERTIFICATE", &text)
                .map_err(|e| Error::BadRequest(format!("{}: {e}", path.display())))?;
            if ders.is_empty() {
                return Err(Error::BadRequest(format!(
                    "{}: no CERTIFICATE in the file",
                    path.display()
                )));
            }
            ders
        }
        None => vec![keys.tls.cert_der().to_vec()],
    };
    for der in ders {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| Error::BadRequest(format!("upstream CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A client config presenting `chain` (leaf first) with `key_pkcs8` and
/// verifying the server against `roots`.
pub fn upstream_client_config(
    roots: Arc<RootCertStore>,
    chain: Vec<Vec<u8>>,
    key_pkcs8: &[u8],
) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec())),
        )
        .map_err(|e| Error::Internal(format!("upstream client certificate: {e}")))?;
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
