//! A byte-mutation fuzzer for the input boundary: file readers and input constructors.
//!
//! The workspace builds on a stable toolchain, where libFuzzer's coverage instrumentation is not
//! available, so this is a coverage-blind mutator made effective by knowing the formats: it
//! starts from a corpus of valid files, and besides bit flips, truncation and splicing it
//! rewrites the places where readers trust numbers (runs of ASCII digits in headers, 8-byte
//! little-endian lengths) with boundary values (0, 1, 2³², 2⁶³, `u64::MAX`, ...). Every input
//! runs under `catch_unwind`; a panic stops the run, prints the input in hex and saves it, so it
//! can become a regression test.
//!
//! Short runs are part of `cargo test`; long runs are opt-in (`FLEXPREFILL_FUZZ_INPUTS`, see
//! `docs/TESTING.md`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Numbers that sit on the edges readers get wrong: zero, one, powers of two around the 32- and
/// 64-bit limits, and values that overflow when multiplied by an element size.
pub const BOUNDARY_NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    255,
    256,
    65535,
    65536,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX / 2 + 1,
    u64::MAX / 4 + 1,
    u64::MAX - 7,
    u64::MAX,
];

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuzzStats {
    /// Inputs executed.
    pub inputs: u64,
    /// Inputs the target accepted (returned `true` for).
    pub accepted: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Mutates corpus entries into new inputs.
pub struct Mutator {
    rng: ChaCha8Rng,
    tokens: Vec<Vec<u8>>,
}

impl Mutator {
    /// A mutator whose insertions draw from `tokens` (format keywords such as `'shape'`,
    /// `"dtype"`, `F32`) besides the boundary numbers.
    pub fn new(seed: u64, tokens: &[&[u8]]) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            tokens: tokens.iter().map(|t| t.to_vec()).collect(),
        }
    }

    /// One new input: a corpus entry (or random bytes) with 1–4 mutations stacked.
    pub fn next_input(&mut self, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut x = if corpus.is_empty() || self.rng.gen_ratio(1, 64) {
            let n = self.rng.gen_range(0..64);
            (0..n).map(|_| self.rng.gen()).collect()
        } else {
            corpus[self.rng.gen_range(0..corpus.len())].clone()
        };
        for _ in 0..self.rng.gen_range(1..=4) {
            self.mutate(&mut x, corpus);
        }
        x
    }

    fn number_text(&mut self) -> Vec<u8> {
        let v = BOUNDARY_NUMBERS[self.rng.gen_range(0..BOUNDARY_NUMBERS.len())];
        let v = match self.rng.gen_range(0..4) {
            0 => v.wrapping_add(1),
            1 => v.wrapping_sub(1),
            _ => v,
        };
        if self.rng.gen_ratio(1, 8) {
            format!("-{v}").into_bytes()
        } else {
            v.to_string().into_bytes()
        }
    }

    fn mutate(&mut self, x: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        let len = x.len();
        match self.rng.gen_range(0..10) {
            // flip a bit
            0 if len > 0 => {
                let i = self.rng.gen_range(0..len);
                x[i] ^= 1 << self.rng.gen_range(0..8);
            }
            // an interesting byte
            1 if len > 0 => {
                let i = self.rng.gen_range(0..len);
                const B: &[u8] = b"\x00\xff\x7f\x80,()[]{}:'\"0123456789 L-.eE";
                x[i] = B[self.rng.gen_range(0..B.len())];
            }
            // delete a range
            2 if len > 0 => {
                let a = self.rng.gen_range(0..len);
                let b = self.rng.gen_range(a..=len.min(a + 16));
                x.drain(a..b);
            }
            // duplicate a range
            3 if len > 0 => {
                let a = self.rng.gen_range(0..len);
                let b = self.rng.gen_range(a..=len.min(a + 16));
                let piece = x[a..b].to_vec();
                let at = self.rng.gen_range(0..=len);
                x.splice(at..at, piece);
            }
            // truncate
            4 if len > 0 => x.truncate(self.rng.gen_range(0..len)),
            // replace a run of ASCII digits with a boundary number
            5 | 6 => {
                let starts: Vec<usize> = (0..len)
                    .filter(|&i| x[i].is_ascii_digit() && (i == 0 || !x[i - 1].is_ascii_digit()))
                    .collect();
                if starts.is_empty() {
                    return;
                }
                let a = starts[self.rng.gen_range(0..starts.len())];
                let b = (a..len).find(|&i| !x[i].is_ascii_digit()).unwrap_or(len);
                let n = self.number_text();
                x.splice(a..b, n);
            }
            // a little-endian 8- or 4-byte boundary value
            7 if len > 0 => {
                let v = BOUNDARY_NUMBERS[self.rng.gen_range(0..BOUNDARY_NUMBERS.len())];
                let w = if self.rng.gen() { 8 } else { 4 };
                let i = if self.rng.gen() {
                    0
                } else {
                    self.rng.gen_range(0..len)
                };
                for (k, b) in v.to_le_bytes()[..w].iter().enumerate() {
                    if let Some(slot) = x.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
            // insert a format token
            8 if !self.tokens.is_empty() => {
                let t = self.tokens[self.rng.gen_range(0..self.tokens.len())].clone();
                let at = self.rng.gen_range(0..=len);
                x.splice(at..at, t);
            }
            // splice with another corpus entry
            9 if !corpus.is_empty() => {
                let other = &corpus[self.rng.gen_range(0..corpus.len())];
                let cut = self.rng.gen_range(0..=len);
                let from = self.rng.gen_range(0..=other.len());
                x.truncate(cut);
                x.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
}

/// Number of inputs for a fuzz run: `FLEXPREFILL_FUZZ_INPUTS` if set, else `default`.
pub fn inputs_from_env(default: u64) -> u64 {
    std::env::var("FLEXPREFILL_FUZZ_INPUTS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Reads every file of a corpus directory (sorted by name, so runs are reproducible).
pub fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("readable corpus entry").path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// Runs `target` on `inputs` mutated inputs (the corpus entries themselves first). `target`
/// returns whether it accepted the input; any panic fails the run, after the input has been
/// written to `target/fuzz-crashes/<name>-<seed>-<n>.bin` and printed in hex.
pub fn run(
    name: &str,
    corpus: &[Vec<u8>],
    tokens: &[&[u8]],
    inputs: u64,
    seed: u64,
    mut target: impl FnMut(&[u8]) -> bool,
) -> FuzzStats {
    let start = Instant::now();
    let mut mutator = Mutator::new(seed, tokens);
    let mut accepted = 0;
    let mut crash = None;
    for n in 0..inputs {
        let input = match corpus.get(n as usize) {
            Some(seed_input) => seed_input.clone(),
            None => mutator.next_input(corpus),
        };
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                crash = Some((n, input, msg));
                break;
            }
        }
    }
    if let Some((n, input, msg)) = crash {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
        let file = dir.join(format!("{name}-{seed}-{n}.bin"));
        let saved = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&file, &input))
            .map_or_else(
                |e| format!("not saved: {e}"),
                |_| file.display().to_string(),
            );
        let hex: String = input.iter().take(512).map(|b| format!("{b:02x}")).collect();
        panic!(
            "fuzz target {name} panicked on input {n} of seed {seed} ({} bytes, {saved}): {msg}\nhex: {hex}",
            input.len()
        );
    }
    let stats = FuzzStats {
        inputs,
        accepted,
        elapsed: start.elapsed(),
    };
    eprintln!(
        "fuzz {name}: {} inputs, {} accepted, 0 panics, {:.1} s (seed {seed})",
        stats.inputs,
        stats.accepted,
        stats.elapsed.as_secs_f64()
    );
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_runs_become_boundary_numbers() {
        let corpus = vec![b"{'shape': (12, 34), }".to_vec()];
        let mut m = Mutator::new(1, &[]);
        let seen_big = (0..2000).any(|_| {
            let x = m.next_input(&corpus);
            String::from_utf8_lossy(&x).contains("18446744073709551615")
        });
        assert!(seen_big);
    }

    #[test]
    fn a_panicking_target_fails_the_run_with_its_input() {
        let corpus = vec![b"ok".to_vec()];
        let r = catch_unwind(|| {
            run("selftest", &corpus, &[], 1000, 0, |x| {
                assert!(x != b"ok".as_slice() || x.len() == 2);
                assert!(x.len() < 3, "long input");
                true
            })
        });
        let msg = r.expect_err("the target panics on a long input");
        let msg = msg.downcast_ref::<String>().expect("formatted message");
        assert!(msg.contains("long input") && msg.contains("hex: "), "{msg}");
    }
}
