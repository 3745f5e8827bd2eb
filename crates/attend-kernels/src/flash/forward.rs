//! Forward pass: for each query tile, stream over key tiles with an online softmax.
//!
//! Per tile (FlashAttention-2, Algorithm 1): `S = Q Kᵀ·scale` → score mod → mask → `m' = max(m, rowmax S)`,
//! `P = exp(S − m')`, `l = l·e^{m−m'} + rowsum P`, `O = O·e^{m−m'} + P V`; at the end `O /= l`, `lse = m + ln l`.

use rayon::prelude::*;

use super::gemm::{gemm, QUANTUM};
use super::masks::{MaskMod, ScoreMod, TileKind};
use super::rows::{online_softmax, scale_rows};
use super::simd::Isa;
use super::{dropout_index, require, round_up, FlashConfig, FlashDims, FlashError, SyncPtr};
use crate::dropout::{drop_threshold, keep};

mod sealed {
    /// Only this crate's element types: [`Operand`](super::Operand)'s methods reach instructions (AVX512-BF16) whose
    /// presence only the kernel's entry points check.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::Bf16 {}
}

/// An element type the forward pass can read: f32 (FMA tiles) or bf16 (AVX512-BF16 dot-product tiles). It decides
/// how key and value tiles are packed and how the two products `Q Kᵀ` and `P V` run; everything between them (score
/// mods, masks, the online softmax) is f32 and shared. Sealed: implemented for `f32` and [`Bf16`] only.
pub trait Operand: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    /// Whether [`pack_values`](Self::pack_values) packs (f32 reads value rows as they are).
    const PACKS_VALUES: bool;
    /// Whether query rows are multiplied by the scale before the product (exact enough in f32; bf16 would round
    /// the scaled queries again, so it scales the f32 scores instead).
    const PRESCALE: bool;
    /// `self · c`, for prescaling.
    fn scaled(self, c: f32) -> Self;
    /// Packs keys `row0..row0+valid` (rows of `d`) for [`scores`](Self::scores), padded to `width` keys; `dst`
    /// holds at least `d × width` elements.
    fn pack_keys(k: &[Self], row0: usize, valid: usize, d: usize, width: usize, dst: &mut [Self]);
    /// `s (rows × width) = q_rows · packed keys`.
    ///
    /// # Safety
    /// `isa` is supported; `q` holds `rows × d` from its start; `width % QUANTUM == 0`.
    unsafe fn scores(isa: Isa, rows: usize, width: usize, d: usize, q: &[Self], kt: &[Self], s: &mut [f32]);
    /// Packs values `row0..row0+valid` (rows of `dv`) for [`accumulate`](Self::accumulate), padded to `width` rows;
    /// `dst` holds at least `width × dv` elements.
    fn pack_values(v: &[Self], row0: usize, valid: usize, dv: usize, width: usize, dst: &mut [Self]);
    /// `acc (rows × dv) += p (rows × width) · values`; `v` is the unpacked tile (its first row), `packed` what
    /// [`pack_values`](Self::pack_values) wrote, `scratch` free space.
    ///
    /// # Safety
    /// As for [`scores`](Self::scores); padding probabilities beyond `valid` are 0.
    #[allow(clippy::too_many_arguments)]
    unsafe fn accumulate(
        isa: Isa,
        rows: usize,
        dv: usize,
        valid: usize,
        width: usize,
        p: &[f32],
        v: &[Self],
        packed: &[Self],
        scratch: &mut Vec<Self>,
        acc: &mut [f32],
    );
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Whether no element is NaN or ±∞.
    fn all_finite(xs: &[Self]) -> bool;
}

impl Operand for f32 {
    const PACKS_VALUES: bool = false;
    const PRESCALE: bool = true;
    fn scaled(self, c: f32) -> f32 {
        self * c
    }
    fn pack_keys(k: &[f32], row0: usize, valid: usize, d: usize, width: usize, dst: &mut [f32]) {
        pack_transposed(k, row0, valid, d, width, dst);
    }
    unsafe fn scores(isa: Isa, rows: usize, width: usize, d: usize, q: &[f32], kt: &[f32], s: &mut [f32]) {
        gemm(isa, rows, width, d, q.as_ptr(), d, kt.as_ptr(), width, s.as_mut_ptr(), width, false)
    }
    fn pack_values(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {}
    unsafe fn accumulate(
        isa: Isa,
        rows: usize,
        dv: usize,
        valid: usize,
        width: usize,
        p: &[f32],
        v: &[f32],
        _: &[f32],
        _: &mut Vec<f32>,
        acc: &mut [f32],
    ) {
        gemm(isa, rows, dv, valid, p.as_ptr(), width, v.as_ptr(), dv, acc.as_mut_ptr(), dv, true)
    }
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn all_finite(xs: &[f32]) -> bool {
        super::all_finite_bits(xs, |x| x.to_bits(), 0x7f80_0000)
    }
}

/// A bf16 value as its bits (the upper half of an f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Operand for Bf16 {
    const PACKS_VALUES: bool = true;
    const PRESCALE: bool = false;
    fn scaled(self, _: f32) -> Bf16 {
        self
    }
    /// Pairs along the head dimension: `dst[(p·width + c)·2 + e] = k[c][2p + e]`.
    fn pack_keys(k: &[Bf16], row0: usize, valid: usize, d: usize, width: usize, dst: &mut [Bf16]) {
        dst[..d * width].fill(Bf16(0));
        for c in 0..valid {
            let row = &k[(row0 + c) * d..(row0 + c + 1) * d];
            for (dd, &x) in row.iter().enumerate() {
                dst[((dd / 2) * width + c) * 2 + dd % 2] = x;
            }
        }
    }
    unsafe fn scores(_: Isa, rows: usize, width: usize, d: usize, q: &[Bf16], kt: &[Bf16], s: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        super::bf16::gemm_bf16(
            rows,
            width,
            d / 2,
            q.as_ptr() as *const u32,
            d / 2,
            kt.as_ptr() as *const u16,
            s.as_mut_ptr(),
            width,
            false,
        );
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 dot products need x86-64 ({rows}, {width}, {d}, {}, {}, {})", q.len(), kt.len(), s.len());
    }
    /// Pairs along the keys: `dst[(p·dv + e)·2 + x] = v[2p + x][e]`, zero rows up to `width`.
    fn pack_values(v: &[Bf16], row0: usize, valid: usize, dv: usize, width: usize, dst: &mut [Bf16]) {
        dst[..width * dv].fill(Bf16(0));
        for j in 0..valid {
            let row = &v[(row0 + j) * dv..(row0 + j + 1) * dv];
            for (e, &x) in row.iter().enumerate() {
                dst[((j / 2) * dv + e) * 2 + j % 2] = x;
            }
        }
    }
    unsafe fn accumulate(
        _: Isa,
        rows: usize,
        dv: usize,
        _valid: usize,
        width: usize,
        p: &[f32],
        _: &[Bf16],
        packed: &[Bf16],
        scratch: &mut Vec<Bf16>,
        acc: &mut [f32],
    ) {
        // Probabilities go to bf16 for the product (FlashAttention does the same); sums stay f32.
        scratch.resize(rows * width, Bf16(0));
        #[cfg(target_arch = "x86_64")]
        super::bf16::convert_to_bf16(&p[..rows * width], scratch.as_mut_ptr() as *mut u16);
        #[cfg(target_arch = "x86_64")]
        super::bf16::gemm_bf16(
            rows,
            dv,
            width / 2,
            scratch.as_ptr() as *const u32,
            width / 2,
            packed.as_ptr() as *const u16,
            acc.as_mut_ptr(),
            dv,
            true,
        );
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 dot products need x86-64 ({dv}, {}, {})", packed.len(), acc.len());
    }
    fn from_f32(x: f32) -> Bf16 {
        Bf16(super::bf16::f32_to_bf16(x))
    }
    fn to_f32(self) -> f32 {
        super::bf16::bf16_to_f32(self.0)
    }
    fn all_finite(xs: &[Bf16]) -> bool {
        super::all_finite_bits(xs, |x| x.0 as u32, 0x7f80)
    }
}

/// Scores of query rows `i0..i0+rows` of `(b, h)` against keys `j0..j0+valid`, into `s` (`rows × width`, `width` =
/// `valid` rounded up to [`QUANTUM`]): `scale·q·k`, the score mod, the mask (invisible and padding columns −∞).
/// `q_rows` starts at the tile's first query row; `scale` is `None` when those rows are already scaled. When `raw`
/// is given it receives the scaled scores before the score mod (the backward needs them for the chain rule). `kt`
/// is the packed key tile.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn score_tile<E: Operand, M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    kind: TileKind,
    (b, h, i0, rows): (usize, usize, usize, usize),
    (j0, valid, width): (usize, usize, usize),
    q_rows: &[E],
    scale: Option<f32>,
    kt: &[E],
    s: &mut [f32],
    mut raw: Option<&mut [f32]>,
) {
    // SAFETY: q_rows holds rows × D, kt the packed tile, s holds rows × width; width % QUANTUM == 0.
    unsafe { E::scores(cfg.isa, rows, width, dims.d, q_rows, kt, s) };
    if !F::ACTIVE && kind == TileKind::Full && scale.is_none() && valid == width {
        return; // nothing to do per element: the common case of an unmasked interior tile
    }
    for r in 0..rows {
        let i = i0 + r;
        let row = &mut s[r * width..(r + 1) * width];
        let (live, pad) = row.split_at_mut(valid);
        if let Some(c) = scale {
            live.iter_mut().for_each(|x| *x *= c);
        }
        if let Some(raw) = raw.as_deref_mut() {
            raw[r * width..r * width + valid].copy_from_slice(live);
        }
        if F::ACTIVE {
            score.apply(b, h, i, j0, live);
        }
        if kind == TileKind::Partial {
            for (x, v) in live.iter_mut().enumerate() {
                if !mask.visible(b, h, i, j0 + x) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        pad.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    }
}

/// Packs keys `j0..j0+valid` of K/V head `(b, g)` transposed: `kt[dd·width + x] = k[j0 + x][dd]`, zero padding.
pub(crate) fn pack_transposed(src: &[f32], row0: usize, valid: usize, cols: usize, width: usize, dst: &mut [f32]) {
    for dd in 0..cols {
        let out = &mut dst[dd * width..(dd + 1) * width];
        for (x, o) in out.iter_mut().enumerate().take(valid) {
            *o = src[(row0 + x) * cols + dd];
        }
        out[valid..].iter_mut().for_each(|o| *o = 0.0);
    }
}

/// Applies inverted dropout to the probabilities of a tile in place.
pub(crate) fn dropout_tile(
    dims: &FlashDims,
    (p, seed): (f64, u64),
    (b, h, i0, rows): (usize, usize, usize, usize),
    (j0, valid, width): (usize, usize, usize),
    tile: &mut [f32],
) {
    let th = drop_threshold(p);
    let scale = (1.0 / (1.0 - p)) as f32;
    for r in 0..rows {
        let base = dropout_index(dims, b, h, i0 + r, j0);
        for (x, v) in tile[r * width..r * width + valid].iter_mut().enumerate() {
            *v = if keep(seed, base + x as u64, th) { *v * scale } else { 0.0 };
        }
    }
}

/// Forward pass. Writes `o (B, H, T, Dv)` and `lse (B, H, T)` (−∞ where a query sees no key; its output row is 0).
///
/// # Errors
/// Buffer lengths that disagree with `dims`, or settings the kernel cannot run (see [`FlashConfig::check`]).
#[allow(clippy::too_many_arguments)]
pub fn flash_forward<M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<(), FlashError> {
    forward::<f32, M, F>(dims, cfg, mask, score, q, k, v, o, lse)
}

/// [`flash_forward`] on bf16 storage with AVX512-BF16 dot products (f32 accumulation, f32 softmax).
///
/// # Errors
/// As [`flash_forward`], and when the CPU lacks AVX512-BF16 ([`bf16_dot_supported`](super::bf16::bf16_dot_supported);
/// callers convert to f32 then).
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_bf16<M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    q: &[Bf16],
    k: &[Bf16],
    v: &[Bf16],
    o: &mut [Bf16],
    lse: &mut [f32],
) -> Result<(), FlashError> {
    require!(super::bf16::bf16_dot_supported(), "flash_forward_bf16: this CPU has no AVX512-BF16 dot products");
    forward::<Bf16, M, F>(dims, cfg, mask, score, q, k, v, o, lse)
}

#[allow(clippy::too_many_arguments)]
fn forward<E: Operand, M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    q: &[E],
    k: &[E],
    v: &[E],
    o: &mut [E],
    lse: &mut [f32],
) -> Result<(), FlashError> {
    dims.check(q.len(), k.len(), v.len())?;
    cfg.check()?;
    // B·H·T cannot overflow: `check` bounded B·H·T·D with D ≥ 1; the output length is checked.
    let (on, ln) = (dims.out_len()?, dims.b * dims.h * dims.t);
    require!(
        o.len() == on && lse.len() == ln,
        "flash attention: o has {} elements, lse {}; expected {on} and {ln} for {dims:?}",
        o.len(),
        lse.len()
    );
    let FlashDims { b: nb, h: nh, hkv, t, s, .. } = *dims;
    let (br, bc) = (cfg.block_q, cfg.block_k);
    let group = nh / hkv;
    let q_blocks = t.div_ceil(br);
    let key_tiles = s.div_ceil(bc);
    // A masked key has probability exactly 0, but 0 · NaN is NaN: with non-finite values, partially masked tiles
    // skip invisible keys one by one instead of multiplying them in. (NaN in q or k needs nothing: the mask
    // overwrites invisible scores with −∞.)
    let inp = Inputs { dims, cfg, mask, score, q, k, v, careful: !E::all_finite(v) };
    let splits = kv_splits(nb * hkv * q_blocks, key_tiles);
    if splits > 1 {
        return Ok(split_kv(&inp, splits, o, lse));
    }
    // A task serves one K/V head: it packs that head's keys (and values) once, then runs every query head of the
    // group over its query blocks. Heads are split into interleaved query-block chunks when there are fewer heads
    // than threads (interleaving evens out causal work, which grows with the query index).
    let chunks = (4 * rayon::current_num_threads()).div_ceil(nb * hkv).clamp(1, q_blocks);
    let (o_ptr, lse_ptr) = (SyncPtr(o.as_mut_ptr()), SyncPtr(lse.as_mut_ptr()));
    (0..nb * hkv * chunks).into_par_iter().for_each(|task| {
        let (kvh, chunk) = (task / chunks, task % chunks);
        let b = kvh / hkv;
        let packed = inp.pack(kvh, 0..key_tiles);
        let mut run = Running::new(cfg, dims.dv);
        for qb in (chunk..q_blocks).step_by(chunks) {
            for h in (kvh % hkv) * group..(kvh % hkv + 1) * group {
                let bh = b * nh + h;
                let (i0, rows) = (qb * br, br.min(t - qb * br));
                inp.stream_rows(&packed, 0..key_tiles, (b, h, kvh, i0, rows), &mut run);
                // SAFETY: this task alone writes rows i0..i0+rows of head (b, h).
                let out =
                    unsafe { std::slice::from_raw_parts_mut(o_ptr.get().add((bh * t + i0) * dims.dv), rows * dims.dv) };
                let lse_out = unsafe { std::slice::from_raw_parts_mut(lse_ptr.get().add(bh * t + i0), rows) };
                run.finish(rows, out, lse_out);
            }
        }
    });
    Ok(())
}

/// Key splits for "flash decoding" (Dao et al. 2023): when query blocks × K/V heads make fewer than
/// [`DECODE_TASKS`] tasks (one sequence decoding one token), each head's keys are cut into ranges that threads stream
/// in parallel, merged after by their log-sum-exp. Each range keeps at least two key tiles, so short caches are not
/// split. The count depends on the shape only, never on the pool, so every machine computes the same bits.
pub fn kv_splits(tasks: usize, key_tiles: usize) -> usize {
    if tasks >= DECODE_TASKS {
        return 1;
    }
    DECODE_TASKS.div_ceil(tasks.max(1)).min(key_tiles / 2).max(1)
}

/// Tasks the forward aims for when it splits keys: enough for 32 threads at one task each.
pub const DECODE_TASKS: usize = 32;

/// The inputs every task reads.
struct Inputs<'a, E, M, F> {
    dims: &'a FlashDims,
    cfg: &'a FlashConfig,
    mask: &'a M,
    score: &'a F,
    q: &'a [E],
    k: &'a [E],
    v: &'a [E],
    careful: bool,
}

/// Key (and value) tiles of one K/V head packed for the products, from the first tile of a range.
struct Packed<E> {
    keys: Vec<E>,
    values: Vec<E>,
    k_stride: usize,
    v_stride: usize,
}

/// One task's online-softmax state for a block of query rows, and its scratch space.
struct Running<E> {
    st: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    scratch: Vec<E>,
    qs: Vec<E>,
}

impl<E: Operand> Running<E> {
    fn new(cfg: &FlashConfig, dv: usize) -> Self {
        let (br, bc) = (cfg.block_q, cfg.block_k);
        let f = |n| vec![0f32; n];
        Self { st: f(br * bc), acc: f(br * dv), m: f(br), l: f(br), alpha: f(br), scratch: Vec::new(), qs: Vec::new() }
    }

    /// `O = acc / l` and `lse = m + ln l` for `rows` rows; a row that saw no key is 0 with lse −∞.
    fn finish(&self, rows: usize, out: &mut [E], lse: &mut [f32]) {
        let dv = out.len() / rows.max(1);
        for r in 0..rows {
            let row = &mut out[r * dv..(r + 1) * dv];
            if self.l[r] == 0.0 {
                row.fill(E::from_f32(0.0));
                lse[r] = f32::NEG_INFINITY;
            } else {
                let inv = 1.0 / self.l[r];
                row.iter_mut().zip(&self.acc[r * dv..(r + 1) * dv]).for_each(|(o, a)| *o = E::from_f32(a * inv));
                lse[r] = self.m[r] + self.l[r].ln();
            }
        }
    }
}

impl<E: Operand, M: MaskMod, F: ScoreMod> Inputs<'_, E, M, F> {
    /// Packs the key tiles `tiles` of K/V head `kvh` (flattened `b·Hkv + g`).
    fn pack(&self, kvh: usize, tiles: std::ops::Range<usize>) -> Packed<E> {
        let FlashDims { s, d, dv, .. } = *self.dims;
        let bc = self.cfg.block_k;
        let (k_stride, v_stride) = (d * bc, if E::PACKS_VALUES { bc * dv } else { 0 });
        let n = tiles.len();
        let mut keys = vec![E::default(); n * k_stride];
        let mut values = vec![E::default(); n * v_stride];
        for (slot, tile) in tiles.enumerate() {
            let (j0, valid) = (tile * bc, bc.min(s - tile * bc));
            let width = round_up(valid, QUANTUM);
            E::pack_keys(self.k, kvh * s + j0, valid, d, width, &mut keys[slot * k_stride..]);
            if E::PACKS_VALUES {
                E::pack_values(self.v, kvh * s + j0, valid, dv, width, &mut values[slot * v_stride..]);
            }
        }
        Packed { keys, values, k_stride, v_stride }
    }

    /// Streams query rows `i0..i0 + rows` of head `(b, h)` over key tiles `tiles` (packed in `packed` from
    /// `tiles.start`) into `run`'s `m`, `l` and `acc`, which start afresh.
    fn stream_rows(
        &self,
        packed: &Packed<E>,
        tiles: std::ops::Range<usize>,
        (b, h, kvh, i0, rows): (usize, usize, usize, usize, usize),
        run: &mut Running<E>,
    ) {
        let (dims, cfg) = (self.dims, self.cfg);
        let FlashDims { h: nh, t, s, d, dv, .. } = *dims;
        let bc = cfg.block_k;
        let bh = b * nh + h;
        run.m[..rows].fill(f32::NEG_INFINITY);
        run.l[..rows].fill(0.0);
        run.acc[..rows * dv].fill(0.0);
        if E::PRESCALE {
            // Scale once per query block instead of once per score.
            run.qs.clear();
            run.qs.extend(self.q[(bh * t + i0) * d..][..rows * d].iter().map(|&x| x.scaled(cfg.scale)));
        }
        let first = tiles.start;
        for tile in tiles {
            let (j0, valid) = (tile * bc, bc.min(s - tile * bc));
            let kind = self.mask.classify(b, h, i0, i0 + rows, j0, j0 + valid);
            if kind == TileKind::Empty {
                continue;
            }
            let width = round_up(valid, QUANTUM);
            let slot = tile - first;
            let kt = &packed.keys[slot * packed.k_stride..(slot + 1) * packed.k_stride];
            let q_rows = if E::PRESCALE { &run.qs[..] } else { &self.q[(bh * t + i0) * d..] };
            let scale = if E::PRESCALE { None } else { Some(cfg.scale) };
            let (tile_ids, keys) = ((b, h, i0, rows), (j0, valid, width));
            score_tile(dims, cfg, self.mask, self.score, kind, tile_ids, keys, q_rows, scale, kt, &mut run.st, None);
            // SAFETY: st holds rows × width; acc rows × dv; v holds `valid` rows of dv from the tile start.
            unsafe {
                online_softmax(
                    cfg.isa,
                    run.st.as_mut_ptr(),
                    width,
                    rows,
                    width,
                    &mut run.m,
                    &mut run.l,
                    &mut run.alpha,
                );
                scale_rows(cfg.isa, run.acc.as_mut_ptr(), dv, rows, dv, &run.alpha);
            }
            if let Some(dp) = cfg.dropout {
                dropout_tile(dims, dp, tile_ids, keys, &mut run.st);
            }
            let v_tile = &self.v[(kvh * s + j0) * dv..];
            if self.careful && kind == TileKind::Partial {
                careful_accumulate(self.mask, tile_ids, keys, dv, &run.st, v_tile, &mut run.acc);
            } else {
                let pv = &packed.values[slot * packed.v_stride..(slot + 1) * packed.v_stride];
                // SAFETY: st holds rows × width, acc rows × dv, the packed tile what pack_values wrote.
                unsafe {
                    E::accumulate(cfg.isa, rows, dv, valid, width, &run.st, v_tile, pv, &mut run.scratch, &mut run.acc)
                };
            }
        }
    }
}

/// Flash decoding: every (K/V head, key range) is a task writing an unnormalised partial `(m, l, acc)` for every
/// query row of its heads; the partials of a row then merge exactly: `M = max m_s`, `L = Σ l_s e^{m_s − M}`,
/// `O = Σ acc_s e^{m_s − M} / L`, `lse = M + ln L`.
fn split_kv<E: Operand, M: MaskMod, F: ScoreMod>(inp: &Inputs<E, M, F>, splits: usize, o: &mut [E], lse: &mut [f32]) {
    let FlashDims { b: nb, h: nh, hkv, t, s, dv, .. } = *inp.dims;
    let (br, bc) = (inp.cfg.block_q, inp.cfg.block_k);
    let (group, q_blocks, key_tiles) = (nh / hkv, t.div_ceil(br), s.div_ceil(bc));
    let rows_total = nb * nh * t;
    let (mut pm, mut pl, mut pacc) = (
        vec![f32::NEG_INFINITY; splits * rows_total],
        vec![0f32; splits * rows_total],
        vec![0f32; splits * rows_total * dv],
    );
    let (pm_ptr, pl_ptr, pacc_ptr) = (SyncPtr(pm.as_mut_ptr()), SyncPtr(pl.as_mut_ptr()), SyncPtr(pacc.as_mut_ptr()));
    (0..nb * hkv * splits).into_par_iter().for_each(|task| {
        let (kvh, split) = (task / splits, task % splits);
        let b = kvh / hkv;
        let tiles = split * key_tiles / splits..(split + 1) * key_tiles / splits;
        let packed = inp.pack(kvh, tiles.clone());
        let mut run = Running::new(inp.cfg, dv);
        for qb in 0..q_blocks {
            for h in (kvh % hkv) * group..(kvh % hkv + 1) * group {
                let (i0, rows) = (qb * br, br.min(t - qb * br));
                inp.stream_rows(&packed, tiles.clone(), (b, h, kvh, i0, rows), &mut run);
                let row0 = split * rows_total + (b * nh + h) * t + i0;
                // SAFETY: rows row0..row0+rows of split `split` belong to this task alone.
                unsafe {
                    std::slice::from_raw_parts_mut(pm_ptr.get().add(row0), rows).copy_from_slice(&run.m[..rows]);
                    std::slice::from_raw_parts_mut(pl_ptr.get().add(row0), rows).copy_from_slice(&run.l[..rows]);
                    std::slice::from_raw_parts_mut(pacc_ptr.get().add(row0 * dv), rows * dv)
                        .copy_from_slice(&run.acc[..rows * dv]);
                }
            }
        }
    });
    o.par_chunks_mut(dv).zip(lse.par_iter_mut()).enumerate().for_each(|(row, (out, lse))| {
        let at = |sp: usize| sp * rows_total + row;
        let big = (0..splits).map(|sp| pm[at(sp)]).fold(f32::NEG_INFINITY, f32::max);
        let weight = |sp: usize| if pl[at(sp)] == 0.0 { 0.0 } else { (pm[at(sp)] - big).exp() };
        let total: f32 = (0..splits).map(|sp| pl[at(sp)] * weight(sp)).sum();
        if total == 0.0 {
            out.fill(E::from_f32(0.0));
            *lse = f32::NEG_INFINITY;
            return;
        }
        let mut acc = vec![0f32; dv];
        for sp in (0..splits).filter(|&sp| pl[at(sp)] != 0.0) {
            let w = weight(sp);
            acc.iter_mut().zip(&pacc[at(sp) * dv..(at(sp) + 1) * dv]).for_each(|(a, &x)| *a += w * x);
        }
        out.iter_mut().zip(&acc).for_each(|(o, &a)| *o = E::from_f32(a / total));
        *lse = big + total.ln();
    });
}

/// `acc (rows × dv) += P V` over the visible keys of a tile only: a masked key contributes nothing, even when its
/// value is NaN or ±∞ (the matrix product would add `0 · NaN`).
pub(crate) fn careful_accumulate<E: Operand, M: MaskMod>(
    mask: &M,
    (b, h, i0, rows): (usize, usize, usize, usize),
    (j0, valid, width): (usize, usize, usize),
    dv: usize,
    p: &[f32],
    v: &[E],
    acc: &mut [f32],
) {
    for r in 0..rows {
        let out = &mut acc[r * dv..(r + 1) * dv];
        for x in (0..valid).filter(|&x| mask.visible(b, h, i0 + r, j0 + x)) {
            let pr = p[r * width + x];
            out.iter_mut().zip(&v[x * dv..(x + 1) * dv]).for_each(|(o, &vv)| *o += pr * vv.to_f32());
        }
    }
}

/// The attention probabilities `(T, S)` of one `(b, h)`, recomputed from the saved log-sum-exp — for looking at
/// what a head attends to without running the materialised path. Dropout is not applied.
#[allow(clippy::too_many_arguments)]
pub fn flash_probabilities<M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    q: &[f32],
    k: &[f32],
    lse: &[f32],
    b: usize,
    h: usize,
) -> Result<Vec<f32>, FlashError> {
    let FlashDims { h: nh, hkv, t, s, d, .. } = *dims;
    dims.check_sizes()?;
    cfg.check()?;
    require!(
        q.len() == dims.b * nh * t * d && k.len() == dims.b * hkv * s * d,
        "flash attention: q has {} elements, k {}; expected them to match {dims:?}",
        q.len(),
        k.len()
    );
    require!(
        b < dims.b && h < nh && lse.len() == dims.b * nh * t,
        "flash attention: head ({b}, {h}) or lse length {} do not fit {dims:?}",
        lse.len()
    );
    let kvh = b * hkv + h / (nh / hkv);
    let (br, bc) = (cfg.block_q, cfg.block_k);
    let mut probs = vec![0f32; t * s];
    let (mut kt, mut st) = (vec![0f32; d * bc], vec![0f32; br * bc]);
    for j0 in (0..s).step_by(bc) {
        let valid = bc.min(s - j0);
        let width = round_up(valid, QUANTUM);
        f32::pack_keys(k, kvh * s + j0, valid, d, width, &mut kt);
        for i0 in (0..t).step_by(br) {
            let rows = br.min(t - i0);
            let kind = mask.classify(b, h, i0, i0 + rows, j0, j0 + valid);
            if kind == TileKind::Empty {
                continue;
            }
            let q_rows = &q[((b * nh + h) * t + i0) * d..];
            let (tile, keys) = ((b, h, i0, rows), (j0, valid, width));
            score_tile(dims, cfg, mask, score, kind, tile, keys, q_rows, Some(cfg.scale), &kt, &mut st, None);
            let lse_rows = &lse[(b * nh + h) * t + i0..][..rows];
            // SAFETY: st holds rows × width.
            unsafe { super::rows::exp_minus_lse(cfg.isa, st.as_mut_ptr(), width, rows, width, lse_rows) };
            for r in 0..rows {
                let row = &mut probs[(i0 + r) * s + j0..][..valid];
                row.copy_from_slice(&st[r * width..r * width + valid]);
                if kind == TileKind::Partial && lse_rows[r].is_nan() {
                    // exp(−∞ − NaN) is NaN: a hidden key's probability is 0 whatever the row holds.
                    for (x, p) in row.iter_mut().enumerate() {
                        if !mask.visible(b, h, i0 + r, j0 + x) {
                            *p = 0.0;
                        }
                    }
                }
            }
        }
    }
    Ok(probs)
}
