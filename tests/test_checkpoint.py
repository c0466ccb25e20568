"""Checkpoints: a resumed run repeats the straight run bit for bit, and no save, killed or not, loses one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from minitune import checkpoint as ckpt
from minitune.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from minitune.models import GPT2, GPT2Config, Mistral, MistralConfig
from minitune.optim import make_optimizer, make_scheduler

STEPS = 6


def tiny_mistral(**overrides):
    kw = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    return Mistral(MistralConfig(**{**kw, **overrides}))


def tiny_gpt2(**overrides):
    """Tied head, and dropout on everywhere, so that resuming exactly needs the RNG streams."""
    kw = dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1,
              attn_pdrop=0.1)
    return GPT2(GPT2Config(**{**kw, **overrides}))


MODELS = {"mistral": tiny_mistral, "gpt2": tiny_gpt2}


def new_run(name: str, seed: int = 0):
    """A model, AdamW and a warmup + cosine schedule (lr changes every step), as a loop builds them."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = MODELS[name]().train()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    return model, optimizer, make_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=STEPS)


def train_step(model, optimizer, scheduler) -> float:
    """One step on a random batch: its length from python's RNG, its size from numpy's, its tokens from torch's."""
    batch = torch.randint(0, 101, (int(np.random.randint(1, 3)), random.randint(6, 12)))
    loss = model(batch, labels=batch)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def draws() -> list:
    """The next numbers of every RNG stream a loop may use."""
    return [torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), torch.randint(0, 10**6, (2,)).tolist()]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- round trip and exact resume

@pytest.mark.parametrize("name", MODELS)
def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path, name):
    model, optimizer, scheduler = new_run(name)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, state={"epoch": 1, "position": 17})
    assert path == tmp_path / "checkpoints" / "step-2"
    expected = draws()

    model2, optimizer2, scheduler2 = new_run(name, seed=1)
    trainer_state = load_checkpoint(path, model2, optimizer2, scheduler2)
    assert draws() == expected
    assert trainer_state["step"] == 2 and trainer_state["state"] == {"epoch": 1, "position": 17}
    assert_same_weights(model, model2)
    saved, loaded = optimizer.state_dict(), optimizer2.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for i, s in saved["state"].items():
        assert s.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in s:
            assert torch.equal(s[k], loaded["state"][i][k]), (i, k)
    assert scheduler.state_dict() == scheduler2.state_dict()
    assert scheduler2.last_epoch == 2 and scheduler2.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("name", MODELS)
def test_resumed_run_is_bit_identical_to_straight_run(tmp_path, name):
    model, optimizer, scheduler = new_run(name)
    straight = [train_step(model, optimizer, scheduler) for _ in range(STEPS)]

    first, optimizer1, scheduler1 = new_run(name)
    losses = [train_step(first, optimizer1, scheduler1) for _ in range(STEPS // 2)]
    save_checkpoint(tmp_path, STEPS // 2, first, optimizer1, scheduler1)
    del first, optimizer1, scheduler1
    resumed, optimizer2, scheduler2 = new_run(name, seed=1)  # another seed: everything must come from the file
    assert load_checkpoint(latest_checkpoint(tmp_path), resumed, optimizer2, scheduler2)["step"] == STEPS // 2
    losses += [train_step(resumed, optimizer2, scheduler2) for _ in range(STEPS - STEPS // 2)]

    assert losses == straight
    assert_same_weights(model, resumed)


def test_saving_before_the_first_step_changes_nothing(tmp_path):
    """Saving a fresh optimizer must not give it state, and resuming from it must start with none."""
    model, optimizer, scheduler = new_run("gpt2")
    straight = [train_step(model, optimizer, scheduler) for _ in range(2)]

    saved, optimizer1, scheduler1 = new_run("gpt2")
    save_checkpoint(tmp_path, 0, saved, optimizer1, scheduler1)
    assert not optimizer1.state
    assert [train_step(saved, optimizer1, scheduler1) for _ in range(2)] == straight

    resumed, optimizer2, scheduler2 = new_run("gpt2", seed=1)
    load_checkpoint(tmp_path / "checkpoints" / "step-0", resumed, optimizer2, scheduler2)
    assert not optimizer2.state
    assert [train_step(resumed, optimizer2, scheduler2) for _ in range(2)] == straight
    assert_same_weights(model, resumed)


def test_tied_head_is_stored_once_and_stays_tied(tmp_path):
    model, optimizer, scheduler = new_run("gpt2")
    train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    with ckpt.safe_open(path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()

    fresh, optimizer2, _ = new_run("gpt2", seed=1)
    load_checkpoint(path, fresh, optimizer2)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------- atomicity

def test_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = new_run("mistral")
    train_step(model, optimizer, scheduler)
    good = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, scheduler)

    real_save = ckpt._torch_save

    def dies_at_the_scheduler(obj, path):
        if path.name == ckpt.SCHEDULER_FILE:
            raise KeyboardInterrupt("killed")
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", dies_at_the_scheduler)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    monkeypatch.undo()
    stale = tmp_path / "checkpoints" / ".tmp-step-2"
    assert {p.name for p in stale.iterdir()} == {"rng.pt", "model.safetensors", "optimizer.pt"}  # marker not yet
    assert not (tmp_path / "checkpoints" / "step-2").exists()
    assert latest_checkpoint(tmp_path) == good == resolve_resume("auto", tmp_path)

    fresh, optimizer2, scheduler2 = new_run("mistral", seed=1)
    assert load_checkpoint(good, fresh, optimizer2, scheduler2)["step"] == 1
    assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items())
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler)  # the next save clears what the killed one left
    assert not stale.exists() and latest_checkpoint(tmp_path).name == "step-2"


def test_ctrl_c_during_a_save_stops_after_it_with_the_checkpoint_complete(tmp_path, monkeypatch):
    """A real SIGINT inside torch.save: cut short there it surfaced as the zip writer's RuntimeError."""
    model, optimizer, scheduler = new_run("mistral")
    train_step(model, optimizer, scheduler)
    real_save = ckpt._torch_save

    def pressed_while_writing(obj, path):
        if path.name == ckpt.OPTIMIZER_FILE:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", pressed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-1"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before afterwards
    fresh, optimizer2, scheduler2 = new_run("mistral", seed=1)
    assert load_checkpoint(tmp_path / "checkpoints" / "step-1", fresh, optimizer2, scheduler2)["step"] == 1
    assert_same_weights(model, fresh)


def test_overwriting_a_step_always_leaves_a_valid_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = new_run("mistral")
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler)
    train_step(model, optimizer, scheduler)
    newer = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler)  # the same step again: replaced
    fresh, _, _ = new_run("mistral", seed=1)
    load_checkpoint(path, fresh)
    assert all(torch.equal(v, newer[k]) for k, v in fresh.state_dict().items())

    # Killed between moving the old step-3 aside and moving the new one in: the old one stands in.
    train_step(model, optimizer, scheduler)
    real_replace, calls = os.replace, []

    def dies_at_the_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, optimizer, scheduler)
    monkeypatch.undo()
    assert not path.exists()
    stand_in = latest_checkpoint(tmp_path)
    assert stand_in is not None and stand_in.name == ".old-step-3"
    fresh, _, _ = new_run("mistral", seed=1)
    load_checkpoint(stand_in, fresh)
    assert all(torch.equal(v, newer[k]) for k, v in fresh.state_dict().items())

    save_checkpoint(tmp_path, 4, model, optimizer, scheduler)  # puts step-3 back, clears the rest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model, optimizer, scheduler = new_run("mistral")
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]
    (root / "step-8").mkdir()  # incomplete: never counted, never pruned
    shutil.copytree(root / "step-5", root / "step-9")  # from a later run in the same folder: not older
    save_checkpoint(tmp_path, 6, model, optimizer, scheduler, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-6", "step-8", "step-9"]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 7, model, optimizer, scheduler, keep_last=0)


def test_a_prune_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint away before deleting it: killed mid-delete, no step-N is left half-empty."""
    model, optimizer, scheduler = new_run("mistral")
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    real_rmtree = shutil.rmtree

    def dies_after_one_file(path, *args, **kwargs):
        if Path(path).name.startswith(".del-"):
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt("killed")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".del-step-1", "step-2"]
    assert latest_checkpoint(tmp_path).name == "step-2"
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, keep_last=2)  # the next save clears the rest
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_latest_checkpoint_skips_incomplete_and_temporary_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, optimizer, scheduler = new_run("mistral")
    good = save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    shutil.copytree(good, root / ".tmp-step-9")  # complete, but never renamed into place
    shutil.copytree(good, root / "step-10")
    (root / "step-10" / "trainer_state.json").unlink()  # no completion marker
    shutil.copytree(good, root / "step-11")
    (root / "step-11" / "trainer_state.json").write_text('{"step": 11,')  # marker cut short
    shutil.copytree(good, root / "step-x")
    assert latest_checkpoint(tmp_path) == good
    shutil.copytree(good, root / "step-3")
    assert latest_checkpoint(tmp_path) == root / "step-3"


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: a fresh start
    model, optimizer, scheduler = new_run("mistral")
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    latest = save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    assert resolve_resume("auto", tmp_path) == latest
    first = tmp_path / "checkpoints" / "step-1"
    assert resolve_resume(str(first), tmp_path) == first
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    (first / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        resolve_resume(str(first), tmp_path)


# ---------------------------------------------------------------- clear errors

def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path):
    path.write_bytes(b"not a checkpoint file")


@pytest.mark.parametrize("name, damage, says", [
    ("model.safetensors", truncate, "not a readable safetensors file"),
    ("model.safetensors", os.remove, "not found"),
    ("optimizer.pt", truncate, "not readable with torch.load"),
    ("optimizer.pt", garble, "not readable with torch.load"),
    ("scheduler.pt", os.remove, "not found"),
    ("rng.pt", truncate, "not readable with torch.load"),
    ("trainer_state.json", truncate, "invalid JSON"),
    ("trainer_state.json", os.remove, "not a complete checkpoint"),
])
def test_a_damaged_file_is_named(tmp_path, name, damage, says):
    model, optimizer, scheduler = new_run("mistral")
    train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    damage(path / name)
    fresh, optimizer2, scheduler2 = new_run("mistral", seed=1)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_checkpoint(path, fresh, optimizer2, scheduler2)
    assert str(path / name) in str(e.value) and says in str(e.value)


def test_a_model_that_does_not_match_is_named(tmp_path):
    model, optimizer, _ = new_run("mistral")
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, tiny_mistral(num_hidden_layers=3, intermediate_size=48))
    message = str(e.value)
    assert str(path / "model.safetensors") in message
    assert "missing tensor 'model.layers.2.self_attn.q_proj.weight'" in message and "(and 6 more like it)" in message
    assert "\n" not in message
    assert "tensor 'model.layers.0.mlp.up_proj.weight' has shape [64, 32], the model expects [48, 32]" in message


def test_state_must_be_json_and_nothing_is_written_otherwise(tmp_path):
    model, optimizer, scheduler = new_run("mistral")
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, state={"when": object()})
    assert not (tmp_path / "checkpoints").exists()


def test_another_world_size_skips_the_rng_with_a_warning(tmp_path):
    model, optimizer, _ = new_run("mistral")
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**trainer_state, "world_size": 2}))
    os.remove(path / "rng.pt")  # a two-process save has rng-rank0.pt and rng-rank1.pt instead
    with pytest.warns(UserWarning, match="RNG streams are not restored"):
        load_checkpoint(path, tiny_mistral())
