//! User names: the one canonical form every name is folded to before it is used as a key
//! (router, store, tokens, paths) or shown, and the rule error messages state. Pure
//! functions; depends on nothing else in the crate.

/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;

/// Longest name input accepted before normalization, in bytes: 32 characters of up to
/// four bytes each. Longer input is refused before any work is spent on it.
pub const MAX_USERNAME_INPUT_BYTES: usize = 4 * MAX_USERNAME_CHARS;

/// The naming rule, as error messages state it.
pub const USERNAME_RULE: &str = "names are 1-32 ASCII letters, digits, _ . - \
     (compared after Unicode NFKC and lowercasing: Alice, ALICE and full-width \
     \u{ff41}lice are all alice; accented, Cyrillic, Greek and other non-ASCII letters \
     are refused)";

/// The one canonical form of a user name, or `None` when the name is not allowed.
///
/// The name is normalized with Unicode NFKC (full-width and other compatibility forms
/// become their plain letters), lowercased, and must then be 1-32 characters from
/// `a-z 0-9 _ . -`. Every place a name enters (paths, queries, login frames, hash
/// senders, recipients, the account API and `pigeon user`) goes through here, and the
/// result is the key everywhere (router, store, tokens). ASCII only after folding: no
/// two allowed names look alike (no Cyrillic `а` for Latin `a`), and `#` (the hash
/// dialect's separator) never occurs.
pub fn canonical_username(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_USERNAME_INPUT_BYTES {
        return None;
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-');
    let folded: String = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        use unicode_normalization::UnicodeNormalization;
        name.nfkc().flat_map(char::to_lowercase).collect()
    };
    let n = folded.chars().count();
    (n > 0 && n <= MAX_USERNAME_CHARS && folded.chars().all(allowed)).then_some(folded)
}

/// Whether `name` is a user name in its canonical form already.
pub fn valid_username(name: &str) -> bool {
    canonical_username(name).is_some_and(|c| c == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["alice", "a", "a.b-c_d", "12345678901234567890123456789012"] {
            assert!(valid_username(ok), "{ok}");
            assert_eq!(canonical_username(ok).as_deref(), Some(ok));
        }
        for (spelled, canonical) in [
            ("Alice", "alice"),
            ("ALICE", "alice"),
            ("\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}", "alice"), // full-width
            ("\u{ff21}lice", "alice"),
            ("\u{212a}im", "kim"), // Kelvin sign
            ("\u{fb00}", "ff"),    // ligature
        ] {
            assert_eq!(
                canonical_username(spelled).as_deref(),
                Some(canonical),
                "{spelled}"
            );
            assert!(
                !valid_username(spelled),
                "{spelled} is not canonical itself"
            );
        }
        for bad in [
            "",
            "a b",
            "a#b",
            "!x",
            "a/b",
            "123456789012345678901234567890123",
            "\u{e9}\u{0301}x\n",
            "\u{0430}lice", // Cyrillic a
            "zo\u{eb}",
            "zoe\u{308}",
            "\u{7528}\u{6237}",
            "a\u{200b}b",
            "\u{130}",
        ] {
            assert_eq!(canonical_username(bad), None, "{bad:?}");
            assert!(!valid_username(bad), "{bad:?}");
        }
        assert_eq!(canonical_username(&"A".repeat(10_000)), None);
    }
}
