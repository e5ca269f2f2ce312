#!/bin/bash
# compute-sanitizer on the selection tests (run after final.sh in the same device call):
# memcheck over every kernel of the device-vs-core selection test, racecheck on the kernels
# that changed most recently (shared-memory histograms, the top-up, the map, the scan).
# Executables in .gpu/ (cuda_lib_tests). Logs in $OUT.
set -u
OUT=${OUT:-/tmp/sanitize}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
CS=/usr/local/cuda/bin/compute-sanitizer
T=select::tests::device_selection_equals_core_on_the_same_statistics
s=$(date +%s)
timeout ${MEMCHECK_S:-120} $CS --tool memcheck --print-limit 20 .gpu/cuda_lib_tests --include-ignored --test-threads 1 --exact $T > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$? ($(( $(date +%s) - s ))s): $(grep -E 'ERROR SUMMARY|test result' "$OUT/memcheck.log" | tr '\n' ' ')"
K='regex=sel_qa_topup|sel_scan|sel_flat_hist|sel_flat_finish|sel_qa_calib|sel_qa_softmax|sel_qa_map|sel_pool_lines|sel_fvs_lines|sel_write'
timeout ${RACECHECK_S:-120} $CS --tool racecheck --print-limit 20 --kernel-name "$K" .gpu/cuda_lib_tests --include-ignored --test-threads 1 --exact $T > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$? ($(( $(date +%s) - s ))s): $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|test result|rror' "$OUT/racecheck.log" | head -5 | tr '\n' ' ')"
