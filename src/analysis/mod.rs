//! From seeing heads to testing them: each analysis is a small function over one forward pass
//! ([`crate::Gpt2::run`]) with [`crate::Hook`]s at TransformerLens' hook points, returning
//! structs the CLI only prints.
//!
//! - [`ablation`]: remove heads (zero or mean) in any pass: generation, inspection, perplexity;
//! - [`heads_effect`]: every head's effect on the loss or a target logit, batched per layer;
//! - [`logit_lens`]: the prediction after each layer, each with its own `ln_f` statistics;
//! - [`attribution`]: a target logit split exactly into embeddings, heads, biases and MLPs;
//! - [`patching`]: activation patching (TransformerLens' `get_act_patch_*`) and `run_with_cache`;
//! - [`ioi`]: the IOI paper's dataset and experiments (Wang et al. 2022);
//! - [`figure`]: layers × heads heatmaps as PNG.

pub mod ablation;
pub mod attribution;
pub mod figure;
pub mod heads_effect;
pub mod ioi;
pub mod logit_lens;
pub mod patching;
