//! The command line: clap types, how each maps onto the library's types, and [`run`], which
//! dispatches each command to [`commands`], [`analyses`] or [`patch`] (one library call each,
//! its result printed). They use [`shared`] (loading, the output guard, the closing notes);
//! `patch` also borrows two of `analyses`' writers.

mod analyses;
mod commands;
mod escape;
mod ioi;
mod patch;
mod patch_report;
#[cfg(feature = "serve")]
mod serve;
mod shared;
mod train;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gpt2::analysis::ablation::AblateMode;
use gpt2::device::DeviceChoice;
use gpt2::inspect::{Format, LayerChoice};
use gpt2::prompt::PromptOptions;
use gpt2::{DType, LoadOptions, ModelSource, Quantization};

#[derive(Parser)]
#[command(
    name = "gpt2",
    version,
    about = "Run GPT-2 and look inside its attention heads"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Runs the command `cli` names.
pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => commands::cmd_generate(args),
        Command::Bench(args) => commands::cmd_bench(args),
        Command::InspectHeads(args) => commands::cmd_inspect_heads(args),
        Command::Info(args) => commands::cmd_info(args),
        Command::Perplexity(args) => commands::cmd_perplexity(args),
        Command::HeadsEffect(args) => analyses::cmd_heads_effect(args),
        Command::LogitLens(args) => analyses::cmd_logit_lens(args),
        Command::Attribute(args) => analyses::cmd_attribute(args),
        Command::Patch(args) => patch::cmd_patch(args),
        Command::Ioi(args) => ioi::cmd_ioi(args),
        Command::Train(args) => train::cmd_train(args),
        #[cfg(feature = "serve")]
        Command::Serve(args) => serve::cmd_serve(args),
    }
}

impl Cli {
    /// Whether the command ends on Ctrl-C or SIGTERM as its normal way out (exit 0, not 130):
    /// the server stops, finishes or cancels its requests, and is done.
    pub(crate) fn stops_on_interrupt(&self) -> bool {
        #[cfg(feature = "serve")]
        if matches!(self.command, Command::Serve(_)) {
            return true;
        }
        false
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed as it is produced.
    Generate(GenerateArgs),
    /// Measure load time, prefill and decode speed (tokens/s) separately.
    Bench(BenchArgs),
    /// Show what every attention head attends to, and what kind of head it is.
    InspectHeads(InspectHeadsArgs),
    /// Sizes of a layout: heads, parameters per component, KV-cache bytes, FLOPs per token.
    Info(InfoArgs),
    /// Perplexity of a text, as transformers' sliding-window recipe computes it.
    Perplexity(PerplexityArgs),
    /// Every head's importance: the change in the prompt's loss (or a target logit) when it alone
    /// is ablated.
    HeadsEffect(analyses::HeadsEffectArgs),
    /// The logit lens: the most likely next tokens after each layer, at every position.
    LogitLens(analyses::LogitLensArgs),
    /// Direct logit attribution: a target token's logit split into embeddings, heads and MLPs.
    Attribute(analyses::AttributeArgs),
    /// Activation patching: the corrupted prompt run with one activation (per layer, position
    /// or head) taken from the clean run, as TransformerLens' get_act_patch_* functions; or,
    /// with --path-to, path patching (Wang et al. 2022): each sender's direct path to the
    /// logits or to --receivers' q, k or v.
    Patch(patch::PatchArgs),
    /// The IOI paper's dataset (templates, names, ABBA/BABA, seeded; ABC corruption) and its
    /// experiments: logit difference, head patching, path patching, mean ablation.
    Ioi(ioi::IoiArgs),
    /// Train a model (a fresh layout or a checkpoint) on a text, token ids or a built-in task,
    /// watching every head's scores as it learns; saves a Hugging Face folder.
    Train(train::TrainArgs),
    /// An OpenAI-compatible HTTP server (completions, streaming, attention), batching requests.
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
}

/// Heads to remove from every forward pass.
#[derive(Args)]
struct AblateArgs {
    /// Heads to ablate, as LAYER.HEAD,... (0-based), e.g. 5.1,5.5.
    #[arg(long, value_name = "L.H,...", value_parser = parse_heads)]
    ablate: Option<Heads>,
    /// zero: the head's output is 0 (transformers' head_mask); mean: its mean over the prompt.
    #[arg(long, default_value = "zero", value_parser = choice::<AblateMode>())]
    ablate_mode: AblateMode,
}

impl AblateArgs {
    /// Sets the head mask `--ablate` asks for on `model` (mean taken over `prompt`).
    fn apply(&self, model: &mut gpt2::Gpt2, prompt: &[u32]) -> Result<()> {
        let Some(Heads(heads)) = &self.ablate else {
            return Ok(());
        };
        let mask = gpt2::analysis::ablation::head_mask(model, heads, self.ablate_mode, prompt)?;
        model.set_head_mask(Some(mask));
        Ok(())
    }
}

/// `--ablate`'s heads (a newtype: clap would take a `Vec` for a repeated option).
#[derive(Clone)]
struct Heads(Vec<gpt2::analysis::ablation::HeadId>);

fn parse_heads(s: &str) -> std::result::Result<Heads, String> {
    gpt2::analysis::ablation::parse_heads(s)
        .map(Heads)
        .map_err(value_error)
}

/// A library error in a clap value parser: clap names the flag, so a [`gpt2::Error::Param`]
/// gives only what is wrong with the value.
fn value_error(e: gpt2::Error) -> String {
    match e {
        gpt2::Error::Param { msg, .. } => msg,
        e => e.to_string(),
    }
}

/// How a command that writes text or JSON writes its result: `--format`, as every command
/// spells it; `--json` is its old spelling, kept so that scripts keep working.
#[derive(Args)]
struct TextOrJson {
    /// How the result is written.
    #[arg(long, value_enum, default_value = "text")]
    format: TextFormat,
    /// The same as --format json (the old spelling, kept for scripts).
    #[arg(long, hide = true, conflicts_with = "format")]
    json: bool,
}

impl TextOrJson {
    fn json(&self) -> bool {
        self.json || self.format == TextFormat::Json
    }
}

/// Text or JSON.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TextFormat {
    /// For people (the default)
    Text,
    /// JSON for programs: one object per line (generate: a line per sample)
    Json,
}
/// The command-line name of a library parameter: `max_new_tokens` is `--max-new-tokens`.
pub(crate) fn flag(param: &str) -> String {
    format!("--{}", param.replace('_', "-"))
}

/// Where a model comes from.
#[derive(Args)]
struct SourceArgs {
    /// A Hub repo id of a GPT-2-architecture model, or gpt2, gpt2-medium, gpt2-large, gpt2-xl,
    /// distilgpt2.
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// Hub branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// A local model folder (config.json, model.safetensors, tokenizer files); no network at all.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "model", "revision"])]
    model_dir: Option<PathBuf>,
    /// A layout file (e.g. configs/gpt2.json): a model of that layout with seeded random weights
    /// and a bytes-only tokenizer, for shape, memory and speed experiments without downloading.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["model", "revision"])]
    config: Option<PathBuf>,
}

impl SourceArgs {
    fn source(&self) -> ModelSource {
        match (&self.config, &self.model_dir) {
            (Some(path), _) => ModelSource::layout(path),
            (None, Some(dir)) => ModelSource::dir(dir),
            (None, None) => ModelSource::hub(&self.model, &self.revision),
        }
    }
}

/// The weights' (or the KV cache's) dtype.
#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Which model, and how it is loaded.
#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The weights' dtype; softmax and layer-norm statistics stay in f32 (on CPU, all the
    /// activations). On CPU, f16 and bf16 halve the weights' memory and decode about twice as
    /// fast as f32; f32 is exact and prefills fastest.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Quantize the weight matrices at load to llama.cpp's 8- or 4-bit block format (CPU).
    #[arg(long, value_parser = choice::<Quantization>())]
    quantize: Option<Quantization>,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: DeviceChoice,
    /// Copy the weights into memory instead of reading the file in place (then the file may
    /// change while gpt2 runs).
    #[arg(long)]
    no_mmap: bool,
    /// What the KV cache holds keys and values as. Default: f16 on CPU when the weights are
    /// f16, bf16 or quantized (half the bytes each decoded token reads from the cache, as in
    /// llama.cpp), else f32 (exact).
    #[arg(long, value_enum)]
    kv_cache: Option<Precision>,
}

/// A library enum offered as a clap value: the library does not depend on clap, so its names
/// and help lines become clap's possible values here, parsed back with its `FromStr`.
trait Choice: std::str::FromStr + Clone + Send + Sync + 'static {
    /// Each value's name and one-line help, in the order `--help` lists them.
    fn values() -> Vec<(&'static str, &'static str)>;
}

impl Choice for Quantization {
    fn values() -> Vec<(&'static str, &'static str)> {
        Quantization::ALL.map(|q| (q.name(), q.help())).to_vec()
    }
}

impl Choice for AblateMode {
    fn values() -> Vec<(&'static str, &'static str)> {
        AblateMode::ALL.map(|m| (m.name(), m.help())).to_vec()
    }
}

impl Choice for Format {
    fn values() -> Vec<(&'static str, &'static str)> {
        Format::ALL.map(|f| (f.name(), f.help())).to_vec()
    }
}

fn choice<T: Choice>() -> impl clap::builder::TypedValueParser<Value = T>
where
    T::Err: std::fmt::Display,
{
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let values = T::values()
        .into_iter()
        .map(|(name, help)| PossibleValue::new(name).help(help));
    PossibleValuesParser::new(values).try_map(|s| s.parse::<T>().map_err(|e| e.to_string()))
}

/// A text file (a prompt, prompts, a perplexity text), its size checked against memory first.
fn read_file(path: &std::path::Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| gpt2::Error::io(path, e))?;
    let len = file.metadata().ok().map(|m| m.len());
    Ok(gpt2::memory::read_text(file, len, path)?)
}

fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    s.parse().map_err(|e: gpt2::Error| e.to_string())
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            dtype: self.dtype.dtype(),
            device: self.device.open()?,
            layers: None,
            quantize: self.quantize,
            mmap: !self.no_mmap,
            kv_cache: self.kv_cache.map(Precision::dtype),
        })
    }
}

/// Where the prompt comes from, and how it is tokenised.
#[derive(Args)]
struct PromptArgs {
    #[command(flatten)]
    input: PromptInput,
    /// Keep only the last tokens of a prompt longer than the context, instead of failing.
    #[arg(long)]
    truncate_prompt: bool,
}

/// The prompt itself: one of these is required (clap says so, naming both, before any work;
/// inspect-heads' --prompts joins the group).
#[derive(Args)]
#[group(id = "prompt_input", required = true, multiple = false)]
struct PromptInput {
    /// The prompt text; `-` reads it from standard input.
    #[arg(long, allow_hyphen_values = true)]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, value_name = "PATH")]
    prompt_file: Option<PathBuf>,
}

impl PromptArgs {
    fn text(&self) -> Result<String> {
        match (self.input.prompt.as_deref(), &self.input.prompt_file) {
            (Some("-"), _) => {
                let _reading = gpt2::interrupt::reading_input()?;
                let stdin = std::path::Path::new("standard input");
                gpt2::memory::read_text(std::io::stdin(), None, stdin)
                    .context("cannot read the prompt from standard input")
            }
            (Some(text), _) => Ok(text.to_string()),
            (None, Some(path)) => {
                let _reading = gpt2::interrupt::reading_input()?;
                read_file(path)
                    .with_context(|| format!("cannot read the prompt file {}", path.display()))
            }
            (None, None) => Err(gpt2::Error::param(
                "prompt",
                "is missing: give --prompt TEXT, --prompt-file PATH or --prompt - (stdin)",
            ))?,
        }
    }

    /// The prompt file, if the prompt comes from one.
    fn file(&self) -> Option<&std::path::Path> {
        self.input.prompt_file.as_deref()
    }

    fn options(&self, bos: bool, empty_is_bos: bool) -> PromptOptions {
        PromptOptions {
            bos,
            truncate: self.truncate_prompt,
            empty_is_bos,
        }
    }
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    prompt_tokens: usize,
    /// Tokens to decode, one per step, after the prefill.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    new_tokens: usize,
    /// Repetitions; the fastest of each phase is reported.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    runs: usize,
    /// Sequences decoded together, as the server batches them: decode tokens/s is then their
    /// aggregate.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    batch: usize,
    /// Instead: time a training step's forward, and forward + backward, of --batch sequences of
    /// --prompt-tokens tokens on the layout with each of these head counts (n_embd fixed), in
    /// f32 with random weights (e.g. 1,8,16).
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    compare_heads: Option<Vec<usize>>,
    #[command(flatten)]
    output: TextOrJson,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    ablate: AblateArgs,
    /// How many tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 100, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_new_tokens: u64,
    /// Keep going after <|endoftext|>.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the text contains this string (not printed); repeatable. C-style escapes
    /// (\n, \t, \\, \xNN, \u{...}) are understood, as llama.cpp's --escape does.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    stop: Vec<String>,
    /// Take --stop strings literally: no escapes.
    #[arg(long)]
    no_escape: bool,
    /// Sampling temperature; 0 is greedy (and so is any temperature too small to matter).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Sample among the K most likely tokens (transformers' default is 50).
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    top_k: i64,
    /// Nucleus sampling: among the most likely tokens whose probability adds up to P.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// How far back --repeat-penalty looks, in tokens.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    repeat_last_n: usize,
    /// Random seed; the same seed gives the same text. Default: a fresh one, printed in the stats.
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Continuations of the prompt to generate, run together as one batch.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    num_samples: u64,
    #[command(flatten)]
    output: TextOrJson,
    /// Record, for every generated token, its attention over the context so far (read from the
    /// KV-cached decode) into this file: .npy, .safetensors, .json or .html (a page stepping
    /// through the tokens).
    #[arg(long, value_name = "FILE")]
    attention_out: Option<PathBuf>,
    /// The layers --attention-out records, 0-based, or `all`.
    #[arg(
        long,
        default_value = "all",
        requires = "attention_out",
        allow_negative_numbers = true
    )]
    layer: LayerChoice,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ablate: AblateArgs,
    /// The text to score; `-` reads standard input.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// Tokens between window starts; default: half the context (n_positions / 2).
    #[arg(long, allow_negative_numbers = true)]
    stride: Option<usize>,
    #[command(flatten)]
    output: TextOrJson,
}

#[derive(Args)]
struct InfoArgs {
    /// Only the config.json is read (and, from the Hub, downloaded).
    #[command(flatten)]
    source: SourceArgs,
    /// Context length for the FLOPs per generated token; default: the model's n_positions.
    #[arg(long, allow_negative_numbers = true)]
    context: Option<usize>,
    #[command(flatten)]
    output: TextOrJson,
}

#[derive(Args)]
struct InspectHeadsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    ablate: AblateArgs,
    /// The layer to show, 0-based, or `all`.
    #[arg(long, default_value = "all", allow_negative_numbers = true)]
    layer: LayerChoice,
    /// One head to show (0-based); default: every head.
    #[arg(long, allow_negative_numbers = true)]
    head: Option<usize>,
    /// Put <|endoftext|> before the prompt, as TransformerLens does (transformers does not).
    #[arg(long)]
    bos: bool,
    /// How to write the attention.
    #[arg(long, default_value = "text", value_parser = choice::<Format>())]
    format: Format,
    /// Write to this file instead of standard output (needed for npy, safetensors and png).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Score every head (previous-token, first-token, positional-offset, duplicate-token,
    /// induction with their controls, local, entropy) and label its type, instead of showing
    /// attention; text or json.
    #[arg(long)]
    scores: bool,
    /// With --scores: score over every prompt of this file (one per line, or .jsonl of strings
    /// or {"prompt": ...}), reporting means and spreads.
    #[arg(long, value_name = "FILE", requires = "scores", group = "prompt_input")]
    prompts: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpt2::rng::SplitMix64;

    /// Cases of the seeded command-line fuzz run (the README states this number).
    const CASES: usize = 5000;

    #[test]
    fn option_parsing_never_panics() {
        <Cli as clap::CommandFactory>::command().debug_assert();
        let words = [
            "generate",
            "bench",
            "inspect-heads",
            "info",
            "perplexity",
            "heads-effect",
            "logit-lens",
            "attribute",
            "patch",
            "ioi",
            "--path-to",
            "--receivers",
            "--senders",
            "--freeze-mlps",
            "--names",
            "--name-movers",
            "--experiments",
            "--order",
            "path-queries",
            "9.9,9.6",
            "--clean",
            "--corrupted",
            "--against",
            "--what",
            "--by",
            "head_pos",
            "every",
            "logit-diff",
            "serve",
            "--host",
            "--port",
            "--api-key",
            "--parallel",
            "--max-queue",
            "--timeout",
            "--idle-timeout",
            "--header-timeout",
            "--max-body",
            "--grace",
            "--chat-template",
            "--file",
            "--stride",
            "--target",
            "--target-id",
            "--position",
            "--prompts",
            "--ablate-mode",
            "--metric",
            "--quantize",
            "--kv-cache",
            "--no-mmap",
            "--attention-out",
            "q8_0",
            "mean",
            "--model",
            "--model-dir",
            "--config",
            "--revision",
            "--dtype",
            "--device",
            "--prompt",
            "--prompt-file",
            "-n",
            "--max-new-tokens",
            "--temperature",
            "--top-k",
            "--top-p",
            "--repeat-penalty",
            "--num-samples",
            "--seed",
            "--stop",
            "--no-escape",
            "--json",
            "--top",
            "--ablate",
            "text",
            "json",
            "--layer",
            "--head",
            "--format",
            "--out",
            "--scores",
            "--bos",
            "--context",
            "--runs",
            "--prompt-tokens",
            "--truncate-prompt",
            "-",
            "--",
            "0",
            "-1",
            "1e-40",
            "NaN",
            "inf",
            "all",
            "f16",
            "bf16",
            "cuda:7",
            "png",
            "npy",
            "x",
            "18446744073709551616",
            "\\x",
            "é🦀",
            "",
        ];
        let mut rng = SplitMix64::new(4);
        for i in 0..CASES {
            let n = rng.below(9) as usize;
            let mut argv = vec!["gpt2".to_string()];
            argv.extend((0..n).map(|_| words[rng.below(words.len() as u64) as usize].to_string()));
            let parsed = std::panic::catch_unwind(|| Cli::try_parse_from(&argv).map(|_| ()));
            assert!(parsed.is_ok(), "case {i} panicked: {argv:?}");
        }
        println!("command line: {CASES} cases, none panicked");
    }
}
