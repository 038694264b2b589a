//! What is patched ([`Act`], [`What`], [`By`]; for path patching [`Senders`] and [`Receivers`]),
//! the result's axes ([`Axis`]) and what a run is measured by ([`Metric`]): the library's names
//! for `gpt2 patch`'s options.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use std::collections::{BTreeMap, BTreeSet};

use crate::analysis::ablation::HeadId;
use crate::error::{Error, Result};
use crate::hooks::Point;
use crate::model::Gpt2;
use crate::perplexity::log_softmax_at;

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
    pub(super) fn point(self, layer: usize) -> Option<Point> {
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

/// What `--what` names: one activation, or every one of a kind (`every`). Serialized as its
/// name (`"head_out"`, `"every"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl Serialize for What {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
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
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
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
    pub(super) fn per_head(self) -> bool {
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
// Path patching: senders and receivers

/// The senders swept: each one patched on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Senders {
    /// Every head (`hook_z`): a `[layer, head]` result.
    Heads,
    /// Every MLP (`hook_mlp_out`): a `[layer]` result.
    Mlps,
    /// The token embeddings (`hook_embed`; the positions' are the same in both runs): one value.
    Embed,
}

impl Senders {
    pub const ALL: [Self; 3] = [Self::Heads, Self::Mlps, Self::Embed];

    pub fn name(self) -> &'static str {
        match self {
            Self::Heads => "heads",
            Self::Mlps => "mlps",
            Self::Embed => "embed",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::Heads => "Each head, one at a time: a layers x heads map",
            Self::Mlps => "Each MLP, one at a time: one value per layer",
            Self::Embed => "The token embeddings: one value",
        }
    }
}

impl fmt::Display for Senders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Senders {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::param("senders", format!("`{s}`: expected heads, mlps or embed")))
    }
}

/// Where the paths end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathTo {
    /// The final residual stream, read by the logits.
    Logits,
    /// The receivers' queries (`attn.hook_q`).
    Q,
    /// The receivers' keys (`attn.hook_k`).
    K,
    /// The receivers' values (`attn.hook_v`).
    V,
}

impl PathTo {
    pub const ALL: [Self; 4] = [Self::Logits, Self::Q, Self::K, Self::V];

    pub fn name(self) -> &'static str {
        match self {
            Self::Logits => "logits",
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::Logits => "The logits: each sender's direct effect (IOI's name movers)",
            Self::Q => "The --receivers' queries (IOI's S-inhibition heads, to the name movers)",
            Self::K => "The --receivers' keys",
            Self::V => "The --receivers' values",
        }
    }

    /// The receivers' input point at `layer` (the logits: none).
    pub(super) fn point(self, layer: usize) -> Option<Point> {
        match self {
            Self::Logits => None,
            Self::Q => Some(Point::Q(layer)),
            Self::K => Some(Point::K(layer)),
            Self::V => Some(Point::V(layer)),
        }
    }
}

impl fmt::Display for PathTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PathTo {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::param("path-to", format!("`{s}`: expected logits, q, k or v")))
    }
}

/// The receivers: the logits, or heads' queries, keys or values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receivers {
    pub to: PathTo,
    /// The receiving heads (none for the logits), sorted.
    pub heads: Vec<HeadId>,
    /// Only the direct path: the MLPs frozen at the clean run too, so a sender reaches the
    /// receivers through the residual stream alone (TransformerLens 4's
    /// `get_act_patch_direct_path` edge). Off: MLPs are recomputed, part of the path (the IOI
    /// paper's path patching).
    pub freeze_mlps: bool,
}

impl Receivers {
    pub fn logits() -> Self {
        Self {
            to: PathTo::Logits,
            heads: Vec::new(),
            freeze_mlps: false,
        }
    }

    /// `heads`' input `to` (q, k or v).
    pub fn heads(to: PathTo, heads: &[HeadId]) -> Self {
        let heads: BTreeSet<HeadId> = heads.iter().copied().collect();
        Self {
            to,
            heads: heads.into_iter().collect(),
            freeze_mlps: false,
        }
    }

    /// The same receivers, reached by the direct path alone (`freeze` true) or through the
    /// MLPs too.
    pub fn freezing_mlps(self, freeze: bool) -> Self {
        Self {
            freeze_mlps: freeze,
            ..self
        }
    }

    /// The receivers as words: `the logits`, `the queries of 9.9, 9.6`.
    pub fn describe(&self) -> String {
        let input = match self.to {
            PathTo::Logits => return "the logits".into(),
            PathTo::Q => "queries",
            PathTo::K => "keys",
            PathTo::V => "values",
        };
        let heads: Vec<String> = self.heads.iter().map(HeadId::to_string).collect();
        format!("the {input} of {}", heads.join(", "))
    }

    pub(super) fn check(&self, model: &Gpt2) -> Result<()> {
        let c = model.config();
        let n = match self.to {
            PathTo::Logits if self.heads.is_empty() => return Ok(()),
            PathTo::Logits => {
                return Err(Error::param(
                    "receivers",
                    "are heads, for --path-to q, k or v: the logits need none",
                ))
            }
            PathTo::Q => c.n_head,
            PathTo::K | PathTo::V => c.kv_heads(),
        };
        if self.heads.is_empty() {
            return Err(Error::param(
                "receivers",
                format!(
                    "are needed for --path-to {}: the heads whose input is patched, as L.H,...",
                    self.to
                ),
            ));
        }
        for h in &self.heads {
            if h.layer >= c.n_layer {
                return Err(Error::param(
                    "receivers",
                    format!(
                        "{h}: the model has {} layers (0..={})",
                        c.n_layer,
                        c.n_layer - 1
                    ),
                ));
            }
            if h.head >= n {
                return Err(Error::param(
                    "receivers",
                    format!(
                        "{h}: the model has {n} {} heads per layer (0..={})",
                        self.to,
                        n - 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The receiving heads by layer.
    pub(super) fn by_layer(&self) -> BTreeMap<usize, Vec<usize>> {
        let mut m: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for h in &self.heads {
            m.entry(h.layer).or_default().push(h.head);
        }
        m
    }
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

    /// Whether the metric reads only its tokens' logits (logit-diff, logit), not the whole
    /// vocabulary's (prob and loss normalise over it).
    pub(super) fn token_logits_only(self) -> bool {
        matches!(self, Self::LogitDiff { .. } | Self::Logit { .. })
    }

    /// The metric from its tokens' logits alone (`logit(t)`), for the kinds that
    /// [read nothing else](Metric::token_logits_only); `None` for the others or a token not
    /// given.
    pub(super) fn of_tokens(self, logit: impl Fn(u32) -> Option<f64>) -> Option<f64> {
        match self {
            Self::LogitDiff { target, against } => Some(logit(target)? - logit(against)?),
            Self::Logit { target } => logit(target),
            Self::Prob { .. } | Self::Loss { .. } => None,
        }
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

    pub(super) fn tokens(self) -> Vec<u32> {
        match self {
            Self::LogitDiff { target, against } => vec![target, against],
            Self::Logit { target } | Self::Prob { target } | Self::Loss { target } => vec![target],
        }
    }
}
