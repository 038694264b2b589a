//! The training graph's ops: each a node of candle's graph with an exact backward, fused on the
//! host; on other devices the same formulas from candle's ops, differentiated by autograd
//! (also what the unit tests compare the fused ops with, values and gradients to 1e-12 in f64).
//!
//! Why fused: built from candle's ops, a layer is five to ten passes over its tensor, each an
//! allocation kept for the backward, and candle's backward gives every node's input a zeroed
//! gradient and an add. The nodes here are the model's layers: the input embedding
//! (`embed.rs`), layer norm (`norm.rs`), `Conv1D` alone or with what consumes its output — the
//! causal self-attention (`attention.rs`) or GELU (`conv1d.rs`) —, and the tied LM head with the
//! cross-entropy (`head.rs`); their row loops are vectorised kernels (`vector.rs`) and their
//! matrix products the `gemm` crate on strided host views (`gemm.rs`).
//!
//! GELU: candle's `gelu` backward also uses constants rounded to six digits (`0.797885` for
//! √(2/π)): gradients off by 5e-7 relative, which twenty AdamW steps carry to 1e-6 in the
//! weights (measured against torch in f64).

use candle_core::{CpuStorage, Layout, Tensor};

use crate::error::Result;

/// The element types the fused ops run on.
pub(super) trait Float:
    Copy
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    const ZERO: Self;
    fn of(s: &CpuStorage) -> Option<&[Self]>;
    fn of_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn store(v: Vec<Self>) -> CpuStorage;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
}

macro_rules! float {
    ($t:ty, $variant:ident, $exp:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            fn of(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn of_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn store(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
// f32's exp vectorises (a polynomial within 2 ulp, as torch's own vectorised exp); f64's is
// libm's (f64 runs the checks against references, not the fast path).
float!(f32, F32, vector::exp_f32);
float!(f64, F64, f64::exp);

/// The contiguous elements of `s` under `l`, as `T`.
pub(super) fn elems<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match (T::of(s), l.contiguous_offsets()) {
        (Some(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("a fused training op needs a contiguous f32 or f64 tensor"),
    }
}

/// Runs `f32` or `f64` code on the dtype of `s`.
macro_rules! by_dtype {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        }
    };
}

mod attention;
mod conv1d;
mod embed;
mod gemm;
mod head;
mod norm;
mod vector;

pub(crate) use attention::Heads;
pub(crate) use conv1d::{conv1d, conv1d_attention, conv1d_gelu};
pub(crate) use embed::embed;
#[cfg(test)]
pub(crate) use head::cross_entropy;
pub(crate) use head::head_loss;
pub(crate) use norm::layer_norm;
pub(super) use vector::adamw;

// ----------------------------------------------------------------------------- GELU

/// √(2/π) and the cubic's coefficient of `gelu_new`.
const K: f64 = 0.797_884_560_802_865_4;
const A: f64 = 0.044_715;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, transformers' `NewGELUActivation`, with
/// candle's ops (on the host it runs inside `conv1d_gelu`'s node, by [`value`] and [`slope`]).
fn gelu_new(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * A)?)? * K)?;
    Ok(((x * 0.5)? * (inner.tanh()? + 1.0)?)?)
}

/// `tanh(u)` as `1 − 2/(e^{2u} + 1)`: one `exp` (libm's `tanh` was a fifth of a training step).
#[inline(always)]
fn tanh<T: Float>(u: T) -> T {
    let one = T::from_f64(1.0);
    one - T::from_f64(2.0) / ((u + u).exp() + one)
}

#[inline(always)]
fn value<T: Float>(x: T) -> T {
    let c = T::from_f64;
    c(0.5) * x * (c(1.0) + tanh(c(K) * (x + c(A) * x * x * x)))
}

/// d/dx: `0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)`, `t` the tanh above.
#[inline(always)]
fn slope<T: Float>(x: T) -> T {
    let c = T::from_f64;
    let t = tanh(c(K) * (x + c(A) * x * x * x));
    c(0.5) * (c(1.0) + t) + c(0.5) * x * (c(1.0) - t * t) * c(K) * (c(1.0) + c(3.0 * A) * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// `fused` and `composed` of the same inputs (each a variable of the given values and
    /// shape), with the gradients of `Σ w·f(inputs)` for a fixed `w` with respect to every
    /// input: equal to 1e-12 in f64.
    pub(super) fn same_as_composed_n(
        inputs: &[(Vec<f64>, Vec<usize>)],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<Vec<Vec<f64>>> {
            let vars = inputs
                .iter()
                .map(|(x, shape)| {
                    Ok(Var::from_tensor(&Tensor::from_slice(
                        x,
                        shape.as_slice(),
                        &Device::Cpu,
                    )?)?)
                })
                .collect::<Result<Vec<Var>>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts)?;
            let w: Vec<f64> = (0..y.elem_count())
                .map(|i| ((i * 7919 % 13) as f64 - 6.0) / 5.0)
                .collect();
            let w = Tensor::from_vec(w, y.shape(), &Device::Cpu)?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1()?];
            for t in &ts {
                let g = grads
                    .get(t)
                    .ok_or_else(|| crate::Error::Internal("no grad".into()))?;
                out.push(g.flatten_all()?.to_vec1()?);
            }
            Ok(out)
        };
        let (a, b) = (run(&fused)?, run(&composed)?);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_eq!(a.len(), b.len(), "output {i}");
            for (u, v) in a.iter().zip(b) {
                assert!(
                    (u - v).abs() < 1e-12,
                    "{} {i}: {u} vs {v}",
                    if i == 0 { "value" } else { "gradient of input" }
                );
            }
        }
        Ok(())
    }

    pub(super) fn numbers(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 4.0)
            .collect()
    }

    #[test]
    fn layer_norm_and_embedding_equal_their_composed_formulas_and_gradients() -> Result<()> {
        // Layer norm over rows of 6, with its weight and bias.
        let weight: Vec<f64> = (0..6).map(|i| 0.5 + i as f64 / 4.0).collect();
        let bias: Vec<f64> = (0..6).map(|i| i as f64 / 3.0 - 1.0).collect();
        same_as_composed_n(
            &[
                (numbers(24), vec![4, 6]),
                (weight, vec![6]),
                (bias, vec![6]),
            ],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| {
                let mean = t[0].mean_keepdim(D::Minus1)?;
                let centred = t[0].broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                Ok(centred
                    .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&t[1])?
                    .broadcast_add(&t[2])?)
            },
        )?;
        // Embeddings: 2 × 3 ids (one repeated) into 7 tokens and 4 positions of width 5.
        let ids = Tensor::new(&[[1u32, 6, 1], [0, 3, 6]], &Device::Cpu)?;
        same_as_composed_n(
            &[(numbers(35), vec![7, 5]), (numbers(20), vec![4, 5])],
            |t| embed(&ids, &t[0], &t[1]),
            |t| {
                let tok = t[0]
                    .index_select(&ids.flatten_all()?, 0)?
                    .reshape((2, 3, 5))?;
                Ok(tok.broadcast_add(&t[1].narrow(0, 0, 3)?)?)
            },
        )?;
        // An id outside the table is an error, not a panic.
        let bad = Tensor::new(&[[7u32]], &Device::Cpu)?;
        let wte = Tensor::from_vec(numbers(35), (7, 5), &Device::Cpu)?;
        let wpe = Tensor::from_vec(numbers(20), (4, 5), &Device::Cpu)?;
        assert!(embed(&bad, &wte, &wpe).is_err());
        Ok(())
    }

    #[test]
    fn conv1d_and_what_follows_it_equal_their_composed_formulas_and_gradients() -> Result<()> {
        // c_attn and attention over 2 sequences of 5 tokens of width 4: 4 heads of 3 over 4, 2
        // and 1 K/V heads (multi-head, grouped, multi-query), with and without a dropout mask;
        // the gradients of x, W and b.
        for kv in [4, 2, 1] {
            let heads = Heads {
                n_head: 4,
                n_kv_head: kv,
                head_size: 3,
                scale: 0.37,
            };
            let width = 12 + 2 * kv * 3;
            let mask: Vec<f64> = (0..2 * 4 * 5 * 5)
                .map(|i| if i % 7 == 3 { 0.0 } else { 1.25 })
                .collect();
            let mask = Tensor::from_vec(mask, (2, 4, 5, 5), &Device::Cpu)?;
            let bias: Vec<f64> = (0..width).map(|i| i as f64 / 10.0 - 0.5).collect();
            for m in [None, Some(&mask)] {
                same_as_composed_n(
                    &[
                        (numbers(40), vec![2, 5, 4]),
                        (numbers(4 * width), vec![4, width]),
                        (bias.clone(), vec![width]),
                    ],
                    |t| conv1d_attention(&t[0], &t[1], &t[2], heads, m),
                    |t| {
                        let qkv = t[0].broadcast_matmul(&t[1])?.broadcast_add(&t[2])?;
                        attention::composed(&qkv, heads, m)
                    },
                )?;
            }
        }
        // A sequence longer than two blocks of queries (the causal blocks' edges), grouped.
        let heads = Heads {
            n_head: 2,
            n_kv_head: 1,
            head_size: 2,
            scale: 0.5,
        };
        let t = 2 * attention::BLOCK + 3;
        same_as_composed_n(
            &[
                (numbers(t * 4), vec![1, t, 4]),
                (numbers(4 * 8), vec![4, 8]),
                (vec![0.1; 8], vec![8]),
            ],
            |x| conv1d_attention(&x[0], &x[1], &x[2], heads, None),
            |x| {
                let qkv = x[0].broadcast_matmul(&x[1])?.broadcast_add(&x[2])?;
                attention::composed(&qkv, heads, None)
            },
        )?;
        // The MLP's first layer and GELU.
        same_as_composed_n(
            &[
                (numbers(20), vec![5, 4]),
                (numbers(24), vec![4, 6]),
                ((0..6).map(|i| i as f64 / 4.0 - 0.6).collect(), vec![6]),
            ],
            |t| conv1d_gelu(&t[0], &t[1], &t[2]),
            |t| {
                let h = t[0].matmul(&t[1])?.broadcast_add(&t[2])?;
                let inner = ((&h + (h.powf(3.0)? * A)?)? * K)?;
                Ok(((&h * 0.5)? * (inner.tanh()? + 1.0)?)?)
            },
        )?;
        // Conv1D against matmul + bias, for the input, the weight and the bias.
        let bias = vec![0.5f64, -1.0, 2.0];
        same_as_composed_n(
            &[
                (numbers(20), vec![5, 4]),
                (numbers(12), vec![4, 3]),
                (bias, vec![3]),
            ],
            |t| conv1d(&t[0], &t[1], &t[2]),
            |t| Ok(t[0].matmul(&t[1])?.broadcast_add(&t[2])?),
        )?;
        Ok(())
    }

    #[test]
    fn the_derivative_is_the_exact_one() {
        let xs = [-3.0f64, -1.2, -0.3, 0.0, 0.4, 1.1, 2.5];
        let (mut v, mut g) = ([0.0; 7], [0.0; 7]);
        vector::gelu(&xs, &mut v);
        vector::gelu_grad(&xs, &[1.0; 7], &mut g);
        for (i, &x) in xs.iter().enumerate() {
            let h = 1e-6;
            let numeric = (value(x + h) - value(x - h)) / (2.0 * h);
            assert!(
                (g[i] - numeric).abs() < 1e-9,
                "at {x}: {} vs {numeric}",
                g[i]
            );
            let exact = 0.5 * x * (1.0 + (K * (x + A * x * x * x)).tanh());
            assert!((v[i] - exact).abs() < 1e-15, "at {x}: {} vs {exact}", v[i]);
        }
    }
}
