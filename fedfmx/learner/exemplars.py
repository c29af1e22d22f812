"""A device's bounded exemplar buffer: a few raw samples per class that never leave the device.

Classes are identified by name, because names (not local indices) are what devices agree on
across the fleet. Each class keeps a reservoir sample (Algorithm R), so a class met over many
rounds keeps a uniform sample of everything seen, not just the latest round.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from fedfmx.errors import DataError


class ExemplarBuffer:
    """Per-class reservoir of at most `per_class` samples, and at most `total_cap` in all.

    With C classes registered (in order of first appearance), class i's quota is
    min(per_class, ⌊total_cap / C⌋ + [i ≥ C − total_cap mod C]): the cap is shared equally and the
    oldest classes shrink first. Shrinking keeps a uniform random subset, which is still a
    uniform sample of the class. All randomness in one `add` comes from a generator seeded by
    (seed, samples seen so far), so a buffer restored from `state()` continues exactly as the
    original would have. Caps raised on restore fill from later samples first (a mild recency
    bias until the class has been seen about as many times again).
    """

    def __init__(self, per_class: int, total_cap: int | None, seed: int) -> None:
        if per_class < 0:
            raise ValueError(f"per_class must be >= 0, got {per_class}")
        if total_cap is not None and total_cap < 0:
            raise ValueError(f"total_cap must be >= 0 or None, got {total_cap}")
        self.per_class = per_class
        self.total_cap = total_cap
        self.seed = seed
        self._names: list[str] = []
        self._seen: list[int] = []
        self._held: list[np.ndarray] = []
        self._sample_shape: tuple[int, ...] | None = None

    def add(self, x: np.ndarray, y: Sequence[str] | np.ndarray) -> None:
        """Offer a batch of samples `x` [n, ...] with class names `y` [n] to the reservoirs.

        Algorithm R, for the m-th sample of class c (0-based, counted over all batches) with
        quota k: if m < k it is appended; otherwise j ~ U{0..m} and it replaces slot j when
        j < k. The draws do not depend on the reservoir, so a batch is applied at once: each
        slot ends with the last sample that drew it.
        """
        labels = _class_names(y)
        x = np.asarray(x, dtype=np.float32)
        if len(x) != len(labels):
            raise DataError(f"exemplars: {len(x)} samples but {len(labels)} labels")
        if not len(labels):
            return
        if self._sample_shape is None:
            self._sample_shape = x.shape[1:]
        elif x.shape[1:] != self._sample_shape:
            raise DataError(f"exemplars: samples of shape {x.shape[1:]}, not {self._sample_shape}")
        rng = np.random.default_rng([self.seed, sum(self._seen)])
        for name in dict.fromkeys(labels):
            if name not in self._names:
                self._names.append(name)
                self._seen.append(0)
                self._held.append(np.zeros((0, *self._sample_shape), dtype=np.float32))
        self._shrink_to_quotas(rng)
        quotas = self._quotas()
        label_array = np.array(labels)
        for c, name in enumerate(self._names):
            incoming = x[label_array == name]
            if len(incoming):
                self._held[c] = _reservoir(self._held[c], incoming, self._seen[c], quotas[c], rng)
                self._seen[c] += len(incoming)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 [M, ...], y str [M]) grouped by class in order of first appearance."""
        if self._sample_shape is None:
            return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=str)
        y = np.array([n for n, held in zip(self._names, self._held, strict=True) for _ in held])
        return np.concatenate(self._held), y.astype(str)

    def classes(self) -> list[str]:
        """Names of the classes that hold at least one exemplar, in order of first appearance."""
        return [n for n, held in zip(self._names, self._held, strict=True) if len(held)]

    def __len__(self) -> int:
        return sum(len(held) for held in self._held)

    def state(self) -> dict[str, np.ndarray]:
        """Numeric arrays only, so safetensors or `np.savez` store it without pickle.

        x [M, ...] float32; class_index [M] int64 into the names; seen [C] int64 samples seen
        per class; names_json uint8, the UTF-8 bytes of a JSON list of the C class names.
        """
        x, y = self.arrays()
        index = {name: i for i, name in enumerate(self._names)}
        return {
            "x": x,
            "class_index": np.array([index[name] for name in y], dtype=np.int64),
            "seen": np.array(self._seen, dtype=np.int64),
            "names_json": np.frombuffer(json.dumps(self._names).encode(), dtype=np.uint8).copy(),
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, np.ndarray], per_class: int, total_cap: int | None, seed: int
    ) -> ExemplarBuffer:
        """Rebuild a buffer from `state()`; tighter caps than before shrink it at once."""
        try:
            names = json.loads(bytes(np.asarray(state["names_json"], dtype=np.uint8)))
            x = np.asarray(state["x"], dtype=np.float32)
            class_index = np.asarray(state["class_index"], dtype=np.int64)
            seen = [int(n) for n in state["seen"]]
        except (KeyError, ValueError, TypeError) as error:
            raise DataError(f"exemplar state is incomplete or corrupt ({error})") from None
        valid_names = isinstance(names, list) and all(isinstance(n, str) for n in names)
        if not valid_names or len(names) != len(seen) or len(class_index) != len(x):
            raise DataError("exemplar state is inconsistent: names, seen, x and class_index")
        buffer = cls(per_class, total_cap, seed)
        buffer._names, buffer._seen = list(names), seen
        if len(names):
            buffer._sample_shape = x.shape[1:]
            buffer._held = [x[class_index == c] for c in range(len(names))]
            if any(len(held) > n for held, n in zip(buffer._held, seen, strict=True)):
                raise DataError("exemplar state is inconsistent: more exemplars than samples seen")
            buffer._shrink_to_quotas(np.random.default_rng([seed, sum(seen)]))
        return buffer

    def _quotas(self) -> list[int]:
        """Slots per class: per_class, or an equal share of total_cap, remainder to the newest."""
        count = len(self._names)
        if self.total_cap is None:
            return [self.per_class] * count
        share, extra = divmod(self.total_cap, count)
        return [min(self.per_class, share + (i >= count - extra)) for i in range(count)]

    def _shrink_to_quotas(self, rng: np.random.Generator) -> None:
        for c, quota in enumerate(self._quotas()):
            held = self._held[c]
            if len(held) > quota:
                keep = np.sort(rng.choice(len(held), size=quota, replace=False))
                self._held[c] = held[keep]


def _class_names(y: Sequence[str] | np.ndarray) -> list[str]:
    """Labels must already be class names: silently turning 3 into "3" would hide a mix-up."""
    labels = list(np.asarray(y).tolist()) if isinstance(y, np.ndarray) else list(y)
    if not all(isinstance(label, str) for label in labels):
        raise TypeError("exemplar labels must be class names (str), not indices")
    return labels


def _reservoir(
    held: np.ndarray, incoming: np.ndarray, seen: int, quota: int, rng: np.random.Generator
) -> np.ndarray:
    """Algorithm R over one class's batch; `seen` samples of the class came before it."""
    fill = max(0, min(quota - len(held), len(incoming)))
    held = np.concatenate([held, incoming[:fill]])
    rest = incoming[fill:]
    slot = rng.integers(0, seen + fill + np.arange(len(rest)) + 1)
    # Later samples overwrite earlier ones: scan newest first and keep each slot's first hit.
    newest_first = np.flatnonzero(slot < quota)[::-1]
    slots, first = np.unique(slot[newest_first], return_index=True)
    held[slots] = rest[newest_first[first]]
    return held
