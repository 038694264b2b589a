//! The dot products behind [`super::Linear`]'s decode path: for each weight row, its dots with a
//! few activation rows. AVX2 + FMA kernels (F16C widens half-precision weights) where the CPU
//! has them, and plain Rust the compiler vectorises everywhere else (no AVX2, aarch64).

use std::ops::Range;

use super::MAX_FAST_ROWS;

/// A weight matrix (N, K), row-major, in its stored dtype (halves as their bits).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // halves never get here off x86
pub(super) enum WeightRows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl WeightRows<'_> {
    /// For each weight row j in `rows`, its dots with the M rows of `x` (M, K), handed over as
    /// `put(j - rows.start, dots)`.
    pub(super) fn dot_rows(
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
pub(super) mod portable {
    /// See [`super::WeightRows::dot_rows`]; `w` holds whole rows of `k` floats.
    pub(in crate::linear) fn dot_rows(
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
pub(super) mod simd {
    use std::arch::x86_64::*;

    /// Whether the kernels may run (std caches the CPUID answer).
    pub(crate) fn available() -> bool {
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
        /// One weight, for the last `K % 8` of a row.
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
            half::f16::from_bits(v).to_f32()
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
pub(super) mod simd {
    pub(crate) fn available() -> bool {
        false
    }
}
