"""A closed-form district's partial: its devices' feature statistics per fold. The root's head
from partials is the flat fleet's head; a re-sent partial counts once; a malformed, hostile or
out-of-step partial is a ProtocolError with its reason and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fedfmx.closed_form.head import FeatureStatistics
from fedfmx.closed_form.state import fold_of
from fedfmx.errors import ProtocolError
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.partials import (
    PartialHeader,
    decode_statistics_partial,
    encode_statistics_partial,
)
from tests.test_closed_form_federation import device_statistics, fleet, payload

DEVICES = ["device-000", "device-001", "device-002", "device-003"]
WEST, EAST = DEVICES[:2], DEVICES[2:]


def district_partial(
    root: RoundKeeper, district: str, devices: list[str], updates: dict[str, bytes] | None = None
) -> bytes:
    """What a district sends: its devices' statistics updates (`updates`, or triangles of
    `device_statistics`) accepted by its own keeper (on the same model version), then
    forwarded per fold."""
    own = RoundKeeper(root.fleet, root.model)
    own.open_round(0, devices, 0.0)
    for device in devices:
        stats = device_statistics(DEVICES.index(device))
        update = payload(root.fleet, stats, device) if updates is None else updates[device]
        assert own.accept(update) is not None
    current = own.current
    assert current is not None
    header = PartialHeader(
        fleet=root.fleet.name, district=district, round=0, base_version=0,
        updates=len(current.received), answered=len(devices), head_classes=[],
        new_classes=[], update_bytes=0,
        rows={d: (0, n) for d, n in current.rows.items()},
        fold_classes=[sorted(f.counts) for f in current.statistics],
    )  # fmt: skip
    return encode_statistics_partial(header, current.statistics)


def open_root() -> RoundKeeper:
    config = fleet()
    root = RoundKeeper(config, initial_model(config))
    root.open_round(0, DEVICES, 0.0)
    return root


def test_the_heads_from_partials_and_from_device_updates_are_the_same() -> None:
    flat = open_root()
    for index, device in enumerate(DEVICES):
        assert flat.accept(payload(flat.fleet, device_statistics(index), device)) is not None
    expected = flat.close_round()
    root = open_root()
    west = district_partial(root, "west", WEST)
    assert root.accept_partial(west, "west", WEST) is not None
    assert root.accept_partial(west, "west", WEST) is None  # the re-send counts once
    assert root.accept_partial(district_partial(root, "east", EAST), "east", EAST) is not None
    merged = root.close_round()
    assert merged.class_names == expected.class_names
    assert merged.weights.keys() == expected.weights.keys()
    for name, value in expected.weights.items():
        np.testing.assert_allclose(merged.weights[name], value, rtol=1e-6, atol=1e-9)


def west_parts() -> tuple[PartialHeader, list[FeatureStatistics]]:
    """A valid partial of the two west devices, to be broken one way at a time."""
    config = fleet()
    folds = [FeatureStatistics.empty(16) for _ in range(config.analytic.folds)]
    for device in WEST:
        folds[fold_of(device, config.analytic.folds)].add(device_statistics(DEVICES.index(device)))
    header = PartialHeader(
        fleet=config.name, district="west", round=0, base_version=0, updates=2, answered=2,
        head_classes=[], new_classes=[], update_bytes=0,
        rows={d: (0, 30) for d in WEST}, fold_classes=[sorted(f.counts) for f in folds],
    )  # fmt: skip
    return header, folds


def broken(what: str) -> bytes:
    header, folds = west_parts()
    if what == "fold missing":
        rows = {WEST[0]: (0, folds[0].samples)} if folds[0].samples else {}
        one = header.model_copy(update={"fold_classes": header.fold_classes[:1], "rows": rows})
        return encode_statistics_partial(one, folds[:1])
    if what == "rows inflated":
        payload = encode_statistics_partial(header, folds)
        return payload.replace(b"[0,30]", b"[0,31]", 1)
    if what == "hits beyond rows":
        return encode_statistics_partial(
            header.model_copy(update={"lambda_hits": [61.0, 0.0, 0.0, 0.0]}), folds
        )
    target = next(f for f in folds if f.samples)
    if what == "not a Gram matrix":
        target.gram[0, 1] = target.gram[1, 0] = 10 * np.abs(target.gram).max()
    elif what == "not finite":
        target.gram[0, 0] = np.nan
    elif what == "moment beyond its rows":
        name = sorted(target.counts)[0]
        target.moments[name] = target.moments[name] * 1e3
    return encode_statistics_partial(header, folds)


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("fold missing", "1 folds, the fleet 2"),
        ("rows inflated", "rows, not 61"),
        ("hits beyond rows", "lambda_hits"),
        ("not a Gram matrix", "rejected"),
        ("not finite", "not finite"),
        ("moment beyond its rows", "rejected"),
    ],
)
def test_hostile_statistics_partials_are_refused(what: str, reason: str) -> None:
    config = fleet()
    with pytest.raises(ProtocolError, match=reason):
        decode_statistics_partial(broken(what), 16, config.analytic)


@pytest.mark.parametrize(
    ("members", "rows_before", "reason"),
    [
        (["device-000", "device-009"], 0, "not of this district"),
        (WEST, 5, "follow row 5, the model holds 0"),
    ],
)
def test_rows_of_strangers_or_out_of_step_are_refused_and_change_nothing(
    members: list[str], rows_before: int, reason: str
) -> None:
    root = open_root()
    header, folds = west_parts()
    header = header.model_copy(update={"rows": {d: (rows_before, 30) for d in WEST}})
    with pytest.raises(ProtocolError, match=reason):
        root.accept_partial(encode_statistics_partial(header, folds), "west", members)
    assert root.close_round().version == 0
