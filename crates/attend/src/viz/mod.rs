//! What a model attends to, for a person to look at: each layer's attention weights from the model's normal forward
//! (the fused kernel's weight side channel, [`crate::attention::AttentionOptions::need_weights`]), the summaries that
//! find the heads worth looking at, attention rollout across layers, and a self-contained HTML page ([`html`]).
//!
//! # Shapes
//! - one sequence of `T` tokens; `L` layers of `H` heads
//! - [`AttentionMaps::layer`]: `(H, T, T)` row-major, rows are queries (each sums to 1, or 0 where fully masked)
//! - [`AttentionMaps::rollout`]: `L` matrices `(T, T)`; [`HeadSummary`] fields: `(L, H)`
//!
//! # Example
//! ```
//! use attend::viz::AttentionMaps;
//! use candle_core::{Device, Tensor};
//! // One layer, one head, three tokens: every query attends to the first token.
//! let w = Tensor::from_vec(vec![1f32, 0., 0., 1., 0., 0., 1., 0., 0.], (1, 1, 3, 3), &Device::Cpu)?;
//! let tokens = vec!["[CLS]".to_string(), "hi".into(), "[SEP]".into()];
//! let maps = AttentionMaps::new(tokens, vec![true, false, true], &[w], false)?;
//! let s = maps.summary();
//! assert_eq!(s.special[0][0], 1.0); // all mass on special tokens
//! let r = maps.rollout()?;
//! assert!((r[0][3] - 0.5).abs() < 1e-6); // row 1: half residual, half to token 0
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod flow;
pub mod html;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::shape_str;
use crate::{bail, ensure, Result};

const OP: &str = "viz";

/// The longest sequence [`AttentionMaps::flow`] takes (one max-flow per pair of positions).
pub const FLOW_MAX_TOKENS: usize = 64;

/// The attention weights of every layer of one forward over one sequence, with its tokens.
#[derive(Clone, Debug)]
pub struct AttentionMaps {
    /// Token labels, as a person reads them.
    pub tokens: Vec<String>,
    /// Which tokens are special (`[CLS]`, `[SEP]`, `<s>`, ...): the head summary measures the mass they draw.
    pub special: Vec<bool>,
    /// Whether the model is causal (a query sees only earlier keys).
    pub causal: bool,
    heads: usize,
    /// One `(H, T, T)` per layer, row-major.
    layers: Vec<Vec<f32>>,
}

/// Per-head numbers that say which heads are worth opening, each `(L, H)`, averaged over query rows.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadSummary {
    /// `−Σ_j a_ij ln a_ij`: low for a head that looks at one token, `ln T` for a uniform one.
    pub entropy: Vec<Vec<f32>>,
    /// `Σ_j a_ij |i − j|`: how far a head looks (≈ 1 for a previous/next-token head).
    pub distance: Vec<Vec<f32>>,
    /// The mass on special tokens: high for the "no-op" heads that park attention on `[CLS]`/`[SEP]`.
    pub special: Vec<Vec<f32>>,
}

impl AttentionMaps {
    /// `weights`: one `(B = 1, H, T, T)` or `(H, T, T)` tensor per layer, as a model's forward returns them.
    pub fn new(tokens: Vec<String>, special: Vec<bool>, weights: &[Tensor], causal: bool) -> Result<Self> {
        let t = tokens.len();
        ensure!(t > 0, OP, "no tokens to show");
        ensure!(!weights.is_empty(), OP, "the model returned no attention weights");
        ensure!(special.len() == t, OP, "{} special-token flags for {t} tokens", special.len());
        let mut heads = 0;
        let mut layers = Vec::with_capacity(weights.len());
        for (l, w) in weights.iter().enumerate() {
            let w = match w.rank() {
                4 if w.dim(0)? == 1 => w.squeeze(0)?,
                3 => w.clone(),
                _ => bail!(OP, "layer {l}: expected weights (1, H, T, T) or (H, T, T), got {}", shape_str(w)),
            };
            let (h, tq, tk) = w.dims3()?;
            ensure!(
                tq == t && tk == t && (l == 0 || h == heads),
                OP,
                "layer {l}: weights {} do not fit {t} tokens{}",
                shape_str(&w),
                if l > 0 { format!(" and {heads} heads") } else { String::new() }
            );
            heads = h;
            layers.push(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Self { tokens, special, causal, heads, layers })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn num_heads(&self) -> usize {
        self.heads
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Layer `l`'s weights, `(H, T, T)` row-major.
    pub fn layer(&self, l: usize) -> &[f32] {
        &self.layers[l]
    }

    /// Head `h` of layer `l`, `(T, T)` row-major.
    pub fn head(&self, l: usize, h: usize) -> &[f32] {
        let tt = self.len() * self.len();
        &self.layers[l][h * tt..(h + 1) * tt]
    }

    /// Checks a layer and head selection against the model: `layer` (one layer or all) and `heads` (some or all).
    pub fn check_selection(&self, layer: Option<usize>, heads: Option<&[usize]>) -> Result<()> {
        if let Some(l) = layer {
            ensure!(
                l < self.num_layers(),
                OP,
                "layer {l} does not exist: the model has layers 0..{}",
                self.num_layers()
            );
        }
        for &h in heads.unwrap_or(&[]) {
            ensure!(h < self.heads, OP, "head {h} does not exist: the model has heads 0..{}", self.heads);
        }
        Ok(())
    }

    /// Attention rollout (Abnar & Zuidema 2020): `Â_l = (mean_h A_l + I) / 2` (the residual stream as half of
    /// each layer's mixing, rows renormalised), `R_0 = Â_0`, `R_l = Â_l R_{l−1}`: row `i` of `R_l` says how much
    /// each input token contributes to position `i` after layer `l`. `L` matrices `(T, T)`.
    pub fn rollout(&self) -> Result<Vec<Vec<f32>>> {
        let t = self.len();
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(self.num_layers());
        let mut joint: Option<Tensor> = None;
        for l in 0..self.num_layers() {
            // A fully masked row keeps only the residual.
            let aug = self.augmented(l);
            let aug = Tensor::from_vec(aug, (t, t), &candle_core::Device::Cpu)?;
            let next = match &joint {
                None => aug,
                Some(prev) => aug.matmul(prev)?, // (T, T)
            };
            out.push(next.flatten_all()?.to_vec1::<f32>()?);
            joint = Some(next);
        }
        Ok(out)
    }

    /// The residual-augmented head mean `Â_l = (mean_h A_l + I) / 2` of layer `l` (rows renormalised), `(T, T)`: the
    /// mixing matrix rollout multiplies and flow takes its capacities from.
    fn augmented(&self, l: usize) -> Vec<f32> {
        let t = self.len();
        let mut aug = vec![0f32; t * t];
        for h in 0..self.heads {
            for (a, &w) in aug.iter_mut().zip(self.head(l, h)) {
                *a += w;
            }
        }
        aug.par_chunks_exact_mut(t).enumerate().for_each(|(i, row)| {
            row.iter_mut().for_each(|v| *v /= self.heads as f32);
            row[i] += 1.0;
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        });
        aug
    }

    /// Attention flow into the last layer (Abnar & Zuidema 2020): the layers as a graph whose edge from position `i`
    /// after layer `l` to position `j` before it has capacity `Â_l[i, j]`; row `i` of the result is the maximum flow
    /// from position `i` after the last layer to each input token, normalised to sum to 1. `(T, T)`. One max-flow per
    /// (position, input) pair, so the cost grows as `L·T⁴` at worst: refused past [`FLOW_MAX_TOKENS`] tokens.
    pub fn flow(&self) -> Result<Vec<f32>> {
        let t = self.len();
        ensure!(t <= FLOW_MAX_TOKENS, OP, "attention flow is computed for up to {FLOW_MAX_TOKENS} tokens, not {t}");
        let layers: Vec<Vec<f32>> = (0..self.num_layers()).map(|l| self.augmented(l)).collect();
        let net = flow::Network::layered(&layers, t);
        let top = self.num_layers() * t;
        let rows: Vec<Vec<f32>> = (0..t)
            .into_par_iter()
            .map(|i| {
                let mut row: Vec<f64> = (0..t).map(|j| net.max_flow(top + i, j)).collect();
                let s: f64 = row.iter().sum();
                if s > 0.0 {
                    row.iter_mut().for_each(|v| *v /= s);
                }
                row.into_iter().map(|v| v as f32).collect()
            })
            .collect();
        Ok(rows.concat())
    }

    /// Entropy, distance and special-token mass of every head (one pass over each head's weights).
    pub fn summary(&self) -> HeadSummary {
        let t = self.len();
        let stats: Vec<[f32; 3]> = (0..self.num_layers() * self.heads)
            .into_par_iter()
            .map(|lh| {
                let m = self.head(lh / self.heads, lh % self.heads);
                let mut acc = [0f64; 3];
                for (i, row) in m.chunks_exact(t).enumerate() {
                    let (mut ent, mut dist, mut spec) = (0f32, 0f32, 0f32);
                    for (j, &a) in row.iter().enumerate() {
                        if a > 0.0 {
                            ent -= a * a.ln();
                        }
                        dist += a * i.abs_diff(j) as f32;
                        if self.special[j] {
                            spec += a;
                        }
                    }
                    acc[0] += ent as f64;
                    acc[1] += dist as f64;
                    acc[2] += spec as f64;
                }
                acc.map(|v| (v / t as f64) as f32)
            })
            .collect();
        let table = |k: usize| stats.chunks(self.heads).map(|l| l.iter().map(|s| s[k]).collect()).collect();
        HeadSummary { entropy: table(0), distance: table(1), special: table(2) }
    }
}
