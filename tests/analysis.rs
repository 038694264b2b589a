//! The analyses against transformers (ablation, logit lens: goldens made by
//! `scripts/make_analysis_goldens.py`), against TransformerLens (direct logit attribution:
//! `scripts/make_patching_goldens.py`) and against their own definitions (attribution parts sum
//! to the logit; batched head importance equals one ablation at a time), library and binary.

use std::collections::HashMap;

use gpt2::analysis::ablation::{head_mask, parse_heads, AblateMode};
use gpt2::analysis::attribution::attribute;
use gpt2::analysis::heads_effect::{heads_effect, Metric};
use gpt2::analysis::logit_lens::logit_lens;
use gpt2::perplexity::log_softmax_at;
use gpt2::{Gpt2, LoadOptions, ModelSource, Tensor};
use serde_json::Value;

mod common;
use common::{fixture, goldens, gpt2, ids, max_abs_diff, tmp, Result};

fn model(name: &str) -> Result<Gpt2> {
    Ok(ModelSource::dir(fixture(name)).load_model(&LoadOptions::default())?)
}

fn logits(m: &Gpt2, ids: &[u32]) -> Result<Tensor> {
    let x = Tensor::new(ids, m.device())?.unsqueeze(0)?;
    Ok(m.forward(&x, None)?.squeeze(0)?)
}

#[test]
fn zero_and_mean_ablation_equal_transformers() -> Result {
    for name in ["tiny", "tiny-b"] {
        let (g, v) = goldens(name, "analysis")?;
        let ids = ids(&v["token_ids"]);
        let heads: Vec<String> = v["ablate"]
            .as_array()
            .ok_or("ablate")?
            .iter()
            .filter_map(|h| h.as_str().map(String::from))
            .collect();
        let heads = parse_heads(&heads.join(","))?;
        let mut m = model(name)?;
        assert!(max_abs_diff(&logits(&m, &ids)?, &g["clean"])? < 1e-4);
        for (mode, key) in [(AblateMode::Zero, "zero"), (AblateMode::Mean, "mean")] {
            let mask = head_mask(&m, &heads, mode, &ids)?;
            m.set_head_mask(Some(mask));
            let d = max_abs_diff(&logits(&m, &ids)?, &g[key])?;
            println!("{name} {key}: max |Δlogit| = {d:e}");
            assert!(d < 1e-4, "{name} {key}: {d}");
            m.set_head_mask(None);
        }
        // The ablation is not a no-op: the goldens differ from the clean logits.
        assert!(max_abs_diff(&g["zero"], &g["clean"])? > 0.1);
    }
    Ok(())
}

#[test]
fn the_logit_lens_equals_transformers_and_ends_at_the_models_logits() -> Result {
    for name in ["tiny", "tiny-b"] {
        let (g, v) = goldens(name, "analysis")?;
        let ids = ids(&v["token_ids"]);
        let m = model(name)?;
        let tok = gpt2::Tokenizer::from_dir(fixture(name))?;
        let lens = logit_lens(&m, &tok, &ids, 5, None)?;
        let want_ids = g["lens_top_ids"]
            .to_dtype(candle_core::DType::U32)?
            .to_vec3::<u32>()?;
        let want_p = g["lens_top_p"].to_vec3::<f32>()?;
        assert_eq!(lens.top.len(), m.config().n_layer + 1);
        for (l, row) in lens.top.iter().enumerate() {
            for (pos, guesses) in row.iter().enumerate() {
                for (k, guess) in guesses.iter().enumerate() {
                    assert!(
                        (guess.prob - want_p[l][pos][k]).abs() < 1e-4,
                        "{name} {l} {pos} {k}"
                    );
                    // Ids agree wherever the probabilities are not tied to 1e-5.
                    if k + 1 < guesses.len()
                        && (want_p[l][pos][k] - want_p[l][pos][k + 1]).abs() > 1e-5
                    {
                        assert_eq!(guess.token, want_ids[l][pos][k], "{name} {l} {pos} {k}");
                    }
                }
            }
        }
        // The last row is the model's own prediction.
        let p = candle_nn::ops::softmax_last_dim(&logits(&m, &ids)?)?.to_vec2::<f32>()?;
        for (pos, guesses) in lens.top[m.config().n_layer].iter().enumerate() {
            assert!((guesses[0].prob - p[pos][guesses[0].token as usize]).abs() < 1e-5);
        }
    }
    Ok(())
}

#[test]
fn attributions_sum_to_the_logit() -> Result {
    for name in ["tiny", "tiny-b"] {
        let (_, v) = goldens(name, "analysis")?;
        let ids = ids(&v["token_ids"]);
        let m = model(name)?;
        for (pos, target) in [(ids.len() - 1, 97u32), (3, 32), (10, 500)] {
            let a = attribute(&m, &ids, Some(pos), target)?;
            assert!(
                (a.total - a.logit).abs() < 1e-3 * (1.0 + a.logit.abs()),
                "{name} {pos}: {a:?}"
            );
            assert_eq!(a.heads.len(), m.config().n_layer);
            // The heads do write something.
            assert!(a.heads.iter().flatten().any(|h| h.abs() > 1e-3));
        }
    }
    Ok(())
}

/// `got` against the golden `key` (any shape, flattened), within 1e-4.
fn near(g: &HashMap<String, Tensor>, key: &str, got: &[f64]) -> Result {
    let want: Vec<f32> = g
        .get(key)
        .ok_or(format!("no golden {key}"))?
        .flatten_all()?
        .to_vec1()?;
    assert_eq!(want.len(), got.len(), "{key}: length");
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0.0, f64::max);
    println!("{key}: max |Δ| = {d:e}");
    assert!(d < 1e-4, "{key}: {d}\n got {got:?}\nwant {want:?}");
    Ok(())
}

/// Every part of `a` against TransformerLens' DLA of the same position and target.
fn attribution_near(g: &HashMap<String, Tensor>, key: &str, a: &Value) -> Result {
    let num = |v: &Value| v.as_f64().ok_or(format!("{key}: not a number: {v}"));
    let list = |v: &Value| -> Result<Vec<f64>> {
        v.as_array()
            .ok_or(format!("{key}: not a list: {v}"))?
            .iter()
            .map(|x| Ok(num(x)?))
            .collect()
    };
    let heads: Vec<Vec<f64>> = a["heads"]
        .as_array()
        .ok_or("heads")?
        .iter()
        .map(list)
        .collect::<Result<_>>()?;
    let bias = list(&a["attention_bias"])?;
    near(g, &format!("{key}.heads"), &heads.concat())?;
    // TransformerLens' attn_out part of a layer: its heads and its c_proj bias.
    let attn: Vec<f64> = heads
        .iter()
        .zip(&bias)
        .map(|(h, b)| h.iter().sum::<f64>() + b)
        .collect();
    near(g, &format!("{key}.attn_out"), &attn)?;
    near(g, &format!("{key}.mlp_out"), &list(&a["mlp"])?)?;
    near(g, &format!("{key}.embed"), &[num(&a["token_embedding"])?])?;
    near(
        g,
        &format!("{key}.pos_embed"),
        &[num(&a["position_embedding"])?],
    )?;
    near(g, &format!("{key}.bias"), &[num(&a["ln_f_bias"])?])?;
    near(g, &format!("{key}.logit"), &[num(&a["logit"])?])?;
    Ok(())
}

#[test]
fn attribution_equals_transformer_lens() -> Result {
    let (g, v) = goldens("tiny", "attribution")?;
    let ids = ids(&v["token_ids"]);
    let m = model("tiny")?;
    let targets = common::ids(&v["targets"]);
    let positions = common::ids(&v["positions"]);
    assert_eq!((targets.len(), positions.len()), (2, 2));
    for &p in &positions {
        let mut per_target = Vec::new();
        for &t in &targets {
            let a = attribute(&m, &ids, Some(p as usize), t)?;
            attribution_near(&g, &format!("pos{p}.target{t}"), &serde_json::to_value(&a)?)?;
            per_target.push(a.heads.concat());
        }
        // The logit difference of the two targets, head by head.
        let diff: Vec<f64> = per_target[0]
            .iter()
            .zip(&per_target[1])
            .map(|(a, b)| a - b)
            .collect();
        near(
            &g,
            &format!("pos{p}.diff{}_{}.heads", targets[0], targets[1]),
            &diff,
        )?;
    }
    // And through the binary, as JSON.
    let d = fixture("tiny");
    let (p, t) = (positions[1].to_string(), targets[0].to_string());
    let prompt = v["prompt"].as_str().ok_or("prompt")?;
    let out = gpt2(&[
        "attribute",
        "--model-dir",
        &d.display().to_string(),
        "--prompt",
        prompt,
        "--target-id",
        &t,
        "--position",
        &p,
        "--format",
        "json",
    ])?;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let a: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(common::ids(&a["token_ids"]), ids);
    attribution_near(&g, &format!("pos{p}.target{t}"), &a)
}

#[test]
fn batched_head_importance_equals_one_ablation_at_a_time() -> Result {
    let (_, v) = goldens("tiny", "analysis")?;
    let ids = ids(&v["token_ids"]);
    let mut m = model("tiny")?;
    for (metric, mode) in [
        (Metric::Loss, AblateMode::Zero),
        (Metric::TargetLogit(97), AblateMode::Mean),
    ] {
        let e = heads_effect(&m, &ids, metric, mode)?;
        assert_eq!((e.effect.len(), e.effect[0].len()), (2, 4));
        for l in 0..2 {
            for h in 0..4 {
                let mask = head_mask(&m, &parse_heads(&format!("{l}.{h}"))?, mode, &ids)?;
                m.set_head_mask(Some(mask));
                let x = logits(&m, &ids)?.to_vec2::<f32>()?;
                m.set_head_mask(None);
                let value = match metric {
                    Metric::TargetLogit(t) => x[ids.len() - 1][t as usize] as f64,
                    Metric::Loss => {
                        (0..ids.len() - 1)
                            .map(|p| -log_softmax_at(&x[p], ids[p + 1] as usize))
                            .sum::<f64>()
                            / (ids.len() - 1) as f64
                    }
                };
                let want = value - e.clean;
                assert!(
                    (e.effect[l][h] - want).abs() < 1e-4,
                    "{metric:?} {l}.{h}: {} vs {want}",
                    e.effect[l][h]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_commands_write_tables_json_and_heatmaps() -> Result {
    let dir = fixture("tiny");
    let d = dir.to_str().ok_or("p")?;
    let prompt = "The cat sat on the mat because";
    let out = gpt2(&[
        "heads-effect",
        "--model-dir",
        d,
        "--prompt",
        prompt,
        "--format",
        "json",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["effect"].as_array().map(Vec::len), Some(2));
    let png = tmp("heads-effect.png");
    let out = gpt2(&[
        "heads-effect",
        "--model-dir",
        d,
        "--prompt",
        prompt,
        "--target",
        "a",
        "--format",
        "png",
        "--out",
        png.to_str().ok_or("p")?,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or("size")?];
    let info = reader.next_frame(&mut buf)?;
    let layout = gpt2::analysis::figure::HeatmapLayout::new(2, 4);
    assert_eq!(
        (info.width as usize, info.height as usize),
        (layout.width, layout.height)
    );
    // Cells are coloured (not the white background) where the effect is not zero.
    let colours: std::collections::HashSet<[u8; 3]> = (0..2)
        .flat_map(|l| (0..4).map(move |h| (l, h)))
        .map(|(l, h)| {
            let (x, y) = layout.centre(l, h);
            let i = (y * info.width as usize + x) * 3;
            [buf[i], buf[i + 1], buf[i + 2]]
        })
        .collect();
    assert!(colours.len() > 2, "{colours:?}");
    let out = gpt2(&[
        "logit-lens",
        "--model-dir",
        d,
        "--prompt",
        prompt,
        "--top-k",
        "3",
        "--json",
    ])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(3));
    let out = gpt2(&[
        "attribute",
        "--model-dir",
        d,
        "--prompt",
        prompt,
        "--target",
        "a",
        "--format",
        "json",
    ])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let (total, logit) = (
        v["total"].as_f64().ok_or("t")?,
        v["logit"].as_f64().ok_or("l")?,
    );
    assert!((total - logit).abs() < 1e-3 * (1.0 + logit.abs()));
    // A target that is not one token is refused, naming it.
    let out = gpt2(&[
        "attribute",
        "--model-dir",
        d,
        "--prompt",
        prompt,
        "--target",
        "hello there",
    ])?;
    assert_eq!(out.status.code(), Some(2));
    // --ablate on generate changes the greedy continuation, and mean differs from zero.
    let gen = |extra: &[&str]| -> Result<String> {
        let mut args = vec![
            "generate",
            "--model-dir",
            d,
            "--prompt",
            prompt,
            "-n",
            "12",
            "--temperature",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = gpt2(&args)?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["completion_token_ids"].to_string())
    };
    let clean = gen(&[])?;
    let zero = gen(&["--ablate", "0.1,1.2,1.3"])?;
    let mean = gen(&["--ablate", "0.1,1.2,1.3", "--ablate-mode", "mean"])?;
    assert_ne!(clean, zero);
    assert_ne!(zero, mean);
    let out = gpt2(&[
        "generate",
        "--model-dir",
        d,
        "--prompt",
        prompt,
        "--ablate",
        "7.0",
    ])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
