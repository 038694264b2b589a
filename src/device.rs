//! Device and dtype selection, in one place: the only module that knows which backends were
//! compiled in (the `cuda` and `metal` cargo features pass through to candle's).

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Picks a device from `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
///
/// `auto` takes CUDA GPU 0, else Metal, else the CPU, among the backends compiled in. Asking for a
/// backend this binary was built without is an error that says how to build it.
pub fn select_device(spec: &str) -> Result<Device> {
    match spec.trim() {
        "auto" => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                cuda(0)
            } else if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                metal()
            } else {
                Ok(Device::Cpu)
            }
        }
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        "metal" => metal(),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(Error::Input(format!(
                "unknown device `{s}`: expected auto, cpu, cuda, cuda:N or metal"
            ))),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Device(
            "this gpt2 was built without CUDA support; rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit)".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("cannot open cuda:{ordinal}: {e}")))
}

fn metal() -> Result<Device> {
    if !cfg!(feature = "metal") {
        return Err(Error::Device(
            "this gpt2 was built without Metal support; rebuild with `cargo build --release --features metal` (macOS only)".into(),
        ));
    }
    Device::new_metal(0).map_err(|e| Error::Device(format!("cannot open the Metal device: {e}")))
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        s => Err(Error::Input(format!(
            "unknown dtype `{s}`: expected f32, f16 or bf16"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_work_everywhere() -> Result<()> {
        assert!(select_device("cpu")?.is_cpu());
        select_device("auto")?;
        Ok(())
    }

    #[test]
    fn missing_backend_says_how_to_build_it() {
        if !cfg!(feature = "cuda") {
            let err = select_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        if !cfg!(feature = "metal") {
            let err = select_device("metal").unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
        assert!(select_device("tpu").is_err());
        assert!(select_device("cuda:x").is_err());
    }

    #[test]
    fn dtypes() -> Result<()> {
        assert_eq!(parse_dtype("bf16")?, DType::BF16);
        assert!(parse_dtype("f64").is_err());
        Ok(())
    }
}
