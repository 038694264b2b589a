//! Causal multi-head self-attention, as in GPT-2 (`GPT2Attention`, eager path):
//! one fused QKV projection, scores `Q·Kᵀ/√hs`, causal mask, softmax in f32, `·V`, output projection.
//!
//! With `n_kv_head < n_head` (grouped-query attention; 1 is multi-query), K and V have `n_kv_head`
//! heads and query heads `g·r .. (g+1)·r` (`r = n_head / n_kv_head`) share K/V head `g`. Instead of
//! copying K and V `r` times (`repeat_kv`), each group's `r` query heads are stacked as `r·T` rows
//! of one matmul: the same numbers, with no copy of the cache per token.

use candle_core::{DType, Module, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::checkpoint::Weights;
use crate::config::Config;
use crate::error::Result;
use crate::linear::Linear;

pub(crate) struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_size: usize,
    /// `1/√hs`, times `1/(layer+1)` when `scale_attn_by_inverse_layer_idx`.
    scale: f64,
}

impl Attention {
    pub(crate) fn load(w: &Weights, name: &str, layer: usize, cfg: &Config) -> Result<Self> {
        let (c, kv) = (cfg.n_embd, cfg.kv_heads() * cfg.head_size());
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_size() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            // Q, K, V side by side: (C, C + 2·n_kv_head·hs); 3C for plain GPT-2.
            c_attn: w.conv1d(&format!("{name}.c_attn"), c, c + 2 * kv)?,
            c_proj: w.conv1d(&format!("{name}.c_proj"), c, c)?,
            n_head: cfg.n_head,
            n_kv_head: cfg.kv_heads(),
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
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let r = nh / nkv;

        // (B, T, C) -> (B, T, C + 2·nkv·hs)
        let qkv = self.c_attn.forward(x)?;
        // -> (B, nh, T, hs) and 2 x (B, nkv, T, hs), contiguous so the cache can copy them in and
        // matmul can batch them.
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            let part = qkv.narrow(2, start, n * hs)?.reshape((b, t, n, hs))?;
            Ok(part.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(0, nh)?;
        let k = heads(c, nkv)?;
        let v = heads(c + nkv * hs, nkv)?;
        // (B, nkv, T_k, hs): views into the preallocated cache, no copy of the past.
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };
        let t_k = k.dim(2)?;

        // (B, nh, T, hs) -> (B, nkv, r·T, hs): a free view, query heads grouped by K/V head.
        let q = q.reshape((b, nkv, r * t, hs))?;
        // (B, nkv, r·T, hs) x (B, nkv, hs, T_k) -> (B, nkv, r·T, T_k) -> (B, nh, T, T_k)
        let scores = (q.matmul(&k.t()?)? * self.scale)?
            .reshape((b, nh, t, t_k))?
            .to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;

        // (B, nkv, r·T, T_k) x (B, nkv, T_k, hs) -> (B, nkv, r·T, hs) = (B, nh, T, hs)
        //   -> (B, T, nh, hs) -> (B, T, C)
        let y = probs
            .to_dtype(v.dtype())?
            .reshape((b, nkv, r * t, t_k))?
            .matmul(&v)?
            .reshape((b, nh, t, hs))?
            .transpose(1, 2)?
            .reshape((b, t, c))?;
        let y = self.c_proj.forward(&y)?;
        Ok((y, capture.then_some(probs)))
    }
}
