"""`service.update_workers`: updates judged and folded in worker processes are stored and
receipted once, survive a worker killed mid-update without being lost or counted twice, and
hostile payloads are refused with the same reasons as in process."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.pooled import PooledAggregator
from aggregator.service import ServiceHooks, first_model, open_aggregator
from aggregator.state import AggregatorState
from aggregator.update_workers import UpdatePool, Verdict
from fedfmx.config import FleetConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import FISHER_PREFIX, HEAD_ROWS
from fedfmx.federation.rounds import GlobalModel, RoundKeeper, expected_update_shapes
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import CodecSettings, Hello, UpdateHeader
from transport import (
    MosquittoBroker,
    TopicKind,
    client_topic,
    decode_chunk,
    round_topic,
    split_message,
)

DEVICES = [f"d{i}" for i in range(8)]


def _fleet(url: str = "mqtt://127.0.0.1:1", devices: int = len(DEVICES)) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "name": "pool",
            "method": "fedfmx",  # the SGD FedFMX: update workers fold deltas, not statistics
            "codec": CodecSettings(quantize="int8", zstd_level=3).model_dump(),
            "protocol": {
                "num_clients": devices,
                "num_tasks": 1,
                "rounds_per_task": 1,
                "max_lag": 0,
            },
            "service": {
                "broker": {"url": url},
                "round_deadline_s": 120.0,
                "min_devices": devices,
                "update_workers": 2,
            },
        }
    )


def _update(fleet: FleetConfig, model: GlobalModel, device: str, seed: int, **bad: float) -> bytes:
    """A random update of the fleet's model shapes from `device` for round 0."""
    header = UpdateHeader(
        fleet=fleet.name,
        device_id=device,
        round=0,
        base_version=model.version,
        num_samples=100 + seed,
        expert_ids=[0, 1],
        head_classes=["a", "b"],
        class_counts=[50, 50 + seed],
        expert_usage=[1.0, 1.0] + [0.0] * (fleet.model.num_experts - 2),
        includes_backbone=True,
        includes_fisher=True,
        codec=fleet.uplink_codec,
        train_loss=0.5,
    )
    rng = np.random.default_rng(seed)
    tensors = {
        name: (np.abs if name.startswith(FISHER_PREFIX) else np.asarray)(
            rng.normal(0.0, 0.01, size=shape).astype(np.float32)
        )
        for name, shape in expected_update_shapes(header, model.weights).items()
    }
    tensors[HEAD_ROWS] *= bad.get("scale", 1.0)
    with np.errstate(invalid="ignore"):  # a NaN row quantises to a NaN scale: refused
        return encode_update(header, tensors).payload


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _merged(fleet: FleetConfig, model: GlobalModel, payloads: dict[str, bytes]) -> GlobalModel:
    """The merge of these updates by one in-process keeper (the reference)."""
    keeper = RoundKeeper(fleet, model)
    keeper.open_round(0, DEVICES, time.time() + 60)
    for device, payload in payloads.items():
        keeper.accept(payload, device)
    return keeper.close_round()


def _assert_same_model(left: GlobalModel, right: GlobalModel) -> None:
    assert left.version == right.version and left.class_names == right.class_names
    for name, value in left.weights.items():
        np.testing.assert_allclose(value, right.weights[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def model() -> GlobalModel:
    return first_model(_fleet())


def test_a_worker_killed_mid_update_loses_nothing_and_counts_nothing_twice(
    model: GlobalModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _fleet()
    payloads = {device: _update(fleet, model, device, seed) for seed, device in enumerate(DEVICES)}
    verdicts: list[Verdict] = []
    accepted: dict[str, bytes] = {}

    def on_verdict(verdict: Verdict, payload: bytes) -> None:
        verdicts.append(verdict)
        if verdict.refusal is None and not verdict.duplicate:
            accepted[verdict.device_id] = payload

    def replay(shard: int, workers: int) -> list[tuple[str, bytes]]:
        return [(d, p) for d, p in accepted.items() if pool.shard(d) == shard]

    # every worker SIGKILLs itself after folding its 2nd update, before answering for it
    monkeypatch.setenv("FEDFMX_CRASH_AT", "worker_update_folded:2")
    pool = UpdatePool(fleet, 2, on_verdict, replay)
    try:
        announcement = RoundKeeper(fleet, model).open_round(0, DEVICES, time.time() + 60)
        pool.open_round(model, announcement)
        for device in DEVICES:
            pool.submit(device, payloads[device], _digest(payloads[device]))
        pool.submit(DEVICES[0], payloads[DEVICES[0]], _digest(payloads[DEVICES[0]]))  # re-sent
        sums, folded = pool.sums()
    finally:
        pool.close()
    assert pool.restarts >= 2  # each shard holds more than two devices
    assert {d: sum(v.device_id == d for v in verdicts if v.refusal is None) for d in DEVICES} == {
        d: 1 + (d == DEVICES[0]) for d in DEVICES
    }
    assert [v.device_id for v in verdicts if v.duplicate] == [DEVICES[0]]
    assert folded == set(DEVICES) and sums.updates == len(DEVICES)
    pooled = RoundKeeper(fleet, model)
    pooled.resume_round(announcement)
    assert pooled.current is not None
    pooled.current.sums, pooled.current.received = sums, folded
    _assert_same_model(pooled.close_round(), _merged(fleet, model, payloads))


def test_hostile_updates_are_refused_by_workers_with_the_in_process_reasons(
    model: GlobalModel,
) -> None:
    fleet = _fleet()
    honest = _update(fleet, model, "d1", 1)
    hostile = {
        "d0": b"garbage, not an update",
        "d1": honest[:-40],  # truncated
        "d2": _update(fleet, model, "d2", 2, scale=float("nan")),
        "d3": _update(fleet, model, "d3", 3, scale=1e9),  # beyond the norm bound
        "d4": honest,  # d1's update, sent by d4
        "intruder": _update(fleet, model, "intruder", 5),  # not a participant
    }
    reference = RoundKeeper(fleet, model)
    announcement = reference.open_round(0, DEVICES, time.time() + 60)
    expected = {}
    for device, payload in hostile.items():
        with pytest.raises(ProtocolError) as refusal:
            reference.accept(payload, device)
        expected[device] = str(refusal.value)
    verdicts: dict[str, str | None] = {}
    pool = UpdatePool(
        fleet, 2, lambda v, _: verdicts.update({v.device_id: v.refusal}), lambda s, n: []
    )
    try:
        pool.open_round(model, announcement)
        for device, payload in hostile.items():
            pool.submit(device, payload, _digest(payload))
        sums, folded = pool.sums()
    finally:
        pool.close()
    assert verdicts == expected
    assert all(expected.values()) and folded == set() and sums.updates == 0


def _device(
    broker: MosquittoBroker, fleet: FleetConfig, name: str, sends: list[bytes], receipts: list
) -> mqtt.Client:
    """A plain paho device: hello, then on the round's announcement send `sends` in order."""

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        body = json.loads(decode_chunk(bytes(message.payload)).body)
        if message.topic == round_topic(fleet.name):
            if body["announcement"]["round"] == 0 and not body["announcement"].get("closed"):
                while sends:
                    for chunk in split_message(sends.pop(0), 128 * 1024):
                        client.publish(client_topic(fleet.name, name, TopicKind.UPDATE), chunk, 1)
        else:
            receipts.append(body)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.subscribe(client_topic(fleet.name, name, TopicKind.INBOX), qos=1)
    client.subscribe(round_topic(fleet.name), qos=1)
    client.loop_start()
    hello = Hello(fleet=fleet.name, device_id=name, profile="t", classes_met=[], sample_counts={})
    for chunk in split_message(hello.model_dump_json().encode(), 128 * 1024):
        client.publish(client_topic(fleet.name, name, TopicKind.HELLO), chunk, 1, retain=True)
    return client


def test_a_pooled_aggregator_over_mosquitto_stores_and_receipts_each_update_once(
    mosquitto_broker: MosquittoBroker,
    model: GlobalModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = _fleet(mosquitto_broker.url, devices=4)
    devices = DEVICES[:4]
    monkeypatch.setenv("FEDFMX_CRASH_AT", "worker_update_folded:2")  # in the workers only
    aggregator = open_aggregator(fleet, tmp_path / "state.sqlite", ServiceHooks())
    assert isinstance(aggregator, PooledAggregator)
    version0 = aggregator.keeper.model
    payloads = {d: _update(fleet, version0, d, seed) for seed, d in enumerate(devices)}
    sends = {d: [payloads[d]] for d in devices}
    sends["d0"] = [b"FMXU\xff\xff\xff\xff", payloads["d0"], payloads["d0"]]  # hostile, then twice
    receipts: dict[str, list[dict]] = {d: [] for d in devices}
    clients = [_device(mosquitto_broker, fleet, d, sends[d], receipts[d]) for d in devices]
    try:
        aggregator.start()
        runner = threading.Thread(target=aggregator.run, daemon=True)
        runner.start()
        runner.join(90)
        assert aggregator.finished, "the round did not close"
        deadline = time.monotonic() + 10
        while sum(map(len, receipts.values())) < len(devices) + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        aggregator.session.close()
    assert aggregator.pool.restarts >= 1
    for device in devices:
        digests = [r["update_sha256"] for r in receipts[device] if r["accepted"]]
        assert digests == [_digest(payloads[device])] * (1 + (device == "d0")), device
    refused = [r for r in receipts["d0"] if not r["accepted"]]
    assert len(refused) == 1 and "header length" in refused[0]["reason"]
    state = AggregatorState(tmp_path / "state.sqlite", fleet.name)
    try:
        assert sorted(state.update_digests(0)) == sorted(
            (d, _digest(p)) for d, p in payloads.items()
        )
        assert any("header length" in why for _, _, why in state.rejections())
    finally:
        state.close()
    _assert_same_model(aggregator.keeper.model, _merged(fleet, version0, payloads))


@pytest.mark.parametrize(
    "change",
    [
        {"service": {"update_workers": 2, "mode": "buffered"}},
        {"service": {"update_workers": 2}, "robustness": {"merge": "median"}},
        {"service": {"update_workers": 2}, "method": "fedfmx_cf"},
    ],
)
def test_update_workers_are_refused_where_the_merge_is_not_partial_sums(change: dict) -> None:
    document = _fleet().model_dump(mode="json")
    for section, values in change.items():
        if isinstance(values, dict):
            document[section] = document[section] | values
        else:
            document[section] = values
    with pytest.raises(ValueError, match="update_workers fold partial sums"):
        FleetConfig.model_validate(document)


def test_an_update_after_its_round_closed_is_refused_not_folded(
    mosquitto_broker: MosquittoBroker,
    model: GlobalModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new update after the close is refused; a copy of the one stored (it raced the close,
    or its receipt was lost) is receipted as accepted again, not refused."""
    fleet = _fleet(mosquitto_broker.url, devices=1)
    aggregator = open_aggregator(fleet, tmp_path / "state.sqlite", ServiceHooks())
    assert isinstance(aggregator, PooledAggregator)
    hello = Hello(fleet=fleet.name, device_id="d0", profile="t", classes_met=[], sample_counts={})
    aggregator.state.register(hello)
    try:
        aggregator.start()
        aggregator._tick(time.time())  # round 0 opens, d0 its one participant
        first = _update(fleet, aggregator.keeper.model, "d0", 0)
        late = _update(fleet, aggregator.keeper.model, "d0", 1)
        aggregator._take_update("d0", first, _digest(first))
        aggregator._commit_accepted()
        aggregator._tick(time.time())  # every participant answered: merged and closed
        assert aggregator.keeper.current is None and aggregator.keeper.model.version == 1
        aggregator._take_update("d0", late, _digest(late))  # the workers still hold round 0
        aggregator._commit_accepted()
        receipts: list[tuple[str, str, str]] = []
        monkeypatch.setattr(aggregator, "_receipt", lambda *receipt: receipts.append(receipt))
        aggregator._take_update("d0", first, _digest(first))
        aggregator._commit_accepted()
    finally:
        aggregator.pool.close()
        aggregator.session.close()
    assert aggregator.state.update_digests(0) == [("d0", _digest(first))]
    assert [why for _, d, why in aggregator.state.rejections() if d == "d0"] == ["no round is open"]
    assert receipts == [("d0", _digest(first), "")]
