//! Builders for real `wicketd` processes and `wicket` CLI invocations.
//!
//! The binaries are built once per test run with the same cargo that runs the
//! tests (`cargo build --workspace --bins`, a no-op when they are fresh), then
//! started as child processes on 127.0.0.1 ephemeral ports.

use crate::harness_util::{run, wait_until};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

/// The directory holding the workspace's built binaries (built on first use).
pub fn bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_binaries() -> Result<PathBuf> {
    // target/<profile>/deps/e2e-<hash>  ->  target/<profile>
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "--workspace",
        "--bins",
        "--manifest-path",
    ])
    .arg(&manifest);
    if release {
        // `cargo bench` builds with the bench profile (release plus
        // `debug = false`); building the binaries with the same one keeps
        // the two from rebuilding each other's dependencies every run.
        cmd.args(["--profile", "bench"]);
    }
    // The variables cargo sets for this test binary would look like a
    // changed environment to build scripts (ring's reads
    // CARGO_MANIFEST_DIR) and rebuild half the tree on every run.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let per_package = [
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| k.starts_with(p));
        if per_package || k == "CARGO_PRIMARY_PACKAGE" || k == "CARGO_TARGET_TMPDIR" {
            cmd.env_remove(k);
        }
    }
    run(&mut cmd).context("building wicketd and wicket")?;
    for b in ["wicketd", "wicket"] {
        if !profile_dir.join(b).exists() {
            bail!("{} was not built in {}", b, profile_dir.display());
        }
    }
    Ok(profile_dir)
}

/// `wicketd` with arguments.
pub fn wicketd_cmd() -> Result<Command> {
    Ok(Command::new(bin_dir()?.join("wicketd")))
}

/// Configures and starts a `wicketd`.
#[derive(Debug, Default)]
pub struct WicketdBuilder {
    config_yaml: Option<String>,
    extra_args: Vec<String>,
}

/// A running `wicketd` child process; stopped on drop.
pub struct Wicketd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub api: SocketAddr,
    pub pin: String,
    pub config_path: Option<PathBuf>,
    stdout: Vec<String>,
    stderr_path: PathBuf,
    yaml: Option<String>,
    extra_args: Vec<String>,
}

impl std::fmt::Debug for Wicketd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wicketd")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl WicketdBuilder {
    /// A config file body (YAML). `data_dir` and `listen.api` are overridden on
    /// the command line with a temp dir and an ephemeral port.
    pub fn config(mut self, yaml: impl Into<String>) -> Self {
        self.config_yaml = Some(yaml.into());
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }

    pub fn start(self) -> Result<Wicketd> {
        let dir = tempfile::Builder::new().prefix("wicketd-").tempdir()?;
        self.start_in(dir)
    }

    /// Starts in an existing directory (its `data/` is kept: a restart, or
    /// CAs prepared with `wicketd databases ca --data-dir DIR/data`).
    pub fn start_in(self, dir: tempfile::TempDir) -> Result<Wicketd> {
        let data = dir.path().join("data");
        let config_path = match &self.config_yaml {
            Some(y) => {
                let p = dir.path().join("wicket.yaml");
                std::fs::write(&p, y)?;
                Some(p)
            }
            None => None,
        };
        let stderr_path = dir.path().join("wicketd.stderr");
        let mut cmd = wicketd_cmd()?;
        cmd.current_dir(dir.path())
            .arg("start")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-api", "127.0.0.1:0"])
            // Every proxy on an ephemeral port, whatever the config says,
            // so tests running in parallel never collide.
            .args(["--listen-postgres", "127.0.0.1:0"])
            .args(["--listen-ssh", "127.0.0.1:0"])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?);
        if let Some(p) = &config_path {
            cmd.arg("--config").arg(p);
        }
        let mut child = cmd.spawn().context("spawning wicketd")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let mut api = None;
        let mut pin = None;
        let waited = wait_until("wicketd to listen", Duration::from_secs(60), || {
            while let Ok(l) = rx.try_recv() {
                if let Some(a) = l.strip_prefix("API listening on https://") {
                    api = a.trim().parse::<SocketAddr>().ok();
                }
                if let Some(p) = l.strip_prefix("CA pin: ") {
                    pin = Some(p.trim().to_owned());
                }
                lines.push(l);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(anyhow!("wicketd exited with {status}")));
            }
            match (api, &pin) {
                (Some(a), Some(p)) => Some(Ok((a, p.clone()))),
                _ => None,
            }
        });
        let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let (api, pin) = match waited.and_then(|r| r) {
            Ok(x) => x,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{e:#}\nstdout:\n{}\nstderr:\n{}",
                    lines.join("\n"),
                    stderr()
                );
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Ok(Wicketd {
            child: Some(child),
            dir,
            api,
            pin,
            config_path,
            stdout: lines,
            stderr_path,
            yaml: self.config_yaml,
            extra_args: self.extra_args,
        })
    }
}

impl Wicketd {
    pub fn builder() -> WicketdBuilder {
        WicketdBuilder::default()
    }

    /// The daemon's process ID (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn proxy(&self) -> String {
        self.api.to_string()
    }

    /// The PostgreSQL proxy's address, from the startup output.
    pub fn postgres_addr(&self) -> Option<SocketAddr> {
        self.stdout.iter().find_map(|l| {
            l.strip_prefix("Postgres proxy listening on ")
                .and_then(|a| a.trim().parse().ok())
        })
    }

    /// A second wicketd with this one's config (so its store, which must
    /// be PostgreSQL) and a copy of its CA key set, as deploy/README.md
    /// says to run several.
    pub fn twin(&self) -> Result<Wicketd> {
        let dir = tempfile::Builder::new().prefix("wicketd-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        run(Command::new("cp")
            .arg("-a")
            .arg(self.data_dir().join("ca"))
            .arg(&data))?;
        let yaml = self
            .yaml
            .clone()
            .ok_or_else(|| anyhow!("a twin needs the config this wicketd was started with"))?;
        if !yaml.contains("storage: postgres://") {
            bail!("wicketds share state only through a PostgreSQL store");
        }
        let d = Wicketd::builder().config(yaml).start_in(dir)?;
        if d.pin != self.pin {
            bail!("the twin's CA differs");
        }
        Ok(d)
    }

    pub fn startup_output(&self) -> &[String] {
        &self.stdout
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `wicketd <args> --data-dir D [--config C]` against this daemon's store.
    pub fn admin(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = wicketd_cmd()?;
        cmd.current_dir(self.dir.path())
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir());
        if let Some(p) = &self.config_path {
            cmd.arg("--config").arg(p);
        }
        Ok(cmd)
    }

    /// Adds a user with a password; returns the TOTP provisioning URI if asked.
    pub fn add_user(
        &self,
        name: &str,
        roles: &str,
        password: &str,
        totp: bool,
    ) -> Result<Option<String>> {
        let mut args = vec!["users", "add", name, "--roles", roles, "--password-stdin"];
        if totp {
            args.push("--totp");
        }
        let mut cmd = self.admin(&args)?;
        let out = pipe_stdin(&mut cmd, &format!("{password}\n"))?;
        if !out.status.success() {
            bail!(
                "users add failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("otpauth://"))
            .map(str::to_owned))
    }

    /// Stops this daemon and starts it again on the same data directory and
    /// configuration (a new ephemeral port).
    pub fn restart(mut self) -> Result<Wicketd> {
        self.stop()?;
        let dir = tempfile::Builder::new().prefix("wicketd-").tempdir()?;
        std::fs::rename(self.data_dir(), dir.path().join("data"))?;
        let builder = WicketdBuilder {
            config_yaml: self.yaml.take(),
            extra_args: std::mem::take(&mut self.extra_args),
        };
        builder.start_in(dir)
    }

    /// Stops this daemon and starts it again on the same data directory
    /// with another configuration (an administrator's edit).
    pub fn restart_with(mut self, yaml: impl Into<String>) -> Result<Wicketd> {
        self.yaml = Some(yaml.into());
        self.restart()
    }

    /// Stops, lets `down` pass (polling the clock), and starts again on the
    /// same data: what happened while it was down must happen at start.
    pub fn restart_after(mut self, down: Duration) -> Result<Wicketd> {
        self.stop()?;
        let until = crate::harness_util::now() + down;
        wait_until("downtime to pass", down + Duration::from_secs(5), || {
            (crate::harness_util::now() >= until).then_some(())
        })?;
        self.restart()
    }

    /// Sends SIGTERM and waits for exit (with a deadline), then kills.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let exited = wait_until("wicketd to exit", Duration::from_secs(10), || {
                child.try_wait().ok().flatten()
            });
            if exited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("wicketd did not exit on SIGTERM");
            }
        }
        Ok(())
    }
}

impl Drop for Wicketd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Runs `cmd` with `input` on stdin.
/// The TOTP code of the `otpauth://` URI `wicketd users add --totp`
/// printed, for the time step `offset_secs` from now.
pub fn totp_code(uri: &str, offset_secs: i64) -> Result<String> {
    let secret = uri
        .split("secret=")
        .nth(1)
        .and_then(|s| s.split('&').next())
        .ok_or_else(|| anyhow!("no secret in {uri:?}"))?;
    let key =
        wicketd::auth::base32_decode(secret).ok_or_else(|| anyhow!("bad secret in {uri:?}"))?;
    let now = wicketd::clock::now().timestamp() + offset_secs;
    Ok(format!(
        "{:06}",
        wicketd::auth::hotp(&key, (now / 30) as u64)
    ))
}

pub fn pipe_stdin(cmd: &mut Command, input: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// One user's `wicket` CLI, with its own `$WICKET_HOME`.
#[derive(Debug)]
pub struct WicketCli {
    pub home: tempfile::TempDir,
}

/// What a CLI invocation returned.
#[derive(Debug)]
pub struct CliOutput {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }
}

impl WicketCli {
    pub fn new() -> Result<Self> {
        Ok(Self {
            home: tempfile::Builder::new().prefix("wicket-home-").tempdir()?,
        })
    }

    pub fn cmd(&self) -> Result<Command> {
        let mut c = Command::new(bin_dir()?.join("wicket"));
        c.env("WICKET_HOME", self.home.path())
            .env_remove("WICKET_PASSWORD")
            .env_remove("WICKET_PROXY")
            .env_remove("WICKET_USER");
        Ok(c)
    }

    /// A new profile logged in to `d` as `user` with `password` (no OTP).
    pub fn logged_in(d: &Wicketd, user: &str, password: &str) -> Result<Self> {
        let cli = Self::new()?;
        let out = cli.login(d, user, password, &[])?;
        if !out.ok {
            bail!("{user} cannot log in: {}", out.stderr);
        }
        Ok(cli)
    }

    /// Runs `wicket <args>` with `stdin` as input.
    pub fn run(&self, args: &[&str], stdin: &str) -> Result<CliOutput> {
        let mut cmd = self.cmd()?;
        cmd.args(args);
        let out = pipe_stdin(&mut cmd, stdin)?;
        Ok(CliOutput {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs and requires success.
    pub fn ok(&self, args: &[&str]) -> Result<CliOutput> {
        let out = self.run(args, "")?;
        if !out.ok {
            bail!("wicket {args:?} failed: {}{}", out.stdout, out.stderr);
        }
        Ok(out)
    }

    /// The names of the nodes `wicket ls` lists.
    pub fn node_names(&self) -> Result<Vec<String>> {
        let ls = self.ok(&["ls", "--format", "json"])?.json()?;
        Ok(ls["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// `wicket login` with the daemon's pin and a password on stdin.
    pub fn login(
        &self,
        d: &Wicketd,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> Result<CliOutput> {
        let proxy = d.proxy();
        let mut args = vec![
            "login",
            "--proxy",
            &proxy,
            "--user",
            user,
            "--ca-pin",
            &d.pin,
            "--password-stdin",
        ];
        args.extend_from_slice(extra);
        self.run(&args, &format!("{password}\n"))
    }

    /// `curl -sS --fail-with-body` presenting this user's client certificate
    /// and trusting the saved CA bundle: a second, independent TLS client.
    pub fn curl(&self) -> Result<Command> {
        let st = self.status()?;
        let file = |k: &str| -> Result<PathBuf> {
            Ok(PathBuf::from(
                st["files"][k]
                    .as_str()
                    .ok_or_else(|| anyhow!("status has no {k} file"))?,
            ))
        };
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", "--cacert"])
            .arg(file("ca_bundle")?)
            .arg("--cert")
            .arg(file("tls_certificate")?)
            .arg("--key")
            .arg(file("tls_key")?);
        Ok(cmd)
    }

    /// The active profile's directory (from `wicket status --format json`).
    pub fn status(&self) -> Result<serde_json::Value> {
        self.ok(&["status", "--format", "json"])?.json()
    }

    /// `wicket audit search ARGS --format json`: the events this user may see.
    pub fn audit(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let mut a = vec!["audit", "search", "--format", "json"];
        a.extend_from_slice(args);
        match self.ok(&a)?.json()? {
            serde_json::Value::Array(events) => Ok(events),
            other => bail!("audit search did not return a list: {other}"),
        }
    }
}
