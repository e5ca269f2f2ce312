#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention as the peer of flexprefill-cuda's attention.

Times the flash and cuDNN backends (torch.nn.attention.sdpa_kernel) on the shapes of
flexprefill-cuda-bench: bf16, causal, batch 1, 32 q heads, 8 kv heads, d 128, seq 8k..128k.
CUDA events, median of --iters after --warmup. FLOPs counted as causal, 4·D·H·n²/2.
GQA: enable_gqa=True where the backend takes it, else K/V expanded to 32 heads before timing
(the expansion is not timed). Prints a markdown table last.

usage: python3 benches/sdpa.py [--seqs 8192,32768,65536,131072] [--iters 10] [--warmup 3]
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="8192,32768,65536,131072")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    a = p.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for n in [int(s) for s in a.seqs.split(",")]:
        q = torch.randn(1, a.heads, n, a.dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, a.kv_heads, n, a.dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, a.kv_heads, n, a.dim, device=dev, dtype=torch.bfloat16)
        flops = 4.0 * a.dim * a.heads * n * n / 2
        g = a.heads // a.kv_heads
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
            note = "gqa"
            try:
                with sdpa_kernel(backend):
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    fn()
                    ms = time_ms(fn, a.warmup, a.iters)
            except Exception as e:  # backend refuses GQA: expand K/V (untimed)
                note = f"expanded kv ({type(e).__name__})"
                try:
                    ke = k.repeat_interleave(g, dim=1)
                    ve = v.repeat_interleave(g, dim=1)
                    with sdpa_kernel(backend):
                        fn = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
                        fn()
                        ms = time_ms(fn, a.warmup, a.iters)
                    del ke, ve
                except Exception as e2:
                    print(f"{name} n={n}: {e2}", file=sys.stderr)
                    rows.append((n, name, float("nan"), float("nan"), f"failed: {type(e2).__name__}"))
                    continue
            rows.append((n, name, ms, flops / ms / 1e9, note))
            print(f"sdpa {name} n={n}: {ms:.3f} ms", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print("\n| seq | SDPA backend | median ms | TFLOP/s (causal) | note |")
    print("|---|---|---|---|---|")
    for n, name, ms, tf, note in rows:
        print(f"| {n} | {name} | {ms:.3f} | {tf:.1f} | {note} |")


if __name__ == "__main__":
    main()
