//! What a model trains on: token ids from a file (text, tokenised with the model's tokenizer, or
//! a 1-D `.npy` of ids) cut into windows, or a built-in task that makes its rows from a seed.
//!
//! Every batch is a function of the seed and the step alone, so a resumed run sees the batches
//! the uninterrupted one would have seen.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::rng::{hash_name, SplitMix64};
use crate::tokenizer::Tokenizer;

/// A built-in task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// `<eos> s₁ … s_L <eos> s₁ … s_L`: a random segment, then the same segment again; the loss
    /// is on the second copy (the first cannot be predicted).
    Copy,
    /// One segment of 4..60 distinct random ids appearing twice, after a random gap, inside
    /// uniform random filler; half the rows start with `<eos>`. Loss weight 1 on the tokens of
    /// the second copy that induction can predict, 0.1 on the rest: the recipe that formed
    /// `tests/fixtures/induction` (`scripts/train_heads.py`).
    Induction,
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "copy" => Ok(Self::Copy),
            "induction" => Ok(Self::Induction),
            _ => Err(Error::param(
                "task",
                format!("`{s}` is not a task: expected copy or induction"),
            )),
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Copy => "copy",
            Self::Induction => "induction",
        })
    }
}

/// Where the training data comes from, as the user gave it (recorded for `--resume`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSpec {
    File(PathBuf),
    Task(Task),
}

/// `B` rows of `T` inputs, their targets and (for tasks) each target's loss weight.
pub(crate) struct Batch {
    pub(crate) rows: usize,
    pub(crate) len: usize,
    /// (B·T) ids, row after row.
    pub(crate) inputs: Vec<u32>,
    pub(crate) targets: Vec<u32>,
    pub(crate) weights: Option<Vec<f32>>,
}

/// The data of a run.
pub(crate) enum Data {
    /// A file's ids: the first part trains, the held-out tail (a tenth, if that makes at least
    /// one window) evaluates.
    Tokens {
        train: Vec<u32>,
        held_out: Vec<u32>,
    },
    Task {
        task: Task,
        vocab: usize,
        eos: u32,
    },
}

/// Loss weight of the filler in [`Task::Induction`].
const FILLER_WEIGHT: f32 = 0.1;

impl Data {
    /// Opens `spec` for a model with `vocab` ids and end-of-text `eos`, windows of `len`
    /// tokens. A `.npy` file is read as ids; any other file as UTF-8 text, tokenised.
    pub(crate) fn open(
        spec: &DataSpec,
        tokenizer: &Tokenizer,
        vocab: usize,
        eos: u32,
        len: usize,
    ) -> Result<Self> {
        match spec {
            DataSpec::Task(task) => {
                if vocab < 4 {
                    return Err(Error::param(
                        "task",
                        format!("needs a vocabulary of at least 4 ids, the model has {vocab}"),
                    ));
                }
                Ok(Self::Task {
                    task: *task,
                    vocab,
                    eos,
                })
            }
            DataSpec::File(path) => {
                let ids = if path.extension().is_some_and(|e| e == "npy") {
                    read_npy_ids(path)?
                } else {
                    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                    tokenizer.encode(&text)?
                };
                if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab)
                {
                    return Err(Error::Input(format!(
                        "{}: token id {id} (at index {i}) is outside the model's vocabulary \
                         (vocab_size {vocab})",
                        path.display()
                    )));
                }
                if ids.len() < len + 1 {
                    return Err(Error::Input(format!(
                        "{}: {} tokens, shorter than one window of --seq-len {len} plus its \
                         target ({} tokens)",
                        path.display(),
                        ids.len(),
                        len + 1
                    )));
                }
                let tail = ids.len() / 10;
                let (train, held_out) = if tail > len && ids.len() - tail > len {
                    let mut train = ids;
                    let held_out = train.split_off(train.len() - tail);
                    (train, held_out)
                } else {
                    (ids, Vec::new())
                };
                Ok(Self::Tokens { train, held_out })
            }
        }
    }

    /// The training batch of `step`: `rows` × `len`. With `sequential`, row `r` of step `s` is
    /// window `w = s·B + r` (modulo the number of whole windows): inputs
    /// `ids[w·T .. w·T + T]`, targets one further. Otherwise each row starts at a random offset
    /// drawn from `seed` and the step, as nanoGPT's `get_batch`.
    pub(crate) fn batch(
        &self,
        step: u64,
        rows: usize,
        len: usize,
        sequential: bool,
        seed: u64,
    ) -> Batch {
        let mut rng = stream(seed, "batch", step);
        match self {
            Self::Tokens { train, .. } => {
                let windows = ((train.len() - 1) / len) as u64;
                let starts = (0..rows as u64).map(|r| {
                    if sequential {
                        (step.wrapping_mul(rows as u64).wrapping_add(r) % windows) as usize * len
                    } else {
                        rng.below((train.len() - len) as u64) as usize
                    }
                });
                windows_at(train, starts, len)
            }
            Self::Task { task, vocab, eos } => task_rows(*task, *vocab, *eos, rows, len, &mut rng),
        }
    }

    /// The held-out batch: the file's tail, a window after another (at most `rows`), or rows of
    /// the task from a seed no training step uses. `None` when a file is too short to hold out.
    pub(crate) fn held_out(&self, rows: usize, len: usize, seed: u64) -> Option<Batch> {
        match self {
            Self::Tokens { held_out, .. } => {
                let windows = held_out.len().saturating_sub(1) / len;
                if windows == 0 {
                    return None;
                }
                let starts = (0..rows.min(windows)).map(|w| w * len);
                Some(windows_at(held_out, starts, len))
            }
            Self::Task { task, vocab, eos } => {
                let mut rng = SplitMix64::new(seed ^ hash_name("held-out"));
                Some(task_rows(*task, *vocab, *eos, rows, len, &mut rng))
            }
        }
    }

    pub(crate) fn task(&self) -> Option<Task> {
        match self {
            Self::Task { task, .. } => Some(*task),
            Self::Tokens { .. } => None,
        }
    }
}

/// The generator of `what` (the batches, dropout's masks) at `step` of a run seeded `seed`: the
/// seed and the name mixed first, then the step, then mixed again, so that no two (seed, step)
/// pairs share a stream (a plain `seed ^ step` gives seed 0 step 1 the stream of seed 1 step 0).
pub(crate) fn stream(seed: u64, what: &str, step: u64) -> SplitMix64 {
    let base = SplitMix64::new(seed ^ hash_name(what)).next_u64();
    SplitMix64::new(SplitMix64::new(base ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64())
}

/// Windows of `len` inputs (and their targets, one further) starting at `starts`.
fn windows_at(ids: &[u32], starts: impl Iterator<Item = usize>, len: usize) -> Batch {
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut rows = 0;
    for s in starts {
        inputs.extend_from_slice(&ids[s..s + len]);
        targets.extend_from_slice(&ids[s + 1..s + len + 1]);
        rows += 1;
    }
    Batch {
        rows,
        len,
        inputs,
        targets,
        weights: None,
    }
}

/// A random id other than `eos`.
fn filler(rng: &mut SplitMix64, vocab: usize, eos: u32) -> u32 {
    let id = rng.below(vocab as u64 - 1) as u32;
    if id >= eos {
        id + 1
    } else {
        id
    }
}

/// `n` distinct random ids other than `eos` (n < vocab).
fn distinct(rng: &mut SplitMix64, vocab: usize, eos: u32, n: usize) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(n);
    while out.len() < n {
        let id = filler(rng, vocab, eos);
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// `rows` rows of `task`, each `len` + 1 tokens cut into inputs and targets, with the weight of
/// each target.
fn task_rows(
    task: Task,
    vocab: usize,
    eos: u32,
    rows: usize,
    len: usize,
    rng: &mut SplitMix64,
) -> Batch {
    let (mut inputs, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rows {
        // `row[i]` and the weight of predicting it (from row[..i]).
        let (row, weight) = match task {
            Task::Copy => copy_row(vocab, eos, len + 1, rng),
            Task::Induction => induction_row(vocab, eos, len + 1, rng),
        };
        inputs.extend_from_slice(&row[..len]);
        targets.extend_from_slice(&row[1..]);
        weights.extend_from_slice(&weight[1..]);
    }
    Batch {
        rows,
        len,
        inputs,
        targets,
        weights: Some(weights),
    }
}

/// `<eos> s <eos> s`, then `<eos>` to the end; weight 1 on the second `s`.
fn copy_row(vocab: usize, eos: u32, n: usize, rng: &mut SplitMix64) -> (Vec<u32>, Vec<f32>) {
    let seg = (n - 2) / 2;
    let s: Vec<u32> = (0..seg).map(|_| filler(rng, vocab, eos)).collect();
    let mut row = vec![eos];
    row.extend_from_slice(&s);
    row.push(eos);
    row.extend_from_slice(&s);
    row.resize(n, eos);
    let mut weight = vec![0.0; n];
    weight[seg + 2..2 * seg + 2].fill(1.0);
    (row, weight)
}

/// `scripts/train_heads.py`'s `make_batch` (no auxiliary task): filler, one segment twice.
fn induction_row(vocab: usize, eos: u32, n: usize, rng: &mut SplitMix64) -> (Vec<u32>, Vec<f32>) {
    const MIN_LEN: usize = 4;
    const MAX_LEN: usize = 60;
    let mut row: Vec<u32> = (0..n).map(|_| filler(rng, vocab, eos)).collect();
    let mut weight = vec![FILLER_WEIGHT; n];
    let start = if rng.below(2) == 0 {
        row[0] = eos;
        1
    } else {
        0
    };
    let room = n - start;
    let max = MAX_LEN.min(room / 2).min(vocab - 1);
    let min = MIN_LEN.min(max);
    let seg_len = min + rng.below((max - min + 1) as u64) as usize;
    let gap = rng.below((room - 2 * seg_len + 1) as u64) as usize;
    let s1 = start + rng.below((room - 2 * seg_len - gap + 1) as u64) as usize;
    let s2 = s1 + seg_len + gap;
    let seg = distinct(rng, vocab, eos, seg_len);
    row[s1..s1 + seg_len].copy_from_slice(&seg);
    row[s2..s2 + seg_len].copy_from_slice(&seg);
    // The second copy's first token cannot be predicted; the rest can.
    weight[(s2 + 1).min(s2 + seg_len)..s2 + seg_len].fill(1.0);
    (row, weight)
}

/// Rows of `len + 1` tokens: `<eos>`, then `L` distinct random ids twice (`L = len/2`), for
/// the loss on the predictable part of a repeated sequence (in-context learning): weight 1 on
/// the second copy after its first token.
pub(crate) fn repeated_rows(vocab: usize, eos: u32, rows: usize, len: usize, seed: u64) -> Batch {
    let mut rng = SplitMix64::new(seed ^ hash_name("repeated"));
    let seg = (len / 2).min(vocab - 1);
    let (mut inputs, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rows {
        let s = distinct(&mut rng, vocab, eos, seg);
        let mut row = vec![eos];
        row.extend_from_slice(&s);
        row.extend_from_slice(&s);
        row.resize(len + 1, eos);
        let mut w = vec![0.0f32; len + 1];
        let end = (2 * seg + 1).min(len + 1);
        w[(seg + 2).min(end)..end].fill(1.0);
        inputs.extend_from_slice(&row[..len]);
        targets.extend_from_slice(&row[1..]);
        weights.extend_from_slice(&w[1..]);
    }
    Batch {
        rows,
        len,
        inputs,
        targets,
        weights: Some(weights),
    }
}

/// The ids of a 1-D `.npy` array of uint16, int32, int64 (or uint32, uint8), little-endian; a
/// negative id is an error.
fn read_npy_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("npy version {v} is not supported"))),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("its header is cut short".into()))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = field("descr")
        .and_then(|d| d.strip_prefix('\'')?.split('\'').next())
        .ok_or_else(|| bad("its header has no descr".into()))?;
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(bad("a Fortran-ordered array is not supported".into()));
    }
    let shape = field("shape")
        .and_then(|s| s.strip_prefix('(')?.split(')').next())
        .ok_or_else(|| bad("its header has no shape".into()))?;
    let dims: Vec<&str> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let n: usize = match dims.as_slice() {
        [d] => d
            .parse()
            .map_err(|_| bad(format!("shape ({shape}) is not valid")))?,
        _ => {
            return Err(bad(format!(
                "the ids must be a 1-D array, not shape ({shape})"
            )))
        }
    };
    let data = &bytes[start + header_len..];
    let size = match descr {
        "|u1" | "<u1" => 1,
        "<u2" => 2,
        "<i4" | "<u4" => 4,
        "<i8" => 8,
        d => {
            return Err(bad(format!(
                "dtype {d}: token ids must be uint16, int32 or int64 (little-endian)"
            )))
        }
    };
    if data.len() != n.saturating_mul(size) {
        return Err(bad(format!(
            "holds {} bytes of data, its shape says {n} ids of {size} bytes",
            data.len()
        )));
    }
    data.chunks_exact(size)
        .enumerate()
        .map(|(i, c)| {
            let id: i64 = match (descr, c) {
                (_, [a]) => i64::from(*a),
                (_, [a, b]) => i64::from(u16::from_le_bytes([*a, *b])),
                ("<u4", c) => i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                (_, [a, b, c, d]) => i64::from(i32::from_le_bytes([*a, *b, *c, *d])),
                (_, c) => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
            };
            u32::try_from(id).map_err(|_| bad(format!("id {id} at index {i} is not a token id")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_windows_follow_the_documented_rule_and_wrap() {
        let ids: Vec<u32> = (0..23).collect();
        let data = Data::Tokens {
            train: ids,
            held_out: vec![],
        };
        // 22 / 5 = 4 whole windows; step 1 rows 0..3 are windows 3, 4 % 4 = 0, 1.
        let b = data.batch(1, 3, 5, true, 0);
        assert_eq!(&b.inputs[..5], &[15, 16, 17, 18, 19]);
        assert_eq!(&b.targets[..5], &[16, 17, 18, 19, 20]);
        assert_eq!(&b.inputs[5..10], &[0, 1, 2, 3, 4]);
        assert_eq!(&b.inputs[10..], &[5, 6, 7, 8, 9]);
    }

    #[test]
    fn task_rows_weigh_only_what_can_be_predicted() {
        let mut rng = SplitMix64::new(1);
        let (row, w) = copy_row(16, 15, 11, &mut rng);
        // <eos> a b c d <eos> a b c d <eos>
        assert_eq!(row[0], 15);
        assert_eq!(row[5], 15);
        assert_eq!(&row[1..5], &row[6..10]);
        assert_eq!(w.iter().sum::<f32>(), 4.0);
        assert!(w[6..10].iter().all(|&x| x == 1.0));
        for seed in 0..50 {
            let (row, w) = induction_row(512, 511, 129, &mut SplitMix64::new(seed));
            let ones: Vec<usize> = (0..129).filter(|&i| w[i] == 1.0).collect();
            // The predictable tokens each repeat the token that followed an earlier copy of
            // their predecessor.
            for &i in &ones {
                assert!((0..i - 1).any(|j| row[j] == row[i - 1] && row[j + 1] == row[i]));
            }
            assert!(ones.len() >= 3);
        }
    }
}
