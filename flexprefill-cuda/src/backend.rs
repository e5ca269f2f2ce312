//! [`CudaBackend`]: the core [`Backend`] trait on one GPU (host tensors in and out, for
//! agreement tests and simple use), plus the device-resident API (`CudaSlice` in and out on a
//! stream you give, no host round trip) for real use.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use flexprefill_core::{
    bf16, check_index_matches, f16, AttentionInput, AttentionOutput, Backend, BlockIndex, DType,
    FlexPrefillConfig, ForcedBlocks, HeadStatistics, HostTensor, SparsityReport, TensorRef,
    Timings,
};

/// Runs `$body` with `$a` the typed [`AttentionArgs`] of a [`HostArgs`] and `$o` the output
/// buffer of the same dtype (the host API picks the dtype at run time, the kernels at compile
/// time).
macro_rules! with_elem {
    ($h:expr, $out:expr, |$a:ident, $o:ident| $body:expr) => {{
        let h: &HostArgs = $h;
        match (&h.q, &h.k, &h.v, $out) {
            (HostBuf::BF16(q), HostBuf::BF16(k), HostBuf::BF16(v), HostBuf::BF16($o)) => {
                let $a = h.typed(q, k, v);
                $body
            }
            (HostBuf::F16(q), HostBuf::F16(k), HostBuf::F16(v), HostBuf::F16($o)) => {
                let $a = h.typed(q, k, v);
                $body
            }
            _ => Err(CudaError::Unsupported {
                op: "host call",
                message: "inputs and output of different dtypes".into(),
            }),
        }
    }};
}

use crate::attention::{
    launch_attention, launch_attention_walk, AttentionArgs, AttnTile, DeviceBlockIndex, DeviceElem,
    DeviceSeqs,
};
use crate::device::{driver_present, CudaDevice};
use crate::error::{CudaError, Result};
use crate::kcache::KernelCache;
use crate::staging::Staging;

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
    /// Pinned chunks the host API copies through (one call at a time per backend clone set).
    staging: Arc<Mutex<Staging>>,
    /// Below this many keys a FlexPrefill call runs dense ([`Backend::min_sparse_kv_len`]).
    min_sparse_kv_len: usize,
}

impl CudaBackend {
    /// The backend on device 0. Without an NVIDIA driver this returns
    /// [`CudaError::NoDriver`] (it never panics).
    pub fn new() -> Result<Self> {
        Self::new_on(0)
    }

    /// The backend on device `ordinal`.
    pub fn new_on(ordinal: usize) -> Result<Self> {
        Self::with_kernel_cache(ordinal, &KernelCache::FromEnv)
    }

    /// The backend on device `ordinal` with its own kernel registry and an explicit
    /// persistent kernel cache setting ([`KernelCache`]; the default reads the environment).
    pub fn with_kernel_cache(ordinal: usize, cache: &KernelCache) -> Result<Self> {
        driver_present()?;
        Ok(Self {
            device: CudaDevice::with_kernel_cache(ordinal, cache)?,
            staging: Arc::default(),
            min_sparse_kv_len: crate::call::MIN_SPARSE_KV_LEN,
        })
    }

    /// The backend on device `ordinal` for callers that order work by their own streams
    /// (raw device pointers from torch or an engine, [`crate::raw`]): cudarc's per-buffer
    /// event tracking is off in its context. Every buffer a call allocates is used on the
    /// call's stream only, so the events only cost host time: about half of a queued 32k call
    /// (1002 → 413 µs on the H200), with the same GPU time at 32k and 128k (the selection's
    /// side chain then runs on the call stream). Buffers you allocate yourself through this
    /// backend's context are ordered by stream order alone. `FLEXPREFILL_EVENT_TRACKING=0`
    /// does the same for every backend.
    pub fn stream_ordered(ordinal: usize) -> Result<Self> {
        driver_present()?;
        Ok(Self {
            device: CudaDevice::open(ordinal, &KernelCache::FromEnv, false)?,
            staging: Arc::default(),
            min_sparse_kv_len: crate::call::MIN_SPARSE_KV_LEN,
        })
    }

    /// The same backend with another dense-or-sparse threshold (keys of the longest sequence
    /// below which a FlexPrefill call runs dense; default [`crate::call::MIN_SPARSE_KV_LEN`]).
    /// 0 always runs the sparse path: agreement tests use it to exercise selection and
    /// sparse attention on short inputs.
    pub fn with_min_sparse_kv_len(mut self, keys: usize) -> Self {
        self.min_sparse_kv_len = keys;
        self
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
        self.check_stream(stream)?;
        launch_attention(&self.device, stream, args, index, tile, out, lse)
    }

    /// [`CudaBackend::attention_device`] with the dense-walk flags of the FlexPrefill call
    /// (`attention::choose_dense_walk`), on the automatic tile.
    pub(crate) fn attention_device_walk<T: DeviceElem>(
        &self,
        stream: &CudaStream,
        args: &AttentionArgs<'_, T>,
        index: Option<&DeviceBlockIndex>,
        dense_walk: Option<&CudaSlice<u8>>,
        out: &mut CudaSlice<T>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        launch_attention_walk(
            &self.device,
            stream,
            args,
            index,
            dense_walk,
            None,
            out,
            lse,
        )
    }

    fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.device.context().cu_ctx() {
            return Err(CudaError::Unsupported {
                op: "attention",
                message: "the stream belongs to another CUDA context".into(),
            });
        }
        Ok(())
    }

    /// Host attention: uploads, runs (timed with CUDA events), downloads.
    #[allow(clippy::field_reassign_with_default)] // Default + assignment: Timings may grow
    fn attention_host(
        &self,
        x: &AttentionInput<'_>,
        index: Option<&BlockIndex>,
    ) -> Result<(AttentionOutput, Timings)> {
        x.validate()?;
        if let Some(i) = index {
            // The kernel trusts sorted, causal columns; check them on the host first.
            i.validate(ForcedBlocks {
                sink: false,
                diagonal: false,
            })?;
        }
        self.host_call(x, |stream, args, out, lse| {
            let dindex = index
                .map(|i| DeviceBlockIndex::upload(stream, i))
                .transpose()?;
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            with_elem!(args, out, |a, o| launch_attention(
                &self.device,
                stream,
                &a,
                dindex.as_ref(),
                None,
                o,
                lse
            ))?;
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let mut t = Timings::default();
            t.attention = Some(crate::call::elapsed(&start, &end)?);
            t.device_clock = true;
            Ok(t)
        })
    }

    /// The host API's FlexPrefill: one upload, the device-resident call
    /// ([`crate::call::flex_prefill_device_timed`]: the same dense-or-sparse decision, no host
    /// round trip between selection and attention), one download, then the decisions.
    fn flex_prefill_host(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<(AttentionOutput, SparsityReport)> {
        cfg.validate()?;
        x.validate()?;
        let mut report = None;
        let (out, timings) = self.host_call(x, |stream, args, out, lse| {
            let run = with_elem!(args, out, |a, o| {
                crate::call::run(self, stream, &a, cfg, o, lse, true, x.dtype())
            })?;
            let t = run.timings()?.unwrap_or_default();
            report = Some(run);
            Ok(t)
        })?;
        let run = report.expect("host_call ran the closure");
        let t = Instant::now();
        let mut report = run.report(self.device.stream())?;
        report.timings = timings;
        let read_back = t.elapsed();
        report.timings.download = Some(timings.download.unwrap_or_default() + read_back);
        Ok((out, report))
    }

    /// Uploads `x` once (through the pinned staging chunks, f16/bf16 as they are, f32 rounded
    /// to bf16 on the way), lets `body` queue its work, downloads the output once (f32 inputs
    /// get f32 output). `body` returns its device timings; the upload and download times are
    /// added (host clock, each ends when its copies have completed).
    fn host_call(
        &self,
        x: &AttentionInput<'_>,
        body: impl FnOnce(
            &Arc<CudaStream>,
            &HostArgs,
            &mut HostOut,
            Option<&mut CudaSlice<f32>>,
        ) -> Result<Timings>,
    ) -> Result<(AttentionOutput, Timings)> {
        let stream = self.device.stream();
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let t_up = Instant::now();
        let seqs = DeviceSeqs::new(stream, &x.seqs)?;
        let (q, k, v) = match (x.q, x.k, x.v) {
            (TensorRef::BF16(q), TensorRef::BF16(k), TensorRef::BF16(v)) => (
                HostBuf::BF16(staging.upload_new(stream, q, |a| a)?),
                HostBuf::BF16(staging.upload_new(stream, k, |a| a)?),
                HostBuf::BF16(staging.upload_new(stream, v, |a| a)?),
            ),
            (TensorRef::F16(q), TensorRef::F16(k), TensorRef::F16(v)) => (
                HostBuf::F16(staging.upload_new(stream, q, |a| a)?),
                HostBuf::F16(staging.upload_new(stream, k, |a| a)?),
                HostBuf::F16(staging.upload_new(stream, v, |a| a)?),
            ),
            (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v)) => (
                HostBuf::BF16(staging.upload_new(stream, q, bf16::from_f32)?),
                HostBuf::BF16(staging.upload_new(stream, k, bf16::from_f32)?),
                HostBuf::BF16(staging.upload_new(stream, v, bf16::from_f32)?),
            ),
            // `validate` rejects mixed dtypes.
            _ => return Err(dtype_error(x)),
        };
        let total_q = x.total_q();
        let h = x.shape.num_heads;
        let n_out = total_q * h * x.shape.head_dim;
        // Poison: any element the kernel fails to write reads back as NaN.
        let mut out = match &q {
            HostBuf::BF16(_) => HostBuf::BF16(poisoned::<bf16>(stream, n_out)?),
            HostBuf::F16(_) => HostBuf::F16(poisoned::<f16>(stream, n_out)?),
        };
        let mut lse = if x.return_lse {
            Some(poisoned::<f32>(stream, total_q * h)?)
        } else {
            None
        };
        // The upload ends when its last copy has landed (the GPU is idle until then anyway).
        stream.synchronize()?;
        let upload = t_up.elapsed();
        let args = HostArgs {
            q,
            k,
            v,
            shape: x.shape,
            seqs,
            softmax_scale: x.softmax_scale,
        };
        let mut timings = body(stream, &args, &mut out, lse.as_mut())?;
        // Wait for the computation before the download clock starts.
        stream.synchronize()?;
        let t_down = Instant::now();
        let out = match (out, x.dtype()) {
            (HostBuf::BF16(o), DType::F32) => {
                HostTensor::F32(staging.download_new(stream, &o, n_out, |a: bf16| a.to_f32())?)
            }
            (HostBuf::BF16(o), _) => {
                HostTensor::BF16(staging.download_new(stream, &o, n_out, |a: bf16| a)?)
            }
            (HostBuf::F16(o), _) => {
                HostTensor::F16(staging.download_new(stream, &o, n_out, |a: f16| a)?)
            }
        };
        let lse = match lse {
            Some(l) => Some(staging.download_new(stream, &l, total_q * h, |a: f32| a)?),
            None => None,
        };
        timings.upload = Some(upload);
        timings.download = Some(t_down.elapsed());
        Ok((AttentionOutput { out, lse }, timings))
    }
}

/// The error for q, k, v of different dtypes (which `AttentionInput::validate` rejects first).
pub(crate) fn dtype_error(x: &AttentionInput<'_>) -> CudaError {
    flexprefill_core::Error::DType {
        q: x.q.dtype().name(),
        k: x.k.dtype().name(),
        v: x.v.dtype().name(),
    }
    .into()
}

/// A device tensor of the host API, in the dtype it runs in.
pub(crate) enum HostBuf {
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

/// The uploaded inputs of one host-API call.
pub(crate) struct HostArgs {
    q: HostBuf,
    k: HostBuf,
    v: HostBuf,
    shape: flexprefill_core::AttentionShape,
    seqs: DeviceSeqs,
    softmax_scale: Option<f32>,
}

impl HostArgs {
    fn typed<'a, T>(
        &'a self,
        q: &'a CudaSlice<T>,
        k: &'a CudaSlice<T>,
        v: &'a CudaSlice<T>,
    ) -> AttentionArgs<'a, T> {
        AttentionArgs {
            q,
            k,
            v,
            shape: self.shape,
            seqs: &self.seqs,
            softmax_scale: self.softmax_scale,
        }
    }
}

/// The output buffer of a host-API call (same dtype as the inputs on the device).
pub(crate) type HostOut = HostBuf;

impl Staging {
    /// A new device buffer holding `src` converted by `conv`.
    fn upload_new<S: Copy, T: DeviceRepr + Copy>(
        &mut self,
        stream: &Arc<CudaStream>,
        src: &[S],
        conv: impl Fn(S) -> T,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: every element is written by the copies queued right below, before any
        // kernel reads it (stream order).
        let mut buf = unsafe { crate::pool::alloc::<T>(stream, src.len()) }?;
        let ptr = {
            use cudarc::driver::DevicePtrMut;
            buf.device_ptr_mut(stream).0
        };
        self.upload(stream, ptr, src, conv)?;
        Ok(buf)
    }

    /// The first `len` elements of `src`, converted by `conv`.
    fn download_new<T: DeviceRepr + Copy, D: Copy + Default>(
        &mut self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        len: usize,
        conv: impl Fn(T) -> D,
    ) -> Result<Vec<D>> {
        let ptr = {
            use cudarc::driver::DevicePtr;
            src.device_ptr(stream).0
        };
        let mut out = vec![D::default(); len];
        self.download(stream, ptr, &mut out, conv)?;
        Ok(out)
    }
}

/// A device buffer of `len` elements, every byte 0xFF (NaN for f32, bf16 and f16).
pub(crate) fn poisoned<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: the buffer is filled right below, before anything reads it.
    let mut buf = unsafe { crate::pool::alloc::<T>(stream, len) }?;
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
        Ok(self.attention_host(x, None)?.0)
    }

    /// Dense attention timed like [`Backend::flex_prefill`]: the kernel by CUDA events, the
    /// copies apart.
    fn dense_attention_timed(
        &self,
        x: &AttentionInput<'_>,
    ) -> flexprefill_core::Result<(AttentionOutput, Timings)> {
        Ok(self.attention_host(x, None)?)
    }

    /// [`crate::call::MIN_SPARSE_KV_LEN`]: what the GPU's pattern search and index build cost
    /// against its dense kernel.
    fn min_sparse_kv_len(&self) -> usize {
        self.min_sparse_kv_len
    }

    /// The device-resident call between one upload and one download: the same decision, kernels and
    /// blocks as [`crate::select::flex_prefill_device`], stage times from CUDA events,
    /// transfers reported apart.
    fn flex_prefill(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> flexprefill_core::Result<(AttentionOutput, SparsityReport)> {
        Ok(self.flex_prefill_host(x, cfg)?)
    }

    fn sparse_attention(
        &self,
        x: &AttentionInput<'_>,
        index: &BlockIndex,
    ) -> flexprefill_core::Result<AttentionOutput> {
        check_index_matches(x, index)?;
        Ok(self.attention_host(x, Some(index))?.0)
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
