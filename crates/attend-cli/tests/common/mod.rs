//! Shared by the CLI tests: running the built binary, reading and writing safetensors, comparing with tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_attend")
}

pub fn attend(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("RUST_BACKTRACE").output().expect("cannot start the attend binary")
}

pub fn save(path: &Path, tensors: &[(&str, &Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// `Ok` or a line naming the label, the worst element (index, got, want) and how many elements fail.
pub fn compare(label: &str, got: &Tensor, want: &Tensor, tol: Tol) -> Result<(), String> {
    if got.dims() != want.dims() {
        return Err(format!("{label}: shape {:?}, expected {:?}", got.dims(), want.dims()));
    }
    let g: Vec<f32> = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut worst: Option<(usize, f64)> = None; // (index, excess over the allowed difference)
    let mut failing = 0;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let (a, b) = (a as f64, b as f64);
        let excess = if b.is_infinite() || a.is_infinite() || a.is_nan() || b.is_nan() {
            if a == b {
                continue;
            }
            f64::INFINITY
        } else {
            (a - b).abs() - (tol.atol + tol.rtol * b.abs())
        };
        if excess > 0.0 {
            failing += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "{label}: {failing}/{} elements outside atol {} + rtol {}; worst at flat index {i}: got {}, want {} (|diff| {:.3e})",
            g.len(),
            tol.atol,
            tol.rtol,
            g[i],
            w[i],
            (g[i] as f64 - w[i] as f64).abs()
        )),
    }
}

/// Runs the binary with `args`, expects a one-line `error: …` on stderr, a non-zero exit, no panic and nothing written
/// to `output`; returns the line.
pub fn expect_failure(args: &[&str], output: &Path) -> String {
    let run = attend(args);
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(!run.status.success(), "expected failure for {args:?}; stdout {}", String::from_utf8_lossy(&run.stdout));
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr should be one line, got:\n{stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(!output.exists(), "no output should be written on error");
    stderr.trim_end().to_string()
}

pub fn assert_mentions(line: &str, parts: &[&str]) {
    for p in parts {
        assert!(line.contains(p), "error line should mention `{p}`: {line}");
    }
}
