//! What the device benches share: the issue-5 head shape, the error type, the median.

/// Query heads and kv heads of issue 5's benchmark shape.
pub const H: usize = 32;
pub const HKV: usize = 8;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Median of the timings (the upper one of an even count).
pub fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
