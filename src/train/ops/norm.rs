//! `torch.nn.LayerNorm` as one node: normalisation, scale and shift, and a backward that gives
//! the input's, the weight's and the bias's gradients in one pass. Composed, it was three nodes
//! and, backward, two reductions over the rows (candle sums a (B, T, C) tensor down to (C,)
//! element by element through strided indices: a fifth of a small model's step) and two zeroed
//! gradients of the activation's size.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::{elems, Float};
use crate::error::Result;

/// `(x − mean)/√(var + eps) · w + b` over the last dimension (biased variance, two passes):
/// x (…, C), w and b (C,).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        let op = LayerNorm {
            eps,
            stats: Mutex::new(None),
        };
        return Ok(x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)?)
}

struct LayerNorm {
    eps: f64,
    /// Each row's mean and 1/σ, from the forward pass (N·2).
    stats: Mutex<Option<CpuStorage>>,
}

/// x, w and b as slices, and the width C.
type Operands<'a, T> = (&'a [T], &'a [T], &'a [T], usize);

/// The operands as slices, their width C checked against the weight's and the bias's.
fn operands<'a, T: Float>(
    x: (&'a CpuStorage, &Layout),
    w: (&'a CpuStorage, &Layout),
    b: (&'a CpuStorage, &Layout),
) -> candle_core::Result<Operands<'a, T>> {
    let (xs, ws, bs) = (
        elems::<T>(x.0, x.1)?,
        elems::<T>(w.0, w.1)?,
        elems::<T>(b.0, b.1)?,
    );
    let c = x.1.dims().last().copied().unwrap_or(0);
    if c == 0 || ws.len() != c || bs.len() != c {
        candle_core::bail!(
            "layer-norm: x {:?}, w {:?}, b {:?}",
            x.1.dims(),
            w.1.dims(),
            b.1.dims()
        );
    }
    Ok((xs, ws, bs, c))
}

impl LayerNorm {
    fn forward<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let (xs, ws, bs, c) = operands::<T>(x, w, b)?;
        let mut out = vec![T::ZERO; xs.len()];
        let mut stats = Vec::with_capacity(2 * xs.len() / c);
        super::vector::layer_norm_rows(xs, ws, bs, self.eps, &mut out, &mut stats);
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("layer-norm: a poisoned lock".into()))? =
            Some(T::store(stats));
        Ok(T::store(out))
    }

    /// dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))/σ with ĝ = g·w, row by row; dw = Σ rows g·x̂;
    /// db = Σ rows g.
    fn backward<T: Float + candle_core::WithDType>(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Tensor; 3]> {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, ws, gs) = match (&*xs, &*ws, &*gs) {
            (
                candle_core::Storage::Cpu(x),
                candle_core::Storage::Cpu(w),
                candle_core::Storage::Cpu(g),
            ) => (elems::<T>(x, xl)?, elems::<T>(w, wl)?, elems::<T>(g, gl)?),
            _ => candle_core::bail!("layer-norm: not on the host"),
        };
        let c = ws.len();
        let stash = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("layer-norm: a poisoned lock".into()))?;
        let Some(stats) = stash.as_ref().and_then(T::of) else {
            candle_core::bail!("layer-norm: backward before forward");
        };
        if c == 0 || xs.len() != gs.len() || stats.len() * c != 2 * xs.len() {
            candle_core::bail!("layer-norm: a gradient of another shape than the input");
        }
        let (mut dx, mut dw, mut db) =
            (vec![T::ZERO; xs.len()], vec![T::ZERO; c], vec![T::ZERO; c]);
        let mut gw = vec![T::ZERO; c];
        super::vector::layer_norm_grad_rows(xs, gs, ws, stats, &mut dx, &mut dw, &mut db, &mut gw);
        let dev = x.device();
        Ok([
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, c, dev)?,
            Tensor::from_vec(db, c, dev)?,
        ])
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        Ok((out, lx.shape().clone()))
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
        let [dx, dw, db] = match x.dtype() {
            candle_core::DType::F32 => self.backward::<f32>(x, w, &grad)?,
            candle_core::DType::F64 => self.backward::<f64>(x, w, &grad)?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
