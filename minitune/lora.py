"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), readable by PEFT.

A frozen linear layer W gets a trainable low-rank update:

    y = x W^T + b + scale * dropout(x) A^T B^T        A: (r, in), B: (out, r)
    scale = alpha / r   (or alpha / sqrt(r), rsLoRA: Kalajdzievski 2023)

A starts Kaiming-uniform (a = sqrt(5), nn.Linear's own init) and B at zero, so training starts from
the base model exactly. `LoRALinear` *is* an nn.Linear that keeps the base `weight` and `bias`
under their own names, so the model's state-dict keys, the fused loss and the checkpoint code see
the layer they always saw; the adapter lives beside them as `lora_A` / `lora_B`.

    mt.lora.apply_lora(model, r=8, alpha=16, target_modules=("q_proj", "v_proj"))  # only LoRA trains
    mt.lora.apply_lora(model, r=8, alpha=16, target_modules=["down_proj"])  # more layers; every adapter trains
    with mt.lora.disable_lora(model): ...     # the base model, e.g. the DPO reference
    mt.lora.merge_lora(model)                 # W += scale * B A: a plain model again, same outputs
    mt.lora.save_adapter(model, "out/adapter")   # PEFT's files: PeftModel.from_pretrained reads them
    mt.lora.load_adapter(model, "out/adapter")   # ours or PEFT's

PEFT's names: an adapter file holds `base_model.model.<module path>.lora_A.weight` (and lora_B),
where the module path is the Hugging Face one; ours are the same, so nothing is renamed. GPT-2's
c_attn is a Conv1D in transformers (weight stored (in, out)); PEFT marks it `fan_in_fan_out`, but
A and B have the same shapes either way, so the files are the same.

All or nothing: apply_lora and load_adapter check every target, setting, tensor name and shape before the
model changes; a UserError (one line: what, where, what was expected) leaves the model exactly as it was.
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
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import UserError, is_int, is_number
from .hub import save_safetensors
from .quant import NF4Linear, NF4Weight, dequantized_state, linear, parameter_numel, pass_bytes_down

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; the base weight and bias keep their names and are frozen.

    The base may be an NF4Linear (QLoRA): its 4-bit weight is adopted the same way. The adapters are
    float32 over a bfloat16, float16 or 4-bit base (PEFT's default too): their updates are small next to
    the weights, and the optimizer steps them in full precision."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are adopted, not re-made
        if r < 1:
            raise UserError(f"LoRA rank r must be at least 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)   # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.disabled = False, False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)  # F.linear, or the 4-bit matmul over an NF4Weight
        if self.merged or self.disabled:
            return y
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick their dtype themselves
            x = x.to(self.lora_A.weight.dtype)  # float32 adapters over a bf16 base: float32 maths, as PEFT's
        return y + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(y.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        pass_bytes_down(self, state_dict, prefix)  # a 4-bit base's bytes, stored at "<layer>.weight"
        super()._load_from_state_dict(state_dict, prefix, *args)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), in float32 for the merge arithmetic."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.disabled:
            raise RuntimeError("merge inside disable_lora: the block would stop being the base model")
        if isinstance(self.weight, NF4Weight):
            raise UserError("merge_lora on a 4-bit base: the sum would be rounded back to 4 bits; save_merged "
                            "dequantizes, merges and writes a full-precision checkpoint instead")
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
    """Module paths of the nn.Linear layers LoRA goes on; a UserError, naming the entry, when a target is wrong.

    "all-linear" (alone): every linear layer but the output head. A name without wildcards matches a path that
    is that name or ends in "." + name (PEFT's rule: "q_proj" is every attention's q_proj); a pattern with
    * ? [ matches the whole path (fnmatch: "model.layers.1*.self_attn.*_proj"). Every entry must match at
    least one layer, so a typo is an error, not a layer silently left out.

    A layer that already has LoRA is a LoRALinear at the layer's own path (it holds the base weight itself:
    there is no `.base` child), so a target reaches it by the same name as before; that is refused, since
    LoRA on LoRA is never meant. The layers inside a LoRALinear (its lora_A and lora_B) are the adapter,
    never a target: no name or pattern reaches them.
    """
    targets = [target_modules] if isinstance(target_modules, str) else target_modules
    if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise UserError(f"target_modules={target_modules!r}: expected 'all-linear', a module name (q_proj), an "
                        "fnmatch pattern over paths, or a non-empty list of names and patterns")
    targets = list(targets)
    if "all-linear" in targets and len(targets) > 1:
        raise UserError(f"target_modules={targets!r}: 'all-linear' means every linear layer but the head; give "
                        "it alone, or list the names instead")
    linear = _linear_layers(model)

    def matches(name: str, target: str) -> bool:
        if target == "all-linear":
            return name != "lm_head"
        if any(c in target for c in "*?["):
            return fnmatch.fnmatchcase(name, target)
        return name == target or name.endswith("." + target)

    if unmatched := [t for t in targets if not any(matches(name, t) for name in linear)]:
        leaf_names = dict.fromkeys(name.rpartition(".")[2] for name in linear)
        raise UserError(f"target_modules: {', '.join(map(repr, unmatched))} matches no linear layer; the "
                        f"model's are {_few(list(leaf_names), shown=10)}, at paths like {next(iter(linear), '(none)')}")
    found = [name for name in linear if any(matches(name, t) for t in targets)]
    if "lm_head" in found:
        raise UserError("target_modules: LoRA on lm_head is not supported: the fused loss reads lm_head.weight "
                        "directly")
    if with_lora := [name for name in found if isinstance(linear[name], LoRALinear)]:
        raise UserError(f"target_modules={target_modules!r} reaches {len(with_lora)} layer(s) that already have "
                        f"LoRA ({_few(with_lora)}): target other layers, or save_merged the model and apply LoRA "
                        "to the checkpoint it writes")
    return found


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear | NF4Linear]:
    """The model's linear layers by path, the ones with LoRA (LoRALinear) included, the adapters' own never."""
    adapters = tuple(f"{name}." for name, _ in lora_layers(model))  # lora_A, lora_B and anything else inside
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear)) and not (adapters and name.startswith(adapters))}


def _few(names: list[str], shown: int = 6) -> str:
    """'a, b, c' or 'a, b, c, ... (+37 more)': a one-line sample of a long list."""
    more = f", ... (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_settings(where: str, **settings) -> None:
    """A UserError naming `where` unless the rank, alpha and dropout fit. `settings` holds the three in that
    order, named as the user wrote them: apply_lora's r, alpha, dropout or the config's r, lora_alpha, lora_dropout."""
    (r_name, r), (alpha_name, alpha), (dropout_name, dropout) = settings.items()
    if not is_int(r) or r < 1:
        raise UserError(f"{where}: {r_name}={r!r}; the LoRA rank must be a whole number >= 1")
    if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"{where}: {alpha_name}={alpha!r}; LoRA's scale numerator must be a positive number")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise UserError(f"{where}: {dropout_name}={dropout!r}; the LoRA dropout must be in [0, 1)")


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: str | Sequence[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
               verbose: bool = True) -> nn.Module:
    """Wrap the target linear layers in LoRALinear and freeze everything else; returns the model.

    All or nothing: the settings and every target are checked first, and a UserError leaves the model exactly
    as it was. Afterwards only LoRA parameters train. On a model that already has LoRA, new targets extend it:
    the new layers are added and every adapter, old and new, trains; a target reaching a layer that already
    has LoRA (an "all-linear" included) is refused (see target_names). With verbose, prints the trainable and
    total parameter counts.
    """
    _check_settings("apply_lora", r=r, alpha=alpha, dropout=dropout)
    names = target_names(model, target_modules)
    _add_lora(model, names, r, alpha, dropout, use_rslora)
    if verbose:
        trainable, total = parameter_counts(model)
        in_all = sum(1 for _ in lora_layers(model))
        earlier = f" ({in_all} with the earlier ones)" if in_all > len(names) else ""
        print(f"LoRA r={r} on {len(names)} layers{earlier}: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.3f}%)")
    return model


def _add_lora(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
    """Wrap the (checked) layers at `names` in LoRALinear; then every adapter's parameters train, nothing else."""
    trainable_before = [(p, p.requires_grad) for p in model.parameters()]
    try:  # every wrapper is built before the model changes
        wrappers = [LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora) for name in names]
    except BaseException:
        for p, trainable in trainable_before:  # a LoRALinear freezes its base weight as it is built
            p.requires_grad_(trainable)
        raise
    for name, wrapper in zip(names, wrappers, strict=True):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
    adapters = {id(p) for _, layer in lora_layers(model) for p in (*layer.lora_A.parameters(),
                                                                    *layer.lora_B.parameters())}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    # this call's settings; the targets are every LoRA layer's, earlier calls' included
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
                         "target_modules": sorted({name.rpartition(".")[2] for name, _ in lora_layers(model)})}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, a tied weight counted once and a 4-bit weight by its values (not
    its bytes)."""
    return parameter_numel(model, trainable_only=True), parameter_numel(model)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise UserError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
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
    checkpoint that loads without PEFT. The model is left as it was, merged or not.

    Over a 4-bit base, each weight is dequantized (to the dtype the model was loaded in), the adapter's
    update added in float32 and the sum rounded once to that dtype: a plain checkpoint, one layer at a time
    on the layer's device, the whole of it on the CPU before it is written."""
    _save_full(model, out_dir, merged=True, **kwargs)


def save_model(model: nn.Module, out_dir: str | os.PathLike, merged: bool = True, **kwargs) -> None:
    """The former name of save_merged; merged=False writes the base weights without the adapters."""
    _save_full(model, out_dir, merged=merged, **kwargs)


def _save_full(model: nn.Module, out_dir: str | os.PathLike, merged: bool, **kwargs) -> None:
    """save_pretrained with the adapters merged in, or left out; never LoRA tensors in the file."""
    if any(isinstance(layer.weight, NF4Weight) for _, layer in _layers(model)):
        layers = {f"{name}.weight": layer for name, layer in _layers(model)}
        delta = (lambda key: layers[key].delta_weight() if key in layers else None) if merged else None  # noqa: E731
        model.save_pretrained(out_dir, state=dequantized_state(model, delta), **kwargs)
        return
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
        raise UserError("save_adapter: the LoRA layers differ in r, alpha or rslora; PEFT's config holds one of each")
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
    save_safetensors(tensors, out / f".{ADAPTER_WEIGHTS}.tmp", {"format": "pt"})
    os.replace(out / f".{ADAPTER_WEIGHTS}.tmp", out / ADAPTER_WEIGHTS)
    (out / f".{ADAPTER_CONFIG}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(out / f".{ADAPTER_CONFIG}.tmp", out / ADAPTER_CONFIG)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply the adapter in `adapter_dir` (saved here or by PEFT) to a model without LoRA; returns the model.

    All or nothing: the config, the tensor names and every shape are checked against the model before it
    changes, and a UserError leaves it as it was. Afterwards only the adapter trains, as after apply_lora.
    """
    folder = Path(adapter_dir)
    if with_lora := [name for name, _ in lora_layers(model)]:
        raise UserError(f"{folder}: the model already has LoRA layers ({len(with_lora)}: {_few(with_lora)}): load "
                        "the adapter onto the base model, or save_merged this model and load the adapter onto the "
                        "checkpoint it writes")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS})")
    config = _read_adapter_config(config_path)
    r = config["r"]
    try:
        tensors = {_our_key(k): v for k, v in load_file(weights_path).items()}
    except SafetensorError as e:
        raise UserError(f"{weights_path}: not a readable safetensors file ({e})") from None
    # base_model.model.<path>.lora_A.weight -> <path>; anything else in the file is not plain LoRA
    parts = (".lora_A.weight", ".lora_B.weight")
    if unexpected := sorted(k for k in tensors if not (k.startswith(PEFT_PREFIX) and k.endswith(parts))):
        raise UserError(f"{weights_path}: unexpected tensors {unexpected[:4]}; a LoRA adapter holds only "
                        f"{PEFT_PREFIX}<layer>.lora_A.weight and .lora_B.weight")
    in_file = {k.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0] for k in tensors}
    if not in_file:
        raise UserError(f"{weights_path}: holds no LoRA tensors")
    linear = _linear_layers(model)
    if unknown := sorted(name for name in in_file if name not in linear or name == "lm_head"):
        raise UserError(f"{weights_path}: the model has no linear layer LoRA can go on at {_few(unknown)} (its "
                        f"layers are at paths like {next(iter(linear), '(none)')})")
    names = [name for name in linear if name in in_file]  # in the model's order
    for name in names:
        layer = linear[name]
        for part, want in (("lora_A", (r, layer.in_features)), ("lora_B", (layer.out_features, r))):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise UserError(f"{weights_path}: missing {key} (each layer needs lora_A and lora_B)")
            if tuple(tensors[key].shape) != want:
                raise UserError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, the model's layer "
                                f"needs {want} (r={r} from {ADAPTER_CONFIG}, the layer {layer.in_features} -> "
                                f"{layer.out_features})")
    _add_lora(model, names, r, config["lora_alpha"], config.get("lora_dropout", 0.0),
              config.get("use_rslora", False))
    with torch.no_grad():
        for key, target in adapter_state_dict(model).items():
            target.copy_(tensors[key])
    return model


def _read_adapter_config(config_path: Path) -> dict:
    """adapter_config.json, checked: a plain LoRA adapter (PEFT's or ours) with usable r, alpha and dropout."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{config_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object (PEFT's adapter config), got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters load here")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise UserError(f"{config_path}: bias={config.get('bias')!r}, modules_to_save="
                        f"{config.get('modules_to_save')!r}; only plain LoRA adapters (bias 'none', no "
                        "modules_to_save) load here")
    # PEFT options that change the maths, which this LoRA does not implement: refuse rather than guess
    unsupported = {k: config[k] for k in ("use_dora", "alpha_pattern", "rank_pattern", "layers_to_transform",
                                          "lora_bias") if config.get(k)}
    if unsupported:
        raise UserError(f"{config_path}: {unsupported} are not supported here; only plain LoRA adapters load")
    if missing := [k for k in ("r", "lora_alpha") if k not in config]:
        raise UserError(f"{config_path}: no {' or '.join(missing)}; a LoRA adapter config holds r and lora_alpha")
    _check_settings(str(config_path), r=config["r"], lora_alpha=config["lora_alpha"],
                    lora_dropout=config.get("lora_dropout", 0.0))
    return config


def _our_key(peft_key: str) -> str:
    """PEFT writes `...lora_A.weight`; files from some versions keep the adapter name (`lora_A.default.weight`)."""
    return peft_key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


__all__ = ["LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "disable_lora", "save_adapter", "load_adapter",
           "save_merged", "save_model",
           "adapter_state_dict", "target_names", "lora_layers", "parameter_counts"]
