//! The OpenAI API's shapes: requests as serde types, checked and turned into engine [`Job`]s
//! ([`CompletionRequest::plan`]), the responses and stream chunks built from the engine's events,
//! and every error as OpenAI's `{"error": {"message", "type", "param", "code"}}` ([`ApiError`]).
//!
//! Nothing here touches the network: `http/` reads bodies and writes what this builds.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::analysis::ablation::{parse_heads, AblateMode};
use crate::config::Config;
use crate::error::Error;
use crate::generation::{GenerateParams, SamplingParams};
use crate::prompt::{Prompt, PromptOptions};
use crate::tokenizer::Tokenizer;

use crate::serve::engine::{Job, Penalties, Rejected};

mod render;

pub use render::{
    attention_json, chat_logprobs, completion_logprobs, finish_reason, usage, ChatTemplate,
    ChoiceState,
};

/// Top alternatives a request may ask for with `logprobs` (OpenAI allows 5 for completions, 20
/// for chat; 20 for both here: each costs one sort of the vocabulary per token).
pub const MAX_LOGPROBS: usize = 20;
/// Stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// An error as the OpenAI API writes it, with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param` (None: the request as a whole).
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// `{"error": {...}}`.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// A library error, its parameter renamed to the API's (`max_new_tokens` is `max_tokens`).
    pub fn from_lib(e: Error) -> Self {
        match e {
            Error::Param { param, msg } => {
                let name = api_param(param);
                Self::invalid(Some(name), format!("{name} {msg}"))
            }
            Error::EmptyPrompt => Self::invalid(Some("prompt"), e.to_string()),
            Error::PromptTooLong { .. } => {
                Self::invalid(Some("prompt"), e.to_string()).with_code("context_length_exceeded")
            }
            Error::Input(msg) | Error::Tokenizer(msg) => Self::invalid(None, msg),
            e @ Error::OutOfMemory { .. } => {
                Self::new(503, "server_error", e.to_string()).with_code("out_of_memory")
            }
            e => Self::new(500, "server_error", e.to_string()),
        }
    }

    pub fn from_rejected(r: Rejected) -> Self {
        match r {
            Rejected::QueueFull { .. } => {
                Self::new(429, "rate_limit_error", r.to_string()).with_code("queue_full")
            }
            Rejected::ShuttingDown => {
                Self::new(503, "server_error", r.to_string()).with_code("shutting_down")
            }
            Rejected::TooManyChoices { .. } => Self::invalid(Some("n"), r.to_string()),
        }
    }
}

/// The API's name for a library parameter.
fn api_param(param: &str) -> &str {
    match param {
        "max_new_tokens" => "max_tokens",
        "num_samples" => "n",
        "attention_out" | "layer" => "attention",
        "ablate-mode" => "ablate_mode",
        p => p,
    }
}

/// `prompt`: a text, several texts, token ids, or several lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

/// `attention.layers`: `"all"` or a list of layers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LayersInput {
    Named(String),
    List(Vec<usize>),
}

/// The `attention` extension.
#[derive(Debug, Clone, Deserialize)]
pub struct AttentionRequest {
    pub layers: LayersInput,
    #[serde(default)]
    pub heads: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// What `/v1/completions` and `/v1/chat/completions` share. Unknown fields are ignored (as
/// OpenAI does); a field of the wrong type fails the request, naming it (see `http/`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CompletionRequest {
    pub prompt: Option<PromptInput>,
    /// Signed so that a negative value gets a message, not a type error.
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for max_tokens.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Completions: the number of alternatives (0..=MAX_LOGPROBS). Chat: see `ChatRequest`.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<usize>,
    pub ignore_eos: Option<bool>,
    pub attention: Option<AttentionRequest>,
    pub ablate: Option<Vec<String>>,
    pub ablate_mode: Option<String>,
    /// The chat API's messages (only with `--chat-template`).
    pub messages: Option<Vec<ChatMessage>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The `attention` extension, checked: layers ascending, heads kept (all when `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    pub layers: Vec<usize>,
    pub heads: Option<Vec<usize>>,
}

/// One prompt of a request: its engine job and what the response echoes of it.
#[derive(Debug, Clone)]
pub struct PlannedPrompt {
    pub job: Job,
    /// The prompt as text (the request's text, or the ids decoded).
    pub text: String,
}

/// A checked request: one job per prompt, each with `n` choices.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prompts: Vec<PlannedPrompt>,
    pub n: usize,
    /// 0 only with echo: nothing is generated.
    pub max_tokens: usize,
    pub echo: bool,
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub attention: Option<AttentionPlan>,
    pub seed: u64,
}

impl Plan {
    /// Choices in the response: `n` per prompt, prompt-major (choice `p * n + c`).
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}

/// Which endpoint a request came to (they read `logprobs` differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

fn int_in(param: &str, v: i64, lo: i64, hi: i64) -> Result<usize, ApiError> {
    if v < lo || v > hi {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v as usize)
}

fn float_in(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if !(v >= lo && v <= hi) {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

impl CompletionRequest {
    /// Checks the request against the model and makes its jobs. `chat_prompt`: a chat's rendered
    /// text and its template's stop strings (None: the prompts come from `prompt`);
    /// `random_seed` is used when `seed` is absent.
    pub fn plan(
        &self,
        endpoint: Endpoint,
        tokenizer: &Tokenizer,
        config: &Config,
        chat_prompt: Option<(String, Vec<String>)>,
        random_seed: u64,
    ) -> Result<Plan, ApiError> {
        let ctx = config.n_positions;
        // Prompts, tokenised exactly as `gpt2 generate --prompt TEXT` does.
        let text_prompt = |text: &str| -> Result<(Vec<u32>, String), ApiError> {
            let opts = PromptOptions {
                bos: false,
                truncate: false,
                empty_is_bos: true,
            };
            let p = Prompt::new(tokenizer, text, config, opts).map_err(ApiError::from_lib)?;
            Ok((p.ids, text.to_string()))
        };
        let id_prompt = |ids: &[u32]| -> Result<(Vec<u32>, String), ApiError> {
            let p = Prompt::from_ids(ids.to_vec(), config).map_err(|e| match e {
                Error::Input(msg) => ApiError::invalid(Some("prompt"), msg),
                e => ApiError::from_lib(e),
            })?;
            let text = tokenizer.decode(&p.ids).map_err(ApiError::from_lib)?;
            Ok((p.ids, text))
        };
        let mut extra_stop = Vec::new();
        let prompts: Vec<(Vec<u32>, String)> = match (&chat_prompt, &self.prompt) {
            (Some((text, stop)), _) => {
                extra_stop.clone_from(stop);
                vec![text_prompt(text)?]
            }
            (None, None) => return Err(ApiError::invalid(Some("prompt"), "prompt is required")),
            (None, Some(PromptInput::Text(t))) => vec![text_prompt(t)?],
            (None, Some(PromptInput::Texts(ts))) => ts
                .iter()
                .map(|t| text_prompt(t))
                .collect::<Result<_, _>>()?,
            (None, Some(PromptInput::Ids(ids))) => vec![id_prompt(ids)?],
            (None, Some(PromptInput::IdLists(l))) => l
                .iter()
                .map(|ids| id_prompt(ids))
                .collect::<Result<_, _>>()?,
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid(Some("prompt"), "prompt is an empty list"));
        }
        // Chat has no echo: its reply is the message alone.
        let echo = endpoint == Endpoint::Completions && self.echo.unwrap_or(false);
        let max_tokens = match (self.max_tokens, self.max_completion_tokens, endpoint) {
            (Some(v), _, _) => int_in("max_tokens", v, 0, ctx as i64)?,
            (None, Some(v), _) => int_in("max_completion_tokens", v, 0, ctx as i64)?,
            (None, None, Endpoint::Completions) => 16,
            // Chat: up to the end of the context (the longest prompt's).
            (None, None, Endpoint::Chat) => {
                let longest = prompts.iter().map(|p| p.0.len()).max().unwrap_or(0);
                ctx.saturating_sub(longest).max(1)
            }
        };
        if max_tokens == 0 && !echo {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "max_tokens must be at least 1 (0 only with echo)",
            ));
        }
        let n = match self.n {
            Some(n) => int_in("n", n, 1, 128)?,
            None => 1,
        };
        let logprobs = match (endpoint, &self.logprobs) {
            (_, None | Some(Value::Null)) => None,
            (Endpoint::Completions, Some(Value::Number(v))) if v.is_i64() || v.is_u64() => {
                let v = v.as_i64().unwrap_or(i64::MAX);
                Some(int_in("logprobs", v, 0, MAX_LOGPROBS as i64)?)
            }
            (Endpoint::Chat, Some(Value::Bool(b))) => match (b, self.top_logprobs) {
                (false, _) => None,
                (true, None) => Some(0),
                (true, Some(k)) => Some(int_in("top_logprobs", k, 0, MAX_LOGPROBS as i64)?),
            },
            (Endpoint::Completions, Some(_)) => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    "logprobs must be an integer",
                ))
            }
            (Endpoint::Chat, Some(_)) => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    "logprobs must be a boolean",
                ))
            }
        };
        let mut stop = match &self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("stop takes at most {MAX_STOP} strings"),
            ));
        }
        stop.extend(extra_stop);
        let top_k = match self.top_k {
            // 0 (llama-server's "off") and absent (OpenAI): every token.
            None | Some(0) => None,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    "top_k must be at least 0 (0: every token)",
                ))
            }
            Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        };
        let seed = self.seed.unwrap_or(random_seed);
        let params = GenerateParams {
            // The engine generates at least one token; with max_tokens 0 (echo) it is dropped.
            max_new_tokens: max_tokens.max(1),
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_k,
                top_p: self.top_p,
                repeat_penalty: self.repeat_penalty.unwrap_or(1.0),
                repeat_last_n: self.repeat_last_n.unwrap_or(64),
                seed,
            },
            stop,
            stop_at_eos: !self.ignore_eos.unwrap_or(false),
            num_samples: n,
        };
        params.validate().map_err(ApiError::from_lib)?;
        let penalties = Penalties {
            presence: float_in(
                "presence_penalty",
                self.presence_penalty.unwrap_or(0.0),
                -2.0,
                2.0,
            )?,
            frequency: float_in(
                "frequency_penalty",
                self.frequency_penalty.unwrap_or(0.0),
                -2.0,
                2.0,
            )?,
            logit_bias: self.logit_bias(config)?,
        };
        let attention = self.attention_plan(config)?;
        if attention.is_some() {
            let longest = prompts.iter().map(|p| p.0.len()).max().unwrap_or(0);
            if longest + max_tokens > ctx {
                return Err(ApiError::invalid(
                    Some("attention"),
                    format!(
                        "attention needs the whole completion inside the context: {longest} \
                         prompt tokens + {max_tokens} max_tokens > {ctx}"
                    ),
                ));
            }
        }
        let ablate = self.ablate_plan(config)?;
        let prompts = prompts
            .into_iter()
            .map(|(ids, text)| PlannedPrompt {
                job: Job {
                    prompt: ids,
                    params: params.clone(),
                    penalties: penalties.clone(),
                    logprobs,
                    prompt_logprobs: echo && logprobs.is_some(),
                    attention: attention.as_ref().map(|a| a.layers.clone()),
                    ablate: ablate.clone(),
                },
                text,
            })
            .collect();
        Ok(Plan {
            prompts,
            n,
            max_tokens,
            echo,
            logprobs,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            attention,
            seed,
        })
    }

    fn logit_bias(&self, config: &Config) -> Result<Vec<(u32, f32)>, ApiError> {
        let mut out = Vec::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < config.vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("logit_bias"),
                        format!(
                            "logit_bias key {k:?} is not a token id below {}",
                            config.vocab_size
                        ),
                    )
                })?;
            out.push((id, float_in("logit_bias", *v, -100.0, 100.0)?));
        }
        out.sort_by_key(|b| b.0);
        Ok(out)
    }

    fn attention_plan(&self, config: &Config) -> Result<Option<AttentionPlan>, ApiError> {
        let Some(a) = &self.attention else {
            return Ok(None);
        };
        let bad = |msg: String| ApiError::invalid(Some("attention"), msg);
        let mut layers = match &a.layers {
            LayersInput::Named(s) if s == "all" => (0..config.n_layer).collect(),
            LayersInput::Named(s) => {
                return Err(bad(format!(
                    "attention.layers must be \"all\" or a list of layers, got {s:?}"
                )))
            }
            LayersInput::List(l) => l.clone(),
        };
        layers.sort_unstable();
        layers.dedup();
        if layers.is_empty() {
            return Err(bad("attention.layers is empty".into()));
        }
        if let Some(l) = layers.iter().find(|&&l| l >= config.n_layer) {
            return Err(bad(format!(
                "attention layer {l} is out of range: the model has {} layers (0-based)",
                config.n_layer
            )));
        }
        let heads = match &a.heads {
            None => None,
            Some(h) => {
                let mut h = h.clone();
                h.sort_unstable();
                h.dedup();
                if let Some(x) = h.iter().find(|&&x| x >= config.n_head) {
                    return Err(bad(format!(
                        "attention head {x} is out of range: the model has {} heads (0-based)",
                        config.n_head
                    )));
                }
                Some(h)
            }
        };
        Ok(Some(AttentionPlan { layers, heads }))
    }

    fn ablate_plan(
        &self,
        config: &Config,
    ) -> Result<Option<(Vec<crate::analysis::ablation::HeadId>, AblateMode)>, ApiError> {
        let mode = match &self.ablate_mode {
            None => AblateMode::default(),
            Some(m) => m.parse().map_err(ApiError::from_lib)?,
        };
        let Some(list) = self.ablate.as_ref().filter(|l| !l.is_empty()) else {
            return Ok(None);
        };
        let heads = parse_heads(&list.join(",")).map_err(ApiError::from_lib)?;
        if let Some(h) = heads
            .iter()
            .find(|h| h.layer >= config.n_layer || h.head >= config.n_head)
        {
            return Err(ApiError::invalid(
                Some("ablate"),
                format!(
                    "head {}.{} is out of range: the model has {} layers of {} heads (0-based)",
                    h.layer, h.head, config.n_layer, config.n_head
                ),
            ));
        }
        Ok(Some((heads, mode)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny"))
            .expect("the tiny fixture's tokenizer")
    }

    fn config() -> Config {
        crate::model::tiny_config(512, 64, 2)
    }

    fn plan(body: Value) -> Result<Plan, ApiError> {
        let req: CompletionRequest =
            serde_json::from_value(body).map_err(|e| ApiError::invalid(None, e.to_string()))?;
        req.plan(Endpoint::Completions, &tokenizer(), &config(), None, 7)
    }

    #[test]
    fn a_request_becomes_one_job_per_prompt_with_the_cli_s_ids() {
        let tok = tokenizer();
        let p =
            plan(json!({"prompt": ["Hello world", ""], "n": 2, "max_tokens": 5})).expect("valid");
        assert_eq!(p.choices(), 4);
        let want = Prompt::new(
            &tok,
            "Hello world",
            &config(),
            PromptOptions {
                empty_is_bos: true,
                ..PromptOptions::default()
            },
        )
        .expect("tokenises")
        .ids;
        assert_eq!(p.prompts[0].job.prompt, want);
        // An empty prompt is <|endoftext|> alone, as in `generate`.
        assert_eq!(p.prompts[1].job.prompt.len(), 1);
        assert_eq!(p.prompts[0].job.params.num_samples, 2);
        assert_eq!(
            p.prompts[0].job.params.sampling.seed, 7,
            "the random seed when absent"
        );
        assert_eq!(
            p.prompts[0].job.params.sampling.top_k, None,
            "OpenAI: every token"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (body, param) in [
            (json!({"prompt": "a", "max_tokens": -1}), "max_tokens"),
            (
                json!({"prompt": "a", "max_tokens": 1_000_000}),
                "max_tokens",
            ),
            (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
            (json!({"prompt": "a", "n": 0}), "n"),
            (json!({"prompt": "a", "n": 1000}), "n"),
            (json!({"prompt": "a", "temperature": -1}), "temperature"),
            (json!({"prompt": "a", "top_p": 0}), "top_p"),
            (json!({"prompt": "a", "top_k": -3}), "top_k"),
            (json!({"prompt": "a", "logprobs": 99}), "logprobs"),
            (
                json!({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}),
                "stop",
            ),
            (json!({"prompt": "a", "stop": ""}), "stop"),
            (
                json!({"prompt": "a", "presence_penalty": 3}),
                "presence_penalty",
            ),
            (json!({"prompt": "a", "logit_bias": {"x": 1}}), "logit_bias"),
            (
                json!({"prompt": "a", "logit_bias": {"5": 101}}),
                "logit_bias",
            ),
            (
                json!({"prompt": "a", "attention": {"layers": [9]}}),
                "attention",
            ),
            (
                json!({"prompt": "a", "attention": {"layers": "some"}}),
                "attention",
            ),
            (
                json!({"prompt": "a", "attention": {"layers": [0], "heads": [4]}}),
                "attention",
            ),
            (json!({"prompt": "a", "ablate": ["7.0"]}), "ablate"),
            (json!({"prompt": "a", "ablate": ["x"]}), "ablate"),
            (json!({"prompt": "a", "ablate_mode": "half"}), "ablate_mode"),
            (json!({"prompt": [99999]}), "prompt"),
            (json!({"prompt": []}), "prompt"),
            (json!({"prompt": "a ".repeat(200)}), "prompt"),
            (json!({}), "prompt"),
        ] {
            let e = plan(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }

    #[test]
    fn echo_allows_zero_tokens_and_asks_prompt_logprobs() {
        let p = plan(json!({"prompt": [1, 2, 3], "max_tokens": 0, "echo": true, "logprobs": 2}))
            .expect("valid");
        assert_eq!(p.max_tokens, 0);
        assert!(p.prompts[0].job.prompt_logprobs);
        assert_eq!(p.logprobs, Some(2));
    }

    #[test]
    fn attention_rows_split_per_head_and_keep_the_asked_heads() {
        let plan = AttentionPlan {
            layers: vec![1],
            heads: Some(vec![1]),
        };
        // One token, one layer, 2 heads over 3 keys.
        let steps = vec![vec![vec![0.1, 0.2, 0.7, 0.3, 0.3, 0.4]]];
        let v = attention_json(&plan, 2, &steps);
        assert_eq!(
            v,
            json!([{"layer": 1, "steps": [[[0.3f32, 0.3f32, 0.4f32]]]}])
        );
    }

    #[test]
    fn a_chat_template_renders_messages_then_the_generation_prompt() {
        let t = ChatTemplate::parse(
            r#"{"message": "{role}: {content}\n", "generation": "assistant:", "stop": ["\nuser:"]}"#,
        )
        .expect("valid");
        let m = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            t.render(&[m("system", "Be brief."), m("user", "Hi")]),
            "system: Be brief.\nuser: Hi\nassistant:"
        );
        assert!(ChatTemplate::parse(r#"{"message": "{role}"}"#).is_err());
    }
}
