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
}

fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9f}').contains(&c)
}

/// Where a control string (OSC, DCS, SOS, PM, APC) that starts at `from`
/// ends: (payload end, sequence end, whether it ended properly, with BEL,
/// ESC \\ or ST). Any other ESC aborts the string and starts a sequence of
/// its own, as it does in a terminal; so do CAN and SUB.
fn string_end(s: &str, from: usize) -> (usize, usize, bool) {
    for (i, c) in s[from..].char_indices() {
        let at = from + i;
        match c {
            '\x07' | '\u{9c}' => return (at, at + c.len_utf8(), true),
            '\x1b' if s[at + 1..].starts_with('\\') => return (at, at + 2, true),
            '\x1b' => return (at, at, false),
            '\x18' | '\x1a' => return (at, at + 1, false),
            _ => {}
        }
    }
    (s.len(), s.len(), false)
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
                let end = s[after..]
                    .char_indices()
                    .find(|&(_, e)| !(' '..='/').contains(&e))
                    .map_or(s.len(), |(i, e)| after + i + e.len_utf8());
                return Some((Token::Other, end));
            }
            Some(d) => return Some((Token::Other, after + d.len_utf8())),
            None => return Some((Token::Other, after)),
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
            Some((Token::Other, s.len()))
        }
        ']' => match string_end(s, body) {
            (payload, end, true) => Some((Token::Osc(&s[body..payload]), end)),
            (_, end, false) => Some((Token::Other, end)),
        },
        _ => Some((Token::Other, string_end(s, body).1)),
    }
}

fn tokens(s: &str) -> impl Iterator<Item = Token<'_>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let (t, next) = next_token(s, at)?;
        at = next;
        Some(t)
    })
}

/// Terminal output as plain text: every control sequence removed, CR LF
/// and lone CR made LF, BEL and BS dropped.
pub fn plain_text(output: &str) -> String {
    let mut out = String::with_capacity(output.len());
    for t in tokens(output) {
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

/// Terminal output with only what redraws a screen: text, CSI sequences
/// that move, erase, scroll, set modes or colours (not the ones that make
/// the terminal answer: device status, attributes, window reports, or
/// anything with a private final byte), and window titles (OSC 0, 1, 2,
/// printable). Everything else is dropped.
pub fn terminal_safe(output: &str) -> String {
    let mut out = String::with_capacity(output.len());
    for t in tokens(output) {
        match t {
            Token::Text(text) => out.push_str(text),
            Token::Csi(seq, params, fin) => {
                // Only the 7-bit form: an 8-bit CSI may not be what the
                // auditor's terminal takes it for.
                if seq.starts_with('\x1b') && draws(params, fin) {
                    out.push_str(seq);
                }
            }
            Token::Osc(payload) => {
                let title = ["0;", "1;", "2;"].iter().any(|p| payload.starts_with(p))
                    && !payload.chars().any(|c| c.is_control() || is_c1(c));
                // Written in its 7-bit form whatever the recording used.
                if title {
                    out.push_str("\x1b]");
                    out.push_str(payload);
                    out.push('\x07');
                }
            }
            Token::Other => {}
        }
    }
    out
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
            for t in tokens(&safe) {
                prop_assert!(!matches!(t, Token::Other), "{safe:?}");
            }
        }
    }
}
