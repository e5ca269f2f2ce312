//! A bounds-checked front to `matrixmultiply::sgemm`.
//!
//! Every GEMM of the crate runs on strided views of the token-major `[tokens, heads, head_dim]`
//! tensors (a block of queries of one head is `rows` rows `heads·head_dim` apart), so no tile is
//! ever copied before the GEMM: matrixmultiply packs its operands into panels anyway, and packing
//! from a strided view costs the same as from a contiguous one.

/// A strided read-only matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }

    /// The transpose, for free.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "gemm operand {what} ({rows}×{cols}, strides {}/{}) overruns its slice of {}",
            self.rs,
            self.cs,
            self.data.len()
        );
    }
}

/// `C = alpha·A·B + beta·C` with `A: m×k`, `B: k×n`, `C: m×n` row-major with row stride `ldc`.
/// With `beta == 0` C is only written (matrixmultiply's contract), so it needs no zeroing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    sgemm_strided(m, k, n, alpha, a, b, beta, c, ldc, 1);
}

/// [`sgemm`] with C at any strides: element `(i, j)` of C is `c[i·rsc + j·csc]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    a.check(m, k, "A");
    b.check(k, n, "B");
    View::new(c, rsc, csc).check(m, n, "C");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the checks above prove that every element matrixmultiply reads from A (m×k) and B
    // (k×n) and writes to C (m×n) lies inside the borrowed slices; `c` is borrowed mutably, so
    // it aliases neither `a` nor `b`. Strides fit isize since they index in-memory slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_matches_naive() {
        // A 3×2 read with row stride 4, B = transpose of a 4×2 matrix (so 2×4).
        let a: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let bt: Vec<f32> = (0..8).map(|x| (x as f32) * 0.5).collect();
        let mut c = vec![1.0f32; 3 * 4];
        sgemm(
            3,
            2,
            4,
            2.0,
            View::new(&a, 4, 1),
            View::new(&bt, 2, 1).t(),
            1.0,
            &mut c,
            4,
        );
        for i in 0..3 {
            for j in 0..4 {
                let want = 1.0 + 2.0 * (0..2).map(|l| a[i * 4 + l] * bt[j * 2 + l]).sum::<f32>();
                assert_eq!(c[i * 4 + j], want);
            }
        }
    }
}
