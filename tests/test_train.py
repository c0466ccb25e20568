"""minitune.train: the shared plumbing flags, each example's own hyperparameters, autocast, the all-reduce and
metrics.jsonl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from minitune.train import MetricsLog, add_common_args, all_reduce_sum, autocast, parse_common_args
from tests.conftest import example_module

# the plumbing flags, which the shared helper adds
PLUMBING = ("--model --data --out --resume --overwrite --device --dtype --seed --eval-every --save-every "
            "--keep-last --grad-checkpointing --offload-checkpoints --packing --compile").split()
# the training hyperparameters each example declares itself, with the defaults each had before (dests)
TRAINING = {
    "finetune_mistral.py": dict(max_steps=None, epochs=1.0, batch_size=16, grad_accum=1, lr=1e-3, warmup=20,
                                schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, eval_every=10, save_every=25),
    "dpo.py": dict(max_steps=None, epochs=3.0, batch_size=16, grad_accum=1, lr=1e-3, warmup=10, schedule="cosine",
                   weight_decay=0.0, max_grad_norm=1.0, eval_every=20, save_every=50, beta=0.1, loss_type="sigmoid"),
    "finetune_gpt.py": dict(max_steps=None, epochs=1.0, batch_size=16, grad_accum=1, lr=2e-3, warmup=10,
                            schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, eval_every=25, save_every=1000),
}
TINY = str(Path(__file__).resolve().parents[1] / "examples" / "assets" / "tiny-mistral")


def parser() -> argparse.ArgumentParser:
    return add_common_args(argparse.ArgumentParser(prog="example"), model="m", data=__file__, out="runs/x",
                           eval_every=7)  # a data file that exists: parse_common_args checks


def test_the_shared_helper_adds_only_the_plumbing_flags():
    p = parser()
    flags = {s for action in p._actions for s in action.option_strings} - {"-h", "--help"}
    assert flags == set(PLUMBING)
    args = parse_common_args(p, ["--device", "cpu"])
    assert (args.model, args.data, args.out, args.eval_every, args.save_every) == ("m", __file__, "runs/x", 7, 100)
    assert args.dtype == "float32"  # the CPU's default
    if torch.cuda.is_available():
        assert parse_common_args(p, ["--device", "cuda"]).dtype == "bfloat16"


def test_offloaded_checkpoints_need_checkpointing(capsys):
    with pytest.raises(SystemExit):
        parse_common_args(parser(), ["--device", "cpu", "--offload-checkpoints"])
    assert "--offload-checkpoints moves the checkpoints of --grad-checkpointing to CPU memory: add it" in \
        capsys.readouterr().err
    args = parse_common_args(parser(), ["--device", "cpu", "--grad-checkpointing", "--offload-checkpoints"])
    assert args.grad_checkpointing and args.offload_checkpoints


@pytest.mark.parametrize("script", TRAINING)
def test_each_example_declares_its_hyperparameters_with_the_defaults_it_had(script):
    example = example_module(script)
    args = vars(example.parse_args(["--model", TINY, "--device", "cpu"]))
    assert {k: args[k] for k in TRAINING[script]} == TRAINING[script]
    source = Path(example.__file__).read_text()
    for flag in ("--max-steps", "--epochs", "--batch-size", "--grad-accum", "--lr", "--warmup", "--schedule",
                 "--weight-decay", "--max-grad-norm"):
        assert f'p.add_argument("{flag}"' in source, (script, flag)  # in the example's own file


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    (["--grad-accum", "-2"], "argument --grad-accum: must be at least 1, not -2"),
    (["--eval-every", "0"], "argument --eval-every: must be at least 1, not 0"),
    (["--max-steps", "0"], "argument --max-steps: must be at least 1, not 0"),
    (["--lr", "0"], "argument --lr: must be above 0.0, not 0.0"),
    (["--lr", "nan"], "argument --lr: must be above 0.0, not nan"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, not -1"),
    (["--max-grad-norm", "-1"], "argument --max-grad-norm: must be at least 0.0, not -1.0"),
    (["--epochs", "1.5x"], "argument --epochs: invalid positive_float value: '1.5x'"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--schedule", "cosin"], "invalid choice: 'cosin'"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        example_module("finetune_mistral.py").parse_args(argv)
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


def test_all_reduce_sum_outside_torch_distributed_is_the_values_by_name():
    summed = all_reduce_sum({"loss": torch.tensor(1.5), "count": 2, "tokens": torch.tensor(7), "share": 0.1},
                            torch.device("cpu"))
    assert summed == {"loss": 1.5, "count": 2.0, "tokens": 7.0, "share": 0.1}  # a Python float keeps its 64 bits
