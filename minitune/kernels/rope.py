"""Rotary position embedding of q and k in one Triton launch, beside the PyTorch reference it must match.

The rotate-half layout (the hub's q/k weights as they are): each head's hs values split into halves
x1, x2, and with cos = cat(cos1, cos2), sin = cat(sin1, sin2) for the position,

    y1 = x1 * cos1 - x2 * sin1          x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1):
    y2 = x2 * cos2 + x1 * sin2          each product rounded to the output dtype, then the sum, as the reference

The backward turns dy back by the same angles:

    dx1 = dy1 * cos1 + dy2 * sin2
    dx2 = dy2 * cos2 - dy1 * sin1

which is the forward with (sin1, sin2) replaced by (-sin2, -sin1): one kernel, a flag. One program
per (batch row, position) reads that position's cos and sin once and turns every head of q and of
k. Launched without floating-point contraction, so no multiply and add fuse into one rounding.
cos and sin get no gradient (they come from the positions). The output's dtype is q's and cos's
promotion, as in the reference: under autocast, bf16 q and k turned by float32 cos and sin come out
float32.
"""

from __future__ import annotations

import torch

from ._common import call_op, launch_device, tl, triton


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs), cos and sin (B or 1, T, hs): Hugging Face's apply_rotary_pos_emb for one tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@triton.jit
def _turn_heads(X, Y, stride_xh, stride_yh, heads, cos1, cos2, sin1, sin2,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every head of one (batch row, position): X and Y point at its head 0."""
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    mask = (h < heads) & (d < HALF)
    x1 = tl.load(X + h * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + h * stride_xh + HALF + d, mask=mask, other=0.0).to(tl.float32)
    dtype = Y.dtype.element_ty  # x's, or float32 when cos is (under autocast): the reference's promotion
    y1 = (x1 * cos1).to(dtype).to(tl.float32) + (-(x2 * sin1)).to(dtype).to(tl.float32)
    y2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(Y + h * stride_yh + d, y1.to(dtype), mask=mask)
    tl.store(Y + h * stride_yh + HALF + d, y2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, T, q_heads, k_heads,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_b, sc_t,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    pid = tl.program_id(0)
    b, t = (pid // T).to(tl.int64), (pid % T).to(tl.int64)  # 64-bit offsets: b * stride may pass 2^31
    d = tl.arange(0, BLOCK_D)[None, :]
    at = b * sc_b + t * sc_t
    cos1 = tl.load(COS + at + d, mask=d < HALF, other=0.0).to(tl.float32)  # (1, BLOCK_D)
    cos2 = tl.load(COS + at + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + at + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + at + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    if BACKWARD:  # the inverse turn: (sin1, sin2) -> (-sin2, -sin1)
        sin1, sin2 = -sin2, -sin1
    _turn_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, sq_h, sqo_h, q_heads,
                cos1, cos2, sin1, sin2, HALF, BLOCK_H, BLOCK_D)
    _turn_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, sk_h, sko_h, k_heads,
                cos1, cos2, sin1, sin2, HALF, BLOCK_H, BLOCK_D)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) turned (the backward: turned back). q (B, nh, T, hs), k (B, n_kv, T, hs), any strides with a unit
    last one; the outputs have the inputs' layout."""
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    cos, sin = cos.contiguous(), sin.contiguous()
    B, nh, T, hs = q.shape
    dtype = torch.promote_types(q.dtype, cos.dtype)  # bf16 q and float32 cos (autocast): float32, as q * cos
    q_out, k_out = torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)  # q's and k's strides
    cos_b = 0 if cos.shape[0] == 1 else cos.stride(0)  # positions shared by the batch
    with launch_device(q):
        _rope_kernel[(B * T,)](
            q, k, cos, sin, q_out, k_out, T, nh, k.shape[1],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos_b, cos.stride(1), HALF=hs // 2, BLOCK_H=triton.next_power_of_2(max(nh, k.shape[1])),
            BLOCK_D=triton.next_power_of_2(hs // 2), BACKWARD=backward, enable_fp_fusion=False)
    return q_out, k_out


rope_op = torch.library.custom_op("minitune::rope", _rope, mutates_args=())


@rope_op.register_fake
def _(q, k, cos, sin, backward):
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))  # as _rope: its outputs' layout
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return call_op(rope_op, _rope, q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = call_op(rope_op, _rope, dq, dk, cos, sin, True)
        return dq, dk, None, None


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, T, hs = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:] or cos.shape != sin.shape or cos.shape[1:] != (T, hs) \
            or cos.shape[0] not in (1, B) or hs % 2:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, heads, T, hs) with an even hs, "
                         f"cos and sin (B or 1, T, hs); got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if q.dtype != k.dtype or cos.dtype != sin.dtype:
        raise ValueError(f"rope: q and k ({q.dtype}, {k.dtype}) must share a dtype, and cos and sin ({cos.dtype}, "
                         f"{sin.dtype}) theirs")
    return RoPEFunction.apply(q, k, cos, sin)  # dq, dk: float32 when cos is, cast back to q's dtype by autograd
