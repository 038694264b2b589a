//! `gpt2 train`: training GPT-2-style models in candle as torch trains them, and watching the
//! heads form.
//!
//! [`Trainer`] owns a differentiable copy of the model ([`model`]), AdamW ([`optim`]) and the
//! data ([`data`]); each [`Trainer::step`] is one batch: forward, mean cross-entropy, backward,
//! clipping, one AdamW update at the schedule's learning rate. [`Trainer::evaluate`] measures the
//! held-out loss, the in-context loss and every head's scores ([`eval`]); [`Trainer::save`]
//! writes a Hugging Face folder and the optimizer state beside it ([`save`]), from which
//! [`Trainer::resume`] continues bit for bit. [`report`] turns the run's logs and its final
//! model into `OUT/report.html` and the `--plot` PNG, and finds the phase change.
//!
//! Conventions (as `torch.optim.AdamW`, nanoGPT and transformers' `Trainer`): decoupled weight
//! decay on matrices and embeddings only; the loss is the mean over every position of the batch
//! (for the built-in tasks, the weighted mean over the positions the task scores); gradients
//! clipped by their global norm.

pub mod compare;
pub mod data;
pub mod eval;
mod model;
mod ops;
pub mod optim;
pub mod report;
mod save;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;

pub use data::{DataSpec, Task};
pub use eval::Evaluation;
pub use optim::{learning_rate, AdamWParams, Schedule};

use data::Data;
use model::{Dropout, TrainModel};
use optim::AdamW;

/// Everything a run is asked to do, recorded in `OUT/training.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: Schedule,
    pub min_lr: f64,
    pub adam: AdamWParams,
    /// Maximum global gradient norm; 0 for none.
    pub grad_clip: f64,
    pub dropout: f32,
    pub seed: u64,
    /// Windows in order (see [`data::Data::batch`]) instead of at random offsets.
    pub sequential: bool,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 8,
            seq_len: 128,
            lr: 1e-3,
            warmup: 0,
            schedule: Schedule::Constant,
            min_lr: 1e-4,
            adam: AdamWParams {
                weight_decay: 0.01,
                ..AdamWParams::default()
            },
            grad_clip: 1.0,
            dropout: 0.0,
            seed: 0,
            sequential: false,
            eval_every: 100,
            save_every: 500,
        }
    }
}

impl TrainOptions {
    /// Checks the values against the model's context; the error names the option.
    pub fn validate(&self, config: &Config) -> Result<()> {
        let positive = [
            ("steps", self.steps as usize),
            ("batch-size", self.batch_size),
            ("seq-len", self.seq_len),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::param(name, "must be at least 1"));
        }
        if self.seq_len < 4 {
            // The tasks and the in-context evaluation need room for a repeated segment.
            return Err(Error::param(
                "seq-len",
                format!("{} is too short: at least 4 tokens", self.seq_len),
            ));
        }
        if self.seq_len > config.n_positions {
            return Err(Error::param(
                "seq-len",
                format!(
                    "{} is longer than the model's context (n_positions {})",
                    self.seq_len, config.n_positions
                ),
            ));
        }
        let finite = [
            ("lr", self.lr),
            ("min-lr", self.min_lr),
            ("weight-decay", self.adam.weight_decay),
            ("eps", self.adam.eps),
            ("grad-clip", self.grad_clip),
        ];
        if let Some((name, v)) = finite.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return Err(Error::param(
                name,
                format!("{v} must be a finite number ≥ 0"),
            ));
        }
        for (name, b) in [("beta1", self.adam.beta1), ("beta2", self.adam.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::param(name, format!("{b} must be in [0, 1)")));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::param(
                "dropout",
                format!("{} must be in [0, 1)", self.dropout),
            ));
        }
        Ok(())
    }
}

/// Where the weights of a new run come from.
pub enum Init {
    /// A fresh model of this layout, GPT-2's initialisation from `--seed`.
    Layout(Config),
    /// A checkpoint (a folder or a Hub repo): fine-tuning.
    Model(ModelSource),
}

/// One training step's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    /// The step just taken, 1-based (steps done).
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A training run.
pub struct Trainer {
    model: TrainModel,
    optim: AdamW,
    data: Data,
    spec: DataSpec,
    options: TrainOptions,
    tokenizer: Tokenizer,
    out: PathBuf,
    /// What the weights started from, for the record.
    init: String,
}

impl Trainer {
    /// A new run writing to `out`, in `dtype` (f32; f64 for checks against a reference) on
    /// `device`. `tokenizer`: for a fresh layout, the tokenizer to tokenise text data with and
    /// save (GPT-2's byte tokens when `None`).
    pub fn new(
        init: Init,
        tokenizer: Option<Tokenizer>,
        spec: DataSpec,
        options: TrainOptions,
        out: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(Error::param(
                "dtype",
                format!("training runs in f32 (or f64), not {}", dtype.as_str()),
            ));
        }
        // The layout and the options first: a mistake costs nothing to report, and the memory
        // a step needs is known before any weight is made or read.
        let config = match &init {
            Init::Layout(config) => {
                config.validate()?;
                config.clone()
            }
            Init::Model(source) => {
                // By file identity: `./run` and `/abs/run` are one folder.
                let out_abs = out.canonicalize().unwrap_or_else(|_| out.to_path_buf());
                let inside = |f: &std::path::PathBuf| {
                    f.canonicalize().is_ok_and(|f| f.starts_with(&out_abs))
                };
                if source.local_files().iter().any(inside) {
                    return Err(Error::param(
                        "out",
                        format!(
                            "{} holds the model it starts from; write to another folder",
                            out.display()
                        ),
                    ));
                }
                source.config()?
            }
        };
        options.validate(&config)?;
        check_memory(&config, &options, dtype)?;
        let (tensors, model_tokenizer, init_name) = match init {
            Init::Layout(_) => (
                model::init_tensors(&config, options.seed)?,
                None,
                "a fresh layout".to_string(),
            ),
            Init::Model(source) => {
                let (_, tensors, tokenizer) = save::read_model(&source)?;
                (tensors, Some(tokenizer), source.name())
            }
        };
        let tokenizer = match tokenizer.or(model_tokenizer) {
            Some(t) => t,
            None if config.vocab_size > 256 => Tokenizer::bytes_only_dense(config.eos_token_id)?,
            None => {
                return Err(Error::param(
                    "tokenizer",
                    format!(
                        "is needed for a vocabulary of {} ids (GPT-2's byte tokens need 257)",
                        config.vocab_size
                    ),
                ))
            }
        };
        tokenizer.check_vocab_size(config.vocab_size)?;
        let data = Data::open(
            &spec,
            &tokenizer,
            config.vocab_size,
            config.eos_token_id,
            options.seq_len,
        )?;
        let model = TrainModel::from_tensors(&config, tensors, dtype, device)?;
        let optim = AdamW::new(owned(&model), options.adam)?;
        Ok(Self {
            model,
            optim,
            data,
            spec,
            options,
            tokenizer,
            out: out.to_path_buf(),
            init: init_name,
        })
    }

    /// Continues the run saved in `out`; `steps`, when given, replaces the number of steps (a
    /// cosine schedule then follows the new length).
    pub fn resume(out: &Path, steps: Option<u64>, device: &Device) -> Result<Self> {
        let saved = save::read_run(out)?;
        let mut options = saved.record.options;
        if let Some(s) = steps {
            options.steps = s;
        }
        options.validate(&saved.config)?;
        let data = Data::open(
            &saved.record.data,
            &saved.tokenizer,
            saved.config.vocab_size,
            saved.config.eos_token_id,
            options.seq_len,
        )?;
        let dtype = saved.record.dtype.parse::<DType>().map_err(|_| {
            Error::Input(format!(
                "training.json: unknown dtype {}",
                saved.record.dtype
            ))
        })?;
        check_memory(&saved.config, &options, dtype)?;
        let model = TrainModel::from_tensors(&saved.config, saved.tensors, dtype, device)?;
        let mut optim = AdamW::new(owned(&model), options.adam)?;
        optim.restore(saved.moments, saved.record.step)?;
        Ok(Self {
            model,
            optim,
            data,
            spec: saved.record.data,
            options,
            tokenizer: saved.tokenizer,
            out: out.to_path_buf(),
            init: saved.record.init,
        })
    }

    pub fn config(&self) -> &Config {
        self.model.config()
    }

    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.optim.steps()
    }

    pub fn task(&self) -> Option<Task> {
        self.data.task()
    }

    /// Trainable parameters (the tied head counted once).
    pub fn parameter_count(&self) -> usize {
        self.model
            .parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// One step: the batch of this step, forward, loss, backward, clipping, AdamW. A loss that
    /// is not finite stops the run before the update, naming the step and the learning rate.
    pub fn step(&mut self) -> Result<StepStats> {
        let o = &self.options;
        let s = self.optim.steps();
        let lr = learning_rate(s, o.steps, o.lr, o.warmup, o.schedule, o.min_lr);
        let batch = self
            .data
            .batch(s, o.batch_size, o.seq_len, o.sequential, o.seed);
        let mut dropout = Dropout {
            p: o.dropout,
            rng: data::stream(o.seed, "dropout", s),
        };
        let loss = self.loss(&batch, (o.dropout > 0.0).then_some(&mut dropout))?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(diverged("the loss", value, s + 1, lr));
        }
        let grads = loss.backward()?;
        // The graph (every activation) goes before the update allocates anything.
        drop(loss);
        let params = self.model.parameters();
        let vars: Vec<&candle_core::Var> = params.iter().map(|(_, v)| *v).collect();
        let (grad_norm, clip) = optim::clip_grad_norm(&grads, &vars, o.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(diverged("the gradients' norm", grad_norm, s + 1, lr));
        }
        self.optim.step(&grads, lr, clip.as_ref())?;
        Ok(StepStats {
            step: s + 1,
            loss: value,
            lr,
            grad_norm,
        })
    }

    /// The mean (or task-weighted) cross-entropy of `batch`.
    fn loss(&self, batch: &data::Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let device = self.model_device();
        let (b, t) = (batch.rows, batch.len);
        let ids = Tensor::from_slice(&batch.inputs, (b, t), &device)?;
        let targets = Tensor::from_slice(&batch.targets, b * t, &device)?;
        let weights = match &batch.weights {
            Some(w) => Some(Tensor::from_slice(w, b * t, &device)?.to_dtype(self.model.dtype())?),
            None => None,
        };
        self.model.loss(&ids, &targets, weights.as_ref(), dropout)
    }

    fn model_device(&self) -> Device {
        self.model.device().clone()
    }

    /// The current weights by checkpoint name (no prefix; Conv1D (in, out)), on the host.
    pub fn weights(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.model.tensors()
    }

    /// Writes `OUT/` (see [`save`]): the model as a Hugging Face folder, the optimizer state and
    /// `training.json`, all or nothing.
    pub fn save(&self) -> Result<()> {
        let (moments, step) = self.optim.state()?;
        let dtype = self.model.dtype();
        let record = save::RunRecord {
            step,
            options: self.options.clone(),
            data: self.spec.clone(),
            init: self.init.clone(),
            dtype: dtype.as_str().to_string(),
        };
        let tensors = self.model.tensors()?;
        // A NaN or an infinity anywhere makes the sum one (finite weights cannot overflow it).
        for (name, t) in &tensors {
            let sum = t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Err(Error::Input(format!(
                    "`{name}` is not finite after step {step}: training diverged; the last \
                     checkpoint is kept. Lower --lr or set --grad-clip"
                )));
            }
        }
        save::write_run(
            &self.out,
            self.config(),
            &tensors,
            &self.tokenizer,
            &moments,
            &record,
        )
    }
}

/// Refuses a run whose step would not fit in memory, before anything is allocated: the weights,
/// their gradients and AdamW's two moments (4 copies), and the activations a step keeps for its
/// backward, about `B·T·(n_layer·(16·C + 2·inner + 3·heads·T) + 3·vocab)` elements (each layer's
/// normalised inputs, Q, K, V, the probabilities, the MLP's hidden layer, the residuals; the
/// logits and their gradient), counted generously.
fn check_memory(config: &Config, options: &TrainOptions, dtype: DType) -> Result<()> {
    use crate::memory::product;
    let params = crate::checkpoint::layout_elements(config, config.n_layer);
    let (c, inner, heads) = (config.n_embd, config.inner_size(), config.n_head);
    let per_token = product(&[config.n_layer, 16 * c + 2 * inner])
        + product(&[config.n_layer, 3 * heads, options.seq_len])
        + product(&[3, config.vocab_size]);
    let activations = product(&[options.batch_size, options.seq_len]).saturating_mul(per_token);
    let needed = params
        .saturating_mul(4)
        .saturating_add(activations)
        .saturating_mul(dtype.size_in_bytes() as u128);
    crate::memory::check_or(
        needed,
        || {
            format!(
                "training {} parameters on batches of {} × {} tokens",
                params, options.batch_size, options.seq_len
            )
        },
        "lower --batch-size or --seq-len",
    )
}

/// The error that stops a run whose `what` became `value` at `step`.
fn diverged(what: &str, value: f64, step: u64, lr: f64) -> Error {
    Error::Input(format!(
        "{what} is {value} at step {step} (learning rate {lr:e}): training diverged; the last \
         checkpoint is kept. Lower --lr or set --grad-clip"
    ))
}

/// The model's variables by name, for the optimizer.
fn owned(model: &TrainModel) -> Vec<(String, candle_core::Var)> {
    model
        .parameters()
        .into_iter()
        .map(|(n, v)| (n, v.clone()))
        .collect()
}
