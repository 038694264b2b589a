//! GPT-2 in [candle](https://github.com/huggingface/candle): exact, fast, and inspectable.
//!
//! Modules read leaf to root: [`config`] → checkpoint → attention → mlp → block → [`Gpt2`]; then
//! [`ModelSource`] (a Hub repo, a folder or a layout file, loaded with [`LoadOptions`]), the
//! [`tokenizer`] and [`prompt`], and the things built on a model: [`generation`], [`inspect`],
//! [`info`], [`bench`], and the server's batching engine ([`serve`]). `docs/ARCHITECTURE.md` is the map.
//!
//! ```no_run
//! use gpt2::{LoadOptions, ModelSource, Tensor};
//! let loaded = ModelSource::dir("path/to/gpt2").load(&LoadOptions::default())?;
//! let ids = Tensor::new(&[[15496u32, 11, 995]], loaded.model.device())?;
//! let logits = loaded.model.forward(&ids, None)?; // (1, 3, 50257)
//! # Ok::<(), gpt2::Error>(())
//! ```

pub mod analysis;
mod attention;
pub mod bench;
mod block;
mod checkpoint;
pub mod config;
pub mod device;
mod error;
pub mod generation;
mod hooks;
pub mod hub;
pub mod info;
pub mod inspect;
pub mod interrupt;
mod layer_norm;
mod linear;
pub mod memory;
#[doc(hidden)]
pub mod microbench;
mod mlp;
mod model;
mod options;
pub mod output;
pub mod perplexity;
mod pool;
pub mod prompt;
pub mod rng;
#[cfg(feature = "serve")]
pub mod serve;
mod source;
pub mod tokenizer;
pub mod train;

pub use candle_core::{DType, Device, Tensor};
pub use checkpoint::{random_checkpoint, Checkpoint, ModelFiles};
pub use config::Config;
pub use error::{panic_is_caught, Error, Result};
pub use hooks::{HeadMask, Hook, HookPair, Point};
pub use model::{Cache, Gpt2, Output, Step};
pub use options::{LoadOptions, Quantization};
pub use prompt::Prompt;
pub use source::{Loaded, ModelSource};
pub use tokenizer::Tokenizer;
