#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into .whl/gpu (git-ignored; carried by the device tool).
#
# Usage (on a machine that reaches PyPI, from anywhere):  bash bench/gpu/fetch_wheels.sh
# Env: PYVER (default 3.12, the GPU image's python), DEST (default .whl/gpu), PYTHON (default python3),
#      MAX_MIB (default 50: the device tool carries 64 MiB in all, the working tree included).
#
# The GPU image (see bench/results/gpu/README.md) has python 3.12, torch, lightning, transformers,
# nvidia-ml-py, psutil, pandas, scikit-learn, rich, httpx, but no MLflow, Hydra or Zeus, and no network.
# What is fetched, pinned to the versions the project's own venv uses:
#   with dependencies: mlflow-skinny (the client; no UI), SQLAlchemy + alembic (its sqlite store),
#                      hydra-core, omegaconf, antlr4-python3-runtime 4.9.3 (sdist only: built here)
#   without:           zeus (ZeusMonitor; its own deps are on the image), codecarbon (wattlog reads only its
#                      data files: CPU TDP table, carbon intensities), torchao (int8 weight-only inference)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl/gpu}
PY=${PYTHON:-python3}
MAX_MIB=${MAX_MIB:-50}
PLAT=(--implementation cp --python-version "$PYVER"
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WITH_DEPS=(mlflow-skinny==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1 hydra-core==1.3.8 omegaconf==2.3.1)
NO_DEPS=(zeus==0.16.0 codecarbon==3.3.2 torchao==0.18.0)

# pip warns about this machine's extra local index folders that do not exist: noise, filtered out
quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

rm -rf "$DEST"
mkdir -p "$DEST"
echo "== antlr4-python3-runtime 4.9.3 (sdist only on PyPI): building its pure-python wheel"
quiet "$PY" -m pip wheel -q --no-deps --no-binary antlr4-python3-runtime -w "$DEST" antlr4-python3-runtime==4.9.3
echo "== with dependencies, python $PYVER x86_64: ${WITH_DEPS[*]}"
quiet "$PY" -m pip download -q --only-binary=:all: "${PLAT[@]}" --find-links "$DEST" -d "$DEST" "${WITH_DEPS[@]}"
echo "== without dependencies: ${NO_DEPS[*]}"
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$DEST" "${NO_DEPS[@]}"

n=$(find "$DEST" -name '*.whl' | wc -l)
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "== $n wheels, $mib MiB in $DEST"
ls -1 "$DEST"
if awk -v b="$bytes" -v m="$MAX_MIB" 'BEGIN { exit !(b > m * 1048576) }'; then
  echo "fetch_wheels: $mib MiB is over the ${MAX_MIB} MiB budget" >&2
  exit 1
fi
