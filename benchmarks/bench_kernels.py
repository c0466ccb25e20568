"""Kernels: minitune's rms_norm, layer_norm, cross_entropy, fused_linear_cross_entropy, rope and swiglu, forward +
backward; and its NF4 dequantization (QLoRA's weights), forward only.

    python benchmarks/bench_kernels.py --out benchmarks/out            # CPU: about 1.5 minutes on 2 cores
    python benchmarks/bench_kernels.py --sweep --out benchmarks/out    # GPU, plus the cross-entropy constants
    python benchmarks/bench_kernels.py --kernels nf4_dequantize --out benchmarks/out/nf4   # the NF4 part alone

One measured call is the forward and its backward (`out.backward(dy)` with a fixed upstream gradient
for the norms, `loss.backward()` for the losses). For each kernel and size, every variant is timed
on the same inputs: minitune (the default dispatch: Triton on CUDA tensors, PyTorch elsewhere),
PyTorch eager (minitune's references; for the fused linear CE, `F.cross_entropy(hidden @ weight.T,
targets)`), `torch.compile` of that eager function (GPU), Liger Kernel (GPU, when installed) and
torch's `F.linear_cross_entropy` with `LinearCrossEntropyOptions()` (fused linear CE, when this torch
has it). Reported:

- time: the median. GPU: `triton.testing.do_bench(return_mode="median")`, which resets the inputs'
  .grad (grad_to_none) and flushes the L2 cache before each call, outside the timed region; inputs,
  targets and upstream gradients are allocated once, before. CPU: the median of time.perf_counter()
  around each call, after warm-up calls for half a second (at least one), 2 to 20 calls, about a
  second of them.
- bandwidth from the minimum bytes a forward + backward must move, b = bytes per element:
  RMSNorm/LayerNorm 5*M*N*b (forward reads x, writes y: 2*M*N*b; backward reads x and dy, writes
  dx: 3*M*N*b); cross-entropy 2*M*V*b (read the logits, write their gradient); rope, at Mistral-7B's heads
  (32 q and 8 kv heads of 128) for B x T tokens with a cos and sin row per token, 2*(2*40*128 + 2*128)*B*T*b
  (each pass reads q, k, cos and sin and writes q and k); swiglu 8*M*N*b (forward reads gate and up,
  writes y; backward reads dy, gate and up, writes their gradients). Also as a fraction of
  the copy bandwidth measured in the same run: dst.copy_(src) of a 1 GiB tensor moves 2 * 1 GiB.
  The fused linear CE is bound by its matmuls: no bandwidth.
- minitune speed-up: a variant's time divided by minitune's (above 1: minitune is faster).
- peak memory (GPU): torch.cuda.max_memory_allocated during one call minus the memory allocated
  before it (the inputs). On the CPU only the fused linear CE goal's: the peak RSS increase (VmHWM
  after resetting it through /proc/self/clear_refs) of one call, in a fresh process per variant.

Liger's cross_entropy writes the gradient into its input logits. Its logits are restored from a
copy before each timed call, outside the timed region (through do_bench's grad_to_none hook).

--sweep (GPU) tunes the module constants of the chosen kernels (restored afterwards): cross_entropy forward +
backward at M=8192 for V=32000 and 128256 over MAX_BLOCK_V x NUM_WARPS; rms_norm's backward programs per SM;
nf4_dequantize's NUM_WARPS (a program's bytes grow with it) at each layer shape.

nf4_dequantize (no backward: a frozen weight) at the shapes of Mistral-7B's linear layers (M x N = out x in
features: q/o 4096 x 4096, k/v 1024 x 4096, gate/up 14336 x 4096, down 4096 x 14336; on the CPU the first
two), output bf16 unless --dtype is given. The weight (random normal, in the output dtype) is quantized by
bitsandbytes' quantize_4bit(quant_type="nf4", compress_statistics=True, blocksize 64) where bitsandbytes is
installed, else by minitune.quant.quantize_nf4; every variant dequantizes that same state:
minitune (kernels.nf4_dequantize: Triton on CUDA tensors), eager (its PyTorch reference), compile (GPU),
bitsandbytes (bitsandbytes.functional.dequantize_4bit; on the CPU too, through its CPU backend) and copy
(dst.copy_(src) of an output-sized tensor: what merely moving the output costs). Bandwidth from the bytes a
dequantization must move: read the packed codes (n/2), the 8-bit block maxima (n/64) and their float32
scales (n/64/256 * 4), write the output (n * b); the copy's from its own 2 * n * b. minitune's output must
equal bitsandbytes' exactly (torch.equal), and so must the reference's; the note column says. Also
recorded: whether quantize_nf4 gives bitsandbytes' bytes (codes, block maxima, scales, offset) for the
same weight: on a GPU it must; bitsandbytes' CPU backend rounds about 0.15% of the 8-bit block maxima to
the second-nearest level (see minitune/quant.py), so on the CPU the count of those that differ is shown.

Writes <out>/bench_kernels.json and <out>/bench_kernels.md (rewritten after each size, so a run
cut short keeps what it measured), ending with the goals and whether the numbers meet them.
MB is 10**6 bytes, GB/s 10**9 bytes per second.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # minitune from this checkout, installed or not

from bench_load import child_env, proc_status, reset_peak  # benchmarks/ is on sys.path

from minitune import kernels
from minitune.kernels.cross_entropy import cross_entropy_reference
from minitune.kernels.layer_norm import layer_norm_reference
from minitune.kernels.nf4 import nf4_dequantize_reference
from minitune.kernels.rms_norm import rms_norm_reference
from minitune.kernels.rope import rope_reference
from minitune.kernels.swiglu import swiglu_reference

try:
    from liger_kernel.transformers import functional as liger
except ImportError:  # optional: the GPU machine gets it from benchmarks/vendor (see gpu_run.sh)
    liger = None

TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

EPS = 1e-5
KERNELS = ("rms_norm", "layer_norm", "cross_entropy", "fused_linear_cross_entropy", "nf4_dequantize", "rope", "swiglu")
ROPE_HEADS, ROPE_KV_HEADS, ROPE_HEAD_DIM = 32, 8, 128  # Mistral-7B's attention
COPY_BYTES = 1 << 30

# Mistral-7B's linear layers (hidden 4096, intermediate 14336, 8 kv heads x 128), M x N = out x in features
NF4_LAYERS = {(4096, 4096): ("q_proj", "o_proj"), (1024, 4096): ("k_proj", "v_proj"),
              (14336, 4096): ("gate_proj", "up_proj"), (4096, 14336): ("down_proj",)}
NF4_SIZES = [{"M": m, "N": n} for m, n in NF4_LAYERS]
NF4_MODEL_LAYERS = 32  # Mistral-7B's decoder blocks: one dequantization pass over the model is 32 x 7 layers
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE = 64, 256  # QLoRA's (bitsandbytes' defaults with double quantization)

# Default sizes: the GPU set holds every goal point and fits gpu_run.sh's time budget.
GPU_SIZES = {
    "rms_norm": [{"M": 16384, "N": 4096}, {"M": 32768, "N": 8192}],
    "layer_norm": [{"M": 16384, "N": 4096}],
    "cross_entropy": [{"M": 8192, "V": 32000}, {"M": 8192, "V": 128256}],
    "fused_linear_cross_entropy": [{"M": 8192, "H": 4096, "V": 32000}, {"M": 16384, "H": 4096, "V": 32000},
                                   {"M": 32768, "H": 4096, "V": 32000}],
    "nf4_dequantize": NF4_SIZES,
    "rope": [{"B": 2, "T": 4096}, {"B": 8, "T": 2048}],
    "swiglu": [{"M": 8192, "N": 14336}, {"M": 16384, "N": 14336}],  # tokens x Mistral-7B's MLP width
}
NORM_GRID = [{"M": m, "N": n} for m in (4096, 16384, 32768) for n in (1024, 2048, 4096, 8192)]
GPU_SIZES_ALL = {  # --all-sizes: the whole grid (a few minutes more, mostly torch.compile)
    "rms_norm": NORM_GRID,
    "layer_norm": NORM_GRID,
    "cross_entropy": [{"M": m, "V": v} for m in (4096, 8192, 16384, 32768) for v in (32000, 50257, 128256)],
    "fused_linear_cross_entropy": [{"M": m, "H": 4096, "V": v} for m in (4096, 8192, 16384)
                                   for v in (32000, 50257, 128256)],
    "nf4_dequantize": NF4_SIZES,
    "rope": [{"B": 2, "T": 4096}, {"B": 8, "T": 2048}],
    "swiglu": [{"M": 8192, "N": 14336}, {"M": 16384, "N": 14336}],
}
CPU_SIZES = {
    "rms_norm": [{"M": 4096, "N": 1024}, {"M": 4096, "N": 4096}],
    "layer_norm": [{"M": 4096, "N": 1024}, {"M": 4096, "N": 4096}],
    "cross_entropy": [{"M": 2048, "V": 32000}, {"M": 2048, "V": 50257}],
    "fused_linear_cross_entropy": [{"M": 1024, "H": 256, "V": 32000}],
    "nf4_dequantize": NF4_SIZES[:2],  # q/o and k/v; the reference's int64 temporaries make the big ones slow here
    "rope": [{"B": 1, "T": 1024}],
    "swiglu": [{"M": 1024, "N": 14336}],
}

# The goals (from the issue). GPU ones at these sizes in the run's dtype (bf16 by default).
GOAL_RMS = ("rms_norm", {"M": 16384, "N": 4096})
GOAL_CE = ("cross_entropy", {"M": 8192, "V": 32000})
GOAL_ROPE = ("rope", {"B": 2, "T": 4096})
GOAL_SWIGLU = ("swiglu", {"M": 8192, "N": 14336})
# the fused linear CE's memory goal is checked at two batch sizes: its float32 dweight (V x H) is a fixed
# cost, so its ratio to the eager path's peak (which grows with M x V) depends on M / H
GOAL_FLCE = [("fused_linear_cross_entropy", {"M": m, "H": 4096, "V": 32000}) for m in (8192, 16384, 32768)]
GOAL_BANDWIDTH_FRACTION = 0.80
GOAL_FLCE_GPU_PEAK_RATIO = 1 / 4
CPU_MEMORY_SIZE = {"M": 8192, "H": 256, "V": 32000}  # float32, peak RSS in fresh processes
CPU_MEMORY_VARIANTS = ("minitune", "eager")
GOAL_FLCE_CPU_PEAK_RATIO = 1 / 10

SWEEP_M = 8192
SWEEP_VOCABS = (32000, 128256)
SWEEP_BLOCKS = (4096, 8192, 16384, 32768)
SWEEP_WARPS = (8, 16, 32)
SWEEP_NORM_SIZE = {"M": 16384, "N": 4096}
SWEEP_PROGRAMS_PER_SM = (1, 2, 4, 8)  # the norm backward's loop-over-rows programs
SWEEP_NF4_WARPS = (2, 4, 8, 16)  # each thread one 16-byte store: 512 to 4096 bf16 values a program

CPU_WARMUP_S, CPU_TIME_BUDGET_S, CPU_MIN_REPS, CPU_MAX_REPS = 0.5, 1.0, 2, 20


# ---------------------------------------------------------------- what is timed

@dataclass
class Case:
    """One kernel at one size: the forward's inputs, the leaves that get gradients, the upstream gradient."""
    kernel: str
    size: dict
    args: tuple
    leaves: list
    grad_out: torch.Tensor | None = None  # None: the output is a scalar loss
    bytes_moved: int | None = None
    forward_only: bool = False  # nf4_dequantize: a frozen weight has no backward
    extra: dict = field(default_factory=dict)  # nf4_dequantize: bitsandbytes' state, the copy's tensors, checks


@dataclass
class Variant:
    name: str
    fn: Callable
    overwrites_input: bool = False  # Liger's cross-entropy, RoPE and SwiGLU write into their inputs
    bytes_moved: int | None = None  # this variant's own bytes, where they are not the case's (the copy)


def size_label(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def make_case(kernel: str, size: dict, dtype: torch.dtype, device: torch.device) -> Case:
    torch.manual_seed(0)
    b = torch.empty((), dtype=dtype).element_size()

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, device=device) * scale + offset).to(dtype).requires_grad_()

    if kernel in ("rms_norm", "layer_norm"):
        M, N = size["M"], size["N"]
        x, w = leaf(M, N), leaf(N, scale=0.1, offset=1.0)
        leaves = [x, w] + ([leaf(N, scale=0.1)] if kernel == "layer_norm" else [])
        return Case(kernel, size, tuple(leaves), leaves, torch.randn(M, N, device=device).to(dtype), 5 * M * N * b)
    if kernel == "cross_entropy":
        M, V = size["M"], size["V"]
        logits = leaf(M, V, scale=2.0)
        targets = torch.randint(0, V, (M,), device=device)
        return Case(kernel, size, (logits, targets), [logits], None, 2 * M * V * b)
    if kernel == "nf4_dequantize":
        return nf4_case(size, dtype, device)
    if kernel == "rope":  # q and k as the decoder makes them: (B, heads, T, hs) views of (B, T, heads, hs)
        B, T, nh, n_kv, hs = size["B"], size["T"], ROPE_HEADS, ROPE_KV_HEADS, ROPE_HEAD_DIM
        q, k = leaf(B, T, nh, hs), leaf(B, T, n_kv, hs)
        angles = torch.arange(T, device=device)[:, None] / 10000 ** (torch.arange(0, hs, 2, device=device) / hs)
        angles = torch.cat((angles, angles), dim=-1).expand(B, T, hs)  # a row per token, as a padded batch has
        cos, sin = angles.cos().to(dtype).contiguous(), angles.sin().to(dtype).contiguous()
        grads = (torch.randn(B, T, nh, hs, device=device).to(dtype).transpose(1, 2),
                 torch.randn(B, T, n_kv, hs, device=device).to(dtype).transpose(1, 2))
        return Case(kernel, size, (q.transpose(1, 2), k.transpose(1, 2), cos, sin), [q, k], grads,
                    2 * (2 * (nh + n_kv) * hs + 2 * hs) * B * T * b)
    if kernel == "swiglu":
        M, N = size["M"], size["N"]
        gate, up = leaf(M, N, scale=2.0), leaf(M, N)
        return Case(kernel, size, (gate, up), [gate, up], torch.randn(M, N, device=device).to(dtype), 8 * M * N * b)
    M, H, V = size["M"], size["H"], size["V"]
    hidden, weight = leaf(M, H), leaf(V, H, scale=H ** -0.5)
    targets = torch.randint(0, V, (M,), device=device)
    return Case(kernel, size, (hidden, weight, targets), [hidden, weight])


def rms_norm_eager(x, w):
    return rms_norm_reference(x, w, EPS)


def layer_norm_eager(x, w, b):
    return layer_norm_reference(x, w, b, EPS)


def linear_cross_entropy_eager(hidden, weight, targets):
    """The path the fused kernel replaces: the full [tokens, vocab] logits, then torch's cross-entropy."""
    return F.cross_entropy(hidden @ weight.T, targets)


def rope_eager(q, k, cos, sin):
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


def torch_linear_cross_entropy(hidden, weight, targets):
    return F.linear_cross_entropy(hidden, weight, targets, options=torch.nn.LinearCrossEntropyOptions())


MINITUNE = {
    "rms_norm": lambda x, w: kernels.rms_norm(x, w, EPS),
    "layer_norm": lambda x, w, b: kernels.layer_norm(x, w, b, EPS),
    "cross_entropy": kernels.cross_entropy,
    "fused_linear_cross_entropy": kernels.fused_linear_cross_entropy,
    "rope": kernels.rope,
    "swiglu": kernels.swiglu,
}
EAGER = {
    "rms_norm": rms_norm_eager,
    "layer_norm": layer_norm_eager,
    "cross_entropy": cross_entropy_reference,
    "fused_linear_cross_entropy": linear_cross_entropy_eager,
    "rope": rope_eager,
    "swiglu": swiglu_reference,
}


def liger_variant(kernel: str) -> Variant | None:
    if liger is None:
        return None
    return {
        "rms_norm": Variant("liger", lambda x, w: liger.liger_rms_norm(x, w, EPS, casting_mode="llama",
                                                                       in_place=False)),
        "layer_norm": Variant("liger", lambda x, w, b: liger.liger_layer_norm(x, w, b, EPS)),
        "cross_entropy": Variant("liger", liger.liger_cross_entropy, overwrites_input=True),
        "fused_linear_cross_entropy": Variant("liger", liger.liger_fused_linear_cross_entropy),
        # both turn q and k (and dq, dk) in place, and SwiGLU's backward writes into gate and up
        "rope": Variant("liger", liger.liger_rope, overwrites_input=True),
        "swiglu": Variant("liger", liger.liger_swiglu, overwrites_input=True),
    }[kernel]


# ---------------------------------------------------------------- NF4 dequantization (forward only)

@functools.cache
def bitsandbytes_functional():
    """bitsandbytes.functional, or None where bitsandbytes is not installed (imported once, when first needed:
    the import takes seconds)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:  # optional: the GPU machine gets it from benchmarks/vendor (see gpu_run.sh)
        return None
    return bnb_functional


def nf4_case(size: dict, dtype: torch.dtype, device: torch.device) -> Case:
    """A random M x N weight in `dtype`, quantized once (bitsandbytes' quantize_4bit where installed, else
    minitune's quantize_nf4: the same bytes); args are nf4_dequantize's. Also an output-sized source and
    destination for the copy variant, and whether quantize_nf4 gives bitsandbytes' bytes."""
    from minitune.quant import quantize_nf4
    M, N = size["M"], size["N"]
    n, b = M * N, torch.empty((), dtype=dtype).element_size()
    torch.manual_seed(0)
    weight = torch.randn(M, N, device=device).to(dtype)
    ours = quantize_nf4(weight, NF4_BLOCKSIZE, double_quant=True)
    extra = {}
    bnb_functional = bitsandbytes_functional()
    if bnb_functional is not None:
        codes, state = bnb_functional.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                                    quant_type="nf4")
        extra.update(quant_state=state, quantize_nf4=quantize_comparison(ours, codes, state))
        args = (codes, state.absmax, state.code, n, NF4_BLOCKSIZE, dtype, state.state2.absmax, state.state2.code,
                state.offset, NF4_NESTED_BLOCKSIZE)
    else:
        args = (ours.codes, ours.absmax, ours.quant_map, n, NF4_BLOCKSIZE, dtype, ours.nested_absmax,
                ours.nested_quant_map, ours.offset, NF4_NESTED_BLOCKSIZE)
    del weight, ours
    extra["copy"] = (torch.ones(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device))
    blocks = n // NF4_BLOCKSIZE  # every size here is a whole number of blocks
    bytes_moved = n // 2 + blocks + 4 * -(-blocks // NF4_NESTED_BLOCKSIZE) + n * b  # read codes and state, write
    return Case("nf4_dequantize", size, args, [], None, bytes_moved, forward_only=True, extra=extra)


def quantize_comparison(ours, codes: torch.Tensor, state) -> dict:
    """quantize_nf4's result against bitsandbytes' quantize_4bit's for the same weight, part by part."""
    differ = int((ours.absmax.reshape(-1) != state.absmax.reshape(-1)).sum())
    return {"codes_equal": torch.equal(ours.codes.reshape(-1), codes.reshape(-1)),
            "absmax_codes_differ": differ, "absmax_blocks": state.absmax.numel(),
            "nested_absmax_equal": torch.equal(ours.nested_absmax.reshape(-1), state.state2.absmax.reshape(-1)),
            "offset_equal": torch.equal(ours.offset.reshape(()).float(), state.offset.reshape(()).float())}


def nf4_variants(case: Case, device: torch.device, use_compile: bool) -> list[Variant]:
    out = [Variant("minitune", kernels.nf4_dequantize), Variant("eager", nf4_dequantize_reference)]
    if device.type == "cuda" and use_compile:
        torch._dynamo.reset()
        out.append(Variant("compile", torch.compile(nf4_dequantize_reference, dynamic=False)))
    if (state := case.extra.get("quant_state")) is not None:
        bnb_functional = bitsandbytes_functional()
        out.append(Variant("bitsandbytes", lambda codes, *_: bnb_functional.dequantize_4bit(codes, state)))
    src, dst = case.extra["copy"]
    out.append(Variant("copy", lambda *_: dst.copy_(src), bytes_moved=2 * src.numel() * src.element_size()))
    return out


def nf4_checks(case: Case, rows: list[dict], vs: list[Variant]) -> None:
    """Each dequantizing variant's output against bitsandbytes' (exact), or, without bitsandbytes, against the
    PyTorch reference's; recorded in the rows. quantize_nf4's comparison goes into minitune's row."""
    by_name = {v.name: v for v in vs}
    oracle = "bitsandbytes" if "bitsandbytes" in by_name else "eager"
    try:
        expected = by_name[oracle].fn(*case.args).reshape(-1)
    except Exception as e:  # noqa: BLE001  recorded; the timing rows stand
        rows[0]["checks_error"] = error_text(e)
        return
    for v, r in zip(vs, rows, strict=True):
        if v.name in ("copy", oracle) or "error" in r:
            continue
        try:
            got = v.fn(*case.args).reshape(-1)
            r[f"equals_{oracle}"] = eq = bool(got.dtype == expected.dtype and torch.equal(got, expected))
            if not eq and got.shape == expected.shape:
                r["values_differ"] = int((got.float() != expected.float()).sum())
            del got
        except Exception as e:  # noqa: BLE001
            r["checks_error"] = error_text(e)
    if "quantize_nf4" in case.extra:
        rows[0]["quantize_nf4"] = case.extra["quantize_nf4"]


def nf4_note(r: dict) -> list[str]:
    """The note-column text of an NF4 row: its exactness check and, for minitune, quantize_nf4's."""
    out = []
    for oracle, name in (("bitsandbytes", "bitsandbytes' dequantize_4bit"), ("eager", "the reference")):
        if f"equals_{oracle}" in r:
            out.append(f"= {name}, exactly" if r[f"equals_{oracle}"] else
                       f"**differs** from {name} ({r.get('values_differ', '?')} values)")
    if q := r.get("quantize_nf4"):
        same = q["codes_equal"] and q["nested_absmax_equal"] and q["offset_equal"]
        out.append("quantize_nf4 = bitsandbytes' quantize_4bit" + (
            "" if same and not q["absmax_codes_differ"] else
            f": codes {'equal' if q['codes_equal'] else 'DIFFER'}, 8-bit block maxima differ in "
            f"{q['absmax_codes_differ']} of {q['absmax_blocks']}, scales "
            f"{'equal' if q['nested_absmax_equal'] else 'DIFFER'}, offset {'equal' if q['offset_equal'] else 'DIFFERS'}"))
    if "checks_error" in r:
        out.append(f"check failed: {r['checks_error']}")
    return out


def variants(kernel: str, device: torch.device, use_compile: bool, case: Case | None = None) -> list[Variant]:
    if kernel == "nf4_dequantize":
        return nf4_variants(case, device, use_compile)
    out = [Variant("minitune", MINITUNE[kernel]), Variant("eager", EAGER[kernel])]
    if device.type == "cuda":
        if use_compile:
            torch._dynamo.reset()  # a fresh, static compile for each size
            out.append(Variant("compile", torch.compile(EAGER[kernel], dynamic=False)))
        if (lv := liger_variant(kernel)) is not None:
            out.append(lv)
    if kernel == "fused_linear_cross_entropy" and TORCH_LCE:
        out.append(Variant("torch_lce", torch_linear_cross_entropy))
    return out


class Step:
    """One forward + backward of `fn` on the case's inputs; keeps the last scalar loss (a tensor: no sync)."""

    def __init__(self, fn: Callable, case: Case):
        self.fn, self.case, self.value = fn, case, None

    def __call__(self) -> None:
        out = self.fn(*self.case.args)
        if self.case.forward_only:
            return
        if isinstance(out, tuple):  # rope: q and k
            torch.autograd.backward(out, self.case.grad_out)
            return
        out.backward(self.case.grad_out)
        self.value = out.detach() if out.numel() == 1 else None


class RestoreInput:
    """A grad_to_none entry: do_bench sets `.grad = None` on each entry before every timed call, outside
    the timed region; setting it here copies the saved input back (Liger overwrote it)."""

    def __init__(self, target: torch.Tensor):
        self.target, self.saved = target, target.detach().clone()

    @property
    def grad(self):
        return None

    @grad.setter
    def grad(self, _):
        with torch.no_grad():
            self.target.copy_(self.saved)


def clear(resets: list) -> None:
    for r in resets:
        r.grad = None


# ---------------------------------------------------------------- timing and memory

def time_ms(fn: Callable, resets: list, device: torch.device) -> float:
    """Median milliseconds of fn(), each call after `clear(resets)`, which is not timed."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, grad_to_none=resets, return_mode="median")

    def once() -> float:
        clear(resets)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    warm_until = time.perf_counter() + CPU_WARMUP_S  # the first few calls of a process run slower
    last = once()
    while time.perf_counter() < warm_until:
        last = once()
    reps = min(CPU_MAX_REPS, max(CPU_MIN_REPS, int(CPU_TIME_BUDGET_S / last)))
    return 1e3 * statistics.median(once() for _ in range(reps))


def kernel_ms(fn: Callable, resets: list, calls: int = 5) -> float:
    """GPU time of the kernels one call launches: the sum of their durations from torch.profiler, the
    median over `calls` calls. Unlike do_bench's time, it leaves out the gaps in which the GPU waits
    for the CPU (Python, autograd, launches), which dominate small sizes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    totals = []
    for _ in range(calls):
        clear(resets)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        totals.append(sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA))
    return statistics.median(totals) / 1e3


def cuda_peak_bytes(fn: Callable, resets: list) -> int:
    """Peak bytes allocated during one call, above what was allocated before it (the inputs)."""
    clear(resets)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps(device: torch.device, dtype: torch.dtype) -> float:
    """dst.copy_(src) of a 1 GiB tensor: 2 * bytes / time."""
    src = torch.ones(COPY_BYTES // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [], device)
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def measure(case: Case, variant: Variant, device: torch.device) -> dict:
    row = {"kernel": case.kernel, "size": case.size, "variant": variant.name,
           "backend": kernels.backend(case.args[0]) if variant.name == "minitune" else None}
    resets = list(case.leaves)
    step = Step(variant.fn, case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if variant.overwrites_input:
                resets += [RestoreInput(t) for t in case.leaves]
            row["ms"] = time_ms(step, resets, device)
            if device.type == "cuda":
                row["peak_bytes"] = cuda_peak_bytes(step, resets)
                try:
                    row["kernel_ms"] = kernel_ms(step, resets)
                except Exception as e:  # noqa: BLE001  the profiler is informative, not essential
                    row["profiler_error"] = error_text(e)
            if step.value is not None:
                row["loss"] = float(step.value)
        except Exception as e:  # noqa: BLE001  one failure (an OOM, a missing kernel) must not lose the rest
            row["error"] = error_text(e)
    row["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    clear(resets)  # also puts back an input the variant overwrote, for the variants after it
    del resets, step
    free_memory(device)
    return row


def bench_case(kernel: str, size: dict, dtype: torch.dtype, device: torch.device, use_compile: bool,
               copy_gbps: float) -> list[dict]:
    try:
        case = make_case(kernel, size, dtype, device)
    except Exception as e:  # noqa: BLE001  (an OOM for the inputs: recorded as the case's row)
        free_memory(device)
        return [{"kernel": kernel, "size": size, "variant": "inputs", "error": error_text(e), "warnings": []}]
    rows = []
    vs = variants(kernel, device, use_compile, case)
    for v in vs:
        rows.append(measure(case, v, device))
        r = rows[-1]
        print(f"  {kernel:27s} {size_label(size):22s} {v.name:12s} "
              + (f"{r['ms']:9.3f} ms" if "ms" in r else r["error"]), flush=True)
    ours = rows[0].get("ms")
    for v, r in zip(vs, rows, strict=True):
        moved = v.bytes_moved or case.bytes_moved
        if "ms" in r and moved:
            r["gbps"] = moved / (r["ms"] * 1e-3) / 1e9
            r["of_copy"] = r["gbps"] / copy_gbps
        if r.get("kernel_ms") and moved:
            r["kernel_of_copy"] = moved / (r["kernel_ms"] * 1e-3) / 1e9 / copy_gbps
        if "ms" in r and ours:
            r["minitune_speedup"] = r["ms"] / ours
    if kernel == "nf4_dequantize":
        nf4_checks(case, rows, vs)
        for r in rows:
            if notes := nf4_note(r):
                print(f"  {'':27s} {size_label(size):22s} {r['variant']:12s} " + "; ".join(notes), flush=True)
    del case, vs
    free_memory(device)
    return rows


# ---------------------------------------------------------------- the cross-entropy constants sweep (GPU)

def sweep_row(row: dict, step: Step, case: Case, device: torch.device, copy_gbps: float) -> dict:
    """One sweep point: do_bench's time, its bandwidth, the kernels' own time; an error is recorded."""
    try:
        row["ms"] = time_ms(step, case.leaves, device)
        row["gbps"] = case.bytes_moved / (row["ms"] * 1e-3) / 1e9
        row["of_copy"] = row["gbps"] / copy_gbps
        row["kernel_ms"] = kernel_ms(step, case.leaves)
    except Exception as e:  # noqa: BLE001  recorded in the table
        row["error"] = error_text(e)
    return row


def sweep_constants(module_name: str, cases: list[tuple[str, dict]], fn: Callable, settings: list[dict],
                    dtype: torch.dtype, device: torch.device, copy_gbps: float) -> list[dict]:
    """Each (kernel, size) case timed through `fn` at each setting of the module's constants (restored after)."""
    module = importlib.import_module(module_name)
    saved = {name: getattr(module, name) for name in settings[0]}
    rows = []
    try:
        for kernel, size in cases:
            case = make_case(kernel, size, dtype, device)
            step = Step(fn, case)
            for setting in settings:
                for name, value in setting.items():
                    setattr(module, name, value)
                rows.append(row := sweep_row({**size, **setting}, step, case, device, copy_gbps))
                print(f"  sweep {kernel} {size_label(size)} {size_label(setting)} "
                      + (f"{row['ms']:.4f} ms" if "ms" in row else row["error"]), flush=True)
            del case, step
            free_memory(device)
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    return rows


def sweep(dtype: torch.dtype, device: torch.device, copy_gbps: float) -> list[dict]:
    """cross_entropy forward + backward over MAX_BLOCK_V x NUM_WARPS."""
    cases = [("cross_entropy", {"M": SWEEP_M, "V": V}) for V in SWEEP_VOCABS]
    settings = [{"MAX_BLOCK_V": block, "NUM_WARPS": warps} for block in SWEEP_BLOCKS for warps in SWEEP_WARPS]
    return sweep_constants("minitune.kernels.cross_entropy", cases, kernels.cross_entropy, settings, dtype, device,
                           copy_gbps)


def sweep_norm_programs(dtype: torch.dtype, device: torch.device, copy_gbps: float) -> list[dict]:
    """rms_norm forward + backward over the backward's programs per SM."""
    settings = [{"PROGRAMS_PER_SM": per_sm} for per_sm in SWEEP_PROGRAMS_PER_SM]
    return sweep_constants("minitune.kernels._common", [("rms_norm", SWEEP_NORM_SIZE)], MINITUNE["rms_norm"],
                           settings, dtype, device, copy_gbps)


def sweep_nf4_warps(dtype: torch.dtype, device: torch.device, copy_gbps: float) -> list[dict]:
    """nf4_dequantize at each layer shape over NUM_WARPS."""
    settings = [{"NUM_WARPS": warps} for warps in SWEEP_NF4_WARPS]
    return sweep_constants("minitune.kernels.nf4", [("nf4_dequantize", size) for size in NF4_SIZES],
                           kernels.nf4_dequantize, settings, dtype, device, copy_gbps)


# ---------------------------------------------------------------- the CPU memory goal, one process per variant

def child_cpu_memory(variant: str) -> dict:
    """Peak RSS increase of one fused-linear-CE forward + backward at CPU_MEMORY_SIZE in float32."""
    device = torch.device("cpu")
    case = make_case("fused_linear_cross_entropy", CPU_MEMORY_SIZE, torch.float32, device)
    fn = {"minitune": MINITUNE, "eager": EAGER}[variant]["fused_linear_cross_entropy"]
    step = Step(fn, case)
    gc.collect()
    base = proc_status()["VmRSS"]
    peak_reset = reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    import resource
    peak = proc_status()["VmHWM"] if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    backend = kernels.backend(case.args[0]) if variant == "minitune" else None
    return {"variant": variant, "size": CPU_MEMORY_SIZE, "dtype": "float32", "backend": backend,
            "peak_increase_bytes": peak - base, "baseline_rss_bytes": base, "seconds": seconds,
            "loss": float(step.value), "peak_source": "VmHWM after clear_refs" if peak_reset else "ru_maxrss"}


def cpu_memory_goal(timeout: float) -> list[dict]:
    rows = []
    for variant in CPU_MEMORY_VARIANTS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-cpu-memory", variant]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(), timeout=timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
            rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"  cpu memory {variant:9s} peak +{rows[-1]['peak_increase_bytes'] / 1e6:8.1f} MB "
                  f"({rows[-1]['seconds']:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001  recorded in the table
            rows.append({"variant": variant, "size": CPU_MEMORY_SIZE, "error": error_text(e)})
            print(f"  cpu memory {variant}: {rows[-1]['error']}", flush=True)
    return rows


# ---------------------------------------------------------------- goals

def find(rows: list[dict], kernel: str, size: dict, variant: str) -> dict | None:
    return next((r for r in rows if r["kernel"] == kernel and r["size"] == size and r["variant"] == variant
                 and "error" not in r), None)


def goal(text: str, met: bool | None, detail: str) -> dict:
    return {"goal": text, "met": met, "detail": detail}


def bandwidth_goals(rows: list[dict], kernel: str, size: dict, name: str) -> list[dict]:
    ours, theirs = find(rows, kernel, size, "minitune"), find(rows, kernel, size, "liger")
    where = f"{name} forward + backward at {size_label(size)}"
    kernels_only = "" if ours is None or ours.get("kernel_of_copy") is None else \
        f" (the GPU kernels alone: {ours['kernel_of_copy']:.1%})"
    out = [goal(f"{where}: at least {GOAL_BANDWIDTH_FRACTION:.0%} of the copy bandwidth",
                None if ours is None else ours["of_copy"] >= GOAL_BANDWIDTH_FRACTION,
                "not measured" if ours is None else
                f"{ours['gbps']:.0f} GB/s = {ours['of_copy']:.1%} of the copy bandwidth{kernels_only}")]
    if ours is None or theirs is None:
        out.append(goal(f"{where}: at least as fast as Liger", None,
                        "Liger Kernel not installed" if liger is None else "not measured"))
    else:
        out.append(goal(f"{where}: at least as fast as Liger", ours["ms"] <= theirs["ms"],
                        f"minitune {ours['ms']:.3f} ms, Liger {theirs['ms']:.3f} ms"))
    return out


def gpu_goals(rows: list[dict], chosen: tuple | list = KERNELS) -> list[dict]:
    """The GPU goals of the kernels this run measured."""
    out = []
    if "rms_norm" in chosen:
        out += bandwidth_goals(rows, *GOAL_RMS, "RMSNorm")
    if "cross_entropy" in chosen:
        out += bandwidth_goals(rows, *GOAL_CE, "cross-entropy")
    if "fused_linear_cross_entropy" in chosen:
        for kernel, size in GOAL_FLCE:
            out += flce_goals(rows, kernel, size)
    if "nf4_dequantize" in chosen:
        out += nf4_goals(rows, on_gpu=True)
    for (kernel, size), name in ((GOAL_ROPE, "RoPE"), (GOAL_SWIGLU, "SwiGLU")):
        if kernel in chosen:
            out += bandwidth_goals(rows, kernel, size, name) + compile_goal(rows, kernel, size, name)
    return out


def compile_goal(rows: list[dict], kernel: str, size: dict, name: str) -> list[dict]:
    ours, theirs = find(rows, kernel, size, "minitune"), find(rows, kernel, size, "compile")
    where = f"{name} forward + backward at {size_label(size)}: faster than torch.compile of the reference"
    if ours is None or theirs is None:
        return [goal(where, None, "not measured")]
    return [goal(where, ours["ms"] < theirs["ms"], f"minitune {ours['ms']:.3f} ms, torch.compile {theirs['ms']:.3f} ms")]


def nf4_goals(rows: list[dict], on_gpu: bool) -> list[dict]:
    """At every Mistral-7B layer shape measured: minitune's output equal to bitsandbytes' dequantize_4bit's; on a
    GPU also at least 80% of the copy bandwidth, no slower than bitsandbytes, and faster than the PyTorch reference
    (else the kernel has no reason to exist)."""
    sizes = [r["size"] for r in rows if r["kernel"] == "nf4_dequantize" and r["variant"] == "minitune"]
    where = "NF4 dequantization at Mistral-7B's layer shapes"
    ours = {size_label(s): find(rows, "nf4_dequantize", s, "minitune") for s in sizes}
    if not sizes or any(r is None for r in ours.values()):
        return [goal(f"{where}: measured", None, "not measured" if not sizes else
                     "failed at " + ", ".join(k for k, r in ours.items() if r is None))]
    bnb = {k: find(rows, "nf4_dequantize", s, "bitsandbytes") for k, s in zip(ours, sizes, strict=True)}
    eager = {k: find(rows, "nf4_dequantize", s, "eager") for k, s in zip(ours, sizes, strict=True)}
    checked = {k: r.get("equals_bitsandbytes") for k, r in ours.items()}
    out = [goal(f"{where}: output equal to bitsandbytes' dequantize_4bit, bit for bit",
                None if None in checked.values() else all(checked.values()),
                "bitsandbytes not installed or its dequantization failed" if None in checked.values() else
                ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in checked.items()))]
    if not on_gpu:
        return out
    out.append(goal(f"{where}: at least 80% of the copy bandwidth", all(r["of_copy"] >= 0.8 for r in ours.values()),
                    ", ".join(f"{k} {r['of_copy']:.0%}" for k, r in ours.items())))
    if any(r is None for r in bnb.values()):
        out.append(goal(f"{where}: at least as fast as bitsandbytes' dequantize_4bit", None,
                        "bitsandbytes not installed" if bitsandbytes_functional() is None else "not measured"))
    else:
        out.append(goal(f"{where}: at least as fast as bitsandbytes' dequantize_4bit",
                        all(ours[k]["ms"] <= bnb[k]["ms"] for k in ours),
                        "; ".join(f"{k}: minitune {ours[k]['ms']:.3f} ms ({ours[k]['of_copy']:.0%} of the copy "
                                  f"bandwidth), bitsandbytes {bnb[k]['ms']:.3f} ms" for k in ours)))
    if any(r is None for r in eager.values()):
        out.append(goal(f"{where}: faster than the PyTorch reference", None, "not measured"))
    else:
        out.append(goal(f"{where}: faster than the PyTorch reference", all(ours[k]["ms"] < eager[k]["ms"] for k in ours),
                        "; ".join(f"{k}: {eager[k]['ms'] / ours[k]['ms']:.1f}x" for k in ours)))
    return out


def flce_goals(rows: list[dict], kernel: str, size: dict) -> list[dict]:
    out = []
    ours, eager, tl = (find(rows, kernel, size, v) for v in ("minitune", "eager", "torch_lce"))
    where = f"fused linear CE at {size_label(size)}"
    if ours is None or eager is None:
        out.append(goal(f"{where}: peak memory at most 1/4 of the eager path's", None, "not measured"))
    else:
        ratio = ours["peak_bytes"] / eager["peak_bytes"]
        out.append(goal(f"{where}: peak memory at most 1/4 of the eager path's", ratio <= GOAL_FLCE_GPU_PEAK_RATIO,
                        f"minitune {ours['peak_bytes'] / 1e6:.0f} MB, F.cross_entropy(hidden @ weight.T) "
                        f"{eager['peak_bytes'] / 1e6:.0f} MB: {ratio:.3f}x"))
    if ours is None or tl is None:
        out.append(goal(f"{where}: no slower than torch's linear_cross_entropy", None,
                        "torch.nn.functional.linear_cross_entropy not in this torch" if not TORCH_LCE
                        else "not measured"))
    else:
        out.append(goal(f"{where}: no slower than torch's linear_cross_entropy", ours["ms"] <= tl["ms"],
                        f"minitune {ours['ms']:.2f} ms, torch {tl['ms']:.2f} ms"))
    return out


def cpu_goals(memory: list[dict], rows: list[dict] | None = None, chosen: tuple | list = KERNELS) -> list[dict]:
    """The CPU goals of the kernels this run measured: the fused linear CE's memory, NF4's exactness."""
    out = flce_cpu_goal(memory) if "fused_linear_cross_entropy" in chosen else []
    return out + (nf4_goals(rows or [], on_gpu=False) if "nf4_dequantize" in chosen else [])


def flce_cpu_goal(memory: list[dict]) -> list[dict]:
    by = {r["variant"]: r for r in memory if "error" not in r}
    text = (f"CPU fused linear CE at {size_label(CPU_MEMORY_SIZE)} float32: peak at most 1/10 of "
            "F.cross_entropy(hidden @ weight.T, targets)'s")
    if "minitune" not in by or "eager" not in by:
        return [goal(text, None, "not measured")]
    ours, eager = by["minitune"]["peak_increase_bytes"], by["eager"]["peak_increase_bytes"]
    return [goal(text, ours <= GOAL_FLCE_CPU_PEAK_RATIO * eager,
                 f"peak RSS increase: minitune {ours / 1e6:.0f} MB, eager {eager / 1e6:.0f} MB: {ours / eager:.3f}x")]


# ---------------------------------------------------------------- report

def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device, dtype: torch.dtype | None) -> dict:
    """The machine and packages a result came from (also used by bench_train.py)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()} ({len(os.sched_getaffinity(0))} cores usable)"
    return {"device": name, "device_type": device.type, "dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "transformers": version("transformers"), "liger_kernel": version("liger_kernel"),
            "peft": version("peft"), "bitsandbytes": version("bitsandbytes"),
            "python": platform.python_version(), "MINITUNE_KERNELS": os.environ.get("MINITUNE_KERNELS", "auto")}


def environment_line(env: dict) -> str:
    return (f"Device: **{env['device']}**; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
            f"transformers {env['transformers']}, liger-kernel {env['liger_kernel']}, peft {env.get('peft', '?')}, "
            f"bitsandbytes {env.get('bitsandbytes', '?')}; Python {env['python']}; "
            f"dtype **{env['dtype']}**; MINITUNE_KERNELS={env['MINITUNE_KERNELS']}.")


def cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if r.get(key) is not None else "—"


def goal_lines(goals: list[dict]) -> list[str]:
    verdict = {True: "**met**", False: "**NOT met**", None: "n/a"}
    return [f"- {g['goal']}: {g['detail']} -> {verdict[g['met']]}" for g in goals]


def markdown(result: dict) -> str:
    how = (f"Copy bandwidth (dst.copy_(src), 1 GiB): **{result['copy_gbps']:.0f} GB/s**. One call = forward + "
           "backward (nf4_dequantize: forward only, M x N = a weight's out x in features, output in "
           f"{result.get('nf4_dtype', 'bfloat16')}). ms: median; GB/s from the minimum bytes moved (norms 5·M·N·b, "
           "cross-entropy 2·M·V·b, NF4 n/2 + n/64 + 4·n/16384 + n·b for n = M·N; its copy variant 2·n·b); "
           "speed-up: the variant's time / minitune's; peak: memory allocated above the inputs (GPU).")
    lines = ["# Kernels: minitune against PyTorch eager, torch.compile, Liger Kernel, torch's linear_cross_entropy "
             "and bitsandbytes",
             "", environment_line(result["environment"]), "", how, "",
             "| kernel | size | variant | backend | ms | GB/s | % of copy | minitune speed-up | peak MB "
             "| GPU kernels ms | kernels % of copy | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        note = r.get("error") or "; ".join(r.get("warnings", []) + ([f"profiler: {r['profiler_error']}"]
                                                                     if "profiler_error" in r else []) + nf4_note(r))
        peak = f"{r['peak_bytes'] / 1e6:.0f}" if r.get("peak_bytes") is not None else "—"
        pct = f"{100 * r['of_copy']:.1f}%" if r.get("of_copy") is not None else "—"
        speedup = f"{r['minitune_speedup']:.2f}x" if r.get("minitune_speedup") is not None else "—"
        kpct = f"{100 * r['kernel_of_copy']:.1f}%" if r.get("kernel_of_copy") is not None else "—"
        lines.append(f"| {r['kernel']} | {size_label(r['size'])} | {r['variant']} | {r.get('backend') or '—'} | "
                     f"{cell(r, 'ms', '.3f')} | {cell(r, 'gbps', '.1f')} | {pct} | {speedup} | {peak} | "
                     f"{cell(r, 'kernel_ms', '.3f')} | {kpct} | {note} |")
    lines += nf4_markdown(result["rows"])
    if result.get("cpu_memory"):
        lines += ["", f"## CPU peak memory: fused linear CE at {size_label(CPU_MEMORY_SIZE)}, float32", "",
                  "One forward + backward in a fresh process per variant; peak RSS increase over the RSS before it.",
                  "",
                  "| variant | backend | peak +MB | s | loss | note |", "|---|---|---:|---:|---:|---|"]
        for r in result["cpu_memory"]:
            peak = f"{r['peak_increase_bytes'] / 1e6:.0f}" if "peak_increase_bytes" in r else "—"
            lines.append(f"| {r['variant']} | {r.get('backend') or '—'} | {peak} | {cell(r, 'seconds', '.1f')} | "
                         f"{cell(r, 'loss', '.4f')} | {r.get('error', '')} |")
    if result.get("sweep"):
        constants = result["constants"]
        how = ("ms (% of copy bandwidth) per MAX_BLOCK_V (rows) and NUM_WARPS (columns); the constants in this run "
               f"were MAX_BLOCK_V={constants['MAX_BLOCK_V']}, NUM_WARPS={constants['NUM_WARPS']}; "
               "* marks the fastest per vocabulary.")
        lines += ["", f"## cross_entropy constants sweep: M={SWEEP_M}, forward + backward", "", how, ""]
        for V in SWEEP_VOCABS:
            rows = [r for r in result["sweep"] if r["V"] == V]
            best = min((r["ms"] for r in rows if "ms" in r), default=None)
            lines += [f"V={V}:", "", "| MAX_BLOCK_V | " + " | ".join(f"{w} warps" for w in SWEEP_WARPS) + " |",
                      "|---:|" + "---:|" * len(SWEEP_WARPS)]
            for block in SWEEP_BLOCKS:
                cells = []
                for r in (r for r in rows if r["MAX_BLOCK_V"] == block):
                    cells.append(r["error"] if "error" in r else
                                 f"{r['ms']:.3f} ({100 * r['of_copy']:.0f}%){' *' if r['ms'] == best else ''}"
                                 f" / kernels {cell(r, 'kernel_ms', '.3f')}")
                lines.append(f"| {block} | " + " | ".join(cells) + " |")
            lines.append("")
    if result.get("sweep_norm"):
        lines += [f"## rms_norm backward programs per SM: {size_label(SWEEP_NORM_SIZE)}, forward + backward", "",
                  f"(this run's constant: {result['constants']['PROGRAMS_PER_SM']})", "",
                  "| programs per SM | ms | % of copy | GPU kernels ms |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['PROGRAMS_PER_SM']} | {cell(r, 'ms', '.3f')} | "
                  + (f"{100 * r['of_copy']:.1f}%" if "of_copy" in r else r.get("error", "—"))
                  + f" | {cell(r, 'kernel_ms', '.3f')} |"
                  for r in result["sweep_norm"]]
    if result.get("sweep_nf4"):
        lines += ["", "## nf4_dequantize NUM_WARPS", "",
                  f"ms (% of the 1 GiB copy's bandwidth) per layer shape (rows) and NUM_WARPS (columns); this run's "
                  f"constant: {result['constants']['NF4_NUM_WARPS']}; * marks the fastest per shape.", "",
                  "| size | " + " | ".join(f"{w} warps" for w in SWEEP_NF4_WARPS) + " |",
                  "|---|" + "---:|" * len(SWEEP_NF4_WARPS)]
        for size in NF4_SIZES:
            rows = [r for r in result["sweep_nf4"] if r["M"] == size["M"] and r["N"] == size["N"]]
            best = min((r["ms"] for r in rows if "ms" in r), default=None)
            lines.append(f"| {size_label(size)} | " + " | ".join(
                r["error"] if "error" in r else
                f"{r['ms']:.4f} ({100 * r['of_copy']:.0f}%){' *' if r['ms'] == best else ''}" for r in rows) + " |")
    lines += ["", "## Goals", ""] + goal_lines(result["goals"])
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def nf4_markdown(rows: list[dict]) -> list[str]:
    """NF4 dequantization per Mistral-7B layer shape, and the time of one pass over the model's 224 layers."""
    nf4 = [r for r in rows if r["kernel"] == "nf4_dequantize"]
    if not nf4:
        return []
    names = ("minitune", "bitsandbytes", "eager", "compile", "copy")
    present = [v for v in names if any(r["variant"] == v for r in nf4)]
    sizes = list({size_label(r["size"]): r["size"] for r in nf4}.values())
    lines = ["", "## NF4 dequantization at Mistral-7B's layer shapes", "",
             "ms per variant (GB/s, % of the copy bandwidth); copy = dst.copy_(src) of an output-sized tensor, which "
             "moves 2·n·b bytes where the dequantization moves about n·(b + 0.52). The last row: one dequantization of "
             f"every linear layer of Mistral-7B ({NF4_MODEL_LAYERS} blocks x 7 layers; a QLoRA step does about three: "
             "forward, recomputation, backward), from the rows above.", "",
             "| layers | M x N | " + " | ".join(present) + " |", "|---|---|" + "---:|" * len(present)]
    total = dict.fromkeys(present, 0.0)
    for size in sizes:
        layers = NF4_LAYERS.get((size["M"], size["N"]), ())
        cells = []
        for v in present:
            r = find(rows, "nf4_dequantize", size, v)
            cells.append("—" if r is None or "ms" not in r else
                         f"{r['ms']:.3f} ({r['gbps']:.{0 if r['gbps'] >= 10 else 2}f}, {100 * r['of_copy']:.0f}%)")
            if total[v] is not None:
                total[v] = None if r is None or "ms" not in r or not layers else \
                    total[v] + NF4_MODEL_LAYERS * len(layers) * r["ms"]
        lines.append(f"| {', '.join(layers) or '—'} | {size['M']} x {size['N']} | " + " | ".join(cells) + " |")
    if {(s["M"], s["N"]) for s in sizes} == set(NF4_LAYERS):
        lines.append(f"| all {NF4_MODEL_LAYERS * 7} layers of Mistral-7B | | "
                     + " | ".join("—" if t is None else f"{t:.1f}" for t in total.values()) + " |")
    return lines


def write(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "bench_kernels.md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out", help="where bench_kernels.json and bench_kernels.md go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on a GPU, float32 on the CPU (nf4_dequantize's output: bfloat16 on both)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    ap.add_argument("--all-sizes", action="store_true", help="GPU: the whole size grid, not the default set")
    ap.add_argument("--no-compile", action="store_true", help="GPU: leave out torch.compile")
    ap.add_argument("--sweep", action="store_true",
                    help="GPU: also sweep the chosen kernels' constants (cross_entropy, rms_norm, nf4_dequantize)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per CPU memory child process")
    ap.add_argument("--child-cpu-memory", choices=CPU_MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child_cpu_memory:
        print("RESULT " + json.dumps(child_cpu_memory(args.child_cpu_memory)), flush=True)
        return

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    nf4_dtype = getattr(torch, args.dtype or "bfloat16")  # QLoRA's compute dtype, on the CPU too
    chosen = [k for k in args.kernels.split(",") if k]
    if bad := [k for k in chosen if k not in KERNELS]:
        ap.error(f"--kernels: unknown {bad}; choose from {KERNELS}")
    sizes = (GPU_SIZES_ALL if args.all_sizes else GPU_SIZES) if on_gpu else CPU_SIZES
    out = Path(args.out)
    ce = importlib.import_module("minitune.kernels.cross_entropy")
    common = importlib.import_module("minitune.kernels._common")
    nf4 = importlib.import_module("minitune.kernels.nf4")
    constants = {"MAX_BLOCK_V": ce.MAX_BLOCK_V, "NUM_WARPS": ce.NUM_WARPS, "PROGRAMS_PER_SM": common.PROGRAMS_PER_SM,
                 "NF4_NUM_WARPS": nf4.NUM_WARPS}
    result = {"command": ("python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:])).strip(),
              "environment": environment(device, dtype), "constants": constants,
              "torch_linear_cross_entropy": TORCH_LCE, "nf4_dtype": str(nf4_dtype).removeprefix("torch."),
              "rows": [], "cpu_memory": [], "sweep": [], "goals": []}
    print(environment_line(result["environment"]), flush=True)

    t_start = time.perf_counter()
    result["copy_gbps"] = copy_bandwidth_gbps(device, dtype)
    free_memory(device)
    print(f"copy bandwidth: {result['copy_gbps']:.0f} GB/s", flush=True)
    for kernel in chosen:
        for size in sizes[kernel]:
            result["rows"] += bench_case(kernel, size, nf4_dtype if kernel == "nf4_dequantize" else dtype, device,
                                         on_gpu and not args.no_compile, result["copy_gbps"])
            result["goals"] = gpu_goals(result["rows"], chosen) if on_gpu else []
            write(result, out)  # after each size: a run cut short keeps what it measured
    if not on_gpu and "fused_linear_cross_entropy" in chosen:
        result["cpu_memory"] = cpu_memory_goal(args.timeout)
    if args.sweep:
        if on_gpu:
            if "cross_entropy" in chosen:
                result["sweep"] = sweep(dtype, device, result["copy_gbps"])
            if "rms_norm" in chosen:
                result["sweep_norm"] = sweep_norm_programs(dtype, device, result["copy_gbps"])
            if "nf4_dequantize" in chosen:
                result["sweep_nf4"] = sweep_nf4_warps(nf4_dtype, device, result["copy_gbps"])
        else:
            print("--sweep needs a GPU: skipped", flush=True)
    result["goals"] = gpu_goals(result["rows"], chosen) if on_gpu else \
        cpu_goals(result["cpu_memory"], result["rows"], chosen)
    result["seconds"] = time.perf_counter() - t_start
    md = write(result, out)
    print()
    print(md)
    print(f"wrote {out / 'bench_kernels.json'} and {out / 'bench_kernels.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
