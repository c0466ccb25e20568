"""Parameter groups for AdamW and learning-rate schedules, shared by every training loop.

A loop builds both from the model and its flags:

    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    scheduler = make_scheduler(optimizer, "cosine", warmup_steps=100, total_steps=2000)
    for step in range(2000):
        ...; optimizer.step(); scheduler.step()

Both resume from their state dicts (`optimizer.state_dict()`, `scheduler.state_dict()`), which hold
only tensors, numbers and strings, so `torch.load(..., weights_only=True)` reads them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: "decay" for the matrices of the linear layers, "no_decay" for everything else.

    Weight decay pulls weights toward zero to keep the matrices that mix features small. Biases and
    norm scales (every parameter with ndim < 2) only shift and scale, and shrinking a norm's scale
    toward zero just fights the norm. Embedding rows are skipped too: a row gets a gradient only in
    the steps its token appears in, but decay shrinks it every step, so rare tokens would fade.
    A head tied to the embedding is the embedding's Parameter and so is not decayed either.

    Frozen parameters (requires_grad=False) are left out, so the optimizer keeps no state for them.
    Each parameter appears once (model.parameters() yields a tied one once), in model order, so the
    optimizer's state dict lines up across runs. An empty group is dropped.
    """
    return decay_groups(model, [p for p in model.parameters() if p.requires_grad], weight_decay)


def decay_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float, name: str = "",
                 **options) -> list[dict]:
    """`params` split into a "<name>decay" and a "<name>no_decay" group by param_groups' rule (matrices
    of linear layers decay; biases, norms and embeddings of `model` do not), each with `options`."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [dict(name=f"{name}decay", params=decay, weight_decay=weight_decay, **options),
              dict(name=f"{name}no_decay", params=no_decay, weight_decay=0.0, **options)]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`.

    The defaults are those of transformers' Trainer and TRL's trainers (torch's AdamW betas and eps, no
    weight decay), so a fine-tuning run compares with the recipes built on them. Pre-training from
    scratch usually wants weight_decay=0.1 and betas=(0.9, 0.95) instead (nanoGPT, GPT-3).
    On CUDA the fused kernel does the whole update in one pass over the weights and optimizer state,
    where the default (foreach) launches one kernel per arithmetic op; it needs every parameter there.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise UserError("the model has no trainable parameters (every parameter has requires_grad=False)")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


@dataclass
class Schedule:
    """The learning-rate multiplier at an optimizer step: a linear warmup, then a decay.

    Warmup: (step + 1) / (warmup_steps + 1) for step < warmup_steps, as nanoGPT's, so the first step
    already moves the weights (transformers' warmup starts at 0: a step at learning rate 0, which a
    one-step run takes as its only step). The peak, 1, is reached at step warmup_steps. After it, with
    progress = (step - warmup) / (total - warmup) going 0 -> 1, "cosine" is 0.5 * (1 + cos(pi * progress)),
    "linear" is 1 - progress and "constant" stays 1. With min_lr_ratio = 0 these are transformers'
    get_{cosine,linear,constant}_schedule_with_warmup (cosine with num_cycles=0.5) at every step from
    warmup_steps to total_steps. With min_lr_ratio > 0 the decay ends at min_lr_ratio instead of 0
    (nanoGPT's min + (1 - min) * coeff); "constant" ignores it.

    Past total_steps the multiplier stays at its final value, where transformers' cosine climbs back
    up along the cosine: a surprise for a run that goes on a few steps longer than planned.
    With warmup_steps == total_steps there is no decay phase: the multiplier is 1 at total_steps (as
    transformers' cosine; its linear gives 0 there) and the final value from the step after. A loop
    of total_steps optimizer steps uses the multipliers of steps 0 to total_steps - 1 only, so it
    never reaches the peak unless warmup_steps < total_steps (minitune.train.warmup_steps sees to it).

    A dataclass rather than a closure so that it pickles, and so that LambdaLR's state dict, which
    saves a callable object's fields, holds the schedule: a resumed run continues on the schedule it
    was saved with, even when the new scheduler was built with other arguments.
    """

    name: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {', '.join(SCHEDULES)}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than total_steps ({self.total_steps})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.name == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.name == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * coeff


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR that scales each group's lr by `Schedule(...)`; call its step() after optimizer.step().

    Each group keeps its own base lr (discriminative learning rates); the schedule scales them all.
    """
    return LambdaLR(optimizer, Schedule(schedule, warmup_steps, total_steps, min_lr_ratio))


def scale_learning_rates(scheduler: LambdaLR, factor: float) -> None:
    """Multiply every group's peak learning rate by `factor`, staying at the same point of the schedule.

    For a resumed run given a new --lr: loading a scheduler's state dict restores the saved base rates,
    and the optimizer's restores the saved current rates, so a new rate has to be applied after both.
    """
    if not factor > 0:
        raise ValueError(f"scale_learning_rates: the factor must be positive, got {factor}")
    scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
    for group, base, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                       strict=True):
        group["initial_lr"] = base
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() returns


__all__ = ["SCHEDULES", "Schedule", "param_groups", "decay_groups", "make_optimizer", "make_scheduler",
           "scale_learning_rates"]
