//! `gpt2 serve`: an OpenAI-compatible HTTP server over a batching [`Engine`].
//!
//! - [`engine`]: the thread that owns the model and decodes every request's sequences together.
//! - [`api`]: the OpenAI request and response shapes, checked and turned into engine jobs.
//! - [`http`]: the axum router and the hyper accept loop ([`http::serve`]), the live page.

pub mod api;
pub mod engine;
pub mod http;

pub use engine::{Engine, EngineOptions, Event, Job, Penalties, Rejected, Token, TokenLogprob};
pub use http::{router, serve, ServerOptions};
