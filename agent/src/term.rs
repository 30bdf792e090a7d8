//! Terminal output from a recording, made safe to show an auditor.
//!
//! A recorded session's output was written by whoever held the session, so
//! replaying it raw would let them drive the auditor's terminal: set its
//! clipboard (OSC 52), answer queries into the auditor's shell (status and
//! title reports), or smuggle any of that past a filter as 8-bit C1 controls.
//! [`plain_text`] keeps only the text; [`terminal_safe`] keeps what redraws
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

fn is_c1(c: char) -> bool {
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

/// Whether a CSI sequence only draws: moves the cursor, erases, scrolls,
/// sets colours, margins or modes. Not the ones that make the terminal
/// answer (device status, attributes, window reports, mode requests) or
/// report the mouse or focus into the auditor's shell.
fn draws(params: &str, fin: char) -> bool {
    let intermediates = params.contains(|c: char| (' '..='/').contains(&c));
    match fin {
        '@'
        | 'A'..='M'
        | 'P'
        | 'S'
        | 'T'
        | 'X'
        | 'Z'
        | '`'
        | 'a'
        | 'b'
        | 'd'..='g'
        | 'm'
        | 'r'
        | 's'
        | 'u' => !intermediates,
        // DECSCUSR (cursor shape) only.
        'q' => params.ends_with(' '),
        'h' | 'l' => {
            !intermediates
                && !params.trim_start_matches('?').split(';').any(|m| {
                    matches!(
                        m,
                        "1000"
                            | "1001"
                            | "1002"
                            | "1003"
                            | "1004"
                            | "1005"
                            | "1006"
                            | "1015"
                            | "1016"
                    )
                })
        }
        _ => false,
    }
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

/// [`Replay`] of one whole output.
pub fn terminal_safe(output: &str) -> String {
    Replay::default().feed(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let screen = "\x1b[2J\x1b[H\x1b[1;31mred\x1b[0m\x1b[?25l\x1b[?1049h\x1b[3;5r\x1b]2;build\x07ok\r\n\x08\t\x1b[2 q";
        assert_eq!(terminal_safe(screen), screen);
        // Titles are written in the 7-bit form.
        assert_eq!(terminal_safe("\x1b]0;t\x1b\\"), "\x1b]0;t\x07");
        assert_eq!(terminal_safe("\u{9d}2;t\u{9c}"), "\x1b]2;t\x07");
        // An ESC ends a title early (as in a terminal): what follows is
        // taken on its own.
        assert_eq!(terminal_safe("\x1b]2;ti\x1b[6ntle\x07"), "tle\x07");
        for bad in [
            "\x1b[?1000h",                    // mouse reports
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
