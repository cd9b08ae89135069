"""EnergyMonitor end to end: fake NVML at known power, a real sqlite MLflow store."""

from __future__ import annotations

import csv
import io
import math

import pytest

pytest.importorskip("lightning")

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402
from lightning_helpers import loader, make_module, metric_history  # noqa: E402

from wattlog import EnergyMonitor  # noqa: E402
from wattlog.errors import ConfigError, NoRunError  # noqa: E402

STEP_KEYS = ["energy/step_j", "energy/power_w", "energy/gpu_power_w", "energy/total_j", "energy/emissions_g"]


def _power(t: float) -> float:
    return 150.0 + 50.0 * math.sin(2.0 * t)


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = FakeNvml([FakeGpu(power_w=_power), FakeGpu(power_w=80.0)])
    fake.install(monkeypatch)
    return fake


def _fit(pl, module, monitor, uri, tmp_path, steps, **trainer_kwargs):
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="t", tracking_uri=uri)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[monitor], logger=logger, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2,
        val_check_interval=10, accelerator="cpu", **trainer_kwargs,
    )
    trainer.fit(module, loader(256), loader(16))
    return trainer, logger


@pytest.mark.slow
def test_fit_logs_contract_keys_with_ground_truth(fake_nvml, mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    pl, module = make_module(step_sleep_s=0.08)
    monitor = EnergyMonitor(gpus=[0, 1], cpu="none", ram="none", log_every_n_steps=1, carbon_intensity=400.0,
                            pue=1.2, per_device=True, target={"metric": "val_acc", "value": 0.0, "mode": "max"})
    trainer, logger = _fit(pl, module, monitor, mlflow_uri, tmp_path, steps=40)
    run_id = logger.run_id
    client = MlflowClient(mlflow_uri)

    for key in STEP_KEYS + ["energy/gpu0_power_w", "energy/gpu1_power_w"]:
        hist = metric_history(mlflow_uri, run_id, key)
        steps = sorted(m.step for m in hist)
        if key in ("energy/total_j", "energy/emissions_g"):  # + the run total at the stage's step (global step)
            assert steps[-1] == 40
            steps = steps[:-1]
        assert steps == list(range(0, 40)), key  # one point per key per step, at Lightning's own steps
    total = sorted(metric_history(mlflow_uri, run_id, "energy/total_j"), key=lambda m: (m.step, m.timestamp))
    per_step = [m.value for m in total]
    assert all(b >= a for a, b in zip(per_step, per_step[1:]))  # monotonic

    run = client.get_run(run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    # ground truth from the fake over the measured span (trace.csv's first start .. last end)
    trace_path = client.download_artifacts(run_id, "energy/trace.csv", str(tmp_path))
    rows = list(csv.DictReader(open(trace_path)))
    t0, t1 = float(rows[0]["t_start_s"]), float(rows[-1]["t_end_s"])
    assert t1 - t0 >= 3.0
    truth_j = fake_nvml.true_energy_j(0, t0, t1) + fake_nvml.true_energy_j(1, t0, t1)
    assert metrics["energy/total_j"] == pytest.approx(truth_j, rel=0.02)
    assert metrics["energy/emissions_g"] == pytest.approx(metrics["energy/total_j"] / 3.6e6 * 1.2 * 400.0, rel=1e-9)
    assert metrics["energy/gpu_j"] == pytest.approx(metrics["energy/total_j"], rel=1e-9)
    assert "energy/cpu_j" not in metrics and "energy/ram_j" not in metrics  # only what was measured
    for key in ("energy/train_j", "energy/val_j", "energy/j_per_sample", "energy/avg_power_w",
                "energy/duration_s", "energy/j_to_target"):
        assert key in metrics, key
    assert metrics["energy/j_per_sample"] == pytest.approx(metrics["energy/train_j"] / (40 * 4), rel=1e-6)
    assert 200 < metrics["energy/avg_power_w"] < 320
    # train + val + other add up to the total
    stage_sum = sum(float(r["total_j"]) for r in rows)
    assert stage_sum == pytest.approx(metrics["energy/total_j"], rel=1e-9)
    assert params["energy.gpu_count"] == "2"
    assert params["energy.gpu_method"] == "counter"
    assert params["energy.cpu_method"] == "none"
    assert params["energy.carbon_intensity_g_per_kwh"] == "400.0"
    assert params["energy.carbon_source"] == "user"
    assert params["energy.pue"] == "1.2"
    assert "energy.gpu_model" in params and "energy.ram_method" in params
    assert tags["energy.estimated"] == "none"
    assert "energy.degraded" not in tags
    artifacts = {a.path for a in client.list_artifacts(run_id, "energy")}
    assert {"energy/trace.csv", "energy/power.png"} <= artifacts
    assert {r["stage"] for r in rows} >= {"train", "val"}


def test_estimated_cpu_labelled_and_test_stage(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    pl, module = make_module()
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=2)
    trainer, logger = _fit(pl, module, monitor, mlflow_uri, tmp_path, steps=6)
    trainer.test(module, loader(32))
    run = MlflowClient(mlflow_uri).get_run(logger.run_id)
    assert run.data.tags["energy.estimated"] == "cpu,ram"
    assert run.data.params["energy.cpu_method"] == "estimate"
    assert run.data.params["energy.gpu_method"] == "none"
    assert run.data.metrics["energy/test_j_per_sample"] > 0
    assert run.data.metrics["energy/test_j"] > 0
    steps = sorted(m.step for m in metric_history(mlflow_uri, logger.run_id, "energy/step_j"))
    assert steps == [1, 3, 5]  # Lightning's rule: (step + 1) % log_every_n_steps == 0


def test_active_run_fallback_and_no_run_error(mlflow_uri, tmp_path):
    import mlflow

    pl, module = make_module()
    trainer = pl.Trainer(max_steps=2, callbacks=[EnergyMonitor(gpus="none", cpu="estimate", ram="none")],
                         logger=False, enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(NoRunError, match="MLFlowLogger"):
        trainer.fit(module, loader(16))
    mlflow.set_tracking_uri(mlflow_uri)
    try:
        with mlflow.start_run() as run:
            trainer = pl.Trainer(max_steps=3, callbacks=[EnergyMonitor(gpus="none", cpu="estimate", ram="none",
                                                                       log_every_n_steps=1)],
                                 logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                                 accelerator="cpu")
            trainer.fit(module, loader(16))
        assert len(metric_history(mlflow_uri, run.info.run_id, "energy/total_j")) >= 3
    finally:
        mlflow.set_tracking_uri(None)


def test_pytorch_lightning_namespace(mlflow_uri, tmp_path):
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import MLFlowLogger

    pl, module = make_module("pytorch_lightning")
    logger = MLFlowLogger(experiment_name="pl", tracking_uri=mlflow_uri)
    trainer = pl.Trainer(max_steps=3, callbacks=[EnergyMonitor(gpus="none", cpu="estimate", ram="none",
                                                               log_every_n_steps=1)],
                         logger=logger, enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, loader(16))
    assert sorted(m.step for m in metric_history(mlflow_uri, logger.run_id, "energy/step_j")) == [0, 1, 2]


def test_resume_continues_totals(mlflow_uri, tmp_path):
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    pl, module = make_module(step_sleep_s=0.2)  # longer than the CPU estimate's 0.5 s update interval
    ckpt_dir = tmp_path / "ckpt"
    kwargs = dict(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1)
    logger = MLFlowLogger(experiment_name="r", tracking_uri=mlflow_uri)
    first = EnergyMonitor(**kwargs)
    trainer = pl.Trainer(max_steps=4, callbacks=[first, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                         logger=logger, default_root_dir=tmp_path, accelerator="cpu", enable_model_summary=False)
    trainer.fit(module, loader(64))
    first_total = MlflowClient(mlflow_uri).get_run(logger.run_id).data.metrics["energy/total_j"]
    assert first.state_dict()["total_j"] == pytest.approx(first_total)
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)["callbacks"]["EnergyMonitor"]
    assert 0 < saved["total_j"] <= first_total  # the checkpoint holds the totals at step 4
    assert saved["run_id"] == logger.run_id

    logger2 = MLFlowLogger(experiment_name="r", tracking_uri=mlflow_uri, run_id=logger.run_id)
    second = EnergyMonitor(**kwargs)
    trainer = pl.Trainer(max_steps=8, callbacks=[second], logger=logger2, default_root_dir=tmp_path,
                         accelerator="cpu", enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, loader(64), ckpt_path=str(ckpt_dir / "last.ckpt"))
    hist = sorted(metric_history(mlflow_uri, logger.run_id, "energy/total_j"), key=lambda m: (m.step, m.timestamp))
    resumed = [m.value for m in hist if m.step == 5]
    assert resumed and resumed[-1] > saved["total_j"]  # continues from the checkpoint, no restart
    values = [m.value for m in hist]
    assert values == sorted(values), [(m.step, m.value) for m in hist]  # never decreases
    assert second.state_dict()["total_j"] > saved["total_j"]


def test_nvml_config_fails_clearly_on_cpu(mlflow_uri, tmp_path):
    from wattlog.errors import SourceUnavailable

    pl, module = make_module()
    monitor = EnergyMonitor(gpus="auto", cpu="none", ram="none", require_gpu_counter=True)
    with pytest.raises(SourceUnavailable, match="no CUDA GPU"):
        _fit(pl, module, monitor, mlflow_uri, tmp_path, steps=2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"gpus": "all"}, "gpus"), ({"gpus": [0, 0]}, "gpus"), ({"cpu": "rapll"}, "cpu"), ({"ram": "dimm"}, "ram"),
        ({"pue": 0.5}, "pue"), ({"pue": "abc"}, "pue"), ({"carbon_intensity": -1}, "carbon_intensity"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"), ({"sample_interval_s": 0}, "sample_interval_s"),
        ({"sync_cuda": "yes"}, "sync_cuda"), ({"target": {"metric": "a"}}, "target"),
        ({"target": {"metric": "a", "value": 1, "mode": "up"}}, "target.mode"),
        ({"idle_baseline_s": -1}, "idle_baseline_s"), ({"country": ""}, "country"),
        ({"batch_size_fn": 3}, "batch_size_fn"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        EnergyMonitor(**kwargs)
    assert str(err.value).startswith(f"{field}=")
    assert "allowed" in str(err.value)


def test_other_loggers_idle_baseline_and_gradient_accumulation(mlflow_uri, tmp_path):
    import csv as csv_mod

    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
    from mlflow import MlflowClient

    pl, module = make_module(step_sleep_s=0.01)
    mlf = MLFlowLogger(experiment_name="multi", tracking_uri=mlflow_uri)
    csv_logger = CSVLogger(tmp_path / "csv")
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1, idle_baseline_s=0.2,
                            artifacts=False)
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[monitor], logger=[mlf, csv_logger],
                         enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu",
                         enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(module, loader(64))
    # two batches per optimizer step: one point per optimizer step, energy of both batches
    steps = sorted(m.step for m in metric_history(mlflow_uri, mlf.run_id, "energy/step_j"))
    assert steps == [0, 1, 2, 3]
    metrics = MlflowClient(mlflow_uri).get_run(mlf.run_id).data.metrics
    assert metrics["energy/j_per_sample"] == pytest.approx(metrics["energy/train_j"] / (8 * 4), rel=1e-6)
    assert "energy/idle_power_w" in metrics and "energy/dynamic_j" in metrics
    trainer.loggers[1].save()
    rows = list(csv_mod.DictReader(open(tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]) for r in rows if r.get("energy/step_j")}
    assert logged == {0, 1, 2, 3}


def test_cuda_boundaries_mark_in_order_when_events_complete():
    import threading
    import time

    from wattlog.integrations.cuda_marks import CudaBoundaries

    class FakeEvent:
        def __init__(self):
            self.done = threading.Event()
            self.recorded = False

        def record(self):
            self.recorded = True

        def synchronize(self):
            self.done.wait(5)

    events = []

    def factory():
        events.append(FakeEvent())
        return events[-1]

    class Session:
        def __init__(self):
            self.marks = []

        def mark(self, label, t):
            self.marks.append((label, t))

        def step_completed(self, step, t):
            self.marks.append((step, t))

    meter = Session()
    marks = CudaBoundaries(meter, event_factory=factory)
    marks.start()
    marks.mark("a")
    marks.mark(None, 7)
    time.sleep(0.05)
    assert meter.marks == []  # the GPU has not reached the boundaries yet: nothing marked, nothing blocked
    events[0].done.set()
    time.sleep(0.05)
    events[1].done.set()
    marks.stop()
    assert [m[0] for m in meter.marks] == ["a", 7]
    assert meter.marks[1][1] - meter.marks[0][1] >= 0.04
    assert all(e.recorded for e in events)


def test_failing_chart_degrades_instead_of_killing_the_fit(mlflow_uri, tmp_path, monkeypatch):
    import wattlog.artifacts
    from mlflow import MlflowClient

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)

    class BrokenChart:  # what ChartJob reports when its child process fails (e.g. no matplotlib there)
        def __init__(self, rows, estimated):
            pass

        def collect(self, timeout_s):
            return None, wattlog.artifacts.ChartError("ModuleNotFoundError: No module named 'matplotlib'")

        def cleanup(self):
            pass

    monkeypatch.setattr(wattlog.artifacts, "ChartJob", BrokenChart)
    pl, module = make_module()
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="none", log_every_n_steps=1)
    with pytest.warns(UserWarning, match="power.png skipped: ChartError: ModuleNotFoundError"):
        trainer, logger = _fit(pl, module, monitor, mlflow_uri, tmp_path, steps=4)
        monitor._session.wait_finished()  # the chart is finished off the training thread
    assert trainer.global_step == 4
    client = MlflowClient(mlflow_uri)
    assert {a.path for a in client.list_artifacts(logger.run_id, "energy")} == {"energy/trace.csv"}
    assert "power.png skipped" in client.get_run(logger.run_id).data.tags["energy.degraded"]


@pytest.mark.parametrize("reshaped", ["no", "transfer_hook", "collate"])
def test_samples_are_predicted_only_where_torch_builds_every_batch(mlflow_uri, tmp_path, reshaped):
    """A plain loader's full batches are not looked at (the hot path's count is its batch size, checked
    every 64th batch); its epoch's last, partial batch is counted. A batch-transfer hook or a collate_fn
    that may change a batch's size makes every batch counted."""
    import torch
    from mlflow import MlflowClient
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    pl, module = make_module()
    if reshaped == "transfer_hook":  # e.g. augmentation on the device: two views of each sample
        module.on_after_batch_transfer = lambda batch, idx: [torch.cat([t, t]) for t in batch]
    x = torch.randn(10, 8)
    collate = (lambda items: [torch.cat([t, t]) for t in default_collate(items)]) if reshaped == "collate" else None
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, collate_fn=collate)  # 4, 4, 2
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1, artifacts=False)
    logger = MLFlowLogger(experiment_name="t", tracking_uri=mlflow_uri)
    trainer = pl.Trainer(max_epochs=3, callbacks=[monitor], logger=logger, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         accelerator="cpu", log_every_n_steps=1)
    trainer.fit(module, data)
    assert (monitor._batch_size, monitor._full_batches) == ((4, 2) if reshaped == "no" else (0, 0))
    metrics = MlflowClient(mlflow_uri).get_run(logger.run_id).data.metrics
    samples = 3 * 10 * (1 if reshaped == "no" else 2)
    assert metrics["energy/j_per_sample"] == pytest.approx(metrics["energy/train_j"] / samples, rel=1e-6)
    assert [m.step for m in metric_history(mlflow_uri, logger.run_id, "energy/step_j")] == list(range(9))


def test_manual_optimization_logs_energy_at_each_batch_like_its_metrics(mlflow_uri, tmp_path):
    """Manual optimization: Lightning logs every batch at its own step (whether or not it stepped an
    optimizer), and so does the energy."""
    import torch
    from mlflow import MlflowClient

    pl, _ = make_module()

    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.manual_backward(loss)
            if batch_idx % 2:  # an optimizer step every second batch
                self.optimizers().step()
                self.optimizers().zero_grad()
            self.log("train_loss", loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1, artifacts=False)
    trainer, logger = _fit(pl, Manual(), monitor, mlflow_uri, tmp_path, 6, log_every_n_steps=1,
                           enable_progress_bar=False)
    steps = [m.step for m in metric_history(mlflow_uri, logger.run_id, "energy/step_j")]
    assert steps == [m.step for m in metric_history(mlflow_uri, logger.run_id, "train_loss")] == list(range(12))
    metrics = MlflowClient(mlflow_uri).get_run(logger.run_id).data.metrics
    assert metrics["energy/j_per_sample"] == pytest.approx(metrics["energy/train_j"] / (12 * 4), rel=1e-6)


def test_a_predicted_batch_size_that_a_check_contradicts_is_dropped_with_a_warning():
    from wattlog.errors import WattlogWarning

    monitor = EnergyMonitor(gpus="none", cpu="none", ram="estimate")
    monitor._batch_size, monitor._full_batches = 4, 1000
    assert monitor._train_samples([FakeTensor(4)], 0) == 4  # batch 0: checked, as predicted
    with pytest.warns(WattlogWarning, match="train batch 64 holds 5 samples, not the loader's batch size 4"):
        assert monitor._train_samples([FakeTensor(5)], 64) == 5
    assert (monitor._batch_size, monitor._full_batches) == (0, 0)  # every batch is counted from now on


class FakeTensor:
    def __init__(self, n: int) -> None:
        self.shape = (n, 8)


@pytest.mark.parametrize("sync_cuda", [False, True])
def test_step_ends_on_the_host_and_with_sync_cuda_give_the_same_steps(mlflow_uri, tmp_path, sync_cuda):
    """A host step's end is marked at the next batch start (or at validation, or the stage end); with
    sync_cuda it is marked in on_train_batch_end. Both log one point per optimizer step, at Lightning's
    steps, with the accumulated batches' samples, and the step energies add up to the train total."""
    from mlflow import MlflowClient

    pl, module = make_module(step_sleep_s=0.01)
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1, sync_cuda=sync_cuda,
                            artifacts=False)
    trainer, logger = _fit(pl, module, monitor, mlflow_uri, tmp_path, 12, accumulate_grad_batches=2,
                           log_every_n_steps=1, enable_progress_bar=False)
    steps = [m.step for m in metric_history(mlflow_uri, logger.run_id, "energy/step_j")]
    assert steps == [m.step for m in metric_history(mlflow_uri, logger.run_id, "train_loss")] == list(range(12))
    metrics = MlflowClient(mlflow_uri).get_run(logger.run_id).data.metrics
    step_j = sum(m.value for m in metric_history(mlflow_uri, logger.run_id, "energy/step_j"))
    assert step_j == pytest.approx(metrics["energy/train_j"], rel=1e-6)
    assert metrics["energy/j_per_sample"] == pytest.approx(metrics["energy/train_j"] / (12 * 2 * 4), rel=1e-6)  # 2 batches of 4
