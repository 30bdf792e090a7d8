//! Small helpers shared by the end-to-end harness: ephemeral ports, polling
//! with deadlines, running commands with useful errors, and finding binaries.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long `wait_until` sleeps between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// The harness's only clock read.
#[allow(clippy::disallowed_methods)] // Tests may read the clock: deadlines for polling real processes.
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// A free TCP port on 127.0.0.1: binds port 0, reads the port, and releases it.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let port = listener
        .local_addr()
        .context("reading the bound address")?
        .port();
    drop(listener);
    Ok(port)
}

/// Polls `f` every 25 ms until it returns `Some`, or fails once `timeout` has
/// passed; the error names `what`. `f` is always called at least once.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = now() + timeout;
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        if now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `Read::read`, again whenever a signal interrupted it. The kernel does
/// not restart a read of a socket with a read timeout (signal(7)), and
/// this test binary handles SIGCHLD (tokio's process support), so any
/// child's exit can interrupt one. (`read_exact` and `read_to_end` retry
/// already.)
pub fn read_uninterrupted(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Checks that the server closes each connection between `from` and
/// `to` after it was admitted (a login grace), reading and discarding
/// what it sends meanwhile.
pub fn closed_between(idle: Vec<(TcpStream, Instant)>, from: Duration, to: Duration) -> Result<()> {
    let mut buf = [0u8; 4096];
    for (mut c, admitted) in idle {
        let closed = loop {
            let left = to.saturating_sub(admitted.elapsed());
            if left.is_zero() {
                break false;
            }
            c.set_read_timeout(Some(left))?;
            match read_uninterrupted(&mut c, &mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        let after = admitted.elapsed();
        if !closed {
            bail!("still open after {after:?}");
        }
        if after < from {
            bail!("closed after {after:?}, before {from:?}");
        }
    }
    Ok(())
}

/// Waits until a TCP connection to `addr` succeeds.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_until(
        &format!("{addr} to accept TCP connections"),
        timeout,
        || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(250))
                .ok()
                .map(drop)
        },
    )
}

/// Runs `cmd` to completion and returns its stdout. If it cannot be spawned or
/// exits unsuccessfully, the error carries the command line, the exit status,
/// stdout and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// The first executable file named one of `names`, searching each directory
/// of `PATH` first and then `dirs` (e.g. `/usr/lib/postgresql/15/bin`).
pub fn find_binary(names: &[&str], dirs: &[&str]) -> Option<PathBuf> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let all_dirs = path_dirs
        .iter()
        .map(PathBuf::as_path)
        .chain(dirs.iter().map(Path::new));
    for dir in all_dirs {
        for name in names {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Some(candidate);
            }
        }
    }
    None
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
