//! Deterministic test inputs shared by the integration tests (no RNG dependency).
#![allow(dead_code)]

use flexprefill_core::{AttentionInput, AttentionShape};

/// SplitMix64: deterministic inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly N(0, 1): sum of four uniforms, rescaled.
    pub fn normal(&mut self) -> f32 {
        ((0..4).map(|_| self.uniform()).sum::<f32>() - 2.0) * 1.732
    }
    pub fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.normal() * scale).collect()
    }
}

pub struct Data {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub shape: AttentionShape,
    pub cu_q: Vec<usize>,
    pub cu_k: Vec<usize>,
}

impl Data {
    /// Ragged batch: `(q_len, kv_len)` per sequence. q is scaled up so softmaxes are peaky.
    pub fn new(seed: u64, lens: &[(usize, usize)], h: usize, hkv: usize, d: usize) -> Self {
        let mut rng = Rng(seed);
        let (mut cu_q, mut cu_k) = (vec![0], vec![0]);
        for &(ql, kl) in lens {
            cu_q.push(cu_q.last().unwrap() + ql);
            cu_k.push(cu_k.last().unwrap() + kl);
        }
        let (tq, tk) = (*cu_q.last().unwrap(), *cu_k.last().unwrap());
        Self {
            q: rng.vec(tq * h * d, 2.0),
            k: rng.vec(tk * hkv * d, 1.0),
            v: rng.vec(tk * hkv * d, 1.0),
            shape: AttentionShape::new(h, hkv, d).unwrap(),
            cu_q,
            cu_k,
        }
    }

    pub fn input(&self) -> AttentionInput<'_> {
        AttentionInput::packed(
            &self.q, &self.k, &self.v, &self.cu_q, &self.cu_k, self.shape,
        )
        .unwrap()
        .with_lse(true)
    }
}
