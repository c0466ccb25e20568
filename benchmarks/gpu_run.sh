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
#
# `bash benchmarks/gpu_run.sh qlora` is the QLoRA run, a device call of its own (at most 9 minutes: its steps' limits):
# qlora-tests (tests/test_quant.py: on CUDA the Triton kernel and bitsandbytes' CUDA kernels as the oracle), nf4
# (bench_kernels.py's NF4 dequantization at Mistral-7B's layer shapes against bitsandbytes, and its NUM_WARPS
# sweep), qlora-7b
# (bench_train.py's qlora-mistral-7b: minitune against transformers + peft + bitsandbytes) and lora-7b
# (lora-mistral-7b, the same in bf16). The two 7B steps share one random bf16 checkpoint (14.5 GB, written by
# the first under /tmp/minitune-bench-train). Output: gpu_run.txt, nf4/bench_kernels.{json,md},
# qlora/bench_train.{json,md}, lora/bench_train.{json,md}. bitsandbytes comes from benchmarks/vendor/ (below).
#
# `bash benchmarks/gpu_run.sh issue19` (at most 430 s by its limits) is what issue 19 still has to measure:
# issue19-tests (tests/test_quant.py and tests/test_cuda.py, the offloaded checkpoints' among them), nf4 (the
# restructured kernel and its NUM_WARPS sweep) and qlora-offload-7b (qlora-mistral-7b with minitune's checkpoints
# in pinned CPU memory; it writes the 7B checkpoint when qlora-7b has not). Output: nf4/, qlora-offload/.
#
# `bash benchmarks/gpu_run.sh speed` is issue 20's run as far as it is built (at most 5 minutes by its limits):
# speed-tests (tests/test_cuda.py: no host sync in a bf16 step, variable-length flash attention against the mask;
# the RoPE and SwiGLU kernels compiled), speed-kernels (bench_kernels.py's rope and swiglu at Mistral-7B's shapes
# against eager, torch.compile and Liger), packing (bench_packing.py: the SFT step padded and packed, bf16).
# Output: speed/bench_kernels.{json,md}, packing/bench_packing.{json,md}.
# `bash benchmarks/gpu_run.sh scale` (at most 10 minutes by its limits): bench_train.py's packed configs at scale,
# minitune against transformers (+ PEFT, + bitsandbytes) and transformers + Liger (its wheel carried): scale-1b
# (packed-mistral-1b, full fine-tuning, 8 x 2048) and scale-7b (packed-lora- and packed-qlora-mistral-7b, 2 x 4096,
# checkpointing; the 7B checkpoint in /tmp/minitune-bench-train, written by the first). Output: scale-1b/, scale-7b/.
# `bash benchmarks/gpu_run.sh fsdp` (at most 4 minutes): fsdp-qlora-7b, bench_fsdp.py --qlora under torchrun with one
# process: the QLoRA step of issue 19 (Mistral-7B shape, random weights made on the GPU) plain, then sharded with
# FSDP2 over a world of one: the same losses, tokens/s and peak of each. Output: fsdp/bench_fsdp_qlora.{json,md}.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
wheel=benchmarks/vendor/liger_kernel-0.8.5-py3-none-any.whl
bnb_wheel=$(ls benchmarks/vendor/bitsandbytes-*.whl 2>/dev/null | head -n 1)
work=/tmp/minitune-bench-train  # the 7B checkpoint: not under $OUT, which comes back

steps=" ${*:-tests kernels train sft dpo} "
steps=${steps/ qlora / qlora-tests nf4 qlora-7b lora-7b }  # the QLoRA set
steps=${steps/ issue19 / issue19-tests nf4 qlora-offload-7b }  # what issue 19 still has to measure
steps=${steps/ speed / speed-tests speed-kernels packing }  # issue 20: tests, kernels, packing
steps=${steps/ scale / scale-1b scale-7b }  # issue 20: the packed steps at scale
steps=${steps/ fsdp / fsdp-qlora-7b }  # issue 21: FSDP2 on one GPU

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

install_wheel() {  # install_wheel WHEEL: pip without dependencies or index, else unpacked onto PYTHONPATH
  if ! python3 -m pip install -q --no-deps --no-index "$1" >/dev/null 2>&1; then
    local dir
    dir=$(mktemp -d)
    python3 -m zipfile -e "$1" "$dir" && export PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}"
  fi
}


{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  nvidia-smi
  # Liger Kernel and bitsandbytes are only compared against; the machine has no internet, so they come from the
  # vendored wheels (git-ignored: carried to the machine explicitly), installed without dependencies (torch,
  # numpy and packaging are there), else unpacked onto PYTHONPATH (bitsandbytes' native libraries load either way).
  [ -f "$wheel" ] && install_wheel "$wheel"
  [ -n "$bnb_wheel" ] && install_wheel "$bnb_wheel"
  python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', t.__version__)"
  python3 -c "import liger_kernel.transformers.functional as f; print('liger-kernel from', f.__file__)" 2>/dev/null \
    || echo "liger-kernel: not available (the benchmarks say n/a)"
  python3 -c "import bitsandbytes as b, peft; print('bitsandbytes', b.__version__, 'from', b.__file__, '| peft', peft.__version__)" 2>/dev/null \
    || echo "bitsandbytes or peft: not available (the NF4 and QLoRA comparisons say n/a)"

  step tests 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py tests/test_models.py
  step kernels 200 python3 benchmarks/bench_kernels.py --sweep --out "$out"
  step train 170 python3 benchmarks/bench_train.py --configs mistral-1b --out "$out"
  step sft 150 python3 benchmarks/bench_train.py --configs sft-mistral-1b --out "$out/sft"
  step dpo 150 python3 benchmarks/bench_train.py --configs dpo-lora-mistral-1b --out "$out/dpo"

  step speed-tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py -k "test_cuda or rope or swiglu"
  step speed-kernels 150 python3 benchmarks/bench_kernels.py --kernels rope,swiglu --out "$out/speed"
  step packing 60 python3 benchmarks/bench_packing.py --device cuda --out "$out/packing"
  step scale-1b 200 python3 benchmarks/bench_train.py --configs packed-mistral-1b --steps 6 --warmup 1 --mem-warmup 1 \
    --mem-steps 1 --timeout 150 --out "$out/scale-1b"
  step scale-7b 380 python3 benchmarks/bench_train.py --configs packed-lora-mistral-7b,packed-qlora-mistral-7b \
    --work "$work" --steps 5 --warmup 1 --mem-warmup 1 --mem-steps 1 --timeout 170 --out "$out/scale-7b"
  step fsdp-qlora-7b 240 python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/bench_fsdp.py \
    --qlora --device cuda --out "$out/fsdp"

  step qlora-tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py
  step issue19-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_cuda.py
  step nf4 90 python3 benchmarks/bench_kernels.py --kernels nf4_dequantize --sweep --out "$out/nf4"
  # 7B: 6 timed rounds after 1 warm-up; memory from 1 + 1 steps in a fresh process per library. The first writes
  # the checkpoint (about a minute), the second reuses it.
  step qlora-7b 220 python3 benchmarks/bench_train.py --configs qlora-mistral-7b --work "$work" --steps 6 --warmup 1 \
    --mem-warmup 1 --mem-steps 1 --timeout 150 --out "$out/qlora"
  step lora-7b 165 python3 benchmarks/bench_train.py --configs lora-mistral-7b --work "$work" --steps 6 --warmup 1 \
    --mem-warmup 1 --mem-steps 1 --timeout 150 --out "$out/lora"
  step qlora-offload-7b 220 python3 benchmarks/bench_train.py --configs qlora-mistral-7b --grad-checkpointing offload \
    --work "$work" --steps 6 --warmup 1 --mem-warmup 1 --mem-steps 1 --timeout 150 --out "$out/qlora-offload"
  date -u
} 2>&1 | tee "$out/gpu_run.txt"
