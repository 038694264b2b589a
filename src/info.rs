//! What a layout costs: parameters per component, KV-cache bytes and FLOPs per generated token,
//! computed from the config alone (nothing is loaded).

use std::fmt;

use serde::Serialize;

use crate::config::Config;
use crate::error::{count, human_bytes, Error, Result};

/// Parameters of one block, weights and biases together, by role.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerParams {
    pub w_q: u64,
    pub w_k: u64,
    pub w_v: u64,
    pub w_o: u64,
    pub mlp: u64,
    pub layer_norms: u64,
    pub total: u64,
}

/// Parameter counts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Params {
    /// Token embeddings `wte` (also the LM head when tied).
    pub wte: u64,
    /// Position embeddings `wpe`.
    pub wpe: u64,
    /// Each of the `n_layer` blocks.
    pub per_layer: LayerParams,
    pub ln_f: u64,
    /// Everything, with the LM head tied to `wte` (transformers' `num_parameters()`).
    pub total: u64,
    /// With a separate LM head (`vocab × n_embd` more).
    pub total_untied: u64,
}

/// Bytes per dtype.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerDtype {
    pub f32: u64,
    pub f16: u64,
    pub bf16: u64,
}

impl PerDtype {
    fn of_elements(n: u64) -> Option<Self> {
        Some(Self {
            f32: n.checked_mul(4)?,
            f16: n.checked_mul(2)?,
            bf16: n.checked_mul(2)?,
        })
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
    pub flops_per_token: u64,
}

impl ModelInfo {
    /// Sizes of `config`, with FLOPs counted at context length `flops_context` (at most the
    /// model's `n_positions`: it attends to no more). A layout whose sizes do not fit 64 bits is
    /// an error, never a wrapped number.
    pub fn new(config: &Config, flops_context: usize) -> Result<Self> {
        if flops_context > config.n_positions {
            return Err(Error::param(
                "context",
                format!(
                    "{flops_context} is beyond the model's {} positions",
                    config.n_positions
                ),
            ));
        }
        Self::count(config, flops_context).ok_or_else(|| {
            Error::Input("the layout's sizes do not fit in 64 bits: check its dimensions".into())
        })
    }

    /// Every count in checked u64 arithmetic: `None` on overflow.
    fn count(config: &Config, flops_context: usize) -> Option<Self> {
        let n = |x: usize| u64::try_from(x).ok();
        let (c, hs, inner, v) = (
            n(config.n_embd)?,
            n(config.head_size())?,
            n(config.inner_size())?,
            n(config.vocab_size)?,
        );
        let (nl, nh, ctx) = (n(config.n_layer)?, n(config.n_head)?, n(flops_context)?);
        let kv = n(config.kv_heads())?.checked_mul(hs)?;
        let mul = |a: u64, b: u64| a.checked_mul(b);
        let sum = |xs: &[u64]| xs.iter().try_fold(0u64, |acc, &x| acc.checked_add(x));
        // Conv1D (in, out) weights plus their biases.
        let linear = |d_in: u64, d_out: u64| mul(d_in, d_out)?.checked_add(d_out);
        let per_layer = {
            let (w_q, w_k, w_v, w_o) =
                (linear(c, c)?, linear(c, kv)?, linear(c, kv)?, linear(c, c)?);
            let mlp = linear(c, inner)?.checked_add(linear(inner, c)?)?;
            let layer_norms = mul(4, c)?;
            LayerParams {
                w_q,
                w_k,
                w_v,
                w_o,
                mlp,
                layer_norms,
                total: sum(&[w_q, w_k, w_v, w_o, mlp, layer_norms])?,
            }
        };
        let (wte, wpe, ln_f) = (mul(v, c)?, mul(n(config.n_positions)?, c)?, mul(2, c)?);
        let total = sum(&[wte, wpe, mul(nl, per_layer.total)?, ln_f])?;
        let kv_per_token = mul(mul(2, nl)?, kv)?;
        let per_layer_matmul = sum(&[
            mul(mul(c, c)?, 2)?,
            mul(mul(2, c)?, kv)?,
            mul(mul(2, c)?, inner)?,
        ])?;
        let matmul_weights = mul(nl, per_layer_matmul)?.checked_add(wte)?;
        // Q·Kᵀ and P·V: each n_head · hs · context multiply-adds per layer.
        let attention = mul(mul(mul(mul(nl, 2)?, nh)?, hs)?, ctx)?;
        Some(Self {
            n_embd: config.n_embd,
            n_layer: config.n_layer,
            n_head: config.n_head,
            head_size: config.head_size(),
            n_kv_head: config.kv_heads(),
            group_size: config.n_head / config.kv_heads(),
            n_inner: config.inner_size(),
            vocab_size: config.vocab_size,
            context: config.n_positions,
            params: Params {
                wte,
                wpe,
                per_layer,
                ln_f,
                total,
                total_untied: total.checked_add(wte)?,
            },
            kv_cache_bytes_per_token: PerDtype::of_elements(kv_per_token)?,
            kv_cache_bytes_full_context: PerDtype::of_elements(mul(
                kv_per_token,
                n(config.n_positions)?,
            )?)?,
            flops_context,
            flops_per_token: mul(2, matmul_weights.checked_add(attention)?)?,
        })
    }

    /// The report `gpt2 info` prints, headed by `name`.
    pub fn report<'a>(&'a self, name: &'a str) -> InfoReport<'a> {
        InfoReport { info: self, name }
    }
}

/// [`ModelInfo`] as text, in the layout of `gpt2 info`.
pub struct InfoReport<'a> {
    info: &'a ModelInfo,
    name: &'a str,
}

impl fmt::Display for InfoReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (i, name) = (self.info, self.name);
        let (p, l) = (&i.params, &i.params.per_layer);
        let bytes = |b: &PerDtype| {
            format!(
                "{} f32, {} f16/bf16",
                human_bytes(b.f32.into()),
                human_bytes(b.f16.into())
            )
        };
        writeln!(f, "{name}")?;
        writeln!(
            f,
            "  dims          {} = {} x {}; {} ({} each)",
            i.n_embd,
            count(i.n_head, "head"),
            i.head_size,
            count(i.n_kv_head, "key/value head"),
            count(i.group_size, "query head")
        )?;
        writeln!(
            f,
            "  layers        {}, MLP {} wide, context {} positions, vocabulary {}",
            i.n_layer, i.n_inner, i.context, i.vocab_size
        )?;
        writeln!(
            f,
            "parameters      {} (LM head tied to wte); {} with a separate head",
            thousands(p.total),
            thousands(p.total_untied)
        )?;
        writeln!(
            f,
            "  embeddings    wte {}, wpe {}",
            thousands(p.wte),
            thousands(p.wpe)
        )?;
        writeln!(
            f,
            "  per layer     {} = W_q {}, W_k {}, W_v {}, W_o {}, MLP {}, layer norms {}",
            thousands(l.total),
            thousands(l.w_q),
            thousands(l.w_k),
            thousands(l.w_v),
            thousands(l.w_o),
            thousands(l.mlp),
            thousands(l.layer_norms)
        )?;
        writeln!(f, "  ln_f          {}", thousands(p.ln_f))?;
        writeln!(
            f,
            "KV cache        {} per token; {} at {} tokens",
            bytes(&i.kv_cache_bytes_per_token),
            bytes(&i.kv_cache_bytes_full_context),
            i.context
        )?;
        writeln!(
            f,
            "FLOPs           {} per generated token at context {}",
            human_flops(i.flops_per_token),
            i.flops_context
        )
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_flops(n: u64) -> String {
    let v = n as f64;
    match v {
        v if v >= 1e12 => format!("{:.2} TFLOP", v / 1e12),
        v if v >= 1e9 => format!("{:.2} GFLOP", v / 1e9),
        v => format!("{:.2} MFLOP", v / 1e6),
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
    fn parameter_counts_equal_transformers() -> Result<()> {
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
                ModelInfo::new(&layout(name), 1)?.params.total,
                want,
                "{name}"
            );
        }
        Ok(())
    }

    #[test]
    fn grouped_query_attention_shrinks_k_v_and_the_cache() -> Result<()> {
        let mha = ModelInfo::new(&layout("gpt2"), 1024)?;
        let mqa = ModelInfo::new(&layout("gpt2-mqa"), 1024)?;
        assert_eq!(mqa.params.per_layer.w_k, 768 * 64 + 64);
        assert_eq!(
            mha.kv_cache_bytes_per_token.f32,
            12 * mqa.kv_cache_bytes_per_token.f32
        );
        // GPT-2 small: 2 x 12 layers x 768 x 4 bytes = 72 KiB per token, 72 MiB at 1024.
        assert_eq!(mha.kv_cache_bytes_per_token.f32, 73_728);
        assert_eq!(mha.kv_cache_bytes_full_context.f16, 1024 * 73_728 / 2);
        let gqa = ModelInfo::new(&layout("llama-2-70b-heads"), 4096)?;
        assert_eq!((gqa.n_kv_head, gqa.group_size, gqa.head_size), (8, 8, 128));
        Ok(())
    }

    #[test]
    fn flops_are_twice_the_weights_plus_attention() -> Result<()> {
        let i = ModelInfo::new(&layout("gpt2"), 0)?;
        // At context 0: 2 x (85M matmul weights + the 38.6M-entry head).
        assert_eq!(
            i.flops_per_token,
            2 * (12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768)
        );
        let j = ModelInfo::new(&layout("gpt2"), 1024)?;
        assert_eq!(
            j.flops_per_token - i.flops_per_token,
            2 * 12 * 2 * 768 * 1024
        );
        Ok(())
    }
}
