//! Recurrent networks: fused cells against their composed twins and finite differences; layers with the fused and the
//! composed cells; padding that never leaks; every parameter trained; dropout between layers.
//!
//! The PyTorch oracle (`nn.LSTM`, `nn.GRU`, `nn.RNN` with identical weights, lengths through packed sequences) runs in
//! `attend-cli/tests/op_layer.rs` on `fixtures/layers`.

mod common;

use attend::ops;
use attend::rng::DropoutRng;
use attend::rnn::{CellImpl, Elman, ElmanConfig, Gru, Jordan, JordanConfig, Lstm, Nonlinearity, RnnConfig, RnnOutput};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;

fn randn64(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed, DType::F64)
}

#[test]
fn fused_cells_equal_their_twins_and_finite_differences() {
    let (n, h) = (3, 5);
    let gates = (randn64(&[n, 4 * h], 1) * 2.0).unwrap();
    let c = randn64(&[n, h], 2);
    fd_check("lstm dgates", gates.clone(), |g| {
        let (h1, c1) = ops::lstm_cell(g, &c).unwrap();
        Tensor::cat(&[h1, c1], 1).unwrap()
    });
    fd_check("lstm dc", c.clone(), |c| {
        let (h1, c1) = ops::lstm_cell(&gates, c).unwrap();
        Tensor::cat(&[h1, c1], 1).unwrap()
    });
    let (gx, gh, hp) = ((randn64(&[n, 3 * h], 3) * 2.0).unwrap(), randn64(&[n, 3 * h], 4), randn64(&[n, h], 5));
    fd_check("gru dgx", gx.clone(), |x| ops::gru_cell(x, &gh, &hp).unwrap());
    fd_check("gru dgh", gh.clone(), |g| ops::gru_cell(&gx, g, &hp).unwrap());
    fd_check("gru dh", hp.clone(), |s| ops::gru_cell(&gx, &gh, s).unwrap());

    for dtype in [DType::F64, DType::F32] {
        let (tol, gtol) = if dtype == DType::F64 { (F64, F64) } else { (F32, F32_GRAD) };
        let v = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let (g, cc) = (v(&gates), v(&c));
        let dh = randn(&[n, 2 * h], 6, dtype);
        let run = |f: fn(&Tensor, &Tensor) -> attend::Result<(Tensor, Tensor)>| {
            let (h1, c1) = f(g.as_tensor(), cc.as_tensor()).unwrap();
            let out = Tensor::cat(&[h1, c1], 1).unwrap();
            let gr = weighted_sum(&out, &dh).backward().unwrap();
            (out, gr.get(g.as_tensor()).unwrap().clone(), gr.get(cc.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(ops::lstm_cell), run(ops::lstm_cell_reference));
        assert_close("lstm out", &a.0, &b.0, tol);
        assert_close("lstm dgates", &a.1, &b.1, gtol);
        assert_close("lstm dc", &a.2, &b.2, gtol);
        let (x, gg, s) = (v(&gx), v(&gh), v(&hp));
        let dy = randn(&[n, h], 7, dtype);
        let run = |f: fn(&Tensor, &Tensor, &Tensor) -> attend::Result<Tensor>| {
            let out = f(x.as_tensor(), gg.as_tensor(), s.as_tensor()).unwrap();
            let gr = weighted_sum(&out, &dy).backward().unwrap();
            let grads: Vec<Tensor> = [&x, &gg, &s].iter().map(|t| gr.get(t.as_tensor()).unwrap().clone()).collect();
            (out, grads)
        };
        let (a, b) = (run(ops::gru_cell), run(ops::gru_cell_reference));
        assert_close("gru out", &a.0, &b.0, tol);
        for (i, (p, q)) in a.1.iter().zip(&b.1).enumerate() {
            assert_close(&format!("gru grad {i}"), p, q, gtol);
        }
    }
}

/// The three layers with the shared driver, built over one VarMap.
enum Net {
    Lstm(Lstm),
    Gru(Gru),
    Elman(Elman),
}

impl Net {
    fn new(kind: &str, cfg: RnnConfig, vb: VarBuilder) -> Self {
        match kind {
            "lstm" => Net::Lstm(Lstm::new(cfg, vb).unwrap()),
            "gru" => Net::Gru(Gru::new(cfg, vb).unwrap()),
            _ => Net::Elman(Elman::new(ElmanConfig { rnn: cfg, nonlinearity: Nonlinearity::Tanh }, vb).unwrap()),
        }
    }
    fn forward(&self, x: &Tensor, lengths: Option<&[usize]>) -> RnnOutput {
        match self {
            Net::Lstm(l) => l.forward(x, lengths, None, None),
            Net::Gru(l) => l.forward(x, lengths, None),
            Net::Elman(l) => l.forward(x, lengths, None),
        }
        .unwrap()
    }
    fn set_cell_impl(&mut self, imp: CellImpl) {
        match self {
            Net::Lstm(l) => l.set_cell_impl(imp),
            Net::Gru(l) => l.set_cell_impl(imp),
            Net::Elman(l) => l.set_cell_impl(imp),
        }
    }
    fn set_training(&self, t: bool) {
        match self {
            Net::Lstm(l) => l.set_training(t),
            Net::Gru(l) => l.set_training(t),
            Net::Elman(l) => l.set_training(t),
        }
    }
}

const KINDS: [&str; 3] = ["lstm", "gru", "elman"];

fn bidir2(c: usize, h: usize) -> RnnConfig {
    RnnConfig { num_layers: 2, bidirectional: true, ..RnnConfig::new(c, h) }
}

/// Σ output ⊙ w + Σ h_n ⊙ w' (+ c_n): reaches every output the layer returns.
fn loss_of(o: &RnnOutput) -> Tensor {
    let mut l = (weighted_sum(&o.output, &randn(o.output.dims(), 31, o.output.dtype()))
        + weighted_sum(&o.h_n, &randn(o.h_n.dims(), 32, o.h_n.dtype())))
    .unwrap();
    if let Some(c) = &o.c_n {
        l = (l + weighted_sum(c, &randn(c.dims(), 33, c.dtype()))).unwrap();
    }
    l
}

#[test]
fn fused_and_composed_cells_give_the_same_layers() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn64(&[3, 6, 4], 41)).unwrap();
    let lengths = [6, 2, 4];
    for kind in KINDS {
        let vm = VarMap::new();
        let mut net = Net::new(kind, bidir2(4, 5), VarBuilder::from_varmap(&vm, DType::F64, &dev));
        let mut results = vec![];
        for imp in [CellImpl::Fused, CellImpl::Reference] {
            net.set_cell_impl(imp);
            let o = net.forward(x.as_tensor(), Some(&lengths));
            let g = loss_of(&o).backward().unwrap();
            let grads: Vec<Tensor> =
                varmap_vars(&vm).iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().clone()).collect();
            results.push((o, grads, g.get(x.as_tensor()).unwrap().clone()));
        }
        let (a, b) = (&results[0], &results[1]);
        assert_close(&format!("{kind} output"), &a.0.output, &b.0.output, F64);
        assert_close(&format!("{kind} h_n"), &a.0.h_n, &b.0.h_n, F64);
        assert_close(&format!("{kind} dx"), &a.2, &b.2, F64);
        for (i, (p, q)) in a.1.iter().zip(&b.1).enumerate() {
            assert_close(&format!("{kind} parameter gradient {i}"), p, q, F64);
        }
    }
}

#[test]
fn padding_never_reaches_outputs_states_or_gradients() {
    let dev = Device::Cpu;
    let (t, c, h) = (7, 3, 4);
    let lengths = [7usize, 3, 5];
    let x = randn64(&[3, t, c], 51);
    // Padding holds garbage: NaN, inf and huge values (a path that multiplied the padding's zero gate gradients by
    // its input would turn 0·NaN into NaN weight gradients).
    let garbage: Vec<f64> = (randn64(&[3, t, c], 52) * 1e3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let garbage: Vec<f64> = garbage
        .iter()
        .enumerate()
        .map(|(i, &g)| match i % 3 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            _ => g,
        })
        .collect();
    let garbage = Tensor::from_vec(garbage, (3, t, c), &dev).unwrap();
    let valid =
        Tensor::from_vec((0..3 * t).map(|i| ((i % t) < lengths[i / t]) as u8).collect::<Vec<_>>(), (3, t, 1), &dev)
            .unwrap()
            .broadcast_as((3, t, c))
            .unwrap();
    let noisy = valid.where_cond(&x, &garbage).unwrap();
    for (kind, imp) in KINDS.iter().flat_map(|k| [(*k, CellImpl::Fused), (*k, CellImpl::Reference)]) {
        let vm = VarMap::new();
        let mut net = Net::new(kind, bidir2(c, h), VarBuilder::from_varmap(&vm, DType::F64, &dev));
        net.set_cell_impl(imp);
        let kind = &format!("{kind} {imp:?}");
        let batch = net.forward(&noisy, Some(&lengths));
        let clean = net.forward(&x, Some(&lengths));
        assert_close(&format!("{kind}: garbage in padding"), &batch.output, &clean.output, F64);
        let g_noisy = loss_of(&batch).backward().unwrap();
        let g_clean = loss_of(&clean).backward().unwrap();
        for (name, v) in varmap_vars(&vm) {
            let (a, b) = (g_noisy.get(v.as_tensor()).unwrap(), g_clean.get(v.as_tensor()).unwrap());
            assert_close(&format!("{kind}: d{name} with garbage in padding"), a, b, F64);
        }
        // Each sequence alone, cut to its length, gives its row of the batch and its final states.
        for (bi, &len) in lengths.iter().enumerate() {
            let alone = net.forward(&x.narrow(0, bi, 1).unwrap().narrow(1, 0, len).unwrap(), None);
            let row = batch.output.narrow(0, bi, 1).unwrap();
            assert_close(&format!("{kind} seq {bi} output"), &row.narrow(1, 0, len).unwrap(), &alone.output, F64);
            let pad =
                row.narrow(1, len, t - len).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(pad, 0.0, "{kind} seq {bi}: padded outputs are zero");
            assert_close(&format!("{kind} seq {bi} h_n"), &batch.h_n.narrow(1, bi, 1).unwrap(), &alone.h_n, F64);
            if let (Some(cb), Some(ca)) = (&batch.c_n, &alone.c_n) {
                assert_close(&format!("{kind} seq {bi} c_n"), &cb.narrow(1, bi, 1).unwrap(), ca, F64);
            }
        }
    }
    // The Jordan network's own step loop.
    let vm = VarMap::new();
    let cfg = JordanConfig { input_size: c, hidden_size: h, output_size: 2 };
    let j = Jordan::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
    let (noisy, clean) =
        (j.forward(&noisy, Some(&lengths), None).unwrap(), j.forward(&x, Some(&lengths), None).unwrap());
    assert_close("jordan: garbage in padding", &noisy.output, &clean.output, F64);
    let loss = |o: &attend::rnn::JordanOutput| (o.output.sum_all().unwrap() + o.h_n.sum_all().unwrap()).unwrap();
    let (g_noisy, g_clean) = (loss(&noisy).backward().unwrap(), loss(&clean).backward().unwrap());
    for (name, v) in varmap_vars(&vm) {
        let (a, b) = (g_noisy.get(v.as_tensor()).unwrap(), g_clean.get(v.as_tensor()).unwrap());
        assert_close(&format!("jordan: d{name} with garbage in padding"), a, b, F64);
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let dev = Device::Cpu;
    let x = randn(&[2, 5, 3], 61, DType::F32);
    for kind in KINDS {
        let vm = VarMap::new();
        let net =
            Net::new(kind, RnnConfig { dropout: 0.2, ..bidir2(3, 4) }, VarBuilder::from_varmap(&vm, DType::F32, &dev));
        reseed(&vm, 10, 0.5);
        net.set_training(true);
        let g = loss_of(&net.forward(&x, Some(&[5, 3]))).backward().unwrap();
        let vars = varmap_vars(&vm);
        assert_eq!(vars.len(), 16, "{kind}: 2 layers × 2 directions × 4 tensors");
        assert_all_grads_finite_nonzero(kind, &vars, &g);
    }
    let vm = VarMap::new();
    let cfg = JordanConfig { input_size: 3, hidden_size: 4, output_size: 2 };
    let j = Jordan::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    reseed(&vm, 11, 0.5);
    let o = j.forward(&x, Some(&[5, 3]), None).unwrap();
    let loss = (weighted_sum(&o.output, &randn(&[2, 5, 2], 62, DType::F32)) + o.h_n.sum_all().unwrap()).unwrap();
    assert_all_grads_finite_nonzero("jordan", &varmap_vars(&vm), &loss.backward().unwrap());
}

#[test]
fn dropout_between_layers_only_while_training() {
    let dev = Device::Cpu;
    let x = randn(&[2, 5, 3], 71, DType::F32);
    let vm = VarMap::new();
    let cfg = RnnConfig { num_layers: 2, dropout: 0.5, ..RnnConfig::new(3, 6) };
    let mut lstm = Lstm::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let eval = lstm.forward(&x, None, None, None).unwrap().output;
    let rng = DropoutRng::new(7);
    lstm.set_dropout_stream(rng.stream());
    lstm.set_training(true);
    let a = lstm.forward(&x, None, None, None).unwrap().output;
    let b = lstm.forward(&x, None, None, None).unwrap().output;
    let differs =
        |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4;
    assert!(differs(&eval, &a), "training applies dropout between the layers");
    assert!(differs(&a, &b), "each call draws its own mask");
    // One layer: nothing between layers, so training changes nothing.
    let one = Lstm::new(
        RnnConfig { dropout: 0.5, ..RnnConfig::new(3, 6) },
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
    )
    .unwrap();
    let e = one.forward(&x, None, None, None).unwrap().output;
    one.set_training(true);
    assert!(!differs(&e, &one.forward(&x, None, None, None).unwrap().output));
    lstm.set_training(false);
    assert!(!differs(&eval, &lstm.forward(&x, None, None, None).unwrap().output));
}

#[test]
fn bad_input_is_an_error_naming_shapes() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let lstm = Lstm::new(bidir2(3, 4), VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let x = randn(&[2, 5, 3], 81, DType::F32);
    let e = lstm.forward(&randn(&[2, 5, 4], 1, DType::F32), None, None, None).unwrap_err().to_string();
    assert!(e.contains("(2, 5, 4)") && e.contains("C = 3"), "{e}");
    let e = lstm.forward(&x, Some(&[5, 6]), None, None).unwrap_err().to_string();
    assert!(e.contains("lengths[1] = 6") && e.contains("T = 5"), "{e}");
    let e = lstm.forward(&x, None, Some(&randn(&[2, 2, 4], 2, DType::F32)), None).unwrap_err().to_string();
    assert!(e.contains("h0 (2, 2, 4)") && e.contains("(4, 2, 4)"), "{e}");
    let e =
        Lstm::new(RnnConfig { dropout: 1.0, ..RnnConfig::new(3, 4) }, VarBuilder::from_varmap(&vm, DType::F32, &dev))
            .unwrap_err()
            .to_string();
    assert!(e.contains("dropout"), "{e}");
}

/// The tensors flattened and concatenated: one output to check gradients through.
fn flat_cat(parts: &[Tensor]) -> Tensor {
    Tensor::cat(&parts.iter().map(|p| p.flatten_all().unwrap()).collect::<Vec<_>>(), 0).unwrap()
}

#[test]
fn sequence_ops_match_finite_differences() {
    // The whole-sequence ops' hand-written backward (input product included), with lengths, in both directions,
    // and a hidden width of two blocks, the second partial (the blocked gate layout's edge).
    let (b, t, c, h) = (3, 4, 3, 20);
    let lengths = [4usize, 2, 3];
    let x = randn64(&[b, t, c], 90);
    let (h0, c0) = (randn64(&[b, h], 93), randn64(&[b, h], 94));
    for reverse in [false, true] {
        for (g, kind) in [(4, "lstm"), (3, "gru")] {
            let w_ih = (randn64(&[g * h, c], 91) * 0.7).unwrap();
            let w_hh = (randn64(&[g * h, h], 92) * 0.3).unwrap();
            let (b_ih, b_hh) = (randn64(&[g * h], 98), randn64(&[g * h], 99));
            let run =
                |x: &Tensor, w_ih: &Tensor, w_hh: &Tensor, b_ih: &Tensor, b_hh: &Tensor, h0: &Tensor, c0: &Tensor| {
                    let p = ops::SequenceParams { w_ih, w_hh, b_ih: Some(b_ih), b_hh: Some(b_hh) };
                    let parts = if g == 4 {
                        let (y, hn, cn) = ops::lstm_sequence(x, p, h0, c0, Some(&lengths), reverse).unwrap();
                        vec![y, hn, cn]
                    } else {
                        let (y, hn) = ops::gru_sequence(x, p, h0, Some(&lengths), reverse).unwrap();
                        vec![y, hn]
                    };
                    flat_cat(&parts)
                };
            let name = |what: &str| format!("{kind} {what} reverse={reverse}");
            fd_check(&name("dx"), x.clone(), |v| run(v, &w_ih, &w_hh, &b_ih, &b_hh, &h0, &c0));
            fd_check(&name("dw_ih"), w_ih.clone(), |v| run(&x, v, &w_hh, &b_ih, &b_hh, &h0, &c0));
            fd_check(&name("dw_hh"), w_hh.clone(), |v| run(&x, &w_ih, v, &b_ih, &b_hh, &h0, &c0));
            fd_check(&name("db_ih"), b_ih.clone(), |v| run(&x, &w_ih, &w_hh, v, &b_hh, &h0, &c0));
            fd_check(&name("db_hh"), b_hh.clone(), |v| run(&x, &w_ih, &w_hh, &b_ih, v, &h0, &c0));
            fd_check(&name("dh0"), h0.clone(), |v| run(&x, &w_ih, &w_hh, &b_ih, &b_hh, v, &c0));
            if g == 4 {
                fd_check(&name("dc0"), c0.clone(), |v| run(&x, &w_ih, &w_hh, &b_ih, &b_hh, &h0, v));
            }
        }
    }
}

#[test]
fn sequence_gradients_reach_through_the_outputs_alone_or_the_final_states_alone() {
    // The outputs and the final states are two graph nodes of one kernel call, the outputs' gradient handed to the
    // call's backward beside candle's graph: a loss on either alone must still get every gradient right, and a
    // second backward over the same graph must not reuse the first one's output gradient.
    let (b, t, c, h) = (3, 4, 3, 5);
    let lengths = [4usize, 2, 3];
    let x = randn64(&[b, t, c], 110);
    let (h0, c0) = (randn64(&[b, h], 111), randn64(&[b, h], 112));
    for (g, kind) in [(4, "lstm"), (3, "gru")] {
        let w_ih = (randn64(&[g * h, c], 113) * 0.7).unwrap();
        let w_hh = (randn64(&[g * h, h], 114) * 0.3).unwrap();
        let b_ih = randn64(&[g * h], 115);
        // Either y (`states` false) or the final states, flat.
        let run = |x: &Tensor, w_hh: &Tensor, h0: &Tensor, states: bool| {
            let p = ops::SequenceParams { w_ih: &w_ih, w_hh, b_ih: Some(&b_ih), b_hh: None };
            let parts = if g == 4 {
                let (y, hn, cn) = ops::lstm_sequence(x, p, h0, &c0, Some(&lengths), false).unwrap();
                if states {
                    vec![hn, cn]
                } else {
                    vec![y]
                }
            } else {
                let (y, hn) = ops::gru_sequence(x, p, h0, Some(&lengths), false).unwrap();
                if states {
                    vec![hn]
                } else {
                    vec![y]
                }
            };
            flat_cat(&parts)
        };
        for states in [false, true] {
            let name = |what: &str| format!("{kind} {what} through {}", if states { "the states" } else { "y" });
            fd_check(&name("dx"), x.clone(), |v| run(v, &w_hh, &h0, states));
            fd_check(&name("dw_hh"), w_hh.clone(), |v| run(&x, v, &h0, states));
            fd_check(&name("dh0"), h0.clone(), |v| run(&x, &w_hh, v, states));
        }
        // One forward, three backward passes: through y, through the states only, through y again.
        let xv = Var::from_tensor(&x).unwrap();
        let p = ops::SequenceParams { w_ih: &w_ih, w_hh: &w_hh, b_ih: Some(&b_ih), b_hh: None };
        let (y, hn) = if g == 4 {
            let (y, hn, _) = ops::lstm_sequence(xv.as_tensor(), p, &h0, &c0, Some(&lengths), false).unwrap();
            (y, hn)
        } else {
            ops::gru_sequence(xv.as_tensor(), p, &h0, Some(&lengths), false).unwrap()
        };
        let grad = |loss: &Tensor| loss.backward().unwrap().get(xv.as_tensor()).unwrap().clone();
        let (by_y, by_h) = (grad(&y.sum_all().unwrap()), grad(&hn.sum_all().unwrap()));
        let fresh_h = grad(&run(xv.as_tensor(), &w_hh, &h0, true).narrow(0, 0, b * h).unwrap().sum_all().unwrap());
        assert_close(&format!("{kind} states-only backward after a y backward"), &by_h, &fresh_h, F64);
        assert_close(&format!("{kind} a second y backward"), &grad(&y.sum_all().unwrap()), &by_y, F64);
    }
}

#[test]
fn f32_sequence_path_equals_the_composed_cells() {
    // The f32 path runs the recurrence on persistent threads with packed weights; an odd hidden width splits
    // unevenly between threads and leaves row tails for the vector cells.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn(&[5, 6, 7], 101, DType::F32)).unwrap();
    let lengths = [6, 1, 4, 6, 3];
    for kind in ["lstm", "gru"] {
        let vm = VarMap::new();
        let mut net = Net::new(kind, bidir2(7, 37), VarBuilder::from_varmap(&vm, DType::F32, &dev));
        let mut results = vec![];
        for imp in [CellImpl::Fused, CellImpl::Reference] {
            net.set_cell_impl(imp);
            let o = net.forward(x.as_tensor(), Some(&lengths));
            let g = loss_of(&o).backward().unwrap();
            let grads: Vec<Tensor> =
                varmap_vars(&vm).iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().clone()).collect();
            results.push((o, grads, g.get(x.as_tensor()).unwrap().clone()));
        }
        let (a, b) = (&results[0], &results[1]);
        let tol = Tol { atol: 2e-5, rtol: 2e-4 };
        assert_close(&format!("{kind} f32 output"), &a.0.output, &b.0.output, tol);
        assert_close(&format!("{kind} f32 h_n"), &a.0.h_n, &b.0.h_n, tol);
        assert_close(&format!("{kind} f32 dx"), &a.2, &b.2, tol);
        for (i, (p, q)) in a.1.iter().zip(&b.1).enumerate() {
            assert_close(&format!("{kind} f32 parameter gradient {i}"), p, q, tol);
        }
    }
}

/// The team-thread cap is process-wide: tests that set it take turns.
static THREAD_CAP: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn f32_sequence_results_do_not_depend_on_the_thread_count() {
    let _turn = THREAD_CAP.lock().unwrap_or_else(|e| e.into_inner());
    // H = 150: ten blocks of units (the last 6 wide), split between two threads so that a GRU column's 64-wide
    // panel is full for one team and a tail for the other; K = C + H > 128 takes several passes. Both must sum it
    // in the same order, bit for bit.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn(&[5, 6, 7], 131, DType::F32)).unwrap();
    let lengths = [6, 1, 4, 6, 3];
    for kind in ["lstm", "gru"] {
        let vm = VarMap::new();
        let net = Net::new(kind, bidir2(7, 150), VarBuilder::from_varmap(&vm, DType::F32, &dev));
        let run = |threads: usize| {
            attend_kernels::cap_team_threads(threads);
            let o = net.forward(x.as_tensor(), Some(&lengths));
            let g = loss_of(&o).backward().unwrap();
            attend_kernels::cap_team_threads(0);
            let mut all = vec![o.output.clone(), o.h_n.clone(), g.get(x.as_tensor()).unwrap().clone()];
            all.extend(varmap_vars(&vm).iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().clone()));
            all.iter().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>()
        };
        let one = run(1);
        let two = run(2);
        for (i, (a, b)) in one.iter().zip(&two).enumerate() {
            let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{kind}: result {i} differs between one and two threads");
        }
    }
}

#[test]
fn weight_gradients_gathered_over_many_chunks_of_steps_match_and_do_not_depend_on_the_thread_count() {
    // B = 70 puts 3 steps in a chunk of the backward's weight gradient (256 rows), so T = 10 takes four chunks, the
    // last one short, both ways round (bidirectional), with padded rows: two rings used by turns, pieces of each
    // chunk run by whichever thread waits, chunk after chunk. The composed cells are the reference; one, two and
    // three threads must agree bit for bit (as many of them as the pool has: two on a 2-core machine).
    let _turn = THREAD_CAP.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let (b, t) = (70, 10);
    let x = Var::from_tensor(&randn(&[b, t, 6], 151, DType::F32)).unwrap();
    let lengths: Vec<usize> = (0..b).map(|i| [10, 7, 1, 10, 4][i % 5]).collect();
    for kind in ["lstm", "gru"] {
        let vm = VarMap::new();
        let mut net = Net::new(kind, bidir2(6, 37), VarBuilder::from_varmap(&vm, DType::F32, &dev));
        let grads = |net: &Net| -> Vec<Tensor> {
            let o = net.forward(x.as_tensor(), Some(&lengths));
            let g = loss_of(&o).backward().unwrap();
            let mut all = vec![g.get(x.as_tensor()).unwrap().clone()];
            all.extend(varmap_vars(&vm).iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().clone()));
            all
        };
        let by_threads: Vec<Vec<Vec<f32>>> = [1, 2, 3]
            .into_iter()
            .map(|threads| {
                attend_kernels::cap_team_threads(threads);
                let g = grads(&net);
                attend_kernels::cap_team_threads(0);
                g.iter().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
            })
            .collect();
        for w in by_threads.windows(2) {
            for (i, (a, c)) in w[0].iter().zip(&w[1]).enumerate() {
                assert!(a.iter().zip(c).all(|(p, q)| p.to_bits() == q.to_bits()), "{kind}: gradient {i} differs");
            }
        }
        let fused = grads(&net);
        net.set_cell_impl(CellImpl::Reference);
        let reference = grads(&net);
        for (i, (a, r)) in fused.iter().zip(&reference).enumerate() {
            assert_close(&format!("{kind} gradient {i}"), a, r, Tol { atol: 5e-5, rtol: 5e-4 });
        }
    }
}

#[test]
fn an_empty_batch_gives_zero_weight_gradients() {
    // No sequences: the weight gradient sums no rows, and must come out as zeros, not as whatever was in memory
    // (a pass over a real batch first leaves freed buffers of non-zero gradients for the allocator to hand out).
    let dev = Device::Cpu;
    let empty = Var::from_tensor(&randn(&[0, 4, 70], 161, DType::F32)).unwrap();
    let some = Var::from_tensor(&randn(&[3, 4, 70], 162, DType::F32)).unwrap();
    for kind in ["lstm", "gru"] {
        let vm = VarMap::new();
        let net = Net::new(kind, bidir2(70, 80), VarBuilder::from_varmap(&vm, DType::F32, &dev));
        drop(loss_of(&net.forward(some.as_tensor(), None)).backward().unwrap());
        let o = net.forward(empty.as_tensor(), None);
        assert_eq!(o.output.dims(), [0, 4, 160]);
        let g = loss_of(&o).backward().unwrap();
        for (name, v) in varmap_vars(&vm).iter().filter(|(n, _)| n.contains("weight")) {
            let grad = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{kind} {name}: no gradient"));
            let max = grad.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(max, 0.0, "{kind} {name}: gradient from no sequences");
        }
    }
}

#[test]
fn layers_run_inside_rayon_tasks_without_deadlock() {
    // Two recurrent layers at once, each inside a task of the pool (a user batching models with rayon): the
    // persistent-thread recurrence runs on the calling thread alone there, and gives the same numbers.
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let lstm = Lstm::new(RnnConfig::new(5, 40), VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let x = randn(&[3, 6, 5], 111, DType::F32);
    let outside = lstm.forward(&x, Some(&[6, 2, 5]), None, None).unwrap().output;
    let (a, b) = rayon::join(
        || lstm.forward(&x, Some(&[6, 2, 5]), None, None).unwrap().output,
        || lstm.forward(&x, Some(&[6, 2, 5]), None, None).unwrap().output,
    );
    assert_close("inside a task", &a, &outside, Tol { atol: 1e-6, rtol: 1e-5 });
    assert_close("the other task", &b, &outside, Tol { atol: 1e-6, rtol: 1e-5 });
}

#[test]
fn inference_without_gradients_equals_the_training_forward() {
    // Weights and input that track no gradient (a loaded checkpoint) run the sequence ops without keeping gate
    // activations; the numbers must not change.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn(&[5, 6, 7], 121, DType::F32)).unwrap();
    let lengths = [6, 1, 4, 6, 3];
    for kind in ["lstm", "gru"] {
        let vm = VarMap::new();
        let net = Net::new(kind, bidir2(7, 37), VarBuilder::from_varmap(&vm, DType::F32, &dev));
        let train = net.forward(x.as_tensor(), Some(&lengths));
        let weights: std::collections::HashMap<String, Tensor> =
            varmap_vars(&vm).into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
        let frozen = Net::new(kind, bidir2(7, 37), VarBuilder::from_tensors(weights, DType::F32, &dev));
        let infer = frozen.forward(&x.as_tensor().detach(), Some(&lengths));
        assert!(!infer.output.track_op(), "{kind}: inference output tracks gradients");
        let tol = Tol { atol: 0.0, rtol: 0.0 };
        assert_close(&format!("{kind} output"), &infer.output, &train.output, tol);
        assert_close(&format!("{kind} h_n"), &infer.h_n, &train.h_n, tol);
    }
}
