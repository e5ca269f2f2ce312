#!/usr/bin/env bash
# CUDA helper B's device round: runs B's GPU tests (and benches when present) from .gpu/.
# Usage on the device machine (repo root): bash flexprefill-cuda/scripts/gpu_b.sh [test filter...]
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
filters=("$@"); [ ${#filters[@]} -eq 0 ] && filters=(stats:: select::)
for f in "${filters[@]}"; do
  echo "=== tests: $f"
  timeout 240 ./.gpu/cuda_b_tests --include-ignored --nocapture --test-threads 1 "$f" 2>&1 | tee -a "$OUT/tests.log" | grep -vE "^$" | tail -60
done
if [ -x ./.gpu/cuda_b_bench ]; then
  echo "=== bench"
  FLEXPREFILL_PROFILE=1 timeout 300 ./.gpu/cuda_b_bench ${BENCH_SIZES:-8192,32768,65536,131072} 2>&1 | tee "$OUT/bench.log" | tail -60
fi
