//! x86 kernels over the tiles: AVX2 (+ FMA, F16C), and AVX-512 VNNI + VL on 256-bit vectors.

use std::arch::x86_64::*;
use std::ops::Range;

use super::k4::SCALES_AT;
use super::{put_tile, Q8Rows, QuantKind, QuantMatrix, BLOCK, Q4, Q6, Q8, ROWS, SUPER};

/// Whether the VNNI kernel may run: `vpdpbusd` on 256-bit vectors (AVX-512 VNNI + VL: Zen 4,
/// Ice Lake and later). One instruction does the u8 × i8 products of 4 bytes and their sum into
/// an i32 lane, which takes maddubs and madd on plain AVX2.
pub(in crate::linear) fn vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C (and AVX-512 VNNI + VL when `vnni`); `x` and `rows`
/// passed [`QuantMatrix::check`].
pub(super) unsafe fn dot_rows(
    q: &QuantMatrix,
    x: &Q8Rows,
    rows: Range<usize>,
    vnni: bool,
    put: impl FnMut(usize, &[f32]),
) {
    // SAFETY: the caller's promise.
    unsafe {
        if q.kind == QuantKind::Q4K {
            return match (vnni, x.m) {
                (true, 1) => kernel_k_vnni::<1>(q, x, rows, put),
                (true, 2) => kernel_k_vnni::<2>(q, x, rows, put),
                (true, 3 | 4) => kernel_k_vnni::<4>(q, x, rows, put),
                (true, _) => kernel_k_vnni::<8>(q, x, rows, put),
                (false, 1) => kernel_k_avx2::<1>(q, x, rows, put),
                (false, 2) => kernel_k_avx2::<2>(q, x, rows, put),
                (false, 3 | 4) => kernel_k_avx2::<4>(q, x, rows, put),
                (false, _) => kernel_k_avx2::<8>(q, x, rows, put),
            };
        }
        if vnni {
            by_format_and_rows!(kernel_vnni, q, x.m, q, x, rows, put)
        } else {
            by_format_and_rows!(kernel_avx2, q, x.m, q, x, rows, put)
        }
    }
}

/// A tile's 8 vectors of levels, as bytes: vector `v` is elements `4v .. 4v + 4` of its rows.
///
/// # Safety
/// The tile's bytes are readable at `p`; AVX2 is enabled in the kernel this is inlined into.
#[inline(always)]
unsafe fn levels<const F: u8>(p: *const u8) -> [__m256i; 8] {
    // SAFETY: the caller's promise.
    unsafe {
        let load = |v: usize| _mm256_loadu_si256(p.add(32 * v).cast());
        if F == Q8 {
            return std::array::from_fn(load);
        }
        let low = _mm256_set1_epi8(0x0F);
        let mut l = [_mm256_setzero_si256(); 8];
        for v in 0..4 {
            let bytes = load(v);
            l[v] = _mm256_and_si256(bytes, low);
            l[v + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low);
        }
        if F == Q6 {
            // Bit pairs ≤ 3 moved to bits 4-5: no bit crosses into the next byte.
            let three = _mm256_set1_epi8(3);
            let pair = |h: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(h, three));
            for h in 0..2 {
                let hp = load(4 + h);
                let l = &mut l[4 * h..4 * h + 4];
                l[0] = _mm256_or_si256(l[0], pair(hp));
                l[1] = _mm256_or_si256(l[1], pair(_mm256_srli_epi16::<2>(hp)));
                l[2] = _mm256_or_si256(l[2], pair(_mm256_srli_epi16::<4>(hp)));
                l[3] = _mm256_or_si256(l[3], pair(_mm256_srli_epi16::<6>(hp)));
            }
        }
        l
    }
}

/// `acc + Σ` over each lane's 4 bytes of level × x, and what the sum still owes for the
/// offset (a multiple of Σx).
trait Ops {
    /// # Safety
    /// The kernel this is inlined into enables the instructions.
    unsafe fn dot<const F: u8>(acc: __m256i, l: __m256i, x: __m256i) -> __m256i;
    /// The multiple of Σx to take off a block's sum.
    fn offset<const F: u8>() -> i32;

    /// Σ over a block of 4-bit levels (≤ 15) × x, in each row's lane: the 8 vectors of levels
    /// with x's 8 groups of 4 bytes at `x`.
    ///
    /// # Safety
    /// As `dot`; 32 bytes readable at `x`.
    unsafe fn dot_nibbles(l: &[__m256i; 8], x: *const i32) -> __m256i;
}

/// Plain AVX2: maddubs (u8 × i8 pairs into i16) then madd into i32 lanes. Q4_0 and Q6 levels
/// are small enough (≤ 63: 2·63·127 < 2¹⁵) not to saturate the pairs; Q8_0's are not, so its
/// signed weights `l - 128` go in as |w| times x with w's sign, which owes no offset.
struct Avx2;

impl Ops for Avx2 {
    #[inline(always)]
    unsafe fn dot<const F: u8>(acc: __m256i, l: __m256i, x: __m256i) -> __m256i {
        // SAFETY: AVX2 is enabled in the kernel this is inlined into.
        unsafe {
            let pairs = if F == Q8 {
                let w = _mm256_xor_si256(l, _mm256_set1_epi8(-128));
                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
            } else {
                _mm256_maddubs_epi16(l, x)
            };
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    fn offset<const F: u8>() -> i32 {
        match F {
            Q8 => 0,
            Q4 => 8,
            _ => 32,
        }
    }

    /// maddubs' pairs summed in i16 (8 of them: at most 8·2·15·127 = 30480 < 2¹⁵, exact), one
    /// madd into i32 at the end.
    #[inline(always)]
    unsafe fn dot_nibbles(l: &[__m256i; 8], x: *const i32) -> __m256i {
        // SAFETY: AVX2 is enabled in the kernel this is inlined into; the caller's promise.
        unsafe {
            let mut s = [_mm256_setzero_si256(); 2];
            for (v, l) in l.iter().enumerate() {
                let xv = _mm256_set1_epi32(x.add(v).read_unaligned());
                s[v % 2] = _mm256_add_epi16(s[v % 2], _mm256_maddubs_epi16(*l, xv));
            }
            _mm256_madd_epi16(_mm256_add_epi16(s[0], s[1]), _mm256_set1_epi16(1))
        }
    }
}

/// AVX-512 VNNI + VL: one `vpdpbusd` per vector, unsigned levels straight in.
struct Vnni;

impl Ops for Vnni {
    #[inline(always)]
    unsafe fn dot<const F: u8>(acc: __m256i, l: __m256i, x: __m256i) -> __m256i {
        // SAFETY: AVX-512 VNNI + VL are enabled in the kernel this is inlined into.
        unsafe { _mm256_dpbusd_epi32(acc, l, x) }
    }

    fn offset<const F: u8>() -> i32 {
        match F {
            Q8 => 128,
            Q4 => 8,
            _ => 32,
        }
    }

    #[inline(always)]
    unsafe fn dot_nibbles(l: &[__m256i; 8], x: *const i32) -> __m256i {
        // SAFETY: VNNI is enabled in the kernel this is inlined into; the caller's promise.
        unsafe {
            let mut s = [_mm256_setzero_si256(); 2];
            for (v, l) in l.iter().enumerate() {
                let xv = _mm256_set1_epi32(x.add(v).read_unaligned());
                s[v % 2] = _mm256_dpbusd_epi32(s[v % 2], *l, xv);
            }
            _mm256_add_epi32(s[0], s[1])
        }
    }
}

/// For each tile of rows: per block, its levels unpacked once and dotted with the block of each
/// of the M rows of x (broadcast 4 bytes at a time), two chains of integer sums per row; then
/// each row's 8 sums are scaled by `d_w · d_x` into its 8 lanes of f32 accumulators. One body,
/// compiled for each instruction set (`$ops`: [`Avx2`] or [`Vnni`]).
macro_rules! kernel {
    ($name:ident, $features:literal, $ops:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const F: u8, const M: usize>(
            q: &QuantMatrix,
            x: &Q8Rows,
            rows: Range<usize>,
            mut put: impl FnMut(usize, &[f32]),
        ) {
            let (bpr, tb) = (q.k / BLOCK, q.kind.tile_bytes());
            let m = x.m.min(M);
            let off = $ops::offset::<F>();
            let (qs, ds) = (q.qs.as_ptr(), q.d.as_ptr());
            let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
            for t in rows.start / ROWS..rows.end.div_ceil(ROWS) {
                let mut acc = [_mm256_setzero_ps(); M];
                // SAFETY: tile t has bpr blocks of levels and scales (t·8 < N, checked); x
                // rows have bpr blocks (and sums) each; 4-byte reads of x are unaligned.
                unsafe {
                    for b in 0..bpr {
                        let tile = t * bpr + b;
                        let l = levels::<F>(qs.add(tile * tb));
                        let dw = _mm256_cvtph_ps(_mm_loadu_si128(ds.add(tile * ROWS).cast()));
                        for (i, acc) in acc.iter_mut().enumerate().take(m) {
                            let at = i * bpr + b;
                            let xb = xq.add(at * BLOCK).cast::<i32>();
                            let mut s = [_mm256_setzero_si256(); 2];
                            for (v, l) in l.iter().enumerate() {
                                let xv = _mm256_set1_epi32(xb.add(v).read_unaligned());
                                s[v % 2] = $ops::dot::<F>(s[v % 2], *l, xv);
                            }
                            let mut sum = _mm256_add_epi32(s[0], s[1]);
                            if off != 0 {
                                sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(off * *xs.add(at)));
                            }
                            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(at)));
                            *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), *acc);
                        }
                    }
                }
                let mut lanes = [[0f32; ROWS]; M];
                for (lanes, acc) in lanes.iter_mut().zip(acc).take(m) {
                    // SAFETY: 8 floats to a [f32; 8].
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
                }
                put_tile(&lanes, m, t, &rows, &mut put);
            }
        }
    };
}

kernel!(kernel_avx2, "avx2,fma,f16c", Avx2);
kernel!(kernel_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", Vnni);

/// Q4_K (`super::k4`): per tile of rows and superblock, the rows' `d` and `dmin`; per
/// sub-block, the 8 rows' 6-bit scales and mins unpacked into `d·sc` and `dmin·m` (f32, one
/// lane a row), its levels as Q4_0's, dotted with each row of x as [`kernel!`] does (no
/// offset); then `acc = fma(d·sc·d_x, sum, acc)` and `mins = fma(dmin·m, −(d_x·Σx), mins)`,
/// `acc + mins` at the end.
macro_rules! kernel_k {
    ($name:ident, $features:literal, $ops:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize>(
            q: &QuantMatrix,
            x: &Q8Rows,
            rows: Range<usize>,
            mut put: impl FnMut(usize, &[f32]),
        ) {
            let (spr, bpr, tb) = (q.k.div_ceil(SUPER), q.k / BLOCK, q.kind.tile_bytes());
            let m = x.m.min(M);
            let (qs, ds) = (q.qs.as_ptr(), q.d.as_ptr());
            let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
            for t in rows.start / ROWS..rows.end.div_ceil(ROWS) {
                let mut acc = [_mm256_setzero_ps(); M];
                let mut mins = [_mm256_setzero_ps(); M];
                // SAFETY: tile t has spr superblocks of levels, scales and 16 f16 each (t·8 <
                // N, checked); x rows have bpr blocks (and sums) each; 4-byte reads of x are
                // unaligned.
                unsafe {
                    for sb in 0..spr {
                        let tile = t * spr + sb;
                        let p = qs.add(tile * tb);
                        let dh = ds.add(tile * 2 * ROWS);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(dh.cast()));
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(dh.add(ROWS).cast()));
                        // The 8 sub-blocks' 6-bit scales (bytes 8s + r) and mins (64 + 8s + r),
                        // unpacked 32 bytes at a time.
                        let sp = p.add(SCALES_AT);
                        let (l0, l1) = (
                            _mm256_loadu_si256(sp.cast()),
                            _mm256_loadu_si256(sp.add(32).cast()),
                        );
                        let h = _mm256_loadu_si256(sp.add(64).cast());
                        let f = _mm256_set1_epi8(0x0F);
                        let bits = |b: i8| _mm256_and_si256(h, _mm256_set1_epi8(b));
                        let six = [
                            _mm256_or_si256(
                                _mm256_and_si256(l0, f),
                                _mm256_slli_epi16::<4>(bits(3)),
                            ),
                            _mm256_or_si256(_mm256_and_si256(l1, f), bits(0x30)),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l0), f),
                                _mm256_slli_epi16::<2>(bits(0x0C)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), f),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(h), _mm256_set1_epi8(0x30)),
                            ),
                        ];
                        let mut unpacked = [0u8; 128];
                        for (v, six) in six.iter().enumerate() {
                            _mm256_storeu_si256(unpacked.as_mut_ptr().add(32 * v).cast(), *six);
                        }
                        let u = unpacked.as_ptr();
                        for s in 0..super::k4::subs(q.k, sb) {
                            let wide = |at: usize| {
                                let b = _mm_loadl_epi64(u.add(at).cast());
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))
                            };
                            let dsc = _mm256_mul_ps(d, wide(8 * s));
                            let dmm = _mm256_mul_ps(dmin, wide(64 + 8 * s));
                            let l = levels::<Q4>(p.add(s * ROWS * BLOCK / 2));
                            let both = acc.iter_mut().zip(mins.iter_mut());
                            for (i, (acc, min)) in both.enumerate().take(m) {
                                let at = i * bpr + sb * (SUPER / BLOCK) + s;
                                let sum = $ops::dot_nibbles(&l, xq.add(at * BLOCK).cast());
                                let dx = *xd.add(at);
                                let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(dx));
                                *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), *acc);
                                let xsum = _mm256_set1_ps(-(dx * *xs.add(at) as f32));
                                *min = _mm256_fmadd_ps(dmm, xsum, *min);
                            }
                        }
                    }
                }
                let mut lanes = [[0f32; ROWS]; M];
                for ((lanes, acc), min) in lanes.iter_mut().zip(acc).zip(mins).take(m) {
                    // SAFETY: 8 floats to a [f32; 8].
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc, min)) };
                }
                put_tile(&lanes, m, t, &rows, &mut put);
            }
        }
    };
}

kernel_k!(kernel_k_avx2, "avx2,fma,f16c", Avx2);
kernel_k!(kernel_k_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", Vnni);

/// Blocks `b0 ..` of row `j` (as many as `out` holds) as f32 weights: the row's levels gathered
/// from its tiles (a 4-byte group per vector), less the offset, widened 8 at a time and scaled.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `j < q.n`, `out.len()` is a multiple of 32 and
/// `b0·32 + out.len() <= q.k`.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn dequantize_part(q: &QuantMatrix, j: usize, b0: usize, out: &mut [f32]) {
    let (bpr, tb) = (q.k / BLOCK, q.kind.tile_bytes());
    let (t, r) = (j / ROWS, j % ROWS);
    let off = _mm256_set1_epi8(q.kind.offset() as u8 as i8);
    // Dword v of a row's levels sits at byte 32·v + 4·r of the tile.
    let every_vector = _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56);
    // SAFETY: row j's blocks b0.. exist (the caller's promise), and `out` holds whole blocks.
    unsafe {
        let o = out.as_mut_ptr();
        for b in 0..out.len() / BLOCK {
            let tile = t * bpr + b0 + b;
            let p = q.qs.as_ptr().add(tile * tb + 4 * r).cast::<i32>();
            let levels = match q.kind {
                QuantKind::Q8_0 => _mm256_i32gather_epi32::<4>(p, every_vector),
                _ => {
                    // Vectors 0-3 in the low nibbles, 4-7 in the high ones.
                    let low = _mm_i32gather_epi32::<4>(p, _mm256_castsi256_si128(every_vector));
                    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(low), low);
                    let mut l = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
                    if q.kind == QuantKind::Q6 {
                        // Vector v's bit pairs: dword h = v / 4 of the pair vectors, shifted by
                        // 2·(v % 4).
                        let h0 = p.add(32).read_unaligned();
                        let h1 = p.add(40).read_unaligned();
                        let h = _mm256_setr_epi32(h0, h0, h0, h0, h1, h1, h1, h1);
                        let h = _mm256_srlv_epi32(h, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
                        let h = _mm256_and_si256(h, _mm256_set1_epi8(3));
                        l = _mm256_or_si256(l, _mm256_slli_epi16::<4>(h));
                    }
                    l
                }
            };
            let w = _mm256_sub_epi8(levels, off);
            let d =
                _mm256_set1_ps(half::f16::from_bits(*q.d.as_ptr().add(tile * ROWS + r)).to_f32());
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
