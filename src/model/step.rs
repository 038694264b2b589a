//! One decode step of independent sequences ([`Gpt2::step`]): the batched decode that
//! `generate --num-samples` and the server's engine run, each sequence with its own cache,
//! position and hook.

use candle_core::{DType, Module, Tensor};

use super::{no_logits, Cache, Gpt2};
use crate::attention::StepRow;
use crate::error::{Error, Result};
use crate::hooks::{Hook, MaskRef, Point};

/// One sequence of a batched decode step ([`Gpt2::step`]): its cache, the token that continues
/// it, and the hook its pass goes through (`None`: none).
pub struct Step<'a> {
    pub cache: &'a mut Cache,
    pub token: u32,
    pub hook: Option<&'a mut (dyn Hook + 'a)>,
}

/// A model's head mask and a sequence's own hook, as one hook (the mask first, as in
/// [`Gpt2::run`]).
struct Both<'a, 'h> {
    mask: Option<MaskRef<'a>>,
    hook: Option<&'a mut (dyn Hook + 'h)>,
}

impl Hook for Both<'_, '_> {
    fn wants(&self, p: Point) -> bool {
        self.mask.as_ref().is_some_and(|m| m.wants(p))
            || self.hook.as_ref().is_some_and(|h| h.wants(p))
    }

    fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
        if let Some(m) = self.mask.as_mut().filter(|m| m.wants(p)) {
            m.at(p, t)?;
        }
        if let Some(h) = self.hook.as_mut().filter(|h| h.wants(p)) {
            h.at(p, t)?;
        }
        Ok(())
    }
}

impl Gpt2 {
    /// One decode step of independent sequences, each with its own cache, position and hook:
    /// logits (N, vocab) in f32, row `i` for `seqs[i]`, whose token is appended to its cache.
    ///
    /// Every weight is read once per 8 sequences (the decode kernels' rows), and on the host
    /// each row is, bit for bit, what [`Gpt2::forward_last`] gives that sequence alone (the
    /// projections' decode kernels treat rows apart; attention runs per sequence): a request's
    /// tokens do not depend on what it is batched with.
    pub fn step(&self, seqs: &mut [Step<'_>]) -> Result<Tensor> {
        let (ln_f, lm_head) = self.head.as_ref().ok_or_else(no_logits)?;
        if seqs.is_empty() {
            return Err(Error::Input("no sequences to step".into()));
        }
        let pasts = seqs
            .iter()
            .map(|s| {
                let past = s.cache.seq_len();
                self.check_positions(past, 1)?;
                Ok(past)
            })
            .collect::<Result<Vec<_>>>()?;
        let tokens: Vec<u32> = seqs.iter().map(|s| s.token).collect();
        let mask = self.head_mask.as_ref();
        let mut parts: Vec<(&mut Cache, Both)> = seqs
            .iter_mut()
            .map(|s| {
                let both = Both {
                    mask: mask.map(MaskRef),
                    hook: s.hook.as_deref_mut(),
                };
                (&mut *s.cache, both)
            })
            .collect();
        // N × (1, 1, C) -> (N, 1, C): each token at its own position.
        let xs = parts
            .iter_mut()
            .zip(tokens.iter().zip(&pasts))
            .map(|((_, hook), (&token, &past))| {
                let mut x = self.embed(&Tensor::new(&[[token]], &self.device)?, past)?;
                if hook.wants(Point::Embed) {
                    hook.at(Point::Embed, &mut x)?;
                }
                Ok(x)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = Tensor::cat(&xs, 0)?;
        for (layer, block) in self.h.iter().enumerate() {
            let mut rows: Vec<StepRow> = parts
                .iter_mut()
                .zip(&pasts)
                .map(|((cache, hook), &past)| StepRow {
                    cache: &mut cache.layers[layer],
                    past,
                    hook,
                })
                .collect();
            x = block.forward_step(&x, layer, &mut rows)?;
        }
        // (N, 1, C) -> (N, 1, vocab) -> (N, vocab)
        let logits = lm_head.forward_rows(&ln_f.forward(&x)?, None)?;
        Ok(logits.squeeze(1)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::model::{tiny_config, Output};
    use crate::options::{LoadOptions, Quantization};
    use candle_core::Device;

    fn ids(v: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(v, &Device::Cpu)?.unsqueeze(0)?)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// A batched step gives each sequence, bit for bit, the logits it gets alone, whatever its
    /// position and company (11 sequences: more than one group of decode rows), with each
    /// sequence's hook seeing only its own row; and the caches end as a lone run leaves them.
    #[test]
    fn a_step_equals_each_sequence_alone() -> Result<()> {
        use crate::hooks::Patterns;
        for opts in [
            LoadOptions::default(),
            LoadOptions::default().with_dtype(DType::F16),
            LoadOptions::default().quantized(Quantization::Q8_0),
        ] {
            let mut model = Gpt2::new(
                tiny_config(61, 24, 3),
                Checkpoint::Random { seed: 7 },
                &opts,
            )?;
            let prompts: Vec<Vec<u32>> = (0..11u32)
                .map(|i| (0..1 + i % 5).map(|j| (i * 7 + j * 3) % 61).collect())
                .collect();
            let next = |i: usize| (i as u32 * 13 + 5) % 61;
            for masked in [false, true] {
                if masked {
                    let mask = crate::analysis::ablation::head_mask(
                        &model,
                        &[crate::analysis::ablation::HeadId { layer: 1, head: 2 }],
                        crate::analysis::ablation::AblateMode::Zero,
                        &prompts[0],
                    )?;
                    model.set_head_mask(Some(mask));
                }
                // Alone: prefill, then one token through `forward_last`.
                let mut alone = Vec::new();
                let mut alone_pattern = None;
                for (i, p) in prompts.iter().enumerate() {
                    let mut cache = model.new_cache();
                    model.forward_last(&ids(p)?, Some(&mut cache))?;
                    let x = ids(&[next(i)])?;
                    let logits = if i == 3 {
                        let mut got = None;
                        let mut hook = Patterns {
                            layers: &[1],
                            f: |_, t| {
                                got = Some(t);
                                Ok(())
                            },
                        };
                        let l = model.run(&x, Some(&mut cache), Some(&mut hook), Output::Last)?;
                        alone_pattern = got;
                        l.ok_or_else(no_logits)?
                    } else {
                        model.forward_last(&x, Some(&mut cache))?
                    };
                    alone.push((logits, cache));
                }
                // Together.
                let mut caches = prompts
                    .iter()
                    .map(|p| {
                        let mut cache = model.new_cache();
                        model.forward_last(&ids(p)?, Some(&mut cache))?;
                        Ok(cache)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut got = None;
                let mut hook = Patterns {
                    layers: &[1],
                    f: |_, t| {
                        got = Some(t);
                        Ok(())
                    },
                };
                let mut hook = Some(&mut hook as &mut dyn Hook);
                let mut seqs: Vec<Step> = caches
                    .iter_mut()
                    .enumerate()
                    .map(|(i, cache)| Step {
                        cache,
                        token: next(i),
                        hook: if i == 3 { hook.take() } else { None },
                    })
                    .collect();
                let logits = model.step(&mut seqs)?;
                drop(seqs);
                assert_eq!(logits.dims(), &[11, 61]);
                for (i, ((want, want_cache), cache)) in alone.iter().zip(&caches).enumerate() {
                    let row = logits.get(i)?.unsqueeze(0)?;
                    assert_eq!(max_abs_diff(&row, want)?, 0.0, "{opts:?} {masked} seq {i}");
                    assert_eq!(cache.seq_len(), want_cache.seq_len());
                    let (k, want_k) = (cache.layers[2].k()?, want_cache.layers[2].k()?);
                    let (Some(k), Some(want_k)) = (k, want_k) else {
                        panic!("no keys cached")
                    };
                    let diff =
                        max_abs_diff(&k.to_dtype(DType::F32)?, &want_k.to_dtype(DType::F32)?)?;
                    assert_eq!(diff, 0.0);
                }
                let (Some(p), Some(want)) = (got, alone_pattern.take()) else {
                    panic!("pattern not captured")
                };
                assert_eq!(p.dims(), want.dims());
                assert_eq!(max_abs_diff(&p, &want)?, 0.0);
            }
        }
        Ok(())
    }
}
