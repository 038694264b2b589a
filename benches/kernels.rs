//! Micro-benchmarks of the CPU kernels (not tests: no thresholds, nothing asserted):
//! `cargo bench --bench kernels` (add a filter, e.g. `-- linear_decode`). The model-level
//! comparison with llama.cpp and transformers is `scripts/bench.sh`; what each change bought
//! is logged in docs/PERF.md. GB/s are of the bytes each iteration reads (weights or cache).

use divan::counter::BytesCount;
use divan::Bencher;
use gpt2::microbench::{self, Case, LAYOUTS, SHAPES};

fn main() {
    divan::main();
}

/// Times `case`, after one run that must succeed: a case failing every iteration would
/// otherwise report fast, meaningless GB/s.
fn measure(bencher: Bencher, case: gpt2::Result<Case>) {
    let mut case = case.unwrap_or_else(|e| panic!("setting up the case failed: {e}"));
    if let Err(e) = case.run() {
        panic!("the case failed: {e}");
    }
    bencher
        .counter(BytesCount::new(case.bytes))
        .bench_local(move || {
            if let Err(e) = case.run() {
                panic!("the case failed: {e}");
            }
        })
}

/// One decoded token through each GPT-2-small matrix, weights from memory.
#[divan::bench(args = LAYOUTS, consts = [0, 1, 2, 3, 4])]
fn linear_decode<const SHAPE: usize>(bencher: Bencher, layout: &str) {
    measure(bencher, microbench::linear_decode(layout, SHAPES[SHAPE]));
}

/// Widening (N, K) halves and blocks into gemm's (K, N) f32 layout, in cache.
#[divan::bench(args = ["f16", "q4_0"], consts = [0, 1, 2])]
fn widen<const SHAPE: usize>(bencher: Bencher, what: &str) {
    let (n, k) = [(3072, 768), (768, 3072), (2304, 768)][SHAPE];
    measure(bencher, microbench::widen(what, (n, k)));
}

/// Integer dot products of a (3072, 768) block matrix, in cache and from memory.
#[divan::bench(args = ["q8_0", "q4_0", "q6", "q4_k"], consts = [false, true])]
fn quant_dot<const COLD: bool>(bencher: Bencher, kind: &str) {
    measure(bencher, microbench::quant_dot(kind, COLD));
}

/// One layer's decode attention (12 heads of 64, 576 keys) over an f32 or f16 cache.
#[divan::bench(args = [false, true])]
fn decode_attention(bencher: Bencher, half: bool) {
    measure(bencher, microbench::decode_attention(half));
}
