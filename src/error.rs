//! The library's error type: every failure a user can cause (a bad file, a bad option, a missing
//! tensor) is one of these, with enough context to be printed as a single line.

use std::path::PathBuf;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// `config.json` is not valid JSON or has a field of the wrong type.
    #[error("{}: {msg}", path.display())]
    ConfigParse { path: PathBuf, msg: String },

    /// A config field holds a value the model cannot run with.
    #[error("config field `{field}`: {msg}")]
    InvalidConfig { field: &'static str, msg: String },

    /// The checkpoint lacks a tensor the config requires.
    #[error("{}: missing tensor `{name}`", file.display())]
    MissingTensor { name: String, file: PathBuf },

    /// A tensor's shape disagrees with the config.
    #[error("{}: tensor `{name}` has shape {found:?}, but config.json implies {expected:?}", file.display())]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: PathBuf,
    },

    /// The checkpoint holds tensors the config does not account for (e.g. more layers).
    #[error("{}: {msg}", file.display())]
    ConfigContradictsWeights { msg: String, file: PathBuf },

    /// A weights file is not a readable safetensors file (truncated, bad header, ...).
    #[error("{}: not a valid safetensors file ({msg})", file.display())]
    BadCheckpoint { file: PathBuf, msg: String },

    /// The tokenizer files are missing or malformed, or a text could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The requested device is not available or not compiled in.
    #[error("{0}")]
    Device(String),

    /// An input the caller passed is out of range (too many tokens, unknown dtype, ...).
    #[error("{0}")]
    Input(String),

    /// An error inside candle (a shape bug, an allocation failure, a backend failure).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
