//! Credentials on disk under `$WICKET_HOME` (default `~/.wicket`): one profile
//! per proxy and user, in the formats the real clients read. Private keys are
//! created here, written 0600, and never sent anywhere.
//!
//! ```text
//! $WICKET_HOME/current                        "<proxy>/<user>" of the active profile
//! $WICKET_HOME/profiles/<proxy>/<user>/
//!     profile.json                            proxy, user, cluster, pin, window, roles
//!     id_ed25519, id_ed25519.pub              OpenSSH key pair (private 0600)
//!     id_ed25519-cert.pub                     OpenSSH user certificate
//!     tls.key, tls.crt                        PEM client key (0600) and certificate
//!     ca.pem                                  Wicket TLS CA bundle
//!     ssh_known_hosts                         @cert-authority line for the proxy's host CA
//! ```

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What `profile.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProfileInfo {
    pub proxy: String,
    pub user: String,
    pub cluster_name: String,
    pub ca_pin: String,
    pub roles: Vec<String>,
    pub principals: Vec<String>,
    pub request_ids: Vec<String>,
    pub valid_after: DateTime<Utc>,
    pub valid_before: DateTime<Utc>,
}

/// Fails with a reason naming the grants when the profile's certificates
/// have expired (they end with the grant they were issued for).
pub fn check_not_expired(info: &ProfileInfo, now: DateTime<Utc>) -> Result<()> {
    if info.valid_before > now {
        return Ok(());
    }
    let grants = if info.request_ids.is_empty() {
        String::new()
    } else {
        format!(
            " (with the grant of access request {}, which has expired)",
            info.request_ids.join(", ")
        )
    };
    bail!(
        "your certificate expired at {}{grants}; run `wicket login` and request access again if you need it",
        info.valid_before.to_rfc3339()
    )
}

/// `$WICKET_HOME`, or `~/.wicket`. Always absolute: the paths under it go
/// into the ssh configuration, which ssh reads from any directory.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("WICKET_HOME").filter(|h| !h.is_empty()) {
        let h = PathBuf::from(h);
        if h.is_relative() {
            let here = std::env::current_dir().context("WICKET_HOME is relative")?;
            return Ok(here.join(h));
        }
        return Ok(h);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("neither WICKET_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".wicket"))
}

fn safe_component(s: &str) -> String {
    // Never `.`, `..` or empty: each name is one directory of its own.
    if s.is_empty() || s.chars().all(|c| c == '.') {
        return format!("_{s}");
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The lock file in a profile directory.
const LOCK: &str = ".lock";

/// The profile's lock is held by a writer.
#[derive(Debug)]
pub struct Busy;

/// A profile directory.
#[derive(Debug, Clone)]
pub struct Profile {
    pub dir: PathBuf,
}

impl Profile {
    pub fn path(home: &Path, proxy: &str, user: &str) -> Self {
        Self {
            dir: home
                .join("profiles")
                .join(safe_component(proxy))
                .join(safe_component(user)),
        }
    }

    /// The active profile (`$WICKET_HOME/current`).
    pub fn current(home: &Path) -> Result<Self> {
        let cur = fs::read_to_string(home.join("current")).map_err(|_| {
            anyhow!("not logged in; run `wicket login --proxy HOST:PORT --user NAME`")
        })?;
        let (proxy, user) = cur.trim().split_once('/').ok_or_else(|| {
            anyhow!(
                "{} is corrupt; log in again",
                home.join("current").display()
            )
        })?;
        let p = Self::path(home, proxy, user);
        if !p.info_path().exists() {
            bail!("not logged in; run `wicket login --proxy HOST:PORT --user NAME`");
        }
        Ok(p)
    }

    pub fn make_current(&self, home: &Path, proxy: &str, user: &str) -> Result<()> {
        write_file(
            &home.join("current"),
            format!("{}/{}\n", safe_component(proxy), safe_component(user)).as_bytes(),
            0o600,
        )
    }

    pub fn info_path(&self) -> PathBuf {
        self.dir.join("profile.json")
    }

    /// Takes the profile's lock (`.lock` in its directory) to replace its
    /// files, waiting for readers to finish. The files are replaced one by
    /// one, so a reader without the lock could pair one login's key with
    /// another's certificate. Held until the returned file is dropped.
    pub fn lock_for_writing(&self) -> Result<fs::File> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        let path = self.dir.join(LOCK);
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
        }
        .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    }

    /// [`Self::lock_for_reading`] without waiting: `Err(Busy)` while a
    /// writer (a login) holds the lock.
    pub fn try_lock_for_reading(&self) -> Result<Option<fs::File>, Busy> {
        let Ok(file) = fs::File::open(self.dir.join(LOCK)) else {
            return Ok(None);
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Err(Busy),
            Err(fs::TryLockError::Error(_)) => Ok(None),
        }
    }

    /// Takes the profile's lock to read its files, waiting for a login
    /// that is replacing them. Best effort: a profile without the lock
    /// file (written before it existed), on a read-only mount or on a file
    /// system without locks is read as it is.
    pub fn lock_for_reading(&self) -> Option<fs::File> {
        let file = fs::File::open(self.dir.join(LOCK)).ok()?;
        file.lock_shared().ok()?;
        Some(file)
    }
    pub fn ssh_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    pub fn ssh_pub(&self) -> PathBuf {
        self.dir.join("id_ed25519.pub")
    }
    pub fn ssh_cert(&self) -> PathBuf {
        self.dir.join("id_ed25519-cert.pub")
    }
    pub fn tls_key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
    pub fn tls_cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }
    pub fn ca_bundle(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("ssh_known_hosts")
    }

    pub fn read_info(&self) -> Result<ProfileInfo> {
        let text = fs::read_to_string(self.info_path())
            .with_context(|| format!("cannot read {}", self.info_path().display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt; log in again", self.info_path().display()))
    }

    pub fn write_info(&self, info: &ProfileInfo) -> Result<()> {
        let text = serde_json::to_vec_pretty(info)?;
        write_file(&self.info_path(), &text, 0o600)
    }

    /// Removes the profile's credentials (keys, certificates, info).
    pub fn remove(&self) -> Result<()> {
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("cannot remove {}", self.dir.display()))?;
        }
        Ok(())
    }
}

/// Counts temporary files written by this process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Creates the parent directories 0700 and writes `contents` with `mode`
/// through a temporary file, so readers never see half a key.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o700))?;
    }
    // Named after the whole file name, this process and a counter: two
    // files (`tls.key`, `tls.crt`) or two `wicket` runs never share one.
    let mut name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_os_string();
    remove_abandoned_temps(path, &name.to_string_lossy());
    name.push(format!(".{}.", std::process::id()));
    let (tmp, mut f) = create_temp(path, &name, &NEXT, mode)?;
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Creates a new temporary file beside `path`, named `stem` then the next
/// number of `counter` then `.tmp~`. A name already taken (left by an
/// earlier process with this PID, or by anyone else) is passed over, not
/// an error.
fn create_temp(
    path: &Path,
    stem: &std::ffi::OsStr,
    counter: &AtomicU64,
    mode: u32,
) -> Result<(PathBuf, fs::File)> {
    let mut attempt = 0;
    loop {
        let mut candidate = stem.to_os_string();
        candidate.push(format!("{}.tmp~", counter.fetch_add(1, Ordering::Relaxed)));
        let tmp = path.with_file_name(candidate);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
            }
        }
    }
}

/// How old a temporary file of a gone process must be to be removed.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes temporary files of `path` (`NAME.PID.N.tmp~`) left by a `wicket`
/// that died mid-write: those a minute old whose process is gone. Where
/// `/proc` does not tell, none are removed.
fn remove_abandoned_temps(path: &Path, name: &str) {
    let (Some(dir), true) = (path.parent(), Path::new("/proc/self").exists()) else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".tmp~"))
            .and_then(|rest| rest.split_once('.'))
            .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // Old too: a writer in another PID namespace sharing this
        // directory (a container) looks dead here.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= ABANDONED_AFTER);
        if old && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A login replacing the profile's files holds its lock: readers wait
    /// for the whole set (and the directory is the user's alone).
    #[test]
    fn replacing_a_profile_keeps_readers_out() {
        let home = tempfile::tempdir().unwrap();
        let p = Profile {
            dir: home.path().join("profiles").join("p").join("alice"),
        };
        let writing = p.lock_for_writing().unwrap();
        let mode = fs::metadata(&p.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let reader = fs::OpenOptions::new()
            .write(true)
            .open(p.dir.join(".lock"))
            .unwrap();
        assert!(reader.try_lock_shared().is_err(), "a reader waits");
        drop(writing);
        reader.try_lock_shared().unwrap();
        let second = p.lock_for_reading().unwrap();
        let writer = fs::OpenOptions::new()
            .write(true)
            .open(p.dir.join(".lock"))
            .unwrap();
        assert!(writer.try_lock().is_err(), "a writer waits for readers");
        drop((reader, second));
        writer.try_lock().unwrap();
    }

    #[test]
    fn temporary_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls.key");
        // A PID above the kernel's limit (4194304) is never alive.
        let dead = dir.path().join("tls.key.4294967295.0.tmp~");
        // This process's own name, with a counter its writes in this run
        // do not reach (tests share the counter).
        let alive = dir
            .path()
            .join(format!("tls.key.{}.999999.tmp~", std::process::id()));
        let other = dir.path().join("tls.crt.4294967295.0.tmp~");
        let fresh = dir.path().join("tls.key.4294967295.1.tmp~");
        let no_counter = dir.path().join("tls.key.4294967295..tmp~");
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        for f in [&dead, &alive, &other, &fresh, &no_counter] {
            fs::write(f, b"x").unwrap();
            if f != &fresh {
                fs::File::options()
                    .write(true)
                    .open(f)
                    .unwrap()
                    .set_modified(long_ago)
                    .unwrap();
            }
        }
        write_file(&key, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"secret");
        assert!(!dead.exists(), "a dead writer's file stayed");
        assert!(alive.exists(), "a live writer's file was removed");
        assert!(other.exists(), "another file's temporary was removed");
        assert!(fresh.exists(), "a fresh temporary was removed");
        assert!(no_counter.exists(), "a name not of the pattern was removed");
    }

    #[test]
    fn names_from_the_server_stay_one_directory_each() {
        let home = Path::new("/h");
        for (user, dir) in [
            ("alice", "/h/profiles/p/alice"),
            ("..", "/h/profiles/p/_.."),
            (".", "/h/profiles/p/_."),
            ("", "/h/profiles/p/_"),
            ("a/../b", "/h/profiles/p/a_.._b"),
        ] {
            assert_eq!(
                Profile::path(home, "p", user).dir,
                Path::new(dir),
                "{user:?}"
            );
        }
    }

    /// Files sharing a stem (`tls.key`, `tls.crt`), written at once from
    /// several threads, each end with their own contents and mode, and no
    /// temporary file is left.
    #[test]
    fn a_taken_temporary_name_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id.key");
        // The names the next four would take, already there (an earlier
        // process with this PID left them).
        for n in 0..4 {
            fs::write(dir.path().join(format!("id.key.9.{n}.tmp~")), b"left").unwrap();
        }
        let counter = AtomicU64::new(0);
        let (tmp, _) = create_temp(&key, "id.key.9.".as_ref(), &counter, 0o600).unwrap();
        assert_eq!(tmp, dir.path().join("id.key.9.4.tmp~"));
        // Far more taken than tried: an error naming the file, not a loop.
        for n in 5..40 {
            fs::write(dir.path().join(format!("id.key.9.{n}.tmp~")), b"left").unwrap();
        }
        let err = create_temp(&key, "id.key.9.".as_ref(), &counter, 0o600).unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
    }

    #[test]
    fn files_sharing_a_stem_are_written_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (key, crt) = (dir.path().join("tls.key"), dir.path().join("tls.crt"));
        std::thread::scope(|s| {
            for t in 0..4 {
                let (key, crt) = (&key, &crt);
                s.spawn(move || {
                    for i in 0..50 {
                        write_file(key, format!("secret {t} {i}").as_bytes(), 0o600).unwrap();
                        write_file(crt, format!("public {t} {i}").as_bytes(), 0o644).unwrap();
                    }
                });
            }
        });
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&crt), 0o644);
        assert!(fs::read_to_string(&key).unwrap().starts_with("secret "));
        assert!(fs::read_to_string(&crt).unwrap().starts_with("public "));
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
