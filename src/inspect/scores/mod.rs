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

/// Scores of every selected head, and the random sequence they were partly measured on.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreTable {
    pub heads: Vec<HeadScores>,
    /// Length of each copy of the random sequence.
    pub repeat_len: usize,
    /// The sequence itself: `<|endoftext|>` first with `--bos`, then the random tokens twice.
    pub repeated_token_ids: Vec<u32>,
}

/// Runs the prompt and the repeated random sequence (with the prompt's BOS, if it has one)
/// through the model and scores every selected head.
pub fn head_scores(model: &Gpt2, tokens: &Tokens, selection: &Selection) -> Result<ScoreTable> {
    let config = model.config();
    let bos = tokens.bos.then(|| tokens.ids[0]);
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
    let detectors = Detectors::new(tokens.len(), &repeated);

    // The prompt, however long, a block of rows at a time; the repeated sequence is short.
    let n_heads = selection.heads.len();
    let mut rows = vec![PromptRows::default(); selection.layers.len() * n_heads];
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
    let mut summed = rows.iter();
    for_each_layer(model, &repeated, selection, |a| {
        for (i, &head) in a.heads.iter().enumerate() {
            let r = summed
                .next()
                .ok_or_else(|| Error::Input("layers differ between passes".into()))?;
            heads.push(detectors.finish(a.layer, head, r, a.head(i)));
        }
        Ok(())
    })?;
    Ok(ScoreTable {
        heads,
        repeat_len: len,
        repeated_token_ids: repeated,
    })
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
            "local_window": LOCAL_WINDOW,
            "thresholds": thresholds,
            "heads": self.table.heads,
        })
    }
}

impl fmt::Display for ScoreReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} prompt tokens; duplicate-token and induction on {} random tokens repeated twice\n",
            self.model,
            self.tokens.len(),
            self.table.repeat_len
        )?;
        writeln!(
            f,
            "{:>5} {:>4} {:>6} {:>6} {:>6} {:>7} {:>6} {:>8}  type",
            "layer", "head", "prev", "first", "dup", "induct", "local", "entropy"
        )?;
        let cell = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        for s in &self.table.heads {
            writeln!(
                f,
                "{:>5} {:>4} {:>6} {:>6} {:>6} {:>7} {:>6} {:>8.2}  {}",
                s.layer,
                s.head,
                cell(s.previous_token),
                cell(s.first_token),
                cell(s.duplicate_token),
                cell(s.induction),
                cell(s.local),
                s.entropy,
                s.label
            )?;
        }
        write!(
            f,
            "\nscores: the mean fraction of each row's attention on the pattern's keys, over rows that have\n\
             one (TransformerLens head_detector, \"mul\"); entropy in nats. type: the first of induction >= 0.4,\n\
             previous-token >= 0.5, duplicate-token >= 0.4, first-token >= 0.5, local >= 0.6, broad\n\
             (normalized entropy >= 0.7), else mixed\n"
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
