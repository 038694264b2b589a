//! Reading GPT-2 weights: memory-mapped safetensors (one file or shards) or an in-memory map.
//!
//! Every checkpoint quirk is handled here, once:
//! - names come with or without the `transformer.` prefix (`save_pretrained` writes it, the Hub's
//!   `openai-community/gpt2` does not);
//! - HF `Conv1D` weights are stored (in, out); candle's `Linear` wants (out, in);
//! - `attn.bias` / `attn.masked_bias` are old mask buffers, not parameters: ignored;
//! - `lm_head.weight` is optional: absent, the head is tied to `wte`.
//!
//! Pickle (`pytorch_model.bin`) is never read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer_norm::LayerNorm;
use crate::linear::Linear;
use crate::rng::{hash_name, SplitMix64};
use crate::tokenizer::TokenizerFiles;

enum Source {
    /// One mmap per file, and which file holds each tensor name.
    Files {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        routing: HashMap<String, usize>,
    },
    Map(HashMap<String, Tensor>),
    /// Tensors made on demand, one at a time, so a random model never exists twice in memory
    /// (an f32 copy next to the model's dtype would not fit for a 7B layout).
    Random {
        seed: u64,
        layout: HashMap<String, Vec<usize>>,
    },
}

/// The files of a model, on local disk.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    pub config: PathBuf,
    /// `model.safetensors`, or every shard.
    pub weights: Vec<PathBuf>,
    pub tokenizer: TokenizerFiles,
}

/// Where a model's weights come from.
pub enum Checkpoint {
    /// safetensors files: one, or every shard of a sharded checkpoint. Memory-mapped.
    Files(Vec<PathBuf>),
    /// Tensors already in memory, named as in a checkpoint file (with or without the
    /// `transformer.` prefix, Conv1D weights (in, out)).
    Tensors(HashMap<String, Tensor>),
    /// Seeded random weights for the config's layout, made one tensor at a time in the model's
    /// dtype, so a random 7B layout never exists twice in memory (see [`random_checkpoint`]).
    Random { seed: u64 },
}

/// Named tensors, resolved against the optional `transformer.` prefix, shape-checked and cast to
/// the model's dtype and device as they are taken.
pub(crate) struct Weights {
    source: Source,
    prefix: &'static str,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Opens `checkpoint` for a model of `config`, to be cast to `dtype` on `device`.
    pub(crate) fn open(
        checkpoint: Checkpoint,
        config: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let source = match checkpoint {
            Checkpoint::Files(paths) => {
                let mut files = Vec::with_capacity(paths.len());
                let mut routing = HashMap::new();
                for path in paths {
                    // SAFETY: the file is mapped read-only; like every mmap-based loader
                    // (candle's own VarBuilder included) we rely on nobody truncating it while
                    // the model loads.
                    let st =
                        unsafe { MmapedSafetensors::new(&path) }.map_err(|e| bad_file(&path, e))?;
                    for (name, _) in st.tensors() {
                        routing.insert(name, files.len());
                    }
                    files.push((path, st));
                }
                Source::Files { files, routing }
            }
            Checkpoint::Tensors(map) => Source::Map(map),
            Checkpoint::Random { seed } => Source::Random {
                seed,
                layout: checkpoint_layout(config).into_iter().collect(),
            },
        };
        Self::new(source, dtype, device)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Result<Self> {
        let mut weights = Self {
            source,
            prefix: "",
            dtype,
            device: device.clone(),
        };
        if !weights.has("wte.weight") && weights.has("transformer.wte.weight") {
            weights.prefix = "transformer.";
        }
        Ok(weights)
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    fn has(&self, full_name: &str) -> bool {
        match &self.source {
            Source::Files { routing, .. } => routing.contains_key(full_name),
            Source::Map(map) => map.contains_key(full_name),
            Source::Random { layout, .. } => layout.contains_key(full_name),
        }
    }

    /// Every tensor name, as stored (with any prefix).
    fn names(&self) -> Vec<&str> {
        match &self.source {
            Source::Files { routing, .. } => routing.keys().map(String::as_str).collect(),
            Source::Map(map) => map.keys().map(String::as_str).collect(),
            Source::Random { layout, .. } => layout.keys().map(String::as_str).collect(),
        }
    }

    /// The file to name in error messages about `full_name`.
    fn file_of(&self, full_name: &str) -> PathBuf {
        match &self.source {
            Source::Files { files, routing } => {
                let i = routing.get(full_name).copied().unwrap_or(0);
                files.get(i).map(|(p, _)| p.clone()).unwrap_or_default()
            }
            Source::Map(_) | Source::Random { .. } => PathBuf::from("<in-memory weights>"),
        }
    }

    /// The stored name of `name`: prefixed first, then bare (transformers writes the body as
    /// `transformer.*` but `lm_head.weight` without prefix).
    fn resolve(&self, name: &str) -> Option<String> {
        [format!("{}{name}", self.prefix), name.to_string()]
            .into_iter()
            .find(|n| self.has(n))
    }

    /// Whether the checkpoint holds `name` (prefix resolved).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Takes tensor `name`, checking it has `shape`, cast to the model's dtype and device.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.resolve(name).ok_or_else(|| Error::MissingTensor {
            name: format!("{}{name}", self.prefix),
            file: self.file_of(""),
        })?;
        let found: Vec<usize> = match &self.source {
            Source::Files { files, routing } => {
                let (path, st) = &files[routing[&full]];
                let view = st.get(&full).map_err(|e| bad_file(path, e))?;
                view.shape().to_vec()
            }
            Source::Map(map) => map[&full].dims().to_vec(),
            Source::Random { layout, .. } => layout[&full].clone(),
        };
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: full.clone(),
                expected: shape.to_vec(),
                found,
                file: self.file_of(&full),
            });
        }
        let tensor = match &self.source {
            Source::Files { files, routing } => {
                let (path, st) = &files[routing[&full]];
                let t = st
                    .load(&full, &Device::Cpu)
                    .map_err(|e| bad_file(path, e))?;
                check_weight(&t, &full, path)?;
                t.to_device(&self.device)?
            }
            Source::Map(map) => {
                check_weight(&map[&full], &full, Path::new("<in-memory weights>"))?;
                map[&full].to_device(&self.device)?
            }
            Source::Random { seed, .. } => {
                random_tensor(&full, shape, *seed)?.to_device(&self.device)?
            }
        };
        crate::interrupt::check()?;
        Ok(tensor.to_dtype(self.dtype)?)
    }

    /// An HF `Conv1D` (`y = x W + b`, `W` stored (in, out)) as a candle `Linear` (weight (out, in)).
    pub(crate) fn conv1d(&self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let w = self.get(&format!("{name}.weight"), &[d_in, d_out])?;
        let b = self.get(&format!("{name}.bias"), &[d_out])?;
        Ok(Linear::new(w.t()?.contiguous()?, Some(b)))
    }

    pub(crate) fn layer_norm(&self, name: &str, size: usize, eps: f64) -> Result<LayerNorm> {
        let w = self.get(&format!("{name}.weight"), &[size])?;
        let b = self.get(&format!("{name}.bias"), &[size])?;
        Ok(LayerNorm::new(w, b, eps))
    }

    /// Fails if the checkpoint holds layers beyond `n_layer`: a config that contradicts the weights
    /// would otherwise silently run a truncated model.
    pub(crate) fn check_layer_count(&self, config: &Config) -> Result<()> {
        let body = |n: &str| n.strip_prefix(self.prefix).unwrap_or(n).to_string();
        let extra = self.names().into_iter().find_map(|n| {
            let rest = body(n);
            let layer: usize = rest.strip_prefix("h.")?.split('.').next()?.parse().ok()?;
            (layer >= config.n_layer).then_some((n.to_string(), layer))
        });
        match extra {
            None => Ok(()),
            Some((name, layer)) => Err(Error::ConfigContradictsWeights {
                msg: format!(
                    "tensor `{name}` belongs to layer {layer}, but config.json has n_layer = {}",
                    config.n_layer
                ),
                file: self.file_of(&name),
            }),
        }
    }
}

/// Refuses a tensor that cannot be a weight: an integer or boolean dtype (a float is cast to the
/// model's dtype, as transformers' `torch_dtype` does; an integer would silently become nonsense),
/// or a NaN or an infinity, which would make every logit NaN (greedy "!!!!", rc 0).
fn check_weight(t: &Tensor, name: &str, file: &Path) -> Result<()> {
    let bad = |msg: String| Error::BadTensor {
        file: file.to_path_buf(),
        name: name.to_string(),
        msg,
    };
    if !t.dtype().is_float() {
        return Err(bad(format!(
            "has dtype {:?}; weights must be floating point (F32, F16, BF16 or F64)",
            t.dtype()
        )));
    }
    // One pass over the values: f32 holds every f16/bf16 value, and an f64 beyond f32's range
    // would be an infinity once cast.
    let flat = t.flatten_all()?.to_dtype(DType::F32)?;
    let (storage, layout) = flat.storage_and_layout();
    let first_bad = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            v[a..b].iter().position(|x| !x.is_finite())
        }
        _ => None,
    };
    match first_bad {
        Some(i) => {
            let v = flat.get(i)?.to_scalar::<f32>()?;
            Err(bad(format!(
                "holds {v} at flat index {i}; weights must be finite numbers"
            )))
        }
        None => Ok(()),
    }
}

fn bad_file(path: &Path, e: candle_core::Error) -> Error {
    // candle wraps file errors with the path, which our message already starts with.
    let e = match e {
        candle_core::Error::WithPath { inner, .. } => *inner,
        e => e,
    };
    match e {
        // Reading failed (a folder, a permission, a device): say so, not "invalid".
        candle_core::Error::Io(err) => Error::io(path, err),
        e => Error::BadCheckpoint {
            file: path.to_path_buf(),
            msg: e.to_string().lines().next().unwrap_or_default().to_string(),
        },
    }
}

/// Every tensor of a GPT-2 checkpoint for `config`, with its shape, named as in the Hub's
/// `openai-community/gpt2` file (Conv1D weights (in, out), no prefix, head tied to `wte`).
pub(crate) fn checkpoint_layout(config: &Config) -> Vec<(String, Vec<usize>)> {
    let (c, inner) = (config.n_embd, config.inner_size());
    let qkv = c + 2 * config.kv_heads() * config.head_size();
    let mut layout = vec![
        ("wte.weight".to_string(), vec![config.vocab_size, c]),
        ("wpe.weight".to_string(), vec![config.n_positions, c]),
    ];
    for i in 0..config.n_layer {
        for (name, d_in, d_out) in [
            ("attn.c_attn", c, qkv),
            ("attn.c_proj", c, c),
            ("mlp.c_fc", c, inner),
            ("mlp.c_proj", inner, c),
        ] {
            layout.push((format!("h.{i}.{name}.weight"), vec![d_in, d_out]));
            layout.push((format!("h.{i}.{name}.bias"), vec![d_out]));
        }
        for ln in ["ln_1", "ln_2"] {
            layout.push((format!("h.{i}.{ln}.weight"), vec![c]));
            layout.push((format!("h.{i}.{ln}.bias"), vec![c]));
        }
    }
    layout.push(("ln_f.weight".to_string(), vec![c]));
    layout.push(("ln_f.bias".to_string(), vec![c]));
    layout
}

/// A seeded random checkpoint for `config`, named and shaped as the Hub's GPT-2 files; each tensor
/// as [`Checkpoint::Random`] makes it.
pub fn random_checkpoint(config: &Config, seed: u64) -> Result<HashMap<String, Tensor>> {
    checkpoint_layout(config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), random_tensor(&name, &shape, seed)?)))
        .collect()
}

/// One tensor of a random checkpoint, from `seed` and its name alone (so it does not depend on
/// which other tensors were made).
///
/// The scales are not GPT-2's training init (std 0.02, which gives near-uniform attention) but
/// ones that make heads attend sharply: projections with std `1/√fan_in`, embeddings std 1, layer
/// norms and biases random around their neutral values. Values are uniform with those means and
/// standard deviations: random-weight runs are for shapes, memory and speed, and uniform numbers
/// are ten times cheaper to make than normal ones at 7B parameters.
fn random_tensor(name: &str, shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = SplitMix64::new(seed ^ hash_name(name));
    let is_norm = name.contains("ln_");
    let (mean, std) = match (is_norm, name.ends_with(".bias")) {
        (true, false) => (1.0, 0.1),
        (_, true) => (0.0, 0.1),
        _ if name.starts_with("wte") || name.starts_with("wpe") => (0.0, 1.0),
        _ => (0.0, (shape[0] as f32).powf(-0.5)),
    };
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| mean + std * rng.unit()).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// The shard file names listed in a `model.safetensors.index.json`.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| Error::BadCheckpoint {
        file: index.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(index).map_err(|err| Error::io(index, err))?;
    let parsed: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut files: Vec<String> = parsed["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(bad("no `weight_map` entries".into()));
    }
    // Shards live in the model folder: a name that leaves it (`../../etc/passwd`, `/x`) is not
    // a shard of this model.
    use std::path::Component;
    if let Some(f) = files.iter().find(|f| {
        f.is_empty()
            || !Path::new(f.as_str())
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
    }) {
        return Err(bad(format!(
            "shard `{f}` is outside the model folder; only files inside it are read"
        )));
    }
    Ok(files)
}
