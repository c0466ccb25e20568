"""Supervised fine-tuning of a Mistral-family model, with the loop in plain sight.

    python examples/finetune_mistral.py                                # bundled tiny-mistral, valley chats
    python examples/finetune_mistral.py --model mistralai/Mistral-7B-v0.1 --data chats.jsonl --max-length 2048
    torchrun --nproc_per_node=2 examples/finetune_mistral.py           # data parallel (DDP), the same script
    python examples/finetune_mistral.py --resume auto                  # continue the run in --out

The data: chats ({"messages": [...]}, rendered with the tokenizer's chat template) or {"prompt",
"completion"} pairs, the loss on the assistant turns / completions only. The loop: gradient
accumulation normalised by the target tokens of the whole accumulated batch, clipping, AdamW with
warmup and cosine decay, validation before the first step and every --eval-every steps (loss,
perplexity, token accuracy, exact match of greedy answers), checkpoints every --save-every steps
that resume bit for bit, metrics.jsonl and training.png, and the final model in the Hugging Face
layout in <out>/final.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import minitune as mt
from minitune import data as D
from minitune.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from minitune.optim import make_optimizer, make_scheduler, scale_learning_rates
from minitune.plot import plot_training
from minitune.train import MetricsLog, add_common_args, all_reduce_sum, autocast, init_distributed, parse_common_args

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, model=str(HERE / "assets" / "tiny-mistral"), data=str(HERE / "data" / "sft" / "train.jsonl"),
                    out="runs/sft", batch_size=16, lr=1e-3, warmup=20, eval_every=10)
    p.add_argument("--val-data", default=str(HERE / "data" / "sft" / "validation.jsonl"),
                   help="held-out chats; empty: split --val-fraction off --data")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (per row with --packing)")
    p.add_argument("--truncation", default="error", choices=D.TRUNCATION_POLICIES,
                   help="an example longer than --max-length: stop with its file:line, drop it, or cut its start")
    p.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not just the answers")
    p.add_argument("--exact-match-samples", type=int, default=64, help="held-out chats answered greedily")
    return parse_common_args(p, argv)


# ---------------------------------------------------------------- data


def load_examples(args, tok) -> tuple[list[dict], list[dict], list[dict]]:
    """Encoded training and validation examples, and the raw held-out records answered for exact match.

    Records keep their file:line through the split, so an error names the line in the file."""
    records = [(f"{args.data}:{n}", r) for n, r in D.iter_jsonl(args.data)]
    if args.val_data:
        val_records = [(f"{args.val_data}:{n}", r) for n, r in D.iter_jsonl(args.val_data)]
    else:
        records, val_records = D.train_val_split(records, args.val_fraction, args.seed)

    def encode(pairs):
        out = [D.encode_sft(r, tok, args.max_length, args.train_on_prompt, args.truncation, where=w) for w, r in pairs]
        return [e for e in out if e is not None]

    train, val = encode(records), encode(val_records)
    if not train:
        raise SystemExit(f"{args.data}: no training example is left (--truncation {args.truncation})")
    if args.packing:
        train = D.pack(train, args.max_length)
    return train, val, [r for _, r in val_records[:args.exact_match_samples]]


def micro_batches(train: list[dict], step: int, batch_size: int, grad_accum: int, seed: int, rank: int,
                  world: int) -> list[list[dict]]:
    """This rank's micro-batches for optimizer step `step` (0-based).

    The step's global batch is the same for any world size (rank r takes examples r, r + W, ...), and
    it depends on the step alone, so a resumed run continues mid-epoch exactly where it stopped."""
    picked = D.step_indices(len(train), step, batch_size * grad_accum * world, seed)
    mine = [train[i] for i in D.shard(picked, rank, world)]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# ---------------------------------------------------------------- one optimizer step


def train_step(model, batches: list[dict], optimizer, scheduler, autocast, max_grad_norm: float = 1.0) -> dict:
    """One optimizer step over the accumulated micro-batches of every rank.

    Each micro-batch's loss is its sum over its targets divided by the number of targets in the whole
    accumulated batch, all ranks together. The step's gradient is then that of the mean over all its
    targets, whatever the micro-batches' lengths; a mean of per-micro-batch means would give a short
    batch the weight of a long one. Returns the loss (mean over targets), the gradient norm before
    clipping and the number of tokens (all ranks). Raises FloatingPointError, before updating anything,
    when the loss or the gradient is not finite.
    """
    device = next(model.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    tokens = sum(int(b["attention_mask"].ne(0).sum()) for b in batches)
    n_targets, n_tokens = all_reduce_sum([targets, tokens], device)
    n_targets = max(n_targets, 1.0)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast():
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sum")
            # DDP averages gradients over the ranks; n_targets counts every rank's targets: scale back by world
            (loss * (world / n_targets)).backward()
        loss_sum += loss.detach()
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    loss = all_reduce_sum([loss_sum.item()], device)[0] / n_targets
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the loss is {loss} and the gradient norm {grad_norm}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": n_tokens}


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(model, tok, val: list[dict], chats: list[dict], batch_size: int, autocast) -> dict:
    """val_loss (mean over the answer tokens), val_ppl, val_token_acc (argmax = target) and
    val_exact_match (greedy answers). Under torch.distributed each rank takes its share and the sums
    are added up, so every rank returns the same numbers."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    val, chats = [val[i] for i in D.shard(range(len(val)), rank, world)], chats[rank::world]
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(val), batch_size):
        batch = to_device(D.collate(val[i:i + batch_size], pad_id(tok)), device)
        with autocast():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # (B, T, V)
        targets = mt.losses.shift_labels(batch["labels"])  # (B, T): the next token, -100 off the answers
        keep = targets != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
        count += int(keep.sum())
    pairs = [prompt_and_answer(chat) for chat in chats]
    with autocast():
        replies = mt.evaluate.generate_answers(model, tok, [prompt for prompt, _ in pairs], batch_size)
    hits = sum(mt.evaluate.exact_match(reply, answer) for reply, (_, answer) in zip(replies, pairs, strict=True))
    model.train()
    loss_sum, correct, count, hits, n_chats = all_reduce_sum([loss_sum, correct, count, hits, len(chats)], device)
    val_loss = loss_sum / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_token_acc": correct / max(count, 1),
            "val_exact_match": hits / max(n_chats, 1)}


def prompt_and_answer(record: dict) -> tuple[str | list[dict], str]:
    """What the model is asked and the reference answer: the chat before its final assistant turn, or the prompt."""
    if "messages" in record:
        *prompt, last = record["messages"]
        if last["role"] != "assistant":
            raise ValueError(f"a held-out chat must end with the assistant's answer, not a {last['role']!r} turn")
        return prompt, last["content"]
    return record["prompt"], record["completion"]


# ---------------------------------------------------------------- the run


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    tok = mt.load_tokenizer(args.model)
    model = mt.load_model(args.model, dtype=torch.float32, device=device).train()  # float32 master weights
    model.gradient_checkpointing = args.grad_checkpointing
    amp = lambda: autocast(device, args.dtype)  # noqa: E731

    train, val, chats = load_examples(args, tok)
    steps = args.max_steps or math.ceil(args.epochs * len(train) / (args.batch_size * args.grad_accum * world))
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args.schedule, min(args.warmup, steps), steps)
    base = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)

    # what the data order and the schedule depend on: a resumed run must have the same
    run = {"data": args.data, "seed": args.seed, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
           "world_size": world, "packing": args.packing, "max_length": args.max_length, "steps": steps}
    start, history = 0, []
    ckpt = resolve_resume(args.resume, out)
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer, scheduler)
        if changed := {k: (v, run[k]) for k, v in saved["state"]["run"].items() if run.get(k) != v}:
            raise SystemExit(f"{ckpt}: saved by a run with other settings {changed} (saved, now): the data order "
                             "and schedule would not continue; resume with the same flags")
        if args.lr != saved["state"]["lr"]:  # the one setting a resumed run may change, e.g. after a blow-up
            scale_learning_rates(scheduler, args.lr / saved["state"]["lr"])
        start, history = saved["step"], saved["state"]["metrics"]
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise SystemExit(f"{out / 'checkpoints'} holds another run's checkpoints: pass --resume auto to continue "
                         "it, or choose a new --out")
    log = MetricsLog(out / "metrics.jsonl", history, enabled=rank == 0, echo=True)

    if start == 0:
        log.write({"step": 0, **validate(base, tok, val, chats, args.batch_size, amp)})
    for step in tqdm(range(start + 1, steps + 1), desc="sft", initial=start, total=steps, disable=rank != 0,
                     file=sys.stderr):
        tick = time.perf_counter()
        batches = [to_device(D.collate(b, pad_id(tok)), device) for b in
                   micro_batches(train, step - 1, args.batch_size, args.grad_accum, args.seed, rank, world)]
        lr = scheduler.get_last_lr()[0]
        try:
            result = train_step(model, batches, optimizer, scheduler, amp, args.max_grad_norm)
        except FloatingPointError as e:
            raise SystemExit(f"step {step}: {e}; stopped before updating the weights. The last good checkpoint "
                             f"is in {out / 'checkpoints'}: continue from it with --resume auto and a lower --lr."
                             ) from None
        record = {"step": step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                  "tokens_per_s": result["tokens"] / (time.perf_counter() - tick)}
        if step % args.eval_every == 0 or step == steps:
            record.update(validate(base, tok, val, chats, args.batch_size, amp))
        log.write(record)
        if step % args.save_every == 0 and step < steps:
            save_checkpoint(out, step, model, optimizer, scheduler, keep_last=args.keep_last,
                            state={"run": run, "lr": args.lr, "metrics": log.records})
    if rank == 0:
        base.save_pretrained(out / "final")
        tok.save_pretrained(out / "final")
        plot_training(log.records, out / "training.png", title=f"SFT of {Path(args.model).name}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
