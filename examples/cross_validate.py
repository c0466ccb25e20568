"""A small hyperparameter search scored by k-fold cross-validation: each configuration fine-tunes a fresh model
on k - 1 folds of a small data set and is measured on the fold left out, k times; the configurations are
ranked by the mean over the folds, reported with the standard deviation.

    python examples/cross_validate.py       # LoRA SFT of tiny-mistral: 4 of the grid lr x warmup x rank, 3 folds
    python examples/cross_validate.py --search lr=3e-4,1e-3,3e-3 lora_r=8,32 --samples 0   # the whole grid
    python examples/cross_validate.py --workflow dpo --search beta=0.1,0.5 lr=3e-4,1e-3 --subset 120

Each fold runs the workflow's example (finetune_mistral.py or dpo.py) in this process, through its main(),
with --data and --val-data pointing at the fold's files; any flag this script does not know goes to the
example unchanged (e.g. --epochs 2 --batch-size 8). --search names the example's flags by their dest
(lr, warmup, lora_r, beta, ...). Every value of --search is checked by the example's own flags before
any fold trains. Output in --out: search.jsonl (each configuration's folds and summary, written as soon as it
is scored, so an interrupted search keeps what it finished: --resume auto goes on from it), then search.md,
search.csv, search.json and search.png. A folder holding an earlier search is refused without --resume auto
or --overwrite.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

import dpo  # examples/ is on sys.path when this file runs
import finetune_mistral as sft

from minitune import data as D
from minitune import evaluate as E
from minitune import plot
from minitune.errors import UserError
from minitune.train import ArgumentParser, Interrupted, check_out, run_main

HERE = Path(__file__).resolve().parent
WORKFLOWS = {  # example, default data, default metric
    "sft": (sft, HERE / "data" / "sft" / "train.jsonl", "val_loss"),
    "dpo": (dpo, HERE / "data" / "preference" / "train.jsonl", "val_preference_accuracy"),
}
DEFAULT_SEARCH = ["lr=1e-3,3e-3", "warmup=0,5", "lora_r=4,32"]
OUTPUTS = ("search.jsonl", "search.json", "search.md", "search.csv", "search.png", "runs")
# The example flags for the bundled data (a fold trains for about 20 steps): LoRA on every linear layer, 2 epochs
# of the fold's chats, every held-out chat answered. A flag that --search sets is dropped from these.
# --lora-alpha stays 32 whatever the rank, so the rank also sets the update's scale (alpha / r), as in PEFT when
# only r is changed; add lora_alpha to --search to vary it too.
DEFAULT_EXTRA = {"sft": ["--lora-r", "16", "--lora-targets", "all-linear", "--lora-alpha", "32", "--epochs", "2",
                         "--warmup", "5", "--exact-match-samples", "1000"],
                 "dpo": ["--epochs", "1", "--warmup", "5"]}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", default="sft", choices=list(WORKFLOWS))
    p.add_argument("--model", default=None,
                   help="default: the example's own (tiny-mistral for sft, runs/sft/final for dpo)")
    p.add_argument("--data", default=None, help="JSONL to cross-validate on (default: the example's training set)")
    p.add_argument("--subset", type=int, default=192, help="records drawn from --data (seeded); 0 = all")
    p.add_argument("--k", type=int, default=3, help="folds")
    p.add_argument("--search", nargs="+", default=DEFAULT_SEARCH, metavar="NAME=V1,V2",
                   help="values to try per flag (its dest name)")
    p.add_argument("--samples", type=int, default=4,
                   help="random search: this many configurations of the grid; 0 = the whole grid")
    p.add_argument("--metric", default=None, help="what ranks the configurations (default: the workflow's)")
    p.add_argument("--out", default="runs/cv")
    p.add_argument("--seed", type=int, default=0, help="the subset, the folds and the random search")
    p.add_argument("--resume", choices=["auto"], help="reuse the configurations search.jsonl in --out has scored")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds an earlier search")
    args, extra = p.parse_known_args(argv)
    if args.resume and args.overwrite:
        p.error("--overwrite starts the search again and --resume continues it: pass one of them")
    if args.k < 2 or args.subset < 0 or args.samples < 0:
        p.error("--k must be at least 2, --subset and --samples at least 0")
    args.space = {}
    for item in args.search:
        name, _, values = item.partition("=")
        if not name or not values:
            p.error(f"--search {item!r}: expected NAME=V1,V2,... (e.g. lr=3e-4,1e-3)")
        args.space[name.replace("-", "_")] = [_number(v) for v in values.split(",")]
    example = WORKFLOWS[args.workflow][0]
    known = vars(example.parse_args([]))
    unknown = [name for name in args.space if name not in known]
    if unknown:
        p.error(f"--search {unknown}: not flags of {example.__name__}.py (its flags: {sorted(known)})")
    args.metric = args.metric or WORKFLOWS[args.workflow][2]
    args.model_name = args.model or known["model"]
    if args.data and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    defaults = DEFAULT_EXTRA[args.workflow]
    kept = [f for i in range(0, len(defaults), 2) if defaults[i][2:].replace("-", "_") not in args.space
            for f in defaults[i:i + 2]]
    for name, values in args.space.items():  # each value as the example reads it: a bad one stops us here
        for value in values:
            example.parse_args([*kept, *extra, *flags({name: value})])
    return args, kept + extra


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def flags(config: dict) -> list[str]:
    return [f for name, value in config.items() for f in (f"--{name.replace('_', '-')}", str(value))]


def label(config: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in config.items())


def fit_fold(args, extra: list[str], config: dict, train: list[dict], val: list[dict], fold: int) -> dict:
    """Fine-tune on `train` with the configuration, measure on `val`: the example's last validation."""
    run = Path(args.out) / "runs" / label(config).replace(" ", "_") / f"fold{fold}"
    if run.exists():
        shutil.rmtree(run)  # a fresh run, not a resume
    run.mkdir(parents=True)
    for name, records in (("train", train), ("val", val)):
        (run / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = ["--model", args.model] if args.model else []
    example = WORKFLOWS[args.workflow][0]
    example.main([*model, "--data", str(run / "train.jsonl"), "--val-data", str(run / "val.jsonl"),
                  "--out", str(run), "--eval-every", "1000000", "--save-every", "1000000", "--seed", str(args.seed),
                  *extra, *flags(config)])
    last = D.read_jsonl(run / "metrics.jsonl")[-1]
    for folder in ("final", "adapter", "checkpoints"):  # the numbers are what the search keeps
        shutil.rmtree(run / folder, ignore_errors=True)
    return {k: v for k, v in last.items() if k.startswith("val_")}


def report(results: list[dict], args, extra: list[str], n: int) -> str:
    metrics = list(results[0]["mean"])
    head = ["configuration", *metrics, f"{args.metric} per fold"]
    rows = [f"| {label(r['config'])} | " + " | ".join(f"{r['mean'][m]:.3f} ± {r['std'][m]:.3f}" for m in metrics)
            + " | " + ", ".join(f"{f[args.metric]:.3f}" for f in r["folds"]) + " |" for r in results]
    return (f"{args.workflow} of `{plot.model_label(args.model_name)}` on {n} records of "
            f"{args.data or WORKFLOWS[args.workflow][1].relative_to(HERE.parent)}, {args.k}-fold cross-validation "
            f"(seed {args.seed}), the example's flags `{' '.join(extra)}`; mean ± standard deviation over the "
            f"folds, best {args.metric} first (a configuration whose {args.metric} is not a number last).\n\n| "
            + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1) + "\n" + "\n".join(rows) + "\n")


def main(argv=None) -> list[dict]:
    args, extra = parse_args(argv)
    out = Path(args.out)
    if not args.resume:  # a folder holding an earlier search needs --resume auto or --overwrite
        check_out(argparse.Namespace(out=out, model=args.model_name, resume=None, overwrite=args.overwrite), OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    records = D.read_jsonl(args.data or WORKFLOWS[args.workflow][1])
    if args.subset and args.subset < len(records):
        records = random.Random(args.seed).sample(records, args.subset)
    configs = E.random_configs(args.space, args.samples, args.seed) if args.samples else E.grid(args.space)
    lower = any(word in args.metric for word in ("loss", "ppl"))
    # what a configuration's score depends on besides its values: a resumed search reuses only scores that match
    settings = {"workflow": args.workflow, "model": args.model_name, "data": str(args.data), "subset": args.subset,
                "k": args.k, "seed": args.seed, "records": len(records), "flags": extra}
    scored = previous_scores(out / "search.jsonl", settings) if args.resume else {}

    def evaluate_config(config: dict) -> dict:
        if label(config) in scored:
            return scored[label(config)]
        result = E.cross_validate(records, args.k, lambda train, val, i: fit_fold(args, extra, config, train, val, i),
                                  args.seed, desc=label(config))
        with open(out / "search.jsonl", "a", encoding="utf-8") as f:  # kept at once: a stopped search keeps it
            f.write(json.dumps({"config": config, "settings": settings, **result}) + "\n")
        return result

    try:
        results = E.search(configs, evaluate_config, args.metric, higher_is_better=not lower)
    except KeyboardInterrupt:
        done = len((out / "search.jsonl").read_text().splitlines()) if (out / "search.jsonl").exists() else 0
        raise Interrupted(f"interrupted with {done} of {len(configs)} configurations scored in {out / 'search.jsonl'}: "
                          "the same command with --resume auto goes on from them") from None
    (out / "search.json").write_text(json.dumps(results, indent=1))
    with open(out / "search.csv", "w", newline="") as f:
        writer = csv.writer(f)
        metrics = list(results[0]["mean"])
        writer.writerow([*args.space, *[f"{m}_{part}" for m in metrics for part in ("mean", "std")]])
        for r in results:
            writer.writerow([*r["config"].values(), *[v for m in metrics for v in (r["mean"][m], r["std"][m])]])
    text = report(results, args, extra, len(records))
    (out / "search.md").write_text(text)
    bars = {label(r["config"]): {args.metric: (r["mean"][args.metric], r["mean"][args.metric] - r["std"][args.metric],
                                               r["mean"][args.metric] + r["std"][args.metric])} for r in results}
    plot.plot_comparison(bars, out / "search.png", f"{args.k}-fold cross-validation: mean ± std")
    print(text)
    return results


def previous_scores(path: Path, settings: dict) -> dict[str, dict]:
    """The configurations an earlier search in the same folder scored with the same settings, by label."""
    if not path.exists():
        raise UserError(f"--resume auto: {path} not found, so there is no search to continue")
    scored = {}
    for lineno, line in D.iter_jsonl(path):
        if line.get("settings") != settings:
            raise UserError(f"{path}:{lineno}: scored with other settings ({line.get('settings')}, now {settings}): "
                            "pass --overwrite to start again")
        scored[label(line["config"])] = {k: line[k] for k in ("mean", "std", "folds")}
    return scored


if __name__ == "__main__":
    run_main(main)
