//! The fused ops' row kernels, written so the compiler vectorises them: sums over eight
//! lanes (a fixed order, so every CPU gives the same bits; a single running sum was bound by
//! the adder's latency), and f32's `exp` as a polynomial (see [`exp_f32`]). Each kernel is
//! compiled twice, for the crate's baseline (SSE2) and for AVX2, and picks at run time; Rust
//! never fuses a multiply and an add on its own, so both give the same bits.

use super::Float;

/// Defines `fn $name<T: Float>(..)` (visible in `train`) that runs its body compiled for AVX2
/// when the CPU has it, and as is otherwise.
macro_rules! vectorised {
    ($(#[$m:meta])* fn $name:ident<T: Float>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(in crate::train) fn $name<T: Float>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<T: Float>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<T: Float>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (just checked; std caches the answer).
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

/// `e^x` in f32 by `2ⁿ·p(r)`, `r = x − n·ln 2` in [−ln2/2, ln2/2] (Cephes' `expf` polynomial,
/// within 2 ulp of the true value; libm's is not vectorisable). Below −87.3 (where e^x leaves
/// f32's normal range) it is 0; above 88.7 it is 3.4e38, not infinity (the ops' arguments are
/// ≤ 0 but for the tanh of a huge GELU input, where both give tanh = 1).
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let low = x < -87.3;
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by adding 1.5·2²³, which leaves n in the low mantissa bits: its bits
    // give n as an integer without a float-to-int cast (Rust's saturating `as` does not
    // vectorise).
    let shifted = x * LOG2E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let ni = shifted.to_bits() as i32 - 0x4B40_0000;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let p = p * r * r + r + 1.0;
    // n in [−126, 128]: 2ⁿ in two factors, so that 2¹²⁸ is not built directly.
    let half = ni >> 1;
    let two = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    let e = p * two(half) * two(ni - half);
    if low {
        0.0
    } else {
        e
    }
}

const LANES: usize = 8;

/// The lanes' sum, pairwise.
#[inline(always)]
fn fold<T: Float>(a: [T; LANES]) -> T {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Σ f(x) over eight lanes: element i goes to lane i % 8 over the whole chunks, then the lanes
/// fold and the tail adds in order. (Slices, not indices: a bounds check per element kept the
/// loop scalar.)
#[inline(always)]
fn sum_of<T: Float>(xs: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = *a + f(x);
        }
    }
    tail.iter().fold(fold(acc), |s, &x| s + f(x))
}

/// Σ f(a, b) over the pairs of `a` and `b`, in [`sum_of`]'s order.
#[inline(always)]
fn sum_of2<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s = *s + f(x, y);
        }
    }
    ta.iter().zip(tb).fold(fold(acc), |s, (&x, &y)| s + f(x, y))
}

/// The largest element (`row` not empty).
#[inline(always)]
fn max<T: Float>(row: &[T]) -> T {
    let mut acc = [row[0]; LANES];
    let whole = row.len() / LANES * LANES;
    for c in row[..whole].chunks_exact(LANES) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = acc.iter().fold(acc[0], |m, &v| if v > m { v } else { m });
    row[whole..]
        .iter()
        .fold(m, |m, &v| if v > m { v } else { m })
}

vectorised! {
    /// `out = softmax(scale·row)` (`row` not empty).
    fn softmax<T: Float>(row: &[T], out: &mut [T], scale: T) {
        let m = max(row) * scale;
        let out = &mut out[..row.len()];
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (v * scale - m).exp();
        }
        let sum = sum_of(out, |x| x);
        for o in out.iter_mut() {
            *o = *o / sum;
        }
    }
}

vectorised! {
    /// d scores = scale · p ⊙ (g − Σⱼ pⱼ gⱼ) over one row.
    fn softmax_grad<T: Float>(p: &[T], g: &[T], out: &mut [T], scale: T) {
        let dot = sum_of2(p, g, |p, g| p * g);
        for ((o, &p), &g) in out.iter_mut().zip(p).zip(g) {
            *o = scale * p * (g - dot);
        }
    }
}

vectorised! {
    /// One row of logits (not empty) → its negative log-likelihood of `target` (< its length),
    /// the row becoming `share · (softmax − onehot(target))`: the loss's gradient.
    fn nll_and_grad<T: Float>(row: &mut [T], target: usize, share: T) -> T {
        let picked = row[target];
        let m = max(row);
        for x in row.iter_mut() {
            *x = (*x - m).exp();
        }
        let sum = sum_of(row, |x| x);
        let k = share / sum;
        for x in row.iter_mut() {
            *x = *x * k;
        }
        row[target] = row[target] - share;
        m + sum.ln() - picked
    }
}

/// A row's mean and 1/√(var + eps) (biased variance, two passes).
#[inline(always)]
fn moments<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = sum_of(row, |x| x) / n;
    let var = sum_of(row, |x| (x - mean) * (x - mean)) / n;
    (mean, T::from_f64(1.0) / (var + T::from_f64(eps)).sqrt())
}

vectorised! {
    /// Layer norm over rows of `w.len()`: `out = (x − mean)·inv·w + b`; each row's mean and
    /// inv appended to `stats`.
    fn layer_norm_rows<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64, out: &mut [T], stats: &mut Vec<T>) {
        let c = w.len();
        for (row, o) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let (mean, inv) = moments(row, eps);
            stats.push(mean);
            stats.push(inv);
            // The composed graph's roundings: the normalised value, times w, plus b.
            for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

vectorised! {
    /// Layer norm's backward over rows of `w.len()`, with `stats` (mean, inv per row) from
    /// the forward pass: dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))·inv with ĝ = g·w; dw += g·x̂;
    /// db += g. `gw`: a row's scratch.
    fn layer_norm_grad_rows<T: Float>(
        x: &[T],
        g: &[T],
        w: &[T],
        stats: &[T],
        dx: &mut [T],
        dw: &mut [T],
        db: &mut [T],
        gw: &mut [T],
    ) {
        let c = w.len();
        let n = T::from_f64(c as f64);
        let rows = x.chunks_exact(c).zip(g.chunks_exact(c)).zip(dx.chunks_exact_mut(c));
        for (((xr, gr), o), st) in rows.zip(stats.chunks_exact(2)) {
            let (mean, inv) = (st[0], st[1]);
            for ((((gw, &g), &w), &x), (dw, db)) in gw
                .iter_mut()
                .zip(gr)
                .zip(w)
                .zip(xr)
                .zip(dw.iter_mut().zip(db.iter_mut()))
            {
                *db = *db + g;
                *dw = *dw + g * ((x - mean) * inv);
                *gw = g * w;
            }
            let g_mean = sum_of(gw, |g| g) / n;
            let gx_mean = sum_of2(gw, xr, |g, x| g * ((x - mean) * inv)) / n;
            for ((o, &x), &gw) in o.iter_mut().zip(xr).zip(gw.iter()) {
                *o = (gw - g_mean - (x - mean) * inv * gx_mean) * inv;
            }
        }
    }
}

vectorised! {
    /// `out = gelu_new(x)` element by element.
    fn gelu<T: Float>(x: &[T], out: &mut [T]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = super::value(x);
        }
    }
}

vectorised! {
    /// `out = g·gelu_new′(x)` element by element.
    fn gelu_grad<T: Float>(x: &[T], g: &[T], out: &mut [T]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            *o = g * super::slope(x);
        }
    }
}

vectorised! {
    /// AdamW on one parameter, in place (torch's single-tensor AdamW in its order of
    /// operations): `k` = [1 − β1, β2, 1 − β2, √(1 − β2ᵗ), ε, lr/(1 − β1ᵗ), 1 − lr·wd].
    fn adamw<T: Float>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], clip: T, k: [T; 7]) {
        let [b1, b2, b2c, sq, eps, step, decay] = k;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * clip;
            *m = *m + b1 * (g - *m);
            *v = *v * b2 + g * g * b2c;
            let denom = v.sqrt() / sq + eps;
            *p = *p * decay - step * (*m / denom);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f32_exp_is_within_two_ulp_and_zero_below_the_normal_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (f64::from(exp_f32(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "relative error {worst:e}");
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
