//! The training report: what a run's logs (`OUT/steps.jsonl`, `OUT/metrics.jsonl`) and its final
//! model show, as `OUT/report.html` ([`write_report`]) and as a PNG of the curves
//! ([`plot_curves`], `gpt2 train --plot`), with the phase change in which induction heads form
//! found by a fixed rule ([`phase`]).
//!
//! ```no_run
//! use gpt2::train::report;
//! let out = std::path::Path::new("runs/induction");
//! let report = report::write_report(out)?; // OUT/report.html
//! if let Some(p) = &report.phase {
//!     println!("{p}");
//! }
//! report::plot_curves(out, &report.logs, std::path::Path::new("curves.png"))?;
//! # Ok::<(), gpt2::Error>(())
//! ```

mod chart;
mod html;
pub mod phase;
mod plot;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use phase::{phase_change, HeadChange, PhaseChange};

use crate::error::{Error, Result};
use crate::inspect::image::colormap;
use crate::inspect::scores::{repeated_random_tokens, REPEAT_LEN, REPEAT_SEED};
use crate::inspect::{for_each_layer, LayerChoice, Selection};
use crate::model::Gpt2;
use crate::options::LoadOptions;
use crate::output::PendingFile;
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;

use super::save::RunRecord;
use super::DataSpec;

/// The report's file in the run's folder.
pub const REPORT: &str = "report.html";
/// The logs the report reads.
pub const STEPS_LOG: &str = "steps.jsonl";
pub const METRICS_LOG: &str = "metrics.jsonl";

/// A number JSON may hold as `null`: serde_json writes a NaN or an infinity so. Read as NaN,
/// which the charts leave out, rather than failing the whole report on one value.
fn number<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A line of `steps.jsonl`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StepLine {
    pub step: u64,
    #[serde(deserialize_with = "number")]
    pub loss: f64,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub grad_norm: Option<f64>,
}

/// One head's scores in a line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HeadLine {
    pub layer: usize,
    pub head: usize,
    #[serde(default)]
    pub previous_token: Option<f32>,
    #[serde(default)]
    pub induction: Option<f32>,
    #[serde(default)]
    pub duplicate_token: Option<f32>,
    #[serde(default)]
    pub first_token: Option<f32>,
    #[serde(default)]
    pub label: String,
}

/// A line of `metrics.jsonl`: one evaluation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EvalLine {
    pub step: u64,
    #[serde(default)]
    pub held_out_loss: Option<f64>,
    #[serde(deserialize_with = "number")]
    pub icl_loss: f64,
    #[serde(default)]
    pub copy_accuracy: Option<f64>,
    #[serde(default)]
    pub heads: Vec<HeadLine>,
    /// The training loss of the step evaluated.
    #[serde(default)]
    pub train_loss: Option<f64>,
}

/// A run's logs, read back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunLogs {
    pub steps: Vec<StepLine>,
    pub evals: Vec<EvalLine>,
}

impl RunLogs {
    /// Reads `OUT/steps.jsonl` and `OUT/metrics.jsonl` (a missing one is empty). A line that
    /// does not parse is an error naming it, except a last line cut short (a run killed while
    /// writing it), which is left out.
    pub fn read(out: &Path) -> Result<Self> {
        Ok(Self {
            steps: read_lines(&out.join(STEPS_LOG))?,
            evals: read_lines(&out.join(METRICS_LOG))?,
        })
    }

    /// The evaluation with the highest step.
    pub fn last_eval(&self) -> Option<&EvalLine> {
        self.evals.iter().max_by_key(|e| e.step)
    }
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let cut_short = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if cut_short && i + 1 == lines.len() => {}
            Err(e) => return Err(Error::Input(format!("{}:{}: {e}", path.display(), i + 1))),
        }
    }
    Ok(out)
}

/// One head's attention on the repeated random sequence, as a PNG (one pixel per weight).
#[derive(Debug, Clone)]
pub struct Thumbnail {
    pub layer: usize,
    pub head: usize,
    pub png: Vec<u8>,
    /// From the last evaluation.
    pub label: String,
    pub induction: Option<f32>,
    pub previous_token: Option<f32>,
}

/// Every head's [`Thumbnail`] and the sequence they look at.
#[derive(Debug, Clone, Default)]
pub struct Thumbnails {
    pub heads: Vec<Thumbnail>,
    /// The text of each token of the sequence.
    pub tokens: Vec<String>,
    /// The length of each copy.
    pub repeat_len: usize,
    pub n_head: usize,
    /// Why there are none, when there are none.
    pub note: String,
}

/// Future keys (above the diagonal): not attention, drawn light grey.
const FUTURE: [u8; 3] = [238, 238, 238];

/// The attention of every head of `model` on the sequence `inspect-heads --scores` measures
/// induction on (the same seed and length, no BOS), labelled from `last`.
pub fn thumbnails(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    last: Option<&EvalLine>,
) -> Result<Thumbnails> {
    let config = model.config();
    let len = REPEAT_LEN.min(config.n_positions / 2);
    let skip = [config.bos_token_id, config.eos_token_id];
    let none = |note: String| Thumbnails {
        note,
        n_head: config.n_head,
        ..Thumbnails::default()
    };
    if len < 2 {
        return Ok(none(format!(
            "No thumbnails: the model's context of {} positions is too short for a repeated \
             sequence.",
            config.n_positions
        )));
    }
    let ids = match repeated_random_tokens(config.vocab_size, &skip, len, REPEAT_SEED) {
        Ok(ids) => ids,
        Err(e) => return Ok(none(format!("No thumbnails: {e}."))),
    };
    let selection = Selection::new(config, LayerChoice::All, None)?;
    let t = ids.len();
    let mut heads = Vec::with_capacity(config.n_layer * config.n_head);
    for_each_layer(model, &ids, &selection, |a| {
        for (i, &head) in a.heads.iter().enumerate() {
            let mut rgb = Vec::with_capacity(t * t * 3);
            for q in 0..t {
                for (k, &w) in a.row(i, q).iter().enumerate() {
                    rgb.extend(if k > q { FUTURE } else { colormap(w) });
                }
            }
            let scores = last.and_then(|e| {
                e.heads
                    .iter()
                    .find(|h| h.layer == a.layer && h.head == head)
            });
            heads.push(Thumbnail {
                layer: a.layer,
                head,
                png: plot::encode_rgb(t, t, &rgb)?,
                label: scores.map(|s| s.label.clone()).unwrap_or_default(),
                induction: scores.and_then(|s| s.induction),
                previous_token: scores.and_then(|s| s.previous_token),
            });
        }
        Ok(())
    })?;
    let tokens = ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]).unwrap_or_else(|_| format!("#{id}")))
        .collect();
    Ok(Thumbnails {
        heads,
        tokens,
        repeat_len: len,
        n_head: config.n_head,
        note: String::new(),
    })
}

/// What [`write_report`] wrote and found.
#[derive(Debug, Clone)]
pub struct Report {
    /// `OUT/report.html`.
    pub path: PathBuf,
    pub logs: RunLogs,
    pub phase: Option<PhaseChange>,
}

/// Writes `OUT/report.html` (atomically) from the run's logs and the model saved in `out`.
pub fn write_report(out: &Path) -> Result<Report> {
    if !out.join(STEPS_LOG).is_file() {
        return Err(Error::param(
            "out",
            format!("{} holds no training run (no {STEPS_LOG})", out.display()),
        ));
    }
    let logs = RunLogs::read(out)?;
    let loaded = ModelSource::dir(out).load(&LoadOptions::default())?;
    let phase = phase_change(&logs.evals);
    let thumbs = thumbnails(&loaded.model, &loaded.tokenizer, logs.last_eval())?;
    let c = loaded.model.config();
    let last_step = logs.steps.iter().map(|s| s.step).max().unwrap_or(0);
    let summary = format!(
        "{} layers × {} heads{}, n_embd {}, vocabulary {}; {} steps logged, {} evaluations{}.",
        c.n_layer,
        c.n_head,
        match c.n_kv_head {
            Some(kv) if kv != c.n_head => format!(" sharing {kv} K/V heads"),
            _ => String::new(),
        },
        c.n_embd,
        c.vocab_size,
        last_step,
        logs.evals.len(),
        logs.last_eval()
            .map(|e| format!(
                " (last at step {}: in-context loss {:.3}{})",
                e.step,
                e.icl_loss,
                e.held_out_loss
                    .map(|l| format!(", held-out loss {l:.3}"))
                    .unwrap_or_default()
            ))
            .unwrap_or_default()
    );
    let summary = match run_details(out) {
        Some(run) => format!("{run}. {summary}"),
        None => summary,
    };
    let loss = chart::loss_panel(&logs, phase.as_ref());
    let scores = chart::score_panels(&logs, phase.as_ref());
    let page = html::page(&html::Page {
        name: &run_name(out),
        summary: &summary,
        loss: &loss,
        scores: &scores,
        phase: phase.as_ref(),
        thumbnails: &thumbs,
    });
    let path = out.join(REPORT);
    let mut file = PendingFile::create(&path)?;
    let written = file
        .file()
        .write_all(page.as_bytes())
        .and_then(|_| file.file().sync_all());
    written.map_err(|e| file.write_error(e))?;
    file.commit()?;
    Ok(Report { path, logs, phase })
}

/// Writes the curves of the run in `out` (its `logs`) as a PNG to `path` (atomically): the loss,
/// then each head's induction, previous-token and duplicate-token scores, the phase change
/// shaded.
pub fn plot_curves(out: &Path, logs: &RunLogs, path: &Path) -> Result<()> {
    let phase = phase_change(&logs.evals);
    let loss = chart::loss_panel(logs, phase.as_ref());
    let scores = chart::score_panels(logs, phase.as_ref());
    let title = match &phase {
        Some(p) => format!(
            "gpt2 train: {} - phase change at step {} (steps {}-{})",
            run_name(out),
            p.step,
            p.from_step,
            p.to_step
        ),
        None => format!("gpt2 train: {}", run_name(out)),
    };
    plot::write_plot(path, &title, &loss, &scores)
}

/// What the run was asked to do, from `OUT/training.json` (`None` without one).
fn run_details(out: &Path) -> Option<String> {
    let text = std::fs::read_to_string(out.join("training.json")).ok()?;
    let r: RunRecord = serde_json::from_str(&text).ok()?;
    let o = &r.options;
    let data = match &r.data {
        DataSpec::Task(t) => format!("the {t} task"),
        DataSpec::File(p) => p.display().to_string(),
    };
    let warmup = if o.warmup > 0 {
        format!(" after {} warm-up steps", o.warmup)
    } else {
        String::new()
    };
    Some(format!(
        "Trained from {} on {data}: {} of {} steps of {} × {} tokens, lr {:e} ({}{warmup}),          weight decay {}, gradient clip {}, dropout {}, seed {}, {}",
        r.init,
        r.step,
        o.steps,
        o.batch_size,
        o.seq_len,
        o.lr,
        o.schedule,
        o.adam.weight_decay,
        o.grad_clip,
        o.dropout,
        o.seed,
        r.dtype
    ))
}

/// The run's folder as titles name it: its last component.
fn run_name(out: &Path) -> String {
    out.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| out.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_read_back_and_a_line_cut_short_is_left_out() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);
        w(
            STEPS_LOG,
            "{\"step\":1,\"loss\":6.2,\"lr\":0.001,\"grad_norm\":1.5}\n{\"step\":2,\"lo",
        )
        .map_err(|e| Error::io(dir.path(), e))?;
        let logs = RunLogs::read(dir.path())?;
        assert_eq!(logs.steps.len(), 1);
        assert_eq!(logs.steps[0].loss, 6.2);
        assert!(logs.evals.is_empty(), "no metrics.jsonl: no evaluations");
        // A broken line inside the file is an error that names it.
        w(STEPS_LOG, "{\"step\":1,\"lo\n{\"step\":2,\"loss\":1}\n")
            .map_err(|e| Error::io(dir.path(), e))?;
        let err = RunLogs::read(dir.path()).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("steps.jsonl:1:")));
        // A loss that was not finite (written as null) is read as NaN.
        w(STEPS_LOG, "{\"step\":1,\"loss\":null}\n").map_err(|e| Error::io(dir.path(), e))?;
        assert!(RunLogs::read(dir.path())?.steps[0].loss.is_nan());
        Ok(())
    }
}
