"""The aggregator's round logic: validation, duplicates, registry growth."""

import numpy as np
import pytest

from fedfmx.config import FedFMXConfig, FleetConfig, ModelConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.rounds import RoundKeeper, expected_update_shapes
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import UpdateHeader

FLEET = FleetConfig(
    name="t",
    method="fedfmx",
    fedfmx=FedFMXConfig(k_max=2),
    model=ModelConfig(backbone_channels=[4], feature_dim=8, num_experts=2, expert_hidden=4),
)


def _keeper() -> RoundKeeper:
    keeper = RoundKeeper(FLEET, initial_model(FLEET))
    keeper.open_round(0, ["a", "b"], deadline_unix=0.0)
    return keeper


def _payload(keeper: RoundKeeper, device: str = "a", **changes: object) -> bytes:
    fields: dict[str, object] = dict(
        fleet="t",
        device_id=device,
        round=0,
        base_version=0,
        num_samples=4,
        expert_ids=[1],
        head_classes=["cat"],
        class_counts=[4],
        expert_usage=[1.0, 3.0],
        train_loss=0.5,
    )
    fields.update(changes)
    header = UpdateHeader.model_validate(fields)
    shapes = expected_update_shapes(header, keeper.model.weights)
    tensors = {name: np.full(shape, 0.01, dtype=np.float32) for name, shape in shapes.items()}
    return encode_update(header, tensors).payload


def test_accepts_and_merges_an_update_growing_the_registry() -> None:
    keeper = _keeper()
    before = keeper.model.weights["experts.1.fc1.weight"].copy()
    assert keeper.accept(_payload(keeper)) is not None
    model = keeper.close_round()
    assert model.version == 1
    assert model.class_names == ["cat"]
    assert np.allclose(model.weights["experts.1.fc1.weight"], before + 0.01)
    assert np.allclose(model.weights["head.weight"], 0.01)
    assert model.expert_usage == [0.25, 0.75]


def test_duplicate_delivery_counts_once() -> None:
    keeper = _keeper()
    payload = _payload(keeper)
    assert keeper.accept(payload) is not None
    assert keeper.accept(payload) is None
    before = keeper.model.weights["router.bias"].copy()
    model = keeper.close_round()
    assert np.allclose(model.weights["router.bias"], before + 0.01)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"round": 3}, "round 3"),
        ({"base_version": 7}, "version 7"),
        ({"fleet": "other"}, "fleet 'other'"),
        ({"device_id": "z"}, "not a participant"),
        ({"expert_ids": [5]}, "outside"),
    ],
)
def test_rejects_updates_that_do_not_fit_the_round(changes: dict[str, object], reason: str) -> None:
    keeper = _keeper()
    with pytest.raises(ProtocolError, match=reason):
        keeper.accept(
            _payload(keeper, **changes) if "expert_ids" not in changes else _bad_experts(keeper)
        )


def _bad_experts(keeper: RoundKeeper) -> bytes:
    header = UpdateHeader(
        fleet="t",
        device_id="a",
        round=0,
        base_version=0,
        num_samples=1,
        expert_ids=[5],
        head_classes=[],
        class_counts=[],
        expert_usage=[0.0, 0.0],
        train_loss=0.0,
    )
    return encode_update(header, {"head.rows": np.zeros((0, 8), dtype=np.float32)}).payload


def test_sender_must_match_header() -> None:
    keeper = _keeper()
    with pytest.raises(ProtocolError, match="came from 'b'"):
        keeper.accept(_payload(keeper), sender="b")


def test_a_round_without_updates_keeps_the_version() -> None:
    keeper = _keeper()
    assert keeper.close_round().version == 0


def test_the_reject_norm_comes_from_the_fleet_and_new_classes_are_registered_sorted() -> None:
    strict = FLEET.model_copy(
        update={"robustness": FLEET.robustness.model_copy(update={"max_update_norm": 0.01})}
    )
    keeper = RoundKeeper(strict, initial_model(strict))
    keeper.open_round(0, ["a", "b"], deadline_unix=0.0)
    with pytest.raises(ProtocolError, match=r"exceeds the bound 0\.01"):
        keeper.accept(_payload(keeper))  # every delta 0.01: its norm is well above 0.01
    keeper = _keeper()  # the default bound admits the same update
    keeper.accept(_payload(keeper, "a", head_classes=["zebra"]))
    keeper.accept(_payload(keeper, "b", head_classes=["cat"]))
    assert keeper.close_round().class_names == ["cat", "zebra"]  # not in arrival order
