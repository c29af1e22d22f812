"""Mosquitto's dynamic-security plugin: the fleet's rights, changed on the running broker.

The plugin (in Debian's mosquitto 2.0) keeps clients, roles and ACLs in a JSON file and takes
commands on `$CONTROL/dynamic-security/v1`, answering on `.../response`; a deleted client is
disconnected at once. Who may do what:

  operator           sends the control commands (and reads/writes enrolment topics)
  aggregator         reads and writes the whole fleet
  <device id>        a certificate identity: writes below its own `clients/<id>/`, reads the
                     fleet's `round`, `model/#`, its inbox and its clock topic
  enrol-<device id>  a one-time token (its password) on the enrolment listener: writes only
                     its request, reads only its reply

Anything not granted is denied (`defaultACLAccess`), so a revoked device, whose certificate
still passes TLS, can neither subscribe nor publish.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedfmx.errors import FedFMXError
from transport import MqttSession
from transport.topics import fleet_prefix

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
)
OPERATOR = "operator"
RESPONSE_TIMEOUT_S = 10.0

Acl = dict[str, object]


def plugin_path() -> Path | None:
    """Where this machine's Mosquitto keeps the plugin (Debian multiarch paths)."""
    return next((Path(p) for p in PLUGIN_PATHS if Path(p).is_file()), None)


def _allow(kind: str, topic: str) -> Acl:
    return {"acltype": kind, "topic": topic, "allow": True}


def _read(topic: str) -> list[Acl]:
    return [_allow("subscribePattern", topic), _allow("publishClientReceive", topic)]


def _read_write(topic: str) -> list[Acl]:
    return [_allow("publishClientSend", topic), *_read(topic)]


def operator_acls(fleet: str) -> list[Acl]:
    return [
        *_read_write("$CONTROL/dynamic-security/#"),
        *_read_write(f"{fleet_prefix(fleet)}/enrol/#"),
    ]


def aggregator_acls(fleet: str) -> list[Acl]:
    return _read_write(f"{fleet_prefix(fleet)}/#")


def device_acls(fleet: str, device_id: str) -> list[Acl]:
    prefix = fleet_prefix(fleet)
    own = f"{prefix}/clients/{device_id}"
    return [
        _allow("publishClientSend", f"{own}/#"),
        *_read(f"{own}/inbox"),
        *_read(f"{own}/clock"),
        *_read(f"{prefix}/round"),
        *_read(f"{prefix}/model/#"),
    ]


def enrolment_topic(fleet: str, device_id: str, leaf: str) -> str:
    """`fedfmx/v1/<fleet>/enrol/<id>/<leaf>`: request, reply, ack."""
    return f"{fleet_prefix(fleet)}/enrol/{device_id}/{leaf}"


def enrol_acls(fleet: str, device_id: str) -> list[Acl]:
    return [
        _allow("publishClientSend", enrolment_topic(fleet, device_id, "request")),
        _allow("publishClientSend", enrolment_topic(fleet, device_id, "ack")),
        *_read(enrolment_topic(fleet, device_id, "reply")),
    ]


def role_name(username: str) -> str:
    return f"role-{username}"


def initial_config(fleet: str, identities: dict[str, list[Acl]]) -> dict[str, Any]:
    """The plugin's starting JSON: one client (certificate identity, no password) and one role
    per entry of `identities`, everything else denied."""
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {"username": name, "roles": [{"rolename": role_name(name)}]} for name in identities
        ],
        "groups": [],
        "roles": [{"rolename": role_name(name), "acls": acls} for name, acls in identities.items()],
    }


class ControlError(FedFMXError):
    """The plugin refused a command (its error text says why)."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynamic-security {command}: {error}")
        self.error = error


class DynamicSecurity:
    """Commands to the plugin over an operator's connected session; each waits (bounded) for
    its response, matched by correlation data."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self._answers: dict[str, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        session.subscribe(RESPONSE_TOPIC, self._on_response, raw=True)

    def _on_response(self, _: str, message: bytes) -> None:
        try:
            responses = json.loads(message)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        with self._arrived:
            for response in responses if isinstance(responses, list) else []:
                if isinstance(response, dict) and "correlationData" in response:
                    self._answers[str(response["correlationData"])] = response
            self._arrived.notify_all()

    def run(
        self, command: str, fields: Mapping[str, object], *, missing_ok: bool = False
    ) -> dict[str, Any]:
        """Send one command; its response's `data` (empty when none). ControlError when the
        plugin refuses it (`missing_ok`: not for "not found", as after a retried delete)."""
        correlation = secrets.token_hex(8)
        body = {"commands": [{"command": command, "correlationData": correlation, **fields}]}
        self.session.publish_raw(CONTROL_TOPIC, json.dumps(body).encode())
        with self._arrived:
            if not self._arrived.wait_for(lambda: correlation in self._answers, RESPONSE_TIMEOUT_S):
                raise FedFMXError(
                    f"dynamic-security {command}: no answer in {RESPONSE_TIMEOUT_S:g} s "
                    "(is the plugin loaded, and may this identity use $CONTROL?)"
                )
            response = self._answers.pop(correlation)
        error = response.get("error")
        if error and not (missing_ok and "not found" in str(error).lower()):
            raise ControlError(command, str(error))
        data = response.get("data")
        return data if isinstance(data, dict) else {}

    def grant(self, username: str, acls: list[Acl], password: str | None = None) -> None:
        """Create `username` with its own role holding `acls` (replacing any earlier ones)."""
        self.revoke(username)
        self.run("createRole", {"rolename": role_name(username), "acls": acls})
        fields: dict[str, object] = {
            "username": username,
            "roles": [{"rolename": role_name(username)}],
        }
        if password is not None:
            fields["password"] = password
        self.run("createClient", fields)

    def revoke(self, username: str) -> None:
        """Delete the client (the broker disconnects it) and its role; nothing if absent."""
        self.run("deleteClient", {"username": username}, missing_ok=True)
        self.run("deleteRole", {"rolename": role_name(username)}, missing_ok=True)

    def set_password(self, username: str, password: str) -> None:
        self.run("setClientPassword", {"username": username, "password": password})

    def clients(self) -> list[str]:
        data = self.run("listClients", {"verbose": False, "count": -1, "offset": 0})
        names = data.get("clients", [])
        return [str(name) for name in names] if isinstance(names, list) else []
