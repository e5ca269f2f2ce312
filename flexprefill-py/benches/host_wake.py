"""How long torch.empty(16) on CUDA takes right after different kinds of waiting: the host-side
cost of the first work after a wait of milliseconds, which the first code of a timed call pays
(benches/overhead.py). Medians of 60 samples each; needs torch with a CUDA device.

    python flexprefill-py/benches/host_wake.py
"""

import statistics
import time

import torch


def empty_us():
    t0 = time.perf_counter()
    torch.empty(16, device="cuda")
    return (time.perf_counter() - t0) * 1e6


def gpu_sleep_cycles(seconds):
    """torch.cuda._sleep's argument that keeps the GPU busy for about `seconds`."""
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10_000_000)
    torch.cuda.synchronize()
    return int(10_000_000 * seconds / (time.perf_counter() - t0))


def main():
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    cycles = gpu_sleep_cycles(0.005)

    def spin():
        end = time.perf_counter() + 0.005
        while time.perf_counter() < end:
            pass

    def poll_gpu():
        torch.cuda._sleep(cycles)
        ev = torch.cuda.Event()
        ev.record()
        while not ev.query():
            pass

    def sync_gpu():
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize()

    waits = [("back to back", lambda: None),
             ("after time.sleep(0.005)", lambda: time.sleep(0.005)),
             ("after a 5 ms Python busy loop", spin),
             ("after polling an event over a 5 ms GPU sleep", poll_gpu),
             ("after synchronize over a 5 ms GPU sleep", sync_gpu)]
    for name, wait in waits:
        xs = []
        for _ in range(60):
            wait()
            xs.append(empty_us())
        print(f"{name:<46} torch.empty(16) median {statistics.median(xs):6.1f} us")


if __name__ == "__main__":
    main()
