//! CA key files under the data directory: generated on first start (secret
//! files 0600, directory 0700), loaded afterwards. The bytes come from and go
//! to `wicket_ca::AuthorityKeys`; this module only does the file I/O.

use crate::error::{Error, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use wicket_ca::AuthorityKeys;

/// What wicketd keeps in its directories: one holding only these (or
/// nothing) is wicketd's own.
const OURS: &[&str] = &[
    "ca",
    "recordings",
    "wicket.db",
    "wicket.db-wal",
    "wicket.db-shm",
    "wicket.db-journal",
];

/// Creates `dir` (and parents) if needed, 0700. One that exists and is
/// open to others is made 0700 only when it is wicketd's own (empty, or
/// holding only what wicketd keeps, and a volume's `lost+found` when it is
/// a volume's root): another directory named by mistake (`--data-dir
/// /var/lib`) is refused, not made private under everyone else's feet.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)
                .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::Io(format!("cannot restrict {}: {e}", dir.display())))?;
            return Ok(());
        }
        Err(e) => return Err(Error::Io(format!("cannot read {}: {e}", dir.display()))),
    }
    let meta =
        fs::metadata(dir).map_err(|e| Error::Io(format!("cannot read {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Io(format!("{} is not a directory", dir.display())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let entries =
        fs::read_dir(dir).map_err(|e| Error::Io(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::Io(format!("cannot read {}: {e}", dir.display())))?;
        let name = entry.file_name();
        // A fresh ext2/3/4 volume's root holds its fsck directory.
        let volume_root = name == "lost+found" && entry.file_type().is_ok_and(|t| t.is_dir());
        if !volume_root && !OURS.iter().any(|o| name == *o) {
            return Err(Error::Io(format!(
                "{} has mode {mode:o} and holds {name:?}, which is not wicketd's: name a \
                 directory of wicketd's own (it makes one, 0700), or run `chmod 700 {}`",
                dir.display(),
                dir.display()
            )));
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::Io(format!("cannot restrict {}: {e}", dir.display())))
}

/// An exclusive lock on `ca_dir/.lock`, held while a key set is made or
/// completed: two processes on one data directory (a first start and a
/// set-up command, say) never both generate one and mix their files.
fn lock_key_set(ca_dir: &Path) -> Result<fs::File> {
    let path = ca_dir.join(".lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Io(format!("cannot open {}: {e}", path.display())))?;
    f.lock()
        .map_err(|e| Error::Io(format!("cannot lock {}: {e}", path.display())))?;
    Ok(f)
}

/// Writes `contents` to `path` atomically (temp file + rename) with `mode`,
/// and durably: the file, then its directory's entry, reach the disk before
/// it returns (a CA key set that a power cut took back would be made anew
/// at the next start, and every certificate and node set up with the old
/// one would stop working). A write that fails leaves no temporary file.
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
    let written = f
        .write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.display())))
        .and_then(|()| Ok(fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?))
        .and_then(|()| {
            fs::rename(&tmp, path)
                .map_err(|e| Error::Io(format!("cannot rename to {}: {e}", path.display())))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    sync_dir(dir_of(path))
}

/// The directory holding `path` (`.` for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Syncs a directory's entries to disk. A filesystem that cannot sync a
/// directory (some network and FUSE mounts refuse) is no error: the file is
/// in place, as durable as that filesystem makes anything.
fn sync_dir(dir: &Path) -> Result<()> {
    match fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the directory on this filesystem");
            Ok(())
        }
        r => r.map_err(|e| Error::Io(format!("cannot sync {}: {e}", dir.display()))),
    }
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
    let owners = Owners::of(data_dir)?;
    owners.check(&ca_dir)?;
    for name in AuthorityKeys::REQUIRED_FILES {
        let path = ca_dir.join(name);
        let meta = owners.check(&path)?;
        if name.ends_with(".key") {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::Io(format!(
                    "{} has mode {mode:o}; CA keys must be 0600",
                    path.display()
                )));
            }
        }
    }
    // Every file is there (above): one that cannot be read is an error
    // of its own, not "missing".
    let unreadable = std::cell::RefCell::new(None);
    let keys = AuthorityKeys::load(|name| {
        let path = ca_dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                unreadable
                    .borrow_mut()
                    .get_or_insert(format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    });
    if let Some(why) = unreadable.into_inner() {
        return Err(Error::Io(why));
    }
    Ok(keys?)
}

/// Who may own the CA key set's files (as sshd refuses host keys another
/// user owns: whoever owns a key file or the `ca` directory can read or
/// replace the key set, whatever its mode). This process's user and root;
/// run as root (an admin command with `sudo`), also the data directory's
/// owner (the service's user, in the documented layout). Run as another
/// user, the data directory must be theirs or root's too.
struct Owners {
    us: u32,
    data_dir_owner: u32,
}

impl Owners {
    fn of(data_dir: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let us = rustix::process::geteuid().as_raw();
        let data_dir_owner = fs::metadata(data_dir)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", data_dir.display())))?
            .uid();
        let owners = Self { us, data_dir_owner };
        if !owners.trusted(data_dir_owner) {
            return Err(owners.refusal(data_dir, data_dir_owner));
        }
        Ok(owners)
    }

    fn trusted(&self, owner: u32) -> bool {
        owner == self.us || owner == 0 || (self.us == 0 && owner == self.data_dir_owner)
    }

    /// `path`'s metadata, if a trusted user owns it.
    fn check(&self, path: &Path) -> Result<fs::Metadata> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        match self.trusted(meta.uid()) {
            true => Ok(meta),
            false => Err(self.refusal(path, meta.uid())),
        }
    }

    fn refusal(&self, path: &Path, owner: u32) -> Error {
        Error::Io(format!(
            "{} is owned by uid {owner}, not by wicketd's user (uid {}) or root: another user \
             could read or replace the CA key set; `chown` it to the user wicketd runs as",
            path.display(),
            self.us
        ))
    }
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

/// The required files of the key set that `ca_dir` lacks (a file that
/// cannot be looked at, for permissions, is not missing: reading it says
/// why).
fn missing_files(ca_dir: &Path) -> Vec<&'static str> {
    AuthorityKeys::REQUIRED_FILES
        .iter()
        .copied()
        .filter(|n| {
            matches!(fs::symlink_metadata(ca_dir.join(n)), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        })
        .collect()
}

/// Writes files of a key set just made: secrets 0600, the rest 0644.
fn write_key_files(ca_dir: &Path, files: Vec<wicket_ca::KeyFile>) -> Result<()> {
    for f in files {
        let mode = if f.secret { 0o600 } else { 0o644 };
        write_file_atomic(&ca_dir.join(f.name), &f.contents, mode)?;
    }
    // The `ca` directory itself may be new (a first start): its entry too.
    sync_dir(dir_of(ca_dir))
}

/// Loads the CA key set from `data_dir/ca`, generating it on first use (then
/// `true`), and adding the CAs of [`AuthorityKeys::ADDED_LATER`] to a set
/// made before they existed.
/// Refuses secret files readable by group or others.
pub fn load_or_generate(data_dir: &Path, cluster: &str, now: i64) -> Result<(AuthorityKeys, bool)> {
    let ca_dir = data_dir.join("ca");
    ensure_private_dir(data_dir)?;
    // Inside wicketd's own directory: whatever it holds is the key set's.
    fs::create_dir_all(&ca_dir)
        .and_then(|()| fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::Io(format!("cannot make {} private: {e}", ca_dir.display())))?;
    let _lock = lock_key_set(&ca_dir)?;
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

    /// A write that fails after its temporary file was made (here the
    /// rename: a directory holds the name) leaves no copy of the secret
    /// behind; one that works leaves the file alone, with its mode.
    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let taken = dir.path().join("x.key");
        fs::create_dir(&taken).unwrap();
        fs::write(
            taken.join("inside"),
            b"keeps the directory from being replaced",
        )
        .unwrap();
        let e = write_file_atomic(&taken, b"secret", 0o600).unwrap_err();
        assert!(e.to_string().contains("cannot rename"), "{e}");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("x.key")]);
        let ok = dir.path().join("y.key");
        write_file_atomic(&ok, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&ok).unwrap(), b"secret");
        assert_eq!(
            fs::metadata(&ok).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("y.key.tmp").exists());
    }

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

    /// A CA file, or the `ca` directory, that another user owns is
    /// refused, 0600 or not; root's are taken. Needs root to hand files
    /// to another user (CI runs as root).
    #[test]
    fn ca_files_another_user_owns_are_refused() {
        use std::os::unix::fs::chown;
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path(), "t", 1_700_000_000).unwrap();
        if !rustix::process::geteuid().is_root() {
            eprintln!(
                "not root: cannot give a file to another user; checked only that our own load"
            );
            load(dir.path()).unwrap();
            return;
        }
        let ca = dir.path().join("ca");
        let nobody = 65534;
        for name in ["db_client_ca.key", "tls_ca.crt"] {
            let path = ca.join(name);
            chown(&path, Some(nobody), None).unwrap();
            let e = load(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains(name) && e.contains("owned by uid 65534") && e.contains("chown"),
                "{e}"
            );
            assert!(load_or_generate(dir.path(), "t", 1).is_err());
            chown(&path, Some(0), None).unwrap();
            load(dir.path()).unwrap();
        }
        chown(&ca, Some(nobody), None).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        chown(&ca, Some(0), None).unwrap();
        load(dir.path()).unwrap();
        // The documented layout, read by root (`sudo wicketd nodes add`):
        // the service's user owns the data directory and the key set.
        let owned_by = |uid: u32| {
            for entry in fs::read_dir(&ca).unwrap() {
                chown(entry.unwrap().path(), Some(uid), None).unwrap();
            }
            chown(&ca, Some(uid), None).unwrap();
            chown(dir.path(), Some(uid), None).unwrap();
        };
        owned_by(nobody);
        load(dir.path()).unwrap();
        // But not a key of another user in it.
        chown(ca.join("tls_ca.key"), Some(nobody - 1), None).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65533"), "{e}");
        owned_by(0);
    }

    /// Two processes making the first key set at once (here: threads, each
    /// with its own lock file handle) end up with one set between them.
    #[test]
    fn a_first_key_set_made_twice_at_once_is_one_set() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let go = std::sync::Barrier::new(2);
            let (a, b) = std::thread::scope(|s| {
                let make = || {
                    go.wait();
                    load_or_generate(dir.path(), "t", 1_700_000_000).unwrap()
                };
                let a = s.spawn(make);
                let b = s.spawn(make);
                (a.join().unwrap(), b.join().unwrap())
            });
            assert!(a.1 != b.1, "exactly one made it");
            assert_eq!(a.0.tls.pin(), b.0.tls.pin());
            assert_eq!(a.0.ssh_user.public_key_raw(), b.0.ssh_user.public_key_raw());
            let on_disk = load(dir.path()).unwrap();
            assert_eq!(on_disk.tls.pin(), a.0.tls.pin());
        }
    }

    /// A directory that is not wicketd's is not made private behind its
    /// owner's back: open to others, it is refused with what to do. An
    /// empty one, or wicketd's own, is made 0700, as is a missing one.
    #[test]
    fn an_existing_data_directory_open_to_others_is_refused_not_changed() {
        let mode_of = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir_all(shared.join("lib")).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        let e = load_or_generate(&shared, "t", 1_700_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has mode 755") && e.contains("\"lib\"") && e.contains("chmod 700"),
            "{e}"
        );
        assert_eq!(mode_of(&shared), 0o755);
        assert!(!shared.join("ca").exists());
        fs::remove_dir(shared.join("lib")).unwrap();
        load_or_generate(&shared, "t", 1_700_000_000).unwrap();
        assert_eq!(mode_of(&shared), 0o700);
        // wicketd's own, opened up: made private again.
        fs::write(shared.join("wicket.db"), "").unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        load_or_generate(&shared, "t", 1_700_000_000).unwrap();
        assert_eq!(mode_of(&shared), 0o700);
        // A volume's root, as mounted: its `lost+found` is no one else's
        // (a file of that name is).
        let volume = dir.path().join("volume");
        fs::create_dir_all(volume.join("lost+found")).unwrap();
        fs::write(volume.join("lost+found/#12"), "").unwrap();
        fs::set_permissions(&volume, fs::Permissions::from_mode(0o755)).unwrap();
        load_or_generate(&volume, "t", 1_700_000_000).unwrap();
        assert_eq!(mode_of(&volume), 0o700);
        let other = dir.path().join("other");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("lost+found"), "").unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o755)).unwrap();
        let e = load_or_generate(&other, "t", 1_700_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"lost+found\""), "{e}");
        let fresh = dir.path().join("a/b");
        load_or_generate(&fresh, "t", 1_700_000_000).unwrap();
        assert_eq!(mode_of(&fresh), 0o700);
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        let e = ensure_private_dir(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
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
