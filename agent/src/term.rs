//! Terminal output from a recording, made safe to show an auditor.
//!
//! A recorded session's output was written by whoever held the session, so
//! replaying it raw would let them drive the auditor's terminal: set its
//! clipboard (OSC 52), answer queries into the auditor's shell (status and
//! title reports), or smuggle any of that past a filter as 8-bit C1 controls.
//! [`plain_text`] keeps only the text; a [`Replay`] keeps what redraws
//! a screen (cursor movement, colours, erasing, titles) and drops the rest.

/// One piece of terminal output.
#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// Printable text, or a harmless C0 control (`\n`, `\r`, `\t`, BEL, BS).
    Text(&'a str),
    /// CSI: the whole sequence, its parameter and intermediate bytes, and
    /// its final byte.
    Csi(&'a str, &'a str, char),
    /// OSC, ended properly: its payload.
    Osc(&'a str),
    /// Anything else: other escape sequences, DCS/SOS/PM/APC strings, C1
    /// and other C0 controls. Never passed on.
    Other,
    /// A sequence that `s` ends in the middle of (the rest of the input).
    Incomplete,
}

/// `text` safe to print to a terminal: control characters other than
/// newline and tab (C0, DEL, C1: what starts escape sequences) and the
/// Unicode bidirectional controls (which can reorder what a line shows)
/// are written as `\u{..}`; so are, on a terminal whose locale is not
/// UTF-8, the characters whose UTF-8 bytes it reads as C1 controls
/// ([`has_c1_byte`]). For text that others wrote: statements, reasons,
/// server messages.
pub fn printable(text: &str) -> String {
    printable_in(text, stdout_utf8())
}

/// Whether what this process writes to stdout is read as UTF-8: it is not
/// a terminal (a file or a pipe takes bytes as they are), or its locale
/// says it takes UTF-8 ([`utf8_terminal`]). Found once.
pub fn stdout_utf8() -> bool {
    use std::io::IsTerminal;
    static UTF8: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UTF8.get_or_init(|| takes_utf8(std::io::stdout().is_terminal()))
}

/// Whether a stream that is a terminal (`terminal`) or not reads UTF-8.
fn takes_utf8(terminal: bool) -> bool {
    !terminal || utf8_terminal(|k| std::env::var(k).ok())
}

/// [`stdout_utf8`] for stderr, where errors go.
pub fn stderr_utf8() -> bool {
    use std::io::IsTerminal;
    static UTF8: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UTF8.get_or_init(|| takes_utf8(std::io::stderr().is_terminal()))
}

/// Whether `c`'s UTF-8 bytes include one from 0x80 to 0x9F, which a
/// terminal that is not UTF-8 reads as a C1 control (U+011B is C4 9B: 9B
/// is CSI).
pub fn has_c1_byte(c: char) -> bool {
    let mut buf = [0u8; 4];
    c.encode_utf8(&mut buf)
        .bytes()
        .any(|b| (0x80..=0x9f).contains(&b))
}

/// [`printable`] for a terminal that takes UTF-8 (`utf8`) or not.
pub fn printable_in(text: &str, utf8: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() && c != '\n' && c != '\t')
            || is_bidi_control(c)
            || (!utf8 && has_c1_byte(c))
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

pub use wicket_api::is_bidi_control;

pub fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9f}').contains(&c)
}

/// Where a control string (OSC, DCS, SOS, PM, APC) that starts at `from`
/// ends: (payload end, sequence end, whether it ended properly, with BEL,
/// ESC \\ or ST). Any other ESC aborts the string and starts a sequence of
/// its own, as it does in a terminal; so do CAN and SUB. `None` when `s`
/// ends first.
fn string_end(s: &str, from: usize) -> Option<(usize, usize, bool)> {
    for (i, c) in s[from..].char_indices() {
        let at = from + i;
        match c {
            '\x07' | '\u{9c}' => return Some((at, at + c.len_utf8(), true)),
            '\x1b' if at + 1 == s.len() => return None,
            '\x1b' if s[at + 1..].starts_with('\\') => return Some((at, at + 2, true)),
            '\x1b' => return Some((at, at, false)),
            '\x18' | '\x1a' => return Some((at, at + 1, false)),
            _ => {}
        }
    }
    None
}

/// The next token of `s` from `at`, and where the one after starts.
fn next_token(s: &str, at: usize) -> Option<(Token<'_>, usize)> {
    let rest = &s[at..];
    let c = rest.chars().next()?;
    let harmless = |c: char| !c.is_control() || matches!(c, '\n' | '\r' | '\t' | '\x07' | '\x08');
    if harmless(c) {
        let len = rest
            .char_indices()
            .find(|&(_, d)| !harmless(d))
            .map_or(rest.len(), |(i, _)| i);
        return Some((Token::Text(&rest[..len]), at + len));
    }
    let after = at + c.len_utf8();
    // The introducer: ESC and one byte, or its 8-bit C1 form.
    let (intro, body) = match c {
        '\x1b' => match s[after..].chars().next() {
            Some(d @ ('[' | ']' | 'P' | 'X' | '^' | '_')) => (d, after + 1),
            Some(d) if (' '..='/').contains(&d) => {
                // nF: intermediates, then one final byte.
                return Some(
                    match s[after..]
                        .char_indices()
                        .find(|&(_, e)| !(' '..='/').contains(&e))
                    {
                        Some((i, e)) => (Token::Other, after + i + e.len_utf8()),
                        None => (Token::Incomplete, s.len()),
                    },
                );
            }
            Some(d) => return Some((Token::Other, after + d.len_utf8())),
            None => return Some((Token::Incomplete, s.len())),
        },
        '\u{9b}' => ('[', after),
        '\u{9d}' => (']', after),
        '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => ('P', after),
        _ => return Some((Token::Other, after)),
    };
    match intro {
        '[' => {
            // Parameter and intermediate bytes, then a final byte in @..~.
            for (i, d) in s[body..].char_indices() {
                if ('@'..='~').contains(&d) {
                    let end = body + i + 1;
                    return Some((Token::Csi(&s[at..end], &s[body..body + i], d), end));
                }
                if !(' '..='?').contains(&d) {
                    // Not a CSI sequence after all: dropped up to here.
                    return Some((Token::Other, body + i));
                }
            }
            Some((Token::Incomplete, s.len()))
        }
        _ => Some(match string_end(s, body) {
            Some((payload, end, true)) if intro == ']' => (Token::Osc(&s[body..payload]), end),
            Some((_, end, _)) => (Token::Other, end),
            None => (Token::Incomplete, s.len()),
        }),
    }
}

/// Terminal output as plain text: every control sequence removed, CR LF
/// and lone CR made LF, BEL and BS dropped.
pub fn plain_text(output: &str) -> String {
    let mut out = String::with_capacity(output.len());
    let mut at = 0;
    while let Some((t, next)) = next_token(output, at) {
        at = next;
        if let Token::Text(text) = t {
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\r' if chars.peek() != Some(&'\n') => out.push('\n'),
                    '\r' | '\x07' | '\x08' => {}
                    c => out.push(c),
                }
            }
        }
    }
    out
}

/// DEC private modes a replay may set or reset (`CSI ? n h/l`): cursor
/// keys, reverse video, origin, autowrap, cursor blink and visibility, the
/// alternate screen, bracketed paste, synchronized output. Not mouse or
/// focus reporting, or anything else that sends events back.
const DEC_MODES: [u32; 13] = [1, 5, 6, 7, 12, 25, 47, 1047, 1048, 1049, 2004, 2026, 2027];

/// ANSI modes (`CSI n h/l`): insert mode only (not KAM, which locks the
/// keyboard, or LNM, which changes what Enter sends).
const ANSI_MODES: [u32; 1] = [4];

/// Whether a CSI sequence (its parameter and intermediate bytes, and its
/// final byte) only draws: moves the cursor, erases, scrolls, sets colours,
/// margins or one of the allowed modes. An allow-list: queries and reports
/// (device status, attributes, window and mode reports, kitty and xterm
/// keyboard protocols), anything with an unknown prefix or intermediate,
/// and everything unlisted are dropped.
fn draws(params: &str, fin: char) -> bool {
    let (prefix, rest) = match params.chars().next() {
        Some(c @ ('?' | '>' | '<' | '=')) => (Some(c), &params[1..]),
        _ => (None, params),
    };
    let plain = |colons: bool| {
        rest.chars()
            .all(|c| c.is_ascii_digit() || c == ';' || (colons && c == ':'))
    };
    let modes = |allowed: &[u32]| {
        plain(false)
            && rest
                .split(';')
                .all(|m| m.parse::<u32>().is_ok_and(|m| allowed.contains(&m)))
    };
    match (prefix, fin) {
        (
            None,
            '@' | 'A'..='M' | 'P' | 'S' | 'T' | 'X' | 'Z' | '`' | 'a' | 'b' | 'd'..='g' | 'r',
        ) => plain(false),
        (None, 'm') => plain(true),
        (None, 's' | 'u') => rest.is_empty(),
        // DECSCUSR (cursor shape): digits and one space.
        (None, 'q') => rest
            .strip_suffix(' ')
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit())),
        (Some('?'), 'J' | 'K') => plain(false),
        (None, 'h' | 'l') => modes(&ANSI_MODES),
        (Some('?'), 'h' | 'l') => modes(&DEC_MODES),
        _ => false,
    }
}

/// Written after a replay: leaves the alternate screen and sets back what
/// the allowed modes may have changed (colours, cursor, keys, paste,
/// insert, wrap, origin, margins).
pub const RESET: &str =
    "\x1b[0m\x1b[?1049l\x1b[?25h\x1b[?1l\x1b[?5l\x1b[?6l\x1b[?7h\x1b[?2004l\x1b[4l\x1b[r";

/// Whether the locale says the terminal takes UTF-8 (`LC_ALL`, else
/// `LC_CTYPE`, else `LANG`). On one that does not, a UTF-8 character's
/// bytes can read as 8-bit controls (U+011B is C4 9B: 9B is CSI).
pub fn utf8_terminal(var: impl Fn(&str) -> Option<String>) -> bool {
    ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|k| var(k).filter(|v| !v.is_empty()))
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("utf-8") || v.contains("utf8")
        })
}

/// `text` with every character outside ASCII as `?`.
pub fn ascii_only(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// Replays terminal output chunk by chunk with only what redraws a screen:
/// text, CSI sequences that only draw (see `draws`), and window titles (OSC 0, 1,
/// 2, printable, written in the 7-bit form). Everything else is dropped. A
/// sequence cut between two chunks is held back until it is whole (up to
/// [`MAX_HELD`] bytes, then dropped).
#[derive(Debug, Default)]
pub struct Replay {
    held: String,
}

/// The longest unfinished sequence a [`Replay`] holds back.
pub const MAX_HELD: usize = 4096;

impl Replay {
    /// What of `chunk` (after what was held back) may go to the terminal.
    pub fn feed(&mut self, chunk: &str) -> String {
        let mut input = std::mem::take(&mut self.held);
        input.push_str(chunk);
        let mut out = String::with_capacity(input.len());
        let mut at = 0;
        while let Some((t, next)) = next_token(&input, at) {
            match t {
                Token::Text(text) => out.push_str(text),
                // Only the 7-bit form: an 8-bit CSI may not be what the
                // auditor's terminal takes it for.
                Token::Csi(seq, params, fin) => {
                    if seq.starts_with('\x1b') && draws(params, fin) {
                        out.push_str(seq);
                    }
                }
                Token::Osc(payload) => {
                    let title = ["0;", "1;", "2;"].iter().any(|p| payload.starts_with(p))
                        && !payload.chars().any(|c| c.is_control() || is_c1(c));
                    if title {
                        out.push_str("\x1b]");
                        out.push_str(payload);
                        out.push('\x07');
                    }
                }
                Token::Incomplete if input.len() - at <= MAX_HELD => {
                    self.held = input[at..].to_owned();
                }
                Token::Other | Token::Incomplete => {}
            }
            at = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn printable_text_keeps_lines_and_escapes_controls() {
        assert_eq!(printable("INC-1:\n\tdisk full é"), "INC-1:\n\tdisk full é");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("\u{9b}2J\r\u{7f}"), "\\u{9b}2J\\u{d}\\u{7f}");
        assert_eq!(printable("x\u{202e}y\u{2066}"), "x\\u{202e}y\\u{2066}");
    }

    proptest! {
        #[test]
        fn printable_text_has_no_controls(text in any::<String>()) {
            let p = printable(&text);
            prop_assert!(p.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'));
            prop_assert!(!p.contains('\u{202e}'), "{:?}", p);
        }
    }

    /// A [`Replay`] of one whole output.
    fn terminal_safe(output: &str) -> String {
        Replay::default().feed(output)
    }

    #[test]
    fn plain_text_strips_every_control() {
        assert_eq!(
            plain_text("\x1b]0;title\x07\x1b[01;32mroot@n\x1b[00m:~# ls\r\nfile\r\n"),
            "root@n:~# ls\nfile\n"
        );
        // C1 forms, DCS/APC strings, nF escapes, other C0 controls.
        assert_eq!(
            plain_text(
                "a\u{9b}31mb\u{9d}52;c;eA==\u{9c}c\x1bPq#0\x1b\\d\x1b_x\x07e\x1b(Bf\x05\x0eg\x7f"
            ),
            "abcdefg"
        );
    }

    #[test]
    fn terminal_safe_keeps_the_screen_and_drops_what_talks_back() {
        let screen = "\x1b[2J\x1b[H\x1b[1;31mred\x1b[0m\x1b[?25l\x1b[?1049h\x1b[3;5r\x1b]2;build\x07ok\r\n\x08\t\x1b[2 q\x1b[38:2::255:0:0mx\x1b[?2004;1h\x1b[s\x1b[u\x1b[?2K";
        assert_eq!(terminal_safe(screen), screen);
        // Titles are written in the 7-bit form.
        assert_eq!(terminal_safe("\x1b]0;t\x1b\\"), "\x1b]0;t\x07");
        assert_eq!(terminal_safe("\u{9d}2;t\u{9c}"), "\x1b]2;t\x07");
        // An ESC ends a title early (as in a terminal): what follows is
        // taken on its own.
        assert_eq!(terminal_safe("\x1b]2;ti\x1b[6ntle\x07"), "tle\x07");
        for bad in [
            "\x1b[?1000h",                    // mouse reports
            "\x1b[?9h",                       // X10 mouse reports
            "\x1b[?01000h",                   // the same, with a leading zero
            "\x1b[?25;1004h",                 // focus reports, behind an allowed mode
            "\x1b[?u",                        // kitty keyboard query
            "\x1b[>1u",                       // kitty keyboard flags
            "\x1b[=1;1u",                     // the same
            "\x1b[?1;1S",                     // XTSMGRAPHICS query
            "\x1b[?4m",                       // XTQMODKEYS query
            "\x1b[>4;1m",                     // XTMODKEYS
            "\x1b[2h",                        // KAM: keyboard locked
            "\x1b[20h",                       // LNM
            "\x1b[5i",                        // printer on
            "\x1b[?2048h",                    // in-band resize reports
            "\x1b[!p",                        // DECSTR
            "\x1b[1$w",                       // DECRQPSR
            "\x1b]52;c;ZWNobyBwd25lZA==\x07", // clipboard
            "\x1b[6n",                        // cursor position report
            "\x1b[c",                         // device attributes
            "\x1b[>c",                        // secondary DA
            "\x1b[21t",                       // title report
            "\x1b[?2026$p",                   // DECRQM
            "\x1bP$qm\x1b\\",                 // DECRQSS
            "\x1b_payload\x1b\\",             // APC
            "\x1b^pm\x1b\\",                  // PM
            "\u{9b}6n",                       // 8-bit CSI
            "\u{85}",                         // NEL as C1
            "\x05",                           // ENQ (answerback)
            "\x1b]8;;http://x/\x1b\\",        // hyperlinks
            "\x1bZ",                          // DECID
        ] {
            assert_eq!(terminal_safe(&format!("a{bad}b")), "ab", "{bad:?}");
        }
    }

    #[test]
    fn only_a_utf8_locale_gets_utf8() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(utf8_terminal(env(&[("LANG", "en_US.UTF-8")])));
        assert!(utf8_terminal(env(&[("LC_ALL", "C.utf8"), ("LANG", "C")])));
        assert!(!utf8_terminal(env(&[
            ("LC_ALL", "C"),
            ("LANG", "en_US.UTF-8")
        ])));
        assert!(!utf8_terminal(env(&[("LANG", "de_DE.ISO-8859-1")])));
        assert!(!utf8_terminal(env(&[])));
        assert_eq!(ascii_only("ě\u{9b}x"), "??x");
        // Printed text: what a terminal that is not UTF-8 reads as a C1
        // control is escaped for it (ě is C4 9B, 😀 is F0 9F 98 80); é
        // (C3 A9) is not.
        assert_eq!(printable_in("é ě 😀 \u{9b}", true), "é ě 😀 \\u{9b}");
        assert_eq!(
            printable_in("é ě 😀 \u{9b}", false),
            "é \\u{11b} \\u{1f600} \\u{9b}"
        );
        // What a replay leaves behind is itself allowed.
        assert_eq!(terminal_safe(RESET), RESET);
    }

    proptest! {
        /// Nothing the filters pass can start a string, a C1 control or an
        /// answer, whatever the recording holds.
        #[test]
        fn filtered_output_has_no_dangerous_controls(s in "(\\PC|[\\x00-\\x1f\\x7f\u{80}-\u{9f}\\[\\]P_^X;0-9$?>]){0,64}") {
            let plain = plain_text(&s);
            prop_assert!(!plain.chars().any(|c| (c.is_control() && c != '\n' && c != '\t') || is_c1(c)), "{plain:?}");
            let safe = terminal_safe(&s);
            prop_assert!(!safe.chars().any(|c| is_c1(c) || matches!(c, '\x05' | '\x18' | '\x1a' | '\x7f')), "{safe:?}");
            // Filtering twice changes nothing more: what passed is whole.
            prop_assert_eq!(terminal_safe(&safe), safe.clone());
            let mut at = 0;
            while let Some((t, next)) = next_token(&safe, at) {
                prop_assert!(!matches!(t, Token::Other | Token::Incomplete), "{safe:?}");
                at = next;
            }
            // Cut anywhere, the same comes out.
            for cut in (0..=s.len()).filter(|&i| s.is_char_boundary(i)) {
                let mut r = Replay::default();
                let mut two = r.feed(&s[..cut]);
                two.push_str(&r.feed(&s[cut..]));
                prop_assert_eq!(&two, &safe, "cut at {}", cut);
            }
        }
    }
}
