//! The logit lens (nostalgebraist, 2020): what the model would predict if it stopped after each
//! layer: `ln_f(residual after layer L) · Wteᵀ`, softmaxed, for every position.
//!
//! Each layer's residual gets its own `ln_f` statistics (mean and variance of *that* residual),
//! as TransformerLens' `apply_ln_to_stack` does per position; reusing the final layer's scale for
//! earlier layers is the classic mistake (TransformerLens#1076). After the last layer the lens is
//! the model's own prediction.

use std::fmt;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};
use crate::tokenizer::Tokenizer;

/// One predicted token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Guess {
    pub token: u32,
    pub text: String,
    pub prob: f32,
}

/// The lens over every layer: `top[row][position]` is the `k` most likely next tokens.
#[derive(Debug, Clone, Serialize)]
pub struct LogitLens {
    /// Row names: `embed`, then `0` .. `n_layer - 1` (the residual after that block).
    pub rows: Vec<String>,
    /// The prompt's tokens, as text.
    pub tokens: Vec<String>,
    pub top: Vec<Vec<Vec<Guess>>>,
}

/// Every residual stream of one pass: the embeddings, then after each block.
struct Residuals(Vec<Tensor>);

impl Hook for Residuals {
    fn wants(&self, p: Point) -> bool {
        matches!(p, Point::Embed | Point::ResidPost(_))
    }

    fn at(&mut self, _: Point, t: &mut Tensor) -> Result<()> {
        self.0.push(t.clone());
        Ok(())
    }
}

/// The lens of `ids` (one sequence), with the `k` most likely tokens at each row and position.
/// `hook` sees the pass too (to look through an ablated model, say).
pub fn logit_lens(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    ids: &[u32],
    k: usize,
    hook: Option<&mut (dyn Hook + '_)>,
) -> Result<LogitLens> {
    if k == 0 {
        return Err(Error::param("top_k", "must be at least 1"));
    }
    let n = model.config().n_layer;
    let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut res = Residuals(Vec::with_capacity(n + 1));
    match hook {
        Some(h) => {
            let mut both = crate::hooks::HookPair(h, &mut res);
            model.run(&x, None, Some(&mut both), Output::StopAfter(n - 1))?;
        }
        None => {
            model.run(&x, None, Some(&mut res), Output::StopAfter(n - 1))?;
        }
    }
    let mut top = Vec::with_capacity(res.0.len());
    for r in &res.0 {
        crate::interrupt::check()?;
        // (1, T, C) -> (T, vocab): ln_f with this residual's own statistics, then the head.
        let probs = candle_nn::ops::softmax_last_dim(&model.unembed(r)?.squeeze(0)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let row = probs
            .iter()
            .map(|p| best(p, k, tokenizer))
            .collect::<Result<Vec<_>>>()?;
        top.push(row);
    }
    let rows = std::iter::once("embed".to_string())
        .chain((0..n).map(|l| l.to_string()))
        .collect();
    let tokens = ids
        .iter()
        .map(|&i| tokenizer.decode(&[i]))
        .collect::<Result<_>>()?;
    Ok(LogitLens { rows, tokens, top })
}

/// The `k` largest probabilities, largest first (the lower id on ties).
fn best(p: &[f32], k: usize, tokenizer: &Tokenizer) -> Result<Vec<Guess>> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    let k = k.min(p.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut idx = idx[..k].to_vec();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| {
            Ok(Guess {
                token: i as u32,
                text: tokenizer.decode(&[i as u32])?,
                prob: p[i],
            })
        })
        .collect()
}

impl fmt::Display for LogitLens {
    /// One block per position: each row's best guess and its probability.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (pos, token) in self.tokens.iter().enumerate() {
            writeln!(f, "position {pos} {token:?} -> next token:")?;
            for (name, row) in self.rows.iter().zip(&self.top) {
                let guesses: Vec<String> = row[pos]
                    .iter()
                    .map(|g| format!("{:?} {:.3}", g.text, g.prob))
                    .collect();
                writeln!(f, "  {name:>5}  {}", guesses.join("  "))?;
            }
        }
        Ok(())
    }
}
