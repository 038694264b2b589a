//! Reading GPT-2 weights: memory-mapped safetensors (one file or shards), an in-memory map, or
//! seeded random numbers, checked and handed to `linear::storage`, which decides the storage
//! each layer runs from.
//!
//! Every checkpoint quirk is handled here, once:
//! - names come with or without the `transformer.` prefix (`save_pretrained` writes it, the Hub's
//!   `openai-community/gpt2` does not);
//! - HF `Conv1D` weights are stored (in, out), as `linear::Linear` reads them;
//! - `attn.bias` / `attn.masked_bias` are old mask buffers, not parameters: ignored;
//! - `lm_head.weight` is optional: absent, the head is tied to `wte`;
//! - a float dtype other than the target is converted (f64 included); an integer or boolean
//!   tensor, a NaN or an infinity is refused, naming the tensor.
//!
//! On the CPU, an f32 weight that the model keeps in f32 is not copied: the layer reads the
//! mapped file. (As with every mmap loader, llama.cpp's and candle's included, the file must not
//! be truncated while the model lives; `LoadOptions::mmap = false` copies instead.) Weights
//! converted at load are streamed a chunk at a time and the file's pages given back as they are
//! read, so memory holds one copy of the weights in their final form.
//!
//! Pickle (`pytorch_model.bin`) is never read.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorInfo};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::tokenizer::TokenizerFiles;

mod random;

pub use random::random_checkpoint;
use random::random_tensor;
pub(crate) use random::{checkpoint_layout, layout_elements};

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

/// One memory-mapped safetensors file and its header.
struct MappedFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    /// Where the data starts: after the 8-byte length and the JSON header.
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl MappedFile {
    /// `populate`: map every page at once (the weights are used in place).
    fn open(path: &Path, populate: bool) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut options = memmap2::MmapOptions::new();
        if populate {
            options.populate();
        }
        // SAFETY: mapped read-only. Like every mmap-based loader we rely on nobody truncating
        // the file while it is mapped (see the module doc). Populated up front when the f32
        // weights are used in place: one call maps every page already in the page cache,
        // instead of a fault per 4 KiB page later. Weights that are converted are read once and
        // their pages given back, so mapping them all up front would only raise the peak.
        let map = unsafe { options.map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header, meta) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::BadCheckpoint {
                file: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map: Arc::new(map),
            data_start: 8 + header,
            tensors,
        })
    }

    /// The byte range of a tensor in the map (validated by `read_metadata`).
    fn range(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        self.data_start + info.data_offsets.0..self.data_start + info.data_offsets.1
    }

    /// Gives the pages of `range` back to the page cache: they were converted, and keeping them
    /// would hold the weights twice.
    fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let (start, end) = (range.start.next_multiple_of(PAGE), range.end / PAGE * PAGE);
        if end > start {
            // SAFETY: a read-only, file-backed private mapping: dropping its pages only makes
            // the next read fetch them from the file again; nothing refers to them now (the
            // converted copy is owned).
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

enum Source {
    /// The files, and which file holds each tensor name.
    Files {
        files: Vec<MappedFile>,
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

/// Named tensors, resolved against the optional `transformer.` prefix, shape-checked and
/// validated as they are taken. What they become (the storage the layers run from) is
/// `linear::storage`'s decision.
pub(crate) struct Weights {
    source: Source,
    prefix: &'static str,
}

/// A tensor's stored dtype, as far as loading cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    F32,
    F16,
    Bf16,
    F64,
}

/// Elements converted at a time when streaming a tensor.
const CHUNK: usize = 1 << 18;

impl Weights {
    /// Opens `checkpoint` for a model of `config`. `in_place`: the weights will be read where
    /// they lie in the mapped files (f32 on the host), so every page is mapped up front.
    pub(crate) fn open(checkpoint: Checkpoint, config: &Config, in_place: bool) -> Result<Self> {
        let source = match checkpoint {
            Checkpoint::Files(paths) => {
                let mut files = Vec::with_capacity(paths.len());
                let mut routing = HashMap::new();
                for path in paths {
                    let file = MappedFile::open(&path, in_place)?;
                    for name in file.tensors.keys() {
                        routing.insert(name.clone(), files.len());
                    }
                    files.push(file);
                }
                Source::Files { files, routing }
            }
            Checkpoint::Tensors(map) => Source::Map(map),
            Checkpoint::Random { seed } => Source::Random {
                seed,
                layout: checkpoint_layout(config).into_iter().collect(),
            },
        };
        let mut weights = Self { source, prefix: "" };
        if !weights.has("wte.weight") && weights.has("transformer.wte.weight") {
            weights.prefix = "transformer.";
        }
        Ok(weights)
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
                files.get(i).map(|f| f.path.clone()).unwrap_or_default()
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

    fn bad(&self, full: &str, msg: String) -> Error {
        Error::BadTensor {
            file: self.file_of(full),
            name: full.to_string(),
            msg,
        }
    }

    /// The stored name of `name`, checked to have `shape` and a float dtype.
    fn find(&self, name: &str, shape: &[usize]) -> Result<(String, Stored)> {
        let full = self.resolve(name).ok_or_else(|| Error::MissingTensor {
            name: format!("{}{name}", self.prefix),
            file: self.file_of(""),
        })?;
        let (found, stored) = match &self.source {
            Source::Files { files, routing } => {
                let info = &files[routing[&full]].tensors[&full];
                let stored = match info.dtype {
                    StDtype::F32 => Some(Stored::F32),
                    StDtype::F16 => Some(Stored::F16),
                    StDtype::BF16 => Some(Stored::Bf16),
                    StDtype::F64 => Some(Stored::F64),
                    _ => None,
                };
                (
                    info.shape.clone(),
                    stored.ok_or(format!("{:?}", info.dtype)),
                )
            }
            Source::Map(map) => {
                let t = &map[&full];
                let stored = match t.dtype() {
                    DType::F32 => Ok(Stored::F32),
                    DType::F16 => Ok(Stored::F16),
                    DType::BF16 => Ok(Stored::Bf16),
                    DType::F64 => Ok(Stored::F64),
                    d => Err(format!("{d:?}")),
                };
                (t.dims().to_vec(), stored)
            }
            Source::Random { layout, .. } => (layout[&full].clone(), Ok(Stored::F32)),
        };
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: full.clone(),
                expected: shape.to_vec(),
                found,
                file: self.file_of(&full),
            });
        }
        let stored = stored.map_err(|d| {
            self.bad(
                &full,
                format!("has dtype {d}; weights must be floating point (F32, F16, BF16 or F64)"),
            )
        })?;
        crate::interrupt::check()?;
        Ok((full, stored))
    }

    /// The values of `full` as f32, a chunk of at most [`CHUNK`] at a time, each checked to be
    /// finite before `f` sees it (offset in elements, values). A file's pages are given back
    /// after each chunk.
    fn stream(
        &self,
        full: &str,
        stored: Stored,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let check = |offset: usize, v: &[f32]| -> Result<()> {
            match first_non_finite(v) {
                Some(i) => Err(self.bad(
                    full,
                    format!(
                        "holds {} at flat index {}; weights must be finite numbers",
                        v[i],
                        offset + i
                    ),
                )),
                None => Ok(()),
            }
        };
        match &self.source {
            Source::Files { files, routing } => {
                let file = &files[routing[full]];
                let range = file.range(&file.tensors[full]);
                let bytes = &file.map[range.clone()];
                let size = match stored {
                    Stored::F32 => 4,
                    Stored::F16 | Stored::Bf16 => 2,
                    Stored::F64 => 8,
                };
                // Aligned f32 is read where it lies: decoding it element by element was a tenth
                // of an `--dtype f16` load (docs/PERF.md).
                if let (Stored::F32, Ok(all)) = (stored, bytemuck::try_cast_slice::<u8, f32>(bytes))
                {
                    for (c, part) in all.chunks(CHUNK).enumerate() {
                        check(c * CHUNK, part)?;
                        f(c * CHUNK, part)?;
                        let start = range.start + c * CHUNK * size;
                        file.release(start..start + part.len() * size);
                    }
                    return Ok(());
                }
                let mut buf = Vec::with_capacity(CHUNK);
                for (c, part) in bytes.chunks(CHUNK * size).enumerate() {
                    buf.clear();
                    buf.extend(part.chunks_exact(size).map(|b| decode(b, stored)));
                    check(c * CHUNK, &buf)?;
                    f(c * CHUNK, &buf)?;
                    let start = range.start + c * CHUNK * size;
                    file.release(start..start + part.len());
                }
                Ok(())
            }
            Source::Map(map) => {
                let v = map[full]
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                check(0, &v)?;
                f(0, &v)
            }
            Source::Random { seed, layout } => {
                let t = random_tensor(full, &layout[full], *seed)?;
                f(0, &t.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// All values of `full` as f32 (borrowed from the map when they are f32 there), checked.
    fn values(&self, full: &str, stored: Stored) -> Result<Cow<'_, [f32]>> {
        if let (Source::Files { files, routing }, Stored::F32) = (&self.source, stored) {
            let file = &files[routing[full]];
            if let Ok(v) =
                bytemuck::try_cast_slice::<u8, f32>(&file.map[file.range(&file.tensors[full])])
            {
                if let Some(i) = first_non_finite(v) {
                    return Err(self.bad(
                        full,
                        format!(
                            "holds {} at flat index {i}; weights must be finite numbers",
                            v[i]
                        ),
                    ));
                }
                return Ok(Cow::Borrowed(v));
            }
        }
        let mut all = Vec::new();
        self.stream(full, stored, |_, v| {
            all.extend_from_slice(v);
            Ok(())
        })?;
        Ok(Cow::Owned(all))
    }

    /// Gives the mapped pages of tensor `full` back (it was copied).
    fn release(&self, full: &str) {
        if let Source::Files { files, routing } = &self.source {
            let file = &files[routing[full]];
            file.release(file.range(&file.tensors[full]));
        }
    }

    /// Tensor `name`, checked to have `shape` and a float dtype, ready to be read.
    pub(crate) fn entry(&self, name: &str, shape: &[usize]) -> Result<Entry<'_>> {
        let (full, stored) = self.find(name, shape)?;
        Ok(Entry {
            weights: self,
            full,
            stored,
        })
    }

    /// Tensor `name` of `shape` as f32 on the host: biases, layer norms, `wpe`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let v = self.entry(name, shape)?.values()?.into_owned();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
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

/// One tensor of a checkpoint, found and checked (name, shape, float dtype), not yet read.
pub(crate) struct Entry<'a> {
    weights: &'a Weights,
    full: String,
    stored: Stored,
}

impl<'a> Entry<'a> {
    /// The name it is stored under.
    pub(crate) fn name(&self) -> &str {
        &self.full
    }

    /// Where its values lie in a mapped file when they can be used there as they are (aligned
    /// little-endian f32), checked to be finite; `None` when they must be read (converted or
    /// copied).
    pub(crate) fn in_place(&self) -> Result<Option<(Arc<memmap2::Mmap>, std::ops::Range<usize>)>> {
        let Source::Files { files, routing } = &self.weights.source else {
            return Ok(None);
        };
        if self.stored != Stored::F32 {
            return Ok(None);
        }
        let file = &files[routing[&self.full]];
        let range = file.range(&file.tensors[&self.full]);
        let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(&file.map[range.clone()]) else {
            return Ok(None);
        };
        if let Some(i) = first_non_finite(v) {
            return Err(self.error(format!(
                "holds {} at flat index {i}; weights must be finite numbers",
                v[i]
            )));
        }
        Ok(Some((file.map.clone(), range)))
    }

    /// All values as f32 (borrowed from the map when they are f32 there), checked finite.
    pub(crate) fn values(&self) -> Result<Cow<'a, [f32]>> {
        self.weights.values(&self.full, self.stored)
    }

    /// The values as f32, a chunk at a time, each checked finite before `f` sees it (offset in
    /// elements, values); a file's pages are given back as they are read.
    pub(crate) fn stream(&self, f: impl FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        self.weights.stream(&self.full, self.stored, f)
    }

    /// Gives the file's pages of this tensor back: it was copied.
    pub(crate) fn release(&self) {
        self.weights.release(&self.full)
    }

    /// An error about this tensor, naming it and its file.
    pub(crate) fn error(&self, msg: String) -> Error {
        self.weights.bad(&self.full, msg)
    }
}

/// One little-endian element of `stored` as f32.
fn decode(b: &[u8], stored: Stored) -> f32 {
    match stored {
        Stored::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Stored::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Stored::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Stored::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
    }
}

/// The index of the first NaN or infinity: the slice is scanned with bit tests the compiler
/// vectorises, in chunks shared by the pool's threads, and only if one has a non-finite value is
/// it searched again.
fn first_non_finite(v: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let exp = 0x7f80_0000u32;
    let bad = |c: &[f32]| c.iter().fold(false, |a, x| a | (x.to_bits() & exp == exp));
    let chunks = v.len().div_ceil(CHUNK);
    let found = std::sync::atomic::AtomicBool::new(false);
    let scan = |i: usize| {
        let c = &v[i * CHUNK..v.len().min((i + 1) * CHUNK)];
        if bad(c) {
            found.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    if chunks > 4 {
        // A panic cannot come from a bit test; if the pool failed, scan here.
        if crate::pool::run(chunks, &scan).is_err() {
            (0..chunks).for_each(scan);
        }
    } else {
        (0..chunks).for_each(scan);
    }
    if found.into_inner() {
        v.iter().position(|x| !x.is_finite())
    } else {
        None
    }
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
