"""FCIL benchmark: FedFMX against federated continual-learning baselines and ablations.

    python benchmarks/fcil.py                 # reduced grid (Split Fashion-MNIST slice, 3 seeds)
    python benchmarks/fcil.py --grid full     # every setting, full data (hours on 2 cores)
    python benchmarks/fcil.py --settings all  # reduced data, α 0.5 and 0.1, with and without lag
    python benchmarks/fcil.py --setting 0.1,1 # reduced data, one setting (α, lag)

Writes benchmarks/results/fcil_fmnist.json and .png, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from fedfmx.config import load_fleet
from fedfmx.evaluation.benchmark import (
    FULL,
    FULL_SETTINGS,
    REDUCED,
    Setting,
    markdown_table,
    run_grid,
    write_outputs,
)

RESULTS = Path(__file__).parent / "results"
FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "fcil-fmnist.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", choices=["reduced", "full"], default="reduced")
    parser.add_argument("--methods", nargs="*", help="subset of methods (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default: 0 1 2)")
    parser.add_argument(
        "--settings",
        choices=["grid", "all"],
        default="grid",
        help="the grid's own settings, or all four (α 0.5 / 0.1, lag 0 / 1)",
    )
    parser.add_argument(
        "--setting", action="append", help="ALPHA,LAG (repeatable): these settings instead"
    )
    parser.add_argument("--fleet", type=Path, default=FLEET)
    parser.add_argument("--name", default="fcil_fmnist", help="output file stem under results/")
    parser.add_argument(
        "--tuned", action="store_true", help="apply results/tuning.json (from benchmarks/tune.py)"
    )
    args = parser.parse_args()
    grid = FULL if args.grid == "full" else REDUCED
    if args.methods:
        grid = replace(grid, methods=tuple(args.methods))
    if args.seeds:
        grid = replace(grid, seeds=tuple(args.seeds))
    if args.settings == "all":
        grid = replace(grid, settings=FULL_SETTINGS)
    if args.setting:
        chosen_settings = []
        for text in args.setting:
            alpha, lag = text.split(",")
            chosen_settings.append(Setting(float(alpha), int(lag)))
        grid = replace(grid, settings=tuple(chosen_settings))
    if args.tuned:
        chosen = json.loads((RESULTS / "tuning.json").read_text())["chosen"]
        # FedFMX's ablations remove one component from the tuned FedFMX, not from the defaults
        for ablation in ("no_fres", "fixed_topk", "no_rar"):
            chosen.setdefault(ablation, chosen["fedfmx"])
        # weight aligning is added to the tuned replay baseline, not tuned apart
        chosen.setdefault("fedavg_replay_wa", chosen["fedavg_replay"])
        grid = replace(grid, tuned=chosen)
    document = run_grid(load_fleet(args.fleet), grid, progress=lambda line: print(line, flush=True))
    write_outputs(document, RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.png")
    print(markdown_table(document))


if __name__ == "__main__":
    main()
