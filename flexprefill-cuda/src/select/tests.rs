//! GPU tests (ignored without a GPU). The exact test feeds the CPU's statistics to the
//! device selection, so both paths see identical numbers and must pick identical blocks;
//! the end-to-end test runs everything on the device and counts disagreements.

use super::*;
use crate::stats::tests::{device, ragged, seed, with_config, workload};
use flexprefill_core::{Backend, DType, ForcedBlocks};
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::owned::OwnedInput;
use flexprefill_testkit::workload::WorkloadKind;

fn configs() -> Vec<(&'static str, FlexPrefillConfig)> {
    let f = with_config(FlexPrefillConfig::default(), |c| {
        c.min_budget = 256;
    });
    let o = with_config(FlexPrefillConfig::original(), |c| {
        c.min_budget = 256;
    });
    vec![
        ("faithful", f),
        (
            "faithful tau 0.4",
            with_config(f, |c| {
                c.tau = 0.4;
            }),
        ),
        (
            "faithful per-row tau 0.4",
            with_config(f, |c| {
                c.tau = 0.4;
                c.query_aware_cut = QueryAwareCut::PerQueryBlock;
            }),
        ),
        (
            "faithful gamma 0.95 bs 64",
            with_config(f, |c| {
                c.gamma = 0.95;
                c.block_size = 64;
            }),
        ),
        ("original", o),
        (
            "original tau 0.4",
            with_config(o, |c| {
                c.tau = 0.4;
            }),
        ),
        (
            "original per-row tau 0.4 max budget",
            with_config(o, |c| {
                c.tau = 0.4;
                c.query_aware_cut = QueryAwareCut::PerQueryBlock;
                c.max_budget = Some(512);
            }),
        ),
        (
            "original gamma 0.8 bs 64",
            with_config(o, |c| {
                c.gamma = 0.8;
                c.block_size = 64;
            }),
        ),
    ]
}

fn inputs(seed: u64) -> Vec<(&'static str, OwnedInput)> {
    let long = workload(WorkloadKind::Mixed, 3000, 8, 2, 128, seed + 10);
    vec![
        (
            "mixed 4096",
            workload(WorkloadKind::Mixed, 4096, 8, 2, 128, seed).to_dtype(DType::BF16),
        ),
        (
            "topics 3000",
            workload(WorkloadKind::Topics, 3000, 4, 2, 128, seed + 1).to_dtype(DType::BF16),
        ),
        (
            "stripes 2500 f16",
            workload(WorkloadKind::Stripes, 2500, 4, 1, 64, seed + 2).to_dtype(DType::F16),
        ),
        (
            "random 2048",
            workload(WorkloadKind::Random, 2048, 4, 2, 128, seed + 3).to_dtype(DType::BF16),
        ),
        (
            "needle 3333",
            workload(WorkloadKind::Needle, 3333, 4, 2, 128, seed + 4).to_dtype(DType::BF16),
        ),
        (
            "chunk 2200..3000",
            long.chunk(2200, 3000).expect("chunk").to_dtype(DType::BF16),
        ),
        ("ragged 900 + 2100 + 300", {
            let a = ragged(
                &workload(WorkloadKind::SinkLocal, 900, 8, 2, 128, seed + 5),
                &workload(WorkloadKind::Topics, 2100, 8, 2, 128, seed + 6),
            );
            ragged(
                &a,
                &workload(WorkloadKind::Stripes, 300, 8, 2, 128, seed + 7),
            )
            .to_dtype(DType::BF16)
        }),
    ]
}

fn diff_heads(a: &BlockIndex, b: &BlockIndex) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for s in 0..a.seqs().len() {
        for h in 0..a.num_heads() {
            let nqb = a.seqs()[s].num_query_blocks(a.block_size());
            if (0..nqb).any(|r| a.row(s, h, r) != b.row(s, h, r)) {
                out.push((s, h));
            }
        }
    }
    out
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn device_selection_equals_core_on_the_same_statistics() {
    let dev = device();
    let stream = dev.stream().clone();
    let cpu = CpuBackend::new();
    let seed = seed();
    let mut checked = 0;
    let mut qa_heads = 0;
    for (what, owned) in inputs(seed) {
        let x = owned.input().expect("input");
        // The sampled mode's cut too: its estimate uploaded from the CPU, its rule replayed
        // in core's order, so the blocks are core's exactly.
        for (cname, cfg) in configs().into_iter().chain(sampled_configs()) {
            let stats = cpu.head_statistics(&x, &cfg).expect("cpu stats");
            let (want, want_rep) =
                selection::build_index(&x.seqs, x.shape, &cfg, &stats).expect("core");
            want.validate(cfg.forced).expect("core index valid");
            let layout = StatsLayout::new(&x.seqs, x.shape, cfg.block_size).expect("layout");
            let emulate = stats.first().is_some_and(|s| s.bf16_pooled_logits);
            let mut dst = upload_stats(&stream, layout.clone(), &stats, emulate).expect("upload");
            let sel =
                launch_select::<half::bf16>(&dev, &stream, None, &mut dst, &cfg).expect("select");
            let (got, got_rep) = sel
                .to_host(&stream, &layout, Some(&stats))
                .expect("download");
            got.validate(cfg.forced).expect("device index valid");
            for (g, w) in got_rep.iter().zip(&want_rep) {
                assert_eq!(
                    g.pattern, w.pattern,
                    "{what} / {cname}: seq {} head {} pattern (js gpu {} cpu {})",
                    g.seq, g.head, g.js_distance, w.js_distance
                );
                qa_heads += (g.pattern == Pattern::QueryAware) as usize;
            }
            let bad = diff_heads(&got, &want);
            assert!(
                bad.is_empty(),
                "{what} / {cname}: heads {bad:?} select other blocks; first: gpu {:?} cpu {:?}",
                bad.first().map(
                    |&(s, h)| (0..want.seqs()[s].num_query_blocks(cfg.block_size))
                        .map(|r| got.row(s, h, r).to_vec())
                        .collect::<Vec<_>>()
                ),
                bad.first().map(
                    |&(s, h)| (0..want.seqs()[s].num_query_blocks(cfg.block_size))
                        .map(|r| want.row(s, h, r).to_vec())
                        .collect::<Vec<_>>()
                )
            );
            checked += want_rep.len();
        }
    }
    eprintln!("identical selection on {checked} heads ({qa_heads} query-aware)");
    assert!(
        qa_heads > 0,
        "the configurations should exercise query-aware heads"
    );
}

/// The sampled mode's configurations: the default cut, a block of 64 at gamma 0.95, the
/// min budget dominating, a max_budget cap, no forced blocks, and query-aware heads in the
/// pattern decision (which the sampled blocks do not depend on).
fn sampled_configs() -> Vec<(&'static str, FlexPrefillConfig)> {
    let s = with_config(FlexPrefillConfig::default(), |c| {
        c.selection = SelectionMode::Sampled;
        c.min_budget = 256;
    });
    vec![
        ("sampled", s),
        (
            "sampled gamma 0.95 bs 64",
            with_config(s, |c| {
                c.gamma = 0.95;
                c.block_size = 64;
            }),
        ),
        (
            "sampled min budget 1024",
            with_config(s, |c| {
                c.min_budget = 1024;
            }),
        ),
        (
            "sampled max budget 512 tau 0.4",
            with_config(s, |c| {
                c.max_budget = Some(512);
                c.tau = 0.4;
            }),
        ),
        (
            "sampled unforced bs 32 gamma 0.8",
            with_config(s, |c| {
                c.forced = ForcedBlocks {
                    sink: false,
                    diagonal: false,
                };
                c.block_size = 32;
                c.gamma = 0.8;
                c.min_budget = 32;
            }),
        ),
    ]
}

/// The whole sampled path on the device (estimate and cut) against the CPU's: the estimates
/// differ in the last bits (tensor cores vs f32 GEMM), so a block at a cut may flip; more than
/// one block in 500 would be a bug, not rounding.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sampled_device_path_end_to_end_agrees_with_cpu_path() {
    let dev = device();
    let cpu = CpuBackend::new();
    let seed = seed();
    let (mut blocks, mut differ) = (0usize, 0usize);
    for (what, owned) in inputs(seed + 200) {
        let x = owned.input().expect("input");
        for (cname, cfg) in sampled_configs() {
            let (want, _) = cpu.select_index(&x, &cfg).expect("cpu");
            let (got, rep) = select_index(&dev, &x, &cfg).expect("gpu");
            got.validate(cfg.forced).expect("device index valid");
            assert!(
                rep.heads.iter().all(|h| h.estimated_mass.is_finite()),
                "{what} / {cname}: masses"
            );
            let mut d = 0usize;
            for s in 0..want.seqs().len() {
                for h in 0..want.num_heads() {
                    for r in 0..want.seqs()[s].num_query_blocks(cfg.block_size) {
                        let (a, b) = (got.row(s, h, r), want.row(s, h, r));
                        d += a.iter().filter(|c| !b.contains(c)).count()
                            + b.iter().filter(|c| !a.contains(c)).count();
                        blocks += b.len();
                    }
                }
            }
            if d > 0 {
                eprintln!("{what} / {cname}: {d} blocks differ");
            }
            differ += d;
        }
    }
    eprintln!("sampled end to end: {differ} blocks differ of {blocks}");
    assert!(differ * 500 <= blocks, "{differ} of {blocks} blocks differ");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn device_path_end_to_end_agrees_with_cpu_path() {
    let dev = device();
    let cpu = CpuBackend::new();
    let seed = seed();
    let (mut heads, mut differ) = (0usize, 0usize);
    for (what, owned) in inputs(seed + 100) {
        let x = owned.input().expect("input");
        for (cname, cfg) in configs() {
            let (want, want_rep) = cpu.select_index(&x, &cfg).expect("cpu");
            let (got, got_rep) = select_index(&dev, &x, &cfg).expect("gpu");
            got.validate(cfg.forced).expect("device index valid");
            assert_eq!(got_rep.heads.len(), want_rep.heads.len());
            let bad = diff_heads(&got, &want);
            for &(s, h) in &bad {
                let (g, w) = (
                    &got_rep.heads[s * x.shape.num_heads + h],
                    &want_rep.heads[s * x.shape.num_heads + h],
                );
                eprintln!("{what} / {cname}: seq {s} head {h} differs: gpu {:?} js {} blocks {} | cpu {:?} js {} blocks {}",
                    g.pattern, g.js_distance, g.selected_blocks, w.pattern, w.js_distance, w.selected_blocks);
            }
            heads += want_rep.heads.len();
            differ += bad.len();
        }
    }
    eprintln!("end to end: {differ} of {heads} heads differ (statistics differ in the last bits)");
    // Statistics are computed differently (tensor cores vs CPU sgemm), so a head sitting on
    // a decision boundary may differ; more than 2% would be a bug, not rounding.
    assert!(differ * 50 <= heads, "{differ} of {heads} heads differ");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dense_fallback_and_forced_blocks() {
    let dev = device();
    let seed = seed();
    // 900 tokens ≤ min_budget 1024: every head dense, every causal block listed.
    let owned = workload(WorkloadKind::Random, 900, 4, 2, 64, seed).to_dtype(DType::BF16);
    let x = owned.input().expect("input");
    let cfg = FlexPrefillConfig::default();
    let (idx, rep) = select_index(&dev, &x, &cfg).expect("gpu");
    assert_eq!(idx, BlockIndex::dense(&x.seqs, 4, 128).expect("dense"));
    assert!(rep.dense_fallback.is_some());
    assert!(rep.heads.iter().all(|h| h.pattern == Pattern::Dense));
    // no forced blocks, min budget 1 block: the same blocks as the CPU path
    let cfg = with_config(FlexPrefillConfig::default(), |c| {
        c.forced = ForcedBlocks {
            sink: false,
            diagonal: false,
        };
        c.min_budget = 1;
    });
    let owned = workload(WorkloadKind::SinkLocal, 2000, 4, 2, 64, seed + 1).to_dtype(DType::BF16);
    let x = owned.input().expect("input");
    let (idx, _) = select_index(&dev, &x, &cfg).expect("gpu");
    let (want, _) = CpuBackend::new().select_index(&x, &cfg).expect("cpu");
    assert!(
        diff_heads(&idx, &want).len() <= 1,
        "{:?}",
        diff_heads(&idx, &want)
    );
}

/// Uploads host statistics into device buffers laid out as `layout` (for running the device
/// selection on the CPU's statistics: the exact agreement test).
fn upload_stats(
    stream: &Arc<CudaStream>,
    layout: StatsLayout,
    stats: &[HeadStatistics],
    emulate: bool,
) -> Result<DeviceStats> {
    let h = layout.shape.num_heads;
    let hkv = layout.shape.num_kv_heads;
    let d = layout.shape.head_dim;
    let bs = layout.block_size;
    let seqs = layout.seqs.clone();
    if stats.len() != seqs.len() * h {
        return Err(flexprefill_core::Error::Shape(format!(
            "{} head statistics for {} sequences × {h} heads",
            stats.len(),
            seqs.len()
        ))
        .into());
    }
    let tot_tok: usize = seqs.iter().map(|s| s.kv_len).sum();
    let tot_kb = layout.total_key_blocks();
    let tot_qb = layout.total_query_blocks();
    let tot_rep: usize = (0..seqs.len())
        .map(|i| layout.num_rep(i) * seqs[i].num_key_blocks(bs))
        .sum();
    let mut vertical = vec![0f32; tot_tok * h];
    let mut slash = vec![0f32; tot_tok * h];
    let mut estimate = vec![0f32; tot_kb * h];
    let mut rbm = vec![0f32; tot_rep * h];
    let mut kp = vec![0f32; tot_kb * hkv * d];
    let mut qp = vec![0f32; tot_qb * h * d];
    let probes = stats.iter().any(|st| !st.probe_block_mass.is_empty());
    let layout = layout.with_probes(probes);
    let tot_probe: usize = (0..seqs.len())
        .map(|i| layout.num_probes(i) * seqs[i].num_key_blocks(bs))
        .sum();
    let mut pm = vec![0f32; tot_probe * h];
    for (si, s) in seqs.iter().enumerate() {
        let (nkb, nqb) = (s.num_key_blocks(bs), s.num_query_blocks(bs));
        for head in 0..h {
            let st = &stats[si * h + head];
            let lo = layout.line_offset(si, head);
            vertical[lo..lo + s.kv_len].copy_from_slice(&st.vertical);
            slash[lo..lo + s.kv_len].copy_from_slice(&st.slash);
            let eo = layout.estimate_offset(si, head);
            estimate[eo..eo + nkb].copy_from_slice(&st.estimate);
            let ro = layout.rep_offset(si, head);
            rbm[ro..ro + st.rep_block_mass.len()].copy_from_slice(&st.rep_block_mass);
            let ko = layout.k_pooled_offset(si, layout.shape.kv_head(head));
            kp[ko..ko + nkb * d].copy_from_slice(&st.k_pooled);
            let qo = layout.q_pooled_offset(si, head);
            qp[qo..qo + nqb * d].copy_from_slice(&st.q_pooled);
            if probes {
                let po = layout.probe_offset(si, head);
                pm[po..po + st.probe_block_mass.len()].copy_from_slice(&st.probe_block_mass);
            }
        }
    }
    let sampled = stats.iter().any(|st| !st.sampled_block_mass.is_empty());
    let dst = DeviceStats::from_parts(
        stream,
        layout.clone(),
        [vertical, slash, estimate, rbm, kp, qp, pm],
        emulate,
    )?;
    if !sampled {
        return Ok(dst);
    }
    let mut sbm = vec![0f32; layout.total_query_key_blocks() * h];
    for (si, s) in seqs.iter().enumerate() {
        let n = s.num_query_blocks(bs) * s.num_key_blocks(bs);
        for head in 0..h {
            let so = layout.sampled_offset(si, head);
            sbm[so..so + n].copy_from_slice(&stats[si * h + head].sampled_block_mass);
        }
    }
    dst.with_sampled_block_mass(stream, &sbm)
}
