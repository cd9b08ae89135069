"""Each snippet of the README's "Other frameworks" section runs as written: sqlite MLflow, a simulated 400 W GPU.

The snippets keep the default ``gpus="auto"``, which maps a CPU device to no GPU; the harness points
the loop driver at the simulated GPU 0 so the GPU keys are exercised too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fakes.nvml import FakeGpu, FakeNvml

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert found, f"README.md has no snippet {name!r}"
    return found.group(1)


@pytest.fixture
def readme_env(mlflow_uri, monkeypatch, tmp_path):
    import mlflow

    from wattlog.integrations.loop import LoopEnergy

    FakeNvml([FakeGpu(power_w=400.0)]).install(monkeypatch)
    monkeypatch.setattr(LoopEnergy, "_gpus", lambda self: [0])
    monkeypatch.chdir(tmp_path)
    for name, value in (("MLFLOW_TRACKING_URI", mlflow_uri), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_uri)
    yield mlflow_uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _energy_run(uri: str, steps: list[int]) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    hist = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in runs[0].data.metrics}
    assert sorted(hist["energy/step_j"]) == steps
    assert set(hist["loss"]) <= set(steps)  # the framework's own metric on the same step axis
    for key in ("energy/train_j", "energy/gpu_j", "energy/total_j", "energy/emissions_g"):
        assert key in hist, key
    return hist


def _hf_names() -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hf_helpers import TokenDataset, tiny_bert

    return {"model": tiny_bert(), "train_dataset": TokenDataset(64)}


def test_plain_loop_snippet(readme_env):
    exec(snippet("plain"), {})
    hist = _energy_run(readme_env, list(range(20)))
    assert "energy/val_j" in hist


@pytest.mark.slow  # Lightning Fabric import
def test_fabric_snippet(readme_env):
    pytest.importorskip("lightning")
    exec(snippet("fabric"), {})
    _energy_run(readme_env, list(range(20)))


@pytest.mark.slow  # a real HF Trainer
def test_transformers_snippet(readme_env):
    exec(snippet("transformers"), _hf_names())
    _energy_run(readme_env, list(range(1, 21)))


@pytest.mark.slow  # a real HF Trainer
def test_autolog_snippet(readme_env):
    import wattlog

    try:
        exec(snippet("autolog"), _hf_names())
    finally:
        wattlog.autolog(disable=True)
    _energy_run(readme_env, list(range(1, 11)))
