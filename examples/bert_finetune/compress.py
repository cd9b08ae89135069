"""Pruning and quantisation of a fine-tuned BERT-style classifier, and what they change.

Pruning (made permanent before evaluation):
- ``l1_unstructured``: global L1 magnitude pruning over the weights of all encoder Linear layers;
  zeros stay in dense tensors, so dense kernels do the same work.
- ``structured``: ``granularity=heads`` physically removes the lowest-L1 attention heads of every
  layer (smaller matmuls); ``granularity=rows`` zeros the lowest-L1 output rows of every encoder
  Linear (``ln_structured``, n=1).

Quantisation: ``int8_dynamic`` (torch.ao dynamic int8 Linear, CPU kernels), ``int8_weight_only``
(torchao), ``bf16``, ``fp16`` (CUDA only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from wattlog.errors import ConfigError

PRUNE_METHODS = ("none", "l1_unstructured", "structured")
STRUCTURED_GRANULARITIES = ("heads", "rows")
QUANT_METHODS = ("none", "int8_dynamic", "int8_weight_only", "bf16", "fp16")


class IncompatibleConfig(ConfigError):
    """A compression option cannot run in this setting (device, missing library or kernel)."""


@dataclass(frozen=True)
class PruneResult:
    """Outcome of :func:`prune_model`: ``sparsity`` = 1 - nonzero/original over the targeted weights."""

    method: str
    amount: float
    sparsity: float
    target_params: int
    masked: bool = False
    """Pruning masks are still in place (:func:`make_permanent` folds them and measures the sparsity)."""


def resolve_device_type(accelerator: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``gpu``/``cuda`` -> ``cuda``; else unchanged."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in ("gpu", "cuda") else accelerator


def check_compatible(prune_method: str, amount: float, quantize: str, device_type: str,
                     granularity: str = "heads") -> None:
    """Fail fast, before any model is loaded, on options this run cannot honour.

    Raises:
        ConfigError: unknown method or amount outside [0, 1).
        IncompatibleConfig: fp16 without CUDA, int8_dynamic on CUDA, torchao missing, bf16 unsupported.
    """
    if prune_method not in PRUNE_METHODS:
        raise ConfigError("prune.name", prune_method, PRUNE_METHODS)
    if prune_method == "structured" and granularity not in STRUCTURED_GRANULARITIES:
        raise ConfigError("prune.granularity", granularity, STRUCTURED_GRANULARITIES)
    if prune_method != "none" and not 0.0 <= float(amount) < 1.0:
        raise ConfigError("prune.amount", amount, "a fraction in [0, 1)")
    if quantize not in QUANT_METHODS:
        raise ConfigError("quantize.name", quantize, QUANT_METHODS)
    if quantize == "fp16" and device_type != "cuda":
        raise IncompatibleConfig(
            "quantize.name", "fp16",
            f"none, int8_dynamic, bf16 on accelerator={device_type} (fp16 inference needs a CUDA GPU)",
        )
    if quantize == "int8_dynamic" and device_type != "cpu":
        raise IncompatibleConfig(
            "quantize.name", "int8_dynamic",
            f"none, bf16, fp16, int8_weight_only on {device_type} "
            "(torch.ao dynamic int8 has CPU kernels only; use trainer.accelerator=cpu)",
        )
    if quantize == "int8_weight_only" and importlib.util.find_spec("torchao") is None:
        raise IncompatibleConfig(
            "quantize.name", "int8_weight_only",
            "none, int8_dynamic, bf16, fp16 (int8_weight_only needs torchao: pip install torchao)",
        )
    if quantize == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise IncompatibleConfig("quantize.name", "bf16", "none, fp16, int8_weight_only (this GPU has no bf16)")


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Encoder Linear layers (attention projections and feed-forward), excluding pooler and classifier."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in f".{n}."]
    if not found:
        raise ConfigError("model.name", type(model).__name__, "a BERT-style model with an `encoder`")
    return found


def _attention_blocks(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(self-attention, attention) pairs of BERT-style layers: ``attention.self`` / ``attention.output``."""
    for module in model.modules():
        sa = getattr(module, "self", None)
        out = getattr(module, "output", None)
        if isinstance(sa, nn.Module) and hasattr(sa, "attention_head_size") and hasattr(out, "dense"):
            yield sa, module


def _nonzero(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(int(torch.count_nonzero(t)) for t in tensors))


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the encoder Linear layers (masks applied if present)."""
    weights = [m.weight.detach() for _, m in prunable_linears(model)]
    total = sum(w.numel() for w in weights)
    return 1.0 - _nonzero(weights) / total


def prune_heads(model: nn.Module, amount: float) -> PruneResult:
    """Remove ``round(amount * heads)`` lowest-L1 heads from every self-attention layer, physically.

    Importance of a head = L1 norm of its query/key/value rows and attention-output columns. At least one
    head stays in each layer. ``sparsity`` counts the removed attention parameters (weights).
    """
    from transformers.pytorch_utils import prune_linear_layer  # noqa: PLC0415

    before = after = 0
    blocks = list(_attention_blocks(model))
    if not blocks:
        raise ConfigError("prune.granularity", "heads", "rows (this model has no BERT-style attention)")
    for sa, attn in blocks:
        h, d = sa.num_attention_heads, sa.attention_head_size
        out = attn.output.dense
        before += sum(lin.weight.numel() for lin in (sa.query, sa.key, sa.value, out))
        n_remove = min(h - 1, int(round(amount * h)))
        if n_remove > 0:
            with torch.no_grad():
                score = sum(lin.weight.abs().view(h, d, -1).sum((1, 2)) for lin in (sa.query, sa.key, sa.value))
                score = score + out.weight.abs().view(out.out_features, h, d).sum((0, 2))
            keep = sorted(torch.topk(score, h - n_remove).indices.tolist())
            index = torch.cat([torch.arange(k * d, (k + 1) * d) for k in keep]).to(out.weight.device)
            sa.query = prune_linear_layer(sa.query, index)
            sa.key = prune_linear_layer(sa.key, index)
            sa.value = prune_linear_layer(sa.value, index)
            attn.output.dense = prune_linear_layer(out, index, dim=1)
            sa.num_attention_heads = len(keep)
            sa.all_head_size = len(keep) * d
        after += _nonzero(lin.weight for lin in (sa.query, sa.key, sa.value, attn.output.dense))
    return PruneResult("structured", amount, 1.0 - after / before, before)


def apply_masks(model: nn.Module, method: str, amount: float, granularity: str = "heads") -> PruneResult:
    """Prune ``model`` in place. Mask-based methods keep their masks (call :func:`make_permanent`
    after any recovery fine-tune); ``structured`` heads are removed at once."""
    if method == "none" or amount == 0:
        return PruneResult(method, amount, linear_sparsity(model), 0)
    if method == "structured" and granularity == "heads":
        return prune_heads(model, amount)
    layers = prunable_linears(model)
    target = sum(m.weight.numel() for _, m in layers)
    if method == "l1_unstructured":
        torch_prune.global_unstructured(
            [(m, "weight") for _, m in layers], pruning_method=torch_prune.L1Unstructured, amount=float(amount)
        )
    elif method == "structured":
        for _, m in layers:
            torch_prune.ln_structured(m, "weight", amount=float(amount), n=1, dim=0)
    else:
        raise ConfigError("prune.name", method, PRUNE_METHODS)
    return PruneResult(method, amount, linear_sparsity(model), target, masked=True)


def make_permanent(model: nn.Module, result: PruneResult | None = None) -> PruneResult | None:
    """Fold every pruning mask into its weight (``torch.nn.utils.prune.remove``).

    Returns ``result`` with its sparsity measured after folding when it was mask-based, else as given.
    """
    for module in model.modules():
        for name in [h._tensor_name for h in module._forward_pre_hooks.values()
                     if isinstance(h, torch_prune.BasePruningMethod)]:
            torch_prune.remove(module, name)
    if result is not None and result.masked:
        return dataclasses.replace(result, sparsity=linear_sparsity(model), masked=False)
    return result


def recover(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], steps: int, lr: float) -> int:
    """Short recovery fine-tune outside Lightning (plain AdamW loop, not metered; masks keep pruned weights
    at zero). Returns steps run. The compression job recovers as a metered Lightning stage instead."""
    if steps <= 0:
        return 0
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    done = 0
    while done < steps:
        progressed = False
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            progressed = True
            if done >= steps:
                break
        if not progressed:
            break
    model.eval()
    return done


def prune_model(model: nn.Module, method: str, amount: float, granularity: str = "heads",
                recovery: tuple[Iterable[dict[str, torch.Tensor]], int, float] | None = None) -> PruneResult:
    """Prune, optionally recover with ``recovery=(batches, steps, lr)``, then make the pruning permanent.

    Returns the :class:`PruneResult` measured after the masks were folded in.
    """
    result = apply_masks(model, method, amount, granularity)
    if recovery is not None:
        recover(model, *recovery)
    return make_permanent(model, result)  # type: ignore[return-value]


def quantize_model(model: nn.Module, method: str, device_type: str = "cpu") -> nn.Module:
    """Quantise or cast ``model`` (returns the model to use; may be a new object).

    Raises:
        IncompatibleConfig: the option cannot run here (see :func:`check_compatible`), or torchao has
            no kernel for this device.
    """
    check_compatible("none", 0.0, method, device_type)
    if method == "none":
        return model
    if method == "bf16":
        return model.to(torch.bfloat16)
    if method == "fp16":
        return model.to(torch.float16)
    if method == "int8_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's migration notice
            warnings.simplefilter("ignore", UserWarning)
            return torch.ao.quantization.quantize_dynamic(model.cpu(), {nn.Linear}, dtype=torch.qint8)
    # int8_weight_only through torchao
    try:
        from torchao.quantization import quantize_  # noqa: PLC0415

        try:
            from torchao.quantization import Int8WeightOnlyConfig  # noqa: PLC0415

            config = Int8WeightOnlyConfig()
        except ImportError:  # older torchao
            from torchao.quantization import int8_weight_only  # noqa: PLC0415

            config = int8_weight_only()
        quantize_(model, config)
    except (ImportError, NotImplementedError, RuntimeError) as exc:
        raise IncompatibleConfig(
            "quantize.name", "int8_weight_only",
            f"none, int8_dynamic, bf16, fp16 (torchao cannot quantise on {device_type}: {exc})",
        ) from exc
    return model


def model_size_mb(model: nn.Module) -> float:
    """Size of ``torch.save(model.state_dict())`` on disk, in MB (10^6 bytes)."""
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path) / 1e6
    finally:
        os.remove(path)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) parameters; torch.ao quantised Linear weights/biases counted from their packed values."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    for m in model.modules():
        w = getattr(m, "weight", None)
        if callable(w) and not isinstance(w, torch.Tensor):  # torch.ao quantised Linear: weight() method
            q = w()
            total += q.numel()
            nonzero += int(torch.count_nonzero(q.int_repr()))
            b = m.bias() if callable(getattr(m, "bias", None)) else None
            if b is not None:
                total += b.numel()
                nonzero += int(torch.count_nonzero(b))
    return total, nonzero
