"""`fedfmx-edge join` for a device that only serves (`role: serve`): no torch, no training.

It follows the fleet's retained model manifests, fetches the newest version's full body,
verifies both (signature, chunk hashes, codec checks, shapes against the template), and
serves it through `ServingModel` on the frames of its own
sources; predictions go where the device YAML's `predictions` section says. It never sends an
update and is never a round's participant. MQTT handlers only record messages; verifying and
serving run on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_client.config import DeviceConfig, PartitionSource
from edge_client.device_data import device_sources
from edge_client.feed import StreamFeed
from edge_client.health import free_disk_mb, process_rss_mb
from edge_client.predictions import StreamPredictor
from edge_client.sample_store import SampleStore
from edge_client.serving_model import ServingModel
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.data.preprocessing import fleet_image_input
from fedfmx.errors import ConfigError, FedFMXError, ProtocolError
from fedfmx.federation.aggregation import Arrays
from fedfmx.profiles import DeviceProfile, load_profile
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model
from fedfmx.wire.messages import DeviceActivity, DeviceStatus, ModelHeader
from fedfmx.wire.signing import (
    assemble_verified,
    chunk_payload,
    load_verify_key,
    verify_manifest,
)
from fedfmx.wire.verified_delta import full_from_delta
from transport import (
    LastWill,
    MqttSession,
    TopicKind,
    client_topic,
    model_body_filter,
    model_delta_filter,
    model_manifests_filter,
    mqtt_client_id,
    parse_topic,
    session_settings,
)

log = logging.getLogger(__name__)

TURN_S = 1.0
"""Longest the loop waits before looking at the stop event again."""
KEPT_MANIFESTS = 3
MODEL_FETCH_S = 60.0
"""How long a version's retained body may take to arrive before its manifest is dropped."""
DELTA_FETCH_S = 10.0
"""How long a version's delta may take before the full body is fetched instead."""


class ServingDevice:
    """A device that serves the fleet's newest verified model on its own frames."""

    def __init__(
        self,
        config: DeviceConfig,
        fleet: FleetConfig,
        profile: DeviceProfile,
        model: ServingModel,
        feed: StreamFeed,
        session: MqttSession,
        public_key: Ed25519PublicKey | None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.profile = profile
        self.model = model
        self.feed = feed
        self.session = session
        self.public_key = public_key
        self._changed = threading.Condition()
        self._manifests: dict[int, bytes] = {}
        """Retained manifests by model version (the newest few)."""
        self._fetching: int | None = None
        """The version whose body is subscribed to."""
        self._body: bytes | None = None
        self._delta: bytes | None = None
        self._by_delta = False
        """The version is fetched as a delta against the one held (else its full body)."""
        self._held: tuple[ModelHeader, bytes, Arrays] | None = None
        """The served version's header, payload and weights: the base of the next delta."""
        self._fetch_started = 0.0
        self._waiting: int | None = None
        """The version last said to wait for local images (said once)."""
        self.training = False
        """Never inside a local training (what a stop signal would abandon)."""

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """Serve until `stop`; `heartbeat` is called every turn (systemd's watchdog)."""
        self.session.subscribe(model_manifests_filter(self.fleet.name), self._on_manifest)
        self.session.on_reconnect(lambda: self._publish_status("online"))
        predictor = self.feed.predictor
        if predictor is not None and self.config.predictions.mqtt:
            topic = client_topic(self.fleet.name, self.config.device_id, TopicKind.PREDICTIONS)
            predictor.publish = lambda line: self.session.publish_raw(topic, line, timeout_s=2.0)
        self.feed.start()
        self.session.connect()
        self._publish_status("online")
        try:
            while not stop.is_set():
                if heartbeat is not None:
                    heartbeat()
                self._turn()
                with self._changed:
                    self._changed.wait(TURN_S)
        finally:
            self._publish_status("offline")
            self.feed.close()
            self.session.close()

    def _turn(self) -> None:
        """Follow the newest manifest: fetch its delta (against the version served) or its
        full body, and serve the version once manifest and payload verify."""
        current = self.model.current
        served = -1 if current is None else current.version
        with self._changed:
            newer = [v for v in self._manifests if v > served]
            wanted = max(newer, default=None)
            manifest = None if wanted is None else self._manifests[wanted]
            body = self._body if wanted == self._fetching else None
            delta = self._delta if wanted == self._fetching else None
        if wanted is None or manifest is None:
            return
        running = None if served < 0 else served
        if self._fetching != wanted:
            log.info("fetching model version %s", wanted)
            self._follow(wanted, self._delta_base_held(manifest, running))
            return
        payload = None
        if self._by_delta:
            payload = self._from_delta(wanted, manifest, delta, running)
            if payload is None:
                return
        elif body is None:
            if time.monotonic() - self._fetch_started > MODEL_FETCH_S:
                log.warning("no body of model version %s arrived: manifest dropped", wanted)
                with self._changed:  # an unsigned fleet's junk manifest must not pin us
                    self._manifests.pop(wanted, None)
                    self._fetching = None
                self.session.unsubscribe(model_body_filter(self.fleet.name, wanted))
            return
        try:
            verified = verify_manifest(manifest, self.public_key, self.fleet.name, running)
            if verified.version != wanted:
                raise ProtocolError(f"manifest of version {verified.version} on {wanted}")
            if payload is None:
                assert body is not None
                payload = assemble_verified(verified, chunk_payload(body, verified.chunk_bytes))
            header, weights = decode_model(payload, max_bytes=MAX_MODEL_BYTES)
            if header.version != wanted or header.fleet != self.fleet.name:
                raise ProtocolError(f"model header says {header.fleet} v{header.version}")
            images, names = self.feed.recent_images()
            if not len(images):
                if self._waiting != wanted:
                    log.info("model version %s waits for local images to check it on", wanted)
                    self._waiting = wanted
                return
            version = self.model.refresh(header, weights, images, names)
        except FedFMXError as error:  # junk on the wire, or a version this device cannot serve
            log.warning("refused model version %s: %s", wanted, error)
            with self._changed:  # the genuine pair may still come (retained, restored)
                self._manifests.pop(wanted, None)
                self._body = None
            return
        if version is None:  # refused (parity, no classes): wait for the next version
            with self._changed:
                self._manifests.pop(wanted, None)
            return
        self._held = (header, payload, weights)
        if self.feed.predictor is not None:
            self.feed.predictor.serve(self.model.served(), images, names)
        self._publish_status("online")

    def _delta_base_held(self, manifest: bytes, running: int | None) -> bool:
        """Whether the manifest verifies and names a delta against the version served."""
        if self._held is None:
            return False
        try:
            verified = verify_manifest(manifest, self.public_key, self.fleet.name, running)
        except ProtocolError:
            return False  # refused, with its reason, when its body is checked
        return verified.delta is not None and verified.delta.base_version == self._held[0].version

    def _from_delta(
        self, wanted: int, manifest: bytes, delta: bytes | None, running: int | None
    ) -> bytes | None:
        """The full payload from the received delta (`fedfmx.wire.verified_delta`); None while it
        has not arrived, or when it fails or is late: then the full body is fetched instead."""
        if delta is None:
            if time.monotonic() - self._fetch_started > DELTA_FETCH_S:
                log.warning("no delta of model version %s arrived: taking it in full", wanted)
                self._follow(wanted, by_delta=False)
            return None
        assert self._held is not None
        held, held_payload, held_weights = self._held
        try:
            verified = verify_manifest(manifest, self.public_key, self.fleet.name, running)
            full = full_from_delta(verified, delta, held, held_payload, held_weights)
        except FedFMXError as error:
            log.warning(
                "refused the delta of model version %s (%s): taking it in full", wanted, error
            )
            self._follow(wanted, by_delta=False)
            return None
        assert verified.delta is not None
        log.info(
            "model version %s from its delta against %s (%d bytes instead of %d)",
            wanted,
            held.version,
            verified.delta.total_bytes,
            verified.total_bytes,
        )
        return full

    def _follow(self, version: int, by_delta: bool) -> None:
        if self._fetching is not None:
            self.session.unsubscribe(self._payload_filter(self._fetching, self._by_delta))
        with self._changed:
            self._fetching, self._body, self._delta = version, None, None
            self._by_delta = by_delta
        self._fetch_started = time.monotonic()
        handler = self._on_delta if by_delta else self._on_body
        self.session.subscribe(self._payload_filter(version, by_delta), handler)

    def _payload_filter(self, version: int, by_delta: bool) -> str:
        if by_delta:
            return model_delta_filter(self.fleet.name, version)
        return model_body_filter(self.fleet.name, version)

    def _on_manifest(self, topic: str, message: bytes) -> None:
        try:
            version = parse_topic(topic).model_version
        except ProtocolError:
            return
        if version is None or not message:  # a cleared (retired) version
            return
        with self._changed:
            self._manifests[version] = message
            for old in sorted(self._manifests)[:-KEPT_MANIFESTS]:
                del self._manifests[old]
            self._changed.notify_all()

    def _on_body(self, topic: str, message: bytes) -> None:
        with self._changed:
            self._body = message
            self._changed.notify_all()

    def _on_delta(self, topic: str, message: bytes) -> None:
        with self._changed:
            self._delta = message
            self._changed.notify_all()

    def _publish_status(self, state: DeviceActivity) -> None:
        current = self.model.current
        status = DeviceStatus(
            device_id=self.config.device_id,
            state=state,
            model_version=None if current is None else current.version,
            profile=self.profile.name,
            rss_mb=round(process_rss_mb(), 1),
            disk_free_mb=round(free_disk_mb(self.config.state_dir), 1),
        )
        topic = client_topic(self.fleet.name, self.config.device_id, TopicKind.STATUS)
        try:
            self.session.publish_raw(
                topic, status.model_dump_json().encode(), retain=True, timeout_s=3.0
            )
        except (TimeoutError, FedFMXError) as error:
            log.warning("status %s not delivered: %s", state, error)


def open_serving_device(config: DeviceConfig) -> ServingDevice:
    """Build a serving-only device from its YAML (a folder or camera source, no torch)."""
    if isinstance(config.data, PartitionSource):
        raise ConfigError("role: serve needs the device's own source (data.source folder/camera)")
    profile = load_profile(config.profile)
    fleet = load_fleet(config.fleet_file)
    files = config.serving_files or config.state_dir / "serving"
    pretrained = fleet.model.backbone == "efficientnet_lite0"
    model = ServingModel(
        files,
        config.state_dir / "served",
        profile,
        fleet.model.trunk_input_size if pretrained else None,
    )
    spec = fleet_image_input(fleet)
    store = SampleStore(config.state_dir / "store", config.store, spec, fleet.classes, 0, None)
    predictor = StreamPredictor(config.device_id, spec, config.predictions, config.state_dir)
    feed = StreamFeed(device_sources(config.data), store, spec, predictor)
    offline = DeviceStatus(device_id=config.device_id, state="offline", profile=profile.name)
    will = LastWill(
        topic=client_topic(fleet.name, config.device_id, TopicKind.STATUS),
        payload=offline.model_dump_json().encode(),
    )
    session = MqttSession(
        session_settings(config.broker, mqtt_client_id(fleet.name, config.device_id), will)
    )
    return ServingDevice(
        config, fleet, profile, model, feed, session, load_verify_key(config.fleet_public_key)
    )
