"""Supervised fine-tuning of a Mistral-family model, with the loop in plain sight. WORK IN PROGRESS (issue 5).

    python examples/finetune_mistral.py                                # bundled tiny-mistral, valley chats
    python examples/finetune_mistral.py --model mistralai/Mistral-7B-v0.1 --data chats.jsonl --dtype bfloat16
    torchrun --nproc_per_node=2 examples/finetune_mistral.py           # data parallel, the same script

The loop: batches of chats rendered with the tokenizer's chat template, the loss on the assistant
turns only, gradient accumulation normalised by the target tokens of the whole accumulated batch,
clipping, AdamW with warmup and cosine decay, validation before the first step and every
--eval-every steps (loss, perplexity, token accuracy, exact match of greedy answers), checkpoints
that resume exactly, and the final model in the Hugging Face layout.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import minitune as mt
from minitune import data as D
from minitune.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from minitune.optim import SCHEDULES, make_optimizer, make_scheduler
from minitune.plot import plot_training

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(HERE / "assets" / "tiny-mistral"), help="hub id or folder")
    p.add_argument("--data", default=str(HERE / "data" / "sft" / "train.jsonl"))
    p.add_argument("--val-data", default=str(HERE / "data" / "sft" / "validation.jsonl"),
                   help="held-out chats; empty: split --val-fraction off --data")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--out", default="runs/sft")
    p.add_argument("--max-steps", type=int, default=None, help="default: --epochs over the data")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch and rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not just the answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16 through autocast, float32 weights); default bfloat16 on CUDA")
    p.add_argument("--truncation", default="error", choices=D.TRUNCATION_POLICIES,
                   help="an example longer than --max-length: stop with its file:line, drop it, or cut its start")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--exact-match-samples", type=int, default=64, help="held-out chats answered greedily")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--resume", default=None, help="'auto' (the latest checkpoint in --out) or a checkpoint folder")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--packing", action="store_true", help="several examples per row, each attending to itself")
    args = p.parse_args(argv)
    if min(args.eval_every, args.save_every, args.batch_size, args.grad_accum) < 1:
        p.error("--eval-every, --save-every, --batch-size and --grad-accum must be at least 1")
    return args


# ---------------------------------------------------------------- setup


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Rank, world size and this process's device; under torchrun, the process group too."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device(device)


def load_examples(args, tok) -> tuple[list[dict], list[dict], list[dict]]:
    """Encoded training and validation examples, and the raw held-out records for exact match.

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
    if args.packing:
        train = D.pack(train, args.max_length)
    return train, val, [r for _, r in val_records[:args.exact_match_samples]]


# ---------------------------------------------------------------- one optimizer step


def micro_batches(train: list[dict], step: int, args, rank: int, world: int) -> list[list[dict]]:
    """The examples of this rank's micro-batches at `step`: a seeded permutation per epoch, walked in order,
    so the data position is a function of the step alone and a resumed run picks up where it stopped."""
    per_step = args.batch_size * args.grad_accum * world
    picked = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(i, len(train))
        picked.append(train[_epoch_order(len(train), epoch, args.seed)[offset]])
    mine = D.shard(picked, rank, world)  # rank r takes r, r + W, ...: the step's global batch is the same for any W
    return [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    return D.epoch_order(n, epoch, seed)


def count_targets(batches: list[dict], device) -> torch.Tensor:
    """Target tokens in the whole accumulated batch, summed over ranks: the loss's denominator."""
    n = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=device)
    if dist.is_initialized():
        dist.all_reduce(n)
    return n.clamp_min(1)


def train_step(model, batches: list[dict], optimizer, scheduler, autocast) -> tuple[float, float]:
    """One optimizer step over the accumulated micro-batches; returns (mean loss per target, grad norm).

    Each micro-batch's loss is its sum over targets divided by the target count of the whole
    accumulated batch (on every rank), so the step's gradient is that of the mean over all its
    targets, whatever the lengths of the micro-batches; a mean of per-micro-batch means would give
    a short batch the weight of a long one.
    """
    n_targets = count_targets(batches, next(model.parameters()).device)
    total = 0.0
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        ctx = model.no_sync() if hasattr(model, "no_sync") and not sync else _null()
        with ctx, autocast():
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sum")
        # DDP averages the ranks' gradients; n_targets already counts every rank's targets, so scale back up
        (loss * world_size() / n_targets).backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if dist.is_initialized():
        t = torch.tensor(total, device=n_targets.device)
        dist.all_reduce(t)
        total = t.item()
    loss = total / n_targets.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
        raise FloatingPointError(f"the loss is {loss} and the gradient norm {grad_norm.item()}")
    optimizer.step()  # only after the check: a non-finite update would poison the weights and the next checkpoint
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm.item()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(model, tok, val: list[dict], chats: list[dict], args, device, autocast) -> dict:
    """val_loss (mean over targets), val_ppl, val_token_acc (argmax = target) and val_exact_match."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(val), args.batch_size):
        batch = to_device(D.collate(val[i:i + args.batch_size], pad_id(tok)), device)
        with autocast():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        targets = mt.losses.shift_labels(batch["labels"])
        keep = targets != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
        count += int(keep.sum())
    pairs = [prompt_and_answer(c) for c in chats]
    hits = sum(mt.evaluate.exact_match(greedy_reply(model, tok, prompt, device), answer) for prompt, answer in pairs)
    model.train()
    val_loss = loss_sum / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_token_acc": correct / max(count, 1),
            "val_exact_match": hits / max(len(chats), 1)}


def prompt_and_answer(record: dict) -> tuple[str | list[dict], str]:
    """What the model is asked and the reference answer: the chat before its final assistant turn, or the prompt."""
    if "messages" in record:
        *prompt, last = record["messages"]
        if last["role"] != "assistant":
            raise ValueError(f"a held-out chat must end with the assistant's answer, not a {last['role']!r} turn")
        return prompt, last["content"]
    return record["prompt"], record["completion"]


def greedy_reply(model, tok, prompt: str | list[dict], device, max_new_tokens: int = 32) -> str:
    text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)], device=device)
    out = mt.generate(model, ids, max_new_tokens, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.size(1):].tolist())


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- the run


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    tok = mt.load_tokenizer(args.model)
    model = mt.load_model(args.model, dtype=torch.float32, device=device).train()
    model.gradient_checkpointing = args.grad_checkpointing
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    train, val, chats = load_examples(args, tok)
    per_step = args.batch_size * args.grad_accum * world
    steps = args.max_steps or math.ceil(args.epochs * len(train) / per_step)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args.schedule, min(args.warmup, steps), steps)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)

    # what the data order and the schedule depend on: a resumed run must have the same
    run = {"data": args.data, "seed": args.seed, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
           "world_size": world, "packing": args.packing, "max_length": args.max_length, "steps": steps}
    start, metrics = 0, []
    ckpt = resolve_resume(args.resume, out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        changed = {k: (v, run[k]) for k, v in state["state"]["run"].items() if run.get(k) != v}
        if changed:
            raise SystemExit(f"{ckpt}: saved by a run with other settings {changed} (saved, now): the data order "
                             "and schedule would not continue; resume with the same flags")
        start, metrics = state["step"], state["state"]["metrics"]
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise SystemExit(f"{out / 'checkpoints'} holds another run's checkpoints: pass --resume auto to continue "
                         "it, or choose a new --out")
    log_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))

    def log(record: dict) -> None:
        metrics.append(record)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(json.dumps(record), file=sys.stderr)

    base = model.module if world > 1 else model
    if start == 0:
        log({"step": 0, **validate(base, tok, val, chats, args, device, autocast)})
    tick = time.perf_counter()
    for step in tqdm(range(start + 1, steps + 1), desc="sft", initial=start, total=steps, disable=rank != 0,
                     file=sys.stderr):
        batches = [to_device(D.collate(b, pad_id(tok)), device)
                   for b in micro_batches(train, step - 1, args, rank, world)]
        lr = scheduler.get_last_lr()[0]
        try:
            loss, grad_norm = train_step(model, batches, optimizer, scheduler, autocast)
        except FloatingPointError as e:
            raise SystemExit(f"step {step}: {e}; stopped before updating the weights. The last good checkpoint "
                             f"is in {out / 'checkpoints'}: lower --lr and continue with --resume auto.") from None
        tokens = sum(b["attention_mask"].ne(0).sum().item() for b in batches) * world
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / (time.perf_counter() - tick)}
        if step % args.eval_every == 0 or step == steps:
            record.update(validate(base, tok, val, chats, args, device, autocast))
        log(record)
        if step % args.save_every == 0 and step < steps:
            save_checkpoint(out, step, model, optimizer, scheduler, state={"run": run, "metrics": metrics},
                            keep_last=args.keep_last)
        tick = time.perf_counter()
    if rank == 0:
        base.save_pretrained(out / "final")
        tok.save_pretrained(out / "final")
        plot_training(metrics, out / "training.png", title=f"SFT of {Path(args.model).name}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
