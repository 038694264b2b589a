//! The HTTP side of `gpt2 serve`: an axum router over an [`Engine`], served by hyper's HTTP/1
//! connection builder (as axum's `serve-with-hyper` example does) so that a client that sends
//! its headers too slowly is cut off (`header_read_timeout`), which `axum::serve` cannot set.
//!
//! Layers, outermost first: the status counter (`/metrics`), the request timeout (a slow body
//! or a slow non-streaming completion: 408), the bearer check, then the handler. A streamed
//! completion returns its headers at once and is held to the idle timeout instead: a stream
//! with no event, or whose client stops reading, for that long ends (and frees its slots).
//! The model itself runs only on the engine's thread: handlers submit jobs and await events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::api::{self, ApiError, ChatTemplate, ChoiceState, CompletionRequest, Endpoint, Plan};
use super::engine::{Engine, Event, TokenLogprob};

/// The live page at `/`.
const PAGE: &str = include_str!("page.html");

/// How the server treats its clients.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Required as `Authorization: Bearer KEY` on everything but `/` and `/health`.
    pub api_key: Option<String>,
    /// Largest request body, in bytes (413 past it).
    pub max_body: usize,
    /// A request (its body, and a non-streamed completion) must be done within this (408).
    pub timeout: Duration,
    /// A stream ends when no token came, or its client read nothing, for this long.
    pub idle_timeout: Duration,
    /// A connection must send a request's headers within this, or it is closed.
    pub header_timeout: Duration,
    /// At shutdown, running requests may finish within this; the rest are cancelled.
    pub grace: Duration,
    pub chat_template: Option<ChatTemplate>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            max_body: 1 << 20,
            timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            chat_template: None,
        }
    }
}

struct App {
    engine: Engine,
    /// The live page, the model's name and sizes filled in.
    page: String,
    opts: ServerOptions,
    /// The key's SHA-256: comparing digests takes the same time whatever the key's length.
    key: Option<[u8; 32]>,
    /// Responses by HTTP status.
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// Requests seen, for ids and fresh seeds.
    counter: AtomicU64,
    /// Set at shutdown: a job failing now was cancelled by it (503, not the request's fault).
    stopping: AtomicBool,
}

impl App {
    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }
}

/// The router of every endpoint over `engine`.
pub fn router(engine: Engine, opts: ServerOptions) -> Router {
    routes(app(engine, opts))
}

fn app(engine: Engine, opts: ServerOptions) -> Arc<App> {
    let key = opts
        .api_key
        .as_deref()
        .map(|k| Sha256::digest(k.as_bytes()).into());
    let c = engine.config();
    let page = PAGE
        .replace("{{MODEL}}", &escape_html(engine.name()))
        .replace("{{N_LAYER}}", &c.n_layer.to_string())
        .replace("{{N_HEAD}}", &c.n_head.to_string());
    Arc::new(App {
        page,
        engine,
        opts,
        key,
        statuses: Mutex::new(BTreeMap::new()),
        counter: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
    })
}

fn routes(app: Arc<App>) -> Router {
    let max_body = app.opts.max_body;
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route(
            "/",
            get(|State(app): State<Arc<App>>| async move { Html(app.page.clone()) }),
        )
        .route("/health", get(health))
        .merge(protected)
        .fallback(|| async {
            error(&ApiError::new(
                404,
                "invalid_request_error",
                "no such endpoint",
            ))
        })
        .method_not_allowed_fallback(|| async {
            error(&ApiError::new(
                405,
                "invalid_request_error",
                "method not allowed on this endpoint",
            ))
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(app.clone(), time_limit))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

/// Serves `router(engine, opts)` on `listener` until `shutdown` resolves; then stops
/// accepting, lets running requests finish within `opts.grace`, cancels the rest and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let grace = opts.grace;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout);
    let state = app(engine.clone(), opts);
    let app = routes(state.clone());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // Out of descriptors, or a connection reset before it was taken: the
                    // listener still works; breathe and go on.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(app.clone()),
                );
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    state.stopping.store(true, Ordering::SeqCst);
    // The engine ends its jobs (finished, or cancelled at the grace) on its own thread; the
    // connections close as their responses end, idle keep-alive ones at once.
    let stopping = tokio::task::spawn_blocking(move || engine.shutdown(grace));
    let _ = stopping.await;
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ---------------------------------------------------------------------------------------------
// Middleware

fn error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 429 || e.status == 503 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn count(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let mut statuses = app.statuses.lock().unwrap_or_else(|p| p.into_inner());
    *statuses.entry(r.status().as_u16()).or_default() += 1;
    r
}

async fn time_limit(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let limit = app.opts.timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            &ApiError::new(
                408,
                "timeout_error",
                format!(
                    "the request took longer than {}s (--timeout)",
                    limit.as_secs_f64()
                ),
            )
            .with_code("timeout"),
        ),
    }
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(want) = &app.key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|k| {
            let got: [u8; 32] = Sha256::digest(k.as_bytes()).into();
            // Every byte compared, whatever differs first.
            got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if !ok {
            return error(
                &ApiError::new(
                    401,
                    "authentication_error",
                    "missing or wrong API key: send the header Authorization: Bearer KEY",
                )
                .with_code("invalid_api_key"),
            );
        }
    }
    next.run(req).await
}

/// The body as `T`: over the limit is a 413, malformed JSON a 400, a field of the wrong type a
/// 400 naming it (`param`: the top-level field).
fn parse<T: DeserializeOwned>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                413,
                "invalid_request_error",
                format!(
                    "the request body is larger than {} bytes (--max-body)",
                    app.opts.max_body
                ),
            )
            .with_code("body_too_large")
        } else {
            ApiError::invalid(
                None,
                format!("cannot read the request body: {}", r.body_text()),
            )
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(None, format!("the body is not valid JSON: {inner}"))
                .with_code("invalid_json");
        }
        let field = path.split(['.', '[']).next().filter(|f| !f.is_empty() && path != ".");
        let Some(field) = field else {
            return ApiError::invalid(None, format!("the body must be a JSON object: {inner}"));
        };
        let what = match field {
            "prompt" => "must be a string, a list of strings, a list of token ids or a list of lists of token ids".to_string(),
            "stop" => "must be a string or a list of strings".to_string(),
            _ => inner.to_string(),
        };
        ApiError::invalid(Some(field), format!("{path}: {what}")).with_code("invalid_type")
    })
}

// ---------------------------------------------------------------------------------------------
// Small endpoints

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.engine.is_running() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        error(&ApiError::new(
            503,
            "server_error",
            "the engine is not running",
        ))
    }
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.engine.name(),
        "object": "model",
        "created": 0,
        "owned_by": "gpt2",
    }]}))
}

#[derive(Deserialize)]
struct TokenizeRequest {
    content: Option<String>,
    prompt: Option<String>,
}

async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let r: TokenizeRequest = parse(&app, body)?;
        let text = r
            .content
            .or(r.prompt)
            .ok_or_else(|| ApiError::invalid(Some("content"), "content is required"))?;
        let tokens = app
            .engine
            .tokenizer()
            .encode(&text)
            .map_err(ApiError::from_lib)?;
        Ok(json!({ "tokens": tokens }))
    };
    run().map_or_else(|e| error(&e), |v| Json(v).into_response())
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let r: DetokenizeRequest = parse(&app, body)?;
        let vocab = app.engine.config().vocab_size;
        if let Some(bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid(
                Some("tokens"),
                format!("token {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let content = app
            .engine
            .tokenizer()
            .decode(&r.tokens)
            .map_err(ApiError::from_lib)?;
        Ok(json!({ "content": content }))
    };
    run().map_or_else(|e| error(&e), |v| Json(v).into_response())
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    use std::fmt::Write;
    let m = app.engine.metrics();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rate = |tokens: u64, nanos: u64| {
        if nanos == 0 {
            0.0
        } else {
            tokens as f64 / (nanos as f64 / 1e9)
        }
    };
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
        let _ = writeln!(s, "# HELP gpt2_{name} {help}\n# TYPE gpt2_{name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(s, "gpt2_{name}{labels} {v}");
        }
    };
    let statuses: Vec<(String, f64)> = app
        .statuses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(code, n)| (format!("{{status=\"{code}\"}}"), *n as f64))
        .collect();
    let one = |v: f64| [(String::new(), v)];
    metric(
        "requests_total",
        "counter",
        "HTTP responses by status.",
        &statuses,
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled.",
        &one(load(&m.prompt_tokens) as f64),
    );
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        &one(load(&m.generated_tokens) as f64),
    );
    metric(
        "queue_depth",
        "gauge",
        "Requests waiting for slots.",
        &one(m.queued.load(Ordering::Relaxed) as f64),
    );
    metric(
        "active_sequences",
        "gauge",
        "Sequences being decoded.",
        &one(m.active.load(Ordering::Relaxed) as f64),
    );
    metric(
        "prefill_tokens_per_second",
        "gauge",
        "Prompt tokens per second of prefill, since start.",
        &one(rate(load(&m.prompt_tokens), load(&m.prefill_nanos))),
    );
    metric(
        "decode_tokens_per_second",
        "gauge",
        "Tokens per second of decode steps (all sequences together), since start.",
        &one(rate(load(&m.decode_tokens), load(&m.decode_nanos))),
    );
    metric(
        "kv_cache_bytes",
        "gauge",
        "KV-cache bytes of the running sequences.",
        &one(load(&m.kv_cache_bytes) as f64),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

// ---------------------------------------------------------------------------------------------
// Completions

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(app, body, Endpoint::Completions)
        .await
        .unwrap_or_else(|e| error(&e))
}

async fn chat_completions(
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
