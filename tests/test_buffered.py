"""Buffered aggregation's maths: the staleness weight, the bound, rebased head rows."""

import math

import numpy as np
import pytest

from fedfmx.config import FedFMXConfig, FleetConfig, ModelConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.buffered import BufferKeeper, staleness_weight
from fedfmx.federation.rounds import GlobalModel, expected_update_shapes
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import UpdateHeader

FLEET = FleetConfig.model_validate(
    {
        "name": "t",
        "method": "fedfmx",
        "fedfmx": FedFMXConfig(k_max=2).model_dump(),
        "model": ModelConfig(
            backbone_channels=[4], feature_dim=8, num_experts=2, expert_hidden=4
        ).model_dump(),
        "service": {"mode": "buffered", "buffered": {"size": 2, "max_staleness": 2}},
    }
)
EXPERT = "experts.1.fc1.weight"


def _keeper(registries: dict[int, list[str]]) -> BufferKeeper:
    keeper = BufferKeeper(FLEET, initial_model(FLEET), registries.get)
    keeper.open_round(0, ["a", "b"], deadline_unix=0.0)
    return keeper


def _payload(
    keeper: BufferKeeper, base_version: int, value: float, classes: tuple[str, ...] = ("cat",)
) -> bytes:
    header = UpdateHeader(
        fleet="t",
        device_id="a",
        round=base_version,
        base_version=base_version,
        num_samples=4,
        expert_ids=[1],
        head_classes=list(classes),
        class_counts=[4] * len(classes),
        expert_usage=[1.0, 3.0],
        train_loss=0.5,
    )
    shapes = expected_update_shapes(header, keeper.model.weights)
    tensors = {name: np.full(shape, value, dtype=np.float32) for name, shape in shapes.items()}
    return encode_update(header, tensors).payload


def _at_version(keeper: BufferKeeper, version: int, class_names: list[str]) -> None:
    """Pretend the fleet made `version` (same weights, this registry, a head row each)."""
    weights = dict(keeper.model.weights)
    weights["head.weight"] = np.full((len(class_names), 8), 0.5, dtype=np.float32)
    keeper.model = GlobalModel(version, weights, class_names, keeper.model.expert_usage)
    keeper.open_round(version, ["a", "b"], deadline_unix=0.0)


def test_the_staleness_weight_is_one_over_root_one_plus_tau() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert [staleness_weight(t) for t in range(4)] == sorted(
        (staleness_weight(t) for t in range(4)), reverse=True
    )


def test_a_stale_delta_moves_the_model_by_its_staleness_weight() -> None:
    keeper = _keeper({0: [], 1: ["cat"], 2: ["cat"]})
    _at_version(keeper, 2, ["cat"])
    before = keeper.model.weights[EXPERT].copy()
    header, tensors, staleness = keeper.admit(_payload(keeper, 0, 0.04, ()), "a")
    assert staleness == 2
    keeper.fold_stale(header, tensors, staleness)
    model = keeper.close_round()
    moved = model.weights[EXPERT] - before
    assert np.allclose(moved, 0.04 / math.sqrt(3.0), atol=1e-6)


def test_an_update_staler_than_the_bound_is_refused_with_its_reason() -> None:
    keeper = _keeper({0: [], 3: ["cat"]})
    _at_version(keeper, 3, ["cat"])
    with pytest.raises(ProtocolError, match=r"^stale: trained from version 0, 3 versions behind"):
        keeper.admit(_payload(keeper, 0, 0.01), "a")


def test_an_update_from_a_version_not_made_yet_is_refused() -> None:
    keeper = _keeper({0: []})
    with pytest.raises(ProtocolError, match="open is round 0 / version 0"):
        keeper.admit(_payload(keeper, 1, 0.01), "a")


def test_a_row_learnt_from_zero_is_rebased_when_its_class_was_registered_since() -> None:
    """The device met "cat" as new (its row is absolute); the fleet registered "cat" meanwhile
    (row 0.5): the merge moves that row toward the device's, weighted by s(τ)."""
    keeper = _keeper({0: [], 1: ["cat"]})
    _at_version(keeper, 1, ["cat"])
    header, tensors, staleness = keeper.admit(_payload(keeper, 0, 0.1), "a")
    keeper.fold_stale(header, tensors, staleness)
    model = keeper.close_round()
    assert model.class_names == ["cat"]
    expected = 0.5 + (0.1 - 0.5) * staleness_weight(1)
    assert np.allclose(model.weights["head.weight"][0], expected, atol=1e-5)


def test_buffered_mode_refuses_a_merge_that_is_not_associative_sums() -> None:
    document = FLEET.model_dump(mode="json")
    document["robustness"] = {"merge": "median"}
    with pytest.raises(ValueError, match=r"service\.mode buffered"):
        FleetConfig.model_validate(document)
    assert FleetConfig.model_validate(
        {"method": "fedfmx", "protocol": {"num_clients": 5}}
    ).buffer_size == 3
