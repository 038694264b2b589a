//! Activation patching of a batch: pairs of one length patched together. The corrupted runs'
//! residual stream entering each layer and the clean runs' activations come from one pass each;
//! a pass from layer L holds patches × pairs as rows (pair-minor: row `i·B + j` is patch `i` of
//! pair `j`), each row the corrupted stream of its pair with its patch's clean values. Rows never
//! mix, so each pair's numbers are those it gets alone (to the rounding of a wider GEMM).

use std::collections::BTreeSet;

use candle_core::Tensor;

use super::{
    by_error, measure, measure_at, pass, rows_per_pass, run_with_cache, Act, ActivationCache, Axes,
    Axis, By, Metric, NoHook, Pair, PairRun, Patching, What,
};
use crate::error::Result;
use crate::hooks::{Hook, Point};
use crate::model::{Cache, Gpt2};

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
pub(super) fn batch_ids(model: &Gpt2, pairs: &[Ids], clean: bool) -> Result<Tensor> {
    let t = pairs.first().map_or(0, |p| p.clean.len());
    let ids: Vec<u32> = pairs
        .iter()
        .flat_map(|p| if clean { p.clean } else { p.corrupted })
        .copied()
        .collect();
    Ok(Tensor::from_vec(ids, (pairs.len(), t), model.device())?)
}

/// `t` (B, ...) repeated `k` times along the batch axis: (k·B, ...), row `i·B + j` = row `j`.
pub(super) fn tile(t: &Tensor, k: usize) -> Result<Tensor> {
    let mut times = vec![1; t.rank()];
    times[0] = k;
    Ok(t.repeat(times)?)
}

/// The first positions a batch's runs share with the run they start from (a corrupted prompt and
/// its clean one, alike up to their first differing token): nothing changes there, so a patched
/// pass computes only the positions after them, and of those it needs only the keys and values
/// of every layer, (B, nkv, len, hs) each.
#[derive(Clone)]
pub(super) struct Prefix {
    len: usize,
    kv: Vec<(Tensor, Tensor)>,
}

impl Prefix {
    /// The positions before every pair's first differing token, and before `position` (the one
    /// measured, which must be run); 0 when a cache would change the numbers (one holding keys
    /// and values in another dtype than the activations, f16 under f32 ones).
    pub(super) fn len(model: &Gpt2, pairs: &[Ids], position: usize) -> usize {
        if model.kv_dtype() != model.act_dtype() {
            return 0;
        }
        let alike = |p: &Ids| {
            p.clean
                .iter()
                .zip(p.corrupted)
                .take_while(|(a, b)| a == b)
                .count()
        };
        pairs.iter().map(alike).min().unwrap_or(0).min(position)
    }

    /// The `len` first positions' keys and values of every layer, from a run's `hook_k`/`hook_v`
    /// (B, T, nkv, hs) in `cache` (none read when `len` is 0).
    pub(super) fn new(cache: &ActivationCache, n_layer: usize, len: usize) -> Result<Self> {
        if len == 0 {
            return Ok(Self {
                len,
                kv: Vec::new(),
            });
        }
        let kv = (0..n_layer)
            .map(|l| {
                // (B, T, nkv, hs) -> (B, nkv, len, hs), as the KV cache lays them out.
                let first = |hook: &str| -> Result<Tensor> {
                    let t = cache.need(&format!("blocks.{l}.attn.{hook}"))?;
                    Ok(t.narrow(1, 0, len)?.transpose(1, 2)?.contiguous()?)
                };
                Ok((first("hook_k")?, first("hook_v")?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { len, kv })
    }

    /// The hook names [`Prefix::new`] reads.
    pub(super) fn names(n_layer: usize) -> Vec<String> {
        (0..n_layer)
            .flat_map(|l| ["k", "v"].map(|x| format!("blocks.{l}.attn.hook_{x}")))
            .collect()
    }

    /// The KV cache of a pass from `layer` over `k` tiles of the batch (k·B rows) of prompts of
    /// `t` tokens: the prefix's keys and values at layers `layer..`; none for an empty prefix.
    pub(super) fn cache(&self, layer: usize, k: usize, t: usize) -> Result<Option<Cache>> {
        if self.len == 0 {
            return Ok(None);
        }
        let kv = self.kv[layer..]
            .iter()
            .map(|(key, v)| Ok((tile(key, k)?, tile(v, k)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Cache::prefilled(self.kv.len(), layer, &kv, t)?))
    }

    /// `x`'s positions after the prefix, along `axis` when it has the prompts' `t` positions.
    pub(super) fn after(&self, x: Tensor, axis: usize, t: usize) -> Result<Tensor> {
        if self.len == 0 || x.dim(axis)? != t {
            return Ok(x);
        }
        Ok(x.narrow(axis, self.len, t - self.len)?.contiguous()?)
    }
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
    /// The positions every pair's prompts share: only those after it are run.
    prefix: Prefix,
    /// The corrupted runs' head outputs (B, T, H, d) per layer, when head outputs are patched.
    corrupted_z: Vec<Tensor>,
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
                // Of the activation's positions (patterns: query rows) only those after the
                // prefix are run: the mask and the clean values narrowed to them.
                let axis = if act == Act::HeadPattern { 2 } else { 1 };
                let after = |x: Tensor| self.prefix.after(x, axis, t);
                let take = after(Tensor::from_vec(take, shape, resid.device())?)?;
                let keep = take.affine(-1.0, 1.0)?;
                let patch = PatchRows {
                    point: act.point(layer),
                    clean: after(tile(clean, k)?)?,
                    keep,
                    take,
                };
                // (B, T, C) -> (k·B, T', C): the corrupted streams entering `layer`, once per
                // patch, after the prefix.
                let x = self.prefix.after(tile(resid, k)?, 1, t)?;
                let cache = self.prefix.cache(layer, k, t)?;
                let x = match act.point(layer) {
                    Some(Point::Z(_)) if !self.corrupted_z.is_empty() => {
                        let z = after(tile(&self.corrupted_z[layer], k)?)?;
                        self.head_out(layer, x, &patch.apply(&z)?, cache)?
                    }
                    // resid_pre is the layer's input: patched before the pass.
                    None => pass(
                        self.model,
                        layer,
                        patch.apply(&x)?,
                        &mut NoHook,
                        self.position,
                        cache,
                    )?,
                    Some(_) => {
                        let mut patch = patch;
                        pass(self.model, layer, x, &mut patch, self.position, cache)?
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

impl Patcher<'_> {
    /// The rows of a head-output patch from the layer `layer` patched, whose heads' outputs `z`
    /// (R, T', H, d) are known (the corrupted runs', some heads the clean runs'): its attention
    /// output from them (no query, key or value computed), its MLP, then the layers after it
    /// (`cache` the prefix's from `layer`), measured at the position: (R, 1, C). What the pass
    /// with the patch at `Z` computes, less the layer's attention, whose output it overwrites.
    fn head_out(
        &self,
        layer: usize,
        x: Tensor,
        z: &Tensor,
        cache: Option<Cache>,
    ) -> Result<Tensor> {
        let m = self.model;
        let past = cache.as_ref().map_or(0, Cache::seq_len);
        let last = m.config().n_layer - 1;
        // The last layer is measured at the position alone.
        let (x, z) = match layer == last {
            true => {
                let at = self.position - past;
                (x.narrow(1, at, 1)?, z.narrow(1, at, 1)?)
            }
            false => (x, z.clone()),
        };
        let x = (&x + m.attention_out(layer, &z)?)?;
        let x = (&x + m.mlp_out(layer, &x)?)?;
        if layer == last {
            return Ok(x);
        }
        // The cache's layers from `layer + 1` hold the prefix: all the pass reads.
        pass(m, layer + 1, x, &mut NoHook, self.position, cache)
    }
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
    let prefix_len = Prefix::len(model, pairs, position);
    let kv_names = match prefix_len {
        0 => Vec::new(),
        _ => Prefix::names(n_layer),
    };
    // Head outputs patched: the corrupted runs' too (see `Patcher::head_out`).
    let z_names: Vec<String> = match acts.contains(&Act::HeadOut) {
        true => (0..n_layer).map(|l| Act::HeadOut.hook_name(l)).collect(),
        false => Vec::new(),
    };
    let mut names: Vec<&str> = resid_names.iter().map(String::as_str).collect();
    names.extend(kv_names.iter().chain(&z_names).map(String::as_str));
    names.push(&last);
    let run = run_with_cache(model, &batch_ids(model, pairs, false)?, &names)?;
    let corrupted_z = z_names
        .iter()
        .map(|n| run.need(n).cloned())
        .collect::<Result<Vec<_>>>()?;
    // Before the pairs' first differing token every patch leaves the corrupted runs as they are.
    let prefix = Prefix::new(&run, n_layer, prefix_len)?;
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
        prefix,
        corrupted_z,
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
pub(super) mod tests {
    use super::*;
    use crate::analysis::patching::acts_of;
    use crate::model::{tiny_config, tiny_model};
    use crate::rng::SplitMix64;

    /// `n` pairs of `t` tokens under a vocabulary of `vocab`: random clean prompts, each
    /// corrupted at two positions, each measured by its own tokens (`loss`: by the loss of one,
    /// a metric of the whole vocabulary).
    pub(in crate::analysis::patching) fn pairs(
        vocab: u32,
        t: usize,
        n: usize,
        loss: bool,
    ) -> Vec<(Vec<u32>, Vec<u32>, Metric)> {
        let mut rng = SplitMix64::new(11);
        let mut id = || (rng.next_u64() % vocab as u64) as u32;
        (0..n)
            .map(|_| {
                let clean: Vec<u32> = (0..t).map(|_| id()).collect();
                let mut corrupted = clean.clone();
                corrupted[1] = (clean[1] + 1) % vocab;
                corrupted[t - 3] = (clean[t - 3] + 2) % vocab;
                let (target, against) = (id(), id());
                let metric = match loss {
                    true => Metric::Loss { target },
                    false => Metric::LogitDiff { target, against },
                };
                (clean, corrupted, metric)
            })
            .collect()
    }

    pub(in crate::analysis::patching) fn ids(p: &[(Vec<u32>, Vec<u32>, Metric)]) -> Vec<Ids<'_>> {
        p.iter()
            .map(|(clean, corrupted, metric)| Ids {
                clean,
                corrupted,
                metric: *metric,
            })
            .collect()
    }

    /// `a` and `b` equal to 1e-5 (relative past 1), and of one length.
    pub(in crate::analysis::patching) fn assert_close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(d < 1e-5, "{what}: {d}\n{a:?}\n{b:?}");
    }

    #[test]
    fn a_batch_gives_each_pair_what_it_gets_alone() -> Result<()> {
        let m = tiny_model(tiny_config(40, 600, 3), 5)?;
        // Short prompts: each layer's patches in one pass; 520 tokens: two heads a pass.
        for (t, cases) in [
            (
                9,
                vec![
                    (What::One(Act::HeadOut), By::Head),
                    (What::One(Act::ResidPre), By::Pos),
                    (What::Every, By::HeadPos),
                    (What::Every, By::Layer),
                ],
            ),
            (520, vec![(What::One(Act::HeadOut), By::Head)]),
        ] {
            for loss in [false, true] {
                let p = pairs(40, t, 3, loss);
                let ids = ids(&p);
                for &(what, by) in &cases {
                    let acts = acts_of(what, by)?;
                    let all = patch_batch(&m, &ids, &acts, what, by, t - 2)?;
                    let label = format!("{what} by {by}, {t} tokens");
                    for (j, one) in ids.iter().enumerate() {
                        let alone = patch_batch(&m, &[*one], &acts, what, by, t - 2)?;
                        assert_close(&all.patched[j], &alone.patched[0], &label);
                        assert_close(&[all.clean[j]], &alone.clean, &label);
                        assert_close(&[all.corrupted[j]], &alone.corrupted, &label);
                    }
                    // The pairs differ: a row given to another pair would show.
                    let d = all.patched[0]
                        .iter()
                        .zip(&all.patched[1])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(d > 1e-3, "{label}: pairs alike");
                }
            }
        }
        Ok(())
    }

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
