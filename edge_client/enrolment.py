"""`fedfmx-edge enrol` on a device: its own key and certificate request, sent with a one-time
token, and a ready device YAML once the operator approves (see aggregator.enrolment).

The private key is made here and never leaves the device (0600, kept across re-runs, so a
request can be repeated). The reply's certificate is checked before anything is written: it
must be issued by the CA the device already trusts (the one that verifies the broker), name
this device, and hold this device's key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from edge_client.config import DeviceConfig, PartitionSource, save_device_config
from fedfmx.config import BrokerConfig
from fedfmx.errors import ConfigError, FedFMXError, ProtocolError
from fedfmx.wire.messages import EnrolmentReply, EnrolmentRequest
from transport import MqttSession, SessionSettings, TlsSettings, check_id
from transport.topics import fleet_prefix


@dataclass(frozen=True)
class EnrolmentSettings:
    device_id: str
    fleet: str
    enrol_url: str
    """The broker's enrolment listener (TLS with the server certificate only)."""
    ca_file: Path
    token: str
    out: Path
    profile: str = "raspberry-pi-4"
    client_index: int = 0
    state_dir: Path | None = None
    """Default: `<out>/state`."""


def write_private(path: Path, data: bytes) -> None:
    """Create with 0600 from the start (never world-readable, not even for a moment)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def device_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The device's P-256 key: loaded when it exists, else made and written 0600."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path}: not an EC private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem)
    return key


def certificate_request(device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """What `devices list` shows for a pending request: compare before approving."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()[:16]


def check_certificate(
    pem: str, ca_file: Path, device_id: str, key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """The reply's certificate, if issued by our CA, for this device, holding our key."""
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode())
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise ProtocolError(f"the certificate received is not from our CA ({error})") from None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [device_id]:
        raise ProtocolError(
            f"the certificate received names {certificate.subject.rfc4514_string()}"
        )
    if certificate.public_key() != key.public_key():
        raise ProtocolError("the certificate received holds another key")
    return certificate


def topic(fleet: str, device_id: str, leaf: str) -> str:
    return f"{fleet_prefix(fleet)}/enrol/{device_id}/{leaf}"


def enrol(
    settings: EnrolmentSettings, wait_s: float, announce: Callable[[str], None] = print
) -> Path:
    """Request, wait (bounded) for the approval, write credentials and `device.yaml`; its path.

    ConfigError when the token is refused or no approval came within `wait_s` (the request
    stays pending: run again with the same token).
    """
    device_id = check_id(settings.device_id, "device id")
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    key = device_key(out / f"{device_id}.key")
    request = EnrolmentRequest(
        device_id=device_id, csr_pem=certificate_request(device_id, key), profile=settings.profile
    )
    username = f"enrol-{device_id}"
    session = MqttSession(
        SessionSettings(
            url=settings.enrol_url,
            client_id=username,
            username=username,
            password=settings.token,
            tls=TlsSettings(ca_file=settings.ca_file),
            persistent=False,
        )
    )
    replies: list[bytes] = []
    arrived = threading.Event()

    def on_reply(_: str, message: bytes) -> None:
        if message:
            replies.append(message)
            arrived.set()

    session.subscribe(topic(settings.fleet, device_id, "reply"), on_reply, raw=True)
    try:
        try:
            session.connect()
        except FedFMXError as error:
            raise ConfigError(
                f"enrolment refused: {error} (is the token right and unused?)"
            ) from None
        session.publish_raw(
            topic(settings.fleet, device_id, "request"),
            request.model_dump_json().encode(),
            retain=True,
        )
        announce(
            f"request sent for {device_id}; key fingerprint "
            f"{key_fingerprint(key.public_key())}: waiting for the operator's approval"
        )
        if not arrived.wait(wait_s):
            raise ConfigError(
                f"no approval within {wait_s:g} s; the request stays pending: run `enrol` "
                "again with the same token after `fedfmx-edge devices approve`"
            )
        try:
            reply = EnrolmentReply.model_validate_json(replies[-1])
        except ValidationError as error:
            raise ProtocolError(
                f"malformed enrolment reply ({error.error_count()} errors)"
            ) from None
        if reply.device_id != device_id:
            raise ProtocolError(f"the reply is for {reply.device_id!r}")
        certificate = check_certificate(reply.certificate_pem, settings.ca_file, device_id, key)
        config = _write_credentials(settings, reply, certificate)
        # Retained: an operator no longer waiting still sees it (`devices list` spends the token).
        session.publish_raw(topic(settings.fleet, device_id, "ack"), b"ok", retain=True)
    finally:
        session.close()
    return config


def _write_credentials(
    settings: EnrolmentSettings, reply: EnrolmentReply, certificate: x509.Certificate
) -> Path:
    out, device_id = settings.out, settings.device_id
    cert_file = out / f"{device_id}.crt"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fleet_file = out / "fleet.yaml"
    fleet_file.write_text(reply.fleet_yaml)
    public_key = None
    if reply.fleet_public_key_pem is not None:
        public_key = out / "aggregator-signing.pub"
        public_key.write_text(reply.fleet_public_key_pem)
    config = DeviceConfig(
        device_id=device_id,
        fleet_file=fleet_file.resolve(),
        broker=BrokerConfig(
            url=reply.broker_url,
            ca_file=settings.ca_file.resolve(),
            cert_file=cert_file.resolve(),
            key_file=(out / f"{device_id}.key").resolve(),
        ),
        profile=settings.profile,
        data=PartitionSource(client_index=settings.client_index),
        state_dir=(settings.state_dir or out / "state").resolve(),
        fleet_public_key=None if public_key is None else public_key.resolve(),
        exit_after_last_round=False,
    )
    return save_device_config(config, out / "device.yaml")
