//! Safetensors files for the commands: named tensors read with checks whose errors name the file, the tensor and
//! its shape; outputs written atomically (a temporary file in the same directory, synced, then renamed).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::errors;

/// The tensors of one safetensors file that a command asked for.
pub struct TensorFile {
    path: PathBuf,
    /// Every name in the file, sorted, for error messages.
    names: Vec<String>,
    tensors: HashMap<String, Tensor>,
}

impl TensorFile {
    /// Reads `path` and loads the tensors in `wanted` that it holds (others are left on disk). PyTorch `bool`
    /// tensors are loaded as `u8`.
    pub fn open(path: &Path, wanted: &[&str], device: &Device) -> Result<Self> {
        Self::read(path, Some(wanted), device)
    }

    /// Reads every tensor of `path`.
    pub fn open_all(path: &Path, device: &Device) -> Result<Self> {
        Self::read(path, None, device)
    }

    /// The tensors of `path` named in `wanted`, or all of them.
    fn read(path: &Path, wanted: Option<&[&str]>, device: &Device) -> Result<Self> {
        let shown = path.display();
        let bytes = fs::read(path).map_err(|e| anyhow!("{shown}: cannot read: {e}"))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{shown}: not a safetensors file: {e}"))?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let mut tensors = HashMap::new();
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        for &name in wanted.unwrap_or(&all) {
            let Ok(view) = st.tensor(name) else { continue };
            let t = if view.dtype() == Dtype::BOOL {
                Tensor::from_raw_buffer(view.data(), DType::U8, view.shape(), device)
            } else {
                view.load(device)
            };
            let t = t.map_err(|e| {
                anyhow!(
                    "{shown}: tensor `{name}` {:?} of dtype {:?}: {}",
                    view.shape(),
                    view.dtype(),
                    errors::candle(&e)
                )
            })?;
            tensors.insert(name.to_string(), t);
        }
        Ok(Self { path: path.to_path_buf(), names, tensors })
    }

    /// Every name in the file, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The loaded tensors by name.
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`, if the file holds it.
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// The tensor `name` (described as `layout`, e.g. `(B, H, T, D)`), which must exist, be f32 and have rank 4.
    pub fn require_f32_4d(&mut self, name: &str, layout: &str) -> Result<Tensor> {
        match self.optional_f32_4d(name, layout)? {
            Some(t) => Ok(t),
            None => {
                let held = if self.names.is_empty() { "no tensors".to_string() } else { self.names.join(", ") };
                bail!("{}: missing tensor `{name}` {layout}; the file holds {held}", self.path.display())
            }
        }
    }

    /// Like [`Self::require_f32_4d`] for a tensor the file may leave out.
    pub fn optional_f32_4d(&mut self, name: &str, layout: &str) -> Result<Option<Tensor>> {
        let Some(t) = self.take(name) else { return Ok(None) };
        let path = self.path.display();
        if t.dtype() != DType::F32 {
            bail!("{path}: tensor `{name}` {:?} has dtype {}, expected f32", t.dims(), t.dtype().as_str());
        }
        if t.rank() != 4 {
            bail!("{path}: tensor `{name}` has shape {:?} (rank {}), expected {layout}", t.dims(), t.rank());
        }
        Ok(Some(t))
    }
}

/// Writes `tensors` (and string `metadata`) to `path` atomically: a reader sees the old file or the complete new one.
pub fn write_atomic(path: &Path, tensors: &[(&str, &Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    attend::checkpoint::write_safetensors(path, tensors, metadata).map_err(|e| anyhow!(errors::attend(&e)))
}
