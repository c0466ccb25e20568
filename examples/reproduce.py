"""The project's main job: every workflow on the bundled tiny models, one report.

    python examples/reproduce.py                  # runs/report/REPORT.md with its charts; about 4 minutes on 2 cores
    python examples/reproduce.py --max-steps 3    # a smoke run: every workflow, a few steps each
    python examples/reproduce.py --sections sft   # some of the workflows

Each workflow runs as its example script with the defaults (a separate process, as a user would run
it), then the report measures its models on the held-out data. Sections so far: supervised
fine-tuning of tiny-mistral (held-out exact match and perplexity, before and after), and transfer
learning of tiny-gpt2 (every technique: target quality against forgetting). DPO and the model
comparison join as they land.
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
    """Exact match of greedy answers and the answer tokens' loss/perplexity on every held-out chat,
    measured as finetune_mistral.py validates (with its --max-length)."""
    tok, model = mt.load_tokenizer(model_dir), mt.load_model(model_dir, dtype=torch.float32).eval()
    records = [(f"{test_file}:{n}", r) for n, r in D.iter_jsonl(test_file)]
    examples = D.encode_records(records, tok, sft.parse_args([]).max_length, name=str(test_file))
    questions = [sft.question_and_answer(r, where) for where, r in records]
    return sft.validate(model, tok, examples, questions, batch_size=16, amp=contextlib.nullcontext)


def run_example(script: str, out: Path, extra: list[str]) -> tuple[str, float]:
    """Run examples/<script> into `out`, deleting an earlier run there first (a fresh run, not a resume)."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, str(HERE / script), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return " ".join(["python", f"examples/{script}", "--out", str(out), *extra]), time.perf_counter() - start


def sft_section(runs: Path, report: Path, extra: list[str]) -> str:
    out = runs / "sft"
    command, seconds = run_example("finetune_mistral.py", out, extra)
    test = HERE / "data" / "sft" / "test.jsonl"
    before, after = held_out(HERE / "assets" / "tiny-mistral", test), held_out(out / "final", test)
    if (out / "training.png").exists():  # matplotlib is optional
        shutil.copy(out / "training.png", report / "sft.png")
    rows = [("exact match (greedy)", "val_exact_match", "{:.1%}"), ("answer-token loss", "val_loss", "{:.3f}"),
            ("perplexity", "val_ppl", "{:.2f}"), ("token accuracy", "val_token_acc", "{:.1%}")]
    table = "\n".join(f"| {name} | {fmt.format(before[k])} | {fmt.format(after[k])} |" for name, k, fmt in rows)
    return (f"## Supervised fine-tuning: tiny-mistral on the valley's chats\n\n"
            f"`{command}` ({seconds:.0f} s here). Held-out: "
            f"`{test.relative_to(HERE.parent)}`, {len(D.read_jsonl(test))} chats whose facts the model read in "
            f"pre-training but never saw asked.\n\n| held-out | before | after |\n|---|---:|---:|\n{table}\n\n"
            f"![training curves](sft.png)\n")


def transfer_section(runs: Path, report: Path, extra: list[str]) -> str:
    out = runs / "gpt"
    command, seconds = run_example("finetune_gpt.py", out, ["--compare", *extra])
    if (out / "comparison.png").exists():
        shutil.copy(out / "comparison.png", report / "transfer.png")
    return (f"## Transfer learning: tiny-gpt2 from the valley to the kitchen\n\n"
            f"`{command}` ({seconds:.0f} s here): each technique with the same data, steps and peak learning "
            f"rate. Target: perplexity on `examples/data/target/validation.jsonl`; forgetting: perplexity on "
            f"`examples/data/source/validation.jsonl`, the domain the model was trained on.\n\n"
            f"{(out / 'comparison.md').read_text()}\n![target quality against forgetting](transfer.png)\n")


SECTIONS = {"sft": sft_section, "transfer": transfer_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs",
                        help="where the report and each workflow's run go (runs/sft, ...: replaced each time)")
    parser.add_argument("--max-steps", type=int, help="cap every workflow's optimizer steps (a quick smoke run)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="which workflows to run (default: all)")
    args = parser.parse_args()
    extra = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    runs = Path(args.runs)
    report = runs / "report"
    report.mkdir(parents=True, exist_ok=True)
    sections = [SECTIONS[name](runs, report, extra) for name in args.sections]
    (report / "REPORT.md").write_text("# minitune: the workflows on the bundled tiny models\n\n" + "\n".join(sections))
    print(f"wrote {report / 'REPORT.md'}")


if __name__ == "__main__":
    main()
