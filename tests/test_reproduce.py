"""examples/reproduce.py, the main job, end to end in its smoke mode: every section and chart is written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_writes_the_report_with_every_section(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "reproduce.py"), "--runs", str(tmp_path),
                           "--max-steps", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Supervised fine-tuning" in report
    assert "finetune_mistral.py --out" in report and "--max-steps 2" in report
    row = re.search(r"\| exact match \(greedy\) \| ([\d.]+)% \| ([\d.]+)% \|", report)
    assert row, report
    assert float(row.group(1)) == 0.0  # the base model never answers in the chat format
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
    pytest.importorskip("matplotlib")
    assert "![training curves](sft.png)" in report and (tmp_path / "report" / "sft.png").stat().st_size > 10_000
