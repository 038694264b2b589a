//! One self-contained HTML page (no network, no CDN): a model view with one canvas thumbnail per
//! head (layers × heads, each labelled with its [`HeadType`](super::scores::HeadType)), a click on
//! one opens it in the head view below: a layer and head selector, a bertviz-style
//! head view (queries left, keys right, lines as strong as the weights), a heatmap whose cells show
//! the weight and both tokens on hover (its axes labelled with the tokens where they fit), and each
//! query's most-attended token.
//!
//! Each layer's attention is one byte per weight (base64, decoded by the page one layer at a time),
//! in a `<script type="application/json">` element with `<`, `>` and `&`
//! escaped as `\u003c`..., so no token can close it, and the page puts token text in the document
//! only through `textContent`: a prompt full of markup stays text.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::scores::ScoreTable;
use super::{Header, LayerAttention, Out, Sink};
use crate::error::Result;

const TEMPLATE: &str = include_str!("head_view.html");
const DATA: &str = "{{DATA}}";
const LAYERS: &str = "{{LAYERS}}";

pub(crate) struct HtmlSink {
    out: Out,
    /// The template after the data.
    rest: &'static str,
}

impl HtmlSink {
    /// `labels`: the heads' scores, shown on the thumbnails (none: unlabelled).
    pub(crate) fn new(mut out: Out, h: &Header<'_>, labels: Option<&ScoreTable>) -> Result<Self> {
        let (before, rest) = TEMPLATE.split_once(DATA).unwrap_or((TEMPLATE, ""));
        let (between, rest) = rest.split_once(LAYERS).unwrap_or((rest, ""));
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
        out.bytes(script_json(&head).as_bytes())?;
        out.bytes(between.as_bytes())?;
        Ok(Self { out, rest })
    }
}

impl Sink for HtmlSink {
    fn layer(&mut self, a: &LayerAttention) -> Result<()> {
        // Rows keep only their keys 0..=q (the rest are zero), each weight one byte (w·255
        // rounded): 1/255 is finer than a colour step, and GPT-2 XL's 1200 heads at 1024 tokens
        // stay 630 MB instead of gigabytes of decimals. Exact numbers are in json/npy/safetensors.
        let mut bytes = Vec::with_capacity(a.heads.len() * a.len * (a.len + 1) / 2);
        for i in 0..a.heads.len() {
            for q in 0..a.len {
                bytes.extend(a.row(i, q)[..=q].iter().map(|&w| byte(w)));
            }
        }
        // Base64 has no `<`: nothing in it can close the element.
        crate::interrupt::check()?;
        let mut s = String::with_capacity(bytes.len() * 4 / 3 + 80);
        s.push_str(&format!(
            "<script type=\"text/plain\" class=\"layer-bytes\" data-layer=\"{}\">",
            a.layer
        ));
        // Standard base64 (RFC 4648, with padding): what the page's `atob` reads.
        STANDARD.encode_string(&bytes, &mut s);
        s.push_str("</script>\n");
        self.out.bytes(s.as_bytes())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.out.bytes(self.rest.as_bytes())?;
        self.out.finish()
    }
}

/// An attention weight in [0, 1] as `round(w · 255)`; anything else is 0.
fn byte(w: f32) -> u8 {
    if w.is_finite() {
        (w.clamp(0.0, 1.0) * 255.0).round() as u8
    } else {
        0
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
    fn weights_are_bytes_in_base64() {
        assert_eq!(byte(0.0), 0);
        assert_eq!(byte(1.0), 255);
        assert_eq!(byte(0.5), 128);
        assert_eq!(byte(0.25), 64);
        assert_eq!(byte(f32::NAN), 0);
        assert_eq!(byte(2.0), 255);
        // RFC 4648's test vectors.
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(STANDARD.encode(raw), enc, "{raw}");
        }
        assert_eq!(STANDARD.encode([0xff, 0xfe, 0x00]), "//4A");
        assert!(
            TEMPLATE.contains(DATA) && TEMPLATE.contains(LAYERS) && TEMPLATE.contains("{{TITLE}}")
        );
    }
}
