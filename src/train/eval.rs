//! What an evaluation measures: the held-out loss, the loss on the predictable half of repeated
//! random sequences (in-context learning: what an induction head buys), the copy task's
//! accuracy, and every head's scores as `inspect-heads --scores` computes them. One line of
//! `OUT/metrics.jsonl` each.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use super::data::{repeated_rows, Batch, Task};
use super::Trainer;
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::inspect::scores::{head_scores, HeadType};
use crate::inspect::{LayerChoice, Selection, Tokens};
use crate::model::Gpt2;
use crate::options::LoadOptions;

/// Rows of each evaluation batch.
const EVAL_ROWS: usize = 8;

/// One head's scores at an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct HeadSummary {
    pub layer: usize,
    pub head: usize,
    pub previous_token: Option<f32>,
    pub induction: Option<f32>,
    pub duplicate_token: Option<f32>,
    pub first_token: Option<f32>,
    pub label: HeadType,
}

/// An evaluation after `step` steps.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub step: u64,
    /// The mean loss on held-out data (for a task: its weighted loss on rows no step trains on);
    /// `None` when a file is too short to hold a window out.
    pub held_out_loss: Option<f64>,
    /// The mean loss on the second copy of repeated random sequences (after its first token).
    pub icl_loss: f64,
    /// The copy task: the fraction of the second copy's tokens predicted (arg max).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_accuracy: Option<f64>,
    /// The prompt the heads' prompt-measured scores (previous-token, first-token) come from:
    /// the first held-out row (or the first repeated row).
    pub prompt_ids: Vec<u32>,
    pub heads: Vec<HeadSummary>,
}

impl Evaluation {
    /// The strongest score of `f` over the heads, with its head.
    pub fn best(&self, f: impl Fn(&HeadSummary) -> Option<f32>) -> Option<(f32, usize, usize)> {
        self.heads
            .iter()
            .filter_map(|h| f(h).map(|s| (s, h.layer, h.head)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

impl Trainer {
    /// Measures the model as it is now (no dropout).
    pub fn evaluate(&self) -> Result<Evaluation> {
        let o = &self.options;
        let config = self.config().clone();
        let eval_seed = o.seed ^ 0xE7A1;
        let held = self.data.held_out(EVAL_ROWS, o.seq_len, eval_seed);
        let held_out_loss = match &held {
            Some(b) => Some(self.scalar_loss(b)?),
            None => None,
        };
        let icl = repeated_rows(
            config.vocab_size,
            config.eos_token_id,
            EVAL_ROWS,
            o.seq_len,
            eval_seed,
        );
        let icl_loss = self.scalar_loss(&icl)?;
        let copy_accuracy = match (&held, self.data.task()) {
            (Some(b), Some(Task::Copy)) => Some(self.accuracy(b)?),
            _ => None,
        };
        // Head scores on the inference model, from these weights: exactly `inspect-heads
        // --scores`, prompted with the first held-out row (or the repeated sequence).
        let model = Gpt2::new(
            config.clone(),
            Checkpoint::Tensors(self.weights()?),
            &LoadOptions::default(),
        )?;
        let ids = match &held {
            Some(b) => b.inputs[..b.len].to_vec(),
            None => icl.inputs[..icl.len].to_vec(),
        };
        let tokens = Tokens {
            bos: ids.first() == Some(&config.eos_token_id),
            text: ids
                .iter()
                .map(|&id| self.tokenizer.decode(&[id]).unwrap_or_default())
                .collect(),
            ids: ids.clone(),
        };
        let selection = Selection::new(&config, LayerChoice::All, None)?;
        let table = head_scores(&model, &tokens, &selection)?;
        let heads = table
            .heads
            .iter()
            .map(|h| HeadSummary {
                layer: h.layer,
                head: h.head,
                previous_token: h.previous_token,
                induction: h.induction,
                duplicate_token: h.duplicate_token,
                first_token: h.first_token,
                label: h.label,
            })
            .collect();
        Ok(Evaluation {
            step: self.steps_done(),
            held_out_loss,
            icl_loss,
            copy_accuracy,
            prompt_ids: ids,
            heads,
        })
    }

    fn scalar_loss(&self, batch: &Batch) -> Result<f64> {
        let loss = self.loss(batch, None)?;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// The fraction of weighted targets the arg max of the logits gets right.
    fn accuracy(&self, batch: &Batch) -> Result<f64> {
        let device = self.model_device();
        let ids = Tensor::from_slice(&batch.inputs, (batch.rows, batch.len), &device)?;
        // (B, T, vocab) -> (B·T,)
        let guess: Vec<u32> = self
            .model
            .forward(&ids, None)?
            .argmax(D::Minus1)?
            .flatten_all()?
            .to_vec1()?;
        let weights = batch.weights.as_deref().unwrap_or(&[]);
        let (mut right, mut scored) = (0usize, 0usize);
        for (i, (&g, &t)) in guess.iter().zip(&batch.targets).enumerate() {
            if weights.get(i).copied().unwrap_or(1.0) > 0.0 {
                scored += 1;
                right += usize::from(g == t);
            }
        }
        Ok(right as f64 / scored.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    // Keeps `cross_entropy` honest against a hand computation.
    use super::super::ops::cross_entropy;
    use super::*;

    #[test]
    fn cross_entropy_is_the_mean_and_the_weighted_mean_of_the_nll() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let logits = Tensor::new(&[[0f32, 1.0, 2.0], [1.0, 1.0, 1.0]], &dev)?;
        let targets = Tensor::new(&[2u32, 0], &dev)?;
        let lse0 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        let (a, b) = (lse0 - 2.0, 3f64.ln());
        let mean = cross_entropy(&logits, &targets, None)?.to_scalar::<f32>()?;
        assert!((f64::from(mean) - (a + b) / 2.0).abs() < 1e-6);
        let w = Tensor::new(&[1f32, 0.25], &dev)?;
        let weighted = cross_entropy(&logits, &targets, Some(&w))?.to_scalar::<f32>()?;
        assert!((f64::from(weighted) - (a + 0.25 * b) / 1.25).abs() < 1e-6);
        Ok(())
    }
}
