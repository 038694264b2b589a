//! A block's parts on their own, and the logits of chosen tokens: for analyses that know part of
//! a pass already. Path patching freezes every head's output, so a layer's attention output is
//! known and only its MLP runs; a metric of one or two tokens needs those columns of the LM
//! head, not all of its vocabulary.

use candle_core::{DType, Module, Tensor};

use candle_nn::kv_cache::KvCache;

use super::{no_logits, Cache, Gpt2};
use crate::error::{Error, Result};

impl Cache {
    /// A cache of `n_layer` layers whose layers `from..` hold the keys and values `kv`
    /// ((B, nkv, P, hs) each, layer `from + i` the i-th) of the first P positions, with room
    /// for `capacity` positions: [`Gpt2::run_from`] from layer `from` on the positions after
    /// them sees them as the past, as if it had run them. Layers below `from` stay empty.
    pub(crate) fn prefilled(
        n_layer: usize,
        from: usize,
        kv: &[(Tensor, Tensor)],
        capacity: usize,
    ) -> Result<Self> {
        let mut layers: Vec<KvCache> = (0..n_layer).map(|_| KvCache::new(2, capacity)).collect();
        for (cache, (k, v)) in layers.iter_mut().skip(from).zip(kv) {
            cache.append(k, v)?;
        }
        Ok(Self { layers })
    }
}

impl Gpt2 {
    /// Layer `layer`'s queries, keys and values of the stream `x` (B, T, C) entering it:
    /// (B, T, n_head, hs) and (B, T, n_kv_head, hs) twice, what the `Q`, `K` and `V` points see.
    pub(crate) fn block_qkv(&self, layer: usize, x: &Tensor) -> Result<[Tensor; 3]> {
        self.check_layers(&[layer])?;
        self.h[layer].qkv(x)
    }

    /// [`Gpt2::block_at`] for a stream `x` (B, T, C) at positions `past..past + T`, after the
    /// `past` positions whose keys and values `cache` holds at `layer` ([`Cache::prefilled`]):
    /// the block's output at `position` (in `past..past + T`), (B, 1, C).
    pub(crate) fn block_at_after(
        &self,
        layer: usize,
        x: &Tensor,
        cache: &Cache,
        position: usize,
    ) -> Result<Tensor> {
        self.check_layers(&[layer])?;
        if self.head_mask.is_some() {
            return Err(Error::Internal(
                "block_at runs no head mask: use run_from".into(),
            ));
        }
        let prefix = cache
            .layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("a cache without layer {layer}")))?;
        let past = prefix.k_cache().current_seq_len();
        let (_, t, _) = x.dims3()?;
        if !(past..past + t).contains(&position) {
            return Err(Error::Internal(format!(
                "position {position} is not among the stream's {past}..{}",
                past + t
            )));
        }
        self.h[layer].forward_at_after(x, Some(prefix), position)
    }

    /// Layer `layer`'s attention output (B, T, C) from its heads' outputs `z`
    /// (B, T, n_head, hs): what follows the `Z` point.
    pub(crate) fn attention_out(&self, layer: usize, z: &Tensor) -> Result<Tensor> {
        self.check_layers(&[layer])?;
        self.h[layer].attention_out(z)
    }

    /// Layer `layer`'s MLP output (B, T, C) on the stream `x` (B, T, C) after its attention.
    pub(crate) fn mlp_out(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        self.check_layers(&[layer])?;
        self.h[layer].mlp_out(x)
    }

    /// The logits of `tokens` alone for a residual stream `x` (..., C): (..., k) f32, `ln_f` then
    /// those columns of the LM head: [`Gpt2::unembed`]'s values there (to rounding: another
    /// summation order) for k columns' work instead of the vocabulary's.
    pub(crate) fn token_logits(&self, x: &Tensor, tokens: &[u32]) -> Result<Tensor> {
        let (ln_f, _) = self.head.as_ref().ok_or_else(no_logits)?;
        let columns = tokens
            .iter()
            .map(|&t| self.unembedding_column(t))
            .collect::<Result<Vec<_>>>()?;
        // k × (C,) -> (C, k)
        let w = Tensor::stack(&columns, 1)?;
        let h = ln_f.forward(x)?.to_dtype(DType::F32)?;
        Ok(h.broadcast_matmul(&w)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tiny_config, tiny_model};
    use super::*;
    use crate::hooks::{Hook, Point};
    use crate::model::Output;

    /// Keeps every point of one layer.
    struct Keep(usize, std::collections::BTreeMap<Point, Tensor>);

    impl Hook for Keep {
        fn wants(&self, p: Point) -> bool {
            matches!(p, Point::Q(l) | Point::K(l) | Point::V(l) | Point::Z(l)
                | Point::AttnOut(l) | Point::MlpOut(l) | Point::ResidPost(l) if l == self.0)
        }

        fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
            self.1.insert(p, t.clone());
            Ok(())
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn a_pass_after_a_prefilled_prefix_equals_the_whole_pass_there() -> Result<()> {
        let m = tiny_model(tiny_config(50, 16, 3), 3)?;
        let ids = Tensor::new(
            &[[3u32, 9, 4, 1, 8, 2, 7], [2, 2, 7, 5, 6, 1, 0]],
            m.device(),
        )?;
        // The whole pass: the stream entering layer 1, every layer's keys and values, the
        // output of layer 2 at position 5.
        struct All(std::collections::BTreeMap<Point, Tensor>);
        impl Hook for All {
            fn wants(&self, p: Point) -> bool {
                matches!(p, Point::K(_) | Point::V(_) | Point::ResidPost(_))
            }
            fn at(&mut self, p: Point, t: &mut Tensor) -> Result<()> {
                self.0.insert(p, t.clone());
                Ok(())
            }
        }
        let mut all = All(Default::default());
        m.run(&ids, None, Some(&mut all), Output::StopAfter(2))?;
        let got = |p| {
            all.0
                .get(&p)
                .cloned()
                .ok_or_else(|| crate::Error::Internal(format!("{p:?} not kept")))
        };
        let len = 3;
        // (B, T, nkv, hs) -> (B, nkv, len, hs) per layer from 1.
        let first = |t: Tensor| -> Result<Tensor> {
            Ok(t.narrow(1, 0, len)?.transpose(1, 2)?.contiguous()?)
        };
        let kv = (1..3)
            .map(|l| Ok((first(got(Point::K(l))?)?, first(got(Point::V(l))?)?)))
            .collect::<Result<Vec<_>>>()?;
        let after = got(Point::ResidPost(0))?.narrow(1, len, 4)?.contiguous()?;
        // Layer 1 on the positions after the prefix, then layer 2 at position 5 alone.
        let mut cache = Cache::prefilled(3, 1, &kv, 7)?;
        assert_eq!(cache.seq_len(), len);
        let mut out = None;
        struct Last<'a>(&'a mut Option<Tensor>);
        impl Hook for Last<'_> {
            fn wants(&self, p: Point) -> bool {
                p == Point::ResidPost(1)
            }
            fn at(&mut self, _: Point, t: &mut Tensor) -> Result<()> {
                *self.0 = Some(t.clone());
                Ok(())
            }
        }
        m.run_from(
            1,
            after,
            Some(&mut cache),
            Some(&mut Last(&mut out)),
            Output::StopAfter(1),
        )?;
        let x1 = out.ok_or_else(|| crate::Error::Internal("layer 1".into()))?;
        let whole = got(Point::ResidPost(1))?.narrow(1, len, 4)?;
        assert!(max_diff(&x1, &whole)? < 1e-5);
        let at = m.block_at_after(2, &x1, &cache, 5)?;
        assert!(max_diff(&at, &got(Point::ResidPost(2))?.narrow(1, 5, 1)?)? < 1e-5);
        // A position before the prefix's end is not in the stream.
        assert!(m.block_at_after(2, &x1, &cache, 2).is_err());
        Ok(())
    }

    #[test]
    fn parts_give_the_pass_own_values() -> Result<()> {
        let m = tiny_model(tiny_config(50, 16, 2), 7)?;
        let ids = Tensor::new(&[[3u32, 9, 4, 1, 8], [2, 2, 7, 5, 6]], m.device())?;
        let x = m.embed(&ids, 0)?;
        let mut keep = Keep(0, Default::default());
        m.run(&ids, None, Some(&mut keep), Output::StopAfter(0))?;
        let got = |p| {
            keep.1
                .get(&p)
                .cloned()
                .ok_or_else(|| crate::Error::Internal(format!("{p:?} not kept")))
        };
        let [q, k, v] = m.block_qkv(0, &x)?;
        for (a, p) in [(q, Point::Q(0)), (k, Point::K(0)), (v, Point::V(0))] {
            assert!(max_diff(&a, &got(p)?)? < 1e-6, "{p:?}");
        }
        let a = m.attention_out(0, &got(Point::Z(0))?)?;
        assert!(max_diff(&a, &got(Point::AttnOut(0))?)? < 1e-6);
        let mlp = m.mlp_out(0, &(&x + &a)?)?;
        assert!(max_diff(&mlp, &got(Point::MlpOut(0))?)? < 1e-6);
        // The logits of some tokens are those columns of the whole unembedding.
        let tokens = [7u32, 0, 49];
        let x = got(Point::ResidPost(0))?;
        let (cols, all) = (m.token_logits(&x, &tokens)?, m.unembed(&x)?);
        for (i, &t) in tokens.iter().enumerate() {
            let d = max_diff(&cols.narrow(2, i, 1)?, &all.narrow(2, t as usize, 1)?)?;
            assert!(d < 1e-5, "token {t}: {d}");
        }
        Ok(())
    }
}
