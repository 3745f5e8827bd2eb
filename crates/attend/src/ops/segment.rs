//! The softmax over segments of rows: the normaliser of attention on graphs, where each node attends over its own
//! incoming edges and the edges of all nodes lie in one list.
//!
//! `α_e = exp(s_e − m_g) / Σ_{e' ∈ g} exp(s_{e'} − m_g)` for the segment `g` of row `e`, column by column. The
//! shift `m_g` (the segment maximum) is computed apart and detached: the softmax does not depend on it, so the
//! gradient is exact, and a NaN score makes its segment NaN as the dense softmax does.
//!
//! # Shapes
//! - `scores`: `(E, H)`, `segments`: `(E)` u32 with values in `0..N` → `(E, H)`

use candle_core::{DType, Tensor};

use crate::error::shape_str;
use crate::{ensure, Result};

/// See the module documentation. `segment_ids` holds the same ids as `segments`, on the host (callers have them
/// there already, having built the tensor from them).
pub fn segment_softmax(scores: &Tensor, segments: &Tensor, segment_ids: &[u32], n: usize) -> Result<Tensor> {
    const OP: &str = "segment softmax";
    ensure!(scores.rank() == 2, OP, "expected scores (E, H), got {}", shape_str(scores));
    let (e, h) = scores.dims2()?;
    ensure!(
        segments.dims() == [e] && segment_ids.len() == e,
        OP,
        "segments {} do not fit scores {}",
        shape_str(segments),
        shape_str(scores)
    );
    if let Some(&bad) = segment_ids.iter().find(|&&g| g as usize >= n) {
        crate::bail!(OP, "segment id {bad} is out of range for N = {n}");
    }
    // Per-segment maxima on the host (`max` skips NaN; the NaN still reaches its segment's sum). A maximum that is
    // not finite becomes a shift of 0: with +∞ the segment is NaN, as in the dense softmax.
    let v: Vec<f32> = scores.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut max = vec![f32::NEG_INFINITY; n * h];
    for (g, row) in segment_ids.iter().zip(v.chunks_exact(h)) {
        for (m, &s) in max[*g as usize * h..(*g as usize + 1) * h].iter_mut().zip(row) {
            *m = m.max(s);
        }
    }
    max.iter_mut().filter(|m| !m.is_finite()).for_each(|m| *m = 0.0);
    let max = Tensor::from_vec(max, (n, h), scores.device())?.to_dtype(scores.dtype())?;
    let ex = (scores - max.index_select(segments, 0)?)?.exp()?; // (E, H)
    let sums = Tensor::zeros((n, h), scores.dtype(), scores.device())?.index_add(segments, &ex, 0)?; // (N, H)
    Ok((ex / sums.index_select(segments, 0)?)?)
}
