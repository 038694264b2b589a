//! The analysis commands: heads-effect, logit-lens, attribute (patch: `patch.rs`). One library
//! call each.

use anyhow::{bail, Result};
use gpt2::analysis::attribution::attribute;
use gpt2::analysis::figure::write_heatmap;
use gpt2::analysis::heads_effect::{heads_effect, Metric};
use gpt2::analysis::logit_lens::logit_lens;
use gpt2::output::{print, Out};
use gpt2::{Loaded, Prompt};

use super::shared::{count, guard, load, note, note_done};

use clap::{Args, ValueEnum};

use std::path::PathBuf;

use gpt2::analysis::ablation::AblateMode;

use super::{choice, AblateArgs, ModelArgs, PromptArgs, TextOrJson};

/// The prompt of an analysis (`text`, read before loading): tokenised for `loaded`'s model,
/// `<|endoftext|>` first with `bos`.
fn prompt(loaded: &Loaded, args: &PromptArgs, text: &str, bos: bool) -> Result<Prompt> {
    Ok(Prompt::new(
        &loaded.tokenizer,
        text,
        loaded.model.config(),
        args.options(bos, false),
    )?)
}

/// Checks a format needs no file it lacks.
fn check_format(format: AnalysisFormat, out: &Option<std::path::PathBuf>) -> Result<()> {
    if format == AnalysisFormat::Png && out.is_none() {
        Err(gpt2::Error::param("format", "png needs --out PATH"))?;
    }
    Ok(())
}

/// `--out`, as [`guard`] takes it.
fn outputs(out: &Option<std::path::PathBuf>) -> Vec<(&'static str, std::path::PathBuf)> {
    out.iter().map(|p| ("out", p.clone())).collect()
}

/// `text` to `--out` (atomically) or standard output.
pub(super) fn write(out: &Option<std::path::PathBuf>, text: &str) -> Result<()> {
    match out {
        Some(path) => {
            let mut o = Out::open(Some(path))?;
            o.bytes(text.as_bytes())?;
            o.finish()?;
        }
        None => print(format_args!("{text}"))?,
    }
    Ok(())
}

pub(super) fn cmd_heads_effect(args: HeadsEffectArgs) -> Result<()> {
    check_format(args.format, &args.out)?;
    guard(&args.model.source, &args.prompt, None, &outputs(&args.out))?;
    let text = args.prompt.text()?;
    let loaded = load(&args.model, None)?;
    let p = prompt(&loaded, &args.prompt, &text, args.bos)?;
    let target = args.target.id(&loaded)?;
    let metric = target.map_or(Metric::Loss, Metric::TargetLogit);
    let start = std::time::Instant::now();
    let effects = heads_effect(&loaded.model, &p.ids, metric, args.ablate_mode)?;
    let target_text = target.map(|t| loaded.tokenizer.decode(&[t])).transpose()?;
    let what = effects.describe(target_text.as_deref());
    match args.format {
        AnalysisFormat::Json => {
            let mut v = serde_json::to_value(&effects)?;
            v["model"] = loaded.name.clone().into();
            v["token_ids"] = serde_json::json!(p.ids);
            v["measured"] = what.into();
            write(&args.out, &format!("{v}\n"))?;
        }
        AnalysisFormat::Text => write(
            &args.out,
            &format!(
                "{}: {}; effect of ablating each head ({} ablation) on {what}\n\n{effects}",
                loaded.name,
                count(p.len(), "token"),
                args.ablate_mode
            ),
        )?,
        AnalysisFormat::Png => {
            let Some(path) = &args.out else {
                bail!("png needs --out")
            };
            write_heatmap(path, &format!("ablated - clean: {what}"), &effects.effect)?;
        }
    }
    note_done(&loaded, p.len(), start, args.out.as_deref());
    Ok(())
}

pub(super) fn cmd_logit_lens(args: LogitLensArgs) -> Result<()> {
    let top = match (args.top, args.top_k) {
        (Some(0), _) => Err(gpt2::Error::param("top", "must be at least 1"))?,
        (_, Some(0)) => Err(gpt2::Error::param("top_k", "must be at least 1"))?,
        (top, top_k) => top.or(top_k).unwrap_or(5),
    };
    if args.top_k.is_some() {
        note(format_args!(
            "warning: --top-k is deprecated in logit-lens: it is --top (--top-k samples in generate)\n"
        ));
    }
    let text = args.prompt.text()?;
    let mut loaded = load(&args.model, None)?;
    let p = prompt(&loaded, &args.prompt, &text, args.bos)?;
    args.ablate.apply(&mut loaded.model, &p.ids)?;
    let start = std::time::Instant::now();
    let lens = logit_lens(&loaded.model, &loaded.tokenizer, &p.ids, top, None)?;
    if args.output.json() {
        let mut v = serde_json::to_value(&lens)?;
        v["model"] = loaded.name.clone().into();
        v["token_ids"] = serde_json::json!(p.ids);
        print(format_args!("{v}\n"))?;
    } else {
        print(format_args!(
            "{}: logit lens over {} (rows: the residual after each layer)\n\n{lens}",
            loaded.name,
            count(p.len(), "token")
        ))?;
    }
    note_done(&loaded, p.len(), start, None);
    Ok(())
}

pub(super) fn cmd_attribute(args: AttributeArgs) -> Result<()> {
    check_format(args.format, &args.out)?;
    guard(&args.model.source, &args.prompt, None, &outputs(&args.out))?;
    let text = args.prompt.text()?;
    let loaded = load(&args.model, None)?;
    let p = prompt(&loaded, &args.prompt, &text, args.bos)?;
    let Some(target) = args.target.id(&loaded)? else {
        // clap requires one of the two.
        Err(gpt2::Error::param(
            "target",
            "is missing: give --target TOKEN or --target-id ID",
        ))?
    };
    let start = std::time::Instant::now();
    let mut a = attribute(&loaded.model, &p.ids, args.position, target)?;
    let text = loaded.tokenizer.decode(&[target])?;
    a.target_text = Some(text.clone());
    match args.format {
        AnalysisFormat::Json => {
            let mut v = serde_json::to_value(&a)?;
            v["model"] = loaded.name.clone().into();
            v["token_ids"] = serde_json::json!(p.ids);
            write(&args.out, &format!("{v}\n"))?;
        }
        AnalysisFormat::Text => write(
            &args.out,
            &format!("{}: {}\n{a}", loaded.name, count(p.len(), "token")),
        )?,
        AnalysisFormat::Png => {
            let Some(path) = &args.out else {
                bail!("png needs --out")
            };
            write_heatmap(
                path,
                &format!("direct logit attribution to {text:?}, per head"),
                &a.heads,
            )?;
        }
    }
    note_done(&loaded, p.len(), start, args.out.as_deref());
    Ok(())
}

/// `text` as one token of `loaded`'s tokenizer, or an error naming `param`.
pub(super) fn one_token(loaded: &Loaded, param: &'static str, text: &str) -> Result<u32> {
    match loaded.tokenizer.encode(text)?.as_slice() {
        [id] => Ok(*id),
        ids => Err(gpt2::Error::param(
            param,
            format!("{text:?} is {} tokens ({ids:?}), not one", ids.len()),
        ))?,
    }
}

// ---------------------------------------------------------------------------------------------
// Their clap types

/// A token to measure: its text (one token, e.g. " Mary") or its id.
#[derive(Args)]
struct TargetArgs {
    /// The target token as text; it must be a single token of the tokenizer (mind the leading
    /// space GPT-2 tokens carry: " Mary").
    #[arg(
        long,
        value_name = "TOKEN",
        allow_hyphen_values = true,
        conflicts_with = "target_id"
    )]
    target: Option<String>,
    /// The target token by id.
    #[arg(long, value_name = "ID", allow_negative_numbers = true)]
    target_id: Option<u32>,
}

impl TargetArgs {
    fn id(&self, loaded: &gpt2::Loaded) -> Result<Option<u32>> {
        let tokenizer = &loaded.tokenizer;
        let vocab = loaded.model.config().vocab_size;
        match (&self.target, self.target_id) {
            (_, Some(id)) if id as usize >= vocab => Err(gpt2::Error::param(
                "target_id",
                format!("{id} is outside the vocabulary (0..{vocab})"),
            ))?,
            (_, Some(id)) => Ok(Some(id)),
            (Some(text), None) => match tokenizer.encode(text)?.as_slice() {
                [id] => Ok(Some(*id)),
                ids => Err(gpt2::Error::param(
                    "target",
                    format!(
                        "{text:?} is {} tokens ({ids:?}), not one; use --target-id",
                        ids.len()
                    ),
                ))?,
            },
            (None, None) => Ok(None),
        }
    }
}

/// How an analysis is written.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AnalysisFormat {
    /// A table for people (the default)
    Text,
    /// One JSON object, for programs
    Json,
    /// A layers x heads heatmap (needs --out)
    Png,
}

#[derive(Args)]
pub(super) struct HeadsEffectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// Put <|endoftext|> before the prompt, as TransformerLens does.
    #[arg(long)]
    bos: bool,
    /// How each head is removed.
    #[arg(long, default_value = "zero", value_parser = choice::<AblateMode>())]
    ablate_mode: AblateMode,
    #[arg(long, value_enum, default_value = "text")]
    format: AnalysisFormat,
    /// Write to this file instead of standard output (needed for png).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct LogitLensArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    ablate: AblateArgs,
    /// Put <|endoftext|> before the prompt, as TransformerLens does.
    #[arg(long)]
    bos: bool,
    /// Tokens shown per layer and position [default: 5].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    top: Option<usize>,
    /// The old name of --top (deprecated: --top-k samples in generate).
    #[arg(
        long,
        hide = true,
        conflicts_with = "top",
        allow_negative_numbers = true
    )]
    top_k: Option<usize>,
    #[command(flatten)]
    output: TextOrJson,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("target_required").args(["target", "target_id"]).required(true))]
pub(super) struct AttributeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// The position whose logit is taken apart (0-based); default: the last.
    #[arg(long, allow_negative_numbers = true)]
    position: Option<usize>,
    /// Put <|endoftext|> before the prompt, as TransformerLens does.
    #[arg(long)]
    bos: bool,
    #[arg(long, value_enum, default_value = "text")]
    format: AnalysisFormat,
    /// Write to this file instead of standard output (needed for png: the heads' heatmap).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}
