"""The downlink over a real Mosquitto: devices take each version as a signed delta against the
one they hold, fall back to the full version when they lack the base or the delta fails, and
always end on the aggregator's exact bits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_mqtt_federation import (
    AGGREGATOR,
    WAIT_S,
    Fleet,
    _join,
    _kill,
    make_fleet,
    tiny_fleet,
    wait_for,
)

from aggregator.state import AggregatorState
from edge_client.agent import EdgeDevice
from fedfmx.config import FleetConfig
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.codec import encode_model
from fedfmx.wire.messages import DeltaHeader, ModelHeader, RoundAnnouncement
from fedfmx.wire.model_delta import EncodedDelta, encode_delta, payload_digest, publishable
from fedfmx.wire.signing import (
    DeltaPayload,
    chunk_payload,
    load_signing_key,
    sign_announcement,
    sign_manifest,
)
from transport import (
    MosquittoBroker,
    TopicKind,
    client_topic,
    model_body_topic,
    model_delta_topic,
    model_manifest_topic,
    round_topic,
)

__all__ = ["make_fleet"]  # the fixture, used by name

RNG = np.random.default_rng(0)


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_devices_take_deltas_and_end_on_the_aggregators_bits(
    mosquitto_broker: MosquittoBroker,
    make_fleet: Callable[..., Fleet],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_client.agent")
    fleet = make_fleet(tiny_fleet(mosquitto_broker.url))
    aggregator = fleet.start_aggregator()
    devices = [fleet.start_device(i) for i in range(3)]
    fleet.join(devices)
    fleet.join()
    assert aggregator.finished
    state = AggregatorState(fleet.state_path, fleet.fleet.name)
    taken = _messages(caplog, "from its delta against")
    # Rounds 1-3 start from versions 1-3: every device held the version before and took the
    # delta; version 0 (no base) went out in full.
    assert len(taken) == 3 * 3, taken
    assert not _messages(caplog, "refused")
    for device in fleet.devices.values():
        assert device.model is not None and device.model.header.version == 3
        stored = state.model(3)
        assert stored is not None and device.model.payload == stored.payload  # the same bits
    totals = state.round_totals()
    full, delta = state.model(3), state.published_delta_chunks(3)
    assert full is not None and delta > 0
    # The downlink counts the delta for the devices that hold its base.
    assert totals[3].downlink_bytes < totals[0].downlink_bytes / 2


class Rogue:
    """Plays the aggregator by hand: publishes versions, deltas and rounds for one device."""

    def __init__(self, fleet: Fleet, config: FleetConfig) -> None:
        self.config = config
        self.key = load_signing_key(fleet.fleet.service.signing_key)
        self.session = fleet.session(AGGREGATOR, client_id="rogue")
        self.updates: list[bytes] = []
        self.session.subscribe(
            client_topic(config.name, "device-000", TopicKind.UPDATE),
            lambda _, m: self.updates.append(m),
        )
        self.session.connect()
        self.chunk_bytes = config.service.broker.max_payload_bytes

    def version(
        self, version: int, weights: dict[str, np.ndarray], delta: bytes | None = None,
        decoded_bytes: int = 0, key: Ed25519PrivateKey | None = None,
    ) -> tuple[bytes, bytes]:  # fmt: skip
        """Publish the full version (and the delta) and its signed manifest; (payload, manifest)."""
        name = self.config.name
        full = encode_model(ModelHeader(fleet=name, version=version, class_names=[]), weights)
        named = None
        if delta is not None:
            self.session.publish_retained_chunks(model_delta_topic(name, version), delta)
            named = DeltaPayload(chunk_payload(delta, self.chunk_bytes), version - 1, decoded_bytes)
        self.session.publish_retained_chunks(model_body_topic(name, version), full)
        manifest = sign_manifest(
            key or self.key, name, version, chunk_payload(full, self.chunk_bytes), named
        )
        self.manifest(version, manifest.model_dump_json().encode())
        return full, manifest.model_dump_json().encode()

    def manifest(self, version: int, text: bytes) -> None:
        self.session.publish(model_manifest_topic(self.config.name, version), text, retain=True)

    def announce(self, round_index: int) -> None:
        announcement = RoundAnnouncement(
            fleet=self.config.name, round=round_index,
            task=round_index // self.config.protocol.rounds_per_task, model_version=round_index,
            participants=["device-000"], deadline_unix=time.time() + 60,
            expert_usage=[0.25] * 4, train_backbone=True,
        )  # fmt: skip
        signed = sign_announcement(self.key, announcement).model_dump_json().encode()
        self.session.publish(round_topic(self.config.name), signed, retain=True)


def _next(
    config: FleetConfig, previous: dict[str, np.ndarray], version: int, base_payload: bytes,
    noise: float = 0.01,
) -> tuple[dict[str, np.ndarray], EncodedDelta]:  # fmt: skip
    """The version after `previous` (every tensor moved a little) and its int8 delta."""
    merged = {
        n: (v + noise * RNG.standard_normal(v.shape)).astype(np.float32)
        for n, v in previous.items()
    }
    published = publishable(previous, merged, lossless=False)
    header = DeltaHeader(
        fleet=config.name, version=version, base_version=version - 1,
        base_sha256=payload_digest(base_payload), class_names=[], tensors=published.tensors,
    )  # fmt: skip
    return published.weights, encode_delta(header, published.parts, 3)


def _held(device: EdgeDevice, version: int) -> bytes:
    wait_for(lambda: device.model is not None and device.model.header.version == version)
    assert device.model is not None
    return device.model.payload


def test_a_failed_delta_is_refused_with_its_reason_and_the_full_version_taken(
    mosquitto_broker: MosquittoBroker,
    make_fleet: Callable[..., Fleet],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Version by version: a manifest (naming a delta) signed by a foreign key, then the
    genuine one with a tampered delta chunk; a signed delta whose result is not the full
    version; a delta that decompresses past the size its manifest states (a zstd bomb); and
    finally a good delta, which the device takes. After each, the device holds exactly the
    full version the manifest names."""
    caplog.set_level(logging.INFO, logger="edge_client.agent")
    config = tiny_fleet(mosquitto_broker.url, clients=1, max_lag=0)
    config = config.model_copy(  # versions 0-4 all in task 0 (the hand-made heads stay empty)
        update={"protocol": config.protocol.model_copy(update={"rounds_per_task": 5})}
    )
    fleet = make_fleet(config)
    rogue = Rogue(fleet, config)
    thread = fleet.start_device(0)
    device = fleet.devices["device-000"]
    try:
        weights = initial_model(config).weights
        payload, _ = rogue.version(0, weights)
        rogue.announce(0)
        assert _held(device, 0) == payload

        # 1: foreign-signed manifest, refused; then the genuine one, whose delta is tampered.
        weights, delta = _next(config, weights, 1, payload)
        tampered = delta.payload[:-1] + bytes([delta.payload[-1] ^ 1])
        foreign = Ed25519PrivateKey.generate()
        rogue.version(1, weights, tampered, delta.decoded_bytes, key=foreign)
        rogue.announce(1)
        wait_for(lambda: _messages(caplog, "refused a manifest of model version 1"))
        assert device.model is not None and device.model.header.version == 0
        full = encode_model(ModelHeader(fleet=config.name, version=1, class_names=[]), weights)
        genuine = sign_manifest(
            rogue.key, config.name, 1, chunk_payload(full, rogue.chunk_bytes),
            DeltaPayload(chunk_payload(delta.payload, rogue.chunk_bytes), 0, delta.decoded_bytes),
        )  # fmt: skip
        rogue.manifest(1, genuine.model_dump_json().encode())
        payload = _held(device, 1)
        assert payload == full
        assert _messages(caplog, "refused the delta of model version 1: chunk 0 does not match")

        # 2: a delta, signed, whose result is not the full version.
        weights, delta = _next(config, weights, 2, payload)
        _, wrong = _next(config, weights, 2, payload, noise=0.1)
        full, _ = rogue.version(2, weights, wrong.payload, wrong.decoded_bytes)
        rogue.announce(2)
        payload = _held(device, 2)
        assert payload == full
        assert _messages(caplog, "version 2: the decoded delta is not the signed full version")

        # 3: a delta that decompresses beyond what the signed manifest states.
        weights, delta = _next(config, weights, 3, payload)
        full, _ = rogue.version(3, weights, delta.payload, decoded_bytes=1000)
        rogue.announce(3)
        payload = _held(device, 3)
        assert payload == full
        assert _messages(caplog, "version 3: body decompresses beyond 1000 bytes")
        assert len(_messages(caplog, "taking the full model version")) == 3

        # 4: a good delta is taken (and gives the full version's exact bytes).
        weights, delta = _next(config, weights, 4, payload)
        full, _ = rogue.version(4, weights, delta.payload, delta.decoded_bytes)
        rogue.announce(4)
        assert _held(device, 4) == full
        assert _messages(caplog, "model version 4 from its delta against 3")
        wait_for(lambda: device.snapshot.model_payload == full)  # saved once trained on
    finally:
        fleet.stop.set()
        thread.join(30)
        rogue.session.close()


def test_a_device_restarted_on_a_stale_version_takes_the_full_one_and_catches_up(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """`join` killed once it answered a round; the fleet moves two versions on without it
    (quorum at the deadline); restarted on its saved, stale version it lacks the delta's
    base, takes the full version, then deltas again, and its updates count."""
    config = tiny_fleet(
        mosquitto_broker.url, clients=2, max_lag=0, round_deadline_s=20.0, quorum_fraction=0.5
    )
    # Rounds both devices answer close at once, so the device may answer several before it is
    # killed: a long schedule leaves versions to take as deltas after the restart.
    config = config.model_copy(
        update={"protocol": config.protocol.model_copy(update={"rounds_per_task": 8})}
    )
    fleet = make_fleet(config)
    aggregator = fleet.start_aggregator()
    other = fleet.start_device(1)
    device = _join(fleet, 0)
    log_file = fleet.tmp / "device-0.log"

    def answered() -> list[int]:
        rounds = range(config.protocol.num_rounds)
        return [r for r in rounds if "device-000" in aggregator.state.answered(r)]

    try:
        wait_for(lambda: answered() or None)
        held_at_most = aggregator.keeper.model.version
        device.kill()
        device.wait(10)
        wait_for(lambda: aggregator.keeper.model.version >= held_at_most + 2)
        before_restart = answered()
        restart_round = len(aggregator.state.round_totals())
        first_life = len(log_file.read_text())
        device = _join(fleet, 0)
        fleet.join([other])
        assert device.wait(WAIT_S) == 0, log_file.read_text()[-2000:]
        fleet.join()
    finally:
        _kill(device)
    second_life = log_file.read_text()[first_life:]
    fetched = [line for line in second_life.splitlines() if "model version" in line]
    assert fetched and " in full " in fetched[0], fetched  # no base for the delta
    assert any("from its delta" in line for line in fetched[1:]), fetched
    assert "refused" not in second_life
    after = [r for r in answered() if r not in before_restart]
    assert after and min(after) >= restart_round - 1, (before_restart, after)
    accepted = {row.device_id: row.updates_accepted for row in aggregator.state.devices()}
    assert accepted["device-000"] == len(answered())
