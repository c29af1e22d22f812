"""Fleet credentials: a CA, broker and client certificates, passwords, ACLs, a signing key.

`provision` writes everything an operator needs to run a locked-down Mosquitto for one fleet:
mutual TLS (a device's certificate CN is its MQTT username), a password file as a second
option, an ACL that lets a device publish only under its own `clients/<id>/` and read only the
fleet's `round`, `model` and its own inbox, and the aggregator's Ed25519 key that signs models.
Private keys are written 0600.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator import dynsec
from aggregator.dynsec import OPERATOR
from edge_client.config import DeviceConfig, PartitionSource, save_device_config
from edge_client.enrolment import write_private
from fedfmx.config import BrokerConfig, FleetConfig
from fedfmx.errors import ConfigError

AGGREGATOR = "aggregator"
VALIDITY = datetime.timedelta(days=3650)
PACKET_HEADROOM = 1024
"""Bytes an MQTT PUBLISH adds to its payload (fixed header, topic, properties), rounded up."""
PBKDF2_ITERATIONS = 101
"""What `mosquitto_passwd` of Mosquitto 2.0 uses for its `$7$` (PBKDF2-SHA512) hashes."""


@dataclass(frozen=True)
class Credentials:
    name: str
    cert: Path
    key: Path
    password: str


@dataclass(frozen=True)
class ProvisionedFleet:
    directory: Path
    ca_cert: Path
    broker_cert: Path
    broker_key: Path
    password_file: Path
    acl_file: Path
    mosquitto_conf: Path
    signing_key: Path
    verify_key: Path
    clients: dict[str, Credentials]
    dynamic_security: Path | None = None
    """The dynamic-security plugin's JSON (None: static password and ACL files)."""

    def broker_settings(self, enrol_listener: str | None = None) -> list[str]:
        """mosquitto.conf minus listener and persistence: TLS, ACL and authentication lines
        to put under a listener of one's own (tests and `simulate --secure` do). With
        dynamic security, `enrol_listener` ("port host") replaces the enrolment listener's
        line (without it, that listener's block is left out)."""
        lines: list[str] = []
        listeners = 0
        for line in self.mosquitto_conf.read_text().splitlines():
            if line.startswith("listener"):
                listeners += 1
                if listeners == 2 and enrol_listener is not None:
                    lines.append(f"listener {enrol_listener}")
                continue
            if listeners >= 2 and enrol_listener is None:
                continue
            if not line.startswith(("persistence", "allow_anonymous")):
                lines.append(line)
        return lines

    def broker_section(self, name: str, url: str) -> BrokerConfig:
        """The `broker:` section for client `name`: mutual TLS with its certificate."""
        credentials = self.clients[name]
        return BrokerConfig(
            url=url, ca_file=self.ca_cert, cert_file=credentials.cert, key_file=credentials.key
        )

    def write_configs(
        self, fleet: FleetConfig, url: str, profile: str = "raspberry-pi-4"
    ) -> tuple[Path, list[Path]]:
        """A fleet YAML for the aggregator and one YAML per device, all pointing at the files
        provisioned here (broker credentials, signing and verify keys)."""
        service = fleet.service.model_copy(
            update={
                "broker": self.broker_section(AGGREGATOR, url),
                "signing_key": self.signing_key,
            }
        )
        fleet = fleet.model_copy(update={"service": service})
        fleet_file = self.directory / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(fleet.model_dump(mode="json"), sort_keys=False))
        devices = [name for name in self.clients if name not in (AGGREGATOR, OPERATOR)]
        configs = [
            save_device_config(
                DeviceConfig(
                    device_id=name,
                    fleet_file=fleet_file,
                    broker=self.broker_section(name, url),
                    profile=profile,
                    data=PartitionSource(client_index=index),
                    state_dir=self.directory / f"state-{name}",
                    fleet_public_key=self.verify_key,
                ),
                self.directory / f"{name}.yaml",
            )
            for index, name in enumerate(devices)
        ]
        return fleet_file, configs


def _pem_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_name(host: str) -> x509.GeneralName:
    """An IP address entry for an address, a DNS entry for a name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(
    subject: str,
    key: CertificatePublicKeyTypes,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool = False,
    server_hosts: Sequence[str] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names = [_subject_name(host) for host in ("localhost", "127.0.0.1", *server_hosts)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """`$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 as Mosquitto's password file wants."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    encode = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${encode(salt).decode()}${encode(digest).decode()}"


def acl_lines(fleet: str) -> list[str]:
    """The aggregator reads and writes the whole fleet; a device (`%u` = its CN or username)
    writes only below its own `clients/<id>/` and reads `round`, `model` and its inbox."""
    prefix = f"fedfmx/v1/{fleet}"
    return [
        f"user {AGGREGATOR}",
        f"topic readwrite {prefix}/#",
        "",
        f"pattern write {prefix}/clients/%u/#",
        f"pattern read {prefix}/clients/%u/inbox",
        f"pattern read {prefix}/clients/%u/clock",
        f"pattern read {prefix}/round",
        f"pattern read {prefix}/model/#",
    ]


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The fleet CA that `provision` wrote in `directory` (certificate, private key)."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as error:
        raise ConfigError(f"{directory}: no fleet CA here ({error.strerror})") from None
    except ValueError:
        raise ConfigError(f"{directory}: ca.crt or ca.key is not valid PEM") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC private key")
    return certificate, key


def issue_client_certificate(
    subject: str,
    public_key: CertificatePublicKeyTypes,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A client certificate (CN = `subject`, the MQTT username) for a key made elsewhere."""
    return _certificate(subject, public_key, ca, ca_key)


def _load_or_create_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if (directory / "ca.crt").exists() and (directory / "ca.key").exists():
        return load_ca(directory)
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate("fedfmx fleet CA", key.public_key(), None, key)
    write_private(key_path, _pem_key(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def _client(
    directory: Path,
    name: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool = False,
    server_hosts: Sequence[str] = (),
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(
        name, key.public_key(), ca, ca_key, server=server, server_hosts=server_hosts
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    write_private(key_path, _pem_key(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def provision(
    fleet: str,
    device_ids: Sequence[str],
    directory: Path,
    port: int = 8883,
    max_payload_bytes: int = BrokerConfig().max_payload_bytes,
    enrol_port: int | None = None,
    broker_hosts: Sequence[str] = (),
) -> ProvisionedFleet:
    """Write (or extend: an existing CA is reused) the fleet's credentials under `directory`.

    The broker refuses (and disconnects) any client sending a packet larger than the fleet's
    chunk size allows, so an oversized flood never reaches the aggregator.

    With `enrol_port`, rights live in Mosquitto's dynamic-security plugin instead of the
    password and ACL files (see `aggregator.dynsec`): an `operator` identity changes them on
    the running broker, and a second TLS listener on `enrol_port` (server certificate only)
    takes enrolment requests authenticated by one-time tokens.

    The broker's certificate names localhost, 127.0.0.1 and `broker_hosts` (the names or
    addresses devices connect to: TLS checks them).
    """
    for device in device_ids:
        if (
            device in (AGGREGATOR, OPERATOR)
            or not device.replace("-", "").replace("_", "").isalnum()
        ):
            raise ConfigError(f"device id {device!r}: use letters, digits, '-' and '_' only")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _load_or_create_ca(directory)
    broker_cert, broker_key = _client(
        directory, "broker", ca, ca_key, server=True, server_hosts=broker_hosts
    )
    clients: dict[str, Credentials] = {}
    identities = [AGGREGATOR, *([OPERATOR] if enrol_port is not None else []), *device_ids]
    for name in identities:
        cert, key = _client(directory, name, ca, ca_key)
        clients[name] = Credentials(name, cert, key, secrets.token_urlsafe(18))
    password_file = directory / "passwords"
    kept = _existing_passwords(password_file, set(clients))
    entries = kept + [
        f"{name}:{mosquitto_password_hash(c.password)}" for name, c in clients.items()
    ]
    write_private(password_file, ("\n".join(entries) + "\n").encode())
    for name, credentials in clients.items():
        write_private(directory / f"{name}.password", credentials.password.encode())
    acl_file = directory / "acl"
    acl_file.write_text("\n".join(acl_lines(fleet)) + "\n")
    signing_key, verify_key = signing_key_files(directory)
    conf = directory / "mosquitto.conf"
    tls = [f"cafile {directory / 'ca.crt'}", f"certfile {broker_cert}", f"keyfile {broker_key}"]
    if enrol_port is None:
        dynamic_security = None
        security = [f"acl_file {acl_file}"]
        enrolment: list[str] = []
    else:
        dynamic_security = write_dynamic_security(directory, fleet, device_ids)
        plugin = dynsec.plugin_path() or Path(dynsec.PLUGIN_PATHS[0])
        security = [f"plugin {plugin}", f"plugin_opt_config_file {dynamic_security}"]
        enrolment = [f"listener {enrol_port}", *tls]
    conf.write_text(
        "\n".join(
            [
                "per_listener_settings false",
                "allow_anonymous false",
                *security,
                f"max_packet_size {max_payload_bytes + PACKET_HEADROOM}",
                "persistence true",
                f"persistence_location {directory}/",
                f"listener {port}",
                *tls,
                "require_certificate true",
                "use_identity_as_username true",
                *enrolment,
            ]
        )
        + "\n"
    )
    return ProvisionedFleet(
        directory,
        directory / "ca.crt",
        broker_cert,
        broker_key,
        password_file,
        acl_file,
        conf,
        signing_key,
        verify_key,
        clients,
        dynamic_security,
    )


def write_dynamic_security(directory: Path, fleet: str, device_ids: Sequence[str]) -> Path:
    """The plugin's JSON with the aggregator, the operator and `device_ids`; an existing file
    (the broker's live state: it rewrites the file on every change) only gains the missing
    identities. Written with the broker stopped: a running one would overwrite it."""
    path = directory / "dynamic-security.json"
    identities = {
        AGGREGATOR: dynsec.aggregator_acls(fleet),
        OPERATOR: dynsec.operator_acls(fleet),
        **{device: dynsec.device_acls(fleet, device) for device in device_ids},
    }
    fresh = dynsec.initial_config(fleet, identities)
    if path.exists():
        current = json.loads(path.read_text())
        known = {client["username"] for client in current.get("clients", [])}
        current["clients"] += [c for c in fresh["clients"] if c["username"] not in known]
        roles = {role["rolename"] for role in current.get("roles", [])}
        current["roles"] += [r for r in fresh["roles"] if r["rolename"] not in roles]
        fresh = current
    write_private(path, json.dumps(fresh, indent=1).encode())
    return path


def _existing_passwords(path: Path, replaced: set[str]) -> list[str]:
    if not path.exists():
        return []
    return [
        line
        for line in path.read_text().splitlines()
        if line and line.split(":", 1)[0] not in replaced
    ]


def signing_key_files(directory: Path) -> tuple[Path, Path]:
    """The aggregator's Ed25519 model-signing key (created once, kept on re-provisioning)."""
    private, public = directory / "aggregator-signing.key", directory / "aggregator-signing.pub"
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        write_private(private, _pem_key(key))
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private, public
