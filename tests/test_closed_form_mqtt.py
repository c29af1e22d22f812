"""`ridge` and `fedavg_replay_wa` through `fedfmx-edge simulate`, in-process and over MQTT."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from export.checkpoint import load_checkpoint
from fedfmx_cli.main import app

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def simulate(
    tmp_path: Path, method: str, name: str, *extra: str, send_factor: bool = True
) -> dict[str, object]:
    document = yaml.safe_load(FLEET.read_text())
    document["analytic"] = {"send_factor": send_factor}
    document["model"]["random_features"] = 128
    # closed-form rounds take milliseconds, so a device's statuses come faster than the
    # default per-device rate limit allows (it guards against floods, not quick devices)
    document["service"] = {"rate_limit": {"messages_per_s": 100.0, "burst": 500}}
    # plain float32 on the uplink: the same updates have the same size in both transports
    # (zstd's would vary with the last bits that one or two torch threads give the sums)
    document["codec"] = {"quantize": "none"}
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(document))
    results = tmp_path / f"{name}.json"
    outcome = CliRunner().invoke(
        app,
        ["simulate", "--fleet", str(fleet), "--method", method, "--results", str(results), *extra],
    )
    assert outcome.exit_code == 0, outcome.output
    return dict(json.loads(results.read_text()))


def test_ridge_over_mqtt_gives_the_in_process_head(tmp_path: Path) -> None:
    over_mqtt = simulate(tmp_path, "ridge", "mqtt", "--workdir", str(tmp_path / "run"))
    in_process = simulate(tmp_path, "ridge", "inproc", "--transport", "inproc")
    # sums are exact and order-free: the same statistics give the same head, to the digit
    assert over_mqtt["accuracy_matrix"] == in_process["accuracy_matrix"]
    assert over_mqtt["uplink_bytes"] == in_process["uplink_bytes"]
    assert float(over_mqtt["final_accuracy"]) > 0.8  # type: ignore[arg-type]
    # a device sends only rows it has not sent before: rounds without new rows send nothing
    rounds = in_process["rounds"]
    assert isinstance(rounds, list)
    assert sum(r["updates"] for r in rounds) < 3 * len(rounds)


def test_devices_sending_factors_over_mqtt_give_the_triangle_runs_head(tmp_path: Path) -> None:
    """Devices send a round's Gram matrix as its exact factor when that is smaller (at d = 128,
    rounds under 65 rows): over Mosquitto, the fleet's head is the head of an in-process run
    whose devices send only triangles, for fewer bytes."""
    factors = tmp_path / "factors.safetensors"
    triangles = tmp_path / "triangles.safetensors"
    work = str(tmp_path / "run")
    over_mqtt = simulate(
        tmp_path, "ridge", "m", "--workdir", work, "--checkpoint-out", str(factors)
    )
    reference = simulate(
        tmp_path,
        "ridge",
        "t",
        "--transport",
        "inproc",
        "--checkpoint-out",
        str(triangles),
        send_factor=False,
    )
    assert int(over_mqtt["uplink_bytes"]) < 0.8 * int(reference["uplink_bytes"])  # type: ignore[call-overload]
    head, expected = (load_checkpoint(p).weights["head.weight"] for p in (factors, triangles))
    np.testing.assert_allclose(head, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert over_mqtt["accuracy_matrix"] == reference["accuracy_matrix"]


@pytest.mark.parametrize("transport", ["inproc", "mqtt"])
def test_replay_with_weight_aligning_runs_end_to_end(tmp_path: Path, transport: str) -> None:
    extra = (
        ["--transport", "inproc"] if transport == "inproc" else ["--workdir", str(tmp_path / "w")]
    )
    result = simulate(tmp_path, "fedavg_replay_wa", transport, *extra)
    assert result["method"] == "fedavg_replay_wa"
    assert len(result["accuracy_matrix"]) == 5  # type: ignore[arg-type]
    assert float(result["final_accuracy"]) > 0.3  # type: ignore[arg-type]
