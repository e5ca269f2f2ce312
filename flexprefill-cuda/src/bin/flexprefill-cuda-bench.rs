//! GPU benchmark of the attention kernels: dense causal (this crate's baseline) and
//! block-sparse over a synthetic index, timed with CUDA events (median after warm-up).
//!
//! ```text
//! flexprefill-cuda-bench [--seqs 8192,32768,65536,131072] [--iters 10] [--warmup 3]
//!     [--density 0.3] [--heads 32] [--kv-heads 8] [--dim 128] [--block 128] [--variants]
//! ```
//!
//! FLOPs: dense is counted as causal attention, `4·D·H·n²/2` (SDPA's convention, so the
//! numbers compare with `benches/sdpa.py`); sparse counts the computed blocks,
//! `4·D·Σ_blocks rows·keys` over the listed blocks (diagonal blocks counted whole, as the
//! kernel computes them whole). Inputs are random normal bf16 drawn on the device.

use std::error::Error;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use flexprefill_core::{AttentionShape, BlockIndex, Sequence};
use flexprefill_cuda::attention::fill_normal;
use flexprefill_cuda::{AttentionArgs, AttnTile, CudaBackend, DeviceBlockIndex, DeviceSeqs};
use half::bf16;

struct Opts {
    seqs: Vec<usize>,
    iters: usize,
    warmup: usize,
    density: f64,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    block: usize,
    variants: bool,
}

fn parse() -> Result<Opts, Box<dyn Error>> {
    let mut o = Opts {
        seqs: vec![8192, 32768, 65536, 131072],
        iters: 10,
        warmup: 3,
        density: 0.3,
        heads: 32,
        kv_heads: 8,
        dim: 128,
        block: 128,
        variants: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seqs" => {
                o.seqs = val()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--iters" => o.iters = val()?.parse()?,
            "--warmup" => o.warmup = val()?.parse()?,
            "--density" => o.density = val()?.parse()?,
            "--heads" => o.heads = val()?.parse()?,
            "--kv-heads" => o.kv_heads = val()?.parse()?,
            "--dim" => o.dim = val()?.parse()?,
            "--block" => o.block = val()?.parse()?,
            "--variants" => o.variants = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

/// Median of `iters` timings (ms) of `f`, each between two events, after `warmup` calls.
fn time_ms(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<(), Box<dyn Error>>,
) -> Result<f64, Box<dyn Error>> {
    for _ in 0..warmup {
        f()?;
    }
    let ctx = stream.context();
    let mut events = Vec::new();
    for _ in 0..iters {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(stream)?;
        f()?;
        b.record(stream)?;
        events.push((a, b));
    }
    stream.synchronize()?;
    let mut t: Vec<f64> = events
        .iter()
        .map(|(a, b)| a.elapsed_ms(b).map(f64::from))
        .collect::<Result<_, _>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// splitmix64 for the synthetic index.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Sink + diagonal + each other causal block with probability `p`, per head: the density
/// FlexPrefill yields at gamma 0.9 on long inputs (≈ 0.3), scattered at random (the worst case
/// for K/V reuse in L2).
fn synthetic_index(seq: Sequence, heads: usize, bs: usize, p: f64, seed: u64) -> BlockIndex {
    let mut all = Vec::with_capacity(heads);
    let mut s = seed;
    for _ in 0..heads {
        let rows = (0..seq.num_query_blocks(bs))
            .map(|r| {
                let causal = seq.causal_key_blocks(r, bs);
                (0..causal as u32)
                    .filter(|&c| {
                        s = mix(s);
                        c == 0
                            || c as usize == causal - 1
                            || ((s >> 11) as f64 / (1u64 << 53) as f64) < p
                    })
                    .collect()
            })
            .collect();
        all.push(rows);
    }
    BlockIndex::from_rows(&[seq], heads, bs, all).expect("rows built for this sequence")
}

/// Vertical-slash structure, FlexPrefill's common pattern: per head, a set of key-block columns
/// (probability `pv` each) and a set of diagonal offsets (probability `ps` each), plus sink and
/// diagonal. Rows share columns and neighbouring rows read neighbouring slash blocks, so K/V
/// blocks are reused through L2 as in real selections.
fn vertical_slash_index(
    seq: Sequence,
    heads: usize,
    bs: usize,
    pv: f64,
    ps: f64,
    seed: u64,
) -> BlockIndex {
    let nkb = seq.num_key_blocks(bs);
    let mut s = seed ^ 0x5eed;
    let mut coin = |p: f64| {
        s = mix(s);
        ((s >> 11) as f64 / (1u64 << 53) as f64) < p
    };
    let mut all = Vec::with_capacity(heads);
    for _ in 0..heads {
        let vertical: Vec<bool> = (0..nkb).map(|_| coin(pv)).collect();
        let slash: Vec<bool> = (0..nkb).map(|_| coin(ps)).collect();
        let rows = (0..seq.num_query_blocks(bs))
            .map(|r| {
                let causal = seq.causal_key_blocks(r, bs);
                (0..causal)
                    .filter(|&c| c == 0 || c + 1 == causal || vertical[c] || slash[causal - 1 - c])
                    .map(|c| c as u32)
                    .collect()
            })
            .collect();
        all.push(rows);
    }
    BlockIndex::from_rows(&[seq], heads, bs, all).expect("rows built for this sequence")
}

/// FLOPs of the computed blocks: 4·D·Σ rows·keys over every listed block.
fn block_flops(index: &BlockIndex, seq: Sequence, heads: usize, d: usize) -> f64 {
    let bs = index.block_size();
    let mut f = 0.0;
    for h in 0..heads {
        for r in 0..seq.num_query_blocks(bs) {
            let rows = (seq.q_len - r * bs).min(bs) as f64;
            for &c in index.row(0, h, r) {
                let keys = (seq.kv_len - c as usize * bs).min(bs) as f64;
                f += rows * keys;
            }
        }
    }
    4.0 * d as f64 * f
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let o = parse()?;
    let gpu = CudaBackend::new()?;
    let dev = gpu.device().clone();
    let stream = gpu.stream().clone();
    let info = dev.info();
    println!(
        "device: {} (sm {}.{}, {} SMs, {} MiB L2), shape H {} Hkv {} D {} block {}, bf16, iters {} warmup {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.sm_count,
        info.l2_bytes >> 20,
        o.heads,
        o.kv_heads,
        o.dim,
        o.block,
        o.iters,
        o.warmup
    );
    let shape = AttentionShape::new(o.heads, o.kv_heads, o.dim)?;
    let tile = AttnTile::auto_for(info.compute_capability, o.dim, o.block);
    let module = dev.module(
        tile.family(),
        &tile.kernel_key(flexprefill_core::DType::BF16, o.dim, o.block),
    )?;
    println!(
        "tile {tile:?}; nvrtc: {}",
        module.log.trim().replace('\n', " | ")
    );

    let mut table = Vec::new();
    for &n in &o.seqs {
        let seq = Sequence {
            q_start: 0,
            k_start: 0,
            q_len: n,
            kv_len: n,
        };
        let mut q: CudaSlice<bf16> = stream.alloc_zeros(n * o.heads * o.dim)?;
        let mut k: CudaSlice<bf16> = stream.alloc_zeros(n * o.kv_heads * o.dim)?;
        let mut v: CudaSlice<bf16> = stream.alloc_zeros(n * o.kv_heads * o.dim)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
        fill_normal(&dev, &stream, &mut q, seed, 1.0)?;
        fill_normal(&dev, &stream, &mut k, seed ^ 1, 1.0)?;
        fill_normal(&dev, &stream, &mut v, seed ^ 2, 1.0)?;
        let seqs = DeviceSeqs::new(&stream, &[seq])?;
        let mut out: CudaSlice<bf16> = stream.alloc_zeros(n * o.heads * o.dim)?;
        let args = AttentionArgs::new(&q, &k, &v, shape, &seqs);
        let causal_flops = 4.0 * o.dim as f64 * o.heads as f64 * (n as f64) * (n as f64) / 2.0;

        let ms = time_ms(&stream, o.warmup, o.iters, || {
            Ok(gpu.attention_device(&stream, &args, None, None, &mut out, None)?)
        })?;
        table.push((n, "dense".to_string(), 1.0, ms, causal_flops / ms / 1e9));

        let index = synthetic_index(seq, o.heads, o.block, o.density, seed);
        let density = index.density();
        let flops = block_flops(&index, seq, o.heads, o.dim);
        let dindex = DeviceBlockIndex::upload(&stream, &index)?;
        let ms = time_ms(&stream, o.warmup, o.iters, || {
            Ok(gpu.attention_device(&stream, &args, Some(&dindex), None, &mut out, None)?)
        })?;
        table.push((n, "sparse random".into(), density, ms, flops / ms / 1e9));

        let index = vertical_slash_index(
            seq,
            o.heads,
            o.block,
            o.density / 2.0,
            o.density / 2.0,
            seed,
        );
        let density = index.density();
        let flops = block_flops(&index, seq, o.heads, o.dim);
        let dindex = DeviceBlockIndex::upload(&stream, &index)?;
        let ms = time_ms(&stream, o.warmup, o.iters, || {
            Ok(gpu.attention_device(&stream, &args, Some(&dindex), None, &mut out, None)?)
        })?;
        table.push((
            n,
            "sparse vertical-slash".into(),
            density,
            ms,
            flops / ms / 1e9,
        ));
        if o.variants {
            for t in AttnTile::variants(o.dim, o.block)
                .into_iter()
                .filter(|t| t.wgmma)
            {
                let ms = time_ms(&stream, 1, o.iters.min(5), || {
                    Ok(gpu.attention_device(
                        &stream,
                        &args,
                        Some(&dindex),
                        Some(t),
                        &mut out,
                        None,
                    )?)
                })?;
                table.push((
                    n,
                    format!(
                        "sparse v-s {} bq{} bk{} st{}",
                        if t.ws { "ws" } else { "wgmma" },
                        t.bq,
                        t.bk,
                        t.stages
                    ),
                    density,
                    ms,
                    flops / ms / 1e9,
                ));
            }
        }

        if o.variants {
            let full = BlockIndex::dense(&[seq], o.heads, o.block)?;
            let dfull = DeviceBlockIndex::upload(&stream, &full)?;
            let ms = time_ms(&stream, o.warmup, o.iters, || {
                Ok(gpu.attention_device(&stream, &args, Some(&dfull), None, &mut out, None)?)
            })?;
            table.push((
                n,
                "sparse-full-index".into(),
                1.0,
                ms,
                causal_flops / ms / 1e9,
            ));
            for t in AttnTile::variants(o.dim, o.block) {
                let r = time_ms(&stream, 1, o.iters.min(5), || {
                    Ok(gpu.attention_device(&stream, &args, None, Some(t), &mut out, None)?)
                });
                match r {
                    Ok(ms) => table.push((
                        n,
                        format!(
                            "dense {} bq{} bk{} w{} st{} qr{} mb{}",
                            if t.ws {
                                "ws"
                            } else if t.wgmma {
                                "wgmma"
                            } else {
                                "mma"
                            },
                            t.bq,
                            t.bk,
                            t.warps,
                            t.stages,
                            t.q_in_regs as u8,
                            t.min_blocks
                        ),
                        1.0,
                        ms,
                        causal_flops / ms / 1e9,
                    )),
                    Err(e) => println!("variant {t:?}: {e}"),
                }
            }
        }
        println!("seq {n} done");
    }
    println!("\n| seq | kernel | density | median ms | TFLOP/s |");
    println!("|---|---|---|---|---|");
    for (n, name, d, ms, tf) in table {
        println!("| {n} | {name} | {d:.3} | {ms:.3} | {tf:.1} |");
    }
    Ok(())
}
