"""Llama 2, 3, 3.1, 3.2 and 3.3: the decoder of mistral.py without a sliding window, with Llama's two bias
switches. Everything else (GQA, explicit head_dim, tied embeddings in 3.2 1B/3B, the "llama3" RoPE scaling
of 3.1+, several EOS ids) is read from config.json by the shared config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .mistral import Mistral, MistralConfig


@dataclass
class LlamaConfig(MistralConfig):
    model_type = "llama"
    architecture = "LlamaForCausalLM"

    # transformers' LlamaConfig defaults, for keys a config.json leaves out
    intermediate_size: int = 11008
    num_key_value_heads: int | None = None  # None = num_attention_heads
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # kept if a file has it, but Llama never slides (window() below)
    attention_bias: bool = False  # biases on q, k, v and o
    mlp_bias: bool = False  # biases on gate, up and down

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    o_bias = qkv_bias

    def window(self, layer_idx: int) -> int | None:
        return None  # as transformers' Llama, whatever config.json says

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["sliding_window"] is None:
            del out["sliding_window"]  # not a Llama key, unless the file had it
        return out


class Llama(Mistral):
    config_class = LlamaConfig
