"""Provisioning: files, permissions and certificates, and a real Mosquitto enforcing them."""

import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from aggregator.provisioning import acl_lines, mosquitto_password_hash, provision
from fedfmx.errors import ConfigError, FedFMXError
from fedfmx_cli.main import app
from transport.brokers import MosquittoBroker, find_mosquitto
from transport.session import MqttSession, SessionSettings, TlsSettings


def test_provision_writes_private_keys_0600_and_ca_signed_certificates(tmp_path: Path) -> None:
    fleet = provision("city", ["cam-1", "cam-2"], tmp_path)
    assert set(fleet.clients) == {"aggregator", "cam-1", "cam-2"}
    ca = x509.load_pem_x509_certificate(fleet.ca_cert.read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    for credentials in fleet.clients.values():
        cert = x509.load_pem_x509_certificate(credentials.cert.read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={credentials.name}"
        cert.verify_directly_issued_by(ca)
    for key in [*tmp_path.glob("*.key"), *tmp_path.glob("*.password"), fleet.password_file]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    conf = fleet.mosquitto_conf.read_text()
    assert "allow_anonymous false" in conf
    assert f"max_packet_size {128 * 1024 + 1024}" in conf  # the default chunk size, headers


def test_reprovisioning_a_device_keeps_the_ca_and_other_passwords(tmp_path: Path) -> None:
    first = provision("city", ["cam-1"], tmp_path)
    ca = first.ca_cert.read_bytes()
    provision("city", ["cam-2"], tmp_path)
    assert first.ca_cert.read_bytes() == ca
    users = [line.split(":")[0] for line in first.password_file.read_text().splitlines()]
    assert sorted(users) == ["aggregator", "cam-1", "cam-2"]


def test_password_hash_format_and_acl() -> None:
    hashed = mosquitto_password_hash("secret", salt=b"\x00" * 12)
    assert hashed.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    assert "pattern write fedfmx/v1/city/clients/%u/#" in acl_lines("city")
    with pytest.raises(ConfigError, match="letters, digits"):
        provision("city", ["bad/id"], Path("/nonexistent"))


needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def _tls_broker(directory: Path) -> MosquittoBroker:
    fleet = provision("city", ["cam-1", "cam-2"], directory)
    return MosquittoBroker(allow_anonymous=False, extra_config=fleet.broker_settings())


def _session(broker: MosquittoBroker, directory: Path, name: str) -> MqttSession:
    tls = TlsSettings(
        ca_file=directory / "ca.crt",
        cert_file=directory / f"{name}.crt",
        key_file=directory / f"{name}.key",
    )
    url = f"mqtts://127.0.0.1:{broker.port}"
    return MqttSession(
        SessionSettings(
            url=url, client_id=name, tls=tls, protocol="5", connect_timeout_s=5, ack_timeout_s=5
        )
    )


@needs_mosquitto
def test_broker_enforces_certificates_and_acls(tmp_path: Path) -> None:
    broker = _tls_broker(tmp_path)
    broker.start()
    try:
        received = threading.Event()
        with (
            _session(broker, tmp_path, "aggregator") as aggregator,
            _session(broker, tmp_path, "cam-1") as device,
        ):
            aggregator.subscribe(
                "fedfmx/v1/city/clients/+/update", lambda topic, payload: received.set()
            )
            device.publish("fedfmx/v1/city/clients/cam-1/update", b"mine")
            assert received.wait(5)
            with pytest.raises(FedFMXError, match="Not authorized"):
                device.publish("fedfmx/v1/city/clients/cam-2/update", b"spoofed")
        stranger = TlsSettings(ca_file=tmp_path / "ca.crt")  # no client certificate
        with pytest.raises(FedFMXError, match="refused"):
            MqttSession(
                SessionSettings(
                    url=f"mqtts://127.0.0.1:{broker.port}",
                    client_id="x",
                    tls=stranger,
                    protocol="5",
                    connect_timeout_s=3,
                )
            ).connect()
    finally:
        broker.close()


@needs_mosquitto
def test_password_file_admits_the_right_password_only(tmp_path: Path) -> None:
    fleet = provision("city", ["cam-1"], tmp_path)
    tls_lines = [
        f"cafile {fleet.ca_cert}",
        f"certfile {fleet.broker_cert}",
        f"keyfile {fleet.broker_key}",
    ]
    broker = MosquittoBroker(
        allow_anonymous=False,
        extra_config=[
            *tls_lines,
            f"password_file {fleet.password_file}",
            f"acl_file {fleet.acl_file}",
        ],
    )
    broker.start()
    url, tls = f"mqtts://127.0.0.1:{broker.port}", TlsSettings(ca_file=fleet.ca_cert)
    try:
        password = fleet.clients["cam-1"].password
        good = SessionSettings(
            url=url, client_id="cam-1", username="cam-1", password=password, tls=tls, protocol="5"
        )
        with MqttSession(good) as device:
            device.publish("fedfmx/v1/city/clients/cam-1/status", b"ok")
        bad = good.model_copy(update={"password": "guess", "connect_timeout_s": 3})
        with pytest.raises(FedFMXError, match="refused"):
            MqttSession(bad).connect()
    finally:
        broker.close()


def test_provision_command(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["provision", "--devices", "2", "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "device-001.crt").exists() and (tmp_path / "aggregator-signing.key").exists()
    both = CliRunner().invoke(
        app, ["provision", "--devices", "2", "--device", "x", "--out", str(tmp_path)]
    )
    assert both.exit_code == 2 and "either --devices N" in both.output


def test_the_broker_certificate_names_the_hosts_devices_connect_to(tmp_path: Path) -> None:
    fleet = provision("city", ["cam-1"], tmp_path, broker_hosts=["broker.example.org", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(fleet.broker_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.org"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
