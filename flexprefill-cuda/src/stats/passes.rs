//! The statistics passes and the estimate (`kernels/stats/passes.cu`, `passes_sm90.cu`,
//! `estimate.cu`): [`launch_stats`] queues them all.

use super::*;
use crate::launch::Launch;
use cudarc::driver::CudaFunction;

/// The statistics module for `dtype`, `head_dim` and the rounding mode (`emulate`: the
/// original's bf16 rounding points, compiled in or out).
pub(crate) fn key(dtype: DType, head_dim: usize, emulate: bool, path: PassPath) -> KernelKey {
    let k = KernelKey::new(&STATS, Some(dtype), head_dim, 0)
        .define(
            "PROBE_QUERIES",
            flexprefill_core::selection::PROBE_QUERIES as i64,
        )
        .define("STATS_EMULATE", emulate as i64)
        .define(
            "SAMPLED_ROWS",
            flexprefill_core::selection::SAMPLED_ROWS as i64,
        );
    match path {
        PassPath::Mma => k,
        PassPath::Wgmma { overlap } => k
            .define("STATS_WGMMA", 1)
            .define("STATS_OVERLAP", overlap as i64),
    }
}

/// The arguments both passes open with (`stats_pass1`, `stats_pass2` and their wgmma twins):
/// q, k, the sequence descriptors, the (sequence, split) work list, then heads, kv heads, keys
/// per split, padded representative rows and the row stride.
struct PassHead<'a, T> {
    q: &'a CudaSlice<T>,
    k: &'a CudaSlice<T>,
    descs: &'a CudaSlice<SeqDesc>,
    work: &'a CudaSlice<u32>,
    sizes: [i32; 5],
}

impl<'a, T: DeviceRepr> PassHead<'a, T> {
    /// A pass launch with the shared arguments pushed; the caller pushes the rest.
    fn launch(
        &'a self,
        stream: &'a CudaStream,
        f: &'a CudaFunction,
        grid: (u32, u32, u32),
        smem: usize,
    ) -> Launch<'a> {
        let [h, hkv, split, rp, rs] = &self.sizes;
        Launch::new(stream, f, grid, NTHREADS, smem)
            .arg(self.q)
            .arg(self.k)
            .arg(self.descs)
            .arg(self.work)
            .arg(h)
            .arg(hkv)
            .arg(split)
            .arg(rp)
            .arg(rs)
    }
}

pub(super) fn check_head_dim(d: usize) -> Result<()> {
    // The tiles step through head_dim in 16-wide mma slices (rows padded by 8 elements stay
    // bank-conflict-free for any multiple of 16); 256 bounds the shared memory.
    if d.is_multiple_of(16) && (16..=256).contains(&d) {
        Ok(())
    } else {
        Err(CudaError::Unsupported {
            op: "head_statistics",
            message: format!("head_dim {d} (supported: multiples of 16 up to 256)"),
        })
    }
}

/// Queues the statistics kernels (everything but `q_pooled`) on `stream`. No host sync.
///
/// `scale`/`emulate` come from [`estimation_scale`].
#[allow(clippy::too_many_arguments)]
pub fn launch_stats<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    layout: StatsLayout,
    scale: f32,
    emulate: bool,
) -> Result<DeviceStats> {
    let mut scratch = Scratch::alloc();
    launch_stats_in(dev, stream, &mut scratch, q, k, layout, scale, emulate)
}

/// [`launch_stats`] with its buffers from `scratch` (a workspace's or fresh allocations).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_stats_in<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    scratch: &mut Scratch<'_>,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    layout: StatsLayout,
    scale: f32,
    emulate: bool,
) -> Result<DeviceStats> {
    let shape = layout.shape;
    check_head_dim(shape.head_dim)?;
    let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let need = |name: &'static str, got: usize, want: usize| -> Result<()> {
        if got != want {
            return Err(CudaError::BufferLen {
                op: "head_statistics",
                name,
                got,
                want,
            });
        }
        Ok(())
    };
    let total_q = layout.seqs.last().map_or(0, |s| s.q_start + s.q_len);
    need("q", q.len(), total_q * h * d)?;
    need("k", k.len(), layout.total_tok * hkv * d)?;
    let path = PassPath::choose(dev.info().compute_capability, d);
    let kkey = key(T::DTYPE, d, emulate, path);
    let smem1 = layout.pass_smem(false, path);
    let smem2 = layout.pass_smem(true, path);
    let max_smem = dev.info().max_smem_per_block;
    if smem2 > max_smem {
        return Err(CudaError::Unsupported {
            op: "head_statistics",
            message: format!("head_dim {d} with block_size {} needs {smem2} bytes of shared memory (device: {max_smem})", layout.block_size),
        });
    }
    // The registry raises a function's dynamic-smem limit once, at first use: ask for the
    // device maximum so a later launch with a larger block size is not refused.
    let (name1, name2) = path.names();
    let f_pass1 = dev.function(&STATS, &kkey, name1, max_smem)?;
    let f_merge = dev.function(&STATS, &kkey, "stats_merge", 0)?;
    let f_pass2 = dev.function(&STATS, &kkey, name2, max_smem)?;
    let f_final = dev.function(&STATS, &kkey, "stats_slash_finalize", 0)?;
    let f_pool_k = dev.function(&STATS, &kkey, "stats_pool_k", 0)?;
    let f_est_logits = dev.function(&STATS, &kkey, "stats_estimate_logits", 0)?;
    let f_est = dev.function(&STATS, &kkey, "stats_estimate", 0)?;

    let nseq = layout.seqs.len();
    let total_splits = layout.work.len() / 2;
    let descs = scratch.upload(stream, &layout.descs)?;
    let work = scratch.upload(stream, &layout.work)?;
    let kb_seq = scratch.upload(stream, &layout.kb_seq)?;
    let qb_seq = scratch.upload(stream, &layout.qb_seq)?;
    let rs = layout.row_stride();
    // SAFETY: pass 1 writes the state of every row a later pass reads (the merge also combines
    // the padding rows of shorter sequences, into lse2 entries no pass reads).
    let mut row_ml = unsafe { scratch.take::<[f32; 2]>(stream, total_splits * h * rs) }?;
    let poison = layout.poison && !scratch.is_pooled();
    let mut alloc = |n: usize| -> Result<Buf<f32>> {
        if poison {
            return Ok(crate::backend::poisoned::<f32>(stream, n)?.into());
        }
        // SAFETY: every buffer below is fully written by the kernels before it is read
        // (checked by the poisoned-buffer tests).
        unsafe { scratch.take::<f32>(stream, n) }
    };
    let mut lse2 = alloc(nseq * h * rs)?;
    let mut slash_part = alloc(total_splits * h * layout.sl_stride)?;
    let mut vertical = alloc(layout.total_tok * h)?;
    let mut slash = alloc(layout.total_tok * h)?;
    let mut estimate = alloc(layout.total_kb * h)?;
    let mut rep_block_mass = alloc(layout.total_rep * h)?;
    let mut probe_block_mass = alloc(if layout.probes {
        layout.total_probe * h
    } else {
        1
    })?;
    let mut k_pooled = alloc(layout.total_kb * hkv * d)?;
    let q_pooled = alloc(layout.total_qb * h * d)?;
    let mut sampled_block_mass = alloc(if layout.sampled {
        (layout.total_qk * h).max(1)
    } else {
        1
    })?;

    let (h_i, hkv_i, split_i, rp_i, bs_i) = (
        h as i32,
        hkv as i32,
        SPLIT_KEYS as i32,
        layout.rp as i32,
        layout.block_size as i32,
    );
    // With round_q, Q̂ already carries the scale: the logits only change base.
    let scale_log2 = if emulate {
        std::f32::consts::LOG2_E
    } else {
        scale * std::f32::consts::LOG2_E
    };
    let sl_i = layout.sl_stride as i32;
    let emu_i = emulate as i32;
    let rs_i = rs as i32;
    // The probe rows ride along the representative passes (the key tiles are loaded once).
    let probes_i = layout.measures_probes() as i32;
    let grid_pass = (h as u32, total_splits as u32, 1);
    let head = PassHead {
        q,
        k,
        descs: &descs,
        work: &work,
        sizes: [h_i, hkv_i, split_i, rp_i, rs_i],
    };
    profile::mark(stream, "start");
    // SAFETY (all launches): argument lists match the kernels' signatures in kernels/stats/; every
    // buffer is sized by StatsLayout for the indices the kernels compute.
    unsafe {
        head.launch(stream, &f_pass1, grid_pass, smem1)
            .arg(&scale)
            .arg(&scale_log2)
            .arg(&probes_i)
            .arg(&bs_i)
            .arg(&mut row_ml)
            .launch()?;
        profile::mark(stream, name1);
        Launch::new(stream, &f_merge, (h as u32, nseq as u32, 1), 256, 0)
            .arg(&descs)
            .arg(&row_ml)
            .arg(&h_i)
            .arg(&rs_i)
            .arg(&mut lse2)
            .launch()?;
        profile::mark(stream, "stats_merge");
        head.launch(stream, &f_pass2, grid_pass, smem2)
            .arg(&bs_i)
            .arg(&scale)
            .arg(&scale_log2)
            .arg(&lse2)
            .arg(&sl_i)
            .arg(&mut vertical)
            .arg(&mut rep_block_mass)
            .arg(&mut slash_part)
            .arg(&probes_i)
            .arg(&mut probe_block_mass)
            .launch()?;
        profile::mark(stream, name2);
        let max_kv = layout.seqs.iter().map(|s| s.kv_len).max().unwrap_or(1);
        let grid_final = (max_kv.div_ceil(256) as u32, h as u32, nseq as u32);
        Launch::new(stream, &f_final, grid_final, 256, 0)
            .arg(&descs)
            .arg(&slash_part)
            .arg(&h_i)
            .arg(&split_i)
            .arg(&sl_i)
            .arg(&mut slash)
            .launch()?;
        profile::mark(stream, "stats_slash_finalize");
        let grid_pool = (layout.total_kb as u32, hkv as u32, 1);
        Launch::new(stream, &f_pool_k, grid_pool, (d / 4) as u32, 0)
            .arg(k)
            .arg(&descs)
            .arg(&kb_seq)
            .arg(&hkv_i)
            .arg(&bs_i)
            .arg(&emu_i)
            .arg(&mut k_pooled)
            .launch()?;
        profile::mark(stream, "stats_pool_k");
        // kernels/stats/estimate.cu's EST_TILE: key blocks per stats_estimate_logits CTA.
        let est_tile = if d <= 128 { 64 } else { 32 };
        let max_nkb = layout.max_key_blocks();
        let grid_est = (max_nkb.div_ceil(est_tile) as u32, h as u32, nseq as u32);
        Launch::new(stream, &f_est_logits, grid_est, 256, 0)
            .arg(q)
            .arg(&descs)
            .arg(&k_pooled)
            .arg(&h_i)
            .arg(&hkv_i)
            .arg(&scale)
            .arg(&emu_i)
            .arg(&mut estimate)
            .launch()?;
        Launch::new(stream, &f_est, (h as u32, nseq as u32, 1), 256, 0)
            .arg(&descs)
            .arg(&h_i)
            .arg(&mut estimate)
            .launch()?;
        profile::mark(stream, "stats_estimate");
    }
    if layout.sampled {
        // The sampled mode's estimate: its own scale (never the original's emulation, which
        // belongs to the compatibility mode alone).
        sampled::launch(
            dev,
            stream,
            scratch,
            &kkey,
            q,
            k,
            &descs,
            &qb_seq,
            &layout,
            scale * std::f32::consts::LOG2_E,
            sampled::Rows::Sampled,
            &mut sampled_block_mass,
        )?;
    }
    Ok(DeviceStats {
        layout,
        descs,
        vertical,
        slash,
        estimate,
        rep_block_mass,
        probe_block_mass,
        k_pooled,
        q_pooled,
        sampled_block_mass,
        scale,
        emulate,
        dtype: T::DTYPE,
        qb_seq,
        path,
    })
}
