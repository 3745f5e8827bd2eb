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
