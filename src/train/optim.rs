//! AdamW as `torch.optim.AdamW` computes it (the single-tensor path: decoupled weight decay,
//! then the bias-corrected step, in torch's order of operations), gradient clipping as
//! `torch.nn.utils.clip_grad_norm_`, and the learning-rate schedule.
//!
//! Weight decay applies to matrices and embeddings only, never to biases or layer norms: the
//! rule of nanoGPT's `configure_optimizers` (parameters of two or more dimensions) and of
//! transformers' `Trainer`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};

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

/// One parameter and its moments.
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// `exp_avg` and `exp_avg_sq` of one parameter.
enum Moments {
    /// On the host, in the parameter's dtype: updated in place with the parameter, one pass and
    /// no allocation (three fresh vectors of the model's size each step were a tenth of a GPT-2
    /// small step, most of it the kernel zeroing their new pages).
    F32(Vec<f32>, Vec<f32>),
    F64(Vec<f64>, Vec<f64>),
    /// On another device: tensors, updated by candle's ops.
    Tensors(Tensor, Tensor),
}

impl Moments {
    /// Zero moments for `var`.
    fn zeros(var: &Var) -> Result<Self> {
        let n = var.elem_count();
        Ok(match (var.device().is_cpu(), var.dtype()) {
            (true, DType::F32) => Self::F32(vec![0.0; n], vec![0.0; n]),
            (true, DType::F64) => Self::F64(vec![0.0; n], vec![0.0; n]),
            _ => {
                let zeros = var.as_tensor().zeros_like()?;
                Self::Tensors(zeros.clone(), zeros)
            }
        })
    }

    /// `m` and `v` from tensors of the parameter's shape (a restored state).
    fn from_tensors(var: &Var, m: Tensor, v: Tensor) -> Result<Self> {
        Ok(match Self::zeros(var)? {
            Self::F32(..) => Self::F32(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?),
            Self::F64(..) => Self::F64(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?),
            Self::Tensors(..) => Self::Tensors(m, v),
        })
    }

    /// Both as host tensors shaped as `var`.
    fn tensors(&self, var: &Var) -> Result<[Tensor; 2]> {
        let cpu = candle_core::Device::Cpu;
        let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&cpu)?.copy()?) };
        Ok(match self {
            Self::F32(m, v) => [
                Tensor::from_slice(m, var.shape(), &cpu)?,
                Tensor::from_slice(v, var.shape(), &cpu)?,
            ],
            Self::F64(m, v) => [
                Tensor::from_slice(m, var.shape(), &cpu)?,
                Tensor::from_slice(v, var.shape(), &cpu)?,
            ],
            Self::Tensors(m, v) => [host(m)?, host(v)?],
        })
    }
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
                Ok(Slot {
                    decay: var.rank() >= 2,
                    moments: Moments::zeros(&var)?,
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

    /// One update with learning rate `lr`, each gradient first multiplied by `clip` when given
    /// (the coefficient [`clip_grad_norm`] returns, a scalar in the gradients' dtype, as torch
    /// scales the gradients in place before the step); a parameter without a gradient (unused
    /// in the graph) keeps its value and moments, as torch skips a `None` grad.
    pub(crate) fn step(&mut self, grads: &GradStore, lr: f64, clip: Option<&Tensor>) -> Result<()> {
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
            let decay = if slot.decay { k.decay } else { 1.0 };
            match &mut slot.moments {
                Moments::F32(m, v) => in_place::<f32>(&slot.var, g, clip, m, v, decay, &k)?,
                Moments::F64(m, v) => in_place::<f64>(&slot.var, g, clip, m, v, decay, &k)?,
                Moments::Tensors(m, v) => {
                    let g = match clip {
                        Some(c) => g.broadcast_mul(c)?,
                        None => g.clone(),
                    };
                    // param.mul_(1 - lr·wd)
                    let p = (slot.var.as_tensor() * decay)?;
                    // exp_avg.lerp_(grad, 1 - β1): m + (1 - β1)·(g - m)
                    *m = (&*m + ((&g - &*m)? * (1.0 - beta1))?)?;
                    // exp_avg_sq.mul_(β2).addcmul_(g, g, value = 1 - β2)
                    *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    // denom = sqrt(v)/sqrt(1 - β2ᵗ) + ε;  param -= lr/(1 - β1ᵗ) · m / denom
                    let denom = ((v.sqrt()? / bias2_sqrt)? + eps)?;
                    slot.var.set(&(p - ((&*m / denom)? * step_size)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// The moments by name (`{name}.exp_avg`, `{name}.exp_avg_sq`), on the host, and the step
    /// count: what `--resume` needs.
    pub(crate) fn state(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let [m, v] = s.moments.tensors(&s.var)?;
            out.insert(format!("{}.exp_avg", s.name), m);
            out.insert(format!("{}.exp_avg_sq", s.name), v);
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
            let m = take(format!("{}.exp_avg", s.name))?;
            let v = take(format!("{}.exp_avg_sq", s.name))?;
            s.moments = Moments::from_tensors(&s.var, m, v)?;
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

/// The update of one host parameter in place, in one pass (torch's single-tensor AdamW, element
/// by element, in the parameter's dtype): the parameter through candle's in-place op, its
/// moments `m` and `v` here.
fn in_place<T: Float + candle_core::WithDType>(
    var: &Var,
    g: &Tensor,
    clip: Option<&Tensor>,
    m: &mut [T],
    v: &mut [T],
    decay: f64,
    k: &Coefs,
) -> Result<()> {
    let clip = match clip {
        Some(c) => Some(c.to_dtype(var.dtype())?.to_scalar::<T>()?),
        None => None,
    };
    let update = Update {
        g: g.contiguous()?,
        clip,
        moments: std::cell::RefCell::new((m, v)),
        decay: <T as Float>::from_f64(decay),
        k,
    };
    Ok(var.as_tensor().inplace_op1(&update)?)
}

/// One parameter's AdamW update as candle's in-place op on the parameter; the gradient is read
/// from its tensor, the moments are the slot's vectors.
struct Update<'a, T> {
    g: Tensor,
    clip: Option<T>,
    moments: std::cell::RefCell<(&'a mut [T], &'a mut [T])>,
    /// `1 - lr·weight_decay`, or 1 (exact) for a parameter that does not decay.
    decay: T,
    k: &'a Coefs,
}

impl<T: Float> candle_core::InplaceOp1 for Update<'_, T> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let c = |v: f64| T::from_f64(v);
        let k = self.k;
        let (b1, b2, b2c) = (c(1.0 - k.beta1), c(k.beta2), c(1.0 - k.beta2));
        let (sq, eps, step, decay) = (c(k.bias2_sqrt), c(k.eps), c(k.step_size), self.decay);
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("adamw: the parameter is not contiguous");
        };
        let p = match T::of_mut(s) {
            Some(p) => &mut p[a..b],
            None => candle_core::bail!("adamw: the parameter's dtype changed"),
        };
        let (gs, gl) = self.g.storage_and_layout();
        let g = match &*gs {
            candle_core::Storage::Cpu(cs) => super::ops::elems::<T>(cs, gl)?,
            _ => candle_core::bail!("adamw: the gradient is not on the host"),
        };
        if [g.len(), m.len(), v.len()] != [p.len(); 3] {
            candle_core::bail!("adamw: gradient or moments of another size than the parameter");
        }
        // clip_grad_norm_'s g·coef (a product by 1 when it does not clip: exact), then the
        // step, element by element.
        let clip = self.clip.unwrap_or(c(1.0));
        super::ops::adamw(p, g, m, v, clip, [b1, b2, b2c, sq, eps, step, decay]);
        Ok(())
    }
}

/// The gradients' global L2 norm (the norm of the per-tensor norms, in f32 when training in
/// f32, as `clip_grad_norm_`), and with `max_norm` > 0 the coefficient `max_norm / (norm +
/// 1e-6)` clamped to 1, a scalar in the gradients' dtype, that [`AdamW::step`] multiplies
/// them by (torch multiplies by it whether or not it clips: by 1.0 when it does not).
pub(crate) fn clip_grad_norm(
    grads: &GradStore,
    vars: &[&Var],
    max_norm: f64,
) -> Result<(f64, Option<Tensor>)> {
    let norms = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()))
        .map(|g| Ok(g.sqr()?.sum_all()?.sqrt()?))
        .collect::<Result<Vec<Tensor>>>()?;
    if norms.is_empty() {
        return Ok((0.0, None));
    }
    let total = Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?;
    let norm = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if max_norm > 0.0 {
        let coef = ((total + 1e-6)?.recip()? * max_norm)?.clamp(0.0, 1.0)?;
        return Ok((norm, Some(coef)));
    }
    Ok((norm, None))
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

    /// The host's in-place update and the tensor formulas other devices run give the same
    /// parameters and moments, with weight decay, clipping and a parameter that does not decay.
    #[test]
    fn the_in_place_update_equals_the_tensor_formulas() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let num = |n: usize, k: usize| -> Vec<f64> {
            (0..n).map(|i| ((i * k % 17) as f64 - 8.0) / 9.0).collect()
        };
        let run = |host: bool| -> Result<Vec<Vec<f64>>> {
            let w = Var::from_tensor(&Tensor::from_vec(num(12, 5), (3, 4), &dev)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(num(4, 7), 4, &dev)?)?;
            let params = AdamWParams {
                weight_decay: 0.1,
                ..AdamWParams::default()
            };
            let mut opt = AdamW::new(
                vec![("w".into(), w.clone()), ("b".into(), b.clone())],
                params,
            )?;
            if !host {
                for slot in &mut opt.slots {
                    let zeros = slot.var.as_tensor().zeros_like()?;
                    slot.moments = Moments::Tensors(zeros.clone(), zeros);
                }
            }
            for step in 0..3 {
                let mut grads = GradStore::default();
                let gw: Vec<f64> = num(12, 3 + step).iter().map(|g| g * 2.0).collect();
                grads.insert(w.as_tensor(), Tensor::from_vec(gw, (3, 4), &dev)?);
                grads.insert(b.as_tensor(), Tensor::from_vec(num(4, 11 + step), 4, &dev)?);
                let clip = Tensor::new(0.75f64, &dev)?;
                opt.step(&grads, 1e-2, Some(&clip))?;
            }
            let (state, _) = opt.state()?;
            let mut out = vec![w.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?];
            for key in ["w.exp_avg", "w.exp_avg_sq", "b.exp_avg", "b.exp_avg_sq"] {
                out.push(state[key].flatten_all()?.to_vec1()?);
            }
            Ok(out)
        };
        let (a, b) = (run(true)?, run(false)?);
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() <= 1e-15 * y.abs().max(1e-3), "{x} vs {y}");
        }
        Ok(())
    }

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
