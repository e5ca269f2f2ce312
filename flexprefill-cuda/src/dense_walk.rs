//! The dense-walk decision (`kernels/dense_walk.cu`): after the index build, one small kernel
//! flags every (sequence, head) whose selection is so dense that its sparse walk would cost at
//! least as much as walking every causal block; the attention kernels then walk those heads
//! dense. Decided on the device, no host synchronisation.

use cudarc::driver::{CudaSlice, CudaStream};

use crate::attention::{env_parse, DeviceBlockIndex, DeviceSeqs};
use crate::device::CudaDevice;
use crate::error::Result;
use crate::launch::Launch;
use crate::registry::{KernelFamily, KernelKey};

/// The dense-walk decision (`kernels/dense_walk.cu`): per (sequence, head), whether the
/// attention kernels walk the index or every causal block.
pub static DENSE_WALK: KernelFamily = KernelFamily {
    name: "dense_walk",
    source: include_str!("../kernels/dense_walk.cu"),
};

/// Cost of one computed block on the sparse walk over one on the dense walk, for the
/// warp-specialized Hopper kernel at block 128. Measured on the H200 (bf16, 32 q / 8 kv heads,
/// d 128, 32k–128k) at 1.17–1.19 before the chunked CTA order ([`crate::attention::tile_chunk`]) and 0.96–1.07
/// since (dense 598–610 TFLOP/s, indexes of density ≈ 0.3 at 560–645). It stays 1.2: a head
/// between the two thresholds (0.83–0.95 of its blocks) gains at most a few percent from its
/// sparse walk, and the dense walk is the side that can never lose to dense attention
/// (random data at 128k, gamma 0.95, density 0.93: whole call 1.02x dense with it).
pub const SPARSE_BLOCK_COST: f64 = 1.2;

/// Selected share of a head's causal blocks at and above which its sparse walk costs at least
/// as much as the dense one (`1 / SPARSE_BLOCK_COST` ≈ 0.83): such a head walks every causal
/// block. `FLEXPREFILL_DENSE_WALK_DENSITY` overrides it (see [`dense_walk_density`]).
pub const DENSE_WALK_DENSITY: f64 = 1.0 / SPARSE_BLOCK_COST;

/// [`DENSE_WALK_DENSITY`], or the value of `FLEXPREFILL_DENSE_WALK_DENSITY` when it parses as a
/// number (benches: above 1 never walks dense, 0 always does); anything else is ignored.
pub fn dense_walk_density() -> f64 {
    env_parse::<f64>("FLEXPREFILL_DENSE_WALK_DENSITY")
        .filter(|v| !v.is_nan())
        .unwrap_or(DENSE_WALK_DENSITY)
}

/// Queues the dense-walk decision for `index` over `seqs` on `stream` (no host sync): a byte
/// per (sequence, head), sequence-major, 1 where the head's selected blocks reach
/// `max_density` of its causal blocks (core's `Sequence::total_causal_blocks`). Pass the
/// result to [`crate::attention::launch_attention_walk`]; read it back for the report.
pub fn choose_dense_walk(
    dev: &CudaDevice,
    stream: &std::sync::Arc<CudaStream>,
    seqs: &DeviceSeqs,
    index: &DeviceBlockIndex,
    max_density: f64,
) -> Result<CudaSlice<u8>> {
    let mut flags = crate::pool::alloc_zeros::<u8>(stream, seqs.seqs().len() * index.num_heads)?;
    choose_dense_walk_into(dev, stream, seqs, index, max_density, &mut flags)?;
    Ok(flags)
}

/// [`choose_dense_walk`] into `flags` (at least one byte per (sequence, head)), so that a
/// workspace call allocates nothing.
pub(crate) fn choose_dense_walk_into(
    dev: &CudaDevice,
    stream: &std::sync::Arc<CudaStream>,
    seqs: &DeviceSeqs,
    index: &DeviceBlockIndex,
    max_density: f64,
    flags: &mut CudaSlice<u8>,
) -> Result<()> {
    let n = seqs.seqs().len();
    let h = index.num_heads;
    if index.head_row_start.len() != n * h + 1 || h == 0 || h > 65535 || n > 65535 {
        return Err(flexprefill_core::Error::Index(format!(
            "device index has {} head starts and {h} heads, {n} sequences need {}",
            index.head_row_start.len(),
            n * h + 1
        ))
        .into());
    }
    if flags.len() < n * h {
        return Err(flexprefill_core::Error::Index(format!(
            "dense-walk flags hold {} bytes, {n} sequences × {h} heads need {}",
            flags.len(),
            n * h
        ))
        .into());
    }
    let key = KernelKey::new(&DENSE_WALK, None, 0, 0);
    let f = dev.function(&DENSE_WALK, &key, "dense_walk_choose", 0)?;
    let (h_u, bs_u) = (h as u32, index.block_size as u32);
    let launch = Launch::new(stream, &f, (h_u, n as u32, 1), 32, 0)
        .arg(&index.head_row_start)
        .arg(&index.row_offsets)
        .arg(seqs.device())
        .arg(&h_u)
        .arg(&bs_u)
        .arg(&max_density)
        .arg(flags);
    // SAFETY: argument types match the kernel; it reads head_row_start[0..=n·h] (length checked),
    // row_offsets at those values (the index's own offsets), seqs[0..n], and writes flags[0..n·h]
    // (length checked above).
    unsafe { launch.launch() }?;
    Ok(())
}
