"""Accuracy against uplink bytes for the closed-form head's statistics on the wire.

    python benchmarks/closed_form_wire.py     # → results/closed_form_wire.{json,png}
    python benchmarks/closed_form_wire.py --only "ridge D=256 int8" --name closed_form_wire_int8
    python benchmarks/closed_form_wire.py --only "ridge D=2048 factor fp32" \
        --reference benchmarks/results/closed_form_wire.json --name closed_form_wire_factor
    python benchmarks/closed_form_wire.py --only "ridge D=512 factor fp16" \
        --name closed_form_wire_factor --append        # more cells into the same JSON

One seed of the reduced Split Fashion-MNIST setting (α = 0.5, lag ≤ 1, 10 devices) through the
in-process engine, so every byte counted is a real encoded update: `ridge` at several random
projection widths `D` (the Gram triangle is `D(D+1)/2` values), the fp16 and int8 codecs, and
`fedfmx_cf` with int8 (its fp32 run is in `fcil.py`'s grid); `fedavg` (fp32 deltas of the
whole model) is the reference the bytes are divided by (`--reference`: its cell from an earlier
run's JSON, instead of running it again).

The first variants send `G`'s triangle; the `factor` ones let a device send the exact factor
of its round's Gram matrix when that is smaller (`analytic.send_factor`, `d·r` values for
`r ≤ n` rows instead of `d(d+1)/2`), each beside its `triangle` twin with the same codec.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

from fedfmx.config import FleetConfig
from fedfmx.evaluation.benchmark import BENCH_FLEET, REDUCED, bench_fleet
from fedfmx.federation.rounds import MAX_UPDATE_BYTES
from fedfmx.federation.simulation import load_fleet_dataset, run_inproc
from fedfmx.wire.codec import UPDATE_MAGIC, parse_header, unframe
from fedfmx.wire.messages import UpdateHeader

RESULTS = Path(__file__).parent / "results"
Section = dict[str, object]
TRIANGLE: Section = {"send_factor": False}
FACTOR: Section = {"send_factor": True}
FP32: Section = {"quantize": "none"}
FP16: Section = {"quantize": "fp16"}
INT8: Section = {"quantize": "int8"}
Variant = tuple[str, dict[str, Section]]


def narrow_ridge(width: int, codec: Section, analytic: Section) -> Variant:
    """`ridge` on `width` random features instead of the bench fleet's 2,048."""
    return ("ridge", {"model": {"random_features": width}, "codec": codec, "analytic": analytic})


VARIANTS: dict[str, Variant] = {
    "fedavg fp32": ("fedavg", {"codec": FP32}),
    "ridge D=128": narrow_ridge(128, FP32, TRIANGLE),
    "ridge D=256": narrow_ridge(256, FP32, TRIANGLE),
    "ridge D=256 int8": narrow_ridge(256, INT8, TRIANGLE),
    "ridge D=512": narrow_ridge(512, FP32, TRIANGLE),
    "ridge D=1024": narrow_ridge(1024, FP32, TRIANGLE),
    "ridge D=2048": ("ridge", {"codec": FP32, "analytic": TRIANGLE}),
    "ridge D=2048 fp16": ("ridge", {"codec": FP16, "analytic": TRIANGLE}),
    "ridge D=2048 int8": ("ridge", {"codec": INT8, "analytic": TRIANGLE}),
    "fedfmx_cf int8": ("fedfmx_cf", {"codec": INT8, "analytic": TRIANGLE}),
    "ridge D=2048 factor fp32": ("ridge", {"codec": FP32, "analytic": FACTOR}),
    "ridge D=2048 factor fp16": ("ridge", {"codec": FP16, "analytic": FACTOR}),
    "fedfmx_cf triangle fp32": ("fedfmx_cf", {"codec": FP32, "analytic": TRIANGLE}),
    "fedfmx_cf triangle fp16": ("fedfmx_cf", {"codec": FP16, "analytic": TRIANGLE}),
    "fedfmx_cf factor fp32": ("fedfmx_cf", {"codec": FP32, "analytic": FACTOR}),
    "fedfmx_cf factor fp16": ("fedfmx_cf", {"codec": FP16, "analytic": FACTOR}),
    "ridge D=2048 factor int8": ("ridge", {"codec": INT8, "analytic": FACTOR}),
    "fedfmx_cf factor int8": ("fedfmx_cf", {"codec": INT8, "analytic": FACTOR}),
    "ridge D=256 factor fp16": narrow_ridge(256, FP16, FACTOR),
    "ridge D=512 factor fp16": narrow_ridge(512, FP16, FACTOR),
}
"""Label -> (method, fleet sections changed); `ridge D=2048` and `ridge D=2048 fp16` are the
triangle twins of the ridge factor rows."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", help="variant labels to run (default: all)")
    parser.add_argument("--name", default="closed_form_wire", help="output stem under results/")
    parser.add_argument(
        "--reference", type=Path, help="take the fedavg fp32 cell from this earlier run's JSON"
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the cells already in results/NAME.json"
    )
    args = parser.parse_args()
    chosen = args.only or list(VARIANTS)
    output = RESULTS / f"{args.name}.json"
    cells: dict[str, dict[str, float]] = (
        json.loads(output.read_text())["results"] if args.append else {}
    )
    if args.reference is not None:
        cells["fedavg fp32"] = json.loads(args.reference.read_text())["results"]["fedavg fp32"]
    if "fedavg fp32" in cells:
        chosen = [label for label in chosen if label != "fedavg fp32"]
    elif "fedavg fp32" not in chosen:
        chosen = ["fedavg fp32", *chosen]  # the reference the bytes are divided by
    base = FleetConfig.model_validate(BENCH_FLEET)
    setting = REDUCED.settings[0]
    dataset = None
    for label in chosen:
        method, patch = VARIANTS[label]
        grid = replace(REDUCED, methods=(method,), seeds=(0,), tuned={method: patch})
        fleet = bench_fleet(base, grid, setting, method, 0)
        dataset = dataset or load_fleet_dataset(fleet)
        shapes: list[tuple[int, int]] = []
        result = run_inproc(fleet, dataset, tamper=partial(record_shape, shapes))
        factored = [(rows, rank) for rows, rank in shapes if rank]
        updates = sum(r.updates for r in result.rounds)
        device_rounds = len(result.rounds) * fleet.protocol.num_clients
        cells[label] = {
            "final_accuracy": result.final_accuracy,
            "uplink_bytes_per_update": result.uplink_bytes / updates,
            "uplink_bytes_per_device_round": result.uplink_bytes / device_rounds,
            "updates": updates,
            "device_rounds": device_rounds,
            "wall_time_s": result.wall_time_s,
            "factor_updates": len(factored),
            "mean_rows_per_update": sum(rows for rows, _ in shapes) / max(len(shapes), 1),
            "mean_factor_rank": sum(rank for _, rank in factored) / max(len(factored), 1),
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
        document = {  # written after every cell: a long run stopped early keeps what finished
            "benchmark": "closed_form_wire",
            "seed": 0,
            "setting": setting.label,
            "train_per_class": REDUCED.train_per_class,
            "fedavg_reference": str(args.reference) if args.reference else "run here",
            "results": cells,
        }
        output.write_text(json.dumps(document, indent=2))
        plot(cells, output.with_suffix(".png"))


def record_shape(shapes: list[tuple[int, int]], device: str, update: bytes, _: object) -> bytes:
    """Note an update's rows and factor rank (0: the triangle) and pass it on unchanged."""
    text, _body = unframe(update, UPDATE_MAGIC, MAX_UPDATE_BYTES)
    header = parse_header(text, UpdateHeader)
    shapes.append((header.num_samples, header.factor_rank))
    return update


def plot(cells: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, cell in cells.items():
        x = cell["uplink_bytes_per_device_round"] / 1e3
        y = 100 * cell["final_accuracy"]
        marker = "^" if "factor" in label else "o"
        axis.scatter(x, y, color="tab:red" if "fedfmx" in label else "tab:blue", marker=marker)
        offset = (3, -9 if "fp16" in label else 3)  # fp16 twins below: labels do not overlap
        axis.annotate(label, (x, y), fontsize="x-small", xytext=offset, textcoords="offset points")
    if "fedavg fp32" in cells:
        target = cells["fedavg fp32"]["uplink_bytes_per_device_round"] / 50 / 1e3
        axis.axvline(target, color="grey", linestyle="--", linewidth=1)
        axis.annotate("1/50 fedavg", (target, 20), fontsize="x-small", rotation=90)
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
