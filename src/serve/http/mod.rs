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
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
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

use crate::serve::api::{ApiError, ChatTemplate};
use crate::serve::engine::Engine;

mod completions;

use completions::{chat_completions, completions};

/// The live page at `/`.
const PAGE: &str = include_str!("../page.html");

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
