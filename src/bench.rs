//! A rerunnable speed benchmark: prefill and decode measured separately, the way llama.cpp's
//! `llama-bench` reports pp/tg, so figures compare across tools.

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Gpt2, Step};
use crate::rng::SplitMix64;
use crate::source::Loaded;

/// What one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Prefill of the prompt plus picking the first token.
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Steady-state decode: one token per forward pass, from the KV cache; with a batch, the
    /// tokens of all its sequences (aggregate).
    pub decode_tokens_per_s: f64,
    /// Sequences decoded together ([`Gpt2::step`], as the server runs them).
    pub batch: usize,
}

/// Checks [`bench`]'s sizes against `config` (before loading, if you like): at least one
/// sequence, prompt token, new token and run, all inside the context.
pub fn check(
    config: &Config,
    prompt_tokens: usize,
    new_tokens: usize,
    runs: usize,
    batch: usize,
) -> Result<()> {
    let at_least_one = |param, n: usize| match n {
        0 => Err(Error::param(param, "must be at least 1")),
        _ => Ok(()),
    };
    at_least_one("batch", batch)?;
    at_least_one("prompt_tokens", prompt_tokens)?;
    at_least_one("new_tokens", new_tokens)?;
    at_least_one("runs", runs)?;
    let ctx = config.n_positions;
    if prompt_tokens
        .checked_add(new_tokens)
        .is_none_or(|n| n > ctx)
    {
        return Err(Error::param(
            "prompt_tokens",
            format!("({prompt_tokens}) + --new-tokens ({new_tokens}) exceed the context ({ctx})"),
        ));
    }
    Ok(())
}

/// Prefills `prompt_tokens` pseudo-random ids, then decodes `new_tokens` greedily; `runs` times,
/// keeping the fastest of each phase (the machine's noise only ever slows a run down). With
/// `batch` > 1, the prompt's cache is copied to `batch` sequences which are decoded together,
/// one [`Gpt2::step`] for all per token (the server's batched decode; prefill is still one
/// sequence's).
pub fn bench(
    model: &Gpt2,
    prompt_tokens: usize,
    new_tokens: usize,
    runs: usize,
    batch: usize,
) -> Result<BenchResult> {
    check(model.config(), prompt_tokens, new_tokens, runs, batch)?;
    crate::memory::check_or(
        crate::generation::kv_cache_bytes(model, batch),
        || format!("the KV caches of {batch} sequences"),
        "use a smaller --batch",
    )?;
    // Any ids will do: speed does not depend on them. A seeded stream keeps runs identical.
    let mut rng = SplitMix64::new(0);
    let vocab = model.config().vocab_size as u64;
    let ids: Vec<u32> = (0..prompt_tokens)
        .map(|_| rng.below(vocab) as u32)
        .collect();
    let prompt = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let (mut best_prefill, mut best_decode) = (Duration::MAX, Duration::MAX);
    for _ in 0..runs {
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.forward_last(&prompt, Some(&mut cache))?;
        let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        let prefill = start.elapsed();
        let decode = if batch == 1 {
            let decode_start = Instant::now();
            for _ in 1..new_tokens {
                let input = Tensor::new(&[[next]], model.device())?;
                next = model
                    .forward_last(&input, Some(&mut cache))?
                    .argmax(1)?
                    .to_vec1::<u32>()?[0];
            }
            decode_start.elapsed()
        } else {
            let mut caches = (0..batch)
                .map(|_| cache.fork())
                .collect::<Result<Vec<_>>>()?;
            let mut next = vec![next; batch];
            let decode_start = Instant::now();
            for _ in 1..new_tokens {
                let mut steps: Vec<Step> = caches
                    .iter_mut()
                    .zip(&next)
                    .map(|(cache, &token)| Step {
                        cache,
                        token,
                        hook: None,
                    })
                    .collect();
                next = model.step(&mut steps)?.argmax(1)?.to_vec1::<u32>()?;
            }
            decode_start.elapsed()
        };
        best_prefill = best_prefill.min(prefill);
        best_decode = best_decode.min(decode);
    }
    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(BenchResult {
        prompt_tokens,
        new_tokens,
        time_to_first_token_ms: best_prefill.as_secs_f64() * 1e3,
        prefill_tokens_per_s: per_s(prompt_tokens, best_prefill),
        decode_tokens_per_s: per_s(batch * (new_tokens - 1), best_decode),
        batch,
    })
}

/// The CPU's model name (`/proc/cpuinfo`), or `unknown`.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The CPU's SIMD features that matter here and the kernel each path runs (chosen at run time
/// from those features), as `gpt2 bench --json` reports them.
pub fn kernels_json() -> serde_json::Value {
    let (features, kernels) = crate::linear::kernel_choices();
    serde_json::json!({
        "cpu": cpu_name(),
        "features": features,
        "kernels": kernels.into_iter().map(|(p, k)| (p.to_string(), serde_json::Value::from(k))).collect::<serde_json::Map<_, _>>(),
    })
}

impl BenchResult {
    /// The table `gpt2 bench` prints for `loaded`.
    pub fn report<'a>(&'a self, loaded: &'a Loaded) -> BenchReport<'a> {
        BenchReport {
            result: self,
            loaded,
        }
    }
}

/// A [`BenchResult`] with the model it measured, as text.
pub struct BenchReport<'a> {
    result: &'a BenchResult,
    loaded: &'a Loaded,
}

impl fmt::Display for BenchReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, m) = (self.result, &self.loaded.model);
        let c = m.config();
        writeln!(
            f,
            "model       {} ({} layers, {} heads x {}, {} weights, {:.0} MB)",
            self.loaded.name,
            c.n_layer,
            c.n_head,
            c.head_size(),
            m.weights_label(),
            m.weight_bytes() as f64 / 1e6
        )?;
        writeln!(f, "kv cache    {}", m.kv_dtype().as_str())?;
        writeln!(
            f,
            "load        {:.0} ms",
            self.loaded.load_time.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "prefill     {} tokens: {:.1} ms to first token, {:.1} tokens/s",
            r.prompt_tokens, r.time_to_first_token_ms, r.prefill_tokens_per_s
        )?;
        if r.batch == 1 {
            writeln!(
                f,
                "decode      {} tokens: {:.1} tokens/s",
                r.new_tokens, r.decode_tokens_per_s
            )?;
        } else {
            writeln!(
                f,
                "decode      {} tokens x {} sequences: {:.1} tokens/s in all ({:.1} each)",
                r.new_tokens,
                r.batch,
                r.decode_tokens_per_s,
                r.decode_tokens_per_s / r.batch as f64
            )?;
        }
        writeln!(f, "threads     {}", candle_core::utils::get_num_threads())?;
        let (features, kernels) = crate::linear::kernel_choices();
        writeln!(f, "cpu         {} ({})", cpu_name(), features.join(" "))?;
        for (path, kernel) in kernels {
            writeln!(f, "kernel      {path}: {kernel}")?;
        }
        Ok(())
    }
}
