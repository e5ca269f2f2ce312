//! What a backend is asked to compute: q/k/v on the host, their shapes and the sequence layout.
//!
//! Layout is token-major, `[tokens, heads, head_dim]`, the layout of flash-attn and of the
//! original. A uniform batch `[batch, seq, heads, head_dim]` is the same memory as a packed one
//! with `cu_seqlens = [0, seq, 2·seq, ...]`, so backends only ever see packed sequences.
//!
//! Chunked prefill: a sequence may have fewer queries than keys (`q_len ≤ kv_len`). Its queries
//! are the *last* `q_len` positions, so the causal mask is aligned to the bottom right, as in
//! flash-attn: query `i` (0-based inside the chunk) sees keys `0..=kv_len - q_len + i`.

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// Head counts and width, shared by every sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    /// Width of q, k and v rows.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Builds and checks a shape.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        let s = Self {
            num_heads,
            num_kv_heads,
            head_dim,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks head counts and width.
    pub fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || self.head_dim > 256 {
            return Err(Error::HeadDim(self.head_dim));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 {
            return Err(Error::Shape(format!(
                "num_heads ({}) and num_kv_heads ({}) must be at least 1",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::GqaRatio {
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
            });
        }
        Ok(())
    }

    /// Query heads per kv head. Panics on `num_kv_heads == 0`, which [`Self::new`] and
    /// [`Self::validate`] reject.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// The kv head that query head `head` reads.
    pub fn kv_head(&self, head: usize) -> usize {
        head / self.group_size()
    }
}

/// One sequence of a (possibly ragged) batch, and its block geometry.
///
/// Key blocks start at key position 0; query blocks start at the first query of the chunk. So
/// with `q_len == kv_len` both grids coincide (the original's), and only the last block of each
/// may be partial.
///
/// The geometry methods take a block size that the caller has already checked
/// ([`crate::FlexPrefillConfig::validate`], or [`crate::BlockIndex`]'s constructors, which return
/// typed errors): they are called per block in hot loops and stay infallible. They panic on a
/// `block_size` of 0, and on `q_len > kv_len`, which [`AttentionInput`]'s constructors reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// First query token of this sequence in the packed q tensor.
    pub q_start: usize,
    /// First key token of this sequence in the packed k/v tensors.
    pub k_start: usize,
    /// Query count (the last `q_len` positions of the sequence).
    pub q_len: usize,
    /// Key count.
    pub kv_len: usize,
}

impl Sequence {
    /// `batch` sequences of `q_len` queries over `kv_len` keys each, packed one after the
    /// other (the batched layout seen as a packed one).
    pub fn uniform(batch: usize, q_len: usize, kv_len: usize) -> Vec<Self> {
        (0..batch)
            .map(|b| Self {
                q_start: b * q_len,
                k_start: b * kv_len,
                q_len,
                kv_len,
            })
            .collect()
    }

    /// The sequences flash-attn style cumulative offsets describe: sequence `i` owns queries
    /// `cu_seqlens_q[i]..cu_seqlens_q[i+1]` and keys `cu_seqlens_k[i]..cu_seqlens_k[i+1]`.
    /// Checks the offsets themselves; [`Sequence::check_packed`] checks the lengths.
    pub fn from_cu_seqlens(cu_seqlens_q: &[usize], cu_seqlens_k: &[usize]) -> Result<Vec<Self>> {
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)?;
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)?;
        if cu_seqlens_q.len() != cu_seqlens_k.len() {
            return Err(Error::CuSeqlens(format!(
                "cu_seqlens_q has {} entries but cu_seqlens_k has {}",
                cu_seqlens_q.len(),
                cu_seqlens_k.len()
            )));
        }
        Ok(cu_seqlens_q
            .windows(2)
            .zip(cu_seqlens_k.windows(2))
            .map(|(wq, wk)| Self {
                q_start: wq[0],
                k_start: wk[0],
                q_len: wq[1] - wq[0],
                kv_len: wk[1] - wk[0],
            })
            .collect())
    }

    /// Checks a batch of sequences as every input is checked (at least one, none empty,
    /// `q_len <= kv_len`, packed in order) and returns the query and key token totals. Callers
    /// holding device pointers instead of host tensors check their sequences with this.
    pub fn check_packed(seqs: &[Self]) -> Result<(usize, usize)> {
        if seqs.is_empty() {
            return Err(Error::Shape("no sequence: batch must be at least 1".into()));
        }
        let (mut q_next, mut k_next) = (0usize, 0usize);
        for (i, s) in seqs.iter().enumerate() {
            if s.q_len == 0 || s.kv_len == 0 {
                return Err(Error::EmptySequence {
                    seq: i,
                    q_len: s.q_len,
                    kv_len: s.kv_len,
                });
            }
            if s.q_len > s.kv_len {
                return Err(Error::QueryLongerThanKeys {
                    seq: i,
                    q_len: s.q_len,
                    kv_len: s.kv_len,
                });
            }
            if s.q_start != q_next || s.k_start != k_next {
                return Err(Error::Shape(format!(
                    "sequence {i} is not packed after sequence {}",
                    i.saturating_sub(1)
                )));
            }
            let overflow = || {
                Error::Shape(format!(
                    "sequence {i}: token offsets overflow (q_len {}, kv_len {})",
                    s.q_len, s.kv_len
                ))
            };
            q_next = q_next.checked_add(s.q_len).ok_or_else(overflow)?;
            k_next = k_next.checked_add(s.kv_len).ok_or_else(overflow)?;
        }
        Ok((q_next, k_next))
    }

    /// A whole sequence of `len` tokens (every query, no earlier chunk) alone at the start of
    /// the packed tensors: the single-sequence case that tests and examples spell most often.
    pub fn whole(len: usize) -> Self {
        Self {
            q_start: 0,
            k_start: 0,
            q_len: len,
            kv_len: len,
        }
    }

    /// Absolute position of query 0 of the chunk (`kv_len - q_len`).
    pub fn query_offset(&self) -> usize {
        self.kv_len - self.q_len
    }

    /// Query blocks: `ceil(q_len / block_size)`.
    pub fn num_query_blocks(&self, block_size: usize) -> usize {
        self.q_len.div_ceil(block_size)
    }

    /// Key blocks: `ceil(kv_len / block_size)`.
    pub fn num_key_blocks(&self, block_size: usize) -> usize {
        self.kv_len.div_ceil(block_size)
    }

    /// Absolute positions `(first, last)` (inclusive) of the queries of query block `r`.
    pub fn query_block_positions(&self, r: usize, block_size: usize) -> (usize, usize) {
        let first = self.query_offset() + r * block_size;
        let last = (self.query_offset() + (r + 1) * block_size).min(self.kv_len) - 1;
        (first, last)
    }

    /// Key blocks query block `r` may see: `0..causal_key_blocks(r)`.
    pub fn causal_key_blocks(&self, r: usize, block_size: usize) -> usize {
        self.query_block_positions(r, block_size).1 / block_size + 1
    }

    /// The key blocks holding query block `r`'s own positions (one block when the grids align,
    /// two when a chunk starts mid-block). Forcing them keeps every row non-empty.
    pub fn diagonal_key_blocks(
        &self,
        r: usize,
        block_size: usize,
    ) -> std::ops::RangeInclusive<usize> {
        let (first, last) = self.query_block_positions(r, block_size);
        first / block_size..=last / block_size
    }

    /// Causal blocks of the whole sequence: Σ_r causal_key_blocks(r).
    pub fn total_causal_blocks(&self, block_size: usize) -> usize {
        (0..self.num_query_blocks(block_size))
            .map(|r| self.causal_key_blocks(r, block_size))
            .sum()
    }
}

/// Host q/k/v plus everything needed to interpret them.
#[derive(Debug, Clone)]
pub struct AttentionInput<'a> {
    /// Queries, `[total_q, num_heads, head_dim]`.
    pub q: TensorRef<'a>,
    /// Keys, `[total_k, num_kv_heads, head_dim]`.
    pub k: TensorRef<'a>,
    /// Values, `[total_k, num_kv_heads, head_dim]`.
    pub v: TensorRef<'a>,
    /// Head counts and width.
    pub shape: AttentionShape,
    /// The sequences, in order.
    pub seqs: Vec<Sequence>,
    /// Scale of q·k in the attention softmax; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Also return the log-sum-exp of every (query row, head).
    pub return_lse: bool,
}

impl<'a> AttentionInput<'a> {
    /// A uniform batch, `[batch, q_len, heads, dim]` for q and `[batch, kv_len, kv_heads, dim]`
    /// for k and v. Checks everything (shapes, finiteness) before returning.
    pub fn batched(
        q: impl Into<TensorRef<'a>>,
        k: impl Into<TensorRef<'a>>,
        v: impl Into<TensorRef<'a>>,
        batch: usize,
        q_len: usize,
        kv_len: usize,
        shape: AttentionShape,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(Error::Shape("batch (0) must be at least 1".into()));
        }
        let (q, k, v) = (q.into(), k.into(), v.into());
        shape.validate()?;
        if q_len == 0 || kv_len == 0 {
            return Err(Error::EmptySequence {
                seq: 0,
                q_len,
                kv_len,
            });
        }
        // Check the sizes against the tensors' lengths before building `batch` sequences, so a
        // huge `batch` or length is a shape error, not an overflow or an allocation of that size.
        for (name, t, len, heads) in [
            ("q", &q, q_len, shape.num_heads),
            ("k", &k, kv_len, shape.num_kv_heads),
        ] {
            if element_count(batch, len, heads, shape.head_dim) != Some(t.len()) {
                return Err(Error::Shape(format!(
                    "{name} has {} elements, expected batch {batch} × {len} tokens × {heads} heads × {} head_dim",
                    t.len(),
                    shape.head_dim
                )));
            }
        }
        let seqs = Sequence::uniform(batch, q_len, kv_len);
        Self::from_parts(q, k, v, shape, seqs)
    }

    /// A ragged batch packed along tokens, with flash-attn style cumulative offsets:
    /// sequence `i` owns queries `cu_seqlens_q[i]..cu_seqlens_q[i+1]` and keys
    /// `cu_seqlens_k[i]..cu_seqlens_k[i+1]`.
    pub fn packed(
        q: impl Into<TensorRef<'a>>,
        k: impl Into<TensorRef<'a>>,
        v: impl Into<TensorRef<'a>>,
        cu_seqlens_q: &[usize],
        cu_seqlens_k: &[usize],
        shape: AttentionShape,
    ) -> Result<Self> {
        let seqs = Sequence::from_cu_seqlens(cu_seqlens_q, cu_seqlens_k)?;
        Self::from_parts(q.into(), k.into(), v.into(), shape, seqs)
    }

    /// Builds from already-made sequences and checks everything.
    pub fn from_parts(
        q: TensorRef<'a>,
        k: TensorRef<'a>,
        v: TensorRef<'a>,
        shape: AttentionShape,
        seqs: Vec<Sequence>,
    ) -> Result<Self> {
        let x = Self {
            q,
            k,
            v,
            shape,
            seqs,
            softmax_scale: None,
            return_lse: false,
        };
        x.validate()?;
        Ok(x)
    }

    /// Sets the softmax scale (default `1/sqrt(head_dim)`).
    pub fn with_softmax_scale(mut self, scale: f32) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::Config(format!(
                "softmax_scale ({scale}) must be finite and > 0"
            )));
        }
        self.softmax_scale = Some(scale);
        Ok(self)
    }

    /// Asks for the log-sum-exp output.
    pub fn with_lse(mut self, return_lse: bool) -> Self {
        self.return_lse = return_lse;
        self
    }

    /// The scale actually used: `softmax_scale` or `1/sqrt(head_dim)`.
    pub fn scale(&self) -> f32 {
        self.softmax_scale
            .unwrap_or(1.0 / (self.shape.head_dim as f32).sqrt())
    }

    /// dtype of q (and of k, v and the output).
    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }

    /// Query tokens over all sequences.
    pub fn total_q(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.q_start + s.q_len)
    }

    /// Key tokens over all sequences.
    pub fn total_k(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.k_start + s.kv_len)
    }

    /// Flat offset of query `(token, head)`'s first element.
    #[inline]
    pub fn q_offset(&self, token: usize, head: usize) -> usize {
        (token * self.shape.num_heads + head) * self.shape.head_dim
    }

    /// Flat offset of key/value `(token, kv_head)`'s first element.
    #[inline]
    pub fn kv_offset(&self, token: usize, kv_head: usize) -> usize {
        (token * self.shape.num_kv_heads + kv_head) * self.shape.head_dim
    }

    /// Checks dtypes, lengths, sequence layout and finiteness. Every constructor calls it.
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        let (dq, dk, dv) = (self.q.dtype(), self.k.dtype(), self.v.dtype());
        if dq != dk || dq != dv {
            return Err(Error::DType {
                q: dq.name(),
                k: dk.name(),
                v: dv.name(),
            });
        }
        let (q_next, k_next) = Sequence::check_packed(&self.seqs)?;
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = self.shape;
        // An element count that overflows cannot equal any real tensor's length.
        let want_q = element_count(1, q_next, num_heads, head_dim).unwrap_or(usize::MAX);
        let want_kv = element_count(1, k_next, num_kv_heads, head_dim).unwrap_or(usize::MAX);
        for (name, got, want, tokens, heads) in [
            ("q", self.q.len(), want_q, q_next, num_heads),
            ("k", self.k.len(), want_kv, k_next, num_kv_heads),
            ("v", self.v.len(), want_kv, k_next, num_kv_heads),
        ] {
            if got != want {
                return Err(Error::Shape(format!(
                    "{name} has {got} elements, expected {want} ({tokens} tokens × {heads} heads × {head_dim} head_dim)"
                )));
            }
        }
        for (name, t) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
            if let Some((index, value)) = t.first_non_finite() {
                return Err(Error::NonFinite {
                    tensor: name,
                    index,
                    value: value.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// `batch · tokens · heads · head_dim`, or `None` when it overflows.
fn element_count(batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Option<usize> {
    batch
        .checked_mul(tokens)?
        .checked_mul(heads)?
        .checked_mul(head_dim)
}

fn check_cu_seqlens(name: &str, cu: &[usize]) -> Result<()> {
    if cu.len() < 2 {
        return Err(Error::CuSeqlens(format!(
            "{name} needs at least 2 entries, got {}",
            cu.len()
        )));
    }
    if cu[0] != 0 {
        return Err(Error::CuSeqlens(format!(
            "{name} must start at 0, starts at {}",
            cu[0]
        )));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::CuSeqlens(format!(
            "{name} decreases at entry {} ({} after {})",
            i + 1,
            cu[i + 1],
            cu[i]
        )));
    }
    Ok(())
}

/// What a backend returns.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOutput {
    /// `[total_q, num_heads, head_dim]` in q's dtype.
    pub out: crate::tensor::HostTensor,
    /// Natural-log log-sum-exp of the scaled scores over the keys each row attended,
    /// `[total_q, num_heads]`, f32; present when asked for. Two partial results over disjoint
    /// key sets merge exactly: `lse = ln(e^a + e^b)`, `out = e^(a-lse)·out_a + e^(b-lse)·out_b`.
    pub lse: Option<Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> AttentionShape {
        AttentionShape::new(4, 2, 8).unwrap()
    }

    #[test]
    fn geometry_of_a_chunk() {
        // kv 300, q 100: queries are positions 200..300; block 128.
        let s = Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 100,
            kv_len: 300,
        };
        assert_eq!(s.num_query_blocks(128), 1);
        assert_eq!(s.num_key_blocks(128), 3);
        assert_eq!(s.query_block_positions(0, 128), (200, 299));
        assert_eq!(s.diagonal_key_blocks(0, 128), 1..=2);
        assert_eq!(s.causal_key_blocks(0, 128), 3);
        let full = Sequence::whole(300);
        assert_eq!(full.total_causal_blocks(128), 1 + 2 + 3);
        assert_eq!(full.diagonal_key_blocks(2, 128), 2..=2);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let z = vec![0.5f32; 10 * 4 * 8];
        let kv = vec![0.5f32; 10 * 2 * 8];
        assert!(AttentionInput::batched(&z, &kv, &kv, 1, 10, 10, shape()).is_ok());
        assert!(matches!(
            AttentionInput::batched(&z, &kv, &kv, 1, 9, 10, shape()),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            AttentionShape::new(30, 8, 64),
            Err(Error::GqaRatio { .. })
        ));
        assert!(matches!(
            AttentionShape::new(4, 2, 0),
            Err(Error::HeadDim(0))
        ));
        assert!(matches!(
            AttentionShape::new(4, 2, 257),
            Err(Error::HeadDim(257))
        ));
        let mut bad = z.clone();
        bad[17] = f32::NAN;
        assert!(matches!(
            AttentionInput::batched(&bad, &kv, &kv, 1, 10, 10, shape()),
            Err(Error::NonFinite {
                tensor: "q",
                index: 17,
                ..
            })
        ));
        assert!(matches!(
            AttentionInput::packed(&z, &kv, &kv, &[0, 6, 10], &[0, 5, 10], shape()),
            Err(Error::QueryLongerThanKeys { seq: 0, .. })
        ));
        assert!(matches!(
            AttentionInput::packed(&z, &kv, &kv, &[0, 6, 4], &[0, 6, 4], shape()),
            Err(Error::CuSeqlens(_))
        ));
        assert!(matches!(
            AttentionInput::packed(&z, &kv, &kv, &[0, 0, 10], &[0, 0, 10], shape()),
            Err(Error::EmptySequence { seq: 0, .. })
        ));
        // sizes whose products overflow, or a batch far larger than the tensors
        assert!(matches!(
            AttentionInput::batched(&z, &kv, &kv, usize::MAX, 10, 10, shape()),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            AttentionInput::batched(&z, &kv, &kv, 2, usize::MAX / 2 + 1, usize::MAX, shape()),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            AttentionInput::batched(&z, &kv, &kv, 3, 0, 10, shape()),
            Err(Error::EmptySequence { .. })
        ));
        let huge = AttentionShape {
            num_heads: usize::MAX,
            num_kv_heads: 1,
            head_dim: 2,
        };
        assert!(AttentionInput::batched(&z, &kv, &kv, 1, 10, 10, huge).is_err());
        assert!(matches!(
            AttentionInput::packed(&z, &kv, &kv, &[0, usize::MAX], &[0, usize::MAX], shape()),
            Err(Error::Shape(_))
        ));
        let seqs = vec![Sequence::whole(usize::MAX), Sequence::whole(usize::MAX)];
        let t = |x: &'static [f32]| TensorRef::from(x);
        assert!(matches!(
            AttentionInput::from_parts(t(&[]), t(&[]), t(&[]), shape(), seqs),
            Err(Error::Shape(_))
        ));
        let h: Vec<half::f16> = vec![half::f16::ONE; kv.len()];
        assert!(matches!(
            AttentionInput::batched(&z, &h, &kv, 1, 10, 10, shape()),
            Err(Error::DType { .. })
        ));
    }
}
