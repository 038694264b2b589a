//! Head-score metrics: the detection patterns, the scores of one head's attention against them,
//! and the label of its dominant type. Pure functions of attention matrices; [`super`] runs the
//! model and writes the table.
//!
//! A detection pattern marks, for each query row, the keys a head of that kind attends to
//! (TransformerLens `head_detector.py`: `get_previous_token_head_detection_pattern`,
//! `get_duplicate_token_head_detection_pattern`, `get_induction_head_detection_pattern`).
//! TransformerLens' "mul" measure is `(A * P).sum() / A.sum()` ([`tl_mul_score`]): since rows sum
//! to 1, the mean over all T rows of the fraction of each row's attention on the pattern's keys.
//! Rows where the pattern has no key (row 0 for the previous token, a token's first occurrence
//! for duplicates) count as 0 there, so a perfect previous-token head scores (T-1)/T and a perfect
//! duplicate-token head scores the share of repeated tokens. [`Pattern::score`] takes the same
//! fraction but averages only over rows that have a key, so a perfect head of any kind scores 1 on
//! any prompt; TransformerLens' number is `score * pattern.rows() / T`.
//!
//! Previous-token, first-token and local scores and entropy are measured on the prompt;
//! duplicate-token and induction scores on [`REPEAT_LEN`] seeded random tokens repeated twice,
//! where every row of the second copy has exactly one duplicate (the same token one copy back)
//! and one induction target (the token after it): the induction score is then the mean attention
//! from the second copy's positions to the token after the previous occurrence, as in
//! TransformerLens' induction-head tutorials.

use std::collections::HashSet;
use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Length of each copy of the random sequence for duplicate-token and induction scores (as in
/// TransformerLens' tutorials); shorter when the context cannot hold two copies.
pub const REPEAT_LEN: usize = 50;
/// Seed of that sequence: every run measures on the same tokens.
pub const REPEAT_SEED: u64 = 0x5EED_1D0C;
/// A local head keeps its attention on the current token and the `LOCAL_WINDOW` before it.
pub const LOCAL_WINDOW: usize = 3;
/// Positional-offset heads are looked for at offsets `2..=MAX_OFFSET` (1 is previous-token).
pub const MAX_OFFSET: usize = 8;
/// An offset is scored only on prompts with at least this many rows whose key that far back is
/// not position 0: a head fixed on one position matches any offset on one row, so it scores at
/// most a third, below the threshold.
pub const MIN_OFFSET_ROWS: usize = 3;
/// Seed of the control sequence: as many distinct random tokens as the repeated one, no repeat.
pub const CONTROL_SEED: u64 = 0xC047_201D;
/// An induction or duplicate-token score counts only when the control (the same key positions
/// on a sequence that does not repeat) is at most this fraction of it: a head that reads a fixed
/// offset back scores the same on both and is positional, not induction.
pub const CONTROL_RATIO: f32 = 1.0 / 3.0;

/// Thresholds of [`classify`], tried in this order; the first type whose score reaches its
/// threshold is the head's label. Mechanisms come before resting: an induction head rests on the
/// first token when there is nothing to copy, and is still an induction head.
pub const THRESHOLDS: [(HeadType, f32); 7] = [
    (HeadType::Induction, 0.4),
    (HeadType::PreviousToken, 0.5),
    (HeadType::PositionalOffset, 0.5),
    (HeadType::DuplicateToken, 0.4),
    (HeadType::FirstToken, 0.5),
    (HeadType::Local, 0.6),
    (HeadType::Broad, 0.7),
];

/// For each query row, the keys that a head of one kind attends to.
#[derive(Debug, Clone)]
pub struct Pattern {
    keys: Vec<Vec<usize>>,
}

impl Pattern {
    /// Row `q` → key `q - 1`; row 0 has none.
    pub fn previous_token(t: usize) -> Self {
        Self::from_fn(t, |q| if q > 0 { vec![q - 1] } else { vec![] })
    }

    /// Rows `q ≥ 1` → key 0, where heads with nothing to do rest (row 0 has no other choice).
    pub fn first_token(t: usize) -> Self {
        Self::from_fn(t, |q| if q > 0 { vec![0] } else { vec![] })
    }

    /// Row `q` → every earlier position holding the same token.
    pub fn duplicate_token(ids: &[u32]) -> Self {
        Self::from_fn(ids.len(), |q| {
            (0..q).filter(|&k| ids[k] == ids[q]).collect()
        })
    }

    /// Row `q` → the position after each earlier occurrence of its token (TransformerLens:
    /// duplicates shifted one key right, kept on or below the diagonal).
    pub fn induction(ids: &[u32]) -> Self {
        Self::from_fn(ids.len(), |q| {
            (0..q)
                .filter(|&k| ids[k] == ids[q])
                .map(|k| k + 1)
                .collect()
        })
    }

    /// Row `q` → key `q - k` for `q > k`: a head that reads a fixed distance back. Never key 0,
    /// where resting heads look from every row: on T tokens, a head on position 0 would read
    /// T - 1 back.
    pub fn offset(t: usize, k: usize) -> Self {
        Self::from_fn(t, |q| if q > k { vec![q - k] } else { vec![] })
    }

    /// Row `q` → keys `q - window ..= q`, for rows where that window is at most half of the keys
    /// the row can see (on earlier rows any head looks local).
    pub fn local(t: usize, window: usize) -> Self {
        Self::from_fn(t, |q| {
            if q + 1 >= 2 * (window + 1) {
                (q - window..=q).collect()
            } else {
                vec![]
            }
        })
    }

    fn from_fn(t: usize, keys: impl Fn(usize) -> Vec<usize>) -> Self {
        Self {
            keys: (0..t).map(keys).collect(),
        }
    }

    /// Rows with at least one key.
    pub fn rows(&self) -> usize {
        self.keys.iter().filter(|k| !k.is_empty()).count()
    }

    /// The (T, T) 0/1 matrix TransformerLens uses.
    pub fn dense(&self) -> Vec<f32> {
        let t = self.keys.len();
        let mut p = vec![0.0; t * t];
        for (q, keys) in self.keys.iter().enumerate() {
            keys.iter().for_each(|&k| p[q * t + k] = 1.0);
        }
        p
    }

    /// The fraction of row `q`'s attention on its keys; `None` when the row has none.
    pub fn row_score(&self, q: usize, row: &[f32]) -> Option<f64> {
        let keys = self.keys.get(q).filter(|k| !k.is_empty())?;
        let total: f64 = row.iter().map(|&w| w as f64).sum();
        (total > 0.0).then(|| keys.iter().map(|&k| row[k] as f64).sum::<f64>() / total)
    }

    /// Mean, over rows with keys, of the fraction of the row's attention on them; `None` when no
    /// row has a key. `attn` is one head's (T, T) pattern, row-major.
    pub fn score(&self, attn: &[f32]) -> Option<f32> {
        let t = self.keys.len();
        let mut mean = Mean::default();
        for q in 0..t {
            mean.add(self.row_score(q, &attn[q * t..(q + 1) * t]));
        }
        mean.get()
    }
}

/// A running mean that skips missing values.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    n: usize,
}

impl Mean {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.sum += v;
            self.n += 1;
        }
    }

    /// `None` when nothing was added.
    fn get(&self) -> Option<f32> {
        (self.n > 0).then(|| (self.sum / self.n as f64) as f32)
    }
}

/// TransformerLens' `compute_head_attention_similarity_score` with `error_measure="mul"`:
/// `(A * P).sum() / A.sum()` after zeroing key column 0 (`exclude_bos`) and the diagonal
/// (`exclude_current_token`) of `A`. Both are (T, T) row-major.
pub fn tl_mul_score(
    attn: &[f32],
    detection: &[f32],
    t: usize,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> f32 {
    let (mut hit, mut total) = (0.0f64, 0.0f64);
    for q in 0..t {
        for k in 0..t {
            if (exclude_bos && k == 0) || (exclude_current_token && k == q) {
                continue;
            }
            let a = attn[q * t + k] as f64;
            hit += a * detection[q * t + k] as f64;
            total += a;
        }
    }
    (hit / total) as f32
}

/// Entropy of one row, `-Σ p ln p` in nats.
pub fn row_entropy(row: &[f32]) -> f64 {
    -row.iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p as f64 * (p as f64).ln())
        .sum::<f64>()
}

/// Mean attention entropy over the rows, in nats: 0 when every row looks at one key.
pub fn entropy(attn: &[f32], t: usize) -> f32 {
    (attn.chunks(t).map(row_entropy).sum::<f64>() / t as f64) as f32
}

/// Row `q`'s entropy divided by `ln(q + 1)`, its largest possible value; `None` for row 0.
fn row_normalized_entropy(q: usize, row: &[f32]) -> Option<f64> {
    (q > 0).then(|| row_entropy(row) / ((q + 1) as f64).ln())
}

/// Mean over rows `q ≥ 1` of the row's entropy divided by `ln(q + 1)`, its largest possible
/// value: 1 for attention spread evenly over the past, 0 for one key; `None` for one token.
pub fn normalized_entropy(attn: &[f32], t: usize) -> Option<f32> {
    let mut mean = Mean::default();
    for (q, row) in attn.chunks(t).enumerate() {
        mean.add(row_normalized_entropy(q, row));
    }
    mean.get()
}

/// The dominant kind of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadType {
    /// Attends to the token after the previous occurrence of the current token.
    Induction,
    /// Attends to the token just before.
    PreviousToken,
    /// Attends to the token a fixed k ≥ 2 positions back (`offset_k`).
    PositionalOffset,
    /// Attends to earlier copies of the current token.
    DuplicateToken,
    /// Rests on the first token (position 0, `<|endoftext|>` with `--bos`).
    FirstToken,
    /// Attends to the last few tokens.
    Local,
    /// Spreads its attention over the whole past.
    Broad,
    /// None of the above dominates.
    Mixed,
}

impl HeadType {
    /// The label as it appears in JSON: `previous-token`, `first-token`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Self::Induction => "induction",
            Self::PreviousToken => "previous-token",
            Self::PositionalOffset => "positional-offset",
            Self::DuplicateToken => "duplicate-token",
            Self::FirstToken => "first-token",
            Self::Local => "local",
            Self::Broad => "broad",
            Self::Mixed => "mixed",
        }
    }
}

impl fmt::Display for HeadType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FirstToken => f.write_str("first-token (resting)"),
            kind => f.write_str(kind.name()),
        }
    }
}

/// One head's scores; `None` where the prompt is too short for the pattern to have a row.
#[derive(Debug, Clone, Serialize)]
pub struct HeadScores {
    pub layer: usize,
    pub head: usize,
    /// On the prompt: attention to the previous token.
    pub previous_token: Option<f32>,
    /// On the prompt: attention to position 0, over rows `q ≥ 1` (the sink, or resting, mass).
    pub first_token: Option<f32>,
    /// On the prompt: attention to the token `offset_k` back, the best offset in
    /// `2..=MAX_OFFSET`, over rows where that token is not position 0 (at least
    /// [`MIN_OFFSET_ROWS`] of them).
    pub positional_offset: Option<f32>,
    pub offset_k: Option<usize>,
    /// On the repeated random tokens: attention to the same token one copy back.
    pub duplicate_token: Option<f32>,
    /// On the repeated random tokens: attention to the token after the previous occurrence.
    pub induction: Option<f32>,
    /// The same two measures on the control sequence (distinct tokens, nothing repeats): what a
    /// head gets from position alone.
    pub duplicate_control: Option<f32>,
    pub induction_control: Option<f32>,
    /// On the repeated random tokens: attention to position 0 (how much the head rests while
    /// it could copy).
    pub sink: Option<f32>,
    /// On the prompt: attention to the current token and the [`LOCAL_WINDOW`] before it.
    pub local: Option<f32>,
    /// On the prompt: mean attention entropy over rows, in nats.
    pub entropy: f32,
    /// On the prompt: see [`normalized_entropy`].
    pub normalized_entropy: Option<f32>,
    pub label: HeadType,
}

impl HeadScores {
    fn score_of(&self, kind: HeadType) -> Option<f32> {
        // A repetition score that the control matches is position, not content.
        let content = |score: Option<f32>, control: Option<f32>| {
            score.filter(|&s| control.is_none_or(|c| c <= s * CONTROL_RATIO))
        };
        match kind {
            HeadType::Induction => content(self.induction, self.induction_control),
            // Row 1's previous token is position 0: on a short prompt a resting head scores as
            // much there as on the first token, and is no previous-token head.
            HeadType::PreviousToken => self
                .previous_token
                .filter(|&p| self.first_token.is_none_or(|f| p > f)),
            HeadType::PositionalOffset => self.positional_offset,
            HeadType::DuplicateToken => content(self.duplicate_token, self.duplicate_control),
            HeadType::FirstToken => self.first_token,
            HeadType::Local => self.local,
            HeadType::Broad => self.normalized_entropy,
            HeadType::Mixed => None,
        }
    }
}

/// The first type in [`THRESHOLDS`] whose score reaches its threshold (induction and
/// duplicate-token only when their control is at most [`CONTROL_RATIO`] of them, previous-token
/// only when above first-token), else [`HeadType::Mixed`].
pub fn classify(s: &HeadScores) -> HeadType {
    THRESHOLDS
        .iter()
        .find(|(kind, min)| s.score_of(*kind).is_some_and(|v| v >= *min))
        .map_or(HeadType::Mixed, |&(kind, _)| kind)
}

/// The patterns of every score, for a prompt of `t` tokens and the repeated sequence `repeated`.
pub struct Detectors {
    t: usize,
    previous: Pattern,
    first: Pattern,
    local: Pattern,
    offsets: Vec<Pattern>,
    duplicate: Pattern,
    induction: Pattern,
    sink: Pattern,
}

impl Detectors {
    pub fn new(t: usize, repeated: &[u32]) -> Self {
        Self {
            t,
            previous: Pattern::previous_token(t),
            first: Pattern::first_token(t),
            local: Pattern::local(t, LOCAL_WINDOW),
            offsets: (2..=MAX_OFFSET).map(|k| Pattern::offset(t, k)).collect(),
            duplicate: Pattern::duplicate_token(repeated),
            induction: Pattern::induction(repeated),
            sink: Pattern::first_token(repeated.len()),
        }
    }

    /// Scores of one head from its pattern on the prompt and on the repeated sequence; labelled.
    pub fn scores(
        &self,
        layer: usize,
        head: usize,
        prompt: &[f32],
        repeated: &[f32],
    ) -> HeadScores {
        self.scores_with_control(layer, head, prompt, repeated, None)
    }

    /// [`Detectors::scores`], with the head's pattern on the control sequence (as long as the
    /// repeated one) for the induction and duplicate-token controls.
    pub fn scores_with_control(
        &self,
        layer: usize,
        head: usize,
        prompt: &[f32],
        repeated: &[f32],
        control: Option<&[f32]>,
    ) -> HeadScores {
        let mut rows = PromptRows::new(self);
        for (q, row) in prompt.chunks(self.t).enumerate() {
            rows.add(self, q, row);
        }
        self.finish(layer, head, &rows, repeated, control)
    }

    /// Scores of one head from its prompt rows, already summed, and its patterns on the repeated
    /// and control sequences; labelled.
    pub(super) fn finish(
        &self,
        layer: usize,
        head: usize,
        rows: &PromptRows,
        repeated: &[f32],
        control: Option<&[f32]>,
    ) -> HeadScores {
        // The best offset with enough rows; the smaller k on ties.
        let best = rows
            .offsets
            .iter()
            .enumerate()
            .filter(|(_, m)| m.n >= MIN_OFFSET_ROWS)
            .filter_map(|(i, m)| m.get().map(|v| (i + 2, v)))
            .fold(None, |b: Option<(usize, f32)>, (k, v)| match b {
                Some((_, bv)) if bv >= v => b,
                _ => Some((k, v)),
            });
        let mut s = HeadScores {
            layer,
            head,
            previous_token: rows.previous.get(),
            first_token: rows.first.get(),
            positional_offset: best.map(|b| b.1),
            offset_k: best.map(|b| b.0),
            duplicate_token: self.duplicate.score(repeated),
            induction: self.induction.score(repeated),
            duplicate_control: control.and_then(|c| self.duplicate.score(c)),
            induction_control: control.and_then(|c| self.induction.score(c)),
            sink: self.sink.score(repeated),
            local: rows.local.get(),
            entropy: rows.entropy.get().unwrap_or(0.0),
            normalized_entropy: rows.normalized_entropy.get(),
            label: HeadType::Mixed,
        };
        s.label = classify(&s);
        s
    }
}

/// One head's prompt scores, summed a query row at a time, so the prompt's attention can arrive
/// in blocks of rows.
#[derive(Debug, Clone, Default)]
pub(super) struct PromptRows {
    previous: Mean,
    first: Mean,
    local: Mean,
    offsets: Vec<Mean>,
    entropy: Mean,
    normalized_entropy: Mean,
}

impl PromptRows {
    pub(super) fn new(d: &Detectors) -> Self {
        Self {
            offsets: vec![Mean::default(); d.offsets.len()],
            ..Self::default()
        }
    }

    pub(super) fn add(&mut self, d: &Detectors, q: usize, row: &[f32]) {
        self.previous.add(d.previous.row_score(q, row));
        self.first.add(d.first.row_score(q, row));
        self.local.add(d.local.row_score(q, row));
        for (m, p) in self.offsets.iter_mut().zip(&d.offsets) {
            m.add(p.row_score(q, row));
        }
        self.entropy.add(Some(row_entropy(row)));
        self.normalized_entropy.add(row_normalized_entropy(q, row));
    }
}

/// `len` distinct seeded random ids below `vocab`, none of them in `skip`, twice over.
pub fn repeated_random_tokens(
    vocab: usize,
    skip: &[u32],
    len: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    let once = distinct_random_tokens(vocab, skip, len, seed)?;
    Ok([once.clone(), once].concat())
}

/// `len` distinct seeded random ids below `vocab`, none of them in `skip`.
pub fn distinct_random_tokens(
    vocab: usize,
    skip: &[u32],
    len: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    let usable = (0..vocab as u32).filter(|id| !skip.contains(id)).count();
    if usable < len {
        return Err(Error::Input(format!(
            "the vocabulary has {usable} usable tokens, fewer than the {len} the induction test needs"
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let mut seen = HashSet::new();
    let mut once = Vec::with_capacity(len);
    while once.len() < len {
        let id = rng.below(vocab as u64) as u32;
        if !skip.contains(&id) && seen.insert(id) {
            once.push(id);
        }
    }
    Ok(once)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A (T, T) pattern whose row `q` spreads evenly over `keys(q)`.
    fn attn(t: usize, keys: impl Fn(usize) -> Vec<usize>) -> Vec<f32> {
        let mut a = vec![0.0; t * t];
        for q in 0..t {
            let ks = keys(q);
            for &k in &ks {
                a[q * t + k] += 1.0 / ks.len() as f32;
            }
        }
        a
    }

    fn prev(t: usize) -> Vec<f32> {
        attn(t, |q| vec![q.saturating_sub(1)])
    }

    const T: usize = 12;
    const L: usize = 10;

    fn repeated() -> Vec<u32> {
        repeated_random_tokens(100, &[0], L, 3).unwrap_or_default()
    }

    fn close(a: Option<f32>, b: f32) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-6)
    }

    #[test]
    fn pure_previous_token_head() {
        let d = Detectors::new(T, &repeated());
        let s = d.scores(0, 0, &prev(T), &prev(2 * L));
        assert!(close(s.previous_token, 1.0), "{s:?}");
        assert!(
            close(s.induction, 0.0) && close(s.duplicate_token, 0.0),
            "{s:?}"
        );
        // Only row 1's previous token is the first token.
        assert!(close(s.first_token, 1.0 / (T - 1) as f32), "{s:?}");
        assert_eq!(s.entropy, 0.0);
        assert_eq!(s.label, HeadType::PreviousToken);
        // TransformerLens counts row 0, which has no previous token.
        let tl = tl_mul_score(
            &prev(T),
            &Pattern::previous_token(T).dense(),
            T,
            false,
            false,
        );
        assert!((tl - (T - 1) as f32 / T as f32).abs() < 1e-6, "{tl}");
    }

    #[test]
    fn pure_first_token_head() {
        let d = Detectors::new(T, &repeated());
        let s = d.scores(0, 0, &attn(T, |_| vec![0]), &attn(2 * L, |_| vec![0]));
        assert!(
            close(s.first_token, 1.0) && close(s.induction, 0.0),
            "{s:?}"
        );
        assert_eq!(s.label, HeadType::FirstToken);
        assert_eq!(s.entropy, 0.0);
    }

    #[test]
    fn induction_and_duplicate_heads_on_the_repeated_sequence() {
        let ids = repeated();
        assert_eq!(ids.len(), 2 * L);
        assert_eq!(ids[..L], ids[L..]);
        let d = Detectors::new(T, &ids);
        let rest = attn(T, |_| vec![0]);
        // Second copy: one copy back, plus one; the first copy rests on token 0.
        let induction = attn(2 * L, |q| vec![if q >= L { q - L + 1 } else { 0 }]);
        let s = d.scores(1, 2, &rest, &induction);
        assert!(
            close(s.induction, 1.0) && close(s.duplicate_token, 0.0),
            "{s:?}"
        );
        assert_eq!(s.label, HeadType::Induction);
        let duplicate = attn(2 * L, |q| vec![q.saturating_sub(L)]);
        let s = d.scores(1, 3, &rest, &duplicate);
        assert!(
            close(s.duplicate_token, 1.0) && close(s.induction, 0.0),
            "{s:?}"
        );
        assert_eq!(s.label, HeadType::DuplicateToken);
        // Half the second copy's attention on the target: 0.5.
        let half = attn(2 * L, |q| if q >= L { vec![q - L + 1, 0] } else { vec![0] });
        assert!(close(d.scores(0, 0, &rest, &half).induction, 0.5));
    }

    #[test]
    fn uniform_heads_are_broad_and_local_heads_local() {
        let d = Detectors::new(T, &repeated());
        let uniform = attn(T, |q| (0..=q).collect());
        let u = attn(2 * L, |q| (0..=q).collect());
        let s = d.scores(0, 0, &uniform, &u);
        let want: f64 = (0..T).map(|q| ((q + 1) as f64).ln()).sum::<f64>() / T as f64;
        assert!((s.entropy as f64 - want).abs() < 1e-5, "{s:?}");
        assert!(close(s.normalized_entropy, 1.0), "{s:?}");
        assert_eq!(s.label, HeadType::Broad);
        let local = attn(T, |q| (q.saturating_sub(LOCAL_WINDOW)..=q).collect());
        let s = d.scores(0, 0, &local, &u);
        assert!(
            close(s.local, 1.0) && s.previous_token.is_some_and(|p| p < 0.5),
            "{s:?}"
        );
        assert_eq!(s.label, HeadType::Local);
    }

    #[test]
    fn patterns_follow_transformer_lens() {
        let ids = [5, 7, 5, 5, 9, 7];
        // get_duplicate_token_head_detection_pattern: equal tokens strictly below the diagonal.
        let dup = Pattern::duplicate_token(&ids);
        assert_eq!(
            dup.keys,
            [vec![], vec![], vec![0], vec![0, 2], vec![], vec![1]]
        );
        // get_induction_head_detection_pattern: that, one key to the right, on or below the diagonal.
        let ind = Pattern::induction(&ids);
        assert_eq!(
            ind.keys,
            [vec![], vec![], vec![1], vec![1, 3], vec![], vec![2]]
        );
        assert_eq!(ind.rows(), 3);
        let d = ind.dense();
        assert_eq!(d[3 * 6 + 3], 1.0);
        assert_eq!(d.iter().sum::<f32>(), 4.0);
        // TransformerLens' score divides by all of A; ours averages the rows with keys.
        let a = attn(6, |q| (0..=q).collect());
        let tl = tl_mul_score(&a, &d, 6, false, false);
        let by_hand = (1.0 / 3.0 + 2.0 / 4.0 + 1.0 / 6.0) / 6.0;
        assert!((tl - by_hand).abs() < 1e-6, "{tl} {by_hand}");
        let ours = ind.score(&a).unwrap_or_default();
        assert!((ours * 3.0 / 6.0 - tl).abs() < 1e-6);
        // exclude_bos drops key 0 from numerator and denominator.
        let first = Pattern::first_token(6).dense();
        assert_eq!(tl_mul_score(&a, &first, 6, true, false), 0.0);
        let tl_cur = tl_mul_score(&a, &Pattern::previous_token(6).dense(), 6, false, true);
        let num: f32 = (1..6).map(|q| 1.0 / (q + 1) as f32).sum();
        let den: f32 = (1..6).map(|q| q as f32 / (q + 1) as f32).sum();
        assert!((tl_cur - num / den).abs() < 1e-6);
    }

    #[test]
    fn one_token_prompts_have_no_row_scores() {
        let d = Detectors::new(1, &repeated());
        let s = d.scores(0, 0, &[1.0], &prev(2 * L));
        assert_eq!(
            (s.previous_token, s.first_token, s.local),
            (None, None, None)
        );
        assert_eq!(s.normalized_entropy, None);
        assert_eq!(s.label, HeadType::Mixed);
    }

    #[test]
    fn random_sequence_is_seeded_and_skips_specials() -> Result<()> {
        let a = repeated_random_tokens(50, &[49], 40, 1)?;
        assert_eq!(a, repeated_random_tokens(50, &[49], 40, 1)?);
        assert_ne!(a, repeated_random_tokens(50, &[49], 40, 2)?);
        assert!(!a.contains(&49));
        assert_eq!(a[..40].iter().collect::<HashSet<_>>().len(), 40);
        assert!(repeated_random_tokens(10, &[0], 10, 1).is_err());
        Ok(())
    }

    #[test]
    fn resting_heads_are_not_offset_heads_on_any_prompt_length() {
        let rest = attn(2 * L, |_| vec![0]);
        // Row k reads position 0 from k back (row 1 from one back): that is resting, not a
        // previous-token or positional-offset head, however long the prompt.
        for t in 2..=T {
            let d = Detectors::new(t, &repeated());
            let s = d.scores(1, 0, &attn(t, |_| vec![0]), &rest);
            assert_eq!(s.label, HeadType::FirstToken, "{t} tokens: {s:?}");
            assert!(s.positional_offset.is_none_or(|v| v == 0.0), "{s:?}");
        }
        // A head fixed on position 1 matches each offset on one row only.
        let d = Detectors::new(8, &repeated());
        let second = attn(8, |q| vec![q.min(1)]);
        let s = d.scores(1, 0, &second, &rest);
        assert_ne!(s.label, HeadType::PositionalOffset, "{s:?}");
        assert!(s.positional_offset.is_some_and(|v| v < 0.5), "{s:?}");
    }

    #[test]
    fn offset_heads_and_the_induction_control() {
        let ids = repeated();
        let d = Detectors::new(T, &ids);
        // Three back, exactly: positional-offset, k = 3.
        let back3 = attn(T, |q| vec![q.saturating_sub(3)]);
        let rest = attn(2 * L, |_| vec![0]);
        let s = d.scores(0, 0, &back3, &rest);
        assert_eq!(
            (s.offset_k, s.label),
            (Some(3), HeadType::PositionalOffset),
            "{s:?}"
        );
        assert!(close(s.positional_offset, 1.0));
        // A head that reads L - 1 back scores as induction on the repeated sequence, but equally
        // on the control, where nothing repeats: positional, not induction.
        let reader = attn(2 * L, |q| vec![if q >= L { q - L + 1 } else { 0 }]);
        let s = d.scores_with_control(0, 0, &rest[..T * T], &reader, Some(&reader));
        assert!(
            close(s.induction, 1.0) && close(s.induction_control, 1.0),
            "{s:?}"
        );
        assert_ne!(s.label, HeadType::Induction);
        // A real induction head rests on the first token of the control.
        let s = d.scores_with_control(0, 0, &attn(T, |_| vec![0]), &reader, Some(&rest));
        assert_eq!(s.label, HeadType::Induction, "{s:?}");
        assert!(close(s.induction_control, 0.0));
        // The sink: attention to position 0 on the repeated tokens.
        assert!(close(s.sink, (L - 1) as f32 / (2 * L - 1) as f32), "{s:?}");
    }
}
