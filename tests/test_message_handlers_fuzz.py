"""No message on any subscribed topic makes a device or the aggregator raise or stall.

Hypothesis drives the handlers of both services, through the session's own delivery path
(chunk framing included), with arbitrary bytes and with well-formed messages that are wrong
for where they arrive: wrong schema, another fleet or device, out of the plan, out of range,
or hostile numbers (issue 13). Every call must return promptly; afterwards the services'
state is what it was, bar the logged rejection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.service import Aggregator
from aggregator.state import AggregatorState
from edge_client.agent import EdgeDevice, open_device
from edge_client.config import load_device_config
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.device.learner import validate_announcement
from fedfmx.wire.codec import encode_model, encode_update
from fedfmx.wire.messages import CodecSettings, ModelHeader, RoundAnnouncement, UpdateHeader
from fedfmx.wire.signing import sign_announcement, sign_manifest
from transport import (
    DeliveryDeferred,
    MqttSession,
    SessionSettings,
    TopicKind,
    client_topic,
    clients_filter,
    model_body_filter,
    model_manifest_topic,
    round_topic,
    split_message,
)

FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"
FUZZ = settings(
    max_examples=60,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fleet_config() -> FleetConfig:
    document = load_fleet(FLEETS / "ci-digits.yaml").model_dump(mode="json")
    document["service"] = {"broker": {"url": "mqtt://127.0.0.1:9"}}  # never connected
    return FleetConfig.model_validate(document)


def deliver(session: MqttSession, topic: str, payload: bytes, framed: bool) -> None:
    """What the session does with a packet on `topic`: every matching subscription's handler,
    through reassembly for chunked ones. Only `DeliveryDeferred` may come out (it is the
    handler's way to say "not taken"; the session forgets the message id)."""
    import paho.mqtt.client as mqtt

    packets = split_message(payload, 4096) if framed else [payload]
    for sub in list(session._subscriptions.values()):
        if mqtt.topic_matches_sub(sub.topic_filter, topic):
            for packet in packets:
                started = time.monotonic()
                session._deliver(sub, topic, packet)
                assert time.monotonic() - started < 2.0, f"handler for {topic} stalled"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def json_object(**fields: st.SearchStrategy[object]) -> st.SearchStrategy[bytes]:
    """A JSON object with the given fields drawn from strategies, plus junk fields sometimes."""
    return st.fixed_dictionaries(
        fields, optional={"junk": JSON_VALUES, "schema_version": st.integers(-1, 3)}
    ).map(lambda d: json.dumps(d).encode())


ANNOUNCEMENTS = st.builds(
    RoundAnnouncement,
    fleet=st.sampled_from(["ci-digits", "other-fleet"]),
    round=st.integers(0, 10**9),
    task=st.integers(0, 10**6),
    model_version=st.integers(0, 10**9),
    participants=st.lists(st.sampled_from(["device-000", "x", "device-001"]), max_size=3),
    deadline_unix=st.floats(allow_nan=False),
    expert_usage=st.lists(st.floats(allow_nan=False), max_size=6),
    train_backbone=st.booleans(),
    closed=st.booleans(),
)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[EdgeDevice]:
    fleet = fleet_config()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
    config = tmp_path / "device.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": "device-000",
                "fleet_file": str(fleet_file),
                "broker": fleet.service.broker.model_dump(mode="json"),
                "data": {"client_index": 0},
                "state_dir": "state",
            }
        )
    )
    edge = open_device(load_device_config(config))
    edge.session.subscribe(round_topic(fleet.name), edge._on_round)
    edge.session.subscribe(edge._topic(TopicKind.INBOX), edge._on_inbox)
    edge.session.subscribe(model_body_filter(fleet.name, 0), edge._on_model_part)
    edge.session.subscribe(model_manifest_topic(fleet.name, 0), edge._on_model_part)
    yield edge
    edge.session.close()


@FUZZ
@given(payload=st.binary(max_size=600), framed=st.booleans())
def test_a_device_survives_arbitrary_bytes_on_every_topic(
    device: EdgeDevice, payload: bytes, framed: bool
) -> None:
    fleet = device.fleet.name
    for topic in (
        round_topic(fleet),
        device._topic(TopicKind.INBOX),
        model_manifest_topic(fleet, 0),
        f"{model_body_filter(fleet, 0)[:-1]}0",
    ):
        deliver(device.session, topic, payload, framed)
    assert device._announcement is None


@FUZZ
@given(announcement=ANNOUNCEMENTS, signed=st.booleans())
def test_a_device_takes_only_announcements_that_fit_its_plan(
    device: EdgeDevice, announcement: RoundAnnouncement, signed: bool
) -> None:
    text = (
        sign_announcement(None, announcement).model_dump_json().encode()
        if signed
        else announcement.model_dump_json().encode()
    )
    device._announcement = None
    deliver(device.session, round_topic(device.fleet.name), text, framed=True)
    held = device._announcement
    if held is not None:
        validate_announcement(held, device.fleet)  # raises if something out of plan got in
        assert signed


@FUZZ
@given(
    receipt=json_object(
        kind=st.sampled_from(["receipt", "other"]),
        update_sha256=st.text(max_size=70),
        accepted=JSON_VALUES,
    ),
    manifest=json_object(manifest=JSON_VALUES, signature=st.text(max_size=10)),
)
def test_a_device_survives_wrong_schema_inbox_and_manifest_messages(
    device: EdgeDevice, receipt: bytes, manifest: bytes
) -> None:
    deliver(device.session, device._topic(TopicKind.INBOX), receipt, framed=True)
    device._manifests.pop(0, None)
    deliver(device.session, model_manifest_topic(device.fleet.name, 0), manifest, framed=True)
    assert device._receipts == {} or all(len(k) == 64 for k in device._receipts)
    if 0 in device._manifests:
        verified = device._verified_manifest(0)
        device._bodies[0] = b"FMXM junk body"
        assert verified is None or device._verified_body(verified) is None  # junk never verifies


def test_a_device_refuses_a_model_whose_tensors_do_not_fit(device: EdgeDevice) -> None:
    fleet = device.fleet
    weights = {"head.weight": np.zeros((2, 3), np.float32)}
    payload = encode_model(ModelHeader(fleet=fleet.name, version=0, class_names=["a"]), weights)
    manifest = sign_manifest(None, fleet.name, 0, [payload])
    device._bodies[0], device._manifests[0] = payload, manifest.model_dump_json().encode()
    verified = device._verified_manifest(0)
    assert verified is not None  # the manifest is fine: the device keeps it and waits on
    assert device._verified_body(verified) is None
    assert 0 not in device._bodies  # the body was at fault: dropped


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    fleet = fleet_config()
    session = MqttSession(SessionSettings(url=fleet.service.broker.url, client_id="agg"))
    state = AggregatorState(tmp_path / "agg.sqlite", fleet.name)
    service = Aggregator(fleet, state, session)
    for kind, handler, raw in (
        (TopicKind.HELLO, service._on_hello, False),
        (TopicKind.STATUS, service._on_status, True),
        (TopicKind.UPDATE, service._on_update, False),
        (TopicKind.CLOCK, service._on_clock, True),
    ):
        session.subscribe(clients_filter(fleet.name, kind), handler, raw=raw)
    announcement = service.keeper.open_round(0, ["device-000"], time.time() + 60)
    state.open_round(announcement)
    yield service
    state.close()


TOPIC_DEVICES = st.sampled_from(["device-000", "device-001", "a" * 65, "bad id", "+", ""])
HEADERS = st.builds(
    UpdateHeader,
    fleet=st.sampled_from(["ci-digits", "other"]),
    device_id=st.sampled_from(["device-000", "device-001"]),
    round=st.integers(0, 3),
    base_version=st.integers(0, 3),
    num_samples=st.integers(1, 10**12),
    expert_ids=st.lists(st.integers(-2, 9), max_size=5),
    head_classes=st.lists(st.text(max_size=8), max_size=4),
    class_counts=st.lists(st.integers(-5, 10**9), max_size=4),
    expert_usage=st.lists(st.floats(allow_nan=False), max_size=5),
    includes_backbone=st.booleans(),
    includes_fisher=st.booleans(),
    codec=st.builds(CodecSettings, quantize=st.sampled_from(["none", "int8"])),
    train_loss=st.floats(allow_nan=False),
)


def _client_topic(fleet: str, device_id: str, kind: TopicKind) -> str:
    return f"fedfmx/v1/{fleet}/clients/{device_id}/{kind.value}"


def _assert_nothing_counted(aggregator: Aggregator) -> None:
    current = aggregator.keeper.current
    assert current is not None and not current.received
    assert aggregator.state.answered(0) == set()


@FUZZ
@given(payload=st.binary(max_size=600), framed=st.booleans(), sender=TOPIC_DEVICES)
def test_the_aggregator_survives_arbitrary_bytes_on_every_topic(
    aggregator: Aggregator, payload: bytes, framed: bool, sender: str
) -> None:
    for kind in (TopicKind.HELLO, TopicKind.STATUS, TopicKind.UPDATE, TopicKind.CLOCK):
        try:
            deliver(aggregator.session, _client_topic("ci-digits", sender, kind), payload, framed)
        except DeliveryDeferred:  # pragma: no cover - the session absorbs it
            pytest.fail("DeliveryDeferred escaped the session")
    _assert_nothing_counted(aggregator)
    assert aggregator.state.device_count() == 0


@FUZZ
@given(
    header=HEADERS,
    tensors=st.dictionaries(
        st.sampled_from(["router.weight", "experts.0.fc1.weight", "head.rows", "x"]),
        st.integers(0, 4).map(lambda n: np.full((n, 2), 1e30, np.float32)),
        max_size=3,
    ),
)
def test_the_aggregator_rejects_well_formed_but_wrong_updates(
    aggregator: Aggregator, header: UpdateHeader, tensors: dict[str, np.ndarray]
) -> None:
    payload = encode_update(header, tensors).payload
    deliver(
        aggregator.session,
        client_topic("ci-digits", header.device_id, TopicKind.UPDATE),
        payload,
        framed=True,
    )
    _assert_nothing_counted(aggregator)


@FUZZ
@given(
    hello=json_object(
        fleet=st.sampled_from(["ci-digits", "other"]),
        device_id=st.sampled_from(["device-000", "device-001", "z" * 200]),
        profile=st.text(max_size=200),
        classes_met=st.lists(st.text(max_size=150), max_size=3),
        sample_counts=st.dictionaries(st.text(max_size=5), st.integers(-3, 3), max_size=3),
    ),
    status=json_object(
        device_id=st.sampled_from(["device-000", "device-001"]),
        state=st.sampled_from(["online", "skipped", "bogus", "offline"]),
        round=st.integers(-5, 10**12) | st.none(),
    ),
)
def test_the_aggregator_survives_wrong_hellos_and_statuses(
    aggregator: Aggregator, hello: bytes, status: bytes
) -> None:
    hello_topic = _client_topic("ci-digits", "device-000", TopicKind.HELLO)
    status_topic = _client_topic("ci-digits", "device-000", TopicKind.STATUS)
    deliver(aggregator.session, hello_topic, hello, framed=True)
    deliver(aggregator.session, status_topic, status, framed=False)
    for row in aggregator.state.devices():
        assert row.device_id == "device-000"  # only a hello on its own topic registers
    current = aggregator.keeper.current
    assert current is not None and not current.received  # (a valid skip may count)
