"""LayerNorm (GPT-2's norm) in Triton, forward and backward, beside the PyTorch reference.

    mean = mean(x),  rstd = 1 / sqrt(mean((x - mean)^2) + eps)      statistics in float32
    y    = ((x - mean) * rstd * weight + bias).to(x.dtype)          one rounding, as torch's kernel

Backward, with xhat = (x - mean) * rstd and g = dy * weight (float32):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat,    db = sum over rows of dy

Same layout as rms_norm.py: one row per program forward (mean and rstd kept), one program per SM
backward with float32 partial sums of dw and db reduced once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import as_rows, call_op, launch_device, norm_warps, persistent_programs, row_block, tl, triton


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch reference: torch's own layer_norm, which nn.LayerNorm (and so GPT-2) uses."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


@triton.jit
def _layer_norm_forward_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)  # the padding lanes must not count in the variance
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_backward_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x,
                                stride_dx, M, N, rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # int64 bounds give an int64 row
    for row in range(first, tl.minimum(first + rows_per_program, M)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dw += dy * xhat
        db += dy
        g = dy * w
        dx = rstd * (g - tl.sum(g, axis=0) / N - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)


def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (shape and dtype of x), and the float32 mean and rstd of each row."""
    x2 = as_rows(x)  # (M, N)
    M, N = x2.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block = row_block(N, "layer_norm")
    with launch_device(x):
        _layer_norm_forward_kernel[(M,)](x2, weight, bias, y, mean, rstd, x2.stride(0), y.stride(0), N, eps,
                                         BLOCK_N=block, num_warps=norm_warps(block))
    return y.view(x.shape), mean, rstd


layer_norm_forward = torch.library.custom_op("minitune::layer_norm_forward", _layer_norm_forward,
                                             mutates_args=())


@layer_norm_forward.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (like x), dw and db (in the weight's dtype)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    M, N = x2.shape
    dx = torch.empty(M, N, dtype=x.dtype, device=x.device)
    programs = persistent_programs(x.device, M)
    partial = torch.empty(2, programs, N, dtype=torch.float32, device=x.device)  # dw and db partial sums
    block = row_block(N, "layer_norm")
    with launch_device(x):
        _layer_norm_backward_kernel[(programs,)](
            dy2, x2, weight, mean, rstd, dx, partial[0], partial[1], dy2.stride(0), x2.stride(0), dx.stride(0),
            M, N, triton.cdiv(M, programs), BLOCK_N=block, num_warps=norm_warps(block))
    return dx.view(x.shape), partial[0].sum(0).to(weight.dtype), partial[1].sum(0).to(weight.dtype)


layer_norm_backward = torch.library.custom_op("minitune::layer_norm_backward", _layer_norm_backward,
                                              mutates_args=())


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = call_op(layer_norm_forward, _layer_norm_forward, x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = call_op(layer_norm_backward, _layer_norm_backward, dy, x, weight, mean, rstd)
        return dx, dw, db, None


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both "
                         f"match x's last dim {x.shape[-1]}")
    return LayerNormFunction.apply(x, weight.contiguous(), bias.contiguous(), eps)
