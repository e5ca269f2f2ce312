//! Host tensors in the three dtypes the backends accept.
//!
//! Backends compute in f32 (f64 for the oracle) whatever comes in; the dtype only decides how
//! values are read and how the output is rounded on the way out.

use half::{bf16, f16};

/// Element type of q, k, v and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Lowercase name, as printed in errors and reports.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A borrowed host tensor (flat, row-major).
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
}

impl<'a> TensorRef<'a> {
    /// Its dtype.
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::F16(_) => DType::F16,
            TensorRef::BF16(_) => DType::BF16,
        }
    }

    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(x) => x.len(),
            TensorRef::F16(x) => x.len(),
            TensorRef::BF16(x) => x.len(),
        }
    }

    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            TensorRef::F32(x) => x[i],
            TensorRef::F16(x) => x[i].to_f32(),
            TensorRef::BF16(x) => x[i].to_f32(),
        }
    }

    /// Copies `out.len()` elements starting at `start` into `out`, widened to f32.
    #[inline]
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            TensorRef::F32(x) => out.copy_from_slice(&x[start..end]),
            TensorRef::F16(x) => out
                .iter_mut()
                .zip(&x[start..end])
                .for_each(|(o, v)| *o = v.to_f32()),
            TensorRef::BF16(x) => out
                .iter_mut()
                .zip(&x[start..end])
                .for_each(|(o, v)| *o = v.to_f32()),
        }
    }

    /// The whole tensor widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_f32(0, &mut out);
        out
    }

    /// First non-finite element, if any: `(index, value)`.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        match self {
            TensorRef::F32(x) => x.iter().position(|v| !v.is_finite()).map(|i| (i, x[i])),
            TensorRef::F16(x) => x
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| (i, x[i].to_f32())),
            TensorRef::BF16(x) => x
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| (i, x[i].to_f32())),
        }
    }
}

impl<'a> From<&'a [f32]> for TensorRef<'a> {
    fn from(x: &'a [f32]) -> Self {
        TensorRef::F32(x)
    }
}
impl<'a> From<&'a [f16]> for TensorRef<'a> {
    fn from(x: &'a [f16]) -> Self {
        TensorRef::F16(x)
    }
}
impl<'a> From<&'a [bf16]> for TensorRef<'a> {
    fn from(x: &'a [bf16]) -> Self {
        TensorRef::BF16(x)
    }
}
impl<'a> From<&'a Vec<f32>> for TensorRef<'a> {
    fn from(x: &'a Vec<f32>) -> Self {
        TensorRef::F32(x)
    }
}
impl<'a> From<&'a Vec<f16>> for TensorRef<'a> {
    fn from(x: &'a Vec<f16>) -> Self {
        TensorRef::F16(x)
    }
}
impl<'a> From<&'a Vec<bf16>> for TensorRef<'a> {
    fn from(x: &'a Vec<bf16>) -> Self {
        TensorRef::BF16(x)
    }
}

/// An owned host tensor (flat, row-major), what backends return.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

impl HostTensor {
    /// Rounds f32 values into `dtype`.
    pub fn from_f32(values: Vec<f32>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => HostTensor::F32(values),
            DType::F16 => HostTensor::F16(values.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => HostTensor::BF16(values.into_iter().map(bf16::from_f32).collect()),
        }
    }

    /// Borrow it.
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            HostTensor::F32(x) => TensorRef::F32(x),
            HostTensor::F16(x) => TensorRef::F16(x),
            HostTensor::BF16(x) => TensorRef::BF16(x),
        }
    }

    /// Its dtype.
    pub fn dtype(&self) -> DType {
        self.as_ref().dtype()
    }

    /// Element count.
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.as_ref().to_f32_vec()
    }
}
