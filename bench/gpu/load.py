"""A GPU load process for the NVML measurements (parts 2 and 3), steered over stdin.

Runs in its own process so that the NVML poller in the parent never waits for the GIL. Commands, one a
line: ``level idle`` | ``level full`` | ``level duty:PERIOD_S:FRACTION`` | ``quit``; each is acknowledged
with ``ack LEVEL``. Prints ``ready DEVICE N`` once its matrices are warm.

``full`` issues N x N bf16 matrix products (N = 8192: about 1.1 TFLOP each, ~1.4 ms on an H200),
synchronising every 4 so that a level change takes effect within a few ms. ``duty`` runs products for
FRACTION of every PERIOD_S and sleeps for the rest. Dry run: float32 products on the CPU.
"""

from __future__ import annotations

import sys
import threading
import time

from common import DRY, P


def main() -> int:
    import torch

    cuda = torch.cuda.is_available() and not DRY
    dev = "cuda" if cuda else "cpu"
    n = int(P["matmul_n"])
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def burst(k: int) -> None:
        for _ in range(k):
            torch.mm(a, b)
        sync()

    burst(8)
    state = {"level": "idle"}

    def reader() -> None:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "quit":
                break
            if cmd[0] == "level" and len(cmd) == 2:
                state["level"] = cmd[1]
                print(f"ack {cmd[1]}", flush=True)
        state["level"] = "quit"

    threading.Thread(target=reader, daemon=True).start()
    print(f"ready {dev} {n}", flush=True)
    while True:
        level = state["level"]
        if level == "quit":
            break
        if level == "idle":
            time.sleep(0.002)
        elif level == "full":
            burst(4)
        elif level.startswith("duty:"):
            _, period_s, frac = level.split(":")
            period, on = float(period_s), float(frac) * float(period_s)
            phase = time.perf_counter() % period
            if phase < on:
                burst(1)
            else:
                time.sleep(min(0.002, period - phase))
        else:
            time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
