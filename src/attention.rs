//! Causal multi-head self-attention, as in GPT-2 (`GPT2Attention`, eager path):
//! one fused QKV projection, scores `Q·Kᵀ/√hs`, causal mask, softmax in f32, `·V`, output projection.

use candle_core::{DType, Module, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::Linear;

use crate::checkpoint::Weights;
use crate::config::Config;
use crate::error::Result;

pub(crate) struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    head_size: usize,
    /// `1/√hs`, times `1/(layer+1)` when `scale_attn_by_inverse_layer_idx`.
    scale: f64,
}

impl Attention {
    pub(crate) fn load(w: &Weights, name: &str, layer: usize, cfg: &Config) -> Result<Self> {
        let c = cfg.n_embd;
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_size() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            c_attn: w.conv1d(&format!("{name}.c_attn"), c, 3 * c)?,
            c_proj: w.conv1d(&format!("{name}.c_proj"), c, c)?,
            n_head: cfg.n_head,
            head_size: cfg.head_size(),
            scale,
        })
    }

    /// `x`: (B, T, C). `mask`: (1, 1, T, T_k) additive f32 mask, `None` when no query can see a later key
    /// (a single new token). With `cache`, keys and values are appended and attention spans the
    /// whole cached sequence. With `capture`, also returns the f32 probabilities (B, nh, T, T_k).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, c) = x.dims3()?;
        let (nh, hs) = (self.n_head, self.head_size);

        // (B, T, C) -> (B, T, 3C) -> (B, T, 3, nh, hs) -> (3, B, nh, T, hs)
        let qkv = self
            .c_attn
            .forward(x)?
            .reshape((b, t, 3, nh, hs))?
            .permute((2, 0, 3, 1, 4))?;
        // 3 x (B, nh, T, hs), contiguous so the cache can copy them in and matmul can batch them.
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        // (B, nh, T_k, hs): views into the preallocated cache, no copy of the past.
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };

        // (B, nh, T, hs) x (B, nh, hs, T_k) -> (B, nh, T, T_k)
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;

        // (B, nh, T, T_k) x (B, nh, T_k, hs) -> (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        let y = probs
            .to_dtype(v.dtype())?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, c))?;
        let y = self.c_proj.forward(&y)?;
        Ok((y, capture.then_some(probs)))
    }
}
