//! One self-contained HTML page (no network, no CDN): a model view with one canvas thumbnail per
//! head (layers × heads, each labelled with its [`HeadType`](super::scores::HeadType)), a click on
//! one opens it in the head view below: a layer and head selector, a bertviz-style
//! head view (queries left, keys right, lines as strong as the weights), a heatmap whose cells show
//! the weight and both tokens on hover (its axes labelled with the tokens where they fit), and each
//! query's most-attended token.
//!
//! The attention sits in a `<script type="application/json">` element with `<`, `>` and `&`
//! escaped as `\u003c`..., so no token can close it, and the page puts token text in the document
//! only through `textContent`: a prompt full of markup stays text.

use super::scores::ScoreTable;
use super::{Header, LayerAttention, Out, Sink};
use crate::error::Result;

const TEMPLATE: &str = include_str!("head_view.html");
const DATA: &str = "{{DATA}}";

pub(crate) struct HtmlSink {
    out: Out,
    first: bool,
    /// The template after the data.
    rest: &'static str,
}

impl HtmlSink {
    /// `labels`: the heads' scores, shown on the thumbnails (none: unlabelled).
    pub(crate) fn new(mut out: Out, h: &Header<'_>, labels: Option<&ScoreTable>) -> Result<Self> {
        let (before, rest) = TEMPLATE.split_once(DATA).unwrap_or((TEMPLATE, ""));
        out.bytes(
            before
                .replace("{{TITLE}}", &escape_html(h.model))
                .as_bytes(),
        )?;
        let head = serde_json::json!({
            "model": h.model,
            "tokens": h.tokens.text,
            "token_ids": h.tokens.ids,
            "heads": h.selection.heads,
            "labels": labels.map(|t| t.heads.iter().map(|s| serde_json::json!({
                "layer": s.layer,
                "head": s.head,
                "label": s.label.name(),
            })).collect::<Vec<_>>()),
        })
        .to_string();
        // `{...}` without its closing brace, then the layers as they come.
        let head = head.strip_suffix('}').unwrap_or(&head);
        out.bytes(script_json(head).as_bytes())?;
        out.bytes(br#","layers":["#)?;
        Ok(Self {
            out,
            first: true,
            rest,
        })
    }
}

impl Sink for HtmlSink {
    fn layer(&mut self, a: &LayerAttention) -> Result<()> {
        // Rows keep only their keys 0..=q (the rest are zero); 5 decimals are plenty to look at.
        let mut s = String::with_capacity(a.heads.len() * a.len * a.len * 4);
        if !self.first {
            s.push(',');
        }
        s.push_str(&format!("{{\"layer\":{},\"attention\":[", a.layer));
        for i in 0..a.heads.len() {
            s.push_str(if i == 0 { "[" } else { ",[" });
            for q in 0..a.len {
                s.push_str(if q == 0 { "[" } else { ",[" });
                for (k, &w) in a.row(i, q)[..=q].iter().enumerate() {
                    if k > 0 {
                        s.push(',');
                    }
                    s.push_str(&short(w));
                }
                s.push(']');
            }
            s.push(']');
        }
        s.push_str("]}");
        self.out.bytes(s.as_bytes())?;
        self.first = false;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.out.bytes(b"]}")?;
        self.out.bytes(self.rest.as_bytes())?;
        self.out.finish()
    }
}

/// `w` with at most 5 decimals and no trailing zeros: `0.25`, `1`, `0`.
fn short(w: f32) -> String {
    if !w.is_finite() {
        return "0".into();
    }
    let s = format!("{w:.5}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

/// Text for HTML element content or attribute values.
pub(crate) fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON safe inside a `<script>` element: `<`, `>` and `&` only occur inside JSON strings, where
/// their `\u` escapes mean the same.
pub(crate) fn script_json(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_cannot_escape_its_element() {
        let json = serde_json::json!({ "t": "</script><script>alert(1)</script>&" }).to_string();
        let safe = script_json(&json);
        assert!(!safe.contains('<') && !safe.contains('>'));
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap_or_default();
        assert_eq!(back["t"], "</script><script>alert(1)</script>&");
        assert_eq!(
            escape_html("<b a=\"x\">&'"),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn weights_are_short() {
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(1.0), "1");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(1e-7), "0");
        assert_eq!(short(0.123456), "0.12346");
        assert!(TEMPLATE.contains(DATA) && TEMPLATE.contains("{{TITLE}}"));
    }
}
