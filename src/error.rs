//! The library's error type: every failure a user can cause (a bad file, a bad option, a missing
//! tensor) is one of these, with enough context to be printed as a single line. Errors speak of
//! the library's own terms (`temperature`, `layer`); the `gpt2` binary turns [`Error::Param`]
//! into the name of its option (`--temperature`).

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. (Not a `#[source]`: the message already holds the
    /// OS's words, and a chain printer would repeat them.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

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

    /// A tensor that cannot be a weight: an integer dtype, a NaN or an infinity.
    #[error("{}: tensor `{name}` {msg}", file.display())]
    BadTensor {
        file: PathBuf,
        name: String,
        msg: String,
    },

    /// The tokenizer files are missing or malformed, or a text could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The requested device is not available or not compiled in.
    #[error("{0}")]
    Device(String),

    /// A parameter of a call has a value it cannot take; `param` is its name in the library
    /// (`temperature`, `layer`, `max_new_tokens`), which the `gpt2` binary shows as `--option`.
    #[error("{param} {msg}")]
    Param { param: &'static str, msg: String },

    /// A prompt with no tokens.
    #[error("the prompt is empty: it needs at least one token")]
    EmptyPrompt,

    /// A prompt longer than the model's context.
    #[error("the prompt is {tokens} tokens but the model sees at most {context}")]
    PromptTooLong { tokens: usize, context: usize },

    /// A file of a Hub repo is not in the cache and the Hub cannot be reached (no network, a
    /// name that does not resolve, a refused connection, a timeout). What to do comes first,
    /// the transport's words (`detail`) last; `cached`: the cache holds some of the revision
    /// (its config), so `HF_HUB_OFFLINE=1` may load it without asking the Hub.
    #[error("{}", hub_unreachable(repo, revision, file, *cached, detail))]
    HubUnreachable {
        repo: String,
        revision: String,
        file: String,
        cached: bool,
        detail: String,
    },

    /// A run would need more memory than the machine has; `hint` (empty, or what to do
    /// instead) ends the message after a colon.
    #[error("{what} needs {needed} bytes ({}), more than the {} of memory available{}", human_bytes(*.needed), human_bytes(*.available), if .hint.is_empty() { String::new() } else { format!(": {}", .hint) })]
    OutOfMemory {
        what: String,
        needed: u128,
        available: u128,
        hint: String,
    },

    /// Standard output's reader went away (`gpt2 ... | head`): nothing more can be shown.
    #[error("standard output was closed")]
    StdoutClosed,

    /// The run was stopped by an interrupt (Ctrl-C) before it finished.
    #[error("interrupted")]
    Interrupted,

    /// An input the caller passed is out of range or inconsistent.
    #[error("{0}")]
    Input(String),

    /// A fault inside gpt2, not the caller's doing (a kernel panicked, a pass skipped a point
    /// it was asked for): a bug to report.
    #[error("internal error (a bug in gpt2, please report it): {0}")]
    Internal(String),

    /// An error inside candle (a shape bug, an allocation failure, a backend failure).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            err,
        }
    }

    /// A [`Error::Param`].
    pub fn param(param: &'static str, msg: impl Into<String>) -> Self {
        Self::Param {
            param,
            msg: msg.into(),
        }
    }
}

thread_local! {
    /// How many [`catch_panic`] calls this thread is inside.
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether a panic on this thread now will be caught by the library and returned as an
/// [`Error`]: one inside a dependency on hostile input (a `tokenizer.json` the `tokenizers` crate
/// panics on). A panic hook should not report it as a bug.
pub fn panic_is_caught() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

/// Runs `f`, turning a panic inside it into its message (the first line).
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get().saturating_sub(1)));
    result.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        msg.lines().next().unwrap_or("").to_string()
    })
}

/// [`Error::HubUnreachable`] in words: a newcomer's first run, offline, ends here, so the way
/// on (a local folder, or the tool on random weights with no download) comes first.
fn hub_unreachable(repo: &str, revision: &str, file: &str, cached: bool, detail: &str) -> String {
    let (what, offline) = if cached {
        (
            format!("{file} of {repo} is not cached"),
            "; if the cache holds every file the model needs, HF_HUB_OFFLINE=1 loads it without \
             asking the Hub",
        )
    } else {
        (format!("{repo} is not cached"), "")
    };
    format!(
        "{what} and the Hub cannot be reached: use --model-dir DIR for a local folder, or \
         --config configs/gpt2.json to try gpt2 with random weights and no download{offline} \
         ({file}, revision {revision}: {detail})"
    )
}

/// `n` and `noun`, plural unless one: `1 token`, `2 tokens`.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `n` bytes in the largest binary unit that keeps it at least 1, as indicatif writes them
/// (`1.50 GiB`). Our sizes are u128 (a product that cannot overflow); indicatif's are u64.
pub(crate) fn human_bytes(n: u128) -> String {
    match u64::try_from(n) {
        Ok(n) => indicatif::HumanBytes(n).to_string(),
        Err(_) => "more than 16 EiB".to_string(),
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_in_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(human_bytes(u128::MAX), "more than 16 EiB");
    }
}
