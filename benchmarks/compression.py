"""Compression benchmark: FedFMX with each codec setting on the FCIL setting, 3 seeds.

    python benchmarks/compression.py            # reduced data slice (minutes)
    python benchmarks/compression.py --full     # full Split Fashion-MNIST
    python benchmarks/compression.py --demo     # the demo fleet, old vs new wire defaults

Writes benchmarks/results/compression.json and compression.png (accuracy vs uplink bytes,
log x) and prints a markdown table. The reference is `fedavg`'s uplink: the whole model in fp32.

`--demo` runs the README's demo fleet with the SGD FedFMX (in process, full data, seed 0;
`--fleet`, `--method`, `--seed` for another) with the old wire (float32 updates, every version
in full float32) and with the defaults (int8 + zstd updates, each version as an int8 + zstd
delta against the previous one, `fedfmx.wire.model_delta`), and writes compression_demo.{json,png}:
downlink and uplink bytes per device per round, accuracy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedfmx.config import FleetConfig, load_fleet
from fedfmx.evaluation.benchmark import (
    BENCH_FLEET,
    FULL,
    REDUCED,
    Setting,
    bench_fleet,
    percent,
    stat,
    summarise,
)
from fedfmx.evaluation.plots import plot_accuracy_vs_bytes, plot_wire_bytes
from fedfmx.federation.simulation import load_fleet_dataset, run_simulation
from fedfmx.wire.messages import CodecSettings

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


WIRES: dict[str, dict[str, object]] = {
    "old wire": {"codec": {}, "downlink": {"delta": False}},
    "defaults": {},
}
"""The demo fleet's wire before this change, and its defaults now (fleet sections)."""


@dataclass(frozen=True)
class WireCell:
    """One demo run: its accuracy and its bytes per device per round, each way."""

    final_accuracy: float
    average_incremental_accuracy: float
    forgetting: float
    downlink_bytes_per_device_round: float
    uplink_bytes_per_device_round: float
    downlink_bytes_per_round: list[int]
    uplink_bytes_per_round: list[int]
    wall_time_s: float
    codec: dict[str, object]
    downlink: dict[str, object]


def demo_wires(base: FleetConfig, name: str) -> None:
    """`base` with the old wire and with the defaults: bytes per device-round, accuracy."""
    cells: dict[str, WireCell] = {}
    for label, sections in WIRES.items():
        fleet = FleetConfig.model_validate(base.model_dump() | sections)
        result = run_simulation(fleet, load_fleet_dataset(fleet))
        device_rounds = fleet.protocol.num_clients * len(result.rounds)
        cells[label] = WireCell(
            result.final_accuracy,
            result.average_incremental_accuracy,
            result.forgetting,
            result.downlink_bytes / device_rounds,
            result.uplink_bytes / device_rounds,
            [log.downlink_bytes for log in result.rounds],
            [log.uplink_bytes for log in result.rounds],
            result.wall_time_s,
            fleet.uplink_codec.model_dump(),
            fleet.downlink.model_dump(),
        )
        print(f"{label}: final {100 * result.final_accuracy:.1f}%", flush=True)
    document = {
        "benchmark": name,
        "fleet": f"{base.name}, method {base.method}, in process, seed {base.seed}",
        "results": {label: asdict(cell) for label, cell in cells.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=2))
    bars = {
        label: (
            cell.downlink_bytes_per_device_round,
            cell.uplink_bytes_per_device_round,
            cell.final_accuracy,
        )
        for label, cell in cells.items()
    }
    plot_wire_bytes(
        bars, RESULTS / f"{name}.png", f"{base.name} ({base.method}): bytes per device-round"
    )
    print(
        "| wire | final acc (%) | AIA (%) | downlink / device / round (KB) "
        "| uplink / device / round (KB) |\n|---|---|---|---|---|"
    )
    for label, cell in cells.items():
        print(
            f"| {label} | {100 * cell.final_accuracy:.1f} "
            f"| {100 * cell.average_incremental_accuracy:.1f} "
            f"| {cell.downlink_bytes_per_device_round / 1e3:.1f} "
            f"| {cell.uplink_bytes_per_device_round / 1e3:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="full data instead of the reduced slice"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--demo", action="store_true", help="the demo fleet, old vs new wire defaults"
    )
    parser.add_argument("--fleet", type=Path, help="with --demo: another fleet YAML")
    parser.add_argument(
        "--method", default="fedfmx", help="with --demo: the method (default: SGD FedFMX)"
    )
    parser.add_argument("--seed", type=int, help="with --demo: another seed")
    args = parser.parse_args()
    if args.demo:
        base = load_fleet(args.fleet)
        name = "compression_demo"
        base = base.model_copy(update={"method": args.method})
        if args.fleet is not None or args.method != "fedfmx":
            name = f"compression_demo_{base.name}_{base.method}"
        if args.seed is not None:
            base = base.model_copy(update={"seed": args.seed})
            name = f"{name}_seed{args.seed}"
        demo_wires(base, name)
        return
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
