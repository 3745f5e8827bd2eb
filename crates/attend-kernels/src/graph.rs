//! Weighted aggregation over an edge list: `out[i, h, :] = Σ_{e : dst(e) = i} α[e, h] · x[src(e), h, :]`, the
//! weighted sum of graph attention, without materialising the `(E, H, C)` messages (at 2·10⁵ edges and 64 values
//! per edge those are 51 MB per pass, and their gradient as much again).
//!
//! Backward: `dα[e, h] = ⟨dout[dst(e), h, :], x[src(e), h, :]⟩` and `dx[src(e), h, :] += α[e, h] · dout[dst(e), h, :]`.
//!
//! # Shapes (row-major)
//! `x (N, H, C)`, `alpha (E, H)`, `src`, `dst (E)` → `out (M, H, C)` (`M` target nodes).

use rayon::prelude::*;

use crate::Real;

/// Edges grouped by a node: `order[start[v]..start[v + 1]]` are the edges whose `key` is `v` (a counting sort, so
/// each node's edges keep their input order and sums run in a fixed order whatever the thread count).
fn group_by<I: Copy + Into<u64>>(key: &[I], n: usize) -> (Vec<usize>, Vec<usize>) {
    let mut start = vec![0usize; n + 1];
    for &k in key {
        start[k.into() as usize + 1] += 1;
    }
    for v in 0..n {
        start[v + 1] += start[v];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; key.len()];
    for (e, &k) in key.iter().enumerate() {
        order[fill[k.into() as usize]] = e;
        fill[k.into() as usize] += 1;
    }
    (start, order)
}

/// Nodes per rayon task: enough rows of `H·C` values to outweigh a task.
fn nodes_per_task(width: usize) -> usize {
    ((1 << 14) / width.max(1)).max(1)
}

/// Forward; see the module documentation. Panics if an index is out of range (callers check).
pub fn edge_aggregate_forward<T: Real>(
    x: &[T],
    alpha: &[T],
    src: &[u32],
    dst: &[u32],
    h: usize,
    c: usize,
    out: &mut [T],
) {
    let (e, hc) = (src.len(), h * c);
    assert!(
        dst.len() == e && alpha.len() == e * h && x.len() % hc == 0 && out.len() % hc == 0,
        "edge_aggregate: lengths"
    );
    let m = out.len() / hc;
    let (start, order) = group_by(dst, m);
    out.par_chunks_mut(hc).enumerate().with_min_len(nodes_per_task(hc)).for_each(|(i, o)| {
        o.iter_mut().for_each(|v| *v = T::ZERO);
        for &ed in &order[start[i]..start[i + 1]] {
            let xs = &x[src[ed] as usize * hc..(src[ed] as usize + 1) * hc];
            for hh in 0..h {
                let a = alpha[ed * h + hh];
                for (ov, &xv) in o[hh * c..(hh + 1) * c].iter_mut().zip(&xs[hh * c..(hh + 1) * c]) {
                    *ov += a * xv;
                }
            }
        }
    });
}

/// Backward: writes `dx (N, H, C)` and `dalpha (E, H)` from `dout (M, H, C)`.
#[allow(clippy::too_many_arguments)]
pub fn edge_aggregate_backward<T: Real>(
    x: &[T],
    alpha: &[T],
    src: &[u32],
    dst: &[u32],
    h: usize,
    c: usize,
    dout: &[T],
    dx: &mut [T],
    dalpha: &mut [T],
) {
    let (e, hc) = (src.len(), h * c);
    assert!(
        dst.len() == e && alpha.len() == e * h && dalpha.len() == e * h && dx.len() == x.len(),
        "edge_aggregate_backward: lengths"
    );
    dalpha.par_chunks_mut(h).enumerate().with_min_len(256).for_each(|(ed, da)| {
        let (xs, gs) = (src[ed] as usize * hc, dst[ed] as usize * hc);
        for (hh, d) in da.iter_mut().enumerate() {
            let mut acc = T::ZERO;
            for k in 0..c {
                acc += dout[gs + hh * c + k] * x[xs + hh * c + k];
            }
            *d = acc;
        }
    });
    let n = dx.len() / hc;
    let (start, order) = group_by(src, n);
    dx.par_chunks_mut(hc).enumerate().with_min_len(nodes_per_task(hc)).for_each(|(j, d)| {
        d.iter_mut().for_each(|v| *v = T::ZERO);
        for &ed in &order[start[j]..start[j + 1]] {
            let gs = dst[ed] as usize * hc;
            for hh in 0..h {
                let a = alpha[ed * h + hh];
                for (dv, &g) in d[hh * c..(hh + 1) * c].iter_mut().zip(&dout[gs + hh * c..gs + (hh + 1) * c]) {
                    *dv += a * g;
                }
            }
        }
    });
}

/// GATv2 scores, `s[e, h] = Σ_c a[h, c] · LeakyReLU(xl[src(e), h, c] + xr[dst(e), h, c])`, without materialising
/// the `(E, H, C)` pairs.
#[allow(clippy::too_many_arguments)]
pub fn pair_scores_forward<T: Real>(
    xl: &[T],
    xr: &[T],
    att: &[T],
    src: &[u32],
    dst: &[u32],
    h: usize,
    c: usize,
    slope: T,
    out: &mut [T],
) {
    let hc = h * c;
    assert!(att.len() == hc && out.len() == src.len() * h && dst.len() == src.len(), "pair_scores: lengths");
    out.par_chunks_mut(h).enumerate().with_min_len(256).for_each(|(e, o)| {
        let (a, b) = (src[e] as usize * hc, dst[e] as usize * hc);
        for (hh, s) in o.iter_mut().enumerate() {
            let mut acc = T::ZERO;
            for k in hh * c..(hh + 1) * c {
                let z = xl[a + k] + xr[b + k];
                acc += att[k] * if z > T::ZERO { z } else { slope * z };
            }
            *s = acc;
        }
    });
}

/// Backward of [`pair_scores_forward`] from `ds (E, H)`: writes `dxl`, `dxr (N, H, C)` and `datt (H, C)`.
///
/// Two passes over the edges: grouped by source (`dxl`, and `datt` as per-task partial sums added in task order,
/// so the result does not depend on the thread count), then grouped by target (`dxr`).
#[allow(clippy::too_many_arguments)]
pub fn pair_scores_backward<T: Real>(
    xl: &[T],
    xr: &[T],
    att: &[T],
    src: &[u32],
    dst: &[u32],
    h: usize,
    c: usize,
    slope: T,
    ds: &[T],
    dxl: &mut [T],
    dxr: &mut [T],
    datt: &mut [T],
) {
    let hc = h * c;
    let n = dxl.len() / hc;
    let per = nodes_per_task(hc);
    // Branch-free LeakyReLU and its derivative, so the inner loops vectorise.
    let leaky = |z: T| -> (T, T) {
        let pos = if z > T::ZERO { T::ONE } else { T::ZERO };
        let d = pos + (T::ONE - pos) * slope;
        (z * d, d)
    };
    let (start, order) = group_by(src, n);
    let partials: Vec<Vec<T>> = dxl
        .par_chunks_mut(hc * per)
        .enumerate()
        .map(|(task, rows)| {
            let mut p = vec![T::ZERO; hc];
            for (i, d) in rows.chunks_exact_mut(hc).enumerate() {
                let v = task * per + i;
                d.iter_mut().for_each(|x| *x = T::ZERO);
                for &e in &order[start[v]..start[v + 1]] {
                    let (a, b) = (v * hc, dst[e] as usize * hc);
                    for hh in 0..h {
                        let g = ds[e * h + hh];
                        for k in hh * c..(hh + 1) * c {
                            let (f, df) = leaky(xl[a + k] + xr[b + k]);
                            d[k] += g * att[k] * df;
                            p[k] += g * f;
                        }
                    }
                }
            }
            p
        })
        .collect();
    datt.iter_mut().for_each(|x| *x = T::ZERO);
    for p in partials {
        datt.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    let (start, order) = group_by(dst, n);
    dxr.par_chunks_mut(hc).enumerate().with_min_len(per).for_each(|(v, d)| {
        d.iter_mut().for_each(|x| *x = T::ZERO);
        for &e in &order[start[v]..start[v + 1]] {
            let (a, b) = (src[e] as usize * hc, v * hc);
            for hh in 0..h {
                let g = ds[e * h + hh];
                for k in hh * c..(hh + 1) * c {
                    d[k] += g * att[k] * leaky(xl[a + k] + xr[b + k]).1;
                }
            }
        }
    });
}
