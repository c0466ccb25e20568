"""Packing: the SFT example's training step on the same examples, padded and packed: time, slots and loss.

    python benchmarks/bench_packing.py --out /tmp/bench_packing                # CPU: tiny-mistral, the bundled chats
    python benchmarks/bench_packing.py --device cuda --out benchmarks/out/packing   # GPU: bf16 autocast, varlen

Each round takes the next optimizer step's examples in the example's own data order (--batch-size of them,
one micro-batch) and runs `examples/finetune_mistral.py`'s `train_step` on them twice, each with its own copy
of the model, optimizer and schedule, the order alternating from round to round:

- padded: `collate(examples)`, one row per example, right-padded to the step's longest;
- packed: `collate(pack(examples, --pack-length))`, the same examples by best-fit decreasing in rows of
  --pack-length tokens (positions restart per example; on a GPU in bf16, attention within the collated
  `cu_seqlens` through variable-length flash attention, no mask).

Both see the same target tokens, so the first step (same weights) gives the same loss up to float rounding;
later steps drift apart by rounding only. Reported: ms per step (median over the rounds), tokens/s (real
tokens / time), the per-round time ratio packed / padded (median [IQR] (min-max)), the slots (rows x width)
each step computes and the share of them that hold a token, and the first-step losses.

Goal (issue 20, CPU): the packed step faster than the padded one (median per-round ratio below 1) with the
same loss (first step within 1e-5 relative). Writes <out>/bench_packing.json and <out>/bench_packing.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # minitune from this checkout, installed or not
sys.path.insert(0, str(ROOT / "examples"))  # the example's train_step, as finetune_gpt.py imports it

import finetune_mistral as example  # noqa: E402
from bench_kernels import environment, environment_line  # noqa: E402

import minitune as mt  # noqa: E402
from minitune import data as D  # noqa: E402
from minitune.optim import make_optimizer, make_scheduler  # noqa: E402
from minitune.train import autocast, micro_batches, to_device  # noqa: E402

LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}


def spread(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "assets" / "tiny-mistral"))
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "sft" / "train.jsonl"))
    ap.add_argument("--batch-size", type=int, default=32, help="examples per step")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per example (the example's flag)")
    ap.add_argument("--pack-length", type=int, default=256, help="tokens per packed row")
    ap.add_argument("--steps", type=int, default=12, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/out/packing")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    ex_args = example.parse_args(["--model", args.model, "--data", args.data, "--batch-size", str(args.batch_size),
                                  "--max-length", str(args.max_length), "--device", device.type, "--dtype", dtype])
    tok = mt.load_tokenizer(args.model)
    train, _, _ = example.load_examples(ex_args, tok)
    pad = D.pad_id(tok)
    rounds = args.warmup + args.steps
    steps = [micro_batches(train, s, args.batch_size, 1, ex_args.seed, 0, 1)[0] for s in range(rounds)]
    layouts = {"padded": [D.collate(step, pad) for step in steps],
               "packed": [D.collate(D.pack(step, args.pack_length), pad) for step in steps]}

    torch.manual_seed(0)
    base = mt.load_model(args.model, dtype=torch.float32, device=device).train()
    runs = {}
    for name in layouts:
        model = copy.deepcopy(base)
        optimizer = make_optimizer(model, lr=ex_args.lr, weight_decay=ex_args.weight_decay)
        scheduler = make_scheduler(optimizer, "constant", 0, rounds)
        runs[name] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ms": [], "losses": []}
    amp = functools.partial(autocast, device, dtype)

    for i in range(rounds):
        order = list(layouts) if i % 2 == 0 else list(layouts)[::-1]
        for name in order:
            r = runs[name]
            batch = to_device(layouts[name][i], device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = example.train_step(r["model"], [batch], r["optimizer"], r["scheduler"], amp,
                                        ex_args.max_grad_norm)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                r["ms"].append((time.perf_counter() - t0) * 1e3)
            r["losses"].append(result["loss"])

    tokens = [sum(len(e["input_ids"]) for e in step) for step in steps[args.warmup:]]
    rows = []
    for name, r in runs.items():
        slots = [b["input_ids"].numel() for b in layouts[name][args.warmup:]]
        rows.append({"layout": name, "ms": statistics.median(r["ms"]),
                     "tokens_per_s": statistics.median(t / (ms / 1e3) for t, ms in zip(tokens, r["ms"])),
                     "slots_per_step": statistics.median(slots), "filled": sum(tokens) / sum(slots),
                     "first_loss": r["losses"][0], "losses": r["losses"]})
    ratio = spread([p / q for p, q in zip(runs["packed"]["ms"], runs["padded"]["ms"])])
    padded, packed = rows
    loss_diff = abs(packed["first_loss"] - padded["first_loss"])
    result = {
        "command": "python benchmarks/bench_packing.py " + " ".join(sys.argv[1:]),
        "environment": environment(device, getattr(torch, dtype)), "args": vars(args), "dtype": dtype,
        "rows": rows, "time_ratio": ratio, "first_loss_diff": loss_diff,
        "goal": {"faster": ratio["median"] < 1.0,
                 "same_loss": loss_diff <= LOSS_RTOL[dtype] * abs(padded["first_loss"])},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_packing.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "bench_packing.md").write_text(md)
    print(md)


def markdown(result: dict) -> str:
    a, s = result["args"], result["time_ratio"]
    lines = ["# Packing: the SFT step on the same examples, padded and packed", "",
             environment_line(result["environment"]), "",
             f"`{Path(a['model']).name}`, {a['batch_size']} examples a step from `{Path(a['data']).name}` (the example's "
             f"data order), {a['warmup']} warm-up + {a['steps']} timed rounds, {result['dtype']}; packed rows of "
             f"{a['pack_length']} tokens.", "",
             "| layout | ms / step | tokens/s | slots / step | slots filled | first-step loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['slots_per_step']:.0f} | "
                     f"{r['filled']:.1%} | {r['first_loss']:.6f} |")
    g = result["goal"]
    lines += ["", f"Per-round time ratio packed / padded: median {s['median']:.3f} [IQR {s['q1']:.3f}–{s['q3']:.3f}, "
                  f"range {s['min']:.3f}–{s['max']:.3f}, {s['n']} rounds]; first-step losses differ by "
                  f"{result['first_loss_diff']:.2e}.", "",
              f"Goal: packed faster -> {'**met**' if g['faster'] else '**NOT met**'}; the same loss -> "
              f"{'**met**' if g['same_loss'] else '**NOT met**'}.", "",
              f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
