//! How weight matrices are stored, decided in one place: the checkpoint's tensors ([`Entry`])
//! become a [`Matrix`] in the form its products read fastest, as the [`Target`] asks.
//!
//! - f32 on the host: read where it lies in the mapped file, `wte` (vocab, C) as (out, in), a
//!   `Conv1D` as (in, out) (no copy, no transpose; gemm packs (in, out) faster).
//! - f16/bf16 on the host: converted anyway, so a `Conv1D` is also transposed once to (out, in):
//!   decode then reads each output's weights as one contiguous row.
//! - 8/4-bit blocks (`quant`): rows of (out, in); the embedding / LM head at 6 bits under 4-bit.
//! - Off the host: a candle tensor (in, out) for candle's matmul.
//!
//! The checkpoint checks every value finite as f32; here each is checked again in the form it
//! is used, as it is made: a finite 1e30 is inf in f16, and a block whose f16 scale overflows
//! dequantizes to NaN.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::kernels::{transpose_into, Elems};
use super::quant::{QuantKind, QuantMatrix, BLOCK};
use super::Linear;
use crate::checkpoint::{Entry, Weights};
use crate::error::{Error, Result};
use crate::options::{LoadOptions, Quantization};
use crate::pool::SharedOut;

/// A slice of weights: borrowed from a memory-mapped file, or owned.
#[derive(Debug, Clone)]
pub(crate) enum Buf<T: bytemuck::Pod> {
    /// Shared, so a tied `wte` is one copy for the embedding and the LM head.
    Owned(Arc<Vec<T>>),
    /// Bytes `range` of `map`, aligned for `T` (checked when made).
    Mapped {
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
        _elem: std::marker::PhantomData<T>,
    },
}

impl<T: bytemuck::Pod> Buf<T> {
    pub(crate) fn owned(v: Vec<T>) -> Self {
        Self::Owned(Arc::new(v))
    }

    /// `range` of `map` as `T`s, or `None` if it is not aligned for them.
    pub(crate) fn mapped(map: &Arc<memmap2::Mmap>, range: Range<usize>) -> Option<Self> {
        bytemuck::try_cast_slice::<u8, T>(map.get(range.clone())?).ok()?;
        Some(Self::Mapped {
            map: map.clone(),
            range,
            _elem: std::marker::PhantomData,
        })
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Self::Owned(v) => v,
            // Alignment and bounds were checked in `mapped`.
            Self::Mapped { map, range, .. } => bytemuck::cast_slice(&map[range.clone()]),
        }
    }
}

/// Host weights in their stored element type.
#[derive(Debug, Clone)]
pub(crate) enum HostElems {
    F32(Buf<f32>),
    F16(Buf<u16>),
    Bf16(Buf<u16>),
}

impl HostElems {
    pub(crate) fn elems(&self) -> Elems<'_> {
        match self {
            Self::F32(b) => Elems::F32(b.as_slice()),
            Self::F16(b) => Elems::F16(b.as_slice()),
            Self::Bf16(b) => Elems::Bf16(b.as_slice()),
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::F16(_) => DType::F16,
            Self::Bf16(_) => DType::BF16,
        }
    }
}

/// A weight matrix and where its products run.
#[derive(Debug, Clone)]
pub(crate) enum Matrix {
    /// (in, out), for candle's matmul: GPUs.
    Tensor(Tensor),
    /// (in, out), row-major, on the host: `Conv1D` as stored.
    InOut(HostElems),
    /// (out, in), row-major, on the host: `wte` as the tied LM head.
    OutIn(HostElems),
    /// (out, in) in 8- or 4-bit blocks along `in`.
    Quant(Arc<QuantMatrix>),
}

/// How the big matrices are stored: a dtype, or 8/4-bit blocks (CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    Dtype(DType),
    Quant(QuantKind),
}

impl Storage {
    /// Bytes `elements` weights take in this storage.
    pub(crate) fn bytes(self, elements: u128) -> u128 {
        let (num, den) = match self {
            Self::Dtype(d) => (d.size_in_bytes() as u128, 1),
            // The quants and the f16 scale(s) per block.
            Self::Quant(q) => (
                (q.block_bytes() + 2 * q.scales()) as u128,
                q.block_len() as u128,
            ),
        };
        elements.saturating_mul(num) / den
    }

    /// `f32`, `q8_0`, ...: for messages, as the stats line names them.
    pub(crate) fn label(self) -> String {
        match self {
            Self::Dtype(d) => d.as_str().to_string(),
            Self::Quant(q) => q.name().to_string(),
        }
    }
}

/// Where weights go and in what form.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) storage: Storage,
    /// The dtype of activations, and so of biases, layer norms and `wpe`.
    pub(crate) act_dtype: DType,
    pub(crate) device: Device,
    /// Matrices stay on the host for the CPU kernels (else: candle tensors, for GPUs).
    pub(crate) host: bool,
    /// f32 weights may be read from the mapped file in place.
    pub(crate) mmap: bool,
}

impl Target {
    /// What `opts` ask for: activations in f32 on the host (weights are widened as they are
    /// read), in the weights' dtype on a GPU; quantized blocks on the host only.
    pub(crate) fn new(opts: &LoadOptions) -> Result<Self> {
        let host = opts.device.is_cpu();
        let storage = match opts.quantize {
            None => Storage::Dtype(opts.dtype),
            Some(_) if !host => {
                return Err(Error::param(
                    "quantize",
                    "runs on the CPU only; use --dtype f16 on a GPU",
                ))
            }
            Some(Quantization::Q8_0) => Storage::Quant(QuantKind::Q8_0),
            Some(Quantization::Q4_0) => Storage::Quant(QuantKind::Q4_0),
            Some(Quantization::Q4K) => Storage::Quant(QuantKind::Q4K),
        };
        Ok(Self {
            storage,
            act_dtype: if host { DType::F32 } else { opts.dtype },
            device: opts.device.clone(),
            host,
            mmap: opts.mmap,
        })
    }

    /// The weights are used where they lie in the mapped file (f32 on the host).
    pub(crate) fn in_place(&self) -> bool {
        self.host && self.mmap && self.storage == Storage::Dtype(DType::F32)
    }
}

/// A checkpoint's tensors made into layers as a [`Target`] says.
pub(crate) struct Loader {
    pub(crate) weights: Weights,
    pub(crate) target: Target,
}

impl Loader {
    /// A vector of `shape` (biases, layer norms, `wpe`) in the activations' dtype on the device.
    /// Checked finite in that dtype (f16 on a GPU turns a bias of 1e5 into inf).
    pub(crate) fn vector(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = &self.target;
        let v = self.weights.get(name, shape)?.to_dtype(t.act_dtype)?;
        check_cast(&v, || self.weights.entry(name, shape))?;
        Ok(v.to_device(&t.device)?)
    }

    /// An HF `Conv1D` (`y = x W + b`, `W` stored (in, out)).
    pub(crate) fn conv1d(&self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let w = self.matrix(&format!("{name}.weight"), [d_in, d_out], false)?;
        let b = self.vector(&format!("{name}.bias"), &[d_out])?;
        Ok(Linear::new(w, Some(b), d_in, d_out)?)
    }

    /// Matrix `name` of `shape` (rows, cols) as stored, in the target storage.
    /// `rows_are_outputs`: the stored rows are output units (`wte`: (vocab, C)); else they are
    /// inputs (`Conv1D`: (in, out)).
    pub(crate) fn matrix(
        &self,
        name: &str,
        shape: [usize; 2],
        rows_are_outputs: bool,
    ) -> Result<Matrix> {
        let e = self.weights.entry(name, &shape)?;
        let [rows, cols] = shape;
        let (k, n) = if rows_are_outputs {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let t = &self.target;
        if !t.host {
            let w = Tensor::from_vec(e.values()?.into_owned(), (rows, cols), &Device::Cpu)?;
            let dtype = match t.storage {
                Storage::Dtype(d) => d,
                Storage::Quant(_) => DType::F32,
            };
            let w = w.to_dtype(dtype)?;
            check_cast(&w, || Ok(e))?;
            let w = w.to_device(&t.device)?;
            // The tensor path multiplies by (in, out).
            return Ok(Matrix::Tensor(if rows_are_outputs { w.t()? } else { w }));
        }
        let host = |h: HostElems| {
            if rows_are_outputs {
                Matrix::OutIn(h)
            } else {
                Matrix::InOut(h)
            }
        };
        match t.storage {
            // Where it lies in the map, as stored: transposing a `Conv1D` at load bought no
            // f32 decode speed (bandwidth-bound either way) and cost start-up and prefill.
            Storage::Dtype(DType::F32) => {
                if t.mmap {
                    if let Some(buf) = e.in_place()?.and_then(|(m, r)| Buf::mapped(&m, r)) {
                        return Ok(host(HostElems::F32(buf)));
                    }
                }
                let v = e.values()?.into_owned();
                e.release();
                Ok(host(HostElems::F32(Buf::owned(v))))
            }
            Storage::Dtype(d @ (DType::F16 | DType::BF16)) => {
                let bits = halves(&e, d, rows_are_outputs, k, n)?;
                let buf = Buf::owned(bits);
                Ok(Matrix::OutIn(if d == DType::F16 {
                    HostElems::F16(buf)
                } else {
                    HostElems::Bf16(buf)
                }))
            }
            // `Gpt2::new` refuses other dtypes before loading.
            Storage::Dtype(d) => Err(Error::Internal(format!("{d:?} weights on the host"))),
            Storage::Quant(kind) => {
                // The embedding / LM head takes 6 bits under 4-bit blocks, as llama.cpp keeps
                // `token_embd`/`output` in `q6_K` in its Q4_0 files: its error goes straight
                // into every logit.
                let kind = match kind {
                    QuantKind::Q4_0 | QuantKind::Q4K if rows_are_outputs => QuantKind::Q6,
                    kind => kind,
                };
                if !k.is_multiple_of(BLOCK) {
                    return Err(Error::param(
                        "quantize",
                        format!(
                            "needs inputs in multiples of {BLOCK}, but `{}` has {k}",
                            e.name()
                        ),
                    ));
                }
                let v = e.values()?;
                // (in, out) stored: output row j is column j; transposed first, in tiles that
                // stay in cache (a column read straight would miss on every element).
                let rows: Cow<[f32]> = if rows_are_outputs {
                    v
                } else {
                    Cow::Owned(transpose(&v, k, n))
                };
                let q = QuantMatrix::quantize(kind, n, k, |j, out| {
                    out.copy_from_slice(&rows[j * k..(j + 1) * k])
                });
                // A block whose absmax overflows its f16 scale dequantizes to NaN (inf · 0).
                if let Some(i) = first_non_finite_half(&q.d, DType::F16) {
                    let span = q.weights_of_scale(i);
                    let block = &rows[span.clone()];
                    let i = (0..block.len())
                        .max_by(|&x, &y| block[x].abs().total_cmp(&block[y].abs()))
                        .unwrap_or(0);
                    let at = span.start + i;
                    let stored = if rows_are_outputs {
                        at
                    } else {
                        transposed_index(at, k, n)
                    };
                    return Err(e.error(format!(
                        "holds {:e} at flat index {stored}, which quantized to {} gives NaN: its \
                         block's scale is inf in F16",
                        rows[at],
                        kind.name()
                    )));
                }
                // The blocks are a copy: the pages read go back, or they would stay resident
                // beside them.
                drop(rows);
                e.release();
                Ok(Matrix::Quant(Arc::new(q)))
            }
        }
    }
}

/// The (out, in) = (N, K) halves of `e`, narrowed with half's slice conversion (F16C where the
/// CPU has it). Stored (out, in) it is streamed a chunk at a time; stored (in, out) it is read
/// whole and transposed.
/// Each converted chunk is checked finite: an f32 past f16's 65504 (or rounding past bf16's
/// largest) becomes inf.
fn halves(e: &Entry<'_>, d: DType, rows_are_outputs: bool, k: usize, n: usize) -> Result<Vec<u16>> {
    // `v` narrowed onto the end of `bits`; `stored(i)` is the flat index v[i] is stored at.
    let narrow = |v: &[f32], bits: &mut Vec<u16>, stored: &dyn Fn(usize) -> usize| {
        use half::slice::HalfFloatSliceExt;
        let at = bits.len();
        bits.resize(at + v.len(), 0);
        let out = &mut bits[at..];
        if d == DType::F16 {
            bytemuck::cast_slice_mut::<u16, half::f16>(out).convert_from_f32_slice(v);
        } else {
            bytemuck::cast_slice_mut::<u16, half::bf16>(out).convert_from_f32_slice(v);
        }
        match first_non_finite_half(out, d) {
            Some(i) => Err(overflow(e, v[i], stored(i), d)),
            None => Ok(()),
        }
    };
    let mut bits: Vec<u16> = Vec::with_capacity(k * n);
    if rows_are_outputs {
        e.stream(|offset, v| narrow(v, &mut bits, &|i| offset + i))?;
    } else {
        let v = e.values()?;
        narrow(&transpose(&v, k, n), &mut bits, &|i| {
            transposed_index(i, k, n)
        })?;
        drop(v);
        e.release();
    }
    Ok(bits)
}

/// Where element `i` of the (N, K) transpose of an (in, out) = (K, N) matrix is stored.
fn transposed_index(i: usize, k: usize, n: usize) -> usize {
    (i % k) * n + i / k
}

/// The first element of `bits` (f16 or bf16, as `d` says) that is inf or NaN: an exponent of all
/// ones. An OR-fold the compiler vectorises, searched again only when it finds one.
fn first_non_finite_half(bits: &[u16], d: DType) -> Option<usize> {
    let exp: u16 = if d == DType::F16 { 0x7c00 } else { 0x7f80 };
    let any = bits.iter().fold(false, |a, &b| a | (b & exp == exp));
    if any {
        bits.iter().position(|&b| b & exp == exp)
    } else {
        None
    }
}

/// The error about the finite `value` at flat index `at` of `e` that is inf in `d`.
fn overflow(e: &Entry<'_>, value: f32, at: usize, d: DType) -> Error {
    let inf = if value < 0.0 { "-inf" } else { "inf" };
    e.error(format!(
        "holds {value:e} at flat index {at}, which is {inf} in {d:?}"
    ))
}

/// Checks a host tensor cast from checked f32 (`entry` names it) to be finite in its dtype.
fn check_cast<'a>(t: &Tensor, entry: impl FnOnce() -> Result<Entry<'a>>) -> Result<()> {
    let d = t.dtype();
    if !matches!(d, DType::F16 | DType::BF16) {
        return Ok(());
    }
    let (s, l) = t.storage_and_layout();
    let bits: &[u16] = match (&*s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)), Some((a, b))) => {
            bytemuck::cast_slice(&v[a..b])
        }
        (candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)), Some((a, b))) => {
            bytemuck::cast_slice(&v[a..b])
        }
        _ => return Ok(()),
    };
    match first_non_finite_half(bits, d) {
        Some(i) => {
            let e = entry()?;
            let value = e.values()?[i];
            Err(overflow(&e, value, i, d))
        }
        None => Ok(()),
    }
}

/// `v` (rows, cols) row-major, transposed: (cols, rows), 64 input rows (output columns) per
/// chunk on the pool, in the staged 64 × 64 blocks of the prefill's widening kernel (GPT-2's
/// strides alias in L1, so a plain tiled copy was slow).
pub(crate) fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 64;
    assert_eq!(v.len(), rows * cols);
    let mut t = vec![0f32; rows * cols];
    let out = SharedOut(t.as_mut_ptr());
    let chunk = |c: usize| {
        let is = c * TILE..rows.min((c + 1) * TILE);
        // SAFETY: t[j·rows + i] = v[i·cols + j]: input rows `is` are columns `is` of t, this chunk's
        // alone; t outlives the run.
        unsafe {
            transpose_into(
                Elems::F32(&v[is.start * cols..is.end * cols]),
                is.len(),
                cols,
                out,
                rows,
                is.start,
            )
        };
    };
    let chunks = rows.div_ceil(TILE);
    // A panic cannot come from this copy; if the pool failed, transpose here.
    if crate::pool::run(chunks, &chunk).is_err() {
        (0..chunks).for_each(chunk);
    }
    t
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::{Loader, Storage, Target};
    use crate::checkpoint::{Checkpoint, Weights};
    use crate::config::Config;
    use crate::error::Result;
    use crate::linear::quant::QuantKind;

    /// A loader of `tensors` into `storage`, activations in `act`; `host: false` takes the GPU's
    /// path (candle tensors) on the CPU.
    fn loader(
        tensors: &[(&str, Tensor)],
        storage: Storage,
        act: DType,
        host: bool,
    ) -> Result<Loader> {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        let weights = Weights::open(Checkpoint::Tensors(map), &Config::default(), false)?;
        let target = Target {
            storage,
            act_dtype: act,
            device: Device::Cpu,
            host,
            mmap: false,
        };
        Ok(Loader { weights, target })
    }

    /// `n` weights of 0.01 but `value` at flat index `at`, in `shape`.
    fn with(value: f32, at: usize, shape: (usize, usize)) -> Result<Tensor> {
        let mut v = vec![0.01f32; shape.0 * shape.1];
        v[at] = value;
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// A finite f32 that is inf in f16 (or bf16), or whose 8/4/6-bit block's f16 scale is, is
    /// refused naming the tensor, the value, its index and the form it is used in: stored (in,
    /// out) and transposed, or (out, in) and streamed, on the host or for a GPU.
    #[test]
    fn weights_must_be_finite_in_the_form_they_are_used() -> Result<()> {
        let f16 = Storage::Dtype(DType::F16);
        let cases = [
            (
                f16,
                true,
                1e30,
                "holds 1e30 at flat index 37, which is inf in F16",
            ),
            (
                f16,
                false,
                1e30,
                "holds 1e30 at flat index 37, which is inf in F16",
            ),
            (
                f16,
                true,
                -7e4,
                "holds -7e4 at flat index 37, which is -inf in F16",
            ),
            (
                Storage::Dtype(DType::BF16),
                true,
                f32::MAX,
                "which is inf in BF16",
            ),
            (
                Storage::Dtype(DType::BF16),
                false,
                f32::MAX,
                "which is inf in BF16",
            ),
            (
                Storage::Quant(QuantKind::Q8_0),
                true,
                1e30,
                "holds 1e30 at flat index 37, which quantized to q8_0 gives NaN",
            ),
            (
                Storage::Quant(QuantKind::Q4_0),
                true,
                1e7,
                "holds 1e7 at flat index 37, which quantized to q4_0 gives NaN",
            ),
        ];
        for (storage, host, value, want) in cases {
            // A Conv1D (in 32, out 64): index 37 is input 0, output 37 (a transposed load).
            let w = loader(
                &[("c.weight", with(value, 37, (32, 64))?)],
                storage,
                DType::F32,
                host,
            )?;
            let err = w
                .matrix("c.weight", [32, 64], false)
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains("`c.weight` ") && err.contains(want), "{err}");
            // An embedding (64, 32): index 37 is row 1, column 5 (streamed); under q4_0 it takes
            // 6 bits.
            let w = loader(
                &[("wte.weight", with(value, 37, (64, 32))?)],
                storage,
                DType::F32,
                host,
            )?;
            let err = w
                .matrix("wte.weight", [64, 32], true)
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_default().replace("q6", "q4_0");
            assert!(err.contains("`wte.weight` ") && err.contains(want), "{err}");
        }
        // Large but finite in its form: loads.
        let w = loader(
            &[("c.weight", with(6e4, 37, (32, 64))?)],
            f16,
            DType::F32,
            true,
        )?;
        assert!(w.matrix("c.weight", [32, 64], false).is_ok());
        let q8 = Storage::Quant(QuantKind::Q8_0);
        let w = loader(
            &[("c.weight", with(8e6, 37, (32, 64))?)],
            q8,
            DType::F32,
            true,
        )?;
        assert!(w.matrix("c.weight", [32, 64], false).is_ok());
        // Vectors (biases, layer norms, wpe) in the activations' dtype: f16 on a GPU.
        let b = Tensor::from_vec(vec![0.5f32, 1.0, 1e5, 2.0], 4, &Device::Cpu)?;
        let w = loader(&[("c.bias", b)], f16, DType::F16, false)?;
        let err = w.vector("c.bias", &[4]).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("holds 1e5 at flat index 2, which is inf in F16"),
            "{err}"
        );
        Ok(())
    }

    /// Every element lands at its transposed place, across staged-block tails and pool chunks.
    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols) in [(1, 1), (3, 70), (130, 77), (768, 64)] {
            let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&v, rows, cols);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(t[j * rows + i], v[i * cols + j], "rows={rows} cols={cols}");
                }
            }
        }
    }
}
