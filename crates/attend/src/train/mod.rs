//! What a training loop needs beside the model: seeded initialisation ([`init`]), AdamW over a model's variables
//! with weight decay on matrices only ([`optim`]), learning-rate schedules as pure functions of the step
//! ([`schedule`]), global gradient-norm clipping, and checkpoints that a resumed run continues from bit for bit
//! ([`crate::checkpoint::training`]).
//!
//! ```
//! use attend::train::{init::seeded_var_builder, optim::AdamW, schedule::Schedule};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarMap};
//! # fn main() -> attend::Result<()> {
//! let vm = VarMap::new();
//! let vb = seeded_var_builder(&vm, 7, DType::F32, &Device::Cpu);
//! let lin = candle_nn::linear(3, 1, vb.pp("lin"))?; // the same numbers for seed 7 on every machine
//! let mut opt = AdamW::new(&vm, attend_kernels::adamw::AdamW { lr: 0.1, ..Default::default() })?;
//! let sched = Schedule::WarmupCosine { warmup: 2, total: 20, min_ratio: 0.1 };
//! let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?;
//! for step in 0..20 {
//!     let loss = (lin.forward(&x)? - 1.0)?.sqr()?.sum_all()?;
//!     let grads = loss.backward()?;
//!     opt.step(&grads, 0.1 * sched.factor(step), Some(1.0))?;
//! }
//! let y = lin.forward(&x)?.to_vec2::<f32>()?[0][0];
//! assert!((y - 1.0).abs() < 0.1);
//! # Ok(()) }
//! ```

pub mod init;
pub mod optim;
pub mod schedule;
