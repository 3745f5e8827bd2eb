//! Cross-entropy loss from logits, as PyTorch defines it (ignore index, label smoothing, mean/sum/none).
//!
//! Mean reduction divides by the number of rows whose target is not ignored; when every target is ignored the mean
//! is 0 with zero gradient (PyTorch returns NaN there, which would poison a training run).
//!
//! # Shapes
//! `logits`: `(…, V)`; `targets`: `(…)` integer class ids (u8/u32/i64); output: a scalar, or `(…)` for
//! [`Reduction::None`].

use attend_kernels::cross_entropy::{
    cross_entropy_backward, cross_entropy_forward, find_bad_target, CrossEntropyConfig,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, KernelFloat};
use super::log_softmax_reference;
use crate::{bail, ensure, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    #[default]
    Mean,
    Sum,
    None,
}

struct CrossEntropy(CrossEntropyConfig);
struct CrossEntropyBackward(CrossEntropyConfig);

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [i64]> {
    match s {
        CpuStorage::I64(t) => contiguous(t, l, "cross_entropy targets"),
        other => candle_core::bail!("cross_entropy: targets must be i64 here, got {:?}", other.dtype()),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "attend-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), "cross_entropy", |T| {
            let logits = contiguous(T::slice(s1)?, l1, "cross_entropy logits")?;
            let targets = targets_of(s2, l2)?;
            let v = l1.dims()[1];
            let mut loss = vec![0 as T; targets.len()];
            cross_entropy_forward(logits, targets, v, &self.0, &mut loss);
            Ok((T::storage(loss), Shape::from(targets.len())))
        })
    }
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.apply_op3(targets, &dloss.contiguous()?, CrossEntropyBackward(self.0))?;
        Ok((Some(d), None))
    }
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "attend-cross-entropy-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), "cross_entropy backward", |T| {
            let logits = contiguous(T::slice(s1)?, l1, "cross_entropy logits")?;
            let targets = targets_of(s2, l2)?;
            let dloss = contiguous(T::slice(s3)?, l3, "cross_entropy loss gradient")?;
            let mut d = vec![0 as T; logits.len()];
            cross_entropy_backward(logits, targets, l1.dims()[1], &self.0, dloss, &mut d);
            Ok((T::storage(d), l1.shape().clone()))
        })
    }
}

/// Validates shapes and targets; returns `(logits as (N, V), targets as i64 (N), number of counted rows)`.
fn prepare(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
) -> Result<(Tensor, Tensor, usize)> {
    ensure!(
        logits.rank() >= 1 && logits.elem_count() > 0,
        op,
        "logits must be non-empty (…, V), got {:?}",
        logits.dims()
    );
    let v = logits.dim(logits.rank() - 1)?;
    ensure!(
        targets.dims() == &logits.dims()[..logits.rank() - 1],
        op,
        "targets of shape {:?} do not match logits of shape {:?} (expected {:?})",
        targets.dims(),
        logits.dims(),
        &logits.dims()[..logits.rank() - 1]
    );
    ensure!(
        matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64),
        op,
        "targets must be integer class ids (u8/u32/i64), got {:?}",
        targets.dtype()
    );
    ensure!(
        (0.0..=1.0).contains(&cfg.label_smoothing),
        op,
        "label_smoothing must be in [0, 1], got {}",
        cfg.label_smoothing
    );
    let t = targets.to_dtype(DType::I64)?.flatten_all()?;
    let tv: Vec<i64> = t.to_vec1()?;
    if let Some((row, bad)) = find_bad_target(&tv, v, cfg) {
        bail!(
            op,
            "target {bad} at flat position {row} is outside 0..{v} and is not the ignore index {}",
            cfg.ignore_index
        );
    }
    let counted = tv.iter().filter(|&&x| x != cfg.ignore_index).count();
    Ok((logits.reshape(((), v))?, t, counted))
}

fn reduce(losses: Tensor, targets: &Tensor, counted: usize, reduction: Reduction) -> Result<Tensor> {
    Ok(match reduction {
        Reduction::Sum => losses.sum_all()?,
        Reduction::Mean => (losses.sum_all()? / counted.max(1) as f64)?,
        Reduction::None => losses.reshape(targets.shape())?,
    })
}

/// Fused cross-entropy (see the module docs).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    reduction: Reduction,
) -> Result<Tensor> {
    let (l2, t, counted) = prepare("cross_entropy", logits, targets, cfg)?;
    let losses = in_kernel_dtype(&l2, "cross_entropy", |l| Ok(l.contiguous()?.apply_op2(&t, CrossEntropy(*cfg))?))?;
    reduce(losses, targets, counted, reduction)
}

/// [`cross_entropy`] composed from plain candle ops.
pub fn cross_entropy_reference(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    reduction: Reduction,
) -> Result<Tensor> {
    let (l2, t, counted) = prepare("cross_entropy_reference", logits, targets, cfg)?;
    let v = l2.dim(1)?;
    let logp = log_softmax_reference(&l2)?; // (N, V)
    let valid = t.ne(cfg.ignore_index)?; // (N)
                                         // Ignored rows gather class 0 and are then zeroed, so no index is out of range.
    let safe = valid.where_cond(&t, &t.zeros_like()?)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?; // (N)
    let eps = cfg.label_smoothing;
    let mut loss = (picked.neg()? * (1.0 - eps))?;
    if eps != 0.0 {
        loss = (loss - (logp.sum(1)? * (eps / v as f64))?)?;
    }
    let losses = (loss * valid.to_dtype(l2.dtype())?)?;
    reduce(losses, targets, counted, reduction)
}
