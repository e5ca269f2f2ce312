//! Offline NVRTC compile of every statistics and selection module variant the crate launches
//! (no driver, no GPU). With `FLEXPREFILL_PTXAS_OUT=FILE` the `ptxas -v` report of every
//! variant is written to FILE, so a refactor of the kernel sources can be checked for
//! unchanged registers, stack and spills (diff the files from before and after). With
//! `FLEXPREFILL_CUBIN_DIR=DIR` every variant's cubin is written there too, one file per
//! variant, for a before/after comparison of the machine code (`nvdisasm -c`).

use std::fmt::Write as _;

use flexprefill_core::DType;

use crate::registry::compile_offline;
use crate::select::{select_key, SELECT};
use crate::stats::{key as stats_key, PassPath, STATS};

/// The `ptxas -v` lines of a log with the NVRTC program name dropped (it names the source).
fn report(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("ptxas info"))
        .map(|l| l.trim().to_string() + "\n")
        .collect()
}

/// Writes `cubin` as `NAME.cubin` under `FLEXPREFILL_CUBIN_DIR` when that is set.
fn keep_cubin(name: &str, cubin: &[u8]) {
    if let Some(dir) = std::env::var_os("FLEXPREFILL_CUBIN_DIR") {
        let file: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = std::path::Path::new(&dir).join(file + ".cubin");
        std::fs::write(&path, cubin).expect("write the cubin");
    }
}

#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn every_stats_and_select_variant_compiles() {
    let mut out = String::new();
    for arch in [(9, 0), (8, 0)] {
        let (cubin, log) = compile_offline(&SELECT, &select_key(), arch)
            .unwrap_or_else(|e| panic!("select sm{arch:?}: {e}"));
        keep_cubin(&format!("select_sm{}{}", arch.0, arch.1), &cubin);
        let _ = writeln!(out, "== select sm{arch:?}\n{}", report(&log));
        for dtype in [DType::BF16, DType::F16] {
            for d in [64, 96, 128, 256] {
                let mut paths = vec![PassPath::Mma];
                if arch == (9, 0) && (d == 64 || d == 128) {
                    paths.push(PassPath::Wgmma { overlap: false });
                    paths.push(PassPath::Wgmma { overlap: true });
                }
                for path in paths {
                    for emulate in [false, true] {
                        let key = stats_key(dtype, d, emulate, path);
                        let (cubin, log) =
                            compile_offline(&STATS, &key, arch).unwrap_or_else(|e| {
                                panic!(
                                    "stats {dtype} d{d} {path:?} emulate {emulate} sm{arch:?}: {e}"
                                )
                            });
                        keep_cubin(
                            &format!(
                                "stats_{dtype}_d{d}_{path:?}_emulate{emulate}_sm{}{}",
                                arch.0, arch.1
                            ),
                            &cubin,
                        );
                        let _ = writeln!(
                            out,
                            "== stats {dtype} d{d} {path:?} emulate {emulate} sm{arch:?}\n{}",
                            report(&log)
                        );
                    }
                }
            }
        }
    }
    if let Some(path) = std::env::var_os("FLEXPREFILL_PTXAS_OUT") {
        std::fs::write(&path, out).expect("write the ptxas report");
    }
}

/// Spill-store bytes `ptxas -v` reports for function `name` in `log` (None: not in the log).
fn spill_stores(log: &str, name: &str) -> Option<usize> {
    let mut lines = log.lines();
    let marker = format!("Function properties for {name}");
    lines.by_ref().find(|l| l.trim_end().ends_with(&marker))?;
    let line = lines.find(|l| l.contains("spill stores"))?;
    line.split(',')
        .find(|f| f.contains("spill stores"))
        .and_then(|f| f.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The sampled mode's kernels (`stats_sampled` and its one-pass variant, `sel_sampled_cut`)
/// and the oracle's every-row twin (`stats_oracle_block_mass`) compile without register
/// spills for both architectures, both dtypes and the head dims the statistics take.
#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn sampled_kernels_compile_without_spills() {
    let mut bad = Vec::new();
    for arch in [(9, 0), (8, 0)] {
        let (_, log) = compile_offline(&SELECT, &select_key(), arch)
            .unwrap_or_else(|e| panic!("select sm{arch:?}: {e}"));
        match spill_stores(&log, "sel_sampled_cut") {
            Some(0) => {}
            other => bad.push(format!("sel_sampled_cut sm{arch:?}: {other:?}")),
        }
        for dtype in [DType::BF16, DType::F16] {
            for d in [64, 128, 256] {
                let key = stats_key(dtype, d, false, PassPath::Mma);
                let (_, log) = compile_offline(&STATS, &key, arch)
                    .unwrap_or_else(|e| panic!("stats {dtype} d{d} sm{arch:?}: {e}"));
                for name in [
                    "stats_sampled",
                    "stats_sampled_1p",
                    "stats_oracle_block_mass",
                ] {
                    match spill_stores(&log, name) {
                        Some(0) => {}
                        other => bad.push(format!("{name} {dtype} d{d} sm{arch:?}: {other:?}")),
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "spills (or no report):\n{}", bad.join("\n"));
}
