//! The whole FlexPrefill call on device buffers ([`flex_prefill_device`]) and what it hands
//! back ([`DeviceRun`]): the dense-or-sparse decision, then statistics, selection and attention
//! queued on the caller's stream with no host synchronisation. Decisions and times are read
//! back only when asked ([`DeviceRun::report`], [`DeviceRun::timings`]).

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use flexprefill_core::{
    payoff, AttentionShape, Backend as _, DenseReason, FlexPrefillConfig, HeadStatistics, Pattern,
    Sequence, SparsityReport, Timings,
};

use crate::attention::{
    choose_dense_walk_into, dense_walk_density, AttentionArgs, DeviceElem, DeviceSeqs,
};
use crate::error::Result;
use crate::select::{launch_select_in, DeviceSelection};
use crate::stats::{launch_stats_in, DeviceStats, StatsElem, StatsLayout};
use crate::workspace::{
    plan_input, Buf, PlanGuard, Scratch, Workspace, WorkspaceLimits, WorkspaceSize,
};

/// The CUDA backend's [`flexprefill_core::Backend::min_sparse_kv_len`]: below this many keys
/// (longest sequence of the batch) the call runs dense. On an H200 (32 heads, d 128) pattern
/// search and index build cost 0.66 ms at 8k against 1.27 ms for dense attention, and the
/// sparse kernel would need a density under ~0.45 to win the rest back; at 16k they cost
/// about 1.3 ms against 4.9 ms dense and at 32k 3 ms against 19 ms, where sparsity pays
/// (measured with `examples/bench_select.rs`, `docs/PERFORMANCE.md`).
pub const MIN_SPARSE_KV_LEN: usize = 16384;

/// CUDA events around the stages of one call (timing events, recorded on the call's stream).
#[derive(Debug)]
struct StageEvents {
    start: CudaEvent,
    /// After the statistics (absent when the call ran dense).
    stats: Option<CudaEvent>,
    /// After selection and index build (absent when the call ran dense).
    select: Option<CudaEvent>,
    end: CudaEvent,
}

/// What [`flex_prefill_device`] queued. Nothing in it has been waited for: reading the report
/// or the timings synchronises.
#[derive(Debug)]
pub struct DeviceRun {
    /// The selection (None when the call ran dense).
    pub selection: Option<DeviceSelection>,
    /// Why the call ran dense, if it did (goes into the sparsity report).
    pub dense_reason: Option<String>,
    /// Per (sequence, head), sequence-major: 1 where the selection was dense enough that the
    /// attention kernel walked every causal block instead (`attention::choose_dense_walk`);
    /// None when the call ran dense. Read with [`DeviceRun::dense_walk`].
    dense_walk: Option<Buf<u8>>,
    /// The density threshold of that decision.
    dense_walk_density: f64,
    stats: Option<DeviceStats>,
    seqs: Vec<Sequence>,
    shape: AttentionShape,
    block_size: usize,
    events: Option<StageEvents>,
}

/// The time between two recorded timing events (waits for `b`).
pub(crate) fn elapsed(a: &CudaEvent, b: &CudaEvent) -> Result<Duration> {
    let ms = a.elapsed_ms(b)?;
    Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
}

impl DeviceRun {
    /// Per (sequence, head), sequence-major: whether attention walked every causal block
    /// because the head's selected density reached the threshold where the sparse walk costs
    /// at least as much as the dense one. `None` when the call ran dense. Synchronises
    /// `stream` (the call's stream or one ordered after it).
    pub fn dense_walk(&self, stream: &Arc<CudaStream>) -> Result<Option<Vec<bool>>> {
        let Some(f) = &self.dense_walk else {
            return Ok(None);
        };
        let v = stream.clone_dtoh(f)?;
        stream.synchronize()?;
        Ok(Some(v.into_iter().map(|b| b != 0).collect()))
    }

    /// Device times of the stages, from the CUDA events of [`flex_prefill_device_timed`]
    /// (waits for the call's last event, not for the rest of the stream); `None` for a call
    /// queued without events. Stages that did not run stay `None`; transfers are not part of
    /// a device-resident call.
    #[allow(clippy::field_reassign_with_default)] // Default + assignment: Timings may grow
    pub fn timings(&self) -> Result<Option<Timings>> {
        let Some(ev) = &self.events else {
            return Ok(None);
        };
        let mut t = Timings::default();
        t.device_clock = true;
        match (&ev.stats, &ev.select) {
            (Some(s), Some(sel)) => {
                t.pattern_search = Some(elapsed(&ev.start, s)?);
                t.index_build = Some(elapsed(s, sel)?);
                t.attention = Some(elapsed(sel, &ev.end)?);
            }
            _ => t.attention = Some(elapsed(&ev.start, &ev.end)?),
        }
        Ok(Some(t))
    }

    /// The decisions of the call, read back from the device (synchronises `stream`, which
    /// must be the call's stream or one ordered after it): per-head pattern, distance,
    /// selected blocks and the exact representative mass; a dense call reports every head
    /// dense with the reason. Timings are filled when the call was timed.
    #[allow(clippy::field_reassign_with_default)] // Default + assignment: reports may grow
    pub fn report(&self, stream: &Arc<CudaStream>) -> Result<SparsityReport> {
        let mut report = match (&self.selection, &self.dense_reason) {
            (Some(sel), _) => {
                let st = self
                    .stats
                    .as_ref()
                    .expect("a sparse run keeps its statistics");
                let masses = rep_masses(stream, st)?;
                let (_, heads) = sel.to_host(stream, &st.layout, Some(&masses))?;
                let mut r = SparsityReport::default();
                r.heads = heads;
                if let Some(walk) = self.dense_walk(stream)? {
                    apply_dense_walk(&mut r, &walk, self.dense_walk_density);
                }
                r
            }
            (None, reason) => payoff::dense_report(
                &self.seqs,
                self.shape.num_heads,
                self.block_size,
                reason.clone().unwrap_or_default(),
            ),
        };
        if let Some(t) = self.timings()? {
            report.timings = t;
        }
        Ok(report)
    }
}

/// Reports the heads attention walked densely as dense heads (every causal block computed,
/// all of the mass; `js_distance` keeps the pattern decision), and when every head did, says
/// why the call ended up dense.
fn apply_dense_walk(report: &mut SparsityReport, walk: &[bool], max_density: f64) {
    let (mut n, mut selected, mut causal) = (0usize, 0usize, 0usize);
    for (h, _) in report.heads.iter_mut().zip(walk).filter(|(_, &w)| w) {
        n += 1;
        selected += h.selected_blocks;
        causal += h.causal_blocks;
        h.pattern = Pattern::Dense;
        h.dense_reason = Some(DenseReason::SparseCostsMore);
        h.selected_blocks = h.causal_blocks;
        h.density = 1.0;
        h.estimated_mass = 1.0;
    }
    if n > 0 && n == report.heads.len() && report.dense_fallback.is_none() {
        let d = selected as f64 / causal.max(1) as f64;
        report.dense_fallback = Some(format!(
            "selected density {d:.2} ≥ {max_density:.2}: sparse attention would cost more \
             than dense"
        ));
    }
}

/// Only the representative block masses (what the report's `estimated_mass` needs), not the
/// whole statistics, so reading a report back stays a small copy. (Default + assignment, not a
/// struct literal: core's structs may grow fields.)
#[allow(clippy::field_reassign_with_default)]
fn rep_masses(stream: &Arc<CudaStream>, st: &DeviceStats) -> Result<Vec<HeadStatistics>> {
    let l = &st.layout;
    let rbm = stream.clone_dtoh(&st.rep_block_mass)?;
    stream.synchronize()?;
    let h = l.shape.num_heads;
    let mut out = Vec::with_capacity(l.seqs.len() * h);
    for (si, s) in l.seqs.iter().enumerate() {
        let len = l.num_rep(si) * s.num_key_blocks(l.block_size);
        for head in 0..h {
            let o = l.rep_offset(si, head);
            let mut hs = HeadStatistics::default();
            hs.rep_block_mass = rbm.get(o..o + len).map(<[f32]>::to_vec).unwrap_or_default();
            out.push(hs);
        }
    }
    Ok(out)
}

/// The whole FlexPrefill call on device buffers, queued on `stream` with no host sync:
/// core's dense-or-sparse decision ([`payoff::dense_reason`] with the backend's threshold,
/// [`MIN_SPARSE_KV_LEN`] unless set otherwise), then
/// either the dense kernel, or statistics, selection and block-sparse attention over the
/// device index. `stream` must belong to the backend's context.
pub fn flex_prefill_device<T: StatsElem + DeviceElem>(
    backend: &crate::CudaBackend,
    stream: &Arc<CudaStream>,
    args: &AttentionArgs<'_, T>,
    cfg: &FlexPrefillConfig,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<DeviceRun> {
    run(
        backend,
        stream,
        args,
        cfg,
        out,
        lse,
        false,
        <T as StatsElem>::DTYPE,
    )
}

/// [`flex_prefill_device`] with CUDA timing events recorded between its stages, for
/// [`DeviceRun::timings`] (a few microseconds of event records; still no host sync).
pub fn flex_prefill_device_timed<T: StatsElem + DeviceElem>(
    backend: &crate::CudaBackend,
    stream: &Arc<CudaStream>,
    args: &AttentionArgs<'_, T>,
    cfg: &FlexPrefillConfig,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<DeviceRun> {
    run(
        backend,
        stream,
        args,
        cfg,
        out,
        lse,
        true,
        <T as StatsElem>::DTYPE,
    )
}

/// [`flex_prefill_device`] with every buffer from `ws`: no device allocation, no module load,
/// no host synchronisation (see [`Workspace`] for the one host wait on its table memory), so
/// the call can be captured in a CUDA graph. A batch beyond the workspace's limits returns
/// [`crate::CudaError::ExceedsWorkspace`] before anything is queued. The returned run's
/// buffers are the workspace's: read its report before the next call with `ws`.
pub fn flex_prefill_device_with<T: StatsElem + DeviceElem>(
    backend: &crate::CudaBackend,
    ws: &mut Workspace,
    stream: &Arc<CudaStream>,
    args: &AttentionArgs<'_, T>,
    cfg: &FlexPrefillConfig,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<DeviceRun> {
    ws.check(args.shape, <T as StatsElem>::DTYPE, args.seqs.seqs(), cfg)?;
    let mut scratch = ws.begin(stream)?;
    let r = run_in(
        backend,
        stream,
        &mut scratch,
        args,
        cfg,
        out,
        lse,
        false,
        <T as StatsElem>::DTYPE,
        None,
    );
    scratch.finish();
    r
}

/// Plans a call on `seqs` with launches off: the workspace bytes it takes (sparse path, plus
/// the raw entry's sequence table) and, as a side effect, every kernel it launches loaded.
pub(crate) fn plan(
    backend: &crate::CudaBackend,
    stream: &Arc<CudaStream>,
    limits: &WorkspaceLimits,
    seqs: &[Sequence],
) -> Result<WorkspaceSize> {
    fn typed<T: StatsElem + DeviceElem>(
        backend: &crate::CudaBackend,
        stream: &Arc<CudaStream>,
        limits: &WorkspaceLimits,
        seqs: &[Sequence],
    ) -> Result<WorkspaceSize> {
        let _guard = PlanGuard::new();
        let shape = limits.shape;
        let tq = seqs.iter().map(|s| s.q_start + s.q_len).max().unwrap_or(0);
        let tk = seqs.iter().map(|s| s.k_start + s.kv_len).max().unwrap_or(0);
        let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let dseqs = DeviceSeqs::new_in(stream, &mut Scratch::plan(), seqs)?;
        let q = plan_input::<T>(stream, tq * h * d);
        let k = plan_input::<T>(stream, tk * hkv * d);
        let mut out = plan_input::<T>(stream, tq * h * d);
        let mut lse = plan_input::<f32>(stream, tq * h);
        let args = AttentionArgs::new(&q, &k, &k, shape, &dseqs);
        let mut size = WorkspaceSize::default();
        for dense in [false, true] {
            // The raw entry's sequence table comes first, then the call's buffers.
            let mut s = Scratch::plan();
            let _ = DeviceSeqs::new_in(stream, &mut s, seqs)?;
            run_in(
                backend,
                stream,
                &mut s,
                &args,
                &limits.cfg,
                &mut out,
                Some(&mut lse),
                false,
                <T as StatsElem>::DTYPE,
                Some(dense),
            )?;
            let used = s.used();
            size.device_bytes = size.device_bytes.max(used.device_bytes);
            size.host_bytes = size.host_bytes.max(used.host_bytes);
        }
        Ok(size)
    }
    match limits.dtype {
        flexprefill_core::DType::BF16 => typed::<half::bf16>(backend, stream, limits, seqs),
        flexprefill_core::DType::F16 => typed::<half::f16>(backend, stream, limits, seqs),
        flexprefill_core::DType::F32 => Err(crate::CudaError::Unsupported {
            op: "workspace",
            message: "f32 tensors: the kernels take bf16 or f16".into(),
        }),
    }
}

/// The call with fresh allocations; see [`run_in`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<T: StatsElem + DeviceElem>(
    backend: &crate::CudaBackend,
    stream: &Arc<CudaStream>,
    args: &AttentionArgs<'_, T>,
    cfg: &FlexPrefillConfig,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
    timed: bool,
    input_dtype: flexprefill_core::DType,
) -> Result<DeviceRun> {
    let mut scratch = Scratch::alloc();
    run_in(
        backend,
        stream,
        &mut scratch,
        args,
        cfg,
        out,
        lse,
        timed,
        input_dtype,
        None,
    )
}

/// The call; `input_dtype` is the caller's dtype before upload (the host API runs f32 inputs
/// as bf16, but the original's bf16 rounding points are replayed only for real bf16 inputs, as
/// on the CPU). `force_dense` overrides the decision (a workspace plan sizes both paths).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_in<T: StatsElem + DeviceElem>(
    backend: &crate::CudaBackend,
    stream: &Arc<CudaStream>,
    scratch: &mut Scratch<'_>,
    args: &AttentionArgs<'_, T>,
    cfg: &FlexPrefillConfig,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
    timed: bool,
    input_dtype: flexprefill_core::DType,
    force_dense: Option<bool>,
) -> Result<DeviceRun> {
    cfg.validate()?;
    let record = || -> Result<Option<CudaEvent>> {
        Ok(if timed {
            Some(stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
        } else {
            None
        })
    };
    let seqs = args.seqs.seqs();
    let mut run = DeviceRun {
        selection: None,
        dense_reason: match force_dense {
            None => payoff::dense_reason(seqs, cfg, backend.min_sparse_kv_len()),
            Some(true) => Some("planning the dense path".into()),
            Some(false) => None,
        },
        dense_walk: None,
        dense_walk_density: dense_walk_density(),
        stats: None,
        seqs: seqs.to_vec(),
        shape: args.shape,
        block_size: cfg.block_size,
        events: None,
    };
    let start = record()?;
    let (mut ev_stats, mut ev_select) = (None, None);
    if run.dense_reason.is_some() {
        backend.attention_device(stream, args, None, None, out, lse)?;
    } else {
        let dev = backend.device();
        let layout = StatsLayout::for_mode(seqs, args.shape, cfg)?;
        let scale = args
            .softmax_scale
            .unwrap_or(1.0 / (args.shape.head_dim as f32).sqrt());
        let (scale, emulate) = crate::stats::estimation_scale(args.shape, scale, input_dtype, cfg);
        // Sizes the selection kernels cannot address fail here, before the statistics launch.
        crate::select::check_sizes(&layout, cfg)?;
        let mut st = launch_stats_in(dev, stream, scratch, args.q, args.k, layout, scale, emulate)?;
        ev_stats = record()?;
        let sel = launch_select_in(dev, stream, scratch, Some(args.q), &mut st, cfg)?;
        // SAFETY: `dense_walk_choose` writes the flag of every (sequence, head) before
        // attention reads any (one CTA per pair, unconditional store), so no memset.
        let mut walk = unsafe { scratch.take::<u8>(stream, seqs.len() * args.shape.num_heads) }?;
        choose_dense_walk_into(
            dev,
            stream,
            args.seqs,
            &sel.index,
            run.dense_walk_density,
            &mut walk,
        )?;
        ev_select = record()?;
        backend.attention_device_walk(stream, args, Some(&sel.index), Some(&walk), out, lse)?;
        run.dense_walk = Some(walk);
        run.selection = Some(sel);
        run.stats = Some(st);
    }
    if let (Some(start), Some(end)) = (start, record()?) {
        run.events = Some(StageEvents {
            start,
            stats: ev_stats,
            select: ev_select,
            end,
        });
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three heads of a 1000-token sequence at block 128 (36 causal blocks each), selected
    /// 33, 10 and 36.
    fn report() -> SparsityReport {
        let mut r = payoff::dense_report(&[Sequence::whole(1000)], 3, 128, String::new());
        r.dense_fallback = None;
        for (h, (sel, pat)) in r.heads.iter_mut().zip([
            (33, Pattern::QueryAware),
            (10, Pattern::VerticalSlash),
            (36, Pattern::VerticalSlash),
        ]) {
            h.pattern = pat;
            h.selected_blocks = sel;
            h.density = sel as f64 / h.causal_blocks as f64;
            h.estimated_mass = 0.9;
            h.js_distance = 0.5;
        }
        r
    }

    #[test]
    fn dense_walked_heads_are_reported_dense() {
        let mut r = report();
        assert_eq!(r.heads[0].causal_blocks, 36);
        apply_dense_walk(&mut r, &[true, false, true], DENSE);
        let h = &r.heads;
        assert_eq!(
            (h[0].pattern, h[0].selected_blocks, h[0].density),
            (Pattern::Dense, 36, 1.0)
        );
        assert_eq!((h[0].estimated_mass, h[0].js_distance), (1.0, 0.5));
        assert_eq!(h[1], report().heads[1], "an unflagged head is left alone");
        assert_eq!(h[2].pattern, Pattern::Dense);
        assert_eq!(h[0].dense_reason, Some(DenseReason::SparseCostsMore));
        assert_eq!(r.dense_fallback, None, "one head still ran sparse");
    }

    #[test]
    fn every_head_dense_walked_says_why() {
        let mut r = report();
        apply_dense_walk(&mut r, &[true; 3], DENSE);
        let why = r.dense_fallback.clone().expect("every head walked dense");
        // (33 + 10 + 36) / 108 selected.
        assert_eq!(
            why,
            "selected density 0.73 ≥ 0.70: sparse attention would cost more than dense"
        );
        assert_eq!(r.density(), 1.0);
        // A reason from before the attention (none here) is never overwritten.
        let mut r = report();
        r.dense_fallback = Some("kept".into());
        apply_dense_walk(&mut r, &[true; 3], DENSE);
        assert_eq!(r.dense_fallback.as_deref(), Some("kept"));
    }

    const DENSE: f64 = 0.7;
}
