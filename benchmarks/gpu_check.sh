#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one call on a machine with no network:
# build the extension (CUDA kernels included), run the GPU tests, run the benchmarks.
# Writes gpu_check.log and one JSON per benchmark under $OUT (default benchmarks/results/local).
#   bash benchmarks/gpu_check.sh            # everything
#   QUICK=1 bash benchmarks/gpu_check.sh    # fewer benchmark shapes, no torch.compile
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ! $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . ; then
  echo "BUILD FAILED"; status=1
fi
$PY -m vlfast info

step "GPU tests"
$PY -m pytest -q -p no:cacheprovider -k "cuda" tests/ --junitxml="$OUT/gpu_tests.xml" || status=1

step "benchmarks"
quick=(); [ -n "${QUICK:-}" ] && quick=(--no-compile)
$PY benchmarks/bench_ddpm.py --json "$OUT/ddpm.json" ${QUICK:+--quick} "${quick[@]}" || status=1
$PY benchmarks/bench_group_norm.py --json "$OUT/group_norm.json" "${quick[@]}" || status=1
$PY benchmarks/sweep_ddpm.py --json "$OUT/sweep_ddpm.json" || status=1

step "done, status $status"
exit $status
