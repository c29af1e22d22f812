"""PNG plots of results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def plot_seen_accuracy(
    curves: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
    spread: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Accuracy on all classes seen so far after each task, one line per method (± spread)."""
    figure, axes = plt.subplots(figsize=(7.6, 4.2))
    palette = matplotlib.colormaps["tab20"]
    colours = [palette(i) for i in range(palette.N)]
    for index, (name, values) in enumerate(curves.items()):
        tasks = list(range(1, len(values) + 1))
        percent = [100 * v for v in values]
        first_ten = index < len(colours) // 2
        colour = colours[2 * index] if first_ten else colours[2 * (index - 10) + 1]
        style = "-" if first_ten else "--"
        axes.plot(tasks, percent, style, marker="o", label=name, color=colour)
        if spread is not None and name in spread:
            low = [100 * (v - s) for v, s in zip(values, spread[name], strict=True)]
            high = [100 * (v + s) for v, s in zip(values, spread[name], strict=True)]
            axes.fill_between(tasks, low, high, alpha=0.12, color=colour)
        axes.set_xticks(tasks)
    axes.set_xlabel("task")
    axes.set_ylabel("accuracy on seen classes (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(figure, path)


def plot_accuracy_vs_bytes(
    points: Mapping[str, tuple[float, float, float]], path: Path, title: str
) -> None:
    """Final accuracy (± std) against bytes per update on a log axis, one labelled point each.

    `points` maps a label to `(bytes, accuracy, accuracy_std)`, accuracies as fractions.
    """
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for index, (label, (size, accuracy, spread)) in enumerate(points.items()):
        axes.errorbar(size / 1e3, 100 * accuracy, yerr=100 * spread, fmt="o", capsize=3)
        axes.annotate(  # labels alternate above and below so neighbours do not overlap
            label,
            (size / 1e3, 100 * accuracy),
            fontsize="x-small",
            xytext=(4, 5 if index % 2 == 0 else -11),
            textcoords="offset points",
        )
    axes.set_xscale("log")
    axes.set_xlabel("uplink per client per round (KB, log)")
    axes.set_ylabel("final accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _save(figure, path)


def plot_wire_bytes(
    cells: Mapping[str, tuple[float, float, float]], path: Path, title: str
) -> None:
    """Downlink and uplink per device per round (grouped bars, KB), final accuracy in labels.

    `cells` maps a label to `(downlink bytes, uplink bytes, final accuracy as a fraction)`.
    """
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    positions = range(len(cells))
    down = [value[0] / 1e3 for value in cells.values()]
    up = [value[1] / 1e3 for value in cells.values()]
    axes.bar([p - 0.2 for p in positions], down, width=0.4, label="downlink")
    axes.bar([p + 0.2 for p in positions], up, width=0.4, label="uplink")
    for position, (down_kb, up_kb) in zip(positions, zip(down, up, strict=True), strict=True):
        axes.annotate(f"{down_kb:.0f}", (position - 0.2, down_kb), ha="center", va="bottom")
        axes.annotate(f"{up_kb:.0f}", (position + 0.2, up_kb), ha="center", va="bottom")
    axes.set_xticks(
        list(positions),
        [f"{label}\nfinal {100 * value[2]:.1f}%" for label, value in cells.items()],
        fontsize="small",
    )
    axes.set_ylabel("KB per device per round")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3, axis="y")
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    """Lay out, write the PNG (its folder made if needed) and free the figure."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
