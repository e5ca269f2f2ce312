//! The sparsity report as plain Python values; `flexprefill/report.py` wraps them in dataclasses.

use flexprefill_core::SparsityReport;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// `call_seconds` is the whole Rust call (input checks, selection, attention): what the
/// binding's overhead is measured against.
/// `{"backend", "dense_fallback", "timings": {...seconds}, "heads": [(seq, head, pattern,
/// js_distance, selected_blocks, causal_blocks, density, estimated_mass), ...]}`.
pub(crate) fn to_dict<'py>(
    py: Python<'py>,
    r: &SparsityReport,
    backend: &str,
    call_seconds: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let heads = PyList::empty(py);
    for h in &r.heads {
        heads.append((
            h.seq,
            h.head,
            h.pattern.name(),
            h.js_distance,
            h.selected_blocks,
            h.causal_blocks,
            h.density,
            h.estimated_mass,
        ))?;
    }
    let timings = PyDict::new(py);
    timings.set_item(
        "pattern_search",
        r.timings.pattern_search.map(|d| d.as_secs_f64()),
    )?;
    timings.set_item(
        "index_build",
        r.timings.index_build.map(|d| d.as_secs_f64()),
    )?;
    timings.set_item("attention", r.timings.attention.map(|d| d.as_secs_f64()))?;
    timings.set_item("call", call_seconds)?;
    let d = PyDict::new(py);
    d.set_item("backend", backend)?;
    d.set_item("dense_fallback", r.dense_fallback.as_deref())?;
    d.set_item("timings", timings)?;
    d.set_item("heads", heads)?;
    Ok(d)
}
