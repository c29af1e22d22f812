"""End to end on digits: the in-process engine and the `simulate` command."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfmx.config import load_fleet
from fedfmx.data.datasets import load_digits
from fedfmx.federation.simulation import holdout_validation, load_fleet_dataset, run_simulation
from fedfmx_cli.main import app

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def test_simulate_cli_writes_results_and_plot(tmp_path: Path) -> None:
    results, plot = tmp_path / "r.json", tmp_path / "r.png"
    outcome = CliRunner().invoke(
        app,
        [
            "simulate",
            "--transport",
            "inproc",
            "--fleet",
            str(FLEET),
            "--results",
            str(results),
            "--plot",
            str(plot),
        ],
    )
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(results.read_text())
    for key in (
        "final_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "accuracy_matrix",
        "uplink_bytes",
        "downlink_bytes",
        "method",
        "config",
    ):
        assert key in data
    matrix = data["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3, 4, 5]  # a row per task, lower triangle
    assert data["method"] == "fedfmx"
    assert data["uplink_bytes"] > 0 and data["downlink_bytes"] > data["uplink_bytes"] / 10
    # 10 classes: a model that forgets all but the last task scores at most 0.2
    assert data["final_accuracy"] > 0.4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_rejects_bad_fleet_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("protocol: {num_clients: 0}\n")
    outcome = CliRunner().invoke(app, ["simulate", "--transport", "inproc", "--fleet", str(bad)])
    assert outcome.exit_code == 2
    assert "protocol.num_clients" in outcome.output
    assert "Traceback" not in outcome.output


def test_missing_data_path_is_one_line(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(
        app, ["simulate", "--transport", "inproc", "--data-path", str(tmp_path / "nowhere")]
    )
    assert outcome.exit_code == 2
    assert "nowhere" in outcome.output
    assert "Traceback" not in outcome.output


def test_same_seed_gives_the_same_run() -> None:
    fleet = load_fleet(FLEET).model_copy(update={"method": "fedavg"})
    dataset = load_fleet_dataset(fleet)
    first = run_simulation(fleet, dataset)
    second = run_simulation(fleet, dataset)
    assert first.accuracy_matrix == second.accuracy_matrix
    assert first.uplink_bytes == second.uplink_bytes


@pytest.mark.parametrize("method", ["joint", "fedavg_replay"])
def test_upper_bound_and_replay_keep_old_classes(method: str) -> None:
    fleet = load_fleet(FLEET).model_copy(update={"method": method})
    result = run_simulation(fleet, load_fleet_dataset(fleet))
    assert result.final_accuracy > 0.6


def test_validation_split_never_reads_the_test_set() -> None:
    dataset = load_digits()
    split = holdout_validation(dataset, 0.25, seed=0)
    assert len(split.train_y) + len(split.test_y) == len(dataset.train_y)
    # every validation image comes from the training images, none from the test images
    train_rows = {row.tobytes() for row in dataset.train_x}
    assert all(row.tobytes() in train_rows for row in split.test_x)
    counts = np.bincount(split.test_y)
    assert counts.min() >= int(0.25 * np.bincount(dataset.train_y).min())
