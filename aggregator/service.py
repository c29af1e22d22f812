"""`fedfmx-edge serve`: the aggregator, a `RoundKeeper` driven over MQTT with durable state.

It registers devices from their hello, publishes each model version (retained, chunked, with
a signed manifest) before announcing the round that starts from it, stores every accepted
update before acknowledging it with a receipt, and closes a round when every participant has
answered, or at the deadline once a quorum has (DESIGN §5, §7). Killed at any instant and
restarted on the same state file, it re-folds the stored updates of the open round and goes on.
Merging is numpy only: torch is imported once, to build version 0 of a new fleet.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from aggregator.clock import clock_answer
from aggregator.crash_points import crash_point
from aggregator.events import log_event
from aggregator.rate_limit import RateLimiter
from aggregator.state import AggregatorState, Evaluation, RoundTotals, StoredModel, UpdateRow
from fedfmx.config import FleetConfig
from fedfmx.errors import FedFMXError, ProtocolError
from fedfmx.federation.rounds import GlobalModel, RoundKeeper
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model
from fedfmx.wire.messages import DeviceStatus, Hello, RoundAnnouncement, UpdateReceipt
from fedfmx.wire.signing import (
    DeltaPayload,
    chunk_payload,
    load_signing_key,
    sign_announcement,
    sign_manifest,
)
from transport import (
    DeliveryDeferred,
    MqttSession,
    TopicKind,
    client_topic,
    clients_filter,
    model_body_topic,
    model_delta_topic,
    model_filters,
    model_manifest_topic,
    mqtt_client_id,
    parse_topic,
    round_topic,
    session_settings,
)

TICK_S = 0.1
COMMIT_BATCH = 64
"""Most accepted updates waiting for one SQLite commit (and then their receipts)."""

Evaluator = Callable[[GlobalModel, int], tuple[list[float], float]]
"""(model, task) -> accuracy on each task so far, and on every class seen so far."""


@dataclass(frozen=True)
class Acceptance:
    """An update validated and folded in, whose receipt waits for the batch's commit."""

    device_id: str
    digest: str
    stored: UpdateRow | None
    """None: a duplicate of an update stored (or waiting) already; only its receipt is due."""
    experts: list[str]


@dataclass(frozen=True)
class ServiceHooks:
    """Optional callbacks: test-set evaluation after each task, progress after each round."""

    evaluate: Evaluator | None = None
    on_round: Callable[[RoundTotals], None] | None = None


def first_model(fleet: FleetConfig) -> GlobalModel:
    """Version 0 of a new fleet (the only place the aggregator needs torch)."""
    from fedfmx.federation.simulation import initial_model  # torch: only for a fleet's first start

    return initial_model(fleet)


class Aggregator:
    """One fleet's aggregator; `run()` returns when the last round of the last task closed."""

    def __init__(
        self,
        fleet: FleetConfig,
        state: AggregatorState,
        session: MqttSession,
        signing_key: Ed25519PrivateKey | None = None,
        hooks: ServiceHooks = ServiceHooks(),
    ) -> None:
        self.fleet = fleet
        self.state = state
        self.session = session
        self.signing_key = signing_key
        self.hooks = hooks
        self.num_rounds = fleet.protocol.num_rounds
        self.keeper = RoundKeeper(fleet, self._restore_model())
        self._lock = threading.RLock()
        self._finished = threading.Event()
        self._rate_limiter = RateLimiter(fleet.service.rate_limit)
        self._accepted: list[Acceptance] = []
        """Updates folded in since the last commit (see `_commit_accepted`)."""

    # -- start and resume -------------------------------------------------------------------

    def _restore_model(self) -> GlobalModel:
        stored = self.state.latest_model()
        if stored is None:
            model = first_model(self.fleet)
            keeper = RoundKeeper(self.fleet, model)
            self.state.save_first_model(
                StoredModel(0, keeper.model_payload(), model.class_names, model.expert_usage, None)
            )
            return model
        header, weights = decode_model(stored.payload, max_bytes=MAX_MODEL_BYTES)
        return GlobalModel(stored.version, weights, header.class_names, stored.expert_usage)

    def _resume_open_round(self) -> None:
        """Re-fold the stored updates of a round that was open when the process stopped."""
        last = self.state.last_round()
        if last is None or last.closed is not None:
            return
        self.keeper.resume_round(last.announcement)
        stored = self.state.round_updates(last.announcement.round)
        for update in stored:
            self.keeper.accept(update.payload, update.device_id)
        log_event(
            "round_resumed",
            round=last.announcement.round,
            updates=len(stored),
            answered=len(self.state.answered(last.announcement.round)),
        )

    def start(self) -> None:
        """Resume, subscribe, connect, and (re)publish the current model and round."""
        fleet = self.fleet.name
        self.session.subscribe(clients_filter(fleet, TopicKind.HELLO), self._on_hello)
        self.session.subscribe(clients_filter(fleet, TopicKind.STATUS), self._on_status, raw=True)
        self.session.subscribe(clients_filter(fleet, TopicKind.UPDATE), self._on_update)
        self.session.subscribe(clients_filter(fleet, TopicKind.CLOCK), self._on_clock, raw=True)
        self.session.on_idle(self._commit_accepted)
        # Retained messages only the aggregator writes: restored when anyone overwrites them.
        for topic_filter in (round_topic(fleet), *model_filters(fleet)):
            self.session.guard_retained(topic_filter)
        with self._lock:
            self._resume_open_round()
            self._evaluate_missed_task()
            self.session.connect()
            self._resend_receipts()
            self._publish_model()
            self._announce()
        log_event(
            "aggregator_started",
            fleet=fleet,
            model_version=self.keeper.model.version,
            state=str(self.state.path),
        )

    def run(
        self, stop: threading.Event | None = None, heartbeat: Callable[[], None] | None = None
    ) -> bool:
        """Drive rounds until the fleet's schedule is done (True) or `stop` is set (False);
        `heartbeat` is called every tick (systemd's watchdog)."""
        while not self._finished.is_set():
            if heartbeat is not None:
                heartbeat()
            if stop is not None and stop.wait(TICK_S):
                return False
            if stop is None:
                time.sleep(TICK_S)
            with self._lock:
                # Every update folded in is stored before a tick may merge (in any subclass).
                self._commit_accepted()
                self._tick(time.time())
        return True

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # -- rounds -----------------------------------------------------------------------------

    def _resend_receipts(self) -> None:
        """The receipts of the latest round's stored updates, again: one lost when the process
        died would leave its device believing that an update which counted was dropped.
        (Published before any round announcement, so they reach a device first; a device
        ignores receipts it is not waiting for.)"""
        last = self.state.last_round()
        if last is None:
            return
        for device_id, digest in self._stored_digests(last.announcement.round):
            self._receipt(device_id, digest, "")

    def _stored_digests(self, round_index: int) -> list[tuple[str, str]]:
        """(device, SHA-256) of the updates a round's merge folds."""
        return self.state.update_digests(round_index)

    def _tick(self, now: float) -> None:
        current = self.keeper.current
        if current is None:
            self._maybe_open(now)
        else:
            self._tick_open(current.announcement, now)

    def _tick_open(self, announcement: RoundAnnouncement, now: float) -> None:
        """Close the open round when it is complete, or extend or close it at its deadline."""
        answered = self.state.answered(announcement.round) & set(announcement.participants)
        if len(answered) == len(announcement.participants):
            self._close()
        elif now >= announcement.deadline_unix:
            last = self.state.last_round()
            extensions = 0 if last is None else last.extensions
            quorum = math.ceil(self.fleet.service.quorum_fraction * len(announcement.participants))
            if len(answered) >= quorum or extensions >= self.fleet.service.max_extensions:
                self._close()
            else:
                extended = self.keeper.extend_deadline(now + self.fleet.service.round_deadline_s)
                self.state.extend_round(extended)
                self._announce()
                log_event(
                    "round_extended",
                    logging.WARNING,
                    round=announcement.round,
                    answered=len(answered),
                    quorum=quorum,
                )

    def _maybe_open(self, now: float) -> None:
        last = self.state.last_round()
        index = 0 if last is None else last.announcement.round + 1
        if index >= self.num_rounds:
            self._finished.set()
            return
        needed = self.fleet.service.min_devices or self.fleet.protocol.num_clients
        if index == 0 and self.state.device_count() < needed:
            return
        participants = self._participants(index, None if last is None else last.opened)
        if not participants:
            return
        deadline = now + self.fleet.service.round_deadline_s
        announcement = self.keeper.open_round(index, participants, deadline)
        self.state.open_round(announcement)
        self._announce()
        log_event(
            "round_opened",
            round=index,
            task=announcement.task,
            model_version=announcement.model_version,
            participants=len(participants),
        )

    def _participants(self, index: int, previous_opened: float | None) -> list[str]:
        """Registered devices that are online and alive: heard from since the previous round
        opened, or answered one of the last `dormant_after_rounds` rounds; at most the
        fleet's device capacity (the most recently seen), so the announcement always fits."""
        service = self.fleet.service
        answers = self.state.last_answers()
        alive = [
            row
            for row in self.state.devices()
            if row.status.state != "offline"
            and (
                previous_opened is None
                or row.last_seen >= previous_opened
                or answers.get(row.device_id, -1) >= index - service.dormant_after_rounds
            )
        ]
        newest = sorted(alive, key=lambda row: row.last_seen, reverse=True)
        return sorted(row.device_id for row in newest[: self.fleet.device_capacity])

    def _latest_announcement(self) -> RoundAnnouncement | None:
        """The open round's announcement, or the last one, closed (None before any round)."""
        if self.keeper.current is not None:
            return self.keeper.current.announcement
        last = self.state.last_round()
        return None if last is None else last.announcement.model_copy(update={"closed": True})

    def _announce(self) -> None:
        """(Re)publish the open round's signed announcement, or the last one, closed."""
        announcement = self._latest_announcement()
        if announcement is None:
            return
        signed = sign_announcement(self.signing_key, announcement)
        self.session.publish(
            round_topic(self.fleet.name), signed.model_dump_json().encode(), retain=True
        )

    def _close(self) -> None:
        assert self.keeper.current is not None
        announcement = self.keeper.current.announcement
        before = self.keeper.model.version
        merge_started = time.perf_counter()
        model = self.keeper.close_round()
        merge_duration_s = time.perf_counter() - merge_started
        crash_point("round_merged")
        stored = None
        if model.version != before:
            payload = self.keeper.model_payload()
            stored = StoredModel(
                model.version, payload, model.class_names, model.expert_usage, None
            )
        self.state.close_round(announcement.round, stored)
        crash_point("round_closed")
        totals = self.state.round_totals()[-1]
        log_event(
            "round_closed",
            round=announcement.round,
            task=announcement.task,
            updates=totals.updates,
            skips=totals.skips,
            participants=totals.participants,
            uplink_bytes=totals.uplink_bytes,
            model_version=model.version,
            merge_duration_s=round(merge_duration_s, 4),
            round_duration_s=round((totals.closed or totals.opened) - totals.opened, 3),
        )
        self._announce()  # closed: devices stop re-sending for it
        self._evaluate_missed_task()
        self._publish_model()
        if self.hooks.on_round is not None:
            self.hooks.on_round(totals)

    def _evaluate_missed_task(self) -> None:
        """Evaluate after a task's last round (also when a restart fell between close and it)."""
        last = self.state.last_round()
        rounds_per_task = self.fleet.protocol.rounds_per_task
        if self.hooks.evaluate is None or last is None or last.closed is None:
            return
        task = last.announcement.task
        if (last.announcement.round + 1) % rounds_per_task:
            return
        if any(e.task == task for e in self.state.evaluations()):
            return
        per_task, seen = self.hooks.evaluate(self.keeper.model, task)
        self.state.save_evaluation(Evaluation(task, self.keeper.model.version, per_task, seen))
        log_event(
            "task_evaluated", task=task, accuracy=seen, model_version=self.keeper.model.version
        )

    def _publish_model(self) -> None:
        """Publish the current version (its delta and body chunks, then the manifest naming
        both) and retire old ones."""
        version = self.keeper.model.version
        payload = self.keeper.device_payload()
        fleet = self.fleet.name
        chunk_bytes = self.fleet.service.broker.max_payload_bytes
        delta = self._publish_delta(version, chunk_bytes)
        chunks = self.session.publish_retained_chunks(model_body_topic(fleet, version), payload)
        crash_point("model_chunks_published")
        manifest = sign_manifest(
            self.signing_key, fleet, version, chunk_payload(payload, chunk_bytes), delta
        )
        self.session.publish(
            model_manifest_topic(fleet, version), manifest.model_dump_json().encode(), retain=True
        )
        self.state.mark_published(version, chunks, len(payload))
        retired = version - 2
        retired_chunks = self.state.published_chunks(retired) if retired >= 0 else None
        if retired_chunks:
            for index in range(retired_chunks):
                self.session.clear_retained(f"{model_body_topic(fleet, retired)}/{index}")
            self.session.clear_retained(model_manifest_topic(fleet, retired))
            self.state.mark_retired(retired)
        if retired >= 0:
            delta_chunks = self.state.published_delta_chunks(retired)
            for index in range(delta_chunks):
                self.session.clear_retained(f"{model_delta_topic(fleet, retired)}/{index}")
            if delta_chunks:
                self.state.retire_delta(retired)
        log_event(
            "model_published",
            model_version=version,
            bytes=len(payload),
            chunks=chunks,
            delta_bytes=None if delta is None else sum(len(c) for c in delta.chunks),
        )

    def _publish_delta(self, version: int, chunk_bytes: int) -> DeltaPayload | None:
        """Publish the version's delta against the previous one, when the keeper merged it
        (after a restart only the full version goes out: devices take that)."""
        delta = self.keeper.delta_payload()
        if delta is None:
            return None
        topic = model_delta_topic(self.fleet.name, version)
        count = self.session.publish_retained_chunks(topic, delta.payload)
        self.state.mark_delta_published(version, count, len(delta.payload))
        return DeltaPayload(
            chunk_payload(delta.payload, chunk_bytes), delta.base_version, delta.decoded_bytes
        )

    # -- messages from devices --------------------------------------------------------------

    def _sender(self, topic: str) -> str | None:
        """The device a per-client topic belongs to; None (logged) for a malformed topic."""
        try:
            device_id = parse_topic(topic).device_id
        except ProtocolError as error:
            log_event("message_rejected", logging.WARNING, topic=topic[:200], reason=str(error))
            return None
        return device_id

    def _admitted(self, sender: str) -> bool:
        """Whether `sender` is within its rate limit; logs where a throttling streak starts
        (stored as a rejection) and where it ends (with the count dropped)."""
        with self._lock:
            verdict = self._rate_limiter.admit(sender)
        if verdict.streak_started:
            limit = self.fleet.service.rate_limit
            self._reject(
                None,
                sender,
                f"rate limit: over {limit.messages_per_s:g} messages/s (burst {limit.burst}); "
                "dropping its messages until it slows down",
            )
        if verdict.streak_ended:
            log_event(
                "device_throttled", logging.WARNING, device=sender, dropped=verdict.streak_ended
            )
        return verdict.allowed

    def _on_hello(self, topic: str, message: bytes) -> None:
        sender = self._sender(topic)
        if sender is None:
            return
        if not self._admitted(sender):
            raise DeliveryDeferred
        try:
            hello = Hello.model_validate_json(message)
        except ValidationError as error:
            self._reject(None, sender, f"malformed hello ({error.error_count()} errors)")
            return
        if hello.device_id != sender or hello.fleet != self.fleet.name:
            self._reject(None, sender, f"hello for {hello.fleet}/{hello.device_id} on {topic}")
            return
        refusal = self._registration_refusal(sender)
        if refusal is not None:
            self._reject(None, sender, refusal)
            return
        new = self.state.register(hello)
        log_event(
            "device_registered" if new else "device_returned",
            device=sender,
            profile=hello.profile,
            classes=len(hello.classes_met),
        )

    def _registration_refusal(self, device_id: str) -> str | None:
        """Why a hello from `device_id` may not register it (None: it may).

        A provisioned fleet lists its devices. An open one takes any id while the registry has
        room; when it is full, devices silent for `device_expiry_s` expire, or else the
        least recently heard device that never answered a round makes room: a flood of hellos
        from made-up ids can hold the registry only until genuine devices say hello (they do
        at every round they are not in), and a device that takes part is never evicted.
        """
        service = self.fleet.service
        if service.allowed_devices is not None and device_id not in service.allowed_devices:
            return "hello from a device id the fleet does not list (service.allowed_devices)"
        capacity = self.fleet.device_capacity
        if self.state.is_registered(device_id) or self.state.device_count() < capacity:
            return None
        expired = self.state.expire_devices(time.time() - service.device_expiry_s)
        if expired:
            log_event("devices_expired", logging.WARNING, count=len(expired), first=expired[0])
        if self.state.device_count() < capacity:
            return None
        evicted = self.state.evict_newcomer()
        if evicted is not None:
            log_event("device_evicted", logging.WARNING, device=evicted, for_device=device_id)
            return None
        return f"registry full ({capacity} devices, all of them taking part)"

    def _on_status(self, topic: str, message: bytes) -> None:
        sender = self._sender(topic)
        if sender is None:
            return
        if not self._admitted(sender):
            return  # a raw packet: nothing is remembered, the next status is heard
        try:
            status = DeviceStatus.model_validate_json(message)
        except ValidationError:
            self._reject(None, sender, "malformed status")
            return
        if status.device_id != sender:
            self._reject(None, sender, f"status of {status.device_id!r} on {topic}")
            return
        if not self.state.record_status(status):
            return  # a status from before its hello (retained): the hello follows
        if status.state == "offline":
            log_event("device_offline", device=sender)
        with self._lock:
            current = self.keeper.current
            if (
                status.state == "skipped"
                and current is not None
                and status.round == current.announcement.round
                and sender in current.announcement.participants
            ):
                self.state.record_skip(status.round, sender)
                log_event("device_skipped", device=sender, round=status.round)

    def _on_clock(self, topic: str, message: bytes) -> None:
        """Answer `doctor`'s clock probe on the same topic (see aggregator.clock)."""
        answer = clock_answer(message, time.time())
        sender = self._sender(topic)
        if answer is not None and sender is not None and self._admitted(sender):
            self.session.publish_raw(topic, answer)

    def _on_update(self, topic: str, payload: bytes) -> None:
        sender = self._sender(topic)
        if sender is None:
            return
        if not self._admitted(sender):
            raise DeliveryDeferred  # not remembered as delivered: its re-send will count
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            self._take_update(sender, payload, digest)
            if len(self._accepted) >= COMMIT_BATCH:
                self._commit_accepted()

    def _take_update(self, sender: str, payload: bytes, digest: str) -> None:
        """Validate and fold one update into the open round (under the lock); its row and
        receipt wait in `_accepted` for the next commit, a refusal is receipted at once."""
        current = self.keeper.current
        round_index = None if current is None else current.announcement.round
        try:
            header = self.keeper.accept(payload, sender)
        except ProtocolError as error:
            self._refuse(round_index, sender, digest, str(error))
            return
        if header is None:
            log_event("update_duplicate", device=sender, round=round_index)
            self._accepted.append(Acceptance(sender, digest, None, []))
        else:
            row = UpdateRow(
                header.round, sender, payload, digest, header.num_samples, header.train_loss
            )
            experts = [str(e) for e in header.expert_ids]
            self._accepted.append(Acceptance(sender, digest, row, experts))

    def _refuse(self, round_index: int | None, sender: str, digest: str, reason: str) -> None:
        """An update refused: logged and stored with its reason, and receipted as refused —
        unless the fleet stored that very update already (re-sent after a lost receipt, or
        a copy that raced its round's close): its receipt is then an acceptance again, so
        the device neither sends it once more nor takes a stored update for a refused one."""
        if self.state.stores_digest(sender, digest):
            log_event("update_duplicate", device=sender, round=round_index)
            self._receipt(sender, digest, "")
            return
        self._reject(round_index, sender, reason)
        self._receipt(sender, digest, reason)

    def _commit_accepted(self) -> None:
        """Store the updates folded in since the last commit in one transaction, then receipt
        them: a receipt still follows its update's commit (a device drops an update only once
        it is durably stored), but a burst of updates costs one commit, not one each. Runs
        when the session's handler thread has nothing queued, every `COMMIT_BATCH` updates
        and at the start of every tick (so before any merge). A crash before the commit loses
        only folds made in memory; their devices, unreceipted, send again."""
        if not self._accepted:
            return  # the handler thread's idle call, most of the time
        with self._lock:
            batch, self._accepted = self._accepted, []
            rows = [a.stored for a in batch if a.stored is not None]
            if rows:
                self.state.store_updates(rows)
            for acceptance in batch:
                row = acceptance.stored
                if row is not None:
                    crash_point("update_stored")
                    log_event(
                        "update_accepted",
                        device=row.device_id,
                        round=row.round,
                        bytes=len(row.payload),
                        experts=acceptance.experts,
                    )
            for acceptance in batch:
                self._receipt(acceptance.device_id, acceptance.digest, "")

    def _receipt(self, device_id: str, digest: str, refusal: str) -> None:
        receipt = UpdateReceipt(
            update_sha256=digest,
            accepted=not refusal,
            reason=refusal,
        )
        inbox = client_topic(self.fleet.name, device_id, TopicKind.INBOX)
        # Not waiting for the PUBACK: a lost receipt only makes the device send again.
        try:
            self.session.publish(inbox, receipt.model_dump_json().encode(), wait=False)
        except FedFMXError as error:
            log_event("receipt_not_sent", logging.WARNING, device=device_id, reason=str(error))

    def _reject(self, round_index: int | None, device_id: str, reason: str) -> None:
        self.state.record_rejection(round_index, device_id, reason)
        log_event(
            "update_rejected" if round_index is not None else "message_rejected",
            logging.WARNING,
            device=device_id,
            round=round_index,
            reason=reason,
        )


def open_aggregator(fleet: FleetConfig, state_path: Path, hooks: ServiceHooks) -> Aggregator:
    """The aggregator of `fleet` on its broker, with its state file and signing key."""
    session = MqttSession(
        session_settings(fleet.service.broker, mqtt_client_id(fleet.name, "aggregator"))
    )
    state = AggregatorState(state_path, fleet.name)
    kind: type[Aggregator] = Aggregator
    if fleet.service.mode == "buffered":
        from aggregator.buffered import BufferedAggregator  # it builds on this module

        kind = BufferedAggregator
    if fleet.service.update_workers:
        from aggregator.pooled import PooledAggregator  # it builds on this module

        kind = PooledAggregator
    return kind(fleet, state, session, load_signing_key(fleet.service.signing_key), hooks)
