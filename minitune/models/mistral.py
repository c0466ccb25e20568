"""The decoder of Mistral (7B v0.1/v0.2/v0.3, Zephyr, Nemo-style explicit head_dim), Llama 2/3.x, Qwen2/2.5 and
Qwen3, top to bottom.

Pre-RMSNorm blocks, rotary positions (rotate-half layout, so the hub's q/k weights load as
they are), grouped-query attention, a SwiGLU MLP, and an optional sliding window: a query sees
only the last `sliding_window` keys, itself included. Module names are the hub's
(`model.layers.N.self_attn.q_proj`, ...), so state-dict keys and LoRA target names match.

The other families are this decoder with a few switches, each read from config.json by the family's
config class (llama.py, qwen.py) and used here in one place:
    config.qkv_bias, config.o_bias   biases on q/k/v and on o_proj (Llama's attention_bias, Qwen2's q/k/v)
    config.mlp_bias                  biases on the MLP's three projections (Llama)
    config.qk_norm                   an RMSNorm over each head of q and k before RoPE (Qwen3)
    config.window(layer)             the layer's sliding window or None (Qwen2/3 slide only in some layers)
    config.rope_scaling              "linear", "llama3" or "yarn" rescaled frequencies (rope_frequencies)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import UserError
from ..losses import shift_labels
from .base import CausalLM, ModelConfig
from .common import (ACTIVATIONS, KVCache, attend, attention_masks, check_inputs, checkpoint_block, embedding,
                     position_ids_from_mask, warn_past_trained_length)

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class MistralConfig(ModelConfig):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    # the switches the other families set (see the module docstring): all off for Mistral
    qkv_bias = o_bias = mlp_bias = qk_norm = False

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
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn", its parameters}; None: default
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
        if self.rope_scaling:  # a copy, spelled rope_type, of a known kind
            scaling = dict(self.rope_scaling)
            scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type"))
            if scaling["rope_type"] not in ROPE_TYPES:
                raise UserError(f"rope_type {scaling['rope_type']!r} is not supported; expected one of {ROPE_TYPES}")
            if scaling["rope_type"] in ("llama3", "yarn"):  # as transformers fills it
                scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            self.rope_scaling = scaling

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx`: Mistral's is the same in every layer."""
        return self.sliding_window

    @classmethod
    def _read_nested(cls, raw: dict[str, Any], values: dict[str, Any], source: str) -> None:
        # Older config.json files keep rope_theta at the top level and a scaling in rope_scaling; newer
        # transformers write rope_parameters = {"rope_type": ..., "rope_theta": ..., the scaling's keys}.
        # As in HF, a legacy rope_scaling wins over rope_parameters, and either wins over the top-level theta.
        # rope_scaling is a field, so from_dict has already moved it into values
        scaling, parameters = values.pop("rope_scaling", None), raw.pop("rope_parameters", None)
        rope = dict(scaling or parameters or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UserError(f"{source}: rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if "rope_theta" in rope:
            values["rope_theta"] = rope.pop("rope_theta")
        if rope_type != "default":
            values["rope_scaling"] = {"rope_type": rope_type, **rope}

    def validate(self, source: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple "
                            f"of num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"{source}: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.head_dim % 2:
            raise UserError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")
        needs = {"linear": ("factor",), "yarn": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
        scaling = self.rope_scaling or {"rope_type": "default"}
        if missing := [k for k in needs.get(scaling["rope_type"], ()) if scaling.get(k) is None]:
            raise UserError(f"{source}: rope_type {scaling['rope_type']!r} needs {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # the parameters as transformers 5 writes them; a scaling also as rope_scaling beside the top-level
        # theta, the spelling older versions and other tools read (transformers 5 reads it first: the same values)
        scaling = out.pop("rope_scaling")
        out["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        if scaling:
            out["rope_scaling"] = dict(scaling)  # a copy: transformers adds keys to the dict it is given
        return out


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in float32 and cast back before the scale (as HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # x / sqrt(mean(x²) + eps) * weight; Triton on CUDA


def rope_frequencies(config: MistralConfig, device) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,), attention factor): each pair of dimensions' angle per position, and the scale
    yarn puts on cos and sin (1 otherwise); as transformers' modeling_rope_utils computes them."""
    d, theta = config.head_dim, config.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=device).float() / d)  # theta^(-2i/d)
    scaling = config.rope_scaling or {"rope_type": "default"}
    kind, factor = scaling["rope_type"], scaling.get("factor")
    if kind == "linear":  # positions squeezed by `factor`
        return inv_freq / factor, 1.0
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        context = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)  # 0 at the long end of the ramp, 1 at the short end
        ramp = (1 - smooth) * slowed / factor + smooth * slowed
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, ramp, slowed), 1.0
    if kind == "yarn":  # interpolate the slow dimensions, extrapolate the fast ones, scale cos/sin up
        context = scaling["original_max_position_embeddings"]
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `context`
            return d * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_of(fast), dim_of(slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if hi == lo else hi  # as transformers: no division by zero
        ramp = ((torch.arange(d // 2, device=device).float() - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = scaling.get("attention_factor")
        if attention is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return inv_freq, attention
    assert kind == "default", kind  # __post_init__ refuses other kinds
    return inv_freq, 1.0


def rope_cos_sin(position_ids: torch.Tensor, config: MistralConfig, dtype: torch.dtype):
    """cos and sin (B, T, head_dim) for rotate-half RoPE, computed in float32 then cast."""
    inv_freq, scale = rope_frequencies(config, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs): both halves rotate by the same angle
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        hs = config.head_dim
        self.n_head, self.n_kv, self.hs = config.num_attention_heads, config.num_key_value_heads, hs
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hs, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: each head of q and k normalised before RoPE
            self.q_norm, self.k_norm = RMSNorm(hs, config.rms_norm_eps), RMSNorm(hs, config.rms_norm_eps)
        self.attn_dropout = nn.Dropout(config.attention_dropout)  # applied inside attend; a module so it can be found
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs)  # (B, T, nh, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs)  # (B, T, n_kv, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = kernels.rope(q, k, cos, sin)  # pair dimension i with i + hs/2, turn each pair; Triton on CUDA
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hs)
        y = attend(q, k, v, mask, self.hs ** -0.5, self.attn_dropout.p if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))


class MLP(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate) each
        if self.act is F.silu:  # SwiGLU: silu(gate) * up, one kernel on CUDA
            return self.down_proj(kernels.swiglu(gate, up))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.window = config.window(layer_idx)  # which of the forward's masks this layer takes (fixed when built)

    def forward(self, x, cos, sin, masks=None, cache=None):
        mask = masks[self.window] if masks else None
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
        self.offload_checkpoints = False  # with gradient_checkpointing: the blocks' inputs wait in CPU memory
        self.post_init()

    def init_weights(self) -> None:
        self.tie_weights()  # to_empty unties; the head then takes the embedding's init
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, self.config.initializer_range)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
            if self.config.pad_token_id is not None:
                self.model.embed_tokens.weight[self.config.pad_token_id].zero_()  # as HF: padding embeds to 0

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                labels=None, reduction: str = "mean", logits_to_keep: int = 0, cu_seqlens=None):
        """Logits (B, T, vocab_size), or with labels (B, T) the next-token loss (see mt.losses.causal_lm_loss).

        attention_mask (B, past + T): 1 = real token, 0 = padding; a packed row numbers its examples 1, 2,
        3, ... so that each attends only to itself, from position 0. logits_to_keep > 0: only the last
        positions' logits (generation needs one). `cache` holds the keys and values of earlier calls.
        cu_seqlens (N + 1,) int32, from collate: the bounds of the mask's runs in the flattened batch; on a
        GPU in bf16 attention then keeps to them without building a mask (variable-length flash attention).
        """
        past = cache.length if cache is not None else 0
        check_inputs(input_ids, attention_mask, past)
        c, T = self.config, input_ids.size(1)
        warn_past_trained_length(self, past + T, c.max_position_embeddings)  # RoPE goes on, untrained: a warning
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, T, past, input_ids.device)  # (B or 1, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        masks = attention_masks(x, attention_mask, cu_seqlens, T, past, {layer.window for layer in self.model.layers},
                                c.attention_dropout if self.training else 0.0, cache is not None)  # per window
        cos, sin = rope_cos_sin(position_ids, c, x.dtype)  # (B, T, hs), once for all layers
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:  # keep only x; recompute the block in the backward
                x = checkpoint_block(layer, x, cos, sin, masks, offload=self.offload_checkpoints)
            else:
                x = layer(x, cos, sin, masks, cache)
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
