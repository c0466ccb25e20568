"""minitune: a small, readable library for fine-tuning GPT-2 and Mistral-family models."""

from . import models
from .generate import generate, sample_next
from .hub import load_model, save_model
from .models import GPT2, GPT2Config, Mistral, MistralConfig

__version__ = "0.1.0"

__all__ = ["models", "generate", "sample_next", "load_model", "save_model", "GPT2", "GPT2Config", "Mistral", "MistralConfig",
           "__version__"]
