"""A district's partial merge on the wire: its devices' `MergeSums`, and the root's validation.

A district aggregator folds its devices' validated updates into the same associative sums the
flat aggregator keeps (`fedfmx.federation.aggregation.MergeSums`) and forwards them, unmerged, as
one partial per round; the root adds partials like updates, so the tree's merge is the flat merge
up to the order of float64 additions (DESIGN §8).

Wire layout (as `fedfmx.wire.codec`): ``FMXP | header length | PartialHeader JSON | body``, the body
zstd-compressed safetensors (decompressed at most to `MAX_PARTIAL_BYTES`), every tensor float64,
named

    expert/<param>/fisher.num, fisher.den, samples.num, samples.den   an `ExpertSum`
    shared/<param>/num, den                                            router, backbone
    head/<i>/num, den                                                  row of head_classes[i]
    usage                                                              summed expert usage

A closed-form fleet's partial (`encode_statistics_partial`) carries instead its devices'
feature statistics per fold of devices (`fedfmx.closed_form.state`), float64:

    fold/<k>/gram, fold/<k>/moments, fold/<k>/counts     packed `G`, `q_c` rows, `n_c`

with, in the header, the classes of each fold's rows and, per device, the rows the fleet held
before and the rows added (so the root checks each device's `rows_before` as it would an update's).

`decode_partial` checks everything before a sum is folded in: framing, header, the exact names
and shapes the root's model has, finite values, non-negative weights (`Σw ≥ 0`), and the bound
every honest partial meets: each device's delta was within `max_update_norm`, so every
coordinate's weighted sum obeys `|Σ w·δ| ≤ max_update_norm · Σ w`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import zstandard
from pydantic import Field, ValidationError
from safetensors.numpy import save as save_tensors

from fedfmx.closed_form.head import (
    FeatureStatistics,
    pack_triangle,
    statistics_problem,
    triangle_shape,
    unpack_triangle,
)
from fedfmx.config import AnalyticConfig
from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import HEAD_WEIGHT, ExpertSum, MergeSums, WeightedSum
from fedfmx.wire.codec import ZSTD_MAGIC, decompress_bounded, frame, load_body, unframe
from fedfmx.wire.messages import Message, Name

PARTIAL_MAGIC = b"FMXP"
MAX_PARTIAL_BYTES = 512 * 1024 * 1024
"""Largest partial the root decodes, before and after decompression: float64 sums are ~32
bytes per model parameter."""
ZSTD_LEVEL = 3
"""Partials travel zstd-compressed: the denominators of a weighted sum repeat one weight per
tensor and compress to almost nothing (the numerators, float64 sums, barely compress)."""
BOUND_SLACK = 1e-9
"""Relative slack on `|Σ w·δ| ≤ C·Σ w` for float64 rounding of honest sums."""


class PartialHeader(Message):
    """Which round a partial belongs to and what it counts (the tensors carry the sums)."""

    fleet: Name
    district: Name
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    updates: int = Field(ge=0)
    """Device updates folded into the sums."""
    answered: int = Field(ge=0)
    """Participants of the district that answered: updates plus skips (the root's quorum)."""
    head_classes: list[Name] = Field(max_length=100_000)
    """Class of each `head/<i>` row sum."""
    new_classes: list[Name] = Field(max_length=100_000)
    """Classes the district's devices brought that the base registry lacks."""
    update_bytes: int = Field(ge=0)
    """Bytes of the device updates behind this partial (the root's totals)."""
    loss_sum: float = 0.0
    """Σ train loss of the folded updates (the root reports the fleet's mean loss)."""
    rows: dict[Name, tuple[int, int]] = Field(default_factory=dict, max_length=100_000)
    """Closed-form partials: device -> (rows the fleet held before, rows its statistics add)."""
    fold_classes: list[list[Name]] = Field(default_factory=list, max_length=64)
    """Closed-form partials: the classes of each `fold/<k>/moments` row, fold by fold."""
    lambda_hits: list[float] = Field(default_factory=list, max_length=1_000)
    """Closed-form partials: the devices' summed prequential hits per candidate `λ`."""


def encode_partial(header: PartialHeader, sums: MergeSums) -> bytes:
    """One district round's sums as a partial (header's `updates`, `head_classes` are checked
    against the sums so a district cannot send a header that does not describe its body)."""
    if header.updates != sums.updates or header.head_classes != list(sums.head):
        raise ValueError("partial header does not describe the sums")
    tensors: dict[str, np.ndarray] = {}
    for name, expert in sums.experts.items():
        for part, weighted in (("fisher", expert.fisher), ("samples", expert.samples)):
            tensors[f"expert/{name}/{part}.num"] = weighted.numerator
            tensors[f"expert/{name}/{part}.den"] = weighted.denominator
    for name, weighted in sums.shared.items():
        tensors[f"shared/{name}/num"] = weighted.numerator
        tensors[f"shared/{name}/den"] = weighted.denominator
    for index, weighted in enumerate(sums.head.values()):
        tensors[f"head/{index}/num"] = weighted.numerator
        tensors[f"head/{index}/den"] = weighted.denominator
    if sums.usage is not None:
        tensors["usage"] = sums.usage
    return _framed(header, tensors)


def _framed(header: PartialHeader, tensors: Mapping[str, np.ndarray]) -> bytes:
    """The partial's bytes: float64 safetensors, zstd-compressed (`ZSTD_LEVEL`)."""
    body = save_tensors({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()})
    return frame(PARTIAL_MAGIC, header, zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body))


def encode_statistics_partial(header: PartialHeader, folds: Sequence[FeatureStatistics]) -> bytes:
    """A closed-form district round's statistics as a partial (the header's `fold_classes`
    and `rows` must describe the folds: the root checks the counts against the rows)."""
    if header.fold_classes != [sorted(fold.counts) for fold in folds]:
        raise ValueError("partial header does not describe the folds")
    if sum(added for _, added in header.rows.values()) != sum(f.samples for f in folds):
        raise ValueError("partial header's rows are not the folds' rows")
    tensors: dict[str, np.ndarray] = {}
    for k, (fold, names) in enumerate(zip(folds, header.fold_classes, strict=True)):
        tensors[f"fold/{k}/gram"] = pack_triangle(fold.gram)
        tensors[f"fold/{k}/moments"] = (
            np.stack([fold.moments[name] for name in names]) if names else np.zeros((0, fold.dim))
        )
        tensors[f"fold/{k}/counts"] = np.array([fold.counts[n] for n in names], dtype=np.float64)
    return _framed(header, tensors)


def _header(payload: bytes) -> tuple[PartialHeader, dict[str, np.ndarray]]:
    """The partial's validated header and its tensors (framing, size, JSON schema)."""
    text, body = unframe(payload, PARTIAL_MAGIC, MAX_PARTIAL_BYTES)
    try:
        header = PartialHeader.model_validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ProtocolError(f"invalid partial header: {where}: {first['msg']}") from None
    if header.updates > header.answered:
        raise ProtocolError(f"{header.updates} updates but only {header.answered} answered")
    if body[:4] == ZSTD_MAGIC:
        body = decompress_bounded(body, MAX_PARTIAL_BYTES)
    return header, load_body(body)


def _tensor(stored: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` taken out of `stored`: present, float64 of `shape`, finite."""
    value = stored.pop(name, None)
    if value is None:
        raise ProtocolError(f"partial lacks {name}")
    if value.dtype != np.float64 or value.shape != shape:
        raise ProtocolError(
            f"{name}: expected float64{list(shape)}, got {value.dtype.name}{list(value.shape)}"
        )
    if not np.all(np.isfinite(value)):
        raise ProtocolError(f"{name}: not finite")
    return value


def _fold(stored: dict[str, np.ndarray], k: int, names: list[str], dim: int) -> FeatureStatistics:
    """Fold `k`'s sums from the partial's tensors (shapes, finiteness, whole counts)."""
    if len(set(names)) != len(names):
        raise ProtocolError(f"fold {k} names a class twice")
    gram = unpack_triangle(_tensor(stored, f"fold/{k}/gram", triangle_shape(dim)), dim)
    moments = _tensor(stored, f"fold/{k}/moments", (len(names), dim))
    counts = _tensor(stored, f"fold/{k}/counts", (len(names),))
    if np.any(counts < 1) or np.any(counts != np.round(counts)):
        raise ProtocolError(f"fold/{k}/counts: must be whole numbers of at least one row")
    return FeatureStatistics(
        gram,
        {name: moments[i] for i, name in enumerate(names)},
        {name: round(float(counts[i])) for i, name in enumerate(names)},
    )


def decode_statistics_partial(
    payload: bytes, dim: int, analytic: AnalyticConfig
) -> tuple[PartialHeader, list[FeatureStatistics]]:
    """Validate a closed-form partial: every fold as `statistics_problem` checks a device's
    statistics (a sum of Gram matrices is one), its rows as the header claims them, at most
    `analytic.max_samples` rows per device; ProtocolError says why not."""
    header, stored = _header(payload)
    if len(header.fold_classes) != analytic.folds:
        raise ProtocolError(
            f"partial has {len(header.fold_classes)} folds, the fleet {analytic.folds}"
        )
    if len(header.rows) > header.updates:
        raise ProtocolError(f"{len(header.rows)} devices' rows but {header.updates} updates")
    if any(before < 0 or added < 1 for before, added in header.rows.values()):
        raise ProtocolError("a device's rows must follow row 0 or later and add at least one")
    folds = [_fold(stored, k, names, dim) for k, names in enumerate(header.fold_classes)]
    if stored:
        raise ProtocolError(f"partial carries unexpected tensor {sorted(stored)[0]!r}")
    rows = sum(added for _, added in header.rows.values())
    if sum(fold.samples for fold in folds) != rows:
        raise ProtocolError(f"the folds hold {sum(f.samples for f in folds)} rows, not {rows}")
    limit = analytic.max_samples * max(len(header.rows), 1)
    for k, fold in enumerate(folds):
        if fold.samples == 0:
            if np.any(fold.gram):
                raise ProtocolError(f"fold {k}: a Gram matrix without rows")
            continue
        problem = statistics_problem(fold, dim, analytic.max_feature_norm, limit)
        if problem is not None:
            raise ProtocolError(f"fold {k} rejected: {problem}")
    hits = np.asarray(header.lambda_hits)
    if len(hits) and (len(hits) != len(analytic.lambdas) or hits.min() < 0 or hits.max() > rows):
        raise ProtocolError(f"lambda_hits must be {len(analytic.lambdas)} counts in 0..{rows}")
    return header, folds


def _weighted(
    stored: dict[str, np.ndarray], prefix: str, shape: tuple[int, ...], max_norm: float
) -> WeightedSum:
    """`prefix`num / `prefix`den, checked: float64 of `shape`, finite, `den ≥ 0`, bounded."""
    numerator = _tensor(stored, prefix + "num", shape)
    denominator = _tensor(stored, prefix + "den", shape)
    if np.any(denominator < 0):
        raise ProtocolError(f"{prefix}den: negative weight")
    if np.any(np.abs(numerator) > max_norm * denominator * (1 + BOUND_SLACK) + 1e-300):
        raise ProtocolError(f"{prefix}num: beyond max_update_norm times its weight")
    return WeightedSum(numerator, denominator)


def decode_partial(
    payload: bytes, weights: Mapping[str, np.ndarray], num_experts: int, max_update_norm: float
) -> tuple[PartialHeader, MergeSums]:
    """Validate a partial against the root's current model; ProtocolError says why not."""
    header, stored = _header(payload)
    if len(set(header.head_classes)) != len(header.head_classes):
        raise ProtocolError("partial names a head class twice")
    sums = MergeSums(updates=header.updates, new_classes=list(dict.fromkeys(header.new_classes)))
    for name, value in weights.items():
        if name == HEAD_WEIGHT:
            continue
        if name.startswith("experts.") and f"expert/{name}/fisher.num" in stored:
            sums.experts[name] = ExpertSum(
                fisher=_weighted(stored, f"expert/{name}/fisher.", value.shape, max_update_norm),
                samples=_weighted(stored, f"expert/{name}/samples.", value.shape, max_update_norm),
            )
        elif not name.startswith("experts.") and f"shared/{name}/num" in stored:
            sums.shared[name] = _weighted(stored, f"shared/{name}/", value.shape, max_update_norm)
    row = (weights[HEAD_WEIGHT].shape[1],)
    for index, class_name in enumerate(header.head_classes):
        sums.head[class_name] = _weighted(stored, f"head/{index}/", row, max_update_norm)
    usage = stored.pop("usage", None)
    if usage is not None:
        if usage.dtype != np.float64 or usage.shape != (num_experts,):
            raise ProtocolError(f"usage: expected float64[{num_experts}]")
        if not np.all(np.isfinite(usage)) or np.any(usage < 0):
            raise ProtocolError("usage: must be finite and non-negative")
        sums.usage = usage
    if stored:
        raise ProtocolError(f"partial carries unexpected tensor {sorted(stored)[0]!r}")
    if header.updates and usage is None:
        raise ProtocolError("partial with updates lacks usage")
    return header, sums
