"""The aggregator's SQLite state: one transaction per event, and it refuses to mix fleets."""

import hashlib
from pathlib import Path

import pytest

from aggregator.state import (
    KEEP_MODEL_PAYLOADS,
    AggregatorState,
    Evaluation,
    StoredModel,
    UpdateRow,
)
from fedfmx.errors import ConfigError
from fedfmx.wire.messages import DeviceStatus, Hello, RoundAnnouncement


def announcement(round_index: int, version: int, participants: list[str]) -> RoundAnnouncement:
    return RoundAnnouncement(
        fleet="city",
        round=round_index,
        task=0,
        model_version=version,
        participants=participants,
        deadline_unix=100.0,
        expert_usage=[0.5, 0.5],
        train_backbone=True,
    )


def model(version: int) -> StoredModel:
    return StoredModel(version, bytes([version]) * 10, ["a"], [0.5, 0.5], None)


def test_a_round_resumes_with_its_stored_updates_and_closes_with_its_model(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    state = AggregatorState(path, "city")
    state.save_first_model(model(0))
    state.open_round(announcement(0, 0, ["d1", "d2", "d3"]))
    digest = hashlib.sha256(b"update-1").hexdigest()
    assert state.store_update(0, "d1", b"update-1", digest, 10, 0.5)
    assert not state.store_update(0, "d1", b"update-1-again", digest, 10, 0.5)  # counted once
    state.record_skip(0, "d3")
    state.close()

    reopened = AggregatorState(path, "city")  # as after a crash
    last = reopened.last_round()
    assert last is not None and last.closed is None
    assert [(u.device_id, u.payload) for u in reopened.round_updates(0)] == [("d1", b"update-1")]
    assert reopened.answered(0) == {"d1", "d3"}

    reopened.close_round(0, model(1))
    closed = reopened.last_round()
    assert closed is not None and closed.merged_version == 1
    assert reopened.round_updates(0) == []  # payloads dropped once merged
    assert reopened.update_digests(0) == [("d1", digest)]  # kept: receipts can be re-sent
    latest = reopened.latest_model()
    assert latest is not None and latest.version == 1
    totals = reopened.round_totals()[0]
    assert (totals.updates, totals.skips, totals.uplink_bytes) == (1, 1, len(b"update-1"))
    assert totals.downlink_bytes > 3 * len(model(0).payload)

    reopened.mark_published(0, 1, 10_000)  # devices are sent another form of version 0
    assert reopened.round_totals()[0].downlink_bytes > 3 * 10_000
    reopened.mark_retired(0)
    assert reopened.published_chunks(0) == 0
    assert reopened.round_totals()[0].downlink_bytes > 3 * 10_000


def test_old_model_payloads_are_pruned_but_their_rows_stay(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path / "state.sqlite", "city")
    state.save_first_model(model(0))
    for version in range(1, 6):
        state.open_round(announcement(version - 1, version - 1, ["d1"]))
        state.close_round(version - 1, model(version))
    latest = state.latest_model()
    assert latest is not None and latest.version == 5
    assert len(state.round_totals()) == 5


def test_a_district_keeps_the_payloads_of_the_newest_versions_it_received(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path / "district.sqlite", "city")
    for version in range(6):
        state.save_received_model(model(version))
    kept = [v for v in range(6) if state.model(v) is not None]
    assert kept == list(range(6 - KEEP_MODEL_PAYLOADS, 6))
    assert state.class_names(0) == ["a"]  # the row stays, only its payload is dropped


def test_devices_register_once_and_keep_their_latest_status(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path / "state.sqlite", "city")
    hello = Hello(
        fleet="city",
        device_id="d1",
        profile="raspberry-pi-4",
        classes_met=["cat"],
        sample_counts={"cat": 3},
    )
    assert state.register(hello)
    assert not state.register(hello)
    assert not state.record_status(DeviceStatus(device_id="ghost", state="online"))
    assert state.record_status(DeviceStatus(device_id="d1", state="offline", peak_rss_mb=250.0))
    (row,) = state.devices()
    assert (row.status.state, row.status.peak_rss_mb, row.classes_met) == (
        "offline",
        250.0,
        ["cat"],
    )


def test_evaluations_and_rejections_are_kept(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path / "state.sqlite", "city")
    state.save_evaluation(Evaluation(0, 3, [0.9], 0.9))
    state.record_rejection(2, "d9", "norm beyond bound")
    assert state.evaluations() == [Evaluation(0, 3, [0.9], 0.9)]
    assert state.rejections() == [(2, "d9", "norm beyond bound")]


def test_a_state_file_of_another_fleet_or_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    AggregatorState(path, "city").close()
    with pytest.raises(ConfigError, match="holds fleet 'city'"):
        AggregatorState(path, "harbour")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable aggregator state"):
        AggregatorState(garbage, "city")


def test_a_buffered_merge_drops_exactly_the_payloads_it_folded(tmp_path: Path) -> None:
    """Buffered mode: an update is keyed by the round it was trained in, folded by the open
    buffer; closing buffer 1 drops the payloads it folded (a stale one of round 0 included)
    and no other, so a restart re-folds exactly what no version holds yet."""
    state = AggregatorState(tmp_path / "state.sqlite", "city")
    state.save_first_model(model(0))
    state.open_round(announcement(0, 0, ["d1", "d2"]))
    assert state.store_updates([UpdateRow(0, "d1", b"u-d1-0", "a" * 64, 10, 0.5, buffer=0)])
    state.close_round(0, model(1))
    state.open_round(announcement(1, 1, ["d1", "d2"]))
    stale = UpdateRow(0, "d2", b"u-d2-0", "b" * 64, 10, 0.5, buffer=1)
    fresh = UpdateRow(1, "d1", b"u-d1-1", "c" * 64, 10, 0.5, buffer=1)
    assert state.store_updates([stale, fresh]) == [True, True]
    assert state.store_updates([stale]) == [False]  # a re-send: stored once, folded once
    assert state.has_update(0, "d2") and not state.has_update(1, "d2")
    assert [u.payload for u in state.buffered_updates(1)] == [b"u-d2-0", b"u-d1-1"]
    assert state.buffered_updates(0) == []
    state.close_round(1, model(2))
    assert state.buffered_updates(1) == []
    assert [d for d, _ in state.buffered_digests(1)] == ["d2", "d1"]  # receipts can be re-sent
