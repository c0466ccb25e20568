"""Checkpoint loading: minitune.load_model against transformers' from_pretrained, time and memory.

    python benchmarks/bench_load.py --out benchmarks/out
    python benchmarks/bench_load.py --loaders minitune-nf4,transformers-nf4 --modes cold --out benchmarks/out/nf4

Writes (once, then reuses) a synthetic sharded Mistral-architecture checkpoint of about 1.5 GB in
bf16 with random weights under --work, then loads it with dtype=bfloat16 on the CPU in fresh
subprocesses, one per measurement, so that each peak is the load's own. Each child reports:

- the import time (torch + the loader's library), apart from the load time;
- the wall time of the load call alone;
- the time to touch every weight once after it (a sum per tensor). transformers 5 leaves the
  weights in the mmap'd files and reads them on first use, so "load + touch" is the time to a
  model whose weights are all in memory;
- the peak RSS of the load, and of load + touch, as the increase over the RSS right before the
  load (after the imports: torch alone is hundreds of MB), read from VmHWM after resetting it
  (/proc/self/clear_refs); and the whole-process peak (getrusage ru_maxrss);
- the peak a 5 ms background sampler saw, split into anonymous memory (the process's own tensors)
  and file-backed pages (mmap'd checkpoint pages it touched: counted in RSS while mapped, shared
  with the page cache, which the kernel may reclaim);
- a check that one tensor of the loaded model equals the file's (so we time a real load).

Two modes per loader: "cold" is the first load in a fresh process, as a script sees it; "primed"
loads a tiny checkpoint of the same architecture first, so the lazy imports both libraries do on
their first load (torch._dynamo, sympy, transformers' modeling modules) are paid before the timed
load, which then measures the reading of the weights.

The page cache matters: a file's first read comes from the disk, later ones from memory. Every
file is read once to nowhere before the timed runs and before each run, so all loaders read
from a warm page cache; the runs alternate between the loaders.

Loaders with "-nf4" load the same bf16 checkpoint with the decoder blocks' linear layers quantized to
4-bit NF4 as they stream in (QLoRA's base model): minitune-nf4 is minitune.load_model(dir,
dtype=bfloat16, quantize="nf4"), transformers-nf4 from_pretrained(dir, dtype=bfloat16,
device_map="cpu", quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization,
bf16 compute)) on bitsandbytes' CPU backend. Their check dequantizes the loaded k_proj weight and compares
it with the same library's quantization of the file's tensor (bit for bit); the touch reads the 4-bit
tensors too. Goal: minitune-nf4's peak at most 0.45x the checkpoint's size. On this checkpoint the
embeddings and head (262 MB in bf16, never quantized) are 17% of the bytes; the quantized layers keep
4.127 of their 16 bits, so a loaded model is 0.39x the checkpoint (Mistral-7B's would be 0.28x).

Writes <out>/bench_load.json and <out>/bench_load.md. GB is 10**9 bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# The /proc readers of minitune/profiling.py, loaded by path: importing the package would import torch,
# whose import time the children measure.
_spec = importlib.util.spec_from_file_location("minitune_profiling", ROOT / "minitune" / "profiling.py")
profiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profiling)
proc_status, reset_peak = profiling.proc_status, profiling.reset_peak

# About 1.52 GB in bf16: Mistral layout (GQA 32/8 heads, SwiGLU), TinyLlama-like widths, 14 layers.
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=14,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
              sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
TINY = dict(CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
SHARD_SIZE = "500MB"
SEED = 0
CHECK_KEY = "model.layers.0.self_attn.k_proj.weight"  # small, so reading it back costs nothing
GOAL_PEAK_RATIO = 1.3
GOAL_NF4_PEAK_RATIO = 0.45  # loading with quantize="nf4"
NF4_BLOCKSIZE = 64
PAGE = os.sysconf("SC_PAGE_SIZE")
MODES = ("cold", "primed")


# ---------------------------------------------------------------- memory readings (Linux)

def rss_split() -> tuple[int, int]:
    """(anonymous, file-backed + shared) resident bytes."""
    s = proc_status()
    return s["RssAnon"], s["RssFile"] + s.get("RssShmem", 0)


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Sampler(threading.Thread):
    """Peak RSS (total, anonymous, file-backed) every `interval` seconds until stopped."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.peak = self.peak_anon = self.peak_file = self.samples = 0

    def sample(self) -> None:
        anon, file = rss_split()
        self.peak = max(self.peak, anon + file)
        self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------- the synthetic checkpoints

def checkpoint_files(folder: Path) -> list[Path]:
    """minitune.hub.checkpoint_files without importing minitune: this process must not import torch
    (its RSS would pass to the children, and the children time their own imports)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint_files(folder))


def checkpoint_ready(folder: Path, spec: dict) -> bool:
    try:
        done = json.loads((folder / "bench_complete.json").read_text())
        return (done.get("spec") == spec and all(p.exists() for p in checkpoint_files(folder))
                and checkpoint_bytes(folder) == done.get("bytes"))
    except (OSError, ValueError, KeyError):
        return False


def write_checkpoint(folder: Path, config: dict, shard_size: str) -> None:
    """Random bf16 weights in the transformers layout, holding one copy of the model at most."""
    import torch
    from minitune.models import Mistral, MistralConfig

    with torch.device("meta"):
        model = Mistral(MistralConfig(**config))
    model.to(dtype=torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: one copy at most
    torch.manual_seed(SEED)
    model.init_weights()  # in place
    model.save_pretrained(str(folder), max_shard_size=shard_size)


def ensure_checkpoint(folder: Path, config: dict, shard_size: str, timeout: float) -> None:
    """Write the checkpoint unless a complete one with the same spec is there. The writing runs in a
    child process: a parent that once held the model would pass its peak RSS on to every child it
    starts (Linux carries ru_maxrss across fork and exec)."""
    spec = {"config": config, "shard_size": shard_size, "seed": SEED, "init": "init_weights"}
    if checkpoint_ready(folder, spec):
        print(f"reusing {folder} ({checkpoint_bytes(folder) / 1e9:.3f} GB)")
        return
    (folder / "bench_complete.json").unlink(missing_ok=True)
    print(f"writing a synthetic checkpoint to {folder} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "write", "--dir", str(folder),
                    "--spec", json.dumps(spec)], check=True, env=child_env(), timeout=timeout)
    size = checkpoint_bytes(folder)
    (folder / "bench_complete.json").write_text(json.dumps({"spec": spec, "bytes": size}, indent=2) + "\n")
    print(f"wrote {len(checkpoint_files(folder))} file(s), {size / 1e9:.3f} GB, in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def warm_page_cache(folder: Path) -> float:
    """Read every checkpoint file once (to nowhere), so later reads come from the page cache."""
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for p in checkpoint_files(folder):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------- one measurement, in a child process

def make_loader(loader: str):
    """(load function, seconds its imports took)."""
    t0 = time.perf_counter()
    import torch
    if loader in ("minitune", "minitune-nf4"):
        import minitune
        quantize = "nf4" if loader.endswith("-nf4") else None

        def load(path):
            return minitune.load_model(path, dtype=torch.bfloat16, quantize=quantize)
    elif loader == "transformers":
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

        def load(path):
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif loader == "transformers-nf4":
        import bitsandbytes  # noqa: F401  imported here, so that its import is in the import time
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)

        def load(path):
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu",
                                                                     quantization_config=config)
    else:  # an experiment: a .py file with load(path, dtype)
        import importlib.util
        spec = importlib.util.spec_from_file_location("bench_extra_loader", loader)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        def load(path):
            return module.load(path, dtype=torch.bfloat16)
    return load, time.perf_counter() - t0


def child_measure(loader: str, folder: Path, prime: Path | None) -> dict:
    import gc

    load, import_s = make_loader(loader)
    import torch
    prime_s = None
    if prime is not None:
        t = time.perf_counter()
        del_me = load(prime)
        prime_s = time.perf_counter() - t
        del del_me
    gc.collect()

    base = proc_status()
    base_anon, base_file = rss_split()
    peak_reset = reset_peak()
    maxrss_before = maxrss_bytes()
    sampler = Sampler()
    sampler.start()
    t1 = time.perf_counter()
    model = load(folder)
    load_s = time.perf_counter() - t1
    sampler.stop()
    after_load = proc_status()
    maxrss_load = maxrss_bytes()
    anon_load, file_load = rss_split()

    # touch every weight once: for a lazily mapped model this is where the bytes are read (4-bit ones included;
    # amax, not sum, which would copy packed uint8 bytes into int64 first: 8x their size, torch's, not the loader's)
    t2 = time.perf_counter()
    with torch.no_grad():
        for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
            t.amax()
    touch_s = time.perf_counter() - t2
    after_touch = proc_status()
    anon_touch, file_touch = rss_split()

    from safetensors import safe_open
    index_file = folder / "model.safetensors.index.json"
    file = index_file.parent / json.loads(index_file.read_text())["weight_map"][CHECK_KEY] \
        if index_file.exists() else folder / "model.safetensors"
    with safe_open(file, framework="pt") as f:
        ref = f.get_tensor(CHECK_KEY)
    if loader.endswith("-nf4"):  # the loaded 4-bit weight, dequantized, against the same library's quantization
        got, ref = nf4_check_tensors(loader, model, ref)
    else:
        got = model.state_dict()[CHECK_KEY]
    ok = bool(got.dtype == ref.dtype and torch.equal(got, ref))

    if peak_reset:
        peak_load, peak_touch = after_load["VmHWM"], after_touch["VmHWM"]
    else:  # ru_maxrss: also counts the imports' peak, so only an upper bound of the load's
        peak_load, peak_touch = maxrss_load, maxrss_bytes()
    b = base["VmRSS"]
    return {
        "loader": loader, "mode": "primed" if prime is not None else "cold", "import_s": import_s,
        "prime_s": prime_s, "load_s": load_s, "touch_s": touch_s, "load_touch_s": load_s + touch_s,
        "baseline_rss": b, "peak_source": "VmHWM after clear_refs" if peak_reset else "ru_maxrss",
        "peak_increase_load": peak_load - b, "peak_increase_touch": peak_touch - b,
        "process_peak_ru_maxrss": maxrss_bytes(), "ru_maxrss_before_load": maxrss_before,
        "sampled_peak_increase": sampler.peak - b, "samples": sampler.samples,
        "sampled_peak_anon_increase": sampler.peak_anon - base_anon,
        "sampled_peak_file_increase": sampler.peak_file - base_file,
        "after_load_anon_increase": anon_load - base_anon, "after_load_file_increase": file_load - base_file,
        "after_touch_anon_increase": anon_touch - base_anon, "after_touch_file_increase": file_touch - base_file,
        "check_key": CHECK_KEY, "check_sum_model": float(got.double().sum()),
        "check_sum_file": float(ref.double().sum()), "check_ok": ok,
        "n_params": count_values(model), "param_dtype": str(got.dtype),
    }


def nf4_check_tensors(loader: str, model, ref):
    """(the loaded CHECK_KEY weight dequantized, the file's tensor quantized and dequantized by the same library)."""
    import torch
    layer = model.get_submodule(CHECK_KEY.removesuffix(".weight"))
    if loader == "minitune-nf4":
        from minitune.quant import quantize_nf4
        return layer.weight.dequantize(torch.bfloat16), quantize_nf4(ref, NF4_BLOCKSIZE).dequantize(torch.bfloat16)
    import bitsandbytes.functional as bnb_functional
    packed, state = bnb_functional.quantize_4bit(ref, blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                                 quant_type="nf4")
    got = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return got, bnb_functional.dequantize_4bit(packed, state)


def count_values(model) -> int:
    """Parameters, a 4-bit weight counted by its values (minitune's NF4Weight: a module of codes and state;
    bitsandbytes' Params4bit: packed bytes whose quant_state has the shape)."""
    import math
    nf4 = [m for m in model.modules() if type(m).__name__ == "NF4Weight"]
    inside = {id(t) for m in nf4 for t in (*m.parameters(), *m.buffers())}
    total = sum(m.numel() for m in nf4)
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) not in inside:
            state = getattr(p, "quant_state", None)
            total += math.prod(state.shape) if state is not None else p.numel()
    return total


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                TOKENIZERS_PARALLELISM="false")


def run_child(loader: str, folder: Path, prime: Path | None, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "measure", "--loader", loader,
           "--dir", str(folder)] + (["--prime", str(prime)] if prime else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{loader} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---------------------------------------------------------------- report

def machine() -> dict:
    def first(path: str, prefix: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    mem = first("/proc/meminfo", "MemTotal")
    return {"cpu": first("/proc/cpuinfo", "model name"), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)),
            "ram_gb": round(int(mem.split()[0]) * 1024 / 1e9, 1) if mem != "unknown" else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": version("torch"), "transformers": version("transformers"),
            "safetensors": version("safetensors")}


def summarize(runs: list[dict], ckpt: int) -> dict:
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    top = lambda k: max(r[k] for r in runs)  # noqa: E731
    return {
        "runs": len(runs), "load_s_median": med("load_s"), "load_s_all": [r["load_s"] for r in runs],
        "import_s_median": med("import_s"), "touch_s_median": med("touch_s"),
        "load_touch_s_median": med("load_touch_s"),
        "peak_increase_load_max": top("peak_increase_load"), "peak_ratio_load": top("peak_increase_load") / ckpt,
        "peak_increase_touch_max": top("peak_increase_touch"),
        "peak_ratio_touch": top("peak_increase_touch") / ckpt,
        "sampled_peak_anon_increase_max": top("sampled_peak_anon_increase"),
        "sampled_peak_file_increase_max": top("sampled_peak_file_increase"),
        "after_touch_anon_increase_max": top("after_touch_anon_increase"),
        "after_touch_file_increase_max": top("after_touch_file_increase"),
        "process_peak_max": top("process_peak_ru_maxrss"), "baseline_rss_median": med("baseline_rss"),
        "peak_source": runs[0]["peak_source"], "check_ok": all(r["check_ok"] for r in runs),
    }


def goals(summary: dict) -> dict:
    m, t = summary.get("minitune", {}), summary.get("transformers", {})
    out = {}
    if q := summary.get("minitune-nf4"):
        ratio = max(q[mode]["peak_ratio_touch"] for mode in q)
        out["nf4_peak_ratio"] = ratio
        out["nf4_peak_within_0.45x"] = ratio <= GOAL_NF4_PEAK_RATIO
    if "cold" in m:
        ratio = max(m[mode]["peak_ratio_touch"] for mode in m)
        out["peak_ratio"] = ratio
        out["peak_within_1.3x"] = ratio <= GOAL_PEAK_RATIO
    for mode in MODES:
        if mode in m and mode in t:
            out[f"time_ratio_{mode}"] = m[mode]["load_s_median"] / t[mode]["load_s_median"]
            out[f"time_ratio_{mode}_with_touch"] = m[mode]["load_touch_s_median"] / t[mode]["load_touch_s_median"]
    if "time_ratio_cold" in out:
        out["not_slower_than_transformers"] = out["time_ratio_cold"] <= 1.0
    return out


def markdown(result: dict) -> str:
    m, ckpt, s, g = result["machine"], result["checkpoint_bytes"], result["summary"], result["goals"]
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = [
        "# Checkpoint loading: minitune vs transformers",
        "",
        f"Synthetic Mistral-architecture checkpoint, bf16, {result['n_shards']} file(s) "
        f"(max_shard_size {result['shard_size']}, largest {result['largest_file_bytes'] / 1e9:.2f} GB), "
        f"**{ckpt:,} bytes ({ckpt / 1e9:.3f} GB)**, {result['n_params']:,} parameters, loaded with "
        f"dtype=bfloat16 on the CPU. One fresh process per measurement, {result['repeats']} per loader and "
        "mode, alternating; times are medians, memory the maximum over the runs. **Page cache warm**: every "
        "file was read once before the timed runs and before each run, so no loader reads from the disk.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gb']} GB RAM; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"safetensors {m['safetensors']}.",
        "",
        "| loader | mode | load s | + touch s | import s | peak +GB (load) | x ckpt | peak +GB (load+touch) "
        "| x ckpt | peak anon / file-backed +GB | after touch anon / file +GB | process peak GB | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, by_mode in s.items():
        for mode, r in by_mode.items():
            lines.append(
                f"| {name} | {mode} | {r['load_s_median']:.2f} | {r['load_touch_s_median']:.2f} | "
                f"{r['import_s_median']:.2f} | {gb(r['peak_increase_load_max'])} | {r['peak_ratio_load']:.2f}x | "
                f"{gb(r['peak_increase_touch_max'])} | {r['peak_ratio_touch']:.2f}x | "
                f"{gb(r['sampled_peak_anon_increase_max'])} / {gb(r['sampled_peak_file_increase_max'])} | "
                f"{gb(r['after_touch_anon_increase_max'])} / {gb(r['after_touch_file_increase_max'])} | "
                f"{gb(r['process_peak_max'])} | {'ok' if r['check_ok'] else 'MISMATCH'} |")
    lines += [
        "",
        "- load s: the load call alone (median). + touch s: load, then one read of every weight "
        "(transformers keeps the weights as views of the mmap'd files, read on first use).",
        "- loaders ending in -nf4: the decoder blocks' linear layers quantized to NF4 as they load (minitune: "
        "`quantize=\"nf4\"`; transformers: bitsandbytes' BitsAndBytesConfig, nf4, double quantization, on its CPU "
        "backend); their check compares the loaded weight, dequantized, with the library's own quantization of "
        "the file's tensor.",
        "- cold: first load in a fresh process. primed: a tiny checkpoint of the same architecture was "
        "loaded first in the same process, so one-time lazy imports are not in the timed load.",
        f"- peak +GB: the peak RSS ({next(iter(next(iter(s.values())).values()))['peak_source']}) minus the "
        "RSS right before the load, after the imports. anon = the process's own memory; file-backed = "
        "mmap'd checkpoint pages, counted in RSS while mapped, shared with the page cache. process peak: "
        "ru_maxrss of the whole process, imports included.",
        "- all load times (s): " + "; ".join(
            f"{n} {mode} " + ", ".join(f"{t:.2f}" for t in r["load_s_all"])
            for n, by_mode in s.items() for mode, r in by_mode.items()),
        "",
    ]
    if "peak_within_1.3x" in g:
        lines += ["## Goals", "",
                  f"- peak memory within {GOAL_PEAK_RATIO}x the checkpoint size: minitune {g['peak_ratio']:.2f}x "
                  f"(worst run, load + touch) -> **{'met' if g['peak_within_1.3x'] else 'NOT met'}**"]
    if "not_slower_than_transformers" in g:
        mt, tf = s["minitune"]["cold"], s["transformers"]["cold"]
        lines.append(f"- load time no slower than transformers (cold, load call): minitune "
                     f"{mt['load_s_median']:.2f} s vs transformers {tf['load_s_median']:.2f} s "
                     f"({g['time_ratio_cold']:.2f}x) -> **{'met' if g['not_slower_than_transformers'] else 'NOT met'}**")
        lines.append("- for reference, minitune / transformers time ratios: " + ", ".join(
            f"{k.removeprefix('time_ratio_').replace('_', ' ')} {v:.2f}x"
            for k, v in g.items() if k.startswith("time_ratio_")))
    if "nf4_peak_within_0.45x" in g:
        if "## Goals" not in lines:
            lines += ["## Goals", ""]
        lines.append(f"- loading with quantize=\"nf4\": peak memory within {GOAL_NF4_PEAK_RATIO}x the (bf16) checkpoint "
                     f"size: minitune-nf4 {g['nf4_peak_ratio']:.2f}x (worst run, load + touch) -> "
                     f"**{'met' if g['nf4_peak_within_0.45x'] else 'NOT met'}**")
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out", help="where bench_load.json and bench_load.md go")
    ap.add_argument("--work", default="/tmp/minitune-bench-load", help="where the checkpoints are cached")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs per loader and mode")
    ap.add_argument("--loaders", default="minitune,transformers",
                    help="comma-separated: minitune, transformers, or a .py file with load(path, dtype)")
    ap.add_argument("--modes", default="cold,primed", help="comma-separated subset of cold,primed")
    ap.add_argument("--shard-size", default=SHARD_SIZE,
                    help="max_shard_size of the checkpoint (each size is cached in its own folder)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    ap.add_argument("--child", choices=["measure", "write"], help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--prime", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child == "write":
        spec = json.loads(args.spec)
        write_checkpoint(Path(args.dir), spec["config"], spec["shard_size"])
        return
    if args.child == "measure":
        result = child_measure(args.loader, Path(args.dir), Path(args.prime) if args.prime else None)
        print("RESULT " + json.dumps(result), flush=True)
        return

    loaders = [l for l in args.loaders.split(",") if l]
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {bad}; choose from {MODES}")
    work = Path(args.work)
    suffix = "" if args.shard_size == SHARD_SIZE else "-shard" + args.shard_size.replace(" ", "")
    folder, tiny = work / f"mistral-synthetic-bf16{suffix}", work / "mistral-tiny-bf16"
    ensure_checkpoint(folder, CONFIG, args.shard_size, args.timeout)
    if "primed" in modes:
        ensure_checkpoint(tiny, TINY, "5GB", args.timeout)
    ckpt, files = checkpoint_bytes(folder), checkpoint_files(folder)
    print(f"checkpoint: {folder}, {len(files)} shards, {ckpt:,} bytes ({ckpt / 1e9:.3f} GB)")
    print(f"page cache: every file read once to warm it ({warm_page_cache(folder):.2f} s), and again "
          "before each run: the timed loads read from memory, not from the disk", flush=True)

    runs: dict[str, dict[str, list[dict]]] = {l: {m: [] for m in modes} for l in loaders}
    for i in range(args.repeats):
        for mode in modes:
            for loader in loaders:
                warm_page_cache(folder)
                r = run_child(loader, folder, tiny if mode == "primed" else None, args.timeout)
                runs[loader][mode].append(r)
                name = Path(loader).stem if loader.endswith(".py") else loader
                print(f"  {i + 1}/{args.repeats} {name:13s} {mode:6s} load {r['load_s']:5.2f} s"
                      f" +touch {r['load_touch_s']:5.2f} s  import {r['import_s']:4.2f} s"
                      f"  peak +{r['peak_increase_load'] / 1e9:.2f} GB ({r['peak_increase_load'] / ckpt:.2f}x),"
                      f" with touch +{r['peak_increase_touch'] / 1e9:.2f} GB"
                      f" ({r['peak_increase_touch'] / ckpt:.2f}x)  sampled anon/file"
                      f" +{r['sampled_peak_anon_increase'] / 1e9:.2f}/+{r['sampled_peak_file_increase'] / 1e9:.2f}"
                      f"  check {'ok' if r['check_ok'] else 'MISMATCH'}", flush=True)

    names = {l: (Path(l).stem if l.endswith(".py") else l) for l in loaders}
    summary = {names[l]: {m: summarize(runs[l][m], ckpt) for m in modes} for l in loaders}
    command = "python benchmarks/bench_load.py " + " ".join(sys.argv[1:])
    first = runs[loaders[0]][modes[0]][0]
    result = {"command": command.strip(), "checkpoint": str(folder), "checkpoint_bytes": ckpt,
              "n_shards": len(files), "shard_size": args.shard_size,
              "largest_file_bytes": max(p.stat().st_size for p in files), "n_params": first["n_params"], "config": CONFIG,
              "repeats": args.repeats, "page_cache": "warm: every file read once before the timed runs "
              "and before each run", "machine": machine(), "summary": summary, "goals": goals(summary),
              "runs": {names[l]: runs[l] for l in loaders}}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_load.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "bench_load.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / 'bench_load.json'} and {out / 'bench_load.md'}")
    if not all(s["check_ok"] for by_mode in summary.values() for s in by_mode.values()):
        sys.exit("a loaded tensor differs from the file's: see the check columns")


if __name__ == "__main__":
    main()
