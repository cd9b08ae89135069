"""Cost of EnergyMeter.mark() on the calling thread and CPU share of the sampler thread.

Run: .venv/bin/python bench/meter_overhead.py [--calls 100000] [--seconds 10]
Targets (issue 2): mark() median <= 5 us; sampler <= 1 % of one core at the default cadence.
Uses the fake NVML from tests/fakes (2 GPUs with energy counters): no GPU needed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    fake = FakeNvml([FakeGpu(power_w=250.0), FakeGpu(power_w=200.0)])
    sys.modules["pynvml"] = fake.module
    from wattlog.meter import DEFAULT_SAMPLE_INTERVAL_S, EnergyMeter
    from wattlog.sources.nvml import NvmlGpu

    meter = EnergyMeter([NvmlGpu()])
    meter.start()
    clock = time.perf_counter_ns
    costs_ns = []
    for i in range(args.calls):
        t0 = clock()
        meter.mark(i)
        costs_ns.append(clock() - t0)
        if i % 1000 == 999:
            meter.drain()
    costs_ns.sort()
    median_us = statistics.median(costs_ns) / 1e3
    p99_us = costs_ns[int(0.99 * len(costs_ns))] / 1e3
    meter.drain()

    cpu0, wall0 = meter.sampler_cpu_time_s, time.perf_counter()
    time.sleep(args.seconds)
    cpu_share = (meter.sampler_cpu_time_s - cpu0) / (time.perf_counter() - wall0)
    reads = fake.calls.get("nvmlDeviceGetTotalEnergyConsumption", 0)
    meter.close()

    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"mark(): {args.calls} calls, median {median_us:.2f} us, p99 {p99_us:.2f} us (target median <= 5 us)")
    print(f"sampler: cadence {DEFAULT_SAMPLE_INTERVAL_S * 1000:.0f} ms, 2 fake GPUs, {reads} counter reads, "
          f"CPU share {100 * cpu_share:.3f} % of one core over {args.seconds:.0f} s (target <= 1 %)")
    print("note: the fake NVML read is pure Python; the cost of real NVML reads was not measured here (no GPU)")


if __name__ == "__main__":
    main()
