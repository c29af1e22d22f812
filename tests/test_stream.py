"""The class-incremental protocol: task split, Dirichlet shares, lags and per-client streams."""

from __future__ import annotations

import numpy as np
import pytest

from fedfmx.data.stream import (
    IncrementalPlan,
    StreamPosition,
    class_order,
    client_lags,
    dirichlet_partition,
    split_tasks,
)
from fedfmx.errors import ConfigError, DataError


def test_class_order_is_a_seeded_permutation() -> None:
    order = class_order(10, seed=7)
    assert sorted(order) == list(range(10))
    assert order == class_order(10, seed=7)
    assert order != class_order(10, seed=8)


def test_split_tasks_is_consecutive_with_sizes_differing_by_at_most_one() -> None:
    assert split_tasks([3, 1, 4, 0, 2], 2) == [[3, 1, 4], [0, 2]]
    assert split_tasks(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_tasks([5, 6], 2) == [[5], [6]]
    assert split_tasks([5, 6], 1) == [[5, 6]]


@pytest.mark.parametrize("num_tasks", [0, 6])
def test_split_tasks_rejects_impossible_counts(num_tasks: int) -> None:
    with pytest.raises(ConfigError, match=r"1\.\.5"):
        split_tasks(range(5), num_tasks)


def check_partition(parts: list[np.ndarray], n: int) -> None:
    assert all(len(part) > 0 for part in parts)
    assert all(np.array_equal(part, np.sort(part)) for part in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n, "overlap or loss"
    assert set(joined.tolist()) == set(range(n))


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of H(client's label histogram), in nats."""
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_partition_is_disjoint_covering_non_empty_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 5, 0.5, np.random.default_rng(0))
    assert len(parts) == 5
    check_partition(parts, len(labels))
    again = dirichlet_partition(labels, 5, 0.5, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_skews_clients_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(1)
    skewed = np.mean(
        [mean_label_entropy(dirichlet_partition(labels, 5, 0.1, rng), labels) for _ in range(5)]
    )
    mixed = np.mean(
        [mean_label_entropy(dirichlet_partition(labels, 5, 100.0, rng), labels) for _ in range(5)]
    )
    # Near-IID clients see all 10 classes almost evenly: entropy close to ln 10 ≈ 2.30.
    assert mixed > 2.2
    assert skewed < 1.5
    assert skewed < mixed - 0.8


def test_dirichlet_partition_fills_empty_clients_from_the_largest() -> None:
    # alpha = 1e-3 puts nearly all of each class on one client, so with 5 samples of one
    # class and 5 clients most clients start empty and must each receive one sample.
    labels = np.zeros(5, dtype=np.int64)
    parts = dirichlet_partition(labels, 5, 1e-3, np.random.default_rng(2))
    assert [len(part) for part in parts] == [1, 1, 1, 1, 1]
    check_partition(parts, 5)
    two_classes = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    check_partition(dirichlet_partition(two_classes, 4, 1e-3, np.random.default_rng(3)), 8)


def test_dirichlet_partition_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(np.zeros(4, np.int64), 2, 0.0, rng)
    with pytest.raises(ConfigError, match="3 clients cannot share only 2 samples"):
        dirichlet_partition(np.zeros(2, np.int64), 3, 1.0, rng)


def test_client_lags_are_seeded_and_within_range() -> None:
    lags = client_lags(200, 2, np.random.default_rng(0))
    assert set(lags) == {0, 1, 2}
    assert lags == client_lags(200, 2, np.random.default_rng(0))
    assert client_lags(3, 0, np.random.default_rng(0)) == [0, 0, 0]
    with pytest.raises(ConfigError):
        client_lags(3, -1, np.random.default_rng(0))


def hand_plan(lags: list[int]) -> IncrementalPlan:
    """Two tasks of R = 3 rounds; client 0 holds 10 then 6 samples, client 1 holds 4 then 3."""
    return IncrementalPlan(
        tasks=[[0, 1], [2, 3]],
        client_indices=[  # [task][client]
            [np.arange(0, 10), np.arange(10, 14)],
            [np.arange(20, 26), np.arange(26, 29)],
        ],
        lags=lags,
        rounds_per_task=3,
    )


def test_positions_for_lag_zero_and_lag_two() -> None:
    plan = hand_plan([0, 2])
    assert plan.num_rounds == 6
    assert [plan.task_of_round(g) for g in range(6)] == [0, 0, 0, 1, 1, 1]
    prompt, late = plan.stream(0, seed=0), plan.stream(1, seed=0)
    assert [prompt.position(g) for g in range(6)] == [
        StreamPosition(0, 0), StreamPosition(0, 1), StreamPosition(0, 2),
        StreamPosition(1, 0), StreamPosition(1, 1), StreamPosition(1, 2),
    ]  # fmt: skip
    # Lag 2: nothing for two rounds, task 0 in rounds 2-4 (still task 0 while the aggregator
    # is on task 1 in rounds 3-4), and the last task for only R - L = 1 round.
    assert [late.position(g) for g in range(6)] == [
        StreamPosition(None, 0), StreamPosition(None, 0), StreamPosition(0, 0),
        StreamPosition(0, 1), StreamPosition(0, 2), StreamPosition(1, 0),
    ]  # fmt: skip


def test_rounds_outside_the_plan_are_rejected() -> None:
    plan = hand_plan([0, 2])
    with pytest.raises(ValueError, match=r"0\.\.5"):
        plan.task_of_round(6)
    with pytest.raises(ValueError):
        plan.stream(0, seed=0).position(-1)
    with pytest.raises(ValueError):
        plan.stream(2, seed=0)


def test_chunks_arrive_one_per_round_and_the_last_task_arrives_in_full() -> None:
    plan = hand_plan([0, 2])
    prompt, late = plan.stream(0, seed=0), plan.stream(1, seed=0)
    # Lag 0: R - 0 = 3 chunks; 10 samples -> 4 + 3 + 3, then task 1's 6 samples -> 2 + 2 + 2.
    assert [len(prompt.available(g)) for g in range(6)] == [4, 7, 10, 2, 4, 6]
    # Lag 2: max(1, 3 - 2) = 1 chunk, so everything on the first round of each task.
    assert [len(late.available(g)) for g in range(6)] == [0, 0, 4, 4, 4, 3]
    assert late.available(0).dtype == np.int64
    assert set(prompt.available(2).tolist()) == set(range(10))
    assert set(prompt.available(5).tolist()) == set(range(20, 26))
    assert set(late.available(4).tolist()) == set(range(10, 14))
    assert set(late.available(5).tolist()) == set(range(26, 29))
    # Each round's holdings extend the previous round's (a stream, not a re-draw).
    np.testing.assert_array_equal(prompt.available(1)[:4], prompt.available(0))
    np.testing.assert_array_equal(prompt.available(2)[:7], prompt.available(1))


def test_lag_one_caps_at_the_last_chunk_while_the_aggregator_moves_on() -> None:
    stream = hand_plan([1, 0]).stream(0, seed=0)
    positions = [stream.position(g) for g in range(6)]
    assert positions == [
        StreamPosition(None, 0), StreamPosition(0, 0), StreamPosition(0, 1),
        StreamPosition(0, 2), StreamPosition(1, 0), StreamPosition(1, 1),
    ]  # fmt: skip
    # 2 chunks (5 + 5) for task 0, and the third round in it holds no more than the second;
    # task 1's 6 samples arrive as 3 + 3 in its only two rounds.
    assert [len(stream.available(g)) for g in range(6)] == [0, 5, 10, 10, 3, 6]


def test_stream_order_is_seeded_per_client() -> None:
    plan = hand_plan([0, 0])
    first = plan.stream(0, seed=5).available(0)
    np.testing.assert_array_equal(first, plan.stream(0, seed=5).available(0))
    orders = {tuple(plan.stream(0, seed=s).available(2).tolist()) for s in range(5)}
    assert len(orders) > 1


def build(**overrides: object) -> IncrementalPlan:
    arguments: dict[str, object] = {
        "train_y": np.repeat(np.arange(6), 20),
        "num_classes": 6,
        "num_tasks": 3,
        "num_clients": 4,
        "alpha": 0.5,
        "max_lag": 1,
        "rounds_per_task": 3,
        "seed": 11,
    }
    arguments.update(overrides)
    return IncrementalPlan.build(**arguments)  # type: ignore[arg-type]


def test_build_partitions_each_task_over_all_clients() -> None:
    plan = build()
    train_y = np.repeat(np.arange(6), 20)
    assert plan.tasks == split_tasks(class_order(6, 11), 3)
    assert len(plan.lags) == 4 and all(0 <= lag <= 1 for lag in plan.lags)
    assert plan.num_rounds == 9
    for task, shares in zip(plan.tasks, plan.client_indices, strict=True):
        assert len(shares) == 4
        assert all(len(share) > 0 for share in shares)
        joined = np.concatenate(shares)
        assert sorted(joined.tolist()) == np.flatnonzero(np.isin(train_y, task)).tolist()
        assert set(train_y[joined].tolist()) == set(task)


def test_build_is_reproducible_and_explicit_lags_leave_partitions_alone() -> None:
    plan, again = build(), build()
    fixed = build(lags=[2, 0, 1, 0])
    other = build(seed=12)
    assert plan.lags == again.lags and plan.tasks == again.tasks
    assert fixed.lags == [2, 0, 1, 0]
    tables = (plan.client_indices, again.client_indices, fixed.client_indices)
    for a, b, c in zip(*tables, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert plan.tasks != other.tasks or any(
        not np.array_equal(x, y)
        for a, b in zip(plan.client_indices, other.client_indices, strict=True)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"max_lag": 3}, r"max_lag \(3\) must be < rounds_per_task \(3\)"),
        ({"lags": [0, 1]}, "one entry per client"),
        ({"lags": [0, 1, 3, 0]}, r"lags must lie in 0\.\.2"),
        ({"lags": [0, -1, 0, 0]}, r"lags must lie in 0\.\.2"),
        ({"rounds_per_task": 0}, "rounds_per_task must be >= 1"),
        ({"num_tasks": 7}, r"num_tasks must lie in 1\.\.6"),
    ],
)
def test_build_rejects_plans_where_a_client_would_miss_a_task(
    overrides: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(**overrides)


def test_build_rejects_labels_beyond_num_classes() -> None:
    with pytest.raises(DataError, match=r"0\.\.4"):
        build(num_classes=5)
