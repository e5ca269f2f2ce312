//! The element-wise half of the online softmax (row max, `exp2`, row sum) and the plain row
//! softmax of the statistics, written so LLVM vectorises them, and compiled twice: for the
//! baseline target and for AVX2 + FMA, picked at run time. The GEMMs are matrixmultiply's; this is everything between them.
//!
//! Why a polynomial `exp2`: dense causal attention at 16k tokens and 8 heads evaluates about
//! 10⁹ exponentials. libm's `expf` is a scalar call (several ns each), which alone would cost
//! as much as the two GEMMs. The Cephes-style polynomial below has a relative error below
//! 2·10⁻⁷ (about one f32 ulp), far under the 10⁻⁵ the tests demand of the whole kernel.

/// `2^x` for `x ≤ 0` (the softmax domain: scores minus their row max); 0 below −127 and for −∞.
#[inline(always)]
pub(crate) fn exp2_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    let x = x.max(-127.0); // also maps −∞ to −127, whose power below is the zero bit pattern
    let t = x + ROUND;
    let n = t - ROUND; // round(x)
    let f = x - n; // in [−0.5, 0.5]
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000); // round(x) as an integer
                                                             // Minimax polynomial for (2^f − 1)/f on [−0.5, 0.5] (Cephes exp2f).
    let p = 1.535_336_2e-4_f32;
    let p = p * f + 1.339_887_4e-3;
    let p = p * f + 9.618_437e-3;
    let p = p * f + 5.550_332_5e-2;
    let p = p * f + 2.402_264_8e-1;
    let p = p * f + 6.931_472e-1;
    let r = 1.0 + f * p;
    // 2^n through the exponent bits: n + 127 ∈ [0, 127], so the shift cannot overflow.
    f32::from_bits(((ni + 127) as u32) << 23) * r
}

const LANES: usize = 16;

#[inline(always)]
fn max_of(s: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// `s[j] = 2^(s[j] − m)`, returns `Σ s[j]`.
#[inline(always)]
fn exp2_shift_sum(s: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp2_nonpositive(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut sum = 0.0f32;
    for v in chunks.into_remainder() {
        let e = exp2_nonpositive(*v - m);
        *v = e;
        sum += e;
    }
    sum + acc.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// One online-softmax step over a column-major score tile: `s[j·rows + i]` is row `i`, key `j`,
/// `rows = valid.len()`, `width` keys, scores already in log2 units (`q·k·scale·log₂e`).
///
/// Row `i` sees only its first `valid[i]` keys (the causal limit inside the tile); the others
/// are zeroed so the following `P·V` GEMM ignores them. On return `s` holds
/// `P = 2^(s − m_new)`, `m`/`l` the running max and sum, and `corr[i] = 2^(m_old − m_new)`,
/// the factor by which the caller must rescale row `i` of its accumulator. `tmp` is scratch of
/// `rows` elements.
///
/// Column-major because the `P·V` GEMM then packs `P` from contiguous memory (matrixmultiply
/// packs `A` in 16-row panels, one column at a time), while a row-major `P` makes that packing
/// a strided gather: perf put packing at 19% of the dense time row-major, 12% column-major.
/// The loops run down each column, across rows, which vectorises just as well.
pub(crate) fn online_softmax_tile_cm(
    s: &mut [f32],
    width: usize,
    valid: &[u32],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
    tmp: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            unsafe { online_softmax_tile_cm_avx2(s, width, valid, m, l, corr, tmp) };
            return;
        }
    }
    online_softmax_tile_cm_impl(s, width, valid, m, l, corr, tmp);
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn online_softmax_tile_cm_avx2(
    s: &mut [f32],
    width: usize,
    valid: &[u32],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
    tmp: &mut [f32],
) {
    online_softmax_tile_cm_impl(s, width, valid, m, l, corr, tmp);
}

#[inline(always)]
fn online_softmax_tile_cm_impl(
    s: &mut [f32],
    width: usize,
    valid: &[u32],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
    tmp: &mut [f32],
) {
    let rows = valid.len();
    let (m, l, corr, tmp) = (
        &mut m[..rows],
        &mut l[..rows],
        &mut corr[..rows],
        &mut tmp[..rows],
    );
    // Keys below every row's limit need no mask, keys past every row's limit are all masked:
    // only the columns in between (the diagonal band of a tile) pay for the comparison.
    let vmin = (valid.iter().copied().min().unwrap_or(0) as usize).min(width);
    let vmax = (valid.iter().copied().max().unwrap_or(0) as usize).min(width);
    let cols = |j: usize| j * rows..(j + 1) * rows;

    // Pass 1: the new running max of each row over its visible keys.
    tmp.copy_from_slice(m);
    for j in 0..vmin {
        for (t, &v) in tmp.iter_mut().zip(&s[cols(j)]) {
            *t = if v > *t { v } else { *t };
        }
    }
    for j in vmin..vmax {
        let jj = j as u32;
        for ((t, &v), &nv) in tmp.iter_mut().zip(&s[cols(j)]).zip(valid) {
            let x = if jj < nv { v } else { f32::NEG_INFINITY };
            *t = if x > *t { x } else { *t };
        }
    }
    // Rescale factors; a row with no visible key so far keeps factor 1 (and l = 0).
    for ((c, &mo), &mn) in corr.iter_mut().zip(m.iter()).zip(tmp.iter()) {
        *c = if mn == f32::NEG_INFINITY {
            1.0
        } else {
            exp2_nonpositive(mo - mn)
        };
    }
    for (li, &c) in l.iter_mut().zip(corr.iter()) {
        *li *= c;
    }
    m.copy_from_slice(tmp);
    // Pass 2: P = 2^(S − m) on visible keys, 0 elsewhere; row sums into l.
    for j in 0..vmin {
        for ((v, &mi), li) in s[cols(j)].iter_mut().zip(m.iter()).zip(l.iter_mut()) {
            let p = exp2_nonpositive(*v - mi);
            *v = p;
            *li += p;
        }
    }
    for j in vmin..vmax {
        let jj = j as u32;
        let col = &mut s[cols(j)];
        for (((v, &nv), &mi), li) in col.iter_mut().zip(valid).zip(m.iter()).zip(l.iter_mut()) {
            let e = exp2_nonpositive(*v - mi);
            let p = if jj < nv { e } else { 0.0 };
            *v = p;
            *li += p;
        }
    }
    s[vmax * rows..width * rows].fill(0.0);
}

/// Normalises `row` (scores in log2 units) into `softmax`: `row[j] = 2^(row[j] − max) / Σ`.
pub(crate) fn softmax_log2_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            unsafe { softmax_log2_row_avx2(row) };
            return;
        }
    }
    softmax_log2_row_impl(row);
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_log2_row_avx2(row: &mut [f32]) {
    softmax_log2_row_impl(row);
}

#[inline(always)]
fn softmax_log2_row_impl(row: &mut [f32]) {
    if row.is_empty() {
        return;
    }
    let m = max_of(row);
    let inv = 1.0 / exp2_shift_sum(row, m);
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_is_accurate_on_the_softmax_domain() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 1e-3; // 0 .. −200
            let got = exp2_nonpositive(x) as f64;
            let want = (x as f64).exp2();
            if want > 1e-30 {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp2_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2_nonpositive(-1000.0), 0.0);
        assert_eq!(exp2_nonpositive(0.0), 1.0);
    }

    #[test]
    fn tile_step_masks_and_rescales() {
        // Two rows, three keys, column-major; row 0 sees 2 keys, row 1 none.
        let mut s = vec![1.0, 2.0, 0.0, 2.0, 5.0, 2.0];
        let (mut m, mut l, mut c, mut t) = (
            vec![f32::NEG_INFINITY; 2],
            vec![0.0; 2],
            vec![0.0; 2],
            vec![0.0; 2],
        );
        online_softmax_tile_cm(&mut s, 3, &[2, 0], &mut m, &mut l, &mut c, &mut t);
        assert_eq!(&s, &[1.0, 0.0, 0.5, 0.0, 0.0, 0.0]);
        assert_eq!((m[0], l[0], c[0]), (1.0, 1.5, 0.0));
        assert_eq!((m[1], l[1], c[1]), (f32::NEG_INFINITY, 0.0, 1.0));
        // A second tile with a larger max rescales the running sum; every key visible.
        let mut s2 = vec![3.0, 0.0, 3.0, 0.0];
        online_softmax_tile_cm(&mut s2, 2, &[2, 2], &mut m, &mut l, &mut c, &mut t);
        assert_eq!((m[0], c[0]), (3.0, 0.25));
        assert!((l[0] - (1.5 * 0.25 + 2.0)).abs() < 1e-6);
        assert_eq!((m[1], l[1], c[1]), (0.0, 2.0, 0.0)); // first keys: acc was 0
        assert_eq!(&s2, &[1.0, 1.0, 1.0, 1.0]);
    }
}
