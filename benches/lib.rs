//! Shared setup of the benchmarks: the workload of the CPU speed bar, FLOP counts, and an
//! sgemm peak measurement, so the criterion bench (`cargo bench -p flexprefill-benches --bench
//! cpu`) and the quick example (`cargo run --release -p flexprefill-benches --example
//! cpu_quick`) measure exactly the same things.

use std::time::{Duration, Instant};

use flexprefill_core::{AttentionInput, AttentionShape};
use flexprefill_testkit::workload::{generate, Workload, WorkloadKind, WorkloadSpec};
use rayon::prelude::*;

/// The speed bar's shape: 8 query heads over 2 kv heads, head_dim 128, one sequence.
pub const HEADS: usize = 8;
/// Key/value heads.
pub const KV_HEADS: usize = 2;
/// Head width.
pub const HEAD_DIM: usize = 128;
/// Sequence length of the speed bar.
pub const SEQ_LEN: usize = 16384;
/// Sequence length of the quick mode.
pub const QUICK_SEQ_LEN: usize = 4096;

/// `FLEXPREFILL_BENCH_QUICK=1` (any value but `0`/empty) shrinks the benchmark to
/// [`QUICK_SEQ_LEN`] tokens, for numbers in a minute rather than a few.
pub fn quick() -> bool {
    std::env::var("FLEXPREFILL_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The sequence length to bench: [`SEQ_LEN`], or [`QUICK_SEQ_LEN`] in quick mode, or
/// `FLEXPREFILL_BENCH_SEQ` when set to a number.
pub fn seq_len() -> usize {
    std::env::var("FLEXPREFILL_BENCH_SEQ")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick() { QUICK_SEQ_LEN } else { SEQ_LEN })
}

/// The structured workload FlexPrefill is timed on (planted heads of every kind, seed 0).
pub fn workload(kind: WorkloadKind, seq_len: usize) -> Workload {
    generate(&WorkloadSpec {
        kind,
        batch: 1,
        seq_len,
        num_heads: HEADS,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        seed: 0,
    })
}

/// Borrows a workload as a single-sequence f32 input.
pub fn input(w: &Workload) -> AttentionInput<'_> {
    let n = w.spec.seq_len;
    let shape = AttentionShape::new(w.spec.num_heads, w.spec.num_kv_heads, w.spec.head_dim)
        .expect("bench shape is valid");
    AttentionInput::batched(&w.q, &w.k, &w.v, 1, n, n, shape).expect("workload is a valid input")
}

/// Dense-equivalent FLOPs of causal attention: `2·n²·d` per head (QKᵀ and PV, each `2·n·n·d`
/// over the full square, halved by causality).
pub fn dense_causal_flops(seq_len: usize, heads: usize, head_dim: usize) -> f64 {
    2.0 * (seq_len as f64).powi(2) * head_dim as f64 * heads as f64
}

/// Square sgemm size of the peak measurement: large enough for matrixmultiply to reach its
/// steady state, small enough to stay in the last-level cache on the bench machine.
pub const SGEMM_N: usize = 1024;

/// `threads` independent `n×n` sgemm problems, run by [`SgemmProblem::run`].
pub struct SgemmProblem {
    n: usize,
    bufs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

impl SgemmProblem {
    /// `threads` independent problems of size `n`.
    pub fn new(n: usize, threads: usize) -> Self {
        let bufs = (0..threads)
            .map(|t| {
                let a = (0..n * n).map(|i| ((i + t) % 7) as f32 * 0.1).collect();
                let b = (0..n * n).map(|i| ((i * 3 + t) % 5) as f32 * 0.1).collect();
                (a, b, vec![0.0f32; n * n])
            })
            .collect();
        Self { n, bufs }
    }

    /// FLOPs of one call of [`Self::run`]: `2·n³` per problem.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3) * self.bufs.len() as f64
    }

    /// Runs every problem once, one per rayon thread (matrixmultiply itself is
    /// single-threaded in this workspace, so this is the machine's aggregate sgemm rate).
    pub fn run(&mut self) {
        let n = self.n;
        self.bufs.par_iter_mut().for_each(|(a, b, c)| {
            // SAFETY: a, b, c are n×n row-major buffers owned here; c does not alias a or b.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    n,
                    n,
                    1.0,
                    a.as_ptr(),
                    n as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        });
    }
}

/// Median wall time of `reps` runs of `f` (after one warm-up run).
pub fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// CPU time (user + system, all threads) this process has used, from `/proc/self/stat`
/// (clock-tick resolution, 10 ms); `None` where that file is missing. Under load from other
/// processes it measures the work done rather than the time waited for a core, so ratios
/// between two CPU-bound paths stay meaningful on a shared machine.
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / 100.0))
}

/// Wall and CPU time of one run of `f`.
pub fn timed(f: impl FnOnce()) -> (Duration, Option<Duration>) {
    let c0 = process_cpu_time();
    let t = Instant::now();
    f();
    let wall = t.elapsed();
    let cpu = c0.zip(process_cpu_time()).map(|(a, b)| b.saturating_sub(a));
    (wall, cpu)
}

/// Median of `xs` (sorted in place); NaN when empty.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
