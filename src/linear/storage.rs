//! How weight matrices are stored, decided in one place: the checkpoint's tensors ([`Entry`])
//! become a [`Matrix`] in the form its products read fastest, as the [`Target`] asks.
//!
//! - f32 on the host: read where it lies in the mapped file, `wte` (vocab, C) as (out, in), a
//!   `Conv1D` as (in, out) (no copy, no transpose; gemm packs (in, out) faster).
//! - f16/bf16 on the host: converted anyway, so a `Conv1D` is also transposed once to (out, in):
//!   decode then reads each output's weights as one contiguous row.
//! - 8/4-bit blocks (`quant`): rows of (out, in); the embedding / LM head at 6 bits under 4-bit.
//! - Off the host: a candle tensor (in, out) for candle's matmul.

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
            // The quants and an f16 scale per block.
            Self::Quant(q) => (q.block_bytes() as u128 + 2, BLOCK as u128),
        };
        elements.saturating_mul(num) / den
    }

    /// `F32`, `q8_0`, ...: for messages.
    pub(crate) fn label(self) -> String {
        match self {
            Self::Dtype(d) => format!("{d:?}"),
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
    pub(crate) fn vector(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = &self.target;
        Ok(self
            .weights
            .get(name, shape)?
            .to_dtype(t.act_dtype)?
            .to_device(&t.device)?)
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
            let w = w.to_dtype(dtype)?.to_device(&t.device)?;
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
            Storage::Dtype(d) => Err(Error::param(
                "dtype",
                format!("{d:?} is not a weight dtype (f32, f16 or bf16)"),
            )),
            Storage::Quant(kind) => {
                // The embedding / LM head takes 6 bits under 4-bit blocks, as llama.cpp keeps
                // `token_embd`/`output` in `q6_K` in its Q4_0 files: its error goes straight
                // into every logit.
                let kind = match kind {
                    QuantKind::Q4_0 if rows_are_outputs => QuantKind::Q6,
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
fn halves(e: &Entry<'_>, d: DType, rows_are_outputs: bool, k: usize, n: usize) -> Result<Vec<u16>> {
    let narrow = |v: &[f32], bits: &mut Vec<u16>| {
        use half::slice::HalfFloatSliceExt;
        let at = bits.len();
        bits.resize(at + v.len(), 0);
        let out = &mut bits[at..];
        if d == DType::F16 {
            bytemuck::cast_slice_mut::<u16, half::f16>(out).convert_from_f32_slice(v);
        } else {
            bytemuck::cast_slice_mut::<u16, half::bf16>(out).convert_from_f32_slice(v);
        }
    };
    let mut bits: Vec<u16> = Vec::with_capacity(k * n);
    if rows_are_outputs {
        e.stream(|_, v| {
            narrow(v, &mut bits);
            Ok(())
        })?;
    } else {
        let v = e.values()?;
        narrow(&transpose(&v, k, n), &mut bits);
        drop(v);
        e.release();
    }
    Ok(bits)
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
