"""examples/reproduce.py, the main job, end to end with its defaults (slow): the report, and the bar for each
workflow. SFT: held-out exact match up by at least 30 points, answer loss down. Transfer: every technique named
in words, each learning the target, full fine-tuning forgetting most. DPO: held-out preference agreement from
0.5 to at least 0.85, and a win rate against the SFT model above 0.5. Comparison: tiny-zephyr ahead of
tiny-mistral on the instructions, with the pipeline and the cross-validated search reported."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import run_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    """One run of the main job; every test reads its report (one SFT run serves the SFT, DPO and comparison
    sections, as it does for a user)."""
    runs = tmp_path_factory.mktemp("runs")
    returncode, stderr = run_command([sys.executable, str(ROOT / "examples" / "reproduce.py"), "--runs", str(runs)],
                                     timeout=2400)
    assert returncode == 0, stderr[-3000:]
    return runs, (runs / "report" / "REPORT.md").read_text()


def row(report: str, name: str, cells: str = r"([\d.]+)%? \| ([\d.]+)%?") -> tuple[float, float]:
    """The two numbers a markdown table row named `name` holds where `cells` captures them."""
    match = re.search(rf"\| {re.escape(name)} \| {cells} \|", report)
    assert match, f"no {name!r} row in\n{report}"
    return float(match.group(1)), float(match.group(2))


def test_sft_section_shows_the_gain_on_held_out_chats(report):
    runs, text = report
    assert "## Supervised fine-tuning" in text and "finetune_mistral.py --out" in text
    before, after = row(text, "exact match (greedy)")
    assert before == 0.0 and after - before >= 30, (before, after)
    loss_before, loss_after = row(text, "answer-token loss")
    assert loss_after < loss_before / 2
    assert (runs / "sft" / "final" / "model.safetensors").is_file()
    pytest.importorskip("matplotlib")
    assert "![training curves](sft.png)" in text and (runs / "report" / "sft.png").stat().st_size > 10_000


def test_dpo_section_shows_agreement_and_win_rate_on_held_out_pairs(report):
    runs, text = report
    assert "## Preference alignment" in text and "dpo.py --out" in text
    cells = re.search(r"\| DPO \+ NLL \(the default\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|", text)
    assert cells, text
    agreement, win_rate, satisfied = map(float, cells.groups())
    assert re.search(r"\| SFT \(the reference\) \| 0\.500 \| 0\.500 \|", text)
    assert agreement >= 0.85 and win_rate > 0.5, (agreement, win_rate)
    sft_satisfied = float(re.search(r"\| SFT \(the reference\) \| 0\.500 \| 0\.500 \| ([\d.]+)% \|", text).group(1))
    assert satisfied > sft_satisfied
    assert (runs / "dpo" / "final" / "model.safetensors").is_file() and "| plain DPO |" in text
    pytest.importorskip("matplotlib")
    assert (runs / "report" / "dpo.png").stat().st_size > 10_000


def test_transfer_section_names_each_technique_and_its_cost_quality_and_forgetting(report):
    runs, text = report
    assert "## Transfer learning" in text and "finetune_gpt.py --out" in text
    before_target, before_source = row(text, "before training", cells=r"— \| — \| — \| — \| ([\d.]+) \| ([\d.]+)")
    forgetting = {}
    for name in ("full fine-tuning", "head only", "layer freezing (first 2 blocks)", "gradual unfreezing", "LoRA (r=8)"):
        target, source = row(text, name, cells=r"[\d,]+ \| [\d.]+% \| \d+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+)")
        assert target < before_target, name  # each learnt the kitchen
        forgetting[name] = source
    assert max(forgetting, key=forgetting.get) == "full fine-tuning"
    pytest.importorskip("matplotlib")
    assert (runs / "report" / "transfer.png").stat().st_size > 10_000


def test_comparison_section_puts_tiny_zephyr_ahead_on_the_instructions(report):
    runs, text = report
    assert "## Comparison" in text and "compare_models.py --out" in text
    assert re.search(r"- instruction/exact_match: [\d.]+ against 0\.000, a difference of \+[\d.]+ \[\+[\d.]+, "
                     r"\+[\d.]+\], McNemar p = [\d.e-]+: \*\*ahead\*\*", text), text
    assert "### The pipeline" in text and "### Choosing a recipe by cross-validation" in text
    assert (runs / "compare" / "pipeline.jsonl").is_file() and (runs / "cv" / "search.json").is_file()
