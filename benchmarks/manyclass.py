"""Many-class FCIL benchmark: FedFMX against the baselines, from-scratch CNN against a frozen
ImageNet EfficientNet-Lite0, on Omniglot-small, COIL-20, Extended Yale B and Split Fashion-MNIST.

    python benchmarks/manyclass.py                # reduced grid, 3 seeds (~45 min on 2 cores)
    python benchmarks/manyclass.py --grid full    # all data, default budget, every method
    python benchmarks/manyclass.py --device       # one device's rounds on raspberry-pi-4 settings

The grid writes results/manyclass.json and .png and prints the markdown table; `--device` writes
results/pretrained_device.json. Base fleets: device_configs/fleets/manyclass-*.yaml (the
benchmark sets method, seed, backbone and budget per cell, and applies results/tuning.json).

Pretrained cells: every image crosses the frozen trunk once for the whole grid (through a
`FeatureCache` in a temporary folder) and the federation is fed those trunk features in place of
images, which the model accepts as they are. That is what each device's own feature cache gives
it (the update is the same, `tests/test_device_cache.py`), without redoing the trunk for every
method and seed; the devices' caches are off because their inputs already are features.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from fedfmx.config import FleetConfig, load_fleet
from fedfmx.data.datasets import ImageDataset
from fedfmx.device.learner import DeviceLearner
from fedfmx.evaluation.benchmark import (
    Grid,
    Progress,
    Setting,
    percent,
    run_grid,
    stat,
    time_device_rounds,
)
from fedfmx.federation.simulation import load_fleet_dataset, own_partition
from fedfmx.profiles import apply_profile, load_profile
from fedfmx.trunk.feature_cache import FeatureCache, trunk_feature_fn
from fedfmx.trunk.pretrained import BACKBONE_ID, PretrainedBackbone
from fedfmx.trunk.taps import taps_id

RESULTS = Path(__file__).parent / "results"
FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"
BACKBONES = ("cnn", "efficientnet_lite0")
METHODS = ("fedfmx", "fedavg", "fedprox", "fedewc", "fedlwf", "fedavg_replay", "joint")
"""FedFMX, the benchmark issue's baselines and the centralised upper bound."""
ALL_METHODS = (*METHODS, "fedavg_replay_wa", "ridge", "fedfmx_cf", "fedfmx_cf_no_experts")
"""Every method a grid may run (`--methods`); each keeps its colour in every plot."""
SETTING = Setting(alpha=0.5, max_lag=1)
TAP_METHODS = ("fedfmx_cf",)
"""Methods that read the trunk's tap vectors, not only its pooled features."""


@dataclass(frozen=True)
class DataSet:
    """One data set of the benchmark: its base fleet and how the reduced grid cuts it down."""

    fleet: str
    """`device_configs/fleets/<fleet>.yaml`."""
    label: str
    reduced_train_per_class: int | None = None
    reduced_test_per_class: int | None = None
    reduced_cnn_methods: Sequence[str] = METHODS
    """The reduced grid's methods for the (slow) from-scratch CNN."""


DATASETS = {
    "omniglot_small": DataSet(
        "manyclass-omniglot",
        "Omniglot-small, 242 classes in 11 tasks of 22",
        reduced_cnn_methods=("fedfmx", "fedavg", "fedavg_replay", "joint"),
    ),
    "coil20": DataSet("manyclass-coil20", "COIL-20, 20 objects in 5 tasks of 4"),
    "yaleb": DataSet("manyclass-yaleb", "Extended Yale B, 38 people in 6 tasks (2 of 7, 4 of 6)"),
    "fashion_mnist": DataSet(
        "manyclass-fmnist",
        "Split Fashion-MNIST, 5 tasks of 2",
        reduced_train_per_class=300,
        reduced_test_per_class=200,
    ),
}


@dataclass(frozen=True)
class Budget:
    """The training budget every cell of a grid gets (the same for every method)."""

    name: str
    rounds_per_task: int
    local_epochs: int
    reduced: bool
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = METHODS
    threads: int = 1
    """Torch threads per run: one, since runs share two cores with other work (a second
    thread mostly spins while the other waits for a core)."""


REDUCED = Budget("reduced", rounds_per_task=2, local_epochs=4, reduced=True)
FULL = Budget("full", rounds_per_task=3, local_epochs=4, reduced=False)


def tuned_values() -> dict[str, dict[str, dict[str, object]]]:
    """results/tuning.json's choices (tuned on Split Fashion-MNIST with the CNN), if present."""
    path = RESULTS / "tuning.json"
    if not path.exists():
        return {}
    chosen: dict[str, dict[str, dict[str, object]]] = json.loads(path.read_text())["chosen"]
    return chosen


def base_fleet(
    data: DataSet, backbone: str, budget: Budget, model: Mapping[str, object] | None = None
) -> FleetConfig:
    fleet = load_fleet(FLEETS / f"{data.fleet}.yaml")
    document = fleet.model_dump()
    document["protocol"] |= {"rounds_per_task": budget.rounds_per_task}
    document["model"] |= {"backbone": backbone, **(model or {})}
    # pretrained cells are fed trunk features already (see the module docstring)
    cache_mb = 0 if backbone == "efficientnet_lite0" else fleet.training.feature_cache_mb
    document["training"] |= {
        "local_epochs": budget.local_epochs,
        "feature_cache_mb": cache_mb,
        "threads": budget.threads,
    }
    return FleetConfig.model_validate(document)


def cell_grid(data: DataSet, backbone: str, budget: Budget, tuned: Mapping[str, object]) -> Grid:
    methods = budget.methods
    if budget.reduced and backbone == "cnn":
        methods = [m for m in methods if m in data.reduced_cnn_methods]
    return Grid(
        methods=tuple(methods),
        seeds=tuple(budget.seeds),
        settings=(SETTING,),
        train_per_class=data.reduced_train_per_class if budget.reduced else None,
        test_per_class=data.reduced_test_per_class if budget.reduced else None,
        tuned=tuned,  # type: ignore[arg-type]
    )


@dataclass
class TrunkFeatures:
    """Loads a fleet's data set with every image replaced by its frozen-trunk features.

    Each distinct image crosses the trunk once for the whole grid (the cache is keyed by the
    image's bytes, so seeds and slices share entries). With `taps` the rows are the trunk's tap
    vectors (`fedfmx.trunk.taps`), whose prefix is the pooled features: closed-form FedFMX
    reads every tap, the other methods the prefix.
    """

    cache: FeatureCache
    seconds: float = 0.0
    trunk: Callable[[np.ndarray], np.ndarray] = field(
        default_factory=lambda: trunk_feature_fn(PretrainedBackbone(feature_dim=1))
    )

    @classmethod
    def open(cls, root: Path, taps: bool) -> TrunkFeatures:
        """Pooled features or tap vectors, cached under `root` (kept between runs)."""
        trunk = trunk_feature_fn(PretrainedBackbone(feature_dim=1), taps=taps)
        identity = taps_id(BACKBONE_ID) if taps else BACKBONE_ID
        return cls(FeatureCache(root, identity, max_bytes=2**33), trunk=trunk)

    def __call__(self, fleet: FleetConfig) -> ImageDataset:
        images = load_fleet_dataset(fleet)
        started = time.perf_counter()
        with torch.no_grad():
            features = replace(
                images,
                train_x=self.cache.features(images.train_x, self.trunk),
                test_x=self.cache.features(images.test_x, self.trunk),
            )
        self.seconds += time.perf_counter() - started
        return features


def run_benchmark(
    budget: Budget,
    datasets: Sequence[str],
    backbones: Sequence[str],
    output: Path,
    tuned: Mapping[str, object],
    model: Mapping[str, object] | None = None,
    feature_cache: Path | None = None,
) -> dict[str, object]:
    """Every data set x backbone x method x seed; the JSON is rewritten after each block.

    `model` overrides the base fleets' model section (e.g. `random_features`);
    `feature_cache` keeps the trunk features between runs (a temporary folder otherwise)."""
    torch.set_num_threads(budget.threads)
    started = time.perf_counter()
    results: dict[str, dict[str, object]] = {}
    described: dict[str, dict[str, object]] = {}
    document: dict[str, object] = {
        "benchmark": "manyclass",
        "grid": {
            "name": budget.name,
            "rounds_per_task": budget.rounds_per_task,
            "local_epochs": budget.local_epochs,
            "threads": budget.threads,
            "seeds": list(budget.seeds),
            "setting": SETTING.label,
            "tuned": dict(tuned),
            "datasets": described,
        },
        "pretrained_inputs": "precomputed frozen-trunk features (module docstring)",
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
    }
    with contextlib.ExitStack() as stack:
        if feature_cache is None:
            feature_cache = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        uses_taps = any(method in TAP_METHODS for method in budget.methods)
        features = TrunkFeatures.open(feature_cache, taps=uses_taps)
        for name in datasets:
            data = DATASETS[name]
            results[name] = {}
            for backbone in backbones:
                base = base_fleet(data, backbone, budget, model)
                grid = cell_grid(data, backbone, budget, tuned)
                described.setdefault(
                    name,
                    {
                        "label": data.label,
                        "num_tasks": base.protocol.num_tasks,
                        "num_clients": base.protocol.num_clients,
                        "train_per_class": grid.train_per_class,
                        "test_per_class": grid.test_per_class,
                    },
                )[f"methods_{backbone}"] = list(grid.methods)
                block = run_grid(
                    base,
                    grid,
                    progress=_progress(f"{name} {backbone}"),
                    load=features if backbone == "efficientnet_lite0" else load_fleet_dataset,
                )
                table = block["results"]
                assert isinstance(table, Mapping)
                results[name][backbone] = table[SETTING.label]
                document["feature_extraction_s"] = features.seconds
                document["total_wall_time_s"] = time.perf_counter() - started
                document["targets"] = check_targets(results)
                output.write_text(json.dumps(document, indent=2))
    return document


def _progress(prefix: str) -> Progress:
    return lambda line: print(f"{prefix} {line}", flush=True)


def check_targets(results: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, bool]]:
    """Issue 8's accuracy targets with the pretrained backbone, per data set (mean of seeds):
    FedFMX leads every non-joint baseline on final accuracy, and forgets the least."""
    checks = {}
    for name, backbones in results.items():
        methods = backbones.get("efficientnet_lite0")
        if not isinstance(methods, Mapping) or "fedfmx" not in methods:
            continue
        ours = methods["fedfmx"]
        others = [cell for m, cell in methods.items() if m not in ("fedfmx", "joint")]
        checks[name] = {
            "fedfmx_leads_final_accuracy": all(
                stat(ours, "final_accuracy") > stat(c, "final_accuracy") for c in others
            ),
            "fedfmx_lowest_forgetting": all(
                stat(ours, "forgetting") < stat(c, "forgetting") for c in others
            ),
        }
    return checks


def write_plot(document: Mapping[str, object], path: Path) -> None:
    """Seen-class accuracy after each task: a row per data set, a column per backbone."""
    # imported here, not at the top: the `--device` children measure a device's memory, and a
    # device does not load matplotlib's 30 MB
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    results = document["results"]
    assert isinstance(results, Mapping)
    rows = list(results)
    figure, axes = plt.subplots(
        len(rows), len(BACKBONES), figsize=(11, 3.2 * len(rows)), squeeze=False
    )
    palette = matplotlib.colormaps["tab20"]
    colours = {method: palette(i) for i, method in enumerate(ALL_METHODS)}
    labels: dict[str, Line2D] = {}
    for r, name in enumerate(rows):
        for c, backbone in enumerate(BACKBONES):
            panel = axes[r][c]
            methods = results[name].get(backbone, {})
            for method, cell in methods.items():
                curve = 100 * np.array(cell["seen_accuracy_mean"])
                spread = 100 * np.array(cell["seen_accuracy_std"])
                tasks = np.arange(1, len(curve) + 1)
                style = ":" if method == "joint" else "-"
                (line,) = panel.plot(
                    tasks, curve, style, marker="o", markersize=3, color=colours[method]
                )
                panel.fill_between(
                    tasks, curve - spread, curve + spread, alpha=0.1, color=colours[method]
                )
                panel.set_xticks(tasks)
                labels[method] = line
            panel.set_title(f"{DATASETS[name].label}\n{backbone}", fontsize="small")
            panel.set_ylim(0, 100)
            panel.grid(alpha=0.3)
            panel.set_xlabel("task", fontsize="small")
            panel.set_ylabel("seen-class accuracy (%)", fontsize="small")
    figure.legend(list(labels.values()), list(labels), loc="lower center", ncol=len(labels))
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown_table(document: Mapping[str, object]) -> str:
    """Per data set: method x backbone, final accuracy and forgetting (mean ± std over seeds)."""
    results = document["results"]
    assert isinstance(results, Mapping)
    lines = []
    for name, backbones in results.items():
        lines += [
            f"**{DATASETS[name].label}**",
            "",
            "| method | CNN final acc (%) | CNN forgetting (pts) "
            "| Lite0 final acc (%) | Lite0 forgetting (pts) |",
            "|---|---|---|---|---|",
        ]
        for method in ALL_METHODS:
            cells = [backbones.get(b, {}).get(method) for b in BACKBONES]
            if all(cell is None for cell in cells):
                continue
            values = []
            for cell in cells:
                if cell is None:
                    values += ["n/a", "n/a"]
                else:
                    values += [percent(cell, "final_accuracy"), percent(cell, "forgetting")]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


# --- one device's local rounds on a profile's settings ---------------------------------------

DEVICE_ROUNDS = 4
"""As `device_profiles.py`: task 0's rounds, then the first of task 1 (Fisher, exemplars)."""
DEVICE_VARIANTS = {
    "cnn": ("cnn", 0),
    "efficientnet_lite0, no cache": ("efficientnet_lite0", 0),
    "efficientnet_lite0, cold cache": ("efficientnet_lite0", 64),
    "efficientnet_lite0, warm cache": ("efficientnet_lite0", 64),
}
"""Variant -> (backbone, feature_cache_mb); "warm" reopens the folder "cold" filled."""


def measure_device(variant: str, profile_name: str, cache_dir: Path) -> dict[str, object]:
    """The demo fleet's first device on the profile's settings, holding its own rows only
    (`benchmarks/device_profiles.py`'s method), with the variant's backbone and cache."""
    backbone, cache_mb = DEVICE_VARIANTS[variant]
    profile = load_profile(profile_name)
    default = FleetConfig(method="fedfmx")  # the SGD device this measurement is of
    fleet = apply_profile(
        default.model_copy(
            update={
                "model": default.model.model_copy(update={"backbone": backbone}),
                "training": default.training.model_copy(update={"feature_cache_mb": cache_mb}),
            }
        ),
        profile,
    )
    torch.set_num_threads(profile.threads)
    dataset = load_fleet_dataset(fleet)
    samples, stream = own_partition(fleet, dataset, 0)
    del dataset  # a device holds its own rows only
    _return_freed_memory()  # ... and never read the whole data set: drop that from its RSS
    idle_mb = psutil.Process().memory_info().rss / 2**20
    device = DeviceLearner("device-000", fleet, samples, stream, seed=0, cache_dir=cache_dir)
    rounds = time_device_rounds(device, fleet, DEVICE_ROUNDS)
    cache = device.feature_cache
    peak = max(float(r["peak_rss_mb"]) for r in rounds)
    return {
        "backbone": backbone,
        "feature_cache_mb": cache_mb,
        "rows_held": len(stream.rows),
        "rounds": rounds,
        "mean_round_s": float(np.mean([r["seconds"] for r in rounds if r["trained"]])),
        "peak_rss_mb": peak,
        "idle_rss_mb": idle_mb,
        "round_rss_increase_mb": peak - idle_mb,
        "train_memory_mb": profile.train_memory_mb,
        "within_memory_budget": peak <= profile.train_memory_mb,
        "cache": None if cache is None else vars(cache.stats) | {"bytes": cache.size_bytes},
    }


def _return_freed_memory() -> None:
    """Hand the heap glibc keeps after freeing the loaded data set back to the system."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the loader's heap stays
        ctypes.CDLL(None).malloc_trim(0)


def run_device_benchmark(profile_name: str) -> dict[str, object]:
    """Each variant in its own process, so each peak RSS is that device's alone."""
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="manyclass-device-cache-") as folder:
        for variant in DEVICE_VARIANTS:
            output = subprocess.run(
                [sys.executable, __file__, "--device-child", variant, profile_name, folder],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            cell = json.loads(output.strip().splitlines()[-1])
            results[variant] = cell
            print(
                f"{variant}: {cell['mean_round_s']:.2f} s per local round, "
                f"peak RSS {cell['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    cnn, warm = results["cnn"], results["efficientnet_lite0, warm cache"]
    assert isinstance(cnn, dict) and isinstance(warm, dict)
    speedup = cnn["mean_round_s"] / warm["mean_round_s"]
    return {
        "benchmark": "pretrained_device",
        "profile": profile_name,
        "fleet": "demo (Split Fashion-MNIST, 5 devices); device-000's own rows",
        "machine": platform.platform(),
        "results": results,
        "warm_cache_speedup_over_cnn": speedup,
        "targets": {
            "warm_cache_round_5x_faster_than_cnn": speedup >= 5,
            "warm_cache_peak_rss_under_300_mb": warm["peak_rss_mb"] < 300,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", choices=["reduced", "full"], default="reduced")
    parser.add_argument("--datasets", nargs="*", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--backbones", nargs="*", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument(
        "--methods", nargs="*", choices=ALL_METHODS, help="methods (default: METHODS)"
    )
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--untuned", action="store_true", help="ignore results/tuning.json")
    parser.add_argument("--name", default="manyclass", help="output file stem under results/")
    parser.add_argument(
        "--random-features", type=int, help="model.random_features: ridge's projection width"
    )
    parser.add_argument(
        "--feature-cache", type=Path, help="keep trunk features here between runs"
    )
    parser.add_argument(
        "--replot", action="store_true", help="redraw the PNG and table from the JSON"
    )
    parser.add_argument("--device", action="store_true", help="measure a device's rounds")
    parser.add_argument("--profile", default="raspberry-pi-4", help="device profile (--device)")
    parser.add_argument("--device-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device_child:
        variant, profile, folder = args.device_child
        print(json.dumps(measure_device(variant, profile, Path(folder))))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.device:
        document = run_device_benchmark(args.profile)
        (RESULTS / "pretrained_device.json").write_text(json.dumps(document, indent=2))
        return
    budget = FULL if args.grid == "full" else REDUCED
    if args.methods:
        budget = replace(budget, methods=tuple(args.methods))
    if args.seeds:
        budget = replace(budget, seeds=tuple(args.seeds))
    budget = replace(budget, threads=args.threads)
    tuned = {} if args.untuned else tuned_values()
    output = RESULTS / f"{args.name}.json"
    if args.replot:
        document = json.loads(output.read_text())
    else:
        model = {} if args.random_features is None else {"random_features": args.random_features}
        document = run_benchmark(
            budget, args.datasets, args.backbones, output, tuned, model, args.feature_cache
        )
    write_plot(document, RESULTS / f"{args.name}.png")
    print(markdown_table(document))


if __name__ == "__main__":
    main()
