//! The tied LM head and the cross-entropy as one node: `logits = x·wteᵀ`, each row's negative
//! log-likelihood of its target, their mean (or weighted mean). The logits never become a graph
//! node: candle would keep them, zero a gradient of their size and add the op's into it, and
//! the per-row backward would compute every exponential again. Here the forward pass turns the
//! logits buffer into the loss's gradient with respect to them, in place, while it has the
//! exponentials in hand; the backward is two matrix products.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::gemm::{gemm, Mat};
use super::{elems, Float};
use crate::error::Result;

/// Mean (or, with `weights` (N,), `Σ wᵢ·nllᵢ / Σ wᵢ`) cross-entropy of the logits `x·wteᵀ`:
/// x (N, C), wte (V, C), targets (N,) u32. A scalar.
pub(crate) fn head_loss(
    x: &Tensor,
    wte: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    if x.device().is_cpu() {
        let op = HeadLoss {
            targets: targets.to_vec1::<u32>()?,
            weights: match weights {
                Some(w) => Some(w.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?),
                None => None,
            },
            dlogits: Mutex::new(None),
        };
        return Ok(x.contiguous()?.apply_op2(&wte.contiguous()?, op)?);
    }
    cross_entropy(&x.matmul(&wte.t()?)?, targets, weights)
}

/// The composed formula: cross-entropy of `logits` (N, vocab) against `targets` (N,), averaged
/// over the rows, or with `weights` (N,) the weighted mean. A scalar.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    // (N, vocab) -> (N,): each row's negative log-probability of its target.
    let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    Ok(match weights {
        None => nll.mean_all()?,
        Some(w) => (nll * w)?.sum_all()?.broadcast_div(&w.sum_all()?)?,
    })
}

struct HeadLoss {
    targets: Vec<u32>,
    /// The task's weights (in f64 here; used in the tensor's dtype).
    weights: Option<Vec<f64>>,
    /// d loss / d logits (N, V) for an upstream gradient of 1, made by the forward pass.
    dlogits: Mutex<Option<CpuStorage>>,
}

/// The loss and, in the logits' buffer, its gradient with respect to them.
fn head_forward<T: Float>(
    op: &HeadLoss,
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
) -> candle_core::Result<(T, Vec<T>)> {
    let (x, w) = (elems::<T>(x, lx)?, elems::<T>(w, lw)?);
    let (n, c) = lx.shape().dims2()?;
    let (v, cw) = lw.shape().dims2()?;
    if c != cw
        || v == 0
        || op.targets.len() != n
        || op.weights.as_ref().is_some_and(|w| w.len() != n)
    {
        candle_core::bail!(
            "head-loss: x {:?}, wte {:?}, {} targets",
            lx.dims(),
            lw.dims(),
            op.targets.len()
        );
    }
    // (N, C) · (C, V): wte's rows are the logits' columns.
    let mut logits = vec![T::ZERO; n * v];
    gemm(
        (n, v, c),
        &mut logits,
        v,
        false,
        Mat::rows(x, c),
        Mat::rows(w, c).t(),
        T::from_f64(1.0),
    )?;
    // Each row's share of the loss: 1/N (the mean's factor), or wᵢ/Σw.
    let share: Vec<T> = match &op.weights {
        None => vec![T::from_f64(1.0 / n as f64); n],
        Some(ws) => {
            let ws: Vec<T> = ws.iter().map(|&w| T::from_f64(w)).collect();
            let total = ws.iter().fold(T::ZERO, |a, &w| a + w);
            ws.iter().map(|&w| T::from_f64(1.0) / total * w).collect()
        }
    };
    let mut loss = T::ZERO;
    let mut total = T::ZERO;
    for ((row, &t), (&share, i)) in logits
        .chunks_mut(v)
        .zip(&op.targets)
        .zip(share.iter().zip(0..))
    {
        if t as usize >= v {
            candle_core::bail!("target id {t} is outside the {v} logits");
        }
        // The row becomes d loss / d logits = shareᵢ · (softmax − onehot(target)).
        let nll = super::vector::nll_and_grad(row, t as usize, share);
        match &op.weights {
            None => loss = loss + nll,
            Some(ws) => {
                let w = T::from_f64(ws[i]);
                loss = loss + nll * w;
                total = total + w;
            }
        }
    }
    let loss = match op.weights {
        None => loss * T::from_f64(1.0 / n as f64),
        Some(_) => loss / total,
    };
    Ok((loss, logits))
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            op: &HeadLoss,
            x: &CpuStorage,
            lx: &Layout,
            w: &CpuStorage,
            lw: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            let (loss, dlogits) = head_forward::<T>(op, x, lx, w, lw)?;
            let mut stash = op
                .dlogits
                .lock()
                .map_err(|_| candle_core::Error::Msg("head-loss: a poisoned lock".into()))?;
            *stash = Some(T::store(dlogits));
            Ok(T::store(vec![loss]))
        }
        Ok((by_dtype!(x, run(self, x, lx, w, lw))?, Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wte: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Float + candle_core::WithDType>(
            op: &HeadLoss,
            x: &Tensor,
            wte: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Tensor, Tensor)> {
            let g = grad.to_scalar::<T>()?;
            let ((n, c), v) = (x.dims2()?, wte.dim(0)?);
            let stash = op
                .dlogits
                .lock()
                .map_err(|_| candle_core::Error::Msg("head-loss: a poisoned lock".into()))?;
            let Some(d) = stash.as_ref().and_then(T::of) else {
                candle_core::bail!("head-loss: backward before forward");
            };
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = wte.storage_and_layout();
            let (xs, ws) = match (&*xs, &*ws) {
                (candle_core::Storage::Cpu(a), candle_core::Storage::Cpu(b)) => {
                    (elems::<T>(a, xl)?, elems::<T>(b, wl)?)
                }
                _ => candle_core::bail!("head-loss: not on the host"),
            };
            // dx = g·D·wte (N, C); dwte = g·Dᵀ·x (V, C).
            let mut dx = vec![T::ZERO; n * c];
            gemm(
                (n, c, v),
                &mut dx,
                c,
                false,
                Mat::rows(d, v),
                Mat::rows(ws, c),
                g,
            )?;
            let mut dw = vec![T::ZERO; v * c];
            gemm(
                (v, c, n),
                &mut dw,
                c,
                false,
                Mat::rows(d, v).t(),
                Mat::rows(xs, c),
                g,
            )?;
            let dev = x.device();
            Ok((
                Tensor::from_vec(dx, (n, c), dev)?,
                Tensor::from_vec(dw, (v, c), dev)?,
            ))
        }
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => run::<f32>(self, x, wte, grad)?,
            candle_core::DType::F64 => run::<f64>(self, x, wte, grad)?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused head and loss against the composed graph (matmul, log-softmax, mean or
    /// weighted mean): the loss and both gradients, to 1e-12 in f64.
    #[test]
    fn the_fused_head_loss_equals_the_composed_graph() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, v) = (6, 5, 9);
        let num = |i: usize, k: usize| ((i * k % 17) as f64 - 8.0) / 7.0;
        let x = Var::from_tensor(&Tensor::from_vec(
            (0..n * c).map(|i| num(i, 37)).collect::<Vec<_>>(),
            (n, c),
            &dev,
        )?)?;
        let wte = Var::from_tensor(&Tensor::from_vec(
            (0..v * c).map(|i| num(i, 53)).collect::<Vec<_>>(),
            (v, c),
            &dev,
        )?)?;
        let targets = Tensor::new(&[3u32, 0, 8, 2, 2, 5], &dev)?;
        let weights = Tensor::new(&[1f64, 0.0, 0.5, 1.0, 2.0, 0.25], &dev)?;
        for w in [None, Some(&weights)] {
            let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
                let loss = if fused {
                    head_loss(x.as_tensor(), wte.as_tensor(), &targets, w)?
                } else {
                    cross_entropy(&x.matmul(&wte.t()?)?, &targets, w)?
                };
                // An upstream gradient other than 1.
                let grads = (loss.clone() * 1.5)?.backward()?;
                let g = |t: &Tensor| -> Result<Vec<f64>> {
                    Ok(grads
                        .get(t)
                        .ok_or_else(|| crate::Error::Internal("no grad".into()))?
                        .flatten_all()?
                        .to_vec1()?)
                };
                Ok(vec![
                    vec![loss.to_scalar::<f64>()?],
                    g(x.as_tensor())?,
                    g(wte.as_tensor())?,
                ])
            };
            let (a, b) = (run(true)?, run(false)?);
            for (u, v) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((u - v).abs() < 1e-12, "weights {}: {u} vs {v}", w.is_some());
            }
        }
        // The logits are the mean's: a target outside them is an error, not a panic.
        let bad = Tensor::new(&[9u32, 0, 0, 0, 0, 0], &dev)?;
        assert!(head_loss(x.as_tensor(), wte.as_tensor(), &bad, None).is_err());
        Ok(())
    }
}
