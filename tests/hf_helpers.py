"""A tiny randomly initialised BERT classifier and token dataset for the Hugging Face Trainer tests."""

from __future__ import annotations

import time

import torch


class TokenDataset(torch.utils.data.Dataset):
    """``n`` random sequences of ``length`` tokens with 0/1 labels."""

    def __init__(self, n: int = 64, length: int = 8, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert(step_sleep_s: float = 0.0):
    """A 1-layer, 16-wide ``BertForSequenceClassification``; ``step_sleep_s`` slows each forward."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    if step_sleep_s:
        model.register_forward_pre_hook(lambda _module, _args: time.sleep(step_sleep_s))
    return model


def training_args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    kw = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
              per_device_eval_batch_size=8, logging_steps=1, report_to=["mlflow"], save_strategy="no",
              use_cpu=True, disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0)
    kw.update(kwargs)
    return TrainingArguments(**kw)


def energy_history(uri: str, run_id: str, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` of the run's keys starting with ``prefix``, in step order."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics if key.startswith(prefix)}
