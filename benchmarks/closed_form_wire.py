"""Accuracy against uplink bytes for the closed-form head's statistics on the wire.

    python benchmarks/closed_form_wire.py     # → results/closed_form_wire.{json,png}
    python benchmarks/closed_form_wire.py --only "ridge D=256 int8" --name closed_form_wire_int8

One seed of the reduced Split Fashion-MNIST setting (α = 0.5, lag ≤ 1, 10 devices) through the
in-process engine, so every byte counted is a real encoded update: `ridge` at several random
projection widths `D` (the Gram triangle is `D(D+1)/2` values), the fp16 and int8 codecs, and
`fedfmx_cf` with int8 (its fp32 run is in `fcil.py`'s grid); `fedavg` (fp32 deltas of the
whole model) is the reference the bytes are divided by.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from fedfmx.benchmark import BENCH_FLEET, REDUCED, bench_fleet
from fedfmx.config import FleetConfig
from fedfmx.simulation import load_fleet_dataset, run_simulation

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, tuple[str, dict[str, dict[str, object]]]] = {
    "fedavg fp32": ("fedavg", {}),
    "ridge D=128": ("ridge", {"model": {"random_features": 128}}),
    "ridge D=256": ("ridge", {"model": {"random_features": 256}}),
    "ridge D=256 int8": (
        "ridge",
        {"model": {"random_features": 256}, "codec": {"quantize": "int8"}},
    ),
    "ridge D=512": ("ridge", {"model": {"random_features": 512}}),
    "ridge D=1024": ("ridge", {"model": {"random_features": 1024}}),
    "ridge D=2048": ("ridge", {}),
    "ridge D=2048 fp16": ("ridge", {"codec": {"quantize": "fp16"}}),
    "ridge D=2048 int8": ("ridge", {"codec": {"quantize": "int8"}}),
    "fedfmx_cf int8": ("fedfmx_cf", {"codec": {"quantize": "int8"}}),
}
"""Label -> (method, fleet sections changed)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", help="variant labels to run (default: all)")
    parser.add_argument("--name", default="closed_form_wire", help="output stem under results/")
    args = parser.parse_args()
    chosen = args.only or list(VARIANTS)
    if "fedavg fp32" not in chosen:
        chosen = ["fedavg fp32", *chosen]  # the reference the bytes are divided by
    base = FleetConfig.model_validate(BENCH_FLEET)
    setting = REDUCED.settings[0]
    dataset = None
    cells: dict[str, dict[str, float]] = {}
    for label in chosen:
        method, patch = VARIANTS[label]
        grid = replace(REDUCED, methods=(method,), seeds=(0,), tuned={method: patch})
        fleet = bench_fleet(base, grid, setting, method, 0)
        dataset = dataset or load_fleet_dataset(fleet)
        result = run_simulation(fleet, dataset)
        updates = sum(r.updates for r in result.rounds)
        device_rounds = len(result.rounds) * fleet.protocol.num_clients
        cells[label] = {
            "final_accuracy": result.final_accuracy,
            "uplink_bytes_per_update": result.uplink_bytes / updates,
            "uplink_bytes_per_device_round": result.uplink_bytes / device_rounds,
            "updates": updates,
            "device_rounds": device_rounds,
            "wall_time_s": result.wall_time_s,
        }
        print(
            f"{label}: final {100 * result.final_accuracy:.1f}%, "
            f"{cells[label]['uplink_bytes_per_update'] / 1e3:.1f} KB per update, "
            f"{cells[label]['uplink_bytes_per_device_round'] / 1e3:.1f} KB per device-round",
            flush=True,
        )
    reference = cells["fedavg fp32"]["uplink_bytes_per_device_round"]
    for cell in cells.values():
        cell["fraction_of_fedavg"] = cell["uplink_bytes_per_device_round"] / reference
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "closed_form_wire",
        "seed": 0,
        "setting": setting.label,
        "train_per_class": REDUCED.train_per_class,
        "results": cells,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(document, indent=2))
    plot(cells, RESULTS / f"{args.name}.png")


def plot(cells: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, cell in cells.items():
        x = cell["uplink_bytes_per_device_round"] / 1e3
        y = 100 * cell["final_accuracy"]
        axis.scatter(x, y, color="tab:red" if "fedfmx" in label else "tab:blue")
        axis.annotate(label, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("uplink per device and round (KB, log)")
    axis.set_ylabel("final accuracy (%)")
    axis.set_title("Closed-form statistics on the wire (Split Fashion-MNIST, seed 0)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
