//! Finding the phase change in a run's evaluations: the few steps in which induction heads form.
//! Olsson et al. (2022) saw it as a sudden jump in the heads' prefix-matching (induction) score
//! that comes with a sharp drop of the in-context loss (and a bump in the training loss).
//!
//! The rule, on the evaluations in step order (`b` = the best induction score over all heads at
//! an evaluation, `icl` = the in-context loss):
//! 1. The steepest interval: the pair of consecutive evaluations where `b` rises most (the
//!    first of equals). None when `b` never rises.
//! 2. The window: that interval, widened on both sides over the adjacent intervals that still
//!    rise by at least [`STEEP_SHARE`] of the steepest one, so a jump seen over two or three
//!    evaluations is measured whole.
//! 3. It is a phase change when, from the window's first evaluation to its last,
//!    - `b` rises by at least [`INDUCTION_RISE`],
//!    - `icl` falls by at least [`ICL_DROP`] of its value before,
//!    - and the window spans at most half of the evaluated steps (first to last evaluation):
//!      a rise spread over the whole run is gradual, not a phase change. With two evaluations
//!      nothing is ever sudden.
//!
//! The heads reported are those whose induction or previous-token score rose by at least
//! [`HEAD_RISE`] across the window (induction heads need a previous-token head beside them),
//! the largest rise first.

use std::fmt;

use serde::Serialize;

use super::{EvalLine, HeadLine};

/// The least rise of the best induction score across the window.
pub const INDUCTION_RISE: f32 = 0.3;
/// The least drop of the in-context loss across the window, as a fraction of its value before.
pub const ICL_DROP: f64 = 0.2;
/// Adjacent intervals join the window while they rise by this share of the steepest one.
pub const STEEP_SHARE: f32 = 1.0 / 3.0;
/// A head is reported when its induction or previous-token score rose by this much.
pub const HEAD_RISE: f32 = 0.2;

/// One head's scores before and after the phase change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadChange {
    pub layer: usize,
    pub head: usize,
    pub induction_before: Option<f32>,
    pub induction_after: Option<f32>,
    pub previous_token_before: Option<f32>,
    pub previous_token_after: Option<f32>,
    /// The head's label at the window's last evaluation.
    pub label: String,
}

impl HeadChange {
    fn rise(&self) -> f32 {
        let d = |a: Option<f32>, b: Option<f32>| match (a, b) {
            (Some(a), Some(b)) => b - a,
            _ => f32::NEG_INFINITY,
        };
        d(self.induction_before, self.induction_after)
            .max(d(self.previous_token_before, self.previous_token_after))
    }
}

/// A phase change: where, how much the losses moved, which heads formed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseChange {
    /// The evaluation that ends the steepest interval: the first one that sees the jump.
    pub step: u64,
    /// The window's first and last evaluations (see the module's rule).
    pub from_step: u64,
    pub to_step: u64,
    pub icl_loss_before: f64,
    pub icl_loss_after: f64,
    /// The training loss of the step evaluated (when the log has it).
    pub train_loss_before: Option<f64>,
    pub train_loss_after: Option<f64>,
    pub held_out_loss_before: Option<f64>,
    pub held_out_loss_after: Option<f64>,
    /// The best induction score over all heads.
    pub best_induction_before: f32,
    pub best_induction_after: f32,
    pub heads: Vec<HeadChange>,
}

/// The strongest induction score of an evaluation.
fn best_induction(e: &EvalLine) -> Option<f32> {
    e.heads
        .iter()
        .filter_map(|h| h.induction.filter(|s| s.is_finite()))
        .max_by(f32::total_cmp)
}

/// The phase change in `evals` (any order; sorted by step here), by the module's rule; `None`
/// when there is none.
pub fn phase_change(evals: &[EvalLine]) -> Option<PhaseChange> {
    let mut evals: Vec<&EvalLine> = evals.iter().collect();
    evals.sort_by_key(|e| e.step);
    let b: Vec<Option<f32>> = evals.iter().map(|e| best_induction(e)).collect();
    // rise[i]: from evaluation i - 1 to i (rise[0] unused).
    let rise = |i: usize| match (b[i - 1], b[i]) {
        (Some(x), Some(y)) => y - x,
        _ => f32::NEG_INFINITY,
    };
    let (mut steepest, mut at) = (0f32, 0usize);
    for i in 1..evals.len() {
        if rise(i) > steepest {
            (steepest, at) = (rise(i), i);
        }
    }
    if at == 0 {
        return None;
    }
    let least = steepest * STEEP_SHARE;
    let mut first = at - 1;
    while first > 0 && rise(first) >= least {
        first -= 1;
    }
    let mut last = at;
    while last + 1 < evals.len() && rise(last + 1) >= least {
        last += 1;
    }
    let (before, after) = (evals[first], evals[last]);
    let (b0, b1) = (b[first]?, b[last]?);
    let span = evals[evals.len() - 1].step - evals[0].step;
    let window = after.step - before.step;
    let icl_dropped = before.icl_loss - after.icl_loss >= ICL_DROP * before.icl_loss.abs();
    if b1 - b0 < INDUCTION_RISE || 2 * window > span || !icl_dropped {
        return None;
    }
    Some(PhaseChange {
        step: evals[at].step,
        from_step: before.step,
        to_step: after.step,
        icl_loss_before: before.icl_loss,
        icl_loss_after: after.icl_loss,
        train_loss_before: before.train_loss,
        train_loss_after: after.train_loss,
        held_out_loss_before: before.held_out_loss,
        held_out_loss_after: after.held_out_loss,
        best_induction_before: b0,
        best_induction_after: b1,
        heads: changed_heads(before, after),
    })
}

/// The heads whose induction or previous-token score rose by [`HEAD_RISE`] from `before` to
/// `after`, the largest rise first (then by layer and head).
fn changed_heads(before: &EvalLine, after: &EvalLine) -> Vec<HeadChange> {
    let find = |h: &HeadLine| {
        before
            .heads
            .iter()
            .find(|o| o.layer == h.layer && o.head == h.head)
    };
    let mut heads: Vec<HeadChange> = after
        .heads
        .iter()
        .filter_map(|h| {
            let old = find(h)?;
            Some(HeadChange {
                layer: h.layer,
                head: h.head,
                induction_before: old.induction,
                induction_after: h.induction,
                previous_token_before: old.previous_token,
                previous_token_after: h.previous_token,
                label: h.label.clone(),
            })
        })
        .filter(|c| c.rise() >= HEAD_RISE)
        .collect();
    heads.sort_by(|a, b| {
        b.rise()
            .total_cmp(&a.rise())
            .then((a.layer, a.head).cmp(&(b.layer, b.head)))
    });
    heads
}

/// `0.05→0.80`, or `–` for a score the log lacks.
fn scores(a: Option<f32>, b: Option<f32>) -> String {
    let s = |v: Option<f32>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    format!("{}→{}", s(a), s(b))
}

impl fmt::Display for HeadChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} ({}: induction {}, previous-token {})",
            self.layer,
            self.head,
            self.label,
            scores(self.induction_before, self.induction_after),
            scores(self.previous_token_before, self.previous_token_after)
        )
    }
}

impl fmt::Display for PhaseChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "phase change at step {} (steps {}–{}): in-context loss {:.3}→{:.3}, best induction \
             score {:.2}→{:.2}",
            self.step,
            self.from_step,
            self.to_step,
            self.icl_loss_before,
            self.icl_loss_after,
            self.best_induction_before,
            self.best_induction_after
        )?;
        if let (Some(a), Some(b)) = (self.train_loss_before, self.train_loss_after) {
            write!(f, ", training loss {a:.3}→{b:.3}")?;
        }
        let heads: Vec<String> = self.heads.iter().map(|h| h.to_string()).collect();
        if !heads.is_empty() {
            write!(f, "; heads {}", heads.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(layer: usize, head: usize, prev: f32, ind: f32) -> HeadLine {
        HeadLine {
            layer,
            head,
            previous_token: Some(prev),
            induction: Some(ind),
            duplicate_token: Some(0.0),
            first_token: Some(0.1),
            label: if ind > 0.5 { "induction" } else { "mixed" }.into(),
        }
    }

    /// Evaluations every 10 steps of two layers × two heads: head 0.0's previous-token score and
    /// head 1.1's induction score follow `prev` and `ind`, the in-context loss follows `icl`.
    fn run(prev: &[f32], ind: &[f32], icl: &[f64]) -> Vec<EvalLine> {
        (0..ind.len())
            .map(|i| EvalLine {
                step: 10 * (i as u64 + 1),
                held_out_loss: Some(icl[i] + 0.5),
                icl_loss: icl[i],
                copy_accuracy: None,
                train_loss: Some(icl[i] + 0.25),
                heads: vec![
                    head(0, 0, prev[i], 0.02),
                    head(0, 1, 0.1, 0.03),
                    head(1, 0, 0.05, 0.04),
                    head(1, 1, 0.1, ind[i]),
                ],
            })
            .collect()
    }

    const PREV: [f32; 10] = [0.1, 0.12, 0.15, 0.2, 0.6, 0.8, 0.82, 0.83, 0.83, 0.84];
    const IND: [f32; 10] = [0.02, 0.03, 0.03, 0.05, 0.6, 0.85, 0.88, 0.9, 0.9, 0.9];
    const ICL: [f64; 10] = [6.0, 5.9, 5.9, 5.8, 2.5, 1.0, 0.9, 0.9, 0.85, 0.85];

    #[test]
    fn a_clear_jump_is_found_with_its_losses_and_heads() {
        let evals = run(&PREV, &IND, &ICL);
        let p = phase_change(&evals).expect("a phase change");
        // Steepest at 40 → 50 (0.05 → 0.6); 50 → 60 (+0.25) joins, 30 → 40 (+0.02) does not.
        assert_eq!((p.step, p.from_step, p.to_step), (50, 40, 60));
        assert_eq!((p.icl_loss_before, p.icl_loss_after), (5.8, 1.0));
        let (a, b) = (
            p.train_loss_before.unwrap_or(0.0),
            p.train_loss_after.unwrap_or(0.0),
        );
        assert!(
            (a - 6.05).abs() < 1e-12 && (b - 1.25).abs() < 1e-12,
            "{a} {b}"
        );
        assert_eq!(
            (p.best_induction_before, p.best_induction_after),
            (0.05, 0.85)
        );
        let named: Vec<(usize, usize)> = p.heads.iter().map(|h| (h.layer, h.head)).collect();
        assert_eq!(
            named,
            [(1, 1), (0, 0)],
            "the induction head, then the previous-token head"
        );
        assert_eq!(p.heads[0].induction_before, Some(0.05));
        assert_eq!(p.heads[0].induction_after, Some(0.85));
        assert_eq!(p.heads[1].previous_token_before, Some(0.2));
        assert_eq!(p.heads[1].previous_token_after, Some(0.8));
        let text = p.to_string();
        assert!(
            text.starts_with("phase change at step 50 (steps 40–60)"),
            "{text}"
        );
        assert!(
            text.contains("1.1 (induction: induction 0.05→0.85"),
            "{text}"
        );
        // The order of the log does not matter.
        let mut shuffled = evals.clone();
        shuffled.reverse();
        assert_eq!(phase_change(&shuffled), Some(p));
    }

    #[test]
    fn no_jump_reports_none() {
        // Nothing forms.
        let flat = [0.05f32; 10];
        assert_eq!(phase_change(&run(&flat, &flat, &[6.0; 10])), None);
        // A steady rise over the whole run is gradual.
        let steady: Vec<f32> = (0..10).map(|i| 0.1 * i as f32).collect();
        let falling: Vec<f64> = (0..10).map(|i| 6.0 - 0.5 * i as f64).collect();
        assert_eq!(phase_change(&run(&steady, &steady, &falling)), None);
        // The score jumps but the in-context loss does not drop: not what induction heads buy.
        assert_eq!(phase_change(&run(&PREV, &IND, &[6.0; 10])), None);
        // A small jump.
        let small: Vec<f32> = IND.iter().map(|v| v * 0.3).collect();
        assert_eq!(phase_change(&run(&PREV, &small, &ICL)), None);
        // Too few evaluations to call anything sudden, and none at all.
        assert_eq!(
            phase_change(&run(&PREV[3..5], &IND[3..5], &ICL[3..5])),
            None
        );
        assert_eq!(phase_change(&[]), None);
        // No head scores (a context too short to measure induction).
        let mut bare = run(&PREV, &IND, &ICL);
        for e in &mut bare {
            e.heads.iter_mut().for_each(|h| h.induction = None);
        }
        assert_eq!(phase_change(&bare), None);
    }

    #[test]
    fn a_noisy_jump_over_several_evaluations_is_measured_whole() {
        // Noise of a few hundredths before and after; the formation spans steps 80 to 110.
        let ind = [
            0.02f32, 0.05, 0.03, 0.06, 0.04, 0.05, 0.03, 0.06, 0.2, 0.5, 0.75, 0.82, 0.8, 0.84,
            0.81, 0.83, 0.85, 0.82, 0.84, 0.85,
        ];
        let mut icl = vec![6.2; 8];
        icl.extend([5.5, 3.0, 1.5, 1.2, 1.1, 1.1, 1.0, 1.05, 1.0, 1.0, 0.98, 1.0]);
        let p = phase_change(&run(&ind, &ind, &icl)).expect("a phase change");
        assert_eq!((p.step, p.from_step, p.to_step), (100, 80, 110));
        assert_eq!((p.icl_loss_before, p.icl_loss_after), (6.2, 1.5));
    }

    #[test]
    fn a_jump_at_the_first_interval_and_at_the_last_is_found() {
        let early = [0.02f32, 0.7, 0.8, 0.8, 0.82];
        let icl = [6.0, 1.5, 1.0, 1.0, 0.9];
        let p = phase_change(&run(&early, &early, &icl)).expect("early");
        assert_eq!((p.from_step, p.to_step), (10, 20));
        let late = [0.02f32, 0.02, 0.03, 0.03, 0.7];
        let icl = [6.0, 6.0, 5.9, 5.9, 1.0];
        let p = phase_change(&run(&late, &late, &icl)).expect("late");
        assert_eq!((p.from_step, p.to_step), (40, 50));
    }
}
