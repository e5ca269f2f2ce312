"""Python overhead per call: the host time of flexprefill.flex_prefill_attention minus the host
time of the Rust work inside it, paired call by call.

    python flexprefill-py/benches/overhead.py                       # CPU, small shapes
    python flexprefill-py/benches/overhead.py --device cuda --seq 32768 --heads 32 \\
        --kv-heads 8 --dim 128 --dtype bfloat16                     # the GPU bar (<= 50 us)

What is measured. Each timed call starts with the device idle (synchronised before the clock
starts, outside the timing) and the clock stops when the Python call returns. On CUDA the call
only queues its kernels on the current stream (no synchronisation), so its wall time is host
time: the Python layer (argument plumbing, current stream, torch.empty of the output), the
binding (DLPack export of q, k, v and the output, checks, GIL release) and the Rust call
`flexprefill_cuda::raw::flex_prefill_raw` (sequence table upload, work-buffer allocation and
kernel launches). The native module times that Rust call alone with a monotonic clock
(`_native.last_call_seconds()`), so wall minus Rust is what Python adds over a Rust caller of
the same device entry. GPU execution is in neither. On the CPU the Rust part is the whole
backend call (the computation included), so the difference is again the binding's share.

Prints medians (and the 90th percentile of the overhead) over --iters calls after --warmup.
"""

import argparse
import statistics
import time

import numpy as np

import flexprefill
from flexprefill import _native


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
    shapes = [(1, a.seq, a.heads, a.dim), (1, a.seq, a.kv_heads, a.dim),
              (1, a.seq, a.kv_heads, a.dim)]
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

    def timed():
        sync()
        t0 = time.perf_counter()
        flexprefill.flex_prefill_attention(q, k, v, **kw)
        t1 = time.perf_counter()
        return t1 - t0, _native.last_call_seconds()

    for _ in range(a.warmup):
        timed()
    pairs = [timed() for _ in range(a.iters)]
    sync()
    wall = [w for w, _ in pairs]
    native = [n for _, n in pairs]
    over = sorted(w - n for w, n in pairs)
    _, rep = flexprefill.flex_prefill_attention(q, k, v, **kw, return_report=True)
    mode = "dense" if rep.dense_fallback else f"sparse, density {rep.density:.3f}"
    print(f"shape q {shapes[0]} kv {shapes[1]} {a.dtype} on {a.device} ({mode}), "
          f"{a.iters} calls")
    print(f"python call median {statistics.median(wall) * 1e6:10.1f} us (host)")
    print(f"rust call median   {statistics.median(native) * 1e6:10.1f} us (host)")
    print(f"overhead median    {statistics.median(over) * 1e6:10.1f} us per call "
          f"(p90 {over[int(0.9 * (len(over) - 1))] * 1e6:.1f} us)")


if __name__ == "__main__":
    main()
