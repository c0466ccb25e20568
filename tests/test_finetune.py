"""examples/finetune_mistral.py end to end on the bundled tiny-mistral: resume, data parallelism, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import example_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_mistral.py"
SMALL = ["--batch-size", "4", "--eval-every", "5", "--exact-match-samples", "2", "--device", "cpu"]


def run(out: Path, *args: str, torchrun: bool = False) -> list[dict]:
    """Run the example (under torchrun with 2 gloo processes if asked); its metrics.jsonl."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
        if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    returncode, stderr = _run([*launcher, str(SCRIPT), "--out", str(out), *SMALL, *args], env=env)
    assert returncode == 0, stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(command: list[str], env: dict | None = None, timeout: float = 300, cwd: Path | None = None
         ) -> tuple[int, str]:
    """(exit status, stderr). On a timeout the whole process group goes, torchrun's workers included."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=cwd)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n{stderr[-3000:]}")
    return proc.returncode, stderr


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def small_data(tmp_path: Path, n: int = 30) -> Path:
    """The first n bundled training chats: 20 steps of 4 cross two epoch boundaries."""
    path = tmp_path / "small.jsonl"
    lines = (ROOT / "examples" / "data" / "sft" / "train.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resume_continues_the_same_run_bit_for_bit(tmp_path):
    """20 steps straight, and 10 + a checkpoint + resume --auto + 10, give identical weights and metrics:
    across epoch boundaries (30 examples, 4 a step), through warmup and into the cosine decay."""
    flags = ["--data", str(small_data(tmp_path)), "--max-steps", "20", "--warmup", "2", "--eval-every", "5"]
    straight = run(tmp_path / "straight", *flags)
    run(tmp_path / "resumed", *flags, "--save-every", "10", "--keep-last", "1")
    # what a run killed after its step-10 save leaves: the checkpoint...
    (tmp_path / "cut").mkdir()
    os.replace(tmp_path / "resumed" / "checkpoints", tmp_path / "cut" / "checkpoints")
    # ... and lines the killed run logged after that save, which the resumed run must not keep
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"step": 13, "loss": 123.0}\n')
    resumed = run(tmp_path / "cut", *flags, "--save-every", "10", "--resume", "auto")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in straight]
    assert [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in resumed] == strip


def test_two_gloo_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    one = run(tmp_path / "one", "--max-steps", "6", "--batch-size", "8", "--grad-accum", "2")
    two = run(tmp_path / "two", "--max-steps", "6", "--batch-size", "4", "--grad-accum", "2", torchrun=True)
    for a, b in zip(one[1:], two[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)  # DDP averages: scaled right
    assert two[-1]["step"] == 6
    # validation is split over the ranks and summed: the same numbers as one process computing all of it
    for a, b in [(one[0], two[0]), (one[-1], two[-1])]:
        for key in ("val_loss", "val_token_acc", "val_exact_match"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)


def test_metrics_use_the_design_names_and_validation_starts_at_step_0(tmp_path):
    metrics = run(tmp_path / "m", "--max-steps", "5")
    assert set(metrics[0]) == {"step", "val_loss", "val_ppl", "val_token_acc", "val_exact_match"}
    assert metrics[0]["step"] == 0
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[1])
    assert {"val_loss", "val_ppl", "val_token_acc", "val_exact_match"} <= set(metrics[-1])
    assert (tmp_path / "m" / "final" / "config.json").is_file()
    assert (tmp_path / "m" / "final" / "tokenizer.json").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "m" / "training.png").stat().st_size > 10_000


def test_a_non_finite_step_stops_the_run_before_it_touches_the_weights(tmp_path):
    out = tmp_path / "nf"
    message = _fails(out, "--max-steps", "10", "--lr", "1e6", "--warmup", "0", "--save-every", "1")
    assert "stopped before updating the weights" in message, message[-2000:]
    failed = int(re.search(r"step (\d+): the loss is", message).group(1))
    saved = sorted(int(d.name.removeprefix("step-")) for d in (out / "checkpoints").iterdir())
    assert saved[-1] == failed - 1, (saved, failed)  # the step before the failure, saved and kept
    kept = load_file(out / "checkpoints" / f"step-{failed - 1}" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (out / "final").exists()


def test_a_resumed_run_takes_a_new_learning_rate(tmp_path):
    """--lr is the one setting a resume may change (after a blow-up): the schedule goes on at the new peak."""
    out = tmp_path / "lr"
    first = run(out, "--max-steps", "4", "--save-every", "2", "--warmup", "0", "--lr", "1e-3")
    again = run(out, "--max-steps", "4", "--save-every", "2", "--warmup", "0", "--lr", "5e-4", "--resume", "auto")
    assert again[:3] == first[:3]  # steps 0-2 come from the checkpoint
    assert [m["lr"] for m in again[3:]] == pytest.approx([m["lr"] / 2 for m in first[3:]])


def test_accumulation_normalises_by_the_targets_of_the_whole_batch():
    """Two micro-batches of 2 give the step that one batch of 4 gives, though their target counts differ."""
    import contextlib

    import minitune as mt
    from minitune.data import collate

    fm = example_module("finetune_mistral.py")
    torch.manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 50, (n,)).tolist()} for n in (3, 12, 5, 9)]
    for ex in examples:
        ex["labels"] = list(ex["input_ids"])
    config = mt.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2)
    results = []
    for split in ([examples], [examples[:2], examples[2:]]):
        torch.manual_seed(1)
        model = mt.Mistral(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        result = fm.train_step(model, [collate(b, 0) for b in split], optimizer, scheduler, contextlib.nullcontext)
        assert result["tokens"] == 3 + 12 + 5 + 9
        results.append((result["loss"], [p.detach().clone() for p in model.parameters()]))
    (loss_one, params_one), (loss_two, params_two) = results
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    for a, b in zip(params_one, params_two, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _fails(out: Path, *args: str) -> str:
    returncode, stderr = _run([sys.executable, str(SCRIPT), "--out", str(out), *SMALL, *args])
    assert returncode != 0
    return stderr


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    out = tmp_path / "r"
    run(out, "--max-steps", "4", "--save-every", "2")
    assert "holds another run's checkpoints" in _fails(out, "--max-steps", "4", "--save-every", "2")
    message = _fails(out, "--max-steps", "4", "--save-every", "2", "--resume", "auto", "--batch-size", "8")
    assert "'batch_size': (4, 8)" in message
    message = _fails(out, "--max-steps", "4", "--save-every", "2", "--resume", "auto", "--warmup", "1")
    assert "'warmup': (20, 1)" in message
    # other training data under the same path: its content is compared, not its name
    data = small_data(tmp_path)
    run(tmp_path / "d", "--data", str(data), "--max-steps", "4", "--save-every", "2")
    data.write_text("\n".join(data.read_text().splitlines()[1:]) + "\n")
    assert "train_sha256" in _fails(tmp_path / "d", "--data", str(data), "--max-steps", "4", "--save-every", "2",
                                    "--resume", "auto")


def test_resume_auto_after_a_first_save_was_killed_starts_afresh(tmp_path):
    out = tmp_path / "k"
    (out / "checkpoints" / ".tmp-step-2").mkdir(parents=True)  # what a save killed midway leaves
    metrics = run(out, "--max-steps", "2", "--save-every", "1", "--resume", "auto")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]


def test_prompt_completion_data_trains_and_validates(tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?\n", "completion": str(i + 1)}) + "\n"
                            for i in range(40)))
    metrics = run(tmp_path / "pc", "--data", str(data), "--val-data", "", "--val-fraction", "0.1", "--max-steps", "5")
    assert "val_exact_match" in metrics[-1]


def test_an_error_in_the_data_names_its_line_in_the_file(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    assert f"{data}:3" in _fails(tmp_path / "bad", "--data", str(data), "--val-data", str(data), "--max-steps", "1")


def test_lora_run_saves_an_adapter_and_a_merged_model_and_resumes_exactly(tmp_path):
    import minitune as mt

    lora = ["--lora-r", "4", "--lora-targets", "q_proj", "v_proj", "down_proj", "--lr", "3e-3", "--warmup", "1"]
    straight = run(tmp_path / "straight", "--max-steps", "4", *lora)
    run(tmp_path / "cut", "--max-steps", "4", "--save-every", "2", *lora)
    (tmp_path / "cut" / "final").rename(tmp_path / "first-final")
    resumed = run(tmp_path / "cut", "--max-steps", "4", "--save-every", "2", "--resume", "auto", *lora)
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in straight]
    assert [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in resumed] == strip
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [k for k in a if "lora" in k]  # the merged model is a plain checkpoint
    base = ROOT / "examples" / "assets" / "tiny-mistral"
    assert any(not torch.equal(a[k], load_file(base / "model.safetensors")[k]) for k in a)  # it did train
    adapted = mt.lora.load_adapter(mt.load_model(base).eval(), tmp_path / "straight" / "adapter")
    merged = mt.load_model(tmp_path / "straight" / "final").eval()
    x = torch.tensor([mt.load_tokenizer(base).encode("What is 3 plus 4?")])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), merged(x), atol=1e-5, rtol=1e-5)
