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
//! Batched as activation patching is: the senders of a layer are the rows of one pass from that
//! layer, which starts from the clean run's residual stream (nothing below it changes).

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;
use serde::Serialize;

use super::dataset::check_pairs;
use super::{check, measure, measure_at, pass, rows_per_pass, run_with_cache, ActivationCache};
use super::{Axis, By, Metric, Pair, PairRun, PathTo, Receivers, Senders};
use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};

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

/// The clean run's activations a path patch freezes or starts from, per layer: head outputs
/// (1, T, H, d), the residual stream entering each layer (1, T, C) and, to freeze the MLPs
/// too, their outputs (1, T, C).
struct Clean {
    z: Vec<Tensor>,
    resid: Vec<Tensor>,
    mlp: Option<Vec<Tensor>>,
}

/// A batch of senders: rows of one pass that starts at `start` from the clean residual stream
/// (or `input`), each row a sender patched at `patch`.
struct Group {
    start: usize,
    rows: usize,
    /// The residual stream entering `start`, when it is not the clean run's (the embeddings).
    input: Option<Tensor>,
    /// Where row r's sender is patched, and how.
    patch: Option<(Point, Mix)>,
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

/// Step 2's hook: from `start` on every head's output is the clean run's (but the senders'),
/// the senders take the corrupted value, and the receivers' inputs are kept.
struct SenderRun<'a> {
    start: usize,
    clean_z: &'a [Tensor],
    /// The clean run's MLP outputs, to freeze them too (the direct path only), or none.
    clean_mlp: Option<&'a [Tensor]>,
    patch: Option<&'a (Point, Mix)>,
    keep: BTreeSet<Point>,
    kept: BTreeMap<Point, Tensor>,
}

impl Hook for SenderRun<'_> {
    fn wants(&self, p: Point) -> bool {
        matches!(p, Point::Z(l) if l >= self.start)
            || matches!(p, Point::MlpOut(l) if l >= self.start && self.clean_mlp.is_some())
            || self.patch.is_some_and(|(at, _)| *at == p)
            || self.keep.contains(&p)
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        let frozen = match (p, self.clean_mlp) {
            (Point::Z(l), _) if l >= self.start => Some(&self.clean_z[l]),
            (Point::MlpOut(l), Some(mlp)) if l >= self.start => Some(&mlp[l]),
            _ => None,
        };
        if let Some(f) = frozen {
            // (1, T, ...) -> (R, T, ...): frozen at the clean run.
            *t = f.broadcast_as(t.dims())?.contiguous()?;
        }
        if let Some((at, mix)) = self.patch {
            if *at == p {
                *t = mix.apply(t)?;
            }
        }
        if self.keep.contains(&p) {
            self.kept.insert(p, t.clone());
        }
        Ok(())
    }
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
/// `metric` at `position` (default: the last). Heads give `[layer, head]`, as ARENA's
/// `get_path_patch_head_to_final_resid_post` / `get_path_patch_head_to_heads` (whose rows stop
/// below the last receiver's layer; here later senders are the clean metric).
pub fn path_patch(
    model: &Gpt2,
    clean: &[u32],
    corrupted: &[u32],
    senders: Senders,
    receivers: &Receivers,
    metric: Metric,
    position: Option<usize>,
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
    let c = model.config();
    let (n_layer, n_head, t) = (c.n_layer, c.n_head, clean.len());
    let device = model.device();
    let last = format!("blocks.{}.hook_resid_post", n_layer - 1);
    let z_names: Vec<String> = (0..n_layer)
        .map(|l| format!("blocks.{l}.attn.hook_z"))
        .collect();
    let resid_names: Vec<String> = (0..n_layer)
        .map(|l| format!("blocks.{l}.hook_resid_pre"))
        .collect();
    let names = |extra: &[&Vec<String>]| -> Vec<String> {
        extra
            .iter()
            .flat_map(|v| v.iter().cloned())
            .chain([last.clone()])
            .collect()
    };
    let run = |ids: &[u32], names: &[String]| -> Result<ActivationCache> {
        let ids = Tensor::new(ids, device)?.unsqueeze(0)?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        run_with_cache(model, &ids, &names)
    };
    let mlp_names: Vec<String> = (0..n_layer)
        .map(|l| format!("blocks.{l}.hook_mlp_out"))
        .collect();
    let clean_names = if receivers.freeze_mlps {
        names(&[&z_names, &resid_names, &mlp_names])
    } else {
        names(&[&z_names, &resid_names])
    };
    let clean_cache = run(clean, &clean_names)?;
    let corrupted_names = match senders {
        Senders::Heads => names(&[&z_names]),
        Senders::Mlps => names(&[&mlp_names]),
        Senders::Embed => names(&[&vec!["blocks.0.hook_resid_pre".to_string()]]),
    };
    let corrupted_cache = run(corrupted, &corrupted_names)?;
    let clean_metric = measure(model, clean_cache.need(&last)?, position, metric)?[0];
    let corrupted_metric = measure(model, corrupted_cache.need(&last)?, position, metric)?[0];
    // To the logits, every head frozen: each position's stream depends on that position alone
    // (layer norms, MLPs and the frozen attention outputs are per position), so only the
    // measured position is run, a 1-token pass (its own attention is computed and overwritten).
    let to_logits = receivers.to == PathTo::Logits;
    let cut = |t: Tensor| -> Result<Tensor> {
        Ok(if to_logits {
            t.narrow(1, position, 1)?
        } else {
            t
        })
    };
    let cut_all = |v: Vec<Tensor>| v.into_iter().map(cut).collect::<Result<Vec<_>>>();
    let frozen = Clean {
        z: cut_all(need_all(&clean_cache, &z_names)?)?,
        resid: cut_all(need_all(&clean_cache, &resid_names)?)?,
        mlp: match receivers.freeze_mlps {
            true => Some(cut_all(need_all(&clean_cache, &mlp_names)?)?),
            false => None,
        },
    };
    // The sender groups, in the result's order.
    let step = rows_per_pass(if to_logits { 1 } else { t });
    let mut groups = Vec::new();
    match senders {
        Senders::Heads => {
            let z = cut_all(need_all(&corrupted_cache, &z_names)?)?;
            for (layer, z) in z.iter().enumerate() {
                for h0 in (0..n_head).step_by(step) {
                    let rows = step.min(n_head - h0);
                    // (R, 1, H, 1): row r takes head h0 + r.
                    let mut take = vec![0f32; rows * n_head];
                    for r in 0..rows {
                        take[r * n_head + h0 + r] = 1.0;
                    }
                    let mix = Mix::new(z.clone(), take, vec![rows, 1, n_head, 1])?;
                    groups.push(Group {
                        start: layer,
                        rows,
                        input: None,
                        patch: Some((Point::Z(layer), mix)),
                        reach: layer + 1,
                    });
                }
            }
        }
        Senders::Mlps => {
            let mlp = cut_all(need_all(&corrupted_cache, &mlp_names)?)?;
            for (layer, out) in mlp.iter().enumerate() {
                // (1, 1, 1): one row, this layer's MLP.
                let mix = Mix::new(out.clone(), vec![1.0], vec![1, 1, 1])?;
                groups.push(Group {
                    start: layer,
                    rows: 1,
                    input: None,
                    patch: Some((Point::MlpOut(layer), mix)),
                    reach: layer + 1,
                });
            }
        }
        Senders::Embed => groups.push(Group {
            start: 0,
            rows: 1,
            input: Some(cut(corrupted_cache
                .need("blocks.0.hook_resid_pre")?
                .clone())?),
            patch: None,
            reach: 0,
        }),
    }
    let mut patched = Vec::new();
    for g in &groups {
        crate::interrupt::check()?;
        patched.extend(run_group(
            model,
            &frozen,
            g,
            receivers,
            metric,
            position,
            clean_metric,
        )?);
    }
    let (axes, shape) = match senders {
        Senders::Heads => (vec![Axis::Layer, Axis::Head], vec![n_layer, n_head]),
        Senders::Mlps => (vec![Axis::Layer], vec![n_layer]),
        Senders::Embed => (Vec::new(), Vec::new()),
    };
    let span = clean_metric - corrupted_metric;
    let normalized = patched.iter().map(|p| (p - clean_metric) / span).collect();
    Ok(PathPatching {
        senders,
        receivers: receivers.clone(),
        metric,
        position,
        clean: clean_metric,
        corrupted: corrupted_metric,
        axes,
        shape,
        patched,
        normalized,
        pairs: Vec::new(),
    })
}

/// The activations at `names`, in order.
fn need_all(cache: &ActivationCache, names: &[String]) -> Result<Vec<Tensor>> {
    names.iter().map(|n| cache.need(n).cloned()).collect()
}

/// The metric of each row of group `g`.
fn run_group(
    model: &Gpt2,
    clean: &Clean,
    g: &Group,
    receivers: &Receivers,
    metric: Metric,
    position: usize,
    clean_metric: f64,
) -> Result<Vec<f64>> {
    // (1, T, C) -> (R, T, C): the stream entering the group's first layer, once per sender.
    let x = g
        .input
        .as_ref()
        .unwrap_or(&clean.resid[g.start])
        .repeat((g.rows, 1, 1))?;
    let mut step2 = SenderRun {
        start: g.start,
        clean_z: &clean.z,
        clean_mlp: clean.mlp.as_deref(),
        patch: g.patch.as_ref(),
        keep: BTreeSet::new(),
        kept: BTreeMap::new(),
    };
    if receivers.to == PathTo::Logits {
        // The stream is the measured position's alone (see `path_patch`).
        let x = pass(model, g.start, x, &mut step2, 0)?;
        return measure_at(model, &x, metric);
    }
    // Receivers a sender can reach: at or after the group's reach.
    let layers: BTreeMap<usize, Vec<usize>> = receivers
        .by_layer()
        .into_iter()
        .filter(|(l, _)| *l >= g.reach)
        .collect();
    let (Some(&first), Some(&top)) = (layers.keys().next(), layers.keys().last()) else {
        // No path: the clean run, unchanged.
        return Ok(vec![clean_metric; g.rows]);
    };
    // Step 2: the senders' run, up to the last receiver, keeping the receivers' inputs.
    step2.keep = layers
        .keys()
        .filter_map(|&l| receivers.to.point(l))
        .collect();
    model.run_from(g.start, x, None, Some(&mut step2), Output::StopAfter(top))?;
    let kept = step2.kept;
    // Step 3: the clean run again from the first receiver's layer, only the receivers' inputs
    // replaced by step 2's.
    let mut at = BTreeMap::new();
    for (&layer, heads) in &layers {
        let p = receivers
            .to
            .point(layer)
            .ok_or_else(|| Error::Internal("receivers without an input point".into()))?;
        let got = kept
            .get(&p)
            .ok_or_else(|| Error::Internal(format!("{p:?} was not kept")))?;
        // (R, T, heads, d); the mask (1, 1, heads, 1) is 1 on the receivers.
        let (_, _, n, _) = got.dims4()?;
        let mut take = vec![0f32; n];
        for &h in heads {
            take[h] = 1.0;
        }
        at.insert(p, Mix::new(got.clone(), take, vec![1, 1, n, 1])?);
    }
    let x = clean.resid[first].repeat((g.rows, 1, 1))?;
    let x = pass(model, first, x, &mut ReceiverRun { at }, position)?;
    measure_at(model, &x, metric)
}

/// Path patching averaged over `pairs`, as the IOI paper and ARENA average a dataset: each pair
/// path-patched as [`path_patch`] does one, the metric averaged over the pairs for every
/// sender, then normalised by the averaged baselines. Pairs may differ in length.
pub fn path_patch_mean(
    model: &Gpt2,
    pairs: &[Pair],
    senders: Senders,
    receivers: &Receivers,
    position: Option<usize>,
) -> Result<PathPatching> {
    check_pairs(model, pairs, By::Head, position)?;
    receivers.check(model)?;
    let mut mean: Option<PathPatching> = None;
    let mut runs = Vec::with_capacity(pairs.len());
    for p in pairs {
        let r = path_patch(
            model,
            &p.clean,
            &p.corrupted,
            senders,
            receivers,
            p.metric,
            position,
        )?;
        runs.push(PairRun {
            metric: p.metric,
            position: r.position,
            clean: r.clean,
            corrupted: r.corrupted,
        });
        match &mut mean {
            None => mean = Some(r),
            Some(m) => {
                m.patched
                    .iter_mut()
                    .zip(&r.patched)
                    .for_each(|(a, b)| *a += b);
                m.clean += r.clean;
                m.corrupted += r.corrupted;
            }
        }
    }
    let mut m = mean.ok_or_else(|| Error::param("pairs", "holds no pair"))?;
    let n = pairs.len() as f64;
    m.patched.iter_mut().for_each(|v| *v /= n);
    m.clean /= n;
    m.corrupted /= n;
    let span = m.clean - m.corrupted;
    m.normalized = m.patched.iter().map(|p| (p - m.clean) / span).collect();
    m.pairs = runs;
    Ok(m)
}
