"""NF4 dequantization in Triton, beside the PyTorch reference it must match bit for bit.

A weight of n values is stored as bitsandbytes stores it (minitune/quant.py makes it):

    codes    (ceil(n / 2),) uint8       two 4-bit indices into NF4_CODE per byte, the first in the high nibble
    absmax   (ceil(n / bs),)            each block of bs (64) values' absolute maximum: float32, or with
                                        double quantization uint8 indices into the 8-bit dynamic code,
    nested_absmax (ceil(blocks / 256),) float32: one scale per 256 block maxima,
    offset   (1,)                       float32: the mean of the block maxima, taken out before their quantization

    absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset     (float32, double quantization)
    w[i]      = (nf4_code[code[i]] * absmax[i // bs]).to(dtype)                 (the product in float32)

Every operation is a float32 multiply or add, rounded once, in bitsandbytes' order; the kernel is
launched with floating-point contraction off, so the compiler cannot fuse the multiply and add of
the first line into an FMA (one rounding instead of two). The float32 -> bfloat16 rounding (to
nearest, ties to even, as torch's .to) is done on the bits: Triton's interpreter, which the CPU
tests run, truncates in its own cast.

Each program reads a tile of bytes, one row per quantization block (or part of one), so the block's
scale is computed once per row, and writes each row's values interleaved, high nibble first. The tile
gives each thread the bytes of exactly one 16-byte store: compiled for sm_90, a thread issues one
load of its codes (4 bytes; 2 for float32 output), one of its block's 8-bit maximum, the two table
lookups per byte, and one 16-byte store, with no shared-memory shuffle between the loaded layout and
the stored one.
"""

from __future__ import annotations

import torch

from ._common import call_op, launch_device, tl, triton


def nf4_dequantize_reference(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                             dtype: torch.dtype, nested_absmax: torch.Tensor | None = None,
                             nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                             nested_blocksize: int = 256) -> torch.Tensor:
    """The n values, flat, in `dtype`: bitsandbytes' dequantize_4bit in PyTorch."""
    if nested_absmax is not None:  # undo the double quantization: the block maxima in float32
        blocks = absmax.numel()
        scale = nested_absmax.repeat_interleave(nested_blocksize)[:blocks]  # (blocks,)
        absmax = nested_code[absmax.long()] * scale + offset
    byte = torch.arange(256, device=codes.device)
    byte_values = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)  # (256, 2): a byte's two values
    values = byte_values.index_select(0, codes.reshape(-1).int()).view(-1)[:n]  # (n,) float32, high nibble first
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[:full // blocksize, None])  # each block times its maximum
    values[full:].mul_(absmax[full // blocksize:full // blocksize + 1])  # a last, shorter block
    return values.to(dtype)


@triton.jit
def _nf4_dequantize_kernel(CODES, ABSMAX, CODE, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT, n, n_bytes,
                           BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                           BF16_BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # a program's ROWS * COLS bytes as (ROWS, COLS): each row lies in one block (COLS divides BLOCKSIZE / 2)
    program_start = tl.program_id(0).to(tl.int64) * (ROWS * COLS)  # 64-bit: a 7B model's layers pass 2^31 values
    row_start = program_start + tl.arange(0, ROWS) * COLS  # (ROWS,) each row's first byte
    byte = row_start[:, None] + tl.arange(0, COLS)[None, :]  # (ROWS, COLS)
    packed = tl.load(CODES + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    block = 2 * row_start // BLOCKSIZE  # (ROWS,) each row's block: one scale per row, not per value
    in_range = row_start < n_bytes
    if DOUBLE_QUANT:
        q = tl.load(ABSMAX + block, mask=in_range, other=0).to(tl.int32)
        nested = tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = tl.load(NESTED_CODE + q) * nested + tl.load(OFFSET)  # two roundings: no FMA (see the launch)
    else:
        scale = tl.load(ABSMAX + block, mask=in_range, other=0.0)
    high = tl.load(CODE + (packed >> 4)) * scale[:, None]  # (ROWS, COLS) float32
    low = tl.load(CODE + (packed & 0xF)) * scale[:, None]
    values = tl.join(high, low).reshape(ROWS, 2 * COLS)  # high0, low0, high1, low1, ... along each row
    index = 2 * row_start[:, None] + tl.arange(0, 2 * COLS)[None, :]  # (ROWS, 2 * COLS)
    if BF16_BITS:  # OUT is the bfloat16 output viewed as int16: round to nearest even on the bits
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(values != values, 0x7FC0, bits)  # a NaN stays one: the sum above can carry it to -0.0
        tl.store(OUT + index, bits.to(tl.int16), mask=index < n)
    else:
        tl.store(OUT + index, values.to(OUT.dtype.element_ty), mask=index < n)


# Each thread reads the bytes of one 16-byte store: 4 bytes for a 2-byte output, 2 for float32. The loaded
# layout is then the stored one, and the compiled kernel (sm_90) has no shared-memory shuffle between them.
NUM_WARPS = 8
STORE_BYTES = 16


def program_tile(blocksize: int, dtype: torch.dtype) -> tuple[int, int]:
    """(ROWS, COLS): one program's bytes, COLS of them in each of ROWS rows, a row within one block."""
    program_bytes = 32 * NUM_WARPS * STORE_BYTES // (2 * dtype.itemsize)  # 32 threads a warp
    cols = min(blocksize // 2, program_bytes)
    return program_bytes // cols, cols


def _nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                    dtype: torch.dtype, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                    offset: torch.Tensor | None, nested_blocksize: int) -> torch.Tensor:
    """The n values, flat, in `dtype`, from one kernel launch (nf4_dequantize_reference's maths)."""
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"NF4 block size {blocksize}: the kernel needs a power of two")
    out = torch.empty(n, dtype=dtype, device=codes.device)
    double_quant = nested_absmax is not None
    if not double_quant:  # unused pointers: any float32 tensor will do
        nested_absmax = nested_code = offset = absmax
    bf16_bits = dtype == torch.bfloat16
    n_bytes = (n + 1) // 2  # the codes n values use (a stored tensor may hold more)
    rows, cols = program_tile(blocksize, dtype)
    grid = (triton.cdiv(n_bytes, rows * cols),)
    with launch_device(codes):
        _nf4_dequantize_kernel[grid](codes, absmax, code, nested_absmax, nested_code, offset,
                                     out.view(torch.int16) if bf16_bits else out, n, n_bytes,
                                     BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize,
                                     DOUBLE_QUANT=double_quant, BF16_BITS=bf16_bits, ROWS=rows, COLS=cols,
                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


nf4_dequantize_op = torch.library.custom_op("minitune::nf4_dequantize", _nf4_dequantize, mutates_args=())


@nf4_dequantize_op.register_fake
def _(codes, absmax, code, n, blocksize, dtype, nested_absmax, nested_code, offset, nested_blocksize):
    return codes.new_empty(n, dtype=dtype)


def nf4_dequantize_triton(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                          dtype: torch.dtype, nested_absmax: torch.Tensor | None = None,
                          nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                          nested_blocksize: int = 256) -> torch.Tensor:
    """The n values, flat, in `dtype`, from one kernel launch (nf4_dequantize_reference's maths)."""
    return call_op(nf4_dequantize_op, _nf4_dequantize, codes, absmax, code, n, blocksize, dtype, nested_absmax,
                   nested_code, offset, nested_blocksize)
