"""FSDP2 memory per process: a full fine-tuning step of a mid-sized Mistral on 1, 2 and 4 processes.

    python benchmarks/bench_fsdp.py --out /tmp/bench_fsdp                       # CPU: gloo, 1, 2 and 4 processes
    python benchmarks/bench_fsdp.py --device cuda --worlds 1 2 4 8 --out ...    # GPU: NCCL, one GPU per process

For each world size W the script runs itself under torchrun. Each process builds the model on the meta device
(no memory), shards it with `minitune.distributed.shard_model` (each decoder block, then the root), and only
then gives its shards storage and values (`to_empty` + `init_weights`, the FSDP2 way), so no process ever
holds the whole model. It then takes --steps AdamW steps of full fine-tuning on random tokens, the global batch
(--batch rows of --seq-len) split over the processes, float32 weights (bf16 compute on a GPU).

Reported per process (the largest over the ranks): the sharded state it holds after a step, counted exactly
(its shards of the float32 weights, their gradients and AdamW's two moments: 16 bytes a parameter / W, plus
padding), and the peak memory (CPU: the peak resident set above the process's size before the model was
built; GPU: torch.cuda.max_memory_allocated), with each one's ratio to W = 1. The sharded state falls as 1/W;
the peak falls more slowly, since activations (the same rows per process... fewer here, the global batch
being split) and one gathered block stay. Goal (issue 21): the sharded state at 1/W of W = 1's.
Writes <out>/bench_fsdp.json and <out>/bench_fsdp.md.

    torchrun --nproc_per_node=1 benchmarks/bench_fsdp.py --qlora --device cuda --out ...   # GPU: Mistral-7B shape

--qlora (issue 21's one-GPU goal): the QLoRA step of issue 19 (random Mistral-7B-shape bf16 weights made on the
machine and quantized to NF4, LoRA r=16 on every linear layer, checkpointing, bf16, 2 x 2048 tokens) taken
--steps times by the same process twice, the model built the same way each time: plain, then sharded with
FSDP2 over a world of one. Reported: each step's loss (equal within bf16 rounding), the median step time and
tokens/s, and the peak memory of each. --config tiny runs the same on a small Mistral (a CPU check).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # minitune from this checkout, installed or not

import minitune as mt  # noqa: E402
from minitune.distributed import local_state_bytes, shard_model  # noqa: E402
from minitune.optim import make_optimizer  # noqa: E402

# ~0.12 B parameters: 16 bytes each of float32 weights, gradients and AdamW moments is 1.9 GB at W = 1
CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4)


MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def worker(args) -> None:
    on_cuda = args.device == "cuda"
    dist.init_process_group("nccl" if on_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    baseline = peak_rss_bytes()
    with torch.device("meta"):
        model = mt.Mistral(mt.MistralConfig(**CONFIG))
    model.gradient_checkpointing = True
    shard_model(model, compute_dtype=torch.bfloat16 if on_cuda else None)
    model.to_empty(device=device)  # storage for this process's shards only
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    optimizer = make_optimizer(model, lr=1e-4)
    rows = args.batch // world
    generator = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        x = torch.randint(0, CONFIG["vocab_size"], (rows, args.seq_len), generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = model(x, labels=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state = local_state_bytes(model, optimizer)  # after the step: gradients and moments are all there
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else peak_rss_bytes() - baseline
    mine = {"rank": rank, "state_bytes": state, "peak_bytes": peak, "step_s": min(times), "loss": loss.item()}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        print("RESULT " + json.dumps({"world": world, "ranks": gathered}), flush=True)
    dist.destroy_process_group()


def qlora_run(config: dict, sharded: bool, device: torch.device, args) -> dict:
    """--steps QLoRA steps of a model built from seed 0 (bf16 weights, then NF4), plain or sharded."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = mt.Mistral(mt.MistralConfig(**config))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    model.to(torch.bfloat16)
    mt.quant.quantize_model(model)  # one layer at a time, on the device
    torch.manual_seed(1)
    mt.lora.apply_lora(model, r=16, alpha=32, target_modules="all-linear", verbose=False)
    model.gradient_checkpointing = True
    if sharded:
        shard_model(model, compute_dtype=torch.bfloat16)
    optimizer = make_optimizer(model, lr=1e-4)
    generator = torch.Generator().manual_seed(2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(args.steps):
        x = torch.randint(0, config["vocab_size"], (2, args.seq_len), generator=generator).to(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, labels=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a sync: the step is done
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # the median, the first step left out
    return {"sharded": sharded, "losses": losses, "step_s": step_s, "tokens_per_s": 2 * args.seq_len / step_s,
            "peak_bytes": peak}


def qlora_worker(args) -> None:
    on_cuda = args.device == "cuda"
    dist.init_process_group("nccl" if on_cuda else "gloo")
    if dist.get_world_size() != 1:
        sys.exit("bench_fsdp --qlora compares FSDP2 on one process with no FSDP: torchrun --nproc_per_node=1")
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    config = MISTRAL_7B if args.config == "mistral-7b" else TINY
    from bench_kernels import environment, environment_line
    env = environment(device, torch.bfloat16)
    runs = [qlora_run(config, sharded, device, args) for sharded in (False, True)]
    plain, fsdp = runs
    gap = max(abs(a - b) / abs(a) for a, b in zip(plain["losses"], fsdp["losses"], strict=True))
    lines = [f"QLoRA step, {args.config} shape (random weights in NF4), LoRA r=16 on every linear layer, "
             f"checkpointing, bf16, 2 x {args.seq_len} tokens, {args.steps} steps; {environment_line(env)}", "",
             "| | losses | step | tokens/s | peak |", "|---|---|---:|---:|---:|"]
    for r in runs:
        peak = f"{r['peak_bytes'] / 1e9:.2f} GB" if r["peak_bytes"] is not None else "—"
        lines.append(f"| {'FSDP2, world of one' if r['sharded'] else 'plain'} | "
                     f"{', '.join(f'{v:.6f}' for v in r['losses'])} | {r['step_s'] * 1e3:.0f} ms | "
                     f"{r['tokens_per_s']:.0f} | {peak} |")
    lines += ["", f"Largest relative loss difference: {gap:.2e}; FSDP2 / plain tokens/s: "
                  f"{fsdp['tokens_per_s'] / plain['tokens_per_s']:.3f}."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_fsdp_qlora.json").write_text(json.dumps({"environment": env, "config": config,
                                                                    "runs": runs, "loss_gap": gap}, indent=2) + "\n")
        (args.out / "bench_fsdp_qlora.md").write_text(report)
    dist.destroy_process_group()


def run_world(world: int, args) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
               "--worker", "--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"bench_fsdp: {world} process(es) failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[0].removeprefix("RESULT "))
    return {"world": world, "state_bytes": max(r["state_bytes"] for r in result["ranks"]),
            "peak_bytes": max(r["peak_bytes"] for r in result["ranks"]),
            "step_s": max(r["step_s"] for r in result["ranks"]), "losses": [r["loss"] for r in result["ranks"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 2; --qlora: 4)")
    ap.add_argument("--batch", type=int, default=4, help="rows in the global batch (a multiple of every world size)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 256; --qlora: 2048)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--qlora", action="store_true", help="under torchrun --nproc_per_node=1: QLoRA plain vs FSDP2")
    ap.add_argument("--config", default="mistral-7b", choices=("mistral-7b", "tiny"), help="--qlora's model shape")
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.qlora else 2)
    args.seq_len = args.seq_len or (2048 if args.qlora else 256)
    if args.worker:
        return worker(args)
    if args.qlora:
        return qlora_worker(args)
    if any(args.batch % w for w in args.worlds):
        ap.error(f"--batch {args.batch} must split evenly over every world size {args.worlds}")
    from bench_kernels import environment, environment_line
    device = torch.device(args.device)
    env = environment(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    params = mt.Mistral(mt.MistralConfig(**CONFIG)).num_parameters()
    results = [run_world(w, args) for w in args.worlds]
    first = results[0]
    lines = [f"Full fine-tuning of a {params / 1e6:.0f}M-parameter Mistral ({CONFIG['num_hidden_layers']} blocks of "
             f"{CONFIG['hidden_size']}), global batch {args.batch} x {args.seq_len}, {args.device}; "
             f"{environment_line(env)}", "",
             "| processes | sharded state per process | x of 1 process | 1/W | peak per process | x of 1 process "
             "| step |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['world']} | {r['state_bytes'] / 2**20:.0f} MiB | "
                     f"{r['state_bytes'] / first['state_bytes']:.3f} | "
                     f"{first['world'] / r['world']:.3f} | {r['peak_bytes'] / 2**20:.0f} MiB | "
                     f"{r['peak_bytes'] / first['peak_bytes']:.3f} | {r['step_s']:.2f} s |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        (args.out / "bench_fsdp.json").write_text(json.dumps({"environment": env, "parameters": params, "config": CONFIG,
                                                              "args": settings, "results": results},
                                                             indent=2, default=str) + "\n")
        (args.out / "bench_fsdp.md").write_text(report)


if __name__ == "__main__":
    main()
