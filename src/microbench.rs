//! Kernel cases for `benches/kernels.rs` (`cargo bench --bench kernels`): each builds its
//! inputs once and returns what one timed iteration runs, with the bytes it reads (for GB/s).
//! Not a stable API; hidden from the docs. Speed is measured here and by `scripts/bench.sh`,
//! never in a test; what each change bought is logged in `docs/PERF.md`.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::attention::kernels::{causal_attention, Dims, Heads};
use crate::error::Result;
use crate::linear::kernels::Elems;
use crate::linear::quant::{Q8Acts, QuantKind, QuantMatrix};
use crate::linear::storage::{Buf, HostElems, Matrix};
use crate::linear::Linear;
use crate::rng::SplitMix64;

/// One benchmark: `run` once per iteration.
pub struct Case {
    /// Bytes one iteration reads (weights or cache), for a throughput.
    pub bytes: usize,
    run: Box<dyn FnMut() -> Result<()>>,
}

impl Case {
    pub fn run(&mut self) -> Result<()> {
        (self.run)()
    }
}

/// GPT-2 small's matrices as (in, out): `c_attn`, attention `c_proj`, `c_fc`, MLP `c_proj`, the
/// LM head.
pub const SHAPES: [(usize, usize); 5] = [
    (768, 2304),
    (768, 768),
    (768, 3072),
    (3072, 768),
    (768, 50257),
];

/// Weight layouts of the decode kernels.
pub const LAYOUTS: [&str; 4] = ["in-out", "out-in", "q8_0", "q4_0"];

fn unit(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.unit()).collect()
}

/// One decoded token through a (k, n) layer stored as `layout` (one of [`LAYOUTS`]): enough
/// copies of the layer, taken in turn, that the weights come from memory, as in decode.
pub fn linear_decode(layout: &str, (k, n): (usize, usize)) -> Result<Case> {
    let kn = unit(k * n, 1);
    let nk = crate::linear::storage::transpose(&kn, k, n);
    let quantized =
        |kind| QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&nk[j * k..][..k]));
    let m = match layout {
        "in-out" => Matrix::InOut(HostElems::F32(Buf::owned(kn.clone()))),
        "out-in" => Matrix::OutIn(HostElems::F32(Buf::owned(nk.clone()))),
        "q8_0" => Matrix::Quant(Arc::new(quantized(QuantKind::Q8_0))),
        "q4_0" => Matrix::Quant(Arc::new(quantized(QuantKind::Q4_0))),
        other => {
            return Err(crate::Error::Input(format!(
                "no layout `{other}`: one of {LAYOUTS:?}"
            )))
        }
    };
    let bytes = Linear::new(m.clone(), None, k, n)?.weight_bytes();
    let copies = (768 << 20) / bytes + 1;
    let layers: Vec<Linear> = (0..copies)
        .map(|_| Linear::new(deep_copy(&m), None, k, n))
        .collect::<candle_core::Result<_>>()?;
    let x = Tensor::from_vec(unit(k, 2), (1, k), &Device::Cpu)?;
    let mut i = 0;
    Ok(Case {
        bytes,
        run: Box::new(move || {
            i = (i + 1) % copies;
            layers[i].forward(&x, None)?;
            Ok(())
        }),
    })
}

/// A copy that shares no buffer with `m` (`Buf::Owned` is an `Arc`).
fn deep_copy(m: &Matrix) -> Matrix {
    let own = |h: &HostElems| match h {
        HostElems::F32(b) => HostElems::F32(Buf::owned(b.as_slice().to_vec())),
        HostElems::F16(b) => HostElems::F16(Buf::owned(b.as_slice().to_vec())),
        HostElems::Bf16(b) => HostElems::Bf16(Buf::owned(b.as_slice().to_vec())),
    };
    match m {
        Matrix::InOut(h) => Matrix::InOut(own(h)),
        Matrix::OutIn(h) => Matrix::OutIn(own(h)),
        Matrix::Quant(q) => Matrix::Quant(Arc::new(QuantMatrix::clone(q))),
        Matrix::Tensor(t) => Matrix::Tensor(t.clone()),
    }
}

/// Widening (N, K) f16 or q4_0 weights (`what`) into gemm's (K, N) f32 layout, as a prefill
/// does, weights in cache: (n, k) is the (out, in) shape.
pub fn widen(what: &str, (n, k): (usize, usize)) -> Result<Case> {
    let value = |i: usize| (i % 977) as f32 * 1e-3;
    let m = match what {
        "f16" => Matrix::OutIn(HostElems::F16(Buf::owned(
            (0..n * k)
                .map(|i| half::f16::from_f32(value(i)).to_bits())
                .collect(),
        ))),
        _ => Matrix::Quant(Arc::new(QuantMatrix::quantize(
            QuantKind::Q4_0,
            n,
            k,
            |j, out| {
                out.iter_mut()
                    .enumerate()
                    .for_each(|(c, o)| *o = value(j * k + c))
            },
        ))),
    };
    let layer = Linear::new(m, None, k, n)?;
    let bytes = layer.weight_bytes();
    let mut w = vec![0f32; k * n];
    Ok(Case {
        bytes,
        run: Box::new(move || Ok(layer.widen_kn(&mut w)?)),
    })
}

/// Integer dot products of one (3072, 768) block matrix of `kind` (`q8_0`, `q4_0`, `q6`,
/// `q4_k`) with one row of activations: in cache (`cold` false) or from memory, copies taken in
/// turn.
pub fn quant_dot(kind: &str, cold: bool) -> Result<Case> {
    let (n, k) = (3072, 768);
    let kind = match kind {
        "q8_0" => QuantKind::Q8_0,
        "q4_0" => QuantKind::Q4_0,
        "q4_k" => QuantKind::Q4K,
        _ => QuantKind::Q6,
    };
    let w = unit(n * k, 1);
    let x = unit(k, 2);
    let q = QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&w[j * k..][..k]));
    let bytes = q.bytes();
    let copies = if cold { (512 << 20) / bytes + 1 } else { 1 };
    let qs: Vec<QuantMatrix> = (0..copies).map(|_| q.clone()).collect();
    let xq = Q8Acts::new(&x, 1, k);
    let mut i = 0;
    let mut sink = 0f32;
    Ok(Case {
        bytes,
        run: Box::new(move || {
            i = (i + 1) % copies;
            qs[i].dot_rows(&xq.all(), 0..n, |_, d| sink += d[0]);
            std::hint::black_box(sink);
            Ok(())
        }),
    })
}

/// Decode attention of one GPT-2-small layer (12 heads of 64, 576 keys) over an f32 or f16
/// cache (`half`) from memory: fresh K and V buffers each call, taken in turn.
pub fn decode_attention(half: bool) -> Result<Case> {
    let (nh, hs, keys, cap) = (12usize, 64usize, 576usize, 1024usize);
    let copies = 48;
    let q = unit(nh * hs, 1);
    let f32s: Vec<Vec<f32>> = (0..copies).map(|c| unit(nh * cap * hs, c as u64)).collect();
    let f16s: Vec<Vec<u16>> = f32s
        .iter()
        .map(|v| {
            v.iter()
                .map(|x| half::f16::from_f32(*x).to_bits())
                .collect()
        })
        .collect();
    let d = Dims {
        batch: 1,
        t: 1,
        past: keys - 1,
        n_head: nh,
        n_kv_head: nh,
        head_size: hs,
    };
    let mut y = vec![0f32; nh * hs];
    let mut i = 0;
    Ok(Case {
        bytes: 2 * nh * keys * hs * if half { 2 } else { 4 },
        run: Box::new(move || {
            i += 1;
            let (a, b) = (2 * i % copies, (2 * i + 1) % copies);
            let (k, v) = match half {
                false => (Elems::F32(&f32s[a]), Elems::F32(&f32s[b])),
                true => (Elems::F16(&f16s[a]), Elems::F16(&f16s[b])),
            };
            let q = Heads {
                data: &q[..],
                batch: nh * hs,
                head_stride: hs,
                row: nh * hs,
            };
            let kv = |data| Heads {
                data,
                batch: nh * cap * hs,
                head_stride: cap * hs,
                row: hs,
            };
            causal_attention(q, kv(k), kv(v), d, 0.125, &mut y)
                .map_err(|p| crate::Error::Internal(format!("attention kernel: {}", p.0)))
        }),
    })
}
