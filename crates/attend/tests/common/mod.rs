//! Shared test support: PyTorch fixtures, tolerances, gradient checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use attend::attention::{Mask, MaskTensor};
use candle_core::{DType, Device, Tensor, Var};

/// `|a - b| <= atol + rtol·|b|` elementwise (llm.c's rule), with per-dtype presets.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

/// f32 forward values against a PyTorch f32 fixture.
pub const F32: Tol = Tol { atol: 1e-5, rtol: 1e-5 };
/// f32 gradients: a few more roundings than the forward.
pub const F32_GRAD: Tol = Tol { atol: 2e-5, rtol: 1e-4 };
/// f64 against f64.
pub const F64: Tol = Tol { atol: 1e-10, rtol: 1e-9 };
/// Central finite differences in f64 with step 1e-6.
pub const FINITE_DIFF: Tol = Tol { atol: 1e-6, rtol: 1e-5 };

/// A fixture file written by scripts/oracle: tensors plus string metadata.
pub struct Fixture {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

pub fn fixture_path(area: &str, case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(area).join(format!("{case}.safetensors"))
}

/// Every case name (file stem) of an area, sorted.
pub fn fixture_cases(area: &str) -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(area);
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "safetensors").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {}", dir.display());
    v
}

/// `(area, case)` for the cases of several areas whose names pass `keep`.
pub fn cases_in(areas: &[&'static str], keep: impl Fn(&str) -> bool) -> Vec<(&'static str, String)> {
    areas.iter().flat_map(|&a| fixture_cases(a).into_iter().filter(|c| keep(c)).map(move |c| (a, c))).collect()
}

pub fn load(area: &str, case: &str) -> Fixture {
    let path = fixture_path(area, case);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = st_meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    Fixture { path, tensors, meta }
}

impl Fixture {
    pub fn t(&self, name: &str) -> Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor `{name}`", self.path.display())).clone()
    }
    pub fn opt(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }
    pub fn var(&self, name: &str) -> Var {
        Var::from_tensor(&self.t(name)).unwrap()
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(|s| s.as_str())
    }
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta.get(key).map(|s| s.parse().unwrap_or_else(|_| panic!("meta {key}={s} is not a number")))
    }
    pub fn meta_json(&self, key: &str) -> Option<serde_json::Value> {
        self.meta.get(key).map(|s| serde_json::from_str(s).unwrap_or(serde_json::Value::String(s.clone())))
    }
}

/// Assert two tensors have the same shape and agree within `tol` (NaN exactly where `want` is NaN, infinities
/// equal); the failure names the label, the worst element and its index.
pub fn assert_close(label: &str, got: &Tensor, want: &Tensor, tol: Tol) {
    assert_eq!(got.dims(), want.dims(), "{label}: shape {:?} vs expected {:?}", got.dims(), want.dims());
    let g: Vec<f64> = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f64> = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = (0usize, 0.0f64, 0.0f64);
    let mut bad = 0usize;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let same_inf = a.is_infinite() && b.is_infinite() && a.signum() == b.signum();
        let ok = (a.is_nan() && b.is_nan()) || same_inf || (a - b).abs() <= tol.atol + tol.rtol * b.abs();
        if !ok {
            bad += 1;
            let excess =
                if a.is_finite() && b.is_finite() { (a - b).abs() - tol.rtol * b.abs() } else { f64::INFINITY };
            if bad == 1 || excess > worst.1 {
                worst = (i, excess, a - b);
            }
        }
    }
    assert!(
        bad == 0,
        "{label}: {bad}/{} elements out of tolerance {tol:?}; worst at flat index {} (shape {:?}): got {} want {} (diff {:e})",
        g.len(),
        worst.0,
        got.dims(),
        g[worst.0],
        w[worst.0],
        worst.2
    );
}

/// Central finite-difference check of `f` (a scalar function of `x`) against an analytic gradient, in f64.
/// Checks up to `max_points` evenly spread coordinates.
pub fn check_finite_diff(label: &str, x: &Tensor, analytic: &Tensor, f: impl Fn(&Tensor) -> f64, max_points: usize) {
    let h = 1e-6;
    let xs: Vec<f64> = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let an: Vec<f64> = analytic.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let n = xs.len();
    let step = (n / max_points.max(1)).max(1);
    for i in (0..n).step_by(step) {
        let mut p = xs.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device()).unwrap());
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), x.device()).unwrap());
        let num = (fp - fm) / (2.0 * h);
        let tol = FINITE_DIFF;
        assert!(
            (num - an[i]).abs() <= tol.atol + tol.rtol * num.abs().max(an[i].abs()),
            "{label}: finite difference at {i}: numeric {num:e} vs analytic {:e}",
            an[i]
        );
    }
}

/// Checks the fused op's gradient w.r.t. `x` against finite differences of `sum(f(x) ⊙ w)`.
pub fn fd_check(label: &str, x: Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let w = randn(f(&x).dims(), 99, DType::F64);
    let xv = Var::from_tensor(&x).unwrap();
    let g = weighted_sum(&f(xv.as_tensor()), &w).backward().unwrap();
    let analytic = g.get(xv.as_tensor()).unwrap().clone();
    check_finite_diff(label, &x, &analytic, |xp| weighted_sum(&f(xp), &w).to_scalar::<f64>().unwrap(), 64);
}

/// Every variable in `vars` must receive a finite gradient that is not all zero.
pub fn assert_all_grads_finite_nonzero(label: &str, vars: &[(String, Var)], grads: &candle_core::backprop::GradStore) {
    assert!(!vars.is_empty(), "{label}: no parameters");
    for (name, v) in vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{label}: parameter `{name}` received no gradient"));
        let vals: Vec<f64> = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(vals.iter().all(|x| x.is_finite()), "{label}: gradient of `{name}` is not finite");
        assert!(vals.iter().any(|&x| x != 0.0), "{label}: gradient of `{name}` is all zero");
    }
}

/// The parameters of a candle-nn VarMap as (name, var), sorted by name.
pub fn varmap_vars(vm: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `sum(out * dout)`: the scalar whose gradient is the fixture's upstream gradient `dout`.
pub fn weighted_sum(out: &Tensor, dout: &Tensor) -> Tensor {
    (out * dout).unwrap().sum_all().unwrap()
}

/// A deterministic standard-normal tensor from the dropout generator's bits (Box–Muller), so tests need no RNG state
/// and give the same numbers on every machine.
pub fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| {
            let u1 = (attend_kernels::dropout::random_bits(seed, 2 * i as u64) as f64 + 1.0) / 4_294_967_297.0;
            let u2 = attend_kernels::dropout::random_bits(seed, 2 * i as u64 + 1) as f64 / 4_294_967_296.0;
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// Attention fixtures (scripts/oracle/attention.py and nan.py share one metadata format)

/// The fixture's mask description as a [`Mask`]; an additive tensor comes back as a Var to read its gradient.
pub fn mask_of(f: &Fixture) -> (Mask, Option<Var>) {
    mask_of_with(f, true)
}

/// [`mask_of`], with an additive tensor as a plain tensor when `learned` is false: the fused kernel serves those
/// (a learned bias runs the materialised path, whatever the implementation asked for).
pub fn mask_of_with(f: &Fixture, learned: bool) -> (Mask, Option<Var>) {
    let m = f.meta_json("mask").expect("mask metadata");
    let mut mask = Mask::none();
    if m["causal"].as_bool().unwrap() {
        mask = mask.with_causal();
    }
    if let Some(w) = m["window"].as_array() {
        mask = mask.with_window(w[0].as_u64().unwrap() as usize, w[1].as_u64().unwrap() as usize);
    }
    let lens = |k: &str| m[k].as_array().map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect::<Vec<_>>());
    if let Some(l) = lens("key_lengths") {
        mask = mask.with_key_lengths(l);
    }
    if let Some(l) = lens("prefix_lengths") {
        mask = mask.with_prefix_lengths(l);
    }
    if m["documents"].as_bool().unwrap() {
        mask = mask.with_documents(f.t("q_doc"), f.t("k_doc"));
    }
    if m["alibi"].as_bool().unwrap() {
        mask = mask.with_alibi();
    }
    if let Some(c) = m["softcap"].as_f64() {
        mask = mask.with_softcap(c);
    }
    let mut var = None;
    match m["tensor"].as_str() {
        Some("bool") => mask = mask.with_tensor(MaskTensor::Keep(f.t("mask"))),
        Some("additive") if learned => {
            let v = f.var("mask");
            mask = mask.with_tensor(MaskTensor::Additive(v.as_tensor().clone()));
            var = Some(v);
        }
        Some("additive") => mask = mask.with_tensor(MaskTensor::Additive(f.t("mask"))),
        _ => {}
    }
    (mask, var)
}

pub fn scale_of(f: &Fixture) -> Option<f64> {
    match f.meta_str("scale") {
        None | Some("default") => None,
        Some(s) => Some(s.parse().unwrap()),
    }
}

/// Says in the test output (libtest captures `print!`, not the stderr handle) which bf16 path a test exercises:
/// where the fused path converts bf16 to f32 (no AVX512-BF16, or a CPU where the f32 kernel is faster), a bf16 test
/// checks that path instead. CI also runs these tests with `ATTEND_BF16_DOTS=1`.
pub fn note_bf16_path(test: &str) {
    use std::io::Write;
    if !attend_kernels::flash::tiles::bf16_dots_pay_off() {
        let why = if attend_kernels::flash::bf16_dot_supported() {
            "this CPU runs bf16 through the f32 kernel (faster here; ATTEND_BF16_DOTS=1 forces the dot products)"
        } else {
            "no AVX512-BF16 on this CPU"
        };
        let _ = writeln!(std::io::stderr(), "SKIP {test} (bf16 dot products): {why}; checking the f32 path instead");
    }
}

/// Overwrites every parameter of `vm` with seeded normal values scaled by `scale`: candle's own initialisers draw
/// from an unseeded generator, and a test that asserts on gradients (a ReLU unit can be dead on a small batch for
/// one draw and not another) must see the same numbers on every run.
pub fn reseed(vm: &candle_nn::VarMap, seed: u64, scale: f64) {
    for (i, (_, v)) in varmap_vars(vm).iter().enumerate() {
        let t =
            (randn(v.as_tensor().dims(), seed.wrapping_mul(1000) + i as u64, v.as_tensor().dtype()) * scale).unwrap();
        v.set(&t).unwrap();
    }
}

/// A Hugging Face oracle directory under fixtures/hf (written by scripts/oracle/hf.py).
pub fn hf_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/hf").join(name)
}

/// Rows of `(B, T, ·)` where `mask (B, T)` is 1, stacked: the positions whose outputs are defined.
pub fn real_rows(x: &Tensor, mask: &Tensor) -> Tensor {
    let (b, t, c) = x.dims3().unwrap();
    let m: Vec<i64> = mask.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let idx: Vec<u32> = (0..b * t).filter(|&i| m[i] != 0).map(|i| i as u32).collect();
    x.reshape((b * t, c)).unwrap().index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0).unwrap()
}

/// A copy of the oracle directory `src` (config and weights only) in a temporary directory, with `edit` applied to
/// its config and tensors; an emptied tensor map writes no weights.
pub fn edited_hf_dir(
    src: &str,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) -> PathBuf {
    let from = hf_dir(src);
    let dir = std::env::temp_dir().join(format!("attend-{src}-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    let mut t = candle_core::safetensors::load(from.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut cfg, &mut t);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    if !t.is_empty() {
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    }
    dir
}
