"""Which parameters train, and how fast: freezing, gradual unfreezing and discriminative learning rates.

The three transfer-learning tools of ULMFiT (Howard & Ruder 2018, "Universal Language Model
Fine-tuning for Text Classification"), on a model seen as a stack of layer groups, bottom to top:

    embeddings | block 0 | block 1 | ... | block N-1 | head (final norm, and lm_head when untied)

    freeze(model, embeddings=True, first_k_blocks=2)          # or patterns=["*.mlp.*"]
    groups = discriminative_param_groups(model, lr=1e-3)      # group g from the top: lr / 2.6**g
    optimizer = torch.optim.AdamW(groups)
    for step in ...:
        gradual_unfreeze(model, step, every=50)               # head + top block, then one more group per 50 steps

A tied head is the embedding matrix itself, so it belongs to the embeddings group (the bottom one).
The optimizer holds every parameter from the start: a frozen one gets no gradient, and AdamW keeps no
state for a parameter without a gradient, so it costs nothing until it is unfrozen, and unfreezing a
group later leaves every other parameter's moments as they were.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from .errors import UserError
from .optim import decay_groups
from .quant import is_quantized

ULMFIT_FACTOR = 2.6  # ULMFiT's ratio between the learning rates of neighbouring layer groups


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, bottom to top (GPT-2's transformer.h, Mistral's model.layers)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList of blocks")


def layer_groups(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """[(group name, [(parameter name, parameter), ...]), ...] bottom to top: "embeddings", "block.0" ...
    "block.{N-1}", "head". Every parameter is in exactly one group (a tied one once, in the embeddings)."""
    if is_quantized(model):
        raise UserError("freezing and unfreezing schedules need a full-precision model: a 4-bit base (QLoRA) "
                        "trains only through LoRA adapters")
    stack = blocks(model)
    prefix = next(name for name, m in model.named_modules() if m is stack)
    groups = {"embeddings": []} | {f"block.{i}": [] for i in range(len(stack))} | {"head": []}
    seen_blocks = False
    for name, p in model.named_parameters():  # each Parameter once: a tied head is its embedding
        if name.startswith(prefix + "."):
            index = int(name[len(prefix) + 1:].split(".")[0])
            groups[f"block.{index}"].append((name, p))
            seen_blocks = True
        else:
            groups["head" if seen_blocks else "embeddings"].append((name, p))
    return list(groups.items())


def freeze(model: nn.Module, embeddings: bool = False, first_k_blocks: int = 0,
           patterns: Sequence[str] = ()) -> list[str]:
    """Freeze the embeddings (and a head tied to them), the first k blocks, and parameters whose names
    match any fnmatch pattern ("*.attn.*"); returns the names frozen."""
    groups = dict(layer_groups(model))
    n_blocks = len(groups) - 2
    if not 0 <= first_k_blocks <= n_blocks:
        raise UserError(f"first_k_blocks={first_k_blocks}: the model has {n_blocks} blocks")
    chosen = [name for name, _ in groups["embeddings"]] if embeddings else []
    for i in range(first_k_blocks):
        chosen += [name for name, _ in groups[f"block.{i}"]]
    named = dict(model.named_parameters())
    for pattern in patterns:
        matched = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise UserError(f"freeze pattern {pattern!r} matches no parameter; names look like {next(iter(named))}")
        chosen += matched
    for name in chosen:
        named[name].requires_grad_(False)
    return sorted(set(chosen))


def discriminative_param_groups(model: nn.Module, lr: float, factor: float = ULMFIT_FACTOR,
                                weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups with discriminative learning rates: the head gets `lr`, the group below it
    lr / factor, the next lr / factor**2, ... down to the embeddings. Each layer group is split into
    decay / no_decay as optim.param_groups does. Every parameter is in, frozen or not (see the module
    docstring); each group's "name" is "<layer group>/decay" or "<layer group>/no_decay"."""
    if factor < 1:
        raise ValueError(f"factor must be at least 1 (lower groups learn slower), got {factor}")
    out = []
    for depth, (group, params) in enumerate(reversed(layer_groups(model))):
        out += decay_groups(model, [p for _, p in params], weight_decay, name=f"{group}/", lr=lr / factor ** depth)
    return out


def unfrozen_groups(step: int, every: int, n_groups: int) -> int:
    """How many layer groups, from the top, train at `step`: 2 (head and top block) at first, one more every
    `every` steps, all of them in the end."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    return min(n_groups, 2 + step // every)


def gradual_unfreeze(model: nn.Module, step: int, every: int) -> int:
    """Set requires_grad for `step` of a gradual-unfreezing schedule; returns the number of open groups.

    Call it before each step's forward (with every = steps per epoch for ULMFiT's one group an epoch).
    Only the top groups open; parameters frozen by other means in them are opened too."""
    groups = layer_groups(model)
    open_groups = unfrozen_groups(step, every, len(groups))
    for i, (_, params) in enumerate(reversed(groups)):
        for _, p in params:
            p.requires_grad_(i < open_groups)
    return open_groups


__all__ = ["ULMFIT_FACTOR", "blocks", "layer_groups", "freeze", "discriminative_param_groups", "unfrozen_groups",
           "gradual_unfreeze"]
