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

use super::{AnalysisFormat, AttributeArgs, HeadsEffectArgs, LogitLensArgs, PromptArgs};

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
