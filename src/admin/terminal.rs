//! What a watcher's terminal may receive of a watched session's output. The output is the
//! customer's to choose, and the watcher is support staff, often root: it is parsed as a
//! terminal parses it (`vte`, UTF-8 and C1 controls included) and only an allow-list is passed
//! on: text, line controls, colours and attributes, cursor movement, erasing and scrolling,
//! a few modes that [`Allowed::reset`] undoes. Everything that makes a terminal answer (status
//! and size reports, DA, DECRQM), act outside the screen (OSC titles, clipboard, hyperlinks;
//! DCS, APC, PM, SOS strings) or change how it reads the keyboard or mouse is dropped.

use vte::{Params, Parser, Perform};

/// Private modes (`CSI ? n h/l`) that pass: autowrap, blinking and visible cursor, the
/// alternate screen. [`Allowed::reset`] leaves the alternate screen and turns the rest back on.
const PRIVATE_MODES: [u16; 7] = [7, 12, 25, 47, 1047, 1048, 1049];
/// Modes that switch to the alternate screen.
const ALTERNATE_SCREEN: [u16; 3] = [47, 1047, 1049];
/// CSI final bytes that pass with no private marker: cursor movement and position, erase,
/// insert and delete, scrolling, tabs, attributes (SGR), insert mode (`4 h/l` only) and the
/// scroll region; `n` (reports), `c` (DA), `t` (window ops) and `p`/`q` are not among them.
const CSI_FINALS: &str = "@ABCDEFGHIJKLMPSTXZ`abdefghlmrsu";

/// Filters a watched session's output for the watcher's terminal; keeps its state from one
/// chunk to the next.
pub struct Allowed {
    parser: Parser,
    state: State,
}

#[derive(Default)]
struct State {
    out: Vec<u8>,
    alternate: bool,
}

impl Default for Allowed {
    fn default() -> Self {
        Self {
            parser: Parser::new(),
            state: State::default(),
        }
    }
}

impl Allowed {
    /// What of `input` may reach the watcher's terminal.
    pub fn filter(&mut self, input: &[u8]) -> &[u8] {
        self.state.out.clear();
        self.parser.advance(&mut self.state, input);
        &self.state.out
    }

    /// Undoes what the passed sequences may have left set: attributes, scroll region, insert
    /// mode, charsets, a hidden cursor, no autowrap, the alternate screen.
    pub fn reset(&self) -> &'static [u8] {
        const RESET: &[u8] = b"\x1b[0m\x1b[r\x1b[4l\x1b[?7h\x1b[?25h\x1b(B\x1b)B\x0f";
        const RESET_ALTERNATE: &[u8] =
            b"\x1b[0m\x1b[r\x1b[4l\x1b[?7h\x1b[?25h\x1b(B\x1b)B\x0f\x1b[?1049l";
        if self.state.alternate {
            RESET_ALTERNATE
        } else {
            RESET
        }
    }
}

impl Perform for State {
    fn print(&mut self, c: char) {
        // U+0080..U+009F: C1 controls written as UTF-8, which some terminals act on.
        if !c.is_control() {
            let mut buf = [0u8; 4];
            self.out
                .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }

    fn execute(&mut self, byte: u8) {
        // Backspace, tab, line feed, vertical tab, form feed, carriage return, shift out/in;
        // not BEL, not ENQ (answerback), not the C1 controls.
        if matches!(byte, 0x08..=0x0f) {
            self.out.push(byte);
        }
    }

    fn csi_dispatch(&mut self, params: &Params, intermediates: &[u8], ignore: bool, action: char) {
        if ignore {
            return;
        }
        let params: Vec<&[u16]> = params.iter().collect();
        let (marker, kept): (&[u8], Vec<&[u16]>) = match (intermediates, action) {
            ([], 'h' | 'l') => (b"", params.into_iter().filter(|p| *p == [4]).collect()),
            ([], _) if CSI_FINALS.contains(action) => (b"", params),
            ([b'?'], 'h' | 'l') => (
                b"?",
                params
                    .into_iter()
                    .filter(|p| p.len() == 1 && PRIVATE_MODES.contains(&p[0]))
                    .collect(),
            ),
            _ => return,
        };
        if matches!(action, 'h' | 'l') {
            if kept.is_empty() {
                return;
            }
            if marker == b"?" && kept.iter().any(|p| ALTERNATE_SCREEN.contains(&p[0])) {
                self.alternate = action == 'h';
            }
        }
        self.out.extend_from_slice(b"\x1b[");
        self.out.extend_from_slice(marker);
        for (i, param) in kept.iter().enumerate() {
            if i > 0 {
                self.out.push(b';');
            }
            for (j, sub) in param.iter().enumerate() {
                if j > 0 {
                    self.out.push(b':');
                }
                self.out.extend_from_slice(sub.to_string().as_bytes());
            }
        }
        let mut buf = [0u8; 4];
        self.out
            .extend_from_slice(action.encode_utf8(&mut buf).as_bytes());
    }

    fn esc_dispatch(&mut self, intermediates: &[u8], ignore: bool, byte: u8) {
        if ignore {
            return;
        }
        match (intermediates, byte) {
            // Save and restore the cursor, index, next line, reverse index, full reset.
            ([], b'7' | b'8' | b'D' | b'E' | b'M' | b'c') => {
                if byte == b'c' {
                    self.alternate = false;
                }
                self.out.extend_from_slice(&[0x1b, byte]);
            }
            // The ASCII and line-drawing character sets.
            ([i @ (b'(' | b')')], b'0' | b'B') => self.out.extend_from_slice(&[0x1b, *i, byte]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(chunks: &[&[u8]]) -> Vec<u8> {
        let mut allowed = Allowed::default();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(allowed.filter(chunk));
        }
        out
    }

    #[test]
    fn text_colours_and_cursor_movement_pass() {
        for same in [
            &b"plain text\r\n\ttab"[..],
            b"\x1b[1;31mred\x1b[0m",
            b"\x1b[38:2:0:255:0:0mtrue colour",
            // (A missing parameter comes out as its default, 0.)
            b"\x1b[0H\x1b[2J\x1b[10;5Hx\x1b[0K\x1b[3A",
            b"\x1b[?1049h\x1b[?25l\x1b[1;20r",
            b"\x1b(0lqk\x1b(B",
            b"\x1b7\x1b8\x1bM",
            "café ❝ 你好".as_bytes(),
        ] {
            assert_eq!(filter(&[same]), same, "{}", String::from_utf8_lossy(same));
        }
    }

    #[test]
    fn what_makes_a_terminal_answer_or_act_outside_the_screen_is_dropped() {
        for (input, kept) in [
            // OSC: a title, a clipboard write, a hyperlink; whole or cut across chunks.
            (&[&b"x\x1b]0;title\x07y"[..]][..], &b"xy"[..]),
            (&[b"x\x1b]52;c;cm0gLXJm\x1b", b"\\y"], b"xy"),
            (&[b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"], b"link"),
            // DCS (a status request), APC, PM, SOS.
            (&[b"x\x1b", b"P$qm\x1b\\y"], b"xy"),
            (&[b"\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\ok"], b"ok"),
            // ESC ESC before a string must not leave an ESC to pair with what follows.
            (&[b"\x1b\x1b]x\x07]52;c;aGVsbG8=\x07"], b"]52;c;aGVsbG8="),
            // (Here the DCS swallows the rest: BEL does not end it.)
            (&[b"\x1b\x1b", b"P\x07]0;pwned\x07"], b""),
            // C1 controls, raw and UTF-8 encoded.
            (&[b"\x9d52;c;aGk=\x9c!"], b"52;c;aGk=!"),
            (&[b"\xc2\x9d52;c;aGk=\xc2\x9c!"], b"52;c;aGk=!"),
            (&[b"\x9b6n!"], b"6n!"),
            // Reports and requests: cursor position, DA, window size and title, DECRQM, ENQ, BEL.
            (
                &[b"\x1b[6n\x1b[c\x1b[>c\x1b[14t\x1b[21t\x1b[?2004$p\x05\x07!"],
                b"!",
            ),
            // Mouse, focus and bracketed paste reporting; keypad and cursor-key modes.
            (
                &[b"\x1b[?1000h\x1b[?1006h\x1b[?1004h\x1b[?2004h\x1b[?1h\x1b=!"],
                b"!",
            ),
            // A mix keeps what is allowed.
            (&[b"\x1b[?25;1000l"], b"\x1b[?25l"),
            (&[b"\x1b[4;20h"], b"\x1b[4h"),
        ] {
            assert_eq!(
                String::from_utf8_lossy(&filter(input)),
                String::from_utf8_lossy(kept),
                "{input:?}"
            );
        }
    }

    #[test]
    fn the_reset_leaves_the_alternate_screen_only_when_in_it() {
        let mut allowed = Allowed::default();
        assert!(!allowed.reset().ends_with(b"\x1b[?1049l"));
        let _ = allowed.filter(b"\x1b[?1049h");
        assert!(allowed.reset().ends_with(b"\x1b[?1049l"));
        let _ = allowed.filter(b"\x1b[?1049l");
        assert!(!allowed.reset().ends_with(b"\x1b[?1049l"));
    }
}
