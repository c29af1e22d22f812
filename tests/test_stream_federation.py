"""End to end over a real Mosquitto: devices whose only data is their own watched folder.

Two `fedfmx-edge join` processes; device A's folder holds digits 0 and 1 from the start,
device B's folder is empty until the first round closes, when digits 2 and 3 are copied in
(new classes at different times on different devices). The fleet model must end up knowing
all four, by name, and recognising held-out images of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import yaml
from stream_images import digit_pixels, write_digits

from aggregator.provisioning import signing_key_files
from aggregator.service import ServiceHooks, open_aggregator
from aggregator.state import AggregatorState, RoundTotals
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.metrics import predict
from fedfmx.model import build_model, load_numpy_state
from fedfmx.preprocessing import fleet_image_input, model_input
from transport import MosquittoBroker

FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"
WAIT_S = 180.0


def stream_fleet(url: str, private_key: Path) -> FleetConfig:
    document = load_fleet(FLEETS / "ci-digits.yaml").model_dump(mode="json")
    document["protocol"].update(num_tasks=2, num_clients=2, rounds_per_task=4, max_lag=0)
    document["training"].update(local_epochs=3)
    document["classes"] = {"min_samples": 3}
    document["service"] = {
        "broker": {"url": url},
        "round_deadline_s": 60.0,
        "receipt_timeout_s": 3.0,
        "signing_key": str(private_key),
    }
    return FleetConfig.model_validate(document)


def device_yaml(tmp: Path, name: str, fleet_file: Path, url: str, public_key: Path) -> Path:
    path = tmp / f"{name}.yaml"
    document = {
        "device_id": name,
        "fleet_file": str(fleet_file),
        "broker": {"url": url},
        "data": {"source": "folder", "path": f"{name}/labelled", "settle_s": 0.2},
        "state_dir": f"{name}/state",
        "fleet_public_key": str(public_key),
        "serve_predictions": False,
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_two_folder_devices_with_misaligned_new_classes_teach_the_fleet_both(
    mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    private, public = signing_key_files(tmp_path)
    fleet = stream_fleet(mosquitto_broker.url, private)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
    for label in (0, 1):
        write_digits(tmp_path / "device-a" / "labelled", label, 20)

    def feed_b(totals: RoundTotals) -> None:
        if totals.round == 0:  # B meets its classes only once the fleet has moved on
            for label in (2, 3):
                write_digits(tmp_path / "device-b" / "labelled", label, 20)

    stop = threading.Event()
    aggregator = open_aggregator(fleet, tmp_path / "agg.sqlite", ServiceHooks(on_round=feed_b))
    aggregator.start()
    runner = threading.Thread(target=lambda: aggregator.run(stop), daemon=True)
    runner.start()
    processes = []
    for name in ("device-a", "device-b"):
        config = device_yaml(tmp_path, name, fleet_file, mosquitto_broker.url, public)
        log = (tmp_path / f"{name}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "fedfmx_cli", "join", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
    try:
        for process in processes:
            assert process.wait(timeout=WAIT_S) == 0, (tmp_path / "device-a.log").read_text()
        runner.join(WAIT_S)
        assert aggregator.finished
    finally:
        stop.set()
        for process in processes:
            process.kill()
        aggregator.session.close()
    model = aggregator.keeper.model
    assert set(model.class_names) == {"0", "1", "2", "3"}
    state = AggregatorState(tmp_path / "agg.sqlite", fleet.name)
    try:
        devices = {row.device_id: row for row in state.devices()}
        assert set(devices["device-a"].classes_met) == {"0", "1"}
        assert set(devices["device-b"].classes_met) == {"2", "3"}
        status = devices["device-b"].status
        assert status.store_samples == 40 and (status.store_bytes or 0) > 0
        assert status.sources and status.sources[0].startswith("folder: running")
    finally:
        state.close()
    network = build_model(fleet.model, fleet.routing, len(model.class_names), fleet.seed)
    load_numpy_state(network, model.weights)
    held_out = {c: digit_pixels(c, 20, start=60) for c in range(4)}  # never in any folder
    spec = fleet_image_input(fleet)
    x = np.stack([model_input(p, spec) for c in range(4) for p in held_out[c]])
    predicted = predict(network, torch.from_numpy(x)).numpy()
    truth = np.array([model.class_names.index(str(c)) for c in range(4) for _ in range(20)])
    accuracy = float((predicted == truth).mean())
    per_class = {c: float((predicted[truth == i] == i).mean()) for i, c in enumerate("0123")}
    print(json.dumps({"held_out_accuracy": accuracy, "per_class": per_class}))
    # Over four classes chance is 0.25; each device's pair must be recognised above chance by
    # the merged model. Overall accuracy varies with which rounds each device's folder was
    # read in time for (0.65 and 0.68 in two runs of 8 rounds; 0.46 with 6 rounds).
    assert accuracy > 0.35
    assert (per_class["0"] + per_class["1"]) / 2 > 0.25
    assert (per_class["2"] + per_class["3"]) / 2 > 0.25
