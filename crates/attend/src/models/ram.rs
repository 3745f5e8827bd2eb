//! The recurrent attention model ("Recurrent Models of Visual Attention", Mnih et al. 2014): hard attention over
//! an image, trained with REINFORCE. The model never sees the whole image; it takes `N` glimpses and decides where
//! to look next.
//!
//! At glimpse `t` with location `l_t ∈ [−1, 1]²` (−1 the left/top edge):
//! 1. **glimpse sensor** ρ(x, l): `k` square patches centred at `l`, of sides `g, 2g, 4g, …`, each average-pooled to
//!    `g × g` (a retina: sharp at the centre, coarse around it);
//! 2. **glimpse network**: `g_t = relu(W_gg relu(W_g ρ) + W_lg relu(W_l l))`;
//! 3. **core network**: `h_t = relu(W_h h_{t−1} + W_x g_t)`;
//! 4. **location network**: `μ = tanh(W_μ h_t)` (on the detached `h_t`: only REINFORCE trains it), the next location
//!    drawn from `N(μ, σ²)` and clipped to the image (training), or `μ` itself (evaluation);
//! 5. **baseline** `b_t = W_b h_t` (detached input), trained to predict the reward;
//! 6. after the last glimpse, the **action network** classifies: `logits = W_a h_N`.
//!
//! The reward is 1 for a correct classification. [`RamOutput::loss`] adds the cross-entropy, the REINFORCE loss of
//! the location choices with the baseline subtracted ([`crate::layers::hard::reinforce`]) and the baseline's squared
//! error. The first location is drawn uniformly.
//!
//! # Shapes
//! - `images`: `(B, C, H, W)` → logits `(B, classes)`, locations `(B, N, 2)` (x, y), log-probabilities and baselines
//!   `(B, N − 1)`
//!
//! ```
//! use attend::models::ram::{Ram, RamConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = RamConfig { channels: 1, patch: 4, scales: 2, glimpses: 3, classes: 10, ..RamConfig::default() };
//! let ram = Ram::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! ram.set_training(true);
//! let images = Tensor::rand(0f32, 1., (2, 1, 28, 28), &dev)?;
//! let out = ram.forward(&images, 42)?;
//! assert_eq!(out.locations.dims(), &[2, 3, 2]);
//! let loss = out.loss(&Tensor::new(&[3u32, 7], &dev)?)?;
//! loss.total.backward()?;
//! # Ok(()) }
//! ```

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::shape_str;
use crate::layers::hard::reinforce;
use crate::rng::{sample, TrainingFlag};
use crate::{ensure, ops, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RamConfig {
    pub channels: usize,
    /// Side `g` of a glimpse patch (the paper: 8 on 28 × 28 digits).
    pub patch: usize,
    /// Patches per glimpse `k` (the paper: 1 to 3).
    pub scales: usize,
    /// Glimpses per image `N` (the paper: 6).
    pub glimpses: usize,
    pub classes: usize,
    /// Widths of `h_g` and `h_l` (the paper: 128) and of the glimpse vector and core state (256).
    pub glimpse_hidden: usize,
    pub location_hidden: usize,
    pub hidden: usize,
    /// Standard deviation of the location policy (in units of half the image, the paper: 0.17 … 0.22).
    pub location_std: f64,
}

impl Default for RamConfig {
    fn default() -> Self {
        Self {
            channels: 1,
            patch: 8,
            scales: 1,
            glimpses: 6,
            classes: 10,
            glimpse_hidden: 128,
            location_hidden: 128,
            hidden: 256,
            location_std: 0.17,
        }
    }
}

/// The retina: `k` patches around a location, each pooled to `g × g`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlimpseSensor {
    pub patch: usize,
    pub scales: usize,
}

impl GlimpseSensor {
    /// The glimpses of `images` `(B, C, H, W)` at `locations` `(B, 2)` (x, y in [−1, 1]): `(B, k·C·g·g)`.
    /// Outside the image counts as zero.
    pub fn read(&self, images: &Tensor, locations: &[[f64; 2]]) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        ensure!(locations.len() == b, "glimpse sensor", "{} locations for {b} images", locations.len());
        let largest = self.patch << (self.scales - 1);
        // Zero padding of half the largest patch on every side, so every crop lies inside the padded image.
        let pad = largest / 2 + 1;
        let padded = images.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?; // (B, C, H + 2p, W + 2p)
        let mut rows = Vec::with_capacity(b);
        for (bi, l) in locations.iter().enumerate() {
            // Centre in pixels of the unpadded image.
            let cx = ((l[0].clamp(-1.0, 1.0) + 1.0) / 2.0 * w as f64).round() as usize;
            let cy = ((l[1].clamp(-1.0, 1.0) + 1.0) / 2.0 * h as f64).round() as usize;
            let img = padded.get(bi)?; // (C, H + 2p, W + 2p)
            let mut parts = Vec::with_capacity(self.scales);
            for s in 0..self.scales {
                let side = self.patch << s;
                let (top, left) = (cy + pad - side / 2, cx + pad - side / 2);
                let crop = img.narrow(1, top, side)?.narrow(2, left, side)?.unsqueeze(0)?; // (1, C, side, side)
                let pooled = if s == 0 { crop } else { crop.avg_pool2d(1 << s)? }; // (1, C, g, g)
                parts.push(pooled.flatten_all()?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
        }
        Ok(Tensor::stack(&rows, 0)?.reshape((b, self.scales * c * self.patch * self.patch))?)
    }
}

/// What [`Ram::forward`] returns.
#[derive(Clone, Debug)]
pub struct RamOutput {
    /// `(B, classes)`
    pub logits: Tensor,
    /// `(B, N, 2)`: where each glimpse looked.
    pub locations: Tensor,
    /// `(B, N − 1)`: `log π(l_t)` of the chosen locations (Gaussian density, differentiable in `μ`).
    pub log_probs: Tensor,
    /// `(B, N − 1)`
    pub baselines: Tensor,
}

/// The losses of one batch.
#[derive(Clone, Debug)]
pub struct RamLoss {
    /// classification + REINFORCE + baseline
    pub total: Tensor,
    pub classification: Tensor,
    pub reinforce: Tensor,
    pub baseline: Tensor,
    /// Share of correct classifications (the mean reward).
    pub accuracy: f64,
}

impl RamOutput {
    /// The hybrid loss for `labels` `(B)`: cross-entropy for the action network, REINFORCE (reward 1 when correct,
    /// the baseline subtracted) for the location network, squared error for the baseline.
    pub fn loss(&self, labels: &Tensor) -> Result<RamLoss> {
        let b = self.logits.dim(0)?;
        ensure!(labels.dims() == [b], "ram loss", "labels {} must be (B) = ({b})", shape_str(labels));
        let labels = labels.to_dtype(DType::I64)?;
        let cfg = ops::CrossEntropyConfig { ignore_index: -100, label_smoothing: 0.0 };
        let classification = ops::cross_entropy(&self.logits, &labels, &cfg, ops::Reduction::Mean)?;
        let predicted = self.logits.argmax(1)?.to_dtype(DType::I64)?;
        let reward = predicted.eq(&labels)?.to_dtype(self.logits.dtype())?; // (B)
        let accuracy = reward.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (reinforce_loss, baseline) = if self.log_probs.dim(1)? == 0 {
            let zero = Tensor::zeros((), self.logits.dtype(), self.logits.device())?;
            (zero.clone(), zero)
        } else {
            let r = reinforce(&self.log_probs, &reward, &self.baselines)?;
            (r.policy, r.baseline)
        };
        let total = ((&classification + &reinforce_loss)? + &baseline)?;
        Ok(RamLoss { total, classification, reinforce: reinforce_loss, baseline, accuracy })
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Ram {
    sensor: GlimpseSensor,
    fc_g: Linear,
    fc_l: Linear,
    fc_gg: Linear,
    fc_lg: Linear,
    fc_h: Linear,
    fc_x: Linear,
    fc_loc: Linear,
    fc_baseline: Linear,
    fc_action: Linear,
    config: RamConfig,
    training: TrainingFlag,
}

impl Ram {
    const OP: &'static str = "recurrent attention model";

    pub fn new(config: RamConfig, vb: VarBuilder) -> Result<Self> {
        let RamConfig {
            channels,
            patch,
            scales,
            glimpses,
            classes,
            glimpse_hidden,
            location_hidden,
            hidden,
            location_std,
        } = config;
        ensure!(
            [channels, patch, scales, glimpses, classes, glimpse_hidden, location_hidden, hidden]
                .iter()
                .all(|&x| x > 0),
            Self::OP,
            "sizes must be positive, got {config:?}"
        );
        ensure!(location_std > 0.0, Self::OP, "location_std must be positive, got {location_std}");
        let retina = scales * channels * patch * patch;
        Ok(Self {
            sensor: GlimpseSensor { patch, scales },
            fc_g: linear(retina, glimpse_hidden, vb.pp("glimpse.fc_g"))?,
            fc_l: linear(2, location_hidden, vb.pp("glimpse.fc_l"))?,
            fc_gg: linear(glimpse_hidden, hidden, vb.pp("glimpse.fc_gg"))?,
            fc_lg: linear(location_hidden, hidden, vb.pp("glimpse.fc_lg"))?,
            fc_h: linear(hidden, hidden, vb.pp("core.fc_h"))?,
            fc_x: linear(hidden, hidden, vb.pp("core.fc_x"))?,
            fc_loc: linear(hidden, 2, vb.pp("location.fc"))?,
            fc_baseline: linear(hidden, 1, vb.pp("baseline.fc"))?,
            fc_action: linear(hidden, classes, vb.pp("action.fc"))?,
            config,
            training: TrainingFlag::default(),
        })
    }

    pub fn config(&self) -> &RamConfig {
        &self.config
    }

    /// Training mode samples locations from the policy; evaluation follows its mean.
    pub fn set_training(&self, training: bool) {
        self.training.set(training)
    }

    pub fn sensor(&self) -> GlimpseSensor {
        self.sensor
    }

    /// Takes the glimpses of `images`; `seed` drives the first location and the policy's samples.
    pub fn forward(&self, images: &Tensor, seed: u64) -> Result<RamOutput> {
        let c = self.config.channels;
        ensure!(
            images.rank() == 4 && images.dim(1)? == c,
            Self::OP,
            "expected images (B, C = {c}, H, W), got {}",
            shape_str(images)
        );
        let (b, dev, dtype) = (images.dim(0)?, images.device().clone(), images.dtype());
        let sigma = self.config.location_std;
        let mut loc = sample::uniform(seed, (b, 2), dtype, &dev)?.affine(2.0, -1.0)?; // (B, 2)
        let mut h = Tensor::zeros((b, self.config.hidden), dtype, &dev)?;
        let (mut locations, mut log_probs, mut baselines) = (vec![], vec![], vec![]);
        for t in 0..self.config.glimpses {
            let at: Vec<[f64; 2]> =
                loc.to_dtype(DType::F64)?.to_vec2::<f64>()?.into_iter().map(|v| [v[0], v[1]]).collect();
            locations.push(loc.clone());
            let rho = self.sensor.read(images, &at)?; // (B, k·C·g·g)
            let hg = self.fc_g.forward(&rho)?.relu()?;
            let hl = self.fc_l.forward(&loc)?.relu()?;
            let g = (self.fc_gg.forward(&hg)? + self.fc_lg.forward(&hl)?)?.relu()?; // (B, hidden)
            h = (self.fc_h.forward(&h)? + self.fc_x.forward(&g)?)?.relu()?;
            if t + 1 == self.config.glimpses {
                break;
            }
            // The policy and the baseline read the state without training the core through REINFORCE's noise.
            let hd = h.detach();
            let mu = self.fc_loc.forward(&hd)?.tanh()?; // (B, 2)
            let next = if self.training.get() {
                let eps = sample::normal(seed ^ (0x5eed_0000 + t as u64), (b, 2), dtype, &dev)?;
                (&mu + (eps * sigma)?)?.clamp(-1f64, 1f64)?.detach()
            } else {
                mu.detach()
            };
            // log N(l; μ, σ²) summed over x and y.
            let z = ((&next - &mu)? / sigma)?;
            let lp = ((z.sqr()? * -0.5)? - (sigma * (2.0 * std::f64::consts::PI).sqrt()).ln())?.sum(1)?; // (B)
            log_probs.push(lp);
            baselines.push(self.fc_baseline.forward(&hd)?.squeeze(1)?);
            loc = next;
        }
        let stack = |v: Vec<Tensor>| -> Result<Tensor> {
            Ok(if v.is_empty() { Tensor::zeros((b, 0), dtype, &dev)? } else { Tensor::stack(&v, 1)? })
        };
        Ok(RamOutput {
            logits: self.fc_action.forward(&h)?,
            locations: Tensor::stack(&locations, 1)?,
            log_probs: stack(log_probs)?,
            baselines: stack(baselines)?,
        })
    }
}
