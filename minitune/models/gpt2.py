"""GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), top to bottom.

Learned absolute positions, pre-LayerNorm blocks, tanh GELU, an output head tied to the token
embedding. Module names are the hub's (`transformer.h.N.attn.c_attn`, ...), so state-dict keys
are the checkpoint's. The hub stores c_attn/c_proj/c_fc as Conv1D, a linear layer with its
weight transposed to (in, out); here they are nn.Linear, and the weights are transposed on
load and back on save.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..errors import UserError
from ..losses import shift_labels
from .base import CausalLM, ModelConfig
from .common import (ACTIVATIONS, KVCache, attend, attention_masks, check_inputs, checkpoint_block, embedding,
                     position_ids_from_mask)


@dataclass
class GPT2Config(ModelConfig):
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None = 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # std of the random init (pre-training from scratch)
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    def validate(self, source: str) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"{source}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(f"{source}: activation_function {self.activation_function!r} is not one of "
                            f"{sorted(ACTIVATIONS)}")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm through minitune's kernels."""

    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)  # (x - mean) / sqrt(var + eps) * w + b


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.c_attn = nn.Linear(C, 3 * C)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # applied inside attend; a module so it can be found
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.scale = 1.0 / math.sqrt(C // self.n_head) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:  # 1/(layer+1): keeps deep stacks stable in fp16
            self.scale /= layer_idx + 1
        self.layer_idx = layer_idx

    def forward(self, x, mask, cache: KVCache | None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        y = attend(q, k, v, mask, self.scale, self.attn_dropout.p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(CausalLM):
    config_class = GPT2Config
    # the causal-mask buffers old checkpoints carry; we build masks on the fly
    ignored_checkpoint_keys = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
    _conv1d = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=embedding(config.vocab_size, config.n_embd),
            wpe=embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.offload_checkpoints = False  # with gradient_checkpointing: the blocks' inputs wait in CPU memory
        self.post_init()

    def init_weights(self) -> None:
        self.tie_weights()  # to_empty unties; the head then takes the embedding's init
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:  # LayerNorm scales
                    p.fill_(1.0)
                elif name.endswith("c_proj.weight"):  # GPT-2 paper: residual projections scaled by depth
                    p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
                else:  # the other Linear and Embedding weights
                    p.normal_(0.0, std)

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                labels=None, reduction: str = "mean", logits_to_keep: int = 0, cu_seqlens=None):
        """Logits (B, T, vocab_size), or with labels (B, T) the next-token loss (see mt.losses.causal_lm_loss).

        attention_mask (B, past + T): 1 = real token, 0 = padding; a packed row numbers its examples 1, 2,
        3, ... so that each attends only to itself, from position 0. logits_to_keep > 0: only the last
        positions' logits (generation needs one). `cache` holds the keys and values of earlier calls.
        cu_seqlens: the mask's runs in the flattened batch, from collate (see Mistral.forward).
        """
        past = cache.length if cache is not None else 0
        check_inputs(input_ids, attention_mask, past)
        T = input_ids.size(1)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, T, past, input_ids.device)  # (B or 1, T)
        # learned positions end at n_positions; left padding takes none, so only a long input is checked (a sync)
        if past + T > self.config.n_positions and int(position_ids.max()) >= self.config.n_positions:
            raise UserError(f"position {int(position_ids.max())} is past n_positions {self.config.n_positions} in "
                            f"config.json (GPT-2 learned no more): feed at most {self.config.n_positions} tokens "
                            f"per row, cached ones included; got {past} cached + {T} new")
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        mask = attention_masks(x, attention_mask, cu_seqlens, T, past, {None},  # no sliding window
                               self.config.attn_pdrop if self.training else 0.0, cache is not None)[None]
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:  # keep only x; recompute the block in the backward
                x = checkpoint_block(block, x, mask, offload=self.offload_checkpoints)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if labels is not None:  # here, so DDP/FSDP see lm_head's weight used; no (B, T, vocab) logits ever
            return kernels.fused_linear_cross_entropy(x, self.lm_head.weight, shift_labels(labels),
                                                      reduction=reduction)
        return self.lm_head(x[:, -logits_to_keep:])  # (B, T, vocab); -0: every position

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, self.dtype, self.device)

    # ---- checkpoint layout: "transformer." prefix optional on the hub, Conv1D weights transposed ----

    @classmethod
    def key_from_checkpoint(cls, key: str) -> str:
        return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key

    @classmethod
    def tensor_from_checkpoint(cls, key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if cls._conv1d.search(key) else tensor  # a transpose undoes itself: saving uses it too
