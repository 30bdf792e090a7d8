//! The CA key set: generated once, stored by the caller as files, loaded back.

use crate::ssh::SshCa;
use crate::x509::{pem_decode, pem_encode, X509Ca, X509CaKind};
use crate::{Error, Result, Validity};
use ring::rand::SecureRandom;

/// One file of the key set. `secret` files must be written 0600.
#[derive(Clone)]
pub struct KeyFile {
    pub name: &'static str,
    pub contents: Vec<u8>,
    pub secret: bool,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("name", &self.name)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

const SSH_USER_KEY: &str = "ssh_user_ca.key";
const SSH_USER_PUB: &str = "ssh_user_ca.pub";
const SSH_NODE_KEY: &str = "ssh_node_ca.key";
const SSH_NODE_PUB: &str = "ssh_node_ca.pub";
const SSH_HOST_KEY: &str = "ssh_host_ca.key";
const SSH_HOST_PUB: &str = "ssh_host_ca.pub";
const SSH_PROXY_KEY: &str = "ssh_proxy_host_ca.key";
const SSH_PROXY_PUB: &str = "ssh_proxy_host_ca.pub";
const TLS_KEY: &str = "tls_ca.key";
const TLS_CERT: &str = "tls_ca.crt";
const DB_KEY: &str = "db_client_ca.key";
const DB_CERT: &str = "db_client_ca.crt";

/// CA certificates live ten years; rotation keeps older keys trusted.
const CA_LIFETIME: i64 = 10 * 365 * 24 * 3600;

/// Wicket's six CAs.
#[derive(Debug)]
pub struct AuthorityKeys {
    /// Signs users' SSH certificates, which only the proxy accepts.
    pub ssh_user: SshCa,
    /// Signs the one-minute certificates the proxy logs into nodes with;
    /// nodes trust only this CA (`TrustedUserCAKeys`), so a user's own
    /// certificate never opens a node directly.
    pub ssh_node: SshCa,
    /// Signs nodes' host certificates, which only the proxy trusts.
    pub ssh_host: SshCa,
    /// Signs the host certificates the proxy presents to users, whose
    /// profiles trust only this CA (`@cert-authority`): so a node's host
    /// key, which the node's admins hold, never passes for the proxy.
    pub ssh_proxy: SshCa,
    /// Signs wicketd's TLS server certificates and users' client certificates.
    pub tls: X509Ca,
    /// Signs the client certificates wicketd presents to databases.
    pub db_client: X509Ca,
}

impl AuthorityKeys {
    /// The files that must all exist for [`AuthorityKeys::load`].
    pub const REQUIRED_FILES: [&'static str; 8] = [
        SSH_USER_KEY,
        SSH_NODE_KEY,
        SSH_HOST_KEY,
        SSH_PROXY_KEY,
        TLS_KEY,
        TLS_CERT,
        DB_KEY,
        DB_CERT,
    ];

    /// Generates a fresh key set; `now` starts the CA certificates' validity.
    pub fn generate(
        cluster: &str,
        now: i64,
        rng: &dyn SecureRandom,
    ) -> Result<(Self, Vec<KeyFile>)> {
        let validity = Validity::new(now - 3600, now + CA_LIFETIME)?;
        let (ssh_user, user_files) = ssh_ca(SSH_USER_KEY, SSH_USER_PUB, "wicket-user-ca", rng)?;
        let (ssh_node, node_files) = Self::generate_added(SSH_NODE_KEY, rng)?;
        let (ssh_proxy, proxy_files) = Self::generate_added(SSH_PROXY_KEY, rng)?;
        let (ssh_host, host_files) = ssh_ca(SSH_HOST_KEY, SSH_HOST_PUB, "wicket-host-ca", rng)?;
        let (tls, tls_key) = X509Ca::generate(X509CaKind::Tls, cluster, validity)?;
        let (db_client, db_key) = X509Ca::generate(X509CaKind::DatabaseClient, cluster, validity)?;
        let x509_files = |key: &'static str, key_pem: String, cert: &'static str, cert_pem| {
            [
                KeyFile {
                    name: key,
                    contents: key_pem.into_bytes(),
                    secret: true,
                },
                KeyFile {
                    name: cert,
                    contents: String::into_bytes(cert_pem),
                    secret: false,
                },
            ]
        };
        let mut files = Vec::new();
        files.extend(user_files);
        files.extend(host_files);
        files.extend(x509_files(TLS_KEY, tls_key, TLS_CERT, tls.cert_pem()));
        files.extend(x509_files(DB_KEY, db_key, DB_CERT, db_client.cert_pem()));
        files.extend(node_files);
        files.extend(proxy_files);
        Ok((
            Self {
                ssh_user,
                ssh_node,
                ssh_host,
                ssh_proxy,
                tls,
                db_client,
            },
            files,
        ))
    }

    /// The key files of CAs added to the set after it was first made (the
    /// node-login CA, the proxy host CA): a key set without them gets them
    /// at the next start ([`Self::generate_added`]).
    pub const ADDED_LATER: [&'static str; 2] = [SSH_NODE_KEY, SSH_PROXY_KEY];

    /// A fresh CA of [`Self::ADDED_LATER`], named by its key file, and its
    /// files.
    pub fn generate_added(key_file: &str, rng: &dyn SecureRandom) -> Result<(SshCa, Vec<KeyFile>)> {
        match key_file {
            SSH_NODE_KEY => ssh_ca(SSH_NODE_KEY, SSH_NODE_PUB, "wicket-node-ca", rng),
            SSH_PROXY_KEY => ssh_ca(SSH_PROXY_KEY, SSH_PROXY_PUB, "wicket-proxy-host-ca", rng),
            other => Err(Error::KeyMaterial(format!(
                "{other} is not a CA added to key sets later"
            ))),
        }
    }

    /// Each CA by name, with its public key's fingerprint: what wicketds
    /// sharing a store must agree on.
    pub fn fingerprints(&self) -> [(&'static str, String); 6] {
        [
            ("ssh user", self.ssh_user.fingerprint()),
            ("ssh node-login", self.ssh_node.fingerprint()),
            ("ssh host", self.ssh_host.fingerprint()),
            ("ssh proxy host", self.ssh_proxy.fingerprint()),
            ("tls", self.tls.pin()),
            ("database client", self.db_client.pin()),
        ]
    }

    /// The key of the audit log's hash chain (HMAC-SHA256), derived from
    /// the user CA's key: whoever can rewrite the store but not read the
    /// CA key set cannot make a changed event fit the chain again.
    pub fn audit_chain_secret(&self) -> crate::DerivedSecret {
        self.ssh_user.derive_secret("audit chain v1")
    }

    /// Loads the key set; `read(name)` returns a file's contents.
    pub fn load(read: impl Fn(&str) -> Option<Vec<u8>>) -> Result<Self> {
        let text = |name: &str| -> Result<String> {
            let bytes =
                read(name).ok_or_else(|| Error::KeyMaterial(format!("{name} is missing")))?;
            String::from_utf8(bytes).map_err(|_| Error::KeyMaterial(format!("{name} is not text")))
        };
        let ssh = |name: &str| -> Result<SshCa> {
            let der = pem_decode("PRIVATE KEY", &text(name)?)
                .map_err(|e| Error::KeyMaterial(format!("{name}: {e}")))?;
            SshCa::from_pkcs8(&der).map_err(|e| Error::KeyMaterial(format!("{name}: {e}")))
        };
        let x509 = |kind, key: &str, cert: &str| -> Result<X509Ca> {
            X509Ca::from_pem(kind, &text(key)?, &text(cert)?)
                .map_err(|e| Error::KeyMaterial(format!("{key}/{cert}: {e}")))
        };
        Ok(Self {
            ssh_user: ssh(SSH_USER_KEY)?,
            ssh_node: ssh(SSH_NODE_KEY)?,
            ssh_host: ssh(SSH_HOST_KEY)?,
            ssh_proxy: ssh(SSH_PROXY_KEY)?,
            tls: x509(X509CaKind::Tls, TLS_KEY, TLS_CERT)?,
            db_client: x509(X509CaKind::DatabaseClient, DB_KEY, DB_CERT)?,
        })
    }
}

/// A fresh SSH CA and its files: the private key (`key`, PKCS#8 PEM) and
/// the OpenSSH public key line (`public`, with `comment`).
fn ssh_ca(
    key: &'static str,
    public: &'static str,
    comment: &str,
    rng: &dyn SecureRandom,
) -> Result<(SshCa, Vec<KeyFile>)> {
    let (ca, pk8) = SshCa::generate(rng)?;
    let files = vec![
        KeyFile {
            name: key,
            contents: pem_encode("PRIVATE KEY", &pk8).into_bytes(),
            secret: true,
        },
        KeyFile {
            name: public,
            contents: (ca.public_key_openssh(comment) + "\n").into_bytes(),
            secret: false,
        },
    ];
    Ok((ca, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn generated_keys_load_back_identically() {
        let rng = ring::rand::SystemRandom::new();
        let (keys, files) = AuthorityKeys::generate("test", 1_700_000_000, &rng).unwrap();
        for f in &files {
            assert_eq!(f.secret, f.name.ends_with(".key"), "{}", f.name);
        }
        let map: HashMap<_, _> = files.into_iter().map(|f| (f.name, f.contents)).collect();
        let again = AuthorityKeys::load(|n| map.get(n).cloned()).unwrap();
        assert_eq!(again.ssh_user.fingerprint(), keys.ssh_user.fingerprint());
        assert_eq!(again.ssh_host.fingerprint(), keys.ssh_host.fingerprint());
        assert_eq!(again.ssh_proxy.fingerprint(), keys.ssh_proxy.fingerprint());
        // Six CAs, six keys.
        let mut fingerprints = [
            &keys.ssh_user,
            &keys.ssh_node,
            &keys.ssh_host,
            &keys.ssh_proxy,
        ]
        .map(|ca| ca.fingerprint());
        fingerprints.sort();
        assert!(fingerprints.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(again.tls.pin(), keys.tls.pin());
        assert_eq!(again.db_client.pin(), keys.db_client.pin());
        assert_ne!(keys.tls.pin(), keys.db_client.pin());
        // The audit chain's key: the same from the same key set, another
        // from another, and never the bytes of a key file.
        let secret = *keys.audit_chain_secret().as_bytes();
        assert_eq!(&secret, again.audit_chain_secret().as_bytes());
        let (other, _) = AuthorityKeys::generate("test", 1_700_000_000, &rng).unwrap();
        assert_ne!(&secret, other.audit_chain_secret().as_bytes());
        assert_ne!(
            keys.ssh_user.derive_secret("a").as_bytes(),
            keys.ssh_user.derive_secret("b").as_bytes()
        );
        assert!(map.values().all(|f| !f.windows(32).any(|w| w == secret)));
        assert_eq!(
            format!("{:?}", keys.audit_chain_secret()),
            "DerivedSecret(<redacted>)"
        );
        let missing = AuthorityKeys::load(|n| {
            if n == TLS_KEY {
                None
            } else {
                map.get(n).cloned()
            }
        });
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("tls_ca.key is missing"));
        let corrupt = AuthorityKeys::load(|n| {
            if n == SSH_USER_KEY {
                Some(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec())
            } else {
                map.get(n).cloned()
            }
        });
        assert!(corrupt.is_err());
    }
}
