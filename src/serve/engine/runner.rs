//! The engine's thread: its queue, its running sequences, and the loop that admits, steps and
//! samples them (see the module above for the order of things).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use super::{Cmd, EngineOptions, Event, Job, Metrics, Token, TokenLogprob, PREFILL_BUDGET};
use crate::analysis::ablation::head_mask;
use crate::error::{Error, Result};
use crate::generation::{kv_cache_bytes, prepare_logits, Sample};
use crate::hooks::{HeadMask, Hook, Point};
use crate::inspect::generated::AttentionRecorder;
use crate::model::{Cache, Gpt2, Output, Step};
use crate::perplexity::log_sum_exp;
use crate::prompt::Prompt;
use crate::tokenizer::Tokenizer;

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

pub(super) struct Runner<'m> {
    model: &'m Gpt2,
    tokenizer: &'m Tokenizer,
    opts: EngineOptions,
    metrics: &'m Metrics,
    queue: VecDeque<JobState>,
    running: Vec<Seq<'m>>,
    stop_at: Option<Instant>,
}

impl<'m> Runner<'m> {
    pub(super) fn new(
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

    pub(super) fn run(mut self, rx: mpsc::Receiver<Cmd>) {
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
        // The model's own distribution, before penalties and temperature change `row`.
        let raw = j.logprobs.map(|top| (row.clone(), top));
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
        let logprob = raw.map(|(raw, top)| logprob_of(&raw, next, top));
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

/// The log-probability of `token` in `row` (its log-softmax), with the `top` most likely
/// tokens' (id, log-probability), most likely first.
fn logprob_of(row: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lse = log_sum_exp(row);
    let lp = |v: f32| (v as f64 - lse) as f32;
    let mut order: Vec<u32> = Vec::new();
    let k = top.min(row.len());
    if k > 0 {
        order = (0..row.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
        order.sort_by(|a, b| by_logit(a, b).then(a.cmp(b)));
    }
    TokenLogprob {
        logprob: row
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&v| lp(v)),
        top: order
            .into_iter()
            .map(|i| (i, lp(row[i as usize])))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_most_likely_first() {
        let row = [1.0f32, 3.0, 2.0, -1.0];
        let lp = logprob_of(&row, 2, 2);
        let lse = row.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
    }
}
