"""Enrolment on a live fleet, against a real Mosquitto with the dynamic-security plugin:
invite, enrol on the device (key + CSR + one-time token), approve, join with the new
certificate, revoke (disconnected at once, no broker restart), and the revoked device trying
again with its still TLS-valid certificate."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from fleet_helpers import FLEET_FILE

from aggregator.dynsec import plugin_path
from aggregator.enrolment import FleetAuthority, approve, connect, fleet_devices, invite, revoke
from aggregator.provisioning import AGGREGATOR, ProvisionedFleet, provision
from edge_client.config import load_device_config
from edge_client.enrolment import EnrolmentSettings, enrol
from fedfmx.config import load_fleet
from fedfmx.errors import ConfigError, FedFMXError
from transport import (
    MosquittoBroker,
    MqttSession,
    TopicKind,
    client_topic,
    clients_filter,
    find_mosquitto,
    free_port,
    round_topic,
    session_settings,
)

DEVICE = "cam-007"


@dataclass
class LiveFleet:
    credentials: ProvisionedFleet
    broker: MosquittoBroker
    enrol_port: int
    authority: FleetAuthority

    @property
    def enrol_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.enrol_port}"

    def settings(self, token: str, out: Path) -> EnrolmentSettings:
        return EnrolmentSettings(
            DEVICE, self.authority.fleet.name, self.enrol_url, self.credentials.ca_cert, token, out
        )


@pytest.fixture
def live_fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    if find_mosquitto() is None or plugin_path() is None:
        pytest.skip("needs mosquitto with mosquitto_dynamic_security.so (Debian's mosquitto)")
    fleet = load_fleet(FLEET_FILE)
    enrol_port = free_port()
    credentials = provision(fleet.name, [], tmp_path / "fleet", enrol_port=enrol_port)
    broker = MosquittoBroker(
        allow_anonymous=False,
        extra_config=credentials.broker_settings(enrol_listener=f"{enrol_port} 127.0.0.1"),
    )
    broker.start()
    try:
        credentials.write_configs(fleet, f"mqtts://127.0.0.1:{broker.port}")
        authority = FleetAuthority.load(credentials.directory)
        yield LiveFleet(credentials, broker, enrol_port, authority)
    finally:
        broker.close()


def _observer(fleet: LiveFleet, seen: list[str]) -> MqttSession:
    """The aggregator's identity, watching every device's hello."""
    broker = fleet.credentials.broker_section(AGGREGATOR, fleet.authority.broker_url)
    session = MqttSession(session_settings(broker, "observer"))
    name = fleet.authority.fleet.name
    session.subscribe(clients_filter(name, TopicKind.HELLO), lambda t, m: seen.append(t), raw=True)
    session.connect()
    return session


def _wait(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_enrol_approve_join_revoke_on_a_running_broker(
    live_fleet: LiveFleet, tmp_path: Path
) -> None:
    fleet_name = live_fleet.authority.fleet.name
    session, control = connect(live_fleet.authority)
    try:
        token = invite(control, fleet_name, DEVICE)
        states = {e.device_id: e.state for e in fleet_devices(session, control, fleet_name)}
        assert states == {DEVICE: "invited"}

        out = tmp_path / "device"
        result: list[Path] = []
        failure: list[BaseException] = []

        def device_side() -> None:
            try:
                result.append(enrol(live_fleet.settings(token, out), 30.0, lambda _: None))
            except BaseException as error:  # surfaced below
                failure.append(error)

        thread = threading.Thread(target=device_side)
        thread.start()
        assert _wait(
            lambda: any(e.state == "pending" for e in fleet_devices(session, control, fleet_name)),
            15.0,
        )
        approval = approve(session, control, live_fleet.authority, DEVICE)
        thread.join(30)
        assert not failure, failure
        assert approval.collected

        # The device holds a CA-signed certificate for its own key, and a working YAML.
        config = load_device_config(result[0])
        assert config.broker.cert_file is not None
        certificate = x509.load_pem_x509_certificate(config.broker.cert_file.read_bytes())
        ca = x509.load_pem_x509_certificate(live_fleet.credentials.ca_cert.read_bytes())
        certificate.verify_directly_issued_by(ca)
        assert certificate.serial_number == approval.serial
        assert (out / f"{DEVICE}.key").stat().st_mode & 0o077 == 0
        assert load_fleet(config.fleet_file).name == fleet_name
        assert {e.device_id: e.state for e in fleet_devices(session, control, fleet_name)} == {
            DEVICE: "approved"
        }

        # The token is spent.
        with pytest.raises(ConfigError, match="enrolment refused"):
            enrol(live_fleet.settings(token, tmp_path / "again"), 2.0, lambda _: None)

        # The enrolled device joins with its certificate: its rights are live.
        seen: list[str] = []
        observer = _observer(live_fleet, seen)
        device = MqttSession(session_settings(config.broker, DEVICE))
        device.connect()
        device.subscribe(round_topic(fleet_name), lambda t, m: None)
        hello = client_topic(fleet_name, DEVICE, TopicKind.HELLO)
        device.publish_raw(hello, b"{}")
        assert _wait(lambda: hello in seen)

        # Revoked: the broker drops it at once, no restart.
        revoke(session, control, fleet_name, DEVICE)
        assert _wait(lambda: not device.connected, 5.0)
        device.close()
        assert fleet_devices(session, control, fleet_name) == []

        # The revoked device tries again: TLS still passes, but it may do nothing.
        seen.clear()
        again = MqttSession(session_settings(config.broker, DEVICE))
        try:
            again.connect()
            with pytest.raises(FedFMXError, match="refused subscription"):
                again.subscribe(round_topic(fleet_name), lambda t, m: None)
            with pytest.raises(FedFMXError, match="broker rejected publish"):
                again.publish_raw(hello, b"{}", timeout_s=5.0)
        finally:
            again.close()
        time.sleep(0.5)
        assert hello not in seen
        observer.close()
    finally:
        session.close()


def test_approve_refuses_a_request_for_another_identity(live_fleet: LiveFleet) -> None:
    from aggregator.enrolment import certificate_for
    from edge_client.enrolment import certificate_request, device_key
    from fedfmx.errors import ProtocolError
    from fedfmx.wire.messages import EnrolmentRequest

    key = device_key(live_fleet.credentials.directory / "intruder.key")
    forged = EnrolmentRequest(device_id=DEVICE, csr_pem=certificate_request("aggregator", key))
    with pytest.raises(ProtocolError, match="CSR is for CN=aggregator"):
        certificate_for(live_fleet.authority, forged)
    garbage = EnrolmentRequest(device_id=DEVICE, csr_pem="-----BEGIN nothing")
    with pytest.raises(ProtocolError, match="not a PEM CSR"):
        certificate_for(live_fleet.authority, garbage)


def test_a_wrong_token_is_refused(live_fleet: LiveFleet, tmp_path: Path) -> None:
    session, control = connect(live_fleet.authority)
    try:
        invite(control, live_fleet.authority.fleet.name, DEVICE)
    finally:
        session.close()
    with pytest.raises(ConfigError, match="enrolment refused"):
        enrol(live_fleet.settings("not-the-token", tmp_path / "d"), 2.0, lambda _: None)


def test_cli_provisions_for_enrolment_and_lists_an_invited_device(
    live_fleet: LiveFleet, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fedfmx_cli.main import app

    runner = CliRunner()
    out = tmp_path / "fresh"
    done = runner.invoke(
        app, ["provision", "--out", str(out), "--devices", "0", "--enrol-port", "8884"]
    )
    assert done.exit_code == 0, done.output
    conf = (out / "mosquitto.conf").read_text()
    assert "mosquitto_dynamic_security.so" in conf and "acl_file" not in conf
    assert conf.count("\nlistener ") == 2
    assert (out / "dynamic-security.json").stat().st_mode & 0o077 == 0

    folder = str(live_fleet.credentials.directory)
    done = runner.invoke(app, ["devices", "invite", "cam-9", "--credentials", folder])
    assert done.exit_code == 0, done.output
    assert "token for cam-9:" in done.output
    done = runner.invoke(app, ["devices", "list", "--credentials", folder])
    assert done.exit_code == 0 and "cam-9" in done.output and "invited" in done.output
    done = runner.invoke(app, ["devices", "approve", "cam-9", "--credentials", folder])
    assert done.exit_code == 2 and "no enrolment request from cam-9" in done.output


def test_a_device_that_collects_after_the_approval_stopped_waiting(
    live_fleet: LiveFleet, tmp_path: Path
) -> None:
    fleet_name = live_fleet.authority.fleet.name
    session, control = connect(live_fleet.authority)
    try:
        token = invite(control, fleet_name, DEVICE)
        with pytest.raises(ConfigError, match="no approval within"):
            enrol(live_fleet.settings(token, tmp_path / "d"), 1.0, lambda _: None)  # gives up
        approval = approve(session, control, live_fleet.authority, DEVICE, ack_wait_s=0.5)
        assert not approval.collected
        config = enrol(live_fleet.settings(token, tmp_path / "d"), 10.0, lambda _: None)
        assert load_device_config(config).device_id == DEVICE
        # The operator's next look spends the token.
        assert [(e.device_id, e.state) for e in fleet_devices(session, control, fleet_name)] == [
            (DEVICE, "approved")
        ]
        assert f"enrol-{DEVICE}" not in control.clients()
        with pytest.raises(ConfigError, match="enrolment refused"):
            enrol(live_fleet.settings(token, tmp_path / "e"), 2.0, lambda _: None)
    finally:
        session.close()
