//! The model's hyper-parameters, read from a Hugging Face GPT-2 `config.json` as it is on the Hub.
//!
//! Field names and defaults mirror transformers' `GPT2Config`
//! (<https://huggingface.co/docs/transformers/model_doc/gpt2#transformers.GPT2Config>), so a
//! `config.json` from any GPT-2-architecture repo deserializes as is; keys we do not use are ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The MLP non-linearity, by its transformers name (`ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GPT-2's own: the tanh approximation of GELU (`NewGELUActivation`).
    #[default]
    GeluNew,
    /// PyTorch's tanh GELU: the same formula as `gelu_new`.
    GeluPytorchTanh,
    /// Exact GELU, `x·Φ(x)` with the error function.
    Gelu,
    Relu,
}

/// GPT-2 hyper-parameters (a subset of `GPT2Config`), with transformers' defaults (GPT-2 small).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    pub vocab_size: usize,
    /// Context length: the number of learned position embeddings.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Key/value heads for grouped-query attention: each is shared by `n_head / n_kv_head` query
    /// heads (1 is multi-query). Not a `GPT2Config` field; absent (or equal to `n_head`) is GPT-2.
    pub n_kv_head: Option<usize>,
    /// MLP hidden size; `null` means `4 * n_embd`.
    pub n_inner: Option<usize>,
    pub activation_function: Activation,
    pub layer_norm_epsilon: f64,
    /// Divide attention scores by `sqrt(head_size)`.
    pub scale_attn_weights: bool,
    /// Also divide the scores of layer `i` (0-based) by `i + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// Checkpoints without `lm_head.weight` share `wte` with the LM head.
    pub tie_word_embeddings: bool,
    /// Only for encoder-decoder use; not supported, but read so that we can refuse it clearly.
    pub add_cross_attention: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_kv_head: None,
            n_inner: None,
            activation_function: Activation::GeluNew,
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: 50256,
            eos_token_id: 50256,
            tie_word_embeddings: true,
            add_cross_attention: false,
        }
    }
}

impl Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read(path)?).map_err(|e| with_path(e, path))
    }

    /// Reads a head-layout file (`--config`, `configs/*.json`): like [`Config::from_file`], but a
    /// key that neither we nor transformers' `GPT2Config` know is an error, so a typo such as
    /// `n_kv_heads` cannot silently fall back to a default. Keys starting with `_` are comments.
    pub fn from_layout_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read(path)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        let known = |k: &str| k.starts_with('_') || OUR_KEYS.contains(&k) || HF_KEYS.contains(&k);
        if let Some(key) = value.as_object().and_then(|m| m.keys().find(|k| !known(k))) {
            return Err(Error::ConfigParse {
                path: path.to_path_buf(),
                msg: format!("unknown field `{key}`"),
            });
        }
        Self::from_json(&text).map_err(|e| with_path(e, path))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::ConfigParse {
                path: "config.json".into(),
                msg: e.to_string(),
            })?;
        let config: Self =
            serde_json::from_value(value.clone()).map_err(|e| Error::ConfigParse {
                path: "config.json".into(),
                msg: e.to_string(),
            })?;
        // `n_ctx` is a legacy alias that transformers ignores; one that disagrees is a mistake.
        if let Some(n_ctx) = value.get("n_ctx").and_then(serde_json::Value::as_u64) {
            if n_ctx != config.n_positions as u64 {
                return Err(invalid(
                    "n_ctx",
                    format!("{n_ctx} contradicts n_positions ({})", config.n_positions),
                ));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks that the values can make a model; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(invalid(
                "n_head",
                format!(
                    "n_embd ({}) must be divisible by n_head ({})",
                    self.n_embd, self.n_head
                ),
            ));
        }
        match self.n_kv_head {
            Some(0) => {
                return Err(invalid(
                    "n_kv_head",
                    "must be at least 1 (or absent)".into(),
                ))
            }
            Some(kv) if !self.n_head.is_multiple_of(kv) => {
                return Err(invalid(
                    "n_kv_head",
                    format!(
                        "n_head ({}) must be a multiple of n_kv_head ({kv})",
                        self.n_head
                    ),
                ))
            }
            _ => {}
        }
        if self.n_inner == Some(0) {
            return Err(invalid("n_inner", "must be at least 1 (or null)".into()));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(invalid(
                "layer_norm_epsilon",
                format!("must be a positive number, got {}", self.layer_norm_epsilon),
            ));
        }
        if self.add_cross_attention {
            return Err(invalid(
                "add_cross_attention",
                "cross-attention (encoder-decoder GPT-2) is not supported".into(),
            ));
        }
        for (field, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return Err(invalid(
                    field,
                    format!(
                        "{id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Size of one attention head: `n_embd / n_head`.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Key/value heads: `n_kv_head`, or `n_head` (plain multi-head attention).
    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// MLP hidden size: `n_inner`, or `4 * n_embd` when it is null.
    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// The fields [`Config`] reads.
const OUR_KEYS: [&str; 15] = [
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "add_cross_attention",
];

/// Keys of transformers' `GPT2Config` / `PretrainedConfig` that a Hub `config.json` carries and
/// that do not change inference here (dropout, training and task-head settings).
const HF_KEYS: [&str; 28] = [
    "architectures",
    "model_type",
    "n_ctx",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "initializer_range",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "task_specific_params",
    "reorder_and_upcast_attn",
    "use_cache",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "gradient_checkpointing",
    "id2label",
    "label2id",
    "tokenizer_class",
    "prefix",
    "output_past",
    "n_special",
    "predict_special_tokens",
    "_name_or_path",
];

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|err| Error::io(path, err))
}

/// Puts the real file name on a parse error of [`Config::from_json`].
fn with_path(e: Error, path: &Path) -> Error {
    match e {
        Error::ConfigParse { msg, .. } => Error::ConfigParse {
            path: path.to_path_buf(),
            msg,
        },
        e => e,
    }
}

fn invalid(field: &'static str, msg: String) -> Error {
    Error::InvalidConfig { field, msg }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_gpt2_is_gpt2_small() -> Result<()> {
        let c = Config::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/gpt2.json"))?;
        assert_eq!(c, Config::default());
        assert_eq!(c.head_size(), 64);
        assert_eq!(c.inner_size(), 3072);
        Ok(())
    }

    #[test]
    fn hub_config_with_unknown_keys_parses() -> Result<()> {
        let c = Config::from_json(
            r#"{"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4, "n_layer": 2,
                "n_inner": null, "task_specific_params": {"text-generation": {"max_length": 50}},
                "activation_function": "gelu", "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 1}"#,
        )?;
        assert_eq!(c.activation_function, Activation::Gelu);
        assert_eq!(c.inner_size(), 256);
        Ok(())
    }

    #[test]
    fn layout_files_refuse_unknown_fields() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gpt2-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|err| Error::io(dir.clone(), err))?;
        let path = dir.join("layout.json");
        let write =
            |text: &str| std::fs::write(&path, text).map_err(|err| Error::io(path.clone(), err));
        write(r#"{"_comment": "ok", "n_kv_head": 4, "n_ctx": 1024, "model_type": "gpt2"}"#)?;
        assert_eq!(Config::from_layout_file(&path)?.kv_heads(), 4);
        write(r#"{"n_kv_heads": 4}"#)?;
        let err = Config::from_layout_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `n_kv_heads`"), "{err}");
        // A Hub config.json is read leniently: unknown keys are ignored.
        assert_eq!(Config::from_file(&path)?.kv_heads(), 12);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (json, field) in [
            (r#"{"n_embd": 100, "n_head": 12}"#, "n_head"),
            (r#"{"n_layer": 0}"#, "n_layer"),
            (r#"{"layer_norm_epsilon": -1}"#, "layer_norm_epsilon"),
            (r#"{"n_inner": 0}"#, "n_inner"),
            (r#"{"vocab_size": 10}"#, "bos_token_id"),
            (r#"{"n_kv_head": 5}"#, "n_kv_head"),
            (r#"{"n_kv_head": 0}"#, "n_kv_head"),
            (r#"{"n_ctx": 512}"#, "n_ctx"),
        ] {
            let err = Config::from_json(json).unwrap_err().to_string();
            assert!(err.contains(field), "{json}: {err}");
        }
        let err = Config::from_json(r#"{"activation_function": "swish"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `swish`"), "{err}");
        let err = Config::from_json(r#"{"n_embd": "big"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
    }
}
