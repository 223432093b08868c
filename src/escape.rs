//! Client bytes on their way into the server log: `Escaped` shows control and other
//! non-printable characters visibly (`\n`, `\x1b`, `\u{202e}`) and cuts long values, so a
//! user name, path, origin or reason can neither forge a log line, nor send escape
//! sequences to an operator's terminal, nor make a megabyte log line.

use std::fmt;

/// Characters of a client value shown in the log; the rest is summarised by its length.
pub const MAX_LOGGED_CHARS: usize = 128;

/// `Display` for a client-supplied string in a log field: escaped and length-bounded.
/// Use it as `tracing::info!(user = %Escaped(&user), ...)`.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, c) in self.0.chars().enumerate() {
            if n == MAX_LOGGED_CHARS {
                return write!(f, "...({} bytes)", self.0.len());
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
                c if is_invisible(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// An optional client string (`None` shows as `-`).
pub struct EscapedOpt<'a>(pub Option<&'a str>);

impl fmt::Display for EscapedOpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => Escaped(s).fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// C1 controls, line/paragraph separators, bidi overrides and other format characters
/// that reorder or hide text on a terminal.
fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0x80..=0x9f | 0xad | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2069 | 0xfeff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_visible_and_long_values_cut() {
        assert_eq!(Escaped("a\nb\x1b[31m\\").to_string(), "a\\nb\\x1b[31m\\\\");
        assert_eq!(
            Escaped("\u{202e}évil\u{7f}").to_string(),
            "\\u{202e}évil\\x7f"
        );
        let long = "x".repeat(10_000);
        let shown = Escaped(&long).to_string();
        assert!(shown.len() < MAX_LOGGED_CHARS + 32, "{shown}");
        assert!(shown.ends_with("...(10000 bytes)"));
        assert_eq!(EscapedOpt(None).to_string(), "-");
        assert_eq!(format!("{:?}", Escaped("q")), "\"q\"");
    }
}
