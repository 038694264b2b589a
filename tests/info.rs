//! `gpt2 info`: sizes and costs of a layout, and the head layouts in configs/.

use serde_json::Value;

mod common;
use common::Result;

/// `gpt2 info args`, from the crate's folder (the layouts are given as `configs/...`).
fn info(args: &[&str]) -> Result<std::process::Output> {
    Ok(common::gpt2_command(&["info"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?)
}

fn info_json(args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = info(&all)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn parameter_counts_match_transformers() -> Result {
    // transformers' GPT2LMHeadModel(config).num_parameters(), tied head.
    for (layout, want) in [
        ("gpt2", 124_439_808u64),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("distilgpt2", 81_912_576),
    ] {
        let v = info_json(&["--config", &format!("configs/{layout}.json")])?;
        assert_eq!(v["params"]["total"].as_u64(), Some(want), "{layout}");
    }
    let text = String::from_utf8(info(&["--config", "configs/gpt2.json"])?.stdout)?;
    assert!(text.contains("124,439,808"), "{text}");
    Ok(())
}

#[test]
fn every_layout_in_configs_reads_and_says_what_it_is() -> Result {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let json: Value = serde_json::from_str(&text)?;
        assert!(
            json["_comment"].as_str().is_some_and(|c| c.len() > 40),
            "{}",
            path.display()
        );
        let v = info_json(&["--config", path.to_str().ok_or("path")?])?;
        assert!(v["params"]["total"].as_u64().is_some_and(|p| p > 0));
    }
    let v = info_json(&[
        "--config",
        "configs/llama-2-70b-heads.json",
        "--context",
        "4096",
    ])?;
    assert_eq!(
        (
            v["n_head"].as_u64(),
            v["n_kv_head"].as_u64(),
            v["head_size"].as_u64()
        ),
        (Some(64), Some(8), Some(128))
    );
    // 2 (K, V) x 80 layers x 8 heads x 128 x 2 bytes = 320 KiB per token in f16.
    assert_eq!(v["kv_cache_bytes_per_token"]["f16"].as_u64(), Some(327_680));
    let v = info_json(&["--config", "configs/llama-7b-heads.json"])?;
    assert_eq!(
        (
            v["n_embd"].as_u64(),
            v["n_head"].as_u64(),
            v["head_size"].as_u64()
        ),
        (Some(4096), Some(32), Some(128))
    );
    Ok(())
}

#[test]
fn a_model_folder_works_too_and_bad_layouts_are_one_line() -> Result {
    let v = info_json(&["--model-dir", "tests/fixtures/tiny-b"])?;
    assert_eq!(v["n_layer"].as_u64(), Some(3));
    let dir = common::scratch("info", "layouts");
    for (name, text, needle) in [
        (
            "typo.json",
            r#"{"n_kv_heads": 4}"#,
            "unknown field `n_kv_heads`",
        ),
        (
            "ratio.json",
            r#"{"n_head": 12, "n_kv_head": 5}"#,
            "n_kv_head",
        ),
        (
            "ctx.json",
            r#"{"n_positions": 1024, "n_ctx": 2048}"#,
            "n_ctx",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        let out = info(&["--config", path.to_str().ok_or("path")?])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    Ok(())
}
