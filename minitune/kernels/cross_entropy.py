"""Cross-entropy over the vocabulary in Triton, and the fused `lm_head` + cross-entropy built on it.

For a row of logits x (V of them), target t and label smoothing e:

    lse  = log(sum_j exp(x_j))                                  float32, streamed over blocks of V
    loss = (1 - e) * (lse - x_t) + e * (lse - mean_j x_j)
    dloss/dx_j = softmax(x)_j - (1 - e) * [j == t] - e / V

The kernel reads a row twice: once for a running (online) max and sum of exponentials, so any
vocabulary size works with a fixed block; once more to write the gradient, which the forward
computes when a backward will follow. The second read mostly hits L2, so the row costs about one
read and one write of DRAM. The target's gradient p_t - 1 = -sum_{j != t} p_j is summed from the
other classes in float32, never formed as a difference close to 1 - 1, and rounded once: a
confident prediction keeps an accurate small gradient (rounding p_t to bf16 would give 0, and
even a float32 p_t - 1 loses digits). Ignored rows give loss 0 and gradient 0; a mean over no
target at all is 0, not NaN. The backward only multiplies the saved gradient by the upstream one,
in a small kernel that returns at once where that is 1: no pass over the logits and no host sync
for a plain `loss.backward()`. fp16 is the exception: its gradient is computed in the backward,
with the upstream factor (a loss scale) applied before the one rounding, so none flushes to zero.

`fused_linear_cross_entropy` never builds the [tokens, vocab] logits: it walks the tokens in
chunks; for each chunk it computes the logits, turns them into their gradient in place with the
kernel above, and immediately folds that into dhidden (grad @ W) and a float32 dweight
(grad^T @ hidden). Only one chunk of logits exists at a time; the float32 dweight (V x H) is the
price of an exact sum over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import call_op, launch_device, tl, triton

REDUCTIONS = ("mean", "sum", "none")
# vocabulary entries a program holds per step, and its warps: on an H100 the fastest kernels at
# V=32000 and within 3% of the best at V=128256 (benchmarks/bench_kernels.py --sweep, RESULTS.md)
MAX_BLOCK_V = 16384
NUM_WARPS = 16


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """torch's cross_entropy in float32 (or float64), except that a mean over no target is 0, not NaN."""
    V = logits.shape[-1]
    flat_targets = targets.reshape(-1).long()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.reshape(-1, V), flat_targets, ignore_index=ignore_index,
                           reduction="none" if reduction == "none" else "sum", label_smoothing=label_smoothing)
    if reduction == "none":
        return loss.view(targets.shape)
    if reduction == "mean":
        loss = loss / (flat_targets != ignore_index).sum().clamp(min=1)
    return loss


@triton.jit
def _cross_entropy_kernel(LOGITS, stride_logits, TARGETS, LOSS, GRAD, stride_grad, SCALE, stride_scale, V,
                          ignore_index, smoothing, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    """One row per program: LOSS[row], and, when COMPUTE_GRAD, GRAD[row] = dloss/dlogits * SCALE[row].

    GRAD may be LOGITS itself: each block is read before it is overwritten.
    """
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride passes 2^31 at 16k tokens x 128k vocab
    x_row = LOGITS + row * stride_logits
    g_row = GRAD + row * stride_grad
    target = tl.load(TARGETS + row)

    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(g_row + cols, tl.zeros([BLOCK_V], tl.float32).to(GRAD.dtype.element_ty), mask=cols < V)
        return

    # pass 1: running max m and sum d of exp(x - m), so lse = m + log(d) without overflow;
    # d_other leaves the target out, for its gradient
    m = float("-inf")
    d = 0.0
    d_other = 0.0
    x_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        e = tl.exp(x - m_new)
        rescale = tl.exp(m - m_new)
        d = d * rescale + tl.sum(e, axis=0)
        d_other = d_other * rescale + tl.sum(tl.where(cols == target, 0.0, e), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            x_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
    lse = m + tl.log(d)

    # a target outside the vocabulary reads nothing and makes the row's loss and gradient NaN: loud,
    # and without the host sync a check before the launch would cost
    in_vocab = (target >= 0) & (target < V)
    x_target = tl.load(x_row + target, mask=in_vocab, other=float("nan")).to(tl.float32)
    loss = lse - x_target
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - x_sum / V)
    tl.store(LOSS + row, loss)

    # pass 2: the gradient, formed in float32 and rounded once
    if COMPUTE_GRAD:
        scale = tl.where(in_vocab, tl.load(SCALE + row * stride_scale).to(tl.float32), float("nan"))
        target_grad = smoothing - d_other / d  # p_t - (1 - e), with 1 - p_t summed from the others
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.where(cols == target, target_grad, tl.exp(x - lse))
            if HAS_SMOOTHING:
                g = g - smoothing / V
            tl.store(g_row + cols, (g * scale).to(GRAD.dtype.element_ty), mask=cols < V)


def _check_targets(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """On the CPU, a clear error for a target outside the vocabulary. On a GPU the check would cost a
    host sync; the kernel gives such a row a NaN loss and gradient instead."""
    if targets.is_cuda:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"cross_entropy: target {int(targets[i])} at flat position {i} is outside the "
                         f"vocabulary [0, {V}) and is not ignore_index {ignore_index}")


def _rows_loss_and_grad_triton(logits, targets, scale, grad, ignore_index: int, smoothing: float) -> torch.Tensor:
    """Per-row loss (float32) of logits (M, V); fills `grad` (may be `logits`) unless it is None."""
    M, V = logits.shape
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    if M == 0:
        return loss
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    out = grad if grad is not None else logits  # not written when COMPUTE_GRAD is off
    with launch_device(logits):
        _cross_entropy_kernel[(M,)](
            logits, logits.stride(0), targets, loss, out, out.stride(0), scale, 0 if scale.numel() == 1 else 1,
            V, ignore_index, smoothing, HAS_SMOOTHING=smoothing > 0, COMPUTE_GRAD=grad is not None,
            BLOCK_V=block, num_warps=NUM_WARPS if logits.is_cuda else 4)
    return loss


def _rows_loss_and_grad_torch(logits, targets, scale, grad, ignore_index: int, smoothing: float) -> torch.Tensor:
    """The kernel's math in PyTorch: the per-chunk step of the fused loss on the PyTorch backend.

    With `grad` given, the softmax and then the gradient are formed in place in a float32 x (the
    logits themselves when they are float32 and `grad` is `logits`): no other [rows, V] buffer.
    """
    V = logits.shape[-1]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)[:, None]  # (M, 1)
    if grad is None:  # the loss alone: leave the logits as they are
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)  # (M,)
    else:
        x = logits.float() if grad is logits else logits.to(torch.float32, copy=True)
    x_target = x.gather(1, safe_targets).squeeze(1)
    x_mean = x.mean(-1) if smoothing > 0 else None
    if grad is not None:
        m = x.amax(-1, keepdim=True)
        total = x.sub_(m).exp_().sum(-1, keepdim=True)  # x = exp(x - max)
        lse = (m + total.log()).squeeze(1)
        g = x.div_(total)  # softmax
    loss = lse - x_target
    if smoothing > 0:
        loss = (1 - smoothing) * loss + smoothing * (lse - x_mean)
    loss = torch.where(valid, loss, 0.0)
    if grad is not None:
        g.scatter_(1, safe_targets, 0.0)
        g.scatter_(1, safe_targets, (smoothing - g.sum(-1))[:, None])  # p_t - (1 - e) = e - sum_{j!=t} p_j
        if smoothing > 0:
            g -= smoothing / V
        g *= (scale.float() * valid)[:, None] if scale.numel() > 1 else scale.float() * valid[:, None]
        if g is not grad:
            grad.copy_(g)
    return loss


# ---- plain cross-entropy: custom ops (opaque to torch.compile) and the autograd.Function ----

def _cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor,
                          ignore_index: int, label_smoothing: float,
                          compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (float32) and, if asked, dloss/dlogits * grad_scale (else an empty tensor)."""
    _check_targets(targets, logits.shape[-1], ignore_index)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    loss = _rows_loss_and_grad_triton(logits, targets, grad_scale, grad if compute_grad else None,
                                      ignore_index, label_smoothing)
    return loss, grad


cross_entropy_forward = torch.library.custom_op("minitune::cross_entropy_forward", _cross_entropy_forward,
                                                mutates_args=())


@cross_entropy_forward.register_fake
def _(logits, targets, grad_scale, ignore_index, label_smoothing, compute_grad):
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return logits.new_empty(logits.shape[0], dtype=torch.float32), grad


@triton.jit
def _scale_rows_kernel(GRAD, stride_grad, GRAD_OUTPUT, stride_go, V, BLOCK_V: tl.constexpr):
    """GRAD[row] *= GRAD_OUTPUT[row] (one value for every row when stride_go is 0), skipped where that
    is exactly 1. A plain `loss.backward()` then costs no pass over the logits, and no host sync to
    find out."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(GRAD_OUTPUT + row * stride_go).to(tl.float32)
    if g == 1.0:
        return
    g_row = GRAD + row * stride_grad
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(g_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(g_row + cols, (x * g).to(GRAD.dtype.element_ty), mask=cols < V)


def _scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (M, V) *= grad_output (one value, or one per row), in place; rows whose factor is 1 are skipped."""
    M, V = grad.shape
    if M == 0:
        return
    go = grad_output.reshape(-1)
    with launch_device(grad):
        _scale_rows_kernel[(M,)](grad, grad.stride(0), go, 0 if go.numel() == 1 else go.stride(0), V,
                                 BLOCK_V=min(triton.next_power_of_2(V), MAX_BLOCK_V),
                                 num_warps=NUM_WARPS if grad.is_cuda else 4)


scale_grad_ = torch.library.custom_op("minitune::scale_grad_", _scale_grad_, mutates_args=("grad",))


@scale_grad_.register_fake
def _(grad, grad_output):
    return None


# What both autograd Functions below share: the mean's normaliser, the reduction, the upstream
# factor of a backward that computes the gradient itself, and the one-use guard of a gradient that
# the first backward scales in place.

def _mean_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The number of targets (at least 1; a tensor, so no sync) and the gradient scale, 1/n for a mean."""
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    scale = (1.0 / n_valid.float()) if reduction == "mean" else torch.ones((), device=targets.device)
    return n_valid, scale.reshape(1)


def _reduce(loss: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.sum() / n_valid if reduction == "mean" else loss.sum()


def _backward_factor(grad_output: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The whole factor of each row's gradient: the upstream gradient, over n for a mean (float32)."""
    factor = grad_output.float().reshape(-1)
    return (factor / n_valid if reduction == "mean" else factor).contiguous()


def _use_once(ctx, what: str) -> None:
    if ctx.consumed:
        raise RuntimeError(f"{what}: a second backward through the same loss (retain_graph=True) is not "
                           "supported; the first one used up the precomputed gradient")
    ctx.consumed = True


class CrossEntropyFunction(torch.autograd.Function):
    """The gradient is computed in the forward (scaled by 1/n for a mean) and only rescaled by the
    upstream gradient in the backward, where that is not 1. fp16 is the exception: rounding p/n to
    fp16 before a loss scale is applied would flush small gradients to zero, so for fp16 the
    backward computes the gradient from the saved logits with its whole factor at once."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, grad_enabled):
        n_valid, scale = _mean_scale(targets, ignore_index, reduction)
        ctx.grad_in_forward = grad_enabled and ctx.needs_input_grad[0] and logits.dtype != torch.float16
        loss, grad = call_op(cross_entropy_forward, _cross_entropy_forward, logits, targets, scale,
                             ignore_index, label_smoothing, ctx.grad_in_forward)
        ctx.args, ctx.consumed = (ignore_index, reduction, label_smoothing), False
        ctx.save_for_backward(*((grad,) if ctx.grad_in_forward else (logits, targets, n_valid)))
        return _reduce(loss, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        ignore_index, reduction, label_smoothing = ctx.args
        if ctx.grad_in_forward:
            _use_once(ctx, "cross_entropy")
            (grad,) = ctx.saved_tensors
            call_op(scale_grad_, _scale_grad_, grad, grad_output)
        else:
            logits, targets, n_valid = ctx.saved_tensors
            _, grad = call_op(cross_entropy_forward, _cross_entropy_forward, logits, targets,
                              _backward_factor(grad_output, n_valid, reduction), ignore_index, label_smoothing, True)
        return grad, None, None, None, None, None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    _check_args(logits, targets, reduction, label_smoothing, "cross_entropy")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    loss = CrossEntropyFunction.apply(flat, targets.reshape(-1).contiguous(), ignore_index, reduction,
                                      label_smoothing, torch.is_grad_enabled())
    return loss.view(targets.shape) if reduction == "none" else loss


def _check_args(x, targets, reduction, label_smoothing, what):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{what}: reduction {reduction!r} is not one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{what}: label_smoothing {label_smoothing} is not in [0, 1]")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}: targets must hold class indices (int64 or int32); got {targets.dtype}")
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"{what}: input {tuple(x.shape)} and targets {tuple(targets.shape)} disagree: "
                         f"expected targets of shape {tuple(x.shape[:-1])}")


# ---- fused linear + cross-entropy ----

MIN_CHUNK_ROWS = 1024  # thinner chunks run the three matmuls per chunk below speed (measured on a CPU)


def default_chunk_rows(M: int, H: int, V: int) -> int:
    """Rows per chunk so that a chunk of logits (rows x V) is about as large as the hidden states,
    but never thinner than MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, triton.next_power_of_2(max(1, -(-M // -(-V // H)))))


def _add_matmul_float32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, never rounding the product to a's dtype. For bf16/fp16 on CUDA, one GEMM
    that reads and writes acc in float32 (aten's addmm with out_dtype); elsewhere the operands are
    widened to float32 first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunked_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor,
                       ignore_index: int, label_smoothing: float, compute_dhidden: bool, compute_dweight: bool,
                       chunk_rows: int, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss of hidden (M, H) @ weight (V, H)^T, and dhidden, dweight scaled row-wise by grad_scale
    (one value, or one per row); a gradient not asked for comes back empty.

    The matmuls run in hidden's dtype (a float32 weight under autocast is cast once here); dweight
    comes back in the weight's own dtype, from the float32 accumulator."""
    M, H = hidden.shape
    V = weight.shape[0]
    _check_targets(targets, V, ignore_index)
    rows_loss_and_grad = _rows_loss_and_grad_triton if use_triton else _rows_loss_and_grad_torch
    compute_grad = compute_dhidden or compute_dweight
    w = weight.to(hidden.dtype)
    loss = torch.empty(M, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if compute_dhidden else hidden.new_empty(0)
    dweight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if compute_dweight else None
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen above
        for start in range(0, M, chunk_rows):
            end = min(start + chunk_rows, M)
            h = hidden[start:end]  # (c, H)
            logits = h @ w.t()  # (c, V): the only vocabulary-sized buffer, one chunk at a time
            scale = grad_scale if grad_scale.numel() == 1 else grad_scale[start:end]
            loss[start:end] = rows_loss_and_grad(logits, targets[start:end], scale,
                                                 logits if compute_grad else None, ignore_index, label_smoothing)
            if compute_dhidden:
                torch.mm(logits, w, out=dhidden[start:end])  # (c, V) @ (V, H)
            if compute_dweight:
                _add_matmul_float32(dweight, logits.t(), h)  # (V, c) @ (c, H)
            del logits  # before the next chunk's logits exist, not after
    dweight = dweight.to(weight.dtype) if compute_dweight else weight.new_empty(0)
    return loss, dhidden, dweight


chunked_linear_ce = torch.library.custom_op("minitune::fused_linear_cross_entropy_chunks", _chunked_linear_ce,
                                           mutates_args=())


@chunked_linear_ce.register_fake
def _(hidden, weight, targets, grad_scale, ignore_index, label_smoothing, compute_dhidden, compute_dweight,
      chunk_rows, use_triton):
    return (hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            hidden.new_empty(hidden.shape) if compute_dhidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if compute_dweight else weight.new_empty(0))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """mean and sum: the gradients are computed in the forward and only scaled in the backward.
    none (each row has its own upstream gradient) and fp16 (where a loss scale applied after the
    rounding would flush small gradients to zero): the backward walks the chunks again, with the
    whole factor."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, chunk_rows, use_triton,
                grad_enabled):
        need_dh, need_dw = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        n_valid, scale = _mean_scale(targets, ignore_index, reduction)
        ctx.grad_in_forward = reduction != "none" and hidden.dtype != torch.float16
        loss, dh, dw = call_op(chunked_linear_ce, _chunked_linear_ce, hidden, weight, targets, scale,
                               ignore_index, label_smoothing, need_dh and ctx.grad_in_forward,
                               need_dw and ctx.grad_in_forward, chunk_rows, use_triton)
        ctx.args = (ignore_index, reduction, label_smoothing, chunk_rows, use_triton)
        ctx.consumed = False
        ctx.save_for_backward(*((dh, dw) if ctx.grad_in_forward else (hidden, weight, targets, n_valid)))
        return _reduce(loss, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.grad_in_forward:
            _use_once(ctx, "fused_linear_cross_entropy")
            dh, dw = ctx.saved_tensors  # scaled in place: a copy would add a weight-sized buffer to the peak
            dh = dh.mul_(grad_output) if need_dh else None
            dw = dw.mul_(grad_output) if need_dw else None
        else:
            hidden, weight, targets, n_valid = ctx.saved_tensors
            ignore_index, reduction, label_smoothing, chunk_rows, use_triton = ctx.args
            _, dh, dw = call_op(chunked_linear_ce, _chunked_linear_ce, hidden, weight, targets,
                                _backward_factor(grad_output, n_valid, reduction), ignore_index, label_smoothing,
                                need_dh, need_dw, chunk_rows, use_triton)
            dh, dw = (dh if need_dh else None), (dw if need_dw else None)
        return dh, dw, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_rows: int | None = None, use_triton: bool = True) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without the full logits; see the module docstring."""
    _check_args(hidden, targets, reduction, label_smoothing, "fused_linear_cross_entropy")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: weight {tuple(weight.shape)} must be (vocab, "
                         f"{hidden.shape[-1]}) for hidden states of width {hidden.shape[-1]}")
    if torch.is_autocast_enabled(hidden.device.type):
        # the matmuls in autocast's dtype; the weight is cast inside, so its gradient is summed in
        # float32 and handed back as float32, never rounded through bf16
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    elif hidden.dtype != weight.dtype:
        raise TypeError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    H = hidden.shape[-1]
    flat = hidden.reshape(-1, H)
    M, V = flat.shape[0], weight.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(M, H, V)
    loss = FusedLinearCrossEntropyFunction.apply(flat, weight.contiguous(), targets.reshape(-1).contiguous(),
                                                 ignore_index, reduction, label_smoothing, chunk_rows, use_triton,
                                                 torch.is_grad_enabled())
    return loss.view(targets.shape) if reduction == "none" else loss
