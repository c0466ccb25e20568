"""minitune.train: the shared command line, autocast and metrics.jsonl."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from minitune.train import MetricsLog, add_common_args, all_reduce_sum, autocast, parse_common_args

# DESIGN.md's "Shared flags", verbatim
DESIGN_FLAGS = ("--model --data --out --max-steps --epochs --batch-size --grad-accum --lr --warmup --schedule --seed "
                "--device --dtype --eval-every --save-every --resume --grad-checkpointing --packing").split()


def parser(**defaults) -> argparse.ArgumentParser:
    return add_common_args(argparse.ArgumentParser(prog="example"), model="m", data="d.jsonl", out="runs/x",
                           **defaults)


def test_every_design_flag_is_there_with_the_example_defaults():
    p = parser(lr=5e-4, batch_size=3)
    flags = {s for action in p._actions for s in action.option_strings}
    assert set(DESIGN_FLAGS) <= flags
    args = parse_common_args(p, ["--device", "cpu"])
    assert (args.model, args.data, args.out, args.lr, args.batch_size) == ("m", "d.jsonl", "runs/x", 5e-4, 3)
    assert args.dtype == "float32"  # the CPU's default
    assert parse_common_args(p, ["--device", "cuda"]).dtype == "bfloat16"  # parsing only: no GPU needed
    assert parse_common_args(p, ["--max-steps", "7", "--packing", "--resume", "auto"]).max_steps == 7


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--grad-accum", "-2"], "--grad-accum must be at least 1, not -2"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--max-steps", "0"], "--max-steps must be at least 1, not 0"),
    (["--lr", "0"], "--lr must be positive"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--schedule", "cosin"], "invalid choice: 'cosin'"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_common_args(parser(), argv)
    assert message in capsys.readouterr().err


def test_metrics_log_appends_and_a_resumed_log_drops_what_came_after_the_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(4):
        log.write({"step": step, "loss": 1.0 / (step + 1)})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    resumed = MetricsLog(path, log.records[:2])  # a checkpoint saved at step 1
    resumed.write({"step": 2, "loss": 0.25})
    assert [json.loads(line) for line in path.read_text().splitlines()] == resumed.records
    assert [r["step"] for r in resumed.records] == [0, 1, 2]
    quiet = MetricsLog(tmp_path / "rank1" / "metrics.jsonl", enabled=False)
    quiet.write({"step": 1})
    assert quiet.records == [{"step": 1}] and not (tmp_path / "rank1").exists()


def test_autocast_is_bf16_only_when_asked():
    x = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bfloat16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "float32"):
        assert (x @ x).dtype == torch.float32


def test_all_reduce_sum_outside_torch_distributed_is_the_values():
    assert all_reduce_sum([1.5, 2], torch.device("cpu")) == [1.5, 2]
