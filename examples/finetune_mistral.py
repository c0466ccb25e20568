"""Supervised fine-tuning of a Mistral-family model, with the loop in plain sight.

    python examples/finetune_mistral.py                                # bundled tiny-mistral, valley chats
    python examples/finetune_mistral.py --model mistralai/Mistral-7B-v0.1 --data chats.jsonl --max-length 2048
    torchrun --nproc_per_node=2 examples/finetune_mistral.py           # data parallel (DDP), the same script
    torchrun --nproc_per_node=8 examples/finetune_mistral.py --fsdp    # the model sharded over the GPUs (FSDP2)
    python examples/finetune_mistral.py --resume auto                  # continue the run in --out
    python examples/finetune_mistral.py --lora-r 8 --lora-targets all-linear   # LoRA: <out>/adapter and a merged final

The data: chats ({"messages": [...]}, rendered with the tokenizer's chat template) or {"prompt",
"completion"} pairs, the loss on the assistant turns / completions only. Read it top to bottom: the
settings (parse_args), the data, validation (loss, perplexity, token accuracy, exact match of greedy
answers), one optimizer step written out (train_step: micro-batches, forward, backward, clipping,
AdamW, the schedule), and the run (main: validation before the first step and every --eval-every
steps, checkpoints every --save-every steps that resume bit for bit, metrics.jsonl and training.png,
and the final model in the Hugging Face layout in <out>/final).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import minitune as mt
from minitune import data as D
from minitune.checkpoint import save_checkpoint
from minitune.distributed import even_share, model_device, shard_model, sync_gradients
from minitune.errors import UserError
from minitune.losses import IGNORE_INDEX
from minitune.optim import SCHEDULES, make_optimizer, make_scheduler
from minitune.plot import plot_training
from minitune.reference import fingerprint
from minitune.train import (
    ArgumentParser,
    MetricsLog,
    add_common_args,
    add_distributed_args,
    add_lora_args,
    all_reduce_sum,
    apply_lora_args,
    autocast,
    check_out,
    compile_blocks,
    finished,
    init_distributed,
    interrupted,
    micro_batches,
    non_negative_float,
    non_negative_int,
    parse_common_args,
    positive_float,
    positive_int,
    resume,
    run_main,
    run_settings,
    save_final,
    stopped,
    to_device,
    total_steps,
    warmup_steps,
    weights_dtype,
    world_size,
)

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, model=str(HERE / "assets" / "tiny-mistral"), data=str(HERE / "data" / "sft" / "train.jsonl"),
                    out="runs/sft", eval_every=10, save_every=25)
    # the optimisation: AdamW, a linear warmup then a decay, the gradient clipped
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the examples (rows with --packing)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples (rows) per micro-batch and process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=20, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="decay after warmup")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW decay of weight matrices only")
    p.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="clip the gradient norm; 0: never")
    add_lora_args(p, quantize=True)  # --lora-r 0 (the default): full fine-tuning; --quantize nf4: QLoRA
    add_distributed_args(p)  # --fsdp: under torchrun, the model sharded over the processes
    # the data and validation
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


def load_examples(args, tok) -> tuple[list[dict], list[dict], list[tuple]]:
    """Encoded training and validation examples, and (question, reference answer) pairs of held-out
    records for exact match. Records keep their file:line through the split, so errors name it."""
    records, val_records = D.read_splits(args.data, args.val_data, args.val_fraction, args.seed)
    encode = functools.partial(D.encode_records, tok=tok, max_length=args.max_length,
                               train_on_prompt=args.train_on_prompt, truncation=args.truncation)
    train = encode(records, name=args.data)
    val = encode(val_records, name=args.val_data or f"the validation split of {args.data}")
    if args.packing:
        train = D.pack(train, args.max_length)
    questions = [question_and_answer(r, where) for where, r in val_records[:args.exact_match_samples]]
    return train, val, questions


def question_and_answer(record: dict, where: str) -> tuple[str | list[dict], str]:
    """What the model is asked and the reference answer: the chat before its final assistant turn, or the prompt."""
    if "prompt" in record:
        return record["prompt"], record["completion"]
    *question, last = record["messages"]
    if last["role"] != "assistant":
        raise UserError(f"{where}: a held-out chat must end with the assistant's answer, not a {last['role']!r} turn")
    return question, last["content"]


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(model, tok, val: list[dict], questions: list[tuple], batch_size: int, amp) -> dict:
    """val_loss (mean over the answer tokens), val_ppl, val_token_acc (argmax = target) and
    val_exact_match (greedy answers to `questions`). Under torch.distributed each rank takes every
    W-th example and the sums are added up, so every rank returns the numbers of one process; every rank
    runs as many batches (a sharded model needs all of them in each forward), the short ones padded."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    val, real = even_share(val, rank, world)  # the rows past `real` are padding, counted nowhere
    longest = max((len(tok.encode(answer)) for _, answer in questions), default=1)  # the same on every rank
    questions, asked = even_share(questions, rank, world)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(val), batch_size):
        batch = to_device(D.collate(val[i:i + batch_size], D.pad_id(tok)), model_device(model))
        with amp():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
        targets = mt.losses.shift_labels(batch["labels"])  # (B, T): the next token, -100 off the answers
        keep = targets != IGNORE_INDEX
        keep[max(real - i, 0):] = False  # padding rows
        answer_logits, answer_targets = logits[keep].float(), targets[keep]  # (N, V), (N,): the answers only
        loss_sum += torch.nn.functional.cross_entropy(answer_logits, answer_targets, reduction="sum").item()
        correct += int((answer_logits.argmax(-1) == answer_targets).sum())
        count += int(keep.sum())
    answers = [answer for _, answer in questions]
    with amp():
        replies = mt.evaluate.generate_answers(model, tok, [q for q, _ in questions], batch_size, longest + 8)
    replies, answers = replies[:asked], answers[:asked]  # the real questions, not the padding
    hits = sum(mt.evaluate.exact_match(reply, answer) for reply, answer in zip(replies, answers, strict=True))
    model.train()
    total = all_reduce_sum({"loss": loss_sum, "correct": correct, "targets": count, "hits": hits, "asked": asked},
                           model_device(model))
    val_loss = total["loss"] / max(total["targets"], 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_token_acc": total["correct"] / max(total["targets"], 1),
            "val_exact_match": total["hits"] / max(total["asked"], 1)}


# ---------------------------------------------------------------- one optimizer step


def train_step(model, batches: list[dict], optimizer, scheduler, amp, max_grad_norm: float = 1.0) -> dict:
    """One optimizer step over this rank's micro-batches: the loss, the gradient norm before clipping, and the
    tokens of every rank.

    The step's loss is the mean over the target tokens of all its micro-batches on every rank: each
    micro-batch's summed loss is divided by that count before its backward. A mean of per-micro-batch means
    would give a short batch the weight of a long one. A loss or gradient that is not finite raises
    FloatingPointError before the update, so the weights and optimizer state stay those of the last good step.
    """
    world, device = world_size(), batches[0]["input_ids"].device
    counts = all_reduce_sum({"targets": sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches),
                             "tokens": sum(b["attention_mask"].ne(0).sum() for b in batches)}, device)
    n_targets = max(counts["targets"], 1.0)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP all-reduces the gradients in the backward (FSDP reduce-scatters them): once, in the last micro-batch's
        with sync_gradients(model, last):
            with amp():  # bf16 compute on CUDA, over float32 weights
                loss = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sum",
                             cu_seqlens=batch["cu_seqlens"])  # on a GPU: attention within bounds, no mask
            # DDP and FSDP average the gradients over the ranks, and n_targets counts every rank's: scale back by world
            (loss * (world / n_targets)).backward()
        loss_sum += loss.detach()
    loss = all_reduce_sum({"loss": loss_sum}, device)["loss"] / n_targets
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # a blow-up: drop these gradients, update nothing
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the loss is {loss} and the gradient norm {grad_norm}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": counts["tokens"]}


# ---------------------------------------------------------------- the run

# Flags a resumed run may change: they alter neither the data a step sees nor the update it makes
# (--lr excepted, which is rescaled on purpose). The data's paths may change: its content is compared.
RESUMABLE = {"model", "data", "val_data", "out", "resume", "lr", "device", "dtype", "eval_every", "save_every",
             "keep_last", "exact_match_samples", "grad_checkpointing", "offload_checkpoints", "compile",
             "fsdp_offload"}


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device, cpu_collectives=args.fsdp_offload)  # offload: gloo too
    out = check_out(args)  # a folder holding a finished run needs --resume auto or --overwrite
    torch.manual_seed(args.seed)
    tok = mt.load_tokenizer(args.model)
    # float32 master weights; under LoRA the frozen base in the compute dtype, or 4-bit with --quantize nf4
    model = mt.load_model(args.model, dtype=weights_dtype(args), device=device, quantize=args.quantize).train()
    mt.tokenizer.check_fits(tok, model)  # every token id has an embedding row, or a one-line error now
    start_weights = fingerprint(model, [], False)  # a resumed run must start from the same weights
    model.gradient_checkpointing = args.grad_checkpointing
    model.offload_checkpoints = args.offload_checkpoints  # the checkpoints in CPU memory
    apply_lora_args(model, args)  # with --lora-r: only the adapter trains
    amp = functools.partial(autocast, device, args.dtype)

    train, val, questions = load_examples(args, tok)
    if args.packing and rank == 0:
        print(f"packing: {len(train)} rows of at most {args.max_length} tokens, "
              f"{D.packing_efficiency(train, args.max_length):.1%} of their slots filled", file=sys.stderr)
    steps = total_steps(args, len(train), world)
    if args.fsdp:  # each rank keeps 1/world of every weight, gradient and optimizer state
        shard_model(model, compute_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None,
                    offload=args.fsdp_offload)
    if args.compile:
        compile_blocks(model)  # each decoder block through torch.compile
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)  # over the shards under FSDP
    scheduler = make_scheduler(optimizer, args.schedule, warmup_steps(args.warmup, steps), steps)
    raw_model = model  # validation, generation and saving use the model itself, not the DDP wrapper
    if world > 1 and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model)  # a whole copy on each rank

    run = run_settings(args, train, world, steps, RESUMABLE, start_weights)
    start, history = resume(args, out, model, optimizer, scheduler, run)
    log = MetricsLog(out / "metrics.jsonl", history, enabled=rank == 0, echo=True)

    step = start
    try:
        if start == 0:
            log.write({"step": 0, **validate(raw_model, tok, val, questions, args.batch_size, amp)})
        for step in tqdm(range(start + 1, steps + 1), desc="sft", initial=start, total=steps, disable=rank != 0,
                         file=sys.stderr):
            tick = time.perf_counter()
            batches = [to_device(D.collate(b, D.pad_id(tok)), device) for b in
                       micro_batches(train, step - 1, args.batch_size, args.grad_accum, args.seed, rank, world)]
            lr = scheduler.get_last_lr()[0]
            try:
                result = train_step(model, batches, optimizer, scheduler, amp, args.max_grad_norm)
            except FloatingPointError as e:
                raise stopped(step, e, out) from None
            record = {"step": step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                      "tokens_per_s": result["tokens"] / (time.perf_counter() - tick)}
            if step % args.eval_every == 0 or step == steps:
                record.update(validate(raw_model, tok, val, questions, args.batch_size, amp))
            log.write(record)
            if step % args.save_every == 0 and step < steps:
                save_checkpoint(out, step, model, optimizer, scheduler, keep_last=args.keep_last,
                                state={"run": run, "lr": args.lr, "metrics": log.records})
    except KeyboardInterrupt:
        raise interrupted(step, steps, out) from None
    saved = save_final(raw_model, tok, out, args)  # every rank: a sharded model is gathered for rank 0 to write
    if rank == 0:
        chart = plot_training(log.records, out / "training.png", title=f"SFT of {Path(args.model).name}")
        finished(*saved, log.path, chart)
    del model  # DDP's reducer first: the process group freed from inside it can hang at exit (pytorch#56297)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
