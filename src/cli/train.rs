//! `gpt2 train`: a fresh layout (`--config`, with overrides) or a checkpoint (`--init`) trained on
//! a file (`--data`) or a built-in task (`--task`), evaluated every `--eval-every` steps into
//! `OUT/metrics.jsonl`, saved every `--save-every` steps, at the end, and at Ctrl-C (exit 130).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use gpt2::train::{
    AdamWParams, DataSpec, Evaluation, Init, Schedule, StepStats, Task, TrainOptions, Trainer,
};
use gpt2::{Config, DType, ModelSource, Tokenizer};

use super::{choice, parse_device, Choice};
use gpt2::device::DeviceChoice;

impl Choice for Task {
    fn values() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "copy",
                "a random segment, then the same segment: the loss is on the copy",
            ),
            (
                "induction",
                "one segment twice inside random filler: forms induction heads",
            ),
        ]
    }
}

impl Choice for Schedule {
    fn values() -> Vec<(&'static str, &'static str)> {
        vec![
            ("constant", "the learning rate after the warm-up"),
            ("cosine", "cosine decay to --min-lr at the last step"),
        ]
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("model").args(["config", "init", "resume", "report_only"]).required(true))]
#[command(group = clap::ArgGroup::new("input").args(["data", "task", "resume", "report_only"]).required(true))]
pub(super) struct TrainArgs {
    /// A fresh model of this layout (e.g. configs/tiny.json), GPT-2's initialisation from --seed.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Start from a model (a folder, or a Hub repo id): fine-tuning.
    #[arg(long, value_name = "MODEL", conflicts_with = "config")]
    init: Option<String>,
    /// Override the layout's query heads.
    #[arg(long, requires = "config")]
    n_head: Option<usize>,
    /// Override the layout's layers.
    #[arg(long, requires = "config")]
    n_layer: Option<usize>,
    /// Override the layout's width (n_embd).
    #[arg(long, requires = "config")]
    n_embd: Option<usize>,
    /// Override the layout's key/value heads (grouped-query attention; 1 is multi-query).
    #[arg(long, requires = "config")]
    n_kv_head: Option<usize>,
    /// Override the layout's MLP width (n_inner; default 4 × n_embd).
    #[arg(long, requires = "config")]
    n_inner: Option<usize>,
    /// Override the layout's context (n_positions).
    #[arg(long, requires = "config")]
    n_positions: Option<usize>,
    /// Override the layout's vocabulary size (its end-of-text id becomes the last id).
    #[arg(long, requires = "config")]
    vocab: Option<usize>,
    /// A tokenizer.json for a fresh layout (default: GPT-2's 256 byte tokens and <|endoftext|>).
    #[arg(long, value_name = "FILE", requires = "config")]
    tokenizer: Option<PathBuf>,
    /// Training data: a text file (tokenised with the model's tokenizer) or a 1-D .npy of
    /// token ids (uint16, int32 or int64). The last tenth is held out for evaluation.
    #[arg(long, value_name = "FILE", conflicts_with = "task")]
    data: Option<PathBuf>,
    /// A built-in task instead of data.
    #[arg(long, value_parser = choice::<Task>())]
    task: Option<Task>,
    /// The folder the run writes: a Hugging Face model folder plus its optimizer state.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Continue the run saved in --out with its own options, data and optimizer state (only
    /// --steps may change: a longer run).
    #[arg(long)]
    resume: bool,
    /// Replace a run already saved in --out instead of refusing.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Optimizer steps [default: 1000; with --resume, the saved run's].
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence [default: 128, or the model's context if shorter].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Steps of linear warm-up to --lr.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    #[arg(long, default_value = "constant", value_parser = choice::<Schedule>())]
    lr_schedule: Schedule,
    /// The cosine schedule's final learning rate [default: --lr / 10].
    #[arg(long)]
    min_lr: Option<f64>,
    /// AdamW's decoupled weight decay, on matrices and embeddings only.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Dropout after the embeddings, on attention probabilities and on each residual branch.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Seeds the initialisation, the batches and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read the data's windows in order (step s, row r: window s·batch + r) instead of at
    /// random offsets.
    #[arg(long)]
    sequential: bool,
    /// Evaluate (held-out loss, in-context loss, head scores) every this many steps; 0: at
    /// the end only.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Save a checkpoint every this many steps; 0: at the end (and at Ctrl-C) only.
    #[arg(long, default_value_t = 500)]
    save_every: u64,
    /// f32, or f64 to check the arithmetic against a reference.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f64"])]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceChoice,
    /// Train the --config layout once per head count (n_embd fixed; e.g. 1,8), same options,
    /// seed and data, each into OUT/heads-N, and print a table of their results.
    #[arg(long, value_name = "N,...", value_delimiter = ',', requires = "config")]
    compare_heads: Option<Vec<usize>>,
    /// Also draw the curves (loss, every head's scores, the phase change) as a PNG here at the
    /// end of the run. OUT/report.html is written at the end of every run (not after Ctrl-C:
    /// --report-only writes both from the saved run).
    #[arg(long, value_name = "PNG", conflicts_with = "compare_heads")]
    plot: Option<PathBuf>,
    /// Train nothing: write OUT/report.html (and --plot) again from the run saved in --out.
    #[arg(long, conflicts_with_all = ["resume", "overwrite", "config", "init", "data", "task", "compare_heads"])]
    report_only: bool,
}

pub(super) fn cmd_train(args: TrainArgs) -> Result<()> {
    if let Some(plot) = &args.plot {
        gpt2::output::reserve("plot", plot)?;
    }
    if args.report_only {
        return report(&args.out, args.plot.as_deref());
    }
    keep_freed_memory();
    let device = args.device.open()?;
    if let Some(heads) = &args.compare_heads {
        return compare_heads(&args, heads, &device);
    }
    let mut trainer = if args.resume {
        let trainer = Trainer::resume(&args.out, args.steps, &device)?;
        clear_logs(&args.out, trainer.steps_done())?;
        trainer
    } else {
        let (init, config) = args.init()?;
        args.start(init, &config, &args.out, &device)?
    };
    run(&mut trainer)?;
    if gpt2::interrupt::requested() {
        return Ok(()); // saved; the report waits for the run's end
    }
    report(trainer.out(), args.plot.as_deref())
}

/// `--compare-heads`: the same run (options, seed, data) once per head count, each in
/// `OUT/heads-N`, then a table.
fn compare_heads(args: &TrainArgs, heads: &[usize], device: &gpt2::Device) -> Result<()> {
    if args.config.is_none() || args.resume {
        bail!("--compare-heads trains fresh layouts: give --config (not --init or --resume)");
    }
    let (_, base) = args.init()?;
    let mut rows = Vec::new();
    for &h in heads {
        let config = gpt2::train::compare::with_heads(&base, h)?;
        let out = args.out.join(format!("heads-{h}"));
        let mut trainer = args.start(Init::Layout(config.clone()), &config, &out, device)?;
        let Some(done) = run(&mut trainer)? else {
            return Ok(()); // interrupted: saved, exit 130
        };
        gpt2::train::report::write_report(&out)?;
        let eval = done.eval.as_ref();
        rows.push(serde_json::json!({
            "heads": h,
            "head_size": config.head_size(),
            "parameters": trainer.parameter_count(),
            "final_loss": done.last.loss,
            "held_out_loss": eval.and_then(|e| e.held_out_loss),
            "copy_accuracy": eval.and_then(|e| e.copy_accuracy),
            "seconds": done.seconds,
            "out": out,
        }));
    }
    println!("\n| heads | head size | parameters | final loss | held-out loss | copy accuracy | seconds |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let num = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map_or("–".to_string(), |x| format!("{x:.digits$}"))
    };
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["heads"],
            r["head_size"],
            r["parameters"],
            num(&r["final_loss"], 4),
            num(&r["held_out_loss"], 4),
            num(&r["copy_accuracy"], 3),
            num(&r["seconds"], 1)
        );
    }
    let path = args.out.join("compare.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)
        .with_context(|| path.display().to_string())?;
    Ok(())
}

impl TrainArgs {
    /// A new run of `init` (whose config is `config`) into `out`.
    fn start(
        &self,
        init: Init,
        config: &Config,
        out: &Path,
        device: &gpt2::Device,
    ) -> Result<Trainer> {
        if out.join("training.json").exists() && !self.overwrite {
            bail!(
                "{} already holds a run: --resume to continue it, --overwrite to replace it",
                out.display()
            );
        }
        let tokenizer = match &self.tokenizer {
            Some(path) => Some(Tokenizer::from_file(path)?),
            None => None,
        };
        let spec = match (&self.data, self.task) {
            (Some(path), _) => DataSpec::File(path.clone()),
            (None, Some(task)) => DataSpec::Task(task),
            (None, None) => bail!("--data or --task is needed"),
        };
        let options = self.options(config);
        let dtype: DType = self.dtype.parse().context("--dtype")?;
        let trainer = Trainer::new(init, tokenizer, spec, options, out, dtype, device)?;
        clear_logs(out, 0)?;
        Ok(trainer)
    }

    /// The model to start from, and its config (for the options' defaults).
    fn init(&self) -> Result<(Init, Config)> {
        if let Some(path) = &self.config {
            let mut c = Config::from_layout_file(path)?;
            let set = |field: &mut usize, v: Option<usize>| {
                if let Some(v) = v {
                    *field = v;
                }
            };
            set(&mut c.n_head, self.n_head);
            set(&mut c.n_layer, self.n_layer);
            set(&mut c.n_embd, self.n_embd);
            set(&mut c.n_positions, self.n_positions);
            if self.n_kv_head.is_some() {
                c.n_kv_head = self.n_kv_head;
            }
            if self.n_inner.is_some() {
                c.n_inner = self.n_inner;
            }
            if let Some(v) = self.vocab {
                c.vocab_size = v;
                let last = v.saturating_sub(1) as u32;
                c.eos_token_id = c.eos_token_id.min(last);
                c.bos_token_id = c.bos_token_id.min(last);
            }
            c.validate().context("the layout with its overrides")?;
            return Ok((Init::Layout(c.clone()), c));
        }
        let Some(name) = &self.init else {
            bail!("--config or --init is needed");
        };
        let source = if Path::new(name).is_dir() {
            ModelSource::dir(name)
        } else {
            ModelSource::hub(name, "main")
        };
        let config = source.config()?;
        Ok((Init::Model(source), config))
    }

    fn options(&self, config: &Config) -> TrainOptions {
        TrainOptions {
            steps: self.steps.unwrap_or(1000),
            batch_size: self.batch_size,
            seq_len: self.seq_len.unwrap_or(config.n_positions.min(128)),
            lr: self.lr,
            warmup: self.warmup,
            schedule: self.lr_schedule,
            min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
            adam: AdamWParams {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            grad_clip: self.grad_clip,
            dropout: self.dropout,
            seed: self.seed,
            sequential: self.sequential,
            eval_every: self.eval_every,
            save_every: self.save_every,
        }
    }
}

/// Every training op allocates its output, most of them larger than glibc's threshold for
/// serving a block from its own `mmap`: each step would map, fault in, zero and unmap the same
/// sizes again (a quarter of a step's time in the kernel for the tiny layout). Freed blocks are
/// kept in the heap for the next step instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the run allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// How a run ended: its last step and evaluation, and the seconds spent in steps.
struct Outcome {
    last: StepStats,
    eval: Option<Evaluation>,
    seconds: f64,
}

/// The loop: steps, evaluations, saves, the progress line; Ctrl-C saves and stops (exit 130,
/// and `None`).
fn run(trainer: &mut Trainer) -> Result<Option<Outcome>> {
    let o = trainer.options().clone();
    let config = trainer.config();
    eprintln!(
        "training {} parameters ({} layers, {} heads{}, n_embd {}) for {} steps of {} × {} \
         tokens into {}",
        trainer.parameter_count(),
        config.n_layer,
        config.n_head,
        match config.n_kv_head {
            Some(kv) if kv != config.n_head => format!(" sharing {kv} K/V heads"),
            _ => String::new(),
        },
        config.n_embd,
        o.steps,
        o.batch_size,
        o.seq_len,
        trainer.out().display()
    );
    let bar = progress(trainer.steps_done(), o.steps);
    let start = Instant::now();
    let first = trainer.steps_done();
    let mut last: Option<StepStats> = None;
    let mut last_eval = None;
    let mut heads = String::new();
    // Time in `Trainer::step` alone: what scripts/bench_train.sh compares with torch.
    let mut stepping = 0.0;
    let mut log = open_log(trainer.out(), STEPS_LOG)?;
    while trainer.steps_done() < o.steps {
        if gpt2::interrupt::requested() {
            return stop(trainer, &bar);
        }
        let started = Instant::now();
        let stats = trainer.step()?;
        stepping += started.elapsed().as_secs_f64();
        last = Some(stats);
        use std::io::Write;
        writeln!(log, "{}", serde_json::to_string(&stats)?).context(STEPS_LOG)?;
        let s = stats.step;
        let eval_now = o.eval_every > 0 && s % o.eval_every == 0 || s == o.steps;
        if eval_now {
            let eval = match trainer.evaluate() {
                Err(gpt2::Error::Interrupted) => return stop(trainer, &bar),
                other => other?,
            };
            append_metrics(trainer.out(), &stats, &eval)?;
            heads = head_line(&eval);
            if bar.is_none() {
                eprintln!("{}", eval_line(&stats, &eval));
            }
            last_eval = Some(eval);
        }
        if o.save_every > 0 && s % o.save_every == 0 || s == o.steps {
            trainer.save()?;
        }
        if let Some(b) = &bar {
            b.set_position(s);
            b.set_message(format!("loss {:.4}{heads}", stats.loss));
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    let done = trainer.steps_done() - first;
    match &last {
        Some(st) => println!(
            "step {}: loss {:.4}{heads}; {done} steps in {seconds:.1} s ({:.3} steps/s training, \
             evaluations and saves aside); saved in {}",
            st.step,
            st.loss,
            done as f64 / stepping.max(1e-9),
            trainer.out().display()
        ),
        None => println!(
            "the run in {} has done its {} steps already (--steps to go further)",
            trainer.out().display(),
            o.steps
        ),
    }
    Ok(last.map(|last| Outcome {
        last,
        eval: last_eval,
        seconds: stepping,
    }))
}

/// Writes OUT/report.html (and the --plot PNG) from the run's logs and its saved model.
fn report(out: &Path, plot: Option<&Path>) -> Result<()> {
    let report = gpt2::train::report::write_report(out)?;
    if let Some(path) = plot {
        gpt2::train::report::plot_curves(out, &report.logs, path)?;
    }
    match &report.phase {
        Some(p) => println!("{p}"),
        None => println!("no phase change found"),
    }
    println!("report: {}", report.path.display());
    Ok(())
}

/// Saves at Ctrl-C; the binary exits 130 after an interrupted command.
fn stop(trainer: &Trainer, bar: &Option<indicatif::ProgressBar>) -> Result<Option<Outcome>> {
    if let Some(b) = bar {
        b.abandon();
    }
    trainer.save()?;
    eprintln!(
        "interrupted: saved step {} in {} (--resume continues it)",
        trainer.steps_done(),
        trainer.out().display()
    );
    Ok(None)
}

fn progress(pos: u64, len: u64) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_position(pos);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
        {
            bar.set_style(style);
        }
        bar
    })
}

/// ` · induction 1.0 0.62 · prev 0.1 0.91`: the strongest head of each kind.
fn head_line(e: &Evaluation) -> String {
    let mut s = String::new();
    for (name, best) in [
        ("induction", e.best(|h| h.induction)),
        ("prev", e.best(|h| h.previous_token)),
    ] {
        if let Some((score, l, h)) = best {
            s += &format!(" · {name} {l}.{h} {score:.2}");
        }
    }
    s
}

fn eval_line(st: &StepStats, e: &Evaluation) -> String {
    let held = e
        .held_out_loss
        .map(|l| format!(" held-out {l:.4}"))
        .unwrap_or_default();
    let copy = e
        .copy_accuracy
        .map(|a| format!(" copy accuracy {a:.3}"))
        .unwrap_or_default();
    format!(
        "step {}: loss {:.4}{held} in-context {:.4}{copy}{}",
        st.step,
        st.loss,
        e.icl_loss,
        head_line(e)
    )
}

// One line per step (`{"step", "loss", "lr", "grad_norm"}`), and one per evaluation
// ([`Evaluation`] plus the step's numbers): the report reads them back.
use gpt2::train::report::{METRICS_LOG, STEPS_LOG};

/// `OUT/name`, opened to append (the folder made if missing).
fn open_log(out: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let path = out.join(name);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| path.display().to_string())
}

/// Appends one evaluation to `OUT/metrics.jsonl`.
fn append_metrics(out: &Path, st: &StepStats, e: &Evaluation) -> Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_value(e)?;
    if let Some(m) = line.as_object_mut() {
        m.insert("train_loss".into(), st.loss.into());
        m.insert("lr".into(), st.lr.into());
        m.insert("grad_norm".into(), st.grad_norm.into());
    }
    let mut f = open_log(out, METRICS_LOG)?;
    writeln!(f, "{line}").context(METRICS_LOG)?;
    Ok(())
}

/// Drops the lines of the logs past step `keep` (a new run: all of them), so that a resumed
/// run's logs read as one run's.
fn clear_logs(out: &Path, keep: u64) -> Result<()> {
    for name in [STEPS_LOG, METRICS_LOG] {
        let path = out.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= keep)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).with_context(|| path.display().to_string())?;
    }
    Ok(())
}
