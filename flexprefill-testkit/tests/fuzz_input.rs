//! Fuzz target for the input constructors of core: `AttentionInput::{batched, packed,
//! from_parts}` and `BlockIndex::{dense, from_rows}` on sizes decoded from arbitrary bytes
//! (small values most of the time, boundary values such as `usize::MAX` and `2^63` otherwise).
//! Every call returns a value or a typed error, never panics; what is accepted is consistent
//! (tensor lengths match the layout, a dense index validates).
//!
//! `cargo test` runs a short smoke; the long run recorded in `docs/TESTING.md` is
//! `FLEXPREFILL_FUZZ_INPUTS=1000000 cargo test -p flexprefill-testkit --test fuzz_input -- --ignored`
//! (the test profile keeps overflow checks on). `fuzz/` runs the same target under cargo-fuzz.

use flexprefill_core::{
    bf16, f16, AttentionInput, AttentionShape, BlockIndex, ForcedBlocks, Sequence, TensorRef,
};
use flexprefill_testkit::fuzz::{self, BOUNDARY_NUMBERS};

/// Reads sizes and choices from the fuzz input; past its end every read is 0.
struct Draw<'a>(&'a [u8]);

impl Draw<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// Mostly 0..=40, sometimes a boundary value (±1).
    fn size(&mut self) -> usize {
        let b = self.byte();
        if b < 224 {
            (b % 41) as usize
        } else {
            let v = BOUNDARY_NUMBERS[(self.byte() as usize) % BOUNDARY_NUMBERS.len()] as usize;
            match b % 3 {
                0 => v.wrapping_add(1),
                1 => v.wrapping_sub(1),
                _ => v,
            }
        }
    }
}

/// Tensor elements, at most 8 192, so accepted inputs stay cheap; `want` (when it fits) is taken
/// half of the time so that valid inputs are common.
fn tensor_len(d: &mut Draw<'_>, want: Option<usize>) -> usize {
    match want.filter(|&w| w <= 8192) {
        Some(w) if d.byte().is_multiple_of(2) => w,
        _ => d.size().min(8192),
    }
}

enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Buf {
    fn new(d: &mut Draw<'_>, len: usize, dtype: u8) -> Self {
        let mut b = match dtype % 3 {
            0 => Buf::F32(vec![0.25; len]),
            1 => Buf::F16(vec![f16::from_f32(0.25); len]),
            _ => Buf::Bf16(vec![bf16::from_f32(0.25); len]),
        };
        if len > 0 && d.byte() > 240 {
            let i = d.size() % len;
            match &mut b {
                Buf::F32(x) => x[i] = f32::NAN,
                Buf::F16(x) => x[i] = f16::INFINITY,
                Buf::Bf16(x) => x[i] = bf16::NEG_INFINITY,
            }
        }
        b
    }

    fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Buf::F32(x) => x.as_slice().into(),
            Buf::F16(x) => x.as_slice().into(),
            Buf::Bf16(x) => x.as_slice().into(),
        }
    }
}

fn elements(tokens: usize, heads: usize, head_dim: usize) -> Option<usize> {
    tokens.checked_mul(heads)?.checked_mul(head_dim)
}

fn cu_seqlens(d: &mut Draw<'_>, n: usize) -> Vec<usize> {
    let mut cu = vec![if d.byte() > 250 { d.size() } else { 0 }];
    for _ in 0..n {
        let last = *cu.last().expect("starts with one entry");
        let step = d.size();
        cu.push(if d.byte() > 245 {
            step
        } else {
            last.saturating_add(step)
        });
    }
    cu
}

pub(crate) fn target(bytes: &[u8]) -> bool {
    let mut d = Draw(bytes);
    let shape = AttentionShape {
        num_heads: d.size(),
        num_kv_heads: d.size(),
        head_dim: d.size(),
    };
    let (h, kvh, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let dtypes = [d.byte(), d.byte(), d.byte()];
    let same = d.byte() % 8 != 0;
    let dt = |i: usize| if same { dtypes[0] } else { dtypes[i] };
    let mode = d.byte() % 3;
    let mut batch = (0, 0, 0);
    let (seqs, total_q, total_k) = match mode {
        0 => {
            batch = (d.size(), d.size(), d.size());
            let (b, ql, kl) = batch;
            (None, b.checked_mul(ql), b.checked_mul(kl))
        }
        1 => {
            let n = (d.byte() % 5) as usize;
            let cq = cu_seqlens(&mut d, n);
            let ck = if d.byte() > 250 {
                let m = (d.byte() % 5) as usize;
                cu_seqlens(&mut d, m)
            } else {
                cu_seqlens(&mut d, n)
            };
            let (tq, tk) = (cq.last().copied(), ck.last().copied());
            (Some((cq, ck)), tq, tk)
        }
        _ => {
            let n = (d.byte() % 5) as usize;
            let cq = cu_seqlens(&mut d, n);
            let ck = cu_seqlens(&mut d, n);
            (Some((cq, ck)), None, None)
        }
    };
    let ql = tensor_len(&mut d, total_q.and_then(|t| elements(t, h, hd)));
    let kl = tensor_len(&mut d, total_k.and_then(|t| elements(t, kvh, hd)));
    let (q, k, v) = (
        Buf::new(&mut d, ql, dt(0)),
        Buf::new(&mut d, kl, dt(1)),
        Buf::new(&mut d, kl, dt(2)),
    );
    let result = match (mode, seqs) {
        (0, _) => {
            let (b, q_len, kv_len) = batch;
            AttentionInput::batched(q.as_ref(), k.as_ref(), v.as_ref(), b, q_len, kv_len, shape)
        }
        (1, Some((cq, ck))) => {
            AttentionInput::packed(q.as_ref(), k.as_ref(), v.as_ref(), &cq, &ck, shape)
        }
        (_, Some((cq, ck))) => {
            // raw sequences: starts and lengths straight from the bytes, packed or not
            let seqs = cq
                .windows(2)
                .zip(ck.windows(2))
                .map(|(a, b)| Sequence {
                    q_start: a[0],
                    k_start: b[0],
                    q_len: a[1].wrapping_sub(a[0]),
                    kv_len: b[1].wrapping_sub(b[0]),
                })
                .collect();
            AttentionInput::from_parts(q.as_ref(), k.as_ref(), v.as_ref(), shape, seqs)
        }
        _ => unreachable!("modes 1 and 2 build cu_seqlens"),
    };
    // The block index on the same (possibly invalid) layout, with a drawn block size.
    let bs = d.size();
    let heads = d.size() % 64;
    let layout: Vec<Sequence> = match &result {
        Ok(x) => x.seqs.clone(),
        Err(_) => {
            let n = (d.byte() % 4) as usize;
            (0..n)
                .map(|_| Sequence {
                    q_start: 0,
                    k_start: 0,
                    q_len: d.size(),
                    kv_len: d.size(),
                })
                .collect()
        }
    };
    let small = layout
        .iter()
        .all(|s| s.kv_len <= 1 << 14 && bs >= 1 && s.kv_len / bs <= 256);
    if small {
        if let Ok(index) = BlockIndex::dense(&layout, heads, bs) {
            index
                .validate(ForcedBlocks::default())
                .expect("a dense index is valid");
            assert_eq!(index.density(), 1.0);
        }
        let rows = layout
            .iter()
            .flat_map(|s| {
                let nqb = s.q_len.div_ceil(bs.max(1)).min(64);
                (0..heads).map(move |_| nqb)
            })
            .map(|nqb| (0..nqb).map(|_| vec![d.byte() as u32]).collect())
            .collect();
        let _ = BlockIndex::from_rows(&layout, heads, bs, rows);
    } else {
        // Large layouts: only the size checks (no rows given, so nothing is built; `dense` on a
        // layout that passes them would legitimately allocate gigabytes).
        let _ = BlockIndex::from_rows(&layout, heads, bs, Vec::new());
    }
    let Ok(x) = result else {
        return false;
    };
    assert_eq!(x.q.len(), elements(x.total_q(), h, hd).unwrap());
    assert_eq!(x.k.len(), elements(x.total_k(), kvh, hd).unwrap());
    assert!(x.seqs.iter().all(|s| 0 < s.q_len && s.q_len <= s.kv_len));
    true
}

fn corpus() -> Vec<Vec<u8>> {
    // A few valid layouts: batched 2×8 tokens, 4 heads over 2, d 8; packed [0,3,7] / [0,5,9].
    vec![
        vec![4, 2, 8, 0, 0, 0, 1, 0, 2, 8, 8, 0, 0],
        vec![
            4, 2, 8, 1, 1, 1, 1, 1, 2, 0, 3, 0, 4, 0, 0, 0, 5, 0, 4, 0, 0, 0, 0, 16, 2,
        ],
        vec![1, 1, 16, 0, 0, 0, 1, 2, 1, 0, 5, 0, 0, 5, 0, 0, 0, 0, 16, 1],
    ]
}

#[test]
fn fuzz_smoke_attention_input() {
    let stats = fuzz::run("attention_input", &corpus(), &[], 3_000, 1, target);
    assert!(
        stats.accepted > 50,
        "{stats:?}: too few valid inputs to mean anything"
    );
}

#[test]
#[ignore = "long fuzz run: set FLEXPREFILL_FUZZ_INPUTS (docs/TESTING.md)"]
fn fuzz_long_attention_input() {
    let seed = std::env::var("FLEXPREFILL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let n = fuzz::inputs_from_env(1_000_000);
    fuzz::run("attention_input", &corpus(), &[], n, seed, target);
}
