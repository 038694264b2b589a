//! Layer normalisation with statistics computed in f32, in two passes.
//!
//! candle-nn's fused `layer_norm` takes the variance as `E[x²] - E[x]²` in one pass, which loses
//! digits when the mean is large next to the spread, as it is in GPT-2's residual stream (a few
//! dimensions reach hundreds). PyTorch centres first; so do we, to match it to 1e-5. On the host,
//! one loop per row does it (candle's ops would make six tensors); elsewhere, candle's ops.

use candle_core::{CpuStorage, DType, Module, Storage, Tensor, D};

use crate::linear::storage::Loader;

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    /// weight and bias as f32 host vectors, for the host loop; `None` off the CPU.
    host: Option<(Vec<f32>, Vec<f32>)>,
}

impl LayerNorm {
    pub(crate) fn new(weight: Tensor, bias: Tensor, eps: f64) -> candle_core::Result<Self> {
        let host = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some((weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            eps,
            host,
        })
    }

    /// `{name}.weight` and `{name}.bias` of `size`.
    pub(crate) fn load(w: &Loader, name: &str, size: usize, eps: f64) -> crate::Result<Self> {
        let weight = w.vector(&format!("{name}.weight"), &[size])?;
        let bias = w.vector(&format!("{name}.bias"), &[size])?;
        Ok(Self::new(weight, bias, eps)?)
    }

    /// weight, bias and epsilon.
    pub(crate) fn parameters(&self) -> (Tensor, Tensor, f64) {
        (self.weight.clone(), self.bias.clone(), self.eps)
    }

    fn forward_host(&self, x: &Tensor, w: &[f32], b: &[f32]) -> candle_core::Result<Tensor> {
        let c = w.len();
        let x = x.contiguous()?;
        let mut y = vec![0f32; x.elem_count()];
        {
            let (s, l) = x.storage_and_layout();
            let xs = match (&*s, l.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, e))) => &v[a..e],
                _ => candle_core::bail!("layer norm: not f32 host data"),
            };
            let eps = self.eps as f32;
            for (row, out) in xs.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
                let mean = row.iter().sum::<f32>() / c as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for (((o, v), w), b) in out.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * inv * w + b;
                }
            }
        }
        Tensor::from_vec(y, x.dims(), x.device())
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let (Some((w, b)), true, DType::F32) = (&self.host, x.device().is_cpu(), x.dtype()) {
            return self.forward_host(x, w, b);
        }
        let dtype = x.dtype();
        // (B, T, C) in f32 whatever the model's dtype: f16 cannot hold the sum of squares.
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}
