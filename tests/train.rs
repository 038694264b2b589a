//! `gpt2 train`, end to end: exact against torch's GPT2LMHeadModel + AdamW (goldens from
//! scripts/make_train_goldens.py), resumed runs bit for bit, the folder loadable, bad input.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use gpt2::{Device, Tensor};
use serde_json::Value;

/// `gpt2 train` from tests/fixtures/tiny on its train_ids.npy with `case`'s options, as the
/// golden script trains it.
fn train_case(case: &Value, dtype: &str, out: &Path) -> Result {
    let o = &case["options"];
    let data = fixture("tiny").join("train_ids.npy");
    let opt = |k: &str| o[k].to_string().trim_matches('"').to_string();
    let args: Vec<String> = [
        "train",
        "--init",
        fixture("tiny").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--sequential",
        "--steps",
        "20",
        "--eval-every",
        "0",
        "--dtype",
        dtype,
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        [
            ("--lr", "lr"),
            ("--weight-decay", "weight_decay"),
            ("--grad-clip", "grad_clip"),
            ("--warmup", "warmup"),
            ("--lr-schedule", "schedule"),
            ("--min-lr", "min_lr"),
            ("--beta1", "beta1"),
            ("--beta2", "beta2"),
            ("--eps", "eps"),
            ("--batch-size", "batch_size"),
            ("--seq-len", "seq_len"),
        ]
        .into_iter()
        .flat_map(|(flag, key)| [flag.to_string(), opt(key)]),
    )
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = gpt2(&args)?;
    assert!(run.status.success(), "{}", stderr(&run));
    Ok(())
}

/// The losses of `OUT/steps.jsonl`, step by step.
fn losses(out: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(out.join("steps.jsonl"))?;
    text.lines()
        .map(|l| {
            Ok(serde_json::from_str::<Value>(l)?["loss"]
                .as_f64()
                .ok_or("no loss")?)
        })
        .collect()
}

/// `OUT/model.safetensors` by checkpoint name (the `transformer.` prefix removed), as f64.
fn weights(out: &Path) -> Result<HashMap<String, Tensor>> {
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    saved
        .into_iter()
        .map(|(n, t)| {
            let name = n.strip_prefix("transformer.").unwrap_or(&n).to_string();
            Ok((name, t.to_dtype(gpt2::DType::F64)?))
        })
        .collect()
}

/// max |a − b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-30))
}

/// Twenty steps equal torch's, for each case (constant; warm-up + cosine + clipping):
/// - in f64, the arithmetic itself: every loss within 1e-11 and every weight within 1e-9
///   (relative) of torch's f64 run;
/// - in f32, every loss within 1e-5 relative, and every weight within 1e-4 relative of torch's
///   f32 run, or within 3 × the distance between torch's own f32 and f64 runs where that is
///   larger. Adam divides each gradient by its own running size, so a gradient that is zero in
///   exact arithmetic (the key bias: softmax ignores a shift of every score of a row) but
///   rounding noise in f32 takes steps of ±lr in torch as here: torch f32 ends 1e-2 from torch
///   f64 there (train.json's `torch_f32_vs_f64`), and no f32 implementation can do better.
#[test]
fn twenty_steps_equal_torch_adamw() -> Result {
    let golden = fixture_json("tiny", "train.json")?;
    for (name, case) in golden["cases"].as_object().ok_or("no cases")? {
        for dtype in ["f64", "f32"] {
            let out = scratch("train", &format!("torch-{name}-{dtype}"));
            train_case(case, dtype, &out)?;
            let want: Vec<f64> = case[format!("losses_{dtype}")]
                .as_array()
                .ok_or("no losses")?
                .iter()
                .filter_map(Value::as_f64)
                .collect();
            let got = losses(&out)?;
            assert_eq!(got.len(), want.len(), "{name} {dtype}");
            let loss_tol = if dtype == "f64" { 1e-11 } else { 1e-5 };
            for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    ((g - w) / w).abs() < loss_tol,
                    "{name} {dtype}: step {} loss {g} vs torch {w}",
                    s + 1
                );
            }
            let reference = fixture_tensors("tiny", &format!("train_{name}_{dtype}.safetensors"))?;
            let ours = weights(&out)?;
            assert_eq!(ours.len(), reference.len(), "{name}: {:?}", ours.keys());
            for (tensor, w) in &reference {
                let w = w.to_dtype(gpt2::DType::F64)?;
                let rel = relative(&ours[tensor], &w)?;
                let tol = if dtype == "f64" {
                    1e-9
                } else {
                    let spread = case["torch_f32_vs_f64"][tensor]
                        .as_f64()
                        .ok_or("no spread")?;
                    f64::max(1e-4, 3.0 * spread)
                };
                assert!(
                    rel <= tol,
                    "{name} {dtype}: {tensor} off by {rel:e} (allowed {tol:e})"
                );
            }
        }
    }
    Ok(())
}
