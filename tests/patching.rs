//! Activation patching against TransformerLens (`scripts/make_patching_goldens.py`: its
//! `run_with_cache` and every `get_act_patch_*` function on the `tiny` fixture), library and
//! binary.

use std::collections::HashMap;

use gpt2::analysis::patching::{
    activation_patch, activation_patch_mean, run_with_cache, Act, By, Metric, Pair, What,
};
use gpt2::{Gpt2, LoadOptions, ModelSource, Tensor};
use gpt2::{Hook, Point};
use serde_json::Value;

mod common;
use common::{assert_error, fixture, goldens, gpt2, ids, max_abs_diff, Result};

fn model() -> Result<Gpt2> {
    Ok(ModelSource::dir(fixture("tiny")).load_model(&LoadOptions::default())?)
}

struct Case {
    clean: Vec<u32>,
    corrupted: Vec<u32>,
    target: u32,
    against: u32,
    g: HashMap<String, Tensor>,
    v: Value,
}

fn case() -> Result<Case> {
    let (g, v) = goldens("tiny", "patching")?;
    let id = |k: &str| v[k].as_u64().map(|x| x as u32).ok_or(k.to_string());
    Ok(Case {
        clean: ids(&v["clean_ids"]),
        corrupted: ids(&v["corrupted_ids"]),
        target: id("target_id")?,
        against: id("against_id")?,
        g,
        v,
    })
}

/// `got` (shape, values) against the golden `key`, within 1e-4.
fn check(c: &Case, key: &str, shape: &[usize], got: &[f64]) -> Result<f64> {
    let want = c.g.get(key).ok_or(format!("no golden {key}"))?;
    assert_eq!(want.dims(), shape, "{key}: shape");
    let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0.0, f64::max);
    println!("{key}: max |Δ| = {d:e}");
    assert!(d < 1e-4, "{key}: {d}");
    Ok(d)
}

#[test]
fn run_with_cache_equals_transformer_lens() -> Result {
    let c = case()?;
    let m = model()?;
    let names: Vec<String> =
        c.g.keys()
            .filter_map(|k| k.strip_prefix("cache.").map(String::from))
            .collect();
    assert_eq!(names.len(), 2 + 9 * m.config().n_layer);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = Tensor::new(c.clean.as_slice(), m.device())?.unsqueeze(0)?;
    let cache = run_with_cache(&m, &ids, &names)?;
    assert_eq!(cache.len(), names.len(), "nothing else kept");
    for name in names {
        let d = max_abs_diff(cache.need(name)?, &c.g[&format!("cache.{name}")])?;
        println!("{name}: max |Δ| = {d:e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
    // Only what is asked for, and unknown names are errors naming them.
    let one = run_with_cache(&m, &ids, &["blocks.0.attn.hook_q"])?;
    assert_eq!(one.names().collect::<Vec<_>>(), ["blocks.0.attn.hook_q"]);
    for bad in [
        "blocks.0.hook_resid_mid",
        "blocks.9.hook_mlp_out",
        "hook_nothing",
    ] {
        let e = run_with_cache(&m, &ids, &[bad])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(bad)),
            "{bad}: {e:?}"
        );
    }
    Ok(())
}

/// Every `--what`/`--by` and the TransformerLens function it equals.
const CASES: [(What, By, &str); 19] = [
    (What::One(Act::ResidPre), By::Pos, "resid_pre"),
    (What::One(Act::AttnOut), By::Pos, "attn_out"),
    (What::One(Act::MlpOut), By::Pos, "mlp_out"),
    (What::One(Act::ResidPre), By::Layer, "resid_pre_layer"),
    (What::One(Act::AttnOut), By::Layer, "attn_out_layer"),
    (What::One(Act::MlpOut), By::Layer, "mlp_out_layer"),
    (What::One(Act::HeadOut), By::Head, "attn_head_out_all_pos"),
    (What::One(Act::HeadQ), By::Head, "attn_head_q_all_pos"),
    (What::One(Act::HeadK), By::Head, "attn_head_k_all_pos"),
    (What::One(Act::HeadV), By::Head, "attn_head_v_all_pos"),
    (
        What::One(Act::HeadPattern),
        By::Head,
        "attn_head_pattern_all_pos",
    ),
    (What::One(Act::HeadOut), By::HeadPos, "attn_head_out_by_pos"),
    (What::One(Act::HeadQ), By::HeadPos, "attn_head_q_by_pos"),
    (What::One(Act::HeadK), By::HeadPos, "attn_head_k_by_pos"),
    (What::One(Act::HeadV), By::HeadPos, "attn_head_v_by_pos"),
    (
        What::One(Act::HeadPattern),
        By::HeadPos,
        "attn_head_pattern_by_pos",
    ),
    (What::Every, By::Head, "attn_head_all_pos_every"),
    (What::Every, By::HeadPos, "attn_head_by_pos_every"),
    (What::Every, By::Pos, "block_every"),
];

#[test]
fn every_patch_equals_transformer_lens() -> Result {
    let c = case()?;
    let m = model()?;
    let metric = Metric::LogitDiff {
        target: c.target,
        against: c.against,
    };
    for (what, by, key) in CASES {
        let p = activation_patch(&m, &c.clean, &c.corrupted, what, by, metric, None)?;
        check(&c, "logit_diff.clean", &[1], &[p.clean])?;
        check(&c, "logit_diff.corrupted", &[1], &[p.corrupted])?;
        check(&c, &format!("logit_diff.{key}"), &p.shape, &p.patched)?;
        // Normalised: 0 at the corrupted run, 1 at the clean one.
        for (n, v) in p.normalized.iter().zip(&p.patched) {
            let want = (v - p.corrupted) / (p.clean - p.corrupted);
            assert!((n - want).abs() < 1e-12);
        }
    }
    // Not a no-op: patching moves the metric, and patching everything at layer 0 gives the
    // clean run.
    let p = activation_patch(
        &m,
        &c.clean,
        &c.corrupted,
        What::One(Act::ResidPre),
        By::Layer,
        metric,
        None,
    )?;
    assert!((p.clean - p.corrupted).abs() > 1e-3);
    assert!((p.normalized[0] - 1.0).abs() < 1e-4, "{:?}", p.normalized);
    assert_eq!(c.v["position"].as_u64(), Some(p.position as u64));
    Ok(())
}

#[test]
fn logit_prob_and_loss_metrics_equal_transformer_lens() -> Result {
    let c = case()?;
    let m = model()?;
    let t = c.target;
    for (name, metric) in [
        ("logit", Metric::Logit { target: t }),
        ("prob", Metric::Prob { target: t }),
        ("loss", Metric::Loss { target: t }),
    ] {
        for (what, by, key) in [
            (What::One(Act::ResidPre), By::Pos, "resid_pre"),
            (What::One(Act::HeadOut), By::Head, "attn_head_out_all_pos"),
        ] {
            let p = activation_patch(&m, &c.clean, &c.corrupted, what, by, metric, None)?;
            check(&c, &format!("{name}.clean"), &[1], &[p.clean])?;
            check(&c, &format!("{name}.corrupted"), &[1], &[p.corrupted])?;
            check(&c, &format!("{name}.{key}"), &p.shape, &p.patched)?;
        }
    }
    Ok(())
}

#[test]
fn bad_patching_inputs_are_errors_naming_the_parameter() -> Result {
    let c = case()?;
    let m = model()?;
    let metric = Metric::Logit { target: c.target };
    let resid = What::One(Act::ResidPre);
    let err = |r: gpt2::Result<_>| {
        r.err()
            .map(|e: gpt2::Error| e.to_string())
            .unwrap_or_default()
    };
    let e = err(activation_patch(
        &m,
        &c.clean,
        &c.corrupted[1..],
        resid,
        By::Pos,
        metric,
        None,
    ));
    assert!(e.contains("same length"), "{e}");
    let e = err(activation_patch(
        &m,
        &c.clean,
        &c.corrupted,
        resid,
        By::Pos,
        metric,
        Some(13),
    ));
    assert!(e.contains("out of range"), "{e}");
    let e = err(activation_patch(
        &m,
        &c.clean,
        &c.corrupted,
        resid,
        By::Head,
        metric,
        None,
    ));
    assert!(e.contains("does not apply"), "{e}");
    let e = err(activation_patch(
        &m,
        &c.clean,
        &c.corrupted,
        resid,
        By::Pos,
        Metric::Logit { target: 9999 },
        None,
    ));
    assert!(e.contains("outside the vocabulary"), "{e}");
    Ok(())
}

/// Changes every query of one layer by `scale` (1: a hook that changes nothing).
struct ScaleQ(usize, f64);

impl Hook for ScaleQ {
    fn wants(&self, p: Point) -> bool {
        p == Point::Q(self.0)
    }
    fn at(&mut self, _: Point, t: &mut Tensor) -> gpt2::Result<()> {
        *t = t.affine(self.1, 0.0)?;
        Ok(())
    }
}

#[test]
fn query_key_value_points_change_the_pass_only_when_hooked() -> Result {
    let c = case()?;
    let m = model()?;
    let ids = Tensor::new(c.clean.as_slice(), m.device())?.unsqueeze(0)?;
    let plain = m.forward(&ids, None)?;
    let run = |hook: &mut dyn Hook| -> Result<Tensor> {
        Ok(m.run(&ids, None, Some(hook), gpt2::Output::All)?
            .ok_or("no logits")?)
    };
    // Seen and handed back unchanged: the same numbers.
    assert!(max_abs_diff(&run(&mut ScaleQ(1, 1.0))?, &plain)? < 1e-5);
    // Changed: the pass uses what the hook returns.
    assert!(max_abs_diff(&run(&mut ScaleQ(1, 0.0))?, &plain)? > 1e-3);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The binary

fn patch_args<'a>(c: &'a Case, extra: &[&'a str]) -> Vec<&'a str> {
    let dir = Box::leak(fixture("tiny").display().to_string().into_boxed_str());
    let mut a = vec![
        "patch",
        "--model-dir",
        dir,
        "--clean",
        c.v["clean"].as_str().unwrap_or_default(),
        "--corrupted",
        c.v["corrupted"].as_str().unwrap_or_default(),
        "--target",
        c.v["target"].as_str().unwrap_or_default(),
    ];
    a.extend(extra);
    a
}

#[test]
fn gpt2_patch_prints_transformer_lens_numbers_as_json_and_text() -> Result {
    let c = case()?;
    let against = c.v["against"].as_str().ok_or("against")?;
    for (what, by, key) in [
        ("head_out", "head", "attn_head_out_all_pos"),
        ("every", "pos", "block_every"),
        ("head_pattern", "head_pos", "attn_head_pattern_by_pos"),
    ] {
        let args = patch_args(
            &c,
            &[
                "--against",
                against,
                "--what",
                what,
                "--by",
                by,
                "--format",
                "json",
            ],
        );
        let out = gpt2(&args)?;
        assert!(out.status.success(), "{}", common::stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let shape: Vec<usize> = ids(&v["shape"]).iter().map(|&x| x as usize).collect();
        let patched: Vec<f64> = v["patched"]
            .as_array()
            .ok_or("patched")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        check(&c, &format!("logit_diff.{key}"), &shape, &patched)?;
        assert_eq!(ids(&v["clean_ids"]), c.clean);
        assert_eq!(v["metric"]["kind"], "logit_diff");
    }
    // The text table: layers × positions with the tokens on the axis, raw and normalised.
    let out = gpt2(&patch_args(
        &c,
        &["--against", against, "--what", "resid_pre"],
    ))?;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("patched") && text.contains("normalised"),
        "{text}"
    );
    assert!(
        text.contains("\" c\"/\" do\""),
        "the differing tokens label positions: {text}"
    );
    let want = c.g["logit_diff.resid_pre"].to_vec2::<f32>()?;
    assert!(
        text.contains(&format!("{:+.4}", want[1][12])),
        "{text} lacks {}",
        want[1][12]
    );
    Ok(())
}

#[test]
fn gpt2_patch_bad_input_is_one_error_line_naming_the_option() -> Result {
    let c = case()?;
    for (extra, needle) in [
        (
            vec!["--what", "resid_pre", "--corrupted", "x"],
            "--corrupted",
        ),
        (
            vec!["--what", "resid_pre", "--position", "13"],
            "--position",
        ),
        (vec!["--what", "nothing"], "--what"),
        (vec!["--what", "head_out", "--by", "pos"], "--by"),
        (
            vec!["--what", "resid_pre", "--against", " Mary"],
            "--against",
        ),
        (
            vec!["--what", "resid_pre", "--metric", "logit-diff"],
            "--metric",
        ),
        (
            vec![
                "--what",
                "every",
                "--by",
                "head",
                "--format",
                "png",
                "--out",
                "/tmp/x.png",
            ],
            "--format",
        ),
    ] {
        let mut args = patch_args(&c, &[]);
        // A later --corrupted replaces the first: drop the fixture's.
        if extra.contains(&"--corrupted") {
            args.truncate(args.len() - 4);
            args.extend(["--target", " s"]);
        }
        args.extend(extra.iter().copied());
        let out = gpt2(&args)?;
        assert_error(&out, 2, &[needle]);
    }
    // A target of several tokens.
    let mut args = patch_args(&c, &["--what", "resid_pre"]);
    let n = args.len();
    args[n - 3] = " Mary";
    assert_error(&gpt2(&args)?, 2, &["--target", "not one"]);
    Ok(())
}

#[test]
fn gpt2_patch_negative_positions_count_from_the_end() -> Result {
    let c = case()?;
    let t = c.clean.len() as i64;
    let against = c.v["against"].as_str().ok_or("against")?;
    let json = |extra: &[&str]| -> Result<Value> {
        let mut args = patch_args(&c, &["--against", against, "--format", "json"]);
        args.extend(extra);
        let out = gpt2(&args)?;
        assert!(out.status.success(), "{extra:?}: {}", common::stderr(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // -1 is the last position (the default), -k is t - k, as Python indexes; path patching too.
    for what in [
        &["--what", "head_out"][..],
        &["--what", "resid_pre", "--by", "pos"],
        &["--path-to", "logits"],
    ] {
        let (minus_3, three_back) = (
            json(&[what, &["--position", "-3"]].concat())?,
            json(&[what, &["--position", &(t - 3).to_string()]].concat())?,
        );
        assert_eq!(minus_3["position"].as_i64(), Some(t - 3), "{what:?}");
        assert_eq!(minus_3["patched"], three_back["patched"], "{what:?}");
        let last = json(&[what, &["--position", "-1"]].concat())?;
        assert_eq!(last["patched"], json(what)?["patched"], "{what:?}");
        assert_eq!(last["position"].as_i64(), Some(t - 1));
    }
    // Out of range, either sign: one line naming the flag and the range.
    let range = format!("-{t}..={}", t - 1);
    for bad in [t.to_string(), format!("-{}", t + 1)] {
        for what in [&["--what", "head_out"][..], &["--path-to", "logits"]] {
            let mut args = patch_args(&c, &["--against", against, "--position", &bad]);
            args.extend(what);
            assert_error(&gpt2(&args)?, 2, &["--position", &bad, &range]);
        }
    }
    // A dataset: each pair's own end.
    let dir = common::scratch("patching", "negative_position");
    let file = dir.join("pairs.jsonl");
    std::fs::write(
        &file,
        "{\"clean\": \"The cat sat on the mat. The cat\", \"corrupted\": \"The dog sat on the mat. The dog\"}\n\
         {\"clean\": \"The cat sat. The cat\", \"corrupted\": \"The dog sat. The dog\"}\n",
    )?;
    let model_dir = fixture("tiny").display().to_string();
    let file = file.display().to_string();
    let pairs = |extra: &[&str]| -> Result<std::process::Output> {
        let base = [
            "patch",
            "--model-dir",
            &model_dir,
            "--pairs",
            &file,
            "--target",
            " s",
            "--against",
            " the",
            "--what",
            "head_out",
            "--format",
            "json",
        ];
        gpt2(&[&base[..], extra].concat())
    };
    let out = pairs(&["--position", "-2"])?;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let last: Value = serde_json::from_slice(&pairs(&[])?.stdout)?;
    let at = |v: &Value| -> Vec<i64> {
        v["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["position"].as_i64())
            .collect()
    };
    let ends = at(&last);
    assert_eq!(ends.len(), 2);
    assert_ne!(ends[0], ends[1], "pairs of two lengths");
    assert_eq!(at(&v), ends.iter().map(|e| e - 1).collect::<Vec<_>>());
    // Out of range for the shorter pair: the error names it.
    let short = ends.iter().min().copied().unwrap_or(0) + 1;
    let out = pairs(&["--position", &format!("-{}", short + 1)])?;
    assert_error(&out, 2, &["--position", "line 2", &format!("-{short}..=")]);
    Ok(())
}

/// The patched values of a `gpt2 patch --format json` run, and its shape.
fn json_result(v: &Value, key: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let shape = ids(&v["shape"]).iter().map(|&x| x as usize).collect();
    let values = v[key]
        .as_array()
        .ok_or(key.to_string())?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    Ok((shape, values))
}

#[test]
fn gpt2_patch_reads_prompt_files_and_writes_npy_with_its_json() -> Result {
    let c = case()?;
    let dir = common::scratch("patching", "files");
    let (clean, corrupted) = (dir.join("clean.txt"), dir.join("corrupted.txt"));
    std::fs::write(&clean, c.v["clean"].as_str().ok_or("clean")?)?;
    std::fs::write(&corrupted, c.v["corrupted"].as_str().ok_or("corrupted")?)?;
    let model_dir = fixture("tiny").display().to_string();
    let (clean_s, corrupted_s) = (clean.display().to_string(), corrupted.display().to_string());
    let out_path = dir.join("heads.npy");
    let out_s = out_path.display().to_string();
    let base = [
        "patch",
        "--model-dir",
        &model_dir,
        "--clean-file",
        &clean_s,
        "--corrupted-file",
        &corrupted_s,
        "--target",
        " s",
        "--against",
        " the",
    ];
    for (what, by, key) in [
        ("head_out", "head", "attn_head_out_all_pos"),
        ("every", "pos", "block_every"),
    ] {
        let out = gpt2(
            &[
                &base[..],
                &[
                    "--what", what, "--by", by, "--format", "npy", "--out", &out_s,
                ],
            ]
            .concat(),
        )?;
        assert!(out.status.success(), "{}", common::stderr(&out));
        let (shape, values) = common::read_npy(&out_path)?;
        let values: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        check(&c, &format!("logit_diff.{key}"), &shape, &values)?;
        // The JSON beside it: the axes, the baselines to normalise by, the tokens, and the
        // array's size and CRC-32, by which the two are known to belong together.
        let side: Value = serde_json::from_slice(&std::fs::read(dir.join("heads.npy.json"))?)?;
        let bytes = std::fs::read(&out_path)?;
        assert_eq!(
            side["array_crc32"].as_u64(),
            Some(crc32fast::hash(&bytes) as u64)
        );
        assert_eq!(side["array_bytes"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(
            ids(&side["shape"]),
            shape.iter().map(|&x| x as u32).collect::<Vec<_>>()
        );
        check(
            &c,
            "logit_diff.clean",
            &[1],
            &[side["clean"].as_f64().ok_or("clean")?],
        )?;
        check(
            &c,
            "logit_diff.corrupted",
            &[1],
            &[side["corrupted"].as_f64().ok_or("c")?],
        )?;
        assert_eq!(ids(&side["clean_ids"]), c.clean);
        assert_eq!(side["what"], what);
        assert_eq!(side["axes"].as_array().map(Vec::len), Some(shape.len()));
    }
    // The files are read as they are: a final newline is a token, so the lengths differ.
    std::fs::write(
        &corrupted,
        format!("{}\n", c.v["corrupted"].as_str().ok_or("c")?),
    )?;
    let out = gpt2(&[&base[..], &["--what", "head_out"]].concat())?;
    assert_error(&out, 2, &["--corrupted", "same length"]);
    // npy needs a file; a missing prompt file is named; --clean and --clean-file conflict.
    let out = gpt2(&[&base[..], &["--what", "head_out", "--format", "npy"]].concat())?;
    assert_error(&out, 2, &["--format", "npy needs --out"]);
    let mut args = base.to_vec();
    args[4] = "/nonexistent/clean.txt";
    assert_error(
        &gpt2(&[&args[..], &["--what", "head_out"]].concat())?,
        1,
        &["--clean-file", "/nonexistent/clean.txt"],
    );
    let out = gpt2(&[&base[..], &["--what", "head_out", "--clean", "x"]].concat())?;
    assert_error(&out, 2, &["--clean"]);
    // The output may not replace an input.
    let out = gpt2(
        &[
            &base[..],
            &["--what", "head_out", "--format", "json", "--out", &clean_s],
        ]
        .concat(),
    )?;
    assert_error(&out, 2, &["--out"]);
    assert_eq!(
        std::fs::read_to_string(&clean)?,
        c.v["clean"].as_str().ok_or("clean")?
    );
    Ok(())
}

#[test]
fn gpt2_patch_averages_pairs_as_transformer_lens_averages_a_batch() -> Result {
    let c = case()?;
    let model_dir = fixture("tiny").display().to_string();
    let pairs = fixture("tiny")
        .join("patching_pairs.jsonl")
        .display()
        .to_string();
    let base = [
        "patch",
        "--model-dir",
        &model_dir,
        "--pairs",
        &pairs,
        "--target",
        " s",
        "--against",
        " the",
        "--format",
        "json",
    ];
    let (clean, corrupted) = (
        c.g["dataset.clean"].to_vec1::<f32>()?[0] as f64,
        c.g["dataset.corrupted"].to_vec1::<f32>()?[0] as f64,
    );
    for (what, by, key) in [
        ("head_out", "head", "attn_head_out_all_pos"),
        ("resid_pre", "pos", "resid_pre"),
        ("head_pattern", "head_pos", "attn_head_pattern_by_pos"),
    ] {
        let out = gpt2(&[&base[..], &["--what", what, "--by", by]].concat())?;
        assert!(out.status.success(), "{}", common::stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let (shape, patched) = json_result(&v, "patched")?;
        check(&c, &format!("dataset.{key}"), &shape, &patched)?;
        check(
            &c,
            "dataset.clean",
            &[1],
            &[v["clean"].as_f64().ok_or("clean")?],
        )?;
        check(
            &c,
            "dataset.corrupted",
            &[1],
            &[v["corrupted"].as_f64().ok_or("c")?],
        )?;
        assert_eq!(v["pairs"].as_array().map(Vec::len), Some(3));
        // Normalised by the mean baselines, as the IOI demos' metric: not a mean of each
        // pair's normalised values.
        let (_, normalized) = json_result(&v, "normalized")?;
        for (n, p) in normalized.iter().zip(&patched) {
            let want = (p - corrupted) / (clean - corrupted);
            assert!((n - want).abs() < 1e-4, "{n} {want}");
        }
    }
    // Text: the mean over the pairs, said so.
    let out = gpt2(&[&base[..9], &["--what", "head_out"]].concat())?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("mean over 3 pairs") && text.contains("mean clean"),
        "{text}"
    );
    Ok(())
}

#[test]
fn pairs_of_other_lengths_average_by_head_and_not_by_position() -> Result {
    let c = case()?;
    let m = model()?;
    let long = (vec![c.clean[0]], vec![c.corrupted[0]]);
    // A second pair two tokens longer: the first pair with two tokens in front.
    let pairs = vec![
        Pair {
            clean: c.clean.clone(),
            corrupted: c.corrupted.clone(),
            metric: Metric::LogitDiff {
                target: c.target,
                against: c.against,
            },
            label: "first".into(),
        },
        Pair {
            clean: [&long.0[..], &long.0[..], &c.clean[..]].concat(),
            corrupted: [&long.1[..], &long.1[..], &c.corrupted[..]].concat(),
            metric: Metric::LogitDiff {
                target: c.against,
                against: c.target,
            },
            label: "second".into(),
        },
    ];
    let mean = activation_patch_mean(&m, &pairs, What::One(Act::HeadOut), By::Head, None)?;
    let one = |p: &Pair| {
        activation_patch(
            &m,
            &p.clean,
            &p.corrupted,
            What::One(Act::HeadOut),
            By::Head,
            p.metric,
            None,
        )
    };
    let (a, b) = (one(&pairs[0])?, one(&pairs[1])?);
    assert_eq!(mean.shape, a.shape);
    for i in 0..a.patched.len() {
        assert!((mean.patched[i] - (a.patched[i] + b.patched[i]) / 2.0).abs() < 1e-9);
    }
    assert!((mean.clean - (a.clean + b.clean) / 2.0).abs() < 1e-9);
    assert_eq!(
        mean.pairs.iter().map(|p| p.position).collect::<Vec<_>>(),
        [12, 14]
    );
    // By position, pairs of other lengths have no common axis.
    let e = activation_patch_mean(&m, &pairs, What::One(Act::ResidPre), By::Pos, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("second is 15 tokens and first is 13"), "{e}");
    let e = activation_patch_mean(&m, &pairs[..0], What::One(Act::HeadOut), By::Head, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("no pair"), "{e}");
    let e = activation_patch_mean(&m, &pairs, What::One(Act::HeadOut), By::Head, Some(13))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("13 is out of range for first"), "{e}");
    Ok(())
}

/// Four pairs of the fixture's length: its pair with another first token, measured each by its
/// own order of the two tokens.
fn pairs_of_one_length(c: &Case, vocab: u32) -> Vec<Pair> {
    (0..4u32)
        .map(|k| {
            let (mut clean, mut corrupted) = (c.clean.clone(), c.corrupted.clone());
            clean[0] = (clean[0] + 7 * k) % vocab;
            corrupted[0] = clean[0];
            let (target, against) = match k % 2 {
                0 => (c.target, c.against),
                _ => (c.against, c.target),
            };
            Pair {
                clean,
                corrupted,
                metric: Metric::LogitDiff { target, against },
                label: format!("pair {k}"),
            }
        })
        .collect()
}

#[test]
fn pairs_of_one_length_patched_as_one_batch_equal_each_pair_alone() -> Result {
    let c = case()?;
    let m = model()?;
    let pairs = pairs_of_one_length(&c, m.config().vocab_size as u32);
    for (what, by, position) in [
        (What::One(Act::HeadOut), By::Head, None),
        (What::One(Act::ResidPre), By::Pos, Some(5)),
        (What::Every, By::HeadPos, None),
    ] {
        let mean = activation_patch_mean(&m, &pairs, what, by, position)?;
        let ones = pairs
            .iter()
            .map(|p| activation_patch(&m, &p.clean, &p.corrupted, what, by, p.metric, position))
            .collect::<gpt2::Result<Vec<_>>>()?;
        assert_eq!(mean.shape, ones[0].shape);
        for (i, v) in mean.patched.iter().enumerate() {
            let want = ones.iter().map(|o| o.patched[i]).sum::<f64>() / 4.0;
            assert!((v - want).abs() < 1e-5, "{what} by {by} [{i}]: {v} {want}");
        }
        for (got, one) in mean.pairs.iter().zip(&ones) {
            assert!((got.clean - one.clean).abs() < 1e-5, "{what}");
            assert!((got.corrupted - one.corrupted).abs() < 1e-5, "{what}");
            assert_eq!(got.position, one.position);
        }
    }
    Ok(())
}

#[test]
fn gpt2_patch_bad_pairs_are_one_error_line_naming_the_line() -> Result {
    let dir = common::scratch("patching", "bad_pairs");
    let model_dir = fixture("tiny").display().to_string();
    let good = r#"{"clean": "The cat sat", "corrupted": "The dog sat", "target": " s", "against": " the"}"#;
    for (lines, extra, needles) in [
        (
            vec![good, "{\"clean\": \"x\""],
            vec![],
            vec!["--pairs", "line 2", "EOF"],
        ),
        (
            vec![good, r#"{"clean": "a", "corrupted": "b", "tagret": " s"}"#],
            vec![],
            vec!["line 2", "unknown field `tagret`"],
        ),
        (
            vec![r#"{"clean": "The cat", "corrupted": "The dog"}"#],
            vec![],
            vec!["line 1", "no \"target\""],
        ),
        (
            vec![
                good,
                "",
                r#"{"clean": "The cat sat", "corrupted": "The dog sat", "target": " s"}"#,
            ],
            vec![],
            vec!["line 3", "no \"against\""],
        ),
        (
            vec![
                good,
                r#"{"clean": "The cat sat", "corrupted": "The bird sat", "target": " s", "against": " the"}"#,
            ],
            vec![],
            vec!["line 2", "same length"],
        ),
        (
            vec![
                good,
                r#"{"clean": "The cat sat", "corrupted": "The dog sat", "target": " Mary", "against": " the"}"#,
            ],
            vec![],
            vec!["--pairs", "line 2: \"target\" \" Mary\"", "not one"],
        ),
        (
            vec![
                good,
                r#"{"clean": "The cat", "corrupted": "The dog", "target": " s", "against": " the"}"#,
            ],
            vec!["--by", "pos", "--what", "resid_pre"],
            vec!["--by", "line 2 is 3 tokens"],
        ),
        (
            vec![good],
            vec!["--position", "5"],
            vec!["--position", "line 1"],
        ),
        (vec![], vec![], vec!["--pairs", "no pair"]),
        (vec![good], vec!["--clean", "x"], vec!["--clean"]),
    ] {
        let path = dir.join("pairs.jsonl");
        std::fs::write(&path, lines.join("\n"))?;
        let path = path.display().to_string();
        let mut args = vec!["patch", "--model-dir", &model_dir, "--pairs", &path];
        if !extra.contains(&"--what") {
            args.extend(["--what", "head_out"]);
        }
        args.extend(extra.iter().copied());
        let out = gpt2(&args)?;
        assert_error(&out, 2, &needles);
    }
    Ok(())
}

/// Keeps the residual stream after block `.0`.
struct Post(usize, Option<Tensor>);

impl Hook for Post {
    fn wants(&self, p: Point) -> bool {
        p == Point::ResidPost(self.0)
    }

    fn at(&mut self, _: Point, t: &mut Tensor) -> gpt2::Result<()> {
        self.1 = Some(t.clone());
        Ok(())
    }
}

#[test]
fn one_position_of_a_block_equals_the_whole_block_there() -> Result {
    let c = case()?;
    let m = model()?;
    let ids = Tensor::new(c.clean.as_slice(), m.device())?.unsqueeze(0)?;
    let cache = run_with_cache(&m, &ids, &["blocks.1.hook_resid_pre"])?;
    // Two rows, the second another stream: rows stay apart.
    let x = cache.need("blocks.1.hook_resid_pre")?;
    let x = Tensor::cat(&[x, &(x * 0.5)?], 0)?;
    let mut post = Post(1, None);
    m.run_from(
        1,
        x.clone(),
        None,
        Some(&mut post),
        gpt2::Output::StopAfter(1),
    )?;
    let post = post.1.ok_or("no resid_post")?;
    for p in 0..c.clean.len() {
        let at = m.block_at(1, &x, p)?;
        assert_eq!(at.dims(), [2, 1, m.config().n_embd]);
        let d = max_abs_diff(&at, &post.narrow(1, p, 1)?)?;
        assert!(d < 1e-5, "position {p}: {d}");
    }
    let e = m
        .block_at(1, &x, c.clean.len())
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some_and(|e| e.contains("position")), "no error");
    Ok(())
}
