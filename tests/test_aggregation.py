"""Merge maths: Fisher-weighted experts, per-class head rows, associativity."""

import numpy as np

from fedfmx.federation.aggregation import (
    ExpertSum,
    MergeSums,
    apply_merge,
    update_sums,
    usage_fractions,
    weighted_sum,
)
from fedfmx.wire.messages import UpdateHeader


def _header(
    device: str, head: list[str], counts: list[int], samples: int, usage: list[float]
) -> UpdateHeader:
    return UpdateHeader(
        fleet="f",
        device_id=device,
        round=0,
        base_version=0,
        num_samples=samples,
        expert_ids=[0],
        head_classes=head,
        class_counts=counts,
        expert_usage=usage,
        includes_fisher=True,
        train_loss=0.0,
    )


def test_expert_merge_is_fisher_weighted() -> None:
    a = ExpertSum(
        weighted_sum(np.array([1.0]), np.array([1.0])), weighted_sum(np.array([1.0]), 3.0)
    )
    b = ExpertSum(
        weighted_sum(np.array([3.0]), np.array([3.0])), weighted_sum(np.array([3.0]), 1.0)
    )
    a.add(b)
    # (1·1 + 3·3) / (1 + 3) = 2.5
    assert np.allclose(a.mean(), [2.5])


def test_expert_merge_falls_back_to_samples_where_fisher_is_zero() -> None:
    a = ExpertSum(
        weighted_sum(np.array([1.0, 1.0]), np.array([0.0, 1.0])),
        weighted_sum(np.array([1.0, 1.0]), 3.0),
    )
    b = ExpertSum(
        weighted_sum(np.array([3.0, 3.0]), np.array([0.0, 3.0])),
        weighted_sum(np.array([3.0, 3.0]), 1.0),
    )
    a.add(b)
    # coordinate 0: no Fisher → (3·1 + 1·3) / 4 = 1.5; coordinate 1: Fisher → 2.5
    assert np.allclose(a.mean(), [1.5, 2.5])


def _updates() -> list[tuple[UpdateHeader, dict[str, np.ndarray]]]:
    return [
        (
            _header("a", ["cat", "dog"], [2, 4], 6, [6.0, 0.0]),
            {
                "experts.0.w": np.array([1.0, 1.0], dtype=np.float32),
                "fisher.experts.0.w": np.array([1.0, 0.0], dtype=np.float32),
                "router.weight": np.array([1.0], dtype=np.float32),
                "head.rows": np.array([[1.0, 0.0], [5.0, 5.0]], dtype=np.float32),
            },
        ),
        (
            _header("b", ["dog"], [1], 2, [1.0, 1.0]),
            {
                "experts.0.w": np.array([3.0, 3.0], dtype=np.float32),
                "fisher.experts.0.w": np.array([3.0, 0.0], dtype=np.float32),
                "router.weight": np.array([4.0], dtype=np.float32),
                "head.rows": np.array([[0.0, 0.0]], dtype=np.float32),
            },
        ),
    ]


BASE = {
    "experts.0.w": np.zeros(2, dtype=np.float32),
    "router.weight": np.ones(1, dtype=np.float32),
    "head.weight": np.array([[1.0, 1.0]], dtype=np.float32),
}


def test_apply_merge_grows_registry_and_merges_each_part() -> None:
    sums = MergeSums()
    for header, tensors in _updates():
        sums.add(update_sums(header, tensors, ["cat"]))
    state, registry = apply_merge(BASE, ["cat"], sums)
    assert registry == ["cat", "dog"]
    # expert coord 0 Fisher-weighted (1·1+3·3)/4 = 2.5; coord 1 sample-weighted (6·1+2·3)/8 = 1.5
    assert np.allclose(state["experts.0.w"], [2.5, 1.5])
    # router sample-weighted: 1 + (6·1 + 2·4)/8 = 2.75
    assert np.allclose(state["router.weight"], [2.75])
    # cat: base [1,1] + [1,0]; dog (new, against zero): (4·[5,5] + 1·[0,0]) / 5 = [4,4]
    assert np.allclose(state["head.weight"], [[2.0, 1.0], [4.0, 4.0]])
    assert np.allclose(sums.usage, [7.0, 1.0])


def test_merge_is_associative() -> None:
    (ha, ta), (hb, tb) = _updates()
    together = MergeSums()
    together.add(update_sums(ha, ta, ["cat"]))
    together.add(update_sums(hb, tb, ["cat"]))
    district = MergeSums()
    district.add(update_sums(hb, tb, ["cat"]))
    upstream = MergeSums()
    upstream.add(update_sums(ha, ta, ["cat"]))
    upstream.add(district)
    one, _ = apply_merge(BASE, ["cat"], together)
    two, _ = apply_merge(BASE, ["cat"], upstream)
    for name in one:
        assert np.allclose(one[name], two[name])


def test_usage_fractions() -> None:
    assert usage_fractions(np.array([3.0, 1.0]), 2) == [0.75, 0.25]
    assert usage_fractions(None, 4) == [0.25] * 4
