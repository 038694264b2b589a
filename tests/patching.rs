//! Activation patching against TransformerLens (`scripts/make_patching_goldens.py`: its
//! `run_with_cache` and every `get_act_patch_*` function on the `tiny` fixture), library and
//! binary.

use std::collections::HashMap;

use gpt2::analysis::patching::{activation_patch, run_with_cache, Act, By, Metric, What};
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
