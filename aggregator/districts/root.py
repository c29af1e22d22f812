"""The root of a tree of district aggregators (`fedfmx-edge serve` on a fleet with `districts`).

It runs the flat aggregator's rounds (`Aggregator`: model versions, signing, durable state,
evaluation) with districts in the devices' place. Each district tells it which devices may take
part (`DistrictReport`, retained); a round names them all, and the root signs one announcement
per district naming that district's devices, on `districts/<id>/round`, which the district's
bridge maps onto the district broker's own `round` topic. Each district answers with one
partial (`fedfmx.wire.partials`), which the root validates and adds to the round's sums exactly as
it adds a device's update: the merge is the flat merge (DESIGN §8).

Partials are keyed by (round, district): the first valid one is stored and counts, a re-send
is a logged duplicate. Quorum across tiers is counted in devices (`DistrictsConfig`). A
district's reports and partials take tokens from its own bucket of `service.rate_limit`, as a
device's messages do, so a flooding district is dropped before anything is decoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from aggregator.crash_points import crash_point
from aggregator.districts.side_tables import SideTable
from aggregator.events import log_event
from aggregator.service import Aggregator, ServiceHooks
from aggregator.state import AggregatorState, StoredRound
from fedfmx.config import FleetConfig
from fedfmx.errors import ProtocolError
from fedfmx.wire.messages import DistrictReport
from fedfmx.wire.partials import PartialHeader
from fedfmx.wire.signing import load_signing_key, sign_announcement
from transport import MqttSession, model_filters, mqtt_client_id, session_settings
from transport.district_topics import (
    DistrictTopic,
    district_topic,
    districts_filter,
    parse_district_topic,
)

_ASSIGNMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS district_rounds (
    round INTEGER PRIMARY KEY,
    assignment TEXT NOT NULL
);
"""

Assignment = dict[str, list[str]]
"""District id -> its devices taking part in a round."""


class DistrictRounds(SideTable):
    """Which devices each district brought to each round (root's state file, own table):
    stored before the round opens, so a restarted root re-announces the same split."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _ASSIGNMENTS_SCHEMA)

    def store(self, round_index: int, assignment: Assignment) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO district_rounds VALUES (?, ?)",
                (round_index, json.dumps(assignment)),
            )

    def get(self, round_index: int) -> Assignment:
        row = self._one("SELECT assignment FROM district_rounds WHERE round = ?", (round_index,))
        return {} if row is None else dict(json.loads(str(row[0])))


class RootAggregator(Aggregator):
    """A fleet's root aggregator over districts; `run()` returns after the last round."""

    def __init__(
        self,
        fleet: FleetConfig,
        state: AggregatorState,
        session: MqttSession,
        signing_key: Ed25519PrivateKey | None,
        hooks: ServiceHooks,
    ) -> None:
        if fleet.districts is None:
            raise ValueError("a root aggregator needs the fleet's districts section")
        self.districts = fleet.districts
        self.assignments = DistrictRounds(state.path)
        super().__init__(fleet, state, session, signing_key, hooks)
        self._reports: dict[str, DistrictReport] = {}
        self._heard: dict[str, float] = {}
        """When each district's report last arrived (the root's clock)."""
        self._round_districts: Assignment = {}
        self._answered: dict[str, int] = {}
        """Devices each district's accepted partial says answered (the quorum's count)."""

    def start(self) -> None:
        fleet = self.fleet.name
        self.session.subscribe(districts_filter(fleet, DistrictTopic.STATUS), self._on_report)
        self.session.subscribe(districts_filter(fleet, DistrictTopic.PARTIAL), self._on_partial)
        for topic_filter in (districts_filter(fleet, DistrictTopic.ROUND), *model_filters(fleet)):
            self.session.guard_retained(topic_filter)
        with self._lock:
            self._resume_open_round()
            self._evaluate_missed_task()
            self.session.connect()
            self._publish_model()
            self._announce()
        log_event(
            "root_started",
            fleet=fleet,
            districts=len(self.districts.ids),
            model_version=self.keeper.model.version,
            state=str(self.state.path),
        )

    def _resume_open_round(self) -> None:
        """Re-fold the stored partials of the round open when the process stopped."""
        last = self.state.last_round()
        if last is None:
            return
        self._round_districts = self.assignments.get(last.announcement.round)
        if last.closed is not None:
            return
        self.keeper.resume_round(last.announcement)
        stored = self.state.round_updates(last.announcement.round)
        for partial in stored:
            self._accept_partial(partial.payload, partial.device_id)
        log_event("round_resumed", round=last.announcement.round, partials=len(stored))

    # -- rounds -----------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        current = self.keeper.current
        if current is None:
            self._maybe_open(now)
            return
        announcement = current.announcement
        taking_part = {d for d, devices in self._round_districts.items() if devices}
        if taking_part <= current.received:
            self._close()
            return
        if now < announcement.deadline_unix + self.districts.partial_grace_s:
            return
        last = self.state.last_round()
        extensions = 0 if last is None else last.extensions
        quorum = math.ceil(self.fleet.service.quorum_fraction * len(announcement.participants))
        answered = sum(self._answered.values())
        if answered >= quorum or extensions >= self.fleet.service.max_extensions:
            missing = sorted(taking_part - current.received)
            log_event(
                "round_closing_without", logging.WARNING, round=announcement.round,
                districts=missing, answered=answered, quorum=quorum,
            )  # fmt: skip
            self._close()
            return
        extended = self.keeper.extend_deadline(now + self.fleet.service.round_deadline_s)
        self.state.extend_round(extended)
        self._announce()
        log_event(
            "round_extended", logging.WARNING, round=announcement.round, answered=answered,
            quorum=quorum,
        )  # fmt: skip

    def _maybe_open(self, now: float) -> None:
        last = self.state.last_round()
        index = 0 if last is None else last.announcement.round + 1
        if index >= self.num_rounds:
            self._finished.set()
            return
        assignment: Assignment = {}
        seen: set[str] = set()
        for district in self.districts.ids:
            report = self._reports.get(district)
            alive = report is not None and self._alive(report, index, last)
            devices = [d for d in report.devices if d not in seen] if report and alive else []
            seen |= set(devices)
            assignment[district] = devices
        participants = sorted(seen)
        needed = self.fleet.service.min_devices or self.fleet.protocol.num_clients
        if not participants or (index == 0 and len(participants) < needed):
            return
        deadline = now + self.fleet.service.round_deadline_s
        announcement = self.keeper.open_round(index, participants, deadline)
        self.assignments.store(index, assignment)  # before the round: a restart re-splits it
        self.state.open_round(announcement)
        self._round_districts = assignment
        self._answered = {}
        self._announce()
        log_event(
            "round_opened",
            round=index,
            task=announcement.task,
            model_version=announcement.model_version,
            participants=len(participants),
            districts=sum(1 for devices in assignment.values() if devices),
        )

    def _alive(self, report: DistrictReport, index: int, last: StoredRound | None) -> bool:
        """The flat fleet's rule for a device, for a district: heard from (its report is its
        heartbeat; by the root's clock) since the previous round opened, or answered one of the last
        `service.dormant_after_rounds` rounds. A district that went down stops holding up
        rounds after that many; it returns with its next report."""
        if last is None or self._heard.get(report.district, 0.0) >= last.opened:
            return True
        answered = self.state.last_answers().get(report.district, -1)
        return answered >= index - self.fleet.service.dormant_after_rounds

    def _announce(self) -> None:
        """(Re)publish the round's signed announcement to every district, each naming only
        that district's devices (the open round, or the last one, closed)."""
        announcement = self._latest_announcement()
        if announcement is None:
            return
        for district in self.districts.ids:
            mine = announcement.model_copy(
                update={"participants": self._round_districts.get(district, [])}
            )
            signed = sign_announcement(self.signing_key, mine)
            self.session.publish(
                district_topic(self.fleet.name, district, DistrictTopic.ROUND),
                signed.model_dump_json().encode(),
                retain=True,
            )

    # -- messages from districts ------------------------------------------------------------

    def _district(self, topic: str) -> str | None:
        """The configured district a topic belongs to; None (logged) for anything else."""
        try:
            district = parse_district_topic(topic).district
        except ProtocolError as error:
            log_event("message_rejected", logging.WARNING, topic=topic[:200], reason=str(error))
            return None
        if district not in self.districts.ids:
            self._reject(None, district, "not a district of this fleet (districts.ids)")
            return None
        return district

    def _on_report(self, topic: str, message: bytes) -> None:
        district = self._district(topic)
        if district is None or not message or not self._admitted(district):
            return
        try:
            report = DistrictReport.model_validate_json(message)
        except ValidationError as error:
            self._reject(
                None, district, f"malformed district report ({error.error_count()} errors)"
            )
            return
        if report.district != district or report.fleet != self.fleet.name:
            self._reject(None, district, f"report of {report.fleet}/{report.district} on {topic}")
            return
        if len(report.devices) > self.fleet.device_capacity:
            # its announcement must fit one retained chunk (`FleetConfig.device_capacity`)
            self._reject(
                None,
                district,
                f"report names {len(report.devices)} devices, a district may bring at most "
                f"{self.fleet.device_capacity}",
            )
            return
        with self._lock:
            self._reports[district] = report
            self._heard[district] = time.time()

    def _accept_partial(self, payload: bytes, district: str) -> PartialHeader | None:
        if not self._round_districts.get(district):
            raise ProtocolError(f"district {district!r} has no devices in the open round")
        header = self.keeper.accept_partial(payload, district, self._round_districts[district])
        if header is not None:
            self._answered[district] = header.answered
        return header

    def _counted_round(self, district: str, digest: str) -> int | None:
        """The round (the latest or the one before) that already counts this very partial."""
        last = self.state.last_round()
        if last is None:
            return None
        for round_index in (last.announcement.round, last.announcement.round - 1):
            if (district, digest) in self.state.update_digests(round_index):
                return round_index
        return None

    def _on_partial(self, topic: str, payload: bytes) -> None:
        district = self._district(topic)
        if district is None or not self._admitted(district):  # a flooding district's bucket
            return
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            current = self.keeper.current
            round_index = None if current is None else current.announcement.round
            counted = self._counted_round(district, digest)
            if counted is not None:  # re-sent before the district saw the round close
                log_event("partial_duplicate", district=district, round=counted)
                return
            try:
                header = self._accept_partial(payload, district)
            except ProtocolError as error:
                self._reject(round_index, district, f"partial: {error}")
                return
            if header is None:
                log_event("partial_duplicate", district=district, round=round_index)
                return
            loss = header.loss_sum / header.updates if header.updates else 0.0
            self.state.store_update(header.round, district, payload, digest, header.updates, loss)
            crash_point("root_partial_stored")
            log_event(
                "partial_accepted",
                district=district,
                round=header.round,
                updates=header.updates,
                answered=header.answered,
                bytes=len(payload),
            )


def open_root(fleet: FleetConfig, state_path: Path, hooks: ServiceHooks) -> RootAggregator:
    """The root aggregator of `fleet` on its broker, with its state file and signing key."""
    session = MqttSession(
        session_settings(fleet.service.broker, mqtt_client_id(fleet.name, "aggregator"))
    )
    state = AggregatorState(state_path, fleet.name)
    return RootAggregator(fleet, state, session, load_signing_key(fleet.service.signing_key), hooks)
