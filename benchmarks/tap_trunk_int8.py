"""The int8 recipe on the trunk that exposes closed-form FedFMX's taps: parity of its features.

    nice -n 19 python benchmarks/tap_trunk_int8.py   # → results/tap_trunk_int8.{json,png}

The default fleet's `fedfmx_cf` on the 64 px Lite0 trunk reads the pool and the outputs of
blocks 4, 7 and 10 (`export.tap_trunk`). Both the pooled-only trunk (`export.trunk`) and the
tap trunk are quantized with the shipped recipe (`export.trunk.quantize_trunk`'s defaults) on
the same 256 Fashion-MNIST *training* images, as `benchmarks/trunk_int8.py` does (same splits:
heads fitted on 2,000 other training images, judged on 2,000 test images). Parity is
`export.trunk.trunk_parity` (a ridge head, `λ = 0.01·tr(G)/d`, fitted on fp32 rows, fed int8
rows), on three kinds of rows:

- `pool`: the pooled features of each int8 trunk (the tap graph leaves the streams its maps
  sit on unequalised: `export.tap_trunk`, so its pool may differ from the pooled-only one's);
- `fedfmx_cf φ`: the fleet's closed-form features (2,048: pool and taps, unit-normed and
  projected, `export.feature_maps`) from the tap trunk's outputs — what a device sends.

SQNR per tap: `10·log10(Σ t² / Σ (t_int8 − t)²)` over the judged images. Latency: the tap
trunk's session (every output) at batch 1, fp32 against int8, with the `raspberry-pi-4`
profile's threads and with 1.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from export.checkpoint import InputSpec
from export.feature_maps import closed_form_features, export_feature_maps, load_feature_maps
from export.tap_trunk import export_tap_trunk
from export.trunk import TrunkFeatures, quantize_trunk, trunk_parity
from export.trunk_runtime import TrunkRuntime, fp32_trunk_path
from fedfmx.config import FleetConfig
from fedfmx.data.datasets import load_dataset
from fedfmx.profiles import load_profile
from fedfmx.trunk.spec import INPUT_SIZE, TRUNK_FEATURES
from fedfmx.trunk.taps import TAPS_BY_NAME, tap_sources

RESULTS = Path(__file__).parent / "results"
CALIBRATION = 256
RUNS = 200
"""Timed runs per latency cell (batch 1, median), as `trunk_int8.py` times its files."""


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / ((candidate - reference) ** 2).sum()))


def main() -> None:
    default = FleetConfig()
    fleet = FleetConfig.model_validate(
        default.model_dump()
        | {
            "method": "fedfmx_cf",
            "model": default.model.model_dump() | {"backbone": "efficientnet_lite0"},
        }
    )
    dataset = load_dataset("fashion_mnist")
    rng = np.random.default_rng(0)
    train = rng.permutation(len(dataset.train_x))
    fit_rows, judge_rows = train[:2000], rng.permutation(len(dataset.test_x))[:2000]
    calibration = dataset.train_x[train[2000 : 2000 + CALIBRATION]]
    names = np.array(dataset.class_names)
    fit_x, fit_names = dataset.train_x[fit_rows], names[dataset.train_y[fit_rows]]
    judge_x, judge_names = dataset.test_x[judge_rows], names[dataset.test_y[judge_rows]]
    spec = InputSpec.of_dataset(dataset)
    sources = tap_sources(fleet.model.expert_taps)
    with tempfile.TemporaryDirectory(prefix="tap-trunk-int8-") as scratch:
        folder = Path(scratch)
        pooled_fp32 = export_tap_trunk(spec, INPUT_SIZE, (), fp32_trunk_path(folder, INPUT_SIZE))
        taps_fp32 = export_tap_trunk(
            spec, INPUT_SIZE, sources, fp32_trunk_path(folder, INPUT_SIZE, sources)
        )
        written = export_feature_maps(fleet, folder / "maps.safetensors", taps_fp32)
        assert written is not None, "numpy does not reproduce the fleet's features"
        maps = load_feature_maps(written)
        pooled_int8 = quantize_trunk(pooled_fp32, folder / "pooled.int8.onnx", calibration)
        taps_int8 = quantize_trunk(taps_fp32, folder / "taps.int8.onnx", calibration)

        def rows(path: Path, taps: tuple[str, ...], x: np.ndarray) -> np.ndarray:
            return TrunkRuntime.load(path, INPUT_SIZE, 2, taps).features(x)

        fit = {"fp32": rows(taps_fp32, maps.taps, fit_x), "int8": rows(taps_int8, maps.taps, fit_x)}
        judge = {
            "fp32": rows(taps_fp32, maps.taps, judge_x),
            "int8": rows(taps_int8, maps.taps, judge_x),
        }
        pooled = {
            "fit": rows(pooled_int8, (), fit_x),
            "judge": rows(pooled_int8, (), judge_x),
        }
        threads = load_profile("raspberry-pi-4").threads
        latency = {
            f"{kind}_batch1_ms_{count}t": TrunkRuntime.load(
                path, INPUT_SIZE, count, maps.taps
            ).median_run_ms(judge_x, 1, RUNS)
            for kind, path in (("fp32", taps_fp32), ("int8", taps_int8))
            for count in (threads, 1)
        }
        print(f"tap trunk latency: {json.dumps(latency)}", flush=True)
        files = {
            "fp32_mb": taps_fp32.stat().st_size / 2**20,
            "taps_int8_vs_fp32": taps_int8.stat().st_size / taps_fp32.stat().st_size,
            "pooled_int8_vs_fp32": pooled_int8.stat().st_size / pooled_fp32.stat().st_size,
        }

    def parity(
        fit_fp32: np.ndarray, fit_int8: np.ndarray, j32: np.ndarray, j8: np.ndarray
    ) -> dict[str, float]:
        report = trunk_parity(
            TrunkFeatures(fit_fp32, fit_int8, fit_names), TrunkFeatures(j32, j8, judge_names)
        )
        return report.__dict__ | {
            "same_head_drop": report.same_head_drop,
            "sqnr_db": sqnr_db(j32, j8),
        }

    pool = slice(0, TRUNK_FEATURES)  # the pool tap comes first in the rows
    phi_fit = {k: closed_form_features(maps, v) for k, v in fit.items()}
    phi_judge = {k: closed_form_features(maps, v) for k, v in judge.items()}
    results = {
        "pooled-only int8 trunk: pool": parity(
            fit["fp32"][:, pool], pooled["fit"], judge["fp32"][:, pool], pooled["judge"]
        ),
        "tap int8 trunk: pool": parity(
            fit["fp32"][:, pool],
            fit["int8"][:, pool],
            judge["fp32"][:, pool],
            judge["int8"][:, pool],
        ),
        "tap int8 trunk: fedfmx_cf φ": parity(
            phi_fit["fp32"], phi_fit["int8"], phi_judge["fp32"], phi_judge["int8"]
        ),
    }
    per_tap, start = {}, 0
    for name in maps.taps:
        width = TAPS_BY_NAME[name].width
        columns = slice(start, start + width)
        per_tap[name] = sqnr_db(judge["fp32"][:, columns], judge["int8"][:, columns])
        start += width
    for name, row in results.items():
        print(f"{name}: {json.dumps(row)}", flush=True)
    print(f"per-tap SQNR (dB): {json.dumps(per_tap)}; files: {json.dumps(files)}", flush=True)
    document = {
        "benchmark": "tap_trunk_int8",
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "taps": list(maps.taps),
        "calibration_images": CALIBRATION,
        "results": results,
        "tap_sqnr_db": per_tap,
        "files": files,
        "latency_ms": latency,
        "profile_threads": threads,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tap_trunk_int8.json").write_text(json.dumps(document, indent=2))
    _plot(document, RESULTS / "tap_trunk_int8.png")


def _plot(document: dict[str, object], path: Path) -> None:
    """Agreement per kind of rows (against the 99 % bound), and SQNR per tap."""
    results: dict[str, dict[str, float]] = document["results"]  # type: ignore[assignment]
    taps: dict[str, float] = document["tap_sqnr_db"]  # type: ignore[assignment]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.barh(list(results), [100 * r["same_head_agreement"] for r in results.values()])
    left.axvline(99, color="k", linestyle="--", label="bound 99 %")
    left.set_xlim(90, 100)
    left.set_xlabel("top-1 agreement, same head (%)")
    left.legend(loc="lower right")
    right.bar(list(taps), list(taps.values()))
    right.set_ylabel("SQNR int8 vs fp32 (dB)")
    figure.suptitle(path.stem)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
