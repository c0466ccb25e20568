"""What the kernel files share: Triton (or a stand-in where it has no wheel), 2-D views, launch sizes."""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # macOS and Windows have no Triton wheel: the kernels never launch there,
    HAVE_TRITON = False  # but the files still import, so their PyTorch references work.

    class _StandIn:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << (n - 1).bit_length()

    triton = tl = _StandIn()

MAX_BLOCK = 65536  # elements of one row a norm kernel holds at once (registers and shared memory)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) as a 2-D (M, N) view with unit stride along N, copying only when it must."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_block(n: int, what: str) -> int:
    """The power-of-two block that holds a whole row of `n` elements."""
    if n > MAX_BLOCK:
        raise ValueError(f"{what}: rows of {n} elements are wider than the kernel's {MAX_BLOCK}")
    return triton.next_power_of_2(n)


def norm_warps(block: int) -> int:
    """More warps for wider rows, so each thread keeps a handful of elements in registers."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# loop-over-rows kernels: enough programs per SM to keep loads in flight. On an H100 (RMSNorm,
# M=16384, N=4096) 2 gave the fastest kernels: 0.249 ms against 0.292 (1), 0.259 (4), 0.255 (8).
PROGRAMS_PER_SM = 2


def persistent_programs(device: torch.device, rows: int) -> int:
    """Programs for a loop-over-rows kernel: a few per SM on a GPU, four in the CPU interpreter.

    Each program writes one float32 partial sum of the weight gradient, so more programs cost a
    larger final reduction: at 2 per SM on an H100, M=16384 rows of 4096, about 2% of the
    backward's memory traffic."""
    if device.type != "cuda":
        return max(1, min(rows, 4))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(rows, PROGRAMS_PER_SM * _sm_count(index)))


def call_op(op, impl, *args):
    """Under torch.compile, the registered custom op, opaque to the compiler; in eager mode its Python
    implementation, called directly: the dispatcher's tens of microseconds per call would be most of
    a small kernel's time."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def launch_device(t: torch.Tensor):
    """The CUDA device a kernel on `t` must launch on (nothing to do for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
