//! `y = x W + b` (GPT-2's `Conv1D`), with the weights where they are cheapest to read.
//!
//! On the CPU the weights stay as the checkpoint stores them when they can: an f32 `Conv1D`
//! weight (in, out) is read straight from the memory-mapped safetensors file (no copy, no
//! transpose: loading costs nothing and memory holds one copy). Weights converted at load are
//! f16/bf16 (same layout, half the bytes) or 8/4-bit blocks ([`quant`], rows of (out, in)).
//!
//! - Few rows of `x` (decode: one per sample) read every weight once, so bandwidth sets the
//!   speed: [`kernels`] stream the weights in memory order on a small pool of threads ([`pool`]).
//! - Many rows (prefill) go to the `gemm` crate (candle's own, with its AVX-512 kernels on) on
//!   the f32 weights as they lie; halves and blocks go to [`panel`]'s driver, which widens them
//!   into the panels its microkernel reads (without AVX2: widened for gemm first).
//! - On a GPU (or with [`Matrix::Tensor`] on the CPU) it is candle's matmul.

pub(crate) mod kernels;
pub(crate) mod panel;
pub(crate) mod pool;
pub(crate) mod quant;

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

use crate::config::Activation;
use kernels::Elems;
use quant::QuantMatrix;

/// Most rows of `x` (the product of its leading dims) for the decode kernels: a batch of
/// samples. More rows are gemm's job, which reuses each weight load across rows.
pub(crate) const MAX_FAST_ROWS: usize = 8;

/// Layers with fewer multiply-adds than this (M·N·K) run on the calling thread alone: sharing
/// the work would cost more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// Weight rows per block of the (in, out) kernels: the threads take blocks, and each block's
/// partial sums are added in block order, so the result does not depend on the thread count.
const K_BLOCK: usize = 64;

/// Rows widened to f32 at a time for gemm when the weights are not f32.
const SLAB: usize = 256;

/// A slice of weights: borrowed from a memory-mapped file, or owned.
#[derive(Debug, Clone)]
pub(crate) enum Buf<T: bytemuck::Pod> {
    /// Shared, so a tied `wte` is one copy for the embedding and the LM head.
    Owned(Arc<Vec<T>>),
    /// Bytes `range` of `map`, aligned for `T` (checked when made).
    Mapped {
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
        _elem: std::marker::PhantomData<T>,
    },
}

impl<T: bytemuck::Pod> Buf<T> {
    pub(crate) fn owned(v: Vec<T>) -> Self {
        Self::Owned(Arc::new(v))
    }

    /// `range` of `map` as `T`s, or `None` if it is not aligned for them.
    pub(crate) fn mapped(map: &Arc<memmap2::Mmap>, range: Range<usize>) -> Option<Self> {
        bytemuck::try_cast_slice::<u8, T>(map.get(range.clone())?).ok()?;
        Some(Self::Mapped {
            map: map.clone(),
            range,
            _elem: std::marker::PhantomData,
        })
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Self::Owned(v) => v,
            // Alignment and bounds were checked in `mapped`.
            Self::Mapped { map, range, .. } => bytemuck::cast_slice(&map[range.clone()]),
        }
    }
}

/// Host weights in their stored element type.
#[derive(Debug, Clone)]
pub(crate) enum HostElems {
    F32(Buf<f32>),
    F16(Buf<u16>),
    Bf16(Buf<u16>),
}

impl HostElems {
    pub(crate) fn elems(&self) -> Elems<'_> {
        match self {
            Self::F32(b) => Elems::F32(b.as_slice()),
            Self::F16(b) => Elems::F16(b.as_slice()),
            Self::Bf16(b) => Elems::Bf16(b.as_slice()),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::F16(_) => DType::F16,
            Self::Bf16(_) => DType::BF16,
        }
    }
}

/// A weight matrix and where its products run.
#[derive(Debug, Clone)]
pub(crate) enum Matrix {
    /// (in, out), for candle's matmul: GPUs.
    Tensor(Tensor),
    /// (in, out), row-major, on the host: `Conv1D` as stored.
    InOut(HostElems),
    /// (out, in), row-major, on the host: `wte` as the tied LM head.
    OutIn(HostElems),
    /// (out, in) in 8- or 4-bit blocks along `in`.
    Quant(Arc<QuantMatrix>),
}

/// A linear layer `y = x W + b` of `k` inputs and `n` outputs.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    w: Matrix,
    /// (N,) in the activations' dtype, for candle's path.
    bias: Option<Tensor>,
    /// (N,) f32, for the host kernels.
    bias_host: Option<Vec<f32>>,
    k: usize,
    n: usize,
}

impl Linear {
    /// A layer of `k` inputs and `n` outputs; `bias` (N,).
    pub(crate) fn new(w: Matrix, bias: Option<Tensor>, k: usize, n: usize) -> Result<Self> {
        let bias_host = match (&w, &bias) {
            (Matrix::Tensor(_), _) | (_, None) => None,
            (_, Some(b)) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        };
        Ok(Self {
            w,
            bias,
            bias_host,
            k,
            n,
        })
    }

    /// The bias (N,), if any.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The whole weight matrix as (K, N) f32 on `device`: widened, dequantized or transposed
    /// as its storage needs (for analyses; small matrices).
    pub(crate) fn weight_kn(&self, device: &candle_core::Device) -> Result<Tensor> {
        let (k, n) = (self.k, self.n);
        let w = match &self.w {
            Matrix::Tensor(t) => return t.to_dtype(DType::F32),
            Matrix::InOut(e) => {
                let mut v = vec![0f32; k * n];
                e.elems().widen(0..k * n, &mut v);
                Tensor::from_vec(v, (k, n), device)?
            }
            Matrix::OutIn(e) => {
                let mut v = vec![0f32; k * n];
                e.elems().widen(0..k * n, &mut v);
                Tensor::from_vec(v, (n, k), device)?.t()?.contiguous()?
            }
            Matrix::Quant(q) => {
                let mut v = vec![0f32; k * n];
                for (j, row) in v.chunks_exact_mut(k).enumerate() {
                    q.dequantize_row(j, row);
                }
                Tensor::from_vec(v, (n, k), device)?.t()?.contiguous()?
            }
        };
        Ok(w)
    }

    /// Column `j` of the (K, N) weights: output `j`'s (K,) weights, f32.
    pub(crate) fn column(&self, j: usize, device: &candle_core::Device) -> Result<Tensor> {
        let k = self.k;
        if j >= self.n {
            candle_core::bail!("output {j} of a layer with {} outputs", self.n);
        }
        let mut v = vec![0f32; k];
        match &self.w {
            Matrix::Tensor(t) => return t.narrow(1, j, 1)?.squeeze(1)?.to_dtype(DType::F32),
            Matrix::OutIn(e) => e.elems().widen(j * k..(j + 1) * k, &mut v),
            Matrix::Quant(q) => q.dequantize_row(j, &mut v),
            Matrix::InOut(e) => {
                let mut row = vec![0f32; self.n];
                for (kk, out) in v.iter_mut().enumerate() {
                    e.elems().widen(kk * self.n..(kk + 1) * self.n, &mut row);
                    *out = row[j];
                }
            }
        }
        Tensor::from_vec(v, k, device)
    }

    /// Bytes the weights take.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.w {
            Matrix::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Matrix::InOut(e) | Matrix::OutIn(e) => self.k * self.n * e.dtype().size_in_bytes(),
            Matrix::Quant(q) => q.bytes(),
        }
    }

    /// (..., K) -> (..., N): `x W + b`, then `act` when given.
    pub(crate) fn forward(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let Matrix::Tensor(w) = &self.w else {
            return self.forward_host(x, act);
        };
        let y = x.broadcast_matmul(&w.to_dtype(x.dtype())?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        match act {
            None => Ok(y),
            Some(a) => activate_tensor(&y, a),
        }
    }

    fn forward_host(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let Some((&k, lead)) = x.dims().split_last() else {
            candle_core::bail!("linear layer: a scalar input");
        };
        if k != self.k || !x.device().is_cpu() {
            candle_core::bail!(
                "linear layer: input (..., {k}) on {:?} for a ({}, {}) layer on the CPU",
                x.device(),
                self.k,
                self.n
            );
        }
        let m: usize = lead.iter().product();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let mut y = vec![0f32; m * self.n];
        {
            let (store, layout) = x32.storage_and_layout();
            let xs = match (&*store, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
                _ => candle_core::bail!("linear layer: input not on the host"),
            };
            if m <= MAX_FAST_ROWS {
                self.decode(xs, m, act, &mut y)?;
            } else {
                self.prefill(xs, m, &mut y, panel::available(), MAX_WIDENED)?;
                if let Some(a) = act {
                    activate_rows(&mut y, self.n, a)?;
                }
            }
        }
        let mut shape = x.dims().to_vec();
        shape[lead.len()] = self.n;
        Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())
    }

    /// Few rows: every weight read once, on the pool.
    fn decode(&self, x: &[f32], m: usize, act: Option<Activation>, y: &mut [f32]) -> Result<()> {
        let (k, n) = (self.k, self.n);
        let bias = self.bias_host.as_deref();
        // Bias and activation over a run of outputs j0.., after their dots: in a loop the
        // compiler vectorises (one call per output from inside the kernels cost ~8 % of decode).
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
                // pool (a fresh zeroed buffer was a serial memset, 4 % of decode).
                PARTIAL.with_borrow_mut(|partial| -> Result<()> {
                    partial.resize(partial.len().max(blocks * m * n), 0.0);
                    let part = SharedOut(partial.as_mut_ptr());
                    let block = |c: usize| {
                        let ks = c * K_BLOCK..k.min((c + 1) * K_BLOCK);
                        // SAFETY: block c owns partial[c·M·N .. (c+1)·M·N], which outlives the
                        // pool's run; no other call touches it.
                        let p = unsafe { part.slice(c * m * n, m * n) };
                        p.fill(0.0);
                        kernels::axpy_rows(w, x, m, k, n, ks, p);
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
                    let put = |r: usize, dots: &[f32]| {
                        for (i, d) in dots.iter().enumerate() {
                            // SAFETY: i < M and j0 + r < N; column j0 + r belongs to this
                            // call's `rows` alone, and y outlives the run.
                            unsafe { out.write(i * n + j0 + r, *d) };
                        }
                    };
                    match &self.w {
                        Matrix::OutIn(e) => kernels::dot_rows(e.elems(), x, m, k, rows, put),
                        Matrix::Quant(q) => {
                            if let Some(xq) = &xq {
                                q.dot_rows(xq, rows, put)
                            }
                        }
                        _ => {}
                    }
                    for i in 0..m {
                        // SAFETY: as for `put`: these columns of row i are this call's alone.
                        finish(unsafe { out.slice(i * n + j0, len) }, j0);
                    }
                };
                // Chunks of ≥ 16 rows, ~8 per thread, so a slow thread's share can be taken.
                let chunk = n.div_ceil(pool::threads() * 8).max(16);
                run(parallel, n.div_ceil(chunk), &|c| {
                    rows_of(c * chunk..n.min((c + 1) * chunk))
                })
            }
            Matrix::Tensor(_) => candle_core::bail!("linear layer: not a host matrix"),
        }
    }

    /// Many rows: gemm. The bias is the initial value of `y`.
    /// Halves and blocks (N, K) go to [`panel::gemm_nk`] when `panels` (it must be
    /// [`panel::available`]); else they are widened for gemm, a slab at a time when they have more
    /// than `max_widened` elements.
    fn prefill(
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
            Matrix::Quant(q) if panels => {
                let pack = |n0: usize, ks: Range<usize>, p: &mut [f32]| {
                    panel::pack_rows(n, n0, ks, p, |j, k0, o| q.dequantize_part(j, k0, o))
                };
                // SAFETY: as above.
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
                // gemm over all of K, as for f32. Measured (f16, GPT-2 small, 512 tokens):
                // reading (N, K) transposed instead was ~15 % slower, and L2-sized bands of
                // outputs, each widened then multiplied, 4 % slower (gemm on narrow bands).
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
    fn widen_row(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.w {
            Matrix::OutIn(e) => e.elems().widen(j * k..(j + 1) * k, out),
            Matrix::Quant(q) => q.dequantize_row(j, out),
            Matrix::InOut(_) | Matrix::Tensor(_) => {}
        }
    }

    /// An (N, K) matrix widened to f32 as (K, N) row-major, 64 outputs at a time on the pool
    /// (each K-row then takes 256 contiguous bytes per tile: 16 left the writes missing).
    fn widen_kn(&self, w: &mut [f32]) -> Result<()> {
        const TILE: usize = 64;
        let (k, n) = (self.k, self.n);
        let out = SharedOut(w.as_mut_ptr());
        run(k * n >= MIN_PARALLEL_WORK, n.div_ceil(TILE), &|t| {
            let js = t * TILE..n.min((t + 1) * TILE);
            if let Matrix::OutIn(e) = &self.w {
                // Halves widened in the registers they are transposed in: one pass (widening
                // the tile's rows first, then transposing them, took 1.2-1.9x as long in
                // `widen_speed`).
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
const MAX_WIDENED: usize = 1 << 24;

thread_local! {
    /// The (in, out) decode kernels' partial sums, (blocks, M, N), on each calling thread.
    static PARTIAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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

/// `f(c)` for every chunk `c < n`: on the pool, or here when the work is small.
fn run(parallel: bool, n: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()> {
    if parallel {
        pool::run(n, f).map_err(|p| candle_core::Error::Msg(format!("linear layer: {}", p.0)))
    } else {
        (0..n).for_each(f);
        Ok(())
    }
}

/// GPT-2's tanh GELU (transformers' `NewGELUActivation`), vectorisable:
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let u = C * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + tanh(u))
}

/// tanh from one exp: `1 - 2 / (e^{2u} + 1)`, odd-symmetrised; within 2 ulp of f32's tanh
/// where it matters for GELU (the absolute error stays below 1e-7).
#[inline]
pub(crate) fn tanh(u: f32) -> f32 {
    let a = u.abs().min(9.0); // tanh(9) = 1 - 3e-8: 1 in f32
    let t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    t.copysign(u)
}

/// `e^x` for x in [0, 18], by 2ⁿ·p(r) with |r| ≤ ln2/2 (Cephes' expf polynomial): the
/// compiler vectorises it, unlike libm's.
#[inline]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding 1.5·2²³, which leaves the integer in the low mantissa bits.
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// The activation of one value.
#[inline]
pub(crate) fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluNew | Activation::GeluPytorchTanh => gelu_tanh(v),
        Activation::Gelu => gelu_erf(v),
        Activation::Relu => v.max(0.0),
    }
}

/// The exact GELU `x·Φ(x)` some checkpoints use, in f64 with candle's erf, as candle computes it.
fn gelu_erf(v: f32) -> f32 {
    let v = f64::from(v);
    ((v * (1.0 + candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2))) / 2.0) as f32
}

/// The activation over rows of `n` values, on the pool.
fn activate_rows(y: &mut [f32], n: usize, act: Activation) -> Result<()> {
    let rows = y.len() / n;
    let per = rows.div_ceil(pool::threads() * 4).max(1);
    let out = SharedOut(y.as_mut_ptr());
    run(rows * n >= 1 << 14, rows.div_ceil(per), &|c| {
        let rs = c * per..rows.min((c + 1) * per);
        // SAFETY: rows rs belong to this call alone; y outlives the run.
        let part = unsafe { out.slice(rs.start * n, rs.len() * n) };
        activate_slice(part, act);
    })
}

/// The activation over a slice, chosen once outside the loop so the compiler vectorises the
/// tanh GELU (chosen per element it did not: 4.4 % of f32 prefill in perf).
/// With AVX2 it is compiled for 8 lanes (the crate's baseline is SSE2's 4); Rust never fuses
/// a multiply and an add on its own, so both give the same bits.
fn activate_slice(y: &mut [f32], act: Activation) {
    match act {
        Activation::GeluNew | Activation::GeluPytorchTanh => {
            #[cfg(target_arch = "x86_64")]
            if kernels::simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (just checked).
                return unsafe { gelu_tanh_avx2(y) };
            }
            y.iter_mut().for_each(|v| *v = gelu_tanh(*v))
        }
        a => y.iter_mut().for_each(|v| *v = activate(*v, a)),
    }
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gelu_tanh_avx2(y: &mut [f32]) {
    y.iter_mut().for_each(|v| *v = gelu_tanh(*v))
}

/// The activation on a tensor, with candle's ops (the GPU path).
fn activate_tensor(y: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        // candle's `gelu` is the tanh approximation, transformers' `NewGELUActivation`.
        Activation::GeluNew | Activation::GeluPytorchTanh => y.gelu(),
        Activation::Gelu => y.gelu_erf(),
        Activation::Relu => y.relu(),
    }
}

/// An output buffer written by several threads at disjoint places.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

impl SharedOut {
    /// # Safety
    /// `i` must be inside the live buffer, and no other thread may access element `i` meanwhile.
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(i) = v };
    }

    /// # Safety
    /// `start..start + len` must be inside the live buffer and touched by no other thread while
    /// the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

// SAFETY: the pointer is only used through `write` and `slice`, whose callers keep threads on
// disjoint elements of a buffer that outlives them.
unsafe impl Sync for SharedOut {}
// SAFETY: as for `Sync`.
unsafe impl Send for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut r = SplitMix64::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn host(t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(f32::MIN_POSITIVE))
    }

    /// Every storage of the same (K, N) weights, as the checkpoint makes them.
    fn layers(w_kn: &Tensor, bias: &Tensor, dtype: DType) -> Result<Vec<(String, Linear)>> {
        let (k, n) = w_kn.dims2()?;
        let w = w_kn.to_dtype(dtype)?;
        let kn = host(&w.to_dtype(DType::F32)?)?;
        let nk = host(&w.to_dtype(DType::F32)?.t()?.contiguous()?)?;
        let elems = |v: &[f32]| match dtype {
            DType::F16 => HostElems::F16(Buf::owned(
                v.iter()
                    .map(|x| half::f16::from_f32(*x).to_bits())
                    .collect(),
            )),
            DType::BF16 => HostElems::Bf16(Buf::owned(
                v.iter()
                    .map(|x| half::bf16::from_f32(*x).to_bits())
                    .collect(),
            )),
            _ => HostElems::F32(Buf::owned(v.to_vec())),
        };
        let b = Some(bias.clone());
        Ok(vec![
            (
                "tensor".into(),
                Linear::new(Matrix::Tensor(w.clone()), b.clone(), k, n)?,
            ),
            (
                "in-out".into(),
                Linear::new(Matrix::InOut(elems(&kn)), b.clone(), k, n)?,
            ),
            (
                "out-in".into(),
                Linear::new(Matrix::OutIn(elems(&nk)), b, k, n)?,
            ),
        ])
    }

    /// Rows of x: 1-8 take the decode kernels, 9 and 17 gemm.
    const ROWS: [usize; 7] = [1, 2, 3, 5, 8, 9, 17];
    /// (in, out): odd sizes reach every tail (one thread), GPT-2's MLP (the pool's threads).
    const SIZES: [(usize, usize); 3] = [(37, 101), (61, 67), (768, 3072)];

    #[test]
    fn every_storage_and_path_equals_the_product() -> Result<()> {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (seed, &(k, n)) in SIZES.iter().enumerate() {
                let w = rand(&[k, n], seed as u64)?;
                let b = rand(&[n], 50 + seed as u64)?;
                // The exact product with the stored (rounded) weights, in f32.
                let w_exact = w.to_dtype(dtype)?.to_dtype(DType::F32)?;
                for (name, layer) in layers(&w, &b, dtype)? {
                    for m in ROWS {
                        let x = rand(&[1, m, k], 1000 + m as u64)?;
                        let want = x.broadcast_matmul(&w_exact)?.broadcast_add(&b)?;
                        let got = layer.forward(&x, None)?;
                        assert_eq!(got.dims(), &[1, m, n]);
                        let tol = if name == "tensor" && dtype != DType::F32 {
                            1e-2
                        } else {
                            1e-5
                        };
                        let err = rel_err(&got, &want)?;
                        assert!(err <= tol, "{dtype:?} {name} m={m} k={k} n={n}: {err}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Prefill of halves and blocks too large to widen whole (the tied LM head of a big
    /// vocabulary) goes a slab of outputs at a time without AVX2: forced here on a small matrix,
    /// and compared with the panel driver where it runs.
    #[test]
    fn prefill_by_slabs_equals_prefill_widened_whole() -> Result<()> {
        let (k, n, m) = (64, 600, 11);
        let w = rand(&[k, n], 9)?;
        let nk = host(&w.t()?.contiguous()?)?;
        let f16: Vec<u16> = nk
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let q = QuantMatrix::quantize(quant::QuantKind::Q4_0, n, k, |j, out| {
            out.copy_from_slice(&nk[j * k..][..k])
        });
        let x = host(&rand(&[m, k], 10)?)?;
        for w in [
            Matrix::OutIn(HostElems::F16(Buf::owned(f16))),
            Matrix::Quant(Arc::new(q)),
        ] {
            let layer = Linear::new(w, Some(rand(&[n], 11)?), k, n)?;
            let (mut whole, mut slabs) = (vec![0f32; m * n], vec![0f32; m * n]);
            layer.prefill(&x, m, &mut whole, false, MAX_WIDENED)?;
            layer.prefill(&x, m, &mut slabs, false, 0)?;
            let mut paths = vec![("slabs", slabs)];
            if panel::available() {
                let mut panels = vec![0f32; m * n];
                layer.prefill(&x, m, &mut panels, true, MAX_WIDENED)?;
                paths.push(("panels", panels));
            }
            let scale = whole.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (name, y) in paths {
                let diff = whole
                    .iter()
                    .zip(&y)
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(diff <= 1e-5 * scale, "{name}: {diff} of {scale}");
            }
        }
        Ok(())
    }

    #[test]
    fn quantized_layers_equal_their_dequantized_weights() -> Result<()> {
        let (k, n) = (96, 75);
        let w = rand(&[k, n], 3)?;
        let nk = host(&w.t()?.contiguous()?)?;
        for kind in [quant::QuantKind::Q8_0, quant::QuantKind::Q4_0] {
            let q =
                QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&nk[j * k..][..k]));
            let mut deq = vec![0f32; n * k];
            for j in 0..n {
                q.dequantize_row(j, &mut deq[j * k..(j + 1) * k]);
            }
            let w_deq = Tensor::from_vec(deq, (n, k), &Device::Cpu)?.t()?;
            let layer = Linear::new(Matrix::Quant(Arc::new(q)), None, k, n)?;
            for m in ROWS {
                let x = rand(&[m, k], 7 + m as u64)?;
                let err = rel_err(&layer.forward(&x, None)?, &x.matmul(&w_deq)?)?;
                // Decode (m <= 8) quantizes the activations too, as llama.cpp does; prefill
                // multiplies f32 activations by the dequantized weights.
                let tol = if m <= MAX_FAST_ROWS { 1e-2 } else { 1e-5 };
                assert!(err <= tol, "{kind:?} m={m}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_fused_activation_equals_candles() -> Result<()> {
        let (k, n) = (61, 67);
        let w = rand(&[k, n], 1)?;
        for (name, layer) in layers(&w, &rand(&[n], 2)?, DType::F32)? {
            for m in [1, 3, 17] {
                let x = (rand(&[m, k], 3)? * 0.3)?;
                for act in [Activation::GeluNew, Activation::Gelu, Activation::Relu] {
                    let want = activate_tensor(&layer.forward(&x, None)?, act)?;
                    let got = layer.forward(&x, Some(act))?;
                    let err = (got - &want)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    assert!(err <= 2e-6, "{name} {act:?} m={m}: {err}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn tanh_and_gelu_are_accurate() {
        let mut worst = (0f64, 0f64);
        for i in -20000..=20000 {
            let x = i as f32 * 1e-3; // -20 .. 20
            let t = (tanh(x) as f64 - (x as f64).tanh()).abs();
            let g = gelu_tanh(x) as f64;
            let u = 0.7978845608028654 * (x as f64 + 0.044715 * (x as f64).powi(3));
            let g_ref = 0.5 * x as f64 * (1.0 + u.tanh());
            worst = (
                worst.0.max(t),
                worst.1.max((g - g_ref).abs() / g_ref.abs().max(1.0)),
            );
        }
        assert!(worst.0 < 2e-7 && worst.1 < 1e-6, "{worst:?}");
    }

    /// A row's result is the same, bit for bit, whatever else is in the batch (so batched and
    /// single-sample generation agree exactly).
    #[test]
    fn rows_do_not_depend_on_the_batch() -> Result<()> {
        for (k, n) in SIZES {
            let all_layers = layers(&rand(&[k, n], 1)?, &rand(&[n], 2)?, DType::F32)?;
            // (candle's gemm, the GPU path, promises no such thing.)
            for (name, layer) in all_layers.into_iter().filter(|(n, _)| n != "tensor") {
                let x = rand(&[MAX_FAST_ROWS, k], 3)?;
                let all = layer.forward(&x, None)?;
                for m in 1..=MAX_FAST_ROWS {
                    let some = layer.forward(&x.narrow(0, 0, m)?, None)?;
                    let diff = (&some - &all.narrow(0, 0, m)?)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?;
                    assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name} m={m} k={k} n={n}");
                }
            }
        }
        Ok(())
    }

    /// Threads sharing one layer (and so the pool) each get their own, correct result.
    #[test]
    fn concurrent_callers() -> Result<()> {
        let (k, n) = (768, 3072);
        let w = rand(&[k, n], 21)?;
        let b = rand(&[n], 22)?;
        let layers = layers(&w, &b, DType::F32)?;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let layers = &layers;
                    let (w, b) = (&w, &b);
                    s.spawn(move || -> Result<()> {
                        let x = rand(&[1, k], 30 + t)?;
                        let want = x.matmul(w)?.broadcast_add(b)?;
                        for _ in 0..5 {
                            for (_, l) in layers.iter() {
                                assert!(rel_err(&l.forward(&x, None)?, &want)? <= 1e-5);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| candle_core::Error::Msg("panicked".into()))?
            })
        })
    }

    /// Decode (one row) speed of GPT-2 small's layers from memory, in both f32 layouts and quantized:
    /// `cargo test --release --lib decode_speed -- --ignored --nocapture`. Alone, (out, in)
    /// streams ~2x faster (2026-12-04: 40-47 vs 20-29 GB/s); inside the model, with f32
    /// `Conv1D`s transposed at load, decode was no faster (see `checkpoint::Weights::matrix`).
    #[test]
    #[ignore]
    fn decode_speed() -> Result<()> {
        for (k, n) in [
            (768, 2304),
            (768, 768),
            (768, 3072),
            (3072, 768),
            (768, 50257),
        ] {
            let w = rand(&[k, n], 1)?;
            let kn = host(&w)?;
            let nk = host(&w.t()?.contiguous()?)?;
            let x = rand(&[1, k], 2)?;
            let quantized = |kind| {
                QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&nk[j * k..][..k]))
            };
            let (q8, q4) = (
                quantized(quant::QuantKind::Q8_0),
                quantized(quant::QuantKind::Q4_0),
            );
            for layout in ["in-out", "out-in", "q8_0", "q4_0"] {
                let make = || {
                    let m = match layout {
                        "in-out" => Matrix::InOut(HostElems::F32(Buf::owned(kn.clone()))),
                        "out-in" => Matrix::OutIn(HostElems::F32(Buf::owned(nk.clone()))),
                        "q8_0" => Matrix::Quant(Arc::new(q8.clone())),
                        _ => Matrix::Quant(Arc::new(q4.clone())),
                    };
                    Linear::new(m, None, k, n)
                };
                let bytes = make()?.weight_bytes();
                // Enough copies to be read from memory, taken in turn, as in decode.
                let copies = (768 << 20) / bytes + 1;
                let ls: Vec<Linear> = (0..copies).map(|_| make()).collect::<Result<_>>()?;
                let mut times = Vec::new();
                for i in 0..4 * copies {
                    let t = std::time::Instant::now();
                    ls[i % copies].forward(&x, None)?;
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let t = times[times.len() / 2];
                println!(
                    "{layout} ({k}, {n}): {:.3} ms, {:.1} GB/s, {} threads",
                    t * 1e3,
                    bytes as f64 / t / 1e9,
                    pool::threads()
                );
            }
        }
        Ok(())
    }

    /// Speed of widening (N, K) halves and blocks into gemm's (K, N) f32 layout, weights in
    /// cache (not a check): `cargo test --release --lib widen_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn widen_speed() -> Result<()> {
        for (n, k) in [(3072usize, 768usize), (768, 3072), (2304, 768)] {
            let value = |i: usize| (i % 977) as f32 * 1e-3;
            let bits = (0..n * k)
                .map(|i| half::f16::from_f32(value(i)).to_bits())
                .collect();
            let half = Linear::new(Matrix::OutIn(HostElems::F16(Buf::owned(bits))), None, k, n)?;
            let q = QuantMatrix::quantize(quant::QuantKind::Q4_0, n, k, |j, out| {
                out.iter_mut()
                    .enumerate()
                    .for_each(|(c, o)| *o = value(j * k + c))
            });
            let q4 = Linear::new(Matrix::Quant(Arc::new(q)), None, k, n)?;
            let mut w = vec![0f32; k * n];
            for (what, l) in [("f16", &half), ("q4_0", &q4)] {
                let mut times = vec![];
                for _ in 0..30 {
                    let t = std::time::Instant::now();
                    l.widen_kn(&mut w)?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                times.sort_by(f64::total_cmp);
                let ns = times[15] * 1e6 / (n * k) as f64;
                println!(
                    "{what} ({n}, {k}): {:.2} ms median, {ns:.2} ns/element",
                    times[15]
                );
            }
        }
        Ok(())
    }
}
