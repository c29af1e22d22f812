"""The torch-free part of a device's round: its state, the checks on what it receives, and a
closed-form head's statistics update.

`fedfmx.device.learner.DeviceLearner` (torch) and `edge_client.statistics_learner` (numpy and ONNX
Runtime only, issue 16) both use these, so a closed-form update is encoded, and its rows
counted, the same way whichever computed the features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedfmx.closed_form.head import (
    CLOSED_FORM_PREFIX,
    FeatureStatistics,
    add_class_sums,
    factor_is_smaller,
    gram_factor,
)
from fedfmx.closed_form.state import (
    CANDIDATES,
    ROWS_PREFIX,
    factor_tensors,
    prequential_hits,
    rows_held,
    statistics_tensors,
)
from fedfmx.config import FleetConfig
from fedfmx.data.stream import SampleTable
from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import HEAD_WEIGHT, Arrays
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import ModelHeader, RoundAnnouncement, UpdateHeader

if TYPE_CHECKING:
    from fedfmx.learner.fisher import TensorMap

STATISTICS_BATCH = 64
"""Rows whose features a closed-form device computes and sums at a time."""


@dataclass
class LocalRows:
    """The data a device holds: images and class *names* (class ids are the fleet's business)."""

    x: np.ndarray
    names: np.ndarray


@dataclass
class DeviceState:
    """What a device must keep across rounds (and persist to survive a restart)."""

    old_fisher: TensorMap = field(default_factory=dict)
    anchor: TensorMap = field(default_factory=dict)
    """The parameters the Fisher was measured at (EWC's `θ*`)."""
    held: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Train indices of the current task's rows received so far."""
    task: int | None = None
    """The task `held` belongs to (a device that missed rounds still closes its last task)."""
    residual: dict[str, np.ndarray] = field(default_factory=dict)
    """Codec error-feedback residual."""
    teacher: Arrays | None = None
    """The model when the device last closed a task (LwF's teacher)."""
    contributed: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Closed-form methods: train indices whose statistics were sent, in the order sent (the
    fleet's model says how many of them it holds: the rest are sent again)."""


def validate_announcement(announcement: RoundAnnouncement, fleet: FleetConfig) -> None:
    """ProtocolError unless `announcement` fits the fleet's plan and model.

    A well-formed announcement can still be wrong (a stale retained one, a hostile one on a
    broker without ACLs, a bug): it is refused before it can reach the stream or the model.
    """
    protocol = fleet.protocol
    if announcement.fleet != fleet.name:
        raise ProtocolError(f"announcement for fleet {announcement.fleet!r}")
    if announcement.round >= protocol.num_rounds:
        raise ProtocolError(
            f"round {announcement.round} outside the plan's 0..{protocol.num_rounds - 1}"
        )
    if announcement.task != announcement.round // protocol.rounds_per_task:
        raise ProtocolError(f"round {announcement.round} is not in task {announcement.task}")
    if announcement.model_version > announcement.round:
        raise ProtocolError(
            f"model version {announcement.model_version} cannot start round {announcement.round}"
        )
    usage = announcement.expert_usage
    if len(usage) != fleet.model.num_experts or not all(math.isfinite(u) and u >= 0 for u in usage):
        raise ProtocolError(
            f"expert usage must be {fleet.model.num_experts} finite non-negative values"
        )
    if not math.isfinite(announcement.deadline_unix):
        raise ProtocolError("deadline is not a finite time")


def check_model_tensors(
    model: ModelHeader,
    weights: Arrays,
    shapes: Mapping[str, tuple[int, ...]],
    fleet: FleetConfig,
    device_id: str,
) -> None:
    """ProtocolError unless `weights` are exactly the network of parameter `shapes` with one
    head row per class of `model`, and the closed-form entries a device reads have their shapes
    (checked before a version is loaded, so junk cannot crash a round)."""
    if len(set(model.class_names)) != len(model.class_names):
        raise ProtocolError("model class names repeat")
    expected = dict(shapes)
    classes, dim = len(model.class_names), expected[HEAD_WEIGHT][1]
    expected[HEAD_WEIGHT] = (classes, dim)
    given = {
        name: value.shape
        for name, value in weights.items()
        if not name.startswith(CLOSED_FORM_PREFIX)
    }
    if given != expected:
        wrong = sorted(set(given.items()) ^ set(expected.items()))[:2]
        raise ProtocolError(f"model tensors do not fit this fleet's model: {wrong}")
    candidates = weights.get(CANDIDATES)
    lambdas = len(fleet.analytic.lambdas)
    if candidates is not None and candidates.shape != (lambdas, classes, dim):
        raise ProtocolError(f"candidate heads of shape {candidates.shape}")
    rows = weights.get(ROWS_PREFIX + device_id)
    if rows is not None and (rows.size != 1 or not np.all(rows >= 0)):
        raise ProtocolError("this device's row count in the model is not one count")


@dataclass(frozen=True)
class StatisticsRound:
    """What a closed-form update is made of besides the rows: who sends it, for which round."""

    device_id: str
    announcement: RoundAnnouncement
    model: ModelHeader
    weights: Arrays
    fleet: FleetConfig


def statistics_update(
    round_: StatisticsRound,
    state: DeviceState,
    samples: SampleTable,
    features: Callable[[np.ndarray], np.ndarray],
) -> bytes | None:
    """A closed-form head's update: the feature statistics of the rows held now that the
    fleet's model does not hold yet (None when there are none: nothing on the wire).

    `features` maps a batch of stored rows (images, or trunk features) to `φ` [n, d]; rows are
    read and summed `STATISTICS_BATCH` at a time, so a device never holds every row's images at
    once. With fewer new rows than `(d + 1)/2` (and `analytic.send_factor`) it sends `G`'s exact
    factor instead of its triangle (`fedfmx.closed_form.head.gram_factor`): that needs the round's
    features `Φ` [n, d] together, at most the size of the triangle, and only until the update
    is encoded (no image is kept). `state.contributed` is cut to what the model holds, then
    extended by the rows sent (the model's count says which were lost on the way and are sent
    again)."""
    weights, model = round_.weights, round_.model
    held_before = rows_held(weights, round_.device_id)
    state.contributed = state.contributed[:held_before]
    fresh = state.held[~np.isin(state.held, state.contributed)]
    if not len(fresh):
        return None
    dim = weights[HEAD_WEIGHT].shape[1]
    send_factor = round_.fleet.analytic.send_factor and factor_is_smaller(len(fresh), dim)
    moments: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    gram = None if send_factor else np.zeros((dim, dim))
    kept: list[np.ndarray] = []  # the round's features, for the factor
    hits = np.zeros(0, dtype=np.int64)
    for start in range(0, len(fresh), STATISTICS_BATCH):
        images, row_names = samples.rows(fresh[start : start + STATISTICS_BATCH])
        phi = features(images)
        names = [str(n) for n in row_names]
        batch_hits = prequential_hits(weights, model.class_names, phi, names)
        hits = batch_hits if not len(hits) else hits + batch_hits
        add_class_sums(moments, counts, phi, names)
        if gram is None:
            kept.append(phi)
        else:
            gram += phi.T @ phi  # in the rows' precision, accumulated in float64
    classes = sorted(counts)
    if gram is None:
        factor = gram_factor(np.concatenate(kept))
        del kept
        tensors = factor_tensors(factor, moments, counts, classes)
    else:
        factor = None
        tensors = statistics_tensors(FeatureStatistics(gram, moments, counts), classes)
        del gram  # `G` (8d² bytes: 33.5 MB at d = 2,048) goes before the encoding's copies
    announcement = round_.announcement
    header = UpdateHeader(
        fleet=announcement.fleet,
        device_id=round_.device_id,
        round=announcement.round,
        base_version=model.version,
        num_samples=sum(counts.values()),
        expert_ids=[],
        head_classes=classes,
        class_counts=[counts[name] for name in classes],
        expert_usage=[0.0] * round_.fleet.model.num_experts,
        includes_statistics=True,
        factor_rank=0 if factor is None else len(factor),
        rows_before=held_before,
        lambda_hits=[int(h) for h in hits],
        codec=round_.fleet.uplink_codec,
        train_loss=0.0,
    )
    payload = encode_update(header, tensors).payload
    state.contributed = np.concatenate([state.contributed, fresh])
    return payload
