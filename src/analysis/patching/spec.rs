//! What is patched ([`Act`], [`What`], [`By`]), the result's axes ([`Axis`]) and what a run is
//! measured by ([`Metric`]): the library's names for `gpt2 patch`'s options.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::hooks::Point;
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

    pub(super) fn tokens(self) -> Vec<u32> {
        match self {
            Self::LogitDiff { target, against } => vec![target, against],
            Self::Logit { target } | Self::Prob { target } | Self::Loss { target } => vec![target],
        }
    }
}
