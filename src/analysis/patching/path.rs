//! Path patching, as Wang et al. 2022 (the IOI paper, appendix B) define it and as ARENA's IOI
//! exercises compute it with TransformerLens hooks (`get_path_patch_head_to_final_resid_post`,
//! `get_path_patch_head_to_heads`): the effect of a sender (a head, an MLP, the embeddings) on
//! the output through its direct path to the receivers — the logits, or some heads' queries,
//! keys or values — and through nothing else.
//!
//! The clean prompt is run; the sender's output is replaced by the corrupted run's and every
//! head's output (`hook_z`) at and after the sender's layer is frozen at the clean run's, so the
//! change reaches the receivers only through the residual stream (MLPs are recomputed: the
//! paper counts them as part of the path). To the logits, that run's final residual stream is
//! measured. To heads, the receivers' inputs in that run are kept, and the clean prompt is run
//! again with only those receivers' queries (keys, values) replaced by them, everything after
//! them recomputed. With [`Receivers::freeze_mlps`] the MLPs are frozen too: only the direct
//! path through the residual stream, the edge TransformerLens 4's `get_act_patch_direct_path`
//! patches (which runs the other prompt: swap clean and corrupted to compare).
//!
//! With every head's output frozen, a layer's attention output is known — the clean run's, or
//! at the sender's layer `c_proj` of the mixed heads' outputs — so the senders' run computes no
//! attention: each layer is that output added, then the MLP (and the receivers' inputs where
//! they are kept). Its positions are then independent, so to the logits only the measured one
//! runs. The senders of a layer, times the pairs of a batch (pairs of one length), are the rows
//! of one pass from that layer, which starts from the clean runs' residual streams (nothing
//! below it changes).

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;
use serde::Serialize;

use super::dataset::{batches, check_pairs};
use super::Senders;
use super::{batch_ids, check, measure, measure_at, pass, rows_per_pass, run_with_cache, tile};
use super::{ActivationCache, Axis, By, Ids, Metric, Pair, PairRun, PathTo, Prefix, Receivers};
use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::Gpt2;

/// The result of path patching: the metric with each sender's path patched.
#[derive(Debug, Clone, Serialize)]
pub struct PathPatching {
    pub senders: Senders,
    pub receivers: Receivers,
    pub metric: Metric,
    /// The position measured.
    pub position: usize,
    /// The metric of the clean and the corrupted run, unpatched.
    pub clean: f64,
    pub corrupted: f64,
    /// `[layer, head]` (heads), `[layer]` (MLPs) or `[]` (the embeddings).
    pub axes: Vec<Axis>,
    pub shape: Vec<usize>,
    /// The metric with each sender's path patched, row-major over `shape`. A sender with no
    /// path to the receivers (at or after their layer) leaves the clean run: the clean metric.
    pub patched: Vec<f64>,
    /// `(patched − clean) / (clean − corrupted)`, as the IOI paper and ARENA plot it: 0 = the
    /// path carries nothing of the corruption, −1 = as much as corrupting the whole prompt.
    pub normalized: Vec<f64>,
    /// A dataset's pairs ([`path_patch_mean`]); empty for [`path_patch`]'s one pair.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<PairRun>,
}

/// The clean runs' activations a path patch freezes or starts from, per layer, (B, T', ...)
/// (T' = 1 to the logits: the measured position; to heads the positions after `prefix`): head
/// outputs (B, T', H, d), attention outputs and the residual stream entering each layer
/// (B, T', C) and, to freeze the MLPs too, their outputs (B, T', C).
struct Clean {
    z: Vec<Tensor>,
    attn: Vec<Tensor>,
    resid: Vec<Tensor>,
    mlp: Option<Vec<Tensor>>,
    /// The positions the prompts share, and the clean runs' keys and values there.
    prefix: Prefix,
    /// The prompts' length, and the position measured.
    t: usize,
    position: usize,
}

/// What the senders of a group change at its first layer.
enum Sender {
    /// Heads' outputs: the clean ones, but row `i·B + j`'s sender head from the corrupted run
    /// (`t · keep + corrupted · take` on the clean z tiled over the rows).
    Heads(Mix),
    /// The MLP's output: the corrupted runs' (B, T', C).
    Mlp(Tensor),
    /// Nothing: the embeddings, whose change is the group's input.
    Embed,
}

/// A batch of senders: with the B pairs, the rows of one pass that starts at `start` from the
/// clean residual streams (or `input`), row `i·B + j` sender `i` of pair `j`.
struct Group {
    start: usize,
    /// Senders in the group.
    senders: usize,
    /// The residual streams entering `start` (B, T', C), when they are not the clean runs' (the
    /// embeddings).
    input: Option<Tensor>,
    sender: Sender,
    /// The first layer whose inputs a sender of the group can change.
    reach: usize,
}

/// `t · keep + corrupted · take`: `take` (R, ...) is 1 where a row takes the corrupted value.
struct Mix {
    corrupted: Tensor,
    keep: Tensor,
    take: Tensor,
}

impl Mix {
    fn new(corrupted: Tensor, take: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let take =
            Tensor::from_vec(take, shape, corrupted.device())?.to_dtype(corrupted.dtype())?;
        let keep = take.affine(-1.0, 1.0)?;
        Ok(Self {
            corrupted,
            keep,
            take,
        })
    }

    fn apply(&self, t: &Tensor) -> Result<Tensor> {
        Ok((t.broadcast_mul(&self.keep)? + self.corrupted.broadcast_mul(&self.take)?)?)
    }
}

/// `x` (k·B, ...) plus `a` (B, ...) added to each of its k tiles: the clean runs' values added
/// to every sender's rows, with no copy of them.
fn add_tiled(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    let b = a.dim(0)?;
    let mut tiles = vec![x.dim(0)? / b.max(1)];
    tiles.extend(a.dims());
    Ok(x.reshape(tiles)?.broadcast_add(a)?.reshape(x.dims())?)
}

/// Step 2, the senders' run of group `g`: from its first layer every head's output is the clean
/// run's (but the senders'), so each layer adds a known attention output and runs its MLP
/// (frozen too with `clean.mlp`). The receivers' inputs `to` at the layers `keep` are kept, and
/// the run stops at the last of them; with none it runs every layer. Returns the stream after
/// the last layer run, (R, T', C), and the inputs kept by layer, (R, T', heads, d).
fn sender_run(
    model: &Gpt2,
    clean: &Clean,
    g: &Group,
    keep: &BTreeSet<usize>,
    to: PathTo,
) -> Result<(Tensor, BTreeMap<usize, Tensor>)> {
    let k = g.senders;
    // (B, T', C) -> (k·B, T', C): the streams entering the group's first layer, once per sender.
    let mut x = tile(g.input.as_ref().unwrap_or(&clean.resid[g.start]), k)?;
    let mut kept = BTreeMap::new();
    let stop = keep.last().copied();
    for l in g.start..model.config().n_layer {
        if keep.contains(&l) {
            let [q, key, v] = model.block_qkv(l, &x)?;
            let input = match to {
                PathTo::K => key,
                PathTo::V => v,
                PathTo::Q | PathTo::Logits => q,
            };
            kept.insert(l, input);
        }
        if stop == Some(l) {
            break;
        }
        x = match &g.sender {
            Sender::Heads(mix) if l == g.start => {
                // (k·B, T', H, d): the clean heads' outputs, the senders' corrupted.
                let z = mix.apply(&tile(&clean.z[l], k)?)?;
                (&x + model.attention_out(l, &z)?)?
            }
            _ => add_tiled(&x, &clean.attn[l])?,
        };
        x = match (&g.sender, &clean.mlp) {
            (Sender::Mlp(out), _) if l == g.start => add_tiled(&x, out)?,
            (_, Some(mlp)) => add_tiled(&x, &mlp[l])?,
            (_, None) => (&x + model.mlp_out(l, &x)?)?,
        };
    }
    Ok((x, kept))
}

/// Step 3's hook: the receivers' inputs replaced by step 2's, per layer `(point, mix)`.
struct ReceiverRun {
    at: BTreeMap<Point, Mix>,
}

impl Hook for ReceiverRun {
    fn wants(&self, p: Point) -> bool {
        self.at.contains_key(&p)
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        if let Some(mix) = self.at.get(&p) {
            *t = mix.apply(t)?;
        }
        Ok(())
    }
}

/// Path patching of one prompt pair: the clean prompt run with each sender's direct path to
/// `receivers` carrying the corrupted run's value (see the module's words), measured by
/// `metric` at `position` (default: the last; negative counts from the end). Heads give `[layer, head]`, as ARENA's
/// `get_path_patch_head_to_final_resid_post` / `get_path_patch_head_to_heads` (whose rows stop
/// below the last receiver's layer; here later senders are the clean metric).
pub fn path_patch(
    model: &Gpt2,
    clean: &[u32],
    corrupted: &[u32],
    senders: Senders,
    receivers: &Receivers,
    metric: Metric,
    position: Option<isize>,
) -> Result<PathPatching> {
    let position = check(model, clean, corrupted, position)?;
    receivers.check(model)?;
    let vocab = model.config().vocab_size;
    if let Some(bad) = metric.tokens().into_iter().find(|&t| t as usize >= vocab) {
        return Err(Error::param(
            "target",
            format!("token id {bad} is outside the vocabulary (0..{vocab})"),
        ));
    }
    let pair = Ids {
        clean,
        corrupted,
        metric,
    };
    let mut run = path_batch(model, &[pair], senders, receivers, position)?;
    let base = PairRun {
        metric,
        position,
        clean: run.clean[0],
        corrupted: run.corrupted[0],
    };
    let patched = run.patched.pop().unwrap_or_default();
    Ok(result(model, senders, receivers, &base, patched))
}

/// The result of `patched` values (one pair's or the mean's) measured as `base` says.
fn result(
    model: &Gpt2,
    senders: Senders,
    receivers: &Receivers,
    base: &PairRun,
    patched: Vec<f64>,
) -> PathPatching {
    let c = model.config();
    let (axes, shape) = match senders {
        Senders::Heads => (vec![Axis::Layer, Axis::Head], vec![c.n_layer, c.n_head]),
        Senders::Mlps => (vec![Axis::Layer], vec![c.n_layer]),
        Senders::Embed => (Vec::new(), Vec::new()),
    };
    let span = base.clean - base.corrupted;
    let normalized = patched.iter().map(|p| (p - base.clean) / span).collect();
    PathPatching {
        senders,
        receivers: receivers.clone(),
        metric: base.metric,
        position: base.position,
        clean: base.clean,
        corrupted: base.corrupted,
        axes,
        shape,
        patched,
        normalized,
        pairs: Vec::new(),
    }
}

/// Each pair's baselines and patched values, of a batch.
struct PathRun {
    clean: Vec<f64>,
    corrupted: Vec<f64>,
    patched: Vec<Vec<f64>>,
}

/// Path patching of `pairs`, all of one length, measured at `position`, as one batch: the clean
/// and corrupted runs are one pass each, and each group's passes hold every pair of its senders.
fn path_batch(
    model: &Gpt2,
    pairs: &[Ids],
    senders: Senders,
    receivers: &Receivers,
    position: usize,
) -> Result<PathRun> {
    let c = model.config();
    let (n_layer, n_head) = (c.n_layer, c.n_head);
    let (b, t) = (pairs.len(), pairs.first().map_or(0, |p| p.clean.len()));
    let metrics: Vec<Metric> = pairs.iter().map(|p| p.metric).collect();
    let last = format!("blocks.{}.hook_resid_post", n_layer - 1);
    let layer_names = |hook: &str| -> Vec<String> {
        (0..n_layer).map(|l| format!("blocks.{l}.{hook}")).collect()
    };
    let z_names = layer_names("attn.hook_z");
    let attn_names = layer_names("hook_attn_out");
    let resid_names = layer_names("hook_resid_pre");
    let mlp_names = layer_names("hook_mlp_out");
    let run = |clean: bool, names: &[&Vec<String>]| -> Result<ActivationCache> {
        let names: Vec<&str> = names
            .iter()
            .flat_map(|v| v.iter().map(String::as_str))
            .chain([last.as_str()])
            .collect();
        run_with_cache(model, &batch_ids(model, pairs, clean)?, &names)
    };
    // To the logits only the measured position runs; to heads, only the positions after those
    // every pair's prompts share (there, nothing changes).
    let to_logits = receivers.to == PathTo::Logits;
    let prefix_len = match to_logits {
        true => 0,
        false => Prefix::len(model, pairs, position),
    };
    let kv_names = match prefix_len {
        0 => Vec::new(),
        _ => Prefix::names(n_layer),
    };
    let mut clean_names = vec![&z_names, &attn_names, &resid_names, &kv_names];
    if receivers.freeze_mlps {
        clean_names.push(&mlp_names);
    }
    let clean_cache = run(true, &clean_names)?;
    // Step 3 runs the clean prompts again: its past is theirs.
    let prefix = Prefix::new(&clean_cache, n_layer, prefix_len)?;
    let embed = vec!["blocks.0.hook_resid_pre".to_string()];
    let corrupted_cache = run(
        false,
        &[match senders {
            Senders::Heads => &z_names,
            Senders::Mlps => &mlp_names,
            Senders::Embed => &embed,
        }],
    )?;
    let clean_metric = measure(model, clean_cache.need(&last)?, position, &metrics)?;
    let corrupted_metric = measure(model, corrupted_cache.need(&last)?, position, &metrics)?;
    // To the logits, every head frozen: each position's stream depends on that position alone
    // (layer norms, MLPs and the frozen attention outputs are per position), so only the
    // measured position is run; to heads, the positions after the prefix.
    let cut = |x: Tensor| -> Result<Tensor> {
        match to_logits {
            true => Ok(x.narrow(1, position, 1)?),
            false => prefix.after(x, 1, t),
        }
    };
    let need = |cache: &ActivationCache, names: &[String]| -> Result<Vec<Tensor>> {
        names.iter().map(|n| cut(cache.need(n)?.clone())).collect()
    };
    let frozen = Clean {
        z: need(&clean_cache, &z_names)?,
        attn: need(&clean_cache, &attn_names)?,
        resid: need(&clean_cache, &resid_names)?,
        mlp: match receivers.freeze_mlps {
            true => Some(need(&clean_cache, &mlp_names)?),
            false => None,
        },
        // Tensors share their storage: no copy.
        prefix: prefix.clone(),
        t,
        position,
    };
    // The sender groups, in the result's order: senders per pass for about rows_per_pass rows.
    let step = (rows_per_pass(if to_logits { 1 } else { t }) / b).max(1);
    let mut groups = Vec::new();
    match senders {
        Senders::Heads => {
            for (layer, z) in need(&corrupted_cache, &z_names)?.iter().enumerate() {
                for h0 in (0..n_head).step_by(step) {
                    let k = step.min(n_head - h0);
                    // (k·B, 1, H, 1): row i·B + j takes head h0 + i.
                    let mut take = vec![0f32; k * b * n_head];
                    for r in 0..k * b {
                        take[r * n_head + h0 + r / b] = 1.0;
                    }
                    let mix = Mix::new(tile(z, k)?, take, vec![k * b, 1, n_head, 1])?;
                    groups.push(Group {
                        start: layer,
                        senders: k,
                        input: None,
                        sender: Sender::Heads(mix),
                        reach: layer + 1,
                    });
                }
            }
        }
        Senders::Mlps => {
            for (layer, out) in need(&corrupted_cache, &mlp_names)?.into_iter().enumerate() {
                groups.push(Group {
                    start: layer,
                    senders: 1,
                    input: None,
                    sender: Sender::Mlp(out),
                    reach: layer + 1,
                });
            }
        }
        Senders::Embed => groups.push(Group {
            start: 0,
            senders: 1,
            input: Some(cut(corrupted_cache.need(&embed[0])?.clone())?),
            sender: Sender::Embed,
            reach: 0,
        }),
    }
    let mut patched = vec![Vec::new(); b];
    for g in &groups {
        crate::interrupt::check()?;
        let values = run_group(model, &frozen, g, receivers, &metrics, &clean_metric)?;
        for (r, v) in values.into_iter().enumerate() {
            patched[r % b].push(v);
        }
    }
    Ok(PathRun {
        clean: clean_metric,
        corrupted: corrupted_metric,
        patched,
    })
}

/// The metric of each row of group `g` (row `i·B + j`: sender `i`, pair `j`).
fn run_group(
    model: &Gpt2,
    clean: &Clean,
    g: &Group,
    receivers: &Receivers,
    metrics: &[Metric],
    clean_metric: &[f64],
) -> Result<Vec<f64>> {
    if receivers.to == PathTo::Logits {
        // The stream is the measured position's alone (see `path_batch`).
        let (x, _) = sender_run(model, clean, g, &BTreeSet::new(), PathTo::Logits)?;
        return measure_at(model, &x, metrics);
    }
    // Receivers a sender can reach: at or after the group's reach.
    let layers: BTreeMap<usize, Vec<usize>> = receivers
        .by_layer()
        .into_iter()
        .filter(|(l, _)| *l >= g.reach)
        .collect();
    let Some(&first) = layers.keys().next() else {
        // No path: the clean runs, unchanged.
        let rows = g.senders * clean_metric.len();
        return Ok((0..rows)
            .map(|r| clean_metric[r % clean_metric.len()])
            .collect());
    };
    // Step 2: the senders' run, up to the last receiver, keeping the receivers' inputs.
    let keep: BTreeSet<usize> = layers.keys().copied().collect();
    let (_, kept) = sender_run(model, clean, g, &keep, receivers.to)?;
    // Step 3: the clean runs again from the first receiver's layer, only the receivers' inputs
    // replaced by step 2's.
    let mut at = BTreeMap::new();
    for (&layer, heads) in &layers {
        let p = receivers
            .to
            .point(layer)
            .ok_or_else(|| Error::Internal("receivers without an input point".into()))?;
        let got = kept
            .get(&layer)
            .ok_or_else(|| Error::Internal(format!("{p:?} was not kept")))?;
        // (R, T, heads, d); the mask (1, 1, heads, 1) is 1 on the receivers.
        let (_, _, n, _) = got.dims4()?;
        let mut take = vec![0f32; n];
        for &h in heads {
            take[h] = 1.0;
        }
        at.insert(p, Mix::new(got.clone(), take, vec![1, 1, n, 1])?);
    }
    let x = tile(&clean.resid[first], g.senders)?;
    let cache = clean.prefix.cache(first, g.senders, clean.t)?;
    let x = pass(
        model,
        first,
        x,
        &mut ReceiverRun { at },
        clean.position,
        cache,
    )?;
    measure_at(model, &x, metrics)
}

/// Path patching averaged over `pairs`, as the IOI paper and ARENA average a dataset: each pair
/// path-patched as [`path_patch`] does one, the metric averaged over the pairs for every
/// sender, then normalised by the averaged baselines. Pairs may differ in length; those of one
/// length run as batches, the sums taken in the pairs' order all the same.
pub fn path_patch_mean(
    model: &Gpt2,
    pairs: &[Pair],
    senders: Senders,
    receivers: &Receivers,
    position: Option<isize>,
) -> Result<PathPatching> {
    check_pairs(model, pairs, By::Head, position)?;
    receivers.check(model)?;
    let mut runs: Vec<Option<PairRun>> = vec![None; pairs.len()];
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    for (at, idx) in batches(pairs, position)? {
        let ids: Vec<Ids> = idx.iter().map(|&i| Ids::from(&pairs[i])).collect();
        let mut r = path_batch(model, &ids, senders, receivers, at)?;
        for (k, &i) in idx.iter().enumerate() {
            runs[i] = Some(PairRun {
                metric: pairs[i].metric,
                position: at,
                clean: r.clean[k],
                corrupted: r.corrupted[k],
            });
            values[i] = std::mem::take(&mut r.patched[k]);
        }
    }
    let runs: Vec<PairRun> = runs.into_iter().flatten().collect();
    if runs.len() != pairs.len() {
        return Err(Error::Internal("a pair was in no batch".into()));
    }
    let Some(base) = runs.first() else {
        return Err(Error::param("pairs", "holds no pair"));
    };
    let mut sum = values[0].clone();
    for v in values.iter().skip(1) {
        sum.iter_mut().zip(v).for_each(|(a, b)| *a += b);
    }
    let n = pairs.len() as f64;
    sum.iter_mut().for_each(|v| *v /= n);
    let mean = PairRun {
        metric: base.metric,
        position: base.position,
        clean: runs.iter().map(|r| r.clean).sum::<f64>() / n,
        corrupted: runs.iter().map(|r| r.corrupted).sum::<f64>() / n,
    };
    let mut m = result(model, senders, receivers, &mean, sum);
    m.pairs = runs;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::super::batch::tests::{assert_close, ids, pairs};
    use super::*;
    use crate::analysis::ablation::HeadId;
    use crate::model::{tiny_config, tiny_model};

    #[test]
    fn a_batch_gives_each_pair_what_it_gets_alone() -> Result<()> {
        let m = tiny_model(tiny_config(40, 64, 3), 5)?;
        let head = |layer, head| HeadId { layer, head };
        let receivers = [head(1, 0), head(2, 1), head(2, 3)];
        for loss in [false, true] {
            let p = pairs(40, 9, 3, loss);
            let ids = ids(&p);
            for to in PathTo::ALL {
                let r = match to {
                    PathTo::Logits => Receivers::logits(),
                    _ => Receivers::heads(to, &receivers),
                };
                for (senders, freeze) in Senders::ALL
                    .into_iter()
                    .flat_map(|s| [(s, false), (s, true)])
                {
                    let r = r.clone().freezing_mlps(freeze);
                    let all = path_batch(&m, &ids, senders, &r, 6)?;
                    let label = format!("{senders} to {}, freeze {freeze}", r.describe());
                    for (j, one) in ids.iter().enumerate() {
                        let alone = path_batch(&m, &[*one], senders, &r, 6)?;
                        assert_close(&all.patched[j], &alone.patched[0], &label);
                        assert_close(&[all.clean[j]], &alone.clean, &label);
                        assert_close(&[all.corrupted[j]], &alone.corrupted, &label);
                    }
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
}
