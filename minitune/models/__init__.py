"""Model families, and load_model: config.json's model_type picks the class."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import UserError
from ..hub import (CONFIG_FILE, load_state, parse_dtype, read_header, read_json, resolve_checkpoint, stored_4bit,
                   stored_dtype)
from ..quant import NF4Weight, quantizable_layers, quantize_model
from .base import CausalLM, ModelConfig
from .common import KVCache
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from .mistral import Mistral, MistralConfig
from .qwen import Qwen2, Qwen2Config, Qwen3, Qwen3Config

# model_type in config.json -> the class; Llama and Qwen are the Mistral decoder with switches
MODEL_CLASSES: dict[str, type[CausalLM]] = {"gpt2": GPT2, "mistral": Mistral, "llama": Llama, "qwen2": Qwen2,
                                            "qwen3": Qwen3}


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, quantize: str | None = None) -> CausalLM:
    """A model with the checkpoint's weights, in eval mode, from a local folder or a hub id.

    dtype None keeps the dtype the checkpoint was saved in; device None is the CPU. The model is
    built on the meta device (no memory, no random init), allocated once in `dtype` on `device`,
    and the checkpoint's tensors are streamed into it, so loading never holds two copies.

    quantize="nf4" holds every linear layer of the decoder blocks in 4-bit NF4 (mt.quant: QLoRA's
    format, bitsandbytes' bytes), each weight quantized on `device` as it is read; the embeddings,
    norms and head stay in `dtype`. A checkpoint saved by transformers with bitsandbytes 4-bit (NF4)
    loads as it is stored, with or without quantize=.
    """
    if quantize not in (None, "nf4"):
        raise UserError(f"quantize={quantize!r}: expected None or 'nf4'")
    folder, files = resolve_checkpoint(name_or_path)
    config_path = folder / CONFIG_FILE
    raw = read_json(config_path)
    model_type = raw.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise UserError(f"{config_path}: model_type {model_type!r} is not supported; "
                        f"expected one of {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[model_type]
    config = cls.config_class.from_dict(raw, source=str(config_path))
    headers = {path: read_header(path) for path in files}  # each parsed and checked once
    dtype = parse_dtype(dtype) or stored_dtype(raw, headers)

    with torch.device("meta"):
        model = cls(config)  # shapes only: no memory, no random init
    modules = dict(model.named_modules())  # a 4-bit entry for a layer the model lacks: load_state names it
    stored = [name for key in stored_4bit(headers)
              if (name := model.key_from_checkpoint(key).removesuffix(".weight")) in modules]
    if quantize or stored:  # empty NF4 layers, filled as the checkpoint streams in
        names = quantizable_layers(model) if quantize else []
        quantize_model(model, names=names + [name for name in stored if name not in names], dtype=dtype)
    _allocate(model, dtype, torch.device(device or "cpu"))
    load_state(model, headers)
    return model.eval()


def _allocate(model: CausalLM, dtype: torch.dtype, device: torch.device) -> None:
    """Give every parameter of a meta-device model real, uninitialised storage; tied ones stay tied."""
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, NF4Weight):  # filled as the checkpoint streams in (hub.load_state)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in fresh:
                fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                            requires_grad=p.requires_grad)
            setattr(module, name, fresh[id(p)])


__all__ = ["CausalLM", "ModelConfig", "KVCache", "GPT2", "GPT2Config", "Mistral", "MistralConfig", "Llama",
           "LlamaConfig", "Qwen2", "Qwen2Config", "Qwen3", "Qwen3Config", "MODEL_CLASSES", "load_model"]
