//! AdamW over a model's variables, in PyTorch's order of operations ([`attend_kernels::adamw`]), with weight decay
//! on tensors of rank ≥ 2 only (matrices and embeddings; not norms and biases, as nanoGPT and most recipes do),
//! optional clipping of the global gradient norm (`torch.nn.utils.clip_grad_norm_`), and moments that can be saved
//! and restored so a resumed run continues exactly.
//!
//! Variables without a gradient in a step are left alone (no decay, no moment update), as PyTorch skips parameters
//! whose `.grad` is `None`.

use std::collections::HashMap;

use attend_kernels::adamw::{adamw_step, AdamW as Hyper};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::{ensure, Error, Result};

const OP: &str = "AdamW";

struct Param {
    name: String,
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
    decay: bool,
}

/// See the module docs.
pub struct AdamW {
    params: Vec<Param>,
    steps: u64,
    hyper: Hyper,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("steps", &self.steps)
            .field("hyper", &self.hyper)
            .finish()
    }
}

impl AdamW {
    /// Every variable of `vars` (f32), sorted by name. `hyper.lr` is the base rate; [`step`](Self::step) takes the
    /// rate of each update.
    pub fn new(vars: &VarMap, hyper: Hyper) -> Result<Self> {
        let data = vars.data().lock().map_err(|_| Error::invalid(OP, "the VarMap's lock is poisoned"))?;
        let mut params: Vec<Param> = data
            .iter()
            .map(|(name, var)| {
                ensure!(
                    var.dtype() == DType::F32,
                    OP,
                    "variable `{name}` is {:?}; AdamW keeps f32 variables",
                    var.dtype()
                );
                let n = var.elem_count();
                Ok(Param {
                    name: name.clone(),
                    var: var.clone(),
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    decay: var.rank() >= 2,
                })
            })
            .collect::<Result<_>>()?;
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(AdamW { params, steps: 0, hyper })
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    /// One update at rate `lr`; with `max_grad_norm`, gradients are first scaled so that their global L2 norm is at
    /// most that (PyTorch's `clip_grad_norm_`: factor `max / (norm + 1e-6)`, capped at 1). Returns the norm before
    /// clipping.
    ///
    /// # Errors
    /// A gradient whose shape differs from its variable's.
    pub fn step(&mut self, grads: &GradStore, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let mut gs: Vec<Option<Vec<f32>>> = Vec::with_capacity(self.params.len());
        for p in &self.params {
            gs.push(match grads.get(p.var.as_tensor()) {
                Some(g) => {
                    ensure!(
                        g.dims() == p.var.dims(),
                        OP,
                        "gradient of `{}` is {:?}, the variable {:?}",
                        p.name,
                        g.dims(),
                        p.var.dims()
                    );
                    Some(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                }
                None => None,
            });
        }
        let norm = gs.iter().flatten().flat_map(|g| g.iter()).map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let scale = match max_grad_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.steps += 1;
        for (p, g) in self.params.iter_mut().zip(gs) {
            let Some(mut g) = g else { continue };
            if scale != 1.0 {
                g.iter_mut().for_each(|x| *x = (*x as f64 * scale) as f32);
            }
            let mut vals = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let hp = Hyper { lr, weight_decay: if p.decay { self.hyper.weight_decay } else { 0.0 }, ..self.hyper };
            adamw_step(&hp, self.steps, &mut vals, &g, &mut p.m, &mut p.v);
            p.var.set(&Tensor::from_vec(vals, p.var.shape(), p.var.device())?)?;
        }
        Ok(norm)
    }

    /// The moments as tensors named `<variable>.exp_avg` and `<variable>.exp_avg_sq` (PyTorch's state names).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let dev = p.var.device();
            out.insert(format!("{}.exp_avg", p.name), Tensor::from_slice(&p.m, p.var.shape(), dev)?);
            out.insert(format!("{}.exp_avg_sq", p.name), Tensor::from_slice(&p.v, p.var.shape(), dev)?);
        }
        Ok(out)
    }

    /// Restores moments written by [`state`](Self::state) and the step count.
    ///
    /// # Errors
    /// A moment missing or of another shape than its variable (the message names it).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            for (suffix, buf) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let name = format!("{}.{suffix}", p.name);
                let t = state.get(&name).ok_or_else(|| Error::MissingTensor {
                    name: name.clone(),
                    location: "the optimiser state".into(),
                })?;
                ensure!(t.dims() == p.var.dims(), OP, "`{name}` is {:?}; the variable is {:?}", t.dims(), p.var.dims());
                *buf = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
