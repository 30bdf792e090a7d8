//! What an SFTP client asks of the node, read from the bytes it sends on an
//! `sftp` subsystem channel (OpenSSH's `sftp`, and `scp`, which speaks SFTP
//! since OpenSSH 9.0): the file operations worth an audit event — open
//! (with its mode), remove, rename, link, symlink, mkdir, rmdir, setstat and
//! fsetstat (with the attributes set: a chmod through a handle), opendir and
//! extended requests that may change files. Reads, writes, stats, listings
//! and closes are passed over without being buffered, so a large upload
//! costs no memory here. A packet of a type SFTP (up to version 6) does not
//! define for a client is refused; fields are read as version 3 defines
//! them (what OpenSSH speaks; a later version's open flags are read as
//! version 3's).
//!
//! An operation is audited as asked: the node may refuse it. The node's
//! answers are read as they pass too ([`Outcomes`]): an audited request the
//! node refuses (a STATUS other than OK) is reported with the node's
//! reason, and the HANDLE answers name the files behind handles, so an
//! fsetstat is on the record with its path. Data, names and attributes in
//! answers are passed over unheld. What is followed is bounded, and a node
//! stream that does not parse is not followed: no refusal on the record is
//! not proof that the node did what was asked.
//!
//! A client stream that does not parse as SFTP version 3 packets (a length
//! beyond [`MAX_PACKET`], a string beyond its packet, a request id used
//! again before its answer) is an error; the proxy then closes the channel
//! rather than pass on what it cannot audit (OpenSSH's `sftp-server` ends
//! the session on such input too).
//!
//! Pure bookkeeping: no I/O.

/// The largest packet accepted: OpenSSH's `sftp-server` takes up to 256 KiB.
pub const MAX_PACKET: usize = 256 * 1024;
/// Most bytes of a path (or extension name) kept in an event.
const MAX_TEXT: usize = 4096;

const INIT: u8 = 1;
const OPEN: u8 = 3;
const SETSTAT: u8 = 9;
const FSETSTAT: u8 = 10;
const OPENDIR: u8 = 11;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
const SYMLINK: u8 = 20;
/// SFTP version 6's LINK, and its BLOCK and UNBLOCK.
const LINK: u8 = 21;
const UNBLOCK: u8 = 23;
const EXTENDED: u8 = 200;
const CLOSE: u8 = 4;
/// Answers the node sends.
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
/// The longest handle SFTP allows.
const MAX_HANDLE: usize = 256;

/// Extended requests that only read (or only flush): not audited.
const READ_ONLY_EXTENSIONS: &[&str] = &[
    "statvfs@openssh.com",
    "fstatvfs@openssh.com",
    "limits@openssh.com",
    "expand-path@openssh.com",
    "home-directory",
    "users-groups-by-id@openssh.com",
    "fsync@openssh.com",
];

/// One file operation the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOp {
    /// The request's id, which the node's answer carries.
    pub id: u32,
    /// `open`, `remove`, `rename`, `link`, `symlink`, `mkdir`, `rmdir`,
    /// `setstat`, `fsetstat` (its path: `handle <hex>`, until
    /// [`Outcomes::asked`] names the file the node opened it on),
    /// `opendir`, or `extended` (an extension not known here; its name is
    /// `path`).
    pub op: &'static str,
    pub path: String,
    /// The second path, as sent: the new name (rename, link), or for
    /// symlink the link's name — OpenSSH sends the target first.
    pub to: Option<String>,
    /// For open: the mode, e.g. `write,create,truncate`; for setstat and
    /// fsetstat: the attributes set, e.g. `mode=4755,uid=0,gid=0`.
    pub flags: Option<String>,
}

impl FileOp {
    /// One line for a recording or a log: `open /etc/motd (read)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.op, self.path);
        if let Some(to) = &self.to {
            s.push_str(" -> ");
            s.push_str(to);
        }
        if let Some(f) = &self.flags {
            s.push_str(&format!(" ({f})"));
        }
        s
    }
}

/// The stream is not SFTP as this reader knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not an SFTP packet stream: {}", self.0)
    }
}

/// What a [`Packets`] framer hands each packet to.
trait PacketSink {
    /// A packet's header: its type, its length (type byte included) and
    /// its request id (the version, for INIT and VERSION). Whether the
    /// packet is held (true) or passed over unheld; an error stops the
    /// stream.
    fn header(&mut self, kind: u8, len: usize, id: u32) -> Result<bool, String>;
    /// The body (after the type byte, id included) of a packet held.
    fn packet(&mut self, kind: u8, body: &[u8]) -> Result<(), String>;
}

/// Cuts a stream into packets as it arrives, in pieces of any size: holds
/// the packets its sink asks for, passes over the rest unheld. Every SFTP
/// packet has a type and a 4-byte id (or version) after its length.
#[derive(Debug, Default)]
struct Packets {
    /// The packet being read: its header first, then (if held) the rest.
    buf: Vec<u8>,
    /// Bytes of a packet not held still to pass over.
    skip: usize,
    /// Whether the sink has seen the header of the packet in `buf`.
    headed: bool,
}

/// Length (4), type (1) and id (4).
const HEADER: usize = 9;

impl Packets {
    fn feed(
        &mut self,
        mut data: &[u8],
        max: usize,
        sink: &mut impl PacketSink,
    ) -> Result<(), String> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            if self.buf.len() < HEADER {
                let n = (HEADER - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..n]);
                data = &data[n..];
            }
            if self.buf.len() < 4 {
                break;
            }
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > max {
                return Err(format!("a packet of {len} bytes (at most {max})"));
            }
            if len < HEADER - 4 {
                return Err(format!(
                    "a packet of {len} bytes, too short for a type and an id"
                ));
            }
            if self.buf.len() < HEADER {
                break;
            }
            let kind = self.buf[4];
            let id = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]);
            if !self.headed {
                if !sink.header(kind, len, id)? {
                    self.skip = 4 + len - HEADER;
                    self.buf.clear();
                    continue;
                }
                self.headed = true;
            }
            let n = (4 + len - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() < 4 + len {
                break;
            }
            let done = sink.packet(kind, &self.buf[5..]);
            self.buf.clear();
            self.headed = false;
            done?;
        }
        Ok(())
    }
}

/// Whether a client's first bytes on a command channel open an SFTP
/// session: a whole INIT packet (length 5, type 1, version 1 to 6), which
/// other input (a file piped to `cat`) is most unlikely to begin with.
/// `None` while too few have come to tell (every one so far fits).
pub fn opens_like_sftp(first: &[u8]) -> Option<bool> {
    const INIT: [u8; 8] = [0, 0, 0, 5, 1, 0, 0, 0];
    let n = first.len().min(INIT.len());
    if first[..n] != INIT[..n] {
        return Some(false);
    }
    first.get(INIT.len()).map(|v| (1..=6).contains(v))
}

/// Reads the client's packets as they arrive, in pieces of any size.
#[derive(Debug, Default)]
pub struct Reader {
    packets: Packets,
    failed: Option<Malformed>,
}

/// The client's side, seen by its framer.
struct ClientSink<'a> {
    outcomes: &'a mut Outcomes,
    ops: Vec<FileOp>,
}

impl PacketSink for ClientSink<'_> {
    fn header(&mut self, kind: u8, _len: usize, id: u32) -> Result<bool, String> {
        if !matches!(kind, INIT | OPEN..=UNBLOCK | EXTENDED) {
            return Err(format!("a packet of unknown type {kind}"));
        }
        if kind != INIT {
            self.outcomes.sent(id)?;
        }
        Ok(audited(kind) || kind == CLOSE)
    }

    fn packet(&mut self, kind: u8, body: &[u8]) -> Result<(), String> {
        if kind == CLOSE {
            let mut r = Fields { rest: body, kind };
            r.u32()?;
            self.outcomes.closed(&r.handle()?);
            return Ok(());
        }
        if let Some(mut op) = parse(kind, body)? {
            self.outcomes.asked(&mut op);
            self.ops.push(op);
        }
        Ok(())
    }
}

impl Reader {
    /// The operations completed by `data`, which the client sent on a
    /// channel whose node answers `outcomes` follows. After an error every
    /// call returns it again.
    pub fn feed(&mut self, data: &[u8], outcomes: &mut Outcomes) -> Result<Vec<FileOp>, Malformed> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut sink = ClientSink {
            outcomes,
            ops: Vec::new(),
        };
        match self.packets.feed(data, MAX_PACKET, &mut sink) {
            Ok(()) => Ok(sink.ops),
            Err(why) => Err(self.fail(why)),
        }
    }

    fn fail(&mut self, why: String) -> Malformed {
        let e = Malformed(why);
        self.failed = Some(e.clone());
        self.packets = Packets::default();
        e
    }
}

/// An audited request the node refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub op: FileOp,
    /// The node's status, named, and its message: `permission denied: ...`.
    pub error: String,
}

/// Both sides of an `sftp` channel, as far as the audit needs them: the
/// client's requests awaiting answers (a request id used again before its
/// answer would make answers ambiguous: the client's stream is then
/// refused), which audited ones the node refused, and which file each
/// handle the node gave stands for. What it holds is bounded
/// ([`MAX_WAITING`] ids, [`MAX_HELD`] bytes of operations and paths): past
/// that, or when the node's stream does not parse, the node's answers are
/// no longer followed (no refusals, no handle paths; the requests are still
/// audited as asked). The node is not the one audited: its client gets
/// what it sent either way.
#[derive(Debug, Default)]
pub struct Outcomes {
    packets: Packets,
    /// Ids of the client's requests not answered yet.
    waiting: std::collections::HashSet<u32>,
    /// The audited ones among them.
    asked: std::collections::HashMap<u32, FileOp>,
    /// The paths of handles (hex, whole) the node gave for opens and
    /// opendirs, until the client closes them.
    handles: std::collections::HashMap<String, String>,
    /// Bytes of text in `asked` and `handles`.
    held: usize,
    /// An answer's audited request, between its header and its body.
    answering: Option<FileOp>,
    refused: Vec<Refused>,
    failed: bool,
}

/// Most requests awaiting answers that are followed per channel.
const MAX_WAITING: usize = 65_536;
/// Most bytes of paths [`Outcomes`] holds per channel.
const MAX_HELD: usize = 256 * 1024;

impl Outcomes {
    /// The client sent a request with this id.
    fn sent(&mut self, id: u32) -> Result<(), String> {
        if self.failed {
            return Ok(());
        }
        if self.waiting.len() >= MAX_WAITING {
            self.stop();
            return Ok(());
        }
        if !self.waiting.insert(id) {
            return Err(format!("request id {id} used again before its answer"));
        }
        Ok(())
    }

    /// The client asked for `op`: its answer is awaited. A handle it names
    /// is replaced by the handle's path when the node gave one.
    fn asked(&mut self, op: &mut FileOp) {
        if self.failed {
            return;
        }
        if let Some(path) = op
            .path
            .strip_prefix(HANDLE_PREFIX)
            .and_then(|h| self.handles.get(h))
        {
            op.path = path.clone();
        }
        self.held += op_weight(op);
        if self.held > MAX_HELD {
            self.stop();
            return;
        }
        self.asked.insert(op.id, op.clone());
    }

    /// The client closed a handle: its path is forgotten (the node may give
    /// the same handle for another file).
    fn closed(&mut self, handle: &str) {
        if let Some(path) = self.handles.remove(handle) {
            self.held = self.held.saturating_sub(handle.len() + path.len());
        }
    }

    /// Stops following the node's answers, and forgets what was held.
    pub fn stop(&mut self) {
        *self = Self {
            failed: true,
            refused: std::mem::take(&mut self.refused),
            ..Self::default()
        };
    }

    /// The refusals completed by what the node sent.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Refused> {
        if self.failed {
            return Vec::new();
        }
        let mut packets = std::mem::take(&mut self.packets);
        // The node's data may be as long as a client asks to read.
        let fed = packets.feed(data, 16 * MAX_PACKET, self);
        self.packets = packets;
        let refused = std::mem::take(&mut self.refused);
        if fed.is_err() {
            self.stop();
        }
        refused
    }
}

fn op_weight(op: &FileOp) -> usize {
    64 + op.path.len()
        + op.to.as_ref().map_or(0, String::len)
        + op.flags.as_ref().map_or(0, String::len)
}

/// The node's side, seen by its framer.
impl PacketSink for Outcomes {
    fn header(&mut self, kind: u8, len: usize, id: u32) -> Result<bool, String> {
        // VERSION answers INIT, which has no id.
        if kind == 2 {
            return Ok(false);
        }
        if !self.waiting.remove(&id) {
            // Not an answer to anything asked: passed over.
            return Ok(false);
        }
        self.answering = self.asked.remove(&id);
        if let Some(op) = &self.answering {
            self.held = self.held.saturating_sub(op_weight(op));
        }
        let hold = match kind {
            HANDLE => true,
            STATUS => self.answering.is_some(),
            _ => false,
        };
        if hold && len > MAX_PACKET {
            return Err(format!("an answer of {len} bytes (at most {MAX_PACKET})"));
        }
        Ok(hold)
    }

    fn packet(&mut self, kind: u8, body: &[u8]) -> Result<(), String> {
        let mut r = Fields { rest: body, kind };
        r.u32()?;
        let op = self.answering.take();
        if kind == HANDLE {
            let handle = r.handle()?;
            // A handle given again stands for the file of this answer, or
            // (for a request not audited) for no file known here.
            self.closed(&handle);
            if let Some(op) = op {
                self.held += handle.len() + op.path.len();
                if self.held > MAX_HELD {
                    self.stop();
                    return Ok(());
                }
                self.handles.insert(handle, op.path);
            }
            return Ok(());
        }
        let Some(op) = op else {
            return Ok(());
        };
        let code = r.u32()?;
        if code != 0 {
            let message = r.text().unwrap_or_default();
            let mut error = status_name(code);
            if !message.is_empty() {
                error = format!("{error}: {message}");
            }
            self.refused.push(Refused { op, error });
        }
        Ok(())
    }
}

/// SSH_FX_* status codes, named.
fn status_name(code: u32) -> String {
    match code {
        1 => "end of file".into(),
        2 => "no such file".into(),
        3 => "permission denied".into(),
        4 => "failure".into(),
        5 => "bad message".into(),
        8 => "operation unsupported".into(),
        n => format!("status {n}"),
    }
}

/// How an fsetstat names a handle in [`FileOp::path`].
const HANDLE_PREFIX: &str = "handle ";

fn audited(kind: u8) -> bool {
    matches!(
        kind,
        OPEN | SETSTAT
            | FSETSTAT
            | OPENDIR
            | REMOVE
            | MKDIR
            | RMDIR
            | RENAME
            | SYMLINK
            | LINK
            | EXTENDED
    )
}

/// The body of a packet of an audited type (after its type byte).
fn parse(kind: u8, body: &[u8]) -> Result<Option<FileOp>, String> {
    let mut r = Fields { rest: body, kind };
    let id = r.u32()?;
    let op = |op, path, to, flags| {
        Ok(Some(FileOp {
            id,
            op,
            path,
            to,
            flags,
        }))
    };
    match kind {
        OPEN => {
            let path = r.text()?;
            let flags = open_flags(r.u32()?);
            op("open", path, None, Some(flags))
        }
        SETSTAT => op("setstat", r.text()?, None, Some(r.attrs())),
        // A handle names a file opened before (its open is on the record).
        FSETSTAT => op(
            "fsetstat",
            format!("{HANDLE_PREFIX}{}", r.handle()?),
            None,
            Some(r.attrs()),
        ),
        OPENDIR => op("opendir", r.text()?, None, None),
        REMOVE => op("remove", r.text()?, None, None),
        MKDIR => op("mkdir", r.text()?, None, None),
        RMDIR => op("rmdir", r.text()?, None, None),
        RENAME => op("rename", r.text()?, Some(r.text()?), None),
        SYMLINK => op("symlink", r.text()?, Some(r.text()?), None),
        // Version 6: the new link's path, then the existing one.
        LINK => op("link", r.text()?, Some(r.text()?), None),
        _ => {
            let name = r.text()?;
            match name.as_str() {
                "posix-rename@openssh.com" => op("rename", r.text()?, Some(r.text()?), None),
                "hardlink@openssh.com" => op("link", r.text()?, Some(r.text()?), None),
                "lsetstat@openssh.com" => op("setstat", r.text()?, None, Some(r.attrs())),
                n if READ_ONLY_EXTENSIONS.contains(&n) => Ok(None),
                _ => op("extended", name, None, None),
            }
        }
    }
}

/// SSH_FXF_* bits, named.
fn open_flags(pflags: u32) -> String {
    const NAMES: [(u32, &str); 6] = [
        (0x01, "read"),
        (0x02, "write"),
        (0x04, "append"),
        (0x08, "create"),
        (0x10, "truncate"),
        (0x20, "exclusive"),
    ];
    let mut named: Vec<String> = NAMES
        .iter()
        .filter(|(bit, _)| pflags & bit != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    let other = pflags & !0x3f;
    if other != 0 {
        named.push(format!("0x{other:x}"));
    }
    if named.is_empty() {
        "none".into()
    } else {
        named.join(",")
    }
}

/// The fields of one packet's body.
struct Fields<'a> {
    rest: &'a [u8],
    kind: u8,
}

impl Fields<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        if self.rest.len() < n {
            return Err(format!("packet type {} ends inside its {what}", self.kind));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4, "fields")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A handle, in hex, whole (at most [`MAX_HANDLE`] bytes).
    fn handle(&mut self) -> Result<String, String> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        let b = self.take(n, "strings")?;
        if b.len() > MAX_HANDLE {
            return Err(format!(
                "a handle of {} bytes (at most {MAX_HANDLE})",
                b.len()
            ));
        }
        Ok(b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// The attributes a setstat sets, named: `mode=4755,uid=0,gid=0`.
    /// What does not parse is named as such (the node decides).
    fn attrs(&mut self) -> String {
        let mut named = Vec::new();
        let mut read = || -> Result<(), String> {
            let flags = self.u32()?;
            if flags & 0x1 != 0 {
                let hi = self.u32()?;
                let lo = self.u32()?;
                named.push(format!("size={}", (u64::from(hi) << 32) | u64::from(lo)));
            }
            if flags & 0x2 != 0 {
                let uid = self.u32()?;
                let gid = self.u32()?;
                named.push(format!("uid={uid},gid={gid}"));
            }
            if flags & 0x4 != 0 {
                named.push(format!("mode={:o}", self.u32()? & 0o7777));
            }
            if flags & 0x8 != 0 {
                self.u32()?;
                self.u32()?;
                named.push("times".into());
            }
            if flags & 0x8000_0000 != 0 {
                named.push("extended".into());
            }
            Ok(())
        };
        if read().is_err() {
            named.push("(attributes not understood)".into());
        }
        if named.is_empty() {
            "none".into()
        } else {
            named.join(",")
        }
    }

    /// A string, as text (lossy UTF-8), at most [`MAX_TEXT`] bytes kept.
    fn text(&mut self) -> Result<String, String> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        let b = self.take(n, "strings")?;
        let kept = &b[..b.len().min(MAX_TEXT)];
        let mut s = String::from_utf8_lossy(kept).into_owned();
        if b.len() > MAX_TEXT {
            s.push('…');
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sftp_session_is_told_by_its_init_packet() {
        let init = [0, 0, 0, 5, 1, 0, 0, 0, 3];
        assert_eq!(opens_like_sftp(&init), Some(true));
        // In pieces: undecided while each fits, then told.
        assert_eq!(opens_like_sftp(&[]), None);
        assert_eq!(opens_like_sftp(&init[..4]), None);
        assert_eq!(opens_like_sftp(&init[..8]), None);
        assert_eq!(opens_like_sftp(&[0, 0, 0, 5, 1, 0, 0, 0, 6, 9]), Some(true));
        assert_eq!(opens_like_sftp(&[0, 0, 0, 5, 1, 0, 0, 0, 7]), Some(false));
        assert_eq!(opens_like_sftp(&[0, 0, 0, 5, 1, 0, 1]), Some(false));
        // A shell's input, or another packet first: not SFTP.
        assert_eq!(opens_like_sftp(b"ls -l\n"), Some(false));
        assert_eq!(opens_like_sftp(&[0, 0, 0, 9, 3]), Some(false));
        assert_eq!(opens_like_sftp(&[0, 1]), Some(false));
    }
    use proptest::prelude::*;

    /// Answers not followed: the client's stream is read for what it
    /// asks, whatever its ids.
    fn quiet() -> Outcomes {
        let mut o = Outcomes::default();
        o.stop();
        o
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(kind);
        v.extend_from_slice(body);
        v
    }

    fn with_id(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut v = 7u32.to_be_bytes().to_vec();
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    }

    fn open(path: &str, flags: u32) -> Vec<u8> {
        packet(
            OPEN,
            &with_id(&[
                string(path.as_bytes()),
                flags.to_be_bytes().to_vec(),
                0u32.to_be_bytes().to_vec(), // attrs: no fields
            ]),
        )
    }

    fn write(len: usize) -> Vec<u8> {
        let mut body = with_id(&[string(b"h1"), 0u64.to_be_bytes().to_vec()]);
        body.extend_from_slice(&string(&vec![b'x'; len]));
        packet(6, &body)
    }

    fn session() -> (Vec<u8>, Vec<FileOp>) {
        let mut s = packet(1, &3u32.to_be_bytes()); // INIT
        s.extend(open("/srv/upload.bin", 0x02 | 0x08 | 0x10));
        s.extend(write(40_000));
        s.extend(packet(4, &with_id(&[string(b"h1")]))); // CLOSE
        s.extend(packet(17, &with_id(&[string(b"/srv")]))); // STAT
        s.extend(packet(
            RENAME,
            &with_id(&[string(b"/srv/a"), string(b"/srv/b")]),
        ));
        s.extend(packet(
            EXTENDED,
            &with_id(&[string(b"statvfs@openssh.com"), string(b"/")]),
        ));
        s.extend(packet(
            EXTENDED,
            &with_id(&[
                string(b"posix-rename@openssh.com"),
                string(b"/srv/b"),
                string(b"/srv/c"),
            ]),
        ));
        s.extend(packet(REMOVE, &with_id(&[string(b"/srv/c")])));
        s.extend(packet(
            EXTENDED,
            &with_id(&[string(b"copy-data"), string(b"h1")]),
        ));
        let ops = vec![
            FileOp {
                id: 7,
                op: "open",
                path: "/srv/upload.bin".into(),
                to: None,
                flags: Some("write,create,truncate".into()),
            },
            FileOp {
                id: 7,
                op: "rename",
                path: "/srv/a".into(),
                to: Some("/srv/b".into()),
                flags: None,
            },
            FileOp {
                id: 7,
                op: "rename",
                path: "/srv/b".into(),
                to: Some("/srv/c".into()),
                flags: None,
            },
            FileOp {
                id: 7,
                op: "remove",
                path: "/srv/c".into(),
                to: None,
                flags: None,
            },
            FileOp {
                id: 7,
                op: "extended",
                path: "copy-data".into(),
                to: None,
                flags: None,
            },
        ];
        (s, ops)
    }

    #[test]
    fn file_operations_are_read_and_the_rest_passed_over() {
        let (stream, want) = session();
        assert_eq!(Reader::default().feed(&stream, &mut quiet()).unwrap(), want);
        assert_eq!(
            want[0].describe(),
            "open /srv/upload.bin (write,create,truncate)"
        );
        assert_eq!(want[1].describe(), "rename /srv/a -> /srv/b");
    }

    #[test]
    fn a_write_is_passed_over_without_being_held() {
        let mut r = Reader::default();
        let w = write(MAX_PACKET - 100);
        for chunk in w.chunks(1000) {
            assert!(r.feed(chunk, &mut quiet()).unwrap().is_empty());
            assert!(r.packets.buf.len() <= HEADER, "{}", r.packets.buf.len());
        }
        let ops = r.feed(&open("/x", 1), &mut quiet()).unwrap();
        assert_eq!(ops[0].flags.as_deref(), Some("read"));
    }

    #[test]
    fn malformed_streams_are_refused_and_stay_refused() {
        let mut r = Reader::default();
        let big = ((MAX_PACKET + 1) as u32).to_be_bytes();
        let e = r
            .feed(&[&big[..], &[6]].concat(), &mut quiet())
            .unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        assert_eq!(r.feed(&open("/x", 1), &mut quiet()), Err(e));

        let mut r = Reader::default();
        assert!(
            r.feed(&[0, 0, 0, 0, 3], &mut quiet()).is_err(),
            "an empty packet"
        );

        // A path longer than its packet.
        let mut body = with_id(&[]);
        body.extend_from_slice(&100u32.to_be_bytes());
        body.extend_from_slice(b"/short");
        let e = Reader::default()
            .feed(&packet(REMOVE, &body), &mut quiet())
            .unwrap_err();
        assert!(e.to_string().contains("ends inside"), "{e}");
        // An open without its flags.
        let p = packet(OPEN, &with_id(&[string(b"/x")]));
        assert!(Reader::default().feed(&p, &mut quiet()).is_err());
    }

    #[test]
    fn attribute_changes_are_named_also_through_a_handle() {
        let attrs = |flags: u32, fields: &[u32]| {
            let mut v = flags.to_be_bytes().to_vec();
            for f in fields {
                v.extend_from_slice(&f.to_be_bytes());
            }
            v
        };
        let mut s = packet(
            FSETSTAT,
            &with_id(&[string(&[0, 0, 0, 1]), attrs(0x4, &[0o104755])]),
        );
        s.extend(packet(
            SETSTAT,
            &with_id(&[
                string(b"/etc/x"),
                attrs(0x1 | 0x2 | 0x8, &[0, 9, 0, 0, 1, 2]),
            ]),
        ));
        s.extend(packet(
            SETSTAT,
            &with_id(&[string(b"/etc/y"), attrs(0x4, &[])]),
        ));
        s.extend(packet(
            LINK,
            &with_id(&[string(b"/new"), string(b"/old"), vec![0]]),
        ));
        let ops = Reader::default().feed(&s, &mut quiet()).unwrap();
        let described: Vec<String> = ops.iter().map(FileOp::describe).collect();
        assert_eq!(
            described,
            [
                "fsetstat handle 00000001 (mode=4755)",
                "setstat /etc/x (size=9,uid=0,gid=0,times)",
                "setstat /etc/y ((attributes not understood))",
                "link /new -> /old",
            ]
        );
    }

    #[test]
    fn packet_types_no_client_sends_are_refused() {
        for kind in [0u8, 2, 24, 101, 199, 201, 255] {
            let e = Reader::default()
                .feed(&packet(kind, &with_id(&[])), &mut quiet())
                .unwrap_err();
            assert!(e.to_string().contains("unknown type"), "{kind}: {e}");
        }
    }

    #[test]
    fn long_paths_are_clipped_and_odd_flags_named() {
        let long = "a".repeat(MAX_TEXT + 10);
        let ops = Reader::default()
            .feed(&open(&long, 0x40 | 0x01), &mut quiet())
            .unwrap();
        assert_eq!(ops[0].path.len(), MAX_TEXT + '…'.len_utf8());
        assert_eq!(ops[0].flags.as_deref(), Some("read,0x40"));
        let ops = Reader::default()
            .feed(&open("/x", 0), &mut quiet())
            .unwrap();
        assert_eq!(ops[0].flags.as_deref(), Some("none"));
    }

    fn answer(kind: u8, id: u32, parts: &[Vec<u8>]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        for p in parts {
            body.extend_from_slice(p);
        }
        packet(kind, &body)
    }

    fn status(id: u32, code: u32, message: &str) -> Vec<u8> {
        answer(
            STATUS,
            id,
            &[
                code.to_be_bytes().to_vec(),
                string(message.as_bytes()),
                string(b""),
            ],
        )
    }

    fn asked(o: &mut Outcomes, request: &[u8]) -> FileOp {
        let mut ops = Reader::default().feed(request, o).unwrap();
        assert_eq!(ops.len(), 1);
        ops.remove(0)
    }

    fn with(id: u32, mut p: Vec<u8>) -> Vec<u8> {
        p[5..9].copy_from_slice(&id.to_be_bytes());
        p
    }

    /// The node's answers: refusals of what was asked, with the node's
    /// reason; handles' paths for what is done through them; data, names
    /// and successes passed over.
    fn node_session() -> (Vec<u8>, Outcomes, Vec<Refused>) {
        let mut o = Outcomes::default();
        asked(&mut o, &with(1, open("/srv/a", 0x02 | 0x08)));
        let remove = asked(
            &mut o,
            &with(2, packet(REMOVE, &with_id(&[string(b"/etc/passwd")]))),
        );
        asked(
            &mut o,
            &with(
                3,
                packet(
                    MKDIR,
                    &with_id(&[string(b"/srv/d"), 0u32.to_be_bytes().to_vec()]),
                ),
            ),
        );
        let mut node = packet(2, &3u32.to_be_bytes()); // VERSION
        node.extend(answer(HANDLE, 1, &[string(&[0, 0, 0, 7])]));
        node.extend(answer(103, 9, &[string(&vec![b'x'; 70_000])])); // DATA
        node.extend(status(2, 3, "Permission denied"));
        node.extend(status(3, 0, "Success"));
        node.extend(status(99, 4, "not asked for"));
        let want = vec![Refused {
            op: remove,
            error: "permission denied: Permission denied".into(),
        }];
        (node, o, want)
    }

    #[test]
    fn the_nodes_refusals_and_handles_are_read() {
        let (node, mut o, want) = node_session();
        assert_eq!(o.feed(&node), want);
        // The handle the node gave names the file it opened.
        let mut fset = packet(
            FSETSTAT,
            &with_id(&[
                string(&[0, 0, 0, 7]),
                0x4u32.to_be_bytes().to_vec(),
                0o644u32.to_be_bytes().to_vec(),
            ]),
        );
        fset = with(4, fset);
        let op = asked(&mut o, &fset);
        assert_eq!(op.describe(), "fsetstat /srv/a (mode=644)");
        // One it did not give stays a handle.
        let op = asked(
            &mut o,
            &with(
                5,
                packet(
                    FSETSTAT,
                    &with_id(&[string(&[9]), 0u32.to_be_bytes().to_vec()]),
                ),
            ),
        );
        assert_eq!(op.path, "handle 09");
        let refused = o.feed(&[status(4, 4, ""), status(5, 2, "gone")].concat());
        assert_eq!(
            refused
                .iter()
                .map(|r| (r.op.path.as_str(), r.error.as_str()))
                .collect::<Vec<_>>(),
            [("/srv/a", "failure"), ("handle 09", "no such file: gone")]
        );
        // Answered once: a second answer of the same id is not a refusal.
        assert!(o.feed(&status(4, 4, "")).is_empty());
        // Data passes unheld.
        let mut o = Outcomes::default();
        for chunk in answer(103, 1, &[string(&vec![0; MAX_PACKET])]).chunks(4096) {
            assert!(o.feed(chunk).is_empty());
            assert!(o.packets.buf.len() <= HEADER);
        }
        // A node stream that does not parse is no longer followed.
        let mut o = Outcomes::default();
        asked(&mut o, &with(1, packet(REMOVE, &with_id(&[string(b"/x")]))));
        assert!(o.feed(&[0, 0, 0, 0, 101]).is_empty());
        assert!(o.feed(&status(1, 3, "")).is_empty());
    }

    #[test]
    fn answers_cannot_be_pinned_on_another_request() {
        // An id used again before its answer (here: a STAT, whose "no such
        // file" would pass for the open's) is refused.
        let mut o = Outcomes::default();
        let stat = with(2, packet(17, &with_id(&[string(b"/nonexistent")])));
        let open = with(2, open("/etc/sudoers", 0x02));
        let e = Reader::default()
            .feed(&[stat, open].concat(), &mut o)
            .unwrap_err();
        assert!(e.to_string().contains("request id 2 used again"), "{e}");
        // Once answered, the id is free again.
        let mut o = Outcomes::default();
        let mut r = Reader::default();
        r.feed(&with(2, packet(17, &with_id(&[string(b"/x")]))), &mut o)
            .unwrap();
        assert!(o.feed(&status(2, 2, "")).is_empty());
        r.feed(&with(2, packet(REMOVE, &with_id(&[string(b"/y")]))), &mut o)
            .unwrap();
        assert_eq!(o.feed(&status(2, 3, "")).len(), 1);
    }

    #[test]
    fn a_handle_stands_for_its_file_only_while_it_is_open() {
        let fsetstat = |id: u32, handle: &[u8]| {
            with(
                id,
                packet(
                    FSETSTAT,
                    &with_id(&[string(handle), 0u32.to_be_bytes().to_vec()]),
                ),
            )
        };
        let mut o = Outcomes::default();
        let mut r = Reader::default();
        r.feed(&with(1, open("/srv/a", 1)), &mut o).unwrap();
        o.feed(&answer(HANDLE, 1, &[string(b"h")]));
        assert_eq!(
            r.feed(&fsetstat(2, b"h"), &mut o).unwrap()[0].path,
            "/srv/a"
        );
        // Closed: the node may give "h" for a file opened unaudited (an
        // opendir's is, a stat's handle is not) or not at all.
        r.feed(&with(3, packet(CLOSE, &with_id(&[string(b"h")]))), &mut o)
            .unwrap();
        assert_eq!(
            r.feed(&fsetstat(4, b"h"), &mut o).unwrap()[0].path,
            "handle 68"
        );
        // Given again for a request not audited: no file known here.
        r.feed(&with(5, open("/srv/b", 1)), &mut o).unwrap();
        o.feed(&answer(HANDLE, 5, &[string(b"g")]));
        r.feed(&with(6, packet(17, &with_id(&[string(b"/srv")]))), &mut o)
            .unwrap();
        o.feed(&answer(HANDLE, 6, &[string(b"g")]));
        assert_eq!(
            r.feed(&fsetstat(7, b"g"), &mut o).unwrap()[0].path,
            "handle 67"
        );
        // Handles are whole up to their limit, and no longer.
        let long = vec![1u8; MAX_HANDLE + 1];
        assert!(Reader::default()
            .feed(&fsetstat(8, &long), &mut quiet())
            .is_err());
    }

    #[test]
    fn what_is_held_is_bounded_and_then_answers_are_not_followed() {
        let mut o = Outcomes::default();
        let mut r = Reader::default();
        let path = "p".repeat(MAX_TEXT);
        let mut id = 0;
        while !o.failed {
            id += 1;
            r.feed(
                &with(id, packet(REMOVE, &with_id(&[string(path.as_bytes())]))),
                &mut o,
            )
            .unwrap();
        }
        assert!(id as usize <= MAX_HELD / MAX_TEXT + 1, "{id}");
        assert!(o.asked.is_empty() && o.held == 0);
        // The requests are still read, and nothing is pinned on them.
        let ops = r
            .feed(&with(1, packet(REMOVE, &with_id(&[string(b"/z")]))), &mut o)
            .unwrap();
        assert_eq!(ops.len(), 1);
        assert!(o.feed(&status(1, 3, "")).is_empty());
    }

    proptest! {
        /// However the node's stream is cut into pieces, the same refusals
        /// come out.
        #[test]
        fn node_answers_in_pieces_of_any_size_read_the_same(cuts in proptest::collection::vec(1usize..5000, 1..40)) {
            let (stream, mut o, want) = node_session();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut cuts = cuts.into_iter().cycle();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(1).min(rest.len());
                got.extend(o.feed(&rest[..n]));
                rest = &rest[n..];
            }
            prop_assert_eq!(got, want);
        }

        /// Arbitrary answers never panic.
        #[test]
        fn arbitrary_answers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut o = Outcomes::default();
            let _ = asked(&mut o, &open("/x", 1));
            let _ = o.feed(&data);
        }

        /// However the stream is cut into pieces, the same operations come
        /// out, in order.
        #[test]
        fn pieces_of_any_size_read_the_same(cuts in proptest::collection::vec(1usize..5000, 1..40)) {
            let (stream, want) = session();
            let mut r = Reader::default();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut cuts = cuts.into_iter().cycle();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(1).min(rest.len());
                got.extend(r.feed(&rest[..n], &mut quiet()).unwrap());
                rest = &rest[n..];
            }
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic: they read, or are refused.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut r = Reader::default();
            let first = r.feed(&data, &mut quiet());
            if first.is_err() {
                prop_assert!(r.feed(b"more", &mut quiet()).is_err());
            }
        }

        /// Packets of every audited type with arbitrary bodies (strings
        /// and attributes that run short or long) never panic, and a
        /// packet after them is read in step.
        #[test]
        fn arbitrary_bodies_never_panic(
            kind in prop::sample::select(vec![OPEN, SETSTAT, FSETSTAT, OPENDIR, REMOVE, MKDIR, RMDIR, RENAME, SYMLINK, LINK, EXTENDED]),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut r = Reader::default();
            let mut s = packet(kind, &body);
            s.extend(open("/next", 1));
            if let Ok(ops) = r.feed(&s, &mut quiet()) {
                prop_assert_eq!(ops.last().map(|o| o.path.as_str()), Some("/next"));
            }
        }
    }
}
