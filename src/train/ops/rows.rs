//! The row-wise fused ops: the causal softmax of attention scores and each row's
//! cross-entropy, with their backwards.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use super::{elems, Float};
use crate::error::Result;

// ----------------------------------------------------------------------------- causal softmax

/// `softmax(scale·s)` over the last dimension of scores (…, T, T) with query `i` seeing keys
/// `0..=i` only (the causal mask of a sequence with no past); the masked probabilities are 0.
pub(crate) fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() {
        return Ok(scores.contiguous()?.apply_op1(CausalSoftmax { scale })?);
    }
    let t = scores.dim(D::Minus1)?;
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?.to_dtype(scores.dtype())?;
    let x = (scores * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

struct CausalSoftmax {
    scale: f64,
}

fn softmax_rows<T: Float>(
    s: &CpuStorage,
    l: &Layout,
    scale: f64,
) -> candle_core::Result<CpuStorage> {
    let x = elems::<T>(s, l)?;
    let t = l.dims()[l.dims().len() - 1];
    let scale = T::from_f64(scale);
    let mut out = vec![T::ZERO; x.len()];
    for (r, (row, o)) in x.chunks(t).zip(out.chunks_mut(t)).enumerate() {
        let seen = r % t + 1;
        let max =
            row[..seen].iter().fold(
                row[0] * scale,
                |m, &v| if v * scale > m { v * scale } else { m },
            );
        let mut sum = T::ZERO;
        for (o, &v) in o[..seen].iter_mut().zip(row) {
            *o = (v * scale - max).exp();
            sum = sum + *o;
        }
        for o in &mut o[..seen] {
            *o = *o / sum;
        }
    }
    Ok(T::store(out))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, q) = (l.dims()[l.dims().len() - 1], l.dims()[l.dims().len() - 2]);
        if t != q {
            candle_core::bail!("causal-softmax: scores of {q} queries and {t} keys");
        }
        Ok((
            by_dtype!(s, softmax_rows(s, l, self.scale))?,
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(
            probs.apply_op2(&grad, SoftmaxGrad { scale: self.scale })?,
        ))
    }
}

/// d scores = scale · p ⊙ (g − Σⱼ pⱼ gⱼ), row by row.
struct SoftmaxGrad {
    scale: f64,
}

fn softmax_grad<T: Float>(
    p: &CpuStorage,
    lp: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    scale: f64,
) -> candle_core::Result<CpuStorage> {
    let (p, g) = (elems::<T>(p, lp)?, elems::<T>(g, lg)?);
    let t = lp.dims()[lp.dims().len() - 1];
    let scale = T::from_f64(scale);
    let mut out = vec![T::ZERO; p.len()];
    for ((pr, gr), o) in p.chunks(t).zip(g.chunks(t)).zip(out.chunks_mut(t)) {
        let dot = pr.iter().zip(gr).fold(T::ZERO, |a, (&p, &g)| a + p * g);
        for ((o, &p), &g) in o.iter_mut().zip(pr).zip(gr) {
            *o = scale * p * (g - dot);
        }
    }
    Ok(T::store(out))
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(p, softmax_grad(p, lp, g, lg, self.scale))?;
        Ok((out, lp.shape().clone()))
    }
}

// ----------------------------------------------------------------------------- cross-entropy

/// Each row's negative log-likelihood of its target: logits (N, V), targets (N,) u32 → (N,).
pub(crate) fn row_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() {
        return Ok(logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, RowNll)?);
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

struct RowNll;

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("the targets must be contiguous u32 ids"),
    }
}

/// log Σ exp of a row, from its maximum.
fn log_sum_exp<T: Float>(row: &[T]) -> T {
    let max = row.iter().fold(row[0], |m, &v| if v > m { v } else { m });
    max + row.iter().fold(T::ZERO, |a, &v| a + (v - max).exp()).ln()
}

fn nll_rows<T: Float>(
    s: &CpuStorage,
    l: &Layout,
    t: &CpuStorage,
    lt: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (x, targets) = (elems::<T>(s, l)?, targets_of(t, lt)?);
    let v = l.dims()[l.dims().len() - 1];
    let mut out = Vec::with_capacity(targets.len());
    for (row, &t) in x.chunks(v).zip(targets) {
        let Some(&picked) = row.get(t as usize) else {
            candle_core::bail!("target id {t} is outside the {v} logits");
        };
        out.push(log_sum_exp(row) - picked);
    }
    Ok(T::store(out))
}

impl CustomOp2 for RowNll {
    fn name(&self) -> &'static str {
        "row-nll"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = l.dims()[0];
        Ok((by_dtype!(s, nll_rows(s, l, t, lt))?, Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((Some(logits.apply_op3(targets, &grad, RowNllGrad)?), None))
    }
}

/// d logits = gᵢ · (softmax(row) − onehot(target)).
struct RowNllGrad;

fn nll_grad<T: Float>(
    s: &CpuStorage,
    l: &Layout,
    t: &CpuStorage,
    lt: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (x, targets, g) = (elems::<T>(s, l)?, targets_of(t, lt)?, elems::<T>(g, lg)?);
    let v = l.dims()[l.dims().len() - 1];
    let mut out = vec![T::ZERO; x.len()];
    for (((row, o), &t), &g) in x.chunks(v).zip(out.chunks_mut(v)).zip(targets).zip(g) {
        let lse = log_sum_exp(row);
        for (o, &x) in o.iter_mut().zip(row) {
            *o = g * (x - lse).exp();
        }
        if let Some(o) = o.get_mut(t as usize) {
            *o = *o - g;
        }
    }
    Ok(T::store(out))
}

impl CustomOp3 for RowNllGrad {
    fn name(&self) -> &'static str {
        "row-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            by_dtype!(s, nll_grad(s, l, t, lt, g, lg))?,
            l.shape().clone(),
        ))
    }
}
