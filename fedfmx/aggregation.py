"""Aggregation maths, numpy only (the aggregator needs no torch to merge).

Every merge is kept as *sums and weights* (`MergeSums`) until the very end, so that merging is
associative: a district aggregator can pre-merge its devices and forward one `MergeSums`, and the
result is the same as merging all devices at once (DESIGN §8).

Tensor names follow `fedfmx.messages.UpdateHeader`: deltas against the base model version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedfmx.messages import UpdateHeader

FISHER_PREFIX = "fisher."
HEAD_ROWS = "head.rows"
HEAD_WEIGHT = "head.weight"
FISHER_EPSILON = 1e-12

Arrays = dict[str, np.ndarray]


def fisher_summary_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the Fisher summary sent for a parameter: one value per row of a matrix."""
    return (shape[0], 1) if len(shape) == 2 else shape


@dataclass
class WeightedSum:
    """`Σ_k w_k⊙x_k` and `Σ_k w_k` for one tensor (`w` a scalar or an elementwise array)."""

    numerator: np.ndarray
    denominator: np.ndarray

    def add(self, other: WeightedSum) -> None:
        self.numerator = self.numerator + other.numerator
        self.denominator = self.denominator + other.denominator

    def mean(self) -> np.ndarray:
        """`Σ w⊙x / Σ w`, zero where nothing was contributed."""
        safe = np.where(self.denominator > 0, self.denominator, 1.0)
        return np.where(self.denominator > 0, self.numerator / safe, 0.0).astype(np.float32)


def weighted_sum(value: np.ndarray, weight: float | np.ndarray) -> WeightedSum:
    return WeightedSum(
        numerator=np.asarray(weight * value, dtype=np.float64),
        denominator=np.broadcast_to(np.asarray(weight, dtype=np.float64), value.shape).copy(),
    )


@dataclass
class ExpertSum:
    """Both sums needed by the Fisher-weighted expert merge with its sample-weighted fallback."""

    fisher: WeightedSum
    samples: WeightedSum

    def add(self, other: ExpertSum) -> None:
        self.fisher.add(other.fisher)
        self.samples.add(other.samples)

    def mean(self) -> np.ndarray:
        """`Σ_k F_k⊙δ_k / Σ_k F_k` where the fleet's Fisher is non-zero.

        Coordinates no device has a Fisher for fall back to `Σ_k n_k·δ_k / Σ_k n_k`.
        """
        fisher_mean = self.fisher.mean()
        sample_mean = self.samples.mean()
        return np.where(self.fisher.denominator > FISHER_EPSILON, fisher_mean, sample_mean).astype(
            np.float32
        )


@dataclass
class MergeSums:
    """Everything a round's updates contribute, as associative sums."""

    experts: dict[str, ExpertSum] = field(default_factory=dict)
    shared: dict[str, WeightedSum] = field(default_factory=dict)
    """Router and backbone: sample-weighted."""
    head: dict[str, WeightedSum] = field(default_factory=dict)
    """Head rows by class name: weighted by that class's sample count on each device."""
    new_classes: list[str] = field(default_factory=list)
    """Class names not in the base registry, in order of first appearance."""
    usage: np.ndarray | None = None
    updates: int = 0

    def add(self, other: MergeSums) -> None:
        """Fold another partial merge in (a district aggregator's result, say)."""
        for table, other_table in (
            (self.experts, other.experts),
            (self.shared, other.shared),
            (self.head, other.head),
        ):
            for name, value in other_table.items():
                if name in table:
                    table[name].add(value)  # type: ignore[arg-type]
                else:
                    table[name] = value  # type: ignore[assignment]
        self.new_classes += [name for name in other.new_classes if name not in self.new_classes]
        if other.usage is not None:
            self.usage = other.usage.copy() if self.usage is None else self.usage + other.usage
        self.updates += other.updates


def update_sums(
    header: UpdateHeader, tensors: Mapping[str, np.ndarray], known_classes: Iterable[str]
) -> MergeSums:
    """One device's decoded update as `MergeSums`."""
    known = set(known_classes)
    sums = MergeSums(usage=np.asarray(header.expert_usage, dtype=np.float64), updates=1)
    samples = float(header.num_samples)
    for name, delta in tensors.items():
        if name.startswith(FISHER_PREFIX) or name == HEAD_ROWS:
            continue
        if name.startswith("experts."):
            fisher = tensors.get(FISHER_PREFIX + name)
            fisher_sum = (
                weighted_sum(delta, fisher) if fisher is not None else weighted_sum(delta, 0.0)
            )
            sums.experts[name] = ExpertSum(fisher=fisher_sum, samples=weighted_sum(delta, samples))
        else:
            sums.shared[name] = weighted_sum(delta, samples)
    rows = tensors.get(HEAD_ROWS)
    for index, (class_name, count) in enumerate(
        zip(header.head_classes, header.class_counts, strict=True)
    ):
        if rows is not None and count > 0:
            sums.head[class_name] = weighted_sum(rows[index], float(count))
        if class_name not in known:
            sums.new_classes.append(class_name)
    return sums


def apply_merge(
    base: Mapping[str, np.ndarray], class_names: list[str], sums: MergeSums
) -> tuple[Arrays, list[str]]:
    """New global state and class registry: `θ ← θ_base + merged δ`.

    New classes get ids after the existing ones, in order of first appearance; their rows'
    deltas were taken against zero. Experts nobody trained keep their base values.
    """
    registry = list(class_names) + [name for name in sums.new_classes if name not in class_names]
    state = {name: np.array(value, dtype=np.float32, copy=True) for name, value in base.items()}
    for name, expert_sum in sums.experts.items():
        state[name] = state[name] + expert_sum.mean()
    for name, shared_sum in sums.shared.items():
        state[name] = state[name] + shared_sum.mean()
    head = np.zeros((len(registry), base[HEAD_WEIGHT].shape[1]), dtype=np.float32)
    head[: len(class_names)] = base[HEAD_WEIGHT]
    for class_name, row_sum in sums.head.items():
        head[registry.index(class_name)] += row_sum.mean()
    state[HEAD_WEIGHT] = head
    return state, registry


def usage_fractions(usage: np.ndarray | None, num_experts: int) -> list[float]:
    """RAR's `f_e`: the fleet's share of routed rows per expert (uniform before any data)."""
    if usage is None or usage.sum() <= 0:
        return [1.0 / num_experts] * num_experts
    return [float(value) for value in usage / usage.sum()]
