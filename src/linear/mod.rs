//! `y = x W + b` (GPT-2's `Conv1D`), with the weights where they are cheapest to read.
//!
//! On the CPU the weights stay as the checkpoint stores them when they can: an f32 `Conv1D`
//! weight (in, out) is read straight from the memory-mapped safetensors file (no copy, no
//! transpose: loading costs nothing and memory holds one copy). Weights converted at load are
//! f16/bf16 (same layout, half the bytes) or 8/4-bit blocks ([`quant`], rows of (out, in)).
//!
//! - Few rows of `x` (decode: one per sample) read every weight once, so bandwidth sets the
//!   speed: [`kernels`] stream the weights in memory order on a small pool of threads ([`pool`]).
//! - Many rows (prefill) go to the `gemm` crate (candle's own, with its AVX-512 kernels on) on
//!   the f32 weights as they lie; halves and blocks go to [`panel`]'s driver, which widens them
//!   into the panels its microkernel reads (without AVX2: widened for gemm first).
//! - On a GPU (or with [`Matrix::Tensor`] on the CPU) it is candle's matmul.

mod activation;
mod decode;
pub(crate) mod kernels;
pub(crate) mod panel;
mod prefill;
pub(crate) mod quant;
pub(crate) mod storage;

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

use crate::config::Activation;
use crate::pool;
use activation::{activate_rows, activate_tensor};
use prefill::MAX_WIDENED;
use storage::Matrix;

/// Most rows of `x` (the product of its leading dims) for the decode kernels: a batch of
/// samples. More rows are gemm's job, which reuses each weight load across rows.
pub(crate) const MAX_FAST_ROWS: usize = 8;

/// Layers with fewer multiply-adds than this (M·N·K) run on the calling thread alone: sharing
/// the work would cost more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// A linear layer `y = x W + b` of `k` inputs and `n` outputs.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    w: Matrix,
    /// (N,) in the activations' dtype, for candle's path.
    bias: Option<Tensor>,
    /// (N,) f32, for the host kernels.
    bias_host: Option<Vec<f32>>,
    k: usize,
    n: usize,
}

impl Linear {
    /// A layer of `k` inputs and `n` outputs; `bias` (N,).
    pub(crate) fn new(w: Matrix, bias: Option<Tensor>, k: usize, n: usize) -> Result<Self> {
        let bias_host = match (&w, &bias) {
            (Matrix::Tensor(_), _) | (_, None) => None,
            (_, Some(b)) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        };
        Ok(Self {
            w,
            bias,
            bias_host,
            k,
            n,
        })
    }

    /// The bias (N,), if any.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The whole weight matrix as (K, N) f32 on `device`: widened, dequantized or transposed
    /// as its storage needs (for analyses; small matrices).
    pub(crate) fn weight_kn(&self, device: &candle_core::Device) -> Result<Tensor> {
        let (k, n) = (self.k, self.n);
        let w = match &self.w {
            Matrix::Tensor(t) => return t.to_dtype(DType::F32),
            Matrix::InOut(e) => {
                let mut v = vec![0f32; k * n];
                e.elems().widen(0..k * n, &mut v);
                Tensor::from_vec(v, (k, n), device)?
            }
            Matrix::OutIn(e) => {
                let mut v = vec![0f32; k * n];
                e.elems().widen(0..k * n, &mut v);
                Tensor::from_vec(v, (n, k), device)?.t()?.contiguous()?
            }
            Matrix::Quant(q) => {
                let mut v = vec![0f32; k * n];
                for (j, row) in v.chunks_exact_mut(k).enumerate() {
                    q.dequantize_row(j, row);
                }
                Tensor::from_vec(v, (n, k), device)?.t()?.contiguous()?
            }
        };
        Ok(w)
    }

    /// Column `j` of the (K, N) weights: output `j`'s (K,) weights, f32.
    pub(crate) fn column(&self, j: usize, device: &candle_core::Device) -> Result<Tensor> {
        let k = self.k;
        if j >= self.n {
            candle_core::bail!("output {j} of a layer with {} outputs", self.n);
        }
        let mut v = vec![0f32; k];
        match &self.w {
            Matrix::Tensor(t) => return t.narrow(1, j, 1)?.squeeze(1)?.to_dtype(DType::F32),
            Matrix::OutIn(e) => e.elems().widen(j * k..(j + 1) * k, &mut v),
            Matrix::Quant(q) => q.dequantize_row(j, &mut v),
            Matrix::InOut(e) => {
                let mut row = vec![0f32; self.n];
                for (kk, out) in v.iter_mut().enumerate() {
                    e.elems().widen(kk * self.n..(kk + 1) * self.n, &mut row);
                    *out = row[j];
                }
            }
        }
        Tensor::from_vec(v, k, device)
    }

    /// Bytes the weights take.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.w {
            Matrix::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Matrix::InOut(e) | Matrix::OutIn(e) => self.k * self.n * e.dtype().size_in_bytes(),
            Matrix::Quant(q) => q.bytes(),
        }
    }

    /// (..., K) -> (..., N): `x W + b`, then `act` when given.
    pub(crate) fn forward(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        self.forward_as(x, act, false)
    }

    /// [`Linear::forward`] for rows that belong to different sequences (a batched decode step):
    /// on the host every row goes through the decode kernels, [`MAX_FAST_ROWS`] at a time, so
    /// each row's result is the one it gets alone, bit for bit, however many rows there are.
    pub(crate) fn forward_rows(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        self.forward_as(x, act, true)
    }

    fn forward_as(&self, x: &Tensor, act: Option<Activation>, by_rows: bool) -> Result<Tensor> {
        let Matrix::Tensor(w) = &self.w else {
            return self.forward_host(x, act, by_rows);
        };
        let y = x.broadcast_matmul(&w.to_dtype(x.dtype())?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        match act {
            None => Ok(y),
            Some(a) => activate_tensor(&y, a),
        }
    }

    fn forward_host(&self, x: &Tensor, act: Option<Activation>, by_rows: bool) -> Result<Tensor> {
        let Some((&k, lead)) = x.dims().split_last() else {
            candle_core::bail!("linear layer: a scalar input");
        };
        if k != self.k || !x.device().is_cpu() {
            candle_core::bail!(
                "linear layer: input (..., {k}) on {:?} for a ({}, {}) layer on the CPU",
                x.device(),
                self.k,
                self.n
            );
        }
        let m: usize = lead.iter().product();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let mut y = vec![0f32; m * self.n];
        {
            let (store, layout) = x32.storage_and_layout();
            let xs = match (&*store, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
                _ => candle_core::bail!("linear layer: input not on the host"),
            };
            // Quantized weights multiply in integers at every M where the SIMD kernels run,
            // as llama.cpp's do: quantized prefill is the decode kernels, 8 rows at a time.
            let int8 = matches!(self.w, Matrix::Quant(_)) && quant::simd_kernels();
            if m <= MAX_FAST_ROWS || by_rows || int8 {
                self.decode(xs, m, act, &mut y)?;
            } else {
                self.prefill(xs, m, &mut y, panel::available(), MAX_WIDENED)?;
                if let Some(a) = act {
                    activate_rows(&mut y, self.n, a)?;
                }
            }
        }
        let mut shape = x.dims().to_vec();
        shape[lead.len()] = self.n;
        Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())
    }
}

/// The CPU's SIMD features that matter here, as `/proc/cpuinfo` spells them, and the kernel
/// each path runs on this CPU (chosen at run time): for benchmark tables.
pub(crate) fn kernel_choices() -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &str| match f {
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            "f16c" => is_x86_feature_detected!("f16c"),
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx512bw" => is_x86_feature_detected!("avx512bw"),
            "avx512vl" => is_x86_feature_detected!("avx512vl"),
            "avx512_vnni" => is_x86_feature_detected!("avx512vnni"),
            "avx512_bf16" => is_x86_feature_detected!("avx512bf16"),
            _ => false,
        };
        let features = [
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx512_bf16",
        ]
        .into_iter()
        .filter(|f| has(f))
        .collect();
        let simd = kernels::simd::available();
        let pick = |yes: &'static str, no: &'static str| if simd { yes } else { no };
        let quant = quant::kernel_name();
        let gemm = if has("avx512f") {
            "gemm crate, AVX-512"
        } else {
            "gemm crate, AVX2"
        };
        let kernels = vec![
            ("decode f32/f16/bf16", pick("AVX2 + FMA + F16C", "portable")),
            ("decode q8_0/q4_0/q4_k", quant),
            ("prefill f32", gemm),
            (
                "prefill f16/bf16",
                pick("panel 16x6 FMA (AVX2)", "widened to f32, then gemm"),
            ),
            (
                "prefill q8_0/q4_0/q4_k",
                pick(quant, "widened to f32, then gemm"),
            ),
        ];
        (features, kernels)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (
            Vec::new(),
            vec![
                (
                    "decode f32/f16/bf16",
                    if cfg!(target_arch = "aarch64") {
                        "NEON FMA"
                    } else {
                        "portable"
                    },
                ),
                ("decode q8_0/q4_0/q4_k", quant::kernel_name()),
                ("prefill f32", "gemm crate"),
                ("prefill f16/bf16", "widened to f32, then gemm"),
                (
                    "prefill q8_0/q4_0/q4_k",
                    if quant::simd_kernels() {
                        quant::kernel_name()
                    } else {
                        "widened to f32, then gemm"
                    },
                ),
            ],
        )
    }
}

/// `f(c)` for every chunk `c < n`: on the pool, or here when the work is small.
fn run(parallel: bool, n: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()> {
    if parallel {
        pool::run(n, f).map_err(|p| candle_core::Error::Msg(format!("linear layer: {}", p.0)))
    } else {
        (0..n).for_each(f);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::activation::{gelu_tanh, tanh};
    use super::quant::QuantMatrix;
    use super::storage::{Buf, HostElems};
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut r = SplitMix64::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn host(t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

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

    /// Every storage of the same (K, N) weights, as the checkpoint makes them.
    fn layers(w_kn: &Tensor, bias: &Tensor, dtype: DType) -> Result<Vec<(String, Linear)>> {
        let (k, n) = w_kn.dims2()?;
        let w = w_kn.to_dtype(dtype)?;
        let kn = host(&w.to_dtype(DType::F32)?)?;
        let nk = host(&w.to_dtype(DType::F32)?.t()?.contiguous()?)?;
        let elems = |v: &[f32]| match dtype {
            DType::F16 => HostElems::F16(Buf::owned(
                v.iter()
                    .map(|x| half::f16::from_f32(*x).to_bits())
                    .collect(),
            )),
            DType::BF16 => HostElems::Bf16(Buf::owned(
                v.iter()
                    .map(|x| half::bf16::from_f32(*x).to_bits())
                    .collect(),
            )),
            _ => HostElems::F32(Buf::owned(v.to_vec())),
        };
        let b = Some(bias.clone());
        Ok(vec![
            (
                "tensor".into(),
                Linear::new(Matrix::Tensor(w.clone()), b.clone(), k, n)?,
            ),
            (
                "in-out".into(),
                Linear::new(Matrix::InOut(elems(&kn)), b.clone(), k, n)?,
            ),
            (
                "out-in".into(),
                Linear::new(Matrix::OutIn(elems(&nk)), b, k, n)?,
            ),
        ])
    }

    /// Rows of x: 1-8 take the decode kernels, 9 and 17 gemm.
    const ROWS: [usize; 7] = [1, 2, 3, 5, 8, 9, 17];
    /// (in, out): odd sizes reach every tail (one thread), GPT-2's MLP (the pool's threads).
    const SIZES: [(usize, usize); 3] = [(37, 101), (61, 67), (768, 3072)];

    #[test]
    fn every_storage_and_path_equals_the_product() -> Result<()> {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (seed, &(k, n)) in SIZES.iter().enumerate() {
                let w = rand(&[k, n], seed as u64)?;
                let b = rand(&[n], 50 + seed as u64)?;
                // The exact product with the stored (rounded) weights, in f32.
                let w_exact = w.to_dtype(dtype)?.to_dtype(DType::F32)?;
                for (name, layer) in layers(&w, &b, dtype)? {
                    for m in ROWS {
                        let x = rand(&[1, m, k], 1000 + m as u64)?;
                        let want = x.broadcast_matmul(&w_exact)?.broadcast_add(&b)?;
                        let got = layer.forward(&x, None)?;
                        assert_eq!(got.dims(), &[1, m, n]);
                        let tol = if name == "tensor" && dtype != DType::F32 {
                            1e-2
                        } else {
                            1e-5
                        };
                        let err = rel_err(&got, &want)?;
                        assert!(err <= tol, "{dtype:?} {name} m={m} k={k} n={n}: {err}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Prefill of halves and blocks too large to widen whole (the tied LM head of a big
    /// vocabulary) goes a slab of outputs at a time without AVX2: forced here on a small matrix,
    /// and compared with the panel driver where it runs.
    #[test]
    fn prefill_by_slabs_equals_prefill_widened_whole() -> Result<()> {
        let (k, n, m) = (64, 600, 11);
        let w = rand(&[k, n], 9)?;
        let nk = host(&w.t()?.contiguous()?)?;
        let f16: Vec<u16> = nk
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let q = QuantMatrix::quantize(quant::QuantKind::Q4_0, n, k, |j, out| {
            out.copy_from_slice(&nk[j * k..][..k])
        });
        let x = host(&rand(&[m, k], 10)?)?;
        for w in [
            Matrix::OutIn(HostElems::F16(Buf::owned(f16))),
            Matrix::Quant(Arc::new(q)),
        ] {
            let layer = Linear::new(w, Some(rand(&[n], 11)?), k, n)?;
            let (mut whole, mut slabs) = (vec![0f32; m * n], vec![0f32; m * n]);
            layer.prefill(&x, m, &mut whole, false, MAX_WIDENED)?;
            layer.prefill(&x, m, &mut slabs, false, 0)?;
            let mut paths = vec![("slabs", slabs)];
            if panel::available() {
                let mut panels = vec![0f32; m * n];
                layer.prefill(&x, m, &mut panels, true, MAX_WIDENED)?;
                paths.push(("panels", panels));
            }
            let scale = whole.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (name, y) in paths {
                let diff = whole
                    .iter()
                    .zip(&y)
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(diff <= 1e-5 * scale, "{name}: {diff} of {scale}");
            }
        }
        Ok(())
    }

    #[test]
    fn quantized_layers_equal_their_dequantized_weights() -> Result<()> {
        let (k, n) = (96, 75);
        let w = rand(&[k, n], 3)?;
        let nk = host(&w.t()?.contiguous()?)?;
        for kind in [quant::QuantKind::Q8_0, quant::QuantKind::Q4_0] {
            let q =
                QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&nk[j * k..][..k]));
            let mut deq = vec![0f32; n * k];
            for j in 0..n {
                q.dequantize_row(j, &mut deq[j * k..(j + 1) * k]);
            }
            let w_deq = Tensor::from_vec(deq, (n, k), &Device::Cpu)?.t()?;
            let layer = Linear::new(Matrix::Quant(Arc::new(q)), None, k, n)?;
            for m in ROWS {
                let x = rand(&[m, k], 7 + m as u64)?;
                let err = rel_err(&layer.forward(&x, None)?, &x.matmul(&w_deq)?)?;
                // The activations are quantized too, as llama.cpp does (prefill without AVX2
                // multiplies f32 activations by the dequantized weights).
                let tol = if m <= MAX_FAST_ROWS || quant::simd_kernels() {
                    1e-2
                } else {
                    1e-5
                };
                assert!(err <= tol, "{kind:?} m={m}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_fused_activation_equals_candles() -> Result<()> {
        let (k, n) = (61, 67);
        let w = rand(&[k, n], 1)?;
        for (name, layer) in layers(&w, &rand(&[n], 2)?, DType::F32)? {
            for m in [1, 3, 17] {
                let x = (rand(&[m, k], 3)? * 0.3)?;
                for act in [Activation::GeluNew, Activation::Gelu, Activation::Relu] {
                    let want = activate_tensor(&layer.forward(&x, None)?, act)?;
                    let got = layer.forward(&x, Some(act))?;
                    let err = (got - &want)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    assert!(err <= 2e-6, "{name} {act:?} m={m}: {err}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn tanh_and_gelu_are_accurate() {
        let mut worst = (0f64, 0f64);
        for i in -20000..=20000 {
            let x = i as f32 * 1e-3; // -20 .. 20
            let t = (tanh(x) as f64 - (x as f64).tanh()).abs();
            let g = gelu_tanh(x) as f64;
            let u = 0.7978845608028654 * (x as f64 + 0.044715 * (x as f64).powi(3));
            let g_ref = 0.5 * x as f64 * (1.0 + u.tanh());
            worst = (
                worst.0.max(t),
                worst.1.max((g - g_ref).abs() / g_ref.abs().max(1.0)),
            );
        }
        assert!(worst.0 < 2e-7 && worst.1 < 1e-6, "{worst:?}");
    }

    /// A row's result is the same, bit for bit, whatever else is in the batch (so batched and
    /// single-sample generation agree exactly).
    #[test]
    fn rows_do_not_depend_on_the_batch() -> Result<()> {
        for (k, n) in SIZES {
            let all_layers = layers(&rand(&[k, n], 1)?, &rand(&[n], 2)?, DType::F32)?;
            // (candle's gemm, the GPU path, promises no such thing.)
            for (name, layer) in all_layers.into_iter().filter(|(n, _)| n != "tensor") {
                let x = rand(&[MAX_FAST_ROWS, k], 3)?;
                let all = layer.forward(&x, None)?;
                for m in 1..=MAX_FAST_ROWS {
                    let some = layer.forward(&x.narrow(0, 0, m)?, None)?;
                    let diff = (&some - &all.narrow(0, 0, m)?)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?;
                    assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name} m={m} k={k} n={n}");
                }
            }
        }
        Ok(())
    }

    /// Quantized prefill (where the SIMD kernels run) is integer products on the decode
    /// kernels: each row of a prompt bit for bit the row alone, weight chunks shared by 8 rows
    /// at a time, at sizes whose chunks hold a partial tile.
    #[test]
    fn quantized_prefill_rows_equal_each_row_alone() -> Result<()> {
        if !quant::simd_kernels() {
            return Ok(());
        }
        for (k, n) in [(64, 37), (96, 600), (32, 2053), (512, 45)] {
            let w = rand(&[k, n], 21)?;
            let nk = host(&w.t()?.contiguous()?)?;
            for kind in [
                quant::QuantKind::Q8_0,
                quant::QuantKind::Q4_0,
                quant::QuantKind::Q6,
                quant::QuantKind::Q4K,
            ] {
                let q = QuantMatrix::quantize(kind, n, k, |j, out| {
                    out.copy_from_slice(&nk[j * k..][..k])
                });
                let layer = Linear::new(Matrix::Quant(Arc::new(q)), Some(rand(&[n], 22)?), k, n)?;
                for m in [9, 17, 40] {
                    let x = rand(&[m, k], 23 + m as u64)?;
                    let all = layer.forward(&x, Some(Activation::GeluNew))?;
                    for i in 0..m {
                        let one = layer.forward(&x.narrow(0, i, 1)?, Some(Activation::GeluNew))?;
                        let same = one.flatten_all()?.to_vec1::<f32>()?
                            == all.narrow(0, i, 1)?.flatten_all()?.to_vec1::<f32>()?;
                        assert!(same, "{kind:?} ({k}, {n}) m={m} row {i}");
                    }
                }
            }
        }
        Ok(())
    }

    /// `forward_rows`, a batched decode step's product: past 8 rows, a pass per 8, each row bit
    /// for bit the row alone, for every host storage.
    #[test]
    fn forward_rows_equal_each_row_alone() -> Result<()> {
        for (k, n) in SIZES {
            let w = rand(&[k, n], 1)?;
            let b = rand(&[n], 2)?;
            let mut all_layers: Vec<(String, Linear)> = layers(&w, &b, DType::F32)?;
            all_layers.extend(layers(&w, &b, DType::F16)?);
            if k % 32 == 0 {
                let nk = host(&w.t()?.contiguous()?)?;
                for kind in [quant::QuantKind::Q8_0, quant::QuantKind::Q4_0] {
                    let q = QuantMatrix::quantize(kind, n, k, |j, out| {
                        out.copy_from_slice(&nk[j * k..][..k])
                    });
                    let layer = Linear::new(Matrix::Quant(Arc::new(q)), Some(b.clone()), k, n)?;
                    all_layers.push((format!("{kind:?}"), layer));
                }
            }
            for (name, layer) in all_layers.into_iter().filter(|(n, _)| n != "tensor") {
                for m in [9, 11, 16, 19] {
                    let x = rand(&[m, 1, k], 4 + m as u64)?;
                    let all = layer.forward_rows(&x, None)?;
                    for i in 0..m {
                        let one = layer.forward(&x.narrow(0, i, 1)?, None)?;
                        let diff = (&one - &all.narrow(0, i, 1)?)?
                            .abs()?
                            .flatten_all()?
                            .max(0)?;
                        assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name} m={m} row {i}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Threads sharing one layer (and so the pool) each get their own, correct result.
    #[test]
    fn concurrent_callers() -> Result<()> {
        let (k, n) = (768, 3072);
        let w = rand(&[k, n], 21)?;
        let b = rand(&[n], 22)?;
        let layers = layers(&w, &b, DType::F32)?;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let layers = &layers;
                    let (w, b) = (&w, &b);
                    s.spawn(move || -> Result<()> {
                        let x = rand(&[1, k], 30 + t)?;
                        let want = x.matmul(w)?.broadcast_add(b)?;
                        for _ in 0..5 {
                            for (_, l) in layers.iter() {
                                assert!(rel_err(&l.forward(&x, None)?, &want)? <= 1e-5);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| candle_core::Error::Msg("panicked".into()))?
            })
        })
    }
}
