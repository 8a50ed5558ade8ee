#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90, without torch: the .cu files
# are torch-free, so this runs on machines whose torch has no CUDA. Once as asked on
# the command line, once with the flags torch's CUDAExtension adds (no implicit half
# conversions). Skips (exit 0) where nvcc is absent; fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "nvcc_check: nvcc not found, skipping the CUDA compile check"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
arch=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
             -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -DVLFAST_WITH_CUDA)
"$NVCC" --version | tail -n 1
shopt -s nullglob
n=0
for cu in csrc/cuda/*.cu; do
  name="$(basename "$cu" .cu)"
  "$NVCC" -c -std=c++17 "${arch[@]}" "$cu" -o "$tmp/$name.o"
  "$NVCC" -c -std=c++17 -O3 "${arch[@]}" "${torch_flags[@]}" "$cu" -o "$tmp/$name.torch.o"
  echo "nvcc_check: $cu ok"
  n=$((n + 1))
done
echo "nvcc_check: $n file(s) compiled for sm_80 and sm_90"
