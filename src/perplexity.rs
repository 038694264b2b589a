//! Perplexity of a text under the model, computed exactly as transformers' documented
//! sliding-window recipe (<https://huggingface.co/docs/transformers/perplexity>): windows of
//! `n_positions` tokens starting every `stride` tokens; each scores only the tokens no earlier
//! window scored (the others are context), with the loss averaged over them; the windows'
//! losses are weighted by that count *minus one* (the recipe subtracts the batch size for the
//! label shift, also where no label was dropped) and `exp` of the weighted mean is the perplexity.
//! Reproducing that quirk is the point: the number then equals transformers' own.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};

/// The result, with what it was measured over.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Perplexity {
    pub perplexity: f64,
    /// The recipe's weighted mean negative log-likelihood, in nats.
    pub mean_nll: f64,
    /// Tokens of the text.
    pub tokens: usize,
    /// The weight of the mean: Σ over windows of (scored tokens - 1).
    pub weighted_tokens: usize,
    pub windows: usize,
    /// Window length (the model's `n_positions`) and step.
    pub max_length: usize,
    pub stride: usize,
}

/// Positions of residual stream kept per LM-head call: the head over a whole window at once would
/// hold (n_positions, vocab) logits (200 MB for GPT-2).
const HEAD_ROWS: usize = 64;

/// The residual stream after the last block.
struct LastResidual {
    layer: usize,
    x: Option<Tensor>,
}

impl Hook for LastResidual {
    fn wants(&self, p: Point) -> bool {
        p == Point::ResidPost(self.layer)
    }

    fn at(&mut self, _: Point, t: &mut Tensor) -> Result<()> {
        self.x = Some(t.clone());
        Ok(())
    }
}

/// Perplexity of `ids` with windows every `stride` tokens (default `n_positions / 2`);
/// `progress(done, total)` after each window. `hook` sees every window's pass (to measure an
/// ablated model, say).
pub fn perplexity(
    model: &Gpt2,
    ids: &[u32],
    stride: Option<usize>,
    mut hook: Option<&mut (dyn Hook + '_)>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let max_length = model.config().n_positions;
    let stride = stride.unwrap_or((max_length / 2).max(1));
    if stride == 0 || stride > max_length {
        return Err(Error::param(
            "stride",
            format!("{stride} must be between 1 and the context ({max_length})"),
        ));
    }
    let n = ids.len();
    if n < 2 {
        return Err(Error::Input(format!(
            "the text is {n} token(s); perplexity needs at least 2"
        )));
    }
    let total = n.saturating_sub(max_length).div_ceil(stride) + 1;
    let (mut nll_sum, mut weight) = (0f64, 0usize);
    let (mut prev_end, mut windows) = (0, 0);
    for begin in (0..n).step_by(stride) {
        crate::interrupt::check()?;
        let end = (begin + max_length).min(n);
        let trg_len = end - prev_end;
        let window = &ids[begin..end];
        // Labels j of the window are scored when j >= len - trg_len (and j >= 1: the shift).
        let first = (window.len() - trg_len).max(1);
        let loss = window_loss(model, window, first, hook.as_deref_mut())?;
        // transformers: num_loss_tokens = num_valid_tokens - batch_size.
        let num_loss_tokens = trg_len - 1;
        nll_sum += loss * num_loss_tokens as f64;
        weight += num_loss_tokens;
        prev_end = end;
        windows += 1;
        progress(windows, total);
        if end == n {
            break;
        }
    }
    if weight == 0 {
        return Err(Error::Input("no token was scored".into()));
    }
    let mean_nll = nll_sum / weight as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens: n,
        weighted_tokens: weight,
        windows,
        max_length,
        stride,
    })
}

/// Mean of `-log p(window[j] | window[..j])` over `j` in `first..len`.
fn window_loss(
    model: &Gpt2,
    window: &[u32],
    first: usize,
    hook: Option<&mut (dyn Hook + '_)>,
) -> Result<f64> {
    let last = model.config().n_layer - 1;
    let ids = Tensor::new(window, model.device())?.unsqueeze(0)?;
    let mut resid = LastResidual {
        layer: last,
        x: None,
    };
    match hook {
        // Both hooks see the pass: the caller's first, ours last (it only reads).
        Some(h) => {
            let mut both = crate::hooks::HookPair(h, &mut resid);
            model.run(&ids, None, Some(&mut both), Output::StopAfter(last))?;
        }
        None => {
            model.run(&ids, None, Some(&mut resid), Output::StopAfter(last))?;
        }
    }
    let x = resid
        .x
        .ok_or_else(|| Error::Internal("the pass gave no residual stream".into()))?;
    // Position i predicts token i + 1: positions first-1 .. len-1.
    let (mut sum, mut count) = (0f64, 0usize);
    let mut pos = first - 1;
    while pos < window.len() - 1 {
        let rows = HEAD_ROWS.min(window.len() - 1 - pos);
        let logits = model
            .unembed(&x.narrow(1, pos, rows)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (r, row) in logits.iter().enumerate() {
            let target = window[pos + r + 1] as usize;
            sum -= log_softmax_at(row, target);
            count += 1;
        }
        pos += rows;
    }
    Ok(sum / count as f64)
}

/// `log softmax(row)[i]`, in f64.
pub fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    row[i] as f64 - log_sum_exp(row)
}

/// `log Σ exp(row)`, in f64, shifted by the largest value so nothing overflows.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    row.iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{tiny_config, tiny_model};

    fn model() -> Result<Gpt2> {
        tiny_model(tiny_config(64, 16, 2), 3)
    }

    /// The recipe written out naively: full logits of each window, no chunking.
    fn naive(model: &Gpt2, ids: &[u32], stride: usize) -> Result<f64> {
        let max = model.config().n_positions;
        let (mut nll, mut w, mut prev) = (0f64, 0usize, 0usize);
        for begin in (0..ids.len()).step_by(stride) {
            let end = (begin + max).min(ids.len());
            let trg = end - prev;
            let win = &ids[begin..end];
            let logits = model
                .forward(&Tensor::new(win, model.device())?.unsqueeze(0)?, None)?
                .squeeze(0)?
                .to_vec2::<f32>()?;
            let mut labels: Vec<i64> = win.iter().map(|&i| i as i64).collect();
            let masked = win.len() - trg;
            labels[..masked].iter_mut().for_each(|l| *l = -100);
            let (mut s, mut c) = (0f64, 0usize);
            for j in 1..win.len() {
                if labels[j] >= 0 {
                    s -= log_softmax_at(&logits[j - 1], labels[j] as usize);
                    c += 1;
                }
            }
            let valid = labels.iter().filter(|&&l| l >= 0).count();
            nll += s / c as f64 * (valid - 1) as f64;
            w += valid - 1;
            prev = end;
            if end == ids.len() {
                break;
            }
        }
        Ok((nll / w as f64).exp())
    }

    #[test]
    fn equals_the_recipe_for_every_stride() -> Result<()> {
        let m = model()?;
        let ids: Vec<u32> = (0..53u32).map(|i| (i * 7 + i * i) % 64).collect();
        for stride in [1, 5, 8, 16] {
            let got = perplexity(&m, &ids, Some(stride), None, |_, _| {})?;
            let want = naive(&m, &ids, stride)?;
            // The same sums; the LM head runs in chunks (another summation order in the logits).
            assert!(
                (got.perplexity - want).abs() < 1e-5 * want,
                "{stride}: {got:?} vs {want}"
            );
        }
        // One window when the text fits.
        let short = perplexity(&m, &ids[..10], None, None, |_, _| {})?;
        assert_eq!((short.windows, short.weighted_tokens), (1, 9));
        assert!(perplexity(&m, &ids, Some(0), None, |_, _| {}).is_err());
        assert!(perplexity(&m, &ids[..1], None, None, |_, _| {}).is_err());
        Ok(())
    }
}
