"""The aggregator and devices over a real Mosquitto: rounds, chunking, duplicates, crashes.

Each test starts a private Mosquitto on a free loopback port (see conftest), runs a tiny digits
fleet (2 tasks x 2 rounds, 8x8 images) and checks the aggregator's durable accounting: every
participant answered every round, and every accepted update was counted exactly once. The
chaos and hostile-device tests run on a locked-down broker (`secure_broker`: mutual TLS with
provisioned certificates, no anonymous clients, the fleet's ACL), as a real fleet would.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.crash_points import ENVIRONMENT_VARIABLE as CRASH_AT
from aggregator.provisioning import AGGREGATOR, ProvisionedFleet, provision, signing_key_files
from aggregator.service import Aggregator, ServiceHooks, open_aggregator
from aggregator.state import AggregatorState
from edge_client.agent import EdgeDevice, open_device
from edge_client.config import load_device_config
from fedfmx.config import BrokerConfig, FleetConfig, load_fleet
from fedfmx.device.learner import DeviceLearner
from fedfmx.errors import FedFMXError
from fedfmx.federation.rounds import expected_update_shapes
from fedfmx.federation.simulation import device_id, initial_model, load_fleet_dataset, own_partition
from fedfmx.wire.codec import (
    MAX_MODEL_BYTES,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
)
from fedfmx.wire.messages import (
    CodecSettings,
    DeviceStatus,
    Hello,
    ModelHeader,
    RoundAnnouncement,
    UpdateReceipt,
)
from fedfmx.wire.signing import (
    SignedAnnouncement,
    chunk_payload,
    load_signing_key,
    sign_announcement,
    sign_manifest,
)
from transport import (
    MosquittoBroker,
    MqttSession,
    SessionSettings,
    TopicKind,
    client_topic,
    clients_filter,
    find_mosquitto,
    model_body_filter,
    model_body_topic,
    model_manifest_topic,
    parse_topic,
    round_topic,
    session_settings,
)

FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"
WAIT_S = 120.0


def tiny_fleet(url: str, clients: int = 3, max_lag: int = 1, **service: object) -> FleetConfig:
    document = load_fleet(FLEETS / "ci-digits.yaml").model_dump(mode="json")
    document["protocol"].update(
        num_tasks=2, num_clients=clients, rounds_per_task=2, max_lag=max_lag
    )
    document["training"].update(local_epochs=1)
    document["service"] = {
        "broker": {"url": url, **service.pop("broker", {})},  # type: ignore[dict-item]
        "round_deadline_s": 60.0,
        "receipt_timeout_s": 3.0,
        **service,
    }
    return FleetConfig.model_validate(document)


@dataclass
class SecureBroker:
    """A Mosquitto with mutual TLS, no anonymous clients and the fleet's ACL, and the
    credentials `provision` wrote for it (the aggregator, device-000..002 and device-999)."""

    broker: MosquittoBroker
    credentials: ProvisionedFleet

    @property
    def url(self) -> str:
        return f"mqtts://{self.broker.host}:{self.broker.port}"


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: run `sudo apt-get install -y mosquitto`")
    name = load_fleet(FLEETS / "ci-digits.yaml").name
    devices = [device_id(index) for index in (0, 1, 2, 999)]
    credentials = provision(name, devices, tmp_path / "credentials")
    broker = MosquittoBroker(allow_anonymous=False, extra_config=credentials.broker_settings())
    broker.start()
    try:
        yield SecureBroker(broker, credentials)
    finally:
        broker.close()


class Fleet:
    """A fleet under test: its files in tmp_path, the aggregator thread, device threads.

    With `credentials`, every client connects with its own provisioned certificate and the
    models are signed with the provisioned key.
    """

    def __init__(
        self,
        tmp_path: Path,
        fleet: FleetConfig,
        signed: bool = True,
        credentials: ProvisionedFleet | None = None,
    ) -> None:
        self.tmp = tmp_path
        self.credentials = credentials
        if credentials is None:
            private, self.public_key = signing_key_files(tmp_path)
        else:
            private, self.public_key = credentials.signing_key, credentials.verify_key
        self._broker = fleet.service.broker
        service = {"broker": self.broker_for(AGGREGATOR)}
        if signed:
            service["signing_key"] = private
        fleet = fleet.model_copy(update={"service": fleet.service.model_copy(update=service)})
        self.fleet = fleet
        self.fleet_file = tmp_path / "fleet.yaml"
        self.fleet_file.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
        self.state_path = tmp_path / "aggregator.sqlite"
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.devices: dict[str, EdgeDevice] = {}
        self.errors: list[BaseException] = []

    def broker_for(self, name: str) -> BrokerConfig:
        """Client `name`'s broker section: the fleet's, with its own certificate if secure."""
        if self.credentials is None:
            return self._broker
        own = self.credentials.broker_section(name, self._broker.url)
        return self._broker.model_copy(
            update={"ca_file": own.ca_file, "cert_file": own.cert_file, "key_file": own.key_file}
        )

    def session(self, name: str, client_id: str | None = None) -> MqttSession:
        """A session speaking as `name` (its credentials), under `client_id` if given."""
        return MqttSession(session_settings(self.broker_for(name), client_id or name))

    def device_config(self, index: int, serve: bool = False) -> Path:
        name = device_id(index)
        path = self.tmp / f"{name}.yaml"
        document = {
            "device_id": name,
            "fleet_file": str(self.fleet_file),
            "broker": self.broker_for(name).model_dump(mode="json"),
            "data": {"client_index": index},
            "state_dir": f"state-{name}",
            "fleet_public_key": str(self.public_key),
            "serve_predictions": serve,
        }
        path.write_text(yaml.safe_dump(document))
        return path

    def _thread(self, target: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as error:  # surfaced by `join`
                self.errors.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def start_aggregator(self) -> Aggregator:
        aggregator = open_aggregator(self.fleet, self.state_path, ServiceHooks())
        aggregator.start()
        self._thread(lambda: aggregator.run(self.stop))
        return aggregator

    def start_device(self, index: int, serve: bool = False) -> threading.Thread:
        device = open_device(load_device_config(self.device_config(index, serve)))
        self.devices[device.device_id] = device
        return self._thread(lambda: device.run(self.stop))

    def join(self, threads: list[threading.Thread] | None = None) -> None:
        deadline = time.monotonic() + WAIT_S
        for thread in threads or self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in threads or self.threads if t.is_alive()]
        if self.errors:
            raise self.errors[0]
        assert not alive, "the fleet did not finish in time"

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(
        fleet: FleetConfig,
        signed: bool = True,
        credentials: ProvisionedFleet | None = None,
        directory: str = "",
    ) -> Fleet:
        (tmp_path / directory).mkdir(exist_ok=True)
        fleets.append(Fleet(tmp_path / directory, fleet, signed, credentials))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.close()


def assert_every_answer_counted_once(state_path: Path, fleet: FleetConfig) -> AggregatorState:
    state = AggregatorState(state_path, fleet.name)
    rounds = state.round_totals()
    assert len(rounds) == fleet.protocol.num_rounds
    for totals in rounds:
        assert totals.closed is not None
        assert totals.updates + totals.skips == totals.participants, totals
    latest = state.latest_model()
    assert latest is not None
    assert latest.version == sum(1 for r in rounds if r.updates)
    return state


def test_full_round_trip_with_signed_models(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url))
    aggregator = fleet.start_aggregator()
    devices = [fleet.start_device(i) for i in range(3)]
    fleet.join(devices)
    fleet.join()
    assert aggregator.finished
    state = assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    accepted = {row.device_id: row.updates_accepted for row in state.devices()}
    for name, device in fleet.devices.items():
        assert device.snapshot.progress.last_round == 3
        assert device.snapshot.progress.updates_sent == accepted[name] > 0
        assert device.model is not None and device.model.header.version >= 3
    assert state.rejections() == []


def test_a_serving_device_exports_and_swaps_in_each_version(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Alone in its process: torch's exporter keeps global tracing state, so a device that
    exports must not share a process with other devices training (each `join` is a process)."""
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url, clients=1, max_lag=0))
    fleet.start_aggregator()
    fleet.join([fleet.start_device(0, serve=True)])
    fleet.join()
    # It serves the last version it trained from, exported to ONNX and swapped in.
    serving = fleet.devices["device-000"]
    assert serving.inference is not None and serving.model is not None
    assert serving.inference.version == serving.model.header.version
    files = list((fleet.tmp / "state-device-000" / "serving").glob("*.onnx"))
    assert [f.name for f in files] == [f"model-v{serving.model.header.version}.onnx"]
    images = serving.learner.local_rows().x[:16]
    predicted = serving.inference.predict(images)
    assert predicted.class_ids.shape == (16,)
    assert set(predicted.class_names) <= set(serving.model.header.class_names)


def test_small_payload_limit_chunks_models_and_updates(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet(
        tiny_fleet(mosquitto_broker.url, clients=2, broker={"max_payload_bytes": 4096})
    )
    fleet.start_aggregator()
    fleet.join([fleet.start_device(0), fleet.start_device(1)])
    fleet.join()
    state = assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    latest = state.latest_model()
    assert latest is not None and len(latest.payload) > 20 * 4096
    assert (state.published_chunks(latest.version) or 0) > 20


class HandDevice:
    """A device driven step by step by the test: hello, one update, whatever it is told to send."""

    def __init__(self, under_test: Fleet, index: int) -> None:
        fleet = under_test.fleet
        self.fleet = fleet
        self.device_id = device_id(index)
        dataset = load_fleet_dataset(fleet)
        samples, stream = own_partition(fleet, dataset, index)
        self.learner = DeviceLearner(self.device_id, fleet, samples, stream, seed=index)
        self.session = under_test.session(self.device_id)
        self.announcements: list[RoundAnnouncement] = []
        self.receipts: list[UpdateReceipt] = []
        self.models: dict[str, bytes] = {}
        self.session.subscribe(
            round_topic(fleet.name),
            lambda _, m: self.announcements.append(
                SignedAnnouncement.model_validate_json(m).announcement
            ),
        )
        self.session.subscribe(
            self.topic(TopicKind.INBOX),
            lambda _, m: self.receipts.append(UpdateReceipt.model_validate_json(m)),
        )
        self.session.connect()

    def topic(self, kind: TopicKind) -> str:
        return client_topic(self.fleet.name, self.device_id, kind)

    def hello(self) -> None:
        hello = Hello(
            fleet=self.fleet.name,
            device_id=self.device_id,
            profile="test",
            classes_met=[],
            sample_counts={},
        )
        self.session.publish(self.topic(TopicKind.HELLO), hello.model_dump_json().encode())

    def update_for_round(self, round_index: int) -> bytes:
        announcement = wait_for(
            lambda: next((a for a in self.announcements if a.round == round_index), None)
        )
        version = announcement.model_version
        self.session.subscribe(
            model_body_filter(self.fleet.name, version), lambda t, m: self.models.__setitem__(t, m)
        )
        body = wait_for(lambda: next(iter(self.models.values()), None))
        header, weights = decode_model(body, max_bytes=1 << 28)
        update = self.learner.handle_round(announcement, header, weights)
        assert update is not None
        return update

    def send(self, update: bytes) -> None:
        self.session.publish(self.topic(TopicKind.UPDATE), update)


T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value is not None and value is not False:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_duplicated_update_is_counted_once_and_both_copies_get_a_receipt(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url, clients=1, max_lag=0), signed=False)
    aggregator = fleet.start_aggregator()
    hand = HandDevice(fleet, 0)
    try:
        hand.hello()
        update = hand.update_for_round(0)
        hand.send(update)
        hand.send(update)  # a second full delivery, as after a lost receipt
        wait_for(lambda: len(hand.receipts) == 2)
        digest = hashlib.sha256(update).hexdigest()
        assert all(r.accepted and r.update_sha256 == digest for r in hand.receipts)
        wait_for(lambda: aggregator.keeper.model.version == 1)
        totals = aggregator.state.round_totals()[0]
        assert (totals.updates, totals.uplink_bytes) == (1, len(update))
    finally:
        hand.session.close()


def test_a_device_that_never_answers_costs_deadlines_until_it_is_left_out_as_dormant(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Rounds close at their deadline with a quorum while the silent device is a participant;
    after `dormant_after_rounds` unanswered rounds it is left out and rounds run at speed."""
    config = tiny_fleet(
        mosquitto_broker.url,
        clients=3,
        round_deadline_s=4.0,
        quorum_fraction=0.5,
        dormant_after_rounds=2,
    )
    fleet = make_fleet(config)
    fleet.start_aggregator()
    silent = MqttSession(SessionSettings(url=mosquitto_broker.url, client_id="device-002"))
    silent.connect()
    try:
        hello = Hello(
            fleet=config.name,
            device_id="device-002",
            profile="test",
            classes_met=[],
            sample_counts={},
        )
        silent.publish(
            client_topic(config.name, "device-002", TopicKind.HELLO),
            hello.model_dump_json().encode(),
        )
        fleet.join([fleet.start_device(0), fleet.start_device(1)])
        fleet.join()
    finally:
        silent.close()
    state = AggregatorState(fleet.state_path, config.name)
    rounds = state.round_totals()
    assert len(rounds) == 4
    for totals in rounds:
        assert totals.updates + totals.skips == 2
        assert totals.closed is not None
    assert [totals.participants for totals in rounds] == [3, 3, 2, 2]
    assert all(t.closed is not None and t.closed - t.opened >= 3.9 for t in rounds[:2])


def test_a_device_cut_off_mid_upload_resends_the_same_update_after_restart(
    mosquitto_broker: MosquittoBroker,
    make_fleet: Callable[..., Fleet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = make_fleet(
        tiny_fleet(mosquitto_broker.url, clients=1, broker={"max_payload_bytes": 4096})
    )
    fleet.start_aggregator()
    sent: list[bytes] = []

    def power_cut(self: EdgeDevice, round_index: int, stop: threading.Event) -> None:
        payload = self.snapshot.pending_update
        assert payload is not None
        sent.append(payload)
        message_id = bytes.fromhex(hashlib.sha256(payload).hexdigest())[:16]
        self.session.publish(
            self._topic(TopicKind.UPDATE), payload, message_id=message_id, only_chunks=[0, 1]
        )
        raise ConnectionAbortedError("power cut")

    monkeypatch.setattr(EdgeDevice, "_deliver_pending", power_cut)
    first = fleet.start_device(0)
    first.join(WAIT_S)
    assert isinstance(fleet.errors.pop(), ConnectionAbortedError)
    monkeypatch.undo()
    restarted = open_device(load_device_config(fleet.device_config(0)))
    assert restarted.snapshot.pending_update == sent[0]  # saved before it left the device
    thread = fleet._thread(lambda: restarted.run(fleet.stop))
    fleet.join([thread])
    fleet.join()
    state = assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    first_update = next(t for t in state.round_totals() if t.updates)
    assert first_update.uplink_bytes == len(sent[0])


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def assert_devices_agree(state: AggregatorState, fleet: Fleet) -> None:
    """What each device counts as accepted is what the aggregator stored from it."""
    accepted = {row.device_id: row.updates_accepted for row in state.devices()}
    for name, device in fleet.devices.items():
        assert device.snapshot.progress.updates_sent == accepted[name]
        assert device.snapshot.pending_update is None


def _serve(fleet: Fleet, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    """`fedfmx-edge serve` as its own process, logging (appending) to aggregator.log; with
    `crash_at`, it SIGKILLs itself at that crash point (`aggregator.crash_points`)."""
    environment = {name: value for name, value in os.environ.items() if name != CRASH_AT}
    if crash_at is not None:
        environment[CRASH_AT] = crash_at
    with (fleet.tmp / "aggregator.log").open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedfmx_cli",
                "serve",
                "--fleet",
                str(fleet.fleet_file),
                "--state",
                str(fleet.state_path),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=environment,
        )


def test_aggregator_killed_mid_round_resumes_without_losing_or_recounting(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet(tiny_fleet(secure_broker.url), credentials=secure_broker.credentials)
    server = _serve(fleet)
    try:
        devices = [fleet.start_device(i) for i in range(3)]
        wait_for(lambda: fleet.state_path.exists())
        state = AggregatorState(fleet.state_path, fleet.fleet.name)

        def mid_round() -> bool:
            """Some round after the first holds an update and is still open (any of them:
            under load a round can open and close between two polls)."""
            return any(t.updates >= 1 and t.closed is None for t in state.round_totals()[1:])

        wait_for(mid_round, timeout_s=60)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        time.sleep(1.0)  # devices keep re-sending meanwhile; the broker queues for the session
        server = _serve(fleet)
        fleet.join(devices)
        assert server.wait(WAIT_S) == 0, (fleet.tmp / "aggregator.log").read_text()[-2000:]
    finally:
        _kill(server)
    state = assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    assert_devices_agree(state, fleet)


def test_a_broker_restart_is_survived_through_persistent_sessions(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url, clients=2))
    aggregator = fleet.start_aggregator()
    devices = [fleet.start_device(0), fleet.start_device(1)]
    wait_for(lambda: aggregator.keeper.model.version >= 1)
    mosquitto_broker.restart()
    fleet.join(devices)
    fleet.join()
    assert aggregator.finished
    assert_every_answer_counted_once(fleet.state_path, fleet.fleet)


def test_a_device_refuses_models_signed_by_another_key_or_tampered(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """The test plays a rogue holding the aggregator's broker certificate (so the broker lets
    it publish models) but not its signing key: a foreign signature, then a tampered body,
    then the genuine model. The device trains only on the genuine one, sending one update."""
    config = tiny_fleet(secure_broker.url, clients=1, max_lag=0)
    fleet = make_fleet(config, credentials=secure_broker.credentials)
    genuine_key = load_signing_key(fleet.fleet.service.signing_key)
    weights = initial_model(config).weights
    chunk_bytes = config.service.broker.max_payload_bytes
    rogue = fleet.session(AGGREGATOR, client_id="rogue")
    updates: list[bytes] = []
    rogue.subscribe(
        client_topic(config.name, "device-000", TopicKind.UPDATE), lambda _, m: updates.append(m)
    )
    rogue.connect()
    thread = fleet.start_device(0)
    device = fleet.devices["device-000"]
    offers = [(Ed25519PrivateKey.generate(), False), (genuine_key, True), (genuine_key, False)]
    try:
        for version, (key, tamper) in enumerate(offers):
            payload = encode_model(
                ModelHeader(fleet=config.name, version=version, class_names=[]), weights
            )
            manifest = sign_manifest(key, config.name, version, chunk_payload(payload, chunk_bytes))
            if tamper:
                payload = payload[:-1] + bytes([payload[-1] ^ 1])
            rogue.publish_retained_chunks(model_body_topic(config.name, version), payload)
            rogue.publish(
                model_manifest_topic(config.name, version),
                manifest.model_dump_json().encode(),
                retain=True,
            )
            announcement = RoundAnnouncement(
                fleet=config.name, round=version, task=version // 2, model_version=version,
                participants=["device-000"], deadline_unix=time.time() + 60,
                expert_usage=[0.25] * 4, train_backbone=True,
            )  # fmt: skip
            signed = sign_announcement(genuine_key, announcement)
            rogue.publish(round_topic(config.name), signed.model_dump_json().encode(), retain=True)
            wait_for(lambda v=version: device._handled_round == v)  # type: ignore[misc]
            if version < 2:
                time.sleep(0.5)
                assert device.model is None and not updates, f"offer {version} was accepted"
        wait_for(lambda: len(updates) == 1)
        assert device.model is not None and device.model.header.version == 2
    finally:
        fleet.stop.set()
        thread.join(30)
        rogue.close()


CRASH_POINTS = (
    "update_stored:2",  # collecting: an update is stored, its receipt not yet sent
    "round_merged:1",  # merging: the next version computed, nothing of it stored
    "model_chunks_published:2",  # publishing: the body is out, its signed manifest is not
    "round_closed:1",  # the close is committed, its model not yet published
)
"""Where the chaos test kills the aggregator, one point per process life, in this order.
(`model_chunks_published:1` would be the restart's re-publish of the current version.)"""


def _run_serving_lives(
    fleet: Fleet, crash_points: tuple[str, ...], between_lives: Callable[[int], None]
) -> list[int]:
    """Run the fleet's devices (threads) and `serve` processes one after the other, the i-th
    crashing at `crash_points[i]` and the last one undisturbed; their exit codes."""
    devices = [fleet.start_device(i) for i in range(3)]
    codes = []
    for life, crash_at in enumerate([*crash_points, None]):
        server = _serve(fleet, crash_at)
        try:
            codes.append(server.wait(WAIT_S))
        except subprocess.TimeoutExpired:
            _kill(server)
            raise AssertionError((fleet.tmp / "aggregator.log").read_text()[-2000:]) from None
        between_lives(life)
    fleet.join(devices)
    return codes


def wait_until_every_device_is_online(fleet: Fleet) -> None:
    """Until each device's retained status (what an aggregator reads on start) says online."""
    states: dict[str, str] = {}

    def record(topic: str, message: bytes) -> None:
        device = parse_topic(topic).device_id
        assert device is not None
        states[device] = DeviceStatus.model_validate_json(message).state

    watcher = fleet.session(AGGREGATOR, client_id="status-watcher")
    watcher.subscribe(clients_filter(fleet.fleet.name, TopicKind.STATUS), record, raw=True)
    watcher.connect()
    try:
        wait_for(lambda: len(states) == 3 and "offline" not in states.values())
    finally:
        watcher.close()


def _final_model(fleet: Fleet) -> tuple[list[str], dict[str, np.ndarray]]:
    latest = AggregatorState(fleet.state_path, fleet.fleet.name).latest_model()
    assert latest is not None
    header, weights = decode_model(latest.payload, max_bytes=MAX_MODEL_BYTES)
    return header.class_names, weights


def test_chaos_aggregator_killed_at_each_crash_point_and_a_broker_restart_change_nothing(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """On TLS + ACLs: SIGKILL the aggregator while collecting, merging, publishing and between
    a committed close and its publish, restart the broker once, and compare with an undisturbed
    run of the same seed (on a broker of its own): the same answers counted once each, the same
    bytes, the same final model."""
    config = tiny_fleet(secure_broker.url)
    credentials = secure_broker.credentials
    with MosquittoBroker(
        allow_anonymous=False, extra_config=credentials.broker_settings()
    ) as quiet_broker:
        undisturbed = make_fleet(
            tiny_fleet(f"mqtts://{quiet_broker.host}:{quiet_broker.port}"),
            credentials=credentials,
            directory="undisturbed",
        )
        assert _run_serving_lives(undisturbed, (), lambda life: None) == [0]
    chaos = make_fleet(config, credentials=credentials, directory="chaos")

    def restart_broker_once(life: int) -> None:
        if life == 1:
            secure_broker.broker.restart()
            # A round opened while devices are still reconnecting would (rightly) run
            # without them, and so differ from the undisturbed run: wait for them.
            wait_until_every_device_is_online(chaos)

    codes = _run_serving_lives(chaos, CRASH_POINTS, restart_broker_once)
    assert codes == [-signal.SIGKILL] * len(CRASH_POINTS) + [0]  # each point was reached
    log = (chaos.tmp / "aggregator.log").read_text()
    assert log.count("aggregator_started") == len(CRASH_POINTS) + 1
    rounds = {}
    for run in (undisturbed, chaos):
        state = assert_every_answer_counted_once(run.state_path, run.fleet)
        assert_devices_agree(state, run)
        rounds[run.tmp.name] = [
            (t.participants, t.updates, t.skips, t.uplink_bytes) for t in state.round_totals()
        ]
    assert rounds["chaos"] == rounds["undisturbed"]
    classes, weights = _final_model(chaos)
    expected_classes, expected = _final_model(undisturbed)
    assert classes == expected_classes
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-5, err_msg=name)


def test_hostile_updates_are_rejected_with_a_reason_and_the_round_goes_on(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """On TLS + ACLs: a device with a valid certificate cannot even publish as another device
    (the broker refuses it); what it may publish on its own topic is checked by the aggregator,
    which rejects every hostile kind with a stored reason and still merges the genuine update."""
    config = tiny_fleet(secure_broker.url, clients=1, max_lag=0)
    fleet = make_fleet(config, signed=False, credentials=secure_broker.credentials)
    aggregator = fleet.start_aggregator()
    hand = HandDevice(fleet, 0)
    stranger = fleet.session("device-999")
    stranger.connect()
    try:
        hand.hello()
        genuine = hand.update_for_round(0)
        header, tensors = decode_update(
            genuine,
            lambda h: expected_update_shapes(h, aggregator.keeper.model.weights),
            max_bytes=1 << 28,
            norm_bound=math.inf,
        )

        def variant(changes: dict[str, object], scale: float = 1.0, nan: bool = False) -> bytes:
            altered = {name: value * scale for name, value in tensors.items()}
            if nan:
                first = next(n for n in altered if not n.startswith("fisher."))
                altered[first] = altered[first].copy()
                altered[first].flat[0] = np.nan
            return encode_update(header.model_copy(update=changes), altered).payload

        hostile = {
            "random bytes": os.urandom(5000),
            "truncated": genuine[: len(genuine) // 2],
            "wrong round": variant({"round": 3}),
            "wrong base version": variant({"base_version": 7}),
            "header names another device": variant({"device_id": "device-999"}),
            # fp32: a NaN value (in int8 it would be a NaN scale, refused as such)
            "non-finite values": variant({"codec": CodecSettings()}, nan=True),
            "norm beyond the bound": variant({}, scale=1e6),
            "unknown expert": variant({"expert_ids": [99]}),
        }
        with pytest.raises(FedFMXError, match="Not authorized"):
            stranger.publish(client_topic(config.name, "device-000", TopicKind.UPDATE), genuine)
        for payload in hostile.values():
            hand.send(payload)
        wait_for(lambda: len(hand.receipts) == len(hostile))
        assert not any(r.accepted for r in hand.receipts)
        # A device that is not a participant, speaking for itself on its own topic.
        stranger.publish(
            client_topic(config.name, "device-999", TopicKind.UPDATE),
            variant({"device_id": "device-999"}),
        )
        wait_for(lambda: len(aggregator.state.rejections()) == len(hostile) + 1)
        assert aggregator.keeper.model.version == 0  # nothing hostile was merged
        hand.send(genuine)
        wait_for(lambda: aggregator.keeper.model.version == 1)
        # the merge can be seen here before the genuine update's receipt has crossed the broker
        wait_for(lambda: len(hand.receipts) == len(hostile) + 1)
        assert hand.receipts[-1].accepted
        totals = aggregator.state.round_totals()[0]
        assert (totals.updates, totals.uplink_bytes) == (1, len(genuine))
        reasons = [reason for _, _, reason in aggregator.state.rejections()]
        for expected in ("round 3", "version 7", "non-finite", "exceeds the bound", "device-999"):
            assert any(expected in reason for reason in reasons), (expected, reasons)
    finally:
        hand.session.close()
        stranger.close()


def test_a_flooding_device_is_throttled_and_its_genuine_update_still_counts(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    limit = {"messages_per_s": 5.0, "burst": 10}
    config = tiny_fleet(secure_broker.url, clients=1, max_lag=0, rate_limit=limit)
    fleet = make_fleet(config, signed=False, credentials=secure_broker.credentials)
    aggregator = fleet.start_aggregator()
    hand = HandDevice(fleet, 0)
    flood = 200
    try:
        hand.hello()
        genuine = hand.update_for_round(0)
        for _ in range(flood):
            hand.send(os.urandom(64))

        def counted() -> bool:
            """Re-send the genuine update, as a throttled device does until its receipt comes
            (sent after the flood, it is handled after every flood message)."""
            hand.send(genuine)
            time.sleep(0.2)
            return aggregator.keeper.model.version == 1

        wait_for(counted)
        rejections = [reason for _, _, reason in aggregator.state.rejections()]
        throttled = [reason for reason in rejections if reason.startswith("rate limit")]
        decoded = len(rejections) - len(throttled)
        assert len(throttled) == 1  # one stored line per streak, not one per dropped message
        # The hello took one token of the burst; the flood got the rest, then the refill only.
        assert limit["burst"] - 1 <= decoded < flood
        receipt = next(r for r in hand.receipts if r.accepted)
        assert receipt.update_sha256 == hashlib.sha256(genuine).hexdigest()
    finally:
        hand.session.close()


def _join(fleet: Fleet, index: int) -> subprocess.Popen[bytes]:
    """`fedfmx-edge join` as its own process, logging (appending) to device-<index>.log."""
    with (fleet.tmp / f"device-{index}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedfmx_cli", "join", "--config",
             str(fleet.device_config(index))],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


def test_a_device_power_cut_mid_training_resumes_from_its_saved_state(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    # both devices take part from round 0: without min_devices the other device can run the
    # whole schedule alone before device-000 has registered, leaving it nothing to resume
    fleet = make_fleet(
        tiny_fleet(secure_broker.url, clients=2, min_devices=2),
        credentials=secure_broker.credentials,
    )
    aggregator = fleet.start_aggregator()
    other = fleet.start_device(1)
    device = _join(fleet, 0)
    try:

        def training() -> bool:
            rows = {row.device_id: row for row in aggregator.state.devices()}
            return "device-000" in rows and rows["device-000"].status.state == "training"

        wait_for(training, timeout_s=60)
        device.kill()  # SIGKILL: no clean disconnect, no state written after this instant
        device.wait(10)
        device = _join(fleet, 0)
        fleet.join([other])
        assert device.wait(WAIT_S) == 0, (fleet.tmp / "device-0.log").read_text()[-2000:]
        fleet.join()
    finally:
        _kill(device)
    state = assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    accepted = {row.device_id: row.updates_accepted for row in state.devices()}
    assert accepted["device-000"] >= 3  # it kept taking part after the power cut
