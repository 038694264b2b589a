//! Where a model comes from, and the one way to load it.
//!
//! [`ModelSource`] says where (a Hub repo at a revision, a local folder, or a layout file with
//! seeded random weights) and finds what is there: `config.json`, the safetensors weights and the
//! tokenizer, through the Hub cache Python shares ([`crate::hub`]) when it is a repo.
//! [`LoadOptions`] says how to load it (dtype, device, how many layers). Every command of the
//! `gpt2` binary loads through [`ModelSource::load`], and so can a library user:
//!
//! ```no_run
//! use gpt2::{LoadOptions, ModelSource};
//! let loaded = ModelSource::hub("gpt2", "main").load(&LoadOptions::default())?;
//! let ids = loaded.tokenizer.encode("Hello")?;
//! # Ok::<(), gpt2::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::{shard_names, Checkpoint, ModelFiles};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Gpt2;
use crate::options::LoadOptions;
use crate::tokenizer::{Tokenizer, TokenizerFiles};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A Hub repo (`org/name`, or an alias from [`crate::hub::ALIASES`] resolved by
    /// [`ModelSource::hub`]) at a branch, tag or commit; cache first, honouring the `HF_*`
    /// variables (see [`crate::hub`]).
    Hub { repo: String, revision: String },
    /// A local model folder: `config.json`, `model.safetensors` (or shards and their index) and
    /// `tokenizer.json` (or `vocab.json` + `merges.txt`). Nothing touches the network.
    Dir(PathBuf),
    /// A head-layout file (`configs/*.json`): a model of that layout with weights made from
    /// `seed` and GPT-2's 256 byte tokens as its tokenizer, for shape, memory and speed work.
    Layout { path: PathBuf, seed: u64 },
}

/// A loaded model and everything the commands report about it.
pub struct Loaded {
    pub model: Gpt2,
    pub tokenizer: Tokenizer,
    /// The repo id or the path: what reports call the model.
    pub name: String,
    /// The files read; `None` for a layout with random weights.
    pub files: Option<ModelFiles>,
    /// Finding (and downloading) the files, reading and casting the weights, and the tokenizer.
    pub load_time: Duration,
}

impl ModelSource {
    /// A Hub repo, with the GPT-2 family's short names (`gpt2`, `gpt2-medium`, ...) resolved.
    pub fn hub(name: &str, revision: &str) -> Self {
        Self::Hub {
            repo: crate::hub::repo_id(name).to_string(),
            revision: revision.to_string(),
        }
    }

    /// A local model folder.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        Self::Dir(path.into())
    }

    /// A layout file with random weights from seed 0.
    pub fn layout(path: impl Into<PathBuf>) -> Self {
        Self::Layout {
            path: path.into(),
            seed: 0,
        }
    }

    /// What reports call the model: the repo id, or the path.
    pub fn name(&self) -> String {
        match self {
            Self::Hub { repo, .. } => repo.clone(),
            Self::Dir(path) | Self::Layout { path, .. } => path.display().to_string(),
        }
    }

    /// Whether the weights are seeded random numbers (a layout file).
    pub fn is_random(&self) -> bool {
        matches!(self, Self::Layout { .. })
    }

    /// Only the config: from the Hub, only `config.json` is fetched.
    pub fn config(&self) -> Result<Config> {
        match self {
            Self::Layout { path, .. } => Config::from_layout_file(path),
            Self::Dir(dir) => Config::from_file(dir_file(dir, "config.json")?),
            Self::Hub { repo, revision } => {
                Config::from_file(crate::hub::Hub::new(repo, revision)?.config_file()?)
            }
        }
    }

    /// Every file of the model, downloading what the cache lacks; `None` for a layout file.
    pub fn files(&self) -> Result<Option<ModelFiles>> {
        match self {
            Self::Layout { .. } => Ok(None),
            Self::Dir(dir) => files_in(dir).map(Some),
            Self::Hub { repo, revision } => crate::hub::Hub::new(repo, revision)?.files().map(Some),
        }
    }

    /// The files a load reads that are on disk now (nothing is downloaded): the layout file, or
    /// the config, weights (shards and their index) and tokenizer files of a folder or of the
    /// Hub cache. What no output may replace ([`crate::output::protect`]).
    pub fn local_files(&self) -> Vec<PathBuf> {
        let hub = match self {
            Self::Layout { path, .. } => return vec![path.clone()],
            Self::Dir(_) => None,
            Self::Hub { repo, revision } => match crate::hub::Hub::new(repo, revision) {
                Ok(hub) => Some(hub),
                Err(_) => return Vec::new(),
            },
        };
        let present = |name: &str| match (self, &hub) {
            (Self::Dir(dir), _) => Some(dir.join(name)).filter(|p| p.is_file()),
            (_, Some(hub)) => hub.cached(name),
            _ => None,
        };
        let mut files: Vec<PathBuf> = MODEL_FILES.iter().filter_map(|f| present(f)).collect();
        if let Some(index) = present("model.safetensors.index.json") {
            let shards = shard_names(&index).unwrap_or_default();
            files.extend(shards.iter().filter_map(|s| present(s)));
        }
        files
    }

    /// Every file of [`ModelSource::local_files`] is an input of this run: no output may replace
    /// it.
    pub fn protect_files(&self) -> Result<()> {
        self.local_files()
            .iter()
            .try_for_each(|f| crate::output::protect(f, "one of the model's own files"))
    }

    /// Finds the files, then loads the model as `opts` says, and its tokenizer. Its files are
    /// [`crate::output::protect`]ed: no output of the run replaces them.
    pub fn load(&self, opts: &LoadOptions) -> Result<Loaded> {
        let start = Instant::now();
        let files = self.files()?;
        // After the download: the Hub cache has them now.
        self.protect_files()?;
        let (model, tokenizer) = match (&files, self) {
            (Some(f), _) => {
                let config = Config::from_file(&f.config)?;
                // The tokenizer (parsing ~1 MB of JSON) loads on its own thread meanwhile.
                std::thread::scope(|s| {
                    let vocab_size = config.vocab_size;
                    let tokenizer = s.spawn(move || {
                        let t = Tokenizer::from_files(&f.tokenizer)?;
                        t.check_vocab_size(vocab_size)?;
                        Ok::<_, Error>(t)
                    });
                    let model = Gpt2::new(config, Checkpoint::Files(f.weights.clone()), opts)?;
                    let tokenizer = tokenizer
                        .join()
                        .map_err(|_| Error::Tokenizer("the tokenizer thread panicked".into()))??;
                    Ok::<_, Error>((model, tokenizer))
                })?
            }
            (None, Self::Layout { .. }) => {
                let model = self.load_model(opts)?;
                let tokenizer = Tokenizer::bytes_only(model.config().eos_token_id)?;
                (model, tokenizer)
            }
            (None, _) => return Err(Error::Input("the model has no files".into())),
        };
        Ok(Loaded {
            model,
            tokenizer,
            name: self.name(),
            files,
            load_time: start.elapsed(),
        })
    }

    /// Only the model: its config and weights, no tokenizer (a folder needs none).
    pub fn load_model(&self, opts: &LoadOptions) -> Result<Gpt2> {
        let (config, checkpoint) = match self {
            Self::Layout { path, seed } => (
                Config::from_layout_file(path)?,
                Checkpoint::Random { seed: *seed },
            ),
            Self::Dir(dir) => (
                Config::from_file(dir_file(dir, "config.json")?)?,
                Checkpoint::Files(safetensors_in(dir)?),
            ),
            Self::Hub { repo, revision } => {
                let hub = crate::hub::Hub::new(repo, revision)?;
                (
                    Config::from_file(hub.config_file()?)?,
                    Checkpoint::Files(hub.weights()?),
                )
            }
        };
        Gpt2::new(config, checkpoint, opts)
    }
}

/// The files of a model folder (or snapshot) that a load may read, besides the shards an index
/// names.
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
];

/// `dir/name`, checking the folder first so that the error says what is wrong with it.
fn dir_file(dir: &Path, name: &str) -> Result<PathBuf> {
    check_dir(dir)?;
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(Error::Input(format!("{}: not a file", path.display()))),
        Err(_) if path.is_symlink() => Err(broken_link(&path)),
        Err(_) => Err(Error::Input(format!(
            "{}: no {name} in the model folder",
            dir.display()
        ))),
    }
}

fn check_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Input(format!(
            "model folder {} is a file, not a folder",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Input(format!(
            "model folder {} does not exist",
            dir.display()
        ))),
        Err(err) => Err(Error::io(dir, err)),
    }
}

fn broken_link(path: &Path) -> Error {
    let target = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    Error::Input(format!(
        "{} is a broken symlink (to {target})",
        path.display()
    ))
}

/// Whether `dir/name` exists as a file, or is a link to nowhere (an error worth its own words).
fn present(dir: &Path, name: &str) -> Result<bool> {
    let path = dir.join(name);
    if path.is_file() {
        return Ok(true);
    }
    if path.is_symlink() && !path.exists() {
        return Err(broken_link(&path));
    }
    Ok(false)
}

/// The files of a local model folder; nothing touches the network.
pub fn files_in(dir: &Path) -> Result<ModelFiles> {
    let config = dir_file(dir, "config.json")?;
    for name in ["tokenizer.json", "vocab.json", "merges.txt"] {
        present(dir, name)?; // a broken link is worth its own words
    }
    let tokenizer = TokenizerFiles::find_in(dir)?;
    Ok(ModelFiles {
        config,
        weights: safetensors_in(dir)?,
        tokenizer,
    })
}

/// The safetensors files of a model folder, refusing folders that only have pickle weights.
fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if present(dir, "model.safetensors")? {
        return Ok(vec![dir.join("model.safetensors")]);
    }
    if present(dir, "model.safetensors.index.json")? {
        let shards = shard_names(&dir.join("model.safetensors.index.json"))?;
        return Ok(shards.into_iter().map(|f| dir.join(f)).collect());
    }
    let msg = if dir.join("pytorch_model.bin").exists() {
        "has only pytorch_model.bin (pickle), which gpt2 never loads; convert it to safetensors"
    } else {
        "has no model.safetensors (or model.safetensors.index.json)"
    };
    Err(Error::Input(format!("{}: {msg}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpt2-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    fn err(r: Result<impl Sized>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn a_folder_loads_whole_or_its_first_layers() -> Result<()> {
        let source = ModelSource::dir(fixture("tiny"));
        let loaded = source.load(&LoadOptions::default())?;
        assert_eq!(loaded.name, fixture("tiny").display().to_string());
        let files = loaded.files.as_ref().map(|f| f.weights.len());
        assert_eq!(files, Some(1));
        assert!(loaded.tokenizer.vocab_size() > 0);
        // First layers only: no logits.
        let part = source.load_model(&LoadOptions::default().first_layers(1))?;
        let ids = candle_core::Tensor::new(&[[1u32, 2]], part.device())?;
        assert!(part.forward(&ids, None).is_err());
        assert!(part
            .for_each_attention(&ids, None, &[0], |_, _| Ok(()))
            .is_ok());
        Ok(())
    }

    #[test]
    fn a_layout_has_random_weights_and_byte_tokens() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.json");
        let source = ModelSource::layout(&path);
        assert!(source.is_random());
        let loaded = source.load(&LoadOptions::default())?;
        assert!(loaded.files.is_none());
        assert_eq!(loaded.tokenizer.encode("ab")?.len(), 2);
        assert_eq!(source.config()?.n_embd, 64);
        Ok(())
    }

    #[test]
    fn folder_errors_say_what_is_wrong() -> Result<()> {
        let d = scratch("errors");
        let opts = LoadOptions::default();
        let file = d.join("a-file");
        std::fs::write(&file, "x").map_err(|e| Error::io(&file, e))?;
        let msg = err(ModelSource::dir(&file).load(&opts));
        assert!(msg.contains("is a file, not a folder"), "{msg}");
        let msg = err(ModelSource::dir(d.join("nope")).load(&opts));
        assert!(msg.contains("does not exist"), "{msg}");
        let msg = err(ModelSource::dir(&d).load(&opts));
        assert!(msg.contains("no config.json"), "{msg}");
        // A dangling model.safetensors link is named as such.
        for f in ["config.json", "tokenizer.json"] {
            let (from, to) = (fixture("tiny").join(f), d.join(f));
            std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
        }
        #[cfg(unix)]
        {
            let link = d.join("model.safetensors");
            std::os::unix::fs::symlink(d.join("gone"), &link).map_err(|e| Error::io(&link, e))?;
            let msg = err(ModelSource::dir(&d).load(&opts));
            assert!(msg.contains("is a broken symlink"), "{msg}");
        }
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }

    #[test]
    fn hub_names_resolve_aliases() {
        let s = ModelSource::hub("gpt2-medium", "main");
        assert_eq!(s.name(), "openai-community/gpt2-medium");
        assert_eq!(ModelSource::hub("org/x", "v1").name(), "org/x");
    }
}
