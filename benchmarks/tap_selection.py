"""Choose closed-form FedFMX's trunk taps and widths, and `ridge`'s width, on validation rows.

    python benchmarks/tap_selection.py     # → results/tap_selection.json (seed 0)

Every choice is made on a validation split carved from the *training* rows of each
`manyclass.py` data set (`data.validation_fraction`: 20 % per class; the reduced grid's caps
apply to what is left), never on the test split. The federated head equals the head solved
from the pooled rows' statistics (`tests/test_closed_form_federation.py`), so each candidate is
scored by one pooled ridge solve per `λ` candidate, and the best validation accuracy over
`λ ∈ {1e-4 … 1e-1}·tr(G)/d` counts. Scores are averaged over the four data sets: the fleet
default is one choice, not one per data set.

1. `ridge`: `D` = 2,048 or 4,096 random ReLU features of the pooled trunk output.
2. Closed-form FedFMX: `φ_0` (the pooled tap, `--shared` wide) plus one tap expert
   (`--width`) at a time, ranked by mean validation accuracy; the best-ranked taps that beat
   `φ_0` alone are kept, as many as fit in `--budget` features (the Gram matrix the wire and
   the aggregator carry); then the same taps at other `φ_0` / tap widths of the same total.
   (A greedy forward search, re-ranking after each pick, was started and abandoned: at 1.5 min
   per candidate on the shared machine it did not fit the session.)

Tap vectors are cached on disk (`--cache`, outside the repository) so `manyclass.py
--feature-cache` re-uses them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from manyclass import DATASETS, REDUCED, SETTING, TrunkFeatures, base_fleet, cell_grid
from scipy.linalg import cho_factor, cho_solve

from fedfmx.closed_form.feature_maps import RandomReluFeatures, TapFeatures
from fedfmx.data.datasets import ImageDataset
from fedfmx.evaluation.benchmark import bench_fleet
from fedfmx.trunk.taps import TAPS

RESULTS = Path(__file__).parent / "results"
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)
"""As `AnalyticConfig.lambdas`, in units of `tr(G)/d`."""
DEFAULT_CACHE = Path.home() / ".cache" / "fedfmx-bench-taps"


def validation_taps(name: str, seed: int, features: TrunkFeatures) -> ImageDataset:
    """The data set's reduced-grid training rows as tap vectors, its test split replaced by
    20 % of the training rows (the test split is never loaded)."""
    data = DATASETS[name]
    base = base_fleet(data, "efficientnet_lite0", REDUCED)
    grid = cell_grid(data, "efficientnet_lite0", REDUCED, {})
    fleet = bench_fleet(base, grid, SETTING, "fedfmx_cf", seed)
    fleet = fleet.model_copy(
        update={"data": fleet.data.model_copy(update={"validation_fraction": 0.2})}
    )
    return features(fleet)


def validation_accuracy(
    fit: np.ndarray, fit_y: np.ndarray, val: np.ndarray, val_y: np.ndarray
) -> float:
    """Best accuracy over `LAMBDAS` of the ridge head on one-hot targets, solved by Cholesky in
    the smaller of the primal (`d×d`) and dual (`n×n`) forms (the two give the same head:
    `(ΦᵀΦ + λI)⁻¹Φᵀ Y = Φᵀ(ΦΦᵀ + λI)⁻¹ Y`)."""
    classes = np.unique(fit_y)
    targets = (fit_y[:, None] == classes[None, :]).astype(np.float64)
    phi, test = fit.astype(np.float64), val.astype(np.float64)
    n, d = phi.shape
    primal = d <= n
    gram = phi.T @ phi if primal else phi @ phi.T
    right = phi.T @ targets if primal else targets
    scale = float(np.trace(gram)) / d  # tr(G)/d, the unit of λ
    best = 0.0
    for factor in LAMBDAS:
        solved = cho_solve(cho_factor(gram + factor * scale * np.eye(len(gram))), right)
        scores = test @ solved if primal else (test @ phi.T) @ solved
        best = max(best, float(np.mean(classes[np.argmax(scores, axis=1)] == val_y)))
    return best


def head_features(taps: np.ndarray, blocks: Sequence[tuple[str, int]], seed: int) -> np.ndarray:
    """`[φ_0; φ_1; …]` of tap vectors: one `TapFeatures` per (tap, width), seeded in order."""
    rng = np.random.default_rng(seed)
    tensor = torch.from_numpy(taps)
    with torch.no_grad():
        parts = [
            TapFeatures(tap, width, int(rng.integers(2**31 - 1)))(tensor).numpy()
            for tap, width in blocks
        ]
    return np.concatenate(parts, axis=1)


def ridge_features(taps: np.ndarray, width: int, seed: int) -> np.ndarray:
    """`ridge` on the trunk: `ReLU(R·u)` of the pooled features (the tap vector's prefix)."""
    with torch.no_grad():
        pooled = torch.from_numpy(taps[:, : TAPS[0].width])
        return RandomReluFeatures(width, seed)(pooled).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=4096, help="most head features")
    parser.add_argument("--shared", type=int, default=1024, help="φ_0 width while greedy")
    parser.add_argument("--width", type=int, default=1024, help="tap width while greedy")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--datasets", nargs="*", choices=list(DATASETS), default=list(DATASETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    features = TrunkFeatures.open(args.cache, taps=True)
    data = {name: validation_taps(name, args.seed, features) for name in args.datasets}
    print(f"trunk taps: {features.seconds:.0f} s", flush=True)

    def score(make: object) -> dict[str, float]:
        assert callable(make)
        cells = {
            name: validation_accuracy(make(d.train_x), d.train_y, make(d.test_x), d.test_y)
            for name, d in data.items()
        }
        return cells | {"mean": float(np.mean(list(cells.values())))}

    report: dict[str, object] = {"seed": args.seed, "validation_fraction": 0.2}
    ridge = {
        str(width): score(lambda x, w=width: ridge_features(x, w, args.seed))
        for width in (2048, 4096)
    }
    for width, cell in ridge.items():
        print(f"ridge D={width}: {cell}", flush=True)
    report["ridge"] = ridge
    base = score(lambda x: head_features(x, [("pool", args.shared)], args.seed))
    print(f"phi_0 alone: {base}", flush=True)
    singles = {}
    for tap in (tap.name for tap in TAPS[1:]):
        blocks = [("pool", args.shared), (tap, args.width)]
        singles[tap] = score(lambda x, b=blocks: head_features(x, b, args.seed))
        print(f"  + {tap}: {singles[tap]}", flush=True)
    ranked = sorted(singles, key=lambda tap: -singles[tap]["mean"])
    room = (args.budget - args.shared) // args.width
    chosen = [tap for tap in ranked[:room] if singles[tap]["mean"] > base["mean"]]
    blocks = [("pool", args.shared), *((t, args.width) for t in chosen)]
    best = score(lambda x: head_features(x, blocks, args.seed))
    print(f"phi_0 + {chosen}: {best}", flush=True)
    steps = {"phi_0 alone": base, "single taps": singles, "chosen together": best}
    report["ranking"] = steps
    total = args.shared + args.width * len(chosen)
    shapes = {f"{args.shared}+{len(chosen)}x{args.width}": best}
    if chosen:
        for shared in (total // 2, total // 8):
            width = (total - shared) // len(chosen)
            blocks = [("pool", shared), *((t, width) for t in chosen)]
            label = f"{shared}+{len(chosen)}x{width}"
            shapes[label] = score(lambda x, b=blocks: head_features(x, b, args.seed))
            print(f"{label}: {shapes[label]}", flush=True)
    report["widths"] = shapes
    shape = max(shapes, key=lambda label: shapes[label]["mean"])
    ridge_width = max(ridge, key=lambda width: ridge[width]["mean"])
    report["chosen"] = {"expert_taps": chosen, "shape": shape, "ridge_width": int(ridge_width)}
    print(f"chosen: {report['chosen']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tap_selection.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
