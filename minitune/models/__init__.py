"""Model families, picked by config.json's model_type."""

from .base import CausalLM, ModelConfig
from .common import KVCache
from .gpt2 import GPT2, GPT2Config
from .mistral import Mistral, MistralConfig

MODEL_CLASSES: dict[str, type[CausalLM]] = {"gpt2": GPT2, "mistral": Mistral}


def load_model(name_or_path, dtype=None, device=None) -> CausalLM:
    """See minitune.hub.load_model."""
    from ..hub import load_model as _load
    return _load(name_or_path, dtype=dtype, device=device)


__all__ = ["CausalLM", "ModelConfig", "KVCache", "GPT2", "GPT2Config", "Mistral", "MistralConfig",
           "MODEL_CLASSES", "load_model"]
