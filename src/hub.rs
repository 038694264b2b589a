//! Getting a model's files: from a local folder, or from the Hugging Face Hub through the shared
//! cache that Python's `huggingface_hub` also uses (`models--org--name/snapshots/<commit>/...`).
//!
//! Environment, as in `huggingface_hub`: `HF_HOME` (cache at `$HF_HOME/hub`), `HF_HUB_CACHE`
//! (the cache itself), `HF_ENDPOINT`, `HF_TOKEN` (else the token file), and `HF_HUB_OFFLINE=1`
//! (cache only; the hf-hub crate does not implement it, so it is done here).

use std::io::IsTerminal;
use std::path::PathBuf;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::ModelFiles;
use crate::error::{Error, Result};
use crate::tokenizer::TokenizerFiles;

/// Short names for the GPT-2 family, as transformers accepts them.
pub const ALIASES: [(&str, &str); 5] = [
    ("gpt2", "openai-community/gpt2"),
    ("gpt2-medium", "openai-community/gpt2-medium"),
    ("gpt2-large", "openai-community/gpt2-large"),
    ("gpt2-xl", "openai-community/gpt2-xl"),
    ("distilgpt2", "distilbert/distilgpt2"),
];

/// The Hub repo id for `name`: an alias from [`ALIASES`], or `name` itself.
pub fn repo_id(name: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, id)| id)
}

/// A 404 for a file of an existing repo and revision, as opposed to a missing repo or revision
/// (the Hub says which in `x-error-code`).
fn is_missing_file(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Status(404, response) => {
            matches!(
                response.header("x-error-code"),
                None | Some("EntryNotFound")
            )
        }
        _ => false,
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// A variable's value, with empty (or blank) counted as unset, as `huggingface_hub` does.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `$HF_HOME`, by default `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    match env_nonempty("HF_HOME") {
        Some(home) => PathBuf::from(home),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache").join("huggingface")
        }
    }
}

fn cache() -> Cache {
    match env_nonempty("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::new(hf_home().join("hub")),
    }
}

/// `HF_TOKEN`, else the file `huggingface-cli login` writes (`HF_TOKEN_PATH`, default
/// `$HF_HOME/token`): hf-hub would look beside the cache, which is wrong when `HF_HUB_CACHE` moves it.
///
/// A token is a secret: it never appears in any message, and one that cannot be sent as an
/// HTTP header (a newline inside, say) is refused here, before a request could echo it.
fn token() -> Result<Option<String>> {
    let (token, from) = match env_nonempty("HF_TOKEN") {
        Some(token) => (token.trim().to_string(), "HF_TOKEN".to_string()),
        None => {
            let path = env_nonempty("HF_TOKEN_PATH")
                .map_or_else(|| hf_home().join("token"), PathBuf::from);
            let Ok(token) = std::fs::read_to_string(&path) else {
                return Ok(None);
            };
            (token.trim().to_string(), path.display().to_string())
        }
    };
    if token.is_empty() {
        return Ok(None);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Input(format!(
            "the token in {from} has characters an HTTP header cannot carry (a space or a line \
             break inside it?); the token itself is not shown"
        )));
    }
    Ok(Some(token))
}

/// `msg` with every occurrence of the token replaced, for messages built from a server's or a
/// client library's words.
fn redact(msg: String, token: Option<&str>) -> String {
    match token {
        Some(t) if t.len() >= 4 => msg.replace(t, "<HF_TOKEN>"),
        _ => msg,
    }
}

/// One repo at one revision: its files from the cache, or downloaded into it.
pub(crate) struct Hub {
    repo_id: String,
    revision: String,
    cache: Cache,
    /// `None` when offline.
    api: Option<ApiRepo>,
}

impl Hub {
    pub(crate) fn new(repo_id: &str, revision: &str) -> Result<Self> {
        let cache = cache();
        let api = if offline() {
            None
        } else {
            let mut builder = ApiBuilder::from_cache(cache.clone())
                .with_progress(std::io::stderr().is_terminal())
                .with_token(token()?);
            if let Some(endpoint) = env_nonempty("HF_ENDPOINT") {
                builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
            }
            let api = builder
                .build()
                .map_err(|e| Error::Input(format!("cannot set up the Hub client: {e}")))?;
            let repo = Repo::with_revision(repo_id.into(), RepoType::Model, revision.into());
            Some(api.repo(repo))
        };
        Ok(Self {
            repo_id: repo_id.into(),
            revision: revision.into(),
            cache,
            api,
        })
    }

    /// The cached copy of `file`, without any network.
    fn cached(&self, file: &str) -> Option<PathBuf> {
        let repo =
            Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone());
        if let Some(path) = self.cache.repo(repo.clone()).get(file) {
            return Some(path);
        }
        // A commit hash has no ref file: look in its snapshot directly, as huggingface_hub does.
        let is_commit =
            self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
        let path = self
            .cache
            .path()
            .join(repo.folder_name())
            .join("snapshots")
            .join(&self.revision)
            .join(file);
        (is_commit && path.is_file()).then_some(path)
    }

    /// `file` from the cache, else downloaded; `Ok(None)` if the repo does not have it.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cached(file) {
            return Ok(Some(path));
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        match api.download(file) {
            Ok(path) => Ok(Some(path)),
            Err(ApiError::RequestError(e)) if is_missing_file(&e) => Ok(None),
            Err(e) => Err(self.download_error(file, e)),
        }
    }

    fn download_error(&self, file: &str, e: ApiError) -> Error {
        if let ApiError::RequestError(inner) = &e {
            if let ureq::Error::Status(404, response) = &**inner {
                let what = match response.header("x-error-code") {
                    Some("RevisionNotFound") => format!("revision {} not found", self.revision),
                    _ => "repository not found (or private: set HF_TOKEN)".to_string(),
                };
                return Error::Input(format!("{}: {what}", self.repo_id));
            }
        }
        let hint = match &e {
            ApiError::RequestError(inner) if matches!(**inner, ureq::Error::Status(401 | 403, _)) => {
                "the repo may be gated or private: set HF_TOKEN"
            }
            _ => "without network, use --model-dir DIR for a local folder, or HF_HUB_OFFLINE=1 to use only the cache",
        };
        let msg = format!(
            "cannot download {file} of {} (revision {}): {e}; {hint}",
            self.repo_id, self.revision
        );
        Error::Input(redact(msg, token().ok().flatten().as_deref()))
    }

    fn missing(&self, what: &str) -> Error {
        if self.api.is_none() {
            Error::Input(format!(
                "{} (revision {}) has no {what} in the cache {} and HF_HUB_OFFLINE is set; download it once with network, or use --model-dir DIR",
                self.repo_id,
                self.revision,
                self.cache.path().display()
            ))
        } else {
            Error::Input(format!(
                "{} (revision {}) has no {what}",
                self.repo_id, self.revision
            ))
        }
    }

    /// Only the `config.json`, from the cache or downloaded.
    pub(crate) fn config_file(&self) -> Result<PathBuf> {
        self.fetch("config.json")?
            .ok_or_else(|| self.missing("config.json"))
    }

    /// Every file a model needs.
    pub(crate) fn files(&self) -> Result<ModelFiles> {
        let config = self
            .fetch("config.json")?
            .ok_or_else(|| self.missing("config.json"))?;
        let weights = self.weights()?;
        let tokenizer = self.tokenizer()?;
        Ok(ModelFiles {
            config,
            weights,
            tokenizer,
        })
    }

    /// The safetensors weights: `model.safetensors`, or every shard of its index.
    pub(crate) fn weights(&self) -> Result<Vec<PathBuf>> {
        // Prefer whatever is cached, so a cached model never needs the network.
        let from_index = |index: PathBuf| -> Result<Vec<PathBuf>> {
            let shards = crate::checkpoint::shard_names(&index)?;
            shards
                .iter()
                .map(|s| self.fetch(s)?.ok_or_else(|| self.missing(s)))
                .collect()
        };
        if let Some(p) = self.cached("model.safetensors") {
            return Ok(vec![p]);
        }
        if let Some(index) = self.cached("model.safetensors.index.json") {
            return from_index(index);
        }
        if let Some(p) = self.fetch("model.safetensors")? {
            return Ok(vec![p]);
        }
        if let Some(index) = self.fetch("model.safetensors.index.json")? {
            return from_index(index);
        }
        Err(self.missing("safetensors weights (model.safetensors); gpt2 never loads pickle files"))
    }

    fn tokenizer(&self) -> Result<TokenizerFiles> {
        let pair = |vocab: Option<PathBuf>, merges: Option<PathBuf>| match (vocab, merges) {
            (Some(vocab), Some(merges)) => Some(TokenizerFiles::VocabMerges { vocab, merges }),
            _ => None,
        };
        if let Some(p) = self.cached("tokenizer.json") {
            return Ok(TokenizerFiles::Json(p));
        }
        if let Some(t) = pair(self.cached("vocab.json"), self.cached("merges.txt")) {
            return Ok(t);
        }
        if let Some(p) = self.fetch("tokenizer.json")? {
            return Ok(TokenizerFiles::Json(p));
        }
        pair(self.fetch("vocab.json")?, self.fetch("merges.txt")?)
            .ok_or_else(|| self.missing("tokenizer (tokenizer.json, or vocab.json + merges.txt)"))
    }
}
