//! ViT's patch embedding (Dosovitskiy et al. 2021 §3.1): the image cut into non-overlapping `P×P` patches, each
//! flattened and projected to `C` — a convolution whose stride equals its kernel, computed as one matrix product.
//!
//! # Parameters
//! `weight (C, K, P, P)` (a `Conv2d` weight, as Hugging Face stores it), `bias (C)`.
//!
//! # Shapes
//! `pixels (B, K, H, W)` → `(B, N, C)` with `N = (H/P)·(W/P)` patches in row-major order.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// See the module docs.
#[derive(Clone, Debug)]
pub struct PatchEmbedding {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbedding {
    const OP: &'static str = "PatchEmbedding";

    pub fn new(channels: usize, patch: usize, d_model: usize, vb: VarBuilder) -> Result<Self> {
        ensure!(channels > 0 && patch > 0 && d_model > 0, Self::OP, "channels, patch and d_model must be positive");
        let bound = 1.0 / ((channels * patch * patch) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        Ok(Self {
            weight: vb.get_with_hints((d_model, channels, patch, patch), "weight", init)?,
            bias: vb.get_with_hints(d_model, "bias", init)?,
            patch,
        })
    }

    /// `pixels (B, K, H, W)` → patch embeddings `(B, N, C)`.
    ///
    /// # Errors
    /// Not 4-D, another channel count, or a side not divisible by the patch size.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (c, k, p, _) = self.weight.dims4()?;
        let Ok((b, kk, h, w)) = pixels.dims4() else {
            bail!(Self::OP, "pixel_values must be (B, K, H, W), got {}", shape_str(pixels))
        };
        ensure!(kk == k, Self::OP, "pixel_values {} has {kk} channels, the model takes {k}", shape_str(pixels));
        ensure!(
            h % p == 0 && w % p == 0,
            Self::OP,
            "pixel_values {} is not a whole number of {p}×{p} patches",
            shape_str(pixels)
        );
        let (gh, gw) = (h / p, w / p);
        let x = pixels.reshape((b, k, gh, p, gw, p))?; // (B, K, H/P, P, W/P, P)
        let x = x.permute((0, 2, 4, 1, 3, 5))?.contiguous()?; // (B, H/P, W/P, K, P, P)
        let x = x.reshape((b, gh * gw, k * p * p))?; // (B, N, K·P·P), flattened as the kernel is
        let w2 = self.weight.reshape((c, k * p * p))?; // (C, K·P·P)
        crate::ops::linear(&x, &w2, Some(&self.bias))
    }

    pub fn patch_size(&self) -> usize {
        self.patch
    }
}
