//! `flexprefill`: FlexPrefill sparse attention on real q/k/v dumps.
//!
//! ```text
//! flexprefill demo                                   # planted workload, sparse vs dense
//! flexprefill run --input qkv.safetensors --compare-dense --mask-png pics/
//! flexprefill synth --kind needle --seq 8192 --out needle.safetensors
//! ```
//!
//! Every error, from a bad flag to a NaN in the dump, ends as one line on stderr with its cause
//! chain and exit code 2 (as ripgrep does); stdout carries only the report, or with `--json`
//! only the JSON object. See docs/CLI.md for the commands and the JSON schema.

mod backend;
mod compare;
mod exec;
#[cfg(test)]
mod fuzz;
mod io;
mod npy;
mod plot;
mod progress;
mod report;
mod synth;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flexprefill_core::{FlexPrefillConfig, QueryAwareCut, SelectionMode};
use flexprefill_testkit::workload::WorkloadSpec;

use backend::BackendChoice;
use exec::Plan;
use synth::{DTypeArg, Kind};

/// FlexPrefill (ICLR 2025) context-aware sparse attention: which heads are query-aware or
/// vertical-slash, how sparse each head is, how far from dense, and how much time it saves.
#[derive(Debug, Parser)]
#[command(name = "flexprefill", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run FlexPrefill and dense on a built-in planted workload and print a per-head table.
    Demo(DemoArgs),
    /// Run FlexPrefill on q/k/v from a safetensors file or three .npy files.
    Run(RunArgs),
    /// Write a synthetic workload with planted attention structure to a safetensors file.
    Synth(SynthArgs),
}

/// `--selection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SelectionArg {
    /// Gamma kept on the representative rows by construction (default).
    Faithful,
    /// The authors' code's rules, quirks included.
    Original,
    /// Each query block cut at gamma on its own sampled estimate.
    Sampled,
}

/// `--query-aware-cut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CutArg {
    /// One cut over the flattened pooled map (Algorithm 4).
    Flattened,
    /// One cut per query block (Appendix F.4).
    PerQueryBlock,
}

/// The paper's knobs (defaults: the original's README).
#[derive(Debug, Args)]
struct Knobs {
    /// Cumulative attention threshold gamma, in (0, 1].
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    gamma: f32,
    /// Pattern threshold tau on the sqrt-JS distance (below it a head is query-aware).
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    tau: f32,
    /// Tokens per block: a power of two in [16, 256].
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Minimum budget per head, in tokens.
    #[arg(long, default_value_t = 1024)]
    min_budget: usize,
    /// Optional cap on the vertical-slash budget, in tokens.
    #[arg(long)]
    max_budget: Option<usize>,
    /// Selection rules.
    #[arg(long, value_enum, default_value_t = SelectionArg::Faithful)]
    selection: SelectionArg,
    /// How the query-aware cut spends gamma.
    #[arg(long, value_enum, default_value_t = CutArg::Flattened)]
    query_aware_cut: CutArg,
    /// Softmax scale of q·k (default 1/sqrt(head_dim)).
    #[arg(long, allow_negative_numbers = true)]
    softmax_scale: Option<f32>,
}

impl Knobs {
    fn config(&self) -> FlexPrefillConfig {
        FlexPrefillConfig::default()
            .with_gamma(self.gamma)
            .with_tau(self.tau)
            .with_block_size(self.block_size)
            .with_min_budget(self.min_budget)
            .with_max_budget(self.max_budget)
            .with_query_aware_cut(match self.query_aware_cut {
                CutArg::Flattened => QueryAwareCut::Flattened,
                CutArg::PerQueryBlock => QueryAwareCut::PerQueryBlock,
            })
            .with_selection(match self.selection {
                SelectionArg::Faithful => SelectionMode::Faithful,
                SelectionArg::Original => SelectionMode::Original,
                SelectionArg::Sampled => SelectionMode::Sampled,
            })
    }
}

/// Where results go.
#[derive(Debug, Args)]
struct Outputs {
    /// auto: CUDA if a GPU is usable, else the CPU (the report says why).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Threads of the CPU backend (default: one per core, or RAYON_NUM_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object on stdout and nothing else (schema in docs/CLI.md).
    #[arg(long)]
    json: bool,
    /// Write mask_b{batch}_h{head}.png per head and density.png into this folder.
    #[arg(long, value_name = "DIR")]
    mask_png: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Safetensors file holding q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads,
    /// head_dim] (F32, F16 or BF16).
    #[arg(long, value_name = "FILE", required_unless_present_all = ["q", "k", "v"], conflicts_with_all = ["q", "k", "v"])]
    input: Option<PathBuf>,
    /// q as a .npy file (with --k and --v instead of --input).
    #[arg(long, value_name = "FILE", requires_all = ["k", "v"])]
    q: Option<PathBuf>,
    /// k as a .npy file.
    #[arg(long, value_name = "FILE", requires_all = ["q", "v"])]
    k: Option<PathBuf>,
    /// v as a .npy file.
    #[arg(long, value_name = "FILE", requires_all = ["q", "k"])]
    v: Option<PathBuf>,
    /// Name of the query tensor in --input.
    #[arg(long, default_value = "q")]
    q_name: String,
    /// Name of the key tensor in --input.
    #[arg(long, default_value = "k")]
    k_name: String,
    /// Name of the value tensor in --input.
    #[arg(long, default_value = "v")]
    v_name: String,
    /// Write the attention output `o` (q's shape and dtype); .npy if the name ends in .npy,
    /// safetensors otherwise.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Also run dense attention: errors vs dense and the mass each row kept.
    #[arg(long)]
    compare_dense: bool,
    #[command(flatten)]
    knobs: Knobs,
    #[command(flatten)]
    outputs: Outputs,
}

/// `--heads`, `--kv-heads`, `--dim`: the same flags and defaults in `demo` and `synth`.
#[derive(Debug, Args)]
struct HeadShape {
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads (GQA).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Head width.
    #[arg(long, default_value_t = 128)]
    dim: usize,
}

#[derive(Debug, Args)]
struct Shape {
    /// Tokens per sequence.
    #[arg(long)]
    seq: usize,
    #[command(flatten)]
    head_shape: HeadShape,
    /// Sequences.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Planted structure.
    #[arg(long, value_enum, default_value_t = Kind::Mixed)]
    kind: Kind,
    /// Tokens per sequence [default: 16384, or four times the backend's dense-or-sparse
    /// threshold where that is larger (65536 on CUDA), so that the demo shows a length where
    /// sparsity pays off on the chosen backend].
    #[arg(long)]
    seq: Option<usize>,
    #[command(flatten)]
    head_shape: HeadShape,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Element type the workload is rounded to.
    #[arg(long, value_enum, default_value_t = DTypeArg::F16)]
    dtype: DTypeArg,
    #[command(flatten)]
    knobs: Knobs,
    #[command(flatten)]
    outputs: Outputs,
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Planted structure.
    #[arg(long, value_enum)]
    kind: Kind,
    #[command(flatten)]
    shape: Shape,
    /// Element type written.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Output safetensors file (tensors q, k, v; the spec in its metadata).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // clap prints usage errors itself and exits 2 (0 for --help/--version).
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole cause chain, no backtrace (ripgrep's convention).
            eprintln!(
                "flexprefill: error: {}",
                format!("{e:#}").replace('\n', " ")
            );
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Demo(a) => cmd_demo(a),
        Command::Synth(a) => cmd_synth(a),
    }
}

fn emit(
    chosen: &backend::Chosen,
    qkv: &io::Qkv,
    plan: &Plan<'_>,
    o: &exec::Outcome,
    json: bool,
    planted: Option<Vec<&'static str>>,
) -> Result<()> {
    let m = exec::measured(chosen, qkv, plan, o, planted);
    if json {
        let text =
            serde_json::to_string_pretty(&m.to_json()).context("cannot encode the report")?;
        println!("{text}");
    } else {
        print!("{}", m.to_text());
        if let Some(path) = plan.output {
            println!(
                "output   wrote o {:?} ({}) to {}",
                qkv.q_shape,
                qkv.dtype,
                path.display()
            );
        }
        if let Some(dir) = plan.mask_png {
            println!(
                "pictures wrote {} PNG files to {}",
                o.pictures.len(),
                dir.display()
            );
        }
    }
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let input_paths: Vec<PathBuf> = match (&a.input, &a.q, &a.k, &a.v) {
        (Some(p), ..) => vec![p.clone()],
        (None, Some(q), Some(k), Some(v)) => vec![q.clone(), k.clone(), v.clone()],
        _ => Vec::new(),
    };
    let (source, input) = match (&a.input, &a.q, &a.k, &a.v) {
        (Some(p), ..) => (
            io::Source::Safetensors {
                path: p.clone(),
                names: [a.q_name.clone(), a.k_name.clone(), a.v_name.clone()],
            },
            p.display().to_string(),
        ),
        (None, Some(q), Some(k), Some(v)) => (
            io::Source::Npy {
                paths: [q.clone(), k.clone(), v.clone()],
            },
            format!("{}, {}, {}", q.display(), k.display(), v.display()),
        ),
        _ => anyhow::bail!("give --input FILE.safetensors or all of --q, --k, --v (.npy)"),
    };
    let sp = progress::spinner("reading q, k, v");
    let qkv = io::load(&source)?;
    sp.finish_and_clear();
    let chosen = backend::open(a.outputs.backend, a.outputs.threads)?;
    let plan = Plan {
        cfg: a.knobs.config(),
        softmax_scale: a.knobs.softmax_scale,
        compare_dense: a.compare_dense,
        oracle: a.compare_dense,
        output: a.output.as_deref(),
        mask_png: a.outputs.mask_png.as_deref(),
        label: file_names(&input_paths),
        input,
    };
    let o = exec::execute(&chosen, &qkv, &plan)?;
    emit(&chosen, &qkv, &plan, &o, a.outputs.json, None)
}

/// `a.safetensors` or `q.npy, k.npy, v.npy`: what picture subtitles show.
fn file_names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn cmd_demo(a: DemoArgs) -> Result<()> {
    let chosen = backend::open(a.outputs.backend, a.outputs.threads)?;
    let seq = a
        .seq
        .unwrap_or_else(|| (4 * chosen.backend.min_sparse_kv_len()).max(16384));
    let spec = WorkloadSpec {
        kind: a.kind.workload(),
        batch: 1,
        seq_len: seq,
        num_heads: a.head_shape.heads,
        num_kv_heads: a.head_shape.kv_heads,
        head_dim: a.head_shape.dim,
        seed: a.seed,
    };
    let sp = progress::spinner("generating the planted workload");
    let (qkv, _) = synth::generate(&spec, a.dtype.dtype())?;
    sp.finish_and_clear();
    let plan = Plan {
        cfg: a.knobs.config(),
        softmax_scale: a.knobs.softmax_scale,
        compare_dense: true,
        // the oracle costs about a dense QKᵀ more on the CPU: `run --compare-dense` has it
        oracle: false,
        output: None,
        mask_png: a.outputs.mask_png.as_deref(),
        input: format!("demo workload '{}' (seed {})", a.kind.name(), a.seed),
        label: format!("demo '{}', seed {}, {} tokens", a.kind.name(), a.seed, seq),
    };
    let o = exec::execute(&chosen, &qkv, &plan)?;
    let planted = spec.head_kinds().into_iter().map(|k| k.name()).collect();
    emit(&chosen, &qkv, &plan, &o, a.outputs.json, Some(planted))
}

fn cmd_synth(a: SynthArgs) -> Result<()> {
    let spec = WorkloadSpec {
        kind: a.kind.workload(),
        batch: a.shape.batch,
        seq_len: a.shape.seq,
        num_heads: a.shape.head_shape.heads,
        num_kv_heads: a.shape.head_shape.kv_heads,
        head_dim: a.shape.head_shape.dim,
        seed: a.shape.seed,
    };
    let sp = progress::spinner("generating");
    let (qkv, needle) = synth::write(&spec, a.kind, a.dtype.dtype(), &a.out)
        .with_context(|| format!("cannot write the workload to {}", a.out.display()))?;
    sp.finish_and_clear();
    println!(
        "wrote {}: q [{}, {}, {}, {}], k/v [{}, {}, {}, {}], {}, kind {}, seed {}{}",
        a.out.display(),
        qkv.batch,
        qkv.q_len,
        qkv.num_heads,
        qkv.head_dim,
        qkv.batch,
        qkv.kv_len,
        qkv.num_kv_heads,
        qkv.head_dim,
        qkv.dtype,
        a.kind.name(),
        a.shape.seed,
        needle
            .map(|p| format!(", needle at token {p}"))
            .unwrap_or_default()
    );
    Ok(())
}
