//! The JSON report of `run` and `demo` (schema documented in docs/CLI.md; keep it stable:
//! add keys, never rename or remove them) and its plain-text rendering.

use std::fmt::Write as _;
use std::time::Duration;

use flexprefill_core::{FlexPrefillConfig, QueryAwareCut, SelectionMode, SparsityReport};
use flexprefill_testkit::oracle::HeadOracle;
use serde::Serialize;

use crate::compare::Comparison;

/// Version of the JSON layout; bumped only for incompatible changes.
pub const SCHEMA_VERSION: u32 = 2;

/// Every knob that decided which blocks were computed, plus the softmax scale.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigJson {
    /// Cumulative attention threshold.
    pub gamma: f32,
    /// sqrt-JS threshold for query-aware heads.
    pub tau: f32,
    /// Tokens per block.
    pub block_size: usize,
    /// Minimum budget, tokens.
    pub min_budget: usize,
    /// Optional cap, tokens.
    pub max_budget: Option<usize>,
    /// `flattened` or `per_query_block`.
    pub query_aware_cut: &'static str,
    /// Key block 0 always computed.
    pub forced_sink: bool,
    /// Diagonal blocks always computed.
    pub forced_diagonal: bool,
    /// `faithful` or `original`.
    pub selection: &'static str,
    /// Scale of q·k actually used.
    pub softmax_scale: f32,
}

impl ConfigJson {
    /// The JSON view of a config.
    pub fn new(cfg: &FlexPrefillConfig, softmax_scale: f32) -> Self {
        Self {
            gamma: cfg.gamma,
            tau: cfg.tau,
            block_size: cfg.block_size,
            min_budget: cfg.min_budget,
            max_budget: cfg.max_budget,
            query_aware_cut: match cfg.query_aware_cut {
                QueryAwareCut::Flattened => "flattened",
                QueryAwareCut::PerQueryBlock => "per_query_block",
            },
            forced_sink: cfg.forced.sink,
            forced_diagonal: cfg.forced.diagonal,
            selection: match cfg.selection {
                SelectionMode::Faithful => "faithful",
                SelectionMode::Original => "original",
                SelectionMode::Sampled => "sampled",
            },
            softmax_scale,
        }
    }
}

/// One (batch, head).
#[derive(Debug, Clone, Serialize)]
pub struct HeadJson {
    /// Sequence in the batch.
    pub batch: usize,
    /// Query head.
    pub head: usize,
    /// `query_aware`, `vertical_slash` or `dense` (dense fallback).
    pub pattern: &'static str,
    /// Why the head is `dense`: `short_sequence`, `selected_every_block` or `call_ran_dense`;
    /// `null` for a sparse head.
    pub dense_reason: Option<&'static str>,
    /// The structure planted in this head (demo only): `sink_local`, `stripes`, `topics`,
    /// `needle` or `random`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planted: Option<&'static str>,
    /// Eq. 2 distance; `null` when not computed.
    pub js_distance: Option<f32>,
    /// Blocks computed.
    pub selected_blocks: usize,
    /// Causal blocks.
    pub causal_blocks: usize,
    /// selected / causal.
    pub density: f64,
    /// Mass the selection believed it kept on the representative queries.
    pub estimated_mass: Option<f32>,
    /// ‖o − o_dense‖₂ / ‖o_dense‖₂ over this head (with --compare-dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_l2_vs_dense: Option<f64>,
    /// max |o − o_dense| over this head (with --compare-dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_vs_dense: Option<f64>,
    /// Mean over query rows of the true attention mass inside the selected blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass_captured: Option<f64>,
    /// Smallest per-row captured mass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_mass_captured: Option<f64>,
    /// Fraction of query rows whose captured mass is below gamma.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_below_gamma: Option<f64>,
    /// Mean-row oracle density at gamma (with --compare-dense; `null` on a backend that does
    /// not compute it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_density: Option<Option<f64>>,
    /// Every-row oracle density at gamma (as `oracle_density`; `null` on the CUDA backend,
    /// which computes the mean-row oracle only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_density_every_row: Option<Option<f64>>,
}

/// Time split, milliseconds. A stage that did not run is `null`, never 0.
#[derive(Debug, Clone, Serialize)]
pub struct TimingsJson {
    /// How the stage times were measured: `device_events` (CUDA events around the queued
    /// work) or `host` (host clock).
    pub clock: &'static str,
    /// Representative attention and the pattern decision (on CUDA: the statistics kernels).
    pub pattern_search: Option<f64>,
    /// Block selection and CSR build (on CUDA: the selection kernels, pattern decision
    /// included).
    pub index_build: Option<f64>,
    /// Attention (block-sparse, or dense when the call ran dense).
    pub attention: Option<f64>,
    /// Sum of the stages that ran: what the speed-up compares.
    pub compute: f64,
    /// Host-to-device copies of the inputs (device backends).
    pub upload: Option<f64>,
    /// Device-to-host copies of the outputs and decisions (device backends).
    pub download: Option<f64>,
    /// The whole FlexPrefill call, host clock, transfers included.
    pub total: f64,
    /// Dense attention's compute time, measured like `compute` (with --compare-dense or in
    /// the demo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense: Option<f64>,
    /// The whole dense call, host clock, transfers included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_total: Option<f64>,
    /// The untimed warm-up pass run before timing on GPU backends (kernel compilation or
    /// kernel cache load at first use); absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct RunJson {
    /// Layout version of this object.
    pub schema_version: u32,
    /// `cpu` or `cuda`.
    pub backend: &'static str,
    /// Why this backend was used.
    pub backend_reason: String,
    /// Where q/k/v came from (file paths, or the demo workload).
    pub input: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: &'static str,
    /// Sequences.
    pub batch: usize,
    /// Query tokens per sequence.
    pub seq_len: usize,
    /// Key tokens per sequence (= seq_len except for chunked-prefill dumps).
    pub kv_len: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Every knob used.
    pub config: ConfigJson,
    /// One entry per (batch, head), batch-major.
    pub heads: Vec<HeadJson>,
    /// Computed blocks / causal blocks over all heads.
    pub density: f64,
    /// Why the whole call ran dense, if it did.
    pub dense_fallback: Option<String>,
    /// Timings, milliseconds.
    pub timings_ms: TimingsJson,
    /// Overall relative L2 error vs dense (with --compare-dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_l2_vs_dense: Option<f64>,
    /// Overall max abs error vs dense (with --compare-dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_vs_dense: Option<f64>,
    /// Mean captured mass over every row of every head (with --compare-dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass_captured: Option<f64>,
    /// Fraction of all (row, head) pairs below gamma (with --compare-dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_below_gamma: Option<f64>,
    /// Mean-row oracle density over all heads: the fewest blocks per query block, in order of
    /// true mean-row mass, holding gamma, over causal blocks (with --compare-dense; `null`
    /// where the backend does not compute it, see `oracle_note`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_density: Option<Option<f64>>,
    /// The same with every row of the query block holding gamma (`null` where the backend
    /// computes the mean-row oracle only, see `oracle_note`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_density_every_row: Option<Option<f64>>,
    /// Why an oracle density is `null`, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_note: Option<String>,
}

/// One (sequence, head)'s oracle block counts at gamma, from whichever backend computed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OracleHead {
    /// Mean-row oracle blocks.
    pub mean_row_blocks: usize,
    /// Every-row oracle blocks; `None` where the backend computes the mean row only (CUDA:
    /// the every-row oracle needs every row's own block distribution).
    pub every_row_blocks: Option<usize>,
    /// Causal blocks of the sequence.
    pub causal_blocks: usize,
}

impl OracleHead {
    fn mean_row(&self) -> f64 {
        self.mean_row_blocks as f64 / self.causal_blocks.max(1) as f64
    }

    fn every_row(&self) -> Option<f64> {
        self.every_row_blocks
            .map(|b| b as f64 / self.causal_blocks.max(1) as f64)
    }

    /// Blocks over causal blocks of several heads, summed: (mean row, every row).
    fn overall(heads: &[OracleHead]) -> (f64, Option<f64>) {
        let causal = heads.iter().map(|o| o.causal_blocks).sum::<usize>().max(1) as f64;
        let mean = heads.iter().map(|o| o.mean_row_blocks).sum::<usize>() as f64 / causal;
        // any head without the every-row count leaves the overall one out
        let every: Option<usize> = heads.iter().map(|o| o.every_row_blocks).sum();
        (mean, every.map(|e| e as f64 / causal))
    }
}

impl From<HeadOracle> for OracleHead {
    fn from(o: HeadOracle) -> Self {
        Self {
            mean_row_blocks: o.mean_row_blocks,
            every_row_blocks: Some(o.every_row_blocks),
            causal_blocks: o.causal_blocks,
        }
    }
}

impl From<flexprefill_cuda::oracle::MeanRowOracle> for OracleHead {
    fn from(o: flexprefill_cuda::oracle::MeanRowOracle) -> Self {
        Self {
            mean_row_blocks: o.blocks,
            every_row_blocks: None,
            causal_blocks: o.causal_blocks,
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// What `run`/`demo` measured, before it becomes JSON or text.
pub struct Measured<'a> {
    /// Backend name.
    pub backend: &'static str,
    /// Why that backend.
    pub backend_reason: String,
    /// Input description.
    pub input: String,
    /// Input dims: (dtype, batch, q_len, kv_len, heads, kv heads, head_dim).
    pub dims: (&'static str, usize, usize, usize, usize, usize, usize),
    /// Config used.
    pub cfg: &'a FlexPrefillConfig,
    /// Softmax scale used.
    pub softmax_scale: f32,
    /// FlexPrefill's report.
    pub report: &'a SparsityReport,
    /// Wall time of the FlexPrefill call.
    pub total: Duration,
    /// Wall time of dense attention, when run.
    pub dense: Option<Duration>,
    /// Dense's own split, when run.
    pub dense_timings: Option<flexprefill_core::Timings>,
    /// Wall time of the warm-up pass, when run.
    pub warmup: Option<Duration>,
    /// The comparison, when run.
    pub comparison: Option<&'a Comparison>,
    /// Per query head, the planted structure (demo).
    pub planted: Option<Vec<&'static str>>,
    /// With the comparison: per (sequence, head) oracle block counts, `None` inside where the
    /// backend does not compute them.
    pub oracle: Option<Option<&'a [OracleHead]>>,
}

impl Measured<'_> {
    /// The JSON object.
    pub fn to_json(&self) -> RunJson {
        let (dtype, batch, seq_len, kv_len, num_heads, num_kv_heads, head_dim) = self.dims;
        let heads = self
            .report
            .heads
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let c = self.comparison.map(|c| &c.heads[i]);
                HeadJson {
                    batch: h.seq,
                    head: h.head,
                    pattern: h.pattern.name(),
                    dense_reason: h.dense_reason.map(|r| r.name()),
                    planted: self.planted.as_ref().and_then(|p| p.get(h.head).copied()),
                    js_distance: h.js_distance.is_finite().then_some(h.js_distance),
                    selected_blocks: h.selected_blocks,
                    causal_blocks: h.causal_blocks,
                    density: h.density,
                    estimated_mass: h.estimated_mass.is_finite().then_some(h.estimated_mass),
                    rel_l2_vs_dense: c.map(|c| c.rel_l2),
                    max_abs_vs_dense: c.map(|c| c.max_abs),
                    mass_captured: c.map(|c| c.mass_captured),
                    min_mass_captured: c.map(|c| c.min_mass_captured),
                    rows_below_gamma: c.map(|c| c.rows_below_gamma),
                    oracle_density: self.oracle.map(|o| o.map(|o| o[i].mean_row())),
                    oracle_density_every_row: self.oracle.map(|o| o.and_then(|o| o[i].every_row())),
                }
            })
            .collect();
        let t = &self.report.timings;
        RunJson {
            schema_version: SCHEMA_VERSION,
            backend: self.backend,
            backend_reason: self.backend_reason.clone(),
            input: self.input.clone(),
            dtype,
            batch,
            seq_len,
            kv_len,
            num_heads,
            num_kv_heads,
            head_dim,
            config: ConfigJson::new(self.cfg, self.softmax_scale),
            heads,
            density: self.report.density(),
            dense_fallback: self.report.dense_fallback.clone(),
            timings_ms: TimingsJson {
                clock: if t.device_clock {
                    "device_events"
                } else {
                    "host"
                },
                pattern_search: t.pattern_search.map(ms),
                index_build: t.index_build.map(ms),
                attention: t.attention.map(ms),
                compute: ms(t.compute()),
                upload: t.upload.map(ms),
                download: t.download.map(ms),
                total: ms(self.total),
                dense: self.dense_timings.map(|d| ms(d.compute())),
                dense_total: self.dense.map(ms),
                warmup: self.warmup.map(ms),
            },
            rel_l2_vs_dense: self.comparison.map(|c| c.rel_l2),
            max_abs_vs_dense: self.comparison.map(|c| c.max_abs),
            mass_captured: self.comparison.map(|c| c.mass_captured),
            rows_below_gamma: self.comparison.map(|c| c.rows_below_gamma),
            oracle_density: self.oracle.map(|o| o.map(|o| OracleHead::overall(o).0)),
            oracle_density_every_row: self.oracle.map(|o| o.and_then(|o| OracleHead::overall(o).1)),
            oracle_note: match self.oracle {
                Some(None) => Some(format!("not computed on the {} backend", self.backend)),
                Some(Some(o)) if OracleHead::overall(o).1.is_none() => Some(format!(
                    "every-row oracle not computed on the {} backend (mean row from its block-pooled probabilities)",
                    self.backend
                )),
                _ => None,
            },
        }
    }

    /// The plain-text table printed without --json.
    pub fn to_text(&self) -> String {
        let j = self.to_json();
        let mut s = String::new();
        let _ = writeln!(s, "backend  {} ({})", j.backend, j.backend_reason);
        let _ = writeln!(
            s,
            "input    {}: batch {}, seq {}{}, heads {} (kv {}), head_dim {}, {}",
            j.input,
            j.batch,
            j.seq_len,
            if j.kv_len != j.seq_len {
                format!(" (kv {})", j.kv_len)
            } else {
                String::new()
            },
            j.num_heads,
            j.num_kv_heads,
            j.head_dim,
            j.dtype
        );
        let c = &j.config;
        let _ = writeln!(
            s,
            "config   gamma {}, tau {}, block {}, min_budget {}{}, {} selection, {} query-aware cut",
            c.gamma,
            c.tau,
            c.block_size,
            c.min_budget,
            c.max_budget
                .map(|m| format!(", max_budget {m}"))
                .unwrap_or_default(),
            c.selection,
            c.query_aware_cut
        );
        if let Some(why) = &j.dense_fallback {
            let _ = writeln!(s, "note     {why}");
        }
        let cmp = self.comparison.is_some();
        let planted = self.planted.is_some();
        let reasons = j.heads.iter().any(|h| h.dense_reason.is_some());
        let _ = writeln!(s);
        let _ = write!(s, "{:>5} {:>4}  ", "batch", "head");
        if planted {
            let _ = write!(s, "{:<11}", "planted");
        }
        let _ = write!(
            s,
            "{:<14} {:>6} {:>7} {:>11}",
            "pattern", "js", "density", "blocks"
        );
        if cmp {
            let _ = write!(
                s,
                " {:>9} {:>9} {:>7} {:>7} {:>7} {:>7}",
                "rel_l2", "max_abs", "mass", "min", "rows<γ", "oracle"
            );
        }
        if reasons {
            let _ = write!(s, "  dense_reason");
        }
        let _ = writeln!(s);
        for h in &j.heads {
            let _ = write!(s, "{:>5} {:>4}  ", h.batch, h.head);
            if planted {
                let _ = write!(s, "{:<11}", h.planted.unwrap_or("-"));
            }
            let _ = write!(
                s,
                "{:<14} {:>6} {:>6.1}% {:>11}",
                h.pattern,
                h.js_distance
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or_else(|| "-".into()),
                100.0 * h.density,
                format!("{}/{}", h.selected_blocks, h.causal_blocks)
            );
            if cmp {
                let _ = write!(
                    s,
                    " {:>9.2e} {:>9.4} {:>7.4} {:>7.4} {:>6.1}% {:>7}",
                    h.rel_l2_vs_dense.unwrap_or(f64::NAN),
                    h.max_abs_vs_dense.unwrap_or(f64::NAN),
                    h.mass_captured.unwrap_or(f64::NAN),
                    h.min_mass_captured.unwrap_or(f64::NAN),
                    100.0 * h.rows_below_gamma.unwrap_or(f64::NAN),
                    h.oracle_density
                        .flatten()
                        .map_or("-".into(), |d| format!("{:.1}%", 100.0 * d))
                );
            }
            if let Some(r) = h.dense_reason {
                let _ = write!(s, "  {r}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
        let _ = write!(
            s,
            "density  {:.1}% of causal blocks computed",
            100.0 * j.density
        );
        if let (Some(r), Some(m)) = (j.rel_l2_vs_dense, j.mass_captured) {
            let _ = write!(
                s,
                "; rel_l2 vs dense {r:.2e}; mean mass captured {m:.4}, {:.2}% of rows below gamma",
                100.0 * j.rows_below_gamma.unwrap_or(0.0)
            );
        }
        let _ = writeln!(s);
        match (j.oracle_density, &j.oracle_note) {
            (Some(Some(o)), _) => {
                let every = match j.oracle_density_every_row.flatten() {
                    Some(e) => format!("{:.1}% on every row", 100.0 * e),
                    None => format!("every row not computed on {}", j.backend),
                };
                let _ = writeln!(
                    s,
                    "oracle   {:.1}% of causal blocks hold gamma on the mean row ({every}); this run: {:.2}x",
                    100.0 * o,
                    j.density / o
                );
            }
            (_, Some(note)) => {
                let _ = writeln!(s, "oracle   {note}");
            }
            _ => {}
        }
        let t = &j.timings_ms;
        let stages: Vec<String> = [
            ("pattern search", t.pattern_search),
            ("index", t.index_build),
            ("attention", t.attention),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n} {v:.2}")))
        .collect();
        let clock = if t.clock == "device_events" {
            " on the device"
        } else {
            ""
        };
        let _ = write!(
            s,
            "time     flexprefill {:.2} ms{clock} ({})",
            t.compute,
            stages.join(", ")
        );
        if let Some(d) = t.dense {
            let _ = write!(
                s,
                "; dense {d:.2} ms; speed-up {:.2}x",
                d / t.compute.max(1e-3)
            );
        }
        let _ = writeln!(s);
        if let (Some(u), Some(dl)) = (t.upload, t.download) {
            let _ = write!(
                s,
                "         transfers beside it: upload {u:.1} ms, download {dl:.1} ms; whole call {:.1} ms",
                t.total
            );
            if let Some(dt) = t.dense_total {
                let _ = write!(s, " (dense {dt:.1} ms)");
            }
            let _ = writeln!(s);
        }
        if let Some(w) = t.warmup {
            let _ = writeln!(
                s,
                "         (after an untimed warm-up pass of {w:.1} ms: kernels compiled or loaded from the kernel cache at first use)"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexprefill_core::Sequence;

    /// A report of two heads of a 1000-token sequence at block 128 (36 causal blocks each)
    /// with `oracle` beside it, as JSON and text.
    fn view(oracle: &[OracleHead], backend: &'static str) -> (RunJson, String) {
        let report =
            flexprefill_core::payoff::dense_report(&[Sequence::whole(1000)], 2, 128, String::new());
        let cfg = FlexPrefillConfig::default();
        let m = Measured {
            backend,
            backend_reason: String::new(),
            input: String::new(),
            dims: ("bf16", 1, 1000, 1000, 2, 1, 64),
            cfg: &cfg,
            softmax_scale: 0.125,
            report: &report,
            total: Duration::ZERO,
            dense: None,
            dense_timings: None,
            warmup: None,
            comparison: None,
            planted: None,
            oracle: Some(Some(oracle)),
        };
        (m.to_json(), m.to_text())
    }

    #[test]
    fn the_mean_row_oracle_alone_reports_the_every_row_one_as_null() {
        let heads = [9, 18].map(|b| OracleHead {
            mean_row_blocks: b,
            every_row_blocks: None,
            causal_blocks: 36,
        });
        let (j, text) = view(&heads, "cuda");
        assert_eq!(j.oracle_density, Some(Some(27.0 / 72.0)));
        assert_eq!(j.oracle_density_every_row, Some(None));
        assert!(j
            .oracle_note
            .as_deref()
            .is_some_and(|n| n.contains("every-row")));
        assert_eq!(j.heads[1].oracle_density, Some(Some(0.5)));
        assert_eq!(j.heads[1].oracle_density_every_row, Some(None));
        assert!(text.contains("37.5% of causal blocks hold gamma on the mean row (every row not computed on cuda)"), "{text}");
    }

    #[test]
    fn both_oracles_come_through_from_the_test_kit() {
        let heads = [(9, 12), (18, 27)].map(|(m, e)| {
            OracleHead::from(HeadOracle {
                mean_row: 0.0,
                every_row: 0.0,
                mean_row_blocks: m,
                every_row_blocks: e,
                causal_blocks: 36,
            })
        });
        let (j, text) = view(&heads, "cpu");
        assert_eq!(j.oracle_density, Some(Some(0.375)));
        assert_eq!(j.oracle_density_every_row, Some(Some(39.0 / 72.0)));
        assert_eq!(j.oracle_note, None);
        assert_eq!(j.heads[0].oracle_density_every_row, Some(Some(12.0 / 36.0)));
        assert!(text.contains("(54.2% on every row)"), "{text}");
    }
}
