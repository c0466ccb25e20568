"""Run by tests/test_lora.py: LoRA + activation checkpointing on a tiny Mistral, one plain process ("one") or
under torchrun with FSDP2 fully_shard on each block and the root ("fsdp"); prints the loss and the LoRA
gradients' norms as JSON (rank 0)."""

import json
import os
import sys

import torch
import torch.distributed as dist

import minitune as mt


def build() -> mt.Mistral:
    torch.manual_seed(0)
    model = mt.Mistral(mt.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    mt.lora.apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
    with torch.no_grad():
        for _, layer in mt.lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)  # B = 0 at init would make A's gradients 0
    model.gradient_checkpointing = True
    return model


def main(mode: str) -> None:
    x = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    model = build()
    if mode == "one":
        loss = model(x, labels=x, reduction="sum")
        loss.backward()
        grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
        print(json.dumps({"loss": loss.item(), "grads": grads}))
        return
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    mine = x[rank::world]
    loss = model(mine, labels=mine, reduction="sum")
    (loss * world).backward()  # FSDP averages the ranks' gradients; the sum over all rows is wanted
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad.full_tensor().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        print(json.dumps({"loss": total.item(), "grads": grads}), flush=True)
    dist.destroy_process_group()
    # Skip the interpreter's finalization: under load, gloo's threads can abort it after all the work is done
    # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291).
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
