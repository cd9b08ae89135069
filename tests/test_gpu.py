"""Real-GPU checks (marked `gpu`, skipped without CUDA): the real NVML path end to end.

On a machine with an NVIDIA GPU these verify what the fakes cannot: NVML maps the CUDA device by
UUID, the energy counter advances, CUDA-event step boundaries resolve, and the run's energy is
plausible against the GPU's power limit.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def test_nvml_counter_advances_under_load():
    from wattlog.meter import EnergyMeter
    from wattlog.sources.nvml import NvmlGpu

    source = NvmlGpu(cuda_devices=[0])
    meter = EnergyMeter([source])
    domains = meter.start()
    assert len(domains) == 1
    limit_w = domains[0].power_limit_w
    x = torch.randn(4096, 4096, device="cuda")
    with meter.window("matmul") as w:
        for _ in range(200):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()
    meter.close()
    assert w.total_j > 0
    if limit_w:
        assert w.power_w <= 1.2 * limit_w


def test_energy_monitor_on_cuda(tmp_path, mlflow_uri):
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning_helpers import loader, make_module
    from mlflow import MlflowClient

    from wattlog import EnergyMonitor

    pl, module = make_module()
    logger = MLFlowLogger(experiment_name="gpu", tracking_uri=mlflow_uri)
    trainer = pl.Trainer(max_steps=50, accelerator="gpu", devices=1, logger=logger,
                         callbacks=[EnergyMonitor(log_every_n_steps=1, cpu="none", ram="none")],
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, loader(512))
    run = MlflowClient(mlflow_uri).get_run(logger.run_id)
    assert run.data.params["energy.gpu_count"] == "1"
    assert run.data.params["energy.gpu_method"] in ("counter", "power", "power_avg")
    assert run.data.metrics["energy/gpu_kwh"] > 0
    steps = {m.step for m in MlflowClient(mlflow_uri).get_metric_history(logger.run_id, "energy/step_j")}
    assert steps >= set(range(1, 51))
