//! A reusable workspace: every device buffer of a FlexPrefill call (statistics, selection, index,
//! sequence tables) sub-allocated from one device allocation made once, for a maximum shape, so
//! that a call with it allocates nothing, loads no module and can be captured in a CUDA graph.
//!
//! Sizing is exact, not estimated: [`Workspace::new`] plans the call for the worst batches its
//! [`WorkspaceLimits`] allow (one sequence of every token; `max_seqs` equal sequences; one long
//! sequence beside `max_seqs - 1` one-token ones) with the launches switched off, and keeps the
//! largest plan, plus a little slack for batches between those. The same planning loads every kernel those calls launch, so no NVRTC compile
//! or module load happens in a later call. A call beyond the limits, or one whose plan would
//! not fit (a batch shape none of the planned ones dominates), returns
//! [`CudaError::ExceedsWorkspace`]; nothing is ever written past the allocation.
//!
//! Sequence tables are copied from pinned host memory the workspace owns, with async copies
//! on the call's stream. The pinned memory is a ring of [`TABLE_SLOTS`] slots, one per call:
//! before a call rewrites its slot it waits (on the host) for the copies of the call
//! `TABLE_SLOTS` calls back, so the host only waits when it runs that far ahead of the GPU.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUstreamCaptureStatus};
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchArgs,
    PinnedHostSlice, PushKernelArg, SyncOnDrop,
};
use flexprefill_core::{AttentionShape, DType, FlexPrefillConfig, Sequence};

use crate::error::{CudaError, Result};

/// Alignment of every sub-allocation (the allocator's own granularity for small buffers; the
/// kernels read 16-byte vectors and TMA wants 16-byte aligned tables).
const ALIGN: usize = 256;
/// Where a planning pass pretends the arena starts: a 256-aligned address that no launch ever
/// sees (launches are off while planning).
const PLAN_BASE: CUdeviceptr = 1 << 44;
/// Calls whose sequence tables can be in flight at once (pinned slots of the table ring).
pub const TABLE_SLOTS: usize = 4;

thread_local! {
    /// Set while [`Workspace::new`] plans: [`crate::launch::Launch::launch`] and the
    /// workspace's copies and memsets do nothing.
    static PLANNING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is planning a workspace (no work may be queued).
pub(crate) fn planning() -> bool {
    PLANNING.with(Cell::get)
}

/// A device buffer of a call: either owned (the allocating API) or a view into a workspace's
/// allocation, which it keeps alive and never frees. Reads as a [`CudaSlice`].
pub struct Buf<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    owner: Owner,
}

enum Owner {
    Own,
    /// A view: the allocation it points into (None while planning: a fake address).
    View(#[allow(dead_code)] Option<Arc<CudaSlice<u8>>>),
}

impl<T> Buf<T> {
    /// Takes an owned slice (freed when the buffer drops).
    pub fn owned(slice: CudaSlice<T>) -> Self {
        Self {
            slice: ManuallyDrop::new(slice),
            owner: Owner::Own,
        }
    }
}

impl<T> From<CudaSlice<T>> for Buf<T> {
    fn from(s: CudaSlice<T>) -> Self {
        Self::owned(s)
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here.
        let s = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.owner {
            Owner::Own => drop(s),
            // A view hands its address back without freeing it (the arena owns it).
            Owner::View(_) => {
                let _ = s.leak();
            }
        }
    }
}

impl<T> Deref for Buf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let view = matches!(self.owner, Owner::View(_));
        f.debug_struct("Buf")
            .field("len", &self.slice.len())
            .field("view", &view)
            .finish()
    }
}

impl<T> DeviceSlice<T> for Buf<T> {
    fn len(&self) -> usize {
        self.slice.len()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.slice.stream()
    }
}

impl<T> DevicePtr<T> for Buf<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for Buf<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr_mut(stream)
    }
}

// SAFETY: pushes the inner slice exactly as cudarc pushes a `&CudaSlice` (same pointer, same
// event bookkeeping).
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b Buf<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b Buf<T>) -> &mut Self {
        self.arg(&*arg.slice)
    }
}

// SAFETY: as above, for a written buffer.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut Buf<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut Buf<T>) -> &mut Self {
        self.arg(&mut *arg.slice)
    }
}

/// The largest call a [`Workspace`] serves. Build with [`WorkspaceLimits::new`] and set the
/// fields; `cfg` is the configuration calls will use (its `block_size` and `selection` must
/// match the calls'; a call with `tau > 0` needs a workspace planned with `tau > 0`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkspaceLimits {
    /// Query tokens over the whole batch (`total_q`).
    pub max_total_q: usize,
    /// Key tokens over the whole batch (`total_k`).
    pub max_total_kv: usize,
    /// Sequences per batch.
    pub max_seqs: usize,
    /// Heads and head_dim (calls must use exactly this shape).
    pub shape: AttentionShape,
    /// Element type of q, k, v (bf16 or f16).
    pub dtype: DType,
    /// The configuration of the calls.
    pub cfg: FlexPrefillConfig,
}

impl WorkspaceLimits {
    /// Limits for batches of up to `max_seqs` sequences and `max_total_q`/`max_total_kv`
    /// tokens of `shape` in `dtype`, with `cfg`.
    pub fn new(
        max_total_q: usize,
        max_total_kv: usize,
        max_seqs: usize,
        shape: AttentionShape,
        dtype: DType,
        cfg: FlexPrefillConfig,
    ) -> Self {
        Self {
            max_total_q,
            max_total_kv,
            max_seqs,
            shape,
            dtype,
            cfg,
        }
    }
}

/// Sizes a workspace's plan came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkspaceSize {
    /// Device bytes (the one allocation).
    pub device_bytes: usize,
    /// Pinned host bytes of one table slot (the workspace holds `TABLE_SLOTS` of them).
    pub host_bytes: usize,
}

/// Device and pinned memory for FlexPrefill calls up to a maximum shape; see the module docs.
///
/// Lifetimes: buffers of a call (the [`crate::call::DeviceRun`]'s selection and statistics)
/// point into the workspace and stay valid (the allocation lives while they do) but are
/// overwritten by the next call with the same workspace: read a run's report before the next
/// call. The allocation is freed, stream-ordered, on the stream the workspace was created on
/// when the workspace and every run from it are dropped: work queued on another stream must
/// be complete (or ordered before that stream) by then. A workspace captured into a CUDA graph
/// belongs to that graph (its replays read the workspace's tables): further direct calls with
/// it return an error.
pub struct Workspace {
    limits: WorkspaceLimits,
    arena: Arc<CudaSlice<u8>>,
    base: CUdeviceptr,
    size: WorkspaceSize,
    /// Owns the memory `host` points into.
    _pinned: PinnedHostSlice<u8>,
    host: *mut u8,
    side: Arc<CudaStream>,
    /// Per slot, recorded after each table copy: the slot is free again once it has run.
    copied: Vec<CudaEvent>,
    /// The slot of the current call.
    slot: usize,
    captured: bool,
}

// SAFETY: `host` points into `pinned`, which the workspace owns; the workspace is used through
// `&mut` only, so its pinned memory is never written from two threads.
unsafe impl Send for Workspace {}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("limits", &self.limits)
            .field("size", &self.size)
            .field("captured", &self.captured)
            .finish()
    }
}

fn exceeds(what: impl Into<String>, got: usize, max: usize) -> CudaError {
    CudaError::ExceedsWorkspace {
        what: what.into(),
        got,
        max,
    }
}

impl Workspace {
    /// Plans, allocates and loads the kernels for calls up to `limits` on `backend`; the
    /// allocation is made on `stream`.
    pub fn new(
        backend: &crate::CudaBackend,
        stream: &Arc<CudaStream>,
        limits: WorkspaceLimits,
    ) -> Result<Self> {
        limits.shape.validate()?;
        limits.cfg.validate()?;
        let (tq, tk, ns) = (limits.max_total_q, limits.max_total_kv, limits.max_seqs);
        if tq == 0 || tk == 0 || ns == 0 || tq > tk {
            return Err(flexprefill_core::Error::Shape(format!(
                "workspace limits: max_total_q ({tq}) must be in 1..=max_total_kv ({tk}) and max_seqs ({ns}) at least 1"
            ))
            .into());
        }
        let mut size = WorkspaceSize::default();
        for seqs in worst_batches(tq, tk, ns) {
            let s = crate::call::plan(backend, stream, &limits, &seqs)?;
            size.device_bytes = size.device_bytes.max(s.device_bytes);
            size.host_bytes = size.host_bytes.max(s.host_bytes);
        }
        // Slack for batches between the planned ones (1/64 and 1 MiB device, 1/64 and 4 KiB
        // pinned): mixed batches add per-sequence and per-block terms of both kinds.
        size.device_bytes += size.device_bytes / 64 + (1 << 20);
        size.host_bytes += size.host_bytes / 64 + 4096;
        let arena = Arc::new(stream.alloc_zeros::<u8>(size.device_bytes)?);
        let base = arena.device_ptr(stream).0;
        // SAFETY: bytes only, written before every copy that reads them.
        let mut pinned = unsafe {
            backend
                .device()
                .context()
                .alloc_pinned::<u8>(TABLE_SLOTS * size.host_bytes)
        }?;
        let host = pinned.as_mut_ptr()?;
        let side = backend.device().context().new_stream()?;
        let ctx = backend.device().context();
        let copied = (0..TABLE_SLOTS)
            .map(|_| ctx.new_event(None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            limits,
            arena,
            base,
            size,
            _pinned: pinned,
            host,
            side,
            copied,
            slot: 0,
            captured: false,
        })
    }

    /// The limits it was planned for.
    pub fn limits(&self) -> &WorkspaceLimits {
        &self.limits
    }

    /// Device and pinned host bytes it holds.
    pub fn size(&self) -> WorkspaceSize {
        self.size
    }

    /// Checks a call against the limits (typed errors, before anything is queued).
    pub(crate) fn check(
        &self,
        shape: AttentionShape,
        dtype: DType,
        seqs: &[Sequence],
        cfg: &FlexPrefillConfig,
    ) -> Result<()> {
        let l = &self.limits;
        if self.captured {
            return Err(CudaError::Unsupported {
                op: "workspace",
                message: "this workspace was captured into a CUDA graph, whose replays read its tables: use another workspace for direct calls".into(),
            });
        }
        if shape != l.shape {
            return Err(CudaError::Unsupported {
                op: "workspace",
                message: format!("shape {shape:?} differs from the workspace's {:?}", l.shape),
            });
        }
        if dtype != l.dtype {
            return Err(CudaError::Unsupported {
                op: "workspace",
                message: format!(
                    "dtype {} differs from the workspace's {}",
                    dtype.name(),
                    l.dtype.name()
                ),
            });
        }
        if cfg.block_size != l.cfg.block_size
            || cfg.selection != l.cfg.selection
            || (cfg.tau > 0.0 && l.cfg.tau <= 0.0)
        {
            return Err(CudaError::Unsupported {
                op: "workspace",
                message: format!(
                    "config (block_size {}, selection {:?}, tau {}) needs buffers the workspace (block_size {}, selection {:?}, tau {}) was not planned for",
                    cfg.block_size, cfg.selection, cfg.tau, l.cfg.block_size, l.cfg.selection, l.cfg.tau
                ),
            });
        }
        let tq = seqs.iter().map(|s| s.q_start + s.q_len).max().unwrap_or(0);
        let tk = seqs.iter().map(|s| s.k_start + s.kv_len).max().unwrap_or(0);
        if seqs.len() > l.max_seqs {
            return Err(exceeds("sequences", seqs.len(), l.max_seqs));
        }
        if tq > l.max_total_q {
            return Err(exceeds("query tokens", tq, l.max_total_q));
        }
        if tk > l.max_total_kv {
            return Err(exceeds("key tokens", tk, l.max_total_kv));
        }
        Ok(())
    }

    /// Starts a call on `stream`: takes the next pinned table slot, waiting for the copies of
    /// the call that used it last (`TABLE_SLOTS` calls back), and notes whether the stream is
    /// being captured.
    pub(crate) fn begin(&mut self, stream: &Arc<CudaStream>) -> Result<Scratch<'_>> {
        let capturing = !matches!(
            stream.capture_status()?,
            CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        );
        self.slot = (self.slot + 1) % TABLE_SLOTS;
        if !capturing {
            // The last copy recorded from this slot (a never-recorded event is complete).
            self.copied[self.slot].synchronize()?;
        }
        Ok(Scratch {
            mode: Mode::Arena {
                ws: self,
                off: 0,
                host_off: 0,
                capturing,
            },
        })
    }
}

/// The worst batches for the plan: one sequence of every token (largest per-sequence maps),
/// `max_seqs` equal sequences and one long sequence beside `max_seqs - 1` one-token ones (the
/// per-sequence terms and padding).
fn worst_batches(tq: usize, tk: usize, ns: usize) -> Vec<Vec<Sequence>> {
    let one = |q_start, k_start, q_len, kv_len| Sequence {
        q_start,
        k_start,
        q_len,
        kv_len,
    };
    let mut out = vec![vec![one(0, 0, tq, tk)]];
    let n = ns.min(tq);
    if n > 1 {
        let (q, k) = (tq / n, tk / n);
        out.push((0..n).map(|i| one(i * q, i * k, q, k)).collect());
        let small: Vec<Sequence> = (0..n - 1).map(|i| one(i, i, 1, 1)).collect();
        let mut b = small;
        b.push(one(n - 1, n - 1, tq - (n - 1), tk - (n - 1)));
        out.push(b);
    }
    out
}

/// Where a call's buffers come from.
pub(crate) struct Scratch<'w> {
    mode: Mode<'w>,
}

enum Mode<'w> {
    /// Each buffer its own stream-ordered allocation (the allocating API).
    Alloc,
    /// Bump sub-allocation from a workspace.
    Arena {
        ws: &'w mut Workspace,
        off: usize,
        host_off: usize,
        capturing: bool,
    },
    /// Planning: addresses are fake, nothing is queued, sizes are counted.
    Plan { off: usize, host_off: usize },
}

fn bump(off: &mut usize, bytes: usize) -> usize {
    let at = off.next_multiple_of(ALIGN);
    *off = at + bytes.max(1);
    at
}

impl Scratch<'static> {
    /// Every buffer allocated on the call's stream, as before workspaces.
    pub(crate) fn alloc() -> Self {
        Self { mode: Mode::Alloc }
    }

    /// A planning pass: no address is valid, nothing may be launched (see [`PlanGuard`]).
    pub(crate) fn plan() -> Self {
        Self {
            mode: Mode::Plan {
                off: 0,
                host_off: 0,
            },
        }
    }
}

impl Scratch<'_> {
    /// Whether buffers come from a workspace or a plan (no allocation allowed).
    pub(crate) fn is_pooled(&self) -> bool {
        !matches!(self.mode, Mode::Alloc)
    }

    /// Bytes used so far (device, pinned host).
    pub(crate) fn used(&self) -> WorkspaceSize {
        match &self.mode {
            Mode::Alloc => WorkspaceSize::default(),
            Mode::Arena { off, host_off, .. } | Mode::Plan { off, host_off } => WorkspaceSize {
                device_bytes: *off,
                host_bytes: *host_off,
            },
        }
    }

    /// A view at `at` of `len` elements, kept alive by `arena`.
    fn view<T>(
        stream: &Arc<CudaStream>,
        ptr: CUdeviceptr,
        len: usize,
        arena: Option<Arc<CudaSlice<u8>>>,
    ) -> Buf<T> {
        // SAFETY: `ptr` is inside the arena (or a planning address no launch sees) with room
        // for `len` elements; the view never frees it.
        let s = unsafe { stream.upgrade_device_ptr::<T>(ptr, len) };
        Buf {
            slice: ManuallyDrop::new(s),
            owner: Owner::View(arena),
        }
    }

    /// A device buffer of `n` elements (at least one), contents unspecified.
    ///
    /// # Safety
    /// Every element is written by the call's kernels before any is read.
    pub(crate) unsafe fn take<T: DeviceRepr>(
        &mut self,
        stream: &Arc<CudaStream>,
        n: usize,
    ) -> Result<Buf<T>> {
        let n = n.max(1);
        let bytes = n * std::mem::size_of::<T>();
        match &mut self.mode {
            // SAFETY: the caller's contract (written before read).
            Mode::Alloc => Ok(Buf::owned(unsafe { crate::pool::alloc::<T>(stream, n) }?)),
            Mode::Plan { off, .. } => {
                let at = bump(off, bytes);
                Ok(Self::view(stream, PLAN_BASE + at as u64, n, None))
            }
            Mode::Arena { ws, off, .. } => {
                let at = bump(off, bytes);
                if *off > ws.size.device_bytes {
                    return Err(exceeds("device bytes", *off, ws.size.device_bytes));
                }
                Ok(Self::view(
                    stream,
                    ws.base + at as u64,
                    n,
                    Some(ws.arena.clone()),
                ))
            }
        }
    }

    /// A zeroed device buffer of `n` elements (at least one); the memset is queued on
    /// `stream`.
    pub(crate) fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        stream: &Arc<CudaStream>,
        n: usize,
    ) -> Result<Buf<T>> {
        if let Mode::Alloc = self.mode {
            return Ok(Buf::owned(crate::pool::alloc_zeros::<T>(stream, n)?));
        }
        // SAFETY: zeroed right below, on the same stream, before any kernel reads it.
        let mut b = unsafe { self.take::<T>(stream, n) }?;
        if !planning() {
            stream.memset_zeros(&mut *b)?;
        }
        Ok(b)
    }

    /// `src` on the device (at least one element: an empty table uploads one zero), copied
    /// on `stream`; from a workspace, through its pinned memory.
    pub(crate) fn upload<T: DeviceRepr + Default + Copy>(
        &mut self,
        stream: &Arc<CudaStream>,
        src: &[T],
    ) -> Result<Buf<T>> {
        let one = [T::default()];
        let src = if src.is_empty() { &one[..] } else { src };
        let bytes = std::mem::size_of_val(src);
        match &mut self.mode {
            Mode::Alloc => Ok(Buf::owned(crate::pool::clone_htod(stream, src)?)),
            Mode::Plan { off, host_off } => {
                bump(host_off, bytes);
                let at = bump(off, bytes);
                Ok(Self::view(stream, PLAN_BASE + at as u64, src.len(), None))
            }
            Mode::Arena {
                ws,
                off,
                host_off,
                capturing,
            } => {
                let h = bump(host_off, bytes);
                if *host_off > ws.size.host_bytes {
                    return Err(exceeds("pinned host bytes", *host_off, ws.size.host_bytes));
                }
                let at = bump(off, bytes);
                if *off > ws.size.device_bytes {
                    return Err(exceeds("device bytes", *off, ws.size.device_bytes));
                }
                // SAFETY: `h + bytes` is inside the pinned allocation (checked above); no copy
                // still reads it (`Workspace::begin` waited for the previous call's copies).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr().cast::<u8>(),
                        ws.host.add(ws.slot * ws.size.host_bytes + h),
                        bytes,
                    );
                }
                let dst = ws.base + at as u64;
                // SAFETY: pinned source and arena destination, both `bytes` long and live
                // until the copy ran (the arena while any view lives; the pinned memory is not
                // rewritten before the event recorded after this call's copies).
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        dst,
                        std::slice::from_raw_parts(
                            ws.host.add(ws.slot * ws.size.host_bytes + h),
                            bytes,
                        ),
                        stream.cu_stream(),
                    )
                }?;
                if !*capturing {
                    ws.copied[ws.slot].record(stream)?;
                }
                Ok(Self::view(stream, dst, src.len(), Some(ws.arena.clone())))
            }
        }
    }

    /// The stream the selection's vertical-slash chain runs on beside `stream` (made to wait
    /// for `stream`'s work so far): a new fork when allocating, the workspace's own side
    /// stream otherwise (no stream is created inside a call). The two chains share buffers
    /// that only cudarc's event tracking orders, so with tracking off the chain runs on
    /// `stream` itself.
    pub(crate) fn side(&self, stream: &Arc<CudaStream>) -> Result<Arc<CudaStream>> {
        if !stream.context().is_event_tracking() {
            return Ok(stream.clone());
        }
        match &self.mode {
            Mode::Arena { ws, .. } => {
                ws.side.join(stream)?;
                Ok(ws.side.clone())
            }
            _ => Ok(stream.fork()?),
        }
    }

    /// Ends a call: a workspace captured into a graph is marked (its replays read it).
    pub(crate) fn finish(self) {
        if let Mode::Arena { ws, capturing, .. } = self.mode {
            if capturing {
                ws.captured = true;
            }
        }
    }
}

/// Planning mode for the current thread while alive (launches are skipped).
pub(crate) struct PlanGuard(());

impl PlanGuard {
    pub(crate) fn new() -> Self {
        PLANNING.with(|p| p.set(true));
        Self(())
    }
}

impl Drop for PlanGuard {
    fn drop(&mut self) {
        PLANNING.with(|p| p.set(false));
    }
}

/// Fake q/k/v/out of `len` elements for a planning pass (never launched on).
pub(crate) fn plan_input<T>(stream: &Arc<CudaStream>, len: usize) -> Buf<T> {
    Scratch::view(stream, PLAN_BASE, len.max(1), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planned batches are packed, causal-chunk-valid and reach the limits exactly, so the
    /// plan covers the largest totals a call may bring.
    #[test]
    fn worst_batches_reach_the_limits() {
        for (tq, tk, ns) in [
            (1, 1, 1),
            (100, 100, 1),
            (97, 1025, 3),
            (5, 5, 8),
            (4096, 8192, 7),
        ] {
            let batches = worst_batches(tq, tk, ns);
            assert_eq!(batches.len(), if ns.min(tq) > 1 { 3 } else { 1 });
            for b in &batches {
                assert!(b.len() <= ns);
                let (mut q, mut k) = (0, 0);
                for s in b {
                    assert_eq!((s.q_start, s.k_start), (q, k), "packed");
                    assert!(s.q_len >= 1 && s.q_len <= s.kv_len, "{s:?}");
                    q += s.q_len;
                    k += s.kv_len;
                }
                assert!(q <= tq && k <= tk);
                assert!(tq - q < b.len() && tk - k < b.len(), "{tq} {tk}: {b:?}");
            }
            assert_eq!(batches[0][0].q_len, tq);
            assert_eq!(batches[0][0].kv_len, tk);
        }
    }

    #[test]
    fn sub_allocations_are_aligned_and_disjoint() {
        let mut off = 0;
        let a = bump(&mut off, 3);
        let b = bump(&mut off, 0);
        let c = bump(&mut off, 1000);
        assert_eq!((a, b, c), (0, 256, 512));
        assert_eq!(off, 1512);
    }
}
