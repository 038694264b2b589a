//! Path patching against the IOI paper's algorithm written with TransformerLens hooks
//! (`scripts/make_path_patching_goldens.py`, ARENA's `get_path_patch_head_to_*`, one sender at
//! a time) on the 3-layer `tiny-b` fixture, library and binary.

use std::collections::HashMap;

use gpt2::analysis::ablation::HeadId;
use gpt2::analysis::patching::{
    path_patch, path_patch_mean, Metric, Pair, PathTo, Receivers, Senders,
};
use gpt2::{LoadOptions, Loaded, ModelSource, Tensor};
use serde_json::Value;

mod common;
use common::{assert_error, fixture, goldens, gpt2, ids, read_npy, scratch, stderr, Result};

fn loaded() -> Result<Loaded> {
    Ok(ModelSource::dir(fixture("tiny-b")).load(&LoadOptions::default())?)
}

struct Case {
    clean: Vec<u32>,
    corrupted: Vec<u32>,
    metric: Metric,
    g: HashMap<String, Tensor>,
    v: Value,
}

fn case() -> Result<Case> {
    let (g, v) = goldens("tiny-b", "path_patching")?;
    let id = |k: &str| v[k].as_u64().map(|x| x as u32).ok_or(k.to_string());
    Ok(Case {
        clean: ids(&v["clean_ids"]),
        corrupted: ids(&v["corrupted_ids"]),
        metric: Metric::LogitDiff {
            target: id("target_id")?,
            against: id("against_id")?,
        },
        g,
        v,
    })
}

/// `got` (shape, values) against the golden `key`, within 1e-4.
fn check(c: &Case, key: &str, shape: &[usize], got: &[f64]) -> Result {
    let want = c.g.get(key).ok_or(format!("no golden {key}"))?;
    assert_eq!(want.dims(), shape, "{key}: shape");
    let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
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

/// The golden's receivers for `to`.
fn receivers(c: &Case, to: PathTo) -> Result<Receivers> {
    if to == PathTo::Logits {
        return Ok(Receivers::logits());
    }
    let heads: Vec<HeadId> = c.v["receivers"][to.name()]
        .as_array()
        .ok_or("receivers")?
        .iter()
        .map(|h| h.as_str().unwrap_or("").parse())
        .collect::<std::result::Result<_, _>>()?;
    Ok(Receivers::heads(to, &heads))
}

#[test]
fn every_sender_to_every_receiver_equals_transformer_lens_hooks() -> Result {
    let c = case()?;
    let m = loaded()?.model;
    for to in PathTo::ALL {
        let r = receivers(&c, to)?;
        for senders in Senders::ALL {
            let p = path_patch(&m, &c.clean, &c.corrupted, senders, &r, c.metric, None)?;
            check(&c, "clean", &[1], &[p.clean])?;
            check(&c, "corrupted", &[1], &[p.corrupted])?;
            check(&c, &format!("{to}.{senders}"), &p.shape, &p.patched)?;
            // Normalised as the IOI paper plots it: 0 = no effect, -1 = the whole corruption.
            for (n, v) in p.normalized.iter().zip(&p.patched) {
                let want = (v - p.clean) / (p.clean - p.corrupted);
                assert!((n - want).abs() < 1e-9);
            }
        }
    }
    Ok(())
}

#[test]
fn senders_after_the_receivers_leave_the_clean_run() -> Result {
    let c = case()?;
    let m = loaded()?.model;
    // Receivers in layer 1: heads of layers 1 and 2 have no path to them.
    let r = Receivers::heads(PathTo::Q, &[HeadId { layer: 1, head: 2 }]);
    let p = path_patch(
        &m,
        &c.clean,
        &c.corrupted,
        Senders::Heads,
        &r,
        c.metric,
        None,
    )?;
    let n_head = m.config().n_head;
    assert!(p.patched[n_head..].iter().all(|&v| v == p.clean));
    // Layer 0's heads do reach them: some value moves.
    assert!(p.patched[..n_head]
        .iter()
        .any(|&v| (v - p.clean).abs() > 1e-3));
    Ok(())
}

#[test]
fn probability_metric_equals_transformer_lens_hooks() -> Result {
    let c = case()?;
    let m = loaded()?.model;
    let Metric::LogitDiff { target, .. } = c.metric else {
        return Err("metric".into());
    };
    let p = path_patch(
        &m,
        &c.clean,
        &c.corrupted,
        Senders::Heads,
        &Receivers::logits(),
        Metric::Prob { target },
        None,
    )?;
    check(&c, "prob.clean", &[1], &[p.clean])?;
    check(&c, "prob.logits.heads", &p.shape, &p.patched)
}

#[test]
fn another_position_equals_transformer_lens_hooks() -> Result {
    let c = case()?;
    let m = loaded()?.model;
    for (senders, to) in [
        (Senders::Heads, PathTo::Logits),
        (Senders::Embed, PathTo::Logits),
        (Senders::Heads, PathTo::Q),
    ] {
        let r = receivers(&c, to)?;
        let p = path_patch(&m, &c.clean, &c.corrupted, senders, &r, c.metric, Some(5))?;
        assert_eq!(p.position, 5);
        check(&c, "pos5.clean", &[1], &[p.clean])?;
        check(&c, &format!("pos5.{to}.{senders}"), &p.shape, &p.patched)?;
    }
    Ok(())
}

#[test]
fn the_direct_path_alone_freezes_the_mlps_as_transformer_lens_hooks() -> Result {
    let c = case()?;
    let m = loaded()?.model;
    for to in [PathTo::Logits, PathTo::Q] {
        let r = receivers(&c, to)?.freezing_mlps(true);
        for senders in [Senders::Heads, Senders::Mlps] {
            let p = path_patch(&m, &c.clean, &c.corrupted, senders, &r, c.metric, None)?;
            check(&c, &format!("direct.{to}.{senders}"), &p.shape, &p.patched)?;
        }
    }
    Ok(())
}

#[test]
fn the_direct_path_to_one_head_equals_transformer_lens_4_direct_path_patching() -> Result {
    // TransformerLens 4.3's get_act_patch_direct_path_all_sources (its own function, on a
    // TransformerBridge): [src layer, src head, dst layer, dst head], its run our clean prompt.
    let c = case()?;
    let tl4 = common::fixture_tensors("tiny-b", "direct_path.safetensors")?;
    let m = loaded()?.model;
    let (n_layer, n_head) = (m.config().n_layer, m.config().n_head);
    let mut compared = 0;
    for to in [PathTo::Q, PathTo::K, PathTo::V] {
        let want: Vec<f32> = tl4[to.name()].flatten_all()?.to_vec1()?;
        for dl in 1..n_layer {
            for dh in 0..n_head {
                let r = Receivers::heads(
                    to,
                    &[HeadId {
                        layer: dl,
                        head: dh,
                    }],
                )
                .freezing_mlps(true);
                let p = path_patch(
                    &m,
                    &c.clean,
                    &c.corrupted,
                    Senders::Heads,
                    &r,
                    c.metric,
                    None,
                )?;
                for sl in 0..dl {
                    for sh in 0..n_head {
                        let w = want[((sl * n_head + sh) * n_layer + dl) * n_head + dh] as f64;
                        let got = p.patched[sl * n_head + sh];
                        assert!(
                            (got - w).abs() < 1e-4,
                            "{to} {sl}.{sh} -> {dl}.{dh}: {got} {w}"
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    // 3 components x (4 + 8 sources) x 4 destinations per layer.
    assert_eq!(compared, 3 * (4 * 4 + 8 * 4));
    Ok(())
}

/// The golden's dataset, tokenised.
fn dataset(c: &Case, l: &Loaded) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for (i, p) in c.v["dataset"]
        .as_array()
        .ok_or("dataset")?
        .iter()
        .enumerate()
    {
        let text = |k: &str| p[k].as_str().ok_or(k.to_string());
        let one = |k: &str| -> Result<u32> {
            match l.tokenizer.encode(text(k)?)?.as_slice() {
                [id] => Ok(*id),
                ids => Err(format!("{k}: {ids:?}").into()),
            }
        };
        pairs.push(Pair {
            clean: l.tokenizer.encode(text("clean")?)?,
            corrupted: l.tokenizer.encode(text("corrupted")?)?,
            metric: Metric::LogitDiff {
                target: one("target")?,
                against: one("against")?,
            },
            label: format!("pair {i}"),
        });
    }
    Ok(pairs)
}

#[test]
fn a_dataset_averages_then_normalises_as_transformer_lens_hooks() -> Result {
    let c = case()?;
    let l = loaded()?;
    let pairs = dataset(&c, &l)?;
    assert_ne!(
        pairs[0].clean.len(),
        pairs[2].clean.len(),
        "pairs of two lengths"
    );
    for to in [PathTo::Logits, PathTo::Q] {
        let r = receivers(&c, to)?;
        let p = path_patch_mean(&l.model, &pairs, Senders::Heads, &r, None)?;
        check(&c, "dataset.clean", &[1], &[p.clean])?;
        check(&c, "dataset.corrupted", &[1], &[p.corrupted])?;
        check(&c, &format!("dataset.{to}.heads"), &p.shape, &p.patched)?;
        assert_eq!(p.pairs.len(), 3);
        for (n, v) in p.normalized.iter().zip(&p.patched) {
            assert!((n - (v - p.clean) / (p.clean - p.corrupted)).abs() < 1e-9);
        }
    }
    Ok(())
}

#[test]
fn pairs_of_one_length_patched_as_one_batch_equal_each_pair_alone() -> Result {
    let c = case()?;
    let l = loaded()?;
    let vocab = l.model.config().vocab_size as u32;
    // Four pairs of the golden's length: its pair with another first token, each measured by
    // its own order of the two tokens.
    let Metric::LogitDiff { target, against } = c.metric else {
        return Err("a logit difference".into());
    };
    let pairs: Vec<Pair> = (0..4u32)
        .map(|k| {
            let (mut clean, mut corrupted) = (c.clean.clone(), c.corrupted.clone());
            clean[0] = (clean[0] + 7 * k) % vocab;
            corrupted[0] = clean[0];
            let metric = match k % 2 {
                0 => Metric::LogitDiff { target, against },
                _ => Metric::LogitDiff {
                    target: against,
                    against: target,
                },
            };
            Pair {
                clean,
                corrupted,
                metric,
                label: format!("pair {k}"),
            }
        })
        .collect();
    for to in PathTo::ALL {
        for senders in Senders::ALL {
            let r = receivers(&c, to)?;
            let mean = path_patch_mean(&l.model, &pairs, senders, &r, None)?;
            let ones = pairs
                .iter()
                .map(|p| {
                    path_patch(
                        &l.model,
                        &p.clean,
                        &p.corrupted,
                        senders,
                        &r,
                        p.metric,
                        None,
                    )
                })
                .collect::<gpt2::Result<Vec<_>>>()?;
            for (i, v) in mean.patched.iter().enumerate() {
                let want = ones.iter().map(|o| o.patched[i]).sum::<f64>() / 4.0;
                assert!(
                    (v - want).abs() < 1e-5,
                    "{senders} to {to} [{i}]: {v} {want}"
                );
            }
            for (got, one) in mean.pairs.iter().zip(&ones) {
                assert!((got.clean - one.clean).abs() < 1e-5);
                assert!((got.corrupted - one.corrupted).abs() < 1e-5);
            }
        }
    }
    Ok(())
}

#[test]
fn bad_receivers_are_errors_naming_the_parameter() -> Result {
    let c = case()?;
    let m = loaded()?.model;
    let run = |r: Receivers| {
        path_patch(
            &m,
            &c.clean,
            &c.corrupted,
            Senders::Heads,
            &r,
            c.metric,
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let head = |layer, head| HeadId { layer, head };
    for (r, want) in [
        (Receivers::heads(PathTo::Q, &[]), "receivers"),
        (Receivers::heads(PathTo::K, &[head(3, 0)]), "3 layers"),
        (Receivers::heads(PathTo::V, &[head(1, 4)]), "4 v heads"),
        (
            Receivers::heads(PathTo::Logits, &[head(1, 1)]),
            "the logits need none",
        ),
    ] {
        let e = run(r);
        assert!(e.contains(want), "{e}");
    }
    let e = path_patch(
        &m,
        &c.clean,
        &c.corrupted[1..],
        Senders::Heads,
        &Receivers::logits(),
        c.metric,
        None,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("same length"), "{e}");
    Ok(())
}

/// `gpt2 patch` on the golden's pair with `extra` options.
fn patch(c: &Case, extra: &[&str]) -> Result<std::process::Output> {
    let dir = fixture("tiny-b").display().to_string();
    let text = |k: &str| c.v[k].as_str().unwrap_or_default().to_string();
    let (clean, corrupted, target, against) = (
        text("clean"),
        text("corrupted"),
        text("target"),
        text("against"),
    );
    let base = [
        "patch",
        "--model-dir",
        &dir,
        "--clean",
        &clean,
        "--corrupted",
        &corrupted,
        "--target",
        &target,
        "--against",
        &against,
    ];
    gpt2(&[&base[..], extra].concat())
}

/// The `key` array of a JSON result with its shape.
fn json_values(v: &Value, key: &str) -> Result<Vec<f64>> {
    Ok(v[key]
        .as_array()
        .ok_or(key.to_string())?
        .iter()
        .filter_map(Value::as_f64)
        .collect())
}

#[test]
fn gpt2_patch_path_to_prints_transformer_lens_numbers() -> Result {
    let c = case()?;
    for (to, senders, receivers) in [
        ("logits", "heads", None),
        ("q", "heads", Some("2.1,1.3")),
        ("v", "mlps", Some("2.2,2.3,1.0")),
        ("k", "embed", Some("2.0")),
    ] {
        let mut extra = vec!["--path-to", to, "--senders", senders, "--format", "json"];
        extra.extend(receivers.map(|r| ["--receivers", r]).into_iter().flatten());
        let out = patch(&c, &extra)?;
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or("shape")?
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as usize))
            .collect();
        check(
            &c,
            &format!("{to}.{senders}"),
            &shape,
            &json_values(&v, "patched")?,
        )?;
        check(&c, "clean", &[1], &[v["clean"].as_f64().ok_or("clean")?])?;
        assert_eq!(v["receivers"]["to"], to);
    }
    // The direct path alone.
    let out = patch(
        &c,
        &[
            "--path-to",
            "q",
            "--receivers",
            "2.1,1.3",
            "--freeze-mlps",
            "--format",
            "json",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    check(&c, "direct.q.heads", &[3, 4], &json_values(&v, "patched")?)?;
    assert_eq!(v["receivers"]["freeze_mlps"], true);
    // Text: the receivers and the normalisation said; senders after them at 0.
    let out = patch(&c, &["--path-to", "q", "--receivers", "1.3"])?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("path patching from heads to the queries of 1.3")
            && text.contains("normalised = (patched - clean) / (clean - corrupted)"),
        "{text}"
    );
    // npy: the [layer, head] map, its JSON beside it.
    let dir = scratch("path_patching", "npy");
    let npy = dir.join("q.npy");
    let npy_arg = npy.display().to_string();
    let out = patch(
        &c,
        &[
            "--path-to",
            "q",
            "--receivers",
            "2.1,1.3",
            "--format",
            "npy",
            "--out",
            &npy_arg,
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, data) = read_npy(&npy)?;
    let data: Vec<f64> = data.into_iter().map(f64::from).collect();
    check(&c, "q.heads", &shape, &data)?;
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("q.npy.json"))?)?;
    assert_eq!(meta["path_to"], "q");
    assert_eq!(meta["receivers"], serde_json::json!(["1.3", "2.1"]));
    Ok(())
}

#[test]
fn gpt2_patch_path_to_averages_pairs() -> Result {
    let c = case()?;
    let dir = scratch("path_patching", "pairs");
    let pairs = dir.join("pairs.jsonl");
    let lines: Vec<String> = c.v["dataset"]
        .as_array()
        .ok_or("dataset")?
        .iter()
        .map(Value::to_string)
        .collect();
    std::fs::write(&pairs, lines.join("\n") + "\n")?;
    let model_dir = fixture("tiny-b").display().to_string();
    let pairs = pairs.display().to_string();
    let out = gpt2(&[
        "patch",
        "--model-dir",
        &model_dir,
        "--pairs",
        &pairs,
        "--path-to",
        "logits",
        "--format",
        "json",
    ])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    check(
        &c,
        "dataset.logits.heads",
        &[3, 4],
        &json_values(&v, "patched")?,
    )?;
    check(
        &c,
        "dataset.clean",
        &[1],
        &[v["clean"].as_f64().ok_or("clean")?],
    )?;
    assert_eq!(v["pairs"].as_array().map(Vec::len), Some(3));
    Ok(())
}

#[test]
fn gpt2_patch_path_bad_input_is_one_error_line_naming_the_option() -> Result {
    let c = case()?;
    for (extra, needles) in [
        (&["--path-to", "q"][..], &["--receivers", "needed"][..]),
        (
            &["--path-to", "logits", "--receivers", "1.1"],
            &["--receivers", "none"],
        ),
        (
            &["--path-to", "k", "--receivers", "3.0"],
            &["--receivers 3.0", "3 layers"],
        ),
        (
            &["--path-to", "v", "--receivers", "1.x"],
            &["--receivers", "LAYER.HEAD"],
        ),
        (
            &["--what", "head_out", "--receivers", "1.1"],
            &["--receivers", "--path-to"],
        ),
        (
            &["--what", "head_out", "--senders", "mlps"],
            &["--senders", "--path-to"],
        ),
        (
            &["--what", "head_out", "--freeze-mlps"],
            &["--freeze-mlps", "--path-to"],
        ),
        (
            &["--what", "head_out", "--path-to", "q"],
            &["--what", "--path-to"],
        ),
        (&["--path-to", "z"], &["--path-to", "logits, q, k, v"]),
        (
            &["--path-to", "logits", "--position", "13"],
            &["--position", "out of range"],
        ),
    ] {
        let out = patch(&c, extra)?;
        assert_error(&out, 2, needles);
    }
    Ok(())
}
