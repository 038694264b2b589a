//! Matrix products on host slices for the fused ops: the `gemm` crate (what candle's CPU matmul
//! calls), on strided views, so that an op reads a head's Q out of the packed QKV rows or writes
//! its output into its columns of (B, T, C) without copying.

use super::Float;

/// A row-major view of `data`: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, T> {
    pub(super) data: &'a [T],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous (rows, cols) matrix starting at `data[0]`.
    pub(super) fn rows(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// Its transpose (a view: the strides swap).
    pub(super) fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Whether the (rows, cols) view `m` stays inside its slice.
fn fits<T>(m: &Mat<'_, T>, rows: usize, cols: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * m.rs + (cols - 1) * m.cs < m.data.len()
}

/// `dst = [dst +] scale · lhs · rhs`: lhs (m, k), rhs (k, n), dst (m, n) row-major with row
/// stride `dst_rs`; with `accumulate` the product is added to what `dst` holds (gemm's
/// `read_dst`), otherwise it replaces it.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    scale: T,
) -> candle_core::Result<()> {
    let out = Mat {
        data: &*dst,
        rs: dst_rs,
        cs: 1,
    };
    if !(fits(&lhs, m, k) && fits(&rhs, k, n) && fits(&out, m, n) && dst_rs >= n) {
        candle_core::bail!(
            "a fused op's matrix product does not fit its buffers ({m}×{k}·{k}×{n})"
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 && m * n * k > 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `fits` checked that every element each view addresses lies inside its slice, and
    // `dst_rs >= n` that the rows of `dst` do not overlap; `dst` is borrowed mutably, so it
    // aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::from_f64(1.0),
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
