"""Knowledge distillation of the fine-tuned classifier into a shallower student (Hinton et al., 2015).

- :func:`student_from_teacher`: a copy of the teacher that keeps ``layers`` of its encoder layers, evenly
  spaced from the first (3 of 6: layers 0, 2, 4; 2 of 6: 0, 3), with the teacher's embeddings, pooler and
  classifier (the DistilBERT initialisation).
- :func:`distill_loss`: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.
- :class:`DistillClassifier`: the Lightning module that trains the student on the frozen teacher's logits
  (the teacher's forward passes are part of what making the student costs, so they are metered with it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from examples.bert_finetune.module import SentimentClassifier
from wattlog.errors import ConfigError


def layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layers a student keeps: ``floor(i * teacher / student)`` for ``i < student``."""
    if not 1 <= int(student_layers) <= teacher_layers:
        raise ConfigError("distill.layers", student_layers, f"an integer in 1..{teacher_layers} (the teacher's layers)")
    return [i * teacher_layers // int(student_layers) for i in range(int(student_layers))]


def _encoder(model: nn.Module) -> nn.Module:
    encoder = getattr(getattr(model, "base_model", model), "encoder", None)
    if not isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        raise ConfigError("model.name", type(model).__name__, "a BERT-style model with `encoder.layer`")
    return encoder  # type: ignore[return-value]


def student_from_teacher(teacher: nn.Module, layers: int) -> nn.Module:
    """A new model: the teacher with only :func:`layer_indices` of its encoder layers (weights copied)."""
    student = copy.deepcopy(teacher)
    encoder = _encoder(student)
    keep = layer_indices(len(encoder.layer), layers)
    encoder.layer = nn.ModuleList(encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = len(keep)
    for new_idx, layer in enumerate(encoder.layer):  # transformers' per-layer cache index, where it has one
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    return student


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Soft-target KL at ``temperature`` (scaled by T^2) weighted ``alpha``, label cross-entropy ``1 - alpha``."""
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean") * (t * t)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


def check_options(layers: Any, temperature: Any, alpha: Any, steps: Any) -> None:
    """Fail fast on distillation options that cannot work (before any model is loaded)."""
    if not isinstance(layers, int) or layers < 1:
        raise ConfigError("distill.layers", layers, "an integer >= 1 (encoder layers kept from the teacher)")
    if not float(temperature) > 0:
        raise ConfigError("distill.temperature", temperature, "a temperature > 0 (e.g. 2.0)")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError("distill.alpha", alpha, "a weight in [0, 1] of the teacher's soft targets")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError("distill.steps", steps, "an integer >= 1 (distillation optimizer steps)")


class DistillClassifier(SentimentClassifier):
    """Trains ``student`` on ``teacher``'s logits; logs ``train_loss`` (the distillation loss) per step.

    The teacher stays frozen and in eval mode (no dropout) whatever mode Lightning sets; only the
    student's parameters are optimised (:meth:`SentimentClassifier.configure_optimizers`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 lr: float = 5e-5, weight_decay: float = 0.01, warmup_ratio: float = 0.1) -> None:
        super().__init__(student, lr, weight_decay, warmup_ratio)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def train(self, mode: bool = True) -> DistillClassifier:
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        logits = self.model(**inputs).logits
        loss = distill_loss(logits, teacher_logits, batch["labels"], self.temperature, self.alpha)
        self.log("train_loss", loss.float(), batch_size=batch["labels"].shape[0], on_step=True, prog_bar=True)
        return loss
