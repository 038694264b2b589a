//! `gpt2 train`'s report: `OUT/report.html` after a short run, read as text (self-contained,
//! every chart and thumbnail there, the folder's name escaped), the `--plot` PNG,
//! `--report-only` on a finished run (and on logs with a phase change in them), the thumbnails of
//! the trained fixture showing its known heads, and the page in headless Chromium (ignored:
//! `cargo test -- --ignored`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine as _;
use common::*;

/// The run's folder: its name is markup, which the page must show as text.
const NAME: &str = "run<img src=x onerror=alert(1)>";

/// One short run on the induction task, shared by the tests: (folder, --plot PNG, stdout).
fn short_run() -> &'static (PathBuf, PathBuf, String) {
    static RUN: OnceLock<(PathBuf, PathBuf, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = scratch("train-report", "short");
        let (out, png) = (dir.join(NAME), dir.join("curves.png"));
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.json");
        let run = gpt2(&[
            "train",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--task",
            "induction",
            "--steps",
            "30",
            "--eval-every",
            "10",
            "--batch-size",
            "4",
            "--seq-len",
            "64",
            "--out",
            out.to_str().expect("utf-8 path"),
            "--plot",
            png.to_str().expect("utf-8 path"),
        ])
        .expect("gpt2 train runs");
        assert!(run.status.success(), "{}", stderr(&run));
        let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
        (out, png, stdout)
    })
}

/// The attribute values `src="..."` in `html`.
fn sources(html: &str) -> Vec<&str> {
    html.split("src=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect()
}

/// The number of points of each `<polyline>` of the SVG chart `id`.
fn polylines(html: &str, id: &str) -> Result<Vec<usize>> {
    let chart = html
        .split(&format!("<svg class=\"chart\" id=\"chart-{id}\""))
        .nth(1)
        .and_then(|s| s.split("</svg>").next())
        .ok_or(format!("no chart {id}"))?;
    Ok(chart
        .split("points=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(|p| p.split_whitespace().count())
        .collect())
}

/// A PNG's width and height from its header, after checking its signature.
fn png_size(bytes: &[u8]) -> Result<(u32, u32)> {
    assert!(bytes.len() > 24, "too short for a PNG");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    // The whole image decodes too.
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf)?;
    assert_eq!(
        (info.width, info.height),
        (be(&bytes[16..20]), be(&bytes[20..24]))
    );
    Ok((info.width, info.height))
}

#[test]
fn a_run_writes_a_self_contained_report_with_every_chart_and_head() -> Result {
    let (out, _, stdout) = short_run();
    assert!(stdout.contains("no phase change found"), "{stdout}");
    assert!(
        stdout.contains("report: ") && stdout.contains("report.html"),
        "{stdout}"
    );
    let html = std::fs::read_to_string(out.join("report.html"))?;
    assert!(html.starts_with("<!doctype html>"));
    // Self-contained: one inline script, no link, no address, images only as data.
    assert_eq!(html.matches("<script").count(), 1);
    assert!(!html.contains("<script src") && !html.contains("<link"));
    for needle in ["http:", "https:", "@import", "url(", "//cdn"] {
        assert!(!html.contains(needle), "{needle} in the page");
    }
    let srcs = sources(&html);
    assert_eq!(srcs.len(), 8, "one image per head (2 layers × 4 heads)");
    // The folder's name is text.
    assert!(!html.contains("<img src=x"));
    assert!(html.contains("Training report: run&lt;img src=x onerror=alert(1)&gt;"));
    // What the run was asked to do, from training.json.
    assert!(
        html.contains("Trained from a fresh layout on the induction task: 30 of 30 steps of 4 × 64 tokens, lr 1e-3 (constant)"),
        "{html}"
    );
    // The loss: every step, and the three evaluations of each loss.
    assert_eq!(polylines(&html, "loss")?, [30, 3, 3]);
    // Each score over the steps: one curve per head, three evaluations each.
    for id in ["induction", "previous-token", "duplicate-token"] {
        assert_eq!(polylines(&html, id)?, [3; 8], "{id}");
    }
    for (l, h) in (0..2).flat_map(|l| (0..4).map(move |h| (l, h))) {
        assert!(html.contains(&format!("<g class=\"series\" data-head=\"{l}.{h}\">")));
        assert!(html.contains(&format!("<figure class=\"thumb\" data-head=\"{l}.{h}\">")));
    }
    assert!(html.contains("<section id=\"phase-change\" class=\"none\">"));
    // The thumbnails: each head's attention on the 100 tokens of the repeated sequence.
    assert!(html.contains("data-thumbnails=\"8\""));
    for src in srcs {
        let b64 = src
            .strip_prefix("data:image/png;base64,")
            .ok_or("not a data PNG")?;
        let png = base64::engine::general_purpose::STANDARD.decode(b64)?;
        assert_eq!(png_size(&png)?, (100, 100));
    }
    Ok(())
}

#[test]
fn plot_writes_the_curves_as_a_png() -> Result {
    let (_, png, _) = short_run();
    let (w, h) = png_size(&std::fs::read(png)?)?;
    assert_eq!(w, 1200);
    assert!((500..1200).contains(&h), "height {h}");
    Ok(())
}

#[test]
fn report_only_writes_the_same_report_again_and_a_plot() -> Result {
    let (out, _, _) = short_run();
    let before = std::fs::read(out.join("report.html"))?;
    let png = scratch("train-report", "again").join("curves.png");
    let run = gpt2(&[
        "train",
        "--report-only",
        "--out",
        out.to_str().ok_or("path")?,
        "--plot",
        png.to_str().ok_or("path")?,
    ])?;
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        std::fs::read(out.join("report.html"))?,
        before,
        "deterministic"
    );
    png_size(&std::fs::read(&png)?)?;
    // A folder without a run, and a --plot that cannot be written: one error line each.
    let empty = scratch("train-report", "empty");
    std::fs::create_dir_all(&empty)?;
    let run = gpt2(&[
        "train",
        "--report-only",
        "--out",
        empty.to_str().ok_or("p")?,
    ])?;
    assert_error(&run, 2, &["--out", "holds no training run"]);
    let nowhere = empty.join("no/such/folder.png");
    let run = gpt2(&[
        "train",
        "--report-only",
        "--out",
        out.to_str().ok_or("p")?,
        "--plot",
        nowhere.to_str().ok_or("p")?,
    ])?;
    assert_error(&run, 2, &["--plot"]);
    Ok(())
}

/// `metrics.jsonl` of ten evaluations of the tiny layout's 2 × 4 heads in which head 1.1
/// becomes an induction head and head 0.0 a previous-token head between steps 40 and 60.
fn metrics_with_a_phase_change() -> String {
    let ind = [0.02, 0.03, 0.03, 0.05, 0.6, 0.85, 0.88, 0.9, 0.9, 0.9];
    let prev = [0.1, 0.12, 0.15, 0.2, 0.6, 0.8, 0.82, 0.83, 0.83, 0.84];
    let icl = [6.0, 5.9, 5.9, 5.8, 2.5, 1.0, 0.9, 0.9, 0.85, 0.85];
    let mut s = String::new();
    for i in 0..10 {
        let heads: Vec<serde_json::Value> = (0..2)
            .flat_map(|l| (0..4).map(move |h| (l, h)))
            .map(|(l, h)| {
                let (p, d) = match (l, h) {
                    (0, 0) => (prev[i], 0.02),
                    (1, 1) => (0.1, ind[i]),
                    _ => (0.05, 0.02),
                };
                serde_json::json!({"layer": l, "head": h, "previous_token": p, "induction": d,
                    "duplicate_token": 0.01, "first_token": 0.1,
                    "label": if d > 0.5 { "induction" } else { "<b>mixed</b>" }})
            })
            .collect();
        let line = serde_json::json!({"step": 10 * (i + 1), "held_out_loss": icl[i] + 0.5,
            "icl_loss": icl[i], "heads": heads, "train_loss": icl[i] + 0.25, "lr": 1e-3,
            "grad_norm": 1.0});
        s += &format!("{line}\n");
    }
    s
}

#[test]
fn report_only_finds_a_phase_change_in_the_logs() -> Result {
    let (out, _, _) = short_run();
    // The short run's model and steps, with evaluations that show a phase change.
    let dir = scratch("train-report", "phase");
    std::fs::create_dir_all(&dir)?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "steps.jsonl",
    ] {
        std::fs::copy(out.join(f), dir.join(f))?;
    }
    std::fs::write(dir.join("metrics.jsonl"), metrics_with_a_phase_change())?;
    let run = gpt2(&["train", "--report-only", "--out", dir.to_str().ok_or("p")?])?;
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("phase change at step 50 (steps 40–60): in-context loss 5.800→1.000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("heads 1.1 (induction: induction 0.05→0.85"),
        "{stdout}"
    );
    assert!(stdout.contains("0.0 (<b>mixed</b>: induction 0.02→0.02, previous-token 0.20→0.80)"));
    let html = std::fs::read_to_string(dir.join("report.html"))?;
    assert!(html.contains("<section id=\"phase-change\" data-step=\"50\">"));
    assert!(
        html.contains("<tr data-head=\"1.1\"><td>1.1</td><td>induction</td><td>0.05 → 0.85</td>")
    );
    assert!(html.contains("&lt;b&gt;mixed&lt;/b&gt;") && !html.contains("<b>mixed"));
    // The window shaded in the loss chart and in the three score charts.
    assert_eq!(html.matches("<rect class=\"band\"").count(), 4);
    Ok(())
}

#[test]
#[ignore = "needs chromium; CI runs it: cargo test -- --ignored"]
fn report_opens_in_chromium_without_errors() -> Result {
    let (out, _, _) = short_run();
    let Some(browser) = chromium() else {
        skip(
            "report_opens_in_chromium_without_errors",
            "no chromium on PATH (Debian: apt-get install chromium)",
        );
        return Ok(());
    };
    let profile = tmp("train-report-chromium");
    // The folder's name has characters a URL must escape.
    let path = out.join("report.html");
    let url = format!(
        "file://{}",
        path.to_str()
            .ok_or("path")?
            .replace('%', "%25")
            .replace(' ', "%20")
            .replace('<', "%3C")
            .replace('>', "%3E")
    );
    let (dom, log) = chromium_run(browser, &profile, &url, &["--dump-dom"])?;
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "{console:?}");
    assert!(
        dom.contains(r#"<pre id="errors" hidden=""></pre>"#),
        "errors shown: {dom}"
    );
    // Rendered: the charts and the thumbnails are in the document, the name is text.
    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 4, "{dom}");
    assert_eq!(dom.matches("<figure class=\"thumb\"").count(), 8);
    assert!(!dom.contains("<img src=\"x\""));
    Ok(())
}

/// The mean weight a thumbnail shows at the cells `keys(q)` picks, read back through the
/// colour map (the nearest of its colours for 0, 1/255, ..., 1).
fn mean_weight(png: &[u8], keys: impl Fn(usize) -> Option<usize>) -> Result<f32> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info()?;
    let mut rgb = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut rgb)?;
    let t = info.width as usize;
    let scale: Vec<[u8; 3]> = (0..=255)
        .map(|i| gpt2::inspect::image::colormap(i as f32 / 255.0))
        .collect();
    let weight = |p: &[u8]| {
        let d = |c: &[u8; 3]| {
            (0..3)
                .map(|i| (c[i] as i32 - p[i] as i32).pow(2))
                .sum::<i32>()
        };
        (0..=255).min_by_key(|&i| d(&scale[i])).unwrap_or(0) as f32 / 255.0
    };
    let cells: Vec<f32> = (0..t)
        .filter_map(|q| keys(q).map(|k| weight(&rgb[(q * t + k) * 3..][..3])))
        .collect();
    Ok(cells.iter().sum::<f32>() / cells.len().max(1) as f32)
}

#[test]
fn thumbnails_show_the_trained_fixtures_heads() -> Result {
    // tests/fixtures/induction: previous-token heads 0.0 and 0.1, induction head 1.1.
    let loaded = gpt2::ModelSource::dir(fixture("induction")).load(&gpt2::LoadOptions::default())?;
    let t = gpt2::train::report::thumbnails(&loaded.model, &loaded.tokenizer, None)?;
    assert_eq!((t.repeat_len, t.tokens.len(), t.heads.len()), (50, 100, 4));
    let png = |l: usize, h: usize| -> Result<&[u8]> {
        let th = t.heads.iter().find(|x| (x.layer, x.head) == (l, h));
        Ok(&th.ok_or("no thumbnail")?.png)
    };
    let previous = |q: usize| q.checked_sub(1);
    let induction = |q: usize| (q >= 50).then(|| q - 49);
    for (l, h) in [(0, 0), (0, 1)] {
        let w = mean_weight(png(l, h)?, previous)?;
        assert!(w > 0.5, "head {l}.{h}: {w} on the previous token");
    }
    let w = mean_weight(png(1, 1)?, induction)?;
    assert!(w > 0.5, "head 1.1: {w} on the token after the first copy");
    assert!(mean_weight(png(1, 1)?, previous)? < 0.2);
    Ok(())
}
