//! `wicket` command line.

use crate::client::{bundle_pin, ApiError, Client, ClientIdentity, Trust};
use crate::keys;
use crate::profile::{self, write_file, Profile, ProfileInfo};
use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;
use wicket_api::{Certificates, LoginRequest, Resources, Secret};

#[derive(Debug, Parser)]
#[command(
    name = "wicket",
    version,
    about = "Wicket: log in, request access, and reach SSH nodes, databases and Kubernetes through the proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output format for commands that print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log in: new local keys, certificates for your standing roles.
    Login {
        /// The wicketd API address, HOST:PORT (not needed with --request-id).
        #[arg(long, env = "WICKET_PROXY", required_unless_present = "request_ids")]
        proxy: Option<String>,
        /// Your Wicket user name (not needed with --request-id).
        #[arg(long, env = "WICKET_USER", required_unless_present = "request_ids")]
        user: Option<String>,
        /// The `sha256:...` pin wicketd printed at start.
        #[arg(long, conflicts_with = "insecure")]
        ca_pin: Option<String>,
        /// Trust the proxy without a pin (first contact on a trusted network
        /// only; once a login saved its CA, that CA is checked instead).
        #[arg(long)]
        insecure: bool,
        /// TOTP code, when your user has a second factor.
        #[arg(long)]
        otp: Option<String>,
        /// Read the password from standard input (else WICKET_PASSWORD, else a prompt).
        #[arg(long)]
        password_stdin: bool,
        /// Assume an approved access request (repeatable): new certificates,
        /// authenticated by the current ones, valid exactly for the grant.
        #[arg(long = "request-id")]
        request_ids: Vec<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Access requests: create, list, show, review, and end grants.
    #[command(subcommand)]
    Request(RequestCommand),
    /// Emergency access without approval (needs a fresh TOTP code); security is notified at once.
    BreakGlass {
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        otp: String,
        #[arg(long)]
        duration: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show the active login: user, roles, principals, certificate window, files.
    Status {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove the active login's keys and certificates.
    Logout {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// List the nodes, databases and clusters you can reach now.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Search the audit log (your own events, or everyone's with an audit role).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Databases: list them, or open psql through a tunnel.
    #[command(subcommand)]
    Db(DbCommand),
    /// Local proxies for other tools.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Replay a session: an SSH session's terminal (its recording) or a
    /// database session's statements, with the original timing.
    Play(crate::ssh::PlayArgs),
    /// Print (and save in the profile) an ssh_config block so that plain
    /// `ssh`, `scp` and `sftp` reach NODE.CLUSTER through the proxy.
    Config {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// SSH to a node through the proxy: wicket ssh [LOGIN@]NODE [COMMAND]...
    Ssh(crate::ssh::SshArgs),
    /// Recorded SSH sessions.
    #[command(subcommand)]
    Recordings(crate::ssh::RecordingsCommand),
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// The databases you can reach now, with their users and names.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Run psql connected through a tunnel (arguments after `--` go to psql).
    Connect {
        name: String,
        #[arg(long)]
        db_user: Option<String>,
        #[arg(long)]
        db_name: Option<String>,
        #[arg(last = true)]
        psql_args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ProxyCommand {
    /// A local plaintext PostgreSQL listener on 127.0.0.1 (or a private Unix
    /// socket) that wraps every connection with your certificate (any
    /// client works through it).
    Db {
        name: String,
        /// Required: run as a local tunnel.
        #[arg(long, required = true)]
        tunnel: bool,
        /// Local port (default: any free port, printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Listen on a Unix socket in a new directory only you can enter
        /// (printed; it is psql's `host`), not on 127.0.0.1.
        #[arg(long, conflicts_with = "port")]
        socket: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Connect stdin/stdout to a node through the SSH proxy (ssh's
    /// `ProxyCommand`, as `wicket config` writes it).
    Ssh {
        /// `%h:%p` as ssh passes it (HOST:PORT; HOST is NODE or
        /// NODE.CLUSTER). A `LOGIN@` before it is ignored: the login
        /// travels inside SSH, never through a shell.
        target: String,
        /// The SSH proxy's HOST:PORT (default: from wicketd).
        #[arg(long)]
        ssh_proxy: Option<String>,
        /// The profile directory whose certificate ssh presents (default:
        /// the current login); used to explain an expired certificate.
        #[arg(long)]
        profile: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum RequestCommand {
    /// Ask for roles.
    Create {
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long = "ticket")]
        ticket_url: Option<String>,
        /// How long, e.g. 90m, 2h (default: the configured default, capped by the roles).
        #[arg(long)]
        duration: Option<String>,
        /// Scheduled start (RFC 3339, e.g. 2026-11-22T09:00:00Z).
        #[arg(long)]
        start_at: Option<DateTime<Utc>>,
        #[arg(long, value_parser = ["low", "normal", "high"])]
        urgency: Option<String>,
        /// Specific resources (repeatable). Without any, the grant holds
        /// on every resource the roles reach when it is approved (and only
        /// on those: not on ones configured later).
        #[arg(long = "resource")]
        resources: Vec<String>,
        /// Wait for a decision, then log in with the grant.
        #[arg(long)]
        wait: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// List requests: yours, those you can review, or all you may see.
    Ls {
        #[arg(long, conflicts_with = "reviewable")]
        mine: bool,
        #[arg(long)]
        reviewable: bool,
        #[arg(long)]
        state: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show one request: requester, roles, reason, risk, reviews, who can still approve.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Approve, deny or acknowledge a request (approve with --roles/--duration/--start-at to reduce scope).
    Review {
        id: String,
        #[arg(long, group = "verdict")]
        approve: bool,
        #[arg(long, group = "verdict")]
        deny: bool,
        /// After-the-fact review of a break-glass grant.
        #[arg(long, group = "verdict")]
        acknowledge: bool,
        #[arg(long)]
        reason: String,
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        #[arg(long)]
        duration: Option<String>,
        #[arg(long)]
        start_at: Option<DateTime<Utc>>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Ask the requester for more justification.
    Ask {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Answer a reviewer's question (the request goes back to pending).
    Update {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Withdraw a pending request.
    Cancel {
        id: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// End your grant now and log back in without it (no ID: every grant you hold).
    Drop {
        id: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// End someone's grant now (roles with `revoke`).
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Extend your active grant (where `max_extensions` allows).
    Extend {
        id: String,
        #[arg(long)]
        duration: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Search audit events.
    Search {
        /// Only events by this user.
        #[arg(long)]
        user: Option<String>,
        /// Only events of this kind (e.g. login_failed).
        #[arg(long, visible_alias = "type")]
        kind: Option<String>,
        /// Only events at or after this time (RFC 3339, e.g. 2026-11-21T09:00:00Z).
        #[arg(long)]
        since: Option<DateTime<Utc>>,
        /// Only events of this access request.
        #[arg(long)]
        request: Option<String>,
        /// Only events of this session (proxied SSH/database connection).
        #[arg(long)]
        session: Option<String>,
        /// At most this many events (the oldest that match); read in pages.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Check the audit log's hash chain: every changed, removed or inserted
    /// event is found and placed (needs a role that reads everyone's events).
    Verify {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

/// Entry point for the `wicket` binary.
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wicket: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = match e.downcast_ref::<ApiError>() {
                Some(api) => api.to_string(),
                None => format!("{e:#}"),
            };
            // Server messages can carry what others wrote (a reason, a
            // name): made safe for the terminal.
            eprintln!(
                "wicket: error: {}",
                crate::term::printable_in(&msg.replace('\n', " "), crate::term::stderr_utf8())
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Login {
            proxy,
            user,
            ca_pin,
            insecure,
            otp,
            password_stdin,
            request_ids,
            format,
        } => {
            if let (Some(proxy), Some(user)) = (&proxy, &user) {
                let shown = request_ids.is_empty().then_some(format);
                // With --request-id too (as `tsh login --request-id`): a
                // password login first, unless the current profile is that
                // user's at that proxy and still valid.
                let current = authenticated_client()
                    .is_ok_and(|(_, info, _)| info.proxy == *proxy && info.user == *user);
                if shown.is_some() || !current {
                    let password = Password {
                        otp,
                        stdin: password_stdin,
                    };
                    login(proxy, user, ca_pin, insecure, password, shown).await?;
                }
                if request_ids.is_empty() {
                    return Ok(());
                }
            }
            login_with_requests(&request_ids, format).await
        }
        Command::Request(cmd) => crate::requests::run(cmd_to(cmd)).await,
        Command::BreakGlass {
            roles,
            reason,
            otp,
            duration,
            format,
        } => crate::requests::break_glass(roles, reason, otp, duration, format).await,
        Command::Status { format } => status(format),
        Command::Logout { format } => logout(format),
        Command::Ls { format } => ls(format).await,
        Command::Audit(AuditCommand::Search {
            user,
            kind,
            since,
            request,
            session,
            limit,
            format,
        }) => {
            let filter = [
                ("actor", user),
                ("kind", kind),
                ("request", request),
                ("session", session),
            ];
            audit_search(&filter, since, limit, format).await
        }
        Command::Audit(AuditCommand::Verify { format }) => audit_verify(format).await,
        Command::Db(DbCommand::Ls { format }) => crate::db::ls(format).await,
        Command::Db(DbCommand::Connect {
            name,
            db_user,
            db_name,
            psql_args,
        }) => crate::db::connect(&name, db_user, db_name, psql_args).await,
        Command::Proxy(ProxyCommand::Db {
            name,
            port,
            socket,
            format,
            ..
        }) => crate::db::proxy(&name, port, socket, format).await,
        Command::Proxy(ProxyCommand::Ssh {
            target,
            ssh_proxy,
            profile,
        }) => crate::ssh::proxy_ssh(&target, ssh_proxy, profile).await,
        Command::Play(args) => play(args).await,
        Command::Config { format } => crate::ssh::config(format).await,
        Command::Ssh(args) => crate::ssh::ssh(args).await,
        Command::Recordings(cmd) => crate::ssh::recordings(cmd).await,
    }
}

/// The password: from standard input, `WICKET_PASSWORD`, or a prompt on
/// the terminal.
fn read_password(from_stdin: bool) -> Result<Secret> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        return Ok(Secret::new(line.trim_end_matches(['\r', '\n'])));
    }
    if let Ok(p) = std::env::var("WICKET_PASSWORD") {
        return Ok(Secret::new(p));
    }
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to prompt for a password; use --password-stdin or WICKET_PASSWORD");
    }
    prompt_password()
}

/// Prompts on the terminal; Ctrl-C there ends the process as interrupted
/// (130), once the terminal is restored.
#[cfg(unix)]
fn prompt_password() -> Result<Secret> {
    match crate::prompt::password("Password: ")? {
        crate::prompt::Answer::Password(p) => Ok(p),
        crate::prompt::Answer::Interrupted => {
            eprintln!("wicket: interrupted");
            std::process::exit(130)
        }
    }
}

#[cfg(not(unix))]
fn prompt_password() -> Result<Secret> {
    Ok(Secret::new(rpassword::prompt_password("Password: ")?))
}

/// The active profile with a client that presents its certificate.
pub fn authenticated_client() -> Result<(Profile, ProfileInfo, Client)> {
    let home = profile::home()?;
    let p = Profile::current(&home)?;
    let _lock = p.lock_for_reading();
    let info = p.read_info()?;
    let now = crate::now();
    if info.valid_before <= now {
        bail!(
            "your certificates expired at {}; run `wicket login --proxy {} --user {}`",
            info.valid_before.to_rfc3339(),
            info.proxy,
            info.user
        );
    }
    let identity = ClientIdentity {
        cert_pem: std::fs::read_to_string(p.tls_cert()).context("reading your TLS certificate")?,
        key_pem: std::fs::read_to_string(p.tls_key()).context("reading your TLS key")?,
    };
    let ca = std::fs::read_to_string(p.ca_bundle()).context("reading the saved CA bundle")?;
    let client = Client::new(&info.proxy, Trust::Bundle(ca), Some(&identity))?;
    Ok((p, info, client))
}

/// What a profile trusts since its last login: the proxy's CA, its SSH
/// host CA and its cluster name. A login through that saved CA, and every
/// renewal, must come back with the same (as `ssh` keeps a known host's
/// key), so a wicketd that was once compromised, or anyone who once held
/// its server key, cannot leave a CA of theirs in the profile for later;
/// trusting another needs `wicket login --ca-pin`.
#[derive(Debug, PartialEq)]
pub struct Saved {
    ca_pin: String,
    /// The `@cert-authority` key, when the profile has one.
    ssh_host_ca: Option<String>,
    cluster_name: Option<String>,
}

impl Saved {
    pub fn of(p: &Profile) -> Result<Self> {
        let pem = std::fs::read_to_string(p.ca_bundle()).context("reading the saved CA bundle")?;
        let ssh_host_ca = std::fs::read_to_string(p.known_hosts()).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("@cert-authority * "))
                .map(ssh_key_body)
        });
        Ok(Self {
            ca_pin: bundle_pin(&pem)?,
            ssh_host_ca,
            cluster_name: p.read_info().ok().map(|i| i.cluster_name),
        })
    }

    /// Whether `certs` name what was saved; the error says what changed.
    fn check(&self, certs: &Certificates) -> Result<()> {
        let again = "if that is expected (wicketd's CA set was replaced), log in again with --ca-pin (wicketd prints it at start)";
        if !bundle_pin(&certs.tls_ca_pem)?.eq_ignore_ascii_case(&self.ca_pin) {
            bail!(
                "the proxy sent a TLS CA other than the one saved at your last login ({}); {again}",
                self.ca_pin
            );
        }
        if self
            .ssh_host_ca
            .as_ref()
            .is_some_and(|saved| *saved != ssh_key_body(&certs.ssh_host_ca))
        {
            bail!("the proxy sent an SSH host CA other than the one saved at your last login; {again}");
        }
        if let Some(saved) = self
            .cluster_name
            .as_ref()
            .filter(|c| **c != certs.cluster_name)
        {
            bail!(
                "the proxy now names its cluster {:?}, not {saved:?} as at your last login; {again}",
                crate::term::printable(&certs.cluster_name)
            );
        }
        Ok(())
    }
}

/// An OpenSSH public key line without its comment: type and key.
fn ssh_key_body(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes a login's keys and certificates into the profile of `user` and
/// makes it current. With `saved` (a login through the profile's saved CA,
/// or a renewal), the certificates must name what it saved.
pub fn save_login(
    proxy: &str,
    user: &str,
    new_keys: &keys::NewKeys,
    certs: &Certificates,
    saved: Option<&Saved>,
) -> Result<Profile> {
    keys::check_issued_ssh(
        &new_keys.ssh_public_openssh,
        &certs.ssh_certificate,
        &certs.ssh_host_ca,
    )?;
    if certs.user != user {
        bail!(
            "the proxy sent certificates for {:?}, not for {user:?}",
            crate::term::printable(&certs.user)
        );
    }
    if let Some(saved) = saved {
        saved.check(certs)?;
    }
    let home = profile::home()?;
    let p = Profile::path(&home, proxy, &certs.user);
    let _lock = p.lock_for_writing()?;
    write_file(&p.ssh_key(), new_keys.ssh_private_openssh.as_bytes(), 0o600)?;
    write_file(
        &p.ssh_pub(),
        format!("{}\n", new_keys.ssh_public_openssh).as_bytes(),
        0o644,
    )?;
    write_file(
        &p.ssh_cert(),
        format!("{}\n", certs.ssh_certificate).as_bytes(),
        0o644,
    )?;
    write_file(&p.tls_key(), new_keys.tls_key_pem.as_bytes(), 0o600)?;
    write_file(&p.tls_cert(), certs.tls_certificate_pem.as_bytes(), 0o644)?;
    write_file(&p.ca_bundle(), certs.tls_ca_pem.as_bytes(), 0o644)?;
    write_file(
        &p.known_hosts(),
        format!("@cert-authority * {}\n", certs.ssh_host_ca).as_bytes(),
        0o644,
    )?;
    p.write_info(&ProfileInfo {
        proxy: proxy.to_owned(),
        user: certs.user.clone(),
        cluster_name: certs.cluster_name.clone(),
        ca_pin: bundle_pin(&certs.tls_ca_pem)?,
        roles: certs.roles.clone(),
        principals: certs.principals.clone(),
        request_ids: certs.request_ids.clone(),
        valid_after: certs.valid_after,
        valid_before: certs.valid_before,
    })?;
    p.make_current(&home, proxy, &certs.user)?;
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
/// How `wicket login` gets the user's password and one-time code.
struct Password {
    otp: Option<String>,
    stdin: bool,
}

/// A password login; its result printed in `format` (not at all with
/// `None`).
async fn login(
    proxy: &str,
    user: &str,
    ca_pin: Option<String>,
    insecure: bool,
    password: Password,
    format: Option<Format>,
) -> Result<()> {
    let Password {
        otp,
        stdin: password_stdin,
    } = password;
    let home = profile::home()?;
    let existing = Profile::path(&home, proxy, user);
    let mut saved = None;
    let trust = match (&ca_pin, insecure) {
        (Some(pin), _) => {
            if !pin.starts_with("sha256:") || pin.len() != 7 + 64 {
                bail!("--ca-pin must look like sha256:<64 hex digits>");
            }
            Trust::Pin(pin.clone())
        }
        // Trust on first contact only: once a login saved the proxy's CA,
        // it is checked against that (as `ssh` checks a known host), and a
        // changed CA needs `--ca-pin`.
        (None, insecure) => match std::fs::read_to_string(existing.ca_bundle()) {
            Ok(pem) => {
                if insecure {
                    eprintln!(
                        "wicket: note: --insecure is for a first contact: checking {proxy} against the CA saved at your last login (to trust another, pass --ca-pin)"
                    );
                }
                saved = Some(Saved::of(&existing)?);
                Trust::Bundle(pem)
            }
            Err(_) if insecure => {
                eprintln!("wicket: warning: --insecure: not verifying the proxy's identity");
                Trust::Insecure
            }
            Err(_) => bail!(
                "first login to {proxy} needs --ca-pin sha256:... (wicketd prints it at start) or --insecure"
            ),
        },
    };
    let password = read_password(password_stdin)?;
    let new_keys = keys::generate(&format!("{user}@wicket"))?;
    let client = Client::new(proxy, trust, None)?;
    let certs: Certificates = client
        .post(
            "/v1/login",
            &LoginRequest {
                user: user.to_owned(),
                password,
                otp: otp.map(Secret::new),
                ssh_public_key: new_keys.ssh_public_openssh.clone(),
                tls_csr_pem: new_keys.tls_csr_pem.clone(),
            },
        )
        .await?;
    if let Some(pin) = &ca_pin {
        let got = bundle_pin(&certs.tls_ca_pem)?;
        if !got.eq_ignore_ascii_case(pin) {
            bail!("the CA bundle the proxy sent does not match --ca-pin");
        }
    }
    let p = save_login(proxy, user, &new_keys, &certs, saved.as_ref())?;
    match format {
        Some(format) => print_login(&p, &certs, format),
        None => Ok(()),
    }
}

fn print_login(p: &Profile, certs: &Certificates, format: Format) -> Result<()> {
    match format {
        Format::Json => crate::out::json(&status_json(p)?)?,
        Format::Text => {
            outln!(
                "logged in as {} (cluster {})",
                certs.user,
                certs.cluster_name
            );
            outln!("  roles:       {}", certs.roles.join(", "));
            outln!("  principals:  {}", certs.principals.join(", "));
            if !certs.request_ids.is_empty() {
                outln!("  requests:    {}", certs.request_ids.join(", "));
            }
            outln!("  valid until: {}", certs.valid_before.to_rfc3339());
        }
    }
    Ok(())
}

/// What `wicket status` shows, read from the certificate files themselves.
fn status_json(p: &Profile) -> Result<serde_json::Value> {
    let info = p.read_info()?;
    let cert_text =
        std::fs::read_to_string(p.ssh_cert()).context("reading your SSH certificate")?;
    let cert = ssh_key::Certificate::from_openssh(cert_text.trim())
        .map_err(|e| anyhow!("your SSH certificate is unreadable: {e}"))?;
    let id = wicket_ca::ssh::identity_from_extensions(cert.extensions())
        .map_err(|e| anyhow!("your SSH certificate is unreadable: {e}"))?
        .unwrap_or_default();
    let ts = |t: u64| {
        DateTime::<Utc>::from_timestamp(t as i64, 0)
            .map(|d| d.to_rfc3339())
            .unwrap_or_default()
    };
    let now = crate::now().timestamp() as u64;
    let login_ends = id.login_ends(i64::try_from(cert.valid_before()).unwrap_or(i64::MAX));
    Ok(serde_json::json!({
        "proxy": info.proxy,
        "cluster": info.cluster_name,
        "user": if id.user.is_empty() { info.user } else { id.user },
        "roles": id.roles,
        "principals": cert.valid_principals(),
        "request_ids": id.request_ids,
        "key_id": cert.key_id(),
        "valid_after": ts(cert.valid_after()),
        "valid_before": ts(cert.valid_before()),
        "expired": now >= cert.valid_before(),
        // New certificates and requests need a new `wicket login` after it.
        "login_until": ts(u64::try_from(login_ends).unwrap_or(cert.valid_before())),
        "files": {
            "ssh_key": p.ssh_key(),
            "ssh_certificate": p.ssh_cert(),
            "tls_key": p.tls_key(),
            "tls_certificate": p.tls_cert(),
            "ca_bundle": p.ca_bundle(),
            "known_hosts": p.known_hosts(),
        },
    }))
}

fn status(format: Format) -> Result<()> {
    let home = profile::home()?;
    let p = Profile::current(&home)?;
    let s = status_json(&p)?;
    match format {
        Format::Json => crate::out::json(&s)?,
        Format::Text => {
            let list = |k: &str| {
                s[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            let get = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            outln!(
                "> Profile:     {} at {} (cluster {})",
                get("user"),
                get("proxy"),
                get("cluster")
            );
            outln!("  User:        {}", get("user"));
            outln!("  Roles:       {}", list("roles"));
            outln!("  Principals:  {}", list("principals"));
            let reqs = list("request_ids");
            outln!(
                "  Requests:    {}",
                if reqs.is_empty() { "none".into() } else { reqs }
            );
            outln!(
                "  Valid:       {} to {}{}",
                get("valid_after"),
                get("valid_before"),
                if s["expired"].as_bool() == Some(true) {
                    " [EXPIRED]"
                } else {
                    ""
                }
            );
            outln!(
                "  Login:       until {} (then `wicket login` again)",
                get("login_until")
            );
            for (label, key) in [
                ("SSH key", "ssh_key"),
                ("SSH cert", "ssh_certificate"),
                ("TLS key", "tls_key"),
                ("TLS cert", "tls_certificate"),
                ("CA bundle", "ca_bundle"),
            ] {
                outln!(
                    "  {:<12} {}",
                    format!("{label}:"),
                    s["files"][key].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn logout(format: Format) -> Result<()> {
    let home = profile::home()?;
    let p = Profile::current(&home)?;
    let info = p.read_info()?;
    p.remove()?;
    let _ = std::fs::remove_file(home.join("current"));
    match format {
        Format::Json => crate::out::json_line(
            &serde_json::json!({"logged_out": info.user, "proxy": info.proxy}),
        ),
        Format::Text => outln!("logged out {} from {}", info.user, info.proxy),
    }
    Ok(())
}

async fn ls(format: Format) -> Result<()> {
    let (_, _, client) = authenticated_client()?;
    let r: Resources = client.get("/v1/resources").await?;
    match format {
        Format::Json => crate::out::json(&r)?,
        Format::Text => {
            let labels = |l: &std::collections::BTreeMap<String, String>| {
                l.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            outln!("{:<8} {:<20} {:<24} ACCESS", "KIND", "NAME", "LABELS");
            for n in &r.nodes {
                outln!(
                    "{:<8} {:<20} {:<24} logins: {}",
                    "node",
                    n.name,
                    labels(&n.labels),
                    n.logins.join(", ")
                );
            }
            for d in &r.databases {
                outln!(
                    "{:<8} {:<20} {:<24} users: {}; databases: {}",
                    "db",
                    d.name,
                    labels(&d.labels),
                    d.users.join(", "),
                    d.names.join(", ")
                );
            }
            for k in &r.kube_clusters {
                outln!(
                    "{:<8} {:<20} {:<24} groups: {}",
                    "kube",
                    k.name,
                    labels(&k.labels),
                    k.groups.join(", ")
                );
            }
            if r.nodes.is_empty() && r.databases.is_empty() && r.kube_clusters.is_empty() {
                outln!("(nothing reachable with your current roles; request access with `wicket request create`)");
            }
        }
    }
    Ok(())
}

/// Percent-encodes a query-string value.
pub(crate) fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn search(
    client: &Client,
    query: &[(&str, Option<String>)],
    limit: u32,
) -> Result<Vec<wicket_api::AuditEventView>> {
    let mut q = vec![format!("limit={limit}")];
    for (k, v) in query {
        if let Some(v) = v {
            q.push(format!("{k}={}", query_escape(v)));
        }
    }
    client.get(&format!("/v1/audit?{}", q.join("&"))).await
}

/// The most events wicketd returns for one search.
const MAX_SEARCH: u32 = 10_000;

/// Every event of `session`, oldest first, a page at a time to `take`.
async fn session_events(
    client: &Client,
    session: &str,
    take: impl FnMut(Vec<wicket_api::AuditEventView>) -> Result<()>,
) -> Result<()> {
    let filter = [("session", Some(session.to_owned()))];
    search_pages(client, &filter, None, usize::MAX, take).await?;
    Ok(())
}

/// The events a search matches, oldest first from `since`, up to `limit`,
/// read in pages as large as wicketd gives, each page to `take`. Returns
/// whether more may match.
async fn search_pages(
    client: &Client,
    filter: &[(&str, Option<String>)],
    since: Option<DateTime<Utc>>,
    limit: usize,
    take: impl FnMut(Vec<wicket_api::AuditEventView>) -> Result<()>,
) -> Result<bool> {
    let fetch = |since: Option<DateTime<Utc>>, n: usize| {
        let mut query = filter.to_vec();
        query.push((
            "since",
            since.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        ));
        async move { search(client, &query, u32::try_from(n).unwrap_or(MAX_SEARCH)).await }
    };
    read_pages(fetch, since, limit, MAX_SEARCH as usize, take).await
}

/// Reads up to `limit` events, oldest first, in pages of at most `page`
/// from `fetch(since, n)` (the first `n` events at or after `since`, oldest
/// first, as wicketd's search gives them), and gives each page to `take`
/// as it comes: what is held is a page, however many match. Each page
/// starts at the time of the last event read, and the events already read
/// at that time are passed over. Returns whether more may match.
async fn read_pages<F, Fut>(
    mut fetch: F,
    mut since: Option<DateTime<Utc>>,
    limit: usize,
    page: usize,
    mut take: impl FnMut(Vec<wicket_api::AuditEventView>) -> Result<()>,
) -> Result<bool>
where
    F: FnMut(Option<DateTime<Utc>>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<wicket_api::AuditEventView>>>,
{
    if limit == 0 {
        return Ok(true);
    }
    // Events given so far, and the IDs of those at the last one's time.
    let mut given = 0usize;
    let mut seen: std::collections::HashSet<String> = Default::default();
    let mut seen_at: Option<DateTime<Utc>> = None;
    loop {
        // The events already read at `since` come again: room for them too,
        // and for one past the limit, to tell whether more match.
        let want = (limit - given)
            .saturating_add(seen.len())
            .saturating_add(1)
            .min(page);
        let got = fetch(since, want).await?;
        let full = got.len() >= want;
        let last = got.last().map(|e| e.time);
        let mut fresh: Vec<_> = got.into_iter().filter(|e| !seen.contains(&e.id)).collect();
        let over = given + fresh.len() > limit;
        fresh.truncate(limit - given);
        // A whole page at one millisecond: no way past it by time.
        let stuck = fresh.is_empty() || last == since;
        given += fresh.len();
        for e in &fresh {
            if seen_at != Some(e.time) {
                seen.clear();
                seen_at = Some(e.time);
            }
            seen.insert(e.id.clone());
        }
        take(fresh)?;
        if over {
            return Ok(true);
        }
        if !full {
            return Ok(false);
        }
        if stuck {
            eprintln!(
                "wicket: warning: more than {page} matching events share one millisecond \
                 ({}); the list stops there",
                last.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .unwrap_or_default()
            );
            return Ok(true);
        }
        since = last;
    }
}

async fn play(args: crate::ssh::PlayArgs) -> Result<()> {
    use crate::ssh::PlayFormat;
    let speed = args.speed;
    if !(speed.is_finite() && speed > 0.0) {
        bail!("--speed must be a positive number");
    }
    let (_, _, client) = authenticated_client()?;
    // An SSH session has a recording; a database session has its statements.
    if crate::ssh::play_recording(&client, &args).await? {
        return Ok(());
    }
    let session = args.session.as_str();
    let (format, no_wait) = match args.format {
        PlayFormat::Terminal => (Format::Text, args.no_wait),
        PlayFormat::Text => (Format::Text, true),
        PlayFormat::Json => (Format::Json, true),
        PlayFormat::Cast => (Format::Text, true),
    };
    // Asked first: the events of a long session come after it.
    let deleted = search(
        &client,
        &[
            ("session", Some(session.to_owned())),
            ("kind", Some("recording_deleted".to_owned())),
        ],
        1,
    )
    .await?;
    if let Some(deleted) = deleted.first() {
        bail!(
            "the recording of session {session} was deleted at {}: recordings are kept {} after \
             their session ended (session.recording_retention); its audit events remain \
             (wicket audit search --session {session})",
            deleted
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            deleted.data["kept_for"].as_str().unwrap_or("?")
        );
    }
    // Printed a page at a time, as read: a session of millions of
    // statements is never held whole.
    let mut printer = crate::db::DbPrinter::new(format, speed, !no_wait);
    session_events(&client, session, |page| {
        let first = printer.is_empty() && !page.is_empty();
        if first
            && (matches!(args.format, PlayFormat::Cast)
                || page.iter().any(|e| e.data["protocol"] == "ssh"))
        {
            bail!(
                "session {session} has no recording here; its audit events: \
                 wicket audit search --session {session}"
            );
        }
        page.iter().try_for_each(|e| printer.take(e))
    })
    .await?;
    if printer.is_empty() {
        bail!("no session {session:?} (or none of its events are yours to read)");
    }
    printer.finish()
}

async fn audit_verify(format: Format) -> Result<()> {
    let (_, _, client) = authenticated_client()?;
    let v: wicket_api::AuditVerifyView = client.get("/v1/audit/verify").await?;
    match format {
        Format::Json => crate::out::json(&v)?,
        Format::Text if v.intact => outln!(
            "audit log intact: {} events, head #{} {}",
            v.events,
            v.head_seq,
            v.head_hash
        ),
        Format::Text => {
            // One line each, whatever the store put in them: no line of
            // one passes for a verdict of its own.
            for p in &v.problems {
                outln!("{}", p.replace('\n', "\\n"));
            }
            if v.problem_count > v.problems.len() as u64 {
                outln!("... {} places in all", v.problem_count);
            }
        }
    }
    if !v.intact {
        bail!(
            "the audit log was tampered with: {} places do not follow its hash chain",
            v.problem_count
        );
    }
    Ok(())
}

async fn audit_search(
    filter: &[(&str, Option<String>)],
    since: Option<DateTime<Utc>>,
    limit: u32,
    format: Format,
) -> Result<()> {
    let (_, _, client) = authenticated_client()?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut events = Vec::new();
    let more = search_pages(&client, filter, since, limit, |page| {
        events.extend(page);
        Ok(())
    })
    .await?;
    if more {
        // Oldest first: what is left out is the newest.
        let next = events
            .last()
            .map(|e| e.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        eprintln!(
            "wicket: {} events shown, the oldest that match; there may be more \
             (a higher --limit, or --since {next} for the next ones)",
            events.len()
        );
    }
    match format {
        Format::Json => crate::out::json(&events)?,
        Format::Text => {
            for e in &events {
                let line = format!(
                    "{}  {:<20} {:<12} {}",
                    e.time.to_rfc3339(),
                    e.kind,
                    e.actor.as_deref().unwrap_or("-"),
                    e.data
                );
                outln!("{}", crate::term::printable(&line));
            }
        }
    }
    Ok(())
}

/// Re-issues certificates for the current profile with these grants plus the
/// ones it already holds that are still active. No password: the current
/// client certificate authenticates.
pub async fn login_with_requests(request_ids: &[String], format: Format) -> Result<()> {
    let (_, info, client) = authenticated_client()?;
    let mut ids = active_held(&client, &info.request_ids).await?;
    for id in request_ids {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    reissue(&info.proxy, &info.user, &client, ids, format).await
}

/// Which of the grants `held` (those in the current certificates) are
/// still active: the ones a re-issue can carry on. One that ended (or that
/// the server no longer shows) is left out; any other error (wicketd
/// unreachable, say) is returned, so that a live grant is never dropped
/// from the certificates by accident.
pub async fn active_held(client: &Client, held: &[String]) -> Result<Vec<String>> {
    let mut ids: Vec<String> = Vec::new();
    for id in held {
        let g: wicket_api::Grant = match client
            .get(&format!("/v1/requests/{}", query_escape(id)))
            .await
        {
            Ok(g) => g,
            Err(e) => match e.downcast_ref::<ApiError>() {
                Some(api) if api.status == hyper::StatusCode::NOT_FOUND => continue,
                _ => return Err(e.context(format!("checking access request {id}"))),
            },
        };
        if g.status == "active" && !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    Ok(ids)
}

/// New keys and certificates carrying exactly `ids`.
pub async fn reissue(
    proxy: &str,
    user: &str,
    client: &Client,
    ids: Vec<String>,
    format: Format,
) -> Result<()> {
    let home = profile::home()?;
    let saved = Saved::of(&Profile::path(&home, proxy, user))?;
    let new_keys = keys::generate(&format!("{user}@wicket"))?;
    let certs: Certificates = client
        .post(
            "/v1/certs",
            &wicket_api::ReissueRequest {
                ssh_public_key: new_keys.ssh_public_openssh.clone(),
                tls_csr_pem: new_keys.tls_csr_pem.clone(),
                request_ids: ids,
            },
        )
        .await?;
    let p = save_login(proxy, user, &new_keys, &certs, Some(&saved))?;
    print_login(&p, &certs, format)
}

fn cmd_to(cmd: RequestCommand) -> crate::requests::Cmd {
    use crate::requests::Cmd;
    match cmd {
        RequestCommand::Create {
            roles,
            reason,
            ticket_url,
            duration,
            start_at,
            urgency,
            resources,
            wait,
            format,
        } => Cmd::Create {
            body: wicket_api::CreateRequest {
                roles,
                reason,
                ticket_url,
                duration,
                start_at,
                urgency,
                resources,
                ..Default::default()
            },
            wait,
            format,
        },
        RequestCommand::Ls {
            mine,
            reviewable,
            state,
            format,
        } => Cmd::Ls {
            mine,
            reviewable,
            state,
            format,
        },
        RequestCommand::Show { id, format } => Cmd::Show { id, format },
        RequestCommand::Review {
            id,
            approve,
            deny,
            acknowledge,
            reason,
            roles,
            duration,
            start_at,
            format,
        } => {
            let verdict = if approve {
                "approve"
            } else if deny {
                "deny"
            } else if acknowledge {
                "acknowledge"
            } else {
                ""
            };
            Cmd::Review {
                id,
                body: wicket_api::ReviewBody {
                    verdict: verdict.into(),
                    reason,
                    roles,
                    duration,
                    start_at,
                },
                format,
            }
        }
        RequestCommand::Ask { id, reason, format } => Cmd::Review {
            id,
            body: wicket_api::ReviewBody {
                verdict: "ask-info".into(),
                reason,
                ..Default::default()
            },
            format,
        },
        RequestCommand::Update { id, reason, format } => Cmd::Action {
            id,
            format,
            action: "update",
            body: wicket_api::ActionBody {
                reason,
                duration: None,
            },
        },
        RequestCommand::Cancel { id, format } => Cmd::Action {
            id,
            format,
            action: "cancel",
            body: Default::default(),
        },
        RequestCommand::Drop { id, format } => Cmd::Drop { id, format },
        RequestCommand::Revoke { id, reason, format } => Cmd::Action {
            id,
            format,
            action: "revoke",
            body: wicket_api::ActionBody {
                reason,
                duration: None,
            },
        },
        RequestCommand::Extend {
            id,
            duration,
            format,
        } => Cmd::Action {
            id,
            format,
            action: "extend",
            body: wicket_api::ActionBody {
                reason: String::new(),
                duration: Some(duration),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use wicket_api::AuditEventView;

    /// A login through the saved CA, or a renewal, that comes back with
    /// another TLS CA (or one more), another SSH host CA or another
    /// cluster name is refused before anything is written.
    #[test]
    fn certificates_must_name_the_cas_saved_at_the_last_login() {
        let rng = ring::rand::SystemRandom::new();
        let keys = |c: &str| {
            wicket_ca::AuthorityKeys::generate(c, 1_700_000_000, &rng)
                .unwrap()
                .0
        };
        let (ours, theirs) = (keys("wicket"), keys("wicket"));
        let certs = |k: &wicket_ca::AuthorityKeys, host_ca: &str, cluster: &str| Certificates {
            cluster_name: cluster.into(),
            user: "alice".into(),
            roles: vec![],
            principals: vec![],
            request_ids: vec![],
            valid_after: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap(),
            valid_before: DateTime::<Utc>::from_timestamp(1_700_003_600, 0).unwrap(),
            ssh_certificate: String::new(),
            tls_certificate_pem: String::new(),
            tls_ca_pem: k.tls.cert_pem(),
            ssh_user_ca: String::new(),
            ssh_host_ca: host_ca.into(),
        };
        let host_ca =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGsZ1n2Rr6xj0X5M0Qw7kN4m0iT0N1Yb0m3+Qe1ZCk7p";
        let saved = Saved {
            ca_pin: bundle_pin(&ours.tls.cert_pem()).unwrap(),
            ssh_host_ca: Some(ssh_key_body(host_ca)),
            cluster_name: Some("wicket".into()),
        };
        // The same, with another comment on the host CA key: fine.
        saved
            .check(&certs(
                &ours,
                &format!("{host_ca} wicket-proxy-host-ca"),
                "wicket",
            ))
            .unwrap();
        let refused = |c: Certificates| saved.check(&c).unwrap_err().to_string();
        let e = refused(certs(&theirs, host_ca, "wicket"));
        assert!(
            e.contains("TLS CA other than") && e.contains("--ca-pin"),
            "{e}"
        );
        let mut both = certs(&ours, host_ca, "wicket");
        both.tls_ca_pem.push_str(&theirs.tls.cert_pem());
        let e = refused(both);
        assert!(e.contains("holds 2"), "{e}");
        let e = refused(certs(
            &ours,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKey",
            "wicket",
        ));
        assert!(e.contains("SSH host CA other than"), "{e}");
        let e = refused(certs(&ours, host_ca, "com"));
        assert!(e.contains("\"com\"") && e.contains("\"wicket\""), "{e}");
        // A profile from before a part was saved checks the rest.
        let older = Saved {
            ssh_host_ca: None,
            cluster_name: None,
            ..saved
        };
        older
            .check(&certs(
                &ours,
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKey",
                "com",
            ))
            .unwrap();
        assert!(older.check(&certs(&theirs, host_ca, "wicket")).is_err());
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_790_000_000_000 + ms).unwrap()
    }

    /// Events at these millisecond offsets, in order, as a store holds them.
    fn events(times: &[i64]) -> Vec<AuditEventView> {
        times
            .iter()
            .enumerate()
            .map(|(i, &ms)| AuditEventView {
                id: format!("e{i}"),
                time: at(ms),
                kind: "db_query".into(),
                actor: None,
                request_id: None,
                session_id: None,
                data: serde_json::Value::Null,
            })
            .collect()
    }

    /// Pages through `store` as wicketd's search would answer; also counts
    /// the calls. Each page is taken before the next is asked for.
    fn read(
        store: &[AuditEventView],
        since: Option<DateTime<Utc>>,
        limit: usize,
        page: usize,
    ) -> (Vec<String>, bool, usize) {
        let (calls, taken) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let fetch = |since: Option<DateTime<Utc>>, n: usize| {
            assert_eq!(
                taken.get(),
                calls.get(),
                "a page asked for before the last was taken"
            );
            calls.set(calls.get() + 1);
            assert!(n <= page, "asked for {n}, more than a page");
            let got: Vec<AuditEventView> = store
                .iter()
                .filter(|e| since.is_none_or(|t| e.time >= t))
                .take(n)
                .cloned()
                .collect();
            std::future::ready(Ok(got))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut got = Vec::new();
        let more = rt
            .block_on(read_pages(fetch, since, limit, page, |p| {
                taken.set(taken.get() + 1);
                assert!(p.len() <= page, "a page of {}", p.len());
                got.extend(p.into_iter().map(|e| e.id));
                Ok(())
            }))
            .unwrap();
        assert_eq!(taken.get(), calls.get());
        (got, more, calls.get())
    }

    proptest! {
        /// Paging gives the same events as one search without a limit would,
        /// each once, as long as fewer than a page share a millisecond.
        #[test]
        fn pages_give_each_event_once(
            gaps in proptest::collection::vec(0i64..3, 0..60),
            page in 2usize..8,
            limit in 1usize..80,
            from in proptest::option::of(0i64..40),
        ) {
            // Runs of equal times shorter than a page.
            let mut times = Vec::new();
            let (mut t, mut run) = (0i64, 0usize);
            for g in gaps {
                if g == 0 && run + 1 < page {
                    run += 1;
                } else {
                    t += g.max(1);
                    run = 1;
                }
                times.push(t);
            }
            let store = events(&times);
            let since = from.map(at);
            let matching: Vec<String> = store
                .iter()
                .filter(|e| since.is_none_or(|t| e.time >= t))
                .map(|e| e.id.clone())
                .collect();
            let (got, more, _) = read(&store, since, limit, page);
            let want: Vec<String> = matching.iter().take(limit).cloned().collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(more, matching.len() > limit);
        }
    }

    #[test]
    fn a_page_at_one_millisecond_stops_the_list() {
        let store = events(&[0, 1, 1, 1, 1, 2]);
        let (got, more, calls) = read(&store, None, 100, 3);
        // The second page, from the first's last millisecond, ends there.
        assert_eq!(got, ["e0", "e1", "e2", "e3"]);
        assert!(more);
        assert_eq!(calls, 2);
        // A limit within the first page needs one call, and says whether
        // more follow.
        assert_eq!(
            read(&store, None, 2, 3),
            (vec!["e0".into(), "e1".into()], true, 1)
        );
        assert!(!read(&store, None, 6, 10).1);
        assert!(read(&store, None, 5, 10).1);
        // A limit at a page's end takes one more call to tell.
        let store = events(&[0, 1, 2, 3, 4, 5]);
        assert_eq!(
            read(&store, None, 3, 3),
            (vec!["e0".into(), "e1".into(), "e2".into()], true, 2)
        );
        assert!(!read(&store, None, 6, 3).1);
    }
}
