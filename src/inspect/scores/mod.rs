//! What kind of head each one is: [`metrics`] scores each head's attention against TransformerLens'
//! detection patterns and labels its dominant type; this module runs the prompt and the repeated
//! random sequence through the model, scores every selected head, and renders the table.

mod metrics;

pub use metrics::*;

use std::fmt;

use serde::Serialize;

use super::{for_each_layer, for_each_row_block, Format, Output, Selection, Tokens};
use crate::error::{Error, Result};
use crate::model::Gpt2;
use crate::output::Out;

/// Scores of every selected head, and the random sequences they were partly measured on.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreTable {
    /// One per head; over several prompts, the prompt-measured scores are means.
    pub heads: Vec<HeadScores>,
    /// Over several prompts, the standard deviation of each head's prompt-measured scores
    /// (`None`s elsewhere); empty for one prompt.
    pub spread: Vec<HeadScores>,
    /// Prompts the prompt-measured scores come from.
    pub prompts: usize,
    /// Length of each copy of the random sequence.
    pub repeat_len: usize,
    /// The sequence itself: `<|endoftext|>` first with `--bos`, then the random tokens twice.
    pub repeated_token_ids: Vec<u32>,
    /// The control: as many distinct random tokens, none repeated (`<|endoftext|>` first with
    /// `--bos`); empty when the vocabulary is too small for it.
    pub control_token_ids: Vec<u32>,
}

/// Runs the prompt, the repeated random sequence and its control (with the prompt's BOS, if
/// it has one) through the model and scores every selected head.
pub fn head_scores(model: &Gpt2, tokens: &Tokens, selection: &Selection) -> Result<ScoreTable> {
    head_scores_over(model, std::slice::from_ref(tokens), selection)
}

/// [`head_scores`] over several prompts: the prompt-measured scores (previous-token,
/// first-token, positional-offset, local, entropy) are averaged over them, with their spread;
/// the repeated and control sequences are measured once.
pub fn head_scores_over(
    model: &Gpt2,
    prompts: &[Tokens],
    selection: &Selection,
) -> Result<ScoreTable> {
    let first = prompts
        .first()
        .ok_or_else(|| Error::Input("no prompt to score heads on".into()))?;
    let config = model.config();
    let bos = first.bos.then(|| first.ids[0]);
    let room = (config.n_positions - usize::from(bos.is_some())) / 2;
    let len = REPEAT_LEN.min(room);
    if len < 2 {
        return Err(Error::Input(format!(
            "the model's context of {} positions is too short to measure induction",
            config.n_positions
        )));
    }
    let skip = [config.bos_token_id, config.eos_token_id];
    let random = repeated_random_tokens(config.vocab_size, &skip, len, REPEAT_SEED)?;
    let repeated: Vec<u32> = bos.into_iter().chain(random).collect();
    let control: Vec<u32> =
        match distinct_random_tokens(config.vocab_size, &skip, 2 * len, CONTROL_SEED) {
            Ok(c) => bos.into_iter().chain(c).collect(),
            Err(_) => Vec::new(),
        };
    let n_heads = selection.heads.len();
    // The repeated sequence and its control are short: whole layers at a time.
    let patterns = |ids: &[u32]| -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(selection.layers.len() * n_heads);
        if ids.is_empty() {
            return Ok(out);
        }
        for_each_layer(model, ids, selection, |a| {
            out.extend((0..a.heads.len()).map(|i| a.head(i).to_vec()));
            Ok(())
        })?;
        Ok(out)
    };
    let rep = patterns(&repeated)?;
    let ctl = patterns(&control)?;

    // Each prompt, however long, a block of rows at a time.
    let mut per_prompt: Vec<Vec<HeadScores>> = Vec::with_capacity(prompts.len());
    for tokens in prompts {
        crate::interrupt::check()?;
        let detectors = Detectors::new(tokens.len(), &repeated);
        let mut rows = vec![PromptRows::new(&detectors); selection.layers.len() * n_heads];
        for_each_row_block(model, &tokens.ids, selection, |b| {
            let t = b.len;
            for (i, row) in b.data.chunks(t).enumerate() {
                // (layers, heads, rows, T)
                let (lh, r) = (i / b.rows.len(), i % b.rows.len());
                rows[lh].add(&detectors, b.rows.start + r, row);
            }
            Ok(())
        })?;
        let mut heads = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let (layer, head) = (selection.layers[i / n_heads], selection.heads[i % n_heads]);
            let control = ctl.get(i).map(Vec::as_slice);
            heads.push(detectors.finish(layer, head, r, &rep[i], control));
        }
        per_prompt.push(heads);
    }
    let (heads, spread) = summarise(per_prompt);
    Ok(ScoreTable {
        heads,
        spread,
        prompts: prompts.len(),
        repeat_len: len,
        repeated_token_ids: repeated,
        control_token_ids: control,
    })
}

/// Means (labelled again) and standard deviations over prompts of the prompt-measured scores.
fn summarise(mut per_prompt: Vec<Vec<HeadScores>>) -> (Vec<HeadScores>, Vec<HeadScores>) {
    if per_prompt.len() == 1 {
        return (per_prompt.pop().unwrap_or_default(), Vec::new());
    }
    let stat = |vals: Vec<Option<f32>>| -> (Option<f32>, Option<f32>) {
        let v: Vec<f64> = vals.into_iter().flatten().map(f64::from).collect();
        if v.is_empty() {
            return (None, None);
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        (Some(mean as f32), Some(var.sqrt() as f32))
    };
    let heads = per_prompt[0].len();
    let mut means = Vec::with_capacity(heads);
    let mut spreads = Vec::with_capacity(heads);
    for h in 0..heads {
        let col =
            |f: fn(&HeadScores) -> Option<f32>| stat(per_prompt.iter().map(|p| f(&p[h])).collect());
        let base = &per_prompt[0][h];
        let (prev, prev_s) = col(|s| s.previous_token);
        let (first, first_s) = col(|s| s.first_token);
        let (offset, offset_s) = col(|s| s.positional_offset);
        let (local, local_s) = col(|s| s.local);
        let (entropy, entropy_s) = col(|s| Some(s.entropy));
        let (norm, norm_s) = col(|s| s.normalized_entropy);
        // The most common best offset.
        let mut ks: Vec<usize> = per_prompt.iter().filter_map(|p| p[h].offset_k).collect();
        ks.sort_unstable();
        let k = ks
            .iter()
            .copied()
            .max_by_key(|k| ks.iter().filter(|x| *x == k).count());
        let mut m = HeadScores {
            previous_token: prev,
            first_token: first,
            positional_offset: offset,
            offset_k: k,
            local,
            entropy: entropy.unwrap_or(0.0),
            normalized_entropy: norm,
            ..base.clone()
        };
        m.label = classify(&m);
        let s = HeadScores {
            previous_token: prev_s,
            first_token: first_s,
            positional_offset: offset_s,
            offset_k: None,
            duplicate_token: None,
            induction: None,
            duplicate_control: None,
            induction_control: None,
            sink: None,
            local: local_s,
            entropy: entropy_s.unwrap_or(0.0),
            normalized_entropy: norm_s,
            ..base.clone()
        };
        means.push(m);
        spreads.push(s);
    }
    (means, spreads)
}

/// Checks that scores can be written as `output` says (text or JSON).
pub fn check_output(output: &Output) -> Result<()> {
    match output.format {
        Format::Text | Format::Json => Ok(()),
        f => Err(Error::param(
            "scores",
            format!("is written as text or json, not {f}"),
        )),
    }
}

impl ScoreTable {
    /// The table as `gpt2 inspect-heads --scores` prints it.
    pub fn report<'a>(&'a self, model: &'a str, tokens: &'a Tokens) -> ScoreReport<'a> {
        ScoreReport {
            table: self,
            model,
            tokens,
        }
    }
}

/// A [`ScoreTable`] with what it was measured on: aligned text (`Display`) or JSON.
pub struct ScoreReport<'a> {
    table: &'a ScoreTable,
    model: &'a str,
    tokens: &'a Tokens,
}

impl ScoreReport<'_> {
    /// Everything in one object: the tokens, the random sequence, the thresholds and the heads.
    pub fn to_json(&self) -> serde_json::Value {
        let thresholds: serde_json::Map<String, serde_json::Value> = THRESHOLDS
            .iter()
            .map(|(kind, min)| (kind.name().to_string(), (*min).into()))
            .collect();
        serde_json::json!({
            "model": self.model,
            "tokens": self.tokens.text,
            "token_ids": self.tokens.ids,
            "repeat_len": self.table.repeat_len,
            "repeated_token_ids": self.table.repeated_token_ids,
            "control_token_ids": self.table.control_token_ids,
            "control_ratio": CONTROL_RATIO,
            "prompts": self.table.prompts,
            "spread": self.table.spread,
            "local_window": LOCAL_WINDOW,
            "thresholds": thresholds,
            "heads": self.table.heads,
        })
    }
}

impl fmt::Display for ScoreReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.table;
        let over = if t.prompts > 1 {
            format!("{} prompts (mean ± spread)", t.prompts)
        } else {
            format!("{} prompt tokens", self.tokens.len())
        };
        writeln!(
            f,
            "{}: {over}; duplicate-token and induction on {} random tokens repeated twice, \
             controls on {} distinct ones\n",
            self.model,
            t.repeat_len,
            t.control_token_ids.len()
        )?;
        let wide = if t.prompts > 1 { 11 } else { 6 };
        writeln!(
            f,
            "{:>5} {:>4} {:>w$} {:>w$} {:>w$} {:>6} {:>6} {:>6} {:>6} {:>6} {:>w$} {:>w$}  type",
            "layer",
            "head",
            "prev",
            "first",
            "offset",
            "dup",
            "(ctl)",
            "induct",
            "(ctl)",
            "sink",
            "local",
            "entropy",
            w = wide
        )?;
        let cell = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        for (i, s) in t.heads.iter().enumerate() {
            let spread = t.spread.get(i);
            let both = |v: Option<f32>, sd: Option<Option<f32>>| match sd.flatten() {
                Some(sd) if v.is_some() => format!("{}±{sd:.2}", cell(v)),
                _ => cell(v),
            };
            let offset = match (s.positional_offset, s.offset_k) {
                (Some(v), Some(k)) => format!("{v:.2}@{k}"),
                _ => "-".into(),
            };
            let offset = match spread.and_then(|sp| sp.positional_offset) {
                Some(sd) if s.positional_offset.is_some() => format!("{offset}±{sd:.2}"),
                _ => offset,
            };
            writeln!(
                f,
                "{:>5} {:>4} {:>w$} {:>w$} {:>w$} {:>6} {:>6} {:>6} {:>6} {:>6} {:>w$} {:>w$}  {}",
                s.layer,
                s.head,
                both(s.previous_token, spread.map(|sp| sp.previous_token)),
                both(s.first_token, spread.map(|sp| sp.first_token)),
                offset,
                cell(s.duplicate_token),
                cell(s.duplicate_control),
                cell(s.induction),
                cell(s.induction_control),
                cell(s.sink),
                both(s.local, spread.map(|sp| sp.local)),
                both(Some(s.entropy), spread.map(|sp| Some(sp.entropy))),
                s.label,
                w = wide
            )?;
        }
        write!(
            f,
            "\nscores: the mean fraction of each row's attention on the pattern's keys, over rows that have\n\
             one (TransformerLens head_detector, \"mul\"); entropy in nats. offset: the best k = 2..={MAX_OFFSET}\n\
             back (@k), over the rows where k back is not position 0 (at least {MIN_OFFSET_ROWS}). (ctl): the same\n\
             measure on a sequence that does not repeat. sink: attention to position 0 on the repeated\n\
             tokens. type: the first of induction >= 0.4, previous-token >= 0.5, positional-offset >= 0.5,\n\
             duplicate-token >= 0.4, first-token >= 0.5, local >= 0.6, broad (normalized entropy >= 0.7),\n\
             else mixed; induction and duplicate-token only when their control is at most a third of\n\
             their score, previous-token only when above first-token.\n"
        )
    }
}

/// Writes the table as aligned text or as JSON.
pub fn write_scores(
    table: &ScoreTable,
    model_name: &str,
    tokens: &Tokens,
    output: &Output,
) -> Result<()> {
    check_output(output)?;
    let report = table.report(model_name, tokens);
    let mut out = Out::open(output.path.as_deref())?;
    if output.format == Format::Json {
        out.json(&report.to_json())?;
        out.bytes(b"\n")?;
    } else {
        out.text(format_args!("{report}"))?;
    }
    out.finish()
}
