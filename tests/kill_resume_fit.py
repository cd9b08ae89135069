"""A fit that SIGKILLs itself mid-epoch, or resumes it; run by test_faults_process.py as a script.

Usage: python kill_resume_fit.py TRACKING_URI ROOT_DIR OUT_JSON kill KILL_AT_STEP
       python kill_resume_fit.py TRACKING_URI ROOT_DIR OUT_JSON resume RUN_ID MAX_STEPS

One fake NVML GPU at a constant 100 W; checkpoints every 10 steps (``last.ckpt``) under
ROOT_DIR/ckpt; the spool is the default one under ROOT_DIR, shared by both processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

FAKE = FakeNvml([FakeGpu(power_w=100.0)])
sys.modules["pynvml"] = FAKE.module

from lightning_helpers import loader, make_module  # noqa: E402


def main() -> None:
    uri, root, out_path, phase = sys.argv[1:5]
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from wattlog import EnergyMonitor

    pl, module = make_module(step_sleep_s=0.02)
    monitor = EnergyMonitor(gpus=[0], cpu="none", ram="none", log_every_n_steps=1, carbon_intensity=100.0)
    ckpt = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=10, save_last=True)
    callbacks: list = [monitor, ckpt]
    if phase == "kill":
        kill_at = int(sys.argv[5])
        logger = MLFlowLogger(experiment_name="kill", tracking_uri=uri)
        max_steps, ckpt_path = 10 * kill_at, None

        class Killer(Callback):
            def on_train_batch_end(self, trainer, *args) -> None:  # after EnergyMonitor's hook
                if trainer.global_step == kill_at:
                    with open(out_path, "w") as fh:
                        json.dump({"run_id": logger.run_id}, fh)
                    # EnergyMonitor writes the spool at logging boundaries, batched every 0.25 s: let the
                    # steps so far reach the spool, as they would if the kill came a moment later
                    time.sleep(0.2)
                    monitor._session.drain()
                    os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no atexit: the sink is never closed

        callbacks.append(Killer())
    else:
        run_id, max_steps = sys.argv[5], int(sys.argv[6])
        logger = MLFlowLogger(experiment_name="kill", tracking_uri=uri, run_id=run_id)
        ckpt_path = os.path.join(root, "ckpt", "last.ckpt")
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=callbacks, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         limit_val_batches=0)
    trainer.fit(module, loader(1024), ckpt_path=ckpt_path)
    with open(out_path, "w") as fh:
        json.dump({"run_id": logger.run_id, "global_step": trainer.global_step,
                   "state": monitor.state_dict()}, fh)


if __name__ == "__main__":
    main()
