"""Training state save and resume: a run killed at any moment continues from its last checkpoint.

A loop saves every N steps and, started again with `--resume auto`, picks up where it stopped:

    ckpt = resolve_resume(args.resume, out)            # "auto", a checkpoint folder, or None
    start = load_checkpoint(ckpt, model, optimizer, scheduler)["step"] if ckpt else 0
    for step in range(start + 1, steps + 1):
        ...
        if step % save_every == 0:
            save_checkpoint(out, step, model, optimizer, scheduler, state={"epoch": epoch}, keep_last=3)

A checkpoint is the folder `<out>/checkpoints/step-N/`:

    model.safetensors    the weights, in our state-dict names; a tied weight stored once
    optimizer.pt         optimizer.state_dict() with parameter names for keys (torch.save)
    scheduler.pt         scheduler.state_dict() (torch.save), when there is a scheduler
    rng.pt               the torch CPU, CUDA, python `random` and numpy global RNG states
                         (under torch.distributed: rng-rank<r>.pt, one per process)
    trainer_state.json   {"format_version", "step", "world_size", "state": the caller's dict}

Everything goes into a temporary sibling folder `.tmp-step-N` and trainer_state.json is written last;
only then is the folder renamed to step-N. A rename is atomic, so step-N either does not exist or is
complete: a process killed during a save leaves the previous checkpoint the latest one. The next save
removes what the killed one left.

The weights and optimizer state go through torch.distributed.checkpoint's state-dict helpers with full,
CPU-offloaded state dicts, so the same calls serve a plain model, DDP and FSDP2 (`fully_shard`): the
files hold whole, unsharded tensors under the plain parameter names (no "module." prefix) and load into
any of the three, on any number of processes. Under torch.distributed every process must call
save_checkpoint (gathering a sharded model is collective); rank 0 writes the shared files, each process
writes its own RNG file, and barriers keep them in step (a rank that fails leaves the others waiting at
one until torchrun stops them). Every process reads the shared files on load, so the folder must be on
a file system that all of them see.

A model sharded with FSDP2 (`minitune.distributed.shard_model`) is saved sharded instead: `sharded/`, a
torch.distributed.checkpoint folder in which every process writes its own shards of the weights and the
optimizer state (`__<rank>_0.distcp`, and `.metadata`), nothing gathered. A training run resumes it on the same
number of processes (the examples refuse another: the RNG streams and data shards are per process), though
torch.distributed.checkpoint itself could reshard it.

Nothing here unpickles code: tensors come from safetensors, everything else from
`torch.load(..., weights_only=True)` or JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .distributed import is_sharded
from .errors import UserError
from .hub import mismatch, save_safetensors
from .quant import NF4Weight

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
NF4_STATE = ".quant_state.bitsandbytes__nf4"  # a 4-bit weight's JSON state, in its state dict
SHARDED_DIR = "sharded"  # an FSDP2 model's weights and optimizer state, each process's shards in its own files
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _state_dict_api():
    """torch.distributed.checkpoint's state-dict functions, imported on the first save or load (importing them
    takes about a second, which `import minitune` should not pay when no checkpoint is used)."""
    from torch.distributed.checkpoint import state_dict
    return state_dict


def _full():
    """Whole tensors, gathered to rank 0's CPU memory (the other ranks get empty dicts) for saving. On load
    every rank passes the whole state dict and each keeps its own shard."""
    return _state_dict_api().StateDictOptions(full_state_dict=True, cpu_offload=True)


# ---------------------------------------------------------------- where the checkpoints are

def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    """Where `save_checkpoint(out_dir, step, ...)` puts its checkpoint."""
    return Path(out_dir) / "checkpoints" / f"step-{step}"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint whose save finished: its trainer_state.json exists and parses."""
    try:
        return isinstance(json.loads((Path(path) / TRAINER_STATE_FILE).read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _complete_checkpoints(root: Path) -> dict[int, Path]:
    """The complete checkpoints under `<out>/checkpoints`, by step.

    `.old-step-N` is a checkpoint that an overwrite of step-N moved aside; it stands in for step-N only
    when step-N is missing (a save killed between moving the old folder out and the new one in).
    `.tmp-*` folders are saves that never finished and never count.
    """
    found = {}
    for path in root.glob("*step-*") if root.is_dir() else []:
        m = _STEP_DIR.match(path.name.removeprefix(".old-"))
        if not m or (path.name.startswith(".old-") and (root / m.group(0)).exists()):
            continue
        if is_complete(path):
            found[int(m.group(1))] = path
    return found


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `<out_dir>/checkpoints`, or None if there is none."""
    found = _complete_checkpoints(Path(out_dir) / "checkpoints")
    return found[max(found)] if found else None


def resolve_resume(resume: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that `--resume` names: "auto" is the latest in out_dir (None when there is none yet,
    so the same command starts a run and resumes it), a path must be a complete checkpoint, None or ""
    means start afresh."""
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder (expected one like "
                                f"{checkpoint_dir(out_dir, 100)}, or 'auto')")
    if not is_complete(path):
        raise FileNotFoundError(f"--resume {resume}: {path / TRAINER_STATE_FILE} is missing or unreadable, so "
                                "the checkpoint is incomplete (its save did not finish)")
    return path


# ---------------------------------------------------------------- saving

def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler | None = None, state: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Write `<out_dir>/checkpoints/step-<step>/` atomically and return its path.

    `state` is the caller's JSON-serialisable dict (data-order position, epoch, metrics...), given back
    by load_checkpoint. An existing step-<step> is replaced only once the new one is complete.
    `keep_last=K` then deletes all but the K highest-step complete checkpoints up to this one
    (checkpoints with a higher step, left by another run in the same folder, are not "older").
    Under torch.distributed every process calls this; it returns once the checkpoint is in place.
    A Ctrl-C during the save takes effect once the checkpoint is complete, so it is the one to resume from
    (torchrun kills its workers if they outlast its --shutdown-timeout, 30 s by default; the checkpoint then stays
    incomplete and the previous one is the latest).
    """
    with _ctrl_c_after():
        return _save_checkpoint(out_dir, step, model, optimizer, scheduler, state, keep_last)


@contextmanager
def _ctrl_c_after():
    """Hold SIGINT back until the block ends, then raise the KeyboardInterrupt it would have raised.

    Cut short inside torch.save, Ctrl-C surfaces as the writer's RuntimeError, not as an interrupt."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not \
            signal.default_int_handler:
        yield  # signals reach only the main thread; a handler someone else installed stays theirs
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def _save_checkpoint(out_dir, step, model, optimizer, scheduler, state, keep_last) -> Path:
    if keep_last is not None and keep_last < 1:
        raise UserError(f"keep_last must be at least 1 (or None to keep every checkpoint), got {keep_last}")
    rank, world = _rank_and_world()
    trainer_state = {"format_version": FORMAT_VERSION, "step": step, "world_size": world, "state": state or {}}
    try:
        marker = json.dumps(trainer_state, indent=2) + "\n"  # fail before writing anything
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: `state` must be JSON-serialisable: {e}") from None
    rng = rng_state()  # first: nothing below should be able to move a stream before it is recorded
    sharded = is_sharded(model)
    if not sharded:
        weights = _state_dict_api().get_model_state_dict(model, options=_full())  # whole tensors, on rank 0
        optim = _optimizer_state_dict(model, optimizer, _full())

    root = Path(out_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step}"  # the same name on every rank, so all of them write into it
    if rank == 0:
        _tidy(root)
        tmp.mkdir(parents=True)
    _barrier()
    _torch_save(rng, tmp / _rng_file(rank, world))
    if sharded:  # collective: each process writes its shards
        _save_sharded(model, optimizer, tmp / SHARDED_DIR)
    if rank == 0:
        if not sharded:
            _save_weights(weights, _aliases(model), tmp / MODEL_FILE)
            _torch_save(optim, tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    _barrier()  # every rank's RNG file is in before the marker says the checkpoint is complete
    final = root / f"step-{step}"
    if rank == 0:
        _write_text(marker, tmp / TRAINER_STATE_FILE)
        _fsync(tmp)
        _move_into_place(tmp, final)
        if keep_last is not None:
            _prune(root, step, keep_last)
    _barrier()
    return final


def _tidy(root: Path) -> None:
    """Clear what a killed save left: unfinished `.tmp-*` folders, pruned `.del-*` ones, and `.old-step-N` folders.

    An `.old-step-N` next to its step-N is a replaced checkpoint whose deletion was cut short; one without
    it was moved aside by an overwrite killed before the new step-N moved in, so it goes back in place.
    """
    for path in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
        shutil.rmtree(path)
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` folder to `final`; an existing `final` is moved aside first, deleted after.

    A folder cannot be renamed over a non-empty one, so replacing takes two renames. Between them the old
    checkpoint is `.old-step-N`, which latest_checkpoint and the next save's _tidy both know about.
    """
    old = final.with_name(".old-" + final.name)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Delete the complete checkpoints older than the `keep_last` newest up to `step` (the one just saved)."""
    found = _complete_checkpoints(root)
    for s in sorted(s for s in found if s <= step)[:-keep_last]:
        doomed = root / f".del-step-{s}"  # renamed first: a delete cut short leaves no half checkpoint named step-N
        os.replace(found[s], doomed)
        shutil.rmtree(doomed)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied weights: {second name: first name} for each parameter registered under two names.

    A tied head is the embedding matrix itself, so it is stored once (safetensors refuses two names for one
    memory, and it would double the file) and both names are filled from it on load. Names are those of the
    state dict: without the "module." of DDP or the "_orig_mod." of torch.compile.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        plain = ".".join(part for part in name.split(".") if part not in ("module", "_orig_mod"))
        names.setdefault(id(p), []).append(plain)
    return {alias: group[0] for group in names.values() for alias in group[1:]}


def _save_weights(weights: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in weights.items() if k not in aliases}
    save_safetensors(tensors, path, {"format": "pt", "aliases": json.dumps(aliases)})
    _fsync(path)


def _save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """torch.distributed.checkpoint.save of the sharded weights and optimizer state (no optimizer state before
    the first step; see _optimizer_state_dict): every process writes its own file, rank 0 the metadata."""
    import torch.distributed.checkpoint as dcp
    state = {"model": _sharded_model_state(model)}
    optim = _optimizer_state_dict(model, optimizer, _state_dict_api().StateDictOptions())
    if optim["state"]:
        state["optimizer"] = optim
    with _unwrapped_failure():
        dcp.save(state, checkpoint_id=folder)
    for path in [*folder.iterdir(), folder]:
        if _rank_wrote(path):
            _fsync(path)


@contextmanager
def _unwrapped_failure():
    """torch.distributed.checkpoint wraps every process's error in one CheckpointException: a full disk or a
    missing file comes out as the OSError it was (one line from run_main), anything else as it is."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as e:
        errors = [error for error, _ in e.failures.values()]
        raise next((error for error in errors if isinstance(error, OSError)), e) from None


def _sharded_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict of shards, each 4-bit weight's `offset` in place of its JSON state (which is made from
    the offset, and whose length varies with it)."""
    state = {k: v for k, v in _state_dict_api().get_model_state_dict(model).items() if not k.endswith(NF4_STATE)}
    state.update({f"{name}.offset": m.offset for name, m in model.named_modules()
                  if isinstance(m, NF4Weight) and m.offset is not None})
    return state


def _rank_wrote(path: Path) -> bool:
    """Whether this process wrote `path` of a sharded checkpoint (its own shard file; rank 0 the metadata and the
    folder), so that each file is synced by the process that wrote it."""
    rank, _ = _rank_and_world()
    shard = re.match(r"^__(\d+)_\d+\.distcp$", path.name)
    return int(shard.group(1)) == rank if shard else rank == 0


def _optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, options) -> dict:
    """The optimizer's state dict (whole tensors or this process's shards, as `options` say), keyed by parameter
    name.

    get_optimizer_state_dict initialises the state of an optimizer that has not stepped yet by taking a
    step with zero gradients and lr 0, which leaves AdamW with step=1 and zero moments. Its first real
    step would then be its second, with another bias correction, so saving would change the run being
    saved. That state is undone here, and saved as what it is: none.
    """
    fresh = not optimizer.state
    optim = _state_dict_api().get_optimizer_state_dict(model, optimizer, options=options)
    if fresh:
        optimizer.state.clear()
        if optim:  # ranks other than 0 get {}
            optim["state"] = {}
    return optim


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's list of names, to the disk.

    A rename is durable only once the folder holding it is synced, and a renamed folder is only complete
    after a power cut if its files were synced first. (Windows cannot open a folder; it skips that part.)
    """
    if path.is_dir():
        if os.name != "posix":
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        with open(path, "r+b") as f:
            os.fsync(f.fileno())


# ---------------------------------------------------------------- loading

def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: LRScheduler | None = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint into `model` (and `optimizer`, `scheduler`, the RNG streams); return its
    trainer_state.json: {"format_version", "step", "world_size", "state": the dict given to save}.

    The model, optimizer and scheduler are built as for a fresh run, then filled: values are copied into
    the existing parameters, so a model built with a tied head stays tied. Under torch.distributed every
    process calls this. RNG streams are restored only on the number of processes that saved them (with
    another number each process's stream cannot continue; a warning says so).
    """
    path = Path(path)
    trainer_state = _read_trainer_state(path / TRAINER_STATE_FILE)
    if (path / SHARDED_DIR).is_dir():
        _load_sharded(path / SHARDED_DIR, model, optimizer)
    else:
        _load_weights(path / MODEL_FILE, model)
        if optimizer is not None:
            _load_optimizer(path / OPTIMIZER_FILE, model, optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE))
    if restore_rng:
        rank, world = _rank_and_world()
        if trainer_state["world_size"] == world:
            set_rng_state(_torch_load(path / _rng_file(rank, world)))
        else:
            warnings.warn(f"{path}: saved by {trainer_state['world_size']} process(es), resumed on {world}: the "
                          "RNG streams are not restored, so the run will not repeat exactly", stacklevel=2)
    return trainer_state


def _read_trainer_state(path: Path) -> dict:
    try:
        trainer_state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found, so {path.parent} is not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
    missing = [k for k in ("format_version", "step", "world_size", "state") if k not in trainer_state]
    if missing:
        raise UserError(f"{path}: not a minitune trainer state (missing {', '.join(missing)})")
    if trainer_state["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path}: format_version {trainer_state['format_version']} is newer than this "
                        f"minitune reads ({FORMAT_VERSION}); upgrade minitune")
    return trainer_state


def _load_weights(path: Path, model: nn.Module) -> None:
    """Fill the model from model.safetensors, after checking every name and shape against it.

    The check lists every problem at once and names the file; it uses the model's own (possibly sharded)
    state dict, whose DTensors report their whole shape, so nothing is gathered for it.
    """
    try:
        with safe_open(path, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (the checkpoint folder is damaged)") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    for alias, name in aliases.items():
        weights[alias] = weights[name]

    api = _state_dict_api()
    expected = api.get_model_state_dict(model, options=api.StateDictOptions(full_state_dict=False))
    problems = [f"unexpected tensor {k!r}" for k in weights if k not in expected]
    problems += [f"missing tensor {k!r}" for k in expected if k not in weights]
    problems += [f"tensor {k!r} has shape {list(weights[k].shape)}, the model expects {list(expected[k].shape)}"
                 for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if problems:
        raise mismatch(str(path), model, problems)
    api.set_model_state_dict(model, weights, options=_full())


def _load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill the optimizer from optimizer.pt, then undo two side effects of set_optimizer_state_dict.

    It first gives every parameter a zero state with step=1 (see _optimizer_state_dict): a parameter
    that had not been updated when the checkpoint was saved must start from no state, as it would have
    in the run that is being continued. And its full-state-dict path turns tuples (AdamW's betas) into
    lists: the saved tuples go back, so the optimizer's state dict is the one that was saved.
    """
    saved = _torch_load(path)
    try:
        _state_dict_api().set_optimizer_state_dict(model, optimizer, saved, options=_full())
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match the optimizer ({type(e).__name__}: {e})") from None
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if isinstance(v, tuple)})
        for p, name in zip(group["params"], saved_group["params"], strict=True):
            if name not in saved["state"]:
                optimizer.state.pop(p, None)


def _load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """torch.distributed.checkpoint.load into the model's (and optimizer's) own state dicts: each process reads the
    shards it holds. A checkpoint saved before the first step holds no optimizer state: the optimizer starts
    from none, as that run's did."""
    import torch.distributed.checkpoint as dcp
    api = _state_dict_api()
    try:
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    except Exception as e:  # a missing or damaged .metadata
        raise UserError(f"{folder}: not a readable torch.distributed.checkpoint folder ({type(e).__name__}: {e})") \
            from None
    state = {"model": _sharded_model_state(model)}  # the model's own shards: dcp.load reads into them
    stored = {k.removeprefix("model."): entry for k, entry in saved.items() if k.startswith("model.")}
    problems = [f"missing tensor {k!r}" for k in state["model"] if k not in stored]
    problems += [f"unexpected tensor {k!r}" for k in sorted(stored.keys() - state["model"].keys())]
    problems += [f"tensor {k!r} has shape {list(stored[k].size)}, the model expects {list(v.shape)}"  # whole shapes
                 for k, v in state["model"].items()
                 if hasattr(stored.get(k), "size") and tuple(stored[k].size) != tuple(v.shape)]
    if problems:
        raise mismatch(str(folder), model, problems)
    with_optimizer = optimizer is not None and any(k.startswith("optimizer.") for k in saved)
    if with_optimizer:
        betas = [{k: v for k, v in group.items() if isinstance(v, tuple)} for group in optimizer.param_groups]
        state["optimizer"] = api.get_optimizer_state_dict(model, optimizer)
    with _unwrapped_failure():
        dcp.load(state, checkpoint_id=folder)
    if with_optimizer:
        api.set_optimizer_state_dict(model, optimizer, state["optimizer"])
        for group, tuples in zip(optimizer.param_groups, betas, strict=True):
            group.update(tuples)  # saved as lists; AdamW's betas are a tuple
    elif optimizer is not None:
        optimizer.state.clear()


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (the checkpoint folder is damaged, or was saved "
                                "without this part)") from None
    except Exception as e:  # a truncated zip, a pickle that is not weights-only...: all the same to the caller
        raise UserError(f"{path}: not readable with torch.load(weights_only=True) ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- RNG streams and processes

def rng_state() -> dict:
    """Every random stream a training loop draws from (dropout, data order, augmentation), as plain values.

    Python's and numpy's states become lists and numbers, so `torch.load(weights_only=True)` reads them.
    CUDA's states are read only when CUDA is already initialised: reading them would otherwise start CUDA.
    """
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": [version, list(internal), gauss],
        "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (CUDA's streams on as many devices as both runs have)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_file(rank: int, world: int) -> str:
    """Each process has its own streams (different dropout masks on each rank), so each saves its own."""
    return "rng.pt" if world == 1 else f"rng-rank{rank}.pt"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_resume", "checkpoint_dir",
           "is_complete", "rng_state", "set_rng_state"]
