//! The pipeline shared by `run` and `demo`: FlexPrefill, optionally dense and the comparison,
//! then the report, the output tensor and the pictures.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flexprefill_core::{
    AttentionInput, AttentionShape, BlockIndex, FlexPrefillConfig, Pattern, SparsityReport, Timings,
};

use flexprefill_testkit::oracle::oracle_density;

use crate::backend::Chosen;
use crate::compare::{compare, Comparison};
use crate::io::Qkv;
use crate::plot::{self, HeatmapFigure, MaskFigure};
use crate::progress;
use crate::report::{Measured, OracleHead};

/// What to do beyond FlexPrefill itself.
pub struct Plan<'a> {
    /// Knobs.
    pub cfg: FlexPrefillConfig,
    /// `None` means 1/sqrt(head_dim).
    pub softmax_scale: Option<f32>,
    /// Run dense too and compare.
    pub compare_dense: bool,
    /// With the comparison, also the oracle densities (`flexprefill_testkit::oracle`).
    pub oracle: bool,
    /// Where to write `o`.
    pub output: Option<&'a Path>,
    /// Where to write the pictures.
    pub mask_png: Option<&'a Path>,
    /// Input description for the report.
    pub input: String,
    /// Short input name for picture subtitles (file name without folders).
    pub label: String,
}

/// Everything measured.
pub struct Outcome {
    /// Its report.
    pub report: SparsityReport,
    /// Wall time of the FlexPrefill call.
    pub total: Duration,
    /// Wall time of dense, when run.
    pub dense: Option<Duration>,
    /// Dense's own split (device time by events on GPU backends), when run.
    pub dense_timings: Option<Timings>,
    /// Wall time of the untimed warm-up calls, when run (GPU backends).
    pub warmup: Option<Duration>,
    /// The comparison, when run.
    pub comparison: Option<Comparison>,
    /// With the comparison: the oracle block counts per (sequence, head) at the config's gamma
    /// (`flexprefill_testkit::oracle` on the CPU, `flexprefill_cuda::oracle` on CUDA), `None`
    /// inside on a backend that computes none.
    pub oracle: Option<Option<Vec<OracleHead>>>,
    /// Pictures written.
    pub pictures: Vec<PathBuf>,
    /// Softmax scale used.
    pub softmax_scale: f32,
}

/// Runs the plan on `qkv`.
pub fn execute(chosen: &Chosen, qkv: &Qkv, plan: &Plan<'_>) -> Result<Outcome> {
    plan.cfg.validate().context("invalid settings")?;
    let shape = AttentionShape::new(qkv.num_heads, qkv.num_kv_heads, qkv.head_dim)?;
    let mut x = AttentionInput::batched(
        qkv.q.as_ref(),
        qkv.k.as_ref(),
        qkv.v.as_ref(),
        qkv.batch,
        qkv.q_len,
        qkv.kv_len,
        shape,
    )
    .context("invalid attention input")?
    .with_lse(plan.compare_dense);
    if let Some(s) = plan.softmax_scale {
        x = x.with_softmax_scale(s).context("invalid --softmax-scale")?;
    }
    let backend = chosen.backend.as_ref();
    let name = backend.name();

    // A GPU backend compiles its kernels (NVRTC) and allocates at first use; timing that call
    // would report compile time as attention time. So on any backend but the CPU, which has
    // nothing to warm, every timed call is run once untimed first, on the same input (same
    // kernels, same tile choices).
    let mut warmup = None;
    if name != "cpu" {
        let sp = progress::spinner(&format!(
            "warming up {name} (kernels compiled or loaded from the cache at first use)"
        ));
        let t = Instant::now();
        backend
            .flex_prefill(&x, &plan.cfg)
            .with_context(|| format!("FlexPrefill failed on the {name} backend"))?;
        if plan.compare_dense {
            backend
                .dense_attention(&x)
                .with_context(|| format!("dense attention failed on the {name} backend"))?;
        }
        warmup = Some(t.elapsed());
        sp.finish_and_clear();
    }

    let sp = progress::spinner(&format!("FlexPrefill on {name}"));
    let t0 = Instant::now();
    let (out, report) = backend
        .flex_prefill(&x, &plan.cfg)
        .with_context(|| format!("FlexPrefill failed on the {name} backend"))?;
    let total = t0.elapsed();
    sp.finish_and_clear();

    let (mut dense, mut dense_timings, mut comparison) = (None, None, None);
    if plan.compare_dense {
        let sp = progress::spinner(&format!("dense attention on {name} (for comparison)"));
        let t = Instant::now();
        let (d, dt) = backend
            .dense_attention_timed(&x)
            .with_context(|| format!("dense attention failed on the {name} backend"))?;
        dense = Some(t.elapsed());
        dense_timings = Some(dt);
        sp.finish_and_clear();
        comparison = Some(compare(
            &out,
            &d,
            &x.seqs,
            qkv.num_heads,
            qkv.head_dim,
            plan.cfg.gamma,
        )?);
    }

    if let Some(path) = plan.output {
        crate::io::write_output(path, &qkv.q_shape, &out.out)
            .with_context(|| format!("cannot write the output to {}", path.display()))?;
    }

    let mut pictures = Vec::new();
    if let Some(dir) = plan.mask_png {
        // flex_prefill does not hand back its index; selection is deterministic, so selecting
        // again gives the same blocks (and keeps a backend's fused flex_prefill untouched).
        let sp = progress::spinner("selecting blocks again for the pictures");
        // A call that ran dense computed every causal block: draw that, not a selection.
        let index = if report.heads.iter().all(|h| h.pattern == Pattern::Dense) {
            BlockIndex::dense(&x.seqs, qkv.num_heads, plan.cfg.block_size)?
        } else {
            backend
                .select_index(&x, &plan.cfg)
                .context("block selection for --mask-png failed")?
                .0
        };
        sp.finish_and_clear();
        pictures = write_pictures(
            dir,
            &index,
            &report,
            comparison.as_ref(),
            &plan.cfg,
            &plan.label,
        )?;
    }

    // The oracle density: the CPU computes both oracles from every row's exact block
    // distribution (f64 exponentials and sums); CUDA the mean-row one from block-pooled
    // probabilities on the device, cut on the host with the same rule.
    let oracle = if plan.compare_dense && plan.oracle {
        let (bs, gamma) = (plan.cfg.block_size, plan.cfg.gamma as f64);
        Some(if name == "cpu" {
            let sp = progress::spinner("oracle density (exact block masses)");
            let o = oracle_density(&x, bs, gamma).context("oracle density failed")?;
            sp.finish_and_clear();
            Some(o.into_iter().map(OracleHead::from).collect())
        } else if let Some(gpu) = &chosen.cuda {
            let sp = progress::spinner("oracle density (block-pooled probabilities on the GPU)");
            let o = flexprefill_cuda::oracle::oracle_density(gpu, &x, bs, gamma)
                .context("oracle density failed on the cuda backend")?;
            sp.finish_and_clear();
            Some(o.into_iter().map(OracleHead::from).collect())
        } else {
            None
        })
    } else {
        None
    };

    Ok(Outcome {
        report,
        total,
        dense,
        dense_timings,
        warmup,
        comparison,
        oracle,
        pictures,
        softmax_scale: x.scale(),
    })
}

/// The report view of an outcome.
pub fn measured<'a>(
    chosen: &Chosen,
    qkv: &Qkv,
    plan: &'a Plan<'_>,
    o: &'a Outcome,
    planted: Option<Vec<&'static str>>,
) -> Measured<'a> {
    Measured {
        backend: chosen.backend.name(),
        backend_reason: chosen.reason.clone(),
        input: plan.input.clone(),
        dims: (
            qkv.dtype.name(),
            qkv.batch,
            qkv.q_len,
            qkv.kv_len,
            qkv.num_heads,
            qkv.num_kv_heads,
            qkv.head_dim,
        ),
        cfg: &plan.cfg,
        softmax_scale: o.softmax_scale,
        report: &o.report,
        total: o.total,
        dense: o.dense,
        dense_timings: o.dense_timings,
        warmup: o.warmup,
        oracle: o.oracle.as_ref().map(|o| o.as_deref()),
        comparison: o.comparison.as_ref(),
        planted,
    }
}

fn short(p: Pattern) -> &'static str {
    match p {
        Pattern::QueryAware => "QA",
        Pattern::VerticalSlash => "VS",
        Pattern::Dense => "D",
    }
}

/// Writes `mask_b{batch}_h{head}.png` per (batch, head) and `density.png`.
fn write_pictures(
    dir: &Path,
    index: &BlockIndex,
    report: &SparsityReport,
    comparison: Option<&Comparison>,
    cfg: &FlexPrefillConfig,
    input: &str,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the picture folder {}", dir.display()))?;
    let bs = index.block_size();
    let num_heads = index.num_heads();
    let bar = progress::bar(report.heads.len() as u64 + 1, "writing pictures");
    let mut written = Vec::new();
    for (i, h) in report.heads.iter().enumerate() {
        let s = index.seqs()[h.seq];
        let nqb = s.num_query_blocks(bs);
        let causal: Vec<usize> = (0..nqb).map(|r| s.causal_key_blocks(r, bs)).collect();
        let mask = index.to_dense_mask(h.seq, h.head);
        let block_mass: Option<Vec<f32>> = comparison.map(|c| {
            let rows = &c.row_mass[h.seq * num_heads + h.head];
            rows.chunks(bs)
                .map(|ch| ch.iter().copied().fold(f32::INFINITY, f32::min))
                .collect()
        });
        let mut subtitle = format!(
            "density {:.1}% ({} of {} causal blocks)",
            100.0 * h.density,
            h.selected_blocks,
            h.causal_blocks
        );
        if h.js_distance.is_finite() {
            subtitle += &format!(" · js {:.3} (tau {})", h.js_distance, cfg.tau);
        }
        subtitle += &format!(" · gamma {}", cfg.gamma);
        if let Some(c) = comparison {
            let hc = &c.heads[i];
            subtitle += &format!(
                " · mass {:.3} (min {:.3}) · rel_l2 {:.1e}",
                hc.mass_captured, hc.min_mass_captured, hc.rel_l2
            );
        }
        let fig = plot::mask_figure(&MaskFigure {
            title: format!(
                "Selected blocks: batch {}, head {} ({})",
                h.seq,
                h.head,
                h.pattern.name().replace('_', "-")
            ),
            subtitle,
            num_query_blocks: nqb,
            num_key_blocks: s.num_key_blocks(bs),
            block_size: bs,
            selected: &mask,
            causal: &causal,
            row_block_mass: block_mass.as_deref().map(|m| (m, cfg.gamma)),
        });
        let path = dir.join(format!("mask_b{}_h{}.png", h.seq, h.head));
        fig.save(&path)?;
        written.push(path);
        bar.inc(1);
    }
    let batch = index.seqs().len();
    let density: Vec<f64> = report.heads.iter().map(|h| h.density).collect();
    let pattern: Vec<&str> = report.heads.iter().map(|h| short(h.pattern)).collect();
    let fig = plot::density_heatmap(&HeatmapFigure {
        title: "Density per (batch, head)".into(),
        subtitle: format!(
            "{input} · overall {:.1}% · gamma {}, tau {}, block {}",
            100.0 * report.density(),
            cfg.gamma,
            cfg.tau,
            bs
        ),
        rows: batch,
        cols: num_heads,
        row_label: "batch",
        density: &density,
        pattern: &pattern,
    });
    let path = dir.join("density.png");
    fig.save(&path)?;
    written.push(path);
    bar.finish_and_clear();
    Ok(written)
}
