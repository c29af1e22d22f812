"""Broker fixtures: a private Mosquitto per test (skipped without the binary), embedded amqtt."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from transport.brokers import EmbeddedBroker, MosquittoBroker, find_mosquitto


@pytest.fixture
def mosquitto_broker() -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto on a free loopback port, with persistence, stopped and removed after."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: run `sudo apt-get install -y mosquitto`")
    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """An in-process amqtt broker (MQTT 3.1.1) with a websockets listener too."""
    broker = EmbeddedBroker(websockets=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
