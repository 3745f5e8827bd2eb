//! Key/value cache for incremental (autoregressive) decoding.
//!
//! A decoder that has already processed positions `0..S₀` keeps their projected keys and values, so step `n` only
//! projects its `T` new tokens and attends over all `S = S₀ + T` keys (Vaswani et al. 2017 §3.2.3 decoding; the
//! "past key values" of GPT-2 and BART). With the end-aligned [`Mask::causal`](super::Mask::causal), the `T` new
//! queries line up with the last `T` keys, so cached decoding equals the full causal forward.
//!
//! Storage: keys and values live in preallocated buffers `(B, Hkv, capacity, D)` written in place with
//! [`Tensor::slice_set`]; an append copies only the `T` new positions instead of re-concatenating all `S` every step.
//! With a `max_len`, the buffer is allocated once at that size; without one it doubles when full (amortised O(1)
//! reallocation per position).
//!
//! Two rules keep the in-place writes invisible to callers:
//! - A returned `(k_all, v_all)` is a view of the buffer, and the cache never writes over a position it has already
//!   handed out: after [`truncate`](KvCache::truncate) (rollback for beam search or speculative decoding), the next
//!   append first moves the kept prefix to a fresh buffer. Tensors returned earlier keep their values.
//! - Gradients: the buffers hold detached values. When the appended `k_new`/`v_new` carry a gradient graph, the
//!   returned tensors are `cat(cached prefix, new)`, so gradients reach the current call's keys and values and stop at
//!   the cached ones (the stop-gradient on the memory of Transformer-XL, Dai et al. 2019 §3.2).
//!
//! # Shapes
//! - [`append`](KvCache::append): `k_new (B, Hkv, T, D)`, `v_new (B, Hkv, T, Dv)` →
//!   `k_all (B, Hkv, S, D)`, `v_all (B, Hkv, S, Dv)` with `S = len() + T`
//! - `B`, `Hkv`, `D`, `Dv`, dtype and device are fixed by the first append after [`new`](KvCache::new) or
//!   [`reset`](KvCache::reset).

use candle_core::{DType, Device, Tensor};

use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// Sizes fixed by the first append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    b: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    dtype: DType,
}

/// Keys and values of the positions decoded so far; see the module docs.
#[derive(Clone, Debug)]
pub struct KvCache {
    k: Option<Tensor>, // (B, Hkv, capacity, D)
    v: Option<Tensor>, // (B, Hkv, capacity, Dv)
    layout: Option<Layout>,
    device: Option<Device>,
    len: usize,
    /// Positions of the current buffers that have been handed out (`≥ len`); never overwritten in place.
    exposed: usize,
    max_len: Option<usize>,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new(None)
    }
}

impl KvCache {
    const OP: &'static str = "KvCache::append";

    /// An empty cache; `max_len` caps the number of positions it may hold (the buffer is then allocated once at that
    /// size on the first append). `None` grows without bound.
    pub fn new(max_len: Option<usize>) -> Self {
        Self { k: None, v: None, layout: None, device: None, len: 0, exposed: 0, max_len }
    }

    /// Positions held, `S`.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cap given to [`new`](Self::new).
    pub fn max_len(&self) -> Option<usize> {
        self.max_len
    }

    /// Positions the current buffers can hold before they are reallocated (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Cached keys `(B, Hkv, S, D)`, or `None` when empty.
    pub fn k(&self) -> Result<Option<Tensor>> {
        self.view(self.k.as_ref())
    }

    /// Cached values `(B, Hkv, S, Dv)`, or `None` when empty.
    pub fn v(&self) -> Result<Option<Tensor>> {
        self.view(self.v.as_ref())
    }

    fn view(&self, buf: Option<&Tensor>) -> Result<Option<Tensor>> {
        match buf {
            Some(b) if self.len > 0 => Ok(Some(b.narrow(2, 0, self.len)?)),
            _ => Ok(None),
        }
    }

    /// Forgets every position and frees the buffers; the next append may use new sizes.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_len);
    }

    /// Keeps the first `n` positions (rollback of rejected beam-search or speculative-decoding tokens).
    ///
    /// # Errors
    /// When `n > len()`: there is nothing to roll forward to.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        ensure!(n <= self.len, "KvCache::truncate", "cannot keep {n} positions: the cache holds {}", self.len);
        self.len = n;
        Ok(())
    }

    /// A new cache holding rows `indices (K)` of this one's batch, in that order (repeats allowed): the caches of
    /// the hypotheses a beam search keeps.
    ///
    /// # Errors
    /// An index outside the batch.
    pub fn select(&self, indices: &Tensor) -> Result<KvCache> {
        let mut out = KvCache::new(self.max_len);
        if let (Some(k), Some(v)) = (self.k()?, self.v()?) {
            let b = k.dim(0)?;
            let max = indices.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
            ensure!((max as usize) < b, "KvCache::select", "row {max} of a cache holding a batch of {b}");
            out.append(&k.contiguous()?.index_select(indices, 0)?, &v.contiguous()?.index_select(indices, 0)?)?;
        }
        Ok(out)
    }

    /// Appends `T` positions and returns all `S = len() + T` keys and values.
    ///
    /// # Shapes
    /// `k_new (B, Hkv, T, D)`, `v_new (B, Hkv, T, Dv)` → `(B, Hkv, S, D)`, `(B, Hkv, S, Dv)`.
    ///
    /// # Errors
    /// Ranks other than 4, `k_new` and `v_new` disagreeing in `(B, Hkv, T)`, dtype or device, sizes other than those
    /// of the cached positions, or more than `max_len` positions; the cache is unchanged after an error.
    pub fn append(&mut self, k_new: &Tensor, v_new: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ks, vs) = (shape_str(k_new), shape_str(v_new));
        ensure!(
            k_new.rank() == 4 && v_new.rank() == 4,
            Self::OP,
            "k_new and v_new must be (B, Hkv, T, D) and (B, Hkv, T, Dv), got k_new {ks}, v_new {vs}"
        );
        let (b, hkv, t, d) = k_new.dims4()?;
        let (bv, hv, tv, dv) = v_new.dims4()?;
        ensure!((b, hkv, t) == (bv, hv, tv), Self::OP, "k_new {ks} and v_new {vs} must agree in (B, Hkv, T)");
        ensure!(t > 0 && b * hkv * d * dv > 0, Self::OP, "empty append: k_new {ks}, v_new {vs}");
        ensure!(
            k_new.dtype() == v_new.dtype(),
            Self::OP,
            "k_new is {:?} but v_new is {:?}",
            k_new.dtype(),
            v_new.dtype()
        );
        ensure!(k_new.device().same_device(v_new.device()), Self::OP, "k_new and v_new are on different devices");
        let layout = Layout { b, hkv, d, dv, dtype: k_new.dtype() };
        if let (Some(have), Some(dev)) = (self.layout, &self.device) {
            ensure!(
                have == layout,
                Self::OP,
                "k_new {ks} {:?} / v_new {vs} do not match the cached (B, Hkv, S, D) = ({}, {}, {}, {}), Dv = {}, {:?}",
                layout.dtype,
                have.b,
                have.hkv,
                self.len,
                have.d,
                have.dv,
                have.dtype
            );
            ensure!(dev.same_device(k_new.device()), Self::OP, "k_new is on another device than the cache");
        }
        let new_len = self.len + t;
        if let Some(max) = self.max_len {
            ensure!(
                new_len <= max,
                Self::OP,
                "appending T = {t} positions (k_new {ks}) to the {} cached would hold {new_len} > max_len = {max}",
                self.len
            );
        }

        // 1. A buffer that can take positions len..new_len without writing over anything handed out.
        let reuse = self.len >= self.exposed && new_len <= self.capacity() && self.layout == Some(layout);
        if !reuse {
            self.reallocate(new_len, layout, k_new.device())?;
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            bail!(Self::OP, "internal: no buffer after allocation");
        };

        // 2. Write the new positions in place (no autograd: the buffers hold detached values).
        kb.slice_set(&k_new.detach().contiguous()?, 2, self.len)?;
        vb.slice_set(&v_new.detach().contiguous()?, 2, self.len)?;
        let old_len = self.len;
        self.len = new_len;
        self.exposed = new_len;

        // 3. Return views; keep the graph of the new positions when they have one (see the module docs).
        if k_new.track_op() || v_new.track_op() {
            if old_len == 0 {
                return Ok((k_new.clone(), v_new.clone()));
            }
            let k_all = Tensor::cat(&[&kb.narrow(2, 0, old_len)?, k_new], 2)?; // (B, Hkv, S, D)
            let v_all = Tensor::cat(&[&vb.narrow(2, 0, old_len)?, v_new], 2)?; // (B, Hkv, S, Dv)
            return Ok((k_all, v_all));
        }
        Ok((kb.narrow(2, 0, new_len)?, vb.narrow(2, 0, new_len)?)) // (B, Hkv, S, D), (B, Hkv, S, Dv)
    }

    /// New buffers holding the first `len` positions of the old ones, with room for at least `need` positions.
    fn reallocate(&mut self, need: usize, layout: Layout, device: &Device) -> Result<()> {
        let cap = match self.max_len {
            Some(max) => max,
            // Doubling: a sequence of single-token appends reallocates O(log S) times.
            None => need.max(2 * self.capacity()).max(16),
        };
        let Layout { b, hkv, d, dv, dtype } = layout;
        let kb = Tensor::zeros((b, hkv, cap, d), dtype, device)?; // (B, Hkv, capacity, D)
        let vb = Tensor::zeros((b, hkv, cap, dv), dtype, device)?; // (B, Hkv, capacity, Dv)
        if self.len > 0 {
            if let (Some(k), Some(v)) = (self.k()?, self.v()?) {
                kb.slice_set(&k.contiguous()?, 2, 0)?;
                vb.slice_set(&v.contiguous()?, 2, 0)?;
            }
        }
        self.k = Some(kb);
        self.v = Some(vb);
        self.layout = Some(layout);
        self.device = Some(device.clone());
        self.exposed = self.len;
        Ok(())
    }
}
