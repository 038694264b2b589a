//! Patching averaged over a dataset of prompt pairs, as TransformerLens users average: the IOI
//! demos (TransformerLens' "Exploratory Analysis Demo", ARENA's IOI exercises) patch a batch of
//! prompts at once and normalise the batch's *mean* logit difference,
//! `(mean patched − mean corrupted) / (mean clean − mean corrupted)`, with the baselines
//! averaged the same way; Wang et al. report the mean logit difference over the dataset.
//! So: each pair is patched at the same index (layer, position, head), the metric is averaged
//! over the pairs, then normalised — not normalised per pair and then averaged.
//!
//! A batch row's forward pass does not see the other rows, so the mean over pairs patched one
//! pair at a time is TransformerLens' batched result exactly.

use serde::Serialize;

use std::collections::BTreeMap;

use super::{acts_of, patch_batch, resolve, Axis, By, Ids, Metric, Patching, What};
use crate::error::{Error, Result};
use crate::model::Gpt2;

/// One prompt pair of a dataset, with its own metric (in IOI, each prompt's own names).
#[derive(Debug, Clone)]
pub struct Pair {
    pub clean: Vec<u32>,
    pub corrupted: Vec<u32>,
    pub metric: Metric,
    /// What errors call it (`pairs.jsonl line 3`).
    pub label: String,
}

/// One pair of an averaged result: its metric, position and unpatched values.
#[derive(Debug, Clone, Serialize)]
pub struct PairRun {
    pub metric: Metric,
    pub position: usize,
    pub clean: f64,
    pub corrupted: f64,
}

/// Whether a result of `by` has a position axis (for `head_pattern` by head and position: the
/// destination positions).
fn has_pos_axis(by: By) -> bool {
    matches!(by, By::Pos | By::HeadPos)
}

/// Checks every pair before any pass: the same length within a pair, in range, and (for a
/// result with a position axis) the same length as the first pair.
pub(super) fn check_pairs(
    model: &Gpt2,
    pairs: &[Pair],
    by: By,
    position: Option<isize>,
) -> Result<()> {
    let Some(first) = pairs.first() else {
        return Err(Error::param("pairs", "holds no pair: nothing to average"));
    };
    let vocab = model.config().vocab_size;
    for p in pairs {
        let (t, label) = (p.clean.len(), &p.label);
        if t == 0 {
            return Err(Error::param(
                "pairs",
                format!("{label}: the prompts are empty"),
            ));
        }
        if p.corrupted.len() != t {
            return Err(Error::param(
                "pairs",
                format!(
                    "{label}: the corrupted prompt is {} tokens and the clean one {t}: \
                     activation patching needs prompts of the same length in tokens (as \
                     TransformerLens requires)",
                    p.corrupted.len()
                ),
            ));
        }
        resolve(position, t, Some(label))?;
        if let Some(bad) = p.metric.tokens().into_iter().find(|&x| x as usize >= vocab) {
            return Err(Error::param(
                "pairs",
                format!("{label}: token id {bad} is outside the vocabulary (0..{vocab})"),
            ));
        }
        if has_pos_axis(by) && t != first.clean.len() {
            return Err(Error::param(
                "by",
                format!(
                    "{by} averages position by position, which needs every pair the same \
                     length (as TransformerLens' batches): {label} is {t} tokens and {} is {} \
                     (use --by head or layer, which patch every position at once)",
                    first.label,
                    first.clean.len()
                ),
            ));
        }
        if p.metric.name() != first.metric.name() {
            return Err(Error::param(
                "pairs",
                format!(
                    "{label} is measured by {} and {} by {}: one metric for all",
                    p.metric.name(),
                    first.label,
                    first.metric.name()
                ),
            ));
        }
    }
    Ok(())
}

/// Pairs per batch: about 1024 tokens of each kind of prompt, at least one pair.
fn pairs_per_batch(t: usize) -> usize {
    (1024 / t.max(1)).max(1)
}

/// The indices of `keys` grouped by key (prompts of one key have one length, `tokens(key)`),
/// in order within a key, each group cut into batches of [`pairs_per_batch`].
pub(crate) fn batches_by<K: Ord + Clone>(
    keys: &[K],
    tokens: impl Fn(&K) -> usize,
) -> Vec<(K, Vec<usize>)> {
    let mut groups: BTreeMap<K, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        groups.entry(k.clone()).or_default().push(i);
    }
    groups
        .into_iter()
        .flat_map(|(k, idx)| {
            idx.chunks(pairs_per_batch(tokens(&k)))
                .map(|c| (k.clone(), c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `pairs` in batches of one length, each with the position measured there ([`resolve`]d:
/// `-1` is each length's last). Pairs are grouped by where their prompts first differ too: a
/// batch runs only the positions after those all its pairs share ([`super::batch::Prefix`]).
pub(super) fn batches(pairs: &[Pair], position: Option<isize>) -> Result<Vec<(usize, Vec<usize>)>> {
    let keys: Vec<(usize, usize)> = pairs
        .iter()
        .map(|p| {
            let alike = p.clean.iter().zip(&p.corrupted).take_while(|(a, b)| a == b);
            (p.clean.len(), alike.count())
        })
        .collect();
    batches_by(&keys, |&(t, _)| t)
        .into_iter()
        .map(|((t, _), idx)| Ok((resolve(position, t, None)?, idx)))
        .collect()
}

/// Activation patching averaged over `pairs` (see the module's words): each pair patched as
/// [`activation_patch`](super::activation_patch) patches one, measured at `position` (default:
/// each pair's last; negative counts from each pair's end), the metric averaged over the pairs
/// at every index, then normalised by the averaged baselines. The result's `metric` and
/// `position` are the first pair's, `pairs` each one's; for one pair it is
/// [`activation_patch`](super::activation_patch)'s result with `pairs` of one. Pairs of one
/// length run as batches ([`patch_batch`]); the sums are taken in the pairs' order all the same.
pub fn activation_patch_mean(
    model: &Gpt2,
    pairs: &[Pair],
    what: What,
    by: By,
    position: Option<isize>,
) -> Result<Patching> {
    check_pairs(model, pairs, by, position)?;
    let acts = acts_of(what, by)?;
    let mut runs: Vec<Option<PairRun>> = vec![None; pairs.len()];
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    // The batch of the first pair: the result's axes.
    let mut first = None;
    for (at, idx) in batches(pairs, position)? {
        let ids: Vec<Ids> = idx.iter().map(|&i| Ids::from(&pairs[i])).collect();
        let mut r = patch_batch(model, &ids, &acts, what, by, at)?;
        for (k, &i) in idx.iter().enumerate() {
            runs[i] = Some(PairRun {
                metric: pairs[i].metric,
                position: at,
                clean: r.clean[k],
                corrupted: r.corrupted[k],
            });
            values[i] = std::mem::take(&mut r.patched[k]);
        }
        if idx.first() == Some(&0) {
            first = Some(r);
        }
    }
    let runs: Vec<PairRun> = runs.into_iter().flatten().collect();
    let (Some(first), Some(base)) = (first, runs.first()) else {
        return Err(Error::param("pairs", "holds no pair"));
    };
    if runs.len() != pairs.len() {
        return Err(Error::Internal("a pair was in no batch".into()));
    }
    let mut sum = values[0].clone();
    for (p, v) in pairs.iter().zip(&values).skip(1) {
        if v.len() != sum.len() {
            // Only a position axis can differ, and check_pairs ruled that out.
            return Err(Error::Internal(format!(
                "{}: {} values against {}",
                p.label,
                v.len(),
                sum.len()
            )));
        }
        sum.iter_mut().zip(v).for_each(|(a, b)| *a += b);
    }
    let n = pairs.len() as f64;
    let mean = PairRun {
        metric: base.metric,
        position: base.position,
        clean: runs.iter().map(|r| r.clean).sum::<f64>() / n,
        corrupted: runs.iter().map(|r| r.corrupted).sum::<f64>() / n,
    };
    sum.iter_mut().for_each(|v| *v /= n);
    let mut m = first.result(model, what, by, &mean, sum);
    m.pairs = runs;
    debug_assert!(m.axes.contains(&Axis::Layer));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_positional_results_need_pairs_of_one_length() {
        assert!(has_pos_axis(By::Pos) && has_pos_axis(By::HeadPos));
        assert!(!has_pos_axis(By::Head) && !has_pos_axis(By::Layer));
    }
}
