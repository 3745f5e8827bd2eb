//! The training utilities: AdamW over variables against candle-nn's (decay on matrices only), clipping against its
//! definition, seeded initialisation, and checkpoints: a run resumed from one continues bit for bit; another
//! architecture, a newer format or a missing tensor is refused by name; old checkpoints are pruned.

mod common;

use attend::checkpoint::training::{self, TrainingState, FORMAT_VERSION};
use attend::train::init::seeded_var_builder;
use attend::train::optim::AdamW;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer, ParamsAdamW, VarMap};
use common::{assert_close, varmap_vars, Tol};

fn mlp(seed: u64) -> (VarMap, impl Fn(&Tensor) -> Tensor) {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let (a, b) = (candle_nn::linear(4, 8, vb.pp("a")).unwrap(), candle_nn::linear(8, 2, vb.pp("b")).unwrap());
    (vm, move |x: &Tensor| b.forward(&a.forward(x).unwrap().tanh().unwrap()).unwrap())
}

fn loss_at(f: &impl Fn(&Tensor) -> Tensor, step: u64) -> Tensor {
    let x = attend::rng::sample::normal(100 + step, (16, 4), DType::F32, &Device::Cpu).unwrap();
    f(&x).sqr().unwrap().mean_all().unwrap()
}

fn hyper() -> attend_kernels::adamw::AdamW {
    attend_kernels::adamw::AdamW { lr: 0.05, weight_decay: 0.1, ..Default::default() }
}

#[test]
fn adamw_matches_candle_nn_with_decay_on_matrices_only() {
    let (vm, f) = mlp(1);
    let (vm2, f2) = mlp(1);
    let mut ours = AdamW::new(&vm, hyper()).unwrap();
    let (mats, vecs): (Vec<_>, Vec<_>) = varmap_vars(&vm2).into_iter().map(|(_, v)| v).partition(|v| v.rank() >= 2);
    let p = |wd| ParamsAdamW { lr: 0.05, weight_decay: wd, ..Default::default() };
    let (mut om, mut ov) = (candle_nn::AdamW::new(mats, p(0.1)).unwrap(), candle_nn::AdamW::new(vecs, p(0.0)).unwrap());
    for step in 0..4 {
        ours.step(&loss_at(&f, step).backward().unwrap(), 0.05, None).unwrap();
        let g = loss_at(&f2, step).backward().unwrap();
        om.step(&g).unwrap();
        ov.step(&g).unwrap();
    }
    for ((name, a), (_, b)) in varmap_vars(&vm).iter().zip(varmap_vars(&vm2).iter()) {
        assert_close(name, a.as_tensor(), b.as_tensor(), Tol { atol: 1e-6, rtol: 1e-5 });
    }
}

#[test]
fn clipping_scales_the_gradients_to_the_global_norm() {
    // With a tiny rate, AdamW's first step is lr·sign-ish; compare through a clipped and an unclipped copy whose
    // gradients differ only by the clip factor: the moments of the clipped run are the scaled ones.
    let (vm, f) = mlp(2);
    let grads = loss_at(&f, 0).backward().unwrap();
    let norm: f64 = varmap_vars(&vm)
        .iter()
        .map(|(_, v)| {
            grads.get(v.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
        })
        .sum::<f64>()
        .sqrt();
    let mut opt = AdamW::new(&vm, hyper()).unwrap();
    let reported = opt.step(&grads, 0.0, Some(norm / 4.0)).unwrap();
    assert!((reported - norm).abs() < 1e-6 * norm, "norm {reported} vs {norm}");
    let state = opt.state().unwrap();
    for (name, v) in varmap_vars(&vm) {
        let g = grads.get(v.as_tensor()).unwrap();
        let want = (g * (0.1 * (norm / 4.0) / (norm + 1e-6))).unwrap(); // m = (1 − β₁)·scale·g
        assert_close(
            &format!("{name}.exp_avg"),
            &state[&format!("{name}.exp_avg")],
            &want,
            Tol { atol: 1e-7, rtol: 1e-5 },
        );
    }
}

fn state(step: u64, arch: &str) -> TrainingState {
    TrainingState {
        format_version: FORMAT_VERSION,
        architecture: arch.into(),
        config: serde_json::json!({"hidden": 8}),
        step,
        data_position: step,
        seed: 1,
        metrics: serde_json::json!({"loss": 0.5}),
    }
}

#[test]
fn a_run_resumed_from_a_checkpoint_continues_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("attend-train-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |from: Option<&std::path::Path>, steps: std::ops::Range<u64>, save_at: Option<u64>| {
        let (vm, f) = mlp(3);
        let mut opt = AdamW::new(&vm, hyper()).unwrap();
        if let Some(p) = from {
            let st = training::load(p, "mlp", &vm, &mut opt).unwrap();
            assert_eq!(st.step, steps.start);
        }
        let mut losses = vec![];
        for step in steps {
            let loss = loss_at(&f, step);
            losses.push(loss.to_scalar::<f32>().unwrap().to_bits());
            opt.step(&loss.backward().unwrap(), 0.05, Some(1.0)).unwrap();
            if Some(step + 1) == save_at {
                training::save(&dir, &vm, &opt, &state(step + 1, "mlp"), 2).unwrap();
            }
        }
        losses
    };
    let straight = run(None, 0..8, Some(5));
    let ckpt = training::latest(&dir).unwrap().expect("a checkpoint");
    let resumed = run(Some(&ckpt), 5..8, None);
    assert_eq!(&straight[5..], &resumed[..], "losses after resuming differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_are_pruned_and_foreign_or_newer_ones_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("attend-train-refuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (vm, _) = mlp(4);
    let mut opt = AdamW::new(&vm, hyper()).unwrap();
    for s in [10, 20, 30] {
        training::save(&dir, &vm, &opt, &state(s, "mlp"), 2).unwrap();
    }
    std::fs::create_dir(dir.join(".tmp-step-40-1")).unwrap(); // a write that was killed: ignored
    let steps: Vec<u64> = training::list(&dir).unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![20, 30]);
    let last = training::latest(&dir).unwrap().unwrap();
    let e = training::load(&last, "gpt", &vm, &mut opt).unwrap_err().to_string();
    assert!(e.contains("holds a `mlp` model; this run trains `gpt`") && e.contains("state.json"), "{e}");
    let newer = serde_json::json!({"format_version": FORMAT_VERSION + 1, "architecture": "mlp"});
    std::fs::write(last.join("state.json"), newer.to_string()).unwrap();
    let e = training::load(&last, "mlp", &vm, &mut opt).unwrap_err().to_string();
    assert!(e.contains("newer attend"), "{e}");
    let (other, _) = {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 1, DType::F32, &Device::Cpu);
        (vm.clone(), candle_nn::linear(4, 3, vb.pp("c")).unwrap())
    };
    let first = training::list(&dir).unwrap()[0].1.clone();
    let mut opt2 = AdamW::new(&other, hyper()).unwrap();
    let e = training::load(&first, "mlp", &other, &mut opt2).unwrap_err().to_string();
    assert!(e.contains("c.weight") || e.contains("c.bias"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
