//! Backward pass (FlashAttention-2, Algorithm 2): for each key tile, recompute `P = exp(S − lse)` for every query
//! tile and accumulate
//!
//! ```text
//! dV_j += Pᵀ dO_i                       (dropout: the dropped P)
//! dP    = dO_i V_jᵀ                      (dropout: times the same mask / (1 − p))
//! dS    = P ⊙ (dP − Δ_i),  Δ_i = rowsum(dO_i ⊙ O_i)
//! dS   ← dS ⊙ f'(s)                     (score mod chain rule, e.g. soft-cap)
//! dQ_i += scale · dS K_j,  dK_j += scale · dSᵀ Q_i
//! ```
//!
//! Work is split over `(b, Hkv, key split)`: a task owns its key rows of dK/dV (no atomics) and, when there is one
//! split per head, the dQ rows of the query heads that share the K/V head. With few K/V heads, keys are dealt
//! round-robin into several splits; each split after the first writes its own partial dQ, summed afterwards in a
//! fixed order. Query rows run in passes sized so that one pass's partials fit [`PARTIAL_DQ_BUDGET`]: memory is
//! bounded by rows, never by giving up the split. The split depends on the shape alone, so results do not depend
//! on the thread count.

use rayon::prelude::*;

use super::forward::{dropout_tile, pack_transposed, score_tile, Operand};
use super::gemm::{gemm, gemm_strided, Init, QUANTUM};
use super::masks::{MaskMod, ScoreMod, TileKind};
use super::rows::{exp_minus_lse, softmax_grad};
use super::{require, round_up, FlashConfig, FlashDims, FlashError, SyncPtr};

/// Most bytes spent on partial dQ buffers when keys are split across tasks.
pub const PARTIAL_DQ_BUDGET: usize = 32 << 20;

/// Tasks the backward aims for at least (enough for the machines this runs on); fewer K/V heads than this split keys.
/// A constant, not the thread count, so that results do not depend on the machine.
const MIN_TASKS: usize = 16;

/// Backward pass: given the forward's inputs, `o`, `lse` and `dout`, writes `dq`, `dk`, `dv` (overwritten).
///
/// # Errors
/// Buffer lengths that disagree with `dims`, or settings the kernel cannot run (see [`FlashConfig::check`]).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward<M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dvv: &mut [f32],
) -> Result<(), FlashError> {
    dims.check(q.len(), k.len(), v.len())?;
    cfg.check()?;
    // B·H·T cannot overflow: `check` bounded B·H·T·D with D ≥ 1; the output length is checked.
    let (on, ln) = (dims.out_len()?, dims.b * dims.h * dims.t);
    require!(
        o.len() == on && dout.len() == on && lse.len() == ln,
        "flash attention backward: o {}, dout {}, lse {} elements; expected {on}, {on}, {ln} for {dims:?}",
        o.len(),
        dout.len(),
        lse.len()
    );
    require!(
        dq.len() == q.len() && dk.len() == k.len() && dvv.len() == v.len(),
        "flash attention backward: dq {}, dk {}, dv {} elements must match q {}, k {}, v {}",
        dq.len(),
        dk.len(),
        dvv.len(),
        q.len(),
        k.len(),
        v.len()
    );
    let FlashDims { b: nb, h: nh, hkv, t, s, d, dv } = *dims;
    let (br, bc) = (cfg.block_q, cfg.block_k);
    let group = nh / hkv;
    // With a NaN or ±∞ anywhere, partially masked tiles sum over visible pairs only (see `careful_tile`): a masked
    // pair has P = dS = 0 exactly, but the products would add 0 · NaN into rows and keys that never met.
    let careful =
        ![q, k, v, dout].into_iter().all(f32::all_finite) || lse.iter().any(|&l| l.is_nan() || l == f32::INFINITY);

    // Δ_i = Σ_d dO·O per query row.
    let mut delta = vec![0f32; nb * nh * t];
    delta.par_iter_mut().enumerate().with_min_len(256).for_each(|(r, x)| {
        *x = o[r * dv..(r + 1) * dv].iter().zip(&dout[r * dv..(r + 1) * dv]).map(|(a, b)| a * b).sum();
    });

    // The split (see the module docs) depends on the shape only, never on the thread count.
    let key_blocks = s.div_ceil(bc);
    let splits = MIN_TASKS.div_ceil(nb * hkv).clamp(1, key_blocks);
    // Query rows go in passes small enough that the partials of one pass fit the budget (but at least one tile of
    // rows, which may exceed it for very many heads): memory is bounded by rows, and however few K/V heads there
    // are (single-sequence MQA), every split keeps its own task.
    let per_row = (splits - 1) * nb * nh * d * 4;
    let rows_per_pass = match cfg.dq_budget.checked_div(per_row) {
        None => t,
        Some(rows) => (rows / br * br).clamp(br, round_up(t, br)),
    };
    let pass_len = nb * nh * rows_per_pass * d;
    let mut partial = vec![0f32; (splits - 1) * pass_len];
    dq.fill(0.0);
    dk.fill(0.0);
    dvv.fill(0.0);

    for r0 in (0..t).step_by(rows_per_pass) {
        let r1 = (r0 + rows_per_pass).min(t);
        partial.fill(0.0);
        // Taken afresh each pass: the reduction below borrows dQ mutably, which ends the previous pointers' loans.
        let (dq_ptr, partial_ptr) = (SyncPtr(dq.as_mut_ptr()), SyncPtr(partial.as_mut_ptr()));
        let (dk_ptr, dv_ptr) = (SyncPtr(dk.as_mut_ptr()), SyncPtr(dvv.as_mut_ptr()));
        (0..nb * hkv * splits).into_par_iter().for_each(|task| {
            let (kvh, split) = (task / splits, task % splits);
            let b = kvh / hkv;
            let g = kvh % hkv;
            // Where dQ of query row i of (b, h) goes: the output itself for split 0, this split's partial otherwise.
            let dq_row = |bh: usize, i: usize| -> *mut f32 {
                // SAFETY: in bounds of dq (i < T) or of this split's partial (r0 ≤ i < r1).
                unsafe {
                    if split == 0 {
                        dq_ptr.get().add((bh * t + i) * d)
                    } else {
                        partial_ptr.get().add((split - 1) * pass_len + (bh * rows_per_pass + i - r0) * d)
                    }
                }
            };
            let mut kt = vec![0f32; d * bc];
            let mut vt = vec![0f32; dv * bc];
            let mut st = vec![0f32; br * bc];
            let mut raw = vec![0f32; if F::ACTIVE { br * bc } else { 0 }];
            let mut pd = vec![0f32; if cfg.dropout.is_some() { br * bc } else { 0 }];
            let mut dp = vec![0f32; br * bc];
            let mut dk_acc = vec![0f32; bc * d];
            let mut dv_acc = vec![0f32; bc * dv];
            for kb in (split..key_blocks).step_by(splits) {
                let j0 = kb * bc;
                let valid = bc.min(s - j0);
                let width = round_up(valid, QUANTUM);
                let krow = kvh * s + j0;
                pack_transposed(k, krow, valid, d, width, &mut kt);
                pack_transposed(v, krow, valid, dv, width, &mut vt);
                dk_acc[..valid * d].fill(0.0);
                dv_acc[..valid * dv].fill(0.0);
                for h in g * group..(g + 1) * group {
                    let bh = b * nh + h;
                    for i0 in (r0..r1).step_by(br) {
                        let rows = br.min(r1 - i0);
                        let kind = mask.classify(b, h, i0, i0 + rows, j0, j0 + valid);
                        if kind == TileKind::Empty {
                            continue;
                        }
                        let tile = (b, h, i0, rows);
                        let keys = (j0, valid, width);
                        let raw_opt = if F::ACTIVE { Some(&mut raw[..]) } else { None };
                        let row0 = bh * t + i0;
                        let scale = Some(cfg.scale);
                        score_tile::<f32, M, F>(
                            dims,
                            cfg,
                            mask,
                            score,
                            kind,
                            tile,
                            keys,
                            &q[row0 * d..],
                            scale,
                            &kt,
                            &mut st,
                            raw_opt,
                        );
                        let (q_rows, do_rows) = (&q[row0 * d..], &dout[row0 * dv..]);
                        if careful && kind == TileKind::Partial {
                            let tile_in = CarefulTile {
                                q: q_rows,
                                k: &k[krow * d..],
                                v: &v[krow * dv..],
                                dout: do_rows,
                                lse: &lse[row0..row0 + rows],
                                delta: &delta[row0..row0 + rows],
                            };
                            // SAFETY: these dQ rows belong to this task (see module docs).
                            let dq_rows = unsafe { std::slice::from_raw_parts_mut(dq_row(bh, i0), rows * d) };
                            let raw_ref = if F::ACTIVE { Some(&raw[..]) } else { None };
                            let acc = (dq_rows, &mut dk_acc[..], &mut dv_acc[..]);
                            careful_tile(dims, cfg, mask, score, (tile, keys), tile_in, &st, raw_ref, acc);
                            continue;
                        }
                        // SAFETY (all tile calls): buffers hold rows × width / valid × d / valid × dv as used; widths
                        // are multiples of QUANTUM; the dQ rows of head bh belong to this task (see module docs).
                        unsafe {
                            exp_minus_lse(cfg.isa, st.as_mut_ptr(), width, rows, width, &lse[row0..row0 + rows]);
                            let p_used = match cfg.dropout {
                                Some(drop) => {
                                    pd[..rows * width].copy_from_slice(&st[..rows * width]);
                                    dropout_tile(dims, drop, tile, keys, &mut pd);
                                    &pd
                                }
                                None => &st,
                            };
                            // dV += Pᵀ dO, reading P transposed through its strides (no transposed copy).
                            let dva = dv_acc.as_mut_ptr();
                            gemm_strided(
                                cfg.isa,
                                valid,
                                dv,
                                rows,
                                p_used.as_ptr(),
                                (1, width),
                                do_rows.as_ptr(),
                                dv,
                                dva,
                                dv,
                                Init::Accumulate,
                            );
                            gemm(
                                cfg.isa,
                                rows,
                                width,
                                dv,
                                do_rows.as_ptr(),
                                dv,
                                vt.as_ptr(),
                                width,
                                dp.as_mut_ptr(),
                                width,
                                false,
                            );
                            if let Some(drop) = cfg.dropout {
                                dropout_tile(dims, drop, tile, keys, &mut dp);
                            }
                            softmax_grad(
                                cfg.isa,
                                st.as_ptr(),
                                dp.as_mut_ptr(),
                                width,
                                rows,
                                width,
                                &delta[row0..row0 + rows],
                            );
                            if F::ACTIVE {
                                for r in 0..rows {
                                    let at = r * width;
                                    score.chain(b, h, i0 + r, j0, &raw[at..at + valid], &mut dp[at..at + valid]);
                                }
                            }
                            let dq_rows = dq_row(bh, i0);
                            gemm(
                                cfg.isa,
                                rows,
                                d,
                                valid,
                                dp.as_ptr(),
                                width,
                                k[krow * d..].as_ptr(),
                                d,
                                dq_rows,
                                d,
                                true,
                            );
                            // dK += dSᵀ Q, likewise.
                            let dka = dk_acc.as_mut_ptr();
                            gemm_strided(
                                cfg.isa,
                                valid,
                                d,
                                rows,
                                dp.as_ptr(),
                                (1, width),
                                q_rows.as_ptr(),
                                d,
                                dka,
                                d,
                                Init::Accumulate,
                            );
                        }
                    }
                }
                // SAFETY: key rows krow..krow+valid of dK/dV belong to this task alone; passes add up (scaled below).
                let dk_out = unsafe { std::slice::from_raw_parts_mut(dk_ptr.get().add(krow * d), valid * d) };
                dk_out.iter_mut().zip(&dk_acc).for_each(|(o, a)| *o += a);
                let dv_out = unsafe { std::slice::from_raw_parts_mut(dv_ptr.get().add(krow * dv), valid * dv) };
                dv_out.iter_mut().zip(&dv_acc).for_each(|(o, a)| *o += a);
            }
        });

        // This pass's partial dQ rows into dQ, splits in order.
        if splits > 1 {
            let parts = &partial;
            let pass_rows = r1 - r0;
            dq.par_chunks_mut(t * d).enumerate().for_each(|(bh, head)| {
                let rows = &mut head[r0 * d..r1 * d];
                for p in 0..splits - 1 {
                    let src = &parts[p * pass_len + bh * rows_per_pass * d..][..pass_rows * d];
                    rows.iter_mut().zip(src).for_each(|(o, x)| *o += x);
                }
            });
        }
    }

    let scale = cfg.scale;
    dq.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|x| *x *= scale));
    dk.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|x| *x *= scale));
    Ok(())
}

/// The inputs of one tile of the backward, each slice starting at the tile's first query row or key row.
struct CarefulTile<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

/// The backward of one partially masked tile when the data hold NaN or ±∞: the same algebra as the fast path, each
/// sum restricted to visible pairs, so that a masked pair contributes exactly nothing (its `P` and `dS` are 0, and
/// 0 · NaN is never formed). `st` holds the scores (from `score_tile`), `raw` the scores before the score mod.
#[allow(clippy::too_many_arguments)]
fn careful_tile<M: MaskMod, F: ScoreMod>(
    dims: &FlashDims,
    cfg: &FlashConfig,
    mask: &M,
    score: &F,
    ((b, h, i0, rows), (j0, valid, width)): ((usize, usize, usize, usize), (usize, usize, usize)),
    x: CarefulTile<'_>,
    st: &[f32],
    raw: Option<&[f32]>,
    (dq, dk_acc, dv_acc): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (d, dv) = (dims.d, dims.dv);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let drop = cfg.dropout.map(|(p, seed)| (crate::dropout::drop_threshold(p), (1.0 / (1.0 - p)) as f32, seed));
    for r in 0..rows {
        if x.lse[r] == f32::NEG_INFINITY {
            continue; // the row's output is 0 and so are its gradients, as on the fast path
        }
        let i = i0 + r;
        let (q_r, do_r) = (&x.q[r * d..(r + 1) * d], &x.dout[r * dv..(r + 1) * dv]);
        for c in 0..valid {
            let at = r * width + c;
            if !mask.visible(b, h, i, j0 + c) {
                continue;
            }
            // P = exp(s − lse) (0 for a row that sees nothing, which has no visible pair anyway).
            let p = (st[at] - x.lse[r]).exp();
            // Dropout scales P in dV and dP alike (the forward's mask, regenerated).
            let keep = match drop {
                Some((th, sc, seed)) => {
                    let idx = super::dropout_index(dims, b, h, i, j0 + c);
                    if crate::dropout::keep(seed, idx, th) {
                        sc
                    } else {
                        0.0
                    }
                }
                None => 1.0,
            };
            let (k_c, v_c) = (&x.k[c * d..(c + 1) * d], &x.v[c * dv..(c + 1) * dv]);
            // A dropped pair's P̃ and dP are 0 (assigned, as `dropout_tile` does, not multiplied: NaN · 0 is NaN).
            let (pt, dpv) = if keep == 0.0 { (0.0, 0.0) } else { (p * keep, dot(do_r, v_c) * keep) };
            // dV_c += P̃ dO_r
            dv_acc[c * dv..(c + 1) * dv].iter_mut().zip(do_r).for_each(|(o, &g)| *o += pt * g);
            // dS = P (dP − Δ) · f'(s)
            let mut ds = [p * (dpv - x.delta[r])];
            if let Some(raw) = raw {
                score.chain(b, h, i, j0 + c, &raw[at..at + 1], &mut ds);
            }
            let ds = ds[0];
            // dQ_r += dS K_c, dK_c += dS Q_r (the scale is applied by the caller)
            dq[r * d..(r + 1) * d].iter_mut().zip(k_c).for_each(|(o, &kk)| *o += ds * kk);
            dk_acc[c * d..(c + 1) * d].iter_mut().zip(q_r).for_each(|(o, &qq)| *o += ds * qq);
        }
    }
}
