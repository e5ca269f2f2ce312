//! Block pooling helpers.

/// Sums of `x` over consecutive blocks of `block_size` (the last one may be partial).
pub fn block_sums(x: &[f32], block_size: usize) -> Vec<f32> {
    x.chunks(block_size).map(|c| c.iter().sum()).collect()
}

/// Mean of each block of rows of a row-major `[rows, dim]` matrix, `[ceil(rows/bs), dim]`; a
/// partial last block is divided by its real row count.
pub fn mean_pool_rows(x: &[f32], dim: usize, block_size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len().div_ceil(dim * block_size) * dim);
    for blk in x.chunks(dim * block_size) {
        let n = (blk.len() / dim) as f32;
        let mut acc = vec![0.0f32; dim];
        for row in blk.chunks(dim) {
            acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
        out.extend(acc.into_iter().map(|a| a / n));
    }
    out
}
