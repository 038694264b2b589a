//! `y = x Wᵀ + b`: a drop-in for `candle_nn::Linear` with a fast CPU path for decoding.
//!
//! Decoding feeds a few activation rows (one per sample) through every weight matrix, so each
//! token reads every weight once: a matrix-vector product, bound by memory bandwidth rather than
//! arithmetic. For up to [`MAX_FAST_ROWS`] rows on the CPU this layer streams each weight row once,
//! dots it with all the rows of `x` (f32 accumulation, AVX2 + FMA), and splits the weight rows
//! between the threads of a small pool (see [`pool`] for why not rayon). f16 and bf16 weights are
//! widened in registers (F16C), halving the bytes read. Everything else (prefill, GPU, other
//! dtypes) is candle_nn's matmul.

mod kernels;
mod pool;

use std::ops::Range;

use candle_core::{CpuStorage, DType, Module, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

use kernels::{simd, WeightRows};

/// Most rows of `x` (the product of its leading dims) for the fast path: a batch of samples in
/// decode. Prefill's hundreds of rows are gemm's job, which reuses each weight load across rows.
const MAX_FAST_ROWS: usize = 8;

/// Layers with fewer multiply-adds than this (M·N·K) run on the calling thread alone: sharing
/// the work would cost more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// A linear layer: `weight` (out, in), optional `bias` (out,).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight`: (out, in), contiguous for the fast path; `bias`: (out,). The weight may be f16
    /// or bf16 while activations are f32: the output then has the activations' dtype.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The (out, in) weight.
    #[allow(dead_code)] // candle_nn::Linear's accessor, kept for parity; the model needs none yet
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// candle_nn's forward (gemm). A weight of another dtype than `x` is cast to it first,
    /// on every call (cheap next to a many-row matmul, the only case that comes here).
    fn forward_matmul(&self, x: &Tensor) -> Result<Tensor> {
        let cast = |t: &Tensor| t.to_dtype(x.dtype());
        let bias = self.bias.as_ref().map(cast).transpose()?;
        candle_nn::Linear::new(cast(&self.weight)?, bias).forward(x)
    }

    /// The fast path, or `None` where it does not apply.
    fn forward_few_rows(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((&k, lead)) = x.dims().split_last() else {
            return Ok(None);
        };
        let m: usize = lead.iter().product();
        let Ok((n, w_in)) = self.weight.dims2() else {
            return Ok(None);
        };
        let fast = x.device().is_cpu()
            && self.weight.device().is_cpu()
            && (1..=MAX_FAST_ROWS).contains(&m)
            && w_in == k
            && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && (self.weight.dtype() == DType::F32 || simd::available());
        if !fast {
            return Ok(None);
        }
        // x as (M, K) f32, converted once; the bias as (N,) f32. Both tiny next to W.
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let b32 = match &self.bias {
            Some(b) if b.dims() == [n] => Some(b.to_dtype(DType::F32)?.contiguous()?),
            Some(_) => return Ok(None), // another shape broadcasts: candle's business
            None => None,
        };
        let (x_store, x_layout) = x32.storage_and_layout();
        let (w_store, w_layout) = self.weight.storage_and_layout();
        let b_store = b32.as_ref().map(|b| b.storage_and_layout());
        let xs = match (&*x_store, x_layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => &v[start..end],
            _ => return Ok(None),
        };
        let bias = match &b_store {
            Some((store, layout)) => match (&**store, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Some(&v[start..end]),
                _ => return Ok(None),
            },
            None => None,
        };
        let Some((w0, w1)) = w_layout.contiguous_offsets() else {
            return Ok(None); // a strided weight view: gemm handles it
        };
        let w = match &*w_store {
            Storage::Cpu(CpuStorage::F32(v)) => WeightRows::F32(&v[w0..w1]),
            Storage::Cpu(CpuStorage::F16(v)) => WeightRows::F16(v[w0..w1].reinterpret_cast()),
            Storage::Cpu(CpuStorage::BF16(v)) => WeightRows::BF16(v[w0..w1].reinterpret_cast()),
            _ => return Ok(None),
        };

        // y (M, N), row-major. A call of `work` fills columns `rows` (= weight rows) of every row.
        let mut y = vec![0f32; m * n];
        let out = SharedOut(y.as_mut_ptr());
        let work = |rows: Range<usize>| {
            let (j0, bias) = (rows.start, bias.map(|b| &b[rows.clone()]));
            let put = |r: usize, dots: &[f32]| {
                let b = bias.map_or(0.0, |b| b[r]);
                for (i, d) in dots.iter().enumerate() {
                    // SAFETY: i < M and j0 + r < N, so the index is inside y's M·N elements;
                    // column j0 + r belongs to this call's `rows` alone, so no other thread
                    // writes or reads it, and `y` outlives `pool::run`, which returns only once
                    // every call has finished.
                    unsafe { out.write(i * n + j0 + r, d + b) };
                }
            };
            w.dot_rows(xs, m, k, rows, put);
        };
        if m * n * k < MIN_PARALLEL_WORK {
            work(0..n);
        } else {
            // Chunks of ≥ 16 rows, ~8 per thread, so a slow thread's share can be taken over.
            let chunk = n.div_ceil(pool::threads() * 8).max(16);
            pool::run(n.div_ceil(chunk), &|c| {
                work(c * chunk..n.min((c + 1) * chunk))
            })
            .map_err(|p| candle_core::Error::Msg(format!("linear layer: {}", p.0)))?;
        }
        drop((x_store, w_store, b_store));

        let mut shape = x.dims().to_vec();
        shape[lead.len()] = n;
        let y = Tensor::from_vec(y, shape, x.device())?;
        Ok(Some(y.to_dtype(x.dtype())?))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_few_rows(x)? {
            Some(y) => Ok(y),
            None => self.forward_matmul(x),
        }
    }
}

/// The output buffer, written by several threads at disjoint indices.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// # Safety
    /// `i` must be inside the live buffer, and no other thread may access element `i` meanwhile.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(i) = v };
    }
}

// SAFETY: the pointer is only written through `write`, whose callers keep threads on disjoint
// elements of a buffer that outlives them.
unsafe impl Sync for SharedOut {}
// SAFETY: as for `Sync`.
unsafe impl Send for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Seeded uniform(-1, 1) values, so failures reproduce.
    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// max |a - b| / max |b|, in f32.
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(f32::MIN_POSITIVE))
    }

    /// Rows of x: 1-8 take the fast path, 9 and 17 candle's matmul.
    const ROWS: [usize; 7] = [1, 2, 3, 5, 8, 9, 17];
    /// (in, out): odd sizes (every loop of the kernels, on one thread: 37 = 2·16 + 5 and
    /// 61 = 3·16 + 8 + 5), and GPT-2's MLP (on the pool's threads).
    const SIZES: [(usize, usize); 3] = [(37, 101), (61, 67), (768, 3072)];

    /// f32: the fast path agrees with candle_nn to the rounding of a differently ordered f32 sum;
    /// the fallback *is* candle_nn, bit for bit.
    #[test]
    fn f32_matches_candle_nn() -> Result<()> {
        for (seed, &(k, n)) in SIZES.iter().enumerate() {
            let w = rand(&[n, k], seed as u64)?;
            for bias in [None, Some(rand(&[n], 100 + seed as u64)?)] {
                let ours = Linear::new(w.clone(), bias.clone());
                let theirs = candle_nn::Linear::new(w.clone(), bias);
                for m in ROWS {
                    let x = rand(&[m, k], 1000 + m as u64)?;
                    let (got, want) = (ours.forward(&x)?, theirs.forward(&x)?);
                    assert_eq!(got.dims(), &[m, n]);
                    let err = rel_err(&got, &want)?;
                    let tol = if m > MAX_FAST_ROWS { 0.0 } else { 1e-5 };
                    assert!(err <= tol, "m={m} k={k} n={n}: {err}");
                }
            }
        }
        Ok(())
    }

    /// A row's result is the same, bit for bit, whatever else is in the batch (so batched and
    /// single-sample generation agree exactly).
    #[test]
    fn rows_do_not_depend_on_the_batch() -> Result<()> {
        for (k, n) in SIZES {
            let layer = Linear::new(rand(&[n, k], 1)?, Some(rand(&[n], 2)?));
            let x = rand(&[MAX_FAST_ROWS, k], 3)?;
            let all = layer.forward(&x)?;
            for m in 1..=MAX_FAST_ROWS {
                let some = layer.forward(&x.narrow(0, 0, m)?)?;
                let diff = (&some - &all.narrow(0, 0, m)?)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "m={m} k={k} n={n}");
            }
        }
        Ok(())
    }

    /// (B, T, C) inputs, contiguous, strided (copied first) or offset (the last position, as
    /// the LM head sees it), and a strided weight view (which goes to candle).
    #[test]
    fn batched_strided_and_offset_inputs() -> Result<()> {
        let (k, n) = (37, 101);
        let (w, b) = (rand(&[n, k], 1)?, rand(&[n], 2)?);
        let ours = Linear::new(w.clone(), Some(b.clone()));
        let theirs = candle_nn::Linear::new(w, Some(b));
        let check = |x: &Tensor| -> Result<()> {
            let (got, want) = (ours.forward(x)?, theirs.forward(x)?);
            assert_eq!(got.dims(), want.dims());
            assert!(rel_err(&got, &want)? <= 1e-5, "{:?}", x.dims());
            Ok(())
        };
        for (b, t) in [(1, 1), (2, 3), (4, 2), (3, 3), (1, 17)] {
            check(&rand(&[b, t, k], (b * 10 + t) as u64)?)?;
            check(&rand(&[t, b, k], 7)?.transpose(0, 1)?)?;
        }
        check(&rand(&[1, 5, k], 9)?.narrow(1, 4, 1)?)?;
        let w_view = rand(&[k, n], 3)?.t()?; // (out, in), not contiguous
        let x = rand(&[2, k], 4)?;
        let want = x.matmul(&rand(&[k, n], 3)?)?;
        assert!(rel_err(&Linear::new(w_view, None).forward(&x)?, &want)? <= 1e-5);
        Ok(())
    }

    /// f16/bf16 weights, f32 activations: widening a half is exact, so the result is the f32
    /// product with the rounded weights, to the same 1e-5, on the fast path and the fallback
    /// (which casts the weights to f32 per call) alike.
    #[test]
    fn half_weights_f32_activations() -> Result<()> {
        for dtype in [DType::F16, DType::BF16] {
            for (seed, &(k, n)) in SIZES.iter().enumerate() {
                let w = rand(&[n, k], seed as u64)?.to_dtype(dtype)?;
                let b = rand(&[n], 50)?.to_dtype(dtype)?;
                let ours = Linear::new(w.clone(), Some(b.clone()));
                let exact =
                    candle_nn::Linear::new(w.to_dtype(DType::F32)?, Some(b.to_dtype(DType::F32)?));
                for m in ROWS {
                    let x = rand(&[m, k], 1000 + m as u64)?;
                    let got = ours.forward(&x)?;
                    assert_eq!(got.dtype(), DType::F32);
                    let err = rel_err(&got, &exact.forward(&x)?)?;
                    assert!(err <= 1e-5, "{dtype:?} m={m} k={k} n={n}: {err}");
                }
            }
        }
        Ok(())
    }

    /// All-half layers (`--dtype f16`/`bf16`): the fast path accumulates in f32 and rounds once,
    /// so it is within half an output ulp (relative 2⁻¹¹ for f16, 2⁻⁸ for bf16) of the exact
    /// product of the rounded inputs. candle's matmul (the fallback, M > 8) rounds twice (the
    /// product, then the sum with the bias): up to twice that (measured: 1.4x f16, 1.5x bf16).
    #[test]
    fn half_weights_half_activations() -> Result<()> {
        for (dtype, half_ulp) in [(DType::F16, 2f32.powi(-11)), (DType::BF16, 2f32.powi(-8))] {
            let (k, n) = (768, 3072);
            let w = rand(&[n, k], 5)?.to_dtype(dtype)?;
            let b = rand(&[n], 6)?.to_dtype(dtype)?;
            let ours = Linear::new(w.clone(), Some(b.clone()));
            let exact =
                candle_nn::Linear::new(w.to_dtype(DType::F32)?, Some(b.to_dtype(DType::F32)?));
            for m in ROWS {
                let x = rand(&[1, m, k], m as u64)?.to_dtype(dtype)?;
                let got = ours.forward(&x)?;
                assert_eq!((got.dtype(), got.dims()), (dtype, &[1, m, n][..]));
                let err = rel_err(&got, &exact.forward(&x.to_dtype(DType::F32)?)?)?;
                let fast = m <= MAX_FAST_ROWS && simd::available();
                let tol = if fast { half_ulp } else { 2.0 * half_ulp };
                assert!(err <= tol, "{dtype:?} m={m}: {err}");
            }
        }
        Ok(())
    }

    /// The portable kernel (f32 without AVX2, and off x86) against candle.
    #[test]
    fn portable_kernel_matches() -> Result<()> {
        let (k, n, m) = (37, 101, 3);
        let (w, x) = (rand(&[n, k], 11)?, rand(&[m, k], 12)?);
        let want = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let (w, x) = (
            w.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut got = vec![0f32; m * n];
        kernels::portable::dot_rows(&x, m, &w, k, |r, dots| {
            dots.iter()
                .enumerate()
                .for_each(|(i, d)| got[i * n + r] = *d)
        });
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-5, "{err}");
        Ok(())
    }

    /// Threads sharing one layer (and so the pool) each get their own, correct result.
    #[test]
    fn concurrent_callers() -> Result<()> {
        let (k, n) = (768, 3072);
        let layer = Linear::new(rand(&[n, k], 21)?, Some(rand(&[n], 22)?));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let layer = &layer;
                    s.spawn(move || -> Result<()> {
                        let x = rand(&[1, k], 30 + t)?;
                        let want =
                            candle_nn::Linear::new(layer.weight().clone(), layer.bias.clone())
                                .forward(&x)?;
                        for _ in 0..5 {
                            assert!(rel_err(&layer.forward(&x)?, &want)? <= 1e-5);
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap())
        })
    }

    /// Speed against candle on GPT-2-small's decode shapes, weights cold as in decode (more
    /// copies than the L3 holds, taken in turn). Not a check: run with
    /// `cargo test --release --lib linear::tests::speed -- --ignored --nocapture` (M=rows).
    #[test]
    #[ignore]
    fn speed() -> Result<()> {
        use std::time::Instant;
        let m: usize = std::env::var("M")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let shapes = [
            ("c_attn", 2304, 768),
            ("attn.c_proj", 768, 768),
            ("c_fc", 3072, 768),
            ("mlp.c_proj", 768, 3072),
            ("lm_head", 50257, 768),
        ];
        for (name, n, k) in shapes {
            for dtype in [DType::F32, DType::F16] {
                let bytes = n * k * dtype.size_in_bytes();
                let copies = (256 << 20) / bytes + 1;
                let ws = (0..copies)
                    .map(|i| rand(&[n, k], i as u64)?.to_dtype(dtype))
                    .collect::<Result<Vec<_>>>()?;
                let x = rand(&[1, m, k], 0)?.to_dtype(dtype)?;
                let best = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<f64> {
                    let mut best = f64::MAX;
                    for i in 0..3 * copies.max(10) {
                        let t = Instant::now();
                        f(&ws[i % copies])?;
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    Ok(best)
                };
                let ours = best(&|w| Linear::new(w.clone(), None).forward(&x))?;
                let theirs = best(&|w| candle_nn::Linear::new(w.clone(), None).forward(&x))?;
                let gbs = |t: f64| bytes as f64 / t / 1e9;
                println!(
                    "{name:>11} {dtype:?} M={m}: ours {:7.1} us {:5.1} GB/s, candle {:7.1} us {:5.1} GB/s",
                    ours * 1e6, gbs(ours), theirs * 1e6, gbs(theirs)
                );
            }
        }
        Ok(())
    }
}
