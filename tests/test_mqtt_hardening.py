"""Regressions of issue 13 against a real Mosquitto: nothing a message, a flood or a stop does
may crash, stall or silently lose anything.

Uses the fleet harness of `test_mqtt_federation` (a tiny digits fleet, the aggregator and
devices as threads or processes). Brokers here have no ACLs: anyone may publish anywhere, as
on a pilot's first, unprovisioned broker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_mqtt_federation import (
    FLEETS,
    Fleet,
    HandDevice,
    assert_every_answer_counted_once,
    make_fleet,
    tiny_fleet,
    wait_for,
)

from aggregator.service import ServiceHooks, open_aggregator
from aggregator.state import AggregatorState
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.codec import encode_model
from fedfmx.wire.messages import Hello, ModelHeader, RoundAnnouncement
from fedfmx.wire.signing import chunk_payload, load_signing_key, sign_announcement, sign_manifest
from transport import (
    MosquittoBroker,
    MqttSession,
    SessionSettings,
    TopicKind,
    client_topic,
    model_body_topic,
    model_manifest_topic,
    mqtt_client_id,
    round_topic,
    split_message,
)

__all__ = ["make_fleet"]  # the fixture, re-exported for pytest


def stranger(broker: MosquittoBroker) -> MqttSession:
    session = MqttSession(SessionSettings(url=broker.url, client_id=f"x-{uuid.uuid4().hex[:8]}"))
    session.connect()
    return session


def test_an_undisturbed_fast_fleet_drops_nothing_at_the_default_rate_limit(
    mosquitto_broker: MosquittoBroker,
    make_fleet: Callable[..., Fleet],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Item 1: ci-digits' whole schedule, rounds of a fraction of a second, default limits."""
    config = tiny_fleet(mosquitto_broker.url)
    document = config.model_dump(mode="json")
    document["protocol"].update(num_tasks=5, rounds_per_task=2)
    fleet = make_fleet(type(config).model_validate(document))
    caplog.set_level(logging.WARNING)
    fleet.start_aggregator()
    fleet.join([fleet.start_device(i) for i in range(3)])
    fleet.join()
    state = assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    assert not [r for r in state.rejections() if r[2].startswith("rate limit")]
    assert "update dropped" not in caplog.text
    accepted = {row.device_id: row.updates_accepted for row in state.devices()}
    for name, device in fleet.devices.items():
        assert device.snapshot.progress.updates_sent == accepted[name] > 0


def test_a_throttled_update_resent_under_its_own_message_id_still_counts(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Item 1: a throttled message was remembered as delivered, so every re-send (same id)
    was dropped as a duplicate and the update was lost."""
    limit = {"messages_per_s": 0.2, "burst": 2}
    config = tiny_fleet(mosquitto_broker.url, clients=1, max_lag=0, rate_limit=limit)
    fleet = make_fleet(config, signed=False)
    aggregator = fleet.start_aggregator()
    hand = HandDevice(fleet, 0)
    try:
        hand.hello()  # one token
        genuine = hand.update_for_round(0)
        hand.send(os.urandom(64))  # the other token, and a throttled one
        hand.send(os.urandom(64))
        message_id = uuid.uuid4().bytes
        topic = hand.topic(TopicKind.UPDATE)

        def counted() -> bool:
            hand.session.publish(topic, genuine, message_id=message_id)
            time.sleep(0.3)
            return aggregator.keeper.model.version == 1

        wait_for(counted, timeout_s=30)
        assert any(r[2].startswith("rate limit") for r in aggregator.state.rejections())
    finally:
        hand.session.close()


def test_a_registry_flood_is_bounded_and_the_aggregator_always_comes_back(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Item 2: thousands of registered ids once made the announcement too large to publish,
    and the aggregator died on start, every time. Here a state already holding 3,000 devices
    and a live flood of hellos from random ids meet a 4 KiB payload limit (44 devices)."""
    config = tiny_fleet(
        mosquitto_broker.url,
        clients=2,
        broker={"max_payload_bytes": 4096},
        device_expiry_s=1.0,
        round_deadline_s=3.0,
        max_extensions=0,
        dormant_after_rounds=1,
    )
    assert config.device_capacity == 44
    fleet = make_fleet(config)
    state = AggregatorState(fleet.state_path, config.name)
    for index in range(3000):
        state.register(
            Hello(fleet=config.name, device_id=f"old-{index}", profile="x", classes_met=[],
                  sample_counts={})
        )  # fmt: skip
    state.close()
    flood = stranger(mosquitto_broker)
    try:
        time.sleep(1.1)  # the old ids are now silent for longer than device_expiry_s
        first = fleet.start_aggregator()
        for _ in range(300):
            junk = Hello(fleet=config.name, device_id=uuid.uuid4().hex, profile="x",
                         classes_met=[], sample_counts={})  # fmt: skip
            flood.publish(
                client_topic(config.name, junk.device_id, TopicKind.HELLO),
                junk.model_dump_json().encode(),
                wait=False,
            )
        fleet.join([fleet.start_device(0), fleet.start_device(1)])
        fleet.join()
    finally:
        flood.close()
    after = AggregatorState(fleet.state_path, config.name)
    assert after.device_count() <= config.device_capacity
    registered = {row.device_id: row.updates_accepted for row in after.devices()}
    assert registered["device-000"] > 0 and registered["device-001"] > 0
    for totals in after.round_totals():
        assert totals.participants <= config.device_capacity and totals.closed is not None
    after.close()
    # Restarted on the state it wrote, it comes back, re-announces, and finds the schedule done.
    first.session.close()
    again = open_aggregator(fleet.fleet, fleet.state_path, ServiceHooks())
    finished: list[bool] = []
    thread = threading.Thread(target=lambda: finished.append(again.run(threading.Event())))
    again.start()
    thread.start()
    thread.join(30)
    again.session.close()
    assert finished == [True]


def _junk_on_retained_topics(session: MqttSession, fleet_name: str, version: int) -> None:
    """Random bytes, wrong-schema JSON, an unsigned and a foreign-signed announcement for a
    round far outside the plan, and junk on the model's manifest and first body chunk."""
    foreign = Ed25519PrivateKey.generate()
    far = RoundAnnouncement(
        fleet=fleet_name, round=999_999, task=499_999, model_version=0, participants=[],
        deadline_unix=time.time() + 60, expert_usage=[0.25] * 4, train_backbone=True,
    )  # fmt: skip
    round_junk = [
        os.urandom(300),
        b'{"schema_version": 1, "hello": "world"}',
        sign_announcement(None, far).model_dump_json().encode(),
        sign_announcement(foreign, far).model_dump_json().encode(),
    ]
    for junk in round_junk:
        session.publish_raw(round_topic(fleet_name), junk[:1000], retain=True)
        session.publish(round_topic(fleet_name), junk, retain=True)
    manifest = model_manifest_topic(fleet_name, version)
    session.publish(manifest, b'{"manifest": "forged"}', retain=True)
    session.publish_raw(f"{model_body_topic(fleet_name, version)}/0", os.urandom(200), retain=True)


def test_junk_retained_on_the_round_and_model_topics_cannot_crash_or_stall_the_fleet(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Items 3 and 4: devices that join after the junk was retained, and junk again mid-run."""
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url, clients=2))
    aggregator = fleet.start_aggregator()
    attacker = stranger(mosquitto_broker)
    try:
        _junk_on_retained_topics(attacker, fleet.fleet.name, 0)
        devices = [fleet.start_device(0), fleet.start_device(1)]
        wait_for(lambda: aggregator.keeper.model.version >= 1)
        _junk_on_retained_topics(attacker, fleet.fleet.name, aggregator.keeper.model.version)
        fleet.join(devices)
        fleet.join()
    finally:
        attacker.close()
    assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    assert not fleet.errors


def test_junk_first_chunks_on_a_device_topic_do_not_lock_it_out(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Item 5: four never-completed first chunks once held a sender's reassembly slots."""
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url, clients=1, max_lag=0))
    aggregator = fleet.start_aggregator()
    attacker = stranger(mosquitto_broker)
    topic = client_topic(fleet.fleet.name, "device-000", TopicKind.UPDATE)
    try:
        for _ in range(10):
            first = split_message(os.urandom(10_000), 2_000)[0]
            attacker.publish_raw(topic, first)
        fleet.join([fleet.start_device(0)])
        fleet.join()
    finally:
        attacker.close()
    assert_every_answer_counted_once(fleet.state_path, fleet.fleet)
    assert aggregator.state.devices()[0].updates_accepted == fleet.fleet.protocol.num_rounds


def test_a_device_stops_resending_once_its_round_is_announced_closed(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Item 7: a device whose last update got no receipt re-sent it for minutes after the
    fleet was done. Here the test is the aggregator: it never answers, then closes the round."""
    config = tiny_fleet(mosquitto_broker.url, clients=1, max_lag=0)
    fleet = make_fleet(config)
    key = load_signing_key(fleet.fleet.service.signing_key)
    last = config.protocol.num_rounds - 1
    hand = stranger(mosquitto_broker)
    updates: list[bytes] = []
    hand.subscribe(  # raw: every packet, re-sends (same message id) included
        client_topic(config.name, "device-000", TopicKind.UPDATE),
        lambda _, m: updates.append(m),
        raw=True,
    )
    payload = encode_model(
        ModelHeader(fleet=config.name, version=0, class_names=[]), initial_model(config).weights
    )
    chunk_bytes = config.service.broker.max_payload_bytes
    manifest = sign_manifest(key, config.name, 0, chunk_payload(payload, chunk_bytes))
    hand.publish_retained_chunks(model_body_topic(config.name, 0), payload)
    hand.publish(
        model_manifest_topic(config.name, 0), manifest.model_dump_json().encode(), retain=True
    )
    announcement = RoundAnnouncement(
        fleet=config.name, round=last, task=last // config.protocol.rounds_per_task,
        model_version=0, participants=["device-000"], deadline_unix=time.time() + 60,
        expert_usage=[0.25] * 4, train_backbone=True,
    )  # fmt: skip
    try:
        thread = fleet.start_device(0)
        signed = sign_announcement(key, announcement)
        hand.publish(round_topic(config.name), signed.model_dump_json().encode(), retain=True)
        wait_for(lambda: len(set(updates)) < len(updates))  # sent again: no receipt came
        closed = sign_announcement(key, announcement.model_copy(update={"closed": True}))
        hand.publish(round_topic(config.name), closed.model_dump_json().encode(), retain=True)
        thread.join(15)
        assert not thread.is_alive(), "the device kept re-sending after its round closed"
        device = fleet.devices["device-000"]
        assert device.snapshot.pending_update is None
    finally:
        hand.close()


def test_same_device_id_in_two_fleets_coexists_and_a_true_clash_backs_off(
    mosquitto_broker: MosquittoBroker,
) -> None:
    """Item 8: the client id carries the fleet; two clients with one identity back off
    instead of knocking each other off every second."""
    url = mosquitto_broker.url
    a = MqttSession(SessionSettings(url=url, client_id=mqtt_client_id("fleet-a", "device-001")))
    b = MqttSession(SessionSettings(url=url, client_id=mqtt_client_id("fleet-b", "device-001")))
    same = mqtt_client_id("fleet-a", "device-002")
    c = MqttSession(SessionSettings(url=url, client_id=same, keepalive_s=5))
    d = MqttSession(SessionSettings(url=url, client_id=same, keepalive_s=5))
    try:
        a.connect()
        b.connect()
        c.connect()
        d.connect()
        wait_for(lambda: c._attempt >= 3 and d._attempt >= 3, timeout_s=60)
        assert a.connected and b.connected
        assert a._attempt == 0 and b._attempt == 0
    finally:
        for session in (a, b, c, d):
            session.close()


def _process(arguments: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "fedfmx_cli", *arguments],
            stdout=sink,
            stderr=sink,
            stdin=subprocess.DEVNULL,
        )


def test_sigterm_stops_waiting_services_promptly_with_their_state_saved(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Item 10: a device waiting for a round and an aggregator waiting for devices."""
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url, clients=3))
    logs = fleet.tmp
    serve = _process(["serve", "--fleet", str(fleet.fleet_file), "--state",
                      str(fleet.state_path)], logs / "serve.log")  # fmt: skip
    join = _process(["join", "--config", str(fleet.device_config(0))], logs / "join.log")
    try:
        registered = logs / "serve.log"
        wait_for(lambda: "device_registered" in registered.read_text(), timeout_s=60)
        time.sleep(1.0)  # both are now waiting (two devices are missing)
        join.send_signal(signal.SIGTERM)
        assert join.wait(timeout=15) == 0, (logs / "join.log").read_text()[-2000:]
        wait_for(lambda: "device_offline" in registered.read_text(), timeout_s=30)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=15) == 0, registered.read_text()[-2000:]
    finally:
        for process in (serve, join):
            if process.poll() is None:
                process.kill()
    state = AggregatorState(fleet.state_path, fleet.fleet.name)
    assert [row.device_id for row in state.devices()] == ["device-000"]
    assert state.devices()[0].status.state == "offline"


def test_a_stopped_simulate_stops_every_process_it_started(tmp_path: Path) -> None:
    """Item 10: `simulate` stopped by SIGTERM once left its device processes running."""
    workdir = tmp_path / "w"
    simulate = _process(
        ["simulate", "--fleet", str(FLEETS / "ci-digits.yaml"), "--broker", "mosquitto",
         "--workdir", str(workdir)],
        tmp_path / "simulate.log",
    )  # fmt: skip
    parent = psutil.Process(simulate.pid)

    def devices() -> list[psutil.Process] | None:
        found = []
        for child in parent.children(recursive=True):
            try:
                if "join" in child.cmdline():
                    found.append(child)
            except psutil.Error:  # gone (or a zombie) meanwhile
                continue
        return found if len(found) == 3 else None

    try:
        children = wait_for(devices, timeout_s=60)
        simulate.send_signal(signal.SIGTERM)
        simulate.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still running after simulate stopped: {alive}"
    finally:
        if simulate.poll() is None:
            for process in parent.children(recursive=True):
                process.kill()
            simulate.kill()
