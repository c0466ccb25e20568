"""examples/finetune_mistral.py on the bundled tiny-mistral: metrics, resume, accumulation, refusals, LoRA, and
(slow) two torchrun processes against one. The example runs in this process through its main(), as
`python examples/finetune_mistral.py` runs it; a failing run is also run as a user would, for what it prints."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
SCRIPT = ROOT / "examples" / "finetune_mistral.py"
SMALL = ["--batch-size", "4", "--eval-every", "4", "--exact-match-samples", "2", "--device", "cpu"]


def run(out: Path, *args: str) -> list[dict]:
    return run_example("finetune_mistral.py", out, *SMALL, *args)


def fails(out: Path, *args: str) -> str:
    return example_stops("finetune_mistral.py", out, *SMALL, *args)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The first 10 bundled training chats: 8 steps of 4 cross three epoch boundaries."""
    chats = ROOT / "examples" / "data" / "sft" / "train.jsonl"
    return first_lines(chats, 10, tmp_path_factory.mktemp("data") / "small.jsonl")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_data) -> tuple[Path, list[str], list[dict]]:
    """One run that several tests read: 8 steps through warmup into the cosine decay, across epoch boundaries,
    validated at steps 0, 4 and 8, with a checkpoint at step 4. (folder, its flags, its metrics)"""
    out = tmp_path_factory.mktemp("straight")
    flags = ["--data", str(small_data), "--max-steps", "8", "--warmup", "2", "--save-every", "4"]
    return out, flags, run(out, *flags)


def test_metrics_use_the_design_names_and_validation_starts_at_step_0(straight):
    out, _, metrics = straight
    assert set(metrics[0]) == {"step", "val_loss", "val_ppl", "val_token_acc", "val_exact_match"}
    assert metrics[0]["step"] == 0
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[1])
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 4, 8]
    assert (out / "final" / "config.json").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "training.png").stat().st_size > 10_000


def test_resume_continues_the_same_run_bit_for_bit(straight, tmp_path):
    """8 steps straight, and the same run killed after its step-4 save and resumed with --resume auto, give
    identical weights and metrics: across epoch boundaries, through warmup and into the cosine decay."""
    out, flags, metrics = straight
    # the checkpoint, and a line the killed run logged after that save, which the resumed run must not keep
    cut = resumable_copy(out, tmp_path / "cut", '{"step": 6, "loss": 123.0}\n')
    resumed = run(cut, *flags, "--resume", "auto")
    a, b = weights(out), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(resumed) == without_timing(metrics)


def test_a_resumed_run_takes_a_new_learning_rate(straight, tmp_path):
    """--lr is the one setting a resume may change (after a blow-up): the schedule goes on at the new peak."""
    out, flags, metrics = straight
    again = run(resumable_copy(out, tmp_path / "lr"), *flags, "--lr", "5e-4", "--resume", "auto")  # it ran at 1e-3
    assert again[:5] == metrics[:5]  # steps 0-4 come from the checkpoint
    assert [m["lr"] for m in again[5:]] == pytest.approx([m["lr"] / 2 for m in metrics[5:]])


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_old_checkpoints(straight, tmp_path):
    out, flags, _ = straight
    saved = resumable_copy(out, tmp_path / "r")
    assert "holds an earlier run (checkpoints, metrics.jsonl): pass --resume auto" in fails(saved, *flags)
    assert "'batch_size': (4, 8)" in fails(saved, *flags, "--resume", "auto", "--batch-size", "8")
    assert "'warmup': (2, 1)" in fails(saved, *flags, "--resume", "auto", "--warmup", "1")
    # other training data under another path: its content is compared, not its name
    data = Path(flags[flags.index("--data") + 1])
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(data.read_text().splitlines()[1:]) + "\n")
    changed = [*flags[:flags.index("--data")], "--data", str(other), *flags[flags.index("--data") + 2:]]
    assert "train_sha256" in fails(saved, *changed, "--resume", "auto")
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["step-4"]  # nothing written


def test_a_non_finite_step_stops_the_run_before_it_touches_the_weights(tmp_path, small_data):
    out = tmp_path / "nf"
    message = fails(out, "--data", str(small_data), "--max-steps", "10", "--lr", "1e6", "--warmup", "0",
                    "--save-every", "1")
    assert "stopped before updating the weights" in message, message
    failed = int(re.search(r"step (\d+): the loss is", message).group(1))
    saved = sorted(int(d.name.removeprefix("step-")) for d in (out / "checkpoints").iterdir())
    assert saved[-1] == failed - 1, (saved, failed)  # the step before the failure, saved and kept
    kept = load_file(out / "checkpoints" / f"step-{failed - 1}" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (out / "final").exists()


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


def test_resume_auto_after_a_first_save_was_killed_starts_afresh(tmp_path, small_data):
    out = tmp_path / "k"
    (out / "checkpoints" / ".tmp-step-2").mkdir(parents=True)  # what a save killed midway leaves
    metrics = run(out, "--data", str(small_data), "--max-steps", "2", "--save-every", "1", "--resume", "auto")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]


def test_prompt_completion_data_trains_and_validates(tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?\n", "completion": str(i + 1)}) + "\n"
                            for i in range(40)))
    metrics = run(tmp_path / "pc", "--data", str(data), "--val-data", "", "--val-fraction", "0.1", "--max-steps", "3")
    assert "val_exact_match" in metrics[-1] and metrics[-1]["step"] == 3


def test_an_error_in_the_data_is_one_line_naming_its_line_in_the_file(tmp_path):
    """As a user sees it: the run stops with exit status 2 and one line on stderr, the file and line of the bad
    record, no traceback; nothing is written."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    returncode, stderr = run_command([sys.executable, str(SCRIPT), "--out", str(tmp_path / "bad"), *SMALL,
                                      "--data", str(data), "--val-data", str(data), "--max-steps", "1"])
    assert returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"finetune_mistral.py: error: {data}:3: ") and "Traceback" not in stderr
    assert not (tmp_path / "bad").exists()


def test_lora_run_saves_an_adapter_and_a_merged_model_and_resumes_exactly(tmp_path, small_data):
    import minitune as mt

    flags = ["--data", str(small_data), "--max-steps", "4", "--save-every", "2", "--lora-r", "4", "--lora-targets",
             "q_proj", "v_proj", "down_proj", "--lr", "3e-3", "--warmup", "1"]
    straight = run(tmp_path / "straight", *flags)
    resumed = run(resumable_copy(tmp_path / "straight", tmp_path / "cut"), *flags, "--resume", "auto")
    assert without_timing(resumed) == without_timing(straight)
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


def test_a_qlora_run_trains_only_the_adapters_resumes_exactly_and_saves_a_plain_merged_model(tmp_path, small_data,
                                                                                             monkeypatch):
    """--quantize nf4: the decoder's linear layers are 4-bit, only the adapters train; the run resumes bit for bit,
    with its checkpointed activations offloaded after the cut (--offload-checkpoints changes no number); adapter/
    over the 4-bit base and the merged final/ (dequantized + the adapter, a plain checkpoint transformers
    loads without bitsandbytes) give the same logits."""
    import transformers

    import minitune as mt
    import minitune.models.common as common

    flags = ["--data", str(small_data), "--max-steps", "4", "--save-every", "2", "--lora-r", "4", "--lora-targets",
             "all-linear", "--quantize", "nf4", "--grad-checkpointing", "--lr", "3e-3", "--warmup", "1"]
    offloaded, to_host = [], common._to_host
    monkeypatch.setattr(common, "_to_host", lambda x: offloaded.append(x.shape) or to_host(x))
    straight = run(tmp_path / "straight", *flags)
    assert not offloaded
    resumed = run(resumable_copy(tmp_path / "straight", tmp_path / "cut"), *flags, "--offload-checkpoints",
                  "--resume", "auto")
    assert offloaded  # each block's input, in each of the resumed steps
    assert without_timing(resumed) == without_timing(straight)
    assert straight[-1]["loss"] < straight[1]["loss"]
    base = ROOT / "examples" / "assets" / "tiny-mistral"
    final = tmp_path / "straight" / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    assert not [k for k in weights(tmp_path / "straight") if "lora" in k or "absmax" in k]
    adapted = mt.lora.load_adapter(mt.load_model(base, dtype=torch.float32, quantize="nf4").eval(),
                                   tmp_path / "straight" / "adapter")
    assert isinstance(adapted.model.layers[0].mlp.down_proj.weight, mt.quant.NF4Weight)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    x = torch.tensor([mt.load_tokenizer(base).encode("What is 3 plus 4?")])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_quantize_without_lora_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "q", "--quantize", "nf4")
    assert "--quantize nf4 holds the base in 4 bits, which cannot be trained itself: add LoRA" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_a_4_bit_checkpoint_as_model_needs_lora(tmp_path, small_data):
    """A checkpoint saved in bitsandbytes' 4-bit layout loads as it is stored; without --lora-r nothing in it could
    train, so the run stops in one line before the first step."""
    import minitune as mt

    base = ROOT / "examples" / "assets" / "tiny-mistral"
    mt.load_model(base, quantize="nf4").save_pretrained(tmp_path / "bnb")
    mt.load_tokenizer(base).save_pretrained(tmp_path / "bnb")
    message = fails(tmp_path / "out", "--model", str(tmp_path / "bnb"), "--data", str(small_data))
    assert "is stored in 4 bits (bitsandbytes NF4), which cannot be trained itself: add LoRA" in message
    metrics = run(tmp_path / "lora", "--model", str(tmp_path / "bnb"), "--data", str(small_data), "--max-steps", "1",
                  "--lora-r", "4")
    assert metrics[-1]["step"] == 1


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.filterwarnings("ignore:decode. dropped ids")  # a random model may pick an embedding row no token uses
def test_a_tiny_llama_or_qwen_fine_tunes_through_the_same_example(family, tmp_path, small_data):
    """--model <a tiny saved Llama or Qwen3 folder> (tiny-mistral's tokenizer beside it): the run trains and its final
    model loads in transformers as the same family."""
    import transformers

    from tests.conftest import tiny_family_folder

    folder = tiny_family_folder(family, tmp_path / family)
    metrics = run(tmp_path / "out", "--model", str(folder), "--data", str(small_data), "--val-data", str(small_data),
                  "--max-steps", "2")
    assert metrics[-1]["step"] == 2 and metrics[-1]["loss"] < metrics[1]["loss"] + 1.0
    final = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert type(final).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    one = run(tmp_path / "one", "--max-steps", "6", "--batch-size", "8", "--grad-accum", "2")
    returncode, stderr = run_command([*TORCHRUN, str(SCRIPT), "--out", str(tmp_path / "two"), *SMALL, "--max-steps",
                                      "6", "--batch-size", "4", "--grad-accum", "2"])
    assert returncode == 0, stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    for a, b in zip(one[1:], two[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)  # DDP averages: scaled right
    assert two[-1]["step"] == 6
    # validation is split over the ranks and summed: the same numbers as one process computing all of it
    for a, b in [(one[0], two[0]), (one[-1], two[-1])]:
        for key in ("val_loss", "val_token_acc", "val_exact_match"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)


@pytest.mark.slow
def test_qlora_under_two_gloo_processes_follows_one_process(tmp_path):
    """DDP over a 4-bit base: its frozen 4-bit parameters are sent once at the start (never reduced), the
    adapters' gradients are averaged: the same losses as one process with the same global batch."""
    qlora = ["--max-steps", "4", "--grad-accum", "2", "--lora-r", "4", "--lora-targets", "all-linear", "--quantize",
             "nf4", "--lr", "3e-3"]
    one = run(tmp_path / "one", "--batch-size", "8", *qlora)
    returncode, stderr = run_command([*TORCHRUN, str(SCRIPT), "--out", str(tmp_path / "two"), *SMALL, *qlora])
    assert returncode == 0, stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    for a, b in zip(one[1:], two[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)


@pytest.mark.slow
def test_compiled_blocks_train_as_eager_ones(tmp_path, small_data):
    """--compile: each decoder block through torch.compile (inductor on the CPU), LoRA inside; the same losses."""
    flags = ["--data", str(small_data), "--max-steps", "3", "--lora-r", "4", "--lora-targets", "all-linear"]
    eager, compiled = run(tmp_path / "eager", *flags), run(tmp_path / "compiled", *flags, "--compile")
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)


def test_a_packed_step_trains_as_the_padded_one(small_data):
    """The same 12 chats in two micro-batches, padded or packed (best-fit decreasing, rows of 256): train_step gives
    the same loss and gradient norm, and the same weights after an SGD update (so the same gradients)."""
    import functools

    import minitune as mt
    from minitune import data as D
    from minitune.optim import make_scheduler
    from minitune.train import autocast

    sft = example_module("finetune_mistral.py")
    args = sft.parse_args(["--data", str(small_data), "--device", "cpu", "--val-fraction", "0.1"])
    tok = mt.load_tokenizer(args.model)
    train, _, _ = sft.load_examples(args, tok)
    halves = [train[:len(train) // 2], train[len(train) // 2:]]
    layouts = {"padded": [D.collate(half, D.pad_id(tok)) for half in halves],
               "packed": [D.collate(D.pack(half, 256), D.pad_id(tok)) for half in halves]}
    assert sum(b["input_ids"].size(0) for b in layouts["packed"]) < len(train)  # several chats share a row
    results = {}
    for name, batches in layouts.items():
        model = mt.load_model(args.model).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # weights after = weights - gradient: compared whole
        scheduler = make_scheduler(optimizer, "constant", 0, 1)
        step = sft.train_step(model, batches, optimizer, scheduler, functools.partial(autocast, torch.device("cpu"), "float32"))
        results[name] = step, {k: v.detach().clone() for k, v in model.state_dict().items()}
    (padded, padded_weights), (packed, packed_weights) = results["padded"], results["packed"]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    assert packed["tokens"] == padded["tokens"]
    for key, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[key], weight, rtol=1e-4, atol=1e-6)
