"""The FCIL benchmark grid: methods x seeds x settings on the same data, budget and backbone.

Used by `benchmarks/fcil.py` and `fedfmx-edge bench fcil`; the package never imports the
`benchmarks/` folder, the scripts there import this.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np

from fedfmx.config import FleetConfig, MethodName
from fedfmx.data.datasets import ImageDataset
from fedfmx.device.learner import DeviceLearner
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import (
    SimulationResult,
    initial_model,
    load_fleet_dataset,
    run_simulation,
)
from fedfmx.profiles import PeakRss

ALL_METHODS: tuple[str, ...] = get_args(MethodName)


@dataclass(frozen=True)
class Setting:
    """One data setting of the grid: non-IID strength and class misalignment."""

    alpha: float
    max_lag: int

    @property
    def label(self) -> str:
        return f"alpha={self.alpha},lag={self.max_lag}"


BENCH_FLEET: dict[str, object] = {
    "name": "fcil-fmnist",
    "data": {"dataset": "fashion_mnist"},
    "protocol": {"num_tasks": 5, "num_clients": 10, "rounds_per_task": 3},
}
"""The benchmark's base fleet (also `device_configs/fleets/fcil-fmnist.yaml`): Split
Fashion-MNIST, 5 tasks of 2 classes, 10 devices; every other value is the default."""

FULL_SETTINGS = (Setting(0.5, 0), Setting(0.5, 1), Setting(0.1, 0), Setting(0.1, 1))


@dataclass(frozen=True)
class Grid:
    methods: Sequence[str]
    seeds: Sequence[int]
    settings: Sequence[Setting]
    train_per_class: int | None
    test_per_class: int | None
    tuned: Mapping[str, Mapping[str, Mapping[str, object]]] = field(default_factory=dict)
    """Per method, the fleet sections the tuning chose (`{"fedfmx": {"fedfmx": {...}}}`)."""
    validation_fraction: float | None = None
    """Set only when tuning: evaluate on a held-out slice of the training data."""


REDUCED = Grid(ALL_METHODS, (0, 1, 2), (Setting(0.5, 1),), train_per_class=600, test_per_class=300)
FULL = Grid(ALL_METHODS, (0, 1, 2), FULL_SETTINGS, train_per_class=None, test_per_class=None)

METRICS = (
    "final_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "uplink_bytes_per_client_round",
    "downlink_bytes_per_client_round",
    "wall_time_s",
)


def bench_fleet(
    base: FleetConfig, grid: Grid, setting: Setting, method: str, seed: int
) -> FleetConfig:
    """The base fleet with this cell's method, seed, setting, data slice and tuned values."""
    document = base.model_dump() | {
        "method": method,
        "seed": seed,
        "protocol": base.protocol.model_dump()
        | {"alpha": setting.alpha, "max_lag": setting.max_lag, "lags": None},
        "data": base.data.model_dump()
        | {
            "train_per_class": grid.train_per_class,
            "test_per_class": grid.test_per_class,
            "validation_fraction": grid.validation_fraction,
        },
    }
    for section, values in grid.tuned.get(method, {}).items():
        document[section] = (document[section] or {}) | dict(values)  # `codec` may be None
    return FleetConfig.model_validate(document)


def summarise(results: Sequence[SimulationResult]) -> dict[str, object]:
    """Mean and std over seeds of every metric, and the mean seen-accuracy curve."""
    rows = [_metrics(result) for result in results]
    summary: dict[str, object] = {
        name: {
            "mean": float(np.mean([r[name] for r in rows])),
            "std": float(np.std([r[name] for r in rows])),
        }
        for name in METRICS
    }
    curves = np.array([result.seen_accuracy for result in results])
    summary["seen_accuracy_mean"] = curves.mean(axis=0).tolist()
    summary["seen_accuracy_std"] = curves.std(axis=0).tolist()
    summary["runs"] = [
        r | {"seed": result.config["seed"]} for r, result in zip(rows, results, strict=True)
    ]
    return summary


def stat(cell: Mapping[str, object], metric: str, which: str = "mean") -> float:
    """One number out of a `summarise` cell: `stat(cell, "final_accuracy", "std")`."""
    value = cell[metric]
    if not isinstance(value, Mapping):
        raise KeyError(f"{metric} is not a summarised metric")
    return float(value[which])


def _metrics(result: SimulationResult) -> dict[str, float]:
    updates = sum(r.updates for r in result.rounds)
    rounds = len(result.rounds)
    clients = int(result.config["protocol"]["num_clients"])  # type: ignore[index]
    return {
        "final_accuracy": result.final_accuracy,
        "average_incremental_accuracy": result.average_incremental_accuracy,
        "forgetting": result.forgetting,
        "uplink_bytes_per_client_round": result.uplink_bytes / updates if updates else 0.0,
        "downlink_bytes_per_client_round": result.downlink_bytes / (rounds * clients)
        if rounds
        else 0.0,
        "wall_time_s": result.wall_time_s,
    }


Progress = Callable[[str], None]
DatasetLoader = Callable[[FleetConfig], ImageDataset]


def run_grid(
    base: FleetConfig,
    grid: Grid,
    progress: Progress | None = None,
    load: DatasetLoader = load_fleet_dataset,
) -> dict[str, object]:
    """Run every cell; returns the JSON document the benchmark writes.

    `load` reads a cell's data set (once per data slice and seed); the default reads the
    fleet's images, `benchmarks/manyclass.py` swaps them for frozen-trunk features.
    """
    started = time.perf_counter()
    datasets: dict[tuple[int | None, int | None, int], ImageDataset] = {}
    table: dict[str, dict[str, object]] = {}
    for setting in grid.settings:
        table[setting.label] = {}
        for method in grid.methods:
            results = []
            for seed in grid.seeds:
                fleet = bench_fleet(base, grid, setting, method, seed)
                key = (grid.train_per_class, grid.test_per_class, seed)
                if key not in datasets:
                    datasets[key] = load(fleet)
                results.append(run_simulation(fleet, datasets[key]))
                if progress is not None:
                    last = results[-1]
                    progress(
                        f"{setting.label} {method} seed {seed}: "
                        f"final {100 * last.final_accuracy:.1f}% "
                        f"forgetting {100 * last.forgetting:.1f} ({last.wall_time_s:.0f} s)"
                    )
            table[setting.label][method] = summarise(results)
    return {
        "benchmark": "fcil",
        "dataset": base.data.dataset,
        "grid": {
            "methods": list(grid.methods),
            "seeds": list(grid.seeds),
            "settings": [s.label for s in grid.settings],
            "train_per_class": grid.train_per_class,
            "test_per_class": grid.test_per_class,
            "tuned": {method: dict(values) for method, values in grid.tuned.items()},
        },
        "base_fleet": base.model_dump(mode="json"),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "total_wall_time_s": time.perf_counter() - started,
        "results": table,
    }


def write_outputs(document: dict[str, object], json_path: Path, png_path: Path) -> None:
    """The JSON document, and a PNG of the first setting's mean seen-accuracy curves (± std)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=2))
    results: dict[str, dict[str, dict[str, list[float]]]] = document["results"]  # type: ignore[assignment]
    label, methods = next(iter(results.items()))
    from fedfmx.evaluation.plots import plot_seen_accuracy  # matplotlib: 30 MB a timed device lacks

    plot_seen_accuracy(
        {name: cell["seen_accuracy_mean"] for name, cell in methods.items()},
        png_path,
        f"Split {document['dataset']}: {label} (mean of {len(document['grid']['seeds'])} seeds)",  # type: ignore[index]
        spread={name: cell["seen_accuracy_std"] for name, cell in methods.items()},
    )


def markdown_table(document: Mapping[str, object]) -> str:
    """method x metric, mean ± std, one table per setting (for benchmarks/README.md)."""
    lines = []
    results = document["results"]
    assert isinstance(results, Mapping)
    for label, methods in results.items():
        lines += [
            f"**{label}**",
            "",
            "| method | final acc (%) | avg incr. acc (%) | forgetting (pts) "
            "| uplink / client / round (KB) | wall (s) |",
            "|---|---|---|---|---|---|",
        ]
        for name, cell in methods.items():
            lines.append(
                f"| {name} | {percent(cell, 'final_accuracy')} "
                f"| {percent(cell, 'average_incremental_accuracy')} "
                f"| {percent(cell, 'forgetting')} "
                f"| {stat(cell, 'uplink_bytes_per_client_round') / 1e3:.1f} "
                f"| {stat(cell, 'wall_time_s'):.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def percent(cell: Mapping[str, object], metric: str) -> str:
    """`mean ± std` of a fraction, in percent."""
    return f"{100 * stat(cell, metric):.1f} ± {100 * stat(cell, metric, 'std'):.1f}"


def time_device_rounds(
    device: DeviceLearner, fleet: FleetConfig, rounds: int
) -> list[dict[str, float | int | bool]]:
    """One device alone against a local `RoundKeeper`: seconds, peak RSS and uplink bytes of
    each of its first `rounds` local rounds (the device-profile benchmarks)."""
    keeper = RoundKeeper(fleet, initial_model(fleet))
    measured: list[dict[str, float | int | bool]] = []
    for round_index in range(rounds):
        announcement = keeper.open_round(round_index, [device.device_id], deadline_unix=0.0)
        started = time.perf_counter()
        with PeakRss() as memory:
            payload = device.handle_round(announcement, keeper.model_header(), keeper.model.weights)
        elapsed = time.perf_counter() - started
        if payload is not None:
            keeper.accept(payload)
        keeper.close_round()
        measured.append(
            {
                "round": round_index,
                "seconds": elapsed,
                "peak_rss_mb": memory.peak_mb,
                "trained": payload is not None,
                "rows_held": len(device.state.held),
                "uplink_bytes": len(payload or b""),
            }
        )
    return measured
