//! [`CudaBackend`]: the core [`Backend`] trait on one GPU (host tensors in and out, for
//! agreement tests and simple use), plus the device-resident API (`CudaSlice` in and out on a
//! stream you give, no host round trip) for real use.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use flexprefill_core::{
    check_index_matches, AttentionInput, AttentionOutput, Backend, BlockIndex, DType,
    FlexPrefillConfig, ForcedBlocks, HeadStatistics, HostTensor, TensorRef,
};

use crate::attention::{
    launch_attention, AttentionArgs, AttnTile, DeviceBlockIndex, DeviceElem, DeviceSeqs,
};
use crate::device::{driver_present, CudaDevice};
use crate::error::{CudaError, Result};

/// FlexPrefill on an NVIDIA GPU.
///
/// Host API ([`Backend`]): inputs are uploaded, the result downloaded, every call synchronous.
/// bf16 and f16 inputs run as they are; **f32 inputs are rounded to bf16 on upload** (the
/// kernels are tensor-core kernels with 16-bit operands) and the f32 output holds bf16-accurate
/// values: compare it with bf16 tolerances.
///
/// Device API ([`CudaBackend::attention_device`]): buffers already on the GPU, launches queued
/// on the caller's stream, nothing synchronises.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    device: Arc<CudaDevice>,
}

impl CudaBackend {
    /// The backend on device 0. Without an NVIDIA driver this returns
    /// [`CudaError::NoDriver`] (it never panics).
    pub fn new() -> Result<Self> {
        Self::new_on(0)
    }

    /// The backend on device `ordinal`.
    pub fn new_on(ordinal: usize) -> Result<Self> {
        driver_present()?;
        Ok(Self {
            device: CudaDevice::new(ordinal)?,
        })
    }

    /// The device (context, stream, kernel registry).
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The stream the host API runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.device.stream()
    }

    /// Attention on device buffers: over `index`'s blocks, or dense causal when `index` is
    /// `None`. Queued on `stream` (which must belong to this backend's context); writes every
    /// element of `out` and of `lse` when given. `tile` overrides the tile shape (benches).
    pub fn attention_device<T: DeviceElem>(
        &self,
        stream: &CudaStream,
        args: &AttentionArgs<'_, T>,
        index: Option<&DeviceBlockIndex>,
        tile: Option<AttnTile>,
        out: &mut CudaSlice<T>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        if stream.context().cu_ctx() != self.device.context().cu_ctx() {
            return Err(CudaError::Unsupported {
                op: "attention",
                message: "the stream belongs to another CUDA context".into(),
            });
        }
        launch_attention(&self.device, stream, args, index, tile, out, lse)
    }

    /// Host attention: uploads, runs, downloads.
    fn attention_host(
        &self,
        x: &AttentionInput<'_>,
        index: Option<&BlockIndex>,
    ) -> Result<AttentionOutput> {
        x.validate()?;
        match (x.q, x.k, x.v) {
            (TensorRef::BF16(q), TensorRef::BF16(k), TensorRef::BF16(v)) => {
                self.attention_host_typed(x, q, k, v, index, DType::BF16)
            }
            (TensorRef::F16(q), TensorRef::F16(k), TensorRef::F16(v)) => {
                self.attention_host_typed(x, q, k, v, index, DType::F16)
            }
            (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v)) => {
                let cv = |t: &[f32]| {
                    t.iter()
                        .map(|&a| half::bf16::from_f32(a))
                        .collect::<Vec<_>>()
                };
                self.attention_host_typed(x, &cv(q), &cv(k), &cv(v), index, DType::F32)
            }
            // `validate` rejects mixed dtypes.
            _ => Err(flexprefill_core::Error::DType {
                q: x.q.dtype().name(),
                k: x.k.dtype().name(),
                v: x.v.dtype().name(),
            }
            .into()),
        }
    }

    fn attention_host_typed<T: DeviceElem>(
        &self,
        x: &AttentionInput<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        index: Option<&BlockIndex>,
        out_dtype: DType,
    ) -> Result<AttentionOutput> {
        let stream = self.device.stream();
        let seqs = DeviceSeqs::new(stream, &x.seqs)?;
        let (qd, kd, vd) = (
            stream.clone_htod(q)?,
            stream.clone_htod(k)?,
            stream.clone_htod(v)?,
        );
        let dindex = match index {
            Some(i) => {
                // The kernel trusts sorted, causal columns; check them on the host first.
                i.validate(ForcedBlocks {
                    sink: false,
                    diagonal: false,
                })?;
                Some(DeviceBlockIndex::upload(stream, i)?)
            }
            None => None,
        };
        let total_q = x.total_q();
        let h = x.shape.num_heads;
        // Poison: any element the kernel fails to write reads back as NaN.
        let mut out = poisoned::<T>(stream, total_q * h * x.shape.head_dim)?;
        let mut lse = if x.return_lse {
            Some(poisoned::<f32>(stream, total_q * h)?)
        } else {
            None
        };
        let args = AttentionArgs {
            q: &qd,
            k: &kd,
            v: &vd,
            shape: x.shape,
            seqs: &seqs,
            softmax_scale: x.softmax_scale,
        };
        launch_attention(
            &self.device,
            stream,
            &args,
            dindex.as_ref(),
            None,
            &mut out,
            lse.as_mut(),
        )?;
        let out_host: Vec<T> = stream.clone_dtoh(&out)?;
        let lse_host = match lse {
            Some(l) => Some(stream.clone_dtoh(&l)?),
            None => None,
        };
        stream.synchronize()?;
        let out = match out_dtype {
            DType::F32 => HostTensor::F32(out_host.iter().map(|a| a.to_f32()).collect()),
            _ => T::into_host(out_host),
        };
        Ok(AttentionOutput { out, lse: lse_host })
    }
}

/// A device buffer of `len` elements, every byte 0xFF (NaN for f32, bf16 and f16).
pub(crate) fn poisoned<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: the buffer is filled right below, before anything reads it.
    let mut buf = unsafe { stream.alloc::<T>(len.max(1)) }?;
    let bytes = len.max(1) * std::mem::size_of::<T>();
    let ptr = {
        use cudarc::driver::DevicePtrMut;
        buf.device_ptr_mut(stream).0
    };
    // SAFETY: `ptr` is the start of an allocation of `bytes` bytes owned by `buf`.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }?;
    Ok(buf)
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn dense_attention(&self, x: &AttentionInput<'_>) -> flexprefill_core::Result<AttentionOutput> {
        Ok(self.attention_host(x, None)?)
    }

    fn sparse_attention(
        &self,
        x: &AttentionInput<'_>,
        index: &BlockIndex,
    ) -> flexprefill_core::Result<AttentionOutput> {
        check_index_matches(x, index)?;
        Ok(self.attention_host(x, Some(index))?)
    }

    fn head_statistics(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> flexprefill_core::Result<Vec<HeadStatistics>> {
        Ok(crate::stats::head_statistics(&self.device, x, cfg)?)
    }

    /// Pattern search and index build on the device (`select.rs`), same blocks as core's
    /// `build_index` on the same statistics.
    fn select_index(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> flexprefill_core::Result<(BlockIndex, flexprefill_core::SparsityReport)> {
        Ok(crate::select::select_index(&self.device, x, cfg)?)
    }
}
