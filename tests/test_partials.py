"""A district's partial on the wire: the root's sum of partials is the flat merge, and every
malformed or hostile partial is a ProtocolError with its reason."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import MergeSums, WeightedSum
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.wire import partials
from fedfmx.wire.codec import frame
from fedfmx.wire.partials import PartialHeader, decode_partial, encode_partial
from tests.district_helpers import flat_models, scripted_update, tree_fleet

ALL = [f"device-{i:03d}" for i in range(4)]


def district_partial(keeper: RoundKeeper, district: str, devices: list[str]) -> bytes:
    """What a district sends: its devices' updates folded by its own keeper."""
    own = RoundKeeper(keeper.fleet, keeper.model)
    own.open_round(0, devices, 0.0)
    for device in devices:
        own.accept(scripted_update(keeper.fleet, keeper.model.weights, device, 0), device)
    assert own.current is not None
    sums = own.current.sums
    header = PartialHeader(
        fleet=keeper.fleet.name, district=district, round=0, base_version=0,
        updates=sums.updates, answered=len(devices), head_classes=list(sums.head),
        new_classes=sums.new_classes, update_bytes=0,
    )  # fmt: skip
    return encode_partial(header, sums)


def test_the_sum_of_partials_is_the_flat_merge_and_a_resent_partial_counts_once() -> None:
    fleet = tree_fleet()
    expected = flat_models(fleet, [ALL])[0]
    from aggregator.service import first_model

    root = RoundKeeper(fleet, first_model(fleet))
    root.open_round(0, ALL, 0.0)
    first = district_partial(root, "district-00", ALL[::2])
    assert root.accept_partial(first, "district-00", ALL[::2]) is not None
    assert root.accept_partial(first, "district-00", ALL[::2]) is None  # the re-send
    second = district_partial(root, "district-01", ALL[1::2])
    assert root.accept_partial(second, "district-01", ALL[1::2])
    merged = root.close_round()
    assert merged.class_names == expected.class_names
    for name, value in expected.weights.items():
        np.testing.assert_allclose(merged.weights[name], value, rtol=1e-6, atol=1e-8)


def header(**changes: object) -> PartialHeader:
    fields: dict[str, object] = dict(
        fleet="tree", district="d", round=0, base_version=0, updates=0, answered=0,
        head_classes=[], new_classes=[], update_bytes=0,
    )  # fmt: skip
    return PartialHeader.model_validate(fields | changes)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p[:6], "bad magic"),
        (lambda p: p[:-10], "zstd body is corrupt"),  # truncated: the frame ends early
        (lambda p: b"FMXP" + b"\xff\xff\xff\xff" + p[8:], "runs past"),
    ],
)
def test_broken_framing_is_refused(mutate: object, reason: str) -> None:
    weights = {"router.weight": np.zeros((2, 3), np.float32), "head.weight": np.zeros((1, 3))}
    sums = MergeSums(updates=1, usage=np.ones(2))
    sums.shared["router.weight"] = WeightedSum(np.zeros((2, 3)), np.ones((2, 3)))
    payload = encode_partial(header(updates=1, answered=1), sums)
    with pytest.raises(ProtocolError, match=reason):
        decode_partial(mutate(payload), weights, 2, 10.0)  # type: ignore[operator]


def test_a_zstd_bomb_is_refused_before_it_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partials, "MAX_PARTIAL_BYTES", 100_000)
    bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))  # ~300 bytes, 10 MB inside
    payload = frame(partials.PARTIAL_MAGIC, header(), bomb)
    with pytest.raises(ProtocolError, match="decompresses beyond 100000 bytes"):
        decode_partial(payload, {"head.weight": np.zeros((1, 3))}, 2, 10.0)


def test_wrong_shapes_negative_weights_and_stray_tensors_are_refused() -> None:
    weights = {"router.weight": np.zeros((2, 3), np.float32), "head.weight": np.zeros((1, 3))}

    def refused(sums: MergeSums, reason: str, **changes: object) -> None:
        payload = encode_partial(
            header(**({"updates": sums.updates, "answered": 1} | changes)), sums
        )
        with pytest.raises(ProtocolError, match=reason):
            decode_partial(payload, weights, 2, 10.0)

    shape = MergeSums(updates=1, usage=np.ones(2))
    shape.shared["router.weight"] = WeightedSum(np.zeros((3, 2)), np.ones((3, 2)))
    refused(shape, "expected float64")
    negative = MergeSums(updates=1, usage=np.ones(2))
    negative.shared["router.weight"] = WeightedSum(np.zeros((2, 3)), -np.ones((2, 3)))
    refused(negative, "negative weight")
    stray = MergeSums(updates=1, usage=np.ones(2))
    stray.shared["backbone.secret"] = WeightedSum(np.zeros(2), np.ones(2))
    refused(stray, "unexpected tensor")
    usage = MergeSums(updates=1, usage=-np.ones(2))
    refused(usage, "usage")
    refused(MergeSums(updates=2, usage=np.ones(2)), "only 1 answered")
