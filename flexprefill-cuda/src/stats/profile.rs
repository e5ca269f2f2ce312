//! Per-kernel timing for benches: with `FLEXPREFILL_PROFILE` set, every launch of the stats and
//! select paths records a CUDA event after it; [`take`] syncs and returns the time of
//! each kernel. Off (no event, no sync) otherwise.

use std::cell::RefCell;
use std::sync::OnceLock;

use cudarc::driver::{CudaEvent, CudaStream};

thread_local! {
    static MARKS: RefCell<Vec<(&'static str, CudaEvent)>> = const { RefCell::new(Vec::new()) };
}

/// Whether `FLEXPREFILL_PROFILE` is set (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FLEXPREFILL_PROFILE").is_some())
}

/// Records an event named `name` on `stream` (after the work queued so far).
pub fn mark(stream: &CudaStream, name: &'static str) {
    if !enabled() {
        return;
    }
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    if let Ok(e) = stream.record_event(flags) {
        MARKS.with(|m| m.borrow_mut().push((name, e)));
    }
}

/// Waits for the last mark and returns (name, ms since the previous mark), emptying the list.
pub fn take() -> Vec<(&'static str, f32)> {
    let marks = MARKS.with(|m| std::mem::take(&mut *m.borrow_mut()));
    if let Some((_, last)) = marks.last() {
        let _ = last.synchronize();
    }
    marks
        .windows(2)
        .map(|w| (w[1].0, w[0].1.elapsed_ms(&w[1].1).unwrap_or(f32::NAN)))
        .collect()
}
