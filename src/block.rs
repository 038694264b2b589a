//! One pre-LN transformer block: `x = x + attn(ln_1(x))`, then `x = x + mlp(ln_2(x))`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::attention::{for_each_row, Attention, StepRow};
use crate::config::Config;
use crate::error::Result;
use crate::hooks::{LayerHook, Point};
use crate::layer_norm::LayerNorm;
use crate::linear::storage::Loader;
use crate::mlp::Mlp;

pub(crate) struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Block `h.{layer}`, its KV cache in `kv_dtype`.
    pub(crate) fn load(w: &Loader, layer: usize, cfg: &Config, kv_dtype: DType) -> Result<Self> {
        let (c, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        let name = format!("h.{layer}");
        Ok(Self {
            ln_1: LayerNorm::load(w, &format!("{name}.ln_1"), c, eps)?,
            attn: Attention::load(w, &format!("{name}.attn"), layer, cfg, kv_dtype)?,
            ln_2: LayerNorm::load(w, &format!("{name}.ln_2"), c, eps)?,
            mlp: Mlp::load(w, &format!("{name}.mlp"), cfg)?,
        })
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        self.attn.weight_bytes() + self.mlp.weight_bytes()
    }

    pub(crate) fn attention_output_weights(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        self.attn.output_weights(device)
    }

    /// (B, T, C) at positions `past..past + T` -> (B, T, C).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        past: usize,
        mut hook: Option<LayerHook<'_>>,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward(&self.ln_1.forward(x)?, mask, cache, past, hook.as_mut())?;
        let x = (x + a)?;
        let mut m = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        if let Some(h) = hook.as_mut() {
            h.at(Point::MlpOut, &mut m)?;
        }
        let mut x = (&x + m)?;
        if let Some(h) = hook.as_mut() {
            h.at(Point::ResidPost, &mut x)?;
        }
        Ok(x)
    }

    /// Q, K, V of the stream `x` (B, T, C) entering the block (`ln_1`, then `c_attn`).
    pub(crate) fn qkv(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        self.attn.qkv(&self.ln_1.forward(x)?)
    }

    /// The attention output (B, T, C) of the heads' outputs `z` (B, T, n_head, hs).
    pub(crate) fn attention_out(&self, z: &Tensor) -> Result<Tensor> {
        self.attn.project(z)
    }

    /// The MLP's output (B, T, C) on the stream `x` after the attention (`ln_2`, then the MLP).
    pub(crate) fn mlp_out(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp.forward(&self.ln_2.forward(x)?)
    }

    /// The block's output at `position` alone: `x` (B, T, C) from position 0, T > `position`
    /// -> (B, 1, C), what [`Block::forward`] gives there. Causal attention makes later positions
    /// irrelevant and earlier ones matter only through their keys and values, so those are all
    /// that is computed of them; the query, the attention output and the MLP are computed at
    /// `position` only (a decode step over a cache of the positions before it).
    pub(crate) fn forward_at(&self, x: &Tensor, position: usize) -> Result<Tensor> {
        self.forward_at_after(x, None, position)
    }

    /// [`Block::forward_at`] for `x` (B, T, C) at positions `past..past + T`, after the `past`
    /// positions whose keys and values `prefix` holds: -> (B, 1, C) at `position`
    /// (`past..past + T`).
    pub(crate) fn forward_at_after(
        &self,
        x: &Tensor,
        prefix: Option<&KvCache>,
        position: usize,
    ) -> Result<Tensor> {
        let past = prefix.map_or(0, |c| c.k_cache().current_seq_len());
        let mut cache = KvCache::new(2, position + 1);
        if let Some(p) = prefix {
            // The prefix's (B, nkv, past, hs) views, copied into this position's own cache.
            if let (Some(k), Some(v)) = (p.k()?, p.v()?) {
                cache.append(&k.contiguous()?, &v.contiguous()?)?;
            }
        }
        if position > past {
            let before = self.ln_1.forward(&x.narrow(1, 0, position - past)?)?;
            self.attn.append_kv(&before, &mut cache)?;
        }
        self.forward(
            &x.narrow(1, position - past, 1)?,
            None,
            Some(&mut cache),
            position,
            None,
        )
    }

    /// One decode step of independent sequences: `x` (N, 1, C), row `i` continuing `rows[i]`
    /// -> (N, 1, C). Each row's numbers are those of [`Block::forward`] on it alone.
    pub(crate) fn forward_step(
        &self,
        x: &Tensor,
        layer: usize,
        rows: &mut [StepRow<'_>],
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward_step(&self.ln_1.forward(x)?, layer, rows)?;
        let x = (x + a)?;
        let mut m = self.mlp.forward_rows(&self.ln_2.forward(&x)?)?;
        for_each_row(rows, layer, Point::MlpOut, &mut m)?;
        let mut x = (&x + m)?;
        for_each_row(rows, layer, Point::ResidPost, &mut x)?;
        Ok(x)
    }
}
