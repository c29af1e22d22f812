"""Buffered (FedBuff-style) against synchronous rounds, with one device 5x slower (issue 17).

The demo fleet (Split Fashion-MNIST, 5 tasks x 2 classes, 5 non-IID devices, lag 1) over a
local Mosquitto: the real aggregator in this process, each device its own `fedfmx-edge join`
process (one torch thread each), device-000 slowed down 5x (`data.slowdown: 5`: after each
local round it waits 4x that round's training time). Two runs:

- `synchronous`: the demo's 15 rounds (3 per task); every round waits for the slow device;
- `buffered`: `service.mode: buffered` with K = 3 of 5 updates per version and 5 versions per
  task (25 versions), so both runs take about the same number of device rounds (15 per task).

Every new version is kept as it is made (time, version, updates accepted so far) and scored
afterwards on all 10 classes of the test set (300 images a class by default), so scoring
costs neither run any time.
Reported: accuracy after the same wall-clock budget (the shorter run's duration) and after
the same number of device rounds (accepted updates), the curves in a PNG.

    nice -n 19 python benchmarks/buffered_async.py --train-per-class 600   # the README's runs
    nice -n 19 python benchmarks/buffered_async.py --train-per-class 600 --max-staleness 16 \
        --name buffered_async_staleness16
    nice -n 19 python benchmarks/buffered_async.py     # the full demo data: ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml

from aggregator.provisioning import signing_key_files
from aggregator.service import ServiceHooks, open_aggregator
from aggregator.state import RoundTotals
from edge_client.config import DeviceConfig, PartitionSource, save_device_config
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.federation.rounds import GlobalModel
from fedfmx.federation.simulation import device_id, evaluate, load_fleet_dataset, make_plan
from fedfmx.profiles import load_profile
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model
from transport import MosquittoBroker

RESULTS = Path(__file__).parent / "results"
DEMO = Path(__file__).parent.parent / "device_configs" / "fleets" / "demo.yaml"
SLOW_DEVICE = 0
SLOWDOWN = 5.0


def mode_fleet(
    mode: str, url: str, private_key: Path, data: tuple[int | None, int], max_staleness: int
) -> FleetConfig:
    """The demo fleet in `mode`: buffered takes 5 versions of K = 3 per task (15 device rounds
    a task, as the synchronous 3 rounds of 5)."""
    document = load_fleet(DEMO).model_dump(mode="json") | {"method": "fedfmx"}  # SGD updates
    document["data"]["train_per_class"] = data[0]
    document["data"]["test_per_class"] = data[1]  # scoring only; devices never see it
    service: dict[str, Any] = {
        "broker": {"url": url, "protocol": "5"},
        "signing_key": str(private_key),
        "round_deadline_s": 900.0,
    }
    if mode == "buffered":
        document["protocol"]["rounds_per_task"] = 5
        service |= {"mode": "buffered", "buffered": {"size": 3, "max_staleness": max_staleness}}
    document["service"] = service
    return FleetConfig.model_validate(document)


def device_files(fleet: FleetConfig, workdir: Path, public_key: Path) -> list[Path]:
    fleet_file = workdir / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
    profile = load_profile("generic-x86").model_copy(
        update={
            "name": "bench",
            "threads": 1,
            "max_experts_per_round": fleet.fedfmx.max_experts_per_round,
            "batch_size": fleet.training.batch_size,
            "exemplars_per_class": fleet.training.exemplars_per_class,
        }
    )
    profile_file = workdir / "profile.yaml"
    profile_file.write_text(yaml.safe_dump(profile.model_dump(mode="json")))
    return [
        save_device_config(
            DeviceConfig(
                device_id=device_id(index),
                fleet_file=fleet_file,
                broker=fleet.service.broker,
                profile=str(profile_file),
                data=PartitionSource(
                    client_index=index, slowdown=SLOWDOWN if index == SLOW_DEVICE else 1.0
                ),
                state_dir=workdir / device_id(index),
                fleet_public_key=public_key,
                serve_predictions=False,
            ),
            workdir / f"{device_id(index)}.yaml",
        )
        for index in range(fleet.protocol.num_clients)
    ]


def run_mode(mode: str, data: tuple[int | None, int], max_staleness: int) -> dict[str, Any]:
    """One run to the end of its schedule; every version as (seconds, version, updates, payload)."""
    with MosquittoBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        private_key, public_key = signing_key_files(workdir)
        fleet = mode_fleet(mode, broker.url, private_key, data, max_staleness)
        versions: list[tuple[float, int, int, bytes]] = []
        started = [0.0]
        holder: dict[str, Any] = {}

        def on_round(totals: RoundTotals) -> None:
            aggregator = holder["aggregator"]
            model = aggregator.keeper.model
            if not versions or versions[-1][1] != model.version:
                updates = sum(row.updates_accepted for row in aggregator.state.devices())
                elapsed = time.perf_counter() - started[0]
                versions.append(
                    (elapsed, model.version, updates, aggregator.keeper.model_payload())
                )

        aggregator = open_aggregator(
            fleet, workdir / "aggregator.sqlite", ServiceHooks(on_round=on_round)
        )
        holder["aggregator"] = aggregator
        aggregator.start()
        started[0] = time.perf_counter()
        logs = [open(workdir / f"device-{i}.log", "wb") for i in range(fleet.protocol.num_clients)]  # noqa: SIM115
        devices = [
            subprocess.Popen(
                [sys.executable, "-m", "fedfmx_cli", "join", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            for config, log in zip(device_files(fleet, workdir, public_key), logs, strict=True)
        ]
        stop = threading.Event()
        completed = False
        try:
            completed = aggregator.run(stop)
        finally:
            wall_s = time.perf_counter() - started[0]
            for process in devices:
                try:
                    process.wait(30 if completed else 0.1)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            aggregator.session.close()
            for log in logs:
                log.close()
        accepted = {row.device_id: row.updates_accepted for row in aggregator.state.devices()}
        rejections = aggregator.state.rejections()
        aggregator.state.close()
        return {
            "mode": mode,
            "completed": completed,
            "wall_s": wall_s,
            "updates_per_device": accepted,
            "rejections": [reason for _, _, reason in rejections],
            "fleet": fleet.model_dump(mode="json"),
            "versions": versions,
        }


def score(run: dict[str, Any], fleet: FleetConfig) -> list[dict[str, float]]:
    """Accuracy on all 10 test classes of every version the run made."""
    dataset = load_fleet_dataset(fleet)
    tasks = make_plan(fleet, dataset).tasks
    curve = []
    for elapsed, version, updates, payload in run.pop("versions"):
        header, weights = decode_model(payload, max_bytes=MAX_MODEL_BYTES)
        model = GlobalModel(version, weights, header.class_names, [])
        _, accuracy = evaluate(fleet, model, dataset, tasks, len(tasks) - 1)
        curve.append({"s": elapsed, "version": version, "updates": updates, "accuracy": accuracy})
    return curve


def at_or_before(curve: list[dict[str, float]], key: str, limit: float) -> dict[str, float]:
    """The last version made at or before `limit` of `key` (seconds, or updates)."""
    made = [point for point in curve if point[key] <= limit]
    return made[-1] if made else {"s": 0.0, "version": 0, "updates": 0, "accuracy": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument(
        "--max-staleness", type=int, default=4, help="service.buffered.max_staleness"
    )
    parser.add_argument("--name", default="buffered_async", help="stem of the JSON and PNG")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C: the broker and the device processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = {}
    for mode in ("synchronous", "buffered"):
        load = os.getloadavg()
        data = (args.train_per_class, args.test_per_class)
        run = run_mode(mode, data, args.max_staleness)
        run["load_before"] = load
        run["load_after"] = os.getloadavg()
        run["curve"] = score(run, FleetConfig.model_validate(run["fleet"]))
        del run["fleet"]
        runs[mode] = run
        print(f"{mode}: {run['wall_s']:.0f} s, final {run['curve'][-1]}", flush=True)
    budget_s = min(run["wall_s"] for run in runs.values())
    device_rounds = min(run["curve"][-1]["updates"] for run in runs.values())
    summary = {
        mode: {
            "wall_s": run["wall_s"],
            "final": run["curve"][-1],
            "at_same_wall_clock": at_or_before(run["curve"], "s", budget_s),
            "at_same_device_rounds": at_or_before(run["curve"], "updates", device_rounds),
        }
        for mode, run in runs.items()
    }
    document = {
        "machine": f"{os.cpu_count()} cores",
        "slow_device": {"id": device_id(SLOW_DEVICE), "slowdown": SLOWDOWN},
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "max_staleness": args.max_staleness,
        "wall_clock_budget_s": budget_s,
        "device_rounds": device_rounds,
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(document, indent=2))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, run in runs.items():
        curve = run["curve"]
        left.plot([p["s"] for p in curve], [p["accuracy"] for p in curve], "o-", label=mode)
        right.plot([p["updates"] for p in curve], [p["accuracy"] for p in curve], "o-", label=mode)
    left.set_xlabel("wall-clock seconds")
    right.set_xlabel("device rounds (accepted updates)")
    for axis in (left, right):
        axis.set_ylabel("accuracy, all 10 classes")
        axis.legend()
    figure.suptitle("demo fleet, device-000 5x slower: buffered vs synchronous (2 cores)")
    figure.tight_layout()
    figure.savefig(args.out / f"{args.name}.png", dpi=120)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
