"""examples/reproduce.py, the main job, end to end with its defaults: the report, and the issue's bar for each
workflow (SFT: held-out exact match up by at least 30 points, answer loss down; DPO: held-out preference
agreement from 0.5 to at least 0.85, and a win rate against the SFT model above 0.5)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("runs")
    # the transfer-learning section is --compare, which tests/test_finetune_gpt.py runs on a small budget
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "reproduce.py"), "--runs", str(runs),
                           "--sections", "sft", "dpo"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, (runs / "report" / "REPORT.md").read_text()


def row(report: str, name: str) -> tuple[float, float]:
    match = re.search(rf"\| {re.escape(name)} \| ([\d.]+)%? \| ([\d.]+)%? \|", report)
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
