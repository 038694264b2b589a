//! `gpt2 perplexity` against transformers' sliding-window recipe, run by
//! `scripts/make_perplexity_goldens.py` on the fixtures (`perplexity.json`): the same tokens, and
//! the same perplexity to 1e-4 relative, at every stride, through the real binary.

use serde_json::Value;

mod common;
use common::{fixture, fixture_json, gpt2_command, gpt2_with_stdin, Result};

#[test]
fn perplexity_equals_transformers_at_every_stride() -> Result {
    for name in ["tiny", "tiny-b"] {
        let golden = fixture_json(name, "perplexity.json")?;
        let text = golden["text"].as_str().ok_or("text")?;
        let file = common::tmp(&format!("ppl-{name}.txt"));
        std::fs::write(&file, text)?;
        for r in golden["results"].as_array().ok_or("results")? {
            let stride = r["stride"].to_string();
            let out = gpt2_command(&["perplexity", "--model-dir"])
                .arg(fixture(name))
                .arg("--file")
                .arg(&file)
                .args(["--stride", &stride, "--json"])
                .output()?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got: Value = serde_json::from_slice(&out.stdout)?;
            assert_eq!(got["tokens"], golden["tokens"], "{name}");
            assert_eq!(got["windows"], r["windows"], "{name} stride {stride}");
            assert_eq!(
                got["weighted_tokens"], r["weighted_tokens"],
                "{name} stride {stride}"
            );
            let (a, b) = (
                got["perplexity"].as_f64().ok_or("ppl")?,
                r["perplexity"].as_f64().ok_or("ppl")?,
            );
            assert!(
                (a - b).abs() <= 1e-4 * b,
                "{name} stride {stride}: {a} vs {b}"
            );
        }
        // Standard input, the default stride.
        let dir = fixture(name);
        let out = gpt2_with_stdin(
            &[
                "perplexity",
                "--model-dir",
                dir.to_str().ok_or("path")?,
                "--file",
                "-",
                "--json",
            ],
            text,
        )?;
        let got: Value = serde_json::from_slice(&out.stdout)?;
        let default = &golden["results"][0];
        let (a, b) = (
            got["perplexity"].as_f64().ok_or("ppl")?,
            default["perplexity"].as_f64().ok_or("ppl")?,
        );
        assert!((a - b).abs() <= 1e-4 * b, "{name} stdin: {a} vs {b}");
    }
    Ok(())
}
