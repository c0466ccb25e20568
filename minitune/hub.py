"""Hugging Face checkpoint files: hub id or folder -> files, safetensors in and out.

Reading fills a model that already exists (built on the meta device and allocated once by
`minitune.models.load_model`), each tensor's bytes read from the file straight into its
parameter, so the peak stays at one copy of the weights whatever the shard size. Saving writes
the layout transformers writes: config.json plus model.safetensors, or numbered shards and
model.safetensors.index.json above `max_shard_size`, every file written under a temporary name
and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import UserError
from .quant import NF4Weight, from_bnb, nf4_weights, quantize_nf4

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UMASK = os.umask(0o022)  # read once, at import (the only way to read it is to set it), and put back
os.umask(_UMASK)


# ---------------------------------------------------------------- where the files are

def resolve(name_or_path: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """A local folder as it is; else a hub id, whose files matching `allow_patterns` are fetched.

    huggingface_hub does the fetching and caching (HF_HOME, HF_HUB_CACHE, tokens); with
    HF_HUB_OFFLINE set, only the cache is read. Callers ask for the files they need and no more:
    a repo may also hold other weight formats (Mistral's consolidated.safetensors) worth many GB.
    """
    name = str(name_or_path)
    if not name.strip():
        raise UserError("name_or_path is empty: pass a local folder or a hub id like 'gpt2'")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name} is a file; pass the folder that holds {CONFIG_FILE}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such folder (and it is not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, local_files_only=offline))
    except HFValidationError as e:
        raise FileNotFoundError(f"{name}: no such folder, and not a valid hub id ({e})") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name}: no such local folder, and no such hub repo (or it is gated or "
                                "private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        where = "the hub cache (HF_HUB_OFFLINE is set)" if offline else "the hub or the cache"
        raise FileNotFoundError(f"{name}: not a local folder and not found in {where}: {e}") from None


def resolve_checkpoint(name_or_path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The folder and the safetensors files of a checkpoint, fetching only those from the hub.

    config.json and the index come first; the index (or its absence) says which weight files
    to fetch: the listed shards, or model.safetensors.
    """
    folder = resolve(name_or_path, [CONFIG_FILE, INDEX_FILE])
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_FILE}: file not found")
    names = weight_names(folder)
    folder = resolve(name_or_path, [CONFIG_FILE, INDEX_FILE, *names])
    return folder, checkpoint_files(folder, names)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None


def weight_names(folder: Path) -> list[str]:
    """The safetensors file names of a checkpoint: the shards its index lists, or model.safetensors."""
    if not (folder / INDEX_FILE).exists():
        return [SINGLE_FILE]
    index = read_json(folder / INDEX_FILE)
    if not isinstance(index.get("weight_map"), dict):
        raise UserError(f"{folder / INDEX_FILE}: no 'weight_map' object")
    return list(dict.fromkeys(index["weight_map"].values()))


def checkpoint_files(folder: Path, names: list[str] | None = None) -> list[Path]:
    """The safetensors files of a checkpoint (`names`, or those `weight_names` finds), all present."""
    names = names if names is not None else weight_names(folder)
    missing = [name for name in names if not (folder / name).exists()]
    if missing == [SINGLE_FILE] and names == [SINGLE_FILE]:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(others)}: minitune reads only safetensors)" if others else ""
        raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]}: shard listed in {INDEX_FILE} is missing")
    return [folder / name for name in names]


# ---------------------------------------------------------------- loading

def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}.get(dtype, dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"dtype {dtype!r}: expected a floating type such as 'float32' or 'bfloat16'")
    return value


def stored_dtype(raw_config: dict, headers: dict[Path, dict[str, "TensorEntry"]]) -> torch.dtype:
    """The dtype the weights were saved in: config.json's dtype, else the first float tensor's."""
    declared = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if declared and declared != "auto":
        return parse_dtype(declared)
    entries = (e for header in headers.values() for e in header.values())
    return next((e.dtype for e in entries if e.dtype.is_floating_point), torch.float32)


# A safetensors file is an 8-byte little-endian header length, a JSON header mapping each name
# to {"dtype", "shape", "data_offsets": [start, end]} (relative to the end of the header), then
# the raw bytes, little-endian. Reading it by hand lets a tensor's bytes go straight into the
# parameter that will hold them: no mapped file kept resident, no intermediate copy.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class TensorEntry:
    dtype: torch.dtype
    shape: list[int]
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, by name, checked as safetensors itself checks them.

    Every entry must be well formed and the entries must tile the data section exactly (no
    overlap, no gap), so that a damaged file fails here, naming the file and the tensor.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise UserError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    entries = {key: _entry(path, key, info, data_start=8 + n) for key, info in header.items()}
    end = 8 + n
    for key, e in sorted(entries.items(), key=lambda item: item[1].offset):
        if e.offset != end:
            raise UserError(f"{path}: tensor {key!r} starts at byte {e.offset - 8 - n} of the data, expected "
                            f"{end - 8 - n} (tensors overlap or leave a gap)")
        end += e.nbytes
    if end != size:
        raise UserError(f"{path}: the tensors end at byte {end} but the file has {size} (truncated?)")
    return entries


def _entry(path: Path, key: str, info, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise UserError(f"{where}: dtype {dtype!r} is not one minitune reads ({', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise UserError(f"{where}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{where}: data_offsets {offsets!r} are not [start, end]")
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise UserError(f"{where}: {nbytes} bytes for shape {shape} in {info['dtype']}")
    return TensorEntry(dtype, shape, data_start + offsets[0], nbytes)


def read_into(path: Path, entry: TensorEntry, out: torch.Tensor) -> None:
    """Read one tensor's bytes from the file into `out`, a contiguous CPU tensor of its size."""
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:  # one handle per call: reads run in parallel threads
        f.seek(entry.offset)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(buffer[done:])
            if not got:
                raise UserError(f"{path}: file ends inside a tensor (truncated?)")
            done += got


def mapped(path: Path, entry: TensorEntry) -> torch.Tensor:
    """One tensor of a safetensors file as a CPU tensor over the file's pages (copy-on-write, never written
    back): no heap copy, and its pages leave the process when the tensor does."""
    pages = np.memmap(path, dtype=np.uint8, mode="c", offset=entry.offset, shape=(entry.nbytes,))
    return torch.from_numpy(pages).view(entry.dtype).view(entry.shape)


def load_state(model, headers: dict[Path, dict[str, TensorEntry]], threads: int = 4) -> None:
    """Fill the model's parameters from checkpoint files (their `read_header`s), each tensor read
    straight into place.

    When the stored dtype and layout are the model's and the parameter is on the CPU, the bytes
    land in the parameter itself; otherwise (a dtype cast, GPT-2's transposed Conv1D, a GPU)
    through one tensor-sized buffer. Reads run in a few threads (file reads release the GIL).
    Raises one error listing every missing, duplicated, unexpected or mis-shaped tensor.

    A tied head follows transformers: a checkpoint without lm_head.weight uses the embedding;
    one that stores a head equal to the embedding stays tied; one whose head differs is untied
    (with a warning), and a head stored without the embedding fills the shared matrix.
    """
    jobs: dict[str, tuple[Path, TensorEntry, str]] = {}  # our key -> (file, entry, hub key)
    problems = []
    ignored = re.compile("|".join(model.ignored_checkpoint_keys) or r"(?!)")
    files = list(headers)
    for path, header in headers.items():
        for key, entry in header.items():
            ours = model.key_from_checkpoint(key)
            if ignored.search(key):
                continue
            if ours in jobs:
                problems.append(f"tensor {key!r} is stored twice: in {jobs[ours][0].name} and {path.name}")
            jobs[ours] = (path, entry, key)

    quantized = nf4_weights(model)  # NF4 layers: filled from a bitsandbytes 4-bit checkpoint, or quantized here
    quantized_parts: dict[str, dict[str, tuple[Path, TensorEntry, str]]] = {name: {} for name in quantized}
    for ours in list(jobs):
        if (found := quantized_part(ours, quantized)) is not None:
            name, part = found
            quantized_parts[name][part] = jobs.pop(ours)

    embed_key = next(k for k, p in model.named_parameters() if p is model.input_embeddings().weight)
    untie_to_compare = model.head_is_tied and "lm_head.weight" in jobs and embed_key in jobs
    if untie_to_compare:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    elif model.head_is_tied and "lm_head.weight" in jobs:
        jobs[embed_key] = jobs.pop("lm_head.weight")  # only the head stored: it is the shared matrix
    targets = {k: v for k, v in model.state_dict().items() if quantized_part(k, quantized) is None}
    if model.head_is_tied:
        del targets["lm_head.weight"]
    for name, parts in quantized_parts.items():
        if "" not in parts:
            problems.append(f"missing tensor {name!r} (in none of {', '.join(p.name for p in files)})")
        elif not is_4bit(parts) and parts[""][1].shape != list(quantized[name].shape):
            path, entry, key = parts[""]
            problems.append(f"{path.name}: tensor {key!r} has shape {entry.shape}, the model expects "
                            f"{list(quantized[name].shape)}")

    for ours, (path, entry, key) in list(jobs.items()):
        if ours not in targets:
            problems.append(f"{path.name}: unexpected tensor {key!r}")
            del jobs[ours]
            continue
        want = list(model.tensor_from_checkpoint(ours, torch.empty(targets[ours].shape, device="meta")).shape)
        if entry.shape != want:
            problems.append(f"{path.name}: tensor {key!r} has shape {entry.shape}, the model expects {want}")
    problems += [f"missing tensor {k!r} (in none of {', '.join(p.name for p in files)})"
                 for k in sorted(set(targets) - set(jobs))]
    if problems:
        raise mismatch(f"checkpoint in {files[0].parent}", model, problems)

    def load_one(ours: str) -> None:
        path, entry, _ = jobs[ours]
        target = targets[ours]
        probe = torch.empty(2, 3, device="meta")  # does the family change this tensor's layout?
        as_stored = model.tensor_from_checkpoint(ours, probe) is probe and entry.dtype == target.dtype
        if as_stored and target.device.type == "cpu" and target.is_contiguous():
            read_into(path, entry, target)
            return
        buffer = torch.empty(entry.shape, dtype=entry.dtype)
        read_into(path, entry, buffer)
        with torch.no_grad():
            target.copy_(model.tensor_from_checkpoint(ours, buffer))

    device, dtype = model.input_embeddings().weight.device, model.input_embeddings().weight.dtype

    def load_quantized(name: str) -> None:
        """One NF4 layer: its bitsandbytes tensors read as they are, or its dense weight cast to the model's
        dtype on its device and quantized there, a chunk at a time, from the file's pages: no weight-sized
        buffer on the heap, whose freed blocks the allocator would keep."""
        path, entry, key = quantized_parts[name][""]
        weight, where = quantized[name], f"{path.name}: {key}"
        if is_4bit(quantized_parts[name]):  # the bytes may be stored as another dtype (bnb_4bit_quant_storage)
            parts = {}
            for part, (part_path, part_entry, _) in quantized_parts[name].items():
                parts[part] = torch.empty(part_entry.shape, dtype=part_entry.dtype)
                read_into(part_path, part_entry, parts[part])
            loaded = from_bnb({part: t.to(device) for part, t in parts.items()}, where=where)
            if loaded.shape != weight.shape:
                raise UserError(f"{where}: its quant state gives shape {list(loaded.shape)}, the model expects "
                                f"{list(weight.shape)}")
        else:  # a dense weight (its shape checked above)
            dense = model.tensor_from_checkpoint(name, mapped(path, entry)).to(device=device, dtype=dtype)
            try:
                loaded = quantize_nf4(dense, weight.blocksize, weight.double_quant)
            except UserError as e:  # a NaN or inf in it
                raise UserError(f"{where}: {e}") from None
            del dense  # unmaps the pages
        weight.set_(loaded)
        weight.dtype = dtype  # what dequantize() gives by default, and what a merged save writes

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(load_one, jobs))  # list() re-raises a worker's error here
    for name in quantized:  # one at a time: the peak is the 4-bit model plus one weight's pages and chunks
        load_quantized(name)

    if untie_to_compare:
        if torch.equal(model.lm_head.weight, model.input_embeddings().weight):
            model.tie_weights()  # the stored head was a copy: share one matrix again
        else:
            warnings.warn(f"{files[0].parent}: config.json ties lm_head to the embedding, but the checkpoint "
                          "stores a different lm_head.weight; using it untied, as transformers does", stacklevel=3)
            model.config.tie_word_embeddings = False


QUANTIZED_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                   "quant_state.bitsandbytes__fp4")  # bitsandbytes' entries beside a 4-bit weight


def quantized_part(key: str, quantized: dict[str, NF4Weight]) -> tuple[str, str] | None:
    """(weight key, part) when `key` is an NF4 weight ("" part) or one of its bitsandbytes entries; else None."""
    if key in quantized:
        return key, ""
    for part in QUANTIZED_PARTS:
        if key.endswith("." + part) and key[:-len(part) - 1] in quantized:
            return key[:-len(part) - 1], part
    return None


def is_4bit(parts: dict) -> bool:
    """Whether one layer's checkpoint entries (by part: "", "absmax", ...) are bitsandbytes' 4-bit state, not a
    dense weight to quantize: a 4-bit weight always has its quant state beside it."""
    return any(part.startswith("quant_state.bitsandbytes__") for part in parts)


def stored_4bit(headers: dict[Path, dict[str, TensorEntry]]) -> list[str]:
    """The keys of the weights a checkpoint stores in bitsandbytes' 4-bit format (those with a quant state)."""
    marks = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
    return [key.rsplit(".quant_state.", 1)[0] for header in headers.values() for key in header if key.endswith(marks)]


def mismatch(what: str, model, problems: list[str]) -> UserError:
    """One line for weights that do not fit a model: the first three problems of each kind (a shape, a missing
    tensor, an unexpected one...) and how many more of that kind there are."""
    kinds: dict[str, list[str]] = {}
    for problem in problems:
        head = problem.split("'")[0]  # the words before the first tensor name
        kind = next((k for k in ("missing", "unexpected") if k in head), "has shape" if "has shape" in problem else "")
        kinds.setdefault(kind, []).append(problem)
    shown = "; ".join("; ".join(found[:3]) + (f" (and {len(found) - 3} more like it)" if len(found) > 3 else "")
                      for found in kinds.values())
    return UserError(f"{what} does not match {type(model).__name__}: {shown}")


# ---------------------------------------------------------------- saving

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB' or '2GiB' (GB = 10**9, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise UserError(f"max_shard_size {size!r}: expected bytes or a size like '5GB'")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(float(m.group(1)) * units[m.group(2) or "B"])


def shard_state(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in key order into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    return shards + [current]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the mode every other file gets from the umask (0644 under the usual 022):
    save_file itself creates its file 0600, readable by its owner only."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_UMASK)


def save_model(model, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
               state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + safetensors in the Hugging Face layout, loadable by transformers.

    A model with NF4 layers is written as transformers writes a bitsandbytes 4-bit model (its config
    says so). `state`, when given, is written instead of the model's own tensors: a plain checkpoint
    (mt.quant.dequantized_state), so its config says nothing of quantization."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own = state is None
    state = {k: v.detach() for k, v in (model.checkpoint_state() if own else state).items()}  # views: no copies yet
    shards = shard_state(state, parse_size(max_shard_size))
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    config = model.config.to_dict()
    if not own:
        config.pop("quantization_config", None)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config["tie_word_embeddings"] = model.head_is_tied  # what the files hold, even if a user (un)tied it

    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-save-") as tmp:
        tmp = Path(tmp)
        for name, shard in zip(names, shards, strict=True):
            # one shard at a time on the CPU, made contiguous (GPT-2's transposed views) only here
            save_safetensors({k: v.to("cpu").contiguous() for k, v in shard.items()}, tmp / name, {"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Remove what a previous save left that this one does not replace, then move files in
        # (weights before the index and config, so a reader never sees an index without its shards).
        stale = [p for p in out.iterdir() if _SHARD_NAME.match(p.name) and p.name not in names]
        if len(shards) > 1:
            stale += [p for p in [out / SINGLE_FILE] if p.exists()]
        else:
            stale += [p for p in [out / INDEX_FILE] if p.exists()]
        for p in stale:
            p.unlink()
        for name in names + ([INDEX_FILE] if len(shards) > 1 else []) + [CONFIG_FILE]:
            os.replace(tmp / name, out / name)

