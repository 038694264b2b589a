//! What responses are made of: chat templates, finish reasons, the logprobs of completions and
//! of chat, the `attention` extension's shape, usage counts.

use super::{AttentionPlan, ChatMessage};
use crate::generation::FinishReason;
use crate::serve::engine::TokenLogprob;
use crate::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

/// A chat template (`--chat-template FILE`): a JSON object
/// `{"message": "...{role}...{content}...", "generation": "...", "stop": ["..."]}`. Each
/// message is `message` with `{role}` and `{content}` replaced, the messages are joined, then
/// `generation` (the assistant's turn) follows; `stop` (optional) is added to every request's
/// stop strings so the reply ends at the next turn.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    pub message: String,
    #[serde(default)]
    pub generation: String,
    #[serde(default)]
    pub stop: Vec<String>,
}

impl ChatTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !t.message.contains("{content}") {
            return Err("\"message\" must contain {content}".into());
        }
        if t.stop.iter().any(String::is_empty) {
            return Err("\"stop\" strings must not be empty".into());
        }
        Ok(t)
    }

    /// The prompt text of `messages`.
    pub fn render(&self, messages: &[ChatMessage]) -> String {
        let mut out: String = messages
            .iter()
            .map(|m| {
                self.message
                    .replace("{role}", &m.role)
                    .replace("{content}", &m.content)
            })
            .collect();
        out.push_str(&self.generation);
        out
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Interrupted => "stop",
    }
}

/// One choice as the engine's events build it.
#[derive(Debug, Clone, Default)]
pub struct ChoiceState {
    pub text: String,
    pub ids: Vec<u32>,
    /// Per generated token: its log-probability and alternatives.
    pub logprobs: Vec<TokenLogprob>,
    /// Per generated token, per asked layer: (n_head × keys) row-major.
    pub attention: Vec<Vec<Vec<f32>>>,
    pub finish: Option<FinishReason>,
}

/// The legacy completions `logprobs` object of `ids` (their log-probabilities `lps`; `None`
/// for a token nothing predicts), `text_offset` counted from `offset` (bytes, as OpenAI counts
/// characters of its byte-level tokens).
pub fn completion_logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    lps: &[Option<TokenLogprob>],
    offset: usize,
) -> Value {
    let piece = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let mut at = offset;
    let (mut tokens, mut token_lps, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (&id, lp) in ids.iter().zip(lps) {
        let text = piece(id);
        offsets.push(at);
        at += text.len();
        tokens.push(text);
        token_lps.push(lp.as_ref().map(|l| l.logprob));
        tops.push(lp.as_ref().map(|l| {
            l.top
                .iter()
                .map(|&(t, v)| (piece(t), json!(v)))
                .collect::<serde_json::Map<_, _>>()
        }));
    }
    json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokenizer: &Tokenizer, ids: &[u32], lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let text = tokenizer.decode(&[id]).unwrap_or_default();
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = ids
        .iter()
        .zip(lps)
        .map(|(&id, l)| {
            let mut e = entry(id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(t, v)| entry(t, v)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The `attention` of a choice: `[{"layer": l, "steps": [[head row, ...], ...]}]` as
/// `generate --attention-out F.json` writes its `layers` (each step's row per head over the
/// keys so far), kept to `plan.heads` when asked. `steps[i][j]` is token i's layer-j weights,
/// (n_head × keys) row-major.
pub fn attention_json(plan: &AttentionPlan, n_head: usize, steps: &[Vec<Vec<f32>>]) -> Value {
    let layers: Vec<Value> = plan
        .layers
        .iter()
        .enumerate()
        .map(|(j, l)| {
            let steps: Vec<Vec<&[f32]>> = steps
                .iter()
                .map(|s| {
                    let row = s.get(j).map_or(&[][..], Vec::as_slice);
                    let keys = (row.len() / n_head.max(1)).max(1);
                    row.chunks(keys)
                        .enumerate()
                        .filter(|(h, _)| plan.heads.as_ref().is_none_or(|hs| hs.contains(h)))
                        .map(|(_, r)| r)
                        .collect()
                })
                .collect();
            json!({"layer": l, "steps": steps})
        })
        .collect();
    Value::Array(layers)
}

/// `usage`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}
