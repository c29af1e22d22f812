"""MqttSession against real brokers on loopback: Mosquitto (MQTT 5) and embedded amqtt (3.1.1)."""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedfmx.errors import FedFMXError
from transport.brokers import EmbeddedBroker, MosquittoBroker, find_mosquitto, free_port
from transport.chunks import chunk_count, split_message
from transport.session import LastWill, MqttSession, SessionSettings
from transport.topics import (
    TopicKind,
    client_topic,
    model_body_filter,
    model_body_topic,
    model_manifest_topic,
)

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 10.0
UPDATE = client_topic("demo", "dev-1", TopicKind.UPDATE)
STATUS = client_topic("demo", "dev-1", TopicKind.STATUS)


class Inbox:
    """A handler that records what it receives and lets a test wait for it (bounded)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()

    def __call__(self, topic: str, message: bytes) -> None:
        with self._changed:
            self.messages.append((topic, message))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.messages) >= count, timeout_s)


def _settings(url: str, client_id: str, **extra: object) -> SessionSettings:
    return SessionSettings.model_validate(
        {"url": url, "client_id": client_id, "ack_timeout_s": WAIT_S, **extra}
    )


@pytest.fixture
def open_session() -> Iterator[Callable[..., MqttSession]]:
    """Builds sessions for a test and closes all of them afterwards, whatever happens."""
    sessions: list[MqttSession] = []

    def build(url: str, client_id: str, *, connect: bool = True, **extra: object) -> MqttSession:
        session = MqttSession(_settings(url, client_id, **extra))
        sessions.append(session)
        if connect:
            session.connect()
        return session

    yield build
    for session in sessions:
        session.close()


def _megabyte(seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(1_000_000)


def test_megabyte_message_travels_in_16k_chunks_and_arrives_intact(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    received, packets = Inbox(), Inbox()
    receiver = open_session(mosquitto_broker.url, "aggregator")
    receiver.subscribe(UPDATE, received)
    spy = open_session(mosquitto_broker.url, "spy")
    spy.subscribe(UPDATE, packets, raw=True)
    sender = open_session(mosquitto_broker.url, "dev-1", max_payload_bytes=16 * 1024)
    assert sender.protocol == "5"
    payload = _megabyte()

    sender.publish(UPDATE, payload)

    expected_chunks = chunk_count(len(payload), 16 * 1024)
    assert received.wait_for(1)
    assert packets.wait_for(expected_chunks)
    assert received.messages == [(UPDATE, payload)]
    assert all(len(packet) <= 16 * 1024 for _, packet in packets.messages)
    assert sender.unacknowledged() == []


def test_duplicate_chunks_and_republished_messages_are_delivered_once(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    received = Inbox()
    receiver = open_session(mosquitto_broker.url, "aggregator")
    receiver.subscribe(UPDATE, received)
    sender = open_session(mosquitto_broker.url, "dev-1")
    payload = random.Random(1).randbytes(40_000)
    chunks = split_message(payload, 4_096)

    for chunk in [*chunks[:3], *chunks, *chunks[::-1]]:
        sender.publish_raw(UPDATE, chunk)
    mid = sender.publish(UPDATE, b"second")
    sender.publish(UPDATE, b"second", message_id=mid)
    sender.publish(UPDATE, b"third")

    assert received.wait_for(3)
    assert [m for _, m in received.messages] == [payload, b"second", b"third"]


def test_resending_only_the_missing_chunks_completes_a_message(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    received = Inbox()
    receiver = open_session(mosquitto_broker.url, "aggregator")
    receiver.subscribe(UPDATE, received)
    sender = open_session(mosquitto_broker.url, "dev-1", max_payload_bytes=1_024)
    payload = random.Random(2).randbytes(5_000)

    mid = sender.publish(UPDATE, payload, only_chunks=[0, 2, 4])
    sender.publish(UPDATE, b"marker")
    assert received.wait_for(1)
    [partial] = receiver.incomplete_messages()
    assert (partial.message_id, partial.missing) == (mid, (1, 3, 5))

    sender.publish(UPDATE, payload, message_id=mid, only_chunks=partial.missing)
    assert received.wait_for(2)
    assert [m for _, m in received.messages] == [b"marker", payload]


def test_last_will_marks_a_killed_client_offline(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    device = (
        "import sys\n"
        "from transport.session import LastWill, MqttSession, SessionSettings\n"
        f"s = MqttSession(SessionSettings(url={mosquitto_broker.url!r}, client_id='dev-1',\n"
        f"    will=LastWill(topic={STATUS!r}, payload=b'offline')))\n"
        "s.connect()\n"
        f"s.publish_raw({STATUS!r}, b'online', retain=True)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", device],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], WAIT_S)
            assert ready, "device subprocess did not connect"
            assert process.stdout.readline() == b"ready\n"
            status = Inbox()
            watcher = open_session(mosquitto_broker.url, "aggregator")
            watcher.subscribe(STATUS, status, raw=True)
            assert status.wait_for(1)
            assert status.messages[0] == (STATUS, b"online")

            process.send_signal(signal.SIGKILL)
            process.wait(timeout=WAIT_S)

            assert status.wait_for(2)
            assert status.messages[1] == (STATUS, b"offline")
        finally:
            process.kill()  # no-op once it is dead; never leaves a child behind
    late = Inbox()
    open_session(mosquitto_broker.url, "late").subscribe(STATUS, late, raw=True)
    assert late.wait_for(1)
    assert late.messages == [(STATUS, b"offline")]


def test_clean_close_does_not_fire_the_last_will(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    status = Inbox()
    watcher = open_session(mosquitto_broker.url, "aggregator")
    watcher.subscribe(STATUS, status, raw=True)
    device = open_session(
        mosquitto_broker.url, "dev-1", will=LastWill(topic=STATUS, payload=b"offline")
    )
    device.publish_raw(STATUS, b"online", retain=True)
    device.close()
    watcher.publish_raw(STATUS, b"marker")
    assert status.wait_for(2)
    assert [m for _, m in status.messages] == [b"online", b"marker"]


def test_persistent_session_gets_what_was_sent_while_away_across_a_broker_restart(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    away = open_session(mosquitto_broker.url, "aggregator")
    away.subscribe(UPDATE, Inbox())
    away.close()
    mosquitto_broker.restart()

    sender = open_session(mosquitto_broker.url, "dev-1", max_payload_bytes=16 * 1024)
    payload = random.Random(3).randbytes(100_000)
    sender.publish(UPDATE, payload)

    received = Inbox()
    back = open_session(mosquitto_broker.url, "aggregator", connect=False)
    back.subscribe(UPDATE, received)
    back.connect()
    assert received.wait_for(1)
    assert received.messages == [(UPDATE, payload)]


def test_publish_during_a_broker_outage_is_delivered_after_reconnect(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    received = Inbox()
    receiver = open_session(mosquitto_broker.url, "aggregator")
    receiver.subscribe(UPDATE, received)
    sender = open_session(mosquitto_broker.url, "dev-1")

    mosquitto_broker.stop()
    with pytest.raises(TimeoutError, match="unacknowledged"):
        sender.publish(UPDATE, b"queued while down", timeout_s=0.3)
    [pending] = sender.unacknowledged()
    assert (pending.topic, pending.chunk_indices) == (UPDATE, (0,))
    mosquitto_broker.start()

    assert sender.wait_connected(WAIT_S)
    assert receiver.wait_connected(WAIT_S)
    assert sender.flush(WAIT_S)
    assert received.wait_for(1)
    assert received.messages == [(UPDATE, b"queued while down")]


def test_late_subscriber_receives_retained_manifest_and_chunked_body(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    manifest_topic = model_manifest_topic("demo", 4)
    body_topic = model_body_topic("demo", 4)
    body = random.Random(4).randbytes(100_000)
    aggregator = open_session(mosquitto_broker.url, "aggregator", max_payload_bytes=16 * 1024)
    aggregator.publish(manifest_topic, b'{"version": 4}', retain=True)
    count = aggregator.publish_retained_chunks(body_topic, body)
    assert count == chunk_count(len(body), 16 * 1024)
    aggregator.close()

    manifests, bodies = Inbox(), Inbox()
    device = open_session(mosquitto_broker.url, "dev-1")
    device.subscribe(manifest_topic, manifests)
    device.subscribe(model_body_filter("demo", 4), bodies)
    assert manifests.wait_for(1)
    assert bodies.wait_for(1)
    assert manifests.messages == [(manifest_topic, b'{"version": 4}')]
    assert bodies.messages == [(body_topic, body)]


def test_retained_message_too_large_for_one_chunk_is_refused(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    session = open_session(mosquitto_broker.url, "aggregator", max_payload_bytes=1_024)
    with pytest.raises(ValueError, match="publish_retained_chunks"):
        session.publish(model_manifest_topic("demo", 1), bytes(5_000), retain=True)


def test_chunks_shrink_to_the_broker_announced_maximum_packet_size(
    open_session: Callable[..., MqttSession],
) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: run `sudo apt-get install -y mosquitto`")
    with MosquittoBroker(extra_config=["max_packet_size 8192"]) as broker:
        received = Inbox()
        receiver = open_session(broker.url, "aggregator")
        receiver.subscribe(UPDATE, received)
        sender = open_session(broker.url, "dev-1")
        assert sender.chunk_limit(UPDATE) < 8192 < sender.settings.max_payload_bytes
        payload = random.Random(5).randbytes(100_000)
        sender.publish(UPDATE, payload)
        assert received.wait_for(1)
        assert received.messages == [(UPDATE, payload)]
        receiver.close()
        sender.close()


def test_failing_handler_and_malformed_packets_do_not_stop_delivery(
    mosquitto_broker: MosquittoBroker,
    open_session: Callable[..., MqttSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    received = Inbox()

    def fragile(topic: str, message: bytes) -> None:
        if message == b"boom":
            raise RuntimeError("handler bug")
        received(topic, message)

    receiver = open_session(mosquitto_broker.url, "aggregator")
    receiver.subscribe(UPDATE, fragile)
    sender = open_session(mosquitto_broker.url, "dev-1")
    with caplog.at_level(logging.WARNING, logger="transport.session"):
        sender.publish(UPDATE, b"boom")
        sender.publish_raw(UPDATE, b"not a chunk at all")
        sender.publish(UPDATE, b"fine")
        assert received.wait_for(1)
    assert received.messages == [(UPDATE, b"fine")]
    assert "handler for" in caplog.text
    assert "rejected a packet" in caplog.text


def test_slow_handler_does_not_block_the_network_thread(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(topic: str, message: bytes) -> None:
        started.set()
        release.wait(WAIT_S)

    session = open_session(mosquitto_broker.url, "aggregator")
    session.subscribe(UPDATE, slow)
    try:
        session.publish(UPDATE, b"first")
        assert started.wait(WAIT_S)
        session.publish(UPDATE, b"acked while the handler is busy", timeout_s=3.0)
    finally:
        release.set()


def test_idle_hooks_run_on_the_handler_thread_once_the_queued_messages_are_handled(
    mosquitto_broker: MosquittoBroker, open_session: Callable[..., MqttSession]
) -> None:
    """What lets the aggregator commit a burst of updates at once: the hook runs where the
    handlers run, and a run after the last message has seen every one of them."""
    handled: list[bytes] = []
    seen_by_hook: list[tuple[int, str]] = []
    release = threading.Event()

    def handler(topic: str, message: bytes) -> None:
        release.wait(WAIT_S)  # the rest queue up meanwhile
        handled.append(message)

    session = open_session(mosquitto_broker.url, "aggregator")
    session.subscribe(UPDATE, handler)
    session.on_idle(lambda: seen_by_hook.append((len(handled), threading.current_thread().name)))
    sender = open_session(mosquitto_broker.url, "dev-1")
    for index in range(5):
        sender.publish(UPDATE, bytes([index]))
    release.set()
    give_up = time.monotonic() + WAIT_S
    while not any(count == 5 for count, _ in seen_by_hook) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert any(count == 5 for count, _ in seen_by_hook)
    assert {name for _, name in seen_by_hook} == {"mqtt-handlers-aggregator"}


def test_unreachable_broker_fails_within_the_timeout() -> None:
    session = MqttSession(_settings(f"mqtt://127.0.0.1:{free_port()}", "dev-1"))
    with pytest.raises(FedFMXError, match="no connection"):
        session.connect(timeout_s=1.0)
    session.close()


def test_embedded_broker_round_trip_on_mqtt_311(
    embedded_broker: EmbeddedBroker, open_session: Callable[..., MqttSession]
) -> None:
    received = Inbox()
    receiver = open_session(embedded_broker.url, "aggregator", protocol="3.1.1")
    receiver.subscribe(UPDATE, received)
    sender = open_session(embedded_broker.url, "dev-1", max_payload_bytes=16 * 1024)
    assert (receiver.protocol, sender.protocol) == ("3.1.1", "3.1.1")
    payload = _megabyte(seed=6)
    sender.publish(UPDATE, payload)
    assert received.wait_for(1)
    assert received.messages == [(UPDATE, payload)]


def test_websockets_round_trip_on_embedded_broker(
    embedded_broker: EmbeddedBroker, open_session: Callable[..., MqttSession]
) -> None:
    received = Inbox()
    receiver = open_session(embedded_broker.ws_url, "aggregator", protocol="3.1.1")
    receiver.subscribe(UPDATE, received)
    sender = open_session(embedded_broker.url, "dev-1", max_payload_bytes=16 * 1024)
    payload = random.Random(7).randbytes(200_000)
    sender.publish(UPDATE, payload)
    assert received.wait_for(1)
    assert received.messages == [(UPDATE, payload)]
