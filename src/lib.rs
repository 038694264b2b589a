//! GPT-2 in [candle](https://github.com/huggingface/candle): exact, fast, and inspectable.
//!
//! Modules read leaf to root: [`config`] → attention → mlp → block → [`Gpt2`], then the tokenizer
//! and device selection.
//!
//! ```no_run
//! use gpt2::{DType, Device, Gpt2, Tensor};
//! let model = Gpt2::from_dir("path/to/gpt2", DType::F32, &Device::Cpu)?;
//! let ids = Tensor::new(&[[15496u32, 11, 995]], model.device())?;
//! let logits = model.forward(&ids, None)?; // (1, 3, 50257)
//! # Ok::<(), gpt2::Error>(())
//! ```

mod attention;
pub mod bench;
mod block;
mod checkpoint;
pub mod config;
pub mod device;
mod error;
pub mod generation;
pub mod hub;
pub mod info;
pub mod inspect;
mod layer_norm;
mod linear;
mod mlp;
mod model;
pub mod tokenizer;

pub use candle_core::{DType, Device, Tensor};
pub use checkpoint::random_checkpoint;
pub use config::Config;
pub use error::{Error, Result};
pub use model::{Cache, Gpt2};
pub use tokenizer::Tokenizer;
