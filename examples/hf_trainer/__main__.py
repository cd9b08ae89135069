"""Fine-tune the offline MiniLM on the rotten_tomatoes sentences with ``Trainer(report_to="mlflow")`` + EnergyCallback.

MLflow (experiment ``--experiment``, store ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``): the Trainer's own
``loss``, ``learning_rate``, ``eval_loss``, ``eval_accuracy``, ``train_runtime`` and the ``energy/*`` keys
of EnergyCallback, on one step axis (``state.global_step``). Data and model come from the Lightning
example (:mod:`examples.bert_finetune.data`, :mod:`examples.bert_finetune.model`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from examples.bert_finetune.data import split_movie_reviews
from examples.bert_finetune.model import DEFAULT_MODEL, load_classifier, load_tokenizer


class Encoded:
    """Tokenised texts and labels as the dicts ``Trainer`` feeds the model."""

    def __init__(self, tokenizer: Any, split: tuple[list[str], list[int]], max_length: int) -> None:
        texts, self.labels = split
        self.enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def accuracy(pred: Any) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--max-train-samples", type=int, default=640)
    p.add_argument("--max-eval-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    p.add_argument("--experiment", default="bert-hf-trainer")
    p.add_argument("--output-dir", default="outputs/hf_trainer")
    a = p.parse_args(argv)

    import mlflow  # noqa: PLC0415
    from transformers import Trainer, TrainingArguments  # noqa: PLC0415

    from wattlog.integrations.transformers import EnergyCallback  # noqa: PLC0415

    splits = split_movie_reviews(max_train_samples=a.max_train_samples, max_val_samples=a.max_eval_samples,
                                 max_test_samples=a.max_eval_samples)
    tokenizer = load_tokenizer(a.model)
    mlflow.set_tracking_uri(a.tracking_uri)
    mlflow.set_experiment(a.experiment)
    args = TrainingArguments(a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
                             per_device_eval_batch_size=a.batch_size * 2,
                             gradient_accumulation_steps=a.gradient_accumulation_steps, learning_rate=5e-5,
                             logging_steps=5, eval_strategy="steps", eval_steps=max(1, a.max_steps // 2),
                             save_strategy="no", report_to="mlflow", disable_tqdm=True)
    trainer = Trainer(model=load_classifier(a.model), args=args, compute_metrics=accuracy,
                      train_dataset=Encoded(tokenizer, splits.train, a.max_length),
                      eval_dataset=Encoded(tokenizer, splits.val, a.max_length), callbacks=[EnergyCallback()])
    with mlflow.start_run(run_name=f"{a.model}-hf-s{a.max_steps}") as run:  # train + test in one run
        trainer.train()
        metrics = trainer.evaluate(Encoded(tokenizer, splits.test, a.max_length), metric_key_prefix="test")
    print(f"run {run.info.run_id}: test_accuracy={metrics.get('test_accuracy', float('nan')):.3f}")
    return metrics


if __name__ == "__main__":
    main()
