//! Activation patching, as TransformerLens' `patching.py` computes it: run the corrupted prompt
//! with one activation (a layer's, a position's, a head's) replaced by the clean run's, and
//! measure the output. Also [`run_with_cache`]: one pass returning the activations at
//! TransformerLens' hook names.
//!
//! TransformerLens runs one forward pass per patch. Here a patch at layer L changes nothing
//! below L, so the corrupted run's residual stream entering L is computed once, and every patch
//! of that layer is a row of one batch ([`run_from`](Gpt2::run_from) from L): row `r` takes the
//! clean value where its mask is 1 and keeps the corrupted one elsewhere. Masks are 0 or 1 and
//! applied as `corrupted · (1 − m) + clean · m`, so a patched value is the clean value exactly,
//! as TransformerLens' assignment makes it.
//!
//! [`cache`]: [`run_with_cache`]; [`spec`]: the options' types; [`table`]: the text report.

mod cache;
mod dataset;
mod path;
mod spec;
mod table;

use std::collections::BTreeSet;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};

pub use cache::{run_with_cache, ActivationCache};
pub use dataset::{activation_patch_mean, Pair, PairRun};
pub(crate) use dataset::batches_by;
pub use path::{path_patch, path_patch_mean, PathPatching};
pub use spec::{Act, Axis, By, Metric, PathTo, Receivers, Senders, What};
pub use table::Table;

/// The result of patching: TransformerLens' `get_act_patch_*` tensor, flattened in its order.
#[derive(Debug, Clone, Serialize)]
pub struct Patching {
    pub what: What,
    pub by: By,
    pub metric: Metric,
    /// The position measured.
    pub position: usize,
    /// The metric of the clean and the corrupted run, unpatched.
    pub clean: f64,
    pub corrupted: f64,
    /// The activations along [`Axis::Act`] (`every`), else the one patched.
    pub acts: Vec<Act>,
    /// The axes and their sizes, as TransformerLens orders them: e.g. `[layer, pos]` for
    /// `resid_pre` by position, `[layer, head, pos]` for `head_pattern` by head and position,
    /// `[act, layer, head]` for `every` by head.
    pub axes: Vec<Axis>,
    pub shape: Vec<usize>,
    /// The metric of each patched run, row-major over `shape`.
    pub patched: Vec<f64>,
    /// `(patched − corrupted) / (clean − corrupted)`: 0 = no better than corrupted, 1 = clean.
    pub normalized: Vec<f64>,
    /// A dataset's pairs ([`activation_patch_mean`]), each one's metric, position and
    /// baselines; then `clean`, `corrupted` and `patched` are means over them, `metric` and
    /// `position` the first pair's. Empty for [`activation_patch`]'s one pair.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<PairRun>,
}

/// `by` does not apply to `act`.
fn by_error(act: Act, by: By) -> Error {
    let fits = if act.per_head() {
        "head or head_pos"
    } else {
        "layer or pos"
    };
    Error::param(
        "by",
        format!("{by} does not apply to {}: use {fits}", act.name()),
    )
}

/// Checks the inputs of a patching run and returns the position measured.
fn check(model: &Gpt2, clean: &[u32], corrupted: &[u32], position: Option<usize>) -> Result<usize> {
    if clean.len() != corrupted.len() {
        return Err(Error::param(
            "corrupted",
            format!(
                "the corrupted prompt is {} tokens and the clean one {}: activation patching \
                 needs prompts of the same length in tokens (as TransformerLens requires)",
                corrupted.len(),
                clean.len()
            ),
        ));
    }
    let t = clean.len();
    if t == 0 {
        return Err(Error::param("clean", "the prompts are empty"));
    }
    if model.loaded_layers() < model.config().n_layer {
        return Err(Error::Input(
            "activation patching needs every layer and the LM head loaded".into(),
        ));
    }
    match position {
        Some(p) if p >= t => Err(Error::param(
            "position",
            format!(
                "{p} is out of range: the prompts have {t} tokens (0..={})",
                t - 1
            ),
        )),
        Some(p) => Ok(p),
        None => Ok(t - 1),
    }
}

/// The metric at `position` of each row of final residual streams `x` (R, T, C), row `r`
/// measured by `metrics[r % metrics.len()]`.
fn measure(model: &Gpt2, x: &Tensor, position: usize, metrics: &[Metric]) -> Result<Vec<f64>> {
    measure_at(model, &x.narrow(1, position, 1)?, metrics)
}

/// The metric of each row of final residual streams at the position measured, `x` (R, 1, C),
/// row `r` measured by `metrics[r % metrics.len()]` (rows are patches × pairs, pair-minor).
/// Logit differences and logits read their tokens' columns of the LM head alone.
fn measure_at(model: &Gpt2, x: &Tensor, metrics: &[Metric]) -> Result<Vec<f64>> {
    if metrics.is_empty() {
        return Err(Error::Internal("rows measured by no metric".into()));
    }
    let metric = |r: usize| metrics[r % metrics.len()];
    if !metrics.iter().all(|m| m.token_logits_only()) {
        // (R, 1, C) -> (R, 1, vocab) -> (R, vocab)
        let logits = model.unembed(x)?.squeeze(1)?.to_vec2::<f32>()?;
        return logits
            .iter()
            .enumerate()
            .map(|(r, row)| metric(r).of(row))
            .collect();
    }
    let mut tokens: Vec<u32> = metrics.iter().flat_map(|m| m.tokens()).collect();
    tokens.sort_unstable();
    tokens.dedup();
    // (R, 1, C) -> (R, 1, k) -> (R, k): column j is tokens[j]'s logit.
    let logits = model.token_logits(x, &tokens)?.squeeze(1)?.to_vec2::<f32>()?;
    logits
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let logit = |t: u32| tokens.binary_search(&t).ok().map(|j| row[j] as f64);
            metric(r)
                .of_tokens(logit)
                .ok_or_else(|| Error::Internal("a token's logit was not computed".into()))
        })
        .collect()
}

/// A hook that wants nothing.
struct NoHook;

impl Hook for NoHook {
    fn wants(&self, _: Point) -> bool {
        false
    }

    fn at(&mut self, _: Point, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
}

/// Row `r` of a batch takes the clean activation where its mask is 1: `t · keep + clean · take`,
/// `take` (R, ...) 0 or 1 broadcast against `t` and `clean` (R, ...), `keep = 1 − take`.
struct PatchRows {
    /// `None`: the layer's input, patched before the pass ([`Act::ResidPre`]).
    point: Option<Point>,
    clean: Tensor,
    keep: Tensor,
    take: Tensor,
}

impl PatchRows {
    fn apply(&self, t: &Tensor) -> Result<Tensor> {
        let dtype = t.dtype();
        Ok((t.broadcast_mul(&self.keep.to_dtype(dtype)?)?
            + self
                .clean
                .to_dtype(dtype)?
                .broadcast_mul(&self.take.to_dtype(dtype)?)?)?)
    }
}

impl Hook for PatchRows {
    fn wants(&self, p: Point) -> bool {
        self.point == Some(p)
    }

    fn at(&mut self, _: Point, t: &mut Tensor) -> Result<()> {
        *t = self.apply(t)?;
        Ok(())
    }
}

/// The axes of a result after `layer`, with their sizes.
type Axes = Vec<(Axis, usize)>;

/// Rows per batched pass: about 4096 token rows, at least one.
fn rows_per_pass(t: usize) -> usize {
    (4096 / t.max(1)).max(1)
}

/// One prompt pair as a batch takes it.
#[derive(Clone, Copy)]
pub(super) struct Ids<'a> {
    pub clean: &'a [u32],
    pub corrupted: &'a [u32],
    pub metric: Metric,
}

impl<'a> From<&'a Pair> for Ids<'a> {
    fn from(p: &'a Pair) -> Self {
        Self {
            clean: &p.clean,
            corrupted: &p.corrupted,
            metric: p.metric,
        }
    }
}

/// Pairs of one length as a (B, T) batch of ids on `model`'s device: the clean or the corrupted
/// prompts.
fn batch_ids(model: &Gpt2, pairs: &[Ids], clean: bool) -> Result<Tensor> {
    let t = pairs.first().map_or(0, |p| p.clean.len());
    let ids: Vec<u32> = pairs
        .iter()
        .flat_map(|p| if clean { p.clean } else { p.corrupted })
        .copied()
        .collect();
    Ok(Tensor::from_vec(ids, (pairs.len(), t), model.device())?)
}

/// `t` (B, ...) repeated `k` times along the batch axis: (k·B, ...), row `i·B + j` = row `j`.
fn tile(t: &Tensor, k: usize) -> Result<Tensor> {
    let mut times = vec![1; t.rank()];
    times[0] = k;
    Ok(t.repeat(times)?)
}

/// One activation patched at every index `by` names, every layer, for a batch of B pairs of one
/// length: each pair's metric of each patched run, in TransformerLens' order, and the axes after
/// `layer`. A pass's rows are patches × pairs, pair-minor (row `i·B + j`: patch `i`, pair `j`).
struct Patcher<'a> {
    model: &'a Gpt2,
    /// The corrupted runs' residual stream entering each layer, (B, T, C).
    resid: Vec<Tensor>,
    /// The clean runs' activations the patches need, (B, ...).
    clean: ActivationCache,
    /// Each pair's metric.
    metrics: Vec<Metric>,
    position: usize,
    t: usize,
}

impl Patcher<'_> {
    /// `act` patched by `by` at every layer: per pair, values `[layer, ...]`; the axes after
    /// `layer`.
    fn run(&self, act: Act, by: By) -> Result<(Vec<Vec<f64>>, Axes)> {
        let c = self.model.config();
        let (n_layer, t, b) = (c.n_layer, self.t, self.metrics.len());
        let heads = match act {
            Act::HeadK | Act::HeadV => c.kv_heads(),
            _ => c.n_head,
        };
        // Each patch's mask, as a shape broadcast over the activation without its batch axis
        // (block (T, C); head vectors (T, heads, d_head); patterns (heads, T, T_k)), and the axes
        // its index runs over: patch `r` is the mask with flat element `r` set, so patches come
        // in TransformerLens' order.
        let (mask, axes): (Vec<usize>, Axes) = match (act, by) {
            (Act::ResidPre | Act::AttnOut | Act::MlpOut, By::Layer) => (vec![1, 1], vec![]),
            (Act::ResidPre | Act::AttnOut | Act::MlpOut, By::Pos) => {
                (vec![t, 1], vec![(Axis::Pos, t)])
            }
            (Act::HeadPattern, By::Head) => (vec![heads, 1, 1], vec![(Axis::Head, heads)]),
            (Act::HeadPattern, By::HeadPos) => {
                (vec![heads, t, 1], vec![(Axis::Head, heads), (Axis::Pos, t)])
            }
            (_, By::Head) => (vec![1, heads, 1], vec![(Axis::Head, heads)]),
            (_, By::HeadPos) => (vec![t, heads, 1], vec![(Axis::Pos, t), (Axis::Head, heads)]),
            (a, b) => return Err(by_error(a, b)),
        };
        let patches: usize = mask.iter().product();
        // Patches per pass: about rows_per_pass(t) rows, every pair of each patch.
        let step = (rows_per_pass(t) / b).max(1);
        let mut out = vec![Vec::with_capacity(n_layer * patches); b];
        for layer in 0..n_layer {
            let clean = self.clean.need(&act.hook_name(layer))?;
            let resid = &self.resid[layer];
            let mut start = 0;
            while start < patches {
                crate::interrupt::check()?;
                let k = step.min(patches - start);
                // (k·B, ...mask): row i·B + j has a 1 at flat index start + i.
                let mut take = vec![0f32; k * b * patches];
                for r in 0..k * b {
                    take[r * patches + start + r / b] = 1.0;
                }
                let mut shape = vec![k * b];
                shape.extend(&mask);
                let take = Tensor::from_vec(take, shape, resid.device())?;
                let keep = take.affine(-1.0, 1.0)?;
                let patch = PatchRows {
                    point: act.point(layer),
                    clean: tile(clean, k)?,
                    keep,
                    take,
                };
                // (B, T, C) -> (k·B, T, C): the corrupted streams entering `layer`, once per
                // patch.
                let x = tile(resid, k)?;
                let x = match act.point(layer) {
                    // resid_pre is the layer's input: patched before the pass.
                    None => pass(
                        self.model,
                        layer,
                        patch.apply(&x)?,
                        &mut NoHook,
                        self.position,
                    )?,
                    Some(_) => {
                        let mut patch = patch;
                        pass(self.model, layer, x, &mut patch, self.position)?
                    }
                };
                for (r, v) in measure_at(self.model, &x, &self.metrics)?
                    .into_iter()
                    .enumerate()
                {
                    out[r % b].push(v);
                }
                start += k;
            }
        }
        Ok((out, axes))
    }
}

/// Layers `layer..` on `x` (R, T, C) with `hook`: the last block's output at `position`
/// (R, 1, C). When the hook wants nothing of the last layer, that block runs at the position
/// alone ([`Gpt2::block_at`]): nothing else of it is measured.
fn pass(
    model: &Gpt2,
    layer: usize,
    x: Tensor,
    hook: &mut dyn Hook,
    position: usize,
) -> Result<Tensor> {
    let last = model.config().n_layer - 1;
    let touches_last = [
        Point::Q(last),
        Point::K(last),
        Point::V(last),
        Point::Pattern(last),
        Point::Z(last),
        Point::AttnOut(last),
        Point::MlpOut(last),
        Point::ResidPost(last),
    ]
    .into_iter()
    .any(|p| hook.wants(p));
    if layer < last && !touches_last && model.head_mask().is_none() {
        let x = pass_to(model, layer, last - 1, x, hook)?;
        return model.block_at(last, &x, position);
    }
    let x = pass_to(model, layer, last, x, hook)?;
    Ok(x.narrow(1, position, 1)?)
}

/// Layers `layer..=to` on `x` (R, T, C) with `hook`: block `to`'s output (R, T, C).
fn pass_to(
    model: &Gpt2,
    layer: usize,
    to: usize,
    x: Tensor,
    hook: &mut dyn Hook,
) -> Result<Tensor> {
    struct Seen<'a, 'b> {
        hook: &'a mut (dyn Hook + 'b),
        last: Option<Tensor>,
        layer: usize,
    }
    impl Hook for Seen<'_, '_> {
        fn wants(&self, p: Point) -> bool {
            p == Point::ResidPost(self.layer) || self.hook.wants(p)
        }
        fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
            if self.hook.wants(p) {
                self.hook.at(p, t)?;
            }
            if p == Point::ResidPost(self.layer) {
                self.last = Some(t.clone());
            }
            Ok(())
        }
    }
    let mut seen = Seen {
        hook,
        last: None,
        layer: to,
    };
    model.run_from(layer, x, None, Some(&mut seen), Output::StopAfter(to))?;
    seen.last
        .ok_or_else(|| Error::Internal("the residual stream was not seen".into()))
}

/// Activation patching of `model`: the corrupted prompt run with `what` replaced by the clean
/// run's at each layer and each index `by` names, measured by `metric` at `position` (default:
/// the last). Equal to TransformerLens' `get_act_patch_*` (see the README's table):
/// `resid_pre`/`attn_out`/`mlp_out` by pos `[layer, pos]`, by layer `[layer]`; `head_*` by head
/// `[layer, head]`, by head_pos `[layer, pos, head]` (`head_pattern`: `[layer, head, pos]`, its
/// destination positions); `every` by head `[5, layer, head]`, by head_pos
/// `[5, layer, pos, head]`, by pos `[3, layer, pos]`, by layer `[3, layer]`.
pub fn activation_patch(
    model: &Gpt2,
    clean: &[u32],
    corrupted: &[u32],
    what: What,
    by: By,
    metric: Metric,
    position: Option<usize>,
) -> Result<Patching> {
    let position = check(model, clean, corrupted, position)?;
    let vocab = model.config().vocab_size;
    if let Some(bad) = metric.tokens().into_iter().find(|&t| t as usize >= vocab) {
        return Err(Error::param(
            "target",
            format!("token id {bad} is outside the vocabulary (0..{vocab})"),
        ));
    }
    let acts = acts_of(what, by)?;
    let pair = Ids {
        clean,
        corrupted,
        metric,
    };
    let mut run = patch_batch(model, &[pair], &acts, what, by, position)?;
    let base = PairRun {
        metric,
        position,
        clean: run.clean[0],
        corrupted: run.corrupted[0],
    };
    let patched = run.patched.pop().unwrap_or_default();
    Ok(run.result(model, what, by, &base, patched))
}

/// The activations `what` names for `by`, checked to fit it.
pub(super) fn acts_of(what: What, by: By) -> Result<Vec<Act>> {
    let acts: Vec<Act> = match what {
        What::One(a) => vec![a],
        What::Every if by.per_head() => Act::HEAD.to_vec(),
        What::Every => Act::BLOCK.to_vec(),
    };
    if let Some(&a) = acts.iter().find(|a| a.per_head() != by.per_head()) {
        return Err(by_error(a, by));
    }
    Ok(acts)
}

/// What patching a batch of pairs gives: each pair's baselines and patched values (flattened in
/// the result's order), the activations and the axes after the first (`act`, `layer`).
pub(super) struct BatchRun {
    pub clean: Vec<f64>,
    pub corrupted: Vec<f64>,
    pub patched: Vec<Vec<f64>>,
    acts: Vec<Act>,
    inner: Axes,
}

impl BatchRun {
    /// The result of `patched` values (one pair's or the mean's) measured as `base` says.
    pub(super) fn result(
        &self,
        model: &Gpt2,
        what: What,
        by: By,
        base: &PairRun,
        patched: Vec<f64>,
    ) -> Patching {
        let (clean, corrupted) = (base.clean, base.corrupted);
        let mut axes = Vec::new();
        let mut shape = Vec::new();
        if what == What::Every {
            axes.push(Axis::Act);
            shape.push(self.acts.len());
        }
        axes.push(Axis::Layer);
        shape.push(model.config().n_layer);
        for &(a, n) in &self.inner {
            axes.push(a);
            shape.push(n);
        }
        let span = clean - corrupted;
        let normalized = patched.iter().map(|p| (p - corrupted) / span).collect();
        Patching {
            what,
            by,
            metric: base.metric,
            position: base.position,
            clean,
            corrupted,
            acts: self.acts.clone(),
            axes,
            shape,
            patched,
            normalized,
            pairs: Vec::new(),
        }
    }
}

/// Activation patching of `pairs`, all of one length, measured at `position`, as one batch: the
/// clean and corrupted runs are one pass each, and every pass from a layer holds every pair of
/// its patches (rows of different prompts never mix: each pair's numbers are its own).
pub(super) fn patch_batch(
    model: &Gpt2,
    pairs: &[Ids],
    acts: &[Act],
    what: What,
    by: By,
    position: usize,
) -> Result<BatchRun> {
    let c = model.config();
    let (n_layer, n_head) = (c.n_layer, c.n_head);
    let t = pairs.first().map_or(0, |p| p.clean.len());
    let metrics: Vec<Metric> = pairs.iter().map(|p| p.metric).collect();
    let last = format!("blocks.{}.hook_resid_post", n_layer - 1);
    // The corrupted runs: each layer's input and the output.
    let resid_names: Vec<String> = (0..n_layer).map(|l| Act::ResidPre.hook_name(l)).collect();
    let mut names: Vec<&str> = resid_names.iter().map(String::as_str).collect();
    names.push(&last);
    let run = run_with_cache(model, &batch_ids(model, pairs, false)?, &names)?;
    let resid = resid_names
        .iter()
        .map(|n| run.need(n).cloned())
        .collect::<Result<Vec<_>>>()?;
    let corrupted = measure(model, run.need(&last)?, position, &metrics)?;
    // The clean runs: the activations patched in, and the output.
    let clean_names: BTreeSet<String> = acts
        .iter()
        .flat_map(|a| (0..n_layer).map(|l| a.hook_name(l)))
        .chain([last.clone()])
        .collect();
    let names: Vec<&str> = clean_names.iter().map(String::as_str).collect();
    let clean_cache = run_with_cache(model, &batch_ids(model, pairs, true)?, &names)?;
    let clean = measure(model, clean_cache.need(&last)?, position, &metrics)?;
    let patcher = Patcher {
        model,
        resid,
        clean: clean_cache,
        metrics,
        position,
        t,
    };
    let mut patched = vec![Vec::new(); pairs.len()];
    let mut inner = Vec::new();
    for &act in acts {
        let (values, mut axes) = patcher.run(act, by)?;
        for (all, mut values) in patched.iter_mut().zip(values) {
            if what == What::Every {
                // TransformerLens stacks the five head results on one shape: k and v of a model
                // with fewer K/V heads are padded with zeros to n_head, and the pattern by
                // position is rearranged from [layer, head, pos] to [layer, pos, head].
                match (act, by) {
                    (Act::HeadPattern, By::HeadPos) => {
                        values = swap_last_two(&values, n_layer, n_head, t);
                    }
                    (Act::HeadK | Act::HeadV, _) => {
                        let have = axes.last().map_or(1, |a| a.1);
                        values = pad_last(&values, have, n_head);
                    }
                    _ => {}
                }
            }
            all.extend(values);
        }
        if what == What::Every {
            match (act, by) {
                (Act::HeadPattern, By::HeadPos) => {
                    axes = vec![(Axis::Pos, t), (Axis::Head, n_head)];
                }
                (Act::HeadK | Act::HeadV, _) => {
                    if let Some(a) = axes.last_mut() {
                        a.1 = n_head;
                    }
                }
                _ => {}
            }
        }
        inner = axes;
    }
    Ok(BatchRun {
        clean,
        corrupted,
        patched,
        acts: acts.to_vec(),
        inner,
    })
}

/// `[n, a, b]` row-major -> `[n, b, a]`.
fn swap_last_two(v: &[f64], n: usize, a: usize, b: usize) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for i in 0..n {
        for x in 0..a {
            for y in 0..b {
                out[i * a * b + y * a + x] = v[i * a * b + x * b + y];
            }
        }
    }
    out
}

/// Rows of `have` values, each padded with zeros to `want`.
fn pad_last(v: &[f64], have: usize, want: usize) -> Vec<f64> {
    if have >= want {
        return v.to_vec();
    }
    v.chunks(have.max(1))
        .flat_map(|row| {
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0.0, want - have))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reshapes_as_transformer_lens_stacks() {
        // [1, 2, 3] -> [1, 3, 2]: TransformerLens' "layer head pos -> layer pos head".
        let v: Vec<f64> = (0..6).map(f64::from).collect();
        assert_eq!(swap_last_two(&v, 1, 2, 3), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        // K/V heads padded with zeros to n_head.
        assert_eq!(pad_last(&[1.0, 2.0], 1, 3), [1.0, 0.0, 0.0, 2.0, 0.0, 0.0]);
        assert_eq!(pad_last(&[1.0, 2.0], 2, 2), [1.0, 2.0]);
    }
}
