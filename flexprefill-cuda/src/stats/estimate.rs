//! The pooled queries of the query-aware heads (`kernels/stats/estimate.cu`, `stats_pool_q`).

use super::*;
use crate::launch::Launch;

/// Queues the pooled queries `Q̄_r` (the query-aware map's input). With `qa_flag`
/// (`[num_seqs · H]` i32, nonzero = query-aware) only those heads are computed: the decision
/// stays on the device and vertical-slash heads cost nothing.
pub fn launch_pool_q<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    q: &CudaSlice<T>,
    stats: &mut DeviceStats,
    qa_flag: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let l = &stats.layout;
    let f = dev.function(
        &STATS,
        &key(T::DTYPE, l.shape.head_dim, stats.emulate, stats.path),
        "stats_pool_q",
        0,
    )?;
    let h_i = l.shape.num_heads as i32;
    let bs_i = l.block_size as i32;
    let emu_i = stats.emulate as i32;
    let grid = (l.total_qb as u32, l.shape.num_heads as u32, 1);
    if l.total_qb == 0 {
        return Ok(());
    }
    let null: u64 = 0;
    let launch = Launch::new(stream, &f, grid, (l.shape.head_dim / 4) as u32, 0)
        .arg(q)
        .arg(&stats.descs)
        .arg(&stats.qb_seq)
        .arg(&h_i)
        .arg(&bs_i)
        .arg(&stats.scale)
        .arg(&emu_i);
    // A null flag pointer means "every head".
    let launch = match qa_flag {
        Some(flag) => launch.arg(flag),
        None => launch.arg(&null),
    };
    // SAFETY: arguments match `stats_pool_q`; buffers are sized by the layout for every
    // (query block, head) of the grid.
    unsafe { launch.arg(&mut stats.q_pooled).launch() }?;
    profile::mark(stream, "stats_pool_q");
    Ok(())
}
