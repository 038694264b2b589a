//! Head ablation: removing heads' outputs before `c_proj` ([`Point::Z`]), as transformers'
//! `head_mask` does (zero), or replacing each by its mean over the prompt's positions (mean).
//! A [`Hook`], so it rides along any forward pass: generation, inspection, perplexity.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::hooks::{HeadMask, Hook, Point};
use crate::model::{Gpt2, Output};

/// A head: layer and head index, 0-based, written `L.H`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct HeadId {
    pub layer: usize,
    pub head: usize,
}

impl FromStr for HeadId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::param(
                "ablate",
                format!("`{s}`: write heads as LAYER.HEAD, e.g. 5.1"),
            )
        };
        let (l, h) = s.trim().split_once('.').ok_or_else(bad)?;
        Ok(Self {
            layer: l.parse().map_err(|_| bad())?,
            head: h.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for HeadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.layer, self.head)
    }
}

/// `L.H,L.H,...` as heads: at least one (an empty list would silently ablate nothing).
pub fn parse_heads(s: &str) -> Result<Vec<HeadId>> {
    let heads: Vec<HeadId> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect::<Result<_>>()?;
    if heads.is_empty() {
        return Err(Error::param(
            "ablate",
            format!("`{s}` names no head: write heads as LAYER.HEAD,..., e.g. 5.1,5.5"),
        ));
    }
    Ok(heads)
}

/// What an ablated head's output becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AblateMode {
    /// Zero: the head contributes nothing (transformers' `head_mask`).
    #[default]
    Zero,
    /// The head's output averaged over the prompt's positions: it stops depending on the token.
    Mean,
}

impl AblateMode {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: [Self; 2] = [Self::Zero, Self::Mean];

    /// `zero` or `mean`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Mean => "mean",
        }
    }

    /// One line on what an ablated head's output becomes.
    pub fn help(self) -> &'static str {
        match self {
            Self::Zero => "Zero: the head contributes nothing (transformers' `head_mask`)",
            Self::Mean => {
                "The head's output averaged over the prompt's positions: it stops depending on \
                 the token"
            }
        }
    }
}

impl fmt::Display for AblateMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AblateMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::param("ablate-mode", format!("`{s}`: expected zero or mean")))
    }
}

/// The head mask that ablates `heads` of `model` (set it with [`Gpt2::set_head_mask`]): zero, or
/// each head's output averaged over `prompt`'s positions (one clean pass).
pub fn head_mask(
    model: &Gpt2,
    heads: &[HeadId],
    mode: AblateMode,
    prompt: &[u32],
) -> Result<HeadMask> {
    let c = model.config();
    let (nh, hs) = (c.n_head, c.head_size());
    let mut by_layer: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for h in heads {
        if h.layer >= model.loaded_layers() {
            return Err(Error::param(
                "ablate",
                format!(
                    "{h}: the model has {} layers (0..={})",
                    model.loaded_layers(),
                    model.loaded_layers() - 1
                ),
            ));
        }
        if h.head >= nh {
            return Err(Error::param(
                "ablate",
                format!("{h}: the model has {nh} heads per layer (0..={})", nh - 1),
            ));
        }
        by_layer.entry(h.layer).or_default().insert(h.head);
    }
    let means = match mode {
        AblateMode::Zero => BTreeMap::new(),
        AblateMode::Mean => head_means(model, prompt, by_layer.keys().copied().collect())?,
    };
    let dtype = model.act_dtype();
    let mut mask = HeadMask::default();
    for (&l, set) in &by_layer {
        let mut keep = vec![1f32; nh * hs];
        let mut fill = vec![0f32; nh * hs];
        for &h in set {
            keep[h * hs..(h + 1) * hs].fill(0.0);
            if let Some(m) = means.get(&l) {
                fill[h * hs..(h + 1) * hs].copy_from_slice(&m[h * hs..(h + 1) * hs]);
            }
        }
        let t = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (1, 1, nh, hs), model.device())?.to_dtype(dtype)?)
        };
        mask.layers.insert(l, (t(keep)?, t(fill)?));
    }
    Ok(mask)
}

/// Each head's output `z` (n_head·hs values) of `layers`, averaged over the positions of
/// `prompt`: what mean ablation puts in an ablated head's place.
pub(crate) fn head_means(
    model: &Gpt2,
    prompt: &[u32],
    layers: Vec<usize>,
) -> Result<BTreeMap<usize, Vec<f32>>> {
    struct Means {
        layers: Vec<usize>,
        got: BTreeMap<usize, Vec<f32>>,
    }
    impl Hook for Means {
        fn wants(&self, p: Point) -> bool {
            matches!(p, Point::Z(l) if self.layers.contains(&l))
        }
        fn at(&mut self, p: Point, z: &mut Tensor) -> Result<()> {
            if let Point::Z(l) = p {
                // (1, T, nh, hs) -> (nh·hs,): the mean over positions.
                let (_, t, nh, hs) = z.dims4()?;
                let m = z
                    .to_dtype(DType::F32)?
                    .sum(1)?
                    .affine(1.0 / t as f64, 0.0)?;
                self.got.insert(l, m.reshape(nh * hs)?.to_vec1::<f32>()?);
            }
            Ok(())
        }
    }
    let Some(&last) = layers.iter().max() else {
        return Ok(BTreeMap::new());
    };
    let mut hook = Means {
        layers,
        got: BTreeMap::new(),
    };
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    model.run(&ids, None, Some(&mut hook), Output::StopAfter(last))?;
    Ok(hook.got)
}

/// A different head of one layer ablated in each row of a batch: row `i` ablates `heads[i]` of
/// `layer` (zero, or the head's `means`), for head importance in one batched pass.
pub(crate) struct PerRow {
    layer: usize,
    keep: Tensor,
    fill: Tensor,
}

impl PerRow {
    /// `heads[i]` in row `i`; `means` (n_head·hs) for mean ablation.
    pub(crate) fn new(
        model: &Gpt2,
        layer: usize,
        heads: &[usize],
        means: Option<&[f32]>,
    ) -> Result<Self> {
        let c = model.config();
        let (nh, hs, b) = (c.n_head, c.head_size(), heads.len());
        let mut keep = vec![1f32; b * nh * hs];
        let mut fill = vec![0f32; b * nh * hs];
        for (row, &h) in heads.iter().enumerate() {
            let at = row * nh * hs + h * hs;
            keep[at..at + hs].fill(0.0);
            if let Some(m) = means {
                fill[at..at + hs].copy_from_slice(&m[h * hs..(h + 1) * hs]);
            }
        }
        let dtype = model.act_dtype();
        let t = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (b, 1, nh, hs), model.device())?.to_dtype(dtype)?)
        };
        Ok(Self {
            layer,
            keep: t(keep)?,
            fill: t(fill)?,
        })
    }
}

impl Hook for PerRow {
    fn wants(&self, p: Point) -> bool {
        p == Point::Z(self.layer)
    }

    fn at(&mut self, _: Point, z: &mut Tensor) -> Result<()> {
        *z = z.broadcast_mul(&self.keep)?.broadcast_add(&self.fill)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_as_layer_dot_head() -> Result<()> {
        assert_eq!(
            parse_heads("5.1, 0.3")?,
            [HeadId { layer: 5, head: 1 }, HeadId { layer: 0, head: 3 }]
        );
        for bad in ["5", "5.x", "-1.2", "1.2.3"] {
            let e = parse_heads(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("LAYER.HEAD"), "{bad}: {e}");
        }
        Ok(())
    }
}
