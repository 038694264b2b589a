//! The analysis commands: heads-effect, logit-lens, attribute, patch. One library call each.

use anyhow::{bail, Result};
use gpt2::analysis::attribution::attribute;
use gpt2::analysis::figure::write_heatmap;
use gpt2::analysis::heads_effect::{heads_effect, Metric};
use gpt2::analysis::logit_lens::logit_lens;
use gpt2::output::{print, Out};
use gpt2::{Loaded, Prompt};

use super::shared::{count, guard, load, note, note_done};
use gpt2::analysis::patching::{activation_patch, Axis, By, Metric as Measure};
use gpt2::prompt::PromptOptions;

use super::{
    AnalysisFormat, AttributeArgs, HeadsEffectArgs, LogitLensArgs, PatchArgs, PatchMetric,
    PromptArgs,
};

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
fn write(out: &Option<std::path::PathBuf>, text: &str) -> Result<()> {
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
fn one_token(loaded: &Loaded, param: &'static str, text: &str) -> Result<u32> {
    match loaded.tokenizer.encode(text)?.as_slice() {
        [id] => Ok(*id),
        ids => Err(gpt2::Error::param(
            param,
            format!("{text:?} is {} tokens ({ids:?}), not one", ids.len()),
        ))?,
    }
}

pub(super) fn cmd_patch(args: PatchArgs) -> Result<()> {
    check_format(args.format, &args.out)?;
    let metric_kind = match (args.metric, &args.against) {
        (Some(PatchMetric::LogitDiff), None) => Err(gpt2::Error::param(
            "metric",
            "logit-diff needs --against TOKEN (the target minus it)",
        ))?,
        (Some(m @ (PatchMetric::Logit | PatchMetric::Prob | PatchMetric::Loss)), Some(_)) => {
            let name = match m {
                PatchMetric::Logit => "logit",
                PatchMetric::Prob => "prob",
                _ => "loss",
            };
            Err(gpt2::Error::param(
                "against",
                format!("is only for --metric logit-diff, not {name}"),
            ))?
        }
        (Some(m), _) => m,
        (None, Some(_)) => PatchMetric::LogitDiff,
        (None, None) => PatchMetric::Logit,
    };
    let by = args.by.unwrap_or(By::default_for(args.what));
    args.model.source.source().protect_files()?;
    if let Some(path) = &args.out {
        gpt2::output::reserve("out", path)?;
    }
    let loaded = load(&args.model, None)?;
    let opts = PromptOptions {
        bos: args.bos,
        truncate: false,
        empty_is_bos: false,
    };
    let config = loaded.model.config();
    let clean = Prompt::new(&loaded.tokenizer, &args.clean, config, opts)
        .map_err(|e| anyhow::Error::new(e).context("--clean"))?;
    let corrupted = Prompt::new(&loaded.tokenizer, &args.corrupted, config, opts)
        .map_err(|e| anyhow::Error::new(e).context("--corrupted"))?;
    let target = one_token(&loaded, "target", &args.target)?;
    let metric = match (metric_kind, &args.against) {
        (PatchMetric::LogitDiff, Some(a)) => Measure::LogitDiff {
            target,
            against: one_token(&loaded, "against", a)?,
        },
        (PatchMetric::Prob, _) => Measure::Prob { target },
        (PatchMetric::Loss, _) => Measure::Loss { target },
        _ => Measure::Logit { target },
    };
    let start = std::time::Instant::now();
    let p = activation_patch(
        &loaded.model,
        &clean.ids,
        &corrupted.ids,
        args.what,
        by,
        metric,
        args.position,
    )?;
    let text = |id: u32| {
        loaded
            .tokenizer
            .decode(&[id])
            .unwrap_or_else(|_| id.to_string())
    };
    let measured = p.describe(text);
    let tokens: Vec<(String, String)> = clean
        .ids
        .iter()
        .zip(&corrupted.ids)
        .map(|(&a, &b)| (text(a), text(b)))
        .collect();
    match args.format {
        AnalysisFormat::Json => {
            let mut v = serde_json::to_value(&p)?;
            v["model"] = loaded.name.clone().into();
            v["clean_ids"] = serde_json::json!(clean.ids);
            v["corrupted_ids"] = serde_json::json!(corrupted.ids);
            v["measured"] = measured.into();
            write(&args.out, &format!("{v}\n"))?;
        }
        AnalysisFormat::Text => {
            // Positions are labelled by their tokens, clean/corrupted where they differ.
            let label = |axis: Axis, i: usize| match (axis, tokens.get(i)) {
                (Axis::Pos, Some((a, b))) if a == b => format!("{i} {a:?}"),
                (Axis::Pos, Some((a, b))) => format!("{i} {a:?}/{b:?}"),
                _ => i.to_string(),
            };
            write(
                &args.out,
                &format!(
                    "{}: patching {} by {} from the clean run into the corrupted one ({}); \
                     measured: {measured}\nclean = {:.4}, corrupted = {:.4}; normalised = \
                     (patched - corrupted) / (clean - corrupted)\n\n{}",
                    loaded.name,
                    p.what,
                    p.by,
                    count(clean.len(), "token"),
                    p.clean,
                    p.corrupted,
                    p.table(&label)
                ),
            )?;
        }
        AnalysisFormat::Png => {
            let Some(path) = &args.out else {
                bail!("png needs --out")
            };
            let [(title, _, normalized)] = <[_; 1]>::try_from(p.tables()).map_err(|_| {
                gpt2::Error::param(
                    "format",
                    "png draws one layers x heads or layers x positions map: this result has \
                     several (use text or json)",
                )
            })?;
            write_heatmap(
                path,
                &format!(
                    "normalised patching of {} by {by} {title}: {measured}",
                    p.what
                ),
                &normalized,
            )?;
        }
    }
    note_done(&loaded, clean.len(), start, args.out.as_deref());
    Ok(())
}
