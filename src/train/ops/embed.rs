//! GPT-2's input embedding as one node: token rows of `wte` plus position rows of `wpe`.
//! Composed, the position rows' gradient was a broadcast's reduction over the batch (candle
//! sums it element by element through strided indices) and a narrow's padding back to
//! `n_positions` rows; here both gradients are written row by row.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{elems, Float};
use crate::error::Result;

/// `wte[ids[b, t]] + wpe[t]`: ids (B, T) u32, wte (V, C), wpe (P, C) with P ≥ T → (B, T, C).
pub(crate) fn embed(ids: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    if wte.device().is_cpu() {
        let op = Embed {
            ids: ids.flatten_all()?.to_vec1::<u32>()?,
            batch: b,
            len: t,
        };
        return Ok(wte.contiguous()?.apply_op2(&wpe.contiguous()?, op)?);
    }
    let c = wte.dim(1)?;
    let tok = wte
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, c))?;
    Ok(tok.broadcast_add(&wpe.narrow(0, 0, t)?)?)
}

struct Embed {
    /// B·T token ids, row by row.
    ids: Vec<u32>,
    batch: usize,
    len: usize,
}

impl Embed {
    /// The embedding width, with the ids and the number of positions checked against the tables.
    fn check(&self, lte: &Layout, lpe: &Layout) -> candle_core::Result<usize> {
        let ((v, c), (p, cp)) = (lte.shape().dims2()?, lpe.shape().dims2()?);
        if c != cp || c == 0 || p < self.len || self.ids.len() != self.batch * self.len {
            candle_core::bail!(
                "embed: wte {:?}, wpe {:?}, ids {}×{}",
                lte.dims(),
                lpe.dims(),
                self.batch,
                self.len
            );
        }
        if let Some(&id) = self.ids.iter().find(|&&id| id as usize >= v) {
            candle_core::bail!("embed: token id {id} is outside the {v} rows of wte");
        }
        Ok(c)
    }

    fn forward<T: Float>(
        &self,
        te: (&CpuStorage, &Layout),
        pe: (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let c = self.check(te.1, pe.1)?;
        let (wte, wpe) = (elems::<T>(te.0, te.1)?, elems::<T>(pe.0, pe.1)?);
        let mut out = Vec::with_capacity(self.ids.len() * c);
        for (i, &id) in self.ids.iter().enumerate() {
            let (tok, pos) = (id as usize * c, (i % self.len) * c);
            out.extend(
                wte[tok..tok + c]
                    .iter()
                    .zip(&wpe[pos..pos + c])
                    .map(|(&a, &b)| a + b),
            );
        }
        Ok(T::store(out))
    }

    /// d wte: each position's gradient added to its token's row, in order (as index_select's
    /// backward); d wpe: the gradients of position t summed over the batch, rows past T zero.
    fn backward<T: Float + candle_core::WithDType>(
        &self,
        wte: &Tensor,
        wpe: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Tensor; 2]> {
        let c = self.check(wte.layout(), wpe.layout())?;
        let (gs, gl) = grad.storage_and_layout();
        let g = match &*gs {
            candle_core::Storage::Cpu(g) => elems::<T>(g, gl)?,
            _ => candle_core::bail!("embed: not on the host"),
        };
        if g.len() != self.ids.len() * c {
            candle_core::bail!("embed: a gradient of another shape than the output");
        }
        let mut dte = vec![T::ZERO; wte.elem_count()];
        let mut dpe = vec![T::ZERO; wpe.elem_count()];
        for (i, (&id, g)) in self.ids.iter().zip(g.chunks(c)).enumerate() {
            let (tok, pos) = (id as usize * c, (i % self.len) * c);
            for (d, &g) in dte[tok..tok + c].iter_mut().zip(g) {
                *d += g;
            }
            for (d, &g) in dpe[pos..pos + c].iter_mut().zip(g) {
                *d += g;
            }
        }
        let dev = wte.device();
        Ok([
            Tensor::from_vec(dte, wte.shape(), dev)?,
            Tensor::from_vec(dpe, wpe.shape(), dev)?,
        ])
    }
}

impl CustomOp2 for Embed {
    fn name(&self) -> &'static str {
        "embed"
    }

    fn cpu_fwd(
        &self,
        te: &CpuStorage,
        lte: &Layout,
        pe: &CpuStorage,
        lpe: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match te {
            CpuStorage::F32(_) => self.forward::<f32>((te, lte), (pe, lpe))?,
            CpuStorage::F64(_) => self.forward::<f64>((te, lte), (pe, lpe))?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        Ok((out, Shape::from((self.batch, self.len, lte.dims()[1]))))
    }

    fn bwd(
        &self,
        wte: &Tensor,
        wpe: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let [dte, dpe] = match wte.dtype() {
            candle_core::DType::F32 => self.backward::<f32>(wte, wpe, &grad)?,
            candle_core::DType::F64 => self.backward::<f64>(wte, wpe, &grad)?,
            _ => candle_core::bail!("the training ops run in f32 or f64"),
        };
        Ok((Some(dte), Some(dpe)))
    }
}
