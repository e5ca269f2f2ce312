"""Python overhead per call: wall time of flexprefill.flex_prefill_attention minus the time of
the Rust call inside it (the report's ``timings.call``: input checks, selection, attention).

    python flexprefill-py/benches/overhead.py                       # CPU, small shapes
    python flexprefill-py/benches/overhead.py --device cuda --seq 32768 --heads 32 \\
        --kv-heads 8 --dim 128 --dtype bfloat16                     # the issue's GPU bar

Small CPU shapes make the fixed cost visible; the bar (<= 50 us over the Rust call) is for
the GPU at 32k. Prints medians over --iters calls after --warmup calls.
"""

import argparse
import statistics
import time

import numpy as np

import flexprefill


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="cpu (NumPy), torch-cpu, or cuda (torch)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    shapes = [(1, a.seq, a.heads, a.dim), (1, a.seq, a.kv_heads, a.dim), (1, a.seq, a.kv_heads, a.dim)]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    sync = lambda: None  # noqa: E731
    if a.device == "cpu" and a.dtype != "bfloat16":
        q, k, v = (x.astype(a.dtype) for x in arrays)
    else:
        import torch

        dev = "cuda" if a.device == "cuda" else "cpu"
        q, k, v = (torch.from_numpy(x).to(dev, getattr(torch, a.dtype)) for x in arrays)
        if dev == "cuda":
            sync = torch.cuda.synchronize
    kw = dict(block_size=128, min_budget=min(1024, a.seq))

    def timed(**extra):
        sync()
        t0 = time.perf_counter()
        r = flexprefill.flex_prefill_attention(q, k, v, **kw, **extra)
        sync()
        return time.perf_counter() - t0, r

    for _ in range(a.warmup):
        timed()
    wall = [timed()[0] for _ in range(a.iters)]
    native = [timed(return_report=True)[1][1].timings.call for _ in range(a.iters)]
    w, n = statistics.median(wall), statistics.median(native)
    print(f"shape q {shapes[0]} kv {shapes[1]} {a.dtype} on {a.device}, {a.iters} calls")
    print(f"python call median {w * 1e6:10.1f} us")
    print(f"rust call median   {n * 1e6:10.1f} us")
    print(f"overhead           {(w - n) * 1e6:10.1f} us per call")


if __name__ == "__main__":
    main()
