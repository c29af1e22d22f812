"""Honest tuning: FedFMX and the strongest baseline get the same number of candidate settings,
judged on a validation split carved from the training data (the test set is never read).

    python benchmarks/tune.py

Writes benchmarks/results/tuning.json; `benchmarks/fcil.py --tuned` then runs the test grid with
each method's chosen setting.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fedfmx.config import FleetConfig
from fedfmx.evaluation.benchmark import BENCH_FLEET, REDUCED, run_grid, stat

RESULTS = Path(__file__).parent / "results"
CANDIDATES: dict[str, list[dict[str, dict[str, object]]]] = {
    "fedfmx": [
        {"fedfmx": {"ewc_weight": 10.0}},
        {"fedfmx": {"ewc_weight": 100.0}},
        {"fedfmx": {"ewc_weight": 1000.0}},
        {"fedfmx": {"ewc_weight": 100.0, "max_experts_per_round": 4}},
        {"fedfmx": {"ewc_weight": 10.0}, "training": {"lr": 0.02}},
        {"fedfmx": {"ewc_weight": 10.0}, "training": {"lr": 0.03}},
    ],
    "fedavg_replay": [
        {"training": {"lr": 0.005}},
        {"training": {"lr": 0.01}},
        {"training": {"lr": 0.02}},
        {"training": {"lr": 0.03}},
        {"training": {"lr": 0.04}},
        {"training": {"lr": 0.05}},
    ],
}
"""Six candidates each: FedFMX's stability weight, expert budget and step size; the baseline's
step size (its only free knob at a fixed exemplar budget)."""


def main() -> None:
    base = FleetConfig.model_validate(BENCH_FLEET)
    choices: dict[str, object] = {}
    trials: dict[str, list[dict[str, object]]] = {}
    for method, candidates in CANDIDATES.items():
        trials[method] = []
        for patch in candidates:
            grid = replace(
                REDUCED,
                methods=(method,),
                seeds=(0,),
                tuned={method: patch},
                validation_fraction=0.1,
            )
            document = run_grid(base, grid)
            results = document["results"]
            assert isinstance(results, dict)
            cell = next(iter(results.values()))[method]
            score = stat(cell, "final_accuracy")
            trials[method].append({"setting": patch, "validation_final_accuracy": score})
            print(f"{method} {patch}: validation final accuracy {100 * score:.1f}%", flush=True)
        best = max(trials[method], key=lambda trial: float(trial["validation_final_accuracy"]))  # type: ignore[arg-type]
        choices[method] = best["setting"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tuning.json").write_text(
        json.dumps(
            {"validation_fraction": 0.1, "seed": 0, "trials": trials, "chosen": choices}, indent=2
        )
    )
    print(json.dumps(choices, indent=2))


if __name__ == "__main__":
    main()
