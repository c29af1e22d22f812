"""`fedfmx-edge serve --district`: a district aggregator between its devices and the root.

It serves its devices exactly as the flat aggregator does (hello, status, updates validated,
stored and acknowledged with receipts, rate limits: the same `Aggregator` handlers), but it
neither makes models nor announces rounds. Both come from the root through the district
broker's Mosquitto bridge: the root's signed announcement for this district (mapped onto the
district's own `round` topic, where devices read it) and the root's signed model versions.

For each round it folds its devices' updates into the associative sums (`MergeSums`) and, at
the round's end (every participant answered, or the deadline), stores one partial in its
SQLite state *before* sending it upstream; it re-sends that partial until the root's
announcement says the round closed. The root keys partials by (round, district), so a re-send
after a crash or a bridge outage counts once. Killed at any instant, it resumes from its state:
an open round re-folds its stored updates, a closed one re-sends its stored partial.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.crash_points import crash_point
from aggregator.districts.config import DistrictConfig
from aggregator.districts.side_tables import SideTable
from aggregator.events import log_event
from aggregator.service import Aggregator, ServiceHooks
from aggregator.state import AggregatorState, StoredModel
from fedfmx.closed_form.head import FeatureStatistics
from fedfmx.closed_form.state import HEAD_WEIGHT, rows_held
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import FedFMXError, ProtocolError
from fedfmx.federation.rounds import GlobalModel, OpenRound
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model
from fedfmx.wire.messages import DistrictReport, RoundAnnouncement
from fedfmx.wire.partials import PartialHeader, encode_partial, encode_statistics_partial
from fedfmx.wire.signing import (
    assemble_verified,
    chunk_payload,
    load_verify_key,
    verify_announcement,
    verify_manifest,
)
from transport import (
    MqttSession,
    TopicKind,
    clients_filter,
    model_filters,
    mqtt_client_id,
    parse_topic,
    round_topic,
    session_settings,
)
from transport.district_topics import DistrictTopic, district_topic

NO_MODEL = GlobalModel(-1, {}, [], [])
"""Before the root's first version arrives (no round can open without it)."""

_PARTIALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS district_partials (
    round INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    stored REAL NOT NULL
);
"""


class PartialStore(SideTable):
    """The district's partials, one per round, in its state file: stored before the round is
    closed there, so a district killed between the two re-sends the stored one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _PARTIALS_SCHEMA)

    def store(self, round_index: int, payload: bytes) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO district_partials VALUES (?, ?, ?)",
                (round_index, payload, time.time()),
            )

    def get(self, round_index: int) -> bytes | None:
        row = self._one("SELECT payload FROM district_partials WHERE round = ?", (round_index,))
        return None if row is None else bytes(row[0])


class DistrictAggregator(Aggregator):
    """One district of a fleet; `run()` returns when the root closed the last round."""

    def __init__(
        self,
        config: DistrictConfig,
        fleet: FleetConfig,
        state: AggregatorState,
        session: MqttSession,
        verify_key: Ed25519PublicKey | None,
    ) -> None:
        self.config = config
        self.district = config.district
        self.verify_key = verify_key
        self.partials = PartialStore(state.path)
        super().__init__(fleet, state, session, None, ServiceHooks())
        self._root_round: RoundAnnouncement | None = None
        self._bodies: dict[int, bytes] = {}
        self._manifests: dict[int, bytes] = {}
        self._reported: tuple[list[str], float] | None = None
        """The devices last reported, and when."""
        self._partial_sent = 0.0

    # -- start and resume -------------------------------------------------------------------

    def _restore_model(self) -> GlobalModel:
        """The newest root version held (the district never makes one itself)."""
        stored = self.state.latest_model()
        if stored is None:
            return NO_MODEL
        return self._decoded(stored.payload, stored.expert_usage)

    @staticmethod
    def _decoded(payload: bytes, usage: list[float]) -> GlobalModel:
        header, weights = decode_model(payload, max_bytes=MAX_MODEL_BYTES)
        return GlobalModel(header.version, weights, header.class_names, usage)

    def start(self) -> None:
        """Resume, subscribe (devices below, the root's round and models via the bridge)."""
        fleet = self.fleet.name
        self.session.subscribe(clients_filter(fleet, TopicKind.HELLO), self._on_hello)
        self.session.subscribe(clients_filter(fleet, TopicKind.STATUS), self._on_status, raw=True)
        self.session.subscribe(clients_filter(fleet, TopicKind.UPDATE), self._on_update)
        self.session.subscribe(clients_filter(fleet, TopicKind.CLOCK), self._on_clock, raw=True)
        self.session.subscribe(round_topic(fleet), self._on_root_round)
        for topic_filter in model_filters(fleet):
            self.session.subscribe(topic_filter, self._on_model_part)
        with self._lock:
            self._resume_open_round()
            self.session.connect()
            self._resend_receipts()
            self._send_stored_partial(force=True)
        log_event(
            "district_started",
            fleet=fleet,
            district=self.district,
            model_version=self.keeper.model.version,
            state=str(self.state.path),
        )

    def _resume_open_round(self) -> None:
        """Re-fold the open round's stored updates against the version it started from (a
        newer one may have arrived since)."""
        last = self.state.last_round()
        if last is not None and last.closed is None:
            stored = self.state.model(last.announcement.model_version)
            if stored is not None:
                self.keeper.model = self._decoded(stored.payload, last.announcement.expert_usage)
        super()._resume_open_round()

    # -- the root's messages ----------------------------------------------------------------

    def _on_root_round(self, topic: str, message: bytes) -> None:
        """The root's signed announcement for this district (refused, logged, if unsigned)."""
        try:
            announcement = verify_announcement(message, self.verify_key, self.fleet.name)
        except ProtocolError as error:
            log_event("round_refused", logging.WARNING, district=self.district, reason=str(error))
            return
        with self._lock:
            held = self._root_round
            if held is None or (announcement.round, announcement.closed) >= (
                held.round,
                held.closed,
            ):
                self._root_round = announcement

    def _on_model_part(self, topic: str, message: bytes) -> None:
        """Collect a version's signed manifest and body; keep the version once both verify."""
        try:
            address = parse_topic(topic)
        except ProtocolError:
            return
        version = address.model_version
        if version is None or not message or address.kind is TopicKind.MODEL_DELTA:
            return  # a district keeps full versions; its devices take the bridged deltas
        with self._lock:
            if address.kind is TopicKind.MODEL_BODY:
                self._bodies[version] = message
            else:
                self._manifests[version] = message
            if version in self._bodies and version in self._manifests:
                self._take_model(version)

    def _take_model(self, version: int) -> None:
        body, text = self._bodies.pop(version), self._manifests.pop(version)
        if self.state.model(version) is not None:
            return
        try:
            manifest = verify_manifest(text, self.verify_key, self.fleet.name, None)
            if manifest.version != version:
                raise ProtocolError(f"manifest of version {manifest.version} on {version}")
            payload = assemble_verified(manifest, chunk_payload(body, manifest.chunk_bytes))
            model = self._decoded(payload, [])
            if model.version != version:
                raise ProtocolError(f"model header says version {model.version}")
        except ProtocolError as error:
            log_event(
                "model_refused", logging.WARNING, district=self.district, version=version,
                reason=str(error),
            )  # fmt: skip
            return
        self.state.save_received_model(StoredModel(version, payload, model.class_names, [], None))
        log_event("model_received", district=self.district, model_version=version)

    # -- rounds -----------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._report(now)
        root = self._root_round
        current = self.keeper.current
        if current is None:
            self._maybe_open(now)
        else:
            announcement = current.announcement
            answered = self.state.answered(announcement.round) & set(announcement.participants)
            over = root is not None and (root.round > announcement.round or root.closed)
            if (
                len(answered) == len(announcement.participants)
                or now >= announcement.deadline_unix
                or over
            ):
                self._close()
        self._send_stored_partial(force=False)
        if (
            root is not None
            and root.closed
            and root.round + 1 >= self.num_rounds
            and self.keeper.current is None
        ):
            self._finished.set()

    def _on_update(self, topic: str, payload: bytes) -> None:
        """As the flat aggregator, once the root's round is taken up (an update may come
        before the district's next tick does)."""
        with self._lock:
            if self.keeper.current is None:
                self._maybe_open(time.time())
        super()._on_update(topic, payload)

    def _maybe_open(self, now: float) -> None:
        """Take up the root's open round once the version it starts from is held."""
        root = self._root_round
        last = self.state.last_round()
        if root is None or root.closed or not root.participants:
            return  # no round, or none with this district's devices
        if last is not None and last.announcement.round >= root.round:
            return
        if root.model_version != self.keeper.model.version:
            stored = self.state.model(root.model_version)
            if stored is None:
                return  # its version is still on its way down the bridge
            self.keeper.model = self._decoded(stored.payload, root.expert_usage)
        self.keeper.resume_round(root)
        self.state.open_round(root)
        log_event(
            "round_opened",
            district=self.district,
            round=root.round,
            model_version=root.model_version,
            participants=len(root.participants),
        )

    def _close(self) -> None:
        """Store this district's partial (before anything is sent), close, send it."""
        current = self.keeper.current
        assert current is not None
        self.keeper.current = None
        announcement = current.announcement
        round_index = announcement.round
        answered = self.state.answered(round_index) & set(announcement.participants)
        totals = self.state.round_totals()[-1]
        header = PartialHeader(
            fleet=self.fleet.name,
            district=self.district,
            round=round_index,
            base_version=announcement.model_version,
            updates=len(current.received) if self.fleet.closed_form else current.sums.updates,
            answered=len(answered),
            head_classes=list(current.sums.head),
            new_classes=current.sums.new_classes,
            update_bytes=totals.uplink_bytes,
            loss_sum=totals.mean_loss * totals.updates,
        )
        if self.fleet.closed_form:
            payload = self._statistics_partial(header, current)
        else:
            payload = encode_partial(header, current.sums)
        self.partials.store(round_index, payload)
        crash_point("district_partial_stored")
        self.state.close_round(round_index, None)
        log_event(
            "partial_closed",
            district=self.district,
            round=round_index,
            updates=header.updates,
            answered=header.answered,
            participants=len(announcement.participants),
        )
        self._send_stored_partial(force=True)

    def _statistics_partial(self, header: PartialHeader, current: OpenRound) -> bytes:
        """A closed-form round's partial: the devices' statistics per fold, each device's
        rows (after the ones the model held: what its update's `rows_before` said)."""
        weights = self.keeper.model.weights
        dim = weights[HEAD_WEIGHT].shape[1]
        folds = current.statistics or [
            FeatureStatistics.empty(dim) for _ in range(self.fleet.analytic.folds)
        ]
        header = header.model_copy(
            update={
                "rows": {d: (rows_held(weights, d), n) for d, n in sorted(current.rows.items())},
                "fold_classes": [sorted(fold.counts) for fold in folds],
                "lambda_hits": [] if current.hits is None else current.hits.tolist(),
            }
        )
        return encode_statistics_partial(header, folds)

    def _send_stored_partial(self, force: bool) -> None:
        """(Re)send the latest closed round's partial while the root has not closed it."""
        last = self.state.last_round()
        if last is None or last.closed is None:
            return
        root = self._root_round
        round_index = last.announcement.round
        if root is not None and (root.round > round_index or root.closed):
            return
        if not force and time.monotonic() - self._partial_sent < self.config.partial_resend_s:
            return
        payload = self.partials.get(round_index)
        if payload is None:
            return
        self._partial_sent = time.monotonic()
        topic = district_topic(self.fleet.name, self.district, DistrictTopic.PARTIAL)
        try:
            self.session.publish(topic, payload, wait=False)
        except FedFMXError as error:
            log_event("partial_not_sent", logging.WARNING, round=round_index, reason=str(error))
            return
        log_event("partial_sent", district=self.district, round=round_index, bytes=len(payload))

    def _report(self, now: float) -> None:
        """Tell the root which devices may take part next (retained), every
        `report_interval_s`: the report is also the district's heartbeat (the root leaves out
        a district neither heard from nor answering, as the flat fleet does a device)."""
        if self._reported is not None and now - self._reported[1] < self.config.report_interval_s:
            return
        last = self.state.last_round()
        index = 0 if last is None else last.announcement.round + 1
        devices = self._participants(index, None if last is None else last.opened)
        report = DistrictReport(
            fleet=self.fleet.name,
            district=self.district,
            devices=devices,
            registered=self.state.device_count(),
            sent_unix=now,
        )
        topic = district_topic(self.fleet.name, self.district, DistrictTopic.STATUS)
        try:
            self.session.publish(topic, report.model_dump_json().encode(), retain=True, wait=False)
        except FedFMXError as error:
            log_event("report_not_sent", logging.WARNING, reason=str(error))
            return
        self._reported = (devices, now)

    def _announce(self) -> None:
        """The root announces; a district never does."""

    def _publish_model(self) -> None:
        """The root publishes; versions reach devices down the bridge."""


def open_district(config: DistrictConfig) -> DistrictAggregator:
    """The district aggregator of `config` on its own broker, with its state file."""
    fleet = load_fleet(config.fleet_file)
    if fleet.districts is None or config.district not in fleet.districts.ids:
        raise FedFMXError(
            f"{config.fleet_file}: districts.ids does not list district {config.district!r}"
        )
    party = f"{config.district}-aggregator"
    session = MqttSession(session_settings(config.broker, mqtt_client_id(fleet.name, party)))
    state = AggregatorState(config.state_path, fleet.name)
    return DistrictAggregator(
        config, fleet, state, session, load_verify_key(config.fleet_public_key)
    )
