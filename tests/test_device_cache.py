"""A device with a pretrained backbone trains on cached trunk features: same update, fewer trunk
passes, exemplar replay intact."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import pytest

from fedfmx.config import FleetConfig
from fedfmx.data.datasets import load_digits, subsample
from fedfmx.device.learner import DeviceLearner
from fedfmx.federation.rounds import RoundKeeper, expected_update_shapes
from fedfmx.federation.simulation import initial_model, own_partition
from fedfmx.wire.codec import decode_update
from fedfmx.wire.messages import UpdateHeader

ROUNDS = 3
"""Rounds 0-1 learn task 0; round 2 meets task 1 (Fisher, exemplars, replay, FRES)."""


def fleet(
    method: str = "fedfmx", cache_mb: int = 64, backbone: str = "efficientnet_lite0"
) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "name": "cache-test",
            "method": method,
            "data": {"dataset": "digits"},
            "protocol": {"num_tasks": 5, "num_clients": 1, "rounds_per_task": 2, "max_lag": 0},
            "model": {
                "backbone": backbone,
                "feature_dim": 16,
                "num_experts": 4,
                "expert_hidden": 8,
            },
            "fedfmx": {"k_max": 2, "max_experts_per_round": 2, "fisher_samples": 32},
            "training": {
                "local_epochs": 1,
                "batch_size": 16,
                "lr": 0.05,
                "exemplars_per_class": 4,
                "feature_cache_mb": cache_mb,
            },
        }
    )


def learner(config: FleetConfig, cache_dir: Path | None = None) -> DeviceLearner:
    dataset = subsample(load_digits(), train_per_class=12, test_per_class=1, seed=0)
    samples, stream = own_partition(config, dataset, 0)
    return DeviceLearner("d0", config, samples, stream, seed=3, cache_dir=cache_dir)


Decoded = tuple[UpdateHeader, dict[str, np.ndarray]]


def run_rounds(
    config: FleetConfig, devices: list[DeviceLearner], before_round: object = None
) -> list[list[Decoded]]:
    """Every device answers the same announcement and model each round; the first device's
    update is merged, so all of them start every round from the same weights."""
    keeper = RoundKeeper(config, initial_model(config))
    answers: list[list[Decoded]] = [[] for _ in devices]
    for round_index in range(ROUNDS):
        announcement = keeper.open_round(round_index, ["d0"], deadline_unix=0.0)
        header, weights = keeper.model_header(), keeper.model.weights
        payloads = [device.handle_round(announcement, header, weights) for device in devices]
        for answer, payload in zip(answers, payloads, strict=True):
            assert payload is not None
            answer.append(
                decode_update(
                    payload,
                    lambda h, base=weights: expected_update_shapes(h, base),
                    max_bytes=1 << 30,
                    norm_bound=math.inf,
                )
            )
        keeper.accept(payloads[0])
        keeper.close_round()
    return answers


@pytest.mark.parametrize("method", ["fedfmx", "fedlwf"])
def test_cached_features_send_the_same_update_as_images(method: str) -> None:
    """fedfmx covers FRES, the Fisher of a closed task and replay; fedlwf the teacher."""
    cached, uncached = learner(fleet(method)), learner(fleet(method, cache_mb=0))
    assert cached.feature_cache is not None and uncached.feature_cache is None
    with_cache, without = run_rounds(fleet(method), [cached, uncached])
    for (header, tensors), (plain_header, plain_tensors) in zip(with_cache, without, strict=True):
        assert header.expert_ids == plain_header.expert_ids
        assert header.head_classes == plain_header.head_classes
        assert header.class_counts == plain_header.class_counts
        assert header.train_loss == pytest.approx(plain_header.train_loss, rel=1e-4)
        assert tensors.keys() == plain_tensors.keys()
        for name, value in tensors.items():
            # the trunk's float32 rounding differs with batch shape (~1e-5): not bit-equal
            np.testing.assert_allclose(value, plain_tensors[name], rtol=1e-3, atol=1e-5)
    assert cached.state.old_fisher.keys() == uncached.state.old_fisher.keys()


def test_exemplars_are_replayed_from_cached_features(tmp_path: Path) -> None:
    config = fleet()
    device = learner(config, cache_dir=tmp_path)
    cache = device.feature_cache
    assert cache is not None
    keeper = RoundKeeper(config, initial_model(config))
    misses: list[int] = []
    headers = []
    for round_index in range(ROUNDS):
        announcement = keeper.open_round(round_index, ["d0"], deadline_unix=0.0)
        before = cache.stats.misses
        payload = device.handle_round(announcement, keeper.model_header(), keeper.model.weights)
        assert payload is not None
        misses.append(cache.stats.misses - before)
        headers.append(keeper.accept(payload))
        keeper.close_round()
    held_new = len(device.state.held)
    # round 2: the trunk ran on the new task's rows only; exemplars and the Fisher sample of
    # task 0 were all hits
    assert misses[2] == held_new
    assert cache.stats.hits >= len(device.exemplars) + held_new
    task0 = set(headers[0].head_classes)  # type: ignore[union-attr]
    replayed = set(headers[2].head_classes) & task0  # type: ignore[union-attr]
    assert replayed == set(device.exemplars.classes()) == task0
    assert len(list(tmp_path.glob("*.safetensors"))) == len(cache) == sum(misses)


def test_no_cache_for_the_cnn_or_a_zero_budget_and_the_scratch_folder_goes() -> None:
    assert learner(fleet(backbone="cnn")).feature_cache is None
    assert learner(fleet(cache_mb=0)).feature_cache is None
    device = learner(fleet())
    assert device.feature_cache is not None
    scratch = device.feature_cache.root
    assert scratch.is_dir()
    del device
    gc.collect()
    assert not scratch.exists()
