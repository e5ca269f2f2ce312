#!/bin/bash
# Every GPU number of docs/PERFORMANCE.md, in one job on the GPU machine: the whole FlexPrefill
# call on the device API (bench_select: statistics, selection, index build and sparse
# attention per length and gamma, timed without FLEXPREFILL_PROFILE, whose marks cost time),
# the attention kernels alone (flexprefill-cuda-bench, dense and sparse at density 0.3, with
# the warp-specialized kernel and with the single-role wgmma kernel), PyTorch SDPA's flash and
# cuDNN backends on the same lengths (benches/sdpa.py), the host API against the device API
# (host_vs_device), and the CLI as a user meets it (demo on the GPU with an empty and a warm
# kernel cache, and a 4k real layer, which runs dense). Run from the repo root; logs go to $OUT
# (default /tmp/gpu-bench), the tables are printed last.
#
# Build on a Rust machine and copy into the git-ignored .gpu/ at the repo root:
#   cargo build --release -p flexprefill-cuda --examples --bins
#   cargo build --release -p flexprefill-cli
#   mkdir -p .gpu
#   cp target/release/examples/bench_select target/release/examples/host_vs_device .gpu/
#   cp target/release/flexprefill-cuda-bench target/release/flexprefill .gpu/
#   cp ../shared/data/smollm2-135m-L10-4k.safetensors .gpu/   # the 4k real layer
# A missing executable skips its part.
#
# Env: BENCH_SIZES (default 8192,32768,65536,131072; add 262144 for 256k, about +2 min),
#      ATTN_KERNELS (default "ws wgmma": FLEXPREFILL_ATTN values for the attention bench),
#      PARTS (default "select attention sdpa host cli"), BENCH_MODES (bench_select's selection
#      modes, default faithful), BENCH_GAMMAS (default 0.9,0.95).
set -u
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
G=.gpu
SIZES=${BENCH_SIZES:-8192,32768,65536,131072}
PARTS=" ${PARTS:-select attention sdpa host cli} "
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/smi.txt"
s=$(date +%s)
el() { echo "[$(( $(date +%s) - s ))s] $*"; }
want() { case "$PARTS" in *" $1 "*) [ -z "${2:-}" ] || [ -x "$G/$2" ] ;; *) false ;; esac; }

if want select bench_select; then
  # BENCH_MODES (default faithful) and BENCH_GAMMAS (default 0.9,0.95): e.g.
  # BENCH_MODES=original,faithful,sampled BENCH_GAMMAS=0.9 for the selection modes side by side.
  timeout 300 "$G/bench_select" "$SIZES" "${BENCH_MODES:-faithful}" "${BENCH_GAMMAS:-0.9,0.95}" \
    > "$OUT/bench_select.log" 2>&1
  el "bench_select rc=$?"
fi
if want attention flexprefill-cuda-bench; then
  for k in ${ATTN_KERNELS:-ws wgmma}; do
    FLEXPREFILL_ATTN=$k timeout 150 "$G/flexprefill-cuda-bench" --seqs "$SIZES" --density 0.3 \
      > "$OUT/attention_$k.log" 2>&1
    el "flexprefill-cuda-bench FLEXPREFILL_ATTN=$k rc=$?"
  done
fi
if want sdpa; then
  timeout 240 python3 benches/sdpa.py --seqs "$SIZES" > "$OUT/sdpa.log" 2>&1
  el "sdpa rc=$?"
fi
if want host host_vs_device; then
  timeout 200 "$G/host_vs_device" 16384,131072 > "$OUT/host_vs_device.log" 2>&1
  el "host_vs_device rc=$?"
fi
if want cli flexprefill; then
  # A fresh kernel cache: the first process compiles, the second loads the cubins.
  export FLEXPREFILL_CACHE_DIR="$OUT/kcache"; rm -rf "$FLEXPREFILL_CACHE_DIR"
  for i in 1 2; do
    timeout 120 "$G/flexprefill" demo --backend cuda --json > "$OUT/demo$i.json" 2> "$OUT/demo$i.err"
    el "demo (process $i) rc=$?"
  done
  FLEXPREFILL_CACHE=off timeout 120 "$G/flexprefill" demo --backend cuda > "$OUT/demo_off.txt" 2>&1
  el "demo (cache off) rc=$?"
  if [ -f "$G/smollm2-135m-L10-4k.safetensors" ]; then
    timeout 60 "$G/flexprefill" run --input "$G/smollm2-135m-L10-4k.safetensors" --backend cuda \
      --compare-dense --json > "$OUT/run4k.json" 2> "$OUT/run4k.err"
    el "4k real layer rc=$?"
  fi
fi

for k in ${ATTN_KERNELS:-ws wgmma}; do
  [ -f "$OUT/attention_$k.log" ] && { echo "attention, FLEXPREFILL_ATTN=$k"; grep -E "^\||^device|^error" "$OUT/attention_$k.log"; }
done
[ -f "$OUT/bench_select.log" ] && grep -E "^\||^device|^host|rror" "$OUT/bench_select.log"
[ -f "$OUT/sdpa.log" ] && grep -E "^\||^torch|rror" "$OUT/sdpa.log" | tail -20
[ -f "$OUT/host_vs_device.log" ] && cat "$OUT/host_vs_device.log"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    try:
        return json.load(open(p))
    except Exception:
        return None
for i in (1, 2):
    j = load(f"demo{i}.json")
    if j:
        t = j["timings_ms"]
        print(f"demo process {i}: warm-up {t.get('warmup')} ms; device: flexprefill {t.get('compute')} ms, "
              f"dense {t.get('dense')} ms, speed-up {round(t['dense'] / t['compute'], 2) if t.get('compute') and t.get('dense') else None}; "
              f"density {round(j.get('density', float('nan')), 3)}, mass captured {j.get('mass_captured')}")
j = load("run4k.json")
if j:
    t = j["timings_ms"]
    print(f"4k real layer: dense_fallback {j.get('dense_fallback')!r}; flexprefill {t.get('compute')} ms vs dense "
          f"{t.get('dense')} ms on the device")
PY
exit 0
