"""Closed-form heads on the Lite0 trunk from the fleet's final sums: FRES, `no_fres`, `ridge`.

    python benchmarks/closed_form_taps.py    # → results/closed_form_taps.{json,png}

The federated closed-form head equals the head solved from the statistics of every row the
devices met (`tests/test_closed_form_federation.py`, `tests/test_trunk_taps.py`), so the final
state of a `manyclass.py` run (reduced grid, α 0.5, lag ≤ 1) is rebuilt here without the
federation: each device's rows (`make_plan`) through the `fedfmx_cf` feature map of the engine
(`build_model(fleet.network)`), summed per fold of devices as the aggregator folds them
(`fold_of`). Then, with `λ` chosen by the folds' held-out squared error (`choose_lambda`):

- `fedfmx_cf (no_fres)`: the head on every block;
- `fedfmx_cf + fres`: the head on the blocks `fres_block_scores` keeps (score > 0; newest
  classes = the last task's), `φ_0` always kept;
- `fedfmx_cf_no_experts` and `ridge` at each `--ridge` width, on their own feature maps.

`λ` here comes from the folds' held-out error, where the engine uses prequential accuracy
(`fedfmx.closed_form.state`): the heads equal the engine's up to that choice of `λ`.

The test split is read once per variant, after every choice is made.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from manyclass import DATASETS, REDUCED, SETTING, TrunkFeatures, base_fleet, cell_grid

from fedfmx.closed_form.fres import fres_block_scores, fres_keep
from fedfmx.closed_form.head import (
    FeatureStatistics,
    choose_lambda,
    merged,
    ridge_scale,
    solve_head,
)
from fedfmx.closed_form.state import fold_of
from fedfmx.config import FleetConfig
from fedfmx.data.datasets import ImageDataset
from fedfmx.evaluation.benchmark import bench_fleet
from fedfmx.federation.simulation import make_plan
from fedfmx.learner.model import build_model

RESULTS = Path(__file__).parent / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "fedfmx-bench-taps"


@dataclass
class FinalSums:
    """The fleet's sums after the last round, per fold of devices, and the test rows' `φ`."""

    folds: list[FeatureStatistics]
    test: np.ndarray
    classes: list[str]
    """Registry order: the plan's tasks, in order."""
    newest: list[str]
    truth: np.ndarray

    def head_lambda(self) -> float:
        lam = choose_lambda(self.folds, self.classes, LAMBDAS)
        return LAMBDAS[2] * ridge_scale(self.total()) if lam is None else lam

    def total(self) -> FeatureStatistics:
        return merged(self.folds, self.folds[0].dim)

    def accuracy(self, columns: np.ndarray, lam: float) -> float:
        """Test accuracy of the head solved on `columns` of `φ` (the test split's one read)."""
        total = self.total()
        sub = FeatureStatistics(
            total.gram[np.ix_(columns, columns)],
            {n: m[columns] for n, m in total.moments.items()},
            dict(total.counts),
        )
        head = solve_head(sub, self.classes, lam)
        predicted = np.array(self.classes)[np.argmax(self.test[:, columns] @ head.T, axis=1)]
        return float(np.mean(predicted == self.truth))


LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)
"""`AnalyticConfig.lambdas`, in units of `tr(G)/d`."""


def final_sums(fleet: FleetConfig, dataset: ImageDataset) -> FinalSums:
    """Every row each device met (`make_plan`), through the method's engine feature map,
    summed into the device's fold (`fold_of`), as the aggregator holds them at the end."""
    plan = make_plan(fleet, dataset)
    network = build_model(fleet.network, fleet.routing, 0, fleet.seed)
    with torch.no_grad():
        train = network.closed_form_features(torch.from_numpy(dataset.train_x)).double().numpy()
        test = network.closed_form_features(torch.from_numpy(dataset.test_x)).double().numpy()
    names = np.array(dataset.class_names)
    folds = [FeatureStatistics.empty(train.shape[1]) for _ in range(fleet.analytic.folds)]
    for client in range(fleet.protocol.num_clients):
        rows = np.concatenate([task[client] for task in plan.client_indices])
        fold = fold_of(f"device-{client:03d}", fleet.analytic.folds)
        folds[fold].add(FeatureStatistics.of(train[rows], names[dataset.train_y[rows]]))
    return FinalSums(
        folds=folds,
        test=test,
        classes=[str(names[label]) for task in plan.tasks for label in task],
        newest=[str(names[label]) for label in plan.tasks[-1]],
        truth=names[dataset.test_y],
    )


def run_cell(name: str, seed: int, features: TrunkFeatures, ridge: Sequence[int]) -> dict[str, Any]:
    data = DATASETS[name]
    base = base_fleet(data, "efficientnet_lite0", REDUCED)
    grid = cell_grid(data, "efficientnet_lite0", REDUCED, {})
    fleet = bench_fleet(base, grid, SETTING, "fedfmx_cf", seed)
    dataset = features(fleet)
    sums = final_sums(fleet, dataset)
    lam = sums.head_lambda()
    model = fleet.model
    widths = [model.trunk_shared_features] + [model.tap_features] * len(model.expert_taps)
    edges = np.cumsum([0, *widths])
    blocks = [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]
    scores = fres_block_scores(sums.folds, blocks, sums.classes, sums.newest, lam)
    keep = fres_keep(scores)
    keep[0] = True  # φ_0, the shared block, is not an expert
    kept = np.concatenate(
        [np.arange(b.start, b.stop) for b, k in zip(blocks, keep, strict=True) if k]
    )
    labels = ["phi_0 (pool)", *model.expert_taps]
    cell: dict[str, Any] = {
        "blocks": labels,
        "fres_scores": scores.tolist(),
        "kept": [label for label, k in zip(labels, keep, strict=True) if k],
        "lambda": lam,
        "fedfmx_cf (no_fres)": sums.accuracy(np.arange(int(edges[-1])), lam),
        "fedfmx_cf + fres": sums.accuracy(kept, lam),
    }
    del sums
    others = [("fedfmx_cf_no_experts", fleet.model.shared_features)] + [
        ("ridge", width) for width in ridge
    ]
    for method, width in others:
        other = bench_fleet(base, grid, SETTING, method, seed)
        if method == "ridge":
            other = other.model_copy(
                update={"model": other.model.model_copy(update={"random_features": width})}
            )
        sums = final_sums(other, dataset)
        label = method if method != "ridge" else f"ridge D={width}"
        cell[label] = sums.accuracy(np.arange(sums.test.shape[1]), sums.head_lambda())
        del sums
    print(f"{name} seed {seed}: {cell}", flush=True)
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="*", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--ridge", nargs="*", type=int, default=[2048, 4096], help="ridge D")
    args = parser.parse_args()
    torch.set_num_threads(1)
    features = TrunkFeatures.open(args.cache, taps=True)
    runs = {
        name: {str(seed): run_cell(name, seed, features, args.ridge) for seed in args.seeds}
        for name in args.datasets
    }
    summary = {
        name: {
            variant: {
                "mean": float(np.mean([c[variant] for c in cells.values()])),
                "std": float(np.std([c[variant] for c in cells.values()])),
            }
            for variant in next(iter(cells.values()))
            if variant not in ("blocks", "fres_scores", "kept", "lambda")
        }
        for name, cells in runs.items()
    }
    document = {
        "benchmark": "closed_form_fres",
        "setting": SETTING.label,
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "closed_form_taps.json").write_text(json.dumps(document, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    variants = list(next(iter(summary.values())))
    bar = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        means = [100 * summary[n][variant]["mean"] for n in runs]
        stds = [100 * summary[n][variant]["std"] for n in runs]
        axis.bar(np.arange(len(runs)) + bar * i - 0.4, means, bar, yerr=stds, label=variant)
    axis.set_xticks(np.arange(len(runs)), list(runs))
    axis.set_ylabel("final accuracy (%)")
    axis.set_title("closed-form heads on the Lite0 trunk, from the fleet's final sums")
    axis.set_ylim(0, 100)
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "closed_form_taps.png", dpi=110)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
