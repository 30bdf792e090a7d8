//! TLS for wicketd's listeners: a server certificate from Wicket's TLS CA,
//! client certificates optional at the handshake (login needs none) and
//! verified again, with identity extraction, by `wicket_ca`.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use wicket_ca::{AuthorityKeys, DatabaseClaim, ServerCertRequest, Validity};

/// Server certificates live a year; wicketd makes a new one at every start
/// and, running, at half that ([`Renewing`]).
const SERVER_CERT_LIFETIME: i64 = 365 * 24 * 3600;
/// After a failed renewal, how long until the next try (the certificate
/// in use still has half its life).
const RENEW_RETRY: i64 = 3600;
/// How far back a server certificate's validity starts, for clocks behind.
const CLOCK_SLACK: i64 = 300;

/// Whether a listener demands a client certificate at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// The API: login needs none; handlers require one where it matters.
    Optional,
    /// The database listener: no certificate, no connection.
    Required,
}

/// A new server certificate for `names` from `keys`' TLS CA, valid from
/// `now` (five minutes back, for clocks behind) for a year, with its key.
fn issue_server_cert(
    keys: &AuthorityKeys,
    names: &[String],
    now: i64,
) -> Result<rustls::sign::CertifiedKey> {
    let rng = ring::rand::SystemRandom::new();
    let (pkcs8, spki) = wicket_ca::x509::new_p256_key(&rng)?;
    let leaf = keys.tls.issue_server(
        &ServerCertRequest {
            spki_der: &spki,
            names,
            validity: Validity::new(now - CLOCK_SLACK, now + SERVER_CERT_LIFETIME)?,
            role: wicket_ca::ServerRole::Proxy,
        },
        &rng,
    )?;
    let chain = vec![
        CertificateDer::from(leaf.der),
        CertificateDer::from(keys.tls.cert_der().to_vec()),
    ];
    let key = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(pkcs8),
    ))
    .map_err(|e| Error::Internal(format!("server certificate key: {e}")))?;
    Ok(rustls::sign::CertifiedKey::new(chain, key))
}

/// A listener's server certificate, made anew at half its life: a wicketd
/// that runs for longer than a certificate lives never serves an expired
/// one (clients pin the TLS CA, not the certificate).
pub struct Renewing {
    keys: Arc<AuthorityKeys>,
    names: Vec<String>,
    /// The certificate, and when it was made and the next is due.
    current: std::sync::RwLock<(Arc<rustls::sign::CertifiedKey>, Due)>,
}

/// When a certificate in use was made, and when the next is due.
#[derive(Debug, Clone, Copy)]
struct Due {
    made: i64,
    next: i64,
}

impl Due {
    fn at(made: i64) -> Self {
        Self {
            made,
            next: made + SERVER_CERT_LIFETIME / 2,
        }
    }

    /// Due at `now`: half its life is over, or the clock went back
    /// before it was made (it was made on a clock that ran ahead, and
    /// clients would see it as not yet valid).
    fn due(&self, now: i64) -> bool {
        now >= self.next || now < self.made - CLOCK_SLACK
    }
}

impl std::fmt::Debug for Renewing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewing")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Renewing {
    pub fn new(keys: Arc<AuthorityKeys>, names: &[String], now: i64) -> Result<Self> {
        let first = issue_server_cert(&keys, names, now)?;
        Ok(Self {
            keys,
            names: names.to_vec(),
            current: std::sync::RwLock::new((Arc::new(first), Due::at(now))),
        })
    }

    /// The certificate to present at `now` (Unix seconds), made anew when
    /// it is due; if that fails, the one in use, tried again later.
    pub fn at(&self, now: i64) -> Arc<rustls::sign::CertifiedKey> {
        {
            let cur = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !cur.1.due(now) {
                return cur.0.clone();
            }
        }
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cur.1.due(now) {
            match issue_server_cert(&self.keys, &self.names, now) {
                Ok(next) => {
                    *cur = (Arc::new(next), Due::at(now));
                    tracing::info!(names = ?self.names, "renewed the TLS server certificate");
                }
                Err(e) => {
                    cur.1.next = now + RENEW_RETRY;
                    tracing::error!(error = %e, "cannot renew the TLS server certificate; trying again in an hour");
                }
            }
        }
        cur.0.clone()
    }
}

impl rustls::server::ResolvesServerCert for Renewing {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.at(crate::clock::now().timestamp()))
    }
}

/// The rustls server config for the API (`Optional`, ALPN http/1.1) and the
/// database listener (`Required`, no ALPN), with a server certificate for
/// `names` that renews itself ([`Renewing`]).
pub fn server_config(
    keys: Arc<AuthorityKeys>,
    names: &[String],
    now: i64,
    client_certs: ClientCerts,
) -> Result<Arc<rustls::ServerConfig>> {
    let resolver = Arc::new(Renewing::new(keys.clone(), names, now)?);
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
        .with_cert_resolver(resolver);
    if client_certs == ClientCerts::Optional {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(cfg))
}

/// The CA certificates of the PEM bundle at `path` (a resource's
/// `ca_file`): each must be one a verifier takes, and there must be one.
pub fn ca_bundle(path: &std::path::Path) -> Result<RootCertStore> {
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
    let mut roots = RootCertStore::empty();
    for (i, der) in ders.into_iter().enumerate() {
        roots.add(CertificateDer::from(der)).map_err(|e| {
            Error::BadRequest(format!("{}: certificate {}: {e}", path.display(), i + 1))
        })?;
    }
    Ok(roots)
}

/// What is wrong with the databases' `ca_file`s, read as `start` reads
/// them (when `listen.postgres` is set): one problem each. (Kubernetes
/// clusters' are not read: no proxy serves them yet.)
pub fn ca_file_problems(config: &crate::config::Config) -> Vec<crate::config::Problem> {
    if config.listen.postgres.is_none() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (name, tls) in &config.database_tls {
        if let Some(path) = &tls.ca_file {
            if let Err(e) = ca_bundle(path) {
                out.push(crate::config::Problem {
                    path: format!("resources.databases[{name}].ca_file"),
                    message: e.to_string(),
                });
            }
        }
    }
    out
}

/// How wicketd verifies database `database`'s server: against the PEM
/// bundle at `ca_file`, or without one against Wicket's own TLS CA. A
/// certificate from Wicket's TLS CA (either way) must be one issued for
/// that database (`wicketd databases server-cert --database`), not
/// another's for the same host name.
pub fn upstream_verifier(
    keys: &AuthorityKeys,
    ca_file: Option<&std::path::Path>,
    database: &str,
) -> Result<Arc<dyn ServerCertVerifier>> {
    let own = keys.tls.cert_der();
    // Wicket's own CA signs every database's certificate: each of its
    // certificates is taken only for its own database, whatever the
    // `ca_file` holds (Wicket's CA certificate byte for byte, or another
    // encoding of it, or none: then webpki refuses them anyway); another
    // CA's certificates are taken as they are.
    let roots = match ca_file {
        Some(path) => ca_bundle(path)?,
        None => {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from(own.to_vec()))
                .map_err(|e| Error::BadRequest(format!("Wicket's TLS CA certificate: {e}")))?;
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| Error::Internal(format!("upstream verifier: {e}")))?;
    Ok(Arc::new(OwnDatabase {
        webpki,
        database: database.to_owned(),
        ca: wicket_ca::IssuerNames::of(own)
            .map_err(|e| Error::Internal(format!("Wicket's TLS CA: {e}")))?,
    }))
}

/// A server certificate verified by `webpki`; if it is from Wicket's TLS
/// CA (`ca`), one issued for this database.
#[derive(Debug)]
struct OwnDatabase {
    webpki: Arc<WebPkiServerVerifier>,
    database: String,
    ca: wicket_ca::IssuerNames,
}

impl ServerCertVerifier for OwnDatabase {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match self.ca.database_claim(end_entity.as_ref()) {
            // Another CA in a `ca_file` beside Wicket's: its certificates
            // name no database.
            DatabaseClaim::Foreign => Ok(verified),
            DatabaseClaim::Named(name) if name == self.database => Ok(verified),
            DatabaseClaim::Named(name) => Err(rustls::Error::General(format!(
                "the server's certificate is for database {name:?}, not {:?}",
                self.database
            ))),
            DatabaseClaim::Unnamed => Err(rustls::Error::General(format!(
                "the server's certificate is from Wicket's TLS CA but names no database (issue one \
                 with `wicketd databases server-cert --database {}`)",
                self.database
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A client config presenting `chain` (leaf first) with `key_pkcs8` and
/// verifying the server with `verifier` (see [`upstream_verifier`]).
pub fn upstream_client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    chain: Vec<Vec<u8>>,
    key_pkcs8: &[u8],
) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
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

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use wicket_ca::{ServerRole, X509Ca, X509CaKind};

    const NOW: i64 = 1_700_000_000;

    fn leaf(ca: &X509Ca, role: ServerRole<'_>) -> CertificateDer<'static> {
        let rng = SystemRandom::new();
        let (_, spki) = wicket_ca::x509::new_p256_key(&rng).unwrap();
        let issued = ca
            .issue_server(
                &ServerCertRequest {
                    spki_der: &spki,
                    names: &["db.internal".into()],
                    validity: Validity::new(NOW - 300, NOW + 86_400).unwrap(),
                    role,
                },
                &rng,
            )
            .unwrap();
        CertificateDer::from(issued.der)
    }

    /// `check-config` reads each `ca_file` as `start` will: a missing
    /// file, one with no certificate and one whose certificate does not
    /// parse are each a problem at their resource; a good bundle is none.
    #[test]
    fn ca_files_are_read_by_the_check() {
        let rng = SystemRandom::new();
        let (keys, _) = AuthorityKeys::generate("t", NOW, &rng).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.pem"), keys.tls.cert_pem()).unwrap();
        std::fs::write(dir.path().join("empty.pem"), "no certificate here\n").unwrap();
        std::fs::write(
            dir.path().join("broken.pem"),
            wicket_ca::x509::pem_encode("CERTIFICATE", b"not DER"),
        )
        .unwrap();
        let text = "version: 1
listen: { postgres: '127.0.0.1:0' }
resources:
  databases:
    - { name: good, address: '10.0.0.1:5432', ca_file: good.pem }
    - { name: gone, address: '10.0.0.2:5432', ca_file: gone.pem }
    - { name: empty, address: '10.0.0.3:5432', ca_file: empty.pem }
    - { name: k, address: '10.0.0.4:5432', ca_file: broken.pem }
  kube_clusters:
    - { name: k8s, address: 'https://10.0.0.5:6443', ca_file: gone.pem }
";
        let problems = |text: &str| -> Vec<String> {
            let config = crate::config::parse(text, dir.path()).unwrap();
            ca_file_problems(&config)
                .into_iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect()
        };
        // Without the PostgreSQL listener, `start` reads none of them.
        assert!(problems(&text.replace("listen: { postgres: '127.0.0.1:0' }\n", "")).is_empty());
        let found = problems(text);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("resources.databases[empty].ca_file: ")
                && found[0].ends_with("no CERTIFICATE in the file"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("resources.databases[gone].ca_file: cannot read "),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("resources.databases[k].ca_file: ")
                && found[2].contains("certificate 1: "),
            "{found:?}"
        );
    }

    /// A listener's certificate is made anew at half its life, and until
    /// then the same one is served; what a client checks it against (the
    /// TLS CA, the names) passes at every point of a long run.
    #[test]
    fn a_server_certificate_is_renewed_at_half_its_life() {
        let rng = SystemRandom::new();
        let (keys, _) = AuthorityKeys::generate("t", NOW - 86_400, &rng).unwrap();
        let keys = Arc::new(keys);
        let names = vec!["db.internal".to_owned()];
        let r = Renewing::new(keys.clone(), &names, NOW).unwrap();
        let not_after = |ck: &rustls::sign::CertifiedKey| {
            let (_, c) = x509_parser::parse_x509_certificate(&ck.cert[0]).unwrap();
            c.validity().not_after.timestamp()
        };
        let first = r.at(NOW);
        assert_eq!(not_after(&first), NOW + SERVER_CERT_LIFETIME);
        let half = NOW + SERVER_CERT_LIFETIME / 2;
        assert!(Arc::ptr_eq(&first, &r.at(half - 1)));
        let second = r.at(half);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(not_after(&second), half + SERVER_CERT_LIFETIME);
        assert!(Arc::ptr_eq(&second, &r.at(half + 10)));
        // Long after the first would have expired, a client trusting the
        // TLS CA accepts what is served.
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(keys.tls.cert_der().to_vec()))
            .unwrap();
        let v = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let later = NOW + 2 * SERVER_CERT_LIFETIME;
        let served = r.at(later);
        let name = ServerName::try_from("db.internal").unwrap();
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(later as u64 + 60));
        v.verify_server_cert(&served.cert[0], &served.cert[1..], &name, &[], at)
            .unwrap();
        let stale = v.verify_server_cert(&first.cert[0], &first.cert[1..], &name, &[], at);
        assert!(stale.is_err(), "the first certificate had expired");
        // Made on a clock that ran a day ahead: once the clock is put
        // right, a new one, valid now.
        let ahead = Renewing::new(keys.clone(), &names, NOW + 86_400).unwrap();
        let served = ahead.at(NOW);
        let (_, c) = x509_parser::parse_x509_certificate(&served.cert[0]).unwrap();
        assert!(c.validity().not_before.timestamp() <= NOW);
        assert!(Arc::ptr_eq(&served, &ahead.at(NOW + 10)));
    }

    fn verify(v: &dyn ServerCertVerifier, leaf: &CertificateDer<'_>) -> Result<(), String> {
        let name = ServerName::try_from("db.internal").unwrap();
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(NOW as u64 + 60));
        v.verify_server_cert(leaf, &[], &name, &[], at)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A certificate from Wicket's TLS CA stands only for the database it
    /// names, with or without a `ca_file`; another CA's, in a `ca_file`
    /// beside Wicket's, is taken as it is.
    #[test]
    fn wickets_database_certificates_stand_only_for_their_database() {
        let (keys, _) = AuthorityKeys::generate("wicket", NOW, &SystemRandom::new()).unwrap();
        let validity = Validity::new(NOW - 3600, NOW + 86_400 * 365).unwrap();
        let (other, _) = X509Ca::generate(X509CaKind::Tls, "elsewhere", validity).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        std::fs::write(
            &bundle,
            format!("{}{}", other.cert_pem(), keys.tls.cert_pem()),
        )
        .unwrap();
        let own_a = leaf(&keys.tls, ServerRole::Database("db-a"));
        let own_b = leaf(&keys.tls, ServerRole::Database("db-b"));
        let proxy = leaf(&keys.tls, ServerRole::Proxy);
        let foreign = leaf(&other, ServerRole::Proxy);
        for ca_file in [None, Some(bundle.as_path())] {
            let v = upstream_verifier(&keys, ca_file, "db-a").unwrap();
            assert_eq!(verify(v.as_ref(), &own_a), Ok(()));
            let e = verify(v.as_ref(), &own_b).unwrap_err();
            assert!(e.contains("for database \"db-b\", not \"db-a\""), "{e}");
            let e = verify(v.as_ref(), &proxy).unwrap_err();
            assert!(e.contains("names no database"), "{e}");
            assert_eq!(verify(v.as_ref(), &foreign).is_ok(), ca_file.is_some());
        }
        // A `ca_file` without Wicket's CA: its certificates as they are.
        std::fs::write(&bundle, other.cert_pem()).unwrap();
        let v = upstream_verifier(&keys, Some(&bundle), "db-a").unwrap();
        assert_eq!(verify(v.as_ref(), &foreign), Ok(()));
        assert!(verify(v.as_ref(), &own_a).is_err());
    }
}
