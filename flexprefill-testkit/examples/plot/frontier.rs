//! `--frontier`: every selection mode against the oracle (issue 13, `docs/ACCURACY.md`).
//!
//! Per input (a testkit workload or a real layer's q/k/v file), the exact attention per key
//! block of every row ([`HeadBlockMass`], one head at a time) gives: the mean-row and
//! every-row oracle densities at each gamma, the frontier (best mean mass at each density),
//! and the exact captured mass of every row under each mode's index. `--sim` adds the sampled
//! estimator simulated from the exact rows at other sample counts and margins.

use flexprefill_core::selection::{self, sampled_block_cut};
use flexprefill_core::{
    AttentionInput, Backend, BlockIndex, FlexPrefillConfig, HeadReport, SelectionMode,
};
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::oracle::{frontier_at, frontier_of, HeadBlockMass};

use super::plot::{Canvas, COLOURS, GRID, INK};

/// One measured (input, mode, gamma).
#[derive(Debug, Clone)]
pub struct Line {
    pub input: String,
    pub mode: String,
    pub gamma: f32,
    pub density: f64,
    pub oracle: f64,
    pub every_row: f64,
    pub mean_mass: f64,
    pub worst_head: f64,
    pub rows_below: f64,
    /// Largest `density_h / max(1.5·oracle_h, oracle_h + 0.03)` over heads (≤ 1: bar met).
    pub head_ratio: f64,
    pub needle: Option<bool>,
    pub cpu_ms: f64,
}

/// Needle heads and the rows that must find it: (key position, first query, heads).
pub type NeedleCheck = Option<(usize, usize, Vec<usize>)>;

pub struct Measured {
    pub lines: Vec<Line>,
    /// The frontier of all heads together at densities 0, 0.01, …, 1.
    pub frontier: Vec<f64>,
}

fn mode_name(m: SelectionMode) -> &'static str {
    match m {
        SelectionMode::Original => "original",
        SelectionMode::Faithful => "faithful",
        SelectionMode::Sampled => "sampled",
    }
}

/// The sampled cut from exact rows: `s` rows per query block (last included), margin `margin`.
fn simulate(t: &HeadBlockMass, cfg: &FlexPrefillConfig, s: usize, margin: f64) -> Vec<Vec<u32>> {
    let bs = t.block_size;
    (0..t.num_query_blocks())
        .map(|r| {
            let rows = t.rows_of(r);
            let m = rows.len();
            let s = s.min(m);
            let n = t.seq.causal_key_blocks(r, bs);
            let mut est = vec![0.0f64; n];
            for k in 0..s {
                let i = rows.start + (k + 1) * m / s - 1;
                est.iter_mut().zip(t.row(i)).for_each(|(e, &v)| *e += v);
            }
            let est: Vec<f32> = est.iter().map(|&v| (v / s as f64) as f32).collect();
            let mut forced = vec![0u32];
            for c in t.seq.diagonal_key_blocks(r, bs) {
                if c != 0 {
                    forced.push(c as u32);
                }
            }
            sampled_block_cut(
                &est,
                &forced,
                (cfg.gamma as f64 + margin).min(1.0),
                cfg.min_budget_blocks(),
                None,
            )
        })
        .collect()
}

/// Measures `modes` at `gammas` on `x` (one sequence), plus the simulated sampled variants
/// `sims` (`(rows, margin)`).
pub fn measure(
    name: &str,
    x: &AttentionInput<'_>,
    needle: &NeedleCheck,
    modes: &[SelectionMode],
    gammas: &[f32],
    sims: &[(usize, f64)],
    base: FlexPrefillConfig,
) -> Result<Measured, Box<dyn std::error::Error>> {
    let cpu = CpuBackend::new();
    let h = x.shape.num_heads;
    let bs = base.block_size;
    // (mode name, gamma, index or simulated rows per head, reports, cpu ms)
    struct Run {
        mode: String,
        gamma: f32,
        index: Option<BlockIndex>,
        sim: Option<(usize, f64)>,
        reports: Vec<HeadReport>,
        ms: f64,
        captured: Vec<Vec<f64>>,
        sim_rows: Vec<Vec<Vec<u32>>>,
    }
    let mut runs = Vec::new();
    for &mode in modes {
        let mut cfg = base;
        cfg.selection = mode;
        let t = super::cpu_ms();
        let stats = cpu.head_statistics(x, &cfg)?;
        let t_stats = super::cpu_ms() - t;
        for &gamma in gammas {
            cfg.gamma = gamma;
            let t = super::cpu_ms();
            let (index, reports) = selection::build_index(&x.seqs, x.shape, &cfg, &stats)?;
            let ms = t_stats + super::cpu_ms() - t;
            runs.push(Run {
                mode: mode_name(mode).into(),
                gamma,
                index: Some(index),
                sim: None,
                reports,
                ms,
                captured: Vec::new(),
                sim_rows: Vec::new(),
            });
        }
    }
    for &(s, margin) in sims {
        for &gamma in gammas {
            runs.push(Run {
                mode: format!("sim S{s} m{margin}"),
                gamma,
                index: None,
                sim: Some((s, margin)),
                reports: Vec::new(),
                ms: f64::NAN,
                captured: Vec::new(),
                sim_rows: Vec::new(),
            });
        }
    }
    let mut oracles = vec![Vec::new(); gammas.len()];
    let grid: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
    // All heads' gains in one ranking: the heads may spend different densities.
    let mut gains = Vec::new();
    for head in 0..h {
        let t = HeadBlockMass::compute(x, 0, head, bs)?;
        for (gi, &g) in gammas.iter().enumerate() {
            oracles[gi].push(t.oracle(g as f64));
        }
        gains.extend(t.gains().into_iter().map(|g| g / h as f64));
        for run in &mut runs {
            match (&run.index, run.sim) {
                (Some(index), _) => run.captured.push(t.captured(index, 0, head)),
                (None, Some((s, margin))) => {
                    let mut cfg = base;
                    cfg.gamma = run.gamma;
                    let rows = simulate(&t, &cfg, s, margin);
                    let cap = (0..t.seq.q_len)
                        .map(|i| {
                            let row = t.row(i);
                            rows[i / bs].iter().map(|&c| row[c as usize]).sum()
                        })
                        .collect();
                    run.captured.push(cap);
                    run.sim_rows.push(rows);
                }
                _ => unreachable!(),
            }
        }
        eprintln!("  {name}: head {head} measured");
    }
    let all = frontier_of(gains);
    let frontier: Vec<f64> = grid.iter().map(|&d| frontier_at(&all, d)).collect();
    let mut lines = Vec::new();
    for run in &runs {
        let gi = gammas.iter().position(|&g| g == run.gamma).expect("gamma");
        let o = &oracles[gi];
        let causal: usize = o.iter().map(|x| x.causal_blocks).sum();
        let oracle = o.iter().map(|x| x.mean_row_blocks).sum::<usize>() as f64 / causal as f64;
        let every_row = o.iter().map(|x| x.every_row_blocks).sum::<usize>() as f64 / causal as f64;
        let head_density: Vec<f64> = match &run.index {
            Some(_) => run.reports.iter().map(|r| r.density).collect(),
            None => run
                .sim_rows
                .iter()
                .zip(o)
                .map(|(rows, oh)| {
                    rows.iter().map(Vec::len).sum::<usize>() as f64 / oh.causal_blocks as f64
                })
                .collect(),
        };
        let density = head_density.iter().sum::<f64>() / h as f64;
        let head_mass: Vec<f64> = run
            .captured
            .iter()
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect();
        let rows = run.captured.iter().map(Vec::len).sum::<usize>();
        let below = run
            .captured
            .iter()
            .flatten()
            .filter(|&&m| m < run.gamma as f64)
            .count();
        let head_ratio = head_density
            .iter()
            .zip(o)
            .map(|(&d, oh)| d / (1.5 * oh.mean_row).max(oh.mean_row + 0.03))
            .fold(0.0, f64::max);
        let needle_ok = needle.as_ref().map(|(p, start, heads)| {
            heads.iter().all(|&hd| {
                (*start.max(&(p + 1))..x.seqs[0].q_len).all(|pos| match &run.index {
                    Some(index) => index.row(0, hd, pos / bs).contains(&((p / bs) as u32)),
                    None => run.sim_rows[hd][pos / bs].contains(&((p / bs) as u32)),
                })
            })
        });
        lines.push(Line {
            input: name.into(),
            mode: run.mode.clone(),
            gamma: run.gamma,
            density,
            oracle,
            every_row,
            mean_mass: head_mass.iter().sum::<f64>() / h as f64,
            worst_head: head_mass.iter().copied().fold(f64::INFINITY, f64::min),
            rows_below: below as f64 / rows as f64,
            head_ratio,
            needle: needle_ok,
            cpu_ms: run.ms,
        });
    }
    Ok(Measured { lines, frontier })
}

pub fn print_header() {
    println!("| input | mode | γ | density | oracle (mean row) | ratio | every-row oracle | mean mass | worst head | rows < γ | worst head / its bar | needle | select CPU ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}

pub fn print(l: &Line) {
    println!(
        "| {} | {} | {} | {:.3} | {:.3} | {:.2}x | {:.3} | {:.3} | {:.3} | {:.1}% | {:.2} | {} | {:.0} |",
        l.input,
        l.mode,
        l.gamma,
        l.density,
        l.oracle,
        l.density / l.oracle,
        l.every_row,
        l.mean_mass,
        l.worst_head,
        100.0 * l.rows_below,
        l.head_ratio,
        l.needle.map_or("–", |b| if b { "yes" } else { "NO" }),
        l.cpu_ms
    );
}

pub fn csv(lines: &[Line], frontiers: &[(String, Vec<f64>)]) -> String {
    let mut s = String::from(
        "input,mode,gamma,density,oracle,every_row,mean_mass,worst_head,rows_below,head_ratio,needle,cpu_ms\n",
    );
    for l in lines {
        s.push_str(&format!(
            "{},{},{},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.4},{},{:.1}\n",
            l.input,
            l.mode,
            l.gamma,
            l.density,
            l.oracle,
            l.every_row,
            l.mean_mass,
            l.worst_head,
            l.rows_below,
            l.head_ratio,
            l.needle.map_or("-".into(), |b| b.to_string()),
            l.cpu_ms
        ));
    }
    for (name, f) in frontiers {
        for (i, m) in f.iter().enumerate() {
            s.push_str(&format!(
                "{name},frontier,{},{:.5},,,{:.5},,,,,\n",
                i as f64 / 100.0,
                i as f64 / 100.0,
                m
            ));
        }
    }
    s
}

/// Frontiers by input name.
pub type Frontiers = Vec<(String, Vec<f64>)>;

/// Lines and frontiers of a `--csv` file.
pub fn read_csv(path: &str) -> Result<(Vec<Line>, Frontiers), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = Vec::new();
    let mut fr: Vec<(String, Vec<f64>)> = Vec::new();
    for row in text.lines().skip(1) {
        let c: Vec<&str> = row.split(',').collect();
        let f = |i: usize| c[i].parse::<f64>().unwrap_or(f64::NAN);
        if c[1] == "frontier" {
            match fr.iter_mut().find(|(n, _)| n == c[0]) {
                Some((_, v)) => v.push(f(6)),
                None => fr.push((c[0].into(), vec![f(6)])),
            }
            continue;
        }
        lines.push(Line {
            input: c[0].into(),
            mode: c[1].into(),
            gamma: c[2].parse()?,
            density: f(3),
            oracle: f(4),
            every_row: f(5),
            mean_mass: f(6),
            worst_head: f(7),
            rows_below: f(8),
            head_ratio: f(9),
            needle: c[10].parse().ok(),
            cpu_ms: f(11),
        });
    }
    Ok((lines, fr))
}

/// One column per input: top, mean mass vs density (modes as curves over gamma, the oracle
/// frontier as a grey line, the mean-row oracle at each gamma as hollow dots); bottom, the
/// share of rows under gamma against gamma.
pub fn draw(
    lines: &[Line],
    frontiers: &[(String, Vec<f64>)],
    path: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let inputs: Vec<&str> = frontiers.iter().map(|(n, _)| n.as_str()).collect();
    let mut modes: Vec<&str> = Vec::new();
    for l in lines {
        if !modes.contains(&l.mode.as_str()) {
            modes.push(&l.mode);
        }
    }
    let cols = inputs.len().min(4);
    let panel_rows = inputs.len().div_ceil(cols);
    let (pw, ph, m) = (380.0f32, 300.0f32, 62.0f32);
    let (ph2, gap) = (150.0f32, 60.0f32);
    let cell_h = ph + ph2 + gap + 2.0 * m;
    let width = (cols as f32 * (pw + m) + m + 180.0) as usize;
    let height = (panel_rows as f32 * cell_h + 40.0) as usize;
    let mut cv = Canvas::new(width, height);
    cv.text(
        "Mean captured mass vs density (grey: oracle frontier, hollow: mean-row oracle at each γ); below: rows under γ",
        width as f32 / 2.0,
        8.0,
        16.0,
        INK,
        true,
    );
    let y_min = 0.8f64;
    for (ii, input) in inputs.iter().enumerate() {
        let ox = m + (ii % cols) as f32 * (pw + m);
        let oy = 40.0 + (ii / cols) as f32 * cell_h + 20.0;
        let map = |d: f64, v: f64| {
            (
                ox + d as f32 * pw,
                oy + ph - ((v.max(y_min) - y_min) / (1.0 - y_min)) as f32 * ph,
            )
        };
        for t in 0..=5 {
            let v = t as f64 / 5.0;
            let (gx, _) = map(v, y_min);
            cv.line((gx, oy), (gx, oy + ph), 1.0, GRID, false);
            cv.text(&format!("{v:.1}"), gx, oy + ph + 4.0, 12.0, INK, true);
        }
        for t in 0..=4 {
            let v = y_min + t as f64 * 0.05;
            let (_, gy) = map(0.0, v);
            cv.line((ox, gy), (ox + pw, gy), 1.0, GRID, false);
            cv.text(&format!("{v:.2}"), ox - 38.0, gy - 7.0, 12.0, INK, false);
        }
        cv.line((ox, oy), (ox, oy + ph), 1.5, INK, false);
        cv.line((ox, oy + ph), (ox + pw, oy + ph), 1.5, INK, false);
        cv.text(input, ox + pw / 2.0, oy - 20.0, 15.0, INK, true);
        cv.text("density", ox + pw / 2.0, oy + ph + 20.0, 12.0, INK, true);
        if let Some((_, f)) = frontiers.iter().find(|(n, _)| n == input) {
            for (i, w) in f.windows(2).enumerate() {
                let (d0, d1) = (i as f64 / 100.0, (i + 1) as f64 / 100.0);
                cv.line(map(d0, w[0]), map(d1, w[1]), 2.0, [150, 150, 150], false);
            }
        }
        for l in lines
            .iter()
            .filter(|l| l.input == *input && l.mode == "faithful")
        {
            let fr = frontiers.iter().find(|(n, _)| n == input).map(|(_, f)| f);
            if let Some(f) = fr {
                let v = frontier_at(f, l.oracle);
                cv.dot(map(l.oracle, v), 4.0, [90, 90, 90], true);
            }
        }
        // bottom panel: rows under gamma (0..1) against gamma (0.8..1)
        let by = oy + ph + gap;
        let gmap = |g: f64, v: f64| {
            (
                ox + ((g - 0.8) / 0.2) as f32 * pw,
                by + ph2 - v as f32 * ph2,
            )
        };
        for t in 0..=4 {
            let g = 0.8 + t as f64 * 0.05;
            let (gx, _) = gmap(g, 0.0);
            cv.line((gx, by), (gx, by + ph2), 1.0, GRID, false);
            cv.text(&format!("{g:.2}"), gx, by + ph2 + 4.0, 12.0, INK, true);
        }
        for t in 0..=2 {
            let v = t as f64 / 2.0;
            let (_, gy) = gmap(0.8, v);
            cv.line((ox, gy), (ox + pw, gy), 1.0, GRID, false);
            cv.text(&format!("{v:.1}"), ox - 30.0, gy - 7.0, 12.0, INK, false);
        }
        cv.line((ox, by), (ox, by + ph2), 1.5, INK, false);
        cv.line((ox, by + ph2), (ox + pw, by + ph2), 1.5, INK, false);
        cv.text(
            "γ: share of rows under γ",
            ox + pw / 2.0,
            by + ph2 + 20.0,
            12.0,
            INK,
            true,
        );
        for (mi, mode) in modes.iter().enumerate() {
            let c = COLOURS[mi % COLOURS.len()];
            let mut pts: Vec<&Line> = lines
                .iter()
                .filter(|l| l.input == *input && l.mode == *mode)
                .collect();
            pts.sort_by(|a, b| a.gamma.total_cmp(&b.gamma));
            for w in pts.windows(2) {
                cv.line(
                    map(w[0].density, w[0].mean_mass),
                    map(w[1].density, w[1].mean_mass),
                    2.0,
                    c,
                    false,
                );
                cv.line(
                    gmap(w[0].gamma as f64, w[0].rows_below),
                    gmap(w[1].gamma as f64, w[1].rows_below),
                    2.0,
                    c,
                    false,
                );
            }
            for p in pts {
                cv.dot(map(p.density, p.mean_mass), 3.5, c, false);
                cv.dot(gmap(p.gamma as f64, p.rows_below), 3.0, c, false);
            }
        }
    }
    let lx = m + cols as f32 * (pw + m) - 10.0;
    let mut ly = 60.0;
    for (mi, mode) in modes.iter().enumerate() {
        let c = COLOURS[mi % COLOURS.len()];
        cv.line((lx, ly + 8.0), (lx + 26.0, ly + 8.0), 2.0, c, false);
        cv.dot((lx + 13.0, ly + 8.0), 3.5, c, false);
        cv.text(mode, lx + 34.0, ly, 13.0, INK, false);
        ly += 22.0;
    }
    cv.line(
        (lx, ly + 8.0),
        (lx + 26.0, ly + 8.0),
        2.0,
        [150, 150, 150],
        false,
    );
    cv.text("oracle frontier", lx + 34.0, ly, 13.0, INK, false);
    ly += 22.0;
    cv.dot((lx + 13.0, ly + 8.0), 4.0, [90, 90, 90], true);
    cv.text("mean-row oracle", lx + 34.0, ly, 13.0, INK, false);
    cv.save(path)
}
