//! Synthetic q/k/v with planted attention structure.
//!
//! Each workload plants a known attention pattern so that selection and accuracy can be judged
//! against what is *supposed* to be there: sink + local (slash lines), periodic vertical stripes,
//! query-dependent block topics (the paper's "diverse" heads, which come out query-aware), a
//! single far needle the last queries must retrieve, plain random, and a mix of all of them over
//! the heads.
//!
//! # Construction
//!
//! Logits are `x_ij = q_i·k_j / sqrt(d)`. Each head's `d` dimensions are split into disjoint
//! groups ([`DimLayout`]); a planted component lives in its own group, so components add up in
//! the logit without interfering:
//!
//! | dims | keys carry | a query with the component carries | logit it adds |
//! |---|---|---|---|
//! | `2F` Fourier | `β_F·(cos ω_f j, sin ω_f j)` | `a·(cos ω_f i, sin ω_f i)` | `c_local·K(i−j)` |
//! | 1 sink | `β` on tokens `0..sink_tokens` | `c_sink·sqrt(d)/β` | `c_sink` on sink keys |
//! | 1 stripe | `β` on `j ≡ stripe_offset (mod stripe_period)` | `c_stripes·sqrt(d)/β` | `c_stripes` on stripe keys |
//! | 1 needle | `β` on the needle token | `c_needle·sqrt(d)/β` (last queries only) | `c_needle` on the needle |
//! | `T` topics | `β` on its region's topic (one-hot) | `c_topic·sqrt(d)/β` on its span's topic | `c_topic` on keys of that topic |
//! | rest: noise | `σ·N(0,1)` | `σ·N(0,1)` | `N(0, η²)`, `η = noise_logit_std` |
//!
//! `K(δ) = (1/F) Σ_f cos(ω_f δ)` with `ω_f ~ |N(0, 1/ℓ²)|`: random Fourier features of the
//! Gaussian kernel `exp(−δ²/2ℓ²)` (`ℓ = local_width`), so the local term depends on the distance
//! only (a slash pattern), is maximal on the diagonal and fades after a few `ℓ`; far away it
//! leaves a small quasi-random term of variance `1/(2F)`. `β = d^{1/4}`, `β_F = d^{1/4}/sqrt(F)`.
//! Value vectors are plain `N(0, 1)`.
//!
//! **Calibration.** Strengths are set per query position `i` so that each planted component
//! takes a target share of query `i`'s attention whatever the sequence length (16k or 128k): a
//! component with `m(i)` visible keys gets `c(i) = ln(R · Z(i) / m(i))`, where `Z(i)` is the
//! expected total weight of the unplanted keys (`i + 1` keys of weight ≈ 1, plus the far field of
//! the Fourier term) and `R` the target share over the noise share. The local strength is solved
//! numerically on a log-spaced grid of positions (bisection on the realised kernel). Targets:
//!
//! | kind | sink | local | stripes | topic | needle | rest (noise) |
//! |---|---|---|---|---|---|---|
//! | sink_local | 0.25 | 0.65 | | | | 0.10 |
//! | stripes | 0.05 | 0.15 | 0.70 | | | 0.10 |
//! | topics | | | | 0.85 | | 0.15 |
//! | needle (last `needle_queries` rows) | 0.10 | 0.20 | | | 0.60 | 0.10 |
//! | needle (other rows) | 0.25 | 0.50 | | | | 0.25 |
//!
//! The shares are expectations; the realised ones are checked by this module's tests (needle
//! weight, stripe mass, query-aware JS distance, up to 128k tokens).
//!
//! **Topics.** The keys are cut into regions of `topic_region` tokens (block-aligned for blocks
//! of 64 and 128), each given a random topic per kv head; each span of `topic_query_span`
//! queries of a head takes the topic of a random earlier region (one not sharing the topic of
//! its own region, when possible). So every query block attends its own set of block-level key
//! regions, and the pooled estimate `softmax(q̄·k̄ᵀ)` matches the truth (the planted parts are
//! constant over blocks): the head comes out query-aware under `tau = 0.1`.
//!
//! **GQA.** Keys and values belong to kv heads, queries to query heads. Every planted group is
//! in the keys of a kv head when one of its query heads needs it; each query head switches on
//! only its own kind's groups. So in a `Mixed` workload heads sharing a kv head share `k` and `v`
//! and still follow different patterns (head `h` has kind `PURE_KINDS[h % 5]`).
//!
//! `Random` workloads are plain `N(0, 1)` in every dimension (logit std 1); a random head inside
//! a `Mixed` workload has noise in the noise group only, scaled to the same logit std.
//!
//! Generation is parallel over token chunks (rayon) with one ChaCha8 stream per chunk, so it is
//! deterministic in `seed` whatever the thread count; 128k tokens × 8 heads × d 128 takes a
//! couple of seconds on two cores.

use std::collections::HashMap;

use flexprefill_core::{AttentionInput, AttentionShape, DType, HostTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::owned::OwnedInput;

/// The planted structure of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// Attention sink plus a local window (slash lines).
    SinkLocal,
    /// Periodic vertical stripes.
    Stripes,
    /// Query-dependent block topics (the paper's "diverse" pattern).
    Topics,
    /// One far needle key that the last queries must retrieve.
    Needle,
    /// Plain Gaussian q/k/v.
    Random,
    /// Heads of the kinds above, mixed.
    Mixed,
}

/// The kinds one head can have (every kind but `Mixed`), in the order `Mixed` cycles them.
pub const PURE_KINDS: [WorkloadKind; 5] = [
    WorkloadKind::SinkLocal,
    WorkloadKind::Stripes,
    WorkloadKind::Topics,
    WorkloadKind::Needle,
    WorkloadKind::Random,
];

impl WorkloadKind {
    /// Every kind, `Mixed` last.
    pub const ALL: [WorkloadKind; 6] = [
        WorkloadKind::SinkLocal,
        WorkloadKind::Stripes,
        WorkloadKind::Topics,
        WorkloadKind::Needle,
        WorkloadKind::Random,
        WorkloadKind::Mixed,
    ];

    /// The kinds with planted structure (the bars of issue 6 are stated over these).
    pub const STRUCTURED: [WorkloadKind; 4] = [
        WorkloadKind::SinkLocal,
        WorkloadKind::Stripes,
        WorkloadKind::Topics,
        WorkloadKind::Needle,
    ];

    /// snake_case name, as the CLI and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::SinkLocal => "sink_local",
            WorkloadKind::Stripes => "stripes",
            WorkloadKind::Topics => "topics",
            WorkloadKind::Needle => "needle",
            WorkloadKind::Random => "random",
            WorkloadKind::Mixed => "mixed",
        }
    }

    /// The kind of query head `head` in a workload of this kind.
    pub fn head_kind(self, head: usize) -> WorkloadKind {
        match self {
            WorkloadKind::Mixed => PURE_KINDS[head % PURE_KINDS.len()],
            k => k,
        }
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WorkloadKind {
    type Err = Error;
    /// Accepts the snake_case names, plus `sink-local`, `slash`, `vertical`, `diverse`,
    /// `query_aware`.
    fn from_str(s: &str) -> Result<Self> {
        let k = match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "sink_local" | "sinklocal" | "slash" => WorkloadKind::SinkLocal,
            "stripes" | "vertical" => WorkloadKind::Stripes,
            "topics" | "diverse" | "query_aware" => WorkloadKind::Topics,
            "needle" => WorkloadKind::Needle,
            "random" => WorkloadKind::Random,
            "mixed" => WorkloadKind::Mixed,
            _ => return Err(Error::UnknownKind(s.to_string())),
        };
        Ok(k)
    }
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadSpec {
    /// Structure.
    pub kind: WorkloadKind,
    /// Sequences in the batch (uniform length).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// RNG seed.
    pub seed: u64,
}

/// Most elements one tensor of a workload may have (2^33 f32 = 32 GiB): larger is a typed
/// error rather than an allocation abort.
pub const MAX_ELEMENTS: usize = 1 << 33;

impl WorkloadSpec {
    /// One sequence of `seq_len` tokens, 8 heads over 2 kv heads, d 128, seed 0: the shape of
    /// the project's CPU speed bar.
    pub fn new(kind: WorkloadKind, seq_len: usize) -> Self {
        Self {
            kind,
            batch: 1,
            seq_len,
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 128,
            seed: 0,
        }
    }

    /// Checks what [`try_generate`] needs: a valid attention shape, at least one token and one
    /// sequence, `head_dim ≥ 16` for planted kinds, and a size that fits [`MAX_ELEMENTS`].
    pub fn validate(&self) -> Result<()> {
        AttentionShape::new(self.num_heads, self.num_kv_heads, self.head_dim)?;
        if self.batch == 0 || self.seq_len == 0 {
            return Err(Error::Workload(format!(
                "batch ({}) and seq_len ({}) must be at least 1",
                self.batch, self.seq_len
            )));
        }
        if self.kind != WorkloadKind::Random && self.head_dim < MIN_PLANTED_HEAD_DIM {
            return Err(Error::Workload(format!(
                "head_dim ({}) must be at least {MIN_PLANTED_HEAD_DIM} to plant a {} pattern",
                self.head_dim, self.kind
            )));
        }
        let elems = self
            .batch
            .checked_mul(self.seq_len)
            .and_then(|t| t.checked_mul(self.num_heads))
            .and_then(|t| t.checked_mul(self.head_dim));
        if elems.is_none_or(|e| e > MAX_ELEMENTS) {
            return Err(Error::Workload(format!(
                "batch {} × seq_len {} × num_heads {} × head_dim {} exceeds {MAX_ELEMENTS} elements",
                self.batch, self.seq_len, self.num_heads, self.head_dim
            )));
        }
        Ok(())
    }

    /// The attention shape.
    pub fn shape(&self) -> Result<AttentionShape> {
        Ok(AttentionShape::new(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )?)
    }

    /// The kind of every query head.
    pub fn head_kinds(&self) -> Vec<WorkloadKind> {
        (0..self.num_heads)
            .map(|h| self.kind.head_kind(h))
            .collect()
    }
}

/// Smallest head width that holds every planted group (see [`DimLayout`]).
pub const MIN_PLANTED_HEAD_DIM: usize = 16;

/// Tuning of the planted structure; [`Planting::default`] is what [`generate`] uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Planting {
    /// Sink tokens at the start of every sequence.
    pub sink_tokens: usize,
    /// Length scale `ℓ` (tokens) of the Gaussian local kernel; the window holding most of the
    /// local mass is about `ℓ/2` wide at the strengths used.
    pub local_width: f64,
    /// Distance between stripe keys; `None`: `clamp(seq_len / 16, 8, 1000)` (1000 is not a
    /// multiple of any block size, so stripes wander inside their blocks).
    pub stripe_period: Option<usize>,
    /// Tokens per topic region of the keys.
    pub topic_region: usize,
    /// Queries sharing one topic.
    pub topic_query_span: usize,
    /// The last queries that look for the needle.
    pub needle_queries: usize,
    /// Where the needle is; `None`: random in `[seq_len/8, seq_len/2)`.
    pub needle_position: Option<usize>,
    /// Standard deviation of the unplanted part of the logits.
    pub noise_logit_std: f64,
    /// Per-query-head kinds overriding `spec.kind` (length `num_heads`, no `Mixed`).
    pub head_kinds: Option<Vec<WorkloadKind>>,
}

impl Default for Planting {
    fn default() -> Self {
        Self {
            sink_tokens: 4,
            local_width: 64.0,
            stripe_period: None,
            topic_region: 256,
            topic_query_span: 128,
            needle_queries: 256,
            needle_position: None,
            noise_logit_std: 1.0,
            head_kinds: None,
        }
    }
}

/// Where each planted group lives inside a head's `head_dim` dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimLayout {
    /// Head width.
    pub head_dim: usize,
    /// Fourier pairs `F` (dims `0..2F`).
    pub fourier_pairs: usize,
    /// The sink dim.
    pub sink: usize,
    /// The stripe dim.
    pub stripe: usize,
    /// The needle dim.
    pub needle: usize,
    /// First topic dim.
    pub topic_start: usize,
    /// Topic count `T` (8 for d ≥ 64, 4 for d ≥ 32, else 2).
    pub num_topics: usize,
    /// First noise dim (the rest of the head).
    pub noise_start: usize,
}

impl DimLayout {
    /// The layout for `head_dim ≥ MIN_PLANTED_HEAD_DIM`: a quarter of the dims for noise,
    /// `T` topics, three single dims, and the rest (rounded down to pairs) Fourier.
    pub fn new(head_dim: usize) -> Self {
        let num_topics = match head_dim {
            64.. => 8,
            32.. => 4,
            _ => 2,
        };
        let noise = (head_dim / 4).max(2);
        let fourier_pairs = head_dim.saturating_sub(noise + num_topics + 3) / 2;
        let sink = 2 * fourier_pairs;
        Self {
            head_dim,
            fourier_pairs,
            sink,
            stripe: sink + 1,
            needle: sink + 2,
            topic_start: sink + 3,
            num_topics,
            noise_start: sink + 3 + num_topics,
        }
    }

    /// Noise dims.
    pub fn noise_dims(&self) -> usize {
        self.head_dim - self.noise_start
    }
}

/// The realised structure of a workload: where everything was planted.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Kind of every query head (never `Mixed`).
    pub head_kinds: Vec<WorkloadKind>,
    /// Dimension groups.
    pub layout: DimLayout,
    /// Sink tokens `0..sink_tokens` (clipped to the sequence).
    pub sink_tokens: usize,
    /// Local kernel length scale (tokens).
    pub local_width: f64,
    /// Fourier frequencies `ω_f` (radians per token).
    pub frequencies: Vec<f64>,
    /// Stripe keys are `j ≥ sink_tokens` with `j % stripe_period == stripe_offset`.
    pub stripe_period: usize,
    /// See `stripe_period`.
    pub stripe_offset: usize,
    /// The needle's key position (same in every sequence), when a head is a needle head.
    pub needle_position: Option<usize>,
    /// Queries at positions `≥ needle_query_start` (and after the needle) look for it.
    pub needle_query_start: usize,
    /// Tokens per key topic region.
    pub topic_region: usize,
    /// Queries per topic span.
    pub topic_query_span: usize,
    /// `[kv_head][region]`: topic of each key region.
    pub region_topics: Vec<Vec<u16>>,
    /// `[head][span]`: topic of each query span (empty for non-topic heads).
    pub span_topics: Vec<Vec<u16>>,
}

impl Plan {
    /// Whether key `pos` is a stripe key.
    pub fn is_stripe(&self, pos: usize) -> bool {
        pos >= self.sink_tokens && pos % self.stripe_period == self.stripe_offset
    }

    /// Number of stripe keys below `len`.
    pub fn stripe_count(&self, len: usize) -> usize {
        if len <= self.stripe_offset {
            return 0;
        }
        let all = (len - 1 - self.stripe_offset) / self.stripe_period + 1;
        let below_sink = if self.stripe_offset < self.sink_tokens {
            (self.sink_tokens - 1 - self.stripe_offset) / self.stripe_period + 1
        } else {
            0
        };
        all.saturating_sub(below_sink)
    }

    /// Stripe keys below `len`.
    pub fn stripe_positions(&self, len: usize) -> Vec<usize> {
        (self.stripe_offset..len)
            .step_by(self.stripe_period)
            .filter(|&p| p >= self.sink_tokens)
            .collect()
    }

    /// Topic of key `pos` of kv head `kv_head`.
    pub fn key_topic(&self, kv_head: usize, pos: usize) -> u16 {
        self.region_topics[kv_head][pos / self.topic_region]
    }

    /// Topic query `pos` of (topic) head `head` looks for, `None` for other heads.
    pub fn query_topic(&self, head: usize, pos: usize) -> Option<u16> {
        self.span_topics[head]
            .get(pos / self.topic_query_span)
            .copied()
    }

    /// The realised local kernel `K(δ) = (1/F) Σ cos(ω_f δ)`.
    pub fn local_kernel(&self, distance: usize) -> f64 {
        kernel_at(&self.frequencies, distance as f64)
    }
}

/// Generated tensors, f32, layout `[batch·seq_len, heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct Workload {
    /// What was asked.
    pub spec: WorkloadSpec,
    /// Queries.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// For needle workloads: the needle's key position (per sequence).
    pub needle_position: Option<usize>,
    /// Where everything was planted.
    pub plan: Plan,
}

/// Generates a workload (deterministic in `spec.seed`) with [`Planting::default`].
///
/// # Panics
/// When the spec is invalid (see [`WorkloadSpec::validate`]); use [`try_generate`] on user input.
pub fn generate(spec: &WorkloadSpec) -> Workload {
    match try_generate(spec) {
        Ok(w) => w,
        Err(e) => panic!("generate({spec:?}): {e}"),
    }
}

/// Generates a workload with [`Planting::default`], checking the spec first.
pub fn try_generate(spec: &WorkloadSpec) -> Result<Workload> {
    generate_with(spec, &Planting::default())
}

/// Target shares (see the module docs): fraction of a query row's attention per component.
#[derive(Debug, Clone, Copy, Default)]
struct Shares {
    sink: f64,
    local: f64,
    stripes: f64,
    topic: f64,
    noise: f64,
}

const NEEDLE_SHARE: f64 = 0.6;

fn shares(kind: WorkloadKind) -> Shares {
    match kind {
        WorkloadKind::SinkLocal => Shares {
            sink: 0.25,
            local: 0.65,
            noise: 0.10,
            ..Default::default()
        },
        WorkloadKind::Stripes => Shares {
            sink: 0.05,
            local: 0.15,
            stripes: 0.70,
            noise: 0.10,
            ..Default::default()
        },
        WorkloadKind::Topics => Shares {
            topic: 0.85,
            noise: 0.15,
            ..Default::default()
        },
        // background of a needle head; the needle takes NEEDLE_SHARE on top of it
        WorkloadKind::Needle => Shares {
            sink: 0.25,
            local: 0.50,
            noise: 0.25,
            ..Default::default()
        },
        WorkloadKind::Random | WorkloadKind::Mixed => Shares {
            noise: 1.0,
            ..Default::default()
        },
    }
}

fn kernel_at(freqs: &[f64], delta: f64) -> f64 {
    if freqs.is_empty() {
        return 0.0;
    }
    freqs.iter().map(|w| (w * delta).cos()).sum::<f64>() / freqs.len() as f64
}

/// Local strength `c_local(i)` and the far-field factor, tabulated over `ln(i+1)`.
#[derive(Debug, Clone)]
struct LocalTable {
    ln_pos: Vec<f64>,
    c: Vec<f64>,
    /// `ln eff(i)`: effective unplanted weight (see [`eff_weight`]).
    ln_eff: Vec<f64>,
}

impl LocalTable {
    fn eval(&self, pos: usize) -> (f64, f64) {
        let x = ((pos + 1) as f64).ln();
        let n = self.ln_pos.len();
        if n == 1 || x <= self.ln_pos[0] {
            return (self.c[0], self.ln_eff[0]);
        }
        let j = self.ln_pos.partition_point(|&p| p < x).min(n - 1);
        let (x0, x1) = (self.ln_pos[j - 1], self.ln_pos[j]);
        let t = if x1 > x0 {
            ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        (
            self.c[j - 1] + t * (self.c[j] - self.c[j - 1]),
            self.ln_eff[j - 1] + t * (self.ln_eff[j] - self.ln_eff[j - 1]),
        )
    }
}

/// Builds the local-strength table for target ratio `ratio = share_local / share_noise`.
struct LocalCalibrator<'a> {
    freqs: &'a [f64],
    /// `K(δ)` for `δ ≤ window`.
    near: Vec<f64>,
    window: usize,
}

impl<'a> LocalCalibrator<'a> {
    fn new(freqs: &'a [f64], local_width: f64, seq_len: usize) -> Self {
        let window = ((4.0 * local_width).ceil() as usize).min(seq_len.saturating_sub(1));
        let near = (0..=window).map(|d| kernel_at(freqs, d as f64)).collect();
        Self {
            freqs,
            near,
            window,
        }
    }

    /// Far-field samples `K(δ)`, δ spread over `(window, pos]`.
    fn far_samples(&self, pos: usize) -> Vec<f64> {
        if pos <= self.window {
            return Vec::new();
        }
        const S: usize = 96;
        let span = (pos - self.window) as f64;
        (0..S)
            .map(|s| {
                kernel_at(
                    self.freqs,
                    self.window as f64 + (s as f64 + 0.5) / S as f64 * span,
                )
            })
            .collect()
    }

    /// `eff(i, c) = (i+1) + (i − window)⁺ · (mean_far e^{cK} − 1)`: unplanted weight of row `i`.
    fn eff_weight(&self, pos: usize, c: f64, far: &[f64]) -> f64 {
        let base = (pos + 1) as f64;
        if far.is_empty() {
            return base;
        }
        let mean = far.iter().map(|k| (c * k).exp()).sum::<f64>() / far.len() as f64;
        base + (pos - self.window) as f64 * (mean - 1.0)
    }

    fn local_weight(&self, pos: usize, c: f64) -> f64 {
        self.near[..=pos.min(self.window)]
            .iter()
            .map(|k| (c * k).exp())
            .sum()
    }

    /// Smallest `c ≥ 0` with `local(c) ≥ ratio · eff(c)`, or the best `c` if none reaches it.
    fn solve(&self, pos: usize, ratio: f64) -> (f64, f64) {
        let far = self.far_samples(pos);
        let g = |c: f64| {
            self.local_weight(pos, c).ln() - ratio.ln() - self.eff_weight(pos, c, &far).ln()
        };
        let (mut lo, mut best, mut best_g) = (0.0, 0.0, g(0.0));
        let mut hi = None;
        let mut c = 0.25;
        while c <= 40.0 {
            let v = g(c);
            if v >= 0.0 {
                hi = Some(c);
                break;
            }
            if v > best_g {
                (best, best_g) = (c, v);
            }
            lo = c;
            c += 0.25;
        }
        let c = match hi {
            None => best,
            Some(mut hi) => {
                if g(lo) >= 0.0 {
                    lo
                } else {
                    for _ in 0..30 {
                        let mid = 0.5 * (lo + hi);
                        if g(mid) >= 0.0 {
                            hi = mid;
                        } else {
                            lo = mid;
                        }
                    }
                    hi
                }
            }
        };
        (c, self.eff_weight(pos, c, &far).ln())
    }

    fn table(&self, seq_len: usize, ratio: f64) -> LocalTable {
        const G: usize = 40;
        let max = seq_len.max(1) as f64;
        let mut positions: Vec<usize> = (0..G)
            .map(|g| (max.powf(g as f64 / (G - 1) as f64).round() as usize).saturating_sub(1))
            .collect();
        positions.dedup();
        let mut t = LocalTable {
            ln_pos: Vec::new(),
            c: Vec::new(),
            ln_eff: Vec::new(),
        };
        for p in positions {
            let (c, ln_eff) = self.solve(p, ratio);
            t.ln_pos.push(((p + 1) as f64).ln());
            t.c.push(c);
            t.ln_eff.push(ln_eff);
        }
        t
    }
}

/// Per-head generation recipe.
#[derive(Debug, Clone)]
struct HeadRecipe {
    kind: WorkloadKind,
    shares: Shares,
    /// Local strength table (heads with a local component).
    local: Option<LocalTable>,
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // splitmix64 over the three words: independent streams per (seed, a, b)
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generates a workload with explicit planting parameters.
pub fn generate_with(spec: &WorkloadSpec, planting: &Planting) -> Result<Workload> {
    spec.validate()?;
    let n = spec.seq_len;
    let d = spec.head_dim;
    let head_kinds = match &planting.head_kinds {
        Some(k) => {
            if k.len() != spec.num_heads || k.contains(&WorkloadKind::Mixed) {
                return Err(Error::Workload(format!(
                    "planting.head_kinds needs {} kinds, none of them mixed, got {:?}",
                    spec.num_heads, k
                )));
            }
            if d < MIN_PLANTED_HEAD_DIM && k.iter().any(|&k| k != WorkloadKind::Random) {
                return Err(Error::Workload(format!(
                    "head_dim ({d}) must be at least {MIN_PLANTED_HEAD_DIM} to plant patterns"
                )));
            }
            k.clone()
        }
        None => spec.head_kinds(),
    };
    let width_ok = planting.local_width > 0.0 && planting.local_width.is_finite();
    let noise_ok = planting.noise_logit_std >= 0.0 && planting.noise_logit_std.is_finite();
    if !width_ok
        || !noise_ok
        || planting.topic_region == 0
        || planting.topic_query_span == 0
        || planting.stripe_period == Some(0)
    {
        return Err(Error::Workload(format!(
            "planting parameters out of range: {planting:?}"
        )));
    }
    let layout = DimLayout::new(d.max(MIN_PLANTED_HEAD_DIM));
    let group = spec.num_heads / spec.num_kv_heads;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(spec.seed, 0x706c_616e, 0));

    // --- the plan -------------------------------------------------------------------------
    let frequencies: Vec<f64> = (0..layout.fourier_pairs)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z.abs() / planting.local_width
        })
        .collect();
    let sink_tokens = planting.sink_tokens.min(n);
    let stripe_period = planting.stripe_period.unwrap_or((n / 16).clamp(8, 1000));
    let stripe_offset = rng.gen_range(0..stripe_period);
    let has = |k: WorkloadKind| head_kinds.contains(&k);
    let needle_position = has(WorkloadKind::Needle).then(|| {
        planting
            .needle_position
            .map(|p| p.min(n - 1))
            .unwrap_or_else(|| {
                let lo = (n / 8).max(sink_tokens).min(n - 1);
                let hi = (n / 2).max(lo + 1);
                rng.gen_range(lo..hi).min(n - 1)
            })
    });
    let needle_query_start = n
        .saturating_sub(planting.needle_queries)
        .max(needle_position.map_or(0, |p| p + 1));
    let num_regions = n.div_ceil(planting.topic_region);
    let nt = layout.num_topics as u16;
    let region_topics: Vec<Vec<u16>> = (0..spec.num_kv_heads)
        .map(|_| (0..num_regions).map(|_| rng.gen_range(0..nt)).collect())
        .collect();
    let num_spans = n.div_ceil(planting.topic_query_span);
    let span_topics: Vec<Vec<u16>> = (0..spec.num_heads)
        .map(|h| {
            if head_kinds[h] != WorkloadKind::Topics {
                return Vec::new();
            }
            let regions = &region_topics[h / group];
            (0..num_spans)
                .map(|s| {
                    let start = s * planting.topic_query_span;
                    let own = regions[start / planting.topic_region];
                    let earlier = start / planting.topic_region; // regions fully before the span
                    if earlier == 0 {
                        return regions[0];
                    }
                    let others: Vec<u16> = regions[..earlier]
                        .iter()
                        .copied()
                        .filter(|&t| t != own)
                        .collect();
                    if others.is_empty() {
                        regions[rng.gen_range(0..earlier)]
                    } else {
                        others[rng.gen_range(0..others.len())]
                    }
                })
                .collect()
        })
        .collect();
    let plan = Plan {
        head_kinds: head_kinds.clone(),
        layout,
        sink_tokens,
        local_width: planting.local_width,
        frequencies,
        stripe_period,
        stripe_offset,
        needle_position,
        needle_query_start,
        topic_region: planting.topic_region,
        topic_query_span: planting.topic_query_span,
        region_topics,
        span_topics,
    };

    // --- calibration ----------------------------------------------------------------------
    let calib = LocalCalibrator::new(&plan.frequencies, planting.local_width, n);
    let mut tables: HashMap<u64, LocalTable> = HashMap::new();
    let recipes: Vec<HeadRecipe> = head_kinds
        .iter()
        .map(|&kind| {
            let shares = shares(kind);
            let local = (shares.local > 0.0).then(|| {
                let ratio = shares.local / shares.noise;
                tables
                    .entry(ratio.to_bits())
                    .or_insert_with(|| calib.table(n, ratio))
                    .clone()
            });
            HeadRecipe {
                kind,
                shares,
                local,
            }
        })
        .collect();

    // --- the tensors ----------------------------------------------------------------------
    let pure_random = spec.kind == WorkloadKind::Random && planting.head_kinds.is_none();
    let tokens = spec.batch * n;
    let (h, hkv) = (spec.num_heads, spec.num_kv_heads);
    let mut q = vec![0.0f32; tokens * h * d];
    let mut k = vec![0.0f32; tokens * hkv * d];
    let mut v = vec![0.0f32; tokens * hkv * d];
    let eta = planting.noise_logit_std;
    // noise amplitude per element: σ² · noise_dims / sqrt(d) = η
    let sigma = (eta * (d as f64).sqrt() / layout.noise_dims().max(1) as f64).sqrt() as f32;
    let beta = (d as f64).powf(0.25);
    let sqrt_d = (d as f64).sqrt();
    let fpairs = layout.fourier_pairs;
    let beta_f = if fpairs > 0 {
        beta / (fpairs as f64).sqrt()
    } else {
        0.0
    };
    // which planted groups each kv head's keys carry
    let kv_needs: Vec<[bool; 5]> = (0..hkv)
        .map(|g| {
            let kinds = &head_kinds[g * group..(g + 1) * group];
            let any = |f: &dyn Fn(&HeadRecipe) -> bool| {
                (g * group..(g + 1) * group).any(|hh| f(&recipes[hh]))
            };
            [
                any(&|r| r.local.is_some()),
                any(&|r| r.shares.sink > 0.0),
                kinds.contains(&WorkloadKind::Stripes),
                kinds.contains(&WorkloadKind::Needle),
                kinds.contains(&WorkloadKind::Topics),
            ]
        })
        .collect();

    // topic_prefix[g][r·T + t]: regions of topic t among the first r regions of kv head g
    let topic_prefix: Vec<Vec<u32>> = plan
        .region_topics
        .iter()
        .map(|regions| {
            let t = nt as usize;
            let mut p = vec![0u32; (regions.len() + 1) * t];
            for (r, &topic) in regions.iter().enumerate() {
                let (prev, next) = p.split_at_mut((r + 1) * t);
                next[..t].copy_from_slice(&prev[r * t..]);
                next[topic as usize] += 1;
            }
            p
        })
        .collect();
    const CHUNK: usize = 256;
    let plan_ref = &plan;
    q.par_chunks_mut(CHUNK * h * d)
        .zip(k.par_chunks_mut(CHUNK * hkv * d))
        .zip(v.par_chunks_mut(CHUNK * hkv * d))
        .enumerate()
        .for_each(|(ci, ((qc, kc), vc))| {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(spec.seed, 0x746f_6b65, ci as u64));
            let mut normal = move || -> f32 { StandardNormal.sample(&mut rng) };
            let mut cs = vec![(0.0f32, 0.0f32); fpairs];
            for t in 0..qc.len() / (h * d) {
                let token = ci * CHUNK + t;
                let pos = token % n;
                let vrow = &mut vc[t * hkv * d..(t + 1) * hkv * d];
                vrow.iter_mut().for_each(|x| *x = normal());
                let krow = &mut kc[t * hkv * d..(t + 1) * hkv * d];
                let qrow = &mut qc[t * h * d..(t + 1) * h * d];
                if pure_random {
                    krow.iter_mut().for_each(|x| *x = normal());
                    qrow.iter_mut().for_each(|x| *x = normal());
                    continue;
                }
                for (f, c) in cs.iter_mut().enumerate() {
                    let (s, co) = (plan_ref.frequencies[f] * pos as f64).sin_cos();
                    *c = (co as f32, s as f32);
                }
                let lay = &plan_ref.layout;
                for (g, kr) in krow.chunks_mut(d).enumerate() {
                    kr.iter_mut().for_each(|x| *x = 0.0);
                    let [local, sink, stripes, needle, topics] = kv_needs[g];
                    // Sink, stripe and needle keys carry no Fourier part: their logit would
                    // otherwise take the far-field term (std c_local/sqrt(2F)) as a random
                    // offset (a lottery for a single key), and a stripe next to the diagonal
                    // would add the local and stripe strengths and take a whole row.
                    let single_key = (sink && pos < plan_ref.sink_tokens)
                        || (stripes && plan_ref.is_stripe(pos))
                        || (needle && plan_ref.needle_position == Some(pos));
                    if local && !single_key {
                        for (f, &(co, s)) in cs.iter().enumerate() {
                            kr[2 * f] = (beta_f as f32) * co;
                            kr[2 * f + 1] = (beta_f as f32) * s;
                        }
                    }
                    if sink && pos < plan_ref.sink_tokens {
                        kr[lay.sink] = beta as f32;
                    }
                    if stripes && plan_ref.is_stripe(pos) {
                        kr[lay.stripe] = beta as f32;
                    }
                    if needle && plan_ref.needle_position == Some(pos) {
                        kr[lay.needle] = beta as f32;
                    }
                    if topics {
                        kr[lay.topic_start + plan_ref.key_topic(g, pos) as usize] = beta as f32;
                    }
                    kr[lay.noise_start..]
                        .iter_mut()
                        .for_each(|x| *x = sigma * normal());
                }
                for (hh, qr) in qrow.chunks_mut(d).enumerate() {
                    qr.iter_mut().for_each(|x| *x = 0.0);
                    qr[lay.noise_start..]
                        .iter_mut()
                        .for_each(|x| *x = sigma * normal());
                    let rec = &recipes[hh];
                    let sh = rec.shares;
                    let (c_local, ln_eff) = match &rec.local {
                        Some(t) => t.eval(pos),
                        None => (0.0, ((pos + 1) as f64).ln()),
                    };
                    // c for a component with m visible keys and share ratio r over noise
                    let strength = |share: f64, m: usize| -> f64 {
                        if share <= 0.0 || m == 0 {
                            return 0.0;
                        }
                        ((share / sh.noise).ln() + ln_eff - (m as f64).ln()).max(0.0)
                    };
                    let single = |c: f64| (c * sqrt_d / beta) as f32;
                    if rec.local.is_some() && fpairs > 0 {
                        let a = (c_local * sqrt_d / (beta_f * fpairs as f64)) as f32;
                        for (f, &(co, s)) in cs.iter().enumerate() {
                            qr[2 * f] = a * co;
                            qr[2 * f + 1] = a * s;
                        }
                    }
                    if sh.sink > 0.0 {
                        let m = plan_ref.sink_tokens.min(pos + 1);
                        qr[lay.sink] = single(strength(sh.sink, m));
                    }
                    if sh.stripes > 0.0 {
                        let m = plan_ref.stripe_count(pos + 1);
                        qr[lay.stripe] = single(strength(sh.stripes, m));
                    }
                    match rec.kind {
                        WorkloadKind::Topics => {
                            let topic = plan_ref.query_topic(hh, pos).unwrap_or(0);
                            let g = hh / group;
                            let region = plan_ref.topic_region;
                            // matching keys among 0..=pos
                            let full = (pos + 1) / region;
                            let mut m = topic_prefix[g][full * nt as usize + topic as usize]
                                as usize
                                * region;
                            if plan_ref.key_topic(g, pos) == topic {
                                m += (pos + 1) % region;
                            }
                            qr[lay.topic_start + topic as usize] = single(strength(sh.topic, m));
                        }
                        WorkloadKind::Needle => {
                            if let Some(p) = plan_ref.needle_position {
                                if pos >= plan_ref.needle_query_start && pos > p {
                                    // needle weight = share/(1−share) × background total,
                                    // background total = unplanted weight / noise share
                                    let c = (NEEDLE_SHARE / (1.0 - NEEDLE_SHARE)).ln() + ln_eff
                                        - sh.noise.ln();
                                    qr[lay.needle] = single(c.max(0.0));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        });

    Ok(Workload {
        spec: *spec,
        q,
        k,
        v,
        needle_position: plan.needle_position,
        plan,
    })
}

impl Workload {
    /// The attention shape.
    pub fn shape(&self) -> AttentionShape {
        AttentionShape::new(
            self.spec.num_heads,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        )
        .expect("the spec was validated by generate")
    }

    /// Borrows it as a uniform-batch f32 input.
    pub fn input(&self) -> AttentionInput<'_> {
        let s = &self.spec;
        AttentionInput::batched(
            &self.q,
            &self.k,
            &self.v,
            s.batch,
            s.seq_len,
            s.seq_len,
            self.shape(),
        )
        .expect("a generated workload is a valid input: validated spec, finite values")
    }

    /// An owned copy in f32.
    pub fn owned(&self) -> OwnedInput {
        OwnedInput {
            q: HostTensor::F32(self.q.clone()),
            k: HostTensor::F32(self.k.clone()),
            v: HostTensor::F32(self.v.clone()),
            shape: self.shape(),
            seqs: self.input().seqs,
            softmax_scale: None,
            return_lse: false,
        }
    }

    /// An owned copy rounded to `dtype` (bf16/f16 for the GPU paths).
    pub fn input_as(&self, dtype: DType) -> OwnedInput {
        self.owned().to_dtype(dtype)
    }

    /// q, k, v rounded to bf16.
    pub fn to_bf16(&self) -> (Vec<half::bf16>, Vec<half::bf16>, Vec<half::bf16>) {
        let c = |x: &[f32]| x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        (c(&self.q), c(&self.k), c(&self.v))
    }

    /// q, k, v rounded to f16.
    pub fn to_f16(&self) -> (Vec<half::f16>, Vec<half::f16>, Vec<half::f16>) {
        let c = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v)).collect();
        (c(&self.q), c(&self.k), c(&self.v))
    }

    /// The attention row of query `pos` of sequence `seq`, query head `head`, over keys
    /// `0..=pos`, in f64 (scale `1/sqrt(d)`). A diagnostic for tests and accuracy reports.
    pub fn attention_row(&self, seq: usize, head: usize, pos: usize) -> Vec<f64> {
        let s = &self.spec;
        let (n, d, h, hkv) = (s.seq_len, s.head_dim, s.num_heads, s.num_kv_heads);
        let g = head / (h / hkv);
        let qo = ((seq * n + pos) * h + head) * d;
        let qrow = &self.q[qo..qo + d];
        let scale = 1.0 / (d as f64).sqrt();
        let logits: Vec<f64> = (0..=pos)
            .map(|j| {
                let ko = ((seq * n + j) * hkv + g) * d;
                self.k[ko..ko + d]
                    .iter()
                    .zip(qrow)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexprefill_core::selection::js_distance;

    fn spec(kind: WorkloadKind, n: usize, d: usize) -> WorkloadSpec {
        WorkloadSpec {
            kind,
            batch: 1,
            seq_len: n,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: d,
            seed: 7,
        }
    }

    /// Mean attention of the last `rows` queries of head `head`, as a length-`n` vector.
    fn vertical(w: &Workload, head: usize, rows: usize) -> Vec<f64> {
        let n = w.spec.seq_len;
        let mut v = vec![0.0; n];
        for pos in n - rows..n {
            for (j, a) in w.attention_row(0, head, pos).into_iter().enumerate() {
                v[j] += a / rows as f64;
            }
        }
        v
    }

    #[test]
    fn deterministic_in_seed_and_sequences_differ() {
        let mut s = spec(WorkloadKind::Mixed, 300, 32);
        s.batch = 2;
        let a = generate(&s);
        let b = generate(&s);
        assert_eq!(a.q, b.q);
        assert_eq!(a.k, b.k);
        let per = 300 * 2 * 32;
        assert_ne!(a.q[..per], a.q[per..2 * per]);
        s.seed = 8;
        assert_ne!(generate(&s).q, a.q);
        assert!(a.q.iter().chain(&a.k).chain(&a.v).all(|x| x.is_finite()));
        a.input().validate().unwrap();
    }

    #[test]
    fn stripe_count_matches_positions() {
        let mut w = generate(&spec(WorkloadKind::Stripes, 200, 16));
        for (period, offset, sink) in [(8, 0, 4), (8, 3, 4), (8, 5, 4), (7, 2, 0), (3, 1, 10)] {
            w.plan.stripe_period = period;
            w.plan.stripe_offset = offset;
            w.plan.sink_tokens = sink;
            for len in 0..60 {
                assert_eq!(
                    w.plan.stripe_count(len),
                    w.plan.stripe_positions(len).len(),
                    "{period} {offset} {sink} {len}"
                );
            }
        }
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let ok = spec(WorkloadKind::SinkLocal, 100, 64);
        for bad in [
            WorkloadSpec { seq_len: 0, ..ok },
            WorkloadSpec { batch: 0, ..ok },
            WorkloadSpec {
                num_kv_heads: 3,
                ..ok
            },
            WorkloadSpec { head_dim: 8, ..ok },
            WorkloadSpec {
                seq_len: 1 << 40,
                ..ok
            },
        ] {
            assert!(try_generate(&bad).is_err(), "{bad:?}");
        }
        // random heads need no planted dims
        try_generate(&WorkloadSpec {
            kind: WorkloadKind::Random,
            head_dim: 4,
            ..ok
        })
        .unwrap();
        assert!(matches!(
            "nonsense".parse::<WorkloadKind>(),
            Err(Error::UnknownKind(_))
        ));
        for k in WorkloadKind::ALL {
            assert_eq!(k.name().parse::<WorkloadKind>().unwrap(), k);
        }
    }

    #[test]
    fn tiny_sequences_generate() {
        for kind in WorkloadKind::ALL {
            for n in [1, 2, 5, 17] {
                let w = generate(&spec(kind, n, 16));
                assert!(w.q.iter().all(|x| x.is_finite()), "{kind} {n}");
                w.input().validate().unwrap();
            }
        }
    }

    #[test]
    fn sink_local_rows_sit_on_sink_and_diagonal() {
        for d in [64, 128] {
            let w = generate(&spec(WorkloadKind::SinkLocal, 4096, d));
            for pos in [1000, 4095] {
                let row = w.attention_row(0, 0, pos);
                let sink: f64 = row[..4].iter().sum();
                let local: f64 = row[pos - 127..=pos].iter().sum();
                assert!(sink > 0.1 && sink < 0.5, "d {d} pos {pos}: sink {sink}");
                assert!(local > 0.45, "d {d} pos {pos}: local {local}");
                assert!(sink + local > 0.75, "d {d} pos {pos}: {sink} + {local}");
            }
        }
    }

    #[test]
    fn stripe_columns_carry_most_vertical_mass() {
        for d in [64, 128] {
            let w = generate(&spec(WorkloadKind::Stripes, 8192, d));
            let v = vertical(&w, 0, 64);
            let stripes: f64 = w.plan.stripe_positions(8192).iter().map(|&p| v[p]).sum();
            assert!(stripes > 0.55, "d {d}: stripe mass {stripes}");
            // and the stripes are spread: no single stripe holds a quarter of it
            let top = w
                .plan
                .stripe_positions(8192)
                .iter()
                .map(|&p| v[p])
                .fold(0.0, f64::max);
            assert!(top < 0.25 * stripes, "d {d}: one stripe {top} of {stripes}");
        }
    }

    #[test]
    fn needle_is_retrieved_by_the_last_queries_only() {
        for d in [64, 128] {
            let w = generate(&spec(WorkloadKind::Needle, 8192, d));
            let p = w.needle_position.unwrap();
            assert!((1024..4096).contains(&p), "needle at {p}");
            for pos in [8191, 8100, w.plan.needle_query_start] {
                let a = w.attention_row(0, 1, pos)[p];
                assert!(a > 0.4, "d {d}: needle weight {a} at row {pos}");
            }
            let before = w.attention_row(0, 0, w.plan.needle_query_start - 1)[p];
            assert!(
                before < 0.01,
                "d {d}: needle weight {before} before the needle rows"
            );
        }
    }

    /// True block distribution of the last `bs` queries vs the pooled estimate (Algorithm 2).
    fn pattern_distance(w: &Workload, head: usize, bs: usize) -> f32 {
        let n = w.spec.seq_len;
        let d = w.spec.head_dim;
        let nb = n.div_ceil(bs);
        let v = vertical(w, head, bs);
        let truth: Vec<f32> = v.chunks(bs).map(|c| c.iter().sum::<f64>() as f32).collect();
        let h = w.spec.num_heads;
        let g = head / (h / w.spec.num_kv_heads);
        let mut qbar = vec![0.0f64; d];
        for pos in n - bs..n {
            let o = (pos * h + head) * d;
            for (a, &x) in qbar.iter_mut().zip(&w.q[o..o + d]) {
                *a += x as f64 / bs as f64;
            }
        }
        let hkv = w.spec.num_kv_heads;
        let logits: Vec<f64> = (0..nb)
            .map(|c| {
                let (lo, hi) = (c * bs, ((c + 1) * bs).min(n));
                let mut kbar = vec![0.0f64; d];
                for j in lo..hi {
                    let o = (j * hkv + g) * d;
                    for (a, &x) in kbar.iter_mut().zip(&w.k[o..o + d]) {
                        *a += x as f64 / (hi - lo) as f64;
                    }
                }
                kbar.iter().zip(&qbar).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        let est: Vec<f32> = logits.iter().map(|l| ((l - m).exp() / z) as f32).collect();
        js_distance(&est, &truth)
    }

    #[test]
    fn topics_come_out_query_aware_and_others_do_not() {
        for d in [64, 128] {
            let mut s = spec(WorkloadKind::Mixed, 8192, d);
            s.num_heads = 5;
            s.num_kv_heads = 1;
            let w = generate(&s);
            for bs in [64, 128] {
                let topics = pattern_distance(&w, 2, bs);
                assert!(topics < 0.1, "d {d} bs {bs}: topics js {topics}");
                for head in [0, 1, 3] {
                    let js = pattern_distance(&w, head, bs);
                    assert!(js > 0.1, "d {d} bs {bs}: head {head} js {js}");
                }
            }
        }
    }

    #[test]
    fn topic_rows_attend_their_topic_and_differ_between_spans() {
        let w = generate(&spec(WorkloadKind::Topics, 4096, 64));
        let mut seen = std::collections::HashSet::new();
        for pos in [1000, 2000, 3000, 4095] {
            let topic = w.plan.query_topic(0, pos).unwrap();
            seen.insert(topic);
            let row = w.attention_row(0, 0, pos);
            let on: f64 = (0..=pos)
                .filter(|&j| w.plan.key_topic(0, j) == topic)
                .map(|j| row[j])
                .sum();
            assert!(on > 0.7, "row {pos}: topic mass {on}");
        }
        assert!(seen.len() >= 2, "spans should not all share one topic");
    }

    #[test]
    fn heads_sharing_a_kv_head_share_k_and_keep_their_kinds() {
        let mut s = spec(WorkloadKind::Mixed, 2048, 64);
        s.num_heads = 4;
        s.num_kv_heads = 1;
        let w = generate(&s);
        assert_eq!(
            w.plan.head_kinds,
            vec![
                WorkloadKind::SinkLocal,
                WorkloadKind::Stripes,
                WorkloadKind::Topics,
                WorkloadKind::Needle
            ]
        );
        let p = w.needle_position.unwrap();
        assert!(w.attention_row(0, 3, 2047)[p] > 0.4);
        assert!(w.attention_row(0, 0, 2047)[p] < 0.01);
        let sink: f64 = w.attention_row(0, 0, 2047)[..4].iter().sum();
        assert!(sink > 0.1);
    }

    #[test]
    fn random_rows_have_no_structure() {
        let w = generate(&spec(WorkloadKind::Random, 2048, 64));
        let row = w.attention_row(0, 0, 2047);
        let max = row.iter().cloned().fold(0.0, f64::max);
        assert!(max < 0.02, "max weight {max}");
    }

    /// The calibration holds at the longest context the project targets: one row each.
    #[test]
    fn planted_structure_survives_128k() {
        let n = 128 * 1024;
        let mut s = spec(WorkloadKind::Mixed, n, 64);
        s.num_heads = 4;
        s.num_kv_heads = 1;
        let w = generate(&s);
        let last = n - 1;
        let row = w.attention_row(0, 0, last);
        let sl: f64 = row[..4].iter().sum::<f64>() + row[last - 127..].iter().sum::<f64>();
        assert!(sl > 0.7, "sink+local {sl}");
        let row = w.attention_row(0, 1, last);
        let st: f64 = w.plan.stripe_positions(n).iter().map(|&p| row[p]).sum();
        assert!(st > 0.5, "stripes {st}");
        let row = w.attention_row(0, 2, last);
        let topic = w.plan.query_topic(2, last).unwrap();
        let tm: f64 = (0..n)
            .filter(|&j| w.plan.key_topic(0, j) == topic)
            .map(|j| row[j])
            .sum();
        assert!(tm > 0.7, "topic {tm}");
        let a = w.attention_row(0, 3, last)[w.needle_position.unwrap()];
        assert!(a > 0.4, "needle {a}");
    }
}
