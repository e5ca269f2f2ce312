//! Every shipped attention variant compiles with NVRTC for Hopper (sm_90a) and Ampere (sm_80),
//! without spilling registers. Needs only libnvrtc (no driver, no GPU), so it runs on a dev box
//! with the NVRTC wheel and on the GPU machine.

use flexprefill_core::DType;
use flexprefill_cuda::attention::{AttnTile, ATTENTION, DENSE_WALK, UTIL};
use flexprefill_cuda::internals::compile_offline;
use flexprefill_cuda::internals::KernelKey;

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
                // FLEXPREFILL_DUMP_CUBIN=dir writes the cubins for cuobjdump --dump-sass.
                if let Ok(dir) = std::env::var("FLEXPREFILL_DUMP_CUBIN") {
                    let path = format!(
                        "{dir}/attention_mma_sm{}{}_{dtype}_d{d}_bs{bs}.cubin",
                        arch.0, arch.1
                    );
                    std::fs::write(&path, &cubin).expect("dump dir writable");
                }
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
fn dense_walk_decision_compiles() {
    for arch in [(9, 0), (8, 0)] {
        let key = KernelKey::new(&DENSE_WALK, None, 0, 0);
        let (cubin, log) = compile_offline(&DENSE_WALK, &key, arch)
            .unwrap_or_else(|e| panic!("dense_walk sm{arch:?}: {e}"));
        assert!(!cubin.is_empty());
        println!("dense_walk sm{}{}\n{log}", arch.0, arch.1);
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
