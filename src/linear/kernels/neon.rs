//! The aarch64 kernels behind [`super::dot_rows`] and [`super::axpy_rows`]: NEON (Advanced SIMD,
//! part of every Armv8-A CPU, so no run-time check), f32 FMAs on 4 lanes, f16 widened with
//! `fcvtl` (through `asm!`: the `float16x4_t` conversions are unstable in Rust), bf16 by a
//! 16-bit shift. The same shapes as the x86 kernels: a weight row dotted with up to 4 rows of x
//! at a time (16 weights a step, 4 accumulators per row), and (in, out) rows 8 at a time over
//! the outputs, each output adding its weight rows in row order; what a row of x gets does not
//! depend on the other rows.

use std::arch::aarch64::*;
use std::arch::asm;

/// How to load 16 consecutive weights of one stored type as 4 vectors of 4 f32 lanes.
pub(crate) trait Load16 {
    type Elem: Copy;
    /// # Safety
    /// `p` must point at 16 readable elements.
    unsafe fn load16(p: *const Self::Elem) -> [float32x4_t; 4];
    /// # Safety
    /// `p` must point at 4 readable elements.
    unsafe fn load4(p: *const Self::Elem) -> float32x4_t;
    /// One weight, for the tails.
    fn to_f32(v: Self::Elem) -> f32;
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct Bf16;

impl Load16 for F32 {
    type Elem = f32;
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> [float32x4_t; 4] {
        // SAFETY: the caller's promise.
        unsafe {
            [
                vld1q_f32(p),
                vld1q_f32(p.add(4)),
                vld1q_f32(p.add(8)),
                vld1q_f32(p.add(12)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> float32x4_t {
        // SAFETY: the caller's promise.
        unsafe { vld1q_f32(p) }
    }
    fn to_f32(v: f32) -> f32 {
        v
    }
}

/// 8 halves to 8 floats (lanes 0-3, lanes 4-7): `fcvtl`, `fcvtl2` (base Armv8 floating point).
#[inline(always)]
pub(crate) fn widen_f16(h: uint16x8_t) -> [float32x4_t; 2] {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: register-only instructions every aarch64 CPU has.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack)
        );
    }
    [lo, hi]
}

impl Load16 for F16 {
    type Elem = u16;
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> [float32x4_t; 4] {
        // SAFETY: the caller's promise.
        let (a, b) = unsafe { (vld1q_u16(p), vld1q_u16(p.add(8))) };
        let ([w0, w1], [w2, w3]) = (widen_f16(a), widen_f16(b));
        [w0, w1, w2, w3]
    }
    #[inline(always)]
    unsafe fn load4(p: *const u16) -> float32x4_t {
        // SAFETY: the caller's promise: 4 halves; the other 4 lanes are zeros, never read.
        let h = unsafe { vcombine_u16(vld1_u16(p), vdup_n_u16(0)) };
        widen_f16(h)[0]
    }
    fn to_f32(v: u16) -> f32 {
        half::f16::from_bits(v).to_f32()
    }
}

impl Load16 for Bf16 {
    type Elem = u16;
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> [float32x4_t; 4] {
        // bf16 is the top half of an f32: widen each u16 to 32 bits, shifted up by 16.
        // SAFETY: the caller's promise.
        unsafe {
            let (a, b) = (vld1q_u16(p), vld1q_u16(p.add(8)));
            let up = |h: uint16x8_t| {
                [
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
                ]
            };
            let ([w0, w1], [w2, w3]) = (up(a), up(b));
            [w0, w1, w2, w3]
        }
    }
    #[inline(always)]
    unsafe fn load4(p: *const u16) -> float32x4_t {
        // SAFETY: the caller's promise.
        unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p))) }
    }
    fn to_f32(v: u16) -> f32 {
        f32::from_bits((v as u32) << 16)
    }
}

/// See [`super::dot_rows`]: each weight row of `w` (whole rows of K) dotted with the M rows of
/// `x`, up to 4 at a time (the next 4 read the row from L1).
pub(crate) fn dot_rows<L: Load16, P: FnMut(usize, &[f32])>(
    x: &[f32],
    m: usize,
    w: &[L::Elem],
    k: usize,
    mut put: P,
) {
    assert!(m <= super::MAX_FAST_ROWS && x.len() >= m * k && w.len().is_multiple_of(k.max(1)));
    let mut dots = [0f32; super::MAX_FAST_ROWS];
    for (r, w_row) in w.chunks_exact(k.max(1)).enumerate() {
        for g in (0..m).step_by(4) {
            let (x, d) = (&x[g * k..], &mut dots[g..]);
            match (m - g).min(4) {
                1 => d[..1].copy_from_slice(&dots_of::<L, 1>(x, w_row)),
                2 => d[..2].copy_from_slice(&dots_of::<L, 2>(x, w_row)),
                3 => d[..3].copy_from_slice(&dots_of::<L, 3>(x, w_row)),
                _ => d[..4].copy_from_slice(&dots_of::<L, 4>(x, w_row)),
            }
        }
        put(r, &dots[..m]);
    }
}

/// The dots of one weight row (K) with the first G rows of `x` (G, K): 4 accumulators of 4 lanes
/// per row (16 weights a step), then 4 at a time, then one by one; each row summed in the same
/// order whatever G is.
#[inline(always)]
fn dots_of<L: Load16, const G: usize>(x: &[f32], w: &[L::Elem]) -> [f32; G] {
    let k = w.len();
    assert!(x.len() >= G * k);
    let (k16, k4) = (k / 16 * 16, k / 4 * 4);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut dots = [0f32; G];
    // SAFETY: weight offsets read are < K, x offsets i·K + (< K) with i < G: inside both slices
    // (asserted above). NEON is part of the aarch64 target.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 4]; G];
        let mut c = 0;
        while c < k16 {
            let wv = L::load16(wp.add(c));
            for (i, acc) in acc.iter_mut().enumerate() {
                for (a, (acc, wv)) in acc.iter_mut().zip(wv).enumerate() {
                    *acc = vfmaq_f32(*acc, wv, vld1q_f32(xp.add(i * k + c + 4 * a)));
                }
            }
            c += 16;
        }
        while c < k4 {
            let wv = L::load4(wp.add(c));
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[0] = vfmaq_f32(acc[0], wv, vld1q_f32(xp.add(i * k + c)));
            }
            c += 4;
        }
        for (i, (d, [a0, a1, a2, a3])) in dots.iter_mut().zip(acc).enumerate() {
            *d = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
            for c in k4..k {
                *d = x[i * k + c].mul_add(L::to_f32(w[c]), *d);
            }
        }
    }
    dots
}

/// See [`super::axpy_rows`]; `w` holds the block's rows (k0.., each N long).
pub(crate) fn axpy_rows<L: Load16>(
    w: &[L::Elem],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    k0: usize,
    y: &mut [f32],
) {
    let rows = w.len() / n.max(1);
    assert!(m <= super::MAX_FAST_ROWS && k0 + rows <= k && x.len() >= m * k && y.len() >= m * n);
    let mut r = 0;
    // Eight weight rows at a time: each y vector loaded and stored once per eight FMAs.
    while r + 8 <= rows {
        axpy_group::<L, 8>(w, x, m, k, n, k0 + r, r, y);
        r += 8;
    }
    while r < rows {
        axpy_group::<L, 1>(w, x, m, k, n, k0 + r, r, y);
        r += 1;
    }
}

/// `y[i, :] += Σ_g x[i, kx + g] · w[r + g, :]` for `g < G`, every i < m, in that order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn axpy_group<L: Load16, const G: usize>(
    w: &[L::Elem],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    kx: usize,
    r: usize,
    y: &mut [f32],
) {
    assert!((r + G) * n <= w.len() && kx + G <= k && y.len() >= m * n);
    let n4 = n / 4 * 4;
    let mut a = [[0f32; G]; super::MAX_FAST_ROWS];
    for (i, a) in a.iter_mut().enumerate().take(m) {
        a.copy_from_slice(&x[i * k + kx..i * k + kx + G]);
    }
    let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
    // SAFETY: weight offsets (r + g)·N + j < (r + G)·N <= w.len(); y offsets i·N + j < M·N
    // (asserted above).
    unsafe {
        let mut j = 0;
        while j < n4 {
            let mut wv = [vdupq_n_f32(0.0); G];
            for (g, wv) in wv.iter_mut().enumerate() {
                *wv = L::load4(wp.add((r + g) * n + j));
            }
            for (i, a) in a.iter().enumerate().take(m) {
                let p = yp.add(i * n + j);
                let mut yv = vld1q_f32(p);
                for g in 0..G {
                    yv = vfmaq_n_f32(yv, wv[g], a[g]);
                }
                vst1q_f32(p, yv);
            }
            j += 4;
        }
    }
    for j in n4..n {
        for (i, a) in a.iter().enumerate().take(m) {
            let mut v = y[i * n + j];
            for (g, a) in a.iter().enumerate() {
                v = a.mul_add(L::to_f32(w[(r + g) * n + j]), v);
            }
            y[i * n + j] = v;
        }
    }
}
