//! Attention during generation (`gpt2 generate --attention-out FILE --layer ...`): for every
//! generated token, the attention of the query that produced it over the whole context so far
//! (prompt + tokens generated before it), in the chosen layers. Read from the KV-cached decode
//! itself ([`AttentionRecorder`] is a [`Hook`] on each step's pattern): nothing is recomputed.
//!
//! Row `i` is the query that produced generated token `i`: the prompt's last position for the
//! first token (from the prefill), then each decode step's one new query. It sees `P + i` keys.

use serde::Serialize;

use super::export::{safetensors_header, write_npy};
use super::html::{escape_html, script_json};
use super::Format;
use crate::error::{human_bytes, Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::Gpt2;
use crate::output::Out;

/// Collects the last query row of the chosen layers' attention in every forward pass.
#[derive(Debug, Clone)]
pub struct AttentionRecorder {
    layers: Vec<usize>,
    /// `steps[i][j]`: layer `layers[j]`'s (n_head, keys) row-major weights of step i.
    steps: Vec<Vec<Vec<f32>>>,
}

impl AttentionRecorder {
    /// Records `layers` (ascending).
    pub fn new(layers: Vec<usize>) -> Self {
        Self {
            layers,
            steps: Vec::new(),
        }
    }

    /// Records `layers` of `model` for a run of `prompt` tokens and up to `new_tokens` more,
    /// written as `format`, after checking the run can give it: the whole run inside the context
    /// (rows are never slid), and its rows, and the file made of them, inside the memory
    /// available. Errors name the parameter `attention_out`.
    pub fn for_run(
        model: &Gpt2,
        layers: Vec<usize>,
        prompt: usize,
        new_tokens: usize,
        format: Format,
    ) -> Result<Self> {
        let c = model.config();
        if prompt.saturating_add(new_tokens) > c.n_positions {
            return Err(Error::param(
                "attention_out",
                format!(
                    "needs the whole run inside the context: {prompt} prompt tokens + {new_tokens} \
                     new tokens > {} positions",
                    c.n_positions
                ),
            ));
        }
        // Row i holds n_head × (P + i) floats per layer: n·P + n(n-1)/2 keys over n rows (below
        // 2^64 · 2^64: no overflow in u128).
        let (p, n) = (prompt as u128, new_tokens as u128);
        let keys = n * p + n * n.saturating_sub(1) / 2;
        let floats = crate::memory::product(&[layers.len(), c.n_head]).saturating_mul(keys);
        let needed = floats.saturating_mul(bytes_per_float(format));
        let layer_s = if layers.len() == 1 { "" } else { "s" };
        match crate::memory::check(needed, String::new) {
            Err(Error::OutOfMemory { available, .. }) => Err(Error::param(
                "attention_out",
                format!(
                    "recording {} layer{layer_s} of {} heads over {new_tokens} new tokens as {format} \
                     needs {needed} bytes ({}), more than the {} of memory available: record fewer \
                     layers or fewer tokens",
                    layers.len(),
                    c.n_head,
                    human_bytes(needed),
                    human_bytes(available)
                ),
            )),
            other => other.map(|()| Self::new(layers)),
        }
    }

    /// The layers recorded, ascending.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Steps recorded: one per generated token.
    pub fn steps(&self) -> usize {
        self.steps.len()
    }

    /// Step `i`, layer index `j`: (n_head, keys) weights, row-major.
    pub fn row(&self, i: usize, j: usize) -> &[f32] {
        &self.steps[i][j]
    }
}

impl Hook for AttentionRecorder {
    fn wants(&self, p: Point) -> bool {
        matches!(p, Point::Pattern(l) if self.layers.contains(&l))
    }

    fn at(&mut self, p: Point, probs: &mut candle_core::Tensor) -> Result<()> {
        let Point::Pattern(l) = p else {
            return Ok(());
        };
        let j = self.layers.iter().position(|&x| x == l).unwrap_or(0);
        if j == 0 {
            self.steps.push(Vec::with_capacity(self.layers.len()));
        }
        // (1, nh, T, T_k): the last query's row of every head.
        let (_, _, t, _) = probs.dims4()?;
        let row = probs
            .get(0)?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(step) = self.steps.last_mut() {
            step.push(row);
        }
        Ok(())
    }
}

/// What the files say about the run.
#[derive(Debug, Clone, Serialize)]
pub struct GeneratedTokens {
    pub model: String,
    /// Every token of the context, prompt first, as text.
    pub tokens: Vec<String>,
    pub token_ids: Vec<u32>,
    /// How many of them are the prompt's.
    pub prompt_tokens: usize,
    pub layers: Vec<usize>,
    pub n_head: usize,
}

/// Bytes held per recorded weight up to the end of [`write`]: the f32 itself, and npy's and
/// safetensors' padded copy (rows padded to the longest: at most twice the weights), or JSON's
/// value tree (~32 bytes a number) and its text (~16), twice over in the HTML page.
fn bytes_per_float(format: Format) -> u128 {
    match format {
        Format::Npy | Format::Safetensors => 4 + 2 * 4,
        _ => 4 + 4 + 32 + 16 + 16,
    }
}

/// Writes the recorded attention as `format` says: npy (steps, layers, heads, keys) padded with
/// zeros past each row's context, with its tokens in `PATH.json` beside it; safetensors `attn.{layer}` (steps,
/// heads, keys); json (ragged rows); html (a page stepping through the generated tokens).
pub fn write(
    rec: &AttentionRecorder,
    meta: &GeneratedTokens,
    format: Format,
    path: &std::path::Path,
) -> Result<()> {
    let steps = rec.steps().min(meta.tokens.len() - meta.prompt_tokens);
    let keys = meta.prompt_tokens + steps.saturating_sub(1);
    let (nl, nh) = (meta.layers.len(), meta.n_head);
    // Row i sees P + i keys; padded to the longest.
    let padded = |i: usize, j: usize, h: usize| -> Vec<f32> {
        let len = meta.prompt_tokens + i;
        let row = &rec.row(i, j)[h * len..(h + 1) * len];
        let mut v = row.to_vec();
        v.resize(keys, 0.0);
        v
    };
    match format {
        Format::Npy => {
            let shape = [steps, nl, nh, keys];
            let mut data = Vec::with_capacity(steps * nl * nh * keys);
            for i in 0..steps {
                for j in 0..nl {
                    for h in 0..nh {
                        data.extend(padded(i, j, h));
                    }
                }
            }
            let meta = serde_json::json!({
                "axes": ["step", "layer", "head", "key"],
                "row": "step i: the query that produced generated token i, over keys 0..prompt_tokens+i (zeros after)",
                "meta": meta,
            });
            write_npy(path, &shape, &data, meta)
        }
        Format::Safetensors => {
            let metadata = [
                ("model", meta.model.clone()),
                (
                    "tokens",
                    serde_json::to_string(&meta.tokens).unwrap_or_default(),
                ),
                (
                    "token_ids",
                    serde_json::to_string(&meta.token_ids).unwrap_or_default(),
                ),
                ("prompt_tokens", meta.prompt_tokens.to_string()),
                (
                    "layout",
                    concat!(
                        "attn.{layer}: (step, head, key); step i = the query that produced ",
                        "generated token i, zeros past its context"
                    )
                    .into(),
                ),
            ];
            let tensors = meta
                .layers
                .iter()
                .map(|l| (format!("attn.{l}"), vec![steps, nh, keys]));
            // Not safetensors::serialize, whose metadata order is a HashMap's: other every run.
            let mut bytes = safetensors_header(&metadata, tensors)?;
            for j in 0..nl {
                for i in 0..steps {
                    for h in 0..nh {
                        padded(i, j, h)
                            .iter()
                            .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                    }
                }
            }
            let mut out = Out::open(Some(path))?;
            out.bytes(&bytes)?;
            out.finish()
        }
        Format::Json | Format::Html => {
            let layers: Vec<serde_json::Value> = meta
                .layers
                .iter()
                .enumerate()
                .map(|(j, l)| {
                    let steps: Vec<Vec<Vec<f32>>> = (0..steps)
                        .map(|i| {
                            let len = meta.prompt_tokens + i;
                            rec.row(i, j).chunks(len).map(<[f32]>::to_vec).collect()
                        })
                        .collect();
                    serde_json::json!({"layer": l, "steps": steps})
                })
                .collect();
            let data = serde_json::json!({"meta": meta, "layers": layers}).to_string();
            let mut out = Out::open(Some(path))?;
            if format == Format::Json {
                out.bytes(data.as_bytes())?;
                out.bytes(b"\n")?;
            } else {
                let page = PAGE
                    .replace("{{TITLE}}", &escape_html(&meta.model))
                    .replacen("{{DATA}}", &script_json(&data), 1);
                out.bytes(page.as_bytes())?;
            }
            out.finish()
        }
        f => Err(Error::param(
            "format",
            format!(
                "{f} cannot hold attention during generation: use npy, safetensors, json or html"
            ),
        )),
    }
}

const PAGE: &str = include_str!("generated_view.html");
