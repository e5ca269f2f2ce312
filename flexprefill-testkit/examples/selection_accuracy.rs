//! Measures both selection modes on the testkit workloads (issue 6, `docs/ACCURACY.md`).
//!
//! For every workload kind and length it runs the CPU backend's dense attention once (with
//! LSE), computes the head statistics once per mode, and then for every gamma builds the index
//! and runs the block-sparse attention (with LSE). The captured mass of every query row is
//! exact: `exp(LSE over the selected blocks − LSE over all causal keys)`.
//!
//! ```text
//! cargo run --release -p flexprefill-testkit --example selection_accuracy -- \
//!     [--lens 16384,32768] [--kinds sink_local,stripes,topics,needle,random,mixed] \
//!     [--gammas 0.8,0.85,0.9,0.95,0.98] [--modes faithful,original] [--heads] \
//!     [--no-probes] [--cut flattened|per_query_block] [--time-reps 3] [--csv out.csv] \
//!     [--png mass_vs_density.png]
//! # or only time the selection of both modes (no dense/sparse runs):
//! cargo run --release -p flexprefill-testkit --example selection_accuracy -- \
//!     --timing-only --lens 16384,32768 --time-reps 9
//! # or only draw the picture from earlier CSVs:
//! cargo run --release -p flexprefill-testkit --example selection_accuracy -- \
//!     --from-csv a.csv,b.csv --png mass_vs_density.png
//! ```
//!
//! Columns: density (selected / causal blocks, all heads), mean captured mass over all rows
//! (mean over heads, and the worst head), share of rows under gamma, the smallest captured
//! mass of a representative row (the last `min(block_size, q_len)` queries; the faithful
//! mode's promise), relative L2 error of the output vs dense (all heads, worst head), whether
//! every needle query's block row holds the needle's key block, and the selection time
//! (statistics + index build, and the index build alone): process CPU time summed over all
//! threads, medians of `--time-reps` runs.
//! `--no-probes` drops the probe statistics the CPU backend measures in faithful mode, to show
//! what they buy.

use std::time::Instant;

use flexprefill_core::{selection, Backend, FlexPrefillConfig, QueryAwareCut, SelectionMode};
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::{generate, WorkloadKind, WorkloadSpec};

#[path = "plot/frontier.rs"]
mod frontier;
#[path = "plot/mass_density.rs"]
mod plot;

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct Row {
    pub kind: String,
    pub len: usize,
    pub mode: &'static str,
    pub gamma: f32,
    pub density: f64,
    pub mean_mass: f64,
    pub worst_head_mass: f64,
    pub rows_below: f64,
    pub rep_min: f64,
    pub rel_l2: f64,
    pub worst_head_l2: f64,
    pub needle: Option<bool>,
    pub t_select_ms: f64,
    pub t_build_ms: f64,
}

/// CPU time of the whole process (every thread, rayon's included) in ms, from
/// `/proc/self/task/*/schedstat` (ns resolution). On a shared machine this is far steadier than
/// wall-clock time, which mostly measures the other tenants. NaN where /proc is unavailable.
fn cpu_ms() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e6
}

/// `--timing-only`: selection CPU time of both modes (statistics + index build), without
/// the dense and sparse runs; the modes alternate inside each repetition so drift in the
/// machine's load hits both alike. Medians of `reps`.
fn timing_only(
    cpu: &CpuBackend,
    lens: &[usize],
    kinds: &[WorkloadKind],
    gammas: &[f32],
    reps: usize,
    cut: QueryAwareCut,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("| workload | len | gamma | faithful ms | original ms | ratio | faithful build ms | original build ms |");
    println!("|---|---|---|---|---|---|---|---|");
    let modes = [SelectionMode::Faithful, SelectionMode::Original];
    for &len in lens {
        for &kind in kinds {
            let w = generate(&WorkloadSpec::new(kind, len));
            let x = w.input();
            let cfg = |mode, gamma| {
                FlexPrefillConfig::default()
                    .with_selection(mode)
                    .with_query_aware_cut(cut)
                    .with_gamma(gamma)
            };
            let mut stats_ms = [Vec::new(), Vec::new()];
            let mut stats = [Vec::new(), Vec::new()];
            for _ in 0..reps {
                for (m, &mode) in modes.iter().enumerate() {
                    let t = cpu_ms();
                    stats[m] = cpu.head_statistics(&x, &cfg(mode, 0.9))?;
                    stats_ms[m].push(cpu_ms() - t);
                }
            }
            let st = [median(&mut stats_ms[0]), median(&mut stats_ms[1])];
            for &gamma in gammas {
                let mut build_ms = [Vec::new(), Vec::new()];
                for _ in 0..reps {
                    for (m, &mode) in modes.iter().enumerate() {
                        let t = cpu_ms();
                        selection::build_index(&x.seqs, x.shape, &cfg(mode, gamma), &stats[m])?;
                        build_ms[m].push(cpu_ms() - t);
                    }
                }
                let b = [median(&mut build_ms[0]), median(&mut build_ms[1])];
                let (f, o) = (st[0] + b[0], st[1] + b[1]);
                println!(
                    "| {kind} | {len} | {gamma} | {f:.0} | {o:.0} | {:.2} | {:.1} | {:.1} |",
                    f / o,
                    b[0],
                    b[1]
                );
            }
        }
    }
    Ok(())
}

/// Rows of a CSV written by `--csv`.
fn read_csv(path: &str) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 14 {
            return Err(format!("{path}: short line {line:?}").into());
        }
        let num = |i: usize| f[i].parse::<f64>();
        rows.push(Row {
            kind: f[0].to_string(),
            len: f[1].parse()?,
            mode: if f[2] == "original" {
                "original"
            } else {
                "faithful"
            },
            gamma: f[3].parse()?,
            density: num(4)?,
            mean_mass: num(5)?,
            worst_head_mass: num(6)?,
            rows_below: num(7)?,
            rep_min: num(8)?,
            rel_l2: num(9)?,
            worst_head_l2: num(10)?,
            needle: match f[11] {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            t_select_ms: num(12)?,
            t_build_ms: num(13)?,
        });
    }
    Ok(rows)
}

/// `--frontier`: `--inputs kind@len,…,path.safetensors` (default the six kinds at 16k),
/// `--sims rows:margin,…` (simulated sampled variants), `--csv`, `--png`; or
/// `--from-csv a.csv,b.csv --png out.png` to redraw.
fn run_frontier(
    args: &[String],
    modes: &[SelectionMode],
    gammas: &[f32],
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(files) = arg(args, "--from-csv") {
        let (mut lines, mut fr) = (Vec::new(), Vec::new());
        for f in files.split(',') {
            let (l, f) = frontier::read_csv(f)?;
            lines.extend(l);
            fr.extend(f);
        }
        lines.retain(|l| !l.mode.starts_with("sim"));
        frontier::draw(&lines, &fr, arg(args, "--png").unwrap_or("frontier.png"))?;
        return Ok(());
    }
    let inputs = arg(args, "--inputs").unwrap_or(
        "sink_local@16384,stripes@16384,topics@16384,needle@16384,random@16384,mixed@16384",
    );
    let sims: Vec<(usize, f64)> = match arg(args, "--sims") {
        None => Vec::new(),
        Some(s) => s
            .split(',')
            .map(|p| {
                let (a, b) = p.split_once(':').ok_or("--sims wants rows:margin")?;
                Ok::<_, Box<dyn std::error::Error>>((a.parse()?, b.parse()?))
            })
            .collect::<Result<_, _>>()?,
    };
    let mut base = FlexPrefillConfig::default();
    if let Some(mb) = arg(args, "--min-budget") {
        base.min_budget = mb.parse()?;
    }
    frontier::print_header();
    let (mut all, mut frs) = (Vec::new(), Vec::new());
    for item in inputs.split(',') {
        let m = if let Some((kind, len)) = item.split_once('@') {
            let kind: WorkloadKind = kind.parse()?;
            let len: usize = len.parse()?;
            let w = generate(&WorkloadSpec::new(kind, len));
            let needle = w.needle_position.map(|p| {
                let heads = (0..w.spec.num_heads)
                    .filter(|&hd| kind.head_kind(hd) == WorkloadKind::Needle)
                    .collect();
                (p, w.plan.needle_query_start, heads)
            });
            let name = format!("{kind} {}k", len / 1024);
            frontier::measure(&name, &w.input(), &needle, modes, gammas, &sims, base)?
        } else {
            let qkv = flexprefill_testkit::io::load_qkv(std::path::Path::new(item))?;
            let name = std::path::Path::new(item)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(item)
                .to_string();
            frontier::measure(&name, &qkv.input()?, &None, modes, gammas, &sims, base)?
        };
        for l in &m.lines {
            frontier::print(l);
        }
        frs.push((m.lines[0].input.clone(), m.frontier));
        all.extend(m.lines);
    }
    if let Some(path) = arg(args, "--csv") {
        std::fs::write(path, frontier::csv(&all, &frs))?;
    }
    if let Some(path) = arg(args, "--png") {
        all.retain(|l| !l.mode.starts_with("sim"));
        frontier::draw(&all, &frs, path)?;
    }
    Ok(())
}

fn median(x: &mut [f64]) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The comma-separated values of flag `name` (`default` when it is absent), each parsed.
fn list<T: std::str::FromStr>(
    args: &[String],
    name: &str,
    default: &str,
) -> Result<Vec<T>, T::Err> {
    arg(args, name)
        .unwrap_or(default)
        .split(',')
        .map(str::parse)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lens: Vec<usize> = list(&args, "--lens", "16384,32768")?;
    let kinds: Vec<WorkloadKind> = list(
        &args,
        "--kinds",
        "sink_local,stripes,topics,needle,random,mixed",
    )?;
    let gammas: Vec<f32> = list(&args, "--gammas", "0.8,0.85,0.9,0.95,0.98")?;
    let modes: Vec<SelectionMode> = arg(&args, "--modes")
        .unwrap_or("faithful,original")
        .split(',')
        .map(|m| match m {
            "original" => Ok(SelectionMode::Original),
            "faithful" => Ok(SelectionMode::Faithful),
            "sampled" => Ok(SelectionMode::Sampled),
            _ => Err(format!("unknown mode {m}")),
        })
        .collect::<Result<_, _>>()?;
    if args.iter().any(|a| a == "--frontier") {
        return run_frontier(&args, &modes, &gammas);
    }
    if let Some(files) = arg(&args, "--from-csv") {
        // Only draw: rows from earlier --csv runs (comma-separated files).
        let mut rows = Vec::new();
        for f in files.split(',') {
            rows.extend(read_csv(f)?);
        }
        let out = arg(&args, "--png").unwrap_or("mass_vs_density.png");
        plot::draw(&rows, out)?;
        return Ok(());
    }
    let per_head = args.iter().any(|a| a == "--heads");
    let no_probes = args.iter().any(|a| a == "--no-probes");
    let cut = match arg(&args, "--cut").unwrap_or("flattened") {
        "flattened" => QueryAwareCut::Flattened,
        "per_query_block" => QueryAwareCut::PerQueryBlock,
        other => return Err(format!("unknown --cut {other}").into()),
    };
    let reps: usize = arg(&args, "--time-reps").unwrap_or("3").parse()?;
    let cpu = CpuBackend::new();
    if args.iter().any(|a| a == "--timing-only") {
        return timing_only(&cpu, &lens, &kinds, &gammas, reps.max(1), cut);
    }
    let mut all = Vec::new();

    println!(
        "| workload | len | mode | gamma | density | mean mass | worst head | rows < gamma | min rep row | rel L2 | worst head L2 | needle | select ms | build ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &len in &lens {
        for &kind in &kinds {
            let spec = WorkloadSpec::new(kind, len);
            let w = generate(&spec);
            let x = w.input().with_lse(true);
            let (h, bs) = (spec.num_heads, FlexPrefillConfig::default().block_size);
            let d = spec.head_dim;
            let t = Instant::now();
            let dense = cpu.dense_attention(&x)?;
            let t_dense = t.elapsed().as_secs_f64();
            let dense_lse = dense.lse.as_ref().expect("lse requested");
            let dense_out = dense.out.to_f32_vec();
            eprintln!("{kind} {len}: dense {t_dense:.1} s");
            for &mode in &modes {
                let base = FlexPrefillConfig::default()
                    .with_selection(mode)
                    .with_query_aware_cut(cut);
                // selection time: medians over `reps` runs (the machine is shared)
                let mut t_stats = Vec::new();
                let mut stats = Vec::new();
                for _ in 0..reps.max(1) {
                    let t = cpu_ms();
                    stats = cpu.head_statistics(&x, &base)?;
                    t_stats.push(cpu_ms() - t);
                }
                let t_stats = median(&mut t_stats);
                if no_probes {
                    stats.iter_mut().for_each(|s| s.probe_block_mass.clear());
                }
                for &gamma in &gammas {
                    let cfg = base.with_gamma(gamma);
                    let mut t_build = Vec::new();
                    let mut built = None;
                    for _ in 0..reps.max(1) {
                        let t = cpu_ms();
                        built = Some(selection::build_index(&x.seqs, x.shape, &cfg, &stats)?);
                        t_build.push(cpu_ms() - t);
                    }
                    let t_build = median(&mut t_build);
                    let (index, reports) = built.expect("at least one run");
                    index.validate(cfg.forced)?;
                    let sparse = cpu.sparse_attention(&x, &index)?;
                    let lse = sparse.lse.as_ref().expect("lse requested");
                    let out = sparse.out.to_f32_vec();

                    let mut head_mass = vec![0.0f64; h];
                    let mut below = 0usize;
                    let mut rep_min = f64::INFINITY;
                    let mut err = vec![0.0f64; h];
                    let mut norm = vec![0.0f64; h];
                    for i in 0..len {
                        for hd in 0..h {
                            let m = ((lse[i * h + hd] - dense_lse[i * h + hd]) as f64).exp();
                            head_mass[hd] += m / len as f64;
                            if m < gamma as f64 {
                                below += 1;
                            }
                            if i + bs.min(len) >= len {
                                rep_min = rep_min.min(m);
                            }
                            let o = (i * h + hd) * d;
                            for e in 0..d {
                                let (a, b) = (out[o + e] as f64, dense_out[o + e] as f64);
                                err[hd] += (a - b) * (a - b);
                                norm[hd] += b * b;
                            }
                        }
                    }
                    let needle = w.needle_position.and_then(|p| {
                        let heads: Vec<usize> = (0..h)
                            .filter(|&hd| kind.head_kind(hd) == WorkloadKind::Needle)
                            .collect();
                        (!heads.is_empty()).then(|| {
                            heads.iter().all(|&hd| {
                                (w.plan.needle_query_start.max(p + 1)..len).all(|pos| {
                                    index.row(0, hd, pos / bs).contains(&((p / bs) as u32))
                                })
                            })
                        })
                    });
                    if per_head {
                        for (hd, r) in reports.iter().enumerate() {
                            eprintln!(
                                "  {} h{hd} {:?} js {:.3} density {:.3} rep mean {:.3} all-row mean {:.3} L2 {:.3}",
                                kind.head_kind(hd),
                                r.pattern,
                                r.js_distance,
                                r.density,
                                r.estimated_mass,
                                head_mass[hd],
                                (err[hd] / norm[hd]).sqrt()
                            );
                        }
                    }
                    let row = Row {
                        kind: kind.to_string(),
                        len,
                        mode: match mode {
                            SelectionMode::Original => "original",
                            SelectionMode::Faithful => "faithful",
                            SelectionMode::Sampled => "sampled",
                        },
                        gamma,
                        density: index.density(),
                        mean_mass: head_mass.iter().sum::<f64>() / h as f64,
                        worst_head_mass: head_mass.iter().copied().fold(f64::INFINITY, f64::min),
                        rows_below: below as f64 / (len * h) as f64,
                        rep_min,
                        rel_l2: (err.iter().sum::<f64>() / norm.iter().sum::<f64>()).sqrt(),
                        worst_head_l2: err
                            .iter()
                            .zip(&norm)
                            .map(|(e, n)| (e / n).sqrt())
                            .fold(0.0, f64::max),
                        needle,
                        t_select_ms: t_stats + t_build,
                        t_build_ms: t_build,
                    };
                    println!(
                        "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1}% | {:.3} | {:.3} | {:.3} | {} | {:.0} | {:.1} |",
                        row.kind,
                        row.len,
                        row.mode,
                        row.gamma,
                        row.density,
                        row.mean_mass,
                        row.worst_head_mass,
                        100.0 * row.rows_below,
                        row.rep_min,
                        row.rel_l2,
                        row.worst_head_l2,
                        row.needle.map_or("-", |b| if b { "yes" } else { "NO" }),
                        row.t_select_ms,
                        row.t_build_ms
                    );
                    all.push(row);
                }
            }
        }
    }
    if let Some(path) = arg(&args, "--csv") {
        let mut s = String::from(
            "workload,len,mode,gamma,density,mean_mass,worst_head_mass,rows_below,rep_min,rel_l2,worst_head_l2,needle,select_ms,build_ms\n",
        );
        for r in &all {
            s.push_str(&format!(
                "{},{},{},{},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{},{:.2},{:.3}\n",
                r.kind,
                r.len,
                r.mode,
                r.gamma,
                r.density,
                r.mean_mass,
                r.worst_head_mass,
                r.rows_below,
                r.rep_min,
                r.rel_l2,
                r.worst_head_l2,
                r.needle.map_or("-".into(), |b| b.to_string()),
                r.t_select_ms,
                r.t_build_ms
            ));
        }
        std::fs::write(path, s)?;
    }
    if let Some(path) = arg(&args, "--png") {
        plot::draw(&all, path)?;
    }
    Ok(())
}
