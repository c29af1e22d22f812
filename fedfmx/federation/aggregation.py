"""Aggregation maths, numpy only (the aggregator needs no torch to merge).

Every merge is kept as *sums and weights* (`MergeSums`) until the very end, so that merging is
associative: a district aggregator can pre-merge its devices and forward one `MergeSums`, and the
result is the same as merging all devices at once (DESIGN §8).

The robust merges of DESIGN §6 (`clip_update`, `robust_delta` with `coordinate_median` or
`trimmed_mean`) sit beside it: clipping is per update, so it keeps the sums associative; a median
or trimmed mean is not associative and needs every update of the round at once.

Tensor names follow `fedfmx.wire.messages.UpdateHeader`: deltas against the base model version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedfmx.wire.messages import UpdateHeader

FISHER_PREFIX = "fisher."
STATS_PREFIX = "stats."
"""Closed-form head statistics (`fedfmx.closed_form.state`): sums of features, not deltas."""
HEAD_ROWS = "head.rows"
HEAD_WEIGHT = "head.weight"
FISHER_EPSILON = 1e-12

Arrays = dict[str, np.ndarray]
Center = Callable[[np.ndarray], np.ndarray]
"""A robust statistic over axis 0 of a stack `[devices, ...]` (`coordinate_median`, say)."""


def is_delta(name: str) -> bool:
    """Whether a tensor of an update moves the model (Fisher summaries and feature statistics
    are weights and sums, not moves: norms and clipping leave them out)."""
    return not name.startswith((FISHER_PREFIX, STATS_PREFIX))


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
    """Class names not in the base registry (`apply_delta` appends them sorted)."""
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

    def delta(self) -> MergedDelta:
        """The merged deltas: every sum's weighted mean."""
        tensors = {name: expert_sum.mean() for name, expert_sum in self.experts.items()}
        tensors |= {name: shared_sum.mean() for name, shared_sum in self.shared.items()}
        head = {class_name: row_sum.mean() for class_name, row_sum in self.head.items()}
        return MergedDelta(tensors, head, list(self.new_classes), self.usage)


@dataclass
class MergedDelta:
    """One round's merged change to the global model, whichever rule merged it."""

    tensors: Arrays
    """Experts, router and backbone: `θ ← θ_base + δ`."""
    head: dict[str, np.ndarray]
    """Head row deltas by class name (a new class's row against zero)."""
    new_classes: list[str]
    usage: np.ndarray | None


def update_sums(
    header: UpdateHeader, tensors: Mapping[str, np.ndarray], known_classes: Iterable[str]
) -> MergeSums:
    """One device's decoded update as `MergeSums`."""
    known = set(known_classes)
    sums = MergeSums(usage=np.asarray(header.expert_usage, dtype=np.float64), updates=1)
    samples = float(header.num_samples)
    for name, delta in tensors.items():
        if not is_delta(name) or name == HEAD_ROWS:
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
    """New global state and class registry from the associative sums (see `apply_delta`)."""
    return apply_delta(base, class_names, sums.delta())


def apply_delta(
    base: Mapping[str, np.ndarray], class_names: list[str], delta: MergedDelta
) -> tuple[Arrays, list[str]]:
    """New global state and class registry: `θ ← θ_base + merged δ`.

    New classes get ids after the existing ones, sorted by name: the order updates arrived in
    (which a restart or a retry can change) never changes the model. Their rows' deltas were
    taken against zero. Experts nobody trained keep their base values.
    """
    registry = list(class_names) + sorted(set(delta.new_classes) - set(class_names))
    state = {name: np.array(value, dtype=np.float32, copy=True) for name, value in base.items()}
    for name, change in delta.tensors.items():
        state[name] = state[name] + change
    head = np.zeros((len(registry), base[HEAD_WEIGHT].shape[1]), dtype=np.float32)
    head[: len(class_names)] = base[HEAD_WEIGHT]
    for class_name, row in delta.head.items():
        head[registry.index(class_name)] += row
    state[HEAD_WEIGHT] = head
    return state, registry


def delta_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """`‖δ‖₂` over every delta tensor together (experts, router, backbone, head rows).

    Fisher summaries and feature statistics are not deltas and are left out (`is_delta`), as
    in the codec's norm bound.
    """
    squares = sum(
        float(np.square(value, dtype=np.float64).sum())
        for name, value in tensors.items()
        if is_delta(name)
    )
    return math.sqrt(squares)


def clip_update(tensors: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Arrays, float]:
    """`δ ← δ · min(1, C / ‖δ‖₂)` for every delta tensor at once; returns the factor too.

    One factor for the whole update keeps its direction. Head rows are clipped with the rest:
    they move the model like any other delta (and a new class's row is the whole row), so
    leaving them out would leave a hostile device an unbounded channel. Fisher summaries pass
    unchanged: they are non-negative *weights* of the expert merge, not a move of the model,
    and scaling one device's Fisher would only shift its weight against the others'.
    """
    norm = delta_norm(tensors)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    if factor == 1.0:
        return dict(tensors), factor
    clipped = {
        name: (value * factor).astype(np.float32) if is_delta(name) else value
        for name, value in tensors.items()
    }
    return clipped, factor


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """Median over devices (axis 0), coordinate by coordinate (the mean of the middle two for an
    even count)."""
    return np.median(stack.astype(np.float64), axis=0).astype(np.float32)


def trimmed_mean(trim_fraction: float) -> Center:
    """Coordinate-wise `β`-trimmed mean over devices: of the `n` values at each coordinate, the
    `k = ⌊β·n⌋` smallest and `k` largest are dropped and the rest averaged (`β < 1/2`, so at
    least one value stays; `k = 0`, the plain mean, while `n < 1/β`)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction {trim_fraction} outside [0, 0.5)")

    def center(stack: np.ndarray) -> np.ndarray:
        count = stack.shape[0]
        k = math.floor(trim_fraction * count)
        ordered = np.sort(stack.astype(np.float64), axis=0)
        return ordered[k : count - k].mean(axis=0).astype(np.float32)

    return center


def robust_delta(
    updates: Sequence[tuple[UpdateHeader, Mapping[str, np.ndarray]]],
    known_classes: Iterable[str],
    center: Center,
) -> MergedDelta:
    """A round's merge by a robust statistic (`coordinate_median`, `trimmed_mean(β)`).

    Each tensor is merged over the devices that sent it: every expert tensor, router and
    backbone tensor by name, every head row by class over the devices that report samples of
    that class. The statistic replaces the whole weighted average, including its weights:
    the expert merge's Fisher weights (and its sample-weighted fallback), the router's and
    backbone's sample weights and the head rows' class counts are all claims of the sender,
    which a hostile device could inflate, so here each device has one vote per coordinate.
    Fisher summaries are not used. Expert usage is summed and new classes are registered as
    in the mean.
    """
    known = set(known_classes)
    columns: dict[str, list[np.ndarray]] = {}
    rows: dict[str, list[np.ndarray]] = {}
    new_classes: list[str] = []
    usage: np.ndarray | None = None
    for header, tensors in updates:
        for name, value in tensors.items():
            if is_delta(name) and name != HEAD_ROWS:
                columns.setdefault(name, []).append(value)
        head_rows = tensors.get(HEAD_ROWS)
        for index, (class_name, count) in enumerate(
            zip(header.head_classes, header.class_counts, strict=True)
        ):
            if head_rows is not None and count > 0:
                rows.setdefault(class_name, []).append(head_rows[index])
            if class_name not in known and class_name not in new_classes:
                new_classes.append(class_name)
        device_usage = np.asarray(header.expert_usage, dtype=np.float64)
        usage = device_usage if usage is None else usage + device_usage
    return MergedDelta(
        tensors={name: center(np.stack(values)) for name, values in columns.items()},
        head={name: center(np.stack(values)) for name, values in rows.items()},
        new_classes=new_classes,
        usage=usage,
    )


def usage_fractions(usage: np.ndarray | None, num_experts: int) -> list[float]:
    """RAR's `f_e`: the fleet's share of routed rows per expert (uniform before any data)."""
    if usage is None or usage.sum() <= 0:
        return [1.0 / num_experts] * num_experts
    return [float(value) for value in usage / usage.sum()]
