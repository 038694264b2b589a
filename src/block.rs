//! One pre-LN transformer block: `x = x + attn(ln_1(x))`, then `x = x + mlp(ln_2(x))`.

use candle_core::{Module, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::attention::Attention;
use crate::checkpoint::Weights;
use crate::config::Config;
use crate::error::Result;
use crate::layer_norm::LayerNorm;
use crate::mlp::Mlp;

pub(crate) struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub(crate) fn load(w: &Weights, layer: usize, cfg: &Config) -> Result<Self> {
        let (c, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        let name = format!("h.{layer}");
        Ok(Self {
            ln_1: w.layer_norm(&format!("{name}.ln_1"), c, eps)?,
            attn: Attention::load(w, &format!("{name}.attn"), layer, cfg)?,
            ln_2: w.layer_norm(&format!("{name}.ln_2"), c, eps)?,
            mlp: Mlp::load(w, &format!("{name}.mlp"), cfg)?,
        })
    }

    /// (B, T, C) -> (B, T, C), and the attention probabilities when `capture`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (a, probs) = self
            .attn
            .forward(&self.ln_1.forward(x)?, mask, cache, capture)?;
        let x = (x + a)?;
        let x = (&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?;
        Ok((x, probs))
    }
}
