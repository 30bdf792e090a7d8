//! A real, throwaway OpenSSH server for end-to-end tests: a Wicket node.
//!
//! `Sshd::builder().start(&wicketd)` makes a fresh Ed25519 host key in a
//! temporary directory, has the daemon issue the node's host certificate and
//! print the node-login CA (`wicketd nodes add NAME --host-key ... --write-dir ...`,
//! exactly what an operator runs), writes an `sshd_config` that trusts
//! Wicket's node-login CA (`TrustedUserCAKeys`) and presents the host certificate,
//! and runs stock `sshd -D` in the foreground on a 127.0.0.1 port, logging
//! at `VERBOSE` to a file (so the certificate key ID — user, session and
//! request IDs — is visible). Dropping the handle stops it.
//!
//! When the tests run as root the node accepts `root`; otherwise sshd runs as
//! the current user and only that user can log in ([`Sshd::login`]).

use crate::harness_util::{find_binary, free_port, run, wait_until};
use crate::harness_wicket::Wicketd;
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for [`Sshd`].
#[derive(Debug, Default)]
pub struct SshdBuilder {
    port: Option<u16>,
    node: Option<String>,
    extra: Vec<String>,
    /// Trust this user CA line instead of asking wicketd (for a node that
    /// is not a Wicket node, e.g. a jump host in the benchmark).
    user_ca: Option<String>,
}

/// The port asked for was taken by another server before sshd could bind
/// it (a port from [`free_port`] is free only until someone binds it): the
/// caller may pick another.
#[derive(Debug)]
pub struct PortInUse(pub u16);

impl std::fmt::Display for PortInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "127.0.0.1:{} was taken before sshd could listen on it",
            self.0
        )
    }
}

impl std::error::Error for PortInUse {}

/// A running `sshd`.
pub struct Sshd {
    child: Option<Child>,
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
}

impl std::fmt::Debug for Sshd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sshd")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The OS login a node in these tests accepts: `root` when running as root,
/// else the current user.
pub fn test_login() -> String {
    if is_root() {
        return "root".into();
    }
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            run(Command::new("id").arg("-un"))
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "root".into())
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

/// The `sshd` binary (usually not on a non-root user's `PATH`).
pub fn sshd_binary() -> Result<PathBuf> {
    find_binary(&["sshd"], &["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .ok_or_else(|| anyhow!("sshd not found; install openssh-server (.ci/run does)"))
}

/// The node's SFTP server program (`internal-sftp` when none is installed).
pub fn sftp_server() -> String {
    for p in [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "internal-sftp".into()
}

impl SshdBuilder {
    /// Listen on this 127.0.0.1 port (default: a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The node's name in Wicket's config (default `node-1`); its host
    /// certificate names it.
    pub fn node(mut self, name: &str) -> Self {
        self.node = Some(name.into());
        self
    }

    /// An extra `sshd_config` line.
    pub fn config_line(mut self, line: &str) -> Self {
        self.extra.push(line.into());
        self
    }

    /// Trust this user CA public key line (OpenSSH format) instead of the
    /// wicketd's; no host certificate is made. For plain jump hosts.
    pub fn trust_user_ca(mut self, line: &str) -> Self {
        self.user_ca = Some(line.into());
        self
    }

    /// Starts a node of `wicketd` (its CA signs the host certificate and is
    /// trusted for users).
    pub fn start(self, wicketd: &Wicketd) -> Result<Sshd> {
        self.start_with(Some(wicketd))
    }

    /// Starts with the user CA given to [`Self::trust_user_ca`].
    pub fn start_plain(self) -> Result<Sshd> {
        self.start_with(None)
    }

    fn start_with(self, wicketd: Option<&Wicketd>) -> Result<Sshd> {
        let sshd = sshd_binary()?;
        if is_root() {
            // Debian's sshd wants its privilege-separation directory.
            let _ = fs::create_dir_all("/run/sshd");
        }
        let dir = tempfile::Builder::new()
            .prefix("wicket-sshd-")
            .tempdir_in("/tmp")
            .context("creating the sshd temp dir")?;
        let root = dir.path();
        let host_key = root.join("ssh_host_ed25519_key");
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "wicket-test-node",
                "-f",
            ])
            .arg(&host_key))
        .context("making the node's host key")?;
        let node = self.node.clone().unwrap_or_else(|| "node-1".into());
        let mut lines = vec![];
        match (wicketd, &self.user_ca) {
            (_, Some(ca)) => {
                let ca_path = root.join("wicket_node_ca.pub");
                fs::write(&ca_path, format!("{ca}\n"))?;
                lines.push(format!("TrustedUserCAKeys {}", ca_path.display()));
            }
            (Some(d), None) => {
                let host_key_arg = format!(
                    "--host-key={}",
                    root.join("ssh_host_ed25519_key.pub").display()
                );
                let write_arg = format!("--write-dir={}", root.display());
                let mut cmd = d.admin(&["nodes", "add", &node, &host_key_arg, &write_arg])?;
                run(&mut cmd).context("wicketd nodes add")?;
                let cert = root.join("ssh_host_ed25519_key-cert.pub");
                let ca = root.join("wicket_node_ca.pub");
                if !cert.exists() || !ca.exists() {
                    bail!("wicketd nodes add wrote no host certificate or node-login CA");
                }
                lines.push(format!("TrustedUserCAKeys {}", ca.display()));
                lines.push(format!("HostCertificate {}", cert.display()));
            }
            (None, None) => bail!("an sshd needs a wicketd or a user CA to trust"),
        }
        let port = match self.port {
            Some(p) => p,
            None => free_port()?,
        };
        let log_path = root.join("sshd.log");
        let config = root.join("sshd_config");
        // X11 forwarding on, as in Debian's stock sshd_config; the node's
        // xauth keeps session cookies in this temp dir, not in ~/.Xauthority.
        let mut text = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nUsePAM no\n\
             SetEnv XAUTHORITY={}\n\
             StrictModes no\nLogLevel VERBOSE\nAuthorizedKeysFile none\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin yes\n\
             AllowTcpForwarding yes\nAllowAgentForwarding yes\nX11Forwarding yes\nPrintMotd no\n\
             PrintLastLog no\nAcceptEnv LANG LC_*\nMaxSessions 100\nMaxStartups 500:30:1000\n\
             Subsystem sftp {}\n",
            host_key.display(),
            root.join("Xauthority").display(),
            sftp_server()
        );
        for l in lines.iter().chain(&self.extra) {
            text.push_str(l);
            text.push('\n');
        }
        fs::write(&config, text)?;
        run(Command::new(&sshd).arg("-t").arg("-f").arg(&config))
            .context("sshd -t rejected the generated config")?;
        let child = Command::new(&sshd)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning sshd")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut sshd = Sshd {
            child: Some(child),
            dir,
            addr,
            log_path,
        };
        // Listening, as its own log says: a connection alone could reach
        // another server that took the port first (this sshd then exits).
        let listening = format!("Server listening on 127.0.0.1 port {port}.");
        let waited = wait_until("sshd to listen", STARTUP_TIMEOUT, || {
            let log = sshd.log();
            if log.contains("Address already in use") {
                return Some(Err(anyhow!(PortInUse(port))));
            }
            if let Some(c) = sshd.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(Err(anyhow!("sshd exited with {st}")));
                }
            }
            let connects = || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            (log.contains(&listening) && connects()).then_some(Ok(()))
        });
        match waited.and_then(|r| r) {
            Ok(()) => Ok(sshd),
            Err(e) if e.is::<PortInUse>() => Err(e),
            Err(e) => bail!("{e:#}\nsshd log:\n{}", sshd.log()),
        }
    }
}

impl Sshd {
    pub fn builder() -> SshdBuilder {
        SshdBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The login this node accepts (see [`test_login`]).
    pub fn login(&self) -> String {
        test_login()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The node's host public key line.
    pub fn host_public_key(&self) -> Result<String> {
        Ok(
            fs::read_to_string(self.dir.path().join("ssh_host_ed25519_key.pub"))?
                .trim()
                .to_owned(),
        )
    }

    /// Stops the server (SIGTERM, then SIGKILL after a deadline).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let exited = wait_until("sshd to exit", Duration::from_secs(5), || {
                child.try_wait().ok().flatten()
            });
            if exited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
