//! GPT-2's GELU with its exact derivative. candle's `gelu` backward uses constants rounded to six
//! digits (`0.797885` for √(2/π)): gradients off by 5e-7 relative, which twenty AdamW steps
//! carry to 1e-6 in the weights (measured against torch in f64). On the host this op computes
//! the same forward and the derivative in full precision; elsewhere the formula is built from
//! candle's ops and differentiated by autograd.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::Result;

/// √(2/π) and the cubic's coefficient of `gelu_new`.
const K: f64 = 0.797_884_560_802_865_4;
const A: f64 = 0.044_715;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, transformers' `NewGELUActivation`.
pub(crate) fn gelu_new(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op1(Elementwise::Value)?);
    }
    let inner = ((x + (x.powf(3.0)? * A)?)? * K)?;
    Ok(((x * 0.5)? * (inner.tanh()? + 1.0)?)?)
}

/// The function (with its backward) or its derivative, element by element on the host.
#[derive(Clone, Copy)]
enum Elementwise {
    Value,
    Slope,
}

fn value(x: f64) -> f64 {
    0.5 * x * (1.0 + (K * (x + A * x * x * x)).tanh())
}

/// d/dx: `0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)`, `t` the tanh above.
fn slope(x: f64) -> f64 {
    let t = (K * (x + A * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * A * x * x)
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        match self {
            Self::Value => "gelu-new",
            Self::Slope => "gelu-new-slope",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = match self {
            Self::Value => value,
            Self::Slope => slope,
        };
        // `gelu_new` makes its input contiguous.
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gelu_new needs a contiguous tensor");
        };
        let out = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(v[a..b].iter().map(|&x| f(f64::from(x)) as f32).collect())
            }
            CpuStorage::F64(v) => CpuStorage::F64(v[a..b].iter().map(|&x| f(x)).collect()),
            _ => candle_core::bail!("gelu_new trains in f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match self {
            Self::Value => Ok(Some(grad.mul(&arg.contiguous()?.apply_op1(Self::Slope)?)?)),
            Self::Slope => candle_core::bail!("gelu_new has no second derivative here"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_derivative_is_the_exact_one() -> Result<()> {
        let xs = [-3.0f64, -1.2, -0.3, 0.0, 0.4, 1.1, 2.5];
        let x = Var::from_tensor(&Tensor::new(&xs, &Device::Cpu)?)?;
        let y = gelu_new(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        let g: Vec<f64> = grads
            .get(x.as_tensor())
            .ok_or("no grad")
            .map_err(|e| crate::Error::Internal(e.into()))?
            .to_vec1()?;
        let v: Vec<f64> = y.to_vec1()?;
        for (i, &x) in xs.iter().enumerate() {
            let h = 1e-6;
            let numeric = (value(x + h) - value(x - h)) / (2.0 * h);
            assert!(
                (g[i] - numeric).abs() < 1e-9,
                "at {x}: {} vs {numeric}",
                g[i]
            );
            assert!((v[i] - value(x)).abs() < 1e-15);
        }
        Ok(())
    }
}
