//! The element-wise half of the online softmax (row max, `exp2`, row sum) and the plain row
//! softmax of the statistics, written so LLVM vectorises them, and compiled twice: for the baseline target and for AVX2 + FMA, picked at run
//! time. The GEMMs are matrixmultiply's; this is everything between them.
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

/// One online-softmax step over a score tile `s` (`valid.len()` rows of `width`, row stride
/// `width`), scores already in log2 units (`q·k·scale·log₂e`).
///
/// Row `i` sees only its first `valid[i]` scores (the causal limit inside the tile); the rest
/// of the row is zeroed so the following `P·V` GEMM ignores it. On return `s` holds
/// `P = 2^(s − m_new)`, `m`/`l` the running max and sum, and `corr[i] = 2^(m_old − m_new)`,
/// the factor by which the caller must rescale row `i` of its accumulator.
pub(crate) fn online_softmax_tile(
    s: &mut [f32],
    width: usize,
    valid: &[usize],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            unsafe { online_softmax_tile_avx2(s, width, valid, m, l, corr) };
            return;
        }
    }
    online_softmax_tile_impl(s, width, valid, m, l, corr);
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

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn online_softmax_tile_avx2(
    s: &mut [f32],
    width: usize,
    valid: &[usize],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
) {
    online_softmax_tile_impl(s, width, valid, m, l, corr);
}

#[inline(always)]
fn online_softmax_tile_impl(
    s: &mut [f32],
    width: usize,
    valid: &[usize],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
) {
    for (i, row) in s.chunks_exact_mut(width).take(valid.len()).enumerate() {
        let nv = valid[i].min(width);
        let (live, dead) = row.split_at_mut(nv);
        dead.fill(0.0);
        if nv == 0 {
            corr[i] = 1.0;
            continue;
        }
        let m_new = max_of(live).max(m[i]);
        // m[i] = −∞ before the first visible key: the factor is then 0, and acc and l are 0.
        let c = exp2_nonpositive(m[i] - m_new);
        let sum = exp2_shift_sum(live, m_new);
        l[i] = l[i] * c + sum;
        m[i] = m_new;
        corr[i] = c;
    }
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
        // Two rows of width 3; row 0 sees 2 keys, row 1 sees none.
        let mut s = vec![1.0, 0.0, 5.0, 2.0, 2.0, 2.0];
        let (mut m, mut l, mut c) = (vec![f32::NEG_INFINITY; 2], vec![0.0; 2], vec![0.0; 2]);
        online_softmax_tile(&mut s, 3, &[2, 0], &mut m, &mut l, &mut c);
        assert_eq!(&s, &[1.0, 0.5, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!((m[0], l[0], c[0]), (1.0, 1.5, 0.0));
        assert_eq!((m[1], l[1], c[1]), (f32::NEG_INFINITY, 0.0, 1.0));
        // A second tile with a larger max rescales the running sum.
        let mut s2 = vec![3.0, 3.0, 3.0];
        online_softmax_tile(&mut s2, 3, &[1], &mut m[..1], &mut l[..1], &mut c[..1]);
        assert_eq!((m[0], c[0]), (3.0, 0.25));
        assert!((l[0] - (1.5 * 0.25 + 1.0)).abs() < 1e-7);
        assert_eq!(&s2, &[1.0, 0.0, 0.0]);
    }
}
