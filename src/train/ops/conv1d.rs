//! HF's `Conv1D` as one fused op, and the row sum its bias gradient needs.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::{elems, Float};
use crate::error::Result;

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
