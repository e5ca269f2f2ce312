//! The `flexprefill` binary end to end: every test runs the real executable on files it writes
//! itself (small sizes, so the suite stays fast on two cores), and checks stdout, stderr, the
//! exit code and the files written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flexprefill"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .output()
        .expect("the flexprefill binary starts")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed ({:?}): {}",
        o.status,
        stderr(&o)
    );
    o
}

fn json(args: &[&str]) -> Value {
    let o = ok(args);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {args:?} is not one JSON object ({e}): {}",
            stdout(&o)
        )
    })
}

/// Asserts the error contract: exit code 2, nothing on stdout, exactly one line on stderr that
/// contains `needle`, no panic or backtrace.
fn fails_with(args: &[&str], needle: &str) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        o.stdout.is_empty(),
        "{args:?} wrote to stdout: {}",
        stdout(&o)
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(err.starts_with("flexprefill: error: "), "{err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: expected '{needle}' in: {err}"
    );
    err
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Deterministic pseudo-random values in [-1, 1) (no RNG crate needed).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

struct T {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32_tensor(name: &'static str, shape: &[usize], seed: u64) -> T {
    let n = shape.iter().product();
    T {
        name,
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: f32_bytes(&values(n, seed)),
    }
}

fn write_st(path: &Path, tensors: &[T]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|t| {
            (
                t.name,
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

/// A uniform q/k/v file: `[b, n, h, d]` and `[b, n, hkv, d]`.
fn qkv_file(path: &Path, b: usize, n: usize, h: usize, hkv: usize, d: usize) {
    qkv_shapes(path, &[b, n, h, d], &[b, n, hkv, d], &[b, n, hkv, d]);
}

/// f32 tensors q, k, v of any shapes (seeds 1, 2, 3), for the shape errors.
fn qkv_shapes(path: &Path, q: &[usize], k: &[usize], v: &[usize]) {
    write_st(
        path,
        &[
            f32_tensor("q", q, 1),
            f32_tensor("k", k, 2),
            f32_tensor("v", v, 3),
        ],
    );
}

/// Tensors of a safetensors file by name: dtype, shape, values widened to f32.
type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<f32>)>;

fn read_st(path: &Path) -> (Tensors, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let vals = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("unexpected dtype {other:?}"),
        };
        out.insert(name, (view.dtype(), view.shape().to_vec(), vals));
    }
    (out, meta.metadata().clone())
}

fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Causal attention in f64, straight from the definition (GQA: head h reads kv head
/// h / (h_q / h_kv)), `[b, n, h, d]` out.
fn naive_attention(q: &[f32], k: &[f32], v: &[f32], dims: [usize; 5]) -> Vec<f64> {
    let [b, n, h, hkv, d] = dims;
    naive_chunked_attention(q, k, v, [b, n, n, h, hkv, d])
}

/// The same with `nq ≤ nk` queries that are the last `nq` positions (bottom-right causal):
/// query `i` sees keys `0..=nk - nq + i`.
fn naive_chunked_attention(q: &[f32], k: &[f32], v: &[f32], dims: [usize; 6]) -> Vec<f64> {
    let [b, n, nk, h, hkv, d] = dims;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; b * n * h * d];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / (h / hkv);
            for i in 0..n {
                let qi = &q[((bi * n + i) * h + hi) * d..][..d];
                let logits: Vec<f64> = (0..=nk - n + i)
                    .map(|j| {
                        let kj = &k[((bi * nk + j) * hkv + g) * d..][..d];
                        scale
                            * qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let o = &mut out[((bi * n + i) * h + hi) * d..][..d];
                for (j, wj) in w.iter().enumerate() {
                    let vj = &v[((bi * nk + j) * hkv + g) * d..][..d];
                    for (o, x) in o.iter_mut().zip(vj) {
                        *o += wj / z * *x as f64;
                    }
                }
            }
        }
    }
    out
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let r: f64 = want.iter().map(|b| b * b).sum();
    (e / r).sqrt()
}

// Small sparse-capable settings: blocks of 16 tokens and a 32-token minimum budget, so a
// 512-token sequence has 32 query blocks and real selection (not the dense fallback).
const SMALL: [&str; 4] = ["--block-size", "16", "--min-budget", "32"];

#[test]
fn synth_writes_the_workload_with_its_spec() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("needle.safetensors");
    // Run twice below: the same spec must give the same bytes.
    let spec = [
        "synth",
        "--kind",
        "needle",
        "--seq",
        "256",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dim",
        "32",
        "--seed",
        "7",
        "--batch",
        "2",
        "--dtype",
        "f16",
        "--out",
    ];
    let o = ok(&[&spec[..], &[p(&f)]].concat());
    assert!(stdout(&o).contains("wrote"), "{}", stdout(&o));
    let (t, meta) = read_st(&f);
    assert_eq!(t["q"].0, Dtype::F16);
    assert_eq!(t["q"].1, vec![2, 256, 4, 32]);
    assert_eq!(t["k"].1, vec![2, 256, 2, 32]);
    assert_eq!(t["v"].1, vec![2, 256, 2, 32]);
    assert!(t["q"].2.iter().all(|x| x.is_finite()));
    let meta = meta.expect("synth writes its spec as metadata");
    assert_eq!(meta["kind"], "needle");
    assert_eq!(meta["seed"], "7");
    // Same seed, same bytes: reports are reproducible.
    let g = dir.path().join("again.safetensors");
    ok(&[&spec[..], &[p(&g)]].concat());
    assert!(
        std::fs::read(&f).unwrap() == std::fs::read(&g).unwrap(),
        "the same spec must give the same bytes"
    );
}

#[test]
fn run_json_has_every_key_and_consistent_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mixed.safetensors");
    ok(&[
        "synth",
        "--kind",
        "mixed",
        "--seq",
        "512",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dim",
        "32",
        "--out",
        p(&f),
    ]);
    let mut args = vec![
        "run",
        "--input",
        p(&f),
        "--json",
        "--compare-dense",
        "--backend",
        "cpu",
    ];
    args.extend(SMALL);
    let j = json(&args);
    for key in [
        "schema_version",
        "backend",
        "backend_reason",
        "input",
        "dtype",
        "batch",
        "seq_len",
        "kv_len",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "config",
        "heads",
        "density",
        "dense_fallback",
        "timings_ms",
        "rel_l2_vs_dense",
        "max_abs_vs_dense",
        "mass_captured",
        "rows_below_gamma",
    ] {
        assert!(j.get(key).is_some(), "missing top-level key {key}: {j}");
    }
    assert_eq!(j["backend"], "cpu");
    assert_eq!(j["dtype"], "f32");
    assert_eq!(
        (
            j["batch"].as_u64(),
            j["seq_len"].as_u64(),
            j["num_heads"].as_u64()
        ),
        (Some(1), Some(512), Some(4))
    );
    assert_eq!(
        (j["num_kv_heads"].as_u64(), j["head_dim"].as_u64()),
        (Some(2), Some(32))
    );
    let c = &j["config"];
    for key in [
        "gamma",
        "tau",
        "block_size",
        "min_budget",
        "max_budget",
        "query_aware_cut",
        "forced_sink",
        "forced_diagonal",
        "selection",
        "softmax_scale",
    ] {
        assert!(c.get(key).is_some(), "missing config key {key}: {c}");
    }
    assert_eq!(c["block_size"], 16);
    assert_eq!(c["selection"], "faithful");
    assert!((c["softmax_scale"].as_f64().unwrap() - 1.0 / 32f64.sqrt()).abs() < 1e-6);
    assert_eq!(j["schema_version"], 2);
    assert_eq!(j["timings_ms"]["clock"], "host");
    // The CPU has no transfers: null, not 0.
    assert!(j["timings_ms"]["upload"].is_null(), "{j}");
    for key in [
        "pattern_search",
        "index_build",
        "attention",
        "compute",
        "total",
        "dense",
        "dense_total",
    ] {
        assert!(
            j["timings_ms"][key].as_f64().is_some_and(|t| t >= 0.0),
            "timings_ms.{key}"
        );
    }

    let heads = j["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 4);
    let (mut sel, mut causal) = (0u64, 0u64);
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(
            (h["batch"].as_u64(), h["head"].as_u64()),
            (Some(0), Some(i as u64))
        );
        let pattern = h["pattern"].as_str().unwrap();
        assert!(
            ["query_aware", "vertical_slash"].contains(&pattern),
            "{pattern}"
        );
        // the key is there for every head, null for a sparse one
        assert!(
            h["dense_reason"].is_null() && h.get("dense_reason").is_some(),
            "{h}"
        );
        let (s, c) = (
            h["selected_blocks"].as_u64().unwrap(),
            h["causal_blocks"].as_u64().unwrap(),
        );
        // 32 query blocks of 16 tokens: 32·33/2 causal blocks.
        assert_eq!(c, 528);
        assert!(s >= 32 && s <= c, "{s}");
        assert!((h["density"].as_f64().unwrap() - s as f64 / c as f64).abs() < 1e-12);
        let m = h["mass_captured"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&m), "{m}");
        assert!(h["min_mass_captured"].as_f64().unwrap() <= m + 1e-12);
        let below = h["rows_below_gamma"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&below));
        assert!(h["rel_l2_vs_dense"].as_f64().unwrap() >= 0.0);
        assert!(h["max_abs_vs_dense"].as_f64().unwrap() <= j["max_abs_vs_dense"].as_f64().unwrap());
        sel += s;
        causal += c;
    }
    assert!((j["density"].as_f64().unwrap() - sel as f64 / causal as f64).abs() < 1e-12);
    assert!(
        j["density"].as_f64().unwrap() < 1.0,
        "512 tokens with 16-token blocks should be sparse"
    );
}

#[test]
fn output_round_trips_and_matches_naive_attention() {
    // batch 2, GQA 4:2, 80 tokens: with the default 128-token blocks this is the dense
    // fallback, so `o` must be exact causal attention.
    let dir = tempfile::tempdir().unwrap();
    let (b, n, h, hkv, d) = (2, 80, 4, 2, 16);
    let f = dir.path().join("x.safetensors");
    qkv_file(&f, b, n, h, hkv, d);
    let out = dir.path().join("o.safetensors");
    let j = json(&[
        "run",
        "--input",
        p(&f),
        "--output",
        p(&out),
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(j["dense_fallback"].is_string(), "{j}");
    // A dense call ran no pattern search and no index build: null, never a 0 measurement.
    let t = &j["timings_ms"];
    assert!(
        t["pattern_search"].is_null() && t["index_build"].is_null(),
        "{t}"
    );
    assert!(t["attention"].as_f64().is_some(), "{t}");
    assert!(j["heads"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["pattern"] == "dense" && h["dense_reason"] == "call_ran_dense"));
    let text = stdout(&ok(&["run", "--input", p(&f), "--backend", "cpu"]));
    assert!(!text.contains("pattern search"), "{text}");
    assert!(
        text.contains("dense_reason") && text.contains("call_ran_dense"),
        "{text}"
    );
    let (t, _) = read_st(&out);
    let (dtype, shape, o) = &t["o"];
    assert_eq!((*dtype, shape.clone()), (Dtype::F32, vec![b, n, h, d]));
    let (inp, _) = read_st(&f);
    let want = naive_attention(&inp["q"].2, &inp["k"].2, &inp["v"].2, [b, n, h, hkv, d]);
    let e = rel_l2(o, &want);
    assert!(e < 1e-5, "rel_l2 vs naive attention {e}");

    // The same run through .npy in and out gives the same numbers.
    let paths: Vec<PathBuf> = ["q", "k", "v"]
        .iter()
        .map(|name| {
            let path = dir.path().join(format!("{name}.npy"));
            let (_, shape, vals) = &inp[*name];
            std::fs::write(&path, npy_bytes("<f4", shape, &f32_bytes(vals))).unwrap();
            path
        })
        .collect();
    let out_npy = dir.path().join("o.npy");
    ok(&[
        "run",
        "--q",
        p(&paths[0]),
        "--k",
        p(&paths[1]),
        "--v",
        p(&paths[2]),
        "--output",
        p(&out_npy),
        "--backend",
        "cpu",
    ]);
    let bytes = std::fs::read(&out_npy).unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY"));
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("(2, 80, 4, 16)"),
        "{header}"
    );
    let o_npy: Vec<f32> = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(&o_npy, o);
}

#[test]
fn chunked_prefill_dump_is_bottom_right_causal() {
    // 48 new queries over 112 keys (a chunk of a longer prefill), 2 sequences, GQA 2:1.
    let dir = tempfile::tempdir().unwrap();
    let (b, nq, nk, h, hkv, d) = (2, 48, 112, 2, 1, 16);
    let f = dir.path().join("chunk.safetensors");
    write_st(
        &f,
        &[
            f32_tensor("q", &[b, nq, h, d], 4),
            f32_tensor("k", &[b, nk, hkv, d], 5),
            f32_tensor("v", &[b, nk, hkv, d], 6),
        ],
    );
    let out = dir.path().join("o.safetensors");
    let j = json(&[
        "run",
        "--input",
        p(&f),
        "--output",
        p(&out),
        "--json",
        "--backend",
        "cpu",
    ]);
    assert_eq!(
        (j["seq_len"].as_u64(), j["kv_len"].as_u64()),
        (Some(48), Some(112))
    );
    let (inp, _) = read_st(&f);
    let (t, _) = read_st(&out);
    assert_eq!(t["o"].1, vec![b, nq, h, d]);
    let want = naive_chunked_attention(
        &inp["q"].2,
        &inp["k"].2,
        &inp["v"].2,
        [b, nq, nk, h, hkv, d],
    );
    let e = rel_l2(&t["o"].2, &want);
    assert!(e < 1e-5, "rel_l2 vs bottom-right causal attention {e}");
}

#[test]
fn compare_dense_numbers_match_an_independent_dense() {
    // Sparse run with real selection; the JSON's overall rel_l2 must be the error of the
    // written output against attention computed here from the definition.
    let dir = tempfile::tempdir().unwrap();
    let (n, h, hkv, d) = (384, 4, 2, 32);
    let f = dir.path().join("s.safetensors");
    ok(&[
        "synth",
        "--kind",
        "stripes",
        "--seq",
        "384",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dim",
        "32",
        "--out",
        p(&f),
    ]);
    let out = dir.path().join("o.safetensors");
    let mut args = vec![
        "run",
        "--input",
        p(&f),
        "--output",
        p(&out),
        "--json",
        "--compare-dense",
        "--backend",
        "cpu",
        "--gamma",
        "0.8",
    ];
    args.extend(SMALL);
    let j = json(&args);
    let (inp, _) = read_st(&f);
    let (t, _) = read_st(&out);
    let want = naive_attention(&inp["q"].2, &inp["k"].2, &inp["v"].2, [1, n, h, hkv, d]);
    let e = rel_l2(&t["o"].2, &want);
    let reported = j["rel_l2_vs_dense"].as_f64().unwrap();
    assert!(
        (e - reported).abs() <= 1e-4 + 1e-3 * e,
        "computed {e}, reported {reported}"
    );
    let max_abs = t["o"]
        .2
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    let reported = j["max_abs_vs_dense"].as_f64().unwrap();
    assert!(
        (max_abs - reported).abs() <= 1e-4,
        "computed {max_abs}, reported {reported}"
    );
    // The oracle density on the CPU: a fraction, the every-row one at least as large, and
    // the overall value the block-weighted mean of the heads' (all heads have equal causal
    // blocks here).
    let o = j["oracle_density"].as_f64().unwrap();
    let every = j["oracle_density_every_row"].as_f64().unwrap();
    assert!(o > 0.0 && o <= every && every <= 1.0, "{o} {every}");
    let heads = j["heads"].as_array().unwrap();
    let mean: f64 = heads
        .iter()
        .map(|h| h["oracle_density"].as_f64().unwrap())
        .sum::<f64>()
        / heads.len() as f64;
    assert!((mean - o).abs() < 1e-12, "{mean} vs {o}");
    assert!(j.get("oracle_note").is_none());
}

#[test]
fn bf16_and_f16_inputs_keep_their_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for dt in ["bf16", "f16"] {
        let f = dir.path().join(format!("{dt}.safetensors"));
        ok(&[
            "synth",
            "--kind",
            "local",
            "--seq",
            "200",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--dim",
            "16",
            "--dtype",
            dt,
            "--out",
            p(&f),
        ]);
        let out = dir.path().join(format!("o_{dt}.safetensors"));
        let j = json(&[
            "run",
            "--input",
            p(&f),
            "--output",
            p(&out),
            "--json",
            "--backend",
            "cpu",
        ]);
        assert_eq!(j["dtype"], dt);
        let (t, _) = read_st(&out);
        let want = if dt == "bf16" {
            Dtype::BF16
        } else {
            Dtype::F16
        };
        assert_eq!((t["o"].0, t["o"].1.clone()), (want, vec![1, 200, 2, 16]));
    }
}

#[test]
fn mask_png_writes_readable_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.safetensors");
    ok(&[
        "synth",
        "--kind",
        "mixed",
        "--seq",
        "512",
        "--heads",
        "3",
        "--kv-heads",
        "1",
        "--dim",
        "32",
        "--out",
        p(&f),
    ]);
    let pics = dir.path().join("pics");
    let mut args = vec![
        "run",
        "--input",
        p(&f),
        "--compare-dense",
        "--backend",
        "cpu",
        "--mask-png",
        p(&pics),
    ];
    args.extend(SMALL);
    let o = ok(&args);
    assert!(stdout(&o).contains("wrote 4 PNG files"), "{}", stdout(&o));
    for name in [
        "mask_b0_h0.png",
        "mask_b0_h1.png",
        "mask_b0_h2.png",
        "density.png",
    ] {
        let bytes = std::fs::read(pics.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let (w, h) = (info.width as usize, info.height as usize);
        assert!(w >= 500 && h >= 250, "{name}: {w}×{h}");
        let px: Vec<[u8; 3]> = buf[..w * h * 3]
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        let distinct: std::collections::HashSet<_> = px.iter().collect();
        assert!(distinct.len() > 20, "{name}: {} colours", distinct.len());
        // Text (title, axes, legend) leaves dark anti-aliased ink.
        let ink = px.iter().filter(|p| p.iter().all(|&c| c < 80)).count();
        assert!(ink > 500, "{name}: {ink} ink pixels");
        if name.starts_with("mask") {
            // 32×32 blocks at 22 px: the computed-block blue covers a real share of the plot.
            let blue = px.iter().filter(|p| **p == [31, 78, 156]).count();
            assert!(blue > 32 * 22 * 22, "{name}: {blue} computed-block pixels");
            let skipped = px.iter().filter(|p| **p == [224, 229, 236]).count();
            assert!(skipped > 0, "{name}: the mask should skip some blocks");
        }
    }
}

#[test]
fn demo_runs_small_and_reports_the_backend() {
    let j = json(&[
        "demo",
        "--seq",
        "1024",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dim",
        "32",
        "--json",
        "--block-size",
        "32",
        "--min-budget",
        "64",
    ]);
    assert!(
        j["backend_reason"].as_str().unwrap().starts_with("auto"),
        "{j}"
    );
    assert_eq!(j["heads"].as_array().unwrap().len(), 4);
    assert!(j["timings_ms"]["dense"].as_f64().is_some());
    // The errors it reports are bounded. Per row, sparse attention that captures a share m of
    // the row's attention differs from dense by at most 2·(1 − m)·max|v| in any element (the
    // paper's Appendix A); the demo's v is a unit-variance sample of 65k values, so max|v| < 8.
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    let mut worst = 0.0f64;
    for h in j["heads"].as_array().unwrap() {
        let (max_abs, min_mass) = (f(h, "max_abs_vs_dense"), f(h, "min_mass_captured"));
        assert!(
            (0.0..=1.0).contains(&min_mass) && min_mass <= f(h, "mass_captured"),
            "{h}"
        );
        assert!(max_abs <= 2.0 * (1.0 - min_mass) * 8.0, "{h}");
        assert!((0.0..=1.0).contains(&f(h, "rows_below_gamma")), "{h}");
        worst = worst.max(max_abs);
    }
    assert_eq!(
        f(&j, "max_abs_vs_dense"),
        worst,
        "the overall max is the heads' max"
    );
    // Faithful gamma 0.9 keeps most of every row's mass: the mixed workload measures ~0.08;
    // 0.3 leaves room for other backends' rounding, not for a wrong block or a lost row.
    let rel_l2 = f(&j, "rel_l2_vs_dense");
    assert!(0.0 < rel_l2 && rel_l2 < 0.3, "rel_l2 {rel_l2}");
    assert!(f(&j, "density") < 1.0, "the demo is sparse at this size");
    let o = ok(&[
        "demo",
        "--seq",
        "512",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--dim",
        "16",
    ]);
    let text = stdout(&o);
    assert!(
        text.contains("backend") && text.contains("speed-up"),
        "{text}"
    );
}

#[test]
fn help_and_version() {
    let o = ok(&["--help"]);
    for cmd in ["demo", "run", "synth"] {
        assert!(stdout(&o).contains(cmd));
    }
    let o = ok(&["--version"]);
    assert_eq!(
        stdout(&o),
        format!("flexprefill {}\n", env!("CARGO_PKG_VERSION"))
    );
    let o = ok(&["run", "--help"]);
    for flag in [
        "--compare-dense",
        "--mask-png",
        "--selection",
        "--q-name",
        "--backend",
    ] {
        assert!(stdout(&o).contains(flag), "{flag}");
    }
}

// ----- every bad input: exit 2, one line, no panic -----

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    qkv_file(&f, 1, 64, 2, 1, 16);
    let e = fails_with(
        &["run", "--input", p(&f), "--k-name", "keys"],
        "no tensor named 'keys'",
    );
    assert!(e.contains("k, q, v"), "lists the names it has: {e}");
}

#[test]
fn missing_file() {
    fails_with(
        &["run", "--input", "/definitely/not/here.safetensors"],
        "cannot read",
    );
}

#[test]
fn wrong_rank() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    qkv_shapes(&f, &[64, 32], &[64, 32], &[64, 32]);
    fails_with(&["run", "--input", p(&f)], "rank 2");
}

#[test]
fn mismatched_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kv.safetensors");
    qkv_shapes(&f, &[1, 64, 2, 16], &[1, 64, 1, 16], &[1, 63, 1, 16]);
    fails_with(
        &["run", "--input", p(&f)],
        "k and v must have the same shape",
    );
    let g = dir.path().join("gqa.safetensors");
    qkv_shapes(&g, &[1, 64, 3, 16], &[1, 64, 2, 16], &[1, 64, 2, 16]);
    fails_with(
        &["run", "--input", p(&g)],
        "num_heads (3) is not a multiple of num_kv_heads (2)",
    );
    let h = dir.path().join("dim.safetensors");
    qkv_shapes(&h, &[1, 64, 2, 16], &[1, 64, 2, 8], &[1, 64, 2, 8]);
    fails_with(&["run", "--input", p(&h)], "head_dim differs");
}

#[test]
fn unsupported_dtype() {
    let dir = tempfile::tempdir().unwrap();
    // q of shape [1, 64, 2, 16] stored as `dtype` (zeros, `width` bytes each), k and v as f32.
    let with_q = |file: &str, dtype: Dtype, width: usize| {
        let f = dir.path().join(file);
        let shape = [1, 64, 2, 16];
        let q = T {
            name: "q",
            dtype,
            shape: shape.to_vec(),
            data: vec![0u8; shape.iter().product::<usize>() * width],
        };
        write_st(
            &f,
            &[q, f32_tensor("k", &shape, 2), f32_tensor("v", &shape, 3)],
        );
        f
    };
    fails_with(
        &["run", "--input", p(&with_q("x.safetensors", Dtype::F64, 8))],
        "dtype F64",
    );
    fails_with(
        &[
            "run",
            "--input",
            p(&with_q("mixed.safetensors", Dtype::F16, 2)),
        ],
        "must share a dtype",
    );
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    qkv_file(&f, 1, 64, 2, 1, 16);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    fails_with(&["run", "--input", p(&f)], "truncated");
    std::fs::write(&f, &bytes[..20]).unwrap();
    fails_with(&["run", "--input", p(&f)], "truncated");
    std::fs::write(&f, b"not a tensor file at all, just text").unwrap();
    fails_with(&["run", "--input", p(&f)], "safetensors");
    let q = dir.path().join("q.npy");
    let full = npy_bytes("<f4", &[1, 64, 2, 16], &f32_bytes(&values(64 * 32, 1)));
    std::fs::write(&q, &full[..full.len() - 4]).unwrap();
    fails_with(
        &["run", "--q", p(&q), "--k", p(&q), "--v", p(&q)],
        "truncated .npy data",
    );
}

#[test]
fn nan_or_inf_inside() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    let mut q = values(64 * 2 * 16, 1);
    q[(5 * 2 + 1) * 16 + 3] = f32::NAN;
    write_st(
        &f,
        &[
            T {
                name: "q",
                dtype: Dtype::F32,
                shape: vec![1, 64, 2, 16],
                data: f32_bytes(&q),
            },
            f32_tensor("k", &[1, 64, 2, 16], 2),
            f32_tensor("v", &[1, 64, 2, 16], 3),
        ],
    );
    fails_with(
        &["run", "--input", p(&f)],
        "non-finite value (NaN) at [batch 0, token 5, head 1, dim 3]",
    );
    let mut v = values(64 * 2 * 16, 3);
    v[0] = f32::INFINITY;
    write_st(
        &f,
        &[
            f32_tensor("q", &[1, 64, 2, 16], 1),
            f32_tensor("k", &[1, 64, 2, 16], 2),
            T {
                name: "v",
                dtype: Dtype::F32,
                shape: vec![1, 64, 2, 16],
                data: f32_bytes(&v),
            },
        ],
    );
    fails_with(
        &["run", "--input", p(&f)],
        "v (tensor 'v') has a non-finite value (inf)",
    );
}

#[test]
fn bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    qkv_file(&f, 1, 64, 2, 1, 16);
    fails_with(
        &["run", "--input", p(&f), "--gamma", "0"],
        "gamma (0) must be in (0, 1]",
    );
    fails_with(
        &["run", "--input", p(&f), "--block-size", "96"],
        "block_size (96)",
    );
    fails_with(
        &["run", "--input", p(&f), "--softmax-scale=-1"],
        "softmax_scale",
    );
    fails_with(
        &[
            "synth",
            "--kind",
            "local",
            "--seq",
            "64",
            "--heads",
            "3",
            "--kv-heads",
            "2",
            "--out",
            p(&dir.path().join("s.safetensors")),
        ],
        "multiple",
    );
}

#[test]
fn cuda_backend_without_a_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    qkv_file(&f, 1, 64, 2, 1, 16);
    let o = run(&["run", "--input", p(&f), "--backend", "cuda", "--json"]);
    if o.status.success() {
        // A machine with a usable GPU: the report must say so.
        let j: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["backend"], "cuda");
    } else {
        fails_with(
            &["run", "--input", p(&f), "--backend", "cuda"],
            "--backend cuda: no usable GPU",
        );
        // auto falls back and says why.
        let j = json(&["run", "--input", p(&f), "--json"]);
        assert_eq!(j["backend"], "cpu");
        assert!(
            j["backend_reason"]
                .as_str()
                .unwrap()
                .contains("no usable GPU"),
            "{j}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["run"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["run", "--input", "a", "--q", "b"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["synth", "--kind", "spirals", "--seq", "8", "--out", "x"]);
    assert_eq!(o.status.code(), Some(2));
}
