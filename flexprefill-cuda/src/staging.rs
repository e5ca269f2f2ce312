//! Host <-> device copies of the host API through two reused page-locked (pinned) buffers.
//!
//! A copy from pageable memory is staged by the driver anyway and runs at a fraction of the
//! link's rate; pinning the caller's own buffers costs more than the copy. So the host API
//! copies through two fixed pinned chunks, alternating: the host fills (or drains) one while
//! the DMA engine moves the other. The f32 inputs are rounded to bf16 while they are written
//! into the pinned chunk, and the f32 outputs widened while they are read out of it, so no
//! whole-tensor host conversion is ever made.

use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};

use crate::error::Result;

/// Bytes per pinned chunk: large enough that one copy runs near the link's rate, small enough
/// that two of them are a negligible amount of page-locked memory.
const CHUNK_BYTES: usize = 16 << 20;

/// The two pinned chunks and the event of the last copy that used each.
#[derive(Default)]
pub(crate) struct Staging {
    bufs: Vec<PinnedHostSlice<u8>>,
    used: [Option<CudaEvent>; 2],
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("chunks", &self.bufs.len())
            .finish()
    }
}

impl Staging {
    fn ensure(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        while self.bufs.len() < 2 {
            // SAFETY: the chunk is written before any copy reads it (upload) or written by a
            // copy before the host reads it (download).
            let b = unsafe {
                stream
                    .context()
                    .alloc_pinned_with_flags::<u8>(CHUNK_BYTES, 0)?
            };
            self.bufs.push(b);
        }
        Ok(())
    }

    /// Waits until the last copy through chunk `b` is done, and returns its start.
    fn chunk(&mut self, b: usize) -> Result<*mut u8> {
        if let Some(e) = self.used[b].take() {
            e.synchronize()?;
        }
        Ok(self.bufs[b].as_mut_ptr()?)
    }

    /// Copies `src` converted by `conv` into the device buffer at `dst` (room for
    /// `src.len()` elements of `T`), queued on `stream`. Returns once every chunk is queued;
    /// the last one may still be in flight (stream order covers later work on `stream`).
    pub(crate) fn upload<S: Copy, T: Copy>(
        &mut self,
        stream: &Arc<CudaStream>,
        dst: CUdeviceptr,
        src: &[S],
        conv: impl Fn(S) -> T,
    ) -> Result<()> {
        self.ensure(stream)?;
        let per = CHUNK_BYTES / std::mem::size_of::<T>();
        for (i, part) in src.chunks(per).enumerate() {
            let b = i % 2;
            let p = self.chunk(b)? as *mut T;
            // SAFETY: the chunk holds CHUNK_BYTES ≥ part.len()·size_of::<T>() bytes, is
            // page-aligned (so aligned for T), and no copy is using it (waited above).
            let staged = unsafe { std::slice::from_raw_parts_mut(p, part.len()) };
            for (d, &s) in staged.iter_mut().zip(part) {
                *d = conv(s);
            }
            let off = (i * per * std::mem::size_of::<T>()) as u64;
            // SAFETY: `dst + off` has room for `staged` (the caller sized `dst` for `src`);
            // the pinned chunk stays alive and untouched until the event below has passed.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dst + off, staged, stream.cu_stream())?
            };
            self.used[b] = Some(stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?);
        }
        Ok(())
    }

    /// Copies `dst.len()` elements of `T` from the device buffer at `src`, queued on `stream`
    /// after everything already queued there, into `dst` converted by `conv`. Returns when
    /// `dst` is filled.
    pub(crate) fn download<T: Copy, D>(
        &mut self,
        stream: &Arc<CudaStream>,
        src: CUdeviceptr,
        dst: &mut [D],
        conv: impl Fn(T) -> D,
    ) -> Result<()> {
        self.ensure(stream)?;
        let per = CHUNK_BYTES / std::mem::size_of::<T>();
        let n = dst.len().div_ceil(per);
        let drain = |this: &mut Self, i: usize, dst: &mut [D]| -> Result<()> {
            let end = ((i + 1) * per).min(dst.len());
            let part = &mut dst[i * per..end];
            let p = this.chunk(i % 2)? as *const T;
            // SAFETY: the copy into this chunk has completed (waited in `chunk`); it holds
            // `part.len()` elements of T.
            let staged = unsafe { std::slice::from_raw_parts(p, part.len()) };
            for (d, &s) in part.iter_mut().zip(staged) {
                *d = conv(s);
            }
            Ok(())
        };
        for i in 0..n {
            let b = i % 2;
            let len = per.min(dst.len() - i * per);
            let p = self.chunk(b)? as *mut T;
            // SAFETY: as in `upload`; the chunk is free (its previous copy was drained).
            let staged = unsafe { std::slice::from_raw_parts_mut(p, len) };
            let off = (i * per * std::mem::size_of::<T>()) as u64;
            // SAFETY: `src + off` holds `len` elements (the caller sized `dst` for `src`).
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(staged, src + off, stream.cu_stream())?
            };
            self.used[b] = Some(stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?);
            if i > 0 {
                drain(self, i - 1, dst)?;
            }
        }
        if n > 0 {
            drain(self, n - 1, dst)?;
        }
        Ok(())
    }
}
