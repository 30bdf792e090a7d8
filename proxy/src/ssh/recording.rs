//! Session recordings as asciicast v2 (`<data_dir>/recordings/<session>.cast`).
//!
//! The first line is a JSON header (`version`, `width`, `height`,
//! `timestamp`, `env`, and a `wicket` object naming session, user, node,
//! login and request IDs); every later line is one event
//! `[seconds, code, data]`: `o` output, `i` input (when `session.record_input`
//! is on), `r` resize (`"COLSxROWS"`), `m` marker (exec commands,
//! subsystems, the reason a session ended). Events are appended to a
//! buffered file as they happen and flushed at least every second
//! ([`Recorder::flush_if_dirty`], driven by the session), so a crash of
//! wicketd loses at most the last second. `asciinema play` and `wicket play`
//! both read it.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Who and what a recording is about: the `wicket` object of the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingMeta {
    pub session_id: String,
    pub user: String,
    pub node: String,
    pub login: String,
    pub request_ids: Vec<String>,
    /// Unix seconds.
    pub started: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    width: u32,
    height: u32,
    timestamp: i64,
    #[serde(default)]
    title: String,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    wicket: RecordingMeta,
}

/// The directory holding recordings.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("recordings")
}

/// Session IDs are UUIDs; anything else never names a file.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The path of a session's recording.
pub fn path(data_dir: &Path, session_id: &str) -> Option<PathBuf> {
    valid_id(session_id).then(|| dir(data_dir).join(format!("{session_id}.cast")))
}

/// Reads a recording's header (a line of at most 64 KiB).
pub fn read_meta(path: &Path) -> Option<RecordingMeta> {
    let f = File::open(path).ok()?;
    let mut line = String::new();
    BufReader::new(f.take(64 * 1024))
        .read_line(&mut line)
        .ok()?;
    serde_json::from_str::<Header>(&line).ok().map(|h| h.wicket)
}

/// Every recording's header, newest first.
pub fn list(data_dir: &Path) -> Vec<RecordingMeta> {
    let Ok(rd) = fs::read_dir(dir(data_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<RecordingMeta> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cast"))
        .filter_map(|e| read_meta(&e.path()))
        .collect();
    out.sort_by(|a, b| {
        b.started
            .cmp(&a.started)
            .then(a.session_id.cmp(&b.session_id))
    });
    out
}

/// The recordings here whose session started before `before` (Unix
/// seconds) and whose file was last written before it too (the session
/// ended then), by the header of the file each is named after: a file named
/// after one session but holding another's is never taken for either.
pub fn ended_before(data_dir: &Path, before: i64) -> Vec<RecordingMeta> {
    list(data_dir)
        .into_iter()
        .filter(|m| m.started < before && is_expired(data_dir, m, before))
        .collect()
}

/// Whether `m` is the header of the file named after its session, and that
/// file was last written before `before`.
fn is_expired(data_dir: &Path, m: &RecordingMeta, before: i64) -> bool {
    let Some(p) = path(data_dir, &m.session_id) else {
        return false;
    };
    if read_meta(&p).as_ref() != Some(m) {
        return false;
    }
    let written = fs::metadata(&p)
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok());
    written.is_some_and(|w| w < before)
}

/// Deletes the recording of session `id` from the data directory (one
/// [`ended_before`] found). Logs a failure.
pub fn remove(data_dir: &Path, id: &str) -> bool {
    let Some(p) = path(data_dir, id) else {
        return false;
    };
    match fs::remove_file(&p) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "cannot delete an expired recording");
            false
        }
    }
}

/// Splits off a trailing incomplete UTF-8 sequence so that a character cut
/// between two reads is not turned into replacement characters.
fn take_text(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let keep = match std::str::from_utf8(carry) {
        Ok(_) => 0,
        Err(e) if e.error_len().is_none() => carry.len() - e.valid_up_to(),
        Err(_) => {
            // Invalid bytes somewhere: keep only an incomplete tail, if any.
            let mut k = 0;
            for n in 1..=3.min(carry.len()) {
                let tail = &carry[carry.len() - n..];
                if let Err(e) = std::str::from_utf8(tail) {
                    if e.error_len().is_none() && e.valid_up_to() == 0 {
                        k = n;
                    }
                }
            }
            k
        }
    };
    let rest = carry.split_off(carry.len() - keep);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = rest;
    text
}

struct Inner {
    out: Option<BufWriter<File>>,
    dirty: bool,
    carry_out: Vec<u8>,
    carry_in: Vec<u8>,
    /// Bytes written (or buffered) so far, header included.
    written: u64,
    /// Why nothing more is recorded: the limit was reached or the file
    /// could not be written.
    failed: Option<String>,
}

/// One session's recording, written incrementally.
pub struct Recorder {
    inner: Mutex<Inner>,
    /// `Inner::failed` is set: read on every chunk without the lock.
    has_failed: AtomicBool,
    started: Instant,
    /// Most bytes the file may take (`session.max_recording_bytes`).
    limit: u64,
    pub path: PathBuf,
    pub record_input: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates the file (0600) and writes the header.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        data_dir: &Path,
        meta: &RecordingMeta,
        width: u32,
        height: u32,
        term: Option<&str>,
        record_input: bool,
        started: Instant,
        limit: u64,
    ) -> std::io::Result<Recorder> {
        let path = path(data_dir, &meta.session_id)
            .ok_or_else(|| std::io::Error::other("invalid session ID"))?;
        fs::create_dir_all(dir(data_dir))?;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut out = BufWriter::with_capacity(16 * 1024, f);
        let mut env = std::collections::BTreeMap::new();
        if let Some(t) = term {
            env.insert("TERM".to_owned(), t.to_owned());
        }
        let header = Header {
            version: 2,
            width: width.clamp(1, 1000),
            height: height.clamp(1, 1000),
            timestamp: meta.started,
            title: format!(
                "{}@{} by {} ({})",
                meta.login,
                meta.node,
                meta.user,
                if meta.request_ids.is_empty() {
                    "standing roles".to_owned()
                } else {
                    format!("requests {}", meta.request_ids.join(","))
                }
            ),
            env,
            wicket: meta.clone(),
        };
        let mut line = serde_json::to_vec(&header)?;
        line.push(b'\n');
        out.write_all(&line)?;
        out.flush()?;
        Ok(Recorder {
            has_failed: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                out: Some(out),
                dirty: false,
                carry_out: Vec::new(),
                carry_in: Vec::new(),
                written: line.len() as u64,
                failed: None,
            }),
            started,
            limit,
            path,
            record_input,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes one event; returns false when it was not recorded (and
    /// nothing after it will be: see [`Recorder::failure`]).
    fn event(&self, inner: &mut Inner, t: f64, code: &str, data: &str) -> bool {
        if inner.failed.is_some() {
            return false;
        }
        let Some(out) = inner.out.as_mut() else {
            return false;
        };
        let mut line = serde_json::to_string(&(round(t), code, data)).unwrap_or_default();
        line.push('\n');
        let failed = if inner.written + line.len() as u64 > self.limit {
            // The last line says why the recording stops (a marker may go
            // past the limit by its own length).
            let why = format!(
                "the session recording reached its limit of {} bytes",
                self.limit
            );
            let mut marker =
                serde_json::to_string(&(round(t), "m", format!("{why}; nothing more is recorded")))
                    .unwrap_or_default();
            marker.push('\n');
            let _ = out.write_all(marker.as_bytes()).and_then(|_| out.flush());
            Some(why)
        } else {
            match out.write_all(line.as_bytes()) {
                Ok(()) => {
                    inner.written += line.len() as u64;
                    None
                }
                Err(e) => Some(format!("cannot write the session recording: {e}")),
            }
        };
        inner.dirty = true;
        match failed {
            None => true,
            Some(why) => {
                self.fail(inner, why);
                false
            }
        }
    }

    /// Nothing more is recorded, for `why` (logged once, here).
    fn fail(&self, inner: &mut Inner, why: String) {
        tracing::warn!(path = %self.path.display(), "{why}");
        inner.failed = Some(why);
        self.has_failed.store(true, Ordering::Release);
    }

    /// Why nothing more is recorded, once that is so.
    pub fn failure(&self) -> Option<String> {
        if !self.failed() {
            return None;
        }
        self.lock().failed.clone()
    }

    /// Whether nothing more is recorded (cheap: no lock).
    pub fn failed(&self) -> bool {
        self.has_failed.load(Ordering::Acquire)
    }

    fn elapsed(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Output from the node (stdout or stderr); false when it is not on
    /// the record (see [`Recorder::failure`]).
    pub fn output(&self, now: Instant, data: &[u8]) -> bool {
        let t = self.elapsed(now);
        let mut g = self.lock();
        let mut carry = std::mem::take(&mut g.carry_out);
        let text = take_text(&mut carry, data);
        g.carry_out = carry;
        if text.is_empty() {
            return g.failed.is_none();
        }
        self.event(&mut g, t, "o", &text)
    }

    /// Input from the user (only when `record_input`); false when it is
    /// not on the record.
    pub fn input(&self, now: Instant, data: &[u8]) -> bool {
        if !self.record_input {
            return true;
        }
        let t = self.elapsed(now);
        let mut g = self.lock();
        let mut carry = std::mem::take(&mut g.carry_in);
        let text = take_text(&mut carry, data);
        g.carry_in = carry;
        if text.is_empty() {
            return g.failed.is_none();
        }
        self.event(&mut g, t, "i", &text)
    }

    pub fn resize(&self, now: Instant, cols: u32, rows: u32) {
        let t = self.elapsed(now);
        self.event(&mut self.lock(), t, "r", &format!("{cols}x{rows}"));
    }

    pub fn marker(&self, now: Instant, text: &str) {
        let t = self.elapsed(now);
        self.event(&mut self.lock(), t, "m", text);
    }

    /// Flushes buffered events to the file if any were written since the
    /// last flush. The session calls this at least once a second.
    /// A failed flush (a full disk shows here first) is a failure.
    pub fn flush_if_dirty(&self) {
        let mut g = self.lock();
        if g.dirty {
            g.dirty = false;
            let flushed = g.out.as_mut().map(|out| out.flush());
            if let (Some(Err(e)), None) = (flushed, &g.failed) {
                self.fail(&mut g, format!("cannot write the session recording: {e}"));
            }
        }
    }

    /// Flushes and closes the file.
    pub fn close(&self) {
        let mut g = self.lock();
        if let Some(mut out) = g.out.take() {
            let _ = out.flush();
            let _ = out.get_ref().sync_all();
        }
    }
}

fn round(t: f64) -> f64 {
    (t * 1_000_000.0).round() / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_reads_is_kept_whole() {
        let mut carry = Vec::new();
        let s = "héllo ✓".as_bytes();
        let (a, b) = s.split_at(2); // inside "é"
        assert_eq!(take_text(&mut carry, a), "h");
        assert_eq!(take_text(&mut carry, b), "éllo ✓");
        assert!(carry.is_empty());
        assert_eq!(take_text(&mut carry, b"\xff\x00ok"), "\u{fffd}\u{0}ok");
    }

    fn meta(session_id: &str, request_ids: &[&str]) -> RecordingMeta {
        RecordingMeta {
            session_id: session_id.into(),
            user: "alice".into(),
            node: "db-1".into(),
            login: "root".into(),
            request_ids: request_ids.iter().map(|r| r.to_string()).collect(),
            started: 1_700_000_000,
        }
    }

    #[test]
    fn recording_has_header_events_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let meta = meta("0b5e7a4e-1111-4222-8333-944455556666", &["r1"]);
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let r = Recorder::create(
            dir.path(),
            &meta,
            100,
            30,
            Some("xterm"),
            false,
            t0,
            1 << 20,
        )
        .unwrap();
        r.output(t0, b"hello\r\n");
        r.input(t0, b"secret"); // not recorded: input is off
        r.resize(t0, 120, 40);
        r.marker(t0, "exec: ls");
        r.flush_if_dirty();
        let text = fs::read_to_string(&r.path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let h: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(h["version"], 2);
        assert_eq!(h["width"], 100);
        assert_eq!(h["wicket"]["request_ids"][0], "r1");
        assert_eq!(lines[1], r#"[0.0,"o","hello\r\n"]"#);
        assert_eq!(lines[2], r#"[0.0,"r","120x40"]"#);
        r.close();
        assert_eq!(list(dir.path()), vec![meta]);
        assert!(path(dir.path(), "../etc/passwd").is_none());
    }

    #[test]
    fn a_recording_stops_at_its_limit_with_a_marker_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let meta = meta("0b5e7a4e-1111-4222-8333-944455556667", &[]);
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let limit = 1 << 16;
        let r = Recorder::create(dir.path(), &meta, 80, 24, None, true, t0, limit).unwrap();
        let chunk = [b'x'; 1000];
        let mut recorded = 0;
        while r.output(t0, &chunk) {
            recorded += 1;
            assert!(recorded < 100, "never stopped");
        }
        assert!(recorded >= 60, "{recorded}");
        let why = r.failure().unwrap();
        assert!(why.contains("limit of 65536 bytes"), "{why}");
        // Nothing more goes on the record, input included.
        assert!(!r.output(t0, b"extra-output"));
        assert!(!r.input(t0, b"typed-input"));
        r.marker(t0, "late-marker");
        r.close();
        let text = fs::read_to_string(&r.path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(
            last.contains(r#""m","the session recording reached its limit"#),
            "{last}"
        );
        assert!(text.len() as u64 <= limit + last.len() as u64 + 1);
        assert!(!text.contains("extra-output") && !text.contains("typed-input"));
        assert!(!text.contains("late-marker"));
    }
}
