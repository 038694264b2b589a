//! The tutorials' head-count exercises: a layout with its head count changed (`n_embd` fixed),
//! and the time of a training step's forward and backward at each head count.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::model::{init_tensors, TrainModel};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// `config` with `heads` query heads of `n_embd / heads` dimensions; a `n_kv_head` that no
/// longer divides them is dropped (plain multi-head attention).
pub fn with_heads(config: &Config, heads: usize) -> Result<Config> {
    if heads == 0 || !config.n_embd.is_multiple_of(heads) {
        return Err(Error::param(
            "compare-heads",
            format!("{heads} heads do not divide n_embd {}", config.n_embd),
        ));
    }
    let mut c = config.clone();
    c.n_head = heads;
    if c.n_kv_head
        .is_some_and(|kv| kv > heads || !heads.is_multiple_of(kv))
    {
        c.n_kv_head = None;
    }
    c.validate()?;
    Ok(c)
}

/// One head count's timings (the fastest of the repetitions, in milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct HeadTiming {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_size: usize,
    pub parameters: usize,
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
}

/// Times the loss of one `batch` × `seq_len` batch of random ids (forward), and the loss and
/// its gradients (forward + backward), for `config` at each head count in `heads`.
pub fn time_heads(
    config: &Config,
    heads: &[usize],
    batch: usize,
    seq_len: usize,
    reps: usize,
    device: &Device,
) -> Result<Vec<HeadTiming>> {
    if seq_len == 0 || seq_len > config.n_positions || batch == 0 {
        return Err(Error::param(
            "seq-len",
            format!(
                "must be 1..={} (and the batch at least 1)",
                config.n_positions
            ),
        ));
    }
    let mut rng = SplitMix64::new(0x7157);
    let n = batch * seq_len;
    let ids: Vec<u32> = (0..n)
        .map(|_| rng.below(config.vocab_size as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..n)
        .map(|_| rng.below(config.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), device)?;
    let targets = Tensor::from_vec(targets, n, device)?;
    heads
        .iter()
        .map(|&h| {
            let c = with_heads(config, h)?;
            let model = TrainModel::from_tensors(&c, init_tensors(&c, 0)?, DType::F32, device)?;
            let loss = || -> Result<Tensor> { model.loss(&ids, &targets, None, None) };
            let best = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
                f()?; // warm-up: first-touch allocations
                let mut best = f64::INFINITY;
                for _ in 0..reps.max(1) {
                    crate::interrupt::check()?;
                    let t = Instant::now();
                    f()?;
                    // A GPU's kernels are queued: wait for them before reading the clock.
                    device.synchronize()?;
                    best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(best)
            };
            let forward_ms = best(&|| loss().map(drop))?;
            let forward_backward_ms = best(&|| loss()?.backward().map(drop).map_err(Into::into))?;
            Ok(HeadTiming {
                heads: h,
                kv_heads: c.kv_heads(),
                head_size: c.head_size(),
                parameters: model.parameters().iter().map(|(_, v)| v.elem_count()).sum(),
                forward_ms,
                forward_backward_ms,
            })
        })
        .collect()
}
