#!/usr/bin/env bash
# Everything a session with a lent GPU should run (see DEVELOPERS.md), in two device calls:
#   bash benchmarks/gpu_session.sh kernels    # kernel tests on CUDA, kernel and conv benchmarks, cost model
#   bash benchmarks/gpu_session.sh models     # whole models (BERT-base, GPT-2 small, ResNet-50): dense vs ROAST
# (no argument: both, which may not fit one 10-minute call). Every step is bounded by a timeout and writes
# its JSON and log straight to $OUT when set (the device's return folder), else benchmarks/results/.
# Runs with whatever torch/triton the machine has (the device image: torch 2.11, triton 3.6,
# no internet), from the repository root, without installing roastfx: it imports from a
# temporary package link, since passes/ and codegen/ install as roastfx.passes/roastfx.codegen.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LINK=$(mktemp -d)
mkdir -p "$LINK/roastfx"
for f in roastfx/*; do ln -s "$ROOT/$f" "$LINK/roastfx/"; done
ln -s "$ROOT/passes" "$LINK/roastfx/passes"
ln -s "$ROOT/codegen" "$LINK/roastfx/codegen"
export PYTHONPATH="$LINK:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
OUTDIR=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUTDIR" benchmarks/results
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUTDIR/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

STAGE=${1:-all}   # kernels (tests, kernel/conv benchmarks, cost model) | models | all; each fits one 10-minute call
if [ "$STAGE" = kernels ] || [ "$STAGE" = all ]; then
  echo "== kernel tests on CUDA"
  ROASTFX_TEST_CUDA=1 timeout 200 python -m pytest -q -p no:cacheprovider tests/codegen 2>&1 \
    | tee "$OUTDIR/kernel-tests-cuda.txt" | tail -15
  echo "== kernel benchmark"
  timeout 150 python benchmarks/bench_kernels.py --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench_kernels.txt" | tail -40
  echo "== conv benchmark"
  timeout 90 python benchmarks/bench_conv.py --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench_conv.txt" | tail -30
  echo "== cost-model validation"
  timeout 120 python benchmarks/validate_cost_model.py --out "$OUTDIR" 2>&1 | tee "$OUTDIR/validate_cost_model.txt" \
    | tail -40
fi
if [ "$STAGE" = models ] || [ "$STAGE" = all ]; then
  # one model per run, each bounded, so a slow compile of one cannot lose the other's results
  for model in bert-base gpt2-small resnet50; do
    echo "== whole model: $model"
    timeout 190 python benchmarks/bench_models.py --models "$model" --out "$OUTDIR" 2>&1 \
      | tee "$OUTDIR/bench_models-$model.txt" | tail -12
  done
fi
rm -rf "$LINK"
