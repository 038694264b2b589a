//! `gpt2 ioi`: the IOI paper's dataset and experiments (`gpt2::analysis::ioi`), as text or
//! JSON, and the dataset as `--pairs` lines for `gpt2 patch`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use gpt2::analysis::ablation::HeadId;
use gpt2::analysis::figure::write_heatmap;
use gpt2::analysis::ioi::{self, Experiments, IoiPrompt, IoiReport, Order, NAMES};
use gpt2::analysis::patching::Axis;
use serde_json::json;

use super::analyses::write;
use super::shared::{count, load, note, note_done};
use super::{choice, parse_heads, Choice, Heads, ModelArgs};

/// The PNGs of `--figures`, in the order of the maps.
const FIGURES: [&str; 3] = ["heads.png", "path_logits.png", "path_queries.png"];

/// GPT-2 small's name movers (Wang et al. 2022): the default receivers of path-queries.
const NAME_MOVERS: [HeadId; 3] = [
    HeadId { layer: 9, head: 9 },
    HeadId { layer: 9, head: 6 },
    HeadId { layer: 10, head: 0 },
];

#[derive(Args)]
pub(super) struct IoiArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts in the dataset.
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// The dataset's seed: the same seed, names and order give the same prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The order of the names in the first clause.
    #[arg(long, default_value = "mixed", value_parser = choice::<Order>())]
    order: Order,
    /// Names to draw from instead of the paper's 109, comma-separated; each must be one token
    /// after a space in the model's tokenizer (the paper's names that are not are dropped).
    #[arg(long, value_name = "NAME,...")]
    names: Option<String>,
    /// The experiments, comma-separated [default: heads, path-logits, path-queries where the
    /// name movers exist, ablate with --ablate].
    #[arg(long, value_enum, value_delimiter = ',')]
    experiments: Option<Vec<Experiment>>,
    /// The name movers: path-queries' receivers [default: 9.9,9.6,10.0, GPT-2 small's].
    #[arg(long, value_name = "L.H,...", value_parser = parse_heads)]
    name_movers: Option<Heads>,
    /// Heads to mean-ablate (each replaced by its mean over the ABC prompts of its template).
    #[arg(long, value_name = "L.H,...", value_parser = parse_heads)]
    ablate: Option<Heads>,
    /// What to write.
    #[arg(long, value_enum, default_value = "text")]
    format: IoiFormat,
    /// Write the report to this file instead of standard output.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Also draw each layers x heads map (normalised) as a PNG in this folder: heads.png,
    /// path_logits.png, path_queries.png, the paper's figures.
    #[arg(long, value_name = "DIR")]
    figures: Option<PathBuf>,
    /// Also write the dataset as JSON Lines, one {"clean", "corrupted", "target", "against"} a
    /// line: `gpt2 patch --pairs` reads it.
    #[arg(long, value_name = "PATH")]
    dataset_out: Option<PathBuf>,
}

/// The experiments of `gpt2 ioi`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Experiment {
    /// Head patching: the ABC run with each head's output from the IOI run
    Heads,
    /// Path patching from each head to the logits (the name movers)
    PathLogits,
    /// Path patching from each head to the name movers' queries (S-inhibition)
    PathQueries,
    /// Mean ablation of the --ablate heads
    Ablate,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum IoiFormat {
    /// Tables for people
    Text,
    /// One JSON object, with the dataset
    Json,
}

impl Choice for Order {
    fn values() -> Vec<(&'static str, &'static str)> {
        Order::ALL.map(|o| (o.name(), o.help())).to_vec()
    }
}

pub(super) fn cmd_ioi(args: IoiArgs) -> Result<()> {
    args.model.source.source().protect_files()?;
    for (param, path) in [("out", &args.out), ("dataset-out", &args.dataset_out)] {
        if let Some(path) = path {
            gpt2::output::reserve(param, path)?;
        }
    }
    let figures = |name: &str| args.figures.as_ref().map(|d| d.join(name));
    for name in FIGURES {
        if let Some(path) = figures(name) {
            gpt2::output::reserve("figures", &path)?;
        }
    }
    let wants = |e: Experiment| args.experiments.as_ref().is_none_or(|x| x.contains(&e));
    let asked = |e: Experiment| args.experiments.as_ref().is_some_and(|x| x.contains(&e));
    if asked(Experiment::Ablate) && args.ablate.is_none() {
        Err(gpt2::Error::param(
            "experiments",
            "ablate needs --ablate L.H,...: the heads to mean-ablate",
        ))?;
    }
    let loaded = load(&args.model, None)?;
    let c = loaded.model.config();
    let fits = |h: &[HeadId]| h.iter().all(|h| h.layer < c.n_layer && h.head < c.n_head);
    let name_movers = match &args.name_movers {
        Some(Heads(h)) if !fits(h) => Err(gpt2::Error::param(
            "name-movers",
            format!(
                "{}: the model has {} layers of {} heads",
                list(h),
                c.n_layer,
                c.n_head
            ),
        ))?,
        Some(Heads(h)) => Some(h.clone()),
        None if fits(&NAME_MOVERS) => Some(NAME_MOVERS.to_vec()),
        None if asked(Experiment::PathQueries) => Err(gpt2::Error::param(
            "name-movers",
            "are needed for path-queries: GPT-2 small's 9.9,9.6,10.0 are not in this model",
        ))?,
        None => None,
    };
    let names: Vec<String> = match &args.names {
        Some(s) => s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect(),
        None => NAMES.iter().map(|n| n.to_string()).collect(),
    };
    let usable = ioi::single_token_names(&loaded.tokenizer, &names)?;
    if args.names.is_some() && usable.len() < names.len() {
        let bad: Vec<&String> = names.iter().filter(|n| !usable.contains(n)).collect();
        Err(gpt2::Error::param(
            "names",
            format!("{bad:?} are not one token after a space in this tokenizer"),
        ))?;
    }
    let prompts = ioi::generate(args.n, args.seed, args.order, &usable)?;
    let pairs = ioi::pairs(&loaded.tokenizer, &prompts)?;
    if let Some(path) = &args.dataset_out {
        write(&Some(path.clone()), &pairs_lines(&prompts))?;
    }
    let experiments = Experiments {
        heads: wants(Experiment::Heads),
        path_logits: wants(Experiment::PathLogits),
        path_queries: name_movers.filter(|_| wants(Experiment::PathQueries)),
        ablate: args
            .ablate
            .as_ref()
            .map(|Heads(h)| h.clone())
            .filter(|_| wants(Experiment::Ablate)),
    };
    let start = std::time::Instant::now();
    let r = ioi::run(&loaded.model, &prompts, &pairs, &experiments)?;
    let text = match args.format {
        IoiFormat::Json => {
            let mut v = serde_json::to_value(&r)?;
            v["model"] = loaded.name.clone().into();
            v["seed"] = args.seed.into();
            v["names"] = json!(usable);
            v["dataset"] = serde_json::to_value(&prompts)?;
            format!("{v}\n")
        }
        IoiFormat::Text => text(&loaded.name, &args, usable.len(), &r),
    };
    write(&args.out, &text)?;
    let maps = [
        r.head_patching
            .as_ref()
            .map(|p| (p.tables(), "head patching")),
        r.path_to_logits
            .as_ref()
            .map(|p| (p.tables(), "path patching to the logits")),
        r.path_to_queries
            .as_ref()
            .map(|p| (p.tables(), "path patching to the name movers' queries")),
    ];
    for (name, map) in FIGURES.iter().zip(maps) {
        if let (Some(path), Some((tables, what))) = (figures(name), map) {
            for (_, _, normalized) in tables {
                write_heatmap(
                    &path,
                    &format!("IOI, {}: {what}, normalised", count(r.prompts, "prompt")),
                    &normalized,
                )?;
            }
        }
    }
    if usable.len() < names.len() {
        note(format_args!(
            "note: {} of the paper's names are one token in this tokenizer; the others were \
             dropped\n",
            usable.len()
        ));
    }
    let tokens = pairs.iter().map(|p| p.clean.len()).sum();
    note_done(&loaded, tokens, start, args.out.as_deref());
    Ok(())
}

/// Heads as `9.9, 9.6`.
fn list(heads: &[HeadId]) -> String {
    heads
        .iter()
        .map(HeadId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The dataset as `gpt2 patch --pairs` lines.
fn pairs_lines(prompts: &[IoiPrompt]) -> String {
    prompts
        .iter()
        .map(|p| {
            json!({
                "clean": p.text,
                "corrupted": p.corrupted,
                "target": format!(" {}", p.io),
                "against": format!(" {}", p.s),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// The heads of a [layer, head] result with the largest normalised values in size, strongest
/// first: `9.9 -0.21, 9.6 -0.15`.
fn strongest(normalized: &[f64], n_head: usize, k: usize) -> String {
    let mut v: Vec<(usize, f64)> = normalized.iter().copied().enumerate().collect();
    v.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    v.iter()
        .take(k)
        .map(|&(i, x)| format!("{}.{} {x:+.3}", i / n_head, i % n_head))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as text.
fn text(model: &str, args: &IoiArgs, names: usize, r: &IoiReport) -> String {
    let pct = |f: f64| format!("{:.1} %", 100.0 * f);
    let label = |_: Axis, i: usize| i.to_string();
    let mut s = format!(
        "{model}: IOI, {} ({} order, seed {}, {names} names); clean = the IOI prompts, \
         corrupted = their ABC prompts; measured: logit(IO) - logit(S) at the end\n\
         clean logit difference {:.4} (IO > S in {}); ABC {:.4} (IO > S in {})\n",
        count(r.prompts, "prompt"),
        args.order.name(),
        args.seed,
        r.clean.mean,
        pct(r.clean.io_beats_s),
        r.corrupted.mean,
        pct(r.corrupted.io_beats_s),
    );
    if let Some(p) = &r.head_patching {
        let n_head = p.shape.last().copied().unwrap_or(1);
        s += &format!(
            "\nHead patching: the ABC run with each head's output (hook_z) from the IOI run; \
             normalised = (patched - ABC) / (clean - ABC)\nstrongest: {}\n\n{}",
            strongest(&p.normalized, n_head, 8),
            p.table(&label)
        );
    }
    for (p, what) in [
        (&r.path_to_logits, "the logits (name movers: negative)"),
        (
            &r.path_to_queries,
            "the name movers' queries (S-inhibition: negative)",
        ),
    ] {
        if let Some(p) = p {
            let n_head = p.shape.last().copied().unwrap_or(1);
            s += &format!(
                "\nPath patching from each head to {what}: {}; normalised = (patched - clean) \
                 / (clean - ABC)\nstrongest: {}\n\n{}",
                p.receivers.describe(),
                strongest(&p.normalized, n_head, 8),
                p.table(&label)
            );
        }
    }
    if let Some(a) = &r.ablation {
        s += &format!(
            "\nMean ablation of {}: logit difference {:.4} (IO > S in {}), against {:.4} clean\n",
            list(&a.heads),
            a.ablated.mean,
            pct(a.ablated.io_beats_s),
            r.clean.mean
        );
    }
    s
}
