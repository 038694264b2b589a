//! Direct logit attribution: how much each part of the model writes a target token's logit at one
//! position, directly (through the residual stream, not through later layers).
//!
//! The final residual stream is a sum of parts: the token and position embeddings, each head's
//! output `z_h · W_O[h]` of every layer, each layer's `c_proj` bias, and each MLP's output. With
//! `ln_f`'s scale frozen at the final residual's (TransformerLens' `apply_ln_to_stack`), `ln_f` is
//! linear: `ln_f(x) = (x - mean(x)) · g / σ + b`, so the logit `ln_f(x) · W_U[:, t]` splits
//! exactly into one term per part plus `b · W_U[:, t]`. The parts sum to the logit, and each equals
//! TransformerLens' `cache.logit_attrs` of `stack_head_results` / `decompose_resid` (tested on
//! goldens from `scripts/make_patching_goldens.py`; a head keeps its value bias `b_V · W_O[h]`, as
//! TransformerLens does with `fold_value_biases` off).

use std::fmt;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};

/// The target logit, taken apart.
#[derive(Debug, Clone, Serialize)]
pub struct Attribution {
    pub position: usize,
    pub target: u32,
    /// The target token's text, for the report: [`attribute`] has no tokenizer, so it leaves
    /// this `None` and the caller fills it in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_text: Option<String>,
    /// The model's logit of `target` at `position`.
    pub logit: f64,
    /// The sum of every part below (equal to `logit` up to rounding).
    pub total: f64,
    pub token_embedding: f64,
    pub position_embedding: f64,
    /// `heads[layer][head]`.
    pub heads: Vec<Vec<f64>>,
    /// Each layer's `c_proj` bias.
    pub attention_bias: Vec<f64>,
    pub mlp: Vec<f64>,
    /// `ln_f`'s bias.
    pub ln_f_bias: f64,
}

/// Everything a DLA needs from one pass, at one position.
struct Parts {
    position: usize,
    embed: Option<Tensor>,
    z: Vec<Option<Tensor>>,
    mlp: Vec<Option<Tensor>>,
    last: Option<Tensor>,
    n_layer: usize,
}

impl Hook for Parts {
    fn wants(&self, p: Point) -> bool {
        matches!(p, Point::Embed | Point::Z(_) | Point::MlpOut(_))
            || p == Point::ResidPost(self.n_layer - 1)
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        // Only the position attributed: (1, T, ...) -> (...).
        let at = t.narrow(1, self.position, 1)?.squeeze(1)?.squeeze(0)?;
        let at = at.to_dtype(DType::F32)?;
        match p {
            Point::Embed => self.embed = Some(at),
            Point::Z(l) => self.z[l] = Some(at),
            Point::MlpOut(l) => self.mlp[l] = Some(at),
            Point::ResidPost(_) => self.last = Some(at),
            _ => {}
        }
        Ok(())
    }
}

/// The direct logit attribution of `target` at `position` (default: the last) of `ids`.
pub fn attribute(
    model: &Gpt2,
    ids: &[u32],
    position: Option<usize>,
    target: u32,
) -> Result<Attribution> {
    let c = model.config();
    let (n, nh, hs) = (c.n_layer, c.n_head, c.head_size());
    let position = position.unwrap_or(ids.len().saturating_sub(1));
    if position >= ids.len() {
        return Err(Error::param(
            "position",
            format!("{position} is past the prompt's {} tokens", ids.len()),
        ));
    }
    if target as usize >= c.vocab_size {
        return Err(Error::param(
            "target",
            format!("token id {target} is outside the vocabulary"),
        ));
    }
    let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut parts = Parts {
        position,
        embed: None,
        z: vec![None; n],
        mlp: vec![None; n],
        last: None,
        n_layer: n,
    };
    let logits = model
        .run(&x, None, Some(&mut parts), Output::All)?
        .ok_or_else(|| Error::Input("no logits".into()))?;
    let logit = logits
        .get(0)?
        .get(position)?
        .get(target as usize)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let missing = || Error::Internal("a part of the residual stream was not seen".into());

    // ln_f frozen at the final residual: x ↦ (x - mean x) · g / σ, then · W_U[:, t].
    let last = parts.last.ok_or_else(missing)?.to_vec1::<f32>()?;
    let (g, b, eps) = model.ln_f()?;
    let g = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let w_u = model.unembedding_column(target)?.to_vec1::<f32>()?;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let m = mean(&last);
    let var = last.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / last.len() as f64;
    let sigma = (var + eps).sqrt();
    let direct = |v: &[f32]| -> f64 {
        let m = mean(v);
        v.iter()
            .zip(&g)
            .zip(&w_u)
            .map(|((&x, &g), &w)| (x as f64 - m) * g as f64 * w as f64)
            .sum::<f64>()
            / sigma
    };
    let embed = parts.embed.ok_or_else(missing)?.to_vec1::<f32>()?;
    let pos_emb = model.position_embedding(position)?.to_vec1::<f32>()?;
    let tok_emb: Vec<f32> = embed.iter().zip(&pos_emb).map(|(e, p)| e - p).collect();
    let mut heads = Vec::with_capacity(n);
    let mut attention_bias = Vec::with_capacity(n);
    let mut mlp = Vec::with_capacity(n);
    for l in 0..n {
        // (nh, hs) z of this position.
        let z = parts.z[l].take().ok_or_else(missing)?.reshape((nh, hs))?;
        let (w_o, b_o) = model.attention_output_weights(l)?;
        let mut row = Vec::with_capacity(nh);
        for h in 0..nh {
            // (1, hs) x (hs, C) -> (C,): what head h writes into the residual stream.
            let w_h = w_o.narrow(0, h * hs, hs)?;
            let out = z
                .narrow(0, h, 1)?
                .matmul(&w_h)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            row.push(direct(&out));
        }
        heads.push(row);
        attention_bias.push(direct(&b_o.to_vec1::<f32>()?));
        mlp.push(direct(
            &parts.mlp[l].take().ok_or_else(missing)?.to_vec1::<f32>()?,
        ));
    }
    let ln_f_bias = b.iter().zip(&w_u).map(|(&b, &w)| b as f64 * w as f64).sum();
    let token_embedding = direct(&tok_emb);
    let position_embedding = direct(&pos_emb);
    let total = token_embedding
        + position_embedding
        + heads.iter().flatten().sum::<f64>()
        + attention_bias.iter().sum::<f64>()
        + mlp.iter().sum::<f64>()
        + ln_f_bias;
    Ok(Attribution {
        position,
        target,
        target_text: None,
        logit,
        total,
        token_embedding,
        position_embedding,
        heads,
        attention_bias,
        mlp,
        ln_f_bias,
    })
}

impl fmt::Display for Attribution {
    /// The logit, its largest parts, and every head in a layers × heads table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The text quoted and escaped as every token is shown (`" Mary"`, `"\n"`).
        let text = self
            .target_text
            .as_ref()
            .map(|t| format!(" {t:?}"))
            .unwrap_or_default();
        writeln!(
            f,
            "logit of token {}{text} at position {}: {:.4} (parts sum to {:.4})",
            self.target, self.position, self.logit, self.total
        )?;
        let mut parts: Vec<(String, f64)> = vec![
            ("token embedding".into(), self.token_embedding),
            ("position embedding".into(), self.position_embedding),
            ("ln_f bias".into(), self.ln_f_bias),
        ];
        for (l, row) in self.heads.iter().enumerate() {
            parts.extend(
                row.iter()
                    .enumerate()
                    .map(|(h, v)| (format!("head {l}.{h}"), *v)),
            );
            parts.push((format!("attn bias {l}"), self.attention_bias[l]));
            parts.push((format!("mlp {l}"), self.mlp[l]));
        }
        parts.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        writeln!(f, "largest parts:")?;
        for (name, v) in parts.iter().take(12) {
            writeln!(f, "  {name:<20} {v:+.4}")?;
        }
        writeln!(f, "\nheads (layer x head):")?;
        for (l, row) in self.heads.iter().enumerate() {
            write!(f, "{l:>5}")?;
            for v in row {
                write!(f, " {v:>+7.3}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
