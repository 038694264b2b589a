#!/usr/bin/env bash
# Does `--features cuda` still compile? Type-checks the whole crate, tests included, against
# candle's CUDA backend, with the CUDA 13 compiler that PyPI ships (the cu12 wheels carry only
# ptxas; `nvidia-cuda-nvcc` 13.x has nvcc, `nvidia-nvvm` cicc, `nvidia-cuda-crt`,
# `-runtime` and `-cccl` the headers). No GPU and no driver are needed: candle-kernels' build
# script compiles every .cu file to PTX with nvcc, and `cargo check` stops before linking, which
# would need libcuda, cuBLAS, cuRAND and NVRTC (cudarc links them dynamically).
#
#   scripts/check_cuda.sh            # CUDA_WHEELS (default /work/bench/cuda13): where the
#                                    # wheels are unpacked; CUDA_COMPUTE_CAP (default 90)
#
# Running on a GPU is another matter: see the README (`cargo test --features cuda` and
# `gpt2 bench --device cuda` on a machine with the CUDA toolkit and a driver).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${CUDA_WHEELS:-/work/bench/cuda13}
cuda=$root/nvidia/cu13
if [ ! -x "$cuda/bin/nvcc" ] || [ ! -x "$cuda/nvvm/bin/cicc" ]; then
  mkdir -p "$root/wheels"
  python3 -m pip download --quiet --no-deps -d "$root/wheels" \
    "nvidia-cuda-nvcc>=13.0,<13.1" "nvidia-nvvm>=13.0,<13.1" "nvidia-cuda-crt>=13.0,<13.1" \
    "nvidia-cuda-runtime>=13.0,<13.1" "nvidia-cuda-cccl>=13.0,<13.1"
  for w in "$root"/wheels/*.whl; do python3 -m zipfile -e "$w" "$root"; done
  chmod -R +x "$cuda/bin" "$cuda/nvvm/bin"   # zipfile drops the executable bits
fi
"$cuda/bin/nvcc" --version | tail -1
# A separate target folder: the feature rebuilds candle, and the CPU build's cache stays as it is.
PATH=$cuda/bin:$PATH CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} \
  cargo check --features cuda --all-targets --target-dir target/cuda-check
echo "check_cuda.sh: --features cuda compiles (nvcc $("$cuda/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${CUDA_COMPUTE_CAP:-90})"
