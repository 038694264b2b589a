//! 8- and 4-bit weights, in llama.cpp's `Q8_0`, `Q4_0` and `Q4_K` formats (`ggml-quants.c`):
//! blocks of 32 consecutive weights of one output row share an f16 scale `d` (Q4_K: superblocks
//! of 256 share `d` and `dmin`, each block a 6-bit scale and min; see [`k4`], whose blocks are
//! stored as Q4_0's levels and whose products add a min term per block).
//!
//! - Q8_0: `d = max|w| / 127`, `q = round(w / d)` in -127..=127; `w ≈ q·d`. 8.5 bits a weight.
//! - Q4_0: `d = m / -8` where `m` is the weight of largest magnitude (sign kept),
//!   `q = min(15, trunc(w / d + 8.5))` in 0..=15; `w ≈ (q - 8)·d`. 4.5 bits a weight.
//! - Q6 (ours; for the embedding / LM head under Q4_0, where llama.cpp puts its 6-bit `q6_K`):
//!   Q4_0's scheme with 64 levels, `d = m / -32`, `q` in 0..=63, `w ≈ (q - 32)·d`. 6.5 bits a
//!   weight (`q6_K`: 6.5625).
//!
//! Weights are quantized at load from the safetensors' f32/f16/bf16, row by row of the (out, in)
//! matrix, so each block runs along the dot product. Each weight is kept as an unsigned *level*
//! `l = q + offset` (Q8_0: `q + 128`, Q4_0 and Q6: `q` as above), and rows are interleaved 8 at a
//! time, as llama.cpp repacks Q4_0 at load (`ggml-cpu/repack.cpp`): one pass of integer dot
//! products then serves 8 output rows, one row per 32-bit lane, with no horizontal sum per row.
//! A *tile* is one block of 8 rows: 8 vectors of 32 bytes, vector `v` holding elements
//! `4v .. 4v + 4` of each row, row `r` at bytes `4r .. 4r + 4` (`vpdpbusd` and `sdot` sum
//! groups of 4 bytes):
//! - Q8_0: the 8 vectors (256 bytes);
//! - Q4_0: 4 vectors whose low nibbles are vectors 0-3 and high nibbles vectors 4-7 (128 bytes);
//! - Q6: Q4_0's 128 bytes of low nibbles, then 2 vectors of high bit pairs, byte `4r + e` of
//!   vector `h` holding those of vector `4h + s` at bits `2s, 2s + 1` (64 bytes).
//!
//! A tile's 8 scales are contiguous; N is padded to a multiple of 8 with rows of scale 0.
//!
//! Products are llama.cpp's: the activations are quantized to Q8_0 blocks once per call
//! ([`Q8Acts`]), each block's dot is exact in integers (`Σ l·x - offset·Σx`), then
//! `acc = fma(d_w·d_x, sum, acc)` per row, block after block: the same f32 operations on every
//! path (AVX-512 VNNI, AVX2, portable), so a row's result depends neither on the CPU nor on the
//! other rows of x it goes with.

use std::ops::Range;

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// Rows interleaved in a tile.
pub(crate) const ROWS: usize = 8;

/// Weights per Q4_K superblock (llama.cpp's `QK_K`): 8 sub-blocks of [`BLOCK`].
pub(crate) const SUPER: usize = 256;

/// The kernels' formats, as const generics.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const Q8: u8 = 0;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const Q4: u8 = 1;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const Q6: u8 = 2;

/// `$kernel::<FORMAT, M>($args)` for the matrix's format and the least compiled M that holds
/// x's rows (1 to 4, then 8: the kernel runs x.m of them).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! by_format_and_rows {
    ($kernel:ident, $q:expr, $m:expr, $($arg:expr),*) => {
        match ($q.kind, $m) {
            (QuantKind::Q8_0, 1) => $kernel::<Q8, 1>($($arg),*),
            (QuantKind::Q8_0, 2) => $kernel::<Q8, 2>($($arg),*),
            (QuantKind::Q8_0, 3) => $kernel::<Q8, 3>($($arg),*),
            (QuantKind::Q8_0, 4) => $kernel::<Q8, 4>($($arg),*),
            (QuantKind::Q8_0, _) => $kernel::<Q8, 8>($($arg),*),
            (QuantKind::Q4_0, 1) => $kernel::<Q4, 1>($($arg),*),
            (QuantKind::Q4_0, 2) => $kernel::<Q4, 2>($($arg),*),
            (QuantKind::Q4_0, 3) => $kernel::<Q4, 3>($($arg),*),
            (QuantKind::Q4_0, 4) => $kernel::<Q4, 4>($($arg),*),
            (QuantKind::Q4_0, _) => $kernel::<Q4, 8>($($arg),*),
            (QuantKind::Q6, 1) => $kernel::<Q6, 1>($($arg),*),
            (QuantKind::Q6, 2) => $kernel::<Q6, 2>($($arg),*),
            (QuantKind::Q6, 3) => $kernel::<Q6, 3>($($arg),*),
            (QuantKind::Q6, 4) => $kernel::<Q6, 4>($($arg),*),
            (QuantKind::Q6, _) => $kernel::<Q6, 8>($($arg),*),
            (QuantKind::Q4K, _) => unreachable!("q4_k has kernels of its own"),
        }
    };
}

mod k4;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
pub(super) mod simd;

/// Tile `t`'s dots, handed to `put` output by output: the tile's row `r` is output
/// `t·ROWS + r` (those before `rows.end`), and its dot with row i of x is lane `r` of `lanes[i]`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn put_tile<const M: usize>(
    lanes: &[[f32; ROWS]; M],
    m: usize,
    t: usize,
    rows: &Range<usize>,
    put: &mut impl FnMut(usize, &[f32]),
) {
    for (r, j) in (t * ROWS..rows.end.min((t + 1) * ROWS)).enumerate() {
        let dots: [f32; M] = std::array::from_fn(|i| lanes[i][r]);
        put(j - rows.start, &dots[..m]);
    }
}

/// Whether the integer products have SIMD kernels here (AVX2 on x86-64, NEON on aarch64): then
/// quantized prefill multiplies in integers too; elsewhere the portable loop would be slower than
/// gemm on widened weights.
pub(crate) fn simd_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::kernels::simd::available();
    #[cfg(target_arch = "aarch64")]
    return true;
    #[allow(unreachable_code)]
    false
}

/// The kernel the integer products run on, for `gpt2 bench`.
pub(crate) fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd::available() {
        return if simd::vnni() {
            "AVX-512 VNNI int8 dots, 8 rows interleaved"
        } else {
            "AVX2 int8 dots, 8 rows interleaved"
        };
    }
    #[cfg(target_arch = "aarch64")]
    return if neon::dotprod() {
        "NEON sdot int8 dots, 8 rows interleaved"
    } else {
        "NEON int8 dots, 8 rows interleaved"
    };
    #[allow(unreachable_code)]
    "portable int8 dots"
}

/// How a quantized matrix stores its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QuantKind {
    Q8_0,
    Q4_0,
    Q6,
    /// llama.cpp's `q4_K`: see [`k4`].
    Q4K,
}

impl QuantKind {
    /// Weights of one row that share the f16 scale(s): a [`BLOCK`], or Q4_K's [`SUPER`]block
    /// (a row's last one shorter where K is not a multiple of 256).
    pub(crate) fn block_len(self) -> usize {
        match self {
            Self::Q4K => SUPER,
            _ => BLOCK,
        }
    }

    /// f16 scales per block of one row (Q4_K: `d` and `dmin`).
    pub(crate) fn scales(self) -> usize {
        match self {
            Self::Q4K => 2,
            _ => 1,
        }
    }

    /// Bytes per block of one row besides its f16 scales: levels (and Q4_K's 6-bit sub-block
    /// scales and mins).
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 => BLOCK / 2,
            Self::Q6 => BLOCK * 3 / 4,
            Self::Q4K => SUPER / 2 + k4::SCALE_BYTES,
        }
    }

    /// Bytes of levels per tile (a block of [`ROWS`] rows).
    pub(crate) fn tile_bytes(self) -> usize {
        ROWS * self.block_bytes()
    }

    /// `l - w / d` for every weight: what makes the stored level unsigned.
    pub(crate) fn offset(self) -> i32 {
        match self {
            Self::Q8_0 => 128,
            Self::Q4_0 => 8,
            Self::Q6 => 32,
            Self::Q4K => 0,
        }
    }

    /// `q8_0`, `q4_0`, `q6` or `q4_k`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q6 => "q6",
            Self::Q4K => "q4_k",
        }
    }
}

/// A quantized (N, K) matrix in tiles (see the module's documentation): tile `(t, b)` (rows
/// `8t .. 8t + 8`, block `b`) has its levels at `qs[(t·K/32 + b)·tile_bytes ..]` and its 8
/// scales at `d[(t·K/32 + b)·8 ..]` (Q4_K: per superblock `b` of `⌈K/256⌉`, a tile of
/// [`QuantKind::tile_bytes`] and 16 f16, see [`k4`]).
#[derive(Clone, Debug)]
pub(crate) struct QuantMatrix {
    pub(crate) kind: QuantKind,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) d: Vec<u16>,
    pub(crate) qs: Vec<u8>,
}

impl QuantMatrix {
    /// Quantizes `n` rows of K weights, each handed over by `row(j, out)` as f32, on every core
    /// (it runs once, at load).
    pub(crate) fn quantize(
        kind: QuantKind,
        n: usize,
        k: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        assert!(k.is_multiple_of(BLOCK));
        let (bpr, tb, ns) = (
            k.div_ceil(kind.block_len()),
            kind.tile_bytes(),
            kind.scales() * ROWS,
        );
        let tiles = n.div_ceil(ROWS);
        let mut d = vec![0u16; tiles * bpr * ns];
        let mut qs = vec![0u8; tiles * bpr * tb];
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .clamp(1, 16);
        let per = tiles.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (c, (d, qs)) in d
                .chunks_mut(per * bpr * ns)
                .zip(qs.chunks_mut(per * bpr * tb))
                .enumerate()
            {
                let row = &row;
                s.spawn(move || {
                    let mut buf = vec![0f32; k];
                    let rows = d.chunks_mut(bpr * ns).zip(qs.chunks_mut(bpr * tb));
                    for (t, (d, qs)) in rows.enumerate() {
                        // Rows past N stay scale 0, levels 0.
                        for r in (0..ROWS).take_while(|r| (c * per + t) * ROWS + r < n) {
                            row((c * per + t) * ROWS + r, &mut buf);
                            if kind == QuantKind::Q4K {
                                for (b, w) in buf.chunks(SUPER).enumerate() {
                                    let (d, qs) = (&mut d[b * ns..][..ns], &mut qs[b * tb..][..tb]);
                                    k4::put(qs, d, r, &k4::quantize(w));
                                }
                                continue;
                            }
                            for (b, w) in buf.chunks_exact(BLOCK).enumerate() {
                                let (scale, levels) = match kind {
                                    QuantKind::Q8_0 => quantize_q8_0(w),
                                    QuantKind::Q4_0 => quantize_q4_0(w),
                                    QuantKind::Q6 | QuantKind::Q4K => quantize_q6(w),
                                };
                                d[b * ROWS + r] = half::f16::from_f32(scale).to_bits();
                                put_levels(kind, &mut qs[b * tb..(b + 1) * tb], r, &levels);
                            }
                        }
                    }
                });
            }
        });
        Self { kind, n, k, d, qs }
    }

    /// Row `j` and block `b` of the scale `d[i]`, as the index `j·K/32 + b` of that block in
    /// row-major order (for messages about the weight it came from).
    pub(crate) fn block_of_scale(&self, i: usize) -> usize {
        assert!(self.kind != QuantKind::Q4K);
        let bpr = self.k / BLOCK;
        let (tile, r) = (i / ROWS, i % ROWS);
        let (t, b) = (tile / bpr, tile % bpr);
        (t * ROWS + r) * bpr + b
    }

    /// The weights the scale `d[i]` is for, as flat indices of the row-major (N, K) matrix.
    pub(crate) fn weights_of_scale(&self, i: usize) -> Range<usize> {
        if self.kind != QuantKind::Q4K {
            let b = self.block_of_scale(i);
            return b * BLOCK..(b + 1) * BLOCK;
        }
        let spr = self.k.div_ceil(SUPER);
        let (tile, r) = (i / (2 * ROWS), i % ROWS);
        let (t, b) = (tile / spr, tile % spr);
        let at = (t * ROWS + r) * self.k + b * SUPER;
        at..at + SUPER.min(self.k - b * SUPER)
    }

    /// Row `j` as f32 weights (the numbers the products multiply by).
    pub(crate) fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k);
        self.dequantize_part(j, 0, out)
    }

    /// Weights `k0 .. k0 + out.len()` of row `j` as f32: whole blocks (`k0` and the length
    /// multiples of 32).
    pub(crate) fn dequantize_part(&self, j: usize, k0: usize, out: &mut [f32]) {
        assert!(
            j < self.n
                && k0.is_multiple_of(BLOCK)
                && out.len().is_multiple_of(BLOCK)
                && k0 + out.len() <= self.k
        );
        #[cfg(target_arch = "x86_64")]
        if super::kernels::simd::available() && self.kind != QuantKind::Q4K {
            // SAFETY: AVX2 and F16C are there (just checked); the blocks exist (asserted).
            unsafe { simd::dequantize_part(self, j, k0 / BLOCK, out) };
            return;
        }
        self.dequantize_part_portable(j, k0, out)
    }

    /// [`QuantMatrix::dequantize_part`] in plain Rust.
    pub(crate) fn dequantize_part_portable(&self, j: usize, k0: usize, out: &mut [f32]) {
        if self.kind == QuantKind::Q4K {
            return k4::dequantize_part(self, j, k0, out);
        }
        let (bpr, tb) = (self.k / BLOCK, self.kind.tile_bytes());
        let off = self.kind.offset();
        let (t, r) = (j / ROWS, j % ROWS);
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let tile = t * bpr + k0 / BLOCK + b;
            let d = half::f16::from_bits(self.d[tile * ROWS + r]).to_f32();
            let levels = row_levels(self.kind, &self.qs[tile * tb..(tile + 1) * tb], r);
            for (o, l) in out.iter_mut().zip(levels) {
                *o = (i32::from(l) - off) as f32 * d;
            }
        }
    }

    /// Bytes the matrix occupies.
    pub(crate) fn bytes(&self) -> usize {
        self.d.len() * 2 + self.qs.len()
    }

    /// For each row `j` in `rows`, its dots with the M rows of `x`, handed over as
    /// `put(j - rows.start, dots)`; `rows` starts on a tile (a multiple of [`ROWS`]).
    pub(crate) fn dot_rows(&self, x: &Q8Rows, rows: Range<usize>, put: impl FnMut(usize, &[f32])) {
        self.check(x, &rows);
        #[cfg(target_arch = "x86_64")]
        if super::kernels::simd::available() {
            // SAFETY: AVX2, FMA and F16C are there (just checked), and VNNI when asked for; the
            // sizes are checked and hold for the matrix and the activations by construction.
            unsafe { simd::dot_rows(self, x, rows, simd::vnni(), put) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the sizes are checked; `sdot` only where the CPU has it.
        return unsafe { neon::dot_rows(self, x, rows, neon::dotprod(), put) };
        #[allow(unreachable_code)]
        self.dot_rows_portable(x, rows, put)
    }

    /// [`QuantMatrix::dot_rows`] on NEON, with or without `sdot` (for the tests).
    #[cfg(all(test, target_arch = "aarch64"))]
    pub(crate) fn dot_rows_neon(
        &self,
        x: &Q8Rows,
        rows: Range<usize>,
        sdot: bool,
        put: impl FnMut(usize, &[f32]),
    ) {
        self.check(x, &rows);
        assert!(!sdot || neon::dotprod());
        // SAFETY: as in `dot_rows`.
        unsafe { neon::dot_rows(self, x, rows, sdot, put) };
    }

    fn check(&self, x: &Q8Rows, rows: &Range<usize>) {
        assert!(x.m <= super::MAX_FAST_ROWS && x.k == self.k);
        assert!(rows.start.is_multiple_of(ROWS) && rows.start <= rows.end && rows.end <= self.n);
        assert!(x.q.len() == x.m * x.k && x.d.len() == x.m * x.k / BLOCK && x.s.len() == x.d.len());
    }

    /// [`QuantMatrix::dot_rows`] on plain AVX2 even where VNNI is there (for the tests).
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn dot_rows_avx2(
        &self,
        x: &Q8Rows,
        rows: Range<usize>,
        put: impl FnMut(usize, &[f32]),
    ) {
        self.check(x, &rows);
        assert!(super::kernels::simd::available());
        // SAFETY: as in `dot_rows`, without VNNI.
        unsafe { simd::dot_rows(self, x, rows, false, put) };
    }

    /// [`QuantMatrix::dot_rows`] in plain Rust: the same integer sums and f32 operations.
    pub(crate) fn dot_rows_portable(
        &self,
        x: &Q8Rows,
        rows: Range<usize>,
        mut put: impl FnMut(usize, &[f32]),
    ) {
        if self.kind == QuantKind::Q4K {
            return k4::dot_rows_portable(self, x, rows, put);
        }
        let (bpr, tb) = (self.k / BLOCK, self.kind.tile_bytes());
        let off = self.kind.offset();
        let mut acc = [[0f32; super::MAX_FAST_ROWS]; ROWS];
        for t in rows.start / ROWS..rows.end.div_ceil(ROWS) {
            acc.iter_mut().for_each(|a| a.fill(0.0));
            for b in 0..bpr {
                let tile = t * bpr + b;
                let levels = &self.qs[tile * tb..(tile + 1) * tb];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let l = row_levels(self.kind, levels, r);
                    let dw = half::f16::from_bits(self.d[tile * ROWS + r]).to_f32();
                    for (i, acc) in acc.iter_mut().enumerate().take(x.m) {
                        let xb = &x.q[(i * bpr + b) * BLOCK..][..BLOCK];
                        let sum: i32 = l
                            .iter()
                            .zip(xb)
                            .map(|(l, x)| i32::from(*l) * i32::from(*x))
                            .sum();
                        let sum = sum - off * x.s[i * bpr + b];
                        *acc = (dw * x.d[i * bpr + b]).mul_add(sum as f32, *acc);
                    }
                }
            }
            for (r, dots) in acc.iter().enumerate() {
                let j = t * ROWS + r;
                if j >= rows.end {
                    break;
                }
                put(j - rows.start, &dots[..x.m]);
            }
        }
    }
}

/// Activations quantized for the integer products: per block of 32, `d = max|x| / 127` and
/// `q = round(x / d)` (llama.cpp's Q8_0, with an f32 `d`), and `s = Σq` (what a weight's offset
/// adds to the sum of its levels times q).
#[derive(Debug, Clone)]
pub(crate) struct Q8Acts {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<i32>,
}

impl Q8Acts {
    /// `x` (M, K) row-major; K a multiple of 32.
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        let mut q = vec![0i8; m * k];
        let mut d = Vec::with_capacity(m * k / BLOCK);
        let mut s = Vec::with_capacity(m * k / BLOCK);
        for (xb, qb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
            let (scale, levels) = quantize_q8_0(xb);
            d.push(scale);
            qb.iter_mut()
                .zip(levels)
                .for_each(|(q, l)| *q = (i32::from(l) - 128) as i8);
            s.push(qb.iter().map(|q| i32::from(*q)).sum());
        }
        Self { m, k, q, d, s }
    }

    /// Every row.
    pub(crate) fn all(&self) -> Q8Rows<'_> {
        self.rows(0..self.m)
    }

    /// Rows `r` (at most [`super::MAX_FAST_ROWS`] go through a kernel together).
    pub(crate) fn rows(&self, r: Range<usize>) -> Q8Rows<'_> {
        let bpr = self.k / BLOCK;
        Q8Rows {
            m: r.len(),
            k: self.k,
            q: &self.q[r.start * self.k..r.end * self.k],
            d: &self.d[r.start * bpr..r.end * bpr],
            s: &self.s[r.start * bpr..r.end * bpr],
        }
    }
}

/// Some rows of [`Q8Acts`]: (M, K) quants, (M, K/32) scales and sums.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8Rows<'a> {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) q: &'a [i8],
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [i32],
}

/// Stores one row's 32 levels in its place `r` of a tile.
fn put_levels(kind: QuantKind, tile: &mut [u8], r: usize, l: &[u8; BLOCK]) {
    let at = |e: usize| (e / 4) * 32 + r * 4 + e % 4;
    match kind {
        QuantKind::Q8_0 => (0..BLOCK).for_each(|e| tile[at(e)] = l[e]),
        QuantKind::Q4_0 | QuantKind::Q6 | QuantKind::Q4K => {
            for e in 0..BLOCK / 2 {
                tile[at(e)] = (l[e] & 0x0F) | ((l[e + 16] & 0x0F) << 4);
            }
            if kind == QuantKind::Q6 {
                for (e, l) in l.iter().enumerate() {
                    let v = e / 4;
                    tile[128 + (v / 4) * 32 + r * 4 + e % 4] |= (l >> 4) << (2 * (v % 4));
                }
            }
        }
    }
}

/// Row `r`'s 32 levels in a tile.
fn row_levels(kind: QuantKind, tile: &[u8], r: usize) -> [u8; BLOCK] {
    let at = |e: usize| (e / 4) * 32 + r * 4 + e % 4;
    let mut l = [0u8; BLOCK];
    match kind {
        QuantKind::Q8_0 => (0..BLOCK).for_each(|e| l[e] = tile[at(e)]),
        QuantKind::Q4_0 | QuantKind::Q6 | QuantKind::Q4K => {
            for e in 0..BLOCK / 2 {
                let byte = tile[at(e)];
                (l[e], l[e + 16]) = (byte & 0x0F, byte >> 4);
            }
            if kind == QuantKind::Q6 {
                for (e, l) in l.iter_mut().enumerate() {
                    let v = e / 4;
                    let pair = tile[128 + (v / 4) * 32 + r * 4 + e % 4] >> (2 * (v % 4));
                    *l |= (pair & 3) << 4;
                }
            }
        }
    }
    l
}

/// `(d, levels)` of one Q8_0 block: `q + 128`.
fn quantize_q8_0(w: &[f32]) -> (f32, [u8; BLOCK]) {
    let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; BLOCK];
    for (l, v) in l.iter_mut().zip(w) {
        // Round half away from zero (C's roundf), by truncating x ± 0.5: no libm call.
        let x = v * id;
        *l = (i32::from((x + 0.5f32.copysign(x)) as i8) + 128) as u8;
    }
    (d, l)
}

/// `(d, levels)` of one Q4_0 block.
fn quantize_q4_0(w: &[f32]) -> (f32, [u8; BLOCK]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in w {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; BLOCK];
    for (l, v) in l.iter_mut().zip(w) {
        *l = ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    }
    (d, l)
}

/// `(d, levels)` of one Q6 block.
fn quantize_q6(w: &[f32]) -> (f32, [u8; BLOCK]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in w {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    let d = max / -32.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; BLOCK];
    for (l, v) in l.iter_mut().zip(w) {
        *l = ((v * id + 32.5) as i32).clamp(0, 63) as u8;
    }
    (d, l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| r.unit()).collect()
    }

    #[test]
    fn blocks_follow_llama_cpp() {
        // Q8_0: the largest magnitude maps to ±127 (levels: + 128).
        let mut w = [0f32; BLOCK];
        w[3] = -2.54;
        w[5] = 1.27;
        let (d, l) = quantize_q8_0(&w);
        assert!((d - 0.02).abs() < 1e-7);
        assert_eq!((l[3], l[5], l[0]), (1, 192, 128));
        // Q4_0: the signed extreme maps to q = 0 (i.e. -8·d), zero to 8.
        let mut w = [0f32; BLOCK];
        w[0] = -4.0;
        w[16] = 2.0;
        let (d, l) = quantize_q4_0(&w);
        assert_eq!(d, 0.5);
        // -4/0.5 + 8.5 = 0.5 -> 0; 2/0.5 + 8.5 = 12.5 -> 12.
        assert_eq!((l[0], l[16], l[1]), (0, 12, 8));
        // Q6: the signed extreme maps to q = 0 (-32·d), zero to 32.
        let mut w = [0f32; BLOCK];
        w[0] = -4.0;
        w[17] = 2.0; // 2 / 0.125 + 32.5 = 48.5 -> 48
        w[26] = -1.0; // -1 / 0.125 + 32.5 = 24.5 -> 24
        let (d, l) = quantize_q6(&w);
        assert_eq!(d, 0.125);
        assert_eq!((l[0], l[17], l[26], l[5]), (0, 48, 24, 32));
    }

    #[test]
    fn tiles_hold_each_level_where_the_layout_says() {
        let mut r = SplitMix64::new(5);
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0, QuantKind::Q6] {
            let top = match kind {
                QuantKind::Q8_0 => 256,
                QuantKind::Q4_0 => 16,
                QuantKind::Q6 => 64,
                QuantKind::Q4K => continue,
            };
            let rows: Vec<[u8; BLOCK]> = (0..ROWS)
                .map(|_| std::array::from_fn(|_| (r.next_u64() % top) as u8))
                .collect();
            let mut tile = vec![0u8; kind.tile_bytes()];
            for (row, l) in rows.iter().enumerate() {
                put_levels(kind, &mut tile, row, l);
            }
            for (row, l) in rows.iter().enumerate() {
                assert_eq!(&row_levels(kind, &tile, row), l, "{kind:?} row {row}");
                // Element e = 4v + u of row r: vector v, byte 4r + u.
                for (e, &l) in l.iter().enumerate() {
                    let (v, u) = (e / 4, e % 4);
                    let got = match kind {
                        QuantKind::Q8_0 => tile[32 * v + 4 * row + u],
                        _ => {
                            let byte = tile[32 * (v % 4) + 4 * row + u];
                            let low = if v < 4 { byte & 0x0F } else { byte >> 4 };
                            if kind == QuantKind::Q6 {
                                let pairs = tile[128 + 32 * (v / 4) + 4 * row + u];
                                low | (((pairs >> (2 * (v % 4))) & 3) << 4)
                            } else {
                                low
                            }
                        }
                    };
                    assert_eq!(got, l, "{kind:?} row {row} element {e}");
                }
            }
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range is a split too
    fn dequantized_rows_are_close_and_dots_equal_them() {
        let n = 37;
        // Q8_0: half a step (amax/254). Q4_0 and Q6: the opposite extreme is clamped at 7 steps
        // of amax/8, or 31 of amax/32. Q4_K: half a step of range/15 and the 6-bit scale's and
        // min's rounding, against its superblock's largest (K two superblocks).
        for (kind, tol, k) in [
            (QuantKind::Q8_0, 0.5 / 127.0, 96),
            (QuantKind::Q4_0, 1.0 / 8.0, 96),
            (QuantKind::Q6, 1.0 / 32.0, 96),
            (QuantKind::Q4K, 1.0 / 8.0, 352),
        ] {
            let w = rand(n * k, 1);
            let q =
                QuantMatrix::quantize(kind, n, k, |j, out| out.copy_from_slice(&w[j * k..][..k]));
            // N padded to 40 rows.
            let per = 2 * kind.scales() + kind.block_bytes();
            assert_eq!(q.bytes(), 40 * k.div_ceil(kind.block_len()) * per);
            if kind == QuantKind::Q4K && k % SUPER == 0 {
                assert_eq!(q.bytes() * 8, 40 * k * 9 / 2, "4.5 bits a weight");
            }
            let mut deq = vec![0f32; n * k];
            let mut portable = vec![0f32; k];
            for j in 0..n {
                q.dequantize_row(j, &mut deq[j * k..(j + 1) * k]);
                q.dequantize_part_portable(j, 0, &mut portable);
                assert_eq!(deq[j * k..(j + 1) * k], portable, "{kind:?} row {j}");
                // Parts: the blocks they name, at both paths.
                for (k0, len) in [(32, 32), (64, 32), (0, 64), (32, 64)] {
                    let mut part = vec![0f32; len];
                    q.dequantize_part(j, k0, &mut part);
                    assert_eq!(part, deq[j * k + k0..][..len], "{kind:?} row {j} at {k0}");
                    q.dequantize_part_portable(j, k0, &mut part);
                    assert_eq!(part, deq[j * k + k0..][..len], "{kind:?} row {j} at {k0}");
                }
            }
            // Each weight within its format's error of its block's largest.
            for j in 0..n {
                let len = kind.block_len();
                for (b, blk) in w[j * k..(j + 1) * k].chunks(len).enumerate() {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (t, v) in blk.iter().enumerate() {
                        let e = (deq[j * k + b * len + t] - v).abs();
                        assert!(e <= tol * amax * 1.01 + 1e-3 * amax, "{kind:?} {e} {amax}");
                    }
                }
            }
            for m in [1, 2, 3, 5, 8] {
                let x = rand(m * k, 10 + m as u64);
                let xq = Q8Acts::new(&x, m, k);
                // The reference: the dequantized weights times the dequantized activations.
                let xd: Vec<f64> = (0..m * k)
                    .map(|c| xq.q[c] as f64 * xq.d[c / BLOCK] as f64)
                    .collect();
                let run = |path: &str, xq: &Q8Rows, rows: &[Range<usize>]| {
                    let mut y = vec![0f32; xq.m * n];
                    for rows in rows {
                        let j0 = rows.start;
                        let put = |r: usize, dots: &[f32]| {
                            assert_eq!(dots.len(), xq.m);
                            for (i, d) in dots.iter().enumerate() {
                                y[i * n + j0 + r] = *d;
                            }
                        };
                        match path {
                            "simd" => q.dot_rows(xq, rows.clone(), put),
                            #[cfg(target_arch = "x86_64")]
                            "avx2" => q.dot_rows_avx2(xq, rows.clone(), put),
                            #[cfg(target_arch = "aarch64")]
                            "neon" => q.dot_rows_neon(xq, rows.clone(), false, put),
                            _ => q.dot_rows_portable(xq, rows.clone(), put),
                        }
                    }
                    y
                };
                let portable = run("portable", &xq.all(), &[0..n]);
                // The dispatched kernel (VNNI, sdot, ...) and the one below it.
                let paths: &[&str] = if cfg!(target_arch = "aarch64") {
                    &["simd", "neon"]
                } else if simd_kernels() {
                    &["simd", "avx2"]
                } else {
                    &[]
                };
                for path in paths {
                    // Bit for bit the portable sums, however the rows are split.
                    for split in [vec![0..n], vec![0..8, 8..n], vec![0..16, 16..21, 24..n]] {
                        let y = run(path, &xq.all(), &split);
                        for rows in &split {
                            for i in 0..m {
                                let at = i * n;
                                assert_eq!(
                                    y[at + rows.start..at + rows.end],
                                    portable[at + rows.start..at + rows.end],
                                    "{kind:?} {path} m={m} rows {rows:?}"
                                );
                            }
                        }
                    }
                }
                // Each row of x as it would be alone.
                for i in 0..m {
                    let one = Q8Acts::new(&x[i * k..(i + 1) * k], 1, k);
                    assert_eq!(
                        run("portable", &one.all(), &[0..n]),
                        portable[i * n..(i + 1) * n],
                        "{kind:?} m={m} row {i}"
                    );
                }
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|c| xd[i * k + c] * deq[j * k + c] as f64).sum();
                        let got = portable[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{kind:?} m={m}: {got} vs {want}"
                        );
                        // And within the activations' rounding of the f32 product: each x is
                        // off by at most half its block's step, so the sum by at most
                        // Σ |w| · step / 2.
                        let exact: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * deq[j * k + c] as f64)
                            .sum();
                        let bound: f64 = (0..k)
                            .map(|c| {
                                deq[j * k + c].abs() as f64 * xq.d[(i * k + c) / BLOCK] as f64 / 2.0
                            })
                            .sum();
                        assert!(
                            (got - exact).abs() <= bound * 1.001 + 1e-6,
                            "{got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q4_k_follows_llama_cpp() {
        // A ramp 0, 0.1, .., 1.5 (twice) in each sub-block: the first guess (min 0, scale
        // 0.1) is exact, so the search keeps it; every sub-block's scale is the largest, 63.
        let x: [f32; SUPER] = std::array::from_fn(|i| (i % 16) as f32 * 0.1);
        let s = k4::quantize(&x);
        assert_eq!((s.sc, s.m, s.dmin), ([63; 8], [0; 8], 0.0));
        assert_eq!(s.d, half::f16::from_f32(0.1 / 63.0).to_f32());
        assert!((0..SUPER).all(|i| s.l[i] as usize == i % 16));
        // Negative weights: a min; levels reach both ends.
        let x: [f32; SUPER] = std::array::from_fn(|i| (i % 32) as f32 * 0.25 - 3.0);
        let s = k4::quantize(&x);
        assert!(s.dmin > 0.0 && s.m.iter().all(|&m| m == 63), "{:?}", s.m);
        for j in 0..8 {
            let l = &s.l[j * BLOCK..(j + 1) * BLOCK];
            assert_eq!((l.iter().min(), l.iter().max()), (Some(&0), Some(&15)));
        }
        // Dequantized as `dequantize_row_q4_K` does, from llama.cpp's own block: the 12 scale
        // bytes packed as `quantize_row_q4_K_ref` packs them, read by `get_scale_min_k4`.
        let (n, k) = (9, 512);
        let w: Vec<f32> = rand(n * k, 3).iter().map(|v| v * v * v - 0.1).collect();
        let q = QuantMatrix::quantize(QuantKind::Q4K, n, k, |j, out| {
            out.copy_from_slice(&w[j * k..][..k])
        });
        let mut deq = vec![0f32; k];
        let mut err = [0f64; 2];
        for j in 0..n {
            q.dequantize_row(j, &mut deq);
            for b in 0..k / SUPER {
                let s = k4::quantize(&w[j * k + b * SUPER..][..SUPER]);
                let mut scales = [0u8; 12];
                for jj in 0..8 {
                    let (ls, lm) = (s.sc[jj], s.m[jj]);
                    if jj < 4 {
                        scales[jj] = ls;
                        scales[jj + 4] = lm;
                    } else {
                        scales[jj + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                        scales[jj - 4] |= (ls >> 4) << 6;
                        scales[jj] |= (lm >> 4) << 6;
                    }
                }
                for jj in 0..8 {
                    let (sc, m) = if jj < 4 {
                        (scales[jj] & 63, scales[jj + 4] & 63)
                    } else {
                        (
                            (scales[jj + 4] & 0xF) | ((scales[jj - 4] >> 6) << 4),
                            (scales[jj + 4] >> 4) | ((scales[jj] >> 6) << 4),
                        )
                    };
                    let (d1, m1) = (s.d * sc as f32, s.dmin * m as f32);
                    for i in 0..BLOCK {
                        let at = b * SUPER + jj * BLOCK + i;
                        let want = d1 * s.l[jj * BLOCK + i] as f32 - m1;
                        assert_eq!(deq[at], want, "row {j} weight {at}");
                    }
                }
            }
            // Less loss than Q4_0 on the same weights.
            let q0 = QuantMatrix::quantize(QuantKind::Q4_0, 1, k, |_, out| {
                out.copy_from_slice(&w[j * k..][..k])
            });
            let mut deq0 = vec![0f32; k];
            q0.dequantize_row(0, &mut deq0);
            for c in 0..k {
                err[0] += f64::from(deq0[c] - w[j * k + c]).powi(2);
                err[1] += f64::from(deq[c] - w[j * k + c]).powi(2);
            }
        }
        assert!(err[1] < 0.8 * err[0], "q4_0 {} vs q4_k {}", err[0], err[1]);
    }

    #[test]
    fn q4_k_scales_and_mins_round_trip() {
        let mut r = SplitMix64::new(9);
        let mut qs = vec![0u8; QuantKind::Q4K.tile_bytes()];
        let mut d = vec![0u16; 16];
        let all: Vec<([u8; 8], [u8; 8])> = (0..ROWS)
            .map(|_| {
                let mut six = |_| (r.next_u64() % 64) as u8;
                (std::array::from_fn(&mut six), std::array::from_fn(&mut six))
            })
            .collect();
        for (row, (sc, m)) in all.iter().enumerate() {
            let l = std::array::from_fn(|i| ((i + row) % 16) as u8);
            let s = k4::Super {
                d: 1.0,
                dmin: 2.0,
                sc: *sc,
                m: *m,
                l,
            };
            k4::put(&mut qs, &mut d, row, &s);
        }
        for (row, (sc, m)) in all.iter().enumerate() {
            for j in 0..8 {
                assert_eq!(
                    k4::scale_min(&qs, row, j),
                    (sc[j], m[j]),
                    "row {row} sub {j}"
                );
                let l = row_levels(QuantKind::Q4_0, &qs[j * 128..], row);
                assert!(l
                    .iter()
                    .enumerate()
                    .all(|(i, &l)| l as usize == (j * 32 + i + row) % 16));
            }
            assert_eq!((d[row], d[8 + row]), (0x3c00, 0x4000));
        }
    }

    #[test]
    fn a_q4_k_scale_names_its_superblock() {
        let (n, k) = (11, 512);
        let q = QuantMatrix::quantize(QuantKind::Q4K, n, k, |_, out| out.fill(1.0));
        // d: per tile (2 of them) and superblock (2), 8 d then 8 dmin.
        assert_eq!(q.d.len(), 2 * 2 * 16);
        assert_eq!(q.weights_of_scale(0), 0..256);
        assert_eq!(q.weights_of_scale(8 + 3), 3 * 512..3 * 512 + 256);
        assert_eq!(q.weights_of_scale(16 + 2), 2 * 512 + 256..3 * 512);
        assert_eq!(q.weights_of_scale(32 + 16 + 9), 9 * 512 + 256..10 * 512);
    }

    #[test]
    fn a_scale_names_its_row_and_block() {
        let (n, k) = (19, 64);
        let q = QuantMatrix::quantize(QuantKind::Q8_0, n, k, |j, out| {
            out.iter_mut()
                .enumerate()
                .for_each(|(c, o)| *o = (j * k + c) as f32 + 1.0)
        });
        // Each block's scale is its largest weight / 127: the last of the block, j·K + 32b + 32.
        for (i, d) in q.d.iter().enumerate() {
            let d = half::f16::from_bits(*d).to_f32();
            let block = q.block_of_scale(i);
            if block / 2 < n {
                let want = half::f16::from_f32(((block + 1) * BLOCK) as f32 / 127.0).to_f32();
                assert_eq!(d, want, "scale {i} -> block {block}");
            } else {
                assert_eq!(d, 0.0, "scale {i}: a padding row");
            }
        }
    }
}
