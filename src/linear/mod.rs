//! `y = x Wᵀ + b`: a drop-in for `candle_nn::Linear` with a fast CPU path for decoding.
//!
//! Decoding feeds a few activation rows (one per sample) through every weight matrix, so each
//! token reads every weight once: a matrix-vector product, bound by memory bandwidth rather than
//! arithmetic. For up to [`MAX_FAST_ROWS`] rows on the CPU this layer streams each weight row once,
//! dots it with all the rows of `x` (f32 accumulation, AVX2 + FMA), and splits the weight rows
//! between the threads of a small pool (see [`pool`] for why not rayon). f16 and bf16 weights are
//! widened in registers (F16C), halving the bytes read. Everything else (prefill, GPU, other
//! dtypes) is candle_nn's matmul.

use std::ops::Range;

use candle_core::{CpuStorage, DType, Module, Result, Storage, Tensor};

/// Most rows of `x` (the product of its leading dims) for the fast path: a batch of samples in
/// decode. Prefill's hundreds of rows are gemm's job, which reuses each weight load across rows.
const MAX_FAST_ROWS: usize = 8;

/// Layers with fewer multiply-adds than this (M·N·K) run on the calling thread alone: sharing
/// the work would cost more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// A linear layer: `weight` (out, in), optional `bias` (out,).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight`: (out, in), contiguous for the fast path; `bias`: (out,). The weight may be f16
    /// or bf16 while activations are f32: the output then has the activations' dtype.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The (out, in) weight.
    #[allow(dead_code)] // candle_nn::Linear's accessor, kept for parity; the model needs none yet
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// candle_nn's forward (gemm). A weight of another dtype than `x` is cast to it first,
    /// on every call (cheap next to a many-row matmul, the only case that comes here).
    fn forward_matmul(&self, x: &Tensor) -> Result<Tensor> {
        let cast = |t: &Tensor| t.to_dtype(x.dtype());
        let bias = self.bias.as_ref().map(cast).transpose()?;
        candle_nn::Linear::new(cast(&self.weight)?, bias).forward(x)
    }

    /// The fast path, or `None` where it does not apply.
    fn forward_few_rows(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((&k, lead)) = x.dims().split_last() else {
            return Ok(None);
        };
        let m: usize = lead.iter().product();
        let Ok((n, w_in)) = self.weight.dims2() else {
            return Ok(None);
        };
        let fast = x.device().is_cpu()
            && self.weight.device().is_cpu()
            && (1..=MAX_FAST_ROWS).contains(&m)
            && w_in == k
            && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && (self.weight.dtype() == DType::F32 || simd::available());
        if !fast {
            return Ok(None);
        }
        // x as (M, K) f32, converted once; the bias as (N,) f32. Both tiny next to W.
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let b32 = match &self.bias {
            Some(b) if b.dims() == [n] => Some(b.to_dtype(DType::F32)?.contiguous()?),
            Some(_) => return Ok(None), // another shape broadcasts: candle's business
            None => None,
        };
        let (x_store, x_layout) = x32.storage_and_layout();
        let (w_store, w_layout) = self.weight.storage_and_layout();
        let b_store = b32.as_ref().map(|b| b.storage_and_layout());
        let xs = match (&*x_store, x_layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => &v[start..end],
            _ => return Ok(None),
        };
        let bias = match &b_store {
            Some((store, layout)) => match (&**store, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Some(&v[start..end]),
                _ => return Ok(None),
            },
            None => None,
        };
        let Some((w0, w1)) = w_layout.contiguous_offsets() else {
            return Ok(None); // a strided weight view: gemm handles it
        };
        let w = match &*w_store {
            Storage::Cpu(CpuStorage::F32(v)) => WeightRows::F32(&v[w0..w1]),
            // SAFETY: half's `f16` is `#[repr(transparent)]` over `u16`.
            Storage::Cpu(CpuStorage::F16(v)) => WeightRows::F16(unsafe { as_bits(&v[w0..w1]) }),
            // SAFETY: half's `bf16` is `#[repr(transparent)]` over `u16`.
            Storage::Cpu(CpuStorage::BF16(v)) => WeightRows::BF16(unsafe { as_bits(&v[w0..w1]) }),
            _ => return Ok(None),
        };

        // y (M, N), row-major. A call of `work` fills columns `rows` (= weight rows) of every row.
        let mut y = vec![0f32; m * n];
        let out = SharedOut(y.as_mut_ptr());
        let work = |rows: Range<usize>| {
            let (j0, bias) = (rows.start, bias.map(|b| &b[rows.clone()]));
            let put = |r: usize, dots: &[f32]| {
                let b = bias.map_or(0.0, |b| b[r]);
                for (i, d) in dots.iter().enumerate() {
                    // SAFETY: i < M and j0 + r < N, so the index is inside y's M·N elements;
                    // column j0 + r belongs to this call's `rows` alone, so no other thread
                    // writes or reads it, and `y` outlives `pool::run`, which returns only once
                    // every call has finished.
                    unsafe { out.write(i * n + j0 + r, d + b) };
                }
            };
            w.dot_rows(xs, m, k, rows, put);
        };
        if m * n * k < MIN_PARALLEL_WORK {
            work(0..n);
        } else {
            // Chunks of ≥ 16 rows, ~8 per thread, so a slow thread's share can be taken over.
            let chunk = n.div_ceil(pool::threads() * 8).max(16);
            pool::run(n.div_ceil(chunk), &|c| {
                work(c * chunk..n.min((c + 1) * chunk))
            });
        }
        drop((x_store, w_store, b_store));

        let mut shape = x.dims().to_vec();
        shape[lead.len()] = n;
        let y = Tensor::from_vec(y, shape, x.device())?;
        Ok(Some(y.to_dtype(x.dtype())?))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_few_rows(x)? {
            Some(y) => Ok(y),
            None => self.forward_matmul(x),
        }
    }
}

/// The output buffer, written by several threads at disjoint indices.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// # Safety
    /// `i` must be inside the live buffer, and no other thread may access element `i` meanwhile.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(i) = v };
    }
}

// SAFETY: the pointer is only written through `write`, whose callers keep threads on disjoint
// elements of a buffer that outlives them.
unsafe impl Sync for SharedOut {}
// SAFETY: as for `Sync`.
unsafe impl Send for SharedOut {}

/// # Safety
/// `T` must be a `#[repr(transparent)]` wrapper of `u16`.
unsafe fn as_bits<T>(v: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: same length, size, alignment and bit validity (the caller's promise), same borrow.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) }
}

/// A weight matrix (N, K), row-major, in its stored dtype (halves as their bits).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // halves never get here off x86
enum WeightRows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl WeightRows<'_> {
    /// For each weight row j in `rows`, its dots with the M rows of `x` (M, K), handed over as
    /// `put(j - rows.start, dots)`.
    fn dot_rows(
        self,
        x: &[f32],
        m: usize,
        k: usize,
        rows: Range<usize>,
        put: impl FnMut(usize, &[f32]),
    ) {
        let span = rows.start * k..rows.end * k;
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: the CPU has AVX2, FMA and F16C (just checked); x holds M·K floats and each
            // weight slice whole rows of K, as the kernels require.
            unsafe {
                match self {
                    WeightRows::F32(w) => simd::dot_rows::<simd::F32, _>(x, m, &w[span], k, put),
                    WeightRows::F16(w) => simd::dot_rows::<simd::F16, _>(x, m, &w[span], k, put),
                    WeightRows::BF16(w) => simd::dot_rows::<simd::BF16, _>(x, m, &w[span], k, put),
                }
            }
            return;
        }
        match self {
            WeightRows::F32(w) => portable::dot_rows(x, m, &w[span], k, put),
            _ => unreachable!("half weights take the fast path only with AVX2 and F16C"),
        }
    }
}

/// Plain Rust the compiler can vectorise: f32 weights without AVX2, and off x86.
mod portable {
    /// See [`super::WeightRows::dot_rows`]; `w` holds whole rows of `k` floats.
    pub(super) fn dot_rows(
        x: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        mut put: impl FnMut(usize, &[f32]),
    ) {
        let mut dots = [0f32; super::MAX_FAST_ROWS];
        for (r, w_row) in w.chunks_exact(k).enumerate() {
            // The weight row (a few KB) stays in L1 while the M rows of x pass over it.
            for (d, x_row) in dots.iter_mut().zip(x.chunks_exact(k)) {
                *d = dot(x_row, w_row);
            }
            put(r, &dots[..m]);
        }
    }

    /// Eight independent partial sums, so the additions need not wait on each other.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a8
            .remainder()
            .iter()
            .zip(b8.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (a, b) in a8.zip(b8) {
            for ((acc, a), b) in acc.iter_mut().zip(a).zip(b) {
                *acc += a * b;
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// AVX2 + FMA kernels, with F16C to widen half-precision weights.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Whether the kernels may run (std caches the CPUID answer).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// How to load 8 consecutive weights of one stored dtype as 8 f32 lanes.
    pub(super) trait Load8 {
        type Elem: Copy;
        /// # Safety
        /// `p` must point at 8 readable elements; the CPU must have AVX2 and F16C.
        unsafe fn load8(p: *const Self::Elem) -> __m256;
        /// One weight, for the last `K % 8` of a row. Needs F16C for f16.
        fn to_f32(v: Self::Elem) -> f32;
    }

    pub(super) struct F32;
    pub(super) struct F16;
    pub(super) struct BF16;

    impl Load8 for F32 {
        type Elem = f32;
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: 8 floats readable at p (the caller's promise); loadu needs no alignment.
            unsafe { _mm256_loadu_ps(p) }
        }
        fn to_f32(v: f32) -> f32 {
            v
        }
    }

    impl Load8 for F16 {
        type Elem = u16;
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8(p: *const u16) -> __m256 {
            // SAFETY: 8 halves = 16 bytes readable at p; loadu needs no alignment.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        fn to_f32(v: u16) -> f32 {
            // SAFETY: kernels run only where `available()` (F16C included) holds.
            unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v as i32))) }
        }
    }

    impl Load8 for BF16 {
        type Elem = u16;
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load8(p: *const u16) -> __m256 {
            // bf16 is the top half of an f32: widen each u16 to 32 bits and shift it up.
            // SAFETY: 8 u16 = 16 bytes readable at p; loadu needs no alignment.
            unsafe {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
        }
        fn to_f32(v: u16) -> f32 {
            f32::from_bits((v as u32) << 16)
        }
    }

    /// See [`super::WeightRows::dot_rows`]: the kernel compiled for this M.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    pub(super) unsafe fn dot_rows<L: Load8, P: FnMut(usize, &[f32])>(
        x: &[f32],
        m: usize,
        w: &[L::Elem],
        k: usize,
        put: P,
    ) {
        assert!(k > 0 && x.len() == m * k && w.len() % k == 0);
        // Past ~5 FMAs per 4 weight bytes (f32: M ≥ 5, halves: M ≥ 3) the out-of-order window
        // no longer reaches far enough ahead in W to keep DRAM busy, so prefetch; below that,
        // prefetching only costs (lm_head on Zen 4: M=8 -35% time, M=1 +15%).
        let prefetch = m * 4 >= 5 * size_of::<L::Elem>();
        // SAFETY: the caller's promise, and the slice lengths just checked.
        unsafe {
            match m {
                1 => kernel::<L, P, 1>(x, w, k, prefetch, put),
                2 => kernel::<L, P, 2>(x, w, k, prefetch, put),
                3 => kernel::<L, P, 3>(x, w, k, prefetch, put),
                4 => kernel::<L, P, 4>(x, w, k, prefetch, put),
                5 => kernel::<L, P, 5>(x, w, k, prefetch, put),
                6 => kernel::<L, P, 6>(x, w, k, prefetch, put),
                7 => kernel::<L, P, 7>(x, w, k, prefetch, put),
                8 => kernel::<L, P, 8>(x, w, k, prefetch, put),
                _ => unreachable!("at most MAX_FAST_ROWS rows"),
            }
        }
    }

    /// Streams the weight rows once each: a row is read from memory by the first group of up
    /// to 4 rows of x and from L1 by the next (8 accumulators fit the 16 ymm registers).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<L: Load8, P: FnMut(usize, &[f32]), const M: usize>(
        x: &[f32],
        w: &[L::Elem],
        k: usize,
        prefetch: bool,
        mut put: P,
    ) {
        for (r, w_row) in w.chunks_exact(k).enumerate() {
            let mut dots = [0f32; M];
            for g in (0..M).step_by(4) {
                let (x, d) = (&x[g * k..], &mut dots[g..]);
                let prefetch = prefetch && g == 0;
                // SAFETY: the group's x rows and the weight row are whole rows of K (checked
                // by `dot_rows`); the CPU features are this function's own.
                unsafe {
                    match (M - g).min(4) {
                        1 => d[..1].copy_from_slice(&dots_of::<L, 1>(x, w_row, prefetch)),
                        2 => d[..2].copy_from_slice(&dots_of::<L, 2>(x, w_row, prefetch)),
                        3 => d[..3].copy_from_slice(&dots_of::<L, 3>(x, w_row, prefetch)),
                        _ => d[..4].copy_from_slice(&dots_of::<L, 4>(x, w_row, prefetch)),
                    }
                }
            }
            put(r, &dots);
        }
    }

    /// The dots of one weight row (K) with the first G rows of `x` (G, K). Two accumulators per
    /// x row keep 2·G FMA chains in flight, and each x row is summed in the same order whatever
    /// M is, so a row's result does not depend on what else is in the batch.
    ///
    /// # Safety
    /// `x` must hold at least G·K floats, with K = `w.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots_of<L: Load8, const G: usize>(
        x: &[f32],
        w: &[L::Elem],
        prefetch: bool,
    ) -> [f32; G] {
        const PREFETCH_BYTES: usize = 2048;
        let k = w.len();
        let (k16, k8) = (k / 16 * 16, k / 8 * 8); // 16 lanes at a time, then 8, then 1 by 1
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        // SAFETY: weight offsets read are < K, and x offsets i·K + (< K) with i < G, inside the
        // caller's G·K floats. Prefetches may point past W: they never fault.
        unsafe {
            let mut c = 0;
            while c < k16 {
                if prefetch {
                    _mm_prefetch::<_MM_HINT_T0>(
                        wp.add(c).cast::<i8>().wrapping_add(PREFETCH_BYTES),
                    );
                }
                for (a, acc_a) in [0, 8].into_iter().zip(0..2) {
                    let wv = L::load8(wp.add(c + a));
                    for (i, acc_i) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(i * k + c + a));
                        acc_i[acc_a] = _mm256_fmadd_ps(wv, xv, acc_i[acc_a]);
                    }
                }
                c += 16;
            }
            if c < k8 {
                let wv = L::load8(wp.add(c));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    acc_i[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i * k + c)), acc_i[0]);
                }
            }
        }
        let mut dots = [0f32; G];
        for (i, (d, [a0, a1])) in dots.iter_mut().zip(acc).enumerate() {
            *d = hsum(_mm256_add_ps(a0, a1));
            for c in k8..k {
                *d += x[i * k + c] * L::to_f32(w[c]);
            }
        }
        dots
    }

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Off x86 there are no explicit kernels: f32 takes the portable path, half weights candle's.
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub(super) fn available() -> bool {
        false
    }
}

/// A small thread pool for the fast path: the caller works too, chunks are claimed one at a
/// time, and the caller waits only for chunks already claimed, never for a worker to wake.
///
/// Why not rayon or candle's `barrier_pool`: a decode step makes ~50 of these calls, 0.05-1 ms
/// each. Waking sleeping threads on every call (a futex, an IPI in a VM) cost ~25% of decode
/// with rayon, so workers here spin briefly between calls. But a barrier that waits for *every*
/// worker (candle's) collapses on a busy machine: a descheduled worker stalls each call for a
/// time slice (decode 3-5x slower with a build running). Here the caller just takes the chunks.
mod pool {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// After a job, workers spin this long for the next (decode's gaps between layers are
    /// shorter), then yield their core to other threads (candle's own, during attention) for a
    /// while, then sleep.
    const SPIN: Duration = Duration::from_micros(100);
    const YIELD: Duration = Duration::from_millis(2);

    /// Run `f(c)` for each chunk `c < n`. The lifetime of `f` is erased: see `run`.
    #[derive(Clone, Copy)]
    struct Job {
        f: *const (dyn Fn(usize) + Sync),
        n: usize,
    }
    // SAFETY: `f` is `Sync`, and `run` keeps it alive while any worker can reach it.
    unsafe impl Send for Job {}

    struct Slot {
        /// The job workers may join; `None` once its caller has stopped taking joiners.
        job: Option<Job>,
        sleepers: usize,
    }

    struct Pool {
        workers: usize,
        slot: Mutex<Slot>,
        wake: Condvar,
        /// Bumped (under `slot`'s lock) for each job, for spinning workers to see.
        epoch: AtomicUsize,
        /// The next chunk to claim.
        next: AtomicUsize,
        /// Workers inside the current job.
        active: AtomicUsize,
        /// A chunk panicked on a worker: the output is incomplete.
        panicked: AtomicBool,
    }

    fn pool() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            // candle's thread count: RAYON_NUM_THREADS, else the physical cores.
            let workers = candle_core::utils::get_num_threads().saturating_sub(1);
            let pool: &'static Pool = Box::leak(Box::new(Pool {
                workers,
                slot: Mutex::new(Slot {
                    job: None,
                    sleepers: 0,
                }),
                wake: Condvar::new(),
                epoch: AtomicUsize::new(0),
                next: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
            }));
            for i in 0..workers {
                std::thread::Builder::new()
                    .name(format!("gpt2-linear-{i}"))
                    .spawn(move || pool.work())
                    .expect("cannot spawn a linear-layer thread");
            }
            pool
        })
    }

    /// Threads that share a job, the caller included.
    pub(super) fn threads() -> usize {
        pool().workers + 1
    }

    /// Runs `f(c)` for each chunk `c` in `0..n`, on the caller and on any worker that joins.
    /// Callers take turns (the lock below): chunks of different calls never mix.
    pub(super) fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
        static TURN: Mutex<()> = Mutex::new(());
        let pool = pool();
        if pool.workers == 0 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let f: *const (dyn Fn(usize) + Sync + '_) = f;
        // SAFETY (lifetime erasure only): workers dereference `f` only between joining (while
        // `job` is set, counted in `active` under the lock) and leaving (`active` decremented
        // after their last call). `Withdraw` clears `job` under that lock, then waits for
        // `active` to drain, before this function returns or unwinds: `f` outlives every use.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        pool.next.store(0, Relaxed); // joiners see it through the lock below
        {
            let mut slot = pool.slot.lock().unwrap();
            slot.job = Some(Job { f, n });
            pool.epoch.fetch_add(1, Relaxed);
            if slot.sleepers > 0 {
                pool.wake.notify_all();
            }
        }
        let withdraw = Withdraw(pool);
        // SAFETY: `f` is the caller's reference, alive for this whole call.
        pool.claim(unsafe { &*f }, n);
        drop(withdraw);
        if pool.panicked.swap(false, Relaxed) {
            panic!("a linear-layer thread panicked");
        }
    }

    /// Ends the current job, also if a chunk panics on the caller: once dropped, no worker is
    /// inside it or can join it.
    struct Withdraw(&'static Pool);

    impl Drop for Withdraw {
        fn drop(&mut self) {
            self.0.slot.lock().unwrap().job = None;
            // Workers are finishing their last chunk; one may have been preempted on this core.
            let mut spins = 0;
            while self.0.active.load(Acquire) != 0 {
                if spins < 10_000 {
                    std::hint::spin_loop();
                    spins += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    impl Pool {
        fn claim(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
            loop {
                let c = self.next.fetch_add(1, Relaxed);
                if c >= n {
                    return;
                }
                f(c);
            }
        }

        fn work(&self) {
            let mut seen = 0;
            loop {
                let job = self.join(&mut seen);
                let leave = Leave(self);
                // SAFETY: joined while `job` was set, so `f` lives until `leave` drops (see `run`).
                self.claim(unsafe { &*job.f }, job.n);
                drop(leave);
            }
        }

        /// Waits for a job newer than `seen` and joins it (counted in `active`).
        fn join(&self, seen: &mut usize) -> Job {
            let idle = Instant::now();
            loop {
                if self.epoch.load(Relaxed) != *seen {
                    let slot = self.slot.lock().unwrap();
                    *seen = self.epoch.load(Relaxed);
                    if let Some(job) = slot.job {
                        self.active.fetch_add(1, Relaxed); // under the lock: `Withdraw` sees it
                        return job;
                    }
                    continue; // that job is over already
                }
                let t = idle.elapsed();
                if t < SPIN {
                    std::hint::spin_loop();
                } else if t < YIELD {
                    std::thread::yield_now();
                } else {
                    let mut slot = self.slot.lock().unwrap();
                    if self.epoch.load(Relaxed) == *seen {
                        slot.sleepers += 1;
                        slot = self.wake.wait(slot).unwrap();
                        slot.sleepers -= 1;
                    }
                }
            }
        }
    }

    /// Leaves the job, even when a chunk panics, so `Withdraw` never waits forever.
    struct Leave<'a>(&'a Pool);

    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.panicked.store(true, Relaxed);
            }
            self.0.active.fetch_sub(1, Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Seeded uniform(-1, 1) values, so failures reproduce.
    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// max |a - b| / max |b|, in f32.
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

    /// Rows of x: 1-8 take the fast path, 9 and 17 candle's matmul.
    const ROWS: [usize; 7] = [1, 2, 3, 5, 8, 9, 17];
    /// (in, out): odd sizes (every loop of the kernels, on one thread: 37 = 2·16 + 5 and
    /// 61 = 3·16 + 8 + 5), and GPT-2's MLP (on the pool's threads).
    const SIZES: [(usize, usize); 3] = [(37, 101), (61, 67), (768, 3072)];

    /// f32: the fast path agrees with candle_nn to the rounding of a differently ordered f32 sum;
    /// the fallback *is* candle_nn, bit for bit.
    #[test]
    fn f32_matches_candle_nn() -> Result<()> {
        for (seed, &(k, n)) in SIZES.iter().enumerate() {
            let w = rand(&[n, k], seed as u64)?;
            for bias in [None, Some(rand(&[n], 100 + seed as u64)?)] {
                let ours = Linear::new(w.clone(), bias.clone());
                let theirs = candle_nn::Linear::new(w.clone(), bias);
                for m in ROWS {
                    let x = rand(&[m, k], 1000 + m as u64)?;
                    let (got, want) = (ours.forward(&x)?, theirs.forward(&x)?);
                    assert_eq!(got.dims(), &[m, n]);
                    let err = rel_err(&got, &want)?;
                    let tol = if m > MAX_FAST_ROWS { 0.0 } else { 1e-5 };
                    assert!(err <= tol, "m={m} k={k} n={n}: {err}");
                }
            }
        }
        Ok(())
    }

    /// A row's result is the same, bit for bit, whatever else is in the batch (so batched and
    /// single-sample generation agree exactly).
    #[test]
    fn rows_do_not_depend_on_the_batch() -> Result<()> {
        for (k, n) in SIZES {
            let layer = Linear::new(rand(&[n, k], 1)?, Some(rand(&[n], 2)?));
            let x = rand(&[MAX_FAST_ROWS, k], 3)?;
            let all = layer.forward(&x)?;
            for m in 1..=MAX_FAST_ROWS {
                let some = layer.forward(&x.narrow(0, 0, m)?)?;
                let diff = (&some - &all.narrow(0, 0, m)?)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "m={m} k={k} n={n}");
            }
        }
        Ok(())
    }

    /// (B, T, C) inputs, contiguous, strided (copied first) or offset (the last position, as
    /// the LM head sees it), and a strided weight view (which goes to candle).
    #[test]
    fn batched_strided_and_offset_inputs() -> Result<()> {
        let (k, n) = (37, 101);
        let (w, b) = (rand(&[n, k], 1)?, rand(&[n], 2)?);
        let ours = Linear::new(w.clone(), Some(b.clone()));
        let theirs = candle_nn::Linear::new(w, Some(b));
        let check = |x: &Tensor| -> Result<()> {
            let (got, want) = (ours.forward(x)?, theirs.forward(x)?);
            assert_eq!(got.dims(), want.dims());
            assert!(rel_err(&got, &want)? <= 1e-5, "{:?}", x.dims());
            Ok(())
        };
        for (b, t) in [(1, 1), (2, 3), (4, 2), (3, 3), (1, 17)] {
            check(&rand(&[b, t, k], (b * 10 + t) as u64)?)?;
            check(&rand(&[t, b, k], 7)?.transpose(0, 1)?)?;
        }
        check(&rand(&[1, 5, k], 9)?.narrow(1, 4, 1)?)?;
        let w_view = rand(&[k, n], 3)?.t()?; // (out, in), not contiguous
        let x = rand(&[2, k], 4)?;
        let want = x.matmul(&rand(&[k, n], 3)?)?;
        assert!(rel_err(&Linear::new(w_view, None).forward(&x)?, &want)? <= 1e-5);
        Ok(())
    }

    /// f16/bf16 weights, f32 activations: widening a half is exact, so the result is the f32
    /// product with the rounded weights, to the same 1e-5, on the fast path and the fallback
    /// (which casts the weights to f32 per call) alike.
    #[test]
    fn half_weights_f32_activations() -> Result<()> {
        for dtype in [DType::F16, DType::BF16] {
            for (seed, &(k, n)) in SIZES.iter().enumerate() {
                let w = rand(&[n, k], seed as u64)?.to_dtype(dtype)?;
                let b = rand(&[n], 50)?.to_dtype(dtype)?;
                let ours = Linear::new(w.clone(), Some(b.clone()));
                let exact =
                    candle_nn::Linear::new(w.to_dtype(DType::F32)?, Some(b.to_dtype(DType::F32)?));
                for m in ROWS {
                    let x = rand(&[m, k], 1000 + m as u64)?;
                    let got = ours.forward(&x)?;
                    assert_eq!(got.dtype(), DType::F32);
                    let err = rel_err(&got, &exact.forward(&x)?)?;
                    assert!(err <= 1e-5, "{dtype:?} m={m} k={k} n={n}: {err}");
                }
            }
        }
        Ok(())
    }

    /// All-half layers (`--dtype f16`/`bf16`): the fast path accumulates in f32 and rounds once,
    /// so it is within half an output ulp (relative 2⁻¹¹ for f16, 2⁻⁸ for bf16) of the exact
    /// product of the rounded inputs. candle's matmul (the fallback, M > 8) rounds twice (the
    /// product, then the sum with the bias): up to twice that (measured: 1.4x f16, 1.5x bf16).
    #[test]
    fn half_weights_half_activations() -> Result<()> {
        for (dtype, half_ulp) in [(DType::F16, 2f32.powi(-11)), (DType::BF16, 2f32.powi(-8))] {
            let (k, n) = (768, 3072);
            let w = rand(&[n, k], 5)?.to_dtype(dtype)?;
            let b = rand(&[n], 6)?.to_dtype(dtype)?;
            let ours = Linear::new(w.clone(), Some(b.clone()));
            let exact =
                candle_nn::Linear::new(w.to_dtype(DType::F32)?, Some(b.to_dtype(DType::F32)?));
            for m in ROWS {
                let x = rand(&[1, m, k], m as u64)?.to_dtype(dtype)?;
                let got = ours.forward(&x)?;
                assert_eq!((got.dtype(), got.dims()), (dtype, &[1, m, n][..]));
                let err = rel_err(&got, &exact.forward(&x.to_dtype(DType::F32)?)?)?;
                let fast = m <= MAX_FAST_ROWS && simd::available();
                let tol = if fast { half_ulp } else { 2.0 * half_ulp };
                assert!(err <= tol, "{dtype:?} m={m}: {err}");
            }
        }
        Ok(())
    }

    /// The portable kernel (f32 without AVX2, and off x86) against candle.
    #[test]
    fn portable_kernel_matches() -> Result<()> {
        let (k, n, m) = (37, 101, 3);
        let (w, x) = (rand(&[n, k], 11)?, rand(&[m, k], 12)?);
        let want = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let (w, x) = (
            w.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut got = vec![0f32; m * n];
        portable::dot_rows(&x, m, &w, k, |r, dots| {
            dots.iter()
                .enumerate()
                .for_each(|(i, d)| got[i * n + r] = *d)
        });
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-5, "{err}");
        Ok(())
    }

    /// Threads sharing one layer (and so the pool) each get their own, correct result.
    #[test]
    fn concurrent_callers() -> Result<()> {
        let (k, n) = (768, 3072);
        let layer = Linear::new(rand(&[n, k], 21)?, Some(rand(&[n], 22)?));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let layer = &layer;
                    s.spawn(move || -> Result<()> {
                        let x = rand(&[1, k], 30 + t)?;
                        let want =
                            candle_nn::Linear::new(layer.weight().clone(), layer.bias.clone())
                                .forward(&x)?;
                        for _ in 0..5 {
                            assert!(rel_err(&layer.forward(&x)?, &want)? <= 1e-5);
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap())
        })
    }

    /// Speed against candle on GPT-2-small's decode shapes, weights cold as in decode (more
    /// copies than the L3 holds, taken in turn). Not a check: run with
    /// `cargo test --release --lib linear::tests::speed -- --ignored --nocapture` (M=rows).
    #[test]
    #[ignore]
    fn speed() -> Result<()> {
        use std::time::Instant;
        let m: usize = std::env::var("M")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let shapes = [
            ("c_attn", 2304, 768),
            ("attn.c_proj", 768, 768),
            ("c_fc", 3072, 768),
            ("mlp.c_proj", 768, 3072),
            ("lm_head", 50257, 768),
        ];
        for (name, n, k) in shapes {
            for dtype in [DType::F32, DType::F16] {
                let bytes = n * k * dtype.size_in_bytes();
                let copies = (256 << 20) / bytes + 1;
                let ws = (0..copies)
                    .map(|i| rand(&[n, k], i as u64)?.to_dtype(dtype))
                    .collect::<Result<Vec<_>>>()?;
                let x = rand(&[1, m, k], 0)?.to_dtype(dtype)?;
                let best = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<f64> {
                    let mut best = f64::MAX;
                    for i in 0..3 * copies.max(10) {
                        let t = Instant::now();
                        f(&ws[i % copies])?;
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    Ok(best)
                };
                let ours = best(&|w| Linear::new(w.clone(), None).forward(&x))?;
                let theirs = best(&|w| candle_nn::Linear::new(w.clone(), None).forward(&x))?;
                let gbs = |t: f64| bytes as f64 / t / 1e9;
                println!(
                    "{name:>11} {dtype:?} M={m}: ours {:7.1} us {:5.1} GB/s, candle {:7.1} us {:5.1} GB/s",
                    ours * 1e6, gbs(ours), theirs * 1e6, gbs(theirs)
                );
            }
        }
        Ok(())
    }
}
