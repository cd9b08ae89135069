"""``python -m examples.hydra_toy [overrides]``: see ``conf/hydra_toy.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="hydra_toy")
def main(cfg: DictConfig) -> Any:
    """Train the toy model; return the objective (or ``(objective, kWh)`` for Optuna)."""
    from examples.hydra_toy.app import run

    return run(cfg)


if __name__ == "__main__":
    main()
