//! Seeded random weights for a layout: every tensor of a GPT-2 checkpoint, named and shaped as
//! the Hub's files, made from the seed and its name alone.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::config::Config;
use crate::error::Result;
use crate::rng::{hash_name, SplitMix64};

/// Every tensor of a GPT-2 checkpoint for `config`, with its shape, named as in the Hub's
/// `openai-community/gpt2` file (Conv1D weights (in, out), no prefix, head tied to `wte`).
pub(crate) fn checkpoint_layout(config: &Config) -> Vec<(String, Vec<usize>)> {
    let (c, inner) = (config.n_embd, config.inner_size());
    let qkv = c + 2 * config.kv_heads() * config.head_size();
    let mut layout = vec![
        ("wte.weight".to_string(), vec![config.vocab_size, c]),
        ("wpe.weight".to_string(), vec![config.n_positions, c]),
    ];
    for i in 0..config.n_layer {
        for (name, d_in, d_out) in [
            ("attn.c_attn", c, qkv),
            ("attn.c_proj", c, c),
            ("mlp.c_fc", c, inner),
            ("mlp.c_proj", inner, c),
        ] {
            layout.push((format!("h.{i}.{name}.weight"), vec![d_in, d_out]));
            layout.push((format!("h.{i}.{name}.bias"), vec![d_out]));
        }
        for ln in ["ln_1", "ln_2"] {
            layout.push((format!("h.{i}.{ln}.weight"), vec![c]));
            layout.push((format!("h.{i}.{ln}.bias"), vec![c]));
        }
    }
    layout.push(("ln_f.weight".to_string(), vec![c]));
    layout.push(("ln_f.bias".to_string(), vec![c]));
    layout
}

/// Elements of the embeddings and the first `n_layers` blocks of `config`'s checkpoint.
pub(crate) fn layout_elements(config: &Config, n_layers: usize) -> u128 {
    checkpoint_layout(config)
        .iter()
        .filter(|(name, _)| {
            let layer = name.strip_prefix("h.").and_then(|r| r.split('.').next());
            layer
                .and_then(|l| l.parse::<usize>().ok())
                .is_none_or(|l| l < n_layers)
        })
        .map(|(_, shape)| crate::memory::product(shape))
        .fold(0, u128::saturating_add)
}

/// A seeded random checkpoint for `config`, named and shaped as the Hub's GPT-2 files; each tensor
/// as [`Checkpoint::Random`] makes it.
pub fn random_checkpoint(config: &Config, seed: u64) -> Result<HashMap<String, Tensor>> {
    checkpoint_layout(config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), random_tensor(&name, &shape, seed)?)))
        .collect()
}

/// One tensor of a random checkpoint, from `seed` and its name alone (so it does not depend on
/// which other tensors were made).
///
/// The scales are not GPT-2's training init (std 0.02, which gives near-uniform attention) but
/// ones that make heads attend sharply: projections with std `1/√fan_in`, embeddings std 1, layer
/// norms and biases random around their neutral values. Values are uniform with those means and
/// standard deviations: random-weight runs are for shapes, memory and speed, and uniform numbers
/// are ten times cheaper to make than normal ones at 7B parameters.
pub(super) fn random_tensor(name: &str, shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = SplitMix64::new(seed ^ hash_name(name));
    let is_norm = name.contains("ln_");
    let (mean, std) = match (is_norm, name.ends_with(".bias")) {
        (true, false) => (1.0, 0.1),
        (_, true) => (0.0, 0.1),
        _ if name.starts_with("wte") || name.starts_with("wpe") => (0.0, 1.0),
        _ => (0.0, (shape[0] as f32).powf(-0.5)),
    };
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| mean + std * rng.unit()).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}
