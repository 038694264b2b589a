//! 8- and 4-bit weights, in llama.cpp's `Q8_0` and `Q4_0` formats (`ggml-quants.c`): blocks of
//! 32 consecutive weights of one output row share an f16 scale `d`.
//!
//! - Q8_0: `d = max|w| / 127`, `q = round(w / d)` in -127..=127; `w ≈ q·d`. 8.5 bits a weight.
//! - Q4_0: `d = m / -8` where `m` is the weight of largest magnitude (sign kept),
//!   `q = min(15, trunc(w / d + 8.5))` in 0..=15; `w ≈ (q - 8)·d`. Byte `i` of a block holds
//!   element `i` in its low nibble and `i + 16` in its high one. 4.5 bits a weight.
//! - Q6 (ours; for the embedding / LM head under Q4_0, where llama.cpp puts its 6-bit `q6_K`):
//!   Q4_0's scheme with 64 levels, `d = m / -32`, `q` in 0..=63, `w ≈ (q - 32)·d`. The low
//!   nibbles as in Q4_0 (16 bytes), then 8 bytes of high bit pairs: byte `j` holds those of
//!   element `8·l + j` at bits `2l, 2l + 1` (l = 0..4), so one 64-bit shift per quarter of a
//!   256-bit vector puts them in place. 6.5 bits a weight (`q6_K`: 6.5625).
//!
//! Weights are quantized at load from the safetensors' f32/f16/bf16, row by row of the (out, in)
//! matrix, so each block runs along the dot product. Decode products are llama.cpp's: the
//! activations are quantized to Q8_0 blocks once per call ([`Q8Acts`]), each block's dot is exact
//! in integers (AVX2, or one `vpdpbusd` with AVX-512 VNNI), then scaled by both blocks' `d`.
//! Prefill multiplies f32 activations by the dequantized matrix (gemm).

use std::ops::Range;

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// How a quantized matrix stores its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QuantKind {
    Q8_0,
    Q4_0,
    Q6,
}

impl QuantKind {
    /// Bytes of quants per block (the f16 scale is stored apart).
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 => BLOCK / 2,
            Self::Q6 => BLOCK * 3 / 4,
        }
    }

    /// `q8_0`, `q4_0` or `q6`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q6 => "q6",
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
                                QuantKind::Q6 => quantize_q6(b),
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
        assert_eq!(out.len(), self.k);
        self.dequantize_part(j, 0, out)
    }

    /// Weights `k0 .. k0 + out.len()` of row `j` as f32: whole blocks (`k0` and the length
    /// multiples of 32).
    pub(crate) fn dequantize_part(&self, j: usize, k0: usize, out: &mut [f32]) {
        assert!(
            j < self.n
                && k0.is_multiple_of(BLOCK)
                && out.len().is_multiple_of(BLOCK)
                && k0 + out.len() <= self.k
        );
        #[cfg(target_arch = "x86_64")]
        if super::kernels::simd::available() {
            // SAFETY: AVX2 and F16C are there (just checked); the blocks exist (asserted).
            unsafe { simd::dequantize_part(self, j, k0 / BLOCK, out) };
            return;
        }
        self.dequantize_part_portable(j, k0, out)
    }

    /// [`QuantMatrix::dequantize_part`] in plain Rust.
    pub(crate) fn dequantize_part_portable(&self, j: usize, k0: usize, out: &mut [f32]) {
        let bpr = self.k / BLOCK;
        let bb = self.kind.block_bytes();
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let i = j * bpr + k0 / BLOCK + b;
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
                QuantKind::Q6 => {
                    for (o, w) in out.iter_mut().zip(q6_values(q)) {
                        *o = f32::from(w) * d;
                    }
                }
            }
        }
    }

    /// Bytes the matrix occupies.
    pub(crate) fn bytes(&self) -> usize {
        self.d.len() * 2 + self.qs.len()
    }

    /// For each row `j` in `rows`, its dots with the M rows of `x`, handed over as
    /// `put(j - rows.start, dots)`. Products are llama.cpp's: `x` comes quantized to 8 bits per
    /// block ([`Q8Acts`]), each block's sum is exact in integers, then scaled by both blocks' `d`.
    pub(crate) fn dot_rows(&self, x: &Q8Acts, rows: Range<usize>, put: impl FnMut(usize, &[f32])) {
        assert!(x.m <= super::MAX_FAST_ROWS && x.k == self.k && rows.end <= self.n);
        #[cfg(target_arch = "x86_64")]
        if super::kernels::simd::available() {
            // SAFETY: AVX2, FMA and F16C are there (just checked), and VNNI when asked for; the
            // sizes are asserted above and hold for the matrix and the activations by
            // construction.
            unsafe { simd::dot_rows(self, x, rows, simd::vnni(), put) };
            return;
        }
        self.dot_rows_portable(x, rows, put)
    }

    /// [`QuantMatrix::dot_rows`] on plain AVX2 even where VNNI is there (for the tests).
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn dot_rows_avx2(
        &self,
        x: &Q8Acts,
        rows: Range<usize>,
        put: impl FnMut(usize, &[f32]),
    ) {
        assert!(x.m <= super::MAX_FAST_ROWS && x.k == self.k && rows.end <= self.n);
        assert!(super::kernels::simd::available());
        // SAFETY: as in `dot_rows`, without VNNI.
        unsafe { simd::dot_rows(self, x, rows, false, put) };
    }

    /// [`QuantMatrix::dot_rows`] in plain Rust: the same integer sums.
    pub(crate) fn dot_rows_portable(
        &self,
        x: &Q8Acts,
        rows: Range<usize>,
        mut put: impl FnMut(usize, &[f32]),
    ) {
        let (bpr, bb) = (self.k / BLOCK, self.kind.block_bytes());
        let mut dots = [0f32; super::MAX_FAST_ROWS];
        let mut w = [0i8; BLOCK];
        for (r, j) in rows.enumerate() {
            dots[..x.m].fill(0.0);
            for b in 0..bpr {
                let i = j * bpr + b;
                let q = &self.qs[i * bb..(i + 1) * bb];
                match self.kind {
                    QuantKind::Q8_0 => w.iter_mut().zip(q).for_each(|(w, q)| *w = *q as i8),
                    QuantKind::Q4_0 => {
                        for (t, &q) in q.iter().enumerate() {
                            w[t] = (q & 0x0F) as i8 - 8;
                            w[t + 16] = (q >> 4) as i8 - 8;
                        }
                    }
                    QuantKind::Q6 => w = q6_values(q),
                }
                let dw = half::f16::from_bits(self.d[i]).to_f32();
                for (row, d) in dots.iter_mut().enumerate().take(x.m) {
                    let xb = &x.q[(row * bpr + b) * BLOCK..][..BLOCK];
                    let s: i32 = w
                        .iter()
                        .zip(xb)
                        .map(|(a, b)| i32::from(*a) * i32::from(*b))
                        .sum();
                    *d += s as f32 * (dw * x.d[row * bpr + b]);
                }
            }
            put(r, &dots[..x.m]);
        }
    }
}

/// Activations quantized for the integer products: per block of 32, `d = max|x| / 127` and
/// `q = round(x / d)` (llama.cpp's Q8_0, with an f32 `d`).
#[derive(Debug, Clone)]
pub(crate) struct Q8Acts {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    /// Σq of each block (for Q4_0's unsigned products: the AVX2 kernel's).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) s: Vec<i32>,
}

impl Q8Acts {
    /// `x` (M, K) row-major; K a multiple of 32.
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        let mut q = vec![0i8; m * k];
        let mut d = Vec::with_capacity(m * k / BLOCK);
        let mut s = Vec::with_capacity(m * k / BLOCK);
        for (xb, qb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
            let (scale, block) = quantize_q8_0(xb);
            d.push(scale);
            qb.iter_mut().zip(block).for_each(|(q, b)| *q = b as i8);
            s.push(qb.iter().map(|q| i32::from(*q)).sum());
        }
        Self { m, k, q, d, s }
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

/// `(d, q)` of one Q6 block (its first 24 bytes used).
fn quantize_q6(w: &[f32]) -> (f32, [u8; BLOCK]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in w {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    let d = max / -32.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let level = |v: f32| ((v * id + 32.5) as i32).clamp(0, 63) as u8;
    let mut q = [0u8; BLOCK];
    for t in 0..BLOCK / 2 {
        let (lo, hi) = (level(w[t]), level(w[t + 16]));
        q[t] = (lo & 0x0F) | (hi << 4);
    }
    for (e, &v) in w.iter().enumerate() {
        q[16 + e % 8] |= (level(v) >> 4) << (2 * (e / 8));
    }
    (d, q)
}

/// A Q6 block's 32 weights, `q - 32`, in -32..=31.
fn q6_values(q: &[u8]) -> [i8; BLOCK] {
    let mut w = [0i8; BLOCK];
    for (e, w) in w.iter_mut().enumerate() {
        let lo = if e < 16 { q[e] & 0x0F } else { q[e - 16] >> 4 };
        let hi = (q[16 + e % 8] >> (2 * (e / 8))) & 3;
        *w = (lo | (hi << 4)) as i8 - 32;
    }
    w
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Q8Acts, QuantKind, QuantMatrix, BLOCK};
    use crate::linear::kernels::simd::hsum;

    /// Whether the VNNI kernel may run: `vpdpbusd` on 256-bit vectors (AVX-512 VNNI + VL: Zen 4,
    /// Ice Lake and later). One instruction does the u8 × i8 products and their sums into i32
    /// lanes that take maddubs, madd and, for Q4_0, the sign juggling on plain AVX2.
    pub(in crate::linear) fn vnni() -> bool {
        is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C (and AVX-512 VNNI + VL when `vnni`); `x` has the
    /// matrix's K, `rows` are rows of `q`.
    pub(super) unsafe fn dot_rows(
        q: &QuantMatrix,
        x: &Q8Acts,
        rows: Range<usize>,
        vnni: bool,
        put: impl FnMut(usize, &[f32]),
    ) {
        macro_rules! pick {
            ($kernel:ident) => {
                match (q.kind, x.m) {
                    (QuantKind::Q8_0, 1) => $kernel::<Q8, 1>(q, x, rows, put),
                    (QuantKind::Q8_0, 2) => $kernel::<Q8, 2>(q, x, rows, put),
                    (QuantKind::Q8_0, 3) => $kernel::<Q8, 3>(q, x, rows, put),
                    (QuantKind::Q8_0, 4) => $kernel::<Q8, 4>(q, x, rows, put),
                    (QuantKind::Q8_0, _) => $kernel::<Q8, 8>(q, x, rows, put),
                    (QuantKind::Q4_0, 1) => $kernel::<Q4, 1>(q, x, rows, put),
                    (QuantKind::Q4_0, 2) => $kernel::<Q4, 2>(q, x, rows, put),
                    (QuantKind::Q4_0, 3) => $kernel::<Q4, 3>(q, x, rows, put),
                    (QuantKind::Q4_0, 4) => $kernel::<Q4, 4>(q, x, rows, put),
                    (QuantKind::Q4_0, _) => $kernel::<Q4, 8>(q, x, rows, put),
                    (QuantKind::Q6, 1) => $kernel::<Q6, 1>(q, x, rows, put),
                    (QuantKind::Q6, 2) => $kernel::<Q6, 2>(q, x, rows, put),
                    (QuantKind::Q6, 3) => $kernel::<Q6, 3>(q, x, rows, put),
                    (QuantKind::Q6, 4) => $kernel::<Q6, 4>(q, x, rows, put),
                    (QuantKind::Q6, _) => $kernel::<Q6, 8>(q, x, rows, put),
                }
            };
        }
        // SAFETY: the caller's promise.
        unsafe {
            if vnni {
                pick!(kernel_vnni)
            } else {
                pick!(kernel_avx2)
            }
        }
    }

    /// The kernels' block formats, as const generics.
    const Q8: u8 = 0;
    const Q4: u8 = 1;
    const Q6: u8 = 2;

    /// A Q6 block's 32 levels `q` as bytes 0..=63: Q4_0's nibbles, then each quarter of the
    /// vector takes its high bit pairs from the same 8 bytes shifted by 0, 2, 4 or 6.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn levels6(p: *const u8) -> __m256i {
        // SAFETY: a Q6 block has 24 readable bytes at p.
        unsafe {
            let high = _mm256_set1_epi64x(p.add(16).cast::<i64>().read_unaligned());
            let high = _mm256_srlv_epi64(high, _mm256_set_epi64x(6, 4, 2, 0));
            let high = _mm256_and_si256(high, _mm256_set1_epi8(3));
            // ≤ 3 << 4: no bit crosses into the next byte of the 16-bit lane.
            _mm256_or_si256(nibbles(p), _mm256_slli_epi16::<4>(high))
        }
    }

    /// Blocks `b0 ..` of row `j` (as many as `out` holds) as f32 weights, a block per step: its 32 weights as signed bytes (the kernels'
    /// `prepare`), widened 8 at a time and scaled: the portable loop dominated quantized
    /// prefill's widening.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `j < q.n`, `out.len()` is a multiple of 32 and
    /// `b0·32 + out.len() <= q.k`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dequantize_part(q: &QuantMatrix, j: usize, b0: usize, out: &mut [f32]) {
        let (bpr, bb) = (q.k / BLOCK, q.kind.block_bytes());
        // SAFETY: row j's bpr blocks and scales exist (the caller's promise), and `out` holds
        // bpr blocks of 32.
        unsafe {
            let (qs, ds, o) = (q.qs.as_ptr(), q.d.as_ptr(), out.as_mut_ptr());
            for b in 0..out.len() / BLOCK {
                let i = j * bpr + b0 + b;
                let p = qs.add(i * bb);
                let w = match q.kind {
                    QuantKind::Q8_0 => _mm256_loadu_si256(p.cast()),
                    QuantKind::Q4_0 => _mm256_sub_epi8(nibbles(p), _mm256_set1_epi8(8)),
                    QuantKind::Q6 => _mm256_sub_epi8(levels6(p), _mm256_set1_epi8(32)),
                };
                let d = _mm256_set1_ps(half::f16::from_bits(*ds.add(i)).to_f32());
                let halves = [_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w)];
                for (h, part) in halves.into_iter().enumerate() {
                    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part));
                    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(part)));
                    let at = o.add(b * BLOCK + h * 16);
                    _mm256_storeu_ps(at, _mm256_mul_ps(lo, d));
                    _mm256_storeu_ps(at.add(8), _mm256_mul_ps(hi, d));
                }
            }
        }
    }

    /// A Q4_0 block's 32 nibbles as bytes 0..=15: low nibbles are elements 0..16, high 16..32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: a Q4_0 block has 16 readable bytes at p.
        unsafe {
            let bytes = _mm_loadu_si128(p.cast());
            let both = _mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }
    }

    /// Plain AVX2. A block's weights as signed bytes `w` (Q4_0: nibbles minus 8) and `|w|`,
    /// once per block; then per row, Σ w·x over 32 bytes as 8 i32 lanes: |w| times x with w's
    /// sign (maddubs takes unsigned × signed; |w|·|x| ≤ 127·127, so pairs never saturate i16).
    struct Avx2;

    impl Avx2 {
        #[inline(always)]
        unsafe fn prepare<const F: u8>(p: *const u8) -> (__m256i, __m256i) {
            // SAFETY: the block's bytes are readable (the caller's promise); AVX2 is enabled in
            // the kernel this is inlined into.
            unsafe {
                let w = match F {
                    Q8 => _mm256_loadu_si256(p.cast()),
                    Q4 => _mm256_sub_epi8(nibbles(p), _mm256_set1_epi8(8)),
                    _ => _mm256_sub_epi8(levels6(p), _mm256_set1_epi8(32)),
                };
                (_mm256_sign_epi8(w, w), w)
            }
        }

        #[inline(always)]
        unsafe fn dot<const F: u8>((ax, w): (__m256i, __m256i), x: __m256i, _sx: i32) -> __m256i {
            // SAFETY: AVX2 is enabled in the kernel this is inlined into.
            unsafe {
                let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(x, w));
                _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
            }
        }
    }

    /// AVX-512 VNNI + VL on 256-bit vectors. Q8_0 keeps the sign trick into one `vpdpbusd`;
    /// Q4_0 multiplies the unsigned nibbles by x straight away and takes 8·Σx off the sum
    /// (Σ (n - 8)·x = Σ n·x - 8·Σx, llama.cpp's way), as Σx spread over the 8 lanes; Q6 the
    /// same with 32·Σx (4·Σx a lane).
    struct Vnni;

    impl Vnni {
        #[inline(always)]
        unsafe fn prepare<const F: u8>(p: *const u8) -> (__m256i, __m256i) {
            // SAFETY: as for Avx2::prepare.
            unsafe {
                match F {
                    Q8 => {
                        let w = _mm256_loadu_si256(p.cast());
                        (_mm256_sign_epi8(w, w), w)
                    }
                    Q4 => (nibbles(p), _mm256_setzero_si256()),
                    _ => (levels6(p), _mm256_setzero_si256()),
                }
            }
        }

        #[inline(always)]
        unsafe fn dot<const F: u8>((a, w): (__m256i, __m256i), x: __m256i, sx: i32) -> __m256i {
            // SAFETY: AVX-512 VNNI + VL are enabled in the kernel this is inlined into.
            unsafe {
                let zero = _mm256_setzero_si256();
                match F {
                    Q8 => _mm256_dpbusd_epi32(zero, a, _mm256_sign_epi8(x, w)),
                    Q4 => _mm256_sub_epi32(_mm256_dpbusd_epi32(zero, a, x), _mm256_set1_epi32(sx)),
                    _ => {
                        _mm256_sub_epi32(_mm256_dpbusd_epi32(zero, a, x), _mm256_set1_epi32(4 * sx))
                    }
                }
            }
        }
    }

    /// Each block's weights are unpacked once and dotted with the M rows' blocks; a block's
    /// integer sum is scaled by `d_w · d_x` into the row's accumulator. Scales are widened 8 at a
    /// time (F16C), two blocks per step keep two chains of FMAs per row in flight, and raw
    /// pointers (bounds checked once, by the caller) keep the loop free of checks. One body,
    /// compiled for each instruction set (`$ops`: [`Avx2`] or [`Vnni`]).
    macro_rules! kernel {
        ($name:ident, $features:literal, $ops:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const F: u8, const M: usize>(
                q: &QuantMatrix,
                x: &Q8Acts,
                rows: Range<usize>,
                mut put: impl FnMut(usize, &[f32]),
            ) {
                let (bpr, bb) = (q.k / BLOCK, q.kind.block_bytes());
                let m = x.m.min(M);
                let (qs, ds) = (q.qs.as_ptr(), q.d.as_ptr());
                let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
                let mut scales = vec![0f32; bpr + 8];
                for (r, j) in rows.enumerate() {
                    let row0 = j * bpr;
                    // SAFETY: row j has bpr scales and bpr blocks (j < n, checked by
                    // `dot_rows`); x rows have bpr blocks (and sums) each; `scales` has room
                    // for 8 past the last block.
                    unsafe {
                        let mut b = 0;
                        while b < bpr {
                            // 8 at a time straight from the row (a copy of variable length
                            // here was a memcpy call per 8 scales), the tail through a buffer.
                            let v = if b + 8 <= bpr {
                                _mm_loadu_si128(ds.add(row0 + b).cast())
                            } else {
                                let mut bits = [0u16; 8];
                                let n = bpr - b;
                                std::ptr::copy_nonoverlapping(
                                    ds.add(row0 + b),
                                    bits.as_mut_ptr(),
                                    n,
                                );
                                _mm_loadu_si128(bits.as_ptr().cast())
                            };
                            _mm256_storeu_ps(scales.as_mut_ptr().add(b), _mm256_cvtph_ps(v));
                            b += 8;
                        }
                        let mut acc = [[_mm256_setzero_ps(); 2]; M];
                        let mut b = 0;
                        while b < bpr {
                            let two = b + 1 < bpr;
                            let w0 = $ops::prepare::<F>(qs.add((row0 + b) * bb));
                            let w1 = if two {
                                $ops::prepare::<F>(qs.add((row0 + b + 1) * bb))
                            } else {
                                w0
                            };
                            for (row, acc) in acc.iter_mut().enumerate().take(m) {
                                let i = row * bpr + b;
                                let x0 = _mm256_loadu_si256(xq.add(i * BLOCK).cast());
                                let d0 = _mm256_cvtepi32_ps($ops::dot::<F>(w0, x0, *xs.add(i)));
                                let s0 = *scales.get_unchecked(b) * *xd.add(i);
                                acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(s0), d0, acc[0]);
                                if two {
                                    let x1 = _mm256_loadu_si256(xq.add((i + 1) * BLOCK).cast());
                                    let d1 = $ops::dot::<F>(w1, x1, *xs.add(i + 1));
                                    let s1 = *scales.get_unchecked(b + 1) * *xd.add(i + 1);
                                    acc[1] = _mm256_fmadd_ps(
                                        _mm256_set1_ps(s1),
                                        _mm256_cvtepi32_ps(d1),
                                        acc[1],
                                    );
                                }
                            }
                            b += 2;
                        }
                        let mut dots = [0f32; M];
                        for (d, [a0, a1]) in dots.iter_mut().zip(acc).take(m) {
                            *d = hsum(_mm256_add_ps(a0, a1));
                        }
                        put(r, &dots[..m]);
                    }
                }
            }
        };
    }

    kernel!(kernel_avx2, "avx2,fma,f16c", Avx2);
    kernel!(kernel_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", Vnni);
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
        // Q6: the signed extreme maps to q = 0 (-32·d), zero to 32; low nibbles as in Q4_0,
        // element e's high bit pair in byte 16 + e % 8 at bit 2·(e / 8).
        let mut w = [0f32; BLOCK];
        w[0] = -4.0;
        w[17] = 2.0; // 2 / 0.125 + 32.5 = 48.5 -> 48 = 0b11_0000
        w[26] = -1.0; // -1 / 0.125 + 32.5 = 24.5 -> 24 = 0b01_1000
        let (d, q) = quantize_q6(&w);
        assert_eq!(d, 0.125);
        // Byte t: element t's low nibble, then element t + 16's (0 -> 0, 32 -> 0, 24 -> 8).
        assert_eq!((q[0], q[1], q[10]), (0, 0, 8 << 4));
        // High pairs: element 0 -> 0 (byte 16, bits 0-1); 16 -> 2 (byte 16, bits 4-5);
        // 17 -> 3 (byte 17, bits 4-5); 26 -> 1 (byte 18, bits 6-7); others 32 -> 2.
        assert_eq!(q[16], 0b10_10_10_00);
        assert_eq!(q[17], 0b10_11_10_10);
        assert_eq!(q[18], 0b01_10_10_10);
        let back = q6_values(&q);
        assert_eq!(
            (back[0], back[16], back[17], back[26], back[5]),
            (-32, 0, 16, -8, 0)
        );
    }

    #[test]
    fn dequantized_rows_are_close_and_dots_equal_them() {
        let (n, k) = (37, 96);
        let w = rand(n * k, 1);
        // Q8_0: half a step (amax/254). Q4_0 and Q6: the opposite extreme is clamped at 7 steps
        // of amax/8, or 31 of amax/32.
        for (kind, tol) in [
            (QuantKind::Q8_0, 0.5 / 127.0),
            (QuantKind::Q4_0, 1.0 / 8.0),
            (QuantKind::Q6, 1.0 / 32.0),
        ] {
            let q =
                QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&w[j * k..][..k]));
            assert_eq!(q.bytes(), n * k / BLOCK * (2 + kind.block_bytes()));
            let mut deq = vec![0f32; n * k];
            let mut portable = vec![0f32; k];
            for j in 0..n {
                q.dequantize_row(j, &mut deq[j * k..(j + 1) * k]);
                q.dequantize_part_portable(j, 0, &mut portable);
                assert_eq!(deq[j * k..(j + 1) * k], portable, "{kind:?} row {j}");
                // Parts: the blocks they name, at both paths.
                for (k0, len) in [(32, 32), (64, 32), (0, 64), (32, 64)] {
                    let mut part = vec![0f32; len];
                    q.dequantize_part(j, k0, &mut part);
                    assert_eq!(part, deq[j * k + k0..][..len], "{kind:?} row {j} at {k0}");
                    q.dequantize_part_portable(j, k0, &mut part);
                    assert_eq!(part, deq[j * k + k0..][..len], "{kind:?} row {j} at {k0}");
                }
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
                let xq = Q8Acts::new(&x, m, k);
                // The reference: the dequantized weights times the dequantized activations.
                let xd: Vec<f64> = (0..m * k)
                    .map(|c| xq.q[c] as f64 * xq.d[c / BLOCK] as f64)
                    .collect();
                for path in ["simd", "avx2", "portable"] {
                    let mut y = vec![0f32; m * n];
                    for rows in [0..5, 5..n] {
                        let j0 = rows.start;
                        let put = |r: usize, dots: &[f32]| {
                            for (i, d) in dots.iter().enumerate() {
                                y[i * n + j0 + r] = *d;
                            }
                        };
                        match path {
                            "simd" => q.dot_rows(&xq, rows, put),
                            #[cfg(target_arch = "x86_64")]
                            "avx2" => q.dot_rows_avx2(&xq, rows, put),
                            _ => q.dot_rows_portable(&xq, rows, put),
                        }
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 =
                                (0..k).map(|c| xd[i * k + c] * deq[j * k + c] as f64).sum();
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{kind:?} {path} m={m}: {got} vs {want}"
                            );
                            // And within the activations' rounding of the f32 product: each
                            // x is off by at most half its block's step, so the sum by at most
                            // Σ |w| · step / 2.
                            let exact: f64 = (0..k)
                                .map(|c| x[i * k + c] as f64 * deq[j * k + c] as f64)
                                .sum();
                            let bound: f64 = (0..k)
                                .map(|c| {
                                    deq[j * k + c].abs() as f64 * xq.d[(i * k + c) / BLOCK] as f64
                                        / 2.0
                                })
                                .sum();
                            assert!(
                                (got - exact).abs() <= bound * 1.001 + 1e-6,
                                "{got} vs {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }
}
