//! 8- and 4-bit weights, in llama.cpp's `Q8_0` and `Q4_0` formats (`ggml-quants.c`): blocks of
//! 32 consecutive weights of one output row share an f16 scale `d`.
//!
//! - Q8_0: `d = max|w| / 127`, `q = round(w / d)` in -127..=127; `w ≈ q·d`. 8.5 bits a weight.
//! - Q4_0: `d = m / -8` where `m` is the weight of largest magnitude (sign kept),
//!   `q = min(15, trunc(w / d + 8.5))` in 0..=15; `w ≈ (q - 8)·d`. Byte `i` of a block holds
//!   element `i` in its low nibble and `i + 16` in its high one. 4.5 bits a weight.
//!
//! Weights are quantized at load from the safetensors' f32/f16/bf16, row by row of the (out, in)
//! matrix, so each block runs along the dot product. Products keep the activations in f32 and
//! widen each block in registers: the same numbers as multiplying by the dequantized matrix, up to
//! summation order.

use std::ops::Range;

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// How a quantized matrix stores its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QuantKind {
    Q8_0,
    Q4_0,
}

impl QuantKind {
    /// Bytes of quants per block (the f16 scale is stored apart).
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 => BLOCK / 2,
        }
    }
}

/// A quantized (N, K) matrix: `d[j·K/32 + b]` is the scale of block `b` of row `j`; its quants
/// are `qs[(j·K/32 + b)·block_bytes ..]`.
#[derive(Clone, Debug)]
pub(crate) struct QuantMatrix {
    pub(crate) kind: QuantKind,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) d: Vec<u16>,
    pub(crate) qs: Vec<u8>,
}

impl QuantMatrix {
    /// Quantizes `n` rows of K weights, each handed over by `row(j, out)` as f32, on every core
    /// (it runs once, at load).
    pub(crate) fn quantize(
        kind: QuantKind,
        n: usize,
        k: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        assert!(k.is_multiple_of(BLOCK));
        let (bpr, bb) = (k / BLOCK, kind.block_bytes());
        let mut d = vec![0u16; n * bpr];
        let mut qs = vec![0u8; n * bpr * bb];
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .clamp(1, 16);
        let per = n.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (c, (d, qs)) in d
                .chunks_mut(per * bpr)
                .zip(qs.chunks_mut(per * bpr * bb))
                .enumerate()
            {
                let row = &row;
                s.spawn(move || {
                    let mut buf = vec![0f32; k];
                    for (r, (d, qs)) in d.chunks_mut(bpr).zip(qs.chunks_mut(bpr * bb)).enumerate() {
                        row(c * per + r, &mut buf);
                        for ((b, d), q) in buf.chunks_exact(BLOCK).zip(d).zip(qs.chunks_mut(bb)) {
                            let (scale, block) = match kind {
                                QuantKind::Q8_0 => quantize_q8_0(b),
                                QuantKind::Q4_0 => quantize_q4_0(b),
                            };
                            *d = half::f16::from_f32(scale).to_bits();
                            q.copy_from_slice(&block[..bb]);
                        }
                    }
                });
            }
        });
        Self { kind, n, k, d, qs }
    }

    /// Row `j` as f32 weights (the numbers the products multiply by).
    pub(crate) fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let bpr = self.k / BLOCK;
        let bb = self.kind.block_bytes();
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let i = j * bpr + b;
            let d = half::f16::from_bits(self.d[i]).to_f32();
            let q = &self.qs[i * bb..(i + 1) * bb];
            match self.kind {
                QuantKind::Q8_0 => {
                    for (o, &q) in out.iter_mut().zip(q) {
                        *o = f32::from(q as i8) * d;
                    }
                }
                QuantKind::Q4_0 => {
                    for (t, &q) in q.iter().enumerate() {
                        out[t] = (f32::from(q & 0x0F) - 8.0) * d;
                        out[t + 16] = (f32::from(q >> 4) - 8.0) * d;
                    }
                }
            }
        }
    }

    /// Bytes the matrix occupies.
    pub(crate) fn bytes(&self) -> usize {
        self.d.len() * 2 + self.qs.len()
    }

    /// For each row `j` in `rows`, its dots with the M rows of `x` (M, K), handed over as
    /// `put(j - rows.start, dots)`.
    pub(crate) fn dot_rows(
        &self,
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        put: impl FnMut(usize, &[f32]),
    ) {
        assert!(m <= super::MAX_FAST_ROWS && x.len() == m * self.k && rows.end <= self.n);
        #[cfg(target_arch = "x86_64")]
        if super::kernels::simd::available() {
            // SAFETY: AVX2, FMA and F16C are there (just checked); the sizes are asserted above
            // and hold for the matrix by construction.
            unsafe { simd::dot_rows(self, x, m, rows, put) };
            return;
        }
        self.dot_rows_portable(x, m, rows, put)
    }

    /// [`QuantMatrix::dot_rows`] in plain Rust: each row dequantized, then dotted.
    pub(crate) fn dot_rows_portable(
        &self,
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        mut put: impl FnMut(usize, &[f32]),
    ) {
        let mut row = vec![0f32; self.k];
        let mut dots = [0f32; super::MAX_FAST_ROWS];
        for (r, j) in rows.enumerate() {
            self.dequantize_row(j, &mut row);
            for (d, x) in dots.iter_mut().zip(x.chunks_exact(self.k)) {
                *d = super::kernels::portable::dot(x, &row);
            }
            put(r, &dots[..m]);
        }
    }
}

/// `(d, q)` of one Q8_0 block.
fn quantize_q8_0(w: &[f32]) -> (f32, [u8; BLOCK]) {
    let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; BLOCK];
    for (q, v) in q.iter_mut().zip(w) {
        // Round half away from zero (C's roundf), by truncating x ± 0.5: no libm call.
        let x = v * id;
        *q = (x + 0.5f32.copysign(x)) as i8 as u8;
    }
    (d, q)
}

/// `(d, q)` of one Q4_0 block (its first 16 bytes used).
fn quantize_q4_0(w: &[f32]) -> (f32, [u8; BLOCK]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in w {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let nibble = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    let mut q = [0u8; BLOCK];
    for t in 0..BLOCK / 2 {
        q[t] = nibble(w[t]) | (nibble(w[t + 16]) << 4);
    }
    (d, q)
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{QuantKind, QuantMatrix, BLOCK};
    use crate::linear::kernels::simd::hsum;

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `x` holds M·K floats, `rows` are rows of `q`.
    pub(super) unsafe fn dot_rows(
        q: &QuantMatrix,
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        put: impl FnMut(usize, &[f32]),
    ) {
        // SAFETY: the caller's promise.
        unsafe {
            match (q.kind, m) {
                (QuantKind::Q8_0, 1) => kernel::<true, 1>(q, x, rows, put),
                (QuantKind::Q8_0, 2) => kernel::<true, 2>(q, x, rows, put),
                (QuantKind::Q8_0, 3 | 4) => {
                    kernel::<true, 4>(q, pad(x, m, 4, q.k).as_slice(), rows, trim(put, m))
                }
                (QuantKind::Q8_0, _) => {
                    kernel::<true, 8>(q, pad(x, m, 8, q.k).as_slice(), rows, trim(put, m))
                }
                (QuantKind::Q4_0, 1) => kernel::<false, 1>(q, x, rows, put),
                (QuantKind::Q4_0, 2) => kernel::<false, 2>(q, x, rows, put),
                (QuantKind::Q4_0, 3 | 4) => {
                    kernel::<false, 4>(q, pad(x, m, 4, q.k).as_slice(), rows, trim(put, m))
                }
                (QuantKind::Q4_0, _) => {
                    kernel::<false, 8>(q, pad(x, m, 8, q.k).as_slice(), rows, trim(put, m))
                }
            }
        }
    }

    /// `x` with zero rows added up to `to` rows (so one kernel serves several M).
    fn pad(x: &[f32], m: usize, to: usize, k: usize) -> Vec<f32> {
        let mut v = x.to_vec();
        v.resize(to.max(m) * k, 0.0);
        v
    }

    /// `put` that drops the padded rows' dots.
    fn trim(mut put: impl FnMut(usize, &[f32]), m: usize) -> impl FnMut(usize, &[f32]) {
        move |r, dots| put(r, &dots[..m])
    }

    /// One block's 32 weights as 4 vectors of 8 lanes, unscaled: `q` (Q8_0) or `q - 8` (Q4_0).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen<const Q8: bool>(p: *const u8) -> [__m256; 4] {
        // SAFETY: a Q8_0 block has 32 readable bytes at p, a Q4_0 block 16.
        unsafe {
            if Q8 {
                let lane = |o: usize| {
                    let v = _mm_loadl_epi64(p.add(o).cast());
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
                };
                [lane(0), lane(8), lane(16), lane(24)]
            } else {
                let bytes = _mm_loadu_si128(p.cast());
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(bytes, mask); // elements 0..16
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask); // elements 16..32
                let eight = _mm256_set1_epi32(8);
                let lane = |v: __m128i| {
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), eight))
                };
                [
                    lane(lo),
                    lane(_mm_srli_si128::<8>(lo)),
                    lane(hi),
                    lane(_mm_srli_si128::<8>(hi)),
                ]
            }
        }
    }

    /// Each block is widened once and dotted with the M rows of x; a block's sum is scaled by
    /// its `d` into the row's accumulator.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<const Q8: bool, const M: usize>(
        q: &QuantMatrix,
        x: &[f32],
        rows: Range<usize>,
        mut put: impl FnMut(usize, &[f32]),
    ) {
        let (k, bb) = (q.k, q.kind.block_bytes());
        let bpr = k / BLOCK;
        let xp = x.as_ptr();
        for (r, j) in rows.enumerate() {
            let mut acc = [_mm256_setzero_ps(); M];
            for b in 0..bpr {
                let i = j * bpr + b;
                let d = _mm256_set1_ps(half::f16::from_bits(q.d[i]).to_f32());
                // SAFETY: block i has bb bytes in qs; x rows have K floats, b·32 + 32 <= K.
                unsafe {
                    let w = widen::<Q8>(q.qs.as_ptr().add(i * bb));
                    for (row, acc) in acc.iter_mut().enumerate() {
                        let xb = xp.add(row * k + b * BLOCK);
                        let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                        s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), s);
                        s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), s);
                        s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), s);
                        *acc = _mm256_fmadd_ps(d, s, *acc);
                    }
                }
            }
            let mut dots = [0f32; M];
            for (d, a) in dots.iter_mut().zip(acc) {
                *d = hsum(a);
            }
            put(r, &dots);
        }
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

    #[test]
    fn blocks_follow_llama_cpp() {
        // Q8_0: the largest magnitude maps to ±127.
        let mut w = [0f32; BLOCK];
        w[3] = -2.54;
        w[5] = 1.27;
        let (d, q) = quantize_q8_0(&w);
        assert!((d - 0.02).abs() < 1e-7);
        assert_eq!((q[3] as i8, q[5] as i8, q[0] as i8), (-127, 64, 0));
        // Q4_0: the signed extreme maps to q = 0 (i.e. -8·d), zero to 8; nibble order lo/hi.
        let mut w = [0f32; BLOCK];
        w[0] = -4.0;
        w[16] = 2.0;
        let (d, q) = quantize_q4_0(&w);
        assert_eq!(d, 0.5);
        // -4/0.5 + 8.5 = 0.5 -> 0 (low nibble); 2/0.5 + 8.5 = 12.5 -> 12 (high nibble).
        assert_eq!(q[0], 12 << 4);
        assert_eq!(q[1], 8 | (8 << 4));
    }

    #[test]
    fn dequantized_rows_are_close_and_dots_equal_them() {
        let (n, k) = (37, 96);
        let w = rand(n * k, 1);
        // Q8_0: half a step (amax/254). Q4_0: the opposite extreme is clamped at 7 steps of amax/8.
        for (kind, tol) in [(QuantKind::Q8_0, 0.5 / 127.0), (QuantKind::Q4_0, 1.0 / 8.0)] {
            let q =
                QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&w[j * k..][..k]));
            assert_eq!(q.bytes(), n * k / BLOCK * (2 + kind.block_bytes()));
            let mut deq = vec![0f32; n * k];
            for j in 0..n {
                q.dequantize_row(j, &mut deq[j * k..(j + 1) * k]);
            }
            // Each weight within its format's error of its block's largest.
            for j in 0..n {
                for (b, blk) in w[j * k..(j + 1) * k].chunks(BLOCK).enumerate() {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (t, v) in blk.iter().enumerate() {
                        let e = (deq[j * k + b * BLOCK + t] - v).abs();
                        assert!(e <= tol * amax * 1.01 + 1e-3 * amax, "{kind:?} {e} {amax}");
                    }
                }
            }
            for m in [1, 2, 3, 5, 8] {
                let x = rand(m * k, 10 + m as u64);
                for path in ["simd", "portable"] {
                    let mut y = vec![0f32; m * n];
                    for rows in [0..5, 5..n] {
                        let j0 = rows.start;
                        let put = |r: usize, dots: &[f32]| {
                            for (i, d) in dots.iter().enumerate() {
                                y[i * n + j0 + r] = *d;
                            }
                        };
                        if path == "simd" {
                            q.dot_rows(&x, m, rows, put);
                        } else {
                            q.dot_rows_portable(&x, m, rows, put);
                        }
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|c| x[i * k + c] as f64 * deq[j * k + c] as f64)
                                .sum();
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{kind:?} {path} m={m}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
