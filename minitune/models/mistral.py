"""Mistral (7B v0.1/v0.2/v0.3, Zephyr, Nemo-style explicit head_dim), top to bottom.

Pre-RMSNorm blocks, rotary positions (rotate-half layout, so the hub's q/k weights load as
they are), grouped-query attention, a SwiGLU MLP, and an optional sliding window: a query sees
only the last `sliding_window` keys, itself included. Module names are the hub's
(`model.layers.N.self_attn.q_proj`, ...), so state-dict keys and LoRA target names match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..errors import UserError
from ..losses import shift_labels
from .base import CausalLM, ModelConfig
from .common import (ACTIVATIONS, KVCache, attend, attention_bias, check_inputs, embedding, position_ids_from_mask,
                     warn_past_trained_length)


@dataclass
class MistralConfig(ModelConfig):
    model_type = "mistral"
    architecture = "MistralForCausalLM"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    attention_dropout: float = 0.0
    initializer_range: float = 0.02  # std of the random init (pre-training from scratch)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @classmethod
    def _read_nested(cls, raw: dict[str, Any], values: dict[str, Any], source: str) -> None:
        # Older config.json files keep rope_theta at the top level; newer transformers write
        # rope_parameters = {"rope_type": "default", "rope_theta": ...}. As in HF, a legacy
        # rope_scaling wins over rope_parameters, and either wins over the top-level theta.
        scaling, parameters = raw.pop("rope_scaling", None), raw.pop("rope_parameters", None)
        rope = scaling or parameters or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]

    def validate(self, source: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple "
                            f"of num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"{source}: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.head_dim % 2:
            raise UserError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # both spellings, so old and new transformers read the same theta
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return out


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in float32 and cast back before the scale (as HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # x / sqrt(mean(x²) + eps) * weight; Triton on CUDA


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin (B, T, head_dim) for rotate-half RoPE, computed in float32 then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs): both halves rotate by the same angle
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs): pair dimension i with i + hs/2 and rotate each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        hs = config.head_dim
        self.n_head, self.n_kv, self.hs = config.num_attention_heads, config.num_key_value_heads, hs
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * hs, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * hs, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * hs, bias=False)
        self.o_proj = nn.Linear(self.n_head * hs, config.hidden_size, bias=False)
        self.attn_dropout = nn.Dropout(config.attention_dropout)  # applied inside attend; a module so it can be found
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hs)
        y = attend(q, k, v, mask, self.hs ** -0.5, self.attn_dropout.p if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))


class MLP(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Mistral(CausalLM):
    config_class = MistralConfig
    ignored_checkpoint_keys = (r"\.rotary_emb\.inv_freq$",)  # a buffer some old checkpoints saved

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def init_weights(self) -> None:
        self.tie_weights()  # to_empty unties; the head then takes the embedding's init
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, self.config.initializer_range)
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
            if self.config.pad_token_id is not None:
                self.model.embed_tokens.weight[self.config.pad_token_id].zero_()  # as HF: padding embeds to 0

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                labels=None, reduction: str = "mean", logits_to_keep: int = 0):
        """Logits (B, T, vocab_size), or with labels (B, T) the next-token loss (see mt.losses.causal_lm_loss).

        attention_mask (B, past + T): 1 = real token, 0 = padding; a packed row numbers its examples 1, 2,
        3, ... so that each attends only to itself, from position 0. logits_to_keep > 0: only the last
        positions' logits (generation needs one). `cache` holds the keys and values of earlier calls.
        """
        past = cache.length if cache is not None else 0
        check_inputs(input_ids, attention_mask, past)
        c, T = self.config, input_ids.size(1)
        warn_past_trained_length(self, past + T, c.max_position_embeddings)  # RoPE goes on, untrained: a warning
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, T, past, input_ids.device)  # (B or 1, T)
        mask = attention_bias(attention_mask, T, past, c.sliding_window, input_ids.device)  # None: plain causal
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, x.dtype)  # (B, T, hs), once for all layers
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:  # keep only x; recompute the block in the backward
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)  # (B, T, C)
        if labels is not None:  # here, so DDP/FSDP see lm_head's weight used; no (B, T, vocab) logits ever
            return kernels.fused_linear_cross_entropy(x, self.lm_head.weight, shift_labels(labels),
                                                      reduction=reduction)
        return self.lm_head(x[:, -logits_to_keep:])  # (B, T, vocab); -0: every position

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       self.dtype, self.device)
