//! A block's parts on their own, and the logits of chosen tokens: for analyses that know part of
//! a pass already. Path patching freezes every head's output, so a layer's attention output is
//! known and only its MLP runs; a metric of one or two tokens needs those columns of the LM
//! head, not all of its vocabulary.

use candle_core::{DType, Module, Tensor};

use super::{no_logits, Gpt2};
use crate::error::Result;

impl Gpt2 {
    /// Layer `layer`'s queries, keys and values of the stream `x` (B, T, C) entering it:
    /// (B, T, n_head, hs) and (B, T, n_kv_head, hs) twice, what the `Q`, `K` and `V` points see.
    pub(crate) fn block_qkv(&self, layer: usize, x: &Tensor) -> Result<[Tensor; 3]> {
        self.check_layers(&[layer])?;
        self.h[layer].qkv(x)
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
