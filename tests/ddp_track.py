"""A 2-process gloo loop with ``wattlog.track()`` and a fake NVML GPU per rank; run by test_ddp.py.

Usage: torchrun --nproc-per-node 2 ddp_track.py TRACKING_URI OUT_JSON
Rank r measures only NVML index r (100 W and 50 W); rank 0 holds the MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

FAKE = FakeNvml([FakeGpu(power_w=100.0), FakeGpu(power_w=50.0)])
sys.modules["pynvml"] = FAKE.module

N_STEPS = 12


def main() -> None:
    import mlflow
    import torch.distributed as dist

    import wattlog

    uri, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mlflow.set_tracking_uri(uri)
    run = mlflow.start_run(experiment_id=mlflow.set_experiment("ddp-track").experiment_id) if rank == 0 else None
    with wattlog.track(gpus=[rank], cpu="none", ram="none", per_device=True, carbon_intensity=100.0) as energy:
        for step in range(N_STEPS):
            time.sleep(0.05)
            dist.barrier()
            energy.step(step, samples=4)
    if rank == 0:
        mlflow.end_run()
        with open(out_path, "w") as fh:
            json.dump({"run_id": run.info.run_id, "n_steps": N_STEPS}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
