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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};
use crate::perplexity::log_softmax_at;

// ---------------------------------------------------------------------------------------------
// run_with_cache

/// Where a TransformerLens hook name reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// `hook_embed`: the token embeddings (B, T, C).
    TokenEmbed,
    /// `hook_pos_embed`: the position embeddings, repeated over the batch (B, T, C).
    PosEmbed,
    /// Every other name: a [`Point`] of the pass.
    At(Point),
}

/// The [`Site`] of a TransformerLens hook name, checked against `n_layer` layers.
fn site(name: &str, n_layer: usize) -> Result<Site> {
    let unknown = || {
        Error::Input(format!(
            "unknown hook name `{name}`: expected hook_embed, hook_pos_embed or \
             blocks.L.hook_resid_pre|hook_attn_out|hook_mlp_out|hook_resid_post or \
             blocks.L.attn.hook_q|hook_k|hook_v|hook_z|hook_pattern"
        ))
    };
    match name {
        "hook_embed" => return Ok(Site::TokenEmbed),
        "hook_pos_embed" => return Ok(Site::PosEmbed),
        _ => {}
    }
    let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
    let (layer, hook) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    if layer >= n_layer {
        return Err(Error::Input(format!(
            "hook name `{name}`: the model has {n_layer} layers (0..={})",
            n_layer.saturating_sub(1)
        )));
    }
    let point = match hook {
        "hook_resid_pre" if layer == 0 => Point::Embed,
        "hook_resid_pre" => Point::ResidPost(layer - 1),
        "attn.hook_q" => Point::Q(layer),
        "attn.hook_k" => Point::K(layer),
        "attn.hook_v" => Point::V(layer),
        "attn.hook_z" => Point::Z(layer),
        "attn.hook_pattern" => Point::Pattern(layer),
        "hook_attn_out" => Point::AttnOut(layer),
        "hook_mlp_out" => Point::MlpOut(layer),
        "hook_resid_post" => Point::ResidPost(layer),
        _ => return Err(unknown()),
    };
    Ok(Site::At(point))
}

/// The layer a point belongs to (the embeddings: none).
fn point_layer(p: Point) -> Option<usize> {
    match p {
        Point::Embed => None,
        Point::Q(l)
        | Point::K(l)
        | Point::V(l)
        | Point::Pattern(l)
        | Point::Z(l)
        | Point::AttnOut(l)
        | Point::MlpOut(l)
        | Point::ResidPost(l) => Some(l),
    }
}

/// Activations by TransformerLens hook name, as [`run_with_cache`] returns them. Shapes are
/// TransformerLens': (B, T, C) for the residual stream and the layers' outputs, q/k/v/z
/// (B, T, heads, d_head), pattern (B, heads, query, key).
#[derive(Debug, Clone, Default)]
pub struct ActivationCache {
    acts: BTreeMap<String, Tensor>,
}

impl ActivationCache {
    /// The activation named `name`, if it was asked for.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.acts.get(name)
    }

    /// The activation named `name`, or an error saying it was not cached.
    pub fn need(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| Error::Internal(format!("`{name}` was not cached")))
    }

    /// The names held, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.acts.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.acts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.acts.is_empty()
    }
}

/// Keeps the tensors at some points, each under its names (one point can have two:
/// `blocks.L.hook_resid_post` is `blocks.{L+1}.hook_resid_pre`).
struct Keep<'a> {
    names: BTreeMap<Point, Vec<&'a str>>,
    acts: &'a mut BTreeMap<String, Tensor>,
}

impl Hook for Keep<'_> {
    fn wants(&self, p: Point) -> bool {
        self.names.contains_key(&p)
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        for name in self.names.get(&p).into_iter().flatten() {
            self.acts.insert((*name).to_string(), t.clone());
        }
        Ok(())
    }
}

/// One forward pass of `ids` (B, T) that keeps the activations at `names` (TransformerLens'
/// hook names: `hook_embed`, `hook_pos_embed`, `blocks.{L}.hook_resid_pre`,
/// `blocks.{L}.attn.hook_q|hook_k|hook_v|hook_z|hook_pattern`, `blocks.{L}.hook_attn_out`,
/// `blocks.{L}.hook_mlp_out`, `blocks.{L}.hook_resid_post`) and nothing else. The pass stops
/// after the last layer a name needs (no LM head); only layers whose pattern is asked for leave
/// the fused attention kernel.
pub fn run_with_cache(model: &Gpt2, ids: &Tensor, names: &[&str]) -> Result<ActivationCache> {
    let n_layer = model.loaded_layers();
    let (b, t) = ids.dims2()?;
    let mut acts = BTreeMap::new();
    let mut points: BTreeMap<Point, Vec<&str>> = BTreeMap::new();
    for &name in names {
        match site(name, n_layer)? {
            Site::TokenEmbed => {
                acts.insert(name.to_string(), model.token_embeddings(ids)?);
            }
            Site::PosEmbed => {
                // (T, C) -> (B, T, C), as TransformerLens' PosEmbed repeats it.
                let pos = model.position_embeddings(0, t)?;
                acts.insert(name.to_string(), pos.unsqueeze(0)?.repeat((b, 1, 1))?);
            }
            Site::At(p) => points.entry(p).or_default().push(name),
        }
    }
    if !points.is_empty() {
        let last = points.keys().filter_map(|&p| point_layer(p)).max();
        let mut keep = Keep {
            names: points,
            acts: &mut acts,
        };
        match last {
            Some(last) => {
                model.run(ids, None, Some(&mut keep), Output::StopAfter(last))?;
            }
            // Only the embeddings' sum: no block to run.
            None => {
                let mut x = model.embed(ids, 0)?;
                keep.at(Point::Embed, &mut x)?;
            }
        }
    }
    Ok(ActivationCache { acts })
}

// ---------------------------------------------------------------------------------------------
// What is patched

/// The activation a patch replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// The residual stream entering a block (`hook_resid_pre`).
    ResidPre,
    /// A layer's attention output (`hook_attn_out`).
    AttnOut,
    /// A layer's MLP output (`hook_mlp_out`).
    MlpOut,
    /// A head's output before `c_proj` (`attn.hook_z`).
    HeadOut,
    /// A head's queries (`attn.hook_q`).
    HeadQ,
    /// A head's keys (`attn.hook_k`).
    HeadK,
    /// A head's values (`attn.hook_v`).
    HeadV,
    /// A head's attention pattern (`attn.hook_pattern`).
    HeadPattern,
}

impl Act {
    /// The three block activations, in `get_act_patch_block_every`'s order.
    pub const BLOCK: [Self; 3] = [Self::ResidPre, Self::AttnOut, Self::MlpOut];
    /// The five head activations, in `get_act_patch_attn_head_*_every`'s order.
    pub const HEAD: [Self; 5] = [
        Self::HeadOut,
        Self::HeadQ,
        Self::HeadK,
        Self::HeadV,
        Self::HeadPattern,
    ];

    /// `resid_pre`, `head_out`, ...: the CLI's `--what`.
    pub fn name(self) -> &'static str {
        match self {
            Self::ResidPre => "resid_pre",
            Self::AttnOut => "attn_out",
            Self::MlpOut => "mlp_out",
            Self::HeadOut => "head_out",
            Self::HeadQ => "head_q",
            Self::HeadK => "head_k",
            Self::HeadV => "head_v",
            Self::HeadPattern => "head_pattern",
        }
    }

    /// Whether it is a head's (patched per head) rather than a whole layer's.
    pub fn per_head(self) -> bool {
        !Self::BLOCK.contains(&self)
    }

    /// TransformerLens' hook name of it at `layer`.
    pub fn hook_name(self, layer: usize) -> String {
        let hook = match self {
            Self::ResidPre => "hook_resid_pre",
            Self::AttnOut => "hook_attn_out",
            Self::MlpOut => "hook_mlp_out",
            Self::HeadOut => "attn.hook_z",
            Self::HeadQ => "attn.hook_q",
            Self::HeadK => "attn.hook_k",
            Self::HeadV => "attn.hook_v",
            Self::HeadPattern => "attn.hook_pattern",
        };
        format!("blocks.{layer}.{hook}")
    }

    /// Where the pass meets it at `layer` (`resid_pre` is the input of the layer: no point).
    fn point(self, layer: usize) -> Option<Point> {
        match self {
            Self::ResidPre => None,
            Self::AttnOut => Some(Point::AttnOut(layer)),
            Self::MlpOut => Some(Point::MlpOut(layer)),
            Self::HeadOut => Some(Point::Z(layer)),
            Self::HeadQ => Some(Point::Q(layer)),
            Self::HeadK => Some(Point::K(layer)),
            Self::HeadV => Some(Point::V(layer)),
            Self::HeadPattern => Some(Point::Pattern(layer)),
        }
    }
}

/// What `--what` names: one activation, or every one of a kind (`every`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    One(Act),
    /// [`Act::BLOCK`] (by layer or position) or [`Act::HEAD`] (by head or head and position).
    Every,
}

impl What {
    /// Every value, in the order `--help` lists them.
    pub const ALL: [Self; 9] = [
        Self::One(Act::ResidPre),
        Self::One(Act::AttnOut),
        Self::One(Act::MlpOut),
        Self::One(Act::HeadOut),
        Self::One(Act::HeadQ),
        Self::One(Act::HeadK),
        Self::One(Act::HeadV),
        Self::One(Act::HeadPattern),
        Self::Every,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::One(a) => a.name(),
            Self::Every => "every",
        }
    }

    /// One line on it, for `--help`.
    pub fn help(self) -> &'static str {
        match self {
            Self::One(Act::ResidPre) => "The residual stream entering each block",
            Self::One(Act::AttnOut) => "Each attention layer's output",
            Self::One(Act::MlpOut) => "Each MLP's output",
            Self::One(Act::HeadOut) => "Each head's output (hook_z)",
            Self::One(Act::HeadQ) => "Each head's queries",
            Self::One(Act::HeadK) => "Each head's keys",
            Self::One(Act::HeadV) => "Each head's values",
            Self::One(Act::HeadPattern) => "Each head's attention pattern",
            Self::Every => {
                "resid_pre, attn_out, mlp_out (--by layer|pos) or the five head activations \
                 (--by head|head_pos)"
            }
        }
    }
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for What {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s).ok_or_else(|| {
            let all: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
            Error::param("what", format!("`{s}`: expected one of {}", all.join(", ")))
        })
    }
}

/// What one patch covers, besides its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    /// The whole activation of a layer, every position (block activations).
    Layer,
    /// One position of a layer (block activations).
    Pos,
    /// One head, every position (head activations).
    Head,
    /// One head at one position (for patterns: one destination row).
    HeadPos,
}

impl By {
    pub const ALL: [Self; 4] = [Self::Layer, Self::Pos, Self::Head, Self::HeadPos];

    pub fn name(self) -> &'static str {
        match self {
            Self::Layer => "layer",
            Self::Pos => "pos",
            Self::Head => "head",
            Self::HeadPos => "head_pos",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::Layer => "One patch per layer, every position (resid_pre, attn_out, mlp_out)",
            Self::Pos => "One patch per layer and position (resid_pre, attn_out, mlp_out)",
            Self::Head => "One patch per head, every position (head_*)",
            Self::HeadPos => {
                "One patch per head and position (head_*; for head_pattern: per destination)"
            }
        }
    }

    /// Whether it patches heads (else whole layers).
    fn per_head(self) -> bool {
        matches!(self, Self::Head | Self::HeadPos)
    }

    /// The default for `what`: by position for the block activations, by head otherwise.
    pub fn default_for(what: What) -> Self {
        match what {
            What::One(a) if !a.per_head() => Self::Pos,
            _ => Self::Head,
        }
    }
}

impl fmt::Display for By {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for By {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                Error::param(
                    "by",
                    format!("`{s}`: expected one of layer, pos, head, head_pos"),
                )
            })
    }
}

/// An axis of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// Which activation (`every`): [`Patching::acts`] names them.
    Act,
    Layer,
    Pos,
    Head,
}

// ---------------------------------------------------------------------------------------------
// The metric

/// What a run is measured by, at one position's logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Metric {
    /// `logit[target] − logit[against]`.
    LogitDiff { target: u32, against: u32 },
    /// `logit[target]`.
    Logit { target: u32 },
    /// `softmax(logits)[target]`.
    Prob { target: u32 },
    /// `−log softmax(logits)[target]` (nats): the loss of predicting `target` there.
    Loss { target: u32 },
}

impl Metric {
    /// The metric of one position's logits.
    pub fn of(self, logits: &[f32]) -> Result<f64> {
        let at = |t: u32| {
            logits.get(t as usize).map(|&v| v as f64).ok_or_else(|| {
                Error::param(
                    "target",
                    format!("token id {t} is outside the vocabulary of {}", logits.len()),
                )
            })
        };
        Ok(match self {
            Self::LogitDiff { target, against } => at(target)? - at(against)?,
            Self::Logit { target } => at(target)?,
            Self::Prob { target } => {
                at(target)?;
                log_softmax_at(logits, target as usize).exp()
            }
            Self::Loss { target } => {
                at(target)?;
                -log_softmax_at(logits, target as usize)
            }
        })
    }

    /// `logit-diff`, `logit`, `prob` or `loss`.
    pub fn name(self) -> &'static str {
        match self {
            Self::LogitDiff { .. } => "logit-diff",
            Self::Logit { .. } => "logit",
            Self::Prob { .. } => "prob",
            Self::Loss { .. } => "loss",
        }
    }

    fn tokens(self) -> Vec<u32> {
        match self {
            Self::LogitDiff { target, against } => vec![target, against],
            Self::Logit { target } | Self::Prob { target } | Self::Loss { target } => vec![target],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Patching

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
            format!("{p} is out of range: the prompts have {t} tokens (0..={})", t - 1),
        )),
        Some(p) => Ok(p),
        None => Ok(t - 1),
    }
}

/// The metric at `position` of each row of final residual streams `x` (R, T, C).
fn measure(model: &Gpt2, x: &Tensor, position: usize, metric: Metric) -> Result<Vec<f64>> {
    // (R, T, C) -> (R, 1, C) -> (R, 1, vocab) -> (R, vocab)
    let logits = model
        .unembed(&x.narrow(1, position, 1)?)?
        .squeeze(1)?
        .to_vec2::<f32>()?;
    logits.iter().map(|row| metric.of(row)).collect()
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
/// `take` (R, ...) 0 or 1 broadcast against `t` (R, ...) and `clean` (1, ...), `keep = 1 − take`.
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

/// Rows per batched pass: about 4096 token rows, at least one patch.
fn rows_per_pass(t: usize) -> usize {
    (4096 / t.max(1)).max(1)
}

/// One activation patched at every index `by` names, every layer: the metric of each patched
/// run, in TransformerLens' order, and the axes after `layer`.
struct Patcher<'a> {
    model: &'a Gpt2,
    /// The corrupted run's residual stream entering each layer, (1, T, C).
    resid: Vec<Tensor>,
    /// The clean run's activations the patches need.
    clean: ActivationCache,
    metric: Metric,
    position: usize,
    t: usize,
}

impl Patcher<'_> {
    /// `act` patched by `by` at every layer: values `[layer, ...]` and the axes after `layer`.
    fn run(&self, act: Act, by: By) -> Result<(Vec<f64>, Vec<(Axis, usize)>)> {
        let c = self.model.config();
        let (n_layer, t) = (c.n_layer, self.t);
        let heads = match act {
            Act::HeadK | Act::HeadV => c.kv_heads(),
            _ => c.n_head,
        };
        // Each patch's mask, as a shape broadcast over the activation without its batch axis
        // (block (T, C); head vectors (T, heads, d_head); patterns (heads, T, T_k)), and the axes
        // its index runs over: patch `r` is the mask with flat element `r` set, so patches come
        // in TransformerLens' order.
        let (mask, axes): (Vec<usize>, Vec<(Axis, usize)>) = match (act, by) {
            (Act::ResidPre | Act::AttnOut | Act::MlpOut, By::Layer) => (vec![1, 1], vec![]),
            (Act::ResidPre | Act::AttnOut | Act::MlpOut, By::Pos) => {
                (vec![t, 1], vec![(Axis::Pos, t)])
            }
            (Act::HeadPattern, By::Head) => (vec![heads, 1, 1], vec![(Axis::Head, heads)]),
            (Act::HeadPattern, By::HeadPos) => (
                vec![heads, t, 1],
                vec![(Axis::Head, heads), (Axis::Pos, t)],
            ),
            (_, By::Head) => (vec![1, heads, 1], vec![(Axis::Head, heads)]),
            (_, By::HeadPos) => (
                vec![t, heads, 1],
                vec![(Axis::Pos, t), (Axis::Head, heads)],
            ),
            (a, b) => return Err(by_error(a, b)),
        };
        let patches: usize = mask.iter().product();
        let mut out = Vec::with_capacity(n_layer * patches);
        for layer in 0..n_layer {
            let clean = self.clean.need(&act.hook_name(layer))?;
            let resid = &self.resid[layer];
            let mut start = 0;
            while start < patches {
                crate::interrupt::check()?;
                let rows = rows_per_pass(t).min(patches - start);
                // (R, ...mask): row r has a 1 at flat index start + r.
                let mut take = vec![0f32; rows * patches];
                for r in 0..rows {
                    take[r * patches + start + r] = 1.0;
                }
                let mut shape = vec![rows];
                shape.extend(&mask);
                let take = Tensor::from_vec(take, shape, resid.device())?;
                let keep = take.affine(-1.0, 1.0)?;
                let patch = PatchRows {
                    point: act.point(layer),
                    clean: clean.clone(),
                    keep,
                    take,
                };
                // (1, T, C) -> (R, T, C): the corrupted stream entering `layer`, once per patch.
                let x = resid.repeat((rows, 1, 1))?;
                let x = match act.point(layer) {
                    // resid_pre is the layer's input: patched before the pass.
                    None => self.pass(layer, patch.apply(&x)?, &mut NoHook)?,
                    Some(_) => {
                        let mut patch = patch;
                        self.pass(layer, x, &mut patch)?
                    }
                };
                out.extend(measure(self.model, &x, self.position, self.metric)?);
                start += rows;
            }
        }
        Ok((out, axes))
    }

    /// Layers `layer..` on `x` (R, T, C) with `hook`: the last block's output (R, T, C).
    fn pass(&self, layer: usize, x: Tensor, hook: &mut dyn Hook) -> Result<Tensor> {
        let n_layer = self.model.config().n_layer;
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
            layer: n_layer - 1,
        };
        self.model.run_from(
            layer,
            x,
            None,
            Some(&mut seen),
            Output::StopAfter(n_layer - 1),
        )?;
        seen.last
            .ok_or_else(|| Error::Internal("the last residual stream was not seen".into()))
    }
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
    let acts: Vec<Act> = match what {
        What::One(a) => vec![a],
        What::Every if by.per_head() => Act::HEAD.to_vec(),
        What::Every => Act::BLOCK.to_vec(),
    };
    if let Some(&a) = acts.iter().find(|a| a.per_head() != by.per_head()) {
        return Err(by_error(a, by));
    }
    let n_layer = model.config().n_layer;
    let t = clean.len();
    let device = model.device();
    let last = format!("blocks.{}.hook_resid_post", n_layer - 1);
    // The corrupted run: each layer's input and the output.
    let resid_names: Vec<String> = (0..n_layer).map(|l| Act::ResidPre.hook_name(l)).collect();
    let mut names: Vec<&str> = resid_names.iter().map(String::as_str).collect();
    names.push(&last);
    let corrupted_ids = Tensor::new(corrupted, device)?.unsqueeze(0)?;
    let run = run_with_cache(model, &corrupted_ids, &names)?;
    let resid = resid_names
        .iter()
        .map(|n| run.need(n).cloned())
        .collect::<Result<Vec<_>>>()?;
    let corrupted_metric = measure(model, run.need(&last)?, position, metric)?[0];
    // The clean run: the activations patched in, and the output.
    let clean_names: BTreeSet<String> = acts
        .iter()
        .flat_map(|a| (0..n_layer).map(|l| a.hook_name(l)))
        .chain([last.clone()])
        .collect();
    let names: Vec<&str> = clean_names.iter().map(String::as_str).collect();
    let clean_ids = Tensor::new(clean, device)?.unsqueeze(0)?;
    let clean_cache = run_with_cache(model, &clean_ids, &names)?;
    let clean_metric = measure(model, clean_cache.need(&last)?, position, metric)?[0];
    let patcher = Patcher {
        model,
        resid,
        clean: clean_cache,
        metric,
        position,
        t,
    };
    let n_head = model.config().n_head;
    let mut patched = Vec::new();
    let mut inner = Vec::new();
    for &act in &acts {
        let (mut values, mut axes) = patcher.run(act, by)?;
        if what == What::Every {
            // TransformerLens stacks the five head results on one shape: k and v of a model
            // with fewer K/V heads are padded with zeros to n_head, and the pattern by position
            // is rearranged from [layer, head, pos] to [layer, pos, head].
            match (act, by) {
                (Act::HeadPattern, By::HeadPos) => {
                    values = swap_last_two(&values, n_layer, n_head, t);
                    axes = vec![(Axis::Pos, t), (Axis::Head, n_head)];
                }
                (Act::HeadK | Act::HeadV, _) => {
                    let have = axes.last().map_or(1, |a| a.1);
                    values = pad_last(&values, have, n_head);
                    if let Some(a) = axes.last_mut() {
                        a.1 = n_head;
                    }
                }
                _ => {}
            }
        }
        patched.extend(values);
        inner = axes;
    }
    let mut axes = Vec::new();
    let mut shape = Vec::new();
    if what == What::Every {
        axes.push(Axis::Act);
        shape.push(acts.len());
    }
    axes.push(Axis::Layer);
    shape.push(n_layer);
    for (a, n) in inner {
        axes.push(a);
        shape.push(n);
    }
    let span = clean_metric - corrupted_metric;
    let normalized = patched
        .iter()
        .map(|p| (p - corrupted_metric) / span)
        .collect();
    Ok(Patching {
        what,
        by,
        metric,
        position,
        clean: clean_metric,
        corrupted: corrupted_metric,
        acts,
        axes,
        shape,
        patched,
        normalized,
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
        .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, want - have)))
        .collect()
}

impl Patching {
    /// The metric in words, `tokens` the text of each token id (for the report).
    pub fn describe(&self, text: impl Fn(u32) -> String) -> String {
        let at = format!("at position {}", self.position);
        match self.metric {
            Metric::LogitDiff { target, against } => format!(
                "logit({:?}) - logit({:?}) {at}",
                text(target),
                text(against)
            ),
            Metric::Logit { target } => format!("logit({:?}) {at}", text(target)),
            Metric::Prob { target } => format!("p({:?}) {at}", text(target)),
            Metric::Loss { target } => format!("-log p({:?}) {at}", text(target)),
        }
    }

    /// The tables [`Patching::table`] prints: the last two axes are rows × columns, the
    /// leading ones (act, and layer when there are three) one table each, with its title.
    pub fn tables(&self) -> Vec<(String, Vec<Vec<f64>>, Vec<Vec<f64>>)> {
        let n = self.shape.len();
        let (rows, cols) = match n {
            0 => (1, 1),
            1 => (self.shape[0], 1),
            _ => (self.shape[n - 2], self.shape[n - 1]),
        };
        let lead = n.saturating_sub(2);
        let per = (rows * cols).max(1);
        let cut = |v: &[f64]| -> Vec<Vec<f64>> { v.chunks(cols.max(1)).map(<[f64]>::to_vec).collect() };
        (0..self.patched.len() / per)
            .map(|i| {
                // The leading indices of table i, row-major.
                let mut title = Vec::new();
                let mut rest = i;
                for k in (0..lead).rev() {
                    let size = self.shape[k].max(1);
                    let idx = rest % size;
                    rest /= size;
                    title.push(match self.axes[k] {
                        Axis::Act => self
                            .acts
                            .get(idx)
                            .map_or_else(|| idx.to_string(), |a| a.name().to_string()),
                        a => format!("{} {idx}", axis_name(a)),
                    });
                }
                title.reverse();
                let span = i * per..(i + 1) * per;
                (
                    title.join(", "),
                    cut(&self.patched[span.clone()]),
                    cut(&self.normalized[span]),
                )
            })
            .collect()
    }

    /// Text tables of the patched metric and the normalised one, rows and columns labelled by
    /// `label(axis, index)` (e.g. positions by their tokens).
    pub fn table(&self, label: &dyn Fn(Axis, usize) -> String) -> String {
        use std::fmt::Write;
        let n = self.axes.len();
        let (row_axis, col_axis) = match n {
            0 => (Axis::Layer, None),
            1 => (self.axes[0], None),
            _ => (self.axes[n - 2], Some(self.axes[n - 1])),
        };
        let mut s = String::new();
        for (title, patched, normalized) in self.tables() {
            for (what, m) in [("patched", &patched), ("normalised", &normalized)] {
                let _ = writeln!(
                    s,
                    "{what}{}{title}",
                    if title.is_empty() { "" } else { ": " }
                );
                let labels: Vec<String> = (0..m.len()).map(|r| label(row_axis, r)).collect();
                let w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0).max(5);
                let cols = m.first().map_or(0, Vec::len);
                let heads: Vec<String> = (0..cols)
                    .map(|c| col_axis.map_or_else(|| "value".into(), |a| label(a, c)))
                    .collect();
                let cw = heads.iter().map(|h| h.chars().count()).max().unwrap_or(0).max(8);
                let _ = write!(s, "{:>w$}", axis_name(row_axis));
                for h in &heads {
                    let _ = write!(s, " {h:>cw$}");
                }
                s.push('\n');
                for (l, row) in labels.iter().zip(m) {
                    let _ = write!(s, "{l:>w$}");
                    for v in row {
                        let _ = write!(s, " {v:>+cw$.4}");
                    }
                    s.push('\n');
                }
                s.push('\n');
            }
        }
        s
    }
}

/// An axis as the tables head it.
fn axis_name(a: Axis) -> &'static str {
    match a {
        Axis::Act => "act",
        Axis::Layer => "layer",
        Axis::Pos => "pos",
        Axis::Head => "head",
    }
}
