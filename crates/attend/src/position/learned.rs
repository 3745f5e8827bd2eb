//! Learned absolute position embeddings — BERT (Devlin et al., 2019) and GPT-2 (Radford et al., 2019).
//!
//! A trainable table `W_pos ∈ R^(max_len × C)`; the input at absolute position `p` gets row `p` added:
//!
//! ```text
//! out[b, t, :] = x[b, t, :] + W_pos[offset + t, :]
//! ```
//!
//! The table is the VarBuilder tensor `weight`, so `LearnedPositions::new(1024, 768, vb.pp("wpe"))` reads GPT-2's
//! `wpe.weight` unchanged. Unlike the sinusoidal encoding, the table cannot extrapolate: positions at or beyond
//! `max_len` are an error.
//!
//! # Shapes
//! - `weight`: `(max_len, C)`
//! - [`LearnedPositions::forward`]: `x (B, T, C) -> (B, T, C)`

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::{bail, ensure, Result};

/// GPT-2's initialisation of `wpe`: normal with standard deviation 0.02 (used only when the VarBuilder creates the
/// tensor rather than loading it).
const INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// A learned `(max_len, C)` table of absolute position embeddings.
#[derive(Clone, Debug)]
pub struct LearnedPositions {
    weight: Tensor,
    max_len: usize,
    d_model: usize,
}

impl LearnedPositions {
    /// Reads or creates `weight` of shape `(max_len, d_model)` under `vb`.
    ///
    /// # Shapes
    /// - `weight`: `(max_len, C)` with `C = d_model`.
    pub fn new(max_len: usize, d_model: usize, vb: VarBuilder) -> Result<Self> {
        ensure!(
            max_len > 0 && d_model > 0,
            "LearnedPositions::new",
            "max_len and d_model must be positive, got max_len = {max_len}, d_model = {d_model}"
        );
        let weight = vb.get_with_hints((max_len, d_model), "weight", INIT)?; // (max_len, C)
        Self::from_weight(weight)
    }

    /// Wraps an existing table (for example a `Var`'s tensor, so gradients reach it).
    ///
    /// # Shapes
    /// - `weight`: `(max_len, C)`.
    pub fn from_weight(weight: Tensor) -> Result<Self> {
        let Ok((max_len, d_model)) = weight.dims2() else {
            bail!("LearnedPositions::from_weight", "weight must be (max_len, C), got shape {:?}", weight.dims());
        };
        Ok(Self { weight, max_len, d_model })
    }

    /// The table, `(max_len, C)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The number of positions the table holds.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The embedding width `C`.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// `x + W_pos[offset..offset + T]`; `offset` counts positions already consumed (KV-cache decoding).
    ///
    /// # Shapes
    /// - `x`: `(B, T, C)` -> `(B, T, C)`.
    ///
    /// # Errors
    /// `x` not `(B, T, C)` with the table's `C`, or `offset + T > max_len`.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        const OP: &str = "LearnedPositions::forward";
        let Ok((_b, t, c)) = x.dims3() else {
            bail!(OP, "x must be (B, T, C), got shape {:?}", x.dims());
        };
        ensure!(
            c == self.d_model,
            OP,
            "x has C = {c} but the table is (max_len = {}, C = {})",
            self.max_len,
            self.d_model
        );
        let end = offset.checked_add(t);
        ensure!(
            end.is_some_and(|e| e <= self.max_len),
            OP,
            "positions offset {offset} + T {t} exceed the table's max_len = {}",
            self.max_len
        );
        // narrow is a view whose backward scatters into the rows it read, so only those rows get gradient.
        let pos = self.weight.narrow(0, offset, t)?; // (T, C)
        let pos = pos.to_dtype(x.dtype())?; // no-op when the dtypes already match
        Ok(x.broadcast_add(&pos)?) // (B, T, C)
    }
}

impl LearnedPositions {
    /// `x + W_pos[position_ids]`: a position per sequence and token (left-padded batches, where each sequence starts
    /// at its own column).
    ///
    /// # Shapes
    /// - `x`: `(B, T, C)`, `position_ids`: `(B, T)` integers → `(B, T, C)`.
    ///
    /// # Errors
    /// Shapes that disagree, or a position `≥ max_len` (the message gives the largest).
    pub fn forward_ids(&self, x: &Tensor, position_ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "LearnedPositions::forward_ids";
        let (b, t, _) = x.dims3()?;
        ensure!(
            position_ids.dims() == [b, t],
            OP,
            "position_ids {:?} must be (B, T) = ({b}, {t}) like x",
            position_ids.dims()
        );
        let flat = position_ids.flatten_all()?.to_dtype(candle_core::DType::U32)?; // (B·T)
        let max = flat.max(0)?.to_scalar::<u32>()? as usize;
        ensure!(max < self.max_len, OP, "position id {max} is outside the table's max_len = {}", self.max_len);
        let pos = self.weight.index_select(&flat, 0)?.reshape((b, t, self.d_model))?; // (B, T, C)
        Ok((x + pos.to_dtype(x.dtype())?)?)
    }
}

/// `x + W_pos[0..T]`: positions from 0 (`x (B, T, C) → (B, T, C)`).
impl candle_core::Module for LearnedPositions {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(LearnedPositions::forward(self, x, 0)?)
    }
}
