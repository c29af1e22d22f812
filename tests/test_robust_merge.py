"""Robust merges (DESIGN §6): norm clipping, coordinate-wise median and trimmed mean.

Values are small enough to check by hand; each test says the arithmetic in a comment.
"""

from collections.abc import Mapping

import numpy as np
import pytest

from fedfmx.config import (
    DownlinkConfig,
    FedFMXConfig,
    FleetConfig,
    ModelConfig,
    RobustnessConfig,
    parse_fleet,
)
from fedfmx.errors import ConfigError
from fedfmx.federation.aggregation import (
    MergeSums,
    clip_update,
    coordinate_median,
    delta_norm,
    robust_delta,
    trimmed_mean,
    update_sums,
)
from fedfmx.federation.rounds import GlobalModel, RoundKeeper, expected_update_shapes
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import UpdateHeader

DEVICES = ["a", "b", "c", "d", "e"]


def _header(device: str, head: list[str], counts: list[int], samples: int = 1) -> UpdateHeader:
    return UpdateHeader(
        fleet="t",
        device_id=device,
        round=0,
        base_version=0,
        num_samples=samples,
        expert_ids=[0],
        head_classes=head,
        class_counts=counts,
        expert_usage=[1.0, 0.0],
        includes_fisher=True,
        train_loss=0.0,
    )


def test_clip_scales_every_delta_by_one_factor_and_leaves_fisher_alone() -> None:
    tensors = {
        "experts.0.w": np.array([3.0, 0.0], dtype=np.float32),
        "fisher.experts.0.w": np.array([10.0, 10.0], dtype=np.float32),
        "head.rows": np.array([[0.0, 4.0]], dtype=np.float32),
    }
    # ‖δ‖ = √(3² + 4²) = 5 (Fisher left out); bound 2.5 → factor 0.5
    assert delta_norm(tensors) == 5.0
    clipped, factor = clip_update(tensors, 2.5)
    assert factor == 0.5
    assert np.array_equal(clipped["experts.0.w"], [1.5, 0.0])
    assert np.array_equal(clipped["head.rows"], [[0.0, 2.0]])
    assert np.array_equal(clipped["fisher.experts.0.w"], [10.0, 10.0])
    # within the bound: untouched
    same, factor = clip_update(tensors, 5.0)
    assert factor == 1.0
    assert all(np.array_equal(same[n], tensors[n]) for n in tensors)


def test_median_and_trimmed_mean_ignore_one_outlier() -> None:
    stack = np.array([[1.0, -2.0], [2.0, -1.0], [3.0, 0.0], [4.0, 1.0], [1000.0, -1000.0]])
    # sorted columns: [1, 2, 3, 4, 1000] and [-1000, -2, -1, 0, 1]
    assert np.array_equal(coordinate_median(stack), [3.0, -1.0])
    # β = 0.2, n = 5 → k = 1 dropped at each end: (2+3+4)/3 = 3, (-2-1+0)/3 = -1
    assert np.allclose(trimmed_mean(0.2)(stack), [3.0, -1.0])
    # n = 4 → k = ⌊0.8⌋ = 0: the plain mean (1+2+3+1000)/4
    assert np.allclose(trimmed_mean(0.2)(stack[[0, 1, 2, 4], :1]), [251.5])
    # even count: the median is the mean of the middle two
    assert np.array_equal(coordinate_median(stack[:4]), [2.5, -0.5])
    with pytest.raises(ValueError, match="outside"):
        trimmed_mean(0.5)


def _round() -> list[tuple[UpdateHeader, dict[str, np.ndarray]]]:
    """Five devices; "e" is hostile: huge deltas, huge Fisher, a huge sample count."""
    updates = []
    for i, device in enumerate(DEVICES):
        hostile = device == "e"
        value = 1000.0 if hostile else float(i + 1)
        tensors = {
            "experts.0.w": np.array([value, -value], dtype=np.float32),
            "fisher.experts.0.w": np.array([1e6 if hostile else 1.0] * 2, dtype=np.float32),
            "router.weight": np.array([value], dtype=np.float32),
            "head.rows": np.array([[value, 0.0], [9.0, 9.0]], dtype=np.float32),
        }
        # "dog" is reported by a and b only, and with zero samples by c: it does not count
        counts = [1, 1 if device in "ab" else 0]
        header = _header(device, ["cat", "dog"], counts, samples=10**6 if hostile else 1)
        updates.append((header, tensors))
    return updates


def test_robust_delta_is_per_tensor_and_per_head_row_over_the_senders() -> None:
    delta = robust_delta(_round(), ["cat"], coordinate_median)
    # values 1, 2, 3, 4, 1000: the median is 3 whatever e's Fisher and sample count claim
    assert np.array_equal(delta.tensors["experts.0.w"], [3.0, -3.0])
    assert np.array_equal(delta.tensors["router.weight"], [3.0])
    assert "fisher.experts.0.w" not in delta.tensors
    assert np.array_equal(delta.head["cat"], [3.0, 0.0])
    # dog: rows of a and b only (c sent count 0), median of two = their mean
    assert np.array_equal(delta.head["dog"], [9.0, 9.0])
    assert delta.new_classes == ["dog"]
    assert delta.usage is not None and np.array_equal(delta.usage, [5.0, 0.0])
    trimmed = robust_delta(_round(), ["cat"], trimmed_mean(0.2))
    # k = 1 of 5: (2 + 3 + 4) / 3 = 3
    assert np.allclose(trimmed.tensors["router.weight"], [3.0])


def test_the_weighted_mean_follows_the_outlier() -> None:
    sums = MergeSums()
    for header, tensors in _round():
        sums.add(update_sums(header, tensors, ["cat"]))
    delta = sums.delta()
    # Fisher-weighted: (1+2+3+4 + 1e6·1000) / (4 + 1e6) ≈ 999.99: the hostile device wins
    assert delta.tensors["experts.0.w"][0] > 999.0


# -- the round keeper --------------------------------------------------------------------------


def _keeper(robustness: RobustnessConfig) -> RoundKeeper:
    fleet = FleetConfig(
        name="t",
        method="fedfmx",
        fedfmx=FedFMXConfig(k_max=2),
        model=ModelConfig(backbone_channels=[4], feature_dim=8, num_experts=2, expert_hidden=4),
        robustness=robustness,
        # the merge itself, exactly: the published version is the merged one (lossless delta)
        downlink=DownlinkConfig(quantize="none"),
    )
    keeper = RoundKeeper(fleet, initial_model(fleet))
    keeper.open_round(0, DEVICES, deadline_unix=0.0)
    return keeper


def _payload(keeper: RoundKeeper, device: str, value: float, samples: int = 4) -> bytes:
    header = _header(device, ["cat"], [samples], samples).model_copy(
        update={"expert_ids": [1], "expert_usage": [1.0, 3.0], "train_loss": 0.5}
    )
    shapes = expected_update_shapes(header, keeper.model.weights)
    tensors = {name: np.full(shape, value, dtype=np.float32) for name, shape in shapes.items()}
    return encode_update(header, tensors).payload


def _moved(keeper: RoundKeeper, before: Mapping[str, np.ndarray]) -> GlobalModel:
    model = keeper.close_round()
    assert model.version == 1
    for name in ("experts.1.fc1.weight", "router.bias"):
        assert not np.array_equal(model.weights[name], before[name])
    return model


@pytest.mark.parametrize(
    "robustness",
    [RobustnessConfig(merge="median"), RobustnessConfig(merge="trimmed_mean", trim_fraction=0.2)],
    ids=["median", "trimmed_mean"],
)
def test_keeper_robust_merge_ignores_a_hostile_device(robustness: RobustnessConfig) -> None:
    keeper = _keeper(robustness)
    before = {name: value.copy() for name, value in keeper.model.weights.items()}
    for device, value in zip(DEVICES, [0.01, 0.02, 0.03, 0.04, 50.0], strict=True):
        samples = 10_000 if value == 50.0 else 4
        assert keeper.accept(_payload(keeper, device, value, samples)) is not None
    assert keeper.current is not None and len(keeper.current.updates) == 5
    assert all(not n.startswith("fisher.") for _, t in keeper.current.updates for n in t)
    model = _moved(keeper, before)
    # median of 0.01..0.04, 50 = 0.03; trimmed (k = 1): (0.02 + 0.03 + 0.04) / 3 = 0.03
    for name in ("experts.1.fc1.weight", "router.bias"):
        assert np.allclose(model.weights[name], before[name] + 0.03, atol=1e-6)
    # expert 0 was sent by nobody: it keeps its base values
    assert np.array_equal(model.weights["experts.0.fc1.weight"], before["experts.0.fc1.weight"])
    assert np.allclose(model.weights["head.weight"], 0.03, atol=1e-6)
    assert model.class_names == ["cat"]
    # usage is summed as in the mean: 5·[1, 3] → [0.25, 0.75]
    assert model.expert_usage == [0.25, 0.75]


def test_keeper_clips_before_the_mean() -> None:
    keeper = _keeper(RobustnessConfig())
    header_only = _payload(keeper, "a", 0.01)
    count = sum(int(np.prod(s)) for n, s in _shapes(keeper).items() if not n.startswith("fisher"))
    norm = 0.01 * np.sqrt(count)
    clipped = _keeper(RobustnessConfig(clip_norm=float(norm) / 2))
    before = clipped.model.weights["router.bias"].copy()
    # a's ‖δ‖ = 0.01·√N, the bound is half of it → every delta halves: 0.005
    assert clipped.accept(header_only) is not None
    model = clipped.close_round()
    assert np.allclose(model.weights["router.bias"], before + 0.005, atol=1e-7)
    assert np.allclose(model.weights["head.weight"], 0.005, atol=1e-7)


def _shapes(keeper: RoundKeeper) -> dict[str, tuple[int, ...]]:
    header = _header("a", ["cat"], [4]).model_copy(update={"expert_ids": [1]})
    return expected_update_shapes(header, keeper.model.weights)


def _reference_mean(
    keeper: RoundKeeper, payloads: list[tuple[UpdateHeader, dict[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    """The merge as it was before robust merges existed, written out: `θ + Σ w⊙δ / Σ w`."""
    state = {n: v.copy() for n, v in keeper.model.weights.items()}
    sums = MergeSums()
    for header, tensors in payloads:
        sums.add(update_sums(header, tensors, keeper.model.class_names))
    for name, expert_sum in sums.experts.items():
        state[name] = state[name] + expert_sum.mean()
    for name, shared_sum in sums.shared.items():
        state[name] = state[name] + shared_sum.mean()
    head = np.zeros((1, state["head.weight"].shape[1]), dtype=np.float32)
    head[0] += sums.head["cat"].mean()
    state["head.weight"] = head
    return state


def test_default_merge_is_the_associative_weighted_mean_bit_for_bit() -> None:
    keeper = _keeper(RobustnessConfig())
    assert keeper.fleet.robustness == FleetConfig().robustness
    rng = np.random.default_rng(0)
    decoded = []
    for device, samples in zip(DEVICES[:3], [3, 5, 7], strict=True):
        header = _header(device, ["cat"], [samples], samples).model_copy(update={"expert_ids": [1]})
        tensors = {
            name: rng.normal(size=shape).astype(np.float32)
            for name, shape in expected_update_shapes(header, keeper.model.weights).items()
        }
        tensors = {n: np.abs(v) if n.startswith("fisher.") else v for n, v in tensors.items()}
        decoded.append((header, tensors))
        assert keeper.accept(encode_update(header, tensors).payload) is not None
    assert keeper.current is not None and keeper.current.updates == []
    expected = _reference_mean(keeper, decoded)
    model = keeper.close_round()
    for name, value in expected.items():
        assert np.array_equal(model.weights[name], value), name


def test_robustness_section_from_yaml() -> None:
    fleet = parse_fleet({"robustness": {"merge": "trimmed_mean", "trim_fraction": 0.2}})
    assert fleet.robustness.merge == "trimmed_mean"
    assert fleet.robustness.clip_norm is None
    with pytest.raises(ConfigError, match=r"robustness\.trim_fraction"):
        parse_fleet({"robustness": {"trim_fraction": 0.5}})
    with pytest.raises(ConfigError, match=r"robustness\.merge"):
        parse_fleet({"robustness": {"merge": "krum"}})
