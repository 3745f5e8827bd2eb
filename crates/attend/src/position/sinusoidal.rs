//! Fixed sinusoidal position encoding — "Attention Is All You Need" (Vaswani et al., 2017), section 3.5.
//!
//! For position `pos` and feature pair `i` of a `d_model = C` wide embedding:
//!
//! ```text
//! PE(pos, 2i)   = sin(pos / 10000^(2i / C))
//! PE(pos, 2i+1) = cos(pos / 10000^(2i / C))
//! ```
//!
//! Each pair is a rotation at its own wavelength (2π … 10000·2π), so `PE(pos + k)` is a linear function of
//! `PE(pos)`. The encoding has no parameters; [`SinusoidalEncoding::forward`] adds it to the token embeddings.
//!
//! Deviation from the paper, stated openly: the paper assumes an even `C`. An odd `C` is accepted here — feature `j`
//! uses the frequency of pair `⌊j/2⌋` with `sin` on even `j` and `cos` on odd `j`, so the last feature of an odd `C`
//! is a lone sine. For even `C` this is exactly the paper's table.
//!
//! The table is computed in f64 on the host and cast once to the requested dtype: angles reach `pos` radians, and
//! an f32 angle at position 10⁴ would already be off by ~10⁻³.
//!
//! # Shapes
//! - [`sinusoidal_table`]: `(T, C)`
//! - [`SinusoidalEncoding::forward`]: `x (B, T, C) -> (B, T, C)`

use candle_core::{DType, Device, Tensor};

use crate::{bail, ensure, Result};

/// The paper's base wavelength, `10000`.
pub const DEFAULT_BASE: f64 = 10000.0;

/// The sinusoidal table for positions `offset..offset + t` of a `c`-wide embedding, base 10000.
///
/// # Shapes
/// - returns `(T, C)` with `T = t`, `C = c`, in `dtype` on `device`.
///
/// # Errors
/// `c == 0`, or `offset + t` overflowing `usize`.
pub fn sinusoidal_table(t: usize, c: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    sinusoidal_table_with_base(t, c, offset, DEFAULT_BASE, dtype, device)
}

/// [`sinusoidal_table`] with another base wavelength (the paper's 10000 is [`DEFAULT_BASE`]).
///
/// # Shapes
/// - returns `(T, C)`.
pub fn sinusoidal_table_with_base(
    t: usize,
    c: usize,
    offset: usize,
    base: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    const OP: &str = "sinusoidal_table";
    ensure!(c > 0, OP, "model dimension C must be positive, got C = 0");
    ensure!(base.is_finite() && base > 0.0, OP, "base must be finite and positive, got {base}");
    ensure!(offset.checked_add(t).is_some(), OP, "offset {offset} + T {t} overflows");
    // Inverse wavelength of pair i: 1 / base^(2i / C), written as exp(-2i·ln(base)/C) as in The Annotated
    // Transformer.
    let inv_freq: Vec<f64> = (0..c.div_ceil(2)).map(|i| (-((2 * i) as f64) * base.ln() / c as f64).exp()).collect();
    let mut data = Vec::with_capacity(t * c);
    for p in 0..t {
        let pos = (offset + p) as f64;
        for j in 0..c {
            let angle = pos * inv_freq[j / 2];
            data.push(if j % 2 == 0 { angle.sin() } else { angle.cos() });
        }
    }
    let table = Tensor::from_vec(data, (t, c), device)?; // (T, C) f64
    Ok(table.to_dtype(dtype)?)
}

/// Adds the fixed sinusoidal encoding to token embeddings (no parameters).
#[derive(Clone, Debug)]
pub struct SinusoidalEncoding {
    d_model: usize,
    base: f64,
}

impl SinusoidalEncoding {
    /// An encoding for embeddings of width `d_model` (`C`), base 10000. Odd `d_model` is accepted (see the module
    /// docs); zero is an error.
    pub fn new(d_model: usize) -> Result<Self> {
        Self::with_base(d_model, DEFAULT_BASE)
    }

    /// [`SinusoidalEncoding::new`] with another base wavelength.
    pub fn with_base(d_model: usize, base: f64) -> Result<Self> {
        const OP: &str = "SinusoidalEncoding::new";
        ensure!(d_model > 0, OP, "d_model must be positive, got 0");
        ensure!(base.is_finite() && base > 0.0, OP, "base must be finite and positive, got {base}");
        Ok(Self { d_model, base })
    }

    /// The embedding width `C`.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// The table for positions `offset..offset + t`.
    ///
    /// # Shapes
    /// - returns `(T, C)`.
    pub fn table(&self, t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        sinusoidal_table_with_base(t, self.d_model, offset, self.base, dtype, device)
    }

    /// `x + PE[offset..offset + T]`; `offset` is the number of positions already consumed (KV-cache decoding).
    ///
    /// # Shapes
    /// - `x`: `(B, T, C)` -> `(B, T, C)`.
    ///
    /// # Errors
    /// `x` not of rank 3, or its last dimension not `C`.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        const OP: &str = "SinusoidalEncoding::forward";
        let Ok((_b, t, c)) = x.dims3() else {
            bail!(OP, "x must be (B, T, C), got shape {:?}", x.dims());
        };
        ensure!(c == self.d_model, OP, "x has C = {c} but the encoding was built for C = {}", self.d_model);
        let pe = self.table(t, offset, x.dtype(), x.device())?; // (T, C)
        Ok(x.broadcast_add(&pe)?) // (B, T, C)
    }
}

/// `x + PE[0..T]`: the encoding from position 0 (`x (B, T, C) → (B, T, C)`).
impl candle_core::Module for SinusoidalEncoding {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(SinusoidalEncoding::forward(self, x, 0)?)
    }
}
