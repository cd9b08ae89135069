"""Compression options of the BERT example on a tiny randomly initialised BertForSequenceClassification."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from examples.bert_finetune import compress  # noqa: E402
from examples.bert_finetune.compress import IncompatibleConfig  # noqa: E402
from wattlog.errors import ConfigError  # noqa: E402

HEADS = 4


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """2 layers, hidden 32, 4 heads, FFN 64, a small vocabulary: random weights, eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=64, num_labels=2,
                                     max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}


@pytest.fixture(scope="module")
def dense_size_mb() -> float:
    return compress.model_size_mb(tiny_bert())


def _no_masks(model: torch.nn.Module) -> bool:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return not any(n.endswith(("_orig", "_mask")) for n in names)


@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_l1_unstructured_reaches_the_requested_sparsity(amount: float, batch: dict) -> None:
    model = tiny_bert()
    total = sum(m.weight.numel() for _, m in compress.prunable_linears(model))
    result = compress.prune_model(model, "l1_unstructured", amount)
    assert _no_masks(model)  # made permanent
    assert result.target_params == total
    assert result.sparsity == pytest.approx(round(amount * total) / total, abs=1e-9)
    assert compress.linear_sparsity(model) == pytest.approx(amount, abs=1e-3)
    assert torch.isfinite(model(**batch).logits).all()


def test_structured_rows_zero_whole_rows(batch: dict) -> None:
    model = tiny_bert()
    result = compress.prune_model(model, "structured", 0.5, granularity="rows")
    assert _no_masks(model)
    assert result.sparsity == pytest.approx(0.5, abs=1e-9)
    for _, lin in compress.prunable_linears(model):
        zero_rows = (lin.weight.abs().sum(dim=1) == 0).sum().item()
        assert zero_rows == lin.out_features // 2
    assert torch.isfinite(model(**batch).logits).all()


def test_structured_heads_are_removed_physically(batch: dict, dense_size_mb: float) -> None:
    model = tiny_bert()
    result = compress.prune_model(model, "structured", 0.5, granularity="heads")
    assert result.sparsity == pytest.approx(0.5, abs=1e-9)
    layer = model.bert.encoder.layer[0].attention
    assert layer.self.num_attention_heads == HEADS // 2
    assert layer.self.query.out_features == 16 and layer.output.dense.in_features == 16
    assert model(**batch).logits.shape == (4, 2)
    assert compress.model_size_mb(model) < dense_size_mb


def test_recovery_finetune_keeps_pruned_weights_at_zero(batch: dict) -> None:
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    result = compress.prune_model(model, "l1_unstructured", 0.5, recovery=([batch], 3, 1e-3))
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not model.training


def test_int8_dynamic_quantises_linear_layers(batch: dict, dense_size_mb: float) -> None:
    q = compress.quantize_model(tiny_bert(), "int8_dynamic", "cpu")
    kinds = {type(m).__module__ for m in q.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert compress.model_size_mb(q) < dense_size_mb
    assert q(**batch).logits.shape == (4, 2)
    total, nonzero = compress.count_params(q)
    assert total >= nonzero > 0


def test_pruned_then_int8_still_counts_zeros() -> None:
    model = tiny_bert()
    compress.prune_model(model, "l1_unstructured", 0.5)
    total_dense, nonzero_dense = compress.count_params(model)
    q = compress.quantize_model(model, "int8_dynamic", "cpu")
    total_q, nonzero_q = compress.count_params(q)
    assert total_q == total_dense
    assert nonzero_q <= nonzero_dense  # int8 rounding can only add zeros


def test_bf16_halves_the_size(batch: dict, dense_size_mb: float) -> None:
    q = compress.quantize_model(tiny_bert(), "bf16", "cpu")
    assert next(q.parameters()).dtype == torch.bfloat16
    assert compress.model_size_mb(q) < 0.6 * dense_size_mb  # half, plus serialisation overhead
    assert q(**batch).logits.dtype == torch.bfloat16


def test_none_options_change_nothing(dense_size_mb: float) -> None:
    model = tiny_bert()
    assert compress.prune_model(model, "none", 0.0).sparsity == pytest.approx(0.0, abs=1e-6)
    assert compress.quantize_model(model, "none", "cpu") is model
    assert compress.model_size_mb(model) == pytest.approx(dense_size_mb)


def test_fp16_on_cpu_is_a_clear_config_error() -> None:
    with pytest.raises(IncompatibleConfig, match=r"quantize.name='fp16'.*CUDA") as info:
        compress.check_compatible("none", 0.0, "fp16", "cpu")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    with pytest.raises(IncompatibleConfig):
        compress.quantize_model(tiny_bert(), "fp16", "cpu")


def test_int8_dynamic_on_gpu_is_a_clear_config_error() -> None:
    with pytest.raises(IncompatibleConfig, match=r"int8_dynamic.*CPU kernels only"):
        compress.check_compatible("none", 0.0, "int8_dynamic", "cuda")


def test_int8_weight_only_without_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    real = compress.importlib.util.find_spec
    monkeypatch.setattr(compress.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(IncompatibleConfig, match=r"pip install torchao"):
        compress.check_compatible("none", 0.0, "int8_weight_only", "cpu")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("magnitude", 0.5, "none", "cpu"), "prune.name"),
        (("l1_unstructured", 1.5, "none", "cpu"), "prune.amount"),
        (("none", 0.0, "int4", "cpu"), "quantize.name"),
        (("structured", 0.5, "none", "cpu", "blocks"), "prune.granularity"),
    ],
)
def test_bad_options_name_the_field(args: tuple, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        compress.check_compatible(*args)
    assert info.value.field == field


def test_resolve_device_type() -> None:
    assert compress.resolve_device_type("cpu") == "cpu"
    assert compress.resolve_device_type("gpu") == "cuda"
    assert compress.resolve_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- knowledge distillation

from examples.bert_finetune import distill  # noqa: E402


def deep_bert(layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=HEADS, intermediate_size=64, num_labels=2,
                                     max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize(("n", "k", "kept"), [(6, 3, [0, 2, 4]), (6, 2, [0, 3]), (6, 6, list(range(6))),
                                              (6, 1, [0]), (4, 3, [0, 1, 2])])
def test_student_layers_are_evenly_spaced_from_the_first(n: int, k: int, kept: list[int]) -> None:
    assert distill.layer_indices(n, k) == kept


def test_student_keeps_the_teachers_layers_and_shapes(batch: dict) -> None:
    teacher = deep_bert(6)
    student = distill.student_from_teacher(teacher, 3)
    assert len(student.bert.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    assert len(teacher.bert.encoder.layer) == 6  # the teacher is untouched
    for s_layer, t_index in zip(student.bert.encoder.layer, [0, 2, 4], strict=True):
        t_layer = teacher.bert.encoder.layer[t_index]
        assert torch.equal(s_layer.output.dense.weight, t_layer.output.dense.weight)
        assert s_layer.output.dense.weight.data_ptr() != t_layer.output.dense.weight.data_ptr()  # a copy
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student(**batch).logits.shape == teacher(**batch).logits.shape == (4, 2)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    per_layer = sum(p.numel() for p in teacher.bert.encoder.layer[0].parameters())
    assert n_teacher - n_student == 3 * per_layer


def test_distill_loss_mixes_soft_and_hard_targets() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert distill.distill_loss(logits, logits, labels, 2.0, alpha=0.0) == pytest.approx(float(ce))
    assert distill.distill_loss(logits, logits, labels, 2.0, alpha=1.0) == pytest.approx(0.0, abs=1e-6)
    assert distill.distill_loss(logits, -logits, labels, 2.0, alpha=1.0) > 0


@pytest.mark.parametrize(("args", "field"), [((0, 2.0, 0.5, 10), "distill.layers"),
                                             ((3, 0.0, 0.5, 10), "distill.temperature"),
                                             ((3, 2.0, 1.5, 10), "distill.alpha"),
                                             ((3, 2.0, 0.5, 0), "distill.steps")])
def test_bad_distill_options_name_the_field(args: tuple, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        distill.check_options(*args)
    with pytest.raises(ConfigError, match="distill.layers"):
        distill.layer_indices(6, 7)


def test_make_permanent_measures_mask_based_sparsity_after_folding() -> None:
    model = tiny_bert()
    result = compress.apply_masks(model, "l1_unstructured", 0.5)
    assert result.masked
    folded = compress.make_permanent(model, result)
    assert folded is not None and not folded.masked and _no_masks(model)
    assert folded.sparsity == pytest.approx(0.5, abs=1e-3)
