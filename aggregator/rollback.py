"""`fedfmx-edge rollback --to VERSION`: an older model becomes the newest version again.

Devices refuse a manifest that is not newer than the model they run (a replayed old version
must not downgrade a fleet), so a rollback cannot re-announce version V itself: it stores V's
weights, class registry and expert usage as version N+1 (N the newest). The aggregator, next
started on the state, publishes N+1 signed as usual and the following round starts from it.

A version is made by a round, and devices check it (a round r starts from a version <= r), so
a rollback spends one round of the schedule: the open round, closed unmerged (its updates
were trained from the version being replaced and are dropped; devices see the next round and
discard what they hold), or, between rounds, the next one, recorded with no participants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aggregator.state import KEEP_MODEL_PAYLOADS, AggregatorState, StoredModel
from fedfmx.config import FleetConfig
from fedfmx.errors import ConfigError
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model, encode_model
from fedfmx.wire.messages import RoundAnnouncement


@dataclass(frozen=True)
class Rollback:
    restored: int
    """The version whose weights came back."""
    new_version: int
    spent_round: int
    """The round that made the new version (closed without training)."""


def roll_back(state: AggregatorState, fleet: FleetConfig, to_version: int) -> Rollback:
    """Store version `to_version`'s model as the newest version (see the module docstring)."""
    latest = state.latest_model()
    if latest is None:
        raise ConfigError("the state holds no model yet: nothing to roll back")
    if to_version >= latest.version:
        raise ConfigError(f"version {to_version} is not older than the newest, {latest.version}")
    old = state.model(to_version)
    if old is None:
        raise ConfigError(
            f"version {to_version} is not stored any more (the state keeps the newest "
            f"{KEEP_MODEL_PAYLOADS}: {latest.version - KEEP_MODEL_PAYLOADS + 1}..{latest.version})"
        )
    last = state.last_round()
    if last is not None and last.closed is None:
        spent = last.announcement
    else:
        index = 0 if last is None else last.announcement.round + 1
        spent = RoundAnnouncement(
            fleet=fleet.name,
            round=index,
            task=index // fleet.protocol.rounds_per_task,
            model_version=latest.version,
            participants=[],
            deadline_unix=time.time(),
            expert_usage=latest.expert_usage,
            train_backbone=False,
            closed=True,
        )
    if spent.round + 1 >= fleet.protocol.num_rounds:
        raise ConfigError(
            f"a rollback spends a round (here round {spent.round + 1}), and no round of the "
            f"fleet's {fleet.protocol.num_rounds} would be left to start from it"
        )
    header, weights = decode_model(old.payload, max_bytes=MAX_MODEL_BYTES)
    new_version = latest.version + 1
    payload = encode_model(header.model_copy(update={"version": new_version}), weights)
    stored = StoredModel(new_version, payload, old.class_names, old.expert_usage, None)
    state.roll_back(stored, spent)
    return Rollback(to_version, new_version, spent.round)
