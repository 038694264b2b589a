//! Causal self-attention from the packed QKV rows to the heads' concatenated outputs, run
//! inside `c_attn`'s node (`conv1d::conv1d_attention`): `softmax(scale·Q·Kᵀ)` over the keys
//! each query sees (with dropout on the probabilities, by a mask drawn beforehand), times V,
//! for every head, with grouped K/V heads read in place (transformers' `repeat_kv` without the
//! copy). Composed, it was some twenty nodes per layer (slicing Q, K and V out of QKV,
//! transposes and copies, two batched matmuls, the softmax, the dropout), each with a zeroed
//! gradient and an add in candle's backward, and the slices' backward padding their gradients
//! back to QKV's width. Here each head's matrices are strided views of QKV's rows, and the
//! backward writes d QKV directly.

use std::sync::Mutex;

use candle_core::{CpuStorage, Tensor, D};

use super::gemm::{gemm, Mat};
use super::Float;
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

/// An error unless the K/V heads divide the query heads.
fn check(heads: Heads) -> Result<()> {
    if heads.n_kv_head == 0 || !heads.n_head.is_multiple_of(heads.n_kv_head) {
        return Err(crate::Error::Internal(format!(
            "attention: {} heads over {} K/V heads",
            heads.n_head, heads.n_kv_head
        )));
    }
    Ok(())
}

/// qkv (B, T, C + 2·nkv·hs) → the heads' outputs (B, T, C) with candle's ops
/// (`GPT2Attention`'s eager path), query `i` attending to keys `0..=i`; `mask` (B, nh, T, T),
/// when given, multiplies the probabilities (dropout: 0 or 1/(1−p)).
pub(crate) fn composed(qkv: &Tensor, heads: Heads, mask: Option<&Tensor>) -> Result<Tensor> {
    check(heads)?;
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

/// The attention of one node over `batch` sequences of QKV rows, and what its backward needs.
pub(super) struct Attention {
    heads: Heads,
    batch: usize,
    /// The dropout mask (B·nh·T·T), in f64 here, used in the tensor's dtype.
    mask: Option<Vec<f64>>,
    /// The probabilities before dropout (B·nh·T·T), from the forward pass.
    probs: Mutex<Option<CpuStorage>>,
    /// The QKV rows, kept by the node that made them.
    pub(super) qkv: Mutex<Option<CpuStorage>>,
}

/// Queries go through the products in blocks of this many rows, each with only the keys it
/// sees (causal): 3/4 of the full products' work at T = 128, 5/8 at T = 256, against the cost
/// of more, smaller calls.
pub(super) const BLOCK: usize = 64;

/// The query blocks of a sequence of `t`: (first row, end).
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(BLOCK)
        .map(move |i0| (i0, (i0 + BLOCK).min(t)))
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
    pub(super) fn new(heads: Heads, batch: usize, mask: Option<&Tensor>) -> Result<Self> {
        check(heads)?;
        let mask = match mask {
            Some(m) => Some(
                m.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()?,
            ),
            None => None,
        };
        Ok(Self {
            heads,
            batch,
            mask,
            probs: Mutex::new(None),
            qkv: Mutex::new(None),
        })
    }

    /// A QKV row's width.
    pub(super) fn width(&self) -> usize {
        self.heads.widths().1
    }

    /// An output row's width (C).
    pub(super) fn out_width(&self) -> usize {
        self.heads.widths().0
    }

    /// B and T of `n` QKV elements, checked against the heads' layout and the mask.
    fn dims(&self, n: usize) -> candle_core::Result<(usize, usize)> {
        let (b, w) = (self.batch, self.width());
        let t = n / w.max(1) / b.max(1);
        let masked = b * self.heads.n_head * t * t;
        if b * t * w != n || self.mask.as_ref().is_some_and(|m| m.len() != masked) {
            candle_core::bail!(
                "attention: {n} QKV values for {b} sequences of {:?}",
                self.heads
            );
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

    /// The dropped probabilities of one head: `p` itself, or `p` times its block of the mask
    /// written into `buf`.
    fn dropped<'a, T: Float>(&self, p: &'a [T], at: usize, buf: &'a mut [T]) -> &'a [T] {
        match &self.mask {
            Some(m) => {
                for ((o, &p), &m) in buf.iter_mut().zip(p).zip(&m[at..at + p.len()]) {
                    *o = p * T::from_f64(m);
                }
                buf
            }
            None => p,
        }
    }

    /// The heads' outputs (B·T·C) of QKV rows (B·T·W); keeps the probabilities.
    pub(super) fn forward<T: Float>(&self, qkv: &[T]) -> candle_core::Result<Vec<T>> {
        let (b, t) = self.dims(qkv.len())?;
        let (hs, scale) = (self.heads.head_size, T::from_f64(self.heads.scale));
        let (c, w) = self.heads.widths();
        let mut probs = vec![T::ZERO; b * self.heads.n_head * t * t];
        let mut y = vec![T::ZERO; b * t * c];
        let mut scores = vec![T::ZERO; t * t];
        // The dropped probabilities of one head (with a mask).
        let mut dropped = vec![T::ZERO; if self.mask.is_some() { t * t } else { 0 }];
        let view = |at: usize| Mat {
            data: qkv.get(at..).unwrap_or(&[]),
            rs: w,
            cs: 1,
        };
        let one = T::from_f64(1.0);
        for at in self.places(b, t) {
            // S = Q·Kᵀ (T, T), by blocks of queries and only the keys they see.
            for (i0, i1) in blocks(t) {
                let s = &mut scores[i0 * t..];
                gemm(
                    (i1 - i0, i1, hs),
                    s,
                    t,
                    false,
                    view(at.q + i0 * w),
                    view(at.k).t(),
                    one,
                )?;
            }
            let p = &mut probs[at.p..at.p + t * t];
            for (i, (row, out)) in scores.chunks(t).zip(p.chunks_mut(t)).enumerate() {
                super::vector::softmax(&row[..=i], &mut out[..=i], scale);
            }
            let dropped = self.dropped(p, at.p, &mut dropped);
            // Y = P·V (T, hs), into the head's columns of (B, T, C).
            for (i0, i1) in blocks(t) {
                let out = y.get_mut(at.y + i0 * c..).unwrap_or(&mut []);
                let p = Mat::rows(&dropped[i0 * t..], t);
                gemm((i1 - i0, hs, i1), out, c, false, p, view(at.v), one)?;
            }
        }
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: a poisoned lock".into()))? =
            Some(T::store(probs));
        Ok(y)
    }

    /// d QKV from d Y: per head, dP' = dY·Vᵀ, dV += P'ᵀ·dY, dP = dP' ⊙ mask,
    /// dS = scale·P ⊙ (dP − Σ P·dP), dQ = dS·K, dK += dSᵀ·Q.
    pub(super) fn backward<T: Float>(&self, x: &[T], dy: &[T]) -> candle_core::Result<Vec<T>> {
        let (b, t) = self.dims(x.len())?;
        let (hs, scale) = (self.heads.head_size, T::from_f64(self.heads.scale));
        let one = T::from_f64(1.0);
        let (c, w) = self.heads.widths();
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
        let (mut dp, mut ds) = (vec![T::ZERO; t * t], vec![T::ZERO; t * t]);
        let mut dropped = vec![T::ZERO; if self.mask.is_some() { t * t } else { 0 }];
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
            let dropped = self.dropped(p, at.p, &mut dropped);
            for (i0, i1) in blocks(t) {
                // dP'[i0..i1, ..i1] = dY[i0..i1]·V[..i1]ᵀ
                let (dyb, dp) = (dy_view(at.y + i0 * c), &mut dp[i0 * t..]);
                gemm((i1 - i0, i1, hs), dp, t, false, dyb, view(at.v).t(), one)?;
                // dV[i0..i1] += P'[i0.., i0..i1]ᵀ·dY[i0..]: the queries that see these keys.
                let dv = dx.get_mut(at.v + i0 * w..).unwrap_or(&mut []);
                let pt = Mat::rows(&dropped[i0 * t + i0..], t).t();
                gemm((i1 - i0, hs, t - i0), dv, w, true, pt, dyb, one)?;
            }
            if let Some(m) = &self.mask {
                for (d, &m) in dp.iter_mut().zip(&m[at.p..at.p + t * t]) {
                    *d = *d * T::from_f64(m);
                }
            }
            for (((pr, gr), o), i) in p.chunks(t).zip(dp.chunks(t)).zip(ds.chunks_mut(t)).zip(0..) {
                super::vector::softmax_grad(&pr[..=i], &gr[..=i], &mut o[..=i], scale);
            }
            for (i0, i1) in blocks(t) {
                // dQ[i0..i1] = dS[i0..i1, ..i1]·K[..i1]
                let dq = dx.get_mut(at.q + i0 * w..).unwrap_or(&mut []);
                let dsb = Mat::rows(&ds[i0 * t..], t);
                gemm((i1 - i0, hs, i1), dq, w, false, dsb, view(at.k), one)?;
                // dK[i0..i1] += dS[i0.., i0..i1]ᵀ·Q[i0..]
                let dk = dx.get_mut(at.k + i0 * w..).unwrap_or(&mut []);
                let dst = Mat::rows(&ds[i0 * t + i0..], t).t();
                gemm(
                    (i1 - i0, hs, t - i0),
                    dk,
                    w,
                    true,
                    dst,
                    view(at.q + i0 * w),
                    one,
                )?;
            }
        }
        Ok(dx)
    }
}
