"""The aggregator's round logic, free of any transport and of torch (numpy merges only).

`RoundKeeper` announces a round, accepts validated update payloads (each device once per round:
a duplicate changes nothing), and closes the round with the associative merge, or with the robust
merge the fleet's `robustness` section asks for. The in-process engine and `fedfmx-edge serve`
both drive it; the service adds MQTT and persistence around it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedfmx.closed_form.head import FeatureStatistics
from fedfmx.closed_form.state import (
    device_view,
    fold_of,
    refit,
    rows_held,
    statistics_of_update,
    statistics_shapes,
)
from fedfmx.config import FleetConfig, RobustnessConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import (
    FISHER_PREFIX,
    HEAD_ROWS,
    HEAD_WEIGHT,
    Arrays,
    Center,
    MergedDelta,
    MergeSums,
    apply_delta,
    clip_update,
    coordinate_median,
    fisher_summary_shape,
    robust_delta,
    trimmed_mean,
    update_sums,
    usage_fractions,
)
from fedfmx.wire.codec import decode_update, encode_model
from fedfmx.wire.messages import DeltaHeader, ModelHeader, RoundAnnouncement, UpdateHeader
from fedfmx.wire.model_delta import EncodedDelta, encode_delta, payload_digest, publishable
from fedfmx.wire.partials import PartialHeader, decode_partial, decode_statistics_partial

log = logging.getLogger(__name__)

MAX_UPDATE_BYTES = 64 * 1024 * 1024


@dataclass
class GlobalModel:
    """One version of the fleet's model: weights plus the class registry."""

    version: int
    weights: Arrays
    class_names: list[str]
    expert_usage: list[float]


@dataclass
class OpenRound:
    announcement: RoundAnnouncement
    sums: MergeSums = field(default_factory=MergeSums)
    """The `mean` merge's associative sums (memory of one update, whatever the fleet's size)."""
    received: set[str] = field(default_factory=set)
    updates: list[tuple[UpdateHeader, Arrays]] = field(default_factory=list)
    """The round's decoded (and clipped) updates, kept only for the `median` and `trimmed_mean`
    merges, which are not associative and need every value of a coordinate at once. Fisher
    summaries are dropped; what stays is float32: about 4 bytes per parameter sent, i.e. the
    backbone (if trained), router, the sent experts and the head rows: ~0.3 MB for the default
    model with two experts and the backbone, so ~0.3 GB for 1000 devices in one round."""
    statistics: list[FeatureStatistics] = field(default_factory=list)
    """A closed-form head's round: the summed feature statistics per fold of devices (sums are
    exact whatever the merge rule: a median of Gram matrices is not a Gram matrix)."""
    new_classes: set[str] = field(default_factory=set)
    """Classes the round's statistics name that the registry does not hold yet."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows each device's statistics added this round."""
    hits: np.ndarray | None = None
    """Summed prequential hits per candidate `λ` (`fedfmx.closed_form.state`)."""


def robust_center(robustness: RobustnessConfig) -> Center | None:
    """The statistic of a robust merge, None for the plain (associative) mean."""
    if robustness.merge == "median":
        return coordinate_median
    if robustness.merge == "trimmed_mean":
        return trimmed_mean(robustness.trim_fraction)
    return None


def train_backbone(fleet: FleetConfig, task: int) -> bool:
    """The backbone learns on the first task, and afterwards only in `train` mode."""
    return task == 0 or fleet.model.backbone_mode == "train"


def expected_update_shapes(
    header: UpdateHeader, weights: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """The exact tensor names and shapes an update with this header must carry."""
    if header.includes_statistics:
        return statistics_shapes(header, weights[HEAD_WEIGHT].shape[1])
    num_experts = len(
        [n for n in weights if n.startswith("experts.") and n.endswith(".fc1.weight")]
    )
    if any(not 0 <= e < num_experts for e in header.expert_ids):
        raise ProtocolError(f"expert ids {header.expert_ids} outside 0..{num_experts - 1}")
    prefixes = ["router."] + (["backbone."] if header.includes_backbone else [])
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in weights.items():
        expert = name.split(".")[1] if name.startswith("experts.") else None
        if (expert is not None and int(expert) in header.expert_ids) or name.startswith(
            tuple(prefixes)
        ):
            shapes[name] = value.shape
            if expert is not None and header.includes_fisher:
                shapes[FISHER_PREFIX + name] = fisher_summary_shape(value.shape)
    shapes[HEAD_ROWS] = (len(header.head_classes), weights[HEAD_WEIGHT].shape[1])
    return shapes


class RoundKeeper:
    """Round bookkeeping and merging for one fleet."""

    def __init__(self, fleet: FleetConfig, model: GlobalModel) -> None:
        self.fleet = fleet
        self.model = model
        self.current: OpenRound | None = None
        self._model_payload: tuple[int, bytes] | None = None
        self._delta: tuple[int, EncodedDelta] | None = None
        self._device_payload: tuple[int, bytes] | None = None
        self._center = robust_center(fleet.robustness)

    def open_round(
        self, round_index: int, participants: list[str], deadline_unix: float
    ) -> RoundAnnouncement:
        task = round_index // self.fleet.protocol.rounds_per_task
        announcement = RoundAnnouncement(
            fleet=self.fleet.name,
            round=round_index,
            task=task,
            model_version=self.model.version,
            participants=participants,
            deadline_unix=deadline_unix,
            expert_usage=self.model.expert_usage,
            train_backbone=train_backbone(self.fleet, task),
        )
        self.resume_round(announcement)
        return announcement

    def resume_round(self, announcement: RoundAnnouncement) -> None:
        """Take up a round announced earlier (a restarted aggregator re-accepts its updates)."""
        if announcement.model_version != self.model.version:
            raise ProtocolError(
                f"round {announcement.round} starts from version {announcement.model_version}, "
                f"the model is at {self.model.version}"
            )
        self.current = OpenRound(announcement)

    def extend_deadline(self, deadline_unix: float) -> RoundAnnouncement:
        """Move the open round's deadline; what it received so far stays."""
        if self.current is None:
            raise ProtocolError("no round is open")
        self.current.announcement = self.current.announcement.model_copy(
            update={"deadline_unix": deadline_unix}
        )
        return self.current.announcement

    def model_header(self) -> ModelHeader:
        return ModelHeader(
            fleet=self.fleet.name, version=self.model.version, class_names=self.model.class_names
        )

    def model_payload(self) -> bytes:
        """The current version as the aggregator stores it, encoded once per version."""
        if self._model_payload is None or self._model_payload[0] != self.model.version:
            self._model_payload = (
                self.model.version,
                encode_model(self.model_header(), self.model.weights),
            )
        return self._model_payload[1]

    def delta_payload(self) -> EncodedDelta | None:
        """The current version as a delta against the previous one; None when this keeper did
        not merge it (version 0, a restart after its merge, a rollback) or deltas are off."""
        if self._delta is None or self._delta[0] != self.model.version:
            return None
        return self._delta[1]

    def _published(self, merged: GlobalModel) -> GlobalModel:
        """The merged version as it is published: `base + decoded(delta)`
        (`fedfmx.wire.model_delta`), so that every device ends on the same bits whether it applies
        the delta or not. The delta is between the versions as devices are sent them
        (`device_view`)."""
        downlink = self.fleet.downlink
        if not downlink.delta:
            return merged
        base_digest = payload_digest(self.device_payload())
        lossless = downlink.quantize == "none" or self.fleet.closed_form
        published = publishable(
            device_view(self.model.weights), device_view(merged.weights), lossless
        )
        header = DeltaHeader(
            fleet=self.fleet.name,
            version=merged.version,
            base_version=self.model.version,
            base_sha256=base_digest,
            class_names=merged.class_names,
            tensors=published.tensors,
        )
        self._delta = (merged.version, encode_delta(header, published.parts, downlink.zstd_level))
        weights = merged.weights | published.weights
        return GlobalModel(merged.version, weights, merged.class_names, merged.expert_usage)

    def device_payload(self) -> bytes:
        """The current version as devices are sent it (`device_view`), encoded once per version."""
        if self._device_payload is None or self._device_payload[0] != self.model.version:
            self._device_payload = (
                self.model.version,
                encode_model(self.model_header(), device_view(self.model.weights)),
            )
        return self._device_payload[1]

    def accept(self, payload: bytes, sender: str | None = None) -> UpdateHeader | None:
        """Validate and fold one update in; returns None for a duplicate (QoS 1 redelivery).

        Raises ProtocolError with the reason for anything malformed, hostile or out of place.
        """
        if self.current is None:
            raise ProtocolError("no round is open")
        header, tensors = self.decode(payload, sender)
        announcement = self.current.announcement
        if header.round != announcement.round or header.base_version != self.model.version:
            raise ProtocolError(
                f"update for round {header.round} / version {header.base_version}, "
                f"open is round {announcement.round} / version {self.model.version}"
            )
        if header.device_id not in announcement.participants:
            raise ProtocolError(
                f"device {header.device_id!r} is not a participant of round {header.round}"
            )
        if header.device_id in self.current.received:
            return None
        if header.includes_statistics:
            self._add_statistics(header, tensors)
        else:
            self.fold(header, tensors)
        self.current.received.add(header.device_id)
        return header

    def decode(self, payload: bytes, sender: str | None) -> tuple[UpdateHeader, Arrays]:
        """Decode and validate an update against the current model (shapes, dtypes, sizes,
        finiteness, the norm bound), from `sender` and for this fleet; ProtocolError if not."""
        header, tensors = decode_update(
            payload,
            lambda h: expected_update_shapes(h, self.model.weights),
            max_bytes=MAX_UPDATE_BYTES,
            norm_bound=self.fleet.robustness.max_update_norm,
        )
        if sender is not None and header.device_id != sender:
            raise ProtocolError(
                f"header says device {header.device_id!r} but it came from {sender!r}"
            )
        if header.fleet != self.fleet.name:
            raise ProtocolError(f"update for fleet {header.fleet!r}, this is {self.fleet.name!r}")
        return header, tensors

    def fold(self, header: UpdateHeader, tensors: Mapping[str, np.ndarray]) -> None:
        """Fold a validated delta update into the open round (clipped first when configured)."""
        assert self.current is not None
        clip_norm = self.fleet.robustness.clip_norm
        if clip_norm is not None:
            tensors, factor = clip_update(tensors, clip_norm)
            if factor < 1.0:
                log.info("update of %s clipped by %.3g", header.device_id, factor)
        if self._center is None:
            self.current.sums.add(update_sums(header, tensors, self.model.class_names))
        else:
            kept = {n: v for n, v in tensors.items() if not n.startswith(FISHER_PREFIX)}
            self.current.updates.append((header, kept))

    def accept_partial(
        self, payload: bytes, district: str, members: Collection[str]
    ) -> PartialHeader | None:
        """Validate a district's partial and add its sums like an update's; None for a
        second partial of the same district and round (a re-send after a restart: keyed by
        (round, district), it counts once). `members`: the district's devices in the round,
        which bound what it may claim to have counted."""
        if self.current is None:
            raise ProtocolError("no round is open")
        folds: list[FeatureStatistics] = []
        if self.fleet.closed_form:
            dim = self.model.weights[HEAD_WEIGHT].shape[1]
            header, folds = decode_statistics_partial(payload, dim, self.fleet.analytic)
            sums = MergeSums()
        else:
            header, sums = decode_partial(
                payload,
                self.model.weights,
                len(self.model.expert_usage),
                self.fleet.robustness.max_update_norm,
            )
        announcement = self.current.announcement
        if header.district != district:
            raise ProtocolError(f"partial of {header.district!r} came from {district!r}")
        if header.fleet != announcement.fleet:
            raise ProtocolError(
                f"partial for fleet {header.fleet!r}, this is {announcement.fleet!r}"
            )
        if header.round != announcement.round or header.base_version != self.model.version:
            raise ProtocolError(
                f"partial for round {header.round} / version {header.base_version}, "
                f"open is round {announcement.round} / version {self.model.version}"
            )
        if header.answered > len(members):
            raise ProtocolError(
                f"partial counts {header.answered} answers, the district has {len(members)} "
                "participants"
            )
        for device, (before, _) in header.rows.items():
            if device not in members:
                raise ProtocolError(f"partial counts rows of {device!r}, not of this district")
            held = rows_held(self.model.weights, device)
            if before != held:
                raise ProtocolError(
                    f"partial's rows of {device} follow row {before}, the model holds {held}"
                )
        if district in self.current.received:
            return None
        if header.rows:  # a closed-form partial with statistics (none: nothing to add)
            rows = {device: added for device, (_, added) in header.rows.items()}
            hits = np.asarray(header.lambda_hits, dtype=np.float64)
            for k, fold in enumerate(folds):
                first = k == 0  # each device's rows and the hits are counted once
                self._fold_statistics(k, fold, rows if first else {}, hits if first else hits[:0])
        elif not self.fleet.closed_form:
            known = set(self.model.class_names)
            sums.new_classes = [name for name in sums.new_classes if name not in known]
            self.current.sums.add(sums)
        self.current.received.add(district)
        return header

    def _add_statistics(self, header: UpdateHeader, tensors: Mapping[str, np.ndarray]) -> None:
        """Validate a closed-form update's statistics and add them to its device's fold."""
        assert self.current is not None
        analytic = self.fleet.analytic
        dim = self.model.weights[HEAD_WEIGHT].shape[1]
        held = rows_held(self.model.weights, header.device_id)
        if header.rows_before != held:
            raise ProtocolError(
                f"statistics follow row {header.rows_before} of {header.device_id}, "
                f"the model holds {held}"
            )
        stats = statistics_of_update(header, tensors, dim, analytic)
        hits = np.asarray(header.lambda_hits, dtype=np.float64)
        if len(hits) and (
            len(hits) != len(analytic.lambdas) or hits.min() < 0 or hits.max() > header.num_samples
        ):
            raise ProtocolError(
                f"lambda_hits must be {len(analytic.lambdas)} counts in 0..{header.num_samples}"
            )
        fold = fold_of(header.device_id, analytic.folds)
        self._fold_statistics(fold, stats, {header.device_id: header.num_samples}, hits)

    def _fold_statistics(
        self, fold: int, stats: FeatureStatistics, rows: Mapping[str, int], hits: np.ndarray
    ) -> None:
        """Add validated sums to fold `fold` of the open round, with the devices' rows they
        add and their prequential hits (empty: none counted)."""
        assert self.current is not None
        if not self.current.statistics:
            folds = self.fleet.analytic.folds
            self.current.statistics = [FeatureStatistics.empty(stats.dim) for _ in range(folds)]
        self.current.statistics[fold].add(stats)
        self.current.new_classes |= set(stats.counts) - set(self.model.class_names)
        self.current.rows.update(rows)
        if len(hits):
            previous = self.current.hits
            self.current.hits = hits if previous is None else previous + hits

    def _close_statistics(self, current: OpenRound) -> GlobalModel:
        """The next version of a closed-form head: sums folded in, `λ` chosen, head solved."""
        registry = self.model.class_names + sorted(current.new_classes)
        analytic = self.fleet.analytic
        hits = np.zeros(len(analytic.lambdas)) if current.hits is None else current.hits
        weights = refit(
            self.model.weights, registry, current.statistics, current.rows, hits, analytic
        )
        merged = GlobalModel(self.model.version + 1, weights, registry, self.model.expert_usage)
        self.model = self._published(merged)
        return self.model

    def close_round(self) -> GlobalModel:
        """Merge what was received into the next version (the same version if nothing came).

        The fleet's `robustness.merge` picks the rule: the associative `mean` from the sums, or
        `robust_delta` over the kept updates for `median` and `trimmed_mean`.
        """
        if self.current is None:
            raise ProtocolError("no round is open")
        current = self.current
        self.current = None
        if current.statistics:
            return self._close_statistics(current)
        delta: MergedDelta
        if self._center is None:
            if current.sums.updates == 0:
                return self.model
            delta = current.sums.delta()
        else:
            if not current.updates:
                return self.model
            delta = robust_delta(current.updates, self.model.class_names, self._center)
        weights, class_names = apply_delta(self.model.weights, self.model.class_names, delta)
        usage = usage_fractions(delta.usage, len(self.model.expert_usage))
        self.model = self._published(
            GlobalModel(self.model.version + 1, weights, class_names, usage)
        )
        return self.model
