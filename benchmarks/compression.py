"""Compression benchmark: FedFMX with each codec setting on the FCIL setting, 3 seeds.

    python benchmarks/compression.py            # reduced data slice (minutes)
    python benchmarks/compression.py --full     # full Split Fashion-MNIST

Writes benchmarks/results/compression.json and compression.png (accuracy vs uplink bytes,
log x) and prints a markdown table. The reference is `fedavg`'s uplink: the whole model in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedfmx.benchmark import (
    BENCH_FLEET,
    FULL,
    REDUCED,
    Setting,
    bench_fleet,
    percent,
    stat,
    summarise,
)
from fedfmx.config import FleetConfig
from fedfmx.messages import CodecSettings
from fedfmx.plots import plot_accuracy_vs_bytes
from fedfmx.simulation import load_fleet_dataset, run_simulation

RESULTS = Path(__file__).parent / "results"
CODECS: dict[str, CodecSettings] = {
    "none": CodecSettings(),
    "int8": CodecSettings(quantize="int8"),
    "int8+zstd": CodecSettings(quantize="int8", zstd_level=3),
    "int8+top10%": CodecSettings(quantize="int8", topk_fraction=0.1),
    "int8+top3%": CodecSettings(quantize="int8", topk_fraction=0.03),
    "int8+top1%": CodecSettings(quantize="int8", topk_fraction=0.01),
    "int8+top3%+zstd": CodecSettings(quantize="int8", topk_fraction=0.03, zstd_level=3),
    "int8+top1%+zstd": CodecSettings(quantize="int8", topk_fraction=0.01, zstd_level=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="full data instead of the reduced slice"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    grid = FULL if args.full else REDUCED
    base = FleetConfig.model_validate(BENCH_FLEET)
    setting = Setting(alpha=0.5, max_lag=1)
    cells: dict[str, dict[str, object]] = {}
    runs = [("fedavg fp32", "fedavg", CodecSettings())] + [
        (n, "fedfmx", c) for n, c in CODECS.items()
    ]
    for label, method, codec in runs:
        results = []
        for seed in args.seeds:
            fleet = bench_fleet(base, grid, setting, method, seed).model_copy(
                update={"codec": codec}
            )
            results.append(run_simulation(fleet, load_fleet_dataset(fleet)))
            print(f"{label} seed {seed}: final {100 * results[-1].final_accuracy:.1f}%", flush=True)
        cells[label] = summarise(results) | {"codec": codec.model_dump(), "method": method}
    reference = stat(cells["fedavg fp32"], "uplink_bytes_per_client_round")
    for cell in cells.values():
        cell["uplink_ratio_to_fedavg_fp32"] = (
            stat(cell, "uplink_bytes_per_client_round") / reference
        )
    document = {
        "benchmark": "compression",
        "setting": setting.label,
        "data": {"train_per_class": grid.train_per_class, "test_per_class": grid.test_per_class},
        "seeds": args.seeds,
        "results": cells,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(document, indent=2))
    points = {
        label: (
            stat(cell, "uplink_bytes_per_client_round"),
            stat(cell, "final_accuracy"),
            stat(cell, "final_accuracy", "std"),
        )
        for label, cell in cells.items()
    }
    plot_accuracy_vs_bytes(points, RESULTS / "compression.png", "FedFMX update codecs")
    print(table(cells))


def table(cells: dict[str, dict[str, object]]) -> str:
    lines = [
        "| codec | final acc (%) | forgetting (pts) | uplink / client / round (KB) "
        "| vs fedavg fp32 |",
        "|---|---|---|---|---|",
    ]
    for label, cell in cells.items():
        ratio = stat(cell, "uplink_bytes_per_client_round") / stat(
            cells["fedavg fp32"], "uplink_bytes_per_client_round"
        )
        lines.append(
            f"| {label} | {percent(cell, 'final_accuracy')} | {percent(cell, 'forgetting')} "
            f"| {stat(cell, 'uplink_bytes_per_client_round') / 1e3:.1f} | 1/{1 / ratio:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
