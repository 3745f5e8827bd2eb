//! Graph attention: GAT (Veličković et al. 2018) and GATv2 (Brody et al. 2022) on an edge list, so a graph of 10⁵
//! edges costs memory in its edges, not a dense N × N adjacency.
//!
//! For an edge `j → i` (row 0 of `edge_index` the source `j`, row 1 the target `i`) and each head:
//!
//! - GAT: `e_ij = LeakyReLU(a_srcᵀ W x_j + a_dstᵀ W x_i)`, message `W x_j`;
//! - GATv2: `e_ij = aᵀ LeakyReLU(W_l x_j + W_r x_i)`, message `W_l x_j` (the attention is a function of the pair,
//!   not a sum of per-node terms, so it can rank neighbours differently for different targets).
//!
//! Then the classic path in its sparse form: the softmax over each node's incoming edges
//! ([`crate::ops::segment_softmax`]), dropout on the weights while training, and `out_i = Σ_j α_ij m_j`, heads
//! concatenated or averaged, plus a bias. With self-loops, existing loops are dropped and one loop per node is
//! appended (PyTorch Geometric's order, so `alpha` lines up with its `return_attention_weights`).
//!
//! Parameters carry PyTorch Geometric's names: `lin.weight`, `att_src`, `att_dst`, `bias` (GAT); `lin_l.weight`,
//! `lin_l.bias`, `lin_r.weight`, `lin_r.bias`, `att`, `bias` (GATv2).
//!
//! # Shapes
//! - `x`: `(N, F)`, `edge_index`: `(2, E)` integers → `out (N, H·C)` (concat) or `(N, C)` (mean), `alpha (E', H)`,
//!   `edge_index (2, E')` (the edges attended over, u32)
//!
//! ```
//! use attend::layers::gat::{Gat, GatConfig, GatVersion};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = GatConfig { heads: 2, ..GatConfig::new(4, 3, GatVersion::V2) };
//! let gat = Gat::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let x = Tensor::randn(0f32, 1., (5, 4), &dev)?;
//! let edges = Tensor::new(&[[0i64, 1, 2, 3], [1, 2, 3, 4]], &dev)?; // a path 0 → 1 → 2 → 3 → 4
//! let out = gat.forward(&x, &edges)?;
//! assert_eq!((out.out.dims(), out.alpha.dims()), (&[5, 6][..], &[9, 2][..])); // 4 edges + 5 self-loops
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{linear, linear_no_bias, Init, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::shape_str;
use crate::rng::{DropoutStream, TrainingFlag};
use crate::{bail, ensure, ops, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatVersion {
    V1,
    V2,
}

/// PyTorch Geometric's constructor arguments.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatConfig {
    pub in_channels: usize,
    /// Width `C` per head.
    pub out_channels: usize,
    pub heads: usize,
    /// Concatenate the heads (`H·C`) or average them (`C`).
    pub concat: bool,
    pub negative_slope: f64,
    pub add_self_loops: bool,
    /// Dropout on the attention weights while training.
    pub dropout: f64,
    pub bias: bool,
    pub version: GatVersion,
}

impl GatConfig {
    /// PyG's defaults: one head, concat, slope 0.2, self-loops, no dropout, bias.
    pub fn new(in_channels: usize, out_channels: usize, version: GatVersion) -> Self {
        Self {
            in_channels,
            out_channels,
            heads: 1,
            concat: true,
            negative_slope: 0.2,
            add_self_loops: true,
            dropout: 0.0,
            bias: true,
            version,
        }
    }
}

/// What [`Gat::forward`] returns.
#[derive(Clone, Debug)]
pub struct GraphOutput {
    pub out: Tensor,
    /// `(E', H)`: each edge's weight, summing to 1 over a node's incoming edges.
    pub alpha: Tensor,
    /// `(2, E')` u32: the edges `alpha` refers to.
    pub edge_index: Tensor,
}

#[derive(Clone, Debug)]
enum Weights {
    V1 { lin: Linear, att_src: Tensor, att_dst: Tensor },
    V2 { lin_l: Linear, lin_r: Linear, att: Tensor },
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Gat {
    weights: Weights,
    bias: Option<Tensor>,
    config: GatConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

/// LeakyReLU composed from differentiable ops: `relu(x) + slope·(x − relu(x))`.
fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let r = x.relu()?;
    Ok((&r + ((x - &r)? * slope)?)?)
}

impl Gat {
    const OP: &'static str = "graph attention";

    pub fn new(config: GatConfig, vb: VarBuilder) -> Result<Self> {
        let GatConfig { in_channels: f, out_channels: c, heads: h, .. } = config;
        ensure!(
            f > 0 && c > 0 && h > 0,
            Self::OP,
            "in_channels, out_channels and heads must be positive, got {config:?}"
        );
        ensure!((0.0..1.0).contains(&config.dropout), Self::OP, "dropout must be in [0, 1), got {}", config.dropout);
        let glorot = |fan_in: usize, fan_out: usize| {
            let b = (6.0 / (fan_in + fan_out) as f64).sqrt();
            Init::Uniform { lo: -b, up: b }
        };
        let weights = match config.version {
            GatVersion::V1 => Weights::V1 {
                lin: linear_no_bias(f, h * c, vb.pp("lin"))?,
                att_src: vb.get_with_hints((1, h, c), "att_src", glorot(h, c))?,
                att_dst: vb.get_with_hints((1, h, c), "att_dst", glorot(h, c))?,
            },
            GatVersion::V2 => Weights::V2 {
                lin_l: linear(f, h * c, vb.pp("lin_l"))?,
                lin_r: linear(f, h * c, vb.pp("lin_r"))?,
                att: vb.get_with_hints((1, h, c), "att", glorot(h, c))?,
            },
        };
        let width = if config.concat { h * c } else { c };
        let bias = if config.bias { Some(vb.get_with_hints(width, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weights, bias, config, training: TrainingFlag::default(), dropout: DropoutStream::default() })
    }

    pub fn config(&self) -> &GatConfig {
        &self.config
    }

    /// Training mode turns on attention dropout; layers start in evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.training.set(training)
    }

    pub fn set_dropout_stream(&mut self, stream: DropoutStream) {
        self.dropout = stream;
    }

    /// The edges attended over: `edge_index` checked against `n` nodes, with PyG's self-loop handling.
    fn edges(&self, edge_index: &Tensor, n: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        ensure!(
            edge_index.rank() == 2 && edge_index.dim(0)? == 2 && !edge_index.dtype().is_float(),
            Self::OP,
            "expected an integer edge_index (2, E), got {} {:?}",
            shape_str(edge_index),
            edge_index.dtype()
        );
        let ei: Vec<Vec<i64>> = edge_index.to_dtype(DType::I64)?.to_vec2()?;
        let (mut src, mut dst) = (Vec::with_capacity(ei[0].len() + n), Vec::with_capacity(ei[0].len() + n));
        for (e, (&j, &i)) in ei[0].iter().zip(&ei[1]).enumerate() {
            if j < 0 || i < 0 || j as usize >= n || i as usize >= n {
                bail!(Self::OP, "edge_index[:, {e}] = ({j}, {i}) is out of range for N = {n} nodes");
            }
            if self.config.add_self_loops && i == j {
                continue;
            }
            src.push(j as u32);
            dst.push(i as u32);
        }
        if self.config.add_self_loops {
            src.extend(0..n as u32);
            dst.extend(0..n as u32);
        }
        Ok((src, dst))
    }

    pub fn forward(&self, x: &Tensor, edge_index: &Tensor) -> Result<GraphOutput> {
        let GatConfig { in_channels: f, out_channels: c, heads: h, .. } = self.config;
        ensure!(x.rank() == 2 && x.dim(1)? == f, Self::OP, "expected x (N, F = {f}), got x {}", shape_str(x));
        let n = x.dim(0)?;
        let (src_v, dst_v) = self.edges(edge_index, n)?;
        let e = src_v.len();
        let dev = x.device();
        let src = Tensor::from_slice(&src_v, e, dev)?;
        let dst = Tensor::from_slice(&dst_v, e, dev)?;
        let slope = self.config.negative_slope;
        // 1. Scores per edge and head; the per-node features each edge's message is read from.
        let (scores, sources) = match &self.weights {
            Weights::V1 { lin, att_src, att_dst } => {
                let xw = lin.forward(x)?.reshape((n, h, c))?; // (N, H, C)
                let a_src = xw.broadcast_mul(att_src)?.sum(2)?; // (N, H)
                let a_dst = xw.broadcast_mul(att_dst)?.sum(2)?; // (N, H)
                let s = (a_src.index_select(&src, 0)? + a_dst.index_select(&dst, 0)?)?; // (E, H)
                (leaky_relu(&s, slope)?, xw)
            }
            Weights::V2 { lin_l, lin_r, att } => {
                let xl = lin_l.forward(x)?.reshape((n, h, c))?; // (N, H, C)
                let xr = lin_r.forward(x)?.reshape((n, h, c))?;
                // Each (source, target) pair through the non-linearity, fused: no (E, H, C) pairs in memory.
                (ops::gatv2_scores(&xl, &xr, att, &src_v, &dst_v, slope)?, xl)
            }
        };
        // 2. Normalise over each node's incoming edges.
        let alpha = ops::segment_softmax(&scores, &dst, &dst_v, n)?; // (E, H)
        let p = self.config.dropout;
        let dropped = if p > 0.0 && self.training.get() {
            ops::dropout(&alpha, p, self.dropout.next_seed(), 0)?
        } else {
            alpha.clone()
        };
        // 3. Weighted sum of the messages into their targets, without materialising them (E, H, C).
        let out = ops::edge_aggregate(&sources, &dropped, &src_v, &dst_v, n)?; // (N, H, C)
        let out = if self.config.concat { out.reshape((n, h * c))? } else { out.mean(1)? };
        let out = match &self.bias {
            Some(b) => out.broadcast_add(b)?,
            None => out,
        };
        Ok(GraphOutput { out, alpha, edge_index: Tensor::stack(&[&src, &dst], 0)? })
    }
}
