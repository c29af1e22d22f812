"""`fedfmx-edge simulate` over MQTT end to end: embedded broker, aggregator, device processes."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfmx_cli.main import app

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def simulate(tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    results = tmp_path / f"{name}.json"
    outcome = CliRunner().invoke(
        app, ["simulate", "--fleet", str(FLEET), "--results", str(results), *extra]
    )
    assert outcome.exit_code == 0, outcome.output
    return dict(json.loads(results.read_text()))


def test_mqtt_run_on_the_embedded_broker_matches_the_in_process_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the README's `--workdir runs/w`: a relative path works
    workdir = tmp_path / "runs" / "w"
    over_mqtt = simulate(tmp_path, "mqtt", "--workdir", "runs/w")
    in_process = simulate(tmp_path, "inproc", "--transport", "inproc")
    # Same seed, same streams, same devices: the same updates travel, about as large.
    mqtt_rounds = over_mqtt["rounds"]
    inproc_rounds = in_process["rounds"]
    assert isinstance(mqtt_rounds, list) and isinstance(inproc_rounds, list)
    assert [r["updates"] for r in mqtt_rounds] == [r["updates"] for r in inproc_rounds]
    for key, tolerance in (("downlink_bytes", 0.001), ("uplink_bytes", 0.05)):
        # Announcements differ in their deadline digits; updates by training noise.
        ratio = float(over_mqtt[key]) / float(in_process[key])  # type: ignore[arg-type]
        assert abs(ratio - 1) < tolerance, key
    # Learning matches within noise (one torch thread per device process vs two in-process).
    mqtt_aia = float(over_mqtt["average_incremental_accuracy"])  # type: ignore[arg-type]
    inproc_aia = float(in_process["average_incremental_accuracy"])  # type: ignore[arg-type]
    assert abs(mqtt_aia - inproc_aia) < 0.1
    assert over_mqtt["accuracy_matrix"][0] == in_process["accuracy_matrix"][0]  # type: ignore[index]
    # The run leaves what an operator inspects: the state, device states and logs.
    assert (workdir / "aggregator.sqlite").is_file()
    assert sorted(p.name for p in (workdir / "devices").iterdir()) == [
        "device-000", "device-001", "device-002",
    ]  # fmt: skip
    status = CliRunner().invoke(app, ["status", "--fleet", str(workdir / "fleet.yaml")])
    assert status.exit_code == 0, status.output
    assert "round 10/10 (closed)" in status.output and "device-002" in status.output


def test_status_without_state_is_one_line(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(
        app, ["status", "--fleet", str(FLEET), "--state", str(tmp_path / "none.sqlite")]
    )
    assert outcome.exit_code == 2
    assert "no aggregator state" in outcome.output and "Traceback" not in outcome.output


def test_secure_run_uses_mutual_tls_acls_and_signed_models(tmp_path: Path) -> None:
    workdir = tmp_path / "secure"
    secure = simulate(tmp_path, "secure", "--secure", "--workdir", str(workdir))
    plain = simulate(tmp_path, "plain", "--transport", "inproc")
    rounds = secure["rounds"]
    assert isinstance(rounds, list)
    assert [r["updates"] for r in rounds] == [r["updates"] for r in plain["rounds"]]  # type: ignore[union-attr]
    credentials = workdir / "credentials"
    conf = (credentials / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "allow_anonymous false" in conf
    device = (credentials / "device-000.yaml").read_text()
    assert (
        "mqtts://" in device and "device-000.key" in device and "aggregator-signing.pub" in device
    )
