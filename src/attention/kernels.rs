//! Causal attention on the host, for the fused path of [`super::Attention`]: each head's
//! `softmax(q·kᵀ·scale)·v` over the keys its queries may see, read in place from the QKV
//! projection or the KV cache (no transposes, no (T, T) mask, nothing computed for the masked
//! half), written straight into the merged (B, T, C) output.
//!
//! Many queries (prefill) go through gemm a block at a time; a few (decode) are plain loops the
//! compiler vectorises. Either way a head's weights are a softmax in f32 over its visible keys,
//! the same numbers as the unfused path up to summation order.

use crate::linear::pool;

/// Heads of one tensor laid out in memory: element `(b, head, row, d)` is
/// `data[b·batch + head·head_stride + row·row + d]`, `d` contiguous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) batch: usize,
    pub(crate) head_stride: usize,
    pub(crate) row: usize,
}

impl Heads<'_> {
    fn at(&self, b: usize, h: usize, row: usize) -> usize {
        b * self.batch + h * self.head_stride + row * self.row
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
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    d: Dims,
    scale: f32,
    y: &mut [f32],
) -> Result<(), pool::Panicked> {
    let (t, hs, c) = (d.t, d.head_size, d.n_head * d.head_size);
    assert_eq!(y.len(), d.batch * t * c);
    let group = d.n_head / d.n_kv_head;
    let blocks = if t <= LOOP_QUERIES {
        1
    } else {
        t.div_ceil(QUERY_BLOCK)
    };
    let items = d.batch * d.n_head * blocks;
    let out = crate::linear::SharedOut(y.as_mut_ptr());
    let item = |i: usize| {
        let (bh, blk) = (i / blocks, i % blocks);
        let (b, h) = (bh / d.n_head, bh % d.n_head);
        let g = h / group;
        let rows = if blocks == 1 {
            0..t
        } else {
            blk * QUERY_BLOCK..t.min((blk + 1) * QUERY_BLOCK)
        };
        // SAFETY: head h of batch b, rows `rows`, is written by this item alone: y's columns
        // h·hs.. of those rows (disjoint across items); y outlives the pool's run.
        let y_at = |r: usize| unsafe { out.slice((b * t + r) * c + h * hs, hs) };
        if t <= LOOP_QUERIES {
            for r in rows {
                decode_row(q, k, v, b, h, g, d.past + r + 1, r, scale, hs, y_at(r));
            }
        } else {
            prefill_block(q, k, v, b, h, g, d, rows, scale, &y_at);
        }
    };
    if items > 1 && d.batch * (d.past + t) * t * c >= 1 << 15 {
        pool::run(items, &item)
    } else {
        (0..items).for_each(item);
        Ok(())
    }
}

/// One query row `r` against keys `0..keys`: loops.
#[allow(clippy::too_many_arguments)]
fn decode_row(
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
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
    let mut s: Vec<f32> = (0..keys)
        .map(|j| dot(qv, &k.data[k.at(b, g, j)..][..hs]) * scale)
        .collect();
    softmax(&mut s);
    y.fill(0.0);
    for (j, p) in s.iter().enumerate() {
        let vv = &v.data[v.at(b, g, j)..][..hs];
        for (y, v) in y.iter_mut().zip(vv) {
            *y += p * v;
        }
    }
}

/// Query rows `rows` of one head against the keys the last of them may see, by gemm:
/// S = Q·Kᵀ, a causal softmax per row, Y = P·V.
#[allow(clippy::too_many_arguments)]
fn prefill_block<'y>(
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
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

    #[test]
    fn equals_the_definition_for_prefill_decode_and_grouped_heads() {
        for (batch, t, past, nh, nkv, hs) in [
            (1, 1, 0, 2, 2, 8),
            (2, 1, 37, 4, 2, 16),
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
            let k = rand(batch * nkv * tk * hs, 2);
            let v = rand(batch * nkv * tk * hs, 3);
            let heads = |data, n: usize, rows: usize| Heads {
                data,
                batch: n * rows * hs,
                head_stride: rows * hs,
                row: hs,
            };
            let mut y = vec![0f32; batch * t * nh * hs];
            let r = causal_attention(
                heads(&q, nh, t),
                heads(&k, nkv, tk),
                heads(&v, nkv, tk),
                d,
                0.3,
                &mut y,
            );
            assert!(r.is_ok());
            let want = reference(&q, &k, &v, d, 0.3);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "{d:?} at {i}: {a} vs {b}");
            }
        }
    }
}
