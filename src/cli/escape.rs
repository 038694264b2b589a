//! C-style escapes in option values, as llama.cpp's `--escape` reads them: a shell passes
//! `--stop "\n\n"` as a backslash and an `n`, twice, and what the user meant is two newlines.

use gpt2::{Error, Result};

/// The bad escape `esc` in `s`: a bad value of `--stop` (exit 2, naming the flag).
fn bad(s: &str, esc: &str, why: &str) -> Result<String> {
    let msg = if s == esc {
        format!("`{s}`: {why}")
    } else {
        format!("`{s}`: `{esc}`: {why}")
    };
    Err(Error::param("stop", msg))
}

/// `s` with `\n \r \t \0 \\ \' \" \xNN \u{N..}` replaced by what they stand for; any other
/// backslash sequence is an error (so a typo does not silently mean something else).
pub(crate) fn unescape(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('0') => out.push('\0'),
            Some(c @ ('\\' | '\'' | '"')) => out.push(c),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 && b < 0x80 => out.push(char::from(b)),
                    _ => {
                        let why = "\\x takes two hex digits below 80";
                        return bad(s, &format!("\\x{hex}"), why);
                    }
                }
            }
            Some('u') => {
                let rest: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let code = rest
                    .strip_prefix('{')
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .and_then(char::from_u32);
                match code {
                    Some(c) => out.push(c),
                    None => {
                        let why = "write \\u{hex digits} of a Unicode scalar value";
                        return bad(s, &format!("\\u{rest}}}"), why);
                    }
                }
            }
            Some(c) => {
                let why = "unknown escape (use --no-escape for a literal backslash)";
                return bad(s, &format!("\\{c}"), why);
            }
            None => {
                return bad(
                    s,
                    "\\",
                    "a lone backslash at the end (use --no-escape, or \\\\)",
                )
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_mean_what_c_says() -> Result<()> {
        assert_eq!(unescape(r"\n\n")?, "\n\n");
        assert_eq!(unescape(r"a\tb\\c\x41\u{1F980}\'")?, "a\tb\\cA🦀'");
        assert_eq!(unescape("plain é")?, "plain é");
        assert!(unescape(r"\q").is_err());
        assert!(unescape("end\\").is_err());
        assert!(unescape(r"\x4").is_err());
        assert!(unescape(r"\u{zz}").is_err());
        Ok(())
    }
}
