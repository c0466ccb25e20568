"""Training across processes with FSDP2: the model sharded, gradients synced once per step, evaluation in lockstep.

Under torchrun every process runs the same script; DDP keeps a whole copy of the model on each, FSDP2
(`torch.distributed.fsdp.fully_shard`) keeps 1/world of every weight, gradient and optimizer state:

    shard_model(model, compute_dtype=torch.bfloat16)      # each decoder block, then the root
    optimizer = make_optimizer(model, lr=...)              # after sharding: it steps the shards
    with sync_gradients(model, last_micro_batch):          # reduce-scatter only in the last backward
        loss.backward()
    final = consolidated(model)                            # rank 0: the whole model on its CPU

Each block is one FSDP unit: its weights are all-gathered just before its forward (and again for the
backward) and freed after it, so a rank holds its shards plus about one block in full. The root unit holds
the embeddings, the final norm and the head. A 4-bit (NF4) weight is sharded like any other: its packed
codes, block maxima and scales are each cut along their first dimension, gathered whole before the block
runs, and never cast or reduced (they do not train).

A sharded model needs every rank in every forward: `even_share` gives each rank the same number of
evaluation rows (repeating the first where the share is short, flagged as padding) and generation decodes
until every rank's rows have stopped (`minitune.generate`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError
from .freeze import blocks

# the meta-device skeleton of each sharded model, kept from before sharding for `consolidated`
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# where a model whose shards are offloaded to the CPU computes (its parameters say "cpu")
_COMPUTE_DEVICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fsdp():
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise UserError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this torch is "
                        f"{torch.__version__}") from None
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes, so where its inputs go: its parameters' device, or for a model whose shards are
    offloaded to the CPU (shard_model(offload=True)), the GPU its blocks are gathered to."""
    return _COMPUTE_DEVICES.get(model) or next(model.parameters()).device


def shard_model(model: nn.Module, compute_dtype: torch.dtype | None = None, offload: bool = False) -> nn.Module:
    """FSDP2 over the current process group: `fully_shard` on each decoder block, then on the root. In place;
    returns the model. Build the optimizer right after this, before any forward (after a forward without a
    backward the root's weights stay gathered, and an optimizer built then would hold the gathered ones), and
    load checkpoints after the optimizer.

    `compute_dtype` (bf16): when every parameter is float32 (full fine-tuning's master weights), the gathered
    weights are cast to it for the forward and backward and the gradients reduced in float32
    (MixedPrecisionPolicy). A model holding lower-precision weights (LoRA's frozen bf16 or 4-bit base) is
    gathered as it is: its float32 adapters stay float32, as in PEFT. `offload` keeps the shards, their
    gradients and the optimizer step on the CPU (CPUOffloadPolicy), the GPU holding what one block needs; its
    process group must reduce CPU tensors too (init_distributed(..., cpu_collectives=True): gloo beside NCCL).
    Apply LoRA, quantize or resize the embedding before: the structure `consolidated` rebuilds is taken here."""
    if not dist.is_initialized():
        raise UserError("--fsdp shards the model across torchrun's processes: run the script under torchrun "
                        "(torchrun --nproc_per_node=1 ... on one GPU)")
    fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy = _fsdp()
    _SKELETONS[model] = _meta_copy(model)
    if offload:
        _COMPUTE_DEVICES[model] = model_device(model)
    all_float32 = all(p.dtype == torch.float32 for p in model.parameters())
    cast = compute_dtype if all_float32 and compute_dtype not in (None, torch.float32) else None
    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=cast, reduce_dtype=torch.float32)}
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` has been through fully_shard (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def sync_gradients(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Around a micro-batch's backward: whether DDP all-reduces (FSDP reduce-scatters) its gradients. Off for all
    but the last micro-batch of a step: the gradients add up locally and are reduced once."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)  # off: FSDP2 keeps the unsharded gradients until a synced backward
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync") and not enabled:  # DistributedDataParallel
        with model.no_sync():
            yield
    else:
        yield


def even_share(items: Sequence, rank: int, world: int) -> tuple[list, int]:
    """(this rank's items, how many of them are real): items rank, rank + world, ..., then copies of the first item
    until every rank has as many (ceil(len / world)), so that a sharded model runs the same forwards on each."""
    mine = list(items[rank::world])
    real = len(mine)
    return mine + [items[0] for _ in range(math.ceil(len(items) / world) - real)], real


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every process (just `flag` outside torch.distributed)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def _meta_copy(model: nn.Module) -> nn.Module:
    """The model's structure with its parameters on the meta device (no memory); buffers are copied as they are."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}  # a tied parameter maps to one meta parameter: the copy stays tied
    return copy.deepcopy(model, memo)


def consolidated(model: nn.Module) -> nn.Module | None:
    """Rank 0: the sharded model whole, as a plain module on the CPU (for save_pretrained, save_adapter,
    save_merged); every other rank gets None. Every rank must call it: each tensor is gathered in turn and sent
    to rank 0's CPU memory, so no GPU ever holds more than one tensor of it. A model that is not sharded comes
    back as it is."""
    if not is_sharded(model):
        return model
    if model not in _SKELETONS:
        raise UserError(f"consolidated: this {type(model).__name__} was sharded by fully_shard itself; shard it with "
                        "minitune.distributed.shard_model, which keeps the structure to rebuild it from")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    whole = copy.deepcopy(_SKELETONS[model])
    for module in whole.modules():  # its buffers to the CPU; its parameters are still on meta
        module._buffers.update({name: b.cpu() for name, b in module._buffers.items() if b is not None})
    tied = getattr(whole, "head_is_tied", False)
    whole.load_state_dict(state, assign=True)  # the gathered tensors become the parameters: no copy
    if tied:
        whole.tie_weights()
    return whole


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes this process holds of the model's parameters, their gradients and the optimizer state (a sharded
    tensor counts its local shard)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors: Iterator[torch.Tensor] = (local(t) for p in model.parameters() for t in (p, p.grad) if t is not None)
    total = sum(t.numel() * t.element_size() for t in tensors)
    if optimizer is not None:
        total += sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values()
                     for v in state.values() if isinstance(v, torch.Tensor))
    return total


__all__ = ["shard_model", "is_sharded", "model_device", "sync_gradients", "even_share", "all_ranks", "consolidated",
           "local_state_bytes"]
