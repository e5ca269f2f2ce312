#!/bin/bash
# The Hopper attention kernels side by side, in one device call: correctness of the
# warp-specialized kernel (every GPU attention test, with it as the default and forced for
# block 64 too), compute-sanitizer memcheck and racecheck on it, then the attention bench with
# FLEXPREFILL_ATTN=ws and =wgmma (dense and sparse at density 0.3) and benches/sdpa.py on the
# same lengths. Run from the repo root on the GPU machine; logs go to $OUT (default
# /tmp/attention-ws), tables are printed last.
#
# Build on a Rust machine and copy into the git-ignored .gpu/ at the repo root:
#   cargo test --release -p flexprefill-cuda --no-run      # prints the gpu_attention binary
#   cargo build --release -p flexprefill-cuda --bins
#   mkdir -p .gpu
#   cp target/release/deps/gpu_attention-<hash> .gpu/gpu_attention
#   cp target/release/flexprefill-cuda-bench .gpu/flexprefill-cuda-bench
#
# Env: BENCH_SIZES (default 32768,65536,131072), SANITIZE=0 skips the sanitizer runs.
set -u
OUT=${OUT:-/tmp/attention-ws}
mkdir -p "$OUT"
G=.gpu
SIZES=${BENCH_SIZES:-32768,65536,131072}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
s=$(date +%s)
el() { echo "[$(( $(date +%s) - s ))s] $*"; }
for k in default ws; do
  if [ $k = default ]; then unset FLEXPREFILL_ATTN; else export FLEXPREFILL_ATTN=ws; fi
  timeout 150 $G/gpu_attention --include-ignored --test-threads 2 > "$OUT/gpu_attention_$k.log" 2>&1
  el "gpu_attention ($k) rc=$? $(grep '^test result' "$OUT/gpu_attention_$k.log")"
  grep -E "^test .*FAILED|panicked" "$OUT/gpu_attention_$k.log" | head -5
done
unset FLEXPREFILL_ATTN
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 300 compute-sanitizer --tool $tool $G/gpu_attention --include-ignored \
      every_tile_shape rows_without_keys > "$OUT/$tool.log" 2>&1
    el "$tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)"
  done
fi
for k in ws wgmma; do
  FLEXPREFILL_ATTN=$k timeout 120 $G/flexprefill-cuda-bench --seqs "$SIZES" --density 0.3 \
    > "$OUT/bench_$k.log" 2>&1
  el "bench $k rc=$?"
done
timeout 120 python3 benches/sdpa.py --seqs "$SIZES" > "$OUT/sdpa.log" 2>&1
el "sdpa rc=$?"
for k in ws wgmma; do echo "FLEXPREFILL_ATTN=$k"; grep -E "^\| [0-9]" "$OUT/bench_$k.log"; done
grep -E "^\|" "$OUT/sdpa.log"
