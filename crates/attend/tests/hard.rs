//! Hard attention: top-k keeps the best keys, sampling follows the attention distribution, REINFORCE is an unbiased
//! estimate of the exact gradient (and the baseline lowers its variance), Gumbel-softmax straight-through.

mod common;

use attend::attention::classic::Normalizer;
use attend::attention::Mask;
use attend::layers::hard::{gumbel_softmax, reinforce, sample_attention, top_k_attention};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

#[test]
fn top_k_keeps_the_best_visible_keys() {
    let dev = Device::Cpu;
    let scores = randn(&[2, 3, 6], 1, DType::F64);
    let values = randn(&[2, 6, 4], 2, DType::F64);
    let mask = Mask::none().with_key_lengths(vec![6, 4]);
    let soft = attend::attention::classic::attend_scores(&scores, &values, &mask, Normalizer::Softmax).unwrap();
    let all = top_k_attention(&scores, &values, 6, &mask).unwrap();
    assert_close("k = S is the softmax", &all.weights, &soft.weights, F64);
    let one = top_k_attention(&scores, &values, 1, &mask).unwrap();
    let s: Vec<Vec<Vec<f64>>> = scores.to_vec3().unwrap();
    let w: Vec<Vec<Vec<f64>>> = one.weights.to_vec3().unwrap();
    for b in 0..2 {
        let len = [6, 4][b];
        for t in 0..3 {
            let best = (0..len).max_by(|&x, &y| s[b][t][x].total_cmp(&s[b][t][y])).unwrap();
            for j in 0..6 {
                assert_eq!(w[b][t][j], (j == best) as u8 as f64, "argmax attention at ({b}, {t}, {j})");
            }
        }
    }
    let ctx = one.context.get(0).unwrap().get(0).unwrap();
    let best = (0..6).max_by(|&x, &y| s[0][0][x].total_cmp(&s[0][0][y])).unwrap();
    assert_close("the chosen value", &ctx, &values.get(0).unwrap().get(best).unwrap(), F64);
    let _ = dev;
}

#[test]
fn samples_follow_the_attention_distribution() {
    let dev = Device::Cpu;
    let n = 40_000;
    let row = Tensor::new(&[0.5f64, -1.0, 1.5, 0.0, 2.0], &dev).unwrap();
    let scores = row.broadcast_as((1, n, 5)).unwrap().contiguous().unwrap();
    let values = Tensor::eye(5, DType::F64, &dev).unwrap().unsqueeze(0).unwrap(); // context = one-hot of the choice
    let mask = Mask::none().with_key_lengths(vec![4]); // the best score (key 4) is hidden
    let out = sample_attention(&scores, &values, &mask, 11).unwrap();
    let p: Vec<f64> = out.weights.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
    let freq: Vec<f64> = out.context.get(0).unwrap().mean(0).unwrap().to_vec1().unwrap();
    for j in 0..5 {
        let se = (p[j] * (1.0 - p[j]) / n as f64).sqrt();
        assert!((freq[j] - p[j]).abs() <= 5.0 * se + 1e-12, "key {j}: frequency {} vs probability {}", freq[j], p[j]);
    }
    assert_eq!(freq[4], 0.0, "a hidden key is never drawn");
    let lp: Vec<f64> = out.log_prob.get(0).unwrap().narrow(0, 0, 10).unwrap().to_vec1().unwrap();
    let ch: Vec<u32> = out.choice.get(0).unwrap().narrow(0, 0, 10).unwrap().to_vec1().unwrap();
    for (l, c) in lp.iter().zip(&ch) {
        assert!((l - p[*c as usize].ln()).abs() < 1e-12);
    }
}

#[test]
fn reinforce_is_unbiased_and_the_baseline_lowers_its_variance() {
    // E_{i ~ softmax(θ)}[r_i] has the exact gradient p_j (r_j − Σ p r).
    let dev = Device::Cpu;
    let n = 60_000;
    let theta = Var::from_tensor(&Tensor::new(&[0.3f64, -0.5, 0.8, 0.1], &dev).unwrap()).unwrap();
    let r = [1.0f64, 0.0, 2.0, -1.0];
    let p: Vec<f64> = attend::ops::softmax(theta.as_tensor(), None).unwrap().to_vec1().unwrap();
    let mean_r: f64 = p.iter().zip(&r).map(|(a, b)| a * b).sum();
    let exact: Vec<f64> = (0..4).map(|j| p[j] * (r[j] - mean_r)).collect();
    let scores = theta.as_tensor().reshape((1, 1, 4)).unwrap().broadcast_as((n, 1, 4)).unwrap();
    let values = Tensor::zeros((n, 4, 1), DType::F64, &dev).unwrap();
    let draw = sample_attention(&scores, &values, &Mask::none(), 5).unwrap();
    let choice: Vec<u32> = draw.choice.flatten_all().unwrap().to_vec1().unwrap();
    let reward = Tensor::from_vec(choice.iter().map(|&c| r[c as usize]).collect::<Vec<_>>(), n, &dev).unwrap();
    for b in [0.0, mean_r] {
        let baseline = Tensor::full(b, n, &dev).unwrap();
        let loss = reinforce(&draw.log_prob, &reward, &baseline).unwrap();
        let g = loss.policy.backward().unwrap();
        let est: Vec<f64> = g.get(theta.as_tensor()).unwrap().neg().unwrap().to_vec1().unwrap();
        // Per-sample estimates (R − b)(e_i − p), to bound the error by their standard error.
        for j in 0..4 {
            let samples: Vec<f64> =
                choice.iter().map(|&c| (r[c as usize] - b) * ((c as usize == j) as u8 as f64 - p[j])).collect();
            let mean = samples.iter().sum::<f64>() / n as f64;
            let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!((mean - est[j]).abs() < 1e-9, "the loss's gradient is the sample mean");
            let se = (var / n as f64).sqrt();
            assert!(
                (est[j] - exact[j]).abs() < 5.0 * se,
                "b = {b}, θ_{j}: estimate {} vs exact {} (se {se})",
                est[j],
                exact[j]
            );
        }
    }
    // Variance of the whole estimate, without and with the baseline.
    let variance = |b: f64| -> f64 {
        choice
            .iter()
            .map(|&c| {
                (0..4).map(|j| ((r[c as usize] - b) * ((c as usize == j) as u8 as f64 - p[j])).powi(2)).sum::<f64>()
            })
            .sum::<f64>()
            / n as f64
    };
    assert!(variance(mean_r) < variance(0.0), "baseline {} vs none {}", variance(mean_r), variance(0.0));
    // The learned baseline moves towards the mean reward.
    let bv = Var::from_tensor(&Tensor::zeros(n, DType::F64, &dev).unwrap()).unwrap();
    let g = reinforce(&draw.log_prob, &reward, bv.as_tensor()).unwrap().baseline.backward().unwrap();
    let step: f64 = g.get(bv.as_tensor()).unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(step < 0.0, "gradient descent raises a zero baseline towards E[R] = {mean_r}");
}

#[test]
fn gumbel_softmax_straight_through() {
    let dev = Device::Cpu;
    let n = 40_000;
    let logits = Var::from_tensor(
        &Tensor::new(&[1.0f64, 0.0, 2.0], &dev).unwrap().broadcast_as((n, 3)).unwrap().contiguous().unwrap(),
    )
    .unwrap();
    let hard = gumbel_softmax(logits.as_tensor(), 0.7, true, 3).unwrap();
    let soft = gumbel_softmax(logits.as_tensor(), 0.7, false, 3).unwrap();
    let h: Vec<Vec<f64>> = hard.narrow(0, 0, 50).unwrap().to_vec2().unwrap();
    assert!(
        h.iter().all(|r| r.iter().filter(|&&x| x == 1.0).count() == 1 && r.iter().sum::<f64>() == 1.0),
        "one-hot forward"
    );
    let w = randn(&[n, 3], 9, DType::F64);
    let gh = weighted_sum(&hard, &w).backward().unwrap().get(logits.as_tensor()).unwrap().clone();
    let gs = weighted_sum(&soft, &w).backward().unwrap().get(logits.as_tensor()).unwrap().clone();
    assert_close("straight-through gradient", &gh, &gs, F64);
    // Gumbel-max: the argmax follows softmax(logits).
    let p: Vec<f64> =
        attend::ops::softmax(&Tensor::new(&[1.0f64, 0.0, 2.0], &dev).unwrap(), None).unwrap().to_vec1().unwrap();
    let freq: Vec<f64> = hard.mean(0).unwrap().to_vec1().unwrap();
    for j in 0..3 {
        let se = (p[j] * (1.0 - p[j]) / n as f64).sqrt();
        assert!((freq[j] - p[j]).abs() < 5.0 * se, "class {j}: {} vs {}", freq[j], p[j]);
    }
}

#[test]
fn glimpse_sensor_reads_a_retina() {
    use attend::models::ram::GlimpseSensor;
    let dev = Device::Cpu;
    // An 8 × 8 image whose pixel (y, x) holds 8y + x.
    let img = Tensor::arange(0f32, 64., &dev).unwrap().reshape((1, 1, 8, 8)).unwrap();
    let sensor = GlimpseSensor { patch: 2, scales: 2 };
    let g: Vec<f32> = sensor.read(&img, &[[0.0, 0.0]]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // Centre (4, 4): the 2 × 2 patch rows 3..5, cols 3..5; the 4 × 4 patch rows 2..6 pooled by 2.
    assert_eq!(&g[..4], &[27.0, 28.0, 35.0, 36.0]);
    let pooled = |y: f32, x: f32| (8.0 * y + x) + 4.5; // mean of a 2 × 2 block at (y, x)
    assert_eq!(&g[4..], &[pooled(2.0, 2.0), pooled(2.0, 4.0), pooled(4.0, 2.0), pooled(4.0, 4.0)]);
    // At the top-left corner the retina reads zeros outside the image.
    let corner: Vec<f32> = sensor.read(&img, &[[-1.0, -1.0]]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&corner[..4], &[0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn recurrent_attention_model_trains_every_part() {
    use attend::models::ram::{Ram, RamConfig};
    use candle_nn::{VarBuilder, VarMap};
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = RamConfig {
        patch: 4,
        scales: 2,
        glimpses: 4,
        classes: 3,
        glimpse_hidden: 8,
        location_hidden: 8,
        hidden: 16,
        ..RamConfig::default()
    };
    let ram = Ram::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    reseed(&vm, 9, 0.5);
    ram.set_training(true);
    let images = randn(&[6, 1, 12, 12], 77, DType::F32);
    let out = ram.forward(&images, 1).unwrap();
    assert_eq!(out.log_probs.dims(), &[6, 3]);
    let locs: Vec<f32> = out.locations.flatten_all().unwrap().to_vec1().unwrap();
    assert!(locs.iter().all(|l| (-1.0..=1.0).contains(l)));
    // Rewards of 0 and 1 in one batch, so the advantage is not zero everywhere.
    let labels = out.logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let mixed: Vec<u32> = labels.iter().enumerate().map(|(i, &l)| if i % 2 == 0 { l } else { (l + 1) % 3 }).collect();
    let loss = out.loss(&Tensor::new(mixed, &dev).unwrap()).unwrap();
    assert!((loss.accuracy - 0.5).abs() < 1e-9);
    assert_all_grads_finite_nonzero("ram", &varmap_vars(&vm), &loss.total.backward().unwrap());
    // Same seed, same glimpses; evaluation follows the policy's mean deterministically.
    let again = ram.forward(&images, 1).unwrap();
    assert_close("reproducible", &again.locations, &out.locations, F32);
    ram.set_training(false);
    let (e1, e2) = (ram.forward(&images, 1).unwrap(), ram.forward(&images, 1).unwrap());
    assert_close("evaluation", &e1.logits, &e2.logits, F32);
}
