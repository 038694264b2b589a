//! End-to-end tests of `gpt2 generate`: the real binary on the committed fixture checkpoints
//! (`--model-dir`, no network). The Hub path is covered in tests/hub.rs.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{
    assert_one_line_error, fixture, fixture_json, generate_json, gpt2, gpt2_with_stdin, ids, Result,
};

#[test]
fn greedy_equals_transformers_generate() -> Result {
    for name in ["tiny", "tiny-b"] {
        let g = fixture_json(name, "goldens.json")?;
        let prompt = g["prompt_text"].as_str().ok_or("prompt_text")?;
        let out = generate_json(
            &fixture(name),
            &["--prompt", prompt, "-n", "20", "--temperature", "0"],
        )?;
        assert_eq!(out.len(), 1);
        let o = &out[0];
        assert_eq!(
            ids(&o["prompt_token_ids"]),
            ids(&g["greedy_prompt_ids"]),
            "{name}"
        );
        assert_eq!(
            ids(&o["completion_token_ids"]),
            ids(&g["greedy_ids"]),
            "{name}"
        );
        assert_eq!(o["finish_reason"], "length");
        assert_eq!(o["prompt"], prompt);
        for key in [
            "load_ms",
            "prefill_ms",
            "decode_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
        ] {
            assert!(
                o["timings"][key].as_f64().is_some_and(|v| v > 0.0),
                "{key}: {o}"
            );
        }
    }
    Ok(())
}

#[test]
fn text_output_is_prompt_then_completion_with_stats_on_stderr() -> Result {
    let dir = fixture("tiny");
    let prompt = "Emoji 🦀 and 日本語 stay whole";
    let args = [
        "generate",
        "--model-dir",
        dir.to_str().ok_or("path")?,
        "--prompt",
        prompt,
        "-n",
        "12",
        "--seed",
        "5",
    ];
    let out = gpt2(&args)?;
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout)?;
    let json = generate_json(&dir, &["--prompt", prompt, "-n", "12", "--seed", "5"])?;
    let completion = json[0]["completion"].as_str().ok_or("completion")?;
    assert_eq!(stdout, format!("{prompt}{completion}\n"));
    let stderr = String::from_utf8(out.stderr)?;
    for needle in [
        "loaded in",
        "prompt: ",
        "tokens/s",
        "generated: 12 tokens",
        "seed 5",
    ] {
        assert!(stderr.contains(needle), "`{needle}` not in {stderr}");
    }
    Ok(())
}

#[test]
fn seeds_top_k_one_and_batches() -> Result {
    let dir = fixture("tiny-b");
    let run = |extra: &[&str]| -> Result<Vec<u32>> {
        let mut args = vec!["--prompt", "Once upon a time", "-n", "16"];
        args.extend_from_slice(extra);
        Ok(ids(&generate_json(&dir, &args)?[0]["completion_token_ids"]))
    };
    let a = run(&["--seed", "1"])?;
    assert_eq!(a, run(&["--seed", "1"])?, "same seed, same text");
    assert_ne!(a, run(&["--seed", "2"])?, "different seeds, different text");
    assert_eq!(
        run(&["--top-k", "1", "--seed", "3"])?,
        run(&["--temperature", "0"])?
    );
    assert_ne!(a, run(&["--seed", "1", "--top-p", "0.5"])?);
    // A batch: N objects; sample i uses seed + i, so sample 0 equals the single run.
    let batch = generate_json(
        &dir,
        &[
            "--prompt",
            "Once upon a time",
            "-n",
            "16",
            "--seed",
            "1",
            "--num-samples",
            "3",
        ],
    )?;
    assert_eq!(batch.len(), 3);
    assert_eq!(ids(&batch[0]["completion_token_ids"]), a);
    assert_eq!(
        ids(&batch[1]["completion_token_ids"]),
        run(&["--seed", "2"])?
    );
    assert_ne!(
        batch[1]["completion_token_ids"],
        batch[2]["completion_token_ids"]
    );
    Ok(())
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() -> Result {
    let dir = fixture("tiny");
    let g = fixture_json("tiny", "goldens.json")?;
    let prompt = g["prompt_text"].as_str().ok_or("prompt_text")?;
    let greedy = generate_json(
        &dir,
        &["--prompt", prompt, "-n", "20", "--temperature", "0"],
    )?;
    let full = greedy[0]["completion"]
        .as_str()
        .ok_or("completion")?
        .to_string();
    // A stop string from the middle of the greedy text, at character boundaries.
    let chars: Vec<char> = full.chars().collect();
    let start = chars.len() / 2;
    let stop: String = chars[start..start + 3].iter().collect();
    let before = full[..full.find(&stop).ok_or("stop")?].to_string();
    let out = generate_json(
        &dir,
        &[
            "--prompt",
            prompt,
            "-n",
            "20",
            "--temperature",
            "0",
            "--stop",
            &stop,
            "--stop",
            "never-there",
        ],
    )?;
    assert_eq!(out[0]["finish_reason"], "stop");
    assert_eq!(out[0]["completion"], before.as_str());
    assert!(ids(&out[0]["completion_token_ids"]).len() < 20);
    let text = gpt2(&[
        "generate",
        "--model-dir",
        dir.to_str().ok_or("p")?,
        "--prompt",
        prompt,
        "-n",
        "20",
        "--temperature",
        "0",
        "--stop",
        &stop,
    ])?;
    assert_eq!(
        String::from_utf8(text.stdout)?,
        format!("{prompt}{before}\n")
    );
    Ok(())
}

/// A copy of a fixture whose config names `eos` as the end-of-text id.
fn with_eos(name: &str, eos: u32) -> Result<PathBuf> {
    let dir = common::scratch("cli", &format!("{name}-eos-{eos}"));
    for entry in std::fs::read_dir(fixture(name))? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    config["eos_token_id"] = eos.into();
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(dir)
}

#[test]
fn eos_ends_generation_unless_ignored() -> Result {
    let g = fixture_json("tiny", "goldens.json")?;
    let greedy = ids(&g["greedy_ids"]);
    let prompt = g["prompt_text"].as_str().ok_or("prompt_text")?;
    // Make the 4th greedy token the EOS token.
    let dir = with_eos("tiny", greedy[3])?;
    let out = generate_json(
        &dir,
        &["--prompt", prompt, "-n", "20", "--temperature", "0"],
    )?;
    assert_eq!(out[0]["finish_reason"], "eos");
    assert_eq!(ids(&out[0]["completion_token_ids"]), greedy[..4]);
    let out = generate_json(
        &dir,
        &[
            "--prompt",
            prompt,
            "-n",
            "20",
            "--temperature",
            "0",
            "--ignore-eos",
        ],
    )?;
    assert_eq!(out[0]["finish_reason"], "length");
    assert_eq!(ids(&out[0]["completion_token_ids"]), greedy);
    Ok(())
}

fn peak_rss_kib(stderr: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("peak memory"))?;
    line.split_whitespace()
        .find_map(|w| w.parse::<f64>().ok())
        .map(|mib| (mib * 1024.0) as u64)
}

#[test]
fn runs_far_past_the_context_window_with_flat_memory() -> Result {
    let dir = fixture("tiny"); // n_positions = 128
    let mut peaks = Vec::new();
    for n in ["300", "3000"] {
        let args = [
            "generate",
            "--model-dir",
            dir.to_str().ok_or("p")?,
            "--prompt",
            "Hello",
            "-n",
            n,
            "--ignore-eos",
            "--seed",
            "9",
            "--json",
        ];
        let out = gpt2(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let o: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(ids(&o["completion_token_ids"]).len(), n.parse::<usize>()?);
        assert_eq!(o["finish_reason"], "length");
        peaks.push(peak_rss_kib(&stderr).ok_or("no peak memory in stats")?);
    }
    // 10x the tokens, 23x the context: the peak may not grow beyond noise.
    assert!(
        peaks[1] < peaks[0] + peaks[0] / 5 + 8 * 1024,
        "peak RSS {peaks:?} KiB"
    );
    Ok(())
}

#[test]
fn prompt_sources_and_length_limits() -> Result {
    let dir = fixture("tiny");
    let d = dir.to_str().ok_or("p")?;
    let from_stdin = gpt2_with_stdin(
        &[
            "generate",
            "--model-dir",
            d,
            "--prompt",
            "-",
            "-n",
            "3",
            "--seed",
            "1",
        ],
        "piped prompt",
    )?;
    assert!(String::from_utf8(from_stdin.stdout)?.starts_with("piped prompt"));
    let file = common::tmp("prompt.txt");
    std::fs::write(&file, "file prompt")?;
    let from_file = gpt2(&[
        "generate",
        "--model-dir",
        d,
        "--prompt-file",
        file.to_str().ok_or("p")?,
        "-n",
        "3",
    ])?;
    assert!(String::from_utf8(from_file.stdout)?.starts_with("file prompt"));
    // The tiny tokenizer has few merges: 200 letters are 200 tokens, past the 128 positions.
    let long = "a".repeat(200);
    let out = gpt2(&["generate", "--model-dir", d, "--prompt", &long, "-n", "3"])?;
    assert_one_line_error(&out, "--truncate-prompt");
    let out = generate_json(&dir, &["--prompt", &long, "-n", "3", "--truncate-prompt"])?;
    assert_eq!(ids(&out[0]["prompt_token_ids"]).len(), 128);
    assert_eq!(ids(&out[0]["completion_token_ids"]).len(), 3);
    Ok(())
}

#[test]
fn bad_options_give_one_clear_line() -> Result {
    let dir = fixture("tiny");
    let d = dir.to_str().ok_or("p")?;
    let no_config = common::tmp("no-config");
    std::fs::create_dir_all(&no_config)?;
    let nc = no_config.to_str().ok_or("p")?;
    let cases: &[(&[&str], &str)] = &[
        (&["--temperature", "-0.5"], "--temperature"),
        (&["--top-p", "0"], "--top-p"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--top-k", "0"], "--top-k"),
        (&["-n", "0"], "--max-new-tokens"),
        (&["--num-samples", "0"], "--num-samples"),
        (&["--dtype", "f64"], "f64"),
        (&["--device", "tpu"], "tpu"),
        (&["--device", "cuda"], "--features cuda"),
        (&["-n", "many"], "invalid value"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model-dir", d, "--prompt", "x"];
        args.extend_from_slice(extra);
        assert_one_line_error(&gpt2(&args)?, needle);
    }
    let missing = gpt2(&[
        "generate",
        "--model-dir",
        "/no/such/folder",
        "--prompt",
        "x",
    ])?;
    assert_one_line_error(&missing, "/no/such/folder");
    assert_one_line_error(
        &gpt2(&["generate", "--model-dir", nc, "--prompt", "x"])?,
        "config.json",
    );
    assert_one_line_error(&gpt2(&["generate", "--model-dir", d])?, "--prompt");
    Ok(())
}

#[test]
fn bench_runs_and_reports_both_phases() -> Result {
    // The test binary is a debug build (overflow checks on), as `cargo run -- bench` is.
    let layout = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.json");
    let l = layout.to_str().ok_or("p")?;
    let args = [
        "bench",
        "--config",
        l,
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "4",
        "--runs",
        "1",
        "--json",
    ];
    let out = gpt2(&args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_str(String::from_utf8(out.stdout)?.trim())?;
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v[key].as_f64().is_some_and(|r| r > 0.0), "{key}: {v}");
    }
    assert_eq!(v["prompt_tokens"], 8);
    assert_eq!(v["kv_cache"], "f32");
    // The table says which CPU and which kernels made its numbers.
    assert!(v["cpu"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert!(v["cpu_features"].is_array(), "{v}");
    assert!(v["kernels"]["decode q8_0/q4_0/q4_k"].is_string(), "{v}");
    assert_eq!(v["batch"], 1);
    // --batch N: N sequences stepped together, their aggregate tokens/s.
    let out = gpt2(&[&args[..], &["--batch", "3"]].concat())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: Value = serde_json::from_str(String::from_utf8(out.stdout)?.trim())?;
    assert_eq!(b["batch"], 3);
    assert!(
        b["decode_tokens_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{b}"
    );
    // Reduced weights default to an f16 cache; --kv-cache chooses.
    for (extra, want) in [
        (&["--dtype", "f16"][..], "f16"),
        (&["--quantize", "q4_0"], "f16"),
        (&["--quantize", "q4_k"], "f16"),
        (&["--quantize", "q8_0", "--kv-cache", "f32"], "f32"),
        (&["--kv-cache", "bf16"], "bf16"),
    ] {
        let out = gpt2(&[&args[..], extra].concat())?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(String::from_utf8(out.stdout)?.trim())?;
        assert_eq!(v["kv_cache"], want, "{extra:?}");
    }
    let bad = gpt2(&[&args[..], &["--kv-cache", "q8_0"]].concat())?;
    assert!(!bad.status.success());
    Ok(())
}

/// Weights converted at load (`--dtype f16`, `--quantize`) or copied (`--no-mmap`) are read once
/// and their file pages given back: the peak holds one copy of the weights, not the mapped file
/// beside the converted one (it did: f16 517, q8_0 665, --no-mmap 1008 MB on GPT-2 small, against
/// 539 MB for f32 used in place).
#[test]
fn converted_and_copied_weights_do_not_keep_the_file_resident() -> Result {
    let config = gpt2::Config {
        vocab_size: 512,
        n_positions: 128,
        n_embd: 512,
        n_layer: 8,
        n_head: 8,
        bos_token_id: 511,
        eos_token_id: 511,
        ..gpt2::Config::default()
    };
    let dir = common::scratch("cli", "peak-memory");
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
    std::fs::copy(
        fixture("tiny").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )?;
    let weights = gpt2::random_checkpoint(&config, 3)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    let mib = std::fs::metadata(dir.join("model.safetensors"))?.len() as f64 / (1 << 20) as f64;
    let peak = |extra: &[&str]| -> Result<f64> {
        let mut args = vec!["generate", "--model-dir", dir.to_str().ok_or("path")?];
        args.extend_from_slice(&["--prompt", "Hello", "-n", "2", "--json"]);
        args.extend_from_slice(extra);
        let out = gpt2(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        Ok(peak_rss_kib(&stderr).ok_or("no peak memory in stats")? as f64 / 1024.0)
    };
    let in_place = peak(&[])?;
    for (extra, most) in [
        (&["--no-mmap"][..], in_place + mib / 3.0),
        (&["--dtype", "f16"][..], in_place - mib / 4.0),
        (&["--quantize", "q8_0"][..], in_place - mib / 2.0),
    ] {
        let p = peak(extra)?;
        eprintln!("{extra:?}: peak {p:.0} MiB (f32 in place {in_place:.0}, weights {mib:.0})");
        assert!(p < most, "{extra:?}: peak {p:.0} MiB, want < {most:.0}");
    }
    Ok(())
}

/// The exit-code contract (README): every usage error of every command, a missing input or a
/// bad value of each kind, exits 2 with one `error:` line that names the flag as typed; a
/// runtime error exits 1, with nothing printed before it.
#[test]
fn every_usage_error_exits_2_naming_its_flag() -> Result {
    let tiny = fixture("tiny");
    let m = ["--model-dir", tiny.to_str().ok_or("path")?];
    let text = common::tmp("usage-text.txt");
    std::fs::write(&text, "a text to score")?;
    let text = text.to_str().ok_or("path")?;
    let png = common::tmp("usage.png");
    let png = png.to_str().ok_or("path")?;
    // (command, what follows the model, the flag the line must name)
    let cases: &[(&str, &[&str], &str)] = &[
        ("", &[], "no command given"),
        ("bogus", &[], "bogus"),
        // generate: a missing prompt, and a bad value of each kind of option.
        ("generate", &[], "--prompt"),
        (
            "generate",
            &["--prompt", "x", "--prompt-file", text],
            "--prompt-file",
        ),
        ("generate", &["--prompt", "x", "--stop", r"\x"], "--stop"),
        (
            "generate",
            &["--prompt", "x", "--stop", r"\u{110000}"],
            "--stop",
        ),
        ("generate", &["--prompt", "x", "--stop", r"\q"], "--stop"),
        ("generate", &["--prompt", "x", "--stop", "end\\"], "--stop"),
        (
            "generate",
            &["--prompt", "x", "--temperature", "-0.5"],
            "--temperature",
        ),
        (
            "generate",
            &["--prompt", "x", "--temperature", "hot"],
            "--temperature",
        ),
        ("generate", &["--prompt", "x", "--top-p", "0"], "--top-p"),
        ("generate", &["--prompt", "x", "--top-k", "0"], "--top-k"),
        (
            "generate",
            &["--prompt", "x", "-n", "0"],
            "--max-new-tokens",
        ),
        (
            "generate",
            &["--prompt", "x", "--num-samples", "0"],
            "--num-samples",
        ),
        (
            "generate",
            &["--prompt", "x", "--repeat-penalty", "0"],
            "--repeat-penalty",
        ),
        (
            "generate",
            &["--prompt", "x", "--repeat-last-n", "-1"],
            "--repeat-last-n",
        ),
        ("generate", &["--prompt", "x", "--seed", "-1"], "--seed"),
        ("generate", &["--prompt", "x", "--seed", "x"], "--seed"),
        ("generate", &["--prompt", "x", "--dtype", "f64"], "--dtype"),
        (
            "generate",
            &["--prompt", "x", "--device", "tpu"],
            "--device",
        ),
        (
            "generate",
            &["--prompt", "x", "--quantize", "q2"],
            "--quantize",
        ),
        (
            "generate",
            &["--prompt", "x", "--kv-cache", "q8_0"],
            "--kv-cache",
        ),
        ("generate", &["--prompt", "x", "--ablate", ""], "--ablate"),
        ("generate", &["--prompt", "x", "--ablate", ","], "--ablate"),
        ("generate", &["--prompt", "x", "--ablate", "1"], "--ablate"),
        (
            "generate",
            &["--prompt", "x", "--ablate", "9.0"],
            "--ablate",
        ),
        (
            "generate",
            &["--prompt", "x", "--ablate-mode", "half"],
            "--ablate-mode",
        ),
        (
            "generate",
            &["--prompt", "x", "--attention-out", png],
            "--attention-out",
        ),
        (
            "generate",
            &["--prompt", "x", "--layer", "1"],
            "--attention-out",
        ),
        (
            "generate",
            &["--prompt", "x", "--format", "yaml"],
            "--format",
        ),
        (
            "generate",
            &["--prompt", "x", "--json", "--format", "text"],
            "--format",
        ),
        ("generate", &["--prompt", "x", "--config", text], "--config"),
        // bench
        ("bench", &["--runs", "0"], "--runs"),
        ("bench", &["--prompt-tokens", "0"], "--prompt-tokens"),
        ("bench", &["--new-tokens", "0"], "--new-tokens"),
        ("bench", &["--batch", "0"], "--batch"),
        (
            "bench",
            &["--prompt-tokens", "100", "--new-tokens", "100"],
            "--prompt-tokens",
        ),
        // inspect-heads
        ("inspect-heads", &[], "--prompt"),
        (
            "inspect-heads",
            &["--prompt", "x", "--layer", "99"],
            "--layer",
        ),
        (
            "inspect-heads",
            &["--prompt", "x", "--layer", "one"],
            "--layer",
        ),
        (
            "inspect-heads",
            &["--prompt", "x", "--head", "99"],
            "--head",
        ),
        (
            "inspect-heads",
            &["--prompt", "x", "--format", "png"],
            "--format",
        ),
        (
            "inspect-heads",
            &["--prompt", "x", "--format", "yaml"],
            "--format",
        ),
        (
            "inspect-heads",
            &["--prompt", "x", "--scores", "--format", "png", "--out", png],
            "--scores",
        ),
        ("inspect-heads", &["--prompts", text], "--scores"),
        // info
        ("info", &["--context", "100000"], "--context"),
        ("info", &["--context", "-1"], "--context"),
        ("info", &["--format", "yaml"], "--format"),
        // perplexity
        ("perplexity", &[], "--file"),
        ("perplexity", &["--file", text, "--stride", "0"], "--stride"),
        ("perplexity", &["--file", text, "--ablate", ","], "--ablate"),
        // heads-effect
        ("heads-effect", &[], "--prompt"),
        (
            "heads-effect",
            &["--prompt", "x", "--target", "a b c"],
            "--target",
        ),
        (
            "heads-effect",
            &["--prompt", "x", "--target-id", "99999"],
            "--target-id",
        ),
        (
            "heads-effect",
            &["--prompt", "x", "--target", "x", "--target-id", "1"],
            "--target-id",
        ),
        (
            "heads-effect",
            &["--prompt", "x", "--format", "png"],
            "--format",
        ),
        (
            "heads-effect",
            &["--prompt", "x", "--ablate-mode", "half"],
            "--ablate-mode",
        ),
        // logit-lens
        ("logit-lens", &[], "--prompt"),
        ("logit-lens", &["--prompt", "x", "--top", "0"], "--top"),
        ("logit-lens", &["--prompt", "x", "--top-k", "0"], "--top-k"),
        ("logit-lens", &["--prompt", "x", "--ablate", ""], "--ablate"),
        // attribute
        ("attribute", &["--prompt", "x"], "--target"),
        (
            "attribute",
            &["--prompt", "x", "--target-id", "1", "--position", "99"],
            "--position",
        ),
        (
            "attribute",
            &["--prompt", "x", "--target-id", "1", "--format", "png"],
            "--format",
        ),
    ];
    let mut wrong = Vec::new();
    for (command, rest, flag) in cases {
        let mut args: Vec<&str> = Vec::new();
        if !command.is_empty() {
            args.push(command);
            if *command != "bogus" {
                args.extend_from_slice(&m);
            }
        }
        args.extend_from_slice(rest);
        let out = gpt2(&args)?;
        let err = common::stderr(&out);
        let one_line = err.ends_with('\n') && err.lines().count() == 1;
        if out.status.code() != Some(2)
            || !err.starts_with("error: ")
            || !one_line
            || !err.contains(flag)
            || err.contains("panicked")
        {
            wrong.push(format!("{args:?} exit {:?}: {err}", out.status.code()));
        }
    }
    // Every case is tried, and every wrong one shown.
    assert!(
        wrong.is_empty(),
        "{} of {} cases:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    // A runtime error: exit 1, and the random-weights warning only once a layout has loaded.
    let out = gpt2(&["generate", "--config", "missing.json", "--prompt", "x"])?;
    assert_eq!(out.status.code(), Some(1), "{}", common::stderr(&out));
    assert!(common::stderr(&out).starts_with("error: "));
    assert_one_line_error(&out, "missing.json");
    Ok(())
}

/// What a newcomer reads: the weights as stored, names rather than enum variants, singular
/// counts, and a target token's text beside its id.
#[test]
fn reports_say_what_they_mean() -> Result {
    let tiny = fixture("tiny");
    let d = tiny.to_str().ok_or("path")?;
    let run = |args: &[&str], input: &str| -> Result<(String, String)> {
        let out = gpt2_with_stdin(args, input)?;
        let err = common::stderr(&out);
        assert!(out.status.success(), "{args:?}: {err}");
        Ok((String::from_utf8(out.stdout)?, err))
    };
    // One prompt token, one generated, quantized weights.
    let (_, err) = run(
        &["generate", "--model-dir", d, "--prompt", "a", "-n", "1"],
        "",
    )?;
    assert!(err.contains(&format!("{d} (f32, cpu) loaded")), "{err}");
    assert!(err.contains("prompt: 1 token,"), "{err}");
    assert!(err.contains("generated: 1 token,"), "{err}");
    let args = ["generate", "--model-dir", d, "--prompt", "a", "-n", "2"];
    let (_, err) = run(&[&args[..], &["--quantize", "q8_0"]].concat(), "")?;
    assert!(err.contains("(q8_0, cpu)"), "{err}");
    // heads-effect names its mode as typed.
    let (out, _) = run(
        &["heads-effect", "--model-dir", d, "--prompt", "the cat sat"],
        "",
    )?;
    assert!(out.contains("(zero ablation)"), "{out}");
    // A text shorter than a window is one window.
    let (out, _) = run(&["perplexity", "--model-dir", d, "--file", "-"], "hello")?;
    assert!(out.contains(" 1 window of "), "{out}");
    // GPT-2 has one query head per key/value head.
    let (out, _) = run(&["info", "--model-dir", d], "")?;
    assert!(out.contains("(1 query head each)"), "{out}");
    // The target token by its text too, quoted as every token is.
    let tokenizer = gpt2::Tokenizer::from_files(&gpt2::tokenizer::TokenizerFiles::Json(
        tiny.join("tokenizer.json"),
    ))?;
    let text = tokenizer.decode(&[262])?;
    let (out, _) = run(
        &[
            "attribute",
            "--model-dir",
            d,
            "--prompt",
            "ab",
            "--target-id",
            "262",
        ],
        "",
    )?;
    assert!(
        out.contains(&format!("logit of token 262 {text:?} at position")),
        "{out}"
    );
    let (_, err) = run(
        &[
            "inspect-heads",
            "--model-dir",
            d,
            "--prompt",
            "ab",
            "--layer",
            "0",
            "--head",
            "1",
        ],
        "",
    )?;
    assert!(err.contains("1 layer x 1 head;"), "{err}");
    let (_, err) = run(&["logit-lens", "--model-dir", d, "--prompt", "a"], "")?;
    assert!(err.contains(": 1 token;"), "{err}");
    Ok(())
}

/// The examples print an error as one `error:` line, not a Rust `Debug` value, and say which
/// argument is the model folder.
#[test]
fn examples_print_errors_as_one_line() -> Result {
    // Built by `cargo test` beside the test binaries (target/debug/examples).
    let examples = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("examples"))
        .ok_or("no examples folder")?;
    for name in ["generate", "attention", "head_scores"] {
        let exe = examples.join(name);
        if !exe.is_file() {
            common::skip(
                "examples_print_errors_as_one_line",
                &format!(
                    "{} is not built (run the whole `cargo test`)",
                    exe.display()
                ),
            );
            return Ok(());
        }
        let out = std::process::Command::new(&exe)
            .arg("/no/such/model-folder")
            .output()?;
        let err = common::stderr(&out);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        assert!(
            !err.contains("Input(") && !err.contains("Io {"),
            "{name}: {err}"
        );
        assert!(err.contains("/no/such/model-folder"), "{name}: {err}");
        assert!(!err.contains("--model-dir"), "{name}: {err}");
    }
    Ok(())
}

/// The quick start without network and with nothing cached: the first 100 characters say what
/// to do (a local folder, or random weights with no download), the transport's words come
/// last, and HF_HUB_OFFLINE, which cannot help with an empty cache, is not suggested. With the
/// config cached it may help, and is.
#[test]
fn an_unreachable_hub_says_what_to_do_first() -> Result {
    let home = common::scratch("cli", "unreachable-hub");
    let run = |args: &[&str]| -> Result<String> {
        let out = common::gpt2_command(args)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", "http://127.0.0.1:1") // a closed port
            .stdin(std::process::Stdio::null())
            .output()?;
        assert_eq!(out.status.code(), Some(1), "{}", common::stderr(&out));
        assert_one_line_error(&out, "127.0.0.1:1");
        Ok(common::stderr(&out))
    };
    for args in [
        &["generate", "--prompt", "The cat sat on the"][..],
        &["info"],
    ] {
        let err = run(args)?;
        let head: String = err.chars().take(100).collect();
        assert!(head.starts_with("error: "), "{err}");
        assert!(head.contains("--model-dir DIR"), "{args:?}: {head}");
        let random = err.find("--config configs/gpt2.json").ok_or(err.clone())?;
        let transport = err.find("127.0.0.1:1").ok_or(err.clone())?;
        assert!(random < transport, "{err}");
        assert!(!err.contains("HF_HUB_OFFLINE"), "{err}");
    }
    // A cached config (and nothing else): the cache may hold what is needed.
    let snapshot = home.join("hub/models--openai-community--gpt2/snapshots/0123abc");
    std::fs::create_dir_all(&snapshot)?;
    std::fs::copy(
        fixture("tiny").join("config.json"),
        snapshot.join("config.json"),
    )?;
    let refs = home.join("hub/models--openai-community--gpt2/refs");
    std::fs::create_dir_all(&refs)?;
    std::fs::write(refs.join("main"), "0123abc")?;
    let err = run(&["generate", "--prompt", "The cat sat on the"])?;
    assert!(err.contains("HF_HUB_OFFLINE=1"), "{err}");
    Ok(())
}

/// One convention for output formats: `--format` on every command, each value explained in
/// `--help`; `--json` still works where it did (old scripts). logit-lens' rows are `--top`
/// (`--top-k` samples in generate), its old spelling a deprecated alias that still works.
#[test]
fn every_command_takes_format_and_old_spellings_still_work() -> Result {
    let tiny = fixture("tiny");
    let d = tiny.to_str().ok_or("path")?;
    let stdout = |args: &[&str]| -> Result<(String, String)> {
        let out = gpt2_with_stdin(args, "some text to score")?;
        let err = common::stderr(&out);
        assert!(out.status.success(), "{args:?}: {err}");
        Ok((String::from_utf8(out.stdout)?, err))
    };
    let commands: &[&[&str]] = &[
        &[
            "generate",
            "--model-dir",
            d,
            "--prompt",
            "a",
            "-n",
            "3",
            "--seed",
            "1",
        ],
        &["logit-lens", "--model-dir", d, "--prompt", "the cat"],
        &["perplexity", "--model-dir", d, "--file", "-"],
        &["info", "--model-dir", d],
        &[
            "inspect-heads",
            "--model-dir",
            d,
            "--prompt",
            "the cat",
            "--layer",
            "0",
        ],
        &["heads-effect", "--model-dir", d, "--prompt", "the cat sat"],
        &[
            "attribute",
            "--model-dir",
            d,
            "--prompt",
            "the cat",
            "--target-id",
            "3",
        ],
    ];
    // Fields that differ from run to run.
    let stable = |mut v: Value| {
        for key in ["timings", "seconds", "load_ms"] {
            v.as_object_mut().map(|o| o.remove(key));
        }
        v
    };
    for args in commands {
        let (json, _) = stdout(&[&args[..], &["--format", "json"]].concat())?;
        let v: Value = serde_json::from_str(json.lines().next().ok_or("no line")?)?;
        let (text, _) = stdout(&[&args[..], &["--format", "text"]].concat())?;
        assert!(
            serde_json::from_str::<Value>(&text).is_err(),
            "{args:?}: {text}"
        );
        if !["inspect-heads", "heads-effect", "attribute"].contains(&args[0]) {
            let (old, _) = stdout(&[&args[..], &["--json"]].concat())?;
            let o: Value = serde_json::from_str(old.lines().next().ok_or("no line")?)?;
            assert_eq!(stable(o), stable(v.clone()), "{args:?}");
        }
        // --help explains each value.
        let (help, _) = stdout(&[args[0], "--help"])?;
        let values = help.split("--format").nth(1).ok_or("no --format")?;
        for value in ["text:", "json:"] {
            assert!(values.contains(value), "{}: {value} not in {help}", args[0]);
        }
    }
    let bench = [
        "bench",
        "--model-dir",
        d,
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "2",
    ];
    let (json, _) = stdout(&[&bench[..], &["--runs", "1", "--format", "json"]].concat())?;
    assert_eq!(serde_json::from_str::<Value>(&json)?["prompt_tokens"], 4);
    // logit-lens: --top, and --top-k as before with a warning.
    let lens = [
        "logit-lens",
        "--model-dir",
        d,
        "--prompt",
        "the cat",
        "--format",
        "json",
    ];
    let (top, err) = stdout(&[&lens[..], &["--top", "2"]].concat())?;
    assert!(!err.contains("warning"), "{err}");
    let (top_k, err) = stdout(&[&lens[..], &["--top-k", "2"]].concat())?;
    assert!(
        err.contains("warning: --top-k") && err.contains("--top"),
        "{err}"
    );
    assert_eq!(top, top_k);
    // `--top 2` is taken: every row of every position lists exactly 2 tokens (the default is 5).
    let v: Value = serde_json::from_str(&top)?;
    let rows = v["top"].as_array().ok_or("top")?;
    assert!(!rows.is_empty(), "{v}");
    for row in rows {
        for position in row.as_array().ok_or("row")? {
            let entries = position.as_array().ok_or("position")?;
            assert_eq!(entries.len(), 2, "{v}");
            assert!(entries.iter().all(|e| e["prob"].is_f64()), "{v}");
        }
    }
    Ok(())
}
