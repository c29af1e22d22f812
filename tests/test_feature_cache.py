"""The on-disk feature cache: hits and misses, LRU eviction at the budget, corrupt entries."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.errors import ConfigError
from fedfmx.learner.model import build_model
from fedfmx.trunk.feature_cache import FeatureCache, trunk_feature_fn
from fedfmx.trunk.pretrained import BACKBONE_ID, TRUNK_FEATURES, PretrainedBackbone

DIM = 16


class CountingTrunk:
    """A stand-in trunk: a fixed random projection that records the rows it was asked for."""

    def __init__(self) -> None:
        self.weights = np.random.default_rng(0).normal(size=(4 * 4, DIM)).astype(np.float32)
        self.rows = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.rows += len(images)
        return images.reshape(len(images), 4 * 4) @ self.weights


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 4, 4), dtype=np.float32)


def entry_bytes(tmp_path: Path) -> int:
    """The size of one entry, measured on a scratch cache."""
    probe = FeatureCache(tmp_path / "probe", "probe", max_bytes=1 << 20)
    probe.features(images(1), CountingTrunk())
    return probe.size_bytes


def test_second_request_hits_and_only_new_rows_reach_the_trunk(tmp_path: Path) -> None:
    trunk = CountingTrunk()
    cache = FeatureCache(tmp_path, "test-trunk", max_bytes=1 << 20)
    first = cache.features(images(10), trunk, batch_size=4)
    assert trunk.rows == 10 and cache.stats.misses == 10 and len(cache) == 10
    again = cache.features(images(10), trunk)
    assert trunk.rows == 10 and cache.stats.hits == 10
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, trunk(images(10)), rtol=1e-6)  # kept as float32
    cache.features(np.concatenate([images(10), images(1, seed=1)]), trunk)
    assert trunk.rows == 10 + 10 + 1


def test_another_backbone_never_reads_these_features(tmp_path: Path) -> None:
    FeatureCache(tmp_path, "trunk-a", max_bytes=1 << 20).features(images(3), CountingTrunk())
    other, trunk = FeatureCache(tmp_path, "trunk-b", max_bytes=1 << 20), CountingTrunk()
    other.features(images(3), trunk)
    assert trunk.rows == 3


def test_budget_evicts_the_least_recently_used_entry(tmp_path: Path) -> None:
    size = entry_bytes(tmp_path)
    root = tmp_path / "cache"
    cache = FeatureCache(root, "test-trunk", max_bytes=3 * size)
    rows = images(4)
    trunk = CountingTrunk()
    cache.features(rows[:3], trunk)
    cache.features(rows[:1], trunk)  # row 0 is now more recent than rows 1 and 2
    cache.features(rows[3:], trunk)
    assert cache.stats.evictions == 1 and len(cache) == 3
    assert sum(path.stat().st_size for path in root.iterdir()) <= 3 * size
    before = trunk.rows
    cache.features(rows[[0, 2, 3]], trunk)
    assert trunk.rows == before  # row 1 was the one evicted
    cache.features(rows[1:2], trunk)
    assert trunk.rows == before + 1


def test_reopening_keeps_entries_and_applies_a_smaller_budget_oldest_first(
    tmp_path: Path,
) -> None:
    size = entry_bytes(tmp_path)
    root = tmp_path / "cache"
    cache = FeatureCache(root, "test-trunk", max_bytes=10 * size)
    rows = images(3)
    cache.features(rows, CountingTrunk())
    for age, sample in enumerate(rows):  # row 0 oldest, as a device's last use would leave it
        os.utime(root / f"{cache.key(sample)}.safetensors", ns=(age * 10**9, age * 10**9))
    (root / "half-written.123.tmp").write_bytes(b"partial")
    reopened = FeatureCache(root, "test-trunk", max_bytes=2 * size)
    assert len(reopened) == 2 and reopened.stats.evictions == 1
    assert not (root / "half-written.123.tmp").exists()
    trunk = CountingTrunk()
    reopened.features(rows[1:], trunk)
    assert trunk.rows == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:-1] + bytes([data[-1] ^ 0x01]),  # one flipped bit in the values
        lambda data: b"not a safetensors file",
    ],
    ids=["truncated", "bit-flip", "garbage"],
)
def test_corrupt_entry_is_logged_deleted_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[bytes], bytes]
) -> None:
    cache = FeatureCache(tmp_path, "test-trunk", max_bytes=1 << 20)
    rows = images(2)
    good = cache.features(rows, CountingTrunk())
    path = tmp_path / f"{cache.key(rows[1])}.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    trunk = CountingTrunk()
    with caplog.at_level(logging.WARNING, logger="fedfmx.trunk.feature_cache"):
        recovered = cache.features(rows, trunk)
    assert trunk.rows == 1 and cache.stats.corrupt == 1
    assert "dropping entry" in caplog.text
    np.testing.assert_allclose(recovered, good, rtol=1e-5)  # one row alone: BLAS rounding
    cache.features(rows, trunk)
    assert trunk.rows == 1  # the recomputed entry was stored intact


def test_a_zero_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="positive byte budget"):
        FeatureCache(Path("unused"), "test-trunk", max_bytes=0)


def test_empty_request_keeps_the_feature_width(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "test-trunk", max_bytes=1 << 20)
    assert cache.features(images(0), CountingTrunk()).shape == (0, DIM)


def test_cached_trunk_features_drive_the_model_like_images(tmp_path: Path) -> None:
    config = ModelConfig(backbone="efficientnet_lite0", feature_dim=8, num_experts=2)
    model = build_model(config, FedFMXConfig(k_max=2), num_classes=3, seed=0).eval()
    assert isinstance(model.backbone, PretrainedBackbone)
    cache = FeatureCache(tmp_path, BACKBONE_ID, max_bytes=1 << 20)
    rows = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    features = cache.features(rows, trunk_feature_fn(model.backbone))
    assert features.shape == (3, TRUNK_FEATURES) and features.dtype == np.float32
    with torch.no_grad():
        from_cache = model(torch.from_numpy(features))
        from_images = model(torch.from_numpy(rows))
    torch.testing.assert_close(from_cache, from_images, rtol=1e-4, atol=1e-4)
