"""`fedfmx-edge doctor` on a device: a real Mosquitto with mutual TLS and a running aggregator
(clock answered), and a device whose broker is not there (non-zero exit, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.clock import clock_answer
from aggregator.provisioning import ProvisionedFleet, provision
from aggregator.service import ServiceHooks, open_aggregator
from edge_client.doctor import Finding, diagnose
from fedfmx.config import load_fleet
from fedfmx.wire.messages import ClockProbe
from transport import MosquittoBroker, find_mosquitto

FLEET_FILE = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


@pytest.fixture
def provisioned(tmp_path: Path) -> Iterator[tuple[ProvisionedFleet, MosquittoBroker]]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: run `sudo apt-get install -y mosquitto`")
    fleet = load_fleet(FLEET_FILE)
    credentials = provision(fleet.name, ["device-000"], tmp_path / "fleet")
    broker = MosquittoBroker(allow_anonymous=False, extra_config=credentials.broker_settings())
    broker.start()
    try:
        yield credentials, broker
    finally:
        broker.close()


def _device_yaml(credentials: ProvisionedFleet, url: str) -> Path:
    _, configs = credentials.write_configs(load_fleet(FLEET_FILE), url, profile="generic-x86")
    return configs[0]


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def _diagnose_with_aggregator(
    credentials: ProvisionedFleet, config: Path, tmp_path: Path
) -> dict[str, Finding]:
    """The doctor's findings while the fleet's aggregator runs (it answers the clock)."""
    fleet = load_fleet(credentials.directory / "fleet.yaml")
    aggregator = open_aggregator(fleet, tmp_path / "aggregator.sqlite", ServiceHooks())
    aggregator.start()
    try:
        return _by_check(diagnose(config))
    finally:
        aggregator.session.close()
        aggregator.state.close()


def test_doctor_passes_on_a_provisioned_device_and_measures_the_aggregators_clock(
    provisioned: tuple[ProvisionedFleet, MosquittoBroker], tmp_path: Path
) -> None:
    credentials, broker = provisioned
    url = f"mqtts://{broker.host}:{broker.port}"
    config = _device_yaml(credentials, url)
    findings = _diagnose_with_aggregator(credentials, config, tmp_path)
    assert findings["broker"].verdict == "ok", findings["broker"]
    assert "mutual TLS" in findings["broker"].detail
    assert findings["clock"].verdict == "ok", findings["clock"]
    skew = float(findings["clock"].detail.split()[2])
    assert abs(skew) < 1.0  # the same machine's clock, give or take the round trip
    for check in ("python", "config", "torch", "onnx", "data", "disk"):
        assert findings[check].verdict in ("ok", "warn"), findings[check]
    assert "CPU build" in findings["torch"].detail


def test_doctor_without_an_aggregator_warns_about_the_clock_only(
    provisioned: tuple[ProvisionedFleet, MosquittoBroker],
) -> None:
    credentials, broker = provisioned
    findings = _by_check(
        diagnose(_device_yaml(credentials, f"mqtts://{broker.host}:{broker.port}"))
    )
    assert findings["broker"].verdict == "ok"
    assert findings["clock"].verdict == "warn"
    assert "serve" in findings["clock"].detail


def test_doctor_exits_non_zero_with_one_line_per_check_when_the_broker_is_gone(
    provisioned: tuple[ProvisionedFleet, MosquittoBroker],
) -> None:
    credentials, broker = provisioned
    url = f"mqtts://{broker.host}:{broker.port}"
    config = _device_yaml(credentials, url)
    broker.stop()
    done = subprocess.run(
        [sys.executable, "-m", "fedfmx_cli", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any(line.startswith("FAIL  broker") and "no connection" in line for line in lines)
    assert "Traceback" not in done.stdout + done.stderr
    assert "1 check(s) failed: broker" in done.stderr


def test_doctor_reports_a_broken_device_yaml_as_one_failing_line(tmp_path: Path) -> None:
    config = tmp_path / "device.yaml"
    config.write_bytes(b"\x00\xff not yaml: [")
    findings = diagnose(config)
    assert [f.check for f in findings] == ["python", "config"]
    assert findings[-1].verdict == "fail"


def test_clock_answer_echoes_a_probe_and_ignores_answers_and_junk() -> None:
    probe = ClockProbe(probe_id="ab" * 16)
    answer = clock_answer(probe.model_dump_json().encode(), now=1234.5)
    assert answer is not None
    assert ClockProbe.model_validate_json(answer).aggregator_unix == 1234.5
    assert clock_answer(answer, now=1.0) is None  # our own answer, heard back
    assert clock_answer(b"\xff\x00", now=1.0) is None


def test_doctor_on_a_broker_whose_acl_predates_the_clock_topic_says_so(
    tmp_path: Path,
) -> None:
    """The aggregator answers, but without the clock line in the ACL the answer never
    reaches the device: the clock check says where to look."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: run `sudo apt-get install -y mosquitto`")
    credentials = provision(load_fleet(FLEET_FILE).name, ["device-000"], tmp_path / "fleet")
    acl = credentials.acl_file.read_text().splitlines()
    kept = [line for line in acl if not line.endswith("/clock")]
    credentials.acl_file.write_text("\n".join(kept) + "\n")
    extra = credentials.broker_settings()
    with MosquittoBroker(allow_anonymous=False, extra_config=extra) as broker:
        config = _device_yaml(credentials, f"mqtts://{broker.host}:{broker.port}")
        findings = _diagnose_with_aggregator(credentials, config, tmp_path)
    assert findings["broker"].verdict == "ok"
    assert findings["clock"].verdict == "warn"
    assert "may this device read" in findings["clock"].detail
