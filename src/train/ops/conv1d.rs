//! HF's `Conv1D` as one fused op, optionally followed in the same node by what consumes its
//! output: GPT-2's GELU (the MLP's first layer) or the causal self-attention (`c_attn`'s QKV).
//! Each node of candle's graph costs, backward, a zeroed gradient of its input's size and an
//! add; the QKV rows and the pre-activations stay inside the op instead.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::attention::{self, Attention, Heads};
use super::gemm::{gemm, Mat};
use super::{elems, Float};
use crate::error::Result;

/// HF's `Conv1D`, `x·W + b`: x (N, in), W (in, out), b (out,) → (N, out). One node (not a
/// matmul, a broadcast add and, backward, a strided reduction for the bias): the bias rows are
/// written first and gemm adds the product onto them; backward, two matmuls and a row sum.
pub(crate) fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return apply(x, w, b, Then::Nothing);
    }
    Ok(x.matmul(w)?.broadcast_add(b)?)
}

/// `gelu_new(x·W + b)`: the MLP's first layer and its activation.
pub(crate) fn conv1d_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return apply(x, w, b, Then::Gelu(Mutex::new(None)));
    }
    super::gelu_new(&x.matmul(w)?.broadcast_add(b)?)
}

/// Causal self-attention of `c_attn`: x (B, T, C) → QKV = x·W + b (B, T, C + 2·nkv·hs) →
/// the heads' outputs (B, T, C), with `mask` (B, nh, T, T) on the probabilities when given
/// (see [`attention::composed`]).
pub(crate) fn conv1d_attention(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    heads: Heads,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, t, c) = x.dims3()?;
    let x = x.reshape((batch * t, c))?;
    if x.device().is_cpu() {
        let op = Attention::new(heads, batch, mask)?;
        let y = apply(&x, w, b, Then::Attention(op))?;
        return Ok(y.reshape((batch, t, heads.n_head * heads.head_size))?);
    }
    let qkv = x.matmul(w)?.broadcast_add(b)?;
    let width = qkv.dim(1)?;
    attention::composed(&qkv.reshape((batch, t, width))?, heads, mask)
}

fn apply(x: &Tensor, w: &Tensor, b: &Tensor, then: Then) -> Result<Tensor> {
    let op = Conv1d { then };
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?)
}

struct Conv1d {
    then: Then,
}

/// What the node does with `x·W + b` before returning it.
enum Then {
    Nothing,
    /// GELU; the pre-activations (N, out) are kept for the backward.
    Gelu(Mutex<Option<CpuStorage>>),
    /// Attention over QKV rows, which it keeps.
    Attention(Attention),
}

fn conv1d_rows<T: Float>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b: &CpuStorage,
    lb: &Layout,
) -> candle_core::Result<Vec<T>> {
    let (x, w, b) = (elems::<T>(x, lx)?, elems::<T>(w, lw)?, elems::<T>(b, lb)?);
    let (n, k) = lx.shape().dims2()?;
    let (kw, m) = lw.shape().dims2()?;
    if kw != k || b.len() != m {
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
    // y = y + x·W
    let one = T::from_f64(1.0);
    gemm(
        (n, m, k),
        &mut y,
        m,
        true,
        Mat::rows(x, k),
        Mat::rows(w, m),
        one,
    )?;
    Ok(y)
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("conv1d: a poisoned lock".into())
}

impl Conv1d {
    fn forward<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let y = conv1d_rows::<T>(x.0, x.1, w.0, w.1, b.0, b.1)?;
        Ok(match &self.then {
            Then::Nothing => T::store(y),
            Then::Gelu(pre) => {
                let mut out = vec![T::ZERO; y.len()];
                super::vector::gelu(&y, &mut out);
                *pre.lock().map_err(|_| poisoned())? = Some(T::store(y));
                T::store(out)
            }
            Then::Attention(op) => {
                let out = op.forward(&y)?;
                *op.qkv.lock().map_err(|_| poisoned())? = Some(T::store(y));
                T::store(out)
            }
        })
    }

    /// The gradient with respect to `x·W + b` from the node's output gradient `grad`.
    fn inner_grad<T: Float + candle_core::WithDType>(
        &self,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let kept = match &self.then {
            Then::Nothing => return Ok(grad.clone()),
            Then::Gelu(pre) => pre,
            Then::Attention(op) => &op.qkv,
        };
        let (gs, gl) = grad.storage_and_layout();
        let g = match &*gs {
            candle_core::Storage::Cpu(g) => elems::<T>(g, gl)?,
            _ => candle_core::bail!("conv1d: not on the host"),
        };
        let kept = kept.lock().map_err(|_| poisoned())?;
        let Some(y) = kept.as_ref().and_then(T::of) else {
            candle_core::bail!("conv1d: backward before forward");
        };
        let (dy, width) = match &self.then {
            Then::Attention(op) => (op.backward(y, g)?, op.width()),
            _ => {
                if y.len() != g.len() {
                    candle_core::bail!("conv1d: a gradient of another shape than the output");
                }
                let mut dy = vec![T::ZERO; y.len()];
                super::vector::gelu_grad(y, g, &mut dy);
                (dy, grad.dim(1)?)
            }
        };
        Tensor::from_vec(dy, (y.len() / width, width), grad.device())
    }
}

impl CustomOp3 for Conv1d {
    fn name(&self) -> &'static str {
        match self.then {
            Then::Nothing => "conv1d",
            Then::Gelu(_) => "conv1d-gelu",
            Then::Attention(_) => "conv1d-attention",
        }
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
        let out = match x {
            CpuStorage::F32(_) => self.forward::<f32>((x, lx), (w, lw), (b, lb))?,
            CpuStorage::F64(_) => self.forward::<f64>((x, lx), (w, lw), (b, lb))?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        let width = match &self.then {
            Then::Attention(op) => op.out_width(),
            _ => lw.dims()[1],
        };
        Ok((out, Shape::from((lx.dims()[0], width))))
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
        let grad = grad.contiguous()?;
        let grad = match x.dtype() {
            candle_core::DType::F32 => self.inner_grad::<f32>(&grad)?,
            candle_core::DType::F64 => self.inner_grad::<f64>(&grad)?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        // dx = g·Wᵀ (N, in); dW = xᵀ·g (in, out); db = Σ rows of g (out,).
        let dx = grad.matmul(&w.t()?)?;
        let dw = x.t()?.matmul(&grad)?;
        let db = grad.apply_op1(RowSum)?;
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
