//! Causal multi-head self-attention, as in GPT-2 (`GPT2Attention`, eager path):
//! one fused QKV projection, scores `Q·Kᵀ/√hs`, causal mask, softmax in f32, `·V`, output projection.
//!
//! With `n_kv_head < n_head` (grouped-query attention; 1 is multi-query), K and V have `n_kv_head`
//! heads and query heads `g·r .. (g+1)·r` (`r = n_head / n_kv_head`) share K/V head `g`. Instead of
//! copying K and V `r` times (`repeat_kv`), each group's `r` query heads are stacked as `r·T` rows
//! of one matmul: the same numbers, with no copy of the cache per token.
//!
//! Two paths compute the same numbers. On the CPU, unless a hook asks for the attention pattern,
//! the fused path ([`kernels`]) reads Q, K and V in place and never builds the (T, T) scores of
//! the masked half. Elsewhere (GPUs, or a captured pattern) it is candle's ops, step by step.

pub(crate) mod kernels;

use candle_core::{CpuStorage, DType, Storage, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::hooks::{Hook, LayerHook, Point};
use crate::linear::kernels::Elems;
use crate::linear::storage::{Loader, Storage as WeightStorage, Target};
use crate::linear::Linear;
use crate::options::LoadOptions;

/// What the KV cache holds keys and values as: [`LoadOptions::kv_cache`], or by default f16 on
/// the host when the weights are reduced (f16, bf16, blocks: half the bytes each decoded token
/// reads from the cache, as llama.cpp does), else the activations' dtype (f32 on the host:
/// exact).
pub(crate) fn kv_cache_dtype(opts: &LoadOptions, target: &Target) -> Result<DType> {
    Ok(match opts.kv_cache {
        Some(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
        Some(d) => {
            return Err(Error::param(
                "kv-cache",
                format!("{}: the cache holds f32, f16 or bf16", d.as_str()),
            ))
        }
        None if target.host && target.storage != WeightStorage::Dtype(DType::F32) => DType::F16,
        None => target.act_dtype,
    })
}

pub(crate) struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_size: usize,
    /// `1/√hs`, times `1/(layer+1)` when `scale_attn_by_inverse_layer_idx`.
    scale: f64,
    /// The host kernels run this layer (its weights are on the host).
    fused: bool,
    /// What the KV cache stores keys and values as.
    kv_dtype: DType,
}

impl Attention {
    /// Layer `layer`'s attention `name` (`h.{layer}.attn`), its cache in `kv_dtype`.
    pub(crate) fn load(
        w: &Loader,
        name: &str,
        layer: usize,
        cfg: &Config,
        kv_dtype: DType,
    ) -> Result<Self> {
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
            fused: w.target.host,
            kv_dtype,
        })
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        self.c_attn.weight_bytes() + self.c_proj.weight_bytes()
    }

    /// `c_proj` as (C, C) f32 (rows by input: head `h` owns rows `h·hs..`) and its bias (C,).
    pub(crate) fn output_weights(&self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let w = self.c_proj.weight_kn(device)?;
        let bias = match self.c_proj.bias() {
            Some(b) => b.to_dtype(DType::F32)?,
            None => Tensor::zeros(w.dim(1)?, DType::F32, device)?,
        };
        Ok((w, bias))
    }

    /// `x`: (B, T, C) at positions `past..past + T`. `mask`: (1, 1, T, T_k) additive f32 mask,
    /// `None` when no query can see a later key (a single new token). With `cache`, keys and
    /// values are appended and attention spans the whole cached sequence.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        past: usize,
        mut hook: Option<&mut LayerHook<'_>>,
    ) -> Result<Tensor> {
        // (B, T, C) -> (B, T, C + 2·nkv·hs)
        let qkv = self.c_attn.forward(x, None)?;
        let y = self.mix(&qkv, mask, cache, past, hook.as_deref_mut())?;
        let mut out = self.c_proj.forward(&y, None)?;
        if let Some(h) = hook {
            h.at(Point::AttnOut, &mut out)?;
        }
        Ok(out)
    }

    /// Q, K, V of `x` (B, T, C, after `ln_1`): (B, T, n_head, hs), (B, T, n_kv_head, hs) twice,
    /// the tensors the hook points `Q`, `K`, `V` see in [`Attention::forward`].
    pub(crate) fn qkv(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        // (B, T, C) -> (B, T, C + 2·nkv·hs)
        let qkv = self.c_attn.forward(x, None)?;
        let (b, t, _) = qkv.dims3()?;
        let part = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, start, n * hs)?.reshape((b, t, n, hs))?)
        };
        Ok([
            part(0, nh)?,
            part(nh * hs, nkv)?,
            part((nh + nkv) * hs, nkv)?,
        ])
    }

    /// The heads' outputs `z` (B, T, n_head, hs) through `c_proj`: (B, T, C), the attention's
    /// output as [`Attention::forward`] makes it from the `Z` point on.
    pub(crate) fn project(&self, z: &Tensor) -> Result<Tensor> {
        let (b, t, nh, hs) = z.dims4()?;
        Ok(self.c_proj.forward(&z.reshape((b, t, nh * hs))?, None)?)
    }

    /// Appends the keys and values of `x` (B, T, C, after `ln_1`) to `cache`, as [`forward`]
    /// with that cache would, without the queries' attention or the output projection: the
    /// context a later position attends to ([`crate::block::Block::forward_at`]).
    ///
    /// [`forward`]: Attention::forward
    pub(crate) fn append_kv(&self, x: &Tensor, cache: &mut KvCache) -> Result<()> {
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let c = nh * hs;
        // (B, T, C) -> (B, T, C + 2·nkv·hs), then K and V as (B, nkv, T, hs).
        let qkv = self.c_attn.forward(x, None)?;
        cache.append(
            &self.to_cache(self.heads(&qkv, c, nkv)?)?,
            &self.to_cache(self.heads(&qkv, c + nkv * hs, nkv)?)?,
        )?;
        Ok(())
    }

    /// One decode step of independent sequences: `x` (N, 1, C), row `i` the new token of
    /// `rows[i]`, which has its own cache, position and hook. The projections read their weights
    /// once for all rows ([`Linear::forward_rows`]: each row's numbers are its own, as if alone);
    /// attention runs per sequence over its own cache.
    pub(crate) fn forward_step(
        &self,
        x: &Tensor,
        layer: usize,
        rows: &mut [StepRow<'_>],
    ) -> Result<Tensor> {
        let (n, _, _) = x.dims3()?;
        if n != rows.len() {
            return Err(Error::Internal(format!(
                "attention step: {n} rows for {} sequences",
                rows.len()
            )));
        }
        // (N, 1, C) -> (N, 1, C + 2·nkv·hs)
        let qkv = self.c_attn.forward_rows(x, None)?;
        let ys = rows
            .iter_mut()
            .enumerate()
            .map(|(i, row)| {
                let mut hook = LayerHook {
                    layer,
                    hook: &mut *row.hook,
                };
                // (1, 1, C + 2·nkv·hs) -> (1, 1, C)
                self.mix(
                    &qkv.narrow(0, i, 1)?,
                    None,
                    Some(&mut *row.cache),
                    row.past,
                    Some(&mut hook),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // N × (1, 1, C) -> (N, 1, C)
        let mut out = self.c_proj.forward_rows(&Tensor::cat(&ys, 0)?, None)?;
        for_each_row(rows, layer, Point::AttnOut, &mut out)?;
        Ok(out)
    }

    /// Q, K, V (B, T, C + 2·nkv·hs) -> the heads' outputs side by side, head-major (B, T, C),
    /// after the hook's `Z` point.
    fn mix(
        &self,
        qkv: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        past: usize,
        mut hook: Option<&mut LayerHook<'_>>,
    ) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let (nh, hs) = (self.n_head, self.head_size);
        let wants = |p: fn(usize) -> Point| hook.as_ref().is_some_and(|h| h.wants(p));
        let wants_pattern = wants(Point::Pattern);
        let wants_qkv = wants(Point::Q) || wants(Point::K) || wants(Point::V);
        // Q, K, V are split out and handed to the hook only when it wants one of them.
        let hooked;
        let qkv = match hook.as_deref_mut() {
            Some(h) if wants_qkv => {
                hooked = self.hook_qkv(qkv, h)?;
                &hooked
            }
            _ => qkv,
        };
        let y = if self.fused && !wants_pattern && qkv.dtype() == DType::F32 {
            self.fused(qkv, cache, past)?
        } else {
            self.unfused(qkv, mask, cache, hook.as_deref_mut())?
        };
        // (B, T, C): the heads' outputs side by side, head-major.
        Ok(match hook {
            Some(h) if h.wants(Point::Z) => {
                let mut z = y.reshape((b, t, nh, hs))?;
                h.at(Point::Z, &mut z)?;
                z.reshape((b, t, nh * hs))?
            }
            _ => y,
        })
    }

    /// `qkv` (B, T, C + 2·nkv·hs) after the hook's `Q`, `K` and `V` points, each seen as
    /// (B, T, heads, hs) (TransformerLens' `hook_q|k|v`), put back side by side.
    fn hook_qkv(&self, qkv: &Tensor, hook: &mut LayerHook<'_>) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let parts = [
            (Point::Q as fn(usize) -> Point, 0, nh),
            (Point::K, nh * hs, nkv),
            (Point::V, (nh + nkv) * hs, nkv),
        ]
        .into_iter()
        .map(|(point, start, n)| {
            // (B, T, n·hs) -> (B, T, n, hs): a free view, head-major columns.
            let mut part = qkv.narrow(2, start, n * hs)?;
            if hook.wants(point) {
                let mut heads = part.reshape((b, t, n, hs))?;
                hook.at(point, &mut heads)?;
                // (B, T, n, hs) -> (B, T, n·hs)
                part = heads.reshape((b, t, n * hs))?;
            }
            Ok(part)
        })
        .collect::<Result<Vec<_>>>()?;
        // 3 × (B, T, ·) -> (B, T, C + 2·nkv·hs)
        Ok(Tensor::cat(&parts, 2)?)
    }

    /// The heads of `qkv` starting at column `start`, `n` of them: (B, n, T, hs), contiguous.
    fn heads(&self, qkv: &Tensor, start: usize, n: usize) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let hs = self.head_size;
        let part = qkv.narrow(2, start, n * hs)?.reshape((b, t, n, hs))?;
        Ok(part.transpose(1, 2)?.contiguous()?)
    }

    /// Keys or values (B, nkv, T, hs) as the cache stores them. f32 to halves on the host goes
    /// through `half`'s vectorised slice conversion (candle's is element by element).
    fn to_cache(&self, x: Tensor) -> Result<Tensor> {
        use half::slice::HalfFloatSliceExt;
        let to = self.kv_dtype;
        if x.dtype() == to {
            return Ok(x);
        }
        let halves = {
            let (s, l) = x.storage_and_layout();
            match (&*s, l.contiguous_offsets(), to) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b)), DType::F16) => {
                    let mut h = vec![half::f16::ZERO; b - a];
                    h.convert_from_f32_slice(&v[a..b]);
                    Some(CpuStorage::F16(h))
                }
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b)), DType::BF16) => {
                    let mut h = vec![half::bf16::ZERO; b - a];
                    h.convert_from_f32_slice(&v[a..b]);
                    Some(CpuStorage::BF16(h))
                }
                _ => None,
            }
        };
        Ok(match halves {
            Some(CpuStorage::F16(h)) => Tensor::from_vec(h, x.dims(), x.device())?,
            Some(CpuStorage::BF16(h)) => Tensor::from_vec(h, x.dims(), x.device())?,
            _ => x.to_dtype(to)?,
        })
    }

    /// Host kernels: Q, K, V read in place; (B, T, C) out.
    fn fused(&self, qkv: &Tensor, cache: Option<&mut KvCache>, past: usize) -> Result<Tensor> {
        let (b, t, width) = qkv.dims3()?;
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let c = nh * hs;
        let d = kernels::Dims {
            batch: b,
            t,
            past,
            n_head: nh,
            n_kv_head: nkv,
            head_size: hs,
        };
        let mut y = vec![0f32; b * t * c];
        let cached = match cache {
            Some(cache) => Some(cache.append(
                &self.to_cache(self.heads(qkv, c, nkv)?)?,
                &self.to_cache(self.heads(qkv, c + nkv * hs, nkv)?)?,
            )?),
            None => None,
        };
        let qkv = qkv.contiguous()?;
        let (qs, ql) = qkv.storage_and_layout();
        let qkv_data = host_slice(&qs, ql)?;
        // Q (and, without a cache, K and V) in place in (B, T, width): row stride `width`.
        let in_qkv = |start: usize| kernels::Heads {
            data: &qkv_data[start..],
            batch: t * width,
            head_stride: hs,
            row: width,
        };
        let q = in_qkv(0);
        let result = match &cached {
            None => kernels::causal_attention(
                q,
                in_qkv(c).kv(),
                in_qkv(c + nkv * hs).kv(),
                d,
                self.scale as f32,
                &mut y,
            ),
            Some((k, v)) => {
                // The cache's (B, nkv, capacity, hs) buffers, of which rows 0..past+T are filled.
                let (ks, kl) = k.storage_and_layout();
                let (vs, vl) = v.storage_and_layout();
                let (k, v) = (cache_heads(&ks, kl)?, cache_heads(&vs, vl)?);
                kernels::causal_attention(q, k, v, d, self.scale as f32, &mut y)
            }
        };
        result.map_err(|p| Error::Internal(format!("attention kernel: {}", p.0)))?;
        Ok(Tensor::from_vec(y, (b, t, c), qkv.device())?)
    }

    /// candle's ops, step by step: what transformers' eager attention does.
    fn unfused(
        &self,
        qkv: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        hook: Option<&mut LayerHook<'_>>,
    ) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let (c, r) = (nh * hs, nh / nkv);
        // -> (B, nh, T, hs) and 2 x (B, nkv, T, hs), contiguous so the cache can copy them in and
        // matmul can batch them.
        let q = self.heads(qkv, 0, nh)?;
        let k = self.heads(qkv, c, nkv)?;
        let v = self.heads(qkv, c + nkv * hs, nkv)?;
        // (B, nkv, T_k, hs): views into the preallocated cache, no copy of the past (but a
        // widened one when the cache holds halves).
        let (k, v) = match cache {
            Some(cache) => {
                let (k, v) = cache.append(&self.to_cache(k)?, &self.to_cache(v)?)?;
                (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)
            }
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
        let mut probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if let Some(h) = hook {
            h.at(Point::Pattern, &mut probs)?;
        }

        // (B, nkv, r·T, T_k) x (B, nkv, T_k, hs) -> (B, nkv, r·T, hs) = (B, nh, T, hs)
        //   -> (B, T, nh, hs) -> (B, T, C)
        Ok(probs
            .to_dtype(v.dtype())?
            .reshape((b, nkv, r * t, t_k))?
            .matmul(&v)?
            .reshape((b, nh, t, hs))?
            .transpose(1, 2)?
            .reshape((b, t, c))?)
    }
}

/// One sequence of a batched decode step, in one layer: its KV cache, the tokens already in it,
/// and its hook (which may want nothing).
pub(crate) struct StepRow<'a> {
    pub(crate) cache: &'a mut KvCache,
    pub(crate) past: usize,
    pub(crate) hook: &'a mut dyn Hook,
}

/// Calls each row's hook at `point(layer)` on its own row of `t` (N, 1, ...), when any wants it.
pub(crate) fn for_each_row(
    rows: &mut [StepRow<'_>],
    layer: usize,
    point: fn(usize) -> Point,
    t: &mut Tensor,
) -> Result<()> {
    let p = point(layer);
    if !rows.iter().any(|r| r.hook.wants(p)) {
        return Ok(());
    }
    let parts = rows
        .iter_mut()
        .enumerate()
        .map(|(i, r)| {
            let mut row = t.narrow(0, i, 1)?;
            if r.hook.wants(p) {
                r.hook.at(p, &mut row)?;
            }
            Ok(row)
        })
        .collect::<Result<Vec<_>>>()?;
    *t = Tensor::cat(&parts, 0)?;
    Ok(())
}

/// A (B, nkv, capacity, hs) host cache view, from its first element on (the strides say where
/// rows are), as [`kernels::KvHeads`].
fn cache_heads<'a>(s: &'a Storage, l: &candle_core::Layout) -> Result<kernels::KvHeads<'a>> {
    let from = l.start_offset();
    let data = match s {
        _ if l.dims().len() != 4 || l.stride()[3] != 1 => None,
        Storage::Cpu(CpuStorage::F32(v)) => v.get(from..).map(Elems::F32),
        Storage::Cpu(CpuStorage::F16(v)) => {
            v.get(from..).map(|v| Elems::F16(bytemuck::cast_slice(v)))
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            v.get(from..).map(|v| Elems::Bf16(bytemuck::cast_slice(v)))
        }
        _ => None,
    };
    let data = data
        .ok_or_else(|| Error::Internal("attention: expected a host KV cache of floats".into()))?;
    Ok(kernels::Heads {
        data,
        batch: l.stride()[0],
        head_stride: l.stride()[1],
        row: l.stride()[2],
    })
}

/// A contiguous f32 host tensor's elements.
fn host_slice<'a>(s: &'a Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(Error::Internal(
            "attention: expected contiguous f32 host data".into(),
        )),
    }
}
