//! Glue between candle custom ops and the slice kernels: dtype dispatch, contiguous views, broadcast row offsets.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};

use crate::{Error, Result};

/// A float dtype the kernels run in: `f32` or `f64`.
pub(crate) trait KernelFloat: attend_kernels::Real + candle_core::WithDType {
    fn slice(s: &CpuStorage) -> candle_core::Result<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! kernel_float {
    ($t:ty, $variant:ident) => {
        impl KernelFloat for $t {
            fn slice(s: &CpuStorage) -> candle_core::Result<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Ok(v),
                    other => Err(candle_core::Error::Msg(format!(
                        "fused op: expected {:?} storage, got {:?}",
                        <$t as candle_core::WithDType>::DTYPE,
                        other.dtype()
                    ))),
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
kernel_float!(f32, F32);
kernel_float!(f64, F64);

/// The contiguous elements a layout describes.
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => {
            Err(candle_core::Error::Msg(format!("fused op: {what} must be contiguous, got strides {:?}", l.stride())))
        }
    }
}

/// Offset of the first element of every row (all axes but the last) and the stride along the last axis; makes
/// broadcast (stride-0) operands readable without materialising them.
pub(crate) fn row_offsets(l: &Layout) -> (Vec<usize>, usize) {
    let dims = l.dims();
    let stride = l.stride();
    let rank = dims.len();
    if rank == 0 {
        return (vec![l.start_offset()], 0);
    }
    let rows: usize = dims[..rank - 1].iter().product();
    let mut offsets = Vec::with_capacity(rows);
    let mut idx = vec![0usize; rank - 1];
    for _ in 0..rows {
        offsets.push(l.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>());
        for a in (0..rank - 1).rev() {
            idx[a] += 1;
            if idx[a] < dims[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    (offsets, stride[rank - 1])
}

/// Run `f` in a kernel dtype: f32/f64 as they are, bf16/f16 through f32 (the conversions are differentiable).
pub(crate) fn in_kernel_dtype(
    x: &Tensor,
    op: &'static str,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => f(x),
        DType::BF16 | DType::F16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()).map_err(Error::from),
        dt => Err(Error::invalid(op, format!("unsupported dtype {dt:?} for tensor of shape {:?}", x.dims()))),
    }
}

/// Run a generic kernel body for the storage's float dtype.
macro_rules! dispatch_float {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            dt => Err(candle_core::Error::Msg(format!("{}: unsupported dtype {:?}", $op, dt))),
        }
    };
}
pub(crate) use dispatch_float;

/// A kernel `f(a, b, out, row_len)` over two same-shaped contiguous float tensors, as a candle op without backward
/// of its own: the shape every backward pass here has (`dx` from a saved tensor and `dy`).
pub(crate) struct Binary {
    pub name: &'static str,
    pub f32: fn(&[f32], &[f32], &mut [f32], usize),
    pub f64: fn(&[f64], &[f64], &mut [f64], usize),
}

impl Binary {
    fn run<T: KernelFloat>(
        &self,
        f: fn(&[T], &[T], &mut [T], usize),
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let a = contiguous(T::slice(s1)?, l1, self.name)?;
        let b = contiguous(T::slice(s2)?, l2, self.name)?;
        if a.len() != b.len() {
            candle_core::bail!("{}: operands of shapes {:?} and {:?}", self.name, l1.dims(), l2.dims());
        }
        let mut out = vec![T::default(); a.len()];
        f(a, b, &mut out, l1.dims().last().copied().unwrap_or(1));
        Ok((T::storage(out), l1.shape().clone()))
    }

    /// `a.apply_op2(b, self)` with `b` made contiguous.
    pub fn apply(self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        a.apply_op2(&b.contiguous()?, self)
    }
}

impl candle_core::CustomOp2 for Binary {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        match s1.dtype() {
            DType::F32 => self.run(self.f32, s1, l1, s2, l2),
            DType::F64 => self.run(self.f64, s1, l1, s2, l2),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name),
        }
    }
}
