//! AdamW as `torch.optim.AdamW` computes it (the single-tensor path: decoupled weight decay,
//! then the bias-corrected step, in torch's order of operations), gradient clipping as
//! `torch.nn.utils.clip_grad_norm_`, and the learning-rate schedule.
//!
//! Weight decay applies to matrices and embeddings only, never to biases or layer norms: the
//! rule of nanoGPT's `configure_optimizers` (parameters of two or more dimensions) and of
//! transformers' `Trainer`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::ops::Float;
use crate::error::{Error, Result};

/// Adam's hyper-parameters (torch's defaults but the learning rate, which the schedule gives).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter's moments.
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// `exp_avg`, `exp_avg_sq`.
    m: Tensor,
    v: Tensor,
}

pub(crate) struct AdamW {
    params: AdamWParams,
    slots: Vec<Slot>,
    /// Steps taken (torch's `state["step"]`).
    step: u64,
}

impl AdamW {
    /// Zero moments for `vars` (name, variable).
    pub(crate) fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    decay: var.rank() >= 2,
                    m: zeros.clone(),
                    v: zeros,
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            slots,
            step: 0,
        })
    }

    pub(crate) fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`; a parameter without a gradient (unused in the
    /// graph) keeps its value and moments, as torch skips a `None` grad.
    pub(crate) fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        self.step += 1;
        let t = self.step as f64;
        let bias1 = 1.0 - beta1.powf(t);
        let bias2_sqrt = (1.0 - beta2.powf(t)).sqrt();
        let step_size = lr / bias1;
        let k = Coefs {
            beta1,
            beta2,
            eps,
            decay: 1.0 - lr * weight_decay,
            bias2_sqrt,
            step_size,
        };
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let host = match slot.var.dtype() {
                DType::F32 => fused::<f32>(slot, g, &k).map(|r| tensors(slot, r)),
                DType::F64 => fused::<f64>(slot, g, &k).map(|r| tensors(slot, r)),
                _ => None,
            };
            if let Some(done) = host {
                let [p, m, v] = done?;
                slot.var.set(&p)?;
                (slot.m, slot.v) = (m, v);
                continue;
            }
            let mut p = slot.var.as_tensor().clone();
            if slot.decay && weight_decay != 0.0 {
                // param.mul_(1 - lr·wd)
                p = (p * (1.0 - lr * weight_decay))?;
            }
            // exp_avg.lerp_(grad, 1 - β1): m + (1 - β1)·(g - m)
            slot.m = (&slot.m + ((g - &slot.m)? * (1.0 - beta1))?)?;
            // exp_avg_sq.mul_(β2).addcmul_(g, g, value = 1 - β2)
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            // denom = sqrt(v)/sqrt(1 - β2ᵗ) + ε;  param -= lr/(1 - β1ᵗ) · m / denom
            let denom = ((slot.v.sqrt()? / bias2_sqrt)? + eps)?;
            p = (p - ((&slot.m / denom)? * step_size)?)?;
            slot.var.set(&p)?;
        }
        Ok(())
    }

    /// The moments by name (`{name}.exp_avg`, `{name}.exp_avg_sq`), on the host, and the step
    /// count: what `--resume` needs.
    pub(crate) fn state(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let host = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_device(&candle_core::Device::Cpu)?.copy()?)
            };
            out.insert(format!("{}.exp_avg", s.name), host(&s.m)?);
            out.insert(format!("{}.exp_avg_sq", s.name), host(&s.v)?);
        }
        Ok((out, self.step))
    }

    /// Restores [`AdamW::state`]'s moments and step count; a missing or misshapen moment is an
    /// error naming it.
    pub(crate) fn restore(&mut self, mut state: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let dtype = s.var.dtype();
            let device = s.var.device().clone();
            let shape = s.var.dims().to_vec();
            let mut take = |key: String| -> Result<Tensor> {
                let t = state
                    .remove(&key)
                    .ok_or_else(|| Error::Input(format!("the optimizer state has no `{key}`")))?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::Input(format!(
                        "the optimizer state's `{key}` has shape {:?}, the model's {shape:?}",
                        t.dims()
                    )));
                }
                Ok(t.to_dtype(dtype)?.to_device(&device)?)
            };
            s.m = take(format!("{}.exp_avg", s.name))?;
            s.v = take(format!("{}.exp_avg_sq", s.name))?;
        }
        self.step = step;
        Ok(())
    }
}

/// One step's scalars.
struct Coefs {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// `1 - lr·weight_decay`.
    decay: f64,
    bias2_sqrt: f64,
    step_size: f64,
}

/// The update of one host parameter in one pass (torch's single-tensor AdamW, element by
/// element, in the parameter's dtype): new parameter, `exp_avg`, `exp_avg_sq`. `None` off the
/// host.
fn fused<T: Float>(slot: &Slot, g: &Tensor, k: &Coefs) -> Option<(Vec<T>, Vec<T>, Vec<T>)> {
    let c = |v: f64| T::from_f64(v);
    // Parameters that do not decay are multiplied by 1: exact.
    let decay = c(if slot.decay { k.decay } else { 1.0 });
    let (b1, b2, b2c) = (c(1.0 - k.beta1), c(k.beta2), c(1.0 - k.beta2));
    let (sq, eps, step) = (c(k.bias2_sqrt), c(k.eps), c(k.step_size));
    let tensors = [slot.var.as_tensor(), g, &slot.m, &slot.v];
    super::ops::with_host::<T, _>(&tensors, |s| {
        let (p, g, m, v) = (s[0], s[1], s[2], s[3]);
        let n = p.len();
        let (mut po, mut mo, mut vo) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in 0..n {
            let m = m[i] + b1 * (g[i] - m[i]);
            let v = v[i] * b2 + g[i] * g[i] * b2c;
            let denom = v.sqrt() / sq + eps;
            po.push(p[i] * decay - step * (m / denom));
            mo.push(m);
            vo.push(v);
        }
        (po, mo, vo)
    })
}

/// The fused update's vectors as tensors shaped as the parameter.
fn tensors<T: candle_core::WithDType>(
    slot: &Slot,
    (p, m, v): (Vec<T>, Vec<T>, Vec<T>),
) -> Result<[Tensor; 3]> {
    let (shape, device) = (slot.var.shape(), slot.var.device());
    Ok([
        Tensor::from_vec(p, shape, device)?,
        Tensor::from_vec(m, shape, device)?,
        Tensor::from_vec(v, shape, device)?,
    ])
}

/// The gradients' global L2 norm, and with `max_norm` > 0 the gradients scaled by
/// `max_norm / (norm + 1e-6)` when that is below 1, as `clip_grad_norm_` (norm of the per-tensor
/// norms, in f32 when training in f32). Returns the norm before clipping.
pub(crate) fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let norms = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()))
        .map(|g| Ok(g.sqr()?.sum_all()?.sqrt()?))
        .collect::<Result<Vec<Tensor>>>()?;
    if norms.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?;
    let norm = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if max_norm > 0.0 {
        // clip_coef = max_norm / (total + 1e-6), clamped to 1, in the gradients' dtype; torch
        // multiplies by it whether or not it clips (by 1.0 when it does not).
        let coef = ((total + 1e-6)?.recip()? * max_norm)?.clamp(0.0, 1.0)?;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), g.broadcast_mul(&coef)?);
            }
        }
    }
    Ok(norm)
}

/// How the learning rate changes over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// `lr` after the warm-up.
    #[default]
    Constant,
    /// Cosine from `lr` at the end of the warm-up to `min_lr` at the last step.
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            _ => Err(Error::param(
                "lr-schedule",
                format!("`{s}`: expected constant or cosine"),
            )),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Constant => "constant",
            Self::Cosine => "cosine",
        })
    }
}

/// The learning rate of step `s` (0-based) of `steps`: a linear warm-up `lr·(s+1)/warmup` over
/// the first `warmup` steps, then constant, or cosine `min_lr + ½(1 + cos(π·p))(lr - min_lr)`
/// with `p = (s - warmup)/(steps - 1 - warmup)` going from 0 to 1 at the last step.
pub fn learning_rate(
    s: u64,
    steps: u64,
    lr: f64,
    warmup: u64,
    schedule: Schedule,
    min_lr: f64,
) -> f64 {
    if s < warmup {
        return lr * (s + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let span = steps.saturating_sub(1).saturating_sub(warmup).max(1);
            let p = ((s - warmup) as f64 / span as f64).min(1.0);
            min_lr + 0.5 * (1.0 + (std::f64::consts::PI * p).cos()) * (lr - min_lr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_min_lr_at_the_last_step() {
        let lr = |s| learning_rate(s, 10, 1.0, 2, Schedule::Cosine, 0.1);
        assert_eq!(lr(0), 0.5);
        assert_eq!(lr(1), 1.0);
        assert_eq!(lr(2), 1.0);
        assert!((lr(9) - 0.1).abs() < 1e-12);
        assert!(lr(5) < lr(4) && lr(5) > 0.1);
        assert_eq!(learning_rate(7, 10, 0.3, 0, Schedule::Constant, 0.0), 0.3);
    }
}
