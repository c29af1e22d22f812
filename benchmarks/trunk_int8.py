"""The frozen EfficientNet-Lite0 trunk in int8 through ONNX Runtime: parity, size and speed.

    nice -n 19 python benchmarks/trunk_int8.py   # → results/trunk_int8_parity.{json,png}

Each recipe quantizes the same fp32 trunk (`export.trunk.export_trunk`, 64 px, the fleets'
default) with calibration images from Fashion-MNIST's *training* split (the device's own images:
256 of them); a ridge head is fitted on 2,000 other training images and judged on 2,000 test
images (`export.trunk.trunk_parity`), and — because the recipe's levers were chosen while
looking at the test figures — also on 2,000 further training images that no step has seen
(`held_out_*`). Recipes, each adding one lever to the one before:

- `bias-correction`: the previous recipe — Conv/Clip/Add/ReduceMean quantized, per-channel
  weights rounded to nearest, MinMax, bias correction (`results/trunk_int8.json` has the
  steps before it);
- `+float-stem`: the stem convolution kept float;
- `+float-prefix-6`: the stem and the first two blocks (6 convolutions) kept float;
- `+adaround`: the other weights rounded by `export.rounding.adaround`;
- `+equalisation`: residual streams equalised first (`export.equalisation`);
- `+float-prefix-12`: the first four blocks (12 convolutions) float: the shipped recipe
  (`export.trunk.quantize_trunk`'s defaults).

Two levers measured on top of the shipped recipe, each alone (not shipped):

- `shipped+wide-streams`: the residual streams' tensors in uint16, the rest uint8 (mixed
  activation precision; `export.trunk.wide_stream_overrides`);
- `shipped+reconstruction`: each quantized convolution's rounding and bias re-chosen against
  the float trunk on the quantized trunk's own inputs (`export.reconstruction`).

Latency: batch 1 and batch 16 with the `raspberry-pi-4` profile's 3 threads and with 1
thread, on *this* machine (2 cores shared with other jobs: the load is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from export.checkpoint import InputSpec
from export.trunk import (
    TrunkFeatures,
    export_trunk,
    quantize_trunk,
    trunk_parity,
)
from export.trunk_runtime import TrunkRuntime
from fedfmx.data.datasets import load_dataset
from fedfmx.profiles import load_profile
from fedfmx.trunk.spec import INPUT_SIZE

RESULTS = Path(__file__).parent / "results"
RECIPES: dict[str, dict[str, Any]] = {
    "bias-correction": {"rounding": "nearest", "float_convs": 0, "migration": None},
    "+float-stem": {"rounding": "nearest", "float_convs": 1, "migration": None},
    "+float-prefix-6": {"rounding": "nearest", "float_convs": 6, "migration": None},
    "+adaround": {"rounding": "adaround", "float_convs": 6, "migration": None},
    "+equalisation": {"float_convs": 6},
    "+float-prefix-12": {},
    "shipped+wide-streams": {"wide_streams": True},
    "shipped+reconstruction": {"reconstruction": True},
}
"""`quantize_trunk` keyword arguments; `{}` is its defaults, the shipped recipe."""
SHIPPED = "+float-prefix-12"


def sqnr_db(features: TrunkFeatures) -> float:
    """`10·log10(Σ f² / Σ (f̃ − f)²)` of the int8 features `f̃` against the fp32 ones `f`."""
    error = features.int8 - features.fp32
    return float(10 * np.log10((features.fp32**2).sum() / (error**2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=256, help="calibration images")
    parser.add_argument("--out", default="trunk_int8_parity", help="results file stem")
    args = parser.parse_args()
    threads = load_profile("raspberry-pi-4").threads
    dataset = load_dataset("fashion_mnist")
    rng = np.random.default_rng(0)
    train = rng.permutation(len(dataset.train_x))
    fit_rows, judge_rows = train[:2000], rng.permutation(len(dataset.test_x))[:2000]
    calibration = dataset.train_x[train[2000 : 2000 + args.calibration]]
    held_out = train[2000 + args.calibration : 4000 + args.calibration]
    names = np.array(dataset.class_names)
    spec = InputSpec.of_dataset(dataset)
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="trunk-int8-") as folder:
        fp32_path = export_trunk(spec, INPUT_SIZE, Path(folder) / "fp32.onnx")
        fp32 = TrunkRuntime.load(fp32_path, INPUT_SIZE, threads)
        fit_fp32 = fp32.features(dataset.train_x[fit_rows])
        judge_fp32 = fp32.features(dataset.test_x[judge_rows])
        held_out_fp32 = fp32.features(dataset.train_x[held_out])
        files = {"fp32": fp32_path}
        for name, recipe in RECIPES.items():
            out = Path(folder) / f"{name}.onnx"
            started = time.perf_counter()
            quantize_trunk(fp32_path, out, calibration, **recipe)
            seconds = time.perf_counter() - started
            files[name] = out
            runtime = TrunkRuntime.load(out, INPUT_SIZE, threads)
            fit = TrunkFeatures(
                fit_fp32,
                runtime.features(dataset.train_x[fit_rows]),
                names[dataset.train_y[fit_rows]],
            )
            judge = TrunkFeatures(
                judge_fp32,
                runtime.features(dataset.test_x[judge_rows]),
                names[dataset.test_y[judge_rows]],
            )
            parity = trunk_parity(fit, judge)
            held_out_features = TrunkFeatures(
                held_out_fp32,
                runtime.features(dataset.train_x[held_out]),
                names[dataset.train_y[held_out]],
            )
            held_out_parity = trunk_parity(fit, held_out_features)
            rows[name] = {
                "quantize_seconds": seconds,
                "sqnr_db": sqnr_db(judge),
                "held_out_sqnr_db": sqnr_db(held_out_features),
                **parity.__dict__,
                "same_head_drop": parity.same_head_drop,
                "own_head_drop": parity.own_head_drop,
                "held_out_agreement": held_out_parity.same_head_agreement,
                "held_out_drop": held_out_parity.same_head_drop,
            }
            print(name, json.dumps(rows[name]), flush=True)
        for name, path in files.items():
            cell = rows.setdefault(name, {})
            cell["file_bytes"] = path.stat().st_size
            cell["size_vs_fp32"] = path.stat().st_size / fp32_path.stat().st_size
            for count in (threads, 1):
                runtime = TrunkRuntime.load(path, INPUT_SIZE, count)
                images = dataset.test_x[:16]
                cell[f"batch1_ms_{count}t"] = runtime.median_run_ms(images, 1, args.runs)
                cell[f"batch16_ms_{count}t"] = runtime.median_run_ms(images, 16, args.runs // 4)
            print(name, {k: v for k, v in cell.items() if "ms" in k or "size" in k}, flush=True)
    document = {
        "benchmark": "trunk_int8",
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "profile_threads": threads,
        "input_size": INPUT_SIZE,
        "calibration_images": len(calibration),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(document, indent=2))
    _plot(rows, threads, RESULTS / f"{args.out}.png")


def _plot(rows: dict[str, dict[str, object]], threads: int, path: Path) -> None:
    recipes = list(RECIPES)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(recipes))
    for offset, key, label in (
        (-0.27, "same_head_agreement", "top-1 agreement, same head (test)"),
        (0.0, "held_out_agreement", "top-1 agreement, same head (held-out training rows)"),
        (0.27, "own_head_accuracy", "accuracy, head fitted on int8 (test)"),
    ):
        left.bar(x + offset, [100 * float(rows[r][key]) for r in recipes], 0.27, label=label)  # type: ignore[arg-type]
    left.axhline(99, color="k", linestyle="--", linewidth=1, label="99% agreement bound")
    left.axhline(
        100 * float(rows[SHIPPED]["fp32_accuracy"]),  # type: ignore[arg-type]
        color="grey",
        linestyle=":",
        label="fp32 accuracy",
    )
    left.set_xticks(x, recipes, rotation=15, fontsize=8)
    left.set_ylim(75, 100)
    left.set_ylabel("%")
    left.legend(fontsize=8)
    left.set_title("int8 trunk vs fp32 trunk (Fashion-MNIST)")
    names = ["fp32", *recipes]
    at = np.arange(len(names))
    for offset, count in ((-0.2, threads), (0.2, 1)):
        right.bar(
            at + offset,
            [float(rows[n][f"batch1_ms_{count}t"]) for n in names],  # type: ignore[arg-type]
            0.4,
            label=f"{count} thread{'s' * (count > 1)}",
        )
    right.set_xticks(at, names)
    right.legend(fontsize=8)
    right.tick_params(axis="x", labelrotation=15, labelsize=8)
    right.set_ylabel("batch-1 latency, ms")
    right.set_title("ONNX Runtime, this machine")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
