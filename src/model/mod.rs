//! GPT-2: token + position embeddings → `n_layer` pre-LN blocks → `ln_f` → LM head tied to `wte`.
//!
//! Follows transformers' `GPT2LMHeadModel` (eager attention) operation for operation, so logits and
//! attention probabilities match it to float rounding. One forward pass, [`Gpt2::run`], serves
//! every use: logits of all positions or the last, attention capture, and the [`Hook`]s the
//! analyses see and change the pass through (TransformerLens' hook points).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_transformers::utils::build_additive_causal_mask;

use crate::block::Block;
use crate::checkpoint::{Checkpoint, Weights};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hooks::{HeadMask, Hook, HookPair, LayerHook, MaskRef, Patterns, Point};

mod parts;
mod step;

use crate::layer_norm::LayerNorm;
use crate::linear::storage::{Loader, Matrix, Target};
use crate::linear::Linear;
use crate::memory::product;
use crate::options::{LoadOptions, Quantization};
pub use step::Step;

/// Token embeddings: rows of `wte` gathered per id.
enum Embeddings {
    /// (vocab, C) on the device.
    Tensor(Tensor),
    /// The host matrix the LM head also reads (f32, halves or blocks).
    Host(Matrix),
}

/// A GPT-2 language model, ready to run on one device.
pub struct Gpt2 {
    wte: Embeddings,
    /// (n_positions, C); narrowed per call, so positions cost no gather and no allocation.
    wpe: Tensor,
    /// All `n_layer` blocks, or only the first ones for attention inspection.
    h: Vec<Block>,
    /// `ln_f` and the LM head; absent when only the first blocks were loaded.
    head: Option<(LayerNorm, Linear)>,
    config: Config,
    /// The weights' dtype, and the activations'.
    dtype: DType,
    act_dtype: DType,
    kv_dtype: DType,
    quantize: Option<Quantization>,
    device: Device,
    /// The LM head is `wte` (one copy of the weights).
    tied: bool,
    wte_bytes: usize,
    /// Heads removed from every pass.
    head_mask: Option<HeadMask>,
}

/// Keys and values of every layer for incremental decoding: prefill the prompt once, then feed one
/// token per step. Buffers are allocated once, at the first call, for the full context.
pub struct Cache {
    pub(crate) layers: Vec<KvCache>,
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

    /// Tokens already in the cache; the next token goes at this position. (The most of any
    /// layer: a pass that stops early fills the first layers, a prefilled one the last.)
    pub fn seq_len(&self) -> usize {
        self.layers
            .iter()
            .map(KvCache::current_seq_len)
            .max()
            .unwrap_or(0)
    }

    /// Empties the cache, releasing its buffers.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
    }

    /// A copy with its own buffers (a clone would share them, and the next append of one would
    /// write into the other): choices of one prompt continue from one prefill.
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|kv| {
                let mut copy = KvCache::new(2, kv.k_cache().max_seq_len());
                if let (Some(k), Some(v)) = (kv.k()?, kv.v()?) {
                    copy.append(&k.contiguous()?, &v.contiguous()?)?;
                }
                Ok(copy)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

/// What a forward pass returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Output {
    /// Logits at every position: (B, T, vocab).
    All,
    /// Logits at the last position: (B, vocab).
    Last,
    /// No logits: stop after block `l` (nothing above it changes what was asked for).
    StopAfter(usize),
}

impl Gpt2 {
    /// The model of `config` with the weights of `checkpoint`, loaded as `opts` says. Every
    /// tensor is shape-checked against the config; a missing or misshapen tensor, a tensor that
    /// is not a finite float, or a checkpoint with more layers than the config, is an error
    /// naming the tensor and the file.
    ///
    /// [`crate::ModelSource`] finds the config and the checkpoint of a Hub repo, a folder or a
    /// layout file, and calls this.
    pub fn new(config: Config, checkpoint: Checkpoint, opts: &LoadOptions) -> Result<Self> {
        config.validate()?;
        if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::param(
                "dtype",
                format!(
                    "{} is not a weight dtype (f32, f16 or bf16)",
                    opts.dtype.as_str()
                ),
            ));
        }
        let target = Target::new(opts)?;
        let kv_dtype = crate::attention::kv_cache_dtype(opts, &target)?;
        let n_layers = opts.layers.unwrap_or(config.n_layer);
        if n_layers == 0 || n_layers > config.n_layer {
            return Err(Error::Input(format!(
                "cannot load {n_layers} layers of a {}-layer model",
                config.n_layer
            )));
        }
        // Refused before any weight is made: a layout with huge dimensions would abort.
        let needed = target
            .storage
            .bytes(crate::checkpoint::layout_elements(&config, n_layers));
        crate::memory::check(needed, || {
            format!("the weights ({})", target.storage.label())
        })?;
        let w = Loader {
            weights: Weights::open(checkpoint, &config, target.in_place())?,
            target,
        };
        w.weights.check_layer_count(&config)?;
        let (v, c) = (config.vocab_size, config.n_embd);
        let wte = w.matrix("wte.weight", [v, c], true)?;
        let tied = !w.weights.contains("lm_head.weight");
        let wte_bytes = Linear::new(wte.clone(), None, c, v)?.weight_bytes();
        let wpe = w.vector("wpe.weight", &[config.n_positions, c])?;
        let h = (0..n_layers)
            .map(|i| Block::load(&w, i, &config, kv_dtype))
            .collect::<Result<Vec<_>>>()?;
        let head = if n_layers < config.n_layer {
            None
        } else {
            let ln_f = LayerNorm::load(&w, "ln_f", c, config.layer_norm_epsilon)?;
            // A checkpoint's own head wins; otherwise tie it to wte (same storage, no copy).
            let lm_head = if tied {
                wte.clone()
            } else {
                w.matrix("lm_head.weight", [v, c], true)?
            };
            Some((ln_f, Linear::new(lm_head, None, c, v)?))
        };
        let wte = match wte {
            // (in, out) = (C, vocab) is a transposed view of wte (vocab, C): gather from that.
            Matrix::Tensor(t) => Embeddings::Tensor(t.t()?.contiguous()?),
            m => Embeddings::Host(m),
        };
        let t = w.target;
        Ok(Self {
            wte,
            wpe,
            h,
            head,
            dtype: opts.dtype,
            act_dtype: t.act_dtype,
            kv_dtype,
            quantize: opts.quantize,
            device: t.device,
            tied,
            wte_bytes,
            head_mask: None,
            config,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype the weights were cast to (before any quantization).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the activations: f32 on the CPU, the weights' on a GPU.
    pub fn act_dtype(&self) -> DType {
        self.act_dtype
    }

    /// What the KV cache holds keys and values as ([`LoadOptions::kv_cache`]).
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// The quantization of the matrices, if any.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantize
    }

    /// `f32`, `f16`, `bf16`, `q8_0` or `q4_0`: how the matrices are stored.
    pub fn weights_label(&self) -> String {
        match self.quantize {
            Some(q) => q.name().to_string(),
            None => self.dtype.as_str().to_string(),
        }
    }

    /// Bytes of the weight matrices as stored (projections, MLP, `wte`, an untied head).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self.h.iter().map(Block::weight_bytes).sum();
        let head = self.head.as_ref().map_or(0, |(_, l)| l.weight_bytes());
        blocks
            + head
            + if self.tied && self.head.is_some() {
                0
            } else {
                self.wte_bytes
            }
    }

    /// Removes heads from every later pass (`None`: none). Costs nothing when unset.
    pub fn set_head_mask(&mut self, mask: Option<HeadMask>) {
        self.head_mask = mask.filter(|m| !m.is_empty());
    }

    /// The heads removed, if any.
    pub fn head_mask(&self) -> Option<&HeadMask> {
        self.head_mask.as_ref()
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Blocks loaded: `n_layer`, or fewer for inspection.
    pub fn loaded_layers(&self) -> usize {
        self.h.len()
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config)
    }

    /// Logits (B, T, vocab) in f32 for token ids (B, T). With `cache`, the ids continue the cached
    /// sequence (their positions start at `cache.seq_len()`) and are appended to it.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.run(ids, cache, None, Output::All)?
            .ok_or_else(no_logits)
    }

    /// Logits (B, vocab) in f32 of the last position only: what generation needs, without paying
    /// for the LM head over the whole prompt.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.run(ids, cache, None, Output::Last)?
            .ok_or_else(no_logits)
    }

    /// Like [`Gpt2::forward`], and also returns the post-softmax attention probabilities
    /// (B, n_head, T, T_k) in f32 of each layer in `layers`, in that order.
    pub fn forward_with_attention(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.check_layers(layers)?;
        // Every asked layer's probabilities are kept until the pass ends (the pass itself checks
        // one layer's working set).
        let (b, t) = ids.dims2()?;
        let keys = cache.as_ref().map_or(0, |c| c.seq_len()).saturating_add(t);
        let kept =
            product(&[b, self.config.n_head, t, keys, 4]).saturating_mul(layers.len() as u128);
        crate::memory::check_or(
            kept,
            || {
                format!(
                    "the attention of {} layers over {t} × {keys} positions",
                    layers.len()
                )
            },
            "ask for fewer layers or a shorter prompt",
        )?;
        let mut by_layer = HashMap::new();
        let mut hook = Patterns {
            layers,
            f: |l, p| {
                by_layer.insert(l, p);
                Ok(())
            },
        };
        let logits = self
            .run(ids, cache, Some(&mut hook), Output::All)?
            .ok_or_else(no_logits)?;
        let attentions = layers
            .iter()
            .map(|l| {
                by_layer
                    .get(l)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("layer {l} not captured")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits, attentions))
    }

    /// Runs the blocks up to the last of `layers` (no further: nothing above it changes them, and
    /// no LM head) and hands each of those layers' attention probabilities (B, n_head, T, T_k) in
    /// f32 to `f` as soon as it is computed, so at most one layer's copy is held unless `f` keeps
    /// it. With `cache`, only those blocks' keys and values are cached: enough for the next call
    /// with the same `layers`.
    pub fn for_each_attention(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        layers: &[usize],
        f: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        self.check_layers(layers)?;
        let Some(&last) = layers.iter().max() else {
            return Ok(());
        };
        let mut hook = Patterns { layers, f };
        self.run(ids, cache, Some(&mut hook), Output::StopAfter(last))?;
        Ok(())
    }

    pub(crate) fn check_layers(&self, layers: &[usize]) -> Result<()> {
        let n = self.config.n_layer;
        match layers.iter().find(|&&l| l >= self.h.len()) {
            None => Ok(()),
            Some(l) if *l >= n => Err(Error::param(
                "layer",
                format!(
                    "{l} is out of range: the model has {n} layers (0..={})",
                    n - 1
                ),
            )),
            Some(l) => Err(Error::Input(format!(
                "layer {l} was not loaded: only the first {} layers were",
                self.h.len()
            ))),
        }
    }

    /// Token plus position embeddings of `ids` (B, T) at positions `past..past + T`: (B, T, C).
    pub fn embed(&self, ids: &Tensor, past: usize) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let x = self.token_embeddings(ids)?;
        // Positions past..past+T: (T, C) broadcast over B.
        Ok(x.broadcast_add(&self.position_embeddings(past, t)?)?)
    }

    /// The rows of `wpe` for positions `past..past + T`: (T, C) (TransformerLens'
    /// `hook_pos_embed`, before it is repeated over the batch).
    pub fn position_embeddings(&self, past: usize, t: usize) -> Result<Tensor> {
        self.check_positions(past, t)?;
        Ok(self.wpe.narrow(0, past, t)?)
    }

    /// The token embeddings of `ids` (B, T): (B, T, C) (TransformerLens' `hook_embed`).
    pub fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.config.n_embd;
        let x = match &self.wte {
            Embeddings::Tensor(w) => candle_nn::Embedding::new(w.clone(), c).forward(ids)?,
            Embeddings::Host(m) => {
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
                    return Err(Error::Input(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
                let mut x = vec![0f32; b * t * c];
                for (row, &id) in x.chunks_exact_mut(c).zip(&ids) {
                    let at = id as usize;
                    match m {
                        Matrix::OutIn(e) => e.elems().widen(at * c..(at + 1) * c, row),
                        Matrix::Quant(q) => q.dequantize_row(at, row),
                        _ => {}
                    }
                }
                Tensor::from_vec(x, (b, t, c), &self.device)?
            }
        };
        Ok(x)
    }

    /// The forward pass behind every other: embeddings (`ids` (B, T) after `cache`'s tokens),
    /// the blocks with `hook` at its points, then the logits `output` asks for.
    pub fn run(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        hook: Option<&mut (dyn Hook + '_)>,
        output: Output,
    ) -> Result<Option<Tensor>> {
        let (_, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        self.check_positions(past, t)?;
        let mut x = self.embed(ids, past)?;
        let mut hook = hook;
        if let Some(h) = hook.as_deref_mut() {
            if h.wants(Point::Embed) {
                h.at(Point::Embed, &mut x)?;
            }
        }
        self.run_from(0, x, cache, hook, output)
    }

    /// The blocks from `layer` on, from the residual stream `x` (B, T, C) that enters it (at
    /// positions after `cache`'s tokens), then the logits `output` asks for. What
    /// [`Gpt2::run`] does after the embeddings, and what an analysis that changes layer L reuses
    /// to skip the layers below it.
    pub fn run_from(
        &self,
        layer: usize,
        x: Tensor,
        mut cache: Option<&mut Cache>,
        hook: Option<&mut (dyn Hook + '_)>,
        output: Output,
    ) -> Result<Option<Tensor>> {
        let (b, t, _) = x.dims3()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        self.check_positions(past, t)?;
        let (last, head) = match (output, &self.head) {
            (Output::StopAfter(l), _) => (l, None),
            (_, Some(head)) => (self.h.len() - 1, Some(head)),
            (_, None) => return Err(no_logits()),
        };
        self.check_layers(&[last])?;
        let patterns = hook
            .as_deref()
            .is_some_and(|h| (layer..=last).any(|l| h.wants(Point::Pattern(l))));
        let fresh_cache = cache.as_ref().is_some_and(|c| c.seq_len() == 0);
        self.check_pass_memory(
            [b, t, past],
            (last + 1).saturating_sub(layer),
            patterns,
            fresh_cache,
            output,
        )?;
        // The unfused path needs one (1, 1, T, past + T) additive mask, built once for all
        // layers; a single new token sees every cached key and needs none.
        let mask = if t > 1 {
            Some(build_additive_causal_mask(
                t,
                past,
                None,
                &self.device,
                DType::F32,
            )?)
        } else {
            None
        };
        // The model's own head mask, first, then the caller's hook.
        let mut own = self.head_mask.as_ref().map(MaskRef);
        let mut pair;
        let mut hook: Option<&mut dyn Hook> = match (own.as_mut(), hook) {
            (None, h) => h.map(|h| h as &mut dyn Hook),
            (Some(m), None) => Some(m),
            (Some(m), Some(h)) => {
                pair = HookPair(m, h);
                Some(&mut pair)
            }
        };
        let mut x = x;
        for (i, block) in self.h.iter().enumerate().take(last + 1).skip(layer) {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            let lh = hook.as_deref_mut().map(|hook| LayerHook { layer: i, hook });
            x = block.forward(&x, mask.as_ref(), kv, past, lh)?;
        }
        let Some((ln_f, lm_head)) = head else {
            return Ok(None);
        };
        let x = match output {
            Output::Last => x.narrow(1, t - 1, 1)?,
            _ => x,
        };
        // (B, T, C) -> (B, T, vocab)
        let logits = lm_head
            .forward(&ln_f.forward(&x)?, None)?
            .to_dtype(DType::F32)?;
        Ok(Some(match output {
            Output::Last => logits.squeeze(1)?,
            _ => logits,
        }))
    }

    /// Block `layer` on the residual stream `x` (B, T, C) entering it (positions 0..T), at
    /// `position` only: (B, 1, C), the block's output there, as [`Gpt2::run_from`] computes it
    /// (to rounding) for a fraction of the work: of the other positions only the keys and values
    /// of those before `position` are computed. No hook, and not with a head mask (an error):
    /// what an analysis that measures one position uses for the last layer.
    pub fn block_at(&self, layer: usize, x: &Tensor, position: usize) -> Result<Tensor> {
        self.check_layers(&[layer])?;
        if self.head_mask.is_some() {
            return Err(Error::Internal(
                "block_at runs no head mask: use run_from".into(),
            ));
        }
        let (_, t, _) = x.dims3()?;
        if position >= t {
            return Err(Error::param(
                "position",
                format!("{position} is past the {t} positions of the residual stream"),
            ));
        }
        self.h[layer].forward_at(x, position)
    }

    /// `ln_f` then the LM head on a residual stream (..., C): the logits it stands for (the
    /// logit lens reads every layer's residual this way).
    pub fn unembed(&self, x: &Tensor) -> Result<Tensor> {
        let (ln_f, lm_head) = self.head.as_ref().ok_or_else(no_logits)?;
        Ok(lm_head
            .forward(&ln_f.forward(x)?, None)?
            .to_dtype(DType::F32)?)
    }

    /// `ln_f`'s weight and bias (C,) and epsilon, for analyses that take its scale apart.
    pub fn ln_f(&self) -> Result<(Tensor, Tensor, f64)> {
        let (ln_f, _) = self.head.as_ref().ok_or_else(no_logits)?;
        Ok(ln_f.parameters())
    }

    /// Column `token` of the unembedding (the LM head): (C,) f32.
    pub fn unembedding_column(&self, token: u32) -> Result<Tensor> {
        let (_, lm_head) = self.head.as_ref().ok_or_else(no_logits)?;
        Ok(lm_head.column(token as usize, &self.device)?)
    }

    /// Layer `layer`'s attention output projection `c_proj` as (C, C) f32, rows by input (head
    /// `h` owns rows `h·hs..(h+1)·hs`), and its bias (C,): how the heads' outputs z write into
    /// the residual stream.
    pub fn attention_output_weights(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        self.check_layers(&[layer])?;
        self.h[layer].attention_output_weights(&self.device)
    }

    /// Row `position` of `wpe`: (C,).
    pub fn position_embedding(&self, position: usize) -> Result<Tensor> {
        Ok(self.wpe.get(position)?.to_dtype(DType::F32)?)
    }

    fn check_positions(&self, past: usize, t: usize) -> Result<()> {
        let n_ctx = self.config.n_positions;
        if t == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        if past.saturating_add(t) > n_ctx {
            return Err(Error::Input(format!(
                "{past} + {t} tokens exceed the model's context of {n_ctx} positions"
            )));
        }
        Ok(())
    }

    /// Refuses a pass of `[B, T, past]` through `layers` blocks whose buffers cannot fit in the
    /// host's memory, before any is allocated: (B, nh, T, past + T) attention probabilities and
    /// their steps (scores, scaled, masked, softmax) and a hook's copy, for the layers that build
    /// them (asked for by `patterns`, or every layer off the fused host kernel), the additive mask,
    /// the widest activations twice over, the logits, and a fresh KV cache's buffers (allocated
    /// for the whole context at the first call). On a GPU only what comes back to the host counts:
    /// candle reports a full GPU as an error, where a failed host allocation aborts.
    pub(crate) fn check_pass_memory(
        &self,
        [b, t, past]: [usize; 3],
        layers: usize,
        patterns: bool,
        fresh_cache: bool,
        output: Output,
    ) -> Result<()> {
        let c = &self.config;
        let keys = past.saturating_add(t);
        let attention = product(&[b, c.n_head, t, keys, 4]);
        let host = self.device.is_cpu();
        let needed = if host {
            let steps = if patterns || self.act_dtype != DType::F32 {
                attention.saturating_mul(5)
            } else {
                0
            };
            let mask = if t > 1 { product(&[t, keys, 4]) } else { 0 };
            let width = c.inner_size().max(3 * c.n_embd);
            let acts = product(&[b, t, width, 4, 2]);
            let logit_rows = match output {
                Output::All => t,
                Output::Last => 1,
                Output::StopAfter(_) => 0,
            };
            let logits = product(&[b, logit_rows, c.vocab_size, 4, 2]);
            let cache = if fresh_cache {
                let kv = [c.n_positions, c.kv_heads(), c.head_size()];
                product(&[
                    layers,
                    2,
                    b,
                    kv[0],
                    kv[1],
                    kv[2],
                    self.kv_dtype.size_in_bytes(),
                ])
            } else {
                0
            };
            [steps, mask, acts, logits, cache]
                .into_iter()
                .fold(0u128, u128::saturating_add)
        } else if patterns {
            attention
        } else {
            0
        };
        // Small passes (every decode step) skip reading /proc.
        if needed < 1 << 26 {
            return Ok(());
        }
        let what = || {
            if patterns || !host {
                format!(
                    "the attention of {} heads over {t} × {keys} positions",
                    c.n_head
                )
            } else {
                format!("a forward pass over {t} tokens")
            }
        };
        crate::memory::check_or(needed, what, "use a shorter prompt")
    }
}

fn no_logits() -> Error {
    Error::Input("this model was loaded with only its first layers (for attention inspection) and has no logits".into())
}

/// The tiny random models unit tests run on: `n_layer` blocks of 4 heads over 32 dims, a
/// vocabulary of `vocab`, `n_positions` positions, `<|endoftext|>` = 0.
#[cfg(test)]
pub(crate) fn tiny_config(vocab: usize, n_positions: usize, n_layer: usize) -> Config {
    Config {
        vocab_size: vocab,
        n_positions,
        n_embd: 32,
        n_layer,
        n_head: 4,
        bos_token_id: 0,
        eos_token_id: 0,
        ..Config::default()
    }
}

/// `config` with seeded random weights, loaded with the default options (f32, CPU).
#[cfg(test)]
pub(crate) fn tiny_model(config: Config, seed: u64) -> Result<Gpt2> {
    Gpt2::new(config, Checkpoint::Random { seed }, &LoadOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Result<Gpt2> {
        tiny_model(tiny_config(61, 24, 3), 7)
    }

    fn ids(v: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(v, &Device::Cpu)?.unsqueeze(0)?)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// A forked cache continues as the original would, and writing to one leaves the other.
    #[test]
    fn a_forked_cache_is_its_own() -> Result<()> {
        let model = tiny()?;
        let mut cache = model.new_cache();
        model.forward_last(&ids(&[1, 2, 3])?, Some(&mut cache))?;
        let mut fork = cache.fork()?;
        let a = model.forward_last(&ids(&[4])?, Some(&mut fork))?;
        let b = model.forward_last(&ids(&[4])?, Some(&mut cache))?;
        assert_eq!(max_abs_diff(&a, &b)?, 0.0);
        // Different tokens now: each cache holds its own.
        let a = model.forward_last(&ids(&[5])?, Some(&mut fork))?;
        let b = model.forward_last(&ids(&[6])?, Some(&mut cache))?;
        let a2 = model.forward_last(&ids(&[9])?, Some(&mut fork))?;
        let mut fresh = model.new_cache();
        model.forward_last(&ids(&[1, 2, 3, 4, 5])?, Some(&mut fresh))?;
        let want = model.forward_last(&ids(&[9])?, Some(&mut fresh))?;
        assert!(max_abs_diff(&a, &b)? > 0.0);
        assert!(max_abs_diff(&a2, &want)? < 1e-5);
        Ok(())
    }

    #[test]
    fn later_tokens_never_change_earlier_logits_or_attention() -> Result<()> {
        let model = tiny()?;
        let a = [3u32, 14, 15, 9, 26, 5, 35, 8, 9, 7];
        let mut b = a;
        let t = 4;
        for (i, x) in b.iter_mut().enumerate().skip(t + 1) {
            *x = (*x + 11 * i as u32) % 61;
        }
        let all: Vec<usize> = (0..3).collect();
        let (la, aa) = model.forward_with_attention(&ids(&a)?, None, &all)?;
        let (lb, ab) = model.forward_with_attention(&ids(&b)?, None, &all)?;
        assert_eq!(
            max_abs_diff(&la.narrow(1, 0, t + 1)?, &lb.narrow(1, 0, t + 1)?)?,
            0.0
        );
        // The changed tokens do change later positions: the test can fail.
        assert!(max_abs_diff(&la.narrow(1, t + 1, 5)?, &lb.narrow(1, t + 1, 5)?)? > 1e-3);
        for (pa, pb) in aa.iter().zip(&ab) {
            let (pa, pb) = (pa.narrow(2, 0, t + 1)?, pb.narrow(2, 0, t + 1)?);
            assert_eq!(max_abs_diff(&pa, &pb)?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn attention_rows_sum_to_one_and_are_zero_above_the_diagonal() -> Result<()> {
        let model = tiny()?;
        let (_, attn) =
            model.forward_with_attention(&ids(&[1, 2, 3, 4, 5, 6, 7])?, None, &[0, 2])?;
        assert_eq!(attn.len(), 2);
        for p in &attn {
            assert_eq!(p.dims(), &[1, 4, 7, 7]);
            let sums = p.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
            let p = p.squeeze(0)?.to_vec3::<f32>()?;
            for head in &p {
                for (q, row) in head.iter().enumerate() {
                    assert!(row[q + 1..].iter().all(|&w| w == 0.0), "row {q}: {row:?}");
                }
            }
        }
        // Heads are not uniform: random weights with the test init attend sharply.
        let max = attn[0].flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(max > 0.5, "{max}");
        Ok(())
    }

    #[test]
    fn batched_rows_equal_single_runs() -> Result<()> {
        let model = tiny()?;
        let (a, b) = ([5u32, 6, 7, 8], [40u32, 3, 3, 1]);
        let batch = Tensor::new(&[a, b], &Device::Cpu)?;
        let both = model.forward(&batch, None)?;
        let d = max_abs_diff(&both.get(1)?, &model.forward(&ids(&b)?, None)?.get(0)?)?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn forward_last_is_the_last_row_of_forward() -> Result<()> {
        let model = tiny()?;
        let x = ids(&[9, 8, 7])?;
        let full = model.forward(&x, None)?;
        let last = model.forward_last(&x, None)?;
        assert_eq!(last.dims(), &[1, 61]);
        assert_eq!(
            max_abs_diff(&last, &full.get(0)?.get(2)?.unsqueeze(0)?)?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let model = tiny()?;
        let err = model
            .forward_with_attention(&ids(&[1, 2])?, None, &[3])
            .err();
        assert!(err.is_some_and(|e| e.to_string().contains("layer 3 is out of range")));
        let long: Vec<u32> = (0..25).collect();
        let err = model.forward(&ids(&long)?, None).err();
        assert!(err.is_some_and(|e| e.to_string().contains("context of 24")));
        let mut cache = model.new_cache();
        model.forward(&ids(&long[..20])?, Some(&mut cache))?;
        assert!(model.forward(&ids(&long[..5])?, Some(&mut cache)).is_err());
        cache.reset();
        assert_eq!(cache.seq_len(), 0);
        model.forward(&ids(&long[..5])?, Some(&mut cache))?;
        Ok(())
    }

    #[test]
    fn prefixed_and_untied_checkpoints_load() -> Result<()> {
        let config = tiny()?.config().clone();
        let mut map = crate::random_checkpoint(&config, 3)?;
        let plain = Gpt2::new(
            config.clone(),
            Checkpoint::Tensors(map.clone()),
            &LoadOptions::default(),
        )?;
        let x = ids(&[1, 2, 3])?;
        let want = plain.forward(&x, None)?;
        let prefixed: HashMap<String, Tensor> = map
            .iter()
            .map(|(k, v)| (format!("transformer.{k}"), v.clone()))
            .collect();
        let got = Gpt2::new(
            config.clone(),
            Checkpoint::Tensors(prefixed),
            &LoadOptions::default(),
        )?
        .forward(&x, None)?;
        assert_eq!(max_abs_diff(&want, &got)?, 0.0);
        // An explicit lm_head equal to wte changes nothing; a different one is used.
        let wte = map["wte.weight"].clone();
        map.insert("lm_head.weight".into(), (wte * 2.0)?);
        let untied = Gpt2::new(config, Checkpoint::Tensors(map), &LoadOptions::default())?
            .forward(&x, None)?;
        assert!(max_abs_diff(&(want * 2.0)?, &untied)? < 1e-4);
        Ok(())
    }

    fn gqa_config(n_kv_head: Option<usize>) -> Config {
        Config {
            n_kv_head,
            ..tiny_config(61, 24, 2)
        }
    }

    #[test]
    fn n_kv_head_equal_to_n_head_is_plain_gpt2_bit_for_bit() -> Result<()> {
        let map = crate::random_checkpoint(&gqa_config(None), 4)?;
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6])?;
        let run = |kv| -> Result<(Tensor, Vec<Tensor>)> {
            let m = Gpt2::new(
                gqa_config(kv),
                Checkpoint::Tensors(map.clone()),
                &LoadOptions::default(),
            )?;
            m.forward_with_attention(&x, None, &[0, 1])
        };
        let (a, pa) = run(None)?;
        let (b, pb) = run(Some(4))?;
        assert_eq!(max_abs_diff(&a, &b)?, 0.0);
        for (p, q) in pa.iter().zip(&pb) {
            assert_eq!(max_abs_diff(p, q)?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn grouped_query_attention_equals_mha_with_repeated_k_v_weights() -> Result<()> {
        let (c, hs, nh, nkv) = (32, 8, 4, 2);
        let gqa = gqa_config(Some(nkv));
        let map = crate::random_checkpoint(&gqa, 8)?;
        // MHA weights: query head h reads K/V head h / (nh / nkv), as repeat_kv would arrange.
        let mut mha = map.clone();
        for l in 0..2 {
            for (part, axis) in [("weight", 1), ("bias", 0)] {
                let name = format!("h.{l}.attn.c_attn.{part}");
                let w = &map[&name];
                let head = |offset: usize, g: usize| w.narrow(axis, offset + g * hs, hs);
                let mut cols = vec![w.narrow(axis, 0, c)?];
                for offset in [c, c + nkv * hs] {
                    for h in 0..nh {
                        cols.push(head(offset, h / (nh / nkv))?);
                    }
                }
                mha.insert(name, Tensor::cat(&cols, axis)?);
            }
        }
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6])?;
        let g = Gpt2::new(gqa, Checkpoint::Tensors(map), &LoadOptions::default())?;
        let m = Gpt2::new(
            gqa_config(None),
            Checkpoint::Tensors(mha),
            &LoadOptions::default(),
        )?;
        let (lg, pg) = g.forward_with_attention(&x, None, &[0, 1])?;
        let (lm, pm) = m.forward_with_attention(&x, None, &[0, 1])?;
        assert!(max_abs_diff(&lg, &lm)? < 1e-5);
        for (p, q) in pg.iter().zip(&pm) {
            assert_eq!(p.dims(), &[1, nh, 8, 8]);
            assert!(max_abs_diff(p, q)? < 1e-6);
        }
        // And the grouping is not a no-op: heads sharing K/V still differ through their queries.
        assert!(max_abs_diff(&pg[0].narrow(1, 0, 1)?, &pg[0].narrow(1, 1, 1)?)? > 1e-3);
        Ok(())
    }

    #[test]
    fn multi_query_attention_runs_caches_and_captures_every_query_head() -> Result<()> {
        let model = Gpt2::new(
            gqa_config(Some(1)),
            Checkpoint::Random { seed: 5 },
            &LoadOptions::default(),
        )?;
        let x = ids(&[7, 8, 9, 10, 11, 12])?;
        let (full, attn) = model.forward_with_attention(&x, None, &[1])?;
        assert_eq!(attn[0].dims(), &[1, 4, 6, 6]);
        let sums = attn[0].sum(3)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
        let mut cache = model.new_cache();
        let mut parts = vec![model.forward(&x.narrow(1, 0, 4)?, Some(&mut cache))?];
        for t in 4..6 {
            parts.push(model.forward(&x.narrow(1, t, 1)?, Some(&mut cache))?);
        }
        assert!(max_abs_diff(&Tensor::cat(&parts, 1)?, &full)? < 1e-5);
        Ok(())
    }

    #[test]
    fn first_layers_only_give_the_same_attention_and_no_logits() -> Result<()> {
        let config = tiny()?.config().clone();
        let full = Gpt2::new(
            config.clone(),
            Checkpoint::Random { seed: 7 },
            &LoadOptions::default(),
        )?;
        let part = Gpt2::new(
            config,
            Checkpoint::Random { seed: 7 },
            &LoadOptions::default().first_layers(2),
        )?;
        let x = ids(&[1, 2, 3, 4])?;
        let (_, want) = full.forward_with_attention(&x, None, &[0, 1])?;
        let mut got = Vec::new();
        part.for_each_attention(&x, None, &[1, 0], |l, p| {
            got.push((l, p));
            Ok(())
        })?;
        assert_eq!(got.len(), 2);
        for (l, p) in &got {
            assert_eq!(max_abs_diff(p, &want[*l])?, 0.0);
        }
        assert!(part.forward(&x, None).is_err());
        let err = part.for_each_attention(&x, None, &[2], |_, _| Ok(())).err();
        assert!(err.is_some_and(|e| e.to_string().contains("not loaded")));
        Ok(())
    }
}
