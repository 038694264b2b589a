//! Autoregressive generation: prefill the prompt once, then one token per step from the KV cache,
//! sampling with candle-transformers' `LogitsProcessor`, stopping at EOS, a stop string or a
//! length, and sliding the context window when the sequence outgrows the model's positions.

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use crate::error::{count, human_bytes, Error, Result};
use crate::hooks::Hook;
use crate::memory::product;
use crate::model::{Cache, Gpt2, Output, Step};
use crate::prompt::Prompt;
use crate::tokenizer::{TextStream, Tokenizer};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample among the `k` most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample among the smallest set of tokens whose probability reaches `p` (nucleus).
    pub top_p: Option<f64>,
    /// Divide positive logits (multiply negative ones) of tokens seen in the last
    /// `repeat_last_n` tokens by this; 1 disables it.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Sample `i` of a batch uses seed `seed + i`: the same seed gives the same text.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299792458,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is not part of the completion.
    pub stop: Vec<String>,
    /// End at the model's `eos_token_id`.
    pub stop_at_eos: bool,
    /// Continuations of the one prompt, run together as a batch.
    pub num_samples: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 100,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eos: true,
            num_samples: 1,
        }
    }
}

impl GenerateParams {
    /// Rejects values that cannot be sampled with, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let s = &self.sampling;
        let bad = |param, msg: &str| Err(Error::param(param, msg));
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return bad("temperature", "must be a number >= 0 (0 means greedy)");
        }
        if s.top_k == Some(0) {
            return bad("top_k", "must be at least 1");
        }
        if let Some(p) = s.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", "must be in (0, 1]");
            }
        }
        if !(s.repeat_penalty > 0.0 && s.repeat_penalty.is_finite()) {
            return bad("repeat_penalty", "must be a number > 0 (1 disables it)");
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1");
        }
        if self.num_samples == 0 {
            return bad("num_samples", "must be at least 1");
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "strings must not be empty");
        }
        Ok(())
    }

    /// candle's sampler for these parameters.
    pub(crate) fn sampling(&self) -> Sampling {
        let s = &self.sampling;
        let temperature = s.temperature;
        // Below ~3e-39, 1/T overflows f32 (the sampler multiplies by it): the limit is greedy.
        let greedy = temperature == 0.0 || !((1.0 / temperature) as f32).is_finite();
        match (s.top_k, s.top_p) {
            _ if greedy => Sampling::ArgMax,
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (None, None) => Sampling::All { temperature },
        }
    }
}

/// Why a sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model produced its end-of-text token.
    Eos,
    /// The text reached a stop string.
    Stop,
    /// A stop was requested ([`crate::interrupt`]: Ctrl-C) before any other reason.
    Interrupted,
}

impl FinishReason {
    /// The name used in JSON output: `length`, `eos`, `stop` or `interrupted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::Stop => "stop",
            Self::Interrupted => "interrupted",
        }
    }
}

/// One finished continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Every generated id, including a final EOS or the tokens that spelled a stop string.
    pub token_ids: Vec<u32>,
    /// The generated text, without EOS or the stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Wall-clock time of the two phases.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// The prompt's forward pass (once for all samples), up to the first logits.
    pub prefill: Duration,
    /// Everything after: sampling, decode steps and any re-prefill after a context slide.
    pub decode: Duration,
    /// Prompt tokens (prefilled once, whatever the number of samples).
    pub prefill_tokens: usize,
    /// Every generated token, all samples.
    pub generated_tokens: usize,
    /// Tokens made by a decode step (every sample's): all generated tokens but the first of
    /// each sample, which comes from the prefill's logits.
    pub decode_tokens: usize,
    /// Tokens run through the model again after a context slide (their time is in `decode`).
    pub reprefill_tokens: usize,
}

impl Timings {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> Option<f64> {
        rate(self.prefill_tokens, self.prefill)
    }

    /// Generated tokens per second of decode, re-prefills included; `None` without a decode
    /// step (one new token).
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        rate(self.decode_tokens, self.decode)
    }

    /// The stats `gpt2 generate` prints on stderr.
    pub fn report<'a>(
        &'a self,
        model: &'a Gpt2,
        name: &'a str,
        load: Duration,
        seed: u64,
    ) -> RunReport<'a> {
        RunReport {
            timings: self,
            model,
            name,
            load,
            seed,
        }
    }
}

/// [`Timings`] with what they measured, as text.
pub struct RunReport<'a> {
    timings: &'a Timings,
    model: &'a Gpt2,
    name: &'a str,
    load: Duration,
    seed: u64,
}

impl fmt::Display for RunReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.timings;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per_s =
            |r: Option<f64>| r.map_or("no decode step".to_string(), |r| format!("{r:.1} tokens/s"));
        let dev = if self.model.device().is_cpu() {
            "cpu"
        } else {
            "gpu"
        };
        // The weights as stored: `q8_0`, not the f32 the activations are computed in.
        writeln!(
            f,
            "{} ({}, {dev}) loaded in {:.0} ms",
            self.name,
            self.model.weights_label(),
            ms(self.load)
        )?;
        writeln!(
            f,
            "prompt: {}, prefill {:.1} ms ({})",
            count(t.prefill_tokens, "token"),
            ms(t.prefill),
            per_s(t.prefill_tokens_per_s())
        )?;
        let slides = if t.reprefill_tokens > 0 {
            format!(
                ", {} tokens prefilled again after context slides",
                t.reprefill_tokens
            )
        } else {
            String::new()
        };
        writeln!(
            f,
            "generated: {}, decode {:.1} ms ({}){slides}, seed {}",
            count(t.generated_tokens, "token"),
            ms(t.decode),
            per_s(t.decode_tokens_per_s()),
            self.seed
        )
    }
}

fn rate(tokens: usize, d: Duration) -> Option<f64> {
    (tokens > 0 && !d.is_zero()).then(|| tokens as f64 / d.as_secs_f64())
}

/// One sample's state: its ids, and its text split into what was handed out and what is held
/// back (an incomplete character, or a possible start of a stop string). The server's engine
/// keeps one per choice.
pub(crate) struct Sample<'a> {
    pub(crate) ids: Vec<u32>,
    stream: TextStream<'a>,
    pub(crate) processor: LogitsProcessor,
    pub(crate) text: String,
    emitted: usize,
    pub(crate) finish: Option<FinishReason>,
}

impl<'a> Sample<'a> {
    /// A sample drawn with `seed` (the `i`th of a batch: `params.sampling.seed + i`).
    pub(crate) fn new(tokenizer: &'a Tokenizer, params: &GenerateParams, seed: u64) -> Self {
        Sample {
            ids: Vec::new(),
            stream: tokenizer.stream(),
            processor: LogitsProcessor::from_sampling(seed, params.sampling()),
            text: String::new(),
            emitted: 0,
            finish: None,
        }
    }

    /// Takes token `next` as the sample's step `step` (0-based) of `params`: ends the sample at
    /// EOS, a stop string or the length, and emits the text that became safe to show.
    pub(crate) fn push(
        &mut self,
        next: u32,
        step: usize,
        params: &GenerateParams,
        eos: u32,
        emit: &mut impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        let stops = &params.stop;
        self.ids.push(next);
        if params.stop_at_eos && next == eos {
            return self.finish(FinishReason::Eos, stops, emit);
        }
        if let Some(text) = self.stream.push(next)? {
            self.push_text(&text, stops, emit)?;
        }
        if self.finish.is_none() && step + 1 == params.max_new_tokens {
            self.finish(FinishReason::Length, stops, emit)?;
        }
        Ok(())
    }

    /// Appends decoded text, ends the sample at a stop string, and emits what is safe to show.
    fn push_text(
        &mut self,
        chunk: &str,
        stops: &[String],
        emit: &mut impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        self.text.push_str(chunk);
        let fresh = &self.text[self.emitted..];
        let hit = stops.iter().filter_map(|s| fresh.find(s.as_str())).min();
        let safe = match hit {
            Some(at) => {
                self.text.truncate(self.emitted + at);
                self.finish = Some(FinishReason::Stop);
                self.text.len()
            }
            None => self.text.len() - held_back(fresh, stops),
        };
        if safe > self.emitted {
            emit(&self.text[self.emitted..safe])?;
            self.emitted = safe;
        }
        Ok(())
    }

    /// Ends the sample: flushes bytes that never formed a character and any held-back text.
    pub(crate) fn finish(
        &mut self,
        reason: FinishReason,
        stops: &[String],
        emit: &mut impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        if self.finish.is_some() {
            return Ok(());
        }
        if let Some(rest) = self.stream.finish()? {
            self.push_text(&rest, stops, emit)?;
        }
        if self.finish.is_none() {
            self.finish = Some(reason);
            if self.text.len() > self.emitted {
                emit(&self.text[self.emitted..])?;
                self.emitted = self.text.len();
            }
        }
        Ok(())
    }
}

/// Bytes at the end of `text` that could be the start of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&n| s.is_char_boundary(n))
                .map(move |n| &s[..n])
        })
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// Generates `params.num_samples` continuations of `prompt` as one batch, calling
/// `on_text(sample, text)` with each piece of text as soon as it is final (an error from it ends
/// the run with that error).
///
/// A stop request ([`crate::interrupt`]) ends every sample at the next step with
/// [`FinishReason::Interrupted`], keeping what was generated.
///
/// Past the context (`n_positions`), generation keeps going: the cache is emptied and the newest
/// `n_positions / 2` tokens are prefilled again, so memory stays flat however long it runs, at the
/// cost of one half-context prefill every `n_positions / 2` tokens.
pub fn generate(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    params: &GenerateParams,
    on_text: impl FnMut(usize, &str) -> Result<()>,
) -> Result<(Vec<Completion>, Timings)> {
    generate_with_hook(model, tokenizer, prompt, params, None, on_text)
}

/// [`generate`] with `hook` in every forward pass: the prefill, then each decode step (one new
/// query row against the KV cache). Ablated heads stay ablated; captured attention is the
/// decode's own, nothing is recomputed. A hook watches one sample: with it, `num_samples` must
/// be 1.
pub fn generate_with_hook(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    params: &GenerateParams,
    mut hook: Option<&mut (dyn Hook + '_)>,
    mut on_text: impl FnMut(usize, &str) -> Result<()>,
) -> Result<(Vec<Completion>, Timings)> {
    params.validate()?;
    let config = model.config();
    let ctx = config.n_positions;
    let prompt = Prompt::from_ids(prompt.ids.clone(), config)?.ids;
    let n = params.num_samples;
    check_memory(model, n, prompt.len())?;
    let stops = &params.stop;
    let mut samples: Vec<Sample> = (0..n)
        .map(|i| {
            Sample::new(
                tokenizer,
                params,
                params.sampling.seed.wrapping_add(i as u64),
            )
        })
        .collect();
    if n > 1 && hook.is_some() {
        return Err(Error::param(
            "num_samples",
            "a hook sees one sample's passes: generate one sample at a time",
        ));
    }
    let device = model.device();
    let mut timings = Timings {
        prefill_tokens: prompt.len(),
        ..Timings::default()
    };
    let start = Instant::now();
    // (1, T) -> (vocab,): the last position's logits.
    let run = |ids: &[u32], cache: &mut Cache, hook: Option<&mut (dyn Hook + '_)>| {
        let ids = Tensor::new(ids, device)?.unsqueeze(0)?;
        model
            .run(&ids, Some(cache), hook, Output::Last)?
            .ok_or_else(|| Error::Input("this model has no logits (first layers only)".into()))?
            .squeeze(0)?
            .to_vec1::<f32>()
            .map_err(Error::from)
    };
    // The prompt is prefilled once; every sample continues from a copy of its cache, and the
    // samples are decoded together (`Gpt2::step`): each is, bit for bit, the run of `n = 1`
    // with its seed, and what `gpt2 serve` gives a request's choices.
    let mut caches = vec![model.new_cache()];
    let first = run(&prompt, &mut caches[0], hook.as_deref_mut())?;
    for _ in 1..n {
        caches.push(caches[0].fork()?);
    }
    let mut rows = vec![Some(first); n];
    // Every sample's whole sequence.
    let mut seqs: Vec<Vec<u32>> = vec![prompt.clone(); n];
    timings.prefill = start.elapsed();
    let decode_start = Instant::now();

    for step in 0..params.max_new_tokens {
        if crate::interrupt::requested() {
            for (i, sample) in samples.iter_mut().enumerate() {
                sample.finish(FinishReason::Interrupted, stops, &mut |t| on_text(i, t))?;
            }
            break;
        }
        for (i, sample) in samples.iter_mut().enumerate() {
            let Some(mut row) = rows[i].take() else {
                continue;
            };
            let mut emit = |t: &str| on_text(i, t);
            let seq = &mut seqs[i];
            let recent = &seq[seq.len().saturating_sub(params.sampling.repeat_last_n)..];
            prepare_logits(&mut row, params.sampling.repeat_penalty, recent)?;
            let next = sample.processor.sample(&Tensor::from_vec(
                row,
                config.vocab_size,
                &Device::Cpu,
            )?)?;
            seq.push(next);
            timings.generated_tokens += 1;
            if step > 0 {
                timings.decode_tokens += 1;
            }
            sample.push(next, step, params, config.eos_token_id, &mut emit)?;
        }
        let live: Vec<usize> = (0..n).filter(|&i| samples[i].finish.is_none()).collect();
        if live.is_empty() {
            break;
        }
        // A sample whose cache is full slides: keep the newest half of the window and prefill
        // it again. The others take one decode step together.
        let mut stepping = Vec::with_capacity(live.len());
        for &i in &live {
            if caches[i].seq_len() == ctx {
                caches[i].reset();
                timings.reprefill_tokens += ctx / 2 - 1;
                let seq = &seqs[i];
                rows[i] = Some(run(
                    &seq[seq.len() - ctx / 2..],
                    &mut caches[i],
                    hook.as_deref_mut(),
                )?);
            } else {
                stepping.push(i);
            }
        }
        if stepping.is_empty() {
            continue;
        }
        let logits = {
            let mut steps: Vec<Step> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| stepping.contains(i))
                .map(|(i, cache)| Step {
                    cache,
                    token: seqs[i][seqs[i].len() - 1],
                    hook: None,
                })
                .collect();
            if let (Some(step), Some(h)) = (steps.first_mut(), hook.as_deref_mut()) {
                // n = 1 here (checked above).
                step.hook = Some(h);
            }
            model.step(&mut steps)?.to_vec2::<f32>()?
        };
        for (&i, row) in stepping.iter().zip(logits) {
            rows[i] = Some(row);
        }
    }
    timings.decode = decode_start.elapsed();

    let completions = samples
        .into_iter()
        .map(|s| Completion {
            token_ids: s.ids,
            text: s.text,
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
        })
        .collect();
    Ok((completions, timings))
}

/// Readies one sample's logits for the sampler, in place: the repeat penalty (clamped to finite
/// values: a tiny penalty is a huge boost, not an overflow), a check that the model gave numbers,
/// and a shift that makes the largest logit 0, so that dividing by a tiny temperature sends the
/// others to -inf instead of overflowing (softmax does not change under a shift).
pub(crate) fn prepare_logits(row: &mut [f32], penalty: f32, recent: &[u32]) -> Result<()> {
    if penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &id in recent {
            if let (true, Some(l)) = (seen.insert(id), row.get_mut(id as usize)) {
                *l = if *l >= 0.0 {
                    *l / penalty
                } else {
                    *l * penalty
                }
                .clamp(-f32::MAX, f32::MAX);
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &l in row.iter() {
        if l.is_nan() || l == f32::INFINITY {
            return Err(Error::Input(
                "the model's logits are not numbers (NaN or inf): its weights or dtype are broken"
                    .into(),
            ));
        }
        max = max.max(l);
    }
    row.iter_mut().for_each(|l| *l -= max);
    Ok(())
}

/// Bytes the KV caches of `samples` sequences take once allocated (every layer's keys and values
/// for the whole context).
pub(crate) fn kv_cache_bytes(model: &Gpt2, samples: usize) -> u128 {
    let c = model.config();
    product(&[
        samples,
        c.n_layer,
        2,
        c.n_positions,
        c.kv_heads(),
        c.head_size(),
        model.kv_dtype().size_in_bytes(),
    ])
}

/// Refuses a batch whose KV cache and activations cannot fit, before allocating any of it.
fn check_memory(model: &Gpt2, samples: usize, prompt: usize) -> Result<()> {
    let c = model.config();
    let kv = kv_cache_bytes(model, samples);
    // The prefill's widest activations (the MLP's, the QKV projection's, the attention scores)
    // and the logits, twice over for the copies in flight.
    let width = c.inner_size().max(3 * c.n_embd);
    // The prompt is prefilled once, whatever the number of samples.
    let acts = product(&[prompt, width + c.n_head * prompt, 4, 2]);
    let logits = product(&[samples, c.vocab_size, 4, 2]);
    let needed = kv.saturating_add(acts).saturating_add(logits);
    match crate::memory::check(needed, String::new) {
        Err(Error::OutOfMemory {
            needed, available, ..
        }) => Err(Error::param(
            "num_samples",
            format!(
                "{samples} needs {needed} bytes ({}) for its KV cache and activations, more than the {} of memory available",
                human_bytes(needed),
                human_bytes(available)
            ),
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::config::Config;
    use crate::model::{tiny_config, tiny_model};
    use crate::options::LoadOptions;
    use crate::prompt::PromptOptions;
    use candle_core::{DType, Device};

    /// The real tokenizer is not needed: a byte-level BPE with no merges over 61 tokens
    /// would do, but the fixture's tokenizer is at hand and has 512 ids.
    fn tokenizer() -> Result<Tokenizer> {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny"))
    }

    fn model(n_positions: usize) -> Result<Gpt2> {
        let config = Config {
            bos_token_id: 511,
            eos_token_id: 511,
            ..tiny_config(512, n_positions, 2)
        };
        // Seed 2 gives a model whose next token depends on more than the last few tokens, so the
        // sliding-window test can tell windows apart (most random models mostly copy-forward).
        tiny_model(config, 2)
    }

    /// The memory check sizes the KV cache in the cache's dtype, not the weights': quantized
    /// weights keep an f16 cache, f16 weights may keep an f32 one.
    #[test]
    fn the_memory_check_sizes_the_kv_cache_as_allocated() -> Result<()> {
        use crate::Quantization;
        for opts in [
            LoadOptions::default(),
            LoadOptions::default().with_dtype(DType::F16),
            LoadOptions::default()
                .with_dtype(DType::F16)
                .with_kv_cache(DType::F32),
            LoadOptions::default().quantized(Quantization::Q8_0),
            LoadOptions::default().with_kv_cache(DType::BF16),
        ] {
            let mut config = model(16)?.config().clone();
            config.bos_token_id = 0;
            let m = Gpt2::new(config, Checkpoint::Random { seed: 2 }, &opts)?;
            let mut cache = m.new_cache();
            m.forward(
                &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?,
                Some(&mut cache),
            )?;
            let allocated: usize = cache
                .layers
                .iter()
                .flat_map(|kv| [kv.k_cache().all_data(), kv.v_cache().all_data()])
                .map(|t| {
                    t.as_ref()
                        .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
                })
                .sum();
            assert_eq!(kv_cache_bytes(&m, 1), allocated as u128, "{opts:?}");
            assert_eq!(kv_cache_bytes(&m, 3), 3 * allocated as u128, "{opts:?}");
        }
        Ok(())
    }

    /// A prompt of these ids, unchecked: `generate` checks it against the model.
    fn ids(ids: &[u32]) -> Prompt {
        Prompt {
            ids: ids.to_vec(),
            bos: false,
            dropped: 0,
        }
    }

    fn greedy(n: usize) -> GenerateParams {
        GenerateParams {
            max_new_tokens: n,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop_at_eos: false,
            ..GenerateParams::default()
        }
    }

    #[test]
    fn sliding_window_equals_recomputing_the_kept_window() -> Result<()> {
        let (model, tok) = (model(16)?, tokenizer()?);
        let prompt = [1u32, 2, 3, 4, 5];
        let (out, _) = generate(&model, &tok, &ids(&prompt), &greedy(50), |_, _| Ok(()))?;
        // Reference, without any cache: when the sequence outgrows the 16 positions, keep its
        // newest 8 tokens; each next token is the argmax over the window.
        let mut seq = prompt.to_vec();
        let mut start = 0;
        let argmax = |window: &[u32]| -> Result<u32> {
            let ids = Tensor::new(window, &Device::Cpu)?.unsqueeze(0)?;
            Ok(model
                .forward_last(&ids, None)?
                .argmax(1)?
                .to_vec1::<u32>()?[0])
        };
        // Steps where a window of only the newest 8 tokens would have given another token:
        // proof that the test tells the right window from a wrong one.
        let mut discriminating = 0;
        for &got in &out[0].token_ids {
            let want = argmax(&seq[start..])?;
            assert_eq!(got, want, "at length {}", seq.len());
            if seq.len() - start > 8 && argmax(&seq[seq.len() - 8..])? != want {
                discriminating += 1;
            }
            seq.push(got);
            if seq.len() - start > 16 {
                start = seq.len() - 8;
            }
        }
        assert_eq!(out[0].token_ids.len(), 50);
        assert!(
            discriminating > 3,
            "only {discriminating} discriminating steps"
        );
        Ok(())
    }

    #[test]
    fn streamed_text_equals_the_completion_and_holds_back_stop_prefixes() -> Result<()> {
        let (model, tok) = (model(64)?, tokenizer()?);
        let (full, _) = generate(&model, &tok, &ids(&[10, 20]), &greedy(30), |_, _| Ok(()))?;
        let text = full[0].text.clone();
        let mut streamed = String::new();
        let (again, _) = generate(&model, &tok, &ids(&[10, 20]), &greedy(30), |_, t| {
            streamed.push_str(t);
            Ok(())
        })?;
        assert_eq!(streamed, text);
        assert_eq!(again, full);
        // Stop at a string that spans several tokens: neither it nor a prefix of it is emitted.
        let chars: Vec<char> = text.chars().collect();
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 4].iter().collect();
        let params = GenerateParams {
            stop: vec![stop.clone()],
            ..greedy(30)
        };
        let mut streamed = String::new();
        let (out, _) = generate(&model, &tok, &ids(&[10, 20]), &params, |_, t| {
            streamed.push_str(t);
            Ok(())
        })?;
        assert_eq!(out[0].finish_reason, FinishReason::Stop);
        assert_eq!(out[0].text, text[..text.find(&stop).unwrap_or(0)]);
        assert_eq!(streamed, out[0].text);
        Ok(())
    }

    /// Sample `i` of `num_samples` is the lone run with seed `seed + i`, token for token, past
    /// a context slide too (what the server's choices promise), and the prompt is prefilled
    /// once.
    #[test]
    fn each_of_several_samples_is_the_lone_run_with_its_seed() -> Result<()> {
        let (model, tok) = (model(16)?, tokenizer()?);
        let prompt = ids(&[7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 11]);
        let params = |n, seed| GenerateParams {
            num_samples: n,
            sampling: SamplingParams {
                temperature: 0.8,
                seed,
                ..SamplingParams::default()
            },
            ..greedy(20)
        };
        let (all, t) = generate(&model, &tok, &prompt, &params(4, 40), |_, _| Ok(()))?;
        assert_eq!(t.prefill_tokens, 11);
        assert!(t.reprefill_tokens > 0, "the test must slide the window");
        for (i, sample) in all.iter().enumerate() {
            let (alone, _) = generate(&model, &tok, &prompt, &params(1, 40 + i as u64), |_, _| {
                Ok(())
            })?;
            assert_eq!(sample, &alone[0], "sample {i}");
        }
        assert!(all.iter().any(|s| s != &all[0]), "the seeds must differ");
        Ok(())
    }

    #[test]
    fn held_back_is_the_longest_stop_prefix_at_the_end() {
        let stops = ["END".to_string(), "é!".to_string()];
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("abcE", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abcé", &stops), 2);
        assert_eq!(
            held_back("END", &stops),
            0,
            "a whole stop string is found, not held"
        );
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        type Break = fn(&mut GenerateParams);
        let cases: [(Break, &str); 6] = [
            (|p| p.sampling.temperature = -1.0, "temperature"),
            (|p| p.sampling.top_k = Some(0), "top_k"),
            (|p| p.sampling.top_p = Some(0.0), "top_p"),
            (|p| p.sampling.top_p = Some(1.01), "top_p"),
            (|p| p.max_new_tokens = 0, "max_new_tokens"),
            (|p| p.stop = vec![String::new()], "stop"),
        ];
        for (break_it, param) in cases {
            let mut p = GenerateParams::default();
            break_it(&mut p);
            match p.validate() {
                Err(Error::Param { param: got, .. }) => assert_eq!(got, param),
                other => panic!("{param}: {other:?}"),
            }
        }
    }

    #[test]
    fn empty_prompt_starts_from_bos_and_long_prompts_are_refused() -> Result<()> {
        let (model, tok) = (model(16)?, tokenizer()?);
        let opts = PromptOptions {
            empty_is_bos: true,
            ..PromptOptions::default()
        };
        let empty = Prompt::new(&tok, "", model.config(), opts)?;
        let (out, t) = generate(&model, &tok, &empty, &greedy(3), |_, _| Ok(()))?;
        assert_eq!(out[0].token_ids.len(), 3);
        assert_eq!(t.prefill_tokens, 1);
        let long: Vec<u32> = (0..17).collect();
        assert!(generate(&model, &tok, &ids(&long), &greedy(3), |_, _| Ok(())).is_err());
        Ok(())
    }
}
