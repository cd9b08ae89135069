"""Entry point: ``python -m examples.bert_finetune`` (Hydra app, primary config ``conf/bert_finetune.yaml``)."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from examples.bert_finetune.app import CONF_DIR, CONFIG_NAME, run_task


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured task (see :func:`examples.bert_finetune.app.run_task`)."""
    return run_task(cfg)


if __name__ == "__main__":
    main()
