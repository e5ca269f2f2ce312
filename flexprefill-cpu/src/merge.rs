//! The LSE merge: how an engine combines partial attention results over disjoint key sets
//! (a prefix-cache part and a new-chunk part, or two halves of a long KV).

use flexprefill_core::{Error, Result};

/// Merges two partial outputs over disjoint key sets of the same queries:
/// `lse = ln(e^a + e^b)`, `out = e^(a−lse)·out_a + e^(b−lse)·out_b`, row by row.
///
/// `out_*` are `[rows, head_dim]` (any row-major layout where each LSE entry owns `head_dim`
/// consecutive outputs, such as `[tokens, heads, head_dim]` with `[tokens, heads]` LSE). A row
/// with LSE −∞ (no key) contributes nothing; two such rows merge to output 0, LSE −∞.
pub fn merge_partials(
    out_a: &[f32],
    lse_a: &[f32],
    out_b: &[f32],
    lse_b: &[f32],
    head_dim: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let rows = lse_a.len();
    if head_dim == 0
        || lse_b.len() != rows
        || out_a.len() != rows * head_dim
        || out_b.len() != rows * head_dim
    {
        return Err(Error::Shape(format!(
            "merge: outputs of {} and {} elements, LSEs of {} and {} rows, head_dim {head_dim}",
            out_a.len(),
            out_b.len(),
            lse_a.len(),
            lse_b.len()
        )));
    }
    let mut out = vec![0.0f32; out_a.len()];
    let mut lse = vec![f32::NEG_INFINITY; rows];
    for r in 0..rows {
        let (a, b) = (lse_a[r], lse_b[r]);
        let m = a.max(b);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((a - m).exp(), (b - m).exp());
        let total = wa + wb;
        lse[r] = m + total.ln();
        let (wa, wb) = (wa / total, wb / total);
        let dst = &mut out[r * head_dim..(r + 1) * head_dim];
        let (xa, xb) = (
            &out_a[r * head_dim..(r + 1) * head_dim],
            &out_b[r * head_dim..(r + 1) * head_dim],
        );
        for ((o, &p), &q) in dst.iter_mut().zip(xa).zip(xb) {
            *o = wa * p + wb * q;
        }
    }
    Ok((out, lse))
}
