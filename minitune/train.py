"""The plumbing every example's training loop shares, so that each example file holds its loop and its settings.

    parser = ArgumentParser()                                               # argparse, errors in one line
    add_common_args(parser, model=..., data=..., out="runs/sft")            # --model --data --out --device ...
    parser.add_argument("--lr", type=positive_float, default=1e-3)          # the example's own hyperparameters
    args = parse_common_args(parser, argv)                                  # device and data paths checked
    rank, world, device = init_distributed(args.device)                     # plain, or under torchrun
    out = check_out(args)                                                   # never over a finished run unasked
    start, history = resume(args, out, model, optimizer, scheduler, run)    # 0, or the checkpoint's step
    log = MetricsLog(out / "metrics.jsonl", history, enabled=rank == 0)     # one JSON object per line
    for step in range(start + 1, steps + 1):
        batches = micro_batches(train, step - 1, args.batch_size, args.grad_accum, args.seed, rank, world)
        ...                                                                 # the example's step, written out
    save_final(model, tok, out, args)                                       # final/ (and adapter/)

    if __name__ == "__main__":
        run_main(main)                                                      # user errors: one line, exit 2

No trainer class and no training step here: the forward, backward, clipping and optimizer step are
written out in examples/finetune_mistral.py and examples/dpo.py.
"""

from __future__ import annotations

import argparse
import array
import errno
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, resolve_resume
from .data import shard, step_indices
from .errors import UserError
from .freeze import blocks
from .optim import scale_learning_rates

DTYPES = ("float32", "bfloat16")
# What a training run writes in its --out; a fresh run refuses a folder holding any of them (see check_out)
RUN_FILES = ("final", "adapter", "checkpoints", "metrics.jsonl", "training.png")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad flag reported in one line (`prog: error: ...`, the usage left to --help)
    and exit status 2, as argparse itself exits."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_common_args(parser: argparse.ArgumentParser, *, model: str, data: str, out: str, eval_every: int = 50,
                    save_every: int = 100) -> argparse.ArgumentParser:
    """The plumbing flags every example shares, with the example's defaults for the paths and
    the validation and checkpoint intervals. Training hyperparameters are each example's own."""
    p = parser.add_argument
    p("--model", default=model, help="hub id or local folder")
    p("--data", default=data, help="training JSONL")
    p("--out", default=out, help="metrics.jsonl, charts, checkpoints/ and final/ go here")
    p("--resume", default=None, help="'auto' (the latest complete checkpoint in --out) or a checkpoint folder")
    p("--overwrite", action="store_true", help="start again in an --out that holds an earlier run, deleting its files")
    p("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p("--dtype", default=None, choices=DTYPES,
      help="compute dtype: bfloat16 runs under autocast over float32 weights; default bfloat16 on CUDA, else float32")
    p("--seed", type=int, default=0)
    p("--eval-every", type=positive_int, default=eval_every,
      help="validate every N steps (and before the first and after the last)")
    p("--save-every", type=positive_int, default=save_every, help="write a resumable checkpoint every N steps")
    p("--keep-last", type=positive_int, default=2, help="checkpoints kept on disk")
    p("--grad-checkpointing", action="store_true", help="recompute each block's activations in the backward")
    p("--offload-checkpoints", action="store_true",
      help="with --grad-checkpointing: each block's saved input waits for the backward in CPU memory, not the GPU's")
    p("--packing", action="store_true", help="several examples per row, each attending only to itself")
    p("--compile", action="store_true",
      help="torch.compile each decoder block: slower first steps (compiling), faster ones after")
    return parser


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--fsdp and --fsdp-offload: under torchrun, FSDP2 instead of DDP (minitune.distributed.shard_model)."""
    p = parser.add_argument
    p("--fsdp", action="store_true",
      help="under torchrun: shard the weights, gradients and optimizer state over the processes (FSDP2) instead "
           "of a whole copy on each (DDP)")
    p("--fsdp-offload", action="store_true", help="with --fsdp: keep the shards and the optimizer step on the CPU")
    return parser


def compile_blocks(model: torch.nn.Module) -> None:
    """--compile: each decoder block through torch.compile, in place. Regional compilation: the blocks share one
    compiled graph (their parameters are its inputs), compiled in seconds where the whole model takes minutes;
    the Triton kernels are custom ops, opaque to the compiler. Call it after LoRA is applied."""
    for block in blocks(model):
        block.compile()


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse's error names the flag)."""
    return _within(int(text), 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _within(int(text), 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    return _within(float(text), 0.0, strict=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    return _within(float(text), 0.0)


def _within(value: float, low: float, strict: bool = False) -> float:
    """`value` when it is finite and at least `low` (above it when strict), else argparse's error."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, not {value}")
    return value


def add_lora_args(parser: argparse.ArgumentParser, targets: Sequence[str] = ("q_proj", "v_proj"),
                  quantize: bool = False) -> argparse.ArgumentParser:
    """--lora-r (0: full fine-tuning), --lora-alpha, --lora-dropout, --lora-targets, --rslora, --lora-final; with
    `quantize`, --quantize nf4 (QLoRA, for the Mistral-family decoders)."""
    p = parser.add_argument
    p("--lora-r", type=int, default=0, help="LoRA rank; 0 trains every weight")
    p("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: the update is alpha / r * B A")
    p("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")
    p("--lora-targets", nargs="+", default=list(targets),
      help="module names (q_proj), fnmatch patterns over paths, or all-linear")
    p("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    p("--lora-final", default="merged", choices=("merged", "none"),
      help="besides <out>/adapter: the merged model in <out>/final, or no full model")
    if quantize:
        p("--quantize", default=None, choices=("nf4",),
          help="hold the frozen base's linear layers in 4-bit NF4 under the adapters (QLoRA); needs --lora-r")
    return parser


def weights_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype to load the model in: float32 master weights when every weight trains (bf16 compute runs under
    autocast); under LoRA the frozen base in the compute dtype (bf16 on a GPU: half the memory, and the matmuls
    are bf16 anyway), the float32 adapters being all that trains (with --quantize nf4, the linear layers of the
    base are 4-bit on top)."""
    return torch.bfloat16 if getattr(args, "lora_r", 0) and args.dtype == "bfloat16" else torch.float32


def apply_lora_args(model: torch.nn.Module, args: argparse.Namespace) -> bool:
    """apply_lora from the --lora-* flags when --lora-r > 0; whether it did. A model with 4-bit layers (--quantize
    nf4, or a bitsandbytes 4-bit --model) cannot train without LoRA: a UserError says so."""
    from . import quant
    if not getattr(args, "lora_r", 0):
        if quant.is_quantized(model):
            raise UserError(f"{args.model} is stored in 4 bits (bitsandbytes NF4), which cannot be trained itself: "
                            "add LoRA (e.g. --lora-r 16 --lora-targets all-linear)")
        return False
    from . import lora
    lora.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=args.lora_targets, use_rslora=args.rslora)
    return True


def save_final(model: torch.nn.Module, tok, out: Path, args: argparse.Namespace) -> list[Path]:
    """The run's result: <out>/final (HF layout, with the tokenizer) and, when the model has LoRA layers,
    <out>/adapter (PEFT's format) beside it; the full model is then the merged one, or absent with
    --lora-final none. Returns the folders written. Under torch.distributed every process calls it and the
    first writes (a sharded model is gathered to its CPU first, a tensor at a time); the others return []."""
    from . import lora
    from .distributed import consolidated
    model = consolidated(model)  # FSDP2: rank 0 gets the whole model on its CPU, the others None
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    saved = []
    if any(True for _ in lora.lora_layers(model)):
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=args.model)
        tok.save_pretrained(out / "adapter")
        saved.append(out / "adapter")
        if getattr(args, "lora_final", "merged") == "none":
            return saved
        lora.save_merged(model, out / "final")
    else:
        model.save_pretrained(out / "final")
    tok.save_pretrained(out / "final")
    return [out / "final", *saved]


def finished(*written: Path | None) -> None:
    """The line that ends a run: where its results went (None, e.g. a chart without matplotlib, is left out)."""
    note("finished: " + ", ".join(str(path) for path in written if path is not None))


def parse_common_args(parser: argparse.ArgumentParser, argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse, check what can be checked before any work (the device, the data files, --resume against
    --overwrite), and fill in the device's default dtype. A bad value ends with parser.error, naming the flag."""
    args = parser.parse_args(argv)
    if problem := device_problem(args.device):
        parser.error(f"--device {args.device}: {problem}")
    for flag in ("data", "val_data"):  # --val-data "" means: split it off --data
        if (path := getattr(args, flag, None)) and not Path(path).is_file():
            what = "is a folder, not a JSONL file" if Path(path).is_dir() else "no such file"
            parser.error(f"--{flag.replace('_', '-')} {path}: {what}")
    if args.offload_checkpoints and not args.grad_checkpointing:
        parser.error("--offload-checkpoints moves the checkpoints of --grad-checkpointing to CPU memory: add it")
    if getattr(args, "fsdp_offload", False) and not args.fsdp:
        parser.error("--fsdp-offload offloads FSDP's shards: add --fsdp")
    if getattr(args, "fsdp", False) and "RANK" not in os.environ:
        parser.error("--fsdp shards the model over torchrun's processes: run the script under torchrun "
                     "(torchrun --nproc_per_node=N, N=1 on one GPU)")
    if args.overwrite and args.resume:
        parser.error("--overwrite starts the run again and --resume continues it: pass one of them")
    if getattr(args, "quantize", None) and not getattr(args, "lora_r", 0):
        parser.error(f"--quantize {args.quantize} holds the base in 4 bits, which cannot be trained itself: add LoRA "
                     "(e.g. --lora-r 16 --lora-targets all-linear)")
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    return args


def device_problem(name: str) -> str | None:
    """Why torch cannot compute on the device `name` ("cpu", "cuda", "cuda:1", "mps"), or None when it can."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "not a device torch knows (expected cpu, cuda, cuda:N or mps)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"this torch {torch.__version__} " + ("was built without CUDA" if torch.version.cuda is None else
                                                    "sees no CUDA GPU") + ": pass --device cpu"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"this machine's CUDA devices are cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine: pass --device cpu"
    return None


def init_distributed(device: str, cpu_collectives: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun (RANK set) it also starts the process
    group: NCCL with one GPU per local rank, or gloo on the CPU. `cpu_collectives` (FSDP's CPU offload, whose
    shards and gradients live on the CPU) adds gloo for CPU tensors beside NCCL."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    on_cuda = torch.device(device).type == "cuda"
    dist.init_process_group(("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl") if on_cuda else "gloo")
    if on_cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Each value summed over the processes, all in one collective (float64, so counts stay exact); the
    values themselves outside torch.distributed."""
    sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return dict(zip(values, sums.tolist(), strict=True))


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


def stopped(step: int, error: FloatingPointError, out: Path) -> UserError:
    """The error of a run stopped by a non-finite step: what happened and where to go on from."""
    last = latest_checkpoint(out)
    return UserError(f"step {step}: {error}; stopped before updating the weights. " + (
        f"The last good checkpoint is {last}: continue from it with --resume auto and a lower --lr."
        if last else "No checkpoint was saved yet: start again with --overwrite and a lower --lr."))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a training loop, with a message saying where the run stopped and how to go on."""


def interrupted(step: int, steps: int, out: Path) -> Interrupted:
    """The Interrupted of a Ctrl-C during step `step`: the step reached, the last checkpoint, how to resume."""
    last = latest_checkpoint(out)
    return Interrupted(f"interrupted in step {step} of {steps}; " + (
        f"the last checkpoint is {last}: the same command with --resume auto continues from it" if last else
        "no checkpoint was saved yet: start again with --overwrite"))


# What run_main reports in one line: files that are missing, not allowed, or in the way, and a full disk
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run an example's main() as a command. A UserError (bad data, a bad value, a refused --out, a non-finite
    loss) or a file that is missing or in the way, or a full disk, ends it with its one-line message on stderr
    (from the first process under torchrun) and exit status 2; Ctrl-C with a line saying where the run stopped,
    and status 130. Anything else is a bug and keeps its traceback."""
    prog = Path(sys.argv[0]).name
    first = os.environ.get("RANK", "0") == "0"
    try:
        main(argv)
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, USER_OS_ERRORS) and e.errno != errno.ENOSPC:
            raise  # a socket or a pipe: a bug's, or the machine's, with its traceback
        if first:
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if first:
            print(f"{prog}: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


def note(message: str) -> None:
    """One line on stderr, from the first process only (above a progress bar, not through it)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(message, file=sys.stderr)


def warmup_steps(warmup: int, steps: int) -> int:
    """--warmup, or steps - 1 for a run no longer than its warmup (said in one line), so that even a
    short run takes its last step at the peak learning rate."""
    if warmup < steps:
        return warmup
    note(f"--warmup {warmup} is not shorter than the run ({steps} steps): warming up over {steps - 1} steps, "
         "the last one at the peak --lr")
    return steps - 1


# ---------------------------------------------------------------- the output folder


def check_out(args: argparse.Namespace, files: Sequence[str] = RUN_FILES) -> Path:
    """--out, checked before any work, so that nothing an earlier run wrote is lost unasked.

    Refused: a file; a folder that holds the --model this run starts from; a folder holding an earlier
    run's `files` (names or glob patterns: final/, metrics.jsonl, checkpoints/ ...), unless --resume auto
    continues that run (it needs a checkpoint) or --overwrite starts again, deleting those files first
    (the folder's other files stay). --resume with a checkpoint folder of another run counts as a fresh
    run here: it would write over this folder's files. Under torchrun every process calls this."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; pass a folder for the run's files")
    model = Path(args.model or "").expanduser()  # None: the run writes no model
    if args.model and model.exists() and (model.resolve() == out.resolve() or out.resolve() in model.resolve().parents):
        raise UserError(f"--out {out} holds the --model {args.model} this run starts from: choose another --out, so "
                        "that nothing the run writes or --overwrite deletes can touch it")
    resume = args.resume or None
    if resume not in (None, "auto") and out.resolve() in Path(resume).resolve().parents:
        return out  # a checkpoint of this very run
    found = [name for name in files if any(out.glob(name))
             and (name != "checkpoints" or latest_checkpoint(out) is not None)]  # not just a killed first save
    if dist.is_initialized():
        dist.barrier()  # every process has looked before the first deletes anything
    if not found:
        return out
    if args.overwrite:
        if not dist.is_initialized() or dist.get_rank() == 0:
            for path in (path for name in found for path in out.glob(name)):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            note(f"--overwrite: deleted the earlier run's {', '.join(found)} in {out}")
        if dist.is_initialized():
            dist.barrier()
    elif resume != "auto":
        raise UserError(f"--out {out} holds an earlier run ({', '.join(found)}): pass --resume auto to continue it, "
                        "--overwrite to start again (deleting them), or another --out")
    elif latest_checkpoint(out) is None:
        raise UserError(f"--out {out} holds an earlier run ({', '.join(found)}) but no checkpoint to continue from: "
                        "pass --overwrite to start again (deleting them), or another --out")
    return out


# ---------------------------------------------------------------- resuming


def run_settings(args: argparse.Namespace, train: Sequence[dict], world: int, steps: int,
                 resumable: Iterable[str], start_weights: str) -> dict:
    """What a resumed run must share with the saved one: every flag but the `resumable` ones, the world
    size, the number of steps, a sha256 of the encoded training examples (so changed data under the
    same path is caught) and `start_weights`, the fingerprint of the weights the run started from (so
    another --model of the same architecture is caught; minitune.reference.fingerprint)."""
    digest = hashlib.sha256()
    for example in train:
        _digest_example(digest, example)
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in set(resumable)}
    return {**flags, "world_size": world, "steps": steps, "train_sha256": digest.hexdigest(),
            "start_weights": start_weights}


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
    another run's checkpoints, rather than mixing the two (check_out says so before any work)."""
    ckpt = resolve_resume(args.resume, out)
    if ckpt is None:
        if latest_checkpoint(out) is not None:
            raise UserError(f"{out / 'checkpoints'} holds another run's checkpoints: pass --resume auto to continue "
                            "it, or choose a new --out")
        return 0, []
    saved = load_checkpoint(ckpt, model, optimizer, scheduler)
    before = saved["state"]["run"]
    changed = {k: (before.get(k), run.get(k)) for k in before.keys() | run.keys() if before.get(k) != run.get(k)}
    if "start_weights" in changed:
        raise UserError(f"{ckpt}: the run started from other weights than --model {args.model}: resume with the "
                        "--model it started from, or start a new run in another --out")
    if changed:
        raise UserError(f"{ckpt}: saved by a run with other settings {changed} (saved, now): the data order "
                        "and optimisation would not continue; resume with the same flags (--lr may change)")
    if args.lr != saved["state"]["lr"]:  # e.g. after a blow-up: the schedule goes on at the new peak
        scale_learning_rates(scheduler, args.lr / saved["state"]["lr"])
    note(f"resuming from step {saved['step']} of {run['steps']} ({ckpt})")
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
        if enabled:  # written aside and renamed: a Ctrl-C here leaves the old file whole
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        line = json.dumps(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.echo:
            tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it
