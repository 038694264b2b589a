//! Parity with transformers' `GPT2LMHeadModel` on the committed fixtures (see
//! `scripts/make_fixtures.py`): logits, attention probabilities and greedy decoding, as llm.c's
//! `test_gpt2.c` does, by max-abs-diff.

use std::collections::HashMap;

use gpt2::{DType, Gpt2, LoadOptions, ModelSource, Tensor};

mod common;
use common::{fixture, fixture_tensors, max_abs_diff, Result};

const FIXTURES: [&str; 2] = ["tiny", "tiny-b"];

fn load(name: &str, dtype: DType) -> Result<Gpt2> {
    let opts = LoadOptions::default().with_dtype(dtype);
    Ok(ModelSource::dir(fixture(name)).load_model(&opts)?)
}

/// Greedy decoding with the KV cache: prefill the prompt once, then one token per step.
fn greedy(model: &Gpt2, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let logits = model.forward_last(&input, Some(&mut cache))?;
        let next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        out.push(next);
        input = Tensor::new(&[[next]], model.device())?;
    }
    Ok(out)
}

fn golden_ids(g: &HashMap<String, Tensor>, key: &str) -> Result<Vec<u32>> {
    Ok(g[key]
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?)
}

#[test]
fn logits_and_attention_match_transformers_f32() -> Result {
    for name in FIXTURES {
        let model = load(name, DType::F32)?;
        let g = fixture_tensors(name, "goldens.safetensors")?;
        let ids = g["input_ids"].to_dtype(DType::U32)?;
        let layers: Vec<usize> = (0..model.config().n_layer).collect();
        let (logits, attn) = model.forward_with_attention(&ids, None, &layers)?;
        let d = max_abs_diff(&logits, &g["logits"])?;
        println!("{name}: max |Δlogit| = {d:.3e}");
        assert!(d <= 1e-4, "{name}: max |Δlogit| = {d:e}");
        for (l, a) in attn.iter().enumerate() {
            let d = max_abs_diff(a, &g[&format!("attn.{l}")])?;
            println!("{name}: layer {l} max |Δattention| = {d:.3e}");
            assert!(d <= 1e-5, "{name} layer {l}: max |Δattention| = {d:e}");
        }
    }
    Ok(())
}

#[test]
fn greedy_ids_match_transformers_generate_f32() -> Result {
    for name in FIXTURES {
        let model = load(name, DType::F32)?;
        let g = fixture_tensors(name, "goldens.safetensors")?;
        let expected = golden_ids(&g, "greedy_ids")?;
        let got = greedy(
            &model,
            &golden_ids(&g, "greedy_prompt_ids")?,
            expected.len(),
        )?;
        assert_eq!(got, expected, "{name}");
    }
    Ok(())
}

/// Half precision cannot match f32 to 1e-4; the documented contract is: logits within 0.1 (f16)
/// and 1.0 (bf16; 7% of the largest logit) of transformers' f32 logits, attention within 5e-3 / 3e-2, and the first
/// greedy tokens identical.
#[test]
fn half_precision_stays_close() -> Result {
    for (dtype, logit_tol, attn_tol, same_first) in
        [(DType::F16, 0.1, 5e-3, 10), (DType::BF16, 1.0, 3e-2, 5)]
    {
        for name in FIXTURES {
            let model = load(name, dtype)?;
            let g = fixture_tensors(name, "goldens.safetensors")?;
            let ids = g["input_ids"].to_dtype(DType::U32)?;
            let (logits, attn) = model.forward_with_attention(&ids, None, &[0])?;
            let d = max_abs_diff(&logits, &g["logits"])?;
            let da = max_abs_diff(&attn[0], &g["attn.0"])?;
            println!(
                "{name} {dtype:?}: max |Δlogit| = {d:.3e}, layer 0 max |Δattention| = {da:.3e}"
            );
            assert!(d <= logit_tol, "{name} {dtype:?}: max |Δlogit| = {d}");
            assert!(da <= attn_tol, "{name} {dtype:?}: max |Δattention| = {da}");
            let expected = golden_ids(&g, "greedy_ids")?;
            let got = greedy(&model, &golden_ids(&g, "greedy_prompt_ids")?, same_first)?;
            assert_eq!(got, expected[..same_first], "{name} {dtype:?}");
        }
    }
    Ok(())
}

/// 8- and 4-bit weights (llama.cpp's Q8_0 / Q4_0; under q4_0 the embedding/LM head takes 6 bits,
/// as llama.cpp's q6_K; decode multiplies them by 8-bit activations, as llama.cpp does). These
/// fixtures are built to amplify any error (scaled weights, sharp attention, logits up to ~14),
/// so the documented contract is loose here: logits (prefill, f32 activations) within 1.0 (q8_0;
/// measured 0.79 / 0.19) and 6.0 (q4_0; measured 5.9 / 2.7, with an 8-bit head 5.7 / 2.9) of
/// transformers' f32, the first 3 (q8_0) and 1 (q4_0) greedy tokens identical; q4_k (llama.cpp's
/// q4_K) within 8.0 (measured 6.5 / 2.4), the first greedy token identical on tiny-b. Perplexity
/// deltas on text are in the README (q4_k's about a third of q4_0's).
#[test]
fn quantized_weights_stay_close() -> Result {
    for (q, logit_tol, same_first) in [
        (gpt2::Quantization::Q8_0, 1.0, 3),
        (gpt2::Quantization::Q4_0, 6.0, 1),
        (gpt2::Quantization::Q4K, 8.0, 1),
    ] {
        for name in FIXTURES {
            let opts = LoadOptions::default().quantized(q);
            let model = ModelSource::dir(fixture(name)).load_model(&opts)?;
            let g = fixture_tensors(name, "goldens.safetensors")?;
            let ids = g["input_ids"].to_dtype(DType::U32)?;
            let logits = model.forward(&ids, None)?;
            let d = max_abs_diff(&logits, &g["logits"])?;
            println!("{name} {q:?}: max |Δlogit| = {d:.3e}");
            assert!(d <= logit_tol, "{name} {q:?}: max |Δlogit| = {d}");
            // q4_k picks another first token on tiny (its 6-bit sub-block scales are coarse
            // where a sub-block is much smaller than its superblock's largest, as these scaled
            // weights make them); it is greedy-exact on tiny-b.
            let same_first = if (q, name) == (gpt2::Quantization::Q4K, "tiny") {
                0
            } else {
                same_first
            };
            let expected = golden_ids(&g, "greedy_ids")?;
            let got = greedy(&model, &golden_ids(&g, "greedy_prompt_ids")?, same_first)?;
            assert_eq!(got, expected[..same_first], "{name} {q:?}");
        }
    }
    Ok(())
}

#[test]
fn kv_cache_decoding_equals_full_forward() -> Result {
    for name in FIXTURES {
        let model = load(name, DType::F32)?;
        let ids =
            fixture_tensors(name, "goldens.safetensors")?["input_ids"].to_dtype(DType::U32)?;
        let full = model.forward(&ids, None)?;
        // Prefill 5, then a chunk of 4, then one token at a time: every path through the cache.
        let mut cache = model.new_cache();
        let mut parts = vec![model.forward(&ids.narrow(1, 0, 5)?, Some(&mut cache))?];
        parts.push(model.forward(&ids.narrow(1, 5, 4)?, Some(&mut cache))?);
        for t in 9..16 {
            parts.push(model.forward(&ids.narrow(1, t, 1)?, Some(&mut cache))?);
        }
        assert_eq!(cache.seq_len(), 16);
        let d = max_abs_diff(&Tensor::cat(&parts, 1)?, &full)?;
        println!("{name}: cached vs full max |Δlogit| = {d:.3e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
    Ok(())
}

/// Prefill 5 tokens, then a chunk of 4, then one token at a time: every path through the cache.
fn decode_in_parts(model: &Gpt2, ids: &Tensor, capture: bool) -> Result<Tensor> {
    let mut cache = model.new_cache();
    let mut parts = vec![];
    for (start, len) in [(0, 5), (5, 4)].into_iter().chain((9..16).map(|t| (t, 1))) {
        let step = ids.narrow(1, start, len)?;
        parts.push(if capture {
            // The unfused path: candle's ops, the pattern captured.
            model
                .forward_with_attention(&step, Some(&mut cache), &[0])?
                .0
        } else {
            model.forward(&step, Some(&mut cache))?
        });
    }
    assert_eq!(cache.seq_len(), 16);
    Ok(Tensor::cat(&parts, 1)?)
}

/// Reduced weights get an f16 KV cache by default (half the bytes a decoded token reads from
/// it). Decoding through it stays within the weights' own contract of decoding through an f32
/// cache (0.1 for f16, 1.0 for q8_0, whose 8-bit activations magnify any change on these
/// fixtures), greedily picks the same first tokens, and both attention paths read the same
/// cache. An f32 cache (`with_kv_cache`) gives back the full forward's numbers, and f32 weights
/// keep an f32 cache.
#[test]
fn a_half_kv_cache_stays_close_to_an_f32_one() -> Result {
    for name in FIXTURES {
        assert_eq!(load(name, DType::F32)?.kv_dtype(), DType::F32);
        let g = fixture_tensors(name, "goldens.safetensors")?;
        let ids = g["input_ids"].to_dtype(DType::U32)?;
        let prompt = golden_ids(&g, "greedy_prompt_ids")?;
        let source = ModelSource::dir(fixture(name));
        for (label, opts, tol, same_first) in [
            (
                "f16",
                LoadOptions::default().with_dtype(DType::F16),
                0.1,
                10,
            ),
            (
                "q8_0",
                LoadOptions::default().quantized(gpt2::Quantization::Q8_0),
                1.0,
                3,
            ),
        ] {
            let half = source.load_model(&opts)?;
            let exact = source.load_model(&opts.clone().with_kv_cache(DType::F32))?;
            assert_eq!(
                (half.kv_dtype(), exact.kv_dtype()),
                (DType::F16, DType::F32)
            );
            let reference = decode_in_parts(&exact, &ids, false)?;
            let d = max_abs_diff(&decode_in_parts(&half, &ids, false)?, &reference)?;
            println!("{name} {label}: f16 vs f32 cache max |Δlogit| {d:.3e}");
            assert!(d > 0.0 && d <= tol, "{name} {label}: f16 vs f32 cache {d}");
            assert_eq!(
                greedy(&half, &prompt, same_first)?,
                greedy(&exact, &prompt, same_first)?,
                "{name} {label}"
            );
            if label == "f16" {
                // f32 activations throughout: the paths differ in summation order only.
                let full = max_abs_diff(&reference, &exact.forward(&ids, None)?)?;
                let paths = max_abs_diff(
                    &decode_in_parts(&half, &ids, false)?,
                    &decode_in_parts(&half, &ids, true)?,
                )?;
                println!(
                    "{name} {label}: f32 cache vs full {full:.3e}, fused vs unfused {paths:.3e}"
                );
                assert!(full <= 1e-4, "{name} {label}: f32 cache vs full {full}");
                assert!(paths <= 1e-3, "{name} {label}: fused vs unfused {paths}");
            }
        }
    }
    Ok(())
}
