#!/usr/bin/env bash
# Everything a session with a lent GPU should run (see the developers' guide), sized for its 15 minutes of
# device time (a machine's start, 1-2 minutes, included), in two calls:
#   bash benchmarks/gpu_session.sh core     # first call, at most ~8 minutes: the kernel tests on CUDA, the kernel
#                                           # benchmark (issue 4's table) and the cost-model validation (issue 5)
#   bash benchmarks/gpu_session.sh extra    # second call on the still-warm machine, at most ~7 minutes: the conv
#                                           # benchmark, BERT-base dense vs ROAST, a mixture of experts' grouped
#                                           # GEMM (bench_moe.py), the forward GEMM at every
#                                           # block config with its blocks per SM (which config the heuristic
#                                           # should pick, and whether two resident blocks overlap the MMA), and
#                                           # random models compiled against eager (fuzz_models.py)
# Every step is bounded by a timeout (SIGINT first, so pytest prints its summary and Python its traceback) and
# appends to one log; the JSON results go straight to $OUT when set (the device returns at most 8 files: a stage
# writes gpu.txt, session-<stage>.log and its JSON files), else benchmarks/results/. The benchmarks save their
# JSON as they go, so a step cut by its timeout keeps what it measured. Exits 1 if any step failed, 2 on a bad
# stage name. Runs with whatever torch/triton the machine has (the device image: torch 2.11, triton 3.6, no
# internet), from the repository root, without installing roastfx: it imports from a temporary package link,
# since passes/ and codegen/ install as roastfx.passes/roastfx.codegen.
set -uo pipefail
STAGE=${1:-}
case "$STAGE" in
  core|extra) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh core|extra (core first; extra on the warm machine after it)" >&2
     exit 2 ;;
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

if [ "$STAGE" = core ]; then
  export ROASTFX_TEST_CUDA=1  # tests/codegen/conftest.py refuses to fall back to the interpreter with it
  # the tests compile many kernel variants: spread them over the machine's cores where pytest-xdist is there
  XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  step "kernel tests on CUDA" 150 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/codegen
  step "kernel benchmark" 170 "$PY" benchmarks/bench_kernels.py --out "$OUTDIR"
  # every layout timed is a compiled variant (its tile is a kernel constant: about 3 x 1.5 s of compiling per
  # new layout): 100x first, the planner's choice, the default rule and 3 others per shape
  step "cost-model validation" 130 "$PY" benchmarks/validate_cost_model.py --compression 100,10,1000 --layouts 3 \
    --out "$OUTDIR"
else
  step "conv benchmark" 70 "$PY" benchmarks/bench_conv.py --out "$OUTDIR"
  step "whole model: bert-base" 150 "$PY" benchmarks/bench_models.py --models bert-base --compression 10,100 \
    --out "$OUTDIR"
  # a mixture of experts' grouped GEMM (8 and 128 experts) at 100x: dense, fused, materialized; and, at 32
  # tokens, the rows in token order as transformers' batched_mm (dense: a weight gathered per row)
  step "moe grouped GEMM" 60 "$PY" benchmarks/bench_moe.py --out "$OUTDIR"
  # one compile per block config (about 11 on sm_90), two shapes at 100x: last, so a cut keeps the rest
  step "block config sweep" 75 "$PY" benchmarks/sweep_configs.py --out "$OUTDIR"
  # random models compiled against eager with the kernels compiled for the GPU (each case prints its line)
  step "model fuzz on CUDA" 45 env ROASTFX_TEST_CUDA=1 "$PY" benchmarks/fuzz_models.py --cases 20 --seed 1 --verbose
fi
rm -rf "$LINK"
exit $FAILED
