"""A small tree for the district tests: real bridged Mosquitto brokers with mutual TLS, the
root aggregator in a thread, districts as `fedfmx-edge serve --district` processes, and
scripted devices (one MQTT session each) that send a precomputed update for every round they
are announced in, again every second until their district's receipt accepts it.

The updates are drawn once, so the flat merge of exactly those updates (`flat_models`) is the
model the tree must end with."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np

from aggregator.crash_points import ENVIRONMENT_VARIABLE as CRASH_AT
from aggregator.districts.config import load_district_config, save_district_config
from aggregator.districts.provisioning import ProvisionedTree, provision_tree
from aggregator.districts.root import RootAggregator, open_root
from aggregator.service import ServiceHooks, first_model
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.federation.aggregation import FISHER_PREFIX, HEAD_ROWS
from fedfmx.federation.rounds import GlobalModel, RoundKeeper, expected_update_shapes
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import Hello, UpdateHeader, UpdateReceipt
from fedfmx.wire.signing import SignedAnnouncement
from fedfmx_cli.tree_simulation import spread_devices, tree_brokers
from transport import MosquittoBroker, MqttSession, TopicKind, client_topic, free_port
from transport.session import session_settings
from transport.topics import round_topic

DEVICES = 4
ROUNDS = 2


def tree_fleet(
    deadline_s: float = 60.0, grace_s: float = 2.0, rounds: int = ROUNDS, dormant_after: int = 2
) -> FleetConfig:
    """The ci-digits model, 4 devices, `rounds` rounds of 1 task each."""
    return FleetConfig.model_validate(
        {
            "name": "tree",
            "method": "fedfmx",
            "data": {"dataset": "digits"},
            "protocol": {
                "num_clients": DEVICES, "num_tasks": rounds, "rounds_per_task": 1, "max_lag": 0,
            },
            "model": {
                "backbone_channels": [16, 32], "feature_dim": 64, "num_experts": 4,
                "expert_hidden": 16,
            },
            "fedfmx": {"k_max": 2, "max_experts_per_round": 2},
            "service": {
                "round_deadline_s": deadline_s, "max_extensions": 0,
                "dormant_after_rounds": dormant_after,
            },
            "districts": {"ids": ["district-00", "district-01"], "partial_grace_s": grace_s},
        }
    )  # fmt: skip


def scripted_update(
    fleet: FleetConfig, weights: dict[str, np.ndarray], device: str, round_index: int
) -> bytes:
    """A device's update of round `round_index` (from version `round_index`): random deltas
    of the model's shapes, seeded by the device and round."""
    rng = np.random.default_rng([int(device.rsplit("-", 1)[1]), round_index])
    experts = sorted(rng.choice(fleet.model.num_experts, size=2, replace=False).tolist())
    classes = [f"c{round_index}a", f"c{round_index}b"]
    counts = [int(rng.integers(1, 50)), int(rng.integers(1, 50))]
    usage = [0.0] * fleet.model.num_experts
    for expert in experts:
        usage[expert] = float(rng.integers(1, 100))
    header = UpdateHeader(
        fleet=fleet.name, device_id=device, round=round_index, base_version=round_index,
        num_samples=sum(counts), expert_ids=experts, head_classes=classes, class_counts=counts,
        expert_usage=usage, includes_backbone=True, includes_fisher=True, train_loss=0.5,
    )  # fmt: skip
    shapes = expected_update_shapes(header, weights)
    tensors = {
        name: (np.abs if name.startswith(FISHER_PREFIX) else np.asarray)(
            rng.normal(0.0, 0.01, size=shape).astype(np.float32)
        )
        for name, shape in shapes.items()
    }
    tensors[HEAD_ROWS] = rng.normal(0.0, 0.01, size=shapes[HEAD_ROWS]).astype(np.float32)
    return encode_update(header, tensors).payload


def flat_models(fleet: FleetConfig, devices: list[list[str]]) -> list[GlobalModel]:
    """What a flat aggregator merges from the scripted updates: `devices[r]` answer round r."""
    flat = fleet.model_copy(update={"districts": None})
    keeper = RoundKeeper(flat, first_model(flat))
    shapes = keeper.model.weights
    models = []
    for round_index, answering in enumerate(devices):
        keeper.open_round(round_index, sorted(answering), time.time() + 60)
        for device in sorted(answering):
            keeper.accept(scripted_update(flat, shapes, device, round_index), device)
        models.append(keeper.close_round())
    return models


class ScriptedDevice:
    """A device that answers every announcement naming it with its scripted update."""

    def __init__(
        self,
        fleet: FleetConfig,
        weights: dict[str, np.ndarray],
        name: str,
        tree: ProvisionedTree,
        district: str,
        url: str,
    ) -> None:
        self.fleet = fleet
        self.name = name
        broker = tree.districts[district].broker_section(name, url)
        self.session = MqttSession(session_settings(broker, f"{fleet.name}-{name}"))
        self.accepted: set[int] = set()
        self._sent: dict[int, tuple[bytes, float]] = {}
        self._weights = weights
        self._lock = threading.Lock()

    def start(self) -> None:
        self.session.subscribe(round_topic(self.fleet.name), self._on_round)
        inbox = client_topic(self.fleet.name, self.name, TopicKind.INBOX)
        self.session.subscribe(inbox, self._on_inbox)
        self.session.connect()
        hello = Hello(fleet=self.fleet.name, device_id=self.name, profile="scripted",
                      classes_met=[], sample_counts={})  # fmt: skip
        topic = client_topic(self.fleet.name, self.name, TopicKind.HELLO)
        self.session.publish(topic, hello.model_dump_json().encode(), retain=True)

    def _on_round(self, topic: str, message: bytes) -> None:
        announcement = SignedAnnouncement.model_validate_json(message).announcement
        if announcement.closed or self.name not in announcement.participants:
            return
        with self._lock:
            if announcement.round in self._sent:
                return
            # round r starts from version r here (every round merges); version 0's weights
            # give every shape (head rows are sized by the header)
            payload = scripted_update(self.fleet, self._weights, self.name, announcement.round)
            self._sent[announcement.round] = (payload, 0.0)

    def _on_inbox(self, topic: str, message: bytes) -> None:
        receipt = UpdateReceipt.model_validate_json(message)
        with self._lock:
            for round_index, (payload, _) in self._sent.items():
                if receipt.accepted and sha256(payload).hexdigest() == receipt.update_sha256:
                    self.accepted.add(round_index)

    def pump(self) -> None:
        """Send (again, every second) every update not yet accepted."""
        topic = client_topic(self.fleet.name, self.name, TopicKind.UPDATE)
        with self._lock:
            due = [
                (r, p) for r, (p, sent) in self._sent.items()
                if r not in self.accepted and time.monotonic() - sent > 1.0
            ]  # fmt: skip
            for round_index, payload in due:
                self._sent[round_index] = (payload, time.monotonic())
        for _, payload in due:
            self.session.publish(topic, payload, wait=False)


@dataclass
class Tree:
    fleet: FleetConfig
    tree: ProvisionedTree
    brokers: dict[str | None, MosquittoBroker]
    root: RootAggregator
    devices: list[ScriptedDevice]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def start_district(self, district: str, crash_at: str | None = None) -> None:
        environment = dict(os.environ)
        environment.pop(CRASH_AT, None)
        if crash_at is not None:
            environment[CRASH_AT] = crash_at
        with (self.logs / f"{district}.log").open("ab") as sink:
            self.processes[district] = subprocess.Popen(
                [sys.executable, "-m", "fedfmx_cli", "serve", "--district",
                 str(self.tree.district_files[district])],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
            )  # fmt: skip

    def wait_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Pump the devices until `condition()` holds (True) or the timeout (False)."""
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if condition():  # before pumping: nothing is sent after the condition held
                return True
            for device in self.devices:
                device.pump()
            time.sleep(0.1)
        return False

    def log(self, district: str) -> str:
        return (self.logs / f"{district}.log").read_text(errors="replace")


@contextmanager
def running_tree(tmp: Path, fleet: FleetConfig, resend_s: float = 0.5) -> Iterator[Tree]:
    """Brokers, root (thread) and scripted devices; the test starts the districts."""
    members = spread_devices(DEVICES, 2)
    ports: dict[str | None, int] = {None: free_port(), **{d: free_port() for d in members}}
    fleet = fleet.model_copy(
        update={"service": fleet.service.model_copy(update={"state_path": tmp / "root.sqlite"})}
    )
    tree = provision_tree(fleet, members, tmp / "tree", ports[None], {d: ports[d] for d in members})
    for path in tree.district_files.values():
        config = load_district_config(path)
        save_district_config(config.model_copy(update={"partial_resend_s": resend_s}), path)
    rooted = load_fleet(tree.fleet_file)
    logs = tmp / "logs"
    logs.mkdir()
    with ExitStack() as stack, tree_brokers(tree, ports) as brokers:
        root = open_root(rooted, tmp / "root.sqlite", ServiceHooks())
        root.start()
        weights = first_model(rooted).weights
        devices = [
            ScriptedDevice(
                rooted, weights, name, tree, district, f"mqtts://127.0.0.1:{ports[district]}"
            )
            for district, names in members.items()
            for name in names
        ]
        for device in devices:
            device.start()
            stack.callback(device.session.close)
        running = Tree(rooted, tree, brokers, root, devices, logs)
        thread = threading.Thread(target=root.run, args=(running.stop,), daemon=True)
        thread.start()
        try:
            yield running
        finally:
            running.stop.set()
            thread.join(10)
            for process in running.processes.values():
                if process.poll() is None:
                    process.terminate()
                    process.wait(10)
            root.session.close()
            root.assignments.close()
            root.state.close()
