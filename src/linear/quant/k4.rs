//! Q4_K, llama.cpp's `q4_K` (`ggml-quants.c`): superblocks of 256 weights of one row with an
//! f16 `d` and `dmin`, 8 sub-blocks of 32 with a 6-bit scale `sc` and min `m`, weights at 4 bits
//! unsigned: `w ≈ d·sc·q − dmin·m`. Quantized as llama.cpp's reference
//! (`quantize_row_q4_K_ref`): each sub-block's scale and min from `make_qkx2_quants`' weighted
//! least-squares search, then both quantized to 6 bits against the superblock's largest, and the
//! levels redone against the rounded scales. 4.5 bits a weight.
//!
//! Where K is not a multiple of 256 (the test fixtures' 64; gpt2-xl's 1600), a row's last
//! superblock holds the K % 256 weights left (whole sub-blocks of 32), quantized the same way
//! over them, in a tile of full size: llama.cpp would store such a matrix as `q5_0` instead.
//!
//! A tile (8 rows × one superblock, 1120 bytes): the 8 sub-blocks' levels as Q4_0 tiles (128
//! bytes each, see the module above), then 96 bytes of scales and mins, 12 a row as in
//! llama.cpp's block but laid out for 8 lanes: byte `8s + r` holds row `r`'s sub-block `s` low
//! 4 bits of `sc` (bits 0-3) and `m` (bits 4-7); byte `64 + 8·(s % 4) + r` their high 2 bits
//! (`sc` at bits 0-1, `m` at 2-3, sub-blocks 4-7 at bits 4-7). The tile's 16 f16 are the rows'
//! `d`, then their `dmin`.
//!
//! Products, per sub-block and row of x, in f32 on every path:
//! `acc = fma(d·sc · d_x, Σ q·x, acc)` and `mins = fma(dmin·m, −(d_x · Σx), mins)`, with
//! `d·sc` and `dmin·m` rounded to f32 first and the integer sums exact; the dot is
//! `acc + mins` (two chains: one would wait on two FMAs' latency per sub-block).

use std::ops::Range;

use super::{put_levels, row_levels, Q8Rows, QuantKind, QuantMatrix, BLOCK, ROWS, SUPER};

/// Bytes of sub-block scales and mins per row and superblock.
pub(super) const SCALE_BYTES: usize = 12;

/// Sub-blocks per superblock.
const SUBS: usize = SUPER / BLOCK;

/// Where the levels end and the scales start in a tile.
pub(super) const SCALES_AT: usize = SUBS * ROWS * BLOCK / 2;

/// One row's superblock, quantized.
pub(super) struct Super {
    pub(super) d: f32,
    pub(super) dmin: f32,
    pub(super) sc: [u8; SUBS],
    pub(super) m: [u8; SUBS],
    pub(super) l: [u8; SUPER],
}

/// C's `nearest_int` (ggml): round half to even through the float adder.
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// llama.cpp's `make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`:
/// `(scale, −min)`, the levels in `l`.
fn make_qkx2_quants(x: &[f32; BLOCK], weights: &[f32; BLOCK], l: &mut [u8]) -> (f32, f32) {
    let (nmax, rmin, rdelta, nstep) = (15, -1.0f32, 0.1f32, 20);
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..BLOCK {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..BLOCK {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; BLOCK];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..BLOCK {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..BLOCK {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                err += weights[i] * (diff * diff);
            }
            if err < best {
                l[..BLOCK].copy_from_slice(&laux);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One superblock as llama.cpp's `quantize_row_q4_K_ref` quantizes it: 256 weights, or at a
/// row's end fewer (a multiple of 32; the sub-blocks past them stay 0).
pub(super) fn quantize(x: &[f32]) -> Super {
    assert!(x.len() <= SUPER && x.len().is_multiple_of(BLOCK));
    let subs = x.len() / BLOCK;
    let mut l = [0u8; SUPER];
    let (mut scales, mut mins) = ([0f32; SUBS], [0f32; SUBS]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for (j, xb) in x.as_chunks::<BLOCK>().0.iter().enumerate() {
        let sum_x2 = xb.iter().fold(0f32, |a, v| a + v * v);
        let av_x = (sum_x2 / BLOCK as f32).sqrt();
        let weights: [f32; BLOCK] = std::array::from_fn(|i| av_x + xb[i].abs());
        (scales[j], mins[j]) = make_qkx2_quants(xb, &weights, &mut l[j * BLOCK..]);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // `uint8_t ls = nearest_int(...)`, then MIN(63, ls): the int's low byte.
    let six = |v: f32| (nearest_int(v) as u8).min(63);
    let sc: [u8; SUBS] = std::array::from_fn(|j| six(inv_scale * scales[j]));
    let m: [u8; SUBS] = std::array::from_fn(|j| six(inv_min * mins[j]));
    let d = half::f16::from_f32(max_scale / 63.0);
    let dmin = half::f16::from_f32(max_min / 63.0);
    for j in 0..subs {
        let d = d.to_f32() * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m[j] as f32;
        for i in 0..BLOCK {
            l[j * BLOCK + i] = nearest_int((x[j * BLOCK + i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    Super {
        d: d.to_f32(),
        dmin: dmin.to_f32(),
        sc,
        m,
        l,
    }
}

/// Stores row `r`'s superblock in its tile (`qs`: the tile's bytes, `d`: its 16 f16).
pub(super) fn put(qs: &mut [u8], d: &mut [u16], r: usize, s: &Super) {
    d[r] = half::f16::from_f32(s.d).to_bits();
    d[ROWS + r] = half::f16::from_f32(s.dmin).to_bits();
    for j in 0..SUBS {
        let tile = &mut qs[j * ROWS * BLOCK / 2..(j + 1) * ROWS * BLOCK / 2];
        put_levels(QuantKind::Q4_0, tile, r, &s.l.as_chunks::<BLOCK>().0[j]);
        let (sc, m) = (s.sc[j], s.m[j]);
        qs[SCALES_AT + 8 * j + r] = (sc & 15) | ((m & 15) << 4);
        qs[SCALES_AT + 64 + 8 * (j % 4) + r] |= ((sc >> 4) | ((m >> 4) << 2)) << (4 * (j / 4));
    }
}

/// Row `r`'s sub-block `j` scale and min in a tile.
pub(super) fn scale_min(qs: &[u8], r: usize, j: usize) -> (u8, u8) {
    let low = qs[SCALES_AT + 8 * j + r];
    let high = qs[SCALES_AT + 64 + 8 * (j % 4) + r] >> (4 * (j / 4));
    (
        (low & 15) | ((high & 3) << 4),
        (low >> 4) | (((high >> 2) & 3) << 4),
    )
}

/// Sub-blocks in superblock `sb` of a row of K weights (8 but at the end of a row).
pub(super) fn subs(k: usize, sb: usize) -> usize {
    SUBS.min((k - sb * SUPER) / BLOCK)
}

/// Row `j`'s `(d·sc, dmin·m)` for sub-block `s` of tile `tile`, and its levels.
fn sub_block(q: &QuantMatrix, tile: usize, r: usize, s: usize) -> (f32, f32, [u8; BLOCK]) {
    let tb = q.kind.tile_bytes();
    let qs = &q.qs[tile * tb..(tile + 1) * tb];
    let (sc, m) = scale_min(qs, r, s);
    let d = half::f16::from_bits(q.d[tile * 2 * ROWS + r]).to_f32();
    let dmin = half::f16::from_bits(q.d[tile * 2 * ROWS + ROWS + r]).to_f32();
    let levels = row_levels(QuantKind::Q4_0, &qs[s * ROWS * BLOCK / 2..], r);
    (d * sc as f32, dmin * m as f32, levels)
}

/// [`QuantMatrix::dequantize_part`]: `d·sc·q − dmin·m` (llama.cpp's `dequantize_row_q4_K`).
pub(super) fn dequantize_part(q: &QuantMatrix, j: usize, k0: usize, out: &mut [f32]) {
    let spr = q.k.div_ceil(SUPER);
    let (t, r) = (j / ROWS, j % ROWS);
    for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
        let b = k0 / BLOCK + b;
        let (dsc, dmm, levels) = sub_block(q, t * spr + b / SUBS, r, b % SUBS);
        for (o, l) in out.iter_mut().zip(levels) {
            *o = dsc * l as f32 - dmm;
        }
    }
}

/// [`QuantMatrix::dot_rows_portable`] for Q4_K: the f32 operations the module names.
pub(super) fn dot_rows_portable(
    q: &QuantMatrix,
    x: &Q8Rows,
    rows: Range<usize>,
    mut put: impl FnMut(usize, &[f32]),
) {
    let (spr, bpr) = (q.k.div_ceil(SUPER), q.k / BLOCK);
    let mut acc = [[0f32; crate::linear::MAX_FAST_ROWS]; ROWS];
    let mut mins = [[0f32; crate::linear::MAX_FAST_ROWS]; ROWS];
    for t in rows.start / ROWS..rows.end.div_ceil(ROWS) {
        acc.iter_mut().for_each(|a| a.fill(0.0));
        mins.iter_mut().for_each(|a| a.fill(0.0));
        for sb in 0..spr {
            for s in 0..subs(q.k, sb) {
                let b = sb * SUBS + s;
                for (r, (acc, mins)) in acc.iter_mut().zip(&mut mins).enumerate() {
                    let (dsc, dmm, l) = sub_block(q, t * spr + sb, r, s);
                    let both = acc.iter_mut().zip(mins.iter_mut());
                    for (i, (acc, min)) in both.enumerate().take(x.m) {
                        let xb = &x.q[(i * bpr + b) * BLOCK..][..BLOCK];
                        let dot: i32 = l
                            .iter()
                            .zip(xb)
                            .map(|(l, x)| i32::from(*l) * i32::from(*x))
                            .sum();
                        let dx = x.d[i * bpr + b];
                        *acc = (dsc * dx).mul_add(dot as f32, *acc);
                        *min = dmm.mul_add(-(dx * x.s[i * bpr + b] as f32), *min);
                    }
                }
            }
        }
        for (r, (dots, mins)) in acc.iter().zip(&mins).enumerate() {
            let j = t * ROWS + r;
            if j >= rows.end {
                break;
            }
            let dots: [f32; crate::linear::MAX_FAST_ROWS] =
                std::array::from_fn(|i| dots[i] + mins[i]);
            put(j - rows.start, &dots[..x.m]);
        }
    }
}
