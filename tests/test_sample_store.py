"""The bounded sample store: caps, retention, disk budget, power cuts, and rounds read from it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from stream_images import digit_pixels, encode

from edge_client.sample_store import SampleStore
from edge_client.sources.base import Sample
from edge_client.store_stream import StoreStream
from edge_client.stream_config import StoreConfig
from fedfmx.config import ClassPolicyConfig, ImageInputConfig, load_fleet
from fedfmx.data.preprocessing import model_input
from fedfmx.device.learner import DeviceLearner
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import initial_model

SPEC = ImageInputConfig(channels=1, height=8, width=8)
FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def samples(label: int, count: int, start: int = 0, at: float | None = None) -> list[Sample]:
    return [
        Sample(p, str(label), f"{label}/{start + i}.png", at or time.time(), encode(p))
        for i, p in enumerate(digit_pixels(label, count, start))
    ]


def open_store(
    root: Path, classes: ClassPolicyConfig | None = None, **config: object
) -> SampleStore:
    return SampleStore(root, StoreConfig(**config), SPEC, classes or ClassPolicyConfig(), seed=1)


def test_each_class_keeps_a_reservoir_of_its_cap(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_per_class=5)
    stored = [store.add(s) for s in samples(0, 40) + samples(1, 3)]
    usage = store.usage()
    assert usage.classes == {"0": 5, "1": 3}
    assert sum(stored) < 40  # later samples enter with probability 5/(m+1) only
    assert sum(stored) > 5  # ... but they do enter: a uniform sample, not the first five
    assert len(list((tmp_path / "samples").rglob("*.png"))) == 8


def test_the_same_content_is_stored_once(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    first = samples(2, 3)
    assert all(store.add(s) for s in first)
    renamed = [Sample(s.pixels, "two", "two/x.png", encoded=s.encoded) for s in first]
    assert not any(store.add(s) for s in renamed)  # a renamed class folder: not counted twice
    assert store.usage().classes == {"2": 3}


def test_allowed_classes_and_the_minimum_count_before_a_class_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = ClassPolicyConfig(allowed=["0", "1"], min_samples=3)
    store = open_store(tmp_path, policy)
    with caplog.at_level(logging.WARNING):
        assert not any(store.add(s) for s in samples(9, 4))
    assert sum("not in the fleet's allowed classes" in r.getMessage() for r in caplog.records) == 1
    stream = StoreStream(store)
    for s in samples(0, 3) + samples(1, 2):
        store.add(s)
    assert stream.position(0).task == 0
    _, names = stream.rows(stream.available(0))
    assert sorted(set(names)) == ["0"]  # class 1 has 2 of the 3 samples it needs
    store.add(samples(1, 1, start=5)[0])
    assert stream.position(0).task == 0  # a round's batch is fixed once asked
    assert stream.position(1).task == 1
    _, names = stream.rows(stream.available(1))
    assert sorted(names) == ["1", "1", "1"]
    assert stream.position(2).task == 1  # nothing new: the previous batch again


def test_the_disk_budget_evicts_trained_samples_then_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path, keep_raw_images=False)  # .npy inputs: every sample one size
    store.add(samples(0, 1)[0])
    one = store.usage().bytes
    store.close()
    store = open_store(tmp_path, keep_raw_images=False, max_bytes=8 * one)
    for s in samples(0, 5, start=1) + samples(1, 2):
        store.add(s)
    assert store.batch_of_round(0) == 0  # these eight: the batch round 0 trains on
    for s in samples(2, 6):
        assert store.add(s)  # room comes from trained samples, the largest class's first
    assert store.usage().classes == {"0": 1, "1": 1, "2": 6}  # largest first: 6+2 -> 1+1
    assert store.batch_of_round(1) == 1
    with caplog.at_level(logging.WARNING):
        stored = [store.add(s) for s in samples(3, 8)]
    assert stored == [True] * 8  # batch 1 trained on: it may make room now
    with caplog.at_level(logging.WARNING):
        refused = [store.add(s) for s in samples(4, 2)]
    assert refused == [False, False]  # full of samples no round has seen: refused, logged
    assert sum("full" in r.getMessage() for r in caplog.records) == 2
    assert store.usage().classes["3"] == 8
    assert store.usage().bytes <= store.config.max_bytes


def test_retention_window_deletes_old_samples(tmp_path: Path) -> None:
    store = open_store(tmp_path, retention_days=1.0)
    old = samples(3, 2, at=time.time() - 3 * 86400)
    for s in old + samples(3, 2, start=5):
        store.add(s)
    assert store.expire() == 2
    assert store.usage().samples == 2
    assert len(list((tmp_path / "samples").rglob("*.png"))) == 2


def test_without_raw_images_only_the_model_input_is_kept(tmp_path: Path) -> None:
    raw = open_store(tmp_path / "raw")
    lean = open_store(tmp_path / "lean", keep_raw_images=False)
    batch = samples(4, 3)
    for s in batch:
        raw.add(s)
        lean.add(s)
    assert not list((tmp_path / "lean" / "samples").rglob("*.png"))
    assert len(list((tmp_path / "lean" / "samples").rglob("*.npy"))) == 3
    ids = np.arange(1, 4)
    expected = np.stack([model_input(s.pixels, SPEC) for s in batch])
    np.testing.assert_array_equal(lean.rows(ids)[0], expected)
    np.testing.assert_array_equal(raw.rows(ids)[0], expected)


def test_a_power_cut_leaves_a_consistent_store(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for s in samples(5, 3):
        store.add(s)
    store.close()
    files = sorted((tmp_path / "samples").rglob("*.png"))
    (files[0].parent / f".{files[0].name}.tmp").write_bytes(b"half")  # cut during a write
    orphan = files[0].parent / ("f" * 64 + ".png")
    orphan.write_bytes(b"written, row never committed")  # cut before the ledger commit
    os.unlink(files[1])  # a file lost with its row still there
    reopened = open_store(tmp_path)
    assert reopened.usage().samples == 2
    left = sorted(p for p in (tmp_path / "samples").rglob("*") if p.is_file())
    assert left == [files[0], files[2]]  # no orphan, no temporary file
    x, names = reopened.rows(np.arange(1, 4))
    assert len(x) == len(names) == 2


def test_a_learner_trains_on_new_arrivals_plus_its_memory(tmp_path: Path) -> None:
    """Round by round: class 0 first, class 1 later; the second update still holds class 0."""
    fleet = load_fleet(FLEET)
    store = open_store(tmp_path)
    stream = StoreStream(store)
    learner = DeviceLearner("d0", fleet, stream, stream, seed=0)
    keeper = RoundKeeper(fleet, initial_model(fleet))
    heads = []
    for round_index, label in enumerate([0, 1]):
        for s in samples(label, 12):
            store.add(s)
        announcement = keeper.open_round(round_index, ["d0"], 0.0)
        payload = learner.handle_round(announcement, keeper.model_header(), keeper.model.weights)
        assert payload is not None
        header = keeper.accept(payload)
        assert header is not None
        heads.append(header.head_classes)
        keeper.close_round()
    assert heads == [["0"], ["0", "1"]]
    assert keeper.model.class_names == ["0", "1"]


def test_a_pretrained_device_without_raw_images_keeps_and_trains_on_trunk_features(
    tmp_path: Path,
) -> None:
    from fedfmx.trunk.feature_cache import trunk_feature_fn
    from fedfmx.trunk.pretrained import TRUNK_FEATURES, PretrainedBackbone

    base = load_fleet(FLEET)
    fleet = base.model_copy(
        update={"model": base.model.model_copy(update={"backbone": "efficientnet_lite0"})}
    )
    trunk = trunk_feature_fn(PretrainedBackbone(1))
    store = SampleStore(
        tmp_path, StoreConfig(keep_raw_images=False), SPEC, ClassPolicyConfig(), 1, trunk
    )
    batch = samples(6, 4) + samples(8, 4)
    for s in batch:
        assert store.add(s)
    files = sorted((tmp_path / "samples").rglob("*.*"))
    assert len(files) == 8 and {f.suffix for f in files} == {".npy"}  # no image kept at all
    stream = StoreStream(store)
    x, names = stream.rows(stream.available(0))
    assert x.shape == (8, TRUNK_FEATURES) and x.dtype == np.float32
    assert names.tolist() == ["6"] * 4 + ["8"] * 4
    expected = trunk(np.stack([model_input(s.pixels, SPEC) for s in batch]))
    np.testing.assert_allclose(x, expected, atol=1e-4)  # one at a time vs a batch: rounding
    learner = DeviceLearner("d0", fleet, stream, stream, seed=0, cache_dir=tmp_path / "cache")
    keeper = RoundKeeper(fleet, initial_model(fleet))
    announcement = keeper.open_round(0, ["d0"], 0.0)
    payload = learner.handle_round(announcement, keeper.model_header(), keeper.model.weights)
    assert payload is not None
    header = keeper.accept(payload)
    assert header is not None and header.head_classes == ["6", "8"]
    assert learner.feature_cache is not None and len(learner.feature_cache) == 0  # never needed
