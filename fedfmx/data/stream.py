"""The class-incremental federated protocol, as plain data.

A seeded class order is cut into tasks; each task's training samples are split over the clients
by a Dirichlet draw (non-IID); each client meets each task `lag` rounds after the aggregator
does (class misalignment) and receives its share as a stream of chunks, one per round. Nothing
here trains: the simulator and the device runtime read the plan and ask a `ClientStream` what a
client holds at a given global round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedfmx.errors import ConfigError, DataError


def class_order(num_classes: int, seed: int) -> list[int]:
    """A seeded permutation of 0..num_classes-1: the order in which classes enter the fleet."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]


def split_tasks(order: Sequence[int], num_tasks: int) -> list[list[int]]:
    """Cut `order` into `num_tasks` consecutive tasks whose sizes differ by at most one.

    With n classes and T tasks the first n mod T tasks get ⌈n/T⌉ classes, the rest ⌊n/T⌋.
    """
    if not 1 <= num_tasks <= len(order):
        raise ConfigError(f"num_tasks must lie in 1..{len(order)} (the classes), got {num_tasks}")
    return [[int(c) for c in part] for part in np.array_split(np.asarray(order), num_tasks)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split sample indices over clients, per class c, in proportions p_c ~ Dir(α·1_N).

    Client k receives ⌊n_c·Σ_{j≤k} p_{c,j}⌋ − ⌊n_c·Σ_{j<k} p_{c,j}⌋ of class c's n_c (shuffled)
    samples. Small α gives each client few classes, large α nearly the global mix. A client
    left empty then takes one random sample from the (first) largest client, so every client
    can train. Returns one sorted index array per client; together they are disjoint and
    cover 0..len(labels)-1.
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if len(labels) < num_clients:
        raise ConfigError(f"{num_clients} clients cannot share only {len(labels)} samples")
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            shares[client].append(part)
    clients = [np.concatenate(parts).astype(np.int64) for parts in shares]
    for empty in range(num_clients):
        if len(clients[empty]) == 0:
            largest = int(np.argmax([len(held) for held in clients]))
            pick = int(rng.integers(len(clients[largest])))
            clients[empty] = clients[largest][pick : pick + 1]
            clients[largest] = np.delete(clients[largest], pick)
    return [np.sort(held) for held in clients]


def client_lags(num_clients: int, max_lag: int, rng: np.random.Generator) -> list[int]:
    """Each client's delay, in rounds, before it meets a task: uniform on 0..max_lag."""
    if max_lag < 0:
        raise ConfigError(f"max_lag must be >= 0, got {max_lag}")
    return [int(lag) for lag in rng.integers(0, max_lag + 1, size=num_clients)]


@dataclass(frozen=True)
class StreamPosition:
    """Where one client stands in its own task sequence at a global round."""

    task: int | None
    """None: the client has not met its first task yet."""
    round_in_task: int
    """Rounds since this client met `task` (0 on the first)."""


@dataclass(frozen=True, eq=False)
class IncrementalPlan:
    """Tasks, per-task client shares and per-client lags: the whole protocol, fixed by a seed.

    The aggregator's task t spans global rounds [t·R, (t+1)·R). A client with lag L meets task t
    at round t·R + L, so it keeps training on task t−1 during [t·R, t·R + L) and gets R − L
    rounds of the last task. `eq=False`: arrays have no single truth value.
    """

    tasks: list[list[int]]
    """Data-set labels per task."""
    client_indices: list[list[np.ndarray]]
    """[task][client] -> sorted indices into train_x."""
    lags: list[int]
    """Per client, in rounds."""
    rounds_per_task: int

    @classmethod
    def build(
        cls,
        train_y: np.ndarray,
        num_classes: int,
        num_tasks: int,
        num_clients: int,
        alpha: float,
        max_lag: int,
        rounds_per_task: int,
        seed: int,
        lags: Sequence[int] | None = None,
    ) -> IncrementalPlan:
        """Draw the plan: class order, then one Dirichlet split per task, then lags.

        Explicit `lags` override `max_lag` (as in `ProtocolConfig`); either way every lag must
        be < rounds_per_task so that each client meets every task. Partitions and lags come
        from independent child seeds, so fixing the lags leaves the partitions unchanged.
        """
        if rounds_per_task < 1:
            raise ConfigError(f"rounds_per_task must be >= 1, got {rounds_per_task}")
        if len(train_y) and not 0 <= int(train_y.min()) <= int(train_y.max()) < num_classes:
            raise DataError(f"training labels must lie in 0..{num_classes - 1}")
        partition_seed, lag_seed = np.random.SeedSequence(seed).spawn(2)
        if lags is None:
            if max_lag >= rounds_per_task:
                raise ConfigError(
                    f"max_lag ({max_lag}) must be < rounds_per_task ({rounds_per_task})"
                )
            lags = client_lags(num_clients, max_lag, np.random.default_rng(lag_seed))
        if len(lags) != num_clients:
            raise ConfigError(f"lags needs one entry per client ({num_clients}), got {len(lags)}")
        if not all(0 <= lag < rounds_per_task for lag in lags):
            raise ConfigError(f"lags must lie in 0..{rounds_per_task - 1}, got {list(lags)}")
        tasks = split_tasks(class_order(num_classes, seed), num_tasks)
        rng = np.random.default_rng(partition_seed)
        client_indices = []
        for task in tasks:
            task_idx = np.flatnonzero(np.isin(train_y, task))
            shares = dirichlet_partition(train_y[task_idx], num_clients, alpha, rng)
            client_indices.append([task_idx[share] for share in shares])
        return cls(tasks, client_indices, [int(lag) for lag in lags], rounds_per_task)

    @property
    def num_rounds(self) -> int:
        """len(tasks) · rounds_per_task."""
        return len(self.tasks) * self.rounds_per_task

    def task_of_round(self, global_round: int) -> int:
        """The aggregator's task: ⌊global_round / rounds_per_task⌋."""
        self._check_round(global_round)
        return global_round // self.rounds_per_task

    def stream(self, client: int, seed: int) -> ClientStream:
        """Client `client`'s view of the plan; `seed` fixes the order its samples arrive in."""
        if not 0 <= client < len(self.lags):
            raise ValueError(f"client {client} outside 0..{len(self.lags) - 1}")
        return ClientStream(self, client, seed)

    def _check_round(self, global_round: int) -> None:
        if not 0 <= global_round < self.num_rounds:
            raise ValueError(f"round {global_round} outside the plan's 0..{self.num_rounds - 1}")


class ClientStream:
    """One client's local data as a stream.

    Its task t starts at global round t·R + lag; within a task the client's samples (shuffled,
    seeded) arrive in `max(1, R - lag)` equal chunks, one per round, so by its j-th round in the
    task it holds chunks 0..j (capped at the last). R − lag chunks means that even the last
    task, which this client sees for only R − lag rounds, is delivered in full.
    """

    def __init__(self, plan: IncrementalPlan, client: int, seed: int) -> None:
        self.plan = plan
        self.client = client
        self.lag = plan.lags[client]
        num_chunks = max(1, plan.rounds_per_task - self.lag)
        self._arrival: list[np.ndarray] = []
        self._chunk_ends: list[np.ndarray] = []
        for task, per_client in enumerate(plan.client_indices):
            rng = np.random.default_rng([seed, client, task])
            arrival = rng.permutation(per_client[client])
            sizes = [len(chunk) for chunk in np.array_split(arrival, num_chunks)]
            self._arrival.append(arrival)
            self._chunk_ends.append(np.cumsum(sizes))

    def position(self, global_round: int) -> StreamPosition:
        """task = min(⌊(g − L)/R⌋, T − 1) and round_in_task = g − (task·R + L), once g ≥ L."""
        self.plan._check_round(global_round)
        since_first = global_round - self.lag
        if since_first < 0:
            return StreamPosition(task=None, round_in_task=0)
        task = min(since_first // self.plan.rounds_per_task, len(self.plan.tasks) - 1)
        return StreamPosition(task, since_first - task * self.plan.rounds_per_task)

    def available(self, global_round: int) -> np.ndarray:
        """Train indices held now for the current task, in arrival order (empty before any)."""
        pos = self.position(global_round)
        if pos.task is None:
            return np.zeros(0, dtype=np.int64)
        ends = self._chunk_ends[pos.task]
        return self._arrival[pos.task][: ends[min(pos.round_in_task, len(ends) - 1)]]

    def own_rows(self) -> np.ndarray:
        """Every train index this client ever receives, sorted: all a device has to store."""
        return np.unique(np.concatenate([task[self.client] for task in self.plan.client_indices]))


class DeviceStream(Protocol):
    """What a device's learner asks of its data stream: where it stands, and the ids of the
    current task's samples (ids its `SampleTable` resolves)."""

    def position(self, global_round: int) -> StreamPosition: ...

    def available(self, global_round: int) -> np.ndarray: ...


class SampleTable(Protocol):
    """Where a learner's sample ids resolve to model inputs and class names.

    The learner never knows where a sample came from (a fleet partition in memory, a device's
    sample store on disk): it asks for ids and gets the rows that still exist, in id order of
    the request (a store may have evicted some since they were announced).
    """

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class ArraySamples:
    """Samples held in memory: ids are row indices of `x` (images) and `names` (class names)."""

    def __init__(self, x: np.ndarray, names: np.ndarray) -> None:
        self.x = x
        self.names = names

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[ids], self.names[ids]


class OwnRowsStream:
    """A client's stream whose indices point into a compact copy of its own rows only.

    A device keeps `train_x[stream.rows]`, not the whole data set (a Pi has no room for it).
    """

    def __init__(self, stream: ClientStream) -> None:
        self._stream = stream
        self.rows = stream.own_rows()

    def position(self, global_round: int) -> StreamPosition:
        return self._stream.position(global_round)

    def available(self, global_round: int) -> np.ndarray:
        return np.searchsorted(self.rows, self._stream.available(global_round))
