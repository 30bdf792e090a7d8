//! A real, throwaway PostgreSQL server for end-to-end tests.
//!
//! `Postgres::builder().start()` runs `initdb` in a fresh temporary directory
//! and starts `postgres` in the foreground as a child process on a free
//! 127.0.0.1 port, with trust authentication for every user over loopback
//! (optionally TLS, and `cert` authentication for chosen users). Dropping the
//! handle stops the server and removes the directory.
//!
//! PostgreSQL refuses to run as root; when the tests run as root, `initdb` and
//! `postgres` run as the OS user `postgres` (or a system user `wicket-test`,
//! created if need be) through `runuser`.

use crate::harness_util::{find_binary, free_port, run, wait_until};
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Where Debian/Ubuntu and source builds put the server binaries, which are
/// usually not on `PATH`.
const PG_BIN_DIRS: &[&str] = &[
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/14/bin",
    "/usr/local/pgsql/bin",
];

/// The OS user created to run the server when running as root and there is
/// no `postgres` user.
const FALLBACK_OS_USER: &str = "wicket-test";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
const LOG_TAIL_LINES: usize = 60;
/// How many ports to try when the one picked is taken before the server binds it.
const PORT_ATTEMPTS: u32 = 3;

/// Options for [`Postgres`]; see [`Postgres::builder`].
#[derive(Default)]
pub struct PostgresBuilder {
    tls: Option<Tls>,
    cert_users: Vec<String>,
}

struct Tls {
    server_cert_pem: String,
    server_key_pem: String,
    client_ca_pem: Option<String>,
}

impl PostgresBuilder {
    /// Enables TLS (`ssl=on`) with this server certificate chain and key.
    /// With `client_ca_pem`, client certificates are verified against it
    /// (`ssl_ca_file`), and the users given to [`Self::cert_users`] must
    /// authenticate with a certificate (`hostssl ... cert`).
    pub fn tls(
        mut self,
        server_cert_pem: String,
        server_key_pem: String,
        client_ca_pem: Option<String>,
    ) -> Self {
        self.tls = Some(Tls {
            server_cert_pem,
            server_key_pem,
            client_ca_pem,
        });
        self
    }

    /// Database users that must log in over TLS with a client certificate
    /// whose CN is the user name (their non-TLS logins are rejected). Needs
    /// `tls(.., Some(client_ca))`. Everyone else (including `postgres`) keeps
    /// trust authentication.
    pub fn cert_users(mut self, users: Vec<String>) -> Self {
        self.cert_users = users;
        self
    }

    /// Initialises a cluster in a fresh temporary directory, starts the
    /// server and waits (up to 30 s) until it answers queries.
    pub fn start(self) -> Result<Postgres> {
        let bins = Binaries::find()?;
        let os_user = if running_as_root()? {
            Some(ensure_os_user()?)
        } else {
            None
        };

        // Under /tmp so that the OS user can traverse every parent.
        let mut tmp = tempfile::Builder::new();
        tmp.prefix("wicket-pg-");
        let dir = if os_user.is_some() {
            tmp.tempdir_in("/tmp")
        } else {
            tmp.tempdir()
        }
        .context("creating the PostgreSQL temp dir")?;
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 0755 {}", root.display()))?;

        let data_dir = root.join("data");
        let log_path = root.join("postgres.log");
        let hba_path = root.join("pg_hba.conf");
        fs::write(&hba_path, self.hba_conf()?)
            .with_context(|| format!("writing {}", hba_path.display()))?;

        let mut settings: Vec<(&str, String)> = vec![
            ("listen_addresses", "127.0.0.1".into()),
            ("unix_socket_directories", path_str(&root)?.into()),
            ("hba_file", path_str(&hba_path)?.into()),
            ("fsync", "off".into()),
            ("synchronous_commit", "off".into()),
            ("full_page_writes", "off".into()),
            ("max_connections", "50".into()),
            ("shared_buffers", "16MB".into()),
            ("logging_collector", "off".into()),
        ];
        if let Some(tls) = &self.tls {
            let cert = root.join("server.crt");
            let key = root.join("server.key");
            fs::write(&cert, &tls.server_cert_pem).context("writing server.crt")?;
            fs::write(&key, &tls.server_key_pem).context("writing server.key")?;
            // PostgreSQL refuses a key readable by group or others.
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
                .context("chmod 0600 server.key")?;
            settings.push(("ssl", "on".into()));
            settings.push(("ssl_cert_file", path_str(&cert)?.into()));
            settings.push(("ssl_key_file", path_str(&key)?.into()));
            if let Some(ca) = &tls.client_ca_pem {
                let ca_path = root.join("client-ca.crt");
                fs::write(&ca_path, ca).context("writing client-ca.crt")?;
                settings.push(("ssl_ca_file", path_str(&ca_path)?.into()));
            }
        }

        // Created before the chown so the OS user may write it; truncated
        // again at each attempt below.
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        if let Some(user) = &os_user {
            run(Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(&root))?;
        }

        run(as_user(os_user.as_deref(), &bins.initdb, &root)
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]))
        .context("initdb failed")?;

        // The port is free when picked, not necessarily when the server
        // binds it: a server that finds it taken starts again on another.
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let log = File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let mut cmd = as_user(os_user.as_deref(), &bins.postgres, &root);
            cmd.arg("-D").arg(&data_dir);
            cmd.arg("-c").arg(format!("port={port}"));
            for (name, value) in &settings {
                cmd.arg("-c").arg(format!("{name}={value}"));
            }
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().context("duplicating the log file")?)
                .stderr(log);
            let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;

            // From here on, dropping `pg` stops the server; the directory
            // goes with it once it holds `_dir`.
            let mut pg = Postgres {
                port,
                os_user: os_user.clone(),
                child,
                data_dir: data_dir.clone(),
                log_path: log_path.clone(),
                bins: bins.clone(),
                _dir: None,
            };
            match pg.wait_ready() {
                Ok(()) => {
                    pg._dir = Some(dir);
                    return Ok(pg);
                }
                Err(err) => {
                    pg.stop();
                    let log = pg.log_contents();
                    if log.contains("could not bind") && attempt < PORT_ATTEMPTS {
                        attempt += 1;
                        continue;
                    }
                    let tail = pg.log_tail(LOG_TAIL_LINES);
                    return Err(err.context(format!(
                        "PostgreSQL on 127.0.0.1:{port} did not start; log tail:\n{tail}"
                    )));
                }
            }
        }
    }

    fn hba_conf(&self) -> Result<String> {
        let mut hba = String::from("# pg_hba.conf written by wicket-e2e\n");
        let client_ca = self
            .tls
            .as_ref()
            .and_then(|t| t.client_ca_pem.as_ref())
            .is_some();
        if !self.cert_users.is_empty() && !client_ca {
            bail!("cert_users needs tls(.., Some(client_ca_pem))");
        }
        for user in &self.cert_users {
            if user.contains(['"', '\n', '\r']) || user.is_empty() {
                bail!("unsupported database user name for cert auth: {user:?}");
            }
            hba.push_str(&format!("hostssl all \"{user}\" 127.0.0.1/32 cert\n"));
            // Without this, libpq's default `sslmode=prefer` would retry
            // without TLS after a failed certificate login and get trust.
            hba.push_str(&format!("hostnossl all \"{user}\" 127.0.0.1/32 reject\n"));
        }
        hba.push_str("local all all trust\n");
        hba.push_str("host all all 127.0.0.1/32 trust\n");
        hba.push_str("host all all ::1/128 trust\n");
        Ok(hba)
    }
}

#[derive(Clone)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
    psql: PathBuf,
    pg_isready: Option<PathBuf>,
}

impl Binaries {
    /// Finds `postgres`, then takes the other tools from the same directory
    /// (after resolving symlinks) so the versions match, falling back to a
    /// search of `PATH` and [`PG_BIN_DIRS`].
    fn find() -> Result<Self> {
        let postgres = find_binary(&["postgres"], PG_BIN_DIRS).ok_or_else(|| {
            anyhow!("PostgreSQL server binary `postgres` not found in PATH or {PG_BIN_DIRS:?}")
        })?;
        let postgres = fs::canonicalize(&postgres).unwrap_or(postgres);
        let bin_dir = postgres.parent().map(Path::to_path_buf).unwrap_or_default();
        let sibling = |name: &str| -> Option<PathBuf> {
            let p = bin_dir.join(name);
            if p.is_file() {
                Some(p)
            } else {
                find_binary(&[name], PG_BIN_DIRS)
            }
        };
        Ok(Self {
            initdb: sibling("initdb").context("`initdb` not found")?,
            psql: sibling("psql").context("`psql` not found")?,
            pg_isready: sibling("pg_isready"),
            postgres,
        })
    }
}

/// A running PostgreSQL server; dropping it stops the server (fast shutdown,
/// then SIGKILL after 15 s) and deletes its directory.
///
/// The superuser is `postgres`, with trust authentication on 127.0.0.1.
pub struct Postgres {
    port: u16,
    /// The OS user the server runs as, when the tests run as root.
    os_user: Option<String>,
    child: Child,
    data_dir: PathBuf,
    log_path: PathBuf,
    bins: Binaries,
    // Dropped after `Drop::drop` has stopped the server.
    _dir: Option<TempDir>,
}

impl Postgres {
    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    /// The (non-root) OS user the server runs as, when the tests run as root.
    pub fn os_user(&self) -> Option<&str> {
        self.os_user.as_deref()
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` through `psql -X -q -At -v ON_ERROR_STOP=1` as `postgres`
    /// over TCP (without TLS) and returns its output, without the trailing
    /// newline: one line per row, columns separated by `|`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = run(self.client_command(&self.bins.psql).args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]))
        .with_context(|| format!("psql on database {db:?}"))?;
        Ok(out.trim_end_matches(['\n', '\r']).to_owned())
    }

    /// `psql` as `postgres` on database `db` over TCP (without TLS), to
    /// be given its statements on stdin: a session the caller holds open.
    pub fn psql_session(&self, db: &str) -> Command {
        let mut cmd = self.client_command(&self.bins.psql);
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", db]);
        cmd
    }

    /// `CREATE DATABASE "name"`.
    pub fn create_database(&self, name: &str) -> Result<()> {
        let quoted = name.replace('"', "\"\"");
        self.psql("postgres", &format!("CREATE DATABASE \"{quoted}\""))?;
        Ok(())
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Everything the server has written to stdout/stderr so far.
    pub fn log_contents(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log_contents();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `psql`/`pg_isready` aimed at this server as `postgres`, without TLS
    /// so that trust authentication applies whatever `cert_users` says.
    fn client_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ])
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .stdin(Stdio::null());
        cmd
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = self.addr();
        let what = format!("PostgreSQL on {addr} to accept connections");
        wait_until(&what, STARTUP_TIMEOUT, || {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Some(Err(anyhow!("postgres exited during startup: {status}")))
                }
                Err(e) => return Some(Err(anyhow!(e).context("waiting on postgres"))),
                Ok(None) => {}
            }
            // Another server may answer on the port while ours fails to
            // bind it: only our own log's word counts.
            if !self.log_contents().contains("ready to accept connections") {
                return None;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_err() {
                return None;
            }
            let ready = match &self.bins.pg_isready {
                Some(pg_isready) => self
                    .client_command(pg_isready)
                    .args(["-d", "postgres", "-t", "2"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                None => self.psql("postgres", "select 1").is_ok(),
            };
            ready.then_some(Ok(()))
        })??;
        let one = self.psql("postgres", "select 1")?;
        if one != "1" {
            bail!("`select 1` returned {one:?}");
        }
        Ok(())
    }

    /// The postmaster's pid from `postmaster.pid`: when running as root the
    /// child is `runuser`, not the server itself.
    fn postmaster_pid(&self) -> Option<u32> {
        let pidfile = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        pidfile.lines().next()?.trim().parse().ok()
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.postmaster_pid().unwrap_or(self.child.id());
        // SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients
        // (SIGTERM's "smart" shutdown would wait for leaked pools).
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let child = &mut self.child;
        let stopped = wait_until("PostgreSQL to shut down", SHUTDOWN_TIMEOUT, || {
            child.try_wait().ok().flatten()
        });
        if stopped.is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program` run as `user` through `runuser` (when running as root), with the
/// working directory set to `cwd` (the caller's may not be readable by it).
fn as_user(user: Option<&str>, program: &Path, cwd: &Path) -> Command {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.current_dir(cwd);
    cmd
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

/// Whether the effective uid is 0, from `/proc/self/status` or else `id -u`.
fn running_as_root() -> Result<bool> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1));
        if let Some(euid) = euid {
            return Ok(euid == "0");
        }
    }
    Ok(run(Command::new("id").arg("-u"))?.trim() == "0")
}

fn os_user_exists(user: &str) -> bool {
    Command::new("id")
        .args(["-u", user])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// An unprivileged OS user to run PostgreSQL as: `postgres` if it exists,
/// else `wicket-test`, created as a system user if need be.
fn ensure_os_user() -> Result<String> {
    for user in ["postgres", FALLBACK_OS_USER] {
        if os_user_exists(user) {
            return Ok(user.to_owned());
        }
    }
    let created =
        run(Command::new("useradd").args(["--system", "--no-create-home", FALLBACK_OS_USER]));
    // Another test may have created it concurrently.
    if os_user_exists(FALLBACK_OS_USER) {
        return Ok(FALLBACK_OS_USER.to_owned());
    }
    created.context("creating an OS user to run PostgreSQL as")?;
    bail!("useradd succeeded but user {FALLBACK_OS_USER} does not exist")
}
