//! The password prompt: a line read from the terminal without echo.
//!
//! The terminal is put in raw mode (no echo, no line editing, no signal
//! keys) before the prompt is written, and what was typed before is
//! discarded (as OpenSSH's `readpassphrase` does). So every key typed once
//! the prompt shows is read here: Ctrl-C is a key like the others, the
//! terminal is restored, and only then does the CLI exit as interrupted.
//! (rpassword, used before, raised SIGINT before it restored echo, and a
//! Ctrl-C left the user's terminal silent.) Editing keys (backspace,
//! Ctrl-U, Ctrl-W) are applied here; other control keys and escape
//! sequences (arrows; an Alt-modified key, ESC and the key) are ignored.
//!
//! SIGTERM and SIGHUP (a `kill`, a `timeout`) do not end the process while
//! the terminal is raw: they end the read, the terminal is restored, and
//! then the signal takes its default action, as `readpassphrase` re-raises
//! it. Once the prompt is over they end the process at once, as before.
//! One the process inherited as ignored (`nohup`, `trap '' HUP`) stays
//! ignored (Linux tells which; elsewhere none are taken as ignored). Call
//! it once per process, in one that does not handle these signals itself:
//! the actions it leaves end the process before a later handler's.

use anyhow::{bail, Context, Result};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions, SpecialCodeIndex};
use signal_hook::consts::{SIGHUP, SIGTERM};
use signal_hook::SigId;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wicket_api::Secret;

/// Signals from elsewhere that end the process: while the terminal is raw
/// they only end the read.
const ENDING: [i32; 2] = [SIGTERM, SIGHUP];

/// The longest password taken, in bytes.
const MAX_PASSWORD: usize = 4096;

/// What the user answered.
pub enum Answer {
    Password(Secret),
    /// Ctrl-C.
    Interrupted,
}

/// Writes `prompt` to the terminal (`/dev/tty`) and reads a password
/// there, without echo.
pub fn password(prompt: &str) -> Result<Answer> {
    let mut tty = File::options()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("opening the terminal (/dev/tty)")?;
    let saved = tcgetattr(&tty).context("reading the terminal's settings")?;
    // Before the terminal goes raw: a signal from then on finds it restored.
    let mut watch = Watch::start().context("watching for signals during the prompt")?;
    let mut raw = saved.clone();
    raw.local_modes.remove(
        LocalModes::ECHO
            | LocalModes::ECHONL
            | LocalModes::ICANON
            | LocalModes::ISIG
            | LocalModes::IEXTEN,
    );
    raw.special_codes[SpecialCodeIndex::VMIN] = 1;
    raw.special_codes[SpecialCodeIndex::VTIME] = 0;
    tcsetattr(&tty, OptionalActions::Flush, &raw).context("turning the terminal's echo off")?;
    let restore = Restore {
        tty: &tty,
        saved: &saved,
    };
    let step = read_line(&tty, &mut watch, prompt);
    drop(restore);
    // The line end the user typed was not echoed.
    let _ = tty.write_all(b"\n");
    // A signal that came during the prompt takes its default action here.
    watch.finish();
    match step? {
        Step::Done(line) => Ok(Answer::Password(Secret::new(line))),
        Step::Interrupted => Ok(Answer::Interrupted),
        Step::Eof => bail!("no password given (Ctrl-D)"),
        Step::More => bail!("the terminal closed before a password was given"),
        Step::Signalled => bail!("the prompt was ended by a signal"),
    }
}

/// The signals in `ENDING`, watched while the prompt holds the terminal.
struct Watch {
    /// Readable once one of them has come.
    wake: UnixStream,
    came: Vec<(i32, Arc<AtomicBool>)>,
    /// The prompt's own actions, removed when it is over (or, with
    /// [`Drop`], however it ends).
    ids: Vec<SigId>,
    /// Set when the prompt is over: from then on each signal takes its
    /// default action. (Those actions stay: removing the last action of a
    /// signal would leave it ignored, not back to its default.)
    over: Arc<AtomicBool>,
}

impl Watch {
    fn start() -> std::io::Result<Watch> {
        let (wake, rung) = UnixStream::pair()?;
        let over = Arc::new(AtomicBool::new(false));
        let mut watch = Watch {
            wake,
            came: Vec::new(),
            ids: Vec::new(),
            over: Arc::clone(&over),
        };
        let ignored = ignored_signals();
        for signal in ENDING {
            if ignored.contains(&signal) {
                continue;
            }
            signal_hook::flag::register_conditional_default(signal, Arc::clone(&over))?;
            let came = Arc::new(AtomicBool::new(false));
            watch
                .ids
                .push(signal_hook::flag::register(signal, Arc::clone(&came))?);
            watch.came.push((signal, came));
            watch.ids.push(signal_hook::low_level::pipe::register(
                signal,
                rung.try_clone()?,
            )?);
        }
        Ok(watch)
    }

    /// From now on the signals take their default action at once.
    fn stop(&mut self) {
        self.over.store(true, Ordering::SeqCst);
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }

    /// The terminal is restored: a signal that came during the prompt takes
    /// its default action now (which ends the process), and later ones at
    /// once.
    fn finish(mut self) {
        self.stop();
        for (signal, came) in &self.came {
            if came.load(Ordering::SeqCst) {
                let _ = signal_hook::low_level::emulate_default_handler(*signal);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The signals of `ENDING` the process inherited as ignored.
fn ignored_signals() -> Vec<i32> {
    #[cfg(target_os = "linux")]
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    #[cfg(not(target_os = "linux"))]
    let status = String::new();
    ENDING
        .into_iter()
        .filter(|&s| ignored_in(&status, s))
        .collect()
}

/// Whether Linux's `/proc/self/status` text says `signal` is ignored (its
/// `SigIgn:` mask, in hex, has bit `signal - 1`).
fn ignored_in(status: &str, signal: i32) -> bool {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    (1..=64).contains(&signal) && mask & (1 << (signal - 1)) != 0
}

/// Puts the terminal's settings back when dropped, however the read ends.
struct Restore<'a> {
    tty: &'a File,
    saved: &'a rustix::termios::Termios,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = tcsetattr(self.tty, OptionalActions::Now, self.saved);
    }
}

/// Writes the prompt, then reads keys until the line ends. `Step::More`
/// when the terminal closes first.
fn read_line(mut tty: &File, watch: &mut Watch, prompt: &str) -> Result<Step> {
    tty.write_all(prompt.as_bytes())
        .and_then(|()| tty.flush())
        .context("writing the prompt")?;
    let mut line = LineEdit::default();
    // A byte at a time: what is typed after the line end stays for the
    // next reader (as `readpassphrase` leaves it).
    let mut key = [0u8; 1];
    // Until `poll` turns out not to wait on the terminal (macOS answers
    // POLLNVAL): then the read blocks, and the signals end the process as
    // before.
    let mut polling = true;
    loop {
        while polling {
            let mut ready = [
                PollFd::new(&tty, PollFlags::IN),
                PollFd::new(&watch.wake, PollFlags::IN),
            ];
            match poll(&mut ready, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e).context("waiting for a key"),
            }
            if !ready[1].revents().is_empty() {
                return Ok(Step::Signalled);
            }
            if ready[0].revents().contains(PollFlags::NVAL) {
                watch.stop();
                polling = false;
            } else if !ready[0].revents().is_empty() {
                break;
            }
        }
        match tty.read(&mut key) {
            Ok(0) => return Ok(Step::More),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the password"),
        }
        match line.key(key[0])? {
            Step::More => {}
            done => return Ok(done),
        }
    }
}

/// Where a line stands after a key.
#[derive(Debug, PartialEq)]
enum Step {
    More,
    Done(String),
    Interrupted,
    /// Ctrl-D on an empty line.
    Eof,
    /// SIGTERM or SIGHUP came.
    Signalled,
}

/// A line being typed, key by key (bytes from a raw terminal).
#[derive(Default)]
struct LineEdit {
    line: Vec<u8>,
    escape: Escape,
}

/// Where an escape sequence (an arrow key, a function key) stands.
#[derive(Default, Clone, Copy)]
enum Escape {
    #[default]
    No,
    /// After ESC.
    Started,
    /// After `ESC [` or `ESC O`: up to a final byte.
    Sequence,
}

const CTRL_C: u8 = 0x03;
const CTRL_D: u8 = 0x04;
const BACKSPACE: u8 = 0x08;
const CTRL_U: u8 = 0x15;
const CTRL_W: u8 = 0x17;
const ESC: u8 = 0x1b;
const DEL: u8 = 0x7f;

impl LineEdit {
    fn key(&mut self, b: u8) -> Result<Step> {
        match self.escape {
            Escape::Started => {
                self.escape = if b == b'[' || b == b'O' {
                    Escape::Sequence
                } else {
                    Escape::No
                };
                return Ok(Step::More);
            }
            Escape::Sequence => {
                if (0x40..=0x7e).contains(&b) {
                    self.escape = Escape::No;
                }
                return Ok(Step::More);
            }
            Escape::No => {}
        }
        match b {
            b'\r' | b'\n' => {
                let line = String::from_utf8(std::mem::take(&mut self.line))
                    .map_err(|_| anyhow::anyhow!("the password is not UTF-8"))?;
                return Ok(Step::Done(line));
            }
            CTRL_C => return Ok(Step::Interrupted),
            CTRL_D if self.line.is_empty() => return Ok(Step::Eof),
            BACKSPACE | DEL => self.pop_char(),
            CTRL_U => self.line.clear(),
            CTRL_W => {
                while self.line.last() == Some(&b' ') {
                    self.line.pop();
                }
                while self.line.last().is_some_and(|&c| c != b' ') {
                    self.pop_char();
                }
            }
            ESC => self.escape = Escape::Started,
            b if b < 0x20 => {}
            b => {
                if self.line.len() >= MAX_PASSWORD {
                    bail!("the password is longer than {MAX_PASSWORD} bytes");
                }
                self.line.push(b);
            }
        }
        Ok(Step::More)
    }

    /// Removes the last character (all its UTF-8 bytes).
    fn pop_char(&mut self) {
        while let Some(b) = self.line.pop() {
            if b & 0xc0 != 0x80 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn typed(keys: &[u8]) -> Step {
        let mut line = LineEdit::default();
        for &b in keys {
            match line.key(b).unwrap() {
                Step::More => {}
                done => return done,
            }
        }
        Step::More
    }

    fn done(s: &str) -> Step {
        Step::Done(s.to_owned())
    }

    #[test]
    fn signals_the_process_ignores_are_read_from_its_status() {
        let status =
            "Name:\tsh\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000004001\nSigCgt:\t0\n";
        assert!(ignored_in(status, SIGHUP));
        assert!(ignored_in(status, SIGTERM));
        assert!(!ignored_in(status, 2));
        let none = "SigIgn:\t0000000000000000\n";
        assert!(!ignored_in(none, SIGTERM));
        assert!(!ignored_in("", SIGTERM));
        assert!(!ignored_in("SigIgn:\tzz\n", SIGTERM));
        // This process (the test runner) has SIGTERM at its default.
        #[cfg(target_os = "linux")]
        assert!(!ignored_signals().contains(&SIGTERM));
    }

    #[test]
    fn keys_edit_the_line() {
        assert_eq!(typed(b"hunter2\r"), done("hunter2"));
        assert_eq!(typed(b"hunter2\n"), done("hunter2"));
        assert_eq!(typed(b"hunx\x7fter2\r"), done("hunter2"));
        assert_eq!(typed(b"hunx\x08ter2\r"), done("hunter2"));
        assert_eq!(typed(b"wrong\x15right\r"), done("right"));
        assert_eq!(typed(b"two words  \x17\r"), done("two "));
        assert_eq!(typed("pässwörd\x7f\x7f\r".as_bytes()), done("pässwö"));
        // Arrows and other escape sequences, and other control keys, are
        // not part of the password.
        assert_eq!(typed(b"a\x1b[Ab\x1bOCc\x1bxd\x01\te\r"), done("abcde"));
        assert_eq!(typed(b"\x7f\x7fok\r"), done("ok"));
    }

    #[test]
    fn ctrl_c_and_ctrl_d_end_the_prompt() {
        assert_eq!(typed(b"half\x03rest\r"), Step::Interrupted);
        assert_eq!(typed(b"\x04"), Step::Eof);
        // Ctrl-D within a line is ignored, as a terminal would.
        assert_eq!(typed(b"ab\x04c\r"), done("abc"));
        assert_eq!(typed(b"unfinished"), Step::More);
    }

    #[test]
    fn a_password_must_be_utf8_and_bounded() {
        let mut line = LineEdit::default();
        line.key(0xff).unwrap();
        assert!(line.key(b'\r').is_err());
        let mut line = LineEdit::default();
        for _ in 0..MAX_PASSWORD {
            line.key(b'x').unwrap();
        }
        let e = line.key(b'x').unwrap_err();
        assert!(e.to_string().contains("longer than 4096"), "{e}");
    }

    proptest! {
        #[test]
        fn what_is_typed_is_the_password(
            s in "[^\\x00-\\x1f\\x7f]{0,40}",
            erased in 0usize..5,
            tail in "[a-z]{0,5}",
        ) {
            let mut keys = s.as_bytes().to_vec();
            keys.extend(std::iter::repeat_n(DEL, erased));
            keys.extend(tail.as_bytes());
            keys.push(b'\r');
            let kept: String = s.chars().take(s.chars().count().saturating_sub(erased)).collect();
            prop_assert_eq!(typed(&keys), Step::Done(kept + &tail));
        }
    }
}
