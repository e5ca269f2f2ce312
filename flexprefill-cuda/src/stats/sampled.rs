//! The sampled mode's estimate on the device (`kernels/stats/sampled.cu`):
//! `HeadStatistics::sampled_block_mass` for every (sequence, head, query block).

use super::*;
use crate::launch::Launch;
use cudarc::driver::CudaFunction;
use flexprefill_core::selection::SAMPLED_ROWS;

/// The kernel's rows per warp (one m16 tile) and the most query heads of a GQA group one CTA
/// holds (one warp each; the group's heads share every key tile).
const SAMPLED_TILE_ROWS: usize = 16;
const MAX_HEADS_PER_CTA: usize = 8;
const _: () = assert!(
    SAMPLED_ROWS == SAMPLED_TILE_ROWS,
    "the sampled rows must fill one m16 tile of the sampled statistics kernel"
);

/// Dynamic shared memory of `stats_sampled` with `heads` query heads per CTA: the sampled
/// rows of each warp's head and a double-buffered key tile, rows padded by 8 elements (the
/// kernels' `DPAD`).
fn smem(head_dim: usize, heads: usize) -> usize {
    (heads * SAMPLED_TILE_ROWS + 2 * KT) * (head_dim + 8) * 2
}

/// Query heads per CTA for a GQA group of `group` query heads: the whole group up to 8 warps
/// (every key tile loaded once for all of them), fewer where shared memory is short.
fn heads_per_cta(group: usize, head_dim: usize, max_smem: usize) -> usize {
    let mut hpc = group.clamp(1, MAX_HEADS_PER_CTA);
    while hpc > 1 && smem(head_dim, hpc) > max_smem {
        hpc -= 1;
    }
    hpc
}

/// CTAs per SM of the one-pass kernel's persistent grid (each holds a scratch slot).
const ONEPASS_CTAS_PER_SM: usize = 4;
/// Static shared memory the one-pass kernel may hold beside its dynamic shared memory.
const ONEPASS_STATIC_SMEM: usize = 1024;

/// `FLEXPREFILL_SAMPLED_ONEPASS=1`: the one-pass kernel (`stats_sampled_1p`), which reads
/// every key once instead of twice at the cost of a scratch of (sum, max) pairs per sampled
/// row and key block for each resident CTA. Read when a call is queued (or a workspace
/// planned: its size includes the scratch only when set then).
fn one_pass() -> bool {
    std::env::var("FLEXPREFILL_SAMPLED_ONEPASS").is_ok_and(|v| v.trim() == "1")
}

/// What both kernels open with: q, k, the sequence descriptors, the query block → sequence
/// table, then Σ nqb, heads, kv heads, heads per CTA, block size, `sl`, the estimate.
struct SampledArgs<'a, T> {
    q: &'a CudaSlice<T>,
    k: &'a CudaSlice<T>,
    descs: &'a CudaSlice<SeqDesc>,
    qb_seq: &'a CudaSlice<u32>,
    total_qb: u32,
    sizes: [i32; 4],
    sl: f32,
}

impl<'a, T: DeviceRepr> SampledArgs<'a, T> {
    /// A launch of `f` with the shared arguments pushed; the caller pushes the rest.
    fn launch(
        &'a self,
        stream: &'a CudaStream,
        f: &'a CudaFunction,
        grid: (u32, u32, u32),
        smem: usize,
        out: &'a mut Buf<f32>,
    ) -> Launch<'a> {
        let [h, hkv, hpc, bs] = &self.sizes;
        Launch::new(stream, f, grid, (32 * *hpc) as u32, smem)
            .arg(self.q)
            .arg(self.k)
            .arg(self.descs)
            .arg(self.qb_seq)
            .arg(&self.total_qb)
            .arg(h)
            .arg(hkv)
            .arg(hpc)
            .arg(bs)
            .arg(&self.sl)
            .arg(out)
    }
}

/// Which rows of each query block the two-pass kernel averages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rows {
    /// The sampled mode's `SAMPLED_ROWS` rows (`stats_sampled`, or `stats_sampled_1p`).
    Sampled,
    /// Every row: the oracle density's mean-row block mass (`stats_oracle_block_mass`).
    All,
}

/// Queues `stats_sampled` (or `stats_sampled_1p`, see [`one_pass`]; with [`Rows::All`]
/// `stats_oracle_block_mass`) into `out` (`[Σ nqb · nkb · H]`, every element written). `sl` is
/// the scale times log2 e. No host synchronisation.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    scratch: &mut Scratch<'_>,
    kkey: &KernelKey,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    descs: &CudaSlice<SeqDesc>,
    qb_seq: &CudaSlice<u32>,
    layout: &StatsLayout,
    sl: f32,
    rows: Rows,
    out: &mut Buf<f32>,
) -> Result<()> {
    let op = match rows {
        Rows::Sampled => "head_statistics",
        Rows::All => "oracle_density",
    };
    let (h, hkv, d) = (
        layout.shape.num_heads,
        layout.shape.num_kv_heads,
        layout.shape.head_dim,
    );
    // The kernel indexes the estimate with u32 block offsets times H (in size_t).
    layout::to_u32(
        layout.total_qk.saturating_mul(h),
        "sampled_block_mass length",
    )?;
    let group = h / hkv;
    let max_smem = dev.info().max_smem_per_block;
    let hpc = heads_per_cta(group, d, max_smem);
    let bytes = smem(d, hpc);
    if bytes > max_smem {
        return Err(CudaError::Unsupported {
            op,
            message: format!(
                "the block-pooled probabilities at head_dim {d} need {bytes} bytes of shared memory (device: {max_smem})"
            ),
        });
    }
    if layout.total_qb == 0 {
        return Ok(());
    }
    let args = SampledArgs {
        q,
        k,
        descs,
        qb_seq,
        total_qb: layout::to_u32(layout.total_qb, "query blocks")?,
        sizes: [h as i32, hkv as i32, hpc as i32, layout.block_size as i32],
        sl,
    };
    let zdim = group.div_ceil(hpc);
    if rows == Rows::Sampled && one_pass() {
        return launch_one_pass(dev, stream, scratch, kkey, &args, layout, out, zdim, bytes);
    }
    let name = match rows {
        Rows::Sampled => "stats_sampled",
        Rows::All => "stats_oracle_block_mass",
    };
    let f = dev.function(&STATS, kkey, name, max_smem)?;
    let grid = (args.total_qb, hkv as u32, zdim as u32);
    // SAFETY: the arguments match `stats_sampled` and `stats_oracle_block_mass` (one body) in
    // kernels/stats/sampled.cu; q and k hold every token of the layout's sequences (checked by
    // the caller), qb_seq has Σ nqb entries, and `out` Σ nqb · nkb · H floats, the most the
    // kernel indexes.
    unsafe { args.launch(stream, &f, grid, bytes, out).launch() }?;
    profile::mark(stream, name);
    Ok(())
}

/// The one-pass variant (`stats_sampled_1p`): a persistent grid of `ONEPASS_CTAS_PER_SM` CTAs
/// per SM taking the (query block, kv head, group slice) items from a zeroed counter.
#[allow(clippy::too_many_arguments)]
fn launch_one_pass<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    scratch: &mut Scratch<'_>,
    kkey: &KernelKey,
    args: &SampledArgs<'_, T>,
    layout: &StatsLayout,
    out: &mut Buf<f32>,
    zdim: usize,
    two_pass_bytes: usize,
) -> Result<()> {
    let hpc = args.sizes[2] as usize;
    let bytes = two_pass_bytes + hpc * SAMPLED_TILE_ROWS * 2 * 4;
    let limit = dev.info().max_smem_per_block - ONEPASS_STATIC_SMEM;
    if bytes > limit {
        return Err(CudaError::Unsupported {
            op: "head_statistics",
            message: format!(
                "the one-pass sampled estimate needs {bytes} bytes of shared memory (device: {limit})"
            ),
        });
    }
    let items = layout.total_qb * layout.shape.num_kv_heads * zdim;
    layout::to_u32(items, "sampled work items")?;
    let slots = items.min(dev.info().sm_count.max(1) * ONEPASS_CTAS_PER_SM);
    let max_nkb = layout.max_key_blocks();
    let f = dev.function(&STATS, kkey, "stats_sampled_1p", limit)?;
    let mut counter = scratch.zeros::<u32>(stream, 1)?;
    // SAFETY: stats_sampled_1p writes each (sum, max) pair of its slot before it reads it
    // (every key block of the item's row, then the read-back of exactly those blocks).
    let mut pairs = unsafe {
        scratch.take::<[f32; 2]>(stream, (slots * hpc * SAMPLED_TILE_ROWS * max_nkb).max(1))
    }?;
    let (zdim_u, max_nkb_u) = (zdim as u32, layout::to_u32(max_nkb, "key blocks")?);
    // SAFETY: the arguments match `stats_sampled_1p` in kernels/stats/sampled.cu; q, k, descs,
    // qb_seq and out as for stats_sampled; the counter starts at 0; `pairs` holds
    // slots · hpc · 16 · max_nkb pairs, the most the kernel's slots index.
    unsafe {
        args.launch(stream, &f, (slots as u32, 1, 1), bytes, out)
            .arg(&mut counter)
            .arg(&zdim_u)
            .arg(&max_nkb_u)
            .arg(&mut pairs)
            .launch()
    }?;
    profile::mark(stream, "stats_sampled_1p");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_per_cta_fit_shared_memory() {
        // H200 (227 KiB): the whole group up to 8 heads, at every head_dim.
        assert_eq!(heads_per_cta(4, 128, 227 * 1024), 4);
        assert_eq!(heads_per_cta(16, 256, 227 * 1024), 8);
        assert_eq!(smem(256, 8), (8 * 16 + 128) * 264 * 2);
        // 99 KiB (sm_86): head_dim 256 with GQA 8 takes fewer heads per CTA.
        let hpc = heads_per_cta(8, 256, 99 * 1024);
        assert!(hpc < 8 && smem(256, hpc) <= 99 * 1024 && smem(256, hpc + 1) > 99 * 1024);
        assert_eq!(heads_per_cta(1, 64, 48 * 1024), 1);
    }
}
