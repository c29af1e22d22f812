"""The fleet's topic layout, built and parsed in one place so ACLs and code cannot drift apart.

    fedfmx/v1/<fleet>/round                          retained round announcement
    fedfmx/v1/<fleet>/model/<version>/manifest       retained, one chunk (signed manifest)
    fedfmx/v1/<fleet>/model/<version>/body/<index>   retained, chunk <index> of the model body
    fedfmx/v1/<fleet>/model/<version>/delta/<index>  retained, chunk <index> of its delta
    fedfmx/v1/<fleet>/clients/<id>/hello             retained: device introduces itself
    fedfmx/v1/<fleet>/clients/<id>/status            retained raw status; Last Will = offline
    fedfmx/v1/<fleet>/clients/<id>/update            chunked update stream (not retained)
    fedfmx/v1/<fleet>/clients/<id>/inbox             direct messages to one device
    fedfmx/v1/<fleet>/clients/<id>/clock             `doctor`'s clock probe and its answer

A topic retains only its last message, so a retained body spreads its chunks over one topic
each (`model/<v>/body/<i>`, see `MqttSession.publish_retained_chunks`): a device that joins
late subscribes `model/<v>/body/+` and receives every chunk.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from fedfmx.compat import StrEnum
from fedfmx.errors import ProtocolError

PREFIX = "fedfmx/v1"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,9}")


class TopicKind(StrEnum):
    """What a topic carries."""

    ROUND = "round"
    MODEL_MANIFEST = "manifest"
    MODEL_BODY = "body"
    MODEL_DELTA = "delta"
    """The version as a delta against the previous one (named by the version's manifest)."""
    HELLO = "hello"
    STATUS = "status"
    UPDATE = "update"
    INBOX = "inbox"
    CLOCK = "clock"
    PREDICTIONS = "predictions"
    """A device's live predictions on its own stream (JSON lines; no service reads them)."""


CLIENT_KINDS = frozenset(
    {
        TopicKind.HELLO,
        TopicKind.STATUS,
        TopicKind.UPDATE,
        TopicKind.INBOX,
        TopicKind.CLOCK,
        TopicKind.PREDICTIONS,
    }
)


@dataclass(frozen=True)
class TopicAddress:
    """A parsed topic: whose it is and what it carries."""

    fleet: str
    kind: TopicKind
    device_id: str | None = None
    model_version: int | None = None
    chunk_index: int | None = None
    """Set for one chunk of a spread body (`.../body/<i>`); None for the body as a whole."""


def check_id(value: str, what: str = "id") -> str:
    """An id usable as one topic level: `[A-Za-z0-9_-]{1,64}`, so never a wildcard or `/`."""
    if not _ID.fullmatch(value):
        raise ProtocolError(f"{what} {value!r} must match [A-Za-z0-9_-]{{1,64}}")
    return value


def _check_number(value: int, what: str) -> str:
    if value < 0 or value >= 10**10:
        raise ProtocolError(f"{what} {value} must be between 0 and 9999999999")
    return str(value)


def mqtt_client_id(fleet: str, party: str) -> str:
    """The MQTT client id of a fleet's device or aggregator: `<fleet>-<party>`.

    A broker keeps one connection per client id and drops the older one when a second
    connects, so a bare device id would let `device-001` of two fleets knock each other off
    forever. Too long for 64 characters, it keeps a readable head and a hash of the whole.
    """
    whole = f"{check_id(fleet, 'fleet')}-{check_id(party, 'client')}"
    if len(whole) <= 64:
        return whole
    digest = hashlib.sha256(whole.encode()).hexdigest()[:12]
    return f"{whole[:51]}-{digest}"


def fleet_prefix(fleet: str) -> str:
    return f"{PREFIX}/{check_id(fleet, 'fleet')}"


def round_topic(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/round"


def model_manifest_topic(fleet: str, version: int) -> str:
    return f"{fleet_prefix(fleet)}/model/{_check_number(version, 'model version')}/manifest"


def model_body_topic(fleet: str, version: int) -> str:
    """Base topic of a spread body: chunk `i` lives at `<base>/<i>`."""
    return f"{fleet_prefix(fleet)}/model/{_check_number(version, 'model version')}/body"


def model_body_filter(fleet: str, version: int) -> str:
    """Subscription that receives every retained chunk of one model version's body."""
    return f"{model_body_topic(fleet, version)}/+"


def model_delta_topic(fleet: str, version: int) -> str:
    """Base topic of a version's spread delta: chunk `i` lives at `<base>/<i>`."""
    return f"{fleet_prefix(fleet)}/model/{_check_number(version, 'model version')}/delta"


def model_delta_filter(fleet: str, version: int) -> str:
    return f"{model_delta_topic(fleet, version)}/+"


def model_manifests_filter(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/model/+/manifest"


def model_filters(fleet: str) -> tuple[str, str, str]:
    """Every retained model topic of the fleet: the manifests, every body and delta chunk."""
    models = f"{fleet_prefix(fleet)}/model/+"
    return model_manifests_filter(fleet), f"{models}/body/+", f"{models}/delta/+"


def client_topic(fleet: str, device_id: str, kind: TopicKind) -> str:
    if kind not in CLIENT_KINDS:
        raise ValueError(f"{kind} is not a per-client topic")
    return f"{fleet_prefix(fleet)}/clients/{check_id(device_id, 'device id')}/{kind.value}"


def clients_filter(fleet: str, kind: TopicKind) -> str:
    """Subscription for one kind of per-client topic across the whole fleet."""
    if kind not in CLIENT_KINDS:
        raise ValueError(f"{kind} is not a per-client topic")
    return f"{fleet_prefix(fleet)}/clients/+/{kind.value}"


def parse_topic(topic: str) -> TopicAddress:
    """Inverse of the builders; any other shape, a wildcard or a bad id is a ProtocolError."""
    levels = topic.split("/")
    if len(levels) < 4 or "/".join(levels[:2]) != PREFIX:
        raise ProtocolError(f"topic {topic!r} is not under {PREFIX}/<fleet>/")
    fleet = check_id(levels[2], "fleet")
    rest = levels[3:]
    match rest:
        case ["round"]:
            return TopicAddress(fleet, TopicKind.ROUND)
        case ["model", version, "manifest"] if _NUMBER.fullmatch(version):
            return TopicAddress(fleet, TopicKind.MODEL_MANIFEST, model_version=int(version))
        case ["model", version, ("body" | "delta") as kind] if _NUMBER.fullmatch(version):
            return TopicAddress(fleet, TopicKind(kind), model_version=int(version))
        case ["model", version, ("body" | "delta") as kind, index] if _NUMBER.fullmatch(
            version
        ) and _NUMBER.fullmatch(index):
            return TopicAddress(
                fleet, TopicKind(kind), model_version=int(version), chunk_index=int(index)
            )
        case ["clients", device_id, kind] if kind in {k.value for k in CLIENT_KINDS}:
            return TopicAddress(fleet, TopicKind(kind), device_id=check_id(device_id, "device id"))
    raise ProtocolError(f"topic {topic!r} is not a fedfmx topic")
