//! Key pairs made on the user's machine: an Ed25519 SSH key (OpenSSH format)
//! and an ECDSA P-256 TLS key with a CSR. Only the public halves leave.

use anyhow::{anyhow, Result};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use ssh_key::private::{Ed25519Keypair, Ed25519PrivateKey};
use ssh_key::public::Ed25519PublicKey;
use ssh_key::LineEnding;

/// A fresh key set for one login.
pub struct NewKeys {
    /// OpenSSH private key file contents (`id_ed25519`).
    pub ssh_private_openssh: String,
    /// `ssh-ed25519 AAAA... comment`
    pub ssh_public_openssh: String,
    /// PKCS#8 PEM TLS private key.
    pub tls_key_pem: String,
    /// PKCS#10 request for the TLS key.
    pub tls_csr_pem: String,
}

impl std::fmt::Debug for NewKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKeys")
            .field("ssh_public_openssh", &self.ssh_public_openssh)
            .finish_non_exhaustive()
    }
}

/// Generates both key pairs; `comment` names the SSH key (user@cluster).
pub fn generate(comment: &str) -> Result<NewKeys> {
    let rng = SystemRandom::new();
    let mut seed = [0u8; 32];
    rng.fill(&mut seed).map_err(|_| anyhow!("no randomness"))?;
    let ring_key = Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|_| anyhow!("cannot derive Ed25519 key"))?;
    let mut public = [0u8; 32];
    public.copy_from_slice(ring_key.public_key().as_ref());
    let keypair = Ed25519Keypair {
        public: Ed25519PublicKey(public),
        private: Ed25519PrivateKey::from_bytes(&seed),
    };
    seed.fill(0);
    let private =
        ssh_key::PrivateKey::new(ssh_key::private::KeypairData::Ed25519(keypair), comment)
            .map_err(|e| anyhow!("cannot encode SSH key: {e}"))?;
    let ssh_private_openssh = private
        .to_openssh(LineEnding::LF)
        .map_err(|e| anyhow!("cannot encode SSH key: {e}"))?
        .to_string();
    let ssh_public_openssh = private
        .public_key()
        .to_openssh()
        .map_err(|e| anyhow!("cannot encode SSH public key: {e}"))?;

    let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow!("cannot generate TLS key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&tls_key)
        .map_err(|e| anyhow!("cannot create CSR: {e}"))?;
    Ok(NewKeys {
        ssh_private_openssh,
        ssh_public_openssh,
        tls_key_pem: tls_key.serialize_pem(),
        tls_csr_pem: csr.pem().map_err(|e| anyhow!("cannot encode CSR: {e}"))?,
    })
}

/// Checks what wicketd sent back for the SSH files before they are
/// written, since ssh reads them: the certificate is one line and certifies
/// `our_public` (the key made here), and the host CA is one public key on
/// one line (a newline would add lines to the known-hosts file).
pub fn check_issued_ssh(our_public: &str, certificate: &str, host_ca: &str) -> Result<()> {
    let one_line = |what: &str, v: &str| {
        if v.trim().is_empty() || v.trim().contains(['\n', '\r']) {
            return Err(anyhow!("wicketd sent a {what} that is not one line"));
        }
        Ok(())
    };
    one_line("certificate", certificate)?;
    one_line("host CA key", host_ca)?;
    let cert = ssh_key::Certificate::from_openssh(certificate.trim())
        .map_err(|e| anyhow!("wicketd sent an unreadable SSH certificate: {e}"))?;
    let ours = ssh_key::PublicKey::from_openssh(our_public.trim())
        .map_err(|e| anyhow!("our own SSH public key: {e}"))?;
    if cert.public_key() != ours.key_data() {
        return Err(anyhow!(
            "wicketd sent an SSH certificate for another key than the one made here"
        ));
    }
    wicket_ca::SshPublicKey::parse_openssh(host_ca)
        .map_err(|e| anyhow!("wicketd sent an unreadable host CA key: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ssh_files_are_checked_before_they_are_written() {
        let rng = SystemRandom::new();
        let (ca, _) = wicket_ca::SshCa::generate(&rng).unwrap();
        let host_ca = ca.public_key_openssh("wicket-host-ca");
        let issue = |k: &NewKeys| {
            let public = wicket_ca::SshPublicKey::parse_openssh(&k.ssh_public_openssh).unwrap();
            let req = wicket_ca::SshCertificateRequest {
                public_key: &public,
                kind: wicket_ca::SshCertKind::User,
                key_id: "user=alice",
                principals: &["alice".to_string()],
                serial: 1,
                validity: wicket_ca::Validity::new(1_700_000_000, 1_700_003_600).unwrap(),
                permissions: Default::default(),
                identity: None,
            };
            ca.issue_openssh(&req, &rng).unwrap()
        };
        let (mine, other) = (generate("a@t").unwrap(), generate("b@t").unwrap());
        let cert = issue(&mine);
        check_issued_ssh(&mine.ssh_public_openssh, &cert, &host_ca).unwrap();
        let refused = |cert: &str, host_ca: &str| {
            check_issued_ssh(&mine.ssh_public_openssh, cert, host_ca)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&issue(&other), &host_ca).contains("another key"));
        assert!(
            refused(&cert, &format!("{host_ca}\n@cert-authority * {host_ca}"))
                .contains("not one line")
        );
        assert!(refused(&format!("{cert}\nx"), &host_ca).contains("not one line"));
        assert!(refused(&cert, "ssh-ed25519 !!").contains("host CA key"));
        assert!(refused("ssh-ed25519 AAAA", &host_ca).contains("unreadable SSH certificate"));
    }

    #[test]
    fn keys_parse_back() {
        let k = generate("alice@test").unwrap();
        let private = ssh_key::PrivateKey::from_openssh(&k.ssh_private_openssh).unwrap();
        assert_eq!(
            private.public_key().to_openssh().unwrap(),
            k.ssh_public_openssh
        );
        assert!(k.ssh_public_openssh.starts_with("ssh-ed25519 "));
        assert!(wicket_ca::X509Ca::spki_from_csr(k.tls_csr_pem.as_bytes()).is_ok());
        assert!(k.tls_key_pem.contains("BEGIN PRIVATE KEY"));
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }
}
