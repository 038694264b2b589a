//! aarch64 kernel over the tiles: NEON, with `sdot` where the CPU has the dot-product extension
//! (Armv8.2-A and later: Apple silicon, Graviton 2 on). Levels become signed weights
//! `l - offset` (they fit i8), so a block's sum owes no offset; the f32 operations are the other
//! paths' (`fma(d_w·d_x, sum, acc)`), so results are bit for bit theirs.
//!
//! `sdot` and f16 widening go through `asm!` (the latter shared with the f32/f16 kernels:
//! `kernels::widen_f16`): their intrinsics (`vdotq_laneq_s32`, the `float16x4_t` conversions)
//! are unstable in Rust; `fcvtl` is base Armv8.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::k4::SCALES_AT;
use super::{put_tile, Q8Rows, QuantKind, QuantMatrix, BLOCK, Q4, Q6, Q8, ROWS, SUPER};

/// Whether `sdot` may run.
pub(super) fn dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// # Safety
/// `x` and `rows` passed [`QuantMatrix::check`]; `sdot` only where [`dotprod`].
pub(super) unsafe fn dot_rows(
    q: &QuantMatrix,
    x: &Q8Rows,
    rows: Range<usize>,
    sdot: bool,
    put: impl FnMut(usize, &[f32]),
) {
    // SAFETY: the caller's promise.
    unsafe {
        if q.kind == QuantKind::Q4K {
            return match (sdot, x.m) {
                (true, 1) => kernel_k_sdot::<1>(q, x, rows, put),
                (true, 2) => kernel_k_sdot::<2>(q, x, rows, put),
                (true, 3 | 4) => kernel_k_sdot::<4>(q, x, rows, put),
                (true, _) => kernel_k_sdot::<8>(q, x, rows, put),
                (false, 1) => kernel_k_neon::<1>(q, x, rows, put),
                (false, 2) => kernel_k_neon::<2>(q, x, rows, put),
                (false, 3 | 4) => kernel_k_neon::<4>(q, x, rows, put),
                (false, _) => kernel_k_neon::<8>(q, x, rows, put),
            };
        }
        if sdot {
            by_format_and_rows!(kernel_sdot, q, x.m, q, x, rows, put)
        } else {
            by_format_and_rows!(kernel_neon, q, x.m, q, x, rows, put)
        }
    }
}

/// A tile's 8 vectors of signed weights, each as (rows 0-3, rows 4-7): vector `v` is elements
/// `4v .. 4v + 4` of its rows.
///
/// # Safety
/// The tile's bytes are readable at `p`.
#[inline(always)]
unsafe fn weights<const F: u8>(p: *const u8) -> [[int8x16_t; 2]; 8] {
    // SAFETY: the caller's promise; NEON is base aarch64.
    unsafe {
        let load = |at: usize| vld1q_u8(p.add(at));
        let mut l = [[vdupq_n_u8(0); 2]; 8];
        if F == Q8 {
            for (v, l) in l.iter_mut().enumerate() {
                *l = [load(32 * v), load(32 * v + 16)];
            }
        } else {
            let low = vdupq_n_u8(0x0F);
            for v in 0..4 {
                for h in 0..2 {
                    let bytes = load(32 * v + 16 * h);
                    l[v][h] = vandq_u8(bytes, low);
                    l[v + 4][h] = vshrq_n_u8::<4>(bytes);
                }
            }
            if F == Q6 {
                let three = vdupq_n_u8(3);
                for g in 0..2 {
                    for h in 0..2 {
                        let hp = load(128 + 32 * g + 16 * h);
                        let pairs = [
                            hp,
                            vshrq_n_u8::<2>(hp),
                            vshrq_n_u8::<4>(hp),
                            vshrq_n_u8::<6>(hp),
                        ];
                        for (s, pair) in pairs.into_iter().enumerate() {
                            let v = 4 * g + s;
                            let high = vshlq_n_u8::<4>(vandq_u8(pair, three));
                            l[v][h] = vorrq_u8(l[v][h], high);
                        }
                    }
                }
            }
        }
        let off = vdupq_n_u8(match F {
            Q8 => 128,
            Q4 => 8,
            _ => 32,
        });
        l.map(|pair| pair.map(|l| vreinterpretq_s8_u8(vsubq_u8(l, off))))
    }
}

/// 8 f16 scales widened to f32 (rows 0-3, rows 4-7).
///
/// # Safety
/// 8 halves readable at `p`.
#[inline(always)]
unsafe fn scales(p: *const u16) -> [float32x4_t; 2] {
    // SAFETY: the caller's promise.
    crate::linear::kernels::widen_f16(unsafe { vld1q_u16(p) })
}

/// `acc + Σ` of each lane's 4 products: weights of 4 rows × x's 4-byte group `LANE` of `x`.
trait Dot {
    /// # Safety
    /// The kernel this is inlined into has the instructions.
    unsafe fn dot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;
}

/// Armv8.2 `sdot` by element: one instruction.
struct Sdot;

impl Dot for Sdot {
    #[inline(always)]
    unsafe fn dot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: the kernel enables `dotprod`.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                lane = const LANE,
                options(pure, nomem, nostack)
            );
        }
        acc
    }
}

/// Base NEON: widening products of each row's 4 bytes (i16: |w·x| ≤ 128·127, pairs ≤ 2¹⁵),
/// pairs added, then pairs of pairs into the row's i32 lane.
struct Neon;

impl Dot for Neon {
    #[inline(always)]
    unsafe fn dot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is base aarch64.
        unsafe {
            let xv = vreinterpretq_s8_s32(vdupq_laneq_s32::<LANE>(vreinterpretq_s32_s8(x)));
            let lo = vmull_s8(vget_low_s8(w), vget_low_s8(xv));
            let hi = vmull_high_s8(w, xv);
            vpadalq_s16(acc, vpaddq_s16(lo, hi))
        }
    }
}

/// The x86 kernels' loop (see `simd.rs`), in NEON registers: per tile, its weights unpacked
/// once, each row of x's block loaded as two vectors of 4 groups, `dot` by group.
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
            let (qs, ds) = (q.qs.as_ptr(), q.d.as_ptr());
            let (xq, xd) = (x.q.as_ptr(), x.d.as_ptr());
            for t in rows.start / ROWS..rows.end.div_ceil(ROWS) {
                let mut acc = [[vdupq_n_f32(0.0); 2]; M];
                // SAFETY: as in the x86 kernel: tile t has bpr blocks and scales, x rows bpr
                // blocks each.
                unsafe {
                    for b in 0..bpr {
                        let tile = t * bpr + b;
                        let w = weights::<F>(qs.add(tile * tb));
                        let dw = scales(ds.add(tile * ROWS));
                        for (i, acc) in acc.iter_mut().enumerate().take(m) {
                            let at = i * bpr + b;
                            let xb = xq.add(at * BLOCK);
                            let xs = [vld1q_s8(xb), vld1q_s8(xb.add(16))];
                            let zero = vdupq_n_s32(0);
                            // Two chains per half of the rows: vectors 0-3 and 4-7.
                            let mut s = [[zero; 2]; 2];
                            for (g, x) in xs.into_iter().enumerate() {
                                let w = &w[4 * g..4 * g + 4];
                                for h in 0..2 {
                                    let mut a = s[g][h];
                                    a = $ops::dot::<0>(a, w[0][h], x);
                                    a = $ops::dot::<1>(a, w[1][h], x);
                                    a = $ops::dot::<2>(a, w[2][h], x);
                                    a = $ops::dot::<3>(a, w[3][h], x);
                                    s[g][h] = a;
                                }
                            }
                            let d = vdupq_n_f32(*xd.add(at));
                            for h in 0..2 {
                                let sum = vcvtq_f32_s32(vaddq_s32(s[0][h], s[1][h]));
                                acc[h] = vfmaq_f32(acc[h], vmulq_f32(dw[h], d), sum);
                            }
                        }
                    }
                }
                let mut lanes = [[0f32; ROWS]; M];
                for (lanes, acc) in lanes.iter_mut().zip(acc).take(m) {
                    // SAFETY: 4 + 4 floats to a [f32; 8].
                    unsafe {
                        vst1q_f32(lanes.as_mut_ptr(), acc[0]);
                        vst1q_f32(lanes.as_mut_ptr().add(4), acc[1]);
                    }
                }
                put_tile(&lanes, m, t, &rows, &mut put);
            }
        }
    };
}

kernel!(kernel_sdot, "neon,dotprod", Sdot);
kernel!(kernel_neon, "neon", Neon);

/// Q4_K (`super::k4`), as the x86 Q4_K kernel: per sub-block the 8 rows' `d·sc` and `dmin·m`
/// in f32, its levels as Q4_0's signed weights `l − 8` dotted with x, `8·Σx` added back (so
/// the sum is `Σ l·x`, exact), then `acc = fma(d·sc·d_x, sum, acc)` and
/// `mins = fma(dmin·m, −(d_x·Σx), mins)`, `acc + mins` at the end.
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
                let mut acc = [[vdupq_n_f32(0.0); 2]; M];
                let mut mins = [[vdupq_n_f32(0.0); 2]; M];
                // SAFETY: as in the x86 kernel.
                unsafe {
                    for sb in 0..spr {
                        let tile = t * spr + sb;
                        let p = qs.add(tile * tb);
                        let d = scales(ds.add(tile * 2 * ROWS));
                        let dmin = scales(ds.add(tile * 2 * ROWS + ROWS));
                        for s in 0..super::k4::subs(q.k, sb) {
                            // Bytes 8s + r (low 4 bits) and 64 + 8·(s % 4) + r (high 2), as
                            // u32 lanes of rows 0-3 and 4-7.
                            let lo = vmovl_u8(vld1_u8(p.add(SCALES_AT + 8 * s)));
                            let hi = vmovl_u8(vld1_u8(p.add(SCALES_AT + 64 + 8 * (s % 4))));
                            let hi = vshlq_u16(hi, vdupq_n_s16(-4 * (s / 4) as i16));
                            let sc = vorrq_u16(
                                vandq_u16(lo, vdupq_n_u16(15)),
                                vshlq_n_u16::<4>(vandq_u16(hi, vdupq_n_u16(3))),
                            );
                            let mn = vorrq_u16(
                                vshrq_n_u16::<4>(lo),
                                vshlq_n_u16::<2>(vandq_u16(hi, vdupq_n_u16(12))),
                            );
                            let f = |v: uint16x8_t| {
                                [
                                    vcvtq_f32_u32(vmovl_u16(vget_low_u16(v))),
                                    vcvtq_f32_u32(vmovl_high_u16(v)),
                                ]
                            };
                            let (sc, mn) = (f(sc), f(mn));
                            let dsc = [vmulq_f32(d[0], sc[0]), vmulq_f32(d[1], sc[1])];
                            let dmm = [vmulq_f32(dmin[0], mn[0]), vmulq_f32(dmin[1], mn[1])];
                            let w = weights::<Q4>(p.add(s * ROWS * BLOCK / 2));
                            let both = acc.iter_mut().zip(mins.iter_mut());
                            for (i, (acc, min)) in both.enumerate().take(m) {
                                let at = i * bpr + sb * (SUPER / BLOCK) + s;
                                let xb = xq.add(at * BLOCK);
                                let xv = [vld1q_s8(xb), vld1q_s8(xb.add(16))];
                                let zero = vdupq_n_s32(0);
                                let mut sums = [[zero; 2]; 2];
                                for (g, x) in xv.into_iter().enumerate() {
                                    let w = &w[4 * g..4 * g + 4];
                                    for h in 0..2 {
                                        let mut a = sums[g][h];
                                        a = $ops::dot::<0>(a, w[0][h], x);
                                        a = $ops::dot::<1>(a, w[1][h], x);
                                        a = $ops::dot::<2>(a, w[2][h], x);
                                        a = $ops::dot::<3>(a, w[3][h], x);
                                        sums[g][h] = a;
                                    }
                                }
                                let xsum = *xs.add(at);
                                let dx = *xd.add(at);
                                let back = vdupq_n_s32(8 * xsum);
                                let dxv = vdupq_n_f32(dx);
                                let neg = vdupq_n_f32(-(dx * xsum as f32));
                                for h in 0..2 {
                                    let sum = vaddq_s32(vaddq_s32(sums[0][h], sums[1][h]), back);
                                    let sum = vcvtq_f32_s32(sum);
                                    acc[h] = vfmaq_f32(acc[h], vmulq_f32(dsc[h], dxv), sum);
                                    min[h] = vfmaq_f32(min[h], dmm[h], neg);
                                }
                            }
                        }
                    }
                }
                let mut lanes = [[0f32; ROWS]; M];
                for ((lanes, acc), min) in lanes.iter_mut().zip(acc).zip(mins).take(m) {
                    // SAFETY: 4 + 4 floats to a [f32; 8].
                    unsafe {
                        vst1q_f32(lanes.as_mut_ptr(), vaddq_f32(acc[0], min[0]));
                        vst1q_f32(lanes.as_mut_ptr().add(4), vaddq_f32(acc[1], min[1]));
                    }
                }
                put_tile(&lanes, m, t, &rows, &mut put);
            }
        }
    };
}

kernel_k!(kernel_k_sdot, "neon,dotprod", Sdot);
kernel_k!(kernel_k_neon, "neon", Neon);
