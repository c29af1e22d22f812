"""A small real fleet for operations tests: digits, 1 round per task, devices in threads."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from aggregator.service import Aggregator
from edge_client.agent import open_device
from edge_client.config import load_device_config
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.federation.simulation import device_id

FLEET_FILE = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"
WAIT_S = 120.0


def small_fleet(url: str, clients: int = 2, tasks: int = 2, **service: object) -> FleetConfig:
    document = load_fleet(FLEET_FILE).model_dump(mode="json")
    document["protocol"].update(num_tasks=tasks, num_clients=clients, rounds_per_task=1, max_lag=0)
    document["training"].update(local_epochs=1)
    document["service"] = {"broker": {"url": url}, "round_deadline_s": 60.0, **service}
    return FleetConfig.model_validate(document)


def write_fleet(directory: Path, fleet: FleetConfig) -> Path:
    path = directory / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
    return path


def device_yaml(
    directory: Path, fleet_file: Path, index: int, url: str, public_key: Path | None = None
) -> Path:
    path = directory / f"device-{index}.yaml"
    document: dict[str, object] = {
        "device_id": device_id(index),
        "fleet_file": str(fleet_file),
        "broker": {"url": url},
        "data": {"client_index": index},
        "state_dir": f"state-{index}",
    }
    if public_key is not None:
        document["fleet_public_key"] = str(public_key)
    path.write_text(yaml.safe_dump(document))
    return path


def run_to_end(
    aggregator: Aggregator, device_configs: list[Path], stop: threading.Event | None = None
) -> None:
    """Run the started aggregator and every device until the schedule is done, or until
    `stop` is set (by the caller, e.g. from a ServiceHooks.on_round)."""
    stopped_early = stop is not None
    stop = stop or threading.Event()
    errors: list[BaseException] = []

    def guarded(target: Callable[[threading.Event], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                target(stop)
            except BaseException as error:  # surfaced below
                errors.append(error)

        return run

    devices = [open_device(load_device_config(config)) for config in device_configs]
    threads = [threading.Thread(target=guarded(aggregator.run), daemon=True)]
    threads += [threading.Thread(target=guarded(d.run), daemon=True) for d in devices]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(10)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "the fleet did not stop in time"
    assert stopped_early or aggregator.finished, "the fleet did not finish in time"


def stop_and_expect_stopping(process: subprocess.Popen[str], notify: socket.socket) -> None:
    """SIGTERM a `Type=notify` service: it says STOPPING=1 (after any last WATCHDOG=1) and
    exits 0."""
    process.send_signal(signal.SIGTERM)
    while (message := notify.recv(4096)) == b"WATCHDOG=1":
        pass
    assert message == b"STOPPING=1"
    assert process.wait(30) == 0
