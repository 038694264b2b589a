//! What a layout costs: parameters per component, KV-cache bytes and FLOPs per generated token,
//! computed from the config alone (nothing is loaded).

use serde::Serialize;

use crate::config::Config;

/// Parameters of one block, weights and biases together, by role.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerParams {
    pub w_q: usize,
    pub w_k: usize,
    pub w_v: usize,
    pub w_o: usize,
    pub mlp: usize,
    pub layer_norms: usize,
    pub total: usize,
}

/// Parameter counts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Params {
    /// Token embeddings `wte` (also the LM head when tied).
    pub wte: usize,
    /// Position embeddings `wpe`.
    pub wpe: usize,
    /// Each of the `n_layer` blocks.
    pub per_layer: LayerParams,
    pub ln_f: usize,
    /// Everything, with the LM head tied to `wte` (transformers' `num_parameters()`).
    pub total: usize,
    /// With a separate LM head (`vocab × n_embd` more).
    pub total_untied: usize,
}

/// Bytes per dtype.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerDtype {
    pub f32: usize,
    pub f16: usize,
    pub bf16: usize,
}

impl PerDtype {
    fn of_elements(n: usize) -> Self {
        Self {
            f32: 4 * n,
            f16: 2 * n,
            bf16: 2 * n,
        }
    }
}

/// A layout's sizes and costs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelInfo {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub head_size: usize,
    pub n_kv_head: usize,
    /// Query heads per key/value head.
    pub group_size: usize,
    pub n_inner: usize,
    pub vocab_size: usize,
    pub context: usize,
    pub params: Params,
    /// Keys and values of every layer for one token.
    pub kv_cache_bytes_per_token: PerDtype,
    /// For `context` tokens, one sequence.
    pub kv_cache_bytes_full_context: PerDtype,
    /// The context length the FLOPs are counted at.
    pub flops_context: usize,
    /// Multiply-adds × 2 to generate one token when `flops_context` tokens precede it:
    /// every weight matrix once, attention over the context, and the LM head.
    pub flops_per_token: usize,
}

impl ModelInfo {
    /// Sizes of `config`, with FLOPs counted at context length `flops_context`.
    pub fn new(config: &Config, flops_context: usize) -> Self {
        let (c, hs, inner, v) = (
            config.n_embd,
            config.head_size(),
            config.inner_size(),
            config.vocab_size,
        );
        let (nl, kv) = (config.n_layer, config.kv_heads() * hs);
        // Conv1D (in, out) weights plus their biases.
        let linear = |d_in: usize, d_out: usize| d_in * d_out + d_out;
        let per_layer = {
            let (w_q, w_k, w_v, w_o) = (linear(c, c), linear(c, kv), linear(c, kv), linear(c, c));
            let mlp = linear(c, inner) + linear(inner, c);
            let layer_norms = 2 * 2 * c;
            LayerParams {
                w_q,
                w_k,
                w_v,
                w_o,
                mlp,
                layer_norms,
                total: w_q + w_k + w_v + w_o + mlp + layer_norms,
            }
        };
        let (wte, wpe, ln_f) = (v * c, config.n_positions * c, 2 * c);
        let total = wte + wpe + nl * per_layer.total + ln_f;
        let kv_per_token = 2 * nl * kv;
        let matmul_weights = nl * (c * c * 2 + 2 * c * kv + 2 * c * inner) + v * c;
        // Q·Kᵀ and P·V: each n_head · hs · context multiply-adds per layer.
        let attention = nl * 2 * config.n_head * hs * flops_context;
        Self {
            n_embd: c,
            n_layer: nl,
            n_head: config.n_head,
            head_size: hs,
            n_kv_head: config.kv_heads(),
            group_size: config.n_head / config.kv_heads(),
            n_inner: inner,
            vocab_size: v,
            context: config.n_positions,
            params: Params {
                wte,
                wpe,
                per_layer,
                ln_f,
                total,
                total_untied: total + v * c,
            },
            kv_cache_bytes_per_token: PerDtype::of_elements(kv_per_token),
            kv_cache_bytes_full_context: PerDtype::of_elements(kv_per_token * config.n_positions),
            flops_context,
            flops_per_token: 2 * (matmul_weights + attention),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(name: &str) -> Config {
        let path = format!("{}/configs/{name}.json", env!("CARGO_MANIFEST_DIR"));
        match Config::from_layout_file(&path) {
            Ok(c) => c,
            Err(e) => panic!("{path}: {e}"),
        }
    }

    #[test]
    fn parameter_counts_equal_transformers() {
        // GPT2LMHeadModel(config).num_parameters() in transformers 5.23 (tied head).
        for (name, want) in [
            ("gpt2", 124_439_808),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
            ("distilgpt2", 81_912_576),
            ("llama-7b-heads", 5_182_554_112),
            ("tiny", 141_056),
        ] {
            assert_eq!(
                ModelInfo::new(&layout(name), 1).params.total,
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn grouped_query_attention_shrinks_k_v_and_the_cache() {
        let mha = ModelInfo::new(&layout("gpt2"), 1024);
        let mqa = ModelInfo::new(&layout("gpt2-mqa"), 1024);
        assert_eq!(mqa.params.per_layer.w_k, 768 * 64 + 64);
        assert_eq!(
            mha.kv_cache_bytes_per_token.f32,
            12 * mqa.kv_cache_bytes_per_token.f32
        );
        // GPT-2 small: 2 x 12 layers x 768 x 4 bytes = 72 KiB per token, 72 MiB at 1024.
        assert_eq!(mha.kv_cache_bytes_per_token.f32, 73_728);
        assert_eq!(mha.kv_cache_bytes_full_context.f16, 1024 * 73_728 / 2);
        let gqa = ModelInfo::new(&layout("llama-2-70b-heads"), 4096);
        assert_eq!((gqa.n_kv_head, gqa.group_size, gqa.head_size), (8, 8, 128));
    }

    #[test]
    fn flops_are_twice_the_weights_plus_attention() {
        let i = ModelInfo::new(&layout("gpt2"), 0);
        // At context 0: 2 x (85M matmul weights + the 38.6M-entry head).
        assert_eq!(
            i.flops_per_token,
            2 * (12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768)
        );
        let j = ModelInfo::new(&layout("gpt2"), 1024);
        assert_eq!(
            j.flops_per_token - i.flops_per_token,
            2 * 12 * 2 * 768 * 1024
        );
    }
}
