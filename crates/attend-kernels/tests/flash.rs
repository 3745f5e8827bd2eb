//! The flash kernel against a naive float64 oracle written here, with no tensor library in between.
//!
//! The oracle materialises the `(T, S)` scores of each `(b, h)`: `s = scale · q·k` → score mod (the mod's own
//! `apply` on an f32 row, as the kernel calls it, then promoted) → mask (`MaskMod::visible`) → safe softmax (a row
//! with no visible key gives `P = 0`, `O = 0`, `lse = −∞`) → dropout from the documented stream → `O = P V`; and the
//! analytic backward in f64:
//!
//! ```text
//! dV_j += P̃_ij dO_i                      P̃ = P ⊙ keep / (1 − p)
//! dP_ij = (dO_i · V_j) ⊙ keep / (1 − p)
//! dS_ij = P_ij (dP_ij − Σ_j P_ij dP_ij) · f'(s_ij)      (f' from `ScoreMod::chain`)
//! dQ_i += scale · dS_ij K_j,   dK_j += scale · dS_ij Q_i
//! ```
//!
//! Every instruction set the CPU has ([`Isa::available`]) and every block size pair of `{1, 7, 64} × {16, 64, 128}`
//! is compared against it: `o`, `lse`, `dq`, `dk`, `dv` and the recomputed probabilities. Tolerance: f32 results
//! against the f64 oracle, `|got − want| ≤ 1e-5 + 1e-4·|want|`; −∞ must be −∞ exactly; NaN never passes; a row
//! with no visible key must have `O = 0` and `dQ = 0` exactly, and invisible probabilities are exactly 0.
//!
//! Masks and score mods written in this file (dilated, chunked causal with its own tile classification, a shifted
//! half score, a quadratic score) show that users can bring their own; `flash_forward_bf16` is checked against
//! the oracle on the same bf16 values within the bounds of its two roundings.

use attend_kernels::dropout::{drop_threshold, keep};
use attend_kernels::flash::masks::{
    Alibi, Causal, NoMask, NoScoreMod, SlidingWindow, Softcap, StandardMask, StandardScore, TileKind,
};
use attend_kernels::flash::{
    bf16_dot_supported, bf16_to_f32, f32_to_bf16, flash_backward, flash_forward, flash_forward_bf16,
    flash_probabilities, Bf16, FlashConfig, FlashDims, Isa, MaskMod, ScoreMod,
};

/// f32 kernel against the f64 oracle.
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;

/// The tile sizes every case runs with: single-row tiles, a size that divides nothing, the default.
const BLOCK_Q: [usize; 3] = [1, 7, 64];
const BLOCK_K: [usize; 3] = [16, 64, 128];

/// Head dims the kernel accepts (multiples of 16), from the smallest to the largest in common models.
const HEAD_DIMS: [usize; 7] = [16, 32, 64, 80, 96, 128, 256];

// ---------------------------------------------------------------------------------------------------------------
// Deterministic random numbers: SplitMix64 and Box–Muller.

use attend_kernels::rng::SplitMix64 as Rng;

fn normals(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

/// A test that cannot run on this CPU says so in the test output: libtest captures `print!`, not the stderr
/// handle.
fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

// ---------------------------------------------------------------------------------------------------------------
// Problems and the oracle

/// One attention call's inputs.
struct Problem {
    dims: FlashDims,
    scale: f32,
    dropout: Option<(f64, u64)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl Problem {
    fn new(rng: &mut Rng, dims: FlashDims) -> Problem {
        let FlashDims { b, h, hkv, t, s, d, dv } = dims;
        // Score spread between 0.5 and 2 standard deviations: flat and peaked softmax rows both occur.
        let scale = ((0.5 + 1.5 * rng.uniform()) / (d as f64).sqrt()) as f32;
        Problem {
            dims,
            scale,
            dropout: None,
            q: normals(rng, b * h * t * d, 1.0),
            k: normals(rng, b * hkv * s * d, 1.0),
            v: normals(rng, b * hkv * s * dv, 1.0),
            dout: normals(rng, b * h * t * dv, 1.0),
        }
    }

    fn label(&self) -> String {
        let FlashDims { b, h, hkv, t, s, d, dv } = self.dims;
        let drop = self.dropout.map(|(p, seed)| format!(" dropout({p}, {seed})")).unwrap_or_default();
        format!("B{b} H{h} Hkv{hkv} T{t} S{s} D{d} Dv{dv} scale{:.4}{drop}", self.scale)
    }
}

/// Random sizes: B ∈ {1, 2}, H ∈ 1..=8 with a random divisor as Hkv (MQA forced every third case), odd T ≠ S
/// (sometimes T > S), shorter sequences for wide heads so every case stays in the milliseconds.
fn random_dims(rng: &mut Rng, case: usize, d: usize, dv: usize) -> FlashDims {
    let b = 1 + rng.below(2);
    let h = 1 + rng.below(8);
    let divisors: Vec<usize> = (1..=h).filter(|&x| h.is_multiple_of(x)).collect();
    let hkv = if case.is_multiple_of(3) { 1 } else { divisors[rng.below(divisors.len())] };
    let wide = d.max(dv);
    let (tmax, smax) = if wide >= 128 {
        (8, 24)
    } else if wide >= 80 {
        (12, 40)
    } else {
        (16, 72)
    };
    let t = rng.odd(tmax);
    let mut s = rng.odd(smax);
    while s == t {
        s = rng.odd(smax);
    }
    FlashDims { b, h, hkv, t, s, d, dv }
}

fn random_problem(rng: &mut Rng, case: usize, d: usize, dv: usize) -> Problem {
    let dims = random_dims(rng, case, d, dv);
    Problem::new(rng, dims)
}

/// Head dims of case `c`: every `D` and `Dv` of [`HEAD_DIMS`] appears as the cases cycle, in varying pairs.
fn head_dims(c: usize) -> (usize, usize) {
    (HEAD_DIMS[c % 7], HEAD_DIMS[(3 * c + 2) % 7])
}

/// What the oracle computes, all in f64.
struct Oracle {
    o: Vec<f64>,
    lse: Vec<f64>,
    /// `(B, H, T, S)`, before dropout.
    p: Vec<f64>,
    visible: Vec<bool>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn oracle<M: MaskMod, F: ScoreMod>(pr: &Problem, mask: &M, score: &F) -> Oracle {
    let FlashDims { b: nb, h: nh, hkv, t, s, d, dv } = pr.dims;
    let group = nh / hkv;
    let scale = pr.scale as f64;
    let drop = pr.dropout.map(|(p, seed)| (drop_threshold(p), seed, 1.0 / (1.0 - p)));
    let mut r = Oracle {
        o: vec![0.0; nb * nh * t * dv],
        lse: vec![f64::NEG_INFINITY; nb * nh * t],
        p: vec![0.0; nb * nh * t * s],
        visible: vec![false; nb * nh * t * s],
        dq: vec![0.0; pr.q.len()],
        dk: vec![0.0; pr.k.len()],
        dv: vec![0.0; pr.v.len()],
    };
    for b in 0..nb {
        for h in 0..nh {
            let (bh, kvh) = (b * nh + h, b * hkv + h / group);
            let key = |j: usize| &pr.k[(kvh * s + j) * d..][..d];
            let val = |j: usize| &pr.v[(kvh * s + j) * dv..][..dv];
            for i in 0..t {
                let row = bh * t + i;
                let qi = &pr.q[row * d..][..d];
                let doi = &pr.dout[row * dv..][..dv];
                // 1. Scaled scores; the score mod on an f32 row (as the kernel applies it) and its derivative.
                let raw: Vec<f64> = (0..s).map(|j| scale * dot(qi, key(j))).collect();
                let raw32: Vec<f32> = raw.iter().map(|&x| x as f32).collect();
                let mut modded = raw32.clone();
                score.apply(b, h, i, 0, &mut modded);
                let mut fprime = vec![1f32; s];
                score.chain(b, h, i, 0, &raw32, &mut fprime);
                let sc: Vec<f64> = if F::ACTIVE { modded.iter().map(|&x| x as f64).collect() } else { raw };
                // 2. Mask and safe softmax: a row that sees nothing keeps P = 0, O = 0, lse = −∞.
                let vis: Vec<bool> = (0..s).map(|j| mask.visible(b, h, i, j)).collect();
                r.visible[row * s..][..s].copy_from_slice(&vis);
                if !vis.iter().any(|&x| x) {
                    continue;
                }
                let m = (0..s).filter(|&j| vis[j]).map(|j| sc[j]).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..s).map(|j| if vis[j] { (sc[j] - m).exp() } else { 0.0 }).collect();
                let l: f64 = e.iter().sum();
                // Hidden keys are 0 even when l is NaN (0 / NaN would be NaN).
                let p: Vec<f64> = (0..s).map(|j| if vis[j] { e[j] / l } else { 0.0 }).collect();
                r.lse[row] = m + l.ln();
                r.p[row * s..][..s].copy_from_slice(&p);
                // 3. Dropout: element ((b·H + h)·T + i)·S + j of the stream decides, kept entries scaled by 1/(1−p).
                let km: Vec<f64> = (0..s)
                    .map(|j| match drop {
                        Some((th, seed, inv)) => {
                            if keep(seed, (row * s + j) as u64, th) {
                                inv
                            } else {
                                0.0
                            }
                        }
                        None => 1.0,
                    })
                    .collect();
                // 4. O = P̃ V over visible keys only: a masked key contributes nothing, even a NaN value.
                for j in (0..s).filter(|&j| vis[j]) {
                    let w = p[j] * km[j];
                    for (o, &x) in r.o[row * dv..][..dv].iter_mut().zip(val(j)) {
                        *o += w * x as f64;
                    }
                }
                // Backward of 4: dV, dP.
                let dp: Vec<f64> = (0..s).map(|j| if vis[j] { dot(doi, val(j)) * km[j] } else { 0.0 }).collect();
                for j in (0..s).filter(|&j| vis[j]) {
                    let w = p[j] * km[j];
                    for (g, &x) in r.dv[(kvh * s + j) * dv..][..dv].iter_mut().zip(doi) {
                        *g += w * x as f64;
                    }
                }
                // Backward of 2 and 1: softmax, score mod, scores.
                // Δ = Σ_j P_ij dP_ij = dO_i · O_i (FlashAttention's form; the two differ only under ±∞ in dO).
                let delta: f64 = doi.iter().zip(&r.o[row * dv..][..dv]).map(|(&g, &o)| g as f64 * o).sum();
                for j in (0..s).filter(|&j| vis[j]) {
                    let ds = p[j] * (dp[j] - delta) * fprime[j] as f64 * scale;
                    for (g, &x) in r.dq[row * d..][..d].iter_mut().zip(key(j)) {
                        *g += ds * x as f64;
                    }
                    for (g, &x) in r.dk[(kvh * s + j) * d..][..d].iter_mut().zip(qi) {
                        *g += ds * x as f64;
                    }
                }
            }
        }
    }
    r
}

/// Forward then backward of a problem: `[o, lse, dq, dk, dv]`.
fn forward_backward<M: MaskMod, F: ScoreMod>(pr: &Problem, cfg: &FlashConfig, mask: &M, score: &F) -> [Vec<f32>; 5] {
    let dims = &pr.dims;
    let mut o = vec![0f32; pr.dout.len()];
    let mut lse = vec![0f32; dims.b * dims.h * dims.t];
    flash_forward(dims, cfg, mask, score, &pr.q, &pr.k, &pr.v, &mut o, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0f32; pr.q.len()], vec![0f32; pr.k.len()], vec![0f32; pr.v.len()]);
    flash_backward(dims, cfg, mask, score, &pr.q, &pr.k, &pr.v, &o, &lse, &pr.dout, &mut dq, &mut dk, &mut dv).unwrap();
    [o, lse, dq, dk, dv]
}

// ---------------------------------------------------------------------------------------------------------------
// Comparison

/// `|got − want| ≤ ATOL + RTOL·|want|` everywhere, infinities equal, NaN exactly where the oracle has NaN; the
/// failure names the worst element.
fn check(label: &str, what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label} {what}: length");
    let mut bad = 0usize;
    let mut worst = (0usize, f64::NEG_INFINITY);
    for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            g.is_finite() && (g - w).abs() <= ATOL + RTOL * w.abs()
        };
        if !ok {
            bad += 1;
            // NaN on either side is the worst kind of miss.
            let excess = if g.is_finite() && w.is_finite() { (g - w).abs() - RTOL * w.abs() } else { f64::INFINITY };
            if excess > worst.1 {
                worst = (idx, excess);
            }
        }
    }
    if bad > 0 {
        let (idx, _) = worst;
        panic!(
            "{label} {what}: {bad}/{} elements out of tolerance (atol {ATOL:e}, rtol {RTOL:e}); worst at flat index \
             {idx}: got {} want {} (|diff| {:e})",
            got.len(),
            got[idx],
            want[idx],
            (got[idx] as f64 - want[idx]).abs()
        );
    }
}

/// Runs the kernel on every instruction set and block size pair and compares everything with the oracle.
/// Returns the number of query rows that see no key (callers that test that case assert it is non-zero).
fn check_case<M: MaskMod, F: ScoreMod>(name: &str, pr: &Problem, mask: &M, score: &F) -> usize {
    let want = oracle(pr, mask, score);
    let FlashDims { b: nb, h: nh, t, s, d, dv, .. } = pr.dims;
    let empty_rows: Vec<usize> = (0..nb * nh * t).filter(|&r| want.lse[r] == f64::NEG_INFINITY).collect();
    for isa in Isa::available() {
        for block_q in BLOCK_Q {
            for block_k in BLOCK_K {
                // Block size 7 also runs the backward in passes of query rows (a partial-dQ budget of 1 byte).
                let dq_budget = if block_q == 7 { 1 } else { FlashConfig::new(1.0).dq_budget };
                let cfg = FlashConfig { scale: pr.scale, dropout: pr.dropout, isa, block_q, block_k, dq_budget };
                let label = format!("[{name}; {}; {isa:?} block_q {block_q} block_k {block_k}]", pr.label());
                let mut o = vec![f32::NAN; want.o.len()];
                let mut lse = vec![f32::NAN; want.lse.len()];
                flash_forward(&pr.dims, &cfg, mask, score, &pr.q, &pr.k, &pr.v, &mut o, &mut lse).unwrap();
                check(&label, "o", &o, &want.o);
                check(&label, "lse", &lse, &want.lse);

                let (mut dq, mut dk, mut dvv) =
                    (vec![f32::NAN; pr.q.len()], vec![f32::NAN; pr.k.len()], vec![f32::NAN; pr.v.len()]);
                flash_backward(
                    &pr.dims, &cfg, mask, score, &pr.q, &pr.k, &pr.v, &o, &lse, &pr.dout, &mut dq, &mut dk, &mut dvv,
                )
                .unwrap();
                check(&label, "dq", &dq, &want.dq);
                check(&label, "dk", &dk, &want.dk);
                check(&label, "dv", &dvv, &want.dv);

                for &r in &empty_rows {
                    assert!(o[r * dv..][..dv].iter().all(|&x| x == 0.0), "{label}: row {r} sees no key, o ≠ 0");
                    assert!(dq[r * d..][..d].iter().all(|&x| x == 0.0), "{label}: row {r} sees no key, dq ≠ 0");
                }

                for b in 0..nb {
                    for h in 0..nh {
                        let p = flash_probabilities(&pr.dims, &cfg, mask, score, &pr.q, &pr.k, &lse, b, h).unwrap();
                        let at = (b * nh + h) * t * s;
                        check(&format!("{label} (b {b}, h {h})"), "probabilities", &p, &want.p[at..at + t * s]);
                        let leak = (0..t * s).find(|&x| !want.visible[at + x] && p[x] != 0.0);
                        assert!(
                            leak.is_none(),
                            "{label} (b {b}, h {h}): invisible probability at (i, j) = {:?} is {}",
                            leak.map(|x| (x / s, x % s)),
                            leak.map(|x| p[x]).unwrap_or_default()
                        );
                    }
                }
            }
        }
    }
    empty_rows.len()
}

// ---------------------------------------------------------------------------------------------------------------
// NaN and ±∞

/// NaN and ±∞ reach exactly the outputs and gradients of the (query, key) pairs that see them — on every ISA path
/// and block size, against the visible-only f64 oracle: a NaN query makes its row NaN (not a "fully masked" row
/// of zeros), a NaN key or value reaches the rows that see it, a masked NaN changes nothing (also in the
/// gradients), a NaN upstream gradient stays in its row's keys, and fully masked rows stay 0.
#[test]
fn nan_and_inf_reach_exactly_the_pairs_that_see_them() {
    let mut rng = Rng(0x5eed_00aa);
    let dims = FlashDims { b: 2, h: 4, hkv: 2, t: 37, s: 45, d: 16, dv: 32 };
    let offset = (dims.s - dims.t) as isize;
    let (d, dv, s, t) = (dims.d, dims.dv, dims.s, dims.t);
    // (what, where): q row, k row, v row, dO row of (b, head) at position, and the value put there.
    type Poke = (&'static str, usize, usize, usize, f32);
    let cases: [&[Poke]; 7] = [
        &[("q", 0, 1, 20, f32::NAN)],
        &[("q", 1, 3, 2, f32::INFINITY), ("q", 0, 0, 36, f32::NEG_INFINITY)],
        &[("k", 0, 1, 40, f32::NAN)],
        &[("v", 1, 0, 30, f32::NAN), ("v", 0, 1, 3, f32::INFINITY)],
        &[("dout", 0, 2, 5, f32::NAN)],
        &[("k", 1, 1, 44, f32::NAN), ("v", 1, 1, 44, f32::NAN), ("q", 0, 3, 0, f32::NAN)],
        &[("v", 0, 0, 0, f32::NAN), ("k", 0, 1, 1, f32::INFINITY), ("dout", 1, 3, 36, f32::INFINITY)],
    ];
    let lens = [30usize, 45];
    for (c, pokes) in cases.iter().enumerate() {
        let mut pr = Problem::new(&mut rng, dims);
        for &(what, b, head, pos, x) in pokes.iter() {
            let (buf, heads, rows, w) = match what {
                "q" => (&mut pr.q, dims.h, t, d),
                "k" => (&mut pr.k, dims.hkv, s, d),
                "v" => (&mut pr.v, dims.hkv, s, dv),
                _ => (&mut pr.dout, dims.h, t, dv),
            };
            buf[((b * heads + head) * rows + pos) * w + (pos % w)] = x;
        }
        let name = |m: &str| format!("case {c} {pokes:?} {m}");
        check_case(&name("no mask"), &pr, &NoMask, &NoScoreMod);
        check_case(&name("causal"), &pr, &Causal { offset }, &NoScoreMod);
        check_case(&name("window (3, 2)"), &pr, &SlidingWindow { offset, left: 3, right: 2 }, &NoScoreMod);
        let padded = StandardMask { t, s, causal: true, key_lengths: Some(&lens), ..Default::default() };
        check_case(&name("causal + key lengths"), &pr, &padded, &Softcap { cap: 3.0 });
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Built-in masks and score mods

/// Every instruction-set path computes the same attention: forward and backward on one problem, each path against
/// the portable one within f32 rounding (their sums differ only in order and in the exp polynomial's lanes), and
/// the process's path is the best this CPU has unless `ATTEND_ISA` asks for another.
#[test]
fn isa_paths_agree_with_each_other() {
    let all = Isa::available();
    assert_eq!(all.last(), Some(&Isa::Portable), "the portable path is always available, last: {all:?}");
    if std::env::var("ATTEND_ISA").is_err() {
        assert_eq!(Isa::detect(), all[0], "without ATTEND_ISA the best path runs");
    }
    if all.len() == 1 {
        skip("isa_paths_agree_with_each_other", "only the portable path runs on this CPU");
    }
    let mut rng = Rng(0x5eed_0150);
    let pr = Problem::new(&mut rng, FlashDims { b: 2, h: 4, hkv: 2, t: 77, s: 90, d: 64, dv: 48 });
    let mask = Causal { offset: 13 };
    // No score mod: the built-in ones pick their vector path from the process's ISA (tested per path in modvec.rs).
    let run = |isa: Isa| forward_backward(&pr, &FlashConfig { isa, ..FlashConfig::new(pr.scale) }, &mask, &NoScoreMod);
    let portable = run(Isa::Portable);
    for isa in &all[..all.len() - 1] {
        let got = run(*isa);
        for (what, (g, w)) in ["o", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&portable)) {
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            check(&format!("{isa:?} vs Portable"), what, g, &w64);
        }
    }
}

#[test]
fn structural_masks_match_the_oracle() {
    let mut rng = Rng(0x5eed_0001);
    for c in 0..7 {
        let (d, dv) = head_dims(c);
        let pr = random_problem(&mut rng, c, d, dv);
        let (t, s) = (pr.dims.t, pr.dims.s);
        let offset = s as isize - t as isize;
        let (left, right) = (rng.below(s), rng.below(6));
        check_case("no mask", &pr, &NoMask, &NoScoreMod);
        check_case("causal", &pr, &Causal { offset }, &NoScoreMod);
        check_case(&format!("window ({left}, {right})"), &pr, &SlidingWindow { offset, left, right }, &NoScoreMod);
        let causal_window = SlidingWindow { offset, left, right: 0 };
        check_case(&format!("causal window ({left}, 0)"), &pr, &causal_window, &NoScoreMod);
    }
}

#[test]
fn score_mods_match_the_oracle() {
    let mut rng = Rng(0x5eed_0002);
    for c in 0..7 {
        let (d, dv) = head_dims(c + 3);
        let pr = random_problem(&mut rng, c, d, dv);
        let FlashDims { b, h, t, s, .. } = pr.dims;
        let offset = s as isize - t as isize;
        let causal = Causal { offset };
        let cap = 0.5 + 2.0 * rng.uniform() as f32;
        let slopes: Vec<f32> = (0..h).map(|x| 0.5f32.powi(x as i32 + 1)).collect();
        let alibi = Alibi { slopes: &slopes, offset };
        // A full (B, H, T, S) bias and one broadcast over B and T, (1, H, 1, S).
        let full = normals(&mut rng, b * h * t * s, 1.0);
        let full_st = [h * t * s, t * s, s, 1];
        let per_head = normals(&mut rng, h * s, 1.0);
        let per_head_st = [0, s, 0, 1];
        check_case(&format!("softcap {cap}"), &pr, &NoMask, &Softcap { cap });
        check_case(&format!("causal softcap {cap}"), &pr, &causal, &Softcap { cap });
        check_case("alibi", &pr, &NoMask, &alibi);
        check_case("causal alibi", &pr, &causal, &alibi);
        let bias_only = StandardScore { bias: Some((&full, full_st)), ..Default::default() };
        check_case("bias (B, H, T, S)", &pr, &NoMask, &bias_only);
        let everything = StandardScore { softcap: Some(cap), alibi: Some(alibi), bias: Some((&per_head, per_head_st)) };
        check_case(&format!("causal softcap {cap} + alibi + bias (1, H, 1, S)"), &pr, &causal, &everything);
    }
}

/// Non-decreasing document ids in `0..4`, `n` per batch element (packed sequences).
fn documents(rng: &mut Rng, batches: usize, n: usize) -> Vec<i64> {
    let mut v = Vec::with_capacity(batches * n);
    for _ in 0..batches {
        let mut doc = 0i64;
        for _ in 0..n {
            if rng.below(5) == 0 {
                doc = (doc + 1).min(3);
            }
            v.push(doc);
        }
    }
    v
}

#[test]
fn standard_mask_components_match_the_oracle() {
    let mut rng = Rng(0x5eed_0003);
    for c in 0..7 {
        let (d, dv) = head_dims(c + 5);
        let pr = random_problem(&mut rng, c, d, dv);
        let FlashDims { b, h, t, s, .. } = pr.dims;
        let lens: Vec<usize> = (0..b).map(|_| 1 + rng.below(s)).collect();
        let prefix: Vec<usize> = (0..b).map(|_| rng.below(s + 1)).collect();
        let (qd, kd) = (documents(&mut rng, b, t), documents(&mut rng, b, s));
        // Keep tensors: dense (B, H, T, S), and broadcast (B, 1, T, S) and (1, H, 1, S); ~80 % visible.
        let bits = |rng: &mut Rng, n: usize| -> Vec<u8> { (0..n).map(|_| (rng.below(5) != 0) as u8).collect() };
        let keep_full = bits(&mut rng, b * h * t * s);
        let keep_bt = bits(&mut rng, b * t * s);
        let keep_h = bits(&mut rng, h * s);
        let base = StandardMask { t, s, ..Default::default() };
        let (l, r) = (rng.below(s), rng.below(5));
        let cases: Vec<(String, StandardMask)> = vec![
            ("nothing".into(), base),
            ("causal".into(), StandardMask { causal: true, ..base }),
            (
                format!("window ({l}, {r}) + key lengths {lens:?}"),
                StandardMask { window: Some((l, r)), key_lengths: Some(&lens), ..base },
            ),
            (format!("causal + key lengths {lens:?}"), StandardMask { causal: true, key_lengths: Some(&lens), ..base }),
            (format!("prefix {prefix:?}"), StandardMask { prefix_lengths: Some(&prefix), ..base }),
            ("documents".into(), StandardMask { documents: Some((&qd, &kd)), ..base }),
            (
                format!("documents + causal window ({l}, 0)"),
                StandardMask { causal: true, window: Some((l, 0)), documents: Some((&qd, &kd)), ..base },
            ),
            ("keep (B, H, T, S)".into(), StandardMask { keep: Some((&keep_full, [h * t * s, t * s, s, 1])), ..base }),
            ("keep (B, 1, T, S)".into(), StandardMask { keep: Some((&keep_bt, [t * s, 0, s, 1])), ..base }),
            (
                format!("keep (1, H, 1, S) + prefix {prefix:?} + documents"),
                StandardMask {
                    prefix_lengths: Some(&prefix),
                    documents: Some((&qd, &kd)),
                    keep: Some((&keep_h, [0, s, 0, 1])),
                    ..base
                },
            ),
        ];
        let slopes: Vec<f32> = (0..h).map(|x| 0.3 / (x + 1) as f32).collect();
        let bias = normals(&mut rng, b * t * s, 0.5);
        let score = StandardScore {
            softcap: Some(3.0),
            alibi: Some(Alibi { slopes: &slopes, offset: s as isize - t as isize }),
            bias: Some((&bias, [t * s, 0, s, 1])),
        };
        for (i, (name, mask)) in cases.iter().enumerate() {
            // Half of the masks with the full standard score mod, half without.
            if (i + c) % 2 == 0 {
                check_case(name, &pr, mask, &NoScoreMod);
            } else {
                check_case(&format!("{name} with softcap 3 + alibi + bias (B, 1, T, S)"), &pr, mask, &score);
            }
        }
    }
}

#[test]
fn rows_that_see_no_key_give_zeros_and_negative_infinity() {
    let mut rng = Rng(0x5eed_0004);
    for c in 0..4 {
        let (d, dv) = head_dims(2 * c + 1);
        // T > S under causal: the first T − S queries precede every key.
        let mut dims = random_dims(&mut rng, c, d, dv);
        dims.s = dims.s.min(15);
        dims.t = dims.s + 2 + 2 * rng.below(4);
        let pr = Problem::new(&mut rng, dims);
        let FlashDims { b, t, s, .. } = dims;
        let offset = s as isize - t as isize;
        let empty = check_case("causal T > S", &pr, &Causal { offset }, &NoScoreMod);
        assert!(empty >= b * dims.h * (t - s), "causal T > S: expected empty rows, found {empty}");
        let empty = check_case("causal T > S, softcap", &pr, &Causal { offset }, &Softcap { cap: 2.0 });
        assert!(empty > 0);
        // A batch element with no valid key at all; query documents with no key of their document.
        let mut lens = vec![s; b];
        lens[0] = 0;
        let qd: Vec<i64> = (0..b * t).map(|x| (x % t % 3) as i64).collect();
        let kd: Vec<i64> = vec![1; b * s];
        let cases = [
            ("key length 0", StandardMask { t, s, key_lengths: Some(&lens), ..Default::default() }),
            ("documents without keys", StandardMask { t, s, documents: Some((&qd, &kd)), ..Default::default() }),
        ];
        for (name, mask) in &cases {
            let empty = check_case(name, &pr, mask, &StandardScore { softcap: Some(5.0), ..Default::default() });
            assert!(empty > 0, "{name}: expected rows that see no key");
        }
    }
}

#[test]
fn dropout_follows_the_documented_stream() {
    let mut rng = Rng(0x5eed_0005);
    for c in 0..5 {
        let (d, dv) = head_dims(c + 1);
        let mut pr = random_problem(&mut rng, c, d, dv);
        // 0.25 is exact in f32, so the f32 probability and the oracle's threshold agree.
        pr.dropout = Some((0.25, 1000 + c as u64));
        let FlashDims { b, h, t, s, .. } = pr.dims;
        let offset = s as isize - t as isize;
        let slopes: Vec<f32> = (0..h).map(|x| 0.25 / (x + 1) as f32).collect();
        let lens: Vec<usize> = (0..b).map(|_| 1 + rng.below(s)).collect();
        check_case("no mask", &pr, &NoMask, &NoScoreMod);
        check_case("causal softcap 2", &pr, &Causal { offset }, &Softcap { cap: 2.0 });
        let mask = StandardMask { t, s, causal: true, key_lengths: Some(&lens), ..Default::default() };
        check_case("causal + key lengths, alibi", &pr, &mask, &Alibi { slopes: &slopes, offset });
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Masks and score mods written by a user of the crate

/// Dilated attention: a query sees the keys of its own parity. No `classify`: every tile is checked per element.
struct Dilated;

impl MaskMod for Dilated {
    fn visible(&self, _b: usize, _h: usize, i: usize, j: usize) -> bool {
        i % 2 == j % 2
    }
}

/// Chunked causal attention (Llama 4's local layers): query `i` at position `d = i + offset` sees key `j ≤ d` of
/// the same chunk of `chunk` positions. With a `classify` that skips whole tiles.
struct ChunkedCausal {
    chunk: usize,
    offset: isize,
}

impl ChunkedCausal {
    fn chunk_of(&self, pos: isize) -> isize {
        pos.div_euclid(self.chunk as isize)
    }
}

impl MaskMod for ChunkedCausal {
    fn visible(&self, _b: usize, _h: usize, i: usize, j: usize) -> bool {
        let (d, j) = (i as isize + self.offset, j as isize);
        d >= 0 && j <= d && self.chunk_of(j) == self.chunk_of(d)
    }

    fn classify(&self, _b: usize, _h: usize, i0: usize, i1: usize, j0: usize, j1: usize) -> TileKind {
        let (d_lo, d_hi) = (i0 as isize + self.offset, i1 as isize - 1 + self.offset);
        let (j_lo, j_hi) = (j0 as isize, j1 as isize - 1);
        let first_chunk_start = self.chunk_of(d_lo.max(0)) * self.chunk as isize;
        if d_hi < 0 || j_lo > d_hi || j_hi < first_chunk_start {
            return TileKind::Empty;
        }
        let one_chunk = [d_hi, j_lo, j_hi].iter().all(|&x| self.chunk_of(x) == self.chunk_of(d_lo));
        if d_lo >= 0 && j_hi <= d_lo && one_chunk {
            TileKind::Full
        } else {
            TileKind::Partial
        }
    }
}

/// Halved scores plus a shift that depends on head, query and key: `f(s) = s/2 + 0.1·((h + i + 2j) mod 5)`.
struct HalfShift;

impl ScoreMod for HalfShift {
    fn apply(&self, _b: usize, h: usize, i: usize, j0: usize, row: &mut [f32]) {
        for (x, v) in row.iter_mut().enumerate() {
            *v = 0.5 * *v + 0.1 * ((h + i + 2 * (j0 + x)) % 5) as f32;
        }
    }
    fn chain(&self, _b: usize, _h: usize, _i: usize, _j0: usize, _s: &[f32], ds: &mut [f32]) {
        ds.iter_mut().for_each(|g| *g *= 0.5);
    }
}

/// A non-linear score function per batch element: `f(s) = s + c_b·s²`, `f'(s) = 1 + 2·c_b·s`.
struct Quadratic {
    c: [f32; 2],
}

impl ScoreMod for Quadratic {
    fn apply(&self, b: usize, _h: usize, _i: usize, _j0: usize, row: &mut [f32]) {
        row.iter_mut().for_each(|v| *v += self.c[b] * *v * *v);
    }
    fn chain(&self, b: usize, _h: usize, _i: usize, _j0: usize, s: &[f32], ds: &mut [f32]) {
        for (g, &x) in ds.iter_mut().zip(s) {
            *g *= 1.0 + 2.0 * self.c[b] * x;
        }
    }
}

#[test]
fn user_defined_masks_and_score_mods_match_the_oracle() {
    let mut rng = Rng(0x5eed_0006);
    for c in 0..6 {
        let (d, dv) = head_dims(c + 4);
        let mut pr = random_problem(&mut rng, c, d, dv);
        let (t, s) = (pr.dims.t, pr.dims.s);
        let offset = s as isize - t as isize;
        let chunk = 2 + rng.below(20);
        let chunked = ChunkedCausal { chunk, offset };
        let quad = Quadratic { c: [0.05, -0.03] };
        check_case("dilated", &pr, &Dilated, &NoScoreMod);
        check_case("dilated, half-shift", &pr, &Dilated, &HalfShift);
        check_case(&format!("chunked causal {chunk}"), &pr, &chunked, &NoScoreMod);
        check_case(&format!("chunked causal {chunk}, quadratic"), &pr, &chunked, &quad);
        check_case("causal, quadratic", &pr, &Causal { offset }, &quad);
        pr.dropout = Some((0.5, 7 + c as u64));
        check_case(&format!("chunked causal {chunk}, half-shift"), &pr, &chunked, &HalfShift);
    }
}

/// The user's `classify` must agree with its `visible`, or the kernel would skip visible keys; checked here the
/// same way the crate checks its own masks.
#[test]
fn user_chunked_classification_agrees_with_visibility() {
    for (t, s, chunk) in [(9, 9, 4), (5, 23, 3), (23, 5, 7), (1, 17, 16), (30, 30, 1)] {
        let m = ChunkedCausal { chunk, offset: s as isize - t as isize };
        for (bi, bj) in [(1, 1), (3, 5), (4, 4), (7, 16)] {
            for i0 in (0..t).step_by(bi) {
                for j0 in (0..s).step_by(bj) {
                    let (i1, j1) = ((i0 + bi).min(t), (j0 + bj).min(s));
                    let kind = m.classify(0, 0, i0, i1, j0, j1);
                    let vis: Vec<bool> = (i0..i1)
                        .flat_map(|i| (j0..j1).map(move |j| (i, j)))
                        .map(|(i, j)| m.visible(0, 0, i, j))
                        .collect();
                    let label = format!("T{t} S{s} chunk {chunk}: tile {i0}..{i1} x {j0}..{j1} is {kind:?}");
                    match kind {
                        TileKind::Empty => assert!(vis.iter().all(|v| !v), "{label} but has visible keys"),
                        TileKind::Full => assert!(vis.iter().all(|v| *v), "{label} but hides keys"),
                        TileKind::Partial => {}
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// bf16 storage

/// `flash_forward_bf16` (bf16 dot products, f32 softmax) against the oracle on the same bf16 values. `Q Kᵀ` of bf16
/// values is exact in f32 products, so lse keeps the f32 tolerance. `P V` takes `P` rounded to bf16 and the output
/// is rounded to bf16, each with unit roundoff `u = 2⁻⁸`, so each output element must satisfy
/// `|o − o*| ≤ 1e-5 + u·|o*| + 2u·Σ_j P_ij·|v_j|`: the output rounding exactly, twice the first-order bound of the
/// probability rounding (measured: 0.78 of the single bound, in a row of two keys where both roundings align).
#[test]
fn bf16_forward_matches_the_oracle_within_bf16_rounding() {
    if !bf16_dot_supported() {
        skip("bf16_forward_matches_the_oracle_within_bf16_rounding", "this CPU has no AVX512-BF16 dot products");
        return;
    }
    let mut rng = Rng(0x5eed_0007);
    for c in 0..6 {
        let (d, dv) = head_dims(c + 6);
        let mut pr = random_problem(&mut rng, c, d, dv);
        let to_bf = |x: &[f32]| -> Vec<Bf16> { x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect() };
        let (qb, kb, vb) = (to_bf(&pr.q), to_bf(&pr.k), to_bf(&pr.v));
        // The oracle sees exactly the bf16 values.
        let up = |x: &[Bf16]| -> Vec<f32> { x.iter().map(|v| bf16_to_f32(v.0)).collect() };
        (pr.q, pr.k, pr.v) = (up(&qb), up(&kb), up(&vb));
        let FlashDims { b, h, t, s, .. } = pr.dims;
        let offset = s as isize - t as isize;
        let lens: Vec<usize> = (0..b).map(|_| 1 + rng.below(s)).collect();
        let slopes: Vec<f32> = (0..h).map(|x| 0.5f32.powi(x as i32 + 1)).collect();
        let standard = StandardMask { t, s, causal: true, key_lengths: Some(&lens), ..Default::default() };
        let score = StandardScore { softcap: Some(2.0), alibi: Some(Alibi { slopes: &slopes, offset }), bias: None };
        check_bf16("no mask", &pr, (&qb, &kb, &vb), &NoMask, &NoScoreMod);
        check_bf16("causal", &pr, (&qb, &kb, &vb), &Causal { offset }, &NoScoreMod);
        check_bf16("dilated, half-shift", &pr, (&qb, &kb, &vb), &Dilated, &HalfShift);
        check_bf16("causal + key lengths, softcap 2 + alibi", &pr, (&qb, &kb, &vb), &standard, &score);
    }
}

fn check_bf16<M: MaskMod, F: ScoreMod>(
    name: &str,
    pr: &Problem,
    (q, k, v): (&[Bf16], &[Bf16], &[Bf16]),
    mask: &M,
    score: &F,
) {
    let want = oracle(pr, mask, score);
    let FlashDims { b: nb, h: nh, hkv, t, s, dv, .. } = pr.dims;
    // Σ_j P_ij |v_j| per output element: the scale of the error that rounding P to bf16 can make.
    let mut spread = vec![0f64; want.o.len()];
    for bh in 0..nb * nh {
        let kvh = (bh / nh) * hkv + (bh % nh) / (nh / hkv);
        for i in 0..t {
            for j in 0..s {
                let p = want.p[(bh * t + i) * s + j];
                for e in 0..dv {
                    spread[(bh * t + i) * dv + e] += p * (pr.v[(kvh * s + j) * dv + e] as f64).abs();
                }
            }
        }
    }
    let u = 2f64.powi(-8);
    let bound = |x: usize| ATOL + u * want.o[x].abs() + 2.0 * u * spread[x];
    for isa in Isa::available() {
        for block_q in BLOCK_Q {
            for block_k in BLOCK_K {
                let cfg = FlashConfig { isa, block_q, block_k, ..FlashConfig::new(pr.scale) };
                let label = format!("[bf16 {name}; {}; {isa:?} block_q {block_q} block_k {block_k}]", pr.label());
                let mut o = vec![Bf16(0x7fc0); want.o.len()];
                let mut lse = vec![f32::NAN; want.lse.len()];
                flash_forward_bf16(&pr.dims, &cfg, mask, score, q, k, v, &mut o, &mut lse).unwrap();
                check(&label, "lse", &lse, &want.lse);
                let o: Vec<f32> = o.iter().map(|x| bf16_to_f32(x.0)).collect();
                let bad = (0..o.len()).find(|&x| {
                    // Written so that NaN fails.
                    let within = (o[x] as f64 - want.o[x]).abs() <= bound(x);
                    !within
                });
                if let Some(x) = bad {
                    panic!(
                        "{label} o: element {x} is {} want {} (|diff| {:e} > bound {:e})",
                        o[x],
                        want.o[x],
                        (o[x] as f64 - want.o[x]).abs(),
                        bound(x)
                    );
                }
            }
        }
    }
}

#[test]
fn bad_buffers_and_settings_are_errors_not_panics() {
    let dims = FlashDims { b: 1, h: 2, hkv: 1, t: 3, s: 5, d: 16, dv: 16 };
    let (q, k, v) = (vec![0f32; 2 * 3 * 16], vec![0f32; 5 * 16], vec![0f32; 5 * 16]);
    let (mut o, mut lse) = (vec![0f32; 2 * 3 * 16], vec![0f32; 6]);
    let cfg = FlashConfig::new(0.25);
    let run = |dims: &FlashDims, cfg: &FlashConfig, k: &[f32], o: &mut [f32], lse: &mut [f32]| {
        flash_forward(dims, cfg, &NoMask, &NoScoreMod, &q, k, &v, o, lse).unwrap_err().to_string()
    };
    let e = run(&dims, &cfg, &k[..16], &mut o, &mut lse);
    assert!(e.contains("buffer lengths") && e.contains("k 16"), "{e}");
    let e = run(&FlashDims { d: 12, ..dims }, &cfg, &k, &mut o, &mut lse);
    assert!(e.contains("D = 12"), "{e}");
    let e = run(&FlashDims { hkv: 2, ..dims }, &cfg, &k, &mut o, &mut lse);
    assert!(e.contains("buffer lengths"), "{e}");
    let e = run(&dims, &cfg, &k, &mut o[..5], &mut lse);
    assert!(e.contains("o has 5"), "{e}");
    let e = run(&dims, &FlashConfig { block_k: 20, ..cfg }, &k, &mut o, &mut lse);
    assert!(e.contains("block sizes"), "{e}");
    let e = run(&dims, &FlashConfig { dropout: Some((1.0, 0)), ..cfg }, &k, &mut o, &mut lse);
    assert!(e.contains("dropout"), "{e}");
    let e = flash_probabilities(&dims, &cfg, &NoMask, &NoScoreMod, &q, &k, &lse, 0, 7).unwrap_err().to_string();
    assert!(e.contains("(0, 7)"), "{e}");
    // Sizes whose products overflow: a length check, not a multiplication that wraps (or panics in debug).
    let huge = FlashDims { b: usize::MAX / 2, h: 4, hkv: 2, t: 3, s: 5, d: 16, dv: 16 };
    let e = run(&huge, &cfg, &k, &mut o, &mut lse);
    assert!(e.contains("buffer lengths"), "{e}");
    let wraps = FlashDims { b: 1 << 62, h: 4, hkv: 1, t: 1, s: 1, d: 16, dv: 16 }; // b·h = 2⁶⁴ wraps to 0
    let e = run(&wraps, &cfg, &k, &mut o, &mut lse);
    assert!(e.contains("buffer lengths"), "{e}");
    // flash_probabilities checks the sizes too: Hkv = 0 is an error, not a division by zero.
    let e = flash_probabilities(&FlashDims { hkv: 0, ..dims }, &cfg, &NoMask, &NoScoreMod, &q, &k, &lse, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty dimension"), "{e}");
    flash_forward(&dims, &cfg, &NoMask, &NoScoreMod, &q, &k, &v, &mut o, &mut lse).unwrap();
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // MQA with one batch splits keys across backward tasks; the split must come from the shape, not the pool size,
    // so every machine gets bit-identical outputs and gradients.
    let mut rng = Rng(0x5eed_0009);
    let dims = FlashDims { b: 1, h: 4, hkv: 1, t: 37, s: 301, d: 32, dv: 16 };
    let pr = Problem::new(&mut rng, dims);
    let cfg = FlashConfig { block_q: 16, block_k: 32, ..FlashConfig::new(pr.scale) };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let causal = Causal { offset: dims.s as isize - dims.t as isize };
        pool.install(|| forward_backward(&pr, &cfg, &causal, &NoScoreMod))
    };
    let one = run(1);
    for threads in [2, 3, 8] {
        assert!(run(threads) == one, "{threads} threads gave different bits than 1 thread");
    }
}
