//! X.509: the CA certificates (made with `rcgen`), client certificates (encoded
//! here from a precomputed issuer template, because they are issued on every
//! login and carry Wicket's identity extension under a 128-bit OID arc), server
//! certificates (via `rcgen`), and chain verification at a given time (via
//! `x509-parser` with `ring` signature checks).

use crate::der::{self, TAG_SEQUENCE};
use crate::identity::identity_oid;
use crate::{Error, Identity, Result, Validity};
use ring::rand::SecureRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Which X.509 CA this is; the kind goes into the CA's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X509CaKind {
    /// Signs wicketd's TLS server certificates and users' client certificates.
    Tls,
    /// Signs the short-lived client certificates wicketd presents to databases.
    DatabaseClient,
}

impl X509CaKind {
    fn common_name(self) -> &'static str {
        match self {
            X509CaKind::Tls => "Wicket TLS CA",
            X509CaKind::DatabaseClient => "Wicket Database Client CA",
        }
    }
}

/// An issued certificate and its serial (as `openssl x509 -serial` shows it,
/// colon-separated lower-case hex), so callers never re-parse what was issued.
#[derive(Debug, Clone)]
pub struct X509Issued {
    pub der: Vec<u8>,
    pub serial_hex: String,
}

/// A random positive 16-byte serial (never starting with a zero byte, so its
/// DER INTEGER is exactly these bytes).
fn random_x509_serial(rng: &dyn SecureRandom) -> Result<[u8; 16]> {
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).map_err(|_| Error::Signing)?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

fn serial_hex(serial: &[u8]) -> String {
    serial
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fresh ECDSA P-256 key for a TLS endpoint: (PKCS#8 DER, SubjectPublicKeyInfo DER).
pub fn new_p256_key(rng: &dyn SecureRandom) -> Result<(Vec<u8>, Vec<u8>)> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| Error::KeyMaterial("cannot generate a P-256 key".into()))?;
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
        .map_err(|_| Error::KeyMaterial("cannot load a P-256 key".into()))?;
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(kp.public_key().as_ref());
    Ok((pkcs8.as_ref().to_vec(), spki))
}

impl X509Issued {
    pub fn pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }
}

/// A server certificate to issue: the subject's SPKI and its DNS names / IPs.
#[derive(Debug, Clone)]
pub struct ServerCertRequest<'a> {
    pub spki_der: &'a [u8],
    pub names: &'a [String],
    pub validity: Validity,
    pub role: ServerRole<'a>,
}

/// What a server certificate from Wicket's TLS CA is for. Clients of
/// wicketd accept only [`ServerRole::Proxy`] ones ([`is_proxy_server`]), so
/// a database's certificate from the same CA, for the same name, cannot
/// stand in for wicketd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRole<'a> {
    /// wicketd itself (subject OU [`PROXY_SERVER_OU`]).
    Proxy,
    /// The database resource of this name behind wicketd (`wicketd
    /// databases server-cert`): named in a URI SAN
    /// ([`DATABASE_URN_PREFIX`]), so that one database's certificate
    /// cannot stand in for another's on a shared host name.
    Database(&'a str),
}

/// What begins the URI SAN naming a database's certificate's resource.
pub const DATABASE_URN_PREFIX: &str = "urn:wicket:database:";

/// What a server certificate, already verified against roots that include
/// Wicket's TLS CA, says about the database it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseClaim {
    /// Not issued by Wicket's TLS CA: another root's, taken as it is.
    Foreign,
    /// Issued by it for this database ([`ServerRole::Database`]).
    Named(String),
    /// Issued by it, naming no database (wicketd's own, say) or more than
    /// one; also anything unreadable.
    Unnamed,
}

/// A CA's names, read once from its certificate: which certificates of a
/// verified chain it issued (its subject is their issuer and, where both
/// name one, the key identifiers agree), and what they claim.
#[derive(Debug, Clone)]
pub struct IssuerNames {
    subject: Vec<u8>,
    key_id: Option<Vec<u8>>,
}

impl IssuerNames {
    pub fn of(ca_der: &[u8]) -> Result<Self> {
        use x509_parser::prelude::{FromDer, ParsedExtension};
        let (_, ca) = x509_parser::certificate::X509Certificate::from_der(ca_der)
            .map_err(|e| Error::InvalidRequest(format!("CA certificate: {e}")))?;
        let key_id = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        Ok(IssuerNames {
            subject: ca.subject().as_raw().to_vec(),
            key_id,
        })
    }

    /// What `leaf` claims (read once).
    pub fn database_claim(&self, leaf: &[u8]) -> DatabaseClaim {
        use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension};
        let Ok((_, c)) = x509_parser::certificate::X509Certificate::from_der(leaf) else {
            return DatabaseClaim::Unnamed;
        };
        let aki = c
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0)
                }
                _ => None,
            });
        let keys_agree = match (aki, &self.key_id) {
            (Some(a), Some(k)) => a == k.as_slice(),
            _ => true,
        };
        if c.issuer().as_raw() != self.subject.as_slice() || !keys_agree {
            return DatabaseClaim::Foreign;
        }
        let Ok(Some(san)) = c.subject_alternative_name() else {
            return DatabaseClaim::Unnamed;
        };
        let mut named = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(DATABASE_URN_PREFIX),
            _ => None,
        });
        match (named.next(), named.next()) {
            (Some(name), None) => DatabaseClaim::Named(name.to_owned()),
            _ => DatabaseClaim::Unnamed,
        }
    }
}

/// The subject OU that marks wicketd's own server certificates.
pub const PROXY_SERVER_OU: &str = "wicketd proxy";

/// Whether `der` is a server certificate Wicket issued for wicketd itself
/// (checked after the chain is verified).
pub fn is_proxy_server(der: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, c)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return false;
    };
    let ous: Vec<&str> = c
        .subject()
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .collect();
    ous == [PROXY_SERVER_OU]
}

/// An X.509 CA: an ECDSA P-256 key and its self-signed certificate.
pub struct X509Ca {
    kind: X509CaKind,
    signer: EcdsaKeyPair,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_der: Vec<u8>,
    /// The CA's subject Name, DER, copied into issued certificates' issuer field.
    subject_der: Vec<u8>,
    /// The CA's key identifier (SHA-256 of its public key, truncated), for AKI.
    key_id: Vec<u8>,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for X509Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Ca")
            .field("kind", &self.kind)
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

fn offset_time(t: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map_err(|_| Error::InvalidRequest(format!("time {t} out of range")))
}

fn rcgen_err(e: rcgen::Error) -> Error {
    Error::KeyMaterial(e.to_string())
}

impl X509Ca {
    /// Generates a CA key and self-signed certificate valid for `validity`.
    /// Returns the CA and its key as PKCS#8 PEM (for a 0600 file).
    pub fn generate(kind: X509CaKind, cluster: &str, validity: Validity) -> Result<(Self, String)> {
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err)?;
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Wicket");
        dn.push(rcgen::DnType::OrganizationalUnitName, cluster);
        dn.push(rcgen::DnType::CommonName, kind.common_name());
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset_time(validity.not_before)?;
        params.not_after = offset_time(validity.not_after)?;
        let serial = random_x509_serial(&ring::rand::SystemRandom::new())?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.self_signed(&key).map_err(rcgen_err)?;
        let key_pem = key.serialize_pem();
        let ca = Self::from_pem(kind, &key_pem, &cert.pem())?;
        Ok((ca, key_pem))
    }

    /// Loads a CA from its PKCS#8 key PEM and certificate PEM, checking they match.
    pub fn from_pem(kind: X509CaKind, key_pem: &str, cert_pem: &str) -> Result<Self> {
        let key_der = pem_decode("PRIVATE KEY", key_pem)?;
        let cert_der = pem_decode("CERTIFICATE", cert_pem)?;
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &key_der,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| Error::KeyMaterial(format!("X.509 CA key: {e}")))?;
        let rc_key = rcgen::KeyPair::from_pem(key_pem).map_err(rcgen_err)?;
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&cert_der.clone().into(), rc_key).map_err(rcgen_err)?;
        let (rest, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| Error::KeyMaterial(format!("CA certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::KeyMaterial(
                "CA certificate has trailing bytes".into(),
            ));
        }
        if cert.public_key().subject_public_key.data.as_ref() != signer.public_key().as_ref() {
            return Err(Error::KeyMaterial(
                "CA certificate does not match the CA key".into(),
            ));
        }
        let subject_der = cert.subject().as_raw().to_vec();
        let spki_der = cert.public_key().raw.to_vec();
        // Issued certificates' authorityKeyIdentifier must equal the CA's
        // subjectKeyIdentifier, or path builders (OpenSSL) will not find it.
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            })
            .ok_or_else(|| {
                Error::KeyMaterial("CA certificate has no subjectKeyIdentifier".into())
            })?;
        Ok(Self {
            kind,
            signer,
            issuer,
            cert_der,
            subject_der,
            key_id,
            spki_der,
        })
    }

    pub fn kind(&self) -> X509CaKind {
        self.kind
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo.
    pub fn pin(&self) -> String {
        crate::spki_pin(&self.spki_der)
    }

    /// Verifies a PKCS#10 request (PEM or DER) and returns the requester's SPKI:
    /// proof that the client holds the private key, which never leaves it.
    pub fn spki_from_csr(csr: &[u8]) -> Result<Vec<u8>> {
        let der = if csr.starts_with(b"-----BEGIN") {
            let text = std::str::from_utf8(csr)
                .map_err(|_| Error::MalformedPublicKey("CSR PEM is not UTF-8".into()))?;
            pem_decode("CERTIFICATE REQUEST", text)?
        } else {
            csr.to_vec()
        };
        let (rest, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                .map_err(|e| Error::MalformedPublicKey(format!("CSR: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::MalformedPublicKey("CSR has trailing bytes".into()));
        }
        req.verify_signature()
            .map_err(|_| Error::MalformedPublicKey("CSR signature does not verify".into()))?;
        let spki = &req.certification_request_info.subject_pki;
        check_client_spki(spki)?;
        Ok(spki.raw.to_vec())
    }

    /// Issues a client certificate: subject CN = `common_name`, EKU clientAuth,
    /// Wicket's identity extension when `identity` is given.
    pub fn issue_client(
        &self,
        spki_der: &[u8],
        common_name: &str,
        identity: Option<&Identity>,
        validity: Validity,
        rng: &dyn SecureRandom,
    ) -> Result<X509Issued> {
        if common_name.is_empty() || common_name.len() > 64 {
            return Err(Error::InvalidRequest(
                "common name must be 1-64 bytes".into(),
            ));
        }
        if let Some(id) = identity {
            id.validate()?;
        }
        let serial = random_x509_serial(rng)?;
        let mut tbs = Vec::with_capacity(512);
        der::write_nested(&mut tbs, TAG_SEQUENCE, |t| {
            t.extend_from_slice(&[0xa0, 0x03, 0x02, 0x01, 0x02]); // [0] v3
            der::write_unsigned_integer(t, &serial);
            t.extend_from_slice(ECDSA_SHA256_ALG);
            t.extend_from_slice(&self.subject_der);
            der::write_nested(t, TAG_SEQUENCE, |v| {
                write_time(v, validity.not_before);
                write_time(v, validity.not_after);
            });
            der::write_nested(t, TAG_SEQUENCE, |name| {
                der::write_nested(name, der::TAG_SET, |set| {
                    der::write_nested(set, TAG_SEQUENCE, |atv| {
                        der::write_tlv(atv, der::TAG_OID, &[0x55, 0x04, 0x03]);
                        der::write_tlv(atv, der::TAG_UTF8_STRING, common_name.as_bytes());
                    });
                });
            });
            t.extend_from_slice(spki_der);
            der::write_nested(t, 0xa3, |x| {
                der::write_nested(x, TAG_SEQUENCE, |exts| {
                    // basicConstraints: critical, CA:FALSE
                    write_ext(exts, &[0x55, 0x1d, 0x13], true, &[0x30, 0x00]);
                    // keyUsage: critical, digitalSignature
                    write_ext(exts, &[0x55, 0x1d, 0x0f], true, &[0x03, 0x02, 0x07, 0x80]);
                    // extKeyUsage: clientAuth
                    write_ext(
                        exts,
                        &[0x55, 0x1d, 0x25],
                        false,
                        &[
                            0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
                        ],
                    );
                    // authorityKeyIdentifier: [0] keyIdentifier
                    let mut aki = Vec::with_capacity(24);
                    der::write_nested(&mut aki, TAG_SEQUENCE, |s| {
                        der::write_tlv(s, 0x80, &self.key_id)
                    });
                    write_ext(exts, &[0x55, 0x1d, 0x23], false, &aki);
                    if let Some(id) = identity {
                        write_ext(exts, &identity_oid(), false, &id.to_der());
                    }
                });
            });
        });
        let sig = self.signer.sign(rng, &tbs).map_err(|_| Error::Signing)?;
        let mut der_out = Vec::with_capacity(tbs.len() + 96);
        der::write_header(
            &mut der_out,
            TAG_SEQUENCE,
            tbs.len() + ECDSA_SHA256_ALG.len() + bit_string_len(sig.as_ref().len()),
        );
        der_out.extend_from_slice(&tbs);
        der_out.extend_from_slice(ECDSA_SHA256_ALG);
        der::write_header(&mut der_out, der::TAG_BIT_STRING, sig.as_ref().len() + 1);
        der_out.push(0);
        der_out.extend_from_slice(sig.as_ref());
        Ok(X509Issued {
            der: der_out,
            serial_hex: serial_hex(&serial),
        })
    }

    /// Issues a TLS server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(
        &self,
        req: &ServerCertRequest<'_>,
        rng: &dyn SecureRandom,
    ) -> Result<X509Issued> {
        let mut params = rcgen::CertificateParams::new(req.names.to_vec()).map_err(rcgen_err)?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            req.names.first().map(String::as_str).unwrap_or("wicketd"),
        );
        match req.role {
            ServerRole::Proxy => dn.push(rcgen::DnType::OrganizationalUnitName, PROXY_SERVER_OU),
            ServerRole::Database(name) => {
                let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
                if name.is_empty() || !name.chars().all(plain) {
                    return Err(Error::InvalidRequest(format!(
                        "database name {name:?} is not a resource name (letters, digits and . _ -)"
                    )));
                }
                let uri =
                    rcgen::string::Ia5String::try_from(format!("{DATABASE_URN_PREFIX}{name}"))
                        .map_err(|_| {
                            Error::InvalidRequest(format!(
                                "database name {name:?} is not plain ASCII"
                            ))
                        })?;
                params.subject_alt_names.push(rcgen::SanType::URI(uri));
            }
        }
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset_time(req.validity.not_before)?;
        params.not_after = offset_time(req.validity.not_after)?;
        let serial = random_x509_serial(rng)?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let spki = rcgen::SubjectPublicKeyInfo::from_der(req.spki_der).map_err(rcgen_err)?;
        let cert = params.signed_by(&spki, &self.issuer).map_err(rcgen_err)?;
        Ok(X509Issued {
            der: cert.der().to_vec(),
            serial_hex: serial_hex(&serial),
        })
    }
}

/// AlgorithmIdentifier { ecdsa-with-SHA256 } (no parameters).
const ECDSA_SHA256_ALG: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

fn bit_string_len(content: usize) -> usize {
    let mut v = Vec::new();
    der::write_header(&mut v, der::TAG_BIT_STRING, content + 1);
    v.len() + content + 1
}

fn write_ext(out: &mut Vec<u8>, oid: &[u8], critical: bool, value: &[u8]) {
    der::write_nested(out, TAG_SEQUENCE, |e| {
        der::write_tlv(e, der::TAG_OID, oid);
        if critical {
            der::write_tlv(e, der::TAG_BOOLEAN, &[0xff]);
        }
        der::write_tlv(e, der::TAG_OCTET_STRING, value);
    });
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// RFC 5280: UTCTime through 2049, GeneralizedTime from 2050.
fn write_time(out: &mut Vec<u8>, t: i64) {
    let (y, mo, d) = civil_from_days(t.div_euclid(86_400));
    let secs = t.rem_euclid(86_400);
    let (h, mi, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if (1950..2050).contains(&y) {
        let text = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100);
        der::write_tlv(out, der::TAG_UTC_TIME, text.as_bytes());
    } else {
        let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z");
        der::write_tlv(out, der::TAG_GENERALIZED_TIME, text.as_bytes());
    }
}

fn check_client_spki(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<()> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
    let alg = &spki.algorithm.algorithm;
    // ECDSA on P-256 only, as said: the curve is the key's parameter.
    let p256 = || {
        spki.algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
    };
    if (*alg == OID_KEY_TYPE_EC_PUBLIC_KEY && p256()) || *alg == OID_SIG_ED25519 {
        Ok(())
    } else {
        Err(Error::MalformedPublicKey(format!(
            "unsupported client key algorithm {alg}; use ECDSA P-256 or Ed25519"
        )))
    }
}

/// A client certificate that passed verification.
#[derive(Debug, Clone)]
pub struct VerifiedClientCert {
    pub common_name: String,
    pub identity: Option<Identity>,
    pub serial_hex: String,
    pub validity: Validity,
    /// The pin of the CA that signed it.
    pub ca_pin: String,
}

/// One trusted CA, parsed once when the verifier is built (verification runs
/// on every connection).
#[derive(Debug, Clone)]
struct TrustedCa {
    der: Vec<u8>,
    subject: Vec<u8>,
    /// Uncompressed P-256 public point.
    point: Vec<u8>,
    validity: Validity,
    pin: String,
}

/// The X.509 CA certificates a verifier trusts (several, for rotation).
#[derive(Debug, Clone, Default)]
pub struct TrustedX509Cas {
    cas: Vec<TrustedCa>,
}

impl TrustedX509Cas {
    /// Parses the CA certificates (ECDSA P-256 CAs, as Wicket makes them).
    pub fn new(cas: impl IntoIterator<Item = Vec<u8>>) -> Result<Self> {
        use x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
        let mut out = Vec::new();
        for der in cas {
            let (_, c) = X509Certificate::from_der(&der)
                .map_err(|e| Error::KeyMaterial(format!("trusted CA certificate: {e}")))?;
            if !c.is_ca() {
                return Err(Error::KeyMaterial(
                    "a trusted CA certificate is not a CA".into(),
                ));
            }
            if c.public_key().algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
                return Err(Error::KeyMaterial("trusted CAs must be ECDSA P-256".into()));
            }
            let entry = TrustedCa {
                subject: c.subject().as_raw().to_vec(),
                point: c.public_key().subject_public_key.data.to_vec(),
                validity: Validity {
                    not_before: c.validity().not_before.timestamp(),
                    not_after: c.validity().not_after.timestamp(),
                },
                pin: crate::spki_pin(c.public_key().raw),
                der: Vec::new(),
            };
            out.push(TrustedCa { der, ..entry });
        }
        Ok(Self { cas: out })
    }

    pub fn ders(&self) -> impl Iterator<Item = &[u8]> {
        self.cas.iter().map(|c| c.der.as_slice())
    }

    /// Verifies a client certificate (DER) issued directly by a trusted CA, at `now`.
    pub fn verify_client(&self, leaf_der: &[u8], now: i64) -> Result<VerifiedClientCert> {
        use x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256;
        let rejected = |m: &str| Error::Rejected(m.to_owned());
        let (rest, leaf) = X509Certificate::from_der(leaf_der)
            .map_err(|e| Error::MalformedCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::MalformedCertificate("trailing bytes".into()));
        }
        let signed_by = |ca: &TrustedCa| {
            leaf.signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA256
                && ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_ASN1,
                    &ca.point,
                )
                .verify(leaf.tbs_certificate.as_ref(), &leaf.signature_value.data)
                .is_ok()
        };
        let ca = self
            .cas
            .iter()
            .find(|ca| ca.subject == leaf.issuer().as_raw() && signed_by(ca))
            .ok_or_else(|| rejected("certificate is not signed by a trusted Wicket CA"))?;
        if !ca.validity.contains(now) {
            return Err(rejected("the issuing CA certificate is not valid now"));
        }
        let v = leaf.validity();
        if now < v.not_before.timestamp() {
            return Err(rejected("certificate is not valid yet"));
        }
        // Wicket's windows end before `expires_at`, as SSH's `valid_before`
        // does and grants do (RFC 5280 would still accept that second).
        if now >= v.not_after.timestamp() {
            return Err(rejected("certificate has expired"));
        }
        if leaf.is_ca() {
            return Err(rejected("a CA certificate cannot be a client certificate"));
        }
        match leaf.extended_key_usage() {
            Ok(Some(eku)) if !(eku.value.client_auth || eku.value.any) => {
                return Err(rejected("certificate is not for client authentication"))
            }
            Err(_) => return Err(rejected("malformed extended key usage")),
            _ => {}
        }
        let id_oid = identity_oid();
        let mut identity = None;
        for ext in leaf.extensions() {
            if ext.oid.as_bytes() == id_oid.as_slice() {
                identity = Some(Identity::from_der(ext.value)?);
            } else if ext.critical && !KNOWN_CRITICAL.contains(&ext.oid.as_bytes()) {
                return Err(rejected("unsupported critical extension"));
            }
        }
        let common_name = leaf
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| rejected("certificate has no common name"))?
            .to_owned();
        if let Some(id) = &identity {
            if id.user != common_name {
                return Err(rejected("identity extension does not match the subject"));
            }
        }
        Ok(VerifiedClientCert {
            common_name,
            identity,
            serial_hex: leaf.raw_serial_as_string(),
            validity: Validity {
                not_before: v.not_before.timestamp(),
                not_after: v.not_after.timestamp(),
            },
            ca_pin: ca.pin.clone(),
        })
    }
}

/// basicConstraints, keyUsage, extKeyUsage, subjectAltName, nameConstraints.
const KNOWN_CRITICAL: &[&[u8]] = &[
    &[0x55, 0x1d, 0x13],
    &[0x55, 0x1d, 0x0f],
    &[0x55, 0x1d, 0x25],
    &[0x55, 0x1d, 0x11],
    &[0x55, 0x1d, 0x1e],
];

/// PEM-encodes DER with the given label.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64ct::{Base64, Encoding};
    let b64 = Base64::encode_string(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Decodes the first PEM block with `label`.
pub fn pem_decode(label: &str, text: &str) -> Result<Vec<u8>> {
    pem_decode_all(label, text)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::MalformedCertificate(format!("no {label} PEM block")))
}

/// Decodes every PEM block with `label`, in order.
pub fn pem_decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>> {
    use base64ct::{Base64, Encoding};
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after.find(&end).ok_or_else(|| {
            Error::MalformedCertificate(format!("unterminated {label} PEM block"))
        })?;
        let body: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        out.push(
            Base64::decode_vec(&body)
                .map_err(|_| Error::MalformedCertificate(format!("{label} PEM is not base64")))?,
        );
        rest = &after[stop + end.len()..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use ring::rand::SystemRandom;

    fn ca() -> X509Ca {
        X509Ca::generate(
            X509CaKind::Tls,
            "test",
            Validity::new(0, 4_000_000_000).unwrap(),
        )
        .unwrap()
        .0
    }

    fn client_spki() -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        X509Ca::spki_from_csr(csr.der()).unwrap()
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        let mut v = Vec::new();
        write_time(&mut v, 2_524_608_000); // 2050-01-01T00:00:00Z
        assert_eq!(&v[2..], b"20500101000000Z");
        assert_eq!(v[0], der::TAG_GENERALIZED_TIME);
    }

    #[test]
    fn client_certificate_round_trip() {
        let ca = ca();
        let rng = SystemRandom::new();
        let id = Identity {
            user: "alice".into(),
            roles: vec!["dev".into()],
            request_ids: vec!["req-1".into(), "req-2".into()],
            login_until: Some(1_700_003_000),
        };
        let cert = ca
            .issue_client(
                &client_spki(),
                "alice",
                Some(&id),
                Validity::new(1_700_000_000, 1_700_003_600).unwrap(),
                &rng,
            )
            .unwrap();
        let trusted = TrustedX509Cas::new([ca.cert_der().to_vec()]).unwrap();
        let v = trusted.verify_client(&cert.der, 1_700_000_100).unwrap();
        assert_eq!(v.identity.as_ref(), Some(&id));
        assert_eq!(v.common_name, "alice");
        assert_eq!(
            v.validity,
            Validity::new(1_700_000_000, 1_700_003_600).unwrap()
        );
        assert_eq!(v.ca_pin, ca.pin());
        assert_eq!(
            v.serial_hex, cert.serial_hex,
            "the issued serial is the one in the certificate"
        );
        assert!(trusted
            .verify_client(&cert.der, 1_699_999_999)
            .unwrap_err()
            .to_string()
            .contains("not valid yet"));
        // The window ends before notAfter, as the grant and the SSH
        // certificate's do.
        assert!(trusted.verify_client(&cert.der, 1_700_003_599).is_ok());
        assert!(trusted
            .verify_client(&cert.der, 1_700_003_600)
            .unwrap_err()
            .to_string()
            .contains("expired"));
        let other = TrustedX509Cas::new([self::ca().cert_der().to_vec()]).unwrap();
        assert!(other
            .verify_client(&cert.der, 1_700_000_100)
            .unwrap_err()
            .to_string()
            .contains("trusted"));
        let mut tampered = cert.der.clone();
        let n = tampered.len();
        tampered[n - 10] ^= 0x01;
        assert!(trusted.verify_client(&tampered, 1_700_000_100).is_err());
        for n in 0..cert.der.len() {
            assert!(trusted
                .verify_client(&cert.der[..n], 1_700_000_100)
                .is_err());
        }
    }

    #[test]
    fn ca_reloads_from_pem_and_rejects_mismatch() {
        let (a, a_key) =
            X509Ca::generate(X509CaKind::Tls, "t", Validity::new(0, 10_000_000).unwrap()).unwrap();
        let (b, _) =
            X509Ca::generate(X509CaKind::Tls, "t", Validity::new(0, 10_000_000).unwrap()).unwrap();
        let again = X509Ca::from_pem(X509CaKind::Tls, &a_key, &a.cert_pem()).unwrap();
        assert_eq!(again.pin(), a.pin());
        assert!(X509Ca::from_pem(X509CaKind::Tls, &a_key, &b.cert_pem()).is_err());
    }

    /// Client keys are ECDSA on P-256 or Ed25519, as the refusal says;
    /// another curve is refused, however well signed its CSR.
    #[test]
    fn a_csr_is_taken_for_p256_and_ed25519_keys_only() {
        let csr_of = |alg: &'static rcgen::SignatureAlgorithm| {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            X509Ca::spki_from_csr(csr.der())
        };
        assert!(csr_of(&rcgen::PKCS_ECDSA_P256_SHA256).is_ok());
        assert!(csr_of(&rcgen::PKCS_ED25519).is_ok());
        let e = csr_of(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap_err();
        assert!(e.to_string().contains("use ECDSA P-256 or Ed25519"), "{e}");
    }

    #[test]
    fn csr_with_bad_signature_is_rejected() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let mut der = csr.der().to_vec();
        let n = der.len();
        der[n - 5] ^= 0x40;
        assert!(X509Ca::spki_from_csr(&der).is_err());
        assert!(X509Ca::spki_from_csr(b"garbage").is_err());
    }

    #[test]
    fn server_certificate_is_signed_by_ca_and_says_what_it_is_for() {
        let ca = ca();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = IssuerNames::of(ca.cert_der()).unwrap();
        for role in [ServerRole::Proxy, ServerRole::Database("prod-pg")] {
            let cert = ca
                .issue_server(
                    &ServerCertRequest {
                        spki_der: &key.subject_public_key_info(),
                        names: &["127.0.0.1".into(), "localhost".into()],
                        validity: Validity::new(0, 4_000_000_000).unwrap(),
                        role,
                    },
                    &SystemRandom::new(),
                )
                .unwrap();
            let (_, parsed) = X509Certificate::from_der(&cert.der).unwrap();
            assert_eq!(parsed.raw_serial_as_string(), cert.serial_hex);
            let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
            parsed.verify_signature(Some(ca_cert.public_key())).unwrap();
            // Only wicketd's own is taken for wicketd.
            assert_eq!(is_proxy_server(&cert.der), role == ServerRole::Proxy);
            // A database's names its resource; nothing else names one.
            assert_eq!(
                issuer.database_claim(&cert.der),
                match role {
                    ServerRole::Proxy => DatabaseClaim::Unnamed,
                    ServerRole::Database(name) => DatabaseClaim::Named(name.into()),
                }
            );
        }
        for bad in ["", "a b", "x\ny", "é"] {
            let e = ca.issue_server(
                &ServerCertRequest {
                    spki_der: &key.subject_public_key_info(),
                    names: &["db".into()],
                    validity: Validity::new(0, 4_000_000_000).unwrap(),
                    role: ServerRole::Database(bad),
                },
                &SystemRandom::new(),
            );
            assert!(e.is_err(), "{bad:?}");
        }
        // The CA itself (self-signed) names no database; another CA's
        // certificate is not this one's.
        assert_eq!(issuer.database_claim(ca.cert_der()), DatabaseClaim::Unnamed);
        let (other, _) = X509Ca::generate(
            X509CaKind::Tls,
            "elsewhere",
            Validity::new(0, 4_000_000_000).unwrap(),
        )
        .unwrap();
        let foreign = other
            .issue_server(
                &ServerCertRequest {
                    spki_der: &key.subject_public_key_info(),
                    names: &["db".into()],
                    validity: Validity::new(0, 4_000_000_000).unwrap(),
                    role: ServerRole::Database("prod-pg"),
                },
                &SystemRandom::new(),
            )
            .unwrap();
        assert_eq!(issuer.database_claim(&foreign.der), DatabaseClaim::Foreign);
        assert_eq!(
            issuer.database_claim(b"not a certificate"),
            DatabaseClaim::Unnamed
        );
        assert!(IssuerNames::of(b"not a certificate").is_err());
        assert!(!is_proxy_server(ca.cert_der()));
        assert!(!is_proxy_server(b"not a certificate"));
    }
}
