//! Causal attention on the host, for the fused path of [`super::Attention`]: each head's
//! `softmax(q·kᵀ·scale)·v` over the keys its queries may see, read in place from the QKV
//! projection or the KV cache (no transposes, no (T, T) mask, nothing computed for the masked
//! half), written straight into the merged (B, T, C) output.
//!
//! Many queries (prefill) go through gemm a block at a time; a few (decode) stream the head's
//! keys and values once through the linear layers' decode kernels (K as an (keys, hs) matrix
//! against q, V as a (keys, hs) matrix under the weights), which read a cache of halves as it
//! lies. Either way a head's weights are a softmax in f32 over its visible keys, the same
//! numbers as the unfused path up to summation order.

use crate::linear::kernels::{self as linear, Elems};
use crate::pool;

/// Heads of one tensor laid out in memory: element `(b, head, row, d)` is
/// `data[b·batch + head·head_stride + row·row + d]`, `d` contiguous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads<E> {
    pub(crate) data: E,
    pub(crate) batch: usize,
    pub(crate) head_stride: usize,
    pub(crate) row: usize,
}

/// Queries (and keys and values for gemm): f32.
pub(crate) type F32Heads<'a> = Heads<&'a [f32]>;
/// Keys or values: f32, or the halves of an f16/bf16 cache.
pub(crate) type KvHeads<'a> = Heads<Elems<'a>>;

impl<E> Heads<E> {
    fn at(&self, b: usize, h: usize, row: usize) -> usize {
        b * self.batch + h * self.head_stride + row * self.row
    }

    /// The same layout over `data`.
    fn with<D>(&self, data: D) -> Heads<D> {
        Heads {
            data,
            batch: self.batch,
            head_stride: self.head_stride,
            row: self.row,
        }
    }
}

impl<'a> F32Heads<'a> {
    /// These f32 heads as [`KvHeads`].
    pub(crate) fn kv(self) -> KvHeads<'a> {
        self.with(Elems::F32(self.data))
    }
}

/// The shape of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub(crate) batch: usize,
    /// New queries, at positions `past..past + t`.
    pub(crate) t: usize,
    pub(crate) past: usize,
    pub(crate) n_head: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) head_size: usize,
}

/// Queries per gemm block.
const QUERY_BLOCK: usize = 32;
/// Up to this many new queries, plain loops (decode); more, gemm.
const LOOP_QUERIES: usize = 4;

/// `y (B, T, n_head·hs) = softmax(q kᵀ · scale, causal) v` for every head; query head `h` reads
/// key/value head `h / (n_head / n_kv_head)`. `k` and `v` hold rows `0..past + t`.
pub(crate) fn causal_attention(
    q: F32Heads<'_>,
    k: KvHeads<'_>,
    v: KvHeads<'_>,
    d: Dims,
    scale: f32,
    y: &mut [f32],
) -> Result<(), pool::Panicked> {
    let (t, hs, c) = (d.t, d.head_size, d.n_head * d.head_size);
    assert_eq!(y.len(), d.batch * t * c);
    if t > LOOP_QUERIES {
        // gemm multiplies f32: halves from the cache are widened first, (B, nkv, past + t, hs)
        // each, a few percent of the products they feed.
        if let (Elems::F32(kd), Elems::F32(vd)) = (k.data, v.data) {
            return prefill(q, k.with(kd), v.with(vd), d, scale, y);
        }
        let (kw, vw) = (widen(k, d), widen(v, d));
        let rows = d.past + t;
        let dense = Heads {
            data: (),
            batch: d.n_kv_head * rows * hs,
            head_stride: rows * hs,
            row: hs,
        };
        return prefill(q, dense.with(&kw[..]), dense.with(&vw[..]), d, scale, y);
    }
    let out = crate::pool::SharedOut(y.as_mut_ptr());
    let group = d.n_head / d.n_kv_head;
    let item = |i: usize| {
        let (b, h) = (i / d.n_head, i % d.n_head);
        for r in 0..t {
            // SAFETY: head h of batch b is written by this item alone: y's columns h·hs.. of
            // each row (disjoint across items); y outlives the pool's run.
            let y = unsafe { out.slice((b * t + r) * c + h * hs, hs) };
            decode_row(q, k, v, b, h, h / group, d.past + r + 1, r, scale, hs, y);
        }
    };
    run(d, d.batch * d.n_head, &item)
}

/// Many queries: blocks of `QUERY_BLOCK` rows of each head, by gemm.
fn prefill(
    q: F32Heads<'_>,
    k: F32Heads<'_>,
    v: F32Heads<'_>,
    d: Dims,
    scale: f32,
    y: &mut [f32],
) -> Result<(), pool::Panicked> {
    let (t, hs, c) = (d.t, d.head_size, d.n_head * d.head_size);
    let group = d.n_head / d.n_kv_head;
    let blocks = t.div_ceil(QUERY_BLOCK);
    let out = crate::pool::SharedOut(y.as_mut_ptr());
    let item = |i: usize| {
        let (bh, blk) = (i / blocks, i % blocks);
        let (b, h) = (bh / d.n_head, bh % d.n_head);
        let rows = blk * QUERY_BLOCK..t.min((blk + 1) * QUERY_BLOCK);
        // SAFETY: head h of batch b, rows `rows`, is written by this item alone: y's columns
        // h·hs.. of those rows (disjoint across items); y outlives the pool's run.
        let y_at = |r: usize| unsafe { out.slice((b * t + r) * c + h * hs, hs) };
        prefill_block(q, k, v, b, h, h / group, d, rows, scale, &y_at);
    };
    run(d, d.batch * d.n_head * blocks, &item)
}

/// `item(i)` for `i < items`: on the pool, unless the call is too small to share.
fn run(d: Dims, items: usize, item: &(dyn Fn(usize) + Sync)) -> Result<(), pool::Panicked> {
    let c = d.n_head * d.head_size;
    if items > 1 && d.batch * (d.past + d.t) * d.t * c >= 1 << 15 {
        pool::run(items, item)
    } else {
        (0..items).for_each(item);
        Ok(())
    }
}

/// Rows `0..past + t` of every head of `x`, widened to f32: (B, nkv, past + t, hs) contiguous.
fn widen(x: KvHeads<'_>, d: Dims) -> Vec<f32> {
    let (rows, hs) = (d.past + d.t, d.head_size);
    let mut out = vec![0f32; d.batch * d.n_kv_head * rows * hs];
    for (i, dst) in out.chunks_exact_mut(rows * hs).enumerate() {
        let (b, g) = (i / d.n_kv_head, i % d.n_kv_head);
        if x.row == hs {
            let at = x.at(b, g, 0);
            x.data.widen(at..at + rows * hs, dst);
        } else {
            for (r, dst) in dst.chunks_exact_mut(hs).enumerate() {
                let at = x.at(b, g, r);
                x.data.widen(at..at + hs, dst);
            }
        }
    }
    out
}

/// One query row `r` against keys `0..keys`. Keys and values in rows of exactly `hs` (the
/// cache) are one (keys, hs) matrix each, for the decode kernels; strided ones (in place in
/// the QKV projection, f32) are read row by row.
#[allow(clippy::too_many_arguments)]
fn decode_row(
    q: F32Heads<'_>,
    k: KvHeads<'_>,
    v: KvHeads<'_>,
    b: usize,
    h: usize,
    g: usize,
    keys: usize,
    r: usize,
    scale: f32,
    hs: usize,
    y: &mut [f32],
) {
    let qv = &q.data[q.at(b, h, r)..][..hs];
    let mut s = vec![0f32; keys];
    y.fill(0.0);
    if k.row == hs && v.row == hs {
        let (k0, v0) = (k.at(b, g, 0), v.at(b, g, 0));
        let kw = k.data.slice(k0..k0 + keys * hs);
        linear::dot_rows(kw, qv, 1, hs, 0..keys, |j, dot| s[j] = dot[0] * scale);
        softmax(&mut s);
        let vw = v.data.slice(v0..v0 + keys * hs);
        linear::axpy_rows(vw, &s, 1, keys, hs, 0..keys, y);
        return;
    }
    let mut row = vec![0f32; hs];
    for (j, s) in s.iter_mut().enumerate() {
        k.data.widen(k.at(b, g, j)..k.at(b, g, j) + hs, &mut row);
        *s = dot(qv, &row) * scale;
    }
    softmax(&mut s);
    for (j, p) in s.iter().enumerate() {
        v.data.widen(v.at(b, g, j)..v.at(b, g, j) + hs, &mut row);
        for (y, v) in y.iter_mut().zip(&row) {
            *y += p * v;
        }
    }
}

/// Query rows `rows` of one head against the keys the last of them may see, by gemm:
/// S = Q·Kᵀ, a causal softmax per row, Y = P·V.
#[allow(clippy::too_many_arguments)]
fn prefill_block<'y>(
    q: F32Heads<'_>,
    k: F32Heads<'_>,
    v: F32Heads<'_>,
    b: usize,
    h: usize,
    g: usize,
    d: Dims,
    rows: std::ops::Range<usize>,
    scale: f32,
    y_at: &dyn Fn(usize) -> &'y mut [f32],
) {
    let (m, hs) = (rows.len(), d.head_size);
    let keys = d.past + rows.end; // the last row sees keys 0..keys
    let mut s = vec![0f32; m * keys];
    // SAFETY: Q rows `rows` of head h are (m, hs) with row stride q.row; K rows 0..keys of head
    // g read transposed (hs, keys): column stride k.row, row stride 1; S is (m, keys).
    unsafe {
        gemm::gemm(
            m,
            keys,
            hs,
            s.as_mut_ptr(),
            1,
            keys as isize,
            false,
            q.data.as_ptr().add(q.at(b, h, rows.start)),
            1,
            q.row as isize,
            k.data.as_ptr().add(k.at(b, g, 0)),
            k.row as isize,
            1,
            0.0f32,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (i, row) in s.chunks_exact_mut(keys).enumerate() {
        let visible = d.past + rows.start + i + 1;
        softmax(&mut row[..visible]);
        row[visible..].fill(0.0);
    }
    let mut out = vec![0f32; m * hs];
    // SAFETY: P (m, keys) times V rows 0..keys of head g (keys, hs), row stride v.row.
    unsafe {
        gemm::gemm(
            m,
            hs,
            keys,
            out.as_mut_ptr(),
            1,
            hs as isize,
            false,
            s.as_ptr(),
            1,
            keys as isize,
            v.data.as_ptr().add(v.at(b, g, 0)),
            1,
            v.row as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (i, r) in rows.enumerate() {
        y_at(r).copy_from_slice(&out[i * hs..(i + 1) * hs]);
    }
}

/// In place, in f32: `exp(s - max) / Σ`.
fn softmax(s: &mut [f32]) {
    let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::linear::kernels::portable::dot(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| r.unit()).collect()
    }

    /// The definition, in f64, with (B, heads, rows, hs) contiguous inputs.
    fn reference(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f32) -> Vec<f64> {
        let (t, hs, tk) = (d.t, d.head_size, d.past + d.t);
        let c = d.n_head * hs;
        let mut y = vec![0f64; d.batch * t * c];
        for b in 0..d.batch {
            for h in 0..d.n_head {
                let g = h / (d.n_head / d.n_kv_head);
                for r in 0..t {
                    let qi = &q[((b * d.n_head + h) * t + r) * hs..][..hs];
                    let visible = d.past + r + 1;
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            let kj = &k[((b * d.n_kv_head + g) * tk + j) * hs..][..hs];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (j, p) in e.iter().enumerate() {
                        let vj = &v[((b * d.n_kv_head + g) * tk + j) * hs..][..hs];
                        for dd in 0..hs {
                            y[(b * t + r) * c + h * hs + dd] += p / sum * vj[dd] as f64;
                        }
                    }
                }
            }
        }
        y
    }

    /// Contiguous (B, heads, rows, hs) `x` laid out with rows `pad` elements apart beyond
    /// hs (0: the cache's layout; else strided, as in place in the QKV projection).
    fn lay_out(x: &[f32], hs: usize, pad: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len() / hs * (hs + pad)];
        for (src, dst) in x.chunks_exact(hs).zip(out.chunks_exact_mut(hs + pad)) {
            dst[..hs].copy_from_slice(src);
        }
        out
    }

    #[test]
    fn equals_the_definition_for_prefill_decode_grouped_heads_and_every_cache_layout() {
        use half::{bf16, f16};
        for (batch, t, past, nh, nkv, hs) in [
            (1, 1, 0, 2, 2, 8),
            (2, 1, 37, 4, 2, 16),
            (1, 1, 70, 2, 1, 64),
            (1, 2, 9, 2, 2, 20),
            (1, 3, 5, 4, 1, 8),
            (2, 70, 0, 3, 3, 8),
            (1, 33, 20, 4, 2, 16),
        ] {
            let d = Dims {
                batch,
                t,
                past,
                n_head: nh,
                n_kv_head: nkv,
                head_size: hs,
            };
            let tk = past + t;
            let q = rand(batch * nh * t * hs, 1);
            let (k32, v32) = (
                rand(batch * nkv * tk * hs, 2),
                rand(batch * nkv * tk * hs, 3),
            );
            let heads = |n: usize, rows: usize, pad: usize| Heads {
                data: (),
                batch: n * rows * (hs + pad),
                head_stride: rows * (hs + pad),
                row: hs + pad,
            };
            let q_heads = heads(nh, t, 0).with(&q[..]);
            type Round = fn(f32) -> f32;
            let rounds: [(&str, Round); 3] = [
                ("f32", |v| v),
                ("f16", |v| f16::from_f32(v).to_f32()),
                ("bf16", |v| bf16::from_f32(v).to_f32()),
            ];
            for pad in [0, 5] {
                let (k, v) = (lay_out(&k32, hs, pad), lay_out(&v32, hs, pad));
                let bits = |x: &[f32], half: bool| -> Vec<u16> {
                    x.iter()
                        .map(|v| match half {
                            true => f16::from_f32(*v).to_bits(),
                            false => bf16::from_f32(*v).to_bits(),
                        })
                        .collect()
                };
                let (k16, v16, kb, vb) = (
                    bits(&k, true),
                    bits(&v, true),
                    bits(&k, false),
                    bits(&v, false),
                );
                for (kind, round) in rounds {
                    let (ke, ve) = match kind {
                        "f32" => (Elems::F32(&k), Elems::F32(&v)),
                        "f16" => (Elems::F16(&k16), Elems::F16(&v16)),
                        _ => (Elems::Bf16(&kb), Elems::Bf16(&vb)),
                    };
                    let k_ref: Vec<f32> = k32.iter().map(|x| round(*x)).collect();
                    let v_ref: Vec<f32> = v32.iter().map(|x| round(*x)).collect();
                    let mut y = vec![0f32; batch * t * nh * hs];
                    let kv = heads(nkv, tk, pad);
                    let r = causal_attention(q_heads, kv.with(ke), kv.with(ve), d, 0.3, &mut y);
                    assert!(r.is_ok());
                    // Halves: the definition on the values they hold.
                    let want = reference(&q, &k_ref, &v_ref, d, 0.3);
                    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                        let ok = (*a as f64 - b).abs() < 1e-5;
                        assert!(ok, "{kind} pad {pad} {d:?} at {i}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
