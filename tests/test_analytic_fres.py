"""FRES on the closed-form head: block scores from held-out folds' statistics alone."""

import numpy as np
import pytest

from fedfmx.closed_form.fres import fres_block_scores, fres_keep
from fedfmx.closed_form.head import FeatureStatistics, solve_head, squared_error

OLD, NEW = ("a", "b"), ("c", "d")
CLASSES = (*OLD, *NEW)


def constructed(seed: int, rows: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """φ = [φ_0 (4): tells a from b, and both from c/d, which it cannot tell apart;
    noise (12): pure noise; new (2): tells c from d, and nothing else]."""
    rng = np.random.default_rng(seed)
    names = rng.choice(CLASSES, size=rows)
    shared = rng.normal(scale=0.3, size=(rows, 4))
    shared[names == "a", 0] += 2.0
    shared[names == "b", 1] += 2.0
    shared[np.isin(names, NEW), 2] += 2.0
    noise = rng.normal(size=(rows, 12))
    new = rng.normal(scale=0.3, size=(rows, 2))
    new[names == "c", 0] += 2.0
    new[names == "d", 1] += 2.0
    return np.hstack([shared, noise, new]), names


BLOCKS = (slice(0, 4), slice(4, 16), slice(16, 18))


def folds_of(seeds: tuple[int, ...]) -> list[FeatureStatistics]:
    return [FeatureStatistics.of(*constructed(seed)) for seed in seeds]


def test_noise_scores_negative_and_a_new_class_separator_positive() -> None:
    scores = fres_block_scores(folds_of((0, 1)), BLOCKS, CLASSES, NEW, lam=0.1)
    assert scores[1] < 0  # pure noise only overfits the held-out fold
    assert scores[2] > 0  # the only block that separates c from d
    assert scores[0] > 0  # the shared block carries the old classes
    np.testing.assert_array_equal(fres_keep(scores), [True, False, True])


def test_the_score_is_held_out_error_without_the_block_minus_with_it() -> None:
    """β = 1: plasticity minus stability is the total held-out squared error the block
    saves, checked against `squared_error` of heads fitted on the columns directly."""
    folds = folds_of((2, 3, 4))
    lam = 0.5
    scores = fres_block_scores(folds, BLOCKS, CLASSES, NEW, lam=lam)
    rows = sum(fold.samples for fold in folds)
    for b, block in enumerate(BLOCKS):
        keep = np.setdiff1d(np.arange(18), np.arange(18)[block])
        saved = 0.0
        for k, held in enumerate(folds):
            rest = [f for j, f in enumerate(folds) if j != k]
            for columns, sign in ((keep, 1.0), (np.arange(18), -1.0)):
                train = FeatureStatistics(
                    sum(f.gram for f in rest)[np.ix_(columns, columns)],
                    {
                        n: sum(f.moments.get(n, np.zeros(18)) for f in rest)[columns]
                        for n in CLASSES
                    },
                    {n: sum(f.counts.get(n, 0) for f in rest) for n in CLASSES},
                )
                test = FeatureStatistics(
                    held.gram[np.ix_(columns, columns)],
                    {n: m[columns] for n, m in held.moments.items()},
                    dict(held.counts),
                )
                head = solve_head(train, CLASSES, lam)
                saved += sign * squared_error(head, test, CLASSES)
        assert scores[b] == pytest.approx(saved / rows, rel=1e-9, abs=1e-12)


def test_beta_weighs_the_stability_cost() -> None:
    """A block that helps the new classes and hurts nothing old keeps its score whatever β;
    raising β lowers the score of a block whose removal would help the old classes."""
    folds = folds_of((5, 6))
    low = fres_block_scores(folds, BLOCKS, CLASSES, NEW, lam=0.1, beta=0.0)
    high = fres_block_scores(folds, BLOCKS, CLASSES, NEW, lam=0.1, beta=4.0)
    one = fres_block_scores(folds, BLOCKS, CLASSES, NEW, lam=0.1)
    # linear in β: u(β) = P − β·S
    np.testing.assert_allclose(one, low + (high - low) / 4.0, rtol=1e-9, atol=1e-12)
    assert high[1] < low[1]  # noise costs the old classes too


def test_fres_needs_two_folds_with_rows() -> None:
    with pytest.raises(ValueError, match="two folds"):
        fres_block_scores(folds_of((0,)), BLOCKS, CLASSES, NEW, lam=0.1)
