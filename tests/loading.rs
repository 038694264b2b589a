//! Checkpoint loading failures: each is one clear error naming the tensor and the file, never a
//! panic. The binary prints these as one line (see tests/cli.rs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gpt2::{
    random_checkpoint, Checkpoint, Config, DType, Device, Gpt2, LoadOptions, ModelSource, Tensor,
};

mod common;
use common::Result;

fn config() -> Config {
    Config {
        vocab_size: 50,
        n_positions: 16,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        bos_token_id: 0,
        eos_token_id: 0,
        ..Config::default()
    }
}

/// A fresh model folder under cargo's per-test scratch directory.
fn model_dir(name: &str, config: &Config, tensors: &HashMap<String, Tensor>) -> Result<PathBuf> {
    let dir = common::scratch("loading", name);
    std::fs::write(dir.join("config.json"), serde_json::to_string(config)?)?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(dir)
}

fn load_err(dir: &Path) -> String {
    match ModelSource::dir(dir).load_model(&LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_one_line_with(err: &str, parts: &[&str]) {
    eprintln!("error: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    for p in parts {
        assert!(err.contains(p), "`{p}` missing from: {err}");
    }
}

#[test]
fn a_valid_folder_loads() -> Result {
    let dir = model_dir("valid", &config(), &random_checkpoint(&config(), 1)?)?;
    ModelSource::dir(dir).load_model(&LoadOptions::default())?;
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> Result {
    let mut t = random_checkpoint(&config(), 1)?;
    t.remove("h.1.mlp.c_fc.bias");
    let err = load_err(&model_dir("missing", &config(), &t)?);
    assert_one_line_with(
        &err,
        &["missing tensor `h.1.mlp.c_fc.bias`", "model.safetensors"],
    );
    Ok(())
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() -> Result {
    let mut t = random_checkpoint(&config(), 1)?;
    t.insert(
        "h.0.attn.c_attn.weight".into(),
        Tensor::zeros((48, 16), DType::F32, &Device::Cpu)?,
    );
    let err = load_err(&model_dir("shape", &config(), &t)?);
    assert_one_line_with(
        &err,
        &[
            "`h.0.attn.c_attn.weight`",
            "[48, 16]",
            "[16, 48]",
            "model.safetensors",
        ],
    );
    Ok(())
}

#[test]
fn truncated_file_is_an_error() -> Result {
    let dir = model_dir("truncated", &config(), &random_checkpoint(&config(), 1)?)?;
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file)?;
    for keep in [bytes.len() / 2, 10, 0] {
        std::fs::write(&file, &bytes[..keep])?;
        let err = load_err(&dir);
        assert_one_line_with(&err, &["model.safetensors", "not a valid safetensors file"]);
    }
    Ok(())
}

#[test]
fn config_that_contradicts_the_weights_is_an_error() -> Result {
    let weights = random_checkpoint(&config(), 1)?;
    // Wider than the weights: the first tensor checked says what the config implies.
    let wide = Config {
        n_embd: 32,
        ..config()
    };
    let err = load_err(&model_dir("wide", &wide, &weights)?);
    assert_one_line_with(
        &err,
        &["`wte.weight`", "[50, 16]", "config.json implies [50, 32]"],
    );
    // Fewer layers than the weights: refused rather than silently truncating the model.
    let shallow = Config {
        n_layer: 1,
        ..config()
    };
    let err = load_err(&model_dir("shallow", &shallow, &weights)?);
    assert_one_line_with(&err, &["belongs to layer 1", "n_layer = 1"]);
    // More layers than the weights.
    let deep = Config {
        n_layer: 3,
        ..config()
    };
    let err = load_err(&model_dir("deep", &deep, &weights)?);
    assert_one_line_with(&err, &["missing tensor `h.2."]);
    Ok(())
}

#[test]
fn folders_without_safetensors_or_config_are_errors() -> Result {
    let dir = model_dir("pickle", &config(), &HashMap::new())?;
    std::fs::remove_file(dir.join("model.safetensors"))?;
    std::fs::write(dir.join("pytorch_model.bin"), b"not loaded")?;
    assert_one_line_with(&load_err(&dir), &["pytorch_model.bin", "never loads"]);
    std::fs::remove_file(dir.join("pytorch_model.bin"))?;
    assert_one_line_with(&load_err(&dir), &["has no model.safetensors"]);
    std::fs::remove_file(dir.join("config.json"))?;
    assert_one_line_with(&load_err(&dir), &["config.json"]);
    Ok(())
}

#[test]
fn sharded_checkpoints_load_from_their_index() -> Result {
    let t = random_checkpoint(&config(), 1)?;
    let dir = model_dir("sharded", &config(), &HashMap::new())?;
    std::fs::remove_file(dir.join("model.safetensors"))?;
    let (a, b): (HashMap<_, _>, HashMap<_, _>) = t
        .clone()
        .into_iter()
        .partition(|(k, _)| k.starts_with("h.0."));
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors"))?;
    let weight_map: HashMap<String, String> = t
        .keys()
        .map(|k| {
            let shard = if k.starts_with("h.0.") { 1 } else { 2 };
            (k.clone(), format!("model-0000{shard}-of-00002.safetensors"))
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string(&serde_json::json!({ "weight_map": weight_map }))?,
    )?;
    let sharded = ModelSource::dir(&dir).load_model(&LoadOptions::default())?;
    let whole = Gpt2::new(config(), Checkpoint::Tensors(t), &LoadOptions::default())?;
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
    let d = (sharded.forward(&ids, None)? - whole.forward(&ids, None)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}
