"""Topic layout: builders and parser agree; wildcards and bad ids never pass."""

from __future__ import annotations

import pytest

from fedfmx.errors import ProtocolError
from transport.topics import (
    TopicAddress,
    TopicKind,
    client_topic,
    clients_filter,
    model_body_filter,
    model_body_topic,
    model_manifest_topic,
    model_manifests_filter,
    parse_topic,
    round_topic,
)


def test_builders_and_parser_round_trip() -> None:
    assert parse_topic(round_topic("demo")) == TopicAddress("demo", TopicKind.ROUND)
    assert parse_topic(model_manifest_topic("demo", 3)) == TopicAddress(
        "demo", TopicKind.MODEL_MANIFEST, model_version=3
    )
    assert parse_topic(model_body_topic("demo", 3)) == TopicAddress(
        "demo", TopicKind.MODEL_BODY, model_version=3
    )
    assert parse_topic(model_body_topic("demo", 3) + "/12") == TopicAddress(
        "demo", TopicKind.MODEL_BODY, model_version=3, chunk_index=12
    )
    for kind in (TopicKind.HELLO, TopicKind.STATUS, TopicKind.UPDATE, TopicKind.INBOX):
        topic = client_topic("demo", "pi-4_07", kind)
        assert topic == f"fedfmx/v1/demo/clients/pi-4_07/{kind.value}"
        assert parse_topic(topic) == TopicAddress("demo", kind, device_id="pi-4_07")


def test_filters_have_the_expected_shape() -> None:
    assert clients_filter("demo", TopicKind.UPDATE) == "fedfmx/v1/demo/clients/+/update"
    assert model_body_filter("demo", 2) == "fedfmx/v1/demo/model/2/body/+"
    assert model_manifests_filter("demo") == "fedfmx/v1/demo/model/+/manifest"


@pytest.mark.parametrize(
    "topic",
    [
        "fedfmx/v1/demo/clients/+/update",
        "fedfmx/v1/demo/clients/#",
        "fedfmx/v1/de+mo/round",
        "fedfmx/v1/demo/clients/a/b/update",
        "fedfmx/v1/demo/clients//hello",
        "fedfmx/v1/demo/clients/x/unknown",
        "fedfmx/v2/demo/round",
        "fedfmx/v1/demo/model/01/manifest",
        "fedfmx/v1/demo/model/-1/manifest",
        "fedfmx/v1/demo/round/extra",
        f"fedfmx/v1/demo/clients/{'a' * 65}/hello",
        "fedfmx/v1/demo",
    ],
)
def test_parser_rejects_foreign_and_hostile_topics(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "é", "a" * 65])
def test_builders_reject_ids_that_are_not_one_safe_level(bad_id: str) -> None:
    with pytest.raises(ProtocolError):
        client_topic("demo", bad_id, TopicKind.HELLO)
    with pytest.raises(ProtocolError):
        round_topic(bad_id)


def test_fleet_wide_kinds_are_not_client_topics() -> None:
    with pytest.raises(ValueError):
        client_topic("demo", "dev", TopicKind.ROUND)
    with pytest.raises(ProtocolError):
        model_manifest_topic("demo", -1)
