//! The properties have teeth: each one rejects a backend with a planted bug of the kind it is
//! meant to catch (a mutation test of the test suite), while the real CPU backend passes.

use flexprefill_core::{
    AttentionInput, AttentionOutput, AttentionShape, Backend, BlockIndex, DType, FlexPrefillConfig,
    HeadStatistics, HostTensor, Result, SparsityReport,
};
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::properties as p;
use flexprefill_testkit::strategies::{causal_block_count, CaseSpec, IndexBits};
use flexprefill_testkit::workload::WorkloadKind;
use flexprefill_testkit::OwnedInput;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bug {
    None,
    /// sparse_attention skips the last listed block of every row
    DropLastBlock,
    /// attention reads key j+1 in place of key j (a future leak)
    LeakFuture,
    /// select_index drops the sink column
    NoSink,
    /// select_index keeps only sink and diagonal
    OnlyForced,
    /// LSE off by 0.01
    LseOffset,
    /// the second sequence of a batch is scaled by 1.001
    BatchSkew,
    /// one output element is never written (NaN)
    Unwritten,
    /// a fused `flex_prefill` that computes every causal block instead of the selected ones
    FusedDense,
}

struct Mutant {
    cpu: CpuBackend,
    bug: Bug,
}

impl Mutant {
    fn new(bug: Bug) -> Self {
        Self {
            cpu: CpuBackend::new(),
            bug,
        }
    }

    /// Shifts k and v one position left inside every sequence (key j reads key j+1).
    fn leak(x: &AttentionInput<'_>) -> (Vec<f32>, Vec<f32>) {
        let (mut k, mut v) = (x.k.to_f32_vec(), x.v.to_f32_vec());
        let w = x.shape.num_kv_heads * x.shape.head_dim;
        for s in &x.seqs {
            for j in 0..s.kv_len - 1 {
                let (a, b) = ((s.k_start + j) * w, (s.k_start + j + 1) * w);
                k.copy_within(b..b + w, a);
                v.copy_within(b..b + w, a);
            }
        }
        (k, v)
    }

    fn post(&self, x: &AttentionInput<'_>, mut o: AttentionOutput) -> AttentionOutput {
        match self.bug {
            Bug::LseOffset => {
                if let Some(l) = o.lse.as_mut() {
                    l.iter_mut().for_each(|v| *v += 0.01);
                }
            }
            Bug::BatchSkew if x.seqs.len() > 1 => {
                let rw = x.shape.num_heads * x.shape.head_dim;
                let s = x.seqs[1];
                let mut out = o.out.to_f32_vec();
                out[s.q_start * rw..(s.q_start + s.q_len) * rw]
                    .iter_mut()
                    .for_each(|v| *v *= 1.001);
                o.out = HostTensor::from_f32(out, o.out.dtype());
            }
            Bug::Unwritten => {
                let mut out = o.out.to_f32_vec();
                let last = out.len() - 1;
                out[last] = f32::NAN;
                o.out = HostTensor::from_f32(out, o.out.dtype());
            }
            _ => {}
        }
        o
    }

    fn map_rows(
        index: &BlockIndex,
        f: impl Fn(usize, &[u32], &flexprefill_core::Sequence) -> Vec<u32>,
    ) -> BlockIndex {
        let bs = index.block_size();
        let heads = index
            .seqs()
            .iter()
            .enumerate()
            .flat_map(|(si, s)| {
                let f = &f;
                (0..index.num_heads()).map(move |h| {
                    (0..s.num_query_blocks(bs))
                        .map(|r| f(r, index.row(si, h, r), s))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        BlockIndex::from_rows(index.seqs(), index.num_heads(), bs, heads).unwrap()
    }
}

impl Backend for Mutant {
    fn name(&self) -> &'static str {
        "mutant"
    }

    fn dense_attention(&self, x: &AttentionInput<'_>) -> Result<AttentionOutput> {
        let o = if self.bug == Bug::LeakFuture {
            let (k, v) = Self::leak(x);
            let y =
                AttentionInput::from_parts(x.q, (&k).into(), (&v).into(), x.shape, x.seqs.clone())
                    .map(|y| y.with_lse(x.return_lse));
            match x.dtype() {
                DType::F32 => self.cpu.dense_attention(&y?)?,
                _ => unreachable!("the leak mutant is used with f32 inputs"),
            }
        } else {
            self.cpu.dense_attention(x)?
        };
        Ok(self.post(x, o))
    }

    fn sparse_attention(
        &self,
        x: &AttentionInput<'_>,
        index: &BlockIndex,
    ) -> Result<AttentionOutput> {
        let o = match self.bug {
            Bug::DropLastBlock => {
                let idx = Self::map_rows(index, |_, row, _| {
                    if row.len() > 1 {
                        row[..row.len() - 1].to_vec()
                    } else {
                        row.to_vec()
                    }
                });
                self.cpu.sparse_attention(x, &idx)?
            }
            Bug::LeakFuture => {
                let (k, v) = Self::leak(x);
                let y = AttentionInput::from_parts(
                    x.q,
                    (&k).into(),
                    (&v).into(),
                    x.shape,
                    x.seqs.clone(),
                )?
                .with_lse(x.return_lse);
                self.cpu.sparse_attention(&y, index)?
            }
            _ => self.cpu.sparse_attention(x, index)?,
        };
        Ok(self.post(x, o))
    }

    fn head_statistics(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<Vec<HeadStatistics>> {
        self.cpu.head_statistics(x, cfg)
    }

    fn select_index(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<(BlockIndex, SparsityReport)> {
        let (index, mut report) = self.cpu.select_index(x, cfg)?;
        let bs = cfg.block_size;
        let index = match self.bug {
            Bug::NoSink => Self::map_rows(&index, |_, row, _| {
                if row.len() > 1 {
                    row.iter().copied().filter(|&c| c != 0).collect()
                } else {
                    row.to_vec()
                }
            }),
            Bug::OnlyForced => Self::map_rows(&index, |r, _, s| {
                let mut v = vec![0u32];
                v.extend(s.diagonal_key_blocks(r, bs).map(|c| c as u32));
                v
            }),
            _ => index,
        };
        for h in &mut report.heads {
            h.selected_blocks = index.selected_blocks(h.seq, h.head);
        }
        Ok((index, report))
    }

    fn flex_prefill(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<(AttentionOutput, SparsityReport)> {
        let (index, report) = self.select_index(x, cfg)?;
        let out = if self.bug == Bug::FusedDense {
            self.dense_attention(x)?
        } else {
            self.sparse_attention(x, &index)?
        };
        Ok((out, report))
    }
}

fn case() -> (OwnedInput, BlockIndex, usize) {
    let c = CaseSpec {
        shape: AttentionShape::new(4, 2, 32).unwrap(),
        block_size: 16,
        lens: vec![(70, 70), (50, 90)],
        kind: WorkloadKind::Mixed,
        dtype: DType::F32,
        seed: 1,
    };
    let x = c.build();
    let n = causal_block_count(&x.seqs, 4, 16);
    let bits = IndexBits {
        bits: (0..n).map(|i| i % 3 != 0).collect(),
        forced: Default::default(),
    };
    let index = bits.build(&x.seqs, 4, 16);
    (x, index, 16)
}

fn cfg() -> FlexPrefillConfig {
    FlexPrefillConfig::default()
        .with_block_size(16)
        .with_min_budget(0)
        .with_gamma(0.8)
}

/// Runs every property on `b`; returns the names of those that failed.
fn failing(b: &dyn Backend) -> Vec<&'static str> {
    let (x, index, bs) = case();
    let xl = x.clone().with_lse(true);
    let (xa, xla) = (x.input().unwrap(), xl.input().unwrap());
    let cfg = cfg();
    let mut bad = Vec::new();
    let mut note = |r: p::PropResult| {
        if let Err(v) = r {
            bad.push(v.property);
        }
    };
    note(p::dense_equals_oracle(b, &xla));
    note(p::dense_index_equals_oracle(b, &xla, bs));
    note(p::sparse_equals_masked_oracle(b, &xla, &index));
    note(p::appendix_a_bound(b, &xa, &index));
    note(p::causality(b, &x, &index, 0, 40, 9));
    note(p::ragged_equals_one_by_one(b, &x, &cfg));
    note(p::lse_merge_equals_unchunked(b, &x, 0, 50, 2, bs));
    note(p::forced_blocks_present(b, &xa, &cfg));
    note(p::representative_mass_at_least_gamma(b, &xa, &cfg));
    note(p::output_rows_finite(b, &xla, &cfg));
    note(p::flex_prefill_is_select_then_sparse(b, &xla, &cfg));
    bad
}

#[test]
fn the_cpu_backend_passes_every_property() {
    assert_eq!(failing(&CpuBackend::new()), Vec::<&str>::new());
    assert_eq!(failing(&Mutant::new(Bug::None)), Vec::<&str>::new());
}

#[test]
fn each_planted_bug_is_caught() {
    for (bug, must_catch) in [
        (
            Bug::DropLastBlock,
            &[
                "dense_index_equals_oracle",
                "sparse_equals_masked_oracle",
                "appendix_a_bound",
            ][..],
        ),
        (Bug::LeakFuture, &["dense_equals_oracle", "causality"][..]),
        (Bug::NoSink, &["forced_blocks_present"][..]),
        (Bug::OnlyForced, &["representative_mass_at_least_gamma"][..]),
        (
            Bug::LseOffset,
            &["dense_equals_oracle", "lse_merge_equals_unchunked"][..],
        ),
        (Bug::BatchSkew, &["ragged_equals_one_by_one"][..]),
        (
            Bug::Unwritten,
            &["dense_equals_oracle", "output_rows_finite"][..],
        ),
        (Bug::FusedDense, &["flex_prefill_is_select_then_sparse"][..]),
    ] {
        let bad = failing(&Mutant::new(bug));
        for name in must_catch {
            assert!(
                bad.contains(name),
                "{bug:?} not caught by {name}; failing: {bad:?}"
            );
        }
    }
}
