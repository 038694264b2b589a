//! The `gpt2` command: turns command-line options into library calls and prints the results.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use gpt2::generation::{generate, Completion, GenerateParams, SamplingParams, Timings};
use gpt2::hub::{repo_id, ModelFiles};
use gpt2::info::ModelInfo;
use gpt2::inspect::{self, Format, LayerChoice, Output, Selection, Tokens};
use gpt2::{device, Config, Gpt2, Tokenizer};

#[derive(Parser)]
#[command(
    name = "gpt2",
    version,
    about = "Run GPT-2 and look inside its attention heads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

/// Which model, and where it runs.
/// Where a model comes from.
#[derive(Args)]
struct ModelSource {
    /// A Hub repo id of a GPT-2-architecture model, or gpt2, gpt2-medium, gpt2-large, gpt2-xl,
    /// distilgpt2.
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// Hub branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// A local model folder (config.json, model.safetensors, tokenizer files); no network at all.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    model_dir: Option<PathBuf>,
    /// A layout file (e.g. configs/gpt2.json): a model of that layout with seeded random weights
    /// and a bytes-only tokenizer, for shape, memory and speed experiments without downloading.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    source: ModelSource,
    /// f32, f16 or bf16. On CPU, f32 is the fastest.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode, one per step, after the prefill.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Repetitions; the fastest of each phase is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Where the prompt comes from.
#[derive(Args)]
struct PromptArgs {
    /// The prompt text; `-` reads it from standard input.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, value_name = "PATH")]
    prompt_file: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Keep only the last tokens of a prompt longer than the context, instead of failing.
    #[arg(long)]
    truncate_prompt: bool,
    /// How many tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 100)]
    max_new_tokens: usize,
    /// Keep going after <|endoftext|>.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the text contains this string (not printed); repeatable.
    #[arg(long, value_name = "STRING")]
    stop: Vec<String>,
    /// Sampling temperature; 0 is greedy.
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
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed; the same seed gives the same text. Default: a fresh one, printed in the stats.
    #[arg(long)]
    seed: Option<u64>,
    /// Continuations of the prompt to generate, run together as one batch.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Print one JSON object per sample instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Only the config.json is read (and, from the Hub, downloaded).
    #[command(flatten)]
    source: ModelSource,
    /// Context length for the FLOPs per generated token; default: the model's n_positions.
    #[arg(long)]
    context: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectHeadsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The layer to show, 0-based, or `all`.
    #[arg(long, default_value = "all")]
    layer: LayerChoice,
    /// One head to show (0-based); default: every head.
    #[arg(long)]
    head: Option<usize>,
    /// Put <|endoftext|> before the prompt, as TransformerLens does (transformers does not).
    #[arg(long)]
    bos: bool,
    /// text (terminal heatmaps), json, npy, safetensors, png or html.
    #[arg(long, default_value = "text")]
    format: Format,
    /// Write to this file instead of standard output (needed for npy, safetensors and png).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Score every head (previous-token, first-token, duplicate-token, induction, local,
    /// entropy) and label its type, instead of showing attention; text or json.
    #[arg(long)]
    scores: bool,
}

fn main() -> ExitCode {
    // candle counts CPU threads by reading /proc/cpuinfo on every matmul unless RAYON_NUM_THREADS
    // is set: ~1 ms per generated token. Count once, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line says what is wrong; the usage that follows is one --help away.
            let msg = e.to_string();
            eprintln!(
                "{} (see --help)",
                msg.lines().next().unwrap_or("error: bad arguments")
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Generate(args) => cmd_generate(args),
        Command::Bench(args) => cmd_bench(args),
        Command::InspectHeads(args) => cmd_inspect_heads(args),
        Command::Info(args) => cmd_info(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A loaded model with its tokenizer and the name to report.
struct Loaded {
    model: Gpt2,
    tokenizer: Tokenizer,
    name: String,
    load_time: Duration,
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    load_layers(args, |config| Ok(config.n_layer))
}

/// Loads the embeddings and the first `layers(config)` blocks (all of them: a model that can
/// generate; fewer: enough for attention inspection, as nothing above a layer changes it).
fn load_layers(args: &ModelArgs, layers: impl FnOnce(&Config) -> Result<usize>) -> Result<Loaded> {
    let start = Instant::now();
    let dtype = device::parse_dtype(&args.dtype)?;
    let device = device::select_device(&args.device)?;
    let source = &args.source;
    if let Some(path) = &source.config {
        let config = Config::from_layout_file(path)?;
        eprintln!(
            "warning: {} has random weights (seeded): its text is noise; use it for shapes, memory and speed",
            path.display()
        );
        let tokenizer = Tokenizer::bytes_only(config.eos_token_id)?;
        let n = layers(&config)?;
        let model = Gpt2::random_first_layers(config, 0, n, dtype, &device)?;
        return Ok(Loaded {
            model,
            tokenizer,
            name: path.display().to_string(),
            load_time: start.elapsed(),
        });
    }
    let (files, name) = match &source.model_dir {
        Some(dir) => (ModelFiles::from_dir(dir)?, dir.display().to_string()),
        None => {
            let id = repo_id(&source.model);
            (ModelFiles::from_hub(id, &source.revision)?, id.to_string())
        }
    };
    let config = Config::from_file(&files.config)?;
    let n = layers(&config)?;
    let model = Gpt2::load_first_layers(config, &files.weights, n, dtype, &device)
        .with_context(|| format!("cannot load {name}"))?;
    let tokenizer = Tokenizer::from_files(&files.tokenizer)?;
    Ok(Loaded {
        model,
        tokenizer,
        name,
        load_time: start.elapsed(),
    })
}

fn read_prompt(args: &PromptArgs) -> Result<String> {
    match (args.prompt.as_deref(), &args.prompt_file) {
        (Some("-"), _) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the prompt from standard input")?;
            Ok(text)
        }
        (Some(text), _) => Ok(text.to_string()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the prompt file {}", path.display())),
        (None, None) => {
            bail!("no prompt: give --prompt TEXT, --prompt-file PATH or --prompt - (stdin)")
        }
    }
}

fn cmd_generate(args: GenerateArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let top_k = match args.top_k {
        k if k < 1 => bail!("--top-k must be at least 1"),
        k => Some(k as usize),
    };
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k,
            top_p: args.top_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            seed,
        },
        stop: args.stop.clone(),
        stop_at_eos: !args.ignore_eos,
        num_samples: args.num_samples,
    };
    // Check options before the (possibly long) download.
    params.validate()?;
    let prompt = read_prompt(&args.prompt)?;
    let Loaded {
        model,
        tokenizer,
        name,
        load_time,
    } = load(&args.model)?;
    let ctx = model.config().n_positions;
    let mut prompt_ids = tokenizer.encode(&prompt)?;
    if let Some(&bad) = prompt_ids
        .iter()
        .find(|&&id| id as usize >= model.config().vocab_size)
    {
        bail!(
            "the tokenizer produced id {bad}, outside the model's vocabulary of {}",
            model.config().vocab_size
        );
    }
    if prompt_ids.len() > ctx {
        if !args.truncate_prompt {
            bail!(
                "the prompt is {} tokens but the model sees at most {ctx}; shorten it or pass --truncate-prompt to keep its last {ctx} tokens",
                prompt_ids.len()
            );
        }
        eprintln!(
            "warning: prompt truncated from {} to its last {ctx} tokens",
            prompt_ids.len()
        );
        prompt_ids.drain(..prompt_ids.len() - ctx);
    }
    let shown_prompt = if args.truncate_prompt {
        tokenizer.decode(&prompt_ids)?
    } else {
        prompt.clone()
    };

    let stream = !args.json && args.num_samples == 1;
    let mut stdout = std::io::stdout().lock();
    if stream {
        write!(stdout, "{shown_prompt}")?;
        stdout.flush()?;
    }
    let (completions, timings) = generate(&model, &tokenizer, &prompt_ids, &params, |_, text| {
        if stream {
            // A closed pipe (`| head`) is not worth a panic; the run ends at the next error check.
            let _ = write!(stdout, "{text}").and_then(|_| stdout.flush());
        }
    })?;
    if args.json {
        for c in &completions {
            let line = json_line(&name, &shown_prompt, &prompt_ids, c, load_time, &timings);
            writeln!(stdout, "{line}")?;
        }
    } else if stream {
        writeln!(stdout)?;
    } else {
        for (i, c) in completions.iter().enumerate() {
            writeln!(
                stdout,
                "--- sample {i} ({}) ---\n{shown_prompt}{}",
                c.finish_reason.as_str(),
                c.text
            )?;
        }
    }
    stdout.flush()?;
    print_stats(
        &name,
        &model,
        load_time,
        prompt_ids.len(),
        &completions,
        &timings,
        seed,
    );
    Ok(())
}

fn cmd_bench(args: BenchArgs) -> Result<()> {
    let loaded = load(&args.model)?;
    let r = gpt2::bench::bench(
        &loaded.model,
        args.prompt_tokens,
        args.new_tokens,
        args.runs,
    )?;
    let c = loaded.model.config();
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = loaded.name.clone().into();
        v["dtype"] = format!("{:?}", loaded.model.dtype()).to_lowercase().into();
        v["load_ms"] = ms(loaded.load_time).into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        println!("{v}");
    } else {
        println!(
            "model       {} ({} layers, {} heads x {}, {:?})\nload        {:.0} ms\nprefill     {} tokens: {:.1} ms to first token, {:.1} tokens/s\ndecode      {} tokens: {:.1} tokens/s\nthreads     {}",
            loaded.name,
            c.n_layer,
            c.n_head,
            c.head_size(),
            loaded.model.dtype(),
            ms(loaded.load_time),
            r.prompt_tokens,
            r.time_to_first_token_ms,
            r.prefill_tokens_per_s,
            r.new_tokens,
            r.decode_tokens_per_s,
            candle_core::utils::get_num_threads(),
        );
    }
    Ok(())
}

fn cmd_inspect_heads(args: InspectHeadsArgs) -> Result<()> {
    // Check options before the (possibly long) download.
    let output = Output::new(args.format, args.out.clone())?;
    if args.scores {
        inspect::scores::check_output(&output)?;
    }
    let prompt = read_prompt(&args.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt is empty: inspect-heads needs at least one token");
    }
    // Only the layers up to the last one shown are built and run.
    let Loaded {
        model,
        tokenizer,
        name,
        load_time,
    } = load_layers(&args.model, |config| {
        let selection = Selection::new(config, args.layer, args.head)?;
        Ok(selection
            .layers
            .iter()
            .max()
            .map_or(config.n_layer, |l| l + 1))
    })?;
    let tokens = Tokens::new(&tokenizer, &prompt, args.bos, model.config())?;
    let selection = Selection::new(model.config(), args.layer, args.head)?;
    let start = Instant::now();
    if args.scores {
        let table = inspect::scores::head_scores(&model, &tokens, &selection)?;
        inspect::scores::write_scores(&table, &name, &tokens, &output)?;
    } else {
        inspect::write_attention(&model, &name, &tokens, &selection, &output)?;
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{name}: {} tokens, {} layer(s) x {} head(s); loaded in {:.0} ms, run and written in {:.0} ms{}",
        tokens.len(),
        selection.layers.len(),
        selection.heads.len(),
        ms(load_time),
        ms(start.elapsed()),
        args.out
            .as_ref()
            .map(|p| format!(" to {}", p.display()))
            .unwrap_or_default(),
    );
    if let Some(mib) = peak_memory_mib() {
        let _ = writeln!(err, "peak memory: {mib:.1} MiB");
    }
    Ok(())
}

fn cmd_info(args: InfoArgs) -> Result<()> {
    let source = &args.source;
    let (config, name) = match (&source.config, &source.model_dir) {
        (Some(path), _) => (Config::from_layout_file(path)?, path.display().to_string()),
        (None, Some(dir)) => (
            Config::from_file(dir.join("config.json"))?,
            dir.display().to_string(),
        ),
        (None, None) => {
            let id = repo_id(&source.model);
            (
                Config::from_file(gpt2::hub::config_file(id, &source.revision)?)?,
                id.to_string(),
            )
        }
    };
    let i = ModelInfo::new(&config, args.context.unwrap_or(config.n_positions));
    if args.json {
        let mut v = serde_json::to_value(&i)?;
        v["model"] = name.into();
        println!("{v}");
        return Ok(());
    }
    let p = &i.params;
    let l = &p.per_layer;
    let bytes = |b: &gpt2::info::PerDtype| {
        format!(
            "{} f32, {} f16/bf16",
            human_bytes(b.f32),
            human_bytes(b.f16)
        )
    };
    println!(
        "{name}
  dims          {} = {} heads x {}; {} key/value heads ({} query heads each)
  layers        {}, MLP {} wide, context {} positions, vocabulary {}
parameters      {} (LM head tied to wte); {} with a separate head
  embeddings    wte {}, wpe {}
  per layer     {} = W_q {}, W_k {}, W_v {}, W_o {}, MLP {}, layer norms {}
  ln_f          {}
KV cache        {} per token; {} at {} tokens
FLOPs           {} per generated token at context {}",
        i.n_embd,
        i.n_head,
        i.head_size,
        i.n_kv_head,
        i.group_size,
        i.n_layer,
        i.n_inner,
        i.context,
        i.vocab_size,
        thousands(p.total),
        thousands(p.total_untied),
        thousands(p.wte),
        thousands(p.wpe),
        thousands(l.total),
        thousands(l.w_q),
        thousands(l.w_k),
        thousands(l.w_v),
        thousands(l.w_o),
        thousands(l.mlp),
        thousands(l.layer_norms),
        thousands(p.ln_f),
        bytes(&i.kv_cache_bytes_per_token),
        bytes(&i.kv_cache_bytes_full_context),
        i.context,
        human_flops(i.flops_per_token),
        i.flops_context,
    );
    Ok(())
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

fn human_flops(n: usize) -> String {
    let v = n as f64;
    match v {
        v if v >= 1e12 => format!("{:.2} TFLOP", v / 1e12),
        v if v >= 1e9 => format!("{:.2} GFLOP", v / 1e9),
        v => format!("{:.2} MFLOP", v / 1e6),
    }
}

fn json_line(
    name: &str,
    prompt: &str,
    prompt_ids: &[u32],
    c: &Completion,
    load_time: Duration,
    t: &Timings,
) -> serde_json::Value {
    serde_json::json!({
        "model": name,
        "prompt": prompt,
        "prompt_token_ids": prompt_ids,
        "completion": c.text,
        "completion_token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "timings": {
            "load_ms": ms(load_time),
            "prefill_ms": ms(t.prefill),
            "decode_ms": ms(t.decode),
            "prefill_tokens_per_s": t.prefill_tokens_per_s(),
            "decode_tokens_per_s": t.decode_tokens_per_s(),
        }
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_stats(
    name: &str,
    model: &Gpt2,
    load_time: Duration,
    prompt_tokens: usize,
    completions: &[Completion],
    t: &Timings,
    seed: u64,
) {
    let generated: usize = completions.iter().map(|c| c.token_ids.len()).sum();
    let dev = if model.device().is_cpu() {
        "cpu"
    } else {
        "gpu"
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{name} ({:?}, {dev}) loaded in {:.0} ms\nprompt: {prompt_tokens} tokens, prefill {:.1} ms ({:.1} tokens/s)\ngenerated: {generated} tokens, decode {:.1} ms ({:.1} tokens/s), seed {seed}",
        model.dtype(),
        ms(load_time),
        ms(t.prefill),
        t.prefill_tokens_per_s(),
        ms(t.decode),
        t.decode_tokens_per_s(),
    );
    if let Some(mib) = peak_memory_mib() {
        let _ = writeln!(err, "peak memory: {mib:.1} MiB");
    }
}

/// The process's peak resident memory (Linux `VmHWM`), so long runs can show it stays flat.
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
