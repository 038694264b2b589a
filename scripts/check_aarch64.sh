#!/usr/bin/env bash
# Are the ARM paths correct (the NEON int8 kernels, `sdot` and base, and the portable f32/f16
# kernels Apple silicon and Graviton run)? Builds
# for aarch64-unknown-linux-gnu and runs the library's unit tests and the tests that call the
# library directly (parity with the transformers goldens, loading) under qemu's user-mode
# emulator. The tests that run the `gpt2` binary are left out: without binfmt_misc the host
# cannot exec an aarch64 binary.
#
#   scripts/check_aarch64.sh     # needs root for apt (Debian: gcc-aarch64-linux-gnu, qemu-user)
#
# About 8-10 minutes on 2 cores the first time (target/aarch64-check; 20 under load), most of it
# compiling the dependencies for aarch64; `.ci/run` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root=""
[ "$(id -u)" = 0 ] || as_root=sudo
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq gcc-aarch64-linux-gnu \
    libc6-dev-arm64-cross qemu-user >/dev/null
fi
rustup target add aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --target aarch64-unknown-linux-gnu --target-dir target/aarch64-check \
  --lib --test parity --test loading
echo "check_aarch64.sh: library, parity and loading tests pass on aarch64 (qemu-user)"
