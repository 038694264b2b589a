//! GPT-2 as a graph candle can differentiate: the same layers as `crate::model`, written with
//! the training ops of [`super::ops`] (fused nodes with exact backwards on the host, candle's
//! ops elsewhere; the inference model's fused kernels have no backward), over [`Var`]s named
//! and shaped as the checkpoint's tensors (`wte.weight`, `h.{i}.attn.c_attn.weight` as (in, out), ...), so a
//! trained model is saved as is and loads anywhere GPT-2 loads.
//!
//! It computes what transformers' `GPT2LMHeadModel` does in training mode (eager attention):
//! dropout after the embeddings, on the attention probabilities and after each residual branch,
//! one rate for all three (nanoGPT's `dropout`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::{Activation, Config};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Dropout while training: the rate and the generator of this step's masks.
pub(crate) struct Dropout {
    pub(crate) p: f32,
    pub(crate) rng: SplitMix64,
}

impl Dropout {
    /// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)`, as
    /// `torch.nn.Dropout` in training mode. The mask comes from our seeded generator, so a
    /// resumed run draws the masks the uninterrupted one would.
    fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        match self.mask(x.shape(), x.device(), x.dtype())? {
            Some(mask) => Ok(x.mul(&mask)?),
            None => Ok(x.clone()),
        }
    }

    /// The multipliers of a tensor of `shape` (0, or 1/(1-p) kept), drawn in its elements'
    /// order; `None` when the rate is 0 (nothing drawn).
    fn mask(
        &mut self,
        shape: &candle_core::Shape,
        device: &Device,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        if self.p <= 0.0 {
            return Ok(None);
        }
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                let u = (self.rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                if u < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

/// Dropout in training mode, or nothing (evaluation).
fn drop(dropout: &mut Option<&mut Dropout>, x: Tensor) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(&x),
        None => Ok(x),
    }
}

/// `torch.nn.LayerNorm`: two-pass statistics, biased variance.
struct LayerNorm {
    weight: Var,
    bias: Var,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // (B, T, C), normalised over C, then scaled and shifted per channel.
        super::ops::layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
}

/// HF's `Conv1D`: `x · W + b` with `W` stored (in, out).
struct Conv1D {
    weight: Var,
    bias: Var,
}

impl Conv1D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.rows(x, super::ops::conv1d)
    }

    /// `gelu_new(x·W + b)` as one node.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.rows(x, super::ops::conv1d_gelu)
    }

    /// `f(x, W, b)` over x (B, T, in) as (B·T, in) rows -> (B, T, out).
    fn rows(
        &self,
        x: &Tensor,
        f: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let d_out = self.weight.dim(1)?;
        let y = f(
            &x.reshape((b * t, d_in))?,
            self.weight.as_tensor(),
            self.bias.as_tensor(),
        )?;
        Ok(y.reshape((b, t, d_out))?)
    }
}

struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// A GPT-2 whose weights are trainable variables.
pub(crate) struct TrainModel {
    config: Config,
    wte: Var,
    wpe: Var,
    h: Vec<Block>,
    ln_f: LayerNorm,
}

impl TrainModel {
    /// A model of `config` from `tensors` named as [`crate::checkpoint::checkpoint_layout`]
    /// names them (no prefix, Conv1D (in, out)), as `dtype` variables on `device`.
    pub(crate) fn from_tensors(
        config: &Config,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut var = |name: String| -> Result<Var> {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Internal(format!("no tensor `{name}` to train")))?;
            Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?)
        };
        let eps = config.layer_norm_epsilon;
        let mut norm = |name: String| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: var(format!("{name}.weight"))?,
                bias: var(format!("{name}.bias"))?,
                eps,
            })
        };
        let ln: Vec<(LayerNorm, LayerNorm)> = (0..config.n_layer)
            .map(|i| Ok((norm(format!("h.{i}.ln_1"))?, norm(format!("h.{i}.ln_2"))?)))
            .collect::<Result<_>>()?;
        let ln_f = norm("ln_f".into())?;
        let mut conv = |name: String| -> Result<Conv1D> {
            Ok(Conv1D {
                weight: var(format!("{name}.weight"))?,
                bias: var(format!("{name}.bias"))?,
            })
        };
        let mut h = Vec::with_capacity(config.n_layer);
        for (i, (ln_1, ln_2)) in ln.into_iter().enumerate() {
            h.push(Block {
                ln_1,
                attn: Attention {
                    c_attn: conv(format!("h.{i}.attn.c_attn"))?,
                    c_proj: conv(format!("h.{i}.attn.c_proj"))?,
                },
                ln_2,
                mlp: Mlp {
                    c_fc: conv(format!("h.{i}.mlp.c_fc"))?,
                    c_proj: conv(format!("h.{i}.mlp.c_proj"))?,
                },
            });
        }
        Ok(Self {
            config: config.clone(),
            wte: var("wte.weight".into())?,
            wpe: var("wpe.weight".into())?,
            h,
            ln_f,
        })
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Where the weights live and their dtype (every parameter shares them).
    pub(crate) fn device(&self) -> &Device {
        self.wte.device()
    }

    pub(crate) fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// Every parameter with its checkpoint name, in [`crate::checkpoint::checkpoint_layout`]'s
    /// order (the tied LM head is `wte`, listed once).
    pub(crate) fn parameters(&self) -> Vec<(String, &Var)> {
        let mut out = vec![
            ("wte.weight".to_string(), &self.wte),
            ("wpe.weight".to_string(), &self.wpe),
        ];
        for (i, b) in self.h.iter().enumerate() {
            for (name, c) in [
                ("attn.c_attn", &b.attn.c_attn),
                ("attn.c_proj", &b.attn.c_proj),
                ("mlp.c_fc", &b.mlp.c_fc),
                ("mlp.c_proj", &b.mlp.c_proj),
            ] {
                out.push((format!("h.{i}.{name}.weight"), &c.weight));
                out.push((format!("h.{i}.{name}.bias"), &c.bias));
            }
            for (name, n) in [("ln_1", &b.ln_1), ("ln_2", &b.ln_2)] {
                out.push((format!("h.{i}.{name}.weight"), &n.weight));
                out.push((format!("h.{i}.{name}.bias"), &n.bias));
            }
        }
        out.push(("ln_f.weight".to_string(), &self.ln_f.weight));
        out.push(("ln_f.bias".to_string(), &self.ln_f.bias));
        out
    }

    /// The current weights, by checkpoint name, on the host (in the dtype they train in).
    pub(crate) fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.parameters()
            .into_iter()
            .map(|(name, v)| Ok((name, v.as_tensor().to_device(&Device::Cpu)?.copy()?)))
            .collect()
    }

    /// Logits (B, T, vocab) of `ids` (B, T), with `dropout` when training.
    pub(crate) fn forward(&self, ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        // (B·T, C) · (C, vocab): the head tied to wte.
        let logits = self.hidden(ids, dropout)?.matmul(&self.wte.t()?)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// The mean cross-entropy of the logits of `ids` (B, T) against `targets` (B·T,), or with
    /// `weights` (B·T,) the weighted mean `Σ wᵢ·nllᵢ / Σ wᵢ`; a scalar. The head and the loss
    /// are one node (`ops::head_loss`): the logits are not kept.
    pub(crate) fn loss(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        weights: Option<&Tensor>,
        dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let x = self.hidden(ids, dropout)?;
        super::ops::head_loss(&x, self.wte.as_tensor(), targets, weights)
    }

    /// The last layer norm's output (B·T, C) for `ids` (B, T).
    fn hidden(&self, ids: &Tensor, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.config.n_embd;
        // (B, T, C): wte's rows of the ids plus wpe's first T rows.
        let x = super::ops::embed(ids, self.wte.as_tensor(), self.wpe.as_tensor())?;
        let mut x = drop(&mut dropout, x)?;
        for (layer, block) in self.h.iter().enumerate() {
            let a = self.attention(block, &block.ln_1.forward(&x)?, layer, &mut dropout)?;
            x = (x + a)?;
            let m = self.mlp(&block.mlp, &block.ln_2.forward(&x)?)?;
            x = (x + drop(&mut dropout, m)?)?;
        }
        Ok(self.ln_f.forward(&x)?.reshape((b * t, c))?)
    }

    /// `GPT2Attention`'s eager path (with `n_kv_head` < `n_head`, each K/V head repeated for
    /// its group of query heads, as transformers' `repeat_kv`), then `c_proj` and the residual
    /// dropout. `x`: (B, T, C) after `ln_1`.
    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        layer: usize,
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let cfg = &self.config;
        let (nh, nkv, hs) = (cfg.n_head, cfg.kv_heads(), cfg.head_size());
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (hs as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        let heads = super::ops::Heads {
            n_head: nh,
            n_kv_head: nkv,
            head_size: hs,
            scale,
        };
        // Dropout on the probabilities (B, nh, T, T): the mask drawn here, as the composed
        // graph draws it.
        let mask = match dropout {
            Some(d) => d.mask(&(b, nh, t, t).into(), x.device(), x.dtype())?,
            None => None,
        };
        // (B, T, C)
        let (w, bias) = (&block.attn.c_attn.weight, &block.attn.c_attn.bias);
        let y = super::ops::conv1d_attention(x, w, bias, heads, mask.as_ref())?;
        drop(dropout, block.attn.c_proj.forward(&y)?)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let h = match self.config.activation_function {
            // GPT-2's tanh approximation, with its exact derivative, in c_fc's node (see `ops`).
            Activation::GeluNew | Activation::GeluPytorchTanh => mlp.c_fc.forward_gelu(x)?,
            Activation::Gelu => mlp.c_fc.forward(x)?.gelu_erf()?,
            Activation::Relu => mlp.c_fc.forward(x)?.relu()?,
        };
        mlp.c_proj.forward(&h)
    }
}

/// GPT-2's initialisation (transformers' `GPT2PreTrainedModel._init_weights`): every matrix and
/// embedding normal with std `initializer_range` (0.02), the residual projections (`c_proj`)
/// with std `0.02/√(2·n_layer)`, biases 0, layer norms 1 and 0. Seeded, by tensor name (so one
/// tensor does not depend on the others).
pub(crate) fn init_tensors(config: &Config, seed: u64) -> Result<HashMap<String, Tensor>> {
    const STD: f64 = 0.02;
    crate::checkpoint::checkpoint_layout(config)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.contains("ln_") {
                let one = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                vec![one; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let std = if name.ends_with("c_proj.weight") {
                    STD / (2.0 * config.n_layer as f64).sqrt()
                } else {
                    STD
                };
                let mut rng = SplitMix64::new(seed ^ crate::rng::hash_name(&name));
                (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
            };
            Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
        })
        .collect()
}

/// A standard normal number (Box-Muller, one of the pair).
fn normal(rng: &mut SplitMix64) -> f64 {
    let unit = |r: &mut SplitMix64| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (u1, u2) = (unit(rng), unit(rng));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{random_checkpoint, Checkpoint};
    use crate::model::Gpt2;
    use crate::options::LoadOptions;

    fn layout(n_kv_head: Option<usize>) -> Config {
        Config {
            vocab_size: 96,
            n_positions: 16,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            n_kv_head,
            bos_token_id: 95,
            eos_token_id: 95,
            ..Config::default()
        }
    }

    /// The graph trained is the model that runs: its logits are `Gpt2::forward`'s (which the
    /// parity tests hold to transformers), with and without grouped K/V heads.
    #[test]
    fn the_trained_graph_computes_the_inference_model() -> Result<()> {
        for kv in [None, Some(2), Some(1)] {
            let config = layout(kv);
            let tensors = random_checkpoint(&config, 7)?;
            let reference = Gpt2::new(
                config.clone(),
                Checkpoint::Tensors(tensors.clone()),
                &LoadOptions::default(),
            )?;
            let model = TrainModel::from_tensors(&config, tensors, DType::F32, &Device::Cpu)?;
            let ids = Tensor::new(
                &[[1u32, 5, 9, 95, 3, 3, 40, 2], [7, 7, 7, 1, 0, 94, 95, 8]],
                &Device::Cpu,
            )?;
            let want = reference.forward(&ids, None)?;
            let got = model.forward(&ids, None)?;
            let diff = (want - got)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 2e-4, "n_kv_head {kv:?}: logits differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn dropout_keeps_its_rate_in_training_and_is_off_in_evaluation() -> Result<()> {
        let x = Tensor::ones((200, 500), DType::F32, &Device::Cpu)?;
        let mut d = Dropout {
            p: 0.25,
            rng: SplitMix64::new(3),
        };
        let y: Vec<f32> = d.apply(&x)?.flatten_all()?.to_vec1()?;
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.01, "dropped {zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        // The forward pass without a `Dropout` (evaluation) is deterministic; with one, it is not
        // the same numbers.
        let config = layout(None);
        let model = TrainModel::from_tensors(
            &config,
            random_checkpoint(&config, 1)?,
            DType::F32,
            &Device::Cpu,
        )?;
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
        let a: Vec<f32> = model.forward(&ids, None)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = model.forward(&ids, None)?.flatten_all()?.to_vec1()?;
        assert_eq!(a, b);
        let mut d = Dropout {
            p: 0.25,
            rng: SplitMix64::new(3),
        };
        let c: Vec<f32> = model
            .forward(&ids, Some(&mut d))?
            .flatten_all()?
            .to_vec1()?;
        assert_ne!(a, c);
        Ok(())
    }

    #[test]
    fn init_follows_gpt2s_scales() -> Result<()> {
        let config = Config::default();
        let small = Config {
            vocab_size: 64,
            n_positions: 8,
            ..config
        };
        let t = init_tensors(&small, 0)?;
        let std = |name: &str| -> Result<f64> {
            let v: Vec<f32> = t[name].flatten_all()?.to_vec1()?;
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
            Ok((v
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / n)
                .sqrt())
        };
        assert!((std("h.0.mlp.c_fc.weight")? - 0.02).abs() < 5e-4);
        let proj = 0.02 / (2.0 * 12f64).sqrt();
        assert!((std("h.3.attn.c_proj.weight")? - proj).abs() < 2e-4);
        assert_eq!(std("h.0.ln_1.weight")?, 0.0);
        Ok(())
    }
}
