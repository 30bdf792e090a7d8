//! CA key files under the data directory: generated on first start (secret
//! files 0600, directory 0700), loaded afterwards. The bytes come from and go
//! to `wicket_ca::AuthorityKeys`; this module only does the file I/O.

use crate::error::{Error, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use wicket_ca::AuthorityKeys;

/// Creates `dir` (and parents) if needed and makes it 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::Io(format!("cannot restrict {}: {e}", dir.display())))?;
    Ok(())
}

/// Writes `contents` to `path` atomically (temp file + rename) with `mode`.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    // After the whole name: `x.key` and `x.pub` never share one.
    let mut name = path
        .file_name()
        .ok_or_else(|| Error::Io(format!("{} names no file", path.display())))?
        .to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.display())))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
        .map_err(|e| Error::Io(format!("cannot rename to {}: {e}", path.display())))?;
    Ok(())
}

/// Loads the CA key set from `data_dir/ca`, which must exist and be whole:
/// for admin commands, which never make one (a second process generating at
/// once, or a new CA on the wrong host, would split the cluster). Reads
/// only: it changes no mode and adds no file.
pub fn load(data_dir: &Path) -> Result<AuthorityKeys> {
    let ca_dir = data_dir.join("ca");
    let missing = missing_files(&ca_dir);
    if missing.len() == AuthorityKeys::REQUIRED_FILES.len() {
        return Err(Error::Io(format!(
            "no CA key set in {}: start wicketd once with this data directory (it makes one), or copy <data_dir>/ca from the first wicketd",
            ca_dir.display()
        )));
    }
    if let Some(name) = missing.first() {
        let hint = if added_later_only(&missing) {
            " (a key set from before that CA: start wicketd once on the host that made it, and it adds it)"
        } else {
            " (refusing to generate over a partial set)"
        };
        return Err(Error::Io(format!(
            "CA key set in {} is incomplete: {name} is missing{hint}",
            ca_dir.display()
        )));
    }
    for name in AuthorityKeys::REQUIRED_FILES {
        if name.ends_with(".key") {
            let path = ca_dir.join(name);
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::Io(format!(
                    "{} has mode {mode:o}; CA keys must be 0600",
                    path.display()
                )));
            }
        }
    }
    Ok(AuthorityKeys::load(|name| {
        fs::read(ca_dir.join(name)).ok()
    })?)
}

/// For set-up commands that may run before the first start (`databases
/// ca`, `databases server-cert`, `nodes add`): makes the key set when the
/// data directory has none at all, as the first start would; otherwise
/// only reads it ([`load`]), so it changes nothing a running wicketd uses.
pub fn load_or_make_first(data_dir: &Path, cluster: &str, now: i64) -> Result<AuthorityKeys> {
    let none = missing_files(&data_dir.join("ca")).len() == AuthorityKeys::REQUIRED_FILES.len();
    if none {
        Ok(load_or_generate(data_dir, cluster, now)?.0)
    } else {
        load(data_dir)
    }
}

/// Whether only CAs added to key sets later are missing.
fn added_later_only(missing: &[&str]) -> bool {
    missing
        .iter()
        .all(|m| AuthorityKeys::ADDED_LATER.contains(m))
}

/// The required files of the key set that `ca_dir` lacks.
fn missing_files(ca_dir: &Path) -> Vec<&'static str> {
    AuthorityKeys::REQUIRED_FILES
        .iter()
        .copied()
        .filter(|n| !ca_dir.join(n).exists())
        .collect()
}

/// Writes files of a key set just made: secrets 0600, the rest 0644.
fn write_key_files(ca_dir: &Path, files: Vec<wicket_ca::KeyFile>) -> Result<()> {
    for f in files {
        let mode = if f.secret { 0o600 } else { 0o644 };
        write_file_atomic(&ca_dir.join(f.name), &f.contents, mode)?;
    }
    Ok(())
}

/// Loads the CA key set from `data_dir/ca`, generating it on first use (then
/// `true`), and adding the CAs of [`AuthorityKeys::ADDED_LATER`] to a set
/// made before they existed.
/// Refuses secret files readable by group or others.
pub fn load_or_generate(data_dir: &Path, cluster: &str, now: i64) -> Result<(AuthorityKeys, bool)> {
    let ca_dir = data_dir.join("ca");
    ensure_private_dir(data_dir)?;
    ensure_private_dir(&ca_dir)?;
    let missing = missing_files(&ca_dir);
    let rng = ring::rand::SystemRandom::new();
    if missing.len() == AuthorityKeys::REQUIRED_FILES.len() {
        let (keys, files) = AuthorityKeys::generate(cluster, now, &rng)?;
        write_key_files(&ca_dir, files)?;
        return Ok((keys, true));
    }
    if added_later_only(&missing) {
        for key_file in missing {
            let (_, files) = AuthorityKeys::generate_added(key_file, &rng)?;
            write_key_files(&ca_dir, files)?;
            tracing::info!(dir = %ca_dir.display(), key_file, "added a CA to the key set");
        }
    }
    Ok((load(data_dir)?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_0600_keys_then_loads_them() {
        let dir = tempfile::tempdir().unwrap();
        let (a, generated) = load_or_generate(dir.path(), "t", 1_700_000_000).unwrap();
        assert!(generated);
        for name in AuthorityKeys::REQUIRED_FILES {
            let mode = fs::metadata(dir.path().join("ca").join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            if name.ends_with(".key") {
                assert_eq!(mode, 0o600, "{name}");
            }
        }
        let (b, generated) = load_or_generate(dir.path(), "t", 1_700_000_000).unwrap();
        assert!(!generated);
        assert_eq!(a.tls.pin(), b.tls.pin());
        // Loose permissions are refused.
        let key = dir.path().join("ca/tls_ca.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_generate(dir.path(), "t", 1)
            .unwrap_err()
            .to_string()
            .contains("0600"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        // A partial set is never silently regenerated.
        fs::remove_file(&key).unwrap();
        assert!(load_or_generate(dir.path(), "t", 1)
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }

    #[test]
    fn load_only_reads() {
        let dir = tempfile::tempdir().unwrap();
        let none = load(dir.path()).unwrap_err().to_string();
        assert!(none.contains("no CA key set"), "{none}");
        assert!(!dir.path().join("ca").exists(), "load made the directory");
        let (a, _) = load_or_generate(dir.path(), "t", 1_700_000_000).unwrap();
        assert_eq!(load(dir.path()).unwrap().tls.pin(), a.tls.pin());
        // A set from before the node-login CA: refused, and nothing added.
        let ca = dir.path().join("ca");
        fs::remove_file(ca.join("ssh_node_ca.key")).unwrap();
        fs::remove_file(ca.join("ssh_node_ca.pub")).unwrap();
        let old = load(dir.path()).unwrap_err().to_string();
        assert!(old.contains("ssh_node_ca.key is missing"), "{old}");
        assert!(old.contains("start wicketd once"), "{old}");
        assert!(!ca.join("ssh_node_ca.key").exists());
        // The directory's mode is left as it is.
        fs::set_permissions(&ca, fs::Permissions::from_mode(0o750)).unwrap();
        let _ = load(dir.path());
        let mode = fs::metadata(&ca).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }

    #[test]
    fn set_up_commands_make_a_first_key_set_and_otherwise_only_read() {
        let dir = tempfile::tempdir().unwrap();
        let made = load_or_make_first(dir.path(), "t", 1_700_000_000).unwrap();
        assert_eq!(load(dir.path()).unwrap().tls.pin(), made.tls.pin());
        let ca = dir.path().join("ca");
        fs::remove_file(ca.join("ssh_node_ca.key")).unwrap();
        fs::remove_file(ca.join("ssh_node_ca.pub")).unwrap();
        let e = load_or_make_first(dir.path(), "t", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("start wicketd once"), "{e}");
        assert!(!ca.join("ssh_node_ca.key").exists());
    }

    #[test]
    fn a_key_set_from_before_the_node_and_proxy_host_cas_gets_them_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = load_or_generate(dir.path(), "t", 1_700_000_000).unwrap();
        let ca = dir.path().join("ca");
        // From before both, then from before the proxy host CA alone.
        for gone in [
            &["ssh_node_ca", "ssh_proxy_host_ca"][..],
            &["ssh_proxy_host_ca"],
        ] {
            for name in gone {
                fs::remove_file(ca.join(format!("{name}.key"))).unwrap();
                fs::remove_file(ca.join(format!("{name}.pub"))).unwrap();
            }
            let (b, generated) = load_or_generate(dir.path(), "t", 1_700_000_000).unwrap();
            assert!(!generated);
            assert_eq!(a.tls.pin(), b.tls.pin());
            assert_eq!(a.ssh_user.public_key_raw(), b.ssh_user.public_key_raw());
            assert_eq!(a.ssh_host.public_key_raw(), b.ssh_host.public_key_raw());
            assert_ne!(a.ssh_proxy.public_key_raw(), b.ssh_proxy.public_key_raw());
            for other in [&b.ssh_user, &b.ssh_host, &b.ssh_node] {
                assert_ne!(b.ssh_proxy.public_key_raw(), other.public_key_raw());
            }
            assert_ne!(b.ssh_node.public_key_raw(), b.ssh_user.public_key_raw());
            for name in gone {
                let mode = fs::metadata(ca.join(format!("{name}.key")))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777;
                assert_eq!(mode, 0o600);
                assert!(ca.join(format!("{name}.pub")).exists());
            }
        }
    }
}
