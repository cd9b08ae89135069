"""One node of a 2-node x 2-process CPU DDP (gloo) fit on loopback; run by test_multinode.py.

Usage: MASTER_ADDR=127.0.0.1 MASTER_PORT=P NODE_RANK=n python multinode_fit.py TRACKING_URI ROOT_DIR OUT_JSON
Lightning's LightningEnvironment reads MASTER_ADDR, MASTER_PORT and NODE_RANK; the node's process is
local rank 0 and launches local rank 1 itself (LOCAL_RANK set for the child); WORLD_SIZE is derived
(num_nodes x devices). Each process sees a fake NVML with 2 GPUs (100 W, 50 W) and measures the one
of its local rank; CPU and RAM are estimated by local rank 0 of each node.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

FAKE = FakeNvml([FakeGpu(power_w=100.0), FakeGpu(power_w=50.0)])
sys.modules["pynvml"] = FAKE.module

from lightning_helpers import loader, make_module  # noqa: E402


def main() -> None:
    faulthandler.dump_traceback_later(float(os.environ.get("DUMP_STACKS_AFTER_S", "120")), exit=False)
    uri, root, out_path = sys.argv[1:4]
    from lightning.pytorch.loggers import MLFlowLogger

    from wattlog import EnergyMonitor

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    pl, module = make_module(step_sleep_s=0.02)
    monitor = EnergyMonitor(gpus=[local_rank], cpu="estimate", ram="estimate", log_every_n_steps=1,
                            per_device=True, carbon_intensity=100.0, collective_timeout_s=60.0)
    logger = MLFlowLogger(experiment_name="multinode", tracking_uri=uri)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=2, num_nodes=2, strategy="ddp",
                         callbacks=[monitor], logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, limit_val_batches=0)
    trainer.fit(module, loader(256))
    if trainer.global_rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"run_id": logger.run_id, "world_size": trainer.world_size}, fh)


if __name__ == "__main__":
    main()
