//! Fused ops against PyTorch fixtures (forward and every gradient), against their composed reference twins, and
//! against central finite differences in f64.

mod common;

use attend::ops::{self, CrossEntropyConfig, GeluKind, MaskTensor, Reduction};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

/// Fused or reference twin of an op under test.
#[derive(Clone, Copy, Debug)]
enum Path {
    Fused,
    Reference,
}
const PATHS: [Path; 2] = [Path::Fused, Path::Reference];

fn softmax_path(p: Path, x: &Tensor, m: Option<&MaskTensor>) -> Tensor {
    match p {
        Path::Fused => ops::softmax(x, m).unwrap(),
        Path::Reference => ops::softmax_reference(x, m).unwrap(),
    }
}

#[test]
fn softmax_matches_pytorch() {
    // The ordinary cases, then the NaN / ±∞ ones: the same op, the same tolerances, NaN exactly where PyTorch has NaN.
    for (area, case) in cases_in(&["ops", "nan_rows"], |c| c.starts_with("softmax_")) {
        let f = load(area, &case);
        for path in PATHS {
            let x = f.var("x");
            let madd = f.opt("mask_add").map(|t| Var::from_tensor(&t).unwrap());
            let mask = match (&madd, f.opt("mask_bool")) {
                (Some(m), _) => Some(MaskTensor::Additive(m.as_tensor().clone())),
                (None, Some(b)) => Some(MaskTensor::Keep(b)),
                _ => None,
            };
            let y = softmax_path(path, x.as_tensor(), mask.as_ref());
            let label = format!("{case} {path:?}");
            assert_close(&format!("{label} out"), &y, &f.t("out"), F32);
            let g = weighted_sum(&y, &f.t("dout")).backward().unwrap();
            assert_close(&format!("{label} dx"), g.get(x.as_tensor()).unwrap(), &f.t("dx"), F32_GRAD);
            if let Some(m) = &madd {
                assert_close(&format!("{label} dmask"), g.get(m.as_tensor()).unwrap(), &f.t("dmask_add"), F32_GRAD);
            }
        }
    }
}

#[test]
fn log_softmax_matches_pytorch() {
    // The ordinary cases, then the NaN / ±∞ ones: the same op, the same tolerances, NaN exactly where PyTorch has NaN.
    for (area, case) in cases_in(&["ops", "nan_rows"], |c| c.starts_with("logsoftmax_")) {
        let f = load(area, &case);
        for path in PATHS {
            let x = f.var("x");
            let y = match path {
                Path::Fused => ops::log_softmax(x.as_tensor()).unwrap(),
                Path::Reference => ops::log_softmax_reference(x.as_tensor()).unwrap(),
            };
            assert_close(&format!("{case} {path:?} out"), &y, &f.t("out"), F32);
            let g = weighted_sum(&y, &f.t("dout")).backward().unwrap();
            assert_close(&format!("{case} {path:?} dx"), g.get(x.as_tensor()).unwrap(), &f.t("dx"), F32_GRAD);
        }
    }
}

fn ce_settings(f: &Fixture) -> (CrossEntropyConfig, Reduction) {
    let cfg = CrossEntropyConfig {
        ignore_index: f.meta_f64("ignore_index").unwrap() as i64,
        label_smoothing: f.meta_f64("label_smoothing").unwrap(),
    };
    let red = match f.meta_str("reduction").unwrap() {
        "mean" => Reduction::Mean,
        "sum" => Reduction::Sum,
        "none" => Reduction::None,
        r => panic!("unknown reduction {r}"),
    };
    (cfg, red)
}

fn ce_path(p: Path, logits: &Tensor, targets: &Tensor, cfg: &CrossEntropyConfig, red: Reduction) -> Tensor {
    match p {
        Path::Fused => ops::cross_entropy(logits, targets, cfg, red).unwrap(),
        Path::Reference => ops::cross_entropy_reference(logits, targets, cfg, red).unwrap(),
    }
}

#[test]
fn cross_entropy_matches_pytorch() {
    // The ordinary cases, then the NaN / ±∞ ones: the same op, the same tolerances, NaN exactly where PyTorch has NaN.
    for (area, case) in cases_in(&["ops", "nan_rows"], |c| c.starts_with("cross_entropy_")) {
        let f = load(area, &case);
        let (cfg, red) = ce_settings(&f);
        for path in PATHS {
            let logits = f.var("logits");
            let loss = ce_path(path, logits.as_tensor(), &f.t("targets"), &cfg, red);
            assert_close(&format!("{case} {path:?} out"), &loss, &f.t("out"), F32);
            let g = weighted_sum(&loss, &f.t("dout")).backward().unwrap();
            assert_close(
                &format!("{case} {path:?} dlogits"),
                g.get(logits.as_tensor()).unwrap(),
                &f.t("dlogits"),
                F32_GRAD,
            );
        }
    }
}

#[test]
fn cross_entropy_all_ignored_is_zero_not_nan() {
    let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap()).unwrap();
    let targets = Tensor::new(&[-100i64, -100, -100, -100], &Device::Cpu).unwrap();
    for path in PATHS {
        let loss = ce_path(path, logits.as_tensor(), &targets, &CrossEntropyConfig::default(), Reduction::Mean);
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0, "{path:?}");
        let g = loss.backward().unwrap();
        let d: Vec<f32> = g.get(logits.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(d.iter().all(|&v| v == 0.0), "{path:?}: gradient of an all-ignored batch must be 0");
    }
}

#[test]
fn norms_match_pytorch() {
    // The ordinary cases, then the NaN / ±∞ ones: the same op, the same tolerances, NaN exactly where PyTorch has NaN.
    for (area, case) in cases_in(&["ops", "nan_rows"], |c| c.contains("_norm_")) {
        let f = load(area, &case);
        let eps = f.meta_f64("eps").unwrap();
        let rms = case.starts_with("rms");
        for path in PATHS {
            let (x, w) = (f.var("x"), f.var("weight"));
            let b = f.opt("bias").map(|t| Var::from_tensor(&t).unwrap());
            let (xt, wt, bt) = (x.as_tensor(), Some(w.as_tensor()), b.as_ref().map(|b| b.as_tensor()));
            let y = match (rms, path) {
                (false, Path::Fused) => ops::layer_norm(xt, wt, bt, eps),
                (false, Path::Reference) => ops::layer_norm_reference(xt, wt, bt, eps),
                (true, Path::Fused) => ops::rms_norm(xt, wt, eps),
                (true, Path::Reference) => ops::rms_norm_reference(xt, wt, eps),
            }
            .unwrap();
            let label = format!("{case} {path:?}");
            assert_close(&format!("{label} out"), &y, &f.t("out"), F32);
            let g = weighted_sum(&y, &f.t("dout")).backward().unwrap();
            assert_close(&format!("{label} dx"), g.get(xt).unwrap(), &f.t("dx"), F32_GRAD);
            assert_close(&format!("{label} dweight"), g.get(w.as_tensor()).unwrap(), &f.t("dweight"), F32_GRAD);
            if let Some(b) = &b {
                assert_close(&format!("{label} dbias"), g.get(b.as_tensor()).unwrap(), &f.t("dbias"), F32_GRAD);
            }
        }
    }
}

#[test]
fn gelu_matches_pytorch() {
    for case in ["gelu_tanh", "gelu_erf"] {
        let f = load("ops", case);
        let kind = if f.meta_str("approximate") == Some("tanh") { GeluKind::Tanh } else { GeluKind::Erf };
        for path in PATHS {
            let x = f.var("x");
            let y = match path {
                Path::Fused => ops::gelu(x.as_tensor(), kind).unwrap(),
                Path::Reference => ops::gelu_reference(x.as_tensor(), kind).unwrap(),
            };
            assert_close(&format!("{case} {path:?} out"), &y, &f.t("out"), F32);
            let g = weighted_sum(&y, &f.t("dout")).backward().unwrap();
            assert_close(&format!("{case} {path:?} dx"), g.get(x.as_tensor()).unwrap(), &f.t("dx"), F32_GRAD);
        }
    }
}

#[test]
fn tanh_matches_pytorch() {
    let f = load("ops", "tanh");
    for path in PATHS {
        let x = f.var("x");
        let y = match path {
            Path::Fused => ops::tanh(x.as_tensor()).unwrap(),
            Path::Reference => ops::tanh_reference(x.as_tensor()).unwrap(),
        };
        assert_close(&format!("tanh {path:?} out"), &y, &f.t("out"), F32);
        let g = weighted_sum(&y, &f.t("dout")).backward().unwrap();
        assert_close(&format!("tanh {path:?} dx"), g.get(x.as_tensor()).unwrap(), &f.t("dx"), F32_GRAD);
    }
    // NaN and the limits as PyTorch's: tanh(±∞) = ±1, NaN stays NaN.
    let dev = Device::Cpu;
    let y = ops::tanh(&Tensor::new(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN], &dev).unwrap()).unwrap();
    let v: Vec<f32> = y.to_vec1().unwrap();
    assert!(v[0] == 1.0 && v[1] == -1.0 && v[2].is_nan(), "{v:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Finite differences: every hand-written backward, in f64.

fn randn64(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed, DType::F64)
}

#[test]
fn fused_backwards_match_finite_differences() {
    let dev = Device::Cpu;
    let add = (randn64(&[1, 5, 7], 3) * 2.0).unwrap();
    let add = Tensor::cat(&[add, Tensor::full(f64::NEG_INFINITY, (1, 1, 7), &dev).unwrap()], 1).unwrap(); // (1, 6, 7), last row dead
    let keep = Tensor::from_vec((0..42u8).map(|i| (i % 3 != 0) as u8).collect::<Vec<_>>(), (1, 6, 7), &dev).unwrap();
    fd_check("softmax", randn64(&[2, 6, 7], 1), |x| ops::softmax(x, None).unwrap());
    fd_check("tanh", randn64(&[3, 9], 41), |x| ops::tanh(x).unwrap());
    fd_check("softmax additive", randn64(&[2, 6, 7], 2), |x| {
        ops::softmax(x, Some(&MaskTensor::Additive(add.clone()))).unwrap()
    });
    fd_check("softmax keep", randn64(&[2, 6, 7], 4), |x| {
        ops::softmax(x, Some(&MaskTensor::Keep(keep.clone()))).unwrap()
    });
    // The additive mask's own gradient (a learned bias is passed this way).
    let x = randn64(&[2, 6, 7], 5);
    fd_check("softmax d(mask)", randn64(&[1, 6, 7], 6), |m| {
        ops::softmax(&x, Some(&MaskTensor::Additive(m.clone()))).unwrap()
    });
    fd_check("log_softmax", randn64(&[3, 9], 7), |x| ops::log_softmax(x).unwrap());
    let targets = Tensor::new(&[1i64, -100, 4, 0, 3], &dev).unwrap();
    let cfg = CrossEntropyConfig { ignore_index: -100, label_smoothing: 0.2 };
    fd_check("cross_entropy", randn64(&[5, 6], 8), |x| ops::cross_entropy(x, &targets, &cfg, Reduction::Mean).unwrap());
    fd_check("cross_entropy none", randn64(&[5, 6], 9), |x| {
        ops::cross_entropy(x, &targets, &cfg, Reduction::None).unwrap()
    });
    let w = (randn64(&[12], 10) + 1.0).unwrap();
    let b = randn64(&[12], 11);
    fd_check("layer_norm dx", randn64(&[4, 12], 12), |x| ops::layer_norm(x, Some(&w), Some(&b), 1e-5).unwrap());
    fd_check("layer_norm no weight", randn64(&[4, 12], 13), |x| ops::layer_norm(x, None, None, 1e-5).unwrap());
    let x = randn64(&[4, 12], 14);
    fd_check("layer_norm dw", w.clone(), |w| ops::layer_norm(&x, Some(w), None, 1e-5).unwrap());
    fd_check("rms_norm dx", randn64(&[4, 12], 15), |x| ops::rms_norm(x, Some(&w), 1e-6).unwrap());
    fd_check("rms_norm dw", w.clone(), |w| ops::rms_norm(&x, Some(w), 1e-6).unwrap());
    for kind in [GeluKind::Erf, GeluKind::Tanh] {
        fd_check(&format!("gelu {kind:?}"), (randn64(&[50], 16) * 3.0).unwrap(), |x| ops::gelu(x, kind).unwrap());
    }
    fd_check("dropout", randn64(&[64], 17), |x| ops::dropout(x, 0.3, 1234, 0).unwrap());
}

#[test]
fn fused_equals_reference_in_f64() {
    // Beyond the fixtures: odd sizes, 3-D broadcast masks, both paths in f64 agree to ~1e-12.
    let x = Var::from_tensor(&randn64(&[3, 4, 5, 11], 21)).unwrap();
    let m = Var::from_tensor(&randn64(&[3, 1, 5, 11], 22)).unwrap();
    let dy = randn64(&[3, 4, 5, 11], 23);
    let mut results = vec![];
    for path in PATHS {
        let y = softmax_path(path, x.as_tensor(), Some(&MaskTensor::Additive(m.as_tensor().clone())));
        let g = weighted_sum(&y, &dy).backward().unwrap();
        results.push((y, g.get(x.as_tensor()).unwrap().clone(), g.get(m.as_tensor()).unwrap().clone()));
    }
    assert_close("softmax f64 out", &results[0].0, &results[1].0, F64);
    assert_close("softmax f64 dx", &results[0].1, &results[1].1, F64);
    assert_close("softmax f64 dmask", &results[0].2, &results[1].2, F64);
}

#[test]
fn fully_masked_rows_give_zero_output_and_gradient() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn64(&[2, 3, 5], 30).to_dtype(DType::F32).unwrap()).unwrap();
    let keep = Tensor::zeros((1, 3, 5), DType::U8, &dev).unwrap();
    let add = Tensor::full(f32::NEG_INFINITY, (2, 1, 5), &dev).unwrap();
    for mask in [MaskTensor::Keep(keep), MaskTensor::Additive(add)] {
        for path in PATHS {
            let y = softmax_path(path, x.as_tensor(), Some(&mask));
            let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(yv.iter().all(|&v| v == 0.0), "{path:?}: fully masked output must be 0, got {yv:?}");
            let g = y.sum_all().unwrap().backward().unwrap();
            let d: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(d.iter().all(|&v| v == 0.0), "{path:?}: gradient must be 0, got {d:?}");
        }
    }
}

#[test]
fn half_precision_inputs_run_in_f32() {
    let x = randn64(&[4, 33], 40).to_dtype(DType::F32).unwrap();
    let want = ops::softmax(&x, None).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let got = ops::softmax(&x.to_dtype(dt).unwrap(), None).unwrap();
        assert_eq!(got.dtype(), dt);
        assert_close(
            &format!("softmax {dt:?}"),
            &got.to_dtype(DType::F32).unwrap(),
            &want,
            Tol { atol: 4e-3, rtol: 1e-2 },
        );
        let ln = ops::layer_norm(&x.to_dtype(dt).unwrap(), None, None, 1e-5).unwrap();
        let ln_want = ops::layer_norm(&x, None, None, 1e-5).unwrap();
        assert_close(
            &format!("layer_norm {dt:?}"),
            &ln.to_dtype(DType::F32).unwrap(),
            &ln_want,
            Tol { atol: 2e-2, rtol: 1e-2 },
        );
    }
}

#[test]
fn dropout_is_seeded_and_matches_its_reference() {
    let x = Var::from_tensor(&Tensor::ones((100_000,), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let p = 0.25;
    let a = ops::dropout(x.as_tensor(), p, 7, 0).unwrap();
    let b = ops::dropout(x.as_tensor(), p, 7, 0).unwrap();
    let c = ops::dropout(x.as_tensor(), p, 8, 0).unwrap();
    let r = ops::dropout_reference(x.as_tensor(), p, 7, 0).unwrap();
    assert_close("same seed", &a, &b, Tol { atol: 0.0, rtol: 0.0 });
    assert_close("fused vs reference", &a, &r, F32);
    let av: Vec<f32> = a.to_vec1().unwrap();
    let cv: Vec<f32> = c.to_vec1().unwrap();
    assert!(av.iter().zip(&cv).any(|(x, y)| x != y), "different seeds gave the same mask");
    let dropped = av.iter().filter(|&&v| v == 0.0).count() as f64 / av.len() as f64;
    // Binomial standard deviation here is ~0.0014; 0.01 is 7σ.
    assert!((dropped - p).abs() < 0.01, "drop rate {dropped} for p = {p}");
    assert!(av.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6), "kept values must be scaled by 1/(1-p)");
    // Backward regenerates the forward's mask: with x = 1, dx (for dy = 1) equals y.
    let g = a.sum_all().unwrap().backward().unwrap();
    assert_close("dropout backward mask", g.get(x.as_tensor()).unwrap(), &a, Tol { atol: 0.0, rtol: 0.0 });
    // An offset continues the same stream: elements 10.. of offset 0 equal elements 0.. of offset 10.
    let shifted = ops::dropout(&x.as_tensor().narrow(0, 0, 1000).unwrap(), p, 7, 10).unwrap();
    assert_close("offset", &shifted, &a.narrow(0, 10, 1000).unwrap(), Tol { atol: 0.0, rtol: 0.0 });
}

#[test]
fn bad_input_is_an_error_naming_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap();
    let err = |r: attend::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(ops::softmax(&x, Some(&MaskTensor::Keep(Tensor::zeros((4, 5), DType::U8, &dev).unwrap()))));
    assert!(e.contains("[4, 5]") && e.contains("[2, 3, 5]"), "{e}");
    let e = err(ops::softmax(&x, Some(&MaskTensor::Keep(Tensor::zeros((3, 5), DType::F32, &dev).unwrap()))));
    assert!(e.contains("u8"), "{e}");
    let e = err(ops::layer_norm(&x, Some(&Tensor::ones(4, DType::F32, &dev).unwrap()), None, 1e-5));
    assert!(e.contains("weight") && e.contains("[4]"), "{e}");
    let logits = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    let e = err(ops::cross_entropy(
        &logits,
        &Tensor::new(&[0i64, 4, 1], &dev).unwrap(),
        &Default::default(),
        Reduction::Mean,
    ));
    assert!(e.contains("target 4") && e.contains("0..4"), "{e}");
    let e =
        err(ops::cross_entropy(&logits, &Tensor::new(&[0i64, 1], &dev).unwrap(), &Default::default(), Reduction::Mean));
    assert!(e.contains("[2]") && e.contains("[3, 4]"), "{e}");
    let e = err(ops::dropout(&x, 1.0, 0, 0));
    assert!(e.contains("[0, 1)"), "{e}");
    let e = err(ops::softmax(&Tensor::zeros((2, 3), DType::U32, &dev).unwrap(), None));
    assert!(e.contains("U32"), "{e}");
}

/// The linear op (its bias gradient is one product) against its composed twin, forward and every gradient, in f32
/// and f64, and against finite differences.
#[test]
fn linear_matches_its_twin_and_finite_differences() {
    // Six rows take the matrix product; one and three f32 rows the streaming kernel of decoding (gemv).
    for (shape, n) in [([2usize, 3, 5], 4usize), ([1, 1, 37], 70), ([1, 3, 37], 9)] {
        for dtype in [DType::F32, DType::F64] {
            let k = shape[2];
            let x = Var::from_tensor(&randn(&shape, 20, dtype)).unwrap();
            let w = Var::from_tensor(&randn(&[n, k], 21, dtype)).unwrap();
            let b = Var::from_tensor(&randn(&[n], 22, dtype)).unwrap();
            let dy = randn(&[shape[0], shape[1], n], 23, dtype);
            let run = |fused: bool, bias: bool| {
                let f = if fused { ops::linear } else { ops::linear_reference };
                let y = f(x.as_tensor(), w.as_tensor(), bias.then(|| b.as_tensor())).unwrap();
                let g = weighted_sum(&y, &dy).backward().unwrap();
                let vars: Vec<&Var> = if bias { vec![&x, &w, &b] } else { vec![&x, &w] };
                let grads: Vec<Tensor> = vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect();
                (y, grads)
            };
            for bias in [true, false] {
                let ((y, g), (yr, gr)) = (run(true, bias), run(false, bias));
                let tol = if dtype == DType::F32 { F32_GRAD } else { F64 };
                let label = format!("linear {shape:?}×({n}, {k}) {dtype:?} bias {bias}");
                assert_close(&format!("{label} y"), &y, &yr, tol);
                for (name, (a, r)) in ["dx", "dw", "db"].iter().zip(g.iter().zip(&gr)) {
                    assert_close(&format!("{label} {name}"), a, r, tol);
                }
            }
        }
    }
    let (w, b, x) = (randn64(&[4, 5], 24), randn64(&[4], 25), randn64(&[3, 5], 26));
    fd_check("linear dx", x.clone(), |x| ops::linear(x, &w, Some(&b)).unwrap());
    fd_check("linear dw", w.clone(), |w| ops::linear(&x, w, Some(&b)).unwrap());
    fd_check("linear db", b.clone(), |b| ops::linear(&x, &w, Some(b)).unwrap());
}

/// `vjp_loss(out, dout)` against its composed twin `Σ out ⊙ dout`: the same value, the same gradient for every
/// tensor upstream of `out` (also when the gradient arriving at the loss is not 1, and for a strided `out`), no
/// gradient for `dout`, and errors naming both shapes.
#[test]
fn vjp_loss_matches_the_weighted_sum_it_replaces() {
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&randn(&[3, 4, 5], 1, dtype)).unwrap();
        let dout = Var::from_tensor(&randn(&[3, 5, 4], 2, dtype)).unwrap();
        // A strided `out` (a transpose) built from the tracked `x`, so the gradient travels through one more op.
        let out = (x.as_tensor().tanh().unwrap() * 1.5).unwrap().transpose(1, 2).unwrap();
        for scale in [1.0, -2.5] {
            let fused = (ops::vjp_loss(&out, dout.as_tensor().clone()).unwrap() * scale).unwrap();
            let composed = (weighted_sum(&out, dout.as_tensor()) * scale).unwrap();
            let label = format!("{dtype:?} scale {scale}");
            let tol = if dtype == DType::F32 { F32 } else { F64 };
            assert_close(&format!("{label} value"), &fused, &composed, tol);
            let (g1, g2) = (fused.backward().unwrap(), composed.backward().unwrap());
            assert_close(&format!("{label} dx"), g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap(), tol);
            assert!(g1.get(dout.as_tensor()).is_none(), "{label}: dout is a constant and gets no gradient");
            let e = fused.backward().unwrap_err().to_string();
            assert!(e.contains("already ran"), "{label}: a second backward of one loss is refused: {e}");
        }
    }
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let e = ops::vjp_loss(&a, Tensor::zeros((3, 2), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("(2, 3)") && e.contains("(3, 2)"), "{e}");
    let e = ops::vjp_loss(&a, Tensor::zeros((2, 3), DType::F64, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("F32") && e.contains("F64"), "{e}");
}
