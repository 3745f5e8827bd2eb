//! Position encodings against the PyTorch / transformers oracle (scripts/oracle/position.py), plus the invariants
//! each encoding promises (RoPE's relative-position property, cached decoding equals the full pass) and errors for
//! bad input.

mod common;

use attend::position::alibi::alibi_slopes;
use attend::position::learned::LearnedPositions;
use attend::position::relative::{relative_position_bucket, RelativePositionBias, RelativePositionBiasConfig};
use attend::position::rope::{Rope, RopeConfig, RopeLayout};
use attend::position::sinusoidal::{sinusoidal_table, SinusoidalEncoding};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use common::{
    assert_all_grads_finite_nonzero, assert_close, check_finite_diff, fixture_cases, load, varmap_vars, weighted_sum,
    Fixture, F32, F32_GRAD, F64,
};

const AREA: &str = "position";

fn cases(prefix: &str) -> Vec<String> {
    let v: Vec<String> = fixture_cases(AREA).into_iter().filter(|c| c.starts_with(prefix)).collect();
    assert!(!v.is_empty(), "no fixtures/position/{prefix}* cases");
    v
}

fn meta_usize(f: &Fixture, key: &str) -> usize {
    f.meta_str(key)
        .unwrap_or_else(|| panic!("{}: no meta `{key}`", f.path.display()))
        .parse()
        .unwrap_or_else(|e| panic!("{}: meta `{key}`: {e}", f.path.display()))
}

fn meta_bool(f: &Fixture, key: &str) -> bool {
    match f.meta_str(key) {
        Some("true") => true,
        Some("false") => false,
        other => panic!("{}: meta `{key}` = {other:?} is not a bool", f.path.display()),
    }
}

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

// ------------------------------------------------------------------------------------------------------------------
// Sinusoidal
// ------------------------------------------------------------------------------------------------------------------

#[test]
fn sinusoidal_matches_oracle() {
    for case in cases("sinusoidal_") {
        let f = load(AREA, &case);
        let offset = meta_usize(&f, "offset");
        let c = meta_usize(&f, "d_model");
        let want_table = f.t("table");
        let t = want_table.dim(0).unwrap();
        let table = sinusoidal_table(t, c, offset, DType::F32, &Device::Cpu).unwrap();
        assert_close(&format!("{case}: table"), &table, &want_table, F32);

        let enc = SinusoidalEncoding::new(c).unwrap();
        let out = enc.forward(&f.t("x"), offset).unwrap();
        assert_close(&format!("{case}: out"), &out, &f.t("out"), F32);
    }
}

#[test]
fn sinusoidal_offset_rows_equal_full_table() {
    let full = sinusoidal_table(20, 12, 0, DType::F64, &Device::Cpu).unwrap();
    let part = sinusoidal_table(6, 12, 14, DType::F64, &Device::Cpu).unwrap();
    assert_close("rows 14..20", &part, &full.narrow(0, 14, 6).unwrap(), F64);
    // Every (sin, cos) pair lies on the unit circle.
    let sq: Vec<Vec<f64>> = full.sqr().unwrap().to_vec2().unwrap();
    for row in &sq {
        for pair in row.chunks(2) {
            assert!((pair[0] + pair[1] - 1.0).abs() < 1e-12, "sin² + cos² = {}", pair[0] + pair[1]);
        }
    }
}

#[test]
fn sinusoidal_rejects_bad_input() {
    assert!(SinusoidalEncoding::new(0).is_err());
    assert!(sinusoidal_table(3, 0, 0, DType::F32, &Device::Cpu).is_err());
    assert!(sinusoidal_table(2, 4, usize::MAX, DType::F32, &Device::Cpu).is_err());
    let enc = SinusoidalEncoding::new(8).unwrap();
    let e = enc.forward(&randn(&[2, 3, 6], DType::F32), 0).unwrap_err().to_string();
    assert!(e.contains("C = 6") && e.contains("C = 8"), "{e}");
    let e = enc.forward(&randn(&[3, 8], DType::F32), 0).unwrap_err().to_string();
    assert!(e.contains("(B, T, C)"), "{e}");
}

// ------------------------------------------------------------------------------------------------------------------
// Learned positions
// ------------------------------------------------------------------------------------------------------------------

#[test]
fn learned_matches_oracle_forward_and_grads() {
    for case in cases("learned_") {
        let f = load(AREA, &case);
        let offset = meta_usize(&f, "offset");
        let weight = f.var("weight");
        let x = f.var("x");
        let lp = LearnedPositions::from_weight(weight.as_tensor().clone()).unwrap();
        assert_eq!(lp.max_len(), meta_usize(&f, "max_len"));
        let out = lp.forward(x.as_tensor(), offset).unwrap();
        assert_close(&format!("{case}: out"), &out, &f.t("out"), F32);
        let grads = weighted_sum(&out, &f.t("dout")).backward().unwrap();
        assert_close(&format!("{case}: dx"), grads.get(x.as_tensor()).unwrap(), &f.t("dx"), F32_GRAD);
        assert_close(&format!("{case}: dweight"), grads.get(weight.as_tensor()).unwrap(), &f.t("dweight"), F32_GRAD);
    }
}

#[test]
fn learned_varbuilder_name_and_grads_finite_nonzero() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let lp = LearnedPositions::new(16, 8, vb.pp("wpe")).unwrap();
    let vars = varmap_vars(&vm);
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["wpe.weight"], "GPT-2 checkpoint name");
    assert_eq!(lp.weight().dims(), [16, 8]);
    // T = max_len so that every row is used and must receive gradient.
    let out = lp.forward(&randn(&[2, 16, 8], DType::F32), 0).unwrap();
    let grads = weighted_sum(&out, &randn(&[2, 16, 8], DType::F32)).backward().unwrap();
    assert_all_grads_finite_nonzero("LearnedPositions", &vars, &grads);
}

#[test]
fn learned_rejects_bad_input() {
    let lp = LearnedPositions::from_weight(randn(&[16, 8], DType::F32)).unwrap();
    let x = randn(&[2, 5, 8], DType::F32);
    assert!(lp.forward(&x, 11).is_ok(), "positions 11..16 fit exactly");
    let e = lp.forward(&x, 12).unwrap_err().to_string();
    assert!(e.contains("12") && e.contains("T 5") && e.contains("max_len = 16"), "{e}");
    assert!(lp.forward(&x, usize::MAX).is_err());
    assert!(lp.forward(&randn(&[2, 5, 7], DType::F32), 0).is_err());
    assert!(lp.forward(&randn(&[5, 8], DType::F32), 0).is_err());
    assert!(LearnedPositions::from_weight(randn(&[16], DType::F32)).is_err());
    let vm = VarMap::new();
    assert!(LearnedPositions::new(0, 8, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).is_err());
}

// ------------------------------------------------------------------------------------------------------------------
// RoPE
// ------------------------------------------------------------------------------------------------------------------

fn rope(layout: RopeLayout, rotary_dim: usize, max_positions: usize, dtype: DType) -> Rope {
    let cfg = RopeConfig { rotary_dim, max_positions, theta: 10000.0, layout };
    Rope::new(&cfg, dtype, &Device::Cpu).unwrap()
}

#[test]
fn rope_matches_oracle_forward_and_grads() {
    let all = cases("rope_");
    for layout in ["halves", "interleaved"] {
        assert!(all.iter().any(|c| c.starts_with(&format!("rope_{layout}"))), "no {layout} fixture");
    }
    for case in all {
        let f = load(AREA, &case);
        let layout = match f.meta_str("layout") {
            Some("halves") => RopeLayout::Halves,
            Some("interleaved") => RopeLayout::Interleaved,
            other => panic!("{case}: layout {other:?}"),
        };
        let cfg = RopeConfig {
            rotary_dim: meta_usize(&f, "rotary_dim"),
            max_positions: meta_usize(&f, "max_positions"),
            theta: f.meta_f64("theta").unwrap(),
            layout,
        };
        let offset = meta_usize(&f, "offset");
        let rope = Rope::new(&cfg, DType::F32, &Device::Cpu).unwrap();
        let x = f.var("x");
        let out = rope.apply(x.as_tensor(), offset).unwrap();
        assert_close(&format!("{case}: out"), &out, &f.t("out"), F32);
        let grads = weighted_sum(&out, &f.t("dout")).backward().unwrap();
        assert_close(&format!("{case}: dx"), grads.get(x.as_tensor()).unwrap(), &f.t("dx"), F32_GRAD);
    }
}

#[test]
fn rope_finite_differences() {
    for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
        // Partial rotary (6 of 10 features) at an offset exercises every branch of `apply`.
        let rope = rope(layout, 6, 32, DType::F64);
        let x = Var::from_tensor(&randn(&[1, 2, 3, 10], DType::F64)).unwrap();
        let w = randn(&[1, 2, 3, 10], DType::F64);
        let loss = |x: &Tensor| scalar(&weighted_sum(&rope.apply(x, 5).unwrap(), &w));
        let grads = weighted_sum(&rope.apply(x.as_tensor(), 5).unwrap(), &w).backward().unwrap();
        check_finite_diff(&format!("rope {layout:?}"), x.as_tensor(), grads.get(x.as_tensor()).unwrap(), loss, 60);
    }
}

#[test]
fn rope_score_depends_only_on_relative_position() {
    for (layout, rotary_dim) in [(RopeLayout::Halves, 16), (RopeLayout::Interleaved, 16), (RopeLayout::Halves, 8)] {
        let rope = rope(layout, rotary_dim, 128, DType::F64);
        let q = randn(&[1, 1, 1, 16], DType::F64);
        let k = randn(&[1, 1, 1, 16], DType::F64);
        let score = |m: usize, n: usize| {
            let qm = rope.apply(&q, m).unwrap();
            let kn = rope.apply(&k, n).unwrap();
            scalar(&(qm * kn).unwrap().sum_all().unwrap())
        };
        let base = score(3, 10);
        for c in [1, 17, 60, 110] {
            let shifted = score(3 + c, 10 + c);
            assert!(
                (shifted - base).abs() < 1e-10,
                "{layout:?} r={rotary_dim}: <q@{}, k@{}> = {shifted} vs {base}",
                3 + c,
                10 + c
            );
        }
        // ...and it does depend on the relative position (the test above is not vacuous).
        assert!((score(3, 11) - base).abs() > 1e-6, "{layout:?}: score ignores the relative position");
    }
}

#[test]
fn rope_decode_step_equals_row_of_full_pass() {
    for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
        let rope = rope(layout, 8, 16, DType::F32);
        let x = randn(&[2, 3, 9, 12], DType::F32);
        let full = rope.apply(&x, 0).unwrap(); // (B, H, T, D)
        for o in 0..9 {
            let step = rope.apply(&x.narrow(2, o, 1).unwrap(), o).unwrap(); // (B, H, 1, D)
            assert_close(&format!("{layout:?} position {o}"), &step, &full.narrow(2, o, 1).unwrap(), F32);
        }
        // A chunk at an offset (prefill continuation) equals the same rows too.
        let chunk = rope.apply(&x.narrow(2, 4, 5).unwrap(), 4).unwrap();
        assert_close(&format!("{layout:?} chunk 4..9"), &chunk, &full.narrow(2, 4, 5).unwrap(), F32);
    }
}

#[test]
fn rope_is_a_rotation() {
    for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
        let rope = rope(layout, 8, 64, DType::F64);
        let x = randn(&[2, 2, 5, 10], DType::F64);
        let out = rope.apply(&x, 40).unwrap();
        // Norm per head and position is preserved...
        let n_in = x.sqr().unwrap().sum(D::Minus1).unwrap();
        let n_out = out.sqr().unwrap().sum(D::Minus1).unwrap();
        assert_close(&format!("{layout:?}: norms"), &n_out, &n_in, F64);
        // ...the pass-through features are untouched, and position 0 is the identity.
        assert_close(&format!("{layout:?}: pass"), &out.narrow(3, 8, 2).unwrap(), &x.narrow(3, 8, 2).unwrap(), F64);
        let at0 = rope.apply(&x.narrow(2, 0, 1).unwrap(), 0).unwrap();
        assert_close(&format!("{layout:?}: position 0"), &at0, &x.narrow(2, 0, 1).unwrap(), F64);
    }
}

#[test]
fn rope_layouts_are_feature_permutations_of_each_other() {
    // Interleaved pairs (x_{2i}, x_{2i+1}); gathering evens then odds turns them into halves pairs (x_i, x_{i+r/2}).
    let r = 8;
    let to_halves: Vec<u32> = (0..r as u32).step_by(2).chain((1..r as u32).step_by(2)).collect();
    let mut to_interleaved = vec![0u32; r];
    for (i, &p) in to_halves.iter().enumerate() {
        to_interleaved[p as usize] = i as u32;
    }
    let to_halves = Tensor::new(to_halves.as_slice(), &Device::Cpu).unwrap();
    let to_interleaved = Tensor::new(to_interleaved.as_slice(), &Device::Cpu).unwrap();
    let x = randn(&[2, 3, 6, r], DType::F64);
    let inter = rope(RopeLayout::Interleaved, r, 32, DType::F64).apply(&x, 7).unwrap();
    let halves = rope(RopeLayout::Halves, r, 32, DType::F64).apply(&x.index_select(&to_halves, 3).unwrap(), 7).unwrap();
    assert_close("interleaved vs permuted halves", &halves.index_select(&to_interleaved, 3).unwrap(), &inter, F64);
}

#[test]
fn rope_rejects_bad_input() {
    let dev = Device::Cpu;
    for bad in [
        RopeConfig::new(7, 16),
        RopeConfig::new(0, 16),
        RopeConfig::new(8, 0),
        RopeConfig { theta: 0.0, ..RopeConfig::new(8, 16) },
        RopeConfig { theta: f64::NAN, ..RopeConfig::new(8, 16) },
    ] {
        assert!(Rope::new(&bad, DType::F32, &dev).is_err(), "{bad:?} accepted");
    }
    let e = Rope::new(&RopeConfig::new(7, 16), DType::F32, &dev).unwrap_err().to_string();
    assert!(e.contains("rotary_dim") && e.contains('7'), "{e}");

    let rope = rope(RopeLayout::Halves, 8, 16, DType::F32);
    let e = rope.apply(&randn(&[1, 2, 3, 6], DType::F32), 0).unwrap_err().to_string();
    assert!(e.contains("D = 6") && e.contains("rotary_dim = 8"), "{e}");
    assert!(rope.apply(&randn(&[1, 2, 4, 8], DType::F32), 12).is_ok(), "positions 12..16 fit exactly");
    let e = rope.apply(&randn(&[1, 2, 4, 8], DType::F32), 13).unwrap_err().to_string();
    assert!(e.contains("13") && e.contains("T 4") && e.contains("max_positions = 16"), "{e}");
    assert!(rope.apply(&randn(&[1, 2, 4, 8], DType::F32), usize::MAX).is_err());
    assert!(rope.apply(&randn(&[2, 4, 8], DType::F32), 0).is_err(), "rank 3 accepted");
}

// ------------------------------------------------------------------------------------------------------------------
// T5 relative position bias
// ------------------------------------------------------------------------------------------------------------------

#[test]
fn t5_buckets_match_oracle() {
    let f = load(AREA, "t5_buckets");
    let rel: Vec<i64> = f.t("relative_position").to_vec1().unwrap();
    let settings = f.meta_json("settings").unwrap();
    let settings = settings.as_array().expect("settings is a JSON list");
    assert!(settings.len() >= 4);
    for s in settings {
        let name = s["name"].as_str().unwrap();
        let bidirectional = s["bidirectional"].as_bool().unwrap();
        let num_buckets = s["num_buckets"].as_u64().unwrap() as usize;
        let max_distance = s["max_distance"].as_u64().unwrap() as usize;
        let want: Vec<i64> = f.t(name).to_vec1().unwrap();
        for (&r, &w) in rel.iter().zip(&want) {
            let got = relative_position_bucket(r, bidirectional, num_buckets, max_distance);
            assert_eq!(got as i64, w, "{name}: relative position {r}");
        }
    }
}

fn t5_config(f: &Fixture) -> RelativePositionBiasConfig {
    RelativePositionBiasConfig {
        n_heads: meta_usize(f, "n_heads"),
        num_buckets: meta_usize(f, "num_buckets"),
        max_distance: meta_usize(f, "max_distance"),
        bidirectional: meta_bool(f, "bidirectional"),
    }
}

#[test]
fn t5_bias_matches_oracle_forward_and_grads() {
    for case in cases("t5_bias_") {
        let f = load(AREA, &case);
        let cfg = t5_config(&f);
        let (t, s, offset) = (meta_usize(&f, "t"), meta_usize(&f, "s"), meta_usize(&f, "offset"));
        let weight = f.var("weight");
        let rpb = RelativePositionBias::from_weight(&cfg, weight.as_tensor().clone()).unwrap();
        let out = rpb.forward(t, s, offset).unwrap();
        assert_close(&format!("{case}: out"), &out, &f.t("out"), F32);
        let grads = weighted_sum(&out, &f.t("dout")).backward().unwrap();
        assert_close(&format!("{case}: dweight"), grads.get(weight.as_tensor()).unwrap(), &f.t("dweight"), F32_GRAD);
    }
}

#[test]
fn t5_bias_decode_rows_equal_full_bias() {
    for bidirectional in [false, true] {
        let cfg = RelativePositionBiasConfig { n_heads: 3, num_buckets: 8, max_distance: 16, bidirectional };
        let rpb = RelativePositionBias::from_weight(&cfg, randn(&[8, 3], DType::F32)).unwrap();
        let s = 25;
        let full = rpb.forward(s, s, 0).unwrap(); // (1, H, S, S)
        for t in [1, 3] {
            let step = rpb.forward(t, s, s - t).unwrap(); // (1, H, T, S)
            assert_close(
                &format!("bidirectional={bidirectional} last {t} rows"),
                &step,
                &full.narrow(2, s - t, t).unwrap(),
                F32,
            );
        }
    }
}

#[test]
fn t5_bias_varbuilder_name_and_every_bucket_trains() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let prefix = "encoder.block.0.layer.0.SelfAttention";
    // Causal, because bidirectionally T5 never uses bucket `num_buckets / 2` (distance 0 counts as "left"), so that
    // row of the table would rightly get no gradient.
    let cfg = RelativePositionBiasConfig { n_heads: 4, num_buckets: 8, max_distance: 16, bidirectional: false };
    let rpb = RelativePositionBias::new(&cfg, vb.pp(prefix)).unwrap();
    let vars = varmap_vars(&vm);
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [format!("{prefix}.relative_attention_bias.weight")], "T5 checkpoint name");
    // T = S = 40 reaches distances past max_distance, so every bucket is used.
    let out = rpb.forward(40, 40, 0).unwrap();
    assert_eq!(out.dims(), [1, 4, 40, 40]);
    let grads = weighted_sum(&out, &randn(&[1, 4, 40, 40], DType::F32)).backward().unwrap();
    assert_all_grads_finite_nonzero("RelativePositionBias", &vars, &grads);
    let dw = grads.get(vars[0].1.as_tensor()).unwrap();
    let row_mass: Vec<f32> = dw.abs().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(row_mass.iter().all(|&m| m > 0.0), "a bucket received no gradient: {row_mass:?}");
}

#[test]
fn t5_bias_rejects_bad_config_and_bucket_fn_never_panics() {
    let ok = RelativePositionBiasConfig::t5(4, true);
    assert!(ok.validate().is_ok());
    for bad in [
        RelativePositionBiasConfig { n_heads: 0, ..ok.clone() },
        RelativePositionBiasConfig { num_buckets: 3, ..ok.clone() }, // bidirectional: 1 bucket per side, 0 exact
        RelativePositionBiasConfig { num_buckets: 1, bidirectional: false, ..ok.clone() },
        RelativePositionBiasConfig { max_distance: 8, ..ok.clone() }, // 8 exact buckets per side need max_distance > 8
    ] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        assert!(RelativePositionBias::new(&bad, vb).is_err(), "{bad:?} accepted");
    }
    let e = RelativePositionBias::from_weight(&ok, randn(&[32, 3], DType::F32)).unwrap_err().to_string();
    assert!(e.contains("num_buckets = 32") && e.contains("H = 4"), "{e}");

    // Extreme and degenerate arguments stay in range instead of panicking or overflowing.
    for &(r, bidir, nb, md) in &[
        (i64::MIN, true, 32, 128),
        (i64::MIN, false, 32, 128),
        (i64::MAX, true, 32, 128),
        (-5, false, 0, 0),
        (5, true, 1, 0),
        (-3, true, 2, 1),
        (-100, false, 4, 1),
    ] {
        let b = relative_position_bucket(r, bidir, nb, md);
        assert!(b < nb.max(1), "bucket({r}, {bidir}, {nb}, {md}) = {b}");
    }
    assert_eq!(relative_position_bucket(i64::MIN, true, 32, 128), 15, "far left saturates in the lower half");
    assert_eq!(relative_position_bucket(i64::MAX, true, 32, 128), 31, "far right saturates in the upper half");
}

// ------------------------------------------------------------------------------------------------------------------
// ALiBi slopes
// ------------------------------------------------------------------------------------------------------------------

#[test]
fn alibi_slopes_match_oracle() {
    let f = load(AREA, "alibi_slopes");
    let heads = f.meta_json("heads").unwrap();
    let heads: Vec<usize> = heads.as_array().unwrap().iter().map(|h| h.as_u64().unwrap() as usize).collect();
    assert!(heads.contains(&1) && heads.contains(&64));
    for n in heads {
        let got = alibi_slopes(n);
        assert_eq!(got.len(), n);
        let got = Tensor::new(got.as_slice(), &Device::Cpu).unwrap();
        assert_close(&format!("alibi slopes, {n} heads"), &got, &f.t(&format!("slopes_{n}")), F64);
    }
    assert!(alibi_slopes(0).is_empty());
}
