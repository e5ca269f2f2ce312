//! [`OwnedInput`]: an [`AttentionInput`] that owns its tensors.
//!
//! Core's input borrows q/k/v, which is what a backend wants. Tests, strategies and the harness
//! need to build inputs (in any dtype, chunked, ragged), keep them, mutate them and re-borrow
//! them: this is the owning twin.

use flexprefill_core::{
    AttentionInput, AttentionShape, DType, HostTensor, Result as CoreResult, Sequence,
};

/// q/k/v and their layout, owned. `input()` borrows it as core's [`AttentionInput`].
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedInput {
    /// Queries `[total_q, num_heads, head_dim]`.
    pub q: HostTensor,
    /// Keys `[total_k, num_kv_heads, head_dim]`.
    pub k: HostTensor,
    /// Values `[total_k, num_kv_heads, head_dim]`.
    pub v: HostTensor,
    /// Head counts and width.
    pub shape: AttentionShape,
    /// Packed sequences (see [`Sequence`]).
    pub seqs: Vec<Sequence>,
    /// `None`: `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Ask backends for the log-sum-exp.
    pub return_lse: bool,
}

impl OwnedInput {
    /// Packs per-sequence f32 tensors (each `[len, heads, dim]`) into one ragged input.
    /// `parts[i] = (q_i, k_i, v_i)`; sequence `i` has `q_i.len() / (H·D)` queries and
    /// `k_i.len() / (Hkv·D)` keys.
    pub fn pack_f32(shape: AttentionShape, parts: &[(Vec<f32>, Vec<f32>, Vec<f32>)]) -> Self {
        let (qw, kw) = (
            shape.num_heads * shape.head_dim,
            shape.num_kv_heads * shape.head_dim,
        );
        let (mut q, mut k, mut v, mut seqs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (pq, pk, pv) in parts {
            seqs.push(Sequence {
                q_start: q.len() / qw,
                k_start: k.len() / kw,
                q_len: pq.len() / qw,
                kv_len: pk.len() / kw,
            });
            q.extend_from_slice(pq);
            k.extend_from_slice(pk);
            v.extend_from_slice(pv);
        }
        Self {
            q: HostTensor::F32(q),
            k: HostTensor::F32(k),
            v: HostTensor::F32(v),
            shape,
            seqs,
            softmax_scale: None,
            return_lse: false,
        }
    }

    /// Borrows it as core's input; runs every check of [`AttentionInput::from_parts`].
    pub fn input(&self) -> CoreResult<AttentionInput<'_>> {
        let mut x = AttentionInput::from_parts(
            self.q.as_ref(),
            self.k.as_ref(),
            self.v.as_ref(),
            self.shape,
            self.seqs.clone(),
        )?
        .with_lse(self.return_lse);
        if let Some(s) = self.softmax_scale {
            x = x.with_softmax_scale(s)?;
        }
        Ok(x)
    }

    /// dtype of q (and k, v).
    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }

    /// The same values rounded to `dtype` (round to nearest even, as `half` does).
    pub fn to_dtype(&self, dtype: DType) -> Self {
        let conv = |t: &HostTensor| {
            if t.dtype() == dtype {
                t.clone()
            } else {
                HostTensor::from_f32(t.to_f32_vec(), dtype)
            }
        };
        Self {
            q: conv(&self.q),
            k: conv(&self.k),
            v: conv(&self.v),
            ..self.clone()
        }
    }

    /// Asks for the LSE output.
    pub fn with_lse(mut self, return_lse: bool) -> Self {
        self.return_lse = return_lse;
        self
    }

    /// Query tokens over all sequences.
    pub fn total_q(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.q_start + s.q_len)
    }

    /// Key tokens over all sequences.
    pub fn total_k(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.k_start + s.kv_len)
    }

    /// Sequence `i` alone, as a one-sequence input (same dtype, scale and LSE flag).
    pub fn sequence(&self, i: usize) -> Self {
        let s = self.seqs[i];
        let (qw, kw) = (
            self.shape.num_heads * self.shape.head_dim,
            self.shape.num_kv_heads * self.shape.head_dim,
        );
        Self {
            q: slice(&self.q, s.q_start * qw, s.q_len * qw),
            k: slice(&self.k, s.k_start * kw, s.kv_len * kw),
            v: slice(&self.v, s.k_start * kw, s.kv_len * kw),
            seqs: vec![Sequence {
                q_start: 0,
                k_start: 0,
                ..s
            }],
            ..self.clone()
        }
    }

    /// The chunk of every sequence whose queries are positions `q_from..q_to` of that sequence
    /// (absolute positions, `q_from < q_to ≤ kv_len`), over keys `0..q_to`: the input a chunked
    /// prefill would see for that chunk. Uses the `q_len == kv_len` layout of `self` (each
    /// sequence holds all its queries); `None` when some sequence has `q_len < kv_len` or the
    /// range is empty or out of bounds.
    pub fn chunk(&self, q_from: usize, q_to: usize) -> Option<Self> {
        let (qw, kw) = (
            self.shape.num_heads * self.shape.head_dim,
            self.shape.num_kv_heads * self.shape.head_dim,
        );
        let mut parts_q = Vec::new();
        let mut parts_kv = Vec::new();
        let mut seqs = Vec::new();
        let (mut qs, mut ks) = (0, 0);
        for s in &self.seqs {
            if s.q_len != s.kv_len || q_from >= q_to || q_to > s.kv_len {
                return None;
            }
            parts_q.push(((s.q_start + q_from) * qw, (q_to - q_from) * qw));
            parts_kv.push((s.k_start * kw, q_to * kw));
            seqs.push(Sequence {
                q_start: qs,
                k_start: ks,
                q_len: q_to - q_from,
                kv_len: q_to,
            });
            qs += q_to - q_from;
            ks += q_to;
        }
        Some(Self {
            q: gather(&self.q, &parts_q),
            k: gather(&self.k, &parts_kv),
            v: gather(&self.v, &parts_kv),
            seqs,
            ..self.clone()
        })
    }
}

/// Elements `start..start+len` of `t`, same dtype.
pub(crate) fn slice(t: &HostTensor, start: usize, len: usize) -> HostTensor {
    gather(t, &[(start, len)])
}

/// Concatenation of the `(start, len)` ranges of `t`, same dtype.
pub(crate) fn gather(t: &HostTensor, ranges: &[(usize, usize)]) -> HostTensor {
    fn g<T: Copy>(x: &[T], ranges: &[(usize, usize)]) -> Vec<T> {
        let mut out = Vec::with_capacity(ranges.iter().map(|r| r.1).sum());
        for &(s, l) in ranges {
            out.extend_from_slice(&x[s..s + l]);
        }
        out
    }
    match t {
        HostTensor::F32(x) => HostTensor::F32(g(x, ranges)),
        HostTensor::F16(x) => HostTensor::F16(g(x, ranges)),
        HostTensor::BF16(x) => HostTensor::BF16(g(x, ranges)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_sequence_and_chunk_round_trip() {
        let shape = AttentionShape::new(2, 1, 4).unwrap();
        let mk = |n: usize, w: usize, base: f32| -> Vec<f32> {
            (0..n * w).map(|i| base + i as f32).collect()
        };
        let x = OwnedInput::pack_f32(
            shape,
            &[
                (mk(3, 8, 0.0), mk(3, 4, 100.0), mk(3, 4, 200.0)),
                (mk(5, 8, 1000.0), mk(5, 4, 1100.0), mk(5, 4, 1200.0)),
            ],
        );
        x.input().unwrap();
        assert_eq!(x.seqs[1].q_start, 3);
        assert_eq!(x.sequence(1).q.to_f32_vec(), mk(5, 8, 1000.0));
        let c = x.chunk(1, 3).unwrap();
        c.input().unwrap();
        assert_eq!(c.seqs[1].q_len, 2);
        assert_eq!(c.seqs[1].kv_len, 3);
        assert_eq!(c.q.to_f32_vec()[..8], mk(3, 8, 0.0)[8..16]);
        assert!(x.chunk(0, 4).is_none(), "sequence 0 has 3 tokens");
        let h = x.to_dtype(DType::BF16);
        assert_eq!(h.dtype(), DType::BF16);
        h.input().unwrap();
    }
}
