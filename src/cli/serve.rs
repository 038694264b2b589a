//! `gpt2 serve`: load the model, start the engine, serve HTTP until Ctrl-C or SIGTERM.

use std::time::Duration;

use anyhow::{Context, Result};
use gpt2::serve::api::ChatTemplate;
use gpt2::serve::{Engine, EngineOptions, ServerOptions};
use gpt2::Error;

use super::shared::{load, note};
use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;

#[derive(Args)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on; anything but loopback without --api-key prints a warning.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port; 0 lets the system pick one (the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (default: the GPT2_API_KEY variable; none: open).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Sequences decoded together (a request with n choices takes n).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    parallel: usize,
    /// Requests waiting for a slot before more are refused with 429.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    max_queue: usize,
    /// Seconds a request may take (its body, and a completion that is not streamed): 408.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 600.0,
        allow_negative_numbers = true
    )]
    timeout: f64,
    /// Seconds a stream may go without a token, or its client without reading, before it ends.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60.0,
        allow_negative_numbers = true
    )]
    idle_timeout: f64,
    /// Seconds a connection has to send a request's headers before it is closed.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    header_timeout: f64,
    /// Largest request body in bytes (413 past it).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, allow_negative_numbers = true)]
    max_body: usize,
    /// Seconds running requests get to finish at Ctrl-C or SIGTERM before they are cancelled.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    grace: f64,
    /// Serve /v1/chat/completions with this template (JSON: see the README's Server section).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
}

pub(super) fn cmd_serve(args: ServeArgs) -> Result<()> {
    let secs = |param: &'static str, v: f64| -> Result<Duration> {
        Ok(Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Error::param(param, "must be a number of seconds > 0"))?)
    };
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("GPT2_API_KEY").ok());
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        Err(Error::param("api_key", "must not be empty"))?;
    }
    if args.parallel == 0 {
        Err(Error::param("parallel", "must be at least 1"))?;
    }
    let chat_template = match &args.chat_template {
        None => None,
        Some(path) => {
            let text = super::read_file(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?;
            let t = ChatTemplate::parse(&text)
                .map_err(|e| Error::param("chat_template", format!("{}: {e}", path.display())))?;
            Some(t)
        }
    };
    let opts = ServerOptions {
        api_key: api_key.clone(),
        max_body: args.max_body,
        timeout: secs("timeout", args.timeout)?,
        idle_timeout: secs("idle_timeout", args.idle_timeout)?,
        header_timeout: secs("header_timeout", args.header_timeout)?,
        grace: Duration::try_from_secs_f64(args.grace)
            .map_err(|_| Error::param("grace", "must be a number of seconds >= 0"))?,
        chat_template,
    };
    // Bound before the (possibly long) load, so a port in use fails at once.
    let (host, port) = (args.host.as_str(), args.port);
    let listener = std::net::TcpListener::bind((host, port))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Error::Input(format!("cannot listen on {host}:{port}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Input(format!("cannot read the bound address: {e}")))?;
    if !addr.ip().is_loopback() && api_key.is_none() {
        note(format_args!(
            "warning: listening on {addr}, beyond this machine, without an API key: anyone \
             who reaches it can use it (set --api-key or GPT2_API_KEY)\n"
        ));
    }
    let loaded = load(&args.model, None)?;
    let engine = Engine::start(
        loaded.model,
        loaded.tokenizer,
        loaded.name,
        EngineOptions {
            parallel: args.parallel,
            max_queue: args.max_queue,
        },
    )?;
    // The model runs on the engine's thread; these threads only move bytes.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::Input(format!("cannot listen on {addr}: {e}")))?;
        note(format_args!("listening on http://{addr}\n"));
        // The binary's Ctrl-C (and SIGTERM) handler raises the stop request; a second one
        // exits at once.
        let stop = async {
            while !gpt2::interrupt::requested() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        gpt2::serve::serve(listener, engine, opts, stop).await;
        note(format_args!("server stopped\n"));
        Ok::<_, anyhow::Error>(())
    })
}
