//! A rerunnable speed benchmark: prefill and decode measured separately, the way llama.cpp's
//! `llama-bench` reports pp/tg, so figures compare across tools.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Gpt2;

/// What one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Prefill of the prompt plus picking the first token.
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Steady-state decode: one token per forward pass, from the KV cache.
    pub decode_tokens_per_s: f64,
}

/// Prefills `prompt_tokens` pseudo-random ids, then decodes `new_tokens` greedily; `runs` times,
/// keeping the fastest of each phase (the machine's noise only ever slows a run down).
pub fn bench(
    model: &Gpt2,
    prompt_tokens: usize,
    new_tokens: usize,
    runs: usize,
) -> Result<BenchResult> {
    let ctx = model.config().n_positions;
    if prompt_tokens == 0 || new_tokens == 0 || prompt_tokens + new_tokens > ctx {
        return Err(Error::Input(format!(
            "prompt tokens ({prompt_tokens}) + new tokens ({new_tokens}) must be between 2 and the context ({ctx})"
        )));
    }
    let vocab = model.config().vocab_size as u64;
    // Any ids will do: speed does not depend on them. A fixed LCG keeps runs identical.
    let ids: Vec<u32> = (0..prompt_tokens as u64)
        .map(|i| ((i * 6364136223846793005 + 1442695040888963407) >> 33) % vocab)
        .map(|i| i as u32)
        .collect();
    let prompt = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let (mut best_prefill, mut best_decode) = (Duration::MAX, Duration::MAX);
    for _ in 0..runs.max(1) {
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.forward_last(&prompt, Some(&mut cache))?;
        let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        let prefill = start.elapsed();
        let decode_start = Instant::now();
        for _ in 1..new_tokens {
            let input = Tensor::new(&[[next]], model.device())?;
            next = model
                .forward_last(&input, Some(&mut cache))?
                .argmax(1)?
                .to_vec1::<u32>()?[0];
        }
        let decode = decode_start.elapsed();
        best_prefill = best_prefill.min(prefill);
        best_decode = best_decode.min(decode);
    }
    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(BenchResult {
        prompt_tokens,
        new_tokens,
        time_to_first_token_ms: best_prefill.as_secs_f64() * 1e3,
        prefill_tokens_per_s: per_s(prompt_tokens, best_prefill),
        decode_tokens_per_s: per_s(new_tokens - 1, best_decode),
    })
}
