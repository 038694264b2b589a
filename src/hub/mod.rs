//! Getting a model's files: from a local folder, or from the Hugging Face Hub through the shared
//! cache that Python's `huggingface_hub` also uses (`models--org--name/snapshots/<commit>/...`).
//! A cache written here is used by `huggingface_hub`, and the other way round.
//!
//! Environment, as in `huggingface_hub`: `HF_HOME` (cache at `$HF_HOME/hub`), `HF_HUB_CACHE`
//! (the cache itself), `HF_ENDPOINT`, `HF_TOKEN` (else the token file), `HF_HUB_OFFLINE=1`
//! (cache only), and `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT` (seconds, 10 by
//! default). The hf-hub crate gives the cache lookup; the download itself, checked, resumable,
//! bounded in time and shared safely between processes, is `hub/download.rs`'s.

mod answer;
mod download;
mod lock;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::ModelFiles;
use crate::error::{Error, Result};
use crate::tokenizer::TokenizerFiles;
use answer::Failure;
use download::Client;

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
fn is_missing_file(failure: &Failure) -> bool {
    matches!(
        failure,
        Failure::Status { code: 404, error_code, hub: true, .. }
            if matches!(error_code.as_deref(), None | Some("EntryNotFound"))
    )
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

/// A timeout in seconds from the variable `name`; unset, empty or 0 is 10 s, as in
/// `huggingface_hub`.
fn timeout(name: &str) -> Result<Duration> {
    parse_timeout(name, env_nonempty(name))
}

fn parse_timeout(name: &str, value: Option<String>) -> Result<Duration> {
    let Some(value) = value else {
        return Ok(Duration::from_secs(10));
    };
    match value.trim().parse::<f64>() {
        Ok(0.0) => Ok(Duration::from_secs(10)),
        // A year is as good as for ever, and keeps Duration from overflowing.
        Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s.min(3.2e7))),
        _ => Err(Error::Input(format!(
            "{name} must be a number of seconds, not {value:?}"
        ))),
    }
}

/// `s` as a URL path segment (or path, `/` kept, with `keep_slash`), as `huggingface_hub`
/// quotes file names and revisions.
fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// `msg` with every occurrence of the token replaced, and any URL's user and password removed,
/// for messages built from a server's or a client library's words (ureq's errors quote the URL).
fn redact(msg: String, token: Option<&str>) -> String {
    let msg = without_userinfo(&msg);
    match token {
        Some(t) if t.len() >= 4 => msg.replace(t, "<HF_TOKEN>"),
        _ => msg,
    }
}

/// `url` as every message shows it: without the `user:password@` that `HF_ENDPOINT` may hold, and
/// without the query, where a CDN URL carries its signature.
pub(crate) fn shown(url: &url::Url) -> String {
    let mut url = url.clone();
    // Both fail only for URLs that cannot have credentials (`data:`, say).
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let query = url.query().is_some();
    url.set_query(None);
    url.set_fragment(None);
    let mut text = url.to_string();
    if query {
        text.push_str("?<query>");
    }
    text
}

/// `text`, a URL that did not parse, shown without anything between its `://` and its last `@`:
/// what is a password there cannot be told (a `/` in it, say).
pub(crate) fn shown_unparsed(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(i), Some(at)) if at > i => format!("{}{}", &text[..i + 3], &text[at + 1..]),
        _ => without_userinfo(text),
    }
}

/// `text` with the user information (`user:password@`) of every `scheme://` URL in it removed:
/// for text that quotes a URL we did not format ([`shown`]), or one that is not a valid URL.
pub(crate) fn without_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends where the path, query or fragment starts (or the text moves on).
        let end = tail
            .find(|c: char| matches!(c, '/' | '\\' | '?' | '#' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(
            authority
                .rfind('@')
                .map_or(authority, |at| &authority[at + 1..]),
        );
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// One repo at one revision: its files from the cache, or downloaded into it.
pub(crate) struct Hub {
    repo_id: String,
    revision: String,
    cache: Cache,
    /// `HF_ENDPOINT`, without a trailing `/`.
    endpoint: String,
    /// `None` when offline.
    client: Option<Client>,
}

impl Hub {
    pub(crate) fn new(repo_id: &str, revision: &str) -> Result<Self> {
        let client = if offline() {
            None
        } else {
            Some(Client::new(
                token()?,
                timeout("HF_HUB_ETAG_TIMEOUT")?,
                timeout("HF_HUB_DOWNLOAD_TIMEOUT")?,
                std::io::stderr().is_terminal(),
            ))
        };
        let endpoint = env_nonempty("HF_ENDPOINT").map_or_else(
            || "https://huggingface.co".to_string(),
            |e| e.trim().to_string(),
        );
        Ok(Self {
            repo_id: repo_id.into(),
            revision: revision.into(),
            cache: cache(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            client,
        })
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    /// `models--org--name` in the cache.
    fn repo_dir(&self) -> PathBuf {
        self.cache.path().join(self.repo().folder_name())
    }

    fn is_commit(&self) -> bool {
        self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit())
    }

    /// The cached copy of `file`, without any network.
    pub(crate) fn cached(&self, file: &str) -> Option<PathBuf> {
        if let Some(path) = self.cache.repo(self.repo()).get(file) {
            return Some(path);
        }
        // A commit hash has no ref file: look in its snapshot directly, as huggingface_hub does.
        let path = self
            .repo_dir()
            .join("snapshots")
            .join(&self.revision)
            .join(file);
        (self.is_commit() && path.is_file()).then_some(path)
    }

    /// `file` from the cache, else downloaded; `Ok(None)` if the repo does not have it.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cached(file) {
            return Ok(Some(path));
        }
        let Some(client) = &self.client else {
            return Ok(None);
        };
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo_id,
            quote(&self.revision, false),
            quote(file, true)
        );
        let meta = match client.metadata(&url) {
            Ok(meta) => meta,
            Err(failure) if is_missing_file(&failure) => return Ok(None),
            Err(failure) => return Err(self.download_error(file, failure)),
        };
        let repo_dir = self.repo_dir();
        let blob = repo_dir.join("blobs").join(&meta.etag);
        let pointer = repo_dir.join("snapshots").join(&meta.commit).join(file);
        // huggingface_hub's lock, and the one the hf-hub crate takes beside the blob, so that
        // neither downloads this blob while we do.
        let mut hf_hub_lock = blob.clone();
        hf_hub_lock.set_extension("lock");
        let locks = [
            self.cache
                .path()
                .join(".locks")
                .join(self.repo().folder_name())
                .join(format!("{}.lock", meta.etag)),
            hf_hub_lock,
        ];
        let held = client
            .fetch_blob(&meta, &blob, &locks, file)
            .map_err(|failure| self.download_error(file, failure))?;
        link(&blob, &pointer, file)?;
        drop(held);
        if !self.is_commit() {
            write_ref(&repo_dir, &self.revision, &meta.commit)?;
        }
        Ok(Some(pointer))
    }

    /// `failure` in one line that names the file, repo and revision, without the token.
    fn download_error(&self, file: &str, failure: Failure) -> Error {
        let what = match failure {
            Failure::Local(e) => return e,
            Failure::Status {
                code: 404,
                error_code,
                hub: true,
                ..
            } => {
                let what = match error_code.as_deref() {
                    Some("RevisionNotFound") => format!("revision {} not found", self.revision),
                    _ => "repository not found (or private: set HF_TOKEN)".to_string(),
                };
                return Error::Input(format!("{}: {what}", self.repo_id));
            }
            Failure::Status {
                code,
                text,
                attempts,
                waited,
                hub,
                ..
            } => {
                let who = if hub {
                    "the Hub"
                } else {
                    "the download server"
                };
                let times = if attempts > 1 {
                    format!(" {attempts} times in {} s", waited.as_secs())
                } else {
                    String::new()
                };
                let hint = match code {
                    401 | 403 => "; the repo may be gated or private: set HF_TOKEN",
                    429 => "; it is limiting requests: try again later",
                    500..=599 => "; it may be down: try again later",
                    _ => "",
                };
                format!("{who} answered {code} {text}{times}{hint}")
            }
            Failure::Transfer { msg, network: true } => {
                return Error::HubUnreachable {
                    repo: self.repo_id.clone(),
                    revision: self.revision.clone(),
                    file: file.to_string(),
                    cached: self.cached("config.json").is_some(),
                    detail: redact(msg, self.client.as_ref().and_then(Client::token)),
                }
            }
            Failure::Transfer { msg, .. } => msg,
        };
        let msg = format!(
            "cannot download {file} of {} (revision {}): {what}",
            self.repo_id, self.revision
        );
        Error::Input(redact(msg, self.client.as_ref().and_then(Client::token)))
    }

    fn missing(&self, what: &str) -> Error {
        if self.client.is_none() {
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

/// The snapshot entry `pointer` made a relative symlink to `blob`, as huggingface_hub makes them
/// (`snapshots/<commit>/<file>` -> `../../blobs/<etag>`); a copy where symlinks are not allowed.
fn link(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    if let Some(dir) = pointer.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // One `..` per folder of `file`, one for the commit, one for snapshots/.
    let depth = Path::new(file).components().count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    if let Some(name) = blob.file_name() {
        target.push(name);
    }
    #[cfg(unix)]
    {
        if std::fs::read_link(pointer).is_ok_and(|t| t == target) {
            return Ok(()); // another process made it
        }
        // A dangling or stale entry is replaced.
        let _ = std::fs::remove_file(pointer);
        match std::os::unix::fs::symlink(&target, pointer) {
            Ok(()) => Ok(()),
            // Made by another process between the two calls.
            Err(_) if std::fs::read_link(pointer).is_ok_and(|t| t == target) => Ok(()),
            Err(e) => Err(Error::io(pointer, e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = target;
        let _ = std::fs::remove_file(pointer);
        std::fs::copy(blob, pointer)
            .map(|_| ())
            .map_err(|e| Error::io(pointer, e))
    }
}

/// `refs/<revision>` says `commit`, as huggingface_hub writes it (no newline), replaced whole
/// so that a reader never sees half of it. A revision that is not a plain relative name (`..`)
/// gets no ref: it would land outside `refs/`.
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    use std::path::Component;
    if !Path::new(revision)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Ok(());
    }
    let path = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(repo_dir);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Not a tempfile::NamedTempFile: its 0600 would keep the ref from the other users of a
    // shared cache. The process id keeps two processes' temporaries apart.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, commit).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_revisions_are_quoted_as_huggingface_hub_does() {
        assert_eq!(quote("model.safetensors", true), "model.safetensors");
        assert_eq!(quote("onnx/model a.onnx", true), "onnx/model%20a.onnx");
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("a?b#c%", true), "a%3Fb%23c%25");
    }

    #[test]
    fn timeouts_are_seconds_and_zero_is_the_default() {
        let t = |v: &str| parse_timeout("HF_HUB_DOWNLOAD_TIMEOUT", Some(v.to_string()));
        assert_eq!(t("1").unwrap(), Duration::from_secs(1));
        assert_eq!(t(" 2.5 ").unwrap(), Duration::from_millis(2500));
        assert_eq!(t("0").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_timeout("HF_HUB_ETAG_TIMEOUT", None).unwrap(),
            Duration::from_secs(10)
        );
        assert!(t("1e300").is_ok());
        for bad in ["-1", "soon", "NaN", "inf"] {
            let e = t(bad).unwrap_err().to_string();
            assert!(e.contains("HF_HUB_DOWNLOAD_TIMEOUT"), "{e}");
        }
    }

    #[test]
    fn missing_files_are_told_from_missing_repos() {
        let status = |code, error_code: Option<&str>, hub| Failure::Status {
            code,
            text: String::new(),
            error_code: error_code.map(String::from),
            attempts: 1,
            waited: Duration::ZERO,
            hub,
        };
        assert!(is_missing_file(&status(404, None, true)));
        assert!(is_missing_file(&status(404, Some("EntryNotFound"), true)));
        assert!(!is_missing_file(&status(404, Some("RepoNotFound"), true)));
        assert!(!is_missing_file(&status(
            404,
            Some("RevisionNotFound"),
            true
        )));
        assert!(!is_missing_file(&status(404, None, false)));
        assert!(!is_missing_file(&status(403, None, true)));
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let url = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            shown(&url(
                "https://alice:pw@hub.example:8443/a/b?X-Amz-Signature=s#f"
            )),
            "https://hub.example:8443/a/b?<query>"
        );
        assert_eq!(
            shown(&url("https://alice@hub.example/a")),
            "https://hub.example/a"
        );
        assert_eq!(shown(&url("http://127.0.0.1:1/x")), "http://127.0.0.1:1/x");
        for (text, want) in [
            ("http://alice:pw@h:1/x: refused", "http://h:1/x: refused"),
            (
                "see https://a:b@c@d/e and http://f/g@h",
                "see https://d/e and http://f/g@h",
            ),
            ("\"https://u:p@h\" is not", "\"https://h\" is not"),
            ("https://u:p@h", "https://h"),
            ("no url: a@b", "no url: a@b"),
        ] {
            assert_eq!(without_userinfo(text), want);
        }
        assert_eq!(shown_unparsed("https://u:p/w@h/x"), "https://h/x");
        assert_eq!(shown_unparsed("ht tp://h/x"), "ht tp://h/x");
        assert_eq!(
            redact("https://u:pw@h/secret-token".into(), Some("secret-token")),
            "https://h/<HF_TOKEN>"
        );
    }

    #[cfg(unix)]
    #[test]
    fn snapshot_entries_are_relative_symlinks_into_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blobs").join("abc");
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"x").unwrap();
        let snapshot = dir.path().join("snapshots").join("c0");
        link(&blob, &snapshot.join("f.json"), "f.json").unwrap();
        assert_eq!(
            std::fs::read_link(snapshot.join("f.json")).unwrap(),
            Path::new("../../blobs/abc")
        );
        link(&blob, &snapshot.join("sub/g.json"), "sub/g.json").unwrap();
        assert_eq!(std::fs::read(snapshot.join("sub/g.json")).unwrap(), b"x");
        // Again (another process got there first), and over a dangling entry.
        link(&blob, &snapshot.join("f.json"), "f.json").unwrap();
        std::os::unix::fs::symlink("../../blobs/gone", snapshot.join("h.json")).unwrap();
        link(&blob, &snapshot.join("h.json"), "h.json").unwrap();
        assert_eq!(std::fs::read(snapshot.join("h.json")).unwrap(), b"x");
    }

    #[test]
    fn refs_are_written_whole_and_only_inside_refs() {
        let dir = tempfile::tempdir().unwrap();
        write_ref(dir.path(), "main", "c0ffee").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("refs/main")).unwrap(),
            "c0ffee"
        );
        write_ref(dir.path(), "refs/pr/1", "beef").unwrap();
        assert!(dir.path().join("refs/refs/pr/1").is_file());
        write_ref(dir.path(), "../escape", "beef").unwrap();
        assert!(!dir.path().join("escape").exists());
    }
}
