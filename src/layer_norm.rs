//! Layer normalisation with statistics computed in f32, in two passes.
//!
//! candle-nn's fused `layer_norm` takes the variance as `E[x²] - E[x]²` in one pass, which loses
//! digits when the mean is large next to the spread, as it is in GPT-2's residual stream (a few
//! dimensions reach hundreds). PyTorch centres first; so do we, to match it to 1e-5.

use candle_core::{DType, Module, Tensor, D};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
