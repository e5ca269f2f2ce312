#!/bin/bash
# The lead's last device call of a session: every GPU test, then the whole-call bench at 128k.
# Executables (built on a Rust machine, copied into .gpu/): cuda_lib_tests (lib unit tests:
# statistics and selection), gpu_attention (attention + testkit agreement harness), bench_select.
set -u
OUT=${OUT:-/tmp/final}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
s=$(date +%s)
timeout 100 .gpu/cuda_lib_tests --include-ignored --test-threads 1 > "$OUT/lib_tests.log" 2>&1; r1=$?
t1=$(( $(date +%s) - s ))
timeout 110 .gpu/gpu_attention --include-ignored --test-threads 2 > "$OUT/gpu_attention.log" 2>&1; r2=$?
t2=$(( $(date +%s) - s ))
timeout 60 .gpu/bench_select ${BENCH_SIZES:-131072} > "$OUT/bench.log" 2>&1; r3=$?
grep -E "^test |FAILED|panicked|differ" "$OUT/lib_tests.log" | tail -25
grep -E "^test |FAILED|panicked|differ" "$OUT/gpu_attention.log" | tail -25
echo "lib tests rc=$r1 (${t1}s): $(grep '^test result' "$OUT/lib_tests.log")"
echo "gpu_attention rc=$r2 (${t2}s): $(grep '^test result' "$OUT/gpu_attention.log")"
echo "bench rc=$r3"; grep -E "^\||^device" "$OUT/bench.log"
