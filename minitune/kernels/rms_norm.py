"""RMSNorm in Triton, forward and backward, beside the PyTorch reference it must match.

    rstd = 1 / sqrt(mean(x^2) + eps)             statistics in float32
    y    = weight * (x * rstd).to(x.dtype)        Mistral's cast order: normalise, cast, then scale

Backward, with xhat = x * rstd and g = dy * weight (both float32):

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat.to(x.dtype)

The forward kernel takes one row per program and keeps the row's rstd for the backward. The
backward runs one program per SM; each walks its share of the rows, keeps a float32 partial sum of
dw in registers, and writes it once; the partials are then summed in PyTorch.
"""

from __future__ import annotations

import torch

from ._common import as_rows, call_op, launch_device, norm_warps, persistent_programs, row_block, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch reference, Hugging Face's MistralRMSNorm."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    xhat = (xf * rstd).to(x.dtype)  # round to the input dtype before the scale, as the reference does
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = xhat.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N,
                              rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # int64 bounds give an int64 row: row * stride may pass 2^31
    for row in range(first, tl.minimum(first + rows_per_program, M)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x.to(tl.float32) * rstd
        dw += dy * xhat.to(x.dtype).to(tl.float32)  # the weight saw the rounded xhat
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


# Registered as custom operators, so torch.compile sees one opaque op with a known output shape
# (from the fake below) instead of a Triton launch it would have to trace through; eager calls go
# straight to the Python function (call_op).

def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y (shape of x) and rstd (float32, one per row)."""
    x2 = as_rows(x)  # (M, N)
    M, N = x2.shape
    y = torch.empty(M, N, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block = row_block(N, "rms_norm")
    with launch_device(x):
        _rms_norm_forward_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps,
                                       BLOCK_N=block, num_warps=norm_warps(block))
    return y.view(x.shape), rstd


rms_norm_forward = torch.library.custom_op("minitune::rms_norm_forward", _rms_norm_forward, mutates_args=())


@rms_norm_forward.register_fake
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32))


def _rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (shape and dtype of x) and dw (dtype of weight)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    M, N = x2.shape
    dx = torch.empty(M, N, dtype=x.dtype, device=x.device)
    programs = persistent_programs(x.device, M)
    dw_partial = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    block = row_block(N, "rms_norm")
    with launch_device(x):
        _rms_norm_backward_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
            triton.cdiv(M, programs), BLOCK_N=block, num_warps=norm_warps(block))
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


rms_norm_backward = torch.library.custom_op("minitune::rms_norm_backward", _rms_norm_backward,
                                            mutates_args=())


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = call_op(rms_norm_forward, _rms_norm_forward, x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = call_op(rms_norm_backward, _rms_norm_backward, dy, x, weight, rstd)
        return dx, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return RMSNormFunction.apply(x, weight.contiguous(), eps)
