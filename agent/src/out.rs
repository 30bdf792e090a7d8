//! Standard output for the CLI's results. `outln!`/`out!` stand in for
//! `println!`/`print!`: when the reader of a pipe has gone (`wicket audit
//! search | head -1`), the process ends quietly with success, as `rg` and
//! other Unix tools do, instead of the panic `println!` gives (Rust ignores
//! SIGPIPE, so the write fails with `BrokenPipe`).

use std::io::Write;

/// `println!` that ends the process quietly when stdout's reader has gone.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends the process quietly when stdout's reader has gone.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// Writes `args` to stdout as text made safe for a terminal
/// ([`crate::term::printable`]: most of what is printed comes from the
/// server, and some of it others wrote). A closed pipe ends the process
/// with success; another error is reported on stderr and ends it with
/// failure.
pub fn write(args: std::fmt::Arguments<'_>) {
    let text = crate::term::printable(&args.to_string());
    raw(text.as_bytes());
}

/// Writes `value` as pretty JSON and a newline, with [`json_safe`].
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let text = json_safe(&serde_json::to_string_pretty(value)?);
    raw(text.as_bytes());
    raw(b"\n");
    Ok(())
}

/// Writes `value` as JSON on one line, with [`json_safe`] (for results read
/// line by line, such as a tunnel's address).
pub fn json_line(value: &serde_json::Value) {
    let text = json_safe(&value.to_string());
    raw(text.as_bytes());
    raw(b"\n");
}

/// JSON text with the characters a terminal may act on that JSON leaves
/// as they are written as `\u` escapes of four hex digits: C1 controls (U+0080 to
/// U+009F, which some terminals take for ESC sequences), the Unicode
/// bidirectional controls, and the line and paragraph separators; and,
/// on a terminal whose locale is not UTF-8, the characters whose UTF-8
/// bytes it reads as C1 controls ([`crate::term::has_c1_byte`]). They can
/// only be inside strings, so the document means the same.
pub fn json_safe(text: &str) -> String {
    json_safe_in(text, crate::term::stdout_utf8())
}

/// [`json_safe`] for a terminal that takes UTF-8 (`utf8`) or not.
fn json_safe_in(text: &str, utf8: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let unsafe_here = crate::term::is_c1(c)
            || crate::term::is_bidi_control(c)
            || matches!(c, '\u{2028}' | '\u{2029}')
            || (!utf8 && crate::term::has_c1_byte(c));
        if unsafe_here {
            // Past U+FFFF, as a surrogate pair.
            for unit in c.encode_utf16(&mut [0u16; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A JSON array taken an element at a time (each as [`json`] writes a
/// value), for results too long to hold in memory: kept in an unnamed
/// temporary file (0600, gone when closed) and printed whole by
/// [`JsonArray::finish`]. A result that fails midway prints nothing, so a
/// tool never reads a part of it as the whole.
#[derive(Debug, Default)]
pub struct JsonArray {
    written: usize,
    spool: Option<std::fs::File>,
}

impl JsonArray {
    pub fn push<T: serde::Serialize + ?Sized>(&mut self, value: &T) -> anyhow::Result<()> {
        use anyhow::Context;
        let keeping = "keeping the result in a temporary file (the directory $TMPDIR names)";
        let text = json_safe(&serde_json::to_string_pretty(value)?);
        let spool = match &mut self.spool {
            Some(f) => f,
            None => self.spool.insert(tempfile::tempfile().context(keeping)?),
        };
        spool
            .write_all(if self.written == 0 { b"[\n" } else { b",\n" })
            .and_then(|()| spool.write_all(text.as_bytes()))
            .context(keeping)?;
        self.written += 1;
        Ok(())
    }

    /// Prints the array.
    pub fn finish(self) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = self.finish_to(&mut stdout) {
            match e.downcast_ref::<std::io::Error>() {
                Some(io) if io.kind() == std::io::ErrorKind::BrokenPipe => quit_on(io),
                _ => return Err(e),
            }
        }
        Ok(())
    }

    fn finish_to(self, w: &mut impl Write) -> anyhow::Result<()> {
        use std::io::{Seek, SeekFrom};
        let Some(mut spool) = self.spool else {
            w.write_all(b"[]\n")?;
            return Ok(w.flush()?);
        };
        spool.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut spool, w)?;
        w.write_all(b"\n]\n")?;
        Ok(w.flush()?)
    }
}

fn raw(bytes: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes) {
        quit_on(&e);
    }
}

/// Flushes stdout, as [`write`] writes.
pub fn flush() {
    if let Err(e) = std::io::stdout().lock().flush() {
        quit_on(&e);
    }
}

fn quit_on(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("wicket: error: writing to stdout: {e}");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The array is printed whole at its end, and nothing before: a result
    /// that fails midway leaves no part of an array to be read as all.
    #[test]
    fn a_json_array_is_printed_whole_at_its_end() {
        let mut out = Vec::new();
        JsonArray::default().finish_to(&mut out).unwrap();
        let empty: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
        assert!(empty.is_empty());
        let mut a = JsonArray::default();
        for n in 0..3 {
            a.push(&serde_json::json!({ "n": n, "s": "x\u{9b}" }))
                .unwrap();
        }
        let mut out = Vec::new();
        a.finish_to(&mut out).unwrap();
        let back: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2]["n"], 2);
        assert_eq!(back[0]["s"], "x\u{9b}");
        assert!(!String::from_utf8(out).unwrap().contains('\u{9b}'));
    }

    /// What a terminal may act on is escaped, and the JSON still reads as
    /// the same value.
    #[test]
    fn json_is_made_safe_and_means_the_same() {
        let value = serde_json::json!({
            "reason": "ok\u{9d}52;c;aGk=\u{9c} \u{9b}2J \u{202e}txt.exe \u{2028} é ✓",
            "n": 1
        });
        let text = json_safe_in(&serde_json::to_string_pretty(&value).unwrap(), true);
        for c in ['\u{9d}', '\u{9c}', '\u{9b}', '\u{202e}', '\u{2028}'] {
            assert!(!text.contains(c), "{c:?} in {text}");
        }
        assert!(text.contains("\\u009d52;c;aGk=\\u009c"), "{text}");
        assert!(text.contains("é ✓"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }

    /// For a terminal that is not UTF-8, characters with a byte it reads
    /// as a C1 control are escaped too (past U+FFFF as a surrogate pair),
    /// and the JSON still reads as the same value.
    #[test]
    fn json_for_a_terminal_that_is_not_utf8_has_no_c1_bytes() {
        let value = serde_json::json!({ "s": "é ě 😀 ok" });
        let text = json_safe_in(&serde_json::to_string(&value).unwrap(), false);
        assert!(!text.bytes().any(|b| (0x80..=0x9f).contains(&b)), "{text}");
        assert!(text.contains("é \\u011b \\ud83d\\ude00 ok"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        let utf8 = json_safe_in(&serde_json::to_string(&value).unwrap(), true);
        assert!(utf8.contains("é ě 😀 ok"), "{utf8}");
    }
}
