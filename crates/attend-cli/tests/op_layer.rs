//! `attend op layer` end to end: the built binary on every case of `fixtures/layers` (written by
//! `scripts/oracle/layers.py` from PyTorch's `nn.LSTM`/`nn.GRU`/`nn.RNN`, the `entmax` package, PyTorch Geometric's
//! `GATConv`/`GATv2Conv` and float64 references of the rest), every output and every gradient compared; and the
//! one-line errors of bad input.
//!
//! The oracle computes in float64 from the f32 inputs; we compute in f32, so the tolerances are f32 rounding through
//! a few dozen dependent operations (recurrences of up to 7 steps and 2 layers): `|got − want| ≤ atol + rtol·|want|`.

use std::path::{Path, PathBuf};

mod common;
use common::*;

/// Outputs.
const VALUE_TOL: Tol = Tol { atol: 2e-5, rtol: 1e-4 };
/// Gradients (`d<name>`): longer chains (the backward of a recurrence runs through every step twice).
const GRAD_TOL: Tol = Tol { atol: 5e-5, rtol: 5e-4 };

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/layers")
}

/// The case directories whose input names `layer`.
fn cases_of(layer: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("fixtures/layers (bash scripts/gen_fixtures.sh layers)")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir() && metadata(&p.join("input.safetensors")).get("layer").map(String::as_str) == Some(layer)
        })
        .collect();
    v.sort();
    v
}

/// Runs one case through the binary; returns one line per mismatch.
fn check_case(case: &Path, out_dir: &Path) -> Vec<String> {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let input = case.join("input.safetensors");
    let meta = metadata(&input);
    let out = out_dir.join(format!("{name}.safetensors"));
    let params = case.join("params.safetensors");
    let args = [
        "op",
        "layer",
        "--layer",
        &meta["layer"],
        "--params",
        params.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--options",
        &meta["options"],
    ];
    let run = attend(&args);
    if !run.status.success() {
        return vec![format!("{name}: failed: {}", String::from_utf8_lossy(&run.stderr).trim())];
    }
    let (got, want) = (load(&out), load(&case.join("expected.safetensors")));
    let mut errs = Vec::new();
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for n in names {
        let tol = if n.starts_with('d') { GRAD_TOL } else { VALUE_TOL };
        match got.get(n) {
            None => errs.push(format!("{name}: output file lacks `{n}`")),
            Some(g) => errs.extend(compare(&format!("{name}/{n}"), g, &want[n], tol).err()),
        }
    }
    for n in got.keys().filter(|n| !want.contains_key(*n)) {
        errs.push(format!("{name}: unexpected output `{n}`"));
    }
    errs
}

fn check_layer(layer: &str) {
    let cases = cases_of(layer);
    assert!(!cases.is_empty(), "no fixtures for layer `{layer}` in fixtures/layers");
    let dir = tempfile::tempdir().unwrap();
    let errs: Vec<String> = cases.iter().flat_map(|c| check_case(c, dir.path())).collect();
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

macro_rules! layer_tests {
    ($($test:ident => $layer:literal),* $(,)?) => {
        $(#[test] fn $test() { check_layer($layer) })*
        /// The layers with an oracle test here.
        const TESTED: &[&str] = &[$($layer),*];
    };
}

layer_tests! {
    sparsemax_matches_entmax_package => "sparsemax",
    entmax15_matches_entmax_package => "entmax15",
    lstm_matches_torch => "lstm",
    gru_matches_torch => "gru",
    elman_matches_torch => "elman",
    jordan_matches_reference => "jordan",
    luong_dot_matches_opennmt => "luong-dot",
    luong_general_matches_opennmt => "luong-general",
    luong_concat_matches_reference => "luong-concat",
    bahdanau_matches_opennmt_mlp => "bahdanau",
    luong_local_p_matches_reference => "luong-local-p",
    coattention_matches_reference => "coattention",
    han_pool_matches_reference => "han-pool",
    spatial_matches_reference => "spatial",
    din_matches_reference => "din",
    gat_matches_pyg => "gat",
    gatv2_matches_pyg => "gatv2",
}

#[test]
fn every_fixture_layer_is_tested() {
    let mut layers: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| metadata(&p.join("input.safetensors"))["layer"].clone())
        .collect();
    layers.sort();
    layers.dedup();
    let untested: Vec<&String> = layers.iter().filter(|l| !TESTED.contains(&l.as_str())).collect();
    assert!(untested.is_empty(), "fixtures of layers without a test: {untested:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Bad input: one line naming the tensor and shapes, a non-zero exit, nothing written.

/// Runs `op layer` on the files of fixture `case` with the tensors of its input replaced by `edit`.
fn fail_with(
    case: &str,
    layer: &str,
    options: &str,
    edit: &dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join(case);
    let mut inputs = load(&src.join("input.safetensors"));
    edit(&mut inputs);
    let input = dir.path().join("in.safetensors");
    let list: Vec<(&str, &candle_core::Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save(&input, &list);
    let out = dir.path().join("out.safetensors");
    let params = src.join("params.safetensors");
    let args = [
        "op",
        "layer",
        "--layer",
        layer,
        "--params",
        params.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--options",
        options,
    ];
    expect_failure(&args, &out)
}

const LSTM_OPTS: &str = r#"{"hidden_size": 4, "num_layers": 2, "bidirectional": true}"#;

#[test]
fn error_lengths_longer_than_t() {
    let line = fail_with("lstm_2layer_bidir_lengths", "lstm", LSTM_OPTS, &|m| {
        m.insert("lengths".into(), candle_core::Tensor::new(&[4i64, 9, 5], &candle_core::Device::Cpu).unwrap());
    });
    assert_mentions(&line, &["lengths", "9", "T = 5"]);
}

#[test]
fn error_missing_input_and_wrong_state_shape() {
    let line = fail_with("lstm_2layer_bidir_lengths", "lstm", LSTM_OPTS, &|m| {
        m.remove("x");
    });
    assert_mentions(&line, &["missing tensor `x`", "(B, T, C)"]);
    let line = fail_with("lstm_2layer_bidir_lengths", "lstm", LSTM_OPTS, &|m| {
        let h0 = m["h0"].narrow(0, 0, 2).unwrap();
        m.insert("h0".into(), h0);
    });
    assert_mentions(&line, &["h0", "(2, 3, 4)", "(4, 3, 4)"]);
}

#[test]
fn error_missing_parameter_unknown_option_and_layer() {
    // One layer fewer than the parameters hold: the second layer's tensors are not used.
    let line = fail_with("lstm_2layer_bidir_lengths", "lstm", r#"{"hidden_size": 4, "bidirectional": true}"#, &|_| {});
    assert!(line.contains("not used") || line.contains("h0"), "{line}");
    let line = fail_with(
        "lstm_2layer_bidir_lengths",
        "lstm",
        r#"{"hidden_size": 5, "num_layers": 2, "bidirectional": true}"#,
        &|_| {},
    );
    assert_mentions(&line, &["weight_ih_l0", "[20, 4]", "[16, 4]"]);
    let line = fail_with(
        "lstm_2layer_bidir_lengths",
        "lstm",
        r#"{"hidden_size": 4, "num_layers": 2, "bidirectional": true, "hiden": 3}"#,
        &|_| {},
    );
    assert_mentions(&line, &["unknown option", "hiden"]);
    let line = fail_with("lstm_2layer_bidir_lengths", "lstmm", LSTM_OPTS, &|_| {});
    assert_mentions(&line, &["unknown layer `lstmm`", "lstm"]);
    let line = fail_with("gru_1layer", "gru", r#"{"hidden_size": 5}"#, &|m| {
        m.insert("x".into(), m["x"].to_dtype(candle_core::DType::F64).unwrap());
    });
    assert_mentions(&line, &["`x`", "f64", "f32"]);
}

#[test]
fn tested_layers_are_in_the_contract() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/layers.md")).unwrap();
    for l in TESTED {
        assert!(doc.contains(&format!("`{l}`")), "docs/layers.md does not describe `{l}`");
    }
}

#[test]
fn error_edge_index_out_of_range_and_float_edges() {
    let opts = r#"{"heads": 2, "out_channels": 3}"#;
    let line = fail_with("gat_concat", "gat", opts, &|m| {
        let ei = m["edge_index"].to_vec2::<i64>().unwrap();
        let mut rows = ei.clone();
        rows[1][2] = 40;
        m.insert("edge_index".into(), candle_core::Tensor::new(rows, &candle_core::Device::Cpu).unwrap());
    });
    assert_mentions(&line, &["edge_index[:, 2]", "40", "N = "]);
    let line = fail_with("gat_concat", "gat", opts, &|m| {
        m.insert("edge_index".into(), m["edge_index"].to_dtype(candle_core::DType::F32).unwrap());
    });
    assert_mentions(&line, &["edge_index", "int64"]);
}
