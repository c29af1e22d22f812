"""`service.update_workers: N`: the synchronous aggregator with its updates decoded, validated
and folded in N processes (`aggregator.update_workers`).

Everything else is the `Aggregator`'s: the MQTT session, rate limits and message parsing in
this process; each accepted update stored (batched, `Aggregator._commit_accepted`) before its
receipt; refusals stored and receipted with their reason. What changes is where an update is
judged: `_take_update` sends it to its device's worker and returns at once, and its verdict is
taken in when it comes back (before every commit, so before every tick's close). At the close
the workers' partial sums are added into the round (associative, DESIGN §8) and merged as
before. Restarted on its state file, it hands the open round's stored payloads to the workers
to re-fold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.events import log_event
from aggregator.service import Acceptance, Aggregator, ServiceHooks
from aggregator.state import AggregatorState, UpdateRow
from aggregator.update_workers import UpdatePool, Verdict
from fedfmx.config import FleetConfig
from transport import MqttSession


class PooledAggregator(Aggregator):
    """An `Aggregator` whose update work runs in `service.update_workers` processes."""

    def __init__(
        self,
        fleet: FleetConfig,
        state: AggregatorState,
        session: MqttSession,
        signing_key: Ed25519PrivateKey | None,
        hooks: ServiceHooks,
    ) -> None:
        super().__init__(fleet, state, session, signing_key, hooks)
        self.pool = UpdatePool(
            fleet, fleet.service.update_workers, self._take_verdict, self._replay
        )

    def _replay(self, shard: int, workers: int) -> Iterator[tuple[str, bytes]]:
        """The open round's updates of one shard that have a verdict: stored, or accepted and
        waiting for the commit (a fresh worker re-folds them)."""
        current = self.keeper.current
        if current is None:
            return
        held = [
            (u.device_id, u.payload) for u in self.state.round_updates(current.announcement.round)
        ]
        held += [(a.device_id, a.stored.payload) for a in self._accepted if a.stored is not None]
        yield from ((d, p) for d, p in held if self.pool.shard(d) == shard)

    def _resume_open_round(self) -> None:
        """The workers re-fold the stored updates of the round open when the process stopped."""
        last = self.state.last_round()
        if last is None or last.closed is not None:
            return
        self.keeper.resume_round(last.announcement)
        self.pool.open_round(self.keeper.model, last.announcement)
        log_event(
            "round_resumed",
            round=last.announcement.round,
            updates=len(self.state.round_updates(last.announcement.round)),
            answered=len(self.state.answered(last.announcement.round)),
        )

    def _maybe_open(self, now: float) -> None:
        super()._maybe_open(now)
        if self.keeper.current is not None:
            self.pool.open_round(self.keeper.model, self.keeper.current.announcement)

    def _take_update(self, sender: str, payload: bytes, digest: str) -> None:
        if self.keeper.current is None:  # a worker still holds the closed round: not asked
            self._refuse(None, sender, digest, "no round is open")
            return
        self.pool.submit(sender, payload, digest)

    def _take_verdict(self, verdict: Verdict, payload: bytes) -> None:
        """One update judged by its worker: refused (stored, receipted), a duplicate, or
        accepted (its row and receipt wait for the next commit)."""
        current = self.keeper.current
        round_index = None if current is None else current.announcement.round
        sender, digest = verdict.device_id, verdict.digest
        if verdict.refusal is not None:
            self._refuse(round_index, sender, digest, verdict.refusal)
        elif verdict.duplicate:
            log_event("update_duplicate", device=sender, round=round_index)
            self._accepted.append(Acceptance(sender, digest, None, []))
        else:
            row = UpdateRow(
                verdict.round, sender, payload, digest, verdict.num_samples, verdict.train_loss
            )
            self._accepted.append(Acceptance(sender, digest, row, verdict.experts))

    def _commit_accepted(self) -> None:
        with self._lock:
            self.pool.drain()
            super()._commit_accepted()

    def _close(self) -> None:
        assert self.keeper.current is not None
        with self._lock:
            self._commit_accepted()
            self.keeper.current.sums, self.keeper.current.received = self.pool.sums()
            super()._close()

    def run(
        self, stop: threading.Event | None = None, heartbeat: Callable[[], None] | None = None
    ) -> bool:
        try:
            return super().run(stop, heartbeat)
        finally:
            self.pool.close()
