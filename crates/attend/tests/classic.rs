//! The classic attention path (scores → mask → normalise → weighted sum) and its normalisers.
//!
//! Oracles: the `entmax` package and PyTorch reach these ops through `fixtures/layers` (the CLI test
//! `attend-cli/tests/op_layer.rs`); here the fused sparse normalisers are checked against their composed reference
//! twins (forward and gradients, f64 and f32, masks, fully-masked rows, ties) and finite differences, and the classic
//! path against the definitions of its parts.

mod common;

use attend::attention::classic::{
    attend_scores, attend_scores_with, classic_attention, normalize_scores, ClassicOptions, Normalizer,
};
use attend::attention::score::{AdditiveScore, AdditiveScoreConfig, DotScore, GeneralScore, GeneralScoreConfig, Score};
use attend::attention::{Mask, MaskTensor};
use attend::ops;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;

fn randn64(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed, DType::F64)
}

/// Scores with ties, a dominant entry, a fully hidden row and a row hidden but for one key, and a keep mask.
fn scores_and_mask() -> (Tensor, MaskTensor) {
    let dev = Device::Cpu;
    let mut x = (randn64(&[2, 5, 9], 1) * 1.5).unwrap();
    let ties = Tensor::new(&[[0.5f64, 0.5, 0.5, -1.0, 0.5, 0.2, 0.2, 3.0, 3.0]], &dev).unwrap();
    let dominant = Tensor::new(&[[9.0f64, 0.0, 0.1, -0.3, 0.2, 0.0, 0.4, 0.1, -2.0]], &dev).unwrap();
    x = x.slice_assign(&[0..1, 0..1, 0..9], &ties.unsqueeze(0).unwrap()).unwrap();
    x = x.slice_assign(&[0..1, 1..2, 0..9], &dominant.unsqueeze(0).unwrap()).unwrap();
    let mut keep = vec![1u8; 2 * 5 * 9];
    (0..9).for_each(|j| keep[2 * 9 + j] = 0); // batch 0, row 2: sees nothing
    (0..9).for_each(|j| keep[9 * 9 + j] = (j == 4) as u8); // batch 1, row 4: one key
    (0..2 * 5 * 9).step_by(7).for_each(|i| keep[i] = 0);
    (x, MaskTensor::Keep(Tensor::from_vec(keep, (2, 5, 9), &dev).unwrap()))
}

const SPARSE: [Normalizer; 2] = [Normalizer::Sparsemax, Normalizer::Entmax15];

#[test]
fn sparse_normalisers_equal_their_reference_twins() {
    let (x, mask) = scores_and_mask();
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { F64 } else { F32 };
        let gtol = if dtype == DType::F64 { F64 } else { F32_GRAD };
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let dy = randn(&[2, 5, 9], 7, dtype);
        for n in SPARSE {
            for m in [None, Some(&mask)] {
                let label = format!("{n:?} {dtype:?} mask={}", m.is_some());
                let fused = n.apply(xv.as_tensor(), m).unwrap();
                let reference = n.apply_reference(xv.as_tensor(), m).unwrap();
                assert_close(&format!("{label} forward"), &fused, &reference, tol);
                let gf = weighted_sum(&fused, &dy).backward().unwrap();
                let gr = weighted_sum(&reference, &dy).backward().unwrap();
                assert_close(
                    &format!("{label} dx"),
                    gf.get(xv.as_tensor()).unwrap(),
                    gr.get(xv.as_tensor()).unwrap(),
                    gtol,
                );
                // Distributions over the visible keys; hidden keys and fully hidden rows are exactly zero.
                let sums: Vec<f64> =
                    fused.to_dtype(DType::F64).unwrap().sum(2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for (r, s) in sums.iter().enumerate() {
                    let dead = m.is_some() && r == 2;
                    assert!((s - if dead { 0.0 } else { 1.0 }).abs() < 1e-5, "{label}: row {r} sums to {s}");
                }
                if let Some(MaskTensor::Keep(k)) = m {
                    let hidden_mass = k.eq(0u8).unwrap().where_cond(&fused, &fused.zeros_like().unwrap()).unwrap();
                    assert_eq!(
                        hidden_mass
                            .abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap(),
                        0.0
                    );
                }
            }
        }
    }
}

#[test]
fn sparse_normaliser_backwards_match_finite_differences() {
    let (x, mask) = scores_and_mask();
    for n in SPARSE {
        fd_check(&format!("{n:?}"), x.clone(), |x| n.apply(x, None).unwrap());
        fd_check(&format!("{n:?} masked"), x.clone(), |x| n.apply(x, Some(&mask)).unwrap());
    }
}

#[test]
fn sparse_weights_are_sparse_and_tend_to_hard_attention() {
    // A clear winner takes all the weight (hard attention); sparsemax is sparser than entmax, which is sparser than
    // softmax, on the same scores.
    let x = Tensor::new(&[[2.0f64, 1.2, 0.9, 0.1, -1.0, -2.0]], &Device::Cpu).unwrap();
    let zeros = |n: Normalizer| {
        let w: Vec<f64> = n.apply(&x, None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        w.iter().filter(|&&v| v == 0.0).count()
    };
    assert_eq!(zeros(Normalizer::Softmax), 0);
    assert!(zeros(Normalizer::Sparsemax) > zeros(Normalizer::Entmax15) && zeros(Normalizer::Entmax15) > 0);
    let hard = Tensor::new(&[[9.0f64, 1.0, 0.0]], &Device::Cpu).unwrap();
    for n in SPARSE {
        assert_eq!(n.apply(&hard, None).unwrap().to_vec2::<f64>().unwrap(), [[1.0, 0.0, 0.0]], "{n:?}");
    }
}

#[test]
fn non_finite_scores_propagate_and_minus_infinity_hides() {
    let dev = Device::Cpu;
    let x =
        Tensor::new(&[[1.0f32, f32::NAN, 0.0], [f32::NEG_INFINITY, 2.0, 1.0], [f32::NEG_INFINITY; 3]], &dev).unwrap();
    for n in SPARSE {
        let w = n.apply(&x, None).unwrap().to_vec2::<f32>().unwrap();
        assert!(w[0].iter().all(|v| v.is_nan()), "{n:?}: a NaN score makes its row NaN: {w:?}");
        assert_eq!(w[1][0], 0.0, "{n:?}");
        assert!((w[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(w[2], [0.0; 3], "{n:?}: a row with no visible score is zero");
    }
}

#[test]
fn sigmoid_weights_are_independent_and_masked() {
    let (x, mask) = scores_and_mask();
    let w = Normalizer::Sigmoid.apply(&x, Some(&mask)).unwrap();
    let MaskTensor::Keep(k) = &mask else { unreachable!() };
    let want = k.where_cond(&ops::sigmoid(&x).unwrap(), &x.zeros_like().unwrap()).unwrap();
    let manual = (x.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
    assert_close("sigmoid", &ops::sigmoid(&x).unwrap(), &manual, F64);
    assert_close("masked sigmoid", &w, &want, F64);
}

#[test]
fn classic_path_masks_normalises_and_sums() {
    let (b, t, s, dv) = (2, 4, 6, 3);
    let scores = Var::from_tensor(&randn64(&[b, t, s], 11)).unwrap();
    let values = Var::from_tensor(&randn64(&[b, s, dv], 12)).unwrap();
    let mask = Mask::none().with_key_lengths(vec![6, 0]); // the second batch sees nothing
    let keep =
        Tensor::from_vec((0..b * s).map(|i| (i < s) as u8).collect::<Vec<_>>(), (b, 1, s), &Device::Cpu).unwrap();
    for n in [Normalizer::Softmax, Normalizer::Sigmoid, Normalizer::Sparsemax, Normalizer::Entmax15] {
        let out = attend_scores(scores.as_tensor(), values.as_tensor(), &mask, n).unwrap();
        // By definition: the normaliser under the same mask as a tensor, then a plain batched product.
        let w = n.apply_reference(scores.as_tensor(), Some(&MaskTensor::Keep(keep.clone()))).unwrap();
        assert_close(&format!("{n:?} weights"), &out.weights, &w, F64);
        assert_close(&format!("{n:?} context"), &out.context, &w.matmul(values.as_tensor()).unwrap(), F64);
        let dead = out.context.get(1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(dead, 0.0, "{n:?}: a query that sees no key has a zero context");
        // A loss on the weights and the context reaches the scores through the fused normaliser as through the
        // reference.
        let run = |reference| {
            let o = attend_scores_with(
                scores.as_tensor(),
                values.as_tensor(),
                &mask,
                ClassicOptions { normalizer: n, reference },
            )
            .unwrap();
            let loss = (weighted_sum(&o.context, &randn64(&[b, t, dv], 13))
                + weighted_sum(&o.weights, &randn64(&[b, t, s], 14)))
            .unwrap();
            let g = loss.backward().unwrap();
            (g.get(scores.as_tensor()).unwrap().clone(), g.get(values.as_tensor()).unwrap().clone())
        };
        let (f, r) = (run(false), run(true));
        assert_close(&format!("{n:?} dscores"), &f.0, &r.0, F64);
        assert_close(&format!("{n:?} dvalues"), &f.1, &r.1, F64);
    }
    // Structural masks apply as in the core: causal hides keys right of the (end-aligned) diagonal.
    let w = normalize_scores(scores.as_tensor(), &Mask::causal(), ClassicOptions::default()).unwrap();
    let v: Vec<Vec<Vec<f64>>> = w.to_vec3().unwrap();
    for i in 0..t {
        for j in 0..s {
            assert_eq!(v[0][i][j] == 0.0, j > i + s - t, "causal ({i}, {j})");
        }
    }
}

#[test]
fn every_score_function_runs_the_same_path() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let (q, k, v) = (randn64(&[2, 3, 4], 21), randn64(&[2, 5, 4], 22), randn64(&[2, 5, 6], 23));
    let general = GeneralScore::new(&GeneralScoreConfig { query_dim: 4, key_dim: 4 }, vb.pp("g")).unwrap();
    let additive =
        AdditiveScore::new(&AdditiveScoreConfig { query_dim: 4, key_dim: 4, attn_dim: 7 }, vb.pp("a")).unwrap();
    /// A user's own score: negative squared distance.
    struct Distance;
    impl Score for Distance {
        fn score(&self, q: &Tensor, k: &Tensor) -> attend::Result<Tensor> {
            let d = q.unsqueeze(2)?.broadcast_sub(&k.unsqueeze(1)?)?; // (B, T, S, D)
            Ok(d.sqr()?.sum(3)?.neg()?)
        }
    }
    let scores: [&dyn Score; 4] = [&DotScore, &general, &additive, &Distance];
    let mask = Mask::none().with_key_lengths(vec![5, 3]);
    for (i, sc) in scores.iter().enumerate() {
        for n in [Normalizer::Softmax, Normalizer::Entmax15] {
            let opts = ClassicOptions { normalizer: n, reference: false };
            let got = classic_attention(*sc, &q, &k, &v, &mask, opts).unwrap();
            let want = attend_scores_with(&sc.score(&q, &k).unwrap(), &v, &mask, opts).unwrap();
            assert_close(&format!("score {i} {n:?}"), &got.context, &want.context, F64);
            assert_eq!(got.weights.dims(), &[2, 3, 5]);
        }
    }
}

#[test]
fn errors_name_the_shapes() {
    let dev = Device::Cpu;
    let s = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
    let v = Tensor::zeros((2, 5, 6), DType::F32, &dev).unwrap();
    let e = attend_scores(&s, &v, &Mask::none(), Normalizer::Softmax).unwrap_err().to_string();
    assert!(e.contains("(2, 3, 4)") && e.contains("(2, 5, 6)"), "{e}");
    let e = Normalizer::parse("softermax").unwrap_err().to_string();
    assert!(e.contains("softermax") && e.contains("entmax15"), "{e}");
    let e = ops::sparsemax(&Tensor::zeros(0, DType::F32, &dev).unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("sparsemax") && e.contains("[0]"), "{e}");
}
