//! [`run_with_cache`]: one forward pass keeping the activations at TransformerLens' hook names.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::hooks::{Hook, Point};
use crate::model::{Gpt2, Output};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_map_to_points() -> Result<()> {
        assert_eq!(site("blocks.0.hook_resid_pre", 2)?, Site::At(Point::Embed));
        assert_eq!(
            site("blocks.1.hook_resid_pre", 2)?,
            Site::At(Point::ResidPost(0))
        );
        assert_eq!(site("blocks.1.attn.hook_k", 2)?, Site::At(Point::K(1)));
        assert_eq!(site("hook_pos_embed", 2)?, Site::PosEmbed);
        for bad in [
            "blocks.2.hook_mlp_out",
            "blocks.x.hook_mlp_out",
            "blocks.0",
            "embed",
        ] {
            assert!(site(bad, 2).is_err(), "{bad}");
        }
        Ok(())
    }
}
