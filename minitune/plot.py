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


def plot_training(metrics: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Training loss per step and validation loss at each evaluation (left), validation exact match or
    token accuracy where logged (right). Returns the PNG's path, or None without matplotlib."""
    if not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, keys in ((left, ("loss", "val_loss")), (right, ("val_exact_match", "val_token_acc"))):
        for key in keys:
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if key.startswith("val") else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    left.set_ylabel("loss (nats per target token)")
    right.set_ylabel("share")
    right.set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
