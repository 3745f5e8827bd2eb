//! Checkpoint name tables: how other libraries' parameter names and layouts map onto attend's. One module, one
//! explicit table per source, with shape checks, so that a checkpoint maps one to one and a mismatch is an error
//! naming the tensor (never a silent partial load).

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::shape_str;
use crate::{ensure, Error, Result};

/// Renames a `torch.nn.MultiheadAttention` state dict to [`MultiHeadAttention`]'s checkpoint names.
///
/// | PyTorch (`prefix.`…) | attend (`prefix.`…) |
/// |---|---|
/// | `in_proj_weight` `(3C, C)`, rows `0..C`, `C..2C`, `2C..3C` | `q_proj.weight`, `k_proj.weight`, `v_proj.weight` |
/// | `q_proj_weight`, `k_proj_weight`, `v_proj_weight` (when `kdim`/`vdim` ≠ `C`) | `q_proj.weight`, `k_proj.weight`, `v_proj.weight` |
/// | `in_proj_bias` `(3C)`, thirds in the same order | `q_proj.bias`, `k_proj.bias`, `v_proj.bias` |
/// | `out_proj.weight`, `out_proj.bias` | `out_proj.weight`, `out_proj.bias` |
///
/// `prefix` is the module's path (`""` for a bare module); keys outside it are ignored. The result loads with
/// `VarBuilder::from_tensors(map, dtype, device).pp(prefix)`.
///
/// # Errors
/// `bias_k`/`bias_v` (`add_bias_kv=True` has no counterpart here), neither packed nor separate input weights, or a
/// packed tensor whose first dimension is not `3C` for the `C` of `out_proj.weight`.
pub fn import_torch_mha(state: &HashMap<String, Tensor>, prefix: &str) -> Result<HashMap<String, Tensor>> {
    const OP: &str = "import_torch_mha";
    let key = |n: &str| if prefix.is_empty() { n.to_string() } else { format!("{prefix}.{n}") };
    let get = |n: &str| state.get(&key(n));
    let missing =
        |n: &str| Error::MissingTensor { name: key(n), location: "the nn.MultiheadAttention state dict".into() };
    for n in ["bias_k", "bias_v"] {
        ensure!(get(n).is_none(), OP, "`{}` (add_bias_kv=True) is not supported", key(n));
    }
    let out_w = get("out_proj.weight").ok_or_else(|| missing("out_proj.weight"))?;
    let c = out_w.dim(0)?;
    let mut map = HashMap::new();
    map.insert(key("out_proj.weight"), out_w.clone());
    if let Some(b) = get("out_proj.bias") {
        map.insert(key("out_proj.bias"), b.clone());
    }
    let thirds = |t: &Tensor, name: &str| -> Result<Vec<Tensor>> {
        ensure!(
            t.dim(0)? == 3 * c,
            OP,
            "`{}` {} should have 3·C = {} rows (C = {c} from out_proj.weight)",
            key(name),
            shape_str(t),
            3 * c
        );
        Ok((0..3).map(|i| t.narrow(0, i * c, c)).collect::<candle_core::Result<Vec<_>>>()?)
    };
    match get("in_proj_weight") {
        Some(w) => {
            for (n, part) in ["q", "k", "v"].iter().zip(thirds(w, "in_proj_weight")?) {
                map.insert(key(&format!("{n}_proj.weight")), part);
            }
        }
        None => {
            for n in ["q", "k", "v"] {
                let name = format!("{n}_proj_weight");
                let w = get(&name).ok_or_else(|| {
                    if n == "q" {
                        Error::invalid(OP, format!("neither `{}` nor `{}` present", key("in_proj_weight"), key(&name)))
                    } else {
                        missing(&name)
                    }
                })?;
                map.insert(key(&format!("{n}_proj.weight")), w.clone());
            }
        }
    }
    if let Some(bias) = get("in_proj_bias") {
        for (n, part) in ["q", "k", "v"].iter().zip(thirds(bias, "in_proj_bias")?) {
            map.insert(key(&format!("{n}_proj.bias")), part);
        }
    }
    Ok(map)
}
