//! What every command does around its one library call: load the model, guard the files the
//! run reads and writes, and the closing notes on stderr.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use gpt2::{Loaded, ModelSource};

use super::{ModelArgs, PromptArgs, SourceArgs};

/// Loads the model `args` names (only its first `layers` blocks, if given).
pub(super) fn load(args: &ModelArgs, layers: Option<usize>) -> Result<Loaded> {
    let source = args.source.source();
    let mut opts = args.options()?;
    opts.layers = layers;
    let what = match &source {
        ModelSource::Layout { path, .. } => format!("--config {}", path.display()),
        ModelSource::Dir(dir) => format!("--model-dir {}", dir.display()),
        ModelSource::Hub { repo, .. } => format!("cannot load {repo}"),
    };
    let loaded = source.load(&opts).map_err(|e| match e {
        // It names the repo, and what to do comes first.
        e @ gpt2::Error::HubUnreachable { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(what),
    })?;
    // Once it loaded: a layout that does not exist is an error, not random weights.
    if source.is_random() {
        note(format_args!(
            "warning: {} has random weights (seeded): its text is noise; use it for shapes, memory and speed\n",
            source.name()
        ));
    }
    Ok(loaded)
}

/// Before any work (and any download): the files the run reads are protected, and every file it
/// writes (`outputs`: the flag that names it, and the path) is checked, so that a bad
/// destination fails now, naming its flag, and no output replaces an input (see `gpt2::output`).
pub(super) fn guard(
    source: &SourceArgs,
    prompt: &PromptArgs,
    prompts: Option<&std::path::Path>,
    outputs: &[(&'static str, std::path::PathBuf)],
) -> Result<()> {
    source.source().protect_files()?;
    if let Some(path) = prompt.file() {
        gpt2::output::protect(path, "the prompt file")?;
    }
    if let Some(path) = prompts {
        gpt2::output::protect(path, "the prompts file")?;
    }
    for (param, path) in outputs {
        gpt2::output::reserve(param, path)?;
    }
    Ok(())
}

/// The closing stats line of an analysis.
pub(super) fn note_done(
    loaded: &Loaded,
    tokens: usize,
    start: Instant,
    out: Option<&std::path::Path>,
) {
    note(format_args!(
        "{}: {}; loaded in {:.0} ms, ran in {:.0} ms{}\n",
        loaded.name,
        count(tokens, "token"),
        loaded.load_time.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3,
        out.map(|p| format!(", written to {}", p.display()))
            .unwrap_or_default()
    ));
    print_peak_memory();
}

/// The process's peak resident memory (Linux `VmHWM`), so long runs can show it stays flat.
pub(super) fn print_peak_memory() {
    let peak = || -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    if let Some(mib) = peak() {
        note(format_args!("peak memory: {mib:.1} MiB\n"));
    }
}

/// `n` and `noun`, plural unless one: `1 token`, `2 tokens`.
pub(super) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Writes to stderr; a closed or full stderr is not worth failing a finished run for.
pub(super) fn note(text: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().write_fmt(text);
}
