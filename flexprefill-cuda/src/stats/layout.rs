//! The host-side plan of the statistics buffers and launch geometry ([`StatsLayout`]).

use super::*;

pub(super) fn to_u32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| CudaError::Unsupported {
        op: "head_statistics",
        message: format!("{what} ({n}) does not fit u32"),
    })
}

impl StatsLayout {
    /// Plans the buffers for `seqs` (packed, as [`AttentionInput`] holds them).
    pub fn new(seqs: &[Sequence], shape: AttentionShape, block_size: usize) -> Result<Self> {
        let h = shape.num_heads;
        // Heads are a grid y / z dimension of every statistics launch.
        if h > 65535 {
            return Err(CudaError::Unsupported {
                op: "head_statistics",
                message: format!("{h} heads exceed the grid limit 65535"),
            });
        }
        let mut descs = Vec::with_capacity(seqs.len());
        let mut work = Vec::new();
        let (mut kb_seq, mut qb_seq) = (Vec::new(), Vec::new());
        let (mut tok, mut kb, mut qb, mut rep_off, mut split) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        let mut probe_off = 0usize;
        let mut qk = 0usize;
        let mut max_rep = 1;
        for (si, s) in seqs.iter().enumerate() {
            // The kernels index keys with i32 (masks in 32-bit arithmetic).
            if i32::try_from(s.kv_len).is_err() {
                return Err(CudaError::Unsupported {
                    op: "head_statistics",
                    message: format!("kv_len {} exceeds 2^31 - 1", s.kv_len),
                });
            }
            let rep = block_size.min(s.q_len);
            let nkb = s.num_key_blocks(block_size);
            let nqb = s.num_query_blocks(block_size);
            let nsplit = s.kv_len.div_ceil(SPLIT_KEYS);
            // Checked per sequence, so that a batch too long for the grid is refused before
            // its per-block tables are built.
            if split + nsplit > 65535 {
                return Err(CudaError::Unsupported {
                    op: "head_statistics",
                    message: format!("{} key splits exceed the grid limit 65535", split + nsplit),
                });
            }
            max_rep = max_rep.max(rep);
            descs.push(SeqDesc {
                q_start: to_u32(s.q_start, "q_start")?,
                k_start: to_u32(s.k_start, "k_start")?,
                q_len: to_u32(s.q_len, "q_len")?,
                kv_len: to_u32(s.kv_len, "kv_len")?,
                rep: rep as u32,
                nkb: to_u32(nkb, "key blocks")?,
                nqb: to_u32(nqb, "query blocks")?,
                tok_off: to_u32(tok, "token offset")?,
                kb_off: to_u32(kb, "key block offset")?,
                qb_off: to_u32(qb, "query block offset")?,
                rep_off: to_u32(rep_off, "representative offset")?,
                split_off: to_u32(split, "split offset")?,
                nsplit: to_u32(nsplit, "splits")?,
                probe_off: to_u32(probe_off, "probe offset")?,
                qk_off: to_u32(qk, "sampled block mass offset")?,
                pad: 0,
            });
            for sp in 0..nsplit {
                work.push(si as u32);
                work.push(sp as u32);
            }
            kb_seq.extend(std::iter::repeat_n(si as u32, nkb));
            qb_seq.extend(std::iter::repeat_n(si as u32, nqb));
            tok += s.kv_len;
            kb += nkb;
            qb += nqb;
            rep_off += rep * nkb;
            probe_off += flexprefill_core::selection::probe_queries(s, block_size).len() * nkb;
            qk += nqb * nkb;
            split += nsplit;
        }
        // Flat outputs are indexed with u32 offsets times H inside the kernels' size_t math;
        // keep every product addressable.
        to_u32(tok * h, "vertical length")?;
        to_u32(rep_off * h, "rep_block_mass length")?;
        to_u32(probe_off * h, "probe_block_mass length")?;
        let rp = max_rep.div_ceil(ROWS) * ROWS;
        Ok(Self {
            shape,
            block_size,
            seqs: seqs.to_vec(),
            descs,
            work,
            kb_seq,
            qb_seq,
            rp,
            sl_stride: SPLIT_KEYS + rp - 1,
            total_tok: tok,
            total_kb: kb,
            total_qb: qb,
            total_rep: rep_off,
            poison: false,
            probes: false,
            total_probe: probe_off,
            sampled: false,
            total_qk: qk,
        })
    }

    /// The layout the statistics of `cfg`'s selection mode need: probes for the faithful
    /// mode, the sampled estimate for the sampled mode.
    pub fn for_mode(
        seqs: &[Sequence],
        shape: AttentionShape,
        cfg: &flexprefill_core::FlexPrefillConfig,
    ) -> Result<Self> {
        Ok(Self::new(seqs, shape, cfg.block_size)?
            .with_probes(cfg.selection == SelectionMode::Faithful)
            .with_sampled(cfg.selection == SelectionMode::Sampled))
    }

    /// Also computes the sampled mode's estimate.
    pub fn with_sampled(mut self, sampled: bool) -> Self {
        self.sampled = sampled;
        self
    }

    /// Offset of (seq, head)'s sampled block masses (`nqb · nkb` floats).
    pub fn sampled_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.qk_off as usize * self.shape.num_heads + head * (d.nqb * d.nkb) as usize
    }

    /// Σ nqb · nkb over the sequences (per head): the sampled estimate's length per head.
    pub fn total_query_key_blocks(&self) -> usize {
        self.total_qk
    }

    /// Offset of (seq, head)'s vertical and slash lines (`kv_len` floats each).
    pub fn line_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.tok_off as usize * self.shape.num_heads + head * d.kv_len as usize
    }

    /// Offset of (seq, head)'s estimate (`nkb` floats).
    pub fn estimate_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.kb_off as usize * self.shape.num_heads + head * d.nkb as usize
    }

    /// Measures the probe queries too (faithful mode).
    pub fn with_probes(mut self, probes: bool) -> Self {
        self.probes = probes;
        self
    }

    /// Probe queries of `seq` (core's `probe_queries`).
    pub fn num_probes(&self, seq: usize) -> usize {
        flexprefill_core::selection::probe_queries(&self.seqs[seq], self.block_size).len()
    }

    /// Offset of (seq, head)'s probe block masses (`probes · nkb` floats).
    pub fn probe_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.probe_off as usize * self.shape.num_heads + head * self.num_probes(seq) * d.nkb as usize
    }

    /// Offset of (seq, head)'s representative block masses (`rep · nkb` floats).
    pub fn rep_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.rep_off as usize * self.shape.num_heads + head * (d.rep * d.nkb) as usize
    }

    /// Offset of (seq, kv_head)'s pooled keys (`nkb · D` floats).
    pub fn k_pooled_offset(&self, seq: usize, kv_head: usize) -> usize {
        let d = &self.descs[seq];
        (d.kb_off as usize * self.shape.num_kv_heads + kv_head * d.nkb as usize)
            * self.shape.head_dim
    }

    /// Offset of (seq, head)'s pooled queries (`nqb · D` floats).
    pub fn q_pooled_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        (d.qb_off as usize * self.shape.num_heads + head * d.nqb as usize) * self.shape.head_dim
    }

    /// Key blocks over all sequences.
    pub fn total_key_blocks(&self) -> usize {
        self.total_kb
    }

    /// Query blocks over all sequences.
    pub fn total_query_blocks(&self) -> usize {
        self.total_qb
    }

    /// Key blocks of the longest sequence (at least 1): the per-row extent a launch sizes
    /// its grid or scratch by.
    pub(super) fn max_key_blocks(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.num_key_blocks(self.block_size))
            .max()
            .unwrap_or(1)
    }

    /// Representative rows of `seq`.
    pub fn num_rep(&self, seq: usize) -> usize {
        self.descs[seq].rep as usize
    }

    /// Rows of the row-state buffers (`row_ml`, `lse2`) per (split or sequence, head): the
    /// padded representative rows, then the probe rows when they are measured.
    pub(super) fn row_stride(&self) -> usize {
        self.rp + if self.measures_probes() { PQ } else { 0 }
    }

    pub(super) fn measures_probes(&self) -> bool {
        self.probes && self.total_probe > 0
    }

    pub(super) fn pass_smem(&self, pass2: bool, path: PassPath) -> usize {
        let d = self.shape.head_dim;
        let probe_rows = if self.measures_probes() { PQ } else { 0 };
        // partial sets of pass 2 (per-tile cross-warp partials): 3 with the wgmma overlap
        let sets = if path == (PassPath::Wgmma { overlap: true }) {
            3
        } else {
            2
        };
        let mut bytes = if path.wgmma() {
            // swizzled Q̂ and swizzled key tiles (no row padding: a 3-stage ring in pass 1,
            // double-buffered in pass 2), aligned to 1024 bytes; the probe rows padded as in
            // the mma.sync passes
            let stages = if pass2 { 2 } else { WG_STAGES };
            WG_ALIGN + (self.rp + stages * KT) * d * 2 + probe_rows * (d + 8) * 2
        } else {
            // key tiles: a 3-stage ring in pass 1, double-buffered in pass 2
            let stages = if pass2 { 2 } else { 3 };
            (self.rp + probe_rows + stages * KT) * (d + 8) * 2
        };
        if pass2 {
            // per-warp strips, then the double-buffered per-group column / diagonal partials,
            // the slash accumulator, the double-buffered probe partials, the probe block masses
            let blocks_per_split = SPLIT_KEYS / self.block_size;
            let groups = self.rp / ROWS;
            bytes += (NWARPS * 16 * PP
                + sets * groups * NWARPS * KT
                + sets * groups * NWARPS * DPITCH
                + self.sl_stride
                + sets * NWARPS * PQ
                + PQ * blocks_per_split)
                * 4;
        } else {
            bytes += NWARPS * PQ * 8;
        }
        bytes
    }
}
