//! The sparse block index: which key blocks each query block computes.
//!
//! Stored CSR-style, the block-sparse format FlashInfer and others use, so a kernel consumes it
//! as is: one CSR row per (sequence, head, query block), rows ordered sequence-major, then head,
//! then query block. Row `i`'s key blocks are `col_indices[row_offsets[i]..row_offsets[i+1]]`,
//! sorted ascending and unique; `head_row_start[seq * num_heads + head]` is the first row of that
//! head.
//!
//! A worked example: one sequence of 4 blocks, one head, blocks (0,0), (1,1), (2,0), (3,1),
//! (3,2) (query block, key block):
//!
//! ```text
//!            key block 0 1 2 3
//! query block 0        x . . .      row_offsets  = [0, 1, 2, 3, 5]
//! query block 1        . x . .      col_indices  = [0, 1, 0, 1, 2]
//! query block 2        x . . .      head_row_start = [0, 4]
//! query block 3        . x x .
//! ```
//!
//! (This example is not causal-complete: it lacks diagonals, so `validate` with forced diagonal
//! blocks would reject it.) The original stores the same thing as flattened ids `r·nb + c`
//! (`[0, 5, 8, 13, 14]`), see [`BlockIndex::flat_ids`].

use crate::config::ForcedBlocks;
use crate::error::{Error, Result};
use crate::input::Sequence;

/// Selected key blocks for every (sequence, head, query block). See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    block_size: usize,
    num_heads: usize,
    seqs: Vec<Sequence>,
    head_row_start: Vec<u32>,
    row_offsets: Vec<u32>,
    col_indices: Vec<u32>,
}

impl BlockIndex {
    /// Builds from per-head row lists, given in (sequence, head) order: `heads[s * num_heads + h]`
    /// holds one list of key blocks per query block. Rows are sorted and deduplicated here.
    ///
    /// Sizes are checked, not trusted: a zero `block_size` or `num_heads`, a sequence with
    /// `q_len > kv_len`, a row count that does not match the query blocks, or a key block past
    /// the sequence's last key block is an [`Error`], never a panic. Causality and the forced
    /// blocks are [`validate`](Self::validate)'s job.
    pub fn from_rows(
        seqs: &[Sequence],
        num_heads: usize,
        block_size: usize,
        heads: Vec<Vec<Vec<u32>>>,
    ) -> Result<Self> {
        check_layout(seqs, num_heads, block_size)?;
        if heads.len() != seqs.len() * num_heads {
            return Err(Error::Index(format!(
                "{} head row lists for {} sequences × {} heads",
                heads.len(),
                seqs.len(),
                num_heads
            )));
        }
        let mut head_row_start = Vec::with_capacity(heads.len() + 1);
        let mut row_offsets = vec![0u32];
        let mut col_indices = Vec::new();
        head_row_start.push(0);
        for (i, rows) in heads.into_iter().enumerate() {
            let seq = &seqs[i / num_heads];
            let nqb = seq.num_query_blocks(block_size);
            if rows.len() != nqb {
                return Err(Error::Index(format!(
                    "sequence {} head {}: {} rows for {} query blocks",
                    i / num_heads,
                    i % num_heads,
                    rows.len(),
                    nqb
                )));
            }
            let nkb = seq.num_key_blocks(block_size);
            for (r, mut row) in rows.into_iter().enumerate() {
                row.sort_unstable();
                row.dedup();
                if let Some(&c) = row.last().filter(|&&c| c as usize >= nkb) {
                    return Err(Error::Index(format!(
                        "sequence {} head {} query block {r}: key block {c} is past the last key block ({})",
                        i / num_heads,
                        i % num_heads,
                        nkb - 1
                    )));
                }
                col_indices.extend_from_slice(&row);
                row_offsets.push(to_u32(col_indices.len())?);
            }
            head_row_start.push(to_u32(row_offsets.len() - 1)?);
        }
        Ok(Self {
            block_size,
            num_heads,
            seqs: seqs.to_vec(),
            head_row_start,
            row_offsets,
            col_indices,
        })
    }

    /// Every causal block of every head: with this index sparse attention is dense attention.
    ///
    /// Same size checks as [`from_rows`](Self::from_rows), plus: the block count must fit the
    /// index's `u32` offsets (checked before anything is allocated).
    pub fn dense(seqs: &[Sequence], num_heads: usize, block_size: usize) -> Result<Self> {
        check_layout(seqs, num_heads, block_size)?;
        let mut total = 0usize;
        for s in seqs {
            for r in 0..s.num_query_blocks(block_size) {
                total = (s.causal_key_blocks(r, block_size).checked_mul(num_heads))
                    .and_then(|n| total.checked_add(n))
                    .filter(|&t| t <= u32::MAX as usize)
                    .ok_or_else(|| {
                        Error::Index(format!(
                            "a dense index over these sequences and {num_heads} heads has more than {} blocks",
                            u32::MAX
                        ))
                    })?;
            }
        }
        let heads = seqs
            .iter()
            .flat_map(|s| {
                let rows: Vec<Vec<u32>> = (0..s.num_query_blocks(block_size))
                    .map(|r| (0..s.causal_key_blocks(r, block_size) as u32).collect())
                    .collect();
                std::iter::repeat_n(rows, num_heads)
            })
            .collect();
        Self::from_rows(seqs, num_heads, block_size, heads)
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Query heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }
    /// The sequences this index was built for.
    pub fn seqs(&self) -> &[Sequence] {
        &self.seqs
    }
    /// First CSR row of each (sequence, head), plus the total row count at the end.
    pub fn head_row_start(&self) -> &[u32] {
        &self.head_row_start
    }
    /// CSR row offsets into [`Self::col_indices`], one more than the number of rows.
    pub fn row_offsets(&self) -> &[u32] {
        &self.row_offsets
    }
    /// Key block numbers, row after row.
    pub fn col_indices(&self) -> &[u32] {
        &self.col_indices
    }
    /// Number of CSR rows (query blocks over all sequences and heads).
    pub fn num_rows(&self) -> usize {
        self.row_offsets.len() - 1
    }

    /// Key blocks of query block `r` of (`seq`, `head`).
    ///
    /// # Panics
    /// If `seq`, `head` or `r` is out of range, as slice indexing does.
    pub fn row(&self, seq: usize, head: usize, r: usize) -> &[u32] {
        let i = self.head_row_start[seq * self.num_heads + head] as usize + r;
        &self.col_indices[self.row_offsets[i] as usize..self.row_offsets[i + 1] as usize]
    }

    /// Selected blocks of (`seq`, `head`).
    pub fn selected_blocks(&self, seq: usize, head: usize) -> usize {
        let h = seq * self.num_heads + head;
        let (a, b) = (
            self.head_row_start[h] as usize,
            self.head_row_start[h + 1] as usize,
        );
        (self.row_offsets[b] - self.row_offsets[a]) as usize
    }

    /// Causal blocks of (`seq`, any head): the dense block count.
    pub fn causal_blocks(&self, seq: usize) -> usize {
        self.seqs[seq].total_causal_blocks(self.block_size)
    }

    /// Selected over causal blocks, over every sequence and head; 1 when there is no causal
    /// block at all (no sequence, or only empty ones), as [`crate::SparsityReport::density`].
    pub fn density(&self) -> f64 {
        let causal: usize = (0..self.seqs.len())
            .map(|s| self.causal_blocks(s))
            .sum::<usize>()
            * self.num_heads;
        if causal == 0 {
            1.0
        } else {
            self.col_indices.len() as f64 / causal as f64
        }
    }

    /// Block mask of (`seq`, `head`), `[num_query_blocks, num_key_blocks]` row-major. Tests
    /// expand it to tokens and run masked dense attention: an oracle independent of the
    /// sparse kernels.
    pub fn to_dense_mask(&self, seq: usize, head: usize) -> Vec<bool> {
        let s = &self.seqs[seq];
        let (nqb, nkb) = (
            s.num_query_blocks(self.block_size),
            s.num_key_blocks(self.block_size),
        );
        let mut mask = vec![false; nqb * nkb];
        for r in 0..nqb {
            for &c in self.row(seq, head, r) {
                mask[r * nkb + c as usize] = true;
            }
        }
        mask
    }

    /// The original's flattened ids `r · nb + c` (sorted) of (`seq`, `head`), with `nb` the key
    /// block count; meaningful when `q_len == kv_len`, as in the original.
    pub fn flat_ids(&self, seq: usize, head: usize) -> Vec<u64> {
        let s = &self.seqs[seq];
        let (nqb, nkb) = (
            s.num_query_blocks(self.block_size),
            s.num_key_blocks(self.block_size),
        );
        (0..nqb)
            .flat_map(|r| {
                self.row(seq, head, r)
                    .iter()
                    .map(move |&c| (r * nkb) as u64 + c as u64)
            })
            .collect()
    }

    /// Checks every invariant a kernel relies on: offsets monotone, columns sorted, unique and
    /// causal, the forced blocks present, no empty row.
    pub fn validate(&self, forced: ForcedBlocks) -> Result<()> {
        let bs = self.block_size;
        if self.head_row_start.len() != self.seqs.len() * self.num_heads + 1 {
            return Err(Error::Index("head_row_start has the wrong length".into()));
        }
        if self.row_offsets.first() != Some(&0)
            || *self.row_offsets.last().unwrap_or(&0) as usize != self.col_indices.len()
            || self.row_offsets.windows(2).any(|w| w[1] < w[0])
        {
            return Err(Error::Index(
                "row_offsets are not monotone from 0 to the column count".into(),
            ));
        }
        for (si, s) in self.seqs.iter().enumerate() {
            for h in 0..self.num_heads {
                let hi = si * self.num_heads + h;
                let rows = (self.head_row_start[hi + 1] - self.head_row_start[hi]) as usize;
                if rows != s.num_query_blocks(bs) {
                    return Err(Error::Index(format!(
                        "sequence {si} head {h}: {rows} rows, expected {}",
                        s.num_query_blocks(bs)
                    )));
                }
                for r in 0..rows {
                    let row = self.row(si, h, r);
                    let causal = s.causal_key_blocks(r, bs) as u32;
                    let at = || format!("sequence {si} head {h} query block {r}");
                    if row.is_empty() {
                        return Err(Error::Index(format!("{}: empty row", at())));
                    }
                    if row.windows(2).any(|w| w[1] <= w[0]) {
                        return Err(Error::Index(format!(
                            "{}: columns not sorted and unique",
                            at()
                        )));
                    }
                    if let Some(&c) = row.last().filter(|&&c| c >= causal) {
                        return Err(Error::Index(format!(
                            "{}: key block {c} is above the causal limit {causal}",
                            at()
                        )));
                    }
                    if forced.sink && row[0] != 0 {
                        return Err(Error::Index(format!("{}: sink block 0 missing", at())));
                    }
                    if forced.diagonal {
                        for d in s.diagonal_key_blocks(r, bs) {
                            if row.binary_search(&(d as u32)).is_err() {
                                return Err(Error::Index(format!(
                                    "{}: diagonal block {d} missing",
                                    at()
                                )));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The sizes every constructor relies on: a zero block size would divide by zero, a zero head
/// count would make every density 0/0, `q_len > kv_len` would underflow the query offset, and a
/// sequence within one block of `usize::MAX` would overflow the block geometry.
fn check_layout(seqs: &[Sequence], num_heads: usize, block_size: usize) -> Result<()> {
    if block_size == 0 {
        return Err(Error::Index("block_size (0) must be at least 1".into()));
    }
    if num_heads == 0 {
        return Err(Error::Index("num_heads (0) must be at least 1".into()));
    }
    for (seq, s) in seqs.iter().enumerate() {
        if s.q_len > s.kv_len {
            return Err(Error::QueryLongerThanKeys {
                seq,
                q_len: s.q_len,
                kv_len: s.kv_len,
            });
        }
        if s.kv_len.checked_add(block_size).is_none() {
            return Err(Error::Index(format!(
                "sequence {seq}: kv_len ({}) is too large for block_size {block_size}",
                s.kv_len
            )));
        }
    }
    let rows = seqs
        .iter()
        .try_fold(0usize, |acc, s| {
            acc.checked_add(s.num_query_blocks(block_size).checked_mul(num_heads)?)
        })
        .filter(|&r| r < u32::MAX as usize);
    if rows.is_none() {
        return Err(Error::Index(format!(
            "the query block rows of these sequences × {num_heads} heads do not fit a u32 offset"
        )));
    }
    Ok(())
}

fn to_u32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Index(format!("{n} entries do not fit a u32 offset")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(len: usize) -> Vec<Sequence> {
        vec![Sequence::whole(len)]
    }

    #[test]
    fn worked_example_of_the_docs() {
        let rows = vec![vec![0], vec![1], vec![0], vec![2, 1]];
        let idx = BlockIndex::from_rows(&one(4 * 16), 1, 16, vec![rows]).unwrap();
        assert_eq!(idx.row_offsets(), &[0, 1, 2, 3, 5]);
        assert_eq!(idx.col_indices(), &[0, 1, 0, 1, 2]);
        assert_eq!(idx.flat_ids(0, 0), vec![0, 5, 8, 13, 14]);
        assert!(idx
            .validate(ForcedBlocks {
                sink: false,
                diagonal: false
            })
            .is_ok());
        assert!(idx.validate(ForcedBlocks::default()).is_err());
    }

    #[test]
    fn dense_index_is_valid_and_full() {
        let seqs = vec![
            Sequence {
                q_start: 0,
                k_start: 0,
                q_len: 300,
                kv_len: 300,
            },
            Sequence {
                q_start: 300,
                k_start: 300,
                q_len: 60,
                kv_len: 200,
            },
        ];
        let idx = BlockIndex::dense(&seqs, 3, 64).unwrap();
        idx.validate(ForcedBlocks::default()).unwrap();
        assert_eq!(idx.density(), 1.0);
        assert_eq!(idx.selected_blocks(0, 2), 1 + 2 + 3 + 4 + 5);
        // chunk: positions 140..200 → one query block straddling key blocks 2 and 3
        assert_eq!(idx.row(1, 0, 0), &[0, 1, 2, 3]);
        assert_eq!(idx.selected_blocks(1, 1), 4);
    }

    #[test]
    fn invalid_rows_are_rejected() {
        let non_causal = vec![vec![0, 1], vec![0, 1]];
        let idx = BlockIndex::from_rows(&one(32), 1, 16, vec![non_causal]).unwrap();
        assert!(matches!(
            idx.validate(ForcedBlocks::default()),
            Err(Error::Index(_))
        ));
        assert!(BlockIndex::from_rows(&one(32), 1, 16, vec![vec![vec![0]]]).is_err());
        assert!(BlockIndex::from_rows(&one(32), 2, 16, vec![vec![vec![0], vec![0, 1]]]).is_err());
    }

    #[test]
    fn bad_sizes_are_typed_errors_not_panics() {
        let is_index_err = |r: Result<BlockIndex>| matches!(r, Err(Error::Index(_)));
        assert!(is_index_err(BlockIndex::dense(&one(32), 1, 0)));
        assert!(is_index_err(BlockIndex::from_rows(
            &one(32),
            1,
            0,
            vec![vec![vec![0]]]
        )));
        assert!(is_index_err(BlockIndex::dense(&one(32), 0, 16)));
        // a key block past the sequence's last one (2 blocks: 0 and 1)
        assert!(is_index_err(BlockIndex::from_rows(
            &one(32),
            1,
            16,
            vec![vec![vec![0], vec![0, 7]]]
        )));
        let chunk_too_long = Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 40,
            kv_len: 20,
        };
        assert!(matches!(
            BlockIndex::dense(&[chunk_too_long], 1, 16),
            Err(Error::QueryLongerThanKeys { seq: 0, .. })
        ));
        assert!(is_index_err(BlockIndex::dense(
            &[Sequence::whole(usize::MAX - 3)],
            1,
            16
        )));
        // every block of 2^20 blocks × 4096 heads: more rows than a u32 offset can count
        assert!(is_index_err(BlockIndex::dense(
            &[Sequence::whole(1 << 24)],
            1 << 20,
            16
        )));
        // found by the attention_input fuzz target (issue 15): no causal block gave 0/0 = NaN
        for empty in [vec![], vec![Sequence::whole(0)]] {
            assert_eq!(BlockIndex::dense(&empty, 2, 16).unwrap().density(), 1.0);
        }
        // found by the attention_input fuzz target: one row's blocks × heads overflowed
        assert!(is_index_err(BlockIndex::dense(
            &[Sequence {
                q_start: 0,
                k_start: 0,
                q_len: 1,
                kv_len: usize::MAX / 2
            }],
            1 << 20,
            1
        )));
        // rows fit, blocks do not: checked before allocating
        assert!(is_index_err(BlockIndex::dense(
            &[Sequence::whole(1 << 24)],
            64,
            16
        )));
    }
}
