"""`fedfmx-edge simulate --districts K`: real devices training, K bridged Mosquitto districts,
the root; with the mean merge it ends with the flat run's model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from export.checkpoint import load_checkpoint
from fedfmx_cli.main import app
from transport import find_mosquitto

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def short_fleet(tmp_path: Path, method: str = "fedfmx") -> Path:
    """ci-digits with 2 tasks (4 rounds): seconds per run."""
    document = yaml.safe_load(FLEET.read_text())
    document["protocol"]["num_tasks"] = 2
    document["method"] = method
    if method == "fedfmx_cf":  # a 256-wide head: 64 shared + 3 banks of 4 filters x 4x4 cells
        document["model"] |= {"shared_features": 64, "expert_filters": 4}
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def simulate(fleet: Path, checkpoint: Path, *extra: str) -> None:
    outcome = CliRunner().invoke(
        app, ["simulate", "--fleet", str(fleet), "--checkpoint-out", str(checkpoint), *extra]
    )
    assert outcome.exit_code == 0, outcome.output


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
@pytest.mark.parametrize("method", ["fedfmx", "fedfmx_cf"])  # SGD updates; closed-form statistics
def test_two_districts_end_with_the_flat_runs_model(tmp_path: Path, method: str) -> None:
    fleet = short_fleet(tmp_path, method)
    simulate(fleet, tmp_path / "flat.ckpt", "--broker", "mosquitto")
    workdir = tmp_path / "tree"
    simulate(fleet, tmp_path / "tree.ckpt", "--districts", "2", "--workdir", str(workdir))
    flat, tree = load_checkpoint(tmp_path / "flat.ckpt"), load_checkpoint(tmp_path / "tree.ckpt")
    assert tree.header.version == flat.header.version == 4
    assert tree.header.class_names == flat.header.class_names
    for name, value in flat.weights.items():
        # float64 sums added in another order, rounded to float32: at most a few ulps apart
        np.testing.assert_allclose(tree.weights[name], value, rtol=1e-5, atol=1e-7)
    # the tree really ran: two districts, each device behind its own district's broker
    device = (workdir / "tree" / "district-01" / "device-001.yaml").read_text()
    district = (workdir / "tree" / "district-01" / "district-01.yaml").read_text()
    port = yaml.safe_load(district)["broker"]["url"].rsplit(":", 1)[1]
    assert f":{port}" in device and "district-01" in device
    assert "partial_sent" in (workdir / "logs" / "district-00.log").read_text()


def test_more_districts_than_devices_is_one_line(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(
        app, ["simulate", "--fleet", str(short_fleet(tmp_path)), "--districts", "9"]
    )
    assert outcome.exit_code != 0
    assert "--districts 9" in outcome.output and "Traceback" not in outcome.output


def test_districts_with_an_external_broker_is_one_line(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(
        app,
        ["simulate", "--fleet", str(FLEET), "--districts", "2", "--broker-url", "mqtt://x:1"],
    )
    assert outcome.exit_code != 0
    assert "--districts starts its own brokers" in outcome.output
    assert "Traceback" not in outcome.output
