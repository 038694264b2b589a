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
use common::{assert_error, fixture, goldens, gpt2, ids, Result};

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
            Receivers {
                to: PathTo::Logits,
                heads: vec![head(1, 1)],
            },
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
    let _ = (assert_error, gpt2);
    Ok(())
}
