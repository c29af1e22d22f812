"""Topics between a district aggregator and the root, on the root's broker (bridged).

    fedfmx/v1/<fleet>/districts/<id>/round     retained, root → district: the signed round
                                               announcement naming the district's devices (the
                                               bridge maps it to the district's own
                                               `fedfmx/v1/<fleet>/round`, so devices read it
                                               where they always do)
    fedfmx/v1/<fleet>/districts/<id>/partial   district → root: one chunked partial per round
    fedfmx/v1/<fleet>/districts/<id>/status    retained, district → root: its devices (JSON)

Model versions travel on the fleet's usual `model/...` topics, bridged root → district.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfmx.compat import StrEnum
from fedfmx.errors import ProtocolError
from transport.topics import PREFIX, check_id, fleet_prefix


class DistrictTopic(StrEnum):
    ROUND = "round"
    PARTIAL = "partial"
    STATUS = "status"


def district_prefix(fleet: str, district: str) -> str:
    return f"{fleet_prefix(fleet)}/districts/{check_id(district, 'district id')}/"


def district_topic(fleet: str, district: str, kind: DistrictTopic) -> str:
    return district_prefix(fleet, district) + kind.value


def districts_filter(fleet: str, kind: DistrictTopic) -> str:
    """One kind of district topic across every district."""
    return f"{fleet_prefix(fleet)}/districts/+/{kind.value}"


@dataclass(frozen=True)
class DistrictAddress:
    fleet: str
    district: str
    kind: DistrictTopic


def parse_district_topic(topic: str) -> DistrictAddress:
    """Inverse of `district_topic`; any other shape or a bad id is a ProtocolError."""
    levels = topic.split("/")
    if (
        len(levels) != 6
        or "/".join(levels[:2]) != PREFIX
        or levels[3] != "districts"
        or levels[5] not in {k.value for k in DistrictTopic}
    ):
        raise ProtocolError(f"topic {topic[:200]!r} is not a district topic")
    return DistrictAddress(
        check_id(levels[2], "fleet"), check_id(levels[4], "district id"), DistrictTopic(levels[5])
    )
