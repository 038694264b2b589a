//! `OUT/report.html`: one self-contained page (no network: inline CSS, inline SVG charts, the
//! thumbnails as `data:` PNGs, a few lines of inline script). Everything from the run (the
//! folder's name, head labels, token text) goes in through [`escape_html`]; the page works
//! without its script, which only highlights a head's curves and shows its own errors.

use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::chart::{tick_label, ticks, Frame, Panel};
use super::phase::{PhaseChange, ICL_DROP, INDUCTION_RISE};
use super::Thumbnails;
use crate::inspect::html::escape_html;

/// What the page shows.
pub(super) struct Page<'a> {
    /// The run's folder, as the title names it.
    pub(super) name: &'a str,
    /// One line about the model and the run.
    pub(super) summary: &'a str,
    pub(super) loss: &'a Panel,
    pub(super) scores: &'a [Panel],
    pub(super) phase: Option<&'a PhaseChange>,
    pub(super) thumbnails: &'a Thumbnails,
}

const STYLE: &str = "
  body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1150px; }
  h1 { font-size: 1.3em; margin: 0 0 .3em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
  .note { color: #666; }
  #errors { color: #b00; white-space: pre-wrap; }
  svg.chart { display: block; font: 11px system-ui, sans-serif; }
  svg.chart .axis { stroke: #888; fill: none; }
  svg.chart .grid { stroke: #eee; }
  svg.chart .band { fill: #fde8c8; }
  svg.chart polyline { fill: none; stroke-width: 1.6; stroke-linejoin: round; }
  svg.chart polyline.thin { stroke-width: 1; }
  svg.chart .series.dim { opacity: .12; }
  svg.chart .series.lit polyline { stroke-width: 3; }
  .legend { display: flex; flex-wrap: wrap; gap: .2em 1em; font-size: 12px; margin: .3em 0 0 50px; }
  .legend span { cursor: default; white-space: nowrap; }
  .legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: .3em; }
  .scores { display: flex; flex-wrap: wrap; gap: .5em; }
  #phase-change { padding: .6em 1em; background: #fdf3e3; border-left: 4px solid #e8a33d; }
  #phase-change.none { background: #f4f4f4; border-color: #bbb; }
  #phase-change table { border-collapse: collapse; margin-top: .4em; font-variant-numeric: tabular-nums; }
  #phase-change td, #phase-change th { padding: .1em .8em .1em 0; text-align: left; }
  .thumbs { display: grid; gap: 10px; justify-content: start; }
  .thumb { margin: 0; text-align: center; font: 11px/1.3 ui-monospace, monospace; }
  .thumb img { width: 120px; height: 120px; image-rendering: pixelated; border: 1px solid #ccc; display: block; }
  .thumb .kind { color: #555; }
  .thumb .kind.induction, .thumb .kind.previous-token { color: #1f5fbf; font-weight: 600; }
  .tokens { font: 12px ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }
";

/// Shows the page's own errors on it (and in a headless browser's DOM), and lights up a head's
/// curves in every chart while the pointer is on one of them or on its legend entry.
const SCRIPT: &str = "
(function () {
  var box = document.getElementById('errors');
  function show(msg) { box.hidden = false; box.textContent += msg + '\\n'; }
  window.addEventListener('error', function (e) { show('error: ' + e.message); });
  function light(head, on) {
    document.querySelectorAll('.scores .series').forEach(function (g) {
      var mine = g.getAttribute('data-head') === head;
      g.classList.toggle('lit', on && mine);
      g.classList.toggle('dim', on && !mine);
    });
  }
  document.querySelectorAll('[data-head]').forEach(function (el) {
    var head = el.getAttribute('data-head');
    el.addEventListener('mouseenter', function () { light(head, true); });
    el.addEventListener('mouseleave', function () { light(head, false); });
  });
})();
";

/// The whole page.
pub(super) fn page(p: &Page<'_>) -> String {
    let name = escape_html(p.name);
    let mut s = String::with_capacity(64 << 10);
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>gpt2 train: {name}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <pre id=\"errors\" hidden></pre>\n<h1>Training report: {name}</h1>\n\
         <p class=\"note\">{}</p>\n",
        escape_html(p.summary)
    );
    s += &phase_section(p.phase);
    s += "<h2>Loss</h2>\n";
    s += &chart(p.loss, 1000, 340);
    s += &legend(p.loss);
    s += "<h2>Head scores over training</h2>\n<p class=\"note\">As <code>inspect-heads \
          --scores</code> measures them at each evaluation. Point at a curve or a legend \
          entry to pick out its head.</p>\n<div class=\"scores\">\n";
    for panel in p.scores {
        s += "<div>\n";
        s += &chart(panel, 370, 250);
        s += "</div>\n";
    }
    s += "</div>\n";
    if let Some(first) = p.scores.first() {
        s += &legend(first);
    }
    s += &thumbnail_section(p.thumbnails);
    let _ = write!(s, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    s
}

fn phase_section(phase: Option<&PhaseChange>) -> String {
    let Some(p) = phase else {
        return format!(
            "<section id=\"phase-change\" class=\"none\"><h2>Phase change</h2>\
             <p>No phase change found: the best head's induction score never jumped (a rise of \
             {INDUCTION_RISE} or more within at most half of the evaluated steps) while the \
             in-context loss fell by {:.0}% or more. The rule is in the documentation of \
             <code>gpt2::train::report::phase</code>.</p></section>\n",
            ICL_DROP * 100.0
        );
    };
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
    let g = |v: Option<f32>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    let mut s = format!(
        "<section id=\"phase-change\" data-step=\"{}\"><h2>Phase change at step {}</h2>\n\
         <p>Between steps {} and {} (shaded in the charts) the best induction score rose from \
         {:.2} to {:.2} while the in-context loss fell from {:.3} to {:.3}.</p>\n\
         <table><tr><th></th><th>step {}</th><th>step {}</th></tr>\n\
         <tr><td>in-context loss</td><td>{:.3}</td><td>{:.3}</td></tr>\n\
         <tr><td>training loss</td><td>{}</td><td>{}</td></tr>\n\
         <tr><td>held-out loss</td><td>{}</td><td>{}</td></tr>\n</table>\n",
        p.step,
        p.step,
        p.from_step,
        p.to_step,
        p.best_induction_before,
        p.best_induction_after,
        p.icl_loss_before,
        p.icl_loss_after,
        p.from_step,
        p.to_step,
        p.icl_loss_before,
        p.icl_loss_after,
        f(p.train_loss_before),
        f(p.train_loss_after),
        f(p.held_out_loss_before),
        f(p.held_out_loss_after),
    );
    if !p.heads.is_empty() {
        s += "<table class=\"heads\"><tr><th>head</th><th>label after</th>\
              <th>induction</th><th>previous-token</th></tr>\n";
        for h in &p.heads {
            let _ = writeln!(
                s,
                "<tr data-head=\"{l}.{hd}\"><td>{l}.{hd}</td><td>{}</td><td>{} → {}</td>\
                 <td>{} → {}</td></tr>",
                escape_html(&h.label),
                g(h.induction_before),
                g(h.induction_after),
                g(h.previous_token_before),
                g(h.previous_token_after),
                l = h.layer,
                hd = h.head,
            );
        }
        s += "</table>\n";
    }
    s += "</section>\n";
    s
}

/// A panel as an inline SVG chart, `w` × `h` pixels.
fn chart(panel: &Panel, w: usize, h: usize) -> String {
    let f = Frame {
        left: 50.0,
        top: 28.0,
        width: w as f64 - 64.0,
        height: h as f64 - 62.0,
        x: panel.x,
        y: panel.y,
    };
    let mut s = format!(
        "<svg class=\"chart\" id=\"chart-{}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         role=\"img\" aria-label=\"{}\">\n<text x=\"{}\" y=\"16\" font-weight=\"600\">{}</text>\n",
        panel.id,
        escape_html(&panel.title),
        f.left,
        escape_html(&panel.title)
    );
    if let Some((a, b)) = panel.band {
        let _ = writeln!(
            s,
            "<rect class=\"band\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"/>",
            f.px(a),
            f.top,
            (f.px(b) - f.px(a)).max(2.0),
            f.height
        );
    }
    let (bottom, right) = (f.top + f.height, f.left + f.width);
    let ys = ticks(panel.y.0, panel.y.1, 5);
    for &v in &ys {
        let y = f.py(v);
        let _ = writeln!(
            s,
            "<line class=\"grid\" x1=\"{:.1}\" x2=\"{right:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            f.left,
            f.left - 6.0,
            y + 4.0,
            tick_label(v, &ys)
        );
    }
    let xs = ticks(panel.x.0, panel.x.1, 8);
    for &v in &xs {
        let x = f.px(v);
        let _ = writeln!(
            s,
            "<line class=\"axis\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{bottom:.1}\" y2=\"{:.1}\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            bottom + 4.0,
            bottom + 16.0,
            tick_label(v, &xs)
        );
    }
    let _ = writeln!(
        s,
        "<path class=\"axis\" d=\"M{:.1} {:.1}V{bottom:.1}H{right:.1}\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\
         <text transform=\"translate(12 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        f.left,
        f.top,
        f.left + f.width / 2.0,
        bottom + 30.0,
        f.top + f.height / 2.0,
        panel.y_label
    );
    for series in &panel.series {
        let colour = rgb(series.colour);
        let head = series
            .head
            .as_deref()
            .map(|h| format!(" data-head=\"{}\"", escape_html(h)))
            .unwrap_or_default();
        let _ = write!(
            s,
            "<g class=\"series\"{head}><title>{}</title>",
            escape_html(&series.name)
        );
        let points: Vec<String> = series
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline{} stroke=\"{colour}\" points=\"{}\"/>",
            if series.markers {
                ""
            } else {
                " class=\"thin\""
            },
            points.join(" ")
        );
        if series.markers {
            for &(x, y) in &series.points {
                let _ = write!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                    f.px(x),
                    f.py(y)
                );
            }
        }
        s += "</g>\n";
    }
    s += "</svg>\n";
    s
}

fn legend(panel: &Panel) -> String {
    let mut s = String::from("<div class=\"legend\">");
    for series in &panel.series {
        let head = series
            .head
            .as_deref()
            .map(|h| format!(" data-head=\"{}\"", escape_html(h)))
            .unwrap_or_default();
        let _ = write!(
            s,
            "<span{head}><i style=\"background:{}\"></i>{}</span>",
            rgb(series.colour),
            escape_html(&series.name)
        );
    }
    s += "</div>\n";
    s
}

fn thumbnail_section(t: &Thumbnails) -> String {
    let mut s = String::from("<h2>Attention of the final model</h2>\n");
    if t.heads.is_empty() {
        let _ = writeln!(
            s,
            "<p class=\"note\" id=\"thumbnails\" data-thumbnails=\"0\">{}</p>",
            escape_html(&t.note)
        );
        return s;
    }
    let _ = writeln!(
        s,
        "<p class=\"note\">Each head's attention (rows: queries, columns: keys; brighter is \
         more) on the sequence <code>inspect-heads --scores</code> measures induction on: {} \
         random tokens, then the same tokens again. A previous-token head draws the diagonal \
         just below the main one; an induction head, in the second half, a diagonal {} columns \
         left of the main one (the token after the same token's first copy). Labels and scores \
         are the last evaluation's.</p>",
        t.repeat_len,
        t.repeat_len.saturating_sub(1)
    );
    let per_row = t.n_head.clamp(1, 8);
    let _ = writeln!(
        s,
        "<div class=\"thumbs\" id=\"thumbnails\" data-thumbnails=\"{}\" \
         style=\"grid-template-columns: repeat({per_row}, auto)\">",
        t.heads.len()
    );
    for h in &t.heads {
        let kind = escape_html(&h.label);
        let score =
            |name: &str, v: Option<f32>| v.map(|v| format!("{name} {v:.2}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "<figure class=\"thumb\" data-head=\"{l}.{hd}\"><img alt=\"attention of head {l}.{hd}\" \
             src=\"data:image/png;base64,{}\"><figcaption>{l}.{hd} <span class=\"kind {kind}\">\
             {kind}</span><br>{} {}</figcaption></figure>",
            STANDARD.encode(&h.png),
            score("ind", h.induction),
            score("prev", h.previous_token),
            l = h.layer,
            hd = h.head,
        );
    }
    s += "</div>\n<details><summary>The tokens</summary><p class=\"tokens\">";
    let texts: Vec<String> = t.tokens.iter().map(|x| format!("{x:?}")).collect();
    s += &escape_html(&texts.join(" "));
    s += "</p></details>\n";
    s
}

fn rgb(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

#[cfg(test)]
mod tests {
    use super::super::chart::Series;
    use super::super::phase::HeadChange;
    use super::super::Thumbnail;
    use super::*;

    const EVIL: &str = "</title><script>alert(1)</script><img src=x onerror=alert(2)>";

    #[test]
    fn text_from_the_run_cannot_make_markup() {
        let panel = Panel {
            id: "loss",
            title: EVIL.into(),
            y_label: "loss",
            x: (0.0, 10.0),
            y: (0.0, 1.0),
            series: vec![Series {
                name: EVIL.into(),
                colour: [0, 0, 0],
                points: vec![(1.0, 0.5), (2.0, 0.25)],
                markers: true,
                head: Some(EVIL.into()),
            }],
            band: Some((1.0, 2.0)),
        };
        let phase = PhaseChange {
            step: 2,
            from_step: 1,
            to_step: 2,
            icl_loss_before: 1.0,
            icl_loss_after: 0.5,
            train_loss_before: None,
            train_loss_after: None,
            held_out_loss_before: None,
            held_out_loss_after: None,
            best_induction_before: 0.0,
            best_induction_after: 0.9,
            heads: vec![HeadChange {
                layer: 0,
                head: 0,
                induction_before: Some(0.0),
                induction_after: Some(0.9),
                previous_token_before: None,
                previous_token_after: None,
                label: EVIL.into(),
            }],
        };
        let thumbnails = Thumbnails {
            heads: vec![Thumbnail {
                layer: 0,
                head: 0,
                png: vec![1, 2, 3],
                label: EVIL.into(),
                induction: Some(0.9),
                previous_token: None,
            }],
            tokens: vec![EVIL.into()],
            repeat_len: 1,
            n_head: 1,
            note: String::new(),
        };
        let html = page(&Page {
            name: EVIL,
            summary: EVIL,
            loss: &panel,
            scores: std::slice::from_ref(&panel),
            phase: Some(&phase),
            thumbnails: &thumbnails,
        });
        assert!(!html.contains("<script>alert") && !html.contains("<img src=x"));
        assert!(html.contains("&lt;/title&gt;&lt;script&gt;alert(1)"));
        // One script, the page's own, and no address anywhere.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(!html.contains("http:") && !html.contains("https:") && !html.contains("src=\"//"));
        assert!(html.contains("src=\"data:image/png;base64,AQID\""));
        assert!(html.contains("<section id=\"phase-change\" data-step=\"2\">"));
    }
}
