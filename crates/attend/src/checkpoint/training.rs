//! Training checkpoints: a directory per step under a run's `checkpoints/`, holding
//!
//! | file | contents |
//! |---|---|
//! | `model.safetensors` | every variable of the model, under its attend name |
//! | `optimizer.safetensors` | the AdamW moments (`<name>.exp_avg`, `<name>.exp_avg_sq`) |
//! | `state.json` | [`TrainingState`]: format version, architecture, config, step, data position, RNG state, metrics |
//!
//! A checkpoint is written into a hidden temporary directory (each file synced) and renamed into place, so a kill at
//! any moment leaves the previous checkpoints intact and never a torn one; the oldest beyond `keep` are removed
//! after. [`load`] refuses a checkpoint of another architecture or a newer format, saying what it holds and what was
//! expected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::train::optim::AdamW;
use crate::{Error, Result};

/// The newest `state.json` format this build reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;

/// `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format_version: u32,
    /// What the weights are, e.g. `translate/bahdanau`; a run refuses a checkpoint of another.
    pub architecture: String,
    /// The run's resolved configuration.
    pub config: serde_json::Value,
    /// Optimiser updates done.
    pub step: u64,
    /// Where the data stream continues (batches drawn so far).
    pub data_position: u64,
    /// The seed (all randomness of a run is counter-based on it and the step).
    pub seed: u64,
    /// The latest metrics, as the run logs them.
    pub metrics: serde_json::Value,
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:09}"))
}

/// Every tensor of `tensors` into one safetensors file, sorted by name (synced, by [`super::write_safetensors`]).
fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    super::write_safetensors(path, &named, HashMap::new())
}

/// Saves a checkpoint of `vars`, `optim` and `state` under `dir` (created if needed) as `step-<step>`, then removes
/// the oldest checkpoints so that `keep` remain (`keep = 0` keeps all). Returns the checkpoint's path.
pub fn save(dir: &Path, vars: &VarMap, optim: &AdamW, state: &TrainingState, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
    let tmp = dir.join(format!(".tmp-step-{}-{}", state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| file_err(&tmp, format!("cannot create: {e}")))?;
    let weights: HashMap<String, Tensor> = {
        let data = vars.data().lock().map_err(|_| Error::invalid("checkpoint", "the VarMap's lock is poisoned"))?;
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    };
    write_tensors(&tmp.join("model.safetensors"), &weights)?;
    write_tensors(&tmp.join("optimizer.safetensors"), &optim.state()?)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::invalid("checkpoint", e.to_string()))?;
    super::write_atomic(&tmp.join("state.json"), json.as_bytes())?;
    let dest = step_dir(dir, state.step);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| file_err(&dest, format!("cannot replace: {e}")))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| file_err(&dest, format!("cannot rename into place: {e}")))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // the rename itself survives a crash
    }
    if keep > 0 {
        let all = list(dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).map_err(|e| file_err(old, format!("cannot remove an old checkpoint: {e}")))?;
        }
    }
    Ok(dest)
}

/// The checkpoints under `dir`, oldest first (none when `dir` does not exist).
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| file_err(dir, format!("cannot list: {e}")))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `dir`.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Reads `state.json` of a checkpoint, refusing a newer format or another architecture.
pub fn read_state(path: &Path, architecture: &str) -> Result<TrainingState> {
    let file = path.join("state.json");
    let text = std::fs::read_to_string(&file).map_err(|e| file_err(&file, format!("cannot read: {e}")))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_err(&file, format!("not a checkpoint state: {e}")))?;
    let version = raw.get("format_version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version > FORMAT_VERSION as u64 {
        return Err(file_err(
            &file,
            format!("checkpoint format {version} was written by a newer attend; this one reads format {FORMAT_VERSION} and older"),
        ));
    }
    let state: TrainingState =
        serde_json::from_value(raw).map_err(|e| file_err(&file, format!("not a checkpoint state: {e}")))?;
    if state.architecture != architecture {
        return Err(file_err(
            &file,
            format!("the checkpoint holds a `{}` model; this run trains `{architecture}`", state.architecture),
        ));
    }
    Ok(state)
}

/// Loads a checkpoint into `vars` (every variable must be there, with its shape) and `optim`.
///
/// # Errors
/// As [`read_state`]; a tensor missing from the checkpoint or of another shape (the message names it).
pub fn load(path: &Path, architecture: &str, vars: &VarMap, optim: &mut AdamW) -> Result<TrainingState> {
    let state = read_state(path, architecture)?;
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let f = path.join(name);
        candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| file_err(&f, format!("cannot load: {e}")))
    };
    let weights = read("model.safetensors")?;
    {
        let data = vars.data().lock().map_err(|_| Error::invalid("checkpoint", "the VarMap's lock is poisoned"))?;
        let file = path.join("model.safetensors");
        for (name, var) in data.iter() {
            let t = weights
                .get(name)
                .ok_or_else(|| Error::MissingTensor { name: name.clone(), location: file.display().to_string() })?;
            if t.dims() != var.dims() {
                return Err(file_err(&file, format!("`{name}` is {:?}; the model's is {:?}", t.dims(), var.dims())));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
    }
    optim.load_state(&read("optimizer.safetensors")?, state.step)?;
    Ok(state)
}
