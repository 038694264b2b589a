//! The completion endpoints: a request checked into jobs, submitted, and answered whole or as a
//! stream of server-sent events.

use crate::serve::api::{self, ApiError, ChoiceState, CompletionRequest, Endpoint, Plan};
use crate::serve::engine::{Engine, Event, TokenLogprob};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use super::{error, parse, App};

pub(super) async fn completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete(app, body, Endpoint::Completions)
        .await
        .unwrap_or_else(|e| error(&e))
}

pub(super) async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete(app, body, Endpoint::Chat)
        .await
        .unwrap_or_else(|e| error(&e))
}

/// What every response of one request shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    n_head: usize,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, choices: Value, chunk: bool) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

async fn complete(
    app: Arc<App>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&app, body)?;
    let chat = match endpoint {
        Endpoint::Completions => None,
        Endpoint::Chat => {
            let template = app.opts.chat_template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    None,
                    "GPT-2 has no chat template: use /v1/completions, or start the server with \
                     --chat-template FILE",
                )
                .with_code("chat_template_missing")
            })?;
            let messages = req
                .messages
                .as_deref()
                .filter(|m| !m.is_empty())
                .ok_or_else(|| ApiError::invalid(Some("messages"), "messages is required"))?;
            Some((template.render(messages), template.stop.clone()))
        }
    };
    let nonce = app.next();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let random_seed = nanos ^ nonce.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let engine = &app.engine;
    let plan = req.plan(
        endpoint,
        engine.tokenizer(),
        engine.config(),
        chat,
        random_seed,
    )?;
    let meta = Meta {
        id: match endpoint {
            Endpoint::Completions => format!("cmpl-{nonce:x}{created:x}"),
            Endpoint::Chat => format!("chatcmpl-{nonce:x}{created:x}"),
        },
        created,
        model: engine.name().to_string(),
        endpoint,
        n_head: engine.config().n_head,
    };
    let events = submit(engine, &plan)?;
    if plan.stream {
        Ok(stream(app.clone(), plan, events, meta))
    } else {
        Ok(Json(collect(&app, &plan, events, &meta).await?).into_response())
    }
}

/// Submits every prompt's job; their events arrive on one channel tagged with the prompt's
/// index. A job refused drops those already queued (their receivers close: cancelled); dropping
/// the returned receiver cancels them all.
fn submit(engine: &Engine, plan: &Plan) -> Result<mpsc::Receiver<(usize, Event)>, ApiError> {
    let mut receivers = Vec::with_capacity(plan.prompts.len());
    for p in &plan.prompts {
        receivers.push(
            engine
                .submit(p.job.clone())
                .map_err(ApiError::from_rejected)?,
        );
    }
    let (tx, rx) = mpsc::channel(64);
    for (i, mut events) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    e = events.recv() => match e {
                        Some(e) => if tx.send((i, e)).await.is_err() { break },
                        None => break,
                    },
                    () = tx.closed() => break,
                }
            }
        });
    }
    Ok(rx)
}

async fn collect(
    app: &App,
    plan: &Plan,
    mut events: mpsc::Receiver<(usize, Event)>,
    meta: &Meta,
) -> Result<Value, ApiError> {
    let mut choices = vec![ChoiceState::default(); plan.choices()];
    let mut prompt_lps = vec![None; plan.prompts.len()];
    while let Some((p, e)) = events.recv().await {
        match e {
            Event::Prompt(lps) => prompt_lps[p] = Some(lps),
            Event::Token(t) => {
                if plan.max_tokens > 0 {
                    let c = &mut choices[p * plan.n + t.choice];
                    c.text.push_str(&t.text);
                    c.ids.push(t.id);
                    c.logprobs.extend(t.logprob);
                    c.attention.extend(t.attention);
                }
            }
            Event::Done { choice, reason } => {
                choices[p * plan.n + choice].finish = Some(if plan.max_tokens == 0 {
                    crate::generation::FinishReason::Length
                } else {
                    reason
                });
            }
            Event::Failed(e) => return Err(failure(app, e)),
        }
    }
    if let Some(i) = choices.iter().position(|c| c.finish.is_none()) {
        return Err(ApiError::new(
            500,
            "server_error",
            format!("choice {i} ended without a reason"),
        ));
    }
    let tokenizer = app.engine.tokenizer();
    let mut out = Vec::with_capacity(choices.len());
    for (i, c) in choices.iter().enumerate() {
        let prompt = &plan.prompts[i / plan.n];
        let mut v = match meta.endpoint {
            Endpoint::Completions => {
                let text = if plan.echo {
                    format!("{}{}", prompt.text, c.text)
                } else {
                    c.text.clone()
                };
                let logprobs = plan.logprobs.map(|_| {
                    let mut ids = Vec::new();
                    let mut lps = Vec::new();
                    if plan.echo {
                        ids.extend(&prompt.job.prompt);
                        lps.extend(prompt_lps[i / plan.n].clone().unwrap_or_default());
                    }
                    ids.extend(&c.ids);
                    lps.extend(c.logprobs.iter().cloned().map(Some));
                    let offset = if plan.echo { 0 } else { prompt.text.len() };
                    api::completion_logprobs(tokenizer, &ids, &lps, offset)
                });
                json!({"index": i, "text": text, "logprobs": logprobs})
            }
            Endpoint::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": plan.logprobs.map(|_| api::chat_logprobs(tokenizer, &c.ids, &c.logprobs)),
            }),
        };
        v["finish_reason"] = json!(c.finish.map(api::finish_reason));
        if let Some(a) = &plan.attention {
            v["attention"] = api::attention_json(a, meta.n_head, &c.attention);
        }
        out.push(v);
    }
    let prompt_tokens: usize = plan.prompts.iter().map(|p| p.job.prompt.len()).sum();
    let completion_tokens: usize = choices.iter().map(|c| c.ids.len()).sum();
    let mut body = meta.wrap(Value::Array(out), false);
    body["usage"] = api::usage(prompt_tokens, completion_tokens);
    Ok(body)
}

/// A job's failure: cancelled by the shutdown (503), or its own error.
fn failure(app: &App, e: crate::error::Error) -> ApiError {
    if app.stopping.load(Ordering::SeqCst) {
        ApiError::new(503, "server_error", e.to_string()).with_code("shutting_down")
    } else {
        ApiError::from_lib(e)
    }
}

/// A server-sent event.
fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The streamed response: its headers now, then each token's chunk as it comes, written by a
/// task that ends (dropping the events: the engine drops the jobs) when the client stops
/// reading or nothing comes for the idle timeout.
fn stream(
    app: Arc<App>,
    plan: Plan,
    events: mpsc::Receiver<(usize, Event)>,
    meta: Meta,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(produce(app, plan, events, meta, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn produce(
    app: Arc<App>,
    plan: Plan,
    mut events: mpsc::Receiver<(usize, Event)>,
    meta: Meta,
    tx: mpsc::Sender<Bytes>,
) {
    let idle = app.opts.idle_timeout;
    let tokenizer = app.engine.tokenizer();
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move { matches!(tokio::time::timeout(idle, tx.send(b)).await, Ok(Ok(()))) }
    };
    let chunk = |index: usize, fields: Value| {
        let mut c = json!({"index": index});
        if let (Value::Object(c), Value::Object(f)) = (&mut c, fields) {
            c.extend(f);
        }
        if c.get("finish_reason").is_none() {
            c["finish_reason"] = Value::Null;
        }
        sse(&meta.wrap(json!([c]), true))
    };
    let echo_needs_logprobs = plan.echo && plan.logprobs.is_some();
    // Byte offset of each choice's text so far (completions' logprobs.text_offset).
    let mut offsets: Vec<usize> = (0..plan.choices())
        .map(|i| {
            let prompt = &plan.prompts[i / plan.n].text;
            prompt.len()
        })
        .collect();
    // The opening chunk of each choice: the echoed prompt (completions), the role (chat).
    let opening = |i: usize, lps: Option<&Vec<Option<TokenLogprob>>>| {
        let prompt = &plan.prompts[i / plan.n];
        match meta.endpoint {
            Endpoint::Chat => chunk(
                i,
                json!({"delta": {"role": "assistant", "content": ""}, "logprobs": null}),
            ),
            Endpoint::Completions => {
                let logprobs =
                    lps.map(|l| api::completion_logprobs(tokenizer, &prompt.job.prompt, l, 0));
                chunk(i, json!({"text": prompt.text, "logprobs": logprobs}))
            }
        }
    };
    let opens = meta.endpoint == Endpoint::Chat || (plan.echo && !echo_needs_logprobs);
    if opens {
        for i in 0..plan.choices() {
            if !send(opening(i, None)).await {
                return;
            }
        }
    }
    let mut generated = 0usize;
    loop {
        let (p, e) = match tokio::time::timeout(idle, events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(_) => {
                let e = ApiError::new(
                    408,
                    "timeout_error",
                    format!("no token for {}s (--idle-timeout)", idle.as_secs_f64()),
                );
                let _ = send(sse(&e.body())).await;
                return;
            }
        };
        let sent = match e {
            Event::Prompt(lps) => {
                let mut ok = true;
                if echo_needs_logprobs {
                    for c in 0..plan.n {
                        ok = ok && send(opening(p * plan.n + c, Some(&lps))).await;
                    }
                }
                ok
            }
            Event::Token(t) if plan.max_tokens > 0 => {
                generated += 1;
                let i = p * plan.n + t.choice;
                let mut fields = match meta.endpoint {
                    Endpoint::Completions => {
                        let logprobs = t.logprob.clone().map(|lp| {
                            api::completion_logprobs(tokenizer, &[t.id], &[Some(lp)], offsets[i])
                        });
                        json!({"text": t.text, "logprobs": logprobs})
                    }
                    Endpoint::Chat => json!({
                        "delta": {"content": t.text},
                        "logprobs": t.logprob.clone().map(|lp| api::chat_logprobs(tokenizer, &[t.id], &[lp])),
                    }),
                };
                offsets[i] += tokenizer.decode(&[t.id]).map_or(0, |s| s.len());
                if let (Some(a), Some(rows)) = (&plan.attention, t.attention) {
                    fields["attention"] = api::attention_json(a, meta.n_head, &[rows]);
                }
                send(chunk(i, fields)).await
            }
            Event::Token(_) => true,
            Event::Done { choice, reason } => {
                let reason = if plan.max_tokens == 0 {
                    "length"
                } else {
                    api::finish_reason(reason)
                };
                let fields = match meta.endpoint {
                    Endpoint::Completions => {
                        json!({"text": "", "logprobs": null, "finish_reason": reason})
                    }
                    Endpoint::Chat => {
                        json!({"delta": {}, "logprobs": null, "finish_reason": reason})
                    }
                };
                send(chunk(p * plan.n + choice, fields)).await
            }
            Event::Failed(e) => {
                let _ = send(sse(&failure(&app, e).body())).await;
                return;
            }
        };
        if !sent {
            return;
        }
    }
    if plan.include_usage {
        let prompt_tokens: usize = plan.prompts.iter().map(|p| p.job.prompt.len()).sum();
        let mut v = meta.wrap(json!([]), true);
        v["usage"] = api::usage(prompt_tokens, generated);
        if !send(sse(&v)).await {
            return;
        }
    }
    let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}
