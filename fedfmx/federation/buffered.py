"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022), numpy only.

With no round barrier a device trains from the newest version it holds and sends its delta
when it is done; by then the fleet may have moved on. Each update is folded against the
version it was trained from, with its *staleness*

    τ_k = v_now − v_base,k        (versions made since the one it trained from),

and its delta scaled by the staleness weight

    s(τ) = 1 / √(1 + τ)           (FedBuff's polynomial scaling, exponent ½),

so that every `K` updates the merged move is

    Δ = Σ_k w_k · s(τ_k) · δ_k / Σ_k w_k

with `w_k` the synchronous merge's weights (Fisher per expert coordinate, samples for router
and backbone, class counts for head rows, `fedfmx.federation.aggregation`): a fresh update counts
fully, a stale one is shrunk toward "no move" rather than merely outweighed, so a buffer of stale
updates moves the model less (FedBuff's `(1/K) Σ s(τ_k) Δ_k`, with our weights). An update
staler than the bound is refused with its reason.

A head row for a class that was new to the device's base version is a row learnt from zero;
when the class was registered since, the row is rebased onto the current one
(`δ ← row − W_now[c]`) before it is weighted, so the registry works as in synchronous rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from fedfmx.config import FleetConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import HEAD_ROWS, HEAD_WEIGHT, Arrays, is_delta
from fedfmx.federation.rounds import GlobalModel, RoundKeeper
from fedfmx.wire.messages import UpdateHeader

RegistryOf = Callable[[int], list[str] | None]
"""Model version -> its class registry (None when the version is unknown)."""


def staleness_weight(staleness: int) -> float:
    """`s(τ) = 1/√(1+τ)`: 1 for an update trained from the newest version."""
    return 1.0 / math.sqrt(1.0 + staleness)


def rebase_new_rows(
    header: UpdateHeader,
    tensors: Mapping[str, np.ndarray],
    base_registry: list[str],
    model: GlobalModel,
) -> Arrays:
    """Head rows of classes unknown at the base version but registered now, as deltas
    against the current rows (`row − W_now[c]`); every other tensor as it came."""
    rows = tensors.get(HEAD_ROWS)
    registered = {name: i for i, name in enumerate(model.class_names)}
    if rows is None:
        return dict(tensors)
    rebased = np.array(rows, dtype=np.float32)
    head = model.weights[HEAD_WEIGHT]
    for index, name in enumerate(header.head_classes):
        if name not in base_registry and name in registered:
            rebased[index] = rows[index] - head[registered[name]]
    return {**tensors, HEAD_ROWS: rebased}


def scale_deltas(tensors: Mapping[str, np.ndarray], factor: float) -> Arrays:
    """The moves (experts, router, backbone, head rows) times `factor`; Fisher summaries and
    statistics are weights, not moves, and stay as they are."""
    return {
        name: (value * np.float32(factor) if is_delta(name) else value)
        for name, value in tensors.items()
    }


class BufferKeeper(RoundKeeper):
    """`RoundKeeper` for `service.mode: buffered`: the open round is the buffer; it takes
    updates trained from any of the last `max_staleness` versions, weighted by `s(τ)`."""

    def __init__(self, fleet: FleetConfig, model: GlobalModel, registry_of: RegistryOf) -> None:
        super().__init__(fleet, model)
        self.registry_of = registry_of

    def admit(self, payload: bytes, sender: str | None) -> tuple[UpdateHeader, Arrays, int]:
        """Decode and validate an update for the open buffer; (header, tensors, staleness τ).

        ProtocolError with the reason when it is malformed, from the future, or staler than
        `service.buffered.max_staleness` (a message that starts with "stale").
        """
        if self.current is None:
            raise ProtocolError("no round is open")
        header, tensors = self.decode(payload, sender)
        newest = self.model.version
        if header.base_version > newest or header.round > self.current.announcement.round:
            raise ProtocolError(
                f"update for round {header.round} / version {header.base_version}, "
                f"open is round {self.current.announcement.round} / version {newest}"
            )
        staleness = newest - header.base_version
        bound = self.fleet.service.buffered.max_staleness
        if staleness > bound:
            raise ProtocolError(
                f"stale: trained from version {header.base_version}, {staleness} versions "
                f"behind the newest ({newest}); service.buffered.max_staleness is {bound}"
            )
        if header.includes_statistics:
            raise ProtocolError("buffered mode merges deltas, not closed-form statistics")
        return header, tensors, staleness

    def fold_stale(self, header: UpdateHeader, tensors: Arrays, staleness: int) -> None:
        """Fold an admitted update into the buffer, rebased and weighted by `s(τ)`."""
        base_registry = self.registry_of(header.base_version)
        if base_registry is None:
            raise ProtocolError(f"version {header.base_version} is unknown here")
        if staleness:
            tensors = rebase_new_rows(header, tensors, base_registry, self.model)
            tensors = scale_deltas(tensors, staleness_weight(staleness))
        self.fold(header, tensors)
