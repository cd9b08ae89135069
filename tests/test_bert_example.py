"""The BERT example app end to end on CPU: data, fine-tune, compression job, sweep, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from examples.bert_finetune import data as bert_data  # noqa: E402
from examples.bert_finetune.app import CONF_DIR, CONFIG_NAME, run_task  # noqa: E402
from examples.bert_finetune.compress import IncompatibleConfig  # noqa: E402
from examples.bert_finetune.model import load_tokenizer  # noqa: E402

TINY = ["data.max_train_samples=64", "data.max_val_samples=32", "data.max_test_samples=32",
        "data.max_length=32", "data.batch_size=16", "data.eval_batch_size=32", "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "energy.progress_bar=false"]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=[*TINY, *overrides])


def pythonpath() -> str:
    """PYTHONPATH for a subprocess app: the repository first, then the caller's (e.g. its plugin/)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT classifier saved with the MiniLM tokenizer (vocab 30522)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2, max_position_embeddings=64)
    transformers.BertForSequenceClassification(config).save_pretrained(out)
    load_tokenizer("minilm").save_pretrained(out)
    return out


# ---------------------------------------------------------------- data


def test_rotten_tomatoes_subset() -> None:
    texts, labels = bert_data.read_rotten_tomatoes()
    assert len(texts) == 8530
    assert sum(labels) == 4265 and set(labels) == {0, 1}


def test_split_is_seeded_disjoint_and_truncated() -> None:
    a = bert_data.split_movie_reviews(seed=0)
    assert (len(a.train[0]), len(a.val[0]), len(a.test[0])) == (6824, 853, 853)
    assert not set(a.test[0]) & set(a.val[0])
    b = bert_data.split_movie_reviews(seed=0, max_train_samples=10, max_test_samples=5)
    assert b.train[0] == a.train[0][:10] and b.test == (a.test[0][:5], a.test[1][:5])
    assert bert_data.split_movie_reviews(seed=1).test[0] != a.test[0]


def test_glue_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install wattlog\[glue\]"):
        bert_data.split_glue_sst2()


def test_unknown_data_source_is_a_config_error() -> None:
    from wattlog.errors import ConfigError

    with pytest.raises(ConfigError, match="data.source"):
        bert_data.load_splits(compose_cfg("data.source=imdb").data)


# ---------------------------------------------------------------- jobs


@pytest.mark.slow
def test_finetune_end_to_end(tracking: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    result = run_task(compose_cfg(f"checkpoint_dir={ckpt}", "energy=estimate", "mlflow.run_name=e2e"))
    assert result["status"] == "FINISHED"
    assert 0.0 <= result["val_acc"] <= 1.0 and 0.0 <= result["test_acc"] <= 1.0
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    (run,) = [r for r in runs(tracking, "bert-finetune") if r.info.run_name == "e2e"]
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("val_acc", "val_loss", "train_loss", "test_acc", "energy/total_j", "energy/train_j"):
        assert key in m, key
    assert m["energy/total_j"] > 0
    assert len(MlflowClient(tracking).get_metric_history(run.info.run_id, "train_loss")) == 4  # 64/16 steps
    assert run.data.params["model.name"] == "minilm" and run.data.params["data.max_length"] == "32"
    assert run.data.tags["checkpoint_dir"] == str(ckpt.resolve())
    artifacts = [a.path for a in MlflowClient(tracking).list_artifacts(run.info.run_id, "energy")]
    assert "energy/trace.csv" in artifacts


@pytest.mark.slow
def test_compression_job_logs_energy_per_test_sample(tracking: str, tiny_checkpoint: Path) -> None:
    cfg = compose_cfg("task=compress", f"checkpoint_dir={tiny_checkpoint}", "prune=l1_unstructured",
                      "prune.amount=0.4", "quantize=int8_dynamic", "energy=estimate")
    result = run_task(cfg)
    assert result["status"] == "FINISHED"
    (run,) = [r for r in runs(tracking, "bert-compress") if r.info.run_id == result["run_id"]]
    m = run.data.metrics
    assert run.info.run_name == "l1_unstructured0.4-int8_dynamic"
    assert m["energy/test_j_per_sample"] > 0
    assert m["test_samples"] == 32 and m["test_latency_ms_per_sample"] > 0
    assert m["sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert m["model_size_mb"] < m["model_size_mb_before"]
    assert 0.0 <= m["test_acc"] <= 1.0
    assert run.data.params["quantize.name"] == "int8_dynamic"


def test_incompatible_option_fails_the_job_clearly(tracking: str, tiny_checkpoint: Path) -> None:
    cfg = compose_cfg("task=compress", f"checkpoint_dir={tiny_checkpoint}", "quantize=fp16", "energy=off",
                      "mlflow.run_name=fp16-on-cpu")
    with pytest.raises(IncompatibleConfig, match=r"fp16.*CUDA"):
        run_task(cfg)
    result = run_task(cfg, reraise=False)  # what a multirun job does: record and return
    assert result["status"] == "FAILED" and "IncompatibleConfig" in result["error"]
    failed = [r for r in runs(tracking, "bert-compress") if r.info.run_name == "fp16-on-cpu"]
    assert len(failed) == 2
    for run in failed:
        assert run.info.status == "FAILED"
        assert "quantize.name='fp16'" in run.data.tags["wattlog.error"]


def test_missing_checkpoint_names_the_fix(tracking: str, tmp_path: Path) -> None:
    from wattlog.errors import ConfigError

    cfg = compose_cfg("task=compress", f"checkpoint_dir={tmp_path / 'nope'}", "energy=off")
    with pytest.raises(ConfigError, match="python -m examples.bert_finetune"):
        run_task(cfg)


def test_prune_in_a_finetune_job_is_rejected(tracking: str) -> None:
    from wattlog.errors import ConfigError

    with pytest.raises(ConfigError, match="task=compress"):
        run_task(compose_cfg("prune=l1_unstructured", "energy=off"))


@pytest.mark.slow
def test_compress_sweep_makes_parent_and_children(tmp_path: Path, tiny_checkpoint: Path) -> None:
    uri = f"sqlite:///{tmp_path}/sweep.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "examples.bert_finetune", "-m", "sweep=compress",
           "prune=none", "quantize=int8_dynamic,fp16",  # command line beats the preset's grid
           f"checkpoint_dir={tiny_checkpoint}", f"hydra.sweep.dir={tmp_path / 'multirun'}", "energy=estimate",
           *TINY]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    all_runs = runs(uri, "bert-compress")
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"none-int8_dynamic", "none-fp16"}
    assert by_name["none-int8_dynamic"].info.status == "FINISHED"
    assert by_name["none-int8_dynamic"].data.metrics["energy/test_j_per_sample"] > 0
    assert by_name["none-fp16"].info.status == "FAILED"  # the sweep went on past the failing job
    assert "fp16" in by_name["none-fp16"].data.tags["wattlog.error"]


# ---------------------------------------------------------------- making variants: metered stages, payback


def compress_run(tracking: str, checkpoint: Path, *overrides: str) -> Any:
    """Run a compression job on ``checkpoint`` with estimated energy; its MLflow run."""
    result = run_task(compose_cfg("task=compress", f"checkpoint_dir={checkpoint}", "energy=estimate", *overrides))
    assert result["status"] == "FINISHED"
    (run,) = [r for r in runs(tracking, "bert-compress") if r.info.run_id == result["run_id"]]
    return run


@pytest.mark.slow
def test_recovery_is_a_metered_stage_of_the_variants_run(tracking: str, tiny_checkpoint: Path) -> None:
    run = compress_run(tracking, tiny_checkpoint, "compress=heads_recovered", "prune.finetune_steps=2")
    m = run.data.metrics
    assert run.info.run_name == "structured0.25heads+ft2-none"
    assert m["energy/recover_j"] > 0 and m["energy/recover_j_per_sample"] > 0
    assert "energy/train_j" not in m and "energy/j_per_sample" not in m  # the fit is named `recover`
    assert m["energy/make_j"] == pytest.approx(m["energy/recover_j"])
    assert m["energy/test_j_per_sample"] > 0 and m["recovery_steps"] == 2
    assert m["energy/total_j"] >= m["energy/recover_j"] + m["energy/test_j"] - 1e-9
    assert len(MlflowClient(tracking).get_metric_history(run.info.run_id, "train_loss")) == 2


@pytest.mark.slow
def test_distillation_trains_a_shallower_student_metered(tracking: str, tiny_checkpoint: Path) -> None:
    run = compress_run(tracking, tiny_checkpoint, "compress=distill", "distill.layers=1", "distill.steps=2")
    m = run.data.metrics
    assert run.info.run_name == "distill1L+kd2-none"
    assert m["encoder_layers"] == 1 and m["distill_steps"] == 2
    assert m["energy/distill_j"] > 0 and m["energy/make_j"] == pytest.approx(m["energy/distill_j"])
    assert m["energy/test_j_per_sample"] > 0


def test_post_training_quantisation_costs_nothing_to_make(tracking: str, tiny_checkpoint: Path) -> None:
    run = compress_run(tracking, tiny_checkpoint, "compress=int8_dynamic", "energy.artifacts=false")
    assert run.data.metrics["energy/make_j"] == 0.0
    assert not any(k in run.data.metrics for k in ("energy/recover_j", "energy/distill_j", "energy/train_j"))


def test_distill_and_prune_together_are_rejected(tracking: str, tiny_checkpoint: Path) -> None:
    from wattlog.errors import ConfigError

    with pytest.raises(ConfigError, match="distill=student"):
        run_task(compose_cfg("task=compress", f"checkpoint_dir={tiny_checkpoint}", "compress=distill",
                             "prune=l1_unstructured", "energy=off"))


@pytest.mark.slow
def test_payback_sweep_ranks_children_by_payback(tmp_path: Path, tiny_checkpoint: Path) -> None:
    uri = f"sqlite:///{tmp_path}/payback.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "examples.bert_finetune", "-m", "sweep=compress_payback", "sweep.repeats=2",
           "compress=none,heads_recovered", "prune.finetune_steps=2", f"checkpoint_dir={tiny_checkpoint}",
           f"hydra.sweep.dir={tmp_path / 'multirun'}", "energy=estimate", "energy.artifacts=false", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU available" not in proc.stdout + proc.stderr and "Tip:" not in proc.stdout + proc.stderr
    all_runs = runs(uri, "bert-compress")
    (parent,) = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and {r.data.params.get("override.seed") for r in children} == {"0", "1"}
    for child in children:
        m, tag = child.data.metrics, child.data.tags.get("energy.payback")
        assert "energy/make_j" in m
        if child.data.params["prune.name"] == "none":
            assert tag == "baseline" and m["energy/make_j"] == 0.0
        else:  # a real payback, or no metric and the tag when nothing was saved (never inf in MLflow)
            assert m["energy/make_j"] > 0
            assert (tag is None and 0 < m["energy/payback_samples"] < 1e300) or (
                tag == "never" and "energy/payback_samples" not in m)
    import csv

    client = MlflowClient(uri)
    local = client.download_artifacts(parent.info.run_id, "sweep/summary.csv", str(tmp_path))
    with open(local, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["payback"] for r in rows][:2] == ["baseline", "baseline"]  # ranked: baseline, then by payback
    assert {"energy/make_j", "energy/payback_samples", "saved_j_per_sample", "delta_test_acc"} <= set(rows[0])
