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
//! Pairs of one length are patched as one batch ([`batch`]); a dataset's pairs are batched by
//! length ([`dataset`]).
//!
//! [`batch`]: pairs of one length at once; [`cache`]: [`run_with_cache`]; [`dataset`]: the mean
//! over pairs; [`path`]: path patching; [`spec`]: the options' types; [`table`]: the text report.

mod batch;
mod cache;
mod dataset;
mod path;
mod spec;
mod table;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Cache, Gpt2, Output};

use batch::{batch_ids, patch_batch, tile, Ids, Prefix};
pub use cache::{run_with_cache, ActivationCache};
pub(crate) use dataset::batches_by;
pub use dataset::{activation_patch_mean, Pair, PairRun};
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

/// `position` in prompts of `t` tokens (`label` names them in the error: a dataset's pair): 0 or
/// more counts from the start, negative from the end as Python indexes (-1 the last, -t the
/// first); `None` is the last.
fn resolve(position: Option<isize>, t: usize, label: Option<&str>) -> Result<usize> {
    let Some(p) = position else {
        return Ok(t.saturating_sub(1));
    };
    let at = match usize::try_from(p) {
        Ok(p) => Some(p).filter(|&p| p < t),
        Err(_) => t.checked_sub(p.unsigned_abs()),
    };
    at.ok_or_else(|| {
        let (of, whose) = match label {
            Some(l) => (format!(" for {l}"), "its"),
            None => (String::new(), "the"),
        };
        Error::param(
            "position",
            format!(
                "{p} is out of range{of}: {whose} prompts have {t} tokens ({}..={}; negative \
                 counts from the end)",
                -(t as i128),
                t as i128 - 1
            ),
        )
    })
}

/// Checks the inputs of a patching run and returns the position measured.
fn check(model: &Gpt2, clean: &[u32], corrupted: &[u32], position: Option<isize>) -> Result<usize> {
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
    resolve(position, t, None)
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
    let logits = model
        .token_logits(x, &tokens)?
        .squeeze(1)?
        .to_vec2::<f32>()?;
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

/// The axes of a result after `layer`, with their sizes.
type Axes = Vec<(Axis, usize)>;

/// Rows per batched pass: about 4096 token rows, at least one.
fn rows_per_pass(t: usize) -> usize {
    (4096 / t.max(1)).max(1)
}

/// Layers `layer..` on `x` (R, T', C) with `hook`: the last block's output at `position`
/// (R, 1, C). `x` holds positions `past..T` after the `past` whose keys and values `cache` holds
/// ([`Prefix::cache`]; none: T' = T from position 0). When the hook wants nothing of the last
/// layer, that block runs at the position alone ([`Gpt2::block_at`]): nothing else of it is
/// measured.
fn pass(
    model: &Gpt2,
    layer: usize,
    x: Tensor,
    hook: &mut dyn Hook,
    position: usize,
    mut cache: Option<Cache>,
) -> Result<Tensor> {
    let past = cache.as_ref().map_or(0, Cache::seq_len);
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
        let x = pass_to(model, layer, last - 1, x, hook, cache.as_mut())?;
        return match &cache {
            Some(cache) => model.block_at_after(last, &x, cache, position),
            None => model.block_at(last, &x, position),
        };
    }
    let x = pass_to(model, layer, last, x, hook, cache.as_mut())?;
    Ok(x.narrow(1, position - past, 1)?)
}

/// Layers `layer..=to` on `x` (R, T', C) (after `cache`'s positions) with `hook`: block `to`'s
/// output (R, T', C).
fn pass_to(
    model: &Gpt2,
    layer: usize,
    to: usize,
    x: Tensor,
    hook: &mut dyn Hook,
    cache: Option<&mut Cache>,
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
    model.run_from(layer, x, cache, Some(&mut seen), Output::StopAfter(to))?;
    seen.last
        .ok_or_else(|| Error::Internal("the residual stream was not seen".into()))
}

/// Activation patching of `model`: the corrupted prompt run with `what` replaced by the clean
/// run's at each layer and each index `by` names, measured by `metric` at `position` (default:
/// the last; negative counts from the end, -1 the last). Equal to TransformerLens' `get_act_patch_*` (see the README's table):
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
    position: Option<isize>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_from_the_start_or_the_end() -> Result<()> {
        for (p, want) in [
            (None, 4),
            (Some(0), 0),
            (Some(4), 4),
            (Some(-1), 4),
            (Some(-5), 0),
        ] {
            assert_eq!(resolve(p, 5, None)?, want, "{p:?}");
        }
        for p in [5, -6, isize::MIN, isize::MAX] {
            let e = resolve(Some(p), 5, Some("line 2"))
                .err()
                .map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(
                e.contains(&format!("{p} is out of range for line 2")),
                "{e}"
            );
            assert!(e.contains("(-5..=4"), "{e}");
        }
        assert_eq!(resolve(Some(-1), 1, None)?, 0);
        Ok(())
    }
}
