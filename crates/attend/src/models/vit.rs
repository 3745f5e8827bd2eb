//! ViT: the Vision Transformer (Dosovitskiy et al. 2021), an image as a sequence of patches.
//!
//! ```text
//! z_0 = [x_class; x_p¹E; …; x_pᴺE] + E_pos            (patch embedding, a learned class token, learned positions)
//! z_l = TransformerLayer_l(z_{l−1})                    (pre-norm, no mask: every patch sees every patch)
//! y   = Head(LayerNorm(z_L)[:, 0])                     (the class token's final state)
//! ```
//!
//! # Parameters
//! | name | shape |
//! |---|---|
//! | `patch_embed.weight`, `patch_embed.bias` | `(C, K, P, P)`, `(C)` ([`PatchEmbedding`]) |
//! | `cls_token` | `(1, 1, C)` |
//! | `position_embeddings` | `(1, N + 1, C)` |
//! | `layers.{i}.*` | [`TransformerLayer`] |
//! | `norm.{weight,bias}` | `(C)`, the final layer norm |
//! | `pooler.{weight,bias}` | `(C, C)`, `(C)`, when `pooler` (Hugging Face's `ViTModel`) |
//! | `head.{weight,bias}` | `(L, C)`, `(L)`, when `n_labels` is set |
//!
//! # Shapes
//! `pixel_values (B, K, H, W)` → hidden `(B, N + 1, C)`, logits `(B, L)`; attention weights `(B, H, N+1, N+1)`.
//!
//! ```
//! use attend::models::vit::{Vit, VitConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = VitConfig { n_layers: 2, n_labels: Some(10), ..VitConfig::base(32, 8, 64, 4) };
//! let vit = Vit::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let images = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev)?; // (B, K, H, W)
//! let out = vit.forward(&images, false)?;
//! assert_eq!(out.hidden.dims(), &[2, 17, 64]); // (B, N + 1, C): 16 patches and the class token
//! assert_eq!(out.logits.unwrap().dims(), &[2, 10]); // (B, L)
//! # Ok(()) }
//! ```

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::{Mask, MhaOptions};
use crate::error::shape_str;
use crate::layers::feed_forward::Activation;
use crate::layers::linear::Linear;
use crate::layers::norm::{Norm, NormConfig};
use crate::layers::patch_embedding::PatchEmbedding;
use crate::layers::stack::Stack;
use crate::layers::transformer::{LayerContext, NormPosition, TransformerLayer, TransformerLayerConfig};
use crate::ops::{self, CrossEntropyConfig, Reduction};
use crate::rng::{DropoutRng, DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// Configuration of [`Vit`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Side of the square input image. Example: `224`.
    pub image_size: usize,
    /// `P`. Example: `16`.
    pub patch_size: usize,
    /// `K`. Example: `3`.
    pub num_channels: usize,
    /// `C`. Example: `768`.
    pub d_model: usize,
    /// Example: `12`.
    pub n_layers: usize,
    /// `H`. Example: `12`.
    pub n_heads: usize,
    /// Example: `3072`.
    pub d_ff: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    /// Residual, embedding and feed-forward dropout while training.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attn_dropout: f64,
    /// Biases on the attention projections (all four: attend's attention has one switch).
    pub qkv_bias: bool,
    /// The `tanh` pooler of Hugging Face's `ViTModel`.
    #[serde(default)]
    pub pooler: bool,
    /// A classification head with this many labels.
    #[serde(default)]
    pub n_labels: Option<usize>,
}

impl VitConfig {
    /// ViT-Base's settings (3 channels, gelu, ε = 1e-12, `d_ff = 4·C`, qkv biases) at the given sizes, 12 layers.
    pub fn base(image_size: usize, patch_size: usize, d_model: usize, n_heads: usize) -> Self {
        Self {
            image_size,
            patch_size,
            num_channels: 3,
            d_model,
            n_layers: 12,
            n_heads,
            d_ff: 4 * d_model,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-12,
            dropout: 0.0,
            attn_dropout: 0.0,
            qkv_bias: true,
            pooler: false,
            n_labels: None,
        }
    }

    /// Patches per image, `N`.
    pub fn n_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// The configuration of each (pre-norm) layer.
    pub fn layer(&self) -> TransformerLayerConfig {
        let norm = NormConfig::layer(self.layer_norm_eps);
        let mut cfg = TransformerLayerConfig::plain(
            self.d_model,
            self.n_heads,
            self.d_ff,
            self.activation,
            norm,
            NormPosition::Pre,
        )
        .with_dropout(self.dropout, self.attn_dropout);
        cfg.attention.bias = self.qkv_bias;
        cfg
    }
}

/// The outputs of [`Vit::forward`].
#[derive(Clone, Debug)]
pub struct VitOutput {
    /// `(B, N + 1, C)` after the final norm: Hugging Face's `last_hidden_state`.
    pub hidden: Tensor,
    /// `(B, C)`, with a pooler.
    pub pooled: Option<Tensor>,
    /// `(B, L)`, with a head.
    pub logits: Option<Tensor>,
    /// One `(B, H, N+1, N+1)` per layer, when asked for.
    pub weights: Vec<Tensor>,
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Vit {
    patch_embed: PatchEmbedding,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Stack<TransformerLayer>,
    norm: Norm,
    pooler: Option<Linear>,
    head: Option<Linear>,
    config: VitConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl Vit {
    const OP: &'static str = "Vit";

    pub fn new(config: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.d_model;
        ensure!(
            config.patch_size > 0 && config.image_size % config.patch_size == 0,
            Self::OP,
            "image_size {} must be a multiple of patch_size {}",
            config.image_size,
            config.patch_size
        );
        ensure!(config.n_layers > 0, Self::OP, "n_layers must be positive");
        let n = config.n_patches();
        // ViT's initialisation: truncated N(0, 0.02) in the paper; plain N(0, 0.02) here.
        let init = Init::Randn { mean: 0.0, stdev: 0.02 };
        let layer_cfg = config.layer();
        let mut vit = Self {
            patch_embed: PatchEmbedding::new(config.num_channels, config.patch_size, c, vb.pp("patch_embed"))?,
            cls_token: vb.get_with_hints((1, 1, c), "cls_token", init)?,
            position_embeddings: vb.get_with_hints((1, n + 1, c), "position_embeddings", init)?,
            layers: Stack::distinct(config.n_layers, |vb| TransformerLayer::new(&layer_cfg, vb), vb.pp("layers"))?,
            norm: Norm::new(c, NormConfig::layer(config.layer_norm_eps), vb.pp("norm"))?,
            pooler: if config.pooler { Some(Linear::new(c, c, true, vb.pp("pooler"))?) } else { None },
            head: match config.n_labels {
                Some(l) => {
                    ensure!(l > 0, Self::OP, "n_labels must be positive");
                    Some(Linear::new(c, l, true, vb.pp("head"))?)
                }
                None => None,
            },
            config: config.clone(),
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        };
        vit.set_dropout_rng(DropoutRng::process_default());
        Ok(vit)
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Training mode (dropout on) for the model and every layer.
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        (0..self.layers.depth()).for_each(|i| self.layers.layer(i).set_training(training));
    }

    /// Draws every dropout stream of the model from `rng` (seeded training).
    pub fn set_dropout_rng(&mut self, rng: &DropoutRng) {
        self.dropout = rng.stream();
        self.layers.for_each_layer_mut(|l| l.set_dropout_rng(rng));
    }

    /// Hidden states, pooled state and logits of `pixel_values (B, K, H, W)`.
    ///
    /// # Errors
    /// An image of another size or channel count than the config's (the message gives both).
    pub fn forward(&self, pixel_values: &Tensor, need_weights: bool) -> Result<VitOutput> {
        let s = self.config.image_size;
        let dims = pixel_values.dims();
        ensure!(
            dims.len() == 4 && dims[2] == s && dims[3] == s,
            Self::OP,
            "pixel_values {} must be (B, {}, {s}, {s}): the model was trained on {s}×{s} images",
            shape_str(pixel_values),
            self.config.num_channels
        );
        let patches = self.patch_embed.forward(pixel_values)?; // (B, N, C)
        let b = patches.dim(0)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.config.d_model))?; // (B, 1, C)
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?; // (B, N+1, C)
        let mut x = ops::dropout_while_training(x, self.config.dropout, &self.training, &self.dropout)?;
        let mask = Mask::none();
        let ctx = LayerContext { mask: &mask, memory: None, opts: MhaOptions { need_weights, ..Default::default() } };
        let mut weights = Vec::new();
        for i in 0..self.layers.depth() {
            let o = self.layers.layer(i).forward(&x, &ctx, None)?;
            x = o.out;
            weights.extend(o.self_weights);
        }
        let hidden = self.norm.forward(&x)?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?; // (B, C): the class token
        let pooled = match &self.pooler {
            Some(p) => Some(p.forward(&first)?.tanh()?),
            None => None,
        };
        let logits = match &self.head {
            Some(h) => Some(h.forward(&first)?),
            None => None,
        };
        Ok(VitOutput { hidden, pooled, logits, weights })
    }

    /// Mean cross-entropy of the head's logits against `labels (B)`.
    pub fn loss(&self, pixel_values: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let Some(logits) = self.forward(pixel_values, false)?.logits else {
            crate::bail!(Self::OP, "the model has no classification head (n_labels)");
        };
        let labels = labels.to_dtype(candle_core::DType::I64)?;
        ops::cross_entropy(&logits, &labels, &CrossEntropyConfig::default(), Reduction::Mean)
    }

    /// The predicted label of each image, `(B)`.
    pub fn predict(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let Some(logits) = self.forward(pixel_values, false)?.logits else {
            crate::bail!(Self::OP, "the model has no classification head (n_labels)");
        };
        Ok(logits.argmax(D::Minus1)?)
    }
}
