"""Several models on one evaluation protocol: tiny-mistral against its SFT and DPO ("tiny-zephyr") models.

    python examples/compare_models.py                               # the bundled three (SFT and DPO built if absent)
    python examples/compare_models.py --models mistralai/Mistral-7B-v0.1 HuggingFaceH4/zephyr-7b-beta

WORK IN PROGRESS (issue 8, branch wip/issue-8): the per-model tasks and the table are here; the charts, the
best-of-n pipeline, building the SFT/DPO models when absent and the reproduce section are not yet.

Each model is asked the same questions the same way (chat prompts through its tokenizer's template):
  instruction      exact match of greedy answers to eval/generation/test.jsonl
  knowledge        multiple-choice log-likelihood accuracy (acc, acc_norm) on eval/multiple_choice/test.jsonl
  preference       preference/test.jsonl: the share of pairs whose chosen answer the model finds likelier (per
                   token), and the share of its greedy answers that satisfy the pair's rule
  language         perplexity of source/validation.jsonl with a strided window
Every share has a 95% bootstrap interval over the items.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import minitune as mt
import minitune.plot  # noqa: F401 (mt.plot)
from minitune import data as D
from minitune import evaluate as E

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
DEFAULT_MODELS = [str(HERE / "assets" / "tiny-mistral"), "runs/sft/final", "runs/dpo/final"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="hub ids or folders")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="perplexity window")
    p.add_argument("--stride", type=int, default=128, help="perplexity window stride")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt in the best-of-n pipeline")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def instruction(model, tok, args) -> dict[str, list[float]]:
    records = D.read_jsonl(DATA / "eval" / "generation" / "test.jsonl")
    longest = max(len(tok.encode(r["answer"], add_special_tokens=False)) for r in records)
    answers = E.generate_answers(model, tok, [chat(r["prompt"]) for r in records], args.batch_size, longest + 8)
    return {"exact_match": [float(E.exact_match(a, r["answer"])) for a, r in zip(answers, records, strict=True)]}


def knowledge(model, tok, args) -> dict[str, list[float]]:
    scores = {"acc": [], "acc_norm": []}
    for q in tqdm(E.read_multiple_choice(DATA / "eval" / "multiple_choice" / "test.jsonl"), desc="choices",
                  leave=False, file=sys.stderr):
        choices = [" " + c for c in q["choices"]]
        context = E.prompt_text(tok, chat(q["question"]))
        for key, value in E.multiple_choice_scores(E.choice_logprobs(model, tok, context, choices), choices,
                                                   q["answer"]).items():
            scores[key].append(value)
    return scores


def preference(model, tok, args) -> dict[str, list[float]]:
    test = DATA / "preference" / "test.jsonl"
    records = D.read_jsonl(test)
    pairs = D.load_preferences(test, tok, max_length=256, chat=True)
    logps = mt.reference.precompute_logps(model, pairs, D.pad_id(tok), args.batch_size, average=True)  # (N, 2)
    prefers = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in logps.tolist()]
    answers = E.generate_answers(model, tok, [chat(r["prompt"]) for r in records], args.batch_size, 48)
    rule = [E.rule_score(r["check"], a) for r, a in zip(records, answers, strict=True)]
    return {"prefers_chosen": prefers, "rule_score": rule}


def language(model, tok, args) -> dict[str, float]:
    stream = D.token_stream(tok, D.read_texts(DATA / "source" / "validation.jsonl"))
    return {"ppl": E.strided_perplexity(model, stream, args.max_length, args.stride)["ppl"]}


TASKS = {"instruction": instruction, "knowledge": knowledge, "preference": preference, "language": language}


def evaluate_model(name: str, args) -> dict[str, dict]:
    """{task: {metric: (value, low, high)}} for one model (perplexity has no interval: one number per text)."""
    tok = mt.load_tokenizer(name)
    model = mt.load_model(name, dtype=torch.float32, device=args.device).eval()
    results = {}
    for task, run in TASKS.items():
        for metric, values in run(model, tok, args).items():
            interval = E.bootstrap_ci(values, resamples=args.resamples) if isinstance(values, list) else \
                (values, values, values)
            results[f"{task}/{metric}"] = interval
    return results


def best_of_n(sampler_dir: str, scorer_dir: str, reference_dir: str, args) -> dict[str, tuple]:
    """The pipeline: `sampler` samples --n answers to each held-out preference prompt, `scorer` keeps the one
    with the highest implicit reward β·log(π_scorer/π_reference) (DPO's reward model, for free), and the kept
    answers are judged by the pairs' rules: against the sampler's and the scorer's own greedy answers."""
    tok = mt.load_tokenizer(scorer_dir)
    sampler, scorer, reference = (mt.load_model(d, dtype=torch.float32, device=args.device).eval()
                                  for d in (sampler_dir, scorer_dir, reference_dir))
    records = D.read_jsonl(DATA / "preference" / "test.jsonl")
    kept = []
    for i, r in enumerate(tqdm(records, desc="best of n", leave=False, file=sys.stderr)):
        candidates = E.sample_candidates(sampler, tok, chat(r["prompt"]), args.n, 48, seed=args.seed + i)
        kept.append(E.best_of(candidates, E.implicit_reward_scores(scorer, reference, tok, chat(r["prompt"]),
                                                                   candidates)))
    greedy = {name: E.generate_answers(m, tok, [chat(r["prompt"]) for r in records], args.batch_size, 48)
              for name, m in (("sampler", sampler), ("scorer", scorer))}

    def score(answers: list[str]) -> tuple:
        return E.bootstrap_ci([E.rule_score(r["check"], a) for r, a in zip(records, answers, strict=True)],
                              resamples=args.resamples)

    return {"best of n": score(kept), "sampler alone (greedy)": score(greedy["sampler"]),
            "scorer alone (greedy)": score(greedy["scorer"])}


def table(results: dict[str, dict]) -> str:
    metrics = list(next(iter(results.values())))
    rows = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, r in results.items():
        cells = [f"{r[m][0]:.3f} [{r[m][1]:.3f}, {r[m][2]:.3f}]" if r[m][1] != r[m][2] else f"{r[m][0]:.2f}"
                 for m in metrics]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: evaluate_model(name, args) for name in args.models}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "comparison.md").write_text(table(results))
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        metrics = list(next(iter(results.values())))
        writer.writerow(["model", *[f"{m}{part}" for m in metrics for part in ("", "_low", "_high")]])
        for name, r in results.items():
            writer.writerow([name, *[v for m in metrics for v in r[m]]])
    print(table(results))
    shares = [m for m in next(iter(results.values())) if not m.endswith("ppl")]
    mt.plot.plot_comparison(results, out / "comparison.png", "the same protocol for every model", shares)
    if len(args.models) >= 3:  # the bundled order: base, SFT (sampler and reference), DPO (scorer)
        pipeline = best_of_n(args.models[1], args.models[2], args.models[1], args)
        lines = [f"| {k} | {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}] |" for k, v in pipeline.items()]
        text = "| answers to the preference prompts | satisfy the rule |\n|---|---:|\n" + "\n".join(lines) + "\n"
        (out / "pipeline.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
