//! `gpt2 train --plot PNG`: the report's charts as one picture, drawn with the inspect-heads
//! figures' canvas and font (`inspect::image`): the loss on top, below it the induction,
//! previous-token and duplicate-token scores of every head, the phase change's window shaded.

use std::io::Write;
use std::path::Path;

use super::chart::{tick_label, ticks, Frame, Panel, Series};
use crate::error::{Error, Result};
use crate::inspect::image::{text_len, Canvas, Title};
use crate::output::PendingFile;

/// The picture's width; the three score panels share it.
pub const WIDTH: usize = 1200;
const MARGIN: usize = 16;
/// Room left of a panel for its tick labels, and below it for the step axis.
const LEFT: usize = 44;
const BELOW: usize = 30;
const LOSS_HEIGHT: usize = 300;
const SCORE_HEIGHT: usize = 220;
/// One line of the legend.
const LEGEND_LINE: usize = 12;
/// Heads named in the legend; past this the colours repeat anyway.
const LEGEND_HEADS: usize = 40;
const AXIS: [u8; 3] = [150, 150, 150];
const GRID: [u8; 3] = [236, 236, 236];
const BAND: [u8; 3] = [253, 232, 200];

/// The picture's height for `title` and these panels.
pub fn height(title: &str, scores: &[Panel]) -> usize {
    let head_legend = legend_lines(scores.first().map_or(0, |p| p.series.len()));
    MARGIN
        + Title::fit(title, WIDTH - 2 * MARGIN).height()
        + 12
        + LOSS_HEIGHT
        + LEGEND_LINE
        + 12
        + SCORE_HEIGHT
        + head_legend * LEGEND_LINE
        + MARGIN
}

fn legend_lines(heads: usize) -> usize {
    let shown = heads.min(LEGEND_HEADS);
    // Entries of `L.H` with a swatch: about 60 pixels each.
    shown.div_ceil(((WIDTH - 2 * MARGIN) / 60).max(1)).max(1)
}

/// Draws `loss` over `scores` under `title` and writes the PNG to `path` (atomically).
pub(super) fn write_plot(path: &Path, title: &str, loss: &Panel, scores: &[Panel]) -> Result<()> {
    let (w, h) = (WIDTH, height(title, scores));
    let mut c = Canvas::new(w, h);
    let title_box = Title::fit(title, w - 2 * MARGIN);
    title_box.draw(&mut c, MARGIN, MARGIN);
    let mut y = MARGIN + title_box.height() + 12;
    panel(&mut c, loss, MARGIN, y, w - 2 * MARGIN, LOSS_HEIGHT);
    y += LOSS_HEIGHT;
    let mut x = MARGIN + LEFT;
    for s in &loss.series {
        x = legend_entry(&mut c, x, y, s.colour, &s.name) + 16;
    }
    y += LEGEND_LINE + 12;
    let n = scores.len().max(1);
    let each = (w - 2 * MARGIN) / n;
    for (i, p) in scores.iter().enumerate() {
        panel(&mut c, p, MARGIN + i * each, y, each - 8, SCORE_HEIGHT);
    }
    y += SCORE_HEIGHT;
    if let Some(first) = scores.first() {
        let (mut x, mut line) = (MARGIN + LEFT, y);
        for (i, s) in first.series.iter().enumerate() {
            if i == LEGEND_HEADS {
                c.text(x, line + 2, "...", 1);
                break;
            }
            if x + 60 > w - MARGIN {
                (x, line) = (MARGIN + LEFT, line + LEGEND_LINE);
            }
            legend_entry(&mut c, x, line, s.colour, &s.name);
            x += 60;
        }
    }
    let png = encode_png(&c)?;
    let mut file = PendingFile::create(path)?;
    let written = file
        .file()
        .write_all(&png)
        .and_then(|_| file.file().sync_all());
    written.map_err(|e| file.write_error(e))?;
    file.commit()
}

/// A swatch and `name` at (x, y); returns where the entry ends.
fn legend_entry(c: &mut Canvas, x: usize, y: usize, colour: [u8; 3], name: &str) -> usize {
    for i in 0..12 {
        for j in 0..3 {
            c.set(x + i, y + 4 + j, colour);
        }
    }
    // The font is ASCII: other characters would be boxes.
    let name: String = name.chars().filter(char::is_ascii).collect();
    c.text(x + 16, y + 2, &name, 1);
    x + 16 + text_len(&name, 1)
}

/// One panel in the `w` × `h` rectangle at (x, y), its axes' labels inside it.
fn panel(c: &mut Canvas, p: &Panel, x: usize, y: usize, w: usize, h: usize) {
    let f = Frame {
        left: (x + LEFT) as f64,
        top: (y + 14) as f64,
        width: w.saturating_sub(LEFT + 8) as f64,
        height: h.saturating_sub(14 + BELOW) as f64,
        x: p.x,
        y: p.y,
    };
    let (left, top) = (f.left as usize, f.top as usize);
    let (right, bottom) = (left + f.width as usize, top + f.height as usize);
    let title: String = p.title.chars().filter(char::is_ascii).collect();
    c.text(left, y + 2, &title, 1);
    let ys = ticks(p.y.0, p.y.1, 5);
    for &v in &ys {
        let py = f.py(v).round() as usize;
        for px in left..right {
            c.set(px, py, GRID);
        }
        let label = tick_label(v, &ys);
        c.text(
            left.saturating_sub(4 + text_len(&label, 1)),
            py.saturating_sub(3),
            &label,
            1,
        );
    }
    // Over the grid: the window stands out whole.
    if let Some((a, b)) = p.band {
        let a = f.px(a).round() as usize;
        let b = (f.px(b).round() as usize).max(a + 2);
        for px in a..b.min(right) {
            for py in top..bottom {
                c.set(px, py, BAND);
            }
        }
    }
    let xs = ticks(p.x.0, p.x.1, (w / 90).max(2));
    for &v in &xs {
        let px = f.px(v).round() as usize;
        for j in 0..4 {
            c.set(px, bottom + j, AXIS);
        }
        let label = tick_label(v, &xs);
        c.text(
            px.saturating_sub(text_len(&label, 1) / 2),
            bottom + 6,
            &label,
            1,
        );
    }
    c.text(left + (right - left) / 2 - 10, bottom + 18, "step", 1);
    for px in left..=right {
        c.set(px, bottom, AXIS);
    }
    for py in top..=bottom {
        c.set(left, py, AXIS);
    }
    for s in &p.series {
        curve(c, &f, s);
    }
}

fn curve(c: &mut Canvas, f: &Frame, s: &Series) {
    let pts: Vec<(i64, i64)> = s
        .points
        .iter()
        .map(|&(x, y)| (f.px(x).round() as i64, f.py(y).round() as i64))
        .collect();
    for pair in pts.windows(2) {
        line(c, pair[0], pair[1], s.colour, s.markers);
    }
    if s.markers {
        for &(x, y) in &pts {
            for dx in -1..=1 {
                for dy in -1..=1 {
                    put(c, x + dx, y + dy, s.colour);
                }
            }
        }
    }
}

fn put(c: &mut Canvas, x: i64, y: i64, colour: [u8; 3]) {
    if x >= 0 && y >= 0 {
        c.set(x as usize, y as usize, colour);
    }
}

/// Bresenham's line from `a` to `b`, two pixels thick when `thick`.
fn line(c: &mut Canvas, a: (i64, i64), b: (i64, i64), colour: [u8; 3], thick: bool) {
    let (mut x, mut y) = a;
    let (dx, dy) = ((b.0 - x).abs(), -(b.1 - y).abs());
    let (sx, sy) = (if x < b.0 { 1 } else { -1 }, if y < b.1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(c, x, y, colour);
        if thick {
            put(c, x, y + 1, colour);
        }
        if (x, y) == b {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// The canvas as PNG bytes (8-bit RGB).
pub(super) fn encode_png(c: &Canvas) -> Result<Vec<u8>> {
    encode_rgb(c.width, c.height, &c.rgb)
}

/// `rgb` (`width` × `height`, 8-bit RGB) as PNG bytes.
pub(super) fn encode_rgb(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::Internal(format!("cannot encode a PNG: {e}"));
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_both_ends() {
        let mut c = Canvas::new(10, 10);
        line(&mut c, (1, 8), (8, 2), [1, 2, 3], false);
        let at = |c: &Canvas, x: usize, y: usize| c.rgb[(y * c.width + x) * 3..][..3].to_vec();
        assert_eq!(at(&c, 1, 8), [1, 2, 3]);
        assert_eq!(at(&c, 8, 2), [1, 2, 3]);
        let drawn = c.rgb.chunks(3).filter(|p| *p == [1, 2, 3]).count();
        assert_eq!(drawn, 8, "one pixel per column of the longer axis");
    }
}
