"""Shared test set-up: strict mode on, no real hardware, MLflow stores under tmp_path."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("WATTLOG_STRICT", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A fresh sqlite tracking store under tmp_path."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _reset_mlflow_tracking_uri():
    """Lightning's MLFlowLogger sets MLflow's process-global tracking URI; don't leak it between tests."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(before)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


GPU_POWER_W = 400.0
"""The constant power of the shared ``gpu`` fixture's one fake GPU."""


@pytest.fixture
def gpu(monkeypatch):
    """One simulated NVML GPU at ``GPU_POWER_W`` under a fake ``pynvml`` module."""
    from fakes.nvml import FakeGpu, FakeNvml

    fake = FakeNvml([FakeGpu(power_w=GPU_POWER_W)])
    fake.install(monkeypatch)
    return fake
