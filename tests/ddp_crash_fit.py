"""2-process CPU DDP (gloo) fit where rank 1 fails; run by test_faults_process.py as a script.

Usage: python ddp_crash_fit.py TRACKING_URI ROOT_DIR OUT_JSON STALL_AT_STEP CRASH_AT_STEP
At STALL_AT_STEP rank 1 sleeps 4x wattlog's collective timeout (2 s) right before wattlog's logging
boundary, then carries on (wattlog's pumps keep exchanging rounds meanwhile, off the training threads). At CRASH_AT_STEP rank 1 raises
in ``training_step``. A step of 0 disables that fault.
Rank 0 writes OUT_JSON (run id, how the fit ended) as soon as it knows the run id and again at the end.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

FAKE = FakeNvml([FakeGpu(power_w=100.0), FakeGpu(power_w=50.0)])
sys.modules["pynvml"] = FAKE.module

from lightning_helpers import loader, make_module  # noqa: E402

TIMEOUT_S = 2.0


def main() -> None:
    faulthandler.dump_traceback_later(float(os.environ.get("DUMP_STACKS_AFTER_S", "90")), exit=False)  # hang diagnosis
    uri, root, out_path = sys.argv[1:4]
    stall_at, crash_at = int(sys.argv[4]), int(sys.argv[5])
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import MLFlowLogger

    from wattlog import EnergyMonitor

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    pl, module = make_module(step_sleep_s=0.02)
    if crash_at:
        original = module.training_step

        def training_step(batch, batch_idx):
            if module.global_rank == 1 and module.trainer.global_step == crash_at:
                raise RuntimeError("injected crash of rank 1")
            return original(batch, batch_idx)

        module.training_step = training_step

    class Stall(Callback):  # listed before EnergyMonitor: runs before its logging boundary
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_rank == 1 and trainer.global_step == stall_at:
                time.sleep(4 * TIMEOUT_S)

    class Report(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            if trainer.global_rank == 0:
                self.write(trainer, "started")

        def on_exception(self, trainer, pl_module, exception) -> None:
            if trainer.global_rank == 0:
                self.write(trainer, f"exception: {type(exception).__name__}: {str(exception)[:300]}")

        @staticmethod
        def write(trainer, how: str) -> None:
            with open(out_path, "w") as fh:
                json.dump({"run_id": logger.run_id, "how": how, "global_step": trainer.global_step}, fh)

    monitor = EnergyMonitor(gpus=[local_rank], cpu="none", ram="none", log_every_n_steps=1,
                            carbon_intensity=100.0, collective_timeout_s=TIMEOUT_S)
    logger = MLFlowLogger(experiment_name="ddp-fault", tracking_uri=uri)
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", devices=2, strategy="ddp",
                         callbacks=[Report(), Stall(), monitor], logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         limit_val_batches=0)
    torch.manual_seed(0)
    trainer.fit(module, loader(256))
    if trainer.global_rank == 0:
        Report.write(trainer, "finished")


if __name__ == "__main__":
    main()
