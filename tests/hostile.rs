//! Hostile input against the real `gpt2` binary: closed pipes, full disks, huge numbers, broken
//! checkpoints, secrets, interrupts. Whatever happens, the process says one `error:` line (or
//! nothing), exits 0, 1, 2 or 130, never panics or aborts, and never leaves a broken file.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpt2::{random_checkpoint, Config, DType, Tensor};
use serde_json::Value;

mod common;
use common::{assert_error, entries, fixture, generate_json, gpt2, stderr, Result, BIN};

fn layout(name: &str) -> String {
    format!("{}/configs/{name}.json", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `gpt2 args` under bash with a file-size limit of `blocks` 512-byte blocks, as a full disk
/// would stop it: writes past the limit fail with EFBIG (the signal that would kill it is ignored).
fn gpt2_with_disk_limit(blocks: usize, args: &[&str]) -> Result<Output> {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!(
        "trap '' XFSZ; ulimit -f {blocks}; exec '{BIN}' {}",
        quoted.join(" ")
    );
    Ok(Command::new("bash")
        .args(["-c", &script])
        .env("HF_HUB_OFFLINE", "1")
        .output()?)
}

fn tiny() -> String {
    fixture("tiny").display().to_string()
}

// -------------------------------------------------------------------------------------------
// Outputs: a full disk, a closed pipe

#[test]
fn png_on_a_full_disk_is_an_error_and_leaves_nothing() -> Result {
    // /dev/full: every write fails with ENOSPC. The PNG writer used to swallow it and say
    // "written" with rc 0.
    let out = gpt2(&[
        "inspect-heads",
        "--model-dir",
        &tiny(),
        "--layer",
        "1",
        "--format",
        "png",
        "--out",
        "/dev/full",
        "--prompt",
        "The cat sat on the mat",
    ])?;
    assert_error(&out, 1, &["/dev/full"]);
    // A regular file on a disk that fills up: no PNG (not even a truncated one), no temporary.
    let dir = common::scratch("hostile", "png-full");
    let path = dir.join("heads.png");
    let out = gpt2_with_disk_limit(
        8,
        &[
            "inspect-heads",
            "--model-dir",
            &tiny(),
            "--format",
            "png",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            "The cat sat on the mat",
        ],
    )?;
    assert_error(&out, 1, &["heads.png"]);
    assert_eq!(entries(&dir), Vec::<String>::new());
    Ok(())
}

#[test]
fn every_format_on_a_full_disk_leaves_no_file() -> Result {
    for format in ["json", "html", "npy", "safetensors"] {
        let dir = common::scratch("hostile", &format!("full-{format}"));
        let path = dir.join(format!("attn.{format}"));
        let out = gpt2_with_disk_limit(
            2,
            &[
                "inspect-heads",
                "--model-dir",
                &tiny(),
                "--format",
                format,
                "--out",
                path.to_str().ok_or("p")?,
                "--prompt",
                &"The cat sat on the mat. ".repeat(4),
            ],
        )?;
        assert_error(&out, 1, &[&format!("attn.{format}")]);
        assert_eq!(entries(&dir), Vec::<String>::new(), "{format}");
    }
    Ok(())
}

/// `gpt2 train` on a tiny copy task into `out`: `steps` steps, saved at the end only.
fn train_copy_args(out: &Path, steps: &str) -> Vec<String> {
    [
        "train",
        "--config",
        &layout("tiny"),
        "--task",
        "copy",
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--save-every",
        "0",
        "--out",
        out.to_str().unwrap_or_default(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A checkpoint that cannot be written (the disk fills while a resumed run saves step 4) is one
/// `error:` line naming the file; the step-2 checkpoint it would have replaced is untouched, no
/// temporary is left, and it still resumes to the run that was never stopped, byte for byte.
/// (`ulimit -f` makes the write fail with EFBIG where a full disk says ENOSPC: the same failed
/// `write`, without a filesystem to fill.)
#[test]
fn a_save_on_a_full_disk_is_an_error_and_keeps_the_previous_checkpoint() -> Result {
    let run_with = |args: &[String]| gpt2(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = common::scratch("hostile", "train-full");
    let out = dir.join("run");
    let first = run_with(&train_copy_args(&out, "2"))?;
    assert!(first.status.success(), "{}", stderr(&first));
    let kept = [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.json",
        "training.json",
    ];
    let read_kept = || -> Result<Vec<Vec<u8>>> {
        kept.iter()
            .map(|f| Ok(std::fs::read(out.join(f))?))
            .collect()
    };
    let before = read_kept()?;
    let names = entries(&out);
    // 64 blocks (32 KiB): room for the logs, not for the weights (554 KiB).
    let o = out.to_str().ok_or("path")?;
    let full = gpt2_with_disk_limit(64, &["train", "--resume", "--out", o, "--steps", "4"])?;
    let err = stderr(&full);
    assert_eq!(full.status.code(), Some(1), "{err}");
    // After the run's header and evaluation lines, one error line, naming the file.
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains("model.safetensors"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(read_kept()? == before, "the step-2 checkpoint changed");
    assert_eq!(entries(&out), names, "a temporary was left");
    // It resumes (the failed run's logs of steps 3 and 4 dropped) and ends where a run that
    // was never stopped ends.
    let resumed = gpt2(&["train", "--resume", "--out", o, "--steps", "4"])?;
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let whole = dir.join("whole");
    let straight = run_with(&train_copy_args(&whole, "4"))?;
    assert!(straight.status.success(), "{}", stderr(&straight));
    for f in ["model.safetensors", "optimizer.safetensors", "steps.jsonl"] {
        assert!(
            std::fs::read(out.join(f))? == std::fs::read(whole.join(f))?,
            "{f}: the resumed run differs"
        );
    }
    Ok(())
}

#[test]
fn npy_into_a_folder_is_refused_and_leaves_no_sidecar() -> Result {
    let dir = common::scratch("hostile", "npy-folder");
    let target = dir.join("out");
    std::fs::create_dir_all(&target)?;
    let out = gpt2(&[
        "inspect-heads",
        "--model-dir",
        &tiny(),
        "--format",
        "npy",
        "--out",
        target.to_str().ok_or("p")?,
        "--prompt",
        "x y",
    ])?;
    assert_error(&out, 2, &["is a folder"]);
    assert_eq!(entries(&dir), ["out"]);
    Ok(())
}

#[test]
fn out_cannot_be_the_models_own_file() -> Result {
    let dir = common::scratch("hostile", "own-file");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny").join(f), dir.join(f))?;
    }
    let weights = dir.join("model.safetensors");
    let before = std::fs::read(&weights)?;
    let out = gpt2(&[
        "inspect-heads",
        "--model-dir",
        dir.to_str().ok_or("p")?,
        "--format",
        "safetensors",
        "--out",
        weights.to_str().ok_or("p")?,
        "--prompt",
        "x y",
    ])?;
    assert_error(&out, 2, &["one of the model's own files"]);
    assert_eq!(std::fs::read(&weights)?, before);
    Ok(())
}

/// Runs `args` with stdout a pipe whose reader is already gone.
fn with_closed_stdout(args: &[&str]) -> Result<Output> {
    let mut child = Command::new(BIN)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let status = child.wait()?;
    Ok(Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    })
}

#[test]
fn a_closed_stdout_ends_quietly() -> Result {
    let gpt2_layout = layout("gpt2");
    let tiny_layout = layout("tiny");
    let cases: [&[&str]; 4] = [
        &["info", "--config", &gpt2_layout],
        &["info", "--config", &gpt2_layout, "--json"],
        &[
            "bench",
            "--config",
            &tiny_layout,
            "--prompt-tokens",
            "4",
            "--new-tokens",
            "2",
            "--runs",
            "1",
        ],
        &[
            "generate",
            "--model-dir",
            &tiny(),
            "--prompt",
            "Hello",
            "-n",
            "50",
            "--ignore-eos",
        ],
    ];
    for args in cases {
        for _ in 0..3 {
            let out = with_closed_stdout(args)?;
            let err = stderr(&out);
            assert!(
                !err.contains("panicked") && !err.contains("error"),
                "{args:?}: {err}"
            );
            assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        }
    }
    Ok(())
}

#[test]
fn a_full_stdout_is_an_error() -> Result {
    let file = std::fs::OpenOptions::new().write(true).open("/dev/full")?;
    let out = Command::new(BIN)
        .args(["info", "--config", &layout("gpt2")])
        .stdout(file)
        .output()?;
    assert_error(&out, 1, &["No space left on device"]);
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Numbers

#[test]
fn huge_token_counts_are_errors_not_panics() -> Result {
    let out = gpt2(&[
        "bench",
        "--config",
        &layout("tiny"),
        "--prompt-tokens",
        "18446744073709551614",
        "--new-tokens",
        "4",
    ])?;
    assert_error(&out, 2, &["--prompt-tokens"]);
    let out = gpt2(&[
        "info",
        "--config",
        &layout("gpt2"),
        "--context",
        "18446744073709551615",
    ])?;
    assert_error(
        &out,
        2,
        &["--context 18446744073709551615 is beyond the model's 1024 positions"],
    );
    let out = gpt2(&[
        "generate",
        "--model-dir",
        &tiny(),
        "--prompt",
        "x",
        "-n",
        "-1",
    ])?;
    assert_error(&out, 2, &["invalid value '-1'"]);
    Ok(())
}

#[test]
fn too_many_samples_are_refused_with_the_bytes_they_need() -> Result {
    let out = gpt2(&[
        "generate",
        "--model-dir",
        &tiny(),
        "--prompt",
        "x",
        "--num-samples",
        "100000000",
    ])?;
    assert_error(&out, 2, &["--num-samples 100000000 needs "]);
    assert!(stderr(&out).contains(" bytes ("), "{}", stderr(&out));
    let out = gpt2(&[
        "generate",
        "--config",
        &layout("gpt2"),
        "--prompt",
        "x",
        "--num-samples",
        "100000",
    ])?;
    assert_error(&out, 2, &["--num-samples 100000 needs "]);
    Ok(())
}

#[test]
fn a_layout_too_big_for_memory_is_refused_before_allocating() -> Result {
    let dir = common::scratch("hostile", "huge-layout");
    let path = dir.join("huge.json");
    std::fs::write(
        &path,
        r#"{"_comment": "far too big", "n_embd": 1048576, "n_head": 16, "n_layer": 64}"#,
    )?;
    let out = gpt2(&[
        "generate",
        "--config",
        path.to_str().ok_or("p")?,
        "--prompt",
        "x",
        "-n",
        "1",
    ])?;
    assert_error(&out, 1, &["--config"]);
    let err = stderr(&out);
    assert!(
        err.contains("the weights (f32) needs ") && err.contains("bytes"),
        "{err}"
    );
    Ok(())
}

#[test]
fn tiny_temperatures_are_greedy_and_tiny_penalties_are_not_an_error() -> Result {
    let prompt = ["--prompt", "The cat sat on the", "-n", "12", "--ignore-eos"];
    let greedy = generate_json(
        &fixture("tiny"),
        &[&prompt[..], &["--temperature", "0"]].concat(),
    )?;
    for extra in [
        &["--temperature", "1e-40"][..],
        &["--temperature", "1e-40", "--top-k", "1"],
        &["--temperature", "1e-30", "--top-p", "0.5"],
    ] {
        let got = generate_json(&fixture("tiny"), &[&prompt[..], extra].concat())?;
        assert_eq!(
            got[0]["completion_token_ids"], greedy[0]["completion_token_ids"],
            "{extra:?}"
        );
    }
    for penalty in ["1e-45", "1e30"] {
        let got = generate_json(
            &fixture("tiny"),
            &[&prompt[..], &["--repeat-penalty", penalty, "--seed", "1"]].concat(),
        )?;
        assert_eq!(
            got[0]["completion_token_ids"].as_array().map(Vec::len),
            Some(12)
        );
    }
    Ok(())
}

#[test]
fn stats_count_what_was_generated() -> Result {
    // -n 1: the only token comes from the prefill; there is no decode rate to report.
    let one = generate_json(&fixture("tiny"), &["--prompt", "Hello", "-n", "1"])?;
    assert!(
        one[0]["timings"]["decode_tokens_per_s"].is_null(),
        "{}",
        one[0]
    );
    // Past the 128 positions the window slides: re-run tokens are not "decoded" tokens.
    let long = generate_json(
        &fixture("tiny"),
        &[
            "--prompt",
            "Hello",
            "-n",
            "200",
            "--ignore-eos",
            "--temperature",
            "0",
        ],
    )?;
    let t = &long[0]["timings"];
    assert_eq!(t["generated_tokens"], 200, "{t}");
    assert_eq!(t["decode_tokens"], 199, "{t}");
    assert!(
        t["reprefill_tokens"].as_u64().is_some_and(|n| n >= 63),
        "{t}"
    );
    let rate = t["decode_tokens_per_s"].as_f64().ok_or("rate")?;
    let ms = t["decode_ms"].as_f64().ok_or("ms")?;
    assert!((rate - 199.0 / (ms / 1e3)).abs() < 1e-6 * rate, "{t}");
    Ok(())
}

#[test]
fn stop_strings_understand_escapes() -> Result {
    let base = [
        "--prompt",
        "Hello",
        "-n",
        "30",
        "--temperature",
        "0",
        "--ignore-eos",
    ];
    let full = generate_json(&fixture("tiny"), &base)?;
    let text = full[0]["completion"].as_str().ok_or("completion")?;
    // A character from the middle of the text, spelled as an escape.
    let c = text.chars().nth(6).ok_or("short")?;
    let stop = format!("\\u{{{:x}}}", c as u32);
    let got = generate_json(&fixture("tiny"), &[&base[..], &["--stop", &stop]].concat())?;
    assert_eq!(got[0]["finish_reason"], "stop", "{stop}: {}", got[0]);
    let cut: String = text.chars().take_while(|&x| x != c).collect();
    assert_eq!(got[0]["completion"], cut);
    // --no-escape takes it literally: that text never comes.
    let got = generate_json(
        &fixture("tiny"),
        &[&base[..], &["--stop", &stop, "--no-escape"]].concat(),
    )?;
    assert_eq!(got[0]["finish_reason"], "length");
    Ok(())
}

/// A layout (random weights, GPT-2's byte tokens) of 64 one-dimensional heads over `positions`
/// positions: tiny weights, but attention arrays of 64 × positions² floats.
fn wide_layout(dir: &Path, positions: usize) -> Result<String> {
    let path = dir.join("wide.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"_comment": "wide", "n_positions": {positions}, "n_embd": 64, "n_head": 64,
                "n_layer": 1, "vocab_size": 512, "bos_token_id": 511, "eos_token_id": 511}}"#
        ),
    )?;
    Ok(path.to_str().ok_or("p")?.to_string())
}

#[test]
fn lengths_never_wrap_past_the_context_check() -> Result {
    // prompt + -n wrapped to a small number and passed: the recording grew without limit.
    let dir = common::scratch("hostile", "wrap");
    let rec = dir.join("rec.npy");
    let out = gpt2(&[
        "generate",
        "--model-dir",
        &tiny(),
        "--prompt",
        "x",
        "-n",
        "18446744073709551615",
        "--ignore-eos",
        "--attention-out",
        rec.to_str().ok_or("p")?,
    ])?;
    assert_error(
        &out,
        2,
        &["--attention-out needs the whole run inside the context"],
    );
    assert!(
        stderr(&out).contains("1 prompt tokens + 18446744073709551615 new tokens > 128 positions"),
        "{}",
        stderr(&out)
    );
    assert_eq!(entries(&dir), Vec::<String>::new());
    Ok(())
}

#[test]
fn attention_too_big_for_memory_is_refused_before_allocating() -> Result {
    let dir = common::scratch("hostile", "wide-attention");
    // 500 000 tokens: 64 heads × 500 000² floats is 64 TB; the causal mask alone is 1 TB.
    let layout = wide_layout(&dir, 500_000)?;
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, "a".repeat(500_000))?;
    let p = prompt.to_str().ok_or("p")?;
    let out = gpt2(&[
        "inspect-heads",
        "--config",
        &layout,
        "--prompt-file",
        p,
        "--layer",
        "0",
        "--head",
        "3",
    ])?;
    assert_error(
        &out,
        1,
        &["the attention of 64 heads over 500000 × 500000 positions needs "],
    );
    assert!(
        stderr(&out).contains("use a shorter prompt"),
        "{}",
        stderr(&out)
    );
    // Recording generate's attention: 64 heads × the ~500 000² / 2 keys of its rows.
    let rec = dir.join("rec.npy");
    let out = gpt2(&[
        "generate",
        "--config",
        &layout,
        "--prompt",
        "a",
        "-n",
        "499999",
        "--attention-out",
        rec.to_str().ok_or("p")?,
    ])?;
    assert_error(
        &out,
        2,
        &["--attention-out recording 1 layer of 64 heads over "],
    );
    assert!(stderr(&out).contains(" bytes ("), "{}", stderr(&out));
    assert_eq!(entries(&dir), ["prompt.txt", "wide.json"]);
    Ok(())
}

/// A prompt file (or prompts file, or perplexity text) bigger than the memory left is refused
/// with its size before it is read: reading it whole aborted ("memory allocation of ...
/// failed"). An 8 GiB sparse file under a 600 MB address space.
#[test]
fn a_prompt_file_bigger_than_memory_is_refused_before_reading() -> Result {
    let dir = common::scratch("hostile", "huge-prompt-file");
    let file = dir.join("prompt.txt");
    std::fs::File::create(&file)?.set_len(8 << 30)?;
    let f = file.to_str().ok_or("p")?;
    let t = tiny();
    for args in [
        &["generate", "--model-dir", &t, "--prompt-file", f][..],
        &["perplexity", "--model-dir", &t, "--file", f],
        &[
            "inspect-heads",
            "--model-dir",
            &t,
            "--scores",
            "--prompts",
            f,
        ],
    ] {
        let out = common::gpt2_with_memory_limit(600_000, args)?;
        assert_error(
            &out,
            1,
            &[
                "reading ",
                "prompt.txt needs ",
                "split it into smaller files",
            ],
        );
    }
    Ok(())
}

#[test]
fn a_prompt_too_big_to_tokenise_is_refused_with_its_size() -> Result {
    // Tokenising takes ~200 bytes of memory per byte of text: 4 MiB of prompt under a 600 MB
    // address space aborted with "memory allocation of ... failed".
    let dir = common::scratch("hostile", "huge-prompt");
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, "ab ".repeat((4 << 20) / 3))?;
    let p = prompt.to_str().ok_or("p")?;
    let out = common::gpt2_with_memory_limit(
        600_000,
        &[
            "generate",
            "--model-dir",
            &tiny(),
            "--prompt-file",
            p,
            "--truncate-prompt",
            "-n",
            "1",
        ],
    )?;
    assert_error(&out, 1, &["tokenizer: a text of "]);
    assert!(
        stderr(&out).contains("to tokenise, more than the "),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(": split it into pieces under "),
        "{}",
        stderr(&out)
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Tokenizers that cannot tokenise

/// The tiny fixture with its `tokenizer.json` changed by `edit`.
fn with_tokenizer(name: &str, edit: impl FnOnce(&mut Value)) -> Result<PathBuf> {
    let dir = common::scratch("hostile", name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny").join(f), dir.join(f))?;
    }
    let mut t = common::fixture_json("tiny", "tokenizer.json")?;
    edit(&mut t);
    std::fs::write(dir.join("tokenizer.json"), t.to_string())?;
    Ok(dir)
}

#[test]
fn a_hostile_tokenizer_is_a_clear_error() -> Result {
    let generate = |dir: &Path, prompt: &str| {
        gpt2(&[
            "generate",
            "--model-dir",
            dir.to_str().unwrap_or(""),
            "--prompt",
            prompt,
            "-n",
            "2",
            "--truncate-prompt",
        ])
    };
    // Every prompt became id 0 and the completion nothing.
    let dir = with_tokenizer("tok-empty", |t| {
        t["model"]["vocab"] = serde_json::json!({});
        t["model"]["merges"] = serde_json::json!([]);
        t["added_tokens"] = serde_json::json!([]);
    })?;
    assert_error(
        &generate(&dir, "hello")?,
        1,
        &["tokenizer.json: the vocabulary is empty"],
    );
    // Only <|endoftext|>: text encodes to nothing.
    let dir = with_tokenizer("tok-nothing", |t| {
        t["model"]["vocab"] = serde_json::json!({"<|endoftext|>": 0});
        t["model"]["merges"] = serde_json::json!([]);
        t["added_tokens"][0]["id"] = 0.into();
    })?;
    assert_error(
        &generate(&dir, "hello")?,
        1,
        &["tokenizer.json: encodes text to no tokens"],
    );
    // An id past the embedding's 512 rows.
    let dir = with_tokenizer("tok-big-id", |t| {
        let mut big = t["added_tokens"][0].clone();
        big["id"] = 100_000.into();
        big["content"] = "<|big|>".into();
        if let Some(added) = t["added_tokens"].as_array_mut() {
            added.push(big);
        }
    })?;
    let out = generate(&dir, "hello")?;
    // (The crate numbers a new added token after the vocabulary, whatever its id.)
    assert_error(
        &out,
        1,
        &["tokenizer.json: token `<|big|>` has id 512, outside"],
    );
    assert!(stderr(&out).contains("vocab_size 512"), "{}", stderr(&out));
    // A Replace normalizer with an empty pattern: the tokenizers crate indexed past the text
    // (past "a", not past " a"): refused at load, whatever the prompt.
    let dir = with_tokenizer("tok-replace", |t| {
        t["normalizer"] =
            serde_json::json!({"type": "Replace", "pattern": {"String": ""}, "content": "x"});
    })?;
    let out = generate(&dir, " hello")?;
    assert_error(&out, 1, &["tokenizer.json: cannot encode text: "]);
    assert!(stderr(&out).contains("--model-dir"), "{}", stderr(&out));
    // A Split regex that backtracks exponentially on runs of `a`: Oniguruma gives up a match
    // (the crate panicked), or, at every position just under that limit, the search.
    let dir = with_tokenizer("tok-regex", |t| {
        let byte_level = t["pre_tokenizer"].clone();
        t["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]});
    })?;
    // Short runs encode.
    let out = generate(&dir, "a cat and a bat")?;
    assert!(out.status.success(), "{}", stderr(&out));
    let long_run = format!("{}!", "a".repeat(100));
    let out = generate(&dir, &long_run)?;
    assert_error(&out, 1, &["tokenizer.json: cannot encode text: "]);
    assert!(stderr(&out).contains("backtrack"), "{}", stderr(&out));
    let many_runs = format!("{}!", "a".repeat(30)).repeat(100);
    let out = generate(&dir, &many_runs)?;
    assert_error(&out, 1, &["tokenizer.json: cannot encode text: "]);
    assert!(stderr(&out).contains("backtrack"), "{}", stderr(&out));
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Checkpoints that are not weights

fn folder_with(name: &str, config: &Config, tensors: &HashMap<String, Tensor>) -> Result<PathBuf> {
    let dir = common::scratch("hostile", name);
    std::fs::write(dir.join("config.json"), serde_json::to_string(config)?)?;
    std::fs::copy(
        fixture("tiny").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(dir)
}

fn small_config() -> Config {
    Config {
        vocab_size: 512,
        n_positions: 16,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        bos_token_id: 511,
        eos_token_id: 511,
        ..Config::default()
    }
}

#[test]
fn nan_weights_and_integer_tensors_are_refused_at_load() -> Result {
    let config = small_config();
    let good = random_checkpoint(&config, 1)?;
    let run = |dir: &Path| {
        gpt2(&[
            "generate",
            "--model-dir",
            dir.to_str().unwrap_or(""),
            "--prompt",
            "a",
            "-n",
            "3",
            "--temperature",
            "0",
        ])
    };

    let mut nan = good.clone();
    let w = &nan["h.0.mlp.c_fc.weight"];
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    v[17] = f32::NAN;
    nan.insert(
        "h.0.mlp.c_fc.weight".into(),
        Tensor::from_vec(v, w.dims(), w.device())?,
    );
    assert_error(
        &run(&folder_with("nan", &config, &nan)?)?,
        1,
        &["h.0.mlp.c_fc.weight"],
    );

    let mut inf = good.clone();
    inf.insert(
        "ln_f.bias".into(),
        (inf["ln_f.bias"].clone() + f64::INFINITY)?,
    );
    assert_error(
        &run(&folder_with("inf", &config, &inf)?)?,
        1,
        &["ln_f.bias"],
    );

    for dtype in [DType::I64, DType::U8] {
        let mut ints = good.clone();
        let t = ints["wpe.weight"].to_dtype(dtype)?;
        ints.insert("wpe.weight".into(), t);
        let out = run(&folder_with(&format!("{dtype:?}"), &config, &ints)?)?;
        assert_error(&out, 1, &["wpe.weight"]);
        assert!(stderr(&out).contains("floating point"), "{}", stderr(&out));
    }
    // A float checkpoint in f64 is cast, as transformers casts to torch_dtype.
    let f64s: HashMap<String, Tensor> = good
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F64)?)))
        .collect::<std::result::Result<_, candle_core::Error>>()?;
    let out = run(&folder_with("f64", &config, &f64s)?)?;
    let want = run(&folder_with("f32", &config, &good)?)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, want.stdout);
    Ok(())
}

#[test]
fn weights_finite_in_f32_but_not_in_their_dtype_are_refused_at_load() -> Result {
    // 1e30 is a finite f32, inf in f16, and under q8_0 its block's f16 scale (1e30 / 127) is inf:
    // `--dtype f16` / `--quantize q8_0` printed `perplexity NaN` (JSON null).
    let config = Config {
        n_embd: 32,
        ..small_config()
    };
    let mut big = random_checkpoint(&config, 1)?;
    let w = &big["h.0.mlp.c_fc.weight"];
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    v[5] = 1e30;
    big.insert(
        "h.0.mlp.c_fc.weight".into(),
        Tensor::from_vec(v, w.dims(), w.device())?,
    );
    let dir = folder_with("finite-in-f32", &config, &big)?;
    let text = dir.join("text.txt");
    std::fs::write(&text, "The cat sat on the mat.")?;
    let (d, t) = (dir.to_str().ok_or("p")?, text.to_str().ok_or("p")?);
    let out = gpt2(&["perplexity", "--model-dir", d, "--file", t, "--json"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    for (flag, value, want) in [
        (
            "--dtype",
            "f16",
            "holds 1e30 at flat index 5, which is inf in F16",
        ),
        ("--dtype", "bf16", ""),
        (
            "--quantize",
            "q8_0",
            "holds 1e30 at flat index 5, which quantized to q8_0 gives NaN",
        ),
        ("--quantize", "q4_0", "which quantized to q4_0 gives NaN"),
    ] {
        let out = gpt2(&[
            "perplexity",
            "--model-dir",
            d,
            "--file",
            t,
            "--json",
            flag,
            value,
        ])?;
        if want.is_empty() {
            // bf16 has f32's range: 1e30 stays finite.
            assert!(out.status.success(), "{}", stderr(&out));
            continue;
        }
        assert_error(&out, 1, &[want]);
        assert!(
            stderr(&out).contains("h.0.mlp.c_fc.weight"),
            "{}",
            stderr(&out)
        );
    }
    Ok(())
}

#[test]
fn misleading_messages_say_what_is_wrong() -> Result {
    let dir = common::scratch("hostile", "messages");
    // A model "folder" that is a file.
    let file = dir.join("a-file");
    std::fs::write(&file, "x")?;
    let f = file.to_str().ok_or("p")?;
    assert_error(
        &gpt2(&["generate", "--model-dir", f, "--prompt", "x"])?,
        1,
        &["is a file, not a folder"],
    );
    // A dangling model.safetensors link.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken)?;
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture("tiny").join(name), broken.join(name))?;
    }
    std::os::unix::fs::symlink(
        broken.join("gone.safetensors"),
        broken.join("model.safetensors"),
    )?;
    let b = broken.to_str().ok_or("p")?;
    assert_error(
        &gpt2(&["generate", "--model-dir", b, "--prompt", "x"])?,
        1,
        &["broken symlink"],
    );
    // Weights that cannot be read are a read error, not "not a valid safetensors file"; and the
    // OS's words appear once.
    std::fs::remove_file(broken.join("model.safetensors"))?;
    std::fs::create_dir_all(broken.join("model.safetensors"))?;
    let index = broken.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"wte.weight": "model.safetensors"}}"#,
    )?;
    let out = gpt2(&["generate", "--model-dir", b, "--prompt", "x"])?;
    let err = stderr(&out);
    assert!(!err.contains("not a valid safetensors"), "{err}");
    assert!(err.matches("(os error").count() <= 1, "{err}");
    // A shard index that points outside the folder is refused without reading the file.
    std::fs::remove_dir_all(broken.join("model.safetensors"))?;
    std::fs::write(
        &index,
        r#"{"weight_map": {"wte.weight": "../../../../../../etc/passwd"}}"#,
    )?;
    let out = gpt2(&["generate", "--model-dir", b, "--prompt", "x"])?;
    assert_error(&out, 1, &["outside the model folder"]);
    // --model and --model-dir together.
    let out = gpt2(&[
        "generate",
        "--model",
        "gpt2-xl",
        "--model-dir",
        &tiny(),
        "--prompt",
        "x",
    ])?;
    assert_error(&out, 2, &["cannot be used with"]);
    Ok(())
}

#[test]
fn a_token_never_appears_in_any_output() -> Result {
    let secret = "hf_SecretTokenValue123";
    for token in [
        format!("{secret}\nrest"),
        format!("{secret} rest"),
        secret.to_string(),
    ] {
        let out = common::gpt2_command(&["generate", "--model", "org/private", "--prompt", "x"])
            .env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HOME", common::scratch("hostile", "token"))
            .env("HF_TOKEN", &token)
            .output()?;
        let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
        assert!(!all.contains("SecretTokenValue"), "{all}");
        assert_error(&out, 1, &["org/private"]);
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Threads, interrupts, the exit-code contract

#[test]
fn threads_follow_the_cpus_the_process_may_use() -> Result {
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            BIN,
            "bench",
            "--config",
            &layout("tiny"),
            "--prompt-tokens",
            "4",
            "--new-tokens",
            "2",
            "--runs",
            "1",
            "--json",
        ])
        .env_remove("RAYON_NUM_THREADS")
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["threads"], 1, "{v}");
    Ok(())
}

/// Starts `args`, waits until stdout has `bytes` bytes, sends SIGINT, and returns the output.
fn interrupt(args: &[&str], bytes: usize) -> Result<Output> {
    let mut child = Command::new(BIN)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The pipes are read on their own threads, so no read here can block past the deadlines.
    let mut stdout = child.stdout.take().ok_or("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().ok_or("stderr")?;
    let errs = std::thread::spawn(move || {
        let mut err = Vec::new();
        let _ = stderr.read_to_end(&mut err);
        err
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(part) => seen.extend_from_slice(&part),
            Err(_) => break, // ended, or no output for a minute: interrupt it anyway
        }
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status()?;
    let status = wait_or_kill(&mut child, &format!("{args:?} after one Ctrl-C"))?;
    let _ = reader.join();
    seen.extend(rx.try_iter().flatten());
    Ok(Output {
        status,
        stdout: seen,
        stderr: errs.join().map_err(|_| "stderr reader panicked")?,
    })
}

#[test]
fn ctrl_c_keeps_the_text_and_the_stats() -> Result {
    let args = [
        "generate",
        "--model-dir",
        &tiny(),
        "--prompt",
        "Hello",
        "-n",
        "100000000",
        "--ignore-eos",
    ];
    let out = interrupt(&args, 200)?;
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Hello"));
    let err = stderr(&out);
    assert!(
        err.contains("generated: ") && !err.contains("panicked"),
        "{err}"
    );
    // --json (two samples, so nothing streams): each object so far, marked interrupted.
    let mut child = Command::new(BIN)
        .args([
            "generate",
            "--model-dir",
            &tiny(),
            "--prompt",
            "Hello",
            "-n",
            "100000000",
            "--ignore-eos",
            "--json",
            "--num-samples",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Nothing streams to wait on: wait until it has spent a third of a CPU second (the tiny
    // model decodes thousands of tokens in that), which a loaded machine only delays.
    common::wait_for_cpu_time(child.id(), Duration::from_millis(330))?;
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    let mut text = String::new();
    child
        .stdout
        .take()
        .ok_or("stdout")?
        .read_to_string(&mut text)?;
    assert_eq!(child.wait()?.code(), Some(130));
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        assert_eq!(l["finish_reason"], "interrupted");
        assert!(l["completion_token_ids"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
    }
    Ok(())
}

#[test]
fn ctrl_c_during_an_export_leaves_no_file() -> Result {
    let dir = common::scratch("hostile", "interrupted-npy");
    let path = dir.join("attn.npy");
    // A long run: 16 layers of 8 heads over 400 tokens, written block by block.
    let layout_path = dir.join("deep.json");
    std::fs::write(
        &layout_path,
        r#"{"_comment": "slow to inspect", "n_embd": 256, "n_head": 8, "n_layer": 16, "n_positions": 512, "vocab_size": 512, "bos_token_id": 511, "eos_token_id": 511}"#,
    )?;
    let mut child = Command::new(BIN)
        .args([
            "inspect-heads",
            "--config",
            layout_path.to_str().ok_or("p")?,
            "--layer",
            "all",
            "--format",
            "npy",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            &"abcd".repeat(100),
        ])
        .stderr(Stdio::piped())
        .spawn()?;
    // Wait for the temporary file to appear, then interrupt.
    let start = Instant::now();
    while entries(&dir).len() < 2 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert_eq!(child.wait()?.code(), Some(130));
    assert_eq!(entries(&dir), ["deep.json"]);
    Ok(())
}

#[test]
fn exit_codes_are_a_contract() -> Result {
    let t = tiny();
    // 0: success.
    assert_eq!(
        gpt2(&["info", "--config", &layout("tiny")])?.status.code(),
        Some(0)
    );
    // 2: usage (clap's and ours).
    for args in [
        &["generate", "--no-such-flag"][..],
        &[
            "generate",
            "--model-dir",
            &t,
            "--prompt",
            "x",
            "--temperature",
            "-1",
        ],
        &[
            "inspect-heads",
            "--model-dir",
            &t,
            "--prompt",
            "x",
            "--layer",
            "9",
        ],
    ] {
        let out = gpt2(args)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error:"), "{}", stderr(&out));
    }
    // 1: runtime (a missing folder), one line even with RUST_BACKTRACE=1.
    assert_error(
        &gpt2(&["generate", "--model-dir", "/no/such/dir", "--prompt", "x"])?,
        1,
        &["/no/such/dir"],
    );
    Ok(())
}

/// The threads of the process `pid` include one named `name` (`/proc/PID/task/*/comm`).
fn has_thread(pid: u32, name: &str) -> bool {
    entries(Path::new(&format!("/proc/{pid}/task")))
        .iter()
        .any(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm"))
                .is_ok_and(|c| c.trim_end() == name)
        })
}

/// Waits for `child` to exit; a deadline that only catches a hang (then it is killed).
fn wait_or_kill(child: &mut std::process::Child, what: &str) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            return Err(format!("still running after 60 s: {what}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid`'s main thread sleeps in a pipe or FIFO read (`/proc/PID/wchan`:
/// `pipe_read`, `anon_pipe_read`, ...).
fn reading_a_pipe(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("pipe_read"))
}

/// Ctrl-C while the prompt is read from a pipe (or FIFO) whose writer stays open: no check
/// would ever come, so the first one exits 130 at once (it was ignored: the read went on).
#[test]
fn ctrl_c_while_reading_an_open_prompt_pipe_exits_130() -> Result {
    let dir = common::scratch("hostile", "open-fifo");
    let fifo = dir.join("prompt");
    assert!(Command::new("mkfifo").arg(&fifo).status()?.success());
    // A writer that stays open (read + write: opening does not wait for a reader).
    let _writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)?;
    let fifo = fifo.to_str().ok_or("path")?;
    let t = tiny();
    for source in [&["--prompt", "-"][..], &["--prompt-file", fifo]] {
        let mut args = vec!["generate", "--model-dir", &t];
        args.extend_from_slice(source);
        let mut child = common::gpt2_command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take(); // open until the end
                                        // The Ctrl-C must land while the read blocks (a Ctrl-C before it is the easy case): wait
                                        // for the handler's thread, then for the main thread to sleep in a pipe read.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !has_thread(child.id(), "ctrl-c") || !reading_a_pipe(child.id()) {
            assert!(
                Instant::now() < deadline,
                "{source:?}: never blocked reading the prompt with a Ctrl-C handler"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()?;
        let status = wait_or_kill(&mut child, &format!("{source:?} after one Ctrl-C"))?;
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        assert_eq!(status.code(), Some(130), "{source:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        drop(stdin);
    }
    Ok(())
}

/// The f32 weights are read in place from the mapped file: a file that shrinks under the
/// running process faults (SIGBUS) at the next read. One `error:` line says so and names
/// --no-mmap, exit 1 (it died without a word); with --no-mmap the run goes on.
#[cfg(target_os = "linux")]
#[test]
fn weights_shrinking_under_a_run_is_one_line_naming_no_mmap() -> Result {
    for no_mmap in [false, true] {
        let dir = common::scratch("hostile", &format!("shrinking-weights-{no_mmap}"));
        for entry in std::fs::read_dir(fixture("tiny"))? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
        let d = dir.to_str().ok_or("path")?;
        let mut args = vec!["generate", "--model-dir", d, "--prompt", "Hello"];
        args.extend_from_slice(&["-n", "100000000", "--ignore-eos"]);
        if no_mmap {
            args.push("--no-mmap");
        }
        let mut child = common::gpt2_command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Generating (text on stdout): the weights are in use. Then the file shrinks.
        let mut stdout = child.stdout.take().ok_or("stdout")?;
        let mut text = [0u8; 64];
        stdout.read_exact(&mut text)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("model.safetensors"))?
            .set_len(0)?;
        if no_mmap {
            // More text after the shrink (a page's worth), then a Ctrl-C ends it.
            let mut more = vec![0u8; 8192];
            stdout.read_exact(&mut more)?;
            Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()?;
        }
        let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let status = wait_or_kill(
            &mut child,
            &format!("a truncated file, --no-mmap {no_mmap}"),
        )?;
        let _ = drain.join();
        let mut err = Vec::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_end(&mut err)?;
        }
        let out = Output {
            status,
            stdout: Vec::new(),
            stderr: err,
        };
        if no_mmap {
            assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
            assert!(stderr(&out).contains("generated: "), "{}", stderr(&out));
        } else {
            assert_error(&out, 1, &["--no-mmap"]);
        }
    }
    Ok(())
}
