"""Update workers: decoding, validating and folding updates in processes of their own.

The aggregator's per-update work is Python holding one GIL (docs/decisions.md, "Where a
1,000-device round goes"): decoding and validating an update, folding it into the round's sums.
`UpdatePool` moves that work into `service.update_workers` processes. Each owns a *shard* of the
fleet's devices (`crc32(device id) mod workers`), so every update of one device reaches one
worker, whose `RoundKeeper` does exactly what the in-process one does (`RoundKeeper.accept`:
the same checks, the same refusal reasons, the same duplicate rule) and folds what it accepts
into its own partial `MergeSums`. The main process keeps the MQTT session, the rate limits, the
SQLite state and the receipts: it sends each update to its worker, takes back a `Verdict`,
stores accepted updates and receipts them after the commit, as before; at a round's close it
adds the workers' partial sums (they are associative, DESIGN §8) and merges.

Counted once, across a worker's death: a partial holds exactly the updates its worker folded.
A worker that dies loses its partial; a fresh one takes the round and re-folds every update of
its shard the main process already holds a verdict for (stored, or waiting for the commit),
then the updates it had been sent without answering. Nothing is receipted twice: a replayed
update gives no verdict. The main process dying is the restart of DESIGN §8: the new pool
re-folds the open round's stored payloads.

Only our own objects cross the pipes (update payloads as opaque bytes, the model, the sums):
nothing from the network is unpickled.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from aggregator.crash_points import crash_point
from fedfmx.config import FleetConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import MergeSums
from fedfmx.federation.rounds import GlobalModel, RoundKeeper
from fedfmx.wire.messages import RoundAnnouncement

MAX_IN_FLIGHT = 32
"""Updates sent to one worker and not yet answered; beyond, sending waits for a verdict (so
neither pipe can fill up while the other side waits on it)."""


@dataclass(frozen=True)
class Verdict:
    """What a worker made of one update."""

    device_id: str
    digest: str
    refusal: str | None = None
    """The reason it was refused (stored and receipted as refused); None otherwise."""
    duplicate: bool = False
    round: int = -1
    num_samples: int = 0
    train_loss: float = 0.0
    experts: list[str] = field(default_factory=list)


@dataclass
class _Worker:
    process: BaseProcess
    requests: Connection
    results: Connection
    in_flight: deque[tuple[str, str, bytes]] = field(default_factory=deque)
    """(device, digest, payload) of the updates sent and not answered yet, in sending order
    (a worker answers in that order)."""
    alive: bool = True


OnVerdict = Callable[[Verdict, bytes], None]
"""Called with each verdict and its update's payload as soon as it is taken in."""
Replay = Callable[[int, int], Iterable[tuple[str, bytes]]]
"""(shard, workers) -> (device, payload) of the open round's updates of that shard that were
given a verdict already (stored, or waiting for the commit): what a fresh worker re-folds."""


class UpdatePool:
    """`workers` update processes behind pipes; see the module docstring."""

    def __init__(
        self, fleet: FleetConfig, workers: int, on_verdict: OnVerdict, replay: Replay
    ) -> None:
        self._fleet_json = fleet.model_dump_json()
        self._on_verdict = on_verdict
        self._replay = replay
        self._context = mp.get_context("spawn")
        self._round: tuple[GlobalModel, RoundAnnouncement] | None = None
        self._workers = [self._start() for _ in range(workers)]
        self.restarts = 0

    def _start(self) -> _Worker:
        worker_requests, requests = self._context.Pipe(duplex=False)
        results, worker_results = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=serve_updates,
            args=(self._fleet_json, worker_requests, worker_results),
            name="fedfmx-update-worker",
            daemon=True,
        )
        process.start()
        worker_requests.close()
        worker_results.close()
        return _Worker(process, requests, results)

    def shard(self, device_id: str) -> int:
        return zlib.crc32(device_id.encode()) % len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid or 0 for w in self._workers]

    def open_round(self, model: GlobalModel, announcement: RoundAnnouncement) -> None:
        """Every worker takes up this round with empty partial sums, then re-folds its shard's
        updates that have a verdict already (after a restart: the stored payloads)."""
        self.drain()
        self._round = (model, announcement)
        for index in range(len(self._workers)):
            self._send_round(index)

    def _send_round(self, index: int) -> None:
        worker = self._workers[index]
        if self._round is None:
            return
        try:
            worker.requests.send(("round", *self._round))
            for device_id, payload in self._replay(index, len(self._workers)):
                worker.requests.send(("replay", device_id, payload))
        except OSError:  # BrokenPipeError among them: it died already
            worker.alive = False

    def submit(self, device_id: str, payload: bytes, digest: str) -> None:
        """Send one update to its worker (taking in the verdicts that came back meanwhile)."""
        index = self.shard(device_id)
        self.take_verdicts()
        while len(self._workers[index].in_flight) >= MAX_IN_FLIGHT:
            self._receive(index, block=True)
        worker = self._workers[index]
        worker.in_flight.append((device_id, digest, payload))
        self._send_update(worker, device_id, payload, digest)

    def _send_update(self, worker: _Worker, device_id: str, payload: bytes, digest: str) -> None:
        try:
            worker.requests.send(("update", device_id, payload, digest))
        except OSError:
            worker.alive = False  # restarted by the next `_receive`, which re-sends this

    def take_verdicts(self) -> None:
        """Take in the verdicts that have come back, without waiting."""
        for index in range(len(self._workers)):
            self._receive(index)

    def drain(self) -> None:
        """Take in the verdict of every update sent, waiting for them."""
        for index in range(len(self._workers)):
            while self._workers[index].in_flight:
                self._receive(index, block=True)

    def _receive(self, index: int, block: bool = False) -> None:
        """Take in one worker's verdicts (at least one if `block`); a dead worker is replaced,
        after every verdict it sent before dying was taken in."""
        worker = self._workers[index]
        try:  # a worker found dead by a send may still have sent verdicts: read them first
            while worker.in_flight and (block or not worker.alive or worker.results.poll()):
                verdict = worker.results.recv()
                _, digest, payload = worker.in_flight.popleft()
                assert verdict.digest == digest, "a worker answers in the order it was sent"
                self._on_verdict(verdict, payload)
                block = False
        except (EOFError, OSError):
            worker.alive = False
        if not worker.alive:
            self._restart(index)

    def _restart(self, index: int) -> None:
        """Replace a dead worker: the round, its shard's re-folds, then what it was sent."""
        dead = self._workers[index]
        dead.process.join(5)
        dead.requests.close()
        dead.results.close()
        fresh = self._start()
        self._workers[index] = fresh
        self.restarts += 1
        self._send_round(index)
        for device_id, digest, payload in dead.in_flight:
            fresh.in_flight.append((device_id, digest, payload))
            self._send_update(fresh, device_id, payload, digest)

    def sums(self) -> tuple[MergeSums, set[str]]:
        """The round's sums over every worker's partial, and the devices they folded (after
        every verdict is in)."""
        self.drain()
        total, devices = MergeSums(), set[str]()
        for index in range(len(self._workers)):
            while True:
                worker = self._workers[index]
                try:
                    worker.requests.send(("sums",))
                    partial, folded = worker.results.recv()
                    break
                except (EOFError, OSError):
                    worker.alive = False
                    self._restart(index)
            total.add(partial)
            devices |= folded
        return total, devices

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):  # a dead worker needs no stop
                worker.requests.send(("stop",))
        for worker in self._workers:
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
            worker.requests.close()
            worker.results.close()


def serve_updates(fleet_json: str, requests: Connection, results: Connection) -> None:
    """A worker process: a `RoundKeeper` of its own, answering one request at a time until
    told to stop or its parent is gone (the pipe closes)."""
    fleet = FleetConfig.model_validate_json(fleet_json)
    keeper: RoundKeeper | None = None
    while True:
        try:
            request: tuple[Any, ...] = requests.recv()
        except (EOFError, OSError):
            return
        kind = request[0]
        if kind == "stop":
            return
        if kind == "round":
            keeper = RoundKeeper(fleet, request[1])
            keeper.resume_round(request[2])
        elif kind == "replay":
            assert keeper is not None
            keeper.accept(request[2], request[1])  # stored before: it was valid then
        elif kind == "update":
            results.send(_judge(keeper, *request[1:]))
        elif kind == "sums":
            current = None if keeper is None else keeper.current
            results.send(
                (MergeSums(), set()) if current is None else (current.sums, current.received)
            )


def _judge(keeper: RoundKeeper | None, device_id: str, payload: bytes, digest: str) -> Verdict:
    """`RoundKeeper.accept` on one update, as a verdict."""
    if keeper is None:
        return Verdict(device_id, digest, refusal="no round is open")
    try:
        header = keeper.accept(payload, device_id)
    except ProtocolError as error:
        return Verdict(device_id, digest, refusal=str(error))
    if header is None:
        return Verdict(device_id, digest, duplicate=True)
    crash_point("worker_update_folded")
    return Verdict(
        device_id,
        digest,
        round=header.round,
        num_samples=header.num_samples,
        train_loss=header.train_loss,
        experts=[str(e) for e in header.expert_ids],
    )
