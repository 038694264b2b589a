//! How a model is loaded: the choices a user makes ([`LoadOptions`], [`Quantization`]), which
//! `linear::storage` (weights) and `attention` (the KV cache) turn into what the layers hold.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// 8- or 4-bit weights, in llama.cpp's block formats, quantized at load (CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// 32 weights share an f16 scale; 8 bits each (8.5 bits a weight).
    Q8_0,
    /// 32 weights share an f16 scale; 4 bits each (4.5 bits a weight); the embedding / LM
    /// head at 6 bits (6.5), as llama.cpp's q4_0 files keep it.
    Q4_0,
    /// llama.cpp's q4_K: superblocks of 256 with an f16 scale and min, 8 sub-blocks of 32 with
    /// 6-bit scales and mins; 4 bits each (4.5 bits a weight); the embedding / LM head at 6
    /// bits (6.5).
    Q4K,
}

impl Quantization {
    /// Every kind, in the order `--help` lists them.
    pub const ALL: [Self; 3] = [Self::Q8_0, Self::Q4_0, Self::Q4K];

    /// `q8_0`, `q4_0` or `q4_k`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
        }
    }

    /// One line on what it stores.
    pub fn help(self) -> &'static str {
        match self {
            Self::Q8_0 => "32 weights share an f16 scale; 8 bits each (8.5 bits a weight)",
            Self::Q4_0 => {
                "32 weights share an f16 scale; 4 bits each (4.5 bits a weight); the embedding / \
                 LM head at 6 bits (6.5), as llama.cpp's q4_0 files keep it"
            }
            Self::Q4K => {
                "llama.cpp's q4_K: 256 weights share an f16 scale and min, sub-blocks of 32 \
                 6-bit ones; 4 bits each (4.5 bits a weight, less loss than q4_0); the \
                 embedding / LM head at 6 bits (6.5)"
            }
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|q| q.name() == s)
            .ok_or_else(|| Error::param("quantize", format!("`{s}`: expected q8_0, q4_0 or q4_k")))
    }
}

/// How to load a model: [`Gpt2::new`] and [`crate::ModelSource::load`] take these.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The weights' dtype (f32, f16 or bf16). On the CPU, activations stay f32 whatever it is
    /// (f16 weights are widened as they are read); on a GPU they take this dtype.
    pub dtype: DType,
    pub device: Device,
    /// Only the embeddings and the first `n` blocks (`None`: all of them). Attention at layer L
    /// depends on nothing above it, so inspection loads layers `0..=L` only; such a model has no
    /// logits, and [`Gpt2::for_each_attention`] is what it is for.
    pub layers: Option<usize>,
    /// Quantize the matrices (projections, MLP, `wte`/LM head) at load; CPU only.
    pub quantize: Option<Quantization>,
    /// Read f32 weights from the memory-mapped file in place (no copy). Off: copied into memory,
    /// so the file may change while the model runs.
    pub mmap: bool,
    /// What the KV cache stores keys and values as (f32, f16 or bf16). `None`: f16 on the CPU
    /// when the weights are f16, bf16 or quantized (half the bytes each decoded token reads
    /// from the cache, as llama.cpp does), else the activations' dtype (f32 on the CPU: exact).
    pub kv_cache: Option<DType>,
}

impl Default for LoadOptions {
    /// f32 on the CPU, every layer, memory-mapped.
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            layers: None,
            quantize: None,
            mmap: true,
            kv_cache: None,
        }
    }
}

impl LoadOptions {
    /// These options with weights in `dtype`.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// These options on `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// These options with only the first `n` blocks.
    pub fn first_layers(mut self, n: usize) -> Self {
        self.layers = Some(n);
        self
    }

    /// These options with quantized matrices.
    pub fn quantized(mut self, q: Quantization) -> Self {
        self.quantize = Some(q);
        self
    }

    /// These options with a KV cache of `dtype`.
    pub fn with_kv_cache(mut self, dtype: DType) -> Self {
        self.kv_cache = Some(dtype);
        self
    }
}
