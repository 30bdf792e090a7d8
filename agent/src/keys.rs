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

#[cfg(test)]
mod tests {
    use super::*;

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
