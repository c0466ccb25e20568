"""The project's main job: every workflow on the bundled tiny models, one report.

    python examples/reproduce.py                  # runs/report/REPORT.md with its charts; about 4 minutes on 2 cores
    python examples/reproduce.py --max-steps 3    # a smoke run: every workflow, a few steps each
    python examples/reproduce.py --sections sft   # some of the workflows

Each workflow runs as its example script with the defaults (a separate process, as a user would run
it), then the report measures its models on the held-out data. The sections: supervised
fine-tuning of tiny-mistral (held-out exact match and perplexity, before and after); transfer
learning of tiny-gpt2 (every technique: target quality against forgetting); DPO of the SFT model
(preference agreement and win rate on held-out pairs, per rule); and the comparison of tiny-mistral,
its SFT model and tiny-zephyr (the DPO model) on one protocol with bootstrap intervals, the best-of-n
pipeline, and a small hyperparameter search scored by 3-fold cross-validation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import compare_models  # examples/ is on sys.path when this file runs
import dpo
import finetune_mistral as sft
import torch

import minitune as mt
from minitune import data as D
from minitune.errors import UserError
from minitune.train import ArgumentParser, positive_int, run_main

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
    """Run examples/<script> into `out`, deleting an earlier run there first (main() has checked that --overwrite
    allows it): a fresh run, not a resume."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, str(HERE / script), "--out", str(out), *extra]
    start = time.perf_counter()
    if subprocess.run(command).returncode:  # it said why on stderr
        raise UserError(f"examples/{script} failed: the report is not written")
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


@torch.no_grad()
def preference_eval(sft_dir: Path, dpo_dir: Path, test_file: Path, flags: list[str]) -> tuple[dict, dict]:
    """The DPO model against the SFT model on every held-out pair, measured as dpo.py (run with `flags`)
    validates: its numbers, and per rule the share of greedy answers of each model that satisfy it."""
    args = dpo.parse_args(["--model", str(sft_dir), "--val-data", str(test_file), *flags])
    tok = mt.load_tokenizer(sft_dir)
    sft_model, dpo_model = (mt.load_model(d, dtype=torch.float32).eval() for d in (sft_dir, dpo_dir))
    records = [(f"{test_file}:{n}", r) for n, r in D.iter_jsonl(test_file)]
    pairs = D.encode_preferences(records, tok, args.max_length, args.max_prompt_length, args.truncation,
                                 chat=args.prompt_format == "chat", name=str(test_file))
    judged = [r for _, r in records]
    amp, new_tokens = contextlib.nullcontext, dpo.answer_length(pairs)
    reference = mt.reference.precompute_logps(sft_model, pairs, D.pad_id(tok), args.batch_size, args.average_logps)
    answers = {name: dpo.greedy_answers(m, tok, judged, args, new_tokens, amp)
               for name, m in (("sft", sft_model), ("dpo", dpo_model))}
    numbers = dpo.validate(dpo_model, tok, pairs, reference, judged, answers["sft"], args, new_tokens, amp)
    rules = {}
    for i, record in enumerate(judged):
        row = rules.setdefault(record["check"]["rule"], {"n": 0, "sft": 0.0, "dpo": 0.0})
        row["n"] += 1
        for name in ("sft", "dpo"):
            row[name] += mt.evaluate.rule_score(record["check"], answers[name][i])
    return numbers, rules


# The default run, and plain DPO for comparison (only its result is reported: it validates at the start and end).
DPO_RUNS = {"DPO + NLL (the default)": ("dpo", []), "plain DPO": ("dpo-plain", ["--rpo-alpha", "0"])}


def dpo_section(runs: Path, report: Path, extra: list[str]) -> str:
    sft_dir = runs / "sft" / "final"
    if not sft_dir.is_dir():
        raise UserError(f"{sft_dir} not found: the DPO section starts from the SFT section's model; "
                         "run with --sections sft dpo")
    test = HERE / "data" / "preference" / "test.jsonl"
    rows, commands = [], []
    for name, (folder, flags) in DPO_RUNS.items():
        quiet = ["--eval-every", "100000"] if flags else []
        command, seconds = run_example("dpo.py", runs / folder, ["--model", str(sft_dir), *flags, *quiet, *extra])
        commands.append(f"`{command}` ({seconds:.0f} s here)")
        numbers, rules = preference_eval(sft_dir, runs / folder / "final", test, [*flags, *extra])
        steps = [m for m in D.read_jsonl(runs / folder / "metrics.jsonl") if "logps/chosen" in m]
        numbers["chosen_logps"] = [sum(m["logps/chosen"] for m in ten) / len(ten) for ten in (steps[:10], steps[-10:])]
        rows.append((name, numbers, rules))
    if (runs / "dpo" / "training.png").exists():
        shutil.copy(runs / "dpo" / "training.png", report / "dpo.png")
    rules = rows[0][2]
    n_test = sum(r["n"] for r in rules.values())
    table = "\n".join(f"| {name} | {n['val_preference_accuracy']:.3f} | {n['val_win_rate']:.3f} | "
                      f"{n['val_rule_score']:.1%} |" for name, n, _ in rows)
    by_rule = "\n".join(f"| {rule} | {r['n']} | {r['sft'] / r['n']:.1%} | " +
                        " | ".join(f"{rr[rule]['dpo'] / rr[rule]['n']:.1%}" for _, _, rr in rows) + " |"
                        for rule, r in sorted(rules.items()))
    chosen = "; ".join(f"{name}: {n['chosen_logps'][0]:.1f} over the first 10 steps, {n['chosen_logps'][1]:.1f} "
                       "over the last 10" for name, n, _ in rows)
    better = [name for name, n, _ in rows if n["val_win_rate"] > 0.5]
    return (f"## Preference alignment: DPO of the SFT model\n\n{commands[0]}; {commands[1]}. Held-out: "
            f"`{test.relative_to(HERE.parent)}`, {n_test} pairs whose questions no training split asks. The SFT "
            "model is the reference: against itself its preference agreement (the share of pairs whose chosen "
            "answer gets the higher implicit reward) is 0.5 and its win rate 0.5 by definition.\n\n"
            "| model | preference agreement | win rate vs SFT | answers that satisfy the rule |\n"
            f"|---|---:|---:|---:|\n| SFT (the reference) | 0.500 | 0.500 | "
            f"{sum(r['sft'] for r in rules.values()) / n_test:.1%} |\n{table}\n\n"
            "The default adds the chosen answer's negative log-likelihood per token to the DPO loss (RPO, "
            "`--rpo-alpha 1`). DPO alone only asks the chosen answer to gain on the rejected one relative to the "
            f"reference. The training pairs' mean `logps/chosen`: {chosen}. Greedy answers better than the SFT "
            f"model's (win rate above 0.5): {', '.join(better) if better else 'none'}.\n\n"
            "Greedy answers that satisfy their record's rule (`minitune.evaluate.rule_score`):\n\n"
            "| rule | pairs | SFT | " + " | ".join(name for name, _, _ in rows) + " |\n|---|---:|---:|"
            + "---:|" * len(rows) + f"\n{by_rule}\n\n![DPO: preference agreement and win rate over steps](dpo.png)\n")


def verdicts(results: dict, one: str, other: str) -> list[str]:
    """Model `one` against `other` on every metric, from compare_models.py's paired rows: the difference on the
    same items with its 95% paired-bootstrap interval (and McNemar's p for right/wrong metrics); ahead or behind
    when the interval excludes 0."""
    lines = []
    for row in results["paired"]:
        if (row["a"], row["b"]) != (one, other):
            continue
        if row["difference"] is None:
            lines.append(f"- {row['metric']}: {row['verdict']}")
            continue
        side = compare_models.ahead(row["low"], row["high"], row["metric"] in compare_models.LOWER_IS_BETTER)
        test = f", McNemar p = {row['mcnemar']['p_value']:.3g}" if row.get("mcnemar") else ""
        verdict = {1: "**ahead**", -1: "**behind**", 0: "no difference shown"}[side]
        lines.append(f"- {row['metric']}: {results['models'][one][row['metric']][0]:.3f} against "
                     f"{results['models'][other][row['metric']][0]:.3f}, a difference of {row['difference']:+.3f} "
                     f"[{row['low']:+.3f}, {row['high']:+.3f}]{test}: {verdict}")
    return lines


def comparison_section(runs: Path, report: Path, extra: list[str]) -> str:
    smoke = ["--limit", "16"] if extra else []
    compare, compare_s = run_example("compare_models.py", runs / "compare", ["--runs", str(runs), *smoke])
    search, search_s = run_example("cross_validate.py", runs / "cv", extra)
    for png in [*(runs / "compare").glob("comparison*.png"), runs / "cv" / "search.png"]:
        if png.exists():
            shutil.copy(png, report / png.name)
    results = json.loads((runs / "compare" / "results.json").read_text())
    base, _, zephyr = results["models"]  # the default order: tiny-mistral, its SFT model, tiny-zephyr
    against = "\n".join(verdicts(results, zephyr, base))
    tasks = sorted(p.stem.removeprefix("comparison_") for p in report.glob("comparison_*.png")
                   if p.stem != "comparison_paired")
    return (f"## Comparison: tiny-mistral, its SFT model and tiny-zephyr on one protocol\n\n`{compare}` "
            f"({compare_s:.0f} s here). tiny-zephyr is the SFT model after DPO (the default run above), as Zephyr "
            f"is Mistral after SFT and DPO. Every model answers the same held-out items the same way "
            f"({results['prompt_format']} prompts); each number has a 95% percentile-bootstrap interval over the "
            "items.\n\n"
            f"{(runs / 'compare' / 'comparison.md').read_text()}\n"
            f"tiny-zephyr against tiny-mistral, item by item (the paired difference with its 95% paired-bootstrap "
            f"interval; McNemar's exact p for right/wrong metrics):\n\n{against}\n\n![every share](comparison.png) "
            "![the paired differences](comparison_paired.png)\n\n"
            + " ".join(f"![{t}](comparison_{t}.png)" for t in tasks) + "\n\n"
            f"### The pipeline: one model samples, another picks\n\n{(runs / 'compare' / 'pipeline.md').read_text()}"
            f"\n### Choosing a recipe by cross-validation\n\n`{search}` ({search_s:.0f} s here): "
            f"{(runs / 'cv' / 'search.md').read_text()}\n![cross-validated search](search.png)\n")


SECTIONS = {"sft": sft_section, "transfer": transfer_section, "dpo": dpo_section, "comparison": comparison_section}
FOLDERS = {"sft": ["sft"], "transfer": ["gpt"], "dpo": ["dpo", "dpo-plain"], "comparison": ["compare", "cv"]}


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="where the report and each workflow's run go (runs/sft, ...)")
    parser.add_argument("--max-steps", type=positive_int, help="cap every workflow's optimizer steps (a smoke run)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="which workflows to run (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="run again over the runs and report in --runs")
    args = parser.parse_args(argv)
    extra = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    runs = Path(args.runs)
    report = runs / "report"
    earlier = [str(runs / f) for name in args.sections for f in FOLDERS[name] if (runs / f).exists()]
    earlier += [str(report / "REPORT.md")] if (report / "REPORT.md").exists() else []
    if earlier and not args.overwrite:
        raise UserError(f"{', '.join(earlier)} hold an earlier main job: pass --overwrite to run it again (deleting "
                        "them), or another --runs")
    if report.exists() and args.overwrite:
        shutil.rmtree(report)  # no chart or report of the earlier job left beside the new one
    report.mkdir(parents=True, exist_ok=True)
    sections = [SECTIONS[name](runs, report, extra) for name in args.sections]
    (report / "REPORT.md").write_text("# minitune: the workflows on the bundled tiny models\n\n" + "\n".join(sections))
    print(f"wrote {report / 'REPORT.md'}")


if __name__ == "__main__":
    run_main(main)
