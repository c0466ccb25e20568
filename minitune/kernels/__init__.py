"""The training hot path's kernels: Triton on CUDA tensors, PyTorch elsewhere.

    rms_norm(x, weight, eps)                    Mistral's norm
    layer_norm(x, weight, bias, eps)            GPT-2's norm
    cross_entropy(logits, targets, ...)         loss over the vocabulary
    fused_linear_cross_entropy(hidden, weight, targets, ...)
                                                the loss of hidden @ weight.T without the full logits
    nf4_dequantize(codes, absmax, code, n, blocksize, dtype, ...)
                                                a 4-bit NormalFloat weight back to dtype (minitune.quant)
    rope(q, k, cos, sin)                        rotary positions of q and k in one launch (rotate-half)
    swiglu(gate, up)                            silu(gate) * up, recomputed in the backward

MINITUNE_KERNELS=triton|torch|auto (read at each call; default auto) forces a backend. With
TRITON_INTERPRET=1 set before minitune is imported, MINITUNE_KERNELS=triton runs the very same
Triton kernels on CPU tensors (slowly): that is how the tests check them without a GPU.

Every function returns what its PyTorch reference returns, in the reference's dtype, except that
the cross-entropy losses are float32 and a mean over no target is 0 instead of NaN. A target
outside [0, vocab) that is not ignore_index is an error on the CPU (ValueError, or torch's
IndexError); on a GPU the Triton kernel gives its row a NaN loss and gradient (a check before the
launch would cost a host sync).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._common import HAVE_TRITON
from .cross_entropy import REDUCTIONS, cross_entropy_reference, cross_entropy_triton
from .cross_entropy import fused_linear_cross_entropy as _fused_linear_ce
from .layer_norm import layer_norm_triton
from .nf4 import nf4_dequantize_reference, nf4_dequantize_triton
from .rms_norm import rms_norm_reference, rms_norm_triton
from .rope import rope_reference, rope_triton
from .swiglu import swiglu_reference, swiglu_triton

BACKENDS = ("auto", "triton", "torch")

__all__ = ["backend", "rms_norm", "layer_norm", "cross_entropy", "fused_linear_cross_entropy", "nf4_dequantize",
           "rope", "swiglu", "BACKENDS",
           "REDUCTIONS", "HAVE_TRITON"]


def backend(t: torch.Tensor) -> str:
    """'triton' or 'torch': the backend a kernel call on tensor `t` uses now."""
    choice = os.environ.get("MINITUNE_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"MINITUNE_KERNELS={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch" or (choice == "auto" and not (t.is_cuda and HAVE_TRITON)):
        return "torch"
    if not HAVE_TRITON:
        raise RuntimeError("MINITUNE_KERNELS=triton, but triton is not installed (pip install triton)")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"MINITUNE_KERNELS=triton on a {t.device.type} tensor needs a CUDA tensor, or "
                           "TRITON_INTERPRET=1 in the environment before minitune is imported")
    return "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype), statistics in float32 (Hugging Face's order)."""
    if backend(x) == "triton":
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, statistics in float32; the output has x's dtype."""
    if backend(x) == "triton":
        return layer_norm_triton(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against class indices (...); a float32 loss.

    reduction "mean" divides by the number of targets that are not `ignore_index`; "none" gives
    one loss per target, 0 where it is ignored.
    """
    if backend(logits) == "triton":
        return cross_entropy_triton(logits, targets, ignore_index, reduction, label_smoothing)
    return cross_entropy_reference(logits, targets, ignore_index, reduction, label_smoothing)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_rows: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, ...) without materialising the [tokens, vocab] logits.

    hidden (..., H), weight (V, H) (an `lm_head.weight`, tied or not), targets (...). Tokens are
    processed `chunk_rows` at a time (default: a power of two that makes a chunk of logits about the
    size of `hidden`, but at least 1024 rows). dweight is summed in float32 over the chunks.
    Both backends use the same chunked loop; the per-chunk loss and gradient is the Triton kernel
    or its PyTorch twin.
    """
    return _fused_linear_ce(hidden, weight, targets, ignore_index, reduction, label_smoothing, chunk_rows,
                            use_triton=backend(hidden) == "triton")


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                   dtype: torch.dtype, nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                   offset: torch.Tensor | None = None, nested_blocksize: int = 256) -> torch.Tensor:
    """n values, flat, in `dtype`, from NF4 codes and their block maxima (double-quantized when nested_absmax is
    given): bitsandbytes' dequantize_4bit, bit for bit. See minitune/kernels/nf4.py for the layout."""
    fn = nf4_dequantize_triton if backend(codes) == "triton" else nf4_dequantize_reference
    return fn(codes, absmax, code, n, blocksize, dtype, nested_absmax, nested_code, offset, nested_blocksize)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, nh, T, hs) and k (B, n_kv, T, hs) each turned by rotary positions, x * cos + rotate_half(x) * sin,
    with cos and sin (B or 1, T, hs) in their dtype: Hugging Face's apply_rotary_pos_emb."""
    if backend(q) == "triton":
        return rope_triton(q, k, cos, sin)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each rounded to the input dtype as F.silu and the product are: the SwiGLU MLP's middle."""
    if backend(gate) == "triton":
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)
