//! Autoregressive generation: prefill the prompt once, then one token per step from the KV cache,
//! sampling with candle-transformers' `LogitsProcessor`, stopping at EOS, a stop string or a
//! length, and sliding the context window when the sequence outgrows the model's positions.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::utils::apply_repeat_penalty;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Gpt2;
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
    /// Rejects values that cannot be sampled with; the message names the command-line option.
    pub fn validate(&self) -> Result<()> {
        let s = &self.sampling;
        let bad = |msg: &str| Err(Error::Input(msg.to_string()));
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return bad("--temperature must be a number >= 0 (0 means greedy)");
        }
        if s.top_k == Some(0) {
            return bad("--top-k must be at least 1");
        }
        if let Some(p) = s.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("--top-p must be in (0, 1]");
            }
        }
        if !(s.repeat_penalty > 0.0 && s.repeat_penalty.is_finite()) {
            return bad("--repeat-penalty must be a number > 0 (1 disables it)");
        }
        if self.max_new_tokens == 0 {
            return bad("--max-new-tokens must be at least 1");
        }
        if self.num_samples == 0 {
            return bad("--num-samples must be at least 1");
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("--stop strings must not be empty");
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        let s = &self.sampling;
        let temperature = s.temperature;
        match (s.top_k, s.top_p) {
            _ if temperature == 0.0 => Sampling::ArgMax,
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
}

impl FinishReason {
    /// The name used in JSON output: `length`, `eos` or `stop`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::Stop => "stop",
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
    /// The prompt's forward pass (all samples), up to the first logits.
    pub prefill: Duration,
    /// Everything after: sampling, decode steps and any re-prefill after a context slide.
    pub decode: Duration,
    /// Prompt tokens times samples.
    pub prefill_tokens: usize,
    /// Tokens fed through the model after the prefill (every sample's, each step).
    pub decode_tokens: usize,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode)
    }
}

fn rate(tokens: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        tokens as f64 / d.as_secs_f64()
    }
}

/// One sample's state: its ids, and its text split into what was handed out and what is held
/// back (an incomplete character, or a possible start of a stop string).
struct Sample<'a> {
    ids: Vec<u32>,
    stream: TextStream<'a>,
    processor: LogitsProcessor,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
}

impl Sample<'_> {
    /// Appends decoded text, ends the sample at a stop string, and emits what is safe to show.
    fn push_text(&mut self, chunk: &str, stops: &[String], emit: &mut impl FnMut(&str)) {
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
            emit(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
    }

    /// Ends the sample: flushes bytes that never formed a character and any held-back text.
    fn finish(
        &mut self,
        reason: FinishReason,
        stops: &[String],
        emit: &mut impl FnMut(&str),
    ) -> Result<()> {
        if let Some(rest) = self.stream.finish()? {
            self.push_text(&rest, stops, emit);
        }
        if self.finish.is_none() {
            self.finish = Some(reason);
            if self.text.len() > self.emitted {
                emit(&self.text[self.emitted..]);
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

/// Generates `params.num_samples` continuations of `prompt_ids` as one batch, calling
/// `on_text(sample, text)` with each piece of text as soon as it is final.
///
/// The prompt must fit the context (`n_positions`). Past it, generation keeps going: the cache is
/// emptied and the newest `n_positions / 2` tokens are prefilled again, so memory stays flat
/// however long it runs, at the cost of one half-context prefill every `n_positions / 2` tokens.
/// An empty prompt starts from the model's BOS token (`<|endoftext|>` for GPT-2).
pub fn generate(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(usize, &str),
) -> Result<(Vec<Completion>, Timings)> {
    params.validate()?;
    let config = model.config();
    let ctx = config.n_positions;
    let bos = [config.bos_token_id];
    let prompt = if prompt_ids.is_empty() {
        &bos[..]
    } else {
        prompt_ids
    };
    if prompt.len() > ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens but the model sees at most {ctx}; shorten it or keep its end with --truncate-prompt",
            prompt.len()
        )));
    }
    let n = params.num_samples;
    let sampling = params.sampling();
    let stops = &params.stop;
    let mut samples: Vec<Sample> = (0..n)
        .map(|i| Sample {
            ids: Vec::new(),
            stream: tokenizer.stream(),
            processor: LogitsProcessor::from_sampling(
                params.sampling.seed.wrapping_add(i as u64),
                sampling.clone(),
            ),
            text: String::new(),
            emitted: 0,
            finish: None,
        })
        .collect();
    // Every sample's whole sequence, the same length for all: finished samples keep being fed
    // their last token so the batch stays rectangular.
    let mut seqs: Vec<Vec<u32>> = vec![prompt.to_vec(); n];

    let device = model.device();
    let mut timings = Timings {
        prefill_tokens: n * prompt.len(),
        ..Timings::default()
    };
    let start = Instant::now();
    let mut cache = model.new_cache();
    let batch = |rows: &[Vec<u32>], from: usize| -> Result<Tensor> {
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|r| r[from..].iter().copied())
            .collect();
        Ok(Tensor::from_vec(
            flat,
            (rows.len(), rows[0].len() - from),
            device,
        )?)
    };
    // (N, P) -> (N, vocab)
    let mut logits = model.forward_last(&batch(&seqs, 0)?, Some(&mut cache))?;
    timings.prefill = start.elapsed();
    let decode_start = Instant::now();

    for step in 0..params.max_new_tokens {
        for (i, sample) in samples.iter_mut().enumerate() {
            let mut emit = |t: &str| on_text(i, t);
            let seq = &mut seqs[i];
            if sample.finish.is_some() {
                let last = seq[seq.len() - 1];
                seq.push(last);
                continue;
            }
            let row = logits.get(i)?;
            let row = if params.sampling.repeat_penalty == 1.0 {
                row
            } else {
                let recent = &seq[seq.len().saturating_sub(params.sampling.repeat_last_n)..];
                apply_repeat_penalty(&row, params.sampling.repeat_penalty, recent)?
            };
            let next = sample.processor.sample(&row)?;
            seq.push(next);
            sample.ids.push(next);
            if params.stop_at_eos && next == config.eos_token_id {
                sample.finish(FinishReason::Eos, stops, &mut emit)?;
                continue;
            }
            if let Some(text) = sample.stream.push(next)? {
                sample.push_text(&text, stops, &mut emit);
            }
            if sample.finish.is_none() && step + 1 == params.max_new_tokens {
                sample.finish(FinishReason::Length, stops, &mut emit)?;
            }
        }
        if samples.iter().all(|s| s.finish.is_some()) {
            break;
        }
        let len = seqs[0].len();
        let from = if len > ctx {
            // Slide: keep the newest half of the window and prefill it again.
            cache.reset();
            len - ctx / 2
        } else {
            len - 1
        };
        timings.decode_tokens += n * (len - from);
        logits = model.forward_last(&batch(&seqs, from)?, Some(&mut cache))?;
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
