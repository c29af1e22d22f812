"""`fedfmx-edge rollback --to VERSION`: an older model becomes the newest version again.

Devices refuse a manifest that is not newer than the model they run (a replayed old version
must not downgrade a fleet), so a rollback cannot re-announce version V itself: it stores V's
weights, class registry and expert usage as version N+1 (N the newest). The aggregator, next
started on the state, publishes N+1 signed as usual and the following round starts from it.
A round still open was trained from the version being replaced: it is closed unmerged and its
updates are dropped (devices see the next round and discard what they hold).
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.state import KEEP_MODEL_PAYLOADS, AggregatorState, StoredModel
from fedfmx.codec import MAX_MODEL_BYTES, decode_model, encode_model
from fedfmx.errors import ConfigError


@dataclass(frozen=True)
class Rollback:
    restored: int
    """The version whose weights came back."""
    new_version: int
    abandoned_round: int | None


def roll_back(state: AggregatorState, to_version: int) -> Rollback:
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
    header, weights = decode_model(old.payload, max_bytes=MAX_MODEL_BYTES)
    new_version = latest.version + 1
    payload = encode_model(header.model_copy(update={"version": new_version}), weights)
    abandoned = state.roll_back(
        StoredModel(new_version, payload, old.class_names, old.expert_usage, None)
    )
    return Rollback(to_version, new_version, abandoned)
