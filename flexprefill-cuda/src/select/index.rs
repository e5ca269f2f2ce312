//! Index build (`kernels/select/index.cu`): block mask to CSR.

use super::*;
use crate::launch::Launch;

/// Counts, scans and writes the CSR rows of the block mask.
pub(super) fn launch(r: &mut Run<'_>) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/index.cu; every buffer is sized by
    // the plan in `launch_select` for every index the kernels compute.
    let ext_grid = r.ext_grid();
    unsafe {
        Launch::new(r.stream, &r.f("sel_count")?, ext_grid, 256, 0)
            .warp_rows(&r.c)
            .arg(&r.maskb)
            .arg(&mut r.counts)
            .launch()?;
        crate::stats::profile::mark(r.stream, "sel_count");
        let rows_u = r.total_rows as u32;
        Launch::new(r.stream, &r.f("sel_scan")?, (1, 1, 1), 1024, 0)
            .arg(&r.counts)
            .arg(&rows_u)
            .arg(&mut r.offsets)
            .launch()?;
        crate::stats::profile::mark(r.stream, "sel_scan");
        Launch::new(r.stream, &r.f("sel_write")?, r.grid_rows(), 32, 0)
            .warp_rows(&r.c)
            .arg(&r.maskb)
            .arg(&r.offsets)
            .arg(&mut r.cols)
            .launch()?;
        crate::stats::profile::mark(r.stream, "sel_write");
    }
    Ok(())
}

impl DeviceSelection {
    /// Downloads the index and the per-head decisions (synchronises). `stats` gives each
    /// head's exact representative mass for the report; pass `None` to leave it NaN.
    pub fn to_host(
        &self,
        stream: &Arc<CudaStream>,
        layout: &StatsLayout,
        stats: Option<&[HeadStatistics]>,
    ) -> Result<(BlockIndex, Vec<HeadReport>)> {
        let offsets = stream.clone_dtoh(&self.index.row_offsets)?;
        let pattern = stream.clone_dtoh(&self.pattern)?;
        let js = stream.clone_dtoh(&self.js)?;
        stream.synchronize()?;
        let nnz = offsets[self.rows] as usize;
        let mut cols = vec![0u32; nnz];
        if nnz > 0 {
            stream.memcpy_dtoh(&self.index.col_indices.slice(..nnz), &mut cols)?;
            stream.synchronize()?;
        }
        let h = layout.shape.num_heads;
        let bs = self.index.block_size;
        let mut heads = Vec::with_capacity(layout.seqs.len() * h);
        let mut reports = Vec::with_capacity(layout.seqs.len() * h);
        let mut row = 0usize;
        for (si, s) in layout.seqs.iter().enumerate() {
            let nqb = s.num_query_blocks(bs);
            let nkb = s.num_key_blocks(bs);
            let causal = s.total_causal_blocks(bs);
            for head in 0..h {
                let rows: Vec<Vec<u32>> = (row..row + nqb)
                    .map(|i| cols[offsets[i] as usize..offsets[i + 1] as usize].to_vec())
                    .collect();
                row += nqb;
                let selected: usize = rows.iter().map(Vec::len).sum();
                let pat = match pattern[si * h + head] {
                    PAT_QA => Pattern::QueryAware,
                    PAT_DENSE => Pattern::Dense,
                    _ => Pattern::VerticalSlash,
                };
                let mass = match (pat, stats) {
                    (Pattern::Dense, _) => 1.0,
                    (_, Some(st)) => {
                        mean_rep_mass(&st[si * h + head].rep_block_mass, nkb, s, bs, &rows)
                    }
                    _ => f32::NAN,
                };
                reports.push(HeadReport::new(
                    si,
                    head,
                    pat,
                    js[si * h + head],
                    selected,
                    causal,
                    mass,
                ));
                heads.push(rows);
            }
        }
        let index = BlockIndex::from_rows(&layout.seqs, h, bs, heads)?;
        Ok((index, reports))
    }
}

/// Mean over the representative queries of the exact captured mass (core's
/// `representative_mass`, f64 per query in ascending block order).
fn mean_rep_mass(
    m: &[f32],
    nkb: usize,
    s: &flexprefill_core::Sequence,
    bs: usize,
    rows: &[Vec<u32>],
) -> f32 {
    let rep = bs.min(s.q_len);
    if m.len() != rep * nkb || rep == 0 {
        return f32::NAN;
    }
    let mut total = 0f64;
    for i in 0..rep {
        let r = (s.q_len - rep + i) / bs;
        let row = &m[i * nkb..(i + 1) * nkb];
        total += rows[r].iter().map(|&c| row[c as usize] as f64).sum::<f64>() as f32 as f64;
    }
    (total / rep as f64) as f32
}
