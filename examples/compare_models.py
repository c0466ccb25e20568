"""Several models on one evaluation protocol, with bootstrap intervals, and a best-of-n pipeline of two of them.

    python examples/compare_models.py           # tiny-mistral, its SFT model and tiny-zephyr (built when absent)
    python examples/compare_models.py --models mistralai/Mistral-7B-v0.1 HuggingFaceH4/zephyr-7b-beta

The default models are the bundled tiny-mistral, runs/sft/final (examples/finetune_mistral.py) and
runs/dpo/final, "tiny-zephyr": the SFT model after examples/dpo.py, as Zephyr is Mistral after SFT and DPO.
The two runs are made first when their folders are absent. Every model answers the same items the same way:

  instruction  exact match of greedy answers          examples/data/eval/generation/test.jsonl
  knowledge    multiple choice by log-likelihood:     examples/data/eval/multiple_choice/test.jsonl
               acc, and acc_norm (per character)      (or --multiple-choice FILE: HellaSwag or ARC JSONL)
  preference   prefers_chosen: the chosen answer has  examples/data/preference/test.jsonl
               the higher log-likelihood per token;
               rule_score: greedy answers that
               satisfy the pair's rule
  language     perplexity, strided window             examples/data/source/validation.jsonl

Questions go through each tokenizer's chat template when every model has one (--prompt-format auto), else
as "Question: ...\\nAnswer:" text for all (a base model such as Mistral-7B-v0.1 has no template); greedy
text answers end at the first line break. Every number has a 95% percentile-bootstrap interval over the
items (over the text's windows for perplexity, a block bootstrap). Every pair of models is then compared
on the items both answered: the difference with its 95% paired-bootstrap interval (both models' scores of
an item drawn together) and, for right/wrong metrics, McNemar's exact p-value; "A ahead of B" is said only
where the paired interval excludes 0.

The pipeline (best of n): the sampler draws --n answers to each preference prompt, the scorer keeps the one
it rates highest, by its log-likelihood or by DPO's implicit reward beta * log(pi_scorer / pi_reference), and
the kept answers are judged by the pairs' rules, against each model answering alone. --pipeline SAMPLER
SCORER [REFERENCE]; by default the SFT model samples and tiny-zephyr scores, with the SFT model as reference.

Output in --out: comparison.md (the values, then the paired differences and verdicts), comparison.csv,
results.json, items.jsonl (every model's score of every item: each number above can be recomputed from it),
comparison.png (the shares, every model), one PNG per task, comparison_paired.png (the paired differences of
the shares), pipeline.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import minitune as mt
from minitune import data as D
from minitune import evaluate as E
from minitune import plot
from minitune.errors import UserError
from minitune.train import ArgumentParser, check_out, device_problem, run_main

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TINY = str(HERE / "assets" / "tiny-mistral")
BUILT = {"sft": ("finetune_mistral.py", []), "dpo": ("dpo.py", ["--model", "{runs}/sft/final"])}  # runs/<name>/final


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="hub ids or folders (default: tiny-mistral, <runs>/sft/final, <runs>/dpo/final)")
    p.add_argument("--runs", default="runs", help="where the default SFT and DPO models are, or are made")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    p.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "text"))
    p.add_argument("--generation", default=str(DATA / "eval" / "generation" / "test.jsonl"),
                   help="instruction set: JSONL of {prompt, answer}")
    p.add_argument("--multiple-choice", default=str(DATA / "eval" / "multiple_choice" / "test.jsonl"),
                   help="bundled, HellaSwag- or ARC-style JSONL")
    p.add_argument("--preference", default=str(DATA / "preference" / "test.jsonl"),
                   help="preference set: JSONL of {prompt, chosen, rejected, check}")
    p.add_argument("--text", default=str(DATA / "source" / "validation.jsonl"), help="perplexity: JSONL of {text}")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each set (a quick look)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="perplexity window")
    p.add_argument("--stride", type=int, default=128, help="perplexity window stride")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--pipeline", nargs="+", default=None, metavar="MODEL",
                   help="SAMPLER SCORER [REFERENCE] for best of n (default: the 2nd, 3rd and 2nd model of three, "
                        "the 1st and 2nd of two); 'none' for no pipeline")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt in the pipeline")
    p.add_argument("--beta", type=float, default=0.1, help="the implicit reward's beta (it scales, never reorders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="the weights' dtype (default: bfloat16 on CUDA, else float32)")
    args = p.parse_args(argv)
    if problem := device_problem(args.device):
        p.error(f"--device {args.device}: {problem}")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32"))
    runs = Path(args.runs)
    args.default = args.models is None
    args.models = args.models or [TINY, str(runs / "sft" / "final"), str(runs / "dpo" / "final")]
    if args.pipeline is None:
        args.pipeline = ([args.models[1], args.models[2], args.models[1]] if len(args.models) >= 3 else
                         args.models[:2] if len(args.models) == 2 else ["none"])
    if len(set(args.models)) < len(args.models):
        p.error(f"--models {args.models}: a model is named twice")
    if args.pipeline != ["none"] and len(args.pipeline) not in (2, 3):
        p.error(f"--pipeline {args.pipeline}: expected SAMPLER SCORER [REFERENCE], or none")
    if args.n < 1 or (args.limit is not None and args.limit < 1):
        p.error("--n and --limit must be at least 1")
    return args


def build_missing(args) -> None:
    """The default SFT and DPO models, made by their examples (with the examples' defaults) when absent."""
    runs = Path(args.runs)
    for name, (script, flags) in BUILT.items():
        if not (runs / name / "final" / "config.json").exists():
            command = [sys.executable, str(HERE / script), "--out", str(runs / name),
                       *[f.format(runs=runs) for f in flags]]
            print(f"{runs / name / 'final'} not found: making it with {' '.join(command[1:])}", file=sys.stderr)
            if subprocess.run(command).returncode:  # it said why on stderr
                raise UserError(f"making {runs / name / 'final'} failed: pass --models to compare other models")


# ---------------------------------------------------------------- one protocol for every model


def prompt(question: str, fmt: str) -> str | list[dict]:
    """A question as a chat (a user turn, which the template renders) or as plain text."""
    return [{"role": "user", "content": question}] if fmt == "chat" else f"Question: {question}\nAnswer:"


def ask(tok, question: str, fmt: str) -> str:
    """The prompt text: through the chat template with the assistant's opening, or plain text."""
    return E.prompt_text(tok, prompt(question, fmt))


def spoken(answer: str, fmt: str) -> str:
    """An answer as it follows the prompt: as it is after the chat template, after a space in plain text."""
    return answer if fmt == "chat" else " " + answer


def said(tok, question: str, answer: str, fmt: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of a whole answer: the template's assistant turn, or a space, the answer
    and EOS after the plain-text prompt."""
    return E.answer_tokens(tok, prompt(question, fmt), spoken(answer, fmt))


def generated(text: str, fmt: str) -> str:
    """A generated answer: up to EOS after a chat prompt; in plain text, where nothing ends the turn, its
    first line."""
    return text if fmt == "chat" else text.strip().split("\n")[0]


def greedy(model, tok, questions: list[str], args, max_new_tokens: int) -> list[str]:
    answers = E.generate_answers(model, tok, [ask(tok, q, args.fmt) for q in questions], args.batch_size,
                                 max_new_tokens, desc="answers")
    return [generated(a, args.fmt) for a in answers]


def head(records: list, args) -> list:
    return records[:args.limit] if args.limit else records


def instruction(model, tok, args) -> dict[str, list[float]]:
    records = head(D.read_jsonl(args.generation), args)
    longest = max(len(tok.encode(r["answer"], add_special_tokens=False)) for r in records)
    answers = greedy(model, tok, [r["prompt"] for r in records], args, longest + 8)
    return {"exact_match": [float(E.exact_match(a, r["answer"])) for a, r in zip(answers, records, strict=True)]}


def knowledge(model, tok, args) -> dict[str, list[float]]:
    questions = head(E.read_multiple_choice(args.multiple_choice), args)

    if args.fmt == "text":  # each benchmark's own context (HellaSwag's is a sentence to complete), as lm-eval
        return E.multiple_choice(model, tok, questions, batch_size=args.batch_size * 2, desc="choices")
    return E.multiple_choice(model, tok, questions, lambda q, c: said(tok, q["question"], c, "chat"),
                             args.batch_size * 2, desc="choices")


def preference(model, tok, args) -> dict[str, list[float]]:
    records = head(D.read_jsonl(args.preference), args)
    requests = [said(tok, r["prompt"], r[side], args.fmt) for r in records for side in ("chosen", "rejected")]
    logps = E.continuation_logprobs(model, tok, requests, args.batch_size * 2, desc="pairs")
    per_token = [lp / len(ids) for lp, (_, ids) in zip(logps, requests, strict=True)]  # the turn's end included
    prefers = E.wins(per_token[::2], per_token[1::2])  # chosen against rejected, a tie one half
    answers = greedy(model, tok, [r["prompt"] for r in records], args, 48)
    return {"prefers_chosen": prefers,
            "rule_score": [E.rule_score(r["check"], a) for r, a in zip(records, answers, strict=True)]}


def language(model, tok, args) -> dict[str, "Scores"]:
    """Perplexity per token, and bits per byte of the text (the same NLL over UTF-8 bytes rather than tokens),
    which models with different tokenizers share; both from the windows' summed NLL and token counts (their
    intervals from a block bootstrap over the windows)."""
    texts = head(D.read_texts(args.text), args)
    result = E.strided_perplexity(model, D.token_stream(tok, texts), args.max_length, args.stride, args.batch_size,
                                  desc="windows")
    per_byte = result["tokens"] / (math.log(2) * sum(len(t.encode()) for t in texts))  # nats/token -> bits/byte
    windows = {"values": result["window_nll"], "weights": result["window_tokens"]}
    return {"ppl": Scores(**windows, transform=torch.exp),
            "bits_per_byte": Scores(**windows, transform=lambda nll: nll * per_byte)}


@dataclass
class Scores:
    """One metric's per-item scores for one model. Its value is their mean, or sum(values) / sum(weights) put
    through `transform` (perplexity: exp of the NLL per token, from each window's summed NLL and tokens)."""
    values: list[float]
    weights: list[float] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def summary(self, args) -> tuple[float, float, float, int]:
        """(value, low, high, items): the 95% bootstrap interval over the items, through the (monotone) transform."""
        value, low, high = E.bootstrap_ci(self.values, resamples=args.resamples, seed=args.seed, weights=self.weights)
        f = self.transform or (lambda t: t)
        return (*(f(torch.tensor(v, dtype=torch.float64)).item() for v in (value, low, high)), len(self.values))


TASKS = {"instruction": instruction, "knowledge": knowledge, "preference": preference, "language": language}
LOWER_IS_BETTER = {"language/ppl", "language/bits_per_byte"}
OUTPUTS = ("results.json", "comparison*.md", "comparison*.csv", "comparison*.png", "items.jsonl", "pipeline.md",
           "pipeline.jsonl")


def evaluate_model(name: str, args) -> dict[str, Scores]:
    """{"task/metric": its per-item Scores} for one model."""
    tok = mt.load_tokenizer(name)
    model = mt.load_model(name, dtype=args.dtype, device=args.device).eval()
    scores = {}
    for task, run in tqdm(TASKS.items(), desc=plot.model_label(name), file=sys.stderr):
        for metric, values in run(model, tok, args).items():
            scores[f"{task}/{metric}"] = values if isinstance(values, Scores) else Scores(values)
    return scores


# ---------------------------------------------------------------- pairs of models, item by item


def paired(scores: dict[str, dict[str, Scores]], labels: dict[str, str], args) -> list[dict]:
    """Each later model A against each earlier model B, metric by metric, on the items both scored: A - B with its
    95% paired-bootstrap interval, McNemar's test where every score is right or wrong, and the verdict. Windows
    of text cut by different tokenizers are not the same items: those rows say so and give no verdict."""
    rows = []
    for b, a in itertools.combinations(scores, 2):
        for metric, ours in scores[a].items():
            theirs = scores[b][metric]
            row = {"a": a, "b": b, "metric": metric}
            if len(ours.values) != len(theirs.values) or ours.weights != theirs.weights:
                rows.append({**row, "difference": None,
                             "verdict": "not paired: their tokenizers cut different windows"})
                continue
            difference, low, high = E.paired_bootstrap_ci(ours.values, theirs.values, resamples=args.resamples,
                                                          seed=args.seed, weights=ours.weights,
                                                          transform=ours.transform)
            test = E.mcnemar(ours.values, theirs.values) if E.is_right_or_wrong(ours.values, theirs.values) else None
            rows.append({**row, "difference": difference, "low": low, "high": high, "mcnemar": test,
                         "verdict": verdict(labels[a], labels[b], low, high, metric in LOWER_IS_BETTER)})
    return rows


def ahead(low: float, high: float, lower_is_better: bool = False) -> int:
    """From the paired interval of A - B: 1 when it lies wholly on A's better side of 0, -1 when on B's, else 0 (an
    interval that touches 0 included)."""
    if low > 0 or high < 0:
        return 1 if (high < 0) == lower_is_better else -1
    return 0


def verdict(a: str, b: str, low: float, high: float, lower_is_better: bool = False) -> str:
    """"A ahead of B", "B ahead of A" or "no difference shown", by `ahead`."""
    return {1: f"{a} ahead of {b}", -1: f"{b} ahead of {a}", 0: "no difference shown"}[
        ahead(low, high, lower_is_better)]


def write_items(scores: dict[str, dict[str, Scores]], labels: dict[str, str], path: Path) -> None:
    """items.jsonl: one line per model, metric and item, its score (and weight: a window's tokens)."""
    with open(path, "w") as f:
        for name, metrics in scores.items():
            for metric, s in metrics.items():
                for i, value in enumerate(s.values):
                    f.write(json.dumps({"model": name, "label": labels[name], "metric": metric, "item": i,
                                        "value": value, **({"weight": s.weights[i]} if s.weights else {})}) + "\n")


# ---------------------------------------------------------------- best of n: one model samples, another scores


def best_of_n(args, out: Path) -> dict[str, tuple]:
    """Each way of answering the preference prompts, judged by the pairs' rules: (share, low, high, prompts).
    One model at a time (the candidates are text): the sampler samples and answers greedily, the scorer scores
    and answers greedily, the reference scores. Every prompt's candidates, scores and pick go to pipeline.jsonl."""
    names = args.pipeline
    records = head(D.read_jsonl(args.preference), args)
    questions = [r["prompt"] for r in records]

    def load(name: str):
        tok = mt.load_tokenizer(name)
        check_format(tok, name, args.fmt)
        return tok, mt.load_model(name, dtype=args.dtype, device=args.device).eval()

    def loglik(tok, model, desc: str) -> list[list[float]]:
        return [E.loglik_scores(model, tok, prompt(q, args.fmt), [spoken(c, args.fmt) for c in pool])
                for q, pool in zip(tqdm(questions, desc=desc, file=sys.stderr), pools, strict=True)]

    tok, model = load(names[0])
    pools = [[generated(c, args.fmt) for c in
              E.sample_candidates(model, tok, ask(tok, q, args.fmt), args.n, 48, seed=args.seed + i)]
             for i, q in enumerate(tqdm(questions, desc="sampling", file=sys.stderr))]
    ways = {"sampler alone (greedy)": greedy(model, tok, questions, args, 48)}
    del model
    tok, model = load(names[1])
    scores = loglik(tok, model, "scoring")
    ways["scorer alone (greedy)"] = greedy(model, tok, questions, args, 48)
    del model
    picks = {"best of n by the scorer's log-likelihood": scores}
    if len(names) == 3:
        tok, model = load(names[2])
        reference = loglik(tok, model, "reference")
        del model
        picks["best of n by the implicit reward"] = [E.implicit_rewards(s, r, args.beta)
                                                     for s, r in zip(scores, reference, strict=True)]
    ways["sampler, one sample"] = [pool[0] for pool in pools]
    for way, by in picks.items():
        ways[way] = [E.best_of(pool, values) for pool, values in zip(pools, by, strict=True)]
    with open(out / "pipeline.jsonl", "w") as f:
        for i, (q, pool) in enumerate(zip(questions, pools, strict=True)):
            f.write(json.dumps({"prompt": q, "candidates": pool, **{way: by[i] for way, by in picks.items()},
                                "kept": {way: ways[way][i] for way in picks}}) + "\n")
    judged = {way: [E.rule_score(r["check"], a) for r, a in zip(records, answers, strict=True)]
              for way, answers in ways.items()}
    judged[f"any of the {args.n} samples (a perfect scorer)"] = [
        max(E.rule_score(r["check"], c) for c in pool) for r, pool in zip(records, pools, strict=True)]
    order = ["sampler, one sample", *picks, "sampler alone (greedy)", "scorer alone (greedy)"]
    return {way: (*E.bootstrap_ci(judged[way], resamples=args.resamples, seed=args.seed), len(records))
            for way in [*order, *[w for w in judged if w not in order]]}


def check_format(tok, name: str, fmt: str) -> None:
    if fmt == "chat" and not tok.chat_template:
        raise UserError(f"{name}: its tokenizer has no chat template, so it cannot be asked in chat: use "
                         "--prompt-format text (or auto) to ask every model in plain text")


# ---------------------------------------------------------------- the report


def cell(v: tuple) -> str:
    value, low, high = v[:3]
    digits = 2 if max(abs(value), abs(high)) >= 10 else 3
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(results: dict[str, dict], labels: dict[str, str]) -> str:
    metrics = list(next(iter(results.values())))
    rows = ["| task | metric | items | " + " | ".join(labels[m] for m in results) + " |",
            "|---|---|---:|" + "---:|" * len(results)]
    for metric in metrics:
        task, name = metric.split("/")
        arrow = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        items = "/".join(dict.fromkeys(str(r[metric][3]) for r in results.values()))  # windows differ by tokenizer
        rows.append(f"| {task} | {name}{arrow} | {items} | "
                    + " | ".join(cell(r[metric]) for r in results.values()) + " |")
    return "\n".join(rows) + "\n" + collapsed([v for r in results.values() for v in r.values()])


def collapsed(values: list[tuple]) -> str:
    """A note for intervals of zero width: every item scored the same, and resampling the items cannot say
    how far the rate could be from the sample's (for 0 of n, the rule of three bounds it below 3/n at 95%)."""
    zero = sorted({n for v, low, high, n in values if low == high and v == 0})
    if not any(low == high for _, low, high, _ in values):
        return ""
    bound = (" For 0 of n items the rule of three puts the 95% upper bound at 3/n (" +
             ", ".join(f"n = {n}: {3 / n:.3f}" for n in zero) + ").") if zero else ""
    return ("\nAn interval of zero width means every item scored the same: the bootstrap resamples only what was "
            f"seen.{bound}\n")


def paired_table(rows: list[dict], labels: dict[str, str]) -> str:
    def test(row: dict) -> str:
        m = row.get("mcnemar")
        return f"{m['p_value']:.3g} ({m['only_a']} / {m['only_b']})" if m else "—"

    lines = ["| A − B | task | metric | difference [95% paired interval] | McNemar p (only A / only B right) "
             "| verdict |", "|---|---|---|---:|---:|---|"]
    for row in rows:
        task, name = row["metric"].split("/")
        arrow = " (lower is better)" if row["metric"] in LOWER_IS_BETTER else ""
        difference = "—" if row["difference"] is None else cell((row["difference"], row["low"], row["high"]))
        lines.append(f"| {labels[row['a']]} − {labels[row['b']]} | {task} | {name}{arrow} | {difference} | "
                     f"{test(row)} | {row['verdict']} |")
    return ("Each pair on the items both models answered: the difference A − B with its 95% paired-bootstrap "
            "interval (an item's two scores drawn together) and, for right/wrong metrics, McNemar's exact "
            "two-sided p-value over the items they disagree on. A verdict is given where the paired interval "
            "excludes 0.\n\n" + "\n".join(lines) + "\n")


def pipeline_table(pipeline: dict[str, tuple], args, labels: dict[str, str]) -> str:
    names = [labels.get(m, plot.model_label(m)) for m in args.pipeline]
    who = f"sampler {names[0]}, scorer {names[1]}" + (f", reference {names[2]}" if len(names) == 3 else "")
    rows = "\n".join(f"| {way} | {cell(v)} |" for way, v in pipeline.items())
    return (f"Best of {args.n} ({who}) on the {next(iter(pipeline.values()))[3]} prompts of "
            f"`examples/data/preference/test.jsonl`, judged by each pair's rule; the last row is the share of "
            f"prompts with at least one candidate that satisfies it, the most any scorer could keep:\n\n"
            f"| answers | satisfy the rule |\n|---|---:|\n{rows}\n{collapsed(list(pipeline.values()))}")


def write_csv(results: dict[str, dict], labels: dict[str, str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "label", "task", "metric", "items", "value", "low", "high"])
        for name, r in results.items():
            for metric, (value, low, high, items) in r.items():
                writer.writerow([name, labels[name], *metric.split("/"), items, value, low, high])


def charts(results: dict[str, dict], labels: dict[str, str], rows: list[dict], out: Path) -> list[Path]:
    """comparison.png: every share, every model; comparison_<task>.png: one task's metrics; comparison_paired.png:
    the shares' paired differences, a group per metric and a bar per pair."""
    named = {labels[name]: r for name, r in results.items()}
    metrics = list(next(iter(results.values())))
    shares = [m for m in metrics if m not in LOWER_IS_BETTER]
    paths = [plot.plot_comparison(named, out / "comparison.png", "the same protocol for every model (95% intervals)",
                                  shares)]
    for task in dict.fromkeys(m.split("/")[0] for m in metrics):
        paths.append(plot.plot_comparison(named, out / f"comparison_{task}.png", task,
                                          [m for m in metrics if m.startswith(task + "/")]))
    differences: dict[str, dict] = {}
    for row in rows:
        if row["metric"] in shares and row["difference"] is not None:
            pair = f"{labels[row['a']]} − {labels[row['b']]}"
            differences.setdefault(pair, {})[row["metric"]] = (row["difference"], row["low"], row["high"])
    if differences:
        paths.append(plot.plot_comparison(differences, out / "comparison_paired.png",
                                          "paired differences A − B (95% paired intervals)", shares, baseline=0.0))
    return [p for p in paths if p]


def labels_for(models: list[str], default: bool) -> dict[str, str]:
    """Short names for the table and charts: the bundled three by role, others by plot.model_label, or by the
    name as given where two short names would be the same."""
    if default:
        return dict(zip(models, ("tiny-mistral", "tiny-mistral-sft", "tiny-zephyr"), strict=True))
    short = [plot.model_label(m) for m in models]
    return {m: s if short.count(s) == 1 else m for m, s in zip(models, short, strict=True)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    out = check_out(argparse.Namespace(out=args.out, model=None, resume=None, overwrite=args.overwrite), OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    if args.default:
        build_missing(args)
    toks = [mt.load_tokenizer(m) for m in args.models]
    args.fmt = args.prompt_format if args.prompt_format != "auto" else \
        "chat" if all(t.chat_template for t in toks) else "text"
    for tok, name in zip(toks, args.models, strict=True):
        check_format(tok, name, args.fmt)
    labels = labels_for(args.models, args.default)
    scores = {name: evaluate_model(name, args) for name in args.models}
    results = {name: {metric: s.summary(args) for metric, s in metrics.items()} for name, metrics in scores.items()}
    rows = paired(scores, labels, args)
    pipeline = best_of_n(args, out) if args.pipeline != ["none"] else {}
    (out / "results.json").write_text(json.dumps({"prompt_format": args.fmt, "models": results, "paired": rows,
                                                  "labels": labels, "pipeline": pipeline}, indent=1))
    write_items(scores, labels, out / "items.jsonl")
    write_csv(results, labels, out / "comparison.csv")
    text = (f"Models: {', '.join(f'{labels[m]} (`{m}`)' for m in args.models)}; prompts: {args.fmt}. Value "
            f"[95% bootstrap interval, {args.resamples} resamples].\n\n{table(results, labels)}\n"
            f"{paired_table(rows, labels)}")
    (out / "comparison.md").write_text(text)
    charts(results, labels, rows, out)
    if pipeline:
        (out / "pipeline.md").write_text(pipeline_table(pipeline, args, labels))
        text += "\n" + pipeline_table(pipeline, args, labels)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s; written to {out})")
    return {"results": results, "paired": rows, "pipeline": pipeline, "labels": labels, "format": args.fmt}


if __name__ == "__main__":
    run_main(main)
