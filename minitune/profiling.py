"""Measuring memory: the peak of a block of code on CUDA or a Linux CPU, for the examples' and benchmarks' tables.

    with PeakMemory(device) as memory:
        ...  # training steps
    print(memory.peak_bytes / 1e6, "MB above the start;", memory.measure)

torch is imported where it is used, not at the top: benchmarks/bench_load.py reads memory with this file
in processes that time torch's own import.
"""

from __future__ import annotations

from pathlib import Path


def proc_status() -> dict[str, int]:
    """The memory fields of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, ...) in bytes; {} off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in lines if line.endswith(" kB"))
    return {key: int(value.split()[0]) * 1024 for key, value in fields}


def reset_peak() -> bool:
    """Set the peak resident memory (VmHWM) to the current one (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a `with` block above the memory in use when it starts (so weights loaded before are
    left out; gradients, optimizer state and activations counted). On CUDA: torch's peak allocation. On a
    Linux CPU: the process's peak resident set (VmHWM, reset at the start). After the block: `peak_bytes`,
    and `measure`, which says which of the two (or that neither worked)."""

    def __init__(self, device):
        import torch
        self.device, self.peak_bytes, self.measure = torch.device(device), 0, ""

    def __enter__(self) -> PeakMemory:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = proc_status().get("VmRSS") if reset_peak() else None
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            self.measure = "CUDA: torch.cuda.max_memory_allocated above the start"
        elif self.start is not None:
            self.peak_bytes = proc_status()["VmHWM"] - self.start
            self.measure = "CPU: peak resident memory (VmHWM) above the start"
        else:
            self.measure = "not measured (no CUDA, no /proc/self/clear_refs)"
