//! A layers × heads heatmap as a PNG, in the style of the inspect-heads figures: one cell per
//! head, a diverging scale (blue below zero, white at zero, red above) symmetric about zero,
//! layer and head numbers on the axes, a title and a colour bar with its ends.

use std::path::Path;

use crate::error::{Error, Result};
use crate::inspect::image::{text_len, Canvas};
use crate::output::Out;

const MARGIN: usize = 16;
const TITLE: usize = 30;
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
    /// The layout for `layers` × `heads` cells.
    pub fn new(layers: usize, heads: usize) -> Self {
        let cell = (480 / heads.max(layers).max(1)).clamp(6, 32);
        let (left, top) = (MARGIN + AXIS, MARGIN + TITLE);
        Self {
            cell,
            left,
            top,
            width: (left + heads * cell + 24 + BAR + 60 + MARGIN).max(2 * MARGIN + 40 * 12),
            height: top + layers * cell + AXIS + MARGIN,
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
    let layers = values.len();
    let heads = values.iter().map(Vec::len).max().unwrap_or(0);
    let l = HeatmapLayout::new(layers, heads);
    let scale = values
        .iter()
        .flatten()
        .fold(0f64, |a, v| if v.is_finite() { a.max(v.abs()) } else { a })
        .max(f64::MIN_POSITIVE);
    let mut c = Canvas::new(l.width, l.height);
    let title: String = title.chars().take((l.width - 2 * MARGIN) / 12).collect();
    c.text(MARGIN, MARGIN, &title, 2);
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
    let step = (12 / l.cell).max(1);
    for head in (0..heads).step_by(step) {
        let label = head.to_string();
        let x = l.left + head * l.cell + l.cell / 2;
        c.text(
            x.saturating_sub(text_len(&label, 1) / 2),
            l.top + layers * l.cell + 4,
            &label,
            1,
        );
    }
    c.text(l.left, l.top + layers * l.cell + 16, "head", 1);
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
