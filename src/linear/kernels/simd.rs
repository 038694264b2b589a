//! The x86-64 kernels behind [`super::dot_rows`] and [`super::axpy_rows`]: AVX2 + FMA, F16C
//! for halves, chosen at run time ([`available`]).

use std::arch::x86_64::*;

/// Whether the kernels may run (std caches the CPUID answer).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// How to load 8 consecutive weights of one stored type as 8 f32 lanes.
pub(crate) trait Load8 {
    type Elem: Copy;
    /// # Safety
    /// `p` must point at 8 readable elements; the CPU must have AVX2 and F16C.
    unsafe fn load8(p: *const Self::Elem) -> __m256;
    /// One weight, for the tails.
    fn to_f32(v: Self::Elem) -> f32;
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct Bf16;

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

impl Load8 for Bf16 {
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

/// See [`super::dot_rows`]: the kernel compiled for this M.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x` holds M·K floats and `w` whole rows of K.
pub(crate) unsafe fn dot_rows<L: Load8, P: FnMut(usize, &[f32])>(
    x: &[f32],
    m: usize,
    w: &[L::Elem],
    k: usize,
    put: P,
) {
    // Past ~5 FMAs per 4 weight bytes (f32: M ≥ 5, halves: M ≥ 3) the out-of-order window
    // no longer reaches far enough ahead in W to keep DRAM busy, so prefetch; below that,
    // prefetching only costs (lm_head on Zen 4: M=8 -35% time, M=1 +15%).
    let prefetch = m * 4 >= 5 * size_of::<L::Elem>();
    // SAFETY: the caller's promise.
    unsafe {
        match m {
            1 => dot_kernel::<L, P, 1>(x, w, k, prefetch, put),
            2 => dot_kernel::<L, P, 2>(x, w, k, prefetch, put),
            3 => dot_kernel::<L, P, 3>(x, w, k, prefetch, put),
            4 => dot_kernel::<L, P, 4>(x, w, k, prefetch, put),
            5 => dot_kernel::<L, P, 5>(x, w, k, prefetch, put),
            6 => dot_kernel::<L, P, 6>(x, w, k, prefetch, put),
            7 => dot_kernel::<L, P, 7>(x, w, k, prefetch, put),
            _ => dot_kernel::<L, P, 8>(x, w, k, prefetch, put),
        }
    }
}

/// Streams the weight rows once each: a row is read from memory by the first group of up
/// to 4 rows of x and from L1 by the next (8 accumulators fit the 16 ymm registers).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_kernel<L: Load8, P: FnMut(usize, &[f32]), const M: usize>(
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
            // SAFETY: the group's x rows and the weight row are whole rows of K (the
            // caller's promise); the CPU features are this function's own.
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
/// M is.
///
/// # Safety
/// `x` must hold at least G·K floats, with K = `w.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_of<L: Load8, const G: usize>(x: &[f32], w: &[L::Elem], prefetch: bool) -> [f32; G] {
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
                _mm_prefetch::<_MM_HINT_T0>(wp.add(c).cast::<i8>().wrapping_add(PREFETCH_BYTES));
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

/// See [`super::axpy_rows`]; `w` holds the block's rows (k0.., each N long).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x` holds M rows of stride `k` with
/// `k0 + w.len() / n <= k`, and `y` holds M·N floats.
pub(crate) unsafe fn axpy_rows<L: Load8>(
    w: &[L::Elem],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    k0: usize,
    y: &mut [f32],
) {
    let rows = w.len() / n;
    let mut r = 0;
    // Eight weight rows at a time: each y vector is loaded and stored once per eight FMAs
    // (8 weight vectors, y and a broadcast fill 10 of the 16 ymm registers). Four at a time
    // decoded GPT-2 small 12-16 % slower in f32 on Zen 4 (docs/PERF.md, 2026-12-08).
    while r + 8 <= rows {
        // SAFETY: rows r..r+8 exist; the rest is the caller's promise.
        unsafe { axpy_group::<L, 8>(w, x, m, k, n, k0 + r, r, y) };
        r += 8;
    }
    while r + 4 <= rows {
        // SAFETY: as above, four rows.
        unsafe { axpy_group::<L, 4>(w, x, m, k, n, k0 + r, r, y) };
        r += 4;
    }
    while r < rows {
        // SAFETY: as above, one row.
        unsafe { axpy_group::<L, 1>(w, x, m, k, n, k0 + r, r, y) };
        r += 1;
    }
}

/// `y[i, :] += Σ_g x[i, kx + g] · w[r + g, :]` for `g < G`, every i < m: in that order, so
/// each output sums its weight rows in row order whatever M is.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_group<L: Load8, const G: usize>(
    w: &[L::Elem],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    kx: usize,
    r: usize,
    y: &mut [f32],
) {
    let n8 = n / 8 * 8;
    let mut a = [[0f32; G]; super::MAX_FAST_ROWS];
    for (i, a) in a.iter_mut().enumerate().take(m) {
        a.copy_from_slice(&x[i * k + kx..i * k + kx + G]);
    }
    let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
    // SAFETY: weight offsets (r + g)·N + j < (r + G)·N <= w.len(); y offsets i·N + j < M·N.
    unsafe {
        let mut j = 0;
        while j < n8 {
            let mut wv = [_mm256_setzero_ps(); G];
            for (g, wv) in wv.iter_mut().enumerate() {
                *wv = L::load8(wp.add((r + g) * n + j));
            }
            for (i, a) in a.iter().enumerate().take(m) {
                let p = yp.add(i * n + j);
                let mut yv = _mm256_loadu_ps(p);
                for g in 0..G {
                    yv = _mm256_fmadd_ps(wv[g], _mm256_set1_ps(a[g]), yv);
                }
                _mm256_storeu_ps(p, yv);
            }
            j += 8;
        }
    }
    for j in n8..n {
        for (i, a) in a.iter().enumerate().take(m) {
            let mut v = y[i * n + j];
            for (g, a) in a.iter().enumerate() {
                v = a.mul_add(L::to_f32(w[(r + g) * n + j]), v);
            }
            y[i * n + j] = v;
        }
    }
}

/// The 8×8 block at `a` (row stride `sa`), widened to f32, written transposed at `o` (row
/// stride `so`).
///
/// # Safety
/// The CPU must have AVX2 and F16C; `a` must hold 7 rows of `sa` and 8 more elements;
/// 8 rows of 8 floats must be writable at `o`.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn transpose8<L: Load8>(a: &[L::Elem], sa: usize, o: *mut f32, so: usize) {
    debug_assert!(a.len() >= 7 * sa + 8);
    // SAFETY: the caller's promise.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| L::load8(a.as_ptr().add(i * sa)));
        // Pairs of rows interleaved, then quads, then the 128-bit halves swapped.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let c = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, c) in c.into_iter().enumerate() {
            _mm256_storeu_ps(o.add(i * so), c);
        }
    }
}

/// The sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
