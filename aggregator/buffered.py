"""`service.mode: buffered`: the aggregator without a round barrier (FedBuff-style).

The open round is a *buffer*. Any registered device's update trained from one of the last
`service.buffered.max_staleness` versions is folded in with the staleness weight of
`fedfmx.federation.buffered`; once the buffer holds `K` updates (`FleetConfig.buffer_size`), or
every participant has answered its version (an update or a skip: nothing fresh will come), or it
holds at least one when `service.round_deadline_s` has passed, it is merged into a new signed
version and the next buffer opens on it at once. A slow device's update, trained from an
older version, still counts (less); one staler than the bound is refused with its reason.

Counted once, across crashes: an update's row (`updates`, keyed by the round it was trained
in and its device) and the buffer that folds it (`buffered_folds`) are written in one
transaction before its receipt; the merge of a buffer and the drop of its payloads are one
transaction (`AggregatorState.close_round`). A restart re-folds exactly the payloads of the
open buffer; a re-sent update is recognised by its key, whichever buffer took it.
"""

from __future__ import annotations

import logging
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.events import log_event
from aggregator.service import Acceptance, Aggregator, ServiceHooks
from aggregator.state import AggregatorState, UpdateRow
from fedfmx.config import FleetConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.buffered import BufferKeeper
from fedfmx.wire.messages import RoundAnnouncement
from transport import MqttSession


class BufferedAggregator(Aggregator):
    """An `Aggregator` whose rounds are buffers of `K` updates of any recent version."""

    def __init__(
        self,
        fleet: FleetConfig,
        state: AggregatorState,
        session: MqttSession,
        signing_key: Ed25519PrivateKey | None,
        hooks: ServiceHooks,
    ) -> None:
        super().__init__(fleet, state, session, signing_key, hooks)
        self.keeper: BufferKeeper = BufferKeeper(fleet, self.keeper.model, state.class_names)
        self._folded: set[tuple[int, str]] = set()
        """(trained round, device) of the updates in the open buffer."""
        self._staleness: list[int] = []

    def _resume_open_round(self) -> None:
        """Re-fold the stored updates of the buffer that was open when the process stopped."""
        last = self.state.last_round()
        if last is None or last.closed is not None:
            return
        self.keeper.resume_round(last.announcement)
        stored = self.state.buffered_updates(last.announcement.round)
        for update in stored:
            try:
                header, tensors, staleness = self.keeper.admit(update.payload, update.device_id)
                self.keeper.fold_stale(header, tensors, staleness)
            except ProtocolError as error:  # only if the fleet's config changed meanwhile
                log_event("update_not_refolded", logging.ERROR, reason=str(error))
                continue
            self._folded.add((header.round, update.device_id))
            self._staleness.append(staleness)
        log_event("buffer_resumed", round=last.announcement.round, updates=len(stored))

    def _stored_digests(self, round_index: int) -> list[tuple[str, str]]:
        return self.state.buffered_digests(round_index)

    def _tick_open(self, announcement: RoundAnnouncement, now: float) -> None:
        """Merge the buffer when it is full, when nothing fresh can come, or when it is due."""
        folded = len(self._folded)
        due = now >= announcement.deadline_unix
        # Everyone answered this version (an update or a skip): no fresh update will come.
        answered = self.state.answered(announcement.round) & set(announcement.participants)
        everyone = len(answered) == len(announcement.participants)
        if folded >= self.fleet.buffer_size or everyone or (folded and due):
            self._close()

    def _close(self) -> None:
        assert self.keeper.current is not None
        buffer = self.keeper.current.announcement.round
        folded, staleness = len(self._folded), self._staleness
        super()._close()
        log_event(
            "buffer_merged",
            round=buffer,
            updates=folded,
            mean_staleness=round(sum(staleness) / max(1, len(staleness)), 3),
            max_staleness=max(staleness, default=0),
            model_version=self.keeper.model.version,
        )
        self._folded, self._staleness = set(), []
        self._maybe_open(time.time())  # at once, under the same lock: no update finds none open

    def _participants(self, index: int, previous_opened: float | None) -> list[str]:
        """Every registered device that is not offline (up to the fleet's capacity): with no
        barrier, a slow device is never left out for being slow."""
        online = [row for row in self.state.devices() if row.status.state != "offline"]
        newest = sorted(online, key=lambda row: row.last_seen, reverse=True)
        return sorted(row.device_id for row in newest[: self.fleet.device_capacity])

    def _take_update(self, sender: str, payload: bytes, digest: str) -> None:
        current = self.keeper.current
        if current is None:
            self._refuse(None, sender, digest, "no round is open")
            return
        buffer = current.announcement.round
        try:
            header, tensors, staleness = self.keeper.admit(payload, sender)
            if not self.state.is_registered(sender):
                raise ProtocolError(f"device {sender!r} is not a participant (never said hello)")
        except ProtocolError as error:
            self._refuse(buffer, sender, digest, str(error))
            return
        key = (header.round, sender)
        if key in self._folded or self.state.has_update(*key):
            log_event("update_duplicate", device=sender, round=header.round)
            self._accepted.append(Acceptance(sender, digest, None, []))
            return
        try:
            self.keeper.fold_stale(header, tensors, staleness)
        except ProtocolError as error:
            self._refuse(buffer, sender, digest, str(error))
            return
        self._folded.add(key)
        self._staleness.append(staleness)
        row = UpdateRow(
            header.round, sender, payload, digest, header.num_samples, header.train_loss, buffer
        )
        self._accepted.append(Acceptance(sender, digest, row, [str(e) for e in header.expert_ids]))
