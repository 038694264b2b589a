//! Hooks: where a forward pass can be seen and changed ([`Point`], TransformerLens' hook
//! points), the [`Hook`] trait that sees it, and the interventions built on it: a model's own
//! [`HeadMask`] (heads removed from every pass) and [`HookPair`] to run two hooks as one. A point
//! no hook wants costs nothing.

use candle_core::Tensor;

use crate::error::Result;

/// A place in the forward pass where a [`Hook`] sees, and may change, a tensor; named after
/// TransformerLens' hook points. Layers are 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    /// (B, T, C): token plus position embeddings (`blocks.0.hook_resid_pre`).
    Embed,
    /// (B, T, n_head, head_size): layer l's queries, bias included (`attn.hook_q`).
    Q(usize),
    /// (B, T, n_kv_head, head_size): layer l's keys of the new tokens, bias included
    /// (`attn.hook_k`; `n_kv_head` is `n_head` but in grouped-query attention).
    K(usize),
    /// (B, T, n_kv_head, head_size): layer l's values of the new tokens (`attn.hook_v`).
    V(usize),
    /// (B, n_head, T, T_k) f32: layer l's post-softmax attention (`attn.hook_pattern`). Asking
    /// for it makes that layer take the unfused attention path, which computes it.
    Pattern(usize),
    /// (B, T, n_head, head_size): each head's output before `c_proj` (`attn.hook_z`). Zeroing a
    /// head here removes it (head ablation).
    Z(usize),
    /// (B, T, C): layer l's attention output, `c_proj` and its bias included (`hook_attn_out`).
    AttnOut(usize),
    /// (B, T, C): layer l's MLP output (`hook_mlp_out`).
    MlpOut(usize),
    /// (B, T, C): the residual stream after block l (`hook_resid_post`).
    ResidPost(usize),
}

/// Sees (and may change) tensors at [`Point`]s of a forward pass. Points it does not want cost
/// nothing.
pub trait Hook {
    /// Whether [`Hook::at`] should be called at `point`.
    fn wants(&self, point: Point) -> bool;
    /// Called at each wanted point, in forward order; may replace `t` (same shape).
    fn at(&mut self, point: Point, t: &mut Tensor) -> Result<()>;
}

/// Heads removed from every pass of a model ([`Gpt2::set_head_mask`]): per layer, a
/// (1, 1, n_head, hs) factor, 0 on removed heads and 1 elsewhere, and what to add after it
/// (zeros, or each removed head's mean output), applied to the heads' outputs at [`Point::Z`].
/// [`crate::analysis::ablation`] builds one.
#[derive(Debug, Clone, Default)]
pub struct HeadMask {
    pub(crate) layers: std::collections::BTreeMap<usize, (Tensor, Tensor)>,
}

impl HeadMask {
    /// Whether any head is removed.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    fn apply(&self, p: Point, z: &mut Tensor) -> Result<()> {
        if let Point::Z(l) = p {
            if let Some((keep, fill)) = self.layers.get(&l) {
                *z = z.broadcast_mul(keep)?.broadcast_add(fill)?;
            }
        }
        Ok(())
    }
}

impl Hook for HeadMask {
    fn wants(&self, p: Point) -> bool {
        matches!(p, Point::Z(l) if self.layers.contains_key(&l))
    }

    fn at(&mut self, p: Point, z: &mut Tensor) -> Result<()> {
        self.apply(p, z)
    }
}

/// A model's own head mask as a hook (it only reads the mask).
pub(crate) struct MaskRef<'a>(pub(crate) &'a HeadMask);

impl Hook for MaskRef<'_> {
    fn wants(&self, p: Point) -> bool {
        self.0.wants(p)
    }

    fn at(&mut self, p: Point, z: &mut Tensor) -> Result<()> {
        self.0.apply(p, z)
    }
}

/// Two hooks as one: both see every point either wants, the first first.
pub struct HookPair<'a, 'x, 'y>(pub &'a mut (dyn Hook + 'x), pub &'a mut (dyn Hook + 'y));

impl Hook for HookPair<'_, '_, '_> {
    fn wants(&self, p: Point) -> bool {
        self.0.wants(p) || self.1.wants(p)
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        if self.0.wants(p) {
            self.0.at(p, t)?;
        }
        if self.1.wants(p) {
            self.1.at(p, t)?;
        }
        Ok(())
    }
}

/// The hook points a block of layer `layer` calls, if any.
pub(crate) struct LayerHook<'a> {
    pub(crate) layer: usize,
    pub(crate) hook: &'a mut dyn Hook,
}

impl LayerHook<'_> {
    pub(crate) fn wants(&self, point: fn(usize) -> Point) -> bool {
        self.hook.wants(point(self.layer))
    }

    pub(crate) fn at(&mut self, point: fn(usize) -> Point, t: &mut Tensor) -> Result<()> {
        let p = point(self.layer);
        if self.hook.wants(p) {
            self.hook.at(p, t)?;
        }
        Ok(())
    }
}

/// Collects the attention of some layers.
pub(crate) struct Patterns<'a, F: FnMut(usize, Tensor) -> Result<()>> {
    pub(crate) layers: &'a [usize],
    pub(crate) f: F,
}

impl<F: FnMut(usize, Tensor) -> Result<()>> Hook for Patterns<'_, F> {
    fn wants(&self, point: Point) -> bool {
        matches!(point, Point::Pattern(l) if self.layers.contains(&l))
    }

    fn at(&mut self, point: Point, t: &mut Tensor) -> Result<()> {
        match point {
            Point::Pattern(l) => (self.f)(l, t.clone()),
            _ => Ok(()),
        }
    }
}
