//! The IOI toolkit (`gpt2 ioi`, `gpt2::analysis::ioi`) against TransformerLens on the `tiny-b`
//! fixture (`scripts/make_ioi_goldens.py`, on the dataset `tests/fixtures/tiny-b/ioi_dataset.json`
//! that `gpt2 ioi` generated): its names are eight words that are one token after a space in
//! the fixture's 512-token vocabulary (none of the paper's names is), so the test checks the
//! pipeline's numbers, not IOI behaviour (the model is random).

use std::collections::HashMap;

use gpt2::analysis::ablation::HeadId;
use gpt2::analysis::ioi::{self, Experiments, Order};
use gpt2::{LoadOptions, Loaded, ModelSource, Tensor};
use serde_json::Value;

mod common;
use common::{assert_error, fixture, goldens, gpt2, scratch, stderr, Result};

fn loaded() -> Result<Loaded> {
    Ok(ModelSource::dir(fixture("tiny-b")).load(&LoadOptions::default())?)
}

fn heads(v: &Value) -> Result<Vec<HeadId>> {
    Ok(v.as_array()
        .ok_or("heads")?
        .iter()
        .map(|h| h.as_str().unwrap_or("").parse())
        .collect::<std::result::Result<_, _>>()?)
}

fn names(spec: &Value) -> Vec<String> {
    spec["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(String::from))
        .collect()
}

/// `got` against the golden `key` (flattened), within 1e-4.
fn check(g: &HashMap<String, Tensor>, key: &str, got: &[f64]) -> Result {
    let want: Vec<f32> = g
        .get(key)
        .ok_or(key.to_string())?
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

#[test]
fn the_generator_makes_the_committed_dataset() -> Result {
    let spec = common::fixture_json("tiny-b", "ioi_dataset.json")?;
    let l = loaded()?;
    let names = ioi::single_token_names(&l.tokenizer, &names(&spec))?;
    assert_eq!(names.len(), 8, "every fixture name is one token");
    let n = spec["n"].as_u64().ok_or("n")? as usize;
    let seed = spec["seed"].as_u64().ok_or("seed")?;
    let prompts = ioi::generate(n, seed, Order::Mixed, &names)?;
    assert_eq!(serde_json::to_value(&prompts)?, spec["dataset"]);
    // Another seed, another dataset.
    assert_ne!(ioi::generate(n, seed + 1, Order::Mixed, &names)?, prompts);
    Ok(())
}

#[test]
fn every_experiment_equals_transformer_lens() -> Result {
    let (g, _) = goldens("tiny-b", "ioi")?;
    let spec = common::fixture_json("tiny-b", "ioi_dataset.json")?;
    let l = loaded()?;
    let prompts: Vec<ioi::IoiPrompt> = spec["dataset"]
        .as_array()
        .ok_or("dataset")?
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            ioi::IoiPrompt {
                template: p["template"].as_u64().unwrap_or(0) as usize,
                order: if p["order"] == "abba" {
                    Order::Abba
                } else {
                    Order::Baba
                },
                io: s("io"),
                s: s("s"),
                place: s("place"),
                object: s("object"),
                text: s("text"),
                corrupted: s("corrupted"),
            }
        })
        .collect();
    let pairs = ioi::pairs(&l.tokenizer, &prompts)?;
    let experiments = Experiments {
        heads: true,
        path_logits: true,
        path_queries: Some(heads(&spec["name_movers"])?),
        ablate: Some(heads(&spec["ablate"])?),
    };
    let r = ioi::run(&l.model, &prompts, &pairs, &experiments)?;
    check(&g, "clean", &[r.clean.mean, r.clean.io_beats_s])?;
    check(&g, "corrupted", &[r.corrupted.mean, r.corrupted.io_beats_s])?;
    check(&g, "per_prompt", &r.per_prompt)?;
    check(&g, "heads", &r.head_patching.ok_or("heads")?.patched)?;
    check(
        &g,
        "path_logits",
        &r.path_to_logits.ok_or("logits")?.patched,
    )?;
    check(
        &g,
        "path_queries",
        &r.path_to_queries.ok_or("queries")?.patched,
    )?;
    let a = r.ablation.ok_or("ablation")?;
    check(&g, "ablated", &[a.ablated.mean, a.ablated.io_beats_s])?;
    // The ablation changes the logit difference: the heads were replaced.
    assert!((a.ablated.mean - r.clean.mean).abs() > 1e-3);
    Ok(())
}

/// `gpt2 ioi` with the dataset's command line and `extra`.
fn ioi_cmd(spec: &Value, extra: &[&str]) -> Result<std::process::Output> {
    let dir = fixture("tiny-b").display().to_string();
    let list = |k: &str| -> Vec<String> {
        spec[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let (n, seed) = (spec["n"].to_string(), spec["seed"].to_string());
    let (names, movers, ablate) = (
        list("names").join(","),
        list("name_movers").join(","),
        list("ablate").join(","),
    );
    let base = [
        "ioi",
        "--model-dir",
        &dir,
        "--n",
        &n,
        "--seed",
        &seed,
        "--names",
        &names,
        "--name-movers",
        &movers,
        "--ablate",
        &ablate,
    ];
    gpt2(&[&base[..], extra].concat())
}

fn values(v: &Value) -> Vec<f64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

#[test]
fn gpt2_ioi_prints_transformer_lens_numbers_and_writes_pairs_for_patch() -> Result {
    let (g, _) = goldens("tiny-b", "ioi")?;
    let spec = common::fixture_json("tiny-b", "ioi_dataset.json")?;
    let dir = scratch("ioi", "cli");
    let pairs = dir.join("ioi.jsonl").display().to_string();
    let out = ioi_cmd(&spec, &["--format", "json", "--dataset-out", &pairs])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["dataset"], spec["dataset"]);
    let pair = |k: &str| {
        [
            v[k]["mean"].as_f64().unwrap_or(f64::NAN),
            v[k]["io_beats_s"].as_f64().unwrap_or(f64::NAN),
        ]
    };
    check(&g, "clean", &pair("clean"))?;
    check(&g, "corrupted", &pair("corrupted"))?;
    check(&g, "heads", &values(&v["head_patching"]["patched"]))?;
    check(&g, "path_logits", &values(&v["path_to_logits"]["patched"]))?;
    check(
        &g,
        "path_queries",
        &values(&v["path_to_queries"]["patched"]),
    )?;
    let ablated = [
        v["ablation"]["ablated"]["mean"]
            .as_f64()
            .unwrap_or(f64::NAN),
        v["ablation"]["ablated"]["io_beats_s"]
            .as_f64()
            .unwrap_or(f64::NAN),
    ];
    check(&g, "ablated", &ablated)?;
    // The dataset as --pairs: gpt2 patch gives the same path patching.
    let model_dir = fixture("tiny-b").display().to_string();
    let out = gpt2(&[
        "patch",
        "--model-dir",
        &model_dir,
        "--pairs",
        &pairs,
        "--path-to",
        "q",
        "--receivers",
        "2.1,2.3",
        "--format",
        "json",
    ])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let p: Value = serde_json::from_slice(&out.stdout)?;
    check(&g, "path_queries", &values(&p["patched"]))?;
    // --figures: the three maps as PNGs.
    let figs = dir.join("figures");
    std::fs::create_dir_all(&figs)?;
    let out = ioi_cmd(
        &spec,
        &[
            "--figures",
            figs.to_str().ok_or("path")?,
            "--experiments",
            "heads,path-logits",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, drawn) in [
        ("heads.png", true),
        ("path_logits.png", true),
        ("path_queries.png", false),
    ] {
        let bytes = std::fs::read(figs.join(name)).unwrap_or_default();
        assert_eq!(bytes.starts_with(b"\x89PNG"), drawn, "{name}");
    }
    // Text: each experiment, named.
    let out = ioi_cmd(&spec, &["--experiments", "path-logits,ablate"])?;
    let text = String::from_utf8(out.stdout)?;
    for want in [
        "clean logit difference",
        "Path patching from each head to the logits",
        "Mean ablation of 1.0, 1.2, 2.2",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert!(!text.contains("Head patching"), "{text}");
    Ok(())
}

#[test]
fn gpt2_ioi_bad_input_is_one_error_line_naming_the_option() -> Result {
    let dir = fixture("tiny-b").display().to_string();
    for (args, needles) in [
        (&["--names", "you,they,Mary"][..], &["--names", "Mary"][..]),
        (
            &["--names", "you,they,who,this"],
            &["--names", "at least 5"],
        ),
        (&["--name-movers", "9.9"], &["--name-movers", "3 layers"]),
        (&["--experiments", "ablate"], &["--experiments", "--ablate"]),
        (
            &["--experiments", "path-queries"],
            &["--name-movers", "9.9,9.6,10.0"],
        ),
        (
            &["--ablate", "3.1", "--names", "you,they,who,this,all"],
            &["--ablate", "3.1"],
        ),
        (&["--n", "0", "--names", "you,they,who,this,all"], &["--n"]),
        (&["--n", "18446744073709551615"], &["--n", "1 to 100000"]),
        (&["--order", "abc"], &["--order"]),
    ] {
        let out = gpt2(&[&["ioi", "--model-dir", &dir][..], args].concat())?;
        assert_error(&out, 2, needles);
    }
    Ok(())
}
