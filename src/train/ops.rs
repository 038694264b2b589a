//! The training graph's fused host ops, each with its exact backward: GPT-2's GELU, the causal
//! softmax, layer norm's normalisation and the per-row cross-entropy. Built from candle's ops,
//! each would be five to ten passes over its tensor, an allocation per pass, kept for the
//! backward; fused, one pass forward and one back, as torch's kernels do. On other devices the
//! same formulas are built from candle's ops and differentiated by autograd (also what the unit
//! tests compare the fused ops with).
//!
//! GELU: candle's `gelu` backward also uses constants rounded to six digits (`0.797885` for
//! √(2/π)): gradients off by 5e-7 relative, which twenty AdamW steps carry to 1e-6 in the
//! weights (measured against torch in f64).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use crate::error::Result;

/// The element types the fused ops run on.
pub(super) trait Float:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    const ZERO: Self;
    fn of(s: &CpuStorage) -> Option<&[Self]>;
    fn store(v: Vec<Self>) -> CpuStorage;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
}

macro_rules! float {
    ($t:ty, $variant:ident) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            fn of(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn store(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
float!(f32, F32);
float!(f64, F64);

/// The contiguous elements of `s` under `l`, as `T`.
fn elems<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match (T::of(s), l.contiguous_offsets()) {
        (Some(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("a fused training op needs a contiguous f32 or f64 tensor"),
    }
}

/// Runs `f` on the contiguous host elements of every tensor of `ts` (all of type `T`); `None`
/// when one is not there (another device, dtype or layout).
pub(super) fn with_host<T: Float, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        match &**s {
            candle_core::Storage::Cpu(c) => slices.push(elems::<T>(c, l).ok()?),
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// Runs `f32` or `f64` code on the dtype of `s`.
macro_rules! by_dtype {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        }
    };
}

// ----------------------------------------------------------------------------- GELU

/// √(2/π) and the cubic's coefficient of `gelu_new`.
const K: f64 = 0.797_884_560_802_865_4;
const A: f64 = 0.044_715;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, transformers' `NewGELUActivation`.
pub(crate) fn gelu_new(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op1(Elementwise::Value)?);
    }
    let inner = ((x + (x.powf(3.0)? * A)?)? * K)?;
    Ok(((x * 0.5)? * (inner.tanh()? + 1.0)?)?)
}

/// The function (with its backward) or its derivative, element by element on the host.
#[derive(Clone, Copy)]
enum Elementwise {
    Value,
    Slope,
}

/// `tanh(u)` as `1 − 2/(e^{2u} + 1)`: one `exp` (libm's `tanh` was a fifth of a training step).
fn tanh<T: Float>(u: T) -> T {
    let one = T::from_f64(1.0);
    one - T::from_f64(2.0) / ((u + u).exp() + one)
}

fn value<T: Float>(x: T) -> T {
    let c = T::from_f64;
    c(0.5) * x * (c(1.0) + tanh(c(K) * (x + c(A) * x * x * x)))
}

/// d/dx: `0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)`, `t` the tanh above.
fn slope<T: Float>(x: T) -> T {
    let c = T::from_f64;
    let t = tanh(c(K) * (x + c(A) * x * x * x));
    c(0.5) * (c(1.0) + t) + c(0.5) * x * (c(1.0) - t * t) * c(K) * (c(1.0) + c(3.0 * A) * x * x)
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        match self {
            Self::Value => "gelu-new",
            Self::Slope => "gelu-new-slope",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // In the tensor's own precision, as torch computes it.
        fn run<T: Float>(
            op: Elementwise,
            s: &CpuStorage,
            l: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            let x = elems::<T>(s, l)?;
            Ok(T::store(match op {
                Elementwise::Value => x.iter().map(|&x| value(x)).collect(),
                Elementwise::Slope => x.iter().map(|&x| slope(x)).collect(),
            }))
        }
        Ok((by_dtype!(s, run(*self, s, l))?, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match self {
            Self::Value => Ok(Some(grad.mul(&arg.contiguous()?.apply_op1(Self::Slope)?)?)),
            Self::Slope => candle_core::bail!("gelu_new has no second derivative here"),
        }
    }
}

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

// ----------------------------------------------------------------------------- layer norm

/// `(x − mean)/√(var + eps)` over the last dimension (biased variance, two passes), as
/// `torch.nn.LayerNorm` before its affine part.
pub(crate) fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op1(Normalize { eps })?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred.broadcast_div(&(var + eps)?.sqrt()?)?)
}

struct Normalize {
    eps: f64,
}

/// Each row's mean and 1/σ.
fn moments<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.iter().fold(T::ZERO, |a, &v| a + v) / n;
    let var = row
        .iter()
        .fold(T::ZERO, |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, T::from_f64(1.0) / (var + T::from_f64(eps)).sqrt())
}

fn normalize_rows<T: Float>(
    s: &CpuStorage,
    l: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let x = elems::<T>(s, l)?;
    let c = l.dims()[l.dims().len() - 1];
    let mut out = vec![T::ZERO; x.len()];
    for (row, o) in x.chunks(c).zip(out.chunks_mut(c)) {
        let (mean, inv) = moments(row, eps);
        for (o, &v) in o.iter_mut().zip(row) {
            *o = (v - mean) * inv;
        }
    }
    Ok(T::store(out))
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            by_dtype!(s, normalize_rows(s, l, self.eps))?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2(&grad, NormalizeGrad { eps: self.eps })?))
    }
}

/// dx = (g − mean(g) − x̂·mean(g·x̂)) / σ, row by row.
struct NormalizeGrad {
    eps: f64,
}

fn normalize_grad<T: Float>(
    x: &CpuStorage,
    lx: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let (x, g) = (elems::<T>(x, lx)?, elems::<T>(g, lg)?);
    let c = lx.dims()[lx.dims().len() - 1];
    let n = T::from_f64(c as f64);
    let mut out = vec![T::ZERO; x.len()];
    for ((xr, gr), o) in x.chunks(c).zip(g.chunks(c)).zip(out.chunks_mut(c)) {
        let (mean, inv) = moments(xr, eps);
        let (mut g_mean, mut gx_mean) = (T::ZERO, T::ZERO);
        for (&x, &g) in xr.iter().zip(gr) {
            g_mean = g_mean + g;
            gx_mean = gx_mean + g * (x - mean) * inv;
        }
        let (g_mean, gx_mean) = (g_mean / n, gx_mean / n);
        for ((o, &x), &g) in o.iter_mut().zip(xr).zip(gr) {
            *o = (g - g_mean - (x - mean) * inv * gx_mean) * inv;
        }
    }
    Ok(T::store(out))
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "normalize-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, normalize_grad(x, lx, g, lg, self.eps))?;
        Ok((out, lx.shape().clone()))
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

// ----------------------------------------------------------------------------- Conv1D

/// HF's `Conv1D`, `x·W + b`: x (N, in), W (in, out), b (out,) → (N, out). One node (not a
/// matmul, a broadcast add and, backward, a strided reduction for the bias): the bias rows are
/// written first and gemm adds the product onto them; backward, two matmuls and a row sum.
pub(crate) fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv1d)?);
    }
    Ok(x.matmul(w)?.broadcast_add(b)?)
}

struct Conv1d;

fn conv1d_rows<T: Float + 'static>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b: &CpuStorage,
    lb: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (x, w, b) = (elems::<T>(x, lx)?, elems::<T>(w, lw)?, elems::<T>(b, lb)?);
    let (n, k, m) = (lx.dims()[0], lw.dims()[0], lw.dims()[1]);
    if lx.dims()[1] != k || b.len() != m {
        candle_core::bail!(
            "conv1d: x {:?}, W {:?}, b {:?}",
            lx.dims(),
            lw.dims(),
            lb.dims()
        );
    }
    let mut y: Vec<T> = Vec::with_capacity(n * m);
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 && n * m * k > 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: y is (n, m), x (n, k) and W (k, m), all row-major and contiguous, as the strides
    // say; gemm computes y = 1·y + 1·(x·W).
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            m as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            m as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(T::store(y))
}

impl CustomOp3 for Conv1d {
    fn name(&self) -> &'static str {
        "conv1d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, conv1d_rows(x, lx, w, lw, b, lb))?;
        Ok((out, Shape::from((lx.dims()[0], lw.dims()[1]))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // dx = g·Wᵀ (N, in); dW = xᵀ·g (in, out); db = Σ rows of g (out,).
        let dx = grad.matmul(&w.t()?)?;
        let dw = x.t()?.matmul(grad)?;
        let db = grad.contiguous()?.apply_op1(RowSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The sum of the rows of a contiguous (N, C) tensor: (C,).
struct RowSum;

fn row_sum<T: Float>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    let x = elems::<T>(s, l)?;
    let c = l.dims()[l.dims().len() - 1];
    let mut out = vec![T::ZERO; c];
    for row in x.chunks(c) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = *o + v;
        }
    }
    Ok(T::store(out))
}

impl CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "row-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = l.dims()[l.dims().len() - 1];
        Ok((by_dtype!(s, row_sum(s, l))?, Shape::from(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `f` on the host (fused) and through the composed formula, with the gradients of
    /// `Σ w·f(x)` for a fixed random `w`: equal to 1e-12 in f64.
    fn same_as_composed(
        x: &[f64],
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        composed: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(Vec<f64>, Vec<f64>)> {
            let v = Var::from_tensor(&Tensor::from_slice(x, shape, &Device::Cpu)?)?;
            let y = f(v.as_tensor())?;
            let n = y.elem_count();
            let w: Vec<f64> = (0..n)
                .map(|i| ((i * 7919 % 13) as f64 - 6.0) / 5.0)
                .collect();
            let w = Tensor::from_vec(w, y.shape(), &Device::Cpu)?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| crate::Error::Internal("no grad".into()))?;
            Ok((y.flatten_all()?.to_vec1()?, g.flatten_all()?.to_vec1()?))
        };
        let (a, ga) = run(&fused)?;
        let (b, gb) = run(&composed)?;
        for (u, v) in a.iter().zip(&b).chain(ga.iter().zip(&gb)) {
            assert!((u - v).abs() < 1e-12, "{u} vs {v}");
        }
        Ok(())
    }

    fn numbers(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 4.0)
            .collect()
    }

    #[test]
    fn fused_ops_equal_their_composed_formulas_and_gradients() -> Result<()> {
        // Causal softmax over (2, 3, 5, 5) scores, scaled.
        same_as_composed(
            &numbers(150),
            &[2, 3, 5, 5],
            |x| causal_softmax(x, 0.37),
            |x| {
                let t = 5;
                let mask: Vec<f64> = (0..t * t)
                    .map(|i| {
                        if i % t > i / t {
                            f64::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
                let x = (x * 0.37)?.broadcast_add(&mask)?;
                let e = x
                    .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
                    .exp()?;
                Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
            },
        )?;
        // Layer norm's normalisation over rows of 6.
        same_as_composed(
            &numbers(24),
            &[4, 6],
            |x| normalize(x, 1e-5),
            |x| {
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                Ok(centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?)
            },
        )?;
        // Conv1D against matmul + bias, for the input's gradient; the weight's and the bias's
        // are checked by the training goldens.
        let w = Tensor::from_vec(numbers(12), (4, 3), &Device::Cpu)?;
        let b = Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu)?;
        same_as_composed(
            &numbers(20),
            &[5, 4],
            |x| conv1d(x, &w, &b),
            |x| Ok(x.matmul(&w)?.broadcast_add(&b)?),
        )?;
        // Cross-entropy rows.
        let targets = Tensor::new(&[3u32, 0, 6, 2], &Device::Cpu)?;
        same_as_composed(
            &numbers(28),
            &[4, 7],
            |x| row_nll(x, &targets),
            |x| {
                let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
                Ok(logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
            },
        )?;
        Ok(())
    }

    #[test]
    fn the_derivative_is_the_exact_one() -> Result<()> {
        let xs = [-3.0f64, -1.2, -0.3, 0.0, 0.4, 1.1, 2.5];
        let x = Var::from_tensor(&Tensor::new(&xs, &Device::Cpu)?)?;
        let y = gelu_new(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        let g: Vec<f64> = grads
            .get(x.as_tensor())
            .ok_or("no grad")
            .map_err(|e| crate::Error::Internal(e.into()))?
            .to_vec1()?;
        let v: Vec<f64> = y.to_vec1()?;
        for (i, &x) in xs.iter().enumerate() {
            let h = 1e-6;
            let numeric = (value(x + h) - value(x - h)) / (2.0 * h);
            assert!(
                (g[i] - numeric).abs() < 1e-9,
                "at {x}: {} vs {numeric}",
                g[i]
            );
            let exact = 0.5 * x * (1.0 + (K * (x + A * x * x * x)).tanh());
            assert!((v[i] - exact).abs() < 1e-15, "at {x}: {} vs {exact}", v[i]);
        }
        Ok(())
    }
}
