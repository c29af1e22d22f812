"""`fedfmx-edge join`: one device's side of the fleet, a `DeviceLearner` driven over MQTT.

The device says hello, follows the retained round announcement, fetches and verifies the model
version a round starts from, trains (FRES/AES on the device), and sends its compressed update
until the aggregator's receipt for exactly that payload arrives. Its state is saved atomically
before anything leaves the device, so a restart re-sends the same update instead of training
twice (DESIGN §7). MQTT handlers only record messages; learning runs on the caller's thread.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_client.config import DeviceConfig, PartitionSource
from edge_client.device_data import open_device_data
from edge_client.health import free_disk_mb, process_rss_mb, source_state
from edge_client.state import Progress, Snapshot, load_snapshot, save_snapshot
from edge_client.statistics_learner import (
    StatisticsLearner,
    open_statistics_learner,
    torch_free_problem,
)
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.device.round import validate_announcement
from fedfmx.errors import ConfigError, FedFMXError, ProtocolError
from fedfmx.federation.aggregation import Arrays
from fedfmx.profiles import DeviceProfile, PeakRss, apply_profile, load_profile, training_device
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model
from fedfmx.wire.messages import (
    DeviceActivity,
    DeviceStatus,
    Hello,
    ModelHeader,
    RoundAnnouncement,
    UpdateReceipt,
)
from fedfmx.wire.signing import (
    Manifest,
    assemble_verified,
    chunk_payload,
    load_verify_key,
    verify_announcement,
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
    model_manifest_topic,
    mqtt_client_id,
    parse_topic,
    round_topic,
    session_settings,
)

if TYPE_CHECKING:
    from edge_client.closed_form_serving import ClosedFormServer
    from edge_client.device_data import DeviceData
    from edge_client.feed import StreamFeed
    from edge_client.inference import DeviceModelServer
    from fedfmx.device.learner import DeviceLearner

log = logging.getLogger(__name__)

Fetched = TypeVar("Fetched")

MODEL_FETCH_S = 60.0
"""How long to wait for a model version's retained chunks before giving the round up."""
DELTA_FETCH_S = 10.0
"""How long to wait for a version's delta (published before its manifest) before taking the
full version instead."""
STOP_POLL_S = 0.25
"""Longest a wait goes without looking at the stop event."""
HELLO_REPEAT_S = 30.0
"""A device with no new round announcement for this long says hello again (retained), so an
aggregator that lost or refused its registration learns of it."""
STATUS_TIMEOUT_S = 3.0
"""A status is informational: the device never waits long for its PUBACK."""


@dataclass(frozen=True)
class GlobalVersion:
    """A verified global model the device can start a round from."""

    header: ModelHeader
    weights: Arrays
    payload: bytes


class EdgeDevice:
    """One device: its learner, its MQTT session and its saved state."""

    def __init__(
        self,
        config: DeviceConfig,
        fleet: FleetConfig,
        profile: DeviceProfile,
        learner: DeviceLearner | StatisticsLearner,
        session: MqttSession,
        public_key: Ed25519PublicKey | None,
        inference: DeviceModelServer | ClosedFormServer | None = None,
        feed: StreamFeed | None = None,
    ) -> None:
        self.config = config
        self.inference = inference
        self.feed = feed
        """The device's own sources (folder, camera) filling its sample store; None for a
        fleet partition."""
        self.fleet = fleet
        self.profile = profile
        self.learner = learner
        self.session = session
        self.public_key = public_key
        self.device_id = config.device_id
        self.last_round_index = fleet.protocol.num_rounds - 1
        self.snapshot = load_snapshot(config.state_dir, learner) or Snapshot(
            Progress(config.device_id, fleet.name)
        )
        if self.snapshot.progress.fleet != fleet.name:
            raise ConfigError(
                f"{config.state_dir} holds state of fleet {self.snapshot.progress.fleet!r}, "
                f"not {fleet.name!r}"
            )
        self.model = self._saved_model()
        self._changed = threading.Condition()
        self._announcement: RoundAnnouncement | None = None
        self._handled_round: int | None = None
        self._receipts: dict[str, UpdateReceipt] = {}
        self._bodies: dict[int, bytes] = {}
        self._manifests: dict[int, bytes] = {}
        self._deltas: dict[int, bytes] = {}
        self._peak_rss_mb: float | None = None
        self._round_time_s: float | None = None
        self._last_round_unix: float | None = None
        self._last_hello: Hello | None = None
        self._activity: DeviceActivity = "online"
        """The last state published: said again after a reconnect, over a Last Will."""
        self.training = False
        """Inside a round's local training, which a stop signal may abandon."""
        self._hello_at = time.monotonic()

    def _saved_model(self) -> GlobalVersion | None:
        payload = self.snapshot.model_payload
        if payload is None:
            return None
        header, weights = decode_model(payload, max_bytes=MAX_MODEL_BYTES)
        return GlobalVersion(header, weights, payload)

    def _topic(self, kind: TopicKind) -> str:
        return client_topic(self.fleet.name, self.device_id, kind)

    # -- the main loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """Take part in rounds until the schedule is done (or `stop`), then go offline;
        `heartbeat` is called every turn of the loop (systemd's watchdog).

        Every wait below is bounded and watches `stop`, so SIGTERM ends the device within a
        second or so whatever it waits for (a round being trained is abandoned: the saved
        state is the one before it, and the device trains that round again after a restart).
        """
        self.session.subscribe(round_topic(self.fleet.name), self._on_round)
        self.session.subscribe(self._topic(TopicKind.INBOX), self._on_inbox)
        self.session.on_reconnect(lambda: self._publish_status(self._activity))
        if self.feed is not None:
            self._start_feed(self.feed)  # before hello: it names the classes already held
        self.session.connect()
        self._publish_status("online")
        self._say_hello()
        try:
            while not stop.is_set() and not self._done():
                if heartbeat is not None:
                    heartbeat()
                announcement = self._next_announcement(stop)
                if announcement is not None:
                    self._take_part(announcement, stop)
                elif time.monotonic() - self._hello_at > HELLO_REPEAT_S:
                    self._say_hello()  # no round for us for a while: are we registered?
        finally:
            self._publish_status("offline")
            if self.feed is not None:
                self.feed.close()
            self.session.close()

    def _done(self) -> bool:
        """The schedule is over for this device: its last round is answered, or closed."""
        if not self.config.exit_after_last_round or self.snapshot.pending_update is not None:
            return False
        last = self._announcement
        closed_last = last is not None and last.closed and last.round >= self.last_round_index
        answered_last = (
            self._handled_round is not None and self._handled_round >= self.last_round_index
        )
        return closed_last or answered_last

    def _wait(self, ready: Callable[[], bool], timeout_s: float, stop: threading.Event) -> bool:
        """Wait (under `_changed`) until `ready()`, `stop` or the timeout; `ready()` at the end.

        In slices, so a stop set by a signal handler is seen promptly without a notify.
        """
        give_up = time.monotonic() + timeout_s
        with self._changed:
            while not ready() and not stop.is_set():
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, STOP_POLL_S))
            return ready()

    def _next_announcement(self, stop: threading.Event) -> RoundAnnouncement | None:
        """The newest announcement not handled yet (bounded wait, so `stop` is noticed)."""

        def fresh() -> bool:
            return self._announcement is not None and (
                self._announcement.round != self._handled_round
            )

        if not self._wait(fresh, 1.0, stop):
            return None
        with self._changed:
            announcement = self._announcement
        assert announcement is not None
        return announcement

    def _take_part(self, announcement: RoundAnnouncement, stop: threading.Event) -> None:
        progress = self.snapshot.progress
        self._handled_round = announcement.round
        buffered = self.fleet.service.mode == "buffered"
        if self.snapshot.pending_update is not None:
            last = progress.last_round
            if buffered and last is not None and not self._round_over(last):
                # No barrier: the update still counts; then train on the newest version.
                self._deliver_pending(last, stop)
            elif last == announcement.round and not announcement.closed:
                self._deliver_pending(announcement.round, stop)
                return
            else:
                log.warning(
                    "round %s is over: dropping the unacknowledged update of round %s",
                    announcement.round,
                    progress.last_round,
                )
                self._drop_pending()
        if announcement.closed or self.snapshot.pending_update is not None:
            return  # nothing to do in a round that is over
        if progress.last_round is not None and announcement.round <= progress.last_round:
            return  # answered before a restart
        if self.device_id not in announcement.participants:
            # Said again: an aggregator that lost its state, or refused us while its registry
            # was full, registers us from it for the next round.
            self._say_hello()
            self._publish_status("waiting")
            return
        model = self._model_for(announcement, stop)
        if model is None:
            return
        self._publish_status("training")
        started = time.perf_counter()
        self.training = True
        try:
            with PeakRss() as rss:
                update = self.learner.handle_round(announcement, model.header, model.weights)
        finally:
            self.training = False
        self._round_time_s = time.perf_counter() - started
        self._simulate_slowdown(self._round_time_s, stop)
        self._last_round_unix = time.time()
        self._peak_rss_mb = rss.peak_mb
        if rss.peak_mb > self.profile.train_memory_mb:
            log.warning(
                "round %s peaked at %.0f MB, over the %s profile's %s MB",
                announcement.round,
                rss.peak_mb,
                self.profile.name,
                self.profile.train_memory_mb,
            )
        if self._hello() != self._last_hello:
            self._say_hello()  # the aggregator's registry learns the classes met
        progress.last_round = announcement.round
        progress.model_version = model.header.version
        self.snapshot.model_payload = model.payload
        self.snapshot.pending_update = update
        save_snapshot(self.config.state_dir, self.learner, self.snapshot)
        if update is None:
            self._publish_status("skipped")
        else:
            self._deliver_pending(announcement.round, stop)
        self._serve(model)

    def _serve(self, model: GlobalVersion) -> None:
        """Export and swap in the version this round started from (after the upload: serving
        never delays the fleet)."""
        if self.inference is None:
            return
        rows = self.learner.local_rows()
        images, names = rows.x, rows.names.astype(np.str_)
        if self.feed is not None and (images.ndim != 4 or not len(images)):
            images, names = self.feed.recent_images()  # features only, or no labels yet
        served = self.inference.refresh(model.header, model.weights, images, names)
        if served is not None and self.feed is not None and self.feed.predictor is not None:
            self.feed.predictor.serve(self.inference.served(), images, names)

    def _start_feed(self, feed: StreamFeed) -> None:
        """Start the sources; predictions also go out on the device's own topic when asked."""
        if feed.predictor is not None:
            topic = self._topic(TopicKind.PREDICTIONS)
            feed.predictor.publish = lambda line: self.session.publish_raw(
                topic, line, timeout_s=2.0
            )
        feed.start()

    def _deliver_pending(self, round_index: int, stop: threading.Event) -> None:
        """Send the pending update until its receipt comes back or the round is over (closed,
        or a newer one announced); a stop leaves it pending in the saved state."""
        payload = self.snapshot.pending_update
        assert payload is not None
        digest = hashlib.sha256(payload).hexdigest()
        message_id = bytes.fromhex(digest)[:16]  # a re-send is the same message to the receiver
        patience = self.fleet.service.receipt_timeout_s

        def answered() -> bool:
            return digest in self._receipts or self._round_over(round_index)

        while not stop.is_set():
            # Not waiting for PUBACKs here: paho re-sends unacknowledged chunks itself, and
            # the receipt is the answer that counts.
            self.session.publish(
                self._topic(TopicKind.UPDATE), payload, message_id=message_id, wait=False
            )
            self._wait(answered, patience, stop)
            with self._changed:
                receipt = self._receipts.pop(digest, None)
            if receipt is not None:
                self._settle(round_index, receipt)
                return
            if self._round_over(round_index):
                log.warning("round %s closed before its receipt came: update dropped", round_index)
                self._drop_pending()
                return
            if not stop.is_set():
                log.info("no receipt for the update of round %s: sending it again", round_index)

    def _simulate_slowdown(self, train_s: float, stop: threading.Event) -> None:
        """A simulated straggler (`data.slowdown` > 1) takes that many times as long."""
        source = self.config.data
        if isinstance(source, PartitionSource) and source.slowdown > 1.0:
            stop.wait((source.slowdown - 1.0) * train_s)

    def _round_over(self, round_index: int) -> bool:
        """A newer round is announced, or this one is announced closed. In buffered mode a
        newer version does not end an update's life (the aggregator folds it with a staleness
        weight, or refuses it with its reason): only the schedule's last round closing does."""
        current = self._announcement
        if current is not None and self.fleet.service.mode == "buffered":
            return current.closed and current.round >= self.last_round_index
        return current is not None and (
            current.round > round_index or (current.round == round_index and current.closed)
        )

    def _drop_pending(self) -> None:
        self.snapshot.pending_update = None
        save_snapshot(self.config.state_dir, self.learner, self.snapshot)

    def _settle(self, round_index: int, receipt: UpdateReceipt) -> None:
        if receipt.accepted:
            self.snapshot.progress.updates_sent += 1
        else:
            log.warning(
                "aggregator refused the update of round %s: %s", round_index, receipt.reason
            )
        self.snapshot.pending_update = None
        save_snapshot(self.config.state_dir, self.learner, self.snapshot)
        self._publish_status("sent")

    # -- models ------------------------------------------------------------------------------

    def _model_for(
        self, announcement: RoundAnnouncement, stop: threading.Event
    ) -> GlobalVersion | None:
        """The round's starting version: the one held, or fetched and verified (None: none
        verified in time). The signed manifest comes first; when it names a delta against
        the version held, the delta is fetched and its result checked against the manifest's
        full version; else, or when the delta fails, the full version. A manifest or full
        body that fails verification is dropped and the device keeps waiting: the aggregator
        restores its retained messages when junk replaces them, and the genuine pair may
        still come."""
        version = announcement.model_version
        if self.model is not None and self.model.header.version == version:
            return self.model
        give_up = time.monotonic() + MODEL_FETCH_S
        manifest = self._fetch(
            model_manifest_topic(self.fleet.name, version),
            self._manifests,
            lambda: self._verified_manifest(version),
            announcement,
            give_up,
            stop,
        )
        verified = None
        if manifest is not None and self._holds_delta_base(manifest):
            verified = self._fetch(
                model_delta_filter(self.fleet.name, version),
                self._deltas,
                lambda: self._verified_delta(manifest),
                announcement,
                min(give_up, time.monotonic() + DELTA_FETCH_S),
                stop,
                retry=False,
            )
            if verified is None and not stop.is_set():
                log.warning("taking the full model version %s instead of its delta", version)
        if manifest is not None and verified is None:
            verified = self._fetch(
                model_body_filter(self.fleet.name, version),
                self._bodies,
                lambda: self._verified_body(manifest),
                announcement,
                give_up,
                stop,
            )
        if verified is None:
            log.warning(
                "no verified model version %s arrived; skipping round %s",
                version,
                announcement.round,
            )
            return None
        self.model = verified
        return verified

    def _fetch(
        self,
        topic_filter: str,
        inbox: dict[int, bytes],
        verify: Callable[[], Fetched | None],
        announcement: RoundAnnouncement,
        give_up: float,
        stop: threading.Event,
        *,
        retry: bool = True,
    ) -> Fetched | None:
        """Subscribe `topic_filter` until what arrives in `inbox` verifies (None: the round
        ended, the time ran out, or, without `retry`, the first arrival failed)."""
        version = announcement.model_version

        def arrived() -> bool:
            return version in inbox or self._round_over(announcement.round)

        self.session.subscribe(topic_filter, self._on_model_part)
        try:
            while not stop.is_set():
                left = give_up - time.monotonic()
                if left <= 0 or not self._wait(arrived, left, stop):
                    return None
                if self._round_over(announcement.round):
                    return None
                result = verify()
                if result is not None or not retry:
                    return result
        finally:
            self.session.unsubscribe(topic_filter)
            with self._changed:
                inbox.pop(version, None)
        return None

    def _holds_delta_base(self, manifest: Manifest) -> bool:
        return (
            manifest.delta is not None
            and self.model is not None
            and self.model.header.version == manifest.delta.base_version
        )

    def _verified_manifest(self, version: int) -> Manifest | None:
        """The received manifest of `version` if it verifies (signature, fleet, newer than the
        running version); else it is dropped (logged) and None."""
        running = None if self.model is None else self.model.header.version
        with self._changed:
            text = self._manifests.pop(version)
        try:
            manifest = verify_manifest(text, self.public_key, self.fleet.name, running)
            if manifest.version != version:
                raise ProtocolError(f"manifest of version {manifest.version} on {version}")
        except ProtocolError as error:
            log.warning("refused a manifest of model version %s: %s", version, error)
            return None
        return manifest

    def _verified_body(self, manifest: Manifest) -> GlobalVersion | None:
        """The received full body if it is the one `manifest` names and fits the learner's
        model; else it is dropped (logged) and None."""
        with self._changed:
            body = self._bodies.pop(manifest.version)
        try:
            payload = assemble_verified(manifest, chunk_payload(body, manifest.chunk_bytes))
            model = self._checked_model(manifest.version, payload)
        except ProtocolError as error:
            log.warning("refused a body of model version %s: %s", manifest.version, error)
            return None
        log.info("model version %s in full (%d bytes)", manifest.version, len(payload))
        return model

    def _verified_delta(self, manifest: Manifest) -> GlobalVersion | None:
        """The version the received delta gives when applied to the held one, if the delta is
        the one `manifest` names and its result is, bit for bit, the full version the
        manifest names; else None (logged: the caller takes the full version)."""
        delta, held = manifest.delta, self.model
        assert delta is not None and held is not None
        with self._changed:
            body = self._deltas.pop(manifest.version)
        try:
            full = full_from_delta(manifest, body, held.header, held.payload, held.weights)
            model = self._checked_model(manifest.version, full)
        except ProtocolError as error:
            log.warning("refused the delta of model version %s: %s", manifest.version, error)
            return None
        log.info(
            "model version %s from its delta against %s (%d bytes instead of %d)",
            manifest.version,
            held.header.version,
            delta.total_bytes,
            manifest.total_bytes,
        )
        return model

    def _checked_model(self, version: int, payload: bytes) -> GlobalVersion:
        """Decode a verified full payload and check it fits the fleet and the learner."""
        header, weights = decode_model(payload, max_bytes=MAX_MODEL_BYTES)
        if header.version != version or header.fleet != self.fleet.name:
            raise ProtocolError(f"model header says {header.fleet} v{header.version}")
        self.learner.check_model(header, weights)
        return GlobalVersion(header, weights, payload)

    # -- messages ----------------------------------------------------------------------------

    def _on_round(self, topic: str, message: bytes) -> None:
        """Take a round announcement only if it is signed by the fleet (when a key is set), fits
        the plan and the model, and is not older than the one held."""
        try:
            announcement = verify_announcement(message, self.public_key, self.fleet.name)
            validate_announcement(announcement, self.fleet)
        except ProtocolError as error:
            log.warning("ignored a round announcement: %s", error)
            return
        with self._changed:
            current = self._announcement
            if current is None or (announcement.round, announcement.closed) >= (
                current.round,
                current.closed,
            ):
                self._announcement = announcement
            self._changed.notify_all()

    def _on_inbox(self, topic: str, message: bytes) -> None:
        try:
            receipt = UpdateReceipt.model_validate_json(message)
        except ValidationError:
            log.warning("ignored a malformed message in the inbox")
            return
        with self._changed:
            self._receipts[receipt.update_sha256] = receipt
            self._changed.notify_all()

    def _on_model_part(self, topic: str, message: bytes) -> None:
        address = parse_topic(topic)
        version = address.model_version
        assert version is not None  # only model topics are subscribed to this handler
        with self._changed:
            inbox = {
                TopicKind.MODEL_BODY: self._bodies,
                TopicKind.MODEL_DELTA: self._deltas,
            }.get(address.kind, self._manifests)
            inbox[version] = message
            self._changed.notify_all()

    def _say_hello(self) -> None:
        """Retained, so an aggregator that starts (or restarts afresh) later still hears it."""
        hello = self._hello()
        try:
            self.session.publish(
                self._topic(TopicKind.HELLO),
                hello.model_dump_json().encode(),
                retain=True,
                timeout_s=STATUS_TIMEOUT_S,
            )
        except (TimeoutError, FedFMXError) as error:
            log.warning("hello not acknowledged yet (paho re-sends it): %s", error)
        self._last_hello = hello
        self._hello_at = time.monotonic()

    def _hello(self) -> Hello:
        counts = Counter(str(name) for name in self.learner.local_rows().names)
        return Hello(
            fleet=self.fleet.name,
            device_id=self.device_id,
            profile=self.profile.name,
            classes_met=sorted(counts),
            sample_counts=dict(counts),
        )

    def _publish_status(self, state: DeviceActivity) -> None:
        self._activity = state
        progress = self.snapshot.progress
        status = DeviceStatus(
            device_id=self.device_id,
            state=state,
            round=progress.last_round,
            model_version=progress.model_version,
            updates_sent=progress.updates_sent,
            peak_rss_mb=self._peak_rss_mb,
            round_time_s=self._round_time_s,
            profile=self.profile.name,
            rss_mb=round(process_rss_mb(), 1),
            disk_free_mb=round(free_disk_mb(self.config.state_dir), 1),
            last_round_unix=self._last_round_unix,
            source_state=source_state(len(self.learner.state.held)),
        )
        if self.feed is not None:
            status = status.model_copy(update=self._feed_status(self.feed))
        try:
            self.session.publish_raw(
                self._topic(TopicKind.STATUS),
                status.model_dump_json().encode(),
                retain=True,
                timeout_s=STATUS_TIMEOUT_S,
            )
        except (TimeoutError, FedFMXError) as error:
            log.warning("status %s not delivered: %s", state, error)

    @staticmethod
    def _feed_status(feed: StreamFeed) -> dict[str, object]:
        status = feed.status()
        return {
            "store_samples": status.store.samples,
            "store_bytes": status.store.bytes + status.store.ledger_bytes,
            "sources": [f"{h.kind}: {h.state} ({h.detail})" for h in status.sources],
            "predictions": status.predicted,
            "to_label": status.queued_to_label,
        }


def device_number(config: DeviceConfig) -> int:
    """What tells this device's random draws from its peers': its partition index, or (own
    sources) a number read from its id, stable across restarts."""
    source = config.data
    if isinstance(source, PartitionSource):
        return source.client_index
    return zlib.crc32(config.device_id.encode()) % 1000


def open_device(config: DeviceConfig) -> EdgeDevice:
    """Build a device from its YAML: fleet, profile limits, its data partition, saved state."""
    profile = load_profile(config.profile)
    fleet = apply_profile(load_fleet(config.fleet_file), profile)
    seed = fleet.seed * 1000 + device_number(config)
    problem = torch_free_problem(config, fleet)
    data = open_device_data(config, fleet, seed)
    learner: DeviceLearner | StatisticsLearner
    if problem is None:  # a closed-form fleet: ONNX Runtime and numpy, no torch
        learner = open_statistics_learner(config, fleet, data)
    else:
        log.info("training with torch: %s", problem)
        training_device(profile)  # says clearly (or refuses) when the profile's GPU is missing
        learner = _torch_learner(config, fleet, data, seed)
    inference: DeviceModelServer | ClosedFormServer | None = None
    if config.serves and isinstance(learner, StatisticsLearner):
        from edge_client.closed_form_serving import ClosedFormServer  # the learner's own φ

        inference = ClosedFormServer(learner)
    elif config.serves:
        # The export stack (onnx, onnxruntime: ~50 MB resident) loads only on serving devices.
        from edge_client.inference import DeviceModelServer
        from export.checkpoint import InputSpec

        spec = InputSpec.of_fleet(fleet)
        inference = DeviceModelServer(config.state_dir / "serving", fleet, profile, spec)
    offline = DeviceStatus(device_id=config.device_id, state="offline", profile=profile.name)
    will = LastWill(
        topic=client_topic(fleet.name, config.device_id, TopicKind.STATUS),
        payload=offline.model_dump_json().encode(),
    )
    session = MqttSession(
        session_settings(config.broker, mqtt_client_id(fleet.name, config.device_id), will)
    )
    public_key = load_verify_key(config.fleet_public_key)
    return EdgeDevice(config, fleet, profile, learner, session, public_key, inference, data.feed)


def _torch_learner(
    config: DeviceConfig, fleet: FleetConfig, data: DeviceData, seed: int
) -> DeviceLearner:
    """The torch learner (every method), its frozen trunk int8 in ONNX Runtime if asked."""
    import torch

    from fedfmx.device.learner import DeviceLearner

    torch.set_num_threads(fleet.training.threads)
    trunk = None
    if config.int8_trunk and config.serves:
        raise ConfigError(
            "int8_trunk with serve_predictions is not supported yet with torch (the exported "
            "model would carry the fp32 trunk): serve from a `role: serve` device, or set "
            "serve_predictions: false"
        )
    if config.int8_trunk:
        from edge_client.device_trunk import open_device_trunk  # ONNX Runtime

        trunk = open_device_trunk(config, fleet, data)
    return DeviceLearner(
        config.device_id,
        fleet,
        data.samples,
        data.stream,
        seed=seed,
        cache_dir=config.state_dir / "features",  # pretrained trunk features survive restarts
        trunk=trunk,
    )
