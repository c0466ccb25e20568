"""What GPT-2 and Mistral share: input checks, positions, masks, SDPA, the KV cache, activations,
activation checkpointing.

Both families are causal decoders fed the same way: `input_ids` [B, T], an optional
`attention_mask` over every key position seen so far (cached ones included, as in Hugging Face),
and optional `position_ids`. The mask is 0 for padding and 1 for a real token; a packed row (several
examples end to end, see `minitune.data.pack`) numbers its examples 1, 2, 3, ... instead, and then
a token attends only within its own example and positions restart at each. The helpers here turn
those into what `F.scaled_dot_product_attention` wants, and fall back to its fast `is_causal=True`
path whenever no explicit mask is needed. On a GPU a collated batch's `cu_seqlens` (the boundaries of
its examples and padding runs in the flattened rows, see `minitune.data.collate`) take the place of
the mask: flash attention's variable-length kernel keeps each sequence to itself, no (T, T) mask built.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    from torch.nn.attention.varlen import varlen_attn  # flash attention over sequences laid end to end
except ImportError:  # torch before 2.10: masks everywhere
    varlen_attn = None
# torch 2.10 and 2.11's varlen_attn has no enable_gqa: shared KV heads are repeated for it
VARLEN_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters

# config.json's activation names -> functions. GPT-2's "gelu_new" is the tanh approximation.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """nn.Embedding without its own random init: the model's init_weights gives it one.

    On the meta device (load_model) nn.Embedding's normal_ would go through torch's Python
    reference kernels and import the compiler stack: seconds per load for nothing.
    """
    return nn.Embedding(num, dim, padding_idx, _weight=torch.empty(num, dim))


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_len: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point():
        raise TypeError(f"input_ids must hold integer token ids; got {input_ids.dtype}")
    if attention_mask is not None:
        want = (input_ids.size(0), past_len + input_ids.size(1))
        if tuple(attention_mask.shape) != want:
            raise ValueError(f"attention_mask must be (batch, past + seq_len) = {want}, covering cached "
                             f"tokens too; got {tuple(attention_mask.shape)}")


def warn_past_trained_length(model: nn.Module, length: int, limit: int) -> None:
    """Warn, once per model, when a sequence of `length` tokens (cached ones and padding included) runs
    past `limit`, config.json's max_position_embeddings.

    Rotary positions go on at any length, so nothing fails; but the model never saw such distances in
    training, and its outputs there are usually poor. `length` is a Python int: no device sync.
    """
    if length > limit and not model.__dict__.get("_warned_past_trained_length"):
        model._warned_past_trained_length = True
        warnings.warn(f"{type(model).__name__}: a sequence of {length} tokens runs past max_position_embeddings "
                      f"{limit} in config.json, the length the model was trained for; outputs there are unreliable",
                      stacklevel=2)  # points at the asker: the forward, or generate before any work


def position_ids_from_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int,
                           device: torch.device) -> torch.Tensor:
    """Positions of the `q_len` new tokens: (1, T) without a mask, else (B, T).

    With a mask, a token's position is its distance from the start of its run of equal mask values:
    a left-padded row sees the same positions as the unpadded sequence (what HF's `generate` does),
    and each example of a packed row starts again at 0. Padding gets position 0; its outputs are
    never used. A row's real tokens (an example's, when packed) must be contiguous.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)
    mask = attention_mask.long()  # (B, past + T)
    idx = torch.arange(mask.size(-1), device=device).expand_as(mask)
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]  # the first token of a run (padding, or an example)
    pos = idx - torch.where(starts, idx, 0).cummax(-1).values
    return pos[:, -q_len:].masked_fill(mask[:, -q_len:] == 0, 0)


def attention_bias(attention_mask: torch.Tensor | None, q_len: int, past_len: int,
                   sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, Tq, Tk), True = may attend, or None when plain causal suffices.

    Query i (absolute index past_len + i) sees key j when j <= i, when j > i - sliding_window
    (HF's rule: the window counts the query itself, so exactly `sliding_window` keys), and when key j
    carries query i's mask value: a real token (1) sees real tokens, each example of a packed row
    (1, 2, 3, ...) only its own, a padding query (0) the padding before it and itself (its output is
    never read; it must see some key, or SDPA returns NaN). Indices are positions in the padded row;
    since an example's tokens are contiguous, index distance equals position distance, as in the
    reference. One rule for padded and packed rows, so nothing about the mask's values is read back
    from the device: the forward never waits for the GPU. Without a mask, attention is plain causal,
    and SDPA may take its flash kernels; a collated batch always has a mask (on a GPU in bf16 its
    cu_seqlens replace it: see Varlen).
    """
    k_len = past_len + q_len
    window = sliding_window if sliding_window is not None and k_len > sliding_window else None  # does it bite?
    if attention_mask is None:
        return None if window is None and (past_len == 0 or q_len == 1) else _causal(q_len, past_len, window, device)
    segment = attention_mask.long()  # (B, Tk): 0 padding, 1 real, or a packed row's example ids
    same = segment[:, None, past_len:, None] == segment[:, None, None, :]  # (B, 1, Tq, Tk)
    return _causal(q_len, past_len, window, device) & same


def _causal(q_len: int, past_len: int, sliding_window: int | None, device) -> torch.Tensor:
    q_idx = torch.arange(past_len, past_len + q_len, device=device)[:, None]  # (Tq, 1)
    k_idx = torch.arange(past_len + q_len, device=device)[None, :]  # (1, Tk)
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (k_idx > q_idx - sliding_window)
    return allowed[None, None]  # (1, 1, Tq, Tk)


# SDPA's enable_gqa (torch >= 2.5) shares KV heads without copies, but only the flash and math
# backends take it: with an explicit mask it would push CUDA off the memory-efficient kernel.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class Varlen:
    """In place of a mask: the sequences of the flattened (B * T) batch, cu_seqlens (N + 1,) int32 their bounds,
    each attending causally within itself (and the last `window` keys, when a sliding window is set)."""
    cu_seqlens: torch.Tensor
    max_seqlen: int  # an upper bound is enough (the row length, from a shape: nothing read back)
    window: int | None


def _cuda_compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype CUDA matmuls run in: autocast's, or the tensor's own."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else t.dtype


def use_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether attention can run as variable-length flash attention: a CUDA batch in bf16 or fp16 (under autocast
    or not) whose collate gave its sequences' bounds, and no attention dropout (the kernel has none)."""
    if cu_seqlens is None or varlen_attn is None or not x.is_cuda or dropout_p:
        return False
    return _cuda_compute_dtype(x) in (torch.bfloat16, torch.float16)


def attention_masks(x: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                    q_len: int, past_len: int, windows: set, dropout_p: float, cached: bool) -> dict:
    """What each layer's attention takes, one entry per sliding window in use (None: no window): the batch's
    sequence bounds (Varlen) where variable-length flash attention can run (no KV cache), else
    attention_bias's mask, or None for plain causal attention."""
    if not cached and use_varlen(x, cu_seqlens, dropout_p):
        return {window: Varlen(cu_seqlens, q_len, window) for window in windows}
    return {window: attention_bias(attention_mask, q_len, past_len, window, x.device) for window in windows}


def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Varlen, scale: float) -> torch.Tensor:
    """q (B, nh, T, hs), k and v (B, n_kv, T, hs) as the flattened batch's sequences: (B, nh, T, hs)."""
    B, nh, T, hs = q.shape
    # varlen_attn is a custom op, which autocast does not cast: float32 q and k (RoPE with float32 cos) go to bf16
    dtype = _cuda_compute_dtype(v)
    shared = k.size(1) != nh
    if shared and not VARLEN_GQA:
        k, v = (t.repeat_interleave(nh // t.size(1), dim=1) for t in (k, v))  # (B, nh, T, hs)
    flat = [t.transpose(1, 2).reshape(B * T, t.size(1), hs).to(dtype) for t in (q, k, v)]  # (B * T, heads, hs)
    window = (-1, 0) if seqs.window is None else (seqs.window - 1, 0)  # causal; W keys, the query's own included
    gqa = {"enable_gqa": True} if shared and VARLEN_GQA else {}
    y = varlen_attn(*flat, seqs.cu_seqlens, seqs.cu_seqlens, seqs.max_seqlen, seqs.max_seqlen, scale=scale,
                    window_size=window, **gqa)  # (B * T, nh, hs)
    return y.view(B, T, nh, hs).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Varlen | None,
           scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA over q (B, nh, Tq, hs) and k, v (B, n_kv, Tk, hs): (B, nh, Tq, hs)."""
    if isinstance(mask, Varlen):
        return attend_varlen(q, k, v, mask, scale)
    is_causal = mask is None and q.size(2) == k.size(2) and q.size(2) > 1
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1 and mask is None and _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=True)
    if n_rep > 1:
        # (B, n_kv, Tk, hs) -> (B, nh, Tk, hs): each KV head serves n_rep consecutive query heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale)


def checkpoint_block(block: nn.Module, x: torch.Tensor, *args, offload: bool = False) -> torch.Tensor:
    """block(x, *args), keeping only its inputs for the backward, which runs the block again.

    offload: x, the block's (B, T, C) input, waits for the backward in CPU memory instead of the device's,
    copied out and back in stream order (pinned memory, no host sync). A 7B model's 32 checkpoints of a
    2 x 2048 batch in bf16 are 1.07 GB of GPU memory; each copy costs PCIe time instead. The other inputs
    (the RoPE tables, the masks) are shared by every block and stay where they are."""
    if not offload:
        return checkpoint(block, x, *args, use_reentrant=False)
    x_id = id(x)  # not x: autograd keeps the hooks until the backward, and they must not keep x alive
    pack = lambda saved: _to_host(saved) if id(saved) == x_id else saved  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, _to_device):
        return checkpoint(block, x, *args, use_reentrant=False)  # saves its inputs through the hooks above


def _to_host(x: torch.Tensor):
    """Pack hook: the block's input to CPU memory."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)  # pinned: the copy can run asynchronously
    host.copy_(x, non_blocking=True)  # queued behind the kernels that made x, ahead of any that reuse its memory
    return x.device, host


def _to_device(packed):
    """Unpack hook: the input back on its device for the recomputation."""
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


class KVCache:
    """Keys and values of past tokens, pre-allocated for generation (never used in training).

    One buffer per layer of shape (B, n_kv, max_len, hs). `update` writes the new tokens of a
    layer and returns the keys/values seen so far; `advance` moves the fill mark once every
    layer has written.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens stored so far

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} tokens; {end} were asked for")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, past + T, hs)

    def advance(self, n: int) -> None:
        self.length += n
