#!/bin/bash
# ONE device call (< 3 minutes) that checks the Hopper (wgmma) statistics passes
# (kernels/stats_sm90.cu, branch stats-wgmma) and A/Bs them against the mma.sync passes:
#   1. lib GPU tests stats:: and select:: on the default path (wgmma on an H200); the same
#      with FLEXPREFILL_STATS_OVERLAP=1 (the wgmma issue-ahead variant); if the default fails,
#      stats:: again with FLEXPREFILL_STATS_MMA=1 (is the old path still fine?);
#   2. FLEXPREFILL_PROFILE=1 bench_stats 131072 128, three times: default (wgmma),
#      FLEXPREFILL_STATS_MMA=1 (the mma.sync passes), FLEXPREFILL_STATS_OVERLAP=1 (experimental
#      wgmma issue-ahead), and prints the profile lines (stats_pass1 / stats_pass2 ms).
#
# Build on a Rust machine (the GPU machine has no toolchain), from the repo root:
#   cargo test --release -p flexprefill-cuda --no-run 2>&1 | grep 'unittests src/lib.rs'
#     -> "Executable unittests src/lib.rs (target/release/deps/flexprefill_cuda-<hash>)"
#   cargo build --release -p flexprefill-cuda --example bench_stats
#   mkdir -p .gpu-w
#   cp target/release/deps/flexprefill_cuda-<hash> .gpu-w/cuda_lib_tests
#   cp target/release/examples/bench_stats .gpu-w/bench_stats
# Device call: `run` with carry [".gpu-w"] and command
#   bash flexprefill-cuda/scripts/stats_wgmma.sh
# Logs go to $OUT (tests.log, tests_overlap.log, tests_mma.log, bench_*.log).
# Reading it: both test runs must pass (every `test ... ok`, "worst line L1" <= 2e-3 per case,
# the selection tests equal to core). Then compare the profile lines' stats_pass1_sm90 /
# stats_pass2_sm90 against stats_pass1 / stats_pass2 of the mma run (H200 before: 1.0 / 2.2 ms
# faithful). If the overlap run passes and is faster, make it the default in
# src/stats.rs `PassPath::choose`.
set -u
OUT=${OUT:-/tmp/stats_wgmma}
mkdir -p "$OUT"
G=${G:-.gpu-w}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
s=$(date +%s)

# 1. correctness on the default (wgmma) path
timeout 80 "$G/cuda_lib_tests" --include-ignored --test-threads 1 stats:: select:: --skip compile \
  > "$OUT/tests.log" 2>&1
rt=$?
echo "=== tests (default path = wgmma on sm_90) rc=$rt ($(( $(date +%s) - s ))s)"
grep -E "^test .* \.\.\. |worst line L1|panicked|differ|assert" "$OUT/tests.log" | head -40
grep -E "^test result" "$OUT/tests.log"
if [ $rt -ne 0 ]; then
  FLEXPREFILL_STATS_MMA=1 timeout 40 "$G/cuda_lib_tests" --include-ignored --test-threads 1 \
    stats::tests::statistics_match > "$OUT/tests_mma.log" 2>&1
  echo "=== stats:: with FLEXPREFILL_STATS_MMA=1 (old path) rc=$? ($(( $(date +%s) - s ))s)"
  grep -E "^test |panicked|^test result" "$OUT/tests_mma.log" | head -10
fi

# 1b. correctness of the overlap variant
FLEXPREFILL_STATS_OVERLAP=1 timeout 60 "$G/cuda_lib_tests" --include-ignored --test-threads 1 \
  stats:: select:: --skip compile > "$OUT/tests_overlap.log" 2>&1
echo "=== tests with FLEXPREFILL_STATS_OVERLAP=1 rc=$? ($(( $(date +%s) - s ))s)"
grep -E "^test .* \.\.\. |worst line L1|panicked" "$OUT/tests_overlap.log" | head -30
grep -E "^test result" "$OUT/tests_overlap.log"

# 2. speed: default (wgmma), mma.sync, wgmma with the issue-ahead
for v in default mma overlap; do
  case $v in
    default) env_set="" ;;
    mma) env_set="FLEXPREFILL_STATS_MMA=1" ;;
    overlap) env_set="FLEXPREFILL_STATS_OVERLAP=1" ;;
  esac
  env $env_set FLEXPREFILL_PROFILE=1 timeout 30 "$G/bench_stats" 131072 128 \
    > "$OUT/bench_$v.log" 2>&1
  echo "=== bench_stats 131072 128 [$v${env_set:+: $env_set}] rc=$? ($(( $(date +%s) - s ))s)"
  grep -E "^stats|rror|panicked" "$OUT/bench_$v.log"
done
