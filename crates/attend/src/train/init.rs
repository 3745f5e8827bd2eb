//! Seeded parameter initialisation. candle draws a layer's initial values from an unseeded generator; training
//! runs that must reproduce (same seed, same losses) build their model through [`seeded_var_builder`] instead: each
//! variable is drawn from the layer's own [`Init`] hint with a generator keyed by `(seed, variable name)`, so the
//! numbers depend neither on the machine nor on the order in which layers are built.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::rng::sample;

/// A [`VarBuilder`] that creates missing variables in `vars` from seeded draws (and returns existing ones).
pub fn seeded_var_builder(vars: &VarMap, seed: u64, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededInit { vars: vars.clone(), seed }), dtype, dev.clone())
}

struct SeededInit {
    vars: VarMap,
    seed: u64,
}

/// FNV-1a of the name, mixed with the seed: one stream per variable.
fn seed_for(seed: u64, name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A tensor drawn as `init` says, from the stream `seed`.
pub fn draw(init: Init, shape: &Shape, seed: u64, dtype: DType, dev: &Device) -> crate::Result<Tensor> {
    let t = match init {
        Init::Const(c) => Tensor::ones(shape, DType::F64, dev)?.affine(c, 0.0)?,
        Init::Randn { mean, stdev } => sample::normal(seed, shape.clone(), DType::F64, dev)?.affine(stdev, mean)?,
        Init::Uniform { lo, up } => sample::uniform(seed, shape.clone(), DType::F64, dev)?.affine(up - lo, lo)?,
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    sample::uniform(seed, shape.clone(), DType::F64, dev)?.affine(2.0 * bound, -bound)?
                }
                NormalOrUniform::Normal => sample::normal(seed, shape.clone(), DType::F64, dev)?.affine(std, 0.0)?,
            }
        }
    };
    Ok(t.to_dtype(dtype)?)
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self.vars.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("variable `{name}` exists with shape {:?}, asked for {:?}", v.dims(), s.dims())
            }
            return Ok(v.as_tensor().clone());
        }
        let var = Var::from_tensor(&draw(init, &s, seed_for(self.seed, name), dtype, dev)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        let data = self.vars.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("variable `{name}` is not in the VarMap and has no shape to create it with"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_variables_in_any_build_order_and_hints_are_honoured() {
        let dev = Device::Cpu;
        let build = |seed: u64, reversed: bool| {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &dev);
            let mut names = vec!["a", "b"];
            if reversed {
                names.reverse();
            }
            for n in names {
                vb.get_with_hints((64, 32), n, Init::Uniform { lo: -0.5, up: 0.5 }).unwrap();
            }
            vb.get_with_hints(7, "c", Init::Const(0.25)).unwrap();
            let get =
                |n: &str| vm.data().lock().unwrap()[n].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (get("a"), get("b"), get("c"))
        };
        let (a, b, c) = build(3, false);
        assert_eq!((a.clone(), b.clone(), c.clone()), build(3, true));
        assert_ne!(a, build(4, false).0);
        assert_ne!(a, b);
        assert!(a.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05, "uniform(-0.5, 0.5) mean {mean}");
        assert_eq!(c, vec![0.25; 7]);
    }
}
