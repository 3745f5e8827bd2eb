//! Living beside candle: `?` converts errors both ways, layers are candle `Module`s where their signature fits, and
//! candle's matmul runs its AVX-512 kernels (gemm's `x86-v4` feature, which the workspace turns on).

use attend::attention::{Mask, MhaOptions, MultiHeadAttention, MultiHeadAttentionConfig};
use attend::ops;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// A model author's code on candle's `Result`, calling attend with `?`.
fn candle_side(x: &Tensor) -> candle_core::Result<Tensor> {
    let y = ops::softmax(x, None)?; // attend::Error → candle_core::Error
    y.sum_all()
}

/// Library-style code on attend's `Result`, calling candle with `?`.
fn attend_side(x: &Tensor) -> attend::Result<Tensor> {
    let y = x.matmul(&x.t()?)?; // candle_core::Error → attend::Error
    ops::log_softmax(&y)
}

#[test]
fn errors_convert_both_ways_and_keep_their_message() {
    let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!((candle_side(&x).unwrap().to_scalar::<f32>().unwrap() - 2.0).abs() < 1e-6);
    assert_eq!(attend_side(&x).unwrap().dims(), &[2, 2]);
    // An attend error surfaces through candle's Result with its one-line message.
    let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
    let msg = candle_side(&empty).unwrap_err().to_string();
    assert!(msg.contains("softmax") && msg.contains("[0, 3]"), "{msg}");
    // A candle error through attend's Result is candle's own (not double-wrapped) when it goes back.
    let bad = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(); // rank 1: candle's transpose refuses it
    let e: candle_core::Error = attend_side(&bad).unwrap_err().into();
    assert!(!matches!(e, candle_core::Error::Wrapped(_)), "candle errors come back unwrapped: {e:?}");
}

#[test]
fn multi_head_attention_is_a_candle_module_in_its_own_mode() {
    let vm = VarMap::new();
    let cfg = MultiHeadAttentionConfig { dropout: 0.5, ..MultiHeadAttentionConfig::new(8, 2) };
    let mha = MultiHeadAttention::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
    let via_module = Module::forward(&mha, &x).unwrap();
    let direct = mha.forward(&x, None, &Mask::none(), None, &MhaOptions::default()).unwrap().out;
    let diff = (&via_module - &direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "Module::forward is unmasked self-attention in evaluation mode");
    mha.set_training(true);
    let dropped = Module::forward(&mha, &x).unwrap();
    let diff = (&dropped - &direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 1e-3, "in training mode the layer's dropout applies through Module::forward too");
}

/// `gemm_common::simd::Avx512f` exists only when gemm's `x86-v4` feature is on: if the feature ever drops out of
/// the dependency graph (it is turned on by feature unification alone), this file stops compiling. At run time, on
/// a CPU with AVX-512, gemm's dispatcher then picks those kernels for candle's f32 matmul.
#[cfg(target_arch = "x86_64")]
#[test]
fn candle_matmul_has_its_avx512_kernels_compiled_in() {
    let name = std::any::type_name::<gemm_common::simd::Avx512f>();
    assert!(name.ends_with("Avx512f"), "{name}");
}

#[test]
fn positional_encodings_and_han_scores_are_modules() {
    use attend::attention::score::{HanContextScore, HanContextScoreConfig};
    use attend::position::learned::LearnedPositions;
    use attend::position::sinusoidal::SinusoidalEncoding;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
    let same = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let sin = SinusoidalEncoding::new(8).unwrap();
    assert_eq!(same(&Module::forward(&sin, &x).unwrap(), &sin.forward(&x, 0).unwrap()), 0.0);
    let learned = LearnedPositions::new(16, 8, vb.pp("pos")).unwrap();
    assert_eq!(same(&Module::forward(&learned, &x).unwrap(), &learned.forward(&x, 0).unwrap()), 0.0);
    let han = HanContextScore::new(&HanContextScoreConfig { input_dim: 8, attn_dim: 4 }, vb.pp("han")).unwrap();
    assert_eq!(same(&Module::forward(&han, &x).unwrap(), &han.forward(&x).unwrap()), 0.0);
}
