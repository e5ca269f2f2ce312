#!/bin/bash
# The whole FlexPrefill call on the device API against PyTorch SDPA on the same shapes: the
# bench_select example (statistics, selection, index build and sparse attention per length,
# timed without FLEXPREFILL_PROFILE: the profile marks cost time) and benches/sdpa.py (SDPA's
# flash and cuDNN backends). Run from the repo root on the GPU machine; logs go to $OUT
# (default /tmp/gpu-bench), the tables are printed last.
#
# Build on a Rust machine and copy into the git-ignored .gpu/ at the repo root:
#   cargo build --release -p flexprefill-cuda --examples --bins
#   mkdir -p .gpu
#   cp target/release/examples/bench_select .gpu/bench_select
#   cp target/release/flexprefill-cuda-bench .gpu/flexprefill-cuda-bench   # optional: attention alone
#
# Env: BENCH_SIZES (default 8192,32768,65536,131072; add 262144 for 256k, about +2 min),
#      ATTN_ARGS extra arguments of flexprefill-cuda-bench (run only when it is in .gpu/).
set -u
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
G=.gpu
SIZES=${BENCH_SIZES:-8192,32768,65536,131072}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/smi.txt"
s=$(date +%s)
timeout 300 "$G/bench_select" "$SIZES" > "$OUT/bench_select.log" 2>&1
echo "bench_select rc=$? ($(( $(date +%s) - s ))s)"
timeout 240 python3 benches/sdpa.py --seqs "$SIZES" > "$OUT/sdpa.log" 2>&1
echo "sdpa rc=$? ($(( $(date +%s) - s ))s)"
if [ -x "$G/flexprefill-cuda-bench" ]; then
  timeout 300 "$G/flexprefill-cuda-bench" ${ATTN_ARGS:-} > "$OUT/attention.log" 2>&1
  echo "flexprefill-cuda-bench rc=$? ($(( $(date +%s) - s ))s)"
  grep -E "^\||^device|^tile|^error" "$OUT/attention.log"
fi
grep -E "^\||^device|^host|rror" "$OUT/bench_select.log"
grep -E "^\||^torch|rror" "$OUT/sdpa.log" | tail -20
exit 0
