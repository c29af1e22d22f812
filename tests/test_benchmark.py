"""The FCIL benchmark grid runs through the CLI on digits and writes its JSON and PNG."""

import json
from pathlib import Path

from typer.testing import CliRunner

from fedfmx_cli.main import app

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def test_reduced_grid_smoke_on_digits(tmp_path: Path) -> None:
    args = ["bench", "fcil", "--fleet", str(FLEET), "--out", str(tmp_path), "--name", "smoke"]
    args += [
        "--method",
        "fedfmx",
        "--method",
        "fedavg",
        "--method",
        "joint",
        "--seed",
        "0",
        "--seed",
        "1",
    ]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    document = json.loads((tmp_path / "smoke.json").read_text())
    cells = document["results"]["alpha=0.5,lag=1"]
    assert set(cells) == {"fedfmx", "fedavg", "joint"}
    for cell in cells.values():
        assert len(cell["runs"]) == 2
        assert 0.0 <= cell["final_accuracy"]["mean"] <= 1.0
        assert cell["final_accuracy"]["std"] >= 0.0
    assert cells["joint"]["uplink_bytes_per_client_round"]["mean"] == 0.0
    assert cells["fedavg"]["uplink_bytes_per_client_round"]["mean"] > 0.0
    assert (tmp_path / "smoke.png").read_bytes()[:4] == b"\x89PNG"
    assert "| fedfmx |" in outcome.output


def test_unknown_method_is_one_line(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["bench", "fcil", "--method", "sgd", "--out", str(tmp_path)])
    assert outcome.exit_code == 2
    assert "unknown method 'sgd'" in outcome.output
