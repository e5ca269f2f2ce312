#!/bin/bash
# One device call that checks a merged tree (wgmma statistics passes + compacted flattened cut)
# before final.sh: lib GPU tests on the default path (wgmma statistics on sm_90), the statistics
# and selection tests with FLEXPREFILL_STATS_OVERLAP=1, the statistics A/B (wgmma, mma, overlap)
# at 128k and the whole-call bench at 128k (mixed) profiled, default and overlap.
# Executables in .gpu/: cuda_lib_tests, bench_stats, bench_select. Logs in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
s=$(date +%s)
el() { echo "($(( $(date +%s) - s ))s)"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 120 .gpu/cuda_lib_tests --include-ignored --test-threads 1 --skip compile > "$OUT/lib.log" 2>&1
r=$?; echo "=== lib tests default rc=$r $(el)"
grep -E "^test .* \.\.\. |panicked|differ|worst" "$OUT/lib.log" | head -40; grep "^test result" "$OUT/lib.log"
if [ $r -ne 0 ]; then
  FLEXPREFILL_STATS_MMA=1 timeout 60 .gpu/cuda_lib_tests --include-ignored --test-threads 1 --skip compile stats:: select:: > "$OUT/lib_mma.log" 2>&1
  echo "=== stats::/select:: with FLEXPREFILL_STATS_MMA=1 rc=$? $(el)"
  grep -E "^test .* \.\.\. |panicked|differ" "$OUT/lib_mma.log" | head -20; grep "^test result" "$OUT/lib_mma.log"
fi
FLEXPREFILL_STATS_OVERLAP=1 timeout 60 .gpu/cuda_lib_tests --include-ignored --test-threads 1 --skip compile stats:: select:: > "$OUT/lib_overlap.log" 2>&1
echo "=== stats::/select:: overlap rc=$? $(el)"
grep -E "^test .* \.\.\. |panicked|differ" "$OUT/lib_overlap.log" | head -20; grep "^test result" "$OUT/lib_overlap.log"
for v in default mma overlap; do
  case $v in default) e="";; mma) e="FLEXPREFILL_STATS_MMA=1";; overlap) e="FLEXPREFILL_STATS_OVERLAP=1";; esac
  env $e FLEXPREFILL_PROFILE=1 timeout 30 .gpu/bench_stats 131072 128 > "$OUT/bstats_$v.log" 2>&1
  echo "=== bench_stats 128k [$v] rc=$? $(el)"; grep -E "^stats|rror|panicked" "$OUT/bstats_$v.log"
done
for v in default mma overlap; do
  case $v in default) e="";; mma) e="FLEXPREFILL_STATS_MMA=1";; overlap) e="FLEXPREFILL_STATS_OVERLAP=1";; esac
  env $e BENCH_DATA=mixed FLEXPREFILL_PROFILE=1 timeout 60 .gpu/bench_select 131072 > "$OUT/bsel_$v.log" 2>&1
  echo "=== bench_select 128k mixed [$v] rc=$? $(el)"; grep -E "^\||profile|rror|panicked" "$OUT/bsel_$v.log" | head -20
done
