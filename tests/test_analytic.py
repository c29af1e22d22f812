"""The closed-form head's maths: exact sums, order-free merges, hand-computed cases, hostile
statistics."""

import itertools

import numpy as np
import pytest

from fedfmx.closed_form.head import (
    FeatureStatistics,
    choose_lambda,
    merged,
    pack_triangle,
    solve_head,
    squared_error,
    statistics_problem,
    triangle_shape,
    unpack_triangle,
)

CLASSES = ["bag", "coat", "dress", "shirt"]


def pooled_ridge(features: np.ndarray, names: np.ndarray, lam: float) -> np.ndarray:
    """Reference: `min ‖ΦW − Y‖² + λ‖W‖²` as least squares on `[Φ; √λ I] W = [Y; 0]`."""
    targets = np.stack([names == c for c in CLASSES], axis=1).astype(np.float64)
    dim = features.shape[1]
    system = np.vstack([features, np.sqrt(lam) * np.eye(dim)])
    rhs = np.vstack([targets, np.zeros((dim, len(CLASSES)))])
    solution, *_ = np.linalg.lstsq(system, rhs, rcond=None)
    return solution.T


def random_rows(seed: int, rows: int = 300, dim: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = np.maximum(rng.normal(size=(rows, dim)) + rng.normal(size=dim), 0)
    names = rng.choice(CLASSES, size=rows)
    return features, names


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_head_from_summed_statistics_equals_the_pooled_fit(seed: int) -> None:
    features, names = random_rows(seed)
    rng = np.random.default_rng(100 + seed)
    devices = rng.integers(0, 5, size=len(features))  # a random non-IID split over 5 devices
    parts = [FeatureStatistics.of(features[devices == k], names[devices == k]) for k in range(5)]
    order = rng.permutation(5)
    total = merged([parts[k] for k in order], features.shape[1])
    for lam in (1e-3, 0.5, 20.0):
        head = solve_head(total, CLASSES, lam)
        reference = pooled_ridge(features, names, lam)
        assert np.max(np.abs(head - reference)) < 1e-6
    assert total.counts == {c: int((names == c).sum()) for c in CLASSES if (names == c).any()}


def test_merging_is_order_free() -> None:
    features, names = random_rows(7, rows=60)
    parts = [FeatureStatistics.of(features[i::4], names[i::4]) for i in range(4)]
    heads = []
    for order in itertools.permutations(range(4)):
        pairwise = merged([parts[order[0]], parts[order[1]]], 12)  # a district pre-merge
        pairwise.add(merged([parts[order[2]], parts[order[3]]], 12))
        heads.append(solve_head(pairwise, CLASSES, 1.0))
    for head in heads[1:]:
        assert np.max(np.abs(head - heads[0])) < 1e-12


def test_hand_computed_head_and_error() -> None:
    # φ = [1, 0] is "bag", φ = [1, 1] is "coat": G = [[2, 1], [1, 1]], q_bag = [1, 0],
    # q_coat = [1, 1]; λ = 1: (G + I)⁻¹ = [[2, −1], [−1, 3]] / 5.
    stats = FeatureStatistics.of(np.array([[1.0, 0.0], [1.0, 1.0]]), ["bag", "coat"])
    np.testing.assert_array_equal(stats.gram, [[2, 1], [1, 1]])
    head = solve_head(stats, ["bag", "coat"], 1.0)
    np.testing.assert_allclose(head, [[0.4, -0.2], [0.2, 0.4]], atol=1e-12)
    # predictions: row 1 (bag) -> (0.4, 0.2), row 2 (coat) -> (0.2, 0.6)
    # error: (0.4 − 1)² + 0.2² + 0.2² + (0.6 − 1)² = 0.36 + 0.04 + 0.04 + 0.16 = 0.6
    assert squared_error(head, stats, ["bag", "coat"]) == pytest.approx(0.6, abs=1e-12)
    # a class the head does not know predicts zero: each of its rows adds 1
    # bag only: (0.4 − 1)² + 0.2² for its column, + 1 for the coat row: 1.4
    assert squared_error(head[:1], stats, ["bag"]) == pytest.approx(0.36 + 0.04 + 1.0, abs=1e-12)


def test_triangle_packs_in_blocks_of_d_plus_one() -> None:
    matrix = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    packed = pack_triangle(matrix)
    assert triangle_shape(3) == (2, 4) and triangle_shape(4) == (2, 5)
    np.testing.assert_array_equal(packed, [[1, 2, 3, 4], [5, 6, 0, 0]])
    np.testing.assert_array_equal(unpack_triangle(packed, 3), matrix)
    padded = packed.copy()
    padded[1, 3] = 1.0
    with pytest.raises(ValueError, match="padding"):
        unpack_triangle(padded, 3)


def test_lambda_is_chosen_by_the_error_on_held_out_folds() -> None:
    features, names = random_rows(3, rows=80, dim=30)  # few rows per dimension: λ matters
    half = len(features) // 2
    folds = [
        FeatureStatistics.of(features[:half], names[:half]),
        FeatureStatistics.of(features[half:], names[half:]),
    ]
    total = merged(folds, 30)
    scale = np.trace(total.gram) / 30
    candidates = [1e-6, 1e-2, 1.0, 100.0]
    chosen = choose_lambda(folds, CLASSES, candidates)
    errors = []
    for factor in candidates:
        error = 0.0
        for train, held in (
            (slice(half, None), slice(None, half)),
            (slice(None, half), slice(half, None)),
        ):
            head = pooled_ridge(features[train], names[train], factor * scale)
            predicted = features[held] @ head.T
            targets = np.stack([names[held] == c for c in CLASSES], axis=1)
            error += float(np.sum((predicted - targets) ** 2))
        errors.append(error)
    assert chosen == pytest.approx(candidates[int(np.argmin(errors))] * scale)
    assert choose_lambda([folds[0], FeatureStatistics.empty(30)], CLASSES, candidates) is None


def valid() -> FeatureStatistics:
    features, names = random_rows(5, rows=40, dim=6)
    return FeatureStatistics.of(features, names)


def problem(stats: FeatureStatistics) -> str | None:
    return statistics_problem(stats, 6, max_feature_norm=100.0, max_samples=1000)


def test_real_statistics_pass() -> None:
    assert problem(valid()) is None


def test_hostile_statistics_are_rejected_with_a_reason() -> None:
    asymmetric = valid()
    asymmetric.gram[0, 1] += 1.0
    assert "not symmetric" in str(problem(asymmetric))
    nan = valid()
    nan.gram[2, 2] = np.nan
    assert "non-finite" in str(problem(nan))
    nan_moment = valid()
    nan_moment.moments["bag"][0] = np.inf
    assert "non-finite" in str(problem(nan_moment))
    negative = valid()
    negative.counts["bag"] = -3
    assert "negative class count" in str(problem(negative))
    wrong = FeatureStatistics.of(np.ones((3, 5)), ["bag"] * 3)
    assert "expected [6, 6]" in str(problem(wrong))
    short_moment = valid()
    short_moment.moments["bag"] = np.ones(4)
    assert "dimension 6" in str(problem(short_moment))
    negative_diagonal = valid()
    negative_diagonal.gram[1, 1] = -50.0
    assert "negative diagonal" in str(problem(negative_diagonal))
    not_gram = valid()  # symmetric and finite, but no rows could give it
    not_gram.gram[0, 1] = not_gram.gram[1, 0] = 10 * np.sqrt(
        not_gram.gram[0, 0] * not_gram.gram[1, 1]
    )
    assert "Cauchy" in str(problem(not_gram))
    inflated = valid()
    inflated.moments["coat"] = inflated.moments["coat"] * 1e3
    assert "moment of class 'coat'" in str(problem(inflated))
    ghost = valid()
    ghost.counts["bag"] = 0
    assert "no rows" in str(problem(ghost))
    huge = valid()
    huge.gram = huge.gram * 1e6
    for name in huge.moments:
        huge.moments[name] = huge.moments[name] * 1e3
    assert "feature norm" in str(problem(huge))
    flood = valid()
    flood.counts["bag"] = 10**6
    assert "rows in all" in str(problem(flood))
    unnamed = valid()
    del unnamed.counts["bag"]
    assert "different classes" in str(problem(unnamed))


def test_rows_added_in_place_give_the_same_sums() -> None:
    features, names = random_rows(9, rows=50)
    stats = FeatureStatistics.empty(12)
    for start in range(0, 50, 16):
        stats.add_rows(features[start : start + 16].astype(np.float32), names[start : start + 16])
    reference = FeatureStatistics.of(features, names)
    np.testing.assert_allclose(stats.gram, reference.gram, rtol=1e-5)
    assert stats.counts == reference.counts
    for name, moment in reference.moments.items():
        np.testing.assert_allclose(stats.moments[name], moment, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        stats.add_rows(np.ones((2, 5)), ["bag", "coat"])
