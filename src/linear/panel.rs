//! Prefill against weights that are not f32 where they lie (halves, 8-/4-bit blocks, all
//! stored (N, K)): `y (M, N) += x (M, K) · Wᵀ`, with W widened straight into the packed panels
//! a 16 × 6 FMA microkernel reads, never into a whole f32 copy.
//!
//! Why our own driver: `gemm` takes f32 operands only, so these weights had to be widened whole
//! to (K, N) first (a pass writing 4 bytes per weight far out of cache) and then packed again by
//! gemm, a pass that kept f16 prefill below f32's (docs/PERF.md). Here each weight
//! is widened once, into a panel that stays in L2 while every token goes past it.
//!
//! The loops are BLIS's (<https://github.com/flame/blis/blob/master/docs/KernelsHowTo.md>):
//! a unit of work is up to [`GROUP`] panels of [`MR`] outputs; for each [`KC`] slice of depth
//! its panels are packed (`GROUP · KC · MR` f32 = 192 KiB, in L2), then each run of [`NR`]
//! tokens (6 rows of x, read in place: 6 KiB, in L1) meets every panel. The microkernel is
//! 16 × 6: 12 accumulators, 2 weight vectors and a broadcast token value, 15 of the 16
//! registers. (`gemm`'s AVX2 shape, 24 × 4, needs all 16 and more: written the same way, LLVM
//! spilled an accumulator every step, and f16 prefill fell to 424 tokens/s.)
//!
//! x86_64 with AVX2 + FMA only: elsewhere [`available`] is false and `Linear` widens for gemm.

use std::ops::Range;

use super::kernels::Elems;
use crate::pool::SharedOut;

/// Outputs per panel: two AVX2 registers of f32.
pub(crate) const MR: usize = 16;
/// Tokens (rows of x) per microkernel call.
pub(crate) const NR: usize = 6;
/// Depth of a packed slice: one panel is 16 KiB.
pub(crate) const KC: usize = 256;
/// Most panels per unit of work: 192 KiB packed, under half of a 512 KiB L2.
const GROUP: usize = 12;

/// Fills `panels`, one after another, each `kc` rows of [`MR`] (`panel[kk·MR + i] =
/// W[n0 + i][k0 + kk]` for the first, outputs `n0 + MR ..` the next, ...) for depths
/// `k0 .. k0 + kc`, zeros past the last output.
pub(crate) type Pack<'a> = dyn Fn(usize, Range<usize>, &mut [f32]) + Sync + 'a;

/// Runs `f(u)` for every unit `u < n` (on the pool, or on the calling thread).
pub(crate) type Run<'a> = dyn Fn(usize, &(dyn Fn(usize) + Sync)) -> candle_core::Result<()> + 'a;

/// Whether [`gemm_nk`] can run here.
pub(crate) fn available() -> bool {
    // False off x86_64.
    super::kernels::simd::available()
}

/// `y += x · Wᵀ` for x (M, K) and y (M, N), row-major, W (N, K) handed over panel by panel by
/// `pack`; `run` runs the units of work (on the pool, or here).
///
/// Each output sums its K products a slice of [`KC`] at a time in depth order, whatever M is.
///
/// # Safety
/// [`available`] must be true; `y` must address M·N live floats no one else touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_nk(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    y: SharedOut,
    pack: &Pack<'_>,
    threads: usize,
    run: &Run<'_>,
) -> candle_core::Result<()> {
    assert!(x.len() == m * k);
    let panels = n.div_ceil(MR);
    // ≥ 2 units per thread so a slow thread's share can be taken.
    let group = GROUP.min(panels.div_ceil(threads.max(1) * 2)).max(1);
    // The last m % NR tokens, zero-padded to NR rows, so the kernel always reads NR rows.
    let full = m / NR * NR;
    let mut tail = Vec::new();
    if full < m {
        tail.resize(NR * k, 0.0);
        tail[..(m - full) * k].copy_from_slice(&x[full * k..]);
    }
    run(panels.div_ceil(group), &|u| {
        // The whole of `y` (a closure would capture its raw pointer field alone, not Sync).
        let y: SharedOut = y;
        let ps = u * group..panels.min((u + 1) * group);
        PANELS.with_borrow_mut(|buf| {
            buf.resize(GROUP * KC * MR, 0.0);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                pack(ps.start * MR, k0..k0 + kc, &mut buf[..ps.len() * kc * MR]);
                for t0 in (0..m).step_by(NR) {
                    let (rows, tokens) = if t0 < full {
                        (&x[t0 * k..], NR)
                    } else {
                        (&tail[..], m - t0)
                    };
                    for p in ps.clone() {
                        let a = &buf[(p - ps.start) * kc * MR..][..kc * MR];
                        let outputs = MR.min(n - p * MR);
                        // SAFETY: AVX2 + FMA (the caller's promise); `rows` holds NR rows of K
                        // from k0; y's rows t0 .. t0 + tokens, columns p·MR .. + outputs, are
                        // in the buffer and this unit's alone.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            simd::kernel(
                                kc,
                                a,
                                rows[k0..].as_ptr(),
                                k,
                                y.0.add(t0 * n + p * MR),
                                n,
                                outputs,
                                tokens,
                            )
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (a, rows, outputs, tokens, &y);
                    }
                }
            }
        })
    })
}

/// [`Pack`] for halves or f32 rows `a` (N, K): widened in the registers they are transposed in.
pub(crate) fn pack_elems(a: Elems<'_>, k: usize, n0: usize, ks: Range<usize>, panels: &mut [f32]) {
    let kc = ks.len();
    for (p, panel) in panels.chunks_exact_mut(kc * MR).enumerate() {
        pack_elems_one(a, k, n0 + p * MR, ks.clone(), panel);
    }
}

/// One panel of [`pack_elems`].
fn pack_elems_one(a: Elems<'_>, k: usize, n0: usize, ks: Range<usize>, panel: &mut [f32]) {
    let (n, kc) = (a.len() / k, ks.len());
    let outputs = MR.min(n - n0);
    #[cfg(target_arch = "x86_64")]
    let fast = super::kernels::simd::available();
    let mut tail = [0f32; 8];
    for g in (0..MR).step_by(8) {
        for kk0 in (0..kc).step_by(8) {
            #[cfg(target_arch = "x86_64")]
            if fast && g + 8 <= outputs && kk0 + 8 <= kc {
                let at = (n0 + g) * k + ks.start + kk0;
                let o = panel[kk0 * MR + g..].as_mut_ptr();
                // SAFETY: AVX2 + F16C (checked); rows n0 + g .. + 8 of `a` hold 8 elements
                // from `at`, and `panel` rows kk0 .. + 8 hold columns g .. + 8.
                unsafe { a.transpose8(at, k, o, MR) };
                continue;
            }
            let cols = 8.min(kc - kk0);
            for i in g..g + 8 {
                if i < outputs {
                    let at = (n0 + i) * k + ks.start + kk0;
                    a.widen(at..at + cols, &mut tail[..cols]);
                } else {
                    tail[..cols].fill(0.0);
                }
                for (c, v) in tail[..cols].iter().enumerate() {
                    panel[(kk0 + c) * MR + i] = *v;
                }
            }
        }
    }
}

thread_local! {
    /// One unit's packed panels, on each thread of the pool (reused: a fresh 192 KiB per unit
    /// is an allocation and page faults).
    static PANELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// `c[t·cs + i] += Σ_kk a[kk·MR + i] · b[t·bs + kk]` for outputs `i < outputs` and tokens
    /// `t < tokens` (NR rows of `b` are read either way).
    ///
    /// # Safety
    /// AVX2 + FMA; `a` holds kc·MR floats, `b` NR rows of `bs` with kc readable from each, and
    /// `c` the outputs and tokens named.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: &[f32],
        b: *const f32,
        bs: usize,
        c: *mut f32,
        cs: usize,
        outputs: usize,
        tokens: usize,
    ) {
        debug_assert!(a.len() >= kc * MR);
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        // SAFETY: the caller's promise.
        unsafe {
            let pa = a.as_ptr();
            let pb: [*const f32; NR] = std::array::from_fn(|t| b.add(t * bs));
            for kk in 0..kc {
                let w0 = _mm256_loadu_ps(pa.add(kk * MR));
                let w1 = _mm256_loadu_ps(pa.add(kk * MR + 8));
                for t in 0..NR {
                    let v = _mm256_broadcast_ss(&*pb[t].add(kk));
                    acc[t][0] = _mm256_fmadd_ps(w0, v, acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(w1, v, acc[t][1]);
                }
            }
            if outputs == MR {
                for (t, acc) in acc.iter().enumerate().take(tokens) {
                    for (g, acc) in acc.iter().enumerate() {
                        let o = c.add(t * cs + g * 8);
                        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *acc));
                    }
                }
            } else {
                let mut s = [0f32; MR];
                for (t, acc) in acc.iter().enumerate().take(tokens) {
                    for (g, acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(s[g * 8..].as_mut_ptr(), *acc);
                    }
                    for (i, s) in s.iter().enumerate().take(outputs) {
                        *c.add(t * cs + i) += s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::kernels::Elems;
    use crate::rng::SplitMix64;

    fn rand(len: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..len).map(|_| r.unit() * 2.0 - 1.0).collect()
    }

    fn serial(n: usize, f: &(dyn Fn(usize) + Sync)) -> candle_core::Result<()> {
        (0..n).for_each(f);
        Ok(())
    }

    /// Against f64 sums, on ragged shapes (outputs not a multiple of 24 or 8, depth not of 256
    /// or 8, tokens not of 4) and both packers; y starts non-zero (the bias) and is added to.
    #[test]
    fn equals_the_product_on_ragged_shapes() -> candle_core::Result<()> {
        if !available() {
            return Ok(());
        }
        for (m, k, n) in [
            (9, 16, 24),
            (13, 300, 77),
            (4, 256, 48),
            (17, 520, 25),
            (1, 8, 1),
        ] {
            let x = rand(m * k, 1);
            let w = rand(n * k, 2);
            let y0 = rand(m * n, 3);
            let want: Vec<f64> = (0..m * n)
                .map(|c| {
                    let (i, j) = (c / n, c % n);
                    y0[c] as f64
                        + (0..k)
                            .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                            .sum::<f64>()
                })
                .collect();
            let packers: [(&str, Box<Pack<'_>>); 1] = [(
                "elems",
                Box::new(|n0, ks, p: &mut [f32]| pack_elems(Elems::F32(&w), k, n0, ks, p)),
            )];
            for (name, pack) in &packers {
                for threads in [1, 3] {
                    let mut y = y0.clone();
                    // SAFETY: available (checked); y is M·N and ours.
                    unsafe {
                        gemm_nk(
                            &x,
                            m,
                            k,
                            n,
                            SharedOut(y.as_mut_ptr()),
                            &**pack,
                            threads,
                            &serial,
                        )?
                    };
                    for (c, (g, r)) in y.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (k as f64).sqrt() * (1.0 + r.abs());
                        assert!(
                            (*g as f64 - r).abs() <= tol,
                            "{name} m={m} k={k} n={n} at ({}, {}): {g} vs {r}",
                            c / n,
                            c % n
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Halves pack to exactly their f32 values, tails included.
    #[test]
    fn halves_pack_to_their_values() {
        let (n, k) = (30, 21);
        let w = rand(n * k, 4);
        let h: Vec<u16> = w
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let b: Vec<u16> = w
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        for (name, e) in [("f16", Elems::F16(&h)), ("bf16", Elems::Bf16(&b))] {
            let mut wide = vec![0f32; n * k];
            e.widen(0..n * k, &mut wide);
            for n0 in [0, 24] {
                for ks in [0..16, 16..21, 0..21] {
                    let mut p = vec![f32::NAN; ks.len() * MR];
                    pack_elems(e, k, n0, ks.clone(), &mut p);
                    for kk in 0..ks.len() {
                        for i in 0..MR {
                            let want = if n0 + i < n {
                                wide[(n0 + i) * k + ks.start + kk]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                p[kk * MR + i],
                                want,
                                "{name} n0={n0} ks={ks:?} ({kk}, {i})"
                            );
                        }
                    }
                }
            }
        }
    }
}
