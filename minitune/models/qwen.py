"""Qwen2 / Qwen2.5 and dense Qwen3: the decoder of mistral.py with Qwen's switches.

Qwen2 puts biases on q, k and v (never on o_proj). Qwen3 drops them (unless attention_bias) and normalises
each head of q and k (q_norm, k_norm) before RoPE. Both slide their attention window only in some layers:
with use_sliding_window, the layers from max_window_layers on (or as config.json's layer_types says).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .mistral import Mistral, MistralConfig


@dataclass
class Qwen2Config(MistralConfig):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    qkv_bias = True

    # transformers' Qwen2Config defaults, for keys a config.json leaves out
    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: list[str] | None = None  # "full_attention" or "sliding_attention", per layer

    def __post_init__(self):
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None  # as transformers: the window is off unless use_sliding_window
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]

    def window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    def validate(self, source: str) -> None:
        super().validate(source)
        kinds = ("full_attention", "sliding_attention")
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(kinds):
            raise UserError(f"{source}: layer_types must name {self.num_hidden_layers} layers, each one of {kinds}; "
                            f"got {self.layer_types}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise UserError(f"{source}: layer_types has sliding_attention layers but no window (sliding_window, "
                            "with use_sliding_window true)")


@dataclass
class Qwen3Config(Qwen2Config):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    qk_norm = True

    head_dim: int | None = 128
    attention_bias: bool = False  # biases on q, k, v and o

    @property
    def qkv_bias(self) -> bool:  # Qwen3: attention_bias, on o_proj too, where Qwen2 always biases q/k/v only
        return self.attention_bias

    o_bias = qkv_bias


class Qwen2(Mistral):
    config_class = Qwen2Config


class Qwen3(Mistral):
    config_class = Qwen3Config
