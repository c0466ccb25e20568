"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), readable by PEFT.

A frozen linear layer W gets a trainable low-rank update:

    y = x W^T + b + scale * dropout(x) A^T B^T        A: (r, in), B: (out, r)
    scale = alpha / r   (or alpha / sqrt(r), rsLoRA: Kalajdzievski 2023)

A starts Kaiming-uniform (a = sqrt(5), nn.Linear's own init) and B at zero, so training starts from
the base model exactly. `LoRALinear` *is* an nn.Linear that keeps the base `weight` and `bias`
under their own names, so the model's state-dict keys, the fused loss and the checkpoint code see
the layer they always saw; the adapter lives beside them as `lora_A` / `lora_B`.

    mt.lora.apply_lora(model, r=8, alpha=16, target_modules=("q_proj", "v_proj"))  # only LoRA trains
    with mt.lora.disable_lora(model): ...     # the base model, e.g. the DPO reference
    mt.lora.merge_lora(model)                 # W += scale * B A: a plain model again, same outputs
    mt.lora.save_adapter(model, "out/adapter")   # PEFT's files: PeftModel.from_pretrained reads them
    mt.lora.load_adapter(model, "out/adapter")   # ours or PEFT's

PEFT's names: an adapter file holds `base_model.model.<module path>.lora_A.weight` (and lora_B),
where the module path is the Hugging Face one; ours are the same, so nothing is renamed. GPT-2's
c_attn is a Conv1D in transformers (weight stored (in, out)); PEFT marks it `fan_in_fan_out`, but
A and B have the same shapes either way, so the files are the same.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; the base weight and bias keep their names and are frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are adopted, not re-made
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)   # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.disabled = False, False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), in float32 for the merge arithmetic."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.disabled:
            raise RuntimeError("merge inside disable_lora: the block would stop being the base model")
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}"


# ---------------------------------------------------------------- which layers


def target_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Module paths of the nn.Linear layers LoRA goes on.

    "all-linear": every linear layer but the output head. A name without wildcards matches a path that
    is that name or ends in "." + name (PEFT's rule: "q_proj" is every attention's q_proj); a pattern
    with * ? [ matches the whole path (fnmatch: "model.layers.1*.self_attn.*_proj").
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
              and not name.startswith("lora_") and ".lora_" not in name]

    def wanted(name: str) -> bool:
        if targets == ["all-linear"]:
            return name != "lm_head"
        return any(fnmatch.fnmatchcase(name, t) if any(c in t for c in "*?[") else
                   name == t or name.endswith("." + t) for t in targets)

    found = [name for name in linear if wanted(name)]
    if "lm_head" in found:
        raise ValueError("LoRA on lm_head is not supported: the fused loss reads lm_head.weight directly")
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer; the model's are, e.g., "
                         f"{', '.join(linear[:8])}")
    return found


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: str | Sequence[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
               verbose: bool = True) -> nn.Module:
    """Wrap the target linear layers in LoRALinear and freeze everything else; returns the model.

    Only LoRA parameters train afterwards. With verbose, prints the trainable and total parameter counts.
    """
    names = target_names(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
                         "target_modules": sorted({n.rpartition(".")[2] for n in names})}
    if verbose:
        trainable, total = parameter_counts(model)
        print(f"LoRA r={r} on {len(names)} layers: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.3f}%)")
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, a tied weight counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
    return layers


# ---------------------------------------------------------------- merge, disable


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scale * B A into each base weight: the same outputs from plain matmuls (unmerge_lora undoes it)."""
    for _, layer in _layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in _layers(model):
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is its base model (a merged adapter is taken out and put back)."""
    layers = [layer for _, layer in _layers(model)]
    before = [(layer.merged, layer.disabled) for layer in layers]  # restored as found: blocks may nest
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, (was_merged, was_disabled) in zip(layers, before, strict=True):
            layer.disabled = was_disabled
            if was_merged:
                layer.merge()


def save_merged(model: nn.Module, out_dir: str | os.PathLike, **kwargs) -> None:
    """The model with its adapters folded into the base weights, in the Hugging Face layout: a plain
    checkpoint that loads without PEFT. The model is left as it was, merged or not."""
    _save_full(model, out_dir, merged=True, **kwargs)


def save_model(model: nn.Module, out_dir: str | os.PathLike, merged: bool = True, **kwargs) -> None:
    """The former name of save_merged; merged=False writes the base weights without the adapters."""
    _save_full(model, out_dir, merged=merged, **kwargs)


def _save_full(model: nn.Module, out_dir: str | os.PathLike, merged: bool, **kwargs) -> None:
    """save_pretrained with the adapters merged in, or left out; never LoRA tensors in the file."""
    was_merged = all(layer.merged for _, layer in _layers(model))
    (merge_lora if merged else unmerge_lora)(model)
    try:
        model.save_pretrained(out_dir, **kwargs)
    finally:
        (merge_lora if was_merged else unmerge_lora)(model)


# ---------------------------------------------------------------- PEFT-format files


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's file names: base_model.model.<path>.lora_A.weight / lora_B.weight."""
    return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach()
            for name, layer in _layers(model) for part in ("lora_A", "lora_B")}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, as PEFT writes them (PeftModel.from_pretrained reads them)."""
    layers = _layers(model)
    first = layers[0][1]
    if any((layer.r, layer.alpha, layer.use_rslora) != (first.r, first.alpha, first.use_rslora) for _, layer in layers):
        raise ValueError("save_adapter: the LoRA layers differ in r, alpha or rslora; PEFT's config holds one of each")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "use_rslora": first.use_rslora,
        "target_modules": sorted({name.rpartition(".")[2] for name, _ in layers}), "bias": "none",
        # transformers' GPT-2 keeps c_attn/c_proj/c_fc as Conv1D (weight (in, out)): PEFT must be told
        "fan_in_fan_out": getattr(getattr(model, "config", None), "model_type", None) == "gpt2",
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, out / f".{ADAPTER_WEIGHTS}.tmp", metadata={"format": "pt"})
    os.replace(out / f".{ADAPTER_WEIGHTS}.tmp", out / ADAPTER_WEIGHTS)
    (out / f".{ADAPTER_CONFIG}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(out / f".{ADAPTER_CONFIG}.tmp", out / ADAPTER_CONFIG)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply the adapter in `adapter_dir` (saved here or by PEFT) to a model without LoRA; returns the model."""
    folder = Path(adapter_dir)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters load here")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"{config_path}: bias={config.get('bias')!r}, modules_to_save="
                         f"{config.get('modules_to_save')!r}; only plain LoRA adapters (bias 'none', no "
                         "modules_to_save) load here")
    # PEFT options that change the maths, which this LoRA does not implement: refuse rather than guess
    unsupported = {k: config[k] for k in ("use_dora", "alpha_pattern", "rank_pattern", "layers_to_transform",
                                          "lora_bias") if config.get(k)}
    if unsupported:
        raise ValueError(f"{config_path}: {unsupported} are not supported here; only plain LoRA adapters load")
    tensors = load_file(weights_path)
    paths = sorted({key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for key in tensors})
    apply_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
               target_modules=paths, use_rslora=config.get("use_rslora", False), verbose=False)
    expected = adapter_state_dict(model)
    renamed = {_our_key(k): v for k, v in tensors.items()}
    if missing := sorted(expected.keys() - renamed.keys()):
        raise ValueError(f"{weights_path}: missing {missing[:4]}")
    if unexpected := sorted(renamed.keys() - expected.keys()):
        raise ValueError(f"{weights_path}: unexpected {unexpected[:4]}")
    with torch.no_grad():
        for key, target in expected.items():
            if renamed[key].shape != target.shape:
                raise ValueError(f"{weights_path}: {key} has shape {tuple(renamed[key].shape)}, the model's "
                                 f"layer needs {tuple(target.shape)}")
            target.copy_(renamed[key])
    return model


def _our_key(peft_key: str) -> str:
    """PEFT writes `...lora_A.weight`; files from some versions keep the adapter name (`lora_A.default.weight`)."""
    return peft_key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


__all__ = ["LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "disable_lora", "save_adapter", "load_adapter",
           "save_merged", "save_model",
           "adapter_state_dict", "target_names", "lora_layers", "parameter_counts"]
