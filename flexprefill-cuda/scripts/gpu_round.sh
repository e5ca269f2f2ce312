#!/bin/bash
# One device call for flexprefill-cuda's attention: GPU tests, compute-sanitizer, the bench and
# PyTorch SDPA on the same shapes, short table last. Run from the repo root on the GPU machine,
# with the executables built on a Rust machine and copied to .gpu/ (see docs/PERFORMANCE.md):
#   .gpu/gpu_attention .gpu/nvrtc_compile .gpu/no_driver .gpu/flexprefill-cuda-bench
# Env: ROUND_TESTS=0 / ROUND_SAN=0 / ROUND_BENCH=0 / ROUND_SDPA=0 skip a part;
#      BENCH_ARGS extra bench arguments; NCU=1 profiles one dense and one sparse launch.
set -u
OUT=${OUT:-/tmp/round}
mkdir -p "$OUT"
G=.gpu
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
summary=()
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv | tee "$OUT/smi.txt"

if [ "${ROUND_TESTS:-1}" = 1 ]; then
  : > "$OUT/tests.log"
  for t in no_driver nvrtc_compile gpu_attention; do
    [ -x "$G/$t" ] || continue
    s=$(date +%s)
    timeout 300 "$G/$t" --include-ignored --test-threads 1 --nocapture >> "$OUT/tests.log" 2>&1
    rc=$?
    line=$(grep -E "^test result" "$OUT/tests.log" | tail -1)
    summary+=("test $t rc=$rc $(( $(date +%s) - s ))s: $line")
  done
  grep -E "rel L2|FAILED|panicked" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -40
fi

if [ "${ROUND_SAN:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck synccheck initcheck; do
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 "$G/gpu_attention" --include-ignored --test-threads 1 \
      sparse_with_every_block rows_without_keys every_tile_shape odd_head_dims >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    summary+=("sanitizer $tool rc=$rc: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)")
  done
fi

if [ "${ROUND_BENCH:-1}" = 1 ]; then
  timeout 300 "$G/flexprefill-cuda-bench" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  summary+=("bench rc=$?")
fi

if [ "${ROUND_SDPA:-1}" = 1 ]; then
  timeout 240 python3 benches/sdpa.py ${SDPA_ARGS:-} > "$OUT/sdpa.log" 2>&1
  summary+=("sdpa rc=$?")
fi

if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
  timeout 240 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:attn_fwd \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
    "$G/flexprefill-cuda-bench" --seqs 32768 --iters 2 --warmup 1 > "$OUT/ncu.log" 2>&1
  summary+=("ncu rc=$?")
fi

echo "================ summary"
for s in "${summary[@]}"; do echo "$s"; done
[ -f "$OUT/bench.log" ] && grep -E "^\||^device|^tile|^error" "$OUT/bench.log"
[ -f "$OUT/sdpa.log" ] && grep -E "^\||^torch|Error" "$OUT/sdpa.log" | tail -20
exit 0
