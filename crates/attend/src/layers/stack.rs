//! Stacks of layers, with distinct parameters per layer or one set of parameters applied `N` times (the course's
//! "multi-layer attention with shared parameters"; ALBERT's cross-layer sharing; the Universal Transformer's
//! recurrence in depth). Sharing divides the parameters by `N` and keeps the compute; gradients of every
//! application add up in the one set.
//!
//! ```
//! use attend::layers::stack::Stack;
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{linear, VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! let shared = Stack::shared(4, |vb| Ok(linear(3, 3, vb)?), vb.pp("layer"))?;
//! assert_eq!(vm.all_vars().len(), 2); // one weight, one bias, applied 4 times
//! let y = shared.forward(&Tensor::ones((2, 3), DType::F32, &dev)?, |l, x| Ok(l.forward(x)?))?;
//! assert_eq!(y.dims(), &[2, 3]);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::{ensure, Result};

/// `N` applications of a layer type `L`: `N` layers, or one layer `N` times.
#[derive(Clone, Debug)]
pub struct Stack<L> {
    layers: Vec<L>,
    depth: usize,
}

impl<L> Stack<L> {
    /// `n` layers with their own parameters, built under `vb.pp(i)` for `i = 0..n` (the usual `layers.{i}.` names).
    pub fn distinct(n: usize, build: impl Fn(VarBuilder) -> Result<L>, vb: VarBuilder) -> Result<Self> {
        ensure!(n > 0, "stack", "a stack needs at least one layer");
        let layers = (0..n).map(|i| build(vb.pp(i.to_string()))).collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, depth: n })
    }

    /// One layer (parameters under `vb`) applied `n` times.
    pub fn shared(n: usize, build: impl Fn(VarBuilder) -> Result<L>, vb: VarBuilder) -> Result<Self> {
        ensure!(n > 0, "stack", "a stack needs at least one layer");
        Ok(Self { layers: vec![build(vb)?], depth: n })
    }

    /// How many times a layer is applied.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Whether one set of parameters serves every depth.
    pub fn is_shared(&self) -> bool {
        self.layers.len() == 1 && self.depth > 1
    }

    /// The layer applied at depth `i`.
    pub fn layer(&self, i: usize) -> &L {
        &self.layers[if self.layers.len() == 1 { 0 } else { i }]
    }

    /// Calls `f` on each distinct layer once (a shared stack has one).
    pub fn for_each_layer_mut(&mut self, f: impl FnMut(&mut L)) {
        self.layers.iter_mut().for_each(f)
    }

    /// Applies `step(layer, x)` at every depth in turn.
    pub fn forward(&self, x: &Tensor, step: impl Fn(&L, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        (0..self.depth).try_fold(x.clone(), |h, i| step(self.layer(i), &h))
    }
}
