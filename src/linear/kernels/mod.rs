//! The products behind [`super::Linear`]'s decode path, where a few activation rows meet every
//! weight once and memory bandwidth, not arithmetic, sets the speed:
//!
//! - [`dot_rows`]: weights (N, K), row-major (`wte` as the LM head): for each weight row, its dots
//!   with the rows of `x`;
//! - [`axpy_rows`]: weights (K, N), row-major (GPT-2's `Conv1D`, as stored, read straight from
//!   the memory-mapped file): `y += x[:, k] · W[k, :]` over a block of weight rows.
//!
//! Both read each weight once, in memory order, accumulate in f32, and sum every output in an
//! order that does not depend on how many rows `x` has (so batched and single-sample generation
//! agree bit for bit). f16 and bf16 weights are widened in registers. AVX2 + FMA (+ F16C) kernels
//! where the CPU has them ([`simd`]), NEON on aarch64 (`neon.rs`), plain Rust the compiler
//! vectorises everywhere else ([`portable`]), all tested against the same references.

use std::ops::Range;

use super::MAX_FAST_ROWS;

/// A weight matrix's elements in their stored type (halves as their bits).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

impl<'a> Elems<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::F16(w) | Self::Bf16(w) => w.len(),
        }
    }

    /// Elements `r`, in their stored type.
    pub(crate) fn slice(&self, r: Range<usize>) -> Elems<'a> {
        match *self {
            Self::F32(w) => Self::F32(&w[r]),
            Self::F16(w) => Self::F16(&w[r]),
            Self::Bf16(w) => Self::Bf16(&w[r]),
        }
    }

    /// The 8 × 8 block at element `at` (row stride `sa`), widened to f32, written transposed at
    /// `o` (row stride `so`).
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C ([`simd::available`]); `self` must hold 7 rows of `sa`
    /// and 8 more elements from `at`; 8 rows of 8 floats must be writable at `o`.
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn transpose8(&self, at: usize, sa: usize, o: *mut f32, so: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            match *self {
                Self::F32(a) => simd::transpose8::<simd::F32>(&a[at..], sa, o, so),
                Self::F16(a) => simd::transpose8::<simd::F16>(&a[at..], sa, o, so),
                Self::Bf16(a) => simd::transpose8::<simd::Bf16>(&a[at..], sa, o, so),
            }
        }
    }

    /// Elements `r`, as f32, into `out` (`out.len()` of them).
    pub(crate) fn widen(&self, r: Range<usize>, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            Self::F32(w) => out.copy_from_slice(&w[r]),
            Self::F16(w) => {
                let w: &[half::f16] = bytemuck::cast_slice(&w[r]);
                w.convert_to_f32_slice(out)
            }
            Self::Bf16(w) => {
                let w: &[half::bf16] = bytemuck::cast_slice(&w[r]);
                w.convert_to_f32_slice(out)
            }
        }
    }
}

/// For each weight row `j` in `rows` of `w` (N, K), its dots with the M rows of `x` (M, K),
/// handed over as `put(j - rows.start, dots)`.
pub(crate) fn dot_rows(
    w: Elems<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    rows: Range<usize>,
    put: impl FnMut(usize, &[f32]),
) {
    assert!(m <= MAX_FAST_ROWS && x.len() == m * k && rows.end * k <= w.len());
    let span = rows.start * k..rows.end * k;
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (just checked); x holds M·K floats and each
        // weight slice whole rows of K (asserted above).
        unsafe {
            match w {
                Elems::F32(w) => simd::dot_rows::<simd::F32, _>(x, m, &w[span], k, put),
                Elems::F16(w) => simd::dot_rows::<simd::F16, _>(x, m, &w[span], k, put),
                Elems::Bf16(w) => simd::dot_rows::<simd::Bf16, _>(x, m, &w[span], k, put),
            }
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    {
        match w {
            Elems::F32(w) => neon::dot_rows::<neon::F32, _>(x, m, &w[span], k, put),
            Elems::F16(w) => neon::dot_rows::<neon::F16, _>(x, m, &w[span], k, put),
            Elems::Bf16(w) => neon::dot_rows::<neon::Bf16, _>(x, m, &w[span], k, put),
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    portable::dot_rows(w, x, m, k, span, put)
}

/// `y (M, N) += x[:, ks] · w[ks, :]` for weight rows `ks` of `w` (K, N): x is (M, K) row-major
/// with row stride `k`.
pub(crate) fn axpy_rows(
    w: Elems<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ks: Range<usize>,
    y: &mut [f32],
) {
    assert!(m <= MAX_FAST_ROWS && x.len() == m * k && y.len() == m * n);
    assert!(ks.end <= k && ks.end * n <= w.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        let span = ks.start * n..ks.end * n;
        // SAFETY: the CPU has AVX2, FMA and F16C (just checked); the lengths are asserted above.
        unsafe {
            match w {
                Elems::F32(w) => simd::axpy_rows::<simd::F32>(&w[span], x, m, k, n, ks.start, y),
                Elems::F16(w) => simd::axpy_rows::<simd::F16>(&w[span], x, m, k, n, ks.start, y),
                Elems::Bf16(w) => simd::axpy_rows::<simd::Bf16>(&w[span], x, m, k, n, ks.start, y),
            }
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    {
        let span = ks.start * n..ks.end * n;
        match w {
            Elems::F32(w) => neon::axpy_rows::<neon::F32>(&w[span], x, m, k, n, ks.start, y),
            Elems::F16(w) => neon::axpy_rows::<neon::F16>(&w[span], x, m, k, n, ks.start, y),
            Elems::Bf16(w) => neon::axpy_rows::<neon::Bf16>(&w[span], x, m, k, n, ks.start, y),
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    portable::axpy_rows(w, x, m, k, n, ks, y)
}

/// `out[kk·stride + j0 + r] = a[r·k + kk]` as f32: `a` (R, K) row-major, in its stored type,
/// written transposed (and widened) into columns `j0..j0 + R` of a row-major f32 matrix of row
/// stride `stride`. Blocks of 64 × 64 are transposed 8 × 8 at a time into a stack buffer (halves
/// widened in the same registers), each source row read whole across the block, then copied
/// out a 256-byte row at a time. Why staged: GPT-2's strides are multiples of 2-4 KiB, so the 8
/// rows of an 8 × 8 block written straight into `out` (or 64 source rows revisited per 8 K)
/// share one L1 set and evict each other: 2.3-2.8 ns/element in `widen_speed`, against
/// ~0.6 staged.
///
/// # Safety
/// `out` must address a live buffer holding `(k - 1)·stride + j0 + R` floats whose columns
/// `j0..j0 + R` no other thread touches meanwhile.
pub(crate) unsafe fn transpose_into(
    a: Elems<'_>,
    r: usize,
    k: usize,
    out: crate::pool::SharedOut,
    stride: usize,
    j0: usize,
) {
    const B: usize = 8;
    /// The block's side: 64 × 64 f32 is 16 KiB, half of L1.
    const S: usize = 64;
    assert!(a.len() == r * k);
    #[cfg(target_arch = "x86_64")]
    let fast = simd::available();
    let mut tail = [0f32; B];
    let mut stage = [0f32; S * S];
    for rc in (0..r).step_by(S) {
        let w = S.min(r - rc);
        for kc in (0..k).step_by(S) {
            let h = S.min(k - kc);
            // stage (h, w), row stride S: stage[kk·S + i] = a[(rc + i)·k + kc + kk].
            for r0 in (0..w).step_by(B) {
                for kk0 in (0..h).step_by(B) {
                    #[cfg(target_arch = "x86_64")]
                    if fast && kk0 + B <= h && r0 + B <= w {
                        let at = (rc + r0) * k + kc + kk0;
                        let o = stage[kk0 * S + r0..].as_mut_ptr();
                        // SAFETY: the CPU has AVX2 and F16C; the block's 8 rows of 8 are
                        // inside `a`, and rows kk0.. of the stage hold columns r0 .. r0 + 8.
                        unsafe { a.transpose8(at, k, o, S) };
                        continue;
                    }
                    let cols = B.min(h - kk0);
                    for i in r0..w.min(r0 + B) {
                        let at = (rc + i) * k + kc + kk0;
                        a.widen(at..at + cols, &mut tail[..cols]);
                        for (c, v) in tail[..cols].iter().enumerate() {
                            stage[(kk0 + c) * S + i] = *v;
                        }
                    }
                }
            }
            for kk in 0..h {
                // SAFETY: the caller's promise: row kc + kk of `out` holds columns
                // j0 + rc .. j0 + rc + w, this call's alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        stage[kk * S..].as_ptr(),
                        out.0.add((kc + kk) * stride + j0 + rc),
                        w,
                    )
                };
            }
        }
    }
}

/// Plain Rust the compiler can vectorise: CPUs without AVX2, and other architectures.
pub(crate) mod portable {
    use std::ops::Range;

    use super::Elems;

    /// Weights widened to f32 this many at a time, on the stack.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))] // aarch64: NEON, and the tests
    const TILE: usize = 256;

    /// See [`super::dot_rows`]; `span` is whole rows of `w`.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    pub(crate) fn dot_rows(
        w: Elems<'_>,
        x: &[f32],
        m: usize,
        k: usize,
        span: Range<usize>,
        mut put: impl FnMut(usize, &[f32]),
    ) {
        let mut dots = [0f32; super::MAX_FAST_ROWS];
        let mut tile = [0f32; TILE];
        for (r, start) in span.step_by(k).enumerate() {
            dots[..m].fill(0.0);
            for c in (0..k).step_by(TILE) {
                let len = TILE.min(k - c);
                w.widen(start + c..start + c + len, &mut tile[..len]);
                // The weight tile stays in L1 while the M rows of x pass over it.
                for (d, x_row) in dots.iter_mut().zip(x.chunks_exact(k)) {
                    *d += dot(&x_row[c..c + len], &tile[..len]);
                }
            }
            put(r, &dots[..m]);
        }
    }

    /// See [`super::axpy_rows`].
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    pub(crate) fn axpy_rows(
        w: Elems<'_>,
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        ks: Range<usize>,
        y: &mut [f32],
    ) {
        let mut tile = [0f32; TILE];
        for kk in ks {
            for c in (0..n).step_by(TILE) {
                let len = TILE.min(n - c);
                w.widen(kk * n + c..kk * n + c + len, &mut tile[..len]);
                for (i, y_row) in y.chunks_exact_mut(n).enumerate().take(m) {
                    let a = x[i * k + kk];
                    for (y, w) in y_row[c..c + len].iter_mut().zip(&tile[..len]) {
                        *y = a.mul_add(*w, *y);
                    }
                }
            }
        }
    }

    /// Eight independent partial sums, so the additions need not wait on each other.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(crate) mod simd;

/// NEON kernels (every aarch64 CPU has NEON).
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::widen_f16;

/// Off x86 there are no run-time chosen kernels (aarch64's NEON ones need no choice).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) mod simd {
    pub(crate) fn available() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| r.unit()).collect()
    }

    /// f64 reference: y = x · W with W (K, N).
    fn reference_kn(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for kk in 0..k {
                for j in 0..n {
                    y[i * n + j] += x[i * k + kk] as f64 * w[kk * n + j] as f64;
                }
            }
        }
        y
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1e-3f64, |a, b| a.max(b.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= 2e-6 * scale,
                "{what}: index {i}: {g} vs {w}"
            );
        }
    }

    /// Odd sizes reach every loop and tail (groups of 4 weight rows, 8 lanes, 16 lanes).
    const SHAPES: [(usize, usize); 5] = [(1, 1), (7, 9), (37, 101), (61, 67), (64, 24)];

    fn halves(w: &[f32]) -> (Vec<u16>, Vec<u16>) {
        let f16 = w
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let bf16 = w
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        (f16, bf16)
    }

    /// The weights each Elems stands for, widened exactly.
    fn widened(e: Elems<'_>) -> Vec<f32> {
        let mut v = vec![0f32; e.len()];
        e.widen(0..e.len(), &mut v);
        v
    }

    #[test]
    fn axpy_equals_the_product_on_every_tail_and_every_path() {
        for (seed, &(k, n)) in SHAPES.iter().enumerate() {
            let w = rand(k * n, seed as u64);
            let (f16, bf16) = halves(&w);
            for e in [Elems::F32(&w), Elems::F16(&f16), Elems::Bf16(&bf16)] {
                let exact = widened(e);
                for m in [1, 2, 3, 5, 8] {
                    let x = rand(m * k, 100 + m as u64);
                    let want = reference_kn(&exact, &x, m, k, n);
                    // The whole of K in two blocks, as the pool splits it: a block that
                    // starts elsewhere than 0 must read x from its own column.
                    let split = k / 2;
                    let mut y = vec![0f32; m * n];
                    axpy_rows(e, &x, m, k, n, 0..split, &mut y);
                    axpy_rows(e, &x, m, k, n, split..k, &mut y);
                    close(&y, &want, &format!("simd {e:?} m={m} k={k} n={n}"));
                    let mut y = vec![0f32; m * n];
                    portable::axpy_rows(e, &x, m, k, n, 0..split, &mut y);
                    portable::axpy_rows(e, &x, m, k, n, split..k, &mut y);
                    close(&y, &want, &format!("portable m={m} k={k} n={n}"));
                }
            }
        }
    }

    #[test]
    fn dot_rows_equal_the_product_on_every_tail_and_every_path() {
        for (seed, &(k, n)) in SHAPES.iter().enumerate() {
            // w (N, K): its transpose is the (K, N) reference's.
            let w = rand(n * k, 7 + seed as u64);
            let (f16, bf16) = halves(&w);
            for e in [Elems::F32(&w), Elems::F16(&f16), Elems::Bf16(&bf16)] {
                let exact = widened(e);
                let mut t = vec![0f32; k * n];
                for j in 0..n {
                    for kk in 0..k {
                        t[kk * n + j] = exact[j * k + kk];
                    }
                }
                for m in [1, 2, 3, 4, 5, 7, 8] {
                    let x = rand(m * k, 200 + m as u64);
                    let want = reference_kn(&t, &x, m, k, n);
                    // Rows in two ranges, as the pool hands them out.
                    for path in ["simd", "portable"] {
                        let mut y = vec![0f32; m * n];
                        for rows in [0..n / 3, n / 3..n] {
                            let j0 = rows.start;
                            let put = |r: usize, dots: &[f32]| {
                                for (i, d) in dots.iter().enumerate() {
                                    y[i * n + j0 + r] = *d;
                                }
                            };
                            if path == "simd" {
                                dot_rows(e, &x, m, k, rows, put);
                            } else {
                                let span = rows.start * k..rows.end * k;
                                portable::dot_rows(e, &x, m, k, span, put);
                            }
                        }
                        close(&y, &want, &format!("{path} {e:?} m={m} k={k} n={n}"));
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_into_writes_every_element_in_its_place() {
        // Full 8x8 blocks and every tail, staged blocks of 64 and their tails, into columns offset
        // inside a wider matrix; f32 and
        // halves (widened on the way).
        for (r, k) in [
            (8, 8),
            (16, 24),
            (3, 5),
            (13, 21),
            (16, 3072),
            (70, 77),
            (130, 64),
        ] {
            let a = rand(r * k, (r * k) as u64);
            let f16: Vec<u16> = a
                .iter()
                .map(|v| half::f16::from_f32(*v).to_bits())
                .collect();
            let bf16: Vec<u16> = a
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            for elems in [Elems::F32(&a), Elems::F16(&f16), Elems::Bf16(&bf16)] {
                let mut wide = vec![0f32; r * k];
                elems.widen(0..r * k, &mut wide);
                let (stride, j0) = (r + 11, 7);
                let mut out = vec![-1f32; k * stride];
                // SAFETY: out holds k rows of `stride`, columns j0..j0 + r inside them.
                unsafe {
                    transpose_into(
                        elems,
                        r,
                        k,
                        crate::pool::SharedOut(out.as_mut_ptr()),
                        stride,
                        j0,
                    )
                };
                for kk in 0..k {
                    for j in 0..stride {
                        let want = if (j0..j0 + r).contains(&j) {
                            wide[(j - j0) * k + kk]
                        } else {
                            -1.0
                        };
                        let got = out[kk * stride + j];
                        assert_eq!(got, want, "{elems:?} r={r} k={k} kk={kk} j={j}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        let (k, n) = (61, 67);
        let w = rand(k * n, 3);
        let x = rand(8 * k, 4);
        let mut all = vec![0f32; 8 * n];
        axpy_rows(Elems::F32(&w), &x, 8, k, n, 0..k, &mut all);
        for m in 1..8 {
            let mut some = vec![0f32; m * n];
            axpy_rows(Elems::F32(&w), &x[..m * k], m, k, n, 0..k, &mut some);
            assert_eq!(some, all[..m * n], "m={m}");
        }
    }
}
