//! What `pigeon chat` writes to the terminal: every string that came from the network is
//! passed through [`visible`] first (a body, name or error message can never forge a
//! line or reach the terminal as an escape sequence), colours only when stdout is a
//! terminal, and the one-line progress of a file send. It owns no sockets.

use std::io::{IsTerminal, Write};

/// Shows control characters visibly instead of letting the terminal act on them:
/// `\n`, `\r`, `\t`, `\x1b`, `\u{85}`. Also the invisible bidirectional overrides and
/// isolates (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F), which can make a line read
/// differently from what it is.
pub fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if ('\u{80}'..='\u{9f}').contains(&c)
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
                || c == '\u{200e}'
                || c == '\u{200f}' =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// How a line is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Someone else's message.
    Incoming,
    /// One of ours, confirmed by the server.
    Outgoing,
    /// Status from the client itself (`* ...`).
    Info,
    /// Something went wrong (`! ...`).
    Problem,
}

/// The terminal (or pipe) the client prints to.
pub struct Term {
    tty: bool,
    /// A progress line is showing (tty only): the next line first clears it.
    progress: bool,
}

impl Default for Term {
    fn default() -> Self {
        Term::new()
    }
}

impl Term {
    pub fn new() -> Term {
        Term {
            tty: std::io::stdout().is_terminal(),
            progress: false,
        }
    }

    /// Prints one line; `line` must already be made of [`visible`] pieces.
    pub fn line(&mut self, style: Style, line: &str) {
        let mut out = std::io::stdout().lock();
        let clear = if self.progress { "\r\x1b[2K" } else { "" };
        self.progress = false;
        let colour = match style {
            _ if !self.tty => "",
            Style::Incoming => "",
            Style::Outgoing => "\x1b[2m",
            Style::Info => "\x1b[36m",
            Style::Problem => "\x1b[31m",
        };
        let reset = if colour.is_empty() { "" } else { "\x1b[0m" };
        // A closed stdout (the user piped us into `head`) is not worth dying for.
        let _ = writeln!(out, "{clear}{colour}{line}{reset}");
        let _ = out.flush();
    }

    /// Shows how far a file send got: one line rewritten in place on a terminal; in a
    /// pipe only the start and the end.
    pub fn progress(&mut self, name: &str, done: u64, size: u64) {
        let pct = (done.saturating_mul(100)).checked_div(size).unwrap_or(100);
        if self.tty {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K* sending {name}: {pct}%");
            let _ = out.flush();
            self.progress = done < size;
            if done >= size {
                let _ = writeln!(out);
            }
        } else if done == 0 || done >= size {
            self.line(Style::Info, &format!("* sending {name}: {pct}%"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(visible("hi\n[offline] carol: x"), "hi\\n[offline] carol: x");
        assert_eq!(visible("\x1b]0;pwned\x07"), "\\x1b]0;pwned\\x07");
        assert_eq!(visible("a\u{9b}31m\u{202e}b"), "a\\u{9b}31m\\u{202e}b");
        assert_eq!(visible("zoë 🐦"), "zoë 🐦");
    }
}
