//! GPT-2: token + position embeddings → `n_layer` pre-LN blocks → `ln_f` → LM head tied to `wte`.
//!
//! Follows transformers' `GPT2LMHeadModel` (eager attention) operation for operation, so logits and
//! attention probabilities match it to float rounding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Embedding, Linear};

use crate::block::Block;
use crate::checkpoint::{random_checkpoint, Weights};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer_norm::LayerNorm;

/// A GPT-2 language model, ready to run on one device in one dtype.
pub struct Gpt2 {
    wte: Embedding,
    /// (n_positions, C); narrowed per call, so positions cost no gather and no allocation.
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    config: Config,
    dtype: DType,
    device: Device,
}

/// Keys and values of every layer for incremental decoding: prefill the prompt once, then feed one
/// token per step. Buffers are allocated once, at the first call, for the full context.
pub struct Cache {
    layers: Vec<KvCache>,
}

impl Cache {
    /// An empty cache for a model with this config.
    pub fn new(config: &Config) -> Self {
        // dim 2 of (B, nh, T, hs) is time.
        let layers = (0..config.n_layer)
            .map(|_| KvCache::new(2, config.n_positions))
            .collect();
        Self { layers }
    }

    /// Tokens already in the cache; the next token goes at this position.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::current_seq_len)
    }

    /// Empties the cache, releasing its buffers.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
    }
}

impl Gpt2 {
    /// Loads `config.json` and the safetensors weights of a model folder (a Hub snapshot or a
    /// `save_pretrained` directory): `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Config::from_file(dir.join("config.json"))?;
        Self::load(config, &safetensors_files(dir)?, dtype, device)
    }

    /// Builds the model from safetensors files, checking every tensor against `config`.
    pub fn load(config: Config, files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        Self::from_weights(config, Weights::from_files(files, dtype, device)?)
    }

    /// A model of `config`'s layout with seeded random weights (see [`random_checkpoint`]).
    pub fn random(config: Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let map = random_checkpoint(&config, seed)?;
        Self::from_tensors(config, map, dtype, device)
    }

    /// Builds the model from tensors named as in a checkpoint file.
    pub fn from_tensors(
        config: Config,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_weights(config, Weights::from_map(tensors, dtype, device)?)
    }

    fn from_weights(config: Config, w: Weights) -> Result<Self> {
        config.validate()?;
        if !matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Input(format!("unsupported dtype {:?}", w.dtype())));
        }
        w.check_layer_count(&config)?;
        let (v, c) = (config.vocab_size, config.n_embd);
        let wte = w.get("wte.weight", &[v, c])?;
        let wpe = w.get("wpe.weight", &[config.n_positions, c])?;
        let h = (0..config.n_layer)
            .map(|i| Block::load(&w, i, &config))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = w.layer_norm("ln_f", c, config.layer_norm_epsilon)?;
        // A checkpoint's own head wins; otherwise tie it to wte (same storage, no copy).
        let head = if w.contains("lm_head.weight") {
            w.get("lm_head.weight", &[v, c])?
        } else {
            wte.clone()
        };
        Ok(Self {
            wte: Embedding::new(wte, c),
            wpe,
            h,
            ln_f,
            lm_head: Linear::new(head, None),
            dtype: w.dtype(),
            device: w.device().clone(),
            config,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype the weights were cast to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config)
    }

    /// Logits (B, T, vocab) in f32 for token ids (B, T). With `cache`, the ids continue the cached
    /// sequence (their positions start at `cache.seq_len()`) and are appended to it.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        Ok(self.run(ids, cache, &[], false)?.0)
    }

    /// Logits (B, vocab) in f32 of the last position only: what generation needs, without paying
    /// for the LM head over the whole prompt.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        Ok(self.run(ids, cache, &[], true)?.0.squeeze(1)?)
    }

    /// Like [`Gpt2::forward`], and also returns the post-softmax attention probabilities
    /// (B, n_head, T, T_k) in f32 of each layer in `layers`, in that order.
    pub fn forward_with_attention(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(&l) = layers.iter().find(|&&l| l >= self.config.n_layer) {
            return Err(Error::Input(format!(
                "layer {l} is out of range: the model has {} layers (0..={})",
                self.config.n_layer,
                self.config.n_layer - 1
            )));
        }
        let (logits, mut by_layer) = self.run(ids, cache, layers, false)?;
        let attentions = layers
            .iter()
            .map(|l| {
                by_layer
                    .remove(l)
                    .ok_or_else(|| Error::Input(format!("layer {l} asked twice")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits, attentions))
    }

    fn run(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        capture: &[usize],
        last_only: bool,
    ) -> Result<(Tensor, HashMap<usize, Tensor>)> {
        let (_b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let n_ctx = self.config.n_positions;
        if t == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        if past + t > n_ctx {
            return Err(Error::Input(format!(
                "{} tokens exceed the model's context of {n_ctx} positions",
                past + t
            )));
        }

        // (B, T) -> (B, T, C), plus positions past..past+T: (T, C) broadcast over B.
        let x = self.wte.forward(ids)?;
        let mut x = x.broadcast_add(&self.wpe.narrow(0, past, t)?)?;
        // One new token sees every cached key: no mask. Otherwise one (T, past+T) mask for all layers.
        let mask = if t > 1 {
            Some(causal_mask(t, past, &self.device)?)
        } else {
            None
        };
        let mut attentions = HashMap::new();
        for (i, block) in self.h.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            let (y, probs) = block.forward(&x, mask.as_ref(), kv, capture.contains(&i))?;
            x = y;
            if let Some(p) = probs {
                attentions.insert(i, p);
            }
        }
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        // (B, T, C) -> (B, T, vocab)
        let logits = self.lm_head.forward(&self.ln_f.forward(&x)?)?;
        Ok((logits.to_dtype(DType::F32)?, attentions))
    }
}

/// (T, past + T) additive mask: query i (at position past + i) sees keys 0..=past + i.
fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let tk = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..tk).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, tk), device)?)
}

/// The safetensors files of a model folder, refusing folders that only have pickle weights.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::BadCheckpoint {
                file: index.clone(),
                msg: e.to_string(),
            })?;
        let mut files: Vec<String> = parsed["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(Error::BadCheckpoint {
                file: index,
                msg: "no `weight_map` entries".into(),
            });
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let msg = if dir.join("pytorch_model.bin").exists() {
        "has only pytorch_model.bin (pickle), which gpt2 never loads; convert it to safetensors"
    } else {
        "has no model.safetensors (or model.safetensors.index.json)"
    };
    Err(Error::Input(format!("{}: {msg}", dir.display())))
}
