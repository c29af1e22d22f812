"""Robust merges against hostile devices, on the FCIL setting (issue 7, DESIGN §6).

    nice -n 19 python benchmarks/robustness.py --seeds 0 1   # 28 runs a seed, 25 min on 2 cores
    python benchmarks/robustness.py --probe                  # one clean run: time, update norms

FedFMX (tuned values of results/tuning.json) on Split Fashion-MNIST, 10 devices, alpha=0.5,
lag 1, a reduced data slice. 0, 1 or 2 of the 10 devices train honestly and then send a hostile
update instead of their own delta `δ` (every delta tensor: experts, router, backbone, head rows;
the Fisher summaries and the header stay honest):

- `sign_flip`: `-δ`;
- `scale`: `10·δ`;
- `random`: Gaussian noise rescaled to `‖δ‖₂`.

Each scenario runs under the plain mean (`robustness: {}`), norm clipping at the median norm
of the honest updates of the clean run (`clip_norm`), the coordinate-wise median and the
trimmed mean (`trim_fraction: 0.2`), and the plain mean with a reject bound
(`max_update_norm`) at 4x the median honest norm (`reject`). Updates the aggregator rejects
(beyond its norm bound, non-finite) are counted. Writes results/robustness.json and .png,
prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedfmx.config import FleetConfig, RobustnessConfig
from fedfmx.data.datasets import ImageDataset
from fedfmx.evaluation.benchmark import BENCH_FLEET
from fedfmx.federation.aggregation import FISHER_PREFIX, delta_norm
from fedfmx.federation.rounds import MAX_UPDATE_BYTES, expected_update_shapes
from fedfmx.federation.simulation import device_id, load_fleet_dataset, run_inproc
from fedfmx.wire.codec import decode_update, encode_update

RESULTS = Path(__file__).parent / "results"
ATTACKS = ("sign_flip", "scale", "random")
MERGES = ("mean", "clip", "median", "trimmed_mean", "reject")
SCALE = 10.0
TRIM_FRACTION = 0.2
REJECT_FACTOR = 4.0
"""`reject`: the plain mean, refusing updates whose norm exceeds this many median honest norms."""
NO_BOUND = float("inf")
"""Hostile updates are decoded without a norm bound: the device alters what it would send."""


@dataclass
class Hostility:
    """The benchmark's `tamper` hook: hostile devices alter their update, honest ones are
    measured (their delta norms choose the clipping bound)."""

    attack: str | None
    hostile: frozenset[str]
    rng: np.random.Generator
    honest_norms: list[float] = field(default_factory=list)
    hostile_norms: list[float] = field(default_factory=list)

    def __call__(self, device: str, payload: bytes, weights: Mapping[str, np.ndarray]) -> bytes:
        header, tensors = decode_update(
            payload,
            lambda h: expected_update_shapes(h, weights),
            max_bytes=MAX_UPDATE_BYTES,
            norm_bound=NO_BOUND,
        )
        if self.attack is None or device not in self.hostile:
            self.honest_norms.append(delta_norm(tensors))
            return payload
        altered = self.alter(tensors)
        self.hostile_norms.append(delta_norm(altered))
        return encode_update(header, altered).payload

    def alter(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        deltas = {n: v for n, v in tensors.items() if not n.startswith(FISHER_PREFIX)}
        if self.attack == "sign_flip":
            changed = {n: -v for n, v in deltas.items()}
        elif self.attack == "scale":
            changed = {n: SCALE * v for n, v in deltas.items()}
        elif self.attack == "random":
            noise = {n: self.rng.normal(size=v.shape) for n, v in deltas.items()}
            factor = delta_norm(deltas) / max(delta_norm(noise), 1e-12)
            changed = {n: factor * v for n, v in noise.items()}
        else:
            raise ValueError(f"unknown attack {self.attack!r}")
        out = dict(tensors)
        out.update({n: v.astype(np.float32) for n, v in changed.items()})
        return out


def robustness_for(merge: str, honest_norm: float) -> RobustnessConfig:
    if merge == "clip":
        return RobustnessConfig(clip_norm=honest_norm)
    if merge == "reject":
        return RobustnessConfig(max_update_norm=REJECT_FACTOR * honest_norm)
    if merge == "trimmed_mean":
        return RobustnessConfig(merge="trimmed_mean", trim_fraction=TRIM_FRACTION)
    if merge == "median":
        return RobustnessConfig(merge="median")
    return RobustnessConfig()


@dataclass(frozen=True)
class Budget:
    """The data slice and threads of a run: the FCIL benchmark's reduced slice, one thread."""

    train_per_class: int = 600
    test_per_class: int = 300
    threads: int = 1
    """Torch threads: on 2 cores shared with other jobs, 2 threads ran a run 10x slower."""

    def fleet(self, seed: int) -> FleetConfig:
        """The FCIL benchmark fleet (alpha=0.5, lag 1) with FedFMX's tuned values."""
        document = dict(BENCH_FLEET) | {"method": "fedfmx", "seed": seed}
        tuning = RESULTS / "tuning.json"
        tuned = json.loads(tuning.read_text())["chosen"]["fedfmx"] if tuning.exists() else {}
        document |= {section: dict(values) for section, values in tuned.items()}
        document["training"] = dict(tuned.get("training", {})) | {"threads": self.threads}
        document["data"] = {
            "dataset": "fashion_mnist",
            "train_per_class": self.train_per_class,
            "test_per_class": self.test_per_class,
        }
        protocol = dict(BENCH_FLEET["protocol"])  # type: ignore[call-overload]
        document["protocol"] = protocol | {"alpha": 0.5, "max_lag": 1}
        return FleetConfig.model_validate(document)


def one_run(
    fleet: FleetConfig,
    dataset: ImageDataset,
    attack: str | None,
    hostile: int,
    merge: str,
    clip_norm: float,
) -> tuple[dict[str, object], Hostility]:
    fleet = fleet.model_copy(update={"robustness": robustness_for(merge, clip_norm)})
    hostility = Hostility(
        attack,
        frozenset(device_id(k) for k in range(hostile)),
        np.random.default_rng(fleet.seed),
    )
    result = run_inproc(fleet, dataset, tamper=hostility)
    run: dict[str, object] = {
        "seed": fleet.seed,
        "final_accuracy": result.final_accuracy,
        "average_incremental_accuracy": result.average_incremental_accuracy,
        "accepted": sum(r.updates for r in result.rounds),
        "rejected": sum(r.rejected for r in result.rounds),
        "hostile_sent": len(hostility.hostile_norms),
        "hostile_norm_median": float(np.median(hostility.hostile_norms))
        if hostility.hostile_norms
        else None,
        "wall_time_s": result.wall_time_s,
    }
    return run, hostility


def scenario_label(attack: str | None, hostile: int) -> str:
    return "clean" if attack is None else f"{attack} x{hostile}"


Runs = dict[str, dict[str, list[dict[str, object]]]]
"""scenario label -> merge -> one entry per seed."""


def run_benchmark(
    seeds: Sequence[int],
    attacks: Sequence[str],
    hostile_counts: Sequence[int],
    merges: Sequence[str],
    budget: Budget,
    clip_norm: float | None,
    on_seed: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """Every scenario under every merge, seed by seed; `on_seed` gets the document so far."""
    started = time.perf_counter()
    scenarios: list[tuple[str | None, int]] = [(None, 0)] + [
        (a, h) for a in attacks for h in hostile_counts if h > 0
    ]
    runs: Runs = {scenario_label(a, h): {m: [] for m in merges} for a, h in scenarios}
    norms: dict[str, dict[str, float]] = {}
    grid = {
        "method": "fedfmx",
        "seeds": [],
        "num_clients": 10,
        "attacks": list(attacks),
        "hostile_counts": [0, *hostile_counts],
        "merges": list(merges),
        "scale": SCALE,
        "trim_fraction": TRIM_FRACTION,
        "clip_norm": "median honest update norm of the seed's clean mean run"
        if clip_norm is None
        else clip_norm,
        "budget": asdict(budget),
    }
    document: dict[str, object] = {}
    for seed in seeds:
        fleet = budget.fleet(seed)
        dataset = load_fleet_dataset(fleet)
        # the clean mean run first: its honest update norms set the clipping bound
        run, probe = one_run(fleet, dataset, None, 0, "mean", NO_BOUND)
        if "mean" in merges:
            runs["clean"]["mean"].append(run)
        quantiles = np.percentile(probe.honest_norms, [10, 50, 90, 100])
        norms[str(seed)] = dict(
            zip(("p10", "median", "p90", "max"), map(float, quantiles), strict=True)
        )
        bound = clip_norm if clip_norm is not None else norms[str(seed)]["median"]
        print(f"seed {seed}: honest norms {norms[str(seed)]}, clip_norm {bound:.3g}", flush=True)
        for attack, hostile in scenarios:
            label = scenario_label(attack, hostile)
            for merge in merges:
                if label == "clean" and merge == "mean":
                    continue
                run, _ = one_run(fleet, dataset, attack, hostile, merge, bound)
                run["clip_norm"] = bound if merge == "clip" else None
                run["max_update_norm"] = REJECT_FACTOR * bound if merge == "reject" else None
                runs[label][merge].append(run)
                accuracy = 100 * float(run["final_accuracy"])  # type: ignore[arg-type]
                print(
                    f"seed {seed} {label} {merge}: final {accuracy:.1f}%, "
                    f"rejected {run['rejected']} of {run['hostile_sent']} hostile",
                    flush=True,
                )
        grid["seeds"] = [*grid["seeds"], seed]  # type: ignore[misc]
        document = {
            "benchmark": "robustness",
            "dataset": "fashion_mnist",
            "grid": grid,
            "honest_update_norms": norms,
            "machine": {
                "cpus": len(os.sched_getaffinity(0)),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "total_wall_time_s": time.perf_counter() - started,
            "results": {
                label: {merge: summarise(cell) for merge, cell in by_merge.items()}
                for label, by_merge in runs.items()
            },
        }
        if on_seed is not None:
            on_seed(document)
    return document


def summarise(runs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    accuracy = [float(r["final_accuracy"]) for r in runs]  # type: ignore[arg-type]
    return {
        "final_accuracy": {"mean": float(np.mean(accuracy)), "std": float(np.std(accuracy))},
        "rejected": sum(int(r["rejected"]) for r in runs),  # type: ignore[call-overload]
        "hostile_sent": sum(int(r["hostile_sent"]) for r in runs),  # type: ignore[call-overload]
        "runs": list(runs),
    }


def markdown_table(document: Mapping[str, object]) -> str:
    """Scenario x merge: final accuracy (mean ± std over seeds), rejected / hostile sent."""
    results = document["results"]
    assert isinstance(results, Mapping)
    merges = list(next(iter(results.values())))
    lines = [
        "| scenario | "
        + " | ".join(f"{m} final acc (%)" for m in merges)
        + " | rejected / hostile sent |",
        "|---|" + "---|" * (len(merges) + 1),
    ]
    for label, cells in results.items():
        accuracy = [
            f"{100 * c['final_accuracy']['mean']:.1f} ± {100 * c['final_accuracy']['std']:.1f}"
            for c in cells.values()
        ]
        rejected = sum(c["rejected"] for c in cells.values())
        sent = sum(c["hostile_sent"] for c in cells.values())
        lines.append(f"| {label} | " + " | ".join(accuracy) + f" | {rejected} of {sent} |")
    return "\n".join(lines)


def plot(document: Mapping[str, object], path: Path) -> None:
    """Grouped bars: final accuracy per scenario, one bar per merge."""
    results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]] = document["results"]  # type: ignore[assignment]
    labels = list(results)
    merges = list(next(iter(results.values())))
    width = 0.8 / len(merges)
    figure, axes = plt.subplots(figsize=(9.0, 4.2))
    for i, merge in enumerate(merges):
        means = [100 * results[label][merge]["final_accuracy"]["mean"] for label in labels]
        stds = [100 * results[label][merge]["final_accuracy"]["std"] for label in labels]
        positions = np.arange(len(labels)) + (i - (len(merges) - 1) / 2) * width
        axes.bar(positions, means, width, yerr=stds, label=merge, capsize=2)
    axes.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel("final accuracy (%)")
    grid = document["grid"]
    assert isinstance(grid, Mapping)
    axes.set_title(
        f"FedFMX, Split Fashion-MNIST, 10 devices, hostile devices (x1, x2): "
        f"{len(grid['seeds'])} seed(s)"
    )
    axes.set_ylim(0, 75)
    axes.legend(title="merge", fontsize=8, ncol=len(merges), loc="upper center")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(document: dict[str, object], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=2))
    plot(document, RESULTS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--attacks", nargs="*", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--hostile", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--merges", nargs="*", choices=MERGES, default=list(MERGES))
    parser.add_argument("--train-per-class", type=int, default=Budget.train_per_class)
    parser.add_argument("--test-per-class", type=int, default=Budget.test_per_class)
    parser.add_argument("--threads", type=int, default=Budget.threads)
    parser.add_argument(
        "--clip-norm", type=float, help="default: median honest norm of the clean run"
    )
    parser.add_argument("--probe", action="store_true", help="one clean mean run, no outputs")
    parser.add_argument("--name", default="robustness", help="output file stem under results/")
    args = parser.parse_args()
    budget = Budget(args.train_per_class, args.test_per_class, args.threads)
    if args.probe:
        fleet = budget.fleet(args.seeds[0])
        run, probe = one_run(fleet, load_fleet_dataset(fleet), None, 0, "mean", NO_BOUND)
        quantiles = np.percentile(probe.honest_norms, [10, 50, 90, 100])
        print(run)
        print("honest norms p10 / median / p90 / max: " + " / ".join(f"{q:.3g}" for q in quantiles))
        return
    document = run_benchmark(
        args.seeds,
        args.attacks,
        args.hostile,
        args.merges,
        budget,
        args.clip_norm,
        on_seed=lambda partial: write_outputs(partial, args.name),
    )
    print(markdown_table(document))


if __name__ == "__main__":
    main()
