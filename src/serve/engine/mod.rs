//! The batching engine: one thread owns the model and runs every request's sequences together,
//! one decode step for all of them at a time (continuous batching, as llama-server's slots and
//! vLLM's scheduler do).
//!
//! Each loop of the thread:
//! 1. takes new jobs from the channel into the queue, and drops every sequence whose client went
//!    away (its event receiver is closed): a slot is freed within a step;
//! 2. admits queued jobs, oldest first, while their choices fit in the free slots (and, while
//!    streams are running, until [`PREFILL_BUDGET`] prompt tokens were prefilled): each prompt in
//!    one pass, exactly as `gpt2 generate` does, so its numbers are the CLI's; its choices fork
//!    that one cache and each sample their first token;
//! 3. runs one decode step ([`Gpt2::step`]) for every running sequence: each has its own KV cache,
//!    position, sampler and hook, and every weight is read once for all of them.
//!
//! So a new request waits at most one step to start (when slots are free), and the running
//! streams are delayed by at most about a budget's prefill per step. Sequences never share
//! numbers: a greedy request gives the same tokens alone or in a full batch.

mod runner;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::analysis::ablation::{AblateMode, HeadId};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::generation::{kv_cache_bytes, FinishReason, GenerateParams};
use crate::model::Gpt2;
use crate::tokenizer::Tokenizer;
use runner::Runner;

/// Prompt tokens prefilled between two decode steps while sequences are running (vLLM's
/// `max_num_batched_tokens` plays this part): a longer prompt still goes in one pass, alone.
pub const PREFILL_BUDGET: usize = 512;

/// How many sequences run together, and how many requests may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences decoded together (a request with `n` choices takes `n`).
    pub parallel: usize,
    /// Requests waiting for slots before new ones are refused ([`Rejected::QueueFull`]).
    pub max_queue: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            parallel: 8,
            max_queue: 64,
        }
    }
}

/// Penalties and biases the OpenAI API adds to sampling; none by default (then a request samples
/// exactly as `gpt2 generate` does).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// Subtracted from the logit of every token already generated (OpenAI's `presence_penalty`).
    pub presence: f32,
    /// Subtracted once per time a token was generated (`frequency_penalty`).
    pub frequency: f32,
    /// Added to the logits of these tokens (`logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    fn is_empty(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.logit_bias.is_empty()
    }

    /// Applies to `row` the penalties of the tokens `generated` so far, and the biases.
    fn apply(&self, row: &mut [f32], generated: &[u32]) {
        if self.presence != 0.0 || self.frequency != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &id in generated {
                *counts.entry(id).or_default() += 1;
            }
            for (id, n) in counts {
                if let Some(l) = row.get_mut(id as usize) {
                    *l -= self.presence + self.frequency * n as f32;
                }
            }
        }
        for &(id, bias) in &self.logit_bias {
            if let Some(l) = row.get_mut(id as usize) {
                *l += bias;
            }
        }
    }
}

/// One request: a prompt and what to generate from it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Token ids (checked again by the engine: inside the vocabulary and the context).
    pub prompt: Vec<u32>,
    /// Length, sampling, stop strings, EOS; `num_samples` choices, choice `i` drawn with seed
    /// `seed + i` (as `gpt2 generate --num-samples`).
    pub params: GenerateParams,
    pub penalties: Penalties,
    /// Each token's log-probability and this many most likely alternatives (OpenAI `logprobs`).
    pub logprobs: Option<usize>,
    /// The prompt tokens' log-probabilities too ([`Event::Prompt`]; OpenAI `echo` with
    /// `logprobs`). The prefill then computes the logits of every position.
    pub prompt_logprobs: bool,
    /// Layers whose attention each token carries ([`Token::attention`]: ascending, each once,
    /// whatever the order asked).
    pub attention: Option<Vec<usize>>,
    /// Heads removed while generating, and how.
    pub ablate: Option<(Vec<HeadId>, AblateMode)>,
}

impl Job {
    /// A job generating from `prompt` as `params` says, with nothing else asked.
    pub fn new(prompt: Vec<u32>, params: GenerateParams) -> Self {
        Self {
            prompt,
            params,
            penalties: Penalties::default(),
            logprobs: None,
            prompt_logprobs: false,
            attention: None,
            ablate: None,
        }
    }

    fn choices(&self) -> usize {
        self.params.num_samples.max(1)
    }
}

/// A token's log-probability under the model (the logits before penalties and temperature),
/// and the most likely tokens' (id, log-probability), most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A generated token of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub choice: usize,
    pub id: u32,
    /// Text that became safe to show with this token (empty while a character or a possible
    /// stop string is incomplete; without the stop string itself).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// For each asked layer, the (n_head, keys) attention of the query that produced this
    /// token, row-major: what `gpt2 generate --attention-out` records.
    pub attention: Option<Vec<Vec<f32>>>,
}

/// What a job's receiver gets, in order.
#[derive(Debug)]
pub enum Event {
    /// The prompt's tokens' log-probabilities (asked with [`Job::prompt_logprobs`]): `None` for
    /// the first, which nothing predicts. Before any token.
    Prompt(Vec<Option<TokenLogprob>>),
    Token(Token),
    /// Choice `choice` ended (its last token's text included what was held back).
    Done {
        choice: usize,
        reason: FinishReason,
    },
    /// The job failed: no more events follow.
    Failed(Error),
}

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the server is busy: {queued} requests are waiting; retry later")]
    QueueFull { queued: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{n} choices need more than the {parallel} sequences the server runs at once")]
    TooManyChoices { n: usize, parallel: usize },
}

/// Counters the engine keeps (read by `/metrics`).
#[derive(Debug, Default)]
pub struct Metrics {
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prefill_nanos: AtomicU64,
    pub decode_nanos: AtomicU64,
    /// Tokens made by decode steps (the first token of each choice comes from its prefill).
    pub decode_tokens: AtomicU64,
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub kv_cache_bytes: AtomicU64,
}

/// A handle on the engine's thread; clones share it.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stopping: AtomicBool,
    metrics: Arc<Metrics>,
    opts: EngineOptions,
    config: Config,
    tokenizer: Arc<Tokenizer>,
    name: String,
}

enum Cmd {
    Job(Box<Job>, UnboundedSender<Event>),
    /// Stop admitting; cancel what still runs at the deadline.
    Stop(Instant),
}

impl Engine {
    /// Starts the engine's thread, which owns `model`, named `name` in responses. Refused when
    /// `opts.parallel` sequences' KV caches cannot fit in memory.
    pub fn start(
        model: Gpt2,
        tokenizer: Tokenizer,
        name: impl Into<String>,
        opts: EngineOptions,
    ) -> Result<Self> {
        if opts.parallel == 0 {
            return Err(Error::param("parallel", "must be at least 1"));
        }
        if model.loaded_layers() < model.config().n_layer {
            return Err(Error::Input(
                "the engine needs the whole model, not its first layers".into(),
            ));
        }
        let kv = kv_cache_bytes(&model, opts.parallel);
        crate::memory::check_or(
            kv,
            || format!("the KV caches of {} sequences (--parallel)", opts.parallel),
            "lower --parallel",
        )?;
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(Metrics::default());
        let config = model.config().clone();
        let thread = {
            let (tokenizer, metrics) = (tokenizer.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("gpt2-engine".into())
                .spawn(move || Runner::new(&model, &tokenizer, opts, &metrics).run(rx))
                .map_err(|e| Error::Internal(format!("cannot start the engine's thread: {e}")))?
        };
        Ok(Self {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                stopping: AtomicBool::new(false),
                metrics,
                opts,
                config,
                tokenizer,
                name: name.into(),
            }),
        })
    }

    /// Queues `job`; its events arrive on the receiver. Dropping the receiver cancels the job
    /// (its sequences leave the batch at the next step).
    pub fn submit(&self, job: Job) -> std::result::Result<UnboundedReceiver<Event>, Rejected> {
        let s = &self.shared;
        let n = job.choices();
        if n > s.opts.parallel {
            return Err(Rejected::TooManyChoices {
                n,
                parallel: s.opts.parallel,
            });
        }
        if s.stopping.load(Ordering::SeqCst) {
            return Err(Rejected::ShuttingDown);
        }
        // The place in the queue is taken before the job is sent: the engine may admit it (and
        // count it out) before this thread runs again.
        let max = s.opts.max_queue;
        let claimed = s
            .metrics
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < max).then_some(q + 1)
            });
        if let Err(queued) = claimed {
            return Err(Rejected::QueueFull { queued });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let guard = s.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = guard
            .as_ref()
            .map(|cmd| cmd.send(Cmd::Job(Box::new(job), tx)).is_ok());
        if sent != Some(true) {
            s.metrics.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::ShuttingDown);
        }
        Ok(rx)
    }

    /// Stops taking jobs, lets the running ones finish for up to `grace`, cancels the rest
    /// (their receivers get [`Event::Failed`]) and waits for the thread to end.
    pub fn shutdown(&self, grace: Duration) {
        let s = &self.shared;
        s.stopping.store(true, Ordering::SeqCst);
        if let Some(tx) = s.tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(Cmd::Stop(Instant::now() + grace));
        }
        let thread = s.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Whether the engine's thread is still running (it ends only at shutdown).
    pub fn is_running(&self) -> bool {
        let thread = self.shared.thread.lock().unwrap_or_else(|p| p.into_inner());
        thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn options(&self) -> EngineOptions {
        self.shared.opts
    }

    /// The model's config.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    /// The model's name, as given to [`Engine::start`].
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::ablation::head_mask;
    use crate::generation::{generate, SamplingParams};
    use crate::inspect::generated::AttentionRecorder;
    use crate::model::{tiny_config, tiny_model};
    use crate::prompt::Prompt;

    fn tokenizer() -> Result<Tokenizer> {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny"))
    }

    fn model() -> Result<Gpt2> {
        let config = Config {
            bos_token_id: 511,
            eos_token_id: 511,
            ..tiny_config(512, 64, 2)
        };
        tiny_model(config, 2)
    }

    fn params(new: usize, temperature: f64, seed: u64, n: usize) -> GenerateParams {
        GenerateParams {
            max_new_tokens: new,
            sampling: SamplingParams {
                temperature,
                seed,
                ..SamplingParams::default()
            },
            stop_at_eos: false,
            num_samples: n,
            ..GenerateParams::default()
        }
    }

    /// Every choice's (ids, text, finish) from a job's events.
    fn collect(
        rx: &mut UnboundedReceiver<Event>,
        n: usize,
    ) -> Result<Vec<(Vec<u32>, String, FinishReason)>> {
        let mut out = vec![(Vec::new(), String::new(), FinishReason::Length); n];
        let mut done = 0;
        while let Some(e) = rx.blocking_recv() {
            match e {
                Event::Token(t) => {
                    out[t.choice].0.push(t.id);
                    out[t.choice].1.push_str(&t.text);
                }
                Event::Done { choice, reason } => {
                    out[choice].2 = reason;
                    done += 1;
                }
                Event::Failed(e) => return Err(e),
                Event::Prompt(_) => {}
            }
        }
        assert_eq!(done, n, "every choice ends with Done");
        Ok(out)
    }

    /// Many jobs at once, greedy and seeded, with several choices: each gets what `generate`
    /// gives it alone, whatever it is batched with.
    #[test]
    fn jobs_in_a_batch_get_what_generate_gives_them_alone() -> Result<()> {
        let (model, tok) = (model()?, tokenizer()?);
        let jobs: Vec<(Vec<u32>, GenerateParams)> = (0..12u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..1 + i % 6).map(|j| (i * 37 + j * 11) % 500).collect();
                let temperature = if i % 3 == 0 { 0.0 } else { 0.9 };
                (
                    prompt,
                    params(
                        5 + i as usize,
                        temperature,
                        100 + i as u64,
                        1 + (i % 3) as usize,
                    ),
                )
            })
            .collect();
        let want = jobs
            .iter()
            .map(|(prompt, p)| {
                let prompt = Prompt::from_ids(prompt.clone(), model.config())?;
                let (out, _) = generate(&model, &tok, &prompt, p, |_, _| Ok(()))?;
                Ok(out
                    .into_iter()
                    .map(|c| (c.token_ids, c.text, c.finish_reason))
                    .collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>>>()?;
        let engine = Engine::start(
            model,
            tok,
            "tiny",
            EngineOptions {
                parallel: 11,
                max_queue: 64,
            },
        )?;
        let mut rxs = jobs
            .iter()
            .map(|(prompt, p)| {
                engine
                    .submit(Job::new(prompt.clone(), p.clone()))
                    .map_err(|e| Error::Internal(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, (rx, want)) in rxs.iter_mut().zip(&want).enumerate() {
            assert_eq!(&collect(rx, want.len())?, want, "job {i}");
        }
        engine.shutdown(Duration::from_secs(1));
        Ok(())
    }

    /// A job's attention and ablation are what `generate` records with the recorder and the
    /// head mask, number for number, while another job without them runs in the same batch.
    #[test]
    fn attention_and_ablation_equal_generates() -> Result<()> {
        use crate::generation::generate_with_hook;
        let (mut model, tok) = (model()?, tokenizer()?);
        let prompt = vec![3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
        let heads = vec![HeadId { layer: 0, head: 1 }, HeadId { layer: 1, head: 3 }];
        let p = params(8, 0.0, 1, 1);
        model.set_head_mask(Some(head_mask(&model, &heads, AblateMode::Mean, &prompt)?));
        let mut rec = AttentionRecorder::new(vec![0, 1]);
        let (want, _) = generate_with_hook(
            &model,
            &tok,
            &Prompt::from_ids(prompt.clone(), model.config())?,
            &p,
            Some(&mut rec),
            |_, _| Ok(()),
        )?;
        model.set_head_mask(None);
        let engine = Engine::start(model, tok, "tiny", EngineOptions::default())?;
        let other = engine
            .submit(Job::new(vec![8, 8, 8], params(30, 0.0, 1, 1)))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut job = Job::new(prompt, p);
        job.attention = Some(vec![0, 1]);
        job.ablate = Some((heads, AblateMode::Mean));
        let mut rx = engine
            .submit(job)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut ids = Vec::new();
        while let Some(e) = rx.blocking_recv() {
            if let Event::Token(t) = e {
                let i = ids.len();
                ids.push(t.id);
                let attention = t
                    .attention
                    .ok_or_else(|| Error::Internal("no attention".into()))?;
                assert_eq!(
                    attention,
                    vec![rec.row(i, 0).to_vec(), rec.row(i, 1).to_vec()]
                );
            }
        }
        assert_eq!(ids, want[0].token_ids);
        drop(other);
        engine.shutdown(Duration::from_secs(1));
        Ok(())
    }

    #[test]
    fn a_full_queue_refuses_and_a_dropped_receiver_frees_its_slot() -> Result<()> {
        let engine = Engine::start(
            model()?,
            tokenizer()?,
            "tiny",
            EngineOptions {
                parallel: 1,
                max_queue: 1,
            },
        )?;
        let submit =
            |new: usize, n: usize| engine.submit(Job::new(vec![1, 2], params(new, 0.0, 1, n)));
        let wait_for = |what: &str, f: &dyn Fn(&Metrics) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !f(engine.metrics()) {
                assert!(Instant::now() < deadline, "never {what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // A long job takes the one slot, the next waits in the queue, the third is refused.
        let long = submit(1_000_000, 1).map_err(|e| Error::Internal(e.to_string()))?;
        wait_for("admitted", &|m| m.active.load(Ordering::SeqCst) == 1);
        let mut waiting = submit(3, 1).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(submit(3, 1).err(), Some(Rejected::QueueFull { queued: 1 }));
        assert_eq!(
            submit(3, 2).err(),
            Some(Rejected::TooManyChoices { n: 2, parallel: 1 })
        );
        // Dropping the long job's receiver frees its slot: the waiting job runs to its end.
        drop(long);
        let out = collect(&mut waiting, 1)?;
        assert_eq!(out[0].0.len(), 3);
        engine.shutdown(Duration::from_secs(1));
        assert!(!engine.is_running());
        assert!(matches!(
            engine.submit(Job::new(vec![1], params(2, 0.0, 1, 1))),
            Err(Rejected::ShuttingDown)
        ));
        Ok(())
    }

    /// Jobs submitted from several threads while the engine admits them are never refused below
    /// the queue's bound (a count taken after the send could be admitted first and wrap).
    #[test]
    fn the_queue_count_never_wraps() -> Result<()> {
        let engine = Engine::start(
            model()?,
            tokenizer()?,
            "tiny",
            EngineOptions {
                parallel: 2,
                max_queue: 256,
            },
        )?;
        let rxs = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let engine = &engine;
                    s.spawn(move || {
                        (0..50)
                            .map(|_| engine.submit(Job::new(vec![1], params(1, 0.0, 1, 1))))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap_or_default())
                .collect::<Vec<_>>()
        });
        assert_eq!(rxs.len(), 200);
        for rx in rxs {
            let mut rx = rx.map_err(|e| Error::Internal(e.to_string()))?;
            collect(&mut rx, 1)?;
        }
        assert_eq!(engine.metrics().queued.load(Ordering::SeqCst), 0);
        engine.shutdown(Duration::from_secs(1));
        Ok(())
    }

    #[test]
    fn a_bad_job_fails_alone() -> Result<()> {
        let engine = Engine::start(model()?, tokenizer()?, "tiny", EngineOptions::default())?;
        let mut bad = engine
            .submit(Job::new(vec![9999], params(3, 0.0, 1, 1)))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut good = engine
            .submit(Job::new(vec![5, 6], params(4, 0.0, 1, 1)))
            .map_err(|e| Error::Internal(e.to_string()))?;
        assert!(collect(&mut bad, 1).is_err());
        assert_eq!(collect(&mut good, 1)?[0].0.len(), 4);
        // Attention of a layer the model lacks: that job fails, the engine goes on.
        let mut job = Job::new(vec![5, 6], params(4, 0.0, 1, 1));
        job.attention = Some(vec![0, 7]);
        let mut bad = engine
            .submit(job)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let err = collect(&mut bad, 1).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("out of range")),
            "{err:?}"
        );
        // Layers asked twice or out of order come once each, ascending.
        let mut job = Job::new(vec![5, 6], params(3, 0.0, 1, 1));
        job.attention = Some(vec![1, 0, 1]);
        let mut rx = engine
            .submit(job)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut rows = Vec::new();
        while let Some(e) = rx.blocking_recv() {
            if let Event::Token(t) = e {
                rows.push(
                    t.attention
                        .map(|a| a.iter().map(Vec::len).collect::<Vec<_>>()),
                );
            }
        }
        // 4 heads × (2 + i) keys, for each of the 2 layers.
        let want: Vec<_> = (0..3).map(|i| Some(vec![4 * (2 + i); 2])).collect();
        assert_eq!(rows, want);
        engine.shutdown(Duration::from_secs(1));
        Ok(())
    }
}
