//! The activations fused into a layer's output (GELU and friends), vectorisable.

use candle_core::{Result, Tensor};

#[cfg(target_arch = "x86_64")]
use super::kernels;
use super::run;
use crate::config::Activation;
use crate::pool::{self, SharedOut};

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
pub(super) fn activate_rows(y: &mut [f32], n: usize, act: Activation) -> Result<()> {
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
/// tanh GELU (chosen per element, it did not).
/// With AVX2 it is compiled for 8 lanes (the crate's baseline is SSE2's 4); Rust never fuses
/// a multiply and an add on its own, so both give the same bits.
pub(super) fn activate_slice(y: &mut [f32], act: Activation) {
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
pub(super) fn activate_tensor(y: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        // candle's `gelu` is the tanh approximation, transformers' `NewGELUActivation`.
        Activation::GeluNew | Activation::GeluPytorchTanh => y.gelu(),
        Activation::Gelu => y.gelu_erf(),
        Activation::Relu => y.relu(),
    }
}
