"""Transfer learning of GPT-2 from one domain to another, one technique at a time or all side by side.

    python examples/finetune_gpt.py --technique lora           # bundled tiny-gpt2: the valley -> the kitchen
    python examples/finetune_gpt.py --compare                  # every technique, same data and budget
    python examples/finetune_gpt.py --add-tokens 24            # the kitchen's words as whole tokens first
    python examples/finetune_gpt.py --model openai-community/gpt2 --data my_domain.jsonl --val-data ...

The model was trained on the source domain (examples/data/source: the valley); it learns the target
domain (examples/data/target: a kitchen book) as a language model, and the source domain's
perplexity after training measures what it forgot. Techniques:

    full      every weight trains
    head      only the top: the final norm and the output head (for GPT-2, tied to the embedding)
    freeze-k  the embeddings and the first k blocks frozen, the rest trains
    gradual   ULMFiT: discriminative rates (each group down from the head at lr / 2.6) and gradual
              unfreezing, head and top block first, one more group every --unfreeze-every steps
    lora      LoRA adapters on every linear layer (--lora-r, default 8), the base frozen

Each run writes metrics.jsonl, training.png, result.json and final/ (adapter/ too for lora) in --out;
--compare runs each technique in its own process (so its peak memory is its own) into --out/<technique>
and writes comparison.md, comparison.csv and comparison.png in --out.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from finetune_mistral import train_step  # the SFT example's step; examples/ is on sys.path when this file runs

import minitune as mt
from minitune import data as D
from minitune.errors import UserError
from minitune.freeze import discriminative_param_groups, freeze, gradual_unfreeze, layer_groups
from minitune.optim import SCHEDULES, make_optimizer, make_scheduler
from minitune.plot import plot_training
from minitune.profiling import PeakMemory
from minitune.train import (
    RUN_FILES,
    ArgumentParser,
    Interrupted,
    MetricsLog,
    add_common_args,
    add_lora_args,
    autocast,
    check_out,
    compile_blocks,
    finished,
    interrupted,
    micro_batches,
    non_negative_float,
    non_negative_int,
    parse_common_args,
    positive_float,
    positive_int,
    run_main,
    save_final,
    stopped,
    to_device,
    total_steps,
    warmup_steps,
)

HERE = Path(__file__).resolve().parent
TECHNIQUES = ("full", "head", "freeze-k", "gradual", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, model=str(HERE / "assets" / "tiny-gpt2"), data=str(HERE / "data" / "target" / "train.jsonl"),
                    out="runs/gpt", eval_every=25, save_every=1000)
    # the optimisation, the same for every technique: AdamW, a linear warmup then a decay, the gradient clipped
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the training windows")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (the head's, for gradual)")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="decay after warmup")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW decay of weight matrices only")
    p.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="clip the gradient norm; 0: never")
    add_lora_args(p, targets=("all-linear",))  # used by --technique lora (r 8 unless --lora-r says)
    p.add_argument("--technique", default="full", choices=TECHNIQUES)
    p.add_argument("--compare", action="store_true", help="run every technique and write the comparison")
    p.add_argument("--val-data", default=str(HERE / "data" / "target" / "validation.jsonl"), help="target domain")
    p.add_argument("--source-data", default=str(HERE / "data" / "source" / "validation.jsonl"),
                   help="source domain, to measure forgetting")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training and evaluation window")
    p.add_argument("--freeze-k", type=int, default=None, help="blocks frozen by freeze-k (default: half)")
    p.add_argument("--unfreeze-every", type=int, default=None, help="gradual: steps per group (default: spread "
                   "the groups over the run)")
    p.add_argument("--lr-factor", type=float, default=2.6, help="gradual: ratio of neighbouring groups' rates")
    p.add_argument("--add-tokens", type=int, default=0, help="add the N most frequent target words that the "
                   "tokenizer splits into 3+ pieces as whole tokens, and grow the embedding to match")
    args = parse_common_args(p, argv)
    if args.resume:  # its runs are short and save no checkpoints
        p.error("--resume: this example saves no checkpoints to resume from; --overwrite starts a run again")
    # the --lora-* flags configure the lora technique (--compare passes them to every run)
    args.lora_r = (args.lora_r or 8) if args.technique == "lora" else 0
    return args


# ---------------------------------------------------------------- data


def windows(tok, path: str, seq_len: int) -> torch.Tensor:
    """The documents of `path` as one token stream, cut into consecutive windows: (N, seq_len)."""
    stream = D.token_stream(tok, D.read_texts(path))
    if len(stream) < seq_len:
        raise UserError(f"{path}: {len(stream)} tokens, fewer than one window of --seq-len {seq_len}")
    return stream[:len(stream) // seq_len * seq_len].view(-1, seq_len)


def split_words(tok, texts: list[str], n: int) -> list[str]:
    """The n most frequent words of `texts` that the tokenizer cuts into three or more pieces."""
    counts = collections.Counter(w for t in texts for w in re.findall(r"[A-Za-z]+", t.lower()))
    return [w for w, _ in counts.most_common() if len(tok.encode(" " + w, add_special_tokens=False)) >= 3][:n]


# ---------------------------------------------------------------- the techniques


def prepare(model, args) -> torch.optim.Optimizer:
    """Freeze, wrap or group the model as the technique says; its optimizer."""
    if args.technique == "lora":
        mt.lora.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           target_modules=args.lora_targets, use_rslora=args.rslora)
    elif args.technique == "head":
        head = {id(p) for _, p in layer_groups(model)[-1][1]} | {id(model.lm_head.weight)}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    elif args.technique == "freeze-k":
        freeze(model, embeddings=True, first_k_blocks=frozen_blocks(args, model))
    elif args.technique == "gradual":
        groups = discriminative_param_groups(model, args.lr, args.lr_factor, args.weight_decay)
        return torch.optim.AdamW(groups, lr=args.lr)
    return make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)


def frozen_blocks(args, model) -> int:
    """freeze-k: the blocks frozen, --freeze-k or the bottom half."""
    n_blocks = len(layer_groups(model)) - 2  # the groups: embeddings, each block, the head
    return n_blocks // 2 if args.freeze_k is None else args.freeze_k


def technique_name(args, model) -> str:
    """The technique in words, for the comparison's table and chart."""
    if args.technique == "freeze-k":
        return f"layer freezing (first {frozen_blocks(args, model)} blocks)"
    if args.technique == "lora":
        return f"LoRA (r={args.lora_r})"
    return {"full": "full fine-tuning", "head": "head only", "gradual": "gradual unfreezing"}[args.technique]


def unfreeze_every(args, model, steps: int) -> int:
    """gradual: steps between openings; by default the last group opens halfway through the run."""
    n_groups = len(layer_groups(model))
    return args.unfreeze_every or max(1, steps // (2 * (n_groups - 2)) if n_groups > 2 else steps)


# ---------------------------------------------------------------- one run


def run(args) -> dict:
    device, out = torch.device(args.device), check_out(args, (*RUN_FILES, "result.json"))
    torch.manual_seed(args.seed)
    tok = mt.load_tokenizer(args.model)
    model = mt.load_model(args.model, dtype=torch.float32, device=device).train()
    model.gradient_checkpointing = args.grad_checkpointing
    model.offload_checkpoints = args.offload_checkpoints  # the checkpoints in CPU memory
    if args.add_tokens:
        words, before = split_words(tok, D.read_texts(args.data), args.add_tokens), len(tok)
        tok.add_tokens(words)
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, new_tokens_from=before)
        print(f"added {len(words)} tokens: {' '.join(words)}", file=sys.stderr)
    mt.tokenizer.check_fits(tok, model)  # every token id has an embedding row, or a one-line error now
    amp = functools.partial(autocast, device, args.dtype)
    train = [{"input_ids": w.tolist(), "labels": w.tolist()} for w in windows(tok, args.data, args.seq_len)]
    target, source = windows(tok, args.val_data, args.seq_len), windows(tok, args.source_data, args.seq_len)
    steps = total_steps(args, len(train), 1)
    evaluate = functools.partial(domain_losses, model, target, source, args.batch_size, amp)
    log = MetricsLog(out / "metrics.jsonl", echo=True)
    before = evaluate()
    log.write({"step": 0, **before})

    optimizer = prepare(model, args)
    if args.compile:
        compile_blocks(model)  # each block through torch.compile
    scheduler = make_scheduler(optimizer, args.schedule, warmup_steps(args.warmup, steps), steps)
    every = unfreeze_every(args, model, steps) if args.technique == "gradual" else None
    seconds, step = [], 0
    with PeakMemory(device) as memory:
        try:
            for step in range(1, steps + 1):
                if every:
                    gradual_unfreeze(model, step - 1, every)
                tick = time.perf_counter()
                batches = [to_device(D.collate(b, D.pad_id(tok)), device)
                           for b in micro_batches(train, step - 1, args.batch_size, args.grad_accum, args.seed, 0, 1)]
                lr = scheduler.get_last_lr()[0]  # the head's rate for gradual (its groups run from the top)
                try:
                    result = train_step(model, batches, optimizer, scheduler, amp, args.max_grad_norm)
                except FloatingPointError as e:
                    raise stopped(step, e, out) from None
                seconds.append(time.perf_counter() - tick)
                record = {"step": step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                          "tokens_per_s": result["tokens"] / seconds[-1]}
                if step % args.eval_every == 0 or step == steps:
                    record.update(evaluate())
                log.write(record)
        except KeyboardInterrupt:
            raise interrupted(step, steps, out) from None
    after = log.records[-1]
    trainable, total = mt.lora.parameter_counts(model)  # at the end: gradual has opened every group by then
    summary = {"technique": args.technique, "name": technique_name(args, model), "trainable": trainable,
               "total": total, "steps": steps, "peak_memory_mb": memory.peak_bytes / 1e6,
               "memory_measure": memory.measure, "step_ms": 1e3 * statistics.median(seconds),
               "target_ppl_before": before["val_ppl"], "target_ppl": after["val_ppl"],
               "source_ppl_before": before["source_ppl"], "source_ppl": after["source_ppl"],
               "added_tokens": args.add_tokens}
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    saved = save_final(model, tok, out, args)
    chart = plot_training(log.records, out / "training.png",
                          title=f"{summary['name']}: {Path(args.model).name} -> target",
                          panels=[("loss (nats per token)", ("loss", "val_loss", "source_loss"), None)])
    finished(*saved, log.path, chart, out / "result.json")
    return summary


def domain_losses(model, target: torch.Tensor, source: torch.Tensor, batch_size: int, amp) -> dict:
    """val_loss / val_ppl on the target domain, source_loss / source_ppl on the source domain."""
    with amp():
        t, s = mt.evaluate.stream_loss(model, target.flatten(), target.size(1), batch_size), \
            mt.evaluate.stream_loss(model, source.flatten(), source.size(1), batch_size)
    return {"val_loss": t, "val_ppl": _exp(t), "source_loss": s, "source_ppl": _exp(s)}


def _exp(loss: float) -> float:
    return float(torch.tensor(min(loss, 50.0)).exp())


# ---------------------------------------------------------------- --compare


def compare(args, argv: list[str]) -> list[dict]:
    """Each technique in its own process, same flags otherwise; the table, CSV and chart in --out."""
    out = check_out(args, (*TECHNIQUES, "comparison.md", "comparison.csv", "comparison.png"))
    passed = [a for a in argv if a not in ("--compare", "--overwrite")]  # the folders are fresh now
    results = []
    for technique in TECHNIQUES:
        command = [sys.executable, __file__, *passed, "--technique", technique, "--out", str(out / technique)]
        try:
            failed = subprocess.run(command).returncode  # on a failure it said why on stderr
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted in the {technique} run, with {len(results)} of {len(TECHNIQUES)} "
                              f"techniques finished in {out}: pass --overwrite to run the comparison again") from None
        if failed:
            raise UserError(f"the {technique} run failed: the comparison is not written")
        results.append(json.loads((out / technique / "result.json").read_text()))
    write_comparison(results, out)
    print(comparison_table(results))
    return results


def write_comparison(results: list[dict], out: Path) -> None:
    """comparison.md, comparison.csv and comparison.png in `out`, from the techniques' result.json."""
    (out / "comparison.md").write_text(comparison_table(results))
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    plot_tradeoff(results, out / "comparison.png")


def comparison_table(results: list[dict]) -> str:
    first = results[0]
    lines = ["| technique | trainable | of total | peak memory (MB) | ms / step | target ppl | source ppl "
             "(forgetting) |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| before training | — | — | — | — | {first['target_ppl_before']:.2f} | "
             f"{first['source_ppl_before']:.2f} |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.1f}% | "
                     f"{r['peak_memory_mb']:.0f} | {r['step_ms']:.1f} | {r['target_ppl']:.2f} | "
                     f"{r['source_ppl']:.2f} |")
    return "\n".join(lines) + f"\n\n{first['steps']} steps each; peak memory: {first['memory_measure']}.\n"


def plot_tradeoff(results: list[dict], path: Path) -> None:
    """Target quality against forgetting: one marker per technique, named in the legend; lower left is better."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    first = results[0]
    ax.scatter(first["source_ppl_before"], first["target_ppl_before"], marker="x", s=60, color="k",
               label="before training")
    for r, marker in zip(results, "osD^v", strict=False):  # named in the legend, so no label can overlap another
        ax.scatter(r["source_ppl"], r["target_ppl"], marker=marker, s=70, alpha=0.85, label=r["name"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("source-domain perplexity after training (forgetting →)")
    ax.set_ylabel("target-domain perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    compare(args, argv) if args.compare else run(args)


if __name__ == "__main__":
    run_main(main)
