//! The fused GPT training step against its reference twin, `Gpt` through candle's autograd (itself checked against
//! Hugging Face GPT-2 in tests/gpt.rs): same loss, same logits, the same gradient for every parameter; AdamW against
//! candle-nn's; gradient accumulation; the write-back; refusals that name the field.

mod common;

use attend::layers::feed_forward::Activation;
use attend::models::gpt::{Gpt, GptConfig, GptInput, GptLayout};
use attend::models::gpt_trainer::{GptTrainer, IGNORE_INDEX};
use attend::ops::{cross_entropy, CrossEntropyConfig, Reduction};
use attend_kernels::adamw::AdamW;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use common::{assert_close, reseed, varmap_vars, Tol, F32_GRAD};

const V: usize = 37;
const B: usize = 3;
const T: usize = 12;

fn config(variant: usize) -> GptConfig {
    let base = GptConfig { n_layers: 2, ..GptConfig::gpt2(V, 16, 32, 2) };
    match variant {
        // GPT-2: fused c_attn, tied output, tanh GELU
        0 => base,
        // separate q/k/v, own output matrix, exact GELU, a feed-forward width that is not 4C
        _ => GptConfig {
            fused_qkv: false,
            tie_embeddings: false,
            activation: Activation::Gelu,
            d_ff: Some(40),
            n_layers: 3,
            ..base
        },
    }
}

fn model(cfg: &GptConfig, seed: u64) -> (Gpt, VarMap) {
    let vm = VarMap::new();
    let gpt = Gpt::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, seed, 0.3);
    (gpt, vm)
}

/// `(ids, targets)`, row-major `(B, T)`; a few targets ignored.
fn batch(seed: usize) -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = (0..B * T).map(|i| ((i * 17 + seed * 5 + i * i) % V) as u32).collect();
    let targets =
        (0..B * T).map(|i| if (i + seed) % 7 == 3 { IGNORE_INDEX } else { ((i * 11 + seed * 3) % V) as i64 }).collect();
    (ids, targets)
}

fn autograd_loss(gpt: &Gpt, ids: &[u32], targets: &[i64]) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::from_slice(ids, (B, T), &dev).unwrap();
    let logits = gpt.forward(&GptInput::new(&ids), None).unwrap(); // (B, T, V)
    let y = Tensor::from_slice(targets, B * T, &dev).unwrap();
    let cfg = CrossEntropyConfig { ignore_index: IGNORE_INDEX, ..Default::default() };
    let loss = cross_entropy(&logits.reshape((B * T, V)).unwrap(), &y, &cfg, Reduction::Mean).unwrap();
    (loss, logits)
}

fn as_tensor(vals: &[f32], like: &Var) -> Tensor {
    Tensor::from_slice(vals, like.as_tensor().dims(), &Device::Cpu).unwrap()
}

#[test]
fn the_fused_step_gives_autograds_loss_logits_and_every_gradient() {
    for variant in 0..2 {
        let cfg = config(variant);
        let (gpt, vm) = model(&cfg, 11 + variant as u64);
        let (ids, targets) = batch(variant);
        let mut trainer = GptTrainer::new(&cfg, &vm, B, T).unwrap();
        trainer.zero_grad();
        let loss = trainer.forward_backward(&ids, &targets).unwrap();
        let (want_loss, want_logits) = autograd_loss(&gpt, &ids, &targets);
        let label = format!("variant {variant}");
        let want = want_loss.to_scalar::<f32>().unwrap();
        assert!((loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{label}: loss {loss} vs autograd {want}");
        let logits = Tensor::from_slice(trainer.logits(), (B, T, V), &Device::Cpu).unwrap();
        assert_close(&format!("{label} logits"), &logits, &want_logits, Tol { atol: 2e-5, rtol: 1e-4 });
        let grads = want_loss.backward().unwrap();
        let vars = varmap_vars(&vm);
        assert_eq!(trainer.names().count(), vars.len(), "{label}: the name table covers every parameter");
        for (name, var) in &vars {
            let got = trainer.grad(name).unwrap_or_else(|| panic!("{label}: no slot for `{name}`"));
            assert!(got.iter().all(|g| g.is_finite()) && got.iter().any(|&g| g != 0.0), "{label}: `{name}` gradient");
            let want = grads.get(var.as_tensor()).unwrap();
            assert_close(&format!("{label} d{name}"), &as_tensor(got, var), want, F32_GRAD);
        }
    }
}

#[test]
fn adamw_matches_candle_nn_with_decay_on_matrices_only_over_two_steps() {
    let cfg = config(1);
    let (gpt, vm) = model(&cfg, 5);
    let mut trainer = GptTrainer::new(&cfg, &vm, B, T).unwrap();
    let hp = AdamW { lr: 0.01, weight_decay: 0.1, ..Default::default() };
    let vars = varmap_vars(&vm);
    let (matrices, vectors): (Vec<_>, Vec<_>) = vars.iter().map(|(_, v)| v.clone()).partition(|v| v.rank() >= 2);
    let params = |wd: f64| ParamsAdamW { lr: hp.lr, beta1: hp.beta1, beta2: hp.beta2, eps: hp.eps, weight_decay: wd };
    let mut opt_m = candle_nn::AdamW::new(matrices, params(hp.weight_decay)).unwrap();
    let mut opt_v = candle_nn::AdamW::new(vectors, params(0.0)).unwrap();
    for step in 0..2 {
        let (ids, targets) = batch(step);
        trainer.zero_grad();
        trainer.forward_backward(&ids, &targets).unwrap();
        trainer.step(&hp);
        let grads = autograd_loss(&gpt, &ids, &targets).0.backward().unwrap();
        opt_m.step(&grads).unwrap();
        opt_v.step(&grads).unwrap();
    }
    assert_eq!(trainer.steps(), 2);
    for (name, var) in &vars {
        // The key bias adds q·b_k to every score of a query row, which softmax cancels: its gradient is zero up
        // to rounding, and Adam turns either side's rounding noise into steps of ±lr.
        if name.ends_with("k_proj.bias") {
            continue;
        }
        let got = as_tensor(trainer.param(name).unwrap(), var);
        // 1% of a step (lr = 0.01): where a gradient is near zero, Adam's g/√v amplifies the two sides' rounding.
        assert_close(&format!("{name} after two steps"), &got, var.as_tensor(), Tol { atol: 1e-4, rtol: 1e-4 });
    }
}

#[test]
fn gradients_accumulate_over_micro_batches_and_write_to_hands_the_weights_back() {
    let cfg = config(0);
    let (gpt, vm) = model(&cfg, 8);
    let mut trainer = GptTrainer::new(&cfg, &vm, B, T).unwrap();
    let (a, b) = (batch(1), batch(2));
    let grad_of = |tr: &mut GptTrainer, batches: &[&(Vec<u32>, Vec<i64>)]| {
        tr.zero_grad();
        for (ids, targets) in batches {
            tr.forward_backward(ids, targets).unwrap();
        }
        tr.grad("layers.1.self_attn.qkv_proj.weight").unwrap().to_vec()
    };
    let (ga, gb, gab) = (grad_of(&mut trainer, &[&a]), grad_of(&mut trainer, &[&b]), grad_of(&mut trainer, &[&a, &b]));
    for i in 0..ga.len() {
        assert!(
            (gab[i] - (ga[i] + gb[i])).abs() <= 1e-6 + 1e-5 * gab[i].abs(),
            "element {i}: {} vs {}",
            gab[i],
            ga[i] + gb[i]
        );
    }
    // A few steps, then the autograd model sees the trained weights: the same loss as the trainer's forward.
    for _ in 0..3 {
        trainer.zero_grad();
        trainer.forward_backward(&a.0, &a.1).unwrap();
        trainer.step(&AdamW { lr: 0.01, ..Default::default() });
    }
    let trained = trainer.loss(&a.0, &a.1).unwrap();
    trainer.write_to(&vm).unwrap();
    let via_gpt = autograd_loss(&gpt, &a.0, &a.1).0.to_scalar::<f32>().unwrap();
    assert!((trained - via_gpt).abs() < 1e-5, "trainer {trained} vs Gpt after write_to {via_gpt}");
}

/// Same inputs, same bits: on one thread or three (the products, column sums, norm and attention reductions split
/// work by fixed sizes, never by thread count), and from one call to the next.
#[test]
fn the_step_is_bitwise_reproducible_across_thread_counts() {
    let cfg = config(0);
    let (_, vm) = model(&cfg, 9);
    // (8, 16): 128 rows, so the feed-forward products are large enough to be split over threads.
    let (b, t) = (8, 16);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 13 + i * i) % V) as u32).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 1) % V) as i64).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut tr = GptTrainer::new(&cfg, &vm, b, t).unwrap();
            tr.zero_grad();
            let loss = tr.forward_backward(&ids, &targets).unwrap();
            tr.step(&AdamW::default());
            let params: Vec<Vec<u32>> =
                tr.names().map(|n| tr.param(n).unwrap().iter().map(|x| x.to_bits()).collect()).collect();
            (loss.to_bits(), params)
        })
    };
    let one = run(1);
    assert!(one == run(1), "two runs on one thread differ");
    assert!(one == run(3), "one thread and three threads differ");
}

#[test]
fn a_fixed_batch_is_memorised() {
    let cfg = config(0);
    let (_, vm) = model(&cfg, 3);
    reseed(&vm, 3, 0.05);
    let mut trainer = GptTrainer::new(&cfg, &vm, B, T).unwrap();
    let (ids, targets) = batch(0);
    let first = trainer.loss(&ids, &targets).unwrap();
    let mut last = first;
    for _ in 0..60 {
        trainer.zero_grad();
        last = trainer.forward_backward(&ids, &targets).unwrap();
        trainer.step(&AdamW { lr: 0.01, weight_decay: 0.0, ..Default::default() });
    }
    assert!(last < 0.2 * first, "60 AdamW steps on one batch: loss {first} → {last}");
}

#[test]
fn unsupported_configs_and_bad_batches_are_refused_by_name() {
    let ok = config(0);
    let (_, vm) = model(&ok, 1);
    let cases: Vec<(GptConfig, &str)> = vec![
        (GptConfig { layout: GptLayout::Gpt1, ..ok.clone() }, "`layout`"),
        (GptConfig { dropout: 0.1, ..ok.clone() }, "`dropout`"),
        (GptConfig { attn_dropout: 0.1, ..ok.clone() }, "`attn_dropout`"),
        (GptConfig { share_layers: true, ..ok.clone() }, "`share_layers`"),
        (GptConfig { activation: Activation::Relu, ..ok.clone() }, "`activation`"),
        (GptConfig { n_heads: 4, ..ok.clone() }, "multiple of 16"),
        (GptConfig { n_layers: 3, ..ok.clone() }, "layers.2.self_attn_norm.weight"),
        (GptConfig { vocab_size: V + 1, ..ok.clone() }, "wte.weight"),
    ];
    for (cfg, needle) in cases {
        let err = GptTrainer::new(&cfg, &vm, B, T).err().unwrap_or_else(|| panic!("{needle}: accepted")).to_string();
        assert!(err.contains(needle), "error for {needle}: {err}");
    }
    assert!(GptTrainer::new(&ok, &vm, B, 17).unwrap_err().to_string().contains("n_positions = 16"));
    let mut trainer = GptTrainer::new(&ok, &vm, B, T).unwrap();
    let (mut ids, mut targets) = batch(0);
    assert!(trainer.forward_backward(&ids[1..], &targets).unwrap_err().to_string().contains("(B, T) = (3, 12)"));
    ids[5] = V as u32;
    assert!(trainer.forward_backward(&ids, &targets).unwrap_err().to_string().contains("ids[5] = 37"));
    ids[5] = 0;
    targets[7] = -1;
    assert!(trainer.forward_backward(&ids, &targets).unwrap_err().to_string().contains("targets[7] = -1"));
}
