"""SwiGLU's gate in Triton, forward and backward, beside the PyTorch reference it must match.

    a = silu(gate) = gate / (1 + exp(-gate))      rounded to the input dtype, as F.silu's output is
    y = a * up                                     rounded again: the reference's two operations

Backward, with s = sigmoid(gate) (float32):

    dup   = dy * a
    da    = dy * up                                rounded, as autograd's product is
    dgate = da * s * (1 + gate * (1 - s))          torch's silu_backward

The forward saves gate and up, not a (the reference's autograd keeps a as well): the backward
recomputes it, so the MLP's largest activation is held twice instead of three times. Both kernels
are elementwise over the flattened tensors, BLOCK values a program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import call_op, launch_device, tl, triton

BLOCK = 1024  # values a program handles


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference, Hugging Face's MLP: act_fn(gate_proj(x)) * up_proj(x) with act_fn = silu."""
    return F.silu(gate) * up


@triton.jit
def _silu(g):
    return g / (1.0 + tl.exp(-g))  # float32, torch's formula


@triton.jit
def _swiglu_forward_kernel(GATE, UP, Y, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: 8 x 4096 x 14336 passes 2^31
    mask = offsets < n
    g = tl.load(GATE + offsets, mask=mask, other=0.0)
    u = tl.load(UP + offsets, mask=mask, other=0.0)
    a = _silu(g.to(tl.float32)).to(g.dtype)  # silu's output in the input dtype
    y = a.to(tl.float32) * u.to(tl.float32)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DY, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dy = tl.load(DY + offsets, mask=mask, other=0.0)
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0)
    s = 1.0 / (1.0 + tl.exp(-g))  # sigmoid(gate)
    a = _silu(g).to(u.dtype)  # recomputed: the forward's a, rounded as it was
    dup = dy.to(tl.float32) * a.to(tl.float32)
    da = (dy.to(tl.float32) * u.to(tl.float32)).to(dy.dtype).to(tl.float32)
    dgate = da * (s * (1.0 + g * (1.0 - s)))
    tl.store(DUP + offsets, dup.to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offsets, dgate.to(DGATE.dtype.element_ty), mask=mask)


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    with launch_device(gate):
        _swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


swiglu_forward = torch.library.custom_op("minitune::swiglu_forward", _swiglu_forward, mutates_args=())


@swiglu_forward.register_fake
def _(gate, up):
    return torch.empty_like(gate)


def _swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    with launch_device(gate):
        _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK)
    return dgate, dup


swiglu_backward = torch.library.custom_op("minitune::swiglu_backward", _swiglu_backward, mutates_args=())


@swiglu_backward.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)  # not silu(gate): the backward recomputes it
        return call_op(swiglu_forward, _swiglu_forward, gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return call_op(swiglu_backward, _swiglu_backward, dy, gate, up)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have one shape and dtype")
    return SwiGLUFunction.apply(gate, up)
