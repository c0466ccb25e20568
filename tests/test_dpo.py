"""examples/dpo.py on the bundled tiny-mistral: metrics, the reference modes, resume, refusals, and (slow) two
torchrun processes against one. The example runs in this process through its main(), as `python examples/dpo.py`
runs it; a missing SFT model is also run as a user would, for what it prints."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minitune as mt
from minitune.plot import have_matplotlib
from tests.conftest import (
    TORCHRUN,
    example_module,
    example_stops,
    first_lines,
    read_metrics,
    resumable_copy,
    run_command,
    run_example,
    without_timing,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "dpo.py"
TINY = ROOT / "examples" / "assets" / "tiny-mistral"
TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
VAL_NAMES = ("val_loss", "val_preference_accuracy", "val_win_rate", "val_rule_score")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    """Flags for a quick run: the first 24 training pairs and 12 held-out ones, 4 pairs a step."""
    folder = tmp_path_factory.mktemp("pairs")
    files = {}
    for split, n in (("train", 24), ("validation", 12)):
        source = ROOT / "examples" / "data" / "preference" / f"{split}.jsonl"
        files[split] = first_lines(source, n, folder / f"{split}.jsonl")
    return ["--model", str(TINY), "--data", str(files["train"]), "--val-data", str(files["validation"]),
            "--batch-size", "4", "--warmup", "1", "--eval-every", "2", "--win-rate-samples", "6", "--device", "cpu"]


def run(out: Path, *args: str) -> list[dict]:
    return run_example("dpo.py", out, *args)


def fails(out: Path, *args: str) -> str:
    return example_stops("dpo.py", out, *args)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small) -> tuple[Path, list[str], list[dict]]:
    """Plain DPO (no RPO term) with the frozen-copy reference, 6 steps, a checkpoint at step 3, validated every 2
    steps; several tests read it. (folder, its flags, its metrics)"""
    out = tmp_path_factory.mktemp("dpo")
    flags = [*small, "--max-steps", "6", "--save-every", "3", "--rpo-alpha", "0"]
    return out, flags, run(out, *flags)


def test_a_run_logs_trl_metrics_starts_at_the_reference_and_saves_the_model(straight):
    out, _, metrics = straight
    first, step1 = metrics[0], metrics[1]
    # before any update the policy is the reference: every reward is 0, the loss ln 2, agreement and win rate 1/2
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["val_preference_accuracy"] == 0.5 and first["val_win_rate"] == 0.5
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step1["rewards/chosen"] == step1["rewards/rejected"] == step1["rewards/margins"] == 0.0
    assert step1["rewards/accuracies"] == 0.0  # TRL's: a tie is not a win
    assert all(name in m for m in metrics[1:] for name in (*TRL_NAMES, "lr", "grad_norm", "tokens_per_s"))
    assert not any("nll_loss" in m for m in metrics)  # no RPO term, no metric for it
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 2, 4, 6]
    assert all(set(VAL_NAMES) <= m.keys() for m in metrics if "val_loss" in m)
    assert metrics[-1]["rewards/chosen"] != 0 and metrics[-1]["val_loss"] != first["val_loss"]  # the policy moved
    assert step1["logps/chosen"] < 0 and step1["logps/rejected"] < 0
    model = mt.load_model(out / "final")
    assert not torch.equal(model.lm_head.weight, mt.load_model(TINY).lm_head.weight)
    if have_matplotlib():
        assert (out / "training.png").exists()


def test_rpo_adds_the_chosen_answers_nll_per_token():
    dpo = example_module("dpo.py")
    pairs = [{"chosen": {"input_ids": [4, 5, 6, 7], "labels": [-100, 5, 6, 7]},
              "rejected": {"input_ids": [4, 8, 9, 3], "labels": [-100, 8, 9, -100]}},
             {"chosen": {"input_ids": [4, 4, 5, 3], "labels": [-100, -100, 5, -100]},
              "rejected": {"input_ids": [4, 1, 2, 3], "labels": [-100, 1, 2, 3]}}]
    for pack_length in (None, 8):  # rows, or the four answers packed into rows of 8
        tokens = dpo.answer_tokens(mt.data.collate_preferences(pairs, 0, pack_length))  # the chosen answers'
        assert tokens.tolist() == [3, 1]
    chosen = torch.tensor([-6.0, -3.0])  # their summed (or, with average, mean) log-probabilities
    torch.testing.assert_close(dpo.chosen_nll(chosen, tokens, average=False), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(dpo.chosen_nll(chosen, tokens, average=True), torch.tensor([6.0, 3.0]))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_the_three_reference_modes_train_the_same_way(tmp_path, small, straight):
    """Full fine-tuning with a frozen copy or precomputed log-probs, LoRA with the adapter disabled or
    precomputed: the same losses, rewards and held-out numbers step for step."""
    _, flags, copy = straight
    pre = run(tmp_path / "pre", *flags, "--reference", "precomputed")
    lora = [*small, "--max-steps", "3", "--lora-r", "4", "--lora-targets", "all-linear", "--lr", "1e-2"]  # RPO on
    disabled = run(tmp_path / "disabled", *lora)  # lora-disabled is the default with LoRA
    lora_pre = run(tmp_path / "lora-pre", *lora, "--reference", "precomputed")
    assert (tmp_path / "pre" / "reference_logps.safetensors").exists()
    for a, b in ((copy, pre), (disabled, lora_pre)):
        for x, y in zip(without_timing(a), without_timing(b), strict=True):
            assert x.keys() == y.keys()
            for key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (key, x, y)
    assert disabled[-1]["rewards/margins"] != 0 and "nll_loss" in disabled[-1]  # LoRA trained, with RPO's term
    assert (tmp_path / "disabled" / "adapter" / "adapter_config.json").exists()


def test_resume_continues_the_same_run_bit_for_bit(tmp_path, straight):
    """The run killed after its step-3 save and resumed with --resume auto: the same metrics and weights. With
    the frozen-copy reference, the resumed run must take its reference from --model again (not from the
    resumed policy), or its losses would differ."""
    out, flags, metrics = straight
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    cut = resumable_copy(out, tmp_path / "cut")
    resumed = run(cut, *flags, "--resume", "auto")  # steps 4-6 again, from the checkpoint
    assert without_timing(resumed) == without_timing(metrics)
    weights, again = final_weights(out), final_weights(cut)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert "other settings" in fails(cut, *flags, "--resume", "auto", "--beta", "0.5")


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process_with_the_same_global_batch(tmp_path, small):
    """DDP with LoRA and the disabled-adapter reference (the base model's forward beside the wrapped policy)."""
    lora = ["--max-steps", "2", "--grad-accum", "2", "--lora-r", "4", "--lr", "1e-2", "--warmup", "0"]
    one = run(tmp_path / "one", *small, *lora, "--batch-size", "4")
    returncode, stderr = run_command([*TORCHRUN, str(SCRIPT), "--out", str(tmp_path / "two"), *small, *lora,
                                      "--batch-size", "2"])
    assert returncode == 0, stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    for a, b in zip(without_timing(one), without_timing(two), strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert one[-1]["rewards/margins"] != 0 and "nll_loss" in one[-1]  # RPO's term, on by default, is logged


def test_flags_resolve_and_refuse_what_dpo_cannot_do(capsys):
    dpo = example_module("dpo.py")
    args = dpo.parse_args(["--model", str(TINY)])
    assert (args.reference, args.average_logps, args.rpo_alpha) == ("copy", False, 1.0)
    args = dpo.parse_args(["--model", str(TINY), "--loss-type", "ipo", "--lora-r", "8"])
    assert (args.reference, args.average_logps) == ("lora-disabled", True)  # IPO's length-normalised form
    assert dpo.parse_args(["--model", str(TINY), "--loss-type", "ipo", "--no-average-logps"]).average_logps is False
    for flags, message in ((["--reference", "lora-disabled"], "needs LoRA"),
                           (["--lora-r", "4", "--lora-dropout", "0.1"], "DPO trains without dropout"),
                           (["--loss-type", "hinge", "--label-smoothing", "0.1"], "not to hinge"),
                           (["--quantize", "nf4"], "--quantize nf4 holds the base in 4 bits, which cannot be trained")):
        with pytest.raises(SystemExit):
            dpo.parse_args(["--model", str(TINY), *flags])
        assert message in capsys.readouterr().err


def test_bad_data_is_refused_with_its_file_and_line(tmp_path, small):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    assert f"{bad}:2: missing field 'rejected'" in fails(tmp_path / "d", *small, "--data", str(bad))


def test_a_missing_sft_model_is_one_line_that_says_how_to_make_it(tmp_path):
    """As a user sees it: the default --model is the SFT example's output."""
    returncode, stderr = run_command([sys.executable, str(SCRIPT), "--out", str(tmp_path / "c")], cwd=tmp_path)
    assert returncode == 2 and "runs/sft/final not found" in stderr and "finetune_mistral.py" in stderr


@pytest.mark.filterwarnings("ignore:decode. dropped ids")  # a random model may pick an embedding row no token uses
def test_qlora_dpo_starts_at_the_reference_and_trains_the_adapters_over_a_4_bit_base(tmp_path, small):
    """--quantize nf4 with LoRA: the reference is the same 4-bit model with the adapters off (no second copy of the
    weights), so the first step's DPO loss is ln 2; the adapters train."""
    flags = [*small, "--max-steps", "2", "--lora-r", "4", "--lora-targets", "all-linear", "--quantize", "nf4",
             "--rpo-alpha", "0", "--lr", "1e-2"]
    metrics = run(tmp_path / "out", *flags)
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[-1]["step"] == 2 and metrics[-1]["rewards/margins"] != 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_a_tiny_qwen2_runs_dpo_through_the_same_example(tmp_path, small):
    """--model <a tiny saved Qwen2 folder>: DPO trains it (LoRA, the reference with LoRA off) and saves a Qwen2."""
    import transformers

    from tests.conftest import tiny_family_folder

    folder = tiny_family_folder("qwen2", tmp_path / "qwen2")
    flags = [*small[2:], "--model", str(folder), "--max-steps", "2", "--lora-r", "4", "--lora-targets", "all-linear"]
    metrics = run(tmp_path / "out", *flags)
    assert metrics[-1]["step"] == 2 and all(math.isfinite(m["loss"]) for m in metrics[1:])
    final = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert type(final).__name__ == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_dpo_losses(tmp_path, small):
    """--compile with LoRA and the disabled-adapter reference: the compiled blocks run with the adapters on and off."""
    flags = [*small, "--max-steps", "2", "--lora-r", "4", "--reference", "lora-disabled"]
    eager, compiled = run(tmp_path / "eager", *flags), run(tmp_path / "compiled", *flags, "--compile")
    # the continuous metrics; accuracies and greedy answers count ties and argmaxes, which a rounding can flip
    # (at step 0 the policy is the reference: every reward is a tie)
    continuous = ("loss", "val_loss", "grad_norm", "nll_loss", "logps/chosen", "logps/rejected", "rewards/chosen",
                  "rewards/rejected", "rewards/margins")
    for a, b in zip(without_timing(eager), without_timing(compiled), strict=True):
        for key in continuous:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (key, a, b)


def test_packed_pairs_train_as_padded_ones(tmp_path, small):
    """--packing: each micro-batch's answers packed into rows (best-fit decreasing) instead of a row each; the same
    pairs a step, so the same metrics (the reference: LoRA disabled, through the same packed rows)."""
    flags = [*small, "--max-steps", "2", "--lora-r", "4"]
    padded, packed = run(tmp_path / "padded", *flags), run(tmp_path / "packed", *flags, "--packing")
    for a, b in zip(without_timing(padded), without_timing(packed), strict=True):
        for key in a:  # log-probabilities near -700 agree to ~1e-5 of them: rewards, their differences, to ~1e-5
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (key, a, b)
