#!/usr/bin/env bash
# On a lent GPU (see benchmarks/README.md), the one prepared run, under 10 minutes on an H100: the GPU
# correctness tests (kernels on CUDA tensors, CUDA model paths, models), then bench_kernels.py --sweep,
# bench_train.py's random-token step, its SFT step and last its LoRA DPO step with each reference model
# (copy, lora-disabled, precomputed). Each step has its own time limit; a step that fails or times out
# does not stop the next (the limits add up to more than 10 minutes: a run cut short loses the DPO step
# first, and bench_train.py writes its report after each stage). Output: $OUT (or benchmarks/out/):
# gpu_run.txt (this log), bench_kernels.{json,md}, bench_train.{json,md}, sft/bench_train.{json,md},
# dpo/bench_train.{json,md}. Arguments pick steps by name (tests kernels train sft dpo; default: all),
# e.g. `bash benchmarks/gpu_run.sh tests kernels sft dpo` when the random-token step is already measured.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
wheel=benchmarks/vendor/liger_kernel-0.8.5-py3-none-any.whl

steps=" ${*:-tests kernels train sft dpo} "

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit; print its exit status and time
  local name=$1 limit=$2
  shift 2
  [[ "$steps" == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') after $((SECONDS - t0)) s"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  nvidia-smi
  # Liger Kernel is only compared against; the machine has no internet, so it comes from the vendored
  # wheel (pure Python): pip-installed without dependencies, else unpacked onto PYTHONPATH.
  if [ -f "$wheel" ]; then
    if ! python3 -m pip install -q --no-deps --no-index "$wheel" >/dev/null 2>&1; then
      liger_dir=$(mktemp -d)
      python3 -m zipfile -e "$wheel" "$liger_dir" && export PYTHONPATH="$liger_dir${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', t.__version__)"
  python3 -c "import liger_kernel.transformers.functional as f; print('liger-kernel from', f.__file__)" 2>/dev/null \
    || echo "liger-kernel: not available (the benchmarks say n/a)"

  step tests 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py tests/test_models.py
  step kernels 200 python3 benchmarks/bench_kernels.py --sweep --out "$out"
  step train 170 python3 benchmarks/bench_train.py --configs mistral-1b --out "$out"
  step sft 150 python3 benchmarks/bench_train.py --configs sft-mistral-1b --out "$out/sft"
  step dpo 150 python3 benchmarks/bench_train.py --configs dpo-lora-mistral-1b --out "$out/dpo"
  date -u
} 2>&1 | tee "$out/gpu_run.txt"
