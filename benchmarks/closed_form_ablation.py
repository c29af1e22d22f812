"""What each part of the closed-form FedFMX (`fedfmx_cf`) is worth, on pooled statistics.

    python benchmarks/closed_form_ablation.py   # → results/closed_form_ablation.{json,png}

The federated closed-form head *equals* the head solved from the pooled rows' statistics, for
any split, lag and task order (`tests/test_closed_form_federation.py` checks it through the
engine), so its final accuracy is measured here without the federation: every training row of
the reduced Split Fashion-MNIST slice through the `fedfmx_cf` feature map, one ridge solve per
variant. `λ` is chosen per variant on a validation split of the training rows (10 % per class);
the test set is read once, for the chosen `λ`.

Variants: every expert (`fedfmx_cf`); no experts (the shared projection `φ_0` alone, i.e.
`fedfmx_cf_no_experts`); each expert left out; and the experts gated per sample by AES
(`fedfmx.learner.routing.aes_mask` over a fixed random router on `φ_0`, each expert's block scaled
by its renormalised gate), to see whether sparse routing helps an exact head.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from fedfmx.closed_form.head import FeatureStatistics, solve_head
from fedfmx.config import FleetConfig
from fedfmx.data.datasets import load_dataset, subsample
from fedfmx.evaluation.benchmark import BENCH_FLEET
from fedfmx.federation.simulation import holdout_validation
from fedfmx.learner.model import build_model
from fedfmx.learner.routing import aes_mask

RESULTS = Path(__file__).parent / "results"
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)
"""Candidates in units of `tr(G)/d`, as `AnalyticConfig.lambdas`."""


def accuracy(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, lam: float
) -> float:
    names = [str(y) for y in train_y]
    classes = sorted(set(names))
    stats = FeatureStatistics.of(train, names)
    head = solve_head(stats, classes, lam * np.trace(stats.gram) / stats.dim)
    predicted = np.array(classes)[np.argmax(test @ head.T, axis=1)]
    return float(np.mean(predicted == np.array([str(y) for y in test_y])))


def gate(features: np.ndarray, router: np.ndarray, blocks: list[slice], shared: int) -> np.ndarray:
    """AES over a fixed random router on `φ_0`: expert blocks scaled by their gate weights."""
    logits = features[:, :shared] @ router
    logits = (logits - logits.mean(axis=0)) / logits.std(axis=0)
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    mask = aes_mask(probs, tau=0.05, cost=0.05, k_min=1, k_max=len(blocks)).numpy()
    weights = probs.numpy() * mask
    weights = weights / weights.sum(axis=1, keepdims=True)
    gated = features.copy()
    for e, block in enumerate(blocks):
        gated[:, block] *= weights[:, e : e + 1]
    return gated


def run_seed(seed: int) -> dict[str, dict[str, float]]:
    fleet = FleetConfig.model_validate(BENCH_FLEET | {"method": "fedfmx_cf", "seed": seed})
    data = subsample(load_dataset("fashion_mnist", None), 600, 300, seed)
    tuning = holdout_validation(data, 0.1, seed)
    network = build_model(fleet.network, fleet.routing, 0, seed)
    with torch.no_grad():
        phi = {
            part: network.closed_form_features(torch.from_numpy(x)).double().numpy()
            for part, x in (
                ("fit", tuning.train_x),
                ("validation", tuning.test_x),
                ("train", data.train_x),
                ("test", data.test_x),
            )
        }
    shared = fleet.model.shared_features
    per_expert = fleet.model.expert_filters * fleet.model.expert_grid**2
    widths = [per_expert] * len(fleet.model.expert_kernels)
    starts = np.cumsum([shared, *widths])
    blocks = [slice(int(a), int(b)) for a, b in itertools.pairwise(starts)]
    router = np.random.default_rng(seed).standard_normal((shared, len(blocks)))
    total = int(starts[-1])
    variants: dict[str, np.ndarray | str] = {
        "every expert (fedfmx_cf)": np.arange(total),
        "no experts (phi_0 alone)": np.arange(shared),
        **{
            f"without expert {e} (kernel {k})": np.setdiff1d(np.arange(total), np.r_[block])
            for e, (block, k) in enumerate(zip(blocks, fleet.model.expert_kernels, strict=True))
        },
        "AES-gated experts": "gated",
    }
    cells = {}
    for label, columns in variants.items():
        if isinstance(columns, str):
            view = {p: gate(f, router, blocks, shared) for p, f in phi.items()}
        else:
            view = {p: f[:, columns] for p, f in phi.items()}
        scores = [
            accuracy(view["fit"], tuning.train_y, view["validation"], tuning.test_y, lam)
            for lam in LAMBDAS
        ]
        lam = LAMBDAS[int(np.argmax(scores))]
        cells[label] = {
            "validation_accuracy": max(scores),
            "lambda": lam,
            "test_accuracy": accuracy(view["train"], data.train_y, view["test"], data.test_y, lam),
        }
        print(f"seed {seed} {label}: {100 * cells[label]['test_accuracy']:.1f}%", flush=True)
    return cells


def main() -> None:
    torch.set_num_threads(1)
    runs = {seed: run_seed(seed) for seed in (0, 1, 2)}
    labels = list(runs[0])
    summary = {
        label: {
            "mean": float(np.mean([runs[s][label]["test_accuracy"] for s in runs])),
            "std": float(np.std([runs[s][label]["test_accuracy"] for s in runs])),
        }
        for label in labels
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "closed_form_ablation",
        "data": "Split Fashion-MNIST slice: 600 train / 300 test images per class",
        "runs": runs,
        "summary": summary,
    }
    (RESULTS / "closed_form_ablation.json").write_text(json.dumps(document, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    means = [100 * summary[label]["mean"] for label in labels]
    spreads = [100 * summary[label]["std"] for label in labels]
    axis.barh(labels, means, xerr=spreads, color="tab:red")
    axis.set_xlim(min(means) - 5, 100)
    axis.set_xlabel("test accuracy, all 10 classes (%, mean of 3 seeds)")
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(RESULTS / "closed_form_ablation.png", dpi=110)
    plt.close(figure)
    for label in labels:
        print(
            f"| {label} | {means[labels.index(label)]:.1f} ± {spreads[labels.index(label)]:.1f} |"
        )


if __name__ == "__main__":
    main()
