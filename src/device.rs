//! Device and dtype selection, in one place: the only module that knows which backends were
//! compiled in (the `cuda` and `metal` cargo features pass through to candle's).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A device as a user names it: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA GPU 0, else Metal, else the CPU, among the backends compiled in.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(Error::Input(format!(
                    "unknown device `{s}`: expected auto, cpu, cuda, cuda:N or metal"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. Asking for a backend this binary was built without is an error that
    /// says how to build it.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    cuda(0)
                } else if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    metal()
                } else {
                    Ok(Device::Cpu)
                }
            }
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => cuda(n),
            Self::Metal => metal(),
        }
    }
}

/// Picks a device from `auto`, `cpu`, `cuda`, `cuda:N` or `metal` (see [`DeviceChoice`]).
pub fn select_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceChoice>()?.open()
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
