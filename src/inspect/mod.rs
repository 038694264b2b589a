//! `gpt2 inspect-heads`: what every attention head attends to, and what kind of head it is.
//!
//! The prompt runs through the model's layers up to the last chosen one, capturing their
//! post-softmax attention: the numbers transformers returns with `output_attentions=True`. The
//! model hands over each layer as it is computed ([`Gpt2::for_each_attention`]), so terminal
//! heatmaps (`text`), JSON, a PNG figure ([`image`]) and one self-contained HTML page (`html`)
//! take whole layers in order ([`for_each_layer`]) and drop each once written. npy and
//! safetensors (`export`) are filled a block of query rows at a time ([`for_each_row_block`]), so
//! they never hold more than one layer's attention whatever the number of layers and the prompt
//! length. [`scores`] says what kind of head each one is.
//!
//! ```no_run
//! use gpt2::inspect::{self, Format, LayerChoice, Output, Selection, Tokens};
//! use gpt2::prompt::PromptOptions;
//! use gpt2::{LoadOptions, ModelSource, Prompt};
//! let loaded = ModelSource::dir("path/to/gpt2").load(&LoadOptions::default())?;
//! let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
//! let text = "The cat sat on the mat";
//! let prompt = Prompt::new(tokenizer, text, model.config(), PromptOptions::default())?;
//! let tokens = Tokens::new(tokenizer, &prompt)?;
//! let selection = Selection::new(model.config(), LayerChoice::One(5), None)?;
//! let output = Output::new(Format::Npy, Some("layer5.npy".into()))?;
//! inspect::write_attention(model, "gpt2", &tokens, &selection, &output)?;
//! # Ok::<(), gpt2::Error>(())
//! ```

mod export;
mod font;

pub use export::write_npy;
pub mod generated;
pub(crate) mod html;
pub mod image;
pub mod scores;
mod text;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Gpt2;
use crate::output::Out;
use crate::prompt::Prompt;
use crate::tokenizer::Tokenizer;

/// Which layers to look at: `--layer N` (0-based) or `--layer all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerChoice {
    One(usize),
    All,
}

impl FromStr for LayerChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            n => n
                .parse()
                .map(Self::One)
                .map_err(|_| format!("expected a layer number (0-based) or `all`, got `{n}`")),
        }
    }
}

/// The layers and heads to capture, checked against the model.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Layer indices, ascending.
    pub layers: Vec<usize>,
    /// Head indices kept in every layer, ascending.
    pub heads: Vec<usize>,
    /// `--layer all`: outputs list layers even when the model has only one.
    pub all_layers: bool,
}

impl Selection {
    /// `layer` and `head` (`None`: every head) for a model of `config`; out of range is an error
    /// that names the valid range.
    pub fn new(config: &Config, layer: LayerChoice, head: Option<usize>) -> Result<Self> {
        let (n_layer, n_head) = (config.n_layer, config.n_head);
        let layers = match layer {
            LayerChoice::All => (0..n_layer).collect(),
            LayerChoice::One(l) if l < n_layer => vec![l],
            LayerChoice::One(l) => {
                return Err(Error::param(
                    "layer",
                    format!(
                        "{l} is out of range: the model has {n_layer} layers (0..={})",
                        n_layer - 1
                    ),
                ))
            }
        };
        let heads = match head {
            None => (0..n_head).collect(),
            Some(h) if h < n_head => vec![h],
            Some(h) => {
                return Err(Error::param(
                    "head",
                    format!(
                        "{h} is out of range: the model has {n_head} heads per layer (0..={})",
                        n_head - 1
                    ),
                ))
            }
        };
        Ok(Self {
            layers,
            heads,
            all_layers: layer == LayerChoice::All,
        })
    }
}

/// The token ids of an inspected prompt and the text of each token on its own (what
/// TransformerLens' `to_str_tokens` gives), as every output format labels them.
#[derive(Debug, Clone, Serialize)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub text: Vec<String>,
    /// The first token is the `<|endoftext|>` that `--bos` put in front.
    pub bos: bool,
}

impl Tokens {
    /// The tokens of `prompt`, with their texts.
    pub fn new(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Self> {
        Ok(Self {
            ids: prompt.ids.clone(),
            text: prompt.token_texts(tokenizer)?,
            bos: prompt.bos,
        })
    }

    /// Number of tokens, `T`.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: a [`Tokens`] has at least one token.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// One layer's attention for one sequence: `heads.len()` row-major (T, T) matrices, query rows
/// by key columns, each row summing to 1 and zero above the diagonal.
#[derive(Debug, Clone)]
pub struct LayerAttention {
    pub layer: usize,
    pub heads: Vec<usize>,
    /// Sequence length `T`.
    pub len: usize,
    /// (heads, T, T), row-major.
    pub data: Vec<f32>,
}

impl LayerAttention {
    /// Pattern `i` of this layer (the head `heads[i]`): (T, T) row-major.
    pub fn head(&self, i: usize) -> &[f32] {
        let n = self.len * self.len;
        &self.data[i * n..(i + 1) * n]
    }

    /// Row `q` of pattern `i`: the weights of query `q` over keys `0..T`.
    pub fn row(&self, i: usize, q: usize) -> &[f32] {
        &self.head(i)[q * self.len..(q + 1) * self.len]
    }
}

/// Runs `ids` (one sequence) through the model and hands the attention of each selected layer,
/// in order, to `f`: each layer is copied to the host as the forward pass reaches it and dropped
/// once `f` returns, and the pass stops after the last selected layer.
pub fn for_each_layer(
    model: &Gpt2,
    ids: &[u32],
    selection: &Selection,
    mut f: impl FnMut(LayerAttention) -> Result<()>,
) -> Result<()> {
    let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    model.for_each_attention(&x, None, &selection.layers, |layer, p| {
        crate::interrupt::check()?;
        let data = selected_heads(p, selection)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        f(LayerAttention {
            layer,
            heads: selection.heads.clone(),
            len: ids.len(),
            data,
        })
    })
}

/// Query rows `rows` of the attention of every selected layer: for each layer in turn,
/// (heads, rows, T) row-major, keys after the last row zero (they are in the future).
#[derive(Debug, Clone)]
pub struct RowBlock {
    pub rows: Range<usize>,
    pub layers: Vec<usize>,
    pub heads: Vec<usize>,
    /// Sequence length `T`.
    pub len: usize,
    /// (layers, heads, rows, T), row-major.
    pub data: Vec<f32>,
}

/// Runs `ids` through the model a block of query rows at a time, earlier rows held in the KV
/// cache so nothing is computed twice, and hands every selected layer's attention for the block
/// to `f`, in row order.
///
/// Blocks have `T / layers` rows, so a block of every layer is no bigger than one whole layer:
/// memory stays at one layer's attention (plus one copy) whatever the number of layers.
pub fn for_each_row_block(
    model: &Gpt2,
    ids: &[u32],
    selection: &Selection,
    mut f: impl FnMut(&RowBlock) -> Result<()>,
) -> Result<()> {
    let t = ids.len();
    let per_block = t.div_ceil(selection.layers.len().max(1));
    let mut cache = model.new_cache();
    for start in (0..t).step_by(per_block) {
        crate::interrupt::check()?;
        let end = (start + per_block).min(t);
        let x = Tensor::new(&ids[start..end], model.device())?.unsqueeze(0)?;
        let mut data =
            Vec::with_capacity(selection.layers.len() * selection.heads.len() * (end - start) * t);
        model.for_each_attention(&x, Some(&mut cache), &selection.layers, |_, p| {
            // (heads, rows, end) -> (heads, rows, T)
            let p = selected_heads(p, selection)?;
            let p = if end < t {
                p.pad_with_zeros(2, 0, t - end)?
            } else {
                p
            };
            data.extend(p.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        })?;
        f(&RowBlock {
            rows: start..end,
            layers: selection.layers.clone(),
            heads: selection.heads.clone(),
            len: t,
            data,
        })?;
    }
    Ok(())
}

/// (1, nh, rows, keys) probabilities -> (heads, rows, keys), f32, only the selected heads.
fn selected_heads(p: Tensor, selection: &Selection) -> Result<Tensor> {
    let p = p.squeeze(0)?.to_dtype(DType::F32)?;
    Ok(match selection.heads.as_slice() {
        [h] if p.dim(0)? > 1 => p.narrow(0, *h, 1)?,
        _ => p,
    })
}

/// How attention is written out: `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Heatmaps of shade blocks for the terminal, 80 columns wide.
    Text,
    /// `{"model", "layer", "tokens", "token_ids", "heads", "attention"}`.
    Json,
    /// A float32 `.npy` array (heads, q, k) or (layers, heads, q, k), tokens in a `.json` beside it.
    Npy,
    /// One (heads, q, k) tensor `attn.{layer}` per layer, tokens and ids in the metadata.
    Safetensors,
    /// A figure: a grid of per-head heatmaps with token labels and a colour bar.
    Png,
    /// One self-contained page with a head selector, in the spirit of bertviz's head view.
    Html,
}

impl Format {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Self; 6] = [
        Self::Text,
        Self::Json,
        Self::Npy,
        Self::Safetensors,
        Self::Png,
        Self::Html,
    ];

    /// Its name on the command line: `text`, `json`, ...
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
            Self::Npy => "npy",
            Self::Safetensors => "safetensors",
            Self::Png => "png",
            Self::Html => "html",
        }
    }

    /// One line on what it writes.
    pub fn help(self) -> &'static str {
        match self {
            Self::Text => "Heatmaps of shade blocks for the terminal, 80 columns wide",
            Self::Json => {
                "{\"model\", \"layer\", \"tokens\", \"token_ids\", \"heads\", \"attention\"}"
            }
            Self::Npy => {
                "A float32 `.npy` array (heads, q, k) or (layers, heads, q, k), tokens in a \
                 `.json` beside it"
            }
            Self::Safetensors => {
                "One (heads, q, k) tensor `attn.{layer}` per layer, tokens and ids in the metadata"
            }
            Self::Png => "A figure: a grid of per-head heatmaps with token labels and a colour bar",
            Self::Html => {
                "One self-contained page with a head selector, in the spirit of bertviz's head view"
            }
        }
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!("unknown format `{s}`: expected text, json, npy, safetensors, png or html")
            })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format and where it goes: a file, or standard output for the text formats.
#[derive(Debug, Clone)]
pub struct Output {
    pub format: Format,
    /// `None`: standard output.
    pub path: Option<PathBuf>,
}

impl Output {
    /// Checks the pair before any work: binary formats need a file.
    pub fn new(format: Format, path: Option<PathBuf>) -> Result<Self> {
        if path.is_none() && matches!(format, Format::Npy | Format::Safetensors | Format::Png) {
            return Err(Error::param(
                "format",
                format!("{format} needs --out PATH (it is not written to the terminal)"),
            ));
        }
        if let (Format::Npy, Some(p)) = (format, &path) {
            if p.extension().is_some_and(|e| e == "json") {
                return Err(Error::param(
                    "out",
                    format!(
                        "{}: an npy array named .json would be read as JSON; name it .npy",
                        p.display()
                    ),
                ));
            }
        }
        Ok(Self { format, path })
    }

    /// Every file written: the path, and an npy array's tokens file.
    pub fn files(&self) -> Vec<PathBuf> {
        self.path
            .iter()
            .flat_map(|p| files_written(self.format, p))
            .collect()
    }

    /// Where the tokens of an npy array go: `PATH.json` (`attn.npy.json`), a name no other file
    /// of the user's is likely to have; `None` for an array written to a stream (`/dev/stdout`),
    /// beside which there is no place.
    pub fn npy_tokens_path(path: &Path) -> Option<PathBuf> {
        if crate::output::is_stream(path) {
            return None;
        }
        let mut name = path.as_os_str().to_owned();
        name.push(".json");
        Some(PathBuf::from(name))
    }
}

/// The files written for `format` at `path`: `path`, and for npy its tokens file.
pub fn files_written(format: Format, path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    if format == Format::Npy {
        files.extend(Output::npy_tokens_path(path));
    }
    files
}

/// Captures the selected attention of `tokens` and writes it as `output` says, one layer at a time.
pub fn write_attention(
    model: &Gpt2,
    model_name: &str,
    tokens: &Tokens,
    selection: &Selection,
    output: &Output,
) -> Result<()> {
    let header = Header {
        model: model_name,
        tokens,
        selection,
    };
    // The passes' attention before any output begins: no header over an error on stdout.
    let t = tokens.len();
    let last = selection.layers.iter().max().map_or(0, |l| l + 1);
    model.check_pass_memory(
        [1, t, 0],
        last,
        true,
        false,
        crate::model::Output::StopAfter(0),
    )?;
    if let (Format::Npy | Format::Safetensors, Some(path)) = (output.format, &output.path) {
        let mut file = match output.format {
            Format::Npy => export::DenseFile::npy(path, &header)?,
            _ => export::DenseFile::safetensors(path, &header)?,
        };
        for_each_row_block(model, &tokens.ids, selection, |b| file.write_block(b))?;
        return file.finish();
    }
    let out = Out::open(output.path.as_deref())?;
    let mut sink: Box<dyn Sink> = match output.format {
        Format::Json => Box::new(export::JsonSink::new(out, &header)?),
        Format::Png => Box::new(image::PngSink::new(out, &header)?),
        Format::Html => {
            // The model view labels every thumbnail with its head type: a few short passes.
            let labels = match scores::head_scores(model, tokens, selection) {
                Ok(t) => Some(t),
                // A context too short for induction: thumbnails without labels.
                Err(Error::Input(_)) => None,
                Err(e) => return Err(e),
            };
            Box::new(html::HtmlSink::new(out, &header, labels.as_ref())?)
        }
        _ => Box::new(text::TextSink::new(out, &header)?),
    };
    for_each_layer(model, &tokens.ids, selection, |a| sink.layer(&a))?;
    sink.finish()
}

/// What every output format is told before the first layer arrives.
pub(crate) struct Header<'a> {
    pub(crate) model: &'a str,
    pub(crate) tokens: &'a Tokens,
    pub(crate) selection: &'a Selection,
}

/// An output format: receives each selected layer in order, then completes the file.
pub(crate) trait Sink {
    fn layer(&mut self, a: &LayerAttention) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_and_head_choices_are_checked_against_the_model() -> Result<()> {
        let config = Config {
            n_layer: 3,
            n_head: 4,
            n_embd: 32,
            ..Config::default()
        };
        let all = Selection::new(&config, LayerChoice::All, None)?;
        assert_eq!(
            (all.layers, all.heads, all.all_layers),
            (vec![0, 1, 2], vec![0, 1, 2, 3], true)
        );
        let one = Selection::new(&config, LayerChoice::One(2), Some(1))?;
        assert_eq!(
            (one.layers, one.heads, one.all_layers),
            (vec![2], vec![1], false)
        );
        let e = Selection::new(&config, LayerChoice::One(3), None).err();
        assert!(e.is_some_and(|e| e.to_string().contains("layer 3 is out of range")));
        let e = Selection::new(&config, LayerChoice::All, Some(4)).err();
        assert!(e.is_some_and(|e| e.to_string().contains("(0..=3)")));
        assert_eq!("all".parse(), Ok(LayerChoice::All));
        assert_eq!("7".parse(), Ok(LayerChoice::One(7)));
        assert!("-1".parse::<LayerChoice>().is_err());
        Ok(())
    }

    #[test]
    fn binary_formats_need_a_file() {
        assert!(Output::new(Format::Npy, None).is_err());
        assert!(Output::new(Format::Png, None).is_err());
        assert!(Output::new(Format::Npy, Some("a.json".into())).is_err());
        assert!(Output::new(Format::Json, None).is_ok());
        assert!(Output::new(Format::Html, None).is_ok());
        assert_eq!("safetensors".parse(), Ok(Format::Safetensors));
        assert!("csv".parse::<Format>().is_err());
    }
}
