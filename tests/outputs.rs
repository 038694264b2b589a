//! Every file `gpt2` writes, against the real binary: an output never replaces an input (through
//! symlinks and hard links), a device or a pipe is written as a stream, an npy array and its
//! tokens file are one unit, every destination is checked before the work with the flag the user
//! typed, and new files get the modes `File::create` would give them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;

use common::{assert_error, entries, fixture, gpt2_command, stderr, Result};

/// A fresh, empty scratch folder.
fn scratch(name: &str) -> PathBuf {
    common::scratch("outputs", name)
}

/// A copy of the tiny fixture in a scratch folder, free to be damaged.
fn model_copy(name: &str) -> Result<PathBuf> {
    let d = scratch(name).join("model");
    std::fs::create_dir_all(&d)?;
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny").join(f), d.join(f))?;
    }
    Ok(d)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn gpt2_with(args: &[&str], stdout: Stdio) -> Result<Output> {
    Ok(gpt2_command(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()?
        .wait_with_output()?)
}

fn gpt2(args: &[&str]) -> Result<Output> {
    gpt2_with(args, Stdio::piped())
}

/// Runs `gpt2 args` under bash with `umask`.
fn gpt2_umask(umask: &str, args: &[&str]) -> Result<Output> {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!("umask {umask}; exec '{}' {}", common::BIN, quoted.join(" "));
    Ok(Command::new("bash")
        .args(["-c", &script])
        .env("HF_HUB_OFFLINE", "1")
        .output()?)
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

/// CRC-32 (IEEE), as Python's `zlib.crc32` computes it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The tokens file of `npy` matches it: the array's name, shape, size and CRC-32.
fn assert_pair(npy: &Path) -> Result<Value> {
    let bytes = std::fs::read(npy)?;
    let side_path = PathBuf::from(format!("{}.json", npy.display()));
    let side: Value = serde_json::from_str(&std::fs::read_to_string(&side_path)?)?;
    let name = npy.file_name().and_then(|n| n.to_str()).ok_or("name")?;
    assert_eq!(side["array"], name);
    let shape: Vec<usize> = side["shape"]
        .as_array()
        .ok_or("shape")?
        .iter()
        .filter_map(|v| v.as_u64().map(|n| n as usize))
        .collect();
    assert_eq!(shape, common::npy_shape(&bytes)?);
    assert_eq!(side["array_bytes"], bytes.len());
    assert_eq!(side["array_crc32"], crc32(&bytes));
    Ok(side)
}

// -------------------------------------------------------------------------------------------
// 1. An output never replaces an input.

#[test]
fn no_output_replaces_a_file_the_run_reads() -> Result {
    let m = model_copy("inputs")?;
    let dir = m.parent().ok_or("parent")?.to_path_buf();
    let before = |f: &str| std::fs::read(m.join(f));
    let snapshot: Vec<(String, Vec<u8>)> = ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|f| Ok((f.to_string(), before(f)?)))
        .collect::<Result<_>>()?;
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(m.join("config.json"), dir.join("link.json"))?;
        std::fs::hard_link(m.join("tokenizer.json"), dir.join("hard.json"))?;
    }
    let layout = dir.join("layout.json");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.json"),
        &layout,
    )?;
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, "The cat sat")?;
    let md = s(&m).to_string();
    let at = |f: &str| m.join(f).display().to_string();
    let mut cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "heads-effect".into(),
                "--out".into(),
                at("model.safetensors"),
            ],
            "--out",
            "model.safetensors",
        ),
        (
            vec![
                "attribute".into(),
                "--target-id".into(),
                "1".into(),
                "--format".into(),
                "json".into(),
                "--out".into(),
                at("config.json"),
            ],
            "--out",
            "config.json",
        ),
        (
            vec![
                "inspect-heads".into(),
                "--format".into(),
                "json".into(),
                "--out".into(),
                at("tokenizer.json"),
            ],
            "--out",
            "tokenizer.json",
        ),
        (
            vec![
                "generate".into(),
                "-n".into(),
                "2".into(),
                "--attention-out".into(),
                at("config.json"),
            ],
            "--attention-out",
            "config.json",
        ),
        // The npy's tokens file (`PATH.json`) would be the tokenizer.
        (
            vec![
                "inspect-heads".into(),
                "--format".into(),
                "npy".into(),
                "--out".into(),
                at("tokenizer"),
            ],
            "--out",
            "tokenizer.json",
        ),
    ];
    #[cfg(unix)]
    {
        cases.push((
            vec![
                "inspect-heads".into(),
                "--format".into(),
                "json".into(),
                "--out".into(),
                dir.join("link.json").display().to_string(),
            ],
            "--out",
            "config.json",
        ));
        cases.push((
            vec![
                "heads-effect".into(),
                "--format".into(),
                "json".into(),
                "--out".into(),
                dir.join("hard.json").display().to_string(),
            ],
            "--out",
            "tokenizer.json",
        ));
    }
    for (args, flag, needle) in &cases {
        let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
        argv.extend(["--model-dir", &md, "--prompt", "The cat sat"]);
        let out = gpt2(&argv)?;
        assert_error(&out, 2, &[flag, needle]);
        assert!(out.stdout.is_empty(), "{argv:?} ran");
    }
    // A layout file (random weights) and a prompt file are inputs too.
    let out = gpt2(&[
        "generate",
        "--config",
        s(&layout),
        "-n",
        "2",
        "--prompt",
        "ab",
        "--attention-out",
        s(&layout),
    ])?;
    assert_error(&out, 2, &["--attention-out", "layout.json"]);
    let out = gpt2(&[
        "heads-effect",
        "--model-dir",
        &md,
        "--prompt-file",
        s(&prompt),
        "--out",
        s(&prompt),
    ])?;
    assert_error(&out, 2, &["--out", "prompt file"]);
    for (f, bytes) in &snapshot {
        assert_eq!(&std::fs::read(m.join(f))?, bytes, "{f} changed");
    }
    assert!(std::fs::read_to_string(&layout)?.contains("n_embd"));
    assert_eq!(std::fs::read_to_string(&prompt)?, "The cat sat");
    #[cfg(unix)]
    assert!(std::fs::symlink_metadata(dir.join("link.json"))?.is_symlink());
    // `--out config.npy` writes `config.npy` and `config.npy.json`: config.json is untouched.
    let out = gpt2(&[
        "inspect-heads",
        "--model-dir",
        &md,
        "--prompt",
        "The cat",
        "--format",
        "npy",
        "--out",
        &at("config.npy"),
    ])?;
    assert_ok(&out);
    assert_eq!(std::fs::read(m.join("config.json"))?, snapshot[0].1);
    assert_pair(&m.join("config.npy"))?;
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 2. Special files are streams; a symlink is written through.

#[cfg(unix)]
#[test]
fn devices_pipes_and_fd_links_are_written_as_streams() -> Result {
    let dir = scratch("streams");
    let tiny = fixture("tiny");
    let args = |out: &str| -> Vec<String> {
        [
            "heads-effect",
            "--model-dir",
            s(&tiny),
            "--prompt",
            "The cat sat",
            "--format",
            "json",
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |out: &str, stdout: Stdio| -> Result<Output> {
        let a = args(out);
        gpt2_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), stdout)
    };
    // /dev/stdout on a pipe, and /dev/null.
    let out = run("/dev/stdout", Stdio::piped())?;
    assert_ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert!(v["effect"].is_array());
    assert_ok(&run("/dev/null", Stdio::piped())?);
    // A link to /proc/self/fd/1 (and one to /dev/stdout) whose stdout is a regular file: the
    // file gets the JSON, the link stays a link.
    for (name, target) in [("fd1", "/proc/self/fd/1"), ("stdout", "/dev/stdout")] {
        let link = dir.join(name);
        std::os::unix::fs::symlink(target, &link)?;
        let file = dir.join(format!("{name}.txt"));
        let out = run(s(&link), Stdio::from(std::fs::File::create(&file)?))?;
        assert_ok(&out);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
        assert!(v["effect"].is_array(), "{name}");
        assert!(std::fs::symlink_metadata(&link)?.is_symlink(), "{name}");
    }
    // A FIFO: its reader gets the JSON.
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status()?.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo))
    };
    assert_ok(&run(s(&fifo), Stdio::piped())?);
    let text = reader.join().map_err(|_| "reader panicked")??;
    let v: Value = serde_json::from_str(&text)?;
    assert!(v["effect"].is_array());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)?.file_type().is_fifo());
    // An npy array on a device has no tokens file (there is no place beside it); one on a pipe
    // is refused before the work: its rows are written in place, out of order.
    let npy = |out: &str| -> Result<Output> {
        gpt2(&[
            "inspect-heads",
            "--model-dir",
            s(&tiny),
            "--prompt",
            "The cat",
            "--format",
            "npy",
            "--out",
            out,
        ])
    };
    let sink = dir.join("sink.npy");
    std::os::unix::fs::symlink("/dev/null", &sink)?;
    assert_ok(&npy(s(&sink))?);
    assert!(!entries(&dir)
        .iter()
        .any(|n| n.starts_with("sink.") && n != "sink.npy"));
    let out = npy("/dev/stdout")?;
    assert_error(&out, 2, &["--out", "pipe"]);
    assert!(out.stdout.is_empty());
    Ok(())
}

#[cfg(unix)]
#[test]
fn a_symlink_is_written_through_to_its_target() -> Result {
    let dir = scratch("links");
    let tiny = fixture("tiny");
    std::fs::create_dir_all(dir.join("runs"))?;
    let real = dir.join("runs/real.json");
    std::fs::write(&real, "old")?;
    let link = dir.join("latest.json");
    std::os::unix::fs::symlink("runs/real.json", &link)?;
    // Dangling: the target is created, as the shell's `>` would.
    let dangling = dir.join("new.json");
    std::os::unix::fs::symlink("runs/made.json", &dangling)?;
    for out in [&link, &dangling] {
        assert_ok(&gpt2(&[
            "heads-effect",
            "--model-dir",
            s(&tiny),
            "--prompt",
            "The cat sat",
            "--format",
            "json",
            "--out",
            s(out),
        ])?);
        assert!(std::fs::symlink_metadata(out)?.is_symlink());
    }
    for f in [&real, &dir.join("runs/made.json")] {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(f)?)?;
        assert!(v["effect"].is_array());
    }
    assert_eq!(entries(&dir.join("runs")), ["made.json", "real.json"]);
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 3. An npy array and its tokens file are one unit, named `PATH.json`.

#[test]
fn the_npy_tokens_file_is_path_json_and_never_a_users_file() -> Result {
    let dir = scratch("sidecar");
    let tiny = fixture("tiny");
    let mine = dir.join("attn.json");
    std::fs::write(&mine, "my own notes")?;
    let npy = dir.join("attn.npy");
    assert_ok(&gpt2(&[
        "inspect-heads",
        "--model-dir",
        s(&tiny),
        "--prompt",
        "The cat sat on the mat",
        "--format",
        "npy",
        "--out",
        s(&npy),
    ])?);
    let side = assert_pair(&npy)?;
    let n = side["token_ids"].as_array().map(Vec::len);
    assert_eq!(side["shape"][2].as_u64().map(|k| k as usize), n);
    let gen = dir.join("gen.npy");
    let gen_notes = dir.join("gen.json");
    std::fs::write(&gen_notes, "more notes")?;
    let out = gpt2(&[
        "generate",
        "--model-dir",
        s(&tiny),
        "--prompt",
        "The cat",
        "-n",
        "3",
        "--attention-out",
        s(&gen),
    ])?;
    assert_ok(&out);
    assert_pair(&gen)?;
    assert_eq!(std::fs::read_to_string(&mine)?, "my own notes");
    assert_eq!(std::fs::read_to_string(&gen_notes)?, "more notes");
    assert_eq!(
        entries(&dir),
        [
            "attn.json",
            "attn.npy",
            "attn.npy.json",
            "gen.json",
            "gen.npy",
            "gen.npy.json"
        ]
    );
    Ok(())
}

#[test]
fn runs_writing_one_npy_at_once_leave_one_runs_pair() -> Result {
    let dir = scratch("race");
    let tiny = fixture("tiny");
    let npy = dir.join("r.npy");
    for _round in 0..3 {
        // Prompts of different lengths: arrays of different shapes.
        let children = (1..=6)
            .map(|i| {
                gpt2_command(&[
                    "inspect-heads",
                    "--model-dir",
                    s(&tiny),
                    "--prompt",
                    &"a b ".repeat(i),
                    "--format",
                    "npy",
                    "--out",
                    s(&npy),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        for c in children {
            assert_ok(&c.wait_with_output()?);
        }
        assert_pair(&npy)?;
        let names = entries(&dir);
        assert_eq!(names, ["r.npy", "r.npy.json"]);
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 4. Every destination is checked before the work, naming the flag the user typed.

#[test]
fn destinations_are_checked_before_the_work() -> Result {
    let dir = scratch("early");
    let tiny = fixture("tiny");
    let folder = dir.join("a-folder.npy");
    std::fs::create_dir_all(&folder)?;
    let gen = |out: &Path| -> Result<Output> {
        gpt2(&[
            "generate",
            "--model-dir",
            s(&tiny),
            "--prompt",
            "The cat",
            "-n",
            "5",
            "--attention-out",
            s(out),
        ])
    };
    // Nothing is generated (stdout stays empty) before the error.
    let out = gen(&dir.join("nodir/x.npy"))?;
    assert_error(&out, 2, &["--attention-out", "nodir"]);
    assert!(out.stdout.is_empty(), "generated first");
    let out = gen(&folder)?;
    assert_error(&out, 2, &["--attention-out", "is a folder"]);
    assert!(out.stdout.is_empty(), "generated first");
    let out = gen(&dir.join("nodir/x.json"))?;
    assert_error(&out, 2, &["--attention-out", "nodir"]);
    for cmd in ["heads-effect", "attribute"] {
        let out = gpt2(&[
            cmd,
            "--model-dir",
            s(&tiny),
            "--prompt",
            "The cat",
            "--target-id",
            "1",
            "--out",
            s(&dir.join("nodir/x.txt")),
        ])?;
        assert_error(&out, 2, &["--out", "nodir"]);
        assert!(!stderr(&out).contains("loaded in"), "{cmd} ran");
    }
    let out = gpt2(&[
        "inspect-heads",
        "--model-dir",
        s(&tiny),
        "--prompt",
        "The cat",
        "--format",
        "png",
        "--out",
        s(&dir.join("nodir/x.png")),
    ])?;
    assert_error(&out, 2, &["--out", "nodir"]);
    assert_eq!(entries(&dir), ["a-folder.npy"]);
    Ok(())
}

#[test]
fn a_long_file_name_that_fits_is_written() -> Result {
    let dir = scratch("long-name");
    let tiny = fixture("tiny");
    // 250 bytes: the tokens file `NAME.json` is 255, the most a file name may have.
    let name = format!("{}.npy", "a".repeat(246));
    let npy = dir.join(&name);
    assert_ok(&gpt2(&[
        "inspect-heads",
        "--model-dir",
        s(&tiny),
        "--prompt",
        "The cat",
        "--format",
        "npy",
        "--out",
        s(&npy),
    ])?);
    assert_pair(&npy)?;
    let html = dir.join(format!("{}.html", "b".repeat(250)));
    assert_ok(&gpt2(&[
        "inspect-heads",
        "--model-dir",
        s(&tiny),
        "--prompt",
        "The cat",
        "--format",
        "html",
        "--out",
        s(&html),
    ])?);
    assert!(html.is_file());
    // One byte too many for the tokens file: refused before the work.
    let npy = dir.join(format!("{}.npy", "c".repeat(247)));
    let out = gpt2(&[
        "inspect-heads",
        "--model-dir",
        s(&tiny),
        "--prompt",
        "The cat",
        "--format",
        "npy",
        "--out",
        s(&npy),
    ])?;
    assert_error(&out, 2, &["--out"]);
    assert_eq!(entries(&dir).len(), 3);
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 5. Modes: new files follow the umask; a replaced file keeps its mode.

#[cfg(unix)]
#[test]
fn new_files_follow_the_umask_and_replaced_files_keep_their_mode() -> Result {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("modes");
    let tiny = fixture("tiny");
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
    let run = |umask: &str, format: &str, out: &Path| -> Result<()> {
        assert_ok(&gpt2_umask(
            umask,
            &[
                "inspect-heads",
                "--model-dir",
                s(&tiny),
                "--prompt",
                "The cat",
                "--format",
                format,
                "--out",
                s(out),
            ],
        )?);
        Ok(())
    };
    let html = dir.join("page.html");
    run("022", "html", &html)?;
    assert_eq!(mode(&html)?, 0o644);
    let npy = dir.join("a.npy");
    run("027", "npy", &npy)?;
    assert_eq!(mode(&npy)?, 0o640);
    assert_eq!(mode(&dir.join("a.npy.json"))?, 0o640);
    // An existing file keeps its mode, whatever the umask.
    std::fs::set_permissions(&html, std::fs::Permissions::from_mode(0o604))?;
    run("077", "html", &html)?;
    assert_eq!(mode(&html)?, 0o604);
    Ok(())
}
