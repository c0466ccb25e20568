#!/usr/bin/env bash
# On a lent GPU (see benchmarks/README.md): the CUDA tests plus the model, checkpoint and
# generation tests on the GPU machine's own torch and transformers. Output: $OUT/gpu_check.txt.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_models.py tests/test_generate.py tests/test_hub.py
} 2>&1 | tee "$out/gpu_check.txt"
