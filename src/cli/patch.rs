//! `gpt2 patch`'s inputs: one prompt pair (`--clean`/`--corrupted`, or their `-file`s) or a
//! dataset of pairs (`--pairs FILE.jsonl`, averaged as TransformerLens users average); what is
//! patched (`--what`/`--by`, or path patching: `--path-to`, `--receivers`, `--senders`). One
//! library call: `activation_patch`, `path_patch` or their `_mean`; `patch_report` writes it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gpt2::analysis::patching::{
    activation_patch, activation_patch_mean, path_patch, path_patch_mean, By, Metric, Pair, PathTo,
    Receivers, Senders, What,
};
use gpt2::prompt::PromptOptions;
use gpt2::{Loaded, Prompt};
use serde::Deserialize;

use super::analyses::one_token;
use super::patch_report::{report, Outcome, Report};
use super::shared::{load, note_done};
use clap::{Args, ValueEnum};

use super::{choice, parse_heads, read_file, Choice, Heads, ModelArgs};

#[derive(Args)]
#[command(group = clap::ArgGroup::new("clean_input").args(["clean", "clean_file", "pairs"]).required(true))]
#[command(group = clap::ArgGroup::new("corrupted_input").args(["corrupted", "corrupted_file", "pairs"]).required(true))]
pub(super) struct PatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The clean prompt: the run whose activations are patched in.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    clean: Option<String>,
    /// The clean prompt from a file, read as it is (a final newline is a token).
    #[arg(long, value_name = "PATH")]
    clean_file: Option<PathBuf>,
    /// The corrupted prompt: the run patched (the same number of tokens as --clean).
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    corrupted: Option<String>,
    /// The corrupted prompt from a file, read as it is.
    #[arg(long, value_name = "PATH")]
    corrupted_file: Option<PathBuf>,
    /// A dataset: a JSON Lines file of pairs, {"clean": TEXT, "corrupted": TEXT, "target":
    /// TOKEN, "against": TOKEN} a line ("target" and "against" default to --target and
    /// --against); the metric is averaged over the pairs, then normalised.
    #[arg(long, value_name = "PATH")]
    pairs: Option<PathBuf>,
    /// The token measured; one token of the tokenizer (mind GPT-2's leading space: " Mary").
    #[arg(
        long,
        value_name = "TOKEN",
        allow_hyphen_values = true,
        required_unless_present = "pairs"
    )]
    target: Option<String>,
    /// The token the target is measured against (--metric logit-diff: target minus this).
    #[arg(long, value_name = "TOKEN", allow_hyphen_values = true)]
    against: Option<String>,
    /// The position whose logits are measured: 0-based, or negative from the end as Python
    /// indexes (-1 the last, each pair's own with --pairs); default: the last.
    #[arg(long, allow_negative_numbers = true)]
    position: Option<isize>,
    /// What is measured there [default: logit-diff with --against, else logit].
    #[arg(long, value_enum)]
    metric: Option<PatchMetric>,
    /// The activation patched (activation patching; or --path-to).
    #[arg(long, value_parser = choice::<What>(), required_unless_present = "path_to")]
    what: Option<What>,
    /// What one patch covers [default: pos for resid_pre, attn_out, mlp_out; else head].
    #[arg(long, value_parser = choice::<By>())]
    by: Option<By>,
    /// Path patching (Wang et al. 2022, as ARENA's IOI exercises) instead of activation
    /// patching: the clean prompt run with each sender from the corrupted run and every other
    /// head's output frozen at the clean run's (MLPs recomputed), so it reaches only where its
    /// paths end: the logits, or the --receivers' queries, keys or values.
    #[arg(long, value_parser = choice::<PathTo>(), conflicts_with_all = ["what", "by"])]
    path_to: Option<PathTo>,
    /// The heads whose input --path-to q|k|v patches, as LAYER.HEAD,... (e.g. 9.9,9.6,10.0).
    #[arg(long, value_name = "L.H,...", value_parser = parse_heads)]
    receivers: Option<Heads>,
    /// What --path-to sweeps, one at a time [default: heads].
    #[arg(long, value_parser = choice::<Senders>())]
    senders: Option<Senders>,
    /// Only the direct path: freeze the MLPs at the clean run too, so a sender reaches the
    /// receivers through the residual stream alone (TransformerLens 4's
    /// get_act_patch_direct_path, with --clean as its corrupted_tokens).
    #[arg(long)]
    freeze_mlps: bool,
    /// Put <|endoftext|> before both prompts, as TransformerLens does.
    #[arg(long)]
    bos: bool,
    #[arg(long, value_enum, default_value = "text")]
    format: PatchFormat,
    /// Write to this file instead of standard output (needed for png and npy).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

/// What `gpt2 patch` writes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PatchFormat {
    /// Tables for people, raw and normalised (the default)
    Text,
    /// One JSON object, for programs
    Json,
    /// The normalised layers x heads or layers x positions map (needs --out)
    Png,
    /// The raw patched metric as a float32 array in TransformerLens' shape (needs --out); its
    /// axes, baselines and tokens in PATH.json beside it
    Npy,
}

/// What `gpt2 patch` measures at the position.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum PatchMetric {
    /// logit(target) - logit(against)
    LogitDiff,
    /// logit(target)
    Logit,
    /// softmax(logits)[target]
    Prob,
    /// -log softmax(logits)[target]: the loss of predicting target
    Loss,
}

impl Choice for What {
    fn values() -> Vec<(&'static str, &'static str)> {
        What::ALL.map(|w| (w.name(), w.help())).to_vec()
    }
}

impl Choice for PathTo {
    fn values() -> Vec<(&'static str, &'static str)> {
        PathTo::ALL.map(|b| (b.name(), b.help())).to_vec()
    }
}

impl Choice for Senders {
    fn values() -> Vec<(&'static str, &'static str)> {
        Senders::ALL.map(|b| (b.name(), b.help())).to_vec()
    }
}

impl Choice for By {
    fn values() -> Vec<(&'static str, &'static str)> {
        By::ALL.map(|b| (b.name(), b.help())).to_vec()
    }
}

/// One line of `--pairs`: the shape the README documents.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairLine {
    clean: String,
    corrupted: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    against: Option<String>,
}

/// A pair as text, before tokenising: from the options or a line of `--pairs`.
struct TextPair {
    clean: String,
    corrupted: String,
    target: String,
    against: Option<String>,
    /// `--pairs FILE line N`, or `None` for the options' one pair (errors name the options).
    label: Option<String>,
}

/// Reads `path` (protected: no output replaces it), as `what` says in errors.
fn read_input(path: &Path, what: &'static str, param: &str) -> Result<String> {
    gpt2::output::protect(path, what)?;
    let _reading = gpt2::interrupt::reading_input()?;
    // The error names the path.
    read_file(path).context(param.to_string())
}

/// The pairs of a `--pairs` file, each line's target and against defaulting to the options'.
fn read_pairs(path: &Path, target: Option<&str>, against: Option<&str>) -> Result<Vec<TextPair>> {
    let text = read_input(path, "the pairs file", "--pairs")?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let label = format!("{} line {}", path.display(), i + 1);
        let l: PairLine = serde_json::from_str(line).map_err(|e| {
            gpt2::Error::param(
                "pairs",
                format!(
                    "{label}: {e} (each line is {{\"clean\": TEXT, \"corrupted\": TEXT, \
                     \"target\": TOKEN, \"against\": TOKEN}}, the last two optional)"
                ),
            )
        })?;
        let Some(t) = l.target.or_else(|| target.map(String::from)) else {
            Err(gpt2::Error::param(
                "pairs",
                format!("{label} has no \"target\" and there is no --target to default to"),
            ))?
        };
        pairs.push(TextPair {
            clean: l.clean,
            corrupted: l.corrupted,
            target: t,
            against: l.against.or_else(|| against.map(String::from)),
            label: Some(label),
        });
    }
    if pairs.is_empty() {
        Err(gpt2::Error::param(
            "pairs",
            format!("{} holds no pair (one JSON object a line)", path.display()),
        ))?;
    }
    Ok(pairs)
}

/// The metric's kind: `--metric`, else logit-diff where every pair has a token to measure
/// against and logit where none has; `--against` with another metric is an error.
fn metric_kind(args: &PatchArgs, pairs: &[TextPair]) -> Result<PatchMetric> {
    let with = pairs.iter().filter(|p| p.against.is_some()).count();
    let name = |m: PatchMetric| match m {
        PatchMetric::LogitDiff => "logit-diff",
        PatchMetric::Logit => "logit",
        PatchMetric::Prob => "prob",
        PatchMetric::Loss => "loss",
    };
    let lacking = pairs.iter().find(|p| p.against.is_none());
    Ok(match (args.metric, lacking) {
        (Some(PatchMetric::LogitDiff), Some(p)) => match &p.label {
            None => Err(gpt2::Error::param(
                "metric",
                "logit-diff needs --against TOKEN (the target minus it)",
            ))?,
            Some(label) => Err(gpt2::Error::param(
                "metric",
                format!("logit-diff needs a token to measure against: {label} has no \"against\" and there is no --against"),
            ))?,
        },
        (Some(m), _) if m != PatchMetric::LogitDiff && args.against.is_some() => Err(
            gpt2::Error::param("against", format!("is only for --metric logit-diff, not {}", name(m))),
        )?,
        // A dataset's own "against" is read only by logit-diff.
        (Some(m), _) => m,
        (None, _) if with == pairs.len() => PatchMetric::LogitDiff,
        (None, _) if with == 0 => PatchMetric::Logit,
        (None, lacking) => Err(gpt2::Error::param(
            "pairs",
            format!(
                "{} has no \"against\" where other pairs have one: give every pair one (or \
                 --against), or --metric logit|prob|loss",
                lacking.and_then(|p| p.label.as_deref()).unwrap_or("a pair")
            ),
        ))?,
    })
}

/// The destinations of `--out` for `format`: the file, and for npy its JSON beside it.
fn destinations(format: PatchFormat, out: &Option<PathBuf>) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = out.iter().cloned().collect();
    if format == PatchFormat::Npy {
        files.extend(
            out.as_deref()
                .and_then(gpt2::inspect::Output::npy_tokens_path),
        );
    }
    files
}

pub(super) fn cmd_patch(args: PatchArgs) -> Result<()> {
    if matches!(args.format, PatchFormat::Png | PatchFormat::Npy) && args.out.is_none() {
        let name = if args.format == PatchFormat::Png {
            "png"
        } else {
            "npy"
        };
        Err(gpt2::Error::param(
            "format",
            format!("{name} needs --out PATH"),
        ))?;
    }
    if args.path_to.is_none() {
        if args.receivers.is_some() {
            Err(gpt2::Error::param(
                "receivers",
                "is for path patching: add --path-to q|k|v",
            ))?;
        }
        if args.senders.is_some() {
            Err(gpt2::Error::param(
                "senders",
                "is for path patching: add --path-to",
            ))?;
        }
        if args.freeze_mlps {
            Err(gpt2::Error::param(
                "freeze-mlps",
                "is for path patching: add --path-to",
            ))?;
        }
    }
    // Before any work: the inputs are protected, the outputs checked.
    args.model.source.source().protect_files()?;
    let dataset = args.pairs.is_some();
    let pairs = match &args.pairs {
        Some(path) => read_pairs(path, args.target.as_deref(), args.against.as_deref())?,
        None => {
            let text = |inline: &Option<String>, file: &Option<PathBuf>, param, what| {
                match (inline, file) {
                    (Some(t), _) => Ok(t.clone()),
                    (None, Some(path)) => read_input(path, what, param),
                    // clap requires one of them.
                    (None, None) => Err(gpt2::Error::param(
                        if param == "--clean-file" {
                            "clean"
                        } else {
                            "corrupted"
                        },
                        "is missing",
                    ))?,
                }
            };
            vec![TextPair {
                clean: text(
                    &args.clean,
                    &args.clean_file,
                    "--clean-file",
                    "the clean prompt file",
                )?,
                corrupted: text(
                    &args.corrupted,
                    &args.corrupted_file,
                    "--corrupted-file",
                    "the corrupted prompt file",
                )?,
                target: args.target.clone().unwrap_or_default(),
                against: args.against.clone(),
                label: None,
            }]
        }
    };
    let kind = metric_kind(&args, &pairs)?;
    for path in destinations(args.format, &args.out) {
        gpt2::output::reserve("out", &path)?;
    }
    let loaded = load(&args.model, None)?;
    let opts = PromptOptions {
        bos: args.bos,
        truncate: false,
        empty_is_bos: false,
    };
    let pairs = pairs
        .iter()
        .map(|p| tokenise(&loaded, p, kind, opts))
        .collect::<Result<Vec<_>>>()?;
    let start = std::time::Instant::now();
    let model = &loaded.model;
    let p = match (args.path_to, args.what) {
        (Some(to), _) => {
            let heads = args.receivers.as_ref().map_or(&[][..], |h| &h.0[..]);
            // Receivers with the logits, or none with q|k|v, are errors the library names.
            let receivers = Receivers::heads(to, heads).freezing_mlps(args.freeze_mlps);
            let senders = args.senders.unwrap_or(Senders::Heads);
            Outcome::Path(match pairs.as_slice() {
                [one] if !dataset => path_patch(
                    model,
                    &one.clean,
                    &one.corrupted,
                    senders,
                    &receivers,
                    one.metric,
                    args.position,
                )?,
                _ => path_patch_mean(model, &pairs, senders, &receivers, args.position)?,
            })
        }
        (None, Some(what)) => {
            let by = args.by.unwrap_or(By::default_for(what));
            Outcome::Act(match pairs.as_slice() {
                [one] if !dataset => activation_patch(
                    model,
                    &one.clean,
                    &one.corrupted,
                    what,
                    by,
                    one.metric,
                    args.position,
                )?,
                _ => activation_patch_mean(model, &pairs, what, by, args.position)?,
            })
        }
        // clap requires one.
        (None, None) => Err(gpt2::Error::param("what", "is missing (or --path-to)"))?,
    };
    let r = Report {
        format: args.format,
        out: &args.out,
        pairs_file: args.pairs.as_ref(),
    };
    report(&r, &loaded, &p, &pairs[0])?;
    let tokens = pairs.iter().map(|p| p.clean.len()).sum();
    note_done(&loaded, tokens, start, args.out.as_deref());
    Ok(())
}

/// A pair's tokens and metric; errors name the option, or the line of `--pairs`.
fn tokenise(loaded: &Loaded, p: &TextPair, kind: PatchMetric, opts: PromptOptions) -> Result<Pair> {
    let config = loaded.model.config();
    let side = |text: &str, param: &str| -> Result<Vec<u32>> {
        let prompt = Prompt::new(&loaded.tokenizer, text, config, opts);
        Ok(match &p.label {
            None => prompt.with_context(|| format!("--{param}"))?,
            Some(label) => prompt.with_context(|| format!("--pairs {label} ({param})"))?,
        }
        .ids)
    };
    let token = |param: &'static str, text: &str| -> Result<u32> {
        let Some(label) = &p.label else {
            return one_token(loaded, param, text);
        };
        match loaded.tokenizer.encode(text)?.as_slice() {
            [id] => Ok(*id),
            ids => Err(gpt2::Error::param(
                "pairs",
                format!(
                    "{label}: \"{param}\" {text:?} is {} tokens ({ids:?}), not one",
                    ids.len()
                ),
            ))?,
        }
    };
    let target = token("target", &p.target)?;
    let metric = match (kind, &p.against) {
        (PatchMetric::LogitDiff, Some(a)) => Metric::LogitDiff {
            target,
            against: token("against", a)?,
        },
        (PatchMetric::LogitDiff, None) => Err(gpt2::Error::param(
            "metric",
            "logit-diff needs --against TOKEN (the target minus it)",
        ))?,
        (PatchMetric::Logit, _) => Metric::Logit { target },
        (PatchMetric::Prob, _) => Metric::Prob { target },
        (PatchMetric::Loss, _) => Metric::Loss { target },
    };
    Ok(Pair {
        clean: side(&p.clean, "clean")?,
        corrupted: side(&p.corrupted, "corrupted")?,
        metric,
        label: p.label.clone().unwrap_or_else(|| "the prompts".into()),
    })
}
