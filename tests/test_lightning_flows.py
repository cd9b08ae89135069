"""The Lightning flows users run, each on a real sqlite MLflow store with a simulated 400 W GPU.

Every flow must give monotonic totals, its own run's energy only, one point per (key, step), and
per-step energy within 10 % of the simulated truth for steps >= 100 ms.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
import warnings

import pytest

pytest.importorskip("lightning")

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402
from lightning_helpers import loader, make_module  # noqa: E402

from wattlog import EnergyMonitor  # noqa: E402
from wattlog.errors import NoRunError  # noqa: E402

POWER_W = 400.0
CUMULATIVE = ("energy/total_j", "energy/emissions_g")


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeNvml([FakeGpu(power_w=POWER_W)])
    fake.install(monkeypatch)
    return fake


def _monitor(**kwargs) -> EnergyMonitor:
    return EnergyMonitor(**{"gpus": [0], "cpu": "none", "ram": "none", "log_every_n_steps": 1, "artifacts": False,
                            **kwargs})


def _trainer(tmp_path, callbacks, logger, **kwargs):
    import lightning.pytorch as pl

    kw = dict(max_steps=6, limit_val_batches=2, val_check_interval=3, accelerator="cpu", enable_model_summary=False,
              enable_progress_bar=False, default_root_dir=tmp_path, log_every_n_steps=1)
    kw.update(kwargs)
    return pl.Trainer(callbacks=callbacks, logger=logger, **kw)


def _logger(uri, name="flows", **kwargs):
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=name, tracking_uri=uri, **kwargs)


def _history(uri, run_id):
    """``{key: [(step, value), ...]}`` of every energy key of the run, in step order."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("energy/"):
            out[key] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return out


def _check_contract(hist):
    for key, points in hist.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: two points at one step: {points}"
    for key in CUMULATIVE:
        values = [v for _, v in hist[key]]
        assert values == sorted(values), f"{key} decreases: {hist[key]}"


def _run(uri, run_id):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id).data


def test_fit_then_test_best_checkpoint_never_rewinds(gpu, mlflow_uri, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl, module = make_module(step_sleep_s=0.02)
    logger = _logger(mlflow_uri)
    trainer = _trainer(tmp_path, [_monitor(), ModelCheckpoint(monitor="val_loss", dirpath=tmp_path / "ck")], logger)
    trainer.fit(module, loader(64), loader(16))
    fit = _run(mlflow_uri, logger.run_id).metrics
    trainer.test(module, loader(16), ckpt_path="best")
    after = _run(mlflow_uri, logger.run_id).metrics
    hist = _history(mlflow_uri, logger.run_id)
    _check_contract(hist)
    assert after["energy/total_j"] > fit["energy/total_j"]
    assert after["energy/val_j"] == fit["energy/val_j"]  # not rewound by the checkpoint restore
    assert after["energy/j_per_sample"] == fit["energy/j_per_sample"]
    assert after["energy/test_j"] > 0
    assert [s for s, _ in hist["energy/step_j"]] == list(range(6))


def test_fit_validate_test_predict_on_one_trainer(gpu, mlflow_uri, tmp_path):
    pl, module = make_module()
    logger = _logger(mlflow_uri)
    trainer = _trainer(tmp_path, [_monitor()], logger, enable_checkpointing=False)
    trainer.fit(module, loader(64), loader(16))
    trainer.validate(module, loader(16))
    trainer.test(module, loader(16))
    trainer.predict(module, loader(16))
    hist = _history(mlflow_uri, logger.run_id)
    _check_contract(hist)
    metrics = _run(mlflow_uri, logger.run_id).metrics
    for stage in ("train", "val", "test", "predict"):
        assert metrics[f"energy/{stage}_j"] > 0, stage
    total = metrics["energy/total_j"]
    assert sum(metrics[f"energy/{s}_j"] for s in ("train", "val", "test", "predict")) <= total * (1 + 1e-9)


def test_new_run_evaluating_a_checkpoint_reports_only_its_own_energy(gpu, mlflow_uri, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl, module = make_module(step_sleep_s=0.05)
    train_logger = _logger(mlflow_uri, "train")
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, [_monitor(), ck], train_logger).fit(module, loader(64), loader(16))
    train = _run(mlflow_uri, train_logger.run_id).metrics

    eval_logger = _logger(mlflow_uri, "eval")
    evaluator = _trainer(tmp_path, [_monitor()], eval_logger)
    started = time.perf_counter()
    evaluator.test(module, loader(16), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    wall_s = time.perf_counter() - started
    data = _run(mlflow_uri, eval_logger.run_id)
    assert data.metrics["energy/total_j"] < 0.5 * train["energy/total_j"]  # no training energy inherited
    assert data.metrics["energy/duration_s"] <= wall_s
    assert "energy/train_j" not in data.metrics
    assert data.params["energy.checkpoint_run_id"] == train_logger.run_id
    assert float(data.params["energy.checkpoint_train_j"]) > 0  # the energy that made the model travels with it


def test_one_monitor_reused_for_two_trainers_gives_each_run_its_own_steps(gpu, mlflow_uri, tmp_path):
    pl, module = make_module()
    monitor = _monitor()
    loggers = [_logger(mlflow_uri), _logger(mlflow_uri)]
    sessions = []
    for logger in loggers:
        _trainer(tmp_path, [monitor], logger, max_steps=4, enable_checkpointing=False).fit(module, loader(64))
        sessions.append(monitor._session)
    first, second = (_history(mlflow_uri, lg.run_id) for lg in loggers)
    for hist in (first, second):
        _check_contract(hist)
        assert [s for s, _ in hist["energy/step_j"]] == [0, 1, 2, 3]
    # a fresh session whose ledger started at 0 J: each run's total is its own session's, not a running sum
    # (timing-free: comparing the two runs' totals depends on how long each set-up took under load)
    assert sessions[1] is not sessions[0]
    for hist, session in zip((first, second), sessions):
        assert hist["energy/total_j"][-1][1] == pytest.approx(session.ledger.state.total_j, rel=1e-6)


def test_gradient_accumulation_each_step_matches_the_simulated_truth(gpu, mlflow_uri, tmp_path):
    """accumulate_grad_batches=4, 60 ms micro-batches at 400 W: every optimizer step's energy."""
    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):  # the truth: when each optimizer step's first micro-batch starts
        def __init__(self):
            self.starts = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % 4 == 0:
                self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.starts.append(time.perf_counter())

    pl, module = make_module(step_sleep_s=0.06)
    clock = StepClock()
    logger = _logger(mlflow_uri)
    trainer = _trainer(tmp_path, [clock, _monitor()], logger, max_steps=6, accumulate_grad_batches=4,
                       enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, loader(256))
    hist = _history(mlflow_uri, logger.run_id)
    _check_contract(hist)
    steps = hist["energy/step_j"]
    assert [s for s, _ in steps] == list(range(6))
    for (step, step_j), t0, t1 in zip(steps[:-1], clock.starts, clock.starts[1:]):
        assert step_j == pytest.approx(POWER_W * (t1 - t0), rel=0.10), step


def test_logger_none_measures_into_a_local_folder_and_warns_once(gpu, tmp_path, monkeypatch):
    pl, module = make_module()
    monitor = _monitor()
    with pytest.raises(NoRunError, match="MLFlowLogger"):  # strict mode (the suite's): the hard error
        _trainer(tmp_path, [monitor], None, max_steps=2, enable_checkpointing=False).fit(module, loader(16))
    monkeypatch.delenv("WATTLOG_STRICT")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, [_monitor()], None, max_steps=3, enable_checkpointing=False)
        trainer.fit(module, loader(16))
        trainer.test(module, loader(16))
    ours = [w for w in caught if "no MLflow run" in str(w.message)]
    assert len(ours) == 1
    (folder,) = (tmp_path / "energy").iterdir()
    rows = list(csv.DictReader(open(folder / "points.csv")))
    assert [int(r["step"]) for r in rows if r["key"] == "energy/step_j"] == [0, 1, 2]
    assert any(r["key"] == "energy/test_j" for r in rows)
    tags = json.loads((folder / "tags.json").read_text())
    assert tags["energy.attempts"] == "1" and "energy.estimated" in tags  # the test stage kept the fit's tags
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(NoRunError):
        _trainer(tmp_path, [_monitor(require_mlflow=True)], None, max_steps=1).fit(module, loader(16))


def test_csv_logger_only_gets_the_per_step_keys(gpu, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.delenv("WATTLOG_STRICT")
    pl, module = make_module()
    csv_logger = CSVLogger(tmp_path / "csv")
    with pytest.warns(UserWarning, match="no MLflow run"):
        _trainer(tmp_path, [_monitor()], csv_logger, max_steps=4, enable_checkpointing=False).fit(module, loader(64))
    rows = list(csv.DictReader(open(os.path.join(csv_logger.log_dir, "metrics.csv"))))
    assert sorted({int(r["step"]) for r in rows if r.get("energy/step_j")}) == [0, 1, 2, 3]


def test_short_test_stage_gets_estimated_cpu_energy(mlflow_uri, tmp_path):
    pl, module = make_module()
    logger = _logger(mlflow_uri)
    trainer = _trainer(tmp_path, [EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", artifacts=False)],
                       logger, max_steps=2, enable_checkpointing=False)
    trainer.fit(module, loader(16))
    trainer.test(module, loader(8))  # 2 batches: a few milliseconds, far below the 0.5 s estimate interval
    metrics = _run(mlflow_uri, logger.run_id).metrics
    assert metrics["energy/test_j"] > 0
    assert metrics["energy/test_j_per_sample"] > 0


def test_sanity_check_validation_is_not_counted_as_val(gpu, mlflow_uri, tmp_path):
    pl, module = make_module()
    logger = _logger(mlflow_uri)
    trainer = _trainer(tmp_path, [_monitor()], logger, max_steps=2, val_check_interval=None, check_val_every_n_epoch=99,
                       num_sanity_val_steps=2, enable_checkpointing=False)
    trainer.fit(module, loader(16), loader(16))
    assert "energy/val_j" not in _run(mlflow_uri, logger.run_id).metrics


def _wattlog_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("wattlog"))


def test_two_wattlog_threads_while_training_and_nothing_left_after_ten_fits(gpu, mlflow_uri, tmp_path):
    import psutil
    from lightning.pytorch.callbacks import Callback

    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                children = [p.cmdline() for p in psutil.Process().children()]
                seen.append((_wattlog_threads(), sum("wattlog.sinks.deliver" in " ".join(c) for c in children)))

    pl, module = make_module()
    me = psutil.Process()

    def settle():
        deadline = time.time() + 20
        while time.time() < deadline and me.children():
            time.sleep(0.1)

    monitor = _monitor()
    _trainer(tmp_path, [monitor], _logger(mlflow_uri), max_steps=1, enable_checkpointing=False).fit(module, loader(16))
    settle()  # the baseline: MLflow's own client and store files are open from here on
    threads0, files0 = len(threading.enumerate()), len(me.open_files())
    for i in range(10):
        fresh = i % 2 == 0  # a new monitor, or the same one reused with a new trainer and run
        monitor = _monitor() if fresh else monitor
        _trainer(tmp_path, [monitor, Probe()], _logger(mlflow_uri), max_steps=3,
                 enable_checkpointing=False).fit(module, loader(16))
    settle()
    # the sampler, the pump (started by the first logging boundary) and the delivery process
    assert seen[0] == (["wattlog-pump", "wattlog-sampler"], 1)
    assert all(s == seen[0] for s in seen)
    assert len(threading.enumerate()) == threads0
    assert len(me.open_files()) == files0
    assert me.children() == []


@pytest.mark.slow
def test_ddp_spawn_two_cpu_processes(mlflow_uri, tmp_path):
    import copy
    import pickle

    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1, artifacts=False)
    pickle.loads(pickle.dumps(monitor))  # ddp_spawn pickles the callbacks
    copy.deepcopy(monitor)
    from lightning_helpers import spawnable_module

    module = spawnable_module()
    logger = _logger(mlflow_uri)
    assert logger.run_id  # create the run here: the spawned workers get the logger with its run id
    trainer = _trainer(tmp_path, [monitor], logger, max_steps=4, strategy="ddp_spawn", devices=2,
                       enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, loader(64))
    hist = _history(mlflow_uri, logger.run_id)
    _check_contract(hist)
    assert [s for s, _ in hist["energy/step_j"]] == [0, 1, 2, 3]
