"""(slow) --fsdp through the examples, as a user runs them under torchrun: two gloo processes follow one process with
the same global batch (SFT and DPO; full fine-tuning, LoRA and QLoRA), their consolidated final/ and adapter/ are
the single process's, and a two-process run resumed from its sharded checkpoint repeats the straight run bit for
bit. Validation and greedy generation run in lockstep: the held-out sets below do not split evenly over two ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TORCHRUN, first_lines, read_metrics, resumable_copy, run_command, run_example, without_timing

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "assets" / "tiny-mistral"
LOSSES = ("loss", "val_loss", "nll_loss")  # within 1e-5 relative; the other metrics within 1e-4


def torchrun(script: str, out: Path, *args: str) -> list[dict]:
    returncode, stderr = run_command([*TORCHRUN, str(ROOT / "examples" / script), "--out", str(out), *args])
    assert returncode == 0, stderr[-3000:]
    return read_metrics(out)


def assert_follows(one: list[dict], two: list[dict]) -> None:
    assert len(one) == len(two)
    for a, b in zip(without_timing(one), without_timing(two), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5 if key in LOSSES else 1e-4, abs=1e-6), (key, a, b)


def assert_same_files(one: Path, two: Path, names: tuple[str, ...], atol: float = 1e-6) -> None:
    for name in names:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=atol, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    source = ROOT / "examples" / "data" / "sft" / "train.jsonl"
    return first_lines(source, 10, tmp_path_factory.mktemp("chats") / "train.jsonl")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[str]:
    """24 training pairs, and 11 held-out ones with 5 prompts answered: shares of 6 and 5, 3 and 2 on two ranks."""
    folder = tmp_path_factory.mktemp("pairs")
    for split, n in (("train", 24), ("validation", 11)):
        first_lines(ROOT / "examples" / "data" / "preference" / f"{split}.jsonl", n, folder / f"{split}.jsonl")
    return ["--model", str(TINY), "--data", str(folder / "train.jsonl"), "--val-data", str(folder / "validation.jsonl"),
            "--warmup", "1", "--eval-every", "2", "--win-rate-samples", "5", "--device", "cpu"]


def test_full_sft_follows_one_process_and_resumes_from_its_sharded_checkpoint_bit_for_bit(tmp_path, chats):
    """Killed after its step-3 save and resumed (with the shards offloaded to the CPU, a no-op there but the same
    code path), the run repeats the straight one bit for bit."""
    flags = ["--data", str(chats), "--eval-every", "3", "--exact-match-samples", "3", "--device", "cpu",
             "--max-steps", "6", "--grad-accum", "2", "--save-every", "3"]
    one = run_example("finetune_mistral.py", tmp_path / "one", *flags, "--batch-size", "8")
    two = torchrun("finetune_mistral.py", tmp_path / "two", *flags, "--batch-size", "4", "--fsdp")
    assert_follows(one, two)
    assert_same_files(tmp_path / "one", tmp_path / "two", ("final/model.safetensors",))
    step_3 = tmp_path / "two" / "checkpoints" / "step-3"
    assert sorted(p.name for p in (step_3 / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    cut = resumable_copy(tmp_path / "two", tmp_path / "cut")  # as a run killed after its step-3 save leaves it
    resumed = torchrun("finetune_mistral.py", cut, *flags, "--batch-size", "4", "--fsdp", "--resume", "auto",
                       "--fsdp-offload")  # a resumable flag: where the shards live changes no number
    assert without_timing(resumed) == without_timing(two)
    straight, again = (load_file(run / "final" / "model.safetensors") for run in (tmp_path / "two", cut))
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_qlora_sft_follows_one_process_with_its_adapter_and_merged_model(tmp_path, chats):
    """LoRA over a 4-bit base: the NF4 codes, block maxima and scales are sharded with the rest; final/ is the merged
    model, gathered to rank 0 and dequantized there."""
    flags = ["--data", str(chats), "--eval-every", "2", "--exact-match-samples", "3", "--device", "cpu",
             "--max-steps", "4", "--grad-accum", "2", "--lora-r", "4", "--lora-targets", "all-linear", "--quantize",
             "nf4", "--lr", "3e-3"]
    one = run_example("finetune_mistral.py", tmp_path / "one", *flags, "--batch-size", "8")
    two = torchrun("finetune_mistral.py", tmp_path / "two", *flags, "--batch-size", "4", "--fsdp")
    assert_follows(one, two)
    assert_same_files(tmp_path / "one", tmp_path / "two",
                      ("final/model.safetensors", "adapter/adapter_model.safetensors"))


@pytest.mark.parametrize("mode", [["--reference", "copy"], ["--lora-r", "4"]], ids=["full-copy", "lora-disabled"])
def test_dpo_follows_one_process(tmp_path, pairs, mode):
    """Full DPO with the frozen reference copy sharded like the policy, and LoRA DPO with the adapters switched off."""
    flags = [*pairs, "--max-steps", "4", "--grad-accum", "2", "--lr", "1e-2", *mode]
    one = run_example("dpo.py", tmp_path / "one", *flags, "--batch-size", "4")
    two = torchrun("dpo.py", tmp_path / "two", *flags, "--batch-size", "2", "--fsdp")
    assert_follows(one, two)
    assert "val_win_rate" in two[-1]
    # AdamW's m / sqrt(v) turns rounding-level differences of near-zero gradients into up to lr-sized steps: the
    # weights agree to 1% of one step (lr 1e-2)
    assert_same_files(tmp_path / "one", tmp_path / "two", ("final/model.safetensors",), atol=1e-4)


def test_compiled_blocks_under_fsdp_follow_one_eager_process(tmp_path, chats):
    """--compile with --fsdp: each sharded block through torch.compile (compiled after fully_shard), LoRA inside."""
    flags = ["--data", str(chats), "--eval-every", "3", "--exact-match-samples", "2", "--device", "cpu",
             "--max-steps", "3", "--lora-r", "4", "--lora-targets", "all-linear"]
    one = run_example("finetune_mistral.py", tmp_path / "one", *flags, "--batch-size", "8")
    two = torchrun("finetune_mistral.py", tmp_path / "two", *flags, "--batch-size", "4", "--fsdp", "--compile")
    assert_follows(one, two)
