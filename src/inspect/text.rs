//! Terminal heatmaps: per head, query rows by key columns in shade blocks with the tokens on both
//! axes, then each query's most-attended token. Fits 80 columns; longer prompts are cut, with a
//! note that says so.

use super::{Header, LayerAttention, Out, Sink};
use crate::error::Result;

/// Terminal width the heatmaps are laid out for.
pub(crate) const WIDTH: usize = 80;
/// Characters of a token shown in a row label.
const LABEL: usize = 8;
/// Lines of the vertical key labels above the columns.
const HEADER_LINES: usize = 6;
/// Shade of a weight: the darkest whose threshold it reaches. Non-linear, so the spread-out
/// weights of long prompts still show.
const SHADES: [(f32, char); 5] = [(0.7, '█'), (0.4, '▓'), (0.2, '▒'), (0.05, '░'), (0.0, ' ')];

/// The shade block for weight `w`.
pub(crate) fn shade(w: f32) -> char {
    SHADES
        .iter()
        .find(|(t, _)| w >= *t)
        .map_or(' ', |&(_, c)| c)
}

/// A token made printable on one line: spaces as `·`, newlines and tabs escaped, and characters
/// that a terminal may draw two columns wide (or that the PNG font lacks, when `ascii`) as `?`.
pub(crate) fn visible(token: &str, ascii: bool) -> String {
    let mut s = String::with_capacity(token.len());
    for c in token.chars() {
        match c {
            ' ' => s.push('·'),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '\r' => s.push_str("\\r"),
            c if c.is_ascii_graphic() => s.push(c),
            // Latin, Greek and Cyrillic letters are one column wide everywhere.
            '\u{a1}'..='\u{2ff}' | '\u{370}'..='\u{52f}' if !ascii => s.push(c),
            _ => s.push('?'),
        }
    }
    s
}

/// `s`, or `...` and its last characters, in at most `n` characters: the end of a long model
/// path says more than its start.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= n {
        return s.to_string();
    }
    let keep = n.saturating_sub(3);
    "..."
        .chars()
        .take(n)
        .chain(chars[chars.len() - keep..].iter().copied())
        .collect()
}

/// The first `n` characters of `s`.
pub(crate) fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

pub(crate) struct TextSink {
    out: Out,
    labels: Vec<String>,
    /// Tokens shown: the first `shown` rows and columns.
    shown: usize,
    index_width: usize,
}

impl TextSink {
    pub(crate) fn new(mut out: Out, h: &Header<'_>) -> Result<Self> {
        let t = h.tokens.len();
        let index_width = (t - 1).to_string().len().max(2);
        // Row label, then two characters per key column.
        let prefix = index_width + 1 + LABEL + 1;
        let shown = t.min((WIDTH - prefix) / 2);
        let labels = h
            .tokens
            .text
            .iter()
            .map(|s| clip(&visible(s, false), LABEL))
            .collect();
        let what = format!(": {t} tokens (rows: queries, columns: keys)");
        let model = tail(h.model, WIDTH.saturating_sub(what.chars().count()));
        out.text(format_args!(
            "{model}{what}\nshades: ' ' <0.05  ░ <0.2  ▒ <0.4  ▓ <0.7  █ >=0.7\n"
        ))?;
        if shown < t {
            out.text(format_args!(
                "note: showing the first {shown} of {t} tokens to fit {WIDTH} columns;\n      --format png, html or json show them all\n"
            ))?;
        }
        Ok(Self {
            out,
            labels,
            shown,
            index_width,
        })
    }

    fn row_label(&self, q: usize) -> String {
        format!("{q:>w$} {:<LABEL$}", self.labels[q], w = self.index_width)
    }
}

impl Sink for TextSink {
    fn layer(&mut self, a: &LayerAttention) -> Result<()> {
        let n = self.shown;
        let blank = " ".repeat(self.index_width + 1 + LABEL + 1);
        let depth = self.labels[..n]
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0)
            .min(HEADER_LINES);
        for (i, &head) in a.heads.iter().enumerate() {
            let mut s = format!("\nlayer {}, head {head}\n", a.layer);
            // Key labels written downwards, one character per line.
            for line in 0..depth {
                let mut l = blank.clone();
                for label in &self.labels[..n] {
                    l.push(label.chars().nth(line).unwrap_or(' '));
                    l.push(' ');
                }
                s.push_str(l.trim_end());
                s.push('\n');
            }
            for q in 0..n {
                let mut l = self.row_label(q);
                l.push(' ');
                for &w in &a.row(i, q)[..n] {
                    let c = shade(w);
                    l.push(c);
                    l.push(c);
                }
                s.push_str(l.trim_end());
                s.push('\n');
            }
            s.push_str("most attended:\n");
            for q in 0..n {
                let row = a.row(i, q);
                let (k, w) = argmax(row);
                s.push_str(&format!(
                    "{} -> {}  {w:.3}\n",
                    self.row_label(q),
                    self.row_label(k)
                ));
            }
            self.out.text(format_args!("{s}"))?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.out.finish()
    }
}

/// The key a row attends to most, and its weight (the first on ties).
pub(crate) fn argmax(row: &[f32]) -> (usize, f32) {
    row.iter().copied().enumerate().fold(
        (0, f32::MIN),
        |best, (k, w)| if w > best.1 { (k, w) } else { best },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_made_one_line_and_narrow() {
        assert_eq!(visible(" cat\n", false), "·cat\\n");
        assert_eq!(visible("café 日本🦀", false), "café·???");
        assert_eq!(visible("café", true), "caf?");
        assert_eq!(clip("abcdef", 3), "abc");
        assert_eq!(tail("abcdef", 5), "...ef");
        assert_eq!(tail("abcdef", 6), "abcdef");
    }

    #[test]
    fn shades_rise_with_the_weight() {
        let s: String = [0.0, 0.05, 0.2, 0.4, 0.7, 1.0].map(shade).iter().collect();
        assert_eq!(s, " ░▒▓██");
        assert_eq!(argmax(&[0.1, 0.6, 0.3]), (1, 0.6));
    }
}
