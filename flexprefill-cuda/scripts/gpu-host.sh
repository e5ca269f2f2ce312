#!/bin/bash
# GPU check of the host API, the dense-or-sparse rule, event timings, the persistent kernel
# cache and the raw-pointer entry, in ONE device call. Everything runs from binaries in the
# git-ignored .gpu-host/ folder at the repository root (the GPU machine has no Rust toolchain
# and no ../shared/ beside the repository). Build and copy them first, from the repository root:
#
#   cargo test --release -p flexprefill-cuda --no-run
#   cargo build --release -p flexprefill-cli
#   cargo build --release -p flexprefill-cuda --example host_vs_device
#   mkdir -p .gpu-host
#   cp "$(ls -t target/release/deps/gpu_host-* | grep -v '\.d$' | head -1)" .gpu-host/gpu_host
#   cp "$(ls -t target/release/deps/flexprefill_cuda-* | grep -v '\.d$' | head -1)" .gpu-host/cuda_lib_tests
#   cp target/release/flexprefill .gpu-host/flexprefill
#   cp target/release/examples/host_vs_device .gpu-host/host_vs_device
#   cp ../shared/data/smollm2-135m-L10-4k.safetensors .gpu-host/
#
# then run `bash flexprefill-cuda/scripts/gpu-host.sh` with `.gpu-host` carried. Logs go to
# $OUT; the summary is printed. About 4 minutes on an H200 (first demo compiles every kernel).
set -u
OUT=${OUT:-/tmp/gpu-host}; mkdir -p "$OUT"
B=.gpu-host
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# A fresh cache folder, so the first process compiles and the second one loads.
export FLEXPREFILL_CACHE_DIR="$OUT/kcache"; rm -rf "$FLEXPREFILL_CACHE_DIR"
s=$(date +%s)
since() { echo $(( $(date +%s) - s ))s; }
# Runs a command and prints its wall time to stderr (no /usr/bin/time needed).
wall() { local a; a=$(date +%s%N); "$@"; local r=$?; echo "process wall $(( ($(date +%s%N) - a) / 1000000 )) ms" >&2; return $r; }

echo "== 1. GPU tests (host API == device call, 4k dense, f32 path, raw entry, kernel cache)"
timeout 150 $B/gpu_host --include-ignored --test-threads 1 --nocapture > "$OUT/gpu_host.log" 2>&1
echo "rc=$? ($(since)): $(grep '^test result' "$OUT/gpu_host.log")"
grep -E "^test |FAILED|panicked|first call|timings" "$OUT/gpu_host.log" | tail -12

echo "== 2. demo --backend cuda, first process (empty kernel cache: NVRTC compiles)"
rm -rf "$FLEXPREFILL_CACHE_DIR"
wall $B/flexprefill demo --backend cuda > "$OUT/demo1.txt" 2> "$OUT/demo1.err"
echo "rc=$? ($(since))"; cat "$OUT/demo1.txt" | grep -E "^backend|^note|^density|^time|transfers|warm-up"; tail -1 "$OUT/demo1.err"
ls "$FLEXPREFILL_CACHE_DIR" | wc -l | sed 's/^/cache entries written: /'

echo "== 3. demo --backend cuda --json, second process (warm kernel cache)"
wall $B/flexprefill demo --backend cuda --json > "$OUT/demo2.json" 2> "$OUT/demo2.err"
echo "rc=$? ($(since))"; tail -1 "$OUT/demo2.err"
python3 -c "import json;t=json.load(open('$OUT/demo2.json'))['timings_ms'];print('second process: warm-up (first FlexPrefill + dense call, cache loads included)', t.get('warmup'), 'ms; timings', t)"

echo "== 4. same demo with the cache off: same decisions and errors"
FLEXPREFILL_CACHE=off $B/flexprefill demo --backend cuda --json > "$OUT/demo_off.json" 2> "$OUT/demo_off.err"
echo "rc=$? ($(since))"
python3 - "$OUT/demo2.json" "$OUT/demo_off.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
key = lambda j: [(h['pattern'], h['selected_blocks'], h.get('rel_l2_vs_dense')) for h in j['heads']]
print('cache on/off: identical per-head decisions and errors' if key(a) == key(b) else 'cache on/off DIFFER')
print('warm-up with cache off:', b['timings_ms'].get('warmup'), 'ms')
PY

echo "== 5. 4k SmolLM2 layer: must run dense and cost about dense"
$B/flexprefill run --input $B/smollm2-135m-L10-4k.safetensors --backend cuda --compare-dense > "$OUT/run4k.txt" 2>&1
echo "rc=$? ($(since))"; grep -E "^note|^density|^time|transfers" "$OUT/run4k.txt"
$B/flexprefill run --input $B/smollm2-135m-L10-4k.safetensors --backend cuda --compare-dense --json > "$OUT/run4k.json" 2>/dev/null
python3 -c "import json;j=json.load(open('$OUT/run4k.json'));t=j['timings_ms'];print('4k: dense_fallback', repr(j['dense_fallback']), '| flexprefill', t['compute'], 'ms vs dense', t.get('dense'), 'ms on the device: ratio', round(t['compute']/max(t.get('dense') or 1e-9,1e-9),3))"

echo "== 6. host API vs device API, 16k and 128k"
timeout 200 $B/host_vs_device 16384,131072 > "$OUT/host_vs_device.log" 2>&1
echo "rc=$? ($(since))"; cat "$OUT/host_vs_device.log"

echo "== 7. lib GPU tests (statistics, selection, whole device call) for regressions"
# (the NVRTC compile tests run on the build machine: skipped here)
timeout 150 $B/cuda_lib_tests --include-ignored --test-threads 1 --skip compile_tests > "$OUT/lib_tests.log" 2>&1
echo "rc=$? ($(since)): $(grep '^test result' "$OUT/lib_tests.log")"
grep -E "FAILED|panicked" "$OUT/lib_tests.log" | head -10
