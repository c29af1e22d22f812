"""Peak RSS and time of a device's local rounds under each device profile's limits.

    python benchmarks/device_profiles.py      # → results/device_profiles.json  (~3 min)

Each profile runs in its own process (so memory is that device's alone): the demo fleet's first
device, with the profile applied (threads, batch size, expert budget, exemplar cap), holding
only its own share of Fashion-MNIST, runs its first four rounds (task 0 with the backbone, then
the first round of task 1: Fisher, exemplars, FRES). Times are on this x86 machine with the
profile's thread count, not on the device itself.
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


def measure(profile_name: str) -> dict[str, object]:
    profile = load_profile(profile_name)
    fleet = apply_profile(FleetConfig(), profile)
    torch.set_num_threads(profile.threads)
    dataset = load_fleet_dataset(fleet)
    samples, stream = own_partition(fleet, dataset, 0)
    del dataset  # a device holds its own rows only
    device = DeviceLearner("device-000", fleet, samples, stream, seed=0)
    rounds = time_device_rounds(device, fleet, ROUNDS)
    peak = max(float(r["peak_rss_mb"]) for r in rounds)
    return {
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
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    results = {}
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        output = subprocess.run(
            [sys.executable, __file__, "--child", path.stem],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[path.stem] = json.loads(output.strip().splitlines()[-1])
        cell = results[path.stem]
        budget = cell["profile"]["train_memory_mb"]
        print(
            f"{path.stem}: {cell['mean_round_s']:.1f} s per local round, "
            f"peak RSS {cell['peak_rss_mb']:.0f} MB (budget {budget} MB)",
            flush=True,
        )
    document = {"benchmark": "device_profiles", "machine": platform.platform(), "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device_profiles.json").write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
