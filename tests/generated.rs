//! `gpt2 generate --attention-out`: the attention of every generated token, read from the
//! KV-cached decode, equals recomputing it without a cache; every format holds the same rows; the
//! HTML page steps through them in a real browser.

use std::path::Path;

use gpt2::{LoadOptions, ModelSource, Tensor};
use serde_json::Value;

mod common;
use common::{fixture, gpt2_command, ids, Result};

const PROMPT: &str = "The cat sat on";
const N: usize = 9;

/// Runs greedy generation recording attention to `out`; returns the JSON line.
fn generate(out: &Path, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["generate", "--model-dir"];
    let dir = fixture("tiny");
    args.push(dir.to_str().ok_or("p")?);
    args.extend_from_slice(&[
        "--prompt",
        PROMPT,
        "-n",
        "9",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--attention-out",
    ]);
    args.push(out.to_str().ok_or("p")?);
    args.extend_from_slice(extra);
    let o = common::output_within(&mut gpt2_command(&args), None)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(serde_json::from_slice(&o.stdout)?)
}

#[test]
fn every_generated_tokens_attention_equals_recomputing_it() -> Result {
    let path = common::tmp("generated-attn.json");
    let line = generate(&path, &[])?;
    let prompt = ids(&line["prompt_token_ids"]);
    let generated = ids(&line["completion_token_ids"]);
    assert_eq!(generated.len(), N);
    let rec: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(rec["meta"]["prompt_tokens"], prompt.len());
    let model = ModelSource::dir(fixture("tiny")).load_model(&LoadOptions::default())?;
    let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let (_, attn) = model.forward_with_attention(
        &Tensor::new(all.as_slice(), model.device())?.unsqueeze(0)?,
        None,
        &[0, 1],
    )?;
    for (j, layer) in rec["layers"].as_array().ok_or("layers")?.iter().enumerate() {
        let steps = layer["steps"].as_array().ok_or("steps")?;
        assert_eq!(steps.len(), N);
        let full = attn[j].get(0)?.to_vec3::<f32>()?; // (heads, T, T)
        for (i, step) in steps.iter().enumerate() {
            // Step i: the query at position P - 1 + i, over keys 0..P + i.
            let q = prompt.len() - 1 + i;
            for (h, row) in step.as_array().ok_or("row")?.iter().enumerate() {
                let row: Vec<f64> = row
                    .as_array()
                    .ok_or("w")?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                assert_eq!(row.len(), q + 1);
                for (k, w) in row.iter().enumerate() {
                    assert!(
                        (w - full[h][q][k] as f64).abs() < 1e-5,
                        "layer {j} step {i} head {h} key {k}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn npy_and_safetensors_hold_the_same_rows() -> Result {
    let json = common::tmp("generated-same.json");
    generate(&json, &["--layer", "1"])?;
    let rec: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let npy = common::tmp("generated-same.npy");
    let line = generate(&npy, &["--layer", "1"])?;
    let p = ids(&line["prompt_token_ids"]).len();
    let keys = p + N - 1;
    let (shape, data) = common::read_npy(&npy)?;
    assert_eq!(shape, [N, 1, 4, keys]);
    for i in 0..N {
        for h in 0..4 {
            let row = &data[((i * 4) + h) * keys..][..keys];
            let want = &rec["layers"][0]["steps"][i][h];
            for k in 0..keys {
                let w = want[k].as_f64().unwrap_or(0.0) as f32;
                assert!((row[k] - w).abs() < 1e-7, "step {i} head {h} key {k}");
            }
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    }
    // The tokens in `PATH.json`: beside same.json, not in place of it.
    let side: Value = serde_json::from_str(&std::fs::read_to_string(common::tmp(
        "generated-same.npy.json",
    ))?)?;
    assert_eq!(side["meta"]["tokens"].as_array().map(Vec::len), Some(p + N));
    let st = common::tmp("generated-same.safetensors");
    generate(&st, &["--layer", "1"])?;
    let t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu)?;
    assert_eq!(t["attn.1"].dims(), &[N, 4, keys]);
    let a = t["attn.1"].flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, data);
    Ok(())
}

#[test]
fn the_run_must_fit_one_sample_in_the_context() -> Result {
    let dir = fixture("tiny");
    let d = dir.to_str().ok_or("p")?;
    let o = common::tmp("generated-bad.npy");
    let o = o.to_str().ok_or("p")?;
    for (extra, needle) in [
        (
            &["--num-samples", "2"][..],
            "--attention-out records one sample",
        ),
        (
            &["-n", "500"][..],
            "--attention-out needs the whole run inside the context",
        ),
    ] {
        let mut args = vec![
            "generate",
            "--model-dir",
            d,
            "--prompt",
            PROMPT,
            "--attention-out",
            o,
        ];
        args.extend_from_slice(extra);
        let out = common::output_within(&mut gpt2_command(&args), None)?;
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle));
    }
    Ok(())
}

/// The page carries the recorded attention, the same numbers as the JSON file, and loads
/// nothing from elsewhere (the browser half is the next test).
#[test]
fn the_page_holds_the_recorded_attention_and_loads_nothing() -> Result {
    let path = common::tmp("generated-page-static.html");
    generate(&path, &[])?;
    let json = common::tmp("generated-page-static.json");
    generate(&json, &[])?;
    let html = std::fs::read_to_string(&path)?;
    let json = std::fs::read_to_string(&json)?;
    let (_, layers) = json
        .split_once(r#""layers":"#)
        .ok_or("no layers in the JSON")?;
    let layers = layers.trim_end().strip_suffix('}').ok_or("JSON shape")?;
    assert!(
        layers.len() > 100 && html.contains(layers),
        "the page's data differ"
    );
    assert!(!html.contains("http://") && !html.contains("https://"));
    Ok(())
}

#[test]
#[ignore = "needs chromium; CI runs it: cargo test -- --ignored"]
fn the_page_steps_through_the_generated_tokens_in_a_browser() -> Result {
    let path = common::tmp("generated-page.html");
    generate(&path, &[])?;
    let json = common::tmp("generated-page.json");
    generate(&json, &[])?;
    let rec: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let Some(browser) = common::chromium() else {
        common::skip(
            "the_page_steps_through_the_generated_tokens_in_a_browser",
            "no chromium on PATH (Debian: apt-get install chromium)",
        );
        return Ok(());
    };
    let profile = common::tmp("generated-chromium-profile");
    let url = format!("file://{}#layer=1&head=2&step=3", path.display());
    let (dom, _) = common::chromium_run(browser, &profile, &url, &["--dump-dom"])?;
    assert!(
        dom.contains(r#"<pre id="errors" hidden=""></pre>"#),
        "errors shown: {dom}"
    );
    assert!(dom.contains(r#"data-step="3""#), "{dom}");
    let row: Vec<f64> = rec["layers"][1]["steps"][3][2]
        .as_array()
        .ok_or("row")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let best = (0..row.len()).fold(0, |b, k| if row[k] > row[b] { k } else { b });
    assert!(dom.contains(&format!(r#"data-best="{best}""#)), "{dom}");
    assert!(dom.contains("Layer 1 · Head 2 · step 3 of 9"), "{dom}");
    Ok(())
}
