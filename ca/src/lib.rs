//! Wicket's certificate authority.
//!
//! This crate holds the CA key sets (SSH user CA, SSH node-login CA, SSH host
//! CA for nodes, SSH proxy host CA, the X.509 CA for TLS server and user client
//! certificates, and the X.509 database-client CA),
//! issues OpenSSH user/host certificates and X.509 client/server certificates,
//! and verifies them at a given time. It is pure: it never touches the network,
//! a database, the file system or the clock. Every validity window and every
//! "now" is a parameter, and randomness comes from the `ring` generator the
//! caller passes in. Persisting keys (0600 files) is the daemon's job; this
//! crate only turns keys into bytes and back.

mod der;
pub use ssh::{cert_to_openssh, fingerprint as ssh_fingerprint, SshPublicKey};
pub use x509::{pem_decode, pem_decode_all, pem_encode};
mod identity;
mod keys;
pub mod ssh;
pub mod x509;

pub use identity::{Identity, IDENTITY_OID};
pub use keys::{AuthorityKeys, KeyFile};
pub use ssh::{
    DerivedSecret, SshCa, SshCertKind, SshCertificateRequest, SshPermissions, TrustedSshCas,
    VerifiedSshCert,
};
pub use x509::{
    is_proxy_server, DatabaseClaim, IssuerNames, ServerCertRequest, ServerRole, TrustedX509Cas,
    VerifiedClientCert, X509Ca, X509CaKind, X509Issued, DATABASE_URN_PREFIX,
};

/// A validity window in Unix seconds: `not_before <= t < not_after`.
///
/// SSH certificates encode it as `valid_after`/`valid_before`, X.509 as
/// `notBefore`/`notAfter`. The window is always passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    pub fn new(not_before: i64, not_after: i64) -> Result<Self, Error> {
        if not_before < 0 || not_after <= not_before {
            return Err(Error::InvalidRequest(format!(
                "validity window is empty or negative ({not_before}..{not_after})"
            )));
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    pub fn contains(&self, t: i64) -> bool {
        self.not_before <= t && t < self.not_after
    }
}

/// Everything that can go wrong inside the CA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),
    #[error("malformed public key: {0}")]
    MalformedPublicKey(String),
    #[error("malformed certificate: {0}")]
    MalformedCertificate(String),
    #[error("certificate rejected: {0}")]
    Rejected(String),
    #[error("malformed CA key material: {0}")]
    KeyMaterial(String),
    #[error("signing failed")]
    Signing,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `sha256:<hex>` of a DER-encoded SubjectPublicKeyInfo: the pin a client checks
/// the TLS CA against (the same idea as kubeadm's CA cert hash).
pub fn spki_pin(spki_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    format!("sha256:{}", hex(digest.as_ref()))
}

/// Lower-case hex, as pins, fingerprints and the audit chain print digests.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

/// A random serial number (positive, 63 bits) from the caller's generator.
pub fn random_serial(rng: &dyn ring::rand::SecureRandom) -> Result<u64> {
    let mut b = [0u8; 8];
    rng.fill(&mut b).map_err(|_| Error::Signing)?;
    Ok(u64::from_be_bytes(b) & 0x7fff_ffff_ffff_ffff)
}
