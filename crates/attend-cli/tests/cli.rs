//! `attend op attention` end to end: the built binary against the PyTorch fixtures in `fixtures/attention`, its
//! one-line errors on bad input, and the built-in example; `attend bench attention` on tiny sizes.
//!
//! Oracle: `scripts/oracle/attention.py` (PyTorch). Every fixture runs with each of `--impl fused` (the default),
//! `--impl materialized` and `--impl reference`, at the same tolerances: masks the CLI has flags for (causal, window, ALiBi, soft-cap, scale) are passed as flags; the
//! explicit tensor mask is passed as `mask`; key lengths, prefix-LM and documents, which have no flag, are turned into
//! a u8 `mask` built here from the fixture's metadata (combined with the fixture's own tensor mask, if any).
//!
//! Tolerance rule: `|got − want| ≤ atol + rtol·|want|`, and an infinite `want` (−∞ log-sum-exp of a query that sees
//! no key) must be matched exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

mod common;
use common::*;

/// Forward outputs `o` and `lse`.
const VALUE_TOL: Tol = Tol { atol: 1e-5, rtol: 1e-5 };
/// Gradients `dq`, `dk`, `dv`, `dmask`.
const GRAD_TOL: Tol = Tol { atol: 2e-5, rtol: 1e-4 };

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/attention")
}

/// The keys each query may see under the fixture's key lengths, prefix-LM and documents, as u8 `(B, 1, T, S)`;
/// `None` when the fixture uses none of them.
fn structural_keep(mask: &Value, fx: &HashMap<String, Tensor>) -> Option<Tensor> {
    let key_lengths: Option<Vec<usize>> = serde_json::from_value(mask["key_lengths"].clone()).unwrap();
    let prefix: Option<Vec<usize>> = serde_json::from_value(mask["prefix_lengths"].clone()).unwrap();
    let documents = mask["documents"].as_bool().unwrap_or(false);
    if key_lengths.is_none() && prefix.is_none() && !documents {
        return None;
    }
    let (b, _, t, _) = fx["q"].dims4().unwrap();
    let s = fx["k"].dim(2).unwrap();
    let docs =
        |name: &str| -> Vec<i64> { fx[name].to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let (q_doc, k_doc) = if documents { (docs("q_doc"), docs("k_doc")) } else { (vec![], vec![]) };
    let mut keep = vec![0u8; b * t * s];
    for bi in 0..b {
        for i in 0..t {
            let d = (i + s) as i64 - t as i64; // end-aligned diagonal
            for j in 0..s {
                let mut visible = true;
                if let Some(len) = &key_lengths {
                    visible &= j < len[bi];
                }
                if let Some(p) = &prefix {
                    visible &= j as i64 <= d || j < p[bi];
                }
                if documents {
                    visible &= q_doc[bi * t + i] == k_doc[bi * s + j];
                }
                keep[(bi * t + i) * s + j] = visible as u8;
            }
        }
    }
    Some(Tensor::from_vec(keep, (b, 1, t, s), &Device::Cpu).unwrap())
}

/// The fixture's explicit mask combined with the structural `keep` mask, broadcast to `(B, Hm, T, S)`.
fn combine(explicit: Option<&Tensor>, keep: Tensor) -> Tensor {
    let Some(m) = explicit else { return keep };
    let (b, _, t, s) = keep.dims4().unwrap();
    let shape = (b, m.dim(1).unwrap(), t, s);
    let keep = keep.broadcast_as(shape).unwrap();
    let m = m.broadcast_as(shape).unwrap();
    if m.dtype() == DType::U8 {
        let both = (m.to_dtype(DType::F32).unwrap() * keep.to_dtype(DType::F32).unwrap()).unwrap();
        both.to_dtype(DType::U8).unwrap()
    } else {
        let ninf = Tensor::full(f32::NEG_INFINITY, shape, &Device::Cpu).unwrap();
        keep.where_cond(&m, &ninf).unwrap()
    }
}

/// One fixture through the binary with `--impl imp`; every mismatch as a line.
fn check_fixture(path: &Path, imp: &str, dir: &Path) -> Vec<String> {
    let name = path.file_stem().unwrap().to_string_lossy().to_string();
    let fx = load(path);
    let meta = metadata(path);
    let mask: Value = serde_json::from_str(&meta["mask"]).unwrap();

    let mut flags: Vec<String> = vec!["--impl".into(), imp.into()];
    if mask["causal"].as_bool().unwrap_or(false) {
        flags.push("--causal".into());
    }
    if let Some(w) = mask["window"].as_array() {
        flags.push("--window".into());
        flags.push(format!("{},{}", w[0], w[1]));
    }
    if mask["alibi"].as_bool().unwrap_or(false) {
        flags.push("--alibi".into());
    }
    if let Some(c) = mask["softcap"].as_f64() {
        flags.push("--softcap".into());
        flags.push(c.to_string());
    }
    match meta.get("scale").map(String::as_str) {
        None | Some("default") => {}
        Some(s) => {
            flags.push("--scale".into());
            flags.push(s.to_string());
        }
    }

    let explicit = fx.get("mask");
    let keep = structural_keep(&mask, &fx);
    let compare_dmask = keep.is_none() && fx.contains_key("dmask");
    let in_mask = match keep {
        Some(keep) => Some(combine(explicit, keep)),
        None => explicit.cloned(),
    };
    let mut inputs: Vec<(&str, &Tensor)> = vec![("q", &fx["q"]), ("k", &fx["k"]), ("v", &fx["v"]), ("do", &fx["dout"])];
    if let Some(m) = &in_mask {
        inputs.push(("mask", m));
    }
    let input = dir.join(format!("{name}.in.safetensors"));
    let output = dir.join(format!("{name}.{imp}.out.safetensors"));
    save(&input, &inputs);

    let mut args: Vec<&str> =
        vec!["op", "attention", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()];
    args.extend(flags.iter().map(String::as_str));
    let run = attend(&args);
    if !run.status.success() {
        return vec![format!("{name} [{imp}]: exit {:?}: {}", run.status.code(), String::from_utf8_lossy(&run.stderr))];
    }
    let out = load(&output);
    let mut pairs = vec![("o", "out", VALUE_TOL), ("lse", "lse", VALUE_TOL)];
    pairs.extend([("dq", "dq", GRAD_TOL), ("dk", "dk", GRAD_TOL), ("dv", "dv", GRAD_TOL)]);
    if compare_dmask {
        pairs.push(("dmask", "dmask", GRAD_TOL));
    }
    let mut errors = Vec::new();
    for (ours, theirs, tol) in pairs {
        let label = format!("{name} [{imp}] {ours}");
        match out.get(ours) {
            None => errors.push(format!("{label}: missing from the output file")),
            Some(got) => {
                if let Err(e) = compare(&label, got, &fx[theirs], tol) {
                    errors.push(e);
                }
            }
        }
    }
    errors
}

fn check_all_fixtures(imp: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 40,
        "expected the attention fixtures in {}, found {}",
        fixtures_dir().display(),
        paths.len()
    );
    let errors: Vec<String> = paths.iter().flat_map(|p| check_fixture(p, imp, dir.path())).collect();
    assert!(errors.is_empty(), "{} mismatches against PyTorch:\n{}", errors.len(), errors.join("\n"));
}

#[test]
fn fixtures_match_pytorch_fused() {
    check_all_fixtures("fused");
}

#[test]
fn fixtures_match_pytorch_materialized() {
    check_all_fixtures("materialized");
}

#[test]
fn fixtures_match_pytorch_reference() {
    check_all_fixtures("reference");
}

// ---------------------------------------------------------------------------------------------------------------
// Bad input: one line on stderr naming the file / tensor / shapes, a non-zero exit, no panic, no output written.

fn randn(shape: (usize, usize, usize, usize)) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

/// Runs `op attention` on `input` with `extra` flags, expects a one-line failure and returns that line.
fn expect_error(dir: &Path, input: &Path, extra: &[&str]) -> String {
    let output = dir.join("out.safetensors");
    let mut args = vec!["op", "attention", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()];
    args.extend(extra);
    expect_failure(&args, &output)
}

#[test]
fn error_missing_input_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("does_not_exist.safetensors");
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["does_not_exist.safetensors", "cannot read"]);
}

#[test]
fn error_not_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("garbage.safetensors");
    std::fs::write(&input, b"definitely not a safetensors header").unwrap();
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["garbage.safetensors", "not a safetensors file"]);
}

#[test]
fn error_missing_k() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("no_k.safetensors");
    save(&input, &[("q", &randn((1, 2, 4, 8))), ("v", &randn((1, 2, 5, 8)))]);
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["no_k.safetensors", "missing tensor `k`", "(B, Hkv, S, D)", "q, v"]);
}

#[test]
fn error_heads_not_multiple_of_kv_heads() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("heads.safetensors");
    save(&input, &[("q", &randn((1, 3, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8)))]);
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["heads.safetensors", "H = 3", "Hkv = 2", "[1, 3, 4, 8]", "[1, 2, 5, 8]"]);
}

#[test]
fn error_shape_mismatch_between_k_and_v() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    save(&input, &[("q", &randn((1, 2, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 6, 8)))]);
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["kv.safetensors", "[1, 2, 5, 8]", "[1, 2, 6, 8]"]);
}

#[test]
fn error_mask_does_not_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mask.safetensors");
    let mask = Tensor::ones((1, 1, 3, 7), DType::U8, &Device::Cpu).unwrap();
    save(
        &input,
        &[("q", &randn((1, 2, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8))), ("mask", &mask)],
    );
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["mask.safetensors", "mask", "[1, 1, 3, 7]", "(1, 2, 4, 5)"]);
}

#[test]
fn error_mask_of_unsupported_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mask_i64.safetensors");
    let mask = Tensor::ones((1, 1, 4, 5), DType::I64, &Device::Cpu).unwrap();
    save(
        &input,
        &[("q", &randn((1, 2, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8))), ("mask", &mask)],
    );
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["mask_i64.safetensors", "`mask`", "i64", "u8"]);
}

#[test]
fn error_wrong_rank() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rank.safetensors");
    let q = Tensor::randn(0f32, 1f32, (2, 4, 8), &Device::Cpu).unwrap();
    save(&input, &[("q", &q), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8)))]);
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["rank.safetensors", "`q`", "[2, 4, 8]", "(B, H, T, D)"]);
}

#[test]
fn error_dtype_not_f32() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("f64.safetensors");
    let q = randn((1, 2, 4, 8)).to_dtype(DType::F64).unwrap();
    save(&input, &[("q", &q), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8)))]);
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["f64.safetensors", "`q`", "f64", "f32"]);
}

#[test]
fn error_do_of_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("do.safetensors");
    let tensors = [
        ("q", &randn((1, 2, 4, 8))),
        ("k", &randn((1, 2, 5, 8))),
        ("v", &randn((1, 2, 5, 6))),
        ("do", &randn((1, 2, 4, 8))),
    ];
    save(&input, &tensors);
    let line = expect_error(dir.path(), &input, &[]);
    assert_mentions(&line, &["do.safetensors", "`do`", "[1, 2, 4, 8]", "[1, 2, 4, 6]"]);
}

#[test]
fn error_bad_window() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ok.safetensors");
    save(&input, &[("q", &randn((1, 2, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8)))]);
    for bad in ["3", "a,b", "1,2,3", "-1,0"] {
        let line = expect_error(dir.path(), &input, &["--window", bad]);
        assert_mentions(&line, &["--window", bad, "LEFT,RIGHT"]);
    }
    // Well-formed, but contradictory with --causal: the library's mask check.
    let line = expect_error(dir.path(), &input, &["--causal", "--window", "2,1"]);
    assert_mentions(&line, &["ok.safetensors", "causal", "(2, 1)"]);
}

#[test]
fn error_input_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ok.safetensors");
    save(&input, &[("q", &randn((1, 2, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8)))]);
    let run = attend(&["op", "attention", "--input", input.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_mentions(&stderr, &["--output"]);
}

#[test]
fn error_unwritable_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ok.safetensors");
    save(&input, &[("q", &randn((1, 2, 4, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 8)))]);
    let output = dir.path().join("no_such_dir/out.safetensors");
    let run = attend(&["op", "attention", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_mentions(&stderr, &["no_such_dir/out.safetensors", "cannot write"]);
}

// ---------------------------------------------------------------------------------------------------------------
// Files without `do`, masks stored as PyTorch bools, and the built-in example.

#[test]
fn input_without_do_writes_only_forward_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("fwd.safetensors");
    let output = dir.path().join("fwd.out.safetensors");
    save(&input, &[("q", &randn((1, 4, 3, 8))), ("k", &randn((1, 2, 5, 8))), ("v", &randn((1, 2, 5, 6)))]);
    let run = attend(&["op", "attention", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out = load(&output);
    let mut names: Vec<&str> = out.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["lse", "o"]);
    assert_eq!(out["o"].dims(), [1, 4, 3, 6]);
    assert_eq!(out["lse"].dims(), [1, 4, 3]);
}

/// A tensor as safetensors bytes, to write dtypes candle cannot hold (BOOL).
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

#[test]
fn bool_mask_from_pytorch_is_read_as_keep_mask() {
    // safetensors' BOOL dtype (what `safetensors.torch.save_file` writes for a bool tensor) gives the same result as u8.
    let dir = tempfile::tempdir().unwrap();
    let fx_path = fixtures_dir().join("attn_bool_11ts.safetensors");
    let fx = load(&fx_path);
    let mask_u8: Vec<u8> = fx["mask"].flatten_all().unwrap().to_vec1().unwrap();
    let mask_shape = fx["mask"].dims().to_vec();
    let mut raw: Vec<(String, Raw)> = ["q", "k", "v"]
        .iter()
        .map(|n| {
            let x: Vec<f32> = fx[*n].flatten_all().unwrap().to_vec1().unwrap();
            let data = x.iter().flat_map(|f| f.to_le_bytes()).collect();
            (n.to_string(), Raw { dtype: safetensors::Dtype::F32, shape: fx[*n].dims().to_vec(), data })
        })
        .collect();
    raw.push(("mask".into(), Raw { dtype: safetensors::Dtype::BOOL, shape: mask_shape, data: mask_u8 }));
    let input = dir.path().join("bool.safetensors");
    safetensors::serialize_to_file(raw, None, &input).unwrap();
    let output = dir.path().join("bool.out.safetensors");
    let run = attend(&["op", "attention", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out = load(&output);
    compare("bool mask o", &out["o"], &fx["out"], VALUE_TOL).unwrap();
    compare("bool mask lse", &out["lse"], &fx["lse"], VALUE_TOL).unwrap();
}

#[test]
fn example_mode_writes_readable_output() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("example.safetensors");
    let run = attend(&["op", "attention", "--causal", "--output", output.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    // The default implementation is the fused kernel.
    assert_mentions(&stdout, &["built-in example", "causal", "fused", "(2, 8, 256, 64)", "example.safetensors"]);
    let out = load(&output);
    for (name, dims) in [
        ("o", &[2, 8, 256, 64][..]),
        ("lse", &[2, 8, 256]),
        ("dq", &[2, 8, 256, 64]),
        ("dk", &[2, 2, 256, 64]),
        ("dv", &[2, 2, 256, 64]),
    ] {
        let t = &out[name];
        assert_eq!(t.dims(), dims, "{name}");
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(x.iter().all(|v| v.is_finite()), "{name} has non-finite values");
    }
    // The write is atomic: nothing but the output is left in the directory.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("example.safetensors")]);
}

#[test]
fn example_mode_json_is_one_line_and_deterministic() {
    let run = |imp: &str| -> Value {
        let out = attend(&["op", "attention", "--json", "--alibi", "--impl", imp]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");
        serde_json::from_str(&stdout).unwrap()
    };
    let a = run("materialized");
    assert_eq!(a["impl"], "materialized");
    assert_eq!(a["mask"], "alibi");
    assert_eq!(a["input"], Value::Null);
    assert_eq!(a["output"], Value::Null);
    assert_eq!(a["outputs"]["o"]["shape"], serde_json::json!([2, 8, 256, 64]));
    assert_eq!(a["inputs"]["do"], serde_json::json!([2, 8, 256, 64]));
    assert!((a["scale"].as_f64().unwrap() - 0.125).abs() < 1e-12);
    // Same seeded inputs on every run; the two implementations agree on the summary statistics.
    let b = run("reference");
    for name in ["o", "lse", "dq", "dk", "dv"] {
        let (x, y) =
            (a["outputs"][name]["mean_abs"].as_f64().unwrap(), b["outputs"][name]["mean_abs"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{name}: mean|x| {x} vs {y}");
    }
    let again = run("materialized");
    assert_eq!(a["outputs"], again["outputs"], "the built-in example is not deterministic");
}

// ---------------------------------------------------------------------------------------------------------------
// `attend bench attention` on tiny sizes: one JSON line with positive figures; bad arguments give one line and a
// non-zero exit.

fn bench_json(extra: &[&str]) -> Value {
    let mut args = vec!["bench", "attention", "--batch", "1", "--heads", "4", "--seq", "32", "--head-dim", "16"];
    args.extend(["--warmup", "1", "--iters", "3", "--threads", "1", "--json"]);
    args.extend(extra);
    let run = attend(&args);
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(run.status.success(), "{args:?}: {}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(stdout.trim_end().lines().count(), 1, "--json should print one line, got:\n{stdout}");
    serde_json::from_str(stdout.trim_end()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn assert_positive(v: &Value, fields: &[&str]) {
    for f in fields {
        let x = v[f].as_f64().unwrap_or_else(|| panic!("`{f}` missing or not a number in {v}"));
        assert!(x > 0.0 && x.is_finite(), "`{f}` = {x} should be positive in {v}");
    }
}

#[test]
fn bench_attention_json_fields() {
    let timing = ["median_ms", "min_ms", "mean_ms", "p90_ms", "gflop", "gflops", "tensor_mb"];
    let a = bench_json(&[]);
    assert_positive(&a, &timing);
    assert_eq!(a["command"], "bench attention");
    assert_eq!(a["impl"], "fused", "fused is the default");
    assert_eq!(a["dtype"], "f32");
    assert_eq!((a["batch"].as_u64(), a["heads"].as_u64(), a["kv_heads"].as_u64()), (Some(1), Some(4), Some(4)));
    assert_eq!((a["seq"].as_u64(), a["kv_seq"].as_u64(), a["head_dim"].as_u64()), (Some(32), Some(32), Some(16)));
    assert_eq!((a["causal"].as_bool(), a["backward"].as_bool()), (Some(false), Some(false)));
    assert_eq!((a["threads"].as_u64(), a["candle_threads"].as_u64()), (Some(1), Some(1)));
    assert_eq!((a["warmup"].as_u64(), a["iters"].as_u64()), (Some(1), Some(3)));
    assert!(["avx512", "avx2", "portable"].contains(&a["isa"].as_str().unwrap()), "isa {}", a["isa"]);
    let (min, med, p90) =
        (a["min_ms"].as_f64().unwrap(), a["median_ms"].as_f64().unwrap(), a["p90_ms"].as_f64().unwrap());
    assert!(min <= med && med <= p90, "min {min} ≤ median {med} ≤ p90 {p90}");
    // 4·B·H·T·S·D; q, k, v, o in f32.
    assert!((a["gflop"].as_f64().unwrap() - 4.0 * 4.0 * 32.0 * 32.0 * 16.0 / 1e9).abs() < 1e-12);
    assert!((a["tensor_mb"].as_f64().unwrap() - 4.0 * (4 * 32 * 16 * 4) as f64 / 1e6).abs() < 1e-12);
    if cfg!(target_os = "linux") {
        assert_positive(&a, &["peak_rss_mb", "baseline_rss_mb"]);
        assert!(a["peak_rss_mb"].as_f64() >= a["baseline_rss_mb"].as_f64());
        assert!(a["page_faults_per_iter"].as_f64().is_some_and(|f| f >= 0.0), "page_faults_per_iter in {a}");
    }
    assert!(a["max_abs_diff_vs_reference"].as_f64().unwrap() < 1e-4);

    // Causal, forward+backward, grouped heads, S ≠ T: causal flops count the visible pairs exactly (end-aligned:
    // query i sees keys 0..=i + S − T), here by brute force over the (i, j) grid.
    let pairs = |t: usize, s: usize| (0..t).flat_map(|i| (0..s).map(move |j| j + t <= i + s)).filter(|&v| v).count();
    let b = bench_json(&["--causal", "--backward", "--kv-heads", "2", "--kv-seq", "48"]);
    assert_positive(&b, &timing);
    assert_eq!((b["kv_heads"].as_u64(), b["kv_seq"].as_u64()), (Some(2), Some(48)));
    let want = 3.5 * 4.0 * 4.0 * 16.0 * pairs(32, 48) as f64 / 1e9;
    assert!((b["gflop"].as_f64().unwrap() - want).abs() < 1e-12, "causal T 32 S 48: {} vs {want}", b["gflop"]);
    let c = bench_json(&["--causal", "--backward"]);
    assert!((c["gflop"].as_f64().unwrap() - 3.5 * 4.0 * 4.0 * 16.0 * pairs(32, 32) as f64 / 1e9).abs() < 1e-12);
    // Validated on the timed T, S, D (one batch element, one K/V group), and the machine is named.
    assert_eq!((b["validated_on"]["seq"].as_u64(), b["validated_on"]["kv_seq"].as_u64()), (Some(32), Some(48)));
    assert_eq!(b["validation"].as_str(), Some("reference"));
    for key in ["vendor", "family", "model", "name", "microarchitecture", "l1d_kb"] {
        assert!(!b["cpu"][key].is_null(), "cpu.{key} in {b}");
    }
    assert!(b["tiles"]["block_q"].as_u64().is_some_and(|x| x > 0) && b["tiles"]["source"].is_string(), "tiles in {b}");
    // q, k, v, o, do, dq, dk, dv
    assert!((c["tensor_mb"].as_f64().unwrap() - 8.0 * (4 * 32 * 16 * 4) as f64 / 1e6).abs() < 1e-12);
}

#[test]
fn bench_attention_every_impl_and_dtype() {
    for imp in ["fused", "materialized", "reference"] {
        for dtype in ["f32", "bf16"] {
            let v = bench_json(&["--impl", imp, "--dtype", dtype, "--causal", "--backward", "--kv-heads", "2"]);
            assert_eq!((v["impl"].as_str(), v["dtype"].as_str()), (Some(imp), Some(dtype)));
            assert_positive(&v, &["median_ms", "gflops"]);
        }
    }
}

#[test]
fn bench_attention_human_summary() {
    let args = ["bench", "attention", "--batch", "1", "--heads", "2", "--seq", "16", "--head-dim", "16", "--causal"];
    let run = attend(&[&args[..], &["--iters", "2", "--warmup", "0", "--threads", "1"]].concat());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_mentions(
        &stdout,
        &["fused f32, forward, causal", "median", "GFLOP/s", "peak RSS", "max |Δ|", "(reference)", "cpu"],
    );
    assert!(run.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&run.stderr));
}

#[test]
fn bench_attention_bad_arguments() {
    let base = ["bench", "attention", "--batch", "1", "--heads", "4", "--seq", "8", "--head-dim", "8"];
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--kv-heads", "3"], &["--heads 4", "--kv-heads 3"]),
        (&["--threads", "0"], &["--threads", "0"]),
        (&["--iters", "0"], &["--iters", "0"]),
        (&["--dtype", "f64"], &["--dtype", "f64"]),
        (&["--impl", "flash"], &["--impl", "flash"]),
        (&["--seq", "-3"], &["-3"]),
        (&["--warmup", "x"], &["--warmup", "x"]),
    ];
    for (extra, parts) in cases {
        let args = [&base[..], extra].concat();
        let run = attend(&args);
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(!run.status.success(), "expected failure for {args:?}");
        assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: stderr should be one line, got:\n{stderr}");
        assert!(stderr.starts_with("error"), "{args:?}: {stderr}");
        assert!(run.stdout.is_empty(), "{args:?}: nothing on stdout");
        assert_mentions(&stderr, parts);
    }
    // Materialised scores that cannot fit are refused before anything is allocated.
    let huge = ["bench", "attention", "--batch", "64", "--heads", "64", "--seq", "65536", "--head-dim", "8"];
    let run = attend(&[&huge[..], &["--impl", "materialized"]].concat());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_mentions(&stderr, &["materialized", "(64, 64, 65536, 65536)", "--impl fused"]);
    // A required size left out.
    let run = attend(&["bench", "attention", "--batch", "1", "--heads", "4", "--seq", "8"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_mentions(&stderr, &["--head-dim"]);
}
