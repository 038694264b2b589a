//! `gpt2 patch`'s outputs: an activation-patching or a path-patching result as text tables,
//! JSON, a PNG heatmap or an npy array with its JSON beside it.

use std::path::PathBuf;

use anyhow::{bail, Result};
use gpt2::analysis::figure::write_map;
use gpt2::analysis::patching::{Axis, Pair, Patching, PathPatching, Table};
use gpt2::Loaded;
use serde_json::{json, Value};

use super::analyses::write;
use super::patch::PatchFormat;
use super::shared::count;

/// What `gpt2 patch` computed.
pub(super) enum Outcome {
    Act(Patching),
    Path(PathPatching),
}

impl Outcome {
    fn describe(&self, text: impl Fn(u32) -> String) -> String {
        match self {
            Self::Act(p) => p.describe(text),
            Self::Path(p) => p.describe(text),
        }
    }

    fn table(&self, label: &dyn Fn(Axis, usize) -> String) -> String {
        match self {
            Self::Act(p) => p.table(label),
            Self::Path(p) => p.table(label),
        }
    }

    fn tables(&self) -> Vec<Table> {
        match self {
            Self::Act(p) => p.tables(),
            Self::Path(p) => p.tables(),
        }
    }

    /// (clean, corrupted, number of pairs averaged, patched values, shape)
    fn values(&self) -> (f64, f64, usize, &[f64], &[usize]) {
        match self {
            Self::Act(p) => (p.clean, p.corrupted, p.pairs.len(), &p.patched, &p.shape),
            Self::Path(p) => (p.clean, p.corrupted, p.pairs.len(), &p.patched, &p.shape),
        }
    }

    fn json(&self) -> Result<Value> {
        Ok(match self {
            Self::Act(p) => serde_json::to_value(p)?,
            Self::Path(p) => serde_json::to_value(p)?,
        })
    }

    /// What was patched, for titles: `head_out by head`, `path patching from heads to the
    /// logits`.
    fn title(&self) -> String {
        match self {
            Self::Act(p) => format!("patching {} by {}", p.what, p.by),
            Self::Path(p) => format!(
                "path patching from {} to {}{}",
                p.senders,
                p.receivers.describe(),
                if p.receivers.freeze_mlps {
                    " by the direct path alone (MLPs frozen)"
                } else {
                    ""
                }
            ),
        }
    }

    /// The npy's JSON: what its values are, on which axes.
    fn npy_meta(&self) -> Value {
        match self {
            Self::Act(p) => json!({
                "what": p.what,
                "by": p.by,
                "axes": p.axes,
                "acts": p.acts,
                "values": "the patched metric, as TransformerLens' get_act_patch_* returns it; \
                           normalised = (value - corrupted) / (clean - corrupted)",
                "metric": p.metric,
                "position": p.position,
            }),
            Self::Path(p) => json!({
                "path_to": p.receivers.to,
                "receivers": p.receivers.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "senders": p.senders,
                "freeze_mlps": p.receivers.freeze_mlps,
                "axes": p.axes,
                "values": "the metric with each sender's path patched (Wang et al. 2022, as \
                           ARENA's get_path_patch_head_to_*); normalised = (value - clean) / \
                           (clean - corrupted)",
                "metric": p.metric,
                "position": p.position,
            }),
        }
    }
}

/// Where `gpt2 patch` writes, and what it read.
pub(super) struct Report<'a> {
    pub format: PatchFormat,
    pub out: &'a Option<PathBuf>,
    /// `--pairs`, for a dataset.
    pub pairs_file: Option<&'a PathBuf>,
}

/// Writes the result as `--format` says; `first` is the first pair (the one pair, without
/// `--pairs`).
pub(super) fn report(r: &Report, loaded: &Loaded, p: &Outcome, first: &Pair) -> Result<()> {
    let dataset = r.pairs_file.is_some();
    let text = |id: u32| {
        loaded
            .tokenizer
            .decode(&[id])
            .unwrap_or_else(|_| id.to_string())
    };
    let measured = p.describe(text);
    let (clean, corrupted, n_pairs, patched, shape) = p.values();
    // Positions are labelled by the tokens of the one pair, clean/corrupted where they differ.
    let tokens: Vec<(String, String)> = if dataset {
        Vec::new()
    } else {
        first
            .clean
            .iter()
            .zip(&first.corrupted)
            .map(|(&a, &b)| (text(a), text(b)))
            .collect()
    };
    let label = |axis: Axis, i: usize| match (axis, tokens.get(i)) {
        (Axis::Pos, Some((a, b))) if a == b => format!("{i} {a:?}"),
        (Axis::Pos, Some((a, b))) => format!("{i} {a:?}/{b:?}"),
        _ => i.to_string(),
    };
    let source = match r.pairs_file {
        Some(path) => format!("{} from {}", count(n_pairs, "pair"), path.display()),
        None => count(first.clean.len(), "token"),
    };
    match r.format {
        PatchFormat::Json => {
            let mut v = p.json()?;
            v["model"] = loaded.name.clone().into();
            if let Some(path) = r.pairs_file {
                v["pairs_file"] = path.display().to_string().into();
            } else {
                v["clean_ids"] = json!(first.clean);
                v["corrupted_ids"] = json!(first.corrupted);
            }
            v["measured"] = measured.into();
            write(r.out, &format!("{v}\n"))?;
        }
        PatchFormat::Text => {
            let mean = if dataset { "mean " } else { "" };
            let (how, normalised) = match p {
                Outcome::Act(_) => (
                    "from the clean run into the corrupted one",
                    "normalised = (patched - corrupted) / (clean - corrupted)",
                ),
                Outcome::Path(_) => (
                    "(each sender from the corrupted run into the clean one, every other \
                     head frozen at the clean run)",
                    "normalised = (patched - clean) / (clean - corrupted): 0 = no effect, \
                     -1 = as corrupted",
                ),
            };
            write(
                r.out,
                &format!(
                    "{}: {} {how} ({source}); measured: {measured}\n{mean}clean = {clean:.4}, \
                     {mean}corrupted = {corrupted:.4}; {normalised}\n\n{}",
                    loaded.name,
                    p.title(),
                    p.table(&label)
                ),
            )?;
        }
        PatchFormat::Png => {
            let Some(path) = r.out else {
                bail!("png needs --out")
            };
            let [(title, _, normalized)] = <[_; 1]>::try_from(p.tables()).map_err(|_| {
                gpt2::Error::param(
                    "format",
                    "png draws one layers x heads or layers x positions map: this result has \
                     several (use text, json or npy)",
                )
            })?;
            // Positions are labelled by their tokens, as in the text tables.
            let axes = match p {
                Outcome::Act(a) => &a.axes,
                Outcome::Path(a) => &a.axes,
            };
            let columns = match axes.last() {
                Some(Axis::Pos) if axes.len() >= 2 => "position",
                Some(Axis::Head) => "head",
                _ => "value",
            };
            let width = normalized.first().map_or(0, Vec::len);
            let labels: Option<Vec<String>> = (columns == "position" && !tokens.is_empty())
                .then(|| (0..width).map(|i| label(Axis::Pos, i)).collect());
            write_map(
                path,
                &format!(
                    "normalised {}{}{title}: {measured}",
                    p.title(),
                    if title.is_empty() { "" } else { " " }
                ),
                &normalized,
                columns,
                labels.as_deref(),
            )?;
        }
        PatchFormat::Npy => {
            let Some(path) = r.out else {
                bail!("npy needs --out")
            };
            let data: Vec<f32> = patched.iter().map(|&v| v as f32).collect();
            let mut meta = p.npy_meta();
            meta["model"] = loaded.name.clone().into();
            meta["measured"] = measured.into();
            meta["clean"] = clean.into();
            meta["corrupted"] = corrupted.into();
            if let Some(file) = r.pairs_file {
                let pairs = match p {
                    Outcome::Act(p) => serde_json::to_value(&p.pairs)?,
                    Outcome::Path(p) => serde_json::to_value(&p.pairs)?,
                };
                meta["pairs"] = pairs;
                meta["pairs_file"] = file.display().to_string().into();
            } else {
                let (clean, corrupted): (Vec<String>, Vec<String>) = tokens.iter().cloned().unzip();
                meta["clean_tokens"] = clean.into();
                meta["corrupted_tokens"] = corrupted.into();
                meta["clean_ids"] = json!(first.clean);
                meta["corrupted_ids"] = json!(first.corrupted);
            }
            gpt2::inspect::write_npy(path, shape, &data, meta)?;
        }
    }
    Ok(())
}
