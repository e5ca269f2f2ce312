//! Jensen–Shannon distance between the estimated and the true block distribution (Eq. 2).

/// `sqrt(JSD(a ‖ b))` with natural logs and `0 · ln 0 = 0` (xlogy), in f64 internally.
///
/// Range `[0, sqrt(ln 2) ≈ 0.8326]`: 0 for equal distributions, `sqrt(ln 2)` for disjoint ones.
/// Inputs are expected to be distributions (each sums to 1); they are not renormalised.
pub fn js_distance(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut kl_a = 0.0f64;
    let mut kl_b = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        let m = 0.5 * (x + y);
        if x > 0.0 {
            kl_a += x * (x / m).ln();
        }
        if y > 0.0 {
            kl_b += y * (y / m).ln();
        }
    }
    (0.5 * (kl_a + kl_b)).max(0.0).sqrt() as f32
}

/// The original's formula, quirk included: f32, no epsilon, so an exact 0 in either input gives
/// `0 · ln 0 = NaN` and the head silently becomes vertical-slash (`NaN < tau` is false).
pub fn js_distance_original(a: &[f32], b: &[f32]) -> f32 {
    let mut kl_a = 0.0f32;
    let mut kl_b = 0.0f32;
    for (&x, &y) in a.iter().zip(b) {
        let m = 0.5 * (x + y);
        kl_a += x * (x / m).ln();
        kl_b += y * (y / m).ln();
    }
    (0.5 * kl_a + 0.5 * kl_b).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_is_zero_disjoint_is_sqrt_ln2() {
        let a = [0.25, 0.25, 0.5];
        assert!(js_distance(&a, &a).abs() < 1e-6);
        let d = js_distance(&[1.0, 0.0], &[0.0, 1.0]);
        assert!((d - (2f32.ln()).sqrt()).abs() < 1e-6, "{d}");
    }

    #[test]
    fn hand_computed_case() {
        // a = [0.5, 0.5], b = [1, 0]: m = [0.75, 0.25]
        // KL(a‖m) = 0.5 ln(2/3) + 0.5 ln 2; KL(b‖m) = ln(4/3)
        let want =
            (0.5 * (0.5 * (2.0f64 / 3.0).ln() + 0.5 * 2f64.ln() + (4.0f64 / 3.0).ln())).sqrt();
        assert!((js_distance(&[0.5, 0.5], &[1.0, 0.0]) as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn original_quirk_gives_nan_on_exact_zero() {
        assert!(js_distance_original(&[1.0, 0.0], &[0.5, 0.5]).is_nan());
        let a = [0.3, 0.7];
        let b = [0.4, 0.6];
        assert!((js_distance_original(&a, &b) - js_distance(&a, &b)).abs() < 1e-5);
    }
}
