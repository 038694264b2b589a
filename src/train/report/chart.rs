//! The curves of a run as panels of series in data coordinates, drawn twice: as inline SVG in
//! `report.html` ([`super::html`]) and as pixels in the `--plot` PNG ([`super::plot`]). Both
//! draw the same panels, so the page and the picture cannot disagree.

use super::phase::PhaseChange;
use super::{EvalLine, HeadLine, RunLogs};

/// More points than this in a per-step curve are averaged in equal runs of steps: a line no
/// wider than the chart needs no more, and a page of a million points would crawl.
pub(super) const MAX_POINTS: usize = 1000;

/// Per-evaluation curves of heads are averaged down to this many points: a model of 144 heads
/// evaluated a thousand times stays a page of a few megabytes.
pub(super) const MAX_HEAD_POINTS: usize = 300;
/// Curves of more points than this get no dot at each point (the dots would merge).
pub(super) const MAX_MARKERS: usize = 60;

/// Colours for series, in order (matplotlib's tab10): heads take them by index, layer-major.
pub(super) const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// One curve.
#[derive(Debug, Clone)]
pub(super) struct Series {
    pub(super) name: String,
    pub(super) colour: [u8; 3],
    /// (step, value), finite values only, in step order.
    pub(super) points: Vec<(f64, f64)>,
    /// Per-evaluation curves get a dot at each point; per-step curves are thin lines.
    pub(super) markers: bool,
    /// `layer.head` for head curves: the page highlights a head's curves together.
    pub(super) head: Option<String>,
}

/// One chart: axes ranges, its curves, the phase change's window shaded.
#[derive(Debug, Clone)]
pub(super) struct Panel {
    /// An id for the page, and what tests look for.
    pub(super) id: &'static str,
    pub(super) title: String,
    pub(super) y_label: &'static str,
    pub(super) x: (f64, f64),
    pub(super) y: (f64, f64),
    pub(super) series: Vec<Series>,
    /// The phase change's window, in steps.
    pub(super) band: Option<(f64, f64)>,
}

/// The loss panel: the training loss at every step, the held-out and in-context losses at
/// every evaluation.
pub(super) fn loss_panel(logs: &RunLogs, phase: Option<&PhaseChange>) -> Panel {
    let train: Vec<(f64, f64)> = logs.steps.iter().map(|s| (s.step as f64, s.loss)).collect();
    let per_eval = |f: fn(&EvalLine) -> Option<f64>| -> Vec<(f64, f64)> {
        logs.evals
            .iter()
            .filter_map(|e| f(e).map(|v| (e.step as f64, v)))
            .collect()
    };
    let mut series = vec![
        Series {
            name: "training loss (per step)".into(),
            colour: [150, 150, 150],
            points: downsample(&finite(train), MAX_POINTS),
            markers: false,
            head: None,
        },
        Series {
            name: "held-out loss".into(),
            colour: PALETTE[0],
            points: downsample(&finite(per_eval(|e| e.held_out_loss)), MAX_POINTS),
            markers: true,
            head: None,
        },
        Series {
            name: "in-context loss (second copy of a repeated sequence)".into(),
            colour: PALETTE[3],
            points: downsample(&finite(per_eval(|e| Some(e.icl_loss))), MAX_POINTS),
            markers: true,
            head: None,
        },
    ];
    for s in &mut series {
        s.markers &= s.points.len() <= MAX_MARKERS;
    }
    series.retain(|s| !s.points.is_empty());
    Panel {
        id: "loss",
        title: "Loss (nats per token)".into(),
        y_label: "loss",
        x: x_range(logs),
        y: loss_range(&series),
        series,
        band: band(phase),
    }
}

/// A head's score of one kind, from a log line.
type Score = fn(&HeadLine) -> Option<f32>;

/// The head-score panels: induction, previous-token and duplicate-token, one curve per head.
pub(super) fn score_panels(logs: &RunLogs, phase: Option<&PhaseChange>) -> Vec<Panel> {
    let kinds: [(&'static str, &str, Score); 3] = [
        ("induction", "Induction score", |h| h.induction),
        ("previous-token", "Previous-token score", |h| {
            h.previous_token
        }),
        ("duplicate-token", "Duplicate-token score", |h| {
            h.duplicate_token
        }),
    ];
    // Every head any evaluation has, in (layer, head) order.
    let mut heads: Vec<(usize, usize)> = logs
        .evals
        .iter()
        .flat_map(|e| e.heads.iter().map(|h| (h.layer, h.head)))
        .collect();
    heads.sort_unstable();
    heads.dedup();
    kinds
        .into_iter()
        .map(|(id, title, score)| {
            let series: Vec<Series> = heads
                .iter()
                .enumerate()
                .map(|(i, &(layer, head))| {
                    let points: Vec<(f64, f64)> = logs
                        .evals
                        .iter()
                        .filter_map(|e| {
                            let h = e.heads.iter().find(|h| (h.layer, h.head) == (layer, head));
                            h.and_then(score).map(|v| (e.step as f64, f64::from(v)))
                        })
                        .collect();
                    let points = downsample(&finite(points), MAX_HEAD_POINTS);
                    Series {
                        name: format!("{layer}.{head}"),
                        colour: PALETTE[i % PALETTE.len()],
                        markers: points.len() <= MAX_MARKERS,
                        points,
                        head: Some(format!("{layer}.{head}")),
                    }
                })
                .collect();
            // Scores are attention mass: 0 to 1 (more only if a log says so).
            let top = max_y(&series).unwrap_or(1.0).max(1.0);
            Panel {
                id,
                title: format!("{title} per head (layer.head)"),
                y_label: "score",
                x: x_range(logs),
                y: (0.0, nice_ceiling(top)),
                series,
                band: band(phase),
            }
        })
        .collect()
}

/// From 0 to a round number above the highest loss; when every loss is above half the highest
/// (a run that has not learnt much yet), from a round number below the lowest instead, so that
/// a small drop or a bump stays visible.
fn loss_range(series: &[Series]) -> (f64, f64) {
    let values = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (Some(lo), Some(hi)) = (
        values().min_by(f64::total_cmp),
        values().max_by(f64::total_cmp),
    ) else {
        return (0.0, 1.0);
    };
    if lo <= hi / 2.0 || hi - lo < 1e-9 {
        return (0.0, nice_ceiling(hi));
    }
    let t = ticks(lo, hi, 5);
    let step = match t.as_slice() {
        [a, b, ..] => b - a,
        _ => (hi - lo).max(1e-3),
    };
    ((lo / step).floor() * step, (hi / step).ceil() * step)
}

fn band(phase: Option<&PhaseChange>) -> Option<(f64, f64)> {
    phase.map(|p| (p.from_step as f64, p.to_step as f64))
}

fn finite(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    points.into_iter().filter(|(_, y)| y.is_finite()).collect()
}

fn max_y(series: &[Series]) -> Option<f64> {
    series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .max_by(f64::total_cmp)
}

/// Steps 0 to the last step logged (at least 1).
fn x_range(logs: &RunLogs) -> (f64, f64) {
    let last = logs
        .steps
        .iter()
        .map(|s| s.step)
        .chain(logs.evals.iter().map(|e| e.step))
        .max()
        .unwrap_or(1);
    (0.0, last.max(1) as f64)
}

/// `points` averaged in `ceil(len / max)`-long runs when there are more than `max`.
pub(super) fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    let per = points.len().div_ceil(max.max(1));
    if per <= 1 {
        return points.to_vec();
    }
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (
                c.iter().map(|p| p.0).sum::<f64>() / n,
                c.iter().map(|p| p.1).sum::<f64>() / n,
            )
        })
        .collect()
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k) at or above `v` (1 for
/// anything not above 0).
pub(super) fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * p)
}

/// Tick values from `lo` to `hi`: about `n` of them at a 1, 2 or 5 × 10^k spacing.
pub(super) fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo];
    }
    let raw = span / n.max(1) as f64;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick's label: no more digits than the spacing needs.
pub(super) fn tick_label(v: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [a, b, ..] => (b - a).abs(),
        _ => 1.0,
    };
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

/// The panels' pixel mapping: a panel's data box inside a pixel rectangle.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frame {
    pub(super) left: f64,
    pub(super) top: f64,
    pub(super) width: f64,
    pub(super) height: f64,
    pub(super) x: (f64, f64),
    pub(super) y: (f64, f64),
}

impl Frame {
    pub(super) fn px(&self, x: f64) -> f64 {
        let (a, b) = self.x;
        self.left + (x - a) / (b - a).max(f64::MIN_POSITIVE) * self.width
    }

    pub(super) fn py(&self, y: f64) -> f64 {
        let (a, b) = self.y;
        let f = ((y - a) / (b - a).max(f64::MIN_POSITIVE)).clamp(-0.02, 1.02);
        self.top + (1.0 - f) * self.height
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_ceilings_are_round_numbers() {
        assert_eq!(ticks(0.0, 30.0, 5), [0.0, 10.0, 20.0, 30.0]);
        assert_eq!(
            ticks(0.0, 1.0, 5),
            [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(tick_label(0.6000000000000001, &[0.0, 0.2]), "0.6");
        assert_eq!(tick_label(1000.0, &[0.0, 500.0]), "1000");
        assert_eq!(nice_ceiling(6.2), 8.0);
        assert_eq!(nice_ceiling(4.1), 5.0);
        assert_eq!(nice_ceiling(0.9), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
    }

    #[test]
    fn long_runs_make_light_charts() {
        let head = |layer, head| HeadLine {
            layer,
            head,
            previous_token: Some(0.5),
            induction: Some(0.25),
            duplicate_token: None,
            first_token: None,
            label: String::new(),
        };
        let logs = RunLogs {
            steps: Vec::new(),
            evals: (1..=1000)
                .map(|s| EvalLine {
                    step: s,
                    held_out_loss: None,
                    icl_loss: if s == 7 { f64::NAN } else { 1.0 },
                    copy_accuracy: None,
                    heads: vec![head(0, 0), head(0, 1)],
                    train_loss: None,
                })
                .collect(),
        };
        let loss = loss_panel(&logs, None);
        assert_eq!(loss.series.len(), 1, "only the in-context loss was logged");
        assert_eq!(loss.series[0].points.len(), 999, "the NaN left out");
        assert!(!loss.series[0].markers);
        let panels = score_panels(&logs, None);
        let ids: Vec<&str> = panels.iter().map(|p| p.id).collect();
        assert_eq!(ids, ["induction", "previous-token", "duplicate-token"]);
        let ind = &panels[0].series;
        assert_eq!(ind.len(), 2);
        assert_eq!(ind[1].head.as_deref(), Some("0.1"));
        assert!(ind[0].points.len() <= MAX_HEAD_POINTS && !ind[0].markers);
        assert!(ind[0].points.iter().all(|p| p.1 == 0.25));
        assert!(panels[2].series.iter().all(|s| s.points.is_empty()));
        assert_eq!(panels[0].x, (0.0, 1000.0));
    }

    #[test]
    fn the_loss_axis_shows_small_changes() {
        let series = |points: Vec<(f64, f64)>| {
            vec![Series {
                name: String::new(),
                colour: [0; 3],
                points,
                markers: false,
                head: None,
            }]
        };
        // A run that learnt: from 0.
        assert_eq!(
            loss_range(&series(vec![(1.0, 6.2), (2.0, 0.5)])),
            (0.0, 8.0)
        );
        // One that has not yet: around its values.
        let (lo, hi) = loss_range(&series(vec![(1.0, 6.26), (2.0, 6.11)]));
        assert!(
            (lo - 6.1).abs() < 1e-9 && (hi - 6.3).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert_eq!(loss_range(&series(vec![(1.0, 2.0)])), (0.0, 2.0));
        assert_eq!(loss_range(&[]), (0.0, 1.0));
    }

    #[test]
    fn long_curves_are_averaged_down() {
        let p: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, i as f64)).collect();
        assert_eq!(downsample(&p, 20), p);
        assert_eq!(
            downsample(&p, 5),
            [(0.5, 0.5), (2.5, 2.5), (4.5, 4.5), (6.5, 6.5), (8.5, 8.5)]
        );
        assert_eq!(downsample(&p, 3).len(), 3);
    }
}
