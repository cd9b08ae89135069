"""A 2-process CPU DDP (gloo) fit with a fake NVML GPU per rank; run by test_ddp.py as a script.

Usage: python ddp_fit.py TRACKING_URI OUT_JSON ROOT_DIR
Each rank measures only its own fake GPU (rank r -> NVML index r, 100 W and 50 W).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

FAKE = FakeNvml([FakeGpu(power_w=100.0), FakeGpu(power_w=50.0)])
sys.modules["pynvml"] = FAKE.module

from lightning_helpers import loader, make_module  # noqa: E402


def main() -> None:
    uri, out_path, root = sys.argv[1], sys.argv[2], sys.argv[3]
    from lightning.pytorch.loggers import MLFlowLogger

    from wattlog import EnergyMonitor

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    pl, module = make_module(step_sleep_s=0.02)
    monitor = EnergyMonitor(gpus=[local_rank], cpu="none", ram="none", log_every_n_steps=1, per_device=True,
                            carbon_intensity=100.0)
    logger = MLFlowLogger(experiment_name="ddp", tracking_uri=uri)
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", devices=2, strategy="ddp", callbacks=[monitor],
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, limit_val_batches=0)
    trainer.fit(module, loader(256))
    if trainer.global_rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"run_id": logger.run_id, "world_size": trainer.world_size}, fh)


if __name__ == "__main__":
    main()
