"""`fedfmx-edge rollback --to V`: V's weights come back signed as the newest version, one round
of the schedule is spent making it, and the devices of a real fleet (Mosquitto, signed models)
start their next round from it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import FLEET_FILE, device_yaml, run_to_end, small_fleet, write_fleet
from typer.testing import CliRunner

from aggregator.provisioning import signing_key_files
from aggregator.rollback import roll_back
from aggregator.service import ServiceHooks, open_aggregator
from aggregator.state import AggregatorState, RoundTotals, StoredModel
from aggregator.state_lock import exclusive_state
from fedfmx.config import load_fleet
from fedfmx.errors import ConfigError
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model, encode_model
from fedfmx_cli.main import app
from transport import MosquittoBroker


def _weights(state: AggregatorState, version: int) -> dict[str, np.ndarray]:
    stored = state.model(version)
    assert stored is not None
    header, weights = decode_model(stored.payload, max_bytes=MAX_MODEL_BYTES)
    assert header.version == version
    return weights


def test_rollback_republishes_an_old_version_signed_and_devices_train_from_it(
    mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    broker = mosquitto_broker
    private, public = signing_key_files(tmp_path)
    fleet = small_fleet(broker.url, tasks=4, signing_key=str(private))
    fleet_file = write_fleet(tmp_path, fleet)
    state_path = tmp_path / "aggregator.sqlite"
    configs = [device_yaml(tmp_path, fleet_file, i, broker.url, public) for i in range(2)]

    def run(stop_after_round: int | None) -> None:
        stop = threading.Event() if stop_after_round is not None else None

        def on_round(totals: RoundTotals) -> None:
            if stop is not None and totals.round == stop_after_round:
                stop.set()

        aggregator = open_aggregator(fleet, state_path, ServiceHooks(on_round=on_round))
        aggregator.start()
        try:
            run_to_end(aggregator, configs, stop)
        finally:
            aggregator.session.close()
            aggregator.state.close()

    run(stop_after_round=1)  # rounds 1 and 2 of 4: versions 0, 1, 2; then the operator stops
    result = CliRunner().invoke(
        app, ["rollback", "--to", "1", "--fleet", str(fleet_file), "--state", str(state_path)]
    )
    assert result.exit_code == 0, result.output
    assert "version 3 now holds the weights of version 1" in result.output
    assert "round 3 closed without training" in result.output
    state = AggregatorState(state_path, fleet.name)
    restored, original = _weights(state, 3), _weights(state, 1)
    assert restored.keys() == original.keys()
    assert all(np.array_equal(restored[name], original[name]) for name in original)
    state.close()

    run(stop_after_round=None)  # round 4 starts from version 3: devices verify and train on it
    state = AggregatorState(state_path, fleet.name)
    last = state.last_round()
    assert last is not None and last.announcement.round == 3
    assert last.announcement.model_version == 3
    assert [t.updates for t in state.round_totals()] == [2, 2, 0, 2]
    assert all(d.status.model_version == 3 for d in state.devices())
    latest = state.latest_model()
    assert latest is not None and latest.version == 4
    state.close()


def test_rollback_spends_the_open_round_or_the_next_and_refuses_bad_versions(
    tmp_path: Path,
) -> None:
    fleet = load_fleet(FLEET_FILE)  # 5 tasks x 2 rounds
    aggregator = open_aggregator(fleet, tmp_path / "state.sqlite", ServiceHooks())  # version 0
    state = aggregator.state
    try:
        with pytest.raises(ConfigError, match="not older than the newest"):
            roll_back(state, fleet, 0)
        v0 = state.latest_model()
        assert v0 is not None
        header, weights = decode_model(v0.payload, max_bytes=MAX_MODEL_BYTES)
        v1 = encode_model(header.model_copy(update={"version": 1}), weights)
        state.open_round(aggregator.keeper.open_round(0, ["device-000"], deadline_unix=1e12))
        state.close_round(0, StoredModel(1, v1, v0.class_names, v0.expert_usage, None))
        state.open_round(aggregator.keeper.open_round(1, ["device-000"], deadline_unix=1e12))
        state.store_update(1, "device-000", b"update", "0" * 64, 10, 0.5)

        done = roll_back(state, fleet, 0)  # round 1 is open: it is spent
        assert (done.restored, done.new_version, done.spent_round) == (0, 2, 1)
        last = state.last_round()
        assert last is not None and last.closed is not None and last.merged_version == 2
        assert state.update_digests(1) == []  # no receipt of a dropped update is re-sent

        done = roll_back(state, fleet, 1)  # between rounds: round 2 is spent, empty
        assert (done.new_version, done.spent_round) == (3, 2)
        last = state.last_round()
        assert last is not None and last.announcement.round == 2
        assert last.announcement.participants == [] and last.merged_version == 3
        # Devices' rule holds: the next round (3) starts from a version made by round <= 2.
        assert done.new_version <= last.announcement.round + 1
        with pytest.raises(ConfigError, match="not stored"):
            roll_back(state, fleet, -1)
    finally:
        aggregator.session.close()
        state.close()


def test_rollback_refuses_when_no_round_would_start_from_it(tmp_path: Path) -> None:
    fleet = small_fleet("mqtt://127.0.0.1:1", tasks=1)  # one round in all
    aggregator = open_aggregator(fleet, tmp_path / "state.sqlite", ServiceHooks())
    state = aggregator.state
    try:
        v0 = state.latest_model()
        assert v0 is not None
        state.open_round(aggregator.keeper.open_round(0, ["device-000"], deadline_unix=1e12))
        state.close_round(0, StoredModel(1, v0.payload, v0.class_names, v0.expert_usage, None))
        with pytest.raises(ConfigError, match="no round of the fleet's 1 would be left"):
            roll_back(state, fleet, 0)
    finally:
        aggregator.session.close()
        state.close()


def test_rollback_refuses_while_serve_holds_the_state(tmp_path: Path) -> None:
    state_path = tmp_path / "state.sqlite"
    state_path.touch()
    with exclusive_state(state_path, "serving"):
        result = CliRunner().invoke(app, ["rollback", "--to", "0", "--state", str(state_path)])
    assert result.exit_code == 2
    assert "in use by another process" in result.output
