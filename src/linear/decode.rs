//! Few rows of `x` (decode: one per sample): every weight is read once, in memory order, on
//! the pool, so memory bandwidth sets the speed. More rows (a batched decode step; quantized
//! prefill) go 8 at a time over each chunk of weight rows while it is in cache, each row
//! through the same kernel as alone.

use std::ops::Range;

use candle_core::Result;

use super::activation::activate_slice;
use super::storage::Matrix;
use super::{kernels, quant, run, Linear, MAX_FAST_ROWS, MIN_PARALLEL_WORK};
use crate::config::Activation;
use crate::pool::{self, SharedOut};

/// Most bytes of weights a chunk takes when more than 8 rows of x pass over it (L2 is 256 KB
/// to 2 MB a core).
const CHUNK_BYTES: usize = 192 << 10;

/// Weight rows per block of the (in, out) kernels: the threads take blocks, and each block's
/// partial sums are added in block order, so the result does not depend on the thread count.
const K_BLOCK: usize = 64;

thread_local! {
    /// The (in, out) decode kernels' partial sums, (blocks, M, N), on each calling thread.
    static PARTIAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Linear {
    /// Few rows: every weight read once, on the pool (more than 8: once from memory, then
    /// from cache for every further 8).
    pub(super) fn decode(
        &self,
        x: &[f32],
        m: usize,
        act: Option<Activation>,
        y: &mut [f32],
    ) -> Result<()> {
        let (k, n) = (self.k, self.n);
        let bias = self.bias_host.as_deref();
        // Bias and activation over a run of outputs j0.., after their dots: in a loop the
        // compiler vectorises, not one call per output from inside the kernels.
        let finish = |y: &mut [f32], j0: usize| {
            if let Some(b) = bias {
                y.iter_mut().zip(&b[j0..]).for_each(|(v, b)| *v += b);
            }
            if let Some(a) = act {
                activate_slice(y, a);
            }
        };
        let parallel = m * n * k >= MIN_PARALLEL_WORK;
        let out = SharedOut(y.as_mut_ptr());
        match &self.w {
            Matrix::InOut(e) => {
                let w = e.elems();
                let blocks = k.div_ceil(K_BLOCK);
                // Partial sums of each block of weight rows, then added in block order. The
                // buffer is this thread's, reused, and each block zeroes its own part on the
                // pool (a fresh zeroed buffer would be a serial memset per call).
                PARTIAL.with_borrow_mut(|partial| -> Result<()> {
                    partial.resize(partial.len().max(blocks * m * n), 0.0);
                    let part = SharedOut(partial.as_mut_ptr());
                    let block = |c: usize| {
                        let ks = c * K_BLOCK..k.min((c + 1) * K_BLOCK);
                        // SAFETY: block c owns partial[c·M·N .. (c+1)·M·N], which outlives the
                        // pool's run; no other call touches it.
                        let p = unsafe { part.slice(c * m * n, m * n) };
                        p.fill(0.0);
                        // Every 8 rows of x over the block (from L2 past the first 8).
                        for (x, p) in x
                            .chunks(MAX_FAST_ROWS * k)
                            .zip(p.chunks_mut(MAX_FAST_ROWS * n))
                        {
                            kernels::axpy_rows(w, x, x.len() / k, k, n, ks.clone(), p);
                        }
                    };
                    run(parallel, blocks, &block)?;
                    let partial = &partial[..blocks * m * n];
                    let columns = n.div_ceil(pool::threads() * 4).max(64);
                    let reduce = |c: usize| {
                        let js = c * columns..n.min((c + 1) * columns);
                        let mut sum = [0f32; 64];
                        for i in 0..m {
                            for j0 in js.clone().step_by(64) {
                                let cols = 64.min(js.end - j0);
                                let sum = &mut sum[..cols];
                                // Block by block over contiguous columns (vectorised), each
                                // column still summed in block order.
                                sum.fill(0.0);
                                for b in 0..blocks {
                                    let row = &partial[(b * m + i) * n + j0..][..cols];
                                    sum.iter_mut().zip(row).for_each(|(s, p)| *s += p);
                                }
                                finish(sum, j0);
                                // SAFETY: columns js belong to this call alone; y outlives the
                                // run.
                                unsafe { out.slice(i * n + j0, cols) }.copy_from_slice(sum);
                            }
                        }
                    };
                    run(parallel, n.div_ceil(columns), &reduce)
                })
            }
            Matrix::OutIn(_) | Matrix::Quant(_) => {
                // Integer products read the activations quantized, once per call.
                let xq = matches!(self.w, Matrix::Quant(_)).then(|| quant::Q8Acts::new(x, m, k));
                let rows_of = |rows: Range<usize>| {
                    let (j0, len) = (rows.start, rows.len());
                    // Every 8 rows of x over this chunk of weight rows: past the first 8 the
                    // chunk comes from cache, and each row is what it gets alone.
                    for i0 in (0..m).step_by(MAX_FAST_ROWS) {
                        let group = i0..m.min(i0 + MAX_FAST_ROWS);
                        let put = |r: usize, dots: &[f32]| {
                            for (i, d) in dots.iter().enumerate() {
                                // SAFETY: i0 + i < M and j0 + r < N; column j0 + r belongs to
                                // this call's `rows` alone, and y outlives the run.
                                unsafe { out.write((i0 + i) * n + j0 + r, *d) };
                            }
                        };
                        match &self.w {
                            Matrix::OutIn(e) => {
                                let x = &x[group.start * k..group.end * k];
                                kernels::dot_rows(e.elems(), x, group.len(), k, rows.clone(), put)
                            }
                            Matrix::Quant(q) => {
                                if let Some(xq) = &xq {
                                    q.dot_rows(&xq.rows(group), rows.clone(), put)
                                }
                            }
                            _ => {}
                        }
                    }
                    for i in 0..m {
                        // SAFETY: as for `put`: these columns of row i are this call's alone.
                        finish(unsafe { out.slice(i * n + j0, len) }, j0);
                    }
                };
                // Chunks of ≥ 16 rows, ~8 per thread, so a slow thread's share can be taken;
                // whole tiles of quantized rows; past 8 rows of x, small enough to stay in L2
                // while the next 8 pass.
                let mut chunk = n.div_ceil(pool::threads() * 8).max(16);
                if m > MAX_FAST_ROWS {
                    chunk = chunk.min((CHUNK_BYTES * n / self.weight_bytes().max(1)).max(16));
                }
                let chunk = chunk.next_multiple_of(quant::ROWS);
                run(parallel, n.div_ceil(chunk), &|c| {
                    rows_of(c * chunk..n.min((c + 1) * chunk))
                })
            }
            Matrix::Tensor(_) => candle_core::bail!("linear layer: not a host matrix"),
        }
    }
}
