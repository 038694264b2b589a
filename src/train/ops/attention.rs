//! Causal self-attention from the packed QKV rows to the heads' concatenated outputs, as one
//! node: `softmax(scale·Q·Kᵀ)` over the keys each query sees (with dropout on the
//! probabilities, by a mask drawn beforehand), times V, for every head, with grouped K/V heads
//! read in place (transformers' `repeat_kv` without the copy). Composed, it was some twenty
//! nodes per layer (slicing Q, K and V out of QKV, transposes and copies, two batched matmuls,
//! the softmax, the dropout), each with a zeroed gradient and an add in candle's backward, and
//! the slices' backward padding their gradients back to QKV's width. Here each head's matrices
//! are strided views of QKV's rows, and the backward writes d QKV directly.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};

use super::gemm::{gemm, Mat};
use super::{elems, Float};
use crate::error::Result;

/// The heads' layout and the scores' scale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) n_head: usize,
    /// K/V heads (`n_head` for multi-head attention; fewer for grouped-query attention).
    pub(crate) n_kv_head: usize,
    pub(crate) head_size: usize,
    /// Multiplies the scores before the softmax (1/√head_size, and GPT-2's optional
    /// 1/(layer + 1)).
    pub(crate) scale: f64,
}

impl Heads {
    /// Q's width (`n_head·head_size`, the model's width) and a QKV row's.
    fn widths(&self) -> (usize, usize) {
        let c = self.n_head * self.head_size;
        (c, c + 2 * self.n_kv_head * self.head_size)
    }
}

/// qkv (B, T, C + 2·nkv·hs) → the heads' outputs (B, T, C), query `i` attending to keys
/// `0..=i`; `mask` (B, nh, T, T), when given, multiplies the probabilities (dropout: 0 or
/// 1/(1−p)).
pub(crate) fn attention(qkv: &Tensor, heads: Heads, mask: Option<&Tensor>) -> Result<Tensor> {
    if heads.n_kv_head == 0 || !heads.n_head.is_multiple_of(heads.n_kv_head) {
        return Err(crate::Error::Internal(format!(
            "attention: {} heads over {} K/V heads",
            heads.n_head, heads.n_kv_head
        )));
    }
    if qkv.device().is_cpu() {
        let mask = match mask {
            Some(m) => Some(
                m.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()?,
            ),
            None => None,
        };
        let op = Attention {
            heads,
            mask,
            probs: Mutex::new(None),
        };
        return Ok(qkv.contiguous()?.apply_op1(op)?);
    }
    composed(qkv, heads, mask)
}

/// The same with candle's ops: `GPT2Attention`'s eager path.
pub(crate) fn composed(qkv: &Tensor, heads: Heads, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let Heads {
        n_head: nh,
        n_kv_head: nkv,
        head_size: hs,
        scale,
    } = heads;
    let c = nh * hs;
    // (B, T, n·hs) -> (B, n, T, hs)
    let split = |start: usize, n: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, start, n * hs)?
            .reshape((b, t, n, hs))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let q = split(0, nh)?;
    let (mut k, mut v) = (split(c, nkv)?, split(c + nkv * hs, nkv)?);
    if nkv < nh {
        // (B, nkv, T, hs) -> (B, nkv, r, T, hs) -> (B, nh, T, hs): query head g·r + j reads
        // K/V head g.
        let r = nh / nkv;
        let repeat = |x: Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, nkv, r, t, hs))?
                .contiguous()?
                .reshape((b, nh, t, hs))?)
        };
        (k, v) = (repeat(k)?, repeat(v)?);
    }
    // (B, nh, T, hs) · (B, nh, hs, T) -> (B, nh, T, T), scaled, softmax over the keys each
    // query sees.
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let causal: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let causal = Tensor::from_vec(causal, (t, t), qkv.device())?.to_dtype(qkv.dtype())?;
    let x = (scores * scale)?.broadcast_add(&causal)?;
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    let mut probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    if let Some(m) = mask {
        probs = probs.mul(m)?;
    }
    // (B, nh, T, T) · (B, nh, T, hs) -> (B, nh, T, hs) -> (B, T, C)
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, c))?)
}

struct Attention {
    heads: Heads,
    /// The dropout mask (B·nh·T·T), in f64 here, used in the tensor's dtype.
    mask: Option<Vec<f64>>,
    /// The probabilities before dropout (B·nh·T·T), from the forward pass.
    probs: Mutex<Option<CpuStorage>>,
}

/// Where head `h` of sequence `b` reads: the offsets of its Q, K and V in QKV and of its
/// output columns in (B, T, C).
struct Place {
    q: usize,
    k: usize,
    v: usize,
    y: usize,
    /// Its T×T block of the probabilities.
    p: usize,
}

impl Attention {
    /// B and T of QKV, checked against the heads' layout and the mask.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let (b, t, w) = l.shape().dims3()?;
        let (_, width) = self.heads.widths();
        let masked = b * self.heads.n_head * t * t;
        if w != width || self.mask.as_ref().is_some_and(|m| m.len() != masked) {
            candle_core::bail!("attention: qkv {:?} for {:?}", l.dims(), self.heads);
        }
        Ok((b, t))
    }

    fn places(&self, b: usize, t: usize) -> impl Iterator<Item = Place> + '_ {
        let Heads {
            n_head: nh,
            n_kv_head: nkv,
            head_size: hs,
            ..
        } = self.heads;
        let (c, w) = self.heads.widths();
        (0..b).flat_map(move |s| {
            (0..nh).map(move |h| {
                let g = h / (nh / nkv);
                let row = s * t * w;
                Place {
                    q: row + h * hs,
                    k: row + c + g * hs,
                    v: row + c + (nkv + g) * hs,
                    y: s * t * c + h * hs,
                    p: (s * nh + h) * t * t,
                }
            })
        })
    }

    /// The dropped probabilities of one head: `p` times its block of the mask.
    fn dropped<T: Float>(&self, p: &[T], at: usize, out: &mut [T]) {
        match &self.mask {
            Some(m) => {
                for ((o, &p), &m) in out.iter_mut().zip(p).zip(&m[at..at + p.len()]) {
                    *o = p * T::from_f64(m);
                }
            }
            None => out.copy_from_slice(p),
        }
    }

    fn forward<T: Float>(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
        let qkv = elems::<T>(s, l)?;
        let (b, t) = self.dims(l)?;
        let (hs, scale) = (self.heads.head_size, T::from_f64(self.heads.scale));
        let (c, w) = self.heads.widths();
        let mut probs = vec![T::ZERO; b * self.heads.n_head * t * t];
        let mut y = vec![T::ZERO; b * t * c];
        let (mut scores, mut dropped) = (vec![T::ZERO; t * t], vec![T::ZERO; t * t]);
        let view = |at: usize| Mat {
            data: qkv.get(at..).unwrap_or(&[]),
            rs: w,
            cs: 1,
        };
        for at in self.places(b, t) {
            // S = Q·Kᵀ (T, T)
            let one = T::from_f64(1.0);
            gemm(
                (t, t, hs),
                &mut scores,
                t,
                false,
                view(at.q),
                view(at.k).t(),
                one,
            )?;
            let p = &mut probs[at.p..at.p + t * t];
            for (i, (row, out)) in scores.chunks(t).zip(p.chunks_mut(t)).enumerate() {
                super::vector::softmax(&row[..=i], &mut out[..=i], scale);
            }
            self.dropped(p, at.p, &mut dropped);
            // Y = P·V (T, hs), into the head's columns of (B, T, C).
            let out = y.get_mut(at.y..).unwrap_or(&mut []);
            gemm(
                (t, hs, t),
                out,
                c,
                false,
                Mat::rows(&dropped, t),
                view(at.v),
                one,
            )?;
        }
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: a poisoned lock".into()))? =
            Some(T::store(probs));
        Ok(T::store(y))
    }

    /// d QKV from d Y: per head, dP' = dY·Vᵀ, dV += P'ᵀ·dY, dP = dP' ⊙ mask,
    /// dS = scale·P ⊙ (dP − Σ P·dP), dQ = dS·K, dK += dSᵀ·Q.
    fn backward<T: Float + candle_core::WithDType>(
        &self,
        qkv: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = self.dims(qkv.layout())?;
        let (hs, scale) = (
            self.heads.head_size,
            <T as Float>::from_f64(self.heads.scale),
        );
        let one = <T as Float>::from_f64(1.0);
        let (c, w) = self.heads.widths();
        let (qs, ql) = qkv.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (x, dy) = match (&*qs, &*gs) {
            (candle_core::Storage::Cpu(q), candle_core::Storage::Cpu(g)) => {
                (elems::<T>(q, ql)?, elems::<T>(g, gl)?)
            }
            _ => candle_core::bail!("attention: not on the host"),
        };
        let stash = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: a poisoned lock".into()))?;
        let Some(probs) = stash.as_ref().and_then(T::of) else {
            candle_core::bail!("attention: backward before forward");
        };
        if dy.len() != b * t * c || probs.len() != b * self.heads.n_head * t * t {
            candle_core::bail!("attention: a gradient of another shape than the output");
        }
        let mut dx = vec![T::ZERO; x.len()];
        let (mut dp, mut dropped, mut ds) = (
            vec![T::ZERO; t * t],
            vec![T::ZERO; t * t],
            vec![T::ZERO; t * t],
        );
        let view = |at: usize| Mat {
            data: x.get(at..).unwrap_or(&[]),
            rs: w,
            cs: 1,
        };
        let dy_view = |at: usize| Mat {
            data: dy.get(at..).unwrap_or(&[]),
            rs: c,
            cs: 1,
        };
        for at in self.places(b, t) {
            let p = &probs[at.p..at.p + t * t];
            self.dropped(p, at.p, &mut dropped);
            // dP' = dY·Vᵀ (T, T); dV += P'ᵀ·dY (T, hs)
            gemm(
                (t, t, hs),
                &mut dp,
                t,
                false,
                dy_view(at.y),
                view(at.v).t(),
                one,
            )?;
            let dv = dx.get_mut(at.v..).unwrap_or(&mut []);
            gemm(
                (t, hs, t),
                dv,
                w,
                true,
                Mat::rows(&dropped, t).t(),
                dy_view(at.y),
                one,
            )?;
            if let Some(m) = &self.mask {
                for (d, &m) in dp.iter_mut().zip(&m[at.p..at.p + t * t]) {
                    *d *= <T as Float>::from_f64(m);
                }
            }
            for (((pr, gr), o), i) in p.chunks(t).zip(dp.chunks(t)).zip(ds.chunks_mut(t)).zip(0..) {
                super::vector::softmax_grad(&pr[..=i], &gr[..=i], &mut o[..=i], scale);
            }
            // dQ = dS·K (T, hs); dK += dSᵀ·Q (T, hs)
            let dq = dx.get_mut(at.q..).unwrap_or(&mut []);
            gemm((t, hs, t), dq, w, false, Mat::rows(&ds, t), view(at.k), one)?;
            let dk = dx.get_mut(at.k..).unwrap_or(&mut []);
            gemm(
                (t, hs, t),
                dk,
                w,
                true,
                Mat::rows(&ds, t).t(),
                view(at.q),
                one,
            )?;
        }
        Tensor::from_vec(dx, qkv.shape(), qkv.device())
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t) = self.dims(l)?;
        let out = match s {
            CpuStorage::F32(_) => self.forward::<f32>(s, l)?,
            CpuStorage::F64(_) => self.forward::<f64>(s, l)?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        Ok((out, Shape::from((b, t, self.heads.widths().0))))
    }

    fn bwd(&self, qkv: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(match qkv.dtype() {
            candle_core::DType::F32 => self.backward::<f32>(qkv, &grad)?,
            candle_core::DType::F64 => self.backward::<f64>(qkv, &grad)?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        }))
    }
}
