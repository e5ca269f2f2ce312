//! The backend-agreement harness: does a backend agree with the f64 oracle and with the CPU
//! backend's block selection, over a fixed list of cases?
//!
//! Any backend plugs in through [`Backend`] (the CUDA crate runs it from its GPU tests, with the
//! testkit as a dev-dependency). For every case, in every requested dtype, it checks:
//!
//! 1. `dense_attention` against the dense f64 oracle (output relative L2 and LSE);
//! 2. `select_index` against [`CpuBackend::select_index`] on the same input: the same blocks for
//!    every (sequence, head, query block), and the same pattern per head;
//! 3. `sparse_attention` on the CPU's index against the f64 oracle on that index's token mask;
//! 4. `flex_prefill` against the f64 oracle on the backend's own index;
//! 5. every output and LSE element written: a backend under test poisons its output buffers
//!    (NaN) before its kernels run, so a skipped element shows up as non-finite here.
//!
//! Tolerances (relative L2 of the output; LSE as `|Δ| / (1 + |lse|)`) depend on the dtype:
//! f32 1e-5, f16 5e-3, bf16 1e-2 (see [`crate::properties::output_tolerance`] for why).
//!
//! ```
//! use flexprefill_cpu::CpuBackend;
//! use flexprefill_testkit::agreement::{self, AgreementOptions};
//! use flexprefill_core::DType;
//!
//! let opts = AgreementOptions { dtypes: vec![DType::F32], ..Default::default() };
//! let cases = &agreement::quick_cases()[..2];
//! let report = agreement::check_backend_with(&CpuBackend::new(), cases, &opts);
//! assert!(report.passed(), "{report}");
//! ```

use flexprefill_core::{
    AttentionInput, AttentionShape, Backend, BlockIndex, DType, FlexPrefillConfig, Pattern,
    QueryAwareCut, SelectionMode,
};
use flexprefill_cpu::oracle::{self, OracleOutput};
use flexprefill_cpu::CpuBackend;

use crate::properties::{lse_error, lse_tolerance, output_tolerance, unwritten};
use crate::strategies::CaseSpec;
use crate::workload::WorkloadKind;

/// One case: an input recipe and the config FlexPrefill runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementCase {
    /// Short name, e.g. `needle/bs64/d128/gqa4/chunk300of1500`.
    pub name: String,
    /// Layout and data (its `dtype` is replaced by each requested dtype).
    pub spec: CaseSpec,
    /// Selection config (its `block_size` is the spec's).
    pub config: FlexPrefillConfig,
}

/// A tolerance per dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// For f32 inputs.
    pub f32: f64,
    /// For f16 inputs.
    pub f16: f64,
    /// For bf16 inputs.
    pub bf16: f64,
}

impl Tolerances {
    /// The tolerance for `dtype`.
    pub fn get(&self, dtype: DType) -> f64 {
        match dtype {
            DType::F32 => self.f32,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
        }
    }

    fn from_fn(f: fn(DType) -> f64) -> Self {
        Self {
            f32: f(DType::F32),
            f16: f(DType::F16),
            bf16: f(DType::BF16),
        }
    }
}

/// What to run and how strictly.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementOptions {
    /// Run every case in each of these dtypes.
    pub dtypes: Vec<DType>,
    /// Relative L2 tolerance of outputs (default [`output_tolerance`]).
    pub output_tolerance: Tolerances,
    /// LSE tolerance, `|Δ| / (1 + |lse|)` (default [`lse_tolerance`]).
    pub lse_tolerance: Tolerances,
    /// Blocks (symmetric difference over the whole index) allowed to differ from the CPU's
    /// selection before the case fails; 0: identical selection (and identical patterns).
    pub max_selection_mismatch: usize,
    /// Also check `dense_attention` (off for a backend that has none).
    pub check_dense: bool,
}

impl Default for AgreementOptions {
    fn default() -> Self {
        Self {
            dtypes: vec![DType::BF16, DType::F16, DType::F32],
            output_tolerance: Tolerances::from_fn(output_tolerance),
            lse_tolerance: Tolerances::from_fn(lse_tolerance),
            max_selection_mismatch: 0,
            check_dense: true,
        }
    }
}

/// Outcome of one case in one dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseReport {
    /// Case name.
    pub name: String,
    /// dtype it ran in.
    pub dtype: DType,
    /// `dense_attention` vs oracle, relative L2.
    pub dense_err: Option<f64>,
    /// `sparse_attention` (CPU's index) vs masked oracle, relative L2.
    pub sparse_err: Option<f64>,
    /// `flex_prefill` vs masked oracle on the backend's own index, relative L2.
    pub flex_err: Option<f64>,
    /// Worst scaled LSE error over the calls above.
    pub lse_err: Option<f64>,
    /// Blocks in one selection and not the other (backend vs CPU).
    pub selection_mismatch: Option<usize>,
    /// Where the selections first differ.
    pub first_mismatch: Option<String>,
    /// Heads whose pattern differs from the CPU's.
    pub pattern_mismatch: usize,
    /// Non-finite output/LSE elements over all calls.
    pub unwritten: usize,
    /// Density of the backend's selection.
    pub density: Option<f64>,
    /// Every failed check, in words.
    pub failures: Vec<String>,
}

impl CaseReport {
    /// No check failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementReport {
    /// The backend's name.
    pub backend: String,
    /// One entry per (case, dtype).
    pub cases: Vec<CaseReport>,
}

impl AgreementReport {
    /// Every case passed.
    pub fn passed(&self) -> bool {
        self.cases.iter().all(CaseReport::passed)
    }

    /// The failed cases.
    pub fn failures(&self) -> impl Iterator<Item = &CaseReport> {
        self.cases.iter().filter(|c| !c.passed())
    }
}

impl std::fmt::Display for AgreementReport {
    /// A table, one line per case, failures spelled out below it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2e}"));
        writeln!(
            f,
            "backend {}: {} of {} cases passed",
            self.backend,
            self.cases.iter().filter(|c| c.passed()).count(),
            self.cases.len()
        )?;
        writeln!(
            f,
            "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>7} {:>4}",
            "case", "dtype", "dense", "sparse", "flex", "lse", "sel≠", "pat≠", "density", "ok"
        )?;
        for c in &self.cases {
            writeln!(
                f,
                "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>7} {:>4}",
                c.name,
                c.dtype.name(),
                e(c.dense_err),
                e(c.sparse_err),
                e(c.flex_err),
                e(c.lse_err),
                c.selection_mismatch.map_or("-".into(), |m| m.to_string()),
                c.pattern_mismatch,
                c.density.map_or("-".into(), |d| format!("{d:.3}")),
                if c.passed() { "ok" } else { "FAIL" }
            )?;
        }
        for c in self.failures() {
            for msg in &c.failures {
                writeln!(f, "FAIL {} [{}]: {msg}", c.name, c.dtype.name())?;
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn case(
    kind: WorkloadKind,
    block_size: usize,
    (num_heads, num_kv_heads, head_dim): (usize, usize, usize),
    lens: &[(usize, usize)],
    config: FlexPrefillConfig,
    tag: &str,
    seed: u64,
) -> AgreementCase {
    let layout = if lens.len() == 1 {
        let (q, k) = lens[0];
        if q == k {
            format!("n{k}")
        } else {
            format!("chunk{q}of{k}")
        }
    } else {
        let l: Vec<String> = lens
            .iter()
            .map(|&(q, k)| {
                if q == k {
                    k.to_string()
                } else {
                    format!("{q}/{k}")
                }
            })
            .collect();
        format!("ragged[{}]", l.join(","))
    };
    let mut name =
        format!("{kind}/bs{block_size}/d{head_dim}/h{num_heads}kv{num_kv_heads}/{layout}");
    if !tag.is_empty() {
        name.push('/');
        name.push_str(tag);
    }
    AgreementCase {
        name,
        spec: CaseSpec {
            shape: AttentionShape::new(num_heads, num_kv_heads, head_dim)
                .expect("the built-in case shapes are valid"),
            block_size,
            lens: lens.to_vec(),
            kind,
            dtype: DType::F32,
            seed,
        },
        config: config.with_block_size(block_size),
    }
}

fn sparse_cfg(min_budget: usize) -> FlexPrefillConfig {
    FlexPrefillConfig::default().with_min_budget(min_budget)
}

/// The full list for a device backend: every workload kind at block 64 (d 64, GQA 2) and 128
/// (d 128, GQA 8), ragged batches, chunks (alone and ragged), a uniform batch, awkward lengths
/// (shorter than a block, one token past a block, the reference vectors' 4173), the original
/// selection mode, the per-query-block cut, tau 0, and `max_budget` with head_dim 96. The CPU
/// backend passes all of it in every dtype (`tests/agreement.rs`, ignored: 268 s for the three
/// dtypes on 2 cores, most of it the f64 oracle).
pub fn standard_cases() -> Vec<AgreementCase> {
    use WorkloadKind::*;
    let mut v = Vec::new();
    for (i, kind) in [SinkLocal, Stripes, Topics, Needle, Random, Mixed]
        .into_iter()
        .enumerate()
    {
        v.push(case(
            kind,
            64,
            (4, 2, 64),
            &[(1000, 1000)],
            sparse_cfg(128),
            "",
            10 + i as u64,
        ));
        v.push(case(
            kind,
            128,
            (8, 1, 128),
            &[(2100, 2100)],
            sparse_cfg(256),
            "",
            20 + i as u64,
        ));
    }
    v.push(case(
        Mixed,
        64,
        (5, 5, 64),
        &[(700, 700), (1300, 1300), (333, 333)],
        sparse_cfg(128),
        "",
        30,
    ));
    v.push(case(
        Needle,
        64,
        (4, 1, 128),
        &[(300, 1500)],
        sparse_cfg(128),
        "",
        31,
    ));
    v.push(case(
        Mixed,
        128,
        (8, 2, 64),
        &[(100, 900), (640, 640), (257, 1200)],
        sparse_cfg(256),
        "",
        32,
    ));
    v.push(case(
        Stripes,
        64,
        (2, 2, 64),
        &[(512, 512); 3],
        sparse_cfg(128),
        "batch3",
        33,
    ));
    v.push(case(
        Mixed,
        128,
        (4, 2, 64),
        &[(50, 50)],
        sparse_cfg(1024),
        "",
        34,
    ));
    v.push(case(
        Mixed,
        128,
        (4, 2, 64),
        &[(129, 129)],
        sparse_cfg(0),
        "",
        35,
    ));
    v.push(case(
        SinkLocal,
        128,
        (2, 1, 128),
        &[(4173, 4173)],
        sparse_cfg(1024),
        "",
        36,
    ));
    v.push(case(
        Mixed,
        128,
        (8, 2, 128),
        &[(3000, 3000)],
        FlexPrefillConfig::original().with_min_budget(512),
        "original",
        37,
    ));
    v.push(case(
        Mixed,
        64,
        (4, 2, 64),
        &[(1600, 1600)],
        FlexPrefillConfig::default()
            .with_min_budget(128)
            .with_query_aware_cut(QueryAwareCut::PerQueryBlock),
        "per_row_cut",
        38,
    ));
    v.push(case(
        Topics,
        64,
        (4, 2, 64),
        &[(1600, 1600)],
        FlexPrefillConfig::default()
            .with_min_budget(128)
            .with_tau(0.0)
            .with_gamma(0.95),
        "tau0",
        39,
    ));
    v.push(case(
        Mixed,
        64,
        (4, 2, 96),
        &[(1111, 1111)],
        FlexPrefillConfig::default()
            .with_min_budget(128)
            .with_max_budget(Some(512))
            .with_selection(SelectionMode::Faithful),
        "max_budget",
        40,
    ));
    v
}

/// A small list for CPU CI (a few seconds): every kind once, ragged, chunked, GQA 1/4,
/// awkward lengths, both selection modes, blocks 32 and 64.
pub fn quick_cases() -> Vec<AgreementCase> {
    use WorkloadKind::*;
    vec![
        case(Mixed, 64, (5, 5, 32), &[(400, 400)], sparse_cfg(64), "", 1),
        case(Needle, 32, (4, 1, 64), &[(90, 300)], sparse_cfg(64), "", 2),
        case(
            Topics,
            64,
            (4, 2, 64),
            &[(300, 300), (129, 129), (40, 260)],
            sparse_cfg(64),
            "",
            3,
        ),
        case(
            Stripes,
            32,
            (2, 1, 48),
            &[(333, 333)],
            FlexPrefillConfig::original().with_min_budget(64),
            "original",
            4,
        ),
        case(
            SinkLocal,
            64,
            (2, 2, 32),
            &[(20, 20)],
            sparse_cfg(64),
            "",
            5,
        ),
        case(Random, 32, (4, 2, 32), &[(257, 257)], sparse_cfg(32), "", 6),
    ]
}

fn rel(got: &flexprefill_core::AttentionOutput, want: &OracleOutput) -> f64 {
    oracle::relative_l2_error(&got.out.to_f32_vec(), &want.out)
}

/// Runs one case in one dtype.
pub fn check_case<B: Backend + ?Sized>(
    b: &B,
    case: &AgreementCase,
    dtype: DType,
    opts: &AgreementOptions,
) -> CaseReport {
    let mut r = CaseReport {
        name: case.name.clone(),
        dtype,
        dense_err: None,
        sparse_err: None,
        flex_err: None,
        lse_err: None,
        selection_mismatch: None,
        first_mismatch: None,
        pattern_mismatch: 0,
        unwritten: 0,
        density: None,
        failures: Vec::new(),
    };
    let out_tol = opts.output_tolerance.get(dtype);
    let lse_tol = opts.lse_tolerance.get(dtype);
    let spec = CaseSpec {
        dtype,
        ..case.spec.clone()
    };
    let owned = spec.build().with_lse(true);
    let x = match owned.input() {
        Ok(x) => x,
        Err(e) => {
            r.failures.push(format!("building the input: {e}"));
            return r;
        }
    };
    let cfg = &case.config;
    let cpu = CpuBackend::new();
    let mut lse_worst = 0.0f64;
    let mut check_out = |r: &mut CaseReport,
                         what: &str,
                         got: &flexprefill_core::AttentionOutput,
                         want: &OracleOutput|
     -> f64 {
        let bad = unwritten(got);
        r.unwritten += bad;
        if bad > 0 {
            r.failures.push(format!(
                "{what}: {bad} output/LSE elements not finite (unwritten?)"
            ));
        }
        let err = rel(got, want);
        // NaN fails too
        let within = err <= out_tol;
        if !within {
            r.failures
                .push(format!("{what}: relative L2 {err:.3e} > {out_tol:.0e}"));
        }
        match &got.lse {
            Some(l) => {
                let (i, e) = lse_error(l, &want.lse);
                lse_worst = lse_worst.max(e);
                let within = e <= lse_tol;
                if !within {
                    r.failures.push(format!(
                        "{what}: LSE row {i} {} vs oracle {} (scaled {e:.3e} > {lse_tol:.0e})",
                        l[i], want.lse[i]
                    ));
                }
            }
            None => r.failures.push(format!("{what}: no LSE though asked")),
        }
        err
    };

    // 1. dense
    if opts.check_dense {
        match (b.dense_attention(&x), oracle::dense_attention_f64(&x)) {
            (Ok(got), Ok(want)) => {
                r.dense_err = Some(check_out(&mut r, "dense_attention", &got, &want))
            }
            (Err(e), _) => r.failures.push(format!("dense_attention failed: {e}")),
            (_, Err(e)) => r.failures.push(format!("oracle failed: {e}")),
        }
    }
    // 2. selection vs the CPU
    let cpu_sel = cpu.select_index(&x, cfg);
    let own_sel = b.select_index(&x, cfg);
    match (&cpu_sel, &own_sel) {
        (Ok((ci, cr)), Ok((bi, br))) => {
            let (diff, first) = index_difference(ci, bi);
            r.selection_mismatch = Some(diff);
            r.first_mismatch = first.clone();
            r.density = Some(bi.density());
            if diff > opts.max_selection_mismatch {
                r.failures.push(format!(
                    "selection differs from the CPU's by {diff} blocks; first: {}",
                    first.unwrap_or_default()
                ));
            }
            r.pattern_mismatch = cr
                .heads
                .iter()
                .zip(&br.heads)
                .filter(|(a, b)| a.pattern != b.pattern)
                .count();
            if r.pattern_mismatch > 0 && opts.max_selection_mismatch == 0 {
                r.failures.push(format!(
                    "{} heads chose another pattern than on the CPU",
                    r.pattern_mismatch
                ));
            }
            if let Err(e) = bi.validate(cfg.forced) {
                r.failures.push(format!("backend index invalid: {e}"));
            }
        }
        (Err(e), _) => r.failures.push(format!("CPU select_index failed: {e}")),
        (_, Err(e)) => r.failures.push(format!("select_index failed: {e}")),
    }
    // 3. sparse attention on the CPU's index
    if let Ok((ci, _)) = &cpu_sel {
        match (
            b.sparse_attention(&x, ci),
            oracle::masked_attention_f64(&x, ci),
        ) {
            (Ok(got), Ok(want)) => {
                r.sparse_err = Some(check_out(
                    &mut r,
                    "sparse_attention(cpu index)",
                    &got,
                    &want,
                ))
            }
            (Err(e), _) => r.failures.push(format!("sparse_attention failed: {e}")),
            (_, Err(e)) => r.failures.push(format!("oracle failed: {e}")),
        }
    }
    // 4. flex_prefill on its own index, or dense attention where the backend's
    // dense-or-sparse rule ran the call dense (its report says so, every head `dense`).
    if let Ok((bi, _)) = &own_sel {
        match b.flex_prefill(&x, cfg) {
            Ok((got, rep)) => {
                let want = if rep.dense_fallback.is_some() {
                    if let Some(h) = rep.heads.iter().find(|h| h.pattern != Pattern::Dense) {
                        r.failures.push(format!(
                            "flex_prefill ran dense ({}) but head {} reports {}",
                            rep.dense_fallback.as_deref().unwrap_or_default(),
                            h.head,
                            h.pattern
                        ));
                    }
                    oracle::dense_attention_f64(&x)
                } else {
                    // A backend may compute every causal block of a head whose selection is
                    // so dense that sparse attention would cost more (it reports the head
                    // `dense`): those heads are checked against dense attention.
                    oracle::masked_attention_f64(&x, bi).and_then(|masked| {
                        dense_heads_from(&x, masked, &rep.heads, || oracle::dense_attention_f64(&x))
                    })
                };
                match want {
                    Ok(want) => r.flex_err = Some(check_out(&mut r, "flex_prefill", &got, &want)),
                    Err(e) => r.failures.push(format!("oracle failed: {e}")),
                }
            }
            Err(e) => r.failures.push(format!("flex_prefill failed: {e}")),
        }
    }
    r.lse_err = Some(lse_worst);
    r
}

/// Blocks in exactly one of two indices over the same sequences and heads, and where the
/// first difference is. Indices of other shapes differ by every block of both.
pub fn index_difference(a: &BlockIndex, b: &BlockIndex) -> (usize, Option<String>) {
    if a.seqs() != b.seqs() || a.num_heads() != b.num_heads() || a.block_size() != b.block_size() {
        return (
            a.col_indices().len() + b.col_indices().len(),
            Some("indices built for different inputs".into()),
        );
    }
    let bs = a.block_size();
    let (mut diff, mut first) = (0, None);
    for (si, s) in a.seqs().iter().enumerate() {
        for h in 0..a.num_heads() {
            for r in 0..s.num_query_blocks(bs) {
                let (ra, rb) = (a.row(si, h, r), b.row(si, h, r));
                if ra == rb {
                    continue;
                }
                let only_a = ra.iter().filter(|c| rb.binary_search(c).is_err()).count();
                let only_b = rb.iter().filter(|c| ra.binary_search(c).is_err()).count();
                diff += only_a + only_b;
                if first.is_none() {
                    first = Some(format!(
                        "sequence {si} head {h} query block {r}: cpu {ra:?} vs backend {rb:?}"
                    ));
                }
            }
        }
    }
    (diff, first)
}

/// Runs `cases` in every dtype of the default options.
pub fn check_backend<B: Backend + ?Sized>(b: &B, cases: &[AgreementCase]) -> AgreementReport {
    check_backend_with(b, cases, &AgreementOptions::default())
}

/// Runs `cases` with `opts`.
pub fn check_backend_with<B: Backend + ?Sized>(
    b: &B,
    cases: &[AgreementCase],
    opts: &AgreementOptions,
) -> AgreementReport {
    let mut out = Vec::new();
    for c in cases {
        for &dt in &opts.dtypes {
            out.push(check_case(b, c, dt, opts));
        }
    }
    AgreementReport {
        backend: b.name().to_string(),
        cases: out,
    }
}

/// Panics with the report table unless every case passes.
pub fn assert_backend_agrees<B: Backend + ?Sized>(
    b: &B,
    cases: &[AgreementCase],
    opts: &AgreementOptions,
) -> AgreementReport {
    let report = check_backend_with(b, cases, opts);
    assert!(report.passed(), "backend disagreement:\n{report}");
    report
}

/// The input of a case in a dtype (for a backend's own extra checks).
pub fn case_input(case: &AgreementCase, dtype: DType) -> crate::owned::OwnedInput {
    CaseSpec {
        dtype,
        ..case.spec.clone()
    }
    .build()
    .with_lse(true)
}

/// `masked` with the rows of every (sequence, head) that `heads` reports [`Pattern::Dense`]
/// taken from dense attention (computed only when such a head exists).
fn dense_heads_from(
    x: &AttentionInput<'_>,
    mut masked: OracleOutput,
    heads: &[flexprefill_core::HeadReport],
    dense: impl FnOnce() -> flexprefill_core::Result<OracleOutput>,
) -> flexprefill_core::Result<OracleOutput> {
    if !heads.iter().any(|h| h.pattern == Pattern::Dense) {
        return Ok(masked);
    }
    let dense = dense()?;
    let (nh, d) = (x.shape.num_heads, x.shape.head_dim);
    for h in heads.iter().filter(|h| h.pattern == Pattern::Dense) {
        let s = &x.seqs[h.seq];
        for t in s.q_start..s.q_start + s.q_len {
            let row = t * nh + h.head;
            masked.lse[row] = dense.lse[row];
            masked.out[row * d..(row + 1) * d].copy_from_slice(&dense.out[row * d..(row + 1) * d]);
        }
    }
    Ok(masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_difference_counts_blocks_in_one_only() {
        let s = flexprefill_core::Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 64,
            kv_len: 64,
        };
        let a = BlockIndex::from_rows(
            &[s],
            1,
            16,
            vec![vec![vec![0], vec![0, 1], vec![0, 2], vec![0, 1, 3]]],
        )
        .unwrap();
        let b = BlockIndex::from_rows(
            &[s],
            1,
            16,
            vec![vec![vec![0], vec![0, 1], vec![1, 2], vec![0, 3]]],
        )
        .unwrap();
        let (d, first) = index_difference(&a, &b);
        assert_eq!(d, 3);
        assert!(first.unwrap().contains("query block 2"));
        assert_eq!(index_difference(&a, &a), (0, None));
    }

    #[test]
    fn standard_cases_build_valid_inputs() {
        for c in standard_cases().iter().chain(&quick_cases()) {
            let x = CaseSpec {
                lens: c
                    .spec
                    .lens
                    .iter()
                    .map(|&(q, k)| (q.min(40), k.min(40).max(q.min(40))))
                    .collect(),
                ..c.spec.clone()
            };
            x.build().input().unwrap();
            c.config.validate().unwrap();
            assert_eq!(c.config.block_size, c.spec.block_size, "{}", c.name);
        }
        let names: std::collections::HashSet<_> =
            standard_cases().into_iter().map(|c| c.name).collect();
        assert_eq!(names.len(), standard_cases().len(), "case names are unique");
    }
}
