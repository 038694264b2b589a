//! One function per command: check the options, make one library call, print the result.

use std::time::Instant;

use anyhow::{Context, Result};
use gpt2::generation::{generate_with_hook, Completion, GenerateParams, SamplingParams, Timings};
use gpt2::info::ModelInfo;
use gpt2::inspect::generated::{AttentionRecorder, GeneratedTokens};
use gpt2::inspect::Format;
use gpt2::inspect::{self, Output, Selection, Tokens};
use gpt2::output::print;
use gpt2::{Error, Loaded, Prompt};

use super::escape::unescape;
use super::shared::{count, guard, load, note, print_peak_memory};
use super::{BenchArgs, GenerateArgs, InfoArgs, InspectHeadsArgs, PerplexityArgs};

pub(super) fn cmd_generate(args: GenerateArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let top_k = match args.top_k {
        k if k < 1 => Err(Error::param("top_k", "must be at least 1"))?,
        k => Some(k as usize),
    };
    let stop = if args.no_escape {
        args.stop.clone()
    } else {
        args.stop
            .iter()
            .map(|s| unescape(s))
            .collect::<gpt2::Result<_>>()?
    };
    let params = GenerateParams {
        max_new_tokens: usize::try_from(args.max_new_tokens).unwrap_or(usize::MAX),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k,
            top_p: args.top_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            seed,
        },
        stop,
        stop_at_eos: !args.ignore_eos,
        num_samples: usize::try_from(args.num_samples).unwrap_or(usize::MAX),
    };
    // Check options before the (possibly long) download.
    params.validate()?;
    let mut outputs = Vec::new();
    if let Some(path) = &args.attention_out {
        let files = inspect::files_written(attention_format(path)?, path);
        outputs.extend(files.into_iter().map(|f| ("attention_out", f)));
    }
    guard(&args.model.source, &args.prompt, None, &outputs)?;
    let text = args.prompt.text()?;
    let mut loaded = load(&args.model, None)?;
    let prompt = Prompt::new(
        &loaded.tokenizer,
        &text,
        loaded.model.config(),
        args.prompt.options(false, true),
    )
    .map_err(truncate_hint)?;
    args.ablate.apply(&mut loaded.model, &prompt.ids)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    if prompt.dropped > 0 {
        note(format_args!(
            "warning: prompt truncated from {} to its last {} tokens\n",
            prompt.len() + prompt.dropped,
            prompt.len()
        ));
    }
    let shown_prompt = if prompt.dropped > 0 {
        tokenizer.decode(&prompt.ids)?
    } else {
        text
    };

    let mut recorder = match &args.attention_out {
        Some(path) => Some(attention_recorder(&args, &loaded, &prompt, &params, path)?),
        None => None,
    };
    let stream = !args.output.json() && params.num_samples == 1;
    if stream {
        print(format_args!("{shown_prompt}"))?;
    }
    let hook = recorder.as_mut().map(|(r, _, _)| r as &mut dyn gpt2::Hook);
    let (completions, timings) =
        generate_with_hook(model, tokenizer, &prompt, &params, hook, |_, text| {
            if stream {
                print(format_args!("{text}"))?;
            }
            Ok(())
        })?;
    if let Some((rec, path, format)) = &recorder {
        let mut ids = prompt.ids.clone();
        ids.extend(&completions[0].token_ids);
        let meta = GeneratedTokens {
            model: loaded.name.clone(),
            tokens: ids
                .iter()
                .map(|&i| tokenizer.decode(&[i]))
                .collect::<gpt2::Result<_>>()?,
            token_ids: ids,
            prompt_tokens: prompt.len(),
            layers: Selection::new(model.config(), args.layer, None)?.layers,
            n_head: model.config().n_head,
        };
        gpt2::inspect::generated::write(rec, &meta, *format, path)?;
    }
    if args.output.json() {
        for c in &completions {
            let line = json_line(&loaded, &shown_prompt, &prompt, c, &timings);
            print(format_args!("{line}\n"))?;
        }
    } else if stream {
        print(format_args!("\n"))?;
    } else {
        for (i, c) in completions.iter().enumerate() {
            print(format_args!(
                "--- sample {i} ({}) ---\n{shown_prompt}{}\n",
                c.finish_reason.as_str(),
                c.text
            ))?;
        }
    }
    note(format_args!(
        "{}",
        timings.report(&loaded.model, &loaded.name, loaded.load_time, seed)
    ));
    print_peak_memory();
    Ok(())
}

/// The recorder --attention-out needs, its path and format, after checking the run can give it.
fn attention_recorder(
    args: &GenerateArgs,
    loaded: &Loaded,
    prompt: &Prompt,
    params: &GenerateParams,
    path: &std::path::Path,
) -> Result<(AttentionRecorder, std::path::PathBuf, Format)> {
    let format = attention_format(path)?;
    let c = loaded.model.config();
    if params.num_samples != 1 {
        Err(Error::param(
            "attention_out",
            "records one sample: drop --num-samples",
        ))?;
    }
    let layers = Selection::new(c, args.layer, None)?.layers;
    let recorder = AttentionRecorder::for_run(
        &loaded.model,
        layers,
        prompt.len(),
        params.max_new_tokens,
        format,
    )?;
    Ok((recorder, path.to_path_buf(), format))
}

/// The format --attention-out's extension names.
fn attention_format(path: &std::path::Path) -> Result<Format> {
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => Format::Npy,
        Some("safetensors") => Format::Safetensors,
        Some("json") => Format::Json,
        Some("html") => Format::Html,
        _ => Err(Error::param(
            "attention_out",
            format!(
                "{}: name it .npy, .safetensors, .json or .html",
                path.display()
            ),
        ))?,
    })
}

/// Adds the option that fixes a too-long prompt.
fn truncate_hint(e: Error) -> anyhow::Error {
    match e {
        Error::PromptTooLong { context, .. } => anyhow::Error::new(e).context(format!(
            "shorten it or pass --truncate-prompt to keep its last {context} tokens"
        )),
        e => e.into(),
    }
}

pub(super) fn cmd_bench(args: BenchArgs) -> Result<()> {
    // Check the sizes against the layout before the (possibly long) load.
    let config = args.model.source.source().config()?;
    if let Some(heads) = &args.compare_heads {
        let device = args.model.device.open()?;
        let rows = gpt2::train::compare::time_heads(
            &config,
            heads,
            args.batch,
            args.prompt_tokens,
            args.runs,
            &device,
        )?;
        if args.output.json() {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        println!(
            "{} × {} tokens, n_embd {}, {} layers, f32, {} thread(s); fastest of {}:",
            args.batch,
            args.prompt_tokens,
            config.n_embd,
            config.n_layer,
            candle_core::utils::get_num_threads(),
            args.runs
        );
        println!(
            "| heads | K/V heads | head size | parameters | forward ms | forward + backward ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|");
        for r in rows {
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} |",
                r.heads, r.kv_heads, r.head_size, r.parameters, r.forward_ms, r.forward_backward_ms
            );
        }
        return Ok(());
    }
    gpt2::bench::check(
        &config,
        args.prompt_tokens,
        args.new_tokens,
        args.runs,
        args.batch,
    )?;
    let loaded = load(&args.model, None)?;
    let r = gpt2::bench::bench(
        &loaded.model,
        args.prompt_tokens,
        args.new_tokens,
        args.runs,
        args.batch,
    )?;
    if args.output.json() {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = loaded.name.clone().into();
        v["dtype"] = loaded.model.dtype().as_str().into();
        v["weights"] = loaded.model.weights_label().into();
        v["weight_bytes"] = loaded.model.weight_bytes().into();
        v["kv_cache"] = loaded.model.kv_dtype().as_str().into();
        v["load_ms"] = (loaded.load_time.as_secs_f64() * 1e3).into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        let cpu = gpt2::bench::kernels_json();
        v["cpu"] = cpu["cpu"].clone();
        v["cpu_features"] = cpu["features"].clone();
        v["kernels"] = cpu["kernels"].clone();
        print(format_args!("{v}\n"))?;
    } else {
        print(format_args!("{}", r.report(&loaded)))?;
    }
    Ok(())
}

pub(super) fn cmd_inspect_heads(args: InspectHeadsArgs) -> Result<()> {
    // Check options before the (possibly long) download.
    let output = Output::new(args.format, args.out.clone())?;
    if args.scores {
        inspect::scores::check_output(&output)?;
    }
    let outputs: Vec<_> = output.files().into_iter().map(|f| ("out", f)).collect();
    guard(
        &args.model.source,
        &args.prompt,
        args.prompts.as_deref(),
        &outputs,
    )?;
    // Several prompts (--prompts) for the scores, else the one prompt.
    let texts = match &args.prompts {
        Some(path) => read_prompts(path)?,
        None => vec![args.prompt.text()?],
    };
    if texts.iter().any(String::is_empty) {
        Err(Error::EmptyPrompt)?;
    }
    let text = texts[0].clone();
    // Only the layers up to the last one shown are built and run.
    let config = args.model.source.source().config()?;
    let selection = Selection::new(&config, args.layer, args.head)?;
    let last = selection
        .layers
        .iter()
        .max()
        .map_or(config.n_layer, |l| l + 1);
    let mut loaded = load(&args.model, Some(last))?;
    let prompt = Prompt::new(
        &loaded.tokenizer,
        &text,
        loaded.model.config(),
        args.prompt.options(args.bos, false),
    )
    .map_err(truncate_hint)?;
    args.ablate.apply(&mut loaded.model, &prompt.ids)?;
    let (model, name) = (&loaded.model, &loaded.name);
    let tokens = Tokens::new(&loaded.tokenizer, &prompt)?;
    let start = Instant::now();
    if args.scores {
        let all = texts
            .iter()
            .map(|t| {
                let opts = args.prompt.options(args.bos, false);
                let p = Prompt::new(&loaded.tokenizer, t, model.config(), opts)
                    .map_err(truncate_hint)?;
                Ok(Tokens::new(&loaded.tokenizer, &p)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let table = inspect::scores::head_scores_over(model, &all, &selection)?;
        inspect::scores::write_scores(&table, name, &tokens, &output)?;
    } else {
        inspect::write_attention(model, name, &tokens, &selection, &output)?;
    }
    note(format_args!(
        "{name}: {}, {} x {}; loaded in {:.0} ms, run and written in {:.0} ms{}\n",
        count(tokens.len(), "token"),
        count(selection.layers.len(), "layer"),
        count(selection.heads.len(), "head"),
        loaded.load_time.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3,
        args.out
            .as_ref()
            .map(|p| format!(" to {}", p.display()))
            .unwrap_or_default(),
    ));
    print_peak_memory();
    Ok(())
}

/// Prompts from a file: one per line, or JSON Lines of strings or `{"prompt": ...}` objects
/// (`.jsonl`). Blank lines are skipped.
fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = {
        let _reading = gpt2::interrupt::reading_input()?;
        super::read_file(path)
            .with_context(|| format!("cannot read the prompts file {}", path.display()))?
    };
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            prompts.push(line.to_string());
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        match v.as_str().or_else(|| v["prompt"].as_str()) {
            Some(p) => prompts.push(p.to_string()),
            None => anyhow::bail!(
                "{} line {}: expected a string or {{\"prompt\": ...}}",
                path.display(),
                i + 1
            ),
        }
    }
    if prompts.is_empty() {
        anyhow::bail!("{} holds no prompt", path.display());
    }
    Ok(prompts)
}

pub(super) fn cmd_info(args: InfoArgs) -> Result<()> {
    let source = args.source.source();
    let config = source.config()?;
    let info = ModelInfo::new(&config, args.context.unwrap_or(config.n_positions))?;
    if args.output.json() {
        let mut v = serde_json::to_value(&info)?;
        v["model"] = source.name().into();
        print(format_args!("{v}\n"))?;
    } else {
        print(format_args!("{}", info.report(&source.name())))?;
    }
    Ok(())
}

pub(super) fn cmd_perplexity(args: PerplexityArgs) -> Result<()> {
    let reading = gpt2::interrupt::reading_input()?;
    let text = if args.file.as_os_str() == "-" {
        let stdin = std::path::Path::new("standard input");
        gpt2::memory::read_text(std::io::stdin(), None, stdin)
            .context("cannot read the text from standard input")?
    } else {
        super::read_file(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    drop(reading);
    let mut loaded = load(&args.model, None)?;
    let ids = loaded.tokenizer.encode(&text)?;
    // Checked against the vocabulary; any length (the windows slide).
    if let Some(bad) = ids
        .iter()
        .find(|&&i| i as usize >= loaded.model.config().vocab_size)
    {
        anyhow::bail!("the tokenizer produced id {bad}, outside the model's vocabulary");
    }
    // Mean ablation averages over the text's first window.
    let first = &ids[..ids.len().min(loaded.model.config().n_positions)];
    args.ablate.apply(&mut loaded.model, first)?;
    let bar = progress_bar("windows");
    let start = Instant::now();
    let p = gpt2::perplexity::perplexity(&loaded.model, &ids, args.stride, None, |done, total| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if args.output.json() {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = loaded.name.clone().into();
        v["weights"] = loaded.model.weights_label().into();
        v["seconds"] = start.elapsed().as_secs_f64().into();
        print(format_args!("{v}\n"))?;
    } else {
        print(format_args!(
            "perplexity {:.4}  (mean NLL {:.6} nats, {}, {} of up to {} with stride {}; {} weights)\n",
            p.perplexity,
            p.mean_nll,
            count(p.tokens, "token"),
            count(p.windows, "window"),
            p.max_length,
            p.stride,
            loaded.model.weights_label()
        ))?;
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal.
fn progress_bar(what: &'static str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {what} {{elapsed}}"
        )) {
            bar.set_style(style);
        }
        bar
    })
}

fn json_line(
    loaded: &Loaded,
    prompt_text: &str,
    prompt: &Prompt,
    c: &Completion,
    t: &Timings,
) -> serde_json::Value {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    serde_json::json!({
        "model": loaded.name,
        "prompt": prompt_text,
        "prompt_token_ids": prompt.ids,
        "completion": c.text,
        "completion_token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "timings": {
            "load_ms": ms(loaded.load_time),
            "prefill_ms": ms(t.prefill),
            "decode_ms": ms(t.decode),
            "prefill_tokens": t.prefill_tokens,
            "generated_tokens": t.generated_tokens,
            "decode_tokens": t.decode_tokens,
            "reprefill_tokens": t.reprefill_tokens,
            "prefill_tokens_per_s": t.prefill_tokens_per_s(),
            "decode_tokens_per_s": t.decode_tokens_per_s(),
        }
    })
}
