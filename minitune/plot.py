"""Charts of a run's metrics.jsonl, as PNG files beside it. matplotlib is optional: without it, no chart."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


LOSSES = ("loss (nats per target token)", ("loss", "val_loss"), None)
SHARES = ("share", ("val_exact_match", "val_token_acc"), (0, 1))


def plot_training(metrics: Sequence[dict], path: str | Path, title: str = "",
                  panels: Sequence[tuple] = (LOSSES, SHARES)) -> Path | None:
    """One panel per (y label, metric names, y limits or None): by default training loss per step with the
    validation loss at each evaluation, and validation exact match and token accuracy. A panel with none
    of its metrics logged is left out. Returns the PNG's path, or None without matplotlib."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    panels = [panel for panel in panels if any(key in m for m in metrics for key in panel[1])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, keys, ylim) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if key != "loss" else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_comparison(results: dict[str, dict[str, tuple[float, float, float]]], path: str | Path, title: str = "",
                    metrics: Sequence[str] | None = None, baseline: float | None = None) -> Path | None:
    """A grouped bar chart: one group per metric, one bar per model (or pair of models: their differences), each
    with its interval as an error bar, and a line at `baseline` (0 for differences) when given.
    results: {model: {metric: (value, low, high)}}. Returns the PNG's path, or None without matplotlib."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    models = list(results)
    metrics = list(metrics or next(iter(results.values())))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics)), 4))
    for i, model in enumerate(models):
        values = [results[model][m][0] for m in metrics]
        errors = [[max(v - results[model][m][1], 0) for v, m in zip(values, metrics, strict=True)],  # an interval
                  [max(results[model][m][2] - v, 0) for v, m in zip(values, metrics, strict=True)]]  # may miss v
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=model_label(model))
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG (its folder made if need be) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def model_label(name_or_path: str) -> str:
    """A short name for a model in a legend: a hub id as it is, a folder by its name, or by its parent's for the
    examples' output folders (runs/sft/final -> sft/final)."""
    path = Path(name_or_path)
    if not path.exists():
        return str(name_or_path)
    return "/".join(path.parts[-2:]) if path.name == "final" else path.name
