#!/bin/bash
# Every GPU test of flexprefill-cuda, then compute-sanitizer (memcheck, racecheck, synccheck) on
# every kernel family: statistics (the wgmma passes the H200 runs by default and the mma.sync
# passes), selection and index build, attention. Run from the repo root on the GPU machine;
# logs and a summary go to $OUT (default /tmp/gpu-check).
#
# The GPU machine has no Rust toolchain: build on a Rust machine and copy the executables into
# the git-ignored folder .gpu/ at the repo root (the folder this script reads):
#   cargo test --release -p flexprefill-cuda --no-run 2>&1 | grep Executable
#     -> unittests src/lib.rs (target/release/deps/flexprefill_cuda-HASH)
#        tests/gpu_attention.rs (target/release/deps/gpu_attention-HASH)
#        tests/gpu_robustness.rs (target/release/deps/gpu_robustness-HASH)
#        tests/nvrtc_compile.rs (target/release/deps/nvrtc_compile-HASH)
#        tests/no_driver.rs (target/release/deps/no_driver-HASH)
#        tests/gpu_graph.rs (target/release/deps/gpu_graph-HASH)
#   mkdir -p .gpu
#   cp target/release/deps/flexprefill_cuda-HASH .gpu/cuda_lib_tests
#   cp target/release/deps/gpu_attention-HASH .gpu/gpu_attention
#   cp target/release/deps/gpu_robustness-HASH .gpu/gpu_robustness
#   cp target/release/deps/gpu_host-HASH .gpu/gpu_host
#   cp target/release/deps/nvrtc_compile-HASH .gpu/nvrtc_compile
#   cp target/release/deps/no_driver-HASH .gpu/no_driver
#   cp target/release/deps/gpu_graph-HASH .gpu/gpu_graph
# (gpu-bench.sh's executables go to the same folder.)
#
# The lib's NVRTC compile tests (names containing "compile") are skipped here: they need no GPU
# and run on the build machine (`cargo test -p flexprefill-cuda --lib -- --include-ignored
# compile`); CHECK_NVRTC=1 runs them and the nvrtc_compile binary with this machine's NVRTC.
#
# Env: CHECK_TESTS=0 / CHECK_SAN=0 skip a part; CHECK_ATTN_WS=0 skips the attention tests with
# the warp-specialized kernel forced, CHECK_STATS_VARIANTS=0 the mma.sync and overlap passes, CHECK_SAMPLED_1P=0 the sampled one-pass kernel; SAN_S seconds per sanitizer run (default 240);
# SAN_FAMILIES (default "stats_wgmma stats_mma select attention"; "oracle" is opt-in) and SAN_TOOLS (default
# "memcheck racecheck synccheck") pick the sanitizer runs, so that a machine with a per-command
# time limit can take them in several commands.
# Reading it: every `test result` ok, every sanitizer line "ERROR SUMMARY: 0 errors" (racecheck:
# "RACECHECK SUMMARY: 0 hazards").
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
G=.gpu
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
summary=()
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/smi.txt"

# test NAME LOG [ENV=VALUE...] -- ARGS...: one test executable, summary line.
run_test() {
  local name=$1 log=$2; shift 2
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  [ -x "$G/$name" ] || { summary+=("MISSING $G/$name"); return; }
  local s=$(date +%s)
  env ${envs[@]+"${envs[@]}"} timeout 300 "$G/$name" --include-ignored --test-threads 1 "$@" > "$OUT/$log" 2>&1
  local rc=$?
  summary+=("$log rc=$rc $(( $(date +%s) - s ))s: $(grep -E '^test result' "$OUT/$log" | tail -1)")
  grep -E "^test .*FAILED|panicked" "$OUT/$log" | head -20
}

if [ "${CHECK_TESTS:-1}" = 1 ]; then
  run_test no_driver no_driver.log --
  if [ "${CHECK_NVRTC:-0}" = 1 ]; then
    run_test nvrtc_compile nvrtc_compile.log --
    run_test cuda_lib_tests lib_compile.log -- compile
  fi
  run_test cuda_lib_tests lib_tests.log -- --skip compile
  run_test gpu_attention gpu_attention.log --
  # The warp-specialized kernel forced at block 64 too (it is the default at block 128).
  [ "${CHECK_ATTN_WS:-1}" = 1 ] && run_test gpu_attention gpu_attention_ws.log FLEXPREFILL_ATTN=ws --
  # Host API == device-resident call, the dense-or-sparse rule, raw-pointer entry, kernel cache.
  run_test gpu_host gpu_host.log -- --nocapture
  # A whole call captured in a CUDA graph and replayed; no allocation inside a workspace call.
  run_test gpu_graph gpu_graph.log --
  # Size limits, out-of-memory, two threads on one backend, repeated runs bit for bit.
  run_test gpu_robustness gpu_robustness.log -- --nocapture
  # The other statistics passes on Hopper: mma.sync, and the wgmma issue-ahead variant.
  if [ "${CHECK_STATS_VARIANTS:-1}" = 1 ]; then
    run_test cuda_lib_tests lib_tests_mma.log FLEXPREFILL_STATS_MMA=1 -- stats:: select:: --skip compile
    run_test cuda_lib_tests lib_tests_overlap.log FLEXPREFILL_STATS_OVERLAP=1 -- stats:: select:: --skip compile
  fi
  # The sampled estimate's one-pass kernel (opt-in) through the statistics and selection tests.
  [ "${CHECK_SAMPLED_1P:-1}" = 1 ] && run_test cuda_lib_tests lib_tests_sampled_1p.log FLEXPREFILL_SAMPLED_ONEPASS=1 -- stats:: select:: --skip compile
fi

# san FAMILY EXE [ENV=VALUE...] -- TEST ARGS...: every tool on one family's tests.
san() {
  local fam=$1 exe=$2; shift 2
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  [ -x "$G/$exe" ] || { summary+=("MISSING $G/$exe"); return; }
  case " ${SAN_FAMILIES:-stats_wgmma stats_mma select attention} " in *" $fam "*) ;; *) return ;; esac
  for tool in ${SAN_TOOLS:-memcheck racecheck synccheck}; do
    local log="$OUT/san_${fam}_${tool}.log" s=$(date +%s)
    env ${envs[@]+"${envs[@]}"} timeout "${SAN_S:-240}" "$CS" --tool $tool --print-limit 20 --error-exitcode 9 \
      "$G/$exe" --include-ignored --test-threads 1 "$@" > "$log" 2>&1
    local rc=$?
    summary+=("sanitizer $fam $tool rc=$rc $(( $(date +%s) - s ))s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1) $(grep -E '^test result' "$log" | tail -1)")
  done
}

if [ "${CHECK_SAN:-1}" = 1 ]; then
  if [ -x "$CS" ]; then
    san stats_wgmma cuda_lib_tests -- --exact stats::tests::statistics_match_the_cpu_oracle
    san stats_mma cuda_lib_tests FLEXPREFILL_STATS_MMA=1 -- --exact stats::tests::statistics_match_the_cpu_oracle
    san select cuda_lib_tests -- --exact select::tests::device_selection_equals_core_on_the_same_statistics
    san attention gpu_attention -- sparse_with_every_block rows_without_keys every_tile_shape odd_head_dims dense_walk
    # opt-in (SAN_FAMILIES=oracle): the oracle density's kernel, stats_oracle_block_mass
    san oracle cuda_lib_tests -- --exact stats::oracle::tests::mean_row_block_mass_matches_the_f64_oracle
  else
    summary+=("compute-sanitizer not found")
  fi
fi

echo "================ summary"
for s in "${summary[@]}"; do echo "$s"; done | tee "$OUT/summary.txt"
exit 0
