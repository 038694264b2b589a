//! A layers × heads heatmap as a PNG, in the style of the inspect-heads figures: one cell per
//! head, a diverging scale (blue below zero, white at zero, red above) symmetric about zero,
//! layer and head numbers on the axes, a title and a colour bar with its ends.

use std::path::Path;

use crate::error::{Error, Result};
use crate::inspect::image::{text_len, Canvas, Title, TITLE_ROOM};
use crate::output::Out;

const MARGIN: usize = 16;
/// Below the title, above the cells.
const TITLE_GAP: usize = 16;
const AXIS: usize = 34;
const BAR: usize = 14;
const INK: [u8; 3] = [40, 40, 40];

/// Where the cells are, for tests that read the figure back.
#[derive(Debug, Clone, Copy)]
pub struct HeatmapLayout {
    pub cell: usize,
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

impl HeatmapLayout {
    /// The layout for `layers` × `heads` cells, under a title of at most two lines.
    pub fn new(layers: usize, heads: usize) -> Self {
        Self::titled(layers, heads, "")
    }

    /// The layout for `layers` × `heads` cells under `title`: taller when the title needs more
    /// than two lines.
    pub fn titled(layers: usize, heads: usize, title: &str) -> Self {
        Self::with_axis(layers, heads, title, AXIS)
    }

    /// As [`HeatmapLayout::titled`], with `axis` pixels below the cells for the columns' labels.
    fn with_axis(layers: usize, heads: usize, title: &str, axis: usize) -> Self {
        let cell = (480 / heads.max(layers).max(1)).clamp(6, 32);
        let width = (MARGIN + AXIS + heads * cell + 24 + BAR + 60 + MARGIN).max(2 * MARGIN + 480);
        let title = Title::fit(title, width - 2 * MARGIN)
            .height()
            .max(TITLE_ROOM);
        let (left, top) = (MARGIN + AXIS, MARGIN + title + TITLE_GAP);
        Self {
            cell,
            left,
            top,
            width,
            height: top + layers * cell + axis + MARGIN,
        }
    }

    /// The centre pixel of cell (layer, head).
    pub fn centre(&self, layer: usize, head: usize) -> (usize, usize) {
        (
            self.left + head * self.cell + self.cell / 2,
            self.top + layer * self.cell + self.cell / 2,
        )
    }
}

/// Blue (-1) → white (0) → red (+1).
pub fn diverging(v: f32) -> [u8; 3] {
    let v = if v.is_finite() {
        v.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let (end, f) = if v < 0.0 {
        ([33u8, 102, 172], -v)
    } else {
        ([178u8, 24, 43], v)
    };
    [0, 1, 2].map(|c| (255.0 + (end[c] as f32 - 255.0) * f).round() as u8)
}

/// Writes `values[layer][head]` as a heatmap titled `title` to `path`.
pub fn write_heatmap(path: &Path, title: &str, values: &[Vec<f64>]) -> Result<()> {
    write_map(path, title, values, "head", None)
}

/// Writes `values[layer][column]` as a heatmap titled `title` to `path`, the columns named
/// `columns` (`head`, `position`) and, with `labels`, each labelled by its text (positions by
/// their tokens), written downwards under its column; otherwise numbered.
pub fn write_map(
    path: &Path,
    title: &str,
    values: &[Vec<f64>],
    columns: &str,
    labels: Option<&[String]>,
) -> Result<()> {
    let layers = values.len();
    let heads = values.iter().map(Vec::len).max().unwrap_or(0);
    // Room under the cells: numbers and the axis name, or the longest label turned on its side.
    let longest = labels
        .into_iter()
        .flatten()
        .map(|t| text_len(t, 1))
        .max()
        .unwrap_or(0);
    let axis = if labels.is_some() {
        longest + 8 + 12
    } else {
        AXIS
    };
    let l = HeatmapLayout::with_axis(layers, heads, title, axis);
    let scale = values
        .iter()
        .flatten()
        .fold(0f64, |a, v| if v.is_finite() { a.max(v.abs()) } else { a })
        .max(f64::MIN_POSITIVE);
    let mut c = Canvas::new(l.width, l.height);
    Title::fit(title, l.width - 2 * MARGIN).draw(&mut c, MARGIN, MARGIN);
    for (layer, row) in values.iter().enumerate() {
        for (head, v) in row.iter().enumerate() {
            let colour = diverging((v / scale) as f32);
            for y in 0..l.cell {
                for x in 0..l.cell {
                    c.set(
                        l.left + head * l.cell + x,
                        l.top + layer * l.cell + y,
                        colour,
                    );
                }
            }
        }
        let label = layer.to_string();
        let y = l.top + layer * l.cell + l.cell / 2;
        c.text(
            l.left - 4 - text_len(&label, 1),
            y.saturating_sub(3),
            &label,
            1,
        );
    }
    let bottom = l.top + layers * l.cell;
    match labels {
        Some(labels) => {
            // Turned: one label per column where a glyph's height (7 px) fits.
            let step = (8 / l.cell).max(1);
            for (col, label) in labels.iter().enumerate().take(heads).step_by(step) {
                let x = l.left + col * l.cell + l.cell / 2;
                c.text_up(
                    x.saturating_sub(3),
                    bottom + 4 + text_len(label, 1),
                    label,
                    1,
                );
            }
            c.text(l.left, bottom + longest + 10, columns, 1);
        }
        None => {
            let step = (12 / l.cell).max(1);
            for head in (0..heads).step_by(step) {
                let label = head.to_string();
                let x = l.left + head * l.cell + l.cell / 2;
                c.text(
                    x.saturating_sub(text_len(&label, 1) / 2),
                    bottom + 4,
                    &label,
                    1,
                );
            }
            c.text(l.left, bottom + 16, columns, 1);
        }
    }
    c.text_up(MARGIN, l.top + layers * l.cell / 2 + 12, "layer", 1);
    c.frame(l.left, l.top, heads * l.cell, layers * l.cell);
    // The colour bar: +scale at the top, -scale at the bottom.
    let (bx, bh) = (l.left + heads * l.cell + 24, layers * l.cell);
    for j in 0..bh {
        let colour = diverging(1.0 - 2.0 * j as f32 / (bh.max(2) - 1) as f32);
        for i in 0..BAR {
            c.set(bx + i, l.top + j, colour);
        }
    }
    c.frame(bx, l.top, BAR, bh);
    for (label, j) in [
        (format!("{scale:+.3}"), 0),
        ("0".to_string(), bh / 2),
        (format!("{:+.3}", -scale), bh.saturating_sub(1)),
    ] {
        for i in 0..3 {
            c.set(bx + BAR + i, l.top + j, INK);
        }
        c.text(bx + BAR + 5, (l.top + j).saturating_sub(3), &label, 1);
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, l.width as u32, l.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::Input(format!("{}: {e}", path.display()));
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(&c.rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    let mut out = Out::open(Some(path))?;
    out.bytes(&png)?;
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels of `rgb` (`width` wide) in rows `rows` that are ink.
    fn ink(rgb: &[u8], width: usize, rows: std::ops::Range<usize>) -> usize {
        rgb[rows.start * width * 3..rows.end * width * 3]
            .chunks(3)
            .filter(|p| *p == INK)
            .count()
    }

    /// The ink of `title` drawn alone, on a canvas wide enough, at `scale`.
    fn ink_alone(title: &str, scale: usize) -> usize {
        let (w, h) = (text_len(title, scale) + 1, 7 * scale);
        let mut c = Canvas::new(w, h);
        c.text(0, 0, title, scale);
        ink(&c.rgb, w, 0..h)
    }

    #[test]
    fn titles_fit_the_smallest_figures_whole() -> std::result::Result<(), Box<dyn std::error::Error>>
    {
        // The titles heads-effect and attribute draw, one with a long token, and one that only
        // fits on more lines than the figure keeps for a title.
        let huge = format!(
            "direct logit attribution to {:?}, per head",
            "ab ".repeat(100)
        );
        let titles = [
            "ablated - clean: the logit of token 64 \"a\" at the last position",
            "ablated - clean: the prompt's mean next-token loss (nats)",
            "direct logit attribution to \" Paris\", per head",
            "direct logit attribution to \"-Supercalifragilisticexpialidocious-sequences\", per head",
            &huge,
        ];
        let path = std::env::temp_dir().join(format!("gpt2-figure-{}.png", std::process::id()));
        // One head of one layer; the tiny fixture's 2 layers × 4 heads.
        for (layers, heads) in [(1, 1), (2, 4)] {
            for title in titles {
                write_heatmap(&path, title, &vec![vec![0.5; heads]; layers])?;
                let decoder =
                    png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path)?));
                let mut reader = decoder.read_info()?;
                let mut rgb = vec![0; reader.output_buffer_size().unwrap_or(0)];
                let info = reader.next_frame(&mut rgb)?;
                let l = HeatmapLayout::titled(layers, heads, title);
                if title != huge {
                    assert_eq!(l.top, HeatmapLayout::new(layers, heads).top);
                }
                assert_eq!(
                    (info.width as usize, info.height as usize),
                    (l.width, l.height)
                );
                // Above the grid, its colour bar's label and the axis name: the title alone,
                // every pixel of it, in large type or small.
                let drawn = ink(&rgb, l.width, 0..l.top - 4);
                assert!(
                    [ink_alone(title, 2), ink_alone(title, 1)].contains(&drawn),
                    "{layers} × {heads}, {title:?}: {drawn} pixels of ink, not {} or {}",
                    ink_alone(title, 2),
                    ink_alone(title, 1)
                );
            }
        }
        std::fs::remove_file(&path)?;
        Ok(())
    }

    #[test]
    fn positions_are_labelled_by_their_tokens_under_their_columns(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let path = std::env::temp_dir().join(format!("gpt2-map-{}.png", std::process::id()));
        let labels: Vec<String> = ["0 \"The\"", "1 \" cat\"/\" dog\"", "2 \" sat\""]
            .map(String::from)
            .to_vec();
        let values = vec![vec![0.5; 3]; 2];
        let read = |path: &Path| -> std::result::Result<(usize, usize, Vec<u8>), Box<dyn std::error::Error>> {
            let mut reader =
                png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?)).read_info()?;
            let mut rgb = vec![0; reader.output_buffer_size().unwrap_or(0)];
            let info = reader.next_frame(&mut rgb)?;
            Ok((info.width as usize, info.height as usize, rgb))
        };
        write_map(&path, "t", &values, "position", Some(&labels))?;
        let (w, h, rgb) = read(&path)?;
        let longest = labels.iter().map(|t| text_len(t, 1)).max().unwrap_or(0);
        let l = HeatmapLayout::with_axis(2, 3, "t", longest + 20);
        assert_eq!((w, h), (l.width, l.height));
        // Each label's ink, turned, in a band under its column, as long as the label.
        let bottom = l.top + 2 * l.cell;
        for (col, label) in labels.iter().enumerate() {
            let x0 = l.left + col * l.cell + l.cell / 2 - 3;
            let rows = bottom + 4..bottom + 5 + text_len(label, 1);
            let mut c = Canvas::new(7, 200);
            c.text_up(0, text_len(label, 1), label, 1);
            let want = ink(&c.rgb, 7, 0..200);
            assert!(want > 0);
            let got = rows
                .flat_map(|y| (x0..x0 + 7).map(move |x| (y * w + x) * 3))
                .filter(|&i| rgb[i..i + 3] == INK)
                .count();
            assert_eq!(got, want, "{label}");
        }
        // Numbered columns keep the heads' layout.
        write_map(&path, "t", &values, "head", None)?;
        let (w, h, _) = read(&path)?;
        let l = HeatmapLayout::titled(2, 3, "t");
        assert_eq!((w, h), (l.width, l.height));
        std::fs::remove_file(&path)?;
        Ok(())
    }
}
