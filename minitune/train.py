"""What every example's training loop shares, so that each example file holds only its loop.

    parser = argparse.ArgumentParser()
    add_common_args(parser, model=..., data=..., out="runs/sft", lr=1e-3)    # DESIGN's shared flags
    add_lora_args(parser)                                                   # --lora-r and friends
    args = parse_common_args(parser, argv)
    rank, world, device = init_distributed(args.device)                     # plain, or under torchrun
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)              # one JSON object per line
    for step in range(start, total_steps(args, len(train), world)):
        batches = micro_batches(train, step, args.batch_size, args.grad_accum, args.seed, rank, world)
        result = train_step(model, [to_device(collate(b, pad), device) for b in batches], optimizer,
                            scheduler, lambda: autocast(device, args.dtype), args.max_grad_norm)
    save_final(model, tok, out, args)                                       # final/ (and adapter/)

No trainer class: these are the pieces that would otherwise be copied from one example to the next;
the loop that strings them together stays in each example, in plain sight.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, resolve_resume
from .data import shard, step_indices
from .losses import IGNORE_INDEX
from .optim import SCHEDULES, scale_learning_rates

DTYPES = ("float32", "bfloat16")


def add_common_args(parser: argparse.ArgumentParser, *, model: str, data: str, out: str,
                    **defaults) -> argparse.ArgumentParser:
    """The command line every example shares (DESIGN.md), with the example's own defaults.

    `defaults` overrides the default of any flag by its dest name, e.g. lr=5e-4, batch_size=8."""
    p = parser.add_argument
    p("--model", default=model, help="hub id or local folder")
    p("--data", default=data, help="training JSONL")
    p("--out", default=out, help="metrics.jsonl, charts, checkpoints/ and final/ go here")
    p("--max-steps", type=int, default=None, help="optimizer steps; default: --epochs over the data")
    p("--epochs", type=float, default=1.0, help="passes over the training examples (packed rows with --packing)")
    p("--batch-size", type=int, default=8, help="examples (packed rows with --packing) per micro-batch and process")
    p("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p("--lr", type=float, default=1e-4, help="peak learning rate")
    p("--weight-decay", type=float, default=0.0, help="AdamW decay of weight matrices only")
    p("--warmup", type=int, default=0, help="linear warmup steps")
    p("--schedule", default="cosine", choices=SCHEDULES, help="decay after warmup")
    p("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this; 0 = no clipping")
    p("--seed", type=int, default=0)
    p("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p("--dtype", default=None, choices=DTYPES,
      help="compute dtype: bfloat16 runs under autocast over float32 weights; default bfloat16 on CUDA, else float32")
    p("--eval-every", type=int, default=50, help="validate every N steps (and before the first and after the last)")
    p("--save-every", type=int, default=100, help="write a resumable checkpoint every N steps")
    p("--keep-last", type=int, default=2, help="checkpoints kept on disk")
    p("--resume", default=None, help="'auto' (the latest complete checkpoint in --out) or a checkpoint folder")
    p("--grad-checkpointing", action="store_true", help="recompute each block's activations in the backward")
    p("--packing", action="store_true", help="several examples per row, each attending only to itself")
    parser.set_defaults(**defaults)
    return parser


def add_lora_args(parser: argparse.ArgumentParser, targets: Sequence[str] = ("q_proj", "v_proj")
                  ) -> argparse.ArgumentParser:
    """--lora-r (0: full fine-tuning), --lora-alpha, --lora-dropout, --lora-targets, --rslora, --lora-final."""
    p = parser.add_argument
    p("--lora-r", type=int, default=0, help="LoRA rank; 0 trains every weight")
    p("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: the update is alpha / r * B A")
    p("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")
    p("--lora-targets", nargs="+", default=list(targets),
      help="module names (q_proj), fnmatch patterns over paths, or all-linear")
    p("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    p("--lora-final", default="merged", choices=("merged", "none"),
      help="besides <out>/adapter: the merged model in <out>/final, or no full model")
    return parser


def apply_lora_args(model: torch.nn.Module, args: argparse.Namespace) -> bool:
    """apply_lora from the --lora-* flags when --lora-r > 0; whether it did."""
    if not getattr(args, "lora_r", 0):
        return False
    from . import lora
    lora.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=args.lora_targets, use_rslora=args.rslora)
    return True


def save_final(model: torch.nn.Module, tok, out: Path, args: argparse.Namespace) -> None:
    """The run's result: <out>/final (HF layout, with the tokenizer) and, when the model has LoRA layers,
    <out>/adapter (PEFT's format) beside it; the full model is then the merged one, or absent with
    --lora-final none."""
    from . import lora
    if any(True for _ in lora.lora_layers(model)):
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=args.model)
        tok.save_pretrained(out / "adapter")
        if getattr(args, "lora_final", "merged") == "none":
            return
        lora.save_model(model, out / "final", merged=True)
    else:
        model.save_pretrained(out / "final")
    tok.save_pretrained(out / "final")


def parse_common_args(parser: argparse.ArgumentParser, argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse, check the shared flags (parser.error names the flag), and fill in the device's default dtype."""
    args = parser.parse_args(argv)
    for flag in ("batch_size", "grad_accum", "eval_every", "save_every", "keep_last"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, not {args.max_steps}")
    if args.epochs <= 0 or args.lr <= 0 or args.warmup < 0 or args.max_grad_norm < 0:
        parser.error("--epochs and --lr must be positive, --warmup and --max-grad-norm at least 0")
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    return args


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun (RANK set) it also starts the process
    group: NCCL with one GPU per local rank, or gloo on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    on_cuda = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if on_cuda else "gloo")
    if on_cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over the processes (float64, so counts stay exact); the values themselves outside torch.distributed."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def micro_batches(train: list[dict], step: int, batch_size: int, grad_accum: int, seed: int, rank: int,
                  world: int) -> list[list[dict]]:
    """This rank's micro-batches for optimizer step `step` (0-based).

    The step's global batch is the same for any world size (rank r takes examples r, r + W, ...), and
    it depends on the step alone, so a resumed run continues mid-epoch exactly where it stopped."""
    picked = step_indices(len(train), step, batch_size * grad_accum * world, seed)
    mine = [train[i] for i in shard(picked, rank, world)]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def total_steps(args, n_train: int, world: int) -> int:
    """--max-steps, or the optimizer steps of --epochs over the training examples (rows when packed)."""
    return args.max_steps or math.ceil(args.epochs * n_train / (args.batch_size * args.grad_accum * world))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, batches: list[dict], optimizer, scheduler, amp, max_grad_norm: float = 1.0) -> dict:
    """One optimizer step over the accumulated micro-batches of every rank.

    Each micro-batch's loss is its sum over its targets divided by the number of targets in the whole
    accumulated batch, all ranks together. The step's gradient is then that of the mean over all its
    targets, whatever the micro-batches' lengths; a mean of per-micro-batch means would give a short
    batch the weight of a long one. `amp` gives the autocast context of the forward passes.

    Returns the loss (mean over targets), the gradient norm before clipping and the number of tokens
    (all ranks). Raises FloatingPointError, before updating anything, when the loss or the gradient
    is not finite.
    """
    device = next(model.parameters()).device
    world = world_size()
    targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    tokens = sum(int(b["attention_mask"].ne(0).sum()) for b in batches)
    n_targets, n_tokens = all_reduce_sum([targets, tokens], device)
    n_targets = max(n_targets, 1.0)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with amp():
                loss = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sum")
            # DDP averages gradients over the ranks; n_targets counts every rank's targets: scale back by world
            (loss * (world / n_targets)).backward()
        loss_sum += loss.detach()
    loss = all_reduce_sum([loss_sum.item()], device)[0] / n_targets
    grad_norm = optimizer_step(model, optimizer, scheduler, max_grad_norm, loss)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": n_tokens}


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, loss: float) -> float:
    """Clip the accumulated gradients, check them and the step's loss, update, advance the schedule.

    Returns the gradient norm before clipping. A loss or gradient that is not finite raises
    FloatingPointError before anything is updated (the gradients are dropped), so the weights and the
    optimizer state stay those of the last good step."""
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the loss is {loss} and the gradient norm {grad_norm}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def stopped(step: int, error: FloatingPointError, out: Path, save_every: int) -> SystemExit:
    """The message of a run stopped by a non-finite step: what happened and where to go on from."""
    last = latest_checkpoint(out)
    return SystemExit(f"step {step}: {error}; stopped before updating the weights. " + (
        f"The last good checkpoint is {last}: continue from it with --resume auto and a lower --lr."
        if last else f"No checkpoint was saved yet (--save-every {save_every}): start again with a lower --lr."))


# ---------------------------------------------------------------- resuming


def run_settings(args: argparse.Namespace, train: Sequence[dict], world: int, steps: int,
                 resumable: Iterable[str]) -> dict:
    """What a resumed run must share with the saved one: every flag but the `resumable` ones, the world
    size, the number of steps, and a sha256 of the encoded training examples (so changed data under the
    same path is caught)."""
    digest = hashlib.sha256()
    for example in train:
        _digest_example(digest, example)
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in set(resumable)}
    return {**flags, "world_size": world, "steps": steps, "train_sha256": digest.hexdigest()}


def _digest_example(digest, example: dict) -> None:
    """An encoded example's tokens and labels (a packed row's other fields follow from them), then its other
    fields in key order: the sides of a preference pair as examples, anything else as JSON."""
    if "input_ids" in example:
        digest.update(array.array("q", example["input_ids"] + [-1] + example["labels"] + [-2]).tobytes())
    for key in sorted(set(example) - {"input_ids", "labels", "attention_mask", "position_ids"}):
        digest.update(f"<{key}>".encode())
        if isinstance(example[key], dict):
            _digest_example(digest, example[key])
        else:
            digest.update(json.dumps(example[key]).encode())


def resume(args: argparse.Namespace, out: Path, model, optimizer, scheduler, run: dict) -> tuple[int, list[dict]]:
    """(the step to continue after, the metrics logged up to it): (0, []) for a fresh run.

    `--resume auto` or a checkpoint folder restores the model, optimizer, scheduler and RNG streams, and
    refuses a checkpoint saved with other `run` settings, naming what differs. A new --lr rescales the
    schedule to the new peak (the way out of a blow-up). A fresh run refuses a folder that already holds
    another run's checkpoints, rather than mixing the two."""
    ckpt = resolve_resume(args.resume, out)
    if ckpt is None:
        if latest_checkpoint(out) is not None:
            raise SystemExit(f"{out / 'checkpoints'} holds another run's checkpoints: pass --resume auto to continue "
                             "it, or choose a new --out")
        return 0, []
    saved = load_checkpoint(ckpt, model, optimizer, scheduler)
    before = saved["state"]["run"]
    if changed := {k: (before.get(k), run.get(k)) for k in before.keys() | run.keys() if before.get(k) != run.get(k)}:
        raise SystemExit(f"{ckpt}: saved by a run with other settings {changed} (saved, now): the data order "
                         "and optimisation would not continue; resume with the same flags (--lr may change)")
    if args.lr != saved["state"]["lr"]:  # e.g. after a blow-up: the schedule goes on at the new peak
        scale_learning_rates(scheduler, args.lr / saved["state"]["lr"])
    return saved["step"], saved["state"]["metrics"]


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    """bf16 autocast when dtype is "bfloat16" (weights, gradients and optimizer state stay float32); a no-op else."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as the run goes and kept in `records`.

    Started with the records of a checkpoint, it rewrites the file with them, so a resumed run drops
    whatever the killed run logged after its last checkpoint. With enabled=False (ranks other than 0)
    it only keeps the records."""

    def __init__(self, path: str | os.PathLike, records: Iterable[dict] = (), enabled: bool = True,
                 echo: bool = False):
        self.path, self.records, self.enabled, self.echo = Path(path), list(records), enabled, echo
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        line = json.dumps(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.echo:
            tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it


class PeakMemory:
    """Peak memory of a `with` block above the memory in use when it starts (so weights loaded before are
    left out; gradients, optimizer state and activations counted). On CUDA: torch's peak allocation. On a
    Linux CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs at the start).
    After the block: `peak_bytes`, and `measure`, which says which of the two (or that neither worked)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes, self.measure = torch.device(device), 0, ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _proc_status("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            self.measure = "CUDA: torch.cuda.max_memory_allocated above the start"
        elif self.start is not None:
            self.peak_bytes = _proc_status("VmHWM") - self.start
            self.measure = "CPU: peak resident memory (VmHWM) above the start"
        else:
            self.measure = "not measured (no CUDA, no /proc/self/clear_refs)"


def _proc_status(key: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
