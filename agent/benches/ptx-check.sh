#!/usr/bin/env bash
# Assemble the calibration kernel (agent/src/cuda/burn.ptx) with NVIDIA's ptxas for the
# GPU generations gpulet targets, on a machine without a GPU or CUDA: ptxas comes from
# the `nvidia-cuda-nvcc-cu12` wheel on PyPI (about 40 MB, downloaded to a temporary
# folder). A PTX error shows here rather than at `gpulet calibrate` on a GPU server.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download --quiet --no-deps -d "$tmp" nvidia-cuda-nvcc-cu12
python3 -m zipfile -e "$tmp"/nvidia_cuda_nvcc_cu12-*.whl "$tmp/x"
ptxas=$(find "$tmp/x" -name ptxas -type f | head -1)
chmod +x "$ptxas"
"$ptxas" --version | tail -1
for arch in sm_50 sm_70 sm_80 sm_89 sm_90; do
    printf '%s: ' "$arch"
    "$ptxas" --gpu-name "$arch" -v agent/src/cuda/burn.ptx -o "$tmp/burn.cubin" 2>&1 | grep -o 'Used [0-9]* registers'
done
