"""DPO's reference model, three ways, all giving the same log-probabilities.

DPO's loss compares the policy's log-probabilities of the chosen and rejected answers with those of a
fixed reference model, usually the policy before DPO (the SFT model). Where they come from is a
memory question, not a mathematical one:

    "copy"           a frozen deep copy of the model: a second set of weights in memory (full fine-tuning
                     needs it, as the policy's own weights move)
    "lora-disabled"  the policy itself with its LoRA adapters switched off (mt.lora.disable_lora): with
                     LoRA the base weights never change, so they are the reference, at no memory cost
    "precomputed"    one pass over the training pairs before training, the results cached on disk
                     (precompute_logps, save_logps / load_logps): no reference in memory while training,
                     and no reference forward per step

    reference = Reference("copy", model)                 # before LoRA is applied or training starts
    ref_chosen, ref_rejected = reference.logps(batch)    # a data.collate_preferences batch

Reference log-probabilities are computed in eval mode (no dropout) without a graph: they are constants
of the loss. Train the policy without dropout too (disable_dropout, TRL's default): with it, the policy's
log-probabilities are noisy where the reference's are not, and as the loss is convex in the margin the
noise biases it upwards; the policy would not even equal the reference before the first step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from .data import collate_preferences
from .distributed import model_device
from .errors import UserError
from .hub import save_safetensors
from .losses import preference_logps

REFERENCE_MODES = ("copy", "lora-disabled", "precomputed")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every nn.Dropout of the model to p = 0 (the models' attention dropout is one too); returns the model."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode whose parameters need no gradient: the reference as a second model."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities of `model` on the batch, in eval mode (no dropout) and without a
    graph; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return preference_logps(model, batch, average)
    finally:
        model.train(was_training)


class Reference:
    """Where a DPO step's reference log-probabilities come from (see the module docstring for the modes).

    Build it from the policy before training changes it: "copy" copies the model then. "lora-disabled"
    needs LoRA layers on the policy by the time logps is first called. "precomputed" reads the batch's
    "reference_logps", which collate_preferences puts there when the examples carry them (attach_logps); they
    were computed with or without `average` when precomputed, so the argument is not used then.
    """

    def __init__(self, mode: str, policy: nn.Module):
        if mode not in REFERENCE_MODES:
            raise UserError(f"reference mode {mode!r}: expected one of {', '.join(REFERENCE_MODES)}")
        self.mode = mode
        self.model = frozen_copy(policy) if mode == "copy" else policy if mode == "lora-disabled" else None

    def logps(self, batch: dict[str, torch.Tensor], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "precomputed":
            if "reference_logps" not in batch:
                raise UserError("reference 'precomputed': the batch has no reference_logps; compute them with "
                                "precompute_logps and attach them to the examples (attach_logps) before collating")
            return batch["reference_logps"].chunk(2)
        if self.mode == "copy":
            return reference_logps(self.model, batch, average)
        from .lora import disable_lora, lora_layers
        if not any(True for _ in lora_layers(self.model)):
            raise UserError("reference 'lora-disabled': the policy has no LoRA layers, so disabling them leaves the "
                            "policy itself; apply LoRA (--lora-r) or use the 'copy' or 'precomputed' reference")
        with disable_lora(self.model):
            return reference_logps(self.model, batch, average)


# ---------------------------------------------------------------- precomputed, and cached on disk


def precompute_logps(model: nn.Module, examples: Sequence[dict], pad_id: int, batch_size: int = 16,
                     average: bool = False, amp: Callable = contextlib.nullcontext, desc: str | None = None
                     ) -> torch.Tensor:
    """[N, 2] float32 (chosen, rejected) log-probabilities of `model` on encoded preference examples, in batches."""
    device = model_device(model)
    rows = [torch.zeros(0, 2)]  # so that no examples (a small validation set's share on one rank) gives (0, 2)
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        batch = collate_preferences(examples[i:i + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp():
            chosen, rejected = reference_logps(model, batch, average)
        rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())  # (b, 2)
    return torch.cat(rows)


def attach_logps(examples: Sequence[dict], logps: torch.Tensor) -> list[dict]:
    """The examples with "reference_logps": [chosen, rejected] each, which collate_preferences batches."""
    if logps.shape != (len(examples), 2):
        raise UserError(f"reference log-probabilities of shape {tuple(logps.shape)} for {len(examples)} examples: "
                        f"expected ({len(examples)}, 2)")
    return [{**example, "reference_logps": row} for example, row in zip(examples, logps.tolist(), strict=True)]


def fingerprint(model: nn.Module, examples: Sequence[dict], average: bool, dtype: str = "float32") -> str:
    """What cached reference log-probabilities depend on: the examples' tokens, `average`, the compute dtype
    (autocast) and the model: its config and its weights.

    The weights enter through each tensor's name, shape and dtype and 64 of its values at fixed strides, bit
    for bit: cheap on a 7B model, the same on every device (a sum would differ in its last bits between a CPU
    and a GPU), and any training of the weights changes them. It is a check against a stale cache or the
    wrong --model, not a cryptographic hash of the weights."""
    digest = hashlib.sha256(f"average={average} dtype={dtype} config={getattr(model, 'config', None)!r}".encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 64)][:64].cpu().contiguous()  # (<= 64,) values over the tensor
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    for example in examples:
        for side in ("chosen", "rejected"):
            digest.update(str(example[side]["input_ids"]).encode() + str(example[side]["labels"]).encode())
    return digest.hexdigest()


def save_logps(path: str | os.PathLike, logps: torch.Tensor, fingerprint: str) -> None:
    """Write the [N, 2] log-probabilities to a safetensors file with their fingerprint, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_safetensors({"logps": logps.contiguous()}, tmp, {"fingerprint": fingerprint})
    os.replace(tmp, path)


def load_logps(path: str | os.PathLike, fingerprint: str) -> torch.Tensor | None:
    """The cached log-probabilities when `path` holds them for this fingerprint; None when there is no file.
    A file computed for other examples or another model is an error that says so (delete it to recompute)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("fingerprint")
            logps = f.get_tensor("logps")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable reference log-probability cache ({e}); delete it to recompute") from e
    if saved != fingerprint:
        raise UserError(f"{path}: reference log-probabilities computed for other examples, another reference "
                        "model or another compute dtype (the fingerprint differs); delete the file to recompute them")
    return logps
