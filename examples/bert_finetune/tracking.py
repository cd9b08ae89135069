"""MLflow and energy plumbing of the BERT example: the job's logger, its energy callbacks, failures.

Inside a ``-m`` sweep with ``hydra/callbacks=energy_sweep`` the job's run becomes a child of the
sweep's parent run (``wattlog.integrations.hydra.make_mlflow_logger``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ERROR_TAG = "wattlog.error"


def tracking_uri(cfg: DictConfig) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``cfg.mlflow.tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or str(cfg.mlflow.tracking_uri)


def make_logger(cfg: DictConfig, run_name: str, tags: dict[str, str] | None = None) -> Any:
    """The job's ``MLFlowLogger`` (a child of the sweep's parent run when one is open)."""
    from wattlog.integrations.hydra import make_mlflow_logger  # noqa: PLC0415

    logger = make_mlflow_logger(
        cfg, experiment_name=str(cfg.mlflow.experiment_name), run_name=run_name, tracking_uri=tracking_uri(cfg)
    )
    for key, value in (tags or {}).items():
        logger.experiment.set_tag(logger.run_id, key, value)
    return logger


def energy_callbacks(cfg: DictConfig) -> list[Any]:
    """EnergyMonitor callbacks for ``cfg.energy`` (``[]`` with ``energy=off``)."""
    from wattlog.integrations.hydra import instantiate_energy  # noqa: PLC0415

    return list(instantiate_energy(cfg))


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved job config as ``{"data.max_length": "64", ...}``, without ``hydra`` and ``energy``
    (EnergyMonitor logs its own ``energy.*`` params)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk({k: v for k, v in container.items() if k not in ("hydra", "energy")}, "")
    return flat


def log_config(logger: Any, cfg: DictConfig) -> None:
    """Log :func:`flat_params` except the keys the sweep helper already logged from the overrides."""
    from wattlog.integrations.hydra import job_overrides, overrides_as_params  # noqa: PLC0415

    done = overrides_as_params(job_overrides())
    logger.log_hyperparams({k: v for k, v in flat_params(cfg).items() if k not in done})


def mark_failed(logger: Any, exc: BaseException) -> None:
    """Tag the job's run ``wattlog.error=<Type: message>`` and end it with status FAILED.

    A failure to reach MLflow here is logged, never raised: the job's own error is the one to report.
    """
    try:
        client, run_id = logger.experiment, logger.run_id
        client.set_tag(run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:4900])
        client.set_terminated(run_id, status="FAILED")
    except Exception as mlflow_exc:  # noqa: BLE001
        log.warning("could not record the failure in MLflow (%s: %s)", type(mlflow_exc).__name__, mlflow_exc)
