#!/usr/bin/env bash
# Everything a session with a lent GPU should run (see the developers' guide), in two device calls:
#   bash benchmarks/gpu_session.sh kernels    # kernel tests on CUDA, kernel and conv benchmarks, cost model
#   bash benchmarks/gpu_session.sh models     # whole models (BERT-base, GPT-2 small, ResNet-50): dense vs ROAST
# One stage per 10-minute call. Every step is bounded by a timeout (SIGINT first, so pytest prints its summary
# and Python its traceback) and appends to one log; the JSON results go straight to $OUT when set (the device
# returns at most 8 files: a stage writes gpu.txt, session-<stage>.log and its JSON files), else
# benchmarks/results/. Exits 1 if any step failed, 2 on a bad stage name.
# Runs with whatever torch/triton the machine has (the device image: torch 2.11, triton 3.6, no internet),
# from the repository root, without installing roastfx: it imports from a temporary package link, since
# passes/ and codegen/ install as roastfx.passes/roastfx.codegen.
set -uo pipefail
STAGE=${1:-}
case "$STAGE" in
  kernels|models) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh kernels|models (one stage per 10-minute device call)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LINK=$(mktemp -d)
mkdir -p "$LINK/roastfx"
for f in roastfx/*; do ln -s "$ROOT/$f" "$LINK/roastfx/"; done
ln -s "$ROOT/passes" "$LINK/roastfx/passes"
ln -s "$ROOT/codegen" "$LINK/roastfx/codegen"
export PYTHONPATH="$LINK:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
# `python -m pytest` would put the repository root first on sys.path, and its roastfx/ has no passes/ or
# codegen/: import roastfx from the link only
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1  # a step cut by its timeout keeps what it printed
PY=$(command -v python3 || command -v python)
OUTDIR=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUTDIR" benchmarks/results
LOG="$OUTDIR/session-$STAGE.log"
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run it bounded, log it, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)" | tee -a "$LOG"
  timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit status $rc" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUTDIR/gpu.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$LOG"
git -C "$ROOT" log -1 --format='commit %H' 2>/dev/null | tee -a "$LOG"

if [ "$STAGE" = kernels ]; then
  export ROASTFX_TEST_CUDA=1  # tests/codegen/conftest.py refuses to fall back to the interpreter with it
  step "kernel tests on CUDA" 190 "$PY" -m pytest -q -p no:cacheprovider tests/codegen
  step "kernel benchmark" 140 "$PY" benchmarks/bench_kernels.py --out "$OUTDIR"
  step "conv benchmark" 100 "$PY" benchmarks/bench_conv.py --out "$OUTDIR"
  step "cost-model validation" 110 "$PY" benchmarks/validate_cost_model.py --out "$OUTDIR"
else
  # one model per run, each bounded, and each variant's row saved as soon as it is measured
  for model in bert-base gpt2-small resnet50; do
    step "whole model: $model" 175 "$PY" benchmarks/bench_models.py --models "$model" --compression 10,100 \
      --out "$OUTDIR"
  done
fi
rm -rf "$LINK"
exit $FAILED
