//! The PNG figure: for each layer a band of per-head heatmaps titled "Head i" (query rows, key
//! columns, token labels on both axes, 0 to 1 in viridis) with one colour bar, as the tutorials
//! draw with matplotlib's `imshow`. Written band by band, so a figure of every layer never sits
//! in memory whole.
//!
//! Heatmaps are at most [`MAX_SIDE`] pixels: a longer prompt gets pixels that each show the largest
//! weight of the tokens they cover (max-pooling keeps a one-token-wide stripe visible), and labels
//! on every n-th token only.

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

use super::font;
use super::text::{clip, tail, visible};
use super::{Header, LayerAttention, Sink};
use crate::error::{Error, Result};
use crate::output::Out;

/// Largest heatmap side, in pixels.
pub const MAX_SIDE: usize = 256;
/// Largest pixels per token, for short prompts.
const MAX_CELL: usize = 32;
const MARGIN: usize = 16;
/// Characters of a token shown in a label.
pub const LABEL_CHARS: usize = 10;
const GAP_X: usize = 24;
const GAP_Y: usize = 16;
/// Rows above each band's panels, for "Layer l"; above each heatmap, for "Head i".
const BAND_HEAD: usize = 26;
const PANEL_TITLE: usize = 22;
/// The figure title's strip.
const TITLE: usize = MARGIN + TITLE_ROOM + 10;
const BAR_WIDTH: usize = 14;
/// Right of the grid: gap, colour bar, tick labels, margin.
const BAR_AREA: usize = 16 + BAR_WIDTH + 4 + 24 + MARGIN;
/// Room for about 30 characters of title a line.
const MIN_WIDTH: usize = 2 * MARGIN + 30 * 12;
const INK: [u8; 3] = [40, 40, 40];
const FRAME: [u8; 3] = [160, 160, 160];

/// Where everything goes in the figure; the same numbers tests use to find the panels.
#[derive(Debug, Clone)]
pub struct Layout {
    pub tokens: usize,
    pub heads: usize,
    pub layers: usize,
    /// Heatmap side, in pixels.
    pub side: usize,
    /// Heads per row of the grid.
    pub cols: usize,
    /// Rows of heads per layer.
    pub rows: usize,
    pub width: usize,
    pub height: usize,
    /// Pixels per token (below 1 when pixels pool several tokens).
    cell: f64,
    label_scale: usize,
    /// Every `label_stride`-th token is labelled.
    label_stride: usize,
    /// Width of the query labels, and height of the key labels.
    label_px: usize,
    panel_w: usize,
    panel_h: usize,
    band_h: usize,
}

impl Layout {
    /// A figure of `layers` bands of `heads` heatmaps over `tokens` tokens, whose longest label
    /// has `label_chars` characters (at most [`LABEL_CHARS`] are drawn).
    pub fn new(tokens: usize, heads: usize, layers: usize, label_chars: usize) -> Self {
        let t = tokens.max(1);
        let side = if t <= MAX_SIDE {
            t * (MAX_SIDE / t).clamp(1, MAX_CELL)
        } else {
            MAX_SIDE
        };
        let cell = side as f64 / t as f64;
        let label_scale = if cell >= 18.0 { 2 } else { 1 };
        let label_stride = ((8 * label_scale) as f64 / cell).ceil().max(1.0) as usize;
        let label_px = label_chars.clamp(1, LABEL_CHARS) * (font::WIDTH + 1) * label_scale + 6;
        let cols = heads.clamp(1, 4);
        let rows = heads.div_ceil(cols).max(1);
        let panel_w = label_px + side + GAP_X;
        let panel_h = PANEL_TITLE + side + label_px + GAP_Y;
        let band_h = BAND_HEAD + rows * panel_h;
        Self {
            tokens,
            heads,
            layers,
            side,
            cols,
            rows,
            width: (MARGIN + cols * panel_w + BAR_AREA).max(MIN_WIDTH),
            height: TITLE + layers * band_h + MARGIN,
            cell,
            label_scale,
            label_stride,
            label_px,
            panel_w,
            panel_h,
            band_h,
        }
    }

    /// Top-left pixel of the heatmap of the `head`-th head of the `layer`-th band (both counted
    /// among those shown).
    pub fn heatmap_origin(&self, layer: usize, head: usize) -> (usize, usize) {
        let (x, y) = self.origin_in_band(head);
        (x, TITLE + layer * self.band_h + y)
    }

    fn origin_in_band(&self, head: usize) -> (usize, usize) {
        (
            MARGIN + (head % self.cols) * self.panel_w + self.label_px,
            BAND_HEAD + (head / self.cols) * self.panel_h + PANEL_TITLE,
        )
    }

    /// Scale of a heatmap's title: small where a small heatmap leaves no room for large type
    /// before the next panel's title.
    fn head_title_scale(&self, title: &str) -> usize {
        if text_len(title, 2) + 4 <= self.panel_w {
            2
        } else {
            1
        }
    }

    /// The tokens heatmap pixel `p` (along either axis) covers: `start..end`.
    pub fn tokens_at(&self, p: usize) -> std::ops::Range<usize> {
        let at = |p: usize| (p * self.tokens) / self.side;
        let start = at(p);
        start..at(p + 1).max(start + 1)
    }

    /// The pixel at the centre of token `t` along either axis of a heatmap.
    pub fn pixel_of(&self, t: usize) -> usize {
        ((t as f64 + 0.5) * self.cell) as usize
    }
}

/// Matplotlib's default colour map, viridis, sampled at 0, 0.1, ..., 1.
const VIRIDIS: [[u8; 3]; 11] = [
    [68, 1, 84],
    [72, 37, 118],
    [65, 68, 135],
    [53, 96, 141],
    [42, 120, 142],
    [33, 144, 140],
    [34, 168, 132],
    [67, 191, 113],
    [122, 209, 81],
    [187, 223, 39],
    [253, 231, 37],
];

/// The colour of weight `w` on the 0 to 1 scale, linearly between viridis' samples.
pub fn colormap(w: f32) -> [u8; 3] {
    let x = if w.is_finite() {
        w.clamp(0.0, 1.0)
    } else {
        0.0
    } * 10.0;
    let i = (x.floor() as usize).min(9);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    [0, 1, 2].map(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * f).round() as u8)
}

/// An RGB picture to draw on; pixels outside it are ignored.
pub(crate) struct Canvas {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) rgb: Vec<u8>,
}

impl Canvas {
    pub(crate) fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            rgb: vec![255; width * height * 3],
        }
    }

    pub(crate) fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// `text` left to right from its top-left corner.
    pub(crate) fn text(&mut self, x: usize, y: usize, text: &str, scale: usize) {
        self.glyphs(text, scale, |u, v| (x + u, y + v));
    }

    /// `text` reading upwards (turned 90° anticlockwise), starting at `bottom`.
    pub(crate) fn text_up(&mut self, x: usize, bottom: usize, text: &str, scale: usize) {
        self.glyphs(text, scale, |u, v| (x + v, bottom.wrapping_sub(u)));
    }

    /// Sets the pixels of `text`'s glyphs, `u` along the text and `v` down the glyph, placed by `at`.
    fn glyphs(&mut self, text: &str, scale: usize, at: impl Fn(usize, usize) -> (usize, usize)) {
        for (i, c) in text.chars().enumerate() {
            for gy in 0..font::HEIGHT * scale {
                for gx in 0..font::WIDTH * scale {
                    if font::pixel(c, gx / scale, gy / scale) {
                        let (x, y) = at(i * (font::WIDTH + 1) * scale + gx, gy);
                        self.set(x, y, INK);
                    }
                }
            }
        }
    }

    /// A one-pixel frame just outside the `side`-square at (x, y).
    pub(crate) fn frame(&mut self, x: usize, y: usize, w: usize, h: usize) {
        for i in 0..w + 2 {
            self.set(x + i - 1, y - 1, FRAME);
            self.set(x + i - 1, y + h, FRAME);
        }
        for j in 0..h + 2 {
            self.set(x - 1, y + j - 1, FRAME);
            self.set(x + w, y + j - 1, FRAME);
        }
    }
}

/// Pixels a string takes along its direction.
pub(crate) fn text_len(text: &str, scale: usize) -> usize {
    (text.chars().count() * (font::WIDTH + 1) * scale).saturating_sub(scale)
}

/// Height of two lines of large type: the room a figure keeps for its title.
pub(crate) const TITLE_ROOM: usize = (2 * font::HEIGHT + LINE_GAP) * 2;
/// Pixels between lines of a title, at scale 1.
const LINE_GAP: usize = 2;

/// A title set in a given width: large type on at most two lines, else small type on as many as
/// it takes. Narrow figures (few heads) would otherwise cut it.
pub(crate) struct Title {
    scale: usize,
    lines: Vec<String>,
}

impl Title {
    pub(crate) fn fit(text: &str, width: usize) -> Self {
        let large = wrap(text, chars_in(width, 2));
        if large.len() <= 2 {
            return Self {
                scale: 2,
                lines: large,
            };
        }
        Self {
            scale: 1,
            lines: wrap(text, chars_in(width, 1)),
        }
    }

    pub(crate) fn height(&self) -> usize {
        (self.lines.len() * (font::HEIGHT + LINE_GAP) - LINE_GAP) * self.scale
    }

    /// Draws the lines from the top-left corner (`x`, `y`).
    pub(crate) fn draw(&self, c: &mut Canvas, x: usize, y: usize) {
        for (i, line) in self.lines.iter().enumerate() {
            let top = y + i * (font::HEIGHT + LINE_GAP) * self.scale;
            c.text(x, top, line, self.scale);
        }
    }
}

/// Characters of type at `scale` that fit in `width` pixels; at least one.
fn chars_in(width: usize, scale: usize) -> usize {
    ((width + scale) / ((font::WIDTH + 1) * scale)).max(1)
}

/// `text` in lines of at most `n` characters, broken after spaces or `/` (model paths); a word
/// longer than a line is broken where the line ends. Only spaces are left out.
fn wrap(text: &str, n: usize) -> Vec<String> {
    let n = n.max(1);
    let mut lines = Vec::new();
    let mut line: Vec<char> = Vec::new();
    let end = |line: &mut Vec<char>| -> String {
        let s: String = line.drain(..).collect();
        s.trim_end_matches(' ').to_string()
    };
    for piece in text.split_inclusive([' ', '/']) {
        let mut piece: Vec<char> = piece.chars().collect();
        loop {
            if line.is_empty() && !lines.is_empty() {
                // A continuation line does not start with the spaces it broke at.
                let spaces = piece.iter().take_while(|&&c| c == ' ').count();
                piece.drain(..spaces);
            }
            // A space that ends the line is not drawn.
            let need = piece.len() - usize::from(piece.last() == Some(&' '));
            if line.len() + need <= n {
                line.append(&mut piece);
                break;
            }
            if line.is_empty() {
                let rest = piece.split_off(n);
                lines.push(piece.into_iter().collect());
                piece = rest;
            } else {
                lines.push(end(&mut line));
            }
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(end(&mut line));
    }
    lines
}

pub(crate) struct PngSink {
    layout: Layout,
    labels: Vec<String>,
    /// Bands written so far.
    band: usize,
    stream: png::StreamWriter<'static, Shared>,
    out: Shared,
    path: std::path::PathBuf,
}

/// The output, shared with the PNG encoder, which drops its writer (and the IEND chunk it writes
/// then) without a way to get it back or to see a write error: so errors are kept here.
#[derive(Clone)]
struct Shared(Rc<RefCell<(Option<Out>, Option<std::io::Error>)>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut inner = self.0.borrow_mut();
        let (out, failed) = &mut *inner;
        let result = match out {
            Some(out) => out.write(buf),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if let Err(e) = &result {
            failed.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
        }
        result
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.0.borrow_mut().0 {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl PngSink {
    pub(crate) fn new(out: Out, h: &Header<'_>) -> Result<Self> {
        let sel = h.selection;
        let labels: Vec<String> = h
            .tokens
            .text
            .iter()
            .map(|s| clip(&visible(s, true), LABEL_CHARS))
            .collect();
        let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
        let layout = Layout::new(h.tokens.len(), sel.heads.len(), sel.layers.len(), longest);
        let path = out.path().to_path_buf();
        let png_err = |e| png_error(&path, e);
        let shared = Shared(Rc::new(RefCell::new((Some(out), None))));
        let mut encoder =
            png::Encoder::new(shared.clone(), layout.width as u32, layout.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let writer = encoder.write_header().map_err(png_err)?;
        let mut stream = writer.into_stream_writer().map_err(png_err)?;
        stream
            .write_all(&title_strip(&layout, h.model, h.tokens.len()).rgb)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            layout,
            labels,
            band: 0,
            stream,
            out: shared,
            path,
        })
    }

    fn draw_band(&self, a: &LayerAttention) -> Canvas {
        let l = &self.layout;
        let mut c = Canvas::new(l.width, l.band_h);
        c.text(MARGIN, 6, &format!("Layer {}", a.layer), 2);
        let s = l.label_scale;
        for (i, &head) in a.heads.iter().enumerate() {
            let (x, y) = l.origin_in_band(i);
            let title = format!("Head {head}");
            let ts = l.head_title_scale(&title);
            let tx = x + (l.side / 2).saturating_sub(text_len(&title, ts) / 2);
            c.text(tx, y - PANEL_TITLE + 2, &title, ts);
            for py in 0..l.side {
                let qs = l.tokens_at(py);
                for px in 0..l.side {
                    let ks = l.tokens_at(px);
                    let w = qs
                        .clone()
                        .flat_map(|q| a.row(i, q)[ks.clone()].iter().copied())
                        .fold(0.0f32, f32::max);
                    c.set(x + px, y + py, colormap(w));
                }
            }
            c.frame(x, y, l.side, l.side);
            for t in (0..l.tokens).step_by(l.label_stride) {
                let label = &self.labels[t];
                let centre = l.pixel_of(t);
                let half = font::HEIGHT * s / 2;
                // Queries: right-aligned left of the rows. Keys: below the columns, reading up.
                let lx = x.saturating_sub(4 + text_len(label, s));
                c.text(lx, (y + centre).saturating_sub(half), label, s);
                let bottom = y + l.side + 4 + text_len(label, s);
                c.text_up((x + centre).saturating_sub(half), bottom, label, s);
            }
        }
        if self.band == 0 {
            self.colour_bar(&mut c);
        }
        c
    }

    /// 1 at the top, 0 at the bottom, beside the first row of heatmaps.
    fn colour_bar(&self, c: &mut Canvas) {
        let l = &self.layout;
        let x = MARGIN + l.cols * l.panel_w + 16;
        let (_, y) = l.origin_in_band(0);
        let last = l.side.saturating_sub(1).max(1);
        for j in 0..l.side {
            let colour = colormap(1.0 - j as f32 / last as f32);
            for i in 0..BAR_WIDTH {
                c.set(x + i, y + j, colour);
            }
        }
        c.frame(x, y, BAR_WIDTH, l.side);
        for (label, j) in [("1", 0), ("0.5", last / 2), ("0", last)] {
            for i in 0..3 {
                c.set(x + BAR_WIDTH + i, y + j, INK);
            }
            c.text(x + BAR_WIDTH + 5, (y + j).saturating_sub(3), label, 1);
        }
    }
}

/// The strip above the bands: the model and the prompt's length.
fn title_strip(layout: &Layout, model: &str, tokens: usize) -> Canvas {
    let mut c = Canvas::new(layout.width, TITLE);
    let suffix = format!(": {tokens} tokens");
    let room = layout.width - 2 * MARGIN;
    let model = visible(model, true);
    // The whole model path where it fits, else its end: it says more than the start.
    let most = model.chars().count().min(3 * room / (font::WIDTH + 1));
    (0..=most)
        .rev()
        .map(|keep| Title::fit(&format!("{}{suffix}", tail(&model, keep)), room))
        .find(|t| t.height() <= TITLE_ROOM)
        .unwrap_or_else(|| Title::fit(&suffix, room))
        .draw(&mut c, MARGIN, MARGIN);
    c
}

impl Sink for PngSink {
    fn layer(&mut self, a: &LayerAttention) -> Result<()> {
        let band = self.draw_band(a);
        self.stream
            .write_all(&band.rgb)
            .map_err(|e| Error::io(&self.path, e))?;
        self.band += 1;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let bottom = Canvas::new(self.layout.width, MARGIN);
        self.stream
            .write_all(&bottom.rgb)
            .map_err(|e| Error::io(&self.path, e))?;
        let Self {
            stream, out, path, ..
        } = *self;
        // Finishing the stream drops the encoder's writer, which writes IEND through `out`.
        stream.finish().map_err(|e| png_error(&path, e))?;
        let (out, failed) = out.0.replace((None, None));
        if let Some(e) = failed {
            return Err(Error::io(&path, e));
        }
        out.map_or(Ok(()), Out::finish)
    }
}

fn png_error(path: &std::path::Path, e: png::EncodingError) -> Error {
    match e {
        png::EncodingError::IoError(err) => Error::io(path, err),
        e => Error::Input(format!("{}: cannot write the PNG: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colormap_runs_from_purple_to_yellow() {
        assert_eq!(colormap(0.0), VIRIDIS[0]);
        assert_eq!(colormap(1.0), VIRIDIS[10]);
        assert_eq!(colormap(0.5), VIRIDIS[5]);
        assert_eq!(colormap(-3.0), VIRIDIS[0]);
        assert_eq!(colormap(f32::NAN), VIRIDIS[0]);
    }

    #[test]
    fn titles_wrap_at_spaces_and_slashes_and_keep_every_character() {
        assert_eq!(
            wrap("ablated - clean: the logit", 12),
            ["ablated -", "clean: the", "logit"]
        );
        assert_eq!(
            wrap("/models/gpt2-medium: 5 tokens", 12),
            ["/models/", "gpt2-medium:", "5 tokens"]
        );
        // A word longer than a line breaks where the line ends.
        assert_eq!(
            wrap("a Supercalifragilistic  b", 8),
            ["a", "Supercal", "ifragili", "stic  b"]
        );
        assert_eq!(wrap("", 8), [""]);
        let text = "direct logit attribution to \"  Paris\", per head of /a/long/path/to/a/model";
        for n in 1..40 {
            let lines = wrap(text, n);
            assert!(
                lines.iter().all(|l| l.chars().count() <= n),
                "{n}: {lines:?}"
            );
            let ink = |s: &str| s.chars().filter(|&c| c != ' ').collect::<String>();
            assert_eq!(ink(&lines.concat()), ink(text), "{n}");
        }
        // Large type on two lines at most, else small type.
        let large = Title::fit("two lines", 8 * 12);
        assert_eq!((large.scale, large.lines.len()), (2, 2));
        assert_eq!(large.height(), TITLE_ROOM);
        let small = Title::fit("four lines of large type", 8 * 12);
        assert_eq!((small.scale, small.lines.len()), (1, 2));
        assert_eq!(small.height(), 2 * font::HEIGHT + LINE_GAP);
        assert_eq!(Title::fit("a", 100).height(), 2 * font::HEIGHT);
    }

    /// Ink pixels in `c`.
    fn ink(c: &Canvas) -> usize {
        c.rgb.chunks(3).filter(|p| *p == INK).count()
    }

    /// The ink of `text` drawn alone at `scale`.
    fn ink_alone(text: &str, scale: usize) -> usize {
        let mut c = Canvas::new(text_len(text, scale) + 1, font::HEIGHT * scale);
        c.text(0, 0, text, scale);
        ink(&c)
    }

    #[test]
    fn the_title_shows_the_whole_model_path_in_the_smallest_figures() {
        let paths = [
            "tests/fixtures/tiny",
            "/home/someone/src/gpt2/tests/fixtures/induction",
            "/home/someone/models/a-long-folder-name/checkpoints/step-12000/exported/gpt2-small-finetuned",
        ];
        // One head of one token; the tiny fixture's 2 layers × 4 heads on 5 tokens.
        for layout in [Layout::new(1, 1, 1, 1), Layout::new(5, 4, 2, 4)] {
            for model in paths {
                let text = format!("{model}: 5 tokens");
                let drawn = ink(&title_strip(&layout, model, 5));
                assert!(
                    [ink_alone(&text, 2), ink_alone(&text, 1)].contains(&drawn),
                    "{} px wide, {model}: {drawn} pixels of ink",
                    layout.width
                );
            }
        }
        // A path too long for three lines of small type keeps its end, after "...".
        let long = format!("/{}/gpt2-small", "folder/".repeat(40));
        let layout = Layout::new(1, 1, 1, 1);
        let drawn = ink(&title_strip(&layout, &long, 5));
        assert!(drawn > ink_alone("...gpt2-small: 5 tokens", 1), "{drawn}");
        assert!(drawn < ink_alone(&long, 1), "{drawn}");
    }

    #[test]
    fn heatmap_titles_clear_the_next_panel() {
        // One token, twelve heads: "Head 10" in large type is wider than a panel.
        for layout in [Layout::new(1, 12, 1, 1), Layout::new(5, 4, 2, 4)] {
            for head in 0..layout.heads {
                let title = format!("Head {head}");
                let scale = layout.head_title_scale(&title);
                assert!(text_len(&title, scale) + 4 <= layout.panel_w, "{title}");
            }
        }
        assert_eq!(Layout::new(5, 4, 2, 4).head_title_scale("Head 3"), 2);
    }

    #[test]
    fn heatmaps_fit_and_pool_long_prompts() {
        let short = Layout::new(6, 4, 1, 4);
        assert_eq!(short.side, 6 * MAX_CELL);
        assert_eq!((short.cols, short.rows), (4, 1));
        assert_eq!(short.tokens_at(0), 0..1);
        assert_eq!(short.tokens_at(short.side - 1), 5..6);
        assert_eq!(short.label_stride, 1);
        let long = Layout::new(1024, 12, 12, LABEL_CHARS);
        assert_eq!(long.side, MAX_SIDE);
        assert_eq!(long.tokens_at(1), 4..8);
        assert_eq!((long.cols, long.rows), (4, 3));
        assert!(long.label_stride >= 32);
        // Panels do not overlap: the next one starts past this one's labels.
        let (x0, y0) = long.heatmap_origin(0, 0);
        let (x1, _) = long.heatmap_origin(0, 1);
        let (_, y4) = long.heatmap_origin(0, 4);
        assert!(x1 >= x0 + long.side + long.label_px);
        assert!(y4 >= y0 + long.side + long.label_px + PANEL_TITLE);
        let (_, y_next) = long.heatmap_origin(1, 0);
        assert_eq!(y_next - y0, long.band_h);
        assert!(long.heatmap_origin(11, 11).1 + long.side < long.height);
    }
}
