//! `wicketd` command line: start, check-config, users, nodes, databases.

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::{clock, server, service, store};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "wicketd",
    version,
    about = "Wicket daemon: certificate authority, access requests, and the access proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (no --config: SQLite, generated CAs, API on 127.0.0.1:3080, data in ./wicket-data).
    Start {
        #[command(flatten)]
        source: Source,
        /// Listen for the API here instead of the config's `listen.api` (port 0: any free port).
        #[arg(long)]
        listen_api: Option<std::net::SocketAddr>,
        /// Run the PostgreSQL proxy here instead of the config's `listen.postgres` (port 0: any free port).
        #[arg(long)]
        listen_postgres: Option<std::net::SocketAddr>,
        /// Run the SSH proxy here instead of the config's `listen.ssh` (port 0: any free port).
        #[arg(long)]
        listen_ssh: Option<std::net::SocketAddr>,
    },
    /// Check a configuration file and report every problem.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Manage users directly in the store (bootstrap).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Set up SSH nodes: host certificates and the sshd_config lines.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Set up databases to trust Wicket.
    #[command(subcommand)]
    Databases(DatabasesCommand),
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Issue a node's host certificate and print the sshd_config lines that
    /// make its stock sshd trust Wicket's node-login CA (never the user CA,
    /// which would let users' own certificates in past the proxy).
    Add {
        /// The node's name (as in `resources.nodes`).
        name: String,
        /// The node's host public key file (e.g. /etc/ssh/ssh_host_ed25519_key.pub).
        #[arg(long)]
        host_key: PathBuf,
        /// Also write `wicket_node_ca.pub` (the node-login CA) and `<host key>-cert.pub` into this directory.
        #[arg(long)]
        write_dir: Option<PathBuf>,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Debug, Subcommand)]
enum DatabasesCommand {
    /// Print the database-client CA certificate (PEM) for PostgreSQL's
    /// `ssl_ca_file`; the postgresql.conf and pg_hba.conf lines go to stderr.
    Ca {
        #[command(flatten)]
        source: Source,
    },
    /// Issue a TLS server certificate for a database from Wicket's TLS CA
    /// (which the proxy trusts for databases without `ca_file`, each only
    /// with its own certificate). Writes `server.crt` (leaf and CA) and
    /// `server.key` (0600) into --out.
    ServerCert {
        #[command(flatten)]
        source: Source,
        /// The database resource (from the config's `resources.databases`)
        /// the certificate is for: the proxy takes it for that one only.
        #[arg(long)]
        database: String,
        /// DNS name or IP address the database is reached at (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, Args)]
struct Source {
    /// Configuration file (YAML, `version: 1`).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Data directory (CA keys, SQLite database, recordings); overrides the config's `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Add a user.
    Add {
        /// User name.
        name: String,
        /// Standing roles, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Team (from the config's `teams`).
        #[arg(long)]
        team: Option<String>,
        /// Read the password from standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Enroll a TOTP second factor and print its provisioning URI.
        #[arg(long)]
        totp: bool,
        #[command(flatten)]
        source: Source,
    },
    /// Disable a user: no new logins or sessions, and their live sessions
    /// end (within a second, on every wicketd sharing the store).
    Disable {
        name: String,
        #[command(flatten)]
        source: Source,
    },
    /// Replace a user's standing roles. Their live sessions that the old
    /// roles allowed, and the new ones do not, end within a second.
    SetRoles {
        name: String,
        /// The new standing roles, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        #[command(flatten)]
        source: Source,
    },
    /// Let a user log in again after failed logins in their name reached
    /// `auth.max_failures_per_user` (a user with TOTP can log in past it
    /// with their password and a fresh code). Those failures still count
    /// against the addresses they came from.
    Unlock {
        name: String,
        #[command(flatten)]
        source: Source,
    },
    /// Re-enable a disabled user.
    Enable {
        name: String,
        #[command(flatten)]
        source: Source,
    },
    /// List users. A record that does not decode (edited by hand) is
    /// listed by name as UNREADABLE, with why (JSON: `unreadable`); every
    /// decision leaves it out.
    Ls {
        #[command(flatten)]
        source: Source,
        /// Output format: text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
}

/// The store, for an admin command: its audit events are chained with
/// the key of the CA key set in the data directory, which a wicketd made
/// (an admin command never makes one).
async fn open_store(cfg: &crate::config::Config) -> Result<store::Store> {
    let keys = crate::keystore::load(&cfg.data_dir)?;
    server::open_store(cfg, &keys).await
}

async fn set_disabled(name: &str, disabled: bool, source: &Source) -> Result<()> {
    let cfg = load_config(source)?;
    let store = open_store(&cfg).await?;
    let now = clock::now();
    let event = crate::audit::AuditEvent::UserDisabled {
        user: name.to_owned(),
        disabled,
    };
    store
        .set_user_disabled(name, disabled, &event.to_row(now.timestamp_millis()))
        .await?;
    println!(
        "user {name:?} {}",
        if disabled { "disabled" } else { "enabled" }
    );
    Ok(())
}

/// Entry point for the `wicketd` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Command::CheckConfig { file } = &cli.command {
        return check_config(file);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wicketd: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wicketd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What to say of a configuration that is valid but may not do what its
/// author meant: `listen.kube`, which the config format takes (PRODUCT.md
/// names a Kubernetes proxy) but nothing serves yet; users that several
/// teams list as a member.
fn notes(cfg: &Config) -> Vec<String> {
    let mut out: Vec<String> = cfg.listen.kube.iter().map(|addr| {
        format!("listen.kube ({addr}) is set, but this wicketd has no Kubernetes proxy: nothing listens there")
    }).collect();
    let api = cfg.listen.api;
    for (key, addr) in [
        ("listen.ssh", cfg.listen.ssh),
        ("listen.postgres", cfg.listen.postgres),
    ] {
        let Some(addr) = addr else { continue };
        // (An API on every address says nothing of which one clients use.)
        if !addr.ip().is_unspecified() && !api.ip().is_unspecified() && addr.ip() != api.ip() {
            out.push(format!(
                "{key} ({addr}) is on another address than listen.api ({api}): `wicket` learns \
                 only its port and dials the host it logged in to, so port {} must reach it there",
                addr.port()
            ));
        }
    }
    let mut teams_of: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for team in cfg.policy.directory.teams.values() {
        for member in &team.members {
            teams_of.entry(member).or_default().push(&team.name);
        }
    }
    for (user, teams) in teams_of.into_iter().filter(|(_, t)| t.len() > 1) {
        out.push(format!(
            "{user} is a member of teams {}: no team lead approves for them unless their user \
             record names one (wicketd users add --team)",
            teams.join(", ")
        ));
    }
    out
}

/// Where a client on this host reaches an API listening on `addr`: a
/// wildcard is no address to connect to, nor a name in the certificate.
fn login_address(addr: std::net::SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => format!("localhost:{}", addr.port()),
        _ => addr.to_string(),
    }
}

/// What `start` (without `--listen-api`) would refuse that loading the
/// file does not: the files it names, read as `start` reads them, and a
/// listener on the API's default address when `listen.api` is not set.
fn start_problems(cfg: &Config) -> Vec<config::Problem> {
    let mut out = crate::tls::ca_file_problems(cfg);
    if let Some(clash) = cfg.listen.collision() {
        out.push(config::Problem {
            path: "listen".into(),
            message: format!(
                "{clash} (listen.api is its default {} when not set)",
                config::DEFAULT_API_ADDR
            ),
        });
    }
    out
}

fn check_config(file: &Path) -> ExitCode {
    let loaded = config::load(file).and_then(|cfg| {
        let problems = start_problems(&cfg);
        match problems.is_empty() {
            true => Ok(cfg),
            false => Err(config::ConfigErrors { problems }),
        }
    });
    match loaded {
        Ok(cfg) => {
            println!(
                "{}: ok ({} roles, {} approval rules, {} resources)",
                file.display(),
                cfg.policy.roles.names().count(),
                cfg.policy.approval.len(),
                cfg.policy.resources.len()
            );
            for note in notes(&cfg) {
                println!("{}: note: {note}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for p in &errors.problems {
                println!("{}: {}: {}", file.display(), p.path, p.message);
            }
            println!("{}: {} problem(s)", file.display(), errors.problems.len());
            ExitCode::FAILURE
        }
    }
}

/// The database a server certificate is for: one the config names (when
/// there is a config; without one, any resource name, which `wicket_ca`
/// checks as it issues).
fn check_database_name(cfg: &Config, name: &str, configured: bool) -> Result<()> {
    let known: Vec<&str> = cfg
        .policy
        .resources
        .iter()
        .filter(|r| r.kind == wicket_policy::ResourceKind::Database)
        .map(|r| r.name.as_str())
        .collect();
    if configured && !known.contains(&name) {
        return Err(Error::BadRequest(format!(
            "--database {name:?} is not a database in the config (it has: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    if let Some(f) = cfg.database_tls.get(name).and_then(|t| t.ca_file.as_ref()) {
        eprintln!(
            "warning: database {name:?} sets ca_file ({}): wicketd trusts that CA for it, \
             which takes this certificate only if it is Wicket's TLS CA",
            f.display()
        );
    }
    Ok(())
}

fn load_config(source: &Source) -> Result<Config> {
    let cwd = std::env::current_dir()?;
    let mut cfg = match &source.config {
        Some(path) => config::load(path).map_err(|e| {
            Error::BadRequest(format!(
                "{} has problems (run `wicketd check-config`):\n{e}",
                path.display()
            ))
        })?,
        None => Config::embedded_default(&cwd),
    };
    if let Some(dir) = &source.data_dir {
        cfg.data_dir = if dir.is_absolute() {
            dir.clone()
        } else {
            cwd.join(dir)
        };
    }
    Ok(cfg)
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::CheckConfig { .. } => Ok(()),
        Command::Start {
            source,
            listen_api,
            listen_postgres,
            listen_ssh,
        } => start(&source, listen_api, listen_postgres, listen_ssh).await,
        Command::Users(UsersCommand::Add {
            name,
            roles,
            team,
            password_stdin,
            totp,
            source,
        }) => {
            let cfg = load_config(&source)?;
            let password = read_password(password_stdin)?;
            let store = open_store(&cfg).await?;
            let uri = service::add_user(
                &cfg,
                &store,
                &name,
                roles,
                team,
                Some(&password),
                totp,
                clock::now(),
            )
            .await?;
            println!("user {name:?} added");
            if let Some(uri) = uri {
                println!("TOTP provisioning URI (add it to an authenticator app):");
                println!("{uri}");
            }
            Ok(())
        }
        Command::Nodes(NodesCommand::Add {
            name,
            host_key,
            write_dir,
            source,
        }) => {
            let cfg = load_config(&source)?;
            nodes_add(&cfg, &name, &host_key, write_dir.as_deref())
        }
        Command::Databases(DatabasesCommand::Ca { source }) => {
            let cfg = load_config(&source)?;
            let keys = crate::keystore::load_or_make_first(
                &cfg.data_dir,
                &cfg.cluster_name,
                clock::now().timestamp(),
            )?;
            print!("{}", keys.db_client.cert_pem());
            eprintln!("{}", DATABASE_SETUP.trim_end());
            Ok(())
        }
        Command::Databases(DatabasesCommand::ServerCert {
            source,
            database,
            names,
            out,
            days,
        }) => {
            let cfg = load_config(&source)?;
            check_database_name(&cfg, &database, source.config.is_some())?;
            let now = clock::now().timestamp();
            let keys = crate::keystore::load_or_make_first(&cfg.data_dir, &cfg.cluster_name, now)?;
            let rng = ring::rand::SystemRandom::new();
            let (pkcs8, spki) = wicket_ca::x509::new_p256_key(&rng)?;
            let leaf = keys.tls.issue_server(
                &wicket_ca::ServerCertRequest {
                    spki_der: &spki,
                    names: &names,
                    validity: wicket_ca::Validity::new(now - 300, now + i64::from(days) * 86_400)?,
                    role: wicket_ca::ServerRole::Database(&database),
                },
                &rng,
            )?;
            std::fs::create_dir_all(&out)?;
            let chain = format!("{}{}", leaf.pem(), keys.tls.cert_pem());
            std::fs::write(out.join("server.crt"), chain)?;
            crate::keystore::write_file_atomic(
                &out.join("server.key"),
                wicket_ca::x509::pem_encode("PRIVATE KEY", &pkcs8).as_bytes(),
                0o600,
            )?;
            println!(
                "wrote {} and {} for database {database} at {}",
                out.join("server.crt").display(),
                out.join("server.key").display(),
                names.join(", ")
            );
            Ok(())
        }
        Command::Users(UsersCommand::Disable { name, source }) => {
            set_disabled(&name, true, &source).await
        }
        Command::Users(UsersCommand::Enable { name, source }) => {
            set_disabled(&name, false, &source).await
        }
        Command::Users(UsersCommand::Unlock { name, source }) => {
            let cfg = load_config(&source)?;
            let store = open_store(&cfg).await?;
            let now = clock::now().timestamp_millis();
            let cleared = store
                .unlock_user(&name, now, |cleared| {
                    crate::audit::AuditEvent::UserUnlocked {
                        user: name.clone(),
                        cleared,
                    }
                    .to_row(now)
                })
                .await?;
            println!("user {name:?} unlocked ({cleared} failed login(s) in their name no longer count against them)");
            Ok(())
        }
        Command::Users(UsersCommand::SetRoles {
            name,
            roles,
            source,
        }) => {
            let cfg = load_config(&source)?;
            let store = open_store(&cfg).await?;
            service::set_user_roles(&cfg, &store, &name, roles.clone(), clock::now()).await?;
            println!("user {name:?} now has roles {}", roles.join(","));
            Ok(())
        }
        Command::Users(UsersCommand::Ls { source, format }) => {
            let cfg = load_config(&source)?;
            let store = open_store(&cfg).await?;
            let users = store.list_user_rows().await?;
            print!("{}", users_listing(&users, &format)?);
            Ok(())
        }
    }
}

/// `wicketd users ls`: a line per user (or a JSON array), the rows that do
/// not decode included, by name, with why.
fn users_listing(
    users: &[std::result::Result<crate::store::UserRecord, crate::store::UnreadableUser>],
    format: &str,
) -> Result<String> {
    if format == "json" {
        let v: Vec<serde_json::Value> = users
            .iter()
            .map(|u| match u {
                Ok(u) => serde_json::json!({"name": u.name, "roles": u.roles, "team": u.team, "totp": u.totp_secret.is_some(), "disabled": u.disabled}),
                Err(bad) => serde_json::json!({"name": bad.name, "unreadable": bad.reason}),
            })
            .collect();
        let mut out =
            serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.to_string()))?;
        out.push('\n');
        return Ok(out);
    }
    Ok(users
        .iter()
        .map(|u| match u {
            Ok(u) => format!(
                "{:<20} roles={} team={} totp={}{}\n",
                u.name,
                u.roles.join(","),
                u.team.as_deref().unwrap_or("-"),
                u.totp_secret.is_some(),
                if u.disabled { " disabled" } else { "" }
            ),
            Err(bad) => format!(
                "{:<20} UNREADABLE (left out of every decision): {}\n",
                bad.name, bad.reason
            ),
        })
        .collect())
}

/// `wicketd nodes add`: issues the host certificate and prints the setup.
fn nodes_add(cfg: &Config, name: &str, host_key: &Path, write_dir: Option<&Path>) -> Result<()> {
    use wicket_policy::ResourceKind;
    let now = clock::now().timestamp();
    let keys = crate::keystore::load_or_make_first(&cfg.data_dir, &cfg.cluster_name, now)?;
    let text = std::fs::read_to_string(host_key)
        .map_err(|e| Error::BadRequest(format!("cannot read {}: {e}", host_key.display())))?;
    let setup = crate::ssh::node_setup(&keys, &cfg.cluster_name, name, &text, now)?;
    let key_name = host_key
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".pub"))
        .unwrap_or("ssh_host_ed25519_key")
        .to_owned();
    let etc = host_key.parent().unwrap_or(Path::new("/etc/ssh"));
    let cert_path = etc.join(format!("{key_name}-cert.pub"));
    let ca_path = etc.join("wicket_node_ca.pub");
    if let Some(dir) = write_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("wicket_node_ca.pub"),
            format!("{}\n", setup.node_ca),
        )?;
        std::fs::write(
            dir.join(format!("{key_name}-cert.pub")),
            format!("{}\n", setup.host_certificate),
        )?;
    }
    let known = cfg
        .policy
        .resource(ResourceKind::Node, name)
        .map(|r| format!("node {name:?} at {}", r.address))
        .unwrap_or_else(|| {
            format!("node {name:?} (not yet in resources.nodes; add it with its sshd address)")
        });
    let valid = chrono::DateTime::<chrono::Utc>::from_timestamp(setup.valid_before, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    println!("# {known}");
    println!(
        "# host certificate for {} valid until {valid}",
        setup.principals.join(", ")
    );
    println!(
        "# 1. save Wicket's node-login CA (it signs only the proxy's one-minute certificates) as {}:",
        ca_path.display()
    );
    println!("{}", setup.node_ca);
    println!("# 2. save the host certificate as {}:", cert_path.display());
    println!("{}", setup.host_certificate);
    println!("# 3. add to /etc/ssh/sshd_config and reload sshd:");
    println!("TrustedUserCAKeys {}", ca_path.display());
    println!("HostCertificate {}", cert_path.display());
    println!("# Logins need no authorized_keys: a Wicket certificate names the login as its");
    println!("# principal, and its key ID (user=... session=... requests=...) is in sshd's log.");
    Ok(())
}

/// What `wicketd databases ca` tells the operator to configure.
const DATABASE_SETUP: &str = "
# Save the certificate above as e.g. /etc/postgresql/wicket-db-client-ca.crt, then:
# postgresql.conf
ssl = on
ssl_cert_file = 'server.crt'        # e.g. from `wicketd databases server-cert`
ssl_key_file = 'server.key'
ssl_ca_file = '/etc/postgresql/wicket-db-client-ca.crt'
# pg_hba.conf: Wicket logs in with a one-minute certificate whose CN is the database user
hostssl all all WICKETD_IP/32 cert
";

fn read_password(from_stdin: bool) -> Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password (again): ")?;
        if p != again {
            return Err(Error::BadRequest("passwords do not match".into()));
        }
        p
    } else {
        return Err(Error::BadRequest(
            "no terminal to prompt for a password; use --password-stdin".into(),
        ));
    };
    if password.is_empty() {
        return Err(Error::BadRequest("empty password".into()));
    }
    Ok(password)
}

async fn start(
    source: &Source,
    listen_api: Option<std::net::SocketAddr>,
    listen_postgres: Option<std::net::SocketAddr>,
    listen_ssh: Option<std::net::SocketAddr>,
) -> Result<()> {
    let mut cfg = load_config(source)?;
    if let Some(addr) = listen_api {
        cfg.listen.api = addr;
    }
    if let Some(addr) = listen_postgres {
        cfg.listen.postgres = Some(addr);
    }
    if let Some(addr) = listen_ssh {
        cfg.listen.ssh = Some(addr);
    }
    if let Some(clash) = cfg.listen.collision() {
        return Err(Error::BadRequest(clash));
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    let data_dir = cfg.data_dir.clone();
    let cluster = cfg.cluster_name.clone();
    let storage = store::describe(&cfg.storage);
    let notes = notes(&cfg);
    let running = server::start(cfg).await?;
    let pin = running.tls_ca_pin.clone();
    let addr = running.api_addr;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "wicketd {}: cluster {cluster:?}, data in {}, storage {storage}",
        env!("CARGO_PKG_VERSION"),
        data_dir.display()
    );
    if running.ca_generated {
        let _ = writeln!(
            out,
            "generated a new CA key set in {}",
            data_dir.join("ca").display()
        );
    }
    let _ = writeln!(out, "CA pin: {pin}");
    if let Some(ssh) = running.ssh_addr {
        let _ = writeln!(out, "SSH listening on {ssh}");
    }
    if let Some(pg) = running.postgres_addr {
        let _ = writeln!(out, "Postgres proxy listening on {pg}");
    }
    for note in notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(out, "API listening on https://{addr}");
    let _ = writeln!(
        out,
        "log in with: wicket login --proxy {} --user NAME --ca-pin {pin}",
        login_address(addr)
    );
    // The same store and roles as this wicketd: its config, if it has one.
    let config = source
        .config
        .as_ref()
        .map(|c| format!(" --config {}", c.display()))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "(add a user first: wicketd users add NAME --roles ROLE{config} --data-dir {})",
        data_dir.display()
    );
    let _ = out.flush();
    drop(out);

    let stop = running.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop.send(true);
    });
    running.wait().await;
    tracing::info!("wicketd stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wicketd users ls` names a row that does not decode, with why, in
    /// both formats, among the others.
    #[test]
    fn the_user_listing_names_unreadable_rows() {
        use crate::store::{UnreadableUser, UserRecord};
        let rows = vec![
            Err(UnreadableUser {
                name: "ann".into(),
                reason: "roles: not a list".into(),
            }),
            Ok(UserRecord {
                name: "bob".into(),
                roles: vec!["dev".into(), "ops".into()],
                team: Some("payments".into()),
                password_hash: None,
                totp_secret: Some("S".into()),
                created_at: 1,
                disabled: true,
            }),
        ];
        let text = users_listing(&rows, "text").unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("ann "), "{text}");
        assert!(lines[0].contains("UNREADABLE") && lines[0].contains("roles: not a list"));
        assert!(
            lines[1].starts_with("bob ")
                && lines[1].ends_with("roles=dev,ops team=payments totp=true disabled"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&users_listing(&rows, "json").unwrap()).unwrap();
        assert_eq!(json[0]["name"], "ann");
        assert_eq!(json[0]["unreadable"], "roles: not a list");
        assert_eq!(json[1]["name"], "bob");
        assert_eq!(json[1]["disabled"], true);
        assert!(!text.contains("\"S\"") && json[1].get("totp_secret").is_none());
    }

    /// A user that two teams list gets a note (their team lead would be
    /// arbitrary, so there is none until their record names a team); so
    /// does `listen.kube`. The example has neither.
    #[test]
    fn notes_name_users_in_several_teams() {
        let cfg = crate::config::parse(
            "version: 1
listen: { api: '127.0.0.1:3080', kube: '127.0.0.1:3026', ssh: '127.0.0.2:3022', postgres: '0.0.0.0:5433' }
teams:
  payments: { lead: bob, members: [alice, carol] }
  search: { lead: sam, members: [alice] }
",
            std::path::Path::new("/"),
        )
        .unwrap();
        let notes = notes(&cfg);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[0].starts_with("listen.kube (127.0.0.1:3026) is set"),
            "{notes:?}"
        );
        assert!(
            notes[1].starts_with(
                "listen.ssh (127.0.0.2:3022) is on another address than listen.api (127.0.0.1:3080)"
            ),
            "{notes:?}"
        );
        assert!(
            notes[2].starts_with("alice is a member of teams payments, search: no team lead"),
            "{notes:?}"
        );
        let example = crate::config::parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/wicket.yaml"
            ))
            .unwrap(),
            std::path::Path::new("/"),
        )
        .unwrap();
        assert_eq!(super::notes(&example).len(), 1, "only listen.kube");
    }

    /// `check-config` reports a listener on the API's default address when
    /// `listen.api` is not set (loading takes it: `start --listen-api`
    /// moves the API).
    #[test]
    fn a_listener_on_the_default_api_address_is_a_problem_for_start() {
        let parse = |text: &str| crate::config::parse(text, Path::new("/")).unwrap();
        let found = start_problems(&parse("version: 1\nlisten: { ssh: '127.0.0.1:3080' }\n"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "listen");
        assert!(
            found[0]
                .message
                .contains("listen.ssh 127.0.0.1:3080 and listen.api 127.0.0.1:3080")
                && found[0]
                    .message
                    .contains("its default 127.0.0.1:3080 when not set"),
            "{found:?}"
        );
        assert!(
            start_problems(&parse("version: 1\nlisten: { ssh: '127.0.0.1:3022' }\n")).is_empty()
        );
    }

    /// The login command printed at start names an address a client on
    /// the host can reach and find in the certificate, not a wildcard.
    #[test]
    fn the_printed_login_address_is_never_a_wildcard() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(login_address(a("0.0.0.0:3080")), "127.0.0.1:3080");
        assert_eq!(login_address(a("[::]:3080")), "localhost:3080");
        assert_eq!(login_address(a("10.1.2.3:3080")), "10.1.2.3:3080");
        assert_eq!(login_address(a("[::1]:3080")), "[::1]:3080");
    }
}
