"""The device's exemplar buffer: caps, reservoir uniformity, and a pickle-free state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedfmx.errors import DataError
from fedfmx.learner.exemplars import ExemplarBuffer


def samples(values: range | list[int]) -> np.ndarray:
    """Samples [n, 1, 2] whose pixels both equal the sample's id, so ids survive a round trip."""
    ids = np.asarray(values, dtype=np.float32)
    return np.repeat(ids[:, None, None], 2, axis=2)


def held_ids(buffer: ExemplarBuffer) -> list[int]:
    x, _ = buffer.arrays()
    return [int(v) for v in x[:, 0, 0]]


def test_fills_in_arrival_order_until_the_class_is_full() -> None:
    buffer = ExemplarBuffer(per_class=3, total_cap=None, seed=0)
    buffer.add(samples([7, 8]), ["a", "a"])
    x, y = buffer.arrays()
    assert x.dtype == np.float32 and x.shape == (2, 1, 2)
    assert held_ids(buffer) == [7, 8]
    assert y.tolist() == ["a", "a"]
    buffer.add(samples([9, 10, 11]), np.array(["a", "a", "a"]))
    assert len(buffer) == 3
    assert set(held_ids(buffer)) <= {7, 8, 9, 10, 11}
    assert buffer.arrays()[1].tolist() == ["a", "a", "a"]


def test_batch_update_equals_algorithm_r_one_sample_at_a_time() -> None:
    """The vectorised batch must match sequential Algorithm R given the same draws."""
    buffer = ExemplarBuffer(per_class=3, total_cap=None, seed=5)
    buffer.add(samples(range(20)), ["a"] * 20)
    # The buffer's first add draws from default_rng([seed, samples seen = 0]); samples 0-2
    # fill the reservoir, sample m >= 3 draws j ~ U{0..m} and replaces slot j when j < 3.
    draws = np.random.default_rng([5, 0]).integers(0, np.arange(3, 20) + 1)
    reservoir = [0, 1, 2]
    for m, j in zip(range(3, 20), draws, strict=True):
        if j < 3:
            reservoir[j] = m
    assert held_ids(buffer) == reservoir


def test_classes_group_in_order_of_first_appearance() -> None:
    buffer = ExemplarBuffer(per_class=2, total_cap=None, seed=0)
    buffer.add(samples([0, 1, 2, 3]), ["dog", "cat", "dog", "cat"])
    buffer.add(samples([4]), ["bird"])
    _, y = buffer.arrays()
    assert buffer.classes() == ["dog", "cat", "bird"]
    assert y.tolist() == ["dog", "dog", "cat", "cat", "bird"]
    assert held_ids(buffer) == [0, 2, 1, 3, 4]


def test_per_class_zero_keeps_nothing() -> None:
    buffer = ExemplarBuffer(per_class=0, total_cap=None, seed=0)
    buffer.add(samples(range(5)), ["a", "b", "a", "b", "c"])
    x, y = buffer.arrays()
    assert len(buffer) == 0
    assert buffer.classes() == []
    assert x.shape == (0, 1, 2) and y.shape == (0,)


def test_empty_buffer_arrays_are_empty() -> None:
    x, y = ExemplarBuffer(per_class=3, total_cap=None, seed=0).arrays()
    assert len(x) == 0 and len(y) == 0


def test_total_cap_is_shared_equally_and_the_oldest_classes_shrink_first() -> None:
    buffer = ExemplarBuffer(per_class=4, total_cap=5, seed=0)
    buffer.add(samples(range(10)), ["a"] * 10)
    assert len(buffer) == 4  # per_class binds: min(4, 5)
    buffer.add(samples(range(10, 20)), ["b"] * 10)
    # 5 slots over 2 classes: ⌊5/2⌋ = 2 each, the remainder to the newer class.
    _, y = buffer.arrays()
    assert y.tolist() == ["a", "a", "b", "b", "b"]
    buffer.add(samples(range(20, 30)), ["c"] * 10)
    _, y = buffer.arrays()
    assert y.tolist() == ["a", "b", "b", "c", "c"]
    ids = held_ids(buffer)
    assert ids[0] in range(10) and set(ids[1:3]) <= set(range(10, 20))
    assert set(ids[3:]) <= set(range(20, 30))


def test_reservoir_is_uniform_over_everything_a_class_has_seen() -> None:
    """1,000 samples in 5 rounds of 200, 10 slots, 400 seeds: each decile of the stream
    should hold about 400·10/10 = 400 of the 4,000 kept samples. Keeping the newest round
    would put all of them in the last two deciles."""
    hits = np.zeros(10, dtype=np.int64)
    for seed in range(400):
        buffer = ExemplarBuffer(per_class=10, total_cap=None, seed=seed)
        for start in range(0, 1000, 200):
            buffer.add(samples(range(start, start + 200)), ["a"] * 200)
        np.add.at(hits, np.asarray(held_ids(buffer)) // 100, 1)
    assert hits.sum() == 4000
    chi_square = float(((hits - 400) ** 2 / 400).sum())
    assert chi_square < 27.9  # 9 degrees of freedom, p = 0.001


def test_state_is_pickle_free_and_round_trips(tmp_path: Path) -> None:
    buffer = ExemplarBuffer(per_class=2, total_cap=None, seed=3)
    buffer.add(samples(range(6)), ["T-shirt/top", "Größe", "T-shirt/top", "Größe", "x", "x"])
    state = buffer.state()
    assert all(array.dtype.kind in "fiu" for array in state.values())
    np.savez(tmp_path / "exemplars.npz", **state)  # type: ignore[arg-type]  # numpy stubs
    with np.load(tmp_path / "exemplars.npz", allow_pickle=False) as stored:
        restored = ExemplarBuffer.from_state(dict(stored), per_class=2, total_cap=None, seed=3)
    assert restored.classes() == ["T-shirt/top", "Größe", "x"]
    assert len(restored) == 6
    for original, copy in zip(buffer.arrays(), restored.arrays(), strict=True):
        np.testing.assert_array_equal(original, copy)


def test_restored_buffer_continues_exactly_like_the_original() -> None:
    first, second = samples(range(50)), samples(range(50, 100))
    labels = ["a", "b"] * 25
    kept = ExemplarBuffer(per_class=4, total_cap=None, seed=9)
    kept.add(first, labels)
    restarted = ExemplarBuffer.from_state(kept.state(), per_class=4, total_cap=None, seed=9)
    kept.add(second, labels)
    restarted.add(second, labels)
    assert held_ids(kept) == held_ids(restarted)
    assert kept.arrays()[1].tolist() == restarted.arrays()[1].tolist()


def test_tighter_caps_on_restore_shrink_the_buffer() -> None:
    buffer = ExemplarBuffer(per_class=4, total_cap=None, seed=0)
    buffer.add(samples(range(12)), ["a", "b", "c"] * 4)
    restored = ExemplarBuffer.from_state(buffer.state(), per_class=2, total_cap=3, seed=0)
    _, y = restored.arrays()
    assert y.tolist() == ["a", "b", "c"]
    assert set(held_ids(restored)) <= set(held_ids(buffer))


def test_rejects_index_labels_and_mismatched_batches() -> None:
    buffer = ExemplarBuffer(per_class=2, total_cap=None, seed=0)
    with pytest.raises(TypeError, match="class names"):
        buffer.add(samples([0, 1]), np.array([0, 1]))
    with pytest.raises(DataError, match="2 samples but 1 labels"):
        buffer.add(samples([0, 1]), ["a"])
    buffer.add(samples([0]), ["a"])
    with pytest.raises(DataError, match="shape"):
        buffer.add(np.zeros((1, 3), np.float32), ["a"])


def test_corrupt_state_is_a_data_error() -> None:
    buffer = ExemplarBuffer(per_class=2, total_cap=None, seed=0)
    buffer.add(samples([0, 1]), ["a", "b"])
    state = buffer.state()
    with pytest.raises(DataError, match="incomplete or corrupt"):
        ExemplarBuffer.from_state({"x": state["x"]}, per_class=2, total_cap=None, seed=0)
    inconsistent = dict(state, seen=np.array([1], dtype=np.int64))
    with pytest.raises(DataError, match="inconsistent"):
        ExemplarBuffer.from_state(inconsistent, per_class=2, total_cap=None, seed=0)
