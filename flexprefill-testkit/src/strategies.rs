//! proptest strategies: shapes, sequence layouts, workloads, block indices and configs.
//!
//! Strategies produce small *descriptions* ([`CaseSpec`], [`IndexBits`]) rather than tensors:
//! they print in one line when a property fails, they shrink structurally (fewer sequences,
//! shorter ones, smaller GQA ratio, narrower heads, index bits cleared), and the tensors are
//! rebuilt from them deterministically ([`CaseSpec::build`]).
//!
//! Sizes are chosen so a property runs in milliseconds per case: at most 3 sequences of at most
//! ~5 blocks (block 16, 32, 64, rarely 128), at most 16 query heads and `num_heads · head_dim ≤
//! 1024`. Every awkward case the brief names is reachable: batch 1–3, ragged packed batches,
//! GQA ratios 1/2/4/8, lengths that are and are not multiples of the block, a sequence shorter
//! than one block, chunks with `q_len < kv_len`, `head_dim` from 16 to 256.

use flexprefill_core::{
    AttentionShape, BlockIndex, DType, FlexPrefillConfig, ForcedBlocks, QueryAwareCut,
    SelectionMode, Sequence,
};
use proptest::prelude::*;
use proptest::sample::select;

use crate::owned::OwnedInput;
use crate::workload::{generate, WorkloadKind, WorkloadSpec, MIN_PLANTED_HEAD_DIM};

/// One generated test case: everything needed to rebuild its input.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSpec {
    /// Heads and width.
    pub shape: AttentionShape,
    /// Block size the case is meant for (indices, configs).
    pub block_size: usize,
    /// `(q_len, kv_len)` per sequence; `q_len < kv_len` is a chunk (the last `q_len` queries).
    pub lens: Vec<(usize, usize)>,
    /// Planted structure of every sequence (`Random` below `MIN_PLANTED_HEAD_DIM`).
    pub kind: WorkloadKind,
    /// dtype the tensors are rounded to.
    pub dtype: DType,
    /// Data seed.
    pub seed: u64,
}

impl CaseSpec {
    /// The sequences as core lays them out (packed, in order).
    pub fn seqs(&self) -> Vec<Sequence> {
        let (mut qs, mut ks) = (0, 0);
        self.lens
            .iter()
            .map(|&(q_len, kv_len)| {
                let s = Sequence {
                    q_start: qs,
                    k_start: ks,
                    q_len,
                    kv_len,
                };
                qs += q_len;
                ks += kv_len;
                s
            })
            .collect()
    }

    /// Builds the tensors: sequence `i` is workload `kind` of `kv_len` tokens with seed
    /// `seed + i`, keeping its last `q_len` queries; rounded to `dtype`.
    pub fn build(&self) -> OwnedInput {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = self.shape;
        let kind = if head_dim < MIN_PLANTED_HEAD_DIM {
            WorkloadKind::Random
        } else {
            self.kind
        };
        let qw = num_heads * head_dim;
        let parts: Vec<_> = self
            .lens
            .iter()
            .enumerate()
            .map(|(i, &(q_len, kv_len))| {
                let w = generate(&WorkloadSpec {
                    kind,
                    batch: 1,
                    seq_len: kv_len,
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    seed: self.seed.wrapping_add(i as u64),
                });
                (w.q[(kv_len - q_len) * qw..].to_vec(), w.k, w.v)
            })
            .collect();
        OwnedInput::pack_f32(self.shape, &parts).to_dtype(self.dtype)
    }

    /// Every sequence has `q_len == kv_len` (no chunk).
    pub fn is_full_prefill(&self) -> bool {
        self.lens.iter().all(|&(q, k)| q == k)
    }
}

/// Block sizes, small first (shrinks toward 16); 128 rarely, it makes cases long.
pub fn block_size() -> impl Strategy<Value = usize> {
    prop_oneof![6 => select(vec![16usize, 32, 64]), 1 => Just(128usize)]
}

/// Head widths from 16 to 256, awkward ones included (FA tests 59 and 111).
pub fn head_dim() -> impl Strategy<Value = usize> {
    select(vec![16usize, 17, 32, 48, 59, 64, 96, 111, 128, 192, 256])
}

/// GQA shapes: ratio 1, 2, 4 or 8, one or two kv heads, `num_heads · head_dim ≤ 1024`.
pub fn shape() -> impl Strategy<Value = AttentionShape> {
    (head_dim(), select(vec![1usize, 2, 4, 8]), 1usize..=2).prop_map(|(d, ratio, kv)| {
        // keep the case small: fewer kv heads first, then a smaller ratio
        let mut kv = kv;
        while kv > 1 && kv * ratio * d > 1024 {
            kv -= 1;
        }
        let mut ratio = ratio;
        while ratio > 1 && kv * ratio * d > 1024 {
            ratio /= 2;
        }
        AttentionShape::new(kv * ratio, kv, d).expect("ratio and kv ≥ 1, d in 16..=256")
    })
}

/// A sequence length for `block_size`: shorter than a block, a multiple of it (1–4 blocks), or
/// in between (1–4 blocks plus a partial one).
pub fn seq_len(block_size: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        1..block_size,
        (1usize..=4).prop_map(move |b| b * block_size),
        (1usize..=4, 1..block_size).prop_map(move |(b, r)| b * block_size + r),
    ]
}

/// `(q_len, kv_len)`: a full prefill (`q_len == kv_len`, shrinks to it) or a chunk of the last
/// `q_len` queries.
pub fn seq_lens(block_size: usize) -> impl Strategy<Value = (usize, usize)> {
    seq_len(block_size).prop_flat_map(
        |kv| prop_oneof![3 => Just((kv, kv)), 2 => (1..=kv).prop_map(move |q| (q, kv))],
    )
}

/// 1–3 sequences: a uniform batch (every sequence the first one's lengths) or a ragged one.
pub fn batch_lens(block_size: usize) -> impl Strategy<Value = Vec<(usize, usize)>> {
    (
        prop::collection::vec(seq_lens(block_size), 1..=3),
        any::<bool>(),
    )
        .prop_map(|(mut lens, uniform)| {
            if uniform {
                let first = lens[0];
                lens.iter_mut().for_each(|l| *l = first);
            }
            lens
        })
}

/// Workload kinds, plain random first (shrinks toward it).
pub fn workload_kind() -> impl Strategy<Value = WorkloadKind> {
    select(vec![
        WorkloadKind::Random,
        WorkloadKind::SinkLocal,
        WorkloadKind::Stripes,
        WorkloadKind::Topics,
        WorkloadKind::Needle,
        WorkloadKind::Mixed,
    ])
}

/// A small uniform-batch workload spec (batch 1–3, 1–600 tokens, GQA 1/2/4/8, d 16–128):
/// for properties of the generator itself, or of code that takes a [`WorkloadSpec`].
pub fn workload_spec() -> impl Strategy<Value = WorkloadSpec> {
    (
        workload_kind(),
        1usize..=3,
        1usize..=600,
        shape(),
        any::<u64>(),
    )
        .prop_map(|(kind, batch, seq_len, shape, seed)| WorkloadSpec {
            kind,
            batch,
            seq_len,
            num_heads: shape.num_heads,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim.min(128),
            seed,
        })
}

/// A case in f32 with any layout.
pub fn case() -> impl Strategy<Value = CaseSpec> {
    case_in(Just(DType::F32))
}

/// A case whose dtype comes from `dtype`.
pub fn case_in(dtype: impl Strategy<Value = DType>) -> impl Strategy<Value = CaseSpec> {
    (block_size(), shape(), workload_kind(), dtype, any::<u64>()).prop_flat_map(
        |(bs, shape, kind, dtype, seed)| {
            batch_lens(bs).prop_map(move |lens| CaseSpec {
                shape,
                block_size: bs,
                lens,
                kind,
                dtype,
                seed,
            })
        },
    )
}

/// A case where every sequence is a full prefill (`q_len == kv_len`).
pub fn full_prefill_case() -> impl Strategy<Value = CaseSpec> {
    case().prop_map(|mut c| {
        c.lens.iter_mut().for_each(|l| l.0 = l.1);
        c
    })
}

/// Any dtype, f32 first.
pub fn dtype() -> impl Strategy<Value = DType> {
    select(vec![DType::F32, DType::BF16, DType::F16])
}

/// A random block selection over every causal block of a case: bit `i` keeps the `i`-th
/// causal block (order: sequence, head, query block, key block). Forced blocks are added on
/// [`IndexBits::build`], so clearing bits (what shrinking does) still gives a valid index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexBits {
    /// One bit per causal block.
    pub bits: Vec<bool>,
    /// Add the sink block and the diagonal block(s) of every row.
    pub forced: ForcedBlocks,
}

impl IndexBits {
    /// The index: kept blocks plus the forced ones. A row left empty (forced blocks off and no
    /// bit set) gets its diagonal block(s), so the index is valid and every query sees a key.
    pub fn build(&self, seqs: &[Sequence], num_heads: usize, block_size: usize) -> BlockIndex {
        let mut it = self.bits.iter();
        let mut heads = Vec::new();
        for s in seqs {
            for _ in 0..num_heads {
                let rows: Vec<Vec<u32>> = (0..s.num_query_blocks(block_size))
                    .map(|r| {
                        let mut row: Vec<u32> = (0..s.causal_key_blocks(r, block_size) as u32)
                            .filter(|_| *it.next().unwrap_or(&false))
                            .collect();
                        let diag = s.diagonal_key_blocks(r, block_size);
                        if self.forced.sink {
                            row.push(0);
                        }
                        if self.forced.diagonal {
                            row.extend(diag.clone().map(|c| c as u32));
                        }
                        if row.is_empty() {
                            row.extend(diag.map(|c| c as u32));
                        }
                        row
                    })
                    .collect();
                heads.push(rows);
            }
        }
        BlockIndex::from_rows(seqs, num_heads, block_size, heads)
            .expect("rows built for exactly these sequences and heads")
    }
}

/// Causal blocks over every sequence and head.
pub fn causal_block_count(seqs: &[Sequence], num_heads: usize, block_size: usize) -> usize {
    seqs.iter()
        .map(|s| s.total_causal_blocks(block_size))
        .sum::<usize>()
        * num_heads
}

/// Random bits for `count` causal blocks, each kept with a probability drawn per case (so both
/// sparse and nearly dense selections appear); forced blocks on.
pub fn index_bits(count: usize) -> impl Strategy<Value = IndexBits> {
    (0.0f64..=1.0)
        .prop_flat_map(move |p| prop::collection::vec(prop::bool::weighted(p), count))
        .prop_map(|bits| IndexBits {
            bits,
            forced: ForcedBlocks::default(),
        })
}

/// A case together with a random valid index for it (forced sink and diagonal present).
pub fn case_with_index() -> impl Strategy<Value = (CaseSpec, IndexBits)> {
    case().prop_flat_map(|c| {
        let n = causal_block_count(&c.seqs(), c.shape.num_heads, c.block_size);
        (Just(c), index_bits(n))
    })
}

/// A FlexPrefill config for `block_size`: gamma in [0.5, 1], tau from never to always
/// query-aware, small budgets so short test sequences are not all dense, both cuts, both modes.
pub fn config(block_size: usize) -> impl Strategy<Value = FlexPrefillConfig> {
    (
        select(vec![0.9f32, 0.5, 0.7, 0.8, 0.95, 0.99, 1.0]),
        select(vec![0.1f32, 0.0, 0.3, 1.0]),
        select(vec![0usize, 1, 2, 8]),
        prop::option::weighted(0.2, 1usize..=4),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            move |(gamma, tau, min_blocks, max_blocks, per_row, original)| {
                FlexPrefillConfig::default()
                    .with_gamma(gamma)
                    .with_tau(tau)
                    .with_block_size(block_size)
                    .with_min_budget(min_blocks * block_size)
                    .with_max_budget(max_blocks.map(|b| b * block_size))
                    .with_query_aware_cut(if per_row {
                        QueryAwareCut::PerQueryBlock
                    } else {
                        QueryAwareCut::Flattened
                    })
                    .with_forced(ForcedBlocks::default())
                    .with_selection(if original {
                        SelectionMode::Original
                    } else {
                        SelectionMode::Faithful
                    })
            },
        )
}

/// A faithful-mode config without `max_budget` (the setting where gamma is a promise).
pub fn faithful_config(block_size: usize) -> impl Strategy<Value = FlexPrefillConfig> {
    config(block_size).prop_map(|c| {
        c.with_selection(SelectionMode::Faithful)
            .with_max_budget(None)
    })
}

/// A case and a config for its block size.
pub fn case_with_config() -> impl Strategy<Value = (CaseSpec, FlexPrefillConfig)> {
    case().prop_flat_map(|c| {
        let bs = c.block_size;
        (Just(c), config(bs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn generated_cases_are_valid_inputs_and_indices() {
        let mut runner = TestRunner::deterministic();
        for _ in 0..64 {
            let (c, bits) = case_with_index().new_tree(&mut runner).unwrap().current();
            let x = c.build();
            x.input().unwrap();
            assert!(c.shape.num_heads * c.shape.head_dim <= 1024);
            let idx = bits.build(&c.seqs(), c.shape.num_heads, c.block_size);
            idx.validate(ForcedBlocks::default()).unwrap();
            let cfg = config(c.block_size)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn every_awkward_layout_is_reachable() {
        let mut runner = TestRunner::deterministic();
        let (mut short, mut multiple, mut partial, mut chunk, mut ragged, mut gqa8, mut d256) =
            (false, false, false, false, false, false, false);
        for _ in 0..2000 {
            let c = case().new_tree(&mut runner).unwrap().current();
            let bs = c.block_size;
            for &(q, k) in &c.lens {
                short |= k < bs;
                multiple |= k % bs == 0;
                partial |= k > bs && k % bs != 0;
                chunk |= q < k;
            }
            ragged |= c.lens.windows(2).any(|w| w[0] != w[1]);
            gqa8 |= c.shape.group_size() == 8;
            d256 |= c.shape.head_dim == 256;
        }
        assert!(short && multiple && partial && chunk && ragged && gqa8 && d256);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// The generator never fails or emits a non-finite value on a valid spec, and its
        /// recorded plan is consistent with the tensors' shape.
        #[test]
        fn workloads_generate_finite_valid_inputs(spec in workload_spec()) {
            let w = crate::workload::try_generate(&spec)?;
            prop_assert!(w.q.iter().chain(&w.k).chain(&w.v).all(|v| v.is_finite()));
            w.input().validate()?;
            prop_assert_eq!(w.plan.head_kinds.len(), spec.num_heads);
            if let Some(p) = w.needle_position {
                prop_assert!(p < spec.seq_len);
            }
        }
    }

    #[test]
    fn cleared_bits_keep_only_forced_blocks() {
        let s = Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 50,
            kv_len: 70,
        };
        let n = causal_block_count(&[s], 2, 16);
        let none = IndexBits {
            bits: vec![false; n],
            forced: ForcedBlocks::default(),
        };
        let idx = none.build(&[s], 2, 16);
        idx.validate(ForcedBlocks::default()).unwrap();
        // query block 0 holds positions 20..36: sink 0, diagonal 1..=2
        assert_eq!(idx.row(0, 1, 0), &[0, 1, 2]);
        let all = IndexBits {
            bits: vec![true; n],
            forced: ForcedBlocks::default(),
        };
        assert_eq!(
            all.build(&[s], 2, 16),
            BlockIndex::dense(&[s], 2, 16).unwrap()
        );
    }
}
