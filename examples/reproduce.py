"""The project's main job: every workflow on the bundled tiny models, one report. WORK IN PROGRESS (issue 5).

    python examples/reproduce.py            # runs/report/REPORT.md, with its charts

Sections so far: supervised fine-tuning of tiny-mistral (held-out exact match and perplexity, before
and after). DPO, transfer learning and the model comparison join as their issues land.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import finetune_mistral as sft  # examples/ is on sys.path when this file runs
import torch

import minitune as mt
from minitune import data as D

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def held_out(model_dir: Path, test_file: Path) -> dict:
    """Exact match of greedy answers and the answer tokens' loss/perplexity on every held-out chat."""
    tok, model = mt.load_tokenizer(model_dir), mt.load_model(model_dir, dtype=torch.float32).eval()
    chats = D.read_jsonl(test_file)
    encoded = [D.encode_sft(c, tok, max_length=256, where=f"{test_file}:{i + 1}") for i, c in enumerate(chats)]
    return sft.validate(model, tok, encoded, chats, batch_size=16, autocast=contextlib.nullcontext)


def run_sft(out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "finetune_mistral.py"), "--out", str(out)], check=True)
    return time.perf_counter() - start


def sft_section(runs: Path, report: Path) -> str:
    out = runs / "sft"
    seconds = run_sft(out)
    test = HERE / "data" / "sft" / "test.jsonl"
    before, after = held_out(HERE / "assets" / "tiny-mistral", test), held_out(out / "final", test)
    if (out / "training.png").exists():  # matplotlib is optional
        shutil.copy(out / "training.png", report / "sft.png")
    rows = [("exact match (greedy)", "val_exact_match", "{:.1%}"), ("answer-token loss", "val_loss", "{:.3f}"),
            ("perplexity", "val_ppl", "{:.2f}"), ("token accuracy", "val_token_acc", "{:.1%}")]
    table = "\n".join(f"| {name} | {fmt.format(before[k])} | {fmt.format(after[k])} |" for name, k, fmt in rows)
    return (f"## Supervised fine-tuning: tiny-mistral on the valley's chats\n\n"
            f"`python examples/finetune_mistral.py` with its defaults ({seconds:.0f} s here). Held-out: "
            f"`{test.relative_to(HERE.parent)}`, {len(D.read_jsonl(test))} chats whose facts the model read in "
            f"pre-training but never saw asked.\n\n| held-out | before | after |\n|---|---:|---:|\n{table}\n\n"
            f"![training curves](sft.png)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="where each workflow's run and the report go")
    args = parser.parse_args()
    runs = Path(args.runs)
    report = runs / "report"
    report.mkdir(parents=True, exist_ok=True)
    sections = [sft_section(runs, report)]
    (report / "REPORT.md").write_text("# minitune: the workflows on the bundled tiny models\n\n" + "\n".join(sections))
    print(f"wrote {report / 'REPORT.md'}")


if __name__ == "__main__":
    main()
