"""One of several concurrent fits against a shared ``mlflow server``; run by test_outage_concurrent.py.

Usage: python concurrent_fit.py TRACKING_URI ROOT_DIR N_STEPS STEP_SLEEP_S

MLflow's default client settings (no retry or timeout variables set). One fake NVML GPU at 100 W.
Writes ROOT_DIR/started.json (run id) after its first step and ROOT_DIR/done.json at the end; every
wattlog warning goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

FAKE = FakeNvml([FakeGpu(power_w=100.0)])
sys.modules["pynvml"] = FAKE.module

from lightning_helpers import loader, make_module  # noqa: E402


def main() -> None:
    uri, root, n_steps, step_sleep_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import MLFlowLogger

    from wattlog import EnergyMonitor

    pl, module = make_module(step_sleep_s=step_sleep_s, log=False)  # no self.log: Lightning sends nothing per step
    logger = MLFlowLogger(experiment_name="concurrent", tracking_uri=uri)
    monitor = EnergyMonitor(gpus=[0], cpu="none", ram="none", log_every_n_steps=1, artifacts=False,
                            spool_dir=os.path.join(root, "spool"), delivery_timeout_s=150)

    class Started(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 1:
                with open(os.path.join(root, "started.json"), "w") as fh:
                    json.dump({"run_id": logger.run_id}, fh)

    trainer = pl.Trainer(max_steps=n_steps, accelerator="cpu", callbacks=[monitor, Started()], logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=root, limit_val_batches=0, log_every_n_steps=1)
    t0 = time.monotonic()
    trainer.fit(module, loader(4 * n_steps))
    with open(os.path.join(root, "done.json"), "w") as fh:
        json.dump({"run_id": logger.run_id, "global_step": trainer.global_step, "fit_s": time.monotonic() - t0,
                   "end": time.time()}, fh)


if __name__ == "__main__":
    main()
