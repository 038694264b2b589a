//! Many rows of `x` (prefill): gemm, which reuses each weight it loads across rows. f32
//! weights go to the `gemm` crate as they lie; halves to [`super::panel`]'s driver, which widens
//! them into the panels its microkernel reads (without AVX2: widened for gemm). Quantized
//! blocks come here only without AVX2 (widened for gemm): with it, they multiply in integers at
//! every M, on the decode kernels.

use std::ops::Range;

use candle_core::Result;

use super::kernels::{self, Elems};
use super::storage::{HostElems, Matrix};
use super::{panel, run, Linear, MIN_PARALLEL_WORK};
use crate::pool::{self, SharedOut};

/// Rows widened to f32 at a time for gemm when the weights are not f32.
const SLAB: usize = 256;

impl Linear {
    /// Many rows: gemm. The bias is the initial value of `y`.
    /// Halves and blocks (N, K) go to [`panel::gemm_nk`] when `panels` (it must be
    /// [`panel::available`]); else they are widened for gemm, a slab at a time when they have more
    /// than `max_widened` elements.
    pub(super) fn prefill(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        panels: bool,
        max_widened: usize,
    ) -> Result<()> {
        let (k, n) = (self.k, self.n);
        if let Some(b) = &self.bias_host {
            y.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b));
        }
        let mut slab = Vec::new();
        let parallel = m * n * k >= MIN_PARALLEL_WORK;
        let on_pool = |units: usize, f: &(dyn Fn(usize) + Sync)| run(parallel, units, f);
        let out = SharedOut(y.as_mut_ptr());
        match &self.w {
            Matrix::OutIn(e) if panels && !matches!(e, HostElems::F32(_)) => {
                let w = e.elems();
                let pack =
                    |n0: usize, ks: Range<usize>, p: &mut [f32]| panel::pack_elems(w, k, n0, ks, p);
                // SAFETY: the caller's promise that panels are available; y is (M, N), ours.
                unsafe { panel::gemm_nk(x, m, k, n, out, &pack, pool::threads(), &on_pool)? };
            }
            Matrix::InOut(HostElems::F32(w)) => {
                // gemm, not the panels: packed from (K, N) into them, f32 prefill was no faster
                // (perf: the same share in the microkernel and in packing as gemm's).
                // SAFETY: x (M, K), w (K, N) and y (M, N) are row-major with those lengths.
                unsafe { gemm_into(y, n, 0, x, k, 0, m, w.as_slice(), 1, n, k, n) };
            }
            Matrix::InOut(e) => {
                let w = e.elems();
                for k0 in (0..k).step_by(SLAB) {
                    let rows = SLAB.min(k - k0);
                    slab.resize(rows * n, 0.0);
                    w.widen(k0 * n..(k0 + rows) * n, &mut slab);
                    // SAFETY: x's columns k0..k0+rows against the slab (rows, N), into y (M, N).
                    unsafe { gemm_into(y, n, 0, x, k, k0, m, &slab, 1, n, rows, n) };
                }
            }
            Matrix::OutIn(HostElems::F32(w)) => {
                // (N, K) row-major read as its transpose (K, N): column stride K, row stride 1.
                // SAFETY: as above.
                unsafe { gemm_into(y, n, 0, x, k, 0, m, w.as_slice(), k, 1, k, n) };
            }
            Matrix::OutIn(_) | Matrix::Quant(_) if k * n <= max_widened => {
                // Widened whole, once per call, into the (K, N) layout gemm packs fastest: one
                // gemm over all of K, as for f32. Reading (N, K) transposed, or widening bands
                // of outputs, was slower (docs/PERF.md).
                WIDENED.with_borrow_mut(|w| -> Result<()> {
                    w.resize(k * n, 0.0);
                    self.widen_kn(w)?;
                    // SAFETY: x (M, K), w (K, N) and y (M, N) are row-major with those lengths.
                    unsafe { gemm_into(y, n, 0, x, k, 0, m, w, 1, n, k, n) };
                    Ok(())
                })?;
            }
            Matrix::OutIn(_) | Matrix::Quant(_) => {
                for j0 in (0..n).step_by(SLAB) {
                    let rows = SLAB.min(n - j0);
                    slab.resize(rows * k, 0.0);
                    for (r, out) in slab.chunks_exact_mut(k).enumerate() {
                        self.widen_row(j0 + r, out);
                    }
                    // SAFETY: the slab (rows, K) read transposed, into columns j0.. of y.
                    unsafe { gemm_into(y, n, j0, x, k, 0, m, &slab, k, 1, k, rows) };
                }
            }
            Matrix::Tensor(_) => candle_core::bail!("linear layer: not a host matrix"),
        }
        Ok(())
    }

    /// Output `j`'s (K,) weights of an (N, K) matrix, as f32.
    pub(super) fn widen_row(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.w {
            Matrix::OutIn(e) => e.elems().widen(j * k..(j + 1) * k, out),
            Matrix::Quant(q) => q.dequantize_row(j, out),
            Matrix::InOut(_) | Matrix::Tensor(_) => {}
        }
    }

    /// An (N, K) matrix widened to f32 as (K, N) row-major, 64 outputs at a time on the pool
    /// (each K-row then takes 256 contiguous bytes per tile: 16 left the writes missing).
    pub(crate) fn widen_kn(&self, w: &mut [f32]) -> Result<()> {
        const TILE: usize = 64;
        let (k, n) = (self.k, self.n);
        let out = SharedOut(w.as_mut_ptr());
        run(k * n >= MIN_PARALLEL_WORK, n.div_ceil(TILE), &|t| {
            let js = t * TILE..n.min((t + 1) * TILE);
            if let Matrix::OutIn(e) = &self.w {
                // Halves widened in the registers they are transposed in: one pass, not a
                // widening pass then a transposing one.
                let rows = e.elems().slice(js.start * k..js.end * k);
                // SAFETY: columns js of w (K, N) belong to tile t alone; w outlives the run.
                unsafe { kernels::transpose_into(rows, js.len(), k, out, n, js.start) };
                return;
            }
            // Per thread, reused: a fresh (64, K) buffer per tile is an mmap and page faults.
            TILE_ROWS.with_borrow_mut(|rows| {
                rows.resize(js.len() * k, 0.0);
                for (r, row) in rows.chunks_exact_mut(k).enumerate() {
                    self.widen_row(js.start + r, row);
                }
                let rows = Elems::F32(rows);
                // SAFETY: columns js of w (K, N) belong to tile t alone; w outlives the run.
                unsafe { kernels::transpose_into(rows, js.len(), k, out, n, js.start) };
            })
        })
    }
}

/// Most elements a matrix widened whole for gemm may have (64 MB of f32: GPT-2 XL's MLP is
/// 41 MB); the tied LM head (vocab, C) is widened a slab at a time instead.
pub(super) const MAX_WIDENED: usize = 1 << 24;

thread_local! {
    /// The widened weights of the last prefill on this thread, reused: a fresh buffer per
    /// call would fault in every page again.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One tile of outputs being widened (64, K), on each thread of the pool.
    static TILE_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y[:, j0..j0+cols] += x[:, k0..k0+depth] · W` where `W(kk, j)` is `w[kk·w_rs + j·w_cs]`.
///
/// # Safety
/// `y` must be (M, y_stride) with `j0 + cols <= y_stride`, `x` (M, x_stride) with
/// `k0 + depth <= x_stride`, and `w` must hold every element the strides address.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    y: &mut [f32],
    y_stride: usize,
    j0: usize,
    x: &[f32],
    x_stride: usize,
    k0: usize,
    m: usize,
    w: &[f32],
    w_cs: usize,
    w_rs: usize,
    depth: usize,
    cols: usize,
) {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 && m * cols * depth > 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's promise; gemm reads `read_dst` (alpha = 1) and adds x·W (beta = 1).
    unsafe {
        gemm::gemm(
            m,
            cols,
            depth,
            y.as_mut_ptr().add(j0),
            1,
            y_stride as isize,
            true,
            x.as_ptr().add(k0),
            1,
            x_stride as isize,
            w.as_ptr(),
            w_cs as isize,
            w_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}
