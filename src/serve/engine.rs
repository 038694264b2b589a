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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::analysis::ablation::{head_mask, AblateMode, HeadId};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::generation::{kv_cache_bytes, prepare_logits, FinishReason, GenerateParams, Sample};
use crate::hooks::{HeadMask, Hook, Point};
use crate::inspect::generated::AttentionRecorder;
use crate::model::{Cache, Gpt2, Output, Step};
use crate::prompt::Prompt;
use crate::tokenizer::Tokenizer;

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
        let queued = s.metrics.queued.load(Ordering::SeqCst);
        if queued >= s.opts.max_queue {
            return Err(Rejected::QueueFull { queued });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let guard = s.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = guard
            .as_ref()
            .map(|cmd| cmd.send(Cmd::Job(Box::new(job), tx)).is_ok());
        if sent != Some(true) {
            return Err(Rejected::ShuttingDown);
        }
        s.metrics.queued.fetch_add(1, Ordering::SeqCst);
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

/// A job's settings, shared by its choices.
struct JobState {
    job: Job,
    mask: Option<HeadMask>,
    events: UnboundedSender<Event>,
}

/// One running choice.
struct Seq<'t> {
    job: Arc<JobState>,
    choice: usize,
    sample: Sample<'t>,
    cache: Cache,
    /// The whole sequence: prompt, then every token generated.
    ids: Vec<u32>,
    prompt_len: usize,
    recorder: Option<AttentionRecorder>,
}

impl Seq<'_> {
    fn send(&self, e: Event) -> bool {
        self.job.events.send(e).is_ok()
    }

    /// The cache, and the hook the sequence's passes go through (none when it asks nothing).
    fn parts(&mut self) -> (&mut Cache, Option<SeqHook<'_>>) {
        let hook = (self.job.mask.is_some() || self.recorder.is_some()).then(|| SeqHook {
            mask: self.job.mask.as_ref(),
            recorder: self.recorder.as_mut(),
        });
        (&mut self.cache, hook)
    }
}

/// A sequence's head mask (its job's ablation) then its attention recorder, as one hook.
struct SeqHook<'a> {
    mask: Option<&'a HeadMask>,
    recorder: Option<&'a mut AttentionRecorder>,
}

impl Hook for SeqHook<'_> {
    fn wants(&self, p: Point) -> bool {
        self.mask.is_some_and(|m| m.wants(p)) || self.recorder.as_ref().is_some_and(|r| r.wants(p))
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        if let Some(m) = self.mask.filter(|m| m.wants(p)) {
            m.clone().at(p, t)?;
        }
        if let Some(r) = self.recorder.as_mut().filter(|r| r.wants(p)) {
            r.at(p, t)?;
        }
        Ok(())
    }
}

struct Runner<'m> {
    model: &'m Gpt2,
    tokenizer: &'m Tokenizer,
    opts: EngineOptions,
    metrics: &'m Metrics,
    queue: VecDeque<JobState>,
    running: Vec<Seq<'m>>,
    stop_at: Option<Instant>,
}

impl<'m> Runner<'m> {
    fn new(
        model: &'m Gpt2,
        tokenizer: &'m Tokenizer,
        opts: EngineOptions,
        metrics: &'m Metrics,
    ) -> Self {
        Self {
            model,
            tokenizer,
            opts,
            metrics,
            queue: VecDeque::new(),
            running: Vec::new(),
            stop_at: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let idle = self.running.is_empty() && self.queue.is_empty();
            if idle && self.stop_at.is_some() {
                break;
            }
            // Idle: wait for work. Busy: take what came, without waiting.
            let first = if idle {
                match rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => break,
                }
            } else {
                rx.try_recv().ok()
            };
            for cmd in first.into_iter().chain(rx.try_iter()) {
                self.take(cmd);
            }
            if self.stop_at.is_some_and(|t| Instant::now() >= t) {
                for seq in self.running.drain(..) {
                    seq.send(Event::Failed(Error::Input(
                        "cancelled: the server is shutting down".into(),
                    )));
                }
                break;
            }
            self.drop_abandoned();
            // A panic is a bug; it fails the requests in flight, not the server.
            if let Err(msg) = crate::error::catch_panic(|| {
                self.admit();
                self.step();
            }) {
                for seq in self.running.drain(..) {
                    seq.send(Event::Failed(Error::Internal(msg.clone())));
                }
            }
            self.metrics
                .active
                .store(self.running.len(), Ordering::SeqCst);
            let kv = kv_cache_bytes(self.model, self.running.len());
            self.metrics
                .kv_cache_bytes
                .store(u64::try_from(kv).unwrap_or(u64::MAX), Ordering::SeqCst);
        }
        self.metrics.active.store(0, Ordering::SeqCst);
        self.metrics.kv_cache_bytes.store(0, Ordering::SeqCst);
    }

    fn take(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Job(job, events) => {
                let job = JobState {
                    job: *job,
                    mask: None,
                    events,
                };
                if self.stop_at.is_some() {
                    self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.send(Event::Failed(Error::Input(
                        "the server is shutting down".into(),
                    )));
                } else {
                    self.queue.push_back(job);
                }
            }
            Cmd::Stop(at) => {
                self.stop_at = Some(at);
                for job in self.queue.drain(..) {
                    self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.send(Event::Failed(Error::Input(
                        "the server is shutting down".into(),
                    )));
                }
            }
        }
    }

    /// Sequences and queued jobs whose receiver is gone: their client left.
    fn drop_abandoned(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|j| !j.events.is_closed());
        self.metrics
            .queued
            .fetch_sub(before - self.queue.len(), Ordering::SeqCst);
        self.running.retain(|s| !s.job.events.is_closed());
    }

    /// Admits the oldest jobs whose choices fit in the free slots, in order: prefills each (one
    /// pass per prompt, as `gpt2 generate`) and samples each choice's first token. While
    /// sequences are running, the prompts admitted in one loop stop at [`PREFILL_BUDGET`]
    /// tokens (at least one job), so the running streams keep their pace; idle, all that fit
    /// are admitted, so a burst of requests starts at once.
    fn admit(&mut self) {
        let busy = !self.running.is_empty();
        let mut prefilled = 0;
        while let Some(job) = self.queue.front() {
            let free = self.opts.parallel.saturating_sub(self.running.len());
            if job.job.choices() > free || (busy && prefilled >= PREFILL_BUDGET) {
                return;
            }
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
            prefilled += job.job.prompt.len().max(1);
            let events = job.events.clone();
            match self.prefill(job) {
                Ok(seqs) => self.running.extend(seqs),
                Err(e) => {
                    let _ = events.send(Event::Failed(e));
                }
            }
        }
    }

    fn prefill(&mut self, mut job: JobState) -> Result<Vec<Seq<'m>>> {
        let (model, config) = (self.model, self.model.config());
        let j = &job.job;
        j.params.validate()?;
        let prompt = Prompt::from_ids(j.prompt.clone(), config)?.ids;
        if let Some((id, _)) = j
            .penalties
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= config.vocab_size)
        {
            return Err(Error::param(
                "logit_bias",
                format!(
                    "token {id} is outside the vocabulary of {}",
                    config.vocab_size
                ),
            ));
        }
        // The job's own head mask (the mean of a head is taken over its prompt, as the CLI does).
        if let Some((heads, mode)) = j.ablate.as_ref().filter(|(h, _)| !h.is_empty()) {
            job.mask = Some(head_mask(model, heads, *mode, &prompt)?);
        }
        let job = Arc::new(job);
        let j = &job.job;
        let n = j.choices();
        let recorder = match &j.attention {
            Some(layers) => {
                // The recorder takes each pass's layers in order, once each.
                let mut layers = layers.clone();
                layers.sort_unstable();
                layers.dedup();
                model.check_layers(&layers)?;
                Some(AttentionRecorder::for_run(
                    model,
                    layers,
                    prompt.len(),
                    j.params.max_new_tokens,
                    crate::inspect::Format::Json,
                )?)
            }
            None => None,
        };
        let start = Instant::now();
        let mut first = Seq {
            job: job.clone(),
            choice: 0,
            sample: Sample::new(self.tokenizer, &j.params, j.params.sampling.seed),
            cache: model.new_cache(),
            ids: prompt.clone(),
            prompt_len: prompt.len(),
            recorder,
        };
        let ids = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
        let output = if j.prompt_logprobs {
            Output::All
        } else {
            Output::Last
        };
        let logits = {
            let (cache, mut hook) = first.parts();
            let hook = hook.as_mut().map(|h| h as &mut dyn Hook);
            model
                .run(&ids, Some(cache), hook, output)?
                .ok_or_else(|| Error::Internal("no logits".into()))?
        };
        // (1, P, vocab) or (1, vocab) -> the last position's (vocab,)
        let last = if j.prompt_logprobs {
            let rows = logits.squeeze(0)?.to_vec2::<f32>()?;
            let mut lps = vec![None];
            lps.extend(
                rows.iter()
                    .zip(&prompt[1..])
                    .map(|(row, &next)| Some(logprob_of(row, next, j.logprobs.unwrap_or(0)))),
            );
            first.send(Event::Prompt(lps));
            rows.last().cloned().unwrap_or_default()
        } else {
            logits.squeeze(0)?.to_vec1::<f32>()?
        };
        let mut seqs = vec![first];
        for choice in 1..n {
            let f = &seqs[0];
            seqs.push(Seq {
                job: job.clone(),
                choice,
                sample: Sample::new(
                    self.tokenizer,
                    &j.params,
                    j.params.sampling.seed.wrapping_add(choice as u64),
                ),
                cache: f.cache.fork()?,
                ids: f.ids.clone(),
                prompt_len: f.prompt_len,
                recorder: f.recorder.clone(),
            });
        }
        let nanos = start.elapsed().as_nanos();
        self.metrics
            .prefill_nanos
            .fetch_add(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.metrics
            .prompt_tokens
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        let mut kept = Vec::with_capacity(n);
        for mut seq in seqs {
            if self.next_token(&mut seq, last.clone()) {
                kept.push(seq);
            }
        }
        Ok(kept)
    }

    /// One decode step for every running sequence (a sequence whose cache is full slides its
    /// window first, as `gpt2 generate` does), then each samples its next token.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let (model, ctx) = (self.model, self.model.config().n_positions);
        let start = Instant::now();
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; self.running.len()];
        let mut failed: Vec<(usize, Error)> = Vec::new();
        // Full caches: empty them and prefill the newest half of the window again.
        for (i, seq) in self.running.iter_mut().enumerate() {
            if seq.cache.seq_len() < ctx {
                continue;
            }
            seq.cache.reset();
            let window = &seq.ids[seq.ids.len() - ctx / 2..];
            let result = Tensor::new(window, model.device())
                .and_then(|t| t.unsqueeze(0))
                .map_err(Error::from)
                .and_then(|ids| {
                    let (cache, mut hook) = seq.parts();
                    let hook = hook.as_mut().map(|h| h as &mut dyn Hook);
                    model.run(&ids, Some(cache), hook, Output::Last)
                })
                .and_then(|l| l.ok_or_else(|| Error::Internal("no logits".into())))
                .and_then(|l| Ok(l.squeeze(0)?.to_vec1::<f32>()?));
            match result {
                Ok(row) => rows[i] = Some(row),
                Err(e) => failed.push((i, e)),
            }
        }
        let batch: Vec<usize> = (0..self.running.len())
            .filter(|&i| rows[i].is_none() && !failed.iter().any(|(f, _)| *f == i))
            .collect();
        if !batch.is_empty() {
            let result = {
                let mut hooks: Vec<Option<SeqHook>> = Vec::with_capacity(batch.len());
                let mut caches = Vec::with_capacity(batch.len());
                let chosen = self.running.iter_mut().enumerate();
                for (_, seq) in chosen.filter(|(i, _)| batch.contains(i)) {
                    let token = seq.ids[seq.ids.len() - 1];
                    let (cache, hook) = seq.parts();
                    hooks.push(hook);
                    caches.push((cache, token));
                }
                let mut steps: Vec<Step> = caches
                    .into_iter()
                    .zip(hooks.iter_mut())
                    .map(|((cache, token), hook)| Step {
                        cache,
                        token,
                        hook: hook.as_mut().map(|h| h as &mut dyn Hook),
                    })
                    .collect();
                crate::error::catch_panic(|| model.step(&mut steps))
                    .map_err(Error::Internal)
                    .and_then(|r| r)
                    .and_then(|l| Ok(l.to_vec2::<f32>()?))
            };
            match result {
                Ok(logits) => {
                    for (i, row) in batch.iter().zip(logits) {
                        rows[*i] = Some(row);
                    }
                }
                // The step failed for all of them (nothing is known to be one sequence's).
                Err(e) => {
                    let msg = e.to_string();
                    for &i in &batch {
                        failed.push((i, Error::Internal(format!("decode step: {msg}"))));
                    }
                }
            }
        }
        let nanos = start.elapsed().as_nanos();
        self.metrics
            .decode_nanos
            .fetch_add(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        let running = std::mem::take(&mut self.running);
        let mut failed_jobs: Vec<Arc<JobState>> = Vec::new();
        for (i, (mut seq, row)) in running.into_iter().zip(rows).enumerate() {
            if let Some(pos) = failed.iter().position(|(f, _)| *f == i) {
                let (_, e) = failed.swap_remove(pos);
                if !failed_jobs.iter().any(|j| Arc::ptr_eq(j, &seq.job)) {
                    seq.send(Event::Failed(e));
                    failed_jobs.push(seq.job.clone());
                }
                continue;
            }
            if failed_jobs.iter().any(|j| Arc::ptr_eq(j, &seq.job)) {
                continue;
            }
            let Some(row) = row else { continue };
            self.metrics.decode_tokens.fetch_add(1, Ordering::Relaxed);
            if self.next_token(&mut seq, row) {
                self.running.push(seq);
            }
        }
        // A failed job's other choices leave too.
        self.running
            .retain(|s| !failed_jobs.iter().any(|j| Arc::ptr_eq(j, &s.job)));
    }

    /// Samples `seq`'s next token from its logits `row` and sends it; false when the sequence
    /// has ended (or its client is gone).
    fn next_token(&mut self, seq: &mut Seq<'m>, mut row: Vec<f32>) -> bool {
        let j = &seq.job.job;
        let config = self.model.config();
        let logprob = j.logprobs.map(|top| row_logprobs(&row, top));
        let generated = &seq.ids[seq.prompt_len..];
        let result = (|| -> Result<u32> {
            if !j.penalties.is_empty() {
                j.penalties.apply(&mut row, generated);
            }
            let s = &j.params.sampling;
            let recent = &seq.ids[seq.ids.len().saturating_sub(s.repeat_last_n)..];
            prepare_logits(&mut row, s.repeat_penalty, recent)?;
            Ok(seq.sample.processor.sample(&Tensor::from_vec(
                row,
                config.vocab_size,
                &Device::Cpu,
            )?)?)
        })();
        let next = match result {
            Ok(next) => next,
            Err(e) => {
                seq.send(Event::Failed(e));
                return false;
            }
        };
        let logprob = logprob.map(|f| f(next));
        let step = seq.ids.len() - seq.prompt_len;
        seq.ids.push(next);
        self.metrics
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
        let mut text = String::new();
        let pushed = seq.sample.push(
            next,
            step,
            &j.params,
            config.eos_token_id,
            &mut |t: &str| {
                text.push_str(t);
                Ok(())
            },
        );
        if let Err(e) = pushed {
            seq.send(Event::Failed(e));
            return false;
        }
        let attention = seq.recorder.as_ref().and_then(|r| {
            let i = r.steps().checked_sub(1)?;
            Some(
                (0..r.layers().len())
                    .map(|l| r.row(i, l).to_vec())
                    .collect(),
            )
        });
        let token = Token {
            choice: seq.choice,
            id: next,
            text,
            logprob,
            attention,
        };
        if !seq.send(Event::Token(token)) {
            return false;
        }
        match seq.sample.finish {
            None => true,
            Some(reason) => {
                seq.send(Event::Done {
                    choice: seq.choice,
                    reason,
                });
                false
            }
        }
    }
}

/// The log-probability of `token` in `row`, with the `top` most likely.
fn logprob_of(row: &[f32], token: u32, top: usize) -> TokenLogprob {
    row_logprobs(row, top)(token)
}

/// Log-softmax of `row` once; then any token's [`TokenLogprob`].
fn row_logprobs(row: &[f32], top: usize) -> impl Fn(u32) -> TokenLogprob {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    let lp = |v: f32| (v as f64 - lse) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let k = top.min(order.len());
        order.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
            row[b as usize].total_cmp(&row[a as usize])
        });
        order.truncate(k);
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        best = order
            .into_iter()
            .map(|i| (i, lp(row[i as usize])))
            .collect();
    }
    let row: Vec<f32> = row.iter().map(|&v| lp(v)).collect();
    move |token| TokenLogprob {
        logprob: row
            .get(token as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY),
        top: best.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::{generate, SamplingParams};
    use crate::model::{tiny_config, tiny_model};

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

    #[test]
    fn logprobs_are_a_log_softmax_with_the_most_likely_first() {
        let row = [1.0f32, 3.0, 2.0, -1.0];
        let lp = row_logprobs(&row, 2)(2);
        let lse = row.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
    }
}
