//! A [`Patching`] or [`PathPatching`] result as text tables: the last two axes are rows ×
//! columns, the leading ones one table each.

use super::{Act, Axis, Metric, PairRun, Patching, PathPatching};

/// One table of a result: its title (the leading indices), the patched metric and the
/// normalised one, rows × columns.
pub type Table = (String, Vec<Vec<f64>>, Vec<Vec<f64>>);

/// A result's values on its axes: what the tables lay out.
struct Grid<'a> {
    axes: &'a [Axis],
    shape: &'a [usize],
    acts: &'a [Act],
    patched: &'a [f64],
    normalized: &'a [f64],
}

impl Patching {
    /// The metric in words, `tokens` the text of each token id (for the report).
    pub fn describe(&self, text: impl Fn(u32) -> String) -> String {
        describe(self.metric, self.position, &self.pairs, text)
    }

    /// The tables [`Patching::table`] prints: the last two axes are rows × columns, the
    /// leading ones (act, and layer when there are three) one table each, with its title.
    pub fn tables(&self) -> Vec<Table> {
        self.grid().tables()
    }

    /// Text tables of the patched metric and the normalised one, rows and columns labelled by
    /// `label(axis, index)` (e.g. positions by their tokens).
    pub fn table(&self, label: &dyn Fn(Axis, usize) -> String) -> String {
        self.grid().table(label)
    }

    fn grid(&self) -> Grid<'_> {
        Grid {
            axes: &self.axes,
            shape: &self.shape,
            acts: &self.acts,
            patched: &self.patched,
            normalized: &self.normalized,
        }
    }
}

impl PathPatching {
    /// The metric in words, as [`Patching::describe`].
    pub fn describe(&self, text: impl Fn(u32) -> String) -> String {
        describe(self.metric, self.position, &self.pairs, text)
    }

    /// The tables: one layers × heads map (heads), one column by layer (MLPs), one value.
    pub fn tables(&self) -> Vec<Table> {
        self.grid().tables()
    }

    /// Text tables of the patched metric and the normalised one.
    pub fn table(&self, label: &dyn Fn(Axis, usize) -> String) -> String {
        self.grid().table(label)
    }

    fn grid(&self) -> Grid<'_> {
        Grid {
            axes: &self.axes,
            shape: &self.shape,
            acts: &[],
            patched: &self.patched,
            normalized: &self.normalized,
        }
    }
}

/// The metric at `position` in words (a dataset's `pairs`: their mean).
fn describe(
    metric: Metric,
    position: usize,
    pairs: &[PairRun],
    text: impl Fn(u32) -> String,
) -> String {
    let mut at = format!("at position {position}");
    if pairs.len() > 1 {
        if pairs.iter().any(|p| p.position != position) {
            at = "at each pair's last position".into();
        }
        let what = match metric {
            Metric::LogitDiff { .. } => "logit(target) - logit(against)",
            Metric::Logit { .. } => "logit(target)",
            Metric::Prob { .. } => "p(target)",
            Metric::Loss { .. } => "-log p(target)",
        };
        return format!("the mean over {} pairs of {what} {at}", pairs.len());
    }
    match metric {
        Metric::LogitDiff { target, against } => format!(
            "logit({:?}) - logit({:?}) {at}",
            text(target),
            text(against)
        ),
        Metric::Logit { target } => format!("logit({:?}) {at}", text(target)),
        Metric::Prob { target } => format!("p({:?}) {at}", text(target)),
        Metric::Loss { target } => format!("-log p({:?}) {at}", text(target)),
    }
}

impl Grid<'_> {
    fn tables(&self) -> Vec<Table> {
        let n = self.shape.len();
        let (rows, cols) = match n {
            0 => (1, 1),
            1 => (self.shape[0], 1),
            _ => (self.shape[n - 2], self.shape[n - 1]),
        };
        let lead = n.saturating_sub(2);
        let per = (rows * cols).max(1);
        let cut =
            |v: &[f64]| -> Vec<Vec<f64>> { v.chunks(cols.max(1)).map(<[f64]>::to_vec).collect() };
        (0..self.patched.len() / per)
            .map(|i| {
                // The leading indices of table i, row-major.
                let mut title = Vec::new();
                let mut rest = i;
                for k in (0..lead).rev() {
                    let size = self.shape[k].max(1);
                    let idx = rest % size;
                    rest /= size;
                    title.push(match self.axes[k] {
                        Axis::Act => self
                            .acts
                            .get(idx)
                            .map_or_else(|| idx.to_string(), |a| a.name().to_string()),
                        a => format!("{} {idx}", axis_name(a)),
                    });
                }
                title.reverse();
                let span = i * per..(i + 1) * per;
                (
                    title.join(", "),
                    cut(&self.patched[span.clone()]),
                    cut(&self.normalized[span]),
                )
            })
            .collect()
    }

    fn table(&self, label: &dyn Fn(Axis, usize) -> String) -> String {
        use std::fmt::Write;
        let n = self.axes.len();
        let (row_axis, col_axis) = match n {
            0 => (Axis::Layer, None),
            1 => (self.axes[0], None),
            _ => (self.axes[n - 2], Some(self.axes[n - 1])),
        };
        let mut s = String::new();
        if n == 0 {
            // One value (path patching from the embeddings).
            for (what, v) in [("patched", self.patched), ("normalised", self.normalized)] {
                for v in v {
                    let _ = writeln!(s, "{what}: {v:+.4}");
                }
            }
            return s;
        }
        for (title, patched, normalized) in self.tables() {
            for (what, m) in [("patched", &patched), ("normalised", &normalized)] {
                let _ = writeln!(
                    s,
                    "{what}{}{title}",
                    if title.is_empty() { "" } else { ": " }
                );
                let labels: Vec<String> = (0..m.len()).map(|r| label(row_axis, r)).collect();
                let w = labels
                    .iter()
                    .map(|l| l.chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(5);
                let cols = m.first().map_or(0, Vec::len);
                let heads: Vec<String> = (0..cols)
                    .map(|c| col_axis.map_or_else(|| "value".into(), |a| label(a, c)))
                    .collect();
                let cw = heads
                    .iter()
                    .map(|h| h.chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(8);
                let _ = write!(s, "{:>w$}", axis_name(row_axis));
                for h in &heads {
                    let _ = write!(s, " {h:>cw$}");
                }
                s.push('\n');
                for (l, row) in labels.iter().zip(m) {
                    let _ = write!(s, "{l:>w$}");
                    for v in row {
                        let _ = write!(s, " {v:>+cw$.4}");
                    }
                    s.push('\n');
                }
                s.push('\n');
            }
        }
        s
    }
}

/// An axis as the tables head it.
fn axis_name(a: Axis) -> &'static str {
    match a {
        Axis::Act => "act",
        Axis::Layer => "layer",
        Axis::Pos => "pos",
        Axis::Head => "head",
    }
}
