"""A round's Gram matrix sent as its exact factor `F` (`G = FᵀF`, issue 14 item 4): the head
from factors is the head from triangles, factor and triangle updates merge order-free, hostile
factors are refused with a reason, and devices send the factor exactly when it is smaller."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedfmx.closed_form.head import (
    FeatureStatistics,
    factor_is_smaller,
    factor_problem,
    gram_factor,
    merged,
    solve_head,
)
from fedfmx.closed_form.state import FACTOR, MOMENTS, factor_tensors, fleet_folds
from fedfmx.config import FleetConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import initial_model, load_fleet_dataset, run_inproc
from tests.test_closed_form_federation import DIM, fleet, keeper_for, payload
from tests.test_statistics_partials import DEVICES, EAST, WEST, district_partial


def relu_rows(seed: int, rows: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """ReLU-like features (many exact zeros, as the random projection gives) and labels."""
    rng = np.random.default_rng(seed)
    features = np.maximum(rng.normal(size=(rows, dim)) + 0.3, 0)
    return features, rng.choice(["0", "1", "2"], size=rows)


def factor_payload(
    config: FleetConfig,
    features: np.ndarray,
    names: np.ndarray,
    device: str = "device-000",
    factor: np.ndarray | None = None,
    **changes: object,
) -> bytes:
    """An update carrying the exact factor of these rows (or `factor`, to break it)."""
    stats = FeatureStatistics.of(features, names)
    factor = gram_factor(features) if factor is None else factor
    tensors = factor_tensors(factor, stats.moments, stats.counts, sorted(stats.counts))
    fields: dict[str, object] = {"factor_rank": len(factor)} | changes
    return payload(config, stats, device, tensors=tensors, **fields)


def fleet_sum(keeper: RoundKeeper, config: FleetConfig) -> FeatureStatistics:
    weights, names = keeper.model.weights, keeper.model.class_names
    return merged(fleet_folds(weights, names, config.analytic.folds), DIM)


def test_hand_computed_factors() -> None:
    # two equal rows (1, 1): G = [[2, 2], [2, 2]], rank 1, σ = 2, v = (1, 1)/√2 → F = [√2, √2]
    np.testing.assert_allclose(gram_factor(np.array([[1.0, 1.0], [1.0, 1.0]])), [[2**0.5] * 2])
    # one row: σ = 5, v = (0.6, 0.8); its negation has the same G, hence the same factor
    np.testing.assert_allclose(gram_factor(np.array([[3.0, 4.0]])), [[3.0, 4.0]])
    np.testing.assert_allclose(gram_factor(np.array([[-3.0, -4.0]])), [[3.0, 4.0]])
    # orthogonal rows of norms 2 and 1: the rows themselves, largest σ first
    np.testing.assert_allclose(gram_factor(np.array([[0.0, 1.0], [2.0, 0.0]])), np.diag([2.0, 1]))
    # no signal at all: one zero row (a factor has at least one)
    np.testing.assert_array_equal(gram_factor(np.zeros((3, 4))), np.zeros((1, 4)))


@pytest.mark.parametrize(("rows", "dim"), [(5, 12), (12, 5), (40, 40)])
def test_the_factor_reproduces_the_gram_matrix_at_the_rows_rank(rows: int, dim: int) -> None:
    features, _ = relu_rows(rows * dim, rows, dim)
    features[1] = features[0]  # a repeated row lowers the rank by one: a row less to send
    factor = gram_factor(features)
    assert factor.shape == (np.linalg.matrix_rank(features), dim)
    gram = features.T @ features
    np.testing.assert_allclose(factor.T @ factor, gram, rtol=0, atol=1e-12 * np.abs(gram).max())


def test_the_factor_is_chosen_exactly_when_it_is_smaller() -> None:
    for dim, rows in itertools.product(range(1, 40), range(1, 60)):
        assert factor_is_smaller(rows, dim) == (dim * rows < dim * (dim + 1) // 2)
    assert factor_is_smaller(1024, 2048) and not factor_is_smaller(1025, 2048)


@pytest.mark.parametrize("seed", range(4))
def test_head_from_factors_equals_head_from_triangles(seed: int) -> None:
    rng = np.random.default_rng(seed)
    features, names = relu_rows(seed, 60)
    order = rng.permutation(60)
    cuts = np.sort(rng.choice(np.arange(1, 60), size=7, replace=False))
    parts = np.split(order, cuts)  # random non-IID splits, most of them under d/2 rows
    triangles = merged((FeatureStatistics.of(features[p], names[p]) for p in parts), DIM)
    factors = FeatureStatistics.empty(DIM)
    for part in parts:
        stats = FeatureStatistics.of(features[part], names[part])
        factor = gram_factor(features[part])
        factors.add(FeatureStatistics(factor.T @ factor, stats.moments, stats.counts))
    lam = 1e-2 * np.trace(triangles.gram) / DIM
    classes = ["0", "1", "2"]
    exact = solve_head(triangles, classes, lam)
    np.testing.assert_allclose(
        solve_head(factors, classes, lam), exact, rtol=0, atol=1e-6 * np.abs(exact).max()
    )


@pytest.mark.parametrize(("codec", "tolerance"), [({}, 1e-6), ({"quantize": "fp16"}, 2e-3)])
def test_factor_and_triangle_updates_merge_order_free_into_the_exact_sums(
    codec: dict[str, object], tolerance: float
) -> None:
    config = fleet(**codec)
    rows = [relu_rows(1, 6), relu_rows(2, 30), relu_rows(3, 5)]
    updates = {
        "device-000": factor_payload(config, *rows[0]),
        "device-001": payload(config, FeatureStatistics.of(*rows[1]), "device-001"),  # triangle
        "device-002": factor_payload(config, *rows[2], device="device-002"),
    }
    exact = merged((FeatureStatistics.of(*r) for r in rows), DIM)
    heads = []
    for order in itertools.permutations(updates):
        keeper = keeper_for(config)
        for device in order:
            assert keeper.accept(updates[device], device) is not None
        model = keeper.close_round()
        total = fleet_sum(keeper, config)
        assert total.counts == exact.counts
        scale = np.abs(exact.gram).max()
        np.testing.assert_allclose(total.gram, exact.gram, rtol=0, atol=tolerance * scale)
        heads.append(model.weights["head.weight"])
    for head in heads[1:]:  # the same sums in any order: the same head, to float64 rounding
        np.testing.assert_allclose(head, heads[0], rtol=0, atol=1e-9 * np.abs(heads[0]).max())


def test_a_factors_norm_is_bounded_as_the_triangles_trace_is() -> None:
    """`‖F‖²_F = tr(G) = Σ‖φ‖² ≤ N·B²`: rows of norm exactly `B` pass, 2 % more do not."""
    bound, rows = 10.0, 4
    directions = np.eye(rows, DIM)  # unit rows
    assert factor_problem(gram_factor(bound * directions), rows, DIM, bound) is None
    too_long = gram_factor(1.02 * bound * directions)
    assert "mean squared feature norm" in str(factor_problem(too_long, rows, DIM, bound))
    broken = gram_factor(directions)
    broken[0, 0] = np.inf
    assert factor_problem(broken, rows, DIM, bound) == "factor holds non-finite values"
    assert "expected [r, 16]" in str(factor_problem(np.ones((2, DIM + 1)), rows, DIM, bound))
    assert "allowed 1..4" in str(factor_problem(np.ones((5, DIM)), rows, DIM, bound))
    assert "allowed 1..4" in str(factor_problem(np.ones((0, DIM)), rows, DIM, bound))


def test_districts_form_g_from_factors_and_the_root_gets_the_flat_triangle_head() -> None:
    config = fleet()
    rows = {device: relu_rows(10 + i, 3 + 2 * i) for i, device in enumerate(DEVICES)}
    flat = RoundKeeper(config, initial_model(config))
    flat.open_round(0, DEVICES, 0.0)
    for device, (features, names) in rows.items():
        assert flat.accept(payload(config, FeatureStatistics.of(features, names), device))
    expected = flat.close_round()
    root = RoundKeeper(config, initial_model(config))
    root.open_round(0, DEVICES, 0.0)
    factors = {device: factor_payload(config, *r, device=device) for device, r in rows.items()}
    for district, members in (("west", WEST), ("east", EAST)):
        partial = district_partial(root, district, members, factors)
        assert root.accept_partial(partial, district, members) is not None
    merged_model = root.close_round()
    assert merged_model.class_names == expected.class_names
    for name, value in expected.weights.items():
        np.testing.assert_allclose(merged_model.weights[name], value, rtol=1e-5, atol=1e-7)


def hostile(config: FleetConfig, what: str) -> bytes:
    features, names = relu_rows(4, 6)
    factor = gram_factor(features)
    if what == "nan":
        factor[0, 3] = np.nan
        return factor_payload(config, features, names, factor=factor)
    if what == "wrong shape":
        return factor_payload(config, features, names, factor=np.hstack([factor, factor[:, :1]]))
    if what == "rank above rows":
        extra = np.vstack([factor, np.zeros((7 - len(factor), DIM))])  # 7 rows for 6 samples
        return factor_payload(config, features, names, factor=extra)
    if what == "rank above dim":
        wide, labels = relu_rows(5, DIM + 4)
        tall = np.vstack([gram_factor(wide), np.zeros((4, DIM))])  # d + 4 rows of 20 samples
        return factor_payload(config, wide, labels, factor=tall)
    if what == "absurd norm":
        return factor_payload(config, features, names, factor=1e3 * factor)
    if what == "inflated moment":
        stats = FeatureStatistics.of(features, names)
        tensors = factor_tensors(factor, stats.moments, stats.counts, sorted(stats.counts))
        tensors[MOMENTS][0] *= 1e3  # beyond √(n·G_ii) of the G the factor gives
        return payload(config, stats, tensors=tensors, factor_rank=len(factor))
    if what == "factor undeclared":
        return factor_payload(config, features, names, factor_rank=0)
    if what == "truncated":
        whole = factor_payload(config, features, names)
        return whole[: len(whole) // 2]
    raise AssertionError(what)


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("nan", "non-finite"),
        ("wrong shape", f"{FACTOR}: expected"),
        ("rank above rows", "factor of rank 7, allowed 1..6"),
        ("rank above dim", f"factor of rank {DIM + 4}, allowed 1..{DIM}"),
        ("absurd norm", "mean squared feature norm"),
        ("inflated moment", "moment of class"),
        ("factor undeclared", "tensor names differ"),
        ("truncated", "not valid safetensors"),
    ],
)
def test_hostile_factors_are_refused_with_a_reason_and_change_nothing(
    what: str, reason: str
) -> None:
    config = fleet()
    keeper = keeper_for(config)
    with pytest.raises(ProtocolError, match=reason):
        keeper.accept(hostile(config, what))
    assert keeper.close_round().version == 0


def test_devices_send_the_factor_when_smaller_and_the_head_is_the_triangles() -> None:
    """The in-process engine (the torch learner's path through `fedfmx.device.round`): with
    `send_factor` the updates of fewer than (d + 1)/2 rows carry the factor, fewer bytes
    travel, and the fleet's head is the one of the run that sends only triangles."""
    runs = {}
    for send_factor in (True, False):
        config = fleet(128, quantize="none")
        config = config.model_copy(
            update={"analytic": config.analytic.model_copy(update={"send_factor": send_factor})}
        )
        runs[send_factor] = run_inproc(config, load_fleet_dataset(config))
    with_factor, triangles = runs[True], runs[False]
    assert with_factor.uplink_bytes < 0.8 * triangles.uplink_bytes
    assert with_factor.final_model is not None and triangles.final_model is not None
    head, reference = (r.final_model.weights["head.weight"] for r in (with_factor, triangles))
    np.testing.assert_allclose(head, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
    assert with_factor.accuracy_matrix == triangles.accuracy_matrix
