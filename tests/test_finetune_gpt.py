"""examples/finetune_gpt.py: every technique on a small budget, what each trains and leaves frozen, and the
comparison's table and chart; the same through --compare (slow: each technique in its own process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import example_module, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_gpt.py"
BASE = ROOT / "examples" / "assets" / "tiny-gpt2"
SMALL = ["--max-steps", "4", "--eval-every", "4", "--seq-len", "64", "--batch-size", "4", "--warmup", "0",
         "--device", "cpu"]


@pytest.fixture(scope="module", params=["main", pytest.param("--compare", marks=pytest.mark.slow)])
def compared(request, tmp_path_factory) -> Path:
    """Every technique run into <out>/<technique>: by the example's main() in this process, then the comparison
    written from their results; or by `finetune_gpt.py --compare` as a user runs it."""
    out = tmp_path_factory.mktemp("gpt")
    if request.param == "--compare":
        returncode, stderr = run_command([sys.executable, str(SCRIPT), "--compare", "--out", str(out), *SMALL],
                                         timeout=600)
        assert returncode == 0, stderr[-3000:]
        return out
    gpt = example_module("finetune_gpt.py")
    for technique in gpt.TECHNIQUES:
        gpt.main([*SMALL, "--technique", technique, "--out", str(out / technique)])
    gpt.write_comparison([result(out, t) for t in gpt.TECHNIQUES], out)
    return out


def result(out: Path, technique: str) -> dict:
    return json.loads((out / technique / "result.json").read_text())


def test_the_comparison_has_every_technique_with_measured_numbers(compared):
    table = (compared / "comparison.md").read_text()
    names = {"full": "full fine-tuning", "head": "head only", "freeze-k": "layer freezing (first 2 blocks)",
             "gradual": "gradual unfreezing", "lora": "LoRA (r=8)"}  # each technique named in words
    for technique, name in names.items():
        assert f"| {name} |" in table
        r = result(compared, technique)
        assert r["name"] == name
        assert r["steps"] == 4 and r["step_ms"] > 0 and r["target_ppl"] > 1 and r["source_ppl"] > 1
    full = result(compared, "full")
    assert full["target_ppl"] < full["target_ppl_before"]  # four steps of full fine-tuning already help
    assert (compared / "comparison.csv").read_text().count("\n") == 6
    pytest.importorskip("matplotlib")
    assert (compared / "comparison.png").stat().st_size > 10_000


def test_trainable_parameter_counts(compared):
    full, head, frozen, gradual, lora = (result(compared, t) for t in ("full", "head", "freeze-k", "gradual", "lora"))
    assert full["trainable"] == full["total"]
    assert head["trainable"] < gradual["trainable"] <= full["trainable"]  # gradual: the groups opened by the end
    wte = 1088 * 128  # tiny-gpt2's tied embedding is its head
    assert head["trainable"] == wte + 2 * 128  # + the final LayerNorm
    assert head["trainable"] < frozen["trainable"] < full["trainable"]
    # LoRA r=8 on every linear layer of 4 blocks: c_attn 128->384, c_proj 128->128, c_fc 128->512, mlp c_proj 512->128
    assert lora["trainable"] == 4 * 8 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    assert lora["total"] == full["total"] + lora["trainable"]


def test_frozen_weights_leave_the_run_bit_identical(compared):
    base = load_file(BASE / "model.safetensors")
    frozen = load_file(compared / "freeze-k" / "final" / "model.safetensors")
    head = load_file(compared / "head" / "final" / "model.safetensors")
    for key, value in base.items():
        bottom = key.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.", "transformer.h.1."))
        assert torch.equal(frozen[key], value) == bottom, key  # freeze-k: embeddings and blocks 0, 1
        assert torch.equal(head[key], value) == (not key.startswith(("transformer.wte", "transformer.ln_f"))), key
    assert (compared / "lora" / "adapter" / "adapter_config.json").is_file()


def test_add_tokens_grows_the_vocabulary_for_the_target_words(tmp_path, capsys):
    import minitune as mt

    example_module("finetune_gpt.py").main(["--out", str(tmp_path), *SMALL, "--add-tokens", "6"])
    words = capsys.readouterr().err.split("added 6 tokens: ")[1].splitlines()[0].split()
    tok = mt.load_tokenizer(tmp_path / "final")
    assert len(words) == 6 and all(tok.token_to_id(w) is not None for w in words)
    model = mt.load_model(tmp_path / "final")
    assert len(tok) == 1054 + 6 and model.config.vocab_size == 1088  # the padded rows had room for them


def test_lora_flags_configure_only_the_lora_technique():
    gpt = example_module("finetune_gpt.py")
    assert gpt.parse_args(["--technique", "full", "--lora-r", "4"]).lora_r == 0  # --compare passes it to all
    assert gpt.parse_args(["--technique", "lora", "--lora-r", "4"]).lora_r == 4
    assert gpt.parse_args(["--technique", "lora"]).lora_r == 8
