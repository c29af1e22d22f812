"""`service.mode: buffered` over a real Mosquitto: no barrier, staleness, crashes.

The tiny digits fleet of `test_mqtt_federation` (3 devices, 2 tasks x 2 versions) with a
buffer of 2 updates: versions come from whichever devices answer first, a slow device's
updates are folded with their staleness weight, a too-stale one is refused with its reason,
and an aggregator killed mid-buffer comes back with every accepted update counted once.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import yaml
from test_mqtt_federation import (
    Fleet,
    HandDevice,
    SecureBroker,
    _run_serving_lives,
    assert_devices_agree,
    make_fleet,
    secure_broker,
    tiny_fleet,
    wait_for,
)

from aggregator.monitoring import rejection_bucket
from aggregator.state import AggregatorState
from fedfmx.config import FleetConfig
from transport import MosquittoBroker

__all__ = ["make_fleet", "secure_broker"]  # the fixtures, re-exported for pytest


def buffered_fleet(url: str, max_lag: int = 1, **buffered: object) -> FleetConfig:
    return tiny_fleet(
        url,
        max_lag=max_lag,
        mode="buffered",
        buffered={"size": 2, "max_staleness": 4, **buffered},
    )


def folds(state_path: Path) -> list[tuple[int, str, int]]:
    """(trained round, device, buffer) of every stored update, from the state file itself."""
    with sqlite3.connect(state_path) as db:
        rows = db.execute(
            "SELECT u.round, u.device_id, f.buffer FROM updates u "
            "JOIN buffered_folds f ON u.round = f.round AND u.device_id = f.device_id"
        ).fetchall()
        (stored,) = db.execute("SELECT COUNT(*) FROM updates").fetchone()
    assert stored == len(rows), "an update is stored without the buffer that folds it"
    return [(int(r), str(d), int(b)) for r, d, b in rows]


def assert_every_buffer_closed(state: AggregatorState, fleet: FleetConfig) -> None:
    """Every scheduled buffer closed, each one that folded an update with a version."""
    rounds = state.round_totals()
    assert len(rounds) == fleet.protocol.num_rounds
    assert all(t.closed is not None for t in rounds)
    merged = {b for _, _, b in folds(state.path)}
    latest = state.latest_model()
    assert latest is not None and latest.version == len(merged)


def test_a_slow_device_does_not_hold_versions_back_and_its_updates_still_count(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    config = buffered_fleet(mosquitto_broker.url, max_lag=0, max_staleness=10)
    # Rounds long enough that 4x is later than the aggregator's 0.1 s tick on an idle machine
    # too (one epoch of ci-digits trains in milliseconds: all three would land in one buffer).
    config = config.model_copy(
        update={
            "protocol": config.protocol.model_copy(update={"rounds_per_task": 3}),
            "training": config.training.model_copy(update={"local_epochs": 30}),
        }
    )
    fleet = make_fleet(config)
    slow = fleet.device_config(2)
    document = yaml.safe_load(slow.read_text())
    document["data"]["slowdown"] = 4.0
    slow.write_text(yaml.safe_dump(document))
    fleet.start_aggregator()
    fleet.join([fleet.start_device(i) for i in range(3)])
    fleet.join()
    state = AggregatorState(fleet.state_path, config.name)
    assert_every_buffer_closed(state, config)
    # Trained from version r and folded into buffer b > r: versions r..b-1 were made
    # without waiting for the slow device, and its update still counted.
    slow = [(r, b) for r, d, b in folds(fleet.state_path) if d == "device-002"]
    assert any(buffer > trained for trained, buffer in slow), slow
    assert_devices_agree(state, fleet)
    # Only updates that arrived after the schedule's last version are refused.
    assert {why for _, _, why in state.rejections()} <= {"no round is open"}


def test_a_too_stale_update_is_refused_with_its_reason_and_a_stale_one_within_counts(
    mosquitto_broker: MosquittoBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """Three devices train from version 0; with one update per version and a bound of 1,
    the first makes version 1, the second (τ = 1) makes version 2, the third (τ = 2) is
    refused, with a receipt that says why and a rejection counted as `stale`."""
    fleet = make_fleet(buffered_fleet(mosquitto_broker.url, max_lag=0, size=1, max_staleness=1))
    aggregator = fleet.start_aggregator()
    hands = [HandDevice(fleet, index) for index in range(3)]
    try:
        for hand in hands:
            hand.hello()
        updates = [hand.update_for_round(0) for hand in hands]
        for version, (hand, update) in enumerate(zip(hands, updates, strict=True)):
            hand.send(update)
            wait_for(lambda h=hand: len(h.receipts) == 1)  # type: ignore[misc]
            if version < 2:
                wait_for(lambda v=version: aggregator.keeper.model.version == v + 1)  # type: ignore[misc]
        assert [hand.receipts[0].accepted for hand in hands] == [True, True, False]
        reason = hands[2].receipts[0].reason
        assert reason.startswith("stale: trained from version 0, 2 versions behind")
        assert rejection_bucket(reason) == "stale"
        assert [(d, why) for _, d, why in aggregator.state.rejections()] == [("device-002", reason)]
        assert aggregator.keeper.model.version == 2
        assert sorted(d for _, d, _ in folds(fleet.state_path)) == ["device-000", "device-001"]
    finally:
        for hand in hands:
            hand.session.close()


def _merged_per_buffer(log: Path) -> dict[int, int]:
    """Updates each `buffer_merged` event folded, from the aggregator's log (every life)."""
    merged: dict[int, int] = {}
    for match in re.finditer(r"buffer_merged round=(\d+) updates=(\d+)", log.read_text()):
        buffer, updates = int(match[1]), int(match[2])
        assert buffer not in merged, f"buffer {buffer} merged twice"
        merged[buffer] = updates
    return merged


def test_an_aggregator_killed_mid_buffer_counts_every_accepted_update_once(
    secure_broker: SecureBroker, make_fleet: Callable[..., Fleet]
) -> None:
    """On TLS + ACLs, `serve` is SIGKILLed with an update stored but not receipted, then with
    a merge computed but not stored: every merge folded exactly the updates the state file
    says it holds, and what each device counts as accepted is what was stored from it."""
    config = buffered_fleet(secure_broker.url)
    fleet = make_fleet(config, credentials=secure_broker.credentials)
    codes = _run_serving_lives(fleet, ("update_stored:3", "round_merged:2"), lambda life: None)
    assert codes[:2] == [-9, -9] and codes[2] == 0
    state = AggregatorState(fleet.state_path, config.name)
    assert_every_buffer_closed(state, config)
    folded = folds(fleet.state_path)
    stored = {b: sum(1 for _, _, buffer in folded if buffer == b) for b in range(4)}
    assert _merged_per_buffer(fleet.tmp / "aggregator.log") == stored
    assert_devices_agree(state, fleet)
