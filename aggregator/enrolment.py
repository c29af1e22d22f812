"""The operator's side of enrolment on a live fleet: invite, list, approve, revoke.

  invite ID    a one-time token: the password of the temporary broker client `enrol-ID`,
               allowed only to post ID's request and read ID's reply (enrolment listener)
  (device)     `fedfmx-edge enrol` makes its key and certificate request on the device and
               posts the request, retained, with the token (edge_client.enrolment)
  approve ID   checks the request (signature, CN = ID, an EC key), signs it with the fleet CA,
               creates the broker client ID with the device's ACL, posts the reply (certificate,
               fleet YAML, model-signing key); once the device acknowledges, the token's client
               is deleted, so the token cannot be used again
  revoke ID    deletes the broker client ID and its role: the broker disconnects the device at
               once, and its certificate, still valid for TLS, is granted nothing any more

All through the dynamic-security plugin on the running broker: no restart (aggregator.dynsec).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from aggregator.dynsec import (
    OPERATOR,
    DynamicSecurity,
    device_acls,
    enrol_acls,
    enrolment_topic,
)
from aggregator.provisioning import AGGREGATOR, issue_client_certificate, load_ca
from edge_client.enrolment import key_fingerprint
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import ConfigError, FedFMXError, ProtocolError
from fedfmx.wire.messages import EnrolmentReply, EnrolmentRequest
from transport import MqttSession, SessionSettings, TlsSettings, check_id

ENROL_PREFIX = "enrol-"
RETAINED_WAIT_S = 1.5
"""How long retained requests take to arrive after subscribing (loopback or LAN)."""


def enrolment_username(device_id: str) -> str:
    return f"{ENROL_PREFIX}{device_id}"


@dataclass(frozen=True)
class FleetAuthority:
    """What the operator holds: the provisioned folder (CA, operator certificate, fleet YAML,
    model-signing public key)."""

    directory: Path
    fleet: FleetConfig
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, directory: Path) -> FleetAuthority:
        ca, ca_key = load_ca(directory)
        for name in (f"{OPERATOR}.crt", f"{OPERATOR}.key"):
            if not (directory / name).is_file():
                raise ConfigError(
                    f"{directory}: no {name}; provision with --enrol-port for live enrolment"
                )
        return cls(directory, load_fleet(directory / "fleet.yaml"), ca, ca_key)

    @property
    def broker_url(self) -> str:
        """Where devices (and the operator) connect with their certificates."""
        return self.fleet.service.broker.url

    def session(self, url: str | None = None) -> MqttSession:
        """An operator session (certificate CN `operator`), not connected yet (`connect`)."""
        settings = SessionSettings(
            url=url or self.broker_url,
            client_id=f"{OPERATOR}-{secrets.token_hex(4)}",
            tls=TlsSettings(
                ca_file=self.directory / "ca.crt",
                cert_file=self.directory / f"{OPERATOR}.crt",
                key_file=self.directory / f"{OPERATOR}.key",
            ),
            persistent=False,
        )
        return MqttSession(settings)


def invite(control: DynamicSecurity, fleet: str, device_id: str) -> str:
    """A one-time enrolment token for `device_id` (replaces any earlier one)."""
    check_id(device_id, "device id")
    if device_id in (AGGREGATOR, OPERATOR) or device_id.startswith(ENROL_PREFIX):
        raise ConfigError(f"device id {device_id!r} is reserved")
    token = secrets.token_urlsafe(24)
    control.grant(enrolment_username(device_id), enrol_acls(fleet, device_id), password=token)
    return token


def retained(
    session: MqttSession,
    fleet: str,
    leaf: str,
    device_id: str = "+",
    wait_s: float = RETAINED_WAIT_S,
) -> dict[str, bytes]:
    """The retained `enrol/<id>/<leaf>` messages by device id (for one id: returns as soon as
    it arrived)."""
    found: dict[str, bytes] = {}
    arrived = threading.Event()
    topic = enrolment_topic(fleet, device_id, leaf)

    def on_message(topic: str, message: bytes) -> None:
        if message:
            found[topic.split("/")[-2]] = message
            arrived.set()

    session.subscribe(topic, on_message, raw=True)
    if device_id == "+":
        time.sleep(wait_s)
    else:
        arrived.wait(wait_s * 2)
    session.unsubscribe(topic)
    return found


def read_requests(
    session: MqttSession, fleet: str, device_id: str = "+"
) -> dict[str, EnrolmentRequest | str]:
    """Pending requests by device id (a string says why one is unusable)."""
    found: dict[str, EnrolmentRequest | str] = {}
    for sender, message in retained(session, fleet, "request", device_id).items():
        try:
            request = EnrolmentRequest.model_validate_json(message)
        except ValidationError as error:
            found[sender] = f"malformed request ({error.error_count()} errors)"
            continue
        found[sender] = (
            request
            if request.device_id == sender
            else f"request names {request.device_id!r} on {sender!r}'s topic"
        )
    return found


def certificate_for(authority: FleetAuthority, request: EnrolmentRequest) -> x509.Certificate:
    """The device certificate for a checked request; ProtocolError when it does not hold."""
    try:
        csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    except ValueError:
        raise ProtocolError(f"{request.device_id}: the request is not a PEM CSR") from None
    if not csr.is_signature_valid:
        raise ProtocolError(f"{request.device_id}: the CSR's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [request.device_id]:
        raise ProtocolError(f"{request.device_id}: the CSR is for {csr.subject.rfc4514_string()}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size < 256:
        raise ProtocolError(f"{request.device_id}: the CSR's key is not an EC key of 256+ bits")
    return issue_client_certificate(request.device_id, key, authority.ca, authority.ca_key)


def fingerprint(request: EnrolmentRequest) -> str:
    """The request's key fingerprint, as `enrol` printed it on the device."""
    try:
        key = x509.load_pem_x509_csr(request.csr_pem.encode()).public_key()
    except ValueError:
        return "invalid"
    return key_fingerprint(key) if isinstance(key, ec.EllipticCurvePublicKey) else "not EC"


@dataclass(frozen=True)
class Approval:
    serial: int
    collected: bool
    """The device acknowledged its certificate (its token is then spent)."""


def approve(
    session: MqttSession,
    control: DynamicSecurity,
    authority: FleetAuthority,
    device_id: str,
    ack_wait_s: float = 15.0,
) -> Approval:
    """Sign `device_id`'s pending request, grant its rights, and hand over its certificate."""
    fleet = authority.fleet.name
    request = read_requests(session, fleet, device_id).get(device_id)
    if request is None:
        raise ConfigError(f"no enrolment request from {device_id} (has it run `enrol`?)")
    if isinstance(request, str):
        raise ProtocolError(f"{device_id}: {request}")
    certificate = certificate_for(authority, request)
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    records = authority.directory / "enrolled"
    records.mkdir(exist_ok=True)
    (records / f"{device_id}.crt").write_text(pem)
    control.grant(device_id, device_acls(fleet, device_id))
    public_key = authority.directory / "aggregator-signing.pub"
    reply = EnrolmentReply(
        device_id=device_id,
        certificate_pem=pem,
        fleet_yaml=_device_fleet_yaml(authority),
        fleet_public_key_pem=public_key.read_text() if public_key.is_file() else None,
        broker_url=authority.broker_url,
    )
    acked = threading.Event()
    ack_topic = enrolment_topic(fleet, device_id, "ack")
    session.subscribe(ack_topic, lambda *_: acked.set(), raw=True)
    session.publish_raw(
        enrolment_topic(fleet, device_id, "reply"), reply.model_dump_json().encode(), retain=True
    )
    collected = acked.wait(ack_wait_s)
    session.unsubscribe(ack_topic)
    if collected:
        _forget_enrolment(session, control, fleet, device_id)
    return Approval(certificate.serial_number, collected)


def _device_fleet_yaml(authority: FleetAuthority) -> str:
    """The fleet YAML a device runs with: the aggregator's own broker credentials and signing
    key path are the aggregator's business, not the device's."""
    fleet = authority.fleet
    service = fleet.service.model_copy(
        update={
            "signing_key": None,
            "broker": fleet.service.broker.model_copy(
                update={"cert_file": None, "key_file": None, "ca_file": None, "password_file": None}
            ),
        }
    )
    document = fleet.model_copy(update={"service": service}).model_dump(mode="json")
    return yaml.safe_dump(document, sort_keys=False)


def _forget_enrolment(
    session: MqttSession, control: DynamicSecurity, fleet: str, device_id: str
) -> None:
    """Spend the token (delete its client) and clear the retained request, reply and ack."""
    control.revoke(enrolment_username(device_id))
    for leaf in ("request", "reply", "ack"):
        session.clear_retained(enrolment_topic(fleet, device_id, leaf))


def revoke(session: MqttSession, control: DynamicSecurity, fleet: str, device_id: str) -> None:
    """Remove every right of `device_id` now: the broker disconnects it."""
    check_id(device_id, "device id")
    if device_id in (AGGREGATOR, OPERATOR):
        raise ConfigError(f"{device_id!r} is not a device")
    control.revoke(device_id)
    _forget_enrolment(session, control, fleet, device_id)


@dataclass(frozen=True)
class DeviceEntry:
    device_id: str
    state: str
    """approved, pending (a request waits), invited (token issued, no request yet)."""
    detail: str


def fleet_devices(session: MqttSession, control: DynamicSecurity, fleet: str) -> list[DeviceEntry]:
    """Every device the broker knows, and every enrolment in progress."""
    clients = set(control.clients())
    for device_id in retained(session, fleet, "ack"):
        # collected after its approval had stopped waiting: spend the token now
        if device_id in clients:
            _forget_enrolment(session, control, fleet, device_id)
            clients.discard(enrolment_username(device_id))
    requests = read_requests(session, fleet)
    entries = [
        DeviceEntry(name, "approved", "certificate identity with the device ACL")
        for name in clients
        if name not in (AGGREGATOR, OPERATOR) and not name.startswith(ENROL_PREFIX)
    ]
    for device_id, request in requests.items():
        if isinstance(request, str):
            entries.append(DeviceEntry(device_id, "invalid", request))
        elif device_id not in clients:
            entries.append(
                DeviceEntry(device_id, "pending", f"key fingerprint {fingerprint(request)}")
            )
    invited = {n[len(ENROL_PREFIX) :] for n in clients if n.startswith(ENROL_PREFIX)}
    for device_id in sorted(invited - set(requests) - clients):
        entries.append(DeviceEntry(device_id, "invited", "token issued, no request yet"))
    return sorted(entries, key=lambda e: e.device_id)


def connect(
    authority: FleetAuthority, url: str | None = None
) -> tuple[MqttSession, DynamicSecurity]:
    """The operator's session and its dynamic-security control, connected."""
    session = authority.session(url)
    control = DynamicSecurity(session)
    try:
        session.connect()
    except FedFMXError:
        session.close()
        raise
    return session, control
