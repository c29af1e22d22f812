"""PNG plots of results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_seen_accuracy(
    curves: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
    spread: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Accuracy on all classes seen so far after each task, one line per method (± spread)."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, values in curves.items():
        tasks = list(range(1, len(values) + 1))
        percent = [100 * v for v in values]
        axes.plot(tasks, percent, marker="o", label=name)
        if spread is not None and name in spread:
            low = [100 * (v - s) for v, s in zip(values, spread[name], strict=True)]
            high = [100 * (v + s) for v, s in zip(values, spread[name], strict=True)]
            axes.fill_between(tasks, low, high, alpha=0.2)
    axes.set_xlabel("task")
    axes.set_ylabel("accuracy on seen classes (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
