//! The position-wise feed-forward network: `c_fc` → activation → `c_proj`.

use candle_core::Tensor;

use crate::config::{Activation, Config};
use crate::error::Result;
use crate::linear::storage::Loader;
use crate::linear::Linear;

pub(crate) struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
}

impl Mlp {
    pub(crate) fn load(w: &Loader, name: &str, cfg: &Config) -> Result<Self> {
        let (c, inner) = (cfg.n_embd, cfg.inner_size());
        Ok(Self {
            c_fc: w.conv1d(&format!("{name}.c_fc"), c, inner)?,
            c_proj: w.conv1d(&format!("{name}.c_proj"), inner, c)?,
            act: cfg.activation_function,
        })
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        self.c_fc.weight_bytes() + self.c_proj.weight_bytes()
    }

    /// (B, T, C) -> (B, T, inner) -> (B, T, C); the activation is applied as `c_fc` writes its
    /// output (no pass of its own).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x, Some(self.act))?;
        Ok(self.c_proj.forward(&h, None)?)
    }

    /// [`Mlp::forward`] on rows of different sequences ([`Linear::forward_rows`]).
    pub(crate) fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward_rows(x, Some(self.act))?;
        Ok(self.c_proj.forward_rows(&h, None)?)
    }
}
