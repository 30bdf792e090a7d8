//! SSH through Wicket with stock OpenSSH, and session replay.
//!
//! - `wicket config` prints an ssh_config block: `Host *.CLUSTER` with
//!   `ProxyCommand wicket proxy ssh ... %h:%p`, the profile's key and
//!   certificate, and a known-hosts file holding `@cert-authority` for
//!   the proxy's host CA, so `ssh root@db-1.CLUSTER` (and `scp`, `sftp`) work
//!   with no prompts. It also writes the block to the profile's
//!   `ssh_config`.
//! - `wicket proxy ssh [LOGIN@]HOST:PORT` connects to the SSH proxy, sends the
//!   route line naming HOST, and copies bytes between stdin/stdout and the
//!   proxy (ssh's `ProxyCommand`).
//! - `wicket ssh [LOGIN@]NODE [COMMAND]` runs `ssh -F <profile>/ssh_config`.
//! - `wicket recordings ls`, `wicket play SESSION [--speed N] [--format text|cast]`.

use crate::cli::{authenticated_client, query_escape, Format};
use crate::profile::{self, write_file, Profile, ProfileInfo};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::io::{IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wicket_api::RecordingInfo;

/// The line the proxy reads before the SSH version exchange (see wicketd's `ssh` module).
const ROUTE_PREFIX: &str = "WICKET-ROUTE 1 ";

#[derive(Debug, Args)]
pub struct SshArgs {
    /// `[LOGIN@]NODE` (LOGIN defaults to your Wicket user name).
    pub destination: String,
    /// The command to run (default: an interactive shell).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Force a terminal (ssh -t).
    #[arg(short = 't')]
    pub tty: bool,
    /// Local port forwarding (ssh -L), if your role allows it.
    #[arg(short = 'L')]
    pub local_forward: Vec<String>,
    /// Forward your SSH agent (ssh -A), if your role allows it.
    #[arg(short = 'A')]
    pub agent: bool,
    /// Extra ssh options (ssh -o), repeatable.
    #[arg(short = 'o')]
    pub options: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum RecordingsCommand {
    /// List recorded sessions (yours, or everyone's with an audit role).
    Ls {
        /// Only sessions under this access request.
        #[arg(long)]
        request: Option<String>,
        /// Only sessions of this user.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

/// How `wicket play` shows a recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum PlayFormat {
    /// Replay on the terminal with the original timing.
    #[default]
    Terminal,
    /// The output as plain text (escape sequences removed), for grep, with
    /// what wicketd marked (shell or command started, sftp file operations,
    /// forwards, refusals) as `[wicket] ...` lines where it happened.
    Text,
    /// The events as JSON (database sessions: their statements).
    Json,
    /// The asciicast v2 file itself (for `asciinema play -`).
    Cast,
}

#[derive(Debug, Args)]
pub struct PlayArgs {
    /// The session ID.
    pub session: String,
    /// Play faster (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Cap pauses at this many seconds.
    #[arg(long)]
    pub idle_limit: Option<f64>,
    /// Print at once instead of with the original timing.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, value_enum, default_value_t)]
    pub format: PlayFormat,
}

/// A path as one ssh_config argument: in double quotes, with `%` doubled
/// (ssh expands `%` tokens in these directives). A path that a double-quoted
/// argument cannot hold, or that a shell would expand inside one (in
/// `ProxyCommand`), is refused.
fn quote(p: &Path) -> Result<String> {
    let text = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if text
        .chars()
        .any(|c| c.is_control() || matches!(c, '"' | '\\' | '$' | '`'))
    {
        bail!("{text:?} cannot go into an ssh_config (quote, backslash, $, ` or a control character); set WICKET_HOME to a plainer path");
    }
    Ok(format!("\"{}\"", text.replace('%', "%%")))
}

/// The SSH proxy's address: asked from wicketd (`/v1/resources` names the
/// port; the proxies listen on the API's host) and saved in the profile, or,
/// unless `refresh`, the saved one.
async fn ssh_proxy_addr(p: &Profile, info: &ProfileInfo, refresh: bool) -> Result<String> {
    if !refresh {
        if let Ok(s) = std::fs::read_to_string(p.dir.join("ssh_proxy")) {
            let s = s.trim();
            if !s.is_empty() {
                return Ok(s.to_owned());
            }
        }
    }
    let (_, _, client) = authenticated_client()?;
    let r: wicket_api::Resources = client.get("/v1/resources").await?;
    let port = r.proxies.ssh.ok_or_else(|| {
        anyhow!(
            "the proxy at {} has no SSH listener (listen.ssh is not set)",
            info.proxy
        )
    })?;
    let host = crate::client::split_proxy(&info.proxy)?;
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    write_file(
        &p.dir.join("ssh_proxy"),
        format!("{addr}\n").as_bytes(),
        0o644,
    )?;
    Ok(addr)
}

/// Whether `s` is a non-empty run of `[A-Za-z0-9._@:\[\]-]` (names and
/// host:port addresses): nothing ssh_config would read as syntax, and
/// nothing a shell would but the brackets of an IPv6 address (a glob),
/// which are single-quoted in the ProxyCommand.
fn config_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:[]-".contains(&b))
}

/// The ssh_config block for the current profile.
pub fn ssh_config_text(p: &Profile, info: &ProfileInfo, ssh_proxy: &str) -> Result<String> {
    let exe = std::env::current_exe().context("locating the wicket binary")?;
    let cluster = &info.cluster_name;
    // These come from the server: checked before they go into a file ssh
    // reads (a newline would add directives such as ProxyCommand).
    for (what, value) in [
        ("cluster name", cluster.as_str()),
        ("user name", info.user.as_str()),
        ("SSH proxy address", ssh_proxy),
    ] {
        if !config_safe(value) {
            bail!("wicketd sent a {what} that cannot go into an ssh_config: {value:?}");
        }
    }
    Ok(format!(
        "# Wicket cluster {cluster:?} via {proxy} as {user} (written by `wicket config`)\n\
         Host *.{cluster}\n\
         \x20   ProxyCommand {exe} proxy ssh --ssh-proxy '{ssh_proxy}' --profile {profile} '%h:%p'\n\
         \x20   IdentityFile {key}\n\
         \x20   CertificateFile {cert}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   UserKnownHostsFile {known}\n\
         \x20   GlobalKnownHostsFile /dev/null\n\
         \x20   StrictHostKeyChecking yes\n\
         \x20   HostKeyAlgorithms ssh-ed25519-cert-v01@openssh.com\n\
         \x20   PreferredAuthentications publickey\n\
         \x20   Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com\n",
        proxy = info.proxy,
        profile = quote(&p.dir)?,
        user = info.user,
        exe = quote(&exe)?,
        key = quote(&p.ssh_key())?,
        cert = quote(&p.ssh_cert())?,
        known = quote(&p.known_hosts())?,
    ))
}

/// Writes `<profile>/ssh_config` and returns its path and text.
async fn write_ssh_config() -> Result<(PathBuf, String, ProfileInfo)> {
    let home = profile::home()?;
    let p = Profile::current(&home)?;
    let info = p.read_info()?;
    let addr = ssh_proxy_addr(&p, &info, true).await?;
    let text = ssh_config_text(&p, &info, &addr)?;
    let path = p.dir.join("ssh_config");
    write_file(&path, text.as_bytes(), 0o644)?;
    Ok((path, text, info))
}

/// `wicket config`.
pub async fn config(format: Format) -> Result<()> {
    let (path, text, info) = write_ssh_config().await?;
    match format {
        Format::Text => out!("{text}"),
        Format::Json => crate::out::json_line(&serde_json::json!({
            "cluster": info.cluster_name,
            "host_pattern": format!("*.{}", info.cluster_name),
            "ssh_config": text,
            "ssh_config_file": path,
        })),
    }
    Ok(())
}

/// `wicket ssh`: runs OpenSSH with the profile's ssh_config.
pub async fn ssh(args: SshArgs) -> Result<()> {
    let (path, _, info) = write_ssh_config().await?;
    let (login, node) = match args.destination.rsplit_once('@') {
        Some((l, n)) => (l.to_owned(), n.to_owned()),
        None => (info.user.clone(), args.destination.clone()),
    };
    if node.is_empty() || login.is_empty() {
        bail!("destination must be [LOGIN@]NODE");
    }
    // Neither may pass for an option of ssh's.
    if node.starts_with('-') || login.starts_with('-') {
        bail!(
            "destination must be [LOGIN@]NODE, not an option: {:?}",
            args.destination
        );
    }
    let suffix = format!(".{}", info.cluster_name);
    let host = if node.ends_with(&suffix) {
        node
    } else {
        format!("{node}{suffix}")
    };
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-F").arg(&path);
    if args.tty {
        cmd.arg("-t");
    }
    if args.agent {
        cmd.arg("-A");
    }
    for l in &args.local_forward {
        cmd.arg("-L").arg(l);
    }
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    // After `--`, nothing is an option: the host, then the command.
    cmd.arg("-l")
        .arg(&login)
        .arg("--")
        .arg(&host)
        .args(&args.command);
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(anyhow!("cannot run ssh: {err}"))
}

/// `wicket proxy ssh LOGIN@HOST:PORT`: a byte pipe to the SSH proxy.
pub async fn proxy_ssh(
    target: &str,
    ssh_proxy: Option<String>,
    profile_dir: Option<std::path::PathBuf>,
) -> Result<()> {
    let (rest, port) = match target.rsplit_once(':') {
        Some((r, p)) => (r, p.parse::<u16>().context("port in LOGIN@HOST:PORT")?),
        None => (target, 22),
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        bail!("invalid host {host:?} in {target:?}");
    }
    // The certificate ends with the grant it carries; say so here (the
    // proxy can only refuse an expired certificate without a reason).
    let current = match profile_dir {
        Some(dir) => {
            let p = Profile { dir };
            p.read_info().map(|info| (p, info))
        }
        None => profile::home().and_then(|home| {
            let p = Profile::current(&home)?;
            let info = p.read_info()?;
            Ok((p, info))
        }),
    };
    if let Ok((_, info)) = &current {
        crate::profile::check_not_expired(info, crate::now())?;
    }
    let addr = match ssh_proxy {
        Some(a) => a,
        None => {
            let (p, info) = current?;
            ssh_proxy_addr(&p, &info, false).await?
        }
    };
    // Every address the name has, in order, as ssh itself tries them
    // (`localhost` is often ::1 first while the proxy listens on 127.0.0.1).
    let socks: Vec<std::net::SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .collect();
    let mut failures = Vec::new();
    let mut connected = None;
    for sock in &socks {
        match TcpStream::connect_timeout(sock, Duration::from_secs(10)) {
            Ok(tcp) => {
                connected = Some(tcp);
                break;
            }
            Err(e) => failures.push(format!("{sock}: {e}")),
        }
    }
    let Some(mut tcp) = connected else {
        if failures.is_empty() {
            bail!("{addr} resolves to nothing");
        }
        bail!(
            "cannot connect to the SSH proxy at {addr} ({})",
            failures.join("; ")
        );
    };
    let _ = tcp.set_nodelay(true);
    tcp.write_all(format!("{ROUTE_PREFIX}{host} {port}\n").as_bytes())?;
    let mut up = tcp.try_clone()?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = up.shutdown(Shutdown::Write);
    });
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    Ok(())
}

/// `wicket recordings ls`.
pub async fn recordings(cmd: RecordingsCommand) -> Result<()> {
    let RecordingsCommand::Ls {
        request,
        user,
        format,
    } = cmd;
    let (_, _, client) = authenticated_client()?;
    let mut q = Vec::new();
    if let Some(r) = request {
        q.push(format!("request={}", query_escape(&r)));
    }
    if let Some(u) = user {
        q.push(format!("user={}", query_escape(&u)));
    }
    let path = if q.is_empty() {
        "/v1/recordings".to_owned()
    } else {
        format!("/v1/recordings?{}", q.join("&"))
    };
    let list: Vec<RecordingInfo> = client.get(&path).await?;
    match format {
        Format::Json => crate::out::json(&list)?,
        Format::Text => {
            outln!(
                "{:<36}  {:<20}  {:<10} {:<16} {:<8} REQUESTS",
                "SESSION",
                "STARTED",
                "USER",
                "NODE",
                "LOGIN"
            );
            for r in &list {
                outln!(
                    "{:<36}  {:<20}  {:<10} {:<16} {:<8} {}",
                    r.session_id,
                    r.started.format("%Y-%m-%dT%H:%M:%SZ"),
                    r.user,
                    r.node,
                    r.login,
                    if r.request_ids.is_empty() {
                        "-".to_owned()
                    } else {
                        r.request_ids.join(",")
                    }
                );
            }
        }
    }
    Ok(())
}

/// The longest line of a recording `wicket play` reads: one event, its
/// data JSON-escaped (wicketd writes one per read of a channel's output).
const MAX_CAST_LINE: usize = 64 << 20;

/// One asciicast v2 event.
#[derive(Debug, Clone, PartialEq)]
pub struct CastEvent {
    pub time: f64,
    pub code: String,
    pub data: String,
}

/// Parses an asciicast v2 file: the header and its events (bad lines are skipped).
pub fn parse_cast(text: &str) -> Result<(serde_json::Value, Vec<CastEvent>)> {
    let mut lines = text.lines();
    let header = cast_header(lines.next().unwrap_or_default().as_bytes())?;
    let events = lines.filter_map(|l| cast_event(l.as_bytes())).collect();
    Ok((header, events))
}

/// An asciicast v2 header line, checked.
fn cast_header(line: &[u8]) -> Result<serde_json::Value> {
    let header: serde_json::Value =
        serde_json::from_slice(line).context("the recording has no asciicast header")?;
    if header["version"] != 2 {
        bail!("not an asciicast v2 recording");
    }
    Ok(header)
}

/// One event line; `None` for a line that is not one (skipped). Bytes
/// that are not UTF-8 are replaced, not a reason to skip the line.
fn cast_event(line: &[u8]) -> Option<CastEvent> {
    serde_json::from_str::<(f64, String, String)>(&String::from_utf8_lossy(line))
        .ok()
        .map(|(time, code, data)| CastEvent { time, code, data })
}

/// Where [`CastLines`] reads from: a download, or (in tests) pieces.
trait Chunks {
    fn chunk(&mut self) -> impl std::future::Future<Output = Result<Option<hyper::body::Bytes>>>;
}

impl Chunks for crate::client::Download {
    fn chunk(&mut self) -> impl std::future::Future<Output = Result<Option<hyper::body::Bytes>>> {
        crate::client::Download::chunk(self)
    }
}

/// A download taken whole into an unnamed temporary file (0600, gone when
/// closed), then read back in pieces. `wicket play` takes the recording
/// this way before it shows anything: wicketd ends a response whose client
/// takes nothing of it for `limits.send_timeout`, and a replay in real
/// time, or a reader paging through `| less`, would stop taking it. A
/// download that breaks off is kept as far as it came, and its error
/// comes after that.
struct Spooled {
    file: std::fs::File,
    broken: Option<anyhow::Error>,
}

impl Spooled {
    async fn take(mut download: impl Chunks) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        let keeping = "keeping the recording in a temporary file (the directory $TMPDIR names)";
        let mut file = tempfile::tempfile().context(keeping)?;
        // A file that cannot take more (a full disk) ends it as a broken
        // download would: what it kept is shown, then why it stopped.
        let broken = loop {
            match download.chunk().await {
                Ok(Some(chunk)) => {
                    if let Err(e) = file.write_all(&chunk) {
                        break Some(anyhow::Error::new(e).context(keeping));
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        file.seek(SeekFrom::Start(0)).context(keeping)?;
        Ok(Self { file, broken })
    }

    fn next(&mut self) -> Result<Option<hyper::body::Bytes>> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return self.broken.take().map_or(Ok(None), Err),
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf.into()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow!("reading back the recording's temporary file: {e}")),
            }
        }
    }
}

impl Chunks for Spooled {
    fn chunk(&mut self) -> impl std::future::Future<Output = Result<Option<hyper::body::Bytes>>> {
        std::future::ready(self.next())
    }
}

/// The lines of a download, as they come, each at most [`MAX_CAST_LINE`].
struct CastLines<D> {
    download: D,
    buf: Vec<u8>,
    /// Where the next line starts in `buf`, and how far it was searched.
    start: usize,
    searched: usize,
    ended: bool,
    max_line: usize,
}

impl<D: Chunks> CastLines<D> {
    fn new(download: D) -> Self {
        CastLines {
            download,
            buf: Vec::new(),
            start: 0,
            searched: 0,
            ended: false,
            max_line: MAX_CAST_LINE,
        }
    }

    /// The next line, without its newline; `None` at the end.
    async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf[self.searched..].iter().position(|&b| b == b'\n') {
                let end = self.searched + i;
                let line = self.buf[self.start..end].to_vec();
                self.start = end + 1;
                self.searched = self.start;
                return Ok(Some(line));
            }
            self.searched = self.buf.len();
            if self.ended {
                if self.start == self.buf.len() {
                    return Ok(None);
                }
                let line = self.buf[self.start..].to_vec();
                self.start = self.buf.len();
                return Ok(Some(line));
            }
            if self.buf.len() - self.start > self.max_line {
                bail!("the recording has a line over {} bytes", self.max_line);
            }
            // What was returned goes before more is read.
            self.buf.drain(..self.start);
            self.searched -= self.start;
            self.start = 0;
            match self.download.chunk().await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => self.ended = true,
            }
        }
    }
}

/// What begins a marker's line in [`plain_recording`].
const MARKER_PREFIX: &str = "[wicket]";

/// A recording as plain text: its output without escape sequences, and
/// its markers as `[wicket] ...` lines (on a line of their own; an output
/// line that begins the same way gets a `\` before it). Each run of output
/// is cleaned on its own, and each marker too (a marker may quote what the
/// user sent, a path): an escape sequence left open in one cannot hide
/// what follows it.
pub fn plain_recording(events: &[CastEvent]) -> String {
    let mut out = Vec::new();
    let mut plain = PlainRecording::default();
    for e in events {
        // Writing to memory does not fail.
        let _ = plain.push(e, &mut out);
    }
    let _ = plain.finish(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The longest run of output [`PlainRecording`] holds before it cleans
/// what it has up to its last line's end (or carriage return); past four
/// times that, without one, all of it.
const MAX_PLAIN_RUN: usize = 1 << 20;

/// [`plain_recording`] as events come, written out as it goes.
#[derive(Default)]
struct PlainRecording {
    /// Output since the last marker, not cleaned yet.
    run: String,
    /// Where the run may be cut: just after its last `\n` or `\r`, but not
    /// a `\r` that ends the run (it may be half of a `\r\n` whose `\n` comes
    /// next: parts that end in `\r` and begin with `\n` would read as two
    /// line ends).
    cut: Option<usize>,
    /// Whether anything was written, and whether it ends a line.
    wrote: bool,
    at_line_start: bool,
    /// The reader's terminal does not take UTF-8: characters whose bytes
    /// it would read as C1 controls are escaped too ([`crate::term::printable_in`]).
    legacy_terminal: bool,
}

impl PlainRecording {
    fn push(&mut self, e: &CastEvent, out: &mut impl Write) -> std::io::Result<()> {
        match e.code.as_str() {
            "o" => {
                if self.run.ends_with('\r') && !e.data.starts_with('\n') {
                    self.cut = Some(self.run.len());
                }
                let body = e.data.strip_suffix('\r').unwrap_or(&e.data);
                if let Some(i) = body.rfind(['\n', '\r']) {
                    self.cut = Some(self.run.len() + i + 1);
                }
                self.run.push_str(&e.data);
                // A long run is cleaned in parts: an escape sequence left
                // open hides no more than the rest of its part.
                if self.run.len() > MAX_PLAIN_RUN {
                    let at = match self.cut {
                        Some(at) => at,
                        None if self.run.len() > 4 * MAX_PLAIN_RUN => self.run.len(),
                        None => return Ok(()),
                    };
                    let rest = self.run.split_off(at);
                    self.end_run(out)?;
                    // Cleaning may have taken the part's last line end
                    // (in an escape sequence): the next part still begins
                    // a line, where it is checked for the marker prefix.
                    if self.wrote && !self.at_line_start {
                        out.write_all(b"\n")?;
                        self.at_line_start = true;
                    }
                    self.run = rest;
                }
            }
            "m" => {
                self.end_run(out)?;
                if self.wrote && !self.at_line_start {
                    out.write_all(b"\n")?;
                }
                let marker: String = e
                    .data
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                let marker = crate::term::printable_in(&marker, !self.legacy_terminal);
                writeln!(out, "{MARKER_PREFIX} {marker}")?;
                self.wrote = true;
                self.at_line_start = true;
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        self.end_run(out)
    }

    /// Writes the run, cleaned. Only markers begin a line with `[wicket]`:
    /// output that does (a file cat on the node, say) gets a `\` before it.
    fn end_run(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        for line in crate::term::plain_text(&self.run).split_inclusive('\n') {
            // Bidirectional controls (which can reorder a line to show a
            // marker) are escaped, and so are C1 bytes for a terminal
            // that is not UTF-8.
            let line = &crate::term::printable_in(line, !self.legacy_terminal);
            // What a terminal does not show (NUL, zero-width and format
            // characters, spaces) does not hide the prefix either.
            if line
                .trim_start_matches(|c: char| !c.is_ascii_graphic())
                .starts_with(MARKER_PREFIX)
            {
                out.write_all(b"\\")?;
            }
            out.write_all(line.as_bytes())?;
            self.wrote = true;
            self.at_line_start = line.ends_with('\n');
        }
        self.run.clear();
        self.cut = None;
        Ok(())
    }
}

/// `wicket play SESSION` for an SSH session: returns false when the
/// session has no recording (a database session, say).
pub async fn play_recording(client: &crate::client::Client, args: &PlayArgs) -> Result<bool> {
    if !(args.speed > 0.0 && args.speed.is_finite()) {
        bail!("--speed must be a positive number");
    }
    let download = match client
        .get_stream(&format!("/v1/recordings/{}", query_escape(&args.session)))
        .await
    {
        Ok(d) => d,
        Err(e) => {
            return match e.downcast_ref::<crate::client::ApiError>() {
                Some(api) if matches!(api.status.as_u16(), 400 | 404) => Ok(false),
                _ => Err(e),
            }
        }
    };
    let mut out = std::io::stdout().lock();
    // The file as recorded: its bytes would drive this terminal (the other
    // formats show it safely).
    if matches!(args.format, PlayFormat::Cast) && out.is_terminal() {
        bail!("--format cast writes the recording as it is, terminal controls and all: redirect it to a file, or pipe it (`| asciinema play -`)");
    }
    // Taken whole first, then read as it comes: a recording of any size
    // takes one event's memory.
    let mut spooled = Spooled::take(download).await?;
    if let PlayFormat::Cast = args.format {
        while let Some(chunk) = spooled.next()? {
            out.write_all(&chunk)?;
        }
        out.flush()?;
        return Ok(true);
    }
    let mut lines = CastLines::new(spooled);
    if let PlayFormat::Json = args.format {
        json_recording(&mut lines, &mut out).await?;
        out.flush()?;
        return Ok(true);
    }
    // Checked, not shown: text and terminal replays show the events.
    cast_header(&lines.next().await?.unwrap_or_default())?;
    match args.format {
        PlayFormat::Cast | PlayFormat::Json => {}
        PlayFormat::Text => {
            let mut plain = PlainRecording {
                legacy_terminal: !crate::term::stdout_utf8(),
                ..Default::default()
            };
            while let Some(line) = lines.next().await? {
                if let Some(e) = cast_event(&line) {
                    plain.push(&e, &mut out)?;
                }
            }
            plain.finish(&mut out)?;
        }
        PlayFormat::Terminal => {
            let mut player = Player::new(args);
            // Whatever ends the replay (its end, an error, Ctrl-C), the
            // terminal is put back as it was.
            let played = tokio::select! {
                played = async {
                    while let Some(line) = lines.next().await? {
                        if let Some(e) = cast_event(&line) {
                            player.play(&mut out, &e).await?;
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                } => played,
                _ = interrupted() => Ok(()),
            };
            out.write_all(crate::term::RESET.as_bytes())?;
            out.flush()?;
            played?;
        }
    }
    out.flush()?;
    Ok(true)
}

/// Writes a recording as one JSON document, `{"header", "events"}`, event
/// by event as they come. When the download breaks off (or its header does
/// not read: `"header": null`), the document is still closed, with what
/// was read and an `"error"` saying why, and the error is returned (so the
/// exit status says so too).
async fn json_recording<D: Chunks>(lines: &mut CastLines<D>, out: &mut impl Write) -> Result<()> {
    let header = match lines.next().await {
        Ok(line) => cast_header(&line.unwrap_or_default()),
        Err(e) => Err(e),
    };
    let (header, broken) = match header {
        Ok(h) => (h, None),
        Err(e) => (serde_json::Value::Null, Some(e)),
    };
    write!(
        out,
        "{{\n  \"header\": {},\n  \"events\": [",
        crate::out::json_safe(&serde_json::to_string(&header)?)
    )?;
    let mut first = true;
    let read = loop {
        if let Some(e) = broken {
            break Err(e);
        }
        let line = match lines.next().await {
            Ok(Some(line)) => line,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if let Some(e) = cast_event(&line) {
            let sep = if first { "" } else { "," };
            write!(
                out,
                "{sep}\n    {}",
                crate::out::json_safe(&serde_json::json!([e.time, e.code, e.data]).to_string())
            )?;
            first = false;
        }
    };
    let end = if first { "" } else { "\n  " };
    match read {
        Ok(()) => writeln!(out, "{end}]\n}}")?,
        Err(e) => {
            let why = format!("{e:#}");
            writeln!(
                out,
                "{end}],\n  \"error\": {}\n}}",
                crate::out::json_safe(&serde_json::to_string(&why)?)
            )?;
            out.flush()?;
            return Err(e.context("the recording is incomplete (its JSON ends with an \"error\")"));
        }
    }
    Ok(())
}

/// Resolves at Ctrl-C, SIGTERM or SIGHUP.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
                _ = hup.recv() => {},
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Plays events to the terminal in their time (see [`PlayArgs`]).
struct Player<'a> {
    args: &'a PlayArgs,
    last: f64,
    played: u64,
    replay: crate::term::Replay,
    utf8: bool,
}

impl<'a> Player<'a> {
    fn new(args: &'a PlayArgs) -> Self {
        Player {
            args,
            last: 0.0,
            played: 0,
            replay: crate::term::Replay::default(),
            utf8: crate::term::utf8_terminal(|k| std::env::var(k).ok()),
        }
    }

    async fn play(&mut self, out: &mut impl Write, e: &CastEvent) -> Result<()> {
        if e.code != "o" {
            return Ok(());
        }
        // Without waits between events (`--no-wait`, a high `--speed`), a
        // signal still gets its turn.
        self.played += 1;
        if self.played.is_multiple_of(256) {
            tokio::task::yield_now().await;
        }
        let args = self.args;
        let mut gap = (e.time - self.last).max(0.0);
        if let Some(limit) = args.idle_limit {
            gap = gap.min(limit.max(0.0));
        }
        self.last = e.time;
        let wait = gap / args.speed;
        if !args.no_wait && wait > 0.0005 {
            out.flush()?;
            tokio::time::sleep(Duration::from_secs_f64(wait.min(3600.0))).await;
        }
        let safe = self.replay.feed(&e.data);
        if self.utf8 {
            out.write_all(safe.as_bytes())?;
        } else {
            out.write_all(crate::term::ascii_only(&safe).as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of a plain recording a reader takes for markers: what
    /// a terminal does not show before `[wicket]` does not count (an
    /// escaped line begins with `\\`).
    fn marker_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| {
                l.trim_start_matches(|c: char| !c.is_ascii_graphic())
                    .starts_with("[wicket]")
            })
            .collect()
    }

    #[test]
    fn plain_recordings_show_markers_on_lines_of_their_own() {
        let ev = |code: &str, data: &str| CastEvent {
            time: 0.0,
            code: code.into(),
            data: data.into(),
        };
        let events = [
            ev("m", "shell"),
            ev("o", "\x1b[1mroot@n\x1b[0m:~# ls"),
            ev("m", "sftp: open /a\nb\x1b[2J (read)"),
            ev("o", "\r\nfile\r\n"),
            ev("r", "100x30"),
            ev("m", "ended"),
        ];
        assert_eq!(
            plain_recording(&events),
            "[wicket] shell\nroot@n:~# ls\n[wicket] sftp: open /a b [2J (read)\n\nfile\n[wicket] ended\n"
        );
        // Output cannot pass for a marker, even after a carriage return or
        // characters a terminal does not show.
        let events = [
            ev("o", "[wicket] session ended: connection closed\r\n"),
            ev("o", "x\r[wicket] sftp: remove /etc/passwd\r\n"),
            ev(
                "o",
                "\0[wicket] a\r\n\u{200B}[wicket] b\r\n\u{FEFF} [wicket] c\r\n",
            ),
            ev("m", "ended"),
        ];
        let text = plain_recording(&events);
        assert_eq!(marker_lines(&text), ["[wicket] ended"], "{text}");
        assert!(text.contains("\\[wicket] session ended"), "{text}");
        // An escape string left open (in output, or in a marker) hides
        // nothing after it.
        let events = [
            ev("o", "x\x1bPq"),
            ev("m", "sftp: remove /tmp/\x1bP"),
            ev("m", "sftp: remove /etc/shadow\u{9d}"),
            ev("o", "y\x1b]0;"),
            ev("m", "ended"),
        ];
        assert_eq!(
            plain_recording(&events),
            "x\n[wicket] sftp: remove /tmp/ P\n[wicket] sftp: remove /etc/shadow \ny\n[wicket] ended\n"
        );
        // Bidirectional controls, in output or a marker, are shown escaped,
        // and a character whose UTF-8 holds a C1 byte (U+011B: C4 9B, CSI)
        // is too for a terminal that is not UTF-8.
        let events = [
            ev("o", "\u{202e}]tekciw[ ok\r\ně6n\r\n"),
            ev("m", "sftp: open /\u{2066}x"),
        ];
        let text = plain_recording(&events);
        assert_eq!(
            text,
            "\\u{202e}]tekciw[ ok\ně6n\n[wicket] sftp: open /\\u{2066}x\n"
        );
        let mut out = Vec::new();
        let mut legacy = PlainRecording {
            legacy_terminal: true,
            ..Default::default()
        };
        for e in &events {
            legacy.push(e, &mut out).unwrap();
        }
        legacy.finish(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\\u{11b}6n\n") && !text.contains('ě'),
            "{text}"
        );
    }

    #[test]
    fn only_plain_names_go_into_an_ssh_config() {
        for ok in ["wicket", "alice", "a.b@c", "127.0.0.1:3022", "[::1]:3022"] {
            assert!(config_safe(ok), "{ok}");
        }
        for bad in [
            "",
            "x\n    ProxyCommand sh",
            "a b",
            "$(id)",
            "a;b",
            "x\"y",
            "a`b`",
        ] {
            assert!(!config_safe(bad), "{bad:?}");
        }
    }

    /// The block as OpenSSH reads it (`ssh -G`, no connection made): a
    /// profile under a path with a space and a `%` keeps both, and the
    /// ProxyCommand gets the host and port only (no login through a shell).
    #[test]
    fn the_ssh_config_block_reads_back_through_openssh() {
        let home = tempfile::Builder::new()
            .prefix("wicket home 100% ")
            .tempdir()
            .unwrap();
        let p = Profile {
            dir: home.path().join("profiles/wicketd/alice"),
        };
        let now = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        let info = ProfileInfo {
            proxy: "127.0.0.1:3025".into(),
            user: "alice".into(),
            cluster_name: "wicket".into(),
            ca_pin: String::new(),
            roles: Vec::new(),
            principals: Vec::new(),
            request_ids: Vec::new(),
            valid_after: now,
            valid_before: now,
        };
        let text = ssh_config_text(&p, &info, "127.0.0.1:3022").unwrap();
        let file = home.path().join("ssh_config");
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&file)
            .arg("root@db-1.wicket")
            .output()
            .expect("ssh (openssh-client)");
        assert!(out.status.success(), "{out:?}");
        let resolved = String::from_utf8(out.stdout).unwrap();
        let setting = |k: &str| {
            resolved
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k} in {resolved}"))
                .to_owned()
        };
        // `-G` shows values before `%` tokens are expanded: `%%` (one `%`
        // once expanded) and the ProxyCommand's own `%h:%p`.
        let escaped = |p: &Path| p.display().to_string().replace('%', "%%");
        assert!(
            setting("proxycommand ").ends_with(&format!(
                "--ssh-proxy '127.0.0.1:3022' --profile \"{}\" '%h:%p'",
                escaped(&p.dir)
            )),
            "{resolved}"
        );
        assert_eq!(setting("identityfile "), escaped(&p.ssh_key()));
        assert_eq!(setting("certificatefile "), escaped(&p.ssh_cert()));
        // What a double-quoted argument cannot hold, or a shell would
        // expand in one, is refused with the way out.
        for bad in [
            "/tmp/a\"b",
            "/tmp/$(id)",
            "/tmp/a`id`",
            "/tmp/a\\b",
            "/tmp/a\nb",
        ] {
            let e = quote(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("WICKET_HOME"), "{bad:?}: {e}");
        }
    }

    impl Chunks for std::collections::VecDeque<Vec<u8>> {
        fn chunk(
            &mut self,
        ) -> impl std::future::Future<Output = Result<Option<hyper::body::Bytes>>> {
            std::future::ready(Ok(self.pop_front().map(hyper::body::Bytes::from)))
        }
    }

    /// A download is taken whole before it is read back; one that broke
    /// off is read back as far as it came, then its error.
    #[test]
    fn a_spooled_download_reads_back_whole_then_its_error() {
        struct Broken(std::collections::VecDeque<Vec<u8>>);
        impl Chunks for Broken {
            fn chunk(
                &mut self,
            ) -> impl std::future::Future<Output = Result<Option<hyper::body::Bytes>>> {
                std::future::ready(match self.0.pop_front() {
                    Some(c) => Ok(Some(c.into())),
                    None => Err(anyhow!("connection reset after 200002 bytes")),
                })
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let big = vec![b'y'; 200_000];
        let read_back = |mut s: Spooled| {
            let mut got = Vec::new();
            let end = loop {
                match s.next() {
                    Ok(Some(c)) => got.extend_from_slice(&c),
                    Ok(None) => break None,
                    Err(e) => break Some(e.to_string()),
                }
            };
            // Then the end, once.
            assert!(matches!(s.next(), Ok(None)));
            (got, end)
        };
        let pieces = [b"a\n".to_vec(), big.clone()];
        let whole = rt
            .block_on(Spooled::take(std::collections::VecDeque::from(
                pieces.clone(),
            )))
            .unwrap();
        assert_eq!(read_back(whole), ([&b"a\n"[..], &big].concat(), None));
        let broken = rt.block_on(Spooled::take(Broken(pieces.into()))).unwrap();
        let (got, end) = read_back(broken);
        assert_eq!(got, [&b"a\n"[..], &big].concat());
        assert_eq!(end.as_deref(), Some("connection reset after 200002 bytes"));
    }

    fn lines_of(pieces: Vec<Vec<u8>>, max_line: usize) -> Result<Vec<Vec<u8>>> {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(async {
            let mut lines = CastLines::new(
                pieces
                    .into_iter()
                    .collect::<std::collections::VecDeque<_>>(),
            );
            lines.max_line = max_line;
            let mut out = Vec::new();
            while let Some(l) = lines.next().await? {
                out.push(l);
            }
            Ok(out)
        })
    }

    /// `wicket play --format json` of a download in `pieces`: what it
    /// printed, and whether it failed.
    fn json_of(pieces: &[&[u8]], max_line: usize) -> (serde_json::Value, Result<()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut lines = CastLines::new(
            pieces
                .iter()
                .map(|p| p.to_vec())
                .collect::<std::collections::VecDeque<_>>(),
        );
        lines.max_line = max_line;
        let mut out = Vec::new();
        let done = rt.block_on(json_recording(&mut lines, &mut out));
        let printed = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
        (printed, done)
    }

    #[test]
    fn json_replay_is_whole_json_even_when_the_download_breaks_off() {
        let head: &[u8] = b"{\"version\": 2}\n";
        let event: &[u8] = b"[0.5, \"o\", \"hi\"]\n";
        let (all, done) = json_of(&[head, event, event], 100);
        assert!(done.is_ok());
        assert_eq!(all["header"], serde_json::json!({"version": 2}));
        assert_eq!(
            all["events"],
            serde_json::json!([[0.5, "o", "hi"], [0.5, "o", "hi"]])
        );
        assert!(all.get("error").is_none(), "{all}");
        let (none, done) = json_of(&[head], 100);
        assert!(done.is_ok());
        assert_eq!(none["events"], serde_json::json!([]));

        // A line too long to read, after one event: what came before is
        // printed, the document is closed with the reason, and it fails.
        let long = [b'x'; 200];
        let (cut, done) = json_of(&[head, event, &long], 100);
        let e = done.unwrap_err();
        assert!(format!("{e:#}").contains("incomplete"), "{e:#}");
        assert_eq!(cut["events"], serde_json::json!([[0.5, "o", "hi"]]));
        assert!(
            cut["error"]
                .as_str()
                .unwrap()
                .contains("line over 100 bytes"),
            "{cut}"
        );
        let (cut, done) = json_of(&[head, &long], 100);
        assert!(done.is_err());
        assert_eq!(cut["events"], serde_json::json!([]));
        assert!(cut["error"].is_string(), "{cut}");
        // No header (an empty download, or one broken within its first
        // line): still one document, saying so.
        let not_json: &[u8] = b"not json\n";
        for pieces in [&[][..], &[&long[..]][..], &[not_json][..]] {
            let (cut, done) = json_of(pieces, 100);
            assert!(done.is_err());
            assert_eq!(cut["header"], serde_json::Value::Null);
            assert_eq!(cut["events"], serde_json::json!([]));
            assert!(cut["error"].is_string(), "{cut}");
        }
    }

    proptest::proptest! {
        /// However the download is cut into pieces, the same lines come
        /// out, the last one with or without its newline.
        #[test]
        fn recording_lines_do_not_depend_on_how_they_arrive(
            lines in proptest::collection::vec("[a-z\\[\\],\"]{0,40}", 0..20),
            newline_at_end: bool,
            cuts in proptest::collection::vec(0usize..1000, 0..10),
        ) {
            let mut text = lines.join("\n").into_bytes();
            if newline_at_end && !text.is_empty() {
                text.push(b'\n');
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(text[at..c].to_vec());
                at = c;
            }
            pieces.push(text[at..].to_vec());
            // As `str::lines` reads it (no `\r` here).
            let want: Vec<Vec<u8>> = std::str::from_utf8(&text)
                .unwrap()
                .lines()
                .map(|l| l.as_bytes().to_vec())
                .collect();
            proptest::prop_assert_eq!(lines_of(pieces, 1 << 20).unwrap(), want);
        }
    }

    #[test]
    fn a_recording_line_over_the_limit_is_an_error() {
        let long = vec![vec![b'x'; 600], vec![b'x'; 600], b"\nok\n".to_vec()];
        let e = lines_of(long, 1000).unwrap_err().to_string();
        assert!(e.contains("over 1000 bytes"), "{e}");
        let fits = vec![vec![b'x'; 600], b"\nok\n".to_vec()];
        assert_eq!(lines_of(fits, 1000).unwrap().len(), 2);
    }

    /// A long run of output is cleaned a line at a time: what an escape
    /// sequence left open hides ends at the line where the run was cut.
    #[test]
    fn a_long_run_of_output_is_cleaned_in_lines() {
        let ev = |code: &str, data: &str| CastEvent {
            time: 0.0,
            code: code.into(),
            data: data.into(),
        };
        let filler = format!("{}\r\n", "y".repeat(1000));
        let mut events = vec![ev("o", "x\x1bP")];
        for _ in 0..(MAX_PLAIN_RUN / filler.len() + 2) {
            events.push(ev("o", &filler));
        }
        events.push(ev("o", "[wicket] fake marker\r\nvisible\r\n"));
        events.push(ev("m", "ended"));
        let text = plain_recording(&events);
        assert!(
            text.contains("\\[wicket] fake marker\nvisible\n[wicket] ended\n"),
            "{}",
            &text[text.len() - 200..]
        );
        // Everything output before the cut was hidden by the open DCS.
        assert!(text.len() < 2 * filler.len() + 200, "{}", text.len());

        // A cut whose line end cleaning takes (`ESC \n`) cannot join the
        // two parts into a line that passes for a marker.
        // (The run crosses the limit with the event that ends in `ESC \n`.)
        let filler = format!("{}\r\n", "y".repeat(MAX_PLAIN_RUN - 5));
        let mut events = vec![
            ev("o", &filler),
            ev("o", "[wic\x1b\n"),
            ev("o", "ket] session ended\r\n"),
        ];
        events.push(ev("m", "ended"));
        let text = plain_recording(&events);
        assert_eq!(marker_lines(&text), ["[wicket] ended"]);

        // A `\r\n` split between two events, where the run is cut, is
        // still one line end.
        let filler = format!("{}\r", "y".repeat(MAX_PLAIN_RUN + 5));
        let events = [ev("o", &filler), ev("o", "\nnext\r\n"), ev("m", "ended")];
        let text = plain_recording(&events);
        assert!(
            text.ends_with("y\nnext\n[wicket] ended\n"),
            "{:?}",
            &text[text.len() - 40..]
        );

        // A progress bar (each event ends in `\r`) is cut at the `\r` before
        // the last, not held until the hard limit.
        let bar = format!("{}\r", "x".repeat(1000));
        let mut plain = PlainRecording::default();
        let mut out = Vec::new();
        for _ in 0..(2 * MAX_PLAIN_RUN / bar.len()) {
            plain.push(&ev("o", &bar), &mut out).unwrap();
            assert!(plain.run.len() <= MAX_PLAIN_RUN + 2 * bar.len());
        }

        // Output without a line end is cleaned in parts too, in linear time.
        let bar = "#".repeat(64 * 1024);
        let mut plain = PlainRecording::default();
        let mut out = Vec::new();
        for _ in 0..(16 * MAX_PLAIN_RUN / bar.len()) {
            plain.push(&ev("o", &bar), &mut out).unwrap();
            assert!(plain.run.len() <= 4 * MAX_PLAIN_RUN + bar.len());
        }
        plain.finish(&mut out).unwrap();
        assert_eq!(
            out.iter().filter(|&&b| b == b'#').count(),
            16 * MAX_PLAIN_RUN
        );
    }

    #[test]
    fn parses_casts() {
        let (h, ev) = parse_cast(
            "{\"version\":2,\"width\":80,\"height\":24}\n[0.5,\"o\",\"hi\"]\nnot json\n[1.0,\"r\",\"100x30\"]\n",
        )
        .unwrap();
        assert_eq!(h["width"], 80);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].data, "hi");
        assert!(parse_cast("{\"version\":1}").is_err());
    }
}
