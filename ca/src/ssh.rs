//! OpenSSH certificates (PROTOCOL.certkeys): issue with an Ed25519 CA key held
//! by `ring`, verify against a set of trusted CA keys at a given time.
//!
//! Encoding is done here, in one pass into a pre-sized buffer, because issuance
//! is on the login hot path; parsing for verification goes through `ssh-key`.

use crate::identity::{SSH_EXT_LOGIN_UNTIL, SSH_EXT_REQUESTS, SSH_EXT_ROLES, SSH_EXT_USER};
use crate::{Error, Identity, Result, Validity};
use base64ct::{Base64, Base64Unpadded, Encoding};
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey};

const ED25519: &str = "ssh-ed25519";
const MAX_FIELD: usize = 1024;
const MAX_PRINCIPALS: usize = 256;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s);
}

/// Reads one SSH `string` from the front of `data`.
fn take_string<'a>(data: &mut &'a [u8]) -> Result<&'a [u8]> {
    let bad = || Error::MalformedPublicKey("truncated SSH string".into());
    if data.len() < 4 {
        return Err(bad());
    }
    let (len, rest) = data.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if rest.len() < len {
        return Err(bad());
    }
    let (s, rest) = rest.split_at(len);
    *data = rest;
    Ok(s)
}

/// `SHA256:<base64>` fingerprint of an SSH public key blob, as `ssh-keygen -l` prints it.
pub fn fingerprint(blob: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, blob);
    format!("SHA256:{}", Base64Unpadded::encode_string(d.as_ref()))
}

/// The SSH key types a user certificate is issued for.
const USER_KEY_TYPES: [&str; 4] = [
    ED25519,
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// A user's or host's public key, parsed once: the algorithm and the
/// algorithm-specific fields as they go into a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshPublicKey {
    algorithm: String,
    blob: Vec<u8>,
    fields_at: usize,
}

impl SshPublicKey {
    /// Parses `ssh-ed25519 AAAA... comment` (also ECDSA and RSA keys; not
    /// certificates, not security-key types).
    pub fn parse_openssh(text: &str) -> Result<Self> {
        let key = ssh_key::PublicKey::from_openssh(text.trim())
            .map_err(|e| Error::MalformedPublicKey(e.to_string()))?;
        let blob = key
            .to_bytes()
            .map_err(|e| Error::MalformedPublicKey(e.to_string()))?;
        Self::from_blob(blob)
    }

    /// A user's key, for a user certificate: [`Self::parse_openssh`], of a
    /// type the SSH listener verifies signatures of (Ed25519, ECDSA). An
    /// RSA key's certificate would never log in, and its size is not
    /// checked. (Host keys may be of any type [`Self::from_blob`] takes.)
    pub fn parse_user_key(text: &str) -> Result<Self> {
        let key = Self::parse_openssh(text)?;
        if !USER_KEY_TYPES.contains(&key.algorithm()) {
            return Err(Error::MalformedPublicKey(format!(
                "a {} key is not accepted; use one of {} (`wicket login` makes an ssh-ed25519 key)",
                key.algorithm(),
                USER_KEY_TYPES.join(", ")
            )));
        }
        Ok(key)
    }

    /// From the wire blob (`string alg, fields...`).
    pub fn from_blob(blob: Vec<u8>) -> Result<Self> {
        let mut rest = &blob[..];
        let alg = take_string(&mut rest)?;
        let algorithm = std::str::from_utf8(alg)
            .map_err(|_| Error::MalformedPublicKey("algorithm is not UTF-8".into()))?
            .to_owned();
        match algorithm.as_str() {
            ED25519 => {
                let mut f = rest;
                let pk = take_string(&mut f)?;
                if pk.len() != 32 || !f.is_empty() {
                    return Err(Error::MalformedPublicKey("bad Ed25519 key length".into()));
                }
            }
            "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384" | "ecdsa-sha2-nistp521" | "ssh-rsa" => {
                // ssh-key validated the structure when it was parsed from text;
                // from a raw blob we at least check the fields are well-formed strings.
                let mut f = rest;
                while !f.is_empty() {
                    take_string(&mut f)?;
                }
            }
            other => {
                return Err(Error::MalformedPublicKey(format!(
                    "unsupported key type {other}"
                )))
            }
        }
        let fields_at = blob.len() - rest.len();
        Ok(Self {
            algorithm,
            blob,
            fields_at,
        })
    }

    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }

    pub fn to_openssh(&self) -> String {
        format!("{} {}", self.algorithm, Base64::encode_string(&self.blob))
    }

    fn fields(&self) -> &[u8] {
        &self.blob[self.fields_at..]
    }
}

/// User or host certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshCertKind {
    User = 1,
    Host = 2,
}

/// The standard `permit-*` extensions; which ones a certificate carries is a
/// policy decision made by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SshPermissions {
    pub pty: bool,
    pub port_forwarding: bool,
    pub agent_forwarding: bool,
    pub x11_forwarding: bool,
    pub user_rc: bool,
}

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct SshCertificateRequest<'a> {
    pub public_key: &'a SshPublicKey,
    pub kind: SshCertKind,
    pub key_id: &'a str,
    pub principals: &'a [String],
    pub serial: u64,
    pub validity: Validity,
    pub permissions: SshPermissions,
    /// Carried as Wicket extensions in user certificates.
    pub identity: Option<&'a Identity>,
}

/// A secret from [`SshCa::derive_secret`]; its `Debug` does not show it.
pub struct DerivedSecret([u8; 32]);

impl DerivedSecret {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for DerivedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DerivedSecret(<redacted>)")
    }
}

/// An SSH CA: an Ed25519 key pair.
pub struct SshCa {
    key: Ed25519KeyPair,
    blob: Vec<u8>,
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl SshCa {
    /// Generates a new CA key; returns it with its PKCS#8 encoding for storage.
    pub fn generate(rng: &dyn SecureRandom) -> Result<(Self, Vec<u8>)> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng)
            .map_err(|_| Error::KeyMaterial("cannot generate Ed25519 key".into()))?;
        let ca = Self::from_pkcs8(pkcs8.as_ref())?;
        Ok((ca, pkcs8.as_ref().to_vec()))
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| Error::KeyMaterial(format!("SSH CA key: {e}")))?;
        let mut blob = Vec::with_capacity(51);
        put_string(&mut blob, ED25519.as_bytes());
        put_string(&mut blob, key.public_key().as_ref());
        Ok(Self { key, blob })
    }

    /// The CA public key blob (`string "ssh-ed25519", string pk`).
    pub fn public_key_blob(&self) -> &[u8] {
        &self.blob
    }

    pub fn public_key_raw(&self) -> [u8; 32] {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.key.public_key().as_ref());
        pk
    }

    /// `ssh-ed25519 AAAA... comment`, for `TrustedUserCAKeys` or `@cert-authority`.
    pub fn public_key_openssh(&self, comment: &str) -> String {
        format!("{ED25519} {} {comment}", Base64::encode_string(&self.blob))
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }

    /// A secret only this CA key's holders can compute, one per `label`:
    /// SHA-256 of the key's (deterministic, RFC 8032) Ed25519 signature over
    /// a prefix no certificate starts with, then `label`. Every wicketd
    /// sharing the CA key set gets the same secret, with nothing more to
    /// copy between them.
    pub fn derive_secret(&self, label: &str) -> DerivedSecret {
        let mut msg = b"wicket derived secret\0".to_vec();
        msg.extend_from_slice(label.as_bytes());
        let sig = self.key.sign(&msg);
        let digest = ring::digest::digest(&ring::digest::SHA256, sig.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        DerivedSecret(out)
    }

    /// Issues a certificate and returns its wire blob.
    pub fn issue(
        &self,
        req: &SshCertificateRequest<'_>,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>> {
        check_request(req)?;
        let mut nonce = [0u8; 32];
        rng.fill(&mut nonce).map_err(|_| Error::Signing)?;

        let fields = req.public_key.fields();
        let mut out = Vec::with_capacity(512 + fields.len() + req.key_id.len());
        let cert_type = format!("{}-cert-v01@openssh.com", req.public_key.algorithm);
        put_string(&mut out, cert_type.as_bytes());
        put_string(&mut out, &nonce);
        out.extend_from_slice(fields);
        out.extend_from_slice(&req.serial.to_be_bytes());
        put_u32(&mut out, req.kind as u32);
        put_string(&mut out, req.key_id.as_bytes());
        // valid principals: a string holding packed strings
        let principals_len: usize = req.principals.iter().map(|p| 4 + p.len()).sum();
        put_u32(&mut out, principals_len as u32);
        for p in req.principals {
            put_string(&mut out, p.as_bytes());
        }
        out.extend_from_slice(&(req.validity.not_before as u64).to_be_bytes());
        out.extend_from_slice(&(req.validity.not_after as u64).to_be_bytes());
        put_u32(&mut out, 0); // critical options: none
        write_extensions(&mut out, req);
        put_u32(&mut out, 0); // reserved
        put_string(&mut out, &self.blob);
        let sig = self.key.sign(&out);
        put_u32(&mut out, (4 + ED25519.len() + 4 + 64) as u32);
        put_string(&mut out, ED25519.as_bytes());
        put_string(&mut out, sig.as_ref());
        Ok(out)
    }

    /// Issues a certificate in the one-line OpenSSH format (`*-cert.pub`).
    pub fn issue_openssh(
        &self,
        req: &SshCertificateRequest<'_>,
        rng: &dyn SecureRandom,
    ) -> Result<String> {
        let blob = self.issue(req, rng)?;
        Ok(cert_to_openssh(req.public_key.algorithm(), &blob))
    }
}

/// Formats a certificate blob as an OpenSSH one-line certificate.
pub fn cert_to_openssh(key_algorithm: &str, blob: &[u8]) -> String {
    format!(
        "{key_algorithm}-cert-v01@openssh.com {}",
        Base64::encode_string(blob)
    )
}

fn check_request(req: &SshCertificateRequest<'_>) -> Result<()> {
    let invalid = |m: String| Err(Error::InvalidRequest(m));
    if req.principals.is_empty() {
        return invalid("a certificate needs at least one principal".into());
    }
    if req.principals.len() > MAX_PRINCIPALS {
        return invalid(format!("more than {MAX_PRINCIPALS} principals"));
    }
    for p in req.principals {
        if p.is_empty()
            || p.len() > MAX_FIELD
            || p.contains(['\0', ',', '\n'])
            || p.contains(char::is_whitespace)
        {
            return invalid(format!("principal {p:?} is not a valid login or host name"));
        }
    }
    if req.key_id.len() > MAX_FIELD || req.key_id.contains(['\0', '\n']) {
        return invalid("key ID is too long or contains control characters".into());
    }
    if let Some(id) = req.identity {
        id.validate()?;
    }
    Ok(())
}

fn write_extensions(out: &mut Vec<u8>, req: &SshCertificateRequest<'_>) {
    if req.kind == SshCertKind::Host {
        put_u32(out, 0);
        return;
    }
    // Extensions must be sorted by name (OpenSSH rejects unsorted ones).
    let p = req.permissions;
    let joined_roles;
    let joined_reqs;
    let login_until;
    let mut entries: Vec<(&str, Option<&str>)> = Vec::with_capacity(8);
    if p.x11_forwarding {
        entries.push(("permit-X11-forwarding", None));
    }
    if p.agent_forwarding {
        entries.push(("permit-agent-forwarding", None));
    }
    if p.port_forwarding {
        entries.push(("permit-port-forwarding", None));
    }
    if p.pty {
        entries.push(("permit-pty", None));
    }
    if p.user_rc {
        entries.push(("permit-user-rc", None));
    }
    if let Some(id) = req.identity {
        joined_reqs = id.request_ids.join(",");
        joined_roles = id.roles.join(",");
        entries.push((SSH_EXT_REQUESTS, Some(&joined_reqs)));
        entries.push((SSH_EXT_ROLES, Some(&joined_roles)));
        entries.push((SSH_EXT_USER, Some(&id.user)));
        if let Some(t) = id.login_until {
            login_until = t.to_string();
            entries.push((SSH_EXT_LOGIN_UNTIL, Some(&login_until)));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let len_at = out.len();
    put_u32(out, 0);
    for (name, value) in entries {
        put_string(out, name.as_bytes());
        match value {
            Some(v) if !v.is_empty() => {
                put_u32(out, (4 + v.len()) as u32);
                put_string(out, v.as_bytes());
            }
            _ => put_u32(out, 0),
        }
    }
    let len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads Wicket's identity from a certificate's extensions (`None` when the
/// certificate carries no Wicket user). This only parses: trust comes from
/// [`TrustedSshCas::verify`].
pub fn identity_from_extensions(
    ext: &std::collections::BTreeMap<String, String>,
) -> Result<Option<Identity>> {
    let split = |k: &str| -> Vec<String> {
        ext.get(k)
            .map(|v| {
                v.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let Some(user) = ext.get(SSH_EXT_USER) else {
        return Ok(None);
    };
    let id = Identity {
        user: user.clone(),
        roles: split(SSH_EXT_ROLES),
        request_ids: split(SSH_EXT_REQUESTS),
        login_until: match ext.get(SSH_EXT_LOGIN_UNTIL) {
            None => None,
            Some(t) => Some(
                t.parse::<i64>()
                    .ok()
                    .filter(|n| n.to_string() == *t)
                    .ok_or_else(|| {
                        Error::MalformedCertificate(format!("{SSH_EXT_LOGIN_UNTIL}: {t:?}"))
                    })?,
            ),
        },
    };
    id.validate()?;
    Ok(Some(id))
}

/// A certificate that passed verification.
#[derive(Debug, Clone)]
pub struct VerifiedSshCert {
    pub key_id: String,
    pub serial: u64,
    pub principals: Vec<String>,
    pub validity: Validity,
    pub permissions: SshPermissions,
    /// Present when the certificate carries Wicket's extensions.
    pub identity: Option<Identity>,
    /// Fingerprint of the CA key that signed it.
    pub ca_fingerprint: String,
    /// The certified key's own blob (what the client proves possession of).
    pub subject_key: SshPublicKey,
}

/// The Ed25519 CA keys a verifier trusts: several at once, so a CA can rotate.
#[derive(Debug, Clone, Default)]
pub struct TrustedSshCas {
    keys: Vec<[u8; 32]>,
}

impl TrustedSshCas {
    pub fn new(keys: impl IntoIterator<Item = [u8; 32]>) -> Self {
        Self {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn add(&mut self, key: [u8; 32]) {
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
    }

    /// Verifies a user certificate in the one-line OpenSSH format.
    pub fn verify_user_openssh(
        &self,
        text: &str,
        now: i64,
        principal: Option<&str>,
    ) -> Result<VerifiedSshCert> {
        let b64 = text
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| Error::MalformedCertificate("expected `<type> <base64>`".into()))?;
        let blob = Base64::decode_vec(b64)
            .map_err(|_| Error::MalformedCertificate("certificate is not base64".into()))?;
        self.verify(&blob, SshCertKind::User, now, principal)
    }

    /// Verifies a certificate blob: well-formed, signed by a trusted CA, of the
    /// expected kind, valid at `now`, naming `principal` (if given), with no
    /// critical options this verifier does not understand.
    pub fn verify(
        &self,
        blob: &[u8],
        kind: SshCertKind,
        now: i64,
        principal: Option<&str>,
    ) -> Result<VerifiedSshCert> {
        let cert = ssh_key::Certificate::from_bytes(blob)
            .map_err(|e| Error::MalformedCertificate(e.to_string()))?;
        // The signature is the last field: string(string alg, string sig).
        let sig = cert.signature();
        if sig.algorithm() != ssh_key::Algorithm::Ed25519 || sig.as_bytes().len() != 64 {
            return Err(Error::Rejected(
                "certificate is not signed by an Ed25519 CA".into(),
            ));
        }
        let sig_len = 4 + ED25519.len() + 4 + 64;
        let tbs_len = blob
            .len()
            .checked_sub(4 + sig_len)
            .ok_or_else(|| Error::MalformedCertificate("too short".into()))?;
        if blob[tbs_len..tbs_len + 4] != (sig_len as u32).to_be_bytes() {
            return Err(Error::MalformedCertificate(
                "unexpected signature layout".into(),
            ));
        }
        let ca_key = cert
            .signature_key()
            .ed25519()
            .ok_or_else(|| Error::Rejected("certificate is not signed by an Ed25519 CA".into()))?;
        if !self.keys.iter().any(|k| k == ca_key.as_ref()) {
            return Err(Error::Rejected(
                "certificate is not signed by a trusted Wicket CA".into(),
            ));
        }
        UnparsedPublicKey::new(&ring::signature::ED25519, ca_key.as_ref())
            .verify(&blob[..tbs_len], sig.as_bytes())
            .map_err(|_| Error::Rejected("certificate signature does not verify".into()))?;

        let actual_kind = match cert.cert_type() {
            ssh_key::certificate::CertType::User => SshCertKind::User,
            ssh_key::certificate::CertType::Host => SshCertKind::Host,
        };
        if actual_kind != kind {
            return Err(Error::Rejected(format!(
                "expected a {kind:?} certificate, got a {actual_kind:?} certificate"
            )));
        }
        let validity = Validity {
            not_before: cert.valid_after() as i64,
            not_after: cert.valid_before().min(i64::MAX as u64) as i64,
        };
        if now < validity.not_before {
            return Err(Error::Rejected("certificate is not valid yet".into()));
        }
        if now >= validity.not_after {
            return Err(Error::Rejected("certificate has expired".into()));
        }
        if cert.valid_principals().is_empty() {
            return Err(Error::Rejected("certificate names no principals".into()));
        }
        if let Some(p) = principal {
            if !cert.valid_principals().iter().any(|v| v == p) {
                return Err(Error::Rejected(format!(
                    "certificate does not allow principal {p:?}"
                )));
            }
        }
        if let Some((name, _)) = cert.critical_options().iter().next() {
            return Err(Error::Rejected(format!(
                "unsupported critical option {name:?}"
            )));
        }
        let ext = cert.extensions();
        let permissions = SshPermissions {
            pty: ext.contains_key("permit-pty"),
            port_forwarding: ext.contains_key("permit-port-forwarding"),
            agent_forwarding: ext.contains_key("permit-agent-forwarding"),
            x11_forwarding: ext.contains_key("permit-X11-forwarding"),
            user_rc: ext.contains_key("permit-user-rc"),
        };
        let identity = identity_from_extensions(ext)?;
        let subject_key = SshPublicKey::from_blob(
            ssh_key::PublicKey::from(cert.public_key().clone())
                .to_bytes()
                .map_err(|e| Error::MalformedCertificate(e.to_string()))?,
        )?;
        Ok(VerifiedSshCert {
            key_id: cert.key_id().to_owned(),
            serial: cert.serial(),
            principals: cert.valid_principals().to_vec(),
            validity,
            permissions,
            identity,
            ca_fingerprint: ca_fingerprint_of(ca_key.as_ref()),
            subject_key,
        })
    }
}

fn ca_fingerprint_of(raw: &[u8]) -> String {
    let mut blob = Vec::with_capacity(51);
    put_string(&mut blob, ED25519.as_bytes());
    put_string(&mut blob, raw);
    fingerprint(&blob)
}

#[cfg(test)]
mod tests {
    /// User certificates are for Ed25519 and ECDSA keys, which the SSH
    /// listener verifies, not for RSA keys of any size.
    #[test]
    fn user_keys_are_ed25519_or_ecdsa() {
        let e = SshPublicKey::parse_user_key("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDpX1EEb68DszoojfbVZOLXXcWR9EH4IUcfRfz4GP15OJ7eoysiSeVJmLy5/RbWuSL8xOVU2PYRF/lvnqfU3Bf5mxa26/HhkBYBJWYroiGPkOTRA4R5omTd8KSnsMIr9oXi0wH7wt4SJKO40D9JtOkmCF9BMwe1Er2FIihFVhJjzQ== ").unwrap_err();
        assert!(
            e.to_string().contains("a ssh-rsa key is not accepted"),
            "{e}"
        );
        for good in ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKUmdPnBxi6tCSFEWJhVco3faXDGbfRWt24jeOSN4DLN ", "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBGeUCJv8POYAbKIpfE0LgPeSZWeqPz6UN1P6/TJNg9nXFV51JNA/ul9RaCU0ToK+VY5m9Wf2153UeNdHfCp1+yg= "] {
            SshPublicKey::parse_user_key(good).unwrap();
        }
    }

    use super::*;
    use ring::rand::SystemRandom;

    pub(crate) fn user_key(rng: &SystemRandom) -> SshPublicKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut blob = Vec::new();
        put_string(&mut blob, ED25519.as_bytes());
        put_string(&mut blob, kp.public_key().as_ref());
        SshPublicKey::from_blob(blob).unwrap()
    }

    fn issue(ca: &SshCa, key: &SshPublicKey, kind: SshCertKind, principals: &[String]) -> Vec<u8> {
        let rng = SystemRandom::new();
        let id = Identity {
            user: "alice".into(),
            roles: vec!["dev".into(), "dba".into()],
            request_ids: vec!["r-1".into()],
            login_until: Some(1_900),
        };
        ca.issue(
            &SshCertificateRequest {
                public_key: key,
                kind,
                key_id: "user=alice requests=r-1",
                principals,
                serial: 42,
                validity: Validity::new(1_000, 2_000).unwrap(),
                permissions: SshPermissions {
                    pty: true,
                    ..Default::default()
                },
                identity: Some(&id),
            },
            &rng,
        )
        .unwrap()
    }

    #[test]
    fn issued_certificate_parses_and_verifies() {
        let rng = SystemRandom::new();
        let (ca, _) = SshCa::generate(&rng).unwrap();
        let key = user_key(&rng);
        let blob = issue(
            &ca,
            &key,
            SshCertKind::User,
            &["root".into(), "alice".into()],
        );
        let trusted = TrustedSshCas::new([ca.public_key_raw()]);
        let v = trusted
            .verify(&blob, SshCertKind::User, 1_500, Some("root"))
            .unwrap();
        assert_eq!(v.serial, 42);
        assert_eq!(v.key_id, "user=alice requests=r-1");
        assert_eq!(v.validity, Validity::new(1_000, 2_000).unwrap());
        assert!(v.permissions.pty && !v.permissions.port_forwarding);
        let id = v.identity.unwrap();
        assert_eq!(id.roles, vec!["dev", "dba"]);
        assert_eq!(id.request_ids, vec!["r-1"]);
        assert_eq!(id.login_until, Some(1_900));
        assert_eq!(v.subject_key, key);
        assert_eq!(v.ca_fingerprint, ca.fingerprint());
    }

    #[test]
    fn verification_rejects_each_failure_with_its_reason() {
        let rng = SystemRandom::new();
        let (ca, _) = SshCa::generate(&rng).unwrap();
        let (other, _) = SshCa::generate(&rng).unwrap();
        let key = user_key(&rng);
        let blob = issue(&ca, &key, SshCertKind::User, &["root".into()]);
        let trusted = TrustedSshCas::new([ca.public_key_raw()]);
        let err = |r: Result<VerifiedSshCert>| r.unwrap_err().to_string();
        assert!(err(trusted.verify(&blob, SshCertKind::User, 999, None)).contains("not valid yet"));
        assert!(err(trusted.verify(&blob, SshCertKind::User, 2_000, None)).contains("expired"));
        assert!(
            err(trusted.verify(&blob, SshCertKind::User, 1_500, Some("ubuntu")))
                .contains("principal")
        );
        assert!(
            err(trusted.verify(&blob, SshCertKind::Host, 1_500, None)).contains("Host certificate")
        );
        let untrusting = TrustedSshCas::new([other.public_key_raw()]);
        assert!(err(untrusting.verify(&blob, SshCertKind::User, 1_500, None)).contains("trusted"));
        // Rotation: trusting both keys accepts the old one.
        let both = TrustedSshCas::new([other.public_key_raw(), ca.public_key_raw()]);
        assert!(both.verify(&blob, SshCertKind::User, 1_500, None).is_ok());
        // A flipped bit in the signed part breaks the signature.
        let mut tampered = blob.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 1;
        assert!(trusted
            .verify(&tampered, SshCertKind::User, 1_500, None)
            .is_err());
        // Truncations never panic.
        for n in 0..blob.len() {
            assert!(trusted
                .verify(&blob[..n], SshCertKind::User, 1_500, None)
                .is_err());
        }
    }

    #[test]
    fn rejects_golden_tickets_and_bad_principals() {
        let rng = SystemRandom::new();
        let (ca, _) = SshCa::generate(&rng).unwrap();
        let key = user_key(&rng);
        for principals in [vec![], vec!["a b".to_string()], vec!["a,b".to_string()]] {
            let r = ca.issue(
                &SshCertificateRequest {
                    public_key: &key,
                    kind: SshCertKind::User,
                    key_id: "x",
                    principals: &principals,
                    serial: 1,
                    validity: Validity::new(1, 2).unwrap(),
                    permissions: SshPermissions::default(),
                    identity: None,
                },
                &rng,
            );
            assert!(matches!(r, Err(Error::InvalidRequest(_))), "{principals:?}");
        }
    }

    #[test]
    fn malformed_public_keys_are_rejected() {
        assert!(SshPublicKey::parse_openssh("ssh-ed25519 AAAA").is_err());
        assert!(SshPublicKey::parse_openssh("not a key").is_err());
        assert!(SshPublicKey::from_blob(vec![0, 0, 0, 11]).is_err());
    }

    #[test]
    fn a_login_end_that_is_not_a_plain_number_is_rejected() {
        let ext = |t: &str| {
            std::collections::BTreeMap::from([
                (SSH_EXT_USER.to_owned(), "alice".to_owned()),
                (SSH_EXT_LOGIN_UNTIL.to_owned(), t.to_owned()),
            ])
        };
        let id = identity_from_extensions(&ext("1900")).unwrap().unwrap();
        assert_eq!(id.login_until, Some(1_900));
        for bad in ["", "01900", "+1900", "-5", "19e2", "1900 "] {
            assert!(identity_from_extensions(&ext(bad)).is_err(), "{bad:?}");
        }
    }
}
