//! Checkpoint name tables: how other libraries' parameter names and layouts map onto attend's. One module, one
//! explicit table per source, with shape checks, so that a checkpoint maps one to one and a mismatch is an error
//! naming the tensor (never a silent partial load).

pub mod hf;
pub mod training;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

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

/// A state dict loaded strictly: a layer built from [`StrictTensors::var_builder`] gets each tensor it asks for
/// under its exact name and shape, a missing or misshapen tensor is an error naming it and both shapes, and
/// [`StrictTensors::unused`] lists what no layer asked for (a misspelt or foreign name; a silent partial load is the
/// bug this prevents). Tensors keep their autograd graph, so a layer built over variables trains them.
#[derive(Clone, Debug)]
pub struct StrictTensors {
    inner: std::sync::Arc<StrictInner>,
}

#[derive(Debug)]
struct StrictInner {
    tensors: HashMap<String, Tensor>,
    /// Where the tensors came from, for messages (`params.safetensors`).
    source: String,
    /// How messages name a tensor when its file calls it something else (`h.0.attn.c_attn.weight`, transposed).
    labels: HashMap<String, String>,
    used: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl StrictTensors {
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        Self::with_labels(tensors, source, HashMap::new())
    }

    /// As [`new`](Self::new), with `labels[name]` naming tensor `name` in messages (its name in the source file).
    pub fn with_labels(
        tensors: HashMap<String, Tensor>,
        source: impl Into<String>,
        labels: HashMap<String, String>,
    ) -> Self {
        let inner = StrictInner { tensors, source: source.into(), labels, used: Default::default() };
        Self { inner: std::sync::Arc::new(inner) }
    }

    /// How messages name `name`.
    fn label(&self, name: &str) -> String {
        match self.inner.labels.get(name) {
            Some(l) => format!("{l}` (attend `{name}`"),
            None => name.to_string(),
        }
    }

    /// A `VarBuilder` over these tensors; every lookup is recorded.
    pub fn var_builder(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The names no lookup asked for, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.inner.used.lock().expect("lookup set");
        let mut v: Vec<String> = self.inner.tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// Whether a tensor `name` is present (not recorded as a use).
    pub fn contains(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }

    /// The tensor `name` if present, not recorded as a use: for reading sizes before a layer loads it.
    pub fn peek(&self, name: &str) -> Option<Tensor> {
        self.inner.tensors.get(name).cloned()
    }

    /// The tensor `name` if present (recorded as used), without a shape check.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        let t = self.inner.tensors.get(name)?;
        self.inner.used.lock().expect("lookup set").insert(name.to_string());
        Some(t.clone())
    }
}

impl candle_nn::var_builder::SimpleBackend for StrictTensors {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let src = &self.inner.source;
        let Some(t) = StrictTensors::get(self, name) else {
            if self.inner.labels.contains_key(name) {
                let label = self.label(name);
                let close = if label.contains('(') { ")" } else { "" };
                candle_core::bail!("{src}: missing tensor `{label}{close} of shape {:?}", s.dims())
            }
            let mut held: Vec<&str> = self.inner.tensors.keys().map(String::as_str).collect();
            held.sort_unstable();
            let held = if held.is_empty() { "nothing".to_string() } else { held.join(", ") };
            candle_core::bail!("{src}: missing parameter `{name}` of shape {:?}; it holds {held}", s.dims())
        };
        if t.shape() != &s {
            let label = self.label(name);
            let close = if label.contains('(') { ")" } else { "" };
            candle_core::bail!("{src}: parameter `{label}{close} has shape {:?}, expected {:?}", t.dims(), s.dims())
        }
        t.to_dtype(dtype)?.to_device(dev)
    }
    fn get_unchecked(
        &self,
        name: &str,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let src = &self.inner.source;
        match StrictTensors::get(self, name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("{src}: missing parameter `{name}`"),
        }
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced, then renamed over `path`, so
/// a reader (or a crash) sees the old file or the complete new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_err = |msg: String| Error::File { path: path.to_path_buf(), msg };
    let file_name = path.file_name().ok_or_else(|| file_err("not a file path".into()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(format!("cannot write: {e}")));
    }
    Ok(())
}

/// Writes named tensors (and string metadata) as one safetensors file, atomically ([`write_atomic`]).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|&(n, t)| (n, t)), Some(metadata))
        .map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot serialize: {e}") })?;
    write_atomic(path, &bytes)
}
