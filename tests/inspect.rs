//! `gpt2 inspect-heads`: the real binary on the fixture checkpoints (attention against
//! transformers' goldens, every output format read back by an independent reader), and head scores
//! on a model built to have a previous-token head.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpt2::inspect::image::{colormap, Layout, LABEL_CHARS};
use gpt2::inspect::scores::{self, HeadType};
use gpt2::inspect::{self, LayerChoice, Selection, Tokens};
use gpt2::prompt::PromptOptions;
use gpt2::{
    random_checkpoint, Checkpoint, Config, DType, Device, Gpt2, LoadOptions, ModelSource, Prompt,
    Tensor,
};
use serde_json::Value;

mod common;
use common::{assert_one_line_error, fixture, gpt2, max_abs_diff, read_npy, Result};

/// Runs `inspect-heads --model-dir <fixture>` with `args`, expecting success.
fn inspect(model: &str, args: &[&str]) -> Result<Output> {
    let dir = fixture(model);
    let mut all = vec!["inspect-heads", "--model-dir", dir.to_str().ok_or("path")?];
    all.extend_from_slice(args);
    let out = gpt2(&all)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{all:?} failed: {stderr}");
    Ok(out)
}

fn inspect_json(model: &str, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    Ok(serde_json::from_slice(&inspect(model, &all)?.stdout)?)
}

/// `attention[head][query][key]` as (heads, T, T) f32.
fn matrix(v: &Value) -> Result<Tensor> {
    let heads = v.as_array().ok_or("attention")?;
    let mut data = Vec::new();
    let t = heads.first().and_then(Value::as_array).map_or(0, Vec::len);
    for head in heads {
        for row in head.as_array().ok_or("head")? {
            let row = row.as_array().ok_or("row")?;
            assert_eq!(row.len(), t, "rows hold every key");
            for w in row {
                data.push(w.as_f64().ok_or("weight")? as f32);
            }
        }
    }
    Ok(Tensor::from_vec(data, (heads.len(), t, t), &Device::Cpu)?)
}

#[test]
fn json_attention_of_every_layer_equals_transformers() -> Result {
    for name in ["tiny", "tiny-b"] {
        let (g, text) = common::goldens(name, "goldens")?;
        let prompt = text["input_texts"][0].as_str().ok_or("input_texts")?;
        let v = inspect_json(name, &["--layer", "all", "--prompt", prompt])?;
        let ids: Vec<u32> = g["input_ids"].get(0)?.to_dtype(DType::U32)?.to_vec1()?;
        let got: Vec<u32> = serde_json::from_value(v["token_ids"].clone())?;
        assert_eq!(got, ids, "{name}: the prompt encodes to the goldens' ids");
        assert_eq!(v["tokens"].as_array().map(Vec::len), Some(ids.len()));
        let layers = v["layers"].as_array().ok_or("layers")?;
        let n_layer = g.keys().filter(|k| k.starts_with("attn.")).count();
        assert_eq!(layers.len(), n_layer);
        for (l, layer) in layers.iter().enumerate() {
            assert_eq!(layer["layer"], l);
            let a = matrix(&layer["attention"])?;
            let d = max_abs_diff(&a, &g[&format!("attn.{l}")].get(0)?)?;
            println!("{name}: layer {l} max |Δattention| = {d:.3e}");
            assert!(d <= 1e-5, "{name} layer {l}: max |Δ| = {d:e}");
            let sums = a.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        }
        // One layer, one head: the same numbers, under "layer".
        let v = inspect_json(name, &["--layer", "1", "--head", "2", "--prompt", prompt])?;
        assert_eq!(
            (v["layer"].as_u64(), v["heads"].clone()),
            (Some(1), serde_json::json!([2]))
        );
        let want = g["attn.1"].get(0)?.narrow(0, 2, 1)?;
        assert!(max_abs_diff(&matrix(&v["attention"])?, &want)? <= 1e-5);
    }
    Ok(())
}

/// A 1-layer model whose head 0 attends to the previous token (queries are the keys of the
/// position before, read off one-hot position embeddings) and whose head 1 attends evenly.
fn previous_token_model() -> Result<Gpt2> {
    let config = Config {
        vocab_size: 64,
        n_positions: 32,
        n_embd: 64,
        n_layer: 1,
        n_head: 2,
        bos_token_id: 63,
        eos_token_id: 63,
        ..Config::default()
    };
    let (c, t) = (config.n_embd, config.n_positions);
    let mut map = random_checkpoint(&config, 1)?;
    let dev = &Device::Cpu;
    // Tokens carry nothing; position p is e_p, so ln_1 gives a·e_p - b·1 for all p alike.
    map.insert(
        "wte.weight".into(),
        Tensor::zeros((64, c), DType::F32, dev)?,
    );
    map.insert(
        "wpe.weight".into(),
        Tensor::eye(t, DType::F32, dev)?.pad_with_zeros(1, 0, c - t)?,
    );
    map.insert("h.0.ln_1.weight".into(), Tensor::ones(c, DType::F32, dev)?);
    map.insert("h.0.ln_1.bias".into(), Tensor::zeros(c, DType::F32, dev)?);
    // Conv1D (in, out), out = [q | k | v]. Head 0: q_i = 3·x_{i+1}, k_i = x_i, so q(p)·k(p - 1)
    // stands out by 3a² ≈ 195 (≈ 34 after the 1/√32 scale). Head 1: q = k = 0, even attention.
    let mut w = vec![0f32; c * 3 * c];
    for i in 0..t {
        if i + 1 < t {
            w[(i + 1) * 3 * c + i] = 3.0;
        }
        w[i * 3 * c + c + i] = 1.0;
    }
    map.insert(
        "h.0.attn.c_attn.weight".into(),
        Tensor::from_vec(w, (c, 3 * c), dev)?,
    );
    map.insert(
        "h.0.attn.c_attn.bias".into(),
        Tensor::zeros(3 * c, DType::F32, dev)?,
    );
    Ok(Gpt2::new(
        config,
        Checkpoint::Tensors(map),
        &LoadOptions::default(),
    )?)
}

#[test]
fn scores_find_a_constructed_previous_token_head() -> Result {
    let model = previous_token_model()?;
    let ids: Vec<u32> = vec![5, 9, 2, 9, 40, 41, 5, 17, 3, 3, 30, 8];
    let tokens = Tokens {
        text: ids.iter().map(|i| i.to_string()).collect(),
        ids,
        bos: false,
    };
    let selection = Selection::new(model.config(), LayerChoice::All, None)?;
    let table = scores::head_scores(&model, &tokens, &selection)?;
    assert_eq!(table.repeat_len, 16, "two copies fill the 32 positions");
    let [prev, even] = table.heads.as_slice() else {
        return Err(format!("{:?}", table.heads).into());
    };
    println!("{prev:?}\n{even:?}");
    assert!(prev.previous_token.is_some_and(|s| s > 0.99), "{prev:?}");
    assert!(prev.induction.is_some_and(|s| s < 0.01), "{prev:?}");
    assert!(prev.duplicate_token.is_some_and(|s| s < 0.01), "{prev:?}");
    assert_eq!(prev.label, HeadType::PreviousToken);
    assert!(
        even.normalized_entropy.is_some_and(|s| s > 0.99),
        "{even:?}"
    );
    assert!(even.previous_token.is_some_and(|s| s < 0.3), "{even:?}");
    assert_eq!(even.label, HeadType::Broad);
    // The attention the scores read is the model's own.
    let x = Tensor::new(tokens.ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let (_, want) = model.forward_with_attention(&x, None, &[0])?;
    let mut seen = 0;
    inspect::for_each_layer(&model, &tokens.ids, &selection, |a| {
        let got = Tensor::from_vec(a.data.clone(), (2, a.len, a.len), &Device::Cpu)?;
        let d = (got - want[0].get(0)?)?.abs()?.flatten_all()?.max(0)?;
        assert_eq!(d.to_scalar::<f32>()?, 0.0);
        seen += 1;
        Ok(())
    })?;
    assert_eq!(seen, 1);
    Ok(())
}

#[test]
fn scores_table_and_json_cover_every_head() -> Result {
    let text = String::from_utf8(
        inspect(
            "tiny",
            &["--scores", "--prompt", "The cat sat on the mat. The cat"],
        )?
        .stdout,
    )?;
    assert!(
        text.contains(
            "layer head   prev  first offset    dup  (ctl) induct  (ctl)   sink  local entropy  type"
        ),
        "{text}"
    );
    // The legend under the table ends in a whole sentence.
    assert!(
        text.trim_end().ends_with("when above first-token."),
        "{text}"
    );
    // 2 layers x 4 heads.
    let rows = text
        .lines()
        .filter(|l| l.starts_with("    0 ") || l.starts_with("    1 "));
    assert_eq!(rows.count(), 8, "{text}");
    let v = inspect_json(
        "tiny",
        &["--scores", "--layer", "1", "--bos", "--prompt", "The cat"],
    )?;
    let heads = v["heads"].as_array().ok_or("heads")?;
    assert_eq!(heads.len(), 4);
    let labels = [
        "induction",
        "previous-token",
        "positional-offset",
        "duplicate-token",
        "first-token",
        "local",
        "broad",
        "mixed",
    ];
    for h in heads {
        assert_eq!(h["layer"], 1);
        assert!(labels.contains(&h["label"].as_str().unwrap_or("")), "{h}");
        for key in [
            "previous_token",
            "first_token",
            "duplicate_token",
            "induction",
            "entropy",
        ] {
            assert!(
                h[key].as_f64().is_some_and(|s| (0.0..=7.0).contains(&s)),
                "{key}: {h}"
            );
        }
    }
    // --bos: the random sequence starts with <|endoftext|> too (511 in the fixture tokenizer).
    assert_eq!(v["token_ids"][0], 511);
    assert_eq!(v["repeated_token_ids"][0], 511);
    assert_eq!(
        v["repeated_token_ids"].as_array().map(Vec::len),
        Some(1 + 2 * 50)
    );
    Ok(())
}

fn has_python_numpy() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn npy_holds_transformers_numbers() -> Result {
    npy_exports("inspect")?;
    Ok(())
}

/// Exports every layer and one head as npy (files named after `name`), checks their numbers
/// against transformers and the JSON export, and returns their paths.
fn npy_exports(name: &str) -> Result<(PathBuf, PathBuf)> {
    // npy is computed a block of query rows at a time (see `for_each_row_block`): the same
    // numbers as transformers to 1e-5, and as the one-pass JSON to float rounding.
    let (g, text) = common::goldens("tiny", "goldens")?;
    let prompt = text["input_texts"][0].as_str().ok_or("input_texts")?;
    let v = inspect_json("tiny", &["--layer", "all", "--prompt", prompt])?;
    let t = v["token_ids"].as_array().map_or(0, Vec::len);
    let all = common::tmp(&format!("{name}-all.npy"));
    let one = common::tmp(&format!("{name}-one.npy"));
    for (args, path) in [
        (&["--layer", "all"][..], &all),
        (&["--layer", "1", "--head", "3"][..], &one),
    ] {
        let mut a = vec![
            "--format",
            "npy",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            prompt,
        ];
        a.extend_from_slice(args);
        inspect("tiny", &a)?;
    }
    let (shape, data) = read_npy(&all)?;
    assert_eq!(shape, [2, 4, t, t]);
    let data = Tensor::from_vec(data, (2, 4, t, t), &Device::Cpu)?;
    for l in 0..2 {
        let got = data.get(l)?;
        assert!(max_abs_diff(&got, &g[&format!("attn.{l}")].get(0)?)? <= 1e-5);
        let d = max_abs_diff(&got, &matrix(&v["layers"][l]["attention"])?)?;
        // Row blocks take the decode kernel (few rows), the one-pass JSON gemm: sums in another order.
        assert!(d <= 5e-6, "npy vs json: {d}");
    }
    let (shape, data) = read_npy(&one)?;
    assert_eq!(shape, [1, t, t]);
    let data = Tensor::from_vec(data, (1, t, t), &Device::Cpu)?;
    let want = g["attn.1"].get(0)?.narrow(0, 3, 1)?;
    assert!(max_abs_diff(&data, &want)? <= 1e-5);
    // The tokens beside the array, in `PATH.json`.
    let side: Value = serde_json::from_str(&std::fs::read_to_string(common::tmp(&format!(
        "{name}-all.npy.json"
    )))?)?;
    assert_eq!(side["tokens"], v["tokens"]);
    assert_eq!(side["token_ids"], v["token_ids"]);
    assert_eq!(side["shape"], serde_json::json!([2, 4, t, t]));
    Ok((all, one))
}

#[test]
#[ignore = "needs python3 with numpy; CI runs it: cargo test -- --ignored"]
fn numpy_reads_the_npy_exports() -> Result {
    let (all, one) = npy_exports("numpy")?;
    let t = read_npy(&one)?.0[1];
    if !has_python_numpy() {
        common::skip(
            "numpy_reads_the_npy_exports",
            "python3 with numpy is not installed (pip install numpy)",
        );
        return Ok(());
    }
    let script = "import sys, numpy as np\n\
        a = np.load(sys.argv[1]); b = np.load(sys.argv[2])\n\
        assert a.dtype == np.float32 and b.dtype == np.float32\n\
        assert np.allclose(a.sum(-1), 1, atol=1e-5)\n\
        assert np.allclose(a[1, 3], b[0], atol=5e-6, rtol=0)\n\
        print(a.shape, b.shape)";
    let out = common::output_within(
        Command::new("python3").args([
            "-c",
            script,
            all.to_str().ok_or("p")?,
            one.to_str().ok_or("p")?,
        ]),
        None,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "numpy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), format!("(2, 4, {t}, {t}) (1, {t}, {t})"));
    Ok(())
}

#[test]
fn safetensors_has_one_tensor_per_layer_and_the_tokens() -> Result {
    let (g, text) = common::goldens("tiny-b", "goldens")?;
    let prompt = text["input_texts"][0].as_str().ok_or("input_texts")?;
    let v = inspect_json("tiny-b", &["--layer", "all", "--prompt", prompt])?;
    let path = common::tmp("inspect-attn.safetensors");
    inspect(
        "tiny-b",
        &[
            "--layer",
            "all",
            "--format",
            "safetensors",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            prompt,
        ],
    )?;
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    assert_eq!(tensors.len(), 3);
    for l in 0..3 {
        let got = &tensors[&format!("attn.{l}")];
        assert!(max_abs_diff(got, &g[&format!("attn.{l}")].get(0)?)? <= 1e-5);
        assert!(max_abs_diff(got, &matrix(&v["layers"][l]["attention"])?)? <= 1e-6);
    }
    let bytes = std::fs::read(&path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let meta = meta.metadata().as_ref().ok_or("no metadata")?;
    let tokens: Value = serde_json::from_str(&meta["tokens"])?;
    let ids: Value = serde_json::from_str(&meta["token_ids"])?;
    assert_eq!((tokens, ids), (v["tokens"].clone(), v["token_ids"].clone()));
    Ok(())
}

#[test]
fn png_has_one_labelled_panel_per_head() -> Result {
    let prompt = "The cat sat on the mat";
    let v = inspect_json("tiny", &["--layer", "all", "--prompt", prompt])?;
    let tokens: Vec<String> = serde_json::from_value(v["tokens"].clone())?;
    let path = common::tmp("inspect-heads.png");
    inspect(
        "tiny",
        &[
            "--layer",
            "all",
            "--format",
            "png",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            prompt,
        ],
    )?;
    let decoder = png::Decoder::new(BufReader::new(std::fs::File::open(&path)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or("size")?];
    let info = reader.next_frame(&mut buf)?;
    assert_eq!(info.color_type, png::ColorType::Rgb);
    // ASCII tokens: labels are the tokens, spaces drawn as dots.
    let longest = tokens
        .iter()
        .map(|t| t.chars().count())
        .max()
        .unwrap_or(1)
        .min(LABEL_CHARS);
    let layout = Layout::new(tokens.len(), 4, 2, longest);
    assert_eq!(
        (info.width as usize, info.height as usize),
        (layout.width, layout.height)
    );
    let px = |x: usize, y: usize| {
        let i = (y * layout.width + x) * 3;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    for l in 0..2 {
        let attn = matrix(&v["layers"][l]["attention"])?.to_vec3::<f32>()?;
        for (h, head) in attn.iter().enumerate() {
            let (x0, y0) = layout.heatmap_origin(l, h);
            // Every cell, masked ones included, is the weight's colour.
            for (q, row) in head.iter().enumerate() {
                for (k, &w) in row.iter().enumerate() {
                    let (x, y) = (x0 + layout.pixel_of(k), y0 + layout.pixel_of(q));
                    assert_eq!(px(x, y), colormap(w), "layer {l} head {h} ({q}, {k})");
                }
            }
            // Framed, with white around, a title above and labels left and below.
            let white = [255, 255, 255];
            assert_eq!(px(x0 + layout.side + 3, y0 + 2), white);
            let ink = |xs: std::ops::Range<usize>, ys: std::ops::Range<usize>| {
                ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
                    .any(|(x, y)| px(x, y)[0] < 100 && px(x, y)[2] < 100)
            };
            assert!(
                ink(x0..x0 + layout.side, y0 - 20..y0 - 2),
                "title of head {h}"
            );
            assert!(
                ink(x0 - 40..x0 - 2, y0..y0 + layout.side),
                "query labels of head {h}"
            );
            assert!(
                ink(
                    x0..x0 + layout.side,
                    y0 + layout.side + 3..y0 + layout.side + 40
                ),
                "key labels"
            );
        }
    }
    Ok(())
}

const MARKUP_PROMPT: &str =
    "Hi <script>alert(1)</script><img src=x onerror=\"document.title='pwned'\">";

#[test]
fn html_keeps_markup_as_text_and_loads_nothing() -> Result {
    markup_page("inspect-heads-static.html")?;
    Ok(())
}

/// The page of a prompt full of markup, at `name`: checked to keep it as text and to load
/// nothing from elsewhere.
fn markup_page(name: &str) -> Result<PathBuf> {
    let prompt = MARKUP_PROMPT;
    let path = common::tmp(name);
    inspect(
        "tiny",
        &[
            "--format",
            "html",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            prompt,
        ],
    )?;
    let html = std::fs::read_to_string(&path)?;
    assert!(
        !html.contains("<script>alert") && !html.contains("<img"),
        "markup leaked into the file"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page must not load anything"
    );
    Ok(path)
}

#[test]
#[ignore = "needs chromium; CI runs it: cargo test -- --ignored"]
fn html_opens_in_chromium_shows_the_head_and_keeps_markup_as_text() -> Result {
    let prompt = MARKUP_PROMPT;
    let path = markup_page("inspect-heads.html")?;
    let Some(browser) = common::chromium() else {
        common::skip(
            "html_opens_in_chromium_shows_the_head_and_keeps_markup_as_text",
            "no chromium on PATH (Debian: apt-get install chromium)",
        );
        return Ok(());
    };
    let profile = common::tmp("inspect-chromium-profile");
    let url = format!("file://{}#layer=1&head=2", path.display());
    let dom = clean_dom(browser, &profile, &url)?;
    // The head asked for in the URL is the one shown.
    assert!(dom.contains(">Layer 1 · Head 2</span>"), "{dom}");
    assert!(dom.contains(r#"data-layer="1" data-head="2""#));
    // The markup is text: escaped in the DOM, never an element, never run.
    assert!(!dom.contains("<img") && !dom.to_lowercase().contains("<script>alert"));
    assert!(!dom.contains("pwned</title>"));
    assert!(dom.contains("&lt;"), "the '<' tokens are shown as text");
    // Its most-attended list is that head's, from the same numbers as --format json.
    let v = inspect_json("tiny", &["--layer", "1", "--head", "2", "--prompt", prompt])?;
    let rows = matrix(&v["attention"])?.get(0)?.to_vec2::<f32>()?;
    let items: Vec<&str> = dom.split("<li>").skip(1).collect();
    assert_eq!(items.len(), rows.len());
    for (q, (row, item)) in rows.iter().zip(&items).enumerate() {
        // The page compares the 8-bit weights it holds (round(w * 255)); the first of equals wins.
        let r: Vec<f32> = row
            .iter()
            .map(|w| (w.clamp(0.0, 1.0) * 255.0).round())
            .collect();
        let k = (0..=q).fold(0, |best, k| if r[k] > r[best] { k } else { best });
        assert!(item.contains(&format!("-&gt; #{k} ")), "row {q}: {item}");
    }
    Ok(())
}

/// The page's DOM once its timers have run, checked to have logged nothing and shown no error
/// (the page logs nothing when all is well).
fn clean_dom(browser: &str, profile: &Path, url: &str) -> Result<String> {
    let (dom, log) = common::chromium_run(browser, profile, url, &["--dump-dom"])?;
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "{console:?}");
    assert!(
        dom.contains(r#"<pre id="errors" hidden=""></pre>"#),
        "errors shown: {dom}"
    );
    Ok(dom)
}

#[test]
#[ignore = "needs chromium; CI runs it: cargo test -- --ignored"]
fn html_model_view_labels_every_head_and_opens_the_one_clicked() -> Result {
    // The trained fixture: heads whose types are known (tests/induction.rs).
    let path = common::tmp("inspect-model-view.html");
    let prompt = "one looks back a token, another finds where this token came before";
    inspect(
        "induction",
        &[
            "--format",
            "html",
            "--out",
            path.to_str().ok_or("p")?,
            "--prompt",
            prompt,
        ],
    )?;
    let Some(browser) = common::chromium() else {
        common::skip(
            "html_model_view_labels_every_head_and_opens_the_one_clicked",
            "no chromium on PATH (Debian: apt-get install chromium)",
        );
        return Ok(());
    };
    let profile = common::tmp("inspect-chromium-model-view");
    let url = format!("file://{}#layer=1&head=1", path.display());
    let dom = clean_dom(browser, &profile, &url)?;
    // Every head drawn, each labelled with its type as --scores gives it.
    assert!(dom.contains(r#"data-thumbnails="4""#), "{dom}");
    for (l, h, kind) in [
        (0, 0, "previous-token"),
        (0, 1, "previous-token"),
        (1, 1, "induction"),
    ] {
        let fig =
            format!(r#"data-layer="{l}" data-head="{h}" title="layer {l}, head {h}: {kind}""#);
        assert!(dom.contains(&fig), "{l}.{h} is not labelled {kind}: {dom}");
        assert!(dom.contains(&format!(
            r#"{l}.{h}<span class="kind {kind}">{kind}</span>"#
        )));
    }
    // The head of the URL is open, in the head view and marked in the model view.
    assert!(dom.contains(">Layer 1 · Head 1</span>"), "{dom}");
    assert!(
        dom.contains(r#"class="thumb current" data-layer="1" data-head="1""#),
        "{dom}"
    );
    assert_eq!(dom.matches("thumb current").count(), 1);
    // A short prompt gets token labels on the heatmap's axes.
    assert!(dom.contains(r#"data-axis-labels="tokens""#), "{dom}");

    // The screenshot shows the thumbnails: viridis pixels in the model view's rows, and the red
    // frame of the open head.
    let shot = common::tmp("inspect-model-view.png");
    let _ = std::fs::remove_file(&shot);
    common::chromium_run(
        browser,
        &profile,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    )?;
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or("png size")?];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.line_size / info.width as usize;
    let (w, h) = (info.width as usize, info.height as usize);
    let pixel = |x: usize, y: usize| {
        let at = y * info.line_size + x * channels;
        (buf[at], buf[at + 1], buf[at + 2])
    };
    // The model view is the top of the page (below the title, above the head controls).
    let (mut dark, mut red) = (0, 0);
    for y in 0..h.min(260) {
        for x in 0..w {
            let (r, g, b) = pixel(x, y);
            // Viridis' low end, what an attention map is mostly made of.
            if r < 90 && g < 40 && b > 60 && b < 120 {
                dark += 1;
            }
            if r > 180 && g < 80 && b < 80 {
                red += 1;
            }
        }
    }
    // Four thumbnails of ~48×48 pixels, at least half dark each; one frame of ~200 pixels.
    assert!(
        dark > 4 * 48 * 48 / 2,
        "{dark} viridis pixels in the model view"
    );
    assert!(red > 100, "{red} red pixels: no frame on the open head");
    Ok(())
}

#[test]
fn terminal_heatmaps_fit_80_columns_and_say_when_cut() -> Result {
    let short = String::from_utf8(
        inspect(
            "tiny",
            &["--layer", "0", "--prompt", "The cat sat on the mat"],
        )?
        .stdout,
    )?;
    for h in 0..4 {
        assert!(short.contains(&format!("layer 0, head {h}\n")), "{short}");
    }
    assert!(
        short.contains("most attended:") && short.contains('█'),
        "{short}"
    );
    assert!(!short.contains("note:"));
    let long_prompt = "The cat sat on the mat and the dog sat on the log. ".repeat(3);
    let long = String::from_utf8(
        inspect(
            "tiny",
            &["--layer", "1", "--head", "0", "--prompt", &long_prompt],
        )?
        .stdout,
    )?;
    // 2-digit positions and an 8-character token leave 80 - 12 columns: 34 keys of 2.
    assert!(
        long.contains("note: showing the first 34 of 64 tokens"),
        "{long}"
    );
    assert!(long.contains("\n33 "), "{long}");
    assert!(!long.contains("\n34 "), "{long}");
    for text in [&short, &long] {
        let widest = text.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(widest <= 80, "{widest} columns");
    }
    Ok(())
}

#[test]
fn bos_puts_endoftext_first() -> Result {
    let plain = inspect_json("tiny", &["--layer", "0", "--prompt", "The cat"])?;
    let bos = inspect_json("tiny", &["--layer", "0", "--bos", "--prompt", "The cat"])?;
    assert_eq!(bos["token_ids"][0], 511);
    assert_eq!(bos["tokens"][0], "<|endoftext|>");
    assert_eq!(
        bos["token_ids"].as_array().map(Vec::len),
        plain["token_ids"].as_array().map(|a| a.len() + 1)
    );
    Ok(())
}

#[test]
fn bad_input_gives_one_clear_line() -> Result {
    let dir = fixture("tiny");
    let d = dir.to_str().ok_or("p")?;
    let long = "a".repeat(200);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--layer", "2", "--prompt", "x"],
            "--layer 2 is out of range: the model has 2 layers (0..=1)",
        ),
        (
            &["--head", "4", "--prompt", "x"],
            "--head 4 is out of range: the model has 4 heads per layer (0..=3)",
        ),
        (
            &["--layer", "first", "--prompt", "x"],
            "expected a layer number",
        ),
        (&["--prompt", ""], "the prompt is empty"),
        (
            &["--prompt", &long],
            "the prompt is 200 tokens but the model sees at most 128",
        ),
        (
            &["--format", "npy", "--prompt", "x"],
            "--format npy needs --out PATH",
        ),
        (
            &["--format", "gif", "--prompt", "x"],
            "invalid value 'gif' for '--format <FORMAT>'",
        ),
        (
            &[
                "--scores", "--format", "png", "--out", "x.png", "--prompt", "x",
            ],
            "--scores is written as text or json",
        ),
        (
            &[
                "--format",
                "json",
                "--out",
                "/no/such/dir/a.json",
                "--prompt",
                "x",
            ],
            "/no/such/dir/a.json",
        ),
        (&[], "--prompt"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["inspect-heads", "--model-dir", d];
        args.extend_from_slice(extra);
        assert_one_line_error(&gpt2(&args)?, needle);
    }
    Ok(())
}

fn peak_mib(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.starts_with("peak memory:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn npy_of_every_layer_holds_one_layer_at_a_time() -> Result {
    // 16 layers of 8 heads over 512 tokens: 8 MiB of attention per layer, 128 MiB for all,
    // next to a model of ~1 MiB; peak memory tells whether all layers were held at once.
    let config = common::tmp("inspect-16-layers.json");
    std::fs::write(
        &config,
        r#"{"vocab_size": 300, "n_positions": 512, "n_embd": 64, "n_layer": 16, "n_head": 8,
            "bos_token_id": 299, "eos_token_id": 299}"#,
    )?;
    let prompt = "abcdefgh".repeat(64);
    let run = |layer: &str| -> Result<f64> {
        let out = common::tmp(&format!("inspect-16-layers-{layer}.npy"));
        let args = [
            "inspect-heads",
            "--config",
            config.to_str().ok_or("p")?,
            "--layer",
            layer,
            "--format",
            "npy",
            "--out",
            out.to_str().ok_or("p")?,
            "--prompt",
            &prompt,
        ];
        let o = gpt2(&args)?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        Ok(peak_mib(&stderr).ok_or("no peak memory")?)
    };
    let (one, all) = (run("0")?, run("all")?);
    println!("peak memory: one layer {one:.1} MiB, all 16 layers {all:.1} MiB");
    assert!(
        all < one + 3.0 * 8.0,
        "{one} MiB for one layer, {all} MiB for 16"
    );
    let (shape, _) = read_npy(&common::tmp("inspect-16-layers-all.npy"))?;
    assert_eq!(shape, [16, 8, 512, 512]);
    Ok(())
}

#[test]
fn scores_streamed_by_row_blocks_equal_scores_of_whole_patterns() -> Result {
    let dir = fixture("tiny-b");
    let model = ModelSource::dir(&dir).load_model(&LoadOptions::default())?;
    let tokenizer = gpt2::Tokenizer::from_dir(&dir)?;
    let opts = PromptOptions {
        bos: true,
        ..PromptOptions::default()
    };
    let text = "One fish, two fish, red fish, blue fish.";
    let prompt = Prompt::new(&tokenizer, text, model.config(), opts)?;
    let tokens = Tokens::new(&tokenizer, &prompt)?;
    // 3 layers: the prompt arrives in 3 blocks of rows.
    let selection = Selection::new(model.config(), LayerChoice::All, None)?;
    let table = scores::head_scores(&model, &tokens, &selection)?;
    let detectors = scores::Detectors::new(tokens.len(), &table.repeated_token_ids);
    let mut prompt = Vec::new();
    inspect::for_each_layer(&model, &tokens.ids, &selection, |a| {
        prompt.push(a);
        Ok(())
    })?;
    let mut i = 0;
    inspect::for_each_layer(&model, &table.repeated_token_ids, &selection, |r| {
        let a = &prompt[r.layer];
        for h in 0..r.heads.len() {
            let want = detectors.scores(r.layer, h, a.head(h), r.head(h));
            let got = &table.heads[i];
            let pairs = [
                (got.previous_token, want.previous_token),
                (got.first_token, want.first_token),
                (got.local, want.local),
                (Some(got.entropy), Some(want.entropy)),
                (got.normalized_entropy, want.normalized_entropy),
                (got.induction, want.induction),
                (got.duplicate_token, want.duplicate_token),
            ];
            for (g, w) in pairs {
                let (g, w) = (g.unwrap_or(f32::NAN), w.unwrap_or(f32::NAN));
                assert!((g - w).abs() < 1e-5, "{got:?}\n{want:?}");
            }
            assert_eq!(
                (got.layer, got.head, got.label),
                (want.layer, want.head, want.label)
            );
            i += 1;
        }
        Ok(())
    })?;
    assert_eq!(i, 12);
    Ok(())
}

#[test]
fn scores_over_several_prompts_report_mean_and_spread() -> Result {
    let lines = common::tmp("inspect-prompts.txt");
    std::fs::write(
        &lines,
        "The cat sat on the mat.\n\nOne fish, two fish, red fish.\nA B C A B C A B C\n",
    )?;
    let jsonl = common::tmp("inspect-prompts.jsonl");
    std::fs::write(&jsonl, "\"The cat sat on the mat.\"\n{\"prompt\": \"One fish, two fish, red fish.\"}\n{\"prompt\": \"A B C A B C A B C\"}\n")?;
    let mut got = Vec::new();
    for f in [&lines, &jsonl] {
        let v = {
            let out = gpt2(&[
                "inspect-heads",
                "--model-dir",
                fixture("tiny").to_str().ok_or("p")?,
                "--scores",
                "--format",
                "json",
                "--prompts",
                f.to_str().ok_or("p")?,
            ])?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout)?
        };
        assert_eq!(v["prompts"], 3);
        assert_eq!(v["spread"].as_array().map(Vec::len), Some(8));
        assert!(
            v["spread"][0]["previous_token"]
                .as_f64()
                .is_some_and(|s| s > 0.0),
            "{}",
            v["spread"][0]
        );
        got.push(v["heads"].clone());
    }
    assert_eq!(got[0], got[1], "lines and jsonl are the same prompts");
    let text = String::from_utf8(
        gpt2(&[
            "inspect-heads",
            "--model-dir",
            fixture("tiny").to_str().ok_or("p")?,
            "--scores",
            "--prompts",
            lines.to_str().ok_or("p")?,
        ])?
        .stdout,
    )?;
    assert!(
        text.contains("3 prompts (mean ± spread)") && text.contains('±'),
        "{text}"
    );
    Ok(())
}
