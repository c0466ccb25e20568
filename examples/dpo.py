"""Direct Preference Optimization of an SFT model, with the loop in plain sight.

    python examples/finetune_mistral.py && python examples/dpo.py     # bundled tiny-mistral: SFT, then DPO on it
    python examples/dpo.py --lora-r 16 --lora-targets all-linear      # LoRA; the reference is the adapter switched off
    python examples/dpo.py --reference precomputed                    # reference log-probs once, cached in --out
    python examples/dpo.py --loss-type ipo --average-logps --beta 0.5  # IPO on per-token average log-probs
    python examples/dpo.py --model HuggingFaceH4/mistral-7b-sft-beta --data pairs.jsonl --lora-r 16 --max-length 1024
    torchrun --nproc_per_node=2 examples/dpo.py                       # data parallel (DDP), the same script
    torchrun --nproc_per_node=8 examples/dpo.py --fsdp                # policy and reference sharded (FSDP2)

The data: preference pairs ({"prompt", "chosen", "rejected"} as text or message lists, or Anthropic HH
strings); text prompts go through the chat template as a user turn (--prompt-format chat), the form the
SFT model learnt. Each step: one forward of the policy over the chosen and rejected answers together,
the reference's log-probabilities (a frozen copy, the policy with LoRA off, or precomputed), the DPO
loss (or a variant), and the update. Logged with TRL's metric names. Validation on held-out pairs
before, during and after training: the DPO loss, preference agreement (the share of pairs whose
chosen answer gets the higher implicit reward) and the rule-based win rate of greedy answers against
the SFT model's; charted in training.png. The model goes to <out>/final (and the adapter to
<out>/adapter with LoRA).

By default the loss also holds the chosen answer's NLL per token (RPO, Pang et al. 2024, "Iterative
Reasoning Preference Optimization"; --rpo-alpha 0 is plain DPO). DPO only asks the chosen answer to gain
on the rejected one relative to the reference, and typically both lose likelihood; on the bundled data
plain DPO lifts preference agreement as much but leaves the greedy answers where they were (a win rate
of about 0.5), while the NLL term makes the model say the chosen answers.
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
from minitune.losses import DPO_LOSS_TYPES, IGNORE_INDEX, dpo_loss, preference_logps
from minitune.optim import SCHEDULES, make_optimizer, make_scheduler
from minitune.plot import plot_training
from minitune.reference import (
    REFERENCE_MODES,
    Reference,
    attach_logps,
    disable_dropout,
    fingerprint,
    load_logps,
    precompute_logps,
    save_logps,
)
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
SFT_MODEL = "runs/sft/final"  # where examples/finetune_mistral.py leaves its model


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, model=SFT_MODEL, data=str(HERE / "data" / "preference" / "train.jsonl"), out="runs/dpo",
                    eval_every=20, save_every=50)
    # the optimisation: AdamW, a linear warmup then a decay, the gradient clipped
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="passes over the training pairs")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pairs per micro-batch and process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="decay after warmup")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW decay of weight matrices only")
    p.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="clip the gradient norm; 0: never")
    add_lora_args(p, quantize=True)  # --lora-r 0 (the default): full fine-tuning; --quantize nf4: QLoRA
    add_distributed_args(p)  # --fsdp: under torchrun, policy and reference sharded over the processes
    # the DPO loss and its reference
    p.add_argument("--beta", type=positive_float, default=0.1, help="strength of the pull towards the reference")
    p.add_argument("--loss-type", default="sigmoid", choices=DPO_LOSS_TYPES)
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of flipped preference labels (conservative DPO, robust)")
    p.add_argument("--reference", default=None, choices=REFERENCE_MODES,
                   help="the reference model: default lora-disabled with --lora-r, else copy")
    p.add_argument("--rpo-alpha", type=float, default=1.0,
                   help="add alpha x the chosen answer's NLL per token (RPO, Pang et al. 2024); 0: plain DPO")
    p.add_argument("--average-logps", action=argparse.BooleanOptionalAction, default=None,
                   help="per-token average log-probabilities instead of sums; default: on for ipo (its paper's "
                        "length-normalised form, as TRL does), off otherwise")
    # the data and validation
    p.add_argument("--val-data", default=str(HERE / "data" / "preference" / "validation.jsonl"),
                   help="held-out pairs; empty: split --val-fraction off --data")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256, help="tokens of prompt + answer")
    p.add_argument("--max-prompt-length", type=int, default=192, help="a longer prompt keeps its end")
    p.add_argument("--truncation", default="error", choices=D.PREFERENCE_TRUNCATION,
                   help="a pair longer than --max-length: stop with its file:line, drop it, or cut the answers' end")
    p.add_argument("--prompt-format", default="chat", choices=("chat", "text"),
                   help="text prompts as a user turn of the chat template, or as they are")
    p.add_argument("--win-rate-samples", type=int, default=256, help="held-out prompts answered greedily")
    args = parse_common_args(p, argv)
    args.reference = args.reference or ("lora-disabled" if args.lora_r else "copy")
    args.average_logps = args.loss_type == "ipo" if args.average_logps is None else args.average_logps
    if args.lora_dropout:
        p.error("--lora-dropout: DPO trains without dropout (the reference has none; see disable_dropout)")
    if args.reference == "lora-disabled" and not args.lora_r:
        p.error("--reference lora-disabled needs LoRA (--lora-r > 0): without adapters there is nothing to disable")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"--label-smoothing must be in [0, 0.5), not {args.label_smoothing}")
    if args.label_smoothing and args.loss_type not in ("sigmoid", "robust"):
        p.error(f"--label-smoothing applies to the sigmoid and robust losses, not to {args.loss_type}")
    if args.model == SFT_MODEL and not Path(SFT_MODEL).is_dir():
        p.error(f"{SFT_MODEL} not found: DPO starts from an SFT model. Run `python examples/finetune_mistral.py` "
                "first (about 30 s on a CPU), or pass --model <hub id or folder>")
    return args


# ---------------------------------------------------------------- data


def load_pairs(args, tok) -> tuple[list[dict], list[dict], list[dict]]:
    """Encoded training and validation pairs, and the held-out records whose prompts are answered for the
    win rate (those with a rule-based "check"). Records keep their file:line, so errors name it."""
    records, val_records = D.read_splits(args.data, args.val_data, args.val_fraction, args.seed)
    encode = functools.partial(D.encode_preferences, tok=tok, max_length=args.max_length,
                               max_prompt_length=args.max_prompt_length, truncation=args.truncation,
                               chat=args.prompt_format == "chat")
    train = encode(records, name=args.data)
    val = encode(val_records, name=args.val_data or f"the validation split of {args.data}")
    judged = [r for _, r in val_records if "check" in r][:args.win_rate_samples]
    return train, val, judged


def answer_length(examples: list[dict]) -> int:
    """Tokens of the longest answer in the data: what greedy answers may use, and a few more."""
    return 8 + max(sum(label != IGNORE_INDEX for label in e[side]["labels"])
                   for e in examples for side in ("chosen", "rejected"))


# ---------------------------------------------------------------- one step


def dpo_step(model, reference: Reference, batches: list[dict], optimizer, scheduler, amp, args) -> dict:
    """One optimizer step over this rank's micro-batches of pairs: TRL's metrics (means over the step's pairs
    on every rank), the gradient norm before clipping, and the tokens of every rank.

    Each micro-batch's loss is the sum of its pairs' losses divided by the pairs of the whole step, all ranks
    together, so the step's gradient is that of the mean over all its pairs. rewards/accuracies counts a tie
    as a miss, as TRL does; nll_loss is the RPO term before alpha. A loss or gradient that is not finite
    raises FloatingPointError before the update.
    """
    world, device = world_size(), batches[0]["input_ids"].device
    n_pairs = max(all_reduce_sum({"pairs": sum(b["answer_tokens"].numel() // 2 for b in batches)}, device)["pairs"], 1.0)
    sums = {}  # metric name -> its sum over this rank's pairs
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP all-reduces the gradients in the backward (FSDP reduce-scatters them): once, in the last micro-batch's
        with sync_gradients(model, last):
            with amp():  # bf16 compute on CUDA, over float32 weights
                ref_chosen, ref_rejected = reference.logps(batch, args.average_logps)  # (B,) each, no graph
                chosen, rejected = preference_logps(model, batch, args.average_logps)  # one forward over 2B rows
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
            nll = chosen_nll(chosen, answer_tokens(batch), args.average_logps)  # (B,): RPO's term
            loss = losses + args.rpo_alpha * nll  # (B,)
            # DDP and FSDP average the gradients over the ranks, and n_pairs counts every rank's: scale back by world
            (loss.sum() * (world / n_pairs)).backward()
        per_pair = {"loss": loss, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                    "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen,
                    "logps/rejected": rejected, "nll_loss": nll}
        for name, values in per_pair.items():
            sums[name] = sums.get(name, 0.0) + values.detach().sum().double()
        sums["tokens"] = sums.get("tokens", 0.0) + batch["attention_mask"].ne(0).sum().double()  # non-padding tokens
    totals = all_reduce_sum(sums, device)  # every metric in one collective
    tokens = totals.pop("tokens")
    metrics = {name: total / n_pairs for name, total in totals.items()}
    if not args.rpo_alpha:
        del metrics["nll_loss"]
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf).item()
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):  # a blow-up: drop these gradients
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the loss is {metrics['loss']} and the gradient norm {grad_norm}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": grad_norm, "tokens": tokens}


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor, average: bool) -> torch.Tensor:
    """The chosen answers' negative log-likelihood per token [B], from their log-probabilities (sums or means).

    Each pair's own mean over its answer tokens, as in Pang et al.'s NLL term; TRL's rpo_alpha takes the mean
    over all the chosen tokens of a micro-batch instead, which weighs long answers more."""
    return -chosen if average else -chosen / chosen_tokens.clamp(min=1)


def answer_tokens(batch: dict) -> torch.Tensor:
    """The number of answer tokens of each chosen answer [B] (the first B sequences of a collate_preferences batch)."""
    return batch["answer_tokens"].chunk(2)[0]


# ---------------------------------------------------------------- validation


def greedy_answers(model, tok, judged: list[dict], args, max_new_tokens: int, amp) -> list[str]:
    """The model's greedy answers to the judged records' prompts (rendered as in training)."""
    prompts = [D.preference_parts(r, chat=args.prompt_format == "chat")[0] for r in judged]
    with amp():
        return mt.evaluate.generate_answers(model, tok, prompts, args.batch_size, max_new_tokens)


@torch.no_grad()
def validate(model, tok, val: list[dict], val_reference: torch.Tensor, judged: list[dict], sft_answers: list[str],
             args, max_new_tokens: int, amp, val_real: int | None = None) -> dict:
    """On held-out pairs: val_loss (the training objective: the DPO loss, plus the RPO term when
    --rpo-alpha > 0), val_preference_accuracy (the share of pairs whose
    chosen answer gets the higher implicit reward β·log(π/π_ref); a tie counts one half, so the SFT model
    itself scores 0.5), and on the judged prompts val_win_rate (greedy answers against the SFT model's,
    by the records' rules; a tie counts one half) and val_rule_score (the share of answers that satisfy
    their rule). Under torch.distributed `val` and `val_reference` are this rank's share of the pairs (its first
    `val_real` real, the rest padding: see even_share; default all), and each rank answers every W-th prompt; the
    sums are added up, so every rank returns the numbers of one process."""
    val_real = len(val) if val_real is None else val_real
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = model_device(model)
    policy = precompute_logps(model, val, D.pad_id(tok), args.batch_size, args.average_logps, amp)  # (N, 2)
    policy, reference = policy[:val_real], val_reference[:val_real]  # the real pairs
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1],
                                                        args.beta, args.loss_type, args.label_smoothing)
    agreed = 0.0
    if val_real:  # (a small validation set leaves some ranks without pairs)
        chosen_tokens = answer_tokens(D.collate_preferences(val[:val_real], 0))
        losses = losses + args.rpo_alpha * chosen_nll(policy[:, 0], chosen_tokens, args.average_logps)
        agreed = val_real * mt.evaluate.preference_accuracy(chosen_rewards.tolist(), rejected_rewards.tolist())
    mine, asked = even_share(range(len(judged)), rank, world)  # as many prompts on every rank, padded
    model.eval()
    answers = greedy_answers(model, tok, [judged[i] for i in mine], args, max_new_tokens, amp)[:asked]
    model.train()
    scores = [mt.evaluate.rule_score(judged[i]["check"], a) for i, a in zip(mine[:asked], answers, strict=True)]
    sft_scores = [mt.evaluate.rule_score(judged[i]["check"], sft_answers[i]) for i in mine[:asked]]
    wins = mt.evaluate.win_rate(scores, sft_scores) * len(scores) if scores else 0.0
    total = all_reduce_sum({"loss": losses.sum(), "agreed": agreed, "pairs": len(losses), "wins": wins,
                            "hits": sum(scores), "asked": len(scores)}, device)
    metrics = {"val_loss": total["loss"] / total["pairs"], "val_preference_accuracy": total["agreed"] / total["pairs"]}
    if total["asked"]:  # held-out records without a rule-based "check" (HH, most user data) give no win rate
        metrics.update(val_win_rate=total["wins"] / total["asked"], val_rule_score=total["hits"] / total["asked"])
    return metrics


# ---------------------------------------------------------------- the run

# Flags a resumed run may change (see finetune_mistral.py); --model may not: it is the reference.
RESUMABLE = {"data", "val_data", "out", "resume", "lr", "device", "dtype", "eval_every", "save_every", "keep_last",
             "win_rate_samples", "grad_checkpointing", "offload_checkpoints", "compile", "fsdp_offload"}
REFERENCE_CACHE = "reference_logps.safetensors"  # --reference precomputed's log-probabilities, in --out
LOSSES = ("loss", ("loss", "val_loss"), None)
SHARES = ("share of held-out pairs / prompts", ("val_preference_accuracy", "val_win_rate", "rewards/accuracies"),
          (0, 1))
REWARDS = ("implicit reward β·log(π/π_ref)", ("rewards/chosen", "rewards/rejected", "rewards/margins"), None)


def reference_key(model, examples: list[dict], args) -> str:
    """What --reference precomputed's cache depends on: the SFT model's weights, the pairs, the settings (taken
    before LoRA and sharding change the model's state dict; a sharded bf16 run computes with bf16 weights)."""
    return fingerprint(model, examples, args.average_logps, args.dtype + (" fsdp" if args.fsdp else ""))


def reference_logps_for(model, examples: list[dict], tok, args, out: Path, amp, key: str) -> torch.Tensor:
    """--reference precomputed: the model's log-probabilities on the training pairs, from <out>'s cache when it
    holds them under `key` (reference_key), else computed in one pass (by every rank) and cached by rank 0."""
    cache = out / REFERENCE_CACHE
    logps = load_logps(cache, key)
    if logps is None:
        logps = precompute_logps(model, examples, D.pad_id(tok), args.batch_size, args.average_logps, amp,
                                 desc="reference log-probs")
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_logps(cache, logps, key)
    return logps


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device, cpu_collectives=args.fsdp_offload)  # offload: gloo too
    out = check_out(args)  # a finished run needs --resume auto or --overwrite (the fingerprinted cache may stay)
    torch.manual_seed(args.seed)
    tok = mt.load_tokenizer(args.model)
    # the SFT model, policy and reference: float32 master weights, or under LoRA a frozen base in the compute
    # dtype (4-bit with --quantize nf4)
    model = mt.load_model(args.model, dtype=weights_dtype(args), device=device, quantize=args.quantize).train()
    mt.tokenizer.check_fits(tok, model)  # every token id has an embedding row, or a one-line error now
    model.gradient_checkpointing = args.grad_checkpointing
    model.offload_checkpoints = args.offload_checkpoints  # the checkpoints in CPU memory
    disable_dropout(model)  # as the reference: the policy's log-probs must not be noisier than the reference's
    amp = functools.partial(autocast, device, args.dtype)
    start_weights = fingerprint(model, [], False)  # a resumed run must start from the same reference

    train, val, judged = load_pairs(args, tok)
    new_tokens = answer_length(train)
    val, val_real = even_share(val, rank, world)  # this rank's held-out pairs, in the same batches before and during
    cache_key = reference_key(model, train, args) if args.reference == "precomputed" else None
    reference = Reference(args.reference, model)  # "copy" copies the weights now, before LoRA and training
    apply_lora_args(model, args)  # with --lora-r: only the adapter trains

    steps = total_steps(args, len(train), world)
    if args.fsdp:  # each rank keeps 1/world of every weight, gradient and optimizer state
        compute_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
        shard_model(model, compute_dtype, offload=args.fsdp_offload)
        if args.reference == "copy":
            shard_model(reference.model, compute_dtype, offload=args.fsdp_offload)  # the frozen copy too
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)  # over the shards, before a forward
    scheduler = make_scheduler(optimizer, args.schedule, warmup_steps(args.warmup, steps), steps)
    # Everything the reference gives, taken before training moves the policy (LoRA's B is 0: the policy is still the
    # SFT model) and computed as the policy computes (sharded, its weights in the compute dtype):
    val_reference = precompute_logps(model, val, D.pad_id(tok), args.batch_size, args.average_logps, amp)
    sft_answers = greedy_answers(model, tok, judged, args, new_tokens, amp)
    if args.reference == "precomputed":
        train = attach_logps(train, reference_logps_for(model, train, tok, args, out, amp, cache_key))
    if args.compile:
        compile_blocks(model)  # each decoder block through torch.compile (the policy; with LoRA off, the reference)
    raw_model = model  # validation, generation and saving use the model itself, not the DDP wrapper
    if world > 1 and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model)  # a whole copy on each rank
    run = run_settings(args, train, world, steps, RESUMABLE, start_weights)
    start, history = resume(args, out, model, optimizer, scheduler, run)
    log = MetricsLog(out / "metrics.jsonl", history, enabled=rank == 0, echo=True)
    evaluate = functools.partial(validate, raw_model, tok, val, val_reference, judged, sft_answers, args, new_tokens,
                                 amp, val_real)

    step = start
    try:
        if start == 0:
            log.write({"step": 0, **evaluate()})
        for step in tqdm(range(start + 1, steps + 1), desc="dpo", initial=start, total=steps, disable=rank != 0,
                         file=sys.stderr):
            tick = time.perf_counter()
            batches = [to_device(D.collate_preferences(b, D.pad_id(tok), args.max_length if args.packing else None),
                                 device) for b in
                       micro_batches(train, step - 1, args.batch_size, args.grad_accum, args.seed, rank, world)]
            lr = scheduler.get_last_lr()[0]
            try:
                result = dpo_step(model, reference, batches, optimizer, scheduler, amp, args)
            except FloatingPointError as e:
                raise stopped(step, e, out) from None
            tokens = result.pop("tokens")
            record = {"step": step, **result, "lr": lr, "tokens_per_s": tokens / (time.perf_counter() - tick)}
            if step % args.eval_every == 0 or step == steps:
                record.update(evaluate())
            log.write(record)
            if step % args.save_every == 0 and step < steps:
                save_checkpoint(out, step, model, optimizer, scheduler, keep_last=args.keep_last,
                                state={"run": run, "lr": args.lr, "metrics": log.records})
    except KeyboardInterrupt:
        raise interrupted(step, steps, out) from None
    saved = save_final(raw_model, tok, out, args)  # every rank: a sharded model is gathered for rank 0 to write
    if rank == 0:
        chart = plot_training(log.records, out / "training.png",
                              title=f"DPO of {'/'.join(Path(args.model).parts[-2:])}", panels=(LOSSES, SHARES, REWARDS))
        finished(*saved, log.path, chart)
    del model, reference  # DDP's reducer first: the process group freed from inside it can hang (pytorch#56297)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
