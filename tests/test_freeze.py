"""Freezing, gradual unfreezing and discriminative learning rates."""

from __future__ import annotations

import pytest
import torch

from minitune.freeze import (
    discriminative_param_groups,
    freeze,
    gradual_unfreeze,
    layer_groups,
    unfrozen_groups,
)
from minitune.models import GPT2, GPT2Config, Mistral, MistralConfig
from minitune.optim import make_scheduler


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=3, n_head=4))
    return Mistral(MistralConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2))


FAMILIES = ["gpt2", "mistral"]


def train(model, optimizer, steps: int, before_step=None) -> None:
    for step in range(steps):
        if before_step:
            before_step(step)
        x = torch.randint(0, 60, (2, 8))
        model(x, labels=x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_groups_cover_every_parameter_once_bottom_to_top(family):
    model = tiny(family)
    groups = layer_groups(model)
    assert [g for g, _ in groups] == ["embeddings", "block.0", "block.1", "block.2", "head"]
    names = [n for _, params in groups for n, _ in params]
    assert names == [n for n, _ in model.named_parameters()] and len(set(names)) == len(names)
    head = [n for n, _ in dict(groups)["head"]]
    assert head == (["transformer.ln_f.weight", "transformer.ln_f.bias"] if family == "gpt2"
                    else ["model.norm.weight", "lm_head.weight"])  # GPT-2's tied head is its embedding


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_weights_stay_bit_identical_with_no_grad_and_no_optimizer_state(family):
    model = tiny(family)
    norms = "*.2.ln_*" if family == "gpt2" else "*.2.*norm*"  # the top block's norms
    frozen = freeze(model, embeddings=True, first_k_blocks=1, patterns=[norms])
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(discriminative_param_groups(model, lr=1e-2, weight_decay=0.1))
    train(model, optimizer, 3)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]) and p.grad is None and p not in optimizer.state, n
        else:
            assert not torch.equal(p, before[n]) and p in optimizer.state, n


def test_freeze_errors():
    model = tiny("mistral")
    with pytest.raises(ValueError, match="first_k_blocks=4: the model has 3 blocks"):
        freeze(model, first_k_blocks=4)
    with pytest.raises(ValueError, match=r"freeze pattern '\*.attn2.\*' matches no parameter"):
        freeze(model, patterns=["*.attn2.*"])


@pytest.mark.parametrize("family", FAMILIES)
def test_discriminative_rates_fall_by_the_factor_per_group_and_follow_the_schedule(family):
    model = tiny(family)
    groups = discriminative_param_groups(model, lr=1e-2, factor=2.6, weight_decay=0.1)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"head": 1e-2, "block.2": 1e-2 / 2.6, "block.1": 1e-2 / 2.6 ** 2,
                                 "block.0": 1e-2 / 2.6 ** 3, "embeddings": 1e-2 / 2.6 ** 4})
    decayed = {g["name"] for g in groups if g["weight_decay"] > 0}
    assert "embeddings/decay" not in decayed and "block.0/decay" in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups)
    scheduler = make_scheduler(optimizer, "linear", warmup_steps=0, total_steps=4)
    optimizer.step()
    scheduler.step()
    for g in optimizer.param_groups:  # the schedule scales every group's own rate
        assert g["lr"] == pytest.approx(0.75 * lrs[g["name"].split("/")[0]])


def test_gradual_unfreezing_opens_groups_on_schedule():
    assert [unfrozen_groups(s, every=10, n_groups=5) for s in (0, 9, 10, 25, 30, 99)] == [2, 2, 3, 4, 5, 5]
    model = tiny("mistral")
    names = [g for g, _ in layer_groups(model)]

    def open_groups():
        return [g for g, params in layer_groups(model) if all(p.requires_grad for _, p in params)]

    assert gradual_unfreeze(model, 0, every=10) == 2 and open_groups() == ["block.2", "head"]
    assert not any(p.requires_grad for _, params in layer_groups(model)[:3] for _, p in params)
    gradual_unfreeze(model, 10, every=10)
    assert open_groups() == ["block.1", "block.2", "head"]
    gradual_unfreeze(model, 30, every=10)
    assert open_groups() == names
    with pytest.raises(ValueError, match="every must be at least 1"):
        gradual_unfreeze(model, 0, every=0)


def test_unfreezing_mid_run_keeps_the_optimizer_state_of_the_rest():
    """Open groups keep their moments and step counts; a newly opened group starts its own state."""
    model = tiny("mistral")
    optimizer = torch.optim.AdamW(discriminative_param_groups(model, lr=1e-2))
    head = dict(model.named_parameters())["lm_head.weight"]
    bottom = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    train(model, optimizer, 2, before_step=lambda s: gradual_unfreeze(model, s, every=2))
    assert bottom not in optimizer.state and float(optimizer.state[head]["step"]) == 2
    moment = optimizer.state[head]["exp_avg"].clone()
    train(model, optimizer, 1, before_step=lambda s: gradual_unfreeze(model, 2 + s, every=2))  # block.1 opens
    assert float(optimizer.state[head]["step"]) == 3 and not torch.equal(optimizer.state[head]["exp_avg"], moment)
    block1 = dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    assert float(optimizer.state[block1]["step"]) == 1 and bottom not in optimizer.state
