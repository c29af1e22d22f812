"""Feature statistics through the codec and the aggregator: compact wire forms, strict
validation, and a federated closed-form head that equals the centralised one."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfmx.closed_form.head import FeatureStatistics, solve_head
from fedfmx.closed_form.state import (
    CANDIDATES,
    FLEET_SUMS_PREFIX,
    GRAM,
    LAMBDA,
    MOMENTS,
    ROWS_PREFIX,
    fleet_folds,
    prequential_hits,
    statistics_tensors,
)
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import ProtocolError
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import initial_model, load_fleet_dataset, make_plan, run_inproc
from fedfmx.learner.model import build_model
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model, encode_update
from fedfmx.wire.messages import UpdateHeader

CI_FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"
DIM = 16


def fleet(dim: int = DIM, **codec: object) -> FleetConfig:
    base = load_fleet(CI_FLEET).model_dump()
    base |= {"method": "ridge", "codec": codec}
    base["model"] |= {"random_features": dim}
    return FleetConfig.model_validate(base)


def keeper_for(config: FleetConfig) -> RoundKeeper:
    keeper = RoundKeeper(config, initial_model(config))
    keeper.open_round(0, ["device-000", "device-001", "device-002"], deadline_unix=0.0)
    return keeper


def device_statistics(
    seed: int, classes: tuple[str, ...] = ("0", "1"), dim: int = DIM
) -> FeatureStatistics:
    rng = np.random.default_rng(seed)
    features = np.maximum(rng.normal(size=(30, dim)) + 0.5, 0)
    return FeatureStatistics.of(features, rng.choice(classes, size=30))


def payload(
    config: FleetConfig,
    stats: FeatureStatistics,
    device: str = "device-000",
    tensors: dict[str, np.ndarray] | None = None,
    **changes: object,
) -> bytes:
    classes = sorted(stats.counts)
    fields: dict[str, object] = dict(
        fleet=config.name,
        device_id=device,
        round=0,
        base_version=0,
        num_samples=stats.samples,
        expert_ids=[],
        head_classes=classes,
        class_counts=[stats.counts[c] for c in classes],
        expert_usage=[0.0] * config.model.num_experts,
        includes_statistics=True,
        codec=config.codec,
        train_loss=0.0,
    )
    fields.update(changes)
    header = UpdateHeader.model_validate(fields)
    return encode_update(header, tensors or statistics_tensors(stats, classes)).payload


@pytest.mark.parametrize(
    ("codec", "tolerance"), [({}, 1e-6), ({"quantize": "fp16"}, 2e-3), ({"quantize": "int8"}, 2e-2)]
)
def test_statistics_cross_the_codec_and_merge_into_the_exact_head(
    codec: dict[str, object], tolerance: float
) -> None:
    config = fleet(**codec)
    keeper = keeper_for(config)
    parts = [device_statistics(1), device_statistics(2, ("1", "2"))]
    for device, stats in zip(("device-000", "device-001"), parts, strict=True):
        assert keeper.accept(payload(config, stats, device)) is not None
    model = keeper.close_round()
    assert model.class_names == ["0", "1", "2"]
    total = FeatureStatistics.empty(DIM)
    for stats in parts:
        total.add(stats)
    stored = fleet_folds(model.weights, model.class_names, config.analytic.folds)
    merged = FeatureStatistics.empty(DIM)
    for fold in stored:
        merged.add(fold)
    assert merged.counts == total.counts
    scale = np.abs(total.gram).max()
    assert np.max(np.abs(merged.gram - total.gram)) <= tolerance * scale
    lam = float(model.weights[LAMBDA][0])
    exact = solve_head(total, model.class_names, lam)
    assert (
        np.max(np.abs(model.weights["head.weight"] - exact)) <= 50 * tolerance * np.abs(exact).max()
    )


def test_devices_are_sent_the_head_but_not_the_fleets_sums() -> None:
    config = fleet(dim=256)
    keeper = keeper_for(config)
    stats = device_statistics(4, dim=256)
    assert keeper.accept(payload(config, stats)) is not None
    keeper.close_round()
    _, stored = decode_model(keeper.model_payload(), max_bytes=MAX_MODEL_BYTES)
    _, sent = decode_model(keeper.device_payload(), max_bytes=MAX_MODEL_BYTES)
    sums = {name for name in stored if name.startswith(FLEET_SUMS_PREFIX)}
    assert sums and not sums & set(sent)
    assert set(stored) - sums == set(sent)
    for name in ("head.weight", CANDIDATES, LAMBDA, ROWS_PREFIX + "device-000"):
        np.testing.assert_array_equal(sent[name], stored[name])
    saved = sum(stored[name].nbytes for name in sums)
    assert len(keeper.device_payload()) <= len(keeper.model_payload()) - saved


def test_compact_forms_shrink_the_payload() -> None:
    dim = 64
    stats = device_statistics(3, dim=dim)
    sizes = {q: len(payload(fleet(dim, quantize=q), stats)) for q in ("none", "fp16", "int8")}
    dense = 4 * dim * dim  # a full fp32 Gram matrix alone
    triangle = 4 * 32 * 65  # its upper triangle in ⌈d/2⌉ blocks of d + 1
    moments = 4 * 2 * dim
    assert triangle + moments < sizes["none"] < triangle + moments + 1000  # header and framing
    assert sizes["none"] < 0.6 * dense
    assert sizes["fp16"] < 0.55 * sizes["none"] + 1000
    assert sizes["int8"] < 0.3 * sizes["none"] + 1000


def hostile(config: FleetConfig, what: str) -> bytes:
    stats = device_statistics(4)
    classes = sorted(stats.counts)
    tensors = statistics_tensors(stats, classes)
    if what == "nan":
        tensors[GRAM][0, 0] = np.nan
        return payload(config, stats, tensors=tensors)
    if what == "not a gram":
        tensors[GRAM][0, 1] = 1e3  # G_01 far beyond √(G_00·G_11)
        return payload(config, stats, tensors=tensors)
    if what == "inflated moment":
        tensors[MOMENTS][0] *= 1e3
        return payload(config, stats, tensors=tensors)
    if what == "wrong shape":
        tensors[GRAM] = np.zeros((3, 3), dtype=np.float32)
        return payload(config, stats, tensors=tensors)
    if what == "negative count":
        return payload(config, stats, class_counts=[-1, stats.samples + 1])
    if what == "count mismatch":
        return payload(config, stats, num_samples=stats.samples + 5)
    if what == "repeated class":
        return payload(config, stats, head_classes=["0", "0"])
    if what == "rows out of step":
        return payload(config, stats, rows_before=7)
    if what == "too many hits":
        return payload(config, stats, lambda_hits=[0, 0, 0, stats.samples + 1])
    if what == "hits of another grid":
        return payload(config, stats, lambda_hits=[1, 2])
    raise AssertionError(what)


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("nan", "non-finite"),
        ("not a gram", "Cauchy"),
        ("inflated moment", "moment of class"),
        ("wrong shape", "stats.gram: expected"),
        ("negative count", "non-negative count"),
        ("count mismatch", "not the sum of class_counts"),
        ("repeated class", "twice"),
        ("rows out of step", "follow row 7"),
        ("too many hits", "lambda_hits"),
        ("hits of another grid", "lambda_hits"),
    ],
)
def test_hostile_statistics_are_refused_and_change_nothing(what: str, reason: str) -> None:
    config = fleet()
    keeper = keeper_for(config)
    with pytest.raises(ProtocolError, match=reason):
        keeper.accept(hostile(config, what))
    assert keeper.close_round().version == 0


def lose_one_update(device: str, update: bytes, _: object) -> bytes:
    """The aggregator never gets device-001's first update (it arrives mangled)."""
    if device == "device-001" and not lose_one_update.done:  # type: ignore[attr-defined]
        lose_one_update.done = True  # type: ignore[attr-defined]
        return b"lost"
    return update


@pytest.mark.parametrize("lossy", [False, True])
def test_federated_ridge_equals_the_head_fitted_on_all_rows_held(lossy: bool) -> None:
    config = fleet()
    dataset = load_fleet_dataset(config)
    lose_one_update.done = False  # type: ignore[attr-defined]
    result = run_inproc(config, dataset, tamper=lose_one_update if lossy else None)
    # a lost update's rows travel again in the device's next round: the sums stay complete
    assert sum(r.rejected for r in result.rounds) == (1 if lossy else 0)
    final = result.final_model
    assert final is not None
    # every train row some device met, through the same fixed feature map
    plan = make_plan(config, dataset)
    last = plan.num_rounds - 1
    rows = np.unique(
        np.concatenate(
            [plan.stream(k, config.seed).available(r) for k in range(3) for r in range(last + 1)]
        )
    )
    network = build_model(config.network, config.routing, 0, config.seed)
    with torch.no_grad():
        features = network.closed_form_features(torch.from_numpy(dataset.train_x[rows]))
    names = np.array(dataset.class_names)[dataset.train_y[rows]]
    pooled = FeatureStatistics.of(features.double().numpy(), names)
    lam = float(final.weights[LAMBDA][0])
    exact = solve_head(pooled, final.class_names, lam)
    assert np.max(np.abs(final.weights["head.weight"] - exact)) < 1e-4 * np.abs(exact).max()
    assert result.final_accuracy > 0.5  # 16 random features of 8x8 digits; chance is 0.1


def test_prequential_hits_count_right_answers_of_each_candidate_head() -> None:
    # two candidates over classes a, b in 2-d: the first says x0 -> a, the second x1 -> a
    heads = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    weights = {"analytic.candidates": heads}
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    hits = prequential_hits(weights, ["a", "b"], rows, ["a", "b", "new"])
    # candidate 0: a ✓, b ✓, new ✗ (no head row can be right); candidate 1: b ✗, a ✗, ✗
    np.testing.assert_array_equal(hits, [2, 0])
    assert len(prequential_hits({}, ["a"], rows, ["a"] * 3)) == 0


def test_lambda_follows_the_most_prequential_hits() -> None:
    config = fleet()
    keeper = keeper_for(config)
    stats = device_statistics(6)
    keeper.accept(payload(config, stats, lambda_hits=[0, 3, 9, 1]))
    model = keeper.close_round()
    scale = np.trace(stats.gram) / DIM
    assert float(model.weights[LAMBDA][0]) == pytest.approx(config.analytic.lambdas[2] * scale)
    np.testing.assert_array_equal(model.weights["analytic.hits"], [0, 3, 9, 1])
    assert model.weights["analytic.candidates"].shape == (4, 2, DIM)


def test_int8_statistics_of_wide_relu_features_pass_validation() -> None:
    # many near-silent ReLU features: their small G_ii round to 0 in int8 blocks
    dim = 256
    config = fleet(dim, quantize="int8")
    keeper = keeper_for(config)
    rng = np.random.default_rng(8)
    features = np.maximum(rng.normal(size=(200, dim)) - rng.uniform(0, 3, size=dim), 0)
    stats = FeatureStatistics.of(features, rng.choice(["0", "1", "2"], size=200))
    assert keeper.accept(payload(config, stats)) is not None
