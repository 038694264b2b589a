//! `gpt2 serve`: an OpenAI-compatible HTTP server over a batching [`Engine`].
//!
//! - [`engine`]: the thread that owns the model and decodes every request's sequences together.

pub mod engine;

pub use engine::{Engine, EngineOptions, Event, Job, Penalties, Rejected, Token, TokenLogprob};
