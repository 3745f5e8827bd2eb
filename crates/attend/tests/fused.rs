//! The fused attention path (`AttentionImpl::Fused`, the flash kernel as a candle op) against its reference twin
//! (`AttentionImpl::Reference`, plain differentiable candle ops): a seeded sweep of shapes × every kind of
//! [`Mask`], comparing the output, the log-sum-exp, the weights (which the fused path recomputes from the
//! log-sum-exp) and the gradients of q, k, v; bf16 inputs; dropout against the materialised path with the same
//! seed; and queries that see no key.
//!
//! Tolerances (`|got − want| ≤ atol + rtol·|want|`), both sides f32:
//! - values: the two paths sum `q·k` (D terms), the softmax (S terms) and `P V` (S terms) in different orders and
//!   the kernel's `exp` is a polynomial (≈ 1e-7 relative); each is ~1e-7 relative per term, a few hundred terms
//!   at most, so 1e-4 relative and 2e-5 absolute (for values near zero) bound them with margin.
//! - gradients: one more reduction each (`dP = dO Vᵀ`, then `dS K`, `dSᵀ Q` over T or S, and G query heads summed
//!   into one K/V head), with cancellation in `dS = P ⊙ (dP − Δ)`: 2.5× looser.
//! - bf16: the fused path runs `Q Kᵀ` on the bf16 values exactly (products of bf16 are exact in f32, f32
//!   accumulation), so lse keeps the values tolerance (weights come back in bf16, as on the materialised path); but `P V` takes `P` rounded to bf16 and the
//!   output is rounded to bf16, each with unit roundoff 2⁻⁸: `out` gets 2·2⁻⁸ ≈ 8e-3 relative plus 4e-3 absolute
//!   for the probability rounding (`2⁻⁸·Σ P|v|` in the worst case, a random walk in practice: measured ≤ 2e-3).
//!   The backward reads that bf16 `O` in `Δ = Σ dO ⊙ O` (error ≈ 2⁻⁸·|O|·|dO|·√Dv), which reaches
//!   `dS = P ⊙ (dP − Δ)` and is summed over up to G·T query rows into dK: 2e-2 absolute (measured ≤ 1e-2 for
//!   gradients of magnitude ~3) and 4·2⁻⁸ relative.

mod common;

use attend::attention::{attention_with, AttentionDropout, AttentionImpl, AttentionOptions, Mask, MaskTensor};
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{assert_close, note_bf16_path, randn, weighted_sum, Tol};

const VALUES: Tol = Tol { atol: 2e-5, rtol: 1e-4 };
const GRADS: Tol = Tol { atol: 5e-5, rtol: 2.5e-4 };
const BF16_OUT: Tol = Tol { atol: 4e-3, rtol: 8e-3 };
const BF16_GRAD: Tol = Tol { atol: 2e-2, rtol: 1.6e-2 };

// ---------------------------------------------------------------------------------------------------------------
// Configurations

/// Shapes and mask parameters come from SplitMix64 (tensor values from `common::randn`).
use attend_kernels::rng::SplitMix64 as Rng;

/// One attention call's sizes and scale.
#[derive(Clone, Copy, Debug)]
struct Config {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    dv: usize,
    scale: Option<f64>,
    seed: u64,
}

impl Config {
    fn label(&self) -> String {
        let Config { b, h, hkv, t, s, d, dv, scale, seed } = *self;
        let scale = scale.map(|x| format!(" scale {x:.4}")).unwrap_or_default();
        format!("B{b} H{h} Hkv{hkv} T{t} S{s} D{d} Dv{dv}{scale} seed {seed}")
    }
}

const HEAD_DIMS: [usize; 6] = [32, 64, 80, 96, 128, 256];

/// 40 seeded configurations: every D of [`HEAD_DIMS`], Dv ≠ D in a quarter of them, B ∈ {1, 2}, H ∈ 1..=8 with a
/// random divisor as Hkv (MQA every fifth), odd T ≠ S (T > S in some), an explicit scale in a third; shorter
/// sequences for wide heads. Two more with head dims that are not multiples of 16 (the zero-padding path).
fn configs() -> Vec<Config> {
    let mut rng = Rng(0xf05e_d5ee_d000);
    let mut v: Vec<Config> = (0..40)
        .map(|c| {
            let d = HEAD_DIMS[c % 6];
            let dv = if c % 4 == 3 { HEAD_DIMS[(c / 4 + 1) % 6] } else { d };
            random_config(&mut rng, c, d, dv)
        })
        .collect();
    v.push(random_config(&mut rng, 40, 40, 24));
    v.push(random_config(&mut rng, 41, 8, 72));
    v
}

fn random_config(rng: &mut Rng, c: usize, d: usize, dv: usize) -> Config {
    let b = 1 + rng.below(2);
    let h = 1 + rng.below(8);
    let divisors: Vec<usize> = (1..=h).filter(|&x| h.is_multiple_of(x)).collect();
    let hkv = if c.is_multiple_of(5) { 1 } else { divisors[rng.below(divisors.len())] };
    let half = if d.max(dv) >= 128 { 8 } else { 16 };
    let t = rng.odd(half);
    let mut s = rng.odd(2 * half);
    while s == t {
        s = rng.odd(2 * half);
    }
    let scale = (c % 3 == 1).then(|| (0.5 + rng.below(100) as f64 / 66.0) / (d as f64).sqrt());
    Config { b, h, hkv, t, s, d, dv, scale, seed: 1000 * c as u64 }
}

// ---------------------------------------------------------------------------------------------------------------
// Masks

/// Every kind of mask the core accepts, alone and combined.
const KINDS: [&str; 15] = [
    "none",
    "causal",
    "window",
    "causal window",
    "key lengths",
    "prefix-LM",
    "documents",
    "bool tensor",
    "additive tensor",
    "alibi",
    "softcap",
    "causal + key lengths + alibi + softcap",
    "documents + window + additive tensor",
    "prefix-LM + bool tensor + softcap",
    "causal window + documents + alibi + additive tensor",
];

/// A broadcastable shape for a mask tensor of `(B, H, T, S)`, chosen by `r`.
fn tensor_shape(c: &Config, r: usize) -> Vec<usize> {
    match r % 4 {
        0 => vec![c.b, c.h, c.t, c.s],
        1 => vec![c.b, 1, c.t, c.s],
        2 => vec![c.t, c.s],
        _ => vec![1, c.h, 1, c.s],
    }
}

fn device() -> Device {
    Device::Cpu
}

/// Non-decreasing document ids in `0..4` for `n` positions of each batch element, `(B, n)` i64.
fn documents(rng: &mut Rng, b: usize, n: usize) -> Tensor {
    let mut v = Vec::with_capacity(b * n);
    for _ in 0..b {
        let mut doc = 0i64;
        for _ in 0..n {
            if rng.below(4) == 0 {
                doc = (doc + 1).min(3);
            }
            v.push(doc);
        }
    }
    Tensor::from_vec(v, (b, n), &device()).unwrap()
}

/// The mask of `kind` for configuration `c`, with a label that names its parameters.
fn build_mask(kind: usize, c: &Config, rng: &mut Rng) -> (String, Mask) {
    let (b, t, s) = (c.b, c.t, c.s);
    let (left, right) = (rng.below(s), rng.below(5));
    let lens: Vec<usize> = (0..b).map(|_| 1 + rng.below(s)).collect();
    let prefix: Vec<usize> = (0..b).map(|_| rng.below(s + 1)).collect();
    let cap = [1.0, 2.5, 5.0][rng.below(3)];
    let shape = tensor_shape(c, rng.below(4));
    let tseed = c.seed + 7 + kind as u64;
    // Bool: ~80 % visible. Additive: N(0, 0.5²) with ~10 % −∞ (masking through the bias).
    let keep = || {
        let r = randn(&shape, tseed, DType::F32);
        MaskTensor::Keep(r.ge(-0.84).unwrap().to_dtype(DType::U8).unwrap())
    };
    let additive = || {
        let r = randn(&shape, tseed, DType::F32);
        let ninf = Tensor::full(f32::NEG_INFINITY, shape.as_slice(), &device()).unwrap();
        MaskTensor::Additive(r.ge(-1.28).unwrap().where_cond(&(&r * 0.5).unwrap(), &ninf).unwrap())
    };
    let docs = |rng: &mut Rng| (documents(rng, b, t), documents(rng, b, s));
    let name = KINDS[kind];
    let (detail, mask) = match kind {
        0 => (String::new(), Mask::none()),
        1 => (String::new(), Mask::causal()),
        2 => (format!("({left}, {right})"), Mask::none().with_window(left, right)),
        3 => (format!("({left}, 0)"), Mask::causal().with_window(left, 0)),
        4 => (format!("{lens:?}"), Mask::none().with_key_lengths(lens)),
        5 => (format!("{prefix:?}"), Mask::none().with_prefix_lengths(prefix)),
        6 => {
            let (qd, kd) = docs(rng);
            (String::new(), Mask::none().with_documents(qd, kd))
        }
        7 => (format!("{shape:?}"), Mask::none().with_tensor(keep())),
        8 => (format!("{shape:?}"), Mask::none().with_tensor(additive())),
        9 => (String::new(), Mask::none().with_alibi()),
        10 => (format!("{cap}"), Mask::none().with_softcap(cap)),
        11 => (format!("{lens:?}, cap {cap}"), Mask::causal().with_key_lengths(lens).with_alibi().with_softcap(cap)),
        12 => {
            let (qd, kd) = docs(rng);
            let m = Mask::none().with_documents(qd, kd).with_window(left, right).with_tensor(additive());
            (format!("({left}, {right}), {shape:?}"), m)
        }
        13 => (
            format!("{prefix:?}, {shape:?}, cap {cap}"),
            Mask::none().with_prefix_lengths(prefix).with_tensor(keep()).with_softcap(cap),
        ),
        _ => {
            let (qd, kd) = docs(rng);
            let m = Mask::causal().with_window(left, 0).with_documents(qd, kd).with_alibi().with_tensor(additive());
            (format!("({left}, 0), {shape:?}"), m)
        }
    };
    (format!("{name} {detail}").trim_end().to_string(), mask)
}

// ---------------------------------------------------------------------------------------------------------------
// Running both paths

/// Everything one call produces: out, lse, weights, and the gradients of `sum(out ⊙ dout)`.
struct Results {
    out: Tensor,
    lse: Tensor,
    weights: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

impl Results {
    fn named(&self) -> [(&'static str, &Tensor); 6] {
        [
            ("out", &self.out),
            ("lse", &self.lse),
            ("weights", &self.weights),
            ("dq", &self.dq),
            ("dk", &self.dk),
            ("dv", &self.dv),
        ]
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
}

fn inputs(c: &Config, dtype: DType) -> Inputs {
    let Config { b, h, hkv, t, s, d, dv, seed, .. } = *c;
    Inputs {
        q: randn(&[b, h, t, d], seed + 1, dtype),
        k: randn(&[b, hkv, s, d], seed + 2, dtype),
        v: randn(&[b, hkv, s, dv], seed + 3, dtype),
        dout: randn(&[b, h, t, dv], seed + 4, dtype),
    }
}

fn run(
    label: &str,
    x: &Inputs,
    mask: &Mask,
    scale: Option<f64>,
    imp: AttentionImpl,
    dropout: Option<AttentionDropout>,
) -> Results {
    let (q, k, v) = (Var::from_tensor(&x.q).unwrap(), Var::from_tensor(&x.k).unwrap(), Var::from_tensor(&x.v).unwrap());
    let opts = AttentionOptions {
        scale,
        dropout,
        need_weights: true,
        need_lse: true,
        implementation: imp,
        ..Default::default()
    };
    let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, &opts)
        .unwrap_or_else(|e| panic!("{label} {imp:?}: {e}"));
    let g = weighted_sum(&o.out, &x.dout).backward().unwrap();
    let grad = |x: &Var| g.get(x.as_tensor()).unwrap_or_else(|| panic!("{label} {imp:?}: no gradient")).clone();
    Results { out: o.out, lse: o.lse.unwrap(), weights: o.weights.unwrap(), dq: grad(&q), dk: grad(&k), dv: grad(&v) }
}

/// Compares every result; `values` for out, lse, weights, `grads` for dq, dk, dv.
fn compare(label: &str, got: &Results, want: &Results, values: Tol, grads: Tol) {
    for ((name, g), (_, w)) in got.named().into_iter().zip(want.named()) {
        let tol = if name.starts_with('d') { grads } else { values };
        assert_close(&format!("[{label}] {name}"), g, w, tol);
    }
}

fn upcast(x: &Inputs) -> Inputs {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    Inputs { q: f(&x.q), k: f(&x.k), v: f(&x.v), dout: f(&x.dout) }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn fused_equals_reference_for_every_mask_kind() {
    let mut rng = Rng(0x000f_05ed_0001);
    for (ci, c) in configs().iter().enumerate() {
        let x = inputs(c, DType::F32);
        for kind in 0..KINDS.len() {
            let (name, mask) = build_mask(kind, c, &mut rng);
            let label = format!("config {ci}: {}; mask {name}", c.label());
            let fused = run(&label, &x, &mask, c.scale, AttentionImpl::Fused, None);
            let reference = run(&label, &x, &mask, c.scale, AttentionImpl::Reference, None);
            compare(&label, &fused, &reference, VALUES, GRADS);
        }
    }
}

#[test]
fn flash_decoding_splits_the_keys_across_threads_and_merges_them_exactly() {
    // One sequence, one K/V head, one or three query rows: few tasks, so the keys are split across the 8 threads.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap();
    let mut rng = Rng(0x000f_1a5d_ec0d);
    for (t, h) in [(1usize, 1usize), (1, 4), (3, 2)] {
        let c = Config { b: 1, h, hkv: 1, t, s: 1000, d: 64, dv: 64, scale: None, seed: 77 + t as u64 };
        // Whatever tiles the CPU picks (at most 256 keys), a thousand keys make at least two splits.
        assert!(attend_kernels::flash::kv_splits(c.t.div_ceil(64), c.s.div_ceil(256)) > 1);
        let x = inputs(&c, DType::F32);
        for kind in 0..KINDS.len() {
            let (name, mask) = build_mask(kind, &c, &mut rng);
            let label = format!("flash decoding {}; mask {name}", c.label());
            let fused = pool.install(|| run(&label, &x, &mask, c.scale, AttentionImpl::Fused, None));
            let alone = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| run(&label, &x, &mask, c.scale, AttentionImpl::Fused, None));
            let reference = run(&label, &x, &mask, c.scale, AttentionImpl::Reference, None);
            compare(&label, &fused, &reference, VALUES, GRADS);
            compare(&format!("{label} vs one thread"), &fused, &alone, VALUES, GRADS);
        }
    }
}

#[test]
fn bf16_through_the_fused_path_matches_the_f32_reference() {
    note_bf16_path("bf16_through_the_fused_path_matches_the_f32_reference");
    let mut rng = Rng(0x000f_05ed_0002);
    for (ci, c) in configs().iter().enumerate() {
        let x = inputs(c, DType::BF16);
        let x32 = upcast(&x);
        // Two kinds per configuration, rotating: every kind meets several configurations.
        for kind in [ci % KINDS.len(), (ci + 7) % KINDS.len()] {
            let (name, mask) = build_mask(kind, c, &mut rng);
            let label = format!("bf16 config {ci}: {}; mask {name}", c.label());
            let fused = run(&label, &x, &mask, c.scale, AttentionImpl::Fused, None);
            assert_eq!(fused.out.dtype(), DType::BF16, "{label}: output dtype");
            assert_eq!(fused.dq.dtype(), DType::BF16, "{label}: gradient dtype");
            let reference = run(&label, &x32, &mask, c.scale, AttentionImpl::Reference, None);
            // out, weights and the gradients are rounded to bf16 (weights come back in the input dtype, as on the
            // materialised path); lse stays f32, computed from the same values.
            assert_eq!(fused.weights.dtype(), DType::BF16, "{label}: weights dtype");
            for (name, tol) in
                [("out", BF16_OUT), ("weights", BF16_OUT), ("dq", BF16_GRAD), ("dk", BF16_GRAD), ("dv", BF16_GRAD)]
            {
                let (g, w) = (field(&fused, name), field(&reference, name));
                assert_close(&format!("[{label}] {name}"), g, w, tol);
            }
            assert_close(&format!("[{label}] lse"), &fused.lse, &reference.lse, VALUES);
        }
    }
}

fn field<'a>(r: &'a Results, name: &str) -> &'a Tensor {
    r.named().into_iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn dropout_through_fused_equals_dropout_through_materialized() {
    // Probabilities exact in f32, so the kernel (which holds p as f32) and the materialised path (f64) draw the same
    // threshold from the shared stream.
    let mut rng = Rng(0x000f_05ed_0003);
    let ps = [0.25, 0.5, 0.125];
    for (ci, c) in configs().iter().enumerate().skip(1).step_by(5) {
        let x = inputs(c, DType::F32);
        for kind in [0, 11, 7, 13] {
            let (name, mask) = build_mask(kind, c, &mut rng);
            let dropout = AttentionDropout { p: ps[ci % 3], seed: 42 + ci as u64 };
            let label = format!("config {ci}: {}; mask {name}; dropout {dropout:?}", c.label());
            let fused = run(&label, &x, &mask, c.scale, AttentionImpl::Fused, Some(dropout));
            let materialized = run(&label, &x, &mask, c.scale, AttentionImpl::Materialized, Some(dropout));
            compare(&label, &fused, &materialized, VALUES, GRADS);
            // Dropout did something: the output differs from the call without it.
            let plain = run(&label, &x, &mask, c.scale, AttentionImpl::Fused, None);
            let moved = (&fused.out - &plain.out).unwrap().abs().unwrap().max_all().unwrap();
            assert!(moved.to_scalar::<f32>().unwrap() > 1e-3, "{label}: dropout changed nothing");
        }
    }
}

type BatchQuery = (usize, usize);

/// Every element of `x` is exactly 0.
fn assert_zero(label: &str, x: &Tensor) {
    let v: Vec<f32> = x.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    let bad = v.iter().position(|&x| x != 0.0);
    assert!(
        bad.is_none(),
        "{label}: element {bad:?} of {:?} is {} (expected exactly 0)",
        x.dims(),
        v[bad.unwrap_or(0)]
    );
}

/// No NaN and no infinity in `x`.
fn assert_finite(label: &str, x: &Tensor) {
    let v: Vec<f32> = x.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "{label}: non-finite values in {:?}", x.dims());
}

#[test]
fn queries_that_see_no_key_give_zeros() {
    // B = 2, T = 9 > S = 5 under causal: queries 0..4 precede every key. Batch element 1 also has key length 0
    // and so sees nothing at all. Query 4 of batch 0 is additionally blanked by the bool tensor.
    let (b, h, hkv, t, s, d) = (2, 4, 2, 9, 5, 64);
    let c = Config { b, h, hkv, t, s, d, dv: d, scale: None, seed: 9000 };
    let x = inputs(&c, DType::F32);
    let mut keep = vec![1u8; b * t * s];
    keep[4 * s..5 * s].fill(0);
    let keep = Tensor::from_vec(keep, (b, 1, t, s), &device()).unwrap();
    // Queries of document 2, which no key belongs to.
    let qd = Tensor::from_vec((0..b * t).map(|x| (x % t % 3) as i64).collect::<Vec<_>>(), (b, t), &device()).unwrap();
    let kd = Tensor::from_vec((0..b * s).map(|x| (x % s % 2) as i64).collect::<Vec<_>>(), (b, s), &device()).unwrap();
    let ninf_row = {
        let mut a = vec![0f32; t * s];
        a[7 * s..8 * s].fill(f32::NEG_INFINITY);
        Tensor::from_vec(a, (t, s), &device()).unwrap()
    };
    // (name, mask, the (batch, query) pairs that see no key)
    let cases: Vec<(&str, Mask, Vec<BatchQuery>)> = vec![
        (
            "causal T > S + key lengths [5, 0] + bool tensor",
            Mask::causal().with_key_lengths(vec![s, 0]).with_tensor(MaskTensor::Keep(keep)).with_softcap(4.0),
            (0..=4).map(|i| (0, i)).chain((0..t).map(|i| (1, i))).collect(),
        ),
        (
            "documents without keys + alibi",
            Mask::none().with_documents(qd, kd).with_alibi(),
            (0..b).flat_map(|bi| (0..t).filter(|i| i % 3 == 2).map(move |i| (bi, i))).collect(),
        ),
        (
            "additive −∞ row",
            Mask::none().with_tensor(MaskTensor::Additive(ninf_row)),
            (0..b).map(|bi| (bi, 7)).collect(),
        ),
    ];
    for (name, mask, empty) in cases {
        for dropout in [None, Some(AttentionDropout { p: 0.25, seed: 3 })] {
            let label = format!("{}; mask {name}; dropout {dropout:?}", c.label());
            let fused = run(&label, &x, &mask, None, AttentionImpl::Fused, dropout);
            for (what, r) in fused.named() {
                if what != "lse" {
                    assert_finite(&format!("{label} {what}"), r);
                }
            }
            let lse: Vec<f32> = fused.lse.flatten_all().unwrap().to_vec1().unwrap();
            assert!(lse.iter().all(|x| !x.is_nan() && *x != f32::INFINITY), "{label}: lse has NaN or +∞");
            for &(bi, i) in &empty {
                let at = format!("{label} (b {bi}, query {i})");
                for hi in 0..h {
                    assert_eq!(lse[(bi * h + hi) * t + i], f32::NEG_INFINITY, "{at} head {hi}: lse");
                }
                assert_zero(&format!("{at}: out"), &fused.out.i((bi, .., i)).unwrap());
                assert_zero(&format!("{at}: weights"), &fused.weights.i((bi, .., i)).unwrap());
                assert_zero(&format!("{at}: dq"), &fused.dq.i((bi, .., i)).unwrap());
            }
            // And everything equals the reference (which treats such rows the same way).
            let want = match dropout {
                None => run(&label, &x, &mask, None, AttentionImpl::Reference, None),
                Some(_) => run(&label, &x, &mask, None, AttentionImpl::Materialized, dropout),
            };
            compare(&label, &fused, &want, VALUES, GRADS);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Weights with gradients

/// A loss on the attention weights (attention supervision, entropy or coverage penalties) gives the same dq, dk
/// on every implementation: the fused path's weights, recomputed from the log-sum-exp, carry their own backward.
/// Loss = Σ out ⊙ dO + Σ weights ⊙ R, with GQA, a soft-cap (its chain rule), a causal mask with key padding, and a
/// chosen subset of heads that repeats one (its gradient counts twice).
#[test]
fn weights_carry_gradients_on_every_implementation() {
    let dev = device();
    let (b, h, hkv, t, s, d) = (2, 4, 2, 7, 9, 24);
    let cases: [(&str, Mask, Option<Vec<usize>>); 4] = [
        ("no mask, all heads", Mask::none(), None),
        ("causal + key lengths, heads [3, 0, 3]", Mask::causal().with_key_lengths(vec![9, 5]), Some(vec![3, 0, 3])),
        ("softcap 1.5, heads [1]", Mask::none().with_softcap(1.5), Some(vec![1])),
        ("window (2, 1) + alibi, all heads", Mask::none().with_window(2, 1).with_alibi(), None),
    ];
    for (name, mask, heads) in cases {
        let n = heads.as_ref().map_or(h, |x| x.len());
        let r = randn(&[b, n, t, s], 41, DType::F32).to_device(&dev).unwrap();
        let dout = randn(&[b, h, t, d], 42, DType::F32).to_device(&dev).unwrap();
        let mut results: Vec<(AttentionImpl, Vec<Tensor>)> = Vec::new();
        for imp in [AttentionImpl::Fused, AttentionImpl::Materialized, AttentionImpl::Reference] {
            let q = Var::from_tensor(&randn(&[b, h, t, d], 1, DType::F32)).unwrap();
            let k = Var::from_tensor(&randn(&[b, hkv, s, d], 2, DType::F32)).unwrap();
            let v = Var::from_tensor(&randn(&[b, hkv, s, d], 3, DType::F32)).unwrap();
            let opts = AttentionOptions {
                need_weights: true,
                weight_heads: heads.clone(),
                implementation: imp,
                ..Default::default()
            };
            let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, &opts).unwrap();
            let w = o.weights.unwrap();
            let loss = (weighted_sum(&o.out, &dout) + weighted_sum(&w, &r)).unwrap();
            let g = loss.backward().unwrap();
            let grads = [&q, &k, &v].iter().map(|x| g.get(x.as_tensor()).unwrap().clone()).collect();
            results.push((imp, grads));
        }
        let (_, want) = &results[2];
        for (imp, got) in &results[..2] {
            for (x, (a, e)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(want)) {
                assert_close(&format!("{name} {imp:?} {x}"), a, e, GRADS);
            }
        }
    }
}

/// The fused weights' backward against central finite differences of the loss Σ weights ⊙ R (f32, so a coarse
/// step and tolerance; the reference it is compared with above is checked in f64 in tests/attention.rs).
#[test]
fn fused_weights_backward_matches_finite_differences() {
    let (b, h, hkv, t, s, d) = (1, 2, 1, 4, 5, 16);
    let mask = Mask::causal().with_softcap(2.0);
    let r = randn(&[b, h, t, s], 7, DType::F32);
    let loss_of = |q: &Tensor, k: &Tensor| -> Tensor {
        let opts = AttentionOptions { need_weights: true, ..Default::default() };
        let v = randn(&[b, hkv, s, d], 9, DType::F32);
        let w = attention_with(q, k, &v, &mask, &opts).unwrap().weights.unwrap();
        weighted_sum(&w, &r)
    };
    let q = Var::from_tensor(&randn(&[b, h, t, d], 5, DType::F32)).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, s, d], 6, DType::F32)).unwrap();
    let g = loss_of(q.as_tensor(), k.as_tensor()).backward().unwrap();
    let eps = 1e-2f32;
    for (name, x, is_q) in [("q", &q, true), ("k", &k, false)] {
        let base: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let analytic: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(analytic.iter().any(|&a| a != 0.0), "{name}: zero gradient");
        for i in (0..base.len()).step_by(7) {
            let at = |delta: f32| -> f64 {
                let mut v = base.clone();
                v[i] += delta;
                let xt = Tensor::from_vec(v, x.as_tensor().shape(), &Device::Cpu).unwrap();
                let l = if is_q { loss_of(&xt, k.as_tensor()) } else { loss_of(q.as_tensor(), &xt) };
                l.to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let a = analytic[i] as f64;
            assert!((fd - a).abs() <= 2e-3 + 2e-2 * a.abs(), "{name}[{i}]: analytic {a}, finite difference {fd}");
        }
    }
}

/// The fused weights' backward with a NaN in a key that some rows cannot see (causal): a loss on the weights gives
/// the same gradients as the composed paths, where the hidden NaN reaches nothing.
#[test]
fn weights_backward_keeps_a_hidden_nan_out() {
    let (b, h, t, d) = (1, 2, 8, 16);
    let mut kv: Vec<f32> = randn(&[b, h, t, d], 2, DType::F32).flatten_all().unwrap().to_vec1().unwrap();
    kv[5 * d + 3] = f32::NAN; // head 0, key 5: rows 0..4 cannot see it
    let r = randn(&[b, h, t, t], 41, DType::F32);
    let mut grads = Vec::new();
    for imp in [AttentionImpl::Fused, AttentionImpl::Reference] {
        let q = Var::from_tensor(&randn(&[b, h, t, d], 1, DType::F32)).unwrap();
        let k = Var::from_vec(kv.clone(), (b, h, t, d), &Device::Cpu).unwrap();
        let v = Var::from_tensor(&randn(&[b, h, t, d], 3, DType::F32)).unwrap();
        let opts = AttentionOptions { need_weights: true, implementation: imp, ..Default::default() };
        let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &Mask::causal(), &opts).unwrap();
        let g = weighted_sum(&o.weights.unwrap(), &r).backward().unwrap();
        grads.push([g.get(q.as_tensor()).unwrap().clone(), g.get(k.as_tensor()).unwrap().clone()]);
    }
    for (name, (a, e)) in ["dq", "dk"].iter().zip(grads[0].iter().zip(&grads[1])) {
        assert_close(&format!("hidden NaN key, {name}"), a, e, GRADS);
    }
    // And the rows that cannot see key 5 keep finite gradients.
    let dq: Vec<f32> = grads[0][0].i((0, 0, 0..5)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(dq.iter().all(|x| x.is_finite()), "rows 0..4 of head 0 never see key 5");
}
