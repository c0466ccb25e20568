"""minitune: a small, readable library for fine-tuning GPT-2, Mistral, Llama and Qwen models."""

from . import checkpoint, data, evaluate, freeze, kernels, lora, losses, models, optim, profiling, quant, reference, train
from .generate import generate, sample_next
from .hub import save_model
from .models import (GPT2, GPT2Config, Llama, LlamaConfig, Mistral, MistralConfig, Qwen2, Qwen2Config, Qwen3,
                     Qwen3Config, load_model)
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["checkpoint", "data", "evaluate", "freeze", "kernels", "lora", "losses", "models", "optim", "profiling", "quant",
           "reference", "train", "load_model", "save_model", "load_tokenizer", "Tokenizer", "generate", "sample_next",
           "GPT2", "GPT2Config", "Mistral", "MistralConfig", "Llama", "LlamaConfig", "Qwen2", "Qwen2Config", "Qwen3",
           "Qwen3Config", "__version__"]
