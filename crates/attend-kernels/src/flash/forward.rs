//! Forward pass: for each query tile, stream over key tiles with an online softmax.
//!
//! Per tile (FlashAttention-2, Algorithm 1): `S = Q Kᵀ·scale` → score mod → mask → `m' = max(m, rowmax S)`,
//! `P = exp(S − m')`, `l = l·e^{m−m'} + rowsum P`, `O = O·e^{m−m'} + P V`; at the end `O /= l`, `lse = m + ln l`.

use rayon::prelude::*;

use super::masks::{MaskMod, ScoreMod, TileKind};
use super::tile::{gemm, online_softmax, scale_rows, QUANTUM};
use super::{dropout_index, round_up, FlashConfig, FlashDims, SyncPtr};
use crate::dropout::{drop_threshold, keep};

/// Scores of query rows `i0..i0+rows` of `(b, h)` against keys `j0..j0+valid`, into `s` (`rows × width`, `width` =
/// `valid` rounded up to [`QUANTUM`]): `scale·q·k`, the score mod, the mask (invisible and padding columns −∞).
/// When `raw` is given it receives the scaled scores before the score mod (the backward needs them for the chain
/// rule). `kt` is the packed `Kᵀ` tile (`D × width`).
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn score_tile<M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    kind: TileKind,
    (b, h, i0, rows): (usize, usize, usize, usize),
    (j0, valid, width): (usize, usize, usize),
    q: &[f32],
    kt: &[f32],
    s: &mut [f32],
    mut raw: Option<&mut [f32]>,
) {
    let d = dims.d;
    let qrow = ((b * dims.h + h) * dims.t + i0) * d;
    // SAFETY: q holds rows × D from qrow, kt holds D × width, s holds rows × width; width % QUANTUM == 0.
    unsafe { gemm(cfg.isa, rows, width, d, q[qrow..].as_ptr(), d, kt.as_ptr(), width, s.as_mut_ptr(), width, false) };
    for r in 0..rows {
        let i = i0 + r;
        let row = &mut s[r * width..(r + 1) * width];
        let (live, pad) = row.split_at_mut(valid);
        live.iter_mut().for_each(|x| *x *= cfg.scale);
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
    (p, seed): (f32, u64),
    (b, h, i0, rows): (usize, usize, usize, usize),
    (j0, valid, width): (usize, usize, usize),
    tile: &mut [f32],
) {
    let th = drop_threshold(p as f64);
    let scale = 1.0 / (1.0 - p);
    for r in 0..rows {
        let base = dropout_index(dims, b, h, i0 + r, j0);
        for (x, v) in tile[r * width..r * width + valid].iter_mut().enumerate() {
            *v = if keep(seed, base + x as u64, th) { *v * scale } else { 0.0 };
        }
    }
}

/// Forward pass. Writes `o (B, H, T, Dv)` and `lse (B, H, T)` (−∞ where a query sees no key; its output row is 0).
///
/// Panics if buffer lengths disagree with `dims` (callers validate first).
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
) {
    dims.check(q.len(), k.len(), v.len()).unwrap();
    assert!(o.len() == dims.b * dims.h * dims.t * dims.dv && lse.len() == dims.b * dims.h * dims.t);
    assert!(cfg.isa.supported() && cfg.block_k % QUANTUM == 0 && cfg.block_q > 0);
    let FlashDims { b: nb, h: nh, hkv, t, s, d, dv } = *dims;
    let (br, bc) = (cfg.block_q, cfg.block_k);
    let group = nh / hkv;
    let q_blocks = t.div_ceil(br);
    let (o_ptr, lse_ptr) = (SyncPtr(o.as_mut_ptr()), SyncPtr(lse.as_mut_ptr()));

    (0..nb * nh * q_blocks).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; d * bc],
                vec![0f32; br * bc],
                vec![0f32; br * dv],
                vec![0f32; br],
                vec![0f32; br],
                vec![0f32; br],
            )
        },
        |(kt, st, acc, m, l, alpha), task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (b, h) = (bh / nh, bh % nh);
            let kvh = b * hkv + h / group;
            let i0 = qb * br;
            let rows = br.min(t - i0);
            m[..rows].fill(f32::NEG_INFINITY);
            l[..rows].fill(0.0);
            acc[..rows * dv].fill(0.0);
            for j0 in (0..s).step_by(bc) {
                let valid = bc.min(s - j0);
                let kind = mask.classify(b, h, i0, i0 + rows, j0, j0 + valid);
                if kind == TileKind::Empty {
                    continue;
                }
                let width = round_up(valid, QUANTUM);
                pack_transposed(k, kvh * s + j0, valid, d, width, kt);
                score_tile(dims, cfg, mask, score, kind, (b, h, i0, rows), (j0, valid, width), q, kt, st, None);
                // SAFETY: st holds rows × width; acc rows × dv; v holds `valid` rows of dv from the tile start.
                unsafe {
                    online_softmax(cfg.isa, st.as_mut_ptr(), width, rows, width, m, l, alpha);
                    scale_rows(cfg.isa, acc.as_mut_ptr(), dv, rows, dv, alpha);
                }
                if let Some(dp) = cfg.dropout {
                    dropout_tile(dims, dp, (b, h, i0, rows), (j0, valid, width), st);
                }
                unsafe {
                    let vt = v[(kvh * s + j0) * dv..].as_ptr();
                    gemm(cfg.isa, rows, dv, valid, st.as_ptr(), width, vt, dv, acc.as_mut_ptr(), dv, true);
                }
            }
            // SAFETY: this task alone writes rows i0..i0+rows of head (b, h).
            let out = unsafe { std::slice::from_raw_parts_mut(o_ptr.get().add((bh * t + i0) * dv), rows * dv) };
            let lse_out = unsafe { std::slice::from_raw_parts_mut(lse_ptr.get().add(bh * t + i0), rows) };
            for r in 0..rows {
                let row = &mut out[r * dv..(r + 1) * dv];
                if l[r] == 0.0 {
                    row.fill(0.0);
                    lse_out[r] = f32::NEG_INFINITY;
                } else {
                    let inv = 1.0 / l[r];
                    row.iter_mut().zip(&acc[r * dv..(r + 1) * dv]).for_each(|(o, a)| *o = a * inv);
                    lse_out[r] = m[r] + l[r].ln();
                }
            }
        },
    );
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
) -> Vec<f32> {
    let FlashDims { h: nh, hkv, t, s, d, .. } = *dims;
    assert!(b < dims.b && h < nh && lse.len() == dims.b * nh * t);
    let kvh = b * hkv + h / (nh / hkv);
    let (br, bc) = (cfg.block_q, cfg.block_k);
    let mut probs = vec![0f32; t * s];
    let (mut kt, mut st) = (vec![0f32; d * bc], vec![0f32; br * bc]);
    for j0 in (0..s).step_by(bc) {
        let valid = bc.min(s - j0);
        let width = round_up(valid, QUANTUM);
        pack_transposed(k, kvh * s + j0, valid, d, width, &mut kt);
        for i0 in (0..t).step_by(br) {
            let rows = br.min(t - i0);
            let kind = mask.classify(b, h, i0, i0 + rows, j0, j0 + valid);
            if kind == TileKind::Empty {
                continue;
            }
            score_tile(dims, cfg, mask, score, kind, (b, h, i0, rows), (j0, valid, width), q, &kt, &mut st, None);
            let lse_rows = &lse[(b * nh + h) * t + i0..][..rows];
            // SAFETY: st holds rows × width.
            unsafe { super::tile::exp_minus_lse(cfg.isa, st.as_mut_ptr(), width, rows, width, lse_rows) };
            for r in 0..rows {
                probs[(i0 + r) * s + j0..][..valid].copy_from_slice(&st[r * width..r * width + valid]);
            }
        }
    }
    probs
}
