//! A run's folder: a Hugging Face model folder anyone loads (`config.json`, `model.safetensors`
//! with transformers' `save_pretrained` names, `tokenizer.json`), plus what `--resume` needs
//! (`optimizer.safetensors`: AdamW's moments; `training.json`: the options, the data and the
//! step). Written all or nothing: every file goes to a temporary beside it and the set is
//! renamed into place together, so a full disk or a Ctrl-C leaves the previous checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{DataSpec, TrainOptions};
use crate::checkpoint::{checkpoint_layout, Checkpoint, Weights};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::output::{commit_together, PendingFile};
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;

/// `training.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    /// Steps done when saved.
    pub(crate) step: u64,
    pub(crate) options: TrainOptions,
    pub(crate) data: DataSpec,
    /// What the weights started from.
    pub(crate) init: String,
    /// The dtype the run trains in.
    pub(crate) dtype: String,
}

/// A saved run, read back.
pub(crate) struct SavedRun {
    pub(crate) config: Config,
    pub(crate) tensors: HashMap<String, Tensor>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) moments: HashMap<String, Tensor>,
    pub(crate) record: RunRecord,
}

/// A model's config, every tensor of its layout as f32 (checkpoint quirks handled by
/// [`Weights`]: prefix, tied head, dtypes, finiteness) and its tokenizer.
pub(crate) fn read_model(
    source: &ModelSource,
) -> Result<(Config, HashMap<String, Tensor>, Tokenizer)> {
    let files = source
        .files()?
        .ok_or_else(|| Error::param("init", "needs a model folder or a Hub repo"))?;
    let config = Config::from_file(&files.config)?;
    let tokenizer = Tokenizer::from_files(&files.tokenizer)?;
    let weights = Weights::open(Checkpoint::Files(files.weights), &config, false)?;
    weights.check_layer_count(&config)?;
    let tensors = checkpoint_layout(&config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), weights.get(&name, &shape)?)))
        .collect::<Result<_>>()?;
    Ok((config, tensors, tokenizer))
}

/// The file name of each part of a run's folder.
const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const TOKENIZER: &str = "tokenizer.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const RECORD: &str = "training.json";

/// Writes the run's folder `out` (made if missing), all files or none.
pub(crate) fn write_run(
    out: &Path,
    config: &Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    moments: &HashMap<String, Tensor>,
    record: &RunRecord,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut hf = serde_json::to_value(config).map_err(|e| Error::Internal(e.to_string()))?;
    if let Some(map) = hf.as_object_mut() {
        // What transformers needs to pick the class, and the dropout the run trained with.
        map.insert("model_type".into(), "gpt2".into());
        map.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
        for key in ["attn_pdrop", "embd_pdrop", "resid_pdrop"] {
            map.insert(key.into(), serde_json::json!(record.options.dropout));
        }
        if config.n_kv_head.is_none() {
            map.remove("n_kv_head");
        }
    }
    let pretty = |v: &serde_json::Value| {
        serde_json::to_vec_pretty(v).map_err(|e| Error::Internal(e.to_string()))
    };
    let record_json = serde_json::to_value(record).map_err(|e| Error::Internal(e.to_string()))?;
    // save_pretrained's names: the body under `transformer.`, no `lm_head` (tied).
    let named: Vec<(String, &Tensor)> = tensors
        .iter()
        .map(|(n, t)| (format!("transformer.{n}"), t))
        .collect();
    let step = record.step.to_string();
    let weights = safetensors_bytes(named, &[("format", "pt"), ("step", &step)])?;
    let optimizer = safetensors_bytes(
        moments.iter().map(|(n, t)| (n.clone(), t)).collect(),
        &[("step", &step)],
    )?;
    let tokenizer_tmp = tempfile::NamedTempFile::new_in(out).map_err(|e| Error::io(out, e))?;
    tokenizer.save(tokenizer_tmp.path())?;
    let tokenizer_bytes =
        std::fs::read(tokenizer_tmp.path()).map_err(|e| Error::io(tokenizer_tmp.path(), e))?;
    let parts: [(&str, Vec<u8>); 5] = [
        (WEIGHTS, weights),
        (OPTIMIZER, optimizer),
        (TOKENIZER, tokenizer_bytes),
        (CONFIG, pretty(&hf)?),
        // Last: a folder whose record names a step has that step's weights.
        (RECORD, pretty(&record_json)?),
    ];
    let mut pending = Vec::with_capacity(parts.len());
    for (name, bytes) in parts {
        let mut file = PendingFile::create(&out.join(name))?;
        let written = file
            .file()
            .write_all(&bytes)
            .and_then(|_| file.file().sync_all());
        written.map_err(|e| file.write_error(e))?;
        pending.push(file);
    }
    commit_together(pending)
}

/// A safetensors file's bytes for `tensors`, with `metadata`.
fn safetensors_bytes(
    tensors: Vec<(String, &Tensor)>,
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>> {
    let info = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let bytes = safetensors::tensor::serialize(tensors, Some(info))
        .map_err(|e| Error::Internal(format!("cannot serialize the weights: {e}")))?;
    sorted_header(bytes)
}

/// `bytes` with its JSON header's keys in sorted order: safetensors writes the metadata from a
/// `HashMap`, whose order changes from process to process, and a resumed run must write the
/// same bytes as one that was never stopped. The header keeps its 8-byte padding; the data
/// offsets are relative to its end, so nothing else moves.
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = || Error::Internal("safetensors wrote a header we cannot read".into());
    let len = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(bad)? as usize;
    let header = bytes.get(8..8 + len).ok_or_else(bad)?;
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|_| bad())?;
    // serde_json's maps are ordered by key.
    let mut sorted = serde_json::to_vec(&value).map_err(|_| bad())?;
    sorted.resize(sorted.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + sorted.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// The tensors of a safetensors file we wrote, and the `step` of its metadata.
fn read_tensors(path: &Path) -> Result<(HashMap<String, Tensor>, u64)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::BadCheckpoint {
        file: path.to_path_buf(),
        msg,
    };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let step: u64 = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no step in its metadata".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    Ok((tensors, step))
}

/// Reads the run saved in `out`.
pub(crate) fn read_run(out: &Path) -> Result<SavedRun> {
    let record_path = out.join(RECORD);
    let text = std::fs::read_to_string(&record_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::param(
                "resume",
                format!("{} holds no run to resume (no {RECORD})", out.display()),
            )
        } else {
            Error::io(&record_path, e)
        }
    })?;
    let record: RunRecord = serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
        path: record_path.clone(),
        msg: e.to_string(),
    })?;
    let config = Config::from_file(out.join(CONFIG))?;
    let tokenizer = Tokenizer::from_file(out.join(TOKENIZER))?;
    tokenizer.check_vocab_size(config.vocab_size)?;
    // Both tensor files as written, in the run's dtype (through `Weights` an f64 run would
    // come back rounded to f32), each with the step it was saved at.
    let (weights, weights_step) = read_tensors(&out.join(WEIGHTS))?;
    let (moments, step) = read_tensors(&out.join(OPTIMIZER))?;
    for (what, s) in [("weights", weights_step), ("optimizer state", step)] {
        if s != record.step {
            return Err(Error::Input(format!(
                "{}: the {what} are from step {s}, {RECORD} from step {}; the folder mixes two \
                 saves",
                out.display(),
                record.step
            )));
        }
    }
    let mut tensors = HashMap::new();
    for (name, shape) in checkpoint_layout(&config) {
        let t =
            weights
                .get(&format!("transformer.{name}"))
                .ok_or_else(|| Error::MissingTensor {
                    name: format!("transformer.{name}"),
                    file: out.join(WEIGHTS),
                })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name,
                expected: shape,
                found: t.dims().to_vec(),
                file: out.join(WEIGHTS),
            });
        }
        tensors.insert(name, t.clone());
    }
    Ok(SavedRun {
        config,
        tensors,
        tokenizer,
        moments,
        record,
    })
}
