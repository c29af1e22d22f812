"""Peak RSS and time of a device's local rounds under each device profile's limits.

    python benchmarks/device_profiles.py      # → results/device_profiles.json  (~3 min)
    python benchmarks/device_profiles.py --method ridge --backbone efficientnet_lite0 \\
        --profile raspberry-pi-4  # → results/device_profiles_<method>_<backbone>.json

Each profile runs in its own process (so memory is that device's alone): the demo fleet's first
device, with the profile applied (threads, batch size, expert budget, exemplar cap), holding
only its own share of Fashion-MNIST, runs its first four rounds (task 0 with the backbone, then
the first round of task 1: Fisher, exemplars, FRES). Times are on this x86 machine with the
profile's thread count, not on the device itself.

`--method` and `--backbone` measure another method (a closed-form one sends statistics and
trains nothing) or the frozen pretrained trunk (with the device's feature cache, filled during
these rounds).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fedfmx.benchmark import time_device_rounds
from fedfmx.config import FleetConfig
from fedfmx.device import DeviceLearner
from fedfmx.profiles import PROFILES_DIR, apply_profile, load_profile
from fedfmx.simulation import load_fleet_dataset, own_partition

RESULTS = Path(__file__).parent / "results"
ROUNDS = 4


def measure(profile_name: str, method: str, backbone: str) -> dict[str, object]:
    profile = load_profile(profile_name)
    default = FleetConfig()
    base = FleetConfig.model_validate(
        default.model_dump()
        | {"method": method, "model": default.model.model_dump() | {"backbone": backbone}}
    )
    fleet = apply_profile(base, profile)
    torch.set_num_threads(profile.threads)
    dataset = load_fleet_dataset(fleet)
    samples, stream = own_partition(fleet, dataset, 0)
    del dataset  # a device holds its own rows only
    device = DeviceLearner("device-000", fleet, samples, stream, seed=0)
    rounds = time_device_rounds(device, fleet, ROUNDS)
    peak = max(float(r["peak_rss_mb"]) for r in rounds)
    return {
        "method": method,
        "backbone": backbone,
        "profile": profile.model_dump(),
        "rows_held": len(stream.rows),
        "rounds": rounds,
        "mean_round_s": float(np.mean([r["seconds"] for r in rounds if r["trained"]])),
        "peak_rss_mb": peak,
        "within_memory_budget": peak <= profile.train_memory_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="fedfmx")
    parser.add_argument("--backbone", default="cnn", choices=["cnn", "efficientnet_lite0"])
    parser.add_argument("--profile", action="append", help="profiles to run (default: all)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.method, args.backbone)))
        return
    results = {}
    names = args.profile or [path.stem for path in sorted(PROFILES_DIR.glob("*.yaml"))]
    for name in names:
        output = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--method",
                args.method,
                "--backbone",
                args.backbone,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        cell = results[name]
        budget = cell["profile"]["train_memory_mb"]
        print(
            f"{name}: {cell['mean_round_s']:.1f} s per local round, "
            f"peak RSS {cell['peak_rss_mb']:.0f} MB (budget {budget} MB)",
            flush=True,
        )
    document = {"benchmark": "device_profiles", "machine": platform.platform(), "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    default = args.method == "fedfmx" and args.backbone == "cnn"
    stem = "device_profiles" if default else f"device_profiles_{args.method}_{args.backbone}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
