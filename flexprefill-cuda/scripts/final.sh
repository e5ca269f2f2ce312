#!/bin/bash
# The lead's last device call of a session: the GPU tests, the whole-call bench and the SDPA
# peers in ONE call. Executables (built on a Rust machine, copied into .gpu/): cuda_lib_tests
# (lib unit tests: statistics and selection), gpu_attention (attention + testkit agreement
# harness), bench_select (timed without FLEXPREFILL_PROFILE: the profile marks cost time).
# Logs go to $OUT. BENCH_SIZES=8192,...,262144 adds 256k (about +2 min).
set -u
OUT=${OUT:-/tmp/final}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
s=$(date +%s)
timeout 110 .gpu/cuda_lib_tests --include-ignored --test-threads 1 > "$OUT/lib_tests.log" 2>&1; r1=$?
t1=$(( $(date +%s) - s ))
timeout 240 .gpu/bench_select ${BENCH_SIZES:-8192,32768,65536,131072} > "$OUT/bench.log" 2>&1; r3=$?
t3=$(( $(date +%s) - s ))
timeout 90 python3 benches/sdpa.py --seqs ${BENCH_SIZES:-8192,32768,65536,131072} > "$OUT/sdpa.log" 2>&1; r4=$?
t4=$(( $(date +%s) - s ))
timeout 130 .gpu/gpu_attention --include-ignored --test-threads 2 > "$OUT/gpu_attention.log" 2>&1; r2=$?
t2=$(( $(date +%s) - s ))
grep -E "^test |FAILED|panicked|differ" "$OUT/lib_tests.log" | tail -25
grep -E "^test |FAILED|panicked|differ" "$OUT/gpu_attention.log" | tail -25
echo "lib tests rc=$r1 (${t1}s): $(grep '^test result' "$OUT/lib_tests.log")"
echo "bench rc=$r3 (${t3}s); sdpa rc=$r4 (${t4}s)"
echo "gpu_attention rc=$r2 (${t2}s): $(grep '^test result' "$OUT/gpu_attention.log")"
grep -E "^\||^device|^host" "$OUT/bench.log"
tail -8 "$OUT/sdpa.log"
