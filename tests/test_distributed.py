"""FSDP2 in one process (a gloo group of one): sharded checkpoints round-trip bit for bit, the consolidated model is
the unsharded one, mixed precision casts only full fine-tuning's float32 weights, lockstep helpers; the flags.
Two processes against one, through the examples, are in test_fsdp.py (slow)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import minitune as mt
from minitune.checkpoint import load_checkpoint, save_checkpoint
from minitune.distributed import all_ranks, consolidated, even_share, is_sharded, shard_model, sync_gradients
from minitune.errors import UserError
from minitune.optim import make_optimizer, make_scheduler
from tests.conftest import example_module

VOCAB = 64


@pytest.fixture
def group():
    """A process group of one: FSDP2's code paths, with every shard whole."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny(seed: int = 0, lora: bool = False, nf4: bool = False, dtype: torch.dtype = torch.float32) -> mt.Mistral:
    torch.manual_seed(seed)
    model = mt.Mistral(mt.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(dtype)
    if nf4:
        mt.quant.quantize_model(model)
    if lora:
        mt.lora.apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
        with torch.no_grad():
            for _, layer in mt.lora.lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.1)
    return model


def step(model, optimizer, scheduler, seed: int) -> float:
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    loss = model(x, labels=x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def sharded_run(seed: int = 0, **kind):
    model = shard_model(tiny(seed, **kind))
    optimizer = make_optimizer(model, lr=1e-2)
    return model, optimizer, make_scheduler(optimizer, "cosine", warmup_steps=1, total_steps=6)


def local_state(model, optimizer) -> list[torch.Tensor]:
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    return ([local(p).clone() for p in model.parameters()] +
            [local(v).clone() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])


@pytest.mark.parametrize("kind", [{}, {"lora": True, "nf4": True}], ids=["full", "qlora"])
def test_a_sharded_checkpoint_resumes_bit_for_bit(tmp_path, group, kind):
    model, optimizer, scheduler = sharded_run(**kind)
    step(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert (path / "sharded" / ".metadata").is_file() and (path / "sharded" / "__0_0.distcp").is_file()
    assert not (path / "model.safetensors").exists() and not (path / "optimizer.pt").exists()
    straight = [step(model, optimizer, scheduler, s) for s in (2, 3)]

    again, optimizer2, scheduler2 = sharded_run(seed=7, **kind)
    assert load_checkpoint(path, again, optimizer2, scheduler2)["step"] == 1
    assert [step(again, optimizer2, scheduler2, s) for s in (2, 3)] == straight
    for a, b in zip(local_state(model, optimizer), local_state(again, optimizer2), strict=True):
        assert torch.equal(a, b)
    assert optimizer2.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again, as AdamW made it


def test_a_sharded_checkpoint_before_the_first_step_starts_the_optimizer_afresh(tmp_path, group):
    model, optimizer, scheduler = sharded_run()
    path = save_checkpoint(tmp_path, 0, model, optimizer, scheduler)
    assert not optimizer.state  # saving did not make a state (get_optimizer_state_dict's zero step undone)
    again, optimizer2, scheduler2 = sharded_run(seed=7)
    load_checkpoint(path, again, optimizer2, scheduler2)
    assert not optimizer2.state
    assert step(again, optimizer2, scheduler2, 1) == step(model, optimizer, scheduler, 1)


def test_a_damaged_or_mismatched_sharded_checkpoint_is_named(tmp_path, group):
    model, optimizer, scheduler = sharded_run()
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    other, optimizer2, _ = sharded_run(lora=True)
    with pytest.raises(UserError, match="missing tensor 'model.layers.0.self_attn.q_proj.lora_A.weight'") as e:
        load_checkpoint(path, other, optimizer2)
    assert str(path / "sharded") in str(e.value)
    with pytest.raises(UserError, match=r"tensor 'model.embed_tokens.weight' has shape \[64, 64\], the model expects "
                                        r"\[64, 32\]"):
        load_checkpoint(path, shard_model(mt.Mistral(mt.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2))))
    os.remove(path / "sharded" / ".metadata")
    with pytest.raises(UserError, match="not a readable torch.distributed.checkpoint folder") as e:
        load_checkpoint(path, model, optimizer)
    assert str(path / "sharded") in str(e.value)


@pytest.mark.parametrize("kind", [{}, {"lora": True, "nf4": True}], ids=["full", "qlora"])
def test_the_consolidated_model_is_the_unsharded_one(group, kind):
    plain = tiny(**kind)
    expected = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = plain(x)
    model = shard_model(plain)
    assert is_sharded(model) and not is_sharded(tiny())
    whole = consolidated(model)
    assert not is_sharded(whole) and whole.device.type == "cpu"
    got = whole.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(whole(x), logits)
    plain = tiny()
    assert consolidated(plain) is plain  # an unsharded model comes back as it is
    from torch.distributed.fsdp import fully_shard
    with pytest.raises(UserError, match="shard it with minitune.distributed.shard_model"):
        consolidated(fully_shard(tiny()))


def test_mixed_precision_casts_only_all_float32_weights(group):
    """Full fine-tuning's float32 master weights are gathered in bf16 for the forward; a LoRA model over a bf16 base (as
    the examples load it for bf16 compute) is gathered as it is, its float32 adapters staying float32."""
    seen = []
    for kind, expected in (({}, torch.bfloat16), ({"lora": True, "dtype": torch.bfloat16}, torch.float32)):
        model = tiny(**kind)
        q_proj = model.model.layers[0].self_attn.q_proj
        trained = q_proj.lora_A if kind else q_proj  # the weight that trains: as the forward sees it
        q_proj.register_forward_pre_hook(lambda module, args: seen.append(trained.weight.dtype))
        shard_model(model, compute_dtype=torch.bfloat16)
        with torch.no_grad():
            model(torch.randint(0, VOCAB, (1, 5)))
        assert seen.pop() == expected, kind
        model.reshard()  # the root stays gathered after a forward
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the shards stay float32


def test_sync_gradients_accumulates_and_restores(group):
    """Without sync FSDP2 keeps the unsharded gradients to itself (the shards get none yet); the synced backward
    reduces their sum; afterwards the sync is on again, and the sum equals two plain backwards."""
    model, optimizer, _ = sharded_run()
    x = torch.randint(0, VOCAB, (2, 8))
    for last in (False, True):
        with sync_gradients(model, last):
            model(x, labels=x).backward()
        assert all((p.grad is not None) == last for p in model.parameters()), last
    accumulated = [p.grad.to_local().clone() for p in model.parameters()]
    optimizer.zero_grad()
    for _ in range(2):
        model(x, labels=x).backward()  # outside sync_gradients: reduced every time, as restored
        assert all(p.grad is not None for p in model.parameters())
    assert all(torch.allclose(a, p.grad.to_local(), rtol=1e-6, atol=1e-7)
               for a, p in zip(accumulated, model.parameters(), strict=True))


def test_greedy_generation_of_a_sharded_model_is_the_plain_one(group):
    plain = tiny()
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    expected = mt.generate(plain, prompt, 6)
    assert torch.equal(mt.generate(shard_model(plain), prompt, 6), expected)


def test_even_share_gives_every_rank_as_many_items():
    items = list("abcde")
    assert [even_share(items, r, 2) for r in (0, 1)] == [(["a", "c", "e"], 3), (["b", "d", "a"], 2)]
    assert [even_share(items, r, 4) for r in range(4)] == [(["a", "e"], 2), (["b", "a"], 1), (["c", "a"], 1),
                                                             (["d", "a"], 1)]
    assert even_share([], 1, 2) == ([], 0) and even_share(items, 0, 1) == (items, 5)
    assert all_ranks(True, torch.device("cpu")) and not all_ranks(False, torch.device("cpu"))


@pytest.mark.parametrize("script", ["finetune_mistral.py", "dpo.py"])
def test_fsdp_flags_are_refused_where_they_cannot_work(script, capsys, monkeypatch):
    parse = example_module(script).parse_args
    model = ["--model", "examples/assets/tiny-mistral"]
    for flags, message in ((["--fsdp"], "--fsdp shards the model over torchrun's processes: run the script under "
                                        "torchrun"),
                           (["--fsdp-offload"], "--fsdp-offload offloads FSDP's shards: add --fsdp")):
        with pytest.raises(SystemExit):
            parse([*model, *flags])
        assert message in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert parse([*model, "--fsdp", "--fsdp-offload"]).fsdp


def test_a_full_disk_during_a_sharded_save_is_the_oserror_it_was(tmp_path, group, monkeypatch):
    """torch.distributed.checkpoint wraps each process's error in a CheckpointException; run_main reports an OSError
    such as a full disk in one line, so it comes out unwrapped."""
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model, optimizer, scheduler = sharded_run()
    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert e.value.errno == errno.ENOSPC
