"""The Triton kernels against float64 PyTorch references, forward and backward.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1);
with one, on CUDA tensors, compiled. bf16 results are held to one unit in the last place (ulp) of
the exact value: the kernels keep their statistics in float32 and round once. The reference rounds
where the kernel rounds, in the kernel's way: to nearest on a GPU; the interpreter truncates
float32 -> bf16 casts, so there the reference truncates too.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import minitune as mt
from minitune import kernels
from minitune.kernels.cross_entropy import cross_entropy_reference
from minitune.kernels.layer_norm import layer_norm_reference
from minitune.kernels.rms_norm import rms_norm_reference
from minitune.kernels.rope import rope_reference
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

# the module, not the function of the same name that minitune.kernels exports
ce_module = importlib.import_module("minitune.kernels.cross_entropy")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("MINITUNE_KERNELS", "triton")


def kernel_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t (float64) rounded to `dtype` the way a kernel's float32 -> dtype cast does, back in float64."""
    t32 = t.float()
    if dtype == torch.bfloat16 and not CUDA:  # the interpreter truncates toward zero
        return (t32.view(torch.int32) & -65536).view(torch.float32).double()
    return t32.to(dtype).double()


def assert_close_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0, what: str = ""):
    """|actual - expected| within `ulps` units in the last place of actual's dtype at expected's size,
    plus float32 rounding of the internal arithmetic (1e-5 of the largest value)."""
    expected = expected.double()
    bits = {torch.bfloat16: 8, torch.float32: 24}[actual.dtype]
    _, exponent = torch.frexp(expected)
    ulp = torch.ldexp(torch.ones_like(expected), exponent - bits)  # spacing of dtype values at |expected|
    slack = 1e-5 * expected.abs().max().item() + 1e-12
    err = (actual.double() - expected).abs()
    bad = err > ulps * ulp + slack
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values off by more than {ulps} ulp; "
                           f"worst |error| {err.max().item():.3e}")


# ---- RMSNorm and LayerNorm ----

def rms_norm_exact(x, w, eps):
    """float64 RMSNorm with the kernel's one intermediate rounding (the normalised x, to x's dtype)."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return kernel_round(x64 * rstd, x.dtype) * w.double()


NORM_SHAPES = [(3, 5, 129), (1, 64), (4, 1000)]  # odd widths, a 3-D batch, a non-power-of-two row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm_forward_and_backward(dtype, shape):
    x = (torch.randn(shape, device=DEVICE) * 2).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype).requires_grad_()
    y = kernels.rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_ulp(y, rms_norm_exact(x.detach(), w.detach(), 1e-6), what="y")

    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(x64, w64, 1e-6).backward(dy.double())  # float64: no rounding anywhere
    assert_close_ulp(x.grad, x64.grad, what="dx")
    # dw sums dy * (normalised x, rounded as in the forward)
    xhat = kernel_round(x64.detach() * torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + 1e-6), dtype)
    dw = (dy.double() * xhat).reshape(-1, shape[-1]).sum(0)
    assert_close_ulp(w.grad, dw, what="dw")


def test_rms_norm_float32_weight_promotes_like_the_reference():
    x = torch.randn(4, 48, device=DEVICE, dtype=torch.bfloat16)
    w = torch.rand(48, device=DEVICE)
    y = kernels.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32  # as weight * x.to(bf16) in the reference
    torch.testing.assert_close(y, rms_norm_exact(x, w, 1e-5).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_layer_norm_forward_and_backward(dtype, shape):
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(shape[-1], device=DEVICE).to(dtype).requires_grad_()
    y = kernels.layer_norm(x, w, b, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = layer_norm_reference(*ref, 1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close_ulp(y, y64, what="y")
    for name, ours, exact in zip(("dx", "dw", "db"), (x.grad, w.grad, b.grad), ref):
        assert_close_ulp(ours, exact.grad, what=name)


# ---- RoPE and SwiGLU ----

def rope_inputs(dtype, B=2, T=9, nh=6, n_kv=2, hs=24, shared_positions=False):
    """q (B, nh, T, hs) and k (B, n_kv, T, hs) as the decoder makes them (transposed views of (B, T, heads, hs)),
    and rotate-half cos, sin at positions that differ by row (a left-padded batch) or are shared (B = 1)."""
    q = torch.randn(B, T, nh, hs, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, n_kv, hs, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    positions = torch.arange(T, device=DEVICE)[None] - (0 if shared_positions else torch.arange(B, device=DEVICE)[:, None])
    freqs = positions.clamp(min=0)[..., None].double() / 10000 ** (torch.arange(0, hs, 2, device=DEVICE) / hs)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B or 1, T, hs)
    return q, k, angles.cos().to(dtype), (angles.sin() * 1.1).to(dtype)  # sin scaled: cos and sin independent


def rope_exact(x, cos, sin):
    """float64 rotary positions with the kernel's roundings: each product, then the sum, to x's dtype."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[:, None], sin.double()[:, None]
    c1, c2, s1, s2 = *c.chunk(2, dim=-1), *s.chunk(2, dim=-1)
    r = lambda t: kernel_round(t, x.dtype)  # noqa: E731
    return torch.cat((r(r(x1 * c1) + r(-(x2 * s1))), r(r(x2 * c2) + r(x1 * s2))), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_positions", [False, True], ids=["per_row", "shared"])
def test_rope_forward_and_backward(dtype, shared_positions):
    q, k, cos, sin = rope_inputs(dtype, shared_positions=shared_positions)
    q_out, k_out = kernels.rope(q, k, cos, sin)
    assert q_out.dtype == dtype and q_out.shape == q.shape and q_out.stride() == q.stride()  # the input's layout
    assert_close_ulp(q_out, rope_exact(q.detach(), cos, sin), what="q")
    assert_close_ulp(k_out, rope_exact(k.detach(), cos, sin), what="k")
    if dtype == torch.float32:  # the reference's three roundings, in its order: bit for bit
        assert torch.equal(q_out, rope_reference(q.detach(), cos, sin))
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    # the backward turns dy back: dx1 = dy1 cos1 + dy2 sin2, dx2 = dy2 cos2 - dy1 sin1 (the forward, sin -> (-sin2, -sin1))
    s1, s2 = sin.chunk(2, dim=-1)
    back = torch.cat((-s2, -s1), dim=-1)
    assert_close_ulp(q.grad, rope_exact(dq, cos, back), what="dq")
    assert_close_ulp(k.grad, rope_exact(dk, cos, back), what="dk")
    if dtype != torch.float32:  # in bf16 a sum of two rounded products that cancel is many ulps off its exact value
        return
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()  # autograd, no rounding
    torch.autograd.backward((rope_reference(q64, cos.double(), sin.double()),
                             rope_reference(k64, cos.double(), sin.double())), (dq.double(), dk.double()))
    assert_close_ulp(q.grad, q64.grad, ulps=2, what="dq against autograd")
    assert_close_ulp(k.grad, k64.grad, ulps=2, what="dk against autograd")


def test_rope_under_autocast_promotes_like_the_reference():
    """bf16 q and k (an autocast linear's output) with float32 cos and sin (computed in the weights' dtype): the
    reference's products promote to float32, and so does the kernel's output; the gradients come back in bf16."""
    q, k, cos, sin = rope_inputs(torch.bfloat16)
    cos32, sin32 = rope_inputs(torch.float32)[2:]
    q_out, k_out = kernels.rope(q, k, cos32, sin32)
    assert q_out.dtype == k_out.dtype == torch.float32
    assert torch.equal(q_out, rope_reference(q.detach(), cos32, sin32))
    assert torch.equal(k_out, rope_reference(k.detach(), cos32, sin32))
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    # against float64 (the reference's autograd rounds each branch to bf16 before adding them: one more rounding)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward((rope_reference(q64, cos32.double(), sin32.double()),
                             rope_reference(k64, cos32.double(), sin32.double())), (dq.double(), dk.double()))
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16
    assert_close_ulp(q.grad, q64.grad, what="dq")
    assert_close_ulp(k.grad, k64.grad, what="dk")


def test_rope_refuses_mismatched_shapes_and_dtypes():
    q, k, cos, sin = rope_inputs(torch.float32)
    with pytest.raises(ValueError, match="cos and sin"):
        kernels.rope(q, k, cos[:, :-1], sin[:, :-1])
    with pytest.raises(ValueError, match="must share a dtype"):
        kernels.rope(q, k.double(), cos, sin)


def swiglu_exact(gate, up):
    """float64 silu(gate) * up with the kernel's roundings: silu's output, then the product, to the dtype."""
    a = kernel_round(torch.nn.functional.silu(gate.double()), gate.dtype)
    return kernel_round(a * up.double(), gate.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 129), (1, 2048), (7,)], ids=str)
def test_swiglu_forward_and_backward(dtype, shape):
    gate = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    y = kernels.swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close_ulp(y, swiglu_exact(gate.detach(), up.detach()), what="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    g64, u64 = gate.detach().double(), up.detach().double()
    s = torch.sigmoid(g64)
    a = kernel_round(g64 * s, dtype)  # the forward's rounded silu, recomputed
    assert_close_ulp(up.grad, dy.double() * a, what="dup")
    da = kernel_round(dy.double() * u64, dtype)
    assert_close_ulp(gate.grad, da * s * (1 + g64 * (1 - s)), what="dgate")


def test_swiglu_saves_its_inputs_not_the_product():
    """The backward recomputes silu(gate): autograd keeps gate and up (the reference keeps silu(gate) as well)."""
    gate = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.swiglu(gate, up)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}
    with pytest.raises(ValueError, match="one shape and dtype"):
        kernels.swiglu(gate, up[:, :32])


def test_norms_reject_a_weight_of_the_wrong_width():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="last dim 8"):
        kernels.rms_norm(x, torch.ones(6, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="last dim 8"):
        kernels.layer_norm(x, torch.ones(8, device=DEVICE), torch.zeros(7, device=DEVICE), 1e-5)


# ---- cross-entropy ----

def _ce_inputs(dtype, shape=(2, 7), V=301, ignored=((0, 3), (1, 0)), scale=3.0):
    logits = (torch.randn(*shape, V, device=DEVICE) * scale).to(dtype).requires_grad_()
    targets = torch.randint(0, V, shape, device=DEVICE)
    for index in ignored:
        targets[index] = -100
    return logits, targets


def _upstream(loss, kind):
    if kind == "one":
        return torch.ones_like(loss)
    return torch.randn_like(loss) if loss.dim() else torch.full_like(loss, 0.37)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 vocabulary entries, so a 301-wide row takes the online log-sum-exp over 5 blocks."""
    monkeypatch.setattr(ce_module, "MAX_BLOCK_V", 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", ["one", "other"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_against_float64(dtype, reduction, upstream, smoothing, small_blocks):
    logits, targets = _ce_inputs(dtype)
    loss = kernels.cross_entropy(logits, targets, reduction=reduction, label_smoothing=smoothing)
    assert loss.dtype == torch.float32 and loss.shape == (targets.shape if reduction == "none" else ())
    go = _upstream(loss, upstream)
    loss.backward(go)

    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, reduction=reduction, label_smoothing=smoothing)
    ref.backward(go.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    # An upstream gradient g other than 1 scales the already rounded gradient: a second rounding. Its
    # error is at most ulp(x * g) plus g times the first one, which can be 2 ulp(x * g) across a power
    # of two: 2 ulp in all to nearest, 3 when the interpreter truncates.
    ulps = 1 if upstream == "one" else 2 if CUDA or dtype == torch.float32 else 3
    assert_close_ulp(logits.grad, x64.grad, ulps=ulps, what="dlogits")
    assert (logits.grad[targets == -100] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_entropy_all_targets_ignored_is_zero_not_nan(reduction, backend, monkeypatch):
    monkeypatch.setenv("MINITUNE_KERNELS", backend)
    logits = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    loss = kernels.cross_entropy(logits, torch.full((3, 5), -100, device=DEVICE), reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all() and (logits.grad == 0).all()


def test_cross_entropy_confident_bf16_keeps_the_target_gradient():
    """p_target = 1 - 3e-7: bf16 softmax would round it to 1 and the gradient to 0; a float32 p - 1
    would keep one digit. The kernel keeps all of bf16's."""
    V = 301
    logits = torch.zeros(4, V, device=DEVICE)
    targets = torch.tensor([0, 7, 150, 300], device=DEVICE)
    logits[torch.arange(4), targets] = torch.tensor([21.0, 20.0, 18.0, 22.0], device=DEVICE)
    logits = logits.to(torch.bfloat16).requires_grad_()
    kernels.cross_entropy(logits, targets, reduction="sum").backward()
    x64 = logits.detach().double().requires_grad_()
    cross_entropy_reference(x64, targets, reduction="sum").backward()
    rows = torch.arange(4)
    assert (logits.grad[rows, targets] < 0).all()
    assert_close_ulp(logits.grad[rows, targets], x64.grad[rows, targets], what="target gradient")


def test_cross_entropy_bad_inputs():
    logits = torch.randn(2, 4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="reduction 'avg'"):
        kernels.cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE), reduction="avg")
    with pytest.raises(ValueError, match=r"expected targets of shape \(2, 4\)"):
        kernels.cross_entropy(logits, torch.zeros(2, 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="class indices"):
        kernels.cross_entropy(logits, torch.zeros(2, 4, device=DEVICE))
    bad = torch.zeros(2, 4, dtype=torch.long, device=DEVICE)
    bad[1, 2] = 10
    if CUDA:  # no check before the launch (it would cost a sync): the kernel makes that row NaN
        loss = kernels.cross_entropy(logits, bad, reduction="none")
        assert loss[1, 2].isnan() and not loss.view(-1)[:6].isnan().any()
    else:
        with pytest.raises(ValueError, match="target 10 at flat position 6 is outside the vocabulary"):
            kernels.cross_entropy(logits, bad)


def test_the_kernel_makes_an_out_of_vocabulary_row_nan():
    """What a GPU gives for a bad target, checked on whichever device runs the kernel."""
    logits = torch.randn(3, 10, device=DEVICE)
    grad = torch.empty_like(logits)
    targets = torch.tensor([1, 10, -100], device=DEVICE)
    loss = ce_module._rows_loss_and_grad_triton(logits, targets, torch.ones(1, device=DEVICE), grad, -100, 0.0)
    assert loss[1].isnan() and grad[1].isnan().all()
    assert loss[0].isfinite() and loss[2] == 0 and grad[[0, 2]].isfinite().all()


@pytest.mark.skipif(not CUDA, reason="needs a GPU with about 10 GB free: 2^31 logits")
def test_cross_entropy_more_than_2_31_logits():
    M, V = 16400, 131072  # M * V > 2^31: row offsets need 64 bits
    logits = torch.randn(M, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (M,), device="cuda")
    loss = kernels.cross_entropy(logits, targets, reduction="none")
    loss[-3:].sum().backward()
    tail = logits.detach()[-3:].double().requires_grad_()
    ref = cross_entropy_reference(tail, targets[-3:], reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss[-3:].double(), ref, rtol=1e-5, atol=1e-5)
    assert_close_ulp(logits.grad[-3:], tail.grad, what="last rows' gradient")


# ---- fused linear cross-entropy ----

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_linear_cross_entropy_float32(backend, reduction, smoothing, monkeypatch):
    monkeypatch.setenv("MINITUNE_KERNELS", backend)
    hidden = torch.randn(3, 13, 24, device=DEVICE, requires_grad=True)
    weight = (torch.randn(301, 24, device=DEVICE) * 0.3).requires_grad_()
    targets = torch.randint(0, 301, (3, 13), device=DEVICE)
    targets[0, :4] = -100
    loss = kernels.fused_linear_cross_entropy(hidden, weight, targets, reduction=reduction,
                                              label_smoothing=smoothing, chunk_rows=8)  # 5 chunks, the last short
    go = _upstream(loss, "other")
    loss.backward(go)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = cross_entropy_reference(h64 @ w64.t(), targets, reduction=reduction, label_smoothing=smoothing)
    ref.backward(go.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_linear_cross_entropy_bf16(backend, monkeypatch):
    """bf16 matmuls round the logits and each chunk's dweight; compare with the same bf16 logits."""
    monkeypatch.setenv("MINITUNE_KERNELS", backend)
    hidden = torch.randn(40, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(301, 32, device=DEVICE) * 0.2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 301, (40,), device=DEVICE)
    targets[::7] = -100
    loss = kernels.fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    loss.backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = cross_entropy_reference(h32 @ w32.t(), targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=2e-2, atol=2e-4)


def test_fused_linear_cross_entropy_gradients_only_where_asked():
    hidden = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    frozen = torch.randn(50, 16, device=DEVICE)  # a frozen head (LoRA): no dweight is computed
    targets = torch.randint(0, 50, (20,), device=DEVICE)
    kernels.fused_linear_cross_entropy(hidden, frozen, targets).backward()
    h = hidden.detach().requires_grad_()
    torch.nn.functional.cross_entropy(h @ frozen.t(), targets).backward()
    torch.testing.assert_close(hidden.grad, h.grad)
    with torch.no_grad():
        loss = kernels.fused_linear_cross_entropy(hidden, frozen, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ frozen.t(), targets))


def test_fused_linear_cross_entropy_under_autocast_matches_autocast_logits():
    device = "cuda" if CUDA else "cpu"
    hidden = torch.randn(24, 32, device=device, requires_grad=True)
    weight = torch.randn(97, 32, device=device, requires_grad=True)
    targets = torch.randint(0, 97, (24,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = kernels.fused_linear_cross_entropy(hidden, weight, targets)
        ref = cross_entropy_reference(hidden @ weight.t(), targets)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert weight.grad.dtype == hidden.grad.dtype == torch.float32
    # the weight's gradient is summed in float32 from the bf16 products: not rounded through bf16
    assert (weight.grad != weight.grad.bfloat16().float()).any()
    h, w = hidden.detach().bfloat16().double(), weight.detach().bfloat16().double()
    logits = (h @ w.t()).bfloat16().double().requires_grad_()  # the bf16 logits of the chunk
    cross_entropy_reference(logits, targets).backward()
    dweight = kernel_round(logits.grad, torch.bfloat16).t() @ h  # from the bf16 gradient, summed exactly
    torch.testing.assert_close(weight.grad.double(), dweight, rtol=1e-3, atol=1e-6)


def test_fused_linear_cross_entropy_bad_inputs():
    h = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"must be \(vocab, 8\)"):
        kernels.fused_linear_cross_entropy(h, torch.randn(10, 6, device=DEVICE), torch.zeros(4, dtype=torch.long,
                                                                                             device=DEVICE))
    with pytest.raises(TypeError, match="hidden is torch.float32 but weight is torch.bfloat16"):
        kernels.fused_linear_cross_entropy(h, torch.randn(10, 8, device=DEVICE, dtype=torch.bfloat16),
                                           torch.zeros(4, dtype=torch.long, device=DEVICE))


# ---- dispatch ----

def test_backend_choice(monkeypatch):
    x = torch.zeros(1, device=DEVICE)
    monkeypatch.setenv("MINITUNE_KERNELS", "torch")
    assert kernels.backend(x) == "torch"
    monkeypatch.setenv("MINITUNE_KERNELS", "auto")
    assert kernels.backend(x) == ("triton" if CUDA else "torch")
    assert kernels.backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("MINITUNE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected one of auto, triton, torch"):
        kernels.backend(x)
    monkeypatch.setenv("MINITUNE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor, or TRITON_INTERPRET=1"):
        kernels.backend(torch.zeros(1))


def test_without_triton_the_pytorch_path_still_works():
    """macOS and Windows have no Triton wheel: minitune must import and run without it."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, minitune as mt\n"
            "assert not mt.kernels.HAVE_TRITON\n"
            "x = torch.randn(3, 8)\n"
            "print(float(mt.kernels.rms_norm(x, torch.ones(8), 1e-6).sum()),"
            " float(mt.kernels.fused_linear_cross_entropy(x, torch.randn(11, 8), torch.tensor([1, 2, -100]))))\n")
    env = {k: v for k, v in os.environ.items() if k != "MINITUNE_KERNELS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr


# ---- the models on either backend ----

MODELS = {"mistral": lambda: tiny_mistral_config(), "gpt2": lambda: tiny_gpt2_config()}  # gpt2: tied head


@pytest.mark.parametrize("name", MODELS)
def test_models_give_the_same_logits_loss_and_gradients_on_either_backend(name, tmp_path, monkeypatch):
    save_hf(MODELS[name](), tmp_path)
    model = mt.load_model(tmp_path, device=DEVICE)
    ids = torch.randint(3, 101, (2, 12), device=DEVICE)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MINITUNE_KERNELS", backend)
        model.zero_grad()
        logits = model(ids)
        loss = mt.losses.causal_lm_loss(model, ids, labels)
        loss.backward()
        results[backend] = logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    # the naive path: the full logits, shifted, torch's cross-entropy (through the head, tied or not)
    monkeypatch.setenv("MINITUNE_KERNELS", "torch")
    model.zero_grad()
    naive = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1))
    naive.backward()
    grads_naive = {n: p.grad.clone() for n, p in model.named_parameters()}
    (logits_t, loss_t, grads_t), (logits_k, loss_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_t, naive.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in grads_naive.items():
        for backend, grads in (("torch", grads_t), ("triton", grads_k)):
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, backend=backend: f"{backend}, {name}: {m}")


def test_causal_lm_loss_runs_through_forward_so_ddp_and_fsdp_hooks_see_it(tmp_path):
    save_hf(tiny_gpt2_config(), tmp_path)
    model = mt.load_model(tmp_path, device=DEVICE)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append("forward"))
    mt.losses.causal_lm_loss(model, torch.randint(3, 101, (1, 6), device=DEVICE))
    assert calls == ["forward"]


def test_causal_lm_loss_without_labels_skips_padding(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITUNE_KERNELS", "torch")
    save_hf(tiny_mistral_config(), tmp_path)
    model = mt.load_model(tmp_path, device=DEVICE)
    ids = torch.randint(3, 101, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    loss = mt.losses.causal_lm_loss(model, ids, attention_mask=mask, reduction="none")
    assert loss.shape == (2, 10)
    assert (loss[1, 6:] == 0).all() and (loss[0, :-1] > 0).all() and loss[0, -1] == 0
    with pytest.raises(ValueError, match="labels"):
        mt.losses.causal_lm_loss(model, ids, labels=ids[:, :5])


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_traces_the_kernels_without_graph_breaks(name, tmp_path):
    """fullgraph=True fails on any graph break: the custom ops keep the Triton launches opaque."""
    save_hf(MODELS[name](), tmp_path)
    model = mt.load_model(tmp_path, device=DEVICE)
    ids = torch.randint(3, 101, (2, 8), device=DEVICE)

    def step(ids):
        logits = model(ids)
        return logits, mt.losses.causal_lm_loss(model, ids) + kernels.cross_entropy(logits[:, :-1], ids[:, 1:])

    logits, loss = step(ids)
    torch._dynamo.reset()
    compiled_logits, compiled_loss = torch.compile(step, backend="aot_eager", fullgraph=True)(ids)
    torch.testing.assert_close(compiled_logits, logits)
    torch.testing.assert_close(compiled_loss, loss)
    grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_fused_linear_cross_entropy_second_backward_is_a_clear_error():
    hidden = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    loss = kernels.fused_linear_cross_entropy(hidden, torch.randn(10, 4, device=DEVICE),
                                              torch.randint(0, 10, (8,), device=DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_cross_entropy_second_backward_is_a_clear_error():
    logits = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    loss = kernels.cross_entropy(logits, torch.randint(0, 10, (6,), device=DEVICE)) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_and_int32_targets(backend, monkeypatch):
    monkeypatch.setenv("MINITUNE_KERNELS", backend)
    logits = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    both = torch.randint(0, 40, (6, 2), device=DEVICE)
    targets = both[:, 1]  # stride 2
    expected = torch.nn.functional.cross_entropy(logits, targets)
    for t in (targets, targets.int()):
        torch.testing.assert_close(kernels.cross_entropy(logits, t), expected)
        torch.testing.assert_close(kernels.fused_linear_cross_entropy(logits, torch.eye(40, device=DEVICE), t),
                                   expected)


def test_norms_on_non_contiguous_inputs_and_weights():
    x = torch.randn(16, 4, 6, device=DEVICE).permute(2, 1, 0)  # (6, 4, 16), last dim strided
    w, b = torch.randn(32, device=DEVICE)[::2], torch.randn(32, device=DEVICE)[::2]  # stride 2
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))


def test_fp16_gradients_survive_a_loss_scale():
    """With a mean over 512 targets, p / n is below fp16's smallest value for most classes: rounded
    to fp16 before a loss scale of 65536 is applied, those gradients would be 0. fp16 gets its
    gradient computed with the whole factor at once."""
    M, V, S = 512, 64, 65536.0
    logits = (torch.randn(M, V, device=DEVICE) * 4).half().requires_grad_()
    targets = torch.randint(0, V, (M,), device=DEVICE)
    (kernels.cross_entropy(logits, targets) * S).backward()
    x64 = logits.detach().double().requires_grad_()
    (cross_entropy_reference(x64, targets) * S).backward()
    exact = x64.grad
    assert (logits.grad[exact.abs() > 1e-6] != 0).all()  # nothing representable was flushed to 0
    torch.testing.assert_close(logits.grad.double(), exact, rtol=2e-3, atol=1e-6)

    hidden = torch.randn(M, 16, device=DEVICE).half().requires_grad_()
    weight = torch.randn(V, 16, device=DEVICE).half().requires_grad_()
    (kernels.fused_linear_cross_entropy(hidden, weight, targets) * S).backward()
    h64, w64 = hidden.detach().double(), weight.detach().double()
    fp16_logits = (h64 @ w64.t()).half().double().requires_grad_()  # what the fp16 matmul gives, to rounding
    (cross_entropy_reference(fp16_logits, targets) * S).backward()
    dhidden = fp16_logits.grad @ w64
    assert (hidden.grad[dhidden.abs() > 1e-3] != 0).all()
    # fp16 rounds the gradient of each logit (2^-11) before the matmul sums 64 of them
    torch.testing.assert_close(hidden.grad.double(), dhidden, rtol=2e-2, atol=0.1)


def test_no_gradient_work_without_autograd(monkeypatch):
    """Under no_grad, needs_input_grad still says True: the kernels must not build gradients then."""
    asked = []
    real = ce_module._rows_loss_and_grad_triton
    monkeypatch.setattr(ce_module, "_rows_loss_and_grad_triton",
                        lambda logits, t, s, grad, *a: asked.append(grad is not None) or real(logits, t, s, grad, *a))
    logits = torch.randn(8, 30, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 30, (8,), device=DEVICE)
    with torch.no_grad():
        kernels.cross_entropy(logits, targets)
        kernels.fused_linear_cross_entropy(logits, torch.eye(30, device=DEVICE, requires_grad=True), targets)
    assert asked == [False, False]
