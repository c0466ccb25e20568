"""minitune.optim: AdamW parameter groups and the warmup schedules (against transformers' own)."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import nn

from minitune.models import GPT2, GPT2Config, Mistral, MistralConfig
from minitune.optim import SCHEDULES, Schedule, make_optimizer, make_scheduler, param_groups, scale_learning_rates


def tiny_gpt2() -> GPT2:
    return GPT2(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=16))


def tiny_mistral() -> Mistral:
    return Mistral(MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2))


def group_names(model: nn.Module, groups: list[dict]) -> dict[str, list[str]]:
    """Each group's parameters as their names in `model`, matched by identity (not by value)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


# ---- parameter groups ----

def test_gpt2_groups_tied_head():
    model = tiny_gpt2()
    assert model.head_is_tied
    names = group_names(model, param_groups(model, 0.1))
    layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.bias", "mlp.c_proj.bias"]
    matrices = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert names == {
        "decay": [f"transformer.h.{i}.{n}" for i in range(2) for n in matrices],
        "no_decay": ["transformer.wte.weight", "transformer.wpe.weight"]
                    + [f"transformer.h.{i}.{n}" for i in range(2) for n in layer]
                    + ["transformer.ln_f.weight", "transformer.ln_f.bias"],
    }
    no_decay = param_groups(model, 0.1)[1]["params"]
    assert sum(p is model.lm_head.weight for p in no_decay) == 1  # the tied head, once, as the embedding


def test_mistral_groups_untied_head():
    model = tiny_mistral()
    assert not model.head_is_tied
    names = group_names(model, param_groups(model, 0.1))
    matrices = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    norms = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    assert names == {
        "decay": [f"model.layers.{i}.{n}" for i in range(2) for n in matrices] + ["lm_head.weight"],
        "no_decay": ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}" for i in range(2) for n in norms]
                    + ["model.norm.weight"],
    }


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_mistral])
def test_groups_cover_every_trainable_param_once(build):
    model = build()
    groups = param_groups(model, 0.05)
    params = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params)
    assert [id(p) for p in params] != [] and {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.05), ("no_decay", 0.0)]


def test_groups_leave_out_frozen_params_and_drop_empty_groups():
    model = tiny_gpt2()
    frozen = [model.transformer.h[0].attn.c_attn.weight, model.transformer.h[1].ln_2.bias]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert not any(p is f for p in params for f in frozen)
    assert len(params) == len([p for p in model.parameters() if p.requires_grad])

    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))  # only biases train: no decay group left
    groups = param_groups(model, 0.1)
    assert [g["name"] for g in groups] == ["no_decay"]
    assert group_names(model, groups)["no_decay"] == [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_make_optimizer_refuses_a_fully_frozen_model():
    model = tiny_gpt2().requires_grad_(False)
    assert param_groups(model, 0.1) == []
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, lr=1e-3)


def test_adamw_step_decays_only_the_decay_group():
    """Zero gradients make Adam's own update 0, leaving only the decoupled decay p *= 1 - lr * wd."""
    model = tiny_gpt2()
    optimizer = make_optimizer(model, lr=1.0, weight_decay=0.1)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert optimizer.defaults["fused"] is None  # CPU: torch's default implementation
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    names = group_names(model, optimizer.param_groups)
    for name in names["decay"]:
        torch.testing.assert_close(model.get_parameter(name), before[name] * 0.9, rtol=0, atol=1e-7)
    for name in names["no_decay"]:
        assert torch.equal(model.get_parameter(name), before[name]), name
    assert torch.equal(model.lm_head.weight, before["transformer.wte.weight"])  # the tied head is not decayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_make_optimizer_fused_on_cuda():
    model = tiny_mistral().cuda()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    model(torch.randint(0, 101, (2, 8), device="cuda")).sum().backward()
    optimizer.step()


# ---- schedules ----

def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The lr of the first group at steps 0..steps, stepping as a training loop does."""
    out = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 40), (10, 110), (7, 8), (1, 3), (25, 60)])
def test_schedule_matches_transformers(name, warmup, total):
    transformers = pytest.importorskip("transformers")
    if name == "constant":
        theirs = transformers.get_constant_schedule_with_warmup(sgd(), warmup)
    else:
        make = getattr(transformers, f"get_{name}_schedule_with_warmup")
        theirs = make(sgd(), warmup, total)
    ours, theirs = lrs(make_scheduler(sgd(), name, warmup, total), total), lrs(theirs, total)
    # the same from the peak on; in the warmup ours is one step ahead (theirs starts at 0)
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=0, abs=1e-12)
    assert ours[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup", [1, 5, 20])
def test_no_step_at_learning_rate_0(name, warmup):
    """The first optimizer step moves the weights (transformers' warmup spends it at lr 0)."""
    assert Schedule(name, warmup, 40)(0) == 1 / (warmup + 1) > 0


def test_hand_worked_values():
    cosine, linear, constant = (Schedule(name, warmup_steps=10, total_steps=110) for name in SCHEDULES)
    for s in (cosine, linear, constant):
        assert s(0) == 1 / 11 and s(5) == 6 / 11 and s(9) == 10 / 11 and s(10) == 1.0
    assert cosine(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the decay
    assert linear(35) == pytest.approx(0.75)
    assert cosine(60) == pytest.approx(0.5) and linear(60) == pytest.approx(0.5)
    assert cosine(110) == pytest.approx(0.0, abs=1e-15) and linear(110) == 0.0
    assert constant(60) == constant(110) == 1.0


def test_min_lr_ratio_endpoints():
    for name in ("cosine", "linear"):
        s = Schedule(name, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
        assert s(5) == 6 / 11 and s(10) == 1.0  # warmup is unchanged
        assert s(60) == pytest.approx(0.55)  # halfway from 1 to 0.1
        assert s(110) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)
    assert Schedule("constant", 10, 110, min_lr_ratio=0.1)(110) == 1.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_steps_past_total_hold_the_final_value(name):
    s = Schedule(name, warmup_steps=10, total_steps=110)
    final = s(110)
    assert [s(step) for step in (111, 150, 210, 10_000)] == [final] * 4
    assert lrs(make_scheduler(sgd(), name, 10, 110), 250)[110:] == [pytest.approx(final, abs=1e-15)] * 141


def test_transformers_cosine_would_climb_back_past_total():
    """Why we clamp: transformers' cosine is back at the peak one decay length after total_steps."""
    transformers = pytest.importorskip("transformers")
    theirs = lrs(transformers.get_cosine_schedule_with_warmup(sgd(), 10, 110), 210)
    assert theirs[210] == pytest.approx(1.0)
    assert Schedule("cosine", 10, 110)(210) == pytest.approx(0.0, abs=1e-15)


def test_warmup_equal_to_total():
    s = Schedule("linear", warmup_steps=4, total_steps=4)
    assert [s(step) for step in range(7)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 0.0]


def test_every_group_keeps_its_base_lr():
    optimizer = torch.optim.SGD([dict(params=[nn.Parameter(torch.zeros(1))], lr=1.0),
                                 dict(params=[nn.Parameter(torch.zeros(1))], lr=0.1)])
    scheduler = make_scheduler(optimizer, "linear", warmup_steps=0, total_steps=4)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.75, 0.075])


def test_schedule_pickles():
    s = Schedule("cosine", 10, 110, min_lr_ratio=0.1)
    assert pickle.loads(pickle.dumps(s)) == s


@pytest.mark.parametrize("name", SCHEDULES)
def test_resume_continues_the_same_lrs(name):
    model = nn.Linear(4, 4)
    total, k = 30, 13

    def build(args=(name, 5, total)):
        optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
        return optimizer, make_scheduler(optimizer, *args, min_lr_ratio=0.05)

    optimizer, scheduler = build()
    reference = [[g["lr"] for g in optimizer.param_groups]]
    saved = None
    for step in range(total + 5):
        if step == k:
            buffer = io.BytesIO()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
            saved = buffer.getvalue()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        reference.append([g["lr"] for g in optimizer.param_groups])

    state = torch.load(io.BytesIO(saved), weights_only=True)  # plain data: no unpickling of code
    optimizer, scheduler = build(args=("constant", 0, 1))  # the saved schedule wins over these
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert scheduler.lr_lambdas[0] == Schedule(name, 5, total, 0.05)
    resumed = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(k, total + 5):
        optimizer.step()
        scheduler.step()
        resumed.append([g["lr"] for g in optimizer.param_groups])
    assert resumed == reference[k:]
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]


def test_scale_learning_rates_changes_the_peak_and_keeps_the_schedule_position():
    """A resumed run given a new --lr: every group's rate scales, the schedule goes on from where it was."""
    def run(scale_at=None):
        optimizer = torch.optim.SGD([dict(params=[nn.Parameter(torch.zeros(1))], lr=1.0),
                                     dict(params=[nn.Parameter(torch.zeros(1))], lr=0.1)])
        scheduler = make_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=10)
        lrs = []
        for step in range(10):
            if step == scale_at:
                scale_learning_rates(scheduler, 0.5)
            lrs.append(scheduler.get_last_lr())
            assert lrs[-1] == [g["lr"] for g in optimizer.param_groups]
            optimizer.step()
            scheduler.step()
        return lrs

    plain, scaled = run(), run(scale_at=4)
    assert scaled[:4] == plain[:4]
    for a, b in zip(plain[4:], scaled[4:], strict=True):
        assert b == pytest.approx([x / 2 for x in a])
    with pytest.raises(ValueError, match="factor must be positive, got 0"):
        scale_learning_rates(make_scheduler(sgd(), "constant", 0, 1), 0)


@pytest.mark.parametrize("args,message", [
    (("cosin", 0, 10), r"unknown schedule 'cosin'; expected one of cosine, linear, constant"),
    (("cosine", -1, 10), r"warmup_steps must be >= 0, got -1"),
    (("linear", 20, 10), r"warmup_steps \(20\) is more than total_steps \(10\)"),
    (("constant", 0, 0), r"total_steps must be positive, got 0"),
    (("cosine", 0, -5), r"total_steps must be positive, got -5"),
    (("cosine", 0, 10, 1.5), r"min_lr_ratio must be in \[0, 1\], got 1.5"),
    (("linear", 0, 10, -0.1), r"min_lr_ratio must be in \[0, 1\], got -0.1"),
])
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(sgd(), *args)
