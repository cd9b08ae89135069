"""A Lightning Fabric fine-tune of the offline MiniLM with ``wattlog.track()``: per-step energy in an MLflow run.

Run ``python examples/fabric_loop.py [--steps 30] [--devices 1]`` from the repository root. MLflow
(``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``; experiment ``bert-fabric``): ``train_loss``
per step, ``val_acc``, and the ``energy/*`` keys of ``wattlog.track()`` on the same step axis.
Data and model come from the Lightning example (:mod:`examples.bert_finetune`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python examples/fabric_loop.py` from the root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--devices", type=int, default=1)
    a = p.parse_args(argv)

    import mlflow
    import torch
    from lightning.fabric import Fabric

    import wattlog
    from examples.bert_finetune.data import split_movie_reviews
    from examples.bert_finetune.model import DEFAULT_MODEL, load_classifier, load_tokenizer

    fabric = Fabric(accelerator="auto", devices=a.devices)
    fabric.launch()
    splits = split_movie_reviews(max_train_samples=a.steps * a.batch_size, max_val_samples=128)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_classifier(DEFAULT_MODEL)
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=5e-5))

    def batches(split, size):
        texts, labels = split
        for i in range(0, len(texts), size):
            enc = tokenizer(texts[i:i + size], truncation=True, max_length=64, padding=True, return_tensors="pt")
            yield {k: v.to(fabric.device) for k, v in enc.items()}, torch.tensor(labels[i:i + size], device=fabric.device)

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow.set_experiment("bert-fabric")
    with mlflow.start_run() if fabric.global_rank == 0 else _nothing(), wattlog.track(device=fabric.device) as energy:
        model.train()
        for step, (inputs, labels) in enumerate(batches(splits.train, a.batch_size)):
            loss = model(**inputs, labels=labels).loss
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if fabric.global_rank == 0:
                mlflow.log_metric("train_loss", loss.item(), step=step)
            energy.step(step, samples=len(labels))
        with energy.stage("eval"), torch.no_grad():
            model.eval()
            right = sum(int((model(**x).logits.argmax(-1) == y).sum()) for x, y in batches(splits.val, 64))
        if fabric.global_rank == 0:
            mlflow.log_metric("val_acc", right / len(splits.val[1]), step=step + 1)
    fabric.print(f"energy logged into run {energy.run_id}")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
