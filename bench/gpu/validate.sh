#!/usr/bin/env bash
# GPU validation of issue 16 on one NVIDIA GPU (an H200), in at most 8 minutes.
#
#   bash bench/gpu/validate.sh RESULTS_DIR              # on the GPU machine (the device tool: RESULTS_DIR=$OUT)
#   bash bench/gpu/validate.sh --dry-run RESULTS_DIR    # anywhere: simulated NVML, CPU, durations of seconds
#
# Env: PYTHON (default python3), PARTS (comma list, default all: devices,periods,integrate,train,boundaries,
#      zeus,inference), BUDGET_S (default 480), KEEP_SCRATCH=1 (keep MLflow stores and Lightning dirs),
#      WATTLOG_GPU_INSTALL=1 (install the wheels in a dry run too: only ever with PYTHON from a throwaway venv
#      that stands in for the GPU image).
#
# Writes at most 8 files into RESULTS_DIR: one JSON per part (bench/gpu/common.py: PARTS) and log.txt (all
# output, the plan and the summary). Each part runs under its own `timeout`, never longer than what leaves
# the planned time of the parts after it; a part that fails or times out still leaves its JSON with an
# "error" field and whatever it had measured.
#
# Wheels: the GPU image has no MLflow, Hydra or Zeus and no network; bench/gpu/fetch_wheels.sh puts them in
# .whl/gpu, which the device tool carries (carry: [".whl/gpu"]). They are installed here, then the repo
# itself without its dependencies.
set -u -o pipefail

DRY=${WATTLOG_GPU_DRYRUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu/validate.sh [--dry-run] RESULTS_DIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$1"
RESULTS=$(cd "$1" && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-480}
SEL=${PARTS:-all}
START=$(date +%s)
export PYTHONUNBUFFERED=1 WATTLOG_GPU_DRYRUN=$DRY
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/wattlog-gpu.XXXXXX")
export WATTLOG_GPU_SCRATCH=$SCRATCH
LOG=$RESULTS/log.txt
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
elapsed() { echo $(( $(date +%s) - START )); }

echo "== wattlog GPU validation $( [ "$DRY" = 1 ] && echo '(DRY RUN: simulated NVML, CPU)') $(date -u +%FT%TZ)"
echo "repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (+uncommitted changes)'); results $RESULTS; python $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
command -v nvidia-smi >/dev/null && [ "$DRY" = 0 ] && timeout 20 nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,temperature.gpu,clocks.sm --format=csv

# ---------------------------------------------------------------------------------------------- install
# torchao goes to a folder of its own that only the inference part puts on its path: transformers imports
# torchao whenever it is importable, and a torchao built for another torch must not touch the other parts.
export WATTLOG_GPU_OPT_SITE=$SCRATCH/opt-site
install_torchao() {
  local f
  f=$(ls .whl/gpu/torchao-*.whl 2>/dev/null | head -1)
  if [ -n "$f" ] && ! "$PY" -c "import torchao" 2>/dev/null; then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$WATTLOG_GPU_OPT_SITE" "$f" \
      || echo "!! install of $f failed (rc $?)"
  fi
}
INSTALL=${WATTLOG_GPU_INSTALL:-$((1 - DRY))}
if [ "$INSTALL" = 1 ]; then
  if [ -d .whl/gpu ]; then
    echo "== installing carried wheels from .whl/gpu ($(ls .whl/gpu/*.whl | wc -l) wheels, $(du -sh .whl/gpu | cut -f1))"
    PIP=("$PY" -m pip install -q --no-index --find-links .whl/gpu --disable-pip-version-check --no-warn-script-location)
    # Into the image's environment; where that fails (read-only, conflicts), into a folder put last on the path.
    if ! timeout 180 "${PIP[@]}" mlflow-skinny SQLAlchemy alembic hydra-core omegaconf antlr4-python3-runtime; then
      echo "!! install into the environment failed; retrying into $SCRATCH/deps (last on PYTHONPATH)"
      timeout 180 "${PIP[@]}" --target "$SCRATCH/deps" mlflow-skinny SQLAlchemy alembic hydra-core omegaconf \
        antlr4-python3-runtime || echo "!! install of mlflow-skinny/hydra failed (rc $?): the parts that need them will say so"
    fi
    for w in zeus codecarbon; do
      f=$(ls .whl/gpu/"$w"-*.whl 2>/dev/null | head -1)
      if [ -n "$f" ]; then
        timeout 60 "${PIP[@]}" --no-deps "$f" || timeout 60 "${PIP[@]}" --no-deps --target "$SCRATCH/deps" "$f" \
          || echo "!! install of $f failed"
      fi
    done
    install_torchao
  else
    echo "!! no .whl/gpu: run bench/gpu/fetch_wheels.sh where PyPI is reachable and carry .whl/gpu"
  fi
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
    || echo "!! pip install -e . failed (rc $?); wattlog is imported through PYTHONPATH=plugin"
else
  # Dry run: never install into this machine's environment. Zeus (a pure wheel) goes to a scratch folder put
  # last on the path, torchao to its own folder (above), when they are not importable here.
  f=$(ls .whl/gpu/zeus-*.whl 2>/dev/null | head -1)
  if ! "$PY" -c "import zeus" 2>/dev/null && [ -n "$f" ]; then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --target "$SCRATCH/site" "$f" || true
  fi
  install_torchao
fi
export PYTHONPATH="$REPO/plugin:$REPO${PYTHONPATH:+:$PYTHONPATH}:$SCRATCH/site:$SCRATCH/deps"
"$PY" -c 'import wattlog, sys; print("wattlog", wattlog.__version__, "from", wattlog.__file__)'
echo "== install done at $(elapsed) s"

# ---------------------------------------------------------------------------------------------- parts
"$PY" bench/gpu/validate.py plan
mapfile -t PLAN < <("$PY" bench/gpu/validate.py plan --shell)
selected() { [ "$SEL" = all ] || [[ ",$SEL," == *",$1,"* ]]; }
declare -A STATUS
for ((i = 0; i < ${#PLAN[@]}; i++)); do
  read -r name file planned cap <<<"${PLAN[$i]}"
  selected "$name" || continue
  reserve=0
  for ((j = i + 1; j < ${#PLAN[@]}; j++)); do
    read -r n2 _ p2 _ <<<"${PLAN[$j]}"
    selected "$n2" && reserve=$((reserve + p2))
  done
  left=$((BUDGET - $(elapsed)))
  t=$((left - reserve))
  [ "$t" -gt "$cap" ] && t=$cap
  out=$RESULTS/$file
  if [ "$t" -lt 10 ]; then
    echo "== $name: SKIPPED, ${t} s would be left of the ${BUDGET} s budget (after reserving ${reserve} s for later parts)"
    "$PY" bench/gpu/validate.py mark "$name" "$out" "skipped: out of time budget (${t} s left for it)" --force
    STATUS[$name]=skipped
    continue
  fi
  echo "== $name at $(elapsed) s: timeout ${t} s (planned ${planned} s)"
  timeout -k 10 "$t" "$PY" bench/gpu/validate.py run "$name" --out "$out" --deadline-s $((t - 5)) </dev/null
  rc=$?
  if [ "$rc" -ne 0 ]; then
    why="exit status $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${t} s (exit $rc)"
    "$PY" bench/gpu/validate.py mark "$name" "$out" "$why"
  fi
  STATUS[$name]=$rc
done

# ---------------------------------------------------------------------------------------------- summary
echo
timeout 30 "$PY" bench/gpu/validate.py summary "$RESULTS"
echo "== part exit codes: $(for k in "${!STATUS[@]}"; do printf '%s=%s ' "$k" "${STATUS[$k]}"; done)"
find "$RESULTS" -maxdepth 1 -name "*.tmp" -delete
echo "== results ($(find "$RESULTS" -maxdepth 1 -type f | wc -l) files, at most 8):"
ls -la "$RESULTS"
echo "== total $(elapsed) s of the ${BUDGET} s budget"
if [ "${KEEP_SCRATCH:-0}" = 1 ]; then echo "scratch kept: $SCRATCH"; else rm -rf "$SCRATCH"; fi
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
