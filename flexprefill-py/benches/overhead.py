"""Python overhead per call: the host time of flexprefill.flex_prefill_attention minus the host
time of the Rust work inside it, paired call by call.

    python flexprefill-py/benches/overhead.py                       # CPU, small shapes
    python flexprefill-py/benches/overhead.py --device cuda --seq 32768 --heads 32 \\
        --kv-heads 8 --dim 128 --dtype bfloat16                     # the GPU bar (<= 50 us)
    ... --breakdown                                                 # and where the time goes

What is measured. On CUDA the call only queues its kernels on the current stream (no
synchronisation), so its wall time is host time: the Python layer (argument plumbing,
torch.empty of the output), the binding (DLPack export of q, k, v and the output, the current
stream, checks) and the Rust work a Rust caller of the same device entry does too:
`flexprefill_cuda::raw::flex_prefill_raw` (sequence table upload, work buffers from the pool,
kernel launches) and dropping the `DeviceRun` it returns (which queues the release of those
buffers). The native module times that Rust work with a monotonic clock
(`_native.last_call_seconds()`), so wall minus Rust is what Python adds over a Rust caller. GPU
execution is in neither. On the CPU the Rust part is the whole backend call (the computation
included), so the difference is again the binding's share.

How each timed call starts (--waits, all three by default on CUDA):
  queued  behind the previous call, as a model's layers call it: bursts of three calls with no
          synchronisation between them, the second and third timed (the GPU still runs the
          one before);
  poll    with the GPU idle, the host thread awake: the previous call's completion is awaited
          by polling a CUDA event;
  sync    with the GPU idle after torch.cuda.synchronize(), in which the host thread may
          sleep for the whole previous call (milliseconds at 32k).
After a wait of milliseconds the first host work is slow on the H200 machine whoever does it
(torch.empty(16) took 60 us after time.sleep(0.005) with no GPU work, 3-7 us otherwise), polled
or slept; the Python layer runs first in a call, so the poll and sync rows carry part of that.
On the CPU only `sync` applies (there is nothing queued).

Prints medians (and the 90th percentile of the overhead) over --iters calls after --warmup.
--breakdown (torch tensors) then times the pieces of a call separately, each in its own loop
(each from an idle GPU, awaited as `poll` does on CUDA): the Python layer (whole call minus
the native call), its CUDA preparation (the current stream and torch.empty of the output when
torch has no DLPack C exchange API; with one the native call does both in C), the native
call split into Rust and binding, and for comparison torch's Python-level DLPack export and
current-stream lookup, which the binding replaces with DLPack's C exchange API where torch
offers it.
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
    ap.add_argument("--waits", default=None,
                    help="comma list of queued, poll, sync (default: all on CUDA, sync on CPU)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each piece of a call (torch tensors)")
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    shapes = [(1, a.seq, a.heads, a.dim), (1, a.seq, a.kv_heads, a.dim),
              (1, a.seq, a.kv_heads, a.dim)]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    device_sync = lambda: None  # noqa: E731
    poll = None
    if a.device == "cpu" and a.dtype != "bfloat16":
        q, k, v = (x.astype(a.dtype) for x in arrays)
    else:
        import torch

        dev = "cuda" if a.device == "cuda" else "cpu"
        q, k, v = (torch.from_numpy(x).to(dev, getattr(torch, a.dtype)) for x in arrays)
        if dev == "cuda":
            device_sync = torch.cuda.synchronize

            def poll():  # the GPU idle, without letting the host thread sleep
                ev = torch.cuda.Event()
                ev.record()
                while not ev.query():
                    pass
    kw = dict(block_size=128, min_budget=min(1024, a.seq))
    waits = (a.waits or ("queued,poll,sync" if poll else "sync")).split(",")

    def call():
        t0 = time.perf_counter()
        flexprefill.flex_prefill_attention(q, k, v, **kw)
        t1 = time.perf_counter()
        return t1 - t0, _native.last_call_seconds()

    def measured(wait):
        if wait == "queued":
            pairs = []
            while len(pairs) < a.iters:
                device_sync()
                flexprefill.flex_prefill_attention(q, k, v, **kw)
                pairs += [call(), call()]
            return pairs
        if wait == "poll" and poll is None:
            raise SystemExit("--waits poll needs --device cuda")
        if wait not in ("poll", "sync"):
            raise SystemExit(f"unknown wait {wait!r}: queued, poll or sync")
        idle = poll if wait == "poll" else device_sync
        pairs = []
        for _ in range(a.iters):
            idle()
            pairs.append(call())
        return pairs

    for _ in range(a.warmup):
        device_sync()
        call()
    rows = [(w, measured(w)) for w in waits]
    device_sync()
    _, rep = flexprefill.flex_prefill_attention(q, k, v, **kw, return_report=True)
    mode = "dense" if rep.dense_fallback else f"sparse, density {rep.density:.3f}"
    print(f"shape q {shapes[0]} kv {shapes[1]} {a.dtype} on {a.device} ({mode}), "
          f"{a.iters} calls per row")
    print(f"{'start':<8}{'python call':>14}{'rust':>12}{'overhead':>12}{'(p90)':>10}   us, medians")
    for w, pairs in rows:
        over = sorted(x - n for x, n in pairs)
        print(f"{w:<8}{statistics.median(x for x, _ in pairs) * 1e6:14.1f}"
              f"{statistics.median(n for _, n in pairs) * 1e6:12.1f}"
              f"{statistics.median(over) * 1e6:12.1f}"
              f"{over[int(0.9 * (len(over) - 1))] * 1e6:10.1f}")
    if a.breakdown:
        if isinstance(q, np.ndarray):
            print("--breakdown times torch tensors: use --device torch-cpu or cuda")
        else:
            breakdown(q, k, v, kw, poll or device_sync, a.iters, a.warmup)


def breakdown(q, k, v, kw, sync, iters, warmup):
    """Medians of each piece of a call, each timed in its own loop (from an idle device, as the
    whole call); the pieces of one call are not paired, so sums are approximate."""
    import torch
    from flexprefill import _api

    cuda = q.is_cuda
    c_api = getattr(_native, "stream_from_producer", lambda _: False)  # older builds: none

    def med(fn, after=None):
        times = []
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0, after() if after else 0.0))
        return (statistics.median(t for t, _ in times) * 1e6,
                statistics.median(x for _, x in times) * 1e6)

    def prepared():
        # The arguments flex_prefill_attention hands the native call (its _call), made ahead.
        stream, out, lse = _api._cuda_call(q, None, None, False)[:3] if cuda else (None,) * 3
        return (q, k, v, None, None, None, None, 0.9, 0.1, kw["min_budget"], None,
                kw["block_size"], None, None, False, False, stream, False, out, lse, None)

    args = prepared()
    whole, _ = med(lambda: flexprefill.flex_prefill_attention(q, k, v, **kw))
    native, rust = med(lambda: _native.attention(*args), _native.last_call_seconds)
    rows = [("whole call", whole, ""),
            ("  python layer", whole - native, "whole call - native call")]
    if cuda:
        stream_in_c = args[16] is None
        prep, _ = med(lambda: _api._cuda_call(q, None, None, False))
        rows.append(("    cuda preparation", prep,
                     "none: stream and output through the C exchange API" if stream_in_c
                     else "torch.empty(out) + current_stream"))
    rows += [("  native call", native, "_native.attention"),
             ("    rust", rust, "raw call + DeviceRun drop" if cuda else "backend call"),
             ("    binding", native - rust, "parse, DLPack export, checks, GIL release"
              + (" (C exchange API)" if c_api(q) else " (__dlpack__)"))]
    for name, us, what in rows:
        print(f"{name:<22}{us:10.1f} us  {what}")
    split = getattr(_native, "last_call_breakdown", None)  # older builds: none
    if cuda and split is not None:
        # One loop, each call split where it runs: Python before the binding and after it,
        # the binding before the Rust work and after it (`after` also holds the return to
        # Python up to the query).
        parts = []
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            flexprefill.flex_prefill_attention(q, k, v, **kw)
            t1 = time.perf_counter()
            before, after = split()
            if i >= warmup:
                parts.append((t1 - t0, before, _native.last_call_seconds(), after))
        m = [statistics.median(p[j] for p in parts) * 1e6 for j in range(4)]
        print(f"one loop, paired: whole {m[0]:.1f} = binding before rust {m[1]:.1f} + rust "
              f"{m[2]:.1f} + binding after rust {m[3]:.1f} + python layer "
              f"{statistics.median(p[0] - p[1] - p[2] - p[3] for p in parts) * 1e6:.1f} (us)")
    pieces = [("torch.empty(out)",
               lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device)),
              ("q.__dlpack__", lambda: q.__dlpack__(max_version=(1, 0), stream=-1)),
              ("q.__dlpack_device__", q.__dlpack_device__),
              ("_C._to_dlpack_versioned",
               lambda: getattr(torch._C, "_to_dlpack_versioned", torch._C._to_dlpack)(q))]
    if cuda:
        pieces.insert(1, ("current_stream",
                          lambda: torch.cuda.current_stream(q.device).cuda_stream))
    print("alone: " + " | ".join(f"{n} {med(f)[0]:.1f}" for n, f in pieces) + " (us)")


if __name__ == "__main__":
    main()
