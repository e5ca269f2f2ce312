//! Every shipped attention variant compiles with NVRTC for Hopper (sm_90a) and Ampere (sm_80),
//! without spilling registers. Needs only libnvrtc (no driver, no GPU), so it runs on a dev box
//! with the NVRTC wheel and on the GPU machine.

use flexprefill_core::DType;
use flexprefill_cuda::attention::{AttnTile, ATTENTION, UTIL};
use flexprefill_cuda::registry::compile_offline;
use flexprefill_cuda::registry::KernelKey;

#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn attention_variants_compile_without_spills() {
    for arch in [(9, 0), (8, 0)] {
        for dtype in [DType::BF16, DType::F16] {
            for (d, bs) in [
                (64, 64),
                (64, 128),
                (128, 64),
                (128, 128),
                (256, 64),
                (256, 128),
                (96, 64),
                (32, 32),
                (48, 16),
                (80, 128),
                (160, 128),
                (96, 256),
                (16, 16),
            ] {
                let tile = AttnTile::auto(d, bs);
                let key = tile.kernel_key(dtype, d, bs);
                let (cubin, log) = compile_offline(&ATTENTION, &key, arch)
                    .unwrap_or_else(|e| panic!("{dtype} d{d} bs{bs} sm{arch:?}: {e}"));
                assert!(!cubin.is_empty());
                println!("sm{}{} {dtype} d{d} bs{bs} {tile:?}\n{log}", arch.0, arch.1);
                assert!(
                    !log.contains("bytes spill stores") || log.contains(" 0 bytes spill stores"),
                    "spills: {log}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn util_kernels_compile() {
    for dtype in [DType::BF16, DType::F16] {
        let key = KernelKey::new(&UTIL, Some(dtype), 0, 0);
        compile_offline(&UTIL, &key, (9, 0)).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn bench_variants_compile() {
    for (d, bs) in [(128, 128), (64, 128), (128, 64)] {
        for t in AttnTile::variants(d, bs) {
            let key = t.kernel_key(DType::BF16, d, bs);
            let (_, log) =
                compile_offline(t.family(), &key, (9, 0)).unwrap_or_else(|e| panic!("{t:?}: {e}"));
            let regs: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("registers") || l.contains("spill"))
                .collect();
            println!("d{d} bs{bs} {t:?}: {regs:?}");
        }
    }
}

#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn wgmma_attention_compiles_for_hopper() {
    for dtype in [DType::BF16, DType::F16] {
        for (d, bs) in [(64, 64), (64, 128), (128, 64), (128, 128)] {
            // The tile shipped before the warp-specialized kernel (still the block-64 default and
            // the FLEXPREFILL_ATTN=wgmma one), and the overlap variant with 64-key steps.
            for tile in [
                AttnTile::wgmma(bs.min(128), bs.min(128)),
                AttnTile {
                    stages: 3,
                    ..AttnTile::wgmma(bs.min(128), 64)
                },
            ] {
                assert!(tile.wgmma);
                let key = tile.kernel_key(dtype, d, bs);
                let (cubin, log) = compile_offline(tile.family(), &key, (9, 0))
                    .unwrap_or_else(|e| panic!("{dtype} d{d} bs{bs}: {e}"));
                // FLEXPREFILL_DUMP_CUBIN=dir writes the cubins for cuobjdump --dump-sass.
                if let Ok(dir) = std::env::var("FLEXPREFILL_DUMP_CUBIN") {
                    let path = format!(
                        "{dir}/attention_sm90_{dtype}_d{d}_bs{bs}_st{}.cubin",
                        tile.stages
                    );
                    std::fs::write(&path, &cubin).expect("dump dir writable");
                }
                let regs: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("registers") || l.contains("spill"))
                    .collect();
                println!("sm90 wgmma {dtype} d{d} bs{bs} {tile:?}: {regs:?}");
                assert!(log.contains(" 0 bytes spill stores"), "spills: {log}");
                assert!(
                    !log.contains("serialized") && !log.contains("is injected"),
                    "wgmma serialized or waits injected: {log}"
                );
            }
        }
    }
}

/// FLEXPREFILL_PROBE="bq,bk,stages,d,bs": print NVRTC's log for one wgmma tile (tuning aid).
#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn probe_tile() {
    let Ok(spec) = std::env::var("FLEXPREFILL_PROBE") else {
        return;
    };
    let v: Vec<usize> = spec
        .split(',')
        .map(|x| x.parse().expect("numbers"))
        .collect();
    let tile = AttnTile {
        stages: v[2],
        ..AttnTile::wgmma(v[0], v[1])
    };
    let key = tile.kernel_key(DType::BF16, v[3], v[4]);
    let (_, log) = compile_offline(tile.family(), &key, (9, 0)).unwrap_or_else(|e| panic!("{e}"));
    println!("{tile:?}\n{log}");
}

/// The Hopper statistics passes (`kernels/stats_sm90.cu`, appended to the stats family and
/// compiled in with `STATS_WGMMA=1`) build for sm_90a without spills, for every shape the host
/// sends them (bf16/f16, head_dim 64/128, the original's bf16 emulation on or off).
#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn wgmma_stats_passes_compile_for_hopper() {
    use flexprefill_cuda::stats::STATS;
    for dtype in [DType::BF16, DType::F16] {
        for d in [64, 128] {
            for (emulate, overlap) in [(0, 0), (1, 0), (0, 1)] {
                // as stats.rs `key` builds it for the wgmma path
                let key = KernelKey::new(&STATS, Some(dtype), d, 0)
                    .define(
                        "PROBE_QUERIES",
                        flexprefill_core::selection::PROBE_QUERIES as i64,
                    )
                    .define("STATS_EMULATE", emulate)
                    .define("STATS_WGMMA", 1)
                    .define("STATS_OVERLAP", overlap);
                let (cubin, log) = compile_offline(&STATS, &key, (9, 0))
                    .unwrap_or_else(|e| panic!("stats wgmma {dtype} d{d}: {e}"));
                assert!(!cubin.is_empty());
                let regs: Vec<&str> = log.lines().filter(|l| l.contains("registers")).collect();
                println!(
                    "sm90a stats wgmma {dtype} d{d} emulate {emulate} overlap {overlap}: {regs:?}"
                );
                for name in ["stats_pass1_sm90", "stats_pass2_sm90"] {
                    assert!(log.contains(name), "{name} missing: {log}");
                }
                assert!(
                    log.lines()
                        .filter(|l| l.contains("spill stores"))
                        .all(|l| l.contains(" 0 bytes spill stores")),
                    "spills: {log}"
                );
                assert!(
                    !log.contains("serialized") && !log.contains("is injected"),
                    "wgmma serialized or waits injected: {log}"
                );
            }
        }
    }
}

/// The warp-specialized Hopper kernel (`kernels/attention_ws.cu`) builds for sm_90a without
/// spills, with the register hand-over honoured (no "setmaxnreg ignored" warning) and the wgmma
/// pipeline not serialized, for every tile `ws_for` ships and the bench's other ws variants.
#[test]
#[ignore = "needs NVRTC (libnvrtc.so)"]
fn warp_specialized_attention_compiles_for_hopper() {
    for dtype in [DType::BF16, DType::F16] {
        for (d, bs) in [(64, 64), (64, 128), (128, 64), (128, 128)] {
            let shipped = AttnTile::ws_for(d, bs).expect("ws takes head_dim 64/128, block 64/128");
            let mut tiles = vec![shipped];
            tiles.extend(AttnTile::variants(d, bs).into_iter().filter(|t| t.ws));
            for tile in tiles {
                assert!(tile.ws && tile.wgmma);
                let key = tile.kernel_key(dtype, d, bs);
                let (cubin, log) = compile_offline(tile.family(), &key, (9, 0))
                    .unwrap_or_else(|e| panic!("{dtype} d{d} bs{bs} {tile:?}: {e}"));
                if let Ok(dir) = std::env::var("FLEXPREFILL_DUMP_CUBIN") {
                    let path = format!(
                        "{dir}/attention_ws_{dtype}_d{d}_bs{bs}_bq{}_st{}.cubin",
                        tile.bq, tile.stages
                    );
                    std::fs::write(&path, &cubin).expect("dump dir writable");
                }
                let regs: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("registers") || l.contains("spill"))
                    .collect();
                println!("sm90 ws {dtype} d{d} bs{bs} {tile:?}: {regs:?}");
                assert!(log.contains(" 0 bytes spill stores"), "spills: {log}");
                assert!(
                    !log.contains("serialized") && !log.contains("is injected"),
                    "wgmma serialized or waits injected: {log}"
                );
                assert!(!log.contains("C7508"), "setmaxnreg ignored: {log}");
            }
        }
    }
}
