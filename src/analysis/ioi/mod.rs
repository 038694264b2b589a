//! The IOI toolkit (Wang et al. 2022, "Interpretability in the Wild"): the paper's dataset
//! ([`dataset`]) and its standard experiments on a model, each one library call of the patching
//! module over the dataset's pairs (clean = IOI, corrupted = ABC, measured by
//! `logit(IO) − logit(S)` at the end):
//!
//! - the clean and ABC logit differences and the fraction of prompts where IO beats S;
//! - head patching (`head_out` by head, the ABC run with each head from the IOI run);
//! - path patching from every head to the logits (the name movers) and to the name movers'
//!   queries (the S-inhibition heads);
//! - mean ablation of chosen heads: each head's output replaced by its mean over the ABC prompts
//!   of the same template (and length), position by position, as the paper's mean ablation and
//!   ARENA's `compute_means_by_template`.

pub mod dataset;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::ablation::HeadId;
use super::patching::{
    activation_patch_mean, batches_by, path_patch_mean, run_with_cache, Act, By, Metric, Pair,
    Patching, PathPatching, PathTo, Receivers, Senders, What,
};
use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};

pub use dataset::{generate, pairs, single_token_names, IoiPrompt, Order, NAMES};

/// The experiments [`run`] can do besides the baseline.
#[derive(Debug, Clone, Default)]
pub struct Experiments {
    /// Head patching on the logit difference.
    pub heads: bool,
    /// Path patching from every head to the logits.
    pub path_logits: bool,
    /// Path patching from every head to these heads' queries (the name movers).
    pub path_queries: Option<Vec<HeadId>>,
    /// Mean ablation of these heads.
    pub ablate: Option<Vec<HeadId>>,
}

/// The logit difference of a set of runs: its mean and the fraction where IO beats S.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LogitDiff {
    pub mean: f64,
    pub io_beats_s: f64,
}

impl LogitDiff {
    fn of(diffs: &[f64]) -> Self {
        let n = diffs.len().max(1) as f64;
        Self {
            mean: diffs.iter().sum::<f64>() / n,
            io_beats_s: diffs.iter().filter(|&&d| d > 0.0).count() as f64 / n,
        }
    }
}

/// Mean ablation's result.
#[derive(Debug, Clone, Serialize)]
pub struct Ablation {
    pub heads: Vec<HeadId>,
    /// The IOI prompts' logit difference with the heads mean-ablated.
    pub ablated: LogitDiff,
}

/// What [`run`] found.
#[derive(Debug, Clone, Serialize)]
pub struct IoiReport {
    pub prompts: usize,
    /// The IOI prompts' logit difference, and the ABC prompts' (measured by the same IO and S).
    pub clean: LogitDiff,
    pub corrupted: LogitDiff,
    /// Each prompt's clean logit difference.
    pub per_prompt: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_patching: Option<Patching>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_to_logits: Option<PathPatching>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_to_queries: Option<PathPatching>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ablation: Option<Ablation>,
}

/// The metric at the last position of each row of one pass of `ids` (prompts of one length)
/// with `hook`, row `j` measured by `metrics[j]`.
fn last_metrics(
    model: &Gpt2,
    ids: &[&[u32]],
    metrics: &[Metric],
    hook: Option<&mut dyn Hook>,
) -> Result<Vec<f64>> {
    let t = ids.first().map_or(0, |x| x.len());
    let flat: Vec<u32> = ids.iter().flat_map(|x| x.iter().copied()).collect();
    let x = Tensor::from_vec(flat, (ids.len(), t), model.device())?;
    let logits = model
        .run(&x, None, hook, Output::Last)?
        .ok_or_else(|| Error::Internal("no logits".into()))?;
    // (B, vocab)
    logits
        .to_vec2::<f32>()?
        .iter()
        .zip(metrics)
        .map(|(row, m)| m.of(row))
        .collect()
}

/// The prompts of `pairs` as batches of one length: the indices of each.
fn by_length(pairs: &[Pair]) -> Vec<Vec<usize>> {
    let lengths: Vec<usize> = pairs.iter().map(|p| p.clean.len()).collect();
    batches_by(&lengths, |&t| t)
        .into_iter()
        .map(|(_, idx)| idx)
        .collect()
}

/// The IOI experiments on `pairs` (from [`pairs`]; `prompts` the same prompts, for mean
/// ablation's templates).
pub fn run(
    model: &Gpt2,
    prompts: &[IoiPrompt],
    pairs: &[Pair],
    experiments: &Experiments,
) -> Result<IoiReport> {
    if pairs.is_empty() {
        return Err(Error::param("n", "no IOI prompts to run"));
    }
    if pairs.len() != prompts.len() {
        return Err(Error::Internal(format!(
            "{} IOI prompts and {} pairs: make the pairs from the prompts",
            prompts.len(),
            pairs.len()
        )));
    }
    let mut clean = vec![0.0; pairs.len()];
    let mut corrupted = vec![0.0; pairs.len()];
    for idx in by_length(pairs) {
        crate::interrupt::check()?;
        let metrics: Vec<Metric> = idx.iter().map(|&i| pairs[i].metric).collect();
        for (out, is_clean) in [(&mut clean, true), (&mut corrupted, false)] {
            let ids: Vec<&[u32]> = idx
                .iter()
                .map(|&i| match is_clean {
                    true => pairs[i].clean.as_slice(),
                    false => pairs[i].corrupted.as_slice(),
                })
                .collect();
            for (&i, v) in idx.iter().zip(last_metrics(model, &ids, &metrics, None)?) {
                out[i] = v;
            }
        }
    }
    let head_patching = experiments
        .heads
        .then(|| activation_patch_mean(model, pairs, What::One(Act::HeadOut), By::Head, None))
        .transpose()?;
    let path_to_logits = experiments
        .path_logits
        .then(|| path_patch_mean(model, pairs, Senders::Heads, &Receivers::logits(), None))
        .transpose()?;
    let path_to_queries = experiments
        .path_queries
        .as_ref()
        .map(|heads| {
            let r = Receivers::heads(PathTo::Q, heads);
            path_patch_mean(model, pairs, Senders::Heads, &r, None)
        })
        .transpose()?;
    let ablation = experiments
        .ablate
        .as_ref()
        .map(|heads| mean_ablate(model, prompts, pairs, heads))
        .transpose()?;
    Ok(IoiReport {
        prompts: pairs.len(),
        clean: LogitDiff::of(&clean),
        corrupted: LogitDiff::of(&corrupted),
        per_prompt: clean,
        head_patching,
        path_to_logits,
        path_to_queries,
        ablation,
    })
}

/// Replaces heads' outputs (`hook_z`) by their means: per layer, the mean (1, T, H, d) and the
/// (1, 1, H, 1) mask of the heads ablated, broadcast over a batch of prompts of one group.
struct MeanAblate {
    layers: BTreeMap<usize, (Tensor, Tensor, Tensor)>,
}

impl Hook for MeanAblate {
    fn wants(&self, p: Point) -> bool {
        matches!(p, Point::Z(l) if self.layers.contains_key(&l))
    }

    fn at(&mut self, p: Point, z: &mut Tensor) -> Result<()> {
        if let Point::Z(l) = p {
            if let Some((mean, keep, take)) = self.layers.get(&l) {
                *z = z
                    .broadcast_mul(keep)?
                    .broadcast_add(&mean.broadcast_mul(take)?)?;
            }
        }
        Ok(())
    }
}

/// The IOI prompts' logit difference with `heads` replaced by their mean over the ABC prompts of
/// the same template and token length, position by position.
pub fn mean_ablate(
    model: &Gpt2,
    prompts: &[IoiPrompt],
    pairs: &[Pair],
    heads: &[HeadId],
) -> Result<Ablation> {
    let c = model.config();
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for h in heads {
        if h.layer >= c.n_layer || h.head >= c.n_head {
            return Err(Error::param(
                "ablate",
                format!(
                    "{h}: the model has {} layers of {} heads (0..={}.0..={})",
                    c.n_layer,
                    c.n_head,
                    c.n_layer - 1,
                    c.n_head - 1
                ),
            ));
        }
        by_layer.entry(h.layer).or_default().push(h.head);
    }
    let names: Vec<String> = by_layer
        .keys()
        .map(|l| format!("blocks.{l}.attn.hook_z"))
        .collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // The prompts by (template, length), in batches.
    let mut keys = Vec::with_capacity(pairs.len());
    for (q, p) in prompts.iter().zip(pairs) {
        if p.clean.len() != p.corrupted.len() {
            return Err(Error::Internal(format!(
                "{}: IOI and ABC prompts of other lengths",
                p.label
            )));
        }
        keys.push((q.template, p.clean.len()));
    }
    let batches = batches_by(&keys, |k| k.1);
    let ids = |idx: &[usize], clean: bool| -> Vec<&[u32]> {
        idx.iter()
            .map(|&i| match clean {
                true => pairs[i].clean.as_slice(),
                false => pairs[i].corrupted.as_slice(),
            })
            .collect()
    };
    // The ABC prompts' z summed per group, (1, T, H, d) f32 per layer, then divided.
    let mut groups: BTreeMap<(usize, usize), (usize, Vec<Tensor>)> = BTreeMap::new();
    for (key, idx) in &batches {
        crate::interrupt::check()?;
        let abc = ids(idx, false);
        let flat: Vec<u32> = abc.iter().flat_map(|x| x.iter().copied()).collect();
        let x = Tensor::from_vec(flat, (abc.len(), key.1), model.device())?;
        let cache = run_with_cache(model, &x, &name_refs)?;
        // (B, T, H, d) -> (1, T, H, d)
        let zs = names
            .iter()
            .map(|n| Ok(cache.need(n)?.to_dtype(DType::F32)?.sum_keepdim(0)?))
            .collect::<Result<Vec<_>>>()?;
        match groups.get_mut(key) {
            None => {
                groups.insert(*key, (idx.len(), zs));
            }
            Some((n, sums)) => {
                *n += idx.len();
                for (s, z) in sums.iter_mut().zip(zs) {
                    *s = (&*s + z)?;
                }
            }
        }
    }
    let mut diffs = vec![0.0; pairs.len()];
    for (key, idx) in &batches {
        crate::interrupt::check()?;
        let (n, sums) = groups
            .get(key)
            .ok_or_else(|| Error::Internal("no ABC group for a prompt".into()))?;
        let mut layers = BTreeMap::new();
        for ((&l, hs), sum) in by_layer.iter().zip(sums) {
            let dtype = model.act_dtype();
            // (1, T, H, d): the group's mean.
            let mean = (sum / *n as f64)?.to_dtype(dtype)?;
            let mut take = vec![0f32; c.n_head];
            for &h in hs {
                take[h] = 1.0;
            }
            let take =
                Tensor::from_vec(take, (1, 1, c.n_head, 1), model.device())?.to_dtype(dtype)?;
            let keep = take.affine(-1.0, 1.0)?;
            layers.insert(l, (mean, keep, take));
        }
        let mut hook = MeanAblate { layers };
        let metrics: Vec<Metric> = idx.iter().map(|&i| pairs[i].metric).collect();
        let got = last_metrics(model, &ids(idx, true), &metrics, Some(&mut hook))?;
        for (&i, v) in idx.iter().zip(got) {
            diffs[i] = v;
        }
    }
    let mut heads = heads.to_vec();
    heads.sort();
    heads.dedup();
    Ok(Ablation {
        heads,
        ablated: LogitDiff::of(&diffs),
    })
}
